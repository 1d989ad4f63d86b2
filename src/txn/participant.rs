//! The participant side of two-phase commit, with cooperative termination (sans-IO).
//!
//! A [`Participant`] holds, for one server, the transactions it voted yes on, the key each
//! one locks, and the outcomes it decided. The server feeds it `Prepare`, `Commit`, `Abort`
//! and `QueryTx` requests and timer expiries; it answers with votes and outcomes and asks the
//! server to send termination queries.
//!
//! # Protocol
//!
//! - **Vote**: every check of a prepare is made here, in one order
//!   ([`Participant::prepare`]), against what the server knows ([`PrepareContext`]): the
//!   expected id is ours and the coordinator's epoch is not ahead of ours, the key is
//!   settled here, the participants are the key's replicas in our view (a coordinator
//!   behind on the view is judged by this, not by the bare epoch number: its transaction
//!   survives a view change that did not touch the key), and (as its primary) we are not passing on too many commits
//!   ([`MAX_SETTLING`]); then the transaction is not already decided (or tombstoned), we are
//!   among the participants, no other transaction holds the key, and the pending table has
//!   room. A yes vote locks the key and reports our version of it. Each no is a [`VoteNo`].
//! - **Commit point**: the primary (first participant) decides. The coordinator sends
//!   `Commit` to the primary first and to the others only once the primary acknowledged it.
//!   A primary still undecided at its deadline (the coordinator's remaining time when the
//!   prepare arrived) aborts for good, and refuses a commit that arrives later.
//! - **Termination**: a non-primary participant still undecided a grace period after its
//!   deadline, or as soon as it learns a view without the primary
//!   ([`Participant::on_view`]), asks the primary and the other participants (`QueryTx`). Anyone committed →
//!   commit; anyone aborted → abort. A peer with no record (or a forgotten one) answers from
//!   its bucket (is this the key's last committed transaction?), and otherwise `Unknown` (no
//!   information), except the primary, which records and answers `Aborted`. If the primary has
//!   left the view, the asker sends its queries with `close`: a peer still undecided then
//!   refuses any later commit from the coordinator, and ignores a `Committed` answer from the
//!   primary (a late one, sent before the primary left). A closing round also asks every
//!   other server of the view: rebalancing may have copied a departed participant's bucket,
//!   this transaction's commit included, to a server that was never a participant (found by
//!   the simulator, seed 863), and transfers carry each entry's transaction id so that such a
//!   holder answers `Committed` from its bucket. Once every other server still in the view
//!   answered a closing round and none committed, the asker aborts. Otherwise it asks again.
//!
//! Safety in brief: only the primary decides; a non-primary commits only after the primary
//! committed, and never aborts while a peer could still commit (every peer either answered
//! without a commit and is closed, or is gone with its bucket, and no server of the view holds
//! the commit). The one loss is a commit that exists only at servers that left the view (the
//! primary among them): their buckets leave with them. The model checker does not model
//! rebalancing; the simulator does.
//!
//! `tests/model.rs` checks these properties exhaustively (within bounds) on this code.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{debug, info};

use crate::placement::view::{Epoch, Member, ServerId, View};
use crate::wire::message::{Request, TxId, TxOutcome};

/// How long after its deadline a non-primary waits before asking, so the primary (whose
/// deadline is about the same) decides first.
const TERMINATION_GRACE: Duration = Duration::from_millis(300);
/// Time between termination rounds while nobody knows the outcome.
const TERMINATION_RETRY: Duration = Duration::from_millis(500);
/// The longest a participant waits for a decision before it starts asking, whatever the
/// coordinator said.
const MAX_DECISION_WAIT: Duration = Duration::from_secs(30);
/// How long decided outcomes are remembered (answering late queries and late prepares).
const DECIDED_TTL: Duration = Duration::from_secs(120);
/// The most decided outcomes remembered of transactions prepared or asked about here (the
/// oldest are forgotten first; a termination query about a forgotten commit is still
/// answered from the bucket's last transaction, while a late `Commit` for it gets
/// `not_found` and changes nothing).
pub const DECIDED_MAX: usize = 200_000;
/// The most aborts remembered for transactions never prepared here (an abort that overtook
/// its prepare, or one from a stranger): kept apart from [`DECIDED_MAX`], so a flood of
/// aborts for made-up transactions never pushes out the outcomes of real ones. The oldest
/// are forgotten first; forgetting one only lets its late prepare lock the key until its
/// deadline.
pub const UNSEEN_ABORTS_MAX: usize = 100_000;
/// The most transactions pending (voted yes, undecided) at once; more are voted down.
pub const PENDING_MAX: usize = 10_000;
/// The most bytes of values pending at once; more are voted down.
pub const PENDING_BYTES_MAX: usize = 256 << 20;
/// The most keys whose commit this server (as the primary) is still passing on to the other
/// replicas. A prepare that would make this server the primary of one more is voted down
/// beyond it (so at most this many plus [`PENDING_MAX`] ever settle at once).
pub const MAX_SETTLING: usize = 10_000;

/// A `Prepare` request's arguments.
#[derive(Clone, Debug)]
pub struct PrepareArgs {
    /// The transaction.
    pub txid: TxId,
    /// The key.
    pub key: String,
    /// The value.
    pub value: String,
    /// The coordinator's epoch.
    pub epoch: Epoch,
    /// The id the coordinator expects us to have.
    pub expected: ServerId,
    /// All replicas in ring order; the first is the primary.
    pub participants: Vec<Member>,
    /// The coordinator's remaining time.
    pub timeout: Duration,
}

/// What the server knows that a prepare is judged against (see [`Participant::prepare`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrepareContext {
    /// This server's current id.
    pub me: ServerId,
    /// The epoch of the view this server learned last.
    pub epoch: Epoch,
    /// This server holds the key's latest committed version in that view: it finished the
    /// epoch, or it stayed the key's replica in every view since the last epoch it finished
    /// (see `server::readiness`).
    pub ready: bool,
    /// The key's replicas in ring order in that view (`None` before any view is learned).
    pub replicas: Option<Vec<Member>>,
    /// Keys whose commit this server, as their primary, is still passing on to the others.
    pub settling: usize,
}

/// A `QueryTx` request's arguments.
#[derive(Clone, Debug)]
pub struct QueryArgs {
    /// The transaction.
    pub txid: TxId,
    /// The id the asker expects us to have.
    pub expected: ServerId,
    /// The transaction's primary.
    pub primary: ServerId,
    /// The asker will abort if nobody committed: refuse later coordinator commits.
    pub close: bool,
}

/// One round of termination queries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct Round {
    /// Outstanding queries: token → the peer asked.
    asked: BTreeMap<u64, ServerId>,
    /// Non-primary peers that must answer before the asker may abort (unless they left the
    /// view).
    needed: Vec<ServerId>,
    /// Peers that answered this round without a decision.
    answered: Vec<ServerId>,
    /// The queries carried `close` (the primary had left the view).
    close: bool,
}

/// A transaction this participant voted yes on and has no decision for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Pending {
    /// The key it locks.
    key: String,
    /// The value it would write.
    value: String,
    /// All replicas in ring order.
    participants: Vec<Member>,
    /// This participant is the primary (the commit point).
    is_primary: bool,
    /// The coordinator should have decided by then.
    deadline: Instant,
    /// When to start (or repeat) the termination queries (non-primary only).
    next_query: Instant,
    /// The current termination round.
    round: Round,
    /// A peer announced it will abort unless someone committed: a commit from the
    /// coordinator, or the primary's `Committed` answer, is refused from now on (the closer
    /// may already have aborted on our `Prepared`). A non-primary peer's `Committed` is still
    /// followed: that peer committed before the closer asked it, so the closer cannot abort.
    closed: bool,
}

