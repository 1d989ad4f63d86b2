//! Membership: who this server is (its id), which view leader it heartbeats, and the view
//! (with its ring) it learned from the acknowledgements.
//!
//! Heartbeats go out every interval, each bounded by the interval, so one stuck in
//! retransmission never delays the next. With no view leader address given, a discovery
//! round probes the candidate addresses and adopts the lowest one that answers. A rejoin
//! draws a fresh id; heartbeats sent under the abandoned one are told apart by their
//! sequence number.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::placement::ring::Ring;
use crate::placement::view::{Epoch, Member, ServerId, View};
use crate::reliable::RequestError;
use crate::runtime::node::Action;
use crate::util::ratelimit::LogLimiter;
use crate::util::rng::Rng;
use crate::wire::message::{ErrorKind, Request, Response};

use super::{Reply, ServerConfig};

/// A round of view leader probes in progress.
#[derive(Debug)]
struct Discovery {
    /// Outcome per candidate: `None` while waiting, `Some(true)` if it answered as a view leader.
    answers: Vec<Option<bool>>,
}

/// What a heartbeat's answer asks the rest of the server to do.
#[derive(Debug)]
pub(super) enum Heard {
    /// A newer (or the same) view was learned: the anchor and the delivered epoch that came
    /// with it.
    View {
        /// The view leader's anchor of rebalancing (the newest delivered view).
        completed: View,
        /// The newest epoch every server had its sends acknowledged for.
        delivered: Epoch,
    },
    /// The view leader declared this server dead (at that epoch): rejoin under a fresh id.
    Refused(Epoch),
}

/// Membership state: identity, view leader, view and heartbeats.
#[derive(Debug)]
pub(super) struct Membership {
    /// Settings.
    pub(super) config: ServerConfig,
    /// The current id (fresh at start and at every rejoin).
    id: ServerId,
    /// Random source for ids.
    rng: Rng,
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
    /// Rate limit of the log lines about heartbeats the view leader answered with an error.
    heartbeat_log: LogLimiter,
}

impl Membership {
    /// Membership under a fresh id drawn from `rng`; the first heartbeat (or discovery
    /// round) is due at `now`.
    pub(super) fn new(config: ServerConfig, mut rng: Rng, now: Instant) -> Membership {
        let id = ServerId::random(&mut rng);
        let viewleader = config.viewleader;
        Membership {
            config,
            id,
            rng,
            viewleader,
            view: None,
            ring: Ring::default(),
            next_heartbeat: now,
            heartbeat_seq: 0,
            id_since_seq: 1,
            discovery: None,
            heartbeat_log: LogLimiter::default(),
        }
    }

    /// Rejoin (declared dead): draws a fresh id, and from now on ignores refusals of the
    /// heartbeats sent under the old one. The view is kept (epochs never go backwards here;
    /// we are simply not in it). Returns the abandoned id.
    pub(super) fn reset(&mut self) -> ServerId {
        let old = self.id;
        self.id = ServerId::random(&mut self.rng);
        self.id_since_seq = self.heartbeat_seq + 1;
        old
    }

    /// The current id.
    pub(super) fn id(&self) -> ServerId {
        self.id
    }

    /// The epoch of the last view learned (0 before any).
    pub(super) fn epoch(&self) -> Epoch {
        self.view.as_ref().map_or(Epoch(0), |v| v.epoch)
    }

    /// The last view learned, if any.
    pub(super) fn view(&self) -> Option<&View> {
        self.view.as_ref()
    }

    /// The ring of the last view learned (empty before any).
    pub(super) fn ring(&self) -> &Ring {
        &self.ring
    }

    /// `key`'s replicas in ring order in the last view learned (`None` before any view).
    pub(super) fn replicas(&self, key: &str) -> Option<Vec<Member>> {
        let view = self.view.as_ref()?;
        Some(self.ring.replicas(key, view.replicas as usize))
    }

    /// True if `from` is the address of a server in the last view learned.
    pub(super) fn is_member_addr(&self, from: SocketAddr) -> bool {
        self.view
            .as_ref()
            .is_some_and(|v| v.members.iter().any(|m| m.addr == from))
    }

    /// Makes the next heartbeat due at `now` (something to report at once).
    pub(super) fn report_now(&mut self, now: Instant) {
        self.next_heartbeat = now;
    }

