//! The simulated world: a view-leader group (of 1, 3 or 5 members), several servers, several
//! clients and a few lock clients, running the real state machines (`viewleader::group::Group`
//! with its `ViewLeader` and raft-rs inside, `Server`, the client's `Replicated` machine with
//! the `Setr`/`Getr` coordinators, and a reliable-layer `Endpoint` under each) in one thread,
//! in virtual time, over the crate's seeded network ([`trireme::faults::network::Network`]:
//! the product's `--faults` injector drops, duplicates, reorders and delays datagrams; the
//! network cuts links). Servers and clients crash and restart; so do group members (all their
//! memory lost: a group of one starts afresh, a member of a larger group must come back
//! refused). Hosts are frozen for a while (a member, or every server at once): a frozen host
//! runs no timers and handles nothing, and what is sent to it waits in its socket buffer,
//! handled in arrival order when it resumes, before any of its timers. The group's leader is
//! cut from every server, or from the other members, and the group is split. No sockets, no
//! wall clock, no threads: a seed replays a run.
//!
//! The world also watches what the checks need beyond the final state ([`Observed`]): which
//! server process ever held which version of each key, which processes crashed, the epochs
//! each server process, client incarnation and group member saw, the view each member applied
//! at each epoch, and when each lock client learned it holds a lock and when it let go.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use trireme::client::{self, Placement, Replicated, VIEWLEADER_ATTEMPT};
use trireme::faults::network::{Datagram, Network};
use trireme::faults::{FaultInjector, FaultSpec};
use trireme::placement::view::{Epoch, ServerId, View};
use trireme::reliable::{self, Endpoint, IncomingId, RequestError, RequestId};
use trireme::runtime::node::{self, Node, NodeNet};
use trireme::runtime::trace::{Direction, Entry};
use trireme::server::{Server, ServerConfig};
use trireme::txn::coordinator::{Getr, Operation, Setr, SetrHooks};
use trireme::util::rng::Rng;
use trireme::viewleader::group::{Group, GroupConfig, MemberRole};
use trireme::viewleader::{ViewLeader, ViewLeaderConfig};
use trireme::wire::auth::{Auth, ClusterKey, WallClock};
use trireme::wire::codec::{Header, Kind};
use trireme::wire::message::{ErrorKind, OpError, Response, TxId};

use crate::checks;
use crate::locker::{LockActor, LockEvent};

/// Everything a run does, drawn from its seed.
#[derive(Clone, Debug)]
pub struct Params {
    /// The seed.
    pub seed: u64,
    /// Servers at the start.
    pub servers: usize,
    /// Clients.
    pub clients: usize,
    /// Size of the key space (small, so that operations collide).
    pub keys: usize,
    /// Replication count.
    pub replicas: u32,
    /// Ring points per server.
    pub vnodes: u32,
    /// How long clients issue operations and faults are injected.
    pub active: Duration,
    /// One-way delay of every datagram.
    pub latency: Duration,
    /// Extra random delay, up to this.
    pub jitter: Duration,
    /// Probability a datagram is lost.
    pub loss: f64,
    /// Probability a datagram is delivered twice.
    pub dup: f64,
    /// Probability a datagram is held back (delivered after later ones).
    pub reorder: f64,
    /// Mean time between fault events (server crash, cut, client kill, and now and then a
    /// membership fault: see [`Fault`]), if any.
    pub chaos_every: Option<Duration>,
    /// Bound of every client operation.
    pub op_timeout: Duration,
    /// Longest pause a setr takes between the votes and the decision (0: none).
    pub pause_before_commit: Duration,
    /// Longest think time of a client between operations.
    pub think: Duration,
    /// Server heartbeat interval.
    pub heartbeat: Duration,
    /// The view leader's failure detector.
    pub dead_after: Duration,
    /// Every host seals its datagrams with a cluster key (and checks its peers').
    pub keyed: bool,
    /// Share of operations run with `--wait` (waiting out rebalancing; a read refused as
    /// `rebalancing` retried on a fresh view).
    pub wait: f64,
    /// Members of the view-leader group: 1 (a group of one, about half the seeds), 3 or 5.
    pub group: usize,
    /// Lock clients (0 to 3), each taking one of two locks at a time.
    pub lockers: usize,
}

/// The wall-clock time (µs since the Unix epoch) a simulation starts at.
const SIM_WALL_START: u64 = 1_750_000_000_000_000;

impl Params {
    /// The network faults of the active period, as a `--faults` spec: the run's delay,
    /// jitter, loss, duplication and reordering.
    pub fn faults(&self) -> FaultSpec {
        FaultSpec {
            loss: self.loss,
            dup: self.dup,
            reorder: self.reorder,
            delay: self.latency,
            jitter: self.jitter,
            seed: None,
        }
    }

    /// The parameters of run `seed`: a mix of quiet runs and runs with every fault.
    pub fn from_seed(seed: u64) -> Params {
        let mut rng = Rng::seeded(seed ^ 0x5157_0000_0000_0000);
        let replicas = if rng.chance(0.25) { 2 } else { 3 };
        let servers = replicas as usize + rng.below(3) as usize;
        let faulty = !rng.chance(0.1);
        let ms =
            |rng: &mut Rng, lo: u64, hi: u64| Duration::from_millis(lo + rng.below(hi - lo + 1));
        Params {
            seed,
            servers,
            clients: 2 + rng.below(3) as usize,
            keys: 1 + rng.below(4) as usize,
            replicas,
            vnodes: 8,
            active: ms(&mut rng, 3_000, 8_000),
            latency: Duration::from_micros(50 + rng.below(2_000)),
            jitter: Duration::from_micros(rng.below(1_000)),
            loss: if faulty { rng.next_f64() * 0.15 } else { 0.0 },
            dup: if faulty { rng.next_f64() * 0.05 } else { 0.0 },
            reorder: if faulty { rng.next_f64() * 0.1 } else { 0.0 },
            chaos_every: faulty.then(|| ms(&mut rng, 300, 2_000)),
            op_timeout: ms(&mut rng, 1_000, 4_000),
            pause_before_commit: if rng.chance(0.5) {
                ms(&mut rng, 0, 400)
            } else {
                Duration::ZERO
            },
            think: ms(&mut rng, 1, 40),
            heartbeat: ms(&mut rng, 50, 300),
            dead_after: ms(&mut rng, 800, 2_000),
            // Drawn last, so that the other parameters of a seed stay what they were.
            keyed: rng.chance(0.5),
            wait: if rng.chance(0.5) { 0.5 } else { 0.0 },
            // Drawn after those, for the same reason.
            group: match rng.below(8) {
                0..=3 => 1,
                4..=6 => 3,
                _ => 5,
            },
            lockers: rng.below(4) as usize,
        }
    }
}

/// What became of one client operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// setr succeeded with this version.
    Written {
        /// The version committed.
        version: u64,
    },
    /// setr failed before any commit was sent: it had no effect.
    NotWritten(ErrorKind),
    /// setr failed (or its client died) after the commit was sent: it may have taken effect.
    MaybeWritten(Option<ErrorKind>),
    /// getr found this value.
    Found {
        /// The value.
        value: String,
        /// Its version.
        version: u64,
    },
    /// getr: no replica holds the key.
    Absent,
    /// getr failed (or its client died): it says nothing.
    ReadFailed(Option<ErrorKind>),
}

/// One client operation of the history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The client that ran it.
    pub client: usize,
    /// The key.
    pub key: String,
    /// For a setr, the value written; `None` for a getr.
    pub value: Option<String>,
    /// When it was invoked (virtual time since the start).
    pub invoked: Duration,
    /// When it returned (`None`: its client crashed first).
    pub completed: Option<Duration>,
    /// What it did.
    pub outcome: Outcome,
}

/// Counters of what a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams delivered (duplicates included).
    pub delivered: u64,
    /// Datagrams lost by the network or a cut link.
    pub dropped: u64,
    /// Datagrams duplicated.
    pub duplicated: u64,
    /// Datagrams held back to be reordered.
    pub reordered: u64,
    /// Server crashes.
    pub crashes: u64,
    /// Links cut.
    pub partitions: u64,
    /// Clients killed (with an operation running).
    pub client_kills: u64,
    /// Clients killed between the votes and the decision of a setr.
    pub kills_before_decision: u64,
    /// Runs with a cluster key (every datagram sealed and checked).
    pub keyed_runs: u64,
    /// `Retry` datagrams sent: replies held until the requester proved its address.
    pub retries: u64,
    /// Pauses of the group's leader (the view leader of a group of one) longer than
    /// dead-after ([`Fault::PauseLeader`]).
    pub vl_pauses: u64,
    /// Crashes of the group's leader, each followed by a restart with no memory
    /// ([`Fault::RestartLeader`]).
    pub vl_restarts: u64,
    /// Cuts between the group's leader and every server, longer than dead-after
    /// ([`Fault::CutLeader`]).
    pub vl_cuts: u64,
    /// Pauses of every server at once, longer than dead-after ([`Fault::PauseServers`]).
    pub all_server_pauses: u64,
    /// Server processes that took a fresh id without crashing (the view leader declared
    /// them dead and they rejoined).
    pub rejoins: u64,
    /// Datagrams lost because a frozen host's socket buffer was full.
    pub buffer_drops: u64,
    /// Client operations run with `--wait`.
    pub waiting_ops: u64,
    /// View requests beyond an operation's first: `--wait` polling a view that was
    /// rebalancing, or a read refused as `rebalancing` retried on a fresh view.
    pub view_retries: u64,
    /// Runs with a view-leader group of one.
    pub groups_of_one: u64,
    /// Runs with a view-leader group of three.
    pub groups_of_three: u64,
    /// Runs with a view-leader group of five.
    pub groups_of_five: u64,
    /// Followers frozen past the election timeout ([`Fault::PauseFollower`]).
    pub follower_pauses: u64,
    /// Followers crashed and restarted with no state ([`Fault::RestartFollower`]).
    pub follower_restarts: u64,
    /// Leaders cut from every other member ([`Fault::IsolateLeader`]).
    pub leader_isolations: u64,
    /// Splits of the group in two ([`Fault::SplitGroup`]).
    pub group_splits: u64,
    /// Group faults that left no majority of the group running and connected (the group is
    /// unavailable until they end: counted, not failed).
    pub without_majority: u64,
    /// Changes of the group's leader seen (elections that took over from another leader).
    pub leader_changes: u64,
    /// Lock grants lock clients received.
    pub lock_grants: u64,
    /// Lock requests given up (withdrawn at their bound, or failed).
    pub lock_give_ups: u64,
    /// Lock clients killed.
    pub locker_kills: u64,
}

impl Stats {
    /// Adds another run's counters to these.
    pub fn add(&mut self, other: &Stats) {
        self.sent += other.sent;
        self.delivered += other.delivered;
        self.dropped += other.dropped;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
        self.crashes += other.crashes;
        self.partitions += other.partitions;
        self.client_kills += other.client_kills;
        self.kills_before_decision += other.kills_before_decision;
        self.keyed_runs += other.keyed_runs;
        self.retries += other.retries;
        self.vl_pauses += other.vl_pauses;
        self.vl_restarts += other.vl_restarts;
        self.vl_cuts += other.vl_cuts;
        self.all_server_pauses += other.all_server_pauses;
        self.rejoins += other.rejoins;
        self.buffer_drops += other.buffer_drops;
        self.waiting_ops += other.waiting_ops;
        self.view_retries += other.view_retries;
        self.groups_of_one += other.groups_of_one;
        self.groups_of_three += other.groups_of_three;
        self.groups_of_five += other.groups_of_five;
        self.follower_pauses += other.follower_pauses;
        self.follower_restarts += other.follower_restarts;
        self.leader_isolations += other.leader_isolations;
        self.group_splits += other.group_splits;
        self.without_majority += other.without_majority;
        self.leader_changes += other.leader_changes;
        self.lock_grants += other.lock_grants;
        self.lock_give_ups += other.lock_give_ups;
        self.locker_kills += other.locker_kills;
    }
}

