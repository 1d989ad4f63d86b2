//! One storage node: its bucket, its heartbeats, and its raw commands.
//!
//! [`Server`] is a sans-IO [`Node`]. It heartbeats the view leader every interval and learns
//! the current epoch and view from each acknowledgement. Without a view leader address to
//! start with, it probes its candidates (the `--viewleader` list, else the default ports) and
//! takes the lowest one that answers; it then follows the leader of the view-leader group
//! that the answers name, and looks again among its candidates when the one it heartbeats
//! stops answering (see `membership`). If the view leader
//! refuses a heartbeat (this server was declared dead), the server rejoins under a fresh id
//! and keeps its bucket as candidates ([`Stored::candidate`]): unserved until the next
//! rebalancing has reconciled them with the key's current holders. It serves `print`, `set`, `get` and `query_all_keys` on its own
//! bucket, takes part in two-phase commits as a participant ([`crate::txn::participant`]), and serves
//! replicated reads, holding back a read of a key with a prepared write until it is decided.
//!
//! # Parts
//!
//! The server is split by job, one sibling file per part, each owning its state and its
//! own `reset` on a rejoin; [`Server`] composes them and `serve` dispatches each request
//! to them:
//!
//! - `membership`: id, view leader (following the group's leader), view and ring,
//!   heartbeats, discovery;
//! - `bucket`: the stored keys ([`Stored`]), raw commands, candidates;
//! - `replication`: the participant table and its glue (held-back reads, commits the primary
//!   passes on);
//! - `rebalancing`: transfers toward a new view, the anchor, `sent` and `finished`;
//! - `refusals`: what was refused, counted and logged ([`Refusals`]).
//!
//! # Who may ask, and how much
//!
//! Server-to-server requests that write or settle (`Transfer`, `QueryTx`) are served only
//! when they come from the address of a server in this server's current view; anyone else
//! (or a server of a view not learned yet, which asks again) is refused with `rebalancing`.
//! Commits for a transaction this server does not know change nothing and are answered
//! `not_found`. What an outsider can make a server hold is bounded: pending transactions
//! ([`crate::txn::participant::PENDING_MAX`], [`crate::txn::participant::PENDING_BYTES_MAX`]), remembered
//! outcomes ([`crate::txn::participant::DECIDED_MAX`], [`crate::txn::participant::UNSEEN_ABORTS_MAX`]), reads held
//! back ([`MAX_DEFERRED_READS`]) and commits still settling ([`MAX_SETTLING`]). Every
//! refusal is counted in [`Refusals`] and logged at most once a second per kind. The bucket
//! itself is not bounded: it is the data.

mod bucket;
mod membership;
mod readiness;
mod rebalancing;
mod refusals;
mod replication;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::reliable::{IncomingId, RequestError};
use crate::runtime::node::{Action, Node};
use crate::txn::participant::{CommitRefusal, PrepareArgs, PrepareContext, QueryArgs, VoteNo};
use crate::util::rng::Rng;
use crate::wire::message::{self, ErrorKind, OpError, Request, Response};

use crate::placement::view::{Epoch, ServerId};
pub use crate::txn::participant::MAX_SETTLING;
pub use bucket::Stored;
pub use refusals::Refusals;
pub use replication::MAX_DEFERRED_READS;

use bucket::Bucket;
use membership::{Heard, Membership};
use readiness::Readiness;
use rebalancing::Rebalancing;
use refusals::RefusalCounter;
use replication::{Read, Replication};

/// Settings of a server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The address others reach this server at (carried in heartbeats).
    pub advertise: SocketAddr,
    /// The view leader to heartbeat from the start, or `None` to probe `candidates` first.
    pub viewleader: Option<SocketAddr>,
    /// Time between heartbeats.
    pub heartbeat_interval: Duration,
    /// Where to look for a view leader: when none is given, and again whenever the one in
    /// use stops answering (`viewleader` is tried too; with nothing else to try, heartbeats
    /// simply go on to the same address).
    pub candidates: Vec<SocketAddr>,
}

/// What a request this server started is for. It travels as the node token of the request
/// (its kind in the top byte, its number below) and is matched when the outcome comes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reply {
    /// A probe of candidate view leader number `.0` (an index into the candidates).
    Probe(usize),
    /// Heartbeat number `.0`.
    Heartbeat(u64),
    /// Rebalancing transfer number `.0` (its key in [`Rebalance::in_flight`]).
    Transfer(u64),
    /// The primary's commit number `.0` to another replica (its key in `settle_requests`).
    Settle(u64),
    /// The termination query the participant table numbered `.0`.
    Query(u64),
}

