//! Micro-benchmarks, printed (run with `cargo bench --bench micro`; add group names, e.g.
//! `cargo bench --bench micro -- exchange transfer`, to run only those, say under a profiler):
//!
//! 1. `codec`: header encode/decode; `encode_body`/`decode_body` of a `Prepare` (16-byte key,
//!    100-byte and 4 KiB values) and of a `Found`; an 8-range ack body;
//! 2. `ring`: `Ring::new` and `Ring::replicas` for 3, 10 and 50 servers of 64 vnodes;
//! 3. `exchange`, `exchange-full`: two sans-IO `Endpoint`s wired back to back in memory
//!    (virtual time, no sockets), a 64-byte request echoed back, with a small response cache
//!    and with a full one (100 000 entries);
//! 4. `transfer`: the same pair moving a 1 MiB request;
//! 5. `loopback`: a 1 MiB request through two `net::spawn` drivers on 127.0.0.1;
//! 6. `udp`: raw loopback UDP one-way throughput with the layer's 1400-byte datagrams, for
//!    comparison with 5.
//!
//! Each in-process figure runs its operation in batches (the batch doubled until it takes
//! 2 ms), for about 200 ms, and prints the median time per operation over the batches. A
//! counting global allocator then counts the allocations (and bytes asked for) of one more
//! batch, summed over all threads; it is switched off while time is measured, since its
//! atomic increments add a few percent to a 64-byte exchange. MB are 10^6 bytes.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::net::SocketAddr;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use trireme::placement::ring::Ring;
use trireme::placement::view::{Epoch, Member, ServerId, View};
use trireme::reliable::{Config, Endpoint, Event};
use trireme::runtime::net::{self, NetConfig};
use trireme::util::rng::Rng;
use trireme::wire::auth::{Auth, ClusterKey};
use trireme::wire::codec::{self, AckBody, HEADER_LEN, Header, Kind};
use trireme::wire::message::{Request, Response, TxId};

/// Whether allocations are being counted (off while time is measured).
static COUNTING: AtomicBool = AtomicBool::new(false);
/// Allocations (and reallocations) made while counting, by every thread.
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// Bytes asked for by those allocations.
static ALLOCATED_BYTES: AtomicU64 = AtomicU64::new(0);

/// The system allocator, counting every allocation and reallocation while [`COUNTING`].
struct CountingAllocator;

