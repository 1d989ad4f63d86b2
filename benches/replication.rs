//! Replication figures, printed (run with `cargo bench --bench replication`):
//! `setr` and `getr` latency through the library in-process (a view leader and 3 servers on
//! loopback, each on its own driver thread), p50/p90/p99 over 10 000 sequential operations;
//! and the same as whole `client` processes (release build), over 200 runs each.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use trireme::client::{Client, SetrHooks, ViewCache};
use trireme::runtime::net::{self, NetConfig};
use trireme::runtime::node::Running;

use support::percentiles;

/// Operations per in-process measurement.
const OPS: usize = 10_000;
/// Client processes per CLI measurement.
const RUNS: usize = 200;

/// Starts a view leader and `n` servers in-process (heartbeat 100 ms); the nodes run as long
/// as the returned values live.
fn cluster(n: usize) -> Vec<Running> {
    let vl = support::viewleader();
    let vl_addr = vl.addr();
    let mut nodes = vec![vl];
    nodes.extend((0..n).map(|_| support::server(vl_addr, Duration::from_millis(100))));
    nodes
}

/// A client for one operation with a 5 s bound.
fn client(handle: &net::Handle, vl: SocketAddr) -> Client {
    let server = "127.0.0.1:1".parse().unwrap();
    Client::new(
        handle.clone(),
        Some(vl),
        Vec::new(),
        server,
        Some(Duration::from_secs(5)),
    )
}

/// Measures in-process setr and getr.
fn in_process(vl: SocketAddr) {
    let socket = support::socket();
    let (handle, _requests, _t) = net::spawn(socket, NetConfig::default()).unwrap();
    // Wait for all three servers, then until every one learned the epoch (a setr succeeds).
    let deadline = Instant::now() + Duration::from_secs(10);
    while client(&handle, vl)
        .query_servers()
        .map_or(0, |i| i.view.members.len())
        < 3
    {
        assert!(Instant::now() < deadline, "servers never joined");
        std::thread::sleep(Duration::from_millis(20));
    }
    while client(&handle, vl)
        .setr("warm", "up", SetrHooks::default())
        .is_err()
    {
        assert!(Instant::now() < deadline, "cluster never became writable");
        std::thread::sleep(Duration::from_millis(20));
    }
    let value = "v".repeat(100);
    let mut udp = support::raw_udp_round_trips(OPS);
    let rtt = support::median(&mut udp);
    println!(
        "{:<34} {}",
        "raw UDP round trip (reference)",
        percentiles(&mut udp)
    );
    for cached in [false, true] {
        // A cache shared by every operation's client, as `client bench` keeps one.
        let cache = cached.then(ViewCache::default);
        let make = || {
            let c = client(&handle, vl);
            match &cache {
                Some(cache) => c.with_view_cache(cache.clone()),
                None => c,
            }
        };
        let mut setr = Vec::with_capacity(OPS);
        for i in 0..OPS {
            let key = format!("key{}", i % 1000);
            let t = Instant::now();
            make()
                .setr(&key, &value, SetrHooks::default())
                .expect("setr");
            setr.push(t.elapsed());
        }
        let mut getr = Vec::with_capacity(OPS);
        for i in 0..OPS {
            let key = format!("key{}", i % 1000);
            let t = Instant::now();
            make().getr(&key).expect("getr");
            getr.push(t.elapsed());
        }
        let how = if cached { "cached view" } else { "view per op" };
        let ratio = |samples: &mut Vec<Duration>| {
            support::median(samples).as_secs_f64() / rtt.as_secs_f64()
        };
        let (setr_ratio, getr_ratio) = (ratio(&mut setr), ratio(&mut getr));
        println!(
            "{:<34} {}  ({setr_ratio:.1} x UDP RTT)",
            format!("setr in-process, 100 B, {how}"),
            percentiles(&mut setr)
        );
        println!(
            "{:<34} {}  ({getr_ratio:.1} x UDP RTT)",
            format!("getr in-process, {how}"),
            percentiles(&mut getr)
        );
    }
}

/// Measures whole client processes.
fn processes(vl: SocketAddr) {
    let binary = concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/client");
    if !std::path::Path::new(binary).exists() {
        println!("(skipping CLI figures: build target/release/client first)");
        return;
    }
    let vl = vl.to_string();
    for command in ["setr", "getr"] {
        let mut samples = Vec::with_capacity(RUNS);
        for i in 0..RUNS {
            let key = format!("cli{}", i % 50);
            let mut args = vec!["--viewleader", vl.as_str(), command, key.as_str()];
            if command == "setr" {
                args.push("value");
            }
            let t = Instant::now();
            let status = Command::new(binary)
                .args(&args)
                .output()
                .expect("client runs")
                .status;
            samples.push(t.elapsed());
            assert!(status.success(), "{command} {key} failed");
        }
        println!(
            "{:<34} {}",
            format!("{command} as a client process"),
            percentiles(&mut samples)
        );
    }
}

/// Prints every figure.
fn main() {
    let nodes = cluster(3);
    let vl = nodes[0].addr();
    println!("== 3 servers, replicas 3, loopback, {OPS} sequential operations ==");
    in_process(vl);
    println!("== whole client processes, {RUNS} runs ==");
    processes(vl);
}
