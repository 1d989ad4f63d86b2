//! The client side of the replicated operations, sans-IO: `setr`'s two-phase commit and
//! `getr`'s read, as state machines.
//!
//! A [`Setr`] or [`Getr`] is made for one operation against one [`Placement`] (the view the
//! caller fetched). It never touches a socket or reads the clock: it hands out the requests
//! to send ([`Operation::poll_send`]), is given their outcomes
//! ([`Operation::handle_response`]) and timer expiries ([`Operation::handle_timeout`]), and
//! finally yields the operation's outcome ([`Operation::poll_outcome`]). The command-line
//! client drives it on a real network ([`crate::client::Client`]); the simulator in
//! `tests/sim/` drives the very same machine in virtual time.
//!
//! Calling contract: after creating the machine and after every `handle_*` call, drain
//! [`Operation::poll_send`], then check [`Operation::poll_outcome`], then re-read
//! [`Operation::poll_timeout`] and call [`Operation::handle_timeout`] once that instant has
//! come. Every request handed out must eventually get exactly one `handle_response` (the
//! reliable layer guarantees one outcome per request: an answer or a transport error), unless
//! the operation has finished, after which late answers are ignored. `now` never goes
//! backwards.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::debug;

use crate::placement::view::{Epoch, Member};
use crate::reliable::RequestError;
use crate::txn::routing::Placement;
use crate::wire::message::{ErrorKind, OpError, Request, Response, TxId};

/// The time `setr` keeps, out of its deadline, for sending aborts after a failed vote.
const ABORT_RESERVE: Duration = Duration::from_millis(500);

/// How many retransmission timeouts `setr` gives a replica that has acknowledged nothing of
/// its prepare (or abort) before it counts the replica silent: the transaction is then
/// aborted everywhere (kind `aborted`) instead of holding the caller until its deadline. The
/// timeouts grow from the reliable layer's retransmission timeout for that peer: with a
/// round trip already measured (a long-lived client, `client bench`) that is milliseconds,
/// and a frozen or cut-off replica is given up on within about a quarter of a second. The
/// layer applies the budget only to a peer whose round trip it knows: a fresh client (one
/// `client` command) keeps the usual limit, bounded by `--timeout-ms`. A replica that
/// acknowledged the prepare is working on it and is waited for as usual.
pub const SILENT_PEER_ATTEMPTS: u32 = 8;

/// How long a participant waits for a decision when the command has no deadline.
const UNBOUNDED_DECISION_WAIT: Duration = Duration::from_secs(30);

/// The shortest time given to the aborts after a failure, even past the deadline (a
/// participant released at once is better than one that waits for termination).
const ABORT_MINIMUM: Duration = Duration::from_millis(50);

/// Test hooks of `setr` (pauses at fixed points of the protocol), so that conflicts, view
/// changes and coordinator crashes can be staged from outside.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetrHooks {
    /// Sleep between learning the view and sending the prepares.
    pub pause_after_view: Duration,
    /// Sleep between collecting all votes and sending the decision.
    pub pause_before_commit: Duration,
    /// Sleep between the primary's commit acknowledgement and the other commits.
    pub pause_after_primary_commit: Duration,
}

/// What a successful `setr` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetrOutcome {
    /// The epoch of the view the replicas were computed from.
    pub epoch: Epoch,
    /// The replicas, in ring order (the first is the primary).
    pub replicas: Vec<Member>,
    /// The version the write was committed with.
    pub version: u64,
}

/// What `getr` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetrOutcome {
    /// The value.
    pub value: String,
    /// Its version.
    pub version: u64,
    /// The replica that answered.
    pub from: Member,
}

/// A request an operation wants sent.
#[derive(Clone, Debug)]
pub struct Send {
    /// The operation's tag for the outcome (passed back to [`Operation::handle_response`]).
    pub token: u64,
    /// Destination.
    pub dst: SocketAddr,
    /// What to ask.
    pub request: Request,
    /// Give up at this instant (`None`: only the reliable layer's attempts bound it).
    pub deadline: Option<Instant>,
    /// Give up after this many retransmission timeouts while the peer has acknowledged
    /// nothing (`None`: the reliable layer's own limit); see [`SILENT_PEER_ATTEMPTS`].
    pub unacked_attempts: Option<u32>,
}

