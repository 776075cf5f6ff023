//! Serves one disk image to QEMU over a unix socket (NBD), tracking the blocks written.
//!
//! Threads, not tokio tasks: every request is a blocking `pread`/`pwrite` on the image, QEMU's
//! client sends one request stream per connection, and the agent's runtime stays free for the
//! checkpoint path. One thread accepts; each connection gets one thread (at most
//! [`DiskServerConfig::max_connections`]; QEMU opens one).

use std::collections::HashMap;
use std::io::{self, BufReader};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use super::dirty::DirtyBlocks;
use super::error::DiskError;
use super::image::DiskImage;
use super::nbd::proto::{
    Request, TFLAG_HAS_FLAGS, TFLAG_SEND_FLUSH, TFLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES,
};
use super::nbd::{negotiate, serve, Backend, Export, NbdError, Negotiated};
use super::snapshot::DiskSnapshot;
use super::stats::{Counters, DiskStats};
use super::BLOCK_SIZE;

/// Largest `CMD_READ`/`CMD_WRITE` payload accepted by default: the protocol's default maximum
/// block size (a client that does not ask may send this much), so also the most one
/// connection ever buffers.
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;

/// Longest export name the protocol allows.
const MAX_EXPORT_NAME: usize = 4096;

/// Consecutive blocks read with one `pread` by [`DiskServer::read_blocks`].
const MAX_BLOCKS_PER_READ: u64 = 256;

/// How the server behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskServerConfig {
    /// Export name QEMU asks for (`export=` of its `-blockdev driver=nbd`).
    pub export: String,
    /// Largest read/write payload accepted (see [`DEFAULT_MAX_PAYLOAD`]).
    pub max_payload: u32,
    /// `fdatasync` the image on `CMD_FLUSH` and FUA writes. Off by default: failover never
    /// depends on the primary's file (the guest's flush is only acknowledged to the outside
    /// once the backup has acknowledged the epoch holding it), so this only matters for
    /// restarting from the primary's own image after a host crash.
    pub sync_on_flush: bool,
    /// Connections served at once; more are closed on accept.
    pub max_connections: usize,
}

impl DiskServerConfig {
    /// Defaults for `export`.
    pub fn new(export: impl Into<String>) -> DiskServerConfig {
        DiskServerConfig {
            export: export.into(),
            max_payload: DEFAULT_MAX_PAYLOAD,
            sync_on_flush: false,
            max_connections: 4,
        }
    }
}

/// A running NBD server for one image. Stops (and joins its threads) on [`DiskServer::stop`]
/// or drop.
#[derive(Debug)]
pub struct DiskServer {
    shared: Arc<Shared>,
    listener: Arc<UnixListener>,
    accept: Option<JoinHandle<()>>,
    socket: PathBuf,
}

#[derive(Debug)]
struct Shared {
    image: DiskImage,
    dirty: DirtyBlocks,
    counters: Counters,
    config: DiskServerConfig,
    stopping: AtomicBool,
    conns: Mutex<Connections>,
    /// The snapshot a full checkpoint is being read from, while its sender holds it.
    snapshot: Mutex<Weak<DiskSnapshot>>,
}

#[derive(Debug, Default)]
struct Connections {
    next_id: u64,
    /// A handle on each open connection's socket, to shut it down on stop.
    live: HashMap<u64, UnixStream>,
    threads: Vec<JoinHandle<()>>,
}

