//! Issue 8, bounded resources: a flood of 10^5 junk, half-valid and hostile datagrams to every
//! node leaves every node serving, with its memory under a stated bound. Issue 16: the same
//! against a view-leader group with the group's own messages (`Raft`, `GroupHello`,
//! `Forwarded`) sent from outside the group, which every member refuses without effect.

use std::net::{SocketAddr, UdpSocket};
use std::str::FromStr;
use std::time::{Duration, Instant};

use trireme::placement::ring;
use trireme::placement::view::{Epoch, ServerId, View};
use trireme::util::rng::Rng;
use trireme::wire::codec::{self, Header, Kind};
use trireme::wire::message::{Entry, Request, Response, TxId};

use crate::util::*;

/// The [`ExclusiveLock`] every flood holds: two floods at once on two cores starve the
/// programs into failing over (the servers of one were declared dead when the group flood
/// ran beside it).
const FLOODS: &str = "floods";
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
                txid: None,
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
/// then read every datagram sent before it), sending it again every 100 ms meanwhile (a node
/// injecting loss may drop an answer; a repeat is answered from its response cache).
/// Returns whether it came.
fn pace(marker: &UdpSocket, target: SocketAddr, incarnation: u64, id: u64) -> bool {
    let body = [0xff, 0xff, 0xff];
    let datagram = request_datagram(incarnation, id, &body);
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buffer = [0u8; 2048];
    let mut resend = Instant::now();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if Instant::now() >= resend {
            let _ = marker.send_to(&datagram, target);
            resend = Instant::now() + Duration::from_millis(100);
        }
        let wait = left.min(resend.saturating_duration_since(Instant::now()));
        marker
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .expect("timeout");
        let Ok((n, _)) = marker.recv_from(&mut buffer) else {
            continue;
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
    let _alone = ExclusiveLock::take(FLOODS);
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

/// Datagrams sent to each member of a view-leader group by its flood (pacing markers aside).
const PER_MEMBER: u32 = 50_000;
/// Terms, indexes and commit indexes the forged Raft messages claim are at least this
/// (2^40): far above any term a test's group reaches, so a member that logs one, or
/// changes role at one, stepped a forged message.
const HUGE: u64 = 1 << 40;
/// The group's answer to `Raft`, `GroupHello` or `Forwarded` from an address outside the
/// group contains this (src/viewleader/group.rs, `Group::handle_request`).
const NOT_A_MEMBER: &str = "is accepted only from a member of the view-leader group";
/// A member's flood stops after this many pacing markers in a row got no answer: the
/// member stopped serving, and the test fails without waiting out every round.
const GIVE_UP_AFTER: u32 = 3;
/// The lock that forwarded `lock_get`s from the flood ask for: free afterwards unless a
/// member executed one.
const FORGED_LOCK: &str = "group-flood-lock";

/// A well-formed Raft message (protobuf bytes) to the member with Raft id `to`, claiming to
/// come from a member (Raft ids 1-3) at a term, log index and commit index of at least
/// [`HUGE`]: heartbeats and appends (with an entry) that would make a leader step down,
/// votes and pre-votes, `TimeoutNow` (an immediate election), snapshots, responses, and
/// local-only kinds raft-rs refuses from the network.
fn forged_raft(rand: &mut Rng, to: u64) -> Vec<u8> {
    use raft::prelude::{Entry as RaftEntry, Message, MessageType};
    const KINDS: [MessageType; 12] = [
        MessageType::MsgHeartbeat,
        MessageType::MsgAppend,
        MessageType::MsgRequestVote,
        MessageType::MsgRequestPreVote,
        MessageType::MsgTimeoutNow,
        MessageType::MsgSnapshot,
        MessageType::MsgTransferLeader,
        MessageType::MsgAppendResponse,
        MessageType::MsgHeartbeatResponse,
        MessageType::MsgReadIndex,
        MessageType::MsgHup,
        MessageType::MsgPropose,
    ];
    let kind = KINDS[rand.below(KINDS.len() as u64) as usize];
    let mut m = Message::default();
    m.set_msg_type(kind);
    m.to = to;
    m.from = 1 + rand.below(3);
    m.term = HUGE + rand.below(HUGE);
    m.log_term = m.term;
    m.index = HUGE + rand.below(HUGE);
    m.commit = if rand.chance(0.5) {
        u64::MAX - rand.below(1000)
    } else {
        HUGE + rand.below(HUGE)
    };
    if matches!(kind, MessageType::MsgAppend | MessageType::MsgPropose) {
        let len = rand.below(64) as usize;
        let entry = RaftEntry {
            index: m.index + 1,
            term: m.term,
            data: random_bytes(rand, len).into(),
            ..RaftEntry::default()
        };
        m.entries = vec![entry].into();
    }
    if kind == MessageType::MsgSnapshot {
        let (index, term) = (m.index, m.term);
        let snapshot = m.mut_snapshot();
        snapshot.mut_metadata().index = index;
        snapshot.mut_metadata().term = term;
        snapshot.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        let len = rand.below(64) as usize;
        snapshot.data = random_bytes(rand, len).into();
    }
    codec::encode_raft(&m).expect("a forged raft message encodes")
}

/// A random loopback address (a forged `origin`).
fn random_loopback(rand: &mut Rng) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1 + rand.below(65_535) as u16))
}

