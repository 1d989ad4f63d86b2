//! Issue 8 on the real binaries: the cluster key (`--cluster-key-file`), replay refusal, and
//! the anti-amplification limit; and (issue 16) a view-leader group whose members hold the
//! key, with one member holding a wrong one.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use trireme::wire::auth::ClusterKey;
use trireme::wire::codec::{self, FLAG_MAC, Header, Kind};
use trireme::wire::message::{Request, Response};

use crate::tracing::{ScratchDir, check_with_tshark, dump_lines, tshark};
use crate::util::*;

/// A key file in the temp directory, removed when dropped.
struct KeyFile {
    /// Where it is.
    path: PathBuf,
}

impl KeyFile {
    /// Writes `secret` to a fresh file named after `name` and this process.
    fn new(name: &str, secret: &str) -> KeyFile {
        let path =
            std::env::temp_dir().join(format!("trireme-test-key-{}-{name}", std::process::id()));
        std::fs::write(&path, secret).expect("write the key file");
        KeyFile { path }
    }

    /// The path as a flag value.
    fn path(&self) -> &str {
        self.path.to_str().expect("a UTF-8 temp path")
    }

    /// The key the programs derive from this file.
    fn key(&self) -> ClusterKey {
        ClusterKey::load(&self.path).expect("a valid key file")
    }
}

impl Drop for KeyFile {
    /// Removes the file.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Runs the client with `key` (if any) and `args`.
fn client_keyed(env: &Env, key: Option<&KeyFile>, args: &[&str]) -> Run {
    let mut all: Vec<&str> = Vec::new();
    if let Some(key) = key {
        all.extend(["--cluster-key-file", key.path()]);
    }
    all.extend_from_slice(args);
    client(env, &all)
}

/// The ids in the view, asked with `key`; none while the view leader has no view to show
/// yet (it answers `rebalancing` until it has heard a server or its first dead-after ran).
fn keyed_view_ids(env: &Env, key: &KeyFile, vl: &ViewLeader) -> Vec<String> {
    let vl = vl.addr.to_string();
    let run = client_keyed(
        env,
        Some(key),
        &["--json", "--viewleader", &vl, "query_servers"],
    );
    if run.code == 1 && run.json()["kind"] == "rebalancing" {
        return Vec::new();
    }
    assert_eq!(run.code, 0, "{run:?}");
    server_ids(&run.json())
}

/// A view leader and `n` servers, all with `key`, logging at debug level; waits for the view.
fn keyed_cluster(env: &Env, key: &KeyFile, n: usize) -> (ViewLeader, Vec<Server>) {
    let flags = ["-v", "--cluster-key-file", key.path()];
    let dead = DEAD_AFTER_MS.to_string();
    let mut vl_flags = vec!["--dead-after-ms", &dead];
    vl_flags.extend(flags);
    let vl = viewleader_with(env, &vl_flags);
    let servers: Vec<Server> = (0..n).map(|_| server_with(env, &vl, &flags)).collect();
    assert!(
        wait_until(Duration::from_secs(10), || keyed_view_ids(env, key, &vl)
            .len()
            == n),
        "the keyed servers never all joined"
    );
    (vl, servers)
}

/// Microseconds since the Unix epoch, now.
fn wall_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_micros() as u64
}

/// A one-fragment request datagram carrying `request`, sealed with `key` and stamped
/// `stamp`, from requester incarnation `incarnation`, id `id`.
fn sealed_request(
    key: &ClusterKey,
    incarnation: u64,
    id: u64,
    stamp: u64,
    request: &Request,
) -> Vec<u8> {
    let body = request.encode().expect("encodable");
    let mut header = Header::new(Kind::Request, incarnation, id, 1);
    header.flags |= FLAG_MAC;
    header.stamp = stamp;
    header.message_len = body.len() as u32;
    let mut datagram = codec::encode_datagram(&header, &body);
    codec::seal(&mut datagram, key);
    datagram
}

