//! The server's side of replicated writes and reads: the two-phase-commit participant table
//! ([`crate::txn::participant`]) and the glue around it.
//!
//! The glue carries out what the participant decides on the bucket (a committed write is
//! applied, a released key's held-back reads are answered), holds replicated reads of a key
//! while a prepared write or a commit still settling could change it ([`DeferredReads`]), and,
//! as the primary of a committed key, passes the commit on to the other replicas itself
//! ([`Settling`]): the coordinator does too, but may have died.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use crate::placement::view::{Member, ServerId, View};
use crate::reliable::{IncomingId, RequestError};
use crate::runtime::node::Action;
use crate::txn::participant::{
    CommitRefusal, Effect, Participant, PrepareArgs, PrepareContext, QueryArgs, VoteNo,
};
use crate::wire::message::{ErrorKind, Request, Response, TxId, TxOutcome};

use super::Reply;
use super::bucket::Bucket;

/// The most replicated reads held back waiting for a decision, in all; more are refused.
pub const MAX_DEFERRED_READS: usize = 10_000;
/// How long one of the primary's commits to another replica may take before it is sent again.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a termination query may take.
const QUERY_TIMEOUT: Duration = Duration::from_millis(400);

/// Replicated reads held back until the prepared (or settling) write on their key is
/// decided, with their number in all kept beside them: the count changes only in
/// [`DeferredReads::push`] and the `take` methods, which check it against the map.
#[derive(Debug, Default)]
pub(super) struct DeferredReads {
    /// The reads waiting, by key.
    by_key: BTreeMap<String, Vec<IncomingId>>,
    /// How many reads `by_key` holds in all (checked against the bound on every read).
    count: usize,
}

impl DeferredReads {
    /// How many reads are held back in all.
    pub(super) fn len(&self) -> usize {
        self.count
    }

    /// Holds back read `id` of `key`.
    pub(super) fn push(&mut self, key: String, id: IncomingId) {
        self.by_key.entry(key).or_default().push(id);
        self.count += 1;
        self.check();
    }

    /// Takes every read held back on `key` (none if there is none).
    pub(super) fn take(&mut self, key: &str) -> Vec<IncomingId> {
        let waiting = self.by_key.remove(key).unwrap_or_default();
        self.count -= waiting.len();
        self.check();
        waiting
    }

    /// Takes every read held back on a key for which `pick` is true.
    pub(super) fn take_where(&mut self, mut pick: impl FnMut(&str) -> bool) -> Vec<IncomingId> {
        let keys: Vec<String> = self.by_key.keys().filter(|k| pick(k)).cloned().collect();
        let mut waiting = Vec::new();
        for key in keys {
            waiting.extend(self.by_key.remove(&key).unwrap_or_default());
        }
        self.count -= waiting.len();
        self.check();
        waiting
    }

    /// Ties the count to the truth (debug builds only).
    fn check(&self) {
        debug_assert_eq!(
            self.count,
            self.by_key.values().map(Vec::len).sum::<usize>(),
            "the count of deferred reads is the number of reads held back"
        );
    }
}

/// A write this server committed as the primary, not yet acknowledged by every other replica.
/// Until it is, the primary holds back reads of the key (new prepares are accepted: a newer
/// commit needs every replica's yes vote, so each has decided this one): a value only the
/// primary holds would be lost with the primary (the others, still prepared, would abort it),
/// so no read may see it before it is everywhere.
#[derive(Debug)]
struct Settling {
    /// The transaction.
    txid: TxId,
    /// The version committed.
    version: u64,
    /// The other replicas that have not acknowledged the commit.
    awaiting: Vec<Member>,
}

/// What became of a replicated read.
#[derive(Debug)]
pub(super) enum Read {
    /// Answered at once.
    Answer(Response),
    /// Held back until the key's pending write is decided.
    Held,
    /// Refused: [`MAX_DEFERRED_READS`] are held back already.
    Full,
}

/// Replication state: the participant table, the reads it holds back, and the commits this
/// server (as the primary) is passing on.
#[derive(Debug, Default)]
pub(super) struct Replication {
    /// The two-phase-commit participant table.
    participant: Participant,
    /// Replicated reads held back until the prepared write on their key is decided.
    deferred: DeferredReads,
    /// Keys whose last commit here (as the primary) other replicas have yet to acknowledge.
    settling: BTreeMap<String, Settling>,
    /// Outstanding commits to other replicas: token → (key, replica, transaction).
    settle_requests: BTreeMap<u64, (String, Member, TxId)>,
    /// The last settle token handed out.
    last_settle: u64,
}

