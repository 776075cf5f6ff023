//! What QEMU to start and the command line that starts it.
//!
//! The command line is the same for the primary and for a restoring backup (QEMU's migration
//! requires identical machines); only `incoming_defer`, the RAM file and the log paths differ.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::error::{QemuError, Result};

/// Default QEMU binary, looked up in `PATH`.
pub const DEFAULT_BINARY: &str = "qemu-system-x86_64";

/// Mebibyte, the granularity of `-m`.
const MIB: u64 = 1024 * 1024;

/// How QEMU executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// Pure emulation; works everywhere (the only choice on hosts whose `/dev/kvm` cannot run a
    /// stock kernel).
    #[default]
    Tcg,
    /// Hardware virtualisation.
    Kvm,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        })
    }
}

impl FromStr for Accel {
    type Err = QemuError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tcg" => Ok(Accel::Tcg),
            "kvm" => Ok(Accel::Kvm),
            other => Err(QemuError::InvalidConfig(format!(
                "unknown accelerator {other:?} (expected tcg or kvm)"
            ))),
        }
    }
}

/// Which host side the guest's virtio-net device talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackend {
    /// `-netdev stream` to a unix socket the agent listens on (frames with a 4-byte big-endian
    /// length). QEMU 7.2 never reconnects: the listener must exist before QEMU starts.
    Stream {
        /// The agent's listening socket.
        socket: PathBuf,
    },
    /// QEMU's user-mode network (slirp), for tests: `hostfwd` rules such as
    /// `tcp:127.0.0.1:18080-:80`.
    User {
        /// Port forwards from the host into the guest.
        hostfwd: Vec<String>,
    },
}

/// The guest's one network card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// MAC address `xx:xx:xx:xx:xx:xx`; must be the same on primary and backup.
    pub mac: String,
    /// Host side of the card.
    pub backend: NetBackend,
}

/// The guest's disk, served by the agent over NBD on a unix socket (see `crate::disk`).
///
/// QEMU connects when it starts and never reconnects (`reconnect-delay=0`, `open-timeout=0`):
/// the server must listen before QEMU starts, and if the agent's end goes away the guest's
/// pending and later requests fail at once instead of QEMU silently waiting for a reconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The agent's listening socket.
    pub socket: PathBuf,
    /// Export name the agent serves (no commas).
    pub export: String,
}

/// Everything needed to start one QEMU.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// QEMU binary: a path, or a bare name looked up in `PATH`.
    pub binary: PathBuf,
    /// Accelerator.
    pub accel: Accel,
    /// `-cpu` model (`max` for TCG: the migration stream needs the same model on both sides).
    pub cpu: String,
    /// Number of vCPUs.
    pub smp: u32,
    /// Guest RAM in bytes (a multiple of 1 MiB).
    pub ram_bytes: u64,
    /// The file that holds guest RAM (`memory-backend-file`, `share=on`), usually in /dev/shm.
    pub ram_file: PathBuf,
    /// Machine type.
    pub machine: String,
    /// Options appended to the machine type. Default `suppress-vmdesc=on`, which drops the
    /// ~16 KB JSON description from every device-state blob.
    pub machine_opts: Vec<String>,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub append: String,
    /// File the guest's serial console is written to (truncated at start).
    pub serial_log: PathBuf,
    /// File QEMU's stderr goes to; its tail explains why QEMU died.
    pub stderr_log: PathBuf,
    /// QMP unix socket QEMU listens on.
    pub qmp_socket: PathBuf,
    /// The network card, if any.
    pub net: Option<NetConfig>,
    /// The disk (`/dev/vda` in the guest), if any; the same on primary and restore target.
    pub disk: Option<DiskConfig>,
    /// Start with `-incoming defer` (a restore target waiting for `migrate-incoming`).
    pub incoming_defer: bool,
    /// Run under QEMU's seccomp filter (`-sandbox on`, see [`SANDBOX`]): on by default, since
    /// QEMU parses what arrives from the wire (device state) and runs the guest.
    pub sandbox: bool,
    /// Drop to this user once the machine is set up (`-runas`): RAM, sockets, logs and the
    /// dirty-tracking userfaultfd are opened as root first. Needs the ftvm preload library in
    /// `env` (`LD_PRELOAD`), which makes QEMU die with its agent also after the drop.
    pub run_as: Option<String>,
    /// Arguments appended verbatim.
    pub extra_args: Vec<String>,
    /// Extra environment for QEMU (e.g. `LD_PRELOAD` of the dirty-page tracker).
    pub env: Vec<(String, String)>,
}

