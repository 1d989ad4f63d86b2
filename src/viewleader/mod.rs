//! The view leader: membership from heartbeats, epochs, the current view, and the lock service.
//!
//! [`ViewLeader`] is a sans-IO [`Node`]. A server joins the view with its first heartbeat and
//! leaves it after `dead_after` of silence; every join and every departure starts a new epoch.
//! A heartbeat from a server already declared dead is refused: that server must empty its
//! bucket and rejoin under a fresh id. When a server leaves, the locks held by requesters
//! named after its id or its address are released. The view leader never stores anything
//! about keys.
//!
//! Bounds: at most [`ViewLeaderConfig::max_servers`] servers (a new one beyond it is refused),
//! 10 000 remembered dead ids, and the lock table's bounds ([`locks::LockConfig`]).
//! Refusals are counted in [`Refusals`] and logged at most once a second per kind.

pub mod locks;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::message::{self, ErrorKind, OpError, Request, Response};
use crate::node::{Action, Node};
use crate::ratelimit::LogLimiter;
use crate::reliable::{IncomingId, RequestError};
use crate::view::{Epoch, Member, ServerId, View};

use self::locks::{LockConfig, LockGetOutcome, LockReleaseOutcome, LockTable};

/// The ports a view leader binds by default, and where clients and servers look for one.
pub const DEFAULT_PORTS: std::ops::RangeInclusive<u16> = 39000..=39010;

/// How many ids of dead servers are remembered (to refuse their late heartbeats).
const DEAD_IDS_REMEMBERED: usize = 10_000;
/// Default of [`ViewLeaderConfig::max_servers`].
pub const MAX_SERVERS: usize = 1024;

/// What the view leader refused because a bound was reached. The counts only grow; each
/// kind is also logged, at most once a second.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Refusals {
    /// Heartbeats of new servers while the view held [`ViewLeaderConfig::max_servers`].
    pub view_full: u64,
    /// `lock_get` requests refused by a bound of the lock table ([`locks::Bound`]).
    pub lock_busy: u64,
    /// Heartbeats naming an address other than the one they came from.
    pub wrong_source: u64,
}

/// One rate limiter per kind of refusal.
#[derive(Debug, Default)]
struct RefusalLogs {
    /// Heartbeats refused, the view being full.
    view_full: LogLimiter,
    /// Lock requests refused by a bound.
    lock_busy: LogLimiter,
    /// Heartbeats from another address than the one they name.
    wrong_source: LogLimiter,
}

/// The addresses clients and servers probe, in order, when no `--viewleader` is given.
pub fn default_candidates() -> Vec<SocketAddr> {
    DEFAULT_PORTS
        .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
        .collect()
}

/// Settings of the view leader.
#[derive(Clone, Debug)]
pub struct ViewLeaderConfig {
    /// A server silent this long leaves the view.
    pub dead_after: Duration,
    /// Replication count carried in every view.
    pub replicas: u32,
    /// Ring points per server carried in every view.
    pub vnodes: u32,
    /// Lock service settings.
    pub locks: LockConfig,
    /// The most servers in the view; a heartbeat from one more new server is refused (with
    /// an error answer: it stays out of the view and keeps trying).
    pub max_servers: usize,
}

impl Default for ViewLeaderConfig {
    /// The contract's defaults: 2000 ms, 3 replicas, 64 vnodes; [`MAX_SERVERS`] servers and
    /// the lock table's default bounds.
    fn default() -> ViewLeaderConfig {
        ViewLeaderConfig {
            dead_after: Duration::from_millis(2000),
            replicas: 3,
            vnodes: 64,
            locks: LockConfig::default(),
            max_servers: MAX_SERVERS,
        }
    }
}

