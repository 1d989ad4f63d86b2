//! The command-line client's operations, one method per command.
//!
//! A [`Client`] sends requests through a [`net::Handle`] and turns answers and transport
//! failures into values or [`OpError`]s with the contract's error kinds. One deadline bounds
//! the whole command (`--timeout-ms`): every request it sends carries what is left of it.
//!
//! # The view-leader group
//!
//! The view leader may be a replicated group, any member of which answers. The client is
//! given candidate addresses (`--viewleader A,B,C`, else the default ports): it uses the
//! first that answers as a view leader ([`discover`]), then the group's leader once an
//! answer names it, and adds the members an answer lists to its candidates. A view-leader
//! request that fails with `timeout` or `unreachable` (the member died, paused or is cut
//! off) is sent again to another member within the deadline: while another is left, each
//! attempt is bounded by [`VIEWLEADER_ATTEMPT`], so one silent member cannot use up the
//! command's time. Members that failed are tried last. With one candidate, nothing changes:
//! a request may take until the deadline.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use log::{debug, info};

use crate::placement::ring;
use crate::placement::view::{Epoch, Member};
use crate::reliable::RequestError;
use crate::runtime::net::{self, Reply};
use crate::txn::coordinator::{Getr, Operation, Setr, unexpected};
pub use crate::txn::coordinator::{GetrOutcome, SetrHooks, SetrOutcome};
use crate::util::rng::Rng;
use crate::wire::message::{self, ErrorKind, OpError, Request, Response, TxId};

mod replicated;
pub use replicated::{REBALANCING_POLL, Replicated, encode};

// Re-exported where callers of the client have always found them.
pub use crate::txn::coordinator::transport_error;
pub use crate::txn::routing::{Placement, ServersInfo};

/// How often a waiting `lock_get` renews its request (the view leader drops a waiting
/// request not renewed for about a second).
const LOCK_RENEW_INTERVAL: Duration = Duration::from_millis(250);

/// The longest one renewal may take: past it a fresh renewal is sent, rather than waiting
/// out the retransmission backoff (the view leader drops requests not renewed for 1 s).
const LOCK_RENEW_BOUND: Duration = Duration::from_millis(300);

/// The longest a withdrawal after giving up on a lock may take, carved out of the deadline.
const WITHDRAW_RESERVE: Duration = Duration::from_millis(300);

/// While another view-leader member is left to try, the longest one view-leader request may
/// take before the next member is asked (an election of the group takes well under it).
pub const VIEWLEADER_ATTEMPT: Duration = Duration::from_secs(1);

/// Once a candidate answered discovery as a view leader, how much longer the candidates
/// before it in order are waited for (a silent one, e.g. a paused member, would otherwise
/// hold discovery until the deadline).
pub const DISCOVERY_GRACE: Duration = Duration::from_millis(300);

/// How long the client waits before asking the view-leader group again when every member
/// it tried failed or answered that it could not reach a leader (an election is under way:
/// it takes well under a second).
pub const GROUP_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Without a deadline (`--timeout-ms 0`), how many times the client waits
/// [`GROUP_RETRY_PAUSE`] for the view-leader group before giving up.
const GROUP_RETRIES_WITHOUT_DEADLINE: u32 = 50;

/// A `lock_get` whose renewals went unanswered this many times in a row asks another
/// view-leader member, if there is one (the view leader drops a request not renewed for
/// about a second).
const LOCK_FAILOVER_AFTER: u32 = 3;

/// A client bound to one network driver and one command deadline.
#[derive(Debug)]
pub struct Client {
    /// The network driver.
    handle: net::Handle,
    /// The view-leader member in use: given, found by probing `candidates`, or the group's
    /// leader as an answer named it (`None`: discover one before the next request).
    viewleader: Option<SocketAddr>,
    /// The view-leader addresses known, in order: the given ones (or the default ports),
    /// then the group members answers listed (never shrinks).
    candidates: Vec<SocketAddr>,
    /// Members that failed a request (`timeout`, `unreachable`) or discovery in this
    /// command: probed last, and never asked as a fallback.
    failed: Vec<SocketAddr>,
    /// The target of the unreplicated commands.
    server: SocketAddr,
    /// When the whole command must have finished (`None`: no bound).
    deadline: Option<Instant>,
    /// The whole command's time bound, for messages and for carving reserves.
    timeout: Option<Duration>,
    /// `--wait`: replicated operations wait for rebalancing to end instead of failing.
    wait: bool,
    /// A view kept across operations by a long-lived caller, if any.
    cache: Option<ViewCache>,
    /// Whether replicated operations run on the network driver's thread ([`net::Job`]) rather
    /// than on the caller's (see [`Client::with_operations_on_driver`]).
    on_driver: bool,
    /// The operation being run has test hooks (pauses the caller sleeps through), so it runs
    /// on the caller's thread even with `on_driver`.
    hooked: bool,
    /// The epoch of the view the current operation used, and whether a replica refused it
    /// or could not be reached (then a cached view of that epoch is dropped).
    view_used: Option<(Epoch, bool)>,
    /// The newest epoch this client has operated on: a view below it is never used.
    epoch_floor: Epoch,
}

/// How long a cached view is used before the view leader is asked again. Replicas refuse an
/// operation at another epoch than theirs (or while rebalancing), and any such refusal empties
/// the cache at once; the lease bounds how long a client keeps a view it has no reason to
/// doubt (a server cut off from the view leader may not know it left the view).
pub const VIEW_LEASE: Duration = Duration::from_millis(250);