/// Receives one datagram on `socket` (which has a read timeout) and splits it.
fn receive(socket: &UdpSocket) -> (Header, Vec<u8>, usize) {
    let mut buf = vec![0; 65536];
    let (n, _) = socket.recv_from(&mut buf).expect("a datagram back");
    let (header, payload) = Header::decode(&buf[..n]).expect("a valid datagram");
    (header, payload.to_vec(), n)
}

/// Issue 8: a client or server with the wrong key, or with none, gets no reply at all from
/// a keyed cluster and changes nothing: no write lands, no server joins; the refusals are
/// logged. The right key works throughout.
#[test]
fn a_process_with_the_wrong_key_gets_no_reply_and_changes_nothing() {
    let env = Env::clean();
    let right = KeyFile::new("right", "the right cluster key, 32 bytes.\n");
    let wrong = KeyFile::new("wrong", "a wrong cluster key, of 32 bytes\n");
    let (vl, servers) = keyed_cluster(&env, &right, 3);
    let vl_addr = vl.addr.to_string();
    let s0 = servers[0].addr.to_string();
    let ok = client_keyed(
        &env,
        Some(&right),
        &["--viewleader", &vl_addr, "setr", "--wait", "k", "v1"],
    );
    assert_eq!(ok.code, 0, "{ok:?}");

    for (name, key) in [("wrong key", Some(&wrong)), ("no key", None)] {
        let short = ["--timeout-ms", "1500", "--json"];
        for args in [
            &["--viewleader", &vl_addr, "setr", "k", "v2"][..],
            &["--server", &s0, "set", "k", "v3"][..],
            &["--viewleader", &vl_addr, "lock_get", "L", "intruder"][..],
        ] {
            let all: Vec<&str> = short.iter().chain(args).copied().collect();
            let run = client_keyed(&env, key, &all);
            assert_eq!(run.code, 1, "{name}: {args:?} must fail: {run:?}");
            assert_eq!(run.json()["kind"], "timeout", "{name}: no reply at all");
        }
    }
    // Nothing changed: the value, every replica's bucket, the lock (free for another).
    let read = client_keyed(
        &env,
        Some(&right),
        &["--viewleader", &vl_addr, "getr", "--wait", "k"],
    );
    assert_eq!(read.stdout.trim(), "v1", "{read:?}");
    for s in &servers {
        let run = client_keyed(
            &env,
            Some(&right),
            &["--server", &s.addr.to_string(), "get", "k"],
        );
        assert_eq!(run.stdout.trim(), "v1", "{run:?}");
    }
    let lock = client_keyed(
        &env,
        Some(&right),
        &[
            "--viewleader",
            &vl_addr,
            "--timeout-ms",
            "2000",
            "lock_get",
            "L",
            "owner",
        ],
    );
    assert_eq!(
        lock.code, 0,
        "the intruder's lock_get took nothing: {lock:?}"
    );

    // A server with the wrong key never joins; the view leader logs why.
    let intruder = server_with(&env, &vl, &["--cluster-key-file", wrong.path()]);
    let line = format!("from {} that fails the MAC check", intruder.addr);
    assert!(
        wait_until(Duration::from_secs(10), || vl.proc.stderr().contains(&line)),
        "the view leader logs the refused heartbeats: {}",
        vl.proc.stderr()
    );
    assert_eq!(keyed_view_ids(&env, &right, &vl).len(), 3);
    assert!(vl.proc.stderr().contains("that carries no MAC"));
}