/// A server's bucket as the checks see it: key → (version, value).
pub type Bucket = BTreeMap<String, (u64, String)>;

/// The cluster at the end of a run, for the invariants.
#[derive(Clone, Debug)]
pub struct Final {
    /// The group's final view (its leader's), as a placement.
    pub placement: Placement,
    /// Each live server's id, bucket (reconciled entries only), and undecided transactions.
    pub servers: Vec<(ServerId, Bucket, usize)>,
    /// Entries still kept as candidates (not reconciled since a rejoin): server id, key.
    pub candidates: Vec<(ServerId, String)>,
    /// What the world saw during the run.
    pub observed: Observed,
    /// Virtual time at the end.
    pub at: Duration,
    /// The group's members at the end (those running).
    pub members: Vec<MemberState>,
}

/// A group member at the end of a run, for the agreement check.
#[derive(Clone, Debug)]
pub struct MemberState {
    /// Its slot (its place in `--peers`).
    pub slot: usize,
    /// `leader`, `follower` or `candidate` (taking part), `joining` or `refused`.
    pub phase: &'static str,
    /// It was restarted with no state in a group of 3 or 5: it must be refused.
    pub restarted: bool,
    /// The view it applied.
    pub view: View,
    /// Whether its applied view is still rebalancing.
    pub rebalancing: bool,
}

/// One server process (from its start to its crash; a rejoin under a fresh id is the same
/// process) as the world saw it.
#[derive(Clone, Debug, Default)]
pub struct ServerProcess {
    /// Its host slot.
    pub slot: usize,
    /// The ids it ran under, in order (more than one: it was declared dead and rejoined).
    pub ids: Vec<ServerId>,
    /// It crashed: its memory is lost.
    pub crashed: bool,
    /// The epochs it reported ([`Server::epoch`]), each change with when it was seen.
    pub epochs: Vec<(Duration, u64)>,
}

/// One client incarnation (from its start to its kill) as the world saw it.
#[derive(Clone, Debug, Default)]
pub struct ClientLife {
    /// Its client slot.
    pub index: usize,
    /// The epochs of the views it received from the view leader, each change with when.
    pub epochs: Vec<(Duration, u64)>,
}

/// What the world saw during a run, beyond the final state: for the durability invariant
/// (who held what, who crashed) and the monotone-epoch check.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Server processes by number (numbered from 1 in start order).
    pub servers: BTreeMap<u64, ServerProcess>,
    /// Client incarnations by life number.
    pub clients: BTreeMap<u64, ClientLife>,
    /// Key → server process → the highest version that process ever held in its bucket
    /// (candidate or not), with the value it first held at that version.
    pub held: BTreeMap<String, BTreeMap<u64, (u64, String)>>,
    /// Copies found missing at a stable point (the view leader had every server finish the
    /// current epoch, with no transaction in flight): when, and what was missing. The crash
    /// budget counts on every key having all its copies there.
    pub unstable: Vec<(Duration, String)>,
    /// Group member lives by number (numbered from 1 in start order; a restart is a new one).
    pub members: BTreeMap<u64, MemberLife>,
    /// The view applied at each epoch of each view-leader generation, with who was first
    /// seen with it: every member (and every client, in a group of 3 or 5) that saw that
    /// epoch must have seen the same view.
    pub views: BTreeMap<(u64, u64), (View, String)>,
    /// Views that differed from the one first seen at their epoch: when, and what.
    pub view_conflicts: Vec<(Duration, String)>,
    /// What the lock clients learned and did, in order.
    pub locks: Vec<LockEvent>,
}

/// One life of a group member (from its start to its crash) as the world saw it.
#[derive(Clone, Debug, Default)]
pub struct MemberLife {
    /// Its slot.
    pub slot: usize,
    /// The epochs of the view it applied, each change with when.
    pub epochs: Vec<(Duration, u64)>,
}

impl Observed {
    /// Notes what server process `process` (at `slot`) holds and reports at `at`; returns the
    /// id it ran under before if it has just taken a fresh one (a rejoin).
    fn see_server(
        &mut self,
        process: u64,
        slot: usize,
        at: Duration,
        server: &Server,
    ) -> Option<ServerId> {
        for (key, stored) in server.bucket() {
            let held = match self.held.get_mut(key) {
                Some(held) => held,
                None => self.held.entry(key.to_owned()).or_default(),
            };
            match held.get_mut(&process) {
                Some(most) if most.0 >= stored.version => {}
                Some(most) => *most = (stored.version, stored.value.clone()),
                None => {
                    held.insert(process, (stored.version, stored.value.clone()));
                }
            }
        }
        let seen = self
            .servers
            .entry(process)
            .or_insert_with(|| ServerProcess {
                slot,
                ..ServerProcess::default()
            });
        let epoch = server.epoch().0;
        if seen.epochs.last().is_none_or(|&(_, last)| last != epoch) {
            seen.epochs.push((at, epoch));
        }
        let id = server.id();
        let previous = seen.ids.last().copied();
        if previous != Some(id) {
            seen.ids.push(id);
        }
        previous.filter(|&old| old != id)
    }

    /// Notes that `who` saw `view` at `at` in view-leader generation `generation`: the first
    /// view seen at an epoch is the one every later sighting must equal.
    pub fn see_view(
        &mut self,
        generation: u64,
        view: &View,
        at: Duration,
        who: impl FnOnce() -> String,
    ) {
        match self.views.get(&(generation, view.epoch.0)) {
            Some((first, _)) if first == view => {}
            Some((first, by)) => {
                let conflict = format!(
                    "{} saw epoch {} as {}, but {by} saw it as {}",
                    who(),
                    view.epoch,
                    describe_view(view),
                    describe_view(first)
                );
                self.view_conflicts.push((at, conflict));
            }
            None => {
                self.views
                    .insert((generation, view.epoch.0), (view.clone(), who()));
            }
        }
    }

    /// Notes that client incarnation `life` (slot `index`) received a view of `epoch` at `at`.
    fn see_client_view(&mut self, life: u64, index: usize, at: Duration, epoch: u64) {
        let seen = self.clients.entry(life).or_insert_with(|| ClientLife {
            index,
            ..ClientLife::default()
        });
        if seen.epochs.last().is_none_or(|&(_, last)| last != epoch) {
            seen.epochs.push((at, epoch));
        }
    }
}

/// The servers of a view as a short line, for messages.
pub fn describe_view(view: &View) -> String {
    let members: Vec<String> = view
        .members
        .iter()
        .map(|m| format!("{}@{}", m.id, m.addr))
        .collect();
    format!("[{}]", members.join(" "))
}

/// A fault of the membership service (the view-leader group), injected by the chaos schedule
/// now and then (or by a scenario test at a chosen instant). None of them may lose an
/// acknowledged write: no server process loses its memory. "The leader" is the group's
/// leader (the view leader itself in a group of one); the last four need a group of 3 or 5.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The leader's host is frozen this long (longer than dead-after).
    PauseLeader(Duration),
    /// The leader crashes and starts again on the same address after `down`, as a fresh
    /// `Group` with no data dir on a fresh endpoint incarnation (no memory): a group of one
    /// starts afresh, a member of a larger group must be refused.
    RestartLeader {
        /// How long nobody listens at its address.
        down: Duration,
    },
    /// Every link between the leader and a server is cut this long (longer than dead-after),
    /// then healed.
    CutLeader(Duration),
    /// Every running server's host is frozen this long (longer than dead-after).
    PauseServers(Duration),
    /// A follower's host is frozen this long (past the election timeout).
    PauseFollower(Duration),
    /// A follower crashes and starts again with no state after `down` (it must be refused).
    RestartFollower {
        /// How long nobody listens at its address.
        down: Duration,
    },
    /// Every link between the leader and the other members is cut this long.
    IsolateLeader(Duration),
    /// The group is split in two sides (a minority and a majority, the leader on either) for
    /// this long: every link between the sides is cut.
    SplitGroup(Duration),
    /// The first running server crashes and starts again (a fresh id, an empty bucket) after
    /// `down` (issue 17's scenario: one departure, then one join).
    CrashServer {
        /// How long nobody listens at its address.
        down: Duration,
    },
}

/// Something scheduled.
#[derive(Debug)]
enum Scheduled {
    /// The OS of `to` reports `peer` unreachable (an ICMP port unreachable came back).
    Unreachable {
        /// Who learns it.
        to: SocketAddr,
        /// The peer nobody listens at.
        peer: SocketAddr,
    },
    /// A fault: crash a server, cut a link, kill a client, or a membership fault.
    Chaos,
    /// A given membership fault (a scenario's).
    Fault(Fault),
    /// Server slot `0` starts again (with a fresh id and an empty bucket).
    RestartServer(usize),
    /// Group member slot `0` starts again (a fresh `Group` with no data dir, a fresh
    /// endpoint incarnation).
    RestartMember(usize),
    /// Client slot `0` starts again.
    RestartClient(usize),
    /// The frozen host at `slot` resumes, if it is still frozen by pause number `pause`.
    Resume {
        /// The host's slot.
        slot: usize,
        /// The pause this ends (a pause ended early by a crash must not end a later one).
        pause: u64,
    },
}

/// What reaches a frozen host, kept in order until it resumes.
#[derive(Debug)]
enum Inbound {
    /// A datagram from `from`.
    Datagram {
        /// Sender.
        from: SocketAddr,
        /// The bytes.
        payload: Vec<u8>,
    },
    /// The OS reports `peer` unreachable (an ICMP error in the socket's error queue).
    Unreachable {
        /// The peer nobody listens at.
        peer: SocketAddr,
    },
}

/// A frozen host: no timers, no handling; what arrives waits in its socket buffer.
#[derive(Debug)]
struct Pause {
    /// The pause's number (see [`Scheduled::Resume`]).
    id: u64,
    /// What arrived, in arrival order.
    inbox: Vec<Inbound>,
    /// Payload bytes in `inbox` (bounded by [`SOCKET_BUFFER`]).
    bytes: usize,
}

/// The receive buffer of a frozen host's socket, in payload bytes: what the programs ask of
/// the kernel (`net::SOCKET_BUFFER`). Datagrams beyond it are lost, as on a real socket.
const SOCKET_BUFFER: usize = 4 << 20;

/// The chance that a chaos event is a membership fault ([`Fault`]) rather than a server
/// crash, a cut or a client kill, with a group of one.
const MEMBERSHIP_FAULT_CHANCE: f64 = 0.08;

/// The same with a group of 3 or 5 (whose faults come in eight kinds).
const GROUP_FAULT_CHANCE: f64 = 0.3;

/// The application a host runs.
enum App {
    /// A member of the view-leader group.
    Member(Box<Group>),
    /// A server.
    Server(Box<Server>),
    /// A client.
    Client(Box<ClientActor>),
    /// A lock client.
    Locker(Box<LockActor>),
}

