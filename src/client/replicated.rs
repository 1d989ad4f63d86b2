//! A replicated operation from the first question to the view leader to its outcome, as a
//! sans-IO state machine: the *view step* (ask for the view, refuse one older than the
//! client's floor, wait out rebalancing with `--wait`), then the coordinator
//! ([`Setr`](crate::txn::coordinator::Setr) or [`Getr`](crate::txn::coordinator::Getr)) on
//! that view, and for a read refused by every replica with `--wait`, the view step again.
//!
//! The command-line client ([`crate::client::Client`]) pumps it on a real network and the
//! simulator in virtual time, so both run the same client code. It is itself an
//! [`Operation`], so whoever drives a coordinator drives this the same way.
//!
//! The view leader may be a replicated group. The view step asks one member; a `Servers`
//! answer naming the group's leader sends the following view requests there. Given other
//! members to fall back on ([`Replicated::with_fallbacks`]), a view request that fails with
//! `timeout` or `unreachable` (no answer: the member died, paused or is cut off; or a member
//! answering so: it cannot reach its group's leader, as during an election) is asked of the
//! next one, each but the last bounded so that one silent member cannot use up the
//! deadline; a view step that ends on such an answer says so ([`Replicated::is_not_now`]),
//! so its caller may ask again once the election is over. Only the view step fails over:
//! once a coordinator runs, its outcome stands.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::placement::view::Epoch;
use crate::reliable::RequestError;
use crate::txn::coordinator::{Operation, Send, transport_error, unexpected};
use crate::txn::routing::{Placement, ServersInfo};
use crate::wire::message::{ErrorKind, OpError, Request, Response};

/// How often a `--wait` operation asks again whether rebalancing has ended.
pub const REBALANCING_POLL: Duration = Duration::from_millis(50);

/// Bits of a token that belong to the coordinator of one attempt; the attempt number sits
/// above them, so an answer to an earlier attempt is told apart and ignored.
const ATTEMPT_SHIFT: u32 = 20;

/// The coordinator-side token of the view request (coordinators number theirs from 1).
const VIEW_TOKEN: u64 = 0;

/// Builds the coordinator for one attempt on a view, at an instant.
type Build<O> = Box<dyn FnMut(Instant, &Placement) -> O + std::marker::Send>;

/// Where a [`Replicated`] operation stands.
enum Stage<O> {
    /// The view request is out.
    Asking,
    /// With `--wait`: asking again at this instant (the view was rebalancing).
    Polling(Instant),
    /// The coordinator of the current attempt runs.
    Running(O),
}

/// A replicated operation: the view step, then the coordinator `O` on that view.
pub struct Replicated<O: Operation> {
    /// The view-leader member asked for the view: the one given, then the group's leader
    /// once an answer names it, or the next fallback once a member failed.
    viewleader: SocketAddr,
    /// Other members of the view-leader group to ask, in order, when the one asked fails
    /// with `timeout` or `unreachable`, unanswered or answered so (empty: such a failure
    /// ends the operation).
    fallbacks: VecDeque<SocketAddr>,
    /// While fallbacks are left, the longest one view request may take before the next
    /// member is asked (`None`: each request may take until the deadline).
    view_bound: Option<Duration>,
    /// The members whose view request failed, in order (the caller tries them last).
    failed: Vec<SocketAddr>,
    /// True if the last view request was answered with an error of kind `timeout` or
    /// `unreachable`: the member could not reach its group's leader (an election), so
    /// asking again shortly may succeed.
    not_now: bool,
    /// When the whole operation must have finished (`None`: no bound).
    deadline: Option<Instant>,
    /// The operation's time bound, for error messages.
    timeout: Option<Duration>,
    /// `--wait`: wait for rebalancing to end instead of failing with `rebalancing`.
    wait: bool,
    /// With `wait`: a `rebalancing` outcome of the coordinator is retried on a fresh view
    /// (only for operations that can safely run twice: reads).
    retry: bool,
    /// The newest epoch the client operated on; raised to each view used.
    floor: Epoch,
    /// Builds the coordinator once a view is in hand.
    build: Build<O>,
    /// Where the operation stands.
    stage: Stage<O>,
    /// The current attempt (a fresh view step and coordinator each).
    attempt: u64,
    /// The view request, waiting for [`Operation::poll_send`].
    send: Option<Send>,
    /// The result, once finished (handed out once).
    outcome: Option<Result<O::Output, OpError>>,
    /// True once finished.
    finished: bool,
    /// Epochs of the views received, for the caller's records ([`Replicated::take_views`]).
    views: Vec<Epoch>,
    /// The view the current attempt's coordinator runs on.
    placement: Option<Placement>,
}

