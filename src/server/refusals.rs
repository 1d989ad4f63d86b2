//! What a server refused, counted by kind and logged at most once a second per kind.
//!
//! The counts only grow: a rejoin does not reset them (they describe the process, not the
//! id it serves under).

use std::net::SocketAddr;
use std::time::Instant;

use log::{debug, warn};

use crate::util::ratelimit::LogLimiter;
use crate::wire::message::TxId;

/// What a server refused because the sender had no right to ask, or because a bound was
/// reached. The counts only grow; each kind is also logged, at most once a second.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Refusals {
    /// Transfers and termination queries from an address that is no server of our view.
    pub not_a_member: u64,
    /// Commits for a transaction this server does not know (nothing changed).
    pub unknown_commits: u64,
    /// Aborts for a transaction never prepared here (only recorded, so a late prepare is
    /// refused; bounded by [`crate::txn::participant::UNSEEN_ABORTS_MAX`]).
    pub unknown_aborts: u64,
    /// Prepares voted down because [`crate::txn::participant::PENDING_MAX`] transactions (or
    /// [`crate::txn::participant::PENDING_BYTES_MAX`] bytes) are pending, or
    /// [`super::MAX_SETTLING`] keys settle.
    pub pending_full: u64,
    /// Replicated reads refused because [`super::MAX_DEFERRED_READS`] are held back.
    pub deferred_full: u64,
}

/// One rate limiter per kind of refusal, so a flood of one kind never hides another.
#[derive(Debug, Default)]
struct RefusalLogs {
    /// Transfers and queries from non-members.
    not_a_member: LogLimiter,
    /// Commits and aborts for unknown transactions.
    unknown: LogLimiter,
    /// Prepares voted down by a bound.
    pending_full: LogLimiter,
    /// Reads refused by a bound.
    deferred_full: LogLimiter,
}

/// The refusal counts and their log limiters: every refusal goes through one of its
/// `count_*` methods, which counts it and logs it (rate limited).
#[derive(Debug, Default)]
pub(super) struct RefusalCounter {
    /// The counts, by kind.
    counts: Refusals,
    /// Rate limits of the log lines, by kind.
    logs: RefusalLogs,
}

impl RefusalCounter {
    /// The counts so far (see [`Refusals`]).
    pub(super) fn counts(&self) -> &Refusals {
        &self.counts
    }

    /// Counts a server-to-server request (`what`) refused at `now` because `from` is no
    /// server of our view; `reason` is the answer's message, logged at debug level.
    pub(super) fn count_not_a_member(&mut self, now: Instant, what: &str, reason: &str) {
        self.counts.not_a_member += 1;
        if let Some(held_back) = self.logs.not_a_member.allow(now) {
            debug!(
                "{what} {reason} ({} such refusals, {held_back} not logged)",
                self.counts.not_a_member
            );
        }
    }

    /// Counts a prepare voted down at `now` by a bound (`reason`, the vote's message) and
    /// logs it.
    pub(super) fn count_pending_full(&mut self, now: Instant, reason: &str) {
        self.counts.pending_full += 1;
        if let Some(held_back) = self.logs.pending_full.allow(now) {
            warn!(
                "voted no: {reason} ({} such votes, {held_back} not logged)",
                self.counts.pending_full
            );
        }
    }

    /// Counts a commit (`is_commit`) or an abort from `from` for transaction `txid`, which
    /// this server does not know, and logs it at debug level.
    pub(super) fn count_unknown(
        &mut self,
        now: Instant,
        from: SocketAddr,
        is_commit: bool,
        txid: TxId,
    ) {
        let what = if is_commit {
            self.counts.unknown_commits += 1;
            "commit"
        } else {
            self.counts.unknown_aborts += 1;
            "abort"
        };
        if let Some(held_back) = self.logs.unknown.allow(now) {
            debug!(
                "{what} from {from} for transaction {txid}, unknown here ({} commits and {} \
                 aborts so far, {held_back} not logged)",
                self.counts.unknown_commits, self.counts.unknown_aborts
            );
        }
    }

    /// Counts a replicated read of `key` from `from` refused at `now` because too many reads
    /// are held back (`reason`, the answer's message), and logs it.
    pub(super) fn count_deferred_full(
        &mut self,
        now: Instant,
        from: SocketAddr,
        key: &str,
        reason: &str,
    ) {
        self.counts.deferred_full += 1;
        if let Some(held_back) = self.logs.deferred_full.allow(now) {
            warn!(
                "refused a getr of {key:?} from {from}: {reason} \
                 ({} such refusals, {held_back} not logged)",
                self.counts.deferred_full
            );
        }
    }
}