/// A replicated operation as a sans-IO state machine (see the module documentation for the
/// calling contract).
/// Operations are `Send` so that a long-lived client can run them on its network driver's
/// thread (`client::Client::with_operations_on_driver`).
pub trait Operation: std::marker::Send + 'static {
    /// What the operation yields when it succeeds.
    type Output: std::marker::Send;

    /// The next request to send, if any.
    fn poll_send(&mut self) -> Option<Send>;

    /// The outcome of the request sent with `token`: the peer's answer (an error answer is
    /// `Ok(Response::Error(..))`) or why none came.
    fn handle_response(&mut self, now: Instant, token: u64, result: Result<Response, RequestError>);

    /// The instant from [`Operation::poll_timeout`] has come.
    fn handle_timeout(&mut self, now: Instant);

    /// The next instant at which the operation has timed work (a test hook's pause, a read's
    /// hedge), if any.
    fn poll_timeout(&self) -> Option<Instant>;

    /// True if answers may come before the timer of [`Operation::poll_timeout`] and must be
    /// taken as they come (a read's hedge); false if the timer is a pause that the caller
    /// sleeps through (a test hook: tests see the client sleeping there).
    fn listens_while_waiting(&self) -> bool {
        false
    }

    /// The operation's result, once it has finished (returned once).
    fn poll_outcome(&mut self) -> Option<Result<Self::Output, OpError>>;
}

/// Maps a transport failure to the contract's error kinds.
pub fn transport_error(error: RequestError) -> OpError {
    let (kind, message) = match &error {
        RequestError::Timeout { peer } => (ErrorKind::Timeout, format!("no answer from {peer}")),
        RequestError::Unreachable { peer } => (
            ErrorKind::Unreachable,
            format!("{peer} is unreachable (nothing listens there)"),
        ),
        RequestError::TooLarge { .. } => (ErrorKind::BadInput, error.to_string()),
    };
    OpError {
        kind,
        message,
        cycle: Vec::new(),
    }
}

/// Builds an error of `kind` with `message`.
fn op_error(kind: ErrorKind, message: impl Into<String>) -> OpError {
    OpError {
        kind,
        message: message.into(),
        cycle: Vec::new(),
    }
}

/// An answer of the wrong type (a peer of another kind answered).
pub fn unexpected(response: &Response) -> OpError {
    op_error(
        ErrorKind::BadInput,
        format!("unexpected answer: {response:?}"),
    )
}

/// The command's deadline and time bound, for deadlines of requests and for messages.
#[derive(Clone, Copy, Debug)]
struct Bound {
    /// When the whole command must have finished (`None`: no bound).
    deadline: Option<Instant>,
    /// The whole command's time bound, for messages and for carving reserves.
    timeout: Option<Duration>,
}

impl Bound {
    /// Adds the command's time bound to a timeout error's message.
    fn timed(&self, mut error: OpError) -> OpError {
        if error.kind == ErrorKind::Timeout
            && let Some(t) = self.timeout
        {
            error.message = format!("{} within {} ms", error.message, t.as_millis());
        }
        error
    }

    /// A request's outcome as the operation sees it: an error answer or a transport failure
    /// becomes `Err` (transport failures with the command's time bound when `timed`).
    fn answer(
        &self,
        result: Result<Response, RequestError>,
        timed: bool,
    ) -> Result<Response, OpError> {
        match result {
            Ok(Response::Error(e)) => Err(e),
            Ok(response) => Ok(response),
            Err(e) if timed => Err(self.timed(transport_error(e))),
            Err(e) => Err(transport_error(e)),
        }
    }

    /// When a pause of `pause` started at `now` ends, and whether it runs into the deadline
    /// (then it ends at the deadline, and the operation fails).
    fn pause_until(&self, now: Instant, pause: Duration) -> (Instant, bool) {
        match self.deadline {
            Some(deadline) if now + pause > deadline => (deadline.max(now), true),
            _ => (now + pause, false),
        }
    }
}

/// Where a [`Setr`] stands.
#[derive(Debug)]
enum SetrPhase {
    /// A test hook's pause until `until`; `fails` if it runs into the deadline.
    Paused {
        /// When it ends.
        until: Instant,
        /// It ends at the deadline: the operation fails then.
        fails: bool,
        /// What comes after it.
        then: AfterPause,
    },
    /// Prepares are out; collecting the votes (`None` while a replica has not answered).
    Voting {
        /// One vote slot per replica, in ring order.
        votes: Vec<Option<Result<Response, OpError>>>,
    },
    /// The commit is out to the primary (the commit point).
    CommittingPrimary {
        /// The version decided.
        version: u64,
    },
    /// The primary acknowledged; commits are out to the other replicas.
    CommittingOthers {
        /// The version decided.
        version: u64,
        /// One acknowledgement slot per non-primary replica.
        acks: Vec<Option<Result<Response, OpError>>>,
    },
    /// Aborts are out (best effort); the operation then fails with `error`.
    Aborting {
        /// Per slot of the aborts sent: whether its acknowledgement is waited for (the
        /// replica voted yes and holds the key's lock).
        waited: Vec<bool>,
        /// Waited-for aborts not yet acknowledged (or failed).
        outstanding: usize,
        /// What the operation reports.
        error: OpError,
    },
    /// Finished; the outcome is (or was) in `Setr::outcome`.
    Done,
}