impl<O: Operation> Replicated<O> {
    /// Starts an operation that asks `viewleader` for the view and then runs the
    /// coordinator `build` makes on it. `floor` is the newest epoch the client used; `wait`
    /// is `--wait`; `retry` lets a `rebalancing` outcome be retried on a fresh view (reads, and writes refused before any commit).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        viewleader: SocketAddr,
        deadline: Option<Instant>,
        timeout: Option<Duration>,
        wait: bool,
        retry: bool,
        floor: Epoch,
        build: impl FnMut(Instant, &Placement) -> O + std::marker::Send + 'static,
    ) -> Replicated<O> {
        let mut operation = Replicated {
            viewleader,
            fallbacks: VecDeque::new(),
            view_bound: None,
            failed: Vec::new(),
            not_now: false,
            deadline,
            timeout,
            wait,
            retry,
            floor,
            build: Box::new(build),
            stage: Stage::Asking,
            attempt: 0,
            send: None,
            outcome: None,
            finished: false,
            views: Vec::new(),
            placement: None,
        };
        operation.ask(None);
        operation
    }

    /// Lets the view step fall back on the other view-leader members `fallbacks` (in order)
    /// when the member asked fails with `timeout` or `unreachable`; while some are left, a
    /// view request gives up after `bound` (counted from `now` for the request already
    /// queued). Returns the operation.
    pub fn with_fallbacks(
        mut self,
        now: Instant,
        fallbacks: Vec<SocketAddr>,
        bound: Duration,
    ) -> Replicated<O> {
        self.fallbacks = fallbacks
            .into_iter()
            .filter(|&a| a != self.viewleader)
            .collect();
        self.view_bound = Some(bound);
        let deadline = self.view_deadline(Some(now));
        if let (Stage::Asking, Some(send)) = (&self.stage, &mut self.send) {
            send.deadline = deadline;
        }
        self
    }

    /// The view-leader member the view step asks now (the caller keeps it for its next
    /// view-leader requests: it is the group's leader if an answer named one).
    pub fn viewleader(&self) -> SocketAddr {
        self.viewleader
    }

    /// The view-leader members whose view request failed with `timeout` or `unreachable`
    /// (no answer, or an answer saying so), in order.
    pub fn failed_viewleaders(&self) -> &[SocketAddr] {
        &self.failed
    }

    /// True if the view step ended on a member's answer that it cannot serve now (an error
    /// of kind `timeout` or `unreachable`: it could not reach its group's leader), with no
    /// other member left to ask: the caller may ask again a little later.
    pub fn is_not_now(&self) -> bool {
        self.not_now
    }

    /// Starts the operation on `placement` (a view the caller kept, e.g. a
    /// [`ViewCache`](crate::client::ViewCache) entry) without asking the view leader.
    #[allow(clippy::too_many_arguments)]
    pub fn on_placement(
        now: Instant,
        placement: &Placement,
        viewleader: SocketAddr,
        deadline: Option<Instant>,
        timeout: Option<Duration>,
        wait: bool,
        retry: bool,
        floor: Epoch,
        build: impl FnMut(Instant, &Placement) -> O + std::marker::Send + 'static,
    ) -> Replicated<O> {
        let mut operation = Replicated {
            viewleader,
            fallbacks: VecDeque::new(),
            view_bound: None,
            failed: Vec::new(),
            not_now: false,
            deadline,
            timeout,
            wait,
            retry,
            floor: floor.max(placement.view.epoch),
            build: Box::new(build),
            stage: Stage::Asking,
            attempt: 0,
            send: None,
            outcome: None,
            finished: false,
            views: Vec::new(),
            placement: None,
        };
        operation.stage = Stage::Running((operation.build)(now, placement));
        operation.placement = Some(placement.clone());
        operation.collect(now);
        operation
    }

    /// The newest epoch operated on (the client keeps it as its floor for what follows).
    pub fn floor(&self) -> Epoch {
        self.floor
    }

    /// How many times the view leader was asked for the view (0 when the operation started
    /// on a kept view): more than one when `--wait` polled a rebalancing view or a refused
    /// read was retried.
    pub fn attempts(&self) -> u64 {
        self.attempt
    }

    /// The coordinator of the current attempt, once the view step has given it a view.
    pub fn coordinator(&self) -> Option<&O> {
        match &self.stage {
            Stage::Running(op) => Some(op),
            _ => None,
        }
    }

    /// The view the current attempt's coordinator runs on, once the view step gave one.
    pub fn placement(&self) -> Option<&Placement> {
        self.placement.as_ref()
    }

    /// The epochs of the views received since the last call, oldest first.
    pub fn take_views(&mut self) -> Vec<Epoch> {
        std::mem::take(&mut self.views)
    }

    /// Queues the view request of a fresh attempt at `now` (`None` when it is not known: the
    /// request may then take until the deadline).
    fn ask(&mut self, now: Option<Instant>) {
        self.attempt += 1;
        self.stage = Stage::Asking;
        self.send = Some(Send {
            token: self.token(VIEW_TOKEN),
            dst: self.viewleader,
            request: Request::QueryServers,
            deadline: self.view_deadline(now),
            unacked_attempts: None,
        });
    }

    /// The deadline of a view request sent at `now`: the operation's, or with fallbacks
    /// left, at most the view bound after `now`.
    fn view_deadline(&self, now: Option<Instant>) -> Option<Instant> {
        match (now, self.view_bound) {
            (Some(now), Some(bound)) if !self.fallbacks.is_empty() => {
                let bounded = now + bound;
                Some(self.deadline.map_or(bounded, |d| d.min(bounded)))
            }
            _ => self.deadline,
        }
    }

    /// The member asked failed with `error` at `now` (no answer, or an error answer): if
    /// it is of kind `timeout` or `unreachable`, asks the next fallback and returns true;
    /// returns false if it is another kind, none is left or the deadline has passed.
    fn fall_back(&mut self, now: Instant, error: &OpError) -> bool {
        if !matches!(error.kind, ErrorKind::Timeout | ErrorKind::Unreachable)
            || self.deadline.is_some_and(|d| now >= d)
        {
            return false;
        }
        let Some(next) = self.fallbacks.pop_front() else {
            return false;
        };
        log::debug!(
            "view leader {} failed ({}); asking {next}",
            self.viewleader,
            error.message
        );
        self.failed.push(self.viewleader);
        self.viewleader = next;
        self.ask(Some(now));
        true
    }

    /// The token of the current attempt for the coordinator's `token`.
    fn token(&self, token: u64) -> u64 {
        debug_assert!(
            token < 1 << ATTEMPT_SHIFT,
            "coordinator token {token} too large"
        );
        (self.attempt << ATTEMPT_SHIFT) | token
    }

    /// Ends the operation with `outcome`.
    fn finish(&mut self, outcome: Result<O::Output, OpError>) {
        self.outcome = Some(outcome);
        self.finished = true;
    }

    /// Adds the operation's time bound to a timeout error's message.
    fn timed(&self, mut error: OpError) -> OpError {
        if error.kind == ErrorKind::Timeout
            && let Some(t) = self.timeout
        {
            error.message = format!("{} within {} ms", error.message, t.as_millis());
        }
        error
    }

    /// With `--wait`, waits `REBALANCING_POLL` and asks again, or fails with `timeout` if
    /// that would pass the deadline; `waiting_for` says what was still not ready.
    fn poll_again(&mut self, now: Instant, waiting_for: String) {
        if self.deadline.is_some_and(|d| now + REBALANCING_POLL >= d) {
            let error = self.timed(OpError {
                kind: ErrorKind::Timeout,
                message: format!("{waiting_for} at the deadline"),
                cycle: Vec::new(),
            });
            return self.finish(Err(error));
        }
        self.stage = Stage::Polling(now + REBALANCING_POLL);
    }

    /// The view leader's answer (or why none came): start the coordinator on the view, wait
    /// (with `--wait`) while it rebalances, or fail.
    fn on_view(&mut self, now: Instant, result: Result<Response, RequestError>) {
        self.not_now = false;
        let info = match result {
            Ok(Response::Servers {
                view,
                rebalancing,
                pending,
                leader,
                ..
            }) => {
                // The group's leader answers the following view requests (a poll, a retry).
                if let Some(leader) = leader.filter(|l| !self.failed.contains(l)) {
                    self.viewleader = leader;
                }
                self.views.push(view.epoch);
                ServersInfo {
                    view,
                    rebalancing,
                    pending,
                }
            }
            // A view leader with no view to show yet (just started, or gathering the
            // servers that came back) answers `rebalancing`, like a view that rebalances.
            Ok(Response::Error(e)) if self.wait && e.kind == ErrorKind::Rebalancing => {
                return self.poll_again(
                    now,
                    format!("the view leader still had no view ({})", e.message),
                );
            }
            // A member that cannot reach its group's leader (an election under way): another
            // member, if one is left; else the caller may ask again shortly.
            Ok(Response::Error(e))
                if matches!(e.kind, ErrorKind::Timeout | ErrorKind::Unreachable) =>
            {
                if self.fall_back(now, &e) {
                    return;
                }
                self.not_now = true;
                return self.finish(Err(e));
            }
            Ok(Response::Error(e)) => return self.finish(Err(e)),
            Ok(other) => return self.finish(Err(unexpected(&other))),
            Err(e) => {
                let error = self.timed(transport_error(e));
                if self.fall_back(now, &error) {
                    return;
                }
                return self.finish(Err(error));
            }
        };
        // Never operate on a view older than one already used.
        if let Err(e) = Placement::check_floor(&info, self.floor) {
            if self.wait {
                return self.poll_again(now, e.message);
            }
            return self.finish(Err(e));
        }
        if self.wait && info.rebalancing && info.view.members.is_empty() {
            return self.poll_again(
                now,
                format!("epoch {} was still rebalancing", info.view.epoch),
            );
        }
        match Placement::operable(info) {
            Ok(placement) => {
                self.floor = placement.view.epoch;
                self.stage = Stage::Running((self.build)(now, &placement));
                self.placement = Some(placement);
                self.collect(now);
            }
            Err(e) => self.finish(Err(e)),
        }
    }
}

