//! The command-line client's operations, one method per command.
//!
//! A [`Client`] sends requests through a [`net::Handle`] and turns answers and transport
//! failures into values or [`OpError`]s with the contract's error kinds. One deadline bounds
//! the whole command (`--timeout-ms`): every request it sends carries what is left of it.

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

/// A client bound to one network driver and one command deadline.
#[derive(Debug)]
pub struct Client {
    /// The network driver.
    handle: net::Handle,
    /// The view leader: given, or found by probing `candidates`.
    viewleader: Option<SocketAddr>,
    /// Where to look for a view leader when none is given.
    candidates: Vec<SocketAddr>,
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

impl Client {
    /// Creates a client. `viewleader` `None` means: probe `candidates` in order when the view
    /// leader is first needed. `timeout` `None` means no bound on the command.
    pub fn new(
        handle: net::Handle,
        viewleader: Option<SocketAddr>,
        candidates: Vec<SocketAddr>,
        server: SocketAddr,
        timeout: Option<Duration>,
    ) -> Client {
        let deadline = timeout.map(|t| Instant::now() + t);
        Client {
            handle,
            viewleader,
            candidates,
            server,
            deadline,
            timeout,
            wait: false,
            cache: None,
            view_used: None,
            epoch_floor: Epoch(0),
        }
    }

