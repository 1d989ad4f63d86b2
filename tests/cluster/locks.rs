//! The lock service (contract, "Semantics the tests rely on", `lock_get`/`lock_release`):
//! grants, FIFO waiting, `not_holder`, withdrawal on give-up, release of a departed server's
//! locks, and deadlock refusal, each through the real `client` against a real view leader.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cluster_test;
use crate::util::*;

/// `--timeout-ms` for commands expected to succeed: generous, since the faulty variant loses
/// a fifth of all datagrams.
const LONG_MS: u64 = 10_000;

/// `--timeout-ms` of a `lock_get` that only probes whether a lock is still held.
const PROBE_MS: u64 = 1_000;

/// How long a background `lock_get` must keep running before the test counts on the view
/// leader having queued it: four renewal periods, so even under loss its request has arrived.
const QUEUED_AFTER: Duration = Duration::from_millis(1_000);

/// How long a background `lock_get` that should succeed may take to finish.
const FINISH_LIMIT: Duration = Duration::from_secs(15);

/// Runs `client --json --viewleader VL --timeout-ms MS COMMAND LOCK REQUESTER`.
fn lock_command(
    env: &Env,
    vl: &ViewLeader,
    command: &str,
    lock: &str,
    requester: &str,
    timeout_ms: u64,
) -> (i32, Value) {
    let vl = vl.addr.to_string();
    let timeout = timeout_ms.to_string();
    client_json(
        env,
        &[
            "--viewleader",
            &vl,
            "--timeout-ms",
            &timeout,
            command,
            lock,
            requester,
        ],
    )
}

/// `lock_get LOCK REQUESTER` with the generous timeout.
fn lock_get(env: &Env, vl: &ViewLeader, lock: &str, requester: &str) -> (i32, Value) {
    lock_command(env, vl, "lock_get", lock, requester, LONG_MS)
}

/// `lock_release LOCK REQUESTER` with the generous timeout.
fn lock_release(env: &Env, vl: &ViewLeader, lock: &str, requester: &str) -> (i32, Value) {
    lock_command(env, vl, "lock_release", lock, requester, LONG_MS)
}

/// Starts `lock_get LOCK REQUESTER --json` in the background with `timeout_ms`.
fn lock_get_in_background(
    env: &Env,
    vl: &ViewLeader,
    lock: &str,
    requester: &str,
    timeout_ms: u64,
) -> Background {
    let vl = vl.addr.to_string();
    let timeout = timeout_ms.to_string();
    let args = [
        "--json",
        "--viewleader",
        &vl,
        "--timeout-ms",
        &timeout,
        "lock_get",
        lock,
        requester,
    ];
    client_background(env, &args)
}

/// Asserts a successful `lock_get`/`lock_release` of `lock` by `requester`: exit 0 and
/// `{"ok":true,"lock":LOCK,"requester":REQUESTER}`.
fn assert_success(result: &(i32, Value), lock: &str, requester: &str) {
    let (code, json) = result;
    assert_eq!(
        *code, 0,
        "expected success for {lock} by {requester}, got {json}"
    );
    assert_eq!(json["ok"], json!(true), "{json}");
    assert_eq!(json["lock"], json!(lock), "{json}");
    assert_eq!(json["requester"], json!(requester), "{json}");
}

/// Asserts a failure of kind `kind`: exit 1 and `{"ok":false,"kind":KIND,...}`.
fn assert_failure(result: &(i32, Value), kind: &str) {
    let (code, json) = result;
    assert_eq!(*code, 1, "expected a {kind} failure, got {json}");
    assert_eq!(json["ok"], json!(false), "{json}");
    assert_eq!(json["kind"], json!(kind), "{json}");
}

/// Asserts that the background `lock_get` of `who` is still waiting after [`QUEUED_AFTER`]
/// (it has renewed its request several times, so the view leader has queued it).
fn assert_still_waiting(mut waiter: Background, who: &str) -> Background {
    if wait_until(QUEUED_AFTER, || !waiter.is_running()) {
        let run = waiter.finish(Duration::from_secs(1));
        panic!("{who}'s lock_get should still be waiting, but it ended: {run:?}");
    }
    waiter
}