/// One simulated process: its address, its reliable endpoint and its application.
struct Host {
    /// Its address.
    addr: SocketAddr,
    /// For a server, its process number (see [`Observed::servers`]); for a group member, its
    /// life number (see [`Observed::members`]); 0 for other hosts.
    process: u64,
    /// Its reliable layer.
    endpoint: Endpoint,
    /// What runs on it.
    app: App,
    /// The application's tag for each request it started.
    tokens: BTreeMap<RequestId, u64>,
}

/// The operation a client is running: the product's own client machine (the view step,
/// `--wait`'s polling and a refused read's retry, then the coordinator).
enum Op {
    /// A setr.
    Setr(Box<Replicated<Setr>>),
    /// A getr.
    Getr(Box<Replicated<Getr>>),
}

impl Op {
    /// The view the operation's coordinator ran on, once the view step gave one.
    fn placement(&self) -> Option<&Placement> {
        match self {
            Op::Setr(op) => op.placement(),
            Op::Getr(op) => op.placement(),
        }
    }
}

/// The operation in progress at a client.
struct Running {
    /// Its sequence number at the client (late answers of earlier operations are ignored).
    seq: u64,
    /// The key.
    key: String,
    /// The value, for a setr.
    value: Option<String>,
    /// When it was invoked.
    invoked: Instant,
    /// The client machine.
    op: Op,
    /// Run with `--wait`.
    wait: bool,
    /// Why it failed, if it did (for the log).
    error: Option<String>,
}

/// A client: runs one operation at a time against random keys, recording each.
struct ClientActor {
    /// Its slot.
    index: usize,
    /// Which start of this slot it is (values written stay unique across restarts).
    life: u64,
    /// The view-leader member it asks first: the group's leader once an answer named it, or
    /// the next member once one failed (as `Client` keeps it across a command's steps).
    viewleader: SocketAddr,
    /// Every member of the view-leader group, in `--viewleader` order.
    members: Vec<SocketAddr>,
    /// Members whose view request failed (`timeout`, `unreachable`, or refused), most recent
    /// last: asked last.
    failed: Vec<SocketAddr>,
    /// Its random source (keys, values, think times, and, when a setr's coordinator is
    /// built on a view, its pause and txid: shared with that build, which must be `Send`
    /// like every operation, hence a mutex in this single-threaded world).
    rng: Arc<Mutex<Rng>>,
    /// When to start the next operation (`None`: running one, or stopped).
    next_op: Option<Instant>,
    /// The operation in progress.
    running: Option<Running>,
    /// Operations started so far.
    seq: u64,
    /// No new operations (the quiet period at the end of a run).
    stopped: bool,
    /// Operations finished since the world last collected them.
    done: Vec<(Running, Instant, Outcome)>,
    /// Epochs of the views received since the world last collected them, with when.
    views: Vec<(Instant, u64)>,
    /// The newest epoch this client operated on (as `Client`: an older view is refused).
    epoch_floor: Epoch,
    /// The run's parameters.
    params: Params,
}

/// Token bits: the operation's sequence number above, the client machine's token below.
const SEQ_SHIFT: u32 = 32;

impl ClientActor {
    /// Starts the next operation if its time has come, else passes the machine its timer.
    fn handle_timeout(
        &mut self,
        now: Instant,
        endpoint: &mut Endpoint,
        tokens: &mut BTreeMap<RequestId, u64>,
    ) {
        if let Some(at) = self.next_op
            && now >= at
        {
            self.next_op = None;
            self.start(now);
        } else if let Some(running) = &mut self.running {
            match &mut running.op {
                Op::Setr(op) => op.handle_timeout(now),
                Op::Getr(op) => op.handle_timeout(now),
            }
        }
        self.drive(now, endpoint, tokens);
    }

    /// When the client next has timed work.
    fn poll_timeout(&self) -> Option<Instant> {
        let op = self.running.as_ref().and_then(|r| match &r.op {
            Op::Setr(op) => op.poll_timeout(),
            Op::Getr(op) => op.poll_timeout(),
        });
        [self.next_op, op].into_iter().flatten().min()
    }

    /// Invokes a random operation: a setr of a fresh value or a getr, on a random key, half
    /// of them with `--wait`.
    fn start(&mut self, now: Instant) {
        self.seq += 1;
        let mut rng = self.rng.lock().expect("one thread");
        let key = format!("k{}", rng.below(self.params.keys as u64));
        let value = rng
            .chance(0.5)
            .then(|| format!("c{}.{}-{}", self.index, self.life, self.seq));
        // Drawn only in runs with --wait, so that the others replay as they did before.
        let wait = self.params.wait > 0.0 && rng.chance(self.params.wait);
        drop(rng);
        let deadline = Some(now + self.params.op_timeout);
        let timeout = Some(self.params.op_timeout);
        let floor = self.epoch_floor;
        let op = match &value {
            Some(value) => {
                let pause = self.params.pause_before_commit;
                let (key, value, rng) = (key.clone(), value.clone(), Arc::clone(&self.rng));
                // The pause and the txid are drawn when the view step hands over a view.
                let build = move |now: Instant, placement: &Placement| {
                    let mut rng = rng.lock().expect("one thread");
                    let hooks = SetrHooks {
                        pause_before_commit: if pause.is_zero() {
                            Duration::ZERO
                        } else {
                            Duration::from_micros(rng.below(pause.as_micros() as u64 + 1))
                        },
                        ..SetrHooks::default()
                    };
                    let txid = TxId::random(&mut rng);
                    Setr::new(now, &key, &value, placement, txid, deadline, timeout, hooks)
                };
                Op::Setr(Box::new(self.with_fallbacks(
                    now,
                    Replicated::new(
                        self.viewleader,
                        deadline,
                        timeout,
                        wait,
                        false,
                        floor,
                        build,
                    ),
                )))
            }
            None => {
                let key = key.clone();
                let build = move |now: Instant, placement: &Placement| {
                    Getr::new(now, &key, placement, deadline, timeout)
                };
                Op::Getr(Box::new(self.with_fallbacks(
                    now,
                    Replicated::new(self.viewleader, deadline, timeout, wait, true, floor, build),
                )))
            }
        };
        self.running = Some(Running {
            seq: self.seq,
            key,
            value,
            invoked: now,
            op,
            wait,
            error: None,
        });
    }

    /// Lets `op`'s view step fall back on the other members (those that failed last), as
    /// `Client` does; nothing changes with a group of one.
    fn with_fallbacks<O: Operation>(&self, now: Instant, op: Replicated<O>) -> Replicated<O> {
        let (fresh, failed): (Vec<SocketAddr>, Vec<SocketAddr>) = self
            .members
            .iter()
            .filter(|&&m| m != self.viewleader)
            .partition(|m| !self.failed.contains(m));
        if fresh.is_empty() && failed.is_empty() {
            return op;
        }
        let order = fresh.into_iter().chain(failed).collect();
        op.with_fallbacks(now, order, VIEWLEADER_ATTEMPT)
    }

    /// After an operation: keeps the member its view step ended on (the group's leader if an
    /// answer named it), puts the members that failed last, and gives up a member that
    /// answered `unreachable` itself (a member refused after a restart without its state).
    fn follow(&mut self, asked: SocketAddr, failed: &[SocketAddr], refused: bool) {
        if self.members.len() < 2 {
            return;
        }
        let mut gone: Vec<SocketAddr> = failed.to_vec();
        if refused {
            gone.push(asked);
        }
        self.failed.retain(|m| !gone.contains(m) && *m != asked);
        self.failed.extend(gone.iter().copied());
        self.viewleader = if refused {
            self.members
                .iter()
                .copied()
                .find(|m| !self.failed.contains(m))
                .unwrap_or(self.failed[0])
        } else {
            asked
        };
    }

    /// The outcome of a request this client sent.
    fn handle_response(
        &mut self,
        now: Instant,
        token: u64,
        result: Result<Response, RequestError>,
        endpoint: &mut Endpoint,
        tokens: &mut BTreeMap<RequestId, u64>,
    ) {
        let Some(running) = &mut self.running else {
            return;
        };
        if token >> SEQ_SHIFT != running.seq {
            return; // a late answer to an earlier operation
        }
        let token = token & ((1 << SEQ_SHIFT) - 1);
        match &mut running.op {
            Op::Setr(op) => op.handle_response(now, token, result),
            Op::Getr(op) => op.handle_response(now, token, result),
        }
        self.drive(now, endpoint, tokens);
    }

    /// Sends what the machine asks for, notes the views it received, and collects its
    /// outcome.
    fn drive(
        &mut self,
        now: Instant,
        endpoint: &mut Endpoint,
        tokens: &mut BTreeMap<RequestId, u64>,
    ) {
        let Some(running) = &mut self.running else {
            return;
        };
        let seq = running.seq;
        let error = &mut running.error;
        let (outcome, views, floor, asked) = match &mut running.op {
            Op::Setr(op) => {
                let outcome =
                    pump(op.as_mut(), now, endpoint, tokens, seq).map(|result| match result {
                        Ok(done) => Outcome::Written {
                            version: done.version,
                        },
                        Err(e) => {
                            *error = Some(e.message);
                            if op.coordinator().is_some_and(Setr::is_decision_sent) {
                                Outcome::MaybeWritten(Some(e.kind))
                            } else {
                                Outcome::NotWritten(e.kind)
                            }
                        }
                    });
                let asked = (op.viewleader(), op.failed_viewleaders().to_vec());
                (outcome, op.take_views(), op.floor(), asked)
            }
            Op::Getr(op) => {
                let outcome =
                    pump(op.as_mut(), now, endpoint, tokens, seq).map(|result| match result {
                        Ok(found) => Outcome::Found {
                            value: found.value,
                            version: found.version,
                        },
                        Err(e) if e.kind == ErrorKind::NotFound => Outcome::Absent,
                        Err(e) => {
                            *error = Some(e.message);
                            Outcome::ReadFailed(Some(e.kind))
                        }
                    });
                let asked = (op.viewleader(), op.failed_viewleaders().to_vec());
                (outcome, op.take_views(), op.floor(), asked)
            }
        };
        self.views
            .extend(views.into_iter().map(|epoch| (now, epoch.0)));
        self.epoch_floor = self.epoch_floor.max(floor);
        if let Some(outcome) = outcome {
            // The view step's own answer was `unreachable`: the member is refused.
            let refused = matches!(
                &outcome,
                Outcome::NotWritten(ErrorKind::Unreachable)
                    | Outcome::ReadFailed(Some(ErrorKind::Unreachable))
            ) && running.op.placement().is_none();
            self.follow(asked.0, &asked.1, refused);
            self.complete(now, outcome);
        }
    }

    /// Records the finished operation and schedules the next one.
    fn complete(&mut self, now: Instant, outcome: Outcome) {
        if let Some(running) = self.running.take() {
            self.done.push((running, now, outcome));
        }
        let think = Duration::from_micros(
            self.rng
                .lock()
                .expect("one thread")
                .below(self.params.think.as_micros() as u64 + 1),
        );
        self.next_op = (!self.stopped).then_some(now + think);
    }

    /// What the operation in progress leaves behind if the client dies now: a setr whose
    /// commit may be out may take effect; anything else has no effect.
    fn killed(&mut self) -> Option<(Running, Outcome)> {
        let running = self.running.take()?;
        let outcome = match &running.op {
            Op::Setr(op) if op.coordinator().is_some_and(Setr::is_decision_sent) => {
                Outcome::MaybeWritten(None)
            }
            Op::Setr(_) => Outcome::NotWritten(ErrorKind::Timeout),
            Op::Getr(_) => Outcome::ReadFailed(None),
        };
        Some((running, outcome))
    }

