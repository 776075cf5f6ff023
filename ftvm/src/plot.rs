//! PNG plots of the benchmark JSON files (`plotters`, bitmap backend). Text is drawn with DejaVu
//! Sans, loaded at run time from Debian's `fonts-dejavu-core` (installed by
//! `real/host/install-deps.sh`) or from the file named by `FTVM_FONT`; nothing is embedded.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, Context};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::bench_auth::{AuthCase, AuthReport};
use crate::bench_capture::{CaptureCase, CaptureReport};
use crate::bench_mac::MacReport;

/// Where `fonts-dejavu-core` puts its sans-serif face.
const DEJAVU: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FONT: &str = "sans-serif";
/// Size of one panel; panels sit side by side.
const PANEL: (u32, u32) = (700, 560);

/// Series colours (Okabe–Ito, readable for colour-blind eyes).
const COLOURS: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(120, 120, 120),
    RGBColor(0, 0, 0),
];

/// Registers the font once; every later call reports the first outcome.
fn font() -> anyhow::Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let path = std::env::var_os("FTVM_FONT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEJAVU));
        let bytes = std::fs::read(&path).map_err(|e| {
            format!(
                "no font for the plot labels at {} ({e}): install fonts-dejavu-core \
                 (bash real/host/install-deps.sh) or point FTVM_FONT at a TrueType file",
                path.display()
            )
        })?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        for style in [FontStyle::Normal, FontStyle::Bold] {
            plotters::style::register_font(FONT, style, bytes)
                .map_err(|_| format!("{} is not a usable TrueType font", path.display()))?;
        }
        Ok(())
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// One line of a chart.
struct Series {
    label: String,
    points: Vec<(f64, f64)>,
    colour: usize,
    dashed: bool,
}

/// One chart. With `log2_x` the x values are plotted as their base-2 logarithm and labelled
/// with the value itself.
struct Panel {
    title: String,
    x_label: String,
    y_label: String,
    log2_x: bool,
    series: Vec<Series>,
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing: {e}")
}

/// A range that holds `values`, widened a little (and never empty).
fn span(values: impl Iterator<Item = f64>, from_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if from_zero {
        lo = lo.min(0.0);
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { 1.0 };
    (if from_zero { lo } else { lo - pad }, hi + pad)
}

fn draw_panel(area: &DrawingArea<BitMapBackend<'_>, Shift>, p: &Panel) -> anyhow::Result<()> {
    let tx = |x: f64| if p.log2_x { x.max(1e-9).log2() } else { x };
    let (x0, x1) = span(
        p.series
            .iter()
            .flat_map(|s| s.points.iter().map(|q| tx(q.0))),
        !p.log2_x,
    );
    let (_, y1) = span(
        p.series.iter().flat_map(|s| s.points.iter().map(|q| q.1)),
        true,
    );
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, (FONT, 22))
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, 0.0..y1)
        .map_err(plot_err)?;
    let log2 = p.log2_x;
    let x_fmt = move |v: &f64| {
        if log2 {
            // Only whole powers of two: between them 2^v rounds to repeated or odd labels.
            let e = v.round();
            if (v - e).abs() < 0.05 {
                format!("{}", 2f64.powf(e))
            } else {
                String::new()
            }
        } else {
            format!("{v}")
        }
    };
    chart
        .configure_mesh()
        .x_desc(&p.x_label)
        .y_desc(&p.y_label)
        .x_label_formatter(&x_fmt)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(plot_err)?;
    for s in &p.series {
        let colour = COLOURS[s.colour % COLOURS.len()];
        let mut pts: Vec<(f64, f64)> = s.points.iter().map(|&(x, y)| (tx(x), y)).collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let style = colour.stroke_width(if s.dashed { 2 } else { 3 });
        let anno = if s.dashed {
            chart
                .draw_series(DashedLineSeries::new(pts.clone(), 8, 6, style))
                .map_err(plot_err)?
        } else {
            chart
                .draw_series(LineSeries::new(pts.clone(), style))
                .map_err(plot_err)?;
            chart
                .draw_series(pts.iter().map(|&q| Circle::new(q, 4, colour.filled())))
                .map_err(plot_err)?
        };
        let dashed = s.dashed;
        anno.label(s.label.clone()).legend(move |(x, y)| {
            let w = if dashed { 1 } else { 3 };
            PathElement::new(vec![(x, y), (x + 22, y)], colour.stroke_width(w))
        });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

/// Draws `panels` side by side into `path`.
fn render(path: &Path, panels: &[Panel]) -> anyhow::Result<()> {
    font()?;
    // Up to three panels a row.
    let cols = panels.len().clamp(1, 3);
    let rows = panels.len().div_ceil(cols).max(1);
    let root = BitMapBackend::new(path, (PANEL.0 * cols as u32, PANEL.1 * rows as u32))
        .into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    for (area, p) in root.split_evenly((rows, cols)).iter().zip(panels) {
        draw_panel(area, p)?;
    }
    root.present()
        .map_err(plot_err)
        .with_context(|| format!("writing {}", path.display()))
}

/// `capture.png`: the pause against the dirty set per capture mode (median solid, p99 dashed),
/// one panel per page layout × pace, cow's median pause on a scale of its own, and the
/// send-updated-states time.
pub fn capture(r: &CaptureReport, dir: &Path) -> anyhow::Result<PathBuf> {
    let mut modes: Vec<(String, String)> = Vec::new();
    // One pause panel per layout × pace.
    let mut shapes: Vec<(String, String)> = Vec::new();
    for c in &r.cases {
        let k = (c.label(), c.transport.clone());
        if !modes.contains(&k) {
            modes.push(k);
        }
        let shape = (c.layout.clone(), c.pace.clone());
        if !shapes.contains(&shape) {
            shapes.push(shape);
        }
    }
    let one_transport = modes.iter().all(|k| k.1 == modes[0].1);
    let label = |k: &(String, String)| {
        if one_transport {
            k.0.clone()
        } else {
            format!("{} / {}", k.0, k.1)
        }
    };
    fn ms(us: u64) -> f64 {
        us as f64 / 1000.0
    }
    type Pick = dyn Fn(&CaptureCase) -> f64;
    let series = |(layout, pace): &(String, String), f: &Pick, suffix: &str, dashed| {
        modes
            .iter()
            .enumerate()
            .map(|(i, k)| Series {
                label: format!("{}{suffix}", label(k)),
                points: r
                    .cases
                    .iter()
                    .filter(|c| {
                        c.label() == k.0
                            && c.transport == k.1
                            && &c.layout == layout
                            && &c.pace == pace
                    })
                    .map(|c| (c.dirty_p50 as f64, f(c)))
                    .collect(),
                colour: i,
                dashed,
            })
            .collect::<Vec<_>>()
    };
    let transport = if one_transport {
        format!(", {}", modes.first().map_or("", |k| k.1.as_str()))
    } else {
        String::new()
    };
    let mut panels: Vec<Panel> = shapes
        .iter()
        .map(|shape| {
            let (layout, pace) = shape;
            let mut pause = series(shape, &|c| ms(c.pause_p50_us), " median", false);
            pause.extend(series(shape, &|c| ms(c.pause_p99_us), " p99", true));
            Panel {
                title: format!(
                    "Pause, {layout} pages, {pace} ({} ms epochs{transport})",
                    r.epoch_ms
                ),
                x_label: format!("dirty pages per epoch (4 KiB, {layout})"),
                y_label: "pause (ms)".into(),
                log2_x: false,
                series: pause,
            }
        })
        .collect();
    // cow's pause is too short to see next to the others: its own panel, in µs.
    let cow: Vec<Series> = shapes
        .iter()
        .enumerate()
        .map(|(i, (layout, pace))| Series {
            label: format!("{layout}, {pace}"),
            points: r
                .cases
                .iter()
                .filter(|c| {
                    c.capture == "cow"
                        && c.early_passes != Some(false)
                        && &c.layout == layout
                        && &c.pace == pace
                })
                .map(|c| (c.dirty_p50 as f64, c.pause_p50_us as f64))
                .collect(),
            colour: i,
            dashed: false,
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    if !cow.is_empty() {
        panels.push(Panel {
            title: format!("cow pause (median), every layout and pace{transport}"),
            x_label: "dirty pages per epoch (4 KiB)".into(),
            y_label: "pause (µs)".into(),
            log2_x: false,
            series: cow,
        });
    }
    if let Some(first) = shapes.first() {
        panels.push(Panel {
            title: format!(
                "Send updated states (median), {} pages, {}",
                first.0, first.1
            ),
            x_label: format!("dirty pages per epoch (4 KiB, {})", first.0),
            y_label: "capture done → sent (ms)".into(),
            log2_x: false,
            series: series(first, &|c| ms(c.send_p50_us), "", false),
        });
    }
    let path = dir.join("capture.png");
    render(&path, &panels)?;
    Ok(path)
}

#[derive(serde::Deserialize)]
struct TransportReport {
    paths: Vec<TransportPath>,
}

#[derive(serde::Deserialize)]
struct TransportPath {
    path: String,
    #[serde(default)]
    skipped: Option<String>,
    #[serde(default)]
    raw_tcp: Option<TransportCase>,
    #[serde(default)]
    cases: Vec<TransportCase>,
}

#[derive(serde::Deserialize)]
struct TransportCase {
    transport: String,
    batch_bytes: u64,
    gib_per_s: f64,
    #[serde(default)]
    error: Option<String>,
}

/// `transport.png` from `transport.json`: throughput per transport against the batch size, one
/// panel per path (loopback, veth).
pub fn transport(dir: &Path) -> anyhow::Result<PathBuf> {
    let json = dir.join("transport.json");
    let r: TransportReport = read_json(&json)?;
    let panels: Vec<Panel> = r
        .paths
        .iter()
        .filter(|p| p.skipped.is_none())
        .map(|p| {
            let mut names: Vec<&str> = Vec::new();
            for c in p.raw_tcp.iter().chain(&p.cases) {
                if !names.contains(&c.transport.as_str()) {
                    names.push(&c.transport);
                }
            }
            let kib = |c: &TransportCase| (c.batch_bytes >> 10) as f64;
            let (lo, hi) = p
                .cases
                .iter()
                .map(kib)
                .fold((f64::MAX, 0.0f64), |(lo, hi), k| (lo.min(k), hi.max(k)));
            let series = names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    let raw = p.raw_tcp.as_ref().is_some_and(|r| r.transport == *name);
                    let mut points: Vec<(f64, f64)> = p
                        .raw_tcp
                        .iter()
                        .chain(&p.cases)
                        .filter(|c| c.transport == *name && c.error.is_none())
                        .map(|c| (kib(c), c.gib_per_s))
                        .collect();
                    // Raw bulk TCP is one reference figure: a level across every batch size.
                    if raw && hi >= lo {
                        if let Some(&(_, v)) = points.first() {
                            points = vec![(lo, v), (hi, v)];
                        }
                    }
                    Series {
                        label: if raw {
                            format!("{name} (bulk reference)")
                        } else {
                            name.to_string()
                        },
                        points,
                        colour: i,
                        dashed: raw,
                    }
                })
                .collect();
            Panel {
                title: format!("Transports over {}", p.path),
                x_label: "batch (KiB of scattered 4 KiB pages)".into(),
                y_label: "GiB/s (median)".into(),
                log2_x: true,
                series,
            }
        })
        .collect();
    if panels.is_empty() {
        anyhow::bail!("{} has no measured path", json.display());
    }
    let path = dir.join("transport.png");
    render(&path, &panels)?;
    Ok(path)
}

#[derive(serde::Deserialize)]
struct E2eRow {
    config: String,
    #[serde(default)]
    epoch_ms: Option<u64>,
    dirty_pages_per_s: u64,
    #[serde(default)]
    transport: Option<String>,
    #[serde(default)]
    capture: Option<String>,
    resp_p50_us: u64,
    idle_rate: f64,
    /// Epoch policy (absent in files written before it existed: fixed).
    #[serde(default)]
    policy: Option<String>,
    #[serde(default = "one")]
    clients: u32,
    #[serde(default)]
    replies_per_s: f64,
}

fn one() -> u32 {
    1
}

/// `<name>.png` from `<name>.json`: with several client counts or epoch policies, the policy
/// comparison ([`e2e_policies`]); otherwise client response time (median) and VM idle rate
/// against the epoch length, per load × transport × capture mode, the unprotected VM's
/// response time dashed.
pub fn e2e(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let json = dir.join(format!("{name}.json"));
    let rows: Vec<E2eRow> = read_json(&json)?;
    let mut policies: Vec<&str> = rows.iter().filter_map(|r| r.policy.as_deref()).collect();
    policies.sort_unstable();
    policies.dedup();
    if policies.len() > 1 || rows.iter().any(|r| r.clients > 1) {
        return e2e_policies(&rows, &dir.join(format!("{name}.png")));
    }
    let protected: Vec<&E2eRow> = rows.iter().filter(|r| r.epoch_ms.is_some()).collect();
    if protected.is_empty() {
        anyhow::bail!("{} has no protected configuration", json.display());
    }
    let (lo, hi) = protected.iter().fold((u64::MAX, 0), |(lo, hi), r| {
        let e = r.epoch_ms.unwrap_or(0);
        (lo.min(e), hi.max(e))
    });
    let mut keys: Vec<(u64, String, String)> = Vec::new();
    for r in &protected {
        let k = (
            r.dirty_pages_per_s,
            r.transport.clone().unwrap_or_default(),
            r.capture.clone().unwrap_or_default(),
        );
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let label = |k: &(u64, String, String)| format!("{} pages/s, {}, {}", k.0, k.1, k.2);
    let series = |f: &dyn Fn(&E2eRow) -> f64| -> Vec<Series> {
        keys.iter()
            .enumerate()
            .map(|(i, k)| Series {
                label: label(k),
                points: protected
                    .iter()
                    .filter(|r| {
                        r.dirty_pages_per_s == k.0
                            && r.transport.clone().unwrap_or_default() == k.1
                            && r.capture.clone().unwrap_or_default() == k.2
                    })
                    .map(|r| (r.epoch_ms.unwrap_or(0) as f64, f(r)))
                    .collect(),
                colour: i,
                dashed: false,
            })
            .collect()
    };
    let mut resp = series(&|r| r.resp_p50_us as f64 / 1000.0);
    for (i, r) in rows
        .iter()
        .filter(|r| r.config == "unprotected")
        .enumerate()
    {
        let y = r.resp_p50_us as f64 / 1000.0;
        resp.push(Series {
            label: format!("unprotected, {} pages/s", r.dirty_pages_per_s),
            points: vec![(lo as f64, y), (hi as f64, y)],
            colour: COLOURS.len() - 1 - i,
            dashed: true,
        });
    }
    let panels = [
        Panel {
            title: "Client response time (median)".into(),
            x_label: "epoch (ms)".into(),
            y_label: "response (ms)".into(),
            log2_x: false,
            series: resp,
        },
        Panel {
            title: "VM idle rate (share of time paused)".into(),
            x_label: "epoch (ms)".into(),
            y_label: "idle rate".into(),
            log2_x: false,
            series: series(&|r| r.idle_rate),
        },
    ];
    let path = dir.join(format!("{name}.png"));
    render(&path, &panels)?;
    Ok(path)
}

/// A row of `e2e-sysbench.json` (what the plot needs of it).
#[derive(serde::Deserialize)]
struct SysbenchRow {
    config: String,
    #[serde(default)]
    epoch_ms: Option<u64>,
    #[serde(default)]
    transport: Option<String>,
    #[serde(default)]
    capture: Option<String>,
    #[serde(default)]
    policy: Option<String>,
    tps: f64,
    resp_p95_ms: f64,
    idle_rate: f64,
}

/// `<name>.png` of `ftvm bench e2e --workload sysbench`: transactions per second, the 95th
/// percentile of transaction latency and the VM idle rate against the epoch length, one line per
/// epoch policy, transport and capture mode, the unprotected VM dashed.
pub fn e2e_sysbench(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let json = dir.join(format!("{name}.json"));
    let rows: Vec<SysbenchRow> = read_json(&json)?;
    let protected: Vec<&SysbenchRow> = rows.iter().filter(|r| r.epoch_ms.is_some()).collect();
    if protected.is_empty() {
        anyhow::bail!("{} has no protected configuration", json.display());
    }
    let (lo, hi) = protected.iter().fold((u64::MAX, 0), |(lo, hi), r| {
        let e = r.epoch_ms.unwrap_or(0);
        (lo.min(e), hi.max(e))
    });
    let key = |r: &SysbenchRow| {
        (
            r.policy.clone().unwrap_or_default(),
            r.transport.clone().unwrap_or_default(),
            r.capture.clone().unwrap_or_default(),
        )
    };
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for r in &protected {
        if !keys.contains(&key(r)) {
            keys.push(key(r));
        }
    }
    let series = |f: &dyn Fn(&SysbenchRow) -> f64, with_base: bool| -> Vec<Series> {
        let mut v: Vec<Series> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| Series {
                label: format!("{} epochs, {} {}", k.0, k.1, k.2)
                    .trim_end()
                    .to_string(),
                points: protected
                    .iter()
                    .filter(|r| &key(r) == k)
                    .map(|r| (r.epoch_ms.unwrap_or(0) as f64, f(r)))
                    .collect(),
                colour: i,
                dashed: false,
            })
            .collect();
        if with_base {
            for r in rows.iter().filter(|r| r.config == "unprotected") {
                let y = f(r);
                v.push(Series {
                    label: "unprotected".into(),
                    points: vec![(lo as f64, y), (hi as f64, y)],
                    colour: COLOURS.len() - 1,
                    dashed: true,
                });
            }
        }
        v
    };
    let panel = |title: &str, y: &str, s: Vec<Series>| Panel {
        title: title.into(),
        x_label: "epoch (ms)".into(),
        y_label: y.into(),
        log2_x: false,
        series: s,
    };
    let panels = [
        panel(
            "sysbench oltp_read_write: transactions per second",
            "tps",
            series(&|r| r.tps, true),
        ),
        panel(
            "Transaction latency, 95th percentile",
            "latency (ms)",
            series(&|r| r.resp_p95_ms, true),
        ),
        panel(
            "VM idle rate (share of time paused)",
            "idle rate",
            series(&|r| r.idle_rate, false),
        ),
    ];
    let path = dir.join(format!("{name}.png"));
    render(&path, &panels)?;
    Ok(path)
}

/// The epoch-policy comparison: response time (median), replies per second and VM idle rate
/// against the number of concurrent clients, one line per policy and the unprotected VM.
fn e2e_policies(rows: &[E2eRow], path: &Path) -> anyhow::Result<PathBuf> {
    let key = |r: &E2eRow| match &r.policy {
        Some(p) => format!("{p} epochs"),
        None => "unprotected".to_string(),
    };
    let mut keys: Vec<String> = Vec::new();
    for r in rows {
        if !keys.contains(&key(r)) {
            keys.push(key(r));
        }
    }
    let series = |f: &dyn Fn(&E2eRow) -> f64| -> Vec<Series> {
        keys.iter()
            .enumerate()
            .map(|(i, k)| Series {
                label: k.clone(),
                points: rows
                    .iter()
                    .filter(|r| &key(r) == k)
                    .map(|r| (f64::from(r.clients), f(r)))
                    .collect(),
                colour: i,
                dashed: k == "unprotected",
            })
            .collect()
    };
    let panel = |title: &str, y: &str, f: &dyn Fn(&E2eRow) -> f64| Panel {
        title: title.into(),
        x_label: "concurrent clients".into(),
        y_label: y.into(),
        log2_x: true,
        series: series(f),
    };
    let panels = [
        panel("Client response time (median)", "response (ms)", &|r| {
            r.resp_p50_us as f64 / 1000.0
        }),
        panel("Replies per second", "replies/s", &|r| r.replies_per_s),
        panel("VM idle rate (share of time paused)", "idle rate", &|r| {
            r.idle_rate
        }),
    ];
    render(path, &panels)?;
    Ok(path.to_path_buf())
}

/// `auth.png`: pause and send-updated-states time against the pages written per epoch, one line
/// per link protection.
pub fn auth(r: &AuthReport, dir: &Path) -> anyhow::Result<PathBuf> {
    let mut names: Vec<String> = Vec::new();
    for c in &r.cases {
        if !names.contains(&c.protection) {
            names.push(c.protection.clone());
        }
    }
    let series = |f: &dyn Fn(&AuthCase) -> f64| -> Vec<Series> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| Series {
                label: n.clone(),
                points: r
                    .cases
                    .iter()
                    .filter(|c| &c.protection == n)
                    .map(|c| (c.target_pages as f64, f(c)))
                    .collect(),
                colour: i,
                dashed: false,
            })
            .collect()
    };
    let panels = [
        Panel {
            title: format!("Pause p50, {} ms epochs", r.epoch_ms),
            x_label: "pages written per epoch".into(),
            y_label: "pause (µs)".into(),
            log2_x: false,
            series: series(&|c| c.pause_p50_us as f64),
        },
        Panel {
            title: "Send-updated-states p50".into(),
            x_label: "pages written per epoch".into(),
            y_label: "send (µs)".into(),
            log2_x: false,
            series: series(&|c| c.send_p50_us as f64),
        },
    ];
    let path = dir.join("auth.png");
    render(&path, &panels)?;
    Ok(path)
}

