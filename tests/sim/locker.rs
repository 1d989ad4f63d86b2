//! The simulated lock client: takes one of the run's locks at a time through the view-leader
//! group, holds it a while and releases it, as `client lock_get` / `lock_release` do: a
//! waiting request is renewed every [`RENEW_INTERVAL`], each renewal bounded by
//! [`RENEW_BOUND`]; a member that is unreachable (or refused), or that leaves
//! [`FAILOVER_AFTER`] renewals in a row unanswered, is given up for the next one; a request
//! still waiting at the operation's bound is withdrawn. The command-line client's `lock_get`
//! is a blocking loop on a real socket, so this actor repeats its steps as a sans-IO machine
//! on the simulated endpoint (the requests and answers are the product's own).
//!
//! What the checks need is the client's side of the story ([`LockEvent`]): when it learned it
//! holds a lock (the `LockGranted` answer arrived) and when it stopped holding it (it sent
//! the release: the view leader may hand the lock on as soon as that arrives). A client
//! killed while holding a lock holds it until its next life, which first releases what the
//! previous one asked for (a real program recovering would do the same; a confirmed holder
//! otherwise keeps a lock forever).
//!
//! Each `lock_get` picks a claim, written down before the first request leaves (the
//! client's durable record, which survives a kill: [`LockActor::claims`]); a release and a
//! withdrawal name it, so one that arrives late cannot release a later grant.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use trireme::reliable::{Endpoint, RequestError, RequestId};
use trireme::util::rng::Rng;
use trireme::wire::message::{ErrorKind, Request, Response};

/// How often a waiting request is renewed (the command-line client's interval; the view
/// leader drops a waiting request not renewed for about a second).
pub const RENEW_INTERVAL: Duration = Duration::from_millis(250);
/// The longest one renewal may take before a fresh one is sent.
pub const RENEW_BOUND: Duration = Duration::from_millis(300);
/// Renewals in a row a member leaves unanswered before another member is asked.
pub const FAILOVER_AFTER: u32 = 3;
/// The longest a withdrawal (or one release attempt) may take.
const WITHDRAW_RESERVE: Duration = Duration::from_millis(300);
/// The bound of one release attempt (a failed one is sent again, to the next member).
const RELEASE_BOUND: Duration = Duration::from_secs(1);
/// How long a client waits before it sends a failed release again, or renews a request
/// whose member was unreachable (a dead address answers at once: no busy loop).
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// The locks of a run.
pub const LOCKS: [&str; 2] = ["L0", "L1"];

/// What a lock client learned or did, for the mutual-exclusion check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockStep {
    /// The `LockGranted` answer arrived: from now on the client acts as the holder.
    Granted,
    /// The client sent the release (or, after a kill, its next life did): it no longer acts
    /// as the holder.
    ReleaseSent,
}

/// One step of a lock client's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockEvent {
    /// Virtual time since the start.
    pub at: Duration,
    /// The requester name (one per client slot, the same across its lives).
    pub requester: String,
    /// The lock.
    pub lock: String,
    /// What happened.
    pub step: LockStep,
    /// The view-leader generation it happened in: a group of one restarted with no memory
    /// starts a new one (its lock table is gone); a group of 3 or 5 has one.
    pub generation: u64,
}

/// Where a lock client stands.
#[derive(Debug)]
enum State {
    /// Releasing the locks a previous life may hold (each with the claim it last asked
    /// under), these still to go.
    Recovering(Vec<(String, u64)>),
    /// Between operations (the next one at the timer, unless stopped).
    Idle,
    /// Asking for `lock` (the first request or a renewal).
    Getting {
        /// The lock.
        lock: String,
        /// Past this instant the request is withdrawn.
        give_up: Instant,
        /// Renewals in a row the member in use left unanswered.
        unanswered: u32,
    },
    /// Holding `lock` until the timer.
    Holding(String),
    /// The release of `lock` is out (sent again until answered).
    Releasing(String),
    /// The withdrawal of the request for `lock` is out.
    Withdrawing,
}

