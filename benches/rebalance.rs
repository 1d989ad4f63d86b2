//! Rebalancing figures, printed (run with `cargo bench --bench rebalance`):
//!
//! 1. copies sent vs. the theoretical minimum for a join and a departure with 10 servers and
//!    100 000 keys (3 replicas, 64 vnodes), computed by the planner the servers run;
//! 2. throughput of a real rebalance on loopback: one server holding 100 000 keys of 1 KiB,
//!    a second joins, and every key is copied to it (time from the join until the view
//!    leader reports the epoch complete);
//! 3. the refusal window after a view change with the default heartbeat interval (500 ms):
//!    how long `rebalancing` stays true after a join with little data;
//! 4. issue 17, what users see during a view change: 10 000 keys of 100 B on 5 servers at the
//!    default flags, 8 workers alternating `getr` and `setr` over every key while a sixth
//!    server joins, then while one is killed: failures on keys whose replica set did not
//!    change (goal: none), how long after the view change moved keys were still refused (goal:
//!    under 100 ms), and the longest stretch with no successful operation
//!    ([`trireme::cli::bench::churn`]). `cargo bench --bench rebalance -- churn` prints
//!    this figure alone;
//! 5. issue 17, a Jepsen-style run: the real binaries, 5 servers (heartbeat 300 ms,
//!    `--dead-after-ms 1500`), 6 workers on 3 keys for 40 s; every 4 s one server is killed
//!    and replaced, or frozen (SIGSTOP) for 2-3 s and thawed: the longest stretch with no
//!    successful operation on any key (goal: under 0.5 s), and failed `getr`s (goal: none).
//!    `cargo bench --bench rebalance -- nemesis` prints this figure alone.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use trireme::client::Client;
use trireme::placement::rebalance::{self, Held};
use trireme::placement::ring::Ring;
use trireme::placement::view::{Epoch, Member, ServerId, View};
use trireme::runtime::net::{self, Handle, NetConfig};
use trireme::runtime::node::Running;
use trireme::util::rng::Rng;

/// `n` members with ids from a fixed seed.
fn members(n: usize, seed: u64) -> Vec<Member> {
    let mut rng = Rng::seeded(seed);
    (0..n)
        .map(|i| Member {
            id: ServerId::random(&mut rng),
            addr: SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
        })
        .collect()
}

/// A view of `members` at `epoch` (3 replicas, 64 vnodes).
fn view(epoch: u64, members: &[Member]) -> View {
    let mut members = members.to_vec();
    members.sort_by_key(|m| m.id);
    View {
        epoch: Epoch(epoch),
        members,
        replicas: 3,
        vnodes: 64,
    }
}

/// Copies every surviving server's plan sends from `before` to `after`, and the minimum: one
/// copy per (key, replica in `after` that was not a replica in `before`).
fn copies(before: &View, after: &View, keys: &[String]) -> (usize, usize) {
    let (old_ring, new_ring) = (Ring::new(before), Ring::new(after));
    let mut minimum = 0;
    let mut buckets: Vec<(ServerId, Vec<&String>)> =
        before.members.iter().map(|m| (m.id, Vec::new())).collect();
    for key in keys {
        let old: BTreeSet<ServerId> = old_ring.replicas(key, 3).iter().map(|m| m.id).collect();
        minimum += new_ring
            .replicas(key, 3)
            .iter()
            .filter(|m| !old.contains(&m.id))
            .count();
        for (id, bucket) in &mut buckets {
            if old.contains(id) {
                bucket.push(key);
            }
        }
    }
    let sent = buckets
        .iter()
        .filter(|(id, _)| after.contains(*id))
        .map(|(id, bucket)| {
            rebalance::plan(
                *id,
                before,
                after,
                bucket.iter().map(|k| Held {
                    key: k,
                    stray: false,
                    candidate: false,
                }),
            )
            .copies()
        })
        .sum();
    (sent, minimum)
}

/// A client with a 60 s bound.
fn client(handle: &Handle, vl: SocketAddr, server: SocketAddr) -> Client {
    Client::new(
        handle.clone(),
        Some(vl),
        Vec::new(),
        server,
        Some(Duration::from_secs(60)),
    )
}