impl DiskServer {
    /// Listens on `socket` (a stale file there is replaced; the socket is made 0600) and serves
    /// `image` from now on. QEMU connects when it starts, so this must run before QEMU does.
    pub fn start(
        image: DiskImage,
        socket: impl Into<PathBuf>,
        config: DiskServerConfig,
    ) -> Result<DiskServer, DiskError> {
        let socket = socket.into();
        if config.export.is_empty()
            || config.export.len() > MAX_EXPORT_NAME
            || config.export.contains(',')
        {
            return Err(DiskError::BadExportName(config.export));
        }
        let socket_err = |source| DiskError::Socket {
            path: socket.clone(),
            source,
        };
        match std::fs::remove_file(&socket) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(socket_err(e)),
            _ => {}
        }
        let listener = Arc::new(UnixListener::bind(&socket).map_err(socket_err)?);
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(socket_err)?;
        let shared = Arc::new(Shared {
            dirty: DirtyBlocks::new(image.blocks()),
            image,
            counters: Counters::default(),
            config,
            stopping: AtomicBool::new(false),
            conns: Mutex::new(Connections::default()),
            snapshot: Mutex::new(Weak::new()),
        });
        let accept = {
            let (shared, listener) = (shared.clone(), listener.clone());
            std::thread::Builder::new()
                .name("disk-accept".into())
                .spawn(move || accept_loop(&shared, &listener))
                .map_err(DiskError::Thread)?
        };
        Ok(DiskServer {
            shared,
            listener,
            accept: Some(accept),
            socket,
        })
    }

    /// The socket QEMU connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The served image.
    pub fn image(&self) -> &DiskImage {
        &self.shared.image
    }

    /// Size of the image in blocks of [`BLOCK_SIZE`].
    pub fn blocks(&self) -> u64 {
        self.shared.image.blocks()
    }

    /// Blocks written (or zeroed) since the previous call, ascending; the set starts over.
    /// Complete for a checkpoint when called with the VM stopped: `stop` returns after QEMU has
    /// drained its requests, and a request is marked before it is acknowledged.
    pub fn take_dirty(&self) -> Vec<u64> {
        self.shared.dirty.take()
    }

    /// Blocks dirty right now.
    pub fn dirty_count(&self) -> u64 {
        self.shared.dirty.count()
    }

    /// Appends the contents of blocks `indices` to `out`, in the order given ([`BLOCK_SIZE`]
    /// bytes each); runs of consecutive indices are read with one `pread`.
    /// While the VM is paused: a snapshot of `blocks` (sorted, no repeats) to read a full
    /// checkpoint's disk part from while the guest runs on (see [`DiskSnapshot`]); it lasts as
    /// long as the returned handle.
    pub fn snapshot(&self, blocks: Vec<u64>) -> Arc<DiskSnapshot> {
        let snap = Arc::new(DiskSnapshot::new(blocks));
        *self
            .shared
            .snapshot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::downgrade(&snap);
        snap
    }

    /// A handle for reading snapshots from another thread (the link writer).
    pub fn snapshot_reader(&self) -> SnapshotReader {
        SnapshotReader {
            shared: self.shared.clone(),
        }
    }

    pub fn read_blocks(&self, indices: &[u64], out: &mut Vec<u8>) -> Result<(), DiskError> {
        let blocks = self.blocks();
        if let Some(&index) = indices.iter().find(|&&i| i >= blocks) {
            return Err(DiskError::BlockOutOfRange { index, blocks });
        }
        out.reserve(indices.len() * BLOCK_SIZE as usize);
        let mut rest = indices;
        while let Some(&first) = rest.first() {
            let run = rest
                .iter()
                .zip(first..)
                .take(MAX_BLOCKS_PER_READ as usize)
                .take_while(|(&i, want)| i == *want)
                .count();
            let start = out.len();
            out.resize(start + run * BLOCK_SIZE as usize, 0);
            self.shared
                .image
                .read_at(&mut out[start..], first * BLOCK_SIZE)?;
            rest = &rest[run..];
        }
        Ok(())
    }

    /// Counters since start.
    pub fn stats(&self) -> DiskStats {
        self.shared.counters.snapshot()
    }

    /// Stops accepting, closes every connection (QEMU's pending requests fail), joins the
    /// threads and removes the socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        // A listening socket shut down makes the blocked accept() return (EINVAL on Linux).
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&self.listener.as_fd()),
            nix::sys::socket::Shutdown::Both,
        );
        let _ = accept.join();
        let threads = {
            let mut conns = self.shared.conns.lock().unwrap_or_else(|p| p.into_inner());
            for stream in conns.live.values() {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
            std::mem::take(&mut conns.threads)
        };
        for t in threads {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for DiskServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &UnixListener) {
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                match e.raw_os_error() {
                    Some(libc::EINTR) | Some(libc::ECONNABORTED) => {}
                    // Out of descriptors or memory: wait instead of spinning.
                    _ => {
                        tracing::warn!(error = %e, "disk server: accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                continue;
            }
        };
        let mut conns = shared.conns.lock().unwrap_or_else(|p| p.into_inner());
        // Reap finished connection threads.
        let (done, running): (Vec<_>, Vec<_>) =
            conns.threads.drain(..).partition(|t| t.is_finished());
        conns.threads = running;
        for t in done {
            let _ = t.join();
        }
        if conns.live.len() >= shared.config.max_connections {
            tracing::warn!(
                max = shared.config.max_connections,
                "disk server: connection refused, too many open"
            );
            continue;
        }
        let handle = match stream.try_clone() {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "disk server: cannot keep a connection handle");
                continue;
            }
        };
        let id = conns.next_id;
        conns.next_id += 1;
        let worker = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("disk-conn-{id}"))
                .spawn(move || {
                    run_connection(&shared, stream);
                    let mut conns = shared.conns.lock().unwrap_or_else(|p| p.into_inner());
                    conns.live.remove(&id);
                })
        };
        match worker {
            Ok(t) => {
                conns.live.insert(id, handle);
                conns.threads.push(t);
                Counters::add(&shared.counters.connections, 1);
            }
            Err(e) => tracing::warn!(error = %e, "disk server: cannot start a connection thread"),
        }
    }
}