/// The view (and ring) a long-lived caller such as `client bench` keeps across operations,
/// so that a replicated operation costs no view-leader round trip: used for [`VIEW_LEASE`]
/// after it was fetched, and dropped as soon as a replica refuses it. Cloning shares it.
///
/// The trade: within the lease, an operation does not ask the view leader, so it neither
/// sees the rebalancing flag (a replica that already knows the new epoch refuses, with
/// `aborted` for a prepare) nor learns that a replica left the view. A replica declared
/// dead but still running, cut off from the view leader, may then answer a read from the
/// old view: reads through a cache are not linearizable across a view change during the
/// lease. The command-line client never caches (one operation per process).
#[derive(Clone, Debug, Default)]
pub struct ViewCache(Arc<Mutex<Option<(Placement, Instant)>>>);

impl ViewCache {
    /// The cached placement, if it is younger than the lease.
    fn get(&self, now: Instant) -> Option<Placement> {
        let cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        cached
            .as_ref()
            .filter(|(_, fetched)| now.saturating_duration_since(*fetched) < VIEW_LEASE)
            .map(|(placement, _)| placement.clone())
    }

    /// Keeps `placement`, fetched at `at`, unless a newer view is cached already.
    fn put(&self, placement: Placement, at: Instant) {
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if cached
            .as_ref()
            .is_none_or(|(old, _)| old.view.epoch <= placement.view.epoch)
        {
            *cached = Some((placement, at));
        }
    }

    /// Forgets the cached view if it is of `epoch` (a replica refused it, or could not be
    /// reached); a newer one cached meanwhile stays.
    fn invalidate(&self, epoch: Epoch) {
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if cached
            .as_ref()
            .is_some_and(|(placement, _)| placement.view.epoch == epoch)
        {
            *cached = None;
        }
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

/// The view-leader group as one `query_servers` answer showed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupInfo {
    /// The member that leads the group: the answer's `leader`, else the member that
    /// answered (a group of one).
    pub leader: SocketAddr,
    /// The group's members: the answer's `group`, else the member that answered alone.
    pub members: Vec<SocketAddr>,
}

/// Why a request got no usable answer.
#[derive(Debug)]
enum Failure {
    /// No answer in time, or the OS reported the peer unreachable: the member may have died,
    /// paused or been cut off, and another may answer.
    Down(OpError),
    /// The peer answered that it cannot serve now (an error of kind `timeout` or
    /// `unreachable`: a view-leader member that cannot reach its group's leader, as during
    /// an election), or a discovery round found no view leader but some candidate may
    /// answer later: asking again shortly, or elsewhere, may succeed.
    Later(OpError),
    /// Anything else: an error answer, an undecodable one, a request that cannot be encoded.
    Other(OpError),
}

impl Failure {
    /// The error to report.
    fn into_error(self) -> OpError {
        match self {
            Failure::Down(e) | Failure::Later(e) | Failure::Other(e) => e,
        }
    }
}

impl Client {
    /// Creates a client. `viewleader` `None` means: probe `candidates` in order when the view
    /// leader is first needed; `Some` is used at once, `candidates` then serving as the
    /// members to fall back on if it fails. `timeout` `None` means no bound on the command.
    pub fn new(
        handle: net::Handle,
        viewleader: Option<SocketAddr>,
        candidates: Vec<SocketAddr>,
        server: SocketAddr,
        timeout: Option<Duration>,
    ) -> Client {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut known = Vec::new();
        for addr in viewleader.into_iter().chain(candidates) {
            if !known.contains(&addr) {
                known.push(addr);
            }
        }
        Client {
            handle,
            viewleader,
            candidates: known,
            failed: Vec::new(),
            server,
            deadline,
            timeout,
            wait: false,
            cache: None,
            on_driver: false,
            hooked: false,
            view_used: None,
            epoch_floor: Epoch(0),
        }
    }

    /// Keeps the view in `cache` across operations (see [`ViewCache`]).
    pub fn with_view_cache(mut self, cache: ViewCache) -> Client {
        self.cache = Some(cache);
        self
    }

    /// Runs replicated operations on the network driver's thread: the caller sleeps until the
    /// outcome instead of waking for every answer (a `setr` gets six). Test hooks' pauses
    /// would then stall the driver, so an operation with hooks still runs on the caller.
    pub fn with_operations_on_driver(mut self) -> Client {
        self.on_driver = true;
        self
    }

    /// Makes replicated operations wait (within the deadline) for rebalancing to end instead
    /// of failing with `rebalancing`.
    pub fn with_wait(mut self, wait: bool) -> Client {
        self.wait = wait;
        self
    }

    /// After an operation: forgets the cached view it used if a replica refused it or could
    /// not be reached, or if the operation failed in any way but a missing key. Only a cached
    /// view of that same epoch is dropped (another worker may have cached a newer one).
    fn doubt_view<T>(&mut self, outcome: &Result<T, OpError>) {
        let Some((epoch, refused)) = self.view_used.take() else {
            return;
        };
        let failed = matches!(outcome, Err(e) if e.kind != ErrorKind::NotFound);
        if (refused || failed)
            && let Some(cache) = &self.cache
        {
            cache.invalidate(epoch);
        }
    }

    /// Notes that a replica refused the view the current operation used, or could not be
    /// reached, so that a cached view of that epoch is dropped whatever the outcome.
    fn refused_view(&mut self) {
        if let Some((_, refused)) = &mut self.view_used {
            *refused = true;
        }
    }

    /// Sends `request` to `dst` within the command's deadline and returns the answer;
    /// an error answer becomes `Err`.
    fn call(&self, dst: SocketAddr, request: &Request) -> Result<Response, OpError> {
        self.call_until(dst, request, self.deadline)
    }

    /// Like [`Client::call`] with an explicit deadline.
    fn call_until(
        &self,
        dst: SocketAddr,
        request: &Request,
        deadline: Option<Instant>,
    ) -> Result<Response, OpError> {
        self.exchange(dst, request, deadline)
            .map_err(Failure::into_error)
    }

