//! View-leader group figures, printed (run with `cargo bench --bench group`): what running
//! the view leader as a Raft group of 3 costs and buys, side by side with a group of one.
//!
//! 1. `query_servers` latency: a group of one; a group of 3 asked at its leader; asked at a
//!    follower, which passes the request on to the leader (`Forwarded`) and relays the answer.
//! 2. `lock_get` + `lock_release` pair latency in the same three cases (the leader answers
//!    once the entry commits: a round trip to a follower), and at the leader of a group of 3
//!    whose members keep their Raft state in a data dir (an fsync per write).
//! 3. `setr` and `getr` latency with the view leader as a group of 3 and as a group of one
//!    (3 servers), with a cached view and with a view per operation: the group should leave
//!    the data path alone.
//! 4. Failover: a group of 3 and 3 servers (heartbeat 100 ms, dead after the default
//!    2000 ms), and a `setr` loop whose clients are given all three members; the leader is
//!    stopped, and the time from the stop to the end of the first `setr` begun after it that
//!    succeeds is printed, with whether any server left the view (fresh clusters, and the
//!    median).
//!
//! Everything runs in-process on loopback, each node on its own driver thread. Latencies are
//! over sequential operations, each by a fresh [`Client`] with its own deadline, as one
//! `client` command runs: a client sends its next requests to the leader an answer names, so
//! a fresh one is what keeps every request of the follower case going to the follower. The
//! cases of sections 1 to 3 run side by side, taking turns in rounds, so that a drift of the
//! machine (on 2 cores, chiefly where the scheduler puts the threads) falls on all alike.

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use trireme::client::{Client, SetrHooks, ViewCache};
use trireme::placement::view::{Epoch, ServerId};
use trireme::runtime::net::{self, Handle, NetConfig};
use trireme::runtime::node::{self, Running};
use trireme::util::rng::Rng;
use trireme::viewleader::ViewLeaderConfig;
use trireme::viewleader::group::{Group, GroupConfig};
use trireme::wire::message::{Request, Response};

use support::percentiles;

/// Operations per latency measurement.
const OPS: usize = 2000;
/// Unmeasured operations before each latency measurement.
const WARMUP: usize = 100;
/// Rounds the operations of a latency measurement are split into (see [`interleaved`]).
const ROUNDS: usize = 10;
/// Keys the data-path operations cycle through.
const KEYS: usize = 1000;
/// Fresh clusters the failover is measured on.
const FAILOVERS: usize = 5;
/// The servers' heartbeat interval.
const HEARTBEAT: Duration = Duration::from_millis(100);
/// The deadline of each operation (the `client` command's default `--timeout-ms`).
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a cluster may take to reach a state waited for (a leader, a full view).
const SETTLE: Duration = Duration::from_secs(15);
/// The longest the failover loop is given to succeed again after the leader's stop.
const RECOVERY_BOUND: Duration = Duration::from_secs(20);
/// The pause of the failover loop after a failed `setr` (a failure can be immediate, and a
/// loop spinning on it would take a core from the election on 2 cores).
const RETRY_PAUSE: Duration = Duration::from_millis(5);
/// How often the view is sampled while watching for servers leaving it.
const VIEW_SAMPLE: Duration = Duration::from_millis(100);
/// Width of the label column.
const LABEL: usize = 46;

/// A view-leader group running in-process. Dropping it stops the members still running
/// and removes their data dirs.
struct VlGroup {
    /// The members' addresses, in `--peers` order.
    addrs: Vec<SocketAddr>,
    /// The members by place; `None` once stopped.
    members: Vec<Option<Running>>,
    /// The members' data dirs (empty when the group keeps its state in memory).
    dirs: Vec<PathBuf>,
}

