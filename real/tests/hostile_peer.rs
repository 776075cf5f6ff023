//! Attacks from the network on a protected pair, each reproduced against real agents and a
//! real witness (the in-memory VM stands in for QEMU, which adds nothing here), and each shown to
//! fail harmlessly: the VM keeps running and stays protected, the replica keeps equalling the
//! primary, the register does not change.
//!
//! The attacker knows the protocol and every address, but holds no key of the deployment (or,
//! where said, holds the backup's key and tries to act as somebody else with it).

mod mem_cluster;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ftvm_model::wire;
use ftvm_model::{
    Epoch, Generation, NodeId, PeerMsg, Registration, RejectReason, VmId, WitnessRequest,
};
use ftvm_real::agent::witness;
use ftvm_real::auth::handshake::{self, Purpose};
use ftvm_real::auth::Identity;

use mem_cluster::*;

const VM: VmId = VmId(7);
const DEADLINE: Duration = Duration::from_millis(600);
const LINK: Purpose = Purpose::Link(ftvm_real::auth::Protection::Mac);

/// Sends `bytes` on a fresh connection to `addr` and waits (at most `wait`) for the other side
/// to close it; returns whether it did.
fn send_raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> bool {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    let _ = s.write_all(bytes);
    let mut buf = [0u8; 4096];
    let t0 = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
        if t0.elapsed() > wait {
            return false;
        }
    }
}