/// Issue 8: a captured (replayed) request is answered from the dedup cache, not executed
/// again; one stamped outside the 30 s replay window (31 s ahead) is refused unanswered and
/// logged.
#[test]
fn a_replayed_datagram_is_refused() {
    let env = Env::clean();
    let file = KeyFile::new("replay", "the cluster key of the replay test");
    let key = file.key();
    let (_vl, servers) = keyed_cluster(&env, &file, 1);
    let server = &servers[0];
    let s = server.addr.to_string();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let set = |value: &str| Request::Set {
        key: "k".into(),
        value: value.into(),
    };

    let captured = sealed_request(&key, 0xfeed, 1, wall_micros(), &set("old"));
    socket.send_to(&captured, server.addr).unwrap();
    let (_, first, _) = receive(&socket);
    assert_eq!(Response::decode(&first).unwrap(), Response::Done);
    let run = client_keyed(&env, Some(&file), &["--server", &s, "set", "k", "new"]);
    assert_eq!(run.code, 0, "{run:?}");

    socket.send_to(&captured, server.addr).unwrap();
    let (header, again, _) = receive(&socket);
    assert_eq!(header.kind, Kind::Response);
    assert_eq!(again, first, "the cached answer");
    let run = client_keyed(&env, Some(&file), &["--server", &s, "get", "k"]);
    assert_eq!(
        run.stdout.trim(),
        "new",
        "the replay was not executed again"
    );

    // Stamped 31 s ahead: outside the window, though not before the server started (a
    // stamp 31 s in the past would be refused by that rule alone).
    let stale_stamp = wall_micros() + 31_000_000;
    let stale = sealed_request(&key, 0xfeed, 2, stale_stamp, &set("stale"));
    socket.send_to(&stale, server.addr).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || server
            .proc
            .stderr()
            .contains("outside the 30000 ms replay window")),
        "the refusal is logged: {}",
        server.proc.stderr()
    );
    let run = client_keyed(&env, Some(&file), &["--server", &s, "get", "k"]);
    assert_eq!(
        run.stdout.trim(),
        "new",
        "the stale request was not executed"
    );
    socket
        .set_read_timeout(Some(Duration::from_millis(1)))
        .unwrap();
    let mut buf = [0; 2048];
    assert!(
        socket.recv_from(&mut buf).is_err(),
        "and got no answer (it would have come before the client's get)"
    );
}

/// Issue 8 (anti-amplification) on a real server without a key: a small `get` of a 20 kB
/// value from an address the server has not validated gets only a `Retry` (at most three
/// times the request's bytes), as often as it is sent; echoing the token in a probe proves
/// the address, and the value follows.
#[test]
fn a_large_answer_waits_for_the_address_to_be_validated() {
    let env = Env::clean();
    let vl = viewleader(&env);
    let server = server(&env, &vl);
    let s = server.addr.to_string();
    let value = "v".repeat(20_000);
    let run = client_with_stdin(&env, &["--server", &s, "set", "big", "-"], value.as_bytes());
    assert_eq!(run.code, 0, "{run:?}");

    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let body = Request::Get { key: "big".into() }.encode().unwrap();
    let mut header = Header::new(Kind::Request, 0xabc, 1, 1);
    header.message_len = body.len() as u32;
    let request = codec::encode_datagram(&header, &body);
    let mut token = Vec::new();
    for _ in 0..2 {
        socket.send_to(&request, server.addr).unwrap();
        let (header, payload, bytes) = receive(&socket);
        assert_eq!(
            header.kind,
            Kind::Retry,
            "no fragment of the answer, a retry"
        );
        assert!(
            bytes <= 3 * request.len(),
            "{bytes} bytes for {}",
            request.len()
        );
        token = payload;
    }
    let mut probe = Header::new(Kind::Probe, 0xabc, 1, 2);
    probe.message_len = 0;
    socket
        .send_to(&codec::encode_datagram(&probe, &token), server.addr)
        .unwrap();
    let mut fragments: Vec<Option<Vec<u8>>> = Vec::new();
    let mut message_len = 0;
    while fragments.is_empty() || fragments.iter().any(Option::is_none) {
        let (header, payload, _) = receive(&socket);
        assert_eq!(header.kind, Kind::Response);
        fragments.resize(header.frag_count as usize, None);
        message_len = header.message_len as usize;
        fragments[header.frag_index as usize] = Some(payload);
    }
    let body: Vec<u8> = fragments.into_iter().flatten().flatten().collect();
    assert_eq!(body.len(), message_len);
    assert_eq!(
        Response::decode(&body).unwrap(),
        Response::Value { value },
        "the held answer, once the address is proven"
    );
}