    /// Sends `request` to `dst`, bounded by `deadline`, and returns the answer. No answer
    /// (timeout, unreachable) is a [`Failure::Down`], an error answer of kind `timeout` or
    /// `unreachable` a [`Failure::Later`], any other error answer a [`Failure::Other`].
    fn exchange(
        &self,
        dst: SocketAddr,
        request: &Request,
        deadline: Option<Instant>,
    ) -> Result<Response, Failure> {
        let body = request
            .encode()
            .map_err(|e| Failure::Other(op_error(ErrorKind::BadInput, e.to_string())))?;
        let answer = self.handle.call(dst, body, deadline).map_err(|e| {
            let down = matches!(
                e,
                RequestError::Timeout { .. } | RequestError::Unreachable { .. }
            );
            let error = self.timed(transport_error(e));
            if down {
                Failure::Down(error)
            } else {
                Failure::Other(error)
            }
        })?;
        match Response::decode(&answer) {
            Ok(Response::Error(e)) if is_not_now(&e) => Err(Failure::Later(e)),
            Ok(Response::Error(e)) => Err(Failure::Other(e)),
            Ok(response) => Ok(response),
            Err(e) => Err(Failure::Other(op_error(
                ErrorKind::BadInput,
                format!("undecodable answer from {dst}: {e}"),
            ))),
        }
    }

    /// The known view-leader members other than `current` that have not failed, in order:
    /// where a view-leader request that `current` does not answer goes next.
    fn fallbacks(&self, current: SocketAddr) -> Vec<SocketAddr> {
        self.candidates
            .iter()
            .copied()
            .filter(|&a| a != current && !self.failed.contains(&a))
            .collect()
    }

    /// Records that view-leader member `member` failed: it is tried last from now on, and
    /// the next view-leader request looks for another if it was the one in use.
    fn forget_viewleader(&mut self, member: SocketAddr) {
        if !self.failed.contains(&member) {
            self.failed.push(member);
        }
        if self.viewleader == Some(member) {
            self.viewleader = None;
        }
    }

    /// Learns from a `Servers` answer: the group's members join the candidates, and the
    /// leader it names (unless it failed in this command) answers the next view-leader
    /// requests.
    fn learn_group(&mut self, leader: Option<SocketAddr>, group: &[SocketAddr]) {
        for &member in group {
            if !self.candidates.contains(&member) {
                self.candidates.push(member);
            }
        }
        if let Some(leader) = leader.filter(|l| !self.failed.contains(l)) {
            if !self.candidates.contains(&leader) {
                self.candidates.push(leader);
            }
            if self.viewleader != Some(leader) {
                debug!("following the view-leader group's leader to {leader}");
            }
            self.viewleader = Some(leader);
        }
    }

    /// True when the view leader is a group of several known members (several addresses
    /// given, or an answer listed them): a failed member is then worth replacing.
    fn is_group(&self) -> bool {
        self.candidates.len() > 1
    }

    /// True if there is time left for one more wait of [`GROUP_RETRY_PAUSE`] and a try.
    fn has_time_for_retry(&self) -> bool {
        self.deadline
            .is_none_or(|d| Instant::now() + GROUP_RETRY_PAUSE < d)
    }

    /// Waits [`GROUP_RETRY_PAUSE`] (an election may be under way), then forgets which members
    /// failed and which is in use, so the next request discovers again among all of them.
    fn pause_for_group(&mut self) {
        std::thread::sleep(GROUP_RETRY_PAUSE);
        self.failed.clear();
        self.viewleader = None;
    }

    /// How long the next view-leader request may take: with another member to fall back
    /// on, at most [`VIEWLEADER_ATTEMPT`]; else until the deadline.
    fn attempt_deadline(&self, has_fallback: bool) -> Option<Instant> {
        if has_fallback {
            let attempt = Instant::now() + VIEWLEADER_ATTEMPT;
            Some(self.deadline.map_or(attempt, |d| d.min(attempt)))
        } else {
            self.deadline
        }
    }

    /// Sends a view-leader request and returns the member that answered and its answer.
    /// A member that does not answer (timeout, unreachable) or answers that it cannot serve
    /// now is given up for the next (each attempt bounded by [`VIEWLEADER_ATTEMPT`] while
    /// another is left); once every member failed, the client waits [`GROUP_RETRY_PAUSE`]
    /// and starts over, within the deadline. With a single member, only a "not now" answer
    /// is asked again (a silent or unreachable lone view leader fails as it always did).
    fn call_viewleader(&mut self, request: &Request) -> Result<(SocketAddr, Response), OpError> {
        let mut retries = GROUP_RETRIES_WITHOUT_DEADLINE;
        loop {
            let member = self.viewleader()?;
            let fallbacks = self.fallbacks(member);
            let bound = self.attempt_deadline(!fallbacks.is_empty());
            let error = match self.exchange(member, request, bound) {
                Ok(response) => return Ok((member, response)),
                Err(Failure::Other(e)) => return Err(e),
                Err(Failure::Down(e)) if !self.is_group() => return Err(e),
                Err(Failure::Down(e) | Failure::Later(e)) => e,
            };
            let retries_left = self.deadline.is_some() || retries > 0;
            if !self.has_time_for_retry() || !retries_left {
                return Err(error);
            }
            info!(
                "view leader {member} cannot answer ({}); trying again",
                error.message
            );
            self.forget_viewleader(member);
            if fallbacks.is_empty() {
                retries = retries.saturating_sub(1);
                self.pause_for_group();
            }
        }
    }