/// What follows a test hook's pause.
#[derive(Clone, Copy, Debug)]
enum AfterPause {
    /// Send the prepares.
    Vote,
    /// Send the commit to the primary.
    Commit {
        /// The version decided.
        version: u64,
    },
    /// Send the commits to the other replicas.
    CommitOthers {
        /// The version decided.
        version: u64,
    },
}

/// `setr KEY VALUE` as a state machine: prepares on every replica of the view, then the
/// commit at the primary (the commit point) and, once the primary acknowledged, at the
/// others. Any vote that is not a yes aborts everywhere. Never retries.
#[derive(Debug)]
pub struct Setr {
    /// The key.
    key: String,
    /// The value.
    value: String,
    /// The transaction's id.
    txid: TxId,
    /// The epoch of the view the replicas come from.
    epoch: Epoch,
    /// The key's replicas in that view, primary first.
    replicas: Vec<Member>,
    /// The test hooks.
    hooks: SetrHooks,
    /// The command's deadline.
    bound: Bound,
    /// Where the operation stands.
    phase: SetrPhase,
    /// Requests to hand out.
    sends: VecDeque<Send>,
    /// The requests of the current step still awaited: token → slot (replica index).
    awaited: BTreeMap<u64, usize>,
    /// The last token handed out.
    last_token: u64,
    /// The commit was handed out for the primary.
    decision_sent: bool,
    /// The result, until taken.
    outcome: Option<Result<SetrOutcome, OpError>>,
}