impl<O: Operation> Operation for Replicated<O> {
    type Output = O::Output;

    /// The view request, or the coordinator's next request (tokens carry the attempt).
    fn poll_send(&mut self) -> Option<Send> {
        if let Some(send) = self.send.take() {
            return Some(send);
        }
        let attempt = self.attempt;
        match &mut self.stage {
            Stage::Running(op) => op.poll_send().map(|mut send| {
                debug_assert!(send.token != VIEW_TOKEN && send.token < 1 << ATTEMPT_SHIFT);
                send.token |= attempt << ATTEMPT_SHIFT;
                send
            }),
            _ => None,
        }
    }

    /// Routes an answer to the view step or the coordinator of its attempt; answers to an
    /// earlier attempt are dropped.
    fn handle_response(
        &mut self,
        now: Instant,
        token: u64,
        result: Result<Response, RequestError>,
    ) {
        if self.finished || token >> ATTEMPT_SHIFT != self.attempt {
            return;
        }
        let token = token & ((1 << ATTEMPT_SHIFT) - 1);
        match &mut self.stage {
            Stage::Asking if token == VIEW_TOKEN => self.on_view(now, result),
            Stage::Running(op) if token != VIEW_TOKEN => op.handle_response(now, token, result),
            _ => {}
        }
        self.collect(now);
    }

