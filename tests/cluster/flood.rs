//! Issue 8, bounded resources: a flood of 10^5 junk, half-valid and hostile datagrams to every
//! node leaves every node serving, with its memory under a stated bound.

use std::net::{SocketAddr, UdpSocket};
use std::str::FromStr;
use std::time::{Duration, Instant};

use trireme::placement::ring;
use trireme::placement::view::{ServerId, View};
use trireme::util::rng::Rng;
use trireme::wire::codec::{self, Header, Kind};
use trireme::wire::message::{Entry, Request, TxId};

use crate::util::*;

/// Datagrams sent to each node.
const PER_NODE: u32 = 100_000;
/// Datagrams sent between two pacing markers: well within the 4 MiB receive buffer a node
/// sets (about 1 800 datagrams of the largest size), so the kernel drops few if any.
const ROUND: u32 = 500;
/// Source sockets per node for the flood (reassembly is bounded per peer and in total).
const SOURCES: usize = 4;
/// The bound on every node's peak resident memory (`VmHWM`), in MiB. Derived from the
/// configured limits: partly reassembled messages 64 MiB in all (`reliable::Config::
/// reassembly_total`; only the pages written count, and each first fragment writes one),
/// cached responses 64 MiB (`dedup_max_bytes`, 100 000 entries), aborts of unknown
/// transactions 100 000 records, lock table 100 000 entries; plus about 16 MiB for the
/// program itself. The sum, 64 + 64 + 16 plus under 16 for the tables, is under 160 MiB.
const MEMORY_BOUND_MIB: u64 = 160;

/// A one-fragment request datagram carrying `body`, as request `request_id` of
/// `incarnation`.
fn request_datagram(incarnation: u64, request_id: u64, body: &[u8]) -> Vec<u8> {
    let mut header = Header::new(Kind::Request, incarnation, request_id, 1);
    header.message_len = body.len() as u32;
    codec::encode_datagram(&header, body)
}

/// A body that decodes as no request (an unknown variant), followed by noise: executed and
/// answered `bad_input`.
fn garbage_body(rand: &mut Rng) -> Vec<u8> {
    let mut body = vec![0xff, 0xff, 0xff];
    let len = rand.below(200) as usize;
    body.extend(random_bytes(rand, len));
    body
}

/// What the cluster looks like to the hostile messages: the view, and each server's id.
struct Target {
    /// The node flooded.
    addr: SocketAddr,
    /// Its id, for a server (prepares that pass the identity check).
    id: Option<ServerId>,
    /// The view the flood started in.
    view: View,
}

/// A valid message that no honest peer would send to `target`, number `i` of its kind: for a
/// server, transfers and termination queries from a non-member, commits and aborts for
/// unknown transactions, prepares from a coordinator that never decides, reads of missing
/// keys; for the view leader, `lock_get` with fresh lock and requester names (each held for
/// good), waits that are never renewed, releases by non-holders, view queries, and storage
/// requests it does not serve.
fn hostile(target: &Target, rand: &mut Rng, i: u32) -> Request {
    let key = format!("flood-{i}");
    let Some(me) = target.id else {
        return match i % 5 {
            0 | 1 => Request::LockGet {
                lock: format!("flood-lock-{i}"),
                requester: format!("flood-{}", rand.next_u64()),
                claim: rand.next_u64(),
            },
            2 => Request::LockGet {
                lock: format!("flood-lock-{}", rand.below(u64::from(i) + 1)),
                requester: format!("waiter-{}", rand.next_u64()),
                claim: rand.next_u64(),
            },
            3 => Request::LockRelease {
                lock: format!("flood-lock-{}", rand.below(u64::from(i) + 1)),
                requester: "nobody".into(),
                claim: None,
            },
            _ if i.is_multiple_of(2) => Request::QueryServers,
            _ => Request::Get { key },
        };
    };
    match i % 6 {
        0 => Request::Transfer {
            epoch: target.view.epoch,
            entries: vec![Entry {
                key,
                value: "forged".into(),
                version: u64::MAX,
            }],
        },
        1 => Request::Commit {
            txid: TxId::random(rand),
            version: rand.next_u64(),
        },
        2 => Request::Abort {
            txid: TxId::random(rand),
        },
        3 => Request::QueryTx {
            txid: TxId::random(rand),
            key,
            expected: me,
            primary: ServerId(u128::from(rand.next_u64())),
            close: true,
        },
        4 => {
            let participants = ring::replicas(&target.view, &key);
            Request::Prepare {
                txid: TxId::random(rand),
                key,
                value: "never decided".into(),
                epoch: target.view.epoch,
                expected: me,
                participants,
                timeout_ms: 300,
            }
        }
        _ => Request::GetR {
            key,
            epoch: target.view.epoch,
        },
    }
}

/// What one node's flood sent and saw.
#[derive(Debug, Default)]
struct Report {
    /// Datagrams sent (pacing markers included).
    sent: u64,
    /// Answers that came back to the flood's sockets.
    answers: u64,
    /// Pacing markers not answered within their deadline.
    markers_lost: u64,
}