impl Reply {
    /// Bits of the token below the kind.
    const NUMBER_BITS: u32 = 56;

    /// The node token that carries this reply's kind and number.
    fn token(self) -> u64 {
        let (kind, number) = match self {
            Reply::Probe(index) => (1, index as u64),
            Reply::Heartbeat(seq) => (2, seq),
            Reply::Transfer(seq) => (3, seq),
            Reply::Settle(seq) => (4, seq),
            Reply::Query(token) => (5, token),
        };
        debug_assert!(
            number < 1 << Self::NUMBER_BITS,
            "{self:?} overflows its token"
        );
        (kind << Self::NUMBER_BITS) | number
    }

    /// The reply a token stands for (`None` for a token this server never handed out).
    fn from_token(token: u64) -> Option<Reply> {
        let number = token & ((1 << Self::NUMBER_BITS) - 1);
        match token >> Self::NUMBER_BITS {
            1 => usize::try_from(number).ok().map(Reply::Probe),
            2 => Some(Reply::Heartbeat(number)),
            3 => Some(Reply::Transfer(number)),
            4 => Some(Reply::Settle(number)),
            5 => Some(Reply::Query(number)),
            _ => None,
        }
    }
}

/// The server's state machine: its parts, and the actions they queued.
#[derive(Debug)]
pub struct Server {
    /// Id, view leader, view and ring, heartbeats, discovery.
    membership: Membership,
    /// The stored keys.
    bucket: Bucket,
    /// The participant table and its glue.
    replication: Replication,
    /// Transfers toward the newest view, and the progress reported.
    rebalancing: Rebalancing,
    /// The views since the last finished epoch: which keys stayed ours (see [`readiness`]).
    readiness: Readiness,
    /// What was refused, by kind.
    refusals: RefusalCounter,
    /// Requests from a client ahead of this server's view, held until the view is learned.
    ahead: VecDeque<Ahead>,
    /// Actions waiting for [`Node::poll_action`].
    actions: VecDeque<Action>,
}

/// A `getr` or `prepare` stamped with an epoch this server has not learned yet: the client
/// heard of the new view first (it asked the view leader before the push reached us). It is
/// held until the view arrives (a heartbeat goes out at once) and then served as if it had
/// just come, or refused as `rebalancing` at `until`.
#[derive(Debug)]
struct Ahead {
    /// When it is refused if the view has not come.
    until: Instant,
    /// Its sender.
    from: SocketAddr,
    /// Its id, to answer.
    id: IncomingId,
    /// The request.
    request: Request,
}

/// The most requests held for a view not learned yet ([`Ahead`]); beyond, they are refused.
pub const MAX_AHEAD: usize = 1024;

impl Server {
    /// Creates a server with a fresh id drawn from `rng`; its first heartbeat (or discovery)
    /// goes out at `now`.
    pub fn new(config: ServerConfig, rng: Rng, now: Instant) -> Server {
        Server {
            membership: Membership::new(config, rng, now),
            bucket: Bucket::default(),
            replication: Replication::default(),
            rebalancing: Rebalancing::new(),
            readiness: Readiness::default(),
            refusals: RefusalCounter::default(),
            ahead: VecDeque::new(),
            actions: VecDeque::new(),
        }
    }

    /// What this server refused so far, by kind (see [`Refusals`]).
    pub fn refusals(&self) -> &Refusals {
        self.refusals.counts()
    }

    /// The server's current id.
    pub fn id(&self) -> ServerId {
        self.membership.id()
    }

    /// The epoch of the last view learned (0 before any).
    pub fn epoch(&self) -> Epoch {
        self.membership.epoch()
    }

    /// Number of keys in the bucket.
    pub fn len(&self) -> usize {
        self.bucket.len()
    }

    /// True when the bucket is empty.
    pub fn is_empty(&self) -> bool {
        self.bucket.is_empty()
    }

    /// The bucket's keys and values, in key order (for checks from outside, such as the
    /// simulator's invariants).
    pub fn bucket(&self) -> impl Iterator<Item = (&str, &Stored)> {
        self.bucket.iter()
    }

    /// Transactions this server voted yes on and has no decision for (each locks its key).
    pub fn pending_transactions(&self) -> usize {
        self.replication.pending_count()
    }

    /// True while this server has not finished rebalancing for the epoch it knows.
    pub fn is_rebalancing(&self) -> bool {
        self.rebalancing.is_rebalancing(self.epoch())
    }

