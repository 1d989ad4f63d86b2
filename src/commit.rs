//! The participant side of two-phase commit, with cooperative termination (sans-IO).
//!
//! A [`Participant`] holds, for one server, the transactions it voted yes on, the key each
//! one locks, and the outcomes it decided. The server feeds it `Prepare`, `Commit`, `Abort`
//! and `QueryTx` requests and timer expiries; it answers with votes and outcomes and asks the
//! server to send termination queries.
//!
//! # Protocol
//!
//! - **Vote**: yes unless another transaction holds the key, the coordinator's epoch or
//!   expected id differs from ours, or the transaction is already known as aborted (a
//!   tombstone). A yes vote locks the key and reports our version of it.
//! - **Commit point**: the primary (first participant) decides. The coordinator sends
//!   `Commit` to the primary first and to the others only once the primary acknowledged it.
//!   A primary still undecided at its deadline (the coordinator's remaining time when the
//!   prepare arrived) aborts for good, and refuses a commit that arrives later.
//! - **Termination**: a non-primary participant still undecided a grace period after its
//!   deadline asks the primary and the other participants. Anyone committed → commit; anyone
//!   aborted → abort. If nobody knows and the primary has left the view (so its bucket is
//!   gone with it), abort; otherwise ask again.
//! - **Tombstones**: asked about a transaction it has no record of, a participant records it
//!   as aborted, so a prepare arriving late is refused.
//!
//! Safety in one line: a participant commits only after the primary committed (it heard so
//! from the coordinator or from a peer), and the primary never commits after aborting, so no
//! participant commits while another aborts — except when the primary itself is lost, and
//! then its commit is lost with its bucket.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{debug, info};

use crate::message::{TxId, TxOutcome};
use crate::view::{Epoch, Member, ServerId, View};

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
/// The most decided outcomes remembered.
const DECIDED_MAX: usize = 200_000;

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

/// A transaction this participant voted yes on and has no decision for.
#[derive(Clone, Debug)]
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
    /// Outstanding termination queries of the current round: token → peer asked.
    round: HashMap<u64, SocketAddr>,
}

/// A committed write the server must apply to its bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// The key.
    pub key: String,
    /// The value.
    pub value: String,
    /// Its version.
    pub version: u64,
}

/// What a participant wants done after an input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Apply this committed write to the bucket; the key is unlocked.
    Apply(Write),
    /// The key is unlocked without a write (the transaction aborted).
    Release(String),
    /// Send a termination query about `txid` to `dst`; report the answer with `token`.
    Query {
        /// The participant's tag for the answer.
        token: u64,
        /// Who to ask.
        dst: SocketAddr,
        /// The transaction.
        txid: TxId,
    },
}

/// Why a commit was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitRefusal {
    /// The transaction was aborted here (the primary's deadline passed, or termination).
    Aborted,
    /// No record of the transaction (it was never prepared here).
    Unknown,
}

/// The participant table of one server.
#[derive(Debug, Default)]
pub struct Participant {
    /// Transactions voted yes on and undecided.
    pending: HashMap<TxId, Pending>,
    /// Which transaction locks each key.
    locked: HashMap<String, TxId>,
    /// Decided outcomes (and abort tombstones).
    decided: HashMap<TxId, TxOutcome>,
    /// The order outcomes were decided, for forgetting them.
    decided_order: VecDeque<(TxId, Instant)>,
    /// The last token handed out for a termination query.
    last_token: u64,
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

    /// Votes on a prepare. `me` and `epoch` are this server's id and epoch; `current` is its
    /// version of the key. Returns `Ok(current)` for a yes vote, or the reason for a no.
    pub fn prepare(
        &mut self,
        now: Instant,
        me: ServerId,
        epoch: Epoch,
        args: PrepareArgs,
        current: Option<u64>,
    ) -> Result<Option<u64>, String> {
        match self.decided.get(&args.txid) {
            Some(TxOutcome::Aborted) => {
                return Err(format!(
                    "transaction {} was already aborted here",
                    args.txid
                ));
            }
            Some(_) => return Err(format!("transaction {} was already decided", args.txid)),
            None => {}
        }
        if self.pending.contains_key(&args.txid) {
            return Ok(current);
        }
        if args.expected != me {
            return Err(format!(
                "server id mismatch: expected {}, this is {me}",
                args.expected
            ));
        }
        if args.epoch != epoch {
            return Err(format!(
                "epoch mismatch: the coordinator is at epoch {}, this replica at {epoch}",
                args.epoch
            ));
        }
        let Some(position) = args.participants.iter().position(|m| m.id == me) else {
            return Err(format!("{me} is not among the participants"));
        };
        if let Some(holder) = self.locked.get(&args.key) {
            return Err(format!(
                "key {:?} has a pending commit ({holder})",
                args.key
            ));
        }
        let deadline = now + args.timeout.min(MAX_DECISION_WAIT);
        self.locked.insert(args.key.clone(), args.txid);
        self.pending.insert(
            args.txid,
            Pending {
                key: args.key,
                value: args.value,
                participants: args.participants,
                is_primary: position == 0,
                deadline,
                next_query: deadline + TERMINATION_GRACE,
                round: HashMap::new(),
            },
        );
        Ok(current)
    }