/// A lock client (see the module doc).
pub struct LockActor {
    /// Its requester name.
    requester: String,
    /// The view-leader members, in order.
    members: Vec<SocketAddr>,
    /// The member in use (an index into `members`).
    current: usize,
    /// Its random source (locks, hold and think times).
    rng: Rng,
    /// Where it stands.
    state: State,
    /// Its next timed step.
    timer: Option<Instant>,
    /// The tag of the request whose answer it waits for.
    waiting: Option<u64>,
    /// The next request tag.
    next_tag: u64,
    /// The bound of a whole `lock_get`.
    op_timeout: Duration,
    /// No new operations (the quiet period).
    stopped: bool,
    /// Steps since the world last collected them (virtual instant, lock, step).
    pub events: Vec<(Instant, String, LockStep)>,
    /// Grants received so far (for the counters).
    pub grants: u64,
    /// Requests it gave up on (withdrawn, or failed).
    pub given_up: u64,
    /// While recovering: the release of the first lock left was sent (and noted).
    recovering_sent: bool,
    /// The claim of the last `lock_get` per lock (written before it is sent; kept across
    /// lives).
    claims: BTreeMap<String, u64>,
}

impl LockActor {
    /// Lock client `index` talking to `members` (the first one first), starting at `now`;
    /// `recover`: a later life, given the claims its previous one wrote down, which it
    /// first releases.
    pub fn new(
        index: usize,
        members: Vec<SocketAddr>,
        mut rng: Rng,
        op_timeout: Duration,
        now: Instant,
        recover: Option<BTreeMap<String, u64>>,
    ) -> LockActor {
        let current = rng.below(members.len() as u64) as usize;
        let first = now + Duration::from_millis(300 + rng.below(200));
        let claims = recover.clone().unwrap_or_default();
        let state = match recover {
            Some(claims) => State::Recovering(claims.into_iter().collect()),
            None => State::Idle,
        };
        LockActor {
            requester: format!("locker{index}"),
            members,
            current,
            rng,
            state,
            timer: Some(first),
            waiting: None,
            next_tag: 1,
            op_timeout,
            stopped: false,
            events: Vec::new(),
            grants: 0,
            given_up: 0,
            recovering_sent: false,
            claims,
        }
    }

    /// The claims it wrote down (what its next life releases).
    pub fn claims(&self) -> BTreeMap<String, u64> {
        self.claims.clone()
    }

    /// Its requester name.
    pub fn requester(&self) -> &str {
        &self.requester
    }

    /// Starts no new operation from now on (one under way finishes).
    pub fn stop(&mut self) {
        self.stopped = true;
        if matches!(self.state, State::Idle) {
            self.timer = None;
        }
    }

