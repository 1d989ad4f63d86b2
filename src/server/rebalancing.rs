//! Rebalancing: bringing the bucket to the newest view.
//!
//! For each new epoch the server plans (from the view leader's anchor, the newest delivered
//! view) which keys go to which new replica, sends them in batches (one in flight per
//! destination), and once all are acknowledged drops the keys it no longer needs and reports
//! the epoch `sent`. When the view leader says every server's sends were acknowledged
//! (`delivered`), it drops the leftovers, reconciles its candidates, and reports the epoch
//! `finished`. A rebalancing waits for the transactions prepared before the new view arrived
//! to be decided; transactions prepared since (on keys settled here in the new view) do not
//! hold it back, so the wait ends under any load.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{debug, info};

use crate::placement::rebalance;
use crate::placement::view::{Epoch, View};
use crate::reliable::RequestError;
use crate::runtime::node::Action;
use crate::wire::message::{Entry, Request, Response, TxId};

use super::Reply;
use super::bucket::Bucket;
use super::membership::Membership;

/// The most value bytes in one rebalancing batch (the reliable layer fragments it).
const BATCH_BYTES: usize = 1 << 20;
/// How long one rebalancing batch may take before it is sent again.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before sending a failed batch again (its target may be dead: a new view will say).
const TRANSFER_RETRY: Duration = Duration::from_millis(200);

/// One server's rebalancing toward one epoch: the batches still to send, those in flight,
/// and what to do once all are acknowledged.
#[derive(Debug)]
struct Rebalance {
    /// The epoch this brings the server to.
    epoch: Epoch,
    /// Batches not yet sent (or to send again), with the instant they may go.
    queue: VecDeque<(Instant, SocketAddr, Vec<Entry>)>,
    /// Batches in flight, by transfer number ([`Reply::Transfer`]).
    in_flight: BTreeMap<u64, (SocketAddr, Vec<Entry>)>,
    /// Keys to drop once everything is acknowledged.
    drops: Vec<String>,
    /// Stray keys that stop being strays once everything is acknowledged.
    settles: Vec<String>,
    /// When it started.
    started: Instant,
    /// Keys and bytes to send, and the number of destination servers (for the log).
    totals: (usize, usize, usize),
}

/// Rebalancing state: the anchor, the progress reported to the view leader, and the
/// rebalancing in progress.
#[derive(Debug)]
pub(super) struct Rebalancing {
    /// The anchor of rebalancing the view leader published (the newest delivered view).
    completed: Option<View>,
    /// The last epoch this server finished rebalancing for (sends acknowledged, drops done).
    finished: Epoch,
    /// The last epoch all of whose sends from this server were acknowledged.
    sent: Epoch,
    /// The rebalancing in progress, if any.
    rebalance: Option<Rebalance>,
    /// A new view waits for these transactions (undecided when it arrived) before its
    /// rebalancing starts (empty: not waiting).
    waiting: BTreeSet<TxId>,
    /// The newest epoch whose undecided transactions were noted in `waiting`.
    waited_for: Epoch,
    /// The last transfer token handed out.
    pub(super) last_transfer: u64,
    /// Keys and bytes received by transfers since the last finished rebalance.
    received: (usize, usize),
}

impl Rebalancing {
    /// Nothing learned, nothing rebalanced.
    pub(super) fn new() -> Rebalancing {
        Rebalancing {
            completed: None,
            finished: Epoch(0),
            sent: Epoch(0),
            rebalance: None,
            waiting: BTreeSet::new(),
            waited_for: Epoch(0),
            last_transfer: 0,
            received: (0, 0),
        }
    }

    /// Rejoin (declared dead): abandons the rebalancing in progress and reports nothing
    /// finished or sent under the new id. The anchor is kept (it is the view leader's), and
    /// transfer numbers keep growing (late answers to old ones are ignored).
    pub(super) fn reset(&mut self) {
        self.rebalance = None;
        self.waiting.clear();
        self.finished = Epoch(0);
        self.sent = Epoch(0);
    }

    /// The last epoch finished here (reported in heartbeats).
    pub(super) fn finished(&self) -> Epoch {
        self.finished
    }

    /// The last epoch whose sends from here were all acknowledged (reported in heartbeats).
    pub(super) fn sent(&self) -> Epoch {
        self.sent
    }

    /// True while a new view waits for transactions undecided when it arrived.
    pub(super) fn is_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// True while this server has not finished rebalancing for `epoch` (the one it knows).
    pub(super) fn is_rebalancing(&self, epoch: Epoch) -> bool {
        self.finished < epoch
    }