impl Replication {
    /// Rejoin (declared dead): transactions prepared under the old id can no longer commit
    /// here, so the table starts empty and nothing settles; reads held back are refused with
    /// `refusal` (into `actions`): a server that left the view serves nothing until it has
    /// rejoined and reconciled. Settle tokens keep growing (late answers are ignored).
    pub(super) fn reset(&mut self, refusal: &Response, actions: &mut VecDeque<Action>) {
        self.participant = Participant::new();
        self.settling.clear();
        self.settle_requests.clear();
        self.refuse_held(refusal, actions);
    }

    /// Refuses every read held back with `refusal` (into `actions`).
    pub(super) fn refuse_held(&mut self, refusal: &Response, actions: &mut VecDeque<Action>) {
        self.refuse_held_where(|_| true, refusal, actions);
    }

    /// Refuses with `refusal` (into `actions`) the reads held back on the keys for which
    /// `unsettled` is true. After a view change a held read may be answered only if this
    /// server is still ready for its key (it stayed a replica in every view since): a key
    /// that moved away may be dropped here and an answer from this bucket could miss a
    /// write the new replicas have, so its reader asks the view again.
    pub(super) fn refuse_held_where(
        &mut self,
        unsettled: impl FnMut(&str) -> bool,
        refusal: &Response,
        actions: &mut VecDeque<Action>,
    ) {
        for id in self.deferred.take_where(unsettled) {
            actions.push_back(Action::Respond {
                id,
                response: refusal.clone(),
            });
        }
    }

    /// Transactions voted yes on and undecided (each locks its key).
    pub(super) fn pending_count(&self) -> usize {
        self.participant.pending_count()
    }

    /// The transactions voted yes on and undecided.
    pub(super) fn pending_txids(&self) -> BTreeSet<TxId> {
        self.participant.pending_txids().collect()
    }

    /// Keys whose commit this server, as the primary, is still passing on.
    pub(super) fn settling_count(&self) -> usize {
        self.settling.len()
    }

