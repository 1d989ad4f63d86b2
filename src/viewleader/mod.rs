//! The view leader: membership from heartbeats, epochs, the current view, and the lock service.
//!
//! [`ViewLeader`] is a sans-IO [`Node`]. A server joins the view with its first heartbeat and
//! leaves it after `dead_after` of silence; every join and every departure starts a new epoch.
//! A heartbeat from a server already declared dead is refused: that server rejoins under a
//! fresh id, keeping its bucket as candidates for rebalancing to reconcile. When a server
//! leaves, the locks held by requesters named after its id or its address are released. The
//! view leader never stores anything about keys.
//!
//! # Its own faults never cost data
//!
//! - **Stalls.** A view leader that was descheduled, paused or swapped out would find every
//!   server silent. It keeps a tick of its own (a quarter of `dead_after`) so that it can tell:
//!   when it is called after a gap of more than half of `dead_after`, its loop ran late, and
//!   every server gets a fresh `dead_after` before anyone may be declared dead. A freshly
//!   started view leader declares nobody dead during its first `dead_after` either.
//! - **Restarts.** Servers report the newest epoch they learned in every heartbeat; the view
//!   leader never publishes a view below the highest it heard, so epochs never go backwards.
//! - **Gathering.** A join into an empty view that had servers before (the joiner reports an
//!   epoch above 0: it may hold data; or the view leader's own epoch is above 0: it lost every
//!   server) opens a window of `dead_after`: the view leader restarted, or declared every
//!   server dead at once (its own stall, a cut, a frozen host). The servers that heartbeat during the window are published together in one view
//!   at its end, with no anchor (every holder sends every key to every replica), so no key
//!   is served by a partial view while its other holders are still on their way back.
//!
//! Bounds: at most [`ViewLeaderConfig::max_servers`] servers (a new one beyond it is refused),
//! 10 000 remembered dead ids, and the lock table's bounds ([`locks::LockConfig`]).
//! Refusals are counted in [`Refusals`] and logged at most once a second per kind.

pub mod group;
pub mod locks;
pub mod storage;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::placement::view::{Epoch, Member, ServerId, View};
use crate::reliable::{IncomingId, RequestError};
use crate::runtime::node::{Action, Node};
use crate::util::ratelimit::LogLimiter;
use crate::wire::message::{self, ErrorKind, OpError, Request, Response};

use serde::{Deserialize, Serialize};

use self::locks::{LockConfig, LockGetOutcome, LockImage, LockReleaseOutcome, LockTable};

/// The ports a view leader binds by default, and where clients and servers look for one.
pub const DEFAULT_PORTS: std::ops::RangeInclusive<u16> = 39000..=39010;

/// How many ids of dead servers are remembered (to refuse their late heartbeats).
const DEAD_IDS_REMEMBERED: usize = 10_000;
/// The view leader's own tick is `dead_after` divided by this; a gap between two calls longer
/// than twice the tick is a stall of the view leader itself.
const TICKS_PER_DEAD_AFTER: u32 = 4;
/// The node token of the view leader's pushes ([`Request::ViewPush`]); their answers only
/// confirm delivery.
pub const PUSH_TOKEN: u64 = 1;

/// The most recent views a view leader remembers for the heartbeat answers' `recent`.
pub const RECENT_VIEWS: usize = 8;
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

/// What a server reports of its progress in a heartbeat.
#[derive(Clone, Copy, Debug)]
struct Progress {
    /// The last epoch it finished rebalancing for.
    finished: Epoch,
    /// The last epoch all of whose sends it had acknowledged.
    sent: Epoch,
    /// The newest epoch it has learned.
    epoch: Epoch,
}

/// Servers that heartbeat into an empty view while it gathers them (see the module doc).
#[derive(Debug)]
struct Gathering {
    /// When the window closes and the view is published.
    until: Instant,
    /// The servers heard so far.
    servers: BTreeMap<ServerId, Liveness>,
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
    /// The last [`RECENT_VIEWS`] views published, oldest first (the current one last), for
    /// the heartbeat answers' `recent` (soft state: not in the snapshots).
    history: VecDeque<View>,
    /// What the servers were last told by a push ([`ViewLeader::push_changes`]): the epoch,
    /// the anchor's epoch and the delivered epoch.
    pushed: (Epoch, Epoch, Epoch),
    /// The servers gathered into an empty view, until the window closes.
    gathering: Option<Gathering>,
    /// The first instant this view leader was called at (nobody is declared dead before
    /// `dead_after` has passed since).
    started: Option<Instant>,
    /// The last instant it was called at (a much later call means its loop ran late).
    last_call: Option<Instant>,
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
            history: VecDeque::new(),
            pushed: (Epoch(0), Epoch(0), Epoch(0)),
            gathering: None,
            started: None,
            last_call: None,
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
        let rebalancing = self.completed.epoch != self.epoch || self.gathering.is_some();
        (rebalancing, pending)
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