/// Counts one allocation of `size` bytes, if counting is on.
fn count_allocation(size: usize) {
    if COUNTING.load(Ordering::Relaxed) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED_BYTES.fetch_add(size as u64, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards its arguments unchanged to `System`, which upholds the
// `GlobalAlloc` contract; counting touches only atomics and never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    /// Counts, then allocates with the system allocator.
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_allocation(layout.size());
        // SAFETY: the caller's `layout` meets `alloc`'s contract, which `System` shares.
        unsafe { System.alloc(layout) }
    }

    /// Counts, then allocates zeroed memory with the system allocator.
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_allocation(layout.size());
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    /// Frees with the system allocator (not counted).
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` (through this type) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    /// Counts a reallocation as one allocation of the new size.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_allocation(new_size);
        // SAFETY: `ptr` was allocated by `System` with `layout`; the caller checks `new_size`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Every allocation of this benchmark goes through the counter.
#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Runs `op` `ops` times with allocation counting on; returns the allocations and the bytes
/// asked for per call (by every thread, so a driver's work in the meantime counts too).
fn allocations_per_op(ops: u64, mut op: impl FnMut()) -> (f64, f64) {
    let (count, bytes) = (
        ALLOCATIONS.load(Ordering::Relaxed),
        ALLOCATED_BYTES.load(Ordering::Relaxed),
    );
    COUNTING.store(true, Ordering::Relaxed);
    for _ in 0..ops {
        op();
    }
    COUNTING.store(false, Ordering::Relaxed);
    let count = ALLOCATIONS.load(Ordering::Relaxed) - count;
    let bytes = ALLOCATED_BYTES.load(Ordering::Relaxed) - bytes;
    (count as f64 / ops as f64, bytes as f64 / ops as f64)
}

/// What one operation costs.
struct Figure {
    /// Median time per operation, in nanoseconds.
    ns: f64,
    /// Allocations per operation.
    allocs: f64,
    /// Bytes allocated per operation.
    alloc_bytes: f64,
}

/// A batch runs at least this long once calibrated.
const BATCH: Duration = Duration::from_millis(2);
/// Each in-process figure is measured for about this long.
const MEASURE: Duration = Duration::from_millis(200);

/// Runs `op` in calibrated batches for about [`MEASURE`] and returns the median time per call
/// over the batches, with the allocations per call counted over one more batch.
fn measure(mut op: impl FnMut()) -> Figure {
    // Double the batch until it takes `BATCH`; this also warms caches and branch predictors.
    let mut batch = 1u64;
    loop {
        let started = Instant::now();
        for _ in 0..batch {
            op();
        }
        if started.elapsed() >= BATCH {
            break;
        }
        batch *= 2;
    }
    let mut per_op = Vec::new();
    let started = Instant::now();
    while started.elapsed() < MEASURE || per_op.len() < 5 {
        let t = Instant::now();
        for _ in 0..batch {
            op();
        }
        per_op.push(t.elapsed().as_secs_f64() * 1e9 / batch as f64);
    }
    per_op.sort_by(f64::total_cmp);
    let (allocs, alloc_bytes) = allocations_per_op(batch, op);
    Figure {
        ns: per_op[per_op.len() / 2],
        allocs,
        alloc_bytes,
    }
}

/// Prints one figure: time per operation, operations per second, MB/s when each operation
/// moves `bytes`, and allocations per operation.
fn report(label: &str, bytes: Option<usize>, figure: &Figure) {
    let throughput = match bytes {
        Some(bytes) => format!("{:>9.1} MB/s", bytes as f64 / figure.ns * 1e3),
        None => String::new(),
    };
    println!(
        "{label:<50} {:>12.1} ns/op {:>12.0} ops/s {throughput:>14} {:>7.1} allocs/op {:>9.0} B/op",
        figure.ns,
        1e9 / figure.ns,
        figure.allocs,
        figure.alloc_bytes,
    );
}

/// `n` members with ids from a fixed seed and loopback addresses.
fn members(n: usize) -> Vec<Member> {
    let mut rng = Rng::seeded(6);
    (0..n)
        .map(|i| Member {
            id: ServerId::random(&mut rng),
            addr: SocketAddr::from(([127, 0, 0, 1], 40_000 + i as u16)),
        })
        .collect()
}

/// A 16-byte key, different for each `n`.
fn key(n: usize) -> String {
    format!("user:{n:011}")
}

/// A typical `Prepare`: 16-byte key, `value_len`-byte value, three participants.
fn prepare(value_len: usize) -> Request {
    let participants = members(3);
    Request::Prepare {
        txid: TxId(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
        key: key(42),
        value: "v".repeat(value_len),
        epoch: Epoch(7),
        expected: participants[0].id,
        participants,
        timeout_ms: 2_000,
    }
}

/// Header, message body and ack body encoding and decoding.
fn codec_group() {
    let mut header = Header::new(Kind::Request, 0x0102_0304_0506_0708, 42, 7);
    header.echo = 6;
    header.frag_index = 3;
    header.frag_count = 8;
    header.message_len = 10_000;
    let mut out = Vec::with_capacity(HEADER_LEN);
    report(
        "Header::encode_into (reused buffer)",
        Some(HEADER_LEN),
        &measure(|| {
            out.clear();
            black_box(&header).encode_into(&mut out);
            black_box(&out);
        }),
    );
    let datagram = codec::encode_datagram(&header, &[0; 1340]);
    report(
        "Header::decode",
        Some(HEADER_LEN),
        &measure(|| {
            black_box(Header::decode(black_box(&datagram)).unwrap());
        }),
    );

    let key = ClusterKey::from_secret(b"the micro-benchmark's cluster key").unwrap();
    for payload in [64, 1332] {
        let mut sealed = header;
        sealed.flags |= codec::FLAG_MAC;
        let mut datagram = codec::encode_datagram(&sealed, &vec![0; payload]);
        let len = datagram.len();
        report(
            &format!("codec::seal, {len} B datagram (cluster key)"),
            Some(len),
            &measure(|| {
                codec::seal(black_box(&mut datagram), &key);
            }),
        );
        report(
            &format!("codec::verify, {len} B datagram (cluster key)"),
            Some(len),
            &measure(|| {
                assert!(codec::verify(black_box(&datagram), &key));
            }),
        );
    }

    for value_len in [100, 4096] {
        let request = prepare(value_len);
        let body = codec::encode_body(&request).unwrap();
        report(
            &format!(
                "encode_body Prepare, value {value_len} B ({} B)",
                body.len()
            ),
            Some(body.len()),
            &measure(|| {
                black_box(codec::encode_body(black_box(&request)).unwrap());
            }),
        );
        report(
            &format!(
                "decode_body Prepare, value {value_len} B ({} B)",
                body.len()
            ),
            Some(body.len()),
            &measure(|| {
                black_box(codec::decode_body::<Request>(black_box(&body)).unwrap());
            }),
        );
    }
    for value_len in [100, 4096] {
        let response = Response::Found {
            value: "v".repeat(value_len),
            version: 1_700_000_000_123,
        };
        let body = codec::encode_body(&response).unwrap();
        report(
            &format!("encode_body Found, value {value_len} B ({} B)", body.len()),
            Some(body.len()),
            &measure(|| {
                black_box(codec::encode_body(black_box(&response)).unwrap());
            }),
        );
        report(
            &format!("decode_body Found, value {value_len} B ({} B)", body.len()),
            Some(body.len()),
            &measure(|| {
                black_box(codec::decode_body::<Response>(black_box(&body)).unwrap());
            }),
        );
    }

    let ack = AckBody {
        complete: false,
        unknown: false,
        ranges: (0..8).map(|i| (i * 10, i * 10 + 7)).collect(),
    };
    let encoded = ack.encode();
    report(
        &format!("AckBody::encode, 8 ranges ({} B)", encoded.len()),
        Some(encoded.len()),
        &measure(|| {
            black_box(black_box(&ack).encode());
        }),
    );
    report(
        &format!("AckBody::decode, 8 ranges ({} B)", encoded.len()),
        Some(encoded.len()),
        &measure(|| {
            black_box(AckBody::decode(black_box(&encoded)).unwrap());
        }),
    );
}

/// Ring construction and replica lookups for 3, 10 and 50 servers.
fn ring_group() {
    let keys: Vec<String> = (0..1024).map(key).collect();
    for n in [3, 10, 50] {
        let view = View {
            epoch: Epoch(1),
            members: members(n),
            replicas: 3,
            vnodes: 64,
        };
        report(
            &format!("Ring::new, {n} servers ({} points)", n * 64),
            None,
            &measure(|| {
                black_box(Ring::new(black_box(&view)));
            }),
        );
        let ring = Ring::new(&view);
        let mut next = 0;
        report(
            &format!("Ring::replicas(key, 3), {n} servers"),
            None,
            &measure(|| {
                let key = &keys[next % keys.len()];
                next += 1;
                black_box(ring.replicas(black_box(key), 3));
            }),
        );
    }
}

/// Virtual time that passes each time datagrams cross between the two endpoints of a
/// [`Pair`] (a round trip is two hops).
const HOP: Duration = Duration::from_micros(10);

/// Two endpoints wired back to back in memory: no sockets, virtual time, no loss. The
/// server side answers every request it raises with a function of the body.
struct Pair {
    /// Virtual now; only moves forward.
    now: Instant,
    /// The side that sends requests.
    client: Endpoint,
    /// The client's (fictitious) address.
    client_addr: SocketAddr,
    /// The side that answers them.
    server: Endpoint,
    /// The server's (fictitious) address.
    server_addr: SocketAddr,
}

impl Pair {
    /// Two fresh endpoints with `config`.
    fn new(config: Config) -> Pair {
        let mut rng = Rng::seeded(1);
        Pair {
            now: Instant::now(),
            client: Endpoint::new(config.clone(), &mut rng),
            client_addr: SocketAddr::from(([10, 0, 0, 1], 4000)),
            server: Endpoint::new(config, &mut rng),
            server_addr: SocketAddr::from(([10, 0, 0, 2], 4000)),
        }
    }

    /// Lets one hop of virtual time pass and runs the timers that came due, as a driver does.
    fn hop(&mut self) {
        self.now += HOP;
        let now = self.now;
        for endpoint in [&mut self.client, &mut self.server] {
            if endpoint.poll_timeout().is_some_and(|at| at <= now) {
                endpoint.handle_timeout(now);
            }
        }
    }

    /// Sends `body` as a request, lets the server answer with `answer(body)`, and returns the
    /// response body once it arrived.
    fn exchange(&mut self, body: Vec<u8>, answer: &mut impl FnMut(Vec<u8>) -> Vec<u8>) -> Vec<u8> {
        let id = self
            .client
            .request(self.now, self.server_addr, body, None)
            .expect("request");
        loop {
            self.hop();
            let mut moved = 0;
            while let Some(transmit) = self.client.poll_transmit() {
                self.server
                    .handle_datagram(self.now, self.client_addr, &transmit.payload);
                moved += 1;
            }
            while let Some(event) = self.server.poll_event() {
                if let Event::Request { id, body, .. } = event {
                    self.server
                        .respond(self.now, id, answer(body))
                        .expect("respond");
                }
            }
            self.hop();
            while let Some(transmit) = self.server.poll_transmit() {
                self.client
                    .handle_datagram(self.now, self.server_addr, &transmit.payload);
                moved += 1;
            }
            if let Some(Event::Response { id: done, result }) = self.client.poll_event() {
                assert_eq!(done, id);
                return result.expect("response");
            }
            assert!(moved > 0, "the exchange stalled");
        }
    }
}

/// 64-byte echo exchanges over a pair whose response cache stays small: entries expire after
/// 10 ms of virtual time, about 500 exchanges.
fn exchange_group() {
    let config = Config {
        dedup_ttl: Duration::from_millis(10),
        ..Config::default()
    };
    echo_exchanges("64 B exchange, small response cache", config, 0);
}

/// 64-byte echo exchanges between endpoints sharing a cluster key: every datagram sealed,
/// checked and stamped.
fn exchange_keyed_group() {
    let config = Config {
        dedup_ttl: Duration::from_millis(10),
        auth: Some(Auth::new(
            ClusterKey::from_secret(b"the micro-benchmark's cluster key").unwrap(),
        )),
        ..Config::default()
    };
    echo_exchanges(
        "64 B exchange, small response cache, cluster key",
        config,
        0,
    );
}

/// 64-byte echo exchanges with the default configuration once the response cache is full
/// (100 000 entries, one evicted per new request): a busy node's steady state.
fn exchange_full_group() {
    let config = Config::default();
    let warm_up = config.dedup_max_entries;
    echo_exchanges("64 B exchange, full response cache", config, warm_up);
}

/// Measures 64-byte requests echoed back over a fresh [`Pair`] with `config`, after `warm_up`
/// unmeasured exchanges.
fn echo_exchanges(label: &str, config: Config, warm_up: usize) {
    let mut pair = Pair::new(config);
    let mut echo = |body: Vec<u8>| body;
    // The echoed body comes back as the response and goes out again: the benchmark itself
    // allocates nothing per exchange.
    let mut body = vec![7u8; 64];
    for _ in 0..warm_up {
        body = pair.exchange(body, &mut echo);
    }
    let figure = measure(|| {
        let sent = std::mem::take(&mut body);
        body = pair.exchange(black_box(sent), &mut echo);
    });
    report(label, Some(64), &figure);
    println!(
        "{:<50} {} cached entries at the end",
        "",
        pair.server.cached_entries(),
    );
}

/// The size of the large request of the transfer benchmarks.
const LARGE: usize = 1 << 20;

/// A 1 MiB request over the in-memory pair, answered with an empty body.
fn transfer_group() {
    let mut pair = Pair::new(Config::default());
    // The server hands the reassembled request back here, and it is sent again: the benchmark
    // itself allocates nothing per transfer.
    let mut recycled = Some(vec![0x5a; LARGE]);
    let figure = measure(|| {
        let body = black_box(recycled.take().expect("the body came back"));
        pair.exchange(body, &mut |body| {
            recycled = Some(body);
            Vec::new()
        });
    });
    let stats = pair.client.stats();
    report("1 MiB request, empty response", Some(LARGE), &figure);
    println!(
        "{:<50} per request: {:.0} datagrams from the client, {:.0} acks from the server, {} retransmissions in all",
        "",
        stats.datagrams_sent as f64 / stats.requests_sent as f64,
        pair.server.stats().acks_sent as f64 / stats.requests_sent as f64,
        stats.retransmissions
    );
}

/// Requests in the loopback transfer measurement (after two to warm up).
const TRANSFERS: usize = 50;

/// A 1 MiB request through two `net::spawn` drivers on loopback, answered with an empty body.
fn loopback_group() {
    let (responder, requests, responder_thread) =
        net::spawn(support::socket(), NetConfig::default()).unwrap();
    let responder_addr = responder.local_addr();
    let answering = responder.clone();
    let app = std::thread::spawn(move || {
        for request in requests {
            let _ = answering.respond(request.id, Vec::new());
        }
    });
    let (requester, _requests, requester_thread) =
        net::spawn(support::socket(), NetConfig::default()).unwrap();
    let template = vec![0x5a; LARGE];
    for _ in 0..2 {
        requester
            .call(responder_addr, template.clone(), None)
            .unwrap();
    }
    let before_stats = requester.stats().unwrap();
    let mut samples = Vec::with_capacity(TRANSFERS);
    for _ in 0..TRANSFERS {
        let body = template.clone();
        let started = Instant::now();
        requester
            .call(responder_addr, body, None)
            .expect("answered");
        samples.push(started.elapsed().as_secs_f64() * 1e9);
    }
    let stats = requester.stats().unwrap();
    let server_stats = responder.stats().unwrap();
    samples.sort_by(f64::total_cmp);
    let mut bodies: Vec<Vec<u8>> = (0..5).map(|_| template.clone()).collect();
    let (allocs, alloc_bytes) = allocations_per_op(5, || {
        let body = bodies.pop().expect("one body per transfer");
        requester
            .call(responder_addr, body, None)
            .expect("answered");
    });
    let figure = Figure {
        ns: samples[samples.len() / 2],
        allocs,
        alloc_bytes,
    };
    report(
        &format!("1 MiB request, median of {TRANSFERS}"),
        Some(LARGE),
        &figure,
    );
    println!(
        "{:<50} best {:.1} MB/s, worst {:.1} MB/s; {} retransmissions, {:.0} acks per request",
        "",
        LARGE as f64 / samples[0] * 1e3,
        LARGE as f64 / samples[samples.len() - 1] * 1e3,
        stats.retransmissions - before_stats.retransmissions,
        server_stats.acks_sent as f64 / server_stats.requests_executed as f64,
    );
    responder.shutdown();
    requester.shutdown();
    drop((responder, requester));
    responder_thread.join().unwrap();
    requester_thread.join().unwrap();
    app.join().unwrap();
}

/// Raw loopback UDP throughput, windowed like the reliable layer and unthrottled.
fn udp_group() {
    let size = Config::default().max_datagram;
    let window = u64::from(Config::default().window);
    for (label, window) in [
        (
            format!("raw UDP, {size} B datagrams, {window} in flight"),
            Some(window),
        ),
        (format!("raw UDP, {size} B datagrams, unthrottled"), None),
    ] {
        let run = support::raw_udp(window);
        let ns = run.elapsed.as_secs_f64() * 1e9 / run.received.max(1) as f64;
        println!(
            "{label:<50} {ns:>12.1} ns/datagram {:>9.1} MB/s received, {} of {} lost",
            run.bytes as f64 / run.elapsed.as_secs_f64() / 1e6,
            support::RAW_DATAGRAMS - run.received,
            support::RAW_DATAGRAMS,
        );
    }
}

/// Runs the groups named on the command line (all when none is), each under its header.
fn main() {
    // `cargo bench` passes `--bench`; any other argument names a group to run.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let groups: [(&str, &str, fn()); 8] = [
        ("codec", "codec", codec_group),
        ("ring", "ring, 64 vnodes per server", ring_group),
        (
            "exchange",
            "reliable layer, sans-IO: 64-byte request echoed back, response cache small",
            exchange_group,
        ),
        (
            "exchange-keyed",
            "reliable layer, sans-IO: 64-byte request echoed back, cluster key",
            exchange_keyed_group,
        ),
        (
            "exchange-full",
            "reliable layer, sans-IO: 64-byte request echoed back, response cache full",
            exchange_full_group,
        ),
        (
            "transfer",
            "reliable layer, sans-IO: 1 MiB request",
            transfer_group,
        ),
        (
            "loopback",
            "reliable layer over loopback: 1 MiB request, net::spawn drivers",
            loopback_group,
        ),
        (
            "udp",
            "raw loopback UDP, one way, for comparison",
            udp_group,
        ),
    ];
    for (name, title, run) in groups {
        if filters.is_empty() || filters.iter().any(|f| f == name) {
            println!("== {title} ==");
            run();
        }
    }
}
