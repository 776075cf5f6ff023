//! The agent's side of the VM's network: it is QEMU's `-netdev stream` peer (a unix socket the
//! agent listens on before QEMU starts, since QEMU 7.2 never reconnects) and owns the host's tap
//! device. Frames from the VM go to the event loop (and through the output gate); frames from the
//! tap go straight to whichever VM is connected.
//!
//! Reading the VM's frames pauses while the output gate holds its cap of bytes
//! ([`OutputCap`]): QEMU then keeps the guest's packets in the guest's own transmit queue.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixListener;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::Mutex;

use super::event::Event;
use crate::net::backpressure::OutputCap;
use crate::net::frame::{read_frame, write_frame};
use crate::net::tap::{Tap, TapError};

/// Errors setting up the network path.
#[derive(Debug, thiserror::Error)]
pub enum NetIoError {
    /// The netdev socket could not be created.
    #[error("netdev socket {path}: {source}")]
    Socket {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The tap device failed.
    #[error(transparent)]
    Tap(#[from] TapError),
}

/// The network path of one host.
pub struct NetIo {
    tap: Option<Arc<Tap>>,
    to_vm: Arc<Mutex<Option<OwnedWriteHalf>>>,
    socket: PathBuf,
}

impl NetIo {
    /// Listens on `socket` for QEMU and opens tap `tap` (if given; without one, released frames
    /// are dropped — useful for tests that watch only the gate). Frames read from the VM are
    /// charged to `cap` (the agent's, [`super::Agent::output_cap`]).
    pub fn start(
        socket: &Path,
        tap: Option<&str>,
        events: UnboundedSender<Event>,
        cap: Arc<OutputCap>,
    ) -> Result<NetIo, NetIoError> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).map_err(|source| NetIoError::Socket {
            path: socket.to_path_buf(),
            source,
        })?;
        let to_vm: Arc<Mutex<Option<OwnedWriteHalf>>> = Arc::new(Mutex::new(None));
        let slot = to_vm.clone();
        let ev = events.clone();
        tokio::spawn(async move {
            // Each QEMU that starts on this host (the first VM, or the restored one after a
            // failover) connects once; the newest connection is the VM's.
            while let Ok((stream, _)) = listener.accept().await {
                let (mut rd, wr) = stream.into_split();
                *slot.lock().await = Some(wr);
                let (ev, cap) = (ev.clone(), cap.clone());
                tokio::spawn(async move {
                    loop {
                        // At the cap, stop reading: the socket fills and QEMU holds the guest.
                        cap.admitted().await;
                        let Ok(Some(frame)) = read_frame(&mut rd).await else {
                            return;
                        };
                        cap.charge(frame.len() as u64, std::time::Instant::now());
                        if ev.send(Event::VmFrame(frame)).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let tap = match tap {
            Some(name) => {
                let t = Arc::new(Tap::open(name)?);
                let reader = t.clone();
                let ev = events;
                tokio::spawn(async move {
                    while let Ok(frame) = reader.recv().await {
                        if ev.send(Event::WireFrame(frame)).is_err() {
                            return;
                        }
                    }
                });
                Some(t)
            }
            None => None,
        };
        Ok(NetIo {
            tap,
            to_vm,
            socket: socket.to_path_buf(),
        })
    }

    /// The unix socket QEMU's netdev must connect to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends frames the gate let out to the wire.
    pub async fn to_wire(&self, frames: Vec<Vec<u8>>) {
        if let Some(tap) = &self.tap {
            for f in frames {
                // A frame the wire refuses is lost like on any NIC; TCP retransmits.
                let _ = tap.send(&f).await;
            }
        }
    }

    /// Sends a frame from the wire to the VM (dropped when no VM is connected).
    pub async fn to_vm(&self, frame: &[u8]) {
        let mut slot = self.to_vm.lock().await;
        if let Some(w) = slot.as_mut() {
            if write_frame(w, frame).await.is_err() {
                *slot = None;
            }
        }
    }
}

#[cfg(test)]
#[path = "netio_tests.rs"]
mod tests;