    /// True if this server may serve `key` in the view it knows: it finished that epoch, or
    /// it stayed a replica of `key` in every view since the last epoch it finished (see
    /// [`readiness`]).
    pub fn is_ready(&self, key: &str) -> bool {
        self.readiness.is_ready(
            self.membership.id(),
            key,
            self.rebalancing.finished(),
            self.epoch(),
        )
    }

    /// Holds at `now` a `getr` or `prepare` from a client at an epoch newer than ours (see
    /// [`Ahead`]) for about one heartbeat interval, asking the view leader at once; returns
    /// the request if it is to be served now. Beyond [`MAX_AHEAD`] held, it is served now
    /// (and so refused).
    fn hold_if_ahead(
        &mut self,
        now: Instant,
        from: SocketAddr,
        id: IncomingId,
        request: Request,
    ) -> Option<Request> {
        let epoch = match &request {
            Request::GetR { epoch, .. } | Request::Prepare { epoch, .. } => *epoch,
            _ => return Some(request),
        };
        if epoch <= self.epoch() || self.ahead.len() >= MAX_AHEAD {
            return Some(request);
        }
        if self.ahead.is_empty() {
            self.membership.heartbeat_now(
                now,
                self.rebalancing.finished(),
                self.rebalancing.sent(),
                &mut self.actions,
            );
        }
        let interval = self.membership.config.heartbeat_interval;
        self.ahead.push_back(Ahead {
            until: now + interval.max(Duration::from_millis(100)),
            from,
            id,
            request,
        });
        None
    }

    /// Serves at `now` the held requests (see [`Ahead`]) whose epoch this server has
    /// learned, and those whose time ran out (refused as `rebalancing` by `serve`).
    fn release_ahead(&mut self, now: Instant) {
        if self.ahead.is_empty() {
            return;
        }
        let epoch = self.epoch();
        let (due, kept): (VecDeque<Ahead>, VecDeque<Ahead>) =
            std::mem::take(&mut self.ahead).into_iter().partition(|a| {
                a.until <= now
                    || matches!(&a.request,
                        Request::GetR { epoch: e, .. } | Request::Prepare { epoch: e, .. }
                            if *e <= epoch)
            });
        self.ahead = kept;
        for Ahead {
            from, id, request, ..
        } in due
        {
            if let Some(response) = self.serve(now, from, id, request) {
                self.actions.push_back(Action::Respond { id, response });
            }
        }
    }

    /// True if this server is one of `key`'s replicas in the view it knows.
    fn is_replica(&self, key: &str) -> bool {
        let me = self.membership.id();
        self.membership
            .replicas(key)
            .is_some_and(|r| r.iter().any(|m| m.id == me))
    }

    /// Handles at `now` the answer to heartbeat number `seq`: a view learned is passed to
    /// the parts that follow it; a refusal meant for the current id is a rejoin.
    fn on_heartbeat_answer(
        &mut self,
        now: Instant,
        seq: u64,
        result: Result<Response, RequestError>,
    ) {
        let old = self.epoch();
        let heard = self.membership.on_heartbeat_answer(now, seq, result);
        self.on_heard(now, old, heard);
    }

    /// Acts at `now` on what a heartbeat's answer or a view push told (`heard`; the epoch
    /// known before was `old`): the views learned go to readiness; reads held back on keys
    /// no longer ready here are refused (the others are answered in the new view as soon as
    /// their write is decided); rebalancing starts, or drops what a delivered epoch allows. A
    /// refusal meant for the current id is a rejoin.
    fn on_heard(&mut self, now: Instant, old: Epoch, heard: Option<Heard>) {
        match heard {
            Some(Heard::View {
                completed,
                delivered,
                recent,
            }) => {
                let finished = self.rebalancing.finished();
                for view in recent.iter().chain(self.membership.view()) {
                    self.readiness.learn(view, finished);
                }
                if self.epoch() != old {
                    let epoch = self.epoch();
                    let refusal = Response::error(
                        ErrorKind::Rebalancing,
                        format!(
                            "the view changed from epoch {old} to {epoch} while this read was \
                             held back, and its key is not settled here in the new view"
                        ),
                    );
                    let (me, readiness) = (self.membership.id(), &self.readiness);
                    let membership = &self.membership;
                    let unsettled = |key: &str| {
                        !readiness.is_ready(me, key, finished, epoch)
                            || !membership
                                .replicas(key)
                                .is_some_and(|r| r.iter().any(|m| m.id == me))
                    };
                    self.replication
                        .refuse_held_where(unsettled, &refusal, &mut self.actions);
                }
                self.replication.prune_settling(
                    self.membership.view(),
                    &self.bucket,
                    &mut self.actions,
                );
                if let Some(view) = self.membership.view() {
                    let me = self.membership.id();
                    self.replication
                        .on_view(now, me, view, &mut self.bucket, &mut self.actions);
                }
                self.rebalancing.on_completed(completed);
                self.rebalancing.maybe_rebalance(
                    now,
                    &self.replication.pending_txids(),
                    &mut self.membership,
                    &mut self.bucket,
                    &mut self.actions,
                );
                self.rebalancing.on_delivered(
                    now,
                    delivered,
                    &mut self.membership,
                    &mut self.bucket,
                );
                self.readiness.prune(self.rebalancing.finished());
                self.release_ahead(now);
            }
            Some(Heard::Refused(epoch)) => self.rejoin(now, epoch),
            None => {}
        }
    }

