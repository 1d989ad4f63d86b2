//! Membership: who this server is (its id), which view leader it heartbeats, and the view
//! (with its ring) it learned from the acknowledgements.
//!
//! Heartbeats go out every interval, each bounded by the interval, so one stuck in
//! retransmission never delays the next. With no view leader address given, a discovery
//! round probes the candidate addresses and adopts the lowest one that answers. A rejoin
//! draws a fresh id; heartbeats sent under the abandoned one are told apart by their
//! sequence number.
//!
//! # Following the view-leader group
//!
//! The view leader may be a replicated group whose members all answer, but whose leader
//! alone should get the heartbeats. A probe's answer (`Servers`) and a heartbeat's
//! acknowledgement (`HeartbeatAck`) name the group's leader (`None`: the member that answered
//! is a group of one): discovery adopts the leader a probe names, and an acknowledgement
//! naming another leader moves the following heartbeats there. The members a probe lists
//! join the candidates, so a server given one member can still find the others.
//!
//! When a heartbeat to the view leader in use fails with `timeout` or `unreachable` (the
//! member died, paused, or was cut off), or is answered with an error of such a kind (a
//! member that cannot reach its group's leader, or that its group refused), the server runs
//! discovery again among its candidates, trying the failed member last; with a single
//! candidate, which is the view leader in use, there is nothing else to try and heartbeats
//! simply go on. For [`SUSPECT_INTERVALS`] heartbeat intervals the failed member is not
//! followed when an answer names it as the leader: it may be cut off from this server only,
//! and a follower passes the heartbeats on meanwhile.

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

/// How many heartbeat intervals a view leader whose heartbeat failed stays suspected: it is
/// probed last, and answers naming it as the group's leader are not followed meanwhile.
pub(super) const SUSPECT_INTERVALS: u32 = 10;

/// A view leader whose heartbeat failed.
#[derive(Clone, Copy, Debug)]
struct Suspect {
    /// Its address.
    addr: SocketAddr,
    /// Until when it is probed last and not followed when an answer names it.
    until: Instant,
}

