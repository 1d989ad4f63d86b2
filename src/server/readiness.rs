//! Readiness per key: which keys this server may serve while the cluster rebalances.
//!
//! A server that finished rebalancing for epoch `F` holds the latest committed version of
//! every key it is a replica of in `F`'s view (every copy for `F` was delivered, and every
//! commit since went through all of a key's replicas). If it stayed a replica of key `K` in
//! every view published after `F` up to the current one, no write to `K` can have missed it
//! (a write decided in any of those views needed its vote), and it never dropped `K`: it is
//! *ready* for `K`, and serves `getr` and votes on `setr` of `K` at once, whatever the rest of
//! the cluster is doing. A key that moved to it waits for the epoch to finish, as before.
//!
//! This needs every view since `F`: the heartbeat answers carry the views a server missed
//! (`recent`). A gap in the chain (a view the server never saw) makes every key not ready,
//! which is the old rule: safe, only slower.

use std::collections::BTreeMap;

use crate::placement::ring::Ring;
use crate::placement::view::{Epoch, ServerId, View};

/// The most views kept (a chain longer than this means the rebalancing is far behind: the
/// oldest are forgotten, and keys are ready again only once an epoch is finished).
const MAX_VIEWS: usize = 64;

/// The views learned since the last epoch this server finished, each with its ring.
#[derive(Debug, Default)]
pub(super) struct Readiness {
    /// View and ring by epoch.
    views: BTreeMap<Epoch, (View, Ring)>,
}

impl Readiness {
    /// Remembers `view` (and builds its ring) unless it is known already or older than
    /// `finished`, the last epoch this server finished (it would never be asked about).
    pub(super) fn learn(&mut self, view: &View, finished: Epoch) {
        if view.epoch < finished || self.views.contains_key(&view.epoch) {
            return;
        }
        self.views
            .insert(view.epoch, (view.clone(), Ring::new(view)));
        while self.views.len() > MAX_VIEWS {
            self.views.pop_first();
        }
    }

    /// Forgets the views older than `finished` (this server finished that epoch: the chain
    /// starts there from now on).
    pub(super) fn prune(&mut self, finished: Epoch) {
        self.views = self.views.split_off(&finished);
    }

    /// Forgets every view (a rejoin under a fresh id: nothing is vouched for any more).
    pub(super) fn reset(&mut self) {
        self.views.clear();
    }