/// Waits for the background `lock_get` of `lock` by `requester` and asserts it was granted.
fn assert_granted_in_background(waiter: Background, lock: &str, requester: &str) {
    let run = waiter.finish(FINISH_LIMIT);
    assert_eq!(
        run.code, 0,
        "{requester}'s lock_get of {lock} failed: {run:?}"
    );
    assert_success(&(run.code, run.json()), lock, requester);
}

/// `lock_get` of a lock that must be free: granted, and on a clean network at once (well
/// under the 1 s a leftover unconfirmed grant would block it for).
fn assert_granted_at_once(env: &Env, vl: &ViewLeader, lock: &str, requester: &str) {
    let started = Instant::now();
    assert_success(&lock_get(env, vl, lock, requester), lock, requester);
    if env.faults.is_none() {
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(700),
            "{requester} waited {took:?} for free {lock}"
        );
    }
}

/// Contract: `lock_get` while the lock is free or already held by the same REQUESTER is
/// granted at once.
fn a_free_lock_is_granted_and_regranted_to_its_holder(env: &Env) {
    let vl = viewleader(env);
    assert_granted_at_once(env, &vl, "L", "alice");
    assert_granted_at_once(env, &vl, "L", "alice");
    // It really is held: someone else only waits, until its timeout.
    assert_failure(
        &lock_command(env, &vl, "lock_get", "L", "bob", PROBE_MS),
        "timeout",
    );
    assert_success(&lock_release(env, &vl, "L", "alice"), "L", "alice");
    assert_granted_at_once(env, &vl, "L", "bob");
}

cluster_test!(a_free_lock_is_granted_and_regranted_to_its_holder);

/// Contract (CHANGELOG, issue 16): `lock_get --json` prints the claim its grant was made
/// under; `lock_release --claim N` releases only that grant (`not_holder` for an earlier
/// claim, after the requester asked again), and without `--claim` whatever it holds.
fn lock_release_with_a_claim_releases_only_that_grant(env: &Env) {
    let vl = viewleader(env);
    let first = lock_get(env, &vl, "L", "alice");
    assert_success(&first, "L", "alice");
    let old_claim = first.1["claim"]
        .as_u64()
        .expect("lock_get prints its claim");
    let again = lock_get(env, &vl, "L", "alice");
    assert_success(&again, "L", "alice");
    let claim = again.1["claim"]
        .as_u64()
        .expect("lock_get prints its claim");
    assert_ne!(claim, old_claim, "each lock_get picks its own claim");
    let release = |claim: u64| {
        let vl = vl.addr.to_string();
        let claim = claim.to_string();
        client_json(
            env,
            &[
                "--viewleader",
                &vl,
                "lock_release",
                "L",
                "alice",
                "--claim",
                &claim,
            ],
        )
    };
    assert_failure(&release(old_claim), "not_holder");
    assert_success(&release(claim), "L", "alice");
    assert_failure(&release(claim), "not_holder");
    // Without a claim: whatever the requester holds.
    assert_success(&lock_get(env, &vl, "L", "alice"), "L", "alice");
    assert_success(&lock_release(env, &vl, "L", "alice"), "L", "alice");
    assert_granted_at_once(env, &vl, "L", "bob");
}

cluster_test!(lock_release_with_a_claim_releases_only_that_grant);

/// Contract: a `lock_get` of a lock held by another requester waits until it is granted.
fn a_held_lock_makes_others_wait_until_released(env: &Env) {
    let vl = viewleader(env);
    assert_success(&lock_get(env, &vl, "L", "alice"), "L", "alice");
    let bob = lock_get_in_background(env, &vl, "L", "bob", LONG_MS);
    let bob = assert_still_waiting(bob, "bob");
    assert_success(&lock_release(env, &vl, "L", "alice"), "L", "alice");
    assert_granted_in_background(bob, "L", "bob");
    assert_success(&lock_release(env, &vl, "L", "bob"), "L", "bob");
}