    /// True when nothing is under way: no lock held or asked for, no release out.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle)
    }

    /// When it next has timed work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timer
    }

    /// Its timer fired.
    pub fn handle_timeout(
        &mut self,
        now: Instant,
        endpoint: &mut Endpoint,
        tokens: &mut BTreeMap<RequestId, u64>,
    ) {
        if self.timer.is_none_or(|t| t > now) {
            return;
        }
        self.timer = None;
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Idle if !self.stopped => {
                let lock = LOCKS[self.rng.below(LOCKS.len() as u64) as usize].to_owned();
                self.claims.insert(lock.clone(), self.rng.next_u64());
                let reserve = WITHDRAW_RESERVE.min(self.op_timeout / 4);
                self.state = State::Getting {
                    lock,
                    give_up: now + self.op_timeout - reserve,
                    unanswered: 0,
                };
                self.renew(now, endpoint, tokens);
            }
            State::Idle => {}
            State::Getting {
                lock,
                give_up,
                unanswered,
            } => {
                self.state = State::Getting {
                    lock,
                    give_up,
                    unanswered,
                };
                self.renew(now, endpoint, tokens);
            }
            State::Holding(lock) => {
                self.events.push((now, lock.clone(), LockStep::ReleaseSent));
                self.state = State::Releasing(lock.clone());
                self.send_release(now, lock, endpoint, tokens);
            }
            State::Recovering(locks) if self.waiting.is_none() => {
                // The first release, or one sent again after a failure.
                match locks.first().map(|(lock, _)| lock.clone()) {
                    Some(lock) if self.recovering_sent => {
                        self.state = State::Recovering(locks);
                        self.send_release(now, lock, endpoint, tokens);
                    }
                    _ => {
                        self.state = State::Recovering(locks);
                        self.recover(now, endpoint, tokens);
                    }
                }
            }
            State::Releasing(lock) if self.waiting.is_none() => {
                // Sent again after a failure.
                self.state = State::Releasing(lock.clone());
                self.send_release(now, lock, endpoint, tokens);
            }
            state @ (State::Recovering(_) | State::Releasing(_) | State::Withdrawing) => {
                // A request is out; its answer moves on.
                self.state = state;
            }
        }
    }

    /// Sends (or renews) the `lock_get` of the lock being asked for, or withdraws it if the
    /// time is up.
    fn renew(
        &mut self,
        now: Instant,
        endpoint: &mut Endpoint,
        tokens: &mut BTreeMap<RequestId, u64>,
    ) {
        let State::Getting { lock, give_up, .. } = &self.state else {
            return;
        };
        let lock = lock.clone();
        if now >= *give_up {
            self.withdraw(now, lock, endpoint, tokens);
            return;
        }
        let deadline = (now + RENEW_BOUND).min(*give_up);
        let request = Request::LockGet {
            claim: self.claim(&lock),
            lock,
            requester: self.requester.clone(),
        };
        self.send(now, request, deadline, endpoint, tokens);
    }

    /// Gives up on `lock`: withdraws the request (releasing the lock if a grant raced it).
    fn withdraw(
        &mut self,
        now: Instant,
        lock: String,
        endpoint: &mut Endpoint,
        tokens: &mut BTreeMap<RequestId, u64>,
    ) {
        self.given_up += 1;
        self.state = State::Withdrawing;
        let request = Request::LockWithdraw {
            claim: self.claim(&lock),
            lock,
            requester: self.requester.clone(),
        };
        self.send(now, request, now + WITHDRAW_RESERVE, endpoint, tokens);
    }

    /// The claim of the last `lock_get` of `lock` (0 if none was ever made).
    fn claim(&self, lock: &str) -> u64 {
        self.claims.get(lock).copied().unwrap_or(0)
    }

    /// Sends the release of `lock` (of the holding under its last claim).
    fn send_release(
        &mut self,
        now: Instant,
        lock: String,
        endpoint: &mut Endpoint,
        tokens: &mut BTreeMap<RequestId, u64>,
    ) {
        let request = Request::LockRelease {
            claim: Some(self.claim(&lock)),
            lock,
            requester: self.requester.clone(),
        };
        self.send(now, request, now + RELEASE_BOUND, endpoint, tokens);
    }

    /// Releases the next lock a previous life may hold (noting that it no longer acts as
    /// its holder), or starts operating once none is left.
    fn recover(
        &mut self,
        now: Instant,
        endpoint: &mut Endpoint,
        tokens: &mut BTreeMap<RequestId, u64>,
    ) {
        let State::Recovering(locks) = &self.state else {
            return;
        };
        match locks.first() {
            Some((lock, _)) => {
                let lock = lock.clone();
                self.events.push((now, lock.clone(), LockStep::ReleaseSent));
                self.recovering_sent = true;
                self.send_release(now, lock, endpoint, tokens);
            }
            None => self.idle(now),
        }
    }

    /// Starts request `request` to the member in use, bounded by `deadline`.
    fn send(
        &mut self,
        now: Instant,
        request: Request,
        deadline: Instant,
        endpoint: &mut Endpoint,
        tokens: &mut BTreeMap<RequestId, u64>,
    ) {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.waiting = Some(tag);
        let dst = self.members[self.current];
        let started = request
            .encode()
            .map_err(|_| RequestError::Timeout { peer: dst })
            .and_then(|body| endpoint.request(now, dst, body, Some(deadline)));
        match started {
            Ok(id) => {
                tokens.insert(id, tag);
            }
            Err(e) => self.handle_response(now, tag, Err(e), endpoint, tokens),
        }
    }

    /// Between operations: the next one after a think time.
    fn idle(&mut self, now: Instant) {
        self.state = State::Idle;
        self.waiting = None;
        self.timer = (!self.stopped).then(|| now + Duration::from_millis(5 + self.rng.below(300)));
    }

    /// Moves on to the next member (if there is another).
    fn fail_over(&mut self) -> bool {
        if self.members.len() < 2 {
            return false;
        }
        self.current = (self.current + 1) % self.members.len();
        true
    }

    /// The answer to the request tagged `tag` (or why none came).
    pub fn handle_response(
        &mut self,
        now: Instant,
        tag: u64,
        result: Result<Response, RequestError>,
        endpoint: &mut Endpoint,
        tokens: &mut BTreeMap<RequestId, u64>,
    ) {
        if self.waiting != Some(tag) {
            return; // a late answer to an abandoned request
        }
        self.waiting = None;
        // The member is gone (unreachable, or refused: it answers `unreachable`) or silent.
        let down = match &result {
            Err(RequestError::Unreachable { .. }) => Some(true),
            Ok(Response::Error(e)) if e.kind == ErrorKind::Unreachable => Some(true),
            Err(RequestError::Timeout { .. }) => Some(false),
            Ok(Response::Error(e)) if e.kind == ErrorKind::Timeout => Some(false),
            _ => None,
        };
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Getting {
                lock,
                give_up,
                unanswered,
            } => match (result, down) {
                (Ok(Response::LockGranted), _) => {
                    self.grants += 1;
                    self.events.push((now, lock.clone(), LockStep::Granted));
                    self.state = State::Holding(lock);
                    self.timer = Some(now + Duration::from_millis(1 + self.rng.below(150)));
                }
                (Ok(Response::LockWaiting { .. }), _) => {
                    self.state = State::Getting {
                        lock,
                        give_up,
                        unanswered: 0,
                    };
                    self.timer = Some((now + RENEW_INTERVAL).min(give_up));
                }
                (_, Some(unreachable)) => {
                    let unanswered = unanswered + u32::from(!unreachable);
                    let switch = unreachable || unanswered >= FAILOVER_AFTER;
                    if switch && !self.fail_over() && unreachable {
                        // Nobody else to ask: `lock_get` fails (nothing was granted).
                        self.given_up += 1;
                        self.idle(now);
                        return;
                    }
                    self.state = State::Getting {
                        lock,
                        give_up,
                        unanswered: if switch { 0 } else { unanswered },
                    };
                    if unreachable {
                        self.timer = Some(now + RETRY_PAUSE);
                    } else {
                        self.renew(now, endpoint, tokens);
                    }
                }
                (_, None) => self.withdraw(now, lock, endpoint, tokens),
            },
            State::Releasing(lock) => match (result, down) {
                (Ok(Response::LockReleased), _) => self.idle(now),
                (Ok(Response::Error(e)), _) if e.kind == ErrorKind::NotHolder => self.idle(now),
                (_, down) => {
                    if down.is_some() {
                        self.fail_over();
                    }
                    self.state = State::Releasing(lock);
                    self.timer = Some(now + RETRY_PAUSE);
                }
            },
            State::Recovering(mut locks) => {
                let done = matches!(&result, Ok(Response::LockReleased))
                    || matches!(&result, Ok(Response::Error(e)) if e.kind == ErrorKind::NotHolder);
                self.state = if done {
                    locks.remove(0);
                    self.recovering_sent = false;
                    State::Recovering(locks)
                } else {
                    if down.is_some() {
                        self.fail_over();
                    }
                    State::Recovering(locks)
                };
                if done {
                    self.recover(now, endpoint, tokens);
                } else {
                    self.timer = Some(now + RETRY_PAUSE);
                }
            }
            State::Withdrawing => {
                if down == Some(true) {
                    self.fail_over();
                }
                self.idle(now);
            }
            state @ (State::Idle | State::Holding(_)) => self.state = state,
        }
    }
}
