//! Bad input and failing peers: junk datagrams, unreachable and silent peers, oversized
//! inputs, usage errors. A precise error every time, and every node keeps serving.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use trireme::util::rng::Rng;

use crate::cluster_test;
use crate::util::*;

/// A valid 60-byte header (protocol version 1) of `kind` with the given fragment fields.
fn header(
    kind: u8,
    incarnation: u64,
    frag_index: u32,
    frag_count: u32,
    message_len: u32,
) -> Vec<u8> {
    let mut h = Vec::with_capacity(60);
    h.extend_from_slice(b"TRIR");
    h.push(1);
    h.push(kind);
    h.extend_from_slice(&0u16.to_be_bytes());
    h.extend_from_slice(&incarnation.to_be_bytes());
    h.extend_from_slice(&1u64.to_be_bytes());
    h.extend_from_slice(&1u32.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes());
    h.extend_from_slice(&frag_index.to_be_bytes());
    h.extend_from_slice(&frag_count.to_be_bytes());
    h.extend_from_slice(&message_len.to_be_bytes());
    h.extend_from_slice(&[0; 16]);
    h
}

/// Sends 10 000 junk and half-valid datagrams to `target`.
fn flood(target: std::net::SocketAddr) {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let mut junk = Rng::seeded(0x9E37_79B9_7F4A_7C15);
    for i in 0..10_000u32 {
        let datagram = match i % 8 {
            // Pure noise of any length.
            0 | 6 => {
                let len = usize::from(junk.next_u64() as u8) * 5;
                random_bytes(&mut junk, len)
            }
            // A valid header and a garbage one-fragment body (a request that cannot decode).
            1 | 7 => {
                let body = random_bytes(&mut junk, 40);
                let mut d = header(1, u64::from(i), 0, 1, body.len() as u32);
                d.extend(body);
                d
            }
            // The first fragment of a message that never finishes.
            2 => {
                let mut d = header(1, u64::from(i) + 1_000_000, 0, 100, 130_000);
                d.extend(random_bytes(&mut junk, 1300));
                d
            }
            // A fragment count out of all proportion to the message (once a 4 GiB table).
            4 => header(1, u64::from(i), 3, u32::MAX, 0),
            // A probe for a request that is half reassembled (case 2's incarnations).
            5 => header(4, u64::from(i - 3) + 1_000_000, 0, 1, 0),
            // Acks and probes about requests nobody sent.
            _ => {
                let mut d = header(3 + (i % 2) as u8, u64::from(i), 0, 1, 0);
                let len = usize::from(junk.next_u64() as u8 % 20);
                d.extend(random_bytes(&mut junk, len));
                d
            }
        };
        let _ = socket.send_to(&datagram, target);
    }
}

/// Brief: "Malformed datagrams, unknown senders: a precise error, and the node keeps serving."
fn junk_datagrams_never_crash_a_node(env: &Env) {
    let vl = viewleader(env);
    let s1 = server(env, &vl);
    wait_for_servers(env, &vl, 1);
    flood(vl.addr);
    flood(s1.addr);
    let target = s1.addr.to_string();
    let set = client(
        env,
        &[
            "--server",
            &target,
            "--timeout-ms",
            "10000",
            "set",
            "k",
            "v",
        ],
    );
    assert_eq!(set.code, 0, "{set:?}");
    let get = client(
        env,
        &["--server", &target, "--timeout-ms", "10000", "get", "k"],
    );
    assert_eq!((get.code, get.stdout.as_str()), (0, "v\n"));
    let view = query_servers(env, &vl);
    assert_eq!(
        server_ids(&view),
        vec![s1.id.clone()],
        "the server stayed in the view"
    );
}
cluster_test!(junk_datagrams_never_crash_a_node);