/// What the view leader knows of one live server.
#[derive(Clone, Debug)]
struct Liveness {
    /// Where the server is reached.
    addr: SocketAddr,
    /// When its last heartbeat arrived.
    last_heartbeat: Instant,
    /// The last epoch it reported finished rebalancing for.
    finished: Epoch,
    /// The last epoch it reported all its sends acknowledged for.
    sent: Epoch,
}

/// The view leader's state machine.
#[derive(Debug)]
pub struct ViewLeader {
    /// Settings.
    config: ViewLeaderConfig,
    /// The current epoch.
    epoch: Epoch,
    /// Live servers by id.
    members: BTreeMap<ServerId, Liveness>,
    /// Ids of servers declared dead (bounded; oldest forgotten first).
    dead: HashSet<ServerId>,
    /// The order dead ids were added, for forgetting the oldest.
    dead_order: VecDeque<ServerId>,
    /// The last view whose rebalancing completed on every server (ends the rebalancing flag).
    completed: View,
    /// The anchor of every rebalancing plan: the newest view all of whose servers had their
    /// sends acknowledged while it was current. From then on each of its replicas holds its
    /// keys, and servers may drop the copies they no longer own; a view change before its
    /// completion must be planned from it, not from the older completed view (whose holders
    /// may have dropped their copies since).
    anchor: View,
    /// When the view first changed after the last completed epoch (for the log).
    epoch_started: Option<Instant>,
    /// The lock service.
    locks: LockTable,
    /// What was refused, by kind.
    refusals: Refusals,
    /// Rate limits of the refusals' log lines.
    refusal_logs: RefusalLogs,
    /// Actions waiting for [`Node::poll_action`].
    actions: VecDeque<Action>,
}

impl ViewLeader {
    /// Creates a view leader with an empty view at epoch 0.
    pub fn new(config: ViewLeaderConfig) -> ViewLeader {
        let locks = LockTable::new(config.locks);
        let (replicas, vnodes) = (config.replicas, config.vnodes);
        ViewLeader {
            config,
            epoch: Epoch(0),
            members: BTreeMap::new(),
            dead: HashSet::new(),
            dead_order: VecDeque::new(),
            completed: View {
                epoch: Epoch(0),
                members: Vec::new(),
                replicas,
                vnodes,
            },
            anchor: View {
                epoch: Epoch(0),
                members: Vec::new(),
                replicas,
                vnodes,
            },
            epoch_started: None,
            locks,
            refusals: Refusals::default(),
            refusal_logs: RefusalLogs::default(),
            actions: VecDeque::new(),
        }
    }

    /// What the view leader refused so far, by kind (see [`Refusals`]).
    pub fn refusals(&self) -> &Refusals {
        &self.refusals
    }

    /// The current view.
    pub fn view(&self) -> View {
        View {
            epoch: self.epoch,
            members: self
                .members
                .iter()
                .map(|(&id, l)| Member { id, addr: l.addr })
                .collect(),
            replicas: self.config.replicas,
            vnodes: self.config.vnodes,
        }
    }

    /// Whether the current epoch is still rebalancing, and which servers have not finished it.
    pub fn rebalancing(&self) -> (bool, Vec<ServerId>) {
        let pending: Vec<ServerId> = self
            .members
            .iter()
            .filter(|(_, l)| l.finished < self.epoch)
            .map(|(&id, _)| id)
            .collect();
        (self.completed.epoch != self.epoch, pending)
    }

    /// The current epoch if every server in the view has had all its sends acknowledged
    /// (every copy of the epoch is delivered), else the epoch before it.
    fn delivered(&self) -> Epoch {
        if self.members.values().all(|l| l.sent >= self.epoch) {
            self.epoch
        } else {
            Epoch(self.epoch.0.saturating_sub(1))
        }
    }

    /// The acknowledgement of a heartbeat: the view, the anchor of plans (in the `completed`
    /// field), the delivered epoch.
    fn heartbeat_ack(&self) -> Response {
        Response::HeartbeatAck {
            view: self.view(),
            completed: self.anchor.clone(),
            delivered: self.delivered(),
        }
    }

