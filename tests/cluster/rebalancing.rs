//! Rebalancing (assignment 3.2 and 3.4; contract "rebalancing" and "after rebalancing for a
//! view has finished, every server's bucket holds exactly the keys whose replica sets include
//! it"). The view leader and servers are the real binaries; bulk writes and checks go through
//! the library's `Client` in this process (the code the `client` binary runs), with the same
//! fault injection as the processes.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use trireme::client::{Client, SetrHooks};
use trireme::faults::FaultSpec;
use trireme::placement::view::View;
use trireme::runtime::net::{self, Handle, NetConfig};

use crate::cluster_test;
use crate::util::*;

/// A driver in the test process, injecting the same faults as the cluster's processes.
fn driver(env: &Env) -> Handle {
    let faults: FaultSpec = env
        .faults
        .as_deref()
        .unwrap_or("")
        .parse()
        .expect("fault spec");
    let socket = net::bind("127.0.0.1:0".parse().unwrap()).expect("bind");
    let (handle, _requests, _thread) = net::spawn(
        socket,
        NetConfig {
            faults,
            ..NetConfig::default()
        },
    )
    .expect("driver");
    handle
}

/// A client for one operation, bounded by 10 s; `wait` waits out rebalancing.
fn client(handle: &Handle, vl: &ViewLeader, server: SocketAddr) -> Client {
    Client::new(
        handle.clone(),
        Some(vl.addr),
        Vec::new(),
        server,
        Some(Duration::from_secs(10)),
    )
    .with_wait(true)
}

/// Waits (up to 30 s) until the view holds exactly `servers` and is not rebalancing;
/// returns it.
fn wait_rebalanced(handle: &Handle, vl: &ViewLeader, servers: &[Server]) -> View {
    let mut want: Vec<String> = servers.iter().map(|s| s.id.clone()).collect();
    want.sort();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = client(handle, vl, vl.addr).query_servers();
        if let Ok(info) = &answer {
            let have: Vec<String> = info.view.members.iter().map(|m| m.id.to_string()).collect();
            if have == want && !info.rebalancing {
                return info.view.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "never settled with {want:?}: {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts a view leader, `n` servers and a driver in this process; returns once the view
/// holds all `n` servers and is rebalanced.
fn start(env: &Env, n: usize) -> (ViewLeader, Vec<Server>, Handle) {
    let vl = viewleader(env);
    let servers: Vec<Server> = (0..n).map(|_| server(env, &vl)).collect();
    let handle = driver(env);
    wait_rebalanced(&handle, &vl, &servers);
    (vl, servers, handle)
}

/// Writes `keys` with `setr` (retrying only while a view change is still settling).
fn write_all(handle: &Handle, vl: &ViewLeader, keys: &[String], value: impl Fn(&str) -> String) {
    for key in keys {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match client(handle, vl, vl.addr).setr(key, &value(key), SetrHooks::default()) {
                Ok(_) => break,
                Err(e) => assert!(Instant::now() < deadline, "setr {key}: {e:?}"),
            }
        }
    }
}

/// Asserts that every bucket holds exactly the keys the allocator assigns to it in `view`,
/// and that every key reads back with `expected(key)` through `getr`.
fn assert_exact(
    handle: &Handle,
    vl: &ViewLeader,
    view: &View,
    keys: &[String],
    expected: impl Fn(&str) -> String,
    step: &str,
) {
    let ring = trireme::placement::ring::Ring::new(view);
    for member in &view.members {
        let want: BTreeSet<String> = keys
            .iter()
            .filter(|k| {
                ring.replicas(k, view.replicas as usize)
                    .iter()
                    .any(|m| m.id == member.id)
            })
            .cloned()
            .collect();
        let got: BTreeSet<String> = client(handle, vl, member.addr)
            .query_all_keys()
            .unwrap_or_else(|e| panic!("{step}: query_all_keys on {}: {e:?}", member.addr))
            .into_iter()
            .collect();
        let missing: Vec<&String> = want.difference(&got).take(5).collect();
        let extra: Vec<&String> = got.difference(&want).take(5).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{step}: bucket of {} (epoch {}): missing {missing:?}, left behind {extra:?}",
            member.addr,
            view.epoch
        );
    }
    // Every key is where it belongs (checked above); read a sample back through getr at
    // each step (all of them at the end of a test, with `read_all`).
    for key in keys.iter().step_by(keys.len().div_ceil(25).max(1)) {
        read(handle, vl, key, &expected(key), step);
    }
}

/// Reads `key` through `getr` and checks its value.
fn read(handle: &Handle, vl: &ViewLeader, key: &str, expected: &str, step: &str) {
    let got = client(handle, vl, vl.addr)
        .getr(key)
        .unwrap_or_else(|e| panic!("{step}: getr {key}: {e:?}"));
    assert_eq!(got.value, expected, "{step}: {key}");
}

/// Reads every key back through `getr`.
fn read_all(handle: &Handle, vl: &ViewLeader, keys: &[String], step: &str) {
    for key in keys {
        read(handle, vl, key, &value_of(key), step);
    }
}

/// The keys of a test.
fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("key{i}")).collect()
}