    /// Adds the command's time bound to a timeout error's message.
    fn timed(&self, mut error: OpError) -> OpError {
        if error.kind == ErrorKind::Timeout
            && let Some(t) = self.timeout
        {
            error.message = format!("{} within {} ms", error.message, t.as_millis());
        }
        error
    }

    /// The view-leader member in use, probing the candidates (those that failed last) if
    /// none is: the first that answers, or the group's leader it names. While some member
    /// may answer later (silent, or between leaders), discovery is tried again every
    /// [`GROUP_RETRY_PAUSE`] within the deadline (each round bounded by
    /// [`VIEWLEADER_ATTEMPT`] among several candidates); when every candidate is gone
    /// (unreachable, or no view leader) it fails at once.
    pub fn viewleader(&mut self) -> Result<SocketAddr, OpError> {
        let mut retries = GROUP_RETRIES_WITHOUT_DEADLINE;
        loop {
            if let Some(addr) = self.viewleader {
                return Ok(addr);
            }
            let (fresh, failed): (Vec<SocketAddr>, Vec<SocketAddr>) = self
                .candidates
                .iter()
                .partition(|a| !self.failed.contains(a));
            let order: Vec<SocketAddr> = fresh.into_iter().chain(failed).collect();
            let round = self.attempt_deadline(self.is_group());
            match probe(&self.handle, &order, round) {
                Ok(found) => {
                    for member in found.failed {
                        if !self.failed.contains(&member) {
                            self.failed.push(member);
                        }
                    }
                    debug!("found a view leader at {}", found.member);
                    self.viewleader = Some(found.member);
                    self.learn_group(found.leader, &found.group);
                }
                Err(Failure::Later(e)) => {
                    let retries_left = self.deadline.is_some() || retries > 0;
                    if !self.has_time_for_retry() || !retries_left {
                        return Err(self.timed(e));
                    }
                    debug!("{}; asking again", e.message);
                    retries = retries.saturating_sub(1);
                    self.pause_for_group();
                }
                Err(failure) => return Err(failure.into_error()),
            }
        }
    }

    /// `print TEXT`: the server logs the text.
    pub fn print(&self, text: &str) -> Result<(), OpError> {
        if text.len() > message::MAX_PRINT_LEN {
            return Err(op_error(
                ErrorKind::BadInput,
                "print text longer than 64 KiB",
            ));
        }
        self.expect_done(self.call(
            self.server,
            &Request::Print {
                text: text.to_owned(),
            },
        )?)
    }

    /// `set KEY VALUE`: a raw write into the server's bucket.
    pub fn set(&self, key: &str, value: &str) -> Result<(), OpError> {
        message::check_key(key)?;
        message::check_value(value)?;
        let request = Request::Set {
            key: key.to_owned(),
            value: value.to_owned(),
        };
        self.expect_done(self.call(self.server, &request)?)
    }

    /// `get KEY`: a raw read from the server's bucket.
    pub fn get(&self, key: &str) -> Result<String, OpError> {
        message::check_key(key)?;
        match self.call(
            self.server,
            &Request::Get {
                key: key.to_owned(),
            },
        )? {
            Response::Value { value } => Ok(value),
            other => Err(unexpected(&other)),
        }
    }

    /// `query_all_keys`: the keys of the server's bucket, sorted.
    pub fn query_all_keys(&self) -> Result<Vec<String>, OpError> {
        match self.call(self.server, &Request::QueryAllKeys)? {
            Response::Keys { keys } => Ok(keys),
            other => Err(unexpected(&other)),
        }
    }

    /// `query_servers`: the current view and its rebalancing status.
    pub fn query_servers(&mut self) -> Result<ServersInfo, OpError> {
        self.query_servers_and_group().map(|(info, _)| info)
    }

    /// `query_servers` with the view-leader group that answered: its leader and members
    /// (the member that answered, when it is a group of one).
    pub fn query_servers_and_group(&mut self) -> Result<(ServersInfo, GroupInfo), OpError> {
        match self.call_viewleader(&Request::QueryServers)? {
            (
                member,
                Response::Servers {
                    view,
                    rebalancing,
                    pending,
                    leader,
                    group,
                },
            ) => {
                self.learn_group(leader, &group);
                let info = ServersInfo {
                    view,
                    rebalancing,
                    pending,
                };
                let group = GroupInfo {
                    leader: leader.unwrap_or(member),
                    members: if group.is_empty() {
                        vec![member]
                    } else {
                        group
                    },
                };
                Ok((info, group))
            }
            (_, other) => Err(unexpected(&other)),
        }
    }