impl Setr {
    /// Starts `setr key value` as transaction `txid` against `placement` at `now`, within
    /// `deadline` (the command's, `None` for none; `timeout` is its length, for messages),
    /// with the test `hooks`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        now: Instant,
        key: &str,
        value: &str,
        placement: &Placement,
        txid: TxId,
        deadline: Option<Instant>,
        timeout: Option<Duration>,
        hooks: SetrHooks,
    ) -> Setr {
        let mut setr = Setr {
            key: key.to_owned(),
            value: value.to_owned(),
            txid,
            epoch: placement.view.epoch,
            replicas: placement.replicas(key),
            hooks,
            bound: Bound { deadline, timeout },
            phase: SetrPhase::Done,
            sends: VecDeque::new(),
            awaited: BTreeMap::new(),
            last_token: 0,
            decision_sent: false,
            outcome: None,
        };
        setr.pause_then(now, hooks.pause_after_view, AfterPause::Vote);
        setr
    }

    /// The transaction's id.
    pub fn txid(&self) -> TxId {
        self.txid
    }

    /// The key's replicas the operation works with, primary first.
    pub fn replicas(&self) -> &[Member] {
        &self.replicas
    }

    /// True once the commit decision was handed out for the primary: from then on the write
    /// may take effect whatever happens to this coordinator. Before it, the transaction can
    /// only abort (no participant commits without the primary's commit).
    pub fn is_decision_sent(&self) -> bool {
        self.decision_sent
    }

    /// True while every replica voted yes and the decision is not sent yet (the pause before
    /// the commit): a coordinator crash now leaves prepared participants to the termination
    /// protocol.
    pub fn is_between_votes_and_decision(&self) -> bool {
        matches!(
            self.phase,
            SetrPhase::Paused {
                then: AfterPause::Commit { .. },
                ..
            }
        )
    }

    /// Queues `request` to `dst` within `deadline`, awaited in `slot`.
    fn send(&mut self, dst: SocketAddr, request: Request, deadline: Option<Instant>, slot: usize) {
        self.last_token += 1;
        let token = self.last_token;
        self.awaited.insert(token, slot);
        // Prepares and aborts give up on a silent replica (see SILENT_PEER_ATTEMPTS); a
        // commit is a decision and is waited for until the deadline.
        let unacked_attempts = matches!(request, Request::Prepare { .. } | Request::Abort { .. })
            .then_some(SILENT_PEER_ATTEMPTS);
        self.sends.push_back(Send {
            token,
            dst,
            request,
            deadline,
            unacked_attempts,
        });
    }

    /// Pauses for `pause` (a test hook) and then does `then`; with no pause, does it at once.
    fn pause_then(&mut self, now: Instant, pause: Duration, then: AfterPause) {
        if pause.is_zero() {
            self.resume(now, then);
            return;
        }
        let (until, fails) = self.bound.pause_until(now, pause);
        self.phase = SetrPhase::Paused { until, fails, then };
    }

    /// Carries out what follows a pause.
    fn resume(&mut self, now: Instant, then: AfterPause) {
        match then {
            AfterPause::Vote => self.start_vote(now),
            AfterPause::Commit { version } => {
                let primary = self.replicas[0];
                let commit = Request::Commit {
                    txid: self.txid,
                    version,
                };
                self.send(primary.addr, commit, self.bound.deadline, 0);
                self.decision_sent = true;
                self.phase = SetrPhase::CommittingPrimary { version };
            }
            AfterPause::CommitOthers { version } => {
                let others: Vec<Member> = self.replicas[1..].to_vec();
                if others.is_empty() {
                    self.succeed(version);
                    return;
                }
                for (slot, member) in others.iter().enumerate() {
                    let commit = Request::Commit {
                        txid: self.txid,
                        version,
                    };
                    self.send(member.addr, commit, self.bound.deadline, slot);
                }
                self.phase = SetrPhase::CommittingOthers {
                    version,
                    acks: vec![None; others.len()],
                };
            }
        }
    }

    /// Phase one: a prepare to every replica, all at once.
    fn start_vote(&mut self, now: Instant) {
        let remaining = self.bound.deadline.map_or(UNBOUNDED_DECISION_WAIT, |d| {
            d.saturating_duration_since(now)
        });
        let reserve = self
            .bound
            .timeout
            .map_or(ABORT_RESERVE, |t| ABORT_RESERVE.min(t / 5));
        let vote_deadline = self
            .bound
            .deadline
            .map(|d| d.checked_sub(reserve).unwrap_or(d));
        debug!(
            "setr {:?}: transaction {} on {} replicas at epoch {}",
            self.key,
            self.txid,
            self.replicas.len(),
            self.epoch
        );
        let replicas = self.replicas.clone();
        for (slot, replica) in replicas.iter().enumerate() {
            let prepare = Request::Prepare {
                txid: self.txid,
                key: self.key.clone(),
                value: self.value.clone(),
                epoch: self.epoch,
                expected: replica.id,
                participants: replicas.clone(),
                timeout_ms: remaining.as_millis().min(u128::from(u32::MAX)) as u32,
            };
            self.send(replica.addr, prepare, vote_deadline, slot);
        }
        self.phase = SetrPhase::Voting {
            votes: vec![None; replicas.len()],
        };
    }

    /// The vote is over (every replica answered, or one said anything but yes): decide.
    fn decide(&mut self, now: Instant, votes: &[Option<Result<Response, OpError>>]) {
        if let Some(mut error) = refusal(&self.replicas, votes) {
            if error.kind == ErrorKind::Timeout && self.bound.deadline.is_none_or(|d| now < d) {
                // A replica silent through SILENT_PEER_ATTEMPTS retransmissions, before the
                // command's deadline: the transaction is aborted everywhere, which is what
                // the caller learns.
                error.kind = ErrorKind::Aborted;
                error.message = format!(
                    "{} (it acknowledged nothing through {SILENT_PEER_ATTEMPTS} retransmissions)",
                    error.message
                );
            } else {
                error = self.bound.timed(error);
            }
            self.abort_after_votes(now, votes, error);
            return;
        }
        let version = votes
            .iter()
            .filter_map(|vote| match vote {
                Some(Ok(Response::Prepared { version })) => *version,
                _ => None,
            })
            .max()
            .unwrap_or(0);
        // Above every replica's copy, and at least the view's floor: versions are ordered
        // across epochs (see `Epoch::version_floor`).
        let Some(version) = version
            .checked_add(1)
            .map(|v| v.max(self.epoch.version_floor()))
        else {
            let error = op_error(
                ErrorKind::Aborted,
                "the key's version cannot grow any further",
            );
            self.abort(now, 0, error);
            return;
        };
        self.pause_then(
            now,
            self.hooks.pause_before_commit,
            AfterPause::Commit { version },
        );
    }

    /// Tells the replicas from index `from` on that the transaction aborted (so they release
    /// the key at once), waits for the acknowledgements of those that may hold the key's lock (all of them, or after `votes` all but those that answered
    /// no), then fails with `error`. Best effort: a replica that misses its abort learns the
    /// outcome through the termination protocol.
    fn abort_after_votes(
        &mut self,
        now: Instant,
        votes: &[Option<Result<Response, OpError>>],
        error: OpError,
    ) {
        // Only a replica that answered no (an error answer from the replica itself, not a
        // transport failure) holds no lock; any other may have prepared.
        let waited = votes
            .iter()
            .map(|v| {
                !matches!(v, Some(Err(e)) if e.kind != ErrorKind::Timeout
                && e.kind != ErrorKind::Unreachable)
            })
            .collect();
        self.abort_waiting(now, 0, Some(waited), error);
    }

    /// [`Setr::abort_after_votes`] for the replicas from `from` on, all of which voted yes.
    fn abort(&mut self, now: Instant, from: usize, error: OpError) {
        self.abort_waiting(now, from, None, error);
    }

    /// Sends the aborts to the replicas from `from` on and waits for those `waited` says
    /// (all if `None`; see [`Setr::abort_after_votes`]).
    fn abort_waiting(
        &mut self,
        now: Instant,
        from: usize,
        waited: Option<Vec<bool>>,
        error: OpError,
    ) {
        self.awaited.clear();
        let deadline = self
            .bound
            .deadline
            .unwrap_or(now + ABORT_RESERVE)
            .max(now + ABORT_MINIMUM);
        let to: Vec<Member> = self.replicas[from..].to_vec();
        for (slot, member) in to.iter().enumerate() {
            self.send(
                member.addr,
                Request::Abort { txid: self.txid },
                Some(deadline),
                slot,
            );
        }
        let waited = waited.unwrap_or_else(|| vec![true; to.len()]);
        let outstanding = waited.iter().filter(|&&w| w).count();
        if outstanding == 0 {
            self.fail(error);
        } else {
            self.phase = SetrPhase::Aborting {
                waited,
                outstanding,
                error,
            };
        }
    }

    /// Finishes with `error`.
    fn fail(&mut self, error: OpError) {
        self.awaited.clear();
        self.phase = SetrPhase::Done;
        self.outcome = Some(Err(error));
    }

    /// Finishes with success at `version`.
    fn succeed(&mut self, version: u64) {
        self.awaited.clear();
        self.phase = SetrPhase::Done;
        self.outcome = Some(Ok(SetrOutcome {
            epoch: self.epoch,
            replicas: self.replicas.clone(),
            version,
        }));
    }

    /// The primary answered the commit.
    fn primary_answered(&mut self, now: Instant, version: u64, answer: Result<Response, OpError>) {
        let primary = self.replicas[0];
        match answer {
            Ok(Response::Done) => self.pause_then(
                now,
                self.hooks.pause_after_primary_commit,
                AfterPause::CommitOthers { version },
            ),
            Ok(other) => self.abort(now, 1, unexpected(&other)),
            Err(e) if e.kind == ErrorKind::Aborted => {
                let error = op_error(
                    ErrorKind::Aborted,
                    format!(
                        "the primary {} refused the commit: {}",
                        primary.addr, e.message
                    ),
                );
                self.abort(now, 1, error);
            }
            Err(e) if e.kind == ErrorKind::NotFound => {
                // It rejoined with an empty state, or decided and forgot the transaction:
                // whether it committed cannot be told from here.
                let error = self.bound.timed(op_error(
                    ErrorKind::Timeout,
                    format!(
                        "the primary {} does not know the transaction ({}); outcome unknown",
                        primary.addr, e.message
                    ),
                ));
                self.fail(error);
            }
            Err(e) => {
                let error = self.bound.timed(op_error(
                    ErrorKind::Timeout,
                    format!(
                        "the commit sent to the primary {} got no answer ({}); outcome unknown",
                        primary.addr, e.message
                    ),
                ));
                self.fail(error);
            }
        }
    }

    /// Every other replica answered its commit: success, or an unknown outcome.
    fn others_answered(&mut self, version: u64, acks: &[Option<Result<Response, OpError>>]) {
        for (replica, ack) in self.replicas[1..].iter().zip(acks) {
            let message = match ack {
                Some(Ok(Response::Done)) => continue,
                Some(Err(e)) => format!(
                    "committed at the primary, but replica {} answered: {}; outcome unknown",
                    replica.addr, e.message
                ),
                _ => format!(
                    "committed at the primary, but replica {} has not acknowledged; outcome unknown",
                    replica.addr
                ),
            };
            let error = self.bound.timed(op_error(ErrorKind::Timeout, message));
            self.fail(error);
            return;
        }
        self.succeed(version);
    }
}