impl VlGroup {
    /// Starts a group of `size` members (1 or 3) on loopback ports; with `durable`, each
    /// member keeps its Raft state in a fresh dir under the temp dir. Returns the group,
    /// which may not have elected a leader yet (see [`VlGroup::leader`]).
    fn start(size: usize, durable: bool) -> VlGroup {
        // Every member must know every address before any starts: bind them all first.
        let sockets: Vec<UdpSocket> = (0..size).map(|_| support::socket()).collect();
        let addrs: Vec<SocketAddr> = sockets.iter().map(|s| s.local_addr().unwrap()).collect();
        let mut group = VlGroup {
            addrs: addrs.clone(),
            members: Vec::with_capacity(size),
            dirs: Vec::new(),
        };
        let mut rng = Rng::from_entropy();
        let run = rng.next_u64();
        for (place, socket) in sockets.into_iter().enumerate() {
            let mut config = if size == 1 {
                GroupConfig::default()
            } else {
                GroupConfig::new(addrs.clone(), addrs[place]).expect("a group of 3")
            };
            config.seed = rng.next_u64();
            if durable {
                let dir = std::env::temp_dir().join(format!(
                    "trireme-bench-group-{}-{run:016x}-{place}",
                    std::process::id()
                ));
                std::fs::create_dir_all(&dir).expect("data dir");
                group.dirs.push(dir.clone());
                config.data_dir = Some(dir);
            }
            let member = Group::new(ViewLeaderConfig::default(), config).expect("group member");
            let running = node::start(member, socket, NetConfig::default()).expect("member");
            group.members.push(Some(running));
        }
        group
    }

    /// The addresses of the members still running.
    fn alive(&self) -> Vec<SocketAddr> {
        self.addrs
            .iter()
            .zip(&self.members)
            .filter(|(_, member)| member.is_some())
            .map(|(&addr, _)| addr)
            .collect()
    }

    /// Waits until the group has a leader that answers `query_servers` (a fresh view leader
    /// refuses it with `rebalancing` while it gathers the servers) and returns its address;
    /// asks through `handle`. Panics after [`SETTLE`].
    fn leader(&self, handle: &Handle) -> SocketAddr {
        let alive = self.alive();
        wait_for("a group leader that answers query_servers", || {
            alive
                .iter()
                .find_map(|&member| leader_named_by(handle, member))
                .filter(|leader| alive.contains(leader))
        })
    }

    /// A running member other than `leader`.
    fn follower(&self, leader: SocketAddr) -> SocketAddr {
        self.alive()
            .into_iter()
            .find(|&a| a != leader)
            .expect("a follower")
    }

    /// Stops the member at `addr` (as if its process were killed: its port closes).
    fn stop(&mut self, addr: SocketAddr) {
        let place = self.addrs.iter().position(|&a| a == addr).expect("member");
        if let Some(member) = self.members[place].take() {
            member.stop();
        }
    }
}

