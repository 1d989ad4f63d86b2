//! Membership faults (issue 14, item 6): whole-cluster pauses and view-leader restarts must
//! lose no acknowledged write and never move the epoch back. Contract, "Semantics the tests
//! rely on":
//!
//! > No acknowledged `setr` is ever lost while at least one process that held it is still
//! > running, whatever the view leader declared: a paused, partitioned, crashed or restarted
//! > view leader, or a whole cluster paused at once, loses nothing. Epochs never go
//! > backwards, across view-leader failovers and restarts.
//!
//! and "A server declared dead ... rejoins under a fresh id ... It keeps what its bucket held
//! ... until rebalancing has reconciled it with the key's current holders".
//!
//! Every test writes keys with `setr` (some twice, so "its last value" means something),
//! records what was acknowledged, applies one fault (a pause of 3 × `--dead-after-ms`, or a
//! restart of the view leader on its own address), and then checks, polling with deadlines:
//! every acknowledged key reads back through `getr` with its last acknowledged value; once
//! the view is rebalanced, every bucket holds exactly the keys whose replicas include its
//! server (contract, "The bucket allocator"); every `query_servers` answer after the fault
//! reports an epoch no lower than the one before it; and the cluster keeps working (new
//! `setr`s succeed and read back). The fault is the only fixed sleep.
//!
//! Each test prints (see `--nocapture`) how long after the fault's end every key was
//! readable again, the epochs seen, and how many candidate keys each server reports
//! reconciled (informational only: no assertion depends on log wording).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster_test;
use crate::util::*;

/// `--timeout-ms` of every command expected to succeed: under the faulty variant's 20% loss
/// each way, 20 s allow about 14 retransmissions of one exchange.
const LONG_MS: &str = "20000";

/// `--timeout-ms` of one `getr` while polling for recovery: short, so one poll round never
/// hides the moment a key became readable for long (a failed poll is simply repeated).
const POLL_MS: &str = "5000";

/// How many keys each test writes before its fault (every other one is written twice).
const KEYS: usize = 20;

/// How many client processes run at once (two shared cores: more would starve the servers'
/// heartbeats and cause the very false failure detections these tests are not about).
const WIDTH: usize = 5;

/// How long a fault lasts: three times `--dead-after-ms`, so that a view leader which trusts
/// its clock blindly declares every server dead.
const PAUSE: Duration = Duration::from_millis(3 * DEAD_AFTER_MS);

/// How long after the fault's end every acknowledged key must read back.
const RECOVERY_LIMIT: Duration = Duration::from_secs(40);

/// How long the view may take to hold the expected servers and finish rebalancing.
const SETTLE_LIMIT: Duration = Duration::from_secs(30);

/// How long one write may keep being retried (an abort right after a view change is allowed;
/// the caller decides to retry, as the contract says).
const WRITE_LIMIT: Duration = Duration::from_secs(30);

/// The acknowledged value of every key written so far.
type Acked = BTreeMap<String, String>;

// ---------------------------------------------------------------------------------------
// Client commands
// ---------------------------------------------------------------------------------------

/// Runs `client --json --viewleader VL --timeout-ms TIMEOUT ARGS...`.
fn via(env: &Env, vl: &ViewLeader, timeout_ms: &str, args: &[&str]) -> (i32, Value) {
    let vl = vl.addr.to_string();
    let mut all = vec!["--viewleader", vl.as_str(), "--timeout-ms", timeout_ms];
    all.extend_from_slice(args);
    client_json(env, &all)
}

/// `query_servers` with the generous timeout; `None` if it failed (polls just ask again).
fn try_view(env: &Env, vl: &ViewLeader) -> Option<Value> {
    let (code, json) = via(env, vl, LONG_MS, &["query_servers"]);
    (code == 0 && json["ok"] == true).then_some(json)
}

/// The keys committed in the bucket of the server at `addr` (`query_all_keys`).
fn keys_on(env: &Env, addr: SocketAddr) -> BTreeSet<String> {
    let addr = addr.to_string();
    let (code, json) = client_json(
        env,
        &["--server", &addr, "--timeout-ms", LONG_MS, "query_all_keys"],
    );
    assert_eq!(code, 0, "query_all_keys on {addr}: {json}");
    json["keys"]
        .as_array()
        .unwrap_or_else(|| panic!("no keys in {json}"))
        .iter()
        .map(|k| k.as_str().expect("a key is a string").to_owned())
        .collect()
}