    /// Marks the current epoch completed once every server in the view finished it. The
    /// work is O(servers): the view leader never sees a key.
    fn check_completion(&mut self, now: Instant) {
        if self.anchor.epoch < self.epoch && self.delivered() == self.epoch {
            self.anchor = self.view();
        }
        if self.completed.epoch == self.epoch
            || self.members.values().any(|l| l.finished < self.epoch)
        {
            return;
        }
        let took = self
            .epoch_started
            .take()
            .map(|t| now.saturating_duration_since(t));
        self.completed = self.view();
        info!(
            "epoch {} rebalanced on all {} servers{}",
            self.epoch,
            self.members.len(),
            took.map(|t| format!(" ({} ms after the view change)", t.as_millis()))
                .unwrap_or_default()
        );
    }

    /// Handles a heartbeat from server `id` at `addr`, returning the answer.
    fn heartbeat(
        &mut self,
        now: Instant,
        id: ServerId,
        addr: SocketAddr,
        (finished, sent): (Epoch, Epoch),
    ) -> Response {
        if self.dead.contains(&id) {
            info!("refusing a heartbeat from {id} at {addr}: it was declared dead");
            return Response::HeartbeatRefused { view: self.view() };
        }
        if let Some(member) = self.members.get_mut(&id) {
            member.last_heartbeat = now;
            member.finished = member.finished.max(finished);
            member.sent = member.sent.max(sent);
            if member.addr != addr {
                let old = std::mem::replace(&mut member.addr, addr);
                info!("server {id} moved from {old} to {addr}");
                self.new_epoch(now);
                // Locks tied to the old address belong to a server no longer there.
                let released = self.locks.release_all_of(now, &[&old.to_string()]);
                if !released.is_empty() {
                    info!("released locks of {old}: {}", released.join(", "));
                }
            }
            self.check_completion(now);
            return self.heartbeat_ack();
        }
        // A server restarted on the same address under a new id before its old incarnation
        // was declared dead: the old one is gone, so it leaves now.
        let stale: Vec<ServerId> = self
            .members
            .iter()
            .filter(|(_, l)| l.addr == addr)
            .map(|(&old, _)| old)
            .collect();
        if stale.is_empty() && self.members.len() >= self.config.max_servers {
            self.refusals.view_full += 1;
            let reason = format!(
                "refused: the view is full ({} servers, at most {})",
                self.members.len(),
                self.config.max_servers
            );
            if let Some(held_back) = self.refusal_logs.view_full.allow(now) {
                warn!(
                    "heartbeat of new server {id} at {addr} {reason} ({} such refusals, \
                     {held_back} not logged)",
                    self.refusals.view_full
                );
            }
            return Response::error(ErrorKind::Aborted, reason);
        }
        for old in stale {
            self.remove(now, old, "replaced by a new server on the same address");
        }
        self.members.insert(
            id,
            Liveness {
                addr,
                last_heartbeat: now,
                finished,
                sent,
            },
        );
        self.new_epoch(now);
        info!(
            "server {id} at {addr} joined; epoch {} has {} servers",
            self.epoch,
            self.members.len()
        );
        self.heartbeat_ack()
    }

    /// Starts a new epoch at `now`.
    fn new_epoch(&mut self, now: Instant) {
        self.epoch = Epoch(self.epoch.0 + 1);
        self.epoch_started.get_or_insert(now);
    }