    /// `lock_get LOCK REQUESTER`: waits until granted, renewing the request. Gives up at the
    /// deadline or when `cancel` fires (Ctrl-C), withdrawing the request first. Returns the
    /// claim the grant was made under (a random number picked for this call; a release that
    /// names it cannot release a later grant to the same requester).
    pub fn lock_get(
        &mut self,
        lock: &str,
        requester: &str,
        cancel: &Receiver<()>,
    ) -> Result<u64, OpError> {
        message::check_lock_name("lock name", lock)?;
        message::check_lock_name("requester", requester)?;
        let mut viewleader = self.viewleader()?;
        let claim = Rng::from_entropy().next_u64();
        let reserve = self
            .timeout
            .map_or(WITHDRAW_RESERVE, |t| WITHDRAW_RESERVE.min(t / 4));
        let give_up_at = self.deadline.map(|d| d - reserve);
        let request = Request::LockGet {
            lock: lock.to_owned(),
            requester: requester.to_owned(),
            claim,
        };
        let mut holder = String::from("another requester");
        // Renewals in a row the member in use left unanswered.
        let mut unanswered = 0;
        loop {
            let renewal_bound = Instant::now() + LOCK_RENEW_BOUND;
            let bound = give_up_at.map_or(renewal_bound, |limit| limit.min(renewal_bound));
            let mut wait = LOCK_RENEW_INTERVAL;
            match self.exchange(viewleader, &request, Some(bound)) {
                Ok(Response::LockGranted) => return Ok(claim),
                Ok(Response::LockWaiting {
                    holder: current,
                    position,
                }) => {
                    debug!("waiting for {lock} held by {current} (position {position})");
                    holder = current;
                    unanswered = 0;
                }
                Ok(other) => return Err(unexpected(&other)),
                // A member that died (unreachable) or stays silent is given up for another,
                // if there is one; the request is then renewed there at once.
                Err(Failure::Down(e))
                    if !self.fallbacks(viewleader).is_empty()
                        && (e.kind == ErrorKind::Unreachable
                            || unanswered + 1 >= LOCK_FAILOVER_AFTER) =>
                {
                    info!(
                        "view leader {viewleader} does not answer ({}); trying another member",
                        e.message
                    );
                    self.forget_viewleader(viewleader);
                    viewleader = self.viewleader()?;
                    unanswered = 0;
                    wait = Duration::ZERO;
                }
                // A slow renewal (loss) is simply replaced by a fresh one below.
                Err(Failure::Down(e)) if e.kind == ErrorKind::Timeout => {
                    debug!("a renewal of {lock} went unanswered; renewing again");
                    unanswered += 1;
                    wait = Duration::ZERO;
                }
                // A member that cannot reach its group's leader (an election): another member
                // at once if there is one, else this one again after the usual interval.
                Err(Failure::Later(e)) => {
                    debug!("{viewleader} cannot serve {lock} now: {}", e.message);
                    if !self.fallbacks(viewleader).is_empty() {
                        self.forget_viewleader(viewleader);
                        viewleader = self.viewleader()?;
                        unanswered = 0;
                        wait = Duration::ZERO;
                    }
                }
                Err(failure) => return Err(failure.into_error()),
            }
            let now = Instant::now();
            if let Some(limit) = give_up_at {
                wait = wait.min(limit.saturating_duration_since(now));
            }
            let cancelled = match cancel.recv_timeout(wait) {
                Ok(()) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => true,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => false,
            };
            let expired = give_up_at.is_some_and(|limit| Instant::now() >= limit);
            if cancelled || expired {
                self.withdraw(viewleader, lock, requester, claim);
                let why = if cancelled {
                    "interrupted"
                } else {
                    "timed out"
                };
                return Err(self.timed(op_error(
                    ErrorKind::Timeout,
                    format!("{why} waiting for {lock} (held by {holder})"),
                )));
            }
        }
    }

    /// Withdraws the waiting lock request of `claim` (releasing the lock if a grant raced
    /// us); best effort, within what is left of the deadline (or a short bound without one).
    fn withdraw(&self, viewleader: SocketAddr, lock: &str, requester: &str, claim: u64) {
        let deadline = self
            .deadline
            .unwrap_or_else(|| Instant::now() + WITHDRAW_RESERVE);
        let request = Request::LockWithdraw {
            lock: lock.to_owned(),
            requester: requester.to_owned(),
            claim,
        };
        match self.call_until(
            viewleader,
            &request,
            Some(deadline.max(Instant::now() + Duration::from_millis(50))),
        ) {
            Ok(_) => info!("withdrew the request of {requester} for {lock}"),
            Err(e) => info!(
                "could not withdraw the request of {requester} for {lock}: {}",
                e.message
            ),
        }
    }

    /// `lock_release LOCK REQUESTER [--claim N]`: releases what REQUESTER holds (only the
    /// holding granted under `claim`, if named).
    pub fn lock_release(
        &mut self,
        lock: &str,
        requester: &str,
        claim: Option<u64>,
    ) -> Result<(), OpError> {
        message::check_lock_name("lock name", lock)?;
        message::check_lock_name("requester", requester)?;
        let request = Request::LockRelease {
            lock: lock.to_owned(),
            requester: requester.to_owned(),
            claim,
        };
        match self.call_viewleader(&request)? {
            (_, Response::LockReleased) => Ok(()),
            (_, other) => Err(unexpected(&other)),
        }
    }

    /// Runs the replicated operation whose coordinator `build` makes: the view step (from
    /// the view cache when a long-lived caller keeps one, else from the view leader) and the
    /// coordinator, pumped on the network driver by [`Client::run`]; see [`Replicated`].
    /// `retry`: a `rebalancing` refusal is retried on a fresh view with `--wait` (reads, and writes a replica refused before any commit).
    /// Returns the outcome and the finished machine (for what it ran on).
    fn replicated<O: Operation>(
        &mut self,
        retry: bool,
        build: impl FnMut(Instant, &Placement) -> O + Clone + Send + 'static,
    ) -> (Result<O::Output, OpError>, Option<Replicated<O>>) {
        let mut retries = GROUP_RETRIES_WITHOUT_DEADLINE;
        loop {
            let (outcome, operation) = self.replicated_once(retry, build.clone());
            // Only a failure of the view step is tried again (no coordinator ran, nothing
            // was sent to a replica): every member of the group failed or answered that it
            // could not reach a leader. Wait for the election and start over.
            let view_step_failed = operation
                .as_ref()
                .is_some_and(|op| op.placement().is_none() && (op.is_not_now() || self.is_group()));
            let retry_view = matches!(&outcome, Err(e) if is_not_now(e))
                && view_step_failed
                && self.has_time_for_retry()
                && (self.deadline.is_some() || retries > 0);
            if !retry_view {
                return (outcome, operation);
            }
            if let Err(e) = &outcome {
                info!(
                    "the view-leader group cannot answer ({}); trying again",
                    e.message
                );
            }
            retries = retries.saturating_sub(1);
            self.pause_for_group();
        }
    }

