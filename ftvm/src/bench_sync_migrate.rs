//! `ftvm bench sync`'s reference case: QEMU's own live migration of the same guest, between
//! the same two host namespaces the ftvm pair uses. The source is the machine an agent boots
//! (its QEMU configuration is built by the same code), the destination the same machine started
//! with `-incoming defer` on a preallocated RAM file, as a backup's replica is.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ftvm_real::host::topology::{Host, Topology};
use ftvm_real::qemu::{self, BootOptions, NetBackend, NetConfig, Qemu, QemuConfig};
use ftvm_real::secure_fs;
use serde_json::json;

use crate::bench_sync_report::{parse_query_migrate, RunFigures};
use crate::guest_args::GuestArgs;

/// QEMU's default `max-bandwidth` is 32 MiB/s, far below what the link does; this is set
/// instead, so that the link and the CPU are the limit, as they are for ftvm's sync.
pub const MAX_BANDWIDTH: u64 = 100 << 30;

/// Port the destination listens on (in the backup host's namespace).
const PORT: u16 = 7400;

/// How long a migration may take before the run is given up.
const MIGRATION_LIMIT: Duration = Duration::from_secs(300);

/// The settings a run uses, for the report.
pub fn settings() -> String {
    format!(
        "QEMU defaults (pre-copy, no compression, no multifd, downtime-limit 300 ms) except \
         max-bandwidth {} GiB/s; tcp between the primary's and the backup's namespaces; \
         destination RAM preallocated",
        MAX_BANDWIDTH >> 30
    )
}

/// What a qemu-migrate run needs.
pub struct MigrateOpts {
    /// The guest image directory.
    pub guest_dir: PathBuf,
    /// Guest RAM, MiB.
    pub ram_mb: u64,
    /// Pages per second the guest rewrites.
    pub dirty_pages: u64,
    /// Accelerator.
    pub accel: String,
    /// Namespace prefix and subnet (as the ftvm deployments').
    pub prefix: String,
    /// Subnet.
    pub subnet: u8,
    /// Scratch directory (QMP sockets, logs).
    pub work_dir: PathBuf,
    /// Seconds the guest's workload runs before the migration starts.
    pub warm_up: Duration,
}

/// Boots the guest in the primary's namespace, starts the destination in the backup's, and
/// migrates; returns the run's figures.
pub fn run(o: &MigrateOpts) -> anyhow::Result<RunFigures> {
    let topo = create_hosts(&o.prefix, o.subnet)?;
    secure_fs::fresh_private_dir(&o.work_dir).context("the work directory")?;
    let ram_dir = Path::new("/dev/shm").join(format!("ftvm-{}-{}-mig", o.prefix, o.subnet));
    secure_fs::fresh_private_dir(&ram_dir).context("the guest RAM directory")?;
    let figures = in_one_thread(&topo, o, &ram_dir);
    let _ = std::fs::remove_dir_all(&ram_dir);
    figures
}

