//! A small QMP client over a tokio unix stream.
//!
//! QMP is one JSON object per line. After the greeting and `qmp_capabilities`, every command we
//! send carries an `id`; the answer with that id is the command's result. Asynchronous events
//! (STOP, RESUME, SHUTDOWN, MIGRATION, ...) may arrive between them at any time: they are kept
//! in a bounded queue the caller can inspect. Answers with another id belong to a command that
//! timed out earlier and are dropped.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::UnixStream;

use super::error::{QemuError, Result};

/// Default time a command may take before [`QemuError::Timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Events kept for the caller; older ones are dropped first.
const MAX_EVENTS: usize = 1024;

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name, e.g. `STOP`, `RESUME`, `SHUTDOWN`, `MIGRATION`.
    pub name: String,
    /// Its `data` member (`Null` if absent).
    pub data: Value,
    /// QEMU's timestamp in microseconds since the epoch (0 if absent).
    pub timestamp_us: u64,
}

/// The answer of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStatus {
    /// QEMU's run state: `running`, `paused`, `postmigrate`, `inmigrate`, `shutdown`, ...
    pub status: String,
    /// True while vCPUs run.
    pub running: bool,
}

/// One QMP connection.
#[derive(Debug)]
pub struct Qmp {
    stream: BufReader<UnixStream>,
    /// Bytes of a line not yet complete; kept here so a timed-out read loses nothing.
    partial: Vec<u8>,
    next_id: u64,
    events: VecDeque<QmpEvent>,
    timeout: Duration,
    version: String,
    /// Set when a write was cut short: the stream may hold half a command.
    broken: bool,
    /// Migration capabilities `x-ignore-shared` and `events` already enabled on this QEMU.
    pub(crate) migration_caps_on: bool,
}