    /// True while a setr sits between its votes and its decision.
    fn is_between_votes_and_decision(&self) -> bool {
        matches!(&self.running, Some(Running { op: Op::Setr(op), .. }) if op.coordinator().is_some_and(Setr::is_between_votes_and_decision))
    }
}

/// Hands `op`'s requests to `endpoint` (tagged with the operation's `seq`), encoded as the
/// command-line client encodes them ([`client::encode`]), and returns its outcome once it
/// has one.
fn pump<O: Operation>(
    op: &mut O,
    now: Instant,
    endpoint: &mut Endpoint,
    tokens: &mut BTreeMap<RequestId, u64>,
    seq: u64,
) -> Option<Result<O::Output, OpError>> {
    while let Some(send) = op.poll_send() {
        debug_assert!(send.token < 1 << SEQ_SHIFT);
        let started = client::encode(&send).and_then(|body| {
            endpoint.request_with(now, send.dst, body, send.deadline, send.unacked_attempts)
        });
        match started {
            Ok(id) => {
                tokens.insert(id, (seq << SEQ_SHIFT) | send.token);
            }
            Err(e) => op.handle_response(now, send.token, Err(e)),
        }
    }
    op.poll_outcome()
}

/// A host's endpoint and request tags as the network under its node: the simulator runs the
/// same node glue as the driver thread ([`node::deliver_request`] and friends).
struct HostNet<'a> {
    /// The host's endpoint.
    endpoint: &'a mut Endpoint,
    /// The node's tag for each request it started.
    tokens: &'a mut BTreeMap<RequestId, u64>,
    /// Virtual now.
    now: Instant,
}

impl NodeNet for HostNet<'_> {
    /// Answers through the endpoint.
    fn respond(&mut self, id: IncomingId, body: Vec<u8>) {
        let _ = self.endpoint.respond(self.now, id, body);
    }

    /// Starts the request on the endpoint and remembers its tag.
    fn request(
        &mut self,
        dst: SocketAddr,
        body: Vec<u8>,
        deadline: Option<Instant>,
        token: u64,
    ) -> Result<(), RequestError> {
        let id = self.endpoint.request(self.now, dst, body, deadline)?;
        self.tokens.insert(id, token);
        Ok(())
    }
}

impl Host {
    /// A host at `addr` running `app`, with a fresh endpoint (a new incarnation) on `config`.
    fn new(addr: SocketAddr, app: App, config: reliable::Config, rng: &mut Rng) -> Host {
        Host {
            addr,
            process: 0,
            endpoint: Endpoint::new(config, rng),
            app,
            tokens: BTreeMap::new(),
        }
    }

    /// The node this host runs, if it is a group member or a server.
    fn node(app: &mut App) -> Option<&mut dyn Node> {
        match app {
            App::Member(member) => Some(member.as_mut()),
            App::Server(server) => Some(server.as_mut()),
            App::Client(_) | App::Locker(_) => None,
        }
    }

    /// When the host next has timed work.
    fn poll_timeout(&self) -> Option<Instant> {
        let app = match &self.app {
            App::Member(member) => member.poll_timeout(),
            App::Server(server) => server.poll_timeout(),
            App::Client(client) => client.poll_timeout(),
            App::Locker(locker) => locker.poll_timeout(),
        };
        [self.endpoint.poll_timeout(), app]
            .into_iter()
            .flatten()
            .min()
    }

    /// Runs the due timers of the endpoint and the application.
    fn handle_timeout(&mut self, now: Instant) {
        if self.endpoint.poll_timeout().is_some_and(|at| at <= now) {
            self.endpoint.handle_timeout(now);
        }
        let Host {
            endpoint,
            app,
            tokens,
            ..
        } = self;
        match app {
            App::Client(client) => {
                if client.poll_timeout().is_some_and(|at| at <= now) {
                    client.handle_timeout(now, endpoint, tokens);
                }
            }
            App::Locker(locker) => {
                if locker.poll_timeout().is_some_and(|at| at <= now) {
                    locker.handle_timeout(now, endpoint, tokens);
                }
            }
            node => {
                if let Some(node) = Host::node(node)
                    && node.poll_timeout().is_some_and(|at| at <= now)
                {
                    node.handle_timeout(now);
                    let mut net = HostNet {
                        endpoint,
                        tokens,
                        now,
                    };
                    node::carry_out(node, now, &mut net);
                }
            }
        }
    }

    /// Hands the endpoint's events to the application and carries out what it asks, until
    /// nothing is left; returns the datagrams to send.
    fn pump(&mut self, now: Instant, out: &mut Vec<(SocketAddr, Vec<u8>)>) {
        loop {
            let mut busy = false;
            while let Some(event) = self.endpoint.poll_event() {
                busy = true;
                self.handle_event(now, event);
            }
            while let Some(transmit) = self.endpoint.poll_transmit() {
                busy = true;
                out.push((transmit.dst, transmit.payload));
            }
            if !busy {
                return;
            }
        }
    }

    /// One endpoint event: a request for the node, or the outcome of one of our requests.
    fn handle_event(&mut self, now: Instant, event: reliable::Event) {
        let Host {
            endpoint,
            app,
            tokens,
            ..
        } = self;
        match (event, app) {
            (reliable::Event::Request { id, .. }, App::Client(_) | App::Locker(_)) => {
                let answer = Response::error(ErrorKind::BadInput, "a client serves nothing");
                if let Ok(body) = answer.encode() {
                    let _ = endpoint.respond(now, id, body);
                }
            }
            (reliable::Event::Response { id, result }, App::Client(client)) => {
                if let Some(token) = tokens.remove(&id) {
                    let result = result.map(|body| Response::decode_or_error(&body));
                    client.handle_response(now, token, result, endpoint, tokens);
                }
            }
            (reliable::Event::Response { id, result }, App::Locker(locker)) => {
                if let Some(token) = tokens.remove(&id) {
                    let result = result.map(|body| Response::decode_or_error(&body));
                    locker.handle_response(now, token, result, endpoint, tokens);
                }
            }
            (event, node) => {
                let Some(node) = Host::node(node) else {
                    return;
                };
                let token = match &event {
                    reliable::Event::Response { id, .. } => tokens.remove(id),
                    reliable::Event::Request { .. } => None,
                };
                let mut net = HostNet {
                    endpoint,
                    tokens,
                    now,
                };
                match event {
                    reliable::Event::Request { from, id, body } => {
                        node::deliver_request(node, now, from, id, &body, &mut net);
                    }
                    reliable::Event::Response { result, .. } => {
                        if let Some(token) = token {
                            node::deliver_reply(node, now, token, result, &mut net);
                        }
                    }
                }
            }
        }
    }
}

/// A simulated cluster and its network.
pub struct World {
    /// The run's parameters.
    pub params: Params,
    /// Virtual time 0.
    start: Instant,
    /// Virtual now.
    now: Instant,
    /// The fault schedule's random source.
    rng: Rng,
    /// The network: datagrams in flight, their faults, and cut links.
    net: Network,
    /// The group's members first, then servers, then clients, then lock clients (`None`:
    /// crashed).
    hosts: Vec<Option<Host>>,
    /// Each host slot's address.
    addrs: Vec<SocketAddr>,
    /// Scheduled events other than deliveries, by (time, sequence).
    queue: BTreeMap<(Instant, u64), Scheduled>,
    /// Next event sequence number.
    seq: u64,
    /// Frozen hosts by slot (`None`: running, or not there).
    paused: Vec<Option<Pause>>,
    /// Pauses so far (numbers them).
    pauses: u64,
    /// Server processes started so far (numbers them).
    processes: u64,
    /// Group member lives started so far (numbers them).
    member_lives: u64,
    /// The view-leader generation: a group of one restarted with no memory starts a new one
    /// (a group of 3 or 5 keeps its log in the majority that runs, so it has one).
    generation: u64,
    /// Per member slot: restarted with no state in a group of 3 or 5 (refused for good).
    lost: Vec<bool>,
    /// The leader slot last seen (for counting leader changes).
    leader_seen: Option<usize>,
    /// What the checks need beyond the final state.
    observed: Observed,
    /// Faults are still being injected.
    chaos: bool,
    /// Client starts so far (each start of a client slot is a new life).
    lives: u64,
    /// Server crashes since the cluster was last stable (nothing else loses data: view-leader
    /// faults, pauses, cuts and the declarations they cause never do).
    failures: u32,
    /// A membership fault was injected and the cluster has not been stable since.
    membership_fault: bool,
    /// Holders of each key when the cluster was last stable: min(replicas, servers in view).
    holders: u32,
    /// Every datagram sent and received, when tracing.
    trace: Option<Vec<Entry>>,
    /// The history of client operations.
    pub history: Vec<Record>,
    /// What happened (the network's counters are added by [`World::stats`]).
    stats: Stats,
    /// A digest of every delivery and outcome (two runs of a seed must agree on it).
    pub digest: u64,
    /// Print what happens (operations, faults, views) on stderr, for replaying a failure.
    pub verbose: bool,
    /// The last epoch the group's leader was seen at (for the log).
    seen_epoch: u64,
    /// The claims a killed lock client wrote down, by slot, for its next life.
    locker_claims: BTreeMap<usize, BTreeMap<String, u64>>,
}

/// A group member's phase for messages and the checks: `leader`, `follower` or `candidate`
/// (taking part), `joining` (asking its peers) or `refused`.
fn member_phase(member: &Group) -> &'static str {
    match member.role() {
        MemberRole::Leader => "leader",
        MemberRole::Follower => "follower",
        MemberRole::Candidate => "candidate",
        MemberRole::Joining => "joining",
        MemberRole::Refused => "refused",
    }
}

/// The seed of group member `member`'s first life in run `seed` (not drawn from the run's
/// generator, so that adding the group left the other hosts' draws as they were).
fn member_seed(seed: u64, member: usize) -> u64 {
    (seed ^ 0x6772_6f75_7000_0000).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ member as u64
}

impl World {
    /// A world for `params`: the group, the servers, the clients and the lock clients, all
    /// started at virtual time 0. With `trace`, every datagram is recorded for
    /// [`World::trace`].
    pub fn new(params: Params, trace: bool) -> World {
        let mut rng = Rng::seeded(params.seed);
        let net = Network::new(FaultInjector::with_rng(params.faults(), rng.fork()));
        let start = Instant::now();
        let mut addrs: Vec<SocketAddr> = (0..params.group)
            .map(|i| SocketAddr::from(([10, 0, 0, 1 + i as u8], 39000)))
            .collect();
        addrs.extend(
            (0..params.servers).map(|i| SocketAddr::from(([10, 0, 1, 1 + i as u8], 38000))),
        );
        addrs.extend(
            (0..params.clients).map(|i| SocketAddr::from(([10, 0, 2, 1 + i as u8], 40000))),
        );
        addrs.extend(
            (0..params.lockers).map(|i| SocketAddr::from(([10, 0, 3, 1 + i as u8], 41000))),
        );
        let mut stats = Stats {
            keyed_runs: u64::from(params.keyed),
            ..Stats::default()
        };
        match params.group {
            1 => stats.groups_of_one = 1,
            3 => stats.groups_of_three = 1,
            _ => stats.groups_of_five = 1,
        }
        let mut world = World {
            hosts: Vec::new(),
            paused: addrs.iter().map(|_| None).collect(),
            addrs,
            start,
            now: start,
            queue: BTreeMap::new(),
            seq: 0,
            net,
            pauses: 0,
            processes: 0,
            member_lives: 0,
            generation: 0,
            lost: vec![false; params.group],
            leader_seen: None,
            observed: Observed::default(),
            chaos: true,
            lives: 0,
            failures: 0,
            membership_fault: false,
            holders: 0,
            locker_claims: BTreeMap::new(),
            trace: trace.then(Vec::new),
            history: Vec::new(),
            stats,
            digest: 0xcbf2_9ce4_8422_2325,
            verbose: false,
            seen_epoch: 0,
            params,
            rng: Rng::seeded(0),
        };
        for slot in 0..world.params.group {
            let seed = member_seed(world.params.seed, slot);
            let host = world.member_host(slot, seed, &mut rng);
            world.hosts.push(Some(host));
        }
        for slot in world.first_server()..world.first_client() {
            let host = world.server_host(slot, &mut rng);
            world.hosts.push(Some(host));
        }
        for slot in world.first_client()..world.first_locker() {
            let host = world.client_host(slot, &mut rng);
            world.hosts.push(Some(host));
        }
        for slot in world.first_locker()..world.addrs.len() {
            // Not drawn from the run's generator either (a run without lock clients draws
            // what it drew before they existed).
            let mut locker_rng = Rng::seeded(member_seed(world.params.seed, 1000 + slot));
            let host = world.locker_host(slot, &mut locker_rng, None);
            world.hosts.push(Some(host));
        }
        world.rng = rng;
        if let Some(every) = world.params.chaos_every {
            let at = start + every;
            world.schedule(at, Scheduled::Chaos);
        }
        world
    }

