//! Link behaviour turmoil does not model: bandwidth and TCP-style segment loss, plus the
//! tampering faults (a damaged checkpoint, a forged frame or witness reply on the wire).
//!
//! turmoil's TCP delivers every segment in order after a random latency, and a segment it
//! drops (partition) is never resent — the stream then stalls for good, like a connection
//! whose retransmissions all fail. Loss that TCP recovers from is modelled here instead: a
//! lost segment is resent after `rto`, delaying it and everything behind it on the stream
//! (head-of-line blocking). Bandwidth serialises segments per link direction: a segment leaves
//! only once the bytes before it had time to go out.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ftvm_model::Time;

use super::disorder::Disorder;
use crate::rng::SimRng;
use crate::scenario::Network;
use crate::trace::HostId;

#[derive(Clone, Copy, Debug)]
struct Link {
    bytes_per_ms: Option<u64>,
    loss: f64,
    busy_until: Time,
}

#[derive(Debug)]
pub(crate) struct Shaper {
    defaults: Link,
    rto: Duration,
    pub chunk: usize,
    links: BTreeMap<(HostId, HostId), Link>,
    corrupt: BTreeSet<(HostId, HostId)>,
    /// Encoded frames to slip into the next write on a link.
    forged: BTreeMap<(HostId, HostId), Vec<u8>>,
    /// Nodes whose next witness reply is forged.
    forged_replies: BTreeSet<HostId>,
    rng: SimRng,
    /// Duplicates, reordering and lost replies of witness exchanges.
    pub disorder: Disorder,
}

impl Shaper {
    /// `rng` drives segment loss, `disorder_rng` the witness-traffic disorder.
    pub fn new(net: &Network, rng: SimRng, disorder_rng: SimRng) -> Shaper {
        Shaper {
            defaults: Link {
                bytes_per_ms: net.bytes_per_ms,
                loss: net.loss,
                busy_until: Time::ZERO,
            },
            rto: net.rto,
            chunk: net.chunk_bytes,
            links: BTreeMap::new(),
            corrupt: BTreeSet::new(),
            forged: BTreeMap::new(),
            forged_replies: BTreeSet::new(),
            rng,
            disorder: Disorder::new(net.witness, disorder_rng),
        }
    }

    fn link(&mut self, from: HostId, to: HostId) -> &mut Link {
        let d = self.defaults;
        self.links.entry((from, to)).or_insert(d)
    }

    /// When a segment of `len` bytes written at `now` from `from` to `to` may be handed to the
    /// network: after the link's earlier bytes, any retransmission delay, and its own
    /// transmission time.
    pub fn plan(&mut self, from: HostId, to: HostId, now: Time, len: usize) -> Time {
        let rto = self.rto;
        let lost = {
            let loss = self.link(from, to).loss;
            loss > 0.0 && self.rng.chance(loss)
        };
        let l = self.link(from, to);
        let mut start = now.max(l.busy_until);
        if lost {
            start = start + rto;
        }
        let tx = l
            .bytes_per_ms
            .map_or(0, |bw| (len as u64).saturating_mul(1000) / bw.max(1));
        l.busy_until = start + Duration::from_micros(tx);
        l.busy_until
    }

    /// Set bandwidth on both directions of a link.
    pub fn set_bandwidth(&mut self, a: HostId, b: HostId, bytes_per_ms: Option<u64>) {
        self.link(a, b).bytes_per_ms = bytes_per_ms;
        self.link(b, a).bytes_per_ms = bytes_per_ms;
    }

    /// Set loss on both directions of a link.
    pub fn set_loss(&mut self, a: HostId, b: HostId, loss: f64) {
        self.link(a, b).loss = loss;
        self.link(b, a).loss = loss;
    }

    /// Set loss on every link, present and future.
    pub fn set_loss_everywhere(&mut self, loss: f64) {
        self.defaults.loss = loss;
        for l in self.links.values_mut() {
            l.loss = loss;
        }
    }