    /// One attempt of [`Client::replicated`]: the view step (with the other known members
    /// as fallbacks) and the coordinator.
    fn replicated_once<O: Operation>(
        &mut self,
        retry: bool,
        build: impl FnMut(Instant, &Placement) -> O + Send + 'static,
    ) -> (Result<O::Output, OpError>, Option<Replicated<O>>) {
        let viewleader = match self.viewleader() {
            Ok(addr) => addr,
            Err(e) => return (Err(e), None),
        };
        let now = Instant::now();
        let cached = self.cache.as_ref().and_then(|c| c.get(now));
        let (deadline, timeout, wait, floor) =
            (self.deadline, self.timeout, self.wait, self.epoch_floor);
        let mut operation = match &cached {
            Some(placement) => Replicated::on_placement(
                now, placement, viewleader, deadline, timeout, wait, retry, floor, build,
            ),
            None => Replicated::new(viewleader, deadline, timeout, wait, retry, floor, build),
        };
        let fallbacks = self.fallbacks(viewleader);
        if !fallbacks.is_empty() {
            operation = operation.with_fallbacks(now, fallbacks, VIEWLEADER_ATTEMPT);
        }
        let outcome = if self.on_driver && !self.hooked {
            match self.run_on_driver(operation) {
                Some((outcome, finished)) => {
                    operation = finished;
                    outcome
                }
                None => {
                    let stopped = op_error(ErrorKind::Timeout, "the network driver stopped");
                    return (Err(stopped), None);
                }
            }
        } else {
            self.run(&mut operation)
        };
        for &member in operation.failed_viewleaders() {
            self.forget_viewleader(member);
        }
        self.viewleader = Some(operation.viewleader());
        self.epoch_floor = self.epoch_floor.max(operation.floor());
        if let Some(placement) = operation.placement() {
            if cached.is_none()
                && let Some(cache) = &self.cache
            {
                cache.put(placement.clone(), now);
            }
            self.view_used = Some((placement.view.epoch, false));
        }
        (outcome, Some(operation))
    }

    /// Runs `operation` on the network driver's own thread ([`OnDriver`]) and sleeps until it
    /// finishes; returns its result and the finished machine, or `None` if the driver
    /// stopped (taking the operation with it).
    fn run_on_driver<O: Operation>(&self, operation: O) -> Option<(Result<O::Output, OpError>, O)> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let job = OnDriver {
            operation: Some(operation),
            done: tx,
        };
        self.handle.run(Box::new(job)).ok()?;
        net::recv_spinning(&rx).ok()
    }

    /// Runs a replicated `operation` on the network driver until it finishes: hands its
    /// requests to the driver, feeds it their outcomes and its timers, and returns its result.
    fn run<O: Operation>(&self, operation: &mut O) -> Result<O::Output, OpError> {
        let (tx, rx) = crossbeam_channel::unbounded::<Reply>();
        loop {
            while let Some(send) = operation.poll_send() {
                let started = replicated::encode(&send).and_then(|body| {
                    self.handle
                        .start_with(
                            send.dst,
                            body,
                            send.deadline,
                            send.unacked_attempts,
                            &tx,
                            send.token,
                        )
                        .map_err(|e| {
                            debug!("cannot start a request to {}: {e}", send.dst);
                            RequestError::Unreachable { peer: send.dst }
                        })
                });
                if let Err(error) = started {
                    operation.handle_response(Instant::now(), send.token, Err(error));
                }
            }
            if let Some(outcome) = operation.poll_outcome() {
                return outcome;
            }
            // A pause (a test hook's, a poll of a rebalancing view) is slept through (tests
            // tell a client sitting in its hook by the sleep; answers that come meanwhile
            // wait in the channel); otherwise answers are taken as they come until the
            // operation's next timer (a read's hedge), which then fires.
            let timer = operation.poll_timeout();
            let received = match timer {
                Some(at) if !operation.listens_while_waiting() => {
                    std::thread::sleep(at.saturating_duration_since(Instant::now()));
                    None
                }
                _ => match net::recv_spinning_until(&rx, timer) {
                    Ok(reply) => reply,
                    Err(_) => {
                        return Err(op_error(ErrorKind::Timeout, "the network driver stopped"));
                    }
                },
            };
            let now = Instant::now();
            match received {
                Some(reply) => {
                    let result = reply.result.map(|bytes| Response::decode_or_error(&bytes));
                    operation.handle_response(now, reply.tag, result);
                }
                None => operation.handle_timeout(now),
            }
        }
    }

    /// `setr KEY VALUE`: a replicated write by two-phase commit, all or nothing (see
    /// [`Setr`]). Never retries.
    pub fn setr(
        &mut self,
        key: &str,
        value: &str,
        hooks: SetrHooks,
    ) -> Result<SetrOutcome, OpError> {
        message::check_key(key)?;
        message::check_value(value)?;
        let outcome = self.setr_at(key, value, hooks);
        self.doubt_view(&outcome);
        outcome
    }

    /// [`Client::setr`] after the input checks: one attempt, never retried after an abort,
    /// but for `--wait`: a transaction a replica refused because the key is not settled
    /// there yet (kind `rebalancing`, aborted everywhere) is tried again, under a fresh
    /// transaction id, on a fresh view, within the deadline.
    fn setr_at(
        &mut self,
        key: &str,
        value: &str,
        hooks: SetrHooks,
    ) -> Result<SetrOutcome, OpError> {
        let mut rng = Rng::from_entropy();
        let (key, value) = (key.to_owned(), value.to_owned());
        let (deadline, timeout) = (self.deadline, self.timeout);
        let build = move |now: Instant, placement: &Placement| {
            let txid = TxId::random(&mut rng);
            Setr::new(now, &key, &value, placement, txid, deadline, timeout, hooks)
        };
        self.hooked = [
            hooks.pause_after_view,
            hooks.pause_before_commit,
            hooks.pause_after_primary_commit,
        ]
        .iter()
        .any(|pause| !pause.is_zero());
        let outcome = self.replicated(true, build).0;
        self.hooked = false;
        outcome
    }

