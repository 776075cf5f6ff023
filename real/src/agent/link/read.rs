//! The reading half of a link: its bytes go to the driver core's `LinkReader` (the same one the
//! simulator runs), which authenticates and decodes them, stages arriving checkpoints under the
//! VM's bounds and reports what arrived; this thread reads the socket, forwards, and copies
//! arriving checkpoints into replica journals (`crate::replica::StageWriter`).

use std::io::Read;
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use ftvm_driver::{LinkEvent, LinkReader, StagingLimits};
use tokio::sync::mpsc::UnboundedSender;

use crate::agent::accept::Admission;
use crate::agent::event::{ConnId, Event};
use crate::auth::LinkOpener;
use crate::replica::StageWriter;

/// Minimum spacing of `Heard` events: liveness needs no more.
const HEARD_EVERY: Duration = Duration::from_millis(5);

pub(super) fn read_loop(
    mut stream: TcpStream,
    conn: ConnId,
    dec: LinkOpener,
    limits: StagingLimits,
    // Copies arriving checkpoints into replica journals as their pages come.
    mut stage: Option<StageWriter>,
    // Held until the reader ends: it frees the connection's slot under the listener's cap.
    admission: Option<Admission>,
    events: UnboundedSender<Event>,
) {
    let mut buf = vec![0u8; 1 << 20];
    let mut reader = LinkReader::new(dec, limits);
    let mut delivered: Vec<LinkEvent> = Vec::new();
    let mut last_heard = Instant::now() - HEARD_EVERY;
    let why = loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => {
                break match reader.end_of_stream() {
                    Ok(()) => "closed by peer".to_string(),
                    Err(e) => e.to_string(),
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
        let fed = reader.feed(&buf[..n], &mut delivered);
        for mut event in delivered.drain(..) {
            if let (Some(w), LinkEvent::CheckpointReceived(s)) = (stage.as_mut(), &mut event) {
                // Its journal is sealed before the node hears of it: a commit finds it whole.
                w.seal(s);
            }
            let _ = events.send(Event::Link { conn, event });
        }
        if let Some(w) = stage.as_mut() {
            w.follow(reader.in_progress());
        }
        if let Err(e) = fed {
            break e.to_string();
        }
    };
    let _ = stream.shutdown(Shutdown::Both);
    // A checkpoint cut short (bad bytes, refused by staging, or the stream ended) is reported
    // damaged before the link closes, as in the simulator.
    if let Some(event) = reader.close() {
        let _ = events.send(Event::Link { conn, event });
    }
    drop(admission);
    let _ = events.send(Event::LinkClosed { conn, why });
}