impl QemuConfig {
    /// A TCG microvm with RAM in `ram_file`, its sockets and logs under `run_dir`
    /// (`qmp.sock`, `serial.log`, `qemu.stderr`).
    pub fn new(
        kernel: impl Into<PathBuf>,
        ram_file: impl Into<PathBuf>,
        ram_bytes: u64,
        run_dir: impl AsRef<Path>,
    ) -> Self {
        let run_dir = run_dir.as_ref();
        QemuConfig {
            binary: PathBuf::from(DEFAULT_BINARY),
            accel: Accel::default(),
            cpu: "max".into(),
            smp: 1,
            ram_bytes,
            ram_file: ram_file.into(),
            machine: "microvm".into(),
            machine_opts: vec!["suppress-vmdesc=on".into()],
            kernel: kernel.into(),
            initrd: None,
            append: "console=ttyS0".into(),
            serial_log: run_dir.join("serial.log"),
            stderr_log: run_dir.join("qemu.stderr"),
            qmp_socket: run_dir.join("qmp.sock"),
            net: None,
            disk: None,
            incoming_defer: false,
            sandbox: true,
            run_as: None,
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// The same machine started as a restore target: RAM from `ram_file` (the replica),
    /// `-incoming defer`, sockets and logs under `run_dir`.
    pub fn incoming(&self, ram_file: impl Into<PathBuf>, run_dir: impl AsRef<Path>) -> Self {
        let run_dir = run_dir.as_ref();
        QemuConfig {
            ram_file: ram_file.into(),
            serial_log: run_dir.join("serial.log"),
            stderr_log: run_dir.join("qemu.stderr"),
            qmp_socket: run_dir.join("qmp.sock"),
            incoming_defer: true,
            ..self.clone()
        }
    }

    /// Checks the configuration and the files it names; returns the binary's full path.
    pub fn validate(&self) -> Result<PathBuf> {
        if self.ram_bytes == 0 || !self.ram_bytes.is_multiple_of(MIB) {
            return Err(QemuError::InvalidConfig(format!(
                "RAM size {} is not a positive multiple of 1 MiB",
                self.ram_bytes
            )));
        }
        if self.smp == 0 {
            return Err(QemuError::InvalidConfig("smp must be at least 1".into()));
        }
        if let Some(net) = &self.net {
            check_mac(&net.mac)?;
        }
        if let Some(disk) = &self.disk {
            check_export(&disk.export)?;
        }
        for (what, path) in [
            ("kernel", Some(&self.kernel)),
            ("initrd", self.initrd.as_ref()),
        ] {
            if let Some(path) = path {
                if !path.is_file() {
                    return Err(QemuError::FileNotFound {
                        what,
                        path: path.clone(),
                    });
                }
            }
        }
        find_binary(&self.binary)
    }

    /// The argument list (without the binary). Does not touch the file system.
    pub fn args(&self) -> Result<Vec<OsString>> {
        let mut a = ArgList::default();
        a.push("-nodefaults");
        a.push("-no-user-config");
        a.pair("-display", "none");
        a.pair("-accel", self.accel.to_string());
        let mut machine = self.machine.clone();
        for opt in &self.machine_opts {
            machine.push(',');
            machine.push_str(opt);
        }
        a.pair("-M", machine);
        a.pair("-cpu", &self.cpu);
        a.pair("-smp", self.smp.to_string());
        a.pair("-m", format!("{}M", self.ram_bytes / MIB));
        a.pair(
            "-object",
            format!(
                "memory-backend-file,id=mem,size={},mem-path={},share=on",
                self.ram_bytes,
                opt_path(&self.ram_file)?
            ),
        );
        a.pair("-machine", "memory-backend=mem");
        a.pair("-kernel", path_arg(&self.kernel)?);
        if let Some(initrd) = &self.initrd {
            a.pair("-initrd", path_arg(initrd)?);
        }
        a.pair("-append", &self.append);
        a.pair("-serial", format!("file:{}", opt_path(&self.serial_log)?));
        a.pair(
            "-qmp",
            format!("unix:{},server=on,wait=off", opt_path(&self.qmp_socket)?),
        );
        if let Some(net) = &self.net {
            check_mac(&net.mac)?;
            let netdev = match &net.backend {
                NetBackend::Stream { socket } => format!(
                    "stream,id=n0,server=off,addr.type=unix,addr.path={}",
                    opt_path(socket)?
                ),
                NetBackend::User { hostfwd } => {
                    let mut s = String::from("user,id=n0");
                    for rule in hostfwd {
                        s.push_str(",hostfwd=");
                        s.push_str(&escape_opt(rule));
                    }
                    s
                }
            };
            a.pair("-netdev", netdev);
            a.pair(
                "-device",
                format!("virtio-net-device,netdev=n0,mac={}", net.mac),
            );
        }
        if let Some(disk) = &self.disk {
            check_export(&disk.export)?;
            // cache.direct=off, cache.no-flush=off: the defaults, spelled out because they
            // matter — the guest's flushes must reach the agent (as NBD_CMD_FLUSH), and O_DIRECT
            // means nothing on a socket.
            a.pair(
                "-blockdev",
                format!(
                    "driver=nbd,node-name=disk0,server.type=unix,server.path={},export={},\
                     reconnect-delay=0,open-timeout=0,cache.direct=off,cache.no-flush=off",
                    opt_path(&disk.socket)?,
                    disk.export
                ),
            );
            a.pair("-device", "virtio-blk-device,drive=disk0");
        }
        if self.incoming_defer {
            a.pair("-incoming", "defer");
        }
        if self.sandbox {
            // QEMU's own setuid for -runas is a set*uid call the strict filter would kill it for.
            a.pair(
                "-sandbox",
                if self.run_as.is_some() {
                    SANDBOX_RUNAS
                } else {
                    SANDBOX
                },
            );
        }
        if let Some(user) = &self.run_as {
            a.pair("-runas", user);
        }
        for extra in &self.extra_args {
            a.push(extra);
        }
        Ok(a.0)
    }
}

/// QEMU's seccomp filter with every optional deny list: no obsolete system calls, no gaining
/// privileges (setuid and friends), no new processes or programs (fork/clone of a process,
/// execve: QEMU needs none here, the network is a socket and taps are opened with `script=no`),
/// no changing scheduling or CPU affinity. A denied call kills QEMU, so a compromised QEMU cannot
/// start a shell or a helper as root. QEMU installs it before creating the machine, so our
/// LD_PRELOAD library's calls (userfaultfd, a unix socket to hand the descriptor over) run under
/// it too; none of them is on a deny list.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// [`SANDBOX`] for a QEMU that drops to another user itself: set*uid stays allowed (after the
/// drop QEMU has no privilege left to regain).
pub const SANDBOX_RUNAS: &str =
    "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny";

/// Accumulates arguments.
#[derive(Default)]
struct ArgList(Vec<OsString>);

impl ArgList {
    fn push(&mut self, s: impl Into<OsString>) {
        self.0.push(s.into());
    }
    fn pair(&mut self, flag: &str, value: impl AsRef<str>) {
        self.push(flag);
        self.push(value.as_ref());
    }
}

/// QEMU option values separate keys with commas; a literal comma is written twice.
fn escape_opt(s: &str) -> String {
    s.replace(',', ",,")
}

/// A path as a plain argument; QEMU's parsers want UTF-8.
fn path_arg(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_owned)
        .ok_or_else(|| QemuError::InvalidConfig(format!("path {p:?} is not UTF-8")))
}

/// A path inside a QEMU option string.
fn opt_path(p: &Path) -> Result<String> {
    path_arg(p).map(|s| escape_opt(&s))
}

fn check_mac(mac: &str) -> Result<()> {
    let parts: Vec<&str> = mac.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(())
    } else {
        Err(QemuError::InvalidConfig(format!(
            "MAC address {mac:?} is not six hex pairs separated by colons"
        )))
    }
}