/// A group message no member sent, number `i` of the flood against the member at `place`
/// (Raft id `place + 1`): `Raft` with garbage bytes or a forged well-formed message
/// ([`forged_raft`]); `GroupHello` with a random member index (valid or not) and
/// incarnation; `Forwarded` with a garbage request, with a `Forwarded` nested up to three
/// deep, with a heartbeat of a server that does not exist, or with a `lock_get` of
/// [`FORGED_LOCK`].
fn group_hostile(rand: &mut Rng, place: usize, i: u32) -> Request {
    let origin = random_loopback(rand);
    match i % 8 {
        0 => {
            let len = rand.below(300) as usize;
            Request::Raft {
                message: random_bytes(rand, len),
            }
        }
        1 | 2 => Request::Raft {
            message: forged_raft(rand, place as u64 + 1),
        },
        3 => Request::GroupHello {
            member: if rand.chance(0.9) {
                rand.below(5) as u32
            } else {
                u32::MAX - rand.below(3) as u32
            },
            incarnation: rand.next_u64(),
        },
        4 => Request::Forwarded {
            origin,
            request: garbage_body(rand),
        },
        5 => {
            let mut request = Request::LockGet {
                lock: FORGED_LOCK.into(),
                requester: format!("nested-{}", rand.next_u64()),
                claim: rand.next_u64(),
            };
            for _ in 0..1 + rand.below(3) {
                request = Request::Forwarded {
                    origin,
                    request: request.encode().expect("encodes"),
                };
            }
            Request::Forwarded {
                origin,
                request: request.encode().expect("encodes"),
            }
        }
        6 => Request::Forwarded {
            origin,
            request: Request::Heartbeat {
                id: ServerId(u128::from(rand.next_u64()) << 64 | u128::from(rand.next_u64())),
                addr: origin,
                finished: Epoch(0),
                sent: Epoch(0),
                epoch: Epoch(rand.below(1000)),
            }
            .encode()
            .expect("encodes"),
        },
        _ => Request::Forwarded {
            origin,
            request: Request::LockGet {
                lock: FORGED_LOCK.into(),
                requester: format!("mallory-{}", rand.next_u64()),
                claim: rand.next_u64(),
            }
            .encode()
            .expect("encodes"),
        },
    }
}

/// What the flood of one group member sent and saw.
#[derive(Debug, Default)]
struct GroupReport {
    /// Datagrams sent (pacing markers included).
    sent: u64,
    /// Answers that came back to the flood's sockets.
    answers: u64,
    /// Answers refusing a group message because the flood's socket is not a member
    /// ([`NOT_A_MEMBER`]).
    refused_as_outsider: u64,
    /// Pacing markers not answered within their deadline.
    markers_lost: u64,
}

/// Counts the answers waiting on `socket` into `report`: all of them, and the refusals of
/// a non-member's group message among them.
fn drain_answers(socket: &UdpSocket, buffer: &mut [u8], report: &mut GroupReport) {
    while let Ok((n, _)) = socket.recv_from(buffer) {
        report.answers += 1;
        let Ok((header, payload)) = Header::decode(&buffer[..n]) else {
            continue;
        };
        if header.kind == Kind::Response
            && header.frag_count == 1
            && let Ok(Response::Error(e)) = Response::decode(payload)
            && e.message.contains(NOT_A_MEMBER)
        {
            report.refused_as_outsider += 1;
        }
    }
}

