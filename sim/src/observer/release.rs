//! Checks made when a reply frame leaves a host: output commit, single active VM, and the
//! client-visible half of "no lost commitments".

use ftvm_model::{Epoch, Generation, NodeId, Time};

use super::{Instance, Observer};
use crate::invariant::Invariant;
use crate::vm::service::Reply;

impl Observer {
    /// `instance` on `node`, a VM of `generation`, released `reply` emitted in epoch `tag`.
    pub fn released(
        &mut self,
        now: Time,
        node: NodeId,
        instance: Instance,
        generation: Generation,
        tag: Epoch,
        reply: &Reply,
    ) {
        self.released_frames(now, node, instance, generation, tag, 1);
        self.check_handed_once(now, node, reply);
    }

    /// `instance` on `node`, a VM of `generation`, released `frames` frames, the newest emitted
    /// in epoch `tag` (what a real host's journal records: frames, not replies).
    pub fn released_frames(
        &mut self,
        now: Time,
        node: NodeId,
        instance: Instance,
        generation: Generation,
        tag: Epoch,
        frames: u64,
    ) {
        self.stats.released += frames;
        self.check_single_active(now, node, instance, generation, tag);
        self.check_output_commit(now, node, generation, tag);
    }

    /// A client received `reply` from `node`: it must have been released.
    pub fn client_saw(&mut self, now: Time, from: NodeId, reply: &Reply) {
        self.stats.replies_seen += 1;
        if self.handed.get(&(reply.key, reply.value)) != Some(&(reply.client, reply.req)) {
            self.fail(
                Invariant::Driver,
                now,
                Some(from),
                format!("a client received {reply:?}, which no host released"),
            );
        }
    }

    fn check_single_active(
        &mut self,
        now: Time,
        node: NodeId,
        instance: Instance,
        generation: Generation,
        tag: Epoch,
    ) {
        let first = *self.releasers.entry(generation).or_insert(instance);
        if first != instance {
            let other = self.instances.get(&first).copied().unwrap_or(NodeId(0));
            let detail = format!(
                "two VMs released output in {generation}: one on {other}, now another on {node}"
            );
            return self.fail(Invariant::SingleActive, now, Some(node), detail);
        }
        if self.granted.get(&generation) != Some(&node) {
            let detail = format!(
                "{node} released output in {generation}, but the witness made {} primary of it",
                self.granted
                    .get(&generation)
                    .map_or("nobody".to_string(), |n| n.to_string())
            );
            return self.fail(Invariant::SingleActive, now, Some(node), detail);
        }
        if let Some(&(taker, from)) = self.takeovers.get(&generation) {
            if taker != instance && tag > from {
                let at = self.instances.get(&taker).copied().unwrap_or(NodeId(0));
                let detail = format!(
                    "{node} released output of {generation} {tag} after {at} took over from \
                     {generation} {from} (diverging VMs both talking)"
                );
                self.fail(Invariant::SingleActive, now, Some(node), detail);
            }
        }
    }

    fn check_output_commit(&mut self, now: Time, node: NodeId, generation: Generation, tag: Epoch) {
        let w = self.witness;
        // Who could resume this VM from a replica, per the witness: the registered backup of
        // this generation, or, once the generation ended, the backup that took over.
        let registered = if w.generation == generation && w.primary == node {
            w.backup
        } else if let Some(r) = self.promoted.get(&generation) {
            Some(*r)
        } else {
            return; // not a primary the witness knows: single_active reports it
        };
        let Some(r) = registered else {
            return; // no backup can take over: unprotected output may leave
        };
        let committed = self
            .committed_max
            .get(&(r.node, generation, r.since))
            .copied()
            .unwrap_or(Epoch::NONE);
        if committed < tag {
            let detail = format!(
                "a frame of {generation} {tag} left {node} while its backup {} (synced at {}) \
                 had committed only {committed}",
                r.node, r.since
            );
            self.fail(Invariant::OutputCommit, now, Some(node), detail);
        }
    }

    fn check_handed_once(&mut self, now: Time, node: NodeId, reply: &Reply) {
        let owner = (reply.client, reply.req);
        let prev = *self.handed.entry((reply.key, reply.value)).or_insert(owner);
        if prev != owner {
            let detail = format!(
                "counter {} = {} was handed to client {} request {} and now to client {} request \
                 {}: two histories of the VM",
                reply.key, reply.value, prev.0, prev.1, reply.client, reply.req
            );
            return self.fail(Invariant::NoLostCommitments, now, Some(node), detail);
        }
        let max = self.max_released.entry(reply.key).or_insert(0);
        *max = (*max).max(reply.value);
    }
}
