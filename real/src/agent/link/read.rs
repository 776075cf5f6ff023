//! The reading half of a link: authenticates and decodes the byte stream, stages arriving
//! checkpoints under the VM's bounds and reports to the event loop.

use std::io::Read;
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use ftvm_model::wire::Item;
use tokio::sync::mpsc::UnboundedSender;

use crate::agent::accept::Admission;
use crate::agent::event::{ConnId, Event};
use crate::agent::staging::{CheckpointAssembler, Staged, StagingLimits};
use crate::auth::LinkOpener;

/// Minimum spacing of `Heard` events: liveness needs no more.
const HEARD_EVERY: Duration = Duration::from_millis(5);

pub(super) fn read_loop(
    mut stream: TcpStream,
    conn: ConnId,
    mut dec: LinkOpener,
    limits: StagingLimits,
    // Held until the reader ends: it frees the connection's slot under the listener's cap.
    admission: Option<Admission>,
    events: UnboundedSender<Event>,
) {
    let mut buf = vec![0u8; 1 << 20];
    let mut assembler = CheckpointAssembler::new(limits);
    let mut last_heard = Instant::now() - HEARD_EVERY;
    let why = loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => {
                break match dec.finish() {
                    Ok(()) => "closed by peer".to_string(),
                    Err(e) => format!("closed mid-frame: {e}"),
                }
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break format!("read: {e}"),
        };
        if last_heard.elapsed() >= HEARD_EVERY {
            last_heard = Instant::now();
            let _ = events.send(Event::Heard { conn });
        }
        let mut input = &buf[..n];
        let mut failed = None;
        // An encrypted stream also yields items from plaintext it already decrypted.
        while !input.is_empty() || dec.pending() {
            let (used, item) = match dec.decode(input) {
                Ok(r) => r,
                Err(e) => {
                    failed = Some(format!("bad frame: {e}"));
                    break;
                }
            };
            match item {
                None => {}
                Some(Item::Peer(msg)) => {
                    let _ = events.send(Event::Message { conn, msg });
                }
                // Witness frames have no business on a checkpoint link.
                Some(Item::WitnessRequest(_)) | Some(Item::WitnessReply(_)) => {
                    failed = Some("witness frame on a checkpoint link".to_string());
                    break;
                }
                Some(item) => match assembler.feed(item) {
                    Ok(Staged::Nothing) => {}
                    Ok(Staged::Started(epoch)) => {
                        let _ = events.send(Event::CheckpointStarted { conn, epoch });
                    }
                    Ok(Staged::Complete(epoch, staged)) => {
                        let _ = events.send(Event::CheckpointReceived {
                            conn,
                            epoch,
                            staged,
                        });
                    }
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                },
            }
            input = &input[used..];
        }
        if let Some(f) = failed {
            break f;
        }
    };
    let _ = stream.shutdown(Shutdown::Both);
    // A checkpoint cut short — bad bytes, refused by staging, or the stream ended — is
    // reported as received damaged before the link closes, as the simulator does.
    if let Some(epoch) = assembler.abort() {
        let _ = events.send(Event::CheckpointDamaged {
            conn,
            epoch,
            why: why.clone(),
        });
    }
    drop(admission);
    let _ = events.send(Event::LinkClosed { conn, why });
}