/// A round of view leader probes in progress.
#[derive(Debug)]
struct Discovery {
    /// Outcome per probed candidate (by index into [`Membership::candidates`]): `None` while
    /// waiting, `Some(None)` if it failed or is no view leader, `Some(Some(addr))` if it
    /// answered as one, `addr` being where heartbeats should go (the leader it named, or
    /// itself).
    answers: Vec<Option<Option<SocketAddr>>>,
    /// The candidates' indices in order of preference: the given order, with the view
    /// leader that just failed (if any) last, so a silent one never holds the others back.
    order: Vec<usize>,
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
        /// The views published between the one this server knew and the new one.
        recent: Vec<View>,
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
    /// The view leader in use, once known (`None` while a discovery round looks for one).
    viewleader: Option<SocketAddr>,
    /// Every view-leader address known, in probing order: the configured candidates, the
    /// given view leader, then the group members and leaders learned since (never shrinks).
    candidates: Vec<SocketAddr>,
    /// The first heartbeat sequence number sent to the view leader in use: only a failure of
    /// such a heartbeat makes it look dead, and only their acknowledgements' leader hints
    /// are followed (a late answer from a member left behind changes nothing).
    leader_since_seq: u64,
    /// The view leader whose heartbeat failed last, if recently (see [`Suspect`]).
    suspect: Option<Suspect>,
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
        let mut candidates = Vec::new();
        for &addr in config.candidates.iter().chain(viewleader.as_ref()) {
            if !candidates.contains(&addr) {
                candidates.push(addr);
            }
        }
        Membership {
            config,
            id,
            rng,
            viewleader,
            candidates,
            leader_since_seq: 1,
            suspect: None,
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

    /// Makes `addr` the view leader heartbeats go to, from the next heartbeat on; adds it to
    /// the candidates if it is new. A suspect adopted again (it answered) is cleared.
    fn adopt(&mut self, addr: SocketAddr) {
        self.viewleader = Some(addr);
        self.leader_since_seq = self.heartbeat_seq + 1;
        if self.suspect.is_some_and(|s| s.addr == addr) {
            self.suspect = None;
        }
        self.learn_candidate(addr);
    }

    /// True if `addr` is the view leader whose heartbeat failed, at `now` still suspected.
    fn is_suspected(&self, addr: SocketAddr, now: Instant) -> bool {
        self.suspect
            .is_some_and(|s| s.addr == addr && now < s.until)
    }

    /// Adds `addr` to the candidates (at the end) unless it is there already.
    fn learn_candidate(&mut self, addr: SocketAddr) {
        if !self.candidates.contains(&addr) {
            self.candidates.push(addr);
        }
    }

    /// True if a discovery round could find another view leader than `current`: some
    /// candidate is another address.
    fn has_alternative(&self, current: SocketAddr) -> bool {
        self.candidates.iter().any(|&a| a != current)
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

    /// Starts a round of probes of every candidate view leader address, into `actions`
    /// (the failed view leader, if one is suspected, is preferred last).
    fn start_discovery(&mut self, now: Instant, actions: &mut VecDeque<Action>) {
        self.next_heartbeat = now + self.config.heartbeat_interval;
        let deadline = now
            + self
                .config
                .heartbeat_interval
                .max(Duration::from_millis(500));
        for (index, &dst) in self.candidates.iter().enumerate() {
            actions.push_back(Action::Request {
                token: Reply::Probe(index).token(),
                dst,
                request: Request::QueryServers,
                deadline: Some(deadline),
            });
        }
        let (mut order, last): (Vec<usize>, Vec<usize>) =
            (0..self.candidates.len()).partition(|&i| !self.is_suspected(self.candidates[i], now));
        order.extend(last);
        self.discovery = Some(Discovery {
            answers: vec![None; self.candidates.len()],
            order,
        });
    }

    /// Records the outcome at `now` of probe `index`: a view leader's answer (`Servers`, or
    /// `rebalancing` while it has no view to show) makes it eligible, and the group members
    /// a `Servers` answer lists join the candidates. Once every candidate preferred to an
    /// eligible one has failed, adopts it, or the leader it named (unless that is a suspect:
    /// the follower passes requests on anyway), and returns the address adopted (the caller
    /// sends the first heartbeat at once).
    pub(super) fn on_probe(
        &mut self,
        now: Instant,
        index: usize,
        result: Result<Response, RequestError>,
    ) -> Option<SocketAddr> {
        let candidate = *self.candidates.get(index)?;
        let discovery = self.discovery.as_ref()?;
        if discovery.answers.get(index).is_none_or(Option::is_some) {
            return None;
        }
        let eligible = match result {
            Ok(Response::Servers { leader, group, .. }) => {
                for member in group {
                    self.learn_candidate(member);
                }
                let target = leader.filter(|&l| !self.is_suspected(l, now));
                Some(target.unwrap_or(candidate))
            }
            Ok(answer) if answer.is_from_viewleader() => Some(candidate),
            _ => None,
        };
        let discovery = self.discovery.as_mut()?;
        discovery.answers[index] = Some(eligible);
        // The first candidate (in order of preference) that answered wins once every one
        // preferred to it has failed.
        let mut found = None;
        for &i in &discovery.order {
            match discovery.answers[i] {
                None => return None,
                Some(None) => continue,
                Some(Some(addr)) => {
                    found = Some(addr);
                    break;
                }
            }
        }
        let probed = discovery.answers.len();
        self.discovery = None;
        match found {
            Some(addr) => {
                info!("found the view leader at {addr}");
                self.adopt(addr);
                Some(addr)
            }
            None => {
                warn!("no view leader answers on {probed} candidate addresses; retrying");
                None
            }
        }
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
                leader,
                recent,
            }) => {
                self.follow(now, seq, leader);
                self.learn(view).then_some(Heard::View {
                    completed,
                    delivered,
                    recent,
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
                // A member that cannot reach its group's leader, or that its group refused:
                // another member may serve.
                if matches!(e.kind, ErrorKind::Timeout | ErrorKind::Unreachable)
                    && self.is_current(seq)
                {
                    self.suspect_viewleader(now, seq, &e.message);
                }
                None
            }
            Ok(other) => {
                warn!("unexpected answer to a heartbeat: {other:?}");
                None
            }
            Err(e @ (RequestError::Timeout { .. } | RequestError::Unreachable { .. }))
                if self.is_current(seq) =>
            {
                self.suspect_viewleader(now, seq, &e.to_string());
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

    /// Adopts `view` unless it is older than the one known (answers and pushes may arrive
    /// out of order: a server never steps back a view). Returns true if adopted (also when
    /// it is the same epoch again).
    fn learn(&mut self, view: View) -> bool {
        let old = self.epoch();
        if self.view.is_some() && view.epoch < old {
            return false;
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
        self.view = Some(view);
        true
    }

    /// Handles a view the view leader at `from` pushed (`Request::ViewPush`): learned like a
    /// heartbeat's answer if `from` is a view-leader address this server knows (the one in
    /// use, or a candidate) and the view names this server's current id. Returns what the
    /// rest of the server must do (`None` for an older view, or one naming an abandoned id),
    /// or why the push was refused.
    pub(super) fn on_push(
        &mut self,
        from: SocketAddr,
        view: View,
        completed: View,
        delivered: Epoch,
        recent: Vec<View>,
    ) -> Result<Option<Heard>, String> {
        if self.viewleader != Some(from) && !self.candidates.contains(&from) {
            return Err(format!(
                "refused: {from} is not a view leader this server knows"
            ));
        }
        // A view is pushed to the servers in it, under the ids it names. One that does not
        // name our current id was meant for an id we have abandoned since (declared dead, we
        // rejoined): acting on it would plan, send and drop as a server we no longer are. A
        // heartbeat's answer never names another id (the view leader refuses a dead id).
        if !view.members.iter().any(|m| m.id == self.id) {
            debug!(
                "ignoring a pushed view of epoch {} that does not name this server's id {}",
                view.epoch, self.id
            );
            return Ok(None);
        }
        Ok(self.learn(view).then_some(Heard::View {
            completed,
            delivered,
            recent,
        }))
    }

    /// True if heartbeat `seq` went to the view leader in use (sent since it was adopted,
    /// and no discovery round has given it up since).
    fn is_current(&self, seq: u64) -> bool {
        seq >= self.leader_since_seq && self.viewleader.is_some() && self.discovery.is_none()
    }

    /// The acknowledgement at `now` of heartbeat `seq` named `leader` as the group's leader:
    /// follow it if the heartbeat went to the view leader in use and it names another member
    /// (not a suspect: heartbeats then stay with the member that passes them on). An
    /// acknowledgement that comes while a discovery round looks for a replacement proves
    /// the member still answers: the round is dropped and the member (or the leader it
    /// names) kept.
    fn follow(&mut self, now: Instant, seq: u64, leader: Option<SocketAddr>) {
        if seq < self.leader_since_seq {
            return;
        }
        // The member that answered: the one in use, or the suspect while discovery runs.
        let answered = self.viewleader.or(self.suspect.map(|s| s.addr));
        let named = leader.filter(|&l| Some(l) == answered || !self.is_suspected(l, now));
        let Some(target) = named.or(answered) else {
            return;
        };
        if self.viewleader == Some(target) {
            return;
        }
        if self.discovery.take().is_some() {
            info!("the view leader answers again; heartbeating {target}");
        } else {
            info!("following the view-leader group's leader to {target}");
        }
        self.adopt(target);
    }

    /// Heartbeat `seq` to the view leader in use failed at `now` (`error` says how): if
    /// another candidate could take over, give the member up, suspect it, and run discovery
    /// at once (trying it last); else keep heartbeating it.
    fn suspect_viewleader(&mut self, now: Instant, seq: u64, error: &str) {
        let Some(current) = self.viewleader else {
            return;
        };
        if !self.has_alternative(current) {
            debug!("heartbeat {seq} failed ({error}); no other view leader to try");
            return;
        }
        warn!(
            "heartbeat {seq} failed ({error}); looking for the view leader among {} addresses",
            self.candidates.len()
        );
        self.viewleader = None;
        self.suspect = Some(Suspect {
            addr: current,
            until: now + self.config.heartbeat_interval * SUSPECT_INTERVALS,
        });
        self.next_heartbeat = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Group member `n` of these tests: 127.0.0.1:3900n.
    fn member(n: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 39000 + n))
    }

    /// The heartbeat interval of these tests.
    const INTERVAL: Duration = Duration::from_millis(100);

    /// Membership that starts with `viewleader` (or discovery) among `candidates`.
    fn membership(viewleader: Option<u16>, candidates: &[u16], now: Instant) -> Membership {
        let config = ServerConfig {
            advertise: "127.0.0.1:38000".parse().unwrap(),
            viewleader: viewleader.map(member),
            heartbeat_interval: INTERVAL,
            candidates: candidates.iter().copied().map(member).collect(),
        };
        Membership::new(config, Rng::seeded(7), now)
    }

    /// Runs the timers due at `now` and returns the requests they sent: (reply, destination,
    /// request).
    fn tick(m: &mut Membership, now: Instant) -> Vec<(Reply, SocketAddr, Request)> {
        let mut actions = VecDeque::new();
        m.handle_timeout(now, Epoch(0), Epoch(0), &mut actions);
        actions
            .into_iter()
            .map(|action| match action {
                Action::Request {
                    token,
                    dst,
                    request,
                    ..
                } => (Reply::from_token(token).expect("our token"), dst, request),
                other => panic!("unexpected action {other:?}"),
            })
            .collect()
    }

    /// The one heartbeat sent at `now`: its sequence number and destination.
    fn heartbeat(m: &mut Membership, now: Instant) -> (u64, SocketAddr) {
        match tick(m, now).as_slice() {
            [(Reply::Heartbeat(seq), dst, Request::Heartbeat { .. })] => (*seq, *dst),
            other => panic!("expected one heartbeat, got {other:?}"),
        }
    }

    /// An acknowledgement of a heartbeat at `epoch` naming `leader`.
    fn ack(epoch: u64, leader: Option<SocketAddr>) -> Result<Response, RequestError> {
        Ok(Response::HeartbeatAck {
            view: View {
                epoch: Epoch(epoch),
                ..View::default()
            },
            completed: View::default(),
            delivered: Epoch(0),
            leader,
            recent: Vec::new(),
        })
    }

    /// A probe's answer from a member of `group` naming `leader`.
    fn servers(leader: Option<SocketAddr>, group: &[u16]) -> Result<Response, RequestError> {
        Ok(Response::Servers {
            view: View::default(),
            rebalancing: false,
            pending: Vec::new(),
            leader,
            group: group.iter().copied().map(member).collect(),
        })
    }

    /// Contract ("View-leader group": servers heartbeat to the leader): an acknowledgement
    /// naming another member as the group's leader moves the next heartbeat there; a late
    /// acknowledgement from the member left behind does not move it back.
    #[test]
    fn an_acknowledgement_naming_the_leader_moves_the_next_heartbeat_there() {
        let t0 = Instant::now();
        let mut m = membership(Some(1), &[1, 2, 3], t0);
        let (first, dst) = heartbeat(&mut m, t0);
        assert_eq!(dst, member(1));
        let t1 = t0 + INTERVAL;
        let (second, dst) = heartbeat(&mut m, t1);
        assert_eq!(dst, member(1));
        assert!(
            m.on_heartbeat_answer(t1, second, ack(1, Some(member(2))))
                .is_some()
        );
        let t2 = t1 + INTERVAL;
        let (third, dst) = heartbeat(&mut m, t2);
        assert_eq!(
            dst,
            member(2),
            "the next heartbeat goes to the named leader"
        );
        // The first heartbeat's late answer still names member 1: it was sent before the
        // move, so it changes nothing.
        m.on_heartbeat_answer(t2, first, ack(1, Some(member(1))));
        m.on_heartbeat_answer(t2, third, ack(1, None));
        assert_eq!(heartbeat(&mut m, t2 + INTERVAL).1, member(2));
    }

    /// Contract (a member that died costs at most an election): a heartbeat to the view
    /// leader in use that fails sends the server back to discovery at once; the failed
    /// member is preferred last, so the next member that answers is adopted without waiting
    /// for it, and the following heartbeat goes there.
    #[test]
    fn a_failed_heartbeat_runs_discovery_again_trying_the_failed_member_last() {
        let t0 = Instant::now();
        let mut m = membership(Some(1), &[1, 2, 3], t0);
        let (seq, _) = heartbeat(&mut m, t0);
        let down = RequestError::Unreachable { peer: member(1) };
        assert!(m.on_heartbeat_answer(t0, seq, Err(down)).is_none());
        assert_eq!(m.poll_timeout(), Some(t0), "discovery is due at once");
        let probes = tick(&mut m, t0);
        let probed: Vec<SocketAddr> = probes.iter().map(|(_, dst, _)| *dst).collect();
        assert_eq!(probed, vec![member(1), member(2), member(3)]);
        assert!(
            probes
                .iter()
                .all(|(_, _, r)| matches!(r, Request::QueryServers))
        );
        assert_eq!(m.poll_timeout(), None, "no heartbeat while probing");
        // Member 3 answers first: member 2 is preferred, so it is waited for.
        assert_eq!(m.on_probe(t0, 2, servers(None, &[])), None);
        // Member 2 is a follower that still names the failed member as the leader: it is
        // adopted itself (it passes requests on), and member 1 is not waited for.
        assert_eq!(
            m.on_probe(t0, 1, servers(Some(member(1)), &[1, 2, 3])),
            Some(member(2))
        );
        let t1 = t0 + INTERVAL;
        assert_eq!(heartbeat(&mut m, t1).1, member(2));
        // A late probe answer of the abandoned round changes nothing.
        assert_eq!(m.on_probe(t0, 0, servers(None, &[])), None);
    }

    /// Contract (`--viewleader` may name any member): discovery adopts the leader the
    /// answering member names, and learns the group's other members as candidates, so the
    /// server can still find the group when the member it was given dies.
    #[test]
    fn discovery_adopts_the_named_leader_and_learns_the_group() {
        let t0 = Instant::now();
        let mut m = membership(None, &[1], t0);
        let probes = tick(&mut m, t0);
        assert_eq!(probes.len(), 1);
        assert_eq!(
            m.on_probe(t0, 0, servers(Some(member(3)), &[1, 2, 3])),
            Some(member(3))
        );
        assert_eq!(m.candidates, vec![member(1), member(2), member(3)]);
        let (seq, dst) = heartbeat(&mut m, t0 + INTERVAL);
        assert_eq!(dst, member(3));
        // The leader times out: all three are probed again, the leader last.
        let lost = RequestError::Timeout { peer: member(3) };
        m.on_heartbeat_answer(t0 + INTERVAL, seq, Err(lost));
        let probes = tick(&mut m, t0 + INTERVAL);
        assert_eq!(probes.len(), 3);
        let refused = Err(RequestError::Unreachable { peer: member(1) });
        assert_eq!(m.on_probe(t0, 0, refused), None);
        assert_eq!(
            m.on_probe(t0, 1, servers(Some(member(2)), &[1, 2, 3])),
            Some(member(2))
        );
    }

    /// An acknowledgement that arrives while discovery looks for a replacement proves the
    /// member still answers (it was only slow): the round is dropped and heartbeats go on to
    /// it.
    #[test]
    fn an_acknowledgement_during_discovery_keeps_the_member() {
        let t0 = Instant::now();
        let mut m = membership(Some(1), &[1, 2], t0);
        let (first, _) = heartbeat(&mut m, t0);
        let (second, _) = heartbeat(&mut m, t0 + INTERVAL);
        let lost = RequestError::Timeout { peer: member(1) };
        m.on_heartbeat_answer(t0 + INTERVAL, first, Err(lost));
        assert_eq!(tick(&mut m, t0 + INTERVAL).len(), 2, "probing");
        m.on_heartbeat_answer(t0 + INTERVAL, second, ack(1, None));
        assert_eq!(
            m.on_probe(t0, 1, servers(None, &[])),
            None,
            "the round is over"
        );
        assert_eq!(heartbeat(&mut m, t0 + 2 * INTERVAL).1, member(1));
    }

    /// A leader cut off from this server only: discovery moves heartbeats to a follower
    /// (which passes them on), and while the leader is suspected, acknowledgements naming it
    /// do not move them back; once the suspicion expires they do.
    #[test]
    fn a_follower_is_kept_while_the_failed_leader_is_suspected() {
        let t0 = Instant::now();
        let mut m = membership(Some(1), &[1, 2], t0);
        let (seq, _) = heartbeat(&mut m, t0);
        let lost = RequestError::Timeout { peer: member(1) };
        m.on_heartbeat_answer(t0, seq, Err(lost));
        assert_eq!(tick(&mut m, t0).len(), 2, "probing both");
        // The follower still names the cut leader: it is adopted itself.
        assert_eq!(
            m.on_probe(t0, 1, servers(Some(member(1)), &[1, 2])),
            Some(member(2))
        );
        let t1 = t0 + INTERVAL;
        let (seq, dst) = heartbeat(&mut m, t1);
        assert_eq!(dst, member(2));
        m.on_heartbeat_answer(t1, seq, ack(1, Some(member(1))));
        assert_eq!(
            heartbeat(&mut m, t1 + INTERVAL).1,
            member(2),
            "not back yet"
        );
        let later = t0 + INTERVAL * SUSPECT_INTERVALS;
        let (seq, _) = heartbeat(&mut m, later);
        m.on_heartbeat_answer(later, seq, ack(1, Some(member(1))));
        assert_eq!(
            heartbeat(&mut m, later + INTERVAL).1,
            member(1),
            "followed again once the suspicion expired"
        );
    }

    /// A heartbeat answered with an error of kind `unreachable` or `timeout` (a member its
    /// group refused, or one that cannot reach the group's leader) sends the server back to
    /// discovery like a heartbeat with no answer; other refusals do not.
    #[test]
    fn a_heartbeat_answered_not_now_runs_discovery_again() {
        let t0 = Instant::now();
        let mut m = membership(Some(1), &[1, 2], t0);
        let (seq, _) = heartbeat(&mut m, t0);
        let refused = Ok(Response::error(ErrorKind::BadInput, "no"));
        m.on_heartbeat_answer(t0, seq, refused);
        assert_eq!(
            m.poll_timeout(),
            Some(t0 + INTERVAL),
            "a refusal changes nothing"
        );
        let (seq, _) = heartbeat(&mut m, t0 + INTERVAL);
        let not_now = Ok(Response::error(
            ErrorKind::Unreachable,
            "this member was refused by its group",
        ));
        m.on_heartbeat_answer(t0 + INTERVAL, seq, not_now);
        assert_eq!(
            m.poll_timeout(),
            Some(t0 + INTERVAL),
            "discovery is due at once"
        );
        assert_eq!(tick(&mut m, t0 + INTERVAL).len(), 2);
    }

    /// With a single candidate that is the view leader in use (one `--viewleader`, or the
    /// simulator's), a failed heartbeat changes nothing: the next one goes to the same
    /// address at its usual time, with no probe.
    #[test]
    fn a_lone_view_leader_keeps_its_heartbeats_when_one_fails() {
        let t0 = Instant::now();
        let mut m = membership(Some(1), &[], t0);
        let (seq, _) = heartbeat(&mut m, t0);
        let down = RequestError::Unreachable { peer: member(1) };
        m.on_heartbeat_answer(t0, seq, Err(down));
        assert_eq!(m.poll_timeout(), Some(t0 + INTERVAL));
        assert_eq!(heartbeat(&mut m, t0 + INTERVAL).1, member(1));
    }
}