/// Sends [`PER_NODE`] datagrams to `target.addr` from [`SOURCES`] sockets, mixing: noise;
/// valid headers with bodies that decode as no request (executed, answered `bad_input`);
/// first fragments of large requests that never finish; acks and probes about requests
/// nobody sent; and [`hostile`] messages. After every [`ROUND`] it sends a marker request
/// and waits (up to 2 s) for its answer, so the node is never more than a round behind.
fn flood(target: &Target, seed: u64) -> Report {
    let sockets: Vec<UdpSocket> = (0..SOURCES)
        .map(|_| {
            let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
            socket.set_nonblocking(true).expect("nonblocking");
            socket
        })
        .collect();
    let marker = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let mut rand = Rng::seeded(seed);
    let mut report = Report::default();
    let mut buffer = vec![0u8; 65536];
    let marker_incarnation = rand.next_u64();
    for i in 0..PER_NODE {
        let socket = &sockets[i as usize % SOURCES];
        let datagram = match i % 10 {
            // Noise of any length, sometimes behind our magic.
            0 => {
                let len = rand.below(1400) as usize;
                random_bytes(&mut rand, len)
            }
            1 => {
                let mut d = b"TRIR\x01".to_vec();
                let len = rand.below(100) as usize;
                d.extend(random_bytes(&mut rand, len));
                d
            }
            // A valid header and a body that is no request.
            2 | 3 => request_datagram(rand.next_u64(), rand.next_u64(), &garbage_body(&mut rand)),
            // The first fragment of a request of up to 8 MiB that never finishes.
            4 => {
                let len = 65_536 + rand.below(codec::MAX_MESSAGE as u64 - 65_536) as usize;
                let count = codec::fragment_count(len, 1340);
                let mut header = Header::new(Kind::Request, rand.next_u64(), rand.next_u64(), 1);
                header.frag_count = count;
                header.message_len = len as u32;
                let payload = random_bytes(&mut rand, codec::fragment_range(len, count, 0).len());
                codec::encode_datagram(&header, &payload)
            }
            // An ack or a probe about a request nobody sent.
            5 => {
                let kind = if i % 20 == 5 { Kind::Ack } else { Kind::Probe };
                let header = Header::new(kind, rand.next_u64(), rand.next_u64(), 1);
                let len = if kind == Kind::Ack { rand.below(40) } else { 0 };
                codec::encode_datagram(&header, &random_bytes(&mut rand, len as usize))
            }
            // A valid message from someone with no right to send it.
            _ => {
                let body = hostile(target, &mut rand, i).encode().expect("encodes");
                request_datagram(rand.next_u64(), rand.next_u64(), &body)
            }
        };
        let _ = socket.send_to(&datagram, target.addr);
        report.sent += 1;
        if (i + 1).is_multiple_of(ROUND) {
            report.sent += 1;
            if !pace(&marker, target.addr, marker_incarnation, u64::from(i)) {
                report.markers_lost += 1;
            }
            for socket in &sockets {
                while socket.recv_from(&mut buffer).is_ok() {
                    report.answers += 1;
                }
            }
        }
    }
    report
}

/// Sends marker request `id` to `target` and waits up to 2 s for its answer (the node has
/// then read every datagram sent before it). Returns whether it came.
fn pace(marker: &UdpSocket, target: SocketAddr, incarnation: u64, id: u64) -> bool {
    let body = [0xff, 0xff, 0xff];
    let _ = marker.send_to(&request_datagram(incarnation, id, &body), target);
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buffer = [0u8; 2048];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        marker
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        let Ok((n, _)) = marker.recv_from(&mut buffer) else {
            return false;
        };
        if Header::decode(&buffer[..n]).is_ok_and(|(h, _)| h.request_id == id) {
            return true;
        }
    }
    false
}

/// Waits (up to 10 s) until the view holds `n` servers and is not rebalancing.
fn wait_until_settled(env: &Env, vl: &ViewLeader, n: usize) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let settled = wait_until(Duration::from_secs(10), || {
        last = query_servers(env, vl);
        server_ids(&last).len() == n && last["rebalancing"] == false
    });
    assert!(settled, "the view never settled with {n} servers: {last}");
    last
}