    /// When the next failed batch may be sent again, if one waits.
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.rebalance
            .as_ref()
            .and_then(|r| r.queue.iter().map(|(at, ..)| *at).min())
    }

    /// Learns the view leader's anchor (the newest delivered view), kept if newer. An anchor
    /// older than ours means the view leader lost its memory (it restarted) or the answer was
    /// overtaken: ours may then differ from the other servers' (some drop copies on an anchor
    /// others never learned), so no anchor vouches for anything any more and plans fall back
    /// to the empty anchor: every holder sends each key to every new replica until the view
    /// leader delivers a view again.
    pub(super) fn on_completed(&mut self, completed: View) {
        match &self.completed {
            Some(mine) if completed.epoch < mine.epoch && !mine.members.is_empty() => {
                info!(
                    "the view leader's rebalancing anchor (epoch {}) is older than mine (epoch \
                     {}): planning from no anchor until it delivers a view",
                    completed.epoch, mine.epoch
                );
                self.completed = Some(View {
                    members: Vec::new(),
                    ..completed
                });
            }
            Some(mine) if completed.epoch <= mine.epoch => {}
            _ => self.completed = Some(completed),
        }
    }

    /// Learns at `now` that every server had its sends for `delivered` acknowledged: every
    /// copy of the epoch is where it belongs, so the keys of `bucket` kept only in case a
    /// sender failed (this server is not their replica in `membership`'s view) are dropped,
    /// the candidates are reconciled, and the epoch is finished here (reported at once).
    pub(super) fn on_delivered(
        &mut self,
        now: Instant,
        delivered: Epoch,
        membership: &mut Membership,
        bucket: &mut Bucket,
    ) {
        let epoch = membership.epoch();
        if delivered < epoch || self.sent < epoch || self.finished >= epoch {
            return;
        }
        let Some(view) = membership.view() else {
            return;
        };
        let leftovers = rebalance::leftovers(membership.id(), view, bucket.held());
        if !leftovers.is_empty() {
            info!(
                "epoch {epoch} delivered: dropping {} keys no longer mine",
                leftovers.len()
            );
        }
        for key in leftovers {
            bucket.remove(&key);
        }
        let count = view.replicas as usize;
        let (kept, dropped) =
            bucket.reconcile_candidates(membership.ring(), count, membership.id());
        if kept + dropped > 0 {
            info!(
                "epoch {epoch} delivered: {kept} candidate keys reconciled and served again, \
                 {dropped} dropped as misplaced"
            );
        }
        self.finished = epoch;
        // Report it at once rather than at the next interval.
        membership.report_now(now);
    }

    /// Starts at `now` rebalancing `bucket` toward `membership`'s newest view if this server
    /// has not done so yet, unless transactions undecided when the view arrived (`pending`
    /// are those undecided now) must be decided first. Batches go out into `actions`.
    pub(super) fn maybe_rebalance(
        &mut self,
        now: Instant,
        pending: &BTreeSet<TxId>,
        membership: &mut Membership,
        bucket: &mut Bucket,
        actions: &mut VecDeque<Action>,
    ) {
        let (Some(view), Some(completed)) = (membership.view(), &self.completed) else {
            return;
        };
        if view.epoch <= self.sent
            || self
                .rebalance
                .as_ref()
                .is_some_and(|r| r.epoch == view.epoch)
        {
            return;
        }
        // A transaction prepared under the old view may still commit: its write must be in
        // the bucket before the keys are copied to their new replicas (and before the old
        // copies are dropped), or it would reach only the old ones. Only those undecided
        // when the view arrived are waited for: a prepare accepted since was judged against
        // the new view (its key settled here, its participants the key's new replicas, each
        // of which settled too), so no copy of its key is still to be made, and the wait
        // ends with the last old decision however busy the key space is.
        if self.waited_for < view.epoch {
            self.waited_for = view.epoch;
            self.waiting = pending.clone();
            if !self.waiting.is_empty() {
                info!(
                    "epoch {}: rebalancing waits for {} undecided transactions",
                    view.epoch,
                    self.waiting.len()
                );
            }
        }
        self.waiting.retain(|txid| pending.contains(txid));
        if !self.waiting.is_empty() {
            return;
        }
        if let Some(abandoned) = &self.rebalance {
            info!(
                "epoch {} arrived before rebalancing for {} finished; planning again",
                view.epoch, abandoned.epoch
            );
        }
        let plan = rebalance::plan(membership.id(), completed, view, bucket.held());
        let mut queue = VecDeque::new();
        let (mut keys, mut bytes) = (0, 0);
        for (target, keys_for_target) in plan.sends.values() {
            let mut batch = Vec::new();
            let mut batch_bytes = 0;
            for key in keys_for_target {
                let Some(stored) = bucket.get(key) else {
                    continue;
                };
                let size = key.len() + stored.value.len();
                if !batch.is_empty() && batch_bytes + size > BATCH_BYTES {
                    queue.push_back((now, *target, std::mem::take(&mut batch)));
                    batch_bytes = 0;
                }
                batch_bytes += size;
                keys += 1;
                bytes += size;
                batch.push(Entry {
                    key: key.clone(),
                    value: stored.value.clone(),
                    version: stored.version,
                    txid: stored.txid,
                });
            }
            if !batch.is_empty() {
                queue.push_back((now, *target, batch));
            }
        }
        debug!(
            "epoch {}: sending {keys} keys ({bytes} bytes) to {} servers",
            view.epoch,
            plan.sends.len()
        );
        self.rebalance = Some(Rebalance {
            epoch: view.epoch,
            queue,
            in_flight: BTreeMap::new(),
            drops: plan.drop_after_sending,
            settles: plan.settle_after_sending,
            started: now,
            totals: (keys, bytes, plan.sends.len()),
        });
        self.pump_transfers(now, membership, bucket, actions);
    }

    /// Starts at `now` a rebalancing that waited for undecided transactions, once none of
    /// them is among the `pending` ones any more.
    pub(super) fn resume(
        &mut self,
        now: Instant,
        pending: &BTreeSet<TxId>,
        membership: &mut Membership,
        bucket: &mut Bucket,
        actions: &mut VecDeque<Action>,
    ) {
        if !self.waiting.is_empty() && self.waiting.iter().all(|t| !pending.contains(t)) {
            self.waiting.clear();
            self.maybe_rebalance(now, pending, membership, bucket, actions);
        }
    }

    /// Sends into `actions` the queued batches that are due at `now` (one in flight per
    /// destination at a time, so a destination's window stays full without flooding it);
    /// finishes when all are acknowledged.
    pub(super) fn pump_transfers(
        &mut self,
        now: Instant,
        membership: &mut Membership,
        bucket: &mut Bucket,
        actions: &mut VecDeque<Action>,
    ) {
        let Some(rebalance) = &mut self.rebalance else {
            return;
        };
        let mut busy: Vec<SocketAddr> = rebalance.in_flight.values().map(|(t, _)| *t).collect();
        let mut waiting = VecDeque::new();
        while let Some((at, target, batch)) = rebalance.queue.pop_front() {
            if at > now || busy.contains(&target) {
                waiting.push_back((at, target, batch));
                continue;
            }
            self.last_transfer += 1;
            let seq = self.last_transfer;
            busy.push(target);
            actions.push_back(Action::Request {
                token: Reply::Transfer(seq).token(),
                dst: target,
                request: Request::Transfer {
                    epoch: rebalance.epoch,
                    entries: batch.clone(),
                },
                deadline: Some(now + TRANSFER_TIMEOUT),
            });
            rebalance.in_flight.insert(seq, (target, batch));
        }
        rebalance.queue = waiting;
        if rebalance.queue.is_empty() && rebalance.in_flight.is_empty() {
            self.finish(now, membership, bucket);
        }
    }

    /// Handles at `now` the answer to transfer number `seq`: acknowledged, or queued to be
    /// sent again; then sends what is due.
    pub(super) fn on_transfer_answer(
        &mut self,
        now: Instant,
        seq: u64,
        result: Result<Response, RequestError>,
        membership: &mut Membership,
        bucket: &mut Bucket,
        actions: &mut VecDeque<Action>,
    ) {
        let Some(rebalance) = &mut self.rebalance else {
            return;
        };
        let Some((target, batch)) = rebalance.in_flight.remove(&seq) else {
            return;
        };
        if !matches!(result, Ok(Response::Done)) {
            debug!("a transfer to {target} failed ({result:?}); sending it again");
            rebalance
                .queue
                .push_back((now + TRANSFER_RETRY, target, batch));
        }
        self.pump_transfers(now, membership, bucket, actions);
    }

    /// Every send is acknowledged (at `now`): drops from `bucket` the keys no longer ours,
    /// settles the strays sent, and reports the epoch sent at once.
    fn finish(&mut self, now: Instant, membership: &mut Membership, bucket: &mut Bucket) {
        let Some(rebalance) = self.rebalance.take() else {
            return;
        };
        for key in &rebalance.drops {
            bucket.remove(key);
        }
        for key in &rebalance.settles {
            bucket.unstray(key);
        }
        self.sent = rebalance.epoch;
        // Report it at once rather than at the next interval.
        membership.report_now(now);
        let (keys, bytes, servers) = rebalance.totals;
        let (got_keys, got_bytes) = std::mem::take(&mut self.received);
        info!(
            "rebalanced for epoch {} in {} ms: sent {keys} keys ({bytes} bytes) to {servers} servers, \
             received {got_keys} keys ({got_bytes} bytes), dropped {} keys",
            rebalance.epoch,
            now.saturating_duration_since(rebalance.started).as_millis(),
            rebalance.drops.len()
        );
    }

    /// Stores the keys of a transfer in `bucket` (the higher version of each wins), counting
    /// them for the log.
    pub(super) fn receive(&mut self, entries: Vec<Entry>, bucket: &mut Bucket) {
        let (keys, bytes) = bucket.receive(entries);
        self.received.0 += keys;
        self.received.1 += bytes;
    }
}
