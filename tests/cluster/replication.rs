//! Replication (assignment 3.3 and 3.4; contract "Client commands", "Semantics the tests rely
//! on" and "The bucket allocator"): `setr` by two-phase commit, `getr`, `locate`, placement on
//! exactly the replicas the allocator names, conflicts, stale epochs, id mismatches, dying
//! replicas and a coordinator killed at each point of the protocol, all through the real
//! binaries.
//!
//! Staging: the client's test hooks (`--pause-after-view-ms`, `--pause-before-commit-ms`,
//! `--pause-after-primary-commit-ms`) are the only fixed pauses. The tests never guess when a
//! staged client has reached its hook: the client's main thread sleeps nowhere else, so the
//! test polls `/proc/PID/wchan` (see [`Staged::in_pause`]) and knows exactly when the view
//! was learned, when every vote was collected, or when the primary acknowledged the commit.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use trireme::placement::view::{Member, View};

use crate::cluster_test;
use crate::util::*;

/// `--timeout-ms` of every command expected to succeed. Under the faulty variant's 20% loss
/// each way, one request/answer exchange fails with probability 0.36 per attempt, and the
/// retransmission timeout doubles from 100 ms up to its 2 s ceiling: 10 s allow 9 attempts
/// (a failure in about 1e-4 exchanges, which the ~700 exchanges of the placement test alone
/// would hit several percent of the time), 20 s allow 14 (about 6e-7).
const LONG_MS: &str = "20000";

/// How long a staged client may take to reach its hook (the view, the votes or the primary's
/// acknowledgement may need several retransmissions under faults).
const HOOK_LIMIT: Duration = Duration::from_secs(10);

/// How long a staged client may take to finish once released from its hook.
const FINISH_LIMIT: Duration = Duration::from_secs(35);

/// `--timeout-ms` of the staged `setr`s whose survivors must be released by the abort: a
/// survivor left waiting would hold the key for about this long (its deadline).
const STAGED_LONG_MS: u64 = 30_000;

/// `--timeout-ms` of the `getr` that checks the survivors were released: a replica still
/// holding the key prepared keeps the read for its share of this (20 s for the first).
const PROBE_READ_MS: &str = "60000";

/// How fast that `getr` must come back when no replica holds the key locked: far below the
/// 20 s a locked replica would hold it, and on a clean network far below a second.
fn unlocked_read(env: &Env) -> Duration {
    Duration::from_millis(by_env(env, 1_000, 12_000))
}

/// The longest a key may stay locked after its coordinator was killed, as seen by this test:
/// the protocol's bound (the coordinator's remaining 1.5 s plus 0.3–0.8 s of termination)
/// plus the test's own probing `setr`s, which under 20% loss are fresh processes paying
/// initial retransmission timeouts (about a second each in the worst case).
fn lock_bound(env: &Env) -> Duration {
    Duration::from_millis(by_env(env, 5_000, 10_000))
}

/// `clean` on a clean network, `faulty` under faults: the length of a test-hook pause that
/// must outlast other commands, whose retransmissions under faults take much longer.
fn by_env(env: &Env, clean: u64, faulty: u64) -> u64 {
    if env.faults.is_some() { faulty } else { clean }
}

// ---------------------------------------------------------------------------------------
// Client commands
// ---------------------------------------------------------------------------------------

/// Runs `client --json --viewleader VL --timeout-ms LONG_MS ARGS...`.
fn via_viewleader(env: &Env, vl: &ViewLeader, args: &[&str]) -> (i32, Value) {
    let vl = vl.addr.to_string();
    let mut all = vec!["--viewleader", vl.as_str(), "--timeout-ms", LONG_MS];
    all.extend_from_slice(args);
    client_json(env, &all)
}

/// `setr KEY VALUE --wait` with the generous timeout (waiting out any rebalance).
fn setr(env: &Env, vl: &ViewLeader, key: &str, value: &str) -> (i32, Value) {
    via_viewleader(env, vl, &["setr", key, value, "--wait"])
}

/// `getr KEY --wait` with the generous timeout (waiting out any rebalance).
fn getr(env: &Env, vl: &ViewLeader, key: &str) -> (i32, Value) {
    via_viewleader(env, vl, &["getr", key, "--wait"])
}

/// `locate KEY` with the generous timeout.
fn locate(env: &Env, vl: &ViewLeader, key: &str) -> (i32, Value) {
    via_viewleader(env, vl, &["locate", key])
}

/// `query_servers` with the generous timeout; `None` if it failed (under faults even 20 s of
/// retransmissions can, rarely, go unanswered: polls just ask again).
fn try_view_json(env: &Env, vl: &ViewLeader) -> Option<Value> {
    let (code, json) = via_viewleader(env, vl, &["query_servers"]);
    (code == 0).then_some(json)
}

/// `query_servers` with the generous timeout, which must succeed.
fn view_json(env: &Env, vl: &ViewLeader) -> Value {
    let result = via_viewleader(env, vl, &["query_servers"]);
    assert_ok(&result, "query_servers");
    result.1
}

/// Waits (up to 10 s) until the view holds exactly `n` servers; returns the view. (Like the
/// harness's `wait_for_servers`, with the generous timeout on each query.)
fn wait_for_members(env: &Env, vl: &ViewLeader, n: usize) -> Value {
    let mut last = Value::Null;
    let held = wait_until(Duration::from_secs(10), || {
        last = try_view_json(env, vl).unwrap_or(Value::Null);
        // Replicated operations are refused until the new view is rebalanced.
        server_ids(&last).len() == n && last["rebalancing"] == false
    });
    assert!(held, "the view never reached {n} servers; last {last}");
    last
}