    /// Removes server `id` from the view, declares it dead and releases its locks.
    fn remove(&mut self, now: Instant, id: ServerId, why: &str) {
        let Some(liveness) = self.members.remove(&id) else {
            return;
        };
        self.new_epoch(now);
        if self.dead_order.len() == DEAD_IDS_REMEMBERED
            && let Some(oldest) = self.dead_order.pop_front()
        {
            self.dead.remove(&oldest);
        }
        self.dead.insert(id);
        self.dead_order.push_back(id);
        let names = [id.to_string(), liveness.addr.to_string()];
        let released = self.locks.release_all_of(now, &[&names[0], &names[1]]);
        info!(
            "server {id} at {} left ({why}); epoch {} has {} servers",
            liveness.addr,
            self.epoch,
            self.members.len()
        );
        if !released.is_empty() {
            info!("released locks of {id}: {}", released.join(", "));
        }
        // The remaining servers may all have finished already: a departure never makes the
        // view leader wait for a server that is gone.
        self.check_completion(now);
    }

    /// Handles `lock_get`.
    fn lock_get(&mut self, now: Instant, lock: &str, requester: &str) -> Response {
        if let Err(e) = check_names(lock, requester) {
            return Response::Error(e);
        }
        match self.locks.get(now, lock, requester) {
            LockGetOutcome::Granted => Response::LockGranted,
            LockGetOutcome::Waiting { holder, position } => Response::LockWaiting {
                holder,
                position: position as u32,
            },
            LockGetOutcome::Deadlock { cycle } => Response::Error(OpError {
                kind: ErrorKind::Deadlock,
                message: format!(
                    "waiting for {lock} would close the cycle {}",
                    cycle.join(" -> ")
                ),
                cycle,
            }),
            LockGetOutcome::Busy(bound) => {
                self.refusals.lock_busy += 1;
                if let Some(held_back) = self.refusal_logs.lock_busy.allow(now) {
                    warn!(
                        "refused {requester}'s request for {lock}: {bound} ({} such refusals, \
                         {held_back} not logged)",
                        self.refusals.lock_busy
                    );
                }
                Response::error(
                    ErrorKind::Aborted,
                    format!("lock_get {lock} refused: {bound}"),
                )
            }
        }
    }

    /// Handles `lock_release`.
    fn lock_release(&mut self, now: Instant, lock: &str, requester: &str) -> Response {
        if let Err(e) = check_names(lock, requester) {
            return Response::Error(e);
        }
        match self.locks.release(now, lock, requester) {
            LockReleaseOutcome::Released => Response::LockReleased,
            LockReleaseOutcome::NotHolder => Response::error(
                ErrorKind::NotHolder,
                format!("{requester} does not hold {lock}"),
            ),
        }
    }
}

impl ViewLeader {
    /// Refuses a heartbeat from `from` naming another address, `addr`: servers are reached
    /// at the address they name, so one forged heartbeat would otherwise turn every server's
    /// rebalance transfers on a victim (found in review). Counts and logs (at most once a
    /// second) the refusal and returns the `bad_input` answer.
    fn wrong_source(
        &mut self,
        now: Instant,
        from: SocketAddr,
        server: ServerId,
        addr: SocketAddr,
    ) -> Response {
        self.refusals.wrong_source += 1;
        let reason = format!(
            "heartbeat of {server} from {from} names the address {addr}: a server must send \
             from the address it advertises (--advertise)"
        );
        if let Some(held_back) = self.refusal_logs.wrong_source.allow(now) {
            warn!(
                "refused: {reason} ({} such refusals, {held_back} not logged)",
                self.refusals.wrong_source
            );
        }
        Response::error(ErrorKind::BadInput, reason)
    }
}

/// Checks the lock and requester names of a lock request.
fn check_names(lock: &str, requester: &str) -> Result<(), OpError> {
    message::check_lock_name("lock name", lock)?;
    message::check_lock_name("requester", requester)
}