/// Sends [`PER_MEMBER`] datagrams to the group member at `target` (place `place` in
/// `--peers`) from [`SOURCES`] sockets outside the group, mixing malformed datagrams (noise,
/// noise behind our magic, a valid header with a body that is no request, a group message
/// cut short) with [`group_hostile`] messages; paced by a marker every [`ROUND`] as in
/// [`flood`], and given up after [`GIVE_UP_AFTER`] markers in a row went unanswered.
/// Returns what it sent and saw.
fn flood_group_member(target: SocketAddr, place: usize, seed: u64) -> GroupReport {
    let sockets: Vec<UdpSocket> = (0..SOURCES)
        .map(|_| {
            let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
            socket.set_nonblocking(true).expect("nonblocking");
            socket
        })
        .collect();
    let marker = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let mut rand = Rng::seeded(seed);
    let mut report = GroupReport::default();
    let mut buffer = vec![0u8; 65536];
    let marker_incarnation = rand.next_u64();
    let mut lost_in_a_row = 0;
    for i in 0..PER_MEMBER {
        let socket = &sockets[i as usize % SOURCES];
        let datagram = match i % 10 {
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
            2 => request_datagram(rand.next_u64(), rand.next_u64(), &garbage_body(&mut rand)),
            3 => {
                let mut body = group_hostile(&mut rand, place, i)
                    .encode()
                    .expect("encodes");
                let keep = rand.below(body.len() as u64) as usize;
                body.truncate(keep);
                request_datagram(rand.next_u64(), rand.next_u64(), &body)
            }
            _ => {
                let body = group_hostile(&mut rand, place, i)
                    .encode()
                    .expect("encodes");
                request_datagram(rand.next_u64(), rand.next_u64(), &body)
            }
        };
        let _ = socket.send_to(&datagram, target);
        report.sent += 1;
        if (i + 1).is_multiple_of(ROUND) {
            report.sent += 1;
            if pace(&marker, target, marker_incarnation, u64::from(i)) {
                lost_in_a_row = 0;
            } else {
                report.markers_lost += 1;
                lost_in_a_row += 1;
            }
            for socket in &sockets {
                drain_answers(socket, &mut buffer, &mut report);
            }
            if lost_in_a_row == GIVE_UP_AFTER {
                break;
            }
        }
    }
    // The answers to the last round.
    let _ = wait_until(Duration::from_millis(300), || {
        let before = report.answers;
        for socket in &sockets {
            drain_answers(socket, &mut buffer, &mut report);
        }
        report.answers == before
    });
    report
}

/// The role changes of every running member of `group` whose term no member ever stood
/// for election at ("became candidate at term T"), as (member, role, term). Raft terms only
/// advance through candidacies, so in a group that steps only its members' messages this
/// is empty; a stepped forged message shows up here at its forged term.
fn terms_without_an_election(group: &VlGroup) -> Vec<(usize, String, u64)> {
    let changes: Vec<Vec<(String, u64)>> = (0..group.addrs.len())
        .map(|i| raft_role_changes(&group.member(i).stderr()))
        .collect();
    let elected: Vec<u64> = changes
        .iter()
        .flatten()
        .filter(|(role, _)| role == "candidate")
        .map(|&(_, term)| term)
        .collect();
    changes
        .into_iter()
        .enumerate()
        .flat_map(|(i, member)| member.into_iter().map(move |(role, term)| (i, role, term)))
        .filter(|(_, _, term)| *term != 0 && !elected.contains(term))
        .collect()
}

/// How many elections the members of `group` started so far (raft-rs's "became candidate"
/// lines, all members together).
fn elections(group: &VlGroup) -> usize {
    (0..group.addrs.len())
        .map(|i| {
            raft_role_changes(&group.member(i).stderr())
                .iter()
                .filter(|(role, _)| role == "candidate")
                .count()
        })
        .sum()
}

/// Waits (up to 20 s) until the group, asked through its whole list, shows `n` servers
/// and is not rebalancing; returns that answer.
fn settled_group_view(env: &Env, group: &VlGroup, n: usize) -> serde_json::Value {
    let mut last = None;
    let settled = wait_until(Duration::from_secs(20), || {
        last = group_query(env, &group.list(), &[]);
        last.as_ref()
            .is_some_and(|v| server_ids(v).len() == n && v["rebalancing"] == false)
    });
    assert!(
        settled,
        "the group's view never settled on {n} servers: {last:?}"
    );
    last.expect("a view")
}