/// `mac.png`: one horizontal bar per candidate × message size, the median GiB/s on one core
/// (labelled), a whisker from the slowest to the fastest repetition.
pub fn mac(r: &MacReport, dir: &Path) -> anyhow::Result<PathBuf> {
    font()?;
    let mut names: Vec<&str> = Vec::new();
    let mut sizes: Vec<u64> = Vec::new();
    for c in &r.cases {
        if !names.contains(&c.candidate.as_str()) {
            names.push(&c.candidate);
        }
        if !sizes.contains(&c.pages) {
            sizes.push(c.pages);
        }
    }
    if names.is_empty() {
        anyhow::bail!("mac.json has no case");
    }
    let path = dir.join("mac.png");
    let height = 140 + (names.len() * sizes.len()) as u32 * 26;
    draw_mac(r, &path, &names, &sizes, height.max(400))?;
    Ok(path)
}

/// Draws `mac.png` (see [`mac`]).
fn draw_mac(
    r: &MacReport,
    path: &Path,
    names: &[&str],
    sizes: &[u64],
    height: u32,
) -> anyhow::Result<()> {
    let n = names.len();
    let x1 = r.cases.iter().map(|c| c.gib_per_s_max).fold(0.0, f64::max) * 1.12;
    let root = BitMapBackend::new(path, (1100, height)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    // Candidate i is drawn at y = n - 1 - i (the first on top), its bars within ±0.4.
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "MAC and AEAD throughput on one core ({}, median of {}; whiskers min–max)",
                r.cpu, r.repetitions
            ),
            (FONT, 20),
        )
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(200)
        .build_cartesian_2d(0.0..x1.max(1.0), -0.5..n as f64 - 0.5)
        .map_err(plot_err)?;
    let label = |v: &f64| {
        let i = v.round();
        if (v - i).abs() > 1e-6 || i < 0.0 || i as usize >= n {
            return String::new();
        }
        names[n - 1 - i as usize].to_string()
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&label)
        .x_desc("GiB/s of pages, one core")
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(plot_err)?;
    let band = 0.8 / sizes.len() as f64;
    for (k, &pages) in sizes.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let bars: Vec<(f64, f64, &crate::bench_mac::MacCase)> = r
            .cases
            .iter()
            .filter(|c| c.pages == pages)
            .filter_map(|c| {
                let i = names.iter().position(|&x| x == c.candidate)?;
                let y0 = (n - 1 - i) as f64 - 0.4 + band * k as f64;
                Some((y0, y0 + band * 0.9, c))
            })
            .collect();
        chart
            .draw_series(bars.iter().map(|&(y0, y1, c)| {
                Rectangle::new([(0.0, y0), (c.gib_per_s_median, y1)], colour.filled())
            }))
            .map_err(plot_err)?
            .label(format!("{pages} pages per message"))
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 18, y + 6)], colour.filled()));
        chart
            .draw_series(bars.iter().map(|&(y0, y1, c)| {
                let y = (y0 + y1) / 2.0;
                PathElement::new(
                    vec![(c.gib_per_s_min, y), (c.gib_per_s_max, y)],
                    BLACK.stroke_width(2),
                )
            }))
            .map_err(plot_err)?;
        chart
            .draw_series(bars.iter().map(|&(y0, y1, c)| {
                Text::new(
                    format!("{:.2}", c.gib_per_s_median),
                    (c.gib_per_s_max + x1 * 0.01, (y0 + y1) / 2.0 + band * 0.45),
                    (FONT, 13),
                )
            }))
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .draw()
        .map_err(plot_err)?;
    root.present()
        .map_err(plot_err)
        .with_context(|| format!("writing {}", path.display()))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