/// A key's value in these tests.
fn value_of(key: &str) -> String {
    format!("value of {key}")
}

/// Assignment 3.2: "kill off the servers, one by one ... In the end, we can have one server
/// that stores all the keys ... then gradually add more servers and the keys will be
/// automatically rebalanced". Every step: every key readable, every bucket exact.
fn shrinking_to_one_server_and_growing_back_keeps_every_key(env: &Env) {
    let (vl, mut servers, handle) = start(env, 5);
    let keys = keys(200);
    write_all(&handle, &vl, &keys, value_of);
    let view = wait_rebalanced(&handle, &vl, &servers);
    assert_exact(&handle, &vl, &view, &keys, value_of, "5 servers");
    while servers.len() > 1 {
        drop(servers.remove(0));
        let view = wait_rebalanced(&handle, &vl, &servers);
        assert_exact(
            &handle,
            &vl,
            &view,
            &keys,
            value_of,
            &format!("shrunk to {}", servers.len()),
        );
    }
    let last = client(&handle, &vl, servers[0].addr)
        .query_all_keys()
        .unwrap();
    assert_eq!(last.len(), keys.len(), "the last server holds every key");
    while servers.len() < 5 {
        servers.push(server(env, &vl));
        let view = wait_rebalanced(&handle, &vl, &servers);
        assert_exact(
            &handle,
            &vl,
            &view,
            &keys,
            value_of,
            &format!("grown to {}", servers.len()),
        );
    }
    read_all(&handle, &vl, &keys, "back at 5 servers");
}
cluster_test!(
    shrinking_to_one_server_and_growing_back_keeps_every_key,
    crate::REBALANCE_FAULTS
);

/// Waits for the servers' view to finish rebalancing, then checks every bucket holds exactly
/// its keys (`value_of` values) and every key reads back; `what` names the step.
fn settle_and_check(
    handle: &Handle,
    vl: &ViewLeader,
    servers: &[Server],
    keys: &[String],
    what: &str,
) {
    let view = wait_rebalanced(handle, vl, servers);
    assert_exact(handle, vl, &view, keys, value_of, what);
    read_all(handle, vl, keys, what);
}

/// Assignment 3.2: as long as fewer than `replicas` holders of a key fail, it survives: two
/// of five servers killed at once lose nothing.
fn two_servers_killed_at_once_lose_no_key(env: &Env) {
    let (vl, mut servers, handle) = start(env, 5);
    let keys = keys(200);
    write_all(&handle, &vl, &keys, value_of);
    drop(servers.remove(0));
    drop(servers.remove(0));
    settle_and_check(&handle, &vl, &servers, &keys, "two killed at once");
}
cluster_test!(
    two_servers_killed_at_once_lose_no_key,
    crate::REBALANCE_FAULTS
);

/// Issue 4: overlapping view changes: a server joins while another is dying; the servers
/// plan again against the newest view and nothing is lost or left behind.
fn a_server_joining_while_another_dies_loses_nothing(env: &Env) {
    let (vl, mut servers, handle) = start(env, 4);
    let keys = keys(200);
    write_all(&handle, &vl, &keys, value_of);
    drop(servers.remove(0));
    servers.push(server(env, &vl));
    settle_and_check(&handle, &vl, &servers, &keys, "join while dying");
}
cluster_test!(
    a_server_joining_while_another_dies_loses_nothing,
    crate::REBALANCE_FAULTS
);