impl Operation for Setr {
    type Output = SetrOutcome;

    /// Hands out the next queued request.
    fn poll_send(&mut self) -> Option<Send> {
        self.sends.pop_front()
    }

    /// Files the outcome of one request into the current step, and moves on when the step
    /// is complete. Answers to earlier steps (a vote after the vote was over) are ignored.
    fn handle_response(
        &mut self,
        now: Instant,
        token: u64,
        result: Result<Response, RequestError>,
    ) {
        let Some(slot) = self.awaited.remove(&token) else {
            return;
        };
        match std::mem::replace(&mut self.phase, SetrPhase::Done) {
            SetrPhase::Voting { mut votes } => {
                let answer = self.bound.answer(result, false);
                // Stop collecting at the first vote that is not a yes: the outcome is abort.
                let no = !matches!(answer, Ok(Response::Prepared { .. }));
                votes[slot] = Some(answer);
                if no || self.awaited.is_empty() {
                    self.awaited.clear();
                    self.decide(now, &votes);
                } else {
                    self.phase = SetrPhase::Voting { votes };
                }
            }
            SetrPhase::CommittingPrimary { version } => {
                let answer = self.bound.answer(result, true);
                self.primary_answered(now, version, answer);
            }
            SetrPhase::CommittingOthers { version, mut acks } => {
                acks[slot] = Some(self.bound.answer(result, false));
                if self.awaited.is_empty() {
                    self.others_answered(version, &acks);
                } else {
                    self.phase = SetrPhase::CommittingOthers { version, acks };
                }
            }
            SetrPhase::Aborting {
                waited,
                outstanding,
                error,
            } => {
                if !matches!(result, Ok(Response::Done)) {
                    debug!("abort of {}: a replica did not acknowledge", self.txid);
                }
                let outstanding = outstanding - usize::from(waited.get(slot) == Some(&true));
                if outstanding == 0 {
                    self.fail(error);
                } else {
                    self.phase = SetrPhase::Aborting {
                        waited,
                        outstanding,
                        error,
                    };
                }
            }
            phase @ (SetrPhase::Paused { .. } | SetrPhase::Done) => self.phase = phase,
        }
    }

