//! The model's gate with the real frames and their account: what the agent runs.

use ftvm_model::{Action, Epoch, Gate, OutputGate};

use super::*;

type Gated = OutputGate<HeldFrame>;

fn resume(g: &mut Gated, epoch: u64) {
    g.apply(&Action::ResumeVm {
        epoch: Epoch(epoch),
    });
}

fn release(g: &mut Gated, a: &mut OutputAccount, through: u64, t: Instant) -> Vec<Vec<u8>> {
    let frames = g.apply(&Action::ReleaseOutput {
        through: Epoch(through),
    });
    a.released(frames, t)
}

/// A reader charging frames as QEMU's netdev reader does: reads until the cap pauses it.
fn read_until_paused(cap: &OutputCap, g: &mut Gated, next: &mut u8, t: Instant) {
    while !cap.paused() {
        let frame = vec![*next; 10];
        *next += 1;
        cap.charge(10, t);
        assert!(g.emit(HeldFrame::new(frame, t)).is_none());
    }
}

#[test]
fn the_cap_pauses_reading_until_low_water_and_no_frame_is_lost_or_reordered() {
    let t0 = Instant::now();
    let cap = Arc::new(OutputCap::new(100));
    let mut a = OutputAccount::new(cap.clone());
    let mut g = Gated::new();
    let mut next = 0u8;
    let mut out = Vec::new();
    // Epoch 1: reading stops at the cap, 10 frames of 10 bytes.
    resume(&mut g, 1);
    read_until_paused(&cap, &mut g, &mut next, t0);
    assert_eq!(g.held(), 10);
    assert_eq!(cap.stats(t0).held_bytes, 100);
    // Epoch 2 gets nothing while paused; a release of nothing keeps it so.
    resume(&mut g, 2);
    assert!(release(&mut g, &mut a, 0, t0).is_empty());
    assert!(cap.paused());
    // Releasing epoch 1 frees everything: reading resumes and epoch 2 fills up.
    out.extend(release(&mut g, &mut a, 1, t0));
    assert!(!cap.paused());
    read_until_paused(&cap, &mut g, &mut next, t0);
    resume(&mut g, 3);
    out.extend(release(&mut g, &mut a, 2, t0));
    // Degraded: everything left goes out, new frames pass.
    let opened = g.apply(&Action::SetOutputGate(Gate::Open));
    out.extend(a.released(opened, t0));
    assert_eq!(cap.stats(t0).held_bytes, 0);
    assert_eq!(cap.stats(t0).cap_hits, 2);
    let firsts: Vec<u8> = out.iter().map(|f| f[0]).collect();
    assert_eq!(
        firsts,
        (0..next).collect::<Vec<u8>>(),
        "all frames, in order"
    );
    let stats = a.take_stats();
    assert_eq!(stats.released, u64::from(next));
    assert_eq!(stats.dropped, 0);
}

#[test]
fn passing_and_dropping_refund_the_cap() {
    let t0 = Instant::now();
    let cap = Arc::new(OutputCap::new(20));
    let mut a = OutputAccount::new(cap.clone());
    cap.charge(5, t0);
    assert_eq!(a.passed(HeldFrame::new(vec![1; 5], t0), t0), vec![1; 5]);
    cap.charge(20, t0);
    assert!(cap.paused());
    a.dropped([HeldFrame::new(vec![2; 20], t0)], t0);
    assert!(!cap.paused());
    assert_eq!(cap.stats(t0).held_bytes, 0);
    let stats = a.take_stats();
    assert_eq!((stats.passed, stats.dropped), (1, 1));
}

#[test]
fn the_longest_hold_is_measured_from_arrival() {
    let t0 = Instant::now();
    let later = t0 + std::time::Duration::from_millis(7);
    let cap = Arc::new(OutputCap::new(1000));
    let mut a = OutputAccount::new(cap.clone());
    cap.charge(3, t0);
    a.released(vec![HeldFrame::new(vec![0; 3], t0)], later);
    assert_eq!(a.take_stats().longest_hold_us, 7000);
}