/// Runs `client --json --server ADDR --timeout-ms LONG_MS ARGS...` (the raw commands).
fn on_server(env: &Env, addr: SocketAddr, args: &[&str]) -> (i32, Value) {
    let addr = addr.to_string();
    let mut all = vec!["--server", addr.as_str(), "--timeout-ms", LONG_MS];
    all.extend_from_slice(args);
    client_json(env, &all)
}

/// The keys committed in the bucket of the server at `addr` (`query_all_keys`).
fn keys_on(env: &Env, addr: SocketAddr) -> BTreeSet<String> {
    let result = on_server(env, addr, &["query_all_keys"]);
    assert_ok(&result, &format!("query_all_keys on {addr}"));
    result.1["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k.as_str().expect("key").to_owned())
        .collect()
}

/// The raw value of `key` in the bucket of the server at `addr`; `None` if not there.
fn raw_get(env: &Env, addr: SocketAddr, key: &str) -> Option<String> {
    let (code, json) = on_server(env, addr, &["get", key]);
    match (code, json["kind"].as_str()) {
        (0, _) => Some(json["value"].as_str().expect("value").to_owned()),
        (1, Some("not_found")) => None,
        _ => panic!("get {key} on {addr} failed: {json}"),
    }
}

/// Asserts a successful command: exit 0 and `"ok": true`.
fn assert_ok(result: &(i32, Value), what: &str) {
    let (code, json) = result;
    assert!(
        *code == 0 && json["ok"] == true,
        "{what} should succeed, got exit {code}: {json}"
    );
}

/// Asserts a failure of `kind`: exit 1 and `{"ok":false,"kind":KIND,...}`; returns the
/// error message.
fn assert_failed(result: &(i32, Value), kind: &str, what: &str) -> String {
    let (code, json) = result;
    assert!(
        *code == 1 && json["ok"] == false && json["kind"] == kind,
        "{what} should fail with {kind}, got exit {code}: {json}"
    );
    json["error"].as_str().unwrap_or_default().to_owned()
}

/// Asserts a failure of one of `kinds`; returns the error message.
fn assert_failed_as(result: &(i32, Value), kinds: &[&str], what: &str) -> String {
    let (code, json) = result;
    assert!(
        *code == 1 && json["ok"] == false && kinds.iter().any(|k| json["kind"] == *k),
        "{what} should fail with one of {kinds:?}, got exit {code}: {json}"
    );
    json["error"].as_str().unwrap_or_default().to_owned()
}

/// Asserts that `getr KEY` returns `value`; returns the answer.
fn assert_reads(env: &Env, vl: &ViewLeader, key: &str, value: &str) -> Value {
    let result = getr(env, vl, key);
    assert_ok(&result, &format!("getr {key}"));
    assert_eq!(result.1["value"], value, "getr {key}: {}", result.1);
    assert_eq!(result.1["key"], key, "getr {key}: {}", result.1);
    result.1
}

/// Asserts that no replica of `key` holds it prepared: `getr KEY` (with a long timeout, so a
/// replica holding it would keep the read for many seconds) answers `not_found` at once.
fn assert_released(env: &Env, vl: &ViewLeader, key: &str) {
    let vla = vl.addr.to_string();
    // A view change racing the read (the test just stopped a server) is refused with
    // `rebalancing`, which says nothing about the key: read again once the view settles.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let started = Instant::now();
        let read = client_json(
            env,
            &[
                "--viewleader",
                &vla,
                "--timeout-ms",
                PROBE_READ_MS,
                "getr",
                key,
            ],
        );
        let took = started.elapsed();
        if read.1["kind"] == "rebalancing" && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        assert_failed(&read, "not_found", &format!("getr {key} after the abort"));
        assert!(
            took < unlocked_read(env),
            "getr {key} took {took:?}: a replica still held {key} prepared"
        );
        return;
    }
}

/// The `version` field of a `setr` or `getr` answer.
fn version(json: &Value) -> u64 {
    json["version"]
        .as_u64()
        .unwrap_or_else(|| panic!("no version in {json}"))
}

/// The value the tests write under `key` when any value will do.
fn value_of(key: &str) -> String {
    format!("value of {key}")
}

/// Runs `f` on every item at once, one thread each (the client processes overlap), and
/// returns the results in order.
fn parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let f = &f;
    std::thread::scope(|scope| {
        let workers: Vec<_> = items
            .iter()
            .map(|item| scope.spawn(move || f(item)))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker thread"))
            .collect()
    })
}

// ---------------------------------------------------------------------------------------
// Views, placement and cluster start-up
// ---------------------------------------------------------------------------------------

/// The replicas of `key` in `view` by the library's allocator, primary first.
fn replicas_of(view: &View, key: &str) -> Vec<Member> {
    trireme::placement::ring::replicas(view, key)
}

/// The index in `servers` of the server at `addr`.
fn index_at(servers: &[Server], addr: SocketAddr) -> usize {
    servers
        .iter()
        .position(|s| s.addr == addr)
        .unwrap_or_else(|| panic!("no server of this test is at {addr}"))
}

/// Waits (up to 10 s) until every server in `servers` has learned the view leader's
/// current epoch from a heartbeat acknowledgement, so no prepare meets a stale epoch (the
/// window after a view change in which assignment 3.4 lets `setr` fail), then checks that a
/// `setr` of a warm-up key succeeds at once. Returns the view.
fn settle(env: &Env, vl: &ViewLeader, servers: &[&Server]) -> View {
    let mut view = Value::Null;
    let learned = wait_until(Duration::from_secs(10), || {
        view = try_view_json(env, vl).unwrap_or(Value::Null);
        let epoch = view["epoch"].as_u64();
        let rebalanced = view["rebalancing"] == false;
        epoch.is_some() && rebalanced && servers.iter().all(|s| last_learned_epoch(s) == epoch)
    });
    let seen: Vec<Option<u64>> = servers.iter().map(|s| last_learned_epoch(s)).collect();
    assert!(
        learned,
        "servers never all learned the epoch of {view}; they learned {seen:?}"
    );
    let warm = setr(env, vl, "warm-up", "x");
    assert_ok(
        &warm,
        "the warm-up setr once every server learned the epoch",
    );
    view_of(&view)
}