    /// Applies a commit decision. Returns the write to apply, `Ok(None)` if it was already
    /// committed (a duplicate), or why it is refused.
    pub fn commit(
        &mut self,
        now: Instant,
        txid: TxId,
        version: u64,
    ) -> Result<Option<Write>, CommitRefusal> {
        match self.decided.get(&txid) {
            Some(TxOutcome::Committed { .. }) => return Ok(None),
            Some(TxOutcome::Aborted) => return Err(CommitRefusal::Aborted),
            Some(TxOutcome::Prepared) | None => {}
        }
        let Some(pending) = self.pending.remove(&txid) else {
            return Err(CommitRefusal::Unknown);
        };
        self.locked.remove(&pending.key);
        self.decide(now, txid, TxOutcome::Committed { version });
        Ok(Some(Write {
            key: pending.key,
            value: pending.value,
            version,
        }))
    }

    /// Applies an abort decision; returns the key it unlocks, if it held one. An abort for an
    /// unknown transaction leaves a tombstone, so a late prepare is refused.
    pub fn abort(&mut self, now: Instant, txid: TxId) -> Option<String> {
        if let Some(pending) = self.pending.remove(&txid) {
            self.locked.remove(&pending.key);
            self.decide(now, txid, TxOutcome::Aborted);
            return Some(pending.key);
        }
        if !self.decided.contains_key(&txid) {
            self.decide(now, txid, TxOutcome::Aborted);
        }
        None
    }

    /// Answers a termination query. A primary past its deadline aborts for good first; an
    /// unknown transaction is recorded as aborted. Also returns the key unlocked, if any.
    pub fn query(&mut self, now: Instant, txid: TxId) -> (TxOutcome, Option<String>) {
        if let Some(outcome) = self.decided.get(&txid) {
            return (*outcome, None);
        }
        match self.pending.get(&txid) {
            Some(p) if p.is_primary && now >= p.deadline => {
                info!("transaction {txid}: undecided past the primary's deadline; aborting");
                let key = self.abort(now, txid);
                (TxOutcome::Aborted, key)
            }
            Some(_) => (TxOutcome::Prepared, None),
            None => {
                self.decide(now, txid, TxOutcome::Aborted);
                (TxOutcome::Aborted, None)
            }
        }
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
        [pending, forget].into_iter().flatten().min()
    }

    /// Runs due timers: a primary past its deadline aborts; a non-primary past its deadline
    /// starts a termination round. Returns the effects to carry out.
    pub fn handle_timeout(&mut self, now: Instant, me: ServerId) -> Vec<Effect> {
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
            pending.next_query = now + TERMINATION_RETRY;
            pending.round.clear();
            let peers: Vec<SocketAddr> = pending
                .participants
                .iter()
                .filter(|m| m.id != me)
                .map(|m| m.addr)
                .collect();
            debug!(
                "transaction {txid}: no decision yet; asking {} peers",
                peers.len()
            );
            for dst in peers {
                self.last_token += 1;
                let token = self.last_token;
                if let Some(pending) = self.pending.get_mut(&txid) {
                    pending.round.insert(token, dst);
                }
                effects.push(Effect::Query { token, dst, txid });
            }
        }
        while let Some(&(txid, at)) = self.decided_order.front() {
            if at + DECIDED_TTL > now && self.decided_order.len() <= DECIDED_MAX {
                break;
            }
            self.decided_order.pop_front();
            self.decided.remove(&txid);
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
        let Some((&txid, _)) = self
            .pending
            .iter()
            .find(|(_, p)| p.round.contains_key(&token))
        else {
            return Vec::new();
        };
        match answer {
            Some(TxOutcome::Committed { version }) => {
                info!("transaction {txid}: a peer committed it (version {version}); committing");
                match self.commit(now, txid, version) {
                    Ok(Some(write)) => vec![Effect::Apply(write)],
                    _ => Vec::new(),
                }
            }
            Some(TxOutcome::Aborted) => {
                info!("transaction {txid}: a peer aborted it; aborting");
                self.abort(now, txid)
                    .map(Effect::Release)
                    .into_iter()
                    .collect()
            }
            Some(TxOutcome::Prepared) | None => {
                let Some(pending) = self.pending.get_mut(&txid) else {
                    return Vec::new();
                };
                let primary = pending.participants.first().copied();
                let asked_primary =
                    primary.is_some_and(|p| pending.round.get(&token) == Some(&p.addr));
                pending.round.remove(&token);
                let primary_gone = primary.is_some_and(|p| view.is_some_and(|v| !v.contains(p.id)));
                if asked_primary && answer.is_none() && primary_gone {
                    info!("transaction {txid}: the primary left the view undecided; aborting");
                    return self
                        .abort(now, txid)
                        .map(Effect::Release)
                        .into_iter()
                        .collect();
                }
                Vec::new()
            }
        }
    }