    /// `getr KEY`: a replicated read. Tries the key's replicas in ring order until one has
    /// it; `not_found` only when every replica that answered said it does not hold it. With
    /// `--wait`, a read every replica refused because the view changed between the view step
    /// and the read is tried again on the new view (a read can safely run twice).
    pub fn getr(&mut self, key: &str) -> Result<GetrOutcome, OpError> {
        message::check_key(key)?;
        let owned = key.to_owned();
        let (deadline, timeout) = (self.deadline, self.timeout);
        let build = move |now: Instant, placement: &Placement| {
            Getr::new(now, &owned, placement, deadline, timeout)
        };
        let (outcome, operation) = self.replicated(true, build);
        if operation
            .as_ref()
            .and_then(Replicated::coordinator)
            .is_some_and(Getr::is_view_refused)
        {
            self.refused_view();
        }
        self.doubt_view(&outcome);
        outcome
    }

    /// `locate KEY`: the replicas of KEY in the current view, in ring order.
    pub fn locate(&mut self, key: &str) -> Result<(Epoch, Vec<Member>), OpError> {
        message::check_key(key)?;
        let view = self.query_servers()?.view;
        if view.members.is_empty() {
            return Err(op_error(
                ErrorKind::NoServers,
                "there are no servers in the view",
            ));
        }
        Ok((view.epoch, ring::replicas(&view, key)))
    }