cluster_test!(a_held_lock_makes_others_wait_until_released);

/// Contract: waiting `lock_get`s are granted in FIFO order.
fn waiters_are_granted_in_fifo_order(env: &Env) {
    let vl = viewleader(env);
    assert_success(&lock_get(env, &vl, "L", "alice"), "L", "alice");
    let bob = lock_get_in_background(env, &vl, "L", "bob", LONG_MS);
    let bob = assert_still_waiting(bob, "bob");
    let carol = lock_get_in_background(env, &vl, "L", "carol", LONG_MS);
    let mut carol = assert_still_waiting(carol, "carol");
    assert_success(&lock_release(env, &vl, "L", "alice"), "L", "alice");
    assert_granted_in_background(bob, "L", "bob");
    assert!(
        carol.is_running(),
        "carol's lock_get ended although bob holds L"
    );
    assert_failure(&lock_release(env, &vl, "L", "carol"), "not_holder");
    assert_success(&lock_release(env, &vl, "L", "bob"), "L", "bob");
    assert_granted_in_background(carol, "L", "carol");
}

cluster_test!(waiters_are_granted_in_fifo_order);

/// Contract: `lock_release` gives `not_holder` if REQUESTER does not hold LOCK (also when it
/// is only waiting).
fn release_by_a_non_holder_or_a_waiter_is_not_holder(env: &Env) {
    let vl = viewleader(env);
    // A free lock has no holder.
    assert_failure(&lock_release(env, &vl, "L", "alice"), "not_holder");
    assert_success(&lock_get(env, &vl, "L", "alice"), "L", "alice");
    // Held by someone else.
    assert_failure(&lock_release(env, &vl, "L", "bob"), "not_holder");
    // Only waiting.
    let bob = lock_get_in_background(env, &vl, "L", "bob", LONG_MS);
    let mut bob = assert_still_waiting(bob, "bob");
    assert_failure(&lock_release(env, &vl, "L", "bob"), "not_holder");
    assert!(
        bob.is_running(),
        "bob's lock_get ended after its failed release"
    );
    // The refused releases changed nothing: alice still holds L and bob is next.
    assert_success(&lock_release(env, &vl, "L", "alice"), "L", "alice");
    assert_granted_in_background(bob, "L", "bob");
    // A holder's second release finds nothing to release.
    assert_success(&lock_release(env, &vl, "L", "bob"), "L", "bob");
    assert_failure(&lock_release(env, &vl, "L", "bob"), "not_holder");
}

cluster_test!(release_by_a_non_holder_or_a_waiter_is_not_holder);

/// Asserts that bob, who gave up waiting for L (held by alice), left no request behind: once
/// alice releases, bob is not the (unconfirmed) holder and dave is granted L at once.
fn assert_bob_withdrew(env: &Env, vl: &ViewLeader) {
    assert_success(&lock_release(env, vl, "L", "alice"), "L", "alice");
    // Had bob's request stayed queued, L would now be granted to bob (unconfirmed, for 1 s)
    // and this release would succeed.
    assert_failure(&lock_release(env, vl, "L", "bob"), "not_holder");
    assert_granted_at_once(env, vl, "L", "dave");
}

/// Contract: a `lock_get` that gives up at `--timeout-ms` fails with `timeout` and withdraws
/// its request.
fn a_timed_out_lock_get_withdraws_its_request(env: &Env) {
    let vl = viewleader(env);
    assert_success(&lock_get(env, &vl, "L", "alice"), "L", "alice");
    let started = Instant::now();
    assert_failure(
        &lock_command(env, &vl, "lock_get", "L", "bob", 1_500),
        "timeout",
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1_000),
        "bob gave up after only {took:?}"
    );
    assert_bob_withdrew(env, &vl);
}

cluster_test!(a_timed_out_lock_get_withdraws_its_request);