    /// Records `outcome` as decided for `txid`.
    fn decide(&mut self, now: Instant, txid: TxId, outcome: TxOutcome) {
        self.decided.insert(txid, outcome);
        self.decided_order.push_back((txid, now));
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

    /// Assignment 3.3: a second commit on a pending key is refused; another key proceeds.
    #[test]
    fn a_pending_key_refuses_a_second_transaction_but_others_proceed() {
        let now = Instant::now();
        let mut p = Participant::new();
        assert_eq!(
            p.prepare(now, ServerId(2), Epoch(4), prepare(10, "k", 2), Some(3)),
            Ok(Some(3))
        );
        let second = p.prepare(now, ServerId(2), Epoch(4), prepare(11, "k", 2), Some(3));
        assert!(second.unwrap_err().contains("pending commit"));
        assert!(
            p.prepare(now, ServerId(2), Epoch(4), prepare(12, "other", 2), None)
                .is_ok()
        );
        assert!(p.is_locked("k") && p.is_locked("other"));
    }

    /// Assignment 3.3: a commit fails if the participant's epoch or id is not the expected one.
    #[test]
    fn epoch_or_id_mismatch_votes_no() {
        let now = Instant::now();
        let mut p = Participant::new();
        let wrong_id = p.prepare(now, ServerId(2), Epoch(4), prepare(1, "k", 3), None);
        assert!(wrong_id.unwrap_err().contains("id mismatch"));
        let wrong_epoch = p.prepare(now, ServerId(2), Epoch(5), prepare(2, "k", 2), None);
        assert!(wrong_epoch.unwrap_err().contains("epoch mismatch"));
        assert!(!p.is_locked("k"));
    }

    /// Commit applies the write with the coordinator's version and unlocks the key; a
    /// duplicate commit is harmless; an abort after it changes nothing.
    #[test]
    fn commit_applies_once_and_unlocks() {
        let now = Instant::now();
        let mut p = Participant::new();
        p.prepare(now, ServerId(2), Epoch(4), prepare(7, "k", 2), None)
            .unwrap();
        let write = p.commit(now, TxId(7), 5).unwrap().unwrap();
        assert_eq!((write.key.as_str(), write.version), ("k", 5));
        assert!(!p.is_locked("k"));
        assert_eq!(p.commit(now, TxId(7), 5), Ok(None));
        assert_eq!(p.abort(now, TxId(7)), None);
        assert_eq!(p.query(now, TxId(7)).0, TxOutcome::Committed { version: 5 });
    }

    /// Assignment 3.4: a failed commit is aborted and the key can be retried at once.
    #[test]
    fn abort_unlocks_and_a_tombstone_refuses_a_late_prepare() {
        let now = Instant::now();
        let mut p = Participant::new();
        p.prepare(now, ServerId(2), Epoch(4), prepare(7, "k", 2), None)
            .unwrap();
        assert_eq!(p.abort(now, TxId(7)), Some("k".to_string()));
        assert!(
            p.prepare(now, ServerId(2), Epoch(4), prepare(8, "k", 2), None)
                .is_ok()
        );
        // An abort for a transaction never seen leaves a tombstone.
        assert_eq!(p.abort(now, TxId(99)), None);
        assert!(
            p.prepare(now, ServerId(2), Epoch(4), prepare(99, "z", 2), None)
                .is_err()
        );
        assert_eq!(p.commit(now, TxId(99), 1), Err(CommitRefusal::Aborted));
    }

    /// The primary aborts for good at its deadline and refuses a later commit.
    #[test]
    fn the_primary_aborts_at_its_deadline_and_refuses_a_late_commit() {
        let now = Instant::now();
        let mut p = Participant::new();
        p.prepare(now, ServerId(1), Epoch(4), prepare(7, "k", 1), None)
            .unwrap();
        assert_eq!(p.poll_timeout(), Some(now + Duration::from_secs(2)));
        let effects = p.handle_timeout(now + Duration::from_secs(2), ServerId(1));
        assert_eq!(effects, vec![Effect::Release("k".into())]);
        assert_eq!(p.commit(now, TxId(7), 3), Err(CommitRefusal::Aborted));
    }

    /// A primary asked past its deadline aborts for good and says so.
    #[test]
    fn a_primary_asked_past_its_deadline_answers_aborted() {
        let now = Instant::now();
        let mut p = Participant::new();
        p.prepare(now, ServerId(1), Epoch(4), prepare(7, "k", 1), None)
            .unwrap();
        assert_eq!(p.query(now, TxId(7)).0, TxOutcome::Prepared);
        let (outcome, released) = p.query(now + Duration::from_secs(3), TxId(7));
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
        p.prepare(now, ServerId(2), Epoch(4), prepare(7, "k", 2), None)
            .unwrap();
        assert!(
            p.handle_timeout(now + Duration::from_secs(2), ServerId(2))
                .is_empty(),
            "grace"
        );
        let later = now + Duration::from_millis(2300);
        let effects = p.handle_timeout(later, ServerId(2));
        let tokens: Vec<u64> = effects
            .iter()
            .map(|e| match e {
                Effect::Query { token, .. } => *token,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            tokens.len(),
            2,
            "asks the primary and the other participant"
        );
        assert!(
            p.handle_query_answer(later, tokens[1], Some(TxOutcome::Prepared), None)
                .is_empty()
        );
        let effects = p.handle_query_answer(
            later,
            tokens[0],
            Some(TxOutcome::Committed { version: 9 }),
            None,
        );
        assert!(matches!(&effects[..], [Effect::Apply(w)] if w.version == 9 && w.key == "k"));
    }

    /// Termination: if the primary is gone from the view and nobody knows, abort.
    #[test]
    fn an_undecided_participant_aborts_when_the_primary_left_the_view() {
        let now = Instant::now();
        let mut p = Participant::new();
        p.prepare(now, ServerId(2), Epoch(4), prepare(7, "k", 2), None)
            .unwrap();
        let later = now + Duration::from_secs(3);
        let effects = p.handle_timeout(later, ServerId(2));
        let primary_token = effects
            .iter()
            .find_map(|e| match e {
                Effect::Query { token, dst, .. } if *dst == member(1).addr => Some(*token),
                _ => None,
            })
            .unwrap();
        let view_with_primary = View {
            epoch: Epoch(5),
            members: vec![member(1), member(2)],
            replicas: 3,
            vnodes: 1,
        };
        assert!(
            p.handle_query_answer(later, primary_token, None, Some(&view_with_primary))
                .is_empty()
        );
        // Next round, the primary has left the view.
        let effects = p.handle_timeout(later + TERMINATION_RETRY, ServerId(2));
        let token = effects
            .iter()
            .find_map(|e| match e {
                Effect::Query { token, dst, .. } if *dst == member(1).addr => Some(*token),
                _ => None,
            })
            .unwrap();
        let view = View {
            epoch: Epoch(6),
            members: vec![member(2), member(3)],
            replicas: 3,
            vnodes: 1,
        };
        let effects = p.handle_query_answer(later, token, None, Some(&view));
        assert_eq!(effects, vec![Effect::Release("k".into())]);
    }

    /// A participant asked about an unknown transaction records an abort tombstone.
    #[test]
    fn a_query_about_an_unknown_transaction_leaves_a_tombstone() {
        let now = Instant::now();
        let mut p = Participant::new();
        assert_eq!(p.query(now, TxId(5)).0, TxOutcome::Aborted);
        assert!(
            p.prepare(now, ServerId(2), Epoch(4), prepare(5, "k", 2), None)
                .is_err()
        );
    }
}