    /// Declared dead by the view leader at `epoch`: every part resets for a fresh id (the
    /// refusal counts only grow), and the first heartbeat under it goes out at once.
    fn rejoin(&mut self, now: Instant, epoch: Epoch) {
        let old = self.membership.reset();
        warn!(
            "declared dead by the view leader (epoch {epoch}): keeping the bucket's {} keys \
             as candidates until rebalancing reconciles them, and rejoining as {} (was {old})",
            self.bucket.len(),
            self.membership.id()
        );
        // Never wipe: the view leader may have declared us dead for its own stall, a cut or
        // a pause, and we may hold the last copy of a key. What we hold is no longer served
        // or counted as a copy until the next rebalancing has reconciled it with the key's
        // current holders.
        self.bucket.reset();
        self.rebalancing.reset();
        self.readiness.reset();
        let refusal = Response::error(
            ErrorKind::Rebalancing,
            format!("this server left the view at epoch {epoch}"),
        );
        self.replication.reset(&refusal, &mut self.actions);
        self.membership.heartbeat_now(
            now,
            self.rebalancing.finished(),
            self.rebalancing.sent(),
            &mut self.actions,
        );
    }

    /// Serves one request (`id`, from `from`) at `now`, returning the answer (`None` when
    /// the answer is held back).
    fn serve(
        &mut self,
        now: Instant,
        from: SocketAddr,
        id: IncomingId,
        request: Request,
    ) -> Option<Response> {
        let response = match request {
            Request::Print { text } => {
                info!("print from {from}: {text}");
                Response::Done
            }
            Request::Set { key, value } => {
                if let Err(e) = message::check_key(&key).and_then(|()| message::check_value(&value))
                {
                    return Some(Response::Error(e));
                }
                self.bucket.set_raw(key, value);
                Response::Done
            }
            Request::Get { key } => self.bucket.get_raw(&key),
            Request::QueryAllKeys => self.bucket.query_all_keys(),
            Request::Prepare {
                txid,
                key,
                value,
                epoch,
                expected,
                participants,
                timeout_ms,
            } => self.serve_prepare(
                now,
                PrepareArgs {
                    txid,
                    key,
                    value,
                    epoch,
                    expected,
                    participants,
                    timeout: Duration::from_millis(u64::from(timeout_ms)),
                },
            ),
            Request::Commit { txid, version } => {
                let me = self.membership.id();
                let committed = self.replication.commit(
                    now,
                    me,
                    txid,
                    version,
                    &mut self.bucket,
                    &mut self.actions,
                );
                match committed {
                    Ok(()) => Response::Done,
                    Err(refusal) => {
                        if refusal == CommitRefusal::Unknown {
                            self.refusals.count_unknown(now, from, true, txid);
                        }
                        replication::commit_refused(txid, &refusal)
                    }
                }
            }
            Request::Abort { txid } => {
                if !self
                    .replication
                    .abort(now, txid, &self.bucket, &mut self.actions)
                {
                    self.refusals.count_unknown(now, from, false, txid);
                }
                Response::Done
            }
            Request::QueryTx {
                txid,
                key,
                expected,
                primary,
                close,
            } => {
                if let Err(refusal) = self.check_member(now, from, "termination query") {
                    return Some(Response::Error(refusal));
                }
                let args = QueryArgs {
                    txid,
                    expected,
                    primary,
                    close,
                };
                let me = self.membership.id();
                let state =
                    self.replication
                        .query(now, me, &args, &key, &self.bucket, &mut self.actions);
                Response::TxState { state }
            }
            Request::Transfer { epoch, entries } => {
                // Only a server of our view may write into the bucket this way. One of a newer
                // view we have not learned yet is refused too: its sender tries again.
                if let Err(refusal) = self.check_member(now, from, "transfer") {
                    return Some(Response::Error(refusal));
                }
                // A transfer planned for an epoch this server has left behind (delayed, or
                // from a plan its sender abandoned) may carry keys that are no longer ours,
                // arriving after our drops for the newer epoch: it would stay here for good.
                // The sender plans again for the newer epoch from what it holds.
                if epoch < self.epoch() {
                    return Some(Response::error(
                        ErrorKind::Rebalancing,
                        format!(
                            "a transfer for epoch {epoch}, but this server is at epoch {}",
                            self.epoch()
                        ),
                    ));
                }
                self.rebalancing.receive(entries, &mut self.bucket);
                Response::Done
            }
            Request::GetR { key, epoch } => {
                // A client ahead of us knows a view we have not learned yet (the key may
                // have moved here in it): it asks again, or another replica. A client
                // behind us is served if we are the key's ready replica in our view: the
                // key's latest committed version is here whatever the client's view said.
                if epoch > self.epoch() {
                    return Some(Response::error(
                        ErrorKind::Rebalancing,
                        format!("replica at epoch {}, client at {epoch}", self.epoch()),
                    ));
                }
                if !self.is_replica(&key) {
                    return Some(Response::error(
                        ErrorKind::Rebalancing,
                        format!(
                            "this server is not a replica of key {key:?} in epoch {} (the \
                             client's view is epoch {epoch})",
                            self.epoch()
                        ),
                    ));
                }
                if !self.is_ready(&key) {
                    return Some(Response::error(
                        ErrorKind::Rebalancing,
                        not_settled(&key, self.epoch()),
                    ));
                }
                match self.replication.read(key.clone(), id, &self.bucket) {
                    Read::Answer(response) => response,
                    Read::Held => return None,
                    Read::Full => {
                        let reason = replication::deferred_full_reason();
                        self.refusals.count_deferred_full(now, from, &key, &reason);
                        Response::error(ErrorKind::Aborted, reason)
                    }
                }
            }
            Request::ViewPush {
                view,
                completed,
                delivered,
                recent,
            } => {
                let old = self.epoch();
                match self
                    .membership
                    .on_push(from, view, completed, delivered, recent)
                {
                    Ok(heard) => {
                        self.on_heard(now, old, heard);
                        Response::Done
                    }
                    Err(reason) => {
                        self.refusals.count_not_a_member(now, "view push", &reason);
                        Response::error(ErrorKind::BadInput, reason)
                    }
                }
            }
            other => Response::error(
                ErrorKind::BadInput,
                format!(
                    "{} is not served by a server; ask the view leader",
                    other.name()
                ),
            ),
        };
        Some(response)
    }

