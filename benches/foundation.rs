//! Foundation figures, printed (run with `cargo bench --bench foundation`):
//!
//! 1. request/response round trip through the reliable layer on loopback, in-process:
//!    p50/p90/p99/max over 10 000 sequential requests, clean and with 10% loss injected on
//!    both sides, and clean with both sides writing a `--trace` pcap; plus the raw UDP round
//!    trip on the same loopback for reference;
//! 2. time from a server's death to the view leader's epoch change, with the default
//!    heartbeat interval (500 ms) and `--dead-after-ms` (2000 ms).

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use trireme::faults::FaultSpec;
use trireme::runtime::net::{self, NetConfig};
use trireme::runtime::trace::Tracer;
use trireme::util::rng::Rng;

use support::percentiles;

/// Requests per round-trip measurement.
const REQUESTS: usize = 10_000;

/// A `--trace` file in the temp directory for one side of a measurement, or none.
fn tracer(traced: bool, side: &str) -> Option<Tracer> {
    traced.then(|| {
        let path =
            std::env::temp_dir().join(format!("trireme-bench-{}-{side}.pcap", std::process::id()));
        Tracer::create(&path).unwrap()
    })
}

/// Starts an echo responder on loopback with `faults` (tracing if `traced`); returns its
/// address.
fn echo_responder(faults: FaultSpec, traced: bool) -> SocketAddr {
    let socket = support::socket();
    let config = NetConfig {
        faults,
        trace: tracer(traced, "responder"),
        ..NetConfig::default()
    };
    let (handle, requests, _thread) = net::spawn(socket, config).unwrap();
    let addr = handle.local_addr();
    std::thread::spawn(move || {
        for request in requests {
            let _ = handle.respond(request.id, request.body);
        }
    });
    addr
}

/// Measures `REQUESTS` sequential 64-byte requests to an echo responder, both sides
/// writing a `--trace` file if `traced`.
fn round_trips(label: &str, faults: &str, traced: bool) {
    let spec: FaultSpec = faults.parse().unwrap();
    let responder = echo_responder(spec, traced);
    let socket = support::socket();
    let (handle, _requests, _thread) = net::spawn(
        socket,
        NetConfig {
            faults: spec,
            trace: tracer(traced, "requester"),
            ..NetConfig::default()
        },
    )
    .unwrap();
    let body = vec![7u8; 64];
    for _ in 0..200 {
        handle.call(responder, body.clone(), None).unwrap();
    }
    let mut samples = Vec::with_capacity(REQUESTS);
    let started = Instant::now();
    for _ in 0..REQUESTS {
        let t = Instant::now();
        handle
            .call(responder, body.clone(), None)
            .expect("answered");
        samples.push(t.elapsed());
    }
    let elapsed = started.elapsed();
    let stats = handle.stats().unwrap();
    println!(
        "{label:<30} {}  ({:.0} req/s, {} retransmissions)",
        percentiles(&mut samples),
        REQUESTS as f64 / elapsed.as_secs_f64(),
        stats.retransmissions
    );
}

/// Raw UDP round trip between two std sockets on loopback (no layer), for reference.
fn raw_udp() {
    let mut samples = support::raw_udp_round_trips(REQUESTS);
    println!(
        "{:<30} {}",
        "raw UDP echo (reference)",
        percentiles(&mut samples)
    );
}

/// Runs a view leader and one server in-process with default settings, stops the server,
/// and returns the time until the view leader's epoch changes.
fn death_to_epoch_change() -> Duration {
    let vl = support::viewleader();
    let server = support::server(vl.addr(), Duration::from_millis(500));
    let (probe, _requests, _thread) = net::spawn(support::socket(), NetConfig::default()).unwrap();
    let epoch = || {
        let body = trireme::wire::message::Request::QueryServers
            .encode()
            .unwrap();
        let answer = probe.call(vl.addr(), body, None).unwrap();
        match trireme::wire::message::Response::decode(&answer).unwrap() {
            trireme::wire::message::Response::Servers { view, .. } => view.epoch.0,
            other => panic!("{other:?}"),
        }
    };
    while epoch() != 1 {
        std::thread::sleep(Duration::from_millis(5));
    }
    // Die at a random point of the heartbeat cycle.
    std::thread::sleep(Duration::from_millis(Rng::from_entropy().below(500)));
    server.stop();
    let died = Instant::now();
    while epoch() == 1 {
        std::thread::sleep(Duration::from_millis(5));
    }
    died.elapsed()
}

/// Prints every figure.
fn main() {
    println!("== request/response round trip, {REQUESTS} sequential requests, 64-byte bodies ==");
    raw_udp();
    round_trips("reliable layer, clean", "", false);
    round_trips("reliable layer, clean, traced", "", true);
    round_trips("reliable layer, 10% loss", "loss=0.1", false);
    println!("== server death to epoch change (heartbeat 500 ms, dead-after 2000 ms) ==");
    let mut samples: Vec<Duration> = (0..5).map(|_| death_to_epoch_change()).collect();
    samples.sort();
    let ms: Vec<String> = samples
        .iter()
        .map(|d| format!("{}", d.as_millis()))
        .collect();
    println!("5 trials, ms: {}", ms.join(" "));
}
