use ftvm_model::{Generation, NodeId, PeerMsg, VmId};

use super::*;

fn join(node: u32) -> PeerMsg {
    PeerMsg::Join {
        vm: VmId(1),
        node: NodeId(node),
        ram_pages: 8,
        page_size: 4096,
        known: Generation::UNKNOWN,
        replica: None,
        disk_blocks: 0,
    }
}

fn heartbeat() -> PeerMsg {
    PeerMsg::Heartbeat {
        generation: Generation(1),
        epoch: ftvm_model::Epoch(3),
    }
}

#[test]
fn an_accepted_connection_speaks_only_after_joining_as_the_node_it_proved() {
    let mut t = PeerTable::new();
    assert_eq!(
        t.accepted(7u64, NodeId(2), None),
        Admission::Admitted { displaced: None }
    );
    assert_eq!(
        t.speaker(7, &heartbeat()),
        Speaker::Nobody,
        "before its Join"
    );
    assert_eq!(t.speaker(7, &join(2)), Speaker::Joined(NodeId(2)));
    assert_eq!(t.speaker(7, &heartbeat()), Speaker::Peer(NodeId(2)));
    assert_eq!(t.link_of(NodeId(2)), Some(7));
}

#[test]
fn a_join_naming_another_node_is_refused() {
    let mut t = PeerTable::new();
    assert_eq!(
        t.accepted(7u64, NodeId(2), None),
        Admission::Admitted { displaced: None }
    );
    assert_eq!(
        t.speaker(7, &join(3)),
        Speaker::Refused {
            proven: Some(NodeId(2)),
            claimed: NodeId(3)
        }
    );
    assert_eq!(t.speaker(7, &join(2)), Speaker::Nobody, "refused for good");
    assert_eq!(t.link_of(NodeId(3)), None);
}

#[test]
fn the_peers_live_link_is_never_displaced_by_a_newcomer() {
    let peer = Some(NodeId(2));
    let mut t = PeerTable::new();
    assert_eq!(
        t.accepted(1u64, NodeId(2), peer),
        Admission::Admitted { displaced: None }
    );
    assert_eq!(t.speaker(1, &join(2)), Speaker::Joined(NodeId(2)));
    assert_eq!(t.accepted(2, NodeId(2), peer), Admission::Refused);
    assert_eq!(t.link_of(NodeId(2)), Some(1));
    // One accepted while the node had no live link, joining after another did.
    let mut t = PeerTable::new();
    assert_eq!(
        t.accepted(1u64, NodeId(2), peer),
        Admission::Admitted { displaced: None }
    );
    assert_eq!(
        t.accepted(2, NodeId(2), peer),
        Admission::Admitted { displaced: None }
    );
    assert_eq!(t.speaker(1, &join(2)), Speaker::Joined(NodeId(2)));
    assert!(matches!(t.speaker(2, &join(2)), Speaker::Refused { .. }));
    assert_eq!(t.link_of(NodeId(2)), Some(1));
}

#[test]
fn another_nodes_live_link_is_displaced_by_a_newcomer_proving_the_same_node() {
    // Node 2's link outlived its far end (a refused joiner whose close was lost): node 2's
    // next connection takes its place instead of being shut out for good.
    let mut t = PeerTable::new();
    assert_eq!(
        t.accepted(1u64, NodeId(2), None),
        Admission::Admitted { displaced: None }
    );
    assert_eq!(t.speaker(1, &join(2)), Speaker::Joined(NodeId(2)));
    let other = Some(NodeId(3));
    assert_eq!(
        t.accepted(2, NodeId(2), other),
        Admission::Admitted { displaced: Some(1) }
    );
    assert_eq!(t.link_of(NodeId(2)), None, "not live until it joins");
    assert_eq!(t.peer_of(1), None, "the displaced link speaks for nobody");
    assert_eq!(t.speaker(1, &heartbeat()), Speaker::Nobody);
    assert_eq!(t.speaker(2, &join(2)), Speaker::Joined(NodeId(2)));
    assert_eq!(t.link_of(NodeId(2)), Some(2));
}

#[test]
fn only_the_latest_dial_becomes_the_live_link_and_it_replaces_the_old_one() {
    let mut t = PeerTable::new();
    t.dialling(NodeId(1), 10u64);
    assert_eq!(t.connected(10, NodeId(1)), Dialled::Live { replaced: None });
    t.dialling(NodeId(1), 11);
    t.dialling(NodeId(1), 12);
    assert_eq!(t.connected(11, NodeId(1)), Dialled::Stale);
    assert!(
        !t.connect_failed(11, NodeId(1)),
        "a superseded dial is not news"
    );
    assert_eq!(
        t.connected(12, NodeId(1)),
        Dialled::Live { replaced: Some(10) }
    );
    assert_eq!(t.peer_of(10), None, "the replaced link speaks for nobody");
    assert_eq!(t.closed(10), None, "and its closing is not news");
    assert_eq!(t.closed(12), Some(NodeId(1)));
    assert_eq!(t.link_of(NodeId(1)), None);
}

#[test]
fn a_failed_dial_is_news_once() {
    let mut t = PeerTable::new();
    t.dialling(NodeId(1), 3u64);
    assert!(t.connect_failed(3, NodeId(1)));
    assert!(!t.connect_failed(3, NodeId(1)));
}

#[test]
fn disconnect_and_drain_forget_links() {
    let mut t = PeerTable::new();
    t.dialling(NodeId(1), 1u64);
    t.connected(1, NodeId(1));
    assert_eq!(
        t.accepted(2, NodeId(3), None),
        Admission::Admitted { displaced: None }
    );
    t.dialling(NodeId(4), 3);
    assert_eq!(t.disconnect(NodeId(1)), Some(1));
    assert_eq!(t.peer_of(1), None);
    t.dialling(NodeId(1), 4);
    t.connected(4, NodeId(1));
    let mut all = t.drain();
    all.sort();
    assert_eq!(all, vec![2, 3, 4]);
    assert_eq!(t.link_of(NodeId(1)), None);
    assert_eq!(t.speaker(2, &join(3)), Speaker::Nobody);
}