impl Drop for VlGroup {
    /// Stops the members still running, then removes their data dirs.
    fn drop(&mut self) {
        for member in self.members.drain(..).flatten() {
            member.stop();
        }
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A fresh client of the view leader at `viewleader` (`None`: probe `candidates` in order,
/// as `--viewleader A,B,C` does), falling back on `candidates`, whose command has the
/// deadline `timeout`; `handle` is the network driver it sends through.
fn client(
    handle: &Handle,
    viewleader: Option<SocketAddr>,
    candidates: &[SocketAddr],
    timeout: Duration,
) -> Client {
    // The target of the unreplicated commands, none of which is used here.
    let server = "127.0.0.1:1".parse().unwrap();
    Client::new(
        handle.clone(),
        viewleader,
        candidates.to_vec(),
        server,
        Some(timeout),
    )
}

/// The group leader that the view-leader member at `member` names in its `query_servers`
/// answer (itself when it is a group of one), asked through `handle` with a 500 ms bound;
/// `None` without such an answer (no leader yet, or a view leader still gathering servers).
fn leader_named_by(handle: &Handle, member: SocketAddr) -> Option<SocketAddr> {
    let body = Request::QueryServers.encode().ok()?;
    let deadline = Instant::now() + Duration::from_millis(500);
    let answer = handle.call(member, body, Some(deadline)).ok()?;
    match Response::decode(&answer).ok()? {
        Response::Servers { leader, .. } => Some(leader.unwrap_or(member)),
        _ => None,
    }
}

/// Polls `probe` every 20 ms until it returns a value, and returns it; panics naming `what`
/// after [`SETTLE`].
fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + SETTLE;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "no {what} within {SETTLE:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// One printed latency line: its label and samples.
type Row = (String, Vec<Duration>);

/// A measured case: its label and the operation it times (given the operation's number).
type Case<'a> = (String, Box<dyn FnMut(usize) + 'a>);

/// Times `cases` side by side, `n` operations each: every case is warmed up with
/// [`WARMUP`] unmeasured operations, then they take turns for [`ROUNDS`] rounds, so that a
/// drift of the machine falls on all of them alike. Returns a row per case, in order.
fn interleaved(mut cases: Vec<Case<'_>>, n: usize) -> Vec<Row> {
    for (_, op) in &mut cases {
        for i in 0..WARMUP {
            op(i);
        }
    }
    let per_round = n / ROUNDS;
    let mut samples = vec![Vec::with_capacity(n); cases.len()];
    for round in 0..ROUNDS {
        for ((_, op), samples) in cases.iter_mut().zip(&mut samples) {
            for i in 0..per_round {
                let t = Instant::now();
                op(WARMUP + round * per_round + i);
                samples.push(t.elapsed());
            }
        }
    }
    cases
        .into_iter()
        .map(|(label, _)| label)
        .zip(samples)
        .collect()
}

/// Prints `rows` under `title`: percentiles and the median as a multiple of `rtt`.
fn print_rows(title: &str, rows: &mut [Row], rtt: Duration) {
    println!("\n{title}");
    for (label, samples) in rows {
        let p50 = support::median(samples);
        println!(
            "  {label:<LABEL$} {}  ({:.1} x UDP RTT)",
            percentiles(samples),
            p50.as_secs_f64() / rtt.as_secs_f64()
        );
    }
}

/// The case `label`: one `query_servers` at the member `at` by a fresh client given only
/// `at`, through `handle`.
fn query_case<'a>(label: &str, handle: &'a Handle, at: SocketAddr) -> Case<'a> {
    let op = move |_| {
        client(handle, Some(at), &[], OP_TIMEOUT)
            .query_servers()
            .expect("query_servers");
    };
    (label.to_string(), Box::new(op))
}

/// The case `label`: `lock_get` then `lock_release` of one free lock at the member `at`, by
/// a fresh client given only `at`, through `handle`.
fn lock_case<'a>(label: &str, handle: &'a Handle, at: SocketAddr) -> Case<'a> {
    let never = crossbeam_channel::never::<()>();
    let op = move |_| {
        let mut client = client(handle, Some(at), &[], OP_TIMEOUT);
        let claim = client.lock_get("bench", "me", &never).expect("lock_get");
        client
            .lock_release("bench", "me", Some(claim))
            .expect("lock_release");
    };
    (label.to_string(), Box::new(op))
}

/// Starts 3 servers on `vl` (heartbeat [`HEARTBEAT`]): given the one member of a group of
/// one, as a single view leader is run; given every member of a larger group as candidates.
/// Waits until the view, asked at `leader` through `handle`, holds all three and is not
/// rebalancing, and a `setr` succeeds; returns the servers.
fn servers(handle: &Handle, vl: &VlGroup, leader: SocketAddr) -> Vec<Running> {
    let servers: Vec<Running> = (0..3)
        .map(|_| match vl.addrs.as_slice() {
            [one] => support::server(*one, HEARTBEAT),
            all => support::server_of_group(all.to_vec(), HEARTBEAT),
        })
        .collect();
    wait_for("view of 3 servers, not rebalancing", || {
        let info = client(handle, Some(leader), &vl.addrs, OP_TIMEOUT)
            .query_servers()
            .ok()?;
        (info.view.members.len() == 3 && !info.rebalancing).then_some(())
    });
    wait_for("cluster taking a setr", || {
        client(handle, Some(leader), &vl.addrs, OP_TIMEOUT)
            .setr("warm", "up", SetrHooks::default())
            .ok()
    });
    servers
}

/// The key of data-path operation `i` (1000 keys, all written before any is read).
fn key(i: usize) -> String {
    format!("key{}", i % KEYS)
}