/// Starts a view leader and `n` servers, waits until the view holds all of them, is
/// rebalanced, and every server learned its epoch (see [`settle`]).
fn cluster(env: &Env, n: usize) -> (ViewLeader, Vec<Server>) {
    let vl = viewleader(env);
    let servers: Vec<Server> = (0..n).map(|_| server(env, &vl)).collect();
    wait_for_members(env, &vl, n);
    settle(env, &vl, &servers.iter().collect::<Vec<_>>());
    (vl, servers)
}

// ---------------------------------------------------------------------------------------
// Processes this file starts itself
// ---------------------------------------------------------------------------------------

/// A `client` run in the background whose process id the test knows, so that it can tell
/// when the client sits in one of `setr`'s test-hook pauses, and SIGKILL it there. Killed
/// and reaped when dropped.
struct Staged {
    /// The client process.
    child: Child,
}

impl Staged {
    /// Starts the client with `args` (output captured).
    fn start(env: &Env, args: &[&str]) -> Staged {
        Staged {
            child: spawn_client(env, args),
        }
    }

    /// Starts `client --json --viewleader VL --timeout-ms TIMEOUT setr KEY VALUE HOOK MS`.
    fn setr(
        env: &Env,
        vl: &ViewLeader,
        timeout_ms: u64,
        key: &str,
        value: &str,
        hook: &str,
        pause_ms: u64,
    ) -> Staged {
        let vl = vl.addr.to_string();
        let timeout = timeout_ms.to_string();
        let pause = pause_ms.to_string();
        Staged::start(
            env,
            &[
                "--json",
                "--viewleader",
                &vl,
                "--timeout-ms",
                &timeout,
                "setr",
                key,
                value,
                hook,
                &pause,
            ],
        )
    }

    /// True while the client is still running.
    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// True while the client's main thread sleeps. The client's main thread sleeps nowhere
    /// but in a test-hook pause (every network wait blocks on a channel, a futex), so this
    /// says exactly that the client has reached its hook.
    fn in_pause(&self) -> bool {
        let pid = self.child.id();
        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        if wchan.contains("nanosleep") {
            return true;
        }
        // Kernels that hide wchan still show the current system call (x86-64 numbers:
        // 35 = nanosleep, 230 = clock_nanosleep).
        let syscall = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        cfg!(target_arch = "x86_64") && matches!(syscall.split(' ').next(), Some("35" | "230"))
    }

    /// Waits (up to [`HOOK_LIMIT`]) until the client sits in its hook pause; false if it
    /// ended first (it failed before reaching the hook).
    fn reach_hook(&mut self) -> bool {
        wait_until(HOOK_LIMIT, || !self.is_running() || self.in_pause());
        self.is_running() && self.in_pause()
    }

    /// Like [`Staged::reach_hook`], but a client that never reaches its hook fails the test.
    fn expect_hook(&mut self, what: &str) {
        if !self.reach_hook() {
            let run = self.finish_now();
            panic!("{what}: the staged client never reached its hook: {run:?}");
        }
    }

    /// SIGKILLs the client and reaps it; returns when it was killed.
    fn kill(mut self) -> Instant {
        let at = Instant::now();
        let _ = self.child.kill();
        let _ = self.child.wait();
        at
    }

    /// Collects the output of a client that has ended (or ends within 1 s).
    fn finish_now(&mut self) -> Run {
        self.collect(Duration::from_secs(1))
    }

    /// Waits (up to `limit`) for the client to finish and returns its run.
    fn finish(mut self, limit: Duration) -> Run {
        self.collect(limit)
    }

    /// Waits (up to `limit`) for the client to end and reads its output.
    fn collect(&mut self, limit: Duration) -> Run {
        let ended = wait_until(limit, || !self.is_running());
        assert!(ended, "the staged client still runs after {limit:?}");
        let status = self.child.wait().expect("reaped");
        let mut stdout = String::new();
        let mut stderr = String::new();
        if let Some(mut out) = self.child.stdout.take() {
            let _ = out.read_to_string(&mut stdout);
        }
        if let Some(mut err) = self.child.stderr.take() {
            let _ = err.read_to_string(&mut stderr);
        }
        Run {
            code: status.code().unwrap_or(-1),
            stdout,
            stderr,
        }
    }
}