    /// Keeps the view in `cache` across operations (see [`ViewCache`]).
    pub fn with_view_cache(mut self, cache: ViewCache) -> Client {
        self.cache = Some(cache);
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
        let body = request
            .encode()
            .map_err(|e| op_error(ErrorKind::BadInput, e.to_string()))?;
        let answer = self
            .handle
            .call(dst, body, deadline)
            .map_err(|e| self.timed(transport_error(e)))?;
        match Response::decode(&answer) {
            Ok(Response::Error(e)) => Err(e),
            Ok(response) => Ok(response),
            Err(e) => Err(op_error(
                ErrorKind::BadInput,
                format!("undecodable answer from {dst}: {e}"),
            )),
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

    /// The view leader's address, probing the candidates the first time if none was given.
    pub fn viewleader(&mut self) -> Result<SocketAddr, OpError> {
        if let Some(addr) = self.viewleader {
            return Ok(addr);
        }
        let found = discover(&self.handle, &self.candidates, self.deadline)?;
        debug!("found the view leader at {found}");
        self.viewleader = Some(found);
        Ok(found)
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
        let viewleader = self.viewleader()?;
        match self.call(viewleader, &Request::QueryServers)? {
            Response::Servers {
                view,
                rebalancing,
                pending,
                ..
            } => Ok(ServersInfo {
                view,
                rebalancing,
                pending,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// `lock_get LOCK REQUESTER`: waits until granted, renewing the request. Gives up at the
    /// deadline or when `cancel` fires (Ctrl-C), withdrawing the request first.
    pub fn lock_get(
        &mut self,
        lock: &str,
        requester: &str,
        cancel: &Receiver<()>,
    ) -> Result<(), OpError> {
        message::check_lock_name("lock name", lock)?;
        message::check_lock_name("requester", requester)?;
        let viewleader = self.viewleader()?;
        let reserve = self
            .timeout
            .map_or(WITHDRAW_RESERVE, |t| WITHDRAW_RESERVE.min(t / 4));
        let give_up_at = self.deadline.map(|d| d - reserve);
        let request = Request::LockGet {
            lock: lock.to_owned(),
            requester: requester.to_owned(),
        };
        let mut holder = String::from("another requester");
        loop {
            let renewal_bound = Instant::now() + LOCK_RENEW_BOUND;
            let bound = give_up_at.map_or(renewal_bound, |limit| limit.min(renewal_bound));
            let mut wait = LOCK_RENEW_INTERVAL;
            match self.call_until(viewleader, &request, Some(bound)) {
                Ok(Response::LockGranted) => return Ok(()),
                Ok(Response::LockWaiting {
                    holder: current,
                    position,
                }) => {
                    debug!("waiting for {lock} held by {current} (position {position})");
                    holder = current;
                }
                Ok(other) => return Err(unexpected(&other)),
                // A slow renewal (loss) is simply replaced by a fresh one below.
                Err(e) if e.kind == ErrorKind::Timeout => {
                    debug!("a renewal of {lock} went unanswered; renewing again");
                    wait = Duration::ZERO;
                }
                Err(e) => return Err(e),
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
                self.withdraw(viewleader, lock, requester);
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

    /// Withdraws a waiting lock request (releasing the lock if a grant raced us); best
    /// effort, within what is left of the deadline (or a short bound without one).
    fn withdraw(&self, viewleader: SocketAddr, lock: &str, requester: &str) {
        let deadline = self
            .deadline
            .unwrap_or_else(|| Instant::now() + WITHDRAW_RESERVE);
        let request = Request::LockWithdraw {
            lock: lock.to_owned(),
            requester: requester.to_owned(),
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

    /// `lock_release LOCK REQUESTER`.
    pub fn lock_release(&mut self, lock: &str, requester: &str) -> Result<(), OpError> {
        message::check_lock_name("lock name", lock)?;
        message::check_lock_name("requester", requester)?;
        let viewleader = self.viewleader()?;
        let request = Request::LockRelease {
            lock: lock.to_owned(),
            requester: requester.to_owned(),
        };
        match self.call(viewleader, &request)? {
            Response::LockReleased => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Runs the replicated operation whose coordinator `build` makes: the view step (from
    /// the view cache when a long-lived caller keeps one, else from the view leader) and the
    /// coordinator, pumped on the network driver by [`Client::run`]; see [`Replicated`].
    /// `retry`: a `rebalancing` refusal is retried on a fresh view with `--wait` (reads).
    /// Returns the outcome and the finished machine (for what it ran on).
    fn replicated<O: Operation>(
        &mut self,
        retry: bool,
        build: impl FnMut(Instant, &Placement) -> O + 'static,
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
        let outcome = self.run(&mut operation);
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

    /// Runs a replicated `operation` on the network driver until it finishes: hands its
    /// requests to the driver, feeds it their outcomes and its timers, and returns its result.
    fn run<O: Operation>(&self, operation: &mut O) -> Result<O::Output, OpError> {
        let (tx, rx) = crossbeam_channel::unbounded::<Reply>();
        loop {
            while let Some(send) = operation.poll_send() {
                let started = replicated::encode(&send).and_then(|body| {
                    self.handle
                        .start(send.dst, body, send.deadline, &tx, send.token)
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
            // A timer is a test hook's pause: sleep through it (tests tell a client sitting in
            // its hook by the sleep); answers that come meanwhile wait in the channel.
            let received = match operation.poll_timeout() {
                Some(at) => {
                    std::thread::sleep(at.saturating_duration_since(Instant::now()));
                    None
                }
                None => match net::recv_spinning(&rx) {
                    Ok(reply) => Some(reply),
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

    /// [`Client::setr`] after the input checks: one attempt, never retried.
    fn setr_at(
        &mut self,
        key: &str,
        value: &str,
        hooks: SetrHooks,
    ) -> Result<SetrOutcome, OpError> {
        let txid = TxId::random(&mut Rng::from_entropy());
        let (key, value) = (key.to_owned(), value.to_owned());
        let (deadline, timeout) = (self.deadline, self.timeout);
        let build = move |now: Instant, placement: &Placement| {
            Setr::new(now, &key, &value, placement, txid, deadline, timeout, hooks)
        };
        self.replicated(false, build).0
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

/// Probes `candidates` in parallel with `query_servers` and returns the first (in order)
/// that answers as a view leader; `timeout` if none does before `deadline` (or within a
/// second without one).
pub fn discover(
    handle: &net::Handle,
    candidates: &[SocketAddr],
    deadline: Option<Instant>,
) -> Result<SocketAddr, OpError> {
    let probe_deadline = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
    let body = Request::QueryServers
        .encode()
        .map_err(|e| op_error(ErrorKind::BadInput, e.to_string()))?;
    let (tx, rx) = crossbeam_channel::unbounded();
    for (index, &addr) in candidates.iter().enumerate() {
        handle
            .start(addr, body.clone(), Some(probe_deadline), &tx, index as u64)
            .map_err(|e| op_error(ErrorKind::Timeout, e.to_string()))?;
    }
    drop(tx);
    let mut answers: Vec<Option<bool>> = vec![None; candidates.len()];
    let mut all_unreachable = true;
    while let Ok(reply) = rx.recv() {
        all_unreachable &= matches!(reply.result, Err(RequestError::Unreachable { .. }));
        let ok = reply
            .result
            .as_deref()
            .is_ok_and(|body| Response::decode(body).is_ok_and(|r| r.is_from_viewleader()));
        if let Some(slot) = answers.get_mut(reply.tag as usize) {
            *slot = Some(ok);
        }
        for (index, answer) in answers.iter().enumerate() {
            match answer {
                None => break,
                Some(false) => continue,
                Some(true) => return Ok(candidates[index]),
            }
        }
    }
    let first = candidates
        .first()
        .map(ToString::to_string)
        .unwrap_or_default();
    let last = candidates
        .last()
        .map(ToString::to_string)
        .unwrap_or_default();
    let kind = if all_unreachable && !candidates.is_empty() {
        ErrorKind::Unreachable
    } else {
        ErrorKind::Timeout
    };
    Err(op_error(
        kind,
        format!("no view leader answers on {first}..={last}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::view::{ServerId, View};

    /// A placement of one server at `epoch`.
    fn placement(epoch: u64) -> Placement {
        Placement::new(View {
            epoch: Epoch(epoch),
            members: vec![Member {
                id: ServerId(1),
                addr: "127.0.0.1:1".parse().unwrap(),
            }],
            replicas: 3,
            vnodes: 4,
        })
    }

    /// The cache never goes back to an older view, drops only the epoch that was doubted,
    /// and serves a view only within its lease.
    #[test]
    fn the_view_cache_keeps_the_newest_view_within_its_lease() {
        let cache = ViewCache::default();
        let t0 = Instant::now();
        cache.put(placement(5), t0);
        cache.put(placement(4), t0); // a slow worker's older view
        assert_eq!(cache.get(t0).unwrap().view.epoch, Epoch(5));
        cache.invalidate(Epoch(4)); // a failure with the older view
        assert_eq!(cache.get(t0).unwrap().view.epoch, Epoch(5));
        cache.invalidate(Epoch(5));
        assert!(cache.get(t0).is_none());
        cache.put(placement(6), t0);
        assert!(
            cache.get(t0 + VIEW_LEASE).is_none(),
            "expired with its lease"
        );
        assert_eq!(placement(6).replicas("k").len(), 1);
    }
}