/// Issue 16, "the flood/hostile-input tests extended to the group's messages": a group of
/// three members (and one server) gets [`PER_MEMBER`] datagrams per member, all three
/// floods at once, from sockets outside the group: malformed datagrams, `Raft` with garbage
/// and forged well-formed messages claiming terms and commit indexes of 2^40 and more,
/// `GroupHello` with random member indexes and incarnations, `Forwarded` with garbage, with
/// nested `Forwarded`, with a forged heartbeat and with a `lock_get`.
///
/// Afterwards: every member runs; every term a member took was one some member stood for
/// election at (a stepped forged message would show its forged term: the leader steps down
/// to a forged heartbeat's term); every member, asked alone, answers `query_servers` naming
/// the group's leader, on a clean network the one from before the flood unless the load
/// made the members hold an election; the server stayed in the view at the same epoch and no forged server joined;
/// `setr`/`getr` work; [`FORGED_LOCK`] is free (no forwarded `lock_get` was executed) and
/// `lock_get`/`lock_release` work; the flood's sockets got the group's refusal
/// ([`NOT_A_MEMBER`]); and each member answered its pacing markers during the flood.
fn a_flood_of_group_messages_from_outside_leaves_the_group_serving(env: &Env) {
    let _alone = ExclusiveLock::take(FLOODS);
    let mut group = VlGroup::start(env, 3, false, |_| Vec::new());
    let list = group.list();
    let server = group.server(env, &[]);
    let before = settled_group_view(env, &group, 1);
    assert_eq!(server_ids(&before), vec![server.id.clone()]);
    let leader = group.leader(env, &[]);
    let elections_before = elections(&group);
    let with_group = |args: &[&str]| {
        let mut all = vec!["--viewleader", &list, "--timeout-ms", "10000"];
        all.extend_from_slice(args);
        client(env, &all)
    };
    let setr = with_group(&["setr", "k", "before"]);
    assert_eq!(setr.code, 0, "{setr:?}");

    let started = Instant::now();
    let reports: Vec<GroupReport> = std::thread::scope(|scope| {
        let floods: Vec<_> = group
            .addrs
            .iter()
            .enumerate()
            .map(|(place, &addr)| {
                scope.spawn(move || {
                    flood_group_member(addr, place, 0x5EED_6A0B_0000_0000 + place as u64)
                })
            })
            .collect();
        floods
            .into_iter()
            .map(|f| f.join().expect("flood"))
            .collect()
    });
    let took = started.elapsed();
    eprintln!("group flood: {took:?}, per member {reports:?}");

    for i in 0..3 {
        let running = group.members[i].as_mut().is_some_and(Proc::is_running);
        assert!(running, "member {i} exited:{}", group.logs());
    }
    // Terms advanced only through elections: no member stepped a forged message.
    let forged = terms_without_an_election(&group);
    assert!(
        forged.is_empty(),
        "members changed role at terms nobody stood for election at (member, role, term): \
         {forged:?}{}",
        group.logs()
    );
    // The group has a leader that every member, asked alone, names; on a clean network the
    // one from before, unless the load of the floods made the members elect another (which
    // a busy two-core machine may: a leader that hears no quorum for 300 ms steps down).
    let current = group.leader(env, &[]);
    let elected_during = elections(&group) - elections_before;
    if env.faults.is_none() && elected_during == 0 {
        assert_eq!(
            current,
            leader,
            "the leader changed without an election{}",
            group.logs()
        );
    }
    for (i, addr) in group.addrs.iter().enumerate() {
        let mut answer = (1, serde_json::Value::Null);
        let only = addr.to_string();
        let named = wait_until(Duration::from_secs(10), || {
            answer = client_json(
                env,
                &[
                    "--viewleader",
                    &only,
                    "--timeout-ms",
                    "3000",
                    "query_servers",
                ],
            );
            answer.0 == 0 && leader_of(&answer.1) == Some(group.addrs[current])
        });
        assert!(
            named,
            "member {i} does not answer query_servers naming the leader {}: {answer:?}{}",
            group.addrs[current],
            group.logs()
        );
    }
    // The server kept heartbeating: still in the view, epoch unchanged, no forged server.
    let after = settled_group_view(env, &group, 1);
    assert_eq!(server_ids(&after), server_ids(&before), "{after}");
    assert_eq!(after["epoch"], before["epoch"], "{after}");
    let setr = with_group(&["setr", "k", "after"]);
    assert_eq!(setr.code, 0, "{setr:?}");
    let getr = with_group(&["getr", "k"]);
    assert_eq!(
        (getr.code, getr.stdout.as_str()),
        (0, "after\n"),
        "{getr:?}"
    );
    // The forwarded lock_gets took nothing: alice gets the lock at once.
    let lock = client(
        env,
        &[
            "--viewleader",
            &list,
            "--timeout-ms",
            "3000",
            "lock_get",
            FORGED_LOCK,
            "alice",
        ],
    );
    assert_eq!(
        lock.code, 0,
        "a forwarded lock_get from outside held the lock: {lock:?}"
    );
    let release = with_group(&["lock_release", FORGED_LOCK, "alice"]);
    assert_eq!(release.code, 0, "{release:?}");

    let refused: u64 = reports.iter().map(|r| r.refused_as_outsider).sum();
    assert!(
        reports.iter().all(|r| r.refused_as_outsider > 0),
        "a member never answered with its refusal ({NOT_A_MEMBER:?}): {reports:?}"
    );
    let lost: u64 = reports.iter().map(|r| r.markers_lost).sum();
    let markers: u64 = reports.iter().map(|r| r.sent).sum::<u64>() / u64::from(ROUND);
    assert!(
        lost * 100 <= markers,
        "{lost} of {markers} pacing markers got no answer within 2 s during the flood"
    );
    eprintln!(
        "group flood: {refused} refusals of a non-member's group message; {elected_during} \
         elections during the flood"
    );
}
/// The group flood on a clean network and under [`crate::FAULTS`] (written out rather than
/// made by `cluster_test!`, which cannot mark one variant ignored).
mod a_flood_of_group_messages_from_outside_leaves_the_group_serving {
    use crate::util::Env;

