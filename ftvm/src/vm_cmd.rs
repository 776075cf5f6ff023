//! `ftvm vm`: the demo guest with no protection at all, its network straight on a tap device.
//! The baseline that `ftvm bench e2e` compares protected runs against.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use ftvm_real::qemu::{self, BootOptions, QemuConfig};

use crate::guest_args::GuestArgs;

/// Arguments of `ftvm vm`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The guest.
    #[command(flatten)]
    guest: GuestArgs,
    /// Tap device for the VM's network.
    #[arg(long)]
    tap: String,
    /// Directory for the RAM file, sockets and logs.
    #[arg(long)]
    state_dir: PathBuf,
    /// A raw disk image for the VM, written in place (a copy: the database guest's disk.raw
    /// is read-only). Plain virtio-blk on the file, as an unprotected VM would have it.
    #[arg(long)]
    disk: Option<PathBuf>,
}

/// Boots the VM and keeps it running until interrupted.
pub fn run(args: Args) -> anyhow::Result<i32> {
    let accel = args.guest.accel()?;
    let guest = args.guest.image()?;
    ftvm_real::secure_fs::private_dir(&args.state_dir).context("the state directory")?;
    // Booting replaces an old RAM file of ours with a fresh 0600 one.
    let ram_file = args.state_dir.join("guest.ram");
    let mut cfg = QemuConfig::new(
        &guest.kernel,
        &ram_file,
        args.guest.ram_mb << 20,
        &args.state_dir,
    );
    args.guest.apply(&guest, accel, &mut cfg);
    cfg.extra_args.extend([
        "-netdev".to_string(),
        format!("tap,id=n0,ifname={},script=no,downscript=no", args.tap),
        "-device".to_string(),
        format!("virtio-net-device,netdev=n0,mac={}", args.guest.mac),
    ]);
    if let Some(disk) = &args.disk {
        if !disk.is_file() {
            anyhow::bail!("--disk {}: no such image", disk.display());
        }
        // QEMU's -blockdev takes comma-separated options; a comma in the path would split it.
        let path = disk.display().to_string();
        if path.contains(',') {
            anyhow::bail!("--disk {path}: QEMU cannot take a path with a comma");
        }
        cfg.extra_args.extend([
            "-blockdev".to_string(),
            format!("driver=file,node-name=disk0-file,filename={path}"),
            "-blockdev".to_string(),
            "driver=raw,node-name=disk0,file=disk0-file".to_string(),
            "-device".to_string(),
            "virtio-blk-device,drive=disk0".to_string(),
        ]);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let opts = BootOptions {
            // The database guest starts MariaDB before it reports ready (4–14 s under TCG).
            timeout: Duration::from_secs(if args.disk.is_some() { 60 } else { 15 }),
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
