//! One storage node: its bucket, its heartbeats, and its raw commands.
//!
//! [`Server`] is a sans-IO [`Node`]. It heartbeats the view leader every interval and learns
//! the current epoch and view from each acknowledgement. If no view leader address was given
//! it probes the default ports and takes the lowest one that answers. If the view leader
//! refuses a heartbeat (this server was declared dead), the server rejoins under a fresh id
//! and keeps its bucket as candidates ([`Stored::candidate`]): unserved until the next
//! rebalancing has reconciled them with the key's current holders. It serves `print`, `set`, `get` and `query_all_keys` on its own
//! bucket, takes part in two-phase commits as a participant ([`crate::txn::participant`]), and serves
//! replicated reads, holding back a read of a key with a prepared write until it is decided.
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

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::placement::rebalance::{self, Held};
use crate::placement::ring::Ring;
use crate::placement::view::{Epoch, Member, ServerId, View};
use crate::reliable::{IncomingId, RequestError};
use crate::runtime::node::{Action, Node};
use crate::txn::participant::{
    CommitRefusal, Effect, Participant, PrepareArgs, QueryArgs, VoteNo, Write,
};
use crate::util::ratelimit::LogLimiter;
use crate::util::rng::Rng;
use crate::wire::message::{self, Entry, ErrorKind, Request, Response, TxId};

/// Settings of a server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The address others reach this server at (carried in heartbeats).
    pub advertise: SocketAddr,
    /// The view leader, or `None` to probe the default ports.
    pub viewleader: Option<SocketAddr>,
    /// Time between heartbeats.
    pub heartbeat_interval: Duration,
    /// Where to look for a view leader when none is given.
    pub candidates: Vec<SocketAddr>,
}

/// One stored value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// Orders writes to the same key; raw `set` writes use version 0.
    pub version: u64,
    /// The value.
    pub value: String,
    /// The transaction that wrote it (`None` for a raw `set`): lets the primary answer a
    /// termination query about a commit it no longer remembers.
    pub txid: Option<TxId>,
    /// Written by a raw `set` and not yet sent to the key's replicas (rebalancing sends it).
    pub stray: bool,
    /// Kept from before this server was declared dead (it rejoined under a fresh id): not
    /// served, not listed and not counted as a copy until rebalancing has reconciled it with
    /// the key's current holders (the higher version wins), or dropped as stale or misplaced.
    pub candidate: bool,
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
/// The most value bytes in one rebalancing batch (the reliable layer fragments it).
const BATCH_BYTES: usize = 1 << 20;
/// How long one rebalancing batch may take before it is sent again.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before sending a failed batch again (its target may be dead: a new view will say).
const TRANSFER_RETRY: Duration = Duration::from_millis(200);
/// How long one of the primary's commits to another replica may take before it is sent again.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a termination query may take.
const QUERY_TIMEOUT: Duration = Duration::from_millis(400);
/// The most replicated reads held back waiting for a decision, in all; more are refused.
pub const MAX_DEFERRED_READS: usize = 10_000;
/// The most keys whose commit this server (as the primary) is still passing on to the other
/// replicas. A prepare that would make this server the primary of one more is voted down
/// beyond it (so at most this many plus [`crate::txn::participant::PENDING_MAX`] ever settle at once).
pub const MAX_SETTLING: usize = 10_000;

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
    /// [`crate::txn::participant::PENDING_BYTES_MAX`] bytes) are pending, or [`MAX_SETTLING`] keys settle.
    pub pending_full: u64,
    /// Replicated reads refused because [`MAX_DEFERRED_READS`] are held back.
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
    /// Heartbeats the view leader answered with an error.
    heartbeat: LogLimiter,
}

/// A round of view leader probes in progress.
#[derive(Debug)]
struct Discovery {
    /// Outcome per candidate: `None` while waiting, `Some(true)` if it answered as a view leader.
    answers: Vec<Option<bool>>,
}

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

/// A write this server committed as the primary, not yet acknowledged by every other replica.
/// Until it is, the primary holds back reads of the key (new prepares are accepted: a newer
/// commit needs every replica's yes vote, so each has decided this one): a value only the primary holds would
/// be lost with the primary (the others, still prepared, would abort it), so no read may see
/// it before it is everywhere.
#[derive(Debug)]
struct Settling {
    /// The transaction.
    txid: TxId,
    /// The version committed.
    version: u64,
    /// The other replicas that have not acknowledged the commit.
    awaiting: Vec<Member>,
}

/// The server's state machine.
#[derive(Debug)]
pub struct Server {
    /// Settings.
    config: ServerConfig,
    /// The current id (fresh at start and at every rejoin).
    id: ServerId,
    /// Random source for ids.
    rng: Rng,
    /// The bucket.
    store: BTreeMap<String, Stored>,
    /// The view leader in use, once known.
    viewleader: Option<SocketAddr>,
    /// The last view learned from the view leader.
    view: Option<View>,
    /// The ring of that view (built once per view).
    ring: Ring,
    /// When the next heartbeat is due.
    next_heartbeat: Instant,
    /// Sequence number of the last heartbeat sent ([`Reply::Heartbeat`]).
    heartbeat_seq: u64,
    /// The first heartbeat sequence number sent under the current id: a refusal of an
    /// earlier heartbeat concerns an id already abandoned.
    id_since_seq: u64,
    /// A discovery round in progress.
    discovery: Option<Discovery>,
    /// The two-phase-commit participant table.
    participant: Participant,
    /// Replicated reads held back until the prepared write on their key is decided.
    deferred: BTreeMap<String, Vec<IncomingId>>,
    /// How many reads `deferred` holds in all (checked against the bound on every read).
    deferred_count: usize,
    /// The anchor of rebalancing the view leader published (the newest delivered view).
    completed: Option<View>,
    /// The last epoch this server finished rebalancing for (sends acknowledged, drops done).
    finished: Epoch,
    /// The last epoch all of whose sends from this server were acknowledged.
    sent: Epoch,
    /// The rebalancing in progress, if any.
    rebalance: Option<Rebalance>,
    /// A new view is waiting for undecided transactions before its rebalancing starts.
    rebalance_deferred: bool,
    /// Keys whose last commit here (as the primary) other replicas have yet to acknowledge.
    settling: BTreeMap<String, Settling>,
    /// Outstanding commits to other replicas: token → (key, replica, transaction).
    settle_requests: BTreeMap<u64, (String, Member, TxId)>,
    /// The last settle token handed out.
    last_settle: u64,
    /// The last transfer token handed out.
    last_transfer: u64,
    /// Keys and bytes received by transfers since the last finished rebalance.
    received: (usize, usize),
    /// What was refused, by kind.
    refusals: Refusals,
    /// Rate limits of the refusals' log lines.
    refusal_logs: RefusalLogs,
    /// Actions waiting for [`Node::poll_action`].
    actions: VecDeque<Action>,
}

impl Server {
    /// Creates a server with a fresh id drawn from `rng`; its first heartbeat (or discovery)
    /// goes out at `now`.
    pub fn new(config: ServerConfig, mut rng: Rng, now: Instant) -> Server {
        let id = ServerId::random(&mut rng);
        let viewleader = config.viewleader;
        Server {
            config,
            id,
            rng,
            store: BTreeMap::new(),
            viewleader,
            view: None,
            ring: Ring::default(),
            next_heartbeat: now,
            heartbeat_seq: 0,
            id_since_seq: 1,
            discovery: None,
            participant: Participant::new(),
            deferred: BTreeMap::new(),
            deferred_count: 0,
            completed: None,
            finished: Epoch(0),
            sent: Epoch(0),
            rebalance: None,
            rebalance_deferred: false,
            settling: BTreeMap::new(),
            settle_requests: BTreeMap::new(),
            last_settle: 0,
            last_transfer: 0,
            received: (0, 0),
            refusals: Refusals::default(),
            refusal_logs: RefusalLogs::default(),
            actions: VecDeque::new(),
        }
    }

    /// What this server refused so far, by kind (see [`Refusals`]).
    pub fn refusals(&self) -> &Refusals {
        &self.refusals
    }