    /// Asks again after a rebalancing poll, or passes the coordinator its timer.
    fn handle_timeout(&mut self, now: Instant) {
        match &mut self.stage {
            Stage::Polling(at) if now >= *at => self.ask(Some(now)),
            Stage::Running(op) => op.handle_timeout(now),
            _ => {}
        }
        self.collect(now);
    }

    /// The poll instant, or the coordinator's timer.
    fn poll_timeout(&self) -> Option<Instant> {
        if self.finished {
            return None;
        }
        match &self.stage {
            Stage::Polling(at) => Some(*at),
            Stage::Running(op) => op.poll_timeout(),
            Stage::Asking => None,
        }
    }

    /// The outcome, once there is one (handed out once).
    fn poll_outcome(&mut self) -> Option<Result<O::Output, OpError>> {
        self.outcome.take()
    }

    /// The coordinator's say while it runs (a rebalancing poll is slept through).
    fn listens_while_waiting(&self) -> bool {
        matches!(&self.stage, Stage::Running(op) if op.listens_while_waiting())
    }
}

/// Encodes the body of `send` for the reliable layer; a request too large to encode is
/// refused as the reliable layer refuses one too large to send (what the driver of any
/// [`Operation`] hands back as its outcome).
pub fn encode(send: &Send) -> Result<Vec<u8>, RequestError> {
    send.request.encode().map_err(|e| {
        log::debug!("cannot encode a {} request: {e}", send.request.name());
        let limit = crate::wire::codec::MAX_MESSAGE;
        RequestError::TooLarge {
            size: limit + 1,
            limit,
        }
    })
}