/// What this participant remembers of a decided (or never seen) transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Record {
    /// Committed with this version.
    Committed(u64),
    /// Aborted (by the coordinator, the primary's deadline, or termination).
    Aborted,
    /// Never prepared here, but asked about: a late prepare is refused. Answers `Unknown`
    /// (`Aborted` at the primary).
    Tombstone,
}

/// A committed write the server must apply to its bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// The transaction.
    pub txid: TxId,
    /// The key.
    pub key: String,
    /// The value.
    pub value: String,
    /// Its version.
    pub version: u64,
    /// All replicas in ring order (the first is the primary): the primary passes the commit
    /// on to the others.
    pub participants: Vec<Member>,
}

/// What a participant wants done after an input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Apply this committed write to the bucket; the key is unlocked.
    Apply(Write),
    /// The key is unlocked without a write (the transaction aborted).
    Release(String),
    /// Send a termination query to `dst`; report the answer with `token`.
    Query {
        /// The participant's tag for the answer.
        token: u64,
        /// Who to ask.
        dst: SocketAddr,
        /// The query.
        query: Request,
    },
}

/// Why a participant voted no on a prepare.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VoteNo {
    /// The transaction was aborted here already (or a peer asked about it before its prepare
    /// arrived).
    #[error("transaction {0} was already aborted here")]
    AlreadyAborted(TxId),
    /// The transaction was committed here already.
    #[error("transaction {0} was already decided")]
    AlreadyDecided(TxId),
    /// The coordinator expected another server id (this server restarted or rejoined).
    #[error("server id mismatch: expected {expected}, this is {me}")]
    IdMismatch {
        /// The id the coordinator expected.
        expected: ServerId,
        /// Our id.
        me: ServerId,
    },
    /// The coordinator computed the replicas from a view newer than ours (we have not
    /// learned it yet; the key may have moved here in it).
    #[error("epoch mismatch: the coordinator is at epoch {theirs}, this replica at {ours}")]
    EpochMismatch {
        /// The coordinator's epoch.
        theirs: Epoch,
        /// Ours.
        ours: Epoch,
    },
    /// The key is not settled here in this epoch yet (its copy may still be on its way).
    #[error("key {key:?} is not settled at this replica in epoch {epoch} yet (rebalancing)")]
    Rebalancing {
        /// The key.
        key: String,
        /// This server's epoch.
        epoch: Epoch,
    },
    /// This server has not learned a view, so it cannot tell the key's replicas.
    #[error("this replica has not learned a view yet")]
    NoView,
    /// The participants named are not the key's replicas in our view, in ring order (a
    /// forged prepare cannot name peers of its choosing).
    #[error("the participants are not {key:?}'s replicas at epoch {epoch}")]
    NotTheReplicas {
        /// The key.
        key: String,
        /// Our epoch.
        epoch: Epoch,
    },
    /// This server would be the primary of one more commit to pass on, beyond
    /// [`MAX_SETTLING`].
    #[error("too many commits are settling here ({0} keys, at most {MAX_SETTLING})")]
    SettlingFull(usize),
    /// This server is not among the participants named (they are the key's replicas, and
    /// this server is not one).
    #[error("{0} is not among the participants")]
    NotAParticipant(ServerId),
    /// Another transaction holds the key.
    #[error("key {key:?} has a pending commit ({holder})")]
    KeyLocked {
        /// The key.
        key: String,
        /// The transaction holding it.
        holder: TxId,
    },
    /// The pending table is full ([`PENDING_MAX`] transactions or [`PENDING_BYTES_MAX`] bytes
    /// of values).
    #[error(
        "too many transactions are pending here ({pending} of at most {PENDING_MAX}, \
         {bytes} bytes of values of at most {PENDING_BYTES_MAX})"
    )]
    Full {
        /// Transactions pending.
        pending: usize,
        /// Bytes of values pending, this prepare's included.
        bytes: usize,
    },
}

impl VoteNo {
    /// True for a no forced by a bound on what this server holds ([`VoteNo::Full`],
    /// [`VoteNo::SettlingFull`]) rather than by the transaction itself: such votes are counted.
    pub fn is_bound(&self) -> bool {
        matches!(self, VoteNo::Full { .. } | VoteNo::SettlingFull(_))
    }
}

/// Why a commit was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitRefusal {
    /// The transaction was aborted here (the primary's deadline passed, or termination).
    Aborted,
    /// A peer is settling the outcome without the coordinator (the primary left the view).
    Closed,
    /// No record of the transaction: it was never prepared here, or it was decided so long
    /// ago that the outcome is forgotten. Nothing changed.
    Unknown,
}

/// The participant table of one server.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Participant {
    /// Transactions voted yes on and undecided.
    pending: BTreeMap<TxId, Pending>,
    /// Bytes of values held by pending transactions.
    pending_bytes: usize,
    /// Which transaction locks each key.
    locked: BTreeMap<String, TxId>,
    /// Decided outcomes and tombstones.
    decided: BTreeMap<TxId, Record>,
    /// The order outcomes of transactions prepared or asked about here were recorded, for
    /// forgetting them (at most [`DECIDED_MAX`]).
    decided_order: VecDeque<(TxId, Instant)>,
    /// The order aborts of transactions never prepared here were recorded, for forgetting
    /// them (at most [`UNSEEN_ABORTS_MAX`]).
    unseen_order: VecDeque<(TxId, Instant)>,
    /// The last token handed out for a termination query.
    last_token: u64,
    /// Which transaction each outstanding termination query is about.
    queries: BTreeMap<u64, TxId>,
}

impl Participant {
    /// An empty participant table.
    pub fn new() -> Participant {
        Participant::default()
    }

    /// True if a prepared transaction holds `key`.
    pub fn is_locked(&self, key: &str) -> bool {
        self.locked.contains_key(key)
    }