    /// Loss rate of `a → b`.
    pub fn loss(&self, a: HostId, b: HostId) -> f64 {
        self.links.get(&(a, b)).unwrap_or(&self.defaults).loss
    }

    /// Damage the next checkpoint sent `from → to`.
    pub fn arm_corruption(&mut self, from: HostId, to: HostId) {
        self.corrupt.insert((from, to));
    }

    /// Whether the checkpoint about to be sent `from → to` must be damaged (consumes it).
    pub fn take_corruption(&mut self, from: HostId, to: HostId) -> bool {
        self.corrupt.remove(&(from, to))
    }

    /// Slip `frame` (encoded) into the next write `from → to`, ahead of it.
    pub fn arm_forgery(&mut self, from: HostId, to: HostId, frame: Vec<u8>) {
        self.forged.insert((from, to), frame);
    }

    /// The forged frame to write `from → to` before the next write, if one is armed
    /// (consumes it).
    pub fn take_forgery(&mut self, from: HostId, to: HostId) -> Option<Vec<u8>> {
        self.forged.remove(&(from, to))
    }

    /// Forge the next witness reply `node` receives.
    pub fn arm_reply_forgery(&mut self, node: HostId) {
        self.forged_replies.insert(node);
    }

    /// Whether the witness reply `node` just received must be forged (consumes it).
    pub fn take_reply_forgery(&mut self, node: HostId) -> bool {
        self.forged_replies.remove(&node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_model::NodeId;

    fn net(bw: Option<u64>, loss: f64) -> Network {
        Network {
            latency_min: Duration::ZERO,
            latency_max: Duration::ZERO,
            bytes_per_ms: bw,
            loss,
            rto: Duration::from_millis(40),
            chunk_bytes: 1000,
            step: Duration::from_millis(2),
            witness: Default::default(),
        }
    }

    const A: HostId = HostId::Node(NodeId(1));
    const B: HostId = HostId::Node(NodeId(2));

    #[test]
    fn bandwidth_serialises_segments() {
        let mut s = Shaper::new(
            &net(Some(1000), 0.0),
            SimRng::derive(1, 1),
            SimRng::derive(1, 2),
        );
        assert_eq!(s.plan(A, B, Time(0), 1000), Time(1000));
        assert_eq!(s.plan(A, B, Time(0), 500), Time(1500));
        // The other direction is independent.
        assert_eq!(s.plan(B, A, Time(0), 1000), Time(1000));
        // An idle link starts at `now`.
        assert_eq!(s.plan(A, B, Time(10_000), 1000), Time(11_000));
        s.set_bandwidth(A, B, None);
        assert_eq!(s.plan(A, B, Time(20_000), 1_000_000), Time(20_000));
    }

    #[test]
    fn loss_delays_by_the_rto() {
        let mut s = Shaper::new(&net(None, 0.0), SimRng::derive(1, 1), SimRng::derive(1, 2));
        s.set_loss(A, B, 0.999_999);
        assert_eq!(s.plan(A, B, Time(0), 10), Time(40_000));
        assert_eq!(s.loss(B, A), 0.999_999);
        s.set_loss_everywhere(0.0);
        assert_eq!(s.plan(A, B, Time(50_000), 10), Time(50_000));
        s.arm_corruption(A, B);
        assert!(!s.take_corruption(B, A));
        assert!(s.take_corruption(A, B));
        assert!(!s.take_corruption(A, B));
        s.arm_forgery(A, B, vec![1, 2, 3]);
        assert_eq!(s.take_forgery(B, A), None);
        assert_eq!(s.take_forgery(A, B), Some(vec![1, 2, 3]));
        assert_eq!(s.take_forgery(A, B), None);
        s.arm_reply_forgery(A);
        assert!(!s.take_reply_forgery(B));
        assert!(s.take_reply_forgery(A));
        assert!(!s.take_reply_forgery(A));
    }
}