/// `setr` (100 B values) and `getr` latency with 3 servers behind each of `groups` (a name,
/// the view-leader group and its leader), side by side: with a view cache per case (as
/// `client bench` keeps one), and with a view fetched from the view leader per operation.
/// Every client is given the leader and the group's members, through `handle`.
fn data_path(handle: &Handle, groups: &[(&str, &VlGroup, SocketAddr)]) -> Vec<Row> {
    let servers: Vec<Vec<Running>> = groups
        .iter()
        .map(|&(_, vl, leader)| servers(handle, vl, leader))
        .collect();
    let value = "v".repeat(100);
    for &(_, vl, leader) in groups {
        for i in 0..KEYS {
            client(handle, Some(leader), &vl.addrs, OP_TIMEOUT)
                .setr(&key(i), &value, SetrHooks::default())
                .expect("setr of a key to read");
        }
    }
    let mut cases: Vec<Case<'_>> = Vec::new();
    for cached in [true, false] {
        let how = if cached { "cached view" } else { "view per op" };
        for write in [true, false] {
            for &(name, vl, leader) in groups {
                let cache = cached.then(ViewCache::default);
                let make = move || {
                    let c = client(handle, Some(leader), &vl.addrs, OP_TIMEOUT);
                    match &cache {
                        Some(cache) => c.with_view_cache(cache.clone()),
                        None => c,
                    }
                };
                if write {
                    let value = value.clone();
                    let op = move |i| {
                        make()
                            .setr(&key(i), &value, SetrHooks::default())
                            .expect("setr");
                    };
                    cases.push((format!("setr, {name}, {how}"), Box::new(op)));
                } else {
                    let op = move |i| {
                        make().getr(&key(i)).expect("getr");
                    };
                    cases.push((format!("getr, {name}, {how}"), Box::new(op)));
                }
            }
        }
    }
    let rows = interleaved(cases, OPS);
    for server in servers.into_iter().flatten() {
        server.stop();
    }
    rows
}