/// `ftvm bench plot`: re-renders every plot whose JSON is in `dir`.
pub fn all(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut done = Vec::new();
    let capture = dir.join("capture.json");
    if capture.exists() {
        let r: CaptureReport = read_json(&capture)?;
        done.push(self::capture(&r, dir)?);
    }
    if dir.join("transport.json").exists() {
        done.push(transport(dir)?);
    }
    for name in ["e2e", "e2e-policy"] {
        if dir.join(format!("{name}.json")).exists() {
            done.push(e2e(dir, name)?);
        }
    }
    if dir.join("e2e-sysbench.json").exists() {
        done.push(e2e_sysbench(dir, "e2e-sysbench")?);
    }
    let auth = dir.join("auth.json");
    if auth.exists() {
        let r: AuthReport = read_json(&auth)?;
        done.push(self::auth(&r, dir)?);
    }
    let mac = dir.join("mac.json");
    if mac.exists() {
        let r: MacReport = read_json(&mac)?;
        done.push(self::mac(&r, dir)?);
    }
    if done.is_empty() {
        anyhow::bail!(
            "{} has none of capture.json, transport.json, e2e.json, mac.json: run a benchmark first",
            dir.display()
        );
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_pads_and_never_collapses() {
        assert_eq!(span([].into_iter(), true), (0.0, 1.0));
        assert_eq!(span([5.0].into_iter(), true), (0.0, 5.25));
        assert_eq!(span([3.0, 3.0].into_iter(), false), (2.0, 4.0));
        let (lo, hi) = span([10.0, 20.0, f64::NAN].into_iter(), false);
        assert_eq!((lo, hi), (9.5, 20.5));
    }

    #[test]
    fn plot_all_wants_some_json_and_rejects_a_broken_file() {
        let dir = std::env::temp_dir().join(format!("ftvm-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = all(&dir).unwrap_err();
        assert!(e.to_string().contains("run a benchmark first"), "{e}");
        std::fs::write(dir.join("transport.json"), "{\"paths\": 3}").unwrap();
        let e = all(&dir).unwrap_err();
        assert!(format!("{e:#}").contains("parsing"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