fn run_connection(shared: &Shared, stream: UnixStream) {
    let result = (|| -> Result<(), NbdError> {
        // Buffered reads: a request header and small payloads cost one read, not three.
        let mut reader = BufReader::with_capacity(64 * 1024, stream.try_clone()?);
        let mut writer = &stream;
        let export = Export {
            name: shared.config.export.clone(),
            size: shared.image.size(),
            flags: TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES,
            max_payload: shared.config.max_payload,
        };
        match negotiate(&mut reader, &mut writer, &export)? {
            Negotiated::Aborted => Ok(()),
            Negotiated::Transmission => serve(
                &mut reader,
                &mut writer,
                shared,
                export.size,
                export.max_payload,
            ),
        }
    })();
    if let Err(e) = result {
        if !shared.stopping.load(Ordering::SeqCst) {
            Counters::add(&shared.counters.failed_connections, 1);
            tracing::warn!(error = %e, "disk server: connection ended");
        }
    }
}

/// Reads a full checkpoint's disk blocks from its snapshot, on the link writer's thread.
#[derive(Debug, Clone)]
pub struct SnapshotReader {
    shared: Arc<Shared>,
}

impl SnapshotReader {
    /// The `pos`-th block of `snap` as it was when it was taken, into `out` (4096 bytes).
    pub fn read(&self, snap: &DiskSnapshot, pos: usize, out: &mut [u8]) -> Result<(), DiskError> {
        snap.read(&self.shared.image, pos, out)
    }
}

impl Shared {
    /// A full checkpoint being read from a snapshot keeps the old contents of what a write is
    /// about to overwrite.
    fn before_write(&self, offset: u64, len: u64) -> io::Result<()> {
        let snap = self
            .snapshot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .upgrade();
        match snap {
            Some(s) => s.before_write(&self.image, offset, len),
            None => Ok(()),
        }
    }
}