    /// The server's current id.
    pub fn id(&self) -> ServerId {
        self.id
    }

    /// The epoch of the last view learned (0 before any).
    pub fn epoch(&self) -> Epoch {
        self.view.as_ref().map_or(Epoch(0), |v| v.epoch)
    }

    /// Number of keys in the bucket.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    /// True when the bucket is empty.
    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    /// The bucket's keys and values, in key order (for checks from outside, such as the
    /// simulator's invariants).
    pub fn bucket(&self) -> impl Iterator<Item = (&str, &Stored)> {
        self.store
            .iter()
            .map(|(key, stored)| (key.as_str(), stored))
    }

    /// Transactions this server voted yes on and has no decision for (each locks its key).
    pub fn pending_transactions(&self) -> usize {
        self.participant.pending_count()
    }

    /// Sends a heartbeat to `viewleader`. Every interval gets its own heartbeat, bounded by
    /// the interval, so one heartbeat stuck in retransmission never delays the next.
    fn send_heartbeat(&mut self, now: Instant, viewleader: SocketAddr) {
        self.heartbeat_seq += 1;
        self.next_heartbeat = now + self.config.heartbeat_interval;
        let deadline = now
            + self
                .config
                .heartbeat_interval
                .max(Duration::from_millis(100));
        self.actions.push_back(Action::Request {
            token: Reply::Heartbeat(self.heartbeat_seq).token(),
            dst: viewleader,
            request: Request::Heartbeat {
                id: self.id,
                addr: self.config.advertise,
                finished: self.finished,
                sent: self.sent,
                epoch: self.epoch(),
            },
            deadline: Some(deadline),
        });
    }

    /// Starts a round of probes of every candidate view leader address.
    fn start_discovery(&mut self, now: Instant) {
        self.next_heartbeat = now + self.config.heartbeat_interval;
        let deadline = now
            + self
                .config
                .heartbeat_interval
                .max(Duration::from_millis(500));
        for (index, &dst) in self.config.candidates.iter().enumerate() {
            self.actions.push_back(Action::Request {
                token: Reply::Probe(index).token(),
                dst,
                request: Request::QueryServers,
                deadline: Some(deadline),
            });
        }
        self.discovery = Some(Discovery {
            answers: vec![None; self.config.candidates.len()],
        });
    }

    /// Records one probe outcome; once every candidate has answered or failed, adopts the
    /// first (lowest) one that answered as a view leader.
    fn on_probe(&mut self, now: Instant, index: usize, is_viewleader: bool) {
        let Some(discovery) = &mut self.discovery else {
            return;
        };
        let Some(slot) = discovery.answers.get_mut(index) else {
            return;
        };
        *slot = Some(is_viewleader);
        // The first candidate that answered wins once every earlier one has failed.
        for (i, answer) in discovery.answers.iter().enumerate() {
            match answer {
                None => return,
                Some(false) => continue,
                Some(true) => {
                    let found = self.config.candidates[i];
                    info!("found the view leader at {found}");
                    self.viewleader = Some(found);
                    self.discovery = None;
                    self.send_heartbeat(now, found);
                    return;
                }
            }
        }
        warn!(
            "no view leader answers on {} candidate addresses; retrying",
            discovery.answers.len()
        );
        self.discovery = None;
    }

    /// Handles the answer to heartbeat number `seq`.
    fn on_heartbeat_answer(
        &mut self,
        now: Instant,
        seq: u64,
        result: Result<Response, RequestError>,
    ) {
        match result {
            Ok(Response::HeartbeatAck {
                view,
                completed,
                delivered,
            }) => {
                let old = self.epoch();
                // Answers may arrive out of order: never step back to an older view.
                if self.view.is_some() && view.epoch < old {
                    return;
                }
                if view.epoch != old || self.view.is_none() {
                    self.ring = Ring::new(&view);
                }
                if view.epoch != old {
                    info!(
                        "epoch {old} -> {}: {} servers in view",
                        view.epoch,
                        view.members.len()
                    );
                }
                debug_assert!(
                    view.epoch >= self.epoch(),
                    "a server never steps back a view"
                );
                self.view = Some(view);
                self.prune_settling();
                self.on_completed(completed);
                self.maybe_rebalance(now);
                self.on_delivered(now, delivered);
            }
            Ok(Response::HeartbeatRefused { .. }) if seq < self.id_since_seq => {
                // A refusal of a heartbeat sent under an id already abandoned.
            }
            Ok(Response::HeartbeatRefused { view }) => {
                let old = self.id;
                self.id = ServerId::random(&mut self.rng);
                warn!(
                    "declared dead by the view leader (epoch {}): keeping the bucket's {} keys \
                     as candidates until rebalancing reconciles them, and rejoining as {} \
                     (was {old})",
                    view.epoch,
                    self.store.len(),
                    self.id
                );
                // Never wipe: the view leader may have declared us dead for its own stall, a
                // cut or a pause, and we may hold the last copy of a key. What we hold is no
                // longer served or counted as a copy until the next rebalancing has
                // reconciled it with the key's current holders.
                for stored in self.store.values_mut() {
                    stored.candidate = true;
                    stored.stray = false;
                }
                // The last view is kept (epochs never go backwards here); we are not in it.
                self.rebalance = None;
                self.rebalance_deferred = false;
                self.finished = Epoch(0);
                self.sent = Epoch(0);
                // Transactions prepared under the old id can no longer commit here.
                self.participant = Participant::new();
                self.settling.clear();
                self.settle_requests.clear();
                // Reads held back for a decision are refused: a server that left the view serves
                // nothing until it has rejoined and reconciled.
                let refusal = Response::error(
                    ErrorKind::Rebalancing,
                    format!("this server left the view at epoch {}", view.epoch),
                );
                for (_, waiting) in std::mem::take(&mut self.deferred) {
                    for id in waiting {
                        self.actions.push_back(Action::Respond {
                            id,
                            response: refusal.clone(),
                        });
                    }
                }
                self.deferred_count = 0;
                self.id_since_seq = self.heartbeat_seq + 1;
                if let Some(viewleader) = self.viewleader {
                    self.send_heartbeat(now, viewleader);
                }
            }
            Ok(Response::Error(e)) if e.kind == ErrorKind::Rebalancing => {
                // The view leader is gathering the servers that came back (it restarted, or
                // declared everyone dead): we stay as we are until it publishes the view.
                if let Some(held_back) = self.refusal_logs.heartbeat.allow(now) {
                    info!(
                        "the view leader holds heartbeat {seq} back: {} ({held_back} more not \
                         logged)",
                        e.message
                    );
                }
            }
            Ok(Response::Error(e)) => {
                if let Some(held_back) = self.refusal_logs.heartbeat.allow(now) {
                    warn!(
                        "the view leader refused heartbeat {seq}: {}: {} \
                         ({held_back} more refusals not logged)",
                        e.kind, e.message
                    );
                }
            }
            Ok(other) => warn!("unexpected answer to a heartbeat: {other:?}"),
            Err(RequestError::Timeout { .. }) => debug!("heartbeat {seq} got no answer in time"),
            Err(e) => warn!("heartbeat failed: {e}"),
        }
    }

