//! The etcd witness against a real 3-member etcd cluster: registers are created only by an
//! explicit init, requests decide by compare-and-set on the latest register (a lost race is
//! decided again), concurrent requests never give two primaries — also while the etcd leader is
//! killed — and without a quorum a request gets no answer at all, then succeeds once the quorum
//! is back.

mod etcd_common;

use std::time::{Duration, Instant};

use etcd_client::Client;
use ftvm_model::{Generation, VmId, WitnessRequest};
use ftvm_real::etcd_witness::{register as codec, EtcdWitnessError, RegisterError};

use etcd_common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_exist_only_by_init_and_foreign_values_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = cluster(dir.path()).await;
    let w = witness(&etcd);
    let vm = VmId(1);

    // No register: requests are refused and create nothing.
    let e = w
        .request(B, vm, takeover(1, reg(B, 5)), T)
        .await
        .unwrap_err();
    assert!(matches!(e, EtcdWitnessError::Missing(_)), "{e}");
    assert!(e.is_permanent());
    let e = w.query(vm, T).await.unwrap_err();
    assert!(matches!(e, EtcdWitnessError::Missing(_)), "{e}");

    // Init makes generation 1 with the named primary; a second init is refused and changes
    // nothing, also after the register moved on.
    let s = w.init(vm, P, T).await.unwrap();
    assert_eq!(
        (s.generation, s.primary, s.backup),
        (Generation(1), P, None)
    );
    let r = w.request(P, vm, register(1, reg(B, 5)), T).await.unwrap();
    assert!(r.reply.granted && r.wrote);
    let e = w.init(vm, C, T).await.unwrap_err();
    assert!(matches!(e, EtcdWitnessError::Exists { .. }), "{e}");
    assert_eq!(w.query(vm, T).await.unwrap(), r.reply.state);

    // Whatever else sits under a VM's key is refused with its reason, never read as a register.
    let mut raw = Client::connect(etcd.endpoints(), None).await.unwrap();
    let key = |vm: u64| format!("{PREFIX}/vm/{vm}");
    raw.put(key(2), "{not json", None).await.unwrap();
    let e = w.query(VmId(2), T).await.unwrap_err();
    assert!(
        matches!(
            e,
            EtcdWitnessError::Register {
                source: RegisterError::Malformed(_),
                ..
            }
        ),
        "{e}"
    );
    raw.put(key(3), codec::encode(&s), None).await.unwrap();
    let e = w
        .request(P, VmId(3), register(1, reg(B, 5)), T)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            EtcdWitnessError::Register {
                source: RegisterError::OtherVm { .. },
                ..
            }
        ),
        "{e}"
    );
    raw.put(key(4), vec![b'x'; 10_000], None).await.unwrap();
    let e = w.query(VmId(4), T).await.unwrap_err();
    assert!(
        matches!(
            e,
            EtcdWitnessError::Register {
                source: RegisterError::TooLarge(10_000),
                ..
            }
        ),
        "{e}"
    );
    // Init refuses a key holding anything, even garbage.
    assert!(matches!(
        w.init(VmId(2), P, T).await,
        Err(EtcdWitnessError::Exists { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_compare_and_set_is_decided_again_on_the_newer_register() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = cluster(dir.path()).await;
    let (w, other) = (witness(&etcd), witness(&etcd));
    let vm = VmId(1);
    protected(&w, vm).await;

    // B's takeover reads {g1, P, B}; before its write, P's drop lands. The takeover's guarded
    // write must fail, and decided again on {g1, P, no backup} it is denied.
    let mut raced = false;
    let r = w
        .request_hooked(B, vm, takeover(1, reg(B, 5)), T, |attempt| {
            let first = attempt == 0;
            raced |= first;
            let other = other.clone();
            async move {
                if first {
                    let d = other.request(P, vm, drop_(1, reg(B, 5)), T).await.unwrap();
                    assert!(d.reply.granted, "{d:?}");
                }
            }
        })
        .await
        .unwrap();
    assert!(raced);
    assert_eq!(r.conflicts, 1, "{r:?}");
    assert!(!r.reply.granted, "a takeover granted after the drop: {r:?}");
    let s = w.query(vm, T).await.unwrap();
    assert_eq!(
        (s.generation, s.primary, s.backup),
        (Generation(1), P, None)
    );
    assert_eq!(s.floor.0, 5, "the drop voided the token");

    // Only the named sender's requests apply: C cannot take over as B, nor drop as P.
    protected_again(&w, vm).await;
    let r = w.request(C, vm, takeover(1, reg(B, 9)), T).await.unwrap();
    assert!(!r.reply.granted && !r.wrote, "{r:?}");
    let r = w.request(C, vm, drop_(1, reg(B, 9)), T).await.unwrap();
    assert!(!r.reply.granted && !r.wrote, "{r:?}");
    assert_eq!(w.query(vm, T).await.unwrap().backup, Some(reg(B, 9)));
}

/// P registers B again with a newer token (9).
async fn protected_again(w: &ftvm_real::etcd_witness::EtcdWitness, vm: VmId) {
    let r = w.request(P, vm, register(1, reg(B, 9)), T).await.unwrap();
    assert!(r.reply.granted, "{r:?}");
}

/// Per round, on a fresh register with B registered: P drops B while B takes over and C (not
/// registered) tries to take over too, each on its own client, all at once. Exactly one of P's
/// drop and B's takeover wins (both would be two primaries: P opening its gate, B running the
/// VM), C never does, and the register shows the winner. B also resends its takeover on a
/// second connection: that is the same grant, not a second generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_never_give_two_primaries() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = cluster(dir.path()).await;
    let ws: Vec<_> = (0..4).map(|_| witness(&etcd)).collect();
    let (mut takeovers, mut drops, mut conflicts) = (0, 0, 0);
    for round in 0..20u64 {
        let vm = VmId(100 + round);
        protected(&ws[0], vm).await;
        let (d, t, t2, c) = tokio::join!(
            ws[0].request(P, vm, drop_(1, reg(B, 5)), T),
            ws[1].request(B, vm, takeover(1, reg(B, 5)), T),
            ws[2].request(B, vm, takeover(1, reg(B, 5)), T),
            ws[3].request(C, vm, takeover(1, reg(C, 5)), T),
        );
        let (d, t, t2, c) = (d.unwrap(), t.unwrap(), t2.unwrap(), c.unwrap());
        conflicts += d.conflicts + t.conflicts + t2.conflicts + c.conflicts;
        assert!(!c.reply.granted, "round {round}: C took over: {c:?}");
        assert_eq!(
            t.reply.granted, t2.reply.granted,
            "round {round}: a resend answered differently"
        );
        assert!(
            d.reply.granted != t.reply.granted,
            "round {round}: drop {} and takeover {}",
            d.reply.granted,
            t.reply.granted
        );
        let s = ws[0].query(vm, T).await.unwrap();
        if t.reply.granted {
            takeovers += 1;
            assert_eq!((s.generation, s.primary), (Generation(2), B), "{s:?}");
        } else {
            drops += 1;
            assert_eq!(
                (s.generation, s.primary, s.backup),
                (Generation(1), P, None)
            );
        }
    }
    eprintln!("20 rounds: {takeovers} takeovers won, {drops} drops won, {conflicts} lost CASes");
    assert_eq!(takeovers + drops, 20);
}

/// The etcd leader is SIGKILLed between B's read of the register and its guarded write, while
/// P's drop races it on another client. The request is delayed by the election but decided
/// once; whatever the lost replies, exactly one of the two wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_etcd_leader_mid_request_delays_but_never_grants_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = cluster(dir.path()).await;
    let (w, other) = (witness(&etcd), witness(&etcd));
    let vm = VmId(1);
    protected(&w, vm).await;
    let leader = etcd.leader(T).await.unwrap();
    let t0 = Instant::now();
    let mut killed = None;
    let drop_task = {
        let other = other.clone();
        tokio::spawn(async move { other.request(P, vm, drop_(1, reg(B, 5)), T).await })
    };
    let t = w
        .request_hooked(B, vm, takeover(1, reg(B, 5)), T, |attempt| {
            if attempt == 0 {
                etcd.kill(leader).unwrap();
                killed = Some(Instant::now());
            }
            async {}
        })
        .await
        .expect("decided once a new leader is elected");
    let took = t0.elapsed();
    let d = drop_task.await.unwrap().expect("the drop is decided too");
    assert!(killed.is_some(), "the leader was never killed");
    assert!(
        d.reply.granted != t.reply.granted,
        "drop {} and takeover {}",
        d.reply.granted,
        t.reply.granted
    );
    let s = w.query(vm, T).await.unwrap();
    if t.reply.granted {
        assert_eq!((s.generation, s.primary), (Generation(2), B));
    } else {
        assert_eq!(
            (s.generation, s.primary, s.backup),
            (Generation(1), P, None)
        );
    }
    let new_leader = etcd.leader(T).await.unwrap();
    assert_ne!(new_leader, leader);
    eprintln!(
        "leader m{leader} killed mid-request: takeover {} after {took:?} ({} lost CASes), \
         new leader m{new_leader}",
        if t.reply.granted { "granted" } else { "denied" },
        t.conflicts
    );
}

/// With two of three members down, a takeover gets no answer (an error after its timeout,
/// which the agent treats as silence: never a denial, never a grant). Once a member is back,
/// the same request is granted, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_quorum_no_answer_then_granted_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = cluster(dir.path()).await;
    let w = witness(&etcd);
    let vm = VmId(1);
    protected(&w, vm).await;
    etcd.kill(0).unwrap();
    etcd.kill(1).unwrap();
    let timeout = Duration::from_secs(2);
    let t0 = Instant::now();
    let e = w
        .request(B, vm, takeover(1, reg(B, 5)), timeout)
        .await
        .unwrap_err();
    let waited = t0.elapsed();
    assert!(
        matches!(e, EtcdWitnessError::Timeout { .. }),
        "not silence: {e}"
    );
    assert!(!e.is_permanent());
    assert!(
        waited >= timeout && waited < timeout + Duration::from_secs(2),
        "{waited:?}"
    );
    // A query cannot be answered either: no stale read from the lone member.
    assert!(matches!(
        w.query(vm, Duration::from_millis(500)).await,
        Err(EtcdWitnessError::Timeout { .. })
    ));

    etcd.restart(1).unwrap();
    etcd.wait_leader(Duration::from_secs(20)).await.unwrap();
    let r = w.request(B, vm, takeover(1, reg(B, 5)), T).await.unwrap();
    assert!(r.reply.granted, "{r:?}");
    assert_eq!(r.reply.state.generation, Generation(2));
    // A resend is the same grant.
    let again = w.request(B, vm, takeover(1, reg(B, 5)), T).await.unwrap();
    assert!(again.reply.granted && !again.wrote, "{again:?}");
    assert_eq!(w.query(vm, T).await.unwrap().generation, Generation(2));
    let q = w.request(P, vm, WitnessRequest::Query, T).await.unwrap();
    assert_eq!(q.reply.state.primary, B);
}