/// A request body that decodes as no request gets a `bad_input` answer, not silence.
#[test]
fn an_undecodable_request_is_answered_with_bad_input() {
    let env = Env::clean();
    let vl = viewleader(&env);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let body = [0xff, 0xff, 0xff];
    let mut d = header(1, 42, 0, 1, body.len() as u32);
    d.extend(body);
    socket.send_to(&d, vl.addr).unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = socket.recv_from(&mut buf).expect("an answer");
    assert_eq!(&buf[..4], b"TRIR");
    assert_eq!(buf[5], 2, "a response datagram");
    let text = String::from_utf8_lossy(&buf[60..n]);
    assert!(text.contains("undecodable request"), "{text}");
}

/// Contract: `unreachable` when the OS reports the peer unreachable (ICMP port unreachable).
fn a_closed_port_fails_fast_with_unreachable(env: &Env) {
    let closed = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let started = Instant::now();
    let (code, json) = client_json(
        env,
        &["--server", &closed, "--timeout-ms", "10000", "get", "k"],
    );
    assert_eq!(
        (code, json["kind"].as_str()),
        (1, Some("unreachable")),
        "{json}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failed fast, not at the deadline"
    );
}
cluster_test!(a_closed_port_fails_fast_with_unreachable);

/// Contract `--timeout-ms`: a bound on the whole command; past it, error `timeout`.
#[test]
fn a_silent_peer_times_out_within_the_bound() {
    let env = Env::clean();
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = silent.local_addr().unwrap().to_string();
    let started = Instant::now();
    let run = client(
        &env,
        &["--server", &target, "--timeout-ms", "500", "get", "k"],
    );
    let elapsed = started.elapsed();
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .lines()
            .any(|l| l.starts_with("error: timeout: ")),
        "{}",
        run.stderr
    );
    assert!(
        elapsed >= Duration::from_millis(500) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
}

/// Contract: keys over 1024 bytes (and other oversized input) are refused with `bad_input`
/// before any datagram is sent.
#[test]
fn oversized_inputs_are_refused_before_any_datagram() {
    let env = Env::clean();
    let watcher = UdpSocket::bind("127.0.0.1:0").unwrap();
    watcher
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let target = watcher.local_addr().unwrap().to_string();
    let long_key = "k".repeat(1025);
    let (code, json) = client_json(&env, &["--server", &target, "set", &long_key, "v"]);
    assert_eq!(
        (code, json["kind"].as_str()),
        (1, Some("bad_input")),
        "{json}"
    );
    let (code, json) = client_json(&env, &["--server", &target, "get", ""]);
    assert_eq!(
        (code, json["kind"].as_str()),
        (1, Some("bad_input")),
        "{json}"
    );
    let big_value = vec![b'v'; (1 << 20) + 1];
    let run = client_with_stdin(
        &env,
        &["--json", "--server", &target, "set", "k", "-"],
        &big_value,
    );
    assert_eq!(
        (run.code, run.json()["kind"].as_str()),
        (1, Some("bad_input")),
        "{run:?}"
    );
    let mut buf = [0u8; 64];
    assert!(
        watcher.recv_from(&mut buf).is_err(),
        "no datagram may have been sent"
    );
}