    /// Serves one request, returning the answer (`None` when the answer is held back).
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
                self.store.insert(
                    key,
                    Stored {
                        version: 0,
                        value,
                        txid: None,
                        stray: true,
                        candidate: false,
                    },
                );
                Response::Done
            }
            Request::Get { key } => match self.committed(&key) {
                Some(stored) => Response::Value {
                    value: stored.value.clone(),
                },
                None => Response::error(
                    ErrorKind::NotFound,
                    format!("{key:?} is not in this bucket"),
                ),
            },
            Request::QueryAllKeys => Response::Keys {
                keys: self
                    .store
                    .iter()
                    .filter(|(_, stored)| !stored.candidate)
                    .map(|(key, _)| key.clone())
                    .collect(),
            },
            Request::Prepare {
                txid,
                key,
                value,
                epoch,
                expected,
                participants,
                timeout_ms,
            } => {
                if let Err(e) = message::check_key(&key).and_then(|()| message::check_value(&value))
                {
                    return Some(Response::Error(e));
                }
                // Identity and epoch first: they are the precise reasons a replica restarted
                // on the same address, or one behind on the view, votes no.
                if expected != self.id {
                    return Some(Response::error(
                        ErrorKind::Aborted,
                        format!(
                            "server id mismatch: expected {expected}, this is {}",
                            self.id
                        ),
                    ));
                }
                if epoch != self.epoch() {
                    return Some(Response::error(
                        ErrorKind::Aborted,
                        format!(
                            "epoch mismatch: the coordinator is at epoch {epoch}, this replica at {}",
                            self.epoch()
                        ),
                    ));
                }
                if self.is_rebalancing() {
                    return Some(Response::error(
                        ErrorKind::Aborted,
                        format!("this replica is rebalancing for epoch {}", self.epoch()),
                    ));
                }
                if let Err(reason) = self.check_participants(&key, &participants) {
                    return Some(Response::error(ErrorKind::Aborted, reason));
                }
                let primary = participants.first().is_some_and(|m| m.id == self.id);
                if primary && self.settling.len() >= MAX_SETTLING {
                    let reason = format!(
                        "too many commits are settling here ({} keys, at most {MAX_SETTLING})",
                        self.settling.len()
                    );
                    self.count_pending_full(now, &reason);
                    return Some(Response::error(ErrorKind::Aborted, reason));
                }
                let current = self.store.get(&key).map(|s| s.version);
                let timeout = Duration::from_millis(u64::from(timeout_ms));
                let args = PrepareArgs {
                    txid,
                    key,
                    value,
                    epoch,
                    expected,
                    participants,
                    timeout,
                };
                match self
                    .participant
                    .prepare(now, self.id, self.epoch(), args, current)
                {
                    Ok(version) => Response::Prepared { version },
                    Err(no @ VoteNo::Full { .. }) => {
                        let reason = no.to_string();
                        self.count_pending_full(now, &reason);
                        Response::error(ErrorKind::Aborted, reason)
                    }
                    Err(no) => Response::error(ErrorKind::Aborted, no.to_string()),
                }
            }
            Request::Commit { txid, version } => {
                match self.participant.commit(now, txid, version) {
                    Ok(Some(write)) => {
                        let key = write.key.clone();
                        let participants = write.participants.clone();
                        self.apply(write);
                        self.start_settling(now, txid, version, &key, participants);
                        self.answer_deferred(&key);
                        Response::Done
                    }
                    Ok(None) => Response::Done,
                    Err(CommitRefusal::Aborted) => Response::error(
                        ErrorKind::Aborted,
                        format!("transaction {txid} was already aborted here"),
                    ),
                    Err(CommitRefusal::Closed) => Response::error(
                        ErrorKind::Aborted,
                        format!(
                            "transaction {txid} is being settled by its participants: \
                             its primary left the view"
                        ),
                    ),
                    Err(CommitRefusal::Unknown) => {
                        self.refusals.unknown_commits += 1;
                        self.log_unknown(now, from, "commit", txid);
                        Response::error(
                            ErrorKind::NotFound,
                            format!(
                                "commit refused: transaction {txid} is not known here (never \
                                 prepared, or decided and forgotten); nothing changed"
                            ),
                        )
                    }
                }
            }
            Request::Abort { txid } => {
                if !self.participant.knows(txid) {
                    self.refusals.unknown_aborts += 1;
                    self.log_unknown(now, from, "abort", txid);
                }
                if let Some(key) = self.participant.abort(now, txid) {
                    self.answer_deferred(&key);
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
                    return Some(refusal);
                }
                let last = self
                    .store
                    .get(&key)
                    .and_then(|s| s.txid.map(|t| (t, s.version)));
                let args = QueryArgs {
                    txid,
                    expected,
                    primary,
                    close,
                };
                let (state, released) = self.participant.query(now, self.id, &args, last);
                if let Some(key) = released {
                    self.answer_deferred(&key);
                }
                Response::TxState { state }
            }
            Request::Transfer { epoch, entries } => {
                // Only a server of our view may write into the bucket this way. One of a newer
                // view we have not learned yet is refused too: its sender tries again.
                if let Err(refusal) = self.check_member(now, from, "transfer") {
                    return Some(refusal);
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
                self.receive_transfer(entries);
                Response::Done
            }
            Request::GetR { key, epoch } => {
                if epoch != self.epoch() || self.is_rebalancing() {
                    return Some(Response::error(
                        ErrorKind::Rebalancing,
                        format!(
                            "replica at epoch {} (rebalancing: {}), client at {epoch}",
                            self.epoch(),
                            self.is_rebalancing()
                        ),
                    ));
                }
                if self.participant.is_locked(&key) || self.settling.contains_key(&key) {
                    if self.deferred_count >= MAX_DEFERRED_READS {
                        self.refusals.deferred_full += 1;
                        let reason = format!(
                            "too many reads are waiting for pending commits here \
                             (at most {MAX_DEFERRED_READS})"
                        );
                        if let Some(held_back) = self.refusal_logs.deferred_full.allow(now) {
                            warn!(
                                "refused a getr of {key:?} from {from}: {reason} \
                                 ({} such refusals, {held_back} not logged)",
                                self.refusals.deferred_full
                            );
                        }
                        return Some(Response::error(ErrorKind::Aborted, reason));
                    }
                    // Answer once the pending write is decided, never with the old value.
                    self.deferred.entry(key).or_default().push(id);
                    self.deferred_count += 1;
                    return None;
                }
                self.read(&key)
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

    /// Checks that `from` is the address of a server in our current view, for a
    /// server-to-server request (`what`, for the message). A refusal is counted, logged (rate
    /// limited) and returned as the answer: kind `rebalancing`, since the sender may simply be
    /// in a view we have not learned yet (it asks again).
    fn check_member(&mut self, now: Instant, from: SocketAddr, what: &str) -> Result<(), Response> {
        let epoch = self.epoch();
        if self
            .view
            .as_ref()
            .is_some_and(|v| v.members.iter().any(|m| m.addr == from))
        {
            return Ok(());
        }
        self.refusals.not_a_member += 1;
        let reason = format!("refused: {from} is not a server in view {epoch}");
        if let Some(held_back) = self.refusal_logs.not_a_member.allow(now) {
            debug!(
                "{what} {reason} ({} such refusals, {held_back} not logged)",
                self.refusals.not_a_member
            );
        }
        Err(Response::error(ErrorKind::Rebalancing, reason))
    }

    /// Counts a prepare voted down by a bound and logs it (rate limited).
    fn count_pending_full(&mut self, now: Instant, reason: &str) {
        self.refusals.pending_full += 1;
        if let Some(held_back) = self.refusal_logs.pending_full.allow(now) {
            warn!(
                "voted no: {reason} ({} such votes, {held_back} not logged)",
                self.refusals.pending_full
            );
        }
    }

    /// Logs (rate limited, debug) a commit or abort for a transaction this server does not
    /// know; the caller counts it.
    fn log_unknown(&mut self, now: Instant, from: SocketAddr, what: &str, txid: TxId) {
        if let Some(held_back) = self.refusal_logs.unknown.allow(now) {
            debug!(
                "{what} from {from} for transaction {txid}, unknown here ({} commits and {} \
                 aborts so far, {held_back} not logged)",
                self.refusals.unknown_commits, self.refusals.unknown_aborts
            );
        }
    }

    /// True while this server has not finished rebalancing for the epoch it knows.
    pub fn is_rebalancing(&self) -> bool {
        self.finished < self.epoch()
    }

    /// Learns the view leader's anchor (the newest delivered view), kept if newer. An anchor
    /// older than ours means the view leader lost its memory (it restarted) or the answer was
    /// overtaken: ours may then differ from the other servers' (some drop copies on an anchor
    /// others never learned), so no anchor vouches for anything any more and plans fall back
    /// to the empty anchor: every holder sends each key to every new replica until the view
    /// leader delivers a view again.
    fn on_completed(&mut self, completed: View) {
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

    /// Learns that every server had its sends for `delivered` acknowledged: every copy of the
    /// epoch is where it belongs, so the keys kept only in case a sender failed (this server
    /// is not their replica in the newest view) are dropped, and the epoch is finished here.
    fn on_delivered(&mut self, now: Instant, delivered: Epoch) {
        let epoch = self.epoch();
        if delivered < epoch || self.sent < epoch || self.finished >= epoch {
            return;
        }
        let Some(view) = &self.view else { return };
        let leftovers = rebalance::leftovers(self.id, view, self.held());
        if !leftovers.is_empty() {
            info!(
                "epoch {epoch} delivered: dropping {} keys no longer mine",
                leftovers.len()
            );
        }
        for key in leftovers {
            self.store.remove(&key);
        }
        self.reconcile_candidates(epoch);
        self.finished = epoch;
        // Report it at once rather than at the next interval.
        self.next_heartbeat = now;
    }

    /// The bucket as the rebalancing planner sees it.
    fn held(&self) -> impl Iterator<Item = Held<'_>> {
        self.store.iter().map(|(key, stored)| Held {
            key,
            stray: stored.stray,
            candidate: stored.candidate,
        })
    }

    /// Every send of `epoch` is delivered, ours included (they carried each candidate to
    /// every replica of its key): a candidate of a key this server replicates now holds the
    /// best copy any holder had, so it is served again; one of a key it does not replicate
    /// (its plan dropped it already, unless it arrived in between) is dropped.
    fn reconcile_candidates(&mut self, epoch: Epoch) {
        let Some(view) = &self.view else { return };
        let count = view.replicas as usize;
        let (mut kept, mut dropped) = (0, 0);
        let ring = &self.ring;
        let me = self.id;
        self.store.retain(|key, stored| {
            if !stored.candidate {
                return true;
            }
            if ring.replicas(key, count).iter().any(|m| m.id == me) {
                stored.candidate = false;
                kept += 1;
                true
            } else {
                dropped += 1;
                false
            }
        });
        if kept + dropped > 0 {
            info!(
                "epoch {epoch} delivered: {kept} candidate keys reconciled and served again, \
                 {dropped} dropped as misplaced"
            );
        }
    }

    /// Starts rebalancing toward the newest view if this server has not done so yet.
    fn maybe_rebalance(&mut self, now: Instant) {
        let (Some(view), Some(completed)) = (&self.view, &self.completed) else {
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
        // copies are dropped), or it would reach only the old ones. New prepares are refused
        // while rebalancing, so the wait ends with the last decision.
        let undecided = self.participant.pending_count();
        if undecided > 0 {
            if !self.rebalance_deferred {
                info!(
                    "epoch {}: rebalancing waits for {undecided} undecided transactions",
                    view.epoch
                );
                self.rebalance_deferred = true;
            }
            return;
        }
        self.rebalance_deferred = false;
        if let Some(abandoned) = &self.rebalance {
            info!(
                "epoch {} arrived before rebalancing for {} finished; planning again",
                view.epoch, abandoned.epoch
            );
        }
        let plan = rebalance::plan(self.id, completed, view, self.held());
        let mut queue = VecDeque::new();
        let (mut keys, mut bytes) = (0, 0);
        for (target, keys_for_target) in plan.sends.values() {
            let mut batch = Vec::new();
            let mut batch_bytes = 0;
            for key in keys_for_target {
                let Some(stored) = self.store.get(key) else {
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
        self.pump_transfers(now);
    }

    /// After committing `txid` on `key` at `version`: if this server is the primary (first of
    /// `participants`), sends the commit to the other replicas itself (the coordinator does
    /// too, but may have died) and holds back reads of the key until every one of them
    /// acknowledged (see [`Settling`]).
    fn start_settling(
        &mut self,
        now: Instant,
        txid: TxId,
        version: u64,
        key: &str,
        participants: Vec<Member>,
    ) {
        if participants.first().is_none_or(|m| m.id != self.id) {
            return;
        }
        let awaiting: Vec<Member> = participants
            .into_iter()
            .filter(|m| m.id != self.id)
            .collect();
        if awaiting.is_empty() {
            return;
        }
        let key = key.to_owned();
        for member in &awaiting {
            self.send_settle(now, &key, *member, txid, version);
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

    /// Sends the commit of `txid` at `version` (on `key`) to `member`.
    fn send_settle(&mut self, now: Instant, key: &str, member: Member, txid: TxId, version: u64) {
        self.last_settle += 1;
        self.settle_requests
            .insert(self.last_settle, (key.to_owned(), member, txid));
        self.actions.push_back(Action::Request {
            token: Reply::Settle(self.last_settle).token(),
            dst: member.addr,
            request: Request::Commit { txid, version },
            deadline: Some(now + SETTLE_TIMEOUT),
        });
    }

    /// A replica answered the primary's commit number `seq` (any answer means it has
    /// decided: it committed, or it was closed by its peers); no answer in time means: send
    /// it again, unless the replica is gone (unreachable, or out of the view).
    fn on_settle_answer(&mut self, now: Instant, seq: u64, result: Result<Response, RequestError>) {
        let Some((key, member, txid)) = self.settle_requests.remove(&seq) else {
            return;
        };
        // A newer commit of the key may have replaced this one (every replica voted for it,
        // so each had decided this one): only answers about the current one count.
        let Some(settling) = self.settling.get(&key).filter(|s| s.txid == txid) else {
            return;
        };
        let in_view = self.view.as_ref().is_some_and(|v| v.contains(member.id));
        if matches!(result, Err(RequestError::Timeout { .. })) && in_view {
            let (txid, version) = (settling.txid, settling.version);
            self.send_settle(now, &key, member, txid, version);
            return;
        }
        self.settled_at(&key, member.id);
    }

    /// Notes that replica `id` has the commit of `key` (or is gone); once every replica has,
    /// the key's reads are answered again.
    fn settled_at(&mut self, key: &str, id: ServerId) {
        let Some(settling) = self.settling.get_mut(key) else {
            return;
        };
        settling.awaiting.retain(|m| m.id != id);
        if settling.awaiting.is_empty() {
            self.settling.remove(key);
            self.answer_deferred(key);
        }
    }

    /// Stops waiting for replicas that left the view (their copies are gone with them).
    fn prune_settling(&mut self) {
        let Some(view) = &self.view else { return };
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
            self.settled_at(&key, id);
        }
    }

    /// Starts a rebalancing that waited for undecided transactions, once none is left.
    fn resume_rebalance(&mut self, now: Instant) {
        if self.rebalance_deferred && self.participant.pending_count() == 0 {
            self.maybe_rebalance(now);
        }
    }

    /// Sends the queued batches that are due (one in flight per destination at a time, so a
    /// destination's window stays full without flooding it); finishes when all are acknowledged.
    fn pump_transfers(&mut self, now: Instant) {
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
            self.actions.push_back(Action::Request {
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
            self.finish_rebalance(now);
        }
    }

    /// Handles the answer to transfer number `seq`: acknowledged, or queued to be sent again.
    fn on_transfer_answer(
        &mut self,
        now: Instant,
        seq: u64,
        result: Result<Response, RequestError>,
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
        self.pump_transfers(now);
    }

    /// Every send is acknowledged: drops the keys no longer ours, settles the strays sent,
    /// and reports the epoch finished in the next heartbeat.
    fn finish_rebalance(&mut self, now: Instant) {
        let Some(rebalance) = self.rebalance.take() else {
            return;
        };
        for key in &rebalance.drops {
            self.store.remove(key);
        }
        for key in &rebalance.settles {
            if let Some(stored) = self.store.get_mut(key) {
                stored.stray = false;
            }
        }
        self.sent = rebalance.epoch;
        // Report it at once rather than at the next interval.
        self.next_heartbeat = now;
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

    /// Stores the keys of a transfer, keeping the higher version of each.
    fn receive_transfer(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            self.received.0 += 1;
            self.received.1 += entry.key.len() + entry.value.len();
            let stored = Stored {
                version: entry.version,
                value: entry.value,
                txid: None,
                stray: false,
                candidate: false,
            };
            self.keep_newer(entry.key, stored);
        }
    }

    /// Stores `stored` under `key` unless the bucket already holds the same or a newer
    /// version: the one rule by which commits, late duplicates and rebalance copies meet, so a
    /// value never goes back to an older one.
    fn keep_newer(&mut self, key: String, stored: Stored) {
        if self
            .store
            .get(&key)
            .is_none_or(|s| s.version < stored.version)
        {
            self.store.insert(key, stored);
        }
    }

    /// The entry of `key` this server serves: none while it is only a candidate.
    fn committed(&self, key: &str) -> Option<&Stored> {
        self.store.get(key).filter(|stored| !stored.candidate)
    }

    /// A replicated read's answer from the bucket.
    fn read(&self, key: &str) -> Response {
        match self.committed(key) {
            Some(stored) => Response::Found {
                value: stored.value.clone(),
                version: stored.version,
            },
            None => Response::error(
                ErrorKind::NotFound,
                format!("{key:?} is not in this bucket"),
            ),
        }
    }

    /// Stores a committed write unless the bucket already holds a newer version.
    fn apply(&mut self, write: Write) {
        let stored = Stored {
            version: write.version,
            value: write.value,
            txid: Some(write.txid),
            stray: false,
            candidate: false,
        };
        self.keep_newer(write.key, stored);
    }

    /// Checks that `participants` are exactly `key`'s replicas in our view, in ring order, so
    /// that a forged prepare cannot name peers of its choosing.
    fn check_participants(&self, key: &str, participants: &[Member]) -> Result<(), String> {
        let Some(view) = &self.view else {
            return Err("this replica has not learned a view yet".to_owned());
        };
        let expected = self.ring.replicas(key, view.replicas as usize);
        if expected.as_slice() != participants {
            return Err(format!(
                "the participants are not {key:?}'s replicas at epoch {}",
                view.epoch
            ));
        }
        Ok(())
    }

    /// Answers every replicated read held back on `key` (its pending write was decided).
    fn answer_deferred(&mut self, key: &str) {
        if self.participant.is_locked(key) || self.settling.contains_key(key) {
            return;
        }
        if let Some(waiting) = self.deferred.remove(key) {
            self.deferred_count -= waiting.len();
            let response = self.read(key);
            for id in waiting {
                self.actions.push_back(Action::Respond {
                    id,
                    response: response.clone(),
                });
            }
        }
    }

    /// Carries out what the participant asked for.
    fn carry_out(&mut self, now: Instant, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Apply(write) => {
                    let key = write.key.clone();
                    self.apply(write);
                    self.answer_deferred(&key);
                }
                Effect::Release(key) => {
                    self.answer_deferred(&key);
                }
                Effect::Query { token, dst, query } => self.actions.push_back(Action::Request {
                    token: Reply::Query(token).token(),
                    dst,
                    request: query,
                    deadline: Some(now + QUERY_TIMEOUT),
                }),
            }
        }
    }
}

impl Node for Server {
    /// Serves a raw storage request.
    fn handle_request(&mut self, now: Instant, from: SocketAddr, id: IncomingId, request: Request) {
        if let Some(response) = self.serve(now, from, id, request) {
            self.actions.push_back(Action::Respond { id, response });
        }
        self.resume_rebalance(now);
    }

    /// Handles heartbeat answers and discovery probe outcomes.
    fn handle_response(
        &mut self,
        now: Instant,
        token: u64,
        result: Result<Response, RequestError>,
    ) {
        match Reply::from_token(token) {
            Some(Reply::Query(query)) => {
                let answer = match result {
                    Ok(Response::TxState { state }) => Some(state),
                    _ => None,
                };
                let view = self.view.clone();
                let effects =
                    self.participant
                        .handle_query_answer(now, query, answer, view.as_ref());
                self.carry_out(now, effects);
            }
            Some(Reply::Settle(seq)) => self.on_settle_answer(now, seq, result),
            Some(Reply::Transfer(seq)) => self.on_transfer_answer(now, seq, result),
            Some(Reply::Heartbeat(seq)) => self.on_heartbeat_answer(now, seq, result),
            Some(Reply::Probe(index)) => {
                let is_viewleader = result.is_ok_and(|r| r.is_from_viewleader());
                self.on_probe(now, index, is_viewleader);
            }
            None => debug!("an answer for token {token}, which this server never handed out"),
        }
        self.resume_rebalance(now);
    }

    /// Sends the next heartbeat (or discovery round) when due.
    fn handle_timeout(&mut self, now: Instant) {
        self.pump_transfers(now);
        if self.participant.poll_timeout().is_some_and(|t| t <= now) {
            let view = self.view.clone();
            let effects = self.participant.handle_timeout(now, self.id, view.as_ref());
            self.carry_out(now, effects);
            self.resume_rebalance(now);
        }
        if now < self.next_heartbeat || self.discovery.is_some() {
            return;
        }
        match self.viewleader {
            Some(viewleader) => self.send_heartbeat(now, viewleader),
            None => self.start_discovery(now),
        }
    }

    /// The next heartbeat instant, unless a discovery round is waiting for its probes.
    fn poll_timeout(&self) -> Option<Instant> {
        let heartbeat = if self.discovery.is_some() {
            None
        } else {
            Some(self.next_heartbeat)
        };
        let retry = self
            .rebalance
            .as_ref()
            .and_then(|r| r.queue.iter().map(|(at, ..)| *at).min());
        [heartbeat, self.participant.poll_timeout(), retry]
            .into_iter()
            .flatten()
            .min()
    }

    /// Hands out the next action.
    fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::view::Member;

    /// A server with a known view leader and a 100 ms heartbeat.
    fn server(now: Instant) -> Server {
        let config = ServerConfig {
            advertise: "127.0.0.1:38000".parse().unwrap(),
            viewleader: Some("127.0.0.1:39000".parse().unwrap()),
            heartbeat_interval: Duration::from_millis(100),
            candidates: Vec::new(),
        };
        Server::new(config, Rng::seeded(1), now)
    }

    /// Sends `request` from a client (not a server of any view) and returns the response.
    fn ask(s: &mut Server, request: Request) -> Response {
        ask_from(s, "127.0.0.1:1".parse().unwrap(), request)
    }

    /// Sends `request` from `from` and returns the response.
    fn ask_from(s: &mut Server, from: SocketAddr, request: Request) -> Response {
        let id = IncomingId {
            incarnation: 1,
            request: 1,
        };
        s.handle_request(Instant::now(), from, id, request);
        match s.poll_action() {
            Some(Action::Respond { response, .. }) => response,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    /// Contract: raw `set` stores, `get` returns the value or `not_found`, and `query_all_keys`
    /// lists the bucket's keys sorted.
    #[test]
    fn raw_set_get_and_query_all_keys() {
        let mut s = server(Instant::now());
        assert_eq!(
            ask(
                &mut s,
                Request::Set {
                    key: "b".into(),
                    value: "2".into()
                }
            ),
            Response::Done
        );
        assert_eq!(
            ask(
                &mut s,
                Request::Set {
                    key: "a".into(),
                    value: "1".into()
                }
            ),
            Response::Done
        );
        assert_eq!(
            ask(&mut s, Request::Get { key: "a".into() }),
            Response::Value { value: "1".into() }
        );
        let missing = ask(&mut s, Request::Get { key: "zz".into() });
        assert!(matches!(missing, Response::Error(ref e) if e.kind == ErrorKind::NotFound));
        assert_eq!(
            ask(&mut s, Request::QueryAllKeys),
            Response::Keys {
                keys: vec!["a".into(), "b".into()]
            }
        );
    }

    /// Contract: a key over 1024 bytes is refused with `bad_input` and nothing is stored.
    #[test]
    fn oversized_keys_are_refused() {
        let mut s = server(Instant::now());
        let answer = ask(
            &mut s,
            Request::Set {
                key: "k".repeat(2000),
                value: String::new(),
            },
        );
        assert!(matches!(answer, Response::Error(ref e) if e.kind == ErrorKind::BadInput));
        assert!(s.is_empty());
    }

    /// Assignment 3.4: heartbeats go out at once and then every interval, and the server learns
    /// the current epoch from the heartbeat's acknowledgement.
    #[test]
    fn heartbeats_go_out_every_interval_and_learn_the_epoch() {
        let t0 = Instant::now();
        let mut s = server(t0);
        s.handle_timeout(t0);
        assert!(matches!(
            s.poll_action(),
            Some(Action::Request { token, .. }) if token == Reply::Heartbeat(1).token()
        ));
        assert_eq!(
            s.poll_timeout(),
            Some(t0 + Duration::from_millis(100)),
            "every interval"
        );
        let view = View {
            epoch: Epoch(4),
            members: vec![Member {
                id: s.id(),
                addr: "127.0.0.1:38000".parse().unwrap(),
            }],
            replicas: 3,
            vnodes: 64,
        };
        let completed = View::default();
        s.handle_response(
            t0,
            Reply::Heartbeat(1).token(),
            Ok(Response::HeartbeatAck {
                view,
                completed,
                delivered: Epoch(0),
            }),
        );
        assert_eq!(s.epoch(), Epoch(4));
        // Nothing to send for the new epoch: the server reports that at once.
        assert_eq!(s.poll_timeout(), Some(t0));
    }

    /// Contract: a server declared dead rejoins at once under a fresh id and keeps what its
    /// bucket held, serving none of it (raw `get`, `query_all_keys`) until reconciled; a late
    /// refusal meant for the abandoned id causes no second rejoin.
    #[test]
    fn a_refused_heartbeat_keeps_the_bucket_as_candidates_and_changes_the_id() {
        let t0 = Instant::now();
        let mut s = server(t0);
        ask(
            &mut s,
            Request::Set {
                key: "k".into(),
                value: "v".into(),
            },
        );
        let old = s.id();
        s.handle_timeout(t0);
        s.poll_action();
        // Heartbeat 2 also went out under the old id before the refusal of 1 arrived.
        s.handle_timeout(t0 + Duration::from_millis(100));
        s.poll_action();
        let refused = || {
            Ok(Response::HeartbeatRefused {
                view: View::default(),
            })
        };
        s.handle_response(t0, Reply::Heartbeat(1).token(), refused());
        assert_ne!(s.id(), old);
        assert_eq!(s.len(), 1, "kept, never wiped");
        assert!(s.bucket().all(|(_, stored)| stored.candidate));
        let Some(Action::Request {
            request: Request::Heartbeat { id, .. },
            ..
        }) = s.poll_action()
        else {
            panic!("expected an immediate heartbeat under the new id");
        };
        assert_eq!(id, s.id());
        // The refusal of heartbeat 2 concerns the abandoned id: no second rejoin.
        let new_id = s.id();
        s.handle_response(t0, Reply::Heartbeat(2).token(), refused());
        assert_eq!(s.id(), new_id);
        let unserved = ask(&mut s, Request::Get { key: "k".into() });
        assert!(matches!(unserved, Response::Error(ref e) if e.kind == ErrorKind::NotFound));
        assert_eq!(
            ask(&mut s, Request::QueryAllKeys),
            Response::Keys { keys: vec![] }
        );
    }

    /// Issue 14 (keep, never wipe): after rejoining, the candidates go to every replica of
    /// their key in the new view, whatever the anchor says; once the epoch is delivered (every
    /// copy landed) the candidate of a key this server replicates is served again, with the
    /// higher of its own and the received versions.
    #[test]
    fn candidates_are_sent_to_their_replicas_and_served_once_reconciled() {
        let t0 = Instant::now();
        let (mut s, anchor) = settled_in_a_pair(t0);
        let receive = Request::Transfer {
            epoch: Epoch(2),
            entries: vec![
                Entry {
                    key: "old".into(),
                    value: "kept".into(),
                    version: 5,
                },
                Entry {
                    key: "newer".into(),
                    value: "stale".into(),
                    version: 5,
                },
            ],
        };
        let peer: SocketAddr = "127.0.0.1:38001".parse().unwrap();
        assert_eq!(ask_from(&mut s, peer, receive), Response::Done);
        let epoch_before = s.epoch();
        let old_id = s.id();
        s.handle_response(
            t0,
            Reply::Heartbeat(3).token(),
            Ok(Response::HeartbeatRefused {
                view: View::default(),
            }),
        );
        drain(&mut s);
        assert_eq!(s.epoch(), epoch_before, "epochs never go backwards");
        // The new view: the new id and server 1; the anchor still names the old id.
        let view = learn(&mut s, t0, 4, &[1], &anchor, 2);
        assert!(!view.contains(old_id));
        let transfers: Vec<(SocketAddr, Vec<String>)> = drain(&mut s)
            .into_iter()
            .filter_map(|action| match action {
                Action::Request {
                    dst,
                    request: Request::Transfer { entries, .. },
                    ..
                } => Some((dst, entries.into_iter().map(|e| e.key).collect())),
                _ => None,
            })
            .collect();
        assert_eq!(
            transfers,
            vec![(peer, vec!["newer".to_owned(), "old".to_owned()])],
            "both candidates go to the other replica (2 replicas of 2 servers)"
        );
        // Server 1 sends the newer copy of one key; our transfer is acknowledged.
        let newer = Request::Transfer {
            epoch: Epoch(4),
            entries: vec![Entry {
                key: "newer".into(),
                value: "current".into(),
                version: Epoch(3).version_floor() + 1,
            }],
        };
        assert_eq!(ask_from(&mut s, peer, newer), Response::Done);
        assert_eq!(
            ask(&mut s, Request::QueryAllKeys),
            Response::Keys {
                keys: vec!["newer".into()]
            }
        );
        let token = Reply::Transfer(s.last_transfer).token();
        s.handle_response(t0, token, Ok(Response::Done));
        assert!(
            s.is_rebalancing(),
            "not served before the epoch is delivered"
        );
        learn(&mut s, t0, 4, &[1], &anchor, 4);
        assert!(!s.is_rebalancing());
        assert_eq!(
            ask(&mut s, Request::QueryAllKeys),
            Response::Keys {
                keys: vec!["newer".into(), "old".into()]
            }
        );
        assert_eq!(
            ask(
                &mut s,
                Request::Get {
                    key: "newer".into()
                }
            ),
            Response::Value {
                value: "current".into()
            }
        );
        assert!(s.bucket().all(|(_, stored)| !stored.candidate));
    }

    /// Contract (`--viewleader` default): the server adopts the first candidate in order that
    /// answers, only once every earlier candidate has failed.
    #[test]
    fn discovery_adopts_the_lowest_candidate_that_answers() {
        let t0 = Instant::now();
        let mut config = server(t0).config;
        config.viewleader = None;
        config.candidates = (1..=3)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .collect();
        let mut s = Server::new(config, Rng::seeded(2), t0);
        s.handle_timeout(t0);
        let probes: Vec<Action> = std::iter::from_fn(|| s.poll_action()).collect();
        assert_eq!(probes.len(), 3);
        let servers = Response::Servers {
            view: View::default(),
            rebalancing: false,
            pending: vec![],
        };
        s.handle_response(t0, Reply::Probe(2).token(), Ok(servers.clone()));
        s.handle_response(t0, Reply::Probe(1).token(), Ok(servers));
        assert!(
            s.poll_action().is_none(),
            "candidate 0 has not answered yet"
        );
        let peer = SocketAddr::from(([127, 0, 0, 1], 1));
        s.handle_response(
            t0,
            Reply::Probe(0).token(),
            Err(RequestError::Unreachable { peer }),
        );
        let Some(Action::Request { dst, .. }) = s.poll_action() else {
            panic!("no heartbeat")
        };
        assert_eq!(dst.port(), 2);
    }

    /// A server at `epoch` in a view of itself and `others` (all at 127.0.0.1), learned from
    /// a heartbeat acknowledgement whose anchor is `anchor` and delivered epoch `delivered`.
    fn learn(
        s: &mut Server,
        now: Instant,
        epoch: u64,
        others: &[u128],
        anchor: &View,
        delivered: u64,
    ) -> View {
        let mut members = vec![Member {
            id: s.id(),
            addr: "127.0.0.1:38000".parse().unwrap(),
        }];
        members.extend(others.iter().map(|&n| Member {
            id: ServerId(n),
            addr: SocketAddr::from(([127, 0, 0, 1], 38000 + n as u16)),
        }));
        members.sort_by_key(|m| m.id);
        let view = View {
            epoch: Epoch(epoch),
            members,
            replicas: 2,
            vnodes: 8,
        };
        s.handle_response(
            now,
            Reply::Heartbeat(epoch).token(),
            Ok(Response::HeartbeatAck {
                view: view.clone(),
                completed: anchor.clone(),
                delivered: Epoch(delivered),
            }),
        );
        view
    }

    /// Delivers `request` as request `n` of a client and returns every action it caused
    /// (for requests whose answer may be held back, or comes with other actions).
    fn deliver(s: &mut Server, now: Instant, n: u64, request: Request) -> Vec<Action> {
        let id = IncomingId {
            incarnation: 5,
            request: n,
        };
        s.handle_request(now, "127.0.0.1:1".parse().unwrap(), id, request);
        drain(s)
    }

    /// A server settled at epoch 2 in a view with one other server (anchor and delivered
    /// epoch 2, nothing queued); returns it and the view.
    fn settled_in_a_pair(now: Instant) -> (Server, View) {
        let mut s = server(now);
        let view = learn(&mut s, now, 2, &[1], &View::default(), 0);
        learn(&mut s, now, 2, &[1], &view, 2);
        drain(&mut s);
        (s, view)
    }

    /// Every action the server has queued.
    fn drain(s: &mut Server) -> Vec<Action> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    /// A prepare of `key` = `value` as transaction `txid` with `participants` at `epoch`.
    fn prepare(
        txid: u128,
        key: &str,
        value: &str,
        epoch: u64,
        expected: ServerId,
        participants: Vec<Member>,
    ) -> Request {
        Request::Prepare {
            txid: TxId(txid),
            key: key.into(),
            value: value.into(),
            epoch: Epoch(epoch),
            expected,
            participants,
            timeout_ms: 5_000,
        }
    }

    /// A key whose primary in `view` is (or is not) `me`.
    fn key_with_primary(view: &View, me: ServerId, is_me: bool) -> (String, Vec<Member>) {
        let ring = Ring::new(view);
        (0..1000)
            .map(|i| format!("k{i}"))
            .map(|k| {
                let replicas = ring.replicas(&k, 2);
                (k, replicas)
            })
            .find(|(_, r)| (r[0].id == me) == is_me)
            .expect("a key")
    }

    /// Found by the simulator (README "How we test"): a transfer planned for an epoch the
    /// receiver has left behind is refused, or its keys could stay where they no longer belong.
    #[test]
    fn a_transfer_for_an_older_epoch_is_refused() {
        let t0 = Instant::now();
        let mut s = server(t0);
        learn(&mut s, t0, 4, &[1], &View::default(), 0);
        drain(&mut s);
        let entry = |key: &str| Entry {
            key: key.into(),
            value: "v".into(),
            version: 1,
        };
        let ask = |s: &mut Server, request| ask_from(s, PEER.parse().unwrap(), request);
        let stale = ask(
            &mut s,
            Request::Transfer {
                epoch: Epoch(3),
                entries: vec![entry("old")],
            },
        );
        assert!(
            matches!(stale, Response::Error(ref e) if e.kind == ErrorKind::Rebalancing),
            "{stale:?}"
        );
        assert!(s.bucket().all(|(k, _)| k != "old"));
        let current = ask(
            &mut s,
            Request::Transfer {
                epoch: Epoch(4),
                entries: vec![entry("new")],
            },
        );
        assert_eq!(current, Response::Done);
        assert!(s.bucket().any(|(k, _)| k == "new"));
    }

    /// Found by the simulator: a transaction prepared under the old view must be decided
    /// before the server copies its keys to their new replicas, or its write would reach only
    /// the old ones.
    #[test]
    fn rebalancing_waits_for_undecided_transactions() {
        let t0 = Instant::now();
        let mut s = server(t0);
        let me = s.id();
        let alone = learn(&mut s, t0, 2, &[], &View::default(), 0);
        let alone = learn(&mut s, t0, 2, &[], &alone, 2);
        drain(&mut s);
        assert!(!s.is_rebalancing());
        let single = vec![Member {
            id: me,
            addr: "127.0.0.1:38000".parse().unwrap(),
        }];
        let vote = ask(&mut s, prepare(7, "k", "new", 2, me, single));
        assert_eq!(vote, Response::Prepared { version: None });
        // A server joins: "k" must go to it, but the transaction is undecided.
        learn(&mut s, t0, 3, &[1], &alone, 2);
        let transfers = |actions: &[Action]| {
            actions
                .iter()
                .filter_map(|a| match a {
                    Action::Request {
                        request: Request::Transfer { entries, .. },
                        ..
                    } => Some(entries.clone()),
                    _ => None,
                })
                .flatten()
                .collect::<Vec<Entry>>()
        };
        assert!(
            transfers(&drain(&mut s)).is_empty(),
            "no transfer before the decision"
        );
        assert_eq!(
            ask(
                &mut s,
                Request::Commit {
                    txid: TxId(7),
                    version: 1
                }
            ),
            Response::Done
        );
        let sent = transfers(&drain(&mut s));
        assert_eq!(
            sent,
            vec![Entry {
                key: "k".into(),
                value: "new".into(),
                version: 1
            }],
            "the committed value goes to the new replica"
        );
    }

    /// Found by the simulator: the primary holds back reads of a key it committed until the
    /// other replicas acknowledged the commit it sends them itself, so no read sees a value
    /// that dies with the primary.
    #[test]
    fn the_primary_holds_reads_until_the_others_have_its_commit() {
        let t0 = Instant::now();
        let (mut s, view) = settled_in_a_pair(t0);
        let me = s.id();
        let (key, participants) = key_with_primary(&view, me, true);
        let vote = ask(&mut s, prepare(9, &key, "new", 2, me, participants.clone()));
        assert_eq!(vote, Response::Prepared { version: None });
        let commit = Request::Commit {
            txid: TxId(9),
            version: 1,
        };
        let actions = deliver(&mut s, t0, 4, commit);
        assert!(actions.iter().any(|a| matches!(
            a,
            Action::Respond {
                response: Response::Done,
                ..
            }
        )));
        let settle = actions
            .into_iter()
            .find_map(|a| match a {
                Action::Request {
                    token,
                    dst,
                    request: Request::Commit { txid, version },
                    ..
                } => {
                    assert_eq!((txid, version), (TxId(9), 1));
                    assert_eq!(dst, participants[1].addr);
                    Some(token)
                }
                _ => None,
            })
            .expect("the primary sends the commit to the other replica");
        let read = Request::GetR {
            key: key.clone(),
            epoch: Epoch(2),
        };
        assert!(deliver(&mut s, t0, 5, read).is_empty(), "the read waits");
        s.handle_response(t0, settle, Ok(Response::Done));
        let answers = drain(&mut s);
        assert!(
            matches!(&answers[..], [Action::Respond { response: Response::Found { value, version: 1 }, .. }] if value == "new"),
            "{answers:?}"
        );
    }

    /// Found by the simulator: reads held back for a pending commit are refused, not answered
    /// `not_found` from the emptied bucket, when the server learns it was declared dead.
    #[test]
    fn a_server_declared_dead_refuses_the_reads_it_held_back() {
        let t0 = Instant::now();
        let (mut s, view) = settled_in_a_pair(t0);
        let me = s.id();
        let (key, participants) = key_with_primary(&view, me, false);
        let vote = ask(&mut s, prepare(11, &key, "new", 2, me, participants));
        assert_eq!(vote, Response::Prepared { version: None });
        let read = Request::GetR {
            key,
            epoch: Epoch(2),
        };
        assert!(
            deliver(&mut s, t0, 5, read).is_empty(),
            "the read waits for the decision"
        );
        let id = IncomingId {
            incarnation: 5,
            request: 5,
        };
        s.handle_response(
            t0,
            Reply::Heartbeat(3).token(),
            Ok(Response::HeartbeatRefused { view }),
        );
        let answers = drain(&mut s);
        assert!(
            answers.iter().any(|a| matches!(a, Action::Respond { id: i, response: Response::Error(e) } if *i == id && e.kind == ErrorKind::Rebalancing)),
            "{answers:?}"
        );
    }

    /// The address of server 1 in the views [`learn`] builds.
    const PEER: &str = "127.0.0.1:38001";

    /// Issue 8 (membership): a transfer is accepted only from a server of the receiver's
    /// view; from anyone else it is refused (kind `rebalancing`, naming the address and the
    /// view), counted, and writes nothing.
    #[test]
    fn a_transfer_from_a_non_member_is_refused() {
        let t0 = Instant::now();
        let (mut s, _) = settled_in_a_pair(t0);
        let transfer = || Request::Transfer {
            epoch: Epoch(2),
            entries: vec![Entry {
                key: "forged".into(),
                value: "v".into(),
                version: 99,
            }],
        };
        let refused = ask(&mut s, transfer());
        let Response::Error(e) = refused else {
            panic!("{refused:?}")
        };
        assert_eq!(e.kind, ErrorKind::Rebalancing);
        assert_eq!(e.message, "refused: 127.0.0.1:1 is not a server in view 2");
        assert!(s.is_empty(), "nothing written");
        assert_eq!(s.refusals().not_a_member, 1);
        assert_eq!(
            ask_from(&mut s, PEER.parse().unwrap(), transfer()),
            Response::Done
        );
        assert_eq!(s.len(), 1);
    }

    /// Issue 8 (membership): a termination query from a non-member is refused and changes
    /// nothing: a closing query from it does not make the participant refuse the
    /// coordinator's commit, as one from a server of the view does.
    #[test]
    fn a_termination_query_from_a_non_member_is_refused() {
        let t0 = Instant::now();
        let (mut s, view) = settled_in_a_pair(t0);
        let me = s.id();
        let (key, participants) = key_with_primary(&view, me, false);
        let primary = participants[0].id;
        let vote = ask(&mut s, prepare(21, &key, "v", 2, me, participants.clone()));
        assert_eq!(vote, Response::Prepared { version: None });
        let close = Request::QueryTx {
            txid: TxId(21),
            key: key.clone(),
            expected: me,
            primary,
            close: true,
        };
        let refused = ask(&mut s, close.clone());
        assert!(
            matches!(&refused, Response::Error(e) if e.kind == ErrorKind::Rebalancing
                && e.message.contains("127.0.0.1:1 is not a server in view 2")),
            "{refused:?}"
        );
        assert_eq!(s.refusals().not_a_member, 1);
        let commit = Request::Commit {
            txid: TxId(21),
            version: 3,
        };
        assert_eq!(
            ask(&mut s, commit),
            Response::Done,
            "not closed by a stranger"
        );
        // The same query from the primary (a server of the view) is answered.
        let (mut s, _) = settled_in_a_pair(t0);
        assert_eq!(s.id(), me, "the same seed, the same id");
        ask(&mut s, prepare(21, &key, "v", 2, me, participants));
        let answer = ask_from(&mut s, PEER.parse().unwrap(), close);
        assert_eq!(
            answer,
            Response::TxState {
                state: message::TxOutcome::Prepared
            }
        );
    }

    /// Issue 8 (membership): a commit for a transaction never prepared here writes nothing,
    /// locks nothing, is answered `not_found` and counted; an abort for one is counted too.
    #[test]
    fn a_commit_for_an_unknown_transaction_changes_nothing() {
        let t0 = Instant::now();
        let (mut s, _) = settled_in_a_pair(t0);
        let answer = ask(
            &mut s,
            Request::Commit {
                txid: TxId(404),
                version: 7,
            },
        );
        let Response::Error(e) = answer else {
            panic!("{answer:?}")
        };
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.message.contains("not known here"), "{}", e.message);
        assert!(s.is_empty());
        assert_eq!(s.pending_transactions(), 0);
        assert_eq!(s.refusals().unknown_commits, 1);
        assert_eq!(
            ask(&mut s, Request::Abort { txid: TxId(405) }),
            Response::Done
        );
        assert_eq!(s.refusals().unknown_aborts, 1);
        assert_eq!(s.pending_transactions(), 0);
    }

    /// Issue 8 (bounded resources): a primary passing on [`MAX_SETTLING`] commits to a silent
    /// replica votes no on a prepare that would add one more, with the bound named; it still
    /// votes yes where it is not the primary.
    #[test]
    fn a_primary_with_too_many_settling_commits_votes_no() {
        let t0 = Instant::now();
        let (mut s, view) = settled_in_a_pair(t0);
        let me = s.id();
        let ring = Ring::new(&view);
        let mut keys = (0..).map(|i| format!("k{i}")).map(|k| {
            let replicas = ring.replicas(&k, 2);
            (k, replicas)
        });
        let mut primary_keys = keys.by_ref().filter(|(_, r)| r[0].id == me);
        for tx in 0..MAX_SETTLING as u128 {
            let (key, participants) = primary_keys.next().unwrap();
            ask(&mut s, prepare(tx, &key, "v", 2, me, participants));
            let commit = Request::Commit {
                txid: TxId(tx),
                version: 1,
            };
            deliver(&mut s, t0, 10, commit);
        }
        assert_eq!(s.pending_transactions(), 0);
        let (key, participants) = primary_keys.next().unwrap();
        let vote = ask(&mut s, prepare(1 << 50, &key, "v", 2, me, participants));
        assert!(
            matches!(&vote, Response::Error(e) if e.kind == ErrorKind::Aborted
                && e.message.contains("too many commits are settling")),
            "{vote:?}"
        );
        assert_eq!(s.refusals().pending_full, 1);
        let (key, participants) = keys.find(|(_, r)| r[0].id != me).unwrap();
        let vote = ask(&mut s, prepare(1 << 51, &key, "v", 2, me, participants));
        assert_eq!(vote, Response::Prepared { version: None });
    }

    /// Issue 8 (bounded resources): beyond [`MAX_DEFERRED_READS`] held-back reads, a read of a
    /// key with a pending commit is refused at once, counted.
    #[test]
    fn reads_held_back_are_bounded() {
        let t0 = Instant::now();
        let (mut s, view) = settled_in_a_pair(t0);
        let me = s.id();
        let (key, participants) = key_with_primary(&view, me, false);
        ask(&mut s, prepare(5, &key, "v", 2, me, participants));
        let read = || Request::GetR {
            key: key.clone(),
            epoch: Epoch(2),
        };
        for n in 0..MAX_DEFERRED_READS as u64 {
            assert!(deliver(&mut s, t0, n, read()).is_empty());
        }
        let refused = ask(&mut s, read());
        assert!(
            matches!(&refused, Response::Error(e) if e.kind == ErrorKind::Aborted
                && e.message.contains("at most 10000")),
            "{refused:?}"
        );
        assert_eq!(s.refusals().deferred_full, 1);
    }

    /// Issue 15 (typed routing): every kind of reply token round-trips through its node
    /// token, and a token this server never handed out is none of them.
    #[test]
    fn reply_tokens_round_trip_and_unknown_ones_are_refused() {
        for reply in [
            Reply::Probe(3),
            Reply::Heartbeat(1 << 40),
            Reply::Transfer(7),
            Reply::Settle(0),
            Reply::Query(12),
        ] {
            assert_eq!(Reply::from_token(reply.token()), Some(reply));
        }
        assert_eq!(Reply::from_token(0), None);
        assert_eq!(Reply::from_token(u64::MAX), None);
    }
}