    /// Runs the behaviour on a clean loopback network.
    #[test]
    fn clean() {
        super::a_flood_of_group_messages_from_outside_leaves_the_group_serving(&Env::clean());
    }

    /// Runs the behaviour with every process injecting [`crate::FAULTS`]. It failed in 5 of
    /// 8 runs before the fix: a follower whose request passed on to the leader got no answer
    /// in time (the flood slows the leader, the faults drop copies) never passed one on to
    /// that leader again while it stayed leader; reduced to
    /// [`super::a_follower_passes_requests_on_again_after_one_went_unanswered`].
    #[test]
    fn under_faults() {
        super::a_flood_of_group_messages_from_outside_leaves_the_group_serving(&Env::faulty(
            crate::FAULTS,
        ));
    }
}

/// Sends the request `body` to `target` as request `id` of `incarnation` from `socket`, again
/// every 100 ms, and returns the answer that echoes `id` (one fragment), if one comes
/// within 2 s.
fn ask(
    socket: &UdpSocket,
    target: SocketAddr,
    incarnation: u64,
    id: u64,
    body: &[u8],
) -> Option<Response> {
    let datagram = request_datagram(incarnation, id, body);
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buffer = [0u8; 65536];
    let mut resend = Instant::now();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if Instant::now() >= resend {
            let _ = socket.send_to(&datagram, target);
            resend = Instant::now() + Duration::from_millis(100);
        }
        let wait = left.min(resend.saturating_duration_since(Instant::now()));
        socket
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .expect("timeout");
        let Ok((n, _)) = socket.recv_from(&mut buffer) else {
            continue;
        };
        if let Ok((header, payload)) = Header::decode(&buffer[..n])
            && header.kind == Kind::Response
            && header.request_id == id
        {
            return Response::decode(payload).ok();
        }
    }
    None
}