impl Node for ViewLeader {
    /// Answers heartbeats, `query_servers` and lock requests; refuses storage requests.
    fn handle_request(&mut self, now: Instant, from: SocketAddr, id: IncomingId, request: Request) {
        let response = match request {
            Request::Heartbeat {
                id: server, addr, ..
            } if addr != from => self.wrong_source(now, from, server, addr),
            Request::Heartbeat {
                id: server,
                addr,
                finished,
                sent,
            } => self.heartbeat(now, server, addr, (finished, sent)),
            Request::QueryServers => {
                let (rebalancing, pending) = self.rebalancing();
                Response::Servers {
                    view: self.view(),
                    rebalancing,
                    pending,
                }
            }
            Request::LockGet { lock, requester } => self.lock_get(now, &lock, &requester),
            Request::LockRelease { lock, requester } => self.lock_release(now, &lock, &requester),
            Request::LockWithdraw { lock, requester } => {
                if self.locks.withdraw(now, &lock, &requester) {
                    info!("{requester} withdrew its request for {lock}");
                }
                Response::LockReleased
            }
            other => Response::error(
                ErrorKind::BadInput,
                format!(
                    "{} is not served by the view leader (from {from})",
                    other.name()
                ),
            ),
        };
        self.actions.push_back(Action::Respond { id, response });
    }

    /// The view leader sends no requests of its own.
    fn handle_response(
        &mut self,
        _now: Instant,
        _token: u64,
        _result: Result<Response, RequestError>,
    ) {
    }