/// Issue 8: "a flood of 10^5 junk and half-valid datagrams (valid header, bad body; fragment
/// starts that never finish) leaves every node serving with memory under a stated bound."
/// A view leader and three servers each get [`PER_NODE`] datagrams (see [`flood`]: noise,
/// undecodable bodies, never-finished fragment starts of up to 8 MiB from four sockets,
/// stray acks and probes, and valid hostile messages), all four floods at once. Afterwards
/// the view is unchanged (no server was declared dead), `setr`/`getr`, raw `get`,
/// `query_servers` and `lock_get`/`lock_release` work, and every node's peak resident
/// memory is under [`MEMORY_BOUND_MIB`].
///
/// Measured (two cores, the test profile): 400 800 datagrams (pacing markers included) sent
/// in 3.2-6.3 s, none of the 800 markers lost; peak memory 72 MiB for the view leader and
/// 70-71 MiB per server, from 3 MiB before the flood. Nearly all of it is the reassembly
/// bound (64 MiB): the allocator hands a new message buffer recycled heap memory, which it
/// zeroes in full, so that bound is paid in resident memory, not only in address space.
/// Setting [`MEMORY_BOUND_MIB`] to 64 makes the test fail ("view leader peaked at 72 MiB").
#[test]
fn a_flood_of_junk_and_hostile_datagrams_leaves_every_node_serving_within_its_memory_bound() {
    let env = Env::clean();
    let mut vl = viewleader(&env);
    let mut servers: Vec<Server> = (0..3).map(|_| server(&env, &vl)).collect();
    let before = wait_until_settled(&env, &vl, 3);
    let view = view_of(&before);
    let vl_addr = vl.addr.to_string();
    let setr_k = |value: &str| {
        client(
            &env,
            &[
                "--viewleader",
                &vl_addr,
                "--timeout-ms",
                "10000",
                "setr",
                "k",
                value,
            ],
        )
    };
    let setr = setr_k("before");
    assert_eq!(setr.code, 0, "{setr:?}");

    let mut targets = vec![Target {
        addr: vl.addr,
        id: None,
        view: view.clone(),
    }];
    targets.extend(servers.iter().map(|s| Target {
        addr: s.addr,
        id: Some(ServerId::from_str(&s.id).expect("hex id")),
        view: view.clone(),
    }));
    let peak = |proc: &Proc| proc.peak_memory_kib().expect("VmHWM") / 1024;
    let baseline: Vec<u64> = [&vl.proc]
        .into_iter()
        .chain(servers.iter().map(|s| &s.proc))
        .map(peak)
        .collect();
    let started = Instant::now();
    let reports: Vec<Report> = std::thread::scope(|scope| {
        let floods: Vec<_> = targets
            .iter()
            .enumerate()
            .map(|(n, target)| scope.spawn(move || flood(target, 0x9E37_79B9_7F4A_7C15 + n as u64)))
            .collect();
        floods
            .into_iter()
            .map(|f| f.join().expect("flood"))
            .collect()
    });
    let took = started.elapsed();

    // Every node still runs and serves, and nobody left the view.
    assert!(vl.proc.is_running(), "the view leader exited");
    for s in &mut servers {
        assert!(s.proc.is_running(), "server {} exited", s.addr);
    }
    let after = query_servers(&env, &vl);
    assert_eq!(
        server_ids(&after),
        server_ids(&before),
        "the view changed: {after}"
    );
    assert_eq!(after["epoch"], before["epoch"], "{after}");
    let setr = setr_k("after");
    assert_eq!(setr.code, 0, "{setr:?}");
    let getr = client(
        &env,
        &[
            "--viewleader",
            &vl_addr,
            "--timeout-ms",
            "10000",
            "getr",
            "k",
        ],
    );
    assert_eq!(
        (getr.code, getr.stdout.as_str()),
        (0, "after\n"),
        "{getr:?}"
    );
    for s in &servers {
        let target = s.addr.to_string();
        let get = client(
            &env,
            &["--server", &target, "--timeout-ms", "10000", "get", "k"],
        );
        assert_eq!((get.code, get.stdout.as_str()), (0, "after\n"), "{get:?}");
        assert!(
            !get.stdout.contains("forged"),
            "a transfer from a non-member was stored"
        );
    }
    for command in ["lock_get", "lock_release"] {
        let run = client(
            &env,
            &[
                "--viewleader",
                &vl_addr,
                "--timeout-ms",
                "10000",
                command,
                "L",
                "alice",
            ],
        );
        assert_eq!(run.code, 0, "{command}: {run:?}");
    }

    let nodes = [("view leader", &vl.proc)]
        .into_iter()
        .chain(servers.iter().map(|s| ("server", &s.proc)));
    let mut peaks = Vec::new();
    for ((name, proc), before) in nodes.zip(baseline) {
        let peak = peak(proc);
        peaks.push(format!("{name} {peak} MiB (before the flood {before} MiB)"));
        assert!(
            peak < MEMORY_BOUND_MIB,
            "{name} peaked at {peak} MiB, over the {MEMORY_BOUND_MIB} MiB bound"
        );
    }
    let sent: u64 = reports.iter().map(|r| r.sent).sum();
    let answers: u64 = reports.iter().map(|r| r.answers).sum();
    let lost: u64 = reports.iter().map(|r| r.markers_lost).sum();
    eprintln!(
        "flood: {sent} datagrams in {took:?}, {answers} answers, {lost} pacing markers \
         unanswered; peak memory: {}",
        peaks.join(", ")
    );
    // Serving *during* the flood: each round's marker request was answered within 2 s
    // (allowing 1% lost to a busy CI machine).
    let markers = sent / u64::from(ROUND);
    assert!(
        lost * 100 <= markers,
        "{lost} of {markers} pacing markers got no answer within 2 s during the flood"
    );
}
