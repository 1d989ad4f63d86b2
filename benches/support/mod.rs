//! What the benchmarks share: in-process nodes on loopback and percentile formatting.

#![allow(dead_code)] // Each benchmark uses a different part of this module.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use trireme::net::{self, NetConfig};
use trireme::node::{self, Running};
use trireme::rng::Rng;
use trireme::server::{Server, ServerConfig};
use trireme::viewleader::{ViewLeader, ViewLeaderConfig};

/// A fresh loopback socket on an OS-chosen port.
pub fn socket() -> UdpSocket {
    net::bind("127.0.0.1:0".parse().unwrap()).expect("bind")
}

/// Starts a view leader in-process with the default settings.
pub fn viewleader() -> Running {
    node::start(
        ViewLeader::new(ViewLeaderConfig::default()),
        socket(),
        NetConfig::default(),
    )
    .expect("view leader")
}

/// Starts a server in-process, attached to `viewleader`, heartbeating every `heartbeat`.
pub fn server(viewleader: SocketAddr, heartbeat: Duration) -> Running {
    let socket = socket();
    let config = ServerConfig {
        advertise: socket.local_addr().unwrap(),
        viewleader: Some(viewleader),
        heartbeat_interval: heartbeat,
        candidates: Vec::new(),
    };
    let server = Server::new(config, Rng::from_entropy(), Instant::now());
    node::start(server, socket, NetConfig::default()).expect("server")
}

/// Formats p50/p90/p99/max of `samples` (sorted in place) in microseconds.
pub fn percentiles(samples: &mut [Duration]) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    format!(
        "p50 {:>8.1} us  p90 {:>8.1} us  p99 {:>8.1} us  max {:>9.1} us",
        at(0.50).as_secs_f64() * 1e6,
        at(0.90).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6,
        samples[samples.len() - 1].as_secs_f64() * 1e6
    )
}

/// Round trips of `n` sequential 124-byte datagrams between two plain std sockets on
/// loopback (an echo thread, no reliable layer): the reference the targets are set against.
pub fn raw_udp_round_trips(n: usize) -> Vec<Duration> {
    let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let b_addr = b.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = b.recv_from(&mut buf) {
            let _ = b.send_to(&buf[..n], from);
        }
    });
    let mut buf = [0u8; 2048];
    let mut samples = Vec::with_capacity(n);
    for i in 0..(n + 200) {
        let t = Instant::now();
        a.send_to(&[7u8; 124], b_addr).unwrap();
        a.recv_from(&mut buf).unwrap();
        if i >= 200 {
            samples.push(t.elapsed());
        }
    }
    samples
}

/// The median of `samples` (sorted in place).
pub fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}