    /// Ends a test hook's pause.
    fn handle_timeout(&mut self, now: Instant) {
        let SetrPhase::Paused { until, fails, then } = self.phase else {
            return;
        };
        if now < until {
            return;
        }
        if !fails {
            self.resume(now, then);
            return;
        }
        match then {
            AfterPause::Vote => {
                let error = op_error(
                    ErrorKind::Timeout,
                    "deadline reached while pausing after the view",
                );
                self.fail(self.bound.timed(error));
            }
            AfterPause::Commit { .. } => {
                let error = op_error(
                    ErrorKind::Timeout,
                    "deadline reached while pausing before the commit",
                );
                let error = self.bound.timed(error);
                self.abort(now, 0, error);
            }
            AfterPause::CommitOthers { .. } => {
                let error = op_error(
                    ErrorKind::Timeout,
                    "deadline reached after the primary committed; outcome unknown",
                );
                self.fail(self.bound.timed(error));
            }
        }
    }

    /// The end of the current pause, if pausing.
    fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            SetrPhase::Paused { until, .. } => Some(until),
            _ => None,
        }
    }

    /// The result, once finished.
    fn poll_outcome(&mut self) -> Option<Result<SetrOutcome, OpError>> {
        self.outcome.take()
    }
}

/// Why the vote failed, if it did, as the error `setr` reports (the transaction is then
/// aborted everywhere). An explicit no comes first (kind `aborted`, the most telling), then a
/// replica that could not vote (its transport kind: `unreachable`, `timeout`), then one
/// whose vote never came (`timeout`).
fn refusal(replicas: &[Member], votes: &[Option<Result<Response, OpError>>]) -> Option<OpError> {
    let pairs = || replicas.iter().zip(votes);
    let voted_no = pairs().find_map(|(r, v)| match v {
        Some(Err(e)) if e.kind == ErrorKind::Aborted => Some(op_error(
            ErrorKind::Aborted,
            format!("replica {} voted no: {}", r.addr, e.message),
        )),
        _ => None,
    });
    let failed = || {
        pairs().find_map(|(r, v)| match v {
            Some(Err(e)) => Some(op_error(
                e.kind,
                format!(
                    "replica {} could not vote ({}); the transaction was aborted",
                    r.addr, e.message
                ),
            )),
            Some(Ok(Response::Prepared { .. })) | None => None,
            Some(Ok(other)) => Some(unexpected(other)),
        })
    };
    let silent = || {
        pairs().find(|(_, v)| v.is_none()).map(|(r, _)| {
            op_error(
                ErrorKind::Timeout,
                format!(
                    "replica {} did not vote in time; the transaction was aborted",
                    r.addr
                ),
            )
        })
    };
    voted_no.or_else(failed).or_else(silent)
}

/// How long `getr` waits for a replica before asking the next one as well (a hedge): a
/// frozen or cut-off replica then costs a read this long, not its share of the deadline.
/// On loopback a read answers in tens of microseconds, and under load in a few
/// milliseconds; a replica silent this long is most likely not answering.
pub const GETR_HEDGE_AFTER: Duration = Duration::from_millis(50);