impl<O: Operation> Replicated<O> {
    /// Takes the coordinator's outcome at `now` if it has one. With `retry` and `--wait`, a
    /// read refused as `rebalancing` (the view changed between the view step and the read)
    /// starts a fresh attempt instead, unless the deadline leaves no room for one.
    fn collect(&mut self, now: Instant) {
        let Stage::Running(op) = &mut self.stage else {
            return;
        };
        let Some(outcome) = op.poll_outcome() else {
            return;
        };
        match outcome {
            Err(e)
                if e.kind == ErrorKind::Rebalancing
                    && self.wait
                    && self.retry
                    && self.deadline.is_none_or(|d| now + REBALANCING_POLL < d) =>
            {
                log::debug!("{}; asking for the view again", e.message);
                self.ask(Some(now));
            }
            outcome => self.finish(outcome),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::view::{Member, ServerId, View};

    /// The view leader's address in these tests.
    const VL: &str = "127.0.0.1:39000";

    /// A stand-in coordinator: sends `Get` to the key's primary and finishes with the answer
    /// (a value, or the error it carried), so the tests see exactly what the view step did.
    struct Probe {
        /// The request, until sent.
        send: Option<Send>,
        /// The outcome, once answered.
        outcome: Option<Result<String, OpError>>,
        /// The epoch of the view it was built on.
        epoch: Epoch,
    }

    impl Operation for Probe {
        type Output = String;

        /// The one request.
        fn poll_send(&mut self) -> Option<Send> {
            self.send.take()
        }

        /// Finishes with the answer.
        fn handle_response(&mut self, _: Instant, _: u64, result: Result<Response, RequestError>) {
            self.outcome = Some(match result {
                Ok(Response::Value { value }) => Ok(value),
                Ok(Response::Error(e)) => Err(e),
                Ok(other) => Err(unexpected(&other)),
                Err(e) => Err(transport_error(e)),
            });
        }

        /// No timers.
        fn handle_timeout(&mut self, _: Instant) {}

        /// No timers.
        fn poll_timeout(&self) -> Option<Instant> {
            None
        }

        /// The answer, once.
        fn poll_outcome(&mut self) -> Option<Result<String, OpError>> {
            self.outcome.take()
        }
    }

    /// Builds a [`Probe`] on a view.
    fn probe(_: Instant, placement: &Placement) -> Probe {
        Probe {
            send: Some(Send {
                token: 1,
                dst: placement.replicas("k")[0].addr,
                request: Request::Get { key: "k".into() },
                deadline: None,
                unacked_attempts: None,
            }),
            outcome: None,
            epoch: placement.view.epoch,
        }
    }

    /// The view leader's answer: a one-server view at `epoch`.
    fn servers(epoch: u64, rebalancing: bool) -> Result<Response, RequestError> {
        Ok(Response::Servers {
            view: View {
                epoch: Epoch(epoch),
                members: vec![Member {
                    id: ServerId(7),
                    addr: "127.0.0.1:5000".parse().unwrap(),
                }],
                replicas: 3,
                vnodes: 4,
            },
            rebalancing,
            pending: Vec::new(),
            group: Vec::new(),
            leader: None,
        })
    }

    /// The view leader's answer while it gathers the servers that came back: an empty view
    /// at `epoch`, rebalancing.
    fn gathering(epoch: u64) -> Result<Response, RequestError> {
        Ok(Response::Servers {
            view: View {
                epoch: Epoch(epoch),
                members: Vec::new(),
                replicas: 3,
                vnodes: 4,
            },
            rebalancing: true,
            pending: Vec::new(),
            group: Vec::new(),
            leader: None,
        })
    }

    /// Issue 17: a view that rebalances is used at once (each replica decides per key).
    #[test]
    fn a_rebalancing_view_with_servers_is_used() {
        let t0 = Instant::now();
        for wait in [false, true] {
            let mut op = operation(t0, wait, true, 0);
            let ask = op.poll_send().unwrap();
            op.handle_response(t0, ask.token, servers(5, true));
            assert_eq!(op.coordinator().map(|p| p.epoch), Some(Epoch(5)));
        }
    }

    /// A refusal of kind `kind`.
    fn refusal(kind: ErrorKind) -> Result<Response, RequestError> {
        Ok(Response::Error(OpError {
            kind,
            message: "refused".into(),
            cycle: Vec::new(),
        }))
    }

    /// An operation with a 1 s deadline from `t0`.
    fn operation(t0: Instant, wait: bool, retry: bool, floor: u64) -> Replicated<Probe> {
        Replicated::new(
            VL.parse().unwrap(),
            Some(t0 + Duration::from_secs(1)),
            Some(Duration::from_secs(1)),
            wait,
            retry,
            Epoch(floor),
            probe,
        )
    }

    /// The view request goes to the view leader; the coordinator then runs on the view it
    /// answered, its tokens carry the attempt, and the floor rises to the view's epoch.
    #[test]
    fn the_view_step_then_the_coordinator() {
        let t0 = Instant::now();
        let mut op = operation(t0, false, false, 2);
        let ask = op.poll_send().expect("a view request");
        assert_eq!(ask.dst, VL.parse().unwrap());
        assert!(matches!(ask.request, Request::QueryServers));
        assert!(op.poll_send().is_none());
        op.handle_response(t0, ask.token, servers(5, false));
        assert_eq!(op.take_views(), vec![Epoch(5)]);
        assert_eq!(op.floor(), Epoch(5));
        assert_eq!(op.coordinator().map(|p| p.epoch), Some(Epoch(5)));
        let get = op.poll_send().expect("the coordinator's request");
        assert_ne!(get.token, ask.token);
        assert_eq!(get.token >> ATTEMPT_SHIFT, 1);
        op.handle_response(t0, get.token, Ok(Response::Value { value: "v".into() }));
        assert_eq!(op.poll_outcome(), Some(Ok("v".into())));
        assert_eq!(op.poll_outcome(), None, "handed out once");
    }

    /// Without `--wait`, a rebalancing view, an empty one, a view older than the floor and a
    /// view leader's refusal each end the operation with the contract's kind.
    #[test]
    fn without_wait_a_view_that_cannot_be_used_fails() {
        let t0 = Instant::now();
        let cases = [
            (gathering(5), 0, ErrorKind::Rebalancing),
            (servers(3, false), 4, ErrorKind::Rebalancing),
            (refusal(ErrorKind::Rebalancing), 0, ErrorKind::Rebalancing),
            (
                Err(RequestError::Timeout {
                    peer: VL.parse().unwrap(),
                }),
                0,
                ErrorKind::Timeout,
            ),
            (
                Ok(Response::Servers {
                    view: View {
                        epoch: Epoch(1),
                        members: Vec::new(),
                        replicas: 3,
                        vnodes: 4,
                    },
                    rebalancing: false,
                    pending: Vec::new(),
                    group: Vec::new(),
                    leader: None,
                }),
                0,
                ErrorKind::NoServers,
            ),
        ];
        for (answer, floor, kind) in cases {
            let mut op = operation(t0, false, true, floor);
            let ask = op.poll_send().unwrap();
            op.handle_response(t0, ask.token, answer);
            let outcome = op.poll_outcome().expect("finished");
            assert_eq!(outcome.unwrap_err().kind, kind);
            assert!(op.poll_send().is_none() && op.poll_timeout().is_none());
        }
    }

    /// With `--wait`, a rebalancing view is asked for again every poll interval until one is
    /// usable; at the deadline the operation fails with `timeout`, naming the bound.
    #[test]
    fn with_wait_rebalancing_is_waited_out_within_the_deadline() {
        let t0 = Instant::now();
        let mut op = operation(t0, true, false, 0);
        let ask = op.poll_send().unwrap();
        op.handle_response(t0, ask.token, gathering(5));
        assert_eq!(op.poll_timeout(), Some(t0 + REBALANCING_POLL));
        assert!(op.poll_send().is_none(), "nothing before the poll");
        op.handle_timeout(t0 + REBALANCING_POLL);
        let again = op.poll_send().expect("asked again");
        assert_ne!(again.token, ask.token, "a fresh attempt");
        op.handle_response(t0, ask.token, servers(6, false));
        assert!(
            op.coordinator().is_none(),
            "the old attempt's answer is dropped"
        );
        op.handle_response(t0 + REBALANCING_POLL, again.token, servers(6, false));
        assert_eq!(op.coordinator().map(|p| p.epoch), Some(Epoch(6)));

        let mut op = operation(t0, true, false, 0);
        let mut now = t0;
        loop {
            if let Some(send) = op.poll_send() {
                op.handle_response(now, send.token, gathering(5));
            }
            if let Some(outcome) = op.poll_outcome() {
                let e = outcome.unwrap_err();
                assert_eq!(e.kind, ErrorKind::Timeout);
                assert!(
                    e.message
                        .contains("still rebalancing at the deadline within 1000 ms")
                );
                assert!(now <= t0 + Duration::from_secs(1));
                break;
            }
            now = op.poll_timeout().expect("polling");
            op.handle_timeout(now);
        }
    }

    /// With `--wait` and `retry` (reads; writes since issue 17), a coordinator's `rebalancing` refusal fetches the
    /// view again and runs a fresh coordinator on it; without `retry` it stands.
    #[test]
    fn a_refused_read_is_retried_on_a_fresh_view_but_a_write_is_not() {
        let t0 = Instant::now();
        for retry in [true, false] {
            let mut op = operation(t0, true, retry, 0);
            let ask = op.poll_send().unwrap();
            op.handle_response(t0, ask.token, servers(5, false));
            let get = op.poll_send().unwrap();
            op.handle_response(t0, get.token, refusal(ErrorKind::Rebalancing));
            if !retry {
                assert_eq!(
                    op.poll_outcome().unwrap().unwrap_err().kind,
                    ErrorKind::Rebalancing
                );
                continue;
            }
            assert!(op.poll_outcome().is_none());
            let ask = op.poll_send().expect("the view again");
            assert!(matches!(ask.request, Request::QueryServers));
            op.handle_response(t0, ask.token, servers(6, false));
            let get = op.poll_send().unwrap();
            assert_eq!(get.token >> ATTEMPT_SHIFT, 2);
            assert_eq!(op.attempts(), 2);
            op.handle_response(t0, get.token, Ok(Response::Value { value: "w".into() }));
            assert_eq!(op.poll_outcome(), Some(Ok("w".into())));
        }
    }

    /// Group member `n` of these tests: 127.0.0.1:3900n.
    fn member(n: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 39000 + n))
    }