/// A 1 MiB value (the contract's largest) travels in fragments and comes back intact.
fn a_one_mebibyte_value_round_trips(env: &Env) {
    let vl = viewleader(env);
    let s1 = server(env, &vl);
    let target = s1.addr.to_string();
    let value: String = (0..(1 << 20))
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let run = client_with_stdin(
        env,
        &[
            "--server",
            &target,
            "--timeout-ms",
            "20000",
            "set",
            "big",
            "-",
        ],
        value.as_bytes(),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let get = client(
        env,
        &["--server", &target, "--timeout-ms", "20000", "get", "big"],
    );
    assert_eq!(get.code, 0, "{}", get.stderr);
    assert_eq!(get.stdout.len(), value.len() + 1);
    assert!(get.stdout.trim_end() == value, "value changed in transit");
}
cluster_test!(a_one_mebibyte_value_round_trips);

/// Contract: `--help` exits 0; a usage error exits 2; an invalid fault spec (flag or env) is
/// a usage error naming the bad part.
#[test]
fn help_exits_0_and_usage_errors_exit_2() {
    for binary in [VIEWLEADER, SERVER, CLIENT] {
        let help = run_binary(binary, &["--help"], &[]);
        assert_eq!(help.code, 0, "{binary} --help");
        assert!(help.stdout.contains("Usage"), "{binary}: {}", help.stdout);
        assert_eq!(
            run_binary(binary, &["--no-such-flag"], &[]).code,
            2,
            "{binary}"
        );
    }
    assert_eq!(run_binary(CLIENT, &["setr", "onlykey"], &[]).code, 2);
    assert_eq!(run_binary(CLIENT, &["set", "onlykey"], &[]).code, 2);
    let bad_flag = run_binary(CLIENT, &["--faults", "loss=0.1,bogus=3", "get", "k"], &[]);
    assert_eq!(bad_flag.code, 2);
    assert!(bad_flag.stderr.contains("bogus=3"), "{}", bad_flag.stderr);
    let bad_env = run_binary(CLIENT, &["get", "k"], &[("TRIREME_FAULTS", "loss=7")]);
    assert_eq!(bad_env.code, 2);
    assert!(bad_env.stderr.contains("loss=7"), "{}", bad_env.stderr);
    let help = run_binary(CLIENT, &["--help"], &[]);
    for command in [
        "print",
        "set",
        "get",
        "query_all_keys",
        "query_servers",
        "lock_get",
        "lock_release",
    ] {
        assert!(help.stdout.contains(command), "--help lists {command}");
    }
}

/// Runs the client with owned arguments.
fn client_owned(env: &Env, args: &[String]) -> Run {
    client(env, &args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Runs the client with owned arguments and `--json`.
fn client_json_owned(env: &Env, args: &[String]) -> (i32, serde_json::Value) {
    client_json(env, &args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Contract: the server's raw commands: `print`, `set`, `get`, `query_all_keys` (sorted).
fn raw_commands_work_on_one_server(env: &Env) {
    let vl = viewleader(env);
    let s1 = server(env, &vl);
    let target = s1.addr.to_string();
    let base = ["--server", target.as_str(), "--timeout-ms", "10000"];
    let with = |extra: &[&'static str]| -> Vec<String> {
        base.iter()
            .chain(extra.iter())
            .map(|s| (*s).to_owned())
            .collect()
    };
    assert_eq!(
        client_owned(env, &with(&["print", "hello", "world"])).code,
        0
    );
    assert!(wait_until(Duration::from_secs(5), || s1
        .proc
        .stderr()
        .contains("hello world")));
    assert_eq!(
        client_json_owned(env, &with(&["set", "b", "2"])).1,
        serde_json::json!({"ok": true, "key": "b"})
    );
    assert_eq!(client_owned(env, &with(&["set", "a", "1"])).code, 0);
    assert_eq!(client_owned(env, &with(&["set", "empty", ""])).code, 0);
    let got = client_json_owned(env, &with(&["get", "a"]));
    assert_eq!(
        got.1,
        serde_json::json!({"ok": true, "key": "a", "value": "1"})
    );
    assert_eq!(client_owned(env, &with(&["get", "empty"])).stdout, "\n");
    let keys = client_json_owned(env, &with(&["query_all_keys"]));
    assert_eq!(
        keys.1,
        serde_json::json!({"ok": true, "keys": ["a", "b", "empty"]})
    );
    let missing = client_owned(env, &with(&["get", "zzz"]));
    assert_eq!(missing.code, 1);
    assert!(
        missing
            .stderr
            .lines()
            .any(|l| l.starts_with("error: not_found: ")),
        "{}",
        missing.stderr
    );
}
cluster_test!(raw_commands_work_on_one_server);