    /// Declares silent servers dead and expires lock requests.
    fn handle_timeout(&mut self, now: Instant) {
        let dead_after = self.config.dead_after;
        let silent: Vec<ServerId> = self
            .members
            .iter()
            .filter(|(_, l)| l.last_heartbeat + dead_after <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in silent {
            self.remove(now, id, "no heartbeat");
        }
        self.locks.handle_timeout(now);
    }

    /// The earliest of: the next server to fall silent for `dead_after`, the next lock expiry.
    fn poll_timeout(&self) -> Option<Instant> {
        let silence = self
            .members
            .values()
            .map(|l| l.last_heartbeat + self.config.dead_after)
            .min();
        [silence, self.locks.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Hands out the next response.
    fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A view leader with `dead_after` of 1 s.
    fn leader() -> ViewLeader {
        ViewLeader::new(ViewLeaderConfig {
            dead_after: Duration::from_secs(1),
            ..Default::default()
        })
    }

    /// Sends `request` and returns the response.
    fn ask(vl: &mut ViewLeader, now: Instant, request: Request) -> Response {
        let id = IncomingId {
            incarnation: 1,
            request: 1,
        };
        // A heartbeat comes from the address it names.
        let from = match &request {
            Request::Heartbeat { addr, .. } => *addr,
            _ => "127.0.0.1:1".parse().unwrap(),
        };
        vl.handle_request(now, from, id, request);
        match vl.poll_action() {
            Some(Action::Respond { response, .. }) => response,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    /// A heartbeat from server `n` on port `n`.
    fn heartbeat(n: u128) -> Request {
        Request::Heartbeat {
            id: ServerId(n),
            addr: SocketAddr::from(([127, 0, 0, 1], n as u16)),
            finished: Epoch(0),
            sent: Epoch(0),
        }
    }

    /// Assignment 3.4: adding or removing a server triggers a view change; each join, and each
    /// departure after `dead_after` of silence, raises the epoch by one.
    #[test]
    fn joins_and_departures_each_start_an_epoch() {
        let mut vl = leader();
        let t0 = Instant::now();
        ask(&mut vl, t0, heartbeat(1));
        ask(&mut vl, t0, heartbeat(2));
        assert_eq!(vl.view().epoch, Epoch(2));
        assert_eq!(vl.view().members.len(), 2);
        // Server 1 keeps beating, server 2 falls silent.
        ask(&mut vl, t0 + Duration::from_millis(600), heartbeat(1));
        assert_eq!(vl.poll_timeout(), Some(t0 + Duration::from_secs(1)));
        vl.handle_timeout(t0 + Duration::from_secs(1));
        let view = vl.view();
        assert_eq!(view.epoch, Epoch(3));
        assert_eq!(
            view.members.iter().map(|m| m.id).collect::<Vec<_>>(),
            vec![ServerId(1)]
        );
    }

    /// Contract: a heartbeat from a server already declared dead is refused, and it stays out of
    /// the view.
    #[test]
    fn a_dead_servers_late_heartbeat_is_refused() {
        let mut vl = leader();
        let t0 = Instant::now();
        ask(&mut vl, t0, heartbeat(7));
        vl.handle_timeout(t0 + Duration::from_secs(2));
        let answer = ask(&mut vl, t0 + Duration::from_secs(3), heartbeat(7));
        assert!(
            matches!(answer, Response::HeartbeatRefused { .. }),
            "{answer:?}"
        );
        assert!(vl.view().members.is_empty());
    }

    /// Assignment 3.4: a server learns the epoch in its heartbeat's acknowledgement, which
    /// carries the whole view (`replicas` and `vnodes` included).
    #[test]
    fn heartbeat_ack_carries_the_current_view() {
        let mut vl = leader();
        let answer = ask(&mut vl, Instant::now(), heartbeat(5));
        let Response::HeartbeatAck { view, .. } = answer else {
            panic!("{answer:?}")
        };
        assert_eq!(view.epoch, Epoch(1));
        assert_eq!((view.replicas, view.vnodes), (3, 64));
    }

    /// README: a new id heartbeating from a live member's address replaces that member: one
    /// departure and one join, so the epoch goes from 1 to 3.
    #[test]
    fn a_new_id_on_a_known_address_replaces_the_old_server() {
        let mut vl = leader();
        let t0 = Instant::now();
        let addr: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        ask(
            &mut vl,
            t0,
            Request::Heartbeat {
                id: ServerId(1),
                addr,
                finished: Epoch(0),
                sent: Epoch(0),
            },
        );
        ask(
            &mut vl,
            t0,
            Request::Heartbeat {
                id: ServerId(2),
                addr,
                finished: Epoch(0),
                sent: Epoch(0),
            },
        );
        let view = vl.view();
        assert_eq!(
            view.members.iter().map(|m| m.id).collect::<Vec<_>>(),
            vec![ServerId(2)]
        );
        assert_eq!(view.epoch, Epoch(3), "one departure and two joins");
    }

    /// Contract: locks held by requesters named after a server's id or ADDR are released when it
    /// leaves the view, so a waiter then gets them.
    #[test]
    fn a_departed_servers_locks_are_released() {
        let mut vl = leader();
        let t0 = Instant::now();
        ask(&mut vl, t0, heartbeat(9));
        let by_id = Request::LockGet {
            lock: "A".into(),
            requester: ServerId(9).to_string(),
        };
        let by_addr = Request::LockGet {
            lock: "B".into(),
            requester: "127.0.0.1:9".into(),
        };
        assert_eq!(ask(&mut vl, t0, by_id), Response::LockGranted);
        assert_eq!(ask(&mut vl, t0, by_addr), Response::LockGranted);
        let other = Request::LockGet {
            lock: "A".into(),
            requester: "carol".into(),
        };
        assert!(matches!(
            ask(&mut vl, t0, other.clone()),
            Response::LockWaiting { .. }
        ));
        vl.handle_timeout(t0 + Duration::from_millis(1000));
        assert_eq!(vl.locks.holder("B"), None);
        assert_eq!(
            ask(&mut vl, t0 + Duration::from_millis(1000), other),
            Response::LockGranted
        );
    }

    /// The view is rebalancing from a change until every server reports the epoch finished;
    /// a departure never leaves it waiting for the server that left.
    #[test]
    fn rebalancing_lasts_until_every_server_reports_the_epoch_finished() {
        let mut vl = leader();
        let t0 = Instant::now();
        let beat = |n: u128, finished: u64| Request::Heartbeat {
            id: ServerId(n),
            addr: SocketAddr::from(([127, 0, 0, 1], n as u16)),
            finished: Epoch(finished),
            sent: Epoch(finished),
        };
        ask(&mut vl, t0, beat(1, 0));
        ask(&mut vl, t0, beat(2, 0));
        assert_eq!(vl.rebalancing(), (true, vec![ServerId(1), ServerId(2)]));
        ask(&mut vl, t0, beat(1, 2));
        assert_eq!(vl.rebalancing(), (true, vec![ServerId(2)]));
        let answer = ask(&mut vl, t0, beat(2, 2));
        let Response::HeartbeatAck { completed, .. } = answer else {
            panic!("{answer:?}")
        };
        assert_eq!(completed.epoch, Epoch(2));
        assert_eq!(vl.rebalancing(), (false, vec![]));
        // Server 3 joins (epoch 3) and dies before finishing (epoch 4): with 1 and 2 done,
        // epoch 4 completes without it.
        ask(&mut vl, t0, beat(3, 0));
        ask(&mut vl, t0 + Duration::from_millis(600), beat(1, 3));
        ask(&mut vl, t0 + Duration::from_millis(600), beat(2, 3));
        vl.handle_timeout(t0 + Duration::from_secs(1));
        assert_eq!(vl.view().epoch, Epoch(4));
        assert!(vl.rebalancing().0, "1 and 2 must still finish epoch 4");
        ask(&mut vl, t0 + Duration::from_millis(1100), beat(1, 4));
        ask(&mut vl, t0 + Duration::from_millis(1100), beat(2, 4));
        assert_eq!(vl.rebalancing(), (false, vec![]));
    }

    /// The view leader answers a storage command (`get`) with `bad_input` rather than silence.
    #[test]
    fn storage_requests_are_refused_with_bad_input() {
        let mut vl = leader();
        let answer = ask(&mut vl, Instant::now(), Request::Get { key: "k".into() });
        let Response::Error(e) = answer else {
            panic!("{answer:?}")
        };
        assert_eq!(e.kind, ErrorKind::BadInput);
    }

    /// Found by the simulator (README "How we test"): once every server of the current view
    /// had its sends acknowledged, servers drop the copies they no longer own, so a view
    /// change before that epoch completes is planned from it (the anchor), not from the
    /// older completed view whose holders may have dropped their copies.
    #[test]
    fn plans_are_anchored_on_the_newest_delivered_view() {
        let mut vl = leader();
        let t0 = Instant::now();
        let beat = |n: u128, sent: u64, finished: u64| Request::Heartbeat {
            id: ServerId(n),
            addr: SocketAddr::from(([127, 0, 0, 1], n as u16)),
            finished: Epoch(finished),
            sent: Epoch(sent),
        };
        let anchor = |answer: Response| match answer {
            Response::HeartbeatAck { completed, .. } => completed.epoch,
            other => panic!("{other:?}"),
        };
        ask(&mut vl, t0, beat(1, 0, 0));
        ask(&mut vl, t0, beat(2, 0, 0));
        ask(&mut vl, t0, beat(1, 2, 2));
        assert_eq!(anchor(ask(&mut vl, t0, beat(2, 2, 2))), Epoch(2));
        // Server 3 joins: epoch 3 is delivered (every send acknowledged) but not finished.
        ask(&mut vl, t0, beat(3, 0, 0));
        ask(&mut vl, t0, beat(3, 3, 0));
        ask(&mut vl, t0, beat(1, 3, 2));
        assert_eq!(anchor(ask(&mut vl, t0, beat(2, 3, 2))), Epoch(3));
        assert!(vl.rebalancing().0, "epoch 3 is not finished yet");
        // Server 3 dies before finishing: epoch 4 is planned from epoch 3.
        let later = t0 + Duration::from_millis(600);
        ask(&mut vl, later, beat(1, 3, 3));
        ask(&mut vl, later, beat(2, 3, 3));
        vl.handle_timeout(t0 + Duration::from_secs(1));
        assert_eq!(vl.view().epoch, Epoch(4));
        assert_eq!(anchor(ask(&mut vl, later, beat(1, 3, 3))), Epoch(3));
    }

    /// Issue 8 (bounded resources): beyond `max_servers` a heartbeat from a new server is
    /// refused with an error naming the bound, counted, and the view does not change; a
    /// member's heartbeat, and a new id on a member's address, are still accepted.
    #[test]
    fn a_full_view_refuses_new_servers() {
        let mut vl = ViewLeader::new(ViewLeaderConfig {
            max_servers: 2,
            ..Default::default()
        });
        let t0 = Instant::now();
        ask(&mut vl, t0, heartbeat(1));
        ask(&mut vl, t0, heartbeat(2));
        let answer = ask(&mut vl, t0, heartbeat(3));
        let Response::Error(e) = answer else {
            panic!("{answer:?}")
        };
        assert_eq!(e.kind, ErrorKind::Aborted);
        assert_eq!(
            e.message,
            "refused: the view is full (2 servers, at most 2)"
        );
        assert_eq!(vl.refusals().view_full, 1);
        assert_eq!(vl.view().epoch, Epoch(2));
        assert!(matches!(
            ask(&mut vl, t0, heartbeat(2)),
            Response::HeartbeatAck { .. }
        ));
        let replacement = Request::Heartbeat {
            id: ServerId(9),
            addr: SocketAddr::from(([127, 0, 0, 1], 2)),
            finished: Epoch(0),
            sent: Epoch(0),
        };
        assert!(matches!(
            ask(&mut vl, t0, replacement),
            Response::HeartbeatAck { .. }
        ));
        assert_eq!(vl.view().members.len(), 2);
    }

    /// Issue 8 (bounded resources): a `lock_get` refused by a bound of the lock table fails
    /// at once with `aborted`, naming the bound, and is counted.
    #[test]
    fn a_lock_get_beyond_the_table_bound_is_refused() {
        let mut vl = ViewLeader::new(ViewLeaderConfig {
            locks: LockConfig {
                max_entries: 1,
                ..LockConfig::default()
            },
            ..Default::default()
        });
        let t0 = Instant::now();
        let get = |lock: &str| Request::LockGet {
            lock: lock.into(),
            requester: "r".into(),
        };
        assert_eq!(ask(&mut vl, t0, get("A")), Response::LockGranted);
        let answer = ask(&mut vl, t0, get("B"));
        let Response::Error(e) = answer else {
            panic!("{answer:?}")
        };
        assert_eq!(e.kind, ErrorKind::Aborted);
        assert!(
            e.message
                .starts_with("lock_get B refused: the lock table is full (1 entries"),
            "{}",
            e.message
        );
        assert_eq!(vl.refusals().lock_busy, 1);
    }

    /// Issue 8 review: a heartbeat naming an address it does not come from is refused and
    /// changes nothing (a forged one would aim every server's transfers at a victim).
    #[test]
    fn a_heartbeat_naming_another_address_is_refused() {
        let mut vl = ViewLeader::new(ViewLeaderConfig::default());
        let t0 = Instant::now();
        let id = IncomingId {
            incarnation: 1,
            request: 1,
        };
        vl.handle_request(t0, "10.0.0.9:5".parse().unwrap(), id, heartbeat(1));
        let Some(Action::Respond {
            response: Response::Error(e),
            ..
        }) = vl.poll_action()
        else {
            panic!("refused");
        };
        assert_eq!(e.kind, ErrorKind::BadInput);
        assert!(
            e.message.contains("names the address 127.0.0.1:1"),
            "{}",
            e.message
        );
        assert_eq!(vl.refusals().wrong_source, 1);
        assert!(vl.view().members.is_empty());
        assert!(matches!(
            ask(&mut vl, t0, heartbeat(1)),
            Response::HeartbeatAck { .. }
        ));
    }
}