    /// Accepts only `Done`.
    fn expect_done(&self, response: Response) -> Result<(), OpError> {
        match response {
            Response::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }
}

/// Probes `candidates` in parallel with `query_servers` and returns the view leader to use:
/// the first candidate (in order) that answers as a view leader, or the group's leader that
/// it names; `timeout` if none does before `deadline` (or within a second without one),
/// `unreachable` if the OS reported every one unreachable.
pub fn discover(
    handle: &net::Handle,
    candidates: &[SocketAddr],
    deadline: Option<Instant>,
) -> Result<SocketAddr, OpError> {
    probe(handle, candidates, deadline)
        .map(|found| found.leader.unwrap_or(found.member))
        .map_err(Failure::into_error)
}

/// What a discovery round found.
#[derive(Debug)]
struct Found {
    /// The candidate chosen: the first in order that answered as a view leader.
    member: SocketAddr,
    /// The group's leader, as its answer named it (`None`: a group of one, or no view yet).
    leader: Option<SocketAddr>,
    /// The group's members, as its answer listed them (empty: a group of one).
    group: Vec<SocketAddr>,
    /// The candidates that failed (no answer in time, unreachable, not a view leader, or
    /// unable to reach their group's leader).
    failed: Vec<SocketAddr>,
}

/// How one discovery probe ended.
#[derive(Clone, Debug)]
enum Probed {
    /// It answered as a view leader, naming the group's leader and members.
    ViewLeader(Option<SocketAddr>, Vec<SocketAddr>),
    /// A member answered that it cannot serve now (an error of kind `timeout` or
    /// `unreachable`: it cannot reach its group's leader, or is still joining), or nothing
    /// answered in time: it may answer later.
    Later,
    /// The OS reported it unreachable, or it answered as something else than a view leader.
    Gone,
}

/// Reads a probe's outcome.
fn probed(result: &Result<Vec<u8>, RequestError>) -> Probed {
    let body = match result {
        Ok(body) => body,
        Err(RequestError::Timeout { .. }) => return Probed::Later,
        Err(_) => return Probed::Gone,
    };
    match Response::decode(body) {
        Ok(Response::Servers { leader, group, .. }) => Probed::ViewLeader(leader, group),
        Ok(Response::Error(e)) if is_not_now(&e) => Probed::Later,
        Ok(other) if other.is_from_viewleader() => Probed::ViewLeader(None, Vec::new()),
        _ => Probed::Gone,
    }
}

/// True for an error answer from a view-leader member that may succeed if asked again a
/// little later or elsewhere: kind `timeout` or `unreachable` (it could not reach its
/// group's leader, e.g. during an election, or is not yet part of its group).
fn is_not_now(error: &OpError) -> bool {
    matches!(error.kind, ErrorKind::Timeout | ErrorKind::Unreachable)
}

/// Describes `candidates` for an error message: a range of consecutive ports as
/// `first..=last`, else the list.
fn describe(candidates: &[SocketAddr]) -> String {
    let consecutive = candidates
        .windows(2)
        .all(|w| w[0].ip() == w[1].ip() && u32::from(w[0].port()) + 1 == u32::from(w[1].port()));
    match candidates {
        [] => "no address".into(),
        [one] => one.to_string(),
        [first, .., last] if consecutive => format!("{first}..={last}"),
        all => all
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Probes `candidates` in parallel with `query_servers`, each probe bounded by `deadline`
/// (a second without one). The first candidate in order that answers as a view leader is
/// chosen once every earlier one has failed, or [`DISCOVERY_GRACE`] after it answered (an
/// earlier one may be paused). If none does: [`Failure::Later`] when some candidate may
/// answer later (it stayed silent, or could not reach its group's leader), else
/// [`Failure::Down`] (`unreachable` if the OS reported every one unreachable, else
/// `timeout`).
fn probe(
    handle: &net::Handle,
    candidates: &[SocketAddr],
    deadline: Option<Instant>,
) -> Result<Found, Failure> {
    let probe_deadline = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
    let body = Request::QueryServers
        .encode()
        .map_err(|e| Failure::Other(op_error(ErrorKind::BadInput, e.to_string())))?;
    let (tx, rx) = crossbeam_channel::unbounded();
    for (index, &addr) in candidates.iter().enumerate() {
        handle
            .start(addr, body.clone(), Some(probe_deadline), &tx, index as u64)
            .map_err(|e| Failure::Down(op_error(ErrorKind::Timeout, e.to_string())))?;
    }
    drop(tx);
    let mut answers: Vec<Option<Probed>> = vec![None; candidates.len()];
    let mut all_unreachable = true;
    // Why a member could not serve, for the error message.
    let mut not_now: Option<String> = None;
    // Set when a candidate first answered: until then earlier ones are waited for.
    let mut grace_until: Option<Instant> = None;
    let found = loop {
        // The first candidate that answered, and whether every earlier one has failed.
        let mut decided = true;
        let mut first = None;
        for (index, answer) in answers.iter().enumerate() {
            match answer {
                None => decided = false,
                Some(Probed::ViewLeader(..)) => {
                    first = Some(index);
                    break;
                }
                Some(_) => continue,
            }
        }
        let grace_over = grace_until.is_some_and(|t| Instant::now() >= t);
        if let Some(index) = first.filter(|_| decided || grace_over) {
            break Some(index);
        }
        let received = match grace_until {
            Some(until) => rx.recv_deadline(until).map_err(|e| e.is_timeout()),
            None => rx.recv().map_err(|_| false),
        };
        match received {
            Ok(reply) => {
                all_unreachable &= matches!(reply.result, Err(RequestError::Unreachable { .. }));
                let answer = probed(&reply.result);
                if let Some(&addr) = candidates.get(reply.tag as usize) {
                    debug!("probe of {addr}: {answer:?}");
                }
                if matches!(answer, Probed::ViewLeader(..)) && grace_until.is_none() {
                    grace_until = Some(Instant::now() + DISCOVERY_GRACE);
                }
                if let (Probed::Later, Ok(body)) = (&answer, &reply.result)
                    && let Ok(Response::Error(e)) = Response::decode(body)
                {
                    not_now = Some(format!("{}: {}", candidates[reply.tag as usize], e.message));
                }
                if let Some(slot) = answers.get_mut(reply.tag as usize) {
                    *slot = Some(answer);
                }
            }
            // The grace ended: the loop above takes the first that answered.
            Err(true) => {}
            // Every probe has its outcome.
            Err(false) => break first,
        }
    };
    let failed = candidates
        .iter()
        .zip(&answers)
        .filter(|(_, answer)| matches!(answer, Some(Probed::Later | Probed::Gone)))
        .map(|(&addr, _)| addr)
        .collect();
    if let Some(index) = found
        && let Some(Some(Probed::ViewLeader(leader, group))) = answers.get_mut(index)
    {
        return Ok(Found {
            member: candidates[index],
            leader: *leader,
            group: std::mem::take(group),
            failed,
        });
    }
    let mut message = format!("no view leader answers on {}", describe(candidates));
    if let Some(why) = not_now {
        message.push_str(&format!(" ({why})"));
    }
    if answers.iter().any(|a| matches!(a, Some(Probed::Later))) {
        return Err(Failure::Later(op_error(ErrorKind::Timeout, message)));
    }
    let kind = if all_unreachable && !candidates.is_empty() {
        ErrorKind::Unreachable
    } else {
        ErrorKind::Timeout
    };
    Err(Failure::Down(op_error(kind, message)))
}

/// A replicated operation run on the network driver's thread (a [`net::Job`]): it encodes the
/// operation's requests, decodes their answers, and hands the outcome and the finished
/// machine back on `done`.
struct OnDriver<O: Operation> {
    /// The operation, until it finishes.
    operation: Option<O>,
    /// Where the outcome and the machine go.
    done: crossbeam_channel::Sender<(Result<O::Output, OpError>, O)>,
}

impl<O: Operation> net::Job for OnDriver<O> {
    /// The operation's next request, encoded; one that does not encode is failed at once.
    fn poll_send(&mut self) -> Option<net::JobSend> {
        let operation = self.operation.as_mut()?;
        loop {
            let send = operation.poll_send()?;
            match replicated::encode(&send) {
                Ok(body) => {
                    return Some(net::JobSend {
                        dst: send.dst,
                        body,
                        deadline: send.deadline,
                        unacked_attempts: send.unacked_attempts,
                        token: send.token,
                    });
                }
                Err(error) => operation.handle_response(Instant::now(), send.token, Err(error)),
            }
        }
    }

    /// Decodes an answer for the operation.
    fn handle_response(&mut self, now: Instant, token: u64, result: Result<Vec<u8>, RequestError>) {
        if let Some(operation) = &mut self.operation {
            let result = result.map(|bytes| Response::decode_or_error(&bytes));
            operation.handle_response(now, token, result);
        }
    }

    /// Fires the operation's timer.
    fn handle_timeout(&mut self, now: Instant) {
        if let Some(operation) = &mut self.operation {
            operation.handle_timeout(now);
        }
    }

    /// The operation's timer.
    fn poll_timeout(&self) -> Option<Instant> {
        self.operation.as_ref().and_then(Operation::poll_timeout)
    }

    /// Hands the outcome back once there is one.
    fn is_done(&mut self) -> bool {
        let Some(outcome) = self.operation.as_mut().and_then(Operation::poll_outcome) else {
            return self.operation.is_none();
        };
        let operation = self.operation.take().expect("checked above");
        // The caller may have stopped waiting (it is gone): then nobody wants the outcome.
        let _ = self.done.send((outcome, operation));
        true
    }
}

#[cfg(test)]
mod tests;