    /// Contract (a member that died costs at most an election): with fallbacks, a view
    /// request that fails (unreachable, timeout) is asked of the next member; every attempt
    /// but the last is bounded, the last may take until the deadline; the members that
    /// failed are reported, and the coordinator runs on the view the last one gave.
    #[test]
    fn a_failed_view_request_falls_back_to_the_next_member() {
        let t0 = Instant::now();
        let bound = Duration::from_millis(200);
        let mut op = operation(t0, false, false, 0).with_fallbacks(
            t0,
            vec![member(0), member(1), member(2)],
            bound,
        );
        let ask = op.poll_send().unwrap();
        assert_eq!(ask.dst, VL.parse().unwrap());
        assert_eq!(ask.deadline, Some(t0 + bound), "bounded: others are left");
        op.handle_response(
            t0,
            ask.token,
            Err(RequestError::Unreachable { peer: ask.dst }),
        );
        let t1 = t0 + Duration::from_millis(10);
        let ask = op.poll_send().expect("asked again");
        assert_eq!(ask.dst, member(1), "the given one was skipped in the list");
        assert_eq!(ask.deadline, Some(t0 + bound), "counted from the failure");
        op.handle_response(t1, ask.token, Err(RequestError::Timeout { peer: ask.dst }));
        let ask = op.poll_send().expect("the last member");
        assert_eq!(ask.dst, member(2));
        assert_eq!(
            ask.deadline,
            Some(t0 + Duration::from_secs(1)),
            "the last attempt may take until the deadline"
        );
        op.handle_response(t1, ask.token, servers(4, false));
        assert_eq!(op.coordinator().map(|p| p.epoch), Some(Epoch(4)));
        assert_eq!(op.failed_viewleaders(), &[VL.parse().unwrap(), member(1)]);
        assert_eq!(op.viewleader(), member(2));

        // A refusal is an answer: it does not fall back.
        let mut op = operation(t0, false, false, 0).with_fallbacks(t0, vec![member(1)], bound);
        let ask = op.poll_send().unwrap();
        op.handle_response(t0, ask.token, refusal(ErrorKind::Aborted));
        assert_eq!(
            op.poll_outcome().unwrap().unwrap_err().kind,
            ErrorKind::Aborted
        );
        assert!(op.poll_send().is_none());
    }