    /// Number of undecided transactions.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// The transactions voted yes on and not decided yet.
    pub fn pending_txids(&self) -> impl Iterator<Item = TxId> + '_ {
        self.pending.keys().copied()
    }

    /// Number of outcomes remembered (decided transactions, tombstones, and aborts of
    /// transactions never prepared here).
    pub fn remembered_count(&self) -> usize {
        self.decided.len()
    }

    /// True if this participant knows `txid`: it is pending here, or its outcome (or a
    /// tombstone) is remembered. A commit for a transaction not known changes nothing.
    pub fn knows(&self, txid: TxId) -> bool {
        self.pending.contains_key(&txid) || self.decided.contains_key(&txid)
    }

    /// Votes at `now` on a prepare, judging every check in one order against `ctx` (what
    /// the server knows); `current` is the bucket's version of the key. Returns `Ok(current)`
    /// for a yes vote (also for a prepare already voted yes on), or the first reason for a no:
    /// identity and epoch first (they are the precise reasons a replica restarted on the same
    /// address, or one behind on the view, votes no), then rebalancing, the participants, the
    /// settling bound, the transaction's record, membership among the participants, the
    /// key's lock and the pending bounds.
    pub fn prepare(
        &mut self,
        now: Instant,
        ctx: &PrepareContext,
        args: PrepareArgs,
        current: Option<u64>,
    ) -> Result<Option<u64>, VoteNo> {
        let me = ctx.me;
        if args.expected != me {
            return Err(VoteNo::IdMismatch {
                expected: args.expected,
                me,
            });
        }
        // A coordinator behind us is judged by the participants below: if they are still
        // the key's replicas, a commit reaching them all reaches every current replica.
        if args.epoch > ctx.epoch {
            return Err(VoteNo::EpochMismatch {
                theirs: args.epoch,
                ours: ctx.epoch,
            });
        }
        if !ctx.ready {
            return Err(VoteNo::Rebalancing {
                key: args.key,
                epoch: ctx.epoch,
            });
        }
        let Some(replicas) = &ctx.replicas else {
            return Err(VoteNo::NoView);
        };
        if *replicas != args.participants {
            return Err(VoteNo::NotTheReplicas {
                key: args.key,
                epoch: ctx.epoch,
            });
        }
        let primary = args.participants.first().is_some_and(|m| m.id == me);
        if primary && ctx.settling >= MAX_SETTLING {
            return Err(VoteNo::SettlingFull(ctx.settling));
        }
        match self.decided.get(&args.txid) {
            Some(Record::Aborted | Record::Tombstone) => {
                return Err(VoteNo::AlreadyAborted(args.txid));
            }
            Some(Record::Committed(_)) => return Err(VoteNo::AlreadyDecided(args.txid)),
            None => {}
        }
        if self.pending.contains_key(&args.txid) {
            return Ok(current);
        }
        let Some(position) = args.participants.iter().position(|m| m.id == me) else {
            return Err(VoteNo::NotAParticipant(me));
        };
        if let Some(&holder) = self.locked.get(&args.key) {
            return Err(VoteNo::KeyLocked {
                key: args.key,
                holder,
            });
        }
        let bytes = self.pending_bytes + args.value.len();
        if self.pending.len() >= PENDING_MAX || bytes > PENDING_BYTES_MAX {
            return Err(VoteNo::Full {
                pending: self.pending.len(),
                bytes,
            });
        }
        let deadline = now + args.timeout.min(MAX_DECISION_WAIT);
        self.pending_bytes += args.value.len();
        let previous = self.locked.insert(args.key.clone(), args.txid);
        debug_assert!(
            previous.is_none(),
            "at most one pending transaction per key"
        );
        let replaced = self.pending.insert(
            args.txid,
            Pending {
                key: args.key,
                value: args.value,
                participants: args.participants,
                is_primary: position == 0,
                deadline,
                next_query: deadline + TERMINATION_GRACE,
                round: Round::default(),
                closed: false,
            },
        );
        debug_assert!(
            replaced.is_none(),
            "transaction {} prepared twice",
            args.txid
        );
        debug_assert_eq!(
            self.locked.len(),
            self.pending.len(),
            "a lock per pending write"
        );
        Ok(current)
    }

    /// Applies the coordinator's commit decision. Returns the write to apply, `Ok(None)` if it
    /// was already committed (a duplicate), or why it is refused.
    pub fn commit(
        &mut self,
        now: Instant,
        txid: TxId,
        version: u64,
    ) -> Result<Option<Write>, CommitRefusal> {
        match self.decided.get(&txid) {
            Some(Record::Committed(_)) => return Ok(None),
            Some(Record::Aborted | Record::Tombstone) => return Err(CommitRefusal::Aborted),
            None => {}
        }
        match self.pending.get(&txid) {
            None => Err(CommitRefusal::Unknown),
            Some(p) if p.closed => Err(CommitRefusal::Closed),
            Some(_) => Ok(self.settle_commit(now, txid, version)),
        }
    }

    /// Commits pending transaction `txid` with `version` (the coordinator or a peer said so).
    fn settle_commit(&mut self, now: Instant, txid: TxId, version: u64) -> Option<Write> {
        let pending = self.pending.remove(&txid)?;
        self.pending_bytes -= pending.value.len();
        self.locked.remove(&pending.key);
        debug_assert_eq!(
            self.locked.len(),
            self.pending.len(),
            "a lock per pending write"
        );
        self.decide(now, txid, Record::Committed(version));
        Some(Write {
            txid,
            key: pending.key,
            value: pending.value,
            version,
            participants: pending.participants,
        })
    }

    /// Applies an abort decision; returns the key it unlocks, if it held one. An abort for a
    /// transaction never prepared here unlocks nothing; it is recorded (apart, at most
    /// [`UNSEEN_ABORTS_MAX`]), so a late prepare is refused. A committed one stays committed.
    pub fn abort(&mut self, now: Instant, txid: TxId) -> Option<String> {
        if let Some(pending) = self.pending.remove(&txid) {
            self.pending_bytes -= pending.value.len();
            self.locked.remove(&pending.key);
            debug_assert_eq!(
                self.locked.len(),
                self.pending.len(),
                "a lock per pending write"
            );
            self.decide(now, txid, Record::Aborted);
            return Some(pending.key);
        }
        match self.decided.get_mut(&txid) {
            Some(Record::Committed(_)) => {}
            // Already in a table: the record changes, its place in the order does not.
            Some(record) => *record = Record::Aborted,
            None => {
                self.decided.insert(txid, Record::Aborted);
                self.unseen_order.push_back((txid, now));
                while self.unseen_order.len() > UNSEEN_ABORTS_MAX {
                    if let Some((old, _)) = self.unseen_order.pop_front() {
                        self.decided.remove(&old);
                    }
                }
            }
        }
        None
    }

    /// Answers a termination query. `me` is our id; `last_committed` is the last transaction
    /// committed on the query's key in our bucket (with its version). Also returns the key
    /// unlocked, if any.
    pub fn query(
        &mut self,
        now: Instant,
        me: ServerId,
        args: &QueryArgs,
        last_committed: Option<(TxId, u64)>,
    ) -> (TxOutcome, Option<String>) {
        if args.expected != me {
            return (TxOutcome::Unknown, None);
        }
        let txid = args.txid;
        match self.decided.get(&txid) {
            Some(Record::Committed(version)) => {
                return (TxOutcome::Committed { version: *version }, None);
            }
            Some(Record::Aborted) => return (TxOutcome::Aborted, None),
            Some(Record::Tombstone) if args.primary != me => return (TxOutcome::Unknown, None),
            Some(Record::Tombstone) => return (TxOutcome::Aborted, None),
            None => {}
        }
        if let Some(pending) = self.pending.get_mut(&txid) {
            if pending.is_primary && now >= pending.deadline {
                info!("transaction {txid}: undecided past the primary's deadline; aborting");
                let key = self.abort(now, txid);
                return (TxOutcome::Aborted, key);
            }
            if args.close && !pending.closed {
                info!(
                    "transaction {txid}: a peer is settling it; refusing the coordinator's commit"
                );
                pending.closed = true;
            }
            return (TxOutcome::Prepared, None);
        }
        // No record (or a forgotten one): the bucket says whether this transaction committed
        // here (nothing else can have committed on the key while the asker holds its lock).
        if let Some((last, version)) = last_committed
            && last == txid
        {
            return (TxOutcome::Committed { version }, None);
        }
        if args.primary == me {
            // The commit point itself: not committed here, so never.
            self.decide(now, txid, Record::Aborted);
            return (TxOutcome::Aborted, None);
        }
        self.decide(now, txid, Record::Tombstone);
        (TxOutcome::Unknown, None)
    }

    /// Learns at `now` that the view is `view`: a non-primary participant whose transaction's
    /// primary is no longer in it asks its peers at once (a closing round, see the module
    /// doc) instead of waiting for the coordinator's deadline. A primary that left the view
    /// (declared dead: frozen, cut off, crashed) decides nothing any more, and every replica
    /// holding the prepare would otherwise hold the key (reads and writes) until that
    /// deadline. The round is the same one the deadline would start, only sooner; the model
    /// checker runs it at each survivor's view transition. Returns true if a round is now due.
    pub fn on_view(&mut self, now: Instant, view: &View) -> bool {
        let mut due = false;
        for pending in self.pending.values_mut() {
            let gone = pending
                .participants
                .first()
                .is_some_and(|primary| !view.contains(primary.id));
            if !pending.is_primary
                && gone
                && pending.round.asked.is_empty()
                && pending.next_query > now
            {
                pending.next_query = now;
                due = true;
            }
        }
        due
    }

    /// The earliest instant at which [`Participant::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let pending = self
            .pending
            .values()
            .map(|p| {
                if p.is_primary {
                    p.deadline
                } else {
                    p.next_query
                }
            })
            .min();
        let forget = self.decided_order.front().map(|&(_, at)| at + DECIDED_TTL);
        let forget_unseen = self.unseen_order.front().map(|&(_, at)| at + DECIDED_TTL);
        [pending, forget, forget_unseen].into_iter().flatten().min()
    }

    /// Runs due timers: a primary past its deadline aborts; a non-primary past its deadline
    /// starts a termination round. `view` is our latest view (is the primary still in it?).
    /// Returns the effects to carry out.
    pub fn handle_timeout(
        &mut self,
        now: Instant,
        me: ServerId,
        view: Option<&View>,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        let due: Vec<TxId> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                if p.is_primary {
                    now >= p.deadline
                } else {
                    now >= p.next_query
                }
            })
            .map(|(&txid, _)| txid)
            .collect();
        for txid in due {
            let Some(pending) = self.pending.get_mut(&txid) else {
                continue;
            };
            if pending.is_primary {
                info!("transaction {txid}: no decision by the primary's deadline; aborting");
                if let Some(key) = self.abort(now, txid) {
                    effects.push(Effect::Release(key));
                }
                continue;
            }
            let Some(primary) = pending.participants.first().copied() else {
                continue;
            };
            let close = view.is_some_and(|v| !v.contains(primary.id));
            // A closing round also asks every other server of the view: a participant that
            // left the view is not gone with its bucket if rebalancing copied its bucket (a
            // commit of this transaction included) to another server meanwhile. Such a
            // holder answers `Committed` from its bucket (transfers carry the txid).
            let others: Vec<Member> = match view {
                Some(v) if close => v
                    .members
                    .iter()
                    .copied()
                    .filter(|m| m.id != me && !pending.participants.iter().any(|p| p.id == m.id))
                    .collect(),
                _ => Vec::new(),
            };
            pending.next_query = now + TERMINATION_RETRY;
            pending.round = Round {
                asked: BTreeMap::new(),
                needed: pending
                    .participants
                    .iter()
                    .map(|m| m.id)
                    .filter(|&id| id != me && id != primary.id)
                    .chain(others.iter().map(|m| m.id))
                    .collect(),
                answered: Vec::new(),
                close,
            };
            let peers: Vec<Member> = pending
                .participants
                .iter()
                .copied()
                .filter(|m| m.id != me)
                .chain(others)
                .collect();
            debug!(
                "transaction {txid}: no decision yet; asking {} peers (close: {close})",
                peers.len()
            );
            let key = pending.key.clone();
            for peer in peers {
                self.last_token += 1;
                let token = self.last_token;
                self.queries.insert(token, txid);
                if let Some(pending) = self.pending.get_mut(&txid) {
                    pending.round.asked.insert(token, peer.id);
                }
                let query = Request::QueryTx {
                    txid,
                    key: key.clone(),
                    expected: peer.id,
                    primary: primary.id,
                    close,
                };
                effects.push(Effect::Query {
                    token,
                    dst: peer.addr,
                    query,
                });
            }
            // With no other participant to hear from, a closing round decides at once.
            effects.extend(self.conclude_round(now, txid, view));
        }
        for order in [&mut self.decided_order, &mut self.unseen_order] {
            while let Some(&(txid, at)) = order.front() {
                if at + DECIDED_TTL > now {
                    break;
                }
                order.pop_front();
                self.decided.remove(&txid);
            }
        }
        effects
    }

    /// Handles the answer to termination query `token` (`None` if the peer did not answer).
    /// `view` is this server's latest view, used to tell whether the primary is gone.
    pub fn handle_query_answer(
        &mut self,
        now: Instant,
        token: u64,
        answer: Option<TxOutcome>,
        view: Option<&View>,
    ) -> Vec<Effect> {
        let Some(txid) = self.queries.remove(&token) else {
            return Vec::new();
        };
        if !self
            .pending
            .get(&txid)
            .is_some_and(|p| p.round.asked.contains_key(&token))
        {
            return Vec::new(); // decided meanwhile, or an answer from an earlier round
        }
        match answer {
            Some(TxOutcome::Committed { .. }) if self.closed_primary_answer(txid, token) => {
                info!(
                    "transaction {txid}: the primary committed it, but a peer closed it here and \
                     may have aborted; ignoring"
                );
                if let Some(pending) = self.pending.get_mut(&txid) {
                    pending.round.asked.remove(&token);
                }
                self.conclude_round(now, txid, view)
            }
            Some(TxOutcome::Committed { version }) => {
                info!("transaction {txid}: a peer committed it (version {version}); committing");
                self.settle_commit(now, txid, version)
                    .map(Effect::Apply)
                    .into_iter()
                    .collect()
            }
            Some(TxOutcome::Aborted) => {
                info!("transaction {txid}: a peer aborted it; aborting");
                self.abort(now, txid)
                    .map(Effect::Release)
                    .into_iter()
                    .collect()
            }
            Some(TxOutcome::Prepared | TxOutcome::Unknown) => {
                if let Some(pending) = self.pending.get_mut(&txid)
                    && let Some(peer) = pending.round.asked.remove(&token)
                {
                    pending.round.answered.push(peer);
                }
                self.conclude_round(now, txid, view)
            }
            None => {
                if let Some(pending) = self.pending.get_mut(&txid) {
                    pending.round.asked.remove(&token);
                }
                self.conclude_round(now, txid, view)
            }
        }
    }

    /// True if `token`'s answer comes from `txid`'s primary and a peer closed `txid` here: a
    /// closer may already have aborted on our promise, so the primary's commit is not followed.
    fn closed_primary_answer(&self, txid: TxId, token: u64) -> bool {
        self.pending.get(&txid).is_some_and(|p| {
            p.closed && p.round.asked.get(&token) == p.participants.first().map(|m| &m.id)
        })
    }

    /// Aborts `txid` if its current round allows it: the primary is out of `view`, the round
    /// asked everyone to close, and every other participant still in `view` answered without
    /// a decision.
    fn conclude_round(&mut self, now: Instant, txid: TxId, view: Option<&View>) -> Vec<Effect> {
        let Some(pending) = self.pending.get(&txid) else {
            return Vec::new();
        };
        let primary_gone = pending
            .participants
            .first()
            .is_some_and(|p| view.is_some_and(|v| !v.contains(p.id)));
        let round = &pending.round;
        // A peer that left the view is gone with its bucket, as the primary is.
        let everyone_answered = round
            .needed
            .iter()
            .all(|&id| round.answered.contains(&id) || view.is_some_and(|v| !v.contains(id)));
        if !(round.close && primary_gone && everyone_answered) {
            return Vec::new();
        }
        info!("transaction {txid}: the primary left the view and no peer committed; aborting");
        self.abort(now, txid)
            .map(Effect::Release)
            .into_iter()
            .collect()
    }

    /// Records `record` for `txid`, forgetting the oldest records beyond the cap.
    fn decide(&mut self, now: Instant, txid: TxId, record: Record) {
        self.decided.insert(txid, record);
        self.decided_order.push_back((txid, now));
        while self.decided_order.len() > DECIDED_MAX {
            if let Some((old, _)) = self.decided_order.pop_front() {
                self.decided.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member with id `n` on port `n`.
    fn member(n: u128) -> Member {
        Member {
            id: ServerId(n),
            addr: SocketAddr::from(([127, 0, 0, 1], n as u16)),
        }
    }

    /// A prepare of `key` by transaction `tx` with participants 1, 2, 3 (1 is the primary).
    fn prepare(tx: u128, key: &str, expected: u128) -> PrepareArgs {
        PrepareArgs {
            txid: TxId(tx),
            key: key.into(),
            value: format!("value of {tx}"),
            epoch: Epoch(4),
            expected: ServerId(expected),
            participants: vec![member(1), member(2), member(3)],
            timeout: Duration::from_secs(2),
        }
    }

    /// What server `me` at `epoch` knows: not rebalancing, the key's replicas are 1, 2, 3,
    /// nothing settling.
    fn ctx(me: u128, epoch: u64) -> PrepareContext {
        PrepareContext {
            me: ServerId(me),
            epoch: Epoch(epoch),
            ready: true,
            replicas: Some(vec![member(1), member(2), member(3)]),
            settling: 0,
        }
    }

    /// A query about `tx` addressed to server `to` (primary 1).
    fn ask(tx: u128, to: u128, close: bool) -> QueryArgs {
        QueryArgs {
            txid: TxId(tx),
            expected: ServerId(to),
            primary: ServerId(1),
            close,
        }
    }

    /// A view holding servers `ids`.
    fn view(ids: &[u128]) -> View {
        View {
            epoch: Epoch(9),
            members: ids.iter().map(|&n| member(n)).collect(),
            replicas: 3,
            vnodes: 1,
        }
    }

    /// Starts a termination round at participant `me` (past its deadline) and returns the
    /// query token per peer id.
    fn start_round(p: &mut Participant, me: u128, at: Instant, v: &View) -> BTreeMap<u128, u64> {
        p.handle_timeout(at, ServerId(me), Some(v))
            .into_iter()
            .filter_map(|e| match e {
                Effect::Query {
                    token,
                    query: Request::QueryTx { expected, .. },
                    ..
                } => Some((expected.0, token)),
                _ => None,
            })
            .collect()
    }

    /// Assignment 3.3: a second commit on a pending key is refused; another key proceeds.
    #[test]
    fn a_pending_key_refuses_a_second_transaction_but_others_proceed() {
        let now = Instant::now();
        let mut p = Participant::new();
        assert_eq!(
            p.prepare(now, &ctx(2, 4), prepare(10, "k", 2), Some(3)),
            Ok(Some(3))
        );
        let second = p.prepare(now, &ctx(2, 4), prepare(11, "k", 2), Some(3));
        assert!(second.unwrap_err().to_string().contains("pending commit"));
        assert!(
            p.prepare(now, &ctx(2, 4), prepare(12, "other", 2), None)
                .is_ok()
        );
        assert!(p.is_locked("k") && p.is_locked("other"));
    }

    /// Assignment 3.3: a commit fails if the participant's id is not the expected one, or
    /// its epoch is behind the coordinator's (issue 17: a coordinator *behind* is judged by
    /// the key's replicas instead, see the next test).
    #[test]
    fn epoch_or_id_mismatch_votes_no() {
        let now = Instant::now();
        let mut p = Participant::new();
        let wrong_id = p.prepare(now, &ctx(2, 4), prepare(1, "k", 3), None);
        assert!(wrong_id.unwrap_err().to_string().contains("id mismatch"));
        let wrong_epoch = p.prepare(now, &ctx(2, 3), prepare(2, "k", 2), None);
        assert!(
            wrong_epoch
                .unwrap_err()
                .to_string()
                .contains("epoch mismatch")
        );
        assert!(!p.is_locked("k"));
    }

    /// Issue 17: a participant that learns a view without its transaction's primary starts
    /// termination at once (its timer is due now, not at the coordinator's deadline); one
    /// whose primary is still there keeps waiting, and a primary has nothing to start.
    #[test]
    fn a_view_without_the_primary_makes_termination_due_at_once() {
        let now = Instant::now();
        let view = |ids: &[u128]| View {
            epoch: Epoch(5),
            members: ids.iter().map(|&n| member(n)).collect(),
            replicas: 3,
            vnodes: 8,
        };
        let mut p = Participant::new();
        p.prepare(now, &ctx(2, 4), prepare(1, "k", 2), None)
            .expect("yes");
        let later = now + Duration::from_millis(10);
        assert!(!p.on_view(later, &view(&[1, 2, 3])));
        assert!(
            p.poll_timeout()
                .is_some_and(|t| t > later + Duration::from_secs(1))
        );
        assert!(p.on_view(later, &view(&[2, 3])));
        assert_eq!(p.poll_timeout(), Some(later));
        let effects = p.handle_timeout(later, ServerId(2), Some(&view(&[2, 3])));
        assert!(
            effects.iter().any(|e| matches!(
                e,
                Effect::Query {
                    query: Request::QueryTx { close: true, .. },
                    ..
                }
            )),
            "a closing round: {effects:?}"
        );
        let mut primary = Participant::new();
        primary
            .prepare(now, &ctx(1, 4), prepare(1, "k", 1), None)
            .expect("yes");
        assert!(!primary.on_view(later, &view(&[2, 3])));
    }

    /// Issue 17: a prepare from a coordinator at an older epoch is voted on by whether the
    /// key's replicas changed since: the same replicas (a view change elsewhere in the ring)
    /// vote yes; other replicas vote no, and so does a replica where the key is not settled.
    #[test]
    fn an_older_coordinator_is_judged_by_the_keys_replicas() {
        let now = Instant::now();
        let mut p = Participant::new();
        assert_eq!(
            p.prepare(now, &ctx(2, 7), prepare(1, "k", 2), None),
            Ok(None)
        );
        let mut moved = prepare(2, "other", 2);
        moved.participants.reverse();
        assert!(matches!(
            p.prepare(now, &ctx(2, 7), moved, None),
            Err(VoteNo::NotTheReplicas { .. })
        ));
        let unsettled = PrepareContext {
            ready: false,
            ..ctx(2, 7)
        };
        assert!(matches!(
            p.prepare(now, &unsettled, prepare(3, "third", 2), None),
            Err(VoteNo::Rebalancing { .. })
        ));
    }

    /// One place for the prepare checks (issue 15): a replica restarted on the same address
    /// (a fresh id, no view learned yet) reports the id mismatch, naming the expected id,
    /// before anything else it could say (epoch, no view).
    #[test]
    fn the_id_mismatch_comes_first() {
        let now = Instant::now();
        let mut p = Participant::new();
        let restarted = PrepareContext {
            epoch: Epoch(0),
            replicas: None,
            ..ctx(9, 4)
        };
        let vote = p.prepare(now, &restarted, prepare(1, "k", 2), None);
        assert_eq!(
            vote,
            Err(VoteNo::IdMismatch {
                expected: ServerId(2),
                me: ServerId(9)
            })
        );
        let vote = p.prepare(
            now,
            &PrepareContext {
                me: ServerId(2),
                ..restarted
            },
            prepare(1, "k", 2),
            None,
        );
        assert!(
            matches!(vote, Err(VoteNo::EpochMismatch { .. })),
            "{vote:?}"
        );
    }

    /// Assignment 3.4 (no commit while rebalancing), per key since issue 17: a replica
    /// where the key is not settled yet votes no, naming the key and epoch, and locks nothing.
    #[test]
    fn a_replica_where_the_key_is_not_settled_votes_no() {
        let now = Instant::now();
        let mut p = Participant::new();
        let rebalancing = PrepareContext {
            ready: false,
            ..ctx(2, 4)
        };
        let vote = p.prepare(now, &rebalancing, prepare(1, "k", 2), None);
        assert_eq!(
            vote,
            Err(VoteNo::Rebalancing {
                key: "k".into(),
                epoch: Epoch(4)
            })
        );
        assert_eq!(
            vote.unwrap_err().to_string(),
            "key \"k\" is not settled at this replica in epoch 4 yet (rebalancing)"
        );
        assert!(!p.is_locked("k"));
    }

    /// A replica that has learned no view cannot tell the key's replicas: it votes no.
    #[test]
    fn a_replica_without_a_view_votes_no() {
        let now = Instant::now();
        let mut p = Participant::new();
        let blind = PrepareContext {
            replicas: None,
            ..ctx(2, 4)
        };
        let vote = p.prepare(now, &blind, prepare(1, "k", 2), None);
        assert_eq!(vote, Err(VoteNo::NoView));
        assert_eq!(
            vote.unwrap_err().to_string(),
            "this replica has not learned a view yet"
        );
    }

    /// Issue 8 (membership): a prepare naming other participants than the key's replicas
    /// in our view (another set, or another order) is voted down, so a forged prepare cannot
    /// name peers of its choosing.
    #[test]
    fn participants_other_than_the_replicas_vote_no() {
        let now = Instant::now();
        let mut p = Participant::new();
        let mut reordered = prepare(1, "k", 2);
        reordered.participants.swap(0, 1);
        let vote = p.prepare(now, &ctx(2, 4), reordered, None);
        assert_eq!(
            vote.clone().unwrap_err().to_string(),
            "the participants are not \"k\"'s replicas at epoch 4"
        );
        assert!(matches!(vote, Err(VoteNo::NotTheReplicas { .. })));
        assert!(!p.is_locked("k"));
    }

    /// A prepare whose participants are the key's replicas, but not this server, is voted
    /// down (this server does not hold the key).
    #[test]
    fn a_server_that_is_no_replica_of_the_key_votes_no() {
        let now = Instant::now();
        let mut p = Participant::new();
        let vote = p.prepare(now, &ctx(5, 4), prepare(1, "k", 5), None);
        assert_eq!(vote, Err(VoteNo::NotAParticipant(ServerId(5))));
        assert!(!p.is_locked("k"));
    }

    /// Issue 8 (bounded resources): the primary of a key votes no beyond [`MAX_SETTLING`]
    /// commits still settling (counted as a bound); a non-primary is not concerned.
    #[test]
    fn a_primary_with_too_many_settling_commits_votes_no() {
        let now = Instant::now();
        let mut p = Participant::new();
        let busy = |me| PrepareContext {
            settling: MAX_SETTLING,
            ..ctx(me, 4)
        };
        let vote = p.prepare(now, &busy(1), prepare(1, "k", 1), None);
        assert_eq!(vote, Err(VoteNo::SettlingFull(MAX_SETTLING)));
        assert!(vote.unwrap_err().is_bound());
        assert!(p.prepare(now, &busy(2), prepare(2, "k", 2), None).is_ok());
    }

    /// A prepare for a transaction committed here already is voted down; one voted yes on and
    /// undecided is voted yes again (a duplicate).
    #[test]
    fn a_prepare_of_a_decided_transaction_votes_no() {
        let now = Instant::now();
        let mut p = Participant::new();
        assert!(p.prepare(now, &ctx(2, 4), prepare(7, "k", 2), None).is_ok());
        assert_eq!(
            p.prepare(now, &ctx(2, 4), prepare(7, "k", 2), Some(1)),
            Ok(Some(1)),
            "a duplicate of a pending prepare"
        );
        p.commit(now, TxId(7), 3).unwrap();
        assert_eq!(
            p.prepare(now, &ctx(2, 4), prepare(7, "k", 2), None),
            Err(VoteNo::AlreadyDecided(TxId(7)))
        );
        p.abort(now, TxId(8));
        assert_eq!(
            p.prepare(now, &ctx(2, 4), prepare(8, "k", 2), None),
            Err(VoteNo::AlreadyAborted(TxId(8)))
        );
    }

    /// Commit applies the write with the coordinator's version and unlocks the key; a
    /// duplicate commit is harmless; an abort after it changes nothing.
    #[test]
    fn commit_applies_once_and_unlocks() {
        let now = Instant::now();
        let mut p = Participant::new();
        p.prepare(now, &ctx(2, 4), prepare(7, "k", 2), None)
            .unwrap();
        let write = p.commit(now, TxId(7), 5).unwrap().unwrap();
        assert_eq!((write.key.as_str(), write.version), ("k", 5));
        assert!(!p.is_locked("k"));
        assert_eq!(p.commit(now, TxId(7), 5), Ok(None));
        assert_eq!(p.abort(now, TxId(7)), None);
        assert_eq!(
            p.query(now, ServerId(2), &ask(7, 2, false), None).0,
            TxOutcome::Committed { version: 5 }
        );
    }

    /// Assignment 3.4: a failed commit is aborted and the key can be retried at once; an abort
    /// for a transaction never seen refuses its late prepare.
    #[test]
    fn abort_unlocks_and_refuses_a_late_prepare() {
        let now = Instant::now();
        let mut p = Participant::new();
        p.prepare(now, &ctx(2, 4), prepare(7, "k", 2), None)
            .unwrap();
        assert_eq!(p.abort(now, TxId(7)), Some("k".to_string()));
        assert!(p.prepare(now, &ctx(2, 4), prepare(8, "k", 2), None).is_ok());
        assert_eq!(p.abort(now, TxId(99)), None);
        assert!(
            p.prepare(now, &ctx(2, 4), prepare(99, "z", 2), None)
                .is_err()
        );
        assert_eq!(p.commit(now, TxId(99), 1), Err(CommitRefusal::Aborted));
    }

    /// The primary aborts for good at its deadline and refuses a later commit.
    #[test]
    fn the_primary_aborts_at_its_deadline_and_refuses_a_late_commit() {
        let now = Instant::now();
        let mut p = Participant::new();
        p.prepare(now, &ctx(1, 4), prepare(7, "k", 1), None)
            .unwrap();
        assert_eq!(p.poll_timeout(), Some(now + Duration::from_secs(2)));
        let effects = p.handle_timeout(now + Duration::from_secs(2), ServerId(1), None);
        assert_eq!(effects, vec![Effect::Release("k".into())]);
        assert_eq!(p.commit(now, TxId(7), 3), Err(CommitRefusal::Aborted));
    }

    /// A primary asked past its deadline aborts for good and says so.
    #[test]
    fn a_primary_asked_past_its_deadline_answers_aborted() {
        let now = Instant::now();
        let mut p = Participant::new();
        p.prepare(now, &ctx(1, 4), prepare(7, "k", 1), None)
            .unwrap();
        assert_eq!(
            p.query(now, ServerId(1), &ask(7, 1, false), None).0,
            TxOutcome::Prepared
        );
        let (outcome, released) = p.query(
            now + Duration::from_secs(3),
            ServerId(1),
            &ask(7, 1, false),
            None,
        );
        assert_eq!(
            (outcome, released.as_deref()),
            (TxOutcome::Aborted, Some("k"))
        );
    }

    /// Termination: an undecided non-primary asks its peers and follows a committed answer.
    #[test]
    fn an_undecided_participant_asks_its_peers_and_follows_a_commit() {
        let now = Instant::now();
        let mut p = Participant::new();
        p.prepare(now, &ctx(2, 4), prepare(7, "k", 2), None)
            .unwrap();
        let v = view(&[1, 2, 3]);
        assert!(
            p.handle_timeout(now + Duration::from_secs(2), ServerId(2), Some(&v))
                .is_empty(),
            "grace"
        );
        let later = now + Duration::from_millis(2300);
        let tokens = start_round(&mut p, 2, later, &v);
        assert_eq!(
            tokens.len(),
            2,
            "asks the primary and the other participant"
        );
        assert!(
            p.handle_query_answer(later, tokens[&3], Some(TxOutcome::Prepared), Some(&v))
                .is_empty()
        );
        let effects = p.handle_query_answer(
            later,
            tokens[&1],
            Some(TxOutcome::Committed { version: 9 }),
            Some(&v),
        );
        assert!(matches!(&effects[..], [Effect::Apply(w)] if w.version == 9 && w.key == "k"));
    }

    /// Termination: with the primary gone, abort only once every other participant answered
    /// a closing round without a commit.
    #[test]
    fn an_undecided_participant_aborts_when_the_primary_left_and_no_peer_committed() {
        let now = Instant::now();
        let mut p = Participant::new();
        p.prepare(now, &ctx(2, 4), prepare(7, "k", 2), None)
            .unwrap();
        let later = now + Duration::from_secs(3);
        let v = view(&[2, 3]);
        let tokens = start_round(&mut p, 2, later, &v);
        assert!(
            p.handle_query_answer(later, tokens[&1], None, Some(&v))
                .is_empty(),
            "peer 3 not heard yet"
        );
        let effects = p.handle_query_answer(later, tokens[&3], Some(TxOutcome::Prepared), Some(&v));
        assert_eq!(effects, vec![Effect::Release("k".into())]);
    }

    /// Seed 863: every other participant left the view, but rebalancing copied one's bucket
    /// (with this transaction's commit) to a server that is no participant. The closing round
    /// asks it too, and follows its `Committed`; an `Unknown` from it allows the abort.
    #[test]
    fn a_closing_round_asks_the_other_servers_of_the_view() {
        let now = Instant::now();
        let later = now + Duration::from_secs(3);
        let v = view(&[2, 4]);
        let mut p = Participant::new();
        p.prepare(now, &ctx(2, 4), prepare(7, "k", 2), None)
            .unwrap();
        let effects = p.handle_timeout(later, ServerId(2), Some(&v));
        assert!(
            !effects.iter().any(|e| matches!(e, Effect::Release(_))),
            "server 4 not heard yet: {effects:?}"
        );
        let mut p = Participant::new();
        p.prepare(now, &ctx(2, 4), prepare(7, "k", 2), None)
            .unwrap();
        let tokens = start_round(&mut p, 2, later, &v);
        assert!(tokens.contains_key(&4), "{tokens:?}");
        let effects = p.handle_query_answer(
            later,
            tokens[&4],
            Some(TxOutcome::Committed { version: 9 }),
            Some(&v),
        );
        assert!(
            matches!(&effects[..], [Effect::Apply(w)] if w.version == 9),
            "{effects:?}"
        );
        let mut p = Participant::new();
        p.prepare(now, &ctx(2, 4), prepare(7, "k", 2), None)
            .unwrap();
        let tokens = start_round(&mut p, 2, later, &v);
        let effects = p.handle_query_answer(later, tokens[&4], Some(TxOutcome::Unknown), Some(&v));
        assert_eq!(effects, vec![Effect::Release("k".into())]);
    }

    /// Regression (review B): the primary gone and a peer's answer lost: keep asking; a peer
    /// that committed is followed, never contradicted.
    #[test]
    fn a_lost_answer_from_a_committed_peer_never_leads_to_an_abort() {
        let now = Instant::now();
        let mut p = Participant::new();
        p.prepare(now, &ctx(2, 4), prepare(7, "k", 2), None)
            .unwrap();
        let later = now + Duration::from_secs(3);
        let v = view(&[2, 3]);
        let tokens = start_round(&mut p, 2, later, &v);
        assert!(
            p.handle_query_answer(later, tokens[&1], None, Some(&v))
                .is_empty()
        );
        assert!(
            p.handle_query_answer(later, tokens[&3], None, Some(&v))
                .is_empty(),
            "no answer is no information"
        );
        let next = later + TERMINATION_RETRY;
        let tokens = start_round(&mut p, 2, next, &v);
        let effects = p.handle_query_answer(
            next,
            tokens[&3],
            Some(TxOutcome::Committed { version: 4 }),
            Some(&v),
        );
        assert!(matches!(&effects[..], [Effect::Apply(w)] if w.version == 4));
    }

    /// Regression (review A): a peer with no record answers Unknown, not Aborted, unless it is
    /// the primary; a peer with another id than expected knows nothing.
    #[test]
    fn only_the_primary_turns_no_record_into_aborted() {
        let now = Instant::now();
        let mut reset_peer = Participant::new();
        assert_eq!(
            reset_peer
                .query(now, ServerId(3), &ask(7, 3, false), None)
                .0,
            TxOutcome::Unknown
        );
        assert_eq!(
            reset_peer
                .query(now, ServerId(3), &ask(7, 3, false), None)
                .0,
            TxOutcome::Unknown,
            "twice"
        );
        assert!(
            reset_peer
                .prepare(now, &ctx(3, 4), prepare(7, "k", 3), None)
                .is_err(),
            "tombstone"
        );
        let mut stranger = Participant::new();
        assert_eq!(
            stranger.query(now, ServerId(5), &ask(7, 1, false), None).0,
            TxOutcome::Unknown
        );
        let mut primary = Participant::new();
        assert_eq!(
            primary.query(now, ServerId(1), &ask(7, 1, false), None).0,
            TxOutcome::Aborted
        );
    }

    /// Regression (review C): a primary that forgot a committed transaction answers from its
    /// bucket's last committed transaction on the key.
    #[test]
    fn a_primary_answers_a_forgotten_commit_from_its_bucket() {
        let now = Instant::now();
        let mut primary = Participant::new();
        let last = Some((TxId(7), 12));
        assert_eq!(
            primary.query(now, ServerId(1), &ask(7, 1, false), last).0,
            TxOutcome::Committed { version: 12 }
        );
        assert_eq!(
            primary.query(now, ServerId(1), &ask(8, 1, false), last).0,
            TxOutcome::Aborted
        );
    }

    /// A closing query makes an undecided peer refuse the coordinator's commit, but it still
    /// follows a non-primary peer that committed.
    #[test]
    fn a_closed_participant_refuses_the_coordinator_but_follows_a_peer() {
        let now = Instant::now();
        let mut p = Participant::new();
        p.prepare(now, &ctx(3, 4), prepare(7, "k", 3), None)
            .unwrap();
        assert_eq!(
            p.query(now, ServerId(3), &ask(7, 3, true), None).0,
            TxOutcome::Prepared
        );
        assert_eq!(p.commit(now, TxId(7), 2), Err(CommitRefusal::Closed));
        let later = now + Duration::from_secs(3);
        let tokens = start_round(&mut p, 3, later, &view(&[1, 2, 3]));
        let effects = p.handle_query_answer(
            later,
            tokens[&2],
            Some(TxOutcome::Committed { version: 2 }),
            None,
        );
        assert!(matches!(&effects[..], [Effect::Apply(_)]));
    }

    /// Regression (found by `tests/model.rs`): a participant closed by a peer ignores the
    /// primary's late `Committed` answer, since the closer may already have aborted on its
    /// `Prepared`. Trace: 1 committed, the commits to 2 and 3 were lost; 2 asked 1 while 1 was
    /// in its view (the answer is delayed); 1 left the view; 3 closed 2 and aborted; then 1's
    /// answer reached 2.
    #[test]
    fn a_closed_participant_ignores_the_primarys_late_commit() {
        let now = Instant::now();
        let (mut p2, mut p3) = (Participant::new(), Participant::new());
        p2.prepare(now, &ctx(2, 4), prepare(7, "k", 2), None)
            .unwrap();
        p3.prepare(now, &ctx(3, 4), prepare(7, "k", 3), None)
            .unwrap();
        let later = now + Duration::from_secs(3);
        let asked_by_2 = start_round(&mut p2, 2, later, &view(&[1, 2, 3]));
        let v = view(&[2, 3]);
        let asked_by_3 = start_round(&mut p3, 3, later, &v);
        let (answer, _) = p2.query(later, ServerId(2), &ask(7, 2, true), None);
        assert_eq!(answer, TxOutcome::Prepared);
        assert!(
            p3.handle_query_answer(later, asked_by_3[&1], None, Some(&v))
                .is_empty()
        );
        assert_eq!(
            p3.handle_query_answer(later, asked_by_3[&2], Some(answer), Some(&v)),
            vec![Effect::Release("k".into())]
        );
        let late = Some(TxOutcome::Committed { version: 5 });
        let effects = p2.handle_query_answer(later, asked_by_2[&1], late, Some(&v));
        assert!(effects.is_empty(), "followed the primary: {effects:?}");
        assert!(p2.is_locked("k"));
        // 2 then settles as 3 did: its own closing round hears 3's abort.
        let next = later + TERMINATION_RETRY;
        let tokens = start_round(&mut p2, 2, next, &v);
        let (from_3, _) = p3.query(next, ServerId(3), &ask(7, 3, true), None);
        assert_eq!(
            p2.handle_query_answer(next, tokens[&3], Some(from_3), Some(&v)),
            vec![Effect::Release("k".into())]
        );
    }

    /// Regression (found by `tests/model.rs`): a non-primary that committed and then forgot
    /// the outcome (`DECIDED_TTL`) answers from its bucket, not `Unknown`. Trace: 1 and 2
    /// committed, the commit to 3 was lost and 3's queries too for two minutes; 2 forgot; 1
    /// left the view; 3's closing round heard `Unknown` from 2 and aborted against 2's write.
    #[test]
    fn a_participant_answers_a_forgotten_commit_from_its_bucket() {
        let now = Instant::now();
        let mut p2 = Participant::new();
        p2.prepare(now, &ctx(2, 4), prepare(7, "k", 2), None)
            .unwrap();
        assert!(p2.commit(now, TxId(7), 5).unwrap().is_some());
        let later = now + DECIDED_TTL;
        let v = view(&[2, 3]);
        assert!(p2.handle_timeout(later, ServerId(2), Some(&v)).is_empty());
        assert!(p2.decided.is_empty(), "forgotten");
        let bucket = Some((TxId(7), 5));
        let (answer, _) = p2.query(later, ServerId(2), &ask(7, 2, true), bucket);
        assert_eq!(answer, TxOutcome::Committed { version: 5 });
        let mut p3 = Participant::new();
        p3.prepare(now, &ctx(3, 4), prepare(7, "k", 3), None)
            .unwrap();
        let tokens = start_round(&mut p3, 3, later, &v);
        let effects = p3.handle_query_answer(later, tokens[&2], Some(answer), Some(&v));
        assert!(matches!(&effects[..], [Effect::Apply(w)] if w.version == 5));
    }

    /// Regression (found by `tests/model.rs`): with the primary and the other participant both
    /// gone from the view, a closing round needs no answer from them: the survivor aborts
    /// instead of holding the key's lock (voting no on every later write) forever.
    #[test]
    fn a_participant_alone_in_the_view_settles_by_itself() {
        let now = Instant::now();
        let mut p = Participant::new();
        p.prepare(now, &ctx(3, 4), prepare(7, "k", 3), None)
            .unwrap();
        let later = now + Duration::from_secs(3);
        let effects = p.handle_timeout(later, ServerId(3), Some(&view(&[3])));
        assert!(
            effects.contains(&Effect::Release("k".into())),
            "{effects:?}"
        );
        assert!(!p.is_locked("k"));
    }

    /// Issue 8 (bounded resources): a flood of aborts for made-up transactions stays within
    /// [`UNSEEN_ABORTS_MAX`] and never pushes out the outcome of a transaction prepared here,
    /// so a retransmitted commit of it is still answered "done".
    #[test]
    fn a_flood_of_unknown_aborts_is_bounded_and_spares_real_outcomes() {
        let now = Instant::now();
        let mut p = Participant::new();
        p.prepare(now, &ctx(2, 4), prepare(7, "k", 2), None)
            .unwrap();
        assert!(p.commit(now, TxId(7), 5).unwrap().is_some());
        for tx in 1_000..(1_000 + UNSEEN_ABORTS_MAX as u128 + 1000) {
            assert_eq!(p.abort(now, TxId(tx)), None);
        }
        assert_eq!(p.remembered_count(), UNSEEN_ABORTS_MAX + 1);
        assert_eq!(
            p.commit(now, TxId(7), 5),
            Ok(None),
            "still known as committed"
        );
        assert!(p.knows(TxId(7)));
        assert!(
            !p.knows(TxId(1_000)),
            "the oldest unknown abort is forgotten"
        );
        assert!(p.knows(TxId(1_000 + UNSEEN_ABORTS_MAX as u128 + 999)));
    }

    /// Issue 8 (membership): a commit for a transaction never seen changes nothing (no
    /// write, no lock, no record) and says so; an abort for one unlocks nothing.
    #[test]
    fn a_commit_for_an_unknown_transaction_changes_nothing() {
        let now = Instant::now();
        let mut p = Participant::new();
        p.prepare(now, &ctx(2, 4), prepare(7, "k", 2), None)
            .unwrap();
        let before = p.clone();
        assert_eq!(p.commit(now, TxId(8), 9), Err(CommitRefusal::Unknown));
        assert_eq!(p, before, "nothing changed");
        assert!(!p.knows(TxId(8)));
        assert_eq!(p.abort(now, TxId(8)), None);
        assert!(p.is_locked("k"), "the pending transaction keeps its lock");
        assert_eq!(p.pending_count(), 1);
    }

    /// Issue 8 (bounded resources): beyond [`PENDING_MAX`] pending transactions a prepare is
    /// voted down with the bound named, and nothing is locked.
    #[test]
    fn prepares_beyond_the_pending_bound_are_voted_down() {
        let now = Instant::now();
        let mut p = Participant::new();
        for tx in 0..PENDING_MAX as u128 {
            p.prepare(now, &ctx(2, 4), prepare(tx, &format!("k{tx}"), 2), None)
                .unwrap();
        }
        let vote = p.prepare(now, &ctx(2, 4), prepare(1 << 40, "last", 2), None);
        assert!(
            matches!(vote, Err(VoteNo::Full { pending, .. }) if pending == PENDING_MAX),
            "{vote:?}"
        );
        assert!(vote.unwrap_err().to_string().contains("at most 10000"));
        assert!(!p.is_locked("last"));
        assert_eq!(p.pending_count(), PENDING_MAX);
    }
}