    /// The first server slot (after the group's members).
    fn first_server(&self) -> usize {
        self.params.group
    }

    /// The first client slot.
    fn first_client(&self) -> usize {
        self.first_server() + self.params.servers
    }

    /// The first lock client slot.
    fn first_locker(&self) -> usize {
        self.first_client() + self.params.clients
    }

    /// The group's members' addresses, in `--peers` order.
    fn members(&self) -> Vec<SocketAddr> {
        self.addrs[..self.params.group].to_vec()
    }

    /// A fresh life of group member `slot` (no data dir: no memory) seeded with `seed`, on a
    /// fresh endpoint incarnation: a group of one takes part at once (epoch 0, an empty
    /// view), a member of a larger group first asks its peers.
    fn member_host(&mut self, slot: usize, seed: u64, rng: &mut Rng) -> Host {
        let vl = ViewLeaderConfig {
            dead_after: self.params.dead_after,
            replicas: self.params.replicas,
            vnodes: self.params.vnodes,
            ..ViewLeaderConfig::default()
        };
        let config = GroupConfig {
            peers: if self.params.group > 1 {
                self.members()
            } else {
                Vec::new()
            },
            me: slot,
            seed,
            ..GroupConfig::default()
        };
        let member = Group::start(vl, config, self.now).expect("a valid group");
        let config = self.endpoint_config();
        let mut host = Host::new(self.addrs[slot], App::Member(Box::new(member)), config, rng);
        self.member_lives += 1;
        host.process = self.member_lives;
        host
    }

    /// A fresh server process for `slot` (a new process number, a new id, an empty bucket, a
    /// new incarnation). With a group of one it heartbeats the view leader from the start;
    /// with a larger group it is given every member and finds the leader itself (as
    /// `server --viewleader A,B,C`).
    fn server_host(&mut self, slot: usize, rng: &mut Rng) -> Host {
        self.processes += 1;
        let (viewleader, candidates) = if self.params.group > 1 {
            (None, self.members())
        } else {
            (Some(self.addrs[0]), Vec::new())
        };
        let config = ServerConfig {
            advertise: self.addrs[slot],
            viewleader,
            heartbeat_interval: self.params.heartbeat,
            candidates,
        };
        let server = Server::new(config, rng.fork(), self.now);
        let config = self.endpoint_config();
        let mut host = Host::new(self.addrs[slot], App::Server(Box::new(server)), config, rng);
        host.process = self.processes;
        host
    }

    /// The reliable layer's configuration of a host started now: with the simulation's
    /// cluster key in keyed runs, its wall clock anchored on the virtual one (the same for
    /// every host; a host's start is now).
    fn endpoint_config(&self) -> reliable::Config {
        let auth = self.params.keyed.then(|| {
            let since = self.now.saturating_duration_since(self.start);
            Auth {
                key: ClusterKey::from_secret(b"the simulated cluster's key").expect("long enough"),
                replay_window: Auth::DEFAULT_WINDOW,
                clock: WallClock::anchored(self.now, SIM_WALL_START + since.as_micros() as u64),
            }
        });
        reliable::Config {
            auth,
            ..reliable::Config::default()
        }
    }

    /// A fresh client for `slot`, starting its first operation soon.
    fn client_host(&mut self, slot: usize, rng: &mut Rng) -> Host {
        self.lives += 1;
        let mut client_rng = rng.fork();
        let first = self.now + Duration::from_millis(300 + client_rng.below(200));
        let index = slot - self.first_client();
        let client = ClientActor {
            index,
            life: self.lives,
            // Clients start at different members (followers pass requests on).
            viewleader: self.addrs[index % self.params.group],
            members: self.members(),
            failed: Vec::new(),
            rng: Arc::new(Mutex::new(client_rng)),
            next_op: Some(first),
            running: None,
            seq: 0,
            stopped: false,
            done: Vec::new(),
            views: Vec::new(),
            epoch_floor: Epoch(0),
            params: self.params.clone(),
        };
        let config = self.endpoint_config();
        Host::new(self.addrs[slot], App::Client(Box::new(client)), config, rng)
    }

    /// A fresh lock client for `slot` (`recover`: a later life, which first releases what
    /// the previous one may hold: the claims it wrote down).
    fn locker_host(
        &mut self,
        slot: usize,
        rng: &mut Rng,
        recover: Option<BTreeMap<String, u64>>,
    ) -> Host {
        let locker = LockActor::new(
            slot - self.first_locker(),
            self.members(),
            rng.fork(),
            self.params.op_timeout,
            self.now,
            recover,
        );
        let config = self.endpoint_config();
        Host::new(self.addrs[slot], App::Locker(Box::new(locker)), config, rng)
    }

    /// Queues `event` at `at`.
    fn schedule(&mut self, at: Instant, event: Scheduled) {
        self.seq += 1;
        self.queue.insert((at, self.seq), event);
    }

    /// Virtual time since the start.
    fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Prints `what` with the virtual time, when verbose.
    fn log(&self, what: impl FnOnce() -> String) {
        if self.verbose {
            eprintln!("[{:>12.6}] {}", self.elapsed().as_secs_f64(), what());
        }
    }

    /// The group member at `slot`, if one runs there.
    fn member(&self, slot: usize) -> Option<&Group> {
        match self.hosts.get(slot) {
            Some(Some(Host {
                app: App::Member(member),
                ..
            })) => Some(member.as_ref()),
            _ => None,
        }
    }

    /// The slot of the group's leader: the member that leads (frozen or not); of two that
    /// believe they lead (one deposed and not aware yet), the one more members follow.
    fn leader_slot(&self) -> Option<usize> {
        let group = self.params.group;
        let followed = |slot: usize| {
            (0..group)
                .filter(|&s| self.member(s).and_then(Group::leader) == Some(self.addrs[slot]))
                .count()
        };
        (0..group)
            .filter(|&s| self.member(s).is_some_and(Group::is_leader))
            .max_by_key(|&s| (followed(s), std::cmp::Reverse(s)))
    }

    /// The view leader the group's leader applied (the group's view), if there is a leader.
    fn leader_vl(&self) -> Option<&ViewLeader> {
        self.leader_slot()
            .and_then(|s| self.member(s))
            .map(Group::view_leader)
    }

    /// Notes a change of the group's leader, and logs the group's view when its epoch
    /// changed.
    fn note_leader(&mut self) {
        let leader = self.leader_slot();
        if let Some(slot) = leader
            && self.leader_seen != Some(slot)
        {
            if self.leader_seen.is_some() {
                self.stats.leader_changes += 1;
            }
            self.leader_seen = Some(slot);
            if self.params.group > 1 {
                let addr = self.addrs[slot];
                self.log(|| format!("member {slot} ({addr}) leads the group"));
            }
        }
        if !self.verbose {
            return;
        }
        if let Some(vl) = self.leader_vl() {
            let view = vl.view();
            if view.epoch.0 != self.seen_epoch {
                self.seen_epoch = view.epoch.0;
                self.log(|| format!("view epoch {} members {}", view.epoch, describe_view(&view)));
            }
        }
    }