impl Drop for Staged {
    /// Kills and reaps the client if it is still running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server process bound to an address of the test's choosing (the harness's `server`
/// always binds port 0). Killed and reaped when dropped.
struct Replacement {
    /// The server process.
    child: Child,
    /// Its id, from its `listening` line.
    id: String,
}

impl Replacement {
    /// Starts a server bound to `addr`, heartbeating `viewleader`; waits (10 s) for its
    /// `listening on ADDR id ID` line.
    fn start(env: &Env, addr: SocketAddr, viewleader: SocketAddr) -> Replacement {
        let mut child = env
            .command(SERVER)
            .args(["--bind", &addr.to_string()])
            .args(["--viewleader", &viewleader.to_string()])
            .args(["--heartbeat-interval-ms", &HEARTBEAT_MS.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("server spawns");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line.trim_end().to_owned());
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let line = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
        let expected = format!("listening on {addr} id ");
        let Some(id) = line.strip_prefix(&expected) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server bound to {addr} said {line:?}");
        };
        Replacement {
            id: id.to_owned(),
            child,
        }
    }
}

impl Drop for Replacement {
    /// Kills and reaps the server.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

/// Assignment 3.4 "Verify that key lookups work" ("setr operations should succeed as long as
/// there is at least one server available. getr should be able to retrieve values set by
/// setr"), and the contract's bucket allocator ("every server's bucket holds exactly the keys
/// whose replica sets include it"): on fresh clusters of 1 to 6 servers, 12 keys written by
/// `setr` (at once, from 12 clients) read back by `getr`; each is on exactly the
/// `min(3, n)` servers the library's allocator names (checked with `query_all_keys` on every
/// server) and on no other; `setr` and `locate` name those replicas in ring order.
fn setr_then_getr_round_trips_on_1_to_6_servers_with_exact_placement(env: &Env) {
    for n in 1..=6 {
        let (vl, servers) = cluster(env, n);
        let view = view_of(&view_json(env, &vl));
        let keys: Vec<String> = (0..12).map(|i| format!("key-{n}-{i}")).collect();
        let expected: Vec<Vec<Member>> = keys.iter().map(|k| replicas_of(&view, k)).collect();

        // One client pipeline per key, all at once: setr, then getr, then locate.
        let results = parallel(&keys, |key| {
            let written = setr(env, &vl, key, &value_of(key));
            let read = getr(env, &vl, key);
            let located = locate(env, &vl, key);
            (written, read, located)
        });
        for ((key, (written, read, located)), replicas) in keys.iter().zip(&results).zip(&expected)
        {
            assert_eq!(replicas.len(), n.min(3), "{key} on {n} servers");
            assert_ok(written, &format!("setr {key} on {n} servers"));
            assert_eq!(written.1["key"], key.as_str());
            assert_eq!(
                written.1["epoch"], view.epoch.0,
                "setr {key}: {}",
                written.1
            );
            assert_eq!(
                &members_of(&written.1["replicas"]),
                replicas,
                "setr {key} on {n} servers: its replicas in ring order"
            );

            assert_ok(read, &format!("getr {key} on {n} servers"));
            assert_eq!(read.1["value"], value_of(key), "getr {key}: {}", read.1);
            assert_eq!(version(&read.1), version(&written.1), "getr {key}");
            let from = member_of(&read.1["from"]);
            assert!(replicas.contains(&from), "getr {key} answered by {from:?}");

            assert_ok(located, &format!("locate {key} on {n} servers"));
            assert_eq!(
                located.1["epoch"], view.epoch.0,
                "locate {key}: {}",
                located.1
            );
            assert_eq!(
                &members_of(&located.1["replicas"]),
                replicas,
                "locate {key} on {n} servers: the allocator's replicas in ring order"
            );
        }

        let prefix = format!("key-{n}-");
        let buckets = parallel(&servers, |s| keys_on(env, s.addr));
        for (s, bucket) in servers.iter().zip(buckets) {
            let held: BTreeSet<String> = bucket
                .into_iter()
                .filter(|k| k.starts_with(&prefix))
                .collect();
            let should: BTreeSet<String> = keys
                .iter()
                .zip(&expected)
                .filter(|(_, replicas)| replicas.iter().any(|m| m.addr == s.addr))
                .map(|(key, _)| key.clone())
                .collect();
            assert_eq!(
                held, should,
                "bucket of {} on {n} servers: exactly the keys whose replicas include it",
                s.addr
            );
        }
        assert_eq!(
            view_of(&view_json(env, &vl)).epoch,
            view.epoch,
            "the view stayed put during the checks"
        );
    }
}
cluster_test!(setr_then_getr_round_trips_on_1_to_6_servers_with_exact_placement);

/// Assignment 3.4 "Verify that key lookups work after a replica fails ... a getr operation
/// should still work, even if the primary replica has failed": with 4 servers, the primary
/// of a key is killed; `getr` of every key returns its value at once, while the dead primary
/// is still in the view (its port answers "unreachable", the client tries the next replica),
/// and again once the view has dropped it.
fn getr_works_after_the_primary_dies(env: &Env) {
    let (vl, mut servers) = cluster(env, 4);
    let keys: Vec<String> = (0..8).map(|i| format!("survivor-{i}")).collect();
    for key in &keys {
        assert_ok(&setr(env, &vl, key, &value_of(key)), &format!("setr {key}"));
    }
    let located = locate(env, &vl, &keys[0]);
    assert_ok(&located, "locate");
    let primary = member_of(&located.1["replicas"][0]);
    let view = view_of(&view_json(env, &vl));
    let orphaned: Vec<&String> = keys
        .iter()
        .filter(|k| replicas_of(&view, k)[0] == primary)
        .collect();
    assert!(orphaned.contains(&&keys[0]));

    drop(servers.remove(index_at(&servers, primary.addr)));

    // At once: the keys whose primary died first, then the rest.
    let rest = keys.iter().filter(|k| !orphaned.contains(k));
    for key in orphaned.iter().copied().chain(rest) {
        let answer = assert_reads(env, &vl, key, &value_of(key));
        assert_ne!(
            member_of(&answer["from"]),
            primary,
            "the dead primary cannot have answered"
        );
    }
    let still_listed = server_ids(&view_json(env, &vl)).contains(&primary.id.to_string());
    if env.faults.is_none() {
        // On a clean network the reads above take far less than dead-after: the dead
        // primary was in the view throughout, which is the case this test is about.
        assert!(
            still_listed,
            "the reads took so long that the dead primary already left the view"
        );
    }

    // After the view dropped it.
    wait_for_members(env, &vl, 3);
    for key in &keys {
        assert_reads(env, &vl, key, &value_of(key));
    }
}
cluster_test!(getr_works_after_the_primary_dies);

/// Assignment 3.4 "Verify that in simultaneous attempts to commit to the same key, at most
/// one attempt will succeed ... Any of the servers should recognize that there is a pending
/// operation on the given key and not vote for it. Simultaneous operations on other keys,
/// even those hosted on the same server, should succeed": while a `setr` of `k` has every
/// vote and is paused before its commit, a second `setr k` is aborted ("pending commit")
/// and, at the same time, a `setr` of another key on the same three servers succeeds; the
/// first `setr` then commits and `getr k` returns its value.
fn a_commit_overlapping_a_pending_one_on_the_same_key_aborts(env: &Env) {
    let (vl, _servers) = cluster(env, 3);
    let mut first = Staged::setr(
        env,
        &vl,
        20_000,
        "k",
        "first",
        "--pause-before-commit-ms",
        // Under faults on two busy cores the two setrs below have taken over 8 s once: the
        // pause leaves them 12 s, and still leaves the commit 8 s of the 20 s bound.
        by_env(env, 3_000, 12_000),
    );
    first.expect_hook("setr k first");

    let started = Instant::now();
    let (second, other) = std::thread::scope(|scope| {
        let second = scope.spawn(|| setr(env, &vl, "k", "second"));
        let other = scope.spawn(|| setr(env, &vl, "other-key", "x"));
        (second.join().unwrap(), other.join().unwrap())
    });
    let took = started.elapsed();
    let error = assert_failed(&second, "aborted", "setr k second during a pending commit");
    assert!(error.contains("pending commit"), "{error}");
    assert_ok(&other, "setr other-key during the pending commit of k");
    assert_eq!(
        members_of(&other.1["replicas"]).len(),
        3,
        "other-key lives on the same three servers as k"
    );
    assert!(
        first.is_running() && first.in_pause(),
        "the other key's setr must have run while k's commit was pending (the two setrs took \
         {took:?})"
    );

    let run = first.finish(FINISH_LIMIT);
    assert_eq!(run.code, 0, "the first setr commits: {run:?}");
    assert_eq!(run.json()["ok"], true);
    assert_reads(env, &vl, "k", "first");
    assert_reads(env, &vl, "other-key", "x");
}
cluster_test!(a_commit_overlapping_a_pending_one_on_the_same_key_aborts);

/// Contract (`getr`): "a replica holding a prepared setr on KEY answers after that decision,
/// never with the value it is about to replace" (issue 3: reads never see a write half
/// done). A `getr k` sent while `setr k new` holds every replica prepared (paused before its
/// commit) is held back until the commit and returns "new", with the commit's version.
fn a_getr_during_a_pending_commit_returns_the_decided_value(env: &Env) {
    let (vl, _servers) = cluster(env, 3);
    assert_ok(&setr(env, &vl, "k", "old"), "setr k old");
    let mut writer = Staged::setr(
        env,
        &vl,
        20_000,
        "k",
        "new",
        "--pause-before-commit-ms",
        1_500,
    );
    writer.expect_hook("setr k new");
    let vla = vl.addr.to_string();
    let mut reader = client_background(
        env,
        &[
            "--json",
            "--viewleader",
            &vla,
            "--timeout-ms",
            LONG_MS,
            "getr",
            "k",
        ],
    );
    // The pause has at least 1.4 s to go: the read must still be held back after 1 s.
    let answered_early = wait_until(Duration::from_millis(1_000), || !reader.is_running());
    assert!(
        !answered_early,
        "getr k answered while the commit was pending: {:?}",
        reader.finish(Duration::from_secs(1))
    );
    let written = writer.finish(FINISH_LIMIT);
    assert_eq!(written.code, 0, "setr k new: {written:?}");
    let read = reader.finish(FINISH_LIMIT);
    assert_eq!(read.code, 0, "getr k: {read:?}");
    let read = read.json();
    assert_eq!(
        read["value"], "new",
        "the decided value, not the replaced one"
    );
    assert_eq!(version(&read), version(&written.json()));
}
cluster_test!(a_getr_during_a_pending_commit_returns_the_decided_value);

/// Assignment 3.4 "Verify that distributed commits fail if servers don't agree on the epoch
/// ... the view may change in between the time that the client requests the server list
/// from the view leader and the time that it attempts to perform the commit", as issue 17
/// refines it (transactions survive view changes that did not touch their key; the issue
/// outranks the assignment here): `setr`s of 12 keys learned the view of 3 servers, then
/// waited while a 4th joined and every server learned the new epoch. Each `setr` whose key
/// got new replicas is aborted (its participants are no longer the key's replicas), and no
/// server holds that key afterwards; each whose replicas did not change commits, and reads
/// back. A new `setr` of a moved key then succeeds on the new view.
fn a_view_change_between_learning_the_view_and_voting_aborts_everywhere(env: &Env) {
    let (vl, mut servers) = cluster(env, 3);
    let before = settle(env, &vl, &servers.iter().collect::<Vec<_>>());
    let pause = by_env(env, 3_000, 12_000);
    let keys: Vec<String> = (0..12).map(|i| format!("k{i}")).collect();
    let mut staged: Vec<Staged> = keys
        .iter()
        .map(|k| Staged::setr(env, &vl, 30_000, k, "v", "--pause-after-view-ms", pause))
        .collect();
    for (s, k) in staged.iter_mut().zip(&keys) {
        s.expect_hook(&format!("setr {k} v"));
    }
    servers.push(server(env, &vl));
    wait_for_members(env, &vl, 4);
    let view = settle(env, &vl, &servers.iter().collect::<Vec<_>>());
    assert!(
        staged.iter_mut().all(|s| s.is_running() && s.in_pause()),
        "the view change must happen while the setrs pause after learning the view"
    );

    let mut unmoved = 0;
    for (s, key) in staged.into_iter().zip(&keys) {
        let run = s.finish(FINISH_LIMIT);
        let moved = replicas_of(&before, key) != replicas_of(&view, key);
        if moved {
            let error = assert_failed(
                &(run.code, run.json()),
                "aborted",
                &format!("setr {key} v across a view change that moved it"),
            );
            assert!(error.contains("replicas"), "{error}");
            for s in &servers {
                assert!(
                    !keys_on(env, s.addr).contains(key.as_str()),
                    "{} holds {key} after the abort",
                    s.addr
                );
            }
            let again = setr(env, &vl, key, "v2");
            assert_ok(&again, &format!("setr {key} v2 after the aborted one"));
            assert_eq!(again.1["epoch"], view.epoch.0);
            assert_eq!(members_of(&again.1["replicas"]), replicas_of(&view, key));
            assert_reads(env, &vl, key, "v2");
        } else {
            unmoved += 1;
            assert_ok(
                &(run.code, run.json()),
                &format!("setr {key} v across a view change that left its replicas"),
            );
            assert_reads(env, &vl, key, "v");
        }
    }
    // Each key stays with probability 1/4 (the joiner is not among its 3 replicas).
    eprintln!("{unmoved} of {} keys kept their replicas", keys.len());
}
cluster_test!(a_view_change_between_learning_the_view_and_voting_aborts_everywhere);

/// Assignment 3.4 "Verify that distributed commits fail if servers don't agree on the epoch
/// or server identifier ... a server might fail and restart, without the view leader
/// noticing, resulting in a server having a different identifier but the same TCP
/// endpoint": after a `setr` learned the view, the primary of its key is killed and a new
/// server process (fresh id) is started on the same address; it heartbeats into a black hole,
/// so the view leader has not noticed anything when the prepares go out. The `setr` is
/// aborted (on a clean network for the id mismatch, naming the expected id; under faults an
/// epoch mismatch may come first, since the view leader may drop the old id early when its
/// last heartbeats were lost), the survivors are released by the abort (a `getr` is answered
/// at once) and hold nothing, and the key is writable once the view has settled.
///
/// KNOWN PRODUCT BUG (reported; this test fails at commit c68ca76 on its last assertion):
/// `Server::serve` runs `check_participants` before `Participant::prepare`'s id and epoch
/// checks, so the restarted server votes no with "this replica has not learned a view yet"
/// and "server id mismatch" is never reported.
fn a_server_id_mismatch_aborts(env: &Env) {
    let (vl, mut servers) = cluster(env, 3);
    let view = view_of(&view_json(env, &vl));
    let primary = replicas_of(&view, "k")[0];
    // A short pause: the prepares must go out well within dead-after (1 s) of the kill, so
    // the view still lists the old id at that address.
    let mut staged = Staged::setr(
        env,
        &vl,
        STAGED_LONG_MS,
        "k",
        "v",
        "--pause-after-view-ms",
        500,
    );
    staged.expect_hook("setr k v");
    drop(servers.remove(index_at(&servers, primary.addr)));
    let black_hole = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let replacement = Replacement::start(env, primary.addr, black_hole.local_addr().unwrap());
    assert_ne!(replacement.id, primary.id.to_string());
    assert!(
        staged.is_running() && staged.in_pause(),
        "the replacement must be up before the setr's pause ends"
    );

    let run = staged.finish(FINISH_LIMIT);
    let error = assert_failed(
        &(run.code, run.json()),
        "aborted",
        "setr k v to a replaced server",
    );
    if env.faults.is_none() {
        assert!(
            error.contains(&primary.addr.to_string()),
            "the replaced replica refused: {error}"
        );
    }

    // The survivors voted yes; the abort released them at once.
    assert_released(env, &vl, "k");
    for addr in servers.iter().map(|s| s.addr).chain([primary.addr]) {
        assert!(!keys_on(env, addr).contains("k"), "{addr} holds k");
    }

    wait_for_members(env, &vl, 2);
    settle(env, &vl, &servers.iter().collect::<Vec<_>>());
    assert_ok(
        &setr(env, &vl, "k", "v2"),
        "setr k v2 once the view settled",
    );
    assert_reads(env, &vl, "k", "v2");

    // Last, so that every check above runs regardless: the refusal names the cause.
    // KNOWN PRODUCT BUG (fails at c68ca76): the server checks the prepare's participant list
    // against its own view before the id and epoch checks, so the restarted server answers
    // "this replica has not learned a view yet" and the id mismatch is never reported.
    if env.faults.is_none() {
        assert!(
            error.contains("id mismatch") && error.contains(&primary.id.to_string()),
            "the refusal should be the id mismatch naming the expected id: {error}"
        );
    } else {
        assert!(
            error.contains("id mismatch") || error.contains("epoch mismatch"),
            "the refusal should be an id or epoch mismatch: {error}"
        );
    }
}
cluster_test!(a_server_id_mismatch_aborts);

/// Assignment 3.3 "Your distributed commit implementation should fail cleanly if any of the
/// constituent servers dies, whereupon the client should ... send abort messages to the
/// remaining servers" (issue 3: "a replica that dies after the view was learned makes the
/// setr fail and the survivors are released at once by the abort"): a replica killed while
/// the `setr` pauses after learning the view (a short pause, so the prepares go out well
/// within dead-after and the view still lists the victim) makes it fail (kind `aborted`, or
/// `unreachable`, the transport's kind for the ICMP error), naming the dead replica; right
/// after, a `getr` of the key is answered (not_found) without waiting for any lock, and once
/// the view has dropped the dead server the key is writable.
fn a_replica_dying_after_the_view_was_learned_fails_the_setr_and_releases_the_others(env: &Env) {
    let (vl, mut servers) = cluster(env, 3);
    let view = view_of(&view_json(env, &vl));
    let victim = replicas_of(&view, "k")[1];
    let mut staged = Staged::setr(
        env,
        &vl,
        STAGED_LONG_MS,
        "k",
        "v",
        "--pause-after-view-ms",
        300,
    );
    staged.expect_hook("setr k v");
    drop(servers.remove(index_at(&servers, victim.addr)));

    let run = staged.finish(FINISH_LIMIT);
    // The contract does not pin the kind for a replica that could not vote: README says
    // `aborted`, the client reports the transport's kind (`unreachable`: ICMP).
    let error = assert_failed_as(
        &(run.code, run.json()),
        &["aborted", "unreachable"],
        "setr k v with a dead replica",
    );
    if env.faults.is_none() {
        assert!(error.contains(&victim.addr.to_string()), "{error}");
    } else {
        // Under faults the view leader may have last heard from the victim long before the
        // kill and dropped it before the prepares went out: then the survivors, at the new
        // epoch, vote no first.
        assert!(
            error.contains(&victim.addr.to_string()) || error.contains("epoch mismatch"),
            "{error}"
        );
    }

    assert_released(env, &vl, "k");
    for s in &servers {
        assert!(!keys_on(env, s.addr).contains("k"), "{} holds k", s.addr);
    }

    wait_for_members(env, &vl, 2);
    settle(env, &vl, &servers.iter().collect::<Vec<_>>());
    assert_ok(
        &setr(env, &vl, "k", "v2"),
        "setr k v2 once the view settled",
    );
    assert_reads(env, &vl, "k", "v2");
}
cluster_test!(a_replica_dying_after_the_view_was_learned_fails_the_setr_and_releases_the_others);

/// Assignment 3.4 "Verify that failed commits are correctly aborted. If, for any reason, a
/// setr fails to commit, all waiting servers must be notified of the abort so that the
/// operation can be re-tried": the primary of `k` is frozen (SIGSTOP; the view leader here
/// tolerates 10 s of silence, so the view does not change), so a `setr k` gets two yes votes
/// and no third one, and is aborted when its vote deadline passes (kind `aborted`, or
/// `timeout`, the transport's kind for the missing vote). The primary is thawed;
/// on a clean network an immediate `setr k` succeeds, which it could not if the two yes
/// voters were still waiting (on their own they would hold k until their deadline plus a
/// grace period and a termination query). Under faults the abort is best effort within the
/// 500 ms the coordinator keeps for it (each copy is lost with probability 0.2, so about
/// one replica in 125 misses all three), so there the retry may have to wait for the
/// termination protocol: it must succeed within 5 s. The retry's version shows the aborted
/// write committed nowhere.
fn an_aborted_key_is_writable_again(env: &Env) {
    let vl = viewleader_with(env, &["--dead-after-ms", "10000"]);
    let servers: Vec<Server> = (0..3).map(|_| server(env, &vl)).collect();
    wait_for_members(env, &vl, 3);
    let view = settle(env, &vl, &servers.iter().collect::<Vec<_>>());
    let before = setr(env, &vl, "k", "before");
    assert_ok(&before, "setr k before");
    let primary = &servers[index_at(&servers, replicas_of(&view, "k")[0].addr)];

    primary.proc.signal(libc::SIGSTOP);
    let vla = vl.addr.to_string();
    let doomed = client_json(
        env,
        &[
            "--viewleader",
            &vla,
            "--timeout-ms",
            "4000",
            "setr",
            "k",
            "doomed",
        ],
    );
    primary.proc.signal(libc::SIGCONT);
    // README says `aborted`; the client reports the transport's kind (`timeout`).
    let error = assert_failed_as(
        &doomed,
        &["aborted", "timeout"],
        "setr k doomed with a frozen primary",
    );
    assert!(
        error.contains(&primary.addr.to_string())
            && (error.contains("no answer") || error.contains("did not vote")),
        "the frozen primary's missing vote aborts the setr: {error}"
    );

    let mut again = setr(env, &vl, "k", "again");
    if env.faults.is_some() && again.0 != 0 {
        let error = again.1["error"].as_str().unwrap_or_default();
        assert!(error.contains("pending commit"), "{}", again.1);
        let retried = wait_until(Duration::from_secs(5), || {
            again = setr(env, &vl, "k", "again");
            again.0 == 0
        });
        assert!(retried, "k not writable 5 s after the abort: {}", again.1);
    }
    assert_ok(&again, "setr k again right after the abort");
    assert_eq!(
        version(&again.1),
        version(&before.1) + 1,
        "the aborted write was committed somewhere: {}",
        again.1
    );
    assert_reads(env, &vl, "k", "again");
    for s in &servers {
        assert_eq!(
            raw_get(env, s.addr, "k").as_deref(),
            Some("again"),
            "{}",
            s.addr
        );
    }
    assert_eq!(
        server_ids(&view_json(env, &vl)).len(),
        3,
        "the view never changed"
    );
}
cluster_test!(an_aborted_key_is_writable_again);

/// Retries `setr KEY after` (up to 10 s) until it succeeds; every failure must be a refusal
/// for a pending commit (or, under faults, a timeout). Returns the successful answer, when
/// (after `since`) the last refusal for a pending commit came back, and when the successful
/// attempt started: the key was still locked at the former and free by the latter, give or
/// take the attempt's own latency (up to a second or so under faults).
fn write_until_free(
    env: &Env,
    vl: &ViewLeader,
    key: &str,
    since: Instant,
) -> (Value, Option<Duration>, Duration) {
    let mut last = (0, Value::Null);
    let mut refused_until = None;
    let mut success_started = Duration::ZERO;
    let writable = wait_until(Duration::from_secs(10), || {
        let started = since.elapsed();
        last = setr(env, vl, key, "after");
        if last.0 == 0 {
            success_started = started;
            return true;
        }
        let error = last.1["error"].as_str().unwrap_or_default();
        if error.contains("pending commit") {
            refused_until = Some(since.elapsed());
        } else {
            assert!(
                env.faults.is_some() && last.1["kind"] == "timeout",
                "setr {key} after failed for another reason: {}",
                last.1
            );
        }
        false
    });
    assert!(writable, "{key} still not writable 10 s later: {}", last.1);
    (last.1, refused_until, success_started)
}

/// Where test 9 kills the coordinator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KillPoint {
    /// After learning the view, before any prepare.
    AfterView,
    /// With every replica prepared (every vote was yes), before any commit.
    BeforeCommit,
    /// After the primary acknowledged the commit, before the other commits.
    AfterPrimaryCommit,
}

impl KillPoint {
    /// The `setr` hook flag that stops the client there.
    fn hook(self) -> &'static str {
        match self {
            KillPoint::AfterView => "--pause-after-view-ms",
            KillPoint::BeforeCommit => "--pause-before-commit-ms",
            KillPoint::AfterPrimaryCommit => "--pause-after-primary-commit-ms",
        }
    }
}