/// Contract: a `lock_get` interrupted by Ctrl-C fails (exit 1) and withdraws its request.
fn an_interrupted_lock_get_withdraws_its_request(env: &Env) {
    let vl = viewleader(env);
    assert_success(&lock_get(env, &vl, "L", "alice"), "L", "alice");
    let bob = lock_get_in_background(env, &vl, "L", "bob", LONG_MS);
    let bob = assert_still_waiting(bob, "bob");
    bob.interrupt();
    let run = bob.finish(FINISH_LIMIT);
    assert_eq!(run.code, 1, "interrupted lock_get: {run:?}");
    assert_eq!(run.json()["ok"], json!(false), "{run:?}");
    assert_bob_withdrew(env, &vl);
}

cluster_test!(an_interrupted_lock_get_withdraws_its_request);

/// Polls (up to 10 s) until `requester` is granted `lock`, each try bounded by
/// [`PROBE_MS`]; panics with the last answer if it never is.
fn wait_until_granted(env: &Env, vl: &ViewLeader, lock: &str, requester: &str) {
    let mut last = Value::Null;
    let granted = wait_until(Duration::from_secs(10), || {
        let (code, json) = lock_command(env, vl, "lock_get", lock, requester, PROBE_MS);
        last = json;
        code == 0
    });
    assert!(
        granted,
        "{lock} was never granted to {requester}; last answer {last}"
    );
    assert_success(&(0, last), lock, requester);
}

/// Contract: a requester equal to a server's id or its ADDR is tied to that server: its locks
/// are released when the server leaves the view.
fn a_departed_servers_locks_are_released(env: &Env) {
    let vl = viewleader(env);
    let server = server(env, &vl);
    wait_for_servers(env, &vl, 1);
    let (id, addr) = (server.id.clone(), server.addr.to_string());
    assert_success(&lock_get(env, &vl, "L", &id), "L", &id);
    assert_success(&lock_get(env, &vl, "M", &addr), "M", &addr);
    // Held while the server lives.
    for lock in ["L", "M"] {
        assert_failure(
            &lock_command(env, &vl, "lock_get", lock, "carol", PROBE_MS),
            "timeout",
        );
    }
    drop(server);
    wait_until_granted(env, &vl, "L", "carol");
    wait_until_granted(env, &vl, "M", "carol");
    wait_for_servers(env, &vl, 0);
}

cluster_test!(a_departed_servers_locks_are_released);

/// Contract: a `lock_get` whose wait would close a cycle in the wait-for graph fails at once
/// with `deadlock`, naming the cycle; locks already held stay held.
fn a_wait_that_would_close_a_cycle_fails_with_deadlock(env: &Env) {
    let vl = viewleader(env);
    assert_success(&lock_get(env, &vl, "A", "a"), "A", "a");
    assert_success(&lock_get(env, &vl, "B", "b"), "B", "b");
    let b_waits = lock_get_in_background(env, &vl, "A", "b", LONG_MS);
    let b_waits = assert_still_waiting(b_waits, "b");
    let started = Instant::now();
    let refused = lock_get(env, &vl, "B", "a");
    assert_failure(&refused, "deadlock");
    assert_eq!(
        refused.1["cycle"],
        json!(["a", "B", "b", "A"]),
        "{}",
        refused.1
    );
    if env.faults.is_none() {
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(700),
            "deadlock reported after {took:?}"
        );
    }
    // a still holds A: its release hands A to the waiting b.
    assert_success(&lock_release(env, &vl, "A", "a"), "A", "a");
    assert_granted_in_background(b_waits, "A", "b");
    // b still holds B, and the refused request of a was not queued: once b releases B,
    // a is not its (unconfirmed) holder.
    assert_success(&lock_release(env, &vl, "B", "b"), "B", "b");
    assert_failure(&lock_release(env, &vl, "B", "a"), "not_holder");
}

cluster_test!(a_wait_that_would_close_a_cycle_fails_with_deadlock);