    /// Folds `bytes` into the run's digest (FNV-1a).
    fn fold(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.digest = (self.digest ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// The slot of the host at `addr`.
    fn slot(&self, addr: SocketAddr) -> Option<usize> {
        self.addrs.iter().position(|&a| a == addr)
    }

    /// Records a datagram in the trace.
    fn record(&mut self, direction: Direction, src: SocketAddr, dst: SocketAddr, payload: &[u8]) {
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000) + self.elapsed();
        if let Some(trace) = &mut self.trace {
            trace.push(Entry {
                time,
                direction,
                src,
                dst,
                payload: payload.to_vec(),
            });
        }
    }

    /// Puts a datagram from `from` on the network: lost, cut, duplicated, delayed, held back.
    fn send(&mut self, from: SocketAddr, to: SocketAddr, payload: Vec<u8>) {
        self.stats.sent += 1;
        if Header::decode(&payload).is_ok_and(|(header, _)| header.kind == Kind::Retry) {
            self.stats.retries += 1;
        }
        self.record(Direction::Sent, from, to, &payload);
        self.net.send(self.now, from, to, payload);
    }

    /// Runs `slot`'s host after an input: hands its output to the network and collects its
    /// client's finished operations.
    fn settle_host(&mut self, slot: usize) {
        let now = self.now;
        let mut out = Vec::new();
        let Some(host) = self.hosts[slot].as_mut() else {
            return;
        };
        host.pump(now, &mut out);
        let from = host.addr;
        let is_member = matches!(host.app, App::Member(_));
        let finished = match &mut host.app {
            App::Client(client) => std::mem::take(&mut client.done),
            _ => Vec::new(),
        };
        self.observe(slot);
        let index = slot.saturating_sub(self.first_client());
        for (running, at, outcome) in finished {
            self.note(index, running, Some(at), outcome);
        }
        for (to, payload) in out {
            self.send(from, to, payload);
        }
        if is_member {
            self.note_leader();
        }
    }

    /// Notes what the host at `slot` shows the checks: a server's bucket, epoch and id (a new
    /// id without a crash is a rejoin), or the views a client received.
    fn observe(&mut self, slot: usize) {
        let at = self.elapsed();
        let Some(host) = self.hosts[slot].as_mut() else {
            return;
        };
        match &mut host.app {
            App::Server(server) => {
                let rejoined = self.observed.see_server(host.process, slot, at, server);
                if let Some(old) = rejoined {
                    self.stats.rejoins += 1;
                    let (process, id) = (host.process, server.id());
                    self.log(|| {
                        format!(
                            "server process {process} at slot {slot} rejoined as {id} (was {old})"
                        )
                    });
                }
            }
            App::Client(client) => {
                for (when, epoch) in std::mem::take(&mut client.views) {
                    let when = when - self.start;
                    self.observed
                        .see_client_view(client.life, client.index, when, epoch);
                }
            }
            App::Member(member) => {
                let life = host.process;
                let epoch = member.view_leader().view().epoch.0;
                let seen = self
                    .observed
                    .members
                    .entry(life)
                    .or_insert_with(|| MemberLife {
                        slot,
                        ..MemberLife::default()
                    });
                if seen.epochs.last().is_none_or(|&(_, last)| last != epoch) {
                    seen.epochs.push((at, epoch));
                    let view = member.view_leader().view();
                    self.observed.see_view(self.generation, &view, at, || {
                        format!("group member {slot} (life {life})")
                    });
                }
            }
            App::Locker(locker) => {
                self.stats.lock_grants += std::mem::take(&mut locker.grants);
                self.stats.lock_give_ups += std::mem::take(&mut locker.given_up);
                let requester = locker.requester().to_owned();
                for (when, lock, step) in std::mem::take(&mut locker.events) {
                    self.observed.locks.push(LockEvent {
                        at: when - self.start,
                        requester: requester.clone(),
                        lock,
                        step,
                        generation: self.generation,
                    });
                }
            }
        }
    }

    /// Adds a finished (or abandoned) operation to the history.
    fn note(
        &mut self,
        client: usize,
        running: Running,
        completed: Option<Instant>,
        outcome: Outcome,
    ) {
        let summary = format!(
            "{client} {} {:?} {:?} {outcome:?}",
            running.key,
            running.value,
            completed.map(|c| c - self.start)
        );
        self.fold(summary.as_bytes());
        let attempts = match &running.op {
            Op::Setr(op) => op.attempts(),
            Op::Getr(op) => op.attempts(),
        };
        self.stats.waiting_ops += u64::from(running.wait);
        self.stats.view_retries += attempts.saturating_sub(1);
        // A group of 3 or 5 has one log: the view a client used at an epoch is the one every
        // member applied at it (a group of one restarted with no memory may reuse epochs).
        if self.params.group > 1
            && let Some(placement) = running.op.placement()
        {
            let at = running.invoked - self.start;
            self.observed
                .see_view(self.generation, &placement.view, at, || {
                    format!(
                        "client {client} (an operation invoked at {:.6} s)",
                        at.as_secs_f64()
                    )
                });
        }
        let invoked = (running.invoked - self.start).as_secs_f64();
        let txid = match &running.op {
            Op::Setr(op) => op
                .coordinator()
                .map(|op| {
                    format!(
                        " tx {} replicas {:?}",
                        op.txid(),
                        op.replicas()
                            .iter()
                            .map(|m| m.id.to_string())
                            .collect::<Vec<_>>()
                    )
                })
                .unwrap_or_default(),
            Op::Getr(_) => String::new(),
        };
        let why = running
            .error
            .as_ref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        self.log(|| {
            format!(
                "client {client} done: {} {:?} = {:?} invoked {invoked:.6}{txid}: {outcome:?}{why}",
                running.key,
                running.value,
                completed.is_some()
            )
        });
        self.history.push(Record {
            client,
            key: running.key,
            value: running.value,
            invoked: running.invoked - self.start,
            completed: completed.map(|c| c - self.start),
            outcome,
        });
    }

    /// Runs until virtual time `until` (or until nothing is left to do).
    fn run_until(&mut self, until: Instant) {
        loop {
            let delivery_at = self.net.poll_timeout();
            let event_at = self.queue.first_key_value().map(|(&(at, _), _)| at);
            let timer = self
                .hosts
                .iter()
                .enumerate()
                .filter(|&(slot, _)| self.paused[slot].is_none())
                .filter_map(|(slot, h)| {
                    h.as_ref()
                        .and_then(|h| h.poll_timeout())
                        .map(|at| (at, slot))
                })
                .min();
            let Some(next) = [delivery_at, event_at, timer.map(|(t, _)| t)]
                .into_iter()
                .flatten()
                .min()
            else {
                break;
            };
            if next > until {
                break;
            }
            self.now = self.now.max(next);
            // At one instant: deliveries first, then other events, then timers.
            if delivery_at == Some(next) {
                let now = self.now;
                if let Some(datagram) = self.net.poll_delivery(now) {
                    self.arrive(datagram);
                }
            } else if event_at == Some(next) {
                let Some((_, event)) = self.queue.pop_first() else {
                    break;
                };
                self.handle(event);
            } else if let Some((_, slot)) = timer {
                let now = self.now;
                if let Some(host) = self.hosts[slot].as_mut() {
                    host.handle_timeout(now);
                }
                self.settle_host(slot);
            }
        }
        self.now = self.now.max(until);
    }

    /// Hands a datagram from `from` to the (running) host at `slot` and settles it.
    fn receive(&mut self, slot: usize, from: SocketAddr, payload: &[u8]) {
        let now = self.now;
        let to = self.addrs[slot];
        self.stats.delivered += 1;
        let nanos = (now - self.start).as_nanos() as u64;
        self.fold(&nanos.to_le_bytes());
        self.fold(payload);
        self.record(Direction::Received, from, to, payload);
        if let Some(host) = self.hosts[slot].as_mut() {
            host.endpoint.handle_datagram(now, from, payload);
        }
        self.settle_host(slot);
    }

    /// Freezes the host at `slot` for `length` (no timers, no handling; what arrives waits).
    /// Returns false if nothing runs there or it is frozen already.
    fn pause(&mut self, slot: usize, length: Duration) -> bool {
        if self.hosts[slot].is_none() || self.paused[slot].is_some() {
            return false;
        }
        self.pauses += 1;
        let id = self.pauses;
        self.paused[slot] = Some(Pause {
            id,
            inbox: Vec::new(),
            bytes: 0,
        });
        let addr = self.addrs[slot];
        self.log(|| format!("pause {addr} (slot {slot}) for {length:?}"));
        let at = self.now + length;
        self.schedule(at, Scheduled::Resume { slot, pause: id });
        true
    }

    /// Thaws the frozen host at `slot`: it handles what waited in its socket buffer, in
    /// arrival order, before any of its timers run (the event loop runs those next).
    fn resume(&mut self, slot: usize) {
        let Some(pause) = self.paused[slot].take() else {
            return;
        };
        let (addr, waiting) = (self.addrs[slot], pause.inbox.len());
        self.log(|| format!("resume {addr} (slot {slot}): {waiting} waiting datagrams and errors"));
        let now = self.now;
        for inbound in pause.inbox {
            match inbound {
                Inbound::Datagram { from, payload } => self.receive(slot, from, &payload),
                Inbound::Unreachable { peer } => {
                    if let Some(host) = self.hosts[slot].as_mut() {
                        host.endpoint.handle_unreachable(now, peer);
                        self.settle_host(slot);
                    }
                }
            }
        }
    }

    /// Cuts the link between `a` and `b` until `until` (a longer cut of it already in place
    /// stays as it is).
    fn cut(&mut self, a: SocketAddr, b: SocketAddr, until: Instant) {
        let heal = self.net.cut(self.now, a, b, until);
        let at = heal - self.start;
        self.log(|| format!("cut {a} - {b} until {:.6}", at.as_secs_f64()));
    }

    /// Schedules membership fault `fault` at `after` from the start (for scenario tests).
    pub fn inject(&mut self, after: Duration, fault: Fault) {
        let at = self.start + after;
        self.schedule(at, Scheduled::Fault(fault));
    }

    /// Draws a membership fault: with a group of one, each of the four kinds of a lone view
    /// leader equally likely, each lasting longer than dead-after (a restarted view leader's
    /// down time is drawn from up to 1.5 times dead-after); with a group of 3 or 5, each of
    /// the eight kinds equally likely, a follower's pause, the leader's isolation from the
    /// other members and a split lasting from 0.4 s (past any election timeout) to 3 s.
    fn draw_fault(&mut self) -> Fault {
        let dead_after = self.params.dead_after;
        let longer = |rng: &mut Rng| {
            let extra = 50_000 + rng.below(dead_after.as_micros() as u64 + 1_000_000);
            dead_after + Duration::from_micros(extra)
        };
        let down = |rng: &mut Rng| {
            Duration::from_micros(10_000 + rng.below(dead_after.as_micros() as u64 * 3 / 2))
        };
        let election = |rng: &mut Rng| Duration::from_millis(400 + rng.below(2_600));
        let kinds = if self.params.group > 1 { 8 } else { 4 };
        match self.rng.below(kinds) {
            0 => Fault::PauseLeader(longer(&mut self.rng)),
            1 => Fault::RestartLeader {
                down: down(&mut self.rng),
            },
            2 => Fault::CutLeader(longer(&mut self.rng)),
            3 => Fault::PauseServers(longer(&mut self.rng)),
            4 => Fault::PauseFollower(election(&mut self.rng)),
            5 => Fault::RestartFollower {
                down: down(&mut self.rng),
            },
            6 => Fault::IsolateLeader(election(&mut self.rng)),
            _ => Fault::SplitGroup(election(&mut self.rng)),
        }
    }

    /// The member a leader fault strikes: the leader, or with none (an election under way)
    /// a random running member.
    fn target_leader(&mut self) -> Option<usize> {
        if let Some(slot) = self.leader_slot() {
            return Some(slot);
        }
        let running: Vec<usize> = (0..self.params.group)
            .filter(|&s| self.hosts[s].is_some())
            .collect();
        (!running.is_empty()).then(|| running[self.rng.below(running.len() as u64) as usize])
    }

    /// A random running follower (a member other than the leader), if any.
    fn target_follower(&mut self) -> Option<usize> {
        let leader = self.leader_slot();
        let followers: Vec<usize> = (0..self.params.group)
            .filter(|&s| Some(s) != leader && self.hosts[s].is_some() && !self.lost[s])
            .collect();
        (!followers.is_empty()).then(|| followers[self.rng.below(followers.len() as u64) as usize])
    }

    /// Members that take part (not lost to a restart without state) and are not `out`, nor
    /// down or frozen: if fewer than a majority, the group cannot run (counted).
    fn note_majority(&mut self, out: &[usize]) {
        let group = self.params.group;
        if group == 1 {
            return;
        }
        let able = (0..group)
            .filter(|&s| {
                !out.contains(&s)
                    && !self.lost[s]
                    && self.hosts[s].is_some()
                    && self.paused[s].is_none()
            })
            .count();
        if able <= group / 2 {
            self.stats.without_majority += 1;
            self.log(|| format!("{able} of {group} members left: no majority until this ends"));
        }
    }

    /// True if one more member may be restarted without its state in this run: every such
    /// member is refused for good, and a majority must stay.
    fn may_lose_member(&self) -> bool {
        let group = self.params.group;
        let lost = self.lost.iter().filter(|&&l| l).count();
        group == 1 || lost < (group - 1) / 2
    }

    /// Crashes group member `slot`; it starts again with no state after `down`.
    fn crash_member(&mut self, slot: usize, down: Duration) {
        let addr = self.addrs[slot];
        self.log(|| format!("crash group member {slot} ({addr}); it restarts in {down:?}"));
        self.hosts[slot] = None;
        self.paused[slot] = None;
        if self.params.group > 1 {
            self.lost[slot] = true;
        }
        let at = self.now + down;
        self.schedule(at, Scheduled::RestartMember(slot));
    }

    /// Carries out membership fault `fault` now (skipped where it cannot apply: a leader that
    /// is down cannot be paused or crashed again, a group of one has no followers, a member
    /// is restarted without its state only while a majority would remain).
    fn inject_now(&mut self, fault: Fault) {
        let now = self.now;
        let group = self.params.group;
        let servers = self.first_server()..self.first_client();
        match fault {
            Fault::PauseLeader(length) => {
                if let Some(slot) = self.target_leader()
                    && self.pause(slot, length)
                {
                    self.stats.vl_pauses += 1;
                    self.note_majority(&[]);
                }
            }
            Fault::RestartLeader { down } => {
                if let Some(slot) = self.target_leader()
                    && self.may_lose_member()
                {
                    self.crash_member(slot, down);
                    self.stats.vl_restarts += 1;
                    self.note_majority(&[]);
                }
            }
            Fault::CutLeader(length) => {
                let Some(slot) = self.target_leader() else {
                    return;
                };
                let leader = self.addrs[slot];
                self.log(|| format!("cut the leader {leader} from every server for {length:?}"));
                for server in servers {
                    self.cut(leader, self.addrs[server], now + length);
                }
                self.stats.vl_cuts += 1;
            }
            Fault::CrashServer { down } => {
                if let Some(slot) = servers.clone().find(|&s| self.hosts[s].is_some()) {
                    self.crash_server(slot, now + down);
                }
            }
            Fault::PauseServers(length) => {
                self.log(|| format!("pause every server for {length:?}"));
                let mut any = false;
                for slot in servers {
                    any |= self.pause(slot, length);
                }
                if any {
                    self.stats.all_server_pauses += 1;
                }
            }
            Fault::PauseFollower(length) => {
                if let Some(slot) = self.target_follower()
                    && self.pause(slot, length)
                {
                    self.stats.follower_pauses += 1;
                    self.note_majority(&[]);
                }
            }
            Fault::RestartFollower { down } => {
                if self.may_lose_member()
                    && let Some(slot) = self.target_follower()
                {
                    self.crash_member(slot, down);
                    self.stats.follower_restarts += 1;
                    self.note_majority(&[]);
                }
            }
            Fault::IsolateLeader(length) => {
                let Some(slot) = self.target_leader().filter(|_| group > 1) else {
                    return;
                };
                let leader = self.addrs[slot];
                self.log(|| {
                    format!("cut the leader {leader} from the other members for {length:?}")
                });
                for member in (0..group).filter(|&m| m != slot) {
                    self.cut(leader, self.addrs[member], now + length);
                }
                self.stats.leader_isolations += 1;
                self.note_majority(&[slot]);
            }
            Fault::SplitGroup(length) => {
                if group == 1 {
                    return;
                }
                // A minority side of 1..=group/2 members, the leader on it half the time.
                let mut order: Vec<usize> = (0..group).collect();
                for i in (1..group).rev() {
                    let j = self.rng.below(i as u64 + 1) as usize;
                    order.swap(i, j);
                }
                let size = 1 + self.rng.below(group as u64 / 2) as usize;
                if let Some(leader) = self.leader_slot()
                    && self.rng.chance(0.5)
                {
                    let at = order.iter().position(|&m| m == leader).unwrap_or(0);
                    order.swap(0, at);
                }
                let (minority, majority) = order.split_at(size);
                let (minority, majority) = (minority.to_vec(), majority.to_vec());
                self.log(|| {
                    format!("split the group: members {minority:?} | {majority:?} for {length:?}")
                });
                for &a in &minority {
                    for &b in &majority {
                        self.cut(self.addrs[a], self.addrs[b], now + length);
                    }
                }
                self.stats.group_splits += 1;
                self.note_majority(&minority);
            }
        }
    }

    /// Hands a datagram the network delivers to its receiver's host: handled at once by a
    /// running host, kept in a frozen host's socket buffer (if there is room), or bounced
    /// back as unreachable when nobody listens at its address.
    fn arrive(&mut self, datagram: Datagram) {
        let Datagram { from, to, payload } = datagram;
        let now = self.now;
        let Some(slot) = self.slot(to) else {
            return;
        };
        if self.hosts[slot].is_none() {
            // Nobody listens there: the sender's OS hears so (ICMP).
            let at = now + self.params.latency;
            self.schedule(at, Scheduled::Unreachable { to: from, peer: to });
        } else if let Some(pause) = &mut self.paused[slot] {
            // Frozen: the datagram waits in the socket buffer, if there is room.
            if pause.bytes + payload.len() > SOCKET_BUFFER {
                self.stats.buffer_drops += 1;
            } else {
                pause.bytes += payload.len();
                pause.inbox.push(Inbound::Datagram { from, payload });
            }
        } else {
            self.receive(slot, from, &payload);
        }
    }

    /// Carries out one scheduled event.
    fn handle(&mut self, event: Scheduled) {
        let now = self.now;
        match event {
            Scheduled::Unreachable { to, peer } => {
                let Some(slot) = self.slot(to) else {
                    return;
                };
                if let Some(pause) = &mut self.paused[slot] {
                    pause.inbox.push(Inbound::Unreachable { peer });
                } else if let Some(host) = self.hosts[slot].as_mut() {
                    host.endpoint.handle_unreachable(now, peer);
                    self.settle_host(slot);
                }
            }
            Scheduled::Resume { slot, pause } => {
                if self.paused[slot].as_ref().is_some_and(|p| p.id == pause) {
                    self.resume(slot);
                }
            }
            Scheduled::Fault(fault) => self.inject_now(fault),
            Scheduled::RestartMember(slot) => {
                if self.hosts[slot].is_none() {
                    let mut rng = self.rng.fork();
                    // A fresh seed: a new election timeout and incarnation.
                    let seed = rng.next_u64();
                    if self.params.group == 1 {
                        // A lone view leader with no memory: a new lock table, a new log.
                        self.generation += 1;
                    }
                    let host = self.member_host(slot, seed, &mut rng);
                    self.log(|| format!("restart group member {slot} (no memory)"));
                    self.hosts[slot] = Some(host);
                    self.settle_host(slot);
                }
            }
            Scheduled::Chaos => {
                if !self.chaos {
                    return;
                }
                self.chaos_event();
                if let Some(every) = self.params.chaos_every {
                    let next =
                        every / 2 + Duration::from_micros(self.rng.below(every.as_micros() as u64));
                    self.schedule(now + next, Scheduled::Chaos);
                }
            }
            Scheduled::RestartServer(slot) => {
                if self.hosts[slot].is_none() {
                    let mut rng = self.rng.fork();
                    let host = self.server_host(slot, &mut rng);
                    if let App::Server(server) = &host.app {
                        let id = server.id();
                        self.log(|| format!("restart server slot {slot} as {id}"));
                    }
                    self.hosts[slot] = Some(host);
                    self.settle_host(slot);
                }
            }
            Scheduled::RestartClient(slot) => {
                if self.hosts[slot].is_none() {
                    let mut rng = self.rng.fork();
                    let mut host = if slot >= self.first_locker() {
                        let claims = self.locker_claims.remove(&slot).unwrap_or_default();
                        self.locker_host(slot, &mut rng, Some(claims))
                    } else {
                        self.client_host(slot, &mut rng)
                    };
                    if !self.chaos {
                        match &mut host.app {
                            App::Client(client) => {
                                client.next_op = None;
                                client.stopped = true;
                            }
                            App::Locker(locker) => locker.stop(),
                            _ => {}
                        }
                    }
                    self.hosts[slot] = Some(host);
                }
            }
        }
    }

    /// True when no host is frozen, the group has a leader and its view holds exactly the
    /// live servers, all at its epoch, and no rebalancing is in progress: the point from
    /// which failures are counted.
    pub fn is_stable(&self) -> bool {
        let Some(leader) = self.leader_vl() else {
            return false;
        };
        if self.paused.iter().any(Option::is_some) {
            return false;
        }
        let view = leader.view();
        let (rebalancing, _) = leader.rebalancing();
        let live: BTreeSet<ServerId> = self.servers().map(|s| s.id()).collect();
        let members: BTreeSet<ServerId> = view.members.iter().map(|m| m.id).collect();
        !rebalancing
            && live == members
            && self
                .servers()
                .all(|s| s.epoch() == view.epoch && !s.is_rebalancing())
    }

    /// The number of servers in the group's view.
    fn view_size(&self) -> u32 {
        self.leader_vl()
            .map_or(0, |leader| leader.view().members.len() as u32)
    }

    /// The live servers.
    fn servers(&self) -> impl Iterator<Item = &Server> {
        self.hosts[self.first_server()..self.first_client()]
            .iter()
            .filter_map(|h| match h {
                Some(Host {
                    app: App::Server(server),
                    ..
                }) => Some(server.as_ref()),
                _ => None,
            })
    }

    /// Crashes the server at `slot` (its process is marked crashed: its bucket is gone) and
    /// schedules its restart, under a fresh id with an empty bucket, at `back`.
    fn crash_server(&mut self, slot: usize, back: Instant) {
        if let Some(Some(host)) = self.hosts.get(slot) {
            let process = host.process;
            let seen = self
                .observed
                .servers
                .entry(process)
                .or_insert_with(|| ServerProcess {
                    slot,
                    ..ServerProcess::default()
                });
            seen.crashed = true;
            if let App::Server(server) = &host.app {
                let id = server.id();
                self.log(|| format!("crash server {id} (process {process}) at slot {slot}"));
            }
        }
        self.hosts[slot] = None;
        self.paused[slot] = None;
        self.stats.crashes += 1;
        self.schedule(back, Scheduled::RestartServer(slot));
    }

    /// Injects one fault: now and then a membership fault ([`Fault`]: the group's leader
    /// paused, restarted or cut from every server, or every server paused; with a group of 3
    /// or 5 also a follower paused or restarted, the leader cut from the other members, or
    /// the group split), only from a stable cluster and alone until it is stable again; else
    /// a server crash or a cut between a group member and a server (each only while fewer
    /// than `replicas - 1` such failures happened since the cluster was last stable, so that
    /// every key keeps a holder that can serve it), a cut between other hosts, or a client
    /// killed (preferably one between the votes and the decision of a setr), or a lock
    /// client killed. The durability check counts only crashes as failures: nothing else
    /// makes a server process lose its memory.
    fn chaos_event(&mut self) {
        // A cut between a group member and a server is a failure in the making for
        // availability (the server may yet be declared dead, and its copies are then not
        // served until it rejoined): no reset while one lasts.
        let group = self.params.group;
        let members = &self.addrs[..group];
        let leader_cut = self
            .net
            .cuts(self.now)
            .any(|(a, b, _)| members.contains(&a) != members.contains(&b));
        if self.is_stable() && !leader_cut {
            self.check_stable_point();
            self.failures = 0;
            self.holders = self.params.replicas.min(self.view_size());
            self.membership_fault = false;
        }
        let failures = self.failures;
        self.log(|| format!("chaos: {failures} failures since the cluster was last stable"));
        // One membership fault at a time, from a stable cluster, and no crash or view-leader
        // cut while it lasts: together they would leave keys with no holder that can serve
        // them (durability would still hold, the reads of those keys could not).
        if self.membership_fault {
            return;
        }
        let chance = if group > 1 {
            GROUP_FAULT_CHANCE
        } else {
            MEMBERSHIP_FAULT_CHANCE
        };
        if self.rng.chance(chance) {
            let servers_up =
                (self.first_server()..self.first_client()).all(|s| self.hosts[s].is_some());
            if self.failures == 0 && !leader_cut && servers_up && self.is_stable() {
                let fault = self.draw_fault();
                self.membership_fault = true;
                self.inject_now(fault);
            }
            return;
        }
        // A key has min(replicas, servers in the view) holders, counted when the cluster was
        // last stable (a server that joined since may not hold its keys yet): fewer than
        // that may crash.
        let holders = self.holders.min(self.params.replicas.min(self.view_size()));
        let may_fail = self.failures + 1 < holders;
        let servers: Vec<usize> = (self.first_server()..self.first_client()).collect();
        let clients: Vec<usize> = (self.first_client()..self.addrs.len()).collect();
        let now = self.now;
        match self.rng.below(4) {
            0 if may_fail => {
                let live: Vec<usize> = servers
                    .iter()
                    .copied()
                    .filter(|&s| self.hosts[s].is_some())
                    .collect();
                if live.len() <= 1 {
                    return;
                }
                let slot = live[self.rng.below(live.len() as u64) as usize];
                self.failures += 1;
                let back = Duration::from_millis(100 + self.rng.below(3_000));
                self.crash_server(slot, now + back);
            }
            1 => {
                // A cut between two hosts (one between a group member and a server may get
                // the server declared dead: it rejoins, keeping its bucket as candidates).
                let a = self.rng.below(self.addrs.len() as u64) as usize;
                let b = self.rng.below(self.addrs.len() as u64) as usize;
                if a == b {
                    return;
                }
                let leader_cut =
                    (a < group && servers.contains(&b)) || (b < group && servers.contains(&a));
                if leader_cut {
                    if !may_fail {
                        return;
                    }
                    self.failures += 1;
                }
                self.stats.partitions += 1;
                let heal = Duration::from_millis(50 + self.rng.below(2_500));
                self.cut(self.addrs[a], self.addrs[b], now + heal);
            }
            _ => {
                let deciding: Vec<usize> = clients
                    .iter()
                    .copied()
                    .filter(|&c| {
                        matches!(&self.hosts[c], Some(Host { app: App::Client(client), .. }) if client.is_between_votes_and_decision())
                    })
                    .collect();
                let live: Vec<usize> = clients
                    .iter()
                    .copied()
                    .filter(|&c| self.hosts[c].is_some())
                    .collect();
                let pool = if deciding.is_empty() { live } else { deciding };
                if pool.is_empty() {
                    return;
                }
                let slot = pool[self.rng.below(pool.len() as u64) as usize];
                // What a lock client did up to now is in its history.
                self.observe(slot);
                let Some(mut host) = self.hosts[slot].take() else {
                    return;
                };
                self.log(|| format!("kill client slot {slot}"));
                if let App::Locker(locker) = &host.app {
                    self.stats.locker_kills += 1;
                    self.locker_claims.insert(slot, locker.claims());
                }
                if let App::Client(client) = &mut host.app {
                    if client.is_between_votes_and_decision() {
                        self.stats.kills_before_decision += 1;
                    }
                    let index = client.index;
                    for (when, epoch) in std::mem::take(&mut client.views) {
                        let when = when - self.start;
                        self.observed
                            .see_client_view(client.life, index, when, epoch);
                    }
                    let finished = std::mem::take(&mut client.done);
                    for (running, at, outcome) in finished {
                        self.note(index, running, Some(at), outcome);
                    }
                    if let Some((running, outcome)) = client.killed() {
                        self.stats.client_kills += 1;
                        self.note(index, running, None, outcome);
                    }
                }
                let back = Duration::from_millis(50 + self.rng.below(1_000));
                self.schedule(now + back, Scheduled::RestartClient(slot));
            }
        }
    }

    /// Runs the whole scenario: the active period with faults, then a quiet period until
    /// the cluster settles (every fault over, crashed servers back, no operation running,
    /// every transaction decided, rebalancing done), bounded by `settle_limit`. Returns the
    /// final state, or why the cluster did not settle.
    pub fn run(&mut self, settle_limit: Duration) -> Result<Final, String> {
        let end = self.start + self.params.active;
        self.run_until(end);
        // Quiet: no more faults or new operations; crashed servers come back now; cuts heal,
        // frozen hosts resume and a crashed group member restarts when their time comes (each
        // membership fault runs its whole length, longer than dead-after).
        self.chaos = false;
        let quiet = FaultSpec {
            loss: 0.0,
            dup: 0.0,
            reorder: 0.0,
            ..self.params.faults()
        };
        self.net.set_spec(quiet);
        let (first_server, first_client) = (self.first_server(), self.first_client());
        for slot in 0..self.hosts.len() {
            match &mut self.hosts[slot] {
                Some(Host {
                    app: App::Client(client),
                    ..
                }) => {
                    client.next_op = None;
                    client.stopped = true;
                }
                Some(Host {
                    app: App::Locker(locker),
                    ..
                }) => locker.stop(),
                Some(_) => {}
                None if slot >= first_server && slot < first_client => {
                    let now = self.now;
                    self.schedule(now, Scheduled::RestartServer(slot));
                }
                None => {}
            }
        }
        let limit = self.now + settle_limit;
        let step = Duration::from_millis(100);
        loop {
            let at = self.now + step;
            self.run_until(at);
            if self.is_settled() {
                self.await_agreement();
                return Ok(self.final_state());
            }
            if self.now >= limit {
                return Err(format!(
                    "the cluster did not settle within {settle_limit:?} after the faults stopped: {}",
                    self.describe()
                ));
            }
        }
    }

    /// True when no link is cut, no client runs an operation, every server has decided every
    /// transaction, and the view is stable.
    fn is_settled(&self) -> bool {
        if self.net.cuts(self.now).next().is_some() {
            return false;
        }
        let idle = self.hosts.iter().flatten().all(|h| match &h.app {
            App::Client(client) => client.running.is_none(),
            App::Locker(locker) => locker.is_idle(),
            _ => true,
        });
        let members_up = self.hosts[..self.params.group].iter().all(Option::is_some);
        idle && members_up
            && self.servers().all(|s| s.pending_transactions() == 0)
            && self.is_stable()
    }

    /// Once settled, gives the group's members up to 5 s more to apply what the leader
    /// applied (a follower learns the commit index with the leader's next message): the
    /// agreement check then compares their views.
    fn await_agreement(&mut self) {
        let limit = self.now + Duration::from_secs(5);
        while !self.members_agree() && self.now < limit {
            let at = self.now + Duration::from_millis(100);
            self.run_until(at);
        }
    }

    /// True when every member that takes part follows the leader and shows its view and
    /// rebalancing status, and no member restarted without its state is still asking its
    /// peers whether it may take part.
    fn members_agree(&self) -> bool {
        let Some(leader) = self.leader_vl() else {
            return false;
        };
        let (view, rebalancing) = (leader.view(), leader.rebalancing().0);
        (0..self.params.group)
            .filter_map(|s| self.member(s))
            .all(|m| match member_phase(m) {
                "refused" => true,
                "joining" => false,
                _ => {
                    m.leader().is_some()
                        && m.view_leader().view() == view
                        && m.view_leader().rebalancing().0 == rebalancing
                }
            })
    }

    /// A line on the cluster's state, for failure messages.
    fn describe(&self) -> String {
        let members: Vec<String> = (0..self.params.group)
            .map(|slot| match self.member(slot) {
                Some(member) => {
                    let vl = member.view_leader();
                    let view = vl.view();
                    format!(
                        "member {slot} {}{}: view epoch {} with {} servers, rebalancing {:?}",
                        member_phase(member),
                        if self.paused[slot].is_some() {
                            " (frozen)"
                        } else {
                            ""
                        },
                        view.epoch,
                        view.members.len(),
                        vl.rebalancing()
                    )
                }
                None => format!("member {slot} down"),
            })
            .collect();
        let leader = match self.leader_slot() {
            Some(slot) => format!("leader {slot}; {}", members.join("; ")),
            None => format!("no leader; {}", members.join("; ")),
        };
        let servers: Vec<String> = self
            .servers()
            .map(|s| {
                let candidates = s.bucket().filter(|(_, stored)| stored.candidate).count();
                format!(
                    "{} epoch {} pending {} rebalancing {} candidates {candidates}",
                    s.id(),
                    s.epoch(),
                    s.pending_transactions(),
                    s.is_rebalancing()
                )
            })
            .collect();
        let running = self
            .hosts
            .iter()
            .flatten()
            .filter(|h| matches!(&h.app, App::Client(c) if c.running.is_some()))
            .count();
        let frozen = self.paused.iter().flatten().count();
        format!(
            "{leader}; servers [{}]; {running} client operations running; {frozen} hosts frozen; {} links cut",
            servers.join("; "),
            self.net.cuts(self.now).count()
        )
    }

    /// What happened: the world's counters plus the network's (datagrams lost to the
    /// injector, to cut links and to full socket buffers; duplicated; held back).
    pub fn stats(&self) -> Stats {
        let faults = self.net.fault_stats();
        Stats {
            dropped: faults.dropped + self.net.stats().cut + self.stats.buffer_drops,
            duplicated: faults.duplicated,
            reordered: faults.reordered,
            ..self.stats.clone()
        }
    }

    /// The final state for the checks (only once the group has a leader: a settled world
    /// has one), with every running member's phase and view.
    fn final_state(&self) -> Final {
        let members = (0..self.params.group)
            .filter_map(|slot| {
                let member = self.member(slot)?;
                let vl = member.view_leader();
                Some(MemberState {
                    slot,
                    phase: member_phase(member),
                    restarted: self.lost[slot],
                    view: vl.view(),
                    rebalancing: vl.rebalancing().0,
                })
            })
            .collect();
        Final {
            observed: self.observed.clone(),
            members,
            ..self.snapshot()
        }
    }

    /// Checks a stable point (see [`Observed::unstable`]): unless a transaction is in flight,
    /// every key any server holds is on each of its replicas; notes what is missing.
    fn check_stable_point(&mut self) {
        let pending: usize = self.servers().map(|s| s.pending_transactions()).sum();
        if pending > 0 {
            self.log(|| {
                format!("stable, but {pending} transactions in flight: copies not checked")
            });
            return;
        }
        let at = self.elapsed();
        let snapshot = self.snapshot();
        self.log(|| {
            let held: Vec<String> = snapshot
                .servers
                .iter()
                .map(|(id, bucket, _)| {
                    let keys: Vec<String> = bucket
                        .iter()
                        .map(|(k, (v, _))| format!("{k} v{v}"))
                        .collect();
                    format!("{id}: {}", keys.join(" "))
                })
                .collect();
            format!("stable: checking copies: {}", held.join("; "))
        });
        for missing in checks::missing_copies(&snapshot) {
            self.log(|| format!("stable, yet {missing}"));
            self.observed.unstable.push((at, missing));
        }
    }

    /// The cluster as the checks see it now (with nothing observed): the group leader's view
    /// and every running server's bucket, candidates apart. Only while the group has a
    /// leader.
    fn snapshot(&self) -> Final {
        let view = match self.leader_vl() {
            Some(leader) => leader.view(),
            None => unreachable!("a settled or stable world has a leader"),
        };
        let mut candidates = Vec::new();
        let servers = self
            .servers()
            .map(|s| {
                let mut bucket = Bucket::new();
                for (key, stored) in s.bucket() {
                    if stored.candidate {
                        candidates.push((s.id(), key.to_owned()));
                    } else {
                        bucket.insert(key.to_owned(), (stored.version, stored.value.clone()));
                    }
                }
                (s.id(), bucket, s.pending_transactions())
            })
            .collect();
        Final {
            placement: Placement::new(view),
            servers,
            candidates,
            observed: Observed::default(),
            at: self.elapsed(),
            members: Vec::new(),
        }
    }

    /// The recorded datagrams (empty unless made with `trace`).
    pub fn trace(&self) -> &[Entry] {
        self.trace.as_deref().unwrap_or(&[])
    }
}