    /// The earliest instant at which the participant table has work.
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.participant.poll_timeout()
    }

    /// True while a read of `key` must wait: a prepared write locks it, or its commit is
    /// still settling.
    fn is_held(&self, key: &str) -> bool {
        self.participant.is_locked(key) || self.settling.contains_key(key)
    }

    /// Votes at `now` on a prepare (`args`) judged against `ctx`, `current` being the
    /// bucket's version of the key: `Ok` with that version for a yes, or why not.
    pub(super) fn prepare(
        &mut self,
        now: Instant,
        ctx: &PrepareContext,
        args: PrepareArgs,
        current: Option<u64>,
    ) -> Result<Option<u64>, VoteNo> {
        self.participant.prepare(now, ctx, args, current)
    }

    /// The coordinator's (or the primary's) commit of `txid` at `version`, at `now`: applies
    /// the write to `bucket`, starts passing it on if `me` is the primary, and answers the
    /// key's held-back reads (into `actions`). A duplicate is `Ok` and changes nothing.
    pub(super) fn commit(
        &mut self,
        now: Instant,
        me: ServerId,
        txid: TxId,
        version: u64,
        bucket: &mut Bucket,
        actions: &mut VecDeque<Action>,
    ) -> Result<(), CommitRefusal> {
        let Some(write) = self.participant.commit(now, txid, version)? else {
            return Ok(());
        };
        let key = write.key.clone();
        let participants = write.participants.clone();
        bucket.apply(write);
        self.start_settling(now, me, txid, version, &key, participants, actions);
        self.answer_deferred(&key, bucket, actions);
        Ok(())
    }

    /// The coordinator's abort of `txid` at `now`: releases its key (answering the reads held
    /// on it into `actions`). Returns false if the transaction was not known here (it is
    /// recorded anyway, so a late prepare is refused).
    pub(super) fn abort(
        &mut self,
        now: Instant,
        txid: TxId,
        bucket: &Bucket,
        actions: &mut VecDeque<Action>,
    ) -> bool {
        let known = self.participant.knows(txid);
        if let Some(key) = self.participant.abort(now, txid) {
            self.answer_deferred(&key, bucket, actions);
        }
        known
    }

    /// Answers at `now` a termination query (`args`) about a transaction on `key` to `me`,
    /// from the participant table or else `bucket`'s last transaction on the key; a key it
    /// releases has its reads answered (into `actions`).
    pub(super) fn query(
        &mut self,
        now: Instant,
        me: ServerId,
        args: &QueryArgs,
        key: &str,
        bucket: &Bucket,
        actions: &mut VecDeque<Action>,
    ) -> TxOutcome {
        let last = bucket.last_committed(key);
        let (state, released) = self.participant.query(now, me, args, last);
        if let Some(key) = released {
            self.answer_deferred(&key, bucket, actions);
        }
        state
    }

    /// A replicated read `id` of `key` (epoch and rebalancing already checked): answered
    /// from `bucket` at once, or held back while the key has a pending write (never answered
    /// with the old value), or refused beyond [`MAX_DEFERRED_READS`].
    pub(super) fn read(&mut self, key: String, id: IncomingId, bucket: &Bucket) -> Read {
        if !self.is_held(&key) {
            return Read::Answer(bucket.read(&key));
        }
        if self.deferred.len() >= MAX_DEFERRED_READS {
            return Read::Full;
        }
        self.deferred.push(key, id);
        Read::Held
    }

    /// Runs the participant's due timers at `now` (`me`, `view`: our id and view), carrying
    /// out their effects. Returns true if any were due.
    pub(super) fn handle_timeout(
        &mut self,
        now: Instant,
        me: ServerId,
        view: Option<&View>,
        bucket: &mut Bucket,
        actions: &mut VecDeque<Action>,
    ) -> bool {
        if self.participant.poll_timeout().is_none_or(|t| t > now) {
            return false;
        }
        let effects = self.participant.handle_timeout(now, me, view);
        self.carry_out(now, effects, bucket, actions);
        true
    }

    /// Learns at `now` the view `view` (this server is `me`): transactions whose primary
    /// left it start their termination round at once (see `Participant::on_view`), and what
    /// that round sends goes into `actions`.
    pub(super) fn on_view(
        &mut self,
        now: Instant,
        me: ServerId,
        view: &View,
        bucket: &mut Bucket,
        actions: &mut VecDeque<Action>,
    ) {
        if self.participant.on_view(now, view) {
            self.handle_timeout(now, me, Some(view), bucket, actions);
        }
    }

    /// Hands the answer to termination query `query` (a `TxState`, or anything else: no
    /// information) to the participant at `now` and carries out what it decides.
    pub(super) fn handle_query_answer(
        &mut self,
        now: Instant,
        query: u64,
        result: Result<Response, RequestError>,
        view: Option<&View>,
        bucket: &mut Bucket,
        actions: &mut VecDeque<Action>,
    ) {
        let answer = match result {
            Ok(Response::TxState { state }) => Some(state),
            _ => None,
        };
        let effects = self
            .participant
            .handle_query_answer(now, query, answer, view);
        self.carry_out(now, effects, bucket, actions);
    }

    /// Carries out at `now` what the participant asked for: writes applied to `bucket`,
    /// reads answered and termination queries sent (into `actions`).
    fn carry_out(
        &mut self,
        now: Instant,
        effects: Vec<Effect>,
        bucket: &mut Bucket,
        actions: &mut VecDeque<Action>,
    ) {
        for effect in effects {
            match effect {
                Effect::Apply(write) => {
                    let key = write.key.clone();
                    bucket.apply(write);
                    self.answer_deferred(&key, bucket, actions);
                }
                Effect::Release(key) => {
                    self.answer_deferred(&key, bucket, actions);
                }
                Effect::Query { token, dst, query } => actions.push_back(Action::Request {
                    token: Reply::Query(token).token(),
                    dst,
                    request: query,
                    deadline: Some(now + QUERY_TIMEOUT),
                }),
            }
        }
    }

    /// Answers (into `actions`, from `bucket`) every replicated read held back on `key`,
    /// unless a pending write or a settling commit still holds it.
    fn answer_deferred(&mut self, key: &str, bucket: &Bucket, actions: &mut VecDeque<Action>) {
        if self.is_held(key) {
            return;
        }
        let waiting = self.deferred.take(key);
        if waiting.is_empty() {
            return;
        }
        let response = bucket.read(key);
        for id in waiting {
            actions.push_back(Action::Respond {
                id,
                response: response.clone(),
            });
        }
    }

    /// After committing `txid` on `key` at `version` (at `now`): if `me` is the primary
    /// (first of `participants`), sends the commit to the other replicas itself (the
    /// coordinator does too, but may have died) and holds back reads of the key until every
    /// one of them acknowledged (see [`Settling`]).
    #[allow(clippy::too_many_arguments)]
    fn start_settling(
        &mut self,
        now: Instant,
        me: ServerId,
        txid: TxId,
        version: u64,
        key: &str,
        participants: Vec<Member>,
        actions: &mut VecDeque<Action>,
    ) {
        if participants.first().is_none_or(|m| m.id != me) {
            return;
        }
        let awaiting: Vec<Member> = participants.into_iter().filter(|m| m.id != me).collect();
        if awaiting.is_empty() {
            return;
        }
        let key = key.to_owned();
        for member in &awaiting {
            self.send_settle(now, &key, *member, txid, version, actions);
        }
        self.settling.insert(
            key,
            Settling {
                txid,
                version,
                awaiting,
            },
        );
    }

    /// Sends (into `actions`, at `now`) the commit of `txid` at `version` (on `key`) to
    /// `member`.
    fn send_settle(
        &mut self,
        now: Instant,
        key: &str,
        member: Member,
        txid: TxId,
        version: u64,
        actions: &mut VecDeque<Action>,
    ) {
        self.last_settle += 1;
        self.settle_requests
            .insert(self.last_settle, (key.to_owned(), member, txid));
        actions.push_back(Action::Request {
            token: Reply::Settle(self.last_settle).token(),
            dst: member.addr,
            request: Request::Commit { txid, version },
            deadline: Some(now + SETTLE_TIMEOUT),
        });
    }

    /// A replica answered the primary's commit number `seq` (any answer means it has
    /// decided: it committed, or it was closed by its peers); no answer in time means: send
    /// it again (at `now`), unless the replica is gone (unreachable, or out of `view`).
    pub(super) fn on_settle_answer(
        &mut self,
        now: Instant,
        seq: u64,
        result: Result<Response, RequestError>,
        view: Option<&View>,
        bucket: &Bucket,
        actions: &mut VecDeque<Action>,
    ) {
        let Some((key, member, txid)) = self.settle_requests.remove(&seq) else {
            return;
        };
        // A newer commit of the key may have replaced this one (every replica voted for it,
        // so each had decided this one): only answers about the current one count.
        let Some(settling) = self.settling.get(&key).filter(|s| s.txid == txid) else {
            return;
        };
        let in_view = view.is_some_and(|v| v.contains(member.id));
        if matches!(result, Err(RequestError::Timeout { .. })) && in_view {
            let (txid, version) = (settling.txid, settling.version);
            self.send_settle(now, &key, member, txid, version, actions);
            return;
        }
        self.settled_at(&key, member.id, bucket, actions);
    }

    /// Notes that replica `id` has the commit of `key` (or is gone); once every replica has,
    /// the key's reads are answered again (from `bucket`, into `actions`).
    fn settled_at(
        &mut self,
        key: &str,
        id: ServerId,
        bucket: &Bucket,
        actions: &mut VecDeque<Action>,
    ) {
        let Some(settling) = self.settling.get_mut(key) else {
            return;
        };
        settling.awaiting.retain(|m| m.id != id);
        if settling.awaiting.is_empty() {
            self.settling.remove(key);
            self.answer_deferred(key, bucket, actions);
        }
    }

    /// Stops waiting for replicas that left `view` (their copies are gone with them).
    pub(super) fn prune_settling(
        &mut self,
        view: Option<&View>,
        bucket: &Bucket,
        actions: &mut VecDeque<Action>,
    ) {
        let Some(view) = view else { return };
        let gone: Vec<(String, ServerId)> = self
            .settling
            .iter()
            .flat_map(|(key, s)| {
                s.awaiting
                    .iter()
                    .filter(|m| !view.contains(m.id))
                    .map(move |m| (key.clone(), m.id))
            })
            .collect();
        for (key, id) in gone {
            self.settled_at(&key, id, bucket, actions);
        }
    }
}

