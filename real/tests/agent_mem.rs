//! The agent end to end over real loopback sockets, with an in-memory VM instead of QEMU:
//! witness, primary and backup agents protect the VM, the backup's replica matches the primary's
//! RAM, and when the primary dies the backup takes over from its replica in a new generation.

mod mem_cluster;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ftvm_model::wire::{Expect, StreamDecoder};
use ftvm_model::VmId;
use ftvm_model::{NodeId, Start};
use ftvm_real::agent::mem_vm::MemLauncher;
use ftvm_real::agent::Agent;
use ftvm_real::auth::handshake::{self, Purpose};
use ftvm_real::auth::{FrameOpener, FrameSealer, Identity, Protection};

use mem_cluster::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protects_then_fails_over_to_the_replica() {
    let dir = tempfile::tempdir().unwrap();
    let waddr = free_addr();
    let addrs: BTreeMap<NodeId, SocketAddr> =
        [(NodeId(1), free_addr()), (NodeId(2), free_addr())].into();
    let keys = keys();
    let wtask = serve_witness(dir.path(), waddr, &keys, true);

    let p = host(dir.path(), 1, Start::Primary, &addrs, waddr, &keys);
    let b = host(
        dir.path(),
        2,
        Start::Backup { primary: NodeId(1) },
        &addrs,
        waddr,
        &keys,
    );
    let (p_status, b_status) = (
        p.cfg.status_file.clone().unwrap(),
        b.cfg.status_file.clone().unwrap(),
    );
    let primary = Agent::new(p.cfg.clone(), launcher(&p)).unwrap();
    // The first start of the restored VM fails: the takeover must try again, not lose the VM.
    let backup = Agent::new(
        b.cfg.clone(),
        MemLauncher {
            failing_restores: 1,
            ..launcher(&b)
        },
    )
    .unwrap();
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
    let ptask = tokio::spawn(primary.run(async {
        let _ = kill_rx.await;
    }));
    let btask = tokio::spawn(backup.run(std::future::pending()));

    wait_for("protection", Duration::from_secs(20), || {
        status(&p_status)["phase"] == "protected"
    })
    .await;
    // Let it run protected for a while under the dirtying guest.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let acked = std::fs::read_to_string(dir.path().join("n1/metrics.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert!(acked >= 20, "only {acked} epochs acked in 1.5 s");

    // At every 5th checkpoint both sides recorded a RAM digest: primary while paused at the
    // capture, backup after the commit. They must agree.
    let digests = |n: &str| -> BTreeMap<u64, u64> {
        std::fs::read_to_string(dir.path().join(n).join("replica/verify.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| (v["epoch"].as_u64().unwrap(), v["digest"].as_u64().unwrap()))
            .collect()
    };
    let (pd, bd) = (digests("n1"), digests("n2"));
    let common: Vec<u64> = pd.keys().filter(|e| bd.contains_key(e)).copied().collect();
    assert!(
        common.len() >= 4,
        "only {} verified checkpoints",
        common.len()
    );
    for e in &common {
        assert_eq!(
            pd[e], bd[e],
            "replica differs from the primary at epoch {e}"
        );
    }

    // Freeze the guest: after the next acked epochs the replica must equal its RAM.
    let pram = p.launched.lock().unwrap()[0].clone();
    pram.set_frozen(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let replica = std::fs::read(dir.path().join("n2/replica.ram")).unwrap();
    let live = pram.snapshot();
    assert_eq!(replica.len(), live.len());
    let differing = (0..PAGES as usize)
        .filter(|&i| replica[i * PAGE..(i + 1) * PAGE] != live[i * PAGE..(i + 1) * PAGE])
        .count();
    assert_eq!(
        differing, 0,
        "replica differs from the primary in {differing} pages"
    );
    let writes_at_kill = pram.writes();
    assert!(writes_at_kill > 0);

    // The primary host dies.
    let _ = kill_tx.send(());
    let _ = ptask.await;
    let killed = Instant::now();
    wait_for("failover", Duration::from_secs(10), || {
        let s = status(&b_status);
        s["role"] == "Primary" && s["failed_over"] == true
    })
    .await;
    let failover = killed.elapsed();
    let s = status(&b_status);
    assert_eq!(s["generation"], 2);
    let restored = b.launched.lock().unwrap();
    assert_eq!(
        restored.len(),
        1,
        "one restored VM (after one failed start)"
    );
    let restored = restored[0].clone();
    // The restored VM starts from the replica: it carries every write the primary made.
    assert!(restored.writes() >= writes_at_kill);
    eprintln!("failover took {failover:?}");
    assert!(failover < Duration::from_secs(3));
    btask.abort();
    wtask.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_with_the_wrong_ram_size_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let waddr = free_addr();
    let addrs: BTreeMap<NodeId, SocketAddr> =
        [(NodeId(1), free_addr()), (NodeId(2), free_addr())].into();
    let keys = keys();
    let wtask = serve_witness(dir.path(), waddr, &keys, false);
    let p = host(dir.path(), 1, Start::Primary, &addrs, waddr, &keys);
    let mut b = host(
        dir.path(),
        2,
        Start::Backup { primary: NodeId(1) },
        &addrs,
        waddr,
        &keys,
    );
    b.cfg.model.ram_pages = PAGES * 2;
    let primary = Agent::new(p.cfg.clone(), launcher(&p)).unwrap();
    let mut bl = launcher(&b);
    bl.ram_bytes *= 2;
    let backup = Agent::new(b.cfg.clone(), bl).unwrap();
    let ptask = tokio::spawn(primary.run(std::future::pending()));
    let err = tokio::time::timeout(Duration::from_secs(10), backup.run(std::future::pending()))
        .await
        .expect("the backup should give up, not retry forever")
        .expect_err("a mismatched backup must fail");
    let msg = err.to_string();
    assert!(msg.contains("RAM size"), "unclear error: {msg}");
    // The primary is unharmed and still waiting for a proper backup.
    assert_eq!(
        status(&p.cfg.status_file.clone().unwrap())["phase"],
        "waiting"
    );
    ptask.abort();
    wtask.abort();
}

/// What a fake primary sends after a good full sync, to a live backup.
#[derive(Debug, Clone, Copy)]
enum Bad {
    /// A checkpoint whose checksum fails.
    Corrupt,
    /// A page index past the end of guest RAM.
    PageOutOfRange,
    /// The same page twice.
    DuplicatePage,
    /// Another page size.
    PageSize,
    /// Only the 65 bytes of a `CheckpointBegin` claiming 2^40 pages.
    HugePageCount,
    /// Only the 65 bytes of a `CheckpointBegin` claiming 1 GiB of device state.
    HugeDevice,
}

fn checkpoint(epoch: u64, page_size: u32, pages: &[(u64, Vec<u8>)]) -> Vec<u8> {
    use ftvm_model::wire::encode_checkpoint;
    use ftvm_model::{Epoch, Generation};
    let pages: Vec<(u64, &[u8])> = pages.iter().map(|(i, p)| (*i, &p[..])).collect();
    encode_checkpoint(
        VmId(7),
        Generation(1),
        Epoch(epoch),
        false,
        page_size,
        &pages,
        b"device",
    )
    .unwrap()
}

/// The first 65 bytes of a checkpoint frame of this shape.
fn begin_only(epoch: u64, page_count: u64, device_len: u64) -> Vec<u8> {
    use ftvm_model::wire::{CheckpointEncoder, CheckpointMeta};
    use ftvm_model::{Epoch, Generation};
    let meta = CheckpointMeta {
        epoch: Epoch(epoch),
        full: false,
        page_size: PAGE as u32,
        page_count,
        device_len,
        disk_blocks: 0,
    };
    CheckpointEncoder::new(VmId(7), Generation(1), meta)
        .unwrap()
        .1
        .to_vec()
}

fn bad_frame(bad: Bad, epoch: u64) -> Vec<u8> {
    let page = |b: u8| vec![b; PAGE];
    match bad {
        Bad::Corrupt => {
            let mut f = checkpoint(epoch, PAGE as u32, &[(3, page(0xEE))]);
            let at = f.len() - 20;
            f[at] ^= 0x5A;
            f
        }
        Bad::PageOutOfRange => checkpoint(epoch, PAGE as u32, &[(3, page(0xEE)), (PAGES, page(1))]),
        Bad::DuplicatePage => checkpoint(epoch, PAGE as u32, &[(3, page(0xEE)), (3, page(1))]),
        Bad::PageSize => checkpoint(epoch, 2 * PAGE as u32, &[(3, vec![0xEE; 2 * PAGE])]),
        Bad::HugePageCount => begin_only(epoch, 1 << 40, 0),
        Bad::HugeDevice => begin_only(epoch, 0, 1 << 30),
    }
}

/// Accepts the backup's link as the primary: the handshake with the primary's key, then the
/// two halves of its frame protection.
fn accept_link(
    listener: &std::net::TcpListener,
    id: &Identity,
) -> (std::net::TcpStream, FrameSealer, FrameOpener) {
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let link = Purpose::Link(Protection::Mac);
    let acc = handshake::listen(&mut s, id, link, VmId(7)).expect("the backup authenticates");
    let dec = StreamDecoder::new(Expect::vm(VmId(7)));
    (
        s,
        FrameSealer::new(acc.send_key),
        FrameOpener::new(dec, acc.recv_key),
    )
}

/// Sends `frame` with its tag.
fn send_sealed(s: &mut std::net::TcpStream, sealer: &mut FrameSealer, frame: &[u8]) {
    use std::io::Write;
    s.write_all(frame).unwrap();
    s.write_all(&sealer.seal(frame)).unwrap();
}

/// Reads peer messages until `pick` returns something, or the stream ends (None).
fn read_until<T>(
    s: &mut std::net::TcpStream,
    dec: &mut FrameOpener,
    mut pick: impl FnMut(ftvm_model::PeerMsg) -> Option<T>,
) -> Option<T> {
    use std::io::Read;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = s.read(&mut buf).ok().filter(|&n| n > 0)?;
        let mut pos = 0;
        while pos < n {
            let (used, item) = dec
                .decode(&buf[pos..n])
                .expect("the backup sends valid frames");
            pos += used;
            if let Some(ftvm_model::wire::Item::Peer(m)) = item {
                if let Some(t) = pick(m) {
                    return Some(t);
                }
            }
        }
    }
}

/// A fake primary — holding the primary's key, so its links authenticate and its frames carry
/// valid tags: an insider, or a compromised primary host — syncs a live backup agent, then
/// sends it one hostile checkpoint per round: the backup drops that checkpoint and that link
/// (never the agent), its replica keeps the synced state, and it comes back with a fresh join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_drops_bad_checkpoints_and_their_links_but_keeps_running_and_its_replica() {
    use ftvm_model::wire::encode_peer;
    use ftvm_model::{Epoch, Generation, PeerMsg};

    let dir = tempfile::tempdir().unwrap();
    let addrs: BTreeMap<NodeId, SocketAddr> =
        [(NodeId(1), free_addr()), (NodeId(2), free_addr())].into();
    let listener = std::net::TcpListener::bind(addrs[&NodeId(1)]).unwrap();
    let keys = keys();
    let primary_id = keys.nodes[&NodeId(1)].clone();
    let mut b = host(
        dir.path(),
        2,
        Start::Backup { primary: NodeId(1) },
        &addrs,
        free_addr(),
        &keys,
    );
    // No heartbeats from the fake primary: the backup must not try to take over meanwhile.
    b.cfg.model.failure_timeout = Duration::from_secs(60);
    b.cfg.model.join_retry = Duration::from_millis(50);
    let b_status = b.cfg.status_file.clone().unwrap();
    let ram_file = b.cfg.replica_ram.clone();
    let journal = b.cfg.replica_dir.join("journal");
    let backup = Agent::new(b.cfg.clone(), launcher(&b)).unwrap();
    let btask = tokio::spawn(backup.run(std::future::pending()));

    let rounds = [
        Bad::Corrupt,
        Bad::PageOutOfRange,
        Bad::DuplicatePage,
        Bad::PageSize,
        Bad::HugePageCount,
        Bad::HugeDevice,
    ];
    let primary = tokio::task::spawn_blocking(move || {
        let mut results = Vec::new();
        for (round, bad) in rounds.into_iter().enumerate() {
            let (mut s, mut sealer, mut dec) = accept_link(&listener, &primary_id);
            read_until(&mut s, &mut dec, |m| {
                matches!(m, PeerMsg::Join { .. }).then_some(())
            })
            .expect("a join");
            // A good full sync of epoch `e`: every page holds the round's byte.
            let e = 10 * (round as u64 + 1);
            let fill = round as u8 + 1;
            let sync = PeerMsg::SyncStart {
                generation: Generation(1),
                epoch: Epoch(e),
                base: None,
                lineage: 0,
                continues: false,
            };
            send_sealed(&mut s, &mut sealer, &encode_peer(VmId(7), &sync));
            let pages: Vec<(u64, Vec<u8>)> = (0..PAGES).map(|i| (i, vec![fill; PAGE])).collect();
            send_sealed(&mut s, &mut sealer, &checkpoint(e, PAGE as u32, &pages));
            let acked = read_until(&mut s, &mut dec, |m| match m {
                PeerMsg::Ack { epoch, .. } if epoch == Epoch(e) => Some(()),
                _ => None,
            });
            assert!(
                acked.is_some(),
                "{bad:?}: the sync of epoch {e} was not acked"
            );
            // Then the hostile checkpoint of the next epoch.
            send_sealed(&mut s, &mut sealer, &bad_frame(bad, e + 1));
            let t0 = Instant::now();
            let closed = read_until(&mut s, &mut dec, |_| None::<()>).is_none();
            results.push((bad, fill, closed, t0.elapsed()));
            // Nothing of the bad checkpoint reached the replica: it is the sync, whole. (The ack
            // goes at the commit point; the sync's pages reach the RAM file after it, and its
            // journal is gone once they have.)
            let t1 = Instant::now();
            while journal.exists() && t1.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(5));
            }
            let replica = std::fs::read(&ram_file).unwrap();
            assert!(
                replica.iter().all(|&x| x == fill),
                "{bad:?}: the replica changed"
            );
        }
        // The backup comes back once more: it survived every round.
        let (mut s, _, mut dec) = accept_link(&listener, &primary_id);
        let joined = read_until(&mut s, &mut dec, |m| {
            matches!(m, PeerMsg::Join { .. }).then_some(())
        });
        (results, joined.is_some())
    });
    let (results, rejoined) = tokio::time::timeout(Duration::from_secs(60), primary)
        .await
        .expect("the rounds finish")
        .unwrap();
    for (bad, _, closed, after) in &results {
        assert!(closed, "{bad:?}: the backup kept the link");
        assert!(
            *after < Duration::from_secs(5),
            "{bad:?}: closed only after {after:?}"
        );
    }
    assert!(
        rejoined,
        "the backup did not come back after the last round"
    );
    assert!(!btask.is_finished(), "the backup agent stopped");
    let last = results.last().map(|r| 10 * r.1 as u64).unwrap();
    assert_eq!(status(&b_status)["committed"], last);
    btask.abort();
}