/// Issue 8 with tracing: a keyed client's trace (68-byte headers with MAC and stamp) and an
/// unkeyed one with a `Retry` and a token probe read back in trace-dump, and, where tshark is
/// installed, the Lua dissector decodes every datagram cleanly.
#[test]
fn keyed_and_retried_traffic_reads_back_in_the_trace_tools() {
    let env = Env::clean();
    let dir = ScratchDir::new("security-trace");
    let file = KeyFile::new("trace", "the cluster key of the trace test");
    let (vl, _servers) = keyed_cluster(&env, &file, 1);
    let keyed_trace = dir.file("keyed.pcap");
    let vl_addr = vl.addr.to_string();
    let run = client_keyed(
        &env,
        Some(&file),
        &[
            "--trace",
            &keyed_trace,
            "--viewleader",
            &vl_addr,
            "setr",
            "--wait",
            "k",
            "v",
        ],
    );
    assert_eq!(run.code, 0, "{run:?}");

    let plain_vl = viewleader(&env);
    let plain = server(&env, &plain_vl);
    let s = plain.addr.to_string();
    let value = "v".repeat(5_000);
    let run = client_with_stdin(&env, &["--server", &s, "set", "big", "-"], value.as_bytes());
    assert_eq!(run.code, 0, "{run:?}");
    let retried_trace = dir.file("retried.pcap");
    let run = client(
        &env,
        &["--trace", &retried_trace, "--server", &s, "get", "big"],
    );
    assert_eq!(run.stdout.trim(), value, "{run:?}");

    let keyed_lines = dump_lines(&[&keyed_trace]);
    assert!(
        keyed_lines.iter().any(|l| l.contains("Prepare")),
        "{keyed_lines:?}"
    );
    let retried_lines = dump_lines(&[&retried_trace]);
    assert!(
        retried_lines.iter().any(|l| l.contains("retry")),
        "{retried_lines:?}"
    );
    assert!(
        retried_lines.iter().any(|l| l.contains("probe")),
        "{retried_lines:?}"
    );
    for (trace, names) in [
        (&keyed_trace, &["QueryServers", "Prepare", "Commit"][..]),
        (&retried_trace, &["Get", "Value"][..]),
    ] {
        let records = trireme::runtime::trace::read_file(std::path::Path::new(trace)).unwrap();
        for record in &records.records {
            let (header, _) = Header::decode(&record.payload).expect("a valid datagram");
            let keyed = header.flags & FLAG_MAC != 0;
            assert_eq!(keyed, trace == &keyed_trace, "MAC flag as configured");
        }
        if let Some(tshark) = tshark() {
            check_with_tshark(&tshark, trace, names);
        }
    }
}