/// The answer to a refused replicated read: kind `aborted`, naming the bound.
pub(super) fn deferred_full_reason() -> String {
    format!("too many reads are waiting for pending commits here (at most {MAX_DEFERRED_READS})")
}

/// The answer for a commit `refusal` of transaction `txid`.
pub(super) fn commit_refused(txid: TxId, refusal: &CommitRefusal) -> Response {
    match refusal {
        CommitRefusal::Aborted => Response::error(
            ErrorKind::Aborted,
            format!("transaction {txid} was already aborted here"),
        ),
        CommitRefusal::Closed => Response::error(
            ErrorKind::Aborted,
            format!(
                "transaction {txid} is being settled by its participants: \
                 its primary left the view"
            ),
        ),
        CommitRefusal::Unknown => Response::error(
            ErrorKind::NotFound,
            format!(
                "commit refused: transaction {txid} is not known here (never \
                 prepared, or decided and forgotten); nothing changed"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read number `n` of one client.
    fn read(n: u64) -> IncomingId {
        IncomingId {
            incarnation: 1,
            request: n,
        }
    }

    /// Issue 15 (derived state): the count of held-back reads follows every push and take.
    #[test]
    fn deferred_reads_count_what_they_hold() {
        let mut deferred = DeferredReads::default();
        deferred.push("a".into(), read(1));
        deferred.push("a".into(), read(2));
        deferred.push("b".into(), read(3));
        assert_eq!(deferred.len(), 3);
        assert_eq!(deferred.take("a"), vec![read(1), read(2)]);
        assert_eq!(deferred.len(), 1);
        assert!(deferred.take("a").is_empty());
        assert_eq!(deferred.take_where(|_| true), vec![read(3)]);
        assert_eq!(deferred.len(), 0);
    }
}