/// One `setr` of the failover loop.
struct Attempt {
    /// When it began.
    started: Instant,
    /// When it returned.
    finished: Instant,
    /// Its error's kind and message, if it failed.
    error: Option<(&'static str, String)>,
}

/// The failover loop: until `stop` is set, `setr`s one after the other, each by a fresh
/// client given every member of the group (`candidates`, probed as `--viewleader A,B,C`
/// does) and no cached view, logging each attempt into `log`.
fn setr_loop(
    handle: Handle,
    candidates: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Attempt>>>,
) {
    let mut n = 0usize;
    while !stop.load(Ordering::Acquire) {
        let started = Instant::now();
        let outcome = client(&handle, None, &candidates, OP_TIMEOUT).setr(
            &format!("fo{}", n % 100),
            "value",
            SetrHooks::default(),
        );
        let failed = outcome.is_err();
        log.lock().unwrap().push(Attempt {
            started,
            finished: Instant::now(),
            error: outcome.err().map(|e| (e.kind.as_str(), e.message)),
        });
        if failed {
            thread::sleep(RETRY_PAUSE);
        }
        n += 1;
    }
}

/// A view as compared across a failover: its epoch and its servers' ids (sorted).
type ViewIds = (Epoch, Vec<ServerId>);

/// The view as a fresh client given `candidates` sees it, if one answers in time.
fn view_ids(handle: &Handle, candidates: &[SocketAddr]) -> Option<ViewIds> {
    let info = client(handle, None, candidates, Duration::from_secs(1))
        .query_servers()
        .ok()?;
    let mut ids: Vec<ServerId> = info.view.members.iter().map(|m| m.id).collect();
    ids.sort();
    Some((info.view.epoch, ids))
}

/// What one failover run saw.
struct Failover {
    /// From the leader's stop to the end of the first `setr` begun after it that
    /// succeeded (`None`: none within [`RECOVERY_BOUND`]).
    recovery: Option<Duration>,
    /// `setr`s that ended after the stop and failed (until the first success): their kinds
    /// and messages.
    failures: Vec<(&'static str, String)>,
    /// The longest `setr` that ended from the stop through the first success (included):
    /// how long a client waited at most.
    longest: Duration,
    /// The stopped leader's place and the new leader's place in the group.
    places: (usize, Option<usize>),
    /// The view before the stop.
    before: ViewIds,
    /// Every distinct view seen from the stop until [`ViewLeaderConfig::dead_after`] plus a
    /// second after the recovery, in order.
    after: Vec<ViewIds>,
}

/// One failover run on a fresh cluster (a group of 3, 3 servers, the `setr` loop; see the
/// crate doc); `handle` is the network driver the loop and the checks send through.
fn failover(handle: &Handle) -> Failover {
    let mut vl = VlGroup::start(3, false);
    let leader = vl.leader(handle);
    let servers = servers(handle, &vl, leader);
    let before = wait_for("view before the failover", || view_ids(handle, &vl.addrs));
    let stop_loop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::new()));
    let looping = {
        let (handle, candidates) = (handle.clone(), vl.addrs.clone());
        let (stop, log) = (Arc::clone(&stop_loop), Arc::clone(&log));
        thread::spawn(move || setr_loop(handle, candidates, stop, log))
    };
    wait_for("setr loop running", || {
        let log = log.lock().unwrap();
        (log.iter().filter(|a| a.error.is_none()).count() >= 3).then_some(())
    });
    let stopped_at = Instant::now();
    vl.stop(leader);
    // The first success begun after the stop.
    let bound = stopped_at + RECOVERY_BOUND;
    let recovered_at = loop {
        let first = log
            .lock()
            .unwrap()
            .iter()
            .find(|a| a.started >= stopped_at && a.error.is_none())
            .map(|a| a.finished);
        if first.is_some() || Instant::now() >= bound {
            break first;
        }
        thread::sleep(Duration::from_millis(5));
    };
    // Servers silent for `dead_after` would leave by then (the election gives them a fresh
    // one); watch the view that long after the recovery, and a second more.
    let dead_after = ViewLeaderConfig::default().dead_after;
    let watch_until = recovered_at.unwrap_or(bound) + dead_after + Duration::from_secs(1);
    let alive = vl.alive();
    let mut after: Vec<ViewIds> = Vec::new();
    while Instant::now() < watch_until {
        if let Some(view) = view_ids(handle, &alive)
            && after.last() != Some(&view)
        {
            after.push(view);
        }
        thread::sleep(VIEW_SAMPLE);
    }
    let new_leader = alive
        .iter()
        .find_map(|&member| leader_named_by(handle, member))
        .and_then(|leader| vl.addrs.iter().position(|&a| a == leader));
    stop_loop.store(true, Ordering::Release);
    looping.join().expect("setr loop");
    for server in servers {
        server.stop();
    }
    let log = log.lock().unwrap();
    let until = recovered_at.unwrap_or(bound);
    let affected: Vec<&Attempt> = log
        .iter()
        .filter(|a| a.finished > stopped_at && a.finished <= until)
        .collect();
    Failover {
        recovery: recovered_at.map(|t| t - stopped_at),
        failures: affected.iter().filter_map(|a| a.error.clone()).collect(),
        longest: affected
            .iter()
            .map(|a| a.finished - a.started)
            .max()
            .unwrap_or_default(),
        places: (
            vl.addrs.iter().position(|&a| a == leader).unwrap(),
            new_leader,
        ),
        before,
        after,
    }
}

