use std::time::{Duration, Instant};

use tokio::net::UnixStream;
use tokio::sync::mpsc::unbounded_channel;

use super::*;
use crate::net::output::{HeldFrame, OutputAccount};
use ftvm_model::{Action, Epoch, OutputGate};

const FRAMES: u32 = 2000;
const FRAME_LEN: usize = 1000;
const CAP: u64 = 50_000;

/// A fake QEMU writes frames into the netdev socket much faster than the gate releases them:
/// the agent stops reading at the cap (the writer blocks on a full socket), and after releases
/// every frame comes out, in order.
#[tokio::test]
async fn reading_the_vm_pauses_at_the_cap_and_every_frame_comes_out_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("net.sock");
    let (tx, mut rx) = unbounded_channel();
    let cap = Arc::new(OutputCap::new(CAP));
    let _net = NetIo::start(&socket, None, tx, cap.clone()).unwrap();
    let mut qemu = UnixStream::connect(&socket).await.unwrap();
    let writer = tokio::spawn(async move {
        for i in 0..FRAMES {
            let mut f = vec![0u8; FRAME_LEN];
            f[..4].copy_from_slice(&i.to_le_bytes());
            write_frame(&mut qemu, &f).await.unwrap();
        }
    });
    // The agent's pair: the model's gate and the account that refunds the cap.
    let mut gate = OutputGate::<HeldFrame>::new();
    let mut account = OutputAccount::new(cap.clone());
    let mut epoch = 1;
    gate.apply(&Action::ResumeVm {
        epoch: Epoch(epoch),
    });
    let mut out: Vec<Vec<u8>> = Vec::new();
    // No release: the reader must stop at the cap.
    let t0 = Instant::now();
    while !cap.paused() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the cap was never reached"
        );
        if let Ok(Some(Event::VmFrame(f))) =
            tokio::time::timeout(Duration::from_millis(100), rx.recv()).await
        {
            assert!(gate.emit(HeldFrame::new(f, Instant::now())).is_none());
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(Event::VmFrame(f)) = rx.try_recv() {
        assert!(gate.emit(HeldFrame::new(f, Instant::now())).is_none());
    }
    let held = cap.stats(Instant::now()).held_bytes;
    assert!(held >= CAP, "paused below the cap: {held}");
    assert!(held < CAP + FRAME_LEN as u64, "read past the cap: {held}");
    assert_eq!(gate.held() as u64 * FRAME_LEN as u64, held);
    assert!(!writer.is_finished(), "the fake QEMU's writes must block");
    // Release epoch after epoch until every frame is out.
    let t0 = Instant::now();
    while out.len() < FRAMES as usize {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "stalled at {}",
            out.len()
        );
        epoch += 1;
        gate.apply(&Action::ResumeVm {
            epoch: Epoch(epoch),
        });
        let frames = gate.apply(&Action::ReleaseOutput {
            through: Epoch(epoch - 1),
        });
        out.extend(account.released(frames, Instant::now()));
        while let Ok(Some(Event::VmFrame(f))) =
            tokio::time::timeout(Duration::from_millis(20), rx.recv()).await
        {
            assert!(gate.emit(HeldFrame::new(f, Instant::now())).is_none());
            assert!(cap.stats(Instant::now()).held_bytes < CAP + FRAME_LEN as u64);
        }
        let frames = gate.apply(&Action::ReleaseOutput {
            through: Epoch(epoch),
        });
        out.extend(account.released(frames, Instant::now()));
    }
    writer.await.unwrap();
    let seq: Vec<u32> = out
        .iter()
        .map(|f| u32::from_le_bytes([f[0], f[1], f[2], f[3]]))
        .collect();
    assert_eq!(seq, (0..FRAMES).collect::<Vec<u32>>());
    let stats = cap.stats(Instant::now());
    assert!(stats.cap_hits >= 2, "paused more than once: {stats:?}");
    assert_eq!(stats.held_bytes, 0);
    assert!(!stats.reading_paused);
}