    /// A member that answers it cannot reach its group's leader (an election under way:
    /// an error of kind `timeout`) is replaced by the next member; with none left, the
    /// operation ends saying so ([`Replicated::is_not_now`]), so the caller may ask again.
    #[test]
    fn a_member_between_leaders_falls_back_then_says_not_now() {
        let t0 = Instant::now();
        let bound = Duration::from_millis(200);
        let mut op = operation(t0, false, false, 0).with_fallbacks(t0, vec![member(1)], bound);
        let ask = op.poll_send().unwrap();
        op.handle_response(t0, ask.token, refusal(ErrorKind::Timeout));
        let ask = op.poll_send().expect("the next member");
        assert_eq!(ask.dst, member(1));
        assert!(!op.is_not_now());
        op.handle_response(t0, ask.token, refusal(ErrorKind::Unreachable));
        let e = op.poll_outcome().unwrap().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unreachable);
        assert!(op.is_not_now() && op.placement().is_none());
        assert_eq!(op.failed_viewleaders(), &[VL.parse().unwrap()]);
    }

    /// Contract (servers and clients find the group's leader themselves): a `Servers` answer
    /// naming the group's leader sends the following view requests (a `--wait` poll) there.
    #[test]
    fn the_leader_an_answer_names_answers_the_next_view_request() {
        let t0 = Instant::now();
        let mut op = operation(t0, true, false, 0);
        let ask = op.poll_send().unwrap();
        let Ok(Response::Servers { view, .. }) = gathering(5) else {
            unreachable!()
        };
        let named = Ok(Response::Servers {
            view,
            rebalancing: true,
            pending: Vec::new(),
            leader: Some(member(3)),
            group: vec![member(1), member(2), member(3)],
        });
        op.handle_response(t0, ask.token, named);
        op.handle_timeout(t0 + REBALANCING_POLL);
        let again = op.poll_send().expect("polled again");
        assert_eq!(again.dst, member(3));
        assert_eq!(op.viewleader(), member(3));
    }

    /// A kept view starts the coordinator at once, with no view request.
    #[test]
    fn a_kept_view_skips_the_view_step() {
        let t0 = Instant::now();
        let Ok(Response::Servers { view, .. }) = servers(9, false) else {
            unreachable!()
        };
        let placement = Placement::new(view);
        let mut op = Replicated::on_placement(
            t0,
            &placement,
            VL.parse().unwrap(),
            None,
            None,
            false,
            false,
            Epoch(3),
            probe,
        );
        assert_eq!(op.floor(), Epoch(9));
        assert_eq!(op.attempts(), 0);
        let get = op.poll_send().unwrap();
        assert!(matches!(get.request, Request::Get { .. }));
    }
}