/// Issue 16 with issue 8's cluster key (`--cluster-key-file`): a view-leader group of three
/// members all started with the key elects a leader and, with servers started with the key,
/// serves `setr`/`getr` to a keyed client. Its leader is then killed and restarted in place
/// (with its `--data-dir`, so it resumes its Raft state at once) under a *wrong* key: its
/// datagrams fail the others' MAC check and theirs fail its own, which both sides log
/// ("from ADDR that fails the MAC check"); it stands for election and never even wins a
/// pre-vote (never a candidate, never a leader), while the other two elect a leader between
/// them that every right-keyed member names and that serves `setr`/`getr`. Finally a client
/// without the key, or with the wrong one, gets no reply at all: a `timeout` saying "no view
/// leader answers on A, B, C", and the members log its datagrams as carrying no MAC.
#[test]
fn a_keyed_group_serves_and_a_member_with_the_wrong_key_is_shut_out() {
    let env = Env::clean();
    let right = KeyFile::new("group-right", "the group's cluster key, 32 bytes\n");
    let wrong = KeyFile::new("group-wrong", "not the group's cluster key......\n");
    let keyed = ["--cluster-key-file", right.path()];
    let mut group = VlGroup::start(&env, 3, true, |_| {
        ["-v", "--cluster-key-file", right.path()]
            .map(str::to_owned)
            .to_vec()
    });
    let list = group.list();
    let _servers: Vec<Server> = (0..3).map(|_| group.server(&env, &keyed)).collect();
    let mut view = None;
    let joined = wait_until(Duration::from_secs(20), || {
        view = group_query(&env, &list, &keyed);
        view.as_ref().is_some_and(|v| server_ids(v).len() == 3)
    });
    assert!(
        joined,
        "the keyed servers never all joined the keyed group: {view:?}"
    );
    let leader = group.leader(&env, &keyed);
    assert!(
        group
            .member(leader)
            .stderr()
            .contains("leads the view-leader group"),
        "{}",
        group.logs()
    );
    let keyed_client = |args: &[&str]| {
        let mut all = vec!["--viewleader", list.as_str(), "--timeout-ms", "10000"];
        all.extend_from_slice(args);
        client_keyed(&env, Some(&right), &all)
    };
    let run = keyed_client(&["setr", "--wait", "k", "v1"]);
    assert_eq!(run.code, 0, "setr through the keyed group: {run:?}");
    let run = keyed_client(&["getr", "k"]);
    assert_eq!(run.stdout.trim(), "v1", "{run:?}");

    // The leader comes back with its Raft state but the wrong key.
    group.kill(leader);
    group.start_member(&env, leader, &["-v", "--cluster-key-file", wrong.path()]);
    let intruder = group.addrs[leader];
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let refused_line = format!("from {intruder} that fails the MAC check");
    let logged = wait_until(Duration::from_secs(10), || {
        let log = group.member(leader).stderr();
        log.contains("resuming from its data dir")
            && raft_role_changes(&log)
                .iter()
                .any(|(role, _)| role == "pre-candidate")
            && log.contains("that fails the MAC check")
            && others
                .iter()
                .any(|&i| group.member(i).stderr().contains(&refused_line))
    });
    assert!(
        logged,
        "the wrong-keyed member should resume, stand for election, refuse the others' \
         datagrams, and be refused by them:{}",
        group.logs()
    );

    // The other two keep serving under a leader of their own, named by both.
    let mut named = None;
    let agreed = wait_until(Duration::from_secs(10), || {
        let answers: Vec<Option<SocketAddr>> = others
            .iter()
            .map(|&i| group_query(&env, &group.addrs[i].to_string(), &keyed))
            .map(|answer| answer.as_ref().and_then(leader_of))
            .collect();
        named = answers[0];
        named.is_some() && answers.iter().all(|&a| a == named)
    });
    assert!(
        agreed,
        "the right-keyed members never agreed on a leader:{}",
        group.logs()
    );
    assert_ne!(
        named,
        Some(intruder),
        "the wrong-keyed member is named leader"
    );
    let run = keyed_client(&["setr", "k", "v2"]);
    assert_eq!(
        run.code, 0,
        "setr with a wrong-keyed member in the list: {run:?}"
    );
    let run = keyed_client(&["getr", "k"]);
    assert_eq!(run.stdout.trim(), "v2", "{run:?}");
    // It never won a pre-vote, let alone an election.
    let log = group.member(leader).stderr();
    for never in [
        "] became candidate",
        "] became leader",
        "leads the view-leader group",
    ] {
        assert!(
            !log.contains(never),
            "the wrong-keyed member logged {never:?}:\n{log}"
        );
    }

    // Clients without the key, or with the wrong one, get no reply at all.
    group.kill(leader);
    for (name, key) in [("no key", None), ("wrong key", Some(&wrong))] {
        let run = client_keyed(
            &env,
            key,
            &[
                "--json",
                "--viewleader",
                &list,
                "--timeout-ms",
                "1500",
                "query_servers",
            ],
        );
        assert_eq!(run.code, 1, "{name}: must fail: {run:?}");
        let json = run.json();
        assert_eq!(json["kind"], "timeout", "{name}: no reply at all: {json}");
        let error = json["error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with("no view leader answers on")
                && group.addrs.iter().all(|a| error.contains(&a.to_string())),
            "{name}: the error names every member it tried: {json}"
        );
    }
    let logged = wait_until(Duration::from_secs(5), || {
        others
            .iter()
            .any(|&i| group.member(i).stderr().contains("that carries no MAC"))
    });
    assert!(
        logged,
        "the members log the unkeyed client's datagrams:{}",
        group.logs()
    );
}