/// Contract: a raw `set` is subject to rebalancing like any other key: after the next view
/// change it is on exactly its replicas (and gone from a server that is not one).
fn a_raw_set_key_moves_to_its_replicas(env: &Env) {
    let (vl, mut servers, handle) = start(env, 3);
    // With 3 servers every server is a replica; a fourth server joins, and a raw key set on
    // the newcomer that is not its replica must move.
    servers.push(server(env, &vl));
    let view4 = wait_rebalanced(&handle, &vl, &servers);
    let newcomer = servers[3].addr;
    let ring = trireme::placement::ring::Ring::new(&view4);
    let key = (0..)
        .map(|i| format!("raw{i}"))
        .find(|k| !ring.replicas(k, 3).iter().any(|m| m.addr == newcomer))
        .unwrap();
    client(&handle, &vl, newcomer)
        .set(&key, "raw value")
        .unwrap();
    drop(servers.remove(0));
    let view3 = wait_rebalanced(&handle, &vl, &servers);
    assert_exact(
        &handle,
        &vl,
        &view3,
        std::slice::from_ref(&key),
        |_| "raw value".into(),
        "raw set moved",
    );
}
cluster_test!(a_raw_set_key_moves_to_its_replicas, crate::REBALANCE_FAULTS);

/// Issue 4: a rebalance of 1 MiB values (the contract's largest) moves them intact.
#[test]
fn a_rebalance_moves_one_mebibyte_values() {
    let env = Env::clean();
    let (vl, mut servers, handle) = start(&env, 3);
    let keys = keys(6);
    let big = |key: &str| format!("{key}:{}", "x".repeat((1 << 20) - key.len() - 1));
    write_all(&handle, &vl, &keys, big);
    servers.push(server(&env, &vl));
    let view = wait_rebalanced(&handle, &vl, &servers);
    assert_exact(&handle, &vl, &view, &keys, big, "1 MiB values after a join");
    drop(servers.remove(0));
    let view = wait_rebalanced(&handle, &vl, &servers);
    assert_exact(
        &handle,
        &vl,
        &view,
        &keys,
        big,
        "1 MiB values after a departure",
    );
}

