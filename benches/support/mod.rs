//! What the benchmarks share: in-process nodes on loopback and percentile formatting.

#![allow(dead_code)] // Each benchmark uses a different part of this module.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use trireme::runtime::net::{self, NetConfig};
use trireme::runtime::node::{self, Running};
use trireme::server::{Server, ServerConfig};
use trireme::util::rng::Rng;
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

/// Starts a server in-process that looks for the view leader among `candidates` (the members
/// of a view-leader group, as `--viewleader A,B,C` gives them: probed first, and again when
/// the one in use stops answering), heartbeating every `heartbeat`.
pub fn server_of_group(candidates: Vec<SocketAddr>, heartbeat: Duration) -> Running {
    let socket = socket();
    let config = ServerConfig {
        advertise: socket.local_addr().unwrap(),
        viewleader: None,
        heartbeat_interval: heartbeat,
        candidates,
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

/// Datagrams sent in each raw UDP measurement.
pub const RAW_DATAGRAMS: u64 = 100_000;

/// What a raw UDP run delivered.
pub struct RawRun {
    /// Datagrams received.
    pub received: u64,
    /// Bytes received.
    pub bytes: u64,
    /// From the first send to the last datagram received.
    pub elapsed: Duration,
}

/// Sends [`RAW_DATAGRAMS`] datagrams of the layer's size from one loopback socket to another,
/// keeping at most `window` unreceived (if set), and reports what the receiver got.
pub fn raw_udp(window: Option<u64>) -> RawRun {
    let size = trireme::reliable::Config::default().max_datagram;
    let rx = socket();
    rx.set_nonblocking(false).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let rx_addr = rx.local_addr().unwrap();
    let tx: UdpSocket = socket();
    tx.set_nonblocking(false).unwrap();
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = std::sync::Arc::clone(&received);
    let started = Instant::now();
    let receiver = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let (mut count, mut bytes, mut last) = (0, 0, Instant::now());
        while let Ok((n, _)) = rx.recv_from(&mut buf) {
            last = Instant::now();
            count += 1;
            bytes += n as u64;
            counter.store(count, std::sync::atomic::Ordering::Release);
            if count == RAW_DATAGRAMS {
                break;
            }
        }
        (count, bytes, last)
    });
    let payload = vec![0x5au8; size];
    for sent in 0..RAW_DATAGRAMS {
        if let Some(window) = window {
            while sent - received.load(std::sync::atomic::Ordering::Acquire) >= window {
                std::hint::spin_loop();
            }
        }
        tx.send_to(std::hint::black_box(&payload), rx_addr).unwrap();
    }
    let (count, bytes, last) = receiver.join().unwrap();
    RawRun {
        received: count,
        bytes,
        elapsed: last.saturating_duration_since(started),
    }
}

/// Raw one-way loopback UDP throughput in MB/s at the layer's datagram size, with the
/// layer's window of datagrams in flight: the reference for transfer throughput.
pub fn raw_udp_megabytes_per_second() -> f64 {
    let window = u64::from(trireme::reliable::Config::default().window);
    let run = raw_udp(Some(window));
    run.bytes as f64 / run.elapsed.as_secs_f64() / 1e6
}