/// Prints one failover run, numbered `run`.
fn print_failover(run: usize, f: &Failover) {
    let recovery = match f.recovery {
        Some(d) => format!("{:>7.1} ms", d.as_secs_f64() * 1e3),
        None => format!("none within {RECOVERY_BOUND:?}"),
    };
    let mut kinds: Vec<String> = Vec::new();
    for (kind, _) in &f.failures {
        let n = f.failures.iter().filter(|(k, _)| k == kind).count();
        let entry = format!("{n} {kind}");
        if !kinds.contains(&entry) {
            kinds.push(entry);
        }
    }
    let failed = if kinds.is_empty() {
        "no setr failed".to_string()
    } else {
        format!("failed setrs: {}", kinds.join(", "))
    };
    let (epoch, ids) = &f.before;
    let same = f.after.iter().all(|(_, after)| after == ids);
    let epochs: Vec<String> = f.after.iter().map(|(e, _)| e.to_string()).collect();
    let leader = f
        .places
        .1
        .map_or("none".to_string(), |place| format!("member {place}"));
    println!(
        "  run {run}: first setr after the stop {recovery}  (longest setr until then {:.1} ms; \
         {failed}); leader member {} -> {leader}",
        f.longest.as_secs_f64() * 1e3,
        f.places.0,
    );
    println!(
        "         view before: epoch {epoch}, {} servers; views seen after: epochs [{}]; {}",
        ids.len(),
        epochs.join(", "),
        if same && !f.after.is_empty() {
            "same server ids, no server left"
        } else {
            "SERVER IDS CHANGED (a server left or rejoined)"
        }
    );
    let (first, last) = (f.failures.first(), f.failures.last());
    if let Some((kind, message)) = first {
        println!("         first failure: {kind}: {message}");
    }
    if let Some((kind, message)) = last.filter(|&l| Some(l) != first) {
        println!("         last failure:  {kind}: {message}");
    }
}

/// Runs every measurement and prints the figures.
fn main() {
    let started = Instant::now();
    let (handle, _requests, _driver) =
        net::spawn(support::socket(), NetConfig::default()).expect("client network driver");
    let mut udp = support::raw_udp_round_trips(10_000);
    let rtt = support::median(&mut udp);
    println!(
        "  {:<LABEL$} {}",
        "raw UDP round trip (reference)",
        percentiles(&mut udp)
    );

    // All three groups run through sections 1 and 2, their cases taking turns.
    let one = VlGroup::start(1, false);
    let three = VlGroup::start(3, false);
    let durable = VlGroup::start(3, true);
    let at_one = one.leader(&handle);
    let leader = three.leader(&handle);
    let follower = three.follower(leader);
    let durable_leader = durable.leader(&handle);
    let mut query = interleaved(
        vec![
            query_case("group of 1", &handle, at_one),
            query_case("group of 3, at the leader", &handle, leader),
            query_case("group of 3, at a follower (forwarded)", &handle, follower),
        ],
        OPS,
    );
    let mut locks = interleaved(
        vec![
            lock_case("group of 1", &handle, at_one),
            lock_case("group of 3, at the leader", &handle, leader),
            lock_case("group of 3, at a follower (forwarded)", &handle, follower),
            lock_case(
                "group of 3, at the leader, data dir (fsync)",
                &handle,
                durable_leader,
            ),
        ],
        OPS,
    );
    drop(durable);
    let mut data = data_path(
        &handle,
        &[("group of 1", &one, at_one), ("group of 3", &three, leader)],
    );
    drop((one, three));
    print_rows(
        &format!("query_servers, {OPS} sequential calls, fresh client each, cases interleaved"),
        &mut query,
        rtt,
    );
    print_rows(
        &format!("lock_get + lock_release pair, {OPS} sequential pairs, one free lock"),
        &mut locks,
        rtt,
    );
    print_rows(
        &format!("setr (100 B) / getr with 3 servers, {OPS} sequential ops each, interleaved"),
        &mut data,
        rtt,
    );

    println!(
        "\nfailover: group of 3 + 3 servers (heartbeat {HEARTBEAT:?}, dead after {:?}), setr \
         loop given all 3 members; leader stopped",
        ViewLeaderConfig::default().dead_after
    );
    let mut recoveries = Vec::new();
    for run in 1..=FAILOVERS {
        let f = failover(&handle);
        print_failover(run, &f);
        recoveries.extend(f.recovery);
    }
    if recoveries.is_empty() {
        println!("  median: no run recovered");
    } else {
        let n = recoveries.len();
        println!(
            "  median of {n} runs: {:.1} ms from the stop to the first successful setr",
            support::median(&mut recoveries).as_secs_f64() * 1e3
        );
    }
    println!("\n(whole run: {:.1} s)", started.elapsed().as_secs_f64());
}