    /// True if `me` may serve `key` in the view of epoch `current`, having finished epoch
    /// `finished`: the current epoch is finished, or `me` is a replica of `key` in every view
    /// from `finished` to `current` (all of them known).
    pub(super) fn is_ready(
        &self,
        me: ServerId,
        key: &str,
        finished: Epoch,
        current: Epoch,
    ) -> bool {
        if finished >= current {
            return true;
        }
        if finished == Epoch(0) {
            return false; // nothing finished yet under this id
        }
        (finished.0..=current.0).all(|epoch| {
            self.views.get(&Epoch(epoch)).is_some_and(|(view, ring)| {
                ring.replicas(key, view.replicas as usize)
                    .iter()
                    .any(|m| m.id == me)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::view::Member;

    /// A view at `epoch` of servers `ids` (2 replicas, 8 ring points each).
    fn view(epoch: u64, ids: &[u128]) -> View {
        View {
            epoch: Epoch(epoch),
            members: ids
                .iter()
                .map(|&id| Member {
                    id: ServerId(id),
                    addr: format!("127.0.0.1:{}", 38000 + id).parse().unwrap(),
                })
                .collect(),
            replicas: 2,
            vnodes: 8,
        }
    }

    /// The first key (of `key-0`, `key-1`, ...) for which `wanted` holds.
    fn key_where(wanted: impl Fn(&str) -> bool) -> String {
        (0..10_000)
            .map(|i| format!("key-{i}"))
            .find(|k| wanted(k))
            .expect("some key qualifies")
    }

    /// True if server `id` is a replica of `key` in `view`.
    fn replica(view: &View, key: &str, id: u128) -> bool {
        crate::placement::ring::replicas(view, key)
            .iter()
            .any(|m| m.id == ServerId(id))
    }

    /// Issue 17: after a join, a key that stayed on this server is ready at once; one that
    /// moved to it is not, until the epoch is finished; a key it is no replica of is not.
    #[test]
    fn a_key_that_stayed_is_ready_and_one_that_moved_in_is_not() {
        let (before, after) = (view(4, &[1, 2, 3]), view(5, &[1, 2, 3, 4]));
        let mut r = Readiness::default();
        r.learn(&before, Epoch(4));
        r.learn(&after, Epoch(4));
        let stayed = key_where(|k| replica(&before, k, 1) && replica(&after, k, 1));
        // Server 4 is new: every key it is a replica of moved to it.
        let moved_in = key_where(|k| replica(&after, k, 4));
        assert!(r.is_ready(ServerId(1), &stayed, Epoch(4), Epoch(5)));
        assert!(!r.is_ready(ServerId(4), &moved_in, Epoch(4), Epoch(5)));
        let elsewhere = key_where(|k| !replica(&after, k, 1));
        assert!(!r.is_ready(ServerId(1), &elsewhere, Epoch(4), Epoch(5)));
        // Once epoch 5 is finished, everything is.
        assert!(r.is_ready(ServerId(4), &moved_in, Epoch(5), Epoch(5)));
    }

    /// A key that left this server in an intermediate view and came back is not ready (it
    /// may have been dropped, and writes in between did not reach it); neither is any key
    /// when a view in the chain is missing, nor before anything was finished.
    #[test]
    fn a_key_that_left_and_came_back_or_a_gap_is_not_ready() {
        let (a, b, c) = (view(2, &[1, 2]), view(3, &[1, 2, 3]), view(4, &[1, 2]));
        let key = key_where(|k| replica(&b, k, 3) && !replica(&b, k, 1));
        assert!(replica(&a, &key, 1) && replica(&c, &key, 1));
        let mut r = Readiness::default();
        for v in [&a, &b, &c] {
            r.learn(v, Epoch(2));
        }
        assert!(!r.is_ready(ServerId(1), &key, Epoch(2), Epoch(4)));
        let stayed = key_where(|k| [&a, &b, &c].iter().all(|v| replica(v, k, 1)));
        assert!(r.is_ready(ServerId(1), &stayed, Epoch(2), Epoch(4)));
        let mut gap = Readiness::default();
        gap.learn(&a, Epoch(2));
        gap.learn(&c, Epoch(2));
        assert!(!gap.is_ready(ServerId(1), &stayed, Epoch(2), Epoch(4)));
        assert!(!r.is_ready(ServerId(1), &stayed, Epoch(0), Epoch(4)));
    }

    /// Pruning at a finished epoch keeps the chain from there; a reset forgets it.
    #[test]
    fn prune_keeps_the_chain_from_the_finished_epoch_and_reset_forgets_it() {
        let (a, b, c) = (
            view(2, &[1, 2]),
            view(3, &[1, 2, 3]),
            view(4, &[1, 2, 3, 4]),
        );
        let mut r = Readiness::default();
        for v in [&a, &b, &c] {
            r.learn(v, Epoch(2));
        }
        r.prune(Epoch(3));
        let stayed = key_where(|k| replica(&b, k, 1) && replica(&c, k, 1));
        assert!(r.is_ready(ServerId(1), &stayed, Epoch(3), Epoch(4)));
        assert!(
            !r.is_ready(ServerId(1), &stayed, Epoch(2), Epoch(4)),
            "epoch 2 is gone"
        );
        r.reset();
        assert!(!r.is_ready(ServerId(1), &stayed, Epoch(3), Epoch(4)));
    }
}