    /// The acknowledgement of a heartbeat from a server that knows epoch `known`: the view,
    /// the anchor of plans (in the `completed` field), the delivered epoch, and the views
    /// published since `known` that it may have missed.
    fn heartbeat_ack(&self, known: Epoch) -> Response {
        let recent = self
            .history
            .iter()
            .filter(|v| v.epoch > known && v.epoch < self.epoch)
            .cloned()
            .collect();
        Response::HeartbeatAck {
            view: self.view(),
            completed: self.anchor.clone(),
            delivered: self.delivered(),
            leader: None,
            recent,
        }
    }

    /// Tells every server in the view, as soon as it changed, what a heartbeat's answer would
    /// tell it: a new view, a new anchor or a newly delivered epoch. A server then starts its
    /// rebalancing (or drops what it kept) at once instead of at its next heartbeat, which
    /// stays the liveness signal and the fallback when a push is lost. Each push is a request
    /// of the reliable layer (acknowledged, sent again until `dead_after` / 2), queued as an
    /// [`Action::Request`] with token [`PUSH_TOKEN`]; a view-leader group sends only its
    /// leader's. Nothing is pushed while there is no view to show. `now` starts the deadline.
    fn push_changes(&mut self, now: Instant) {
        let now_state = (self.epoch, self.anchor.epoch, self.delivered());
        if now_state == self.pushed || self.members.is_empty() || self.gathering.is_some() {
            return;
        }
        let known = self.pushed.0;
        self.pushed = now_state;
        let recent: Vec<View> = self
            .history
            .iter()
            .filter(|v| v.epoch > known && v.epoch < self.epoch)
            .cloned()
            .collect();
        let view = self.view();
        for member in &view.members {
            self.actions.push_back(Action::Request {
                token: PUSH_TOKEN,
                dst: member.addr,
                request: Request::ViewPush {
                    view: view.clone(),
                    completed: self.anchor.clone(),
                    delivered: self.delivered(),
                    recent: recent.clone(),
                },
                deadline: Some(now + self.config.dead_after / 2),
            });
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

    /// Raises the epoch to `reported` (an epoch a server learned) if it is higher, logging it:
    /// this view leader restarted, and no view it publishes may be below one already seen.
    /// Returns true if it rose.
    fn rise_to(&mut self, reported: Epoch, from: ServerId) -> bool {
        if reported <= self.epoch {
            return false;
        }
        info!(
            "server {from} reports epoch {reported}, above ours ({}): this view leader \
             restarted; publishing no view below epoch {}",
            self.epoch,
            reported.0 + 1
        );
        self.epoch = reported;
        true
    }

    /// Handles a heartbeat from server `id` at `addr`, returning the answer.
    fn heartbeat(
        &mut self,
        now: Instant,
        id: ServerId,
        addr: SocketAddr,
        progress: Progress,
    ) -> Response {
        let Progress {
            finished,
            sent,
            epoch,
        } = progress;
        if self.dead.contains(&id) {
            info!("refusing a heartbeat from {id} at {addr}: it was declared dead");
            return Response::HeartbeatRefused { view: self.view() };
        }
        if let Some(member) = self.members.get_mut(&id) {
            member.last_heartbeat = now;
            member.finished = member.finished.max(finished);
            member.sent = member.sent.max(sent);
            if self.rise_to(epoch, id) {
                // That epoch may name another view than ours: publish above it.
                self.new_epoch(now);
            } else if let Some(member) = self.members.get_mut(&id)
                && member.addr != addr
            {
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
            return self.heartbeat_ack(epoch);
        }
        // A server restarted on the same address under a new id before its old incarnation
        // was declared dead: the old one is gone, so it leaves now.
        let stale: Vec<ServerId> = self
            .members
            .iter()
            .filter(|(_, l)| l.addr == addr)
            .map(|(&old, _)| old)
            .collect();
        let gathered = self.gathering.as_ref().map_or(0, |g| g.servers.len());
        if stale.is_empty() && self.members.len() + gathered >= self.config.max_servers {
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
        // Emptied by this very heartbeat (its server restarted on the same address) is not
        // "lost every server": only a view empty before it gathers.
        let was_empty = self.members.is_empty();
        for old in stale {
            self.remove(now, old, "replaced by a new server on the same address");
        }
        let liveness = Liveness {
            addr,
            last_heartbeat: now,
            finished,
            sent,
        };
        // An empty view that had servers before (ours or the joiner's epoch is above 0) lost
        // them all at once: gather whoever comes back before publishing anything.
        let had_servers = epoch > Epoch(0) || self.epoch > Epoch(0);
        if was_empty && (had_servers || self.gathering.is_some()) {
            return self.gather(now, id, liveness, epoch);
        }
        self.rise_to(epoch, id);
        self.members.insert(id, liveness);
        self.new_epoch(now);
        info!(
            "server {id} at {addr} joined; epoch {} has {} servers",
            self.epoch,
            self.members.len()
        );
        self.heartbeat_ack(epoch)
    }

    /// Why this view leader has no view to show at `now`, if it has none: it started less
    /// than `dead_after` ago and has heard no server yet (it may have restarted, and the
    /// servers know a newer epoch than its 0), or it is gathering the servers that came back
    /// (the epoch it would show is not final). Epochs a client sees never go backwards.
    fn view_unknown(&self, now: Instant) -> Option<String> {
        let dead_after = self.config.dead_after;
        if let Some(gathering) = &self.gathering {
            return Some(format!(
                "the view leader is gathering the servers that may hold data; the view is \
                 published in {} ms",
                gathering.until.saturating_duration_since(now).as_millis()
            ));
        }
        let started = self.started.unwrap_or(now);
        let heard = self.epoch > Epoch(0) || !self.members.is_empty();
        if heard || now >= started + dead_after {
            return None;
        }
        Some(format!(
            "the view leader started {} ms ago and has heard no server yet; it knows the view \
             within {} ms",
            now.saturating_duration_since(started).as_millis(),
            (started + dead_after)
                .saturating_duration_since(now)
                .as_millis()
        ))
    }

    /// Takes server `id` (which was in view `epoch` before) into the gathering of an empty
    /// view, opening the window if it is the first; answers `rebalancing` until the view is
    /// published.
    fn gather(&mut self, now: Instant, id: ServerId, liveness: Liveness, epoch: Epoch) -> Response {
        self.rise_to(epoch, id);
        let gathering = self.gathering.get_or_insert_with(|| {
            info!(
                "server {id} at {} joins an empty view after being in epoch {epoch}: gathering \
                 the servers that may hold data for {} ms before publishing one view",
                liveness.addr,
                self.config.dead_after.as_millis()
            );
            Gathering {
                until: now + self.config.dead_after,
                servers: BTreeMap::new(),
            }
        });
        let addr = liveness.addr;
        gathering.servers.retain(|_, l| l.addr != addr);
        gathering.servers.insert(id, liveness);
        let reason = self.view_unknown(now).unwrap_or_default();
        Response::error(ErrorKind::Rebalancing, reason)
    }

    /// Closes the gathering window: publishes one view with every gathered server still
    /// heard within `dead_after`, anchored on no view (every holder sends every key to every
    /// replica, so each replica ends with the best copy any holder had).
    fn publish_gathered(&mut self, now: Instant) {
        let Some(gathering) = self.gathering.take() else {
            return;
        };
        let dead_after = self.config.dead_after;
        let alive: Vec<(ServerId, Liveness)> = gathering
            .servers
            .into_iter()
            .filter(|(_, l)| now < l.last_heartbeat + dead_after)
            .collect();
        if alive.is_empty() {
            info!("no gathered server is still heartbeating: the view stays empty");
            return;
        }
        // No anchor: plans into the new view send every key to every replica.
        self.anchor = View {
            epoch: self.epoch,
            members: Vec::new(),
            ..self.anchor.clone()
        };
        let count = alive.len();
        self.members.extend(alive);
        self.new_epoch(now);
        info!(
            "gathering over: epoch {} has the {count} servers that came back",
            self.epoch
        );
    }

    /// Notes a call at `now`. After a gap longer than twice the tick, this view leader's
    /// loop ran late (it was descheduled, paused or stopped): every server gets a fresh
    /// `dead_after` before anyone may be declared dead, so a stall of its own never declares
    /// the servers whose heartbeats were waiting unread.
    fn observe(&mut self, now: Instant) {
        self.started.get_or_insert(now);
        let tick = self.tick();
        if let Some(last) = self.last_call.replace(now)
            && now.saturating_duration_since(last) > 2 * tick
            && !self.members.is_empty()
        {
            warn!(
                "this view leader's loop ran {} ms late: giving every server a fresh {} ms \
                 before declaring any dead",
                now.saturating_duration_since(last).as_millis(),
                self.config.dead_after.as_millis()
            );
            self.renew_all(now);
        }
    }

    /// Gives every server (in the view and gathering) a fresh `dead_after` from `now`: after
    /// a stall of this view leader's loop, and when a new leader of the group takes over
    /// (heartbeats went to the old one meanwhile).
    pub(crate) fn renew_all(&mut self, now: Instant) {
        self.started.get_or_insert(now);
        self.last_call = Some(self.last_call.map_or(now, |last| last.max(now)));
        for liveness in self.members.values_mut() {
            liveness.last_heartbeat = liveness.last_heartbeat.max(now);
        }
        if let Some(gathering) = &mut self.gathering {
            for liveness in gathering.servers.values_mut() {
                liveness.last_heartbeat = liveness.last_heartbeat.max(now);
            }
        }
    }

    /// The answer to `query_servers` at `now`, without changing anything (a group's leader
    /// answers it from its applied state, outside the replicated log): the view and its
    /// rebalancing status, or `rebalancing` while there is no view to show yet.
    pub fn query_servers(&self, now: Instant) -> Response {
        match self.view_unknown(now) {
            Some(reason) => Response::error(ErrorKind::Rebalancing, reason),
            None => {
                let (rebalancing, pending) = self.rebalancing();
                Response::Servers {
                    view: self.view(),
                    rebalancing,
                    pending,
                    leader: None,
                    group: Vec::new(),
                }
            }
        }
    }

    /// The answer to a request the view leader does not serve (storage requests and the
    /// like), from `from`: `bad_input`.
    pub fn refuse(request: &Request, from: SocketAddr) -> Response {
        Response::error(
            ErrorKind::BadInput,
            format!(
                "{} is not served by the view leader (from {from})",
                request.name()
            ),
        )
    }

    /// True for the requests that change the view leader's state (a group replicates them
    /// through its log); false for reads and for requests it refuses.
    pub fn changes_state(request: &Request) -> bool {
        matches!(
            request,
            Request::Heartbeat { .. }
                | Request::LockGet { .. }
                | Request::LockRelease { .. }
                | Request::LockWithdraw { .. }
        )
    }

    /// The view leader's own tick (a quarter of `dead_after`), by which it notices its stalls.
    fn tick(&self) -> Duration {
        self.config.dead_after / TICKS_PER_DEAD_AFTER
    }

    /// Starts a new epoch at `now` (the members already changed) and remembers its view.
    fn new_epoch(&mut self, now: Instant) {
        debug_assert!(self.epoch.0 < u64::MAX, "epochs only grow");
        self.epoch = Epoch(self.epoch.0 + 1);
        self.epoch_started.get_or_insert(now);
        if self.history.len() == RECENT_VIEWS {
            self.history.pop_front();
        }
        self.history.push_back(self.view());
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

    /// Handles `lock_get` of `lock` by `requester` under `claim`.
    fn lock_get(&mut self, now: Instant, lock: &str, requester: &str, claim: u64) -> Response {
        if let Err(e) = check_names(lock, requester) {
            return Response::Error(e);
        }
        match self.locks.get(now, lock, requester, claim) {
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

    /// Handles `lock_release` of `lock` by `requester` (of the holding under `claim`, if
    /// named).
    fn lock_release(
        &mut self,
        now: Instant,
        lock: &str,
        requester: &str,
        claim: Option<u64>,
    ) -> Response {
        if let Err(e) = check_names(lock, requester) {
            return Response::Error(e);
        }
        match self.locks.release(now, lock, requester, claim) {
            LockReleaseOutcome::Released => Response::LockReleased,
            LockReleaseOutcome::NotHolder => Response::error(
                ErrorKind::NotHolder,
                match claim {
                    None => format!("{requester} does not hold {lock}"),
                    Some(claim) => format!("{requester} does not hold {lock} under claim {claim}"),
                },
            ),
        }
    }
}

/// A live server in a [`ViewLeaderImage`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct LivenessImage {
    /// The server.
    id: ServerId,
    /// Where it is reached.
    addr: SocketAddr,
    /// Its last heartbeat, µs since the origin.
    last_heartbeat: u64,
    /// The last epoch it finished.
    finished: Epoch,
    /// The last epoch all of whose sends it had acknowledged.
    sent: Epoch,
}

/// A view leader's replicated state as plain data, for the snapshots of the view-leader
/// group (instants are µs since an origin instant of the member that took it). Settings,
/// refusal counts and log limiters are each member's own and not included.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewLeaderImage {
    /// The current epoch.
    epoch: Epoch,
    /// Live servers.
    members: Vec<LivenessImage>,
    /// Ids of servers declared dead, oldest first.
    dead: Vec<ServerId>,
    /// The last completed view.
    completed: View,
    /// The anchor of rebalancing plans.
    anchor: View,
    /// When the view first changed after the last completed epoch.
    epoch_started: Option<u64>,
    /// The gathering window's end and the servers gathered, if one is open.
    gathering: Option<(u64, Vec<LivenessImage>)>,
    /// The first instant the view leader was called at.
    started: Option<u64>,
    /// The last instant it was called at.
    last_call: Option<u64>,
    /// The lock table.
    locks: LockImage,
}

/// Microseconds from `origin` to `at` (0 if `at` is earlier).
fn micros_since(origin: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(origin).as_micros()).unwrap_or(u64::MAX)
}

impl ViewLeader {
    /// The replicated state as plain data, instants measured from `origin`.
    pub fn image(&self, origin: Instant) -> ViewLeaderImage {
        let since = |at: Instant| micros_since(origin, at);
        let live = |(&id, l): (&ServerId, &Liveness)| LivenessImage {
            id,
            addr: l.addr,
            last_heartbeat: since(l.last_heartbeat),
            finished: l.finished,
            sent: l.sent,
        };
        ViewLeaderImage {
            epoch: self.epoch,
            members: self.members.iter().map(live).collect(),
            dead: self.dead_order.iter().copied().collect(),
            completed: self.completed.clone(),
            anchor: self.anchor.clone(),
            epoch_started: self.epoch_started.map(since),
            gathering: self
                .gathering
                .as_ref()
                .map(|g| (since(g.until), g.servers.iter().map(live).collect())),
            started: self.started.map(since),
            last_call: self.last_call.map(since),
            locks: self.locks.image(origin),
        }
    }

    /// A view leader with settings `config` and the replicated state of `image`, whose
    /// instants are measured from `origin`.
    pub fn restore(config: ViewLeaderConfig, image: &ViewLeaderImage, origin: Instant) -> Self {
        let at = |micros: u64| origin + Duration::from_micros(micros);
        let live = |l: &LivenessImage| {
            (
                l.id,
                Liveness {
                    addr: l.addr,
                    last_heartbeat: at(l.last_heartbeat),
                    finished: l.finished,
                    sent: l.sent,
                },
            )
        };
        let mut vl = ViewLeader::new(config);
        vl.epoch = image.epoch;
        vl.members = image.members.iter().map(live).collect();
        vl.dead = image.dead.iter().copied().collect();
        vl.dead_order = image.dead.iter().copied().collect();
        vl.completed = image.completed.clone();
        vl.anchor = image.anchor.clone();
        vl.epoch_started = image.epoch_started.map(at);
        vl.gathering = image.gathering.as_ref().map(|(until, servers)| Gathering {
            until: at(*until),
            servers: servers.iter().map(live).collect(),
        });
        vl.started = image.started.map(at);
        vl.last_call = image.last_call.map(at);
        vl.locks = LockTable::restore(vl.config.locks, &image.locks, origin);
        vl
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
        self.observe(now);
        let response = match request {
            Request::Heartbeat {
                id: server, addr, ..
            } if addr != from => self.wrong_source(now, from, server, addr),
            Request::Heartbeat {
                id: server,
                addr,
                finished,
                sent,
                epoch,
            } => {
                let progress = Progress {
                    finished,
                    sent,
                    epoch,
                };
                self.heartbeat(now, server, addr, progress)
            }
            Request::QueryServers => self.query_servers(now),
            Request::LockGet {
                lock,
                requester,
                claim,
            } => self.lock_get(now, &lock, &requester, claim),
            Request::LockRelease {
                lock,
                requester,
                claim,
            } => self.lock_release(now, &lock, &requester, claim),
            Request::LockWithdraw {
                lock,
                requester,
                claim,
            } => {
                if self.locks.withdraw(now, &lock, &requester, claim) {
                    info!("{requester} withdrew its request for {lock}");
                }
                Response::LockReleased
            }
            other => ViewLeader::refuse(&other, from),
        };
        self.actions.push_back(Action::Respond { id, response });
        self.push_changes(now);
    }

    /// The view leader sends no requests of its own; it only notes the call.
    fn handle_response(
        &mut self,
        now: Instant,
        _token: u64,
        _result: Result<Response, RequestError>,
    ) {
        self.observe(now);
    }

    /// Publishes a gathered view whose window closed, declares silent servers dead (never
    /// during the first `dead_after` after start, nor after a stall of its own) and expires
    /// lock requests.
    fn handle_timeout(&mut self, now: Instant) {
        self.observe(now);
        if self.gathering.as_ref().is_some_and(|g| g.until <= now) {
            self.publish_gathered(now);
        }
        let dead_after = self.config.dead_after;
        let young = self.started.is_some_and(|t| now < t + dead_after);
        let silent: Vec<ServerId> = self
            .members
            .iter()
            .filter(|(_, l)| !young && l.last_heartbeat + dead_after <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in silent {
            self.remove(now, id, "no heartbeat");
        }
        self.locks.handle_timeout(now);
        self.push_changes(now);
    }

    /// The earliest of: the next server to fall silent for `dead_after`, the next lock
    /// expiry, the end of a gathering, and (while there are servers to watch) the tick by
    /// which the view leader notices its own stalls.
    fn poll_timeout(&self) -> Option<Instant> {
        let silence = self
            .members
            .values()
            .map(|l| l.last_heartbeat + self.config.dead_after)
            .min();
        let tick = self
            .last_call
            .filter(|_| !self.members.is_empty())
            .map(|last| last + self.tick());
        [
            silence,
            self.locks.poll_timeout(),
            self.gathering.as_ref().map(|g| g.until),
            tick,
        ]
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

    /// Runs the view leader's timers as a driver would, up to and including `until`.
    fn run_until(vl: &mut ViewLeader, until: Instant) {
        while let Some(at) = vl.poll_timeout().filter(|&at| at <= until) {
            vl.handle_timeout(at);
        }
    }

    /// Runs the timers up to `now` (as a driver would), sends `request` and returns the
    /// response.
    fn ask(vl: &mut ViewLeader, now: Instant, request: Request) -> Response {
        run_until(vl, now);
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
        let mut answer = None;
        while let Some(action) = vl.poll_action() {
            match action {
                Action::Respond { response, .. } if answer.is_none() => answer = Some(response),
                Action::Request {
                    request: Request::ViewPush { .. },
                    ..
                } => {}
                other => panic!("expected one response and view pushes, got {other:?}"),
            }
        }
        answer.expect("a response")
    }

    /// A heartbeat from server `n` on port `n` that was never in a view (epoch 0).
    fn heartbeat(n: u128) -> Request {
        heartbeat_at(n, 0)
    }

    /// Issue 17 (views are pushed): a join pushes the new view to every server in it, once,
    /// with the views published since the last push; a heartbeat that changes nothing
    /// pushes nothing.
    #[test]
    fn a_new_view_is_pushed_to_every_server_once() {
        let mut vl = leader();
        let t0 = Instant::now();
        let pushes = |vl: &mut ViewLeader, now: Instant, request: Request| {
            let id = IncomingId {
                incarnation: 1,
                request: 1,
            };
            let from = match &request {
                Request::Heartbeat { addr, .. } => *addr,
                _ => unreachable!(),
            };
            vl.handle_request(now, from, id, request);
            let mut to = Vec::new();
            while let Some(action) = vl.poll_action() {
                if let Action::Request {
                    dst,
                    request: Request::ViewPush { view, .. },
                    token,
                    ..
                } = action
                {
                    assert_eq!(token, PUSH_TOKEN);
                    to.push((dst.port(), view.epoch.0));
                }
            }
            to
        };
        assert_eq!(pushes(&mut vl, t0, heartbeat(1)), vec![(1, 1)]);
        assert_eq!(pushes(&mut vl, t0, heartbeat(2)), vec![(1, 2), (2, 2)]);
        assert_eq!(pushes(&mut vl, t0, heartbeat_at(1, 2)), vec![]);
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
        run_until(&mut vl, t0 + Duration::from_millis(999));
        assert_eq!(vl.view().epoch, Epoch(2), "not silent for dead_after yet");
        run_until(&mut vl, t0 + Duration::from_secs(1));
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
        run_until(&mut vl, t0 + Duration::from_secs(2));
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
                epoch: Epoch(0),
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
                epoch: Epoch(0),
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
            claim: 1,
        };
        let by_addr = Request::LockGet {
            lock: "B".into(),
            requester: "127.0.0.1:9".into(),
            claim: 1,
        };
        assert_eq!(ask(&mut vl, t0, by_id), Response::LockGranted);
        assert_eq!(ask(&mut vl, t0, by_addr), Response::LockGranted);
        let other = Request::LockGet {
            lock: "A".into(),
            requester: "carol".into(),
            claim: 1,
        };
        assert!(matches!(
            ask(&mut vl, t0, other.clone()),
            Response::LockWaiting { .. }
        ));
        run_until(&mut vl, t0 + Duration::from_millis(1000));
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
            epoch: Epoch(finished),
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
        run_until(&mut vl, t0 + Duration::from_secs(1));
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
            epoch: Epoch(sent),
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
        run_until(&mut vl, t0 + Duration::from_secs(1));
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
            epoch: Epoch(0),
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
            claim: 1,
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

    /// A heartbeat from server `n` on port `n` that has learned `epoch`.
    fn heartbeat_at(n: u128, epoch: u64) -> Request {
        Request::Heartbeat {
            id: ServerId(n),
            addr: SocketAddr::from(([127, 0, 0, 1], n as u16)),
            finished: Epoch(epoch),
            sent: Epoch(epoch),
            epoch: Epoch(epoch),
        }
    }

    /// Issue 14 (a view leader never mass-declares because of its own stall): called again
    /// after 3 x `dead_after` without a call (paused), it finds every server silent yet
    /// declares none; they get a fresh `dead_after` from the resume, and only one that stays
    /// silent through it is declared.
    #[test]
    fn a_stalled_view_leader_declares_nobody_dead() {
        let mut vl = leader();
        let t0 = Instant::now();
        ask(&mut vl, t0, heartbeat(1));
        ask(&mut vl, t0, heartbeat(2));
        run_until(&mut vl, t0 + Duration::from_millis(500));
        // Stopped for 3 s: its next call is the overdue timer.
        let resumed = t0 + Duration::from_millis(3500);
        vl.handle_timeout(resumed);
        assert_eq!(vl.view().epoch, Epoch(2));
        assert_eq!(vl.view().members.len(), 2, "nobody declared dead");
        ask(&mut vl, resumed + Duration::from_millis(400), heartbeat(1));
        ask(&mut vl, resumed + Duration::from_millis(800), heartbeat(1));
        run_until(&mut vl, resumed + Duration::from_millis(999));
        assert_eq!(vl.view().members.len(), 2);
        run_until(&mut vl, resumed + Duration::from_millis(1000));
        let view = vl.view();
        assert_eq!(view.epoch, Epoch(3));
        assert_eq!(
            view.members.iter().map(|m| m.id).collect::<Vec<_>>(),
            [ServerId(1)]
        );
    }

    /// Issue 14 (epochs never go backwards; gathering): a restarted view leader hears servers
    /// that were at epoch 7 and 9; it answers `rebalancing` while it gathers them for
    /// `dead_after`, then publishes one view with both above every epoch heard, anchored on no
    /// view.
    #[test]
    fn a_restarted_view_leader_gathers_and_publishes_above_every_epoch_heard() {
        let mut vl = leader();
        let t0 = Instant::now();
        let answer = ask(&mut vl, t0, heartbeat_at(1, 7));
        assert!(
            matches!(answer, Response::Error(ref e) if e.kind == ErrorKind::Rebalancing),
            "{answer:?}"
        );
        let answer = ask(&mut vl, t0 + Duration::from_millis(300), heartbeat_at(2, 9));
        assert!(matches!(answer, Response::Error(ref e) if e.kind == ErrorKind::Rebalancing));
        assert!(
            vl.rebalancing().0,
            "query_servers says rebalancing while gathering"
        );
        assert!(vl.view().members.is_empty());
        assert!(vl.view().epoch >= Epoch(9), "never below an epoch heard");
        ask(&mut vl, t0 + Duration::from_millis(600), heartbeat_at(1, 7));
        ask(&mut vl, t0 + Duration::from_millis(900), heartbeat_at(2, 9));
        run_until(&mut vl, t0 + Duration::from_secs(1));
        let view = vl.view();
        assert_eq!(view.epoch, Epoch(10));
        assert_eq!(view.members.len(), 2);
        let Response::HeartbeatAck {
            view, completed, ..
        } = ask(
            &mut vl,
            t0 + Duration::from_millis(1100),
            heartbeat_at(1, 7),
        )
        else {
            panic!("a member's heartbeat is acknowledged");
        };
        assert_eq!(view.epoch, Epoch(10));
        assert!(completed.members.is_empty(), "no anchor after a gathering");
        assert!(completed.epoch >= Epoch(9));
    }

    /// Issue 14: a fresh cluster (servers that were never in a view report epoch 0) is not
    /// held back by gathering; a member that reports an epoch above the view leader's makes
    /// it publish above that epoch.
    #[test]
    fn fresh_servers_join_at_once_and_a_higher_epoch_heard_is_overtaken() {
        let mut vl = leader();
        let t0 = Instant::now();
        assert!(matches!(
            ask(&mut vl, t0, heartbeat(1)),
            Response::HeartbeatAck { .. }
        ));
        assert_eq!(vl.view().epoch, Epoch(1));
        ask(&mut vl, t0, heartbeat_at(1, 5));
        assert_eq!(vl.view().epoch, Epoch(6));
    }

    /// Issue 14 (gathering): when every server was declared dead at once (a cut, a frozen
    /// host), the first to come back does not get a view of its own: the others that come back
    /// within `dead_after` are published with it, in one view.
    #[test]
    fn servers_coming_back_to_an_empty_view_are_published_together() {
        let mut vl = leader();
        let t0 = Instant::now();
        ask(&mut vl, t0, heartbeat(1));
        ask(&mut vl, t0, heartbeat(2));
        ask(&mut vl, t0, heartbeat_at(1, 2));
        ask(&mut vl, t0, heartbeat_at(2, 2));
        run_until(&mut vl, t0 + Duration::from_secs(1));
        assert!(vl.view().members.is_empty(), "both declared dead");
        let empty = vl.view().epoch;
        // They come back under fresh ids (3 and 4), remembering epoch 2.
        let t1 = t0 + Duration::from_secs(2);
        let first = ask(&mut vl, t1, heartbeat_at(3, 2));
        assert!(matches!(first, Response::Error(ref e) if e.kind == ErrorKind::Rebalancing));
        ask(&mut vl, t1 + Duration::from_millis(100), heartbeat_at(4, 2));
        assert_eq!(vl.view().epoch, empty);
        ask(&mut vl, t1 + Duration::from_millis(500), heartbeat_at(3, 2));
        ask(&mut vl, t1 + Duration::from_millis(600), heartbeat_at(4, 2));
        run_until(&mut vl, t1 + Duration::from_secs(1));
        let view = vl.view();
        assert_eq!(view.epoch, Epoch(empty.0 + 1), "one view change for both");
        assert_eq!(
            view.members.iter().map(|m| m.id).collect::<Vec<_>>(),
            [ServerId(3), ServerId(4)]
        );
    }

    /// Contract (epochs never go backwards, across restarts): a view leader that has heard no
    /// server yet, within `dead_after` of its start, answers `query_servers` with
    /// `rebalancing` (it may have restarted: the servers may know a newer epoch than its 0);
    /// once a server joins, or `dead_after` passes with nobody, it shows its view. Gathering
    /// answers `rebalancing` too. Discovery takes both answers as a view leader's.
    #[test]
    fn a_view_leader_with_no_view_yet_answers_rebalancing() {
        let t0 = Instant::now();
        let mut vl = leader();
        vl.handle_timeout(t0);
        let early = ask(
            &mut vl,
            t0 + Duration::from_millis(10),
            Request::QueryServers,
        );
        assert!(
            matches!(&early, Response::Error(e) if e.kind == ErrorKind::Rebalancing),
            "{early:?}"
        );
        assert!(early.is_from_viewleader());
        let alone = ask(&mut vl, t0 + Duration::from_secs(1), Request::QueryServers);
        assert!(
            matches!(&alone, Response::Servers { view, .. } if view.members.is_empty()),
            "{alone:?}"
        );
        let mut fresh = leader();
        fresh.handle_timeout(t0);
        ask(&mut fresh, t0, heartbeat(1));
        let joined = ask(&mut fresh, t0, Request::QueryServers);
        assert!(
            matches!(&joined, Response::Servers { view, .. } if view.epoch == Epoch(1)),
            "{joined:?}"
        );
        let mut restarted = leader();
        restarted.handle_timeout(t0);
        ask(&mut restarted, t0, heartbeat_at(1, 7));
        let gathering = ask(&mut restarted, t0, Request::QueryServers);
        assert!(matches!(&gathering, Response::Error(e) if e.kind == ErrorKind::Rebalancing));
        assert!(!Response::error(ErrorKind::BadInput, "a server").is_from_viewleader());
    }

    #[test]
    fn an_image_restores_the_same_state_on_another_origin() {
        let mut vl = leader();
        let t0 = Instant::now();
        for n in 1..=3 {
            ask(&mut vl, t0, heartbeat(n));
        }
        let lock = |requester: &str| Request::LockGet {
            lock: "L".into(),
            requester: requester.into(),
            claim: 1,
        };
        assert_eq!(ask(&mut vl, t0, lock("alice")), Response::LockGranted);
        // Server 3 falls silent and is declared dead.
        let t1 = t0 + Duration::from_millis(1500);
        for step in 1..=5 {
            let t = t0 + Duration::from_millis(300 * step);
            ask(&mut vl, t, heartbeat(1));
            ask(&mut vl, t, heartbeat(2));
        }
        let bob_asked = t1 - Duration::from_millis(50);
        assert!(matches!(
            ask(&mut vl, bob_asked, lock("bob")),
            Response::LockWaiting { .. }
        ));
        run_until(&mut vl, t1);
        assert_eq!(vl.view().members.len(), 2);
        let origin = t0 - Duration::from_secs(5);
        let image = vl.image(origin);
        let other_origin = Instant::now() + Duration::from_secs(100);
        let copy = ViewLeader::restore(vl.config.clone(), &image, other_origin);
        assert_eq!(
            copy.image(other_origin),
            image,
            "the image survives a round trip"
        );
        assert_eq!(copy.view(), vl.view());
        assert_eq!(copy.rebalancing(), vl.rebalancing());
        assert_eq!(copy.locks.holder("L"), Some("alice"));
        // Bob's wait expires a renewal timeout after its request, on the copy's clock too.
        let shift = other_origin - origin;
        let mut copy = copy;
        assert_eq!(copy.locks.entries(), 2, "alice holds, bob waits");
        run_until(&mut copy, bob_asked + shift + Duration::from_millis(1200));
        assert_eq!(copy.locks.entries(), 1, "bob's unrenewed wait expired");
        assert_eq!(copy.locks.holder("L"), Some("alice"));
        let bytes = crate::wire::codec::encode_body(&image).unwrap();
        let decoded: ViewLeaderImage = crate::wire::codec::decode_body(&bytes).unwrap();
        assert_eq!(decoded, image);
    }
}