/// Issue 16 ("others are refused with a clear error and counted/logged, the member keeps
/// serving"): every member of a group of three answers a `Raft` (garbage and forged), a
/// `GroupHello` claiming another member's place and a `Forwarded` query from an address
/// outside the group with the refusal [`NOT_A_MEMBER`] naming the sender, and logs the
/// refusal: a line of its stderr (debug level on) names the sender and the view-leader
/// group (rate limited; before the fix the refusal was answered but neither logged nor
/// counted).
#[test]
fn group_messages_from_a_non_member_are_refused_and_logged_by_every_member() {
    let env = Env::clean();
    let group = VlGroup::start(&env, 3, false, |_| vec!["-v".to_owned()]);
    group.leader(&env, &[]);
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let me = socket.local_addr().expect("addr").to_string();
    let mut rand = Rng::seeded(0x6E0B);
    let incarnation = rand.next_u64();
    let mut id = 0;
    for (place, &addr) in group.addrs.iter().enumerate() {
        let messages = [
            Request::Raft {
                message: random_bytes(&mut rand, 40),
            },
            Request::Raft {
                message: forged_raft(&mut rand, place as u64 + 1),
            },
            Request::GroupHello {
                member: ((place + 1) % 3) as u32,
                incarnation: rand.next_u64(),
            },
            Request::Forwarded {
                origin: random_loopback(&mut rand),
                request: Request::QueryServers.encode().expect("encodes"),
            },
        ];
        for message in messages {
            id += 1;
            let body = message.encode().expect("encodes");
            let answer = ask(&socket, addr, incarnation, id, &body);
            assert!(
                matches!(&answer, Some(Response::Error(e))
                    if e.message.contains(NOT_A_MEMBER) && e.message.contains(&me)),
                "member {place} answered {} from outside with {answer:?}",
                message.name()
            );
        }
    }
    let logged =
        wait_until(Duration::from_secs(5), || {
            (0..3).all(|i| {
                group.member(i).stderr().lines().any(|line| {
                    line.contains(&me) && line.contains("member of the view-leader group")
                })
            })
        });
    assert!(
        logged,
        "every member should log the refusals of {me}'s group messages:{}",
        group.logs()
    );
}

/// The bug the group flood found under faults, reduced: a follower passes a request on to
/// the leader and, when one of them goes unanswered within its deadline, passes none on to
/// that leader again for as long as it stayed leader (`Group::unanswering` was cleared only
/// when the known leader changed; it now lapses after about two election timeouts). Member 2 of a group of three (the longest election
/// timeouts, so member 0 leads) sends every datagram with up to 1 s of extra latency
/// (`jitter=1000ms`), so some of its forwards miss their 600 ms deadline while Raft keeps
/// the leader in place. Once member 2 logged "the leader did not answer a request passed
/// on", it must still answer `query_servers` within 15 s (its next forwards reach the same,
/// live leader), and that leader must be unchanged. Before the fix it answered nothing more.
#[test]
fn a_follower_passes_requests_on_again_after_one_went_unanswered() {
    let env = Env::clean();
    let group = VlGroup::start(&env, 3, false, |i| {
        let mut flags = vec!["-v".to_owned()];
        if i == 2 {
            flags.extend(["--faults".to_owned(), "jitter=1000ms".to_owned()]);
        }
        flags
    });
    let leader = group.leader(&env, &[]);
    assert_ne!(
        leader,
        2,
        "member 2 must follow for this test:{}",
        group.logs()
    );
    let slow = group.addrs[2].to_string();
    let ask_slow = || {
        let (code, json) = client_json(
            &env,
            &[
                "--viewleader",
                &slow,
                "--timeout-ms",
                "1500",
                "query_servers",
            ],
        );
        (code == 0).then_some(json)
    };
    let unanswered = "the leader did not answer a request passed on";
    let timed_out = wait_until(Duration::from_secs(20), || {
        let _ = ask_slow();
        group.member(2).stderr().contains(unanswered)
    });
    assert!(
        timed_out,
        "no forward of member 2 ever missed its deadline:{}",
        group.logs()
    );
    // Every forward of member 2 may miss its deadline again (its 1 s jitter), each shunning
    // the leader for about two election timeouts: allow several rounds (before the fix it
    // never answered again).
    let mut answer = None;
    let answered = wait_until(Duration::from_secs(15), || {
        answer = ask_slow();
        answer.is_some()
    });
    let still = group.leader(&env, &[]);
    assert_eq!(still, leader, "the leader changed:{}", group.logs());
    assert!(
        answered,
        "member 2 answers nothing once one request it passed on to the (live, unchanged) \
         leader went unanswered:{}",
        group.logs()
    );
}