/// Contract: `rebalancing` is true from a view change until every server finished, and
/// `pending` names the servers that have not; meanwhile (issue 17) `setr`/`getr` of a key
/// fail with `rebalancing` (or wait, with `--wait`) only while that key is not settled: a
/// key whose replicas held it before is read at once, a key that moved to the joiner is
/// refused until its copy is settled. A frozen server keeps the epoch from completing until
/// it is declared dead, which makes the window long enough to observe.
#[test]
fn replicated_operations_refuse_only_unsettled_keys_or_wait_with_wait() {
    let env = Env::clean();
    let (vl, mut servers, handle) = start(&env, 3);
    let all = keys(60);
    write_all(&handle, &vl, &all, value_of);
    let frozen = servers[0].id.clone();
    let live_old = [servers[1].id.clone(), servers[2].id.clone()];
    servers[0].proc.signal(libc::SIGSTOP);
    servers.push(server(&env, &vl));
    let joiner = servers[3].id.clone();
    let mut view = serde_json::Value::Null;
    let joined = wait_until(Duration::from_secs(5), || {
        view = query_servers(&env, &vl);
        server_ids(&view).len() == 4
    });
    assert!(joined, "{view}");
    assert_eq!(view["rebalancing"], true, "{view}");
    let pending: Vec<&str> = view["pending"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    assert!(
        pending.contains(&frozen.as_str()),
        "the frozen server is pending: {view}"
    );
    let info = client(&handle, &vl, vl.addr)
        .query_servers()
        .expect("query_servers");
    let replicas = |key: &str| -> Vec<String> {
        trireme::placement::ring::replicas(&info.view, key)
            .iter()
            .map(|m| m.id.to_string())
            .collect()
    };
    // A key led by a live server that held it, away from the frozen one: read at once (once
    // its servers heard of the new view, within a heartbeat), while the epoch rebalances.
    let stayed = all
        .iter()
        .find(|k| live_old.contains(&replicas(k)[0]) && !replicas(k).contains(&frozen))
        .expect("a key led by a live server that held it");
    let vl_addr = vl.addr.to_string();
    let mut json = serde_json::Value::Null;
    let served = wait_until(Duration::from_secs(3), || {
        let (code, answer) = client_json(
            &env,
            &[
                "--viewleader",
                &vl_addr,
                "--timeout-ms",
                "1000",
                "getr",
                stayed,
            ],
        );
        json = answer;
        code == 0
    });
    assert!(served, "getr {stayed} during the rebalancing: {json}");
    assert_eq!(
        json["value"].as_str(),
        Some(value_of(stayed).as_str()),
        "{json}"
    );
    assert_eq!(
        query_servers(&env, &vl)["rebalancing"],
        true,
        "still rebalancing"
    );
    // A key that moved to the joiner (and does not need the frozen server): refused.
    let moved = all
        .iter()
        .find(|k| {
            let r = replicas(k);
            r.contains(&joiner) && !r.contains(&frozen)
        })
        .expect("a key that moved to the joiner");
    let (code, json) = client_json(&env, &["--viewleader", &vl_addr, "setr", moved, "new"]);
    assert_eq!(
        (code, json["kind"].as_str()),
        (1, Some("rebalancing")),
        "{json}"
    );
    assert!(
        json["error"]
            .as_str()
            .is_some_and(|e| e.contains("not settled")),
        "{json}"
    );
    // With --wait it goes through once the frozen server is declared dead and the epoch
    // is settled.
    let (code, json) = client_json(
        &env,
        &[
            "--viewleader",
            &vl_addr,
            "--timeout-ms",
            "15000",
            "setr",
            moved,
            "new",
            "--wait",
        ],
    );
    assert_eq!(
        (code, &json["ok"]),
        (0, &serde_json::json!(true)),
        "--wait: {json}"
    );
    let (code, json) = client_json(&env, &["--viewleader", &vl_addr, "getr", moved, "--wait"]);
    assert_eq!((code, json["value"].as_str()), (0, Some("new")), "{json}");
    // The key may be settled before the whole epoch is: the flag clears soon after.
    let mut view = serde_json::Value::Null;
    let settled = wait_until(Duration::from_secs(10), || {
        view = query_servers(&env, &vl);
        view["rebalancing"] == false && server_ids(&view).len() == 3
    });
    assert!(settled, "{view}");
}

/// Issue 17 (view changes stall only the keys that move): 5 servers and 1,000 keys; readers
/// and writers go round every key while a sixth server joins, and again while one is
/// killed. Operations on keys whose replica set did not change never fail; no `getr` fails
/// (a killed replica is skipped); moved keys are refused only briefly after the view change
/// (bounded here generously; `cargo bench --bench rebalance -- churn` prints the figure).
#[test]
fn a_view_change_fails_no_operation_on_a_key_it_did_not_move() {
    use std::sync::Arc;
    use trireme::cli::bench::churn::{self, Load};
    let env = Env::clean();
    let (vl, mut servers, handle) = start(&env, 5);
    let keys: Arc<Vec<String>> = Arc::new((0..1000).map(|i| format!("churn-{i}")).collect());
    write_all(&handle, &vl, &keys, value_of);
    let view = || {
        client(&handle, &vl, vl.addr)
            .query_servers()
            .expect("view")
            .view
    };
    let mut change = |what: &str, act: &mut dyn FnMut(&mut Vec<Server>)| {
        let before = view();
        let load = Load::start(
            &handle,
            vl.addr,
            keys.clone(),
            6,
            100,
            Duration::from_secs(10),
        );
        assert!(wait_until(Duration::from_secs(20), || load.done() >= 300));
        act(&mut servers);
        let mut changed = None;
        assert!(wait_until(Duration::from_secs(20), || {
            changed = (view().epoch > before.epoch).then(Instant::now);
            changed.is_some()
        }));
        let after = wait_rebalanced(&handle, &vl, &servers);
        let settled = load.done();
        assert!(wait_until(Duration::from_secs(20), || load.done() >= settled + 300));
        let records = load.stop();
        let report = churn::analyse(&records, &keys, &before, &after, changed.unwrap());
        eprintln!("{what}: {}", report.line());
        assert!(
            report.unmoved_keys > 0 && report.moved_keys > 0,
            "{report:?}"
        );
        assert!(
            report.unmoved_failures.is_empty(),
            "{what}: operations on unmoved keys failed: {report:?}"
        );
        assert_eq!(report.failed_reads, 0, "{what}: {report:?}");
        assert!(
            report.moved_window < Duration::from_secs(5),
            "{what}: moved keys refused too long: {report:?}"
        );
    };
    change("a sixth server joins", &mut |servers| {
        servers.push(server(&env, &vl));
    });
    change("a server is killed", &mut |servers| {
        let killed = servers.remove(0);
        killed.proc.signal(libc::SIGKILL);
    });
}