/// An NBD export name as it can appear in a QEMU option: non-empty, at most 4096 bytes (the
/// protocol's limit), no comma (QEMU's option separator).
fn check_export(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 4096 || name.contains(',') {
        return Err(QemuError::InvalidConfig(format!(
            "disk export name {name:?} must be 1..=4096 bytes without commas"
        )));
    }
    Ok(())
}

/// The user QEMU drops to by default (`-runas`), when it exists: created by
/// `real/host/install-deps.sh`, with no login, home or other use.
pub const DEFAULT_QEMU_USER: &str = "ftvm-qemu";

/// Whether a local user named `name` exists (and is not root, which `-runas` would not change).
pub fn unprivileged_user_exists(name: &str) -> bool {
    matches!(nix::unistd::User::from_name(name), Ok(Some(u)) if !u.uid.is_root())
}

/// Resolves the binary like the shell would: a path with a slash is taken as is, a bare name is
/// searched in `PATH`.
pub fn find_binary(binary: &Path) -> Result<PathBuf> {
    let is_exec = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if binary.components().count() > 1 || binary.is_absolute() {
        return if is_exec(binary) {
            Ok(binary.to_path_buf())
        } else {
            Err(QemuError::BinaryNotFound(binary.to_path_buf()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|p| is_exec(p))
        .ok_or_else(|| QemuError::BinaryNotFound(binary.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> QemuConfig {
        QemuConfig::new("/k/vmlinuz", "/dev/shm/vm,1", 256 * MIB, "/run/vm")
    }

    fn joined(c: &QemuConfig) -> String {
        c.args()
            .unwrap()
            .iter()
            .map(|s| s.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn builds_shared_ram_microvm_line() {
        let s = joined(&cfg());
        assert!(s.contains("-accel tcg"), "{s}");
        assert!(s.contains("-M microvm,suppress-vmdesc=on"), "{s}");
        assert!(s.contains("-m 256M"), "{s}");
        // The comma in the RAM path is doubled so QEMU does not read it as a new key.
        assert!(
            s.contains(
                "memory-backend-file,id=mem,size=268435456,mem-path=/dev/shm/vm,,1,share=on"
            ),
            "{s}"
        );
        assert!(s.contains("-machine memory-backend=mem"), "{s}");
        assert!(
            s.contains("-qmp unix:/run/vm/qmp.sock,server=on,wait=off"),
            "{s}"
        );
        assert!(s.contains("-serial file:/run/vm/serial.log"), "{s}");
        assert!(!s.contains("-incoming"), "{s}");
        assert!(!s.contains("-netdev"), "{s}");
        assert!(
            s.contains(
                "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ),
            "{s}"
        );
        assert!(!s.contains("-runas"), "{s}");
        let mut c = cfg();
        c.run_as = Some("ftvm-qemu".into());
        let s = joined(&c);
        assert!(s.contains("-runas ftvm-qemu"), "{s}");
        assert!(s.contains("elevateprivileges=allow,spawn=deny"), "{s}");
        c.sandbox = false;
        assert!(!joined(&c).contains("-sandbox"));
    }

    #[test]
    fn incoming_copy_differs_only_where_it_must() {
        let mut c = cfg();
        c.accel = Accel::Kvm;
        let inc = c.incoming("/dev/shm/replica", "/run/standby");
        let s = joined(&inc);
        assert!(s.contains("-incoming defer"), "{s}");
        assert!(s.contains("mem-path=/dev/shm/replica,"), "{s}");
        assert!(s.contains("-accel kvm"), "{s}");
        assert!(s.contains("/run/standby/qmp.sock"), "{s}");
    }

    #[test]
    fn net_backends() {
        let mut c = cfg();
        c.net = Some(NetConfig {
            mac: "52:54:00:12:34:56".into(),
            backend: NetBackend::Stream {
                socket: "/run/agent.sock".into(),
            },
        });
        let s = joined(&c);
        assert!(
            s.contains("-netdev stream,id=n0,server=off,addr.type=unix,addr.path=/run/agent.sock"),
            "{s}"
        );
        assert!(
            s.contains("-device virtio-net-device,netdev=n0,mac=52:54:00:12:34:56"),
            "{s}"
        );
        c.net = Some(NetConfig {
            mac: "52:54:00:12:34:56".into(),
            backend: NetBackend::User {
                hostfwd: vec!["tcp:127.0.0.1:1-:80".into(), "udp::2-:53".into()],
            },
        });
        let s = joined(&c);
        assert!(
            s.contains("-netdev user,id=n0,hostfwd=tcp:127.0.0.1:1-:80,hostfwd=udp::2-:53"),
            "{s}"
        );
    }

    #[test]
    fn disk_is_an_nbd_blockdev_on_both_primary_and_restore_target() {
        let mut c = cfg();
        assert!(!joined(&c).contains("-blockdev"));
        c.disk = Some(DiskConfig {
            socket: "/run/vm/disk,0.sock".into(),
            export: "vda".into(),
        });
        let want_blockdev = "-blockdev driver=nbd,node-name=disk0,server.type=unix,\
             server.path=/run/vm/disk,,0.sock,export=vda,reconnect-delay=0,open-timeout=0,\
             cache.direct=off,cache.no-flush=off";
        let want_device = "-device virtio-blk-device,drive=disk0";
        let s = joined(&c);
        assert!(s.contains(want_blockdev), "{s}");
        assert!(s.contains(want_device), "{s}");
        assert!(!s.contains("-drive"), "{s}");
        let inc = joined(&c.incoming("/dev/shm/replica", "/run/standby"));
        assert!(inc.contains(want_blockdev), "{inc}");
        assert!(inc.contains(want_device), "{inc}");
        for bad in ["", "a,b", &"x".repeat(4097)] {
            c.disk.as_mut().unwrap().export = bad.to_string();
            assert!(
                matches!(c.args(), Err(QemuError::InvalidConfig(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn rejects_bad_input() {
        let mut c = cfg();
        c.ram_bytes = 1000;
        assert!(matches!(c.validate(), Err(QemuError::InvalidConfig(_))));
        let mut c = cfg();
        c.net = Some(NetConfig {
            mac: "52:54:00:12:34".into(),
            backend: NetBackend::User { hostfwd: vec![] },
        });
        assert!(matches!(c.args(), Err(QemuError::InvalidConfig(_))));
        assert!("xen".parse::<Accel>().is_err());
        assert_eq!("kvm".parse::<Accel>().unwrap(), Accel::Kvm);
        // Kernel missing is named as such.
        let c = cfg();
        match c.validate() {
            Err(QemuError::FileNotFound { what, .. }) => assert_eq!(what, "kernel"),
            other => panic!("expected missing kernel, got {other:?}"),
        }
    }

    #[test]
    fn only_an_existing_user_other_than_root_is_one_to_drop_to() {
        assert!(unprivileged_user_exists("nobody"));
        assert!(!unprivileged_user_exists("root"));
        assert!(!unprivileged_user_exists("no-such-user-ftvm"));
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        let e = find_binary(Path::new("qemu-system-does-not-exist")).unwrap_err();
        assert!(matches!(e, QemuError::BinaryNotFound(_)));
        assert!(e.to_string().contains("not found"), "{e}");
        let e = find_binary(Path::new("/nonexistent/qemu")).unwrap_err();
        assert!(matches!(e, QemuError::BinaryNotFound(_)));
        assert!(find_binary(Path::new("sh")).is_ok());
    }
}
