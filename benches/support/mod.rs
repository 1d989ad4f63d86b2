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
