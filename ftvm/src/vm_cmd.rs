//! `ftvm vm`: the demo guest with no protection at all, its network straight on a tap device.
//! The baseline that `ftvm bench e2e` compares protected runs against.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use ftvm_real::qemu::{self, Accel, BootOptions, GuestImage, QemuConfig};

/// Arguments of `ftvm vm`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory with the guest's `vmlinuz`, `initrd.img` and `cmdline`.
    #[arg(long)]
    guest_dir: PathBuf,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    ram_mb: u64,
    /// QEMU accelerator.
    #[arg(long, default_value = "tcg")]
    accel: String,
    /// The VM's MAC address.
    #[arg(long, default_value = "52:54:00:f7:00:0a")]
    mac: String,
    /// The VM's address and prefix (guest kernel command line).
    #[arg(long)]
    vm_ip: Option<String>,
    /// Pages per second the guest's dirtying workload rewrites.
    #[arg(long, default_value_t = 0)]
    dirty_pages: u64,
    /// Tap device for the VM's network.
    #[arg(long)]
    tap: String,
    /// Directory for the RAM file, sockets and logs.
    #[arg(long)]
    state_dir: PathBuf,
}

/// Boots the VM and keeps it running until interrupted.
pub fn run(args: Args) -> anyhow::Result<i32> {
    let guest = GuestImage::from_dir(&args.guest_dir).context("reading the guest directory")?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let ram_file = args.state_dir.join("guest.ram");
    let _ = std::fs::remove_file(&ram_file);
    let mut cfg = QemuConfig::new(&guest.kernel, &ram_file, args.ram_mb << 20, &args.state_dir);
    guest.apply(&mut cfg);
    cfg.accel = args.accel.parse::<Accel>().context("--accel")?;
    if !cfg.append.contains("tsc_early_khz") {
        cfg.append.push_str(" tsc_early_khz=2000000");
    }
    if let Some(ip) = &args.vm_ip {
        cfg.append.push_str(&format!(" ftvm.ip={ip}"));
    }
    if args.dirty_pages > 0 {
        cfg.append
            .push_str(&format!(" ftvm.dirty={}", args.dirty_pages));
    }
    cfg.extra_args.extend([
        "-netdev".to_string(),
        format!("tap,id=n0,ifname={},script=no,downscript=no", args.tap),
        "-device".to_string(),
        format!("virtio-net-device,netdev=n0,mac={}", args.mac),
    ]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let opts = BootOptions {
            timeout: Duration::from_secs(15),
            ..BootOptions::default()
        };
        let mut booted = qemu::boot(&cfg, &opts).await.context("booting the VM")?;
        eprintln!(
            "ftvm vm: guest ready after {:?} ({} tries)",
            booted.boot_time, booted.tries
        );
        let mut exit = booted.qemu.exit_watch();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            st = exit.ended() => anyhow::bail!("QEMU exited on its own ({st})"),
        }
        let _ = booted.qemu.kill().await;
        Ok(0)
    })
}