/// `getr KEY` against one view as a state machine: the key's replicas are asked in ring
/// order until one has the key; `not_found` only when every replica that answered said it
/// does not hold it. Each replica gets its share of the remaining time, so one silent
/// replica cannot use it all, and a replica silent for [`GETR_HEDGE_AFTER`] has the next
/// one asked beside it (the first value to come back wins: every replica that serves the
/// key holds its latest committed version).
#[derive(Debug)]
pub struct Getr {
    /// The key.
    key: String,
    /// The epoch of the view the replicas come from.
    epoch: Epoch,
    /// The key's replicas, primary first.
    replicas: Vec<Member>,
    /// The command's deadline.
    bound: Bound,
    /// The next replica to ask (an index into `replicas`): those before it were asked.
    index: usize,
    /// The tokens of the requests in flight (a replica's index + 1).
    awaited: BTreeSet<u64>,
    /// When the next replica is asked beside those in flight, if any is left.
    hedge_at: Option<Instant>,
    /// Requests to hand out.
    sends: VecDeque<Send>,
    /// Replicas that said they do not hold the key.
    not_found: usize,
    /// A reachable replica that gave no usable answer (it may hold the key).
    silent: Option<OpError>,
    /// A replica that could not be reached.
    unreachable: Option<OpError>,
    /// A replica that refused our epoch.
    stale: Option<OpError>,
    /// A replica refused the view or could not be reached (a cached view should go).
    view_refused: bool,
    /// The result, until taken.
    outcome: Option<Result<GetrOutcome, OpError>>,
}

impl Getr {
    /// Starts `getr key` against `placement` at `now`, within `deadline` (`timeout` is the
    /// command's length, for messages).
    pub fn new(
        now: Instant,
        key: &str,
        placement: &Placement,
        deadline: Option<Instant>,
        timeout: Option<Duration>,
    ) -> Getr {
        let mut getr = Getr {
            key: key.to_owned(),
            epoch: placement.view.epoch,
            replicas: placement.replicas(key),
            bound: Bound { deadline, timeout },
            index: 0,
            awaited: BTreeSet::new(),
            hedge_at: None,
            sends: VecDeque::new(),
            not_found: 0,
            silent: None,
            unreachable: None,
            stale: None,
            view_refused: false,
            outcome: None,
        };
        getr.ask(now);
        getr
    }

    /// True if a replica refused the view the read used, or could not be reached.
    pub fn is_view_refused(&self) -> bool {
        self.view_refused
    }

    /// Asks the replica at `index` (and arms the hedge if another is left), or concludes
    /// when none is left and none is in flight.
    fn ask(&mut self, now: Instant) {
        let Some(replica) = self.replicas.get(self.index).copied() else {
            self.hedge_at = None;
            if self.awaited.is_empty() {
                self.conclude();
            }
            return;
        };
        let left = (self.replicas.len() - self.index) as u32;
        let share = self
            .bound
            .deadline
            .map(|d| now + d.saturating_duration_since(now) / left);
        let token = self.index as u64 + 1;
        self.index += 1;
        self.awaited.insert(token);
        self.hedge_at = (self.index < self.replicas.len()).then(|| now + GETR_HEDGE_AFTER);
        self.sends.push_back(Send {
            token,
            dst: replica.addr,
            request: Request::GetR {
                key: self.key.clone(),
                epoch: self.epoch,
            },
            deadline: share,
            unacked_attempts: None,
        });
    }

    /// Every replica was asked and none had the key: the error to report.
    fn conclude(&mut self) {
        let error = match (
            self.silent.take(),
            self.stale.take().or(self.unreachable.take()),
        ) {
            (Some(e), _) => e,
            (None, Some(e)) if self.not_found == 0 => e,
            _ => op_error(
                ErrorKind::NotFound,
                format!(
                    "{:?} is on none of its {} reachable replicas",
                    self.key, self.not_found
                ),
            ),
        };
        self.outcome = Some(Err(error));
    }
}

impl Operation for Getr {
    type Output = GetrOutcome;

    /// Hands out the next queued request.
    fn poll_send(&mut self) -> Option<Send> {
        self.sends.pop_front()
    }

    /// Takes one replica's answer: the value ends the read; anything else moves on to the
    /// next replica.
    fn handle_response(
        &mut self,
        now: Instant,
        token: u64,
        result: Result<Response, RequestError>,
    ) {
        if self.outcome.is_some() || !self.awaited.remove(&token) {
            return;
        }
        let replica = self.replicas[(token - 1) as usize];
        match self.bound.answer(result, true) {
            Ok(Response::Found { value, version }) => {
                self.awaited.clear();
                self.hedge_at = None;
                self.outcome = Some(Ok(GetrOutcome {
                    value,
                    version,
                    from: replica,
                }));
                return;
            }
            Ok(other) => self.silent = Some(unexpected(&other)),
            Err(e) if e.kind == ErrorKind::NotFound => self.not_found += 1,
            Err(e) => {
                debug!(
                    "getr {:?}: replica {} failed: {}",
                    self.key, replica.addr, e.message
                );
                // A replica that is unreachable, or at another epoch than our view (it
                // refuses with `rebalancing`), has nothing to say about the key.
                match e.kind {
                    ErrorKind::Rebalancing => {
                        self.view_refused = true;
                        self.stale = Some(e);
                    }
                    ErrorKind::Unreachable => {
                        self.view_refused = true;
                        self.unreachable = Some(e);
                    }
                    _ => self.silent = Some(e),
                }
            }
        }
        // This replica is done: ask the next (a hedged request still out may yet answer;
        // with none left to ask, the read concludes once nothing is in flight).
        self.ask(now);
    }