/// The server addresses a `query_servers` answer lists.
fn addrs_in(view: &Value) -> BTreeSet<SocketAddr> {
    members_of(&view["servers"])
        .into_iter()
        .map(|m| m.addr)
        .collect()
}

/// The addresses of `servers`.
fn addrs_of(servers: &[Server]) -> BTreeSet<SocketAddr> {
    servers.iter().map(|s| s.addr).collect()
}

/// Runs `f` on every item, [`WIDTH`] at a time (one thread each, so the client processes
/// overlap), and returns the results in order.
fn parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let f = &f;
    let mut results = Vec::with_capacity(items.len());
    for chunk in items.chunks(WIDTH) {
        std::thread::scope(|scope| {
            let workers: Vec<_> = chunk
                .iter()
                .map(|item| scope.spawn(move || f(item)))
                .collect();
            results.extend(
                workers
                    .into_iter()
                    .map(|w| w.join().expect("worker thread")),
            );
        });
    }
    results
}

/// Writes every `(key, value)` with `setr --wait` (several keys at once), retrying a key
/// whose `setr` failed until it is acknowledged (with the same value, so an earlier attempt
/// whose outcome was unknown changes nothing), and records the acknowledged values.
fn write(env: &Env, vl: &ViewLeader, acked: &mut Acked, pairs: &[(String, String)]) {
    let outcomes = parallel(pairs, |(key, value)| {
        let deadline = Instant::now() + WRITE_LIMIT;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (code, json) = via(env, vl, LONG_MS, &["setr", key, value, "--wait"]);
            if code == 0 && json["ok"] == true {
                return attempts;
            }
            assert!(
                Instant::now() < deadline,
                "setr {key} never acknowledged in {WRITE_LIMIT:?} ({attempts} attempts); \
                 last: {json}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let retried = outcomes.iter().filter(|&&attempts| attempts > 1).count();
    if retried > 0 {
        eprintln!("  ({retried} of {} setr needed a retry)", pairs.len());
    }
    for (key, value) in pairs {
        acked.insert(key.clone(), value.clone());
    }
}

/// Writes [`KEYS`] keys named `PREFIX-i`, then writes every other one again with a second
/// value; returns the acknowledged values.
fn write_keys(env: &Env, vl: &ViewLeader, prefix: &str) -> Acked {
    let mut acked = Acked::new();
    let first: Vec<(String, String)> = (0..KEYS)
        .map(|i| (format!("{prefix}-{i}"), format!("{prefix}-{i} first")))
        .collect();
    write(env, vl, &mut acked, &first);
    let second: Vec<(String, String)> = (0..KEYS)
        .step_by(2)
        .map(|i| (format!("{prefix}-{i}"), format!("{prefix}-{i} second")))
        .collect();
    write(env, vl, &mut acked, &second);
    acked
}

// ---------------------------------------------------------------------------------------
// What every test checks after its fault
// ---------------------------------------------------------------------------------------

/// The epoch before a fault, held against every `query_servers` answer after it.
struct EpochFloor {
    /// The epoch of the settled view just before the fault.
    before: u64,
    /// When the fault began (answers are reported relative to it).
    since: Instant,
    /// The lowest and highest epochs answered since the fault began.
    seen: Option<(u64, u64)>,
}

impl EpochFloor {
    /// A floor at `before`, for answers from now on.
    fn new(before: u64) -> EpochFloor {
        EpochFloor {
            before,
            since: Instant::now(),
            seen: None,
        }
    }

    /// Asserts that `view` (a `query_servers` answer given after the fault began) reports
    /// an epoch no lower than the one before the fault: "Epochs never go backwards, across
    /// view-leader failovers and restarts".
    fn check(&mut self, view: &Value, what: &str) {
        let epoch = view["epoch"]
            .as_u64()
            .unwrap_or_else(|| panic!("{what}: no epoch in {view}"));
        assert!(
            epoch >= self.before,
            "{what}: query_servers answered epoch {epoch} {:?} after the fault began (or the \
             restart), below the epoch {} before it (epochs never go backwards); answer: {view}",
            self.since.elapsed(),
            self.before
        );
        self.seen = Some(match self.seen {
            None => (epoch, epoch),
            Some((low, high)) => (low.min(epoch), high.max(epoch)),
        });
    }
}

/// Waits (up to [`SETTLE_LIMIT`]) until the view lists exactly the addresses of `servers`
/// and is not rebalancing; every answer on the way is held against `floor`. Returns the view.
fn wait_settled(
    env: &Env,
    vl: &ViewLeader,
    servers: &[Server],
    floor: Option<&mut EpochFloor>,
    what: &str,
) -> Value {
    let want = addrs_of(servers);
    let mut floor = floor;
    let mut last = Value::Null;
    let settled = wait_until(SETTLE_LIMIT, || {
        let Some(view) = try_view(env, vl) else {
            return false;
        };
        if let Some(floor) = floor.as_deref_mut() {
            floor.check(&view, what);
        }
        last = view;
        addrs_in(&last) == want && last["rebalancing"] == false
    });
    assert!(
        settled,
        "{what}: the view never settled on {want:?} within {SETTLE_LIMIT:?}; last {last}"
    );
    last
}

/// Polls `getr --wait` of every acknowledged key ([`WIDTH`] clients at a time) until each has
/// read back its acknowledged value once, and returns how long after `since` the last one
/// did. Each round first asks `query_servers` and holds the answer against `floor`, so the
/// epoch is watched from the fault's end on. A key that answers any other value fails the
/// test at once: every acknowledged write reached every replica, so an older value is never
/// correct. Fails if some key is still unreadable [`RECOVERY_LIMIT`] after `since`.
fn wait_readable(
    env: &Env,
    vl: &ViewLeader,
    acked: &Acked,
    floor: &mut EpochFloor,
    since: Instant,
    what: &str,
) -> Duration {
    let deadline = since + RECOVERY_LIMIT;
    let mut pending: Vec<&String> = acked.keys().collect();
    let mut last_failure: BTreeMap<&String, Value> = BTreeMap::new();
    let mut readable_at = since;
    loop {
        if let Some(view) = try_view(env, vl) {
            floor.check(&view, what);
        }
        let answers = parallel(&pending, |key| {
            let answer = via(env, vl, POLL_MS, &["getr", key, "--wait"]);
            (answer, Instant::now())
        });
        let mut still = Vec::new();
        for (key, ((code, json), at)) in pending.into_iter().zip(answers) {
            if code == 0 && json["ok"] == true {
                assert_eq!(
                    json["value"].as_str(),
                    Some(acked[key].as_str()),
                    "{what}: getr {key} {:?} after the fault answered a value other than \
                     its last acknowledged one: {json}",
                    at - since
                );
                readable_at = readable_at.max(at);
            } else {
                last_failure.insert(key, json);
                still.push(key);
            }
        }
        pending = still;
        if pending.is_empty() {
            return readable_at - since;
        }
        if Instant::now() >= deadline {
            let sample: Vec<String> = pending
                .iter()
                .take(5)
                .map(|k| format!("{k}: {}", last_failure[k]))
                .collect();
            panic!(
                "{what}: {} of {} acknowledged keys still unreadable {RECOVERY_LIMIT:?} after \
                 the fault ended (acknowledged setr lost?); e.g. {sample:#?}",
                pending.len(),
                acked.len()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the view lists exactly `servers` and is rebalanced, then asserts the
/// contract's exact placement: every server's bucket holds exactly the acknowledged keys
/// whose replicas (recomputed from the view with the library's allocator) include it, and
/// `locate` of one key agrees with the allocator. A view that changed while the buckets were
/// being read is waited out again (within [`SETTLE_LIMIT`]). Returns the view.
fn assert_placement_exact(
    env: &Env,
    vl: &ViewLeader,
    servers: &[Server],
    acked: &Acked,
    floor: &mut EpochFloor,
    what: &str,
) -> Value {
    let deadline = Instant::now() + SETTLE_LIMIT;
    loop {
        let json = wait_settled(env, vl, servers, Some(&mut *floor), what);
        let view = view_of(&json);
        let buckets = parallel(&view.members, |m| keys_on(env, m.addr));
        let again = try_view(env, vl);
        if let Some(again) = &again {
            floor.check(again, what);
        }
        let unchanged = again
            .as_ref()
            .is_some_and(|a| a["epoch"] == json["epoch"] && a["rebalancing"] == false);
        if !unchanged {
            assert!(
                Instant::now() < deadline,
                "{what}: the view kept changing while buckets were read; last {again:?}"
            );
            continue;
        }
        for (member, bucket) in view.members.iter().zip(&buckets) {
            let want: BTreeSet<String> = acked
                .keys()
                .filter(|k| {
                    trireme::placement::ring::replicas(&view, k)
                        .iter()
                        .any(|r| r.id == member.id)
                })
                .cloned()
                .collect();
            let missing: Vec<&String> = want.difference(bucket).collect();
            let extra: Vec<&String> = bucket.difference(&want).collect();
            assert!(
                missing.is_empty() && extra.is_empty(),
                "{what}: bucket of {} (epoch {}, rebalanced): missing {missing:?}, left \
                 behind {extra:?}",
                member.addr,
                view.epoch.0
            );
        }
        if let Some(key) = acked.keys().next() {
            let (code, located) = via(env, vl, LONG_MS, &["locate", key]);
            assert_eq!(code, 0, "{what}: locate {key}: {located}");
            if located["epoch"] == json["epoch"] {
                assert_eq!(
                    members_of(&located["replicas"]),
                    trireme::placement::ring::replicas(&view, key),
                    "{what}: locate {key} disagrees with the allocator: {located}"
                );
            }
        }
        return json;
    }
}

/// Reads every acknowledged key once more through `getr --wait` and asserts its value.
fn assert_all_read(env: &Env, vl: &ViewLeader, acked: &Acked, what: &str) {
    let pairs: Vec<(&String, &String)> = acked.iter().collect();
    let answers = parallel(&pairs, |(key, _)| {
        via(env, vl, LONG_MS, &["getr", key, "--wait"])
    });
    for ((key, value), (code, json)) in pairs.into_iter().zip(answers) {
        assert!(
            code == 0 && json["value"].as_str() == Some(value.as_str()),
            "{what}: getr {key} should read {value:?}: exit {code}, {json}"
        );
    }
}

/// How many candidate keys each server reports reconciled (summed over its log lines
/// "... N candidate keys reconciled ..."); printed, never asserted.
fn candidates_reconciled(servers: &[Server]) -> Vec<usize> {
    servers
        .iter()
        .map(|s| {
            s.proc
                .stderr()
                .lines()
                .filter_map(|line| {
                    let (before, _) = line.split_once(" candidate keys reconciled")?;
                    before.rsplit(' ').next()?.parse::<usize>().ok()
                })
                .sum()
        })
        .collect()
}

/// Everything a test checks once its fault has ended at `ended`: every acknowledged key reads
/// back (the time it took is printed), the view settles on exactly `servers` with exact
/// placement, no epoch answered is below `floor`, and two new keys are written and read
/// back, after which placement is exact again. Returns the final view.
fn recover_and_check(
    env: &Env,
    vl: &ViewLeader,
    servers: &[Server],
    acked: &mut Acked,
    before: &mut Before,
    ended: Instant,
    what: &str,
) -> Value {
    let Before { floor, baseline } = before;
    let readable = wait_readable(env, vl, acked, floor, ended, what);
    assert_placement_exact(env, vl, servers, acked, floor, what);
    let settled_after = ended.elapsed();
    assert_all_read(env, vl, acked, what);

    let fresh: Vec<(String, String)> = (0..2)
        .map(|i| (format!("after-{i}"), format!("written after recovery {i}")))
        .collect();
    write(env, vl, acked, &fresh);
    assert_all_read(env, vl, acked, &format!("{what}, after new writes"));
    let last = assert_placement_exact(
        env,
        vl,
        servers,
        acked,
        floor,
        &format!("{what}, after new writes"),
    );

    eprintln!(
        "{what}: every acknowledged key readable {readable:?} after the fault's end (one \
         round of reads took {baseline:?} before the fault); \
         rebalanced with exact placement after {settled_after:?}; epoch {} before, {:?} \
         (lowest, highest) answered since, {} at the end; candidate keys reconciled per \
         server: {:?}",
        floor.before,
        floor.seen,
        last["epoch"],
        candidates_reconciled(servers)
    );
    last
}

/// A label for the test's messages: its name and its network.
fn label(name: &str, env: &Env) -> String {
    format!("{name} [{}]", env.faults.as_deref().unwrap_or("clean"))
}

/// Starts a view leader (the suite's `--dead-after-ms`) and three servers (the suite's
/// heartbeat interval), and waits until the view holds them and is rebalanced.
fn cluster(env: &Env, what: &str) -> (ViewLeader, Vec<Server>) {
    let vl = viewleader(env);
    let servers: Vec<Server> = (0..3).map(|_| server(env, &vl)).collect();
    wait_settled(env, &vl, &servers, None, what);
    (vl, servers)
}

/// What was measured just before a fault, held against what follows it.
struct Before {
    /// The floor for every epoch answered from the fault on.
    floor: EpochFloor,
    /// How long one round of reading every key back took on the healthy cluster.
    baseline: Duration,
}

/// Just before a fault: waits until the view of `servers` is settled, reads every
/// acknowledged key back once (the same polling as after the fault, so its duration is the
/// baseline that the recovery time is to be compared with: one round of reads, not the
/// fault's cost), and returns the floor for every epoch answered from now on and that
/// baseline.
fn before_fault(
    env: &Env,
    vl: &ViewLeader,
    servers: &[Server],
    acked: &Acked,
    what: &str,
) -> Before {
    let epoch = wait_settled(env, vl, servers, None, what)["epoch"]
        .as_u64()
        .expect("epoch");
    let mut floor = EpochFloor::new(epoch);
    let baseline = wait_readable(
        env,
        vl,
        acked,
        &mut floor,
        Instant::now(),
        &format!("{what}, before the fault"),
    );
    Before {
        floor: EpochFloor::new(epoch),
        baseline,
    }
}

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

/// Contract: "No acknowledged `setr` is ever lost ... whatever the view leader declared: a
/// paused ... view leader ... loses nothing. Epochs never go backwards". The view leader is
/// frozen (SIGSTOP) for 3 × `--dead-after-ms` while its three servers keep running; when it
/// resumes, it must not wipe the cluster: every acknowledged key reads back with its last
/// value, the rebalanced buckets are exact, no epoch answered is below the one before the
/// pause, and new writes succeed.
fn keys_survive_a_view_leader_paused_past_dead_after(env: &Env) {
    let what = label("view leader paused", env);
    let (vl, servers) = cluster(env, &what);
    let mut acked = write_keys(env, &vl, "paused-vl");
    let ids: BTreeSet<String> = servers.iter().map(|s| s.id.clone()).collect();

    let mut before = before_fault(env, &vl, &servers, &acked, &what);
    vl.proc.signal(libc::SIGSTOP);
    std::thread::sleep(PAUSE);
    vl.proc.signal(libc::SIGCONT);
    let resumed = Instant::now();

    let view = recover_and_check(env, &vl, &servers, &mut acked, &mut before, resumed, &what);
    let kept = server_ids(&view).into_iter().collect::<BTreeSet<_>>() == ids;
    eprintln!("{what}: servers kept their ids through the pause: {kept}");
}
cluster_test!(keys_survive_a_view_leader_paused_past_dead_after);

/// Contract: "... or a whole cluster paused at once, loses nothing", and "A server declared
/// dead ... rejoins under a fresh id ... It keeps what its bucket held ... until rebalancing
/// has reconciled it". All three servers are frozen (SIGSTOP) for 3 × `--dead-after-ms`; the
/// running view leader rightly declares every one dead (the view empties). Resumed, they
/// rejoin under fresh ids and the keys must come back from what they kept: every
/// acknowledged key reads back with its last value, buckets are exact, no epoch answered is
/// below the one before the pause, and new writes succeed.
fn keys_survive_every_server_paused_at_once(env: &Env) {
    let what = label("every server paused", env);
    let (vl, servers) = cluster(env, &what);
    let mut acked = write_keys(env, &vl, "paused-all");
    let old_ids: BTreeSet<String> = servers.iter().map(|s| s.id.clone()).collect();

    let mut before = before_fault(env, &vl, &servers, &acked, &what);
    let paused = Instant::now();
    for s in &servers {
        s.proc.signal(libc::SIGSTOP);
    }
    // The servers stay frozen until the view is seen empty (normally after one
    // `--dead-after-ms`), and in any case for the whole pause.
    let mut last = Value::Null;
    let emptied = wait_until(PAUSE + Duration::from_secs(5), || {
        if let Some(view) = try_view(env, &vl) {
            before.floor.check(&view, &what);
            last = view;
        }
        server_ids(&last).is_empty() && !last.is_null()
    });
    let declared_after = paused.elapsed();
    if let Some(rest) = PAUSE.checked_sub(paused.elapsed()) {
        std::thread::sleep(rest);
    }
    for s in &servers {
        s.proc.signal(libc::SIGCONT);
    }
    let resumed = Instant::now();
    assert!(
        emptied,
        "{what}: servers silent for {declared_after:?} were never all declared dead; last {last}"
    );
    eprintln!("{what}: every server declared dead {declared_after:?} into the pause");

    let view = recover_and_check(env, &vl, &servers, &mut acked, &mut before, resumed, &what);
    let reused: Vec<String> = server_ids(&view)
        .into_iter()
        .filter(|id| old_ids.contains(id))
        .collect();
    assert!(
        reused.is_empty(),
        "{what}: servers declared dead must rejoin under fresh ids; still listed: {reused:?}"
    );
}
cluster_test!(keys_survive_every_server_paused_at_once);

/// Contract: "No acknowledged `setr` is ever lost ... a crashed or restarted view leader ...
/// loses nothing. Epochs never go backwards, across view-leader failovers and restarts."
/// Several view changes (a fourth server joins and leaves, twice) take the epoch well above
/// 1 while keys are written; the view leader is then killed (SIGKILL) and a new one started
/// on the same address, with no state. From the restart on, every `query_servers` answer it
/// gives reports an epoch no lower than before (it is asked at once, before it may have heard
/// any server); the servers rejoin it, every acknowledged key reads back with its last
/// value, buckets are exact, and new writes succeed.
fn epochs_never_go_back_when_the_view_leader_restarts(env: &Env) {
    let what = label("view leader restarted", env);
    let (vl, mut servers) = cluster(env, &what);
    let mut acked = Acked::new();
    let early: Vec<(String, String)> = (0..KEYS / 2)
        .map(|i| (format!("restart-{i}"), format!("restart-{i} first")))
        .collect();
    write(env, &vl, &mut acked, &early);
    for _ in 0..2 {
        servers.push(server(env, &vl));
        wait_settled(env, &vl, &servers, None, &what);
        drop(servers.pop());
        wait_settled(env, &vl, &servers, None, &what);
    }
    let late: Vec<(String, String)> = (0..KEYS)
        .map(|i| (format!("restart-{i}"), format!("restart-{i} second")))
        .collect();
    write(env, &vl, &mut acked, &late);
    let mut before = before_fault(env, &vl, &servers, &acked, &what);
    let epoch = before.floor.before;
    assert!(
        epoch >= 7,
        "{what}: three joins and two join-and-leave rounds make epoch {epoch}, expected >= 7"
    );

    let addr = vl.addr;
    drop(vl);
    before.floor.since = Instant::now();
    let dead_after = DEAD_AFTER_MS.to_string();
    let vl = viewleader_bound(
        env,
        &addr.to_string(),
        &["--dead-after-ms", dead_after.as_str()],
    );
    let restarted = Instant::now();
    assert_eq!(
        vl.addr, addr,
        "{what}: the new view leader took the old address"
    );

    recover_and_check(
        env,
        &vl,
        &servers,
        &mut acked,
        &mut before,
        restarted,
        &what,
    );
}
cluster_test!(epochs_never_go_back_when_the_view_leader_restarts);