impl Backend for Shared {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.image.read_at(buf, offset)?;
        Counters::add(&self.counters.reads, 1);
        Counters::add(&self.counters.bytes_read, buf.len() as u64);
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.before_write(offset, data.len() as u64)?;
        let written = self.image.write_at(data, offset);
        // Marked after the write and before the reply: a take() between the two only moves the
        // block to the next checkpoint, never drops it; marked even if the write failed part
        // way, since part of it may have landed.
        self.dirty.mark_range(offset, data.len() as u64);
        written?;
        if fua && self.config.sync_on_flush {
            self.image.sync_data()?;
        }
        Counters::add(&self.counters.writes, 1);
        Counters::add(&self.counters.bytes_written, data.len() as u64);
        Ok(())
    }

    fn zero_at(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.before_write(offset, length)?;
        let zeroed = self.image.zero_range(offset, length);
        self.dirty.mark_range(offset, length);
        zeroed?;
        if fua && self.config.sync_on_flush {
            self.image.sync_data()?;
        }
        Counters::add(&self.counters.zeroes, 1);
        Counters::add(&self.counters.bytes_zeroed, length);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if self.config.sync_on_flush {
            self.image.sync_data()?;
        }
        Counters::add(&self.counters.flushes, 1);
        Ok(())
    }

    fn refused(&self, _request: &Request, _error: u32) {
        Counters::add(&self.counters.refused, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::super::nbd::proto::{CMD_READ, CMD_WRITE, EINVAL};
    use super::super::nbd::NbdClient;
    use super::*;

    const BS: usize = BLOCK_SIZE as usize;

    fn server(dir: &Path, blocks: u64) -> DiskServer {
        let image = DiskImage::create(dir.join("disk.img"), blocks * BLOCK_SIZE).unwrap();
        let mut config = DiskServerConfig::new("vda");
        config.max_payload = 1 << 20;
        DiskServer::start(image, dir.join("nbd.sock"), config).unwrap()
    }

    #[test]
    fn writes_land_in_the_image_and_mark_their_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let s = server(dir.path(), 64);
        use std::os::unix::fs::FileTypeExt;
        let meta = std::fs::metadata(s.socket()).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);

        let mut c = NbdClient::connect(s.socket(), "vda").unwrap();
        assert_eq!(c.size(), 64 * BLOCK_SIZE);
        assert_eq!(c.max_payload(), Some(1 << 20));
        c.write(3 * BLOCK_SIZE - 1, &[1, 2]).unwrap(); // blocks 2 and 3
        c.write(10 * BLOCK_SIZE, &vec![5u8; 3 * BS]).unwrap(); // 10, 11, 12
        c.write_zeroes(40 * BLOCK_SIZE, 1).unwrap();
        c.trim(50 * BLOCK_SIZE, BLOCK_SIZE as u32).unwrap();
        c.flush().unwrap();
        assert_eq!(c.read(3 * BLOCK_SIZE - 2, 4).unwrap(), vec![0, 1, 2, 0]);
        assert_eq!(s.take_dirty(), vec![2, 3, 10, 11, 12, 40, 50]);
        assert!(s.take_dirty().is_empty());

        let mut out = Vec::new();
        s.read_blocks(&[11, 2, 12], &mut out).unwrap();
        assert_eq!(out.len(), 3 * BS);
        assert!(out[..BS].iter().all(|&b| b == 5));
        assert_eq!(out[BS + BS - 1], 1);
        assert!(out[2 * BS..].iter().all(|&b| b == 5));
        assert!(matches!(
            s.read_blocks(&[64], &mut out),
            Err(DiskError::BlockOutOfRange { index: 64, .. })
        ));

        let st = s.stats();
        assert_eq!((st.writes, st.bytes_written), (2, 2 + 3 * BLOCK_SIZE));
        assert_eq!((st.zeroes, st.flushes, st.reads, st.refused), (2, 1, 1, 0));
        assert_eq!(st.connections, 1);
        c.disconnect().unwrap();
        s.stop();
        assert!(!dir.path().join("nbd.sock").exists());
    }

    #[test]
    fn requests_outside_the_export_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = server(dir.path(), 4);
        let mut c = NbdClient::connect(s.socket(), "vda").unwrap();
        let size = c.size();
        let refused = |r: Result<(), NbdError>| matches!(r, Err(NbdError::ErrorReply(EINVAL)));
        assert!(refused(c.request(CMD_WRITE, 0, size - 1, 2, &[9, 9])));
        assert!(refused(c.request(CMD_WRITE, 0, u64::MAX, 1, &[9])));
        // A claimed 4 GiB payload: refused without buffering it; 2 MiB (over max payload) too.
        assert!(refused(c.request(CMD_READ, 0, 0, u32::MAX, &[])));
        assert!(refused(c.request(
            CMD_WRITE,
            0,
            0,
            2 << 20,
            &vec![9u8; 2 << 20]
        )));
        assert!(refused(c.write_zeroes(size, 1)));
        assert!(refused(c.request(99, 0, 0, 0, &[])));
        // Still in step afterwards.
        c.write(0, &[1]).unwrap();
        assert_eq!(c.read(0, 2).unwrap(), vec![1, 0]);
        assert_eq!(s.take_dirty(), vec![0]);
        assert_eq!(s.stats().refused, 6);
        let img = std::fs::read(s.image().path()).unwrap();
        assert_eq!(img.len() as u64, size, "the image never grows");
        assert!(img[1..].iter().all(|&b| b == 0));
    }

    #[test]
    fn wrong_export_and_garbage_end_only_their_connection() {
        let dir = tempfile::tempdir().unwrap();
        let s = server(dir.path(), 4);
        assert!(matches!(
            NbdClient::connect(s.socket(), "other"),
            Err(NbdError::OptionRefused { .. })
        ));
        {
            use std::io::{Read, Write};
            let mut raw = UnixStream::connect(s.socket()).unwrap();
            let mut greeting = [0u8; 18];
            raw.read_exact(&mut greeting).unwrap();
            raw.write_all(&[0xff; 64]).unwrap();
            // The server hangs up.
            let mut rest = Vec::new();
            let _ = raw.read_to_end(&mut rest);
        }
        let mut c = NbdClient::connect(s.socket(), "vda").unwrap();
        c.write(0, &[1]).unwrap();
        assert!(s.stats().failed_connections >= 1);
    }

    #[test]
    fn stop_closes_open_connections_and_joins() {
        let dir = tempfile::tempdir().unwrap();
        let s = server(dir.path(), 4);
        let mut c = NbdClient::connect(s.socket(), "vda").unwrap();
        c.write(0, &[1]).unwrap();
        // An idle second connection blocked in its handshake read.
        let _idle = UnixStream::connect(s.socket()).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let t = std::time::Instant::now();
        s.stop();
        assert!(t.elapsed() < Duration::from_secs(2));
        assert!(c.read(0, 1).is_err());
    }

    #[test]
    fn connections_beyond_the_limit_are_closed() {
        let dir = tempfile::tempdir().unwrap();
        let image = DiskImage::create(dir.path().join("d"), BLOCK_SIZE).unwrap();
        let mut config = DiskServerConfig::new("vda");
        config.max_connections = 1;
        let s = DiskServer::start(image, dir.path().join("s"), config).unwrap();
        let _first = NbdClient::connect(s.socket(), "vda").unwrap();
        assert!(NbdClient::connect(s.socket(), "vda").is_err());
        assert!(matches!(
            DiskServer::start(
                DiskImage::create(dir.path().join("e"), BLOCK_SIZE).unwrap(),
                dir.path().join("t"),
                DiskServerConfig::new("a,b")
            ),
            Err(DiskError::BadExportName(_))
        ));
    }
}