fn join(node: u32, known: u64) -> Vec<u8> {
    wire::encode_peer(
        VM,
        &PeerMsg::Join {
            vm: VM,
            node: NodeId(node),
            ram_pages: PAGES,
            page_size: PAGE as u32,
            known: Generation(known),
            replica: None,
            disk_blocks: 0,
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_links_protect_as_well_and_refuse_an_unencrypted_peer() {
    let c = Cluster::protected_with(DEADLINE, ftvm_real::auth::Protection::Encrypt).await;
    c.assert_healthy("protecting over encrypted links").await;
    // A node configured without --encrypt fails the handshake: no silent downgrade.
    let id = c.keys.nodes[&NodeId(2)].clone();
    let them = id.trust.nodes[&NodeId(1)];
    let primary = c.addrs[&NodeId(1)];
    let r = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(primary).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mac = LINK;
        handshake::dial(&mut s, &id, &them, mac, VM).is_ok()
    })
    .await
    .unwrap();
    assert!(
        !r,
        "a link without encryption was accepted by an encrypting primary"
    );
    c.assert_healthy("an unencrypted dial").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_join_with_a_huge_generation_does_not_fence_the_primary() {
    let c = Cluster::protected(DEADLINE).await;
    // Before authentication: one 60-byte Join made the primary fence itself and stop its VM.
    let closed = send_raw(
        c.addrs[&NodeId(1)],
        &join(3, u64::MAX / 2),
        Duration::from_secs(3),
    );
    assert!(
        closed,
        "the primary kept an unauthenticated connection open"
    );
    c.assert_healthy("a forged Join with a huge generation")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_displaces_the_backup_by_joining_under_its_name() {
    let c = Cluster::protected(DEADLINE).await;
    let primary = c.addrs[&NodeId(1)];
    // Without a key: a Join naming the backup.
    assert!(send_raw(primary, &join(2, 1), Duration::from_secs(3)));
    c.assert_healthy("an unauthenticated Join naming the backup")
        .await;

    // With the backup's own key (a second, impostor process of node 2): the handshake succeeds,
    // but the live link of node 2 is not displaced and the newcomer is closed.
    let id = c.keys.nodes[&NodeId(2)].clone();
    let them = id.trust.nodes[&NodeId(1)];
    let dup = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(primary).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let acc = handshake::dial(&mut s, &id, &them, LINK, VM);
        assert!(acc.is_ok(), "a genuine key must pass the handshake");
        let _ = s.write_all(&join(2, 1));
        let mut buf = [0u8; 256];
        // The primary closes it (no SyncStart ever comes).
        loop {
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap();
    assert!(dup, "a second link of node 2 was kept open");
    c.assert_healthy("a second link under the backup's key")
        .await;

    // With the backup's key, joining as another node (3): refused as well.
    let id = c.keys.nodes[&NodeId(2)].clone();
    let them = id.trust.nodes[&NodeId(1)];
    let closed = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(primary).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        handshake::dial(&mut s, &id, &them, LINK, VM).unwrap();
        let _ = s.write_all(&join(3, 1));
        let mut buf = [0u8; 256];
        matches!(s.read(&mut buf), Ok(0))
    })
    .await
    .unwrap();
    assert!(closed, "a link of node 2 speaking as node 3 was kept open");
    c.assert_healthy("a link of node 2 speaking as node 3")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_then_a_reject_towards_the_backup_do_not_stop_it() {
    let c = Cluster::protected(DEADLINE).await;
    // Before authentication: a Join naming the primary, then Reject{WrongVm}, made the backup
    // agent exit while heartbeats on that connection kept a dead primary looking alive.
    let mut bytes = join(1, 1);
    bytes.extend(wire::encode_peer(
        VM,
        &PeerMsg::Reject {
            generation: Generation(1),
            reason: RejectReason::WrongVm,
        },
    ));
    bytes.extend(wire::encode_peer(
        VM,
        &PeerMsg::Heartbeat {
            generation: Generation(1),
            epoch: Epoch(1),
        },
    ));
    assert!(send_raw(
        c.addrs[&NodeId(2)],
        &bytes,
        Duration::from_secs(3)
    ));
    c.assert_healthy("a Join and a Reject sent to the backup")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_witness_answers_only_configured_nodes_and_only_their_own_requests() {
    let c = Cluster::protected(DEADLINE).await;
    let before = c.register();
    // Before authentication: a Query and a forged DropBackup, two frames, were granted.
    let mut bytes = wire::encode_witness_request(VM, &WitnessRequest::Query);
    let dropped = WitnessRequest::DropBackup {
        generation: Generation(1),
        primary: NodeId(1),
        backup: Registration {
            node: NodeId(2),
            since: Epoch(u64::MAX / 2),
        },
    };
    bytes.extend(wire::encode_witness_request(VM, &dropped));
    assert!(send_raw(c.witness, &bytes, Duration::from_secs(3)));
    assert_eq!(
        c.register(),
        before,
        "an unauthenticated drop changed the register"
    );

    // The backup's key cannot drop itself in the primary's name, nor register another node.
    let id = c.keys.nodes[&NodeId(2)].clone();
    let reply = witness::request(c.witness, &id, VM, dropped, Duration::from_secs(3))
        .await
        .unwrap();
    assert!(!reply.granted, "node 2 dropped the backup in node 1's name");
    let register = WitnessRequest::RegisterBackup {
        generation: Generation(1),
        primary: NodeId(1),
        backup: Registration {
            node: NodeId(3),
            since: Epoch(u64::MAX / 2),
        },
    };
    let reply = witness::request(c.witness, &id, VM, register, Duration::from_secs(3))
        .await
        .unwrap();
    assert!(!reply.granted);
    // Node 1's key cannot take over in node 2's name.
    let id1 = c.keys.nodes[&NodeId(1)].clone();
    let token = Registration {
        node: NodeId(2),
        since: Epoch(before["backup"]["since"].as_u64().unwrap()),
    };
    let takeover = WitnessRequest::Takeover {
        generation: Generation(1),
        backup: token,
    };
    let reply = witness::request(c.witness, &id1, VM, takeover, Duration::from_secs(3))
        .await
        .unwrap();
    assert!(!reply.granted, "node 1 took over in node 2's name");
    assert_eq!(
        c.register(),
        before,
        "a request in another node's name changed the register"
    );

    // A key the witness does not know gets nothing, not even a Query.
    let (_, mut strangers) = Identity::generate_set(&[NodeId(1)]).unwrap();
    let mut stranger = strangers.remove(&NodeId(1)).unwrap();
    stranger.trust = id.trust.clone();
    let r = witness::request(
        c.witness,
        &stranger,
        VM,
        WitnessRequest::Query,
        Duration::from_secs(3),
    )
    .await;
    assert!(r.is_err(), "a stranger's query was answered");
    c.assert_healthy("forged witness requests").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_does_not_believe_a_witness_without_the_witness_key() {
    // Someone else answers on the witness's address: a forged grant must not be taken.
    let (_, mut ids) = Identity::generate_set(&[NodeId(1), NodeId(2)]).unwrap();
    let agent = ids.remove(&NodeId(1)).unwrap();
    let (mut impostor, _) = Identity::generate_set(&[NodeId(1)]).unwrap();
    impostor.trust = agent.trust.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        // The impostor speaks the protocol with its own key; and a second impostor just writes
        // a well-formed (unauthenticated) grant.
        let (mut s, _) = listener.accept().await.unwrap();
        let _ = handshake::listen_async(&mut s, &impostor, Purpose::Witness, VM).await;
        let (mut s, _) = listener.accept().await.unwrap();
        let reply = ftvm_model::WitnessReply {
            request: WitnessRequest::Query,
            granted: true,
            state: ftvm_model::WitnessState::initial(VM, NodeId(2)),
        };
        use tokio::io::AsyncWriteExt;
        let _ = s.write_all(&wire::encode_witness_reply(&reply)).await;
    });
    for _ in 0..2 {
        let r = witness::request(
            addr,
            &agent,
            VM,
            WitnessRequest::Query,
            Duration::from_secs(2),
        )
        .await;
        assert!(r.is_err(), "an impostor's reply was accepted: {r:?}");
    }
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_connections_are_dropped_at_the_deadline() {
    let c = Cluster::protected(DEADLINE).await;
    // Fewer bytes than a message hold a connection until the deadline, no longer.
    let targets = [c.addrs[&NodeId(1)], c.addrs[&NodeId(2)], c.witness];
    let mut socks = Vec::new();
    for &t in &targets {
        for _ in 0..10 {
            let mut s = TcpStream::connect(t).unwrap();
            s.write_all(b"FTV").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            socks.push(s);
        }
    }
    let t0 = Instant::now();
    for mut s in socks {
        let mut b = [0u8; 16];
        let r = s.read(&mut b);
        assert!(
            matches!(r, Ok(0))
                || matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "a silent connection was not closed: {r:?}"
        );
    }
    assert!(
        t0.elapsed() < DEADLINE + Duration::from_secs(2),
        "took {:?}",
        t0.elapsed()
    );
    c.assert_healthy("silent connections").await;
}

/// A handshake hello as a dialler would send it (recorded by a stream that takes writes and
/// ends reads).
fn recorded_hello(id: &Identity, them: &ftvm_real::auth::PublicKey, purpose: Purpose) -> Vec<u8> {
    struct Rec(Vec<u8>);
    impl Read for Rec {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Ok(0)
        }
    }
    impl Write for Rec {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut r = Rec(Vec::new());
    let _ = handshake::dial(&mut r, id, them, purpose, VM);
    r.0
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_mutated_bytes_on_the_live_ports_change_nothing() {
    use rand::{Rng, SeedableRng};
    let c = Cluster::protected(DEADLINE).await;
    let secs: u64 = std::env::var("FTVM_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let seed: u64 = std::env::var("FTVM_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    eprintln!("fuzzing the live ports for {secs} s, seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Material an attacker could have: genuine hellos (recorded from the wire, from a key of
    // the deployment and from a stranger's), plain protocol frames.
    let (_, mut strangers) = Identity::generate_set(&[NodeId(9)]).unwrap();
    let stranger = strangers.remove(&NodeId(9)).unwrap();
    let id1 = c.keys.nodes[&NodeId(1)].clone();
    let bkey = id1.trust.nodes[&NodeId(2)];
    let seeds: Vec<Vec<u8>> = vec![
        recorded_hello(&id1, &bkey, LINK),
        recorded_hello(&stranger, &bkey, LINK),
        join(1, u64::MAX),
        wire::encode_witness_request(VM, &WitnessRequest::Query),
    ];
    let targets = [c.addrs[&NodeId(2)], c.addrs[&NodeId(1)], c.witness];
    let rss0 = rss_kib();
    let t0 = Instant::now();
    let mut sent = 0u64;
    while t0.elapsed() < Duration::from_secs(secs) {
        let mut bytes = seeds[rng.gen_range(0..seeds.len())].clone();
        match rng.gen_range(0..4) {
            0 => bytes = (0..rng.gen_range(1..2000)).map(|_| rng.gen()).collect(),
            1 => {
                for _ in 0..rng.gen_range(1..8) {
                    let i = rng.gen_range(0..bytes.len());
                    bytes[i] ^= 1 << rng.gen_range(0..8);
                }
            }
            2 => bytes.truncate(rng.gen_range(0..bytes.len())),
            _ => {
                // A huge claimed length.
                if bytes.len() > 8 {
                    bytes[6] = 0xff;
                    bytes[7] = 0xff;
                }
            }
        }
        let target = targets[rng.gen_range(0..targets.len())];
        tokio::task::spawn_blocking(move || {
            if let Ok(mut s) = TcpStream::connect(target) {
                let _ = s.write_all(&bytes);
            }
        })
        .await
        .unwrap();
        sent += 1;
    }
    eprintln!("sent {sent} hostile connections");
    assert!(sent > 50, "only {sent} connections in {secs} s");
    let grown = rss_kib().saturating_sub(rss0);
    assert!(
        grown < 64 * 1024,
        "memory grew by {grown} KiB under hostile input"
    );
    c.assert_healthy("random and mutated input").await;
}