    /// The hedge: a replica silent for [`GETR_HEDGE_AFTER`] has the next one asked too.
    fn handle_timeout(&mut self, now: Instant) {
        if self.outcome.is_none() && self.hedge_at.is_some_and(|at| at <= now) {
            self.ask(now);
        }
    }

    /// When the next replica is asked beside the one that is silent, if any is left.
    fn poll_timeout(&self) -> Option<Instant> {
        self.hedge_at
    }

    /// The hedge timer runs while answers are awaited.
    fn listens_while_waiting(&self) -> bool {
        true
    }

    /// The result, once finished.
    fn poll_outcome(&mut self) -> Option<Result<GetrOutcome, OpError>> {
        self.outcome.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::view::{ServerId, View};

    /// A placement of three servers, all replicas of every key.
    fn placement() -> Placement {
        Placement::new(View {
            epoch: Epoch(3),
            members: (1..=3u16)
                .map(|i| Member {
                    id: ServerId(u128::from(i)),
                    addr: SocketAddr::from(([127, 0, 0, 1], 38000 + i)),
                })
                .collect(),
            replicas: 3,
            vnodes: 8,
        })
    }

    /// Every request the read hands out now.
    fn sent(getr: &mut Getr) -> Vec<Send> {
        std::iter::from_fn(|| getr.poll_send()).collect()
    }

    /// Issue 17: a replica silent for the hedge delay (frozen, cut off) has the next one
    /// asked beside it; the first value back wins, and the late answer changes nothing.
    #[test]
    fn a_silent_replica_is_hedged_past() {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(9);
        let mut getr = Getr::new(t0, "k", &placement(), Some(deadline), None);
        let first = sent(&mut getr);
        assert_eq!(first.len(), 1);
        // Without the hedge the first replica would have a third of the 9 s.
        assert_eq!(getr.poll_timeout(), Some(t0 + GETR_HEDGE_AFTER));
        getr.handle_timeout(t0 + GETR_HEDGE_AFTER);
        let second = sent(&mut getr);
        assert_eq!(second.len(), 1);
        assert_ne!(second[0].dst, first[0].dst);
        let found = Response::Found {
            value: "v".into(),
            version: 7,
        };
        getr.handle_response(t0 + GETR_HEDGE_AFTER, second[0].token, Ok(found.clone()));
        let outcome = getr.poll_outcome().expect("done").expect("found");
        assert_eq!(
            (outcome.value.as_str(), outcome.from.addr),
            ("v", second[0].dst)
        );
        getr.handle_response(t0 + GETR_HEDGE_AFTER, first[0].token, Ok(found));
        assert!(getr.poll_outcome().is_none() && sent(&mut getr).is_empty());
        assert_eq!(getr.poll_timeout(), None);
    }

    /// A read is `not_found` only once every replica answered so; a hedged request still
    /// out is waited for.
    #[test]
    fn not_found_waits_for_every_replica_asked() {
        let t0 = Instant::now();
        let mut getr = Getr::new(t0, "k", &placement(), None, None);
        let first = sent(&mut getr);
        getr.handle_timeout(t0 + GETR_HEDGE_AFTER);
        let second = sent(&mut getr);
        let missing = || {
            Ok(Response::Error(OpError {
                kind: ErrorKind::NotFound,
                message: "no such key".into(),
                cycle: Vec::new(),
            }))
        };
        getr.handle_response(t0 + GETR_HEDGE_AFTER, second[0].token, missing());
        let third = sent(&mut getr);
        assert_eq!(third.len(), 1, "the next replica is asked at once");
        getr.handle_response(t0 + GETR_HEDGE_AFTER, third[0].token, missing());
        assert!(getr.poll_outcome().is_none(), "the first is still out");
        getr.handle_response(t0 + GETR_HEDGE_AFTER, first[0].token, missing());
        let outcome = getr.poll_outcome().expect("done");
        assert_eq!(outcome.unwrap_err().kind, ErrorKind::NotFound);
    }
}