impl Qmp {
    /// Connects to a QMP socket, reads the greeting and leaves negotiation mode.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| QemuError::io(format!("connect to QMP socket {path:?}"), e))?;
        Qmp::handshake(stream, timeout).await
    }

    /// Runs the greeting and `qmp_capabilities` on an already connected stream.
    pub async fn handshake(stream: UnixStream, timeout: Duration) -> Result<Qmp> {
        let mut qmp = Qmp {
            stream: BufReader::new(stream),
            partial: Vec::new(),
            next_id: 1,
            events: VecDeque::new(),
            timeout,
            version: String::new(),
            broken: false,
            migration_caps_on: false,
        };
        let greeting = with_timeout("QMP greeting", timeout, qmp.read_greeting()).await?;
        let v = greeting
            .get("QMP")
            .and_then(|q| q.get("version"))
            .and_then(|v| v.get("qemu"))
            .ok_or_else(|| QemuError::Protocol(format!("unexpected greeting {greeting}")))?;
        qmp.version = format!(
            "{}.{}.{}",
            v.get("major").and_then(Value::as_u64).unwrap_or(0),
            v.get("minor").and_then(Value::as_u64).unwrap_or(0),
            v.get("micro").and_then(Value::as_u64).unwrap_or(0)
        );
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// QEMU's version from the greeting, `major.minor.micro`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Changes the per-command timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The per-command timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs a command and returns its `return` value. `args` must be a JSON object if given.
    pub async fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value> {
        self.execute_inner(command, args, None).await
    }

    /// Runs a command with a file descriptor attached (SCM_RIGHTS) to the bytes of the command,
    /// which is how QEMU's `getfd` and `add-fd` receive descriptors.
    pub async fn execute_with_fd(
        &mut self,
        command: &str,
        args: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value> {
        self.execute_inner(command, args, Some(fd)).await
    }

    /// Hands `fd` to QEMU under `name` (`getfd`). QEMU keeps its own copy; ours stays open.
    pub async fn getfd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<()> {
        self.execute_with_fd("getfd", Some(json!({ "fdname": name })), fd)
            .await
            .map(drop)
    }

    /// Pauses the vCPUs.
    pub async fn stop(&mut self) -> Result<()> {
        self.execute("stop", None).await.map(drop)
    }

    /// Resumes the vCPUs (also from `postmigrate` and from a completed incoming migration).
    pub async fn cont(&mut self) -> Result<()> {
        self.execute("cont", None).await.map(drop)
    }

    /// The VM's run state.
    pub async fn query_status(&mut self) -> Result<VmStatus> {
        let v = self.execute("query-status", None).await?;
        let status = v
            .get("status")
            .and_then(Value::as_str)
            .ok_or_else(|| QemuError::Protocol(format!("query-status returned {v}")))?;
        Ok(VmStatus {
            status: status.to_owned(),
            running: v.get("running").and_then(Value::as_bool).unwrap_or(false),
        })
    }

    /// Events received so far and not yet taken, oldest first.
    pub fn events(&self) -> impl Iterator<Item = &QmpEvent> {
        self.events.iter()
    }

    /// Removes and returns the queued events.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// Waits for an event named `name` (consuming it and any events before it). Returns at once if
    /// one is already queued.
    pub async fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<QmpEvent> {
        let what = format!("QMP event {name}");
        with_timeout(&what, timeout, async {
            loop {
                if let Some(pos) = self.events.iter().position(|e| e.name == name) {
                    let ev = self.events.drain(..=pos).next_back();
                    return ev.ok_or_else(|| QemuError::Protocol("event queue raced".into()));
                }
                let msg = self.read_message().await?;
                self.dispatch_unsolicited(msg)?;
            }
        })
        .await
    }

    async fn execute_inner(
        &mut self,
        command: &str,
        args: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value> {
        let id = self.send_command(command, args, fd).await?;
        self.recv_reply(command, id).await
    }

    /// Sends a command without waiting for its answer; returns its id for [`Qmp::recv_reply`].
    /// Several commands may be in flight: QEMU answers them in order. (Without OOB, QEMU's
    /// monitor stops reading while a command is queued, so an fd sent with one command cannot
    /// be dropped by the read of the next.)
    pub(crate) async fn send_command(
        &mut self,
        command: &str,
        args: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<u64> {
        if self.broken {
            return Err(QemuError::Protocol(
                "connection unusable after a command was cut off mid-write".into(),
            ));
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = Map::new();
        msg.insert("execute".into(), Value::from(command));
        if let Some(args) = args {
            if !args.is_object() {
                return Err(QemuError::Protocol(format!(
                    "arguments of {command} must be an object, got {args}"
                )));
            }
            msg.insert("arguments".into(), args);
        }
        msg.insert("id".into(), Value::from(id));
        let mut bytes = Value::Object(msg).to_string().into_bytes();
        bytes.push(b'\n');

        let timeout = self.timeout;
        // A write cut short leaves half a command in the stream: the connection is unusable.
        let written = tokio::time::timeout(timeout, self.write_command(&bytes, fd)).await;
        match written {
            Err(_) => {
                self.broken = true;
                Err(QemuError::Timeout {
                    what: format!("QMP {command} to be sent"),
                    after: timeout,
                })
            }
            Ok(Err(e)) => {
                self.broken = true;
                Err(e)
            }
            Ok(Ok(())) => Ok(id),
        }
    }

    /// Waits for the answer to command `id` sent by [`Qmp::send_command`].
    pub(crate) async fn recv_reply(&mut self, command: &str, id: u64) -> Result<Value> {
        let what = format!("QMP {command}");
        with_timeout(&what, self.timeout, self.read_reply(command, id)).await
    }

    /// Waits for the first event (queued or new) that `pred` accepts and removes it from the
    /// queue; other events stay queued.
    pub(crate) async fn wait_event_where(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&QmpEvent) -> bool,
    ) -> Result<QmpEvent> {
        with_timeout(what, timeout, async {
            loop {
                if let Some(pos) = self.events.iter().position(&pred) {
                    let ev = self.events.remove(pos);
                    return ev.ok_or_else(|| QemuError::Protocol("event queue raced".into()));
                }
                let msg = self.read_message().await?;
                self.dispatch_unsolicited(msg)?;
            }
        })
        .await
    }

    /// Drops queued events named `name`.
    pub(crate) fn discard_events(&mut self, name: &str) {
        self.events.retain(|e| e.name != name);
    }

    async fn write_command(&mut self, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> Result<()> {
        let mut sent = 0;
        if let Some(fd) = fd {
            sent = self.send_with_fd(bytes, fd).await?;
        }
        let stream = self.stream.get_mut();
        stream
            .write_all(&bytes[sent..])
            .await
            .map_err(|e| map_io_err("write QMP command", e))
    }

    /// Sends the first bytes of a command with `fd` attached; returns how many bytes went out.
    async fn send_with_fd(&mut self, bytes: &[u8], fd: BorrowedFd<'_>) -> Result<usize> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
        let stream = self.stream.get_ref();
        let sock = stream.as_raw_fd();
        let fds = [fd.as_raw_fd()];
        // tokio owns the socket's readiness: run sendmsg inside async_io so a WouldBlock clears
        // readiness and we wait for the next writable edge instead of spinning.
        stream
            .async_io(Interest::WRITABLE, || {
                let iov = [std::io::IoSlice::new(bytes)];
                let cmsg = [ControlMessage::ScmRights(&fds)];
                // sendmsg(2) with SCM_RIGHTS: the kernel duplicates `fd` into QEMU, attached to
                // these bytes; QEMU's monitor takes it when it parses the command. MSG_NOSIGNAL:
                // a dead QEMU gives EPIPE, not SIGPIPE.
                sendmsg::<UnixAddr>(sock, &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(std::io::Error::from)
            })
            .await
            .map_err(|e| map_io_err("send QMP command with fd", e))
    }

    async fn read_reply(&mut self, command: &str, id: u64) -> Result<Value> {
        loop {
            let msg = self.read_message().await?;
            let Some(obj) = msg.as_object() else {
                return Err(QemuError::Protocol(format!("non-object message {msg}")));
            };
            if obj.contains_key("event") {
                self.dispatch_unsolicited(msg)?;
                continue;
            }
            let reply_id = obj.get("id").and_then(Value::as_u64);
            if reply_id != Some(id) {
                tracing::debug!(?reply_id, id, "dropping QMP reply of an earlier command");
                continue;
            }
            if let Some(ret) = obj.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = obj.get("error") {
                let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
                return Err(QemuError::Qmp {
                    command: command.to_owned(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QemuError::Protocol(format!("unexpected reply {msg}")));
        }
    }

    /// Files an event; anything else unsolicited is dropped (stale replies) or an error.
    fn dispatch_unsolicited(&mut self, msg: Value) -> Result<()> {
        let Some(name) = msg.get("event").and_then(Value::as_str) else {
            if msg.get("id").is_some() {
                return Ok(());
            }
            return Err(QemuError::Protocol(format!("unexpected message {msg}")));
        };
        let ts = msg.get("timestamp");
        let part = |k: &str| ts.and_then(|t| t.get(k)).and_then(Value::as_u64);
        let timestamp_us = match (part("seconds"), part("microseconds")) {
            (Some(s), Some(us)) => s.saturating_mul(1_000_000).saturating_add(us),
            _ => 0,
        };
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(QmpEvent {
            name: name.to_owned(),
            data: msg.get("data").cloned().unwrap_or(Value::Null),
            timestamp_us,
        });
        Ok(())
    }

    /// Reads up to the greeting. QEMU can send an event first: the monitor's own thread accepts
    /// the connection and greets while the main thread may still be starting up and emitting
    /// events (seen: `NETDEV_STREAM_CONNECTED` ahead of the greeting, about once in 1,500 starts).
    /// Such events are queued like any other.
    async fn read_greeting(&mut self) -> Result<Value> {
        loop {
            let msg = self.read_message().await?;
            if msg.get("event").is_none() {
                return Ok(msg);
            }
            self.dispatch_unsolicited(msg)?;
        }
    }

    /// Reads one complete JSON line. Cancel-safe: a partial line stays in `self.partial`.
    async fn read_message(&mut self) -> Result<Value> {
        loop {
            let n = self
                .stream
                .read_until(b'\n', &mut self.partial)
                .await
                .map_err(|e| map_io_err("read QMP socket", e))?;
            if n == 0 {
                return Err(QemuError::QmpClosed);
            }
            if self.partial.last() != Some(&b'\n') {
                continue;
            }
            let line = std::mem::take(&mut self.partial);
            let text = line.trim_ascii();
            if text.is_empty() {
                continue;
            }
            return serde_json::from_slice(text).map_err(|e| {
                QemuError::Protocol(format!(
                    "bad JSON ({e}): {}",
                    String::from_utf8_lossy(&text[..text.len().min(200)])
                ))
            });
        }
    }
}

/// A QEMU that is gone shows as EPIPE or ECONNRESET (it closed with our bytes unread): report
/// that as a closed monitor.
fn map_io_err(what: &str, e: std::io::Error) -> QemuError {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::BrokenPipe | ErrorKind::ConnectionReset => QemuError::QmpClosed,
        _ => QemuError::io(what, e),
    }
}

async fn with_timeout<T>(
    what: &str,
    after: Duration,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(after, fut)
        .await
        .map_err(|_| QemuError::Timeout {
            what: what.to_owned(),
            after,
        })?
}

#[cfg(test)]
mod tests {
    //! Against a scripted fake QEMU on a socketpair: framing, ids, events, errors, fd passing.
    use super::*;
    use std::os::fd::AsFd;
    use tokio::io::AsyncReadExt;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;

    /// Reads one line the client sent.
    async fn recv_line(s: &mut BufReader<UnixStream>) -> Value {
        let mut l = String::new();
        s.read_line(&mut l).await.unwrap();
        serde_json::from_str(&l).unwrap()
    }

    async fn send(s: &mut BufReader<UnixStream>, text: &str) {
        s.get_mut().write_all(text.as_bytes()).await.unwrap();
        s.get_mut().write_all(b"\r\n").await.unwrap();
    }

    async fn pair() -> (Qmp, BufReader<UnixStream>) {
        let (a, b) = UnixStream::pair().unwrap();
        let mut server = BufReader::new(b);
        let client = tokio::spawn(Qmp::handshake(a, Duration::from_secs(5)));
        send(&mut server, GREETING).await;
        let caps = recv_line(&mut server).await;
        assert_eq!(caps["execute"], "qmp_capabilities");
        let id = caps["id"].clone();
        send(&mut server, &json!({"return": {}, "id": id}).to_string()).await;
        (client.await.unwrap().unwrap(), server)
    }

    #[tokio::test]
    async fn an_event_ahead_of_the_greeting_is_queued_not_taken_for_a_bad_greeting() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut server = BufReader::new(b);
        let client = tokio::spawn(Qmp::handshake(a, Duration::from_secs(5)));
        let early = r#"{"event": "NETDEV_STREAM_CONNECTED", "data": {"netdev-id": "n0"}, "timestamp": {"seconds": 1, "microseconds": 2}}"#;
        send(&mut server, early).await;
        send(&mut server, GREETING).await;
        let caps = recv_line(&mut server).await;
        assert_eq!(caps["execute"], "qmp_capabilities");
        send(
            &mut server,
            &json!({"return": {}, "id": caps["id"]}).to_string(),
        )
        .await;
        let qmp = client.await.unwrap().unwrap();
        assert_eq!(qmp.version(), "7.2.22");
        let evs: Vec<_> = qmp.events().cloned().collect();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].name, "NETDEV_STREAM_CONNECTED");
        assert_eq!(evs[0].data["netdev-id"], "n0");
    }

    #[tokio::test]
    async fn a_greeting_that_is_not_one_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut server = BufReader::new(b);
        let client = tokio::spawn(Qmp::handshake(a, Duration::from_secs(5)));
        send(&mut server, r#"{"return": {}}"#).await;
        let e = client.await.unwrap().unwrap_err();
        assert!(matches!(e, QemuError::Protocol(_)), "{e:?}");
    }

    #[tokio::test]
    async fn handshake_reads_version() {
        let (qmp, _server) = pair().await;
        assert_eq!(qmp.version(), "7.2.22");
    }

    #[tokio::test]
    async fn events_between_replies_are_kept_and_stale_replies_skipped() {
        let (mut qmp, mut server) = pair().await;
        let fake = tokio::spawn(async move {
            let cmd = recv_line(&mut server).await;
            assert_eq!(cmd["execute"], "query-status");
            let id = cmd["id"].as_u64().unwrap();
            // An answer to an older command, an event split across writes, then ours.
            send(&mut server, r#"{"return": {}, "id": 999}"#).await;
            server
                .get_mut()
                .write_all(br#"{"event": "STOP", "#)
                .await
                .unwrap();
            tokio::task::yield_now().await;
            send(
                &mut server,
                r#""timestamp": {"seconds": 2, "microseconds": 5}}"#,
            )
            .await;
            let reply = json!({"return": {"status": "paused", "running": false}, "id": id});
            send(&mut server, &reply.to_string()).await;
            server
        });
        let st = qmp.query_status().await.unwrap();
        assert_eq!(
            st,
            VmStatus {
                status: "paused".into(),
                running: false
            }
        );
        let evs: Vec<_> = qmp.events().cloned().collect();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].name, "STOP");
        assert_eq!(evs[0].timestamp_us, 2_000_005);
        let ev = qmp
            .wait_event("STOP", Duration::from_millis(100))
            .await
            .unwrap();
        assert_eq!(ev.name, "STOP");
        assert_eq!(qmp.events().count(), 0);
        drop(fake.await.unwrap());
    }

    #[tokio::test]
    async fn qmp_error_is_typed_and_close_is_detected() {
        let (mut qmp, mut server) = pair().await;
        let fake = tokio::spawn(async move {
            let cmd = recv_line(&mut server).await;
            let reply = json!({"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": cmd["id"]});
            send(&mut server, &reply.to_string()).await;
            // Then close: QEMU died.
        });
        match qmp.execute("nope", None).await {
            Err(QemuError::Qmp { command, class, .. }) => {
                assert_eq!(command, "nope");
                assert_eq!(class, "CommandNotFound");
            }
            other => panic!("expected a QMP error, got {other:?}"),
        }
        fake.await.unwrap();
        let e = qmp.execute("stop", None).await.unwrap_err();
        assert!(e.is_gone(), "{e:?}");
    }

    #[tokio::test]
    async fn silent_qemu_times_out_and_bad_args_are_refused() {
        let (mut qmp, _server) = pair().await;
        qmp.set_timeout(Duration::from_millis(50));
        let e = qmp.execute("stop", None).await.unwrap_err();
        assert!(matches!(e, QemuError::Timeout { .. }), "{e:?}");
        let e = qmp.execute("stop", Some(json!([1]))).await.unwrap_err();
        assert!(matches!(e, QemuError::Protocol(_)), "{e:?}");
    }

    #[tokio::test]
    async fn getfd_passes_a_working_descriptor() {
        let (mut qmp, mut server) = pair().await;
        let (mine, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let fake = tokio::spawn(async move {
            // Receive the command bytes together with the descriptor, like QEMU does.
            let raw = server.get_ref().as_raw_fd();
            let (text, fd) = server
                .get_ref()
                .async_io(Interest::READABLE, || {
                    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
                    let mut buf = vec![0u8; 4096];
                    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
                    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                    let msg = recvmsg::<()>(raw, &mut iov, Some(&mut space), MsgFlags::empty())
                        .map_err(std::io::Error::from)?;
                    let mut fd = None;
                    for c in msg.cmsgs().map_err(std::io::Error::from)? {
                        if let ControlMessageOwned::ScmRights(fds) = c {
                            fd = fds.first().copied();
                        }
                    }
                    let n = msg.bytes;
                    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), fd))
                })
                .await
                .unwrap();
            let cmd: Value = serde_json::from_str(text.trim()).unwrap();
            assert_eq!(cmd["execute"], "getfd");
            assert_eq!(cmd["arguments"]["fdname"], "mig");
            let fd = fd.expect("no descriptor attached");
            // SAFETY: the kernel just installed this descriptor in our table for us alone.
            let got = unsafe {
                <std::os::unix::net::UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd)
            };
            use std::io::Write;
            (&got).write_all(b"through the passed fd").unwrap();
            send(
                &mut server,
                &json!({"return": {}, "id": cmd["id"]}).to_string(),
            )
            .await;
        });
        qmp.getfd("mig", theirs.as_fd()).await.unwrap();
        fake.await.unwrap();
        drop(theirs);
        mine.set_nonblocking(true).unwrap();
        let mut mine = UnixStream::from_std(mine).unwrap();
        let mut buf = Vec::new();
        mine.read_to_end(&mut buf).await.unwrap();
        assert_eq!(buf, b"through the passed fd");
    }
}