/// Runs the case on one thread that stays alive throughout: each QEMU is spawned from it
/// (PR_SET_PDEATHSIG follows the spawning thread), after the thread entered that QEMU's host
/// namespace, where QEMU then opens its migration socket.
fn in_one_thread(topo: &Topology, o: &MigrateOpts, ram_dir: &Path) -> anyhow::Result<RunFigures> {
    let src_ns = netns_path(&topo.ns(Host::Primary));
    let dst_ns = netns_path(&topo.ns(Host::Backup));
    let addr = topo.addr(Host::Backup);
    let guest = GuestArgs {
        guest_dir: o.guest_dir.clone(),
        ram_mb: o.ram_mb,
        accel: o.accel.clone(),
        mac: "52:54:00:f7:00:0a".into(),
        vm_ip: None,
        dirty_pages: o.dirty_pages,
        disk_write: None,
    };
    let image = guest.image()?;
    let mut base = QemuConfig::new(
        &image.kernel,
        ram_dir.join("src.ram"),
        o.ram_mb << 20,
        o.work_dir.join("src"),
    );
    guest.apply(&image, guest.accel()?, &mut base);
    // The agent's card is a stream socket to the agent; slirp stands in for it here: the same
    // virtio-net device, with nobody on the other end.
    base.net = Some(NetConfig {
        mac: guest.mac.clone(),
        backend: NetBackend::User {
            hostfwd: Vec::new(),
        },
    });
    for d in ["src", "dst"] {
        secure_fs::private_dir(&o.work_dir.join(d))?;
    }
    let dst_ram = ram_dir.join("dst.ram");
    preallocate(&dst_ram, o.ram_mb << 20)?;
    let dst_cfg = base.incoming(&dst_ram, o.work_dir.join("dst"));
    let warm_up = o.warm_up;
    std::thread::scope(|s| {
        s.spawn(move || -> anyhow::Result<RunFigures> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                enter_netns(&src_ns)?;
                let booted = qemu::boot(&base, &BootOptions::default())
                    .await
                    .context("booting the source guest")?;
                let mut src = booted.qemu;
                tokio::time::sleep(warm_up).await;
                enter_netns(&dst_ns)?;
                let mut dst = Qemu::spawn_incoming(dst_cfg)
                    .await
                    .context("starting the destination QEMU")?;
                let uri = format!("tcp:{addr}:{PORT}");
                dst.qmp()
                    .execute("migrate-incoming", Some(json!({ "uri": uri })))
                    .await
                    .context("migrate-incoming")?;
                migrate(&mut src, &uri).await
            })
        })
        .join()
        .unwrap_or_else(|_| bail!("the migration thread panicked"))
    })
}

/// Sets max-bandwidth, starts the migration and polls `query-migrate` until it ends.
async fn migrate(src: &mut Qemu, uri: &str) -> anyhow::Result<RunFigures> {
    let q = src.qmp();
    q.execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": MAX_BANDWIDTH })),
    )
    .await
    .context("migrate-set-parameters")?;
    let t0 = Instant::now();
    q.execute("migrate", Some(json!({ "uri": uri })))
        .await
        .context("migrate")?;
    loop {
        let info = parse_query_migrate(&q.execute("query-migrate", None).await?);
        match info.status.as_str() {
            "completed" => {
                return Ok(RunFigures {
                    time_ms: t0.elapsed().as_secs_f64() * 1e3,
                    bytes: info.transferred.unwrap_or(0),
                    qemu_total_ms: info.total_ms,
                    downtime_ms: info.downtime_ms,
                    ..RunFigures::default()
                })
            }
            "failed" | "cancelled" => bail!(
                "the migration {}: {}",
                info.status,
                info.error.unwrap_or_default()
            ),
            _ if t0.elapsed() > MIGRATION_LIMIT => {
                bail!("the migration did not end within {MIGRATION_LIMIT:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// The hosts, with one retry: recreating namespaces of the same names right after the last run
/// removed them failed once here ("Invalid netns value" while moving a veth end into one).
fn create_hosts(prefix: &str, subnet: u8) -> anyhow::Result<Topology> {
    match Topology::create(prefix, subnet) {
        Ok(t) => Ok(t),
        Err(e) => {
            eprintln!("creating the hosts failed ({e}); once more in a second");
            std::thread::sleep(Duration::from_secs(1));
            Topology::create(prefix, subnet).context("creating the hosts")
        }
    }
}

fn netns_path(ns: &str) -> PathBuf {
    Path::new("/var/run/netns").join(ns)
}

/// Moves the calling thread into the network namespace at `path`.
fn enter_netns(path: &Path) -> anyhow::Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: setns(2) on a descriptor we own for the duration of the call; it changes only the
    // calling thread's network namespace and touches no memory of ours.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("entering {}", path.display()));
    }
    Ok(())
}

/// Creates the destination's RAM file (0600) with all its pages allocated, as a backup's
/// replica file is before a sync writes it.
fn preallocate(path: &Path, bytes: u64) -> anyhow::Result<()> {
    drop(secure_fs::open_or_create_private(path)?);
    let st = std::process::Command::new("fallocate")
        .args(["-l", &bytes.to_string()])
        .arg(path)
        .status()
        .context("running fallocate")?;
    if !st.success() {
        bail!("fallocate of {} failed ({st})", path.display());
    }
    Ok(())
}