/// Waits until the view has `n` servers and is not rebalancing; returns the wait.
fn settle(handle: &Handle, vl: SocketAddr, n: usize) -> Duration {
    let started = Instant::now();
    loop {
        if let Ok(info) = client(handle, vl, vl).query_servers()
            && info.view.members.len() == n
            && !info.rebalancing
        {
            return started.elapsed();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Prints every figure.
fn main() {
    // `cargo bench --bench rebalance -- churn` prints figure 4 only, `-- nemesis` figure 5.
    let only = |name: &str| std::env::args().any(|a| a == name);
    if only("churn") || only("nemesis") {
        let (handle, _requests, _thread) =
            net::spawn(support::socket(), NetConfig::default()).unwrap();
        if only("churn") {
            churn(&handle);
        }
        if only("nemesis") {
            nemesis(&handle);
        }
        return;
    }
    let keys: Vec<String> = (0..100_000).map(|i| format!("key{i}")).collect();
    let eleven = members(11, 7);
    let (join_sent, join_min) = copies(&view(1, &eleven[..10]), &view(2, &eleven), &keys);
    let (leave_sent, leave_min) = copies(&view(1, &eleven[..10]), &view(2, &eleven[1..10]), &keys);
    println!("== copies sent vs. minimum, 10 servers, 100000 keys, 3 replicas, 64 vnodes ==");
    println!("one joins:  {join_sent} copies sent, minimum {join_min}");
    println!("one leaves: {leave_sent} copies sent, minimum {leave_min}");

    let (handle, _requests, _thread) = net::spawn(support::socket(), NetConfig::default()).unwrap();
    // A short heartbeat, so that the old server learns the view change (from its next
    // heartbeat acknowledgement) within 20 ms: what is timed is the data moving.
    let heartbeat = Duration::from_millis(20);
    let vl = support::viewleader();
    let mut nodes: Vec<Running> = vec![support::server(vl.addr(), heartbeat)];
    settle(&handle, vl.addr(), 1);
    let value = "v".repeat(1024);
    let loading = Instant::now();
    for key in &keys {
        client(&handle, vl.addr(), nodes[0].addr())
            .set(key, &value)
            .expect("set");
    }
    println!(
        "== rebalance throughput: 100000 keys of 1 KiB, loaded with raw set in {:.1} s ==",
        loading.elapsed().as_secs_f64()
    );
    // The raw writes are strays: the next view change sends every one to its replicas.
    let join = Instant::now();
    let joiner = support::server(vl.addr(), heartbeat);
    let joiner_addr = joiner.addr();
    nodes.push(joiner);
    // The data phase: from the view change to the last key held by the new server (the
    // old server learns the view at its next heartbeat, up to 20 ms into this).
    while client(&handle, vl.addr(), vl.addr())
        .query_servers()
        .map_or(0, |i| i.view.members.len())
        < 2
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    let view_changed = Instant::now();
    // Batches go out in key order, a few at a time per destination: once the greatest key
    // has arrived, only the last batches can be missing. (Polling the whole key list from the
    // start would slow the transfer it measures.)
    let last = keys.iter().max().expect("keys");
    while client(&handle, vl.addr(), joiner_addr).get(last).is_err() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while client(&handle, vl.addr(), joiner_addr)
        .query_all_keys()
        .map_or(0, |k| k.len())
        < keys.len()
    {
        assert!(
            Instant::now() < deadline,
            "every key reaches the new server"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let moved = view_changed.elapsed();
    settle(&handle, vl.addr(), 2);
    let took = join.elapsed();
    let megabytes = keys.iter().map(|k| k.len() + value.len()).sum::<usize>() as f64 / 1e6;
    let udp = support::raw_udp_megabytes_per_second();
    let data_rate = megabytes / moved.as_secs_f64();
    println!(
        "join to completion: {:.2} s for {megabytes:.1} MB = {:.1} MB/s (heartbeat 20 ms)",
        took.as_secs_f64(),
        megabytes / took.as_secs_f64()
    );
    println!(
        "view change to every key at the new server: {:.2} s = {data_rate:.1} MB/s; raw \
         loopback UDP one way, same run: {udp:.1} MB/s; ratio {:.0}%",
        moved.as_secs_f64(),
        data_rate / udp * 100.0
    );

    let vl = support::viewleader();
    let default_heartbeat = Duration::from_millis(500);
    nodes.extend((0..3).map(|_| support::server(vl.addr(), default_heartbeat)));
    settle(&handle, vl.addr(), 3);
    let mut windows = Vec::new();
    for n in 4..=6 {
        nodes.push(support::server(vl.addr(), default_heartbeat));
        while client(&handle, vl.addr(), vl.addr())
            .query_servers()
            .map_or(0, |i| i.view.members.len())
            < n
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        windows.push(settle(&handle, vl.addr(), n).as_millis());
    }
    println!("== refusal window after a join, default heartbeat 500 ms, 3 joins (ms) ==");
    println!("{windows:?}");
    drop(nodes);

    churn(&handle);
}

/// Figure 4 (issue 17): a load on 10 000 keys of 100 B over 5 servers while a sixth joins
/// and then while one is killed (see the module doc).
fn churn(handle: &Handle) {
    use std::sync::Arc;
    use trireme::cli::bench::churn::{self, Load};
    const WORKERS: usize = 8;
    let heartbeat = Duration::from_millis(500);
    let vl = support::viewleader();
    let mut nodes: Vec<Running> = (0..5)
        .map(|_| support::server(vl.addr(), heartbeat))
        .collect();
    settle(handle, vl.addr(), 5);
    let keys: Arc<Vec<String>> = Arc::new((0..10_000).map(|i| format!("churn-{i}")).collect());
    let value = "v".repeat(100);
    let vl_addr = vl.addr();
    std::thread::scope(|scope| {
        for w in 0..16 {
            let keys = keys.clone();
            let value = value.clone();
            scope.spawn(move || {
                for key in keys.iter().skip(w).step_by(16) {
                    client(handle, vl_addr, vl_addr)
                        .setr(key, &value, Default::default())
                        .expect("preload setr");
                }
            });
        }
    });
    println!("== issue 17: 10000 keys of 100 B, 5 servers, {WORKERS} workers (getr/setr) ==");
    let view = |handle: &Handle| {
        client(handle, vl.addr(), vl.addr())
            .query_servers()
            .expect("view")
            .view
    };
    let mut change = |what: &str, act: &mut dyn FnMut(&mut Vec<Running>)| {
        let before = view(handle);
        let load = Load::start(
            handle,
            vl.addr(),
            keys.clone(),
            WORKERS,
            100,
            Duration::from_secs(5),
        );
        std::thread::sleep(Duration::from_millis(500));
        act(&mut nodes);
        let changed = loop {
            if view(handle).epoch > before.epoch {
                break Instant::now();
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let n = view(handle).members.len();
        settle(handle, vl.addr(), n);
        std::thread::sleep(Duration::from_millis(500));
        let records = load.stop();
        let after = view(handle);
        let report = churn::analyse(&records, &keys, &before, &after, changed);
        println!("{what}: {}", report.line());
    };
    change("a sixth server joins", &mut |nodes| {
        nodes.push(support::server(vl.addr(), heartbeat));
    });
    change("a server is killed (dead after 2000 ms)", &mut |nodes| {
        nodes.remove(0).stop();
    });
}

/// A real server process for figure 5, stopped (SIGKILL) when dropped.
struct Proc {
    /// The process.
    child: std::process::Child,
}

impl Drop for Proc {
    /// Kills and reaps the process.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Starts the `server` binary attached to `viewleader`, heartbeating every 300 ms, and
    /// waits for its first line.
    fn server(viewleader: SocketAddr) -> Proc {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_server"))
            .args(["--bind", "127.0.0.1:0", "--heartbeat-interval-ms", "300"])
            .args(["--viewleader", &viewleader.to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(match std::env::var_os("TRIREME_NEMESIS_LOGS") {
                // A debugging aid: each server's log in that directory.
                Some(dir) => {
                    static NEXT: std::sync::atomic::AtomicUsize =
                        std::sync::atomic::AtomicUsize::new(0);
                    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let path = std::path::Path::new(&dir).join(format!("server-{n}.log"));
                    std::process::Stdio::from(std::fs::File::create(path).expect("log file"))
                }
                None => std::process::Stdio::null(),
            })
            .spawn()
            .expect("server binary");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("first line");
        assert!(line.starts_with("listening on"), "{line}");
        Proc { child }
    }

    /// Sends `signal` to the process.
    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on a child we own and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }
}

/// Figure 5 (issue 17): the Jepsen-style run of the module doc.
fn nemesis(handle: &Handle) {
    use std::sync::Arc;
    use trireme::cli::bench::churn::{self, Load};
    use trireme::viewleader::{ViewLeader, ViewLeaderConfig};
    let config = ViewLeaderConfig {
        dead_after: Duration::from_millis(1500),
        ..ViewLeaderConfig::default()
    };
    let vl = trireme::runtime::node::start(
        ViewLeader::new(config),
        support::socket(),
        NetConfig::default(),
    )
    .expect("view leader");
    let mut servers: Vec<Proc> = (0..5).map(|_| Proc::server(vl.addr())).collect();
    settle(handle, vl.addr(), 5);
    let keys: Arc<Vec<String>> = Arc::new(vec!["x".into(), "y".into(), "z".into()]);
    for key in keys.iter() {
        client(handle, vl.addr(), vl.addr())
            .setr(key, "0", Default::default())
            .expect("preload setr");
    }
    let load = Load::start(
        handle,
        vl.addr(),
        keys.clone(),
        6,
        100,
        Duration::from_secs(5),
    );
    let started = Instant::now();
    let (mut kills, mut pauses) = (0, 0);
    let mut round = 0u64;
    while started.elapsed() < Duration::from_secs(40) {
        std::thread::sleep(Duration::from_secs(4));
        round += 1;
        let victim = (round as usize * 7) % servers.len();
        if round % 2 == 1 {
            kills += 1;
            drop(servers.remove(victim));
            servers.push(Proc::server(vl.addr()));
        } else {
            pauses += 1;
            servers[victim].signal(libc::SIGSTOP);
            std::thread::sleep(Duration::from_millis(2000 + 250 * (round % 5)));
            servers[victim].signal(libc::SIGCONT);
        }
    }
    let records = load.stop();
    let failed = |write: bool| {
        let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
        for r in records.iter().filter(|r| r.write == write) {
            if let Some(kind) = r.error {
                *kinds.entry(kind.to_string()).or_default() += 1;
            }
        }
        kinds
    };
    let ok = records.iter().filter(|r| r.error.is_none()).count();
    println!(
        "== issue 17: Jepsen-style run, 5 servers (heartbeat 300 ms, dead after 1500 ms), \
         6 workers on 3 keys, {:.0} s, {kills} kills+replacements, {pauses} pauses of 2-2.75 s ==",
        started.elapsed().as_secs_f64()
    );
    println!(
        "{} operations, {ok} succeeded; failed setr {:?}; failed getr {:?}; longest stretch \
         with no success {} ms",
        records.len(),
        failed(true),
        failed(false),
        churn::longest_gap(&records).as_millis()
    );
    if std::env::var_os("TRIREME_NEMESIS_DEBUG").is_some() {
        let mut sorted: Vec<&churn::Record> = records.iter().collect();
        sorted.sort_by_key(|r| r.end);
        let mut previous = started;
        let mut worst = (Duration::ZERO, started);
        for r in sorted.iter().filter(|r| r.error.is_none()) {
            if r.end.saturating_duration_since(previous) > worst.0 {
                worst = (r.end.saturating_duration_since(previous), previous);
            }
            previous = previous.max(r.end);
        }
        let (len, from) = worst;
        println!(
            "worst gap {} ms from {:.3} s",
            len.as_millis(),
            (from - started).as_secs_f64()
        );
        for r in sorted
            .iter()
            .filter(|r| r.end > from && r.start < from + len)
        {
            println!(
                "  {:.3}..{:.3} key {} {} {:?} {}",
                (r.start.saturating_duration_since(started)).as_secs_f64(),
                (r.end - started).as_secs_f64(),
                r.key,
                if r.write { "setr" } else { "getr" },
                r.error,
                r.message
            );
        }
    }
    drop(servers);
}