    /// Votes at `now` on a prepare (`args`): the key and value are checked at the edge
    /// (`bad_input`), every other check is the participant's, against what the parts know.
    /// Returns the vote: `prepared`, or `aborted` naming the reason (a no forced by a bound
    /// is counted).
    fn serve_prepare(&mut self, now: Instant, args: PrepareArgs) -> Response {
        if let Err(e) =
            message::check_key(&args.key).and_then(|()| message::check_value(&args.value))
        {
            return Response::Error(e);
        }
        let ctx = PrepareContext {
            me: self.membership.id(),
            epoch: self.epoch(),
            ready: self.is_ready(&args.key),
            replicas: self.membership.replicas(&args.key),
            settling: self.replication.settling_count(),
        };
        let current = self.bucket.version(&args.key);
        match self.replication.prepare(now, &ctx, args, current) {
            Ok(version) => Response::Prepared { version },
            Err(no) => {
                let reason = no.to_string();
                if no.is_bound() {
                    self.refusals.count_pending_full(now, &reason);
                }
                // A key not settled here yet is refused as the contract says (`rebalancing`:
                // the caller may wait for it), and so is a prepare from a view this server
                // has not learned yet (the key is not settled here in that view); every
                // other no is an abort.
                let kind = match no {
                    VoteNo::Rebalancing { .. } => ErrorKind::Rebalancing,
                    VoteNo::EpochMismatch { theirs, ours } if theirs > ours => {
                        ErrorKind::Rebalancing
                    }
                    _ => ErrorKind::Aborted,
                };
                Response::error(kind, reason)
            }
        }
    }