    /// The next heartbeat instant, unless a discovery round is waiting for its probes.
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        if self.discovery.is_some() {
            None
        } else {
            Some(self.next_heartbeat)
        }
    }

    /// At `now`, sends the heartbeat (reporting rebalancing progress `finished` and `sent`)
    /// or starts the discovery round that is due, if any, into `actions`.
    pub(super) fn handle_timeout(
        &mut self,
        now: Instant,
        finished: Epoch,
        sent: Epoch,
        actions: &mut VecDeque<Action>,
    ) {
        if now < self.next_heartbeat || self.discovery.is_some() {
            return;
        }
        match self.viewleader {
            Some(viewleader) => self.send_heartbeat(now, viewleader, finished, sent, actions),
            None => self.start_discovery(now, actions),
        }
    }

    /// Sends a heartbeat to the view leader in use (if known) at once, reporting `finished`
    /// and `sent`, into `actions`.
    pub(super) fn heartbeat_now(
        &mut self,
        now: Instant,
        finished: Epoch,
        sent: Epoch,
        actions: &mut VecDeque<Action>,
    ) {
        if let Some(viewleader) = self.viewleader {
            self.send_heartbeat(now, viewleader, finished, sent, actions);
        }
    }

    /// Sends a heartbeat to `viewleader` carrying rebalancing progress `finished` and `sent`
    /// into `actions`. Every interval gets its own heartbeat, bounded by the interval, so one
    /// heartbeat stuck in retransmission never delays the next.
    fn send_heartbeat(
        &mut self,
        now: Instant,
        viewleader: SocketAddr,
        finished: Epoch,
        sent: Epoch,
        actions: &mut VecDeque<Action>,
    ) {
        self.heartbeat_seq += 1;
        self.next_heartbeat = now + self.config.heartbeat_interval;
        let deadline = now
            + self
                .config
                .heartbeat_interval
                .max(Duration::from_millis(100));
        actions.push_back(Action::Request {
            token: Reply::Heartbeat(self.heartbeat_seq).token(),
            dst: viewleader,
            request: Request::Heartbeat {
                id: self.id,
                addr: self.config.advertise,
                finished,
                sent,
                epoch: self.epoch(),
            },
            deadline: Some(deadline),
        });
    }

    /// Starts a round of probes of every candidate view leader address, into `actions`.
    fn start_discovery(&mut self, now: Instant, actions: &mut VecDeque<Action>) {
        self.next_heartbeat = now + self.config.heartbeat_interval;
        let deadline = now
            + self
                .config
                .heartbeat_interval
                .max(Duration::from_millis(500));
        for (index, &dst) in self.config.candidates.iter().enumerate() {
            actions.push_back(Action::Request {
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

    /// Records the outcome of probe `index` (`is_viewleader`: it answered as one); once every
    /// candidate has answered or failed, adopts the first (lowest) one that answered as a
    /// view leader and returns it (the caller sends the first heartbeat at once).
    pub(super) fn on_probe(&mut self, index: usize, is_viewleader: bool) -> Option<SocketAddr> {
        let discovery = self.discovery.as_mut()?;
        let slot = discovery.answers.get_mut(index)?;
        *slot = Some(is_viewleader);
        // The first candidate that answered wins once every earlier one has failed.
        for (i, answer) in discovery.answers.iter().enumerate() {
            match answer {
                None => return None,
                Some(false) => continue,
                Some(true) => {
                    let found = self.config.candidates[i];
                    info!("found the view leader at {found}");
                    self.viewleader = Some(found);
                    self.discovery = None;
                    return Some(found);
                }
            }
        }
        warn!(
            "no view leader answers on {} candidate addresses; retrying",
            discovery.answers.len()
        );
        self.discovery = None;
        None
    }

    /// Handles the answer to heartbeat number `seq` at `now`: learns a newer view (never an
    /// older one), or reports a refusal meant for the current id; logs the rest. Returns what
    /// the rest of the server must do, if anything.
    pub(super) fn on_heartbeat_answer(
        &mut self,
        now: Instant,
        seq: u64,
        result: Result<Response, RequestError>,
    ) -> Option<Heard> {
        match result {
            Ok(Response::HeartbeatAck {
                view,
                completed,
                delivered,
                ..
            }) => {
                let old = self.epoch();
                // Answers may arrive out of order: never step back to an older view.
                if self.view.is_some() && view.epoch < old {
                    return None;
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
                Some(Heard::View {
                    completed,
                    delivered,
                })
            }
            Ok(Response::HeartbeatRefused { .. }) if seq < self.id_since_seq => {
                // A refusal of a heartbeat sent under an id already abandoned.
                None
            }
            Ok(Response::HeartbeatRefused { view }) => Some(Heard::Refused(view.epoch)),
            Ok(Response::Error(e)) if e.kind == ErrorKind::Rebalancing => {
                // The view leader is gathering the servers that came back (it restarted, or
                // declared everyone dead): we stay as we are until it publishes the view.
                if let Some(held_back) = self.heartbeat_log.allow(now) {
                    info!(
                        "the view leader holds heartbeat {seq} back: {} ({held_back} more not \
                         logged)",
                        e.message
                    );
                }
                None
            }
            Ok(Response::Error(e)) => {
                if let Some(held_back) = self.heartbeat_log.allow(now) {
                    warn!(
                        "the view leader refused heartbeat {seq}: {}: {} \
                         ({held_back} more refusals not logged)",
                        e.kind, e.message
                    );
                }
                None
            }
            Ok(other) => {
                warn!("unexpected answer to a heartbeat: {other:?}");
                None
            }
            Err(RequestError::Timeout { .. }) => {
                debug!("heartbeat {seq} got no answer in time");
                None
            }
            Err(e) => {
                warn!("heartbeat failed: {e}");
                None
            }
        }
    }
}