/// Issue 3 item 5 (the assignment's extra credit, "participant-to-participant communication
/// for recovery after a failed coordinator"): a client SIGKILLed at each point of `setr` —
/// after learning the view, with every replica prepared, after the primary committed — never
/// leaves its key locked beyond a bounded time (under 5 s; the staged client's timeout is
/// 1.5 s) nor leaves the replicas disagreeing. Killed before the commit point: the next
/// `setr` succeeds within the bound and gets the version right after the old value's (the
/// killed write committed nowhere). Killed after the primary committed: the other replicas
/// commit the killed write too within the bound (the termination protocol asks the primary;
/// checked with raw `get` on each before anything else is written), `getr` returns it, and
/// the next `setr` gets the version after it. Afterwards every replica holds the new value.
/// The time each key stayed locked is printed.
fn a_coordinator_killed_at_any_point_leaves_replicas_consistent_and_the_key_writable(env: &Env) {
    let (vl, servers) = cluster(env, 3);
    let points = [
        KillPoint::AfterView,
        KillPoint::BeforeCommit,
        KillPoint::AfterPrimaryCommit,
    ];
    for (n, point) in points.into_iter().enumerate() {
        // Under faults the staged client (1.5 s timeout) may fail before reaching its hook;
        // that attempt's key is then abandoned and a fresh one staged.
        let mut staged = None;
        for attempt in 0..5 {
            let key = format!("killed-{n}-{attempt}");
            let first = setr(env, &vl, &key, "v0");
            assert_ok(&first, &format!("setr {key} v0"));
            let mut client = Staged::setr(env, &vl, 1_500, &key, "vN", point.hook(), 3_000);
            if client.reach_hook() {
                staged = Some((key, version(&first.1), client));
                break;
            }
            let run = client.finish_now();
            assert!(
                env.faults.is_some(),
                "{point:?}: the staged client never reached its hook: {run:?}"
            );
        }
        let Some((key, v0, client)) = staged else {
            panic!("{point:?}: no staged client reached its hook in 5 attempts");
        };
        let key = key.as_str();
        let killed_at = client.kill();

        let replicas: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
        let written = if point == KillPoint::AfterPrimaryCommit {
            // The primary committed: the others must follow (they ask the primary). Each
            // commits and releases the key in one step, so the key is free once all agree:
            // the poll round that first saw them agree started at most that long after.
            let mut values = Vec::new();
            let mut round_started = Duration::ZERO;
            let agreed = wait_until(Duration::from_secs(10), || {
                round_started = killed_at.elapsed();
                values = replicas.iter().map(|&a| raw_get(env, a, key)).collect();
                values.iter().all(|v| v == &values[0])
            });
            assert!(agreed, "{point:?}: the replicas never agreed: {values:?}");
            assert_eq!(values[0].as_deref(), Some("vN"), "{point:?}: {values:?}");
            eprintln!(
                "{point:?}: {key} locked after the kill until the replicas agreed, by {round_started:?}"
            );
            assert!(
                round_started < lock_bound(env),
                "{point:?}: {key} stayed locked {round_started:?}"
            );
            let read = assert_reads(env, &vl, key, "vN");
            assert_eq!(version(&read), v0 + 1, "{point:?}: {read}");
            let (written, refused_until, _) = write_until_free(env, &vl, key, killed_at);
            assert_eq!(
                refused_until, None,
                "{point:?}: {key} refused for a pending commit after every replica committed"
            );
            assert_eq!(
                version(&written),
                v0 + 2,
                "{point:?}: the write after the kill follows the killed one: {written}"
            );
            written
        } else {
            // Before the commit point the key is free once a setr of it succeeds.
            let (written, refused_until, success_started) =
                write_until_free(env, &vl, key, killed_at);
            eprintln!(
                "{point:?}: {key} locked after the kill: last refused at {refused_until:?}, \
                 writable by {success_started:?}"
            );
            assert!(
                success_started < lock_bound(env),
                "{point:?}: {key} stayed locked {success_started:?}"
            );
            assert_eq!(
                version(&written),
                v0 + 1,
                "{point:?}: the killed write must have committed nowhere: {written}"
            );
            written
        };
        assert_eq!(written["ok"], true);
        assert_reads(env, &vl, key, "after");
        for &addr in &replicas {
            assert_eq!(
                raw_get(env, addr, key).as_deref(),
                Some("after"),
                "{point:?}: {addr}"
            );
        }
    }
}
cluster_test!(a_coordinator_killed_at_any_point_leaves_replicas_consistent_and_the_key_writable);