    /// Checks that `from` is the address of a server in our current view, for a
    /// server-to-server request (`what`, for the message). A refusal is counted, logged (rate
    /// limited) and returned as the answer: kind `rebalancing`, since the sender may simply be
    /// in a view we have not learned yet (it asks again).
    fn check_member(&mut self, now: Instant, from: SocketAddr, what: &str) -> Result<(), OpError> {
        if self.membership.is_member_addr(from) {
            return Ok(());
        }
        let reason = format!("refused: {from} is not a server in view {}", self.epoch());
        self.refusals.count_not_a_member(now, what, &reason);
        Err(OpError {
            kind: ErrorKind::Rebalancing,
            message: reason,
            cycle: Vec::new(),
        })
    }

    /// Starts at `now` a rebalancing that waited for undecided transactions, once none is
    /// left.
    fn resume_rebalance(&mut self, now: Instant) {
        if !self.rebalancing.is_waiting() {
            return;
        }
        self.rebalancing.resume(
            now,
            &self.replication.pending_txids(),
            &mut self.membership,
            &mut self.bucket,
            &mut self.actions,
        );
    }
}

impl Node for Server {
    /// Serves a raw storage request.
    fn handle_request(&mut self, now: Instant, from: SocketAddr, id: IncomingId, request: Request) {
        let request = match self.hold_if_ahead(now, from, id, request) {
            Some(request) => request,
            None => return,
        };
        if let Some(response) = self.serve(now, from, id, request) {
            self.actions.push_back(Action::Respond { id, response });
        }
        self.resume_rebalance(now);
    }

    /// Routes the answer to a request this server started by its reply token.
    fn handle_response(
        &mut self,
        now: Instant,
        token: u64,
        result: Result<Response, RequestError>,
    ) {
        match Reply::from_token(token) {
            Some(Reply::Query(query)) => self.replication.handle_query_answer(
                now,
                query,
                result,
                self.membership.view(),
                &mut self.bucket,
                &mut self.actions,
            ),
            Some(Reply::Settle(seq)) => self.replication.on_settle_answer(
                now,
                seq,
                result,
                self.membership.view(),
                &self.bucket,
                &mut self.actions,
            ),
            Some(Reply::Transfer(seq)) => self.rebalancing.on_transfer_answer(
                now,
                seq,
                result,
                &mut self.membership,
                &mut self.bucket,
                &mut self.actions,
            ),
            Some(Reply::Heartbeat(seq)) => self.on_heartbeat_answer(now, seq, result),
            Some(Reply::Probe(index)) => {
                if self.membership.on_probe(now, index, result).is_some() {
                    self.membership.heartbeat_now(
                        now,
                        self.rebalancing.finished(),
                        self.rebalancing.sent(),
                        &mut self.actions,
                    );
                }
            }
            None => debug!("an answer for token {token}, which this server never handed out"),
        }
        self.resume_rebalance(now);
    }

    /// Sends what is due: rebalancing batches, the participant's timers, and the next
    /// heartbeat (or discovery round).
    fn handle_timeout(&mut self, now: Instant) {
        self.release_ahead(now);
        self.rebalancing.pump_transfers(
            now,
            &mut self.membership,
            &mut self.bucket,
            &mut self.actions,
        );
        let me = self.membership.id();
        if self.replication.handle_timeout(
            now,
            me,
            self.membership.view(),
            &mut self.bucket,
            &mut self.actions,
        ) {
            self.resume_rebalance(now);
        }
        self.membership.handle_timeout(
            now,
            self.rebalancing.finished(),
            self.rebalancing.sent(),
            &mut self.actions,
        );
    }

    /// The earliest of: the next heartbeat (unless a discovery round is waiting for its
    /// probes), the participant's next timer, the next batch to send again, and the
    /// expiry of the oldest request held for a view not learned yet.
    fn poll_timeout(&self) -> Option<Instant> {
        [
            self.membership.poll_timeout(),
            self.replication.poll_timeout(),
            self.rebalancing.poll_timeout(),
            self.ahead.iter().map(|a| a.until).min(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Hands out the next action.
    fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }
}

/// The refusal of a replicated request on `key`, not settled at this replica in `epoch` yet.
fn not_settled(key: &str, epoch: Epoch) -> String {
    format!("key {key:?} is not settled at this replica in epoch {epoch} yet (rebalancing)")
}
