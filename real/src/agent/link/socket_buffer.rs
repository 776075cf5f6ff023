//! The kernel buffers of a checkpoint link's socket.
//!
//! Why cap them: an epoch's checkpoint is acked only once the backup has read and staged its
//! last byte, and whatever the kernel still holds in the two sockets when the primary's send
//! ends is a queue the ack waits behind. Linux grows a TCP socket's buffers on its own up to
//! several MiB (`tcp_wmem`, `tcp_rmem`), and the backup's reader (authenticate, check, stage,
//! spool) is slower than the sender on a shared host: with 10,000 dirty pages per epoch the ack
//! came 11–31 ms after the send ended, all of it bytes waiting in the sockets, against 0.7 ms of
//! the backup's own work after the last byte (`ftvm bench capture`). A cap that still covers the
//! link's bandwidth-delay product (10 Gb/s × 100 µs is 125 KB) keeps the throughput and makes
//! the end of the send the end of the transfer; a longer or faster path wants a larger cap, and
//! `None` leaves the kernel's autotuning on.

use std::net::TcpStream;

use nix::sys::socket::{setsockopt, sockopt};

/// Default cap on each of a link socket's send and receive buffers, in bytes (the kernel
/// doubles what it is asked for, to account for its bookkeeping).
pub const DEFAULT_LINK_BUFFER_BYTES: usize = 256 << 10;

/// Caps `stream`'s send and receive buffers at `bytes` each (`None`: leave them to the kernel).
pub(super) fn cap(stream: &TcpStream, bytes: Option<usize>) -> Result<(), nix::Error> {
    let Some(bytes) = bytes else {
        return Ok(());
    };
    setsockopt(stream, sockopt::SndBuf, &bytes)?;
    setsockopt(stream, sockopt::RcvBuf, &bytes)
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use nix::sys::socket::{getsockopt, sockopt};

    use super::*;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    #[test]
    fn a_cap_sets_both_buffers_and_none_leaves_the_kernels() {
        let (a, b) = pair();
        let before = getsockopt(&b, sockopt::SndBuf).unwrap();
        cap(&a, Some(64 << 10)).unwrap();
        // Linux stores twice the request (its own overhead included).
        assert_eq!(getsockopt(&a, sockopt::SndBuf).unwrap(), 128 << 10);
        assert_eq!(getsockopt(&a, sockopt::RcvBuf).unwrap(), 128 << 10);
        cap(&b, None).unwrap();
        assert_eq!(getsockopt(&b, sockopt::SndBuf).unwrap(), before);
    }
}
