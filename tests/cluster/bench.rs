//! `client bench` against a real cluster (issue 6, part 1): a closed-loop mix counts every
//! operation and reports ordered percentiles; an open-loop run follows its rate.

use std::time::Duration;

use serde_json::Value;

use crate::util::*;

/// Starts a view leader and 3 servers and waits until a `setr` goes through (every server
/// has learned the view's epoch).
fn writable_cluster(env: &Env) -> (ViewLeader, Vec<Server>) {
    let vl = viewleader(env);
    let servers: Vec<Server> = (0..3).map(|_| server(env, &vl)).collect();
    wait_for_servers(env, &vl, 3);
    let addr = vl.addr.to_string();
    let writable = wait_until(Duration::from_secs(10), || {
        client(env, &["--viewleader", &addr, "setr", "warm-up", "x"]).code == 0
    });
    assert!(writable, "the cluster never accepted a setr");
    (vl, servers)
}

/// Runs `client --viewleader VL bench ARGS --json`; asserts it succeeded and returns the
/// report.
fn bench(env: &Env, vl: &ViewLeader, args: &[&str]) -> Value {
    let addr = vl.addr.to_string();
    let mut all = vec!["--viewleader", addr.as_str(), "--json", "bench"];
    all.extend_from_slice(args);
    let run = client(env, &all);
    let json = run.json();
    assert_eq!(
        run.code, 0,
        "bench {args:?} failed: {json} (stderr {})",
        run.stderr
    );
    assert_eq!(json["ok"], true, "{json}");
    json
}

/// Asserts the report counts no failure of any kind.
fn assert_no_errors(json: &Value) {
    assert_eq!(json["failed"], 0, "{json}");
    let errors = json["errors"].as_object().expect("errors by kind");
    for kind in [
        "not_found",
        "aborted",
        "rebalancing",
        "no_servers",
        "timeout",
        "unreachable",
        "bad_input",
        "not_holder",
        "deadlock",
    ] {
        assert_eq!(errors.get(kind), Some(&Value::from(0)), "{kind} in {json}");
    }
}

/// Asserts p50 <= p90 <= p99 <= p99.9 <= max, all positive, and returns them.
fn assert_ordered_percentiles(json: &Value) -> Vec<f64> {
    let latency = &json["latency_us"];
    let values: Vec<f64> = ["p50", "p90", "p99", "p999", "max"]
        .iter()
        .map(|p| {
            latency[p]
                .as_f64()
                .unwrap_or_else(|| panic!("no {p} in {json}"))
        })
        .collect();
    assert!(values[0] > 0.0, "{json}");
    assert!(
        values.windows(2).all(|w| w[0] <= w[1]),
        "percentiles out of order: {values:?}"
    );
    values
}

/// Issue 6: `bench --op mix --ops 200 --concurrency 4` sends exactly 200 operations, both
/// kinds, all successful (the key space is preloaded, so every getr hits), with ordered
/// percentiles; `--rate` paces an open-loop run: 200 operations at 400/s cannot finish before
/// the last one is due (199/400 s after the start), and their latency is measured from the
/// intended send time.
#[test]
fn bench_counts_a_mix_and_paces_an_open_loop_run() {
    let env = Env::clean();
    let (vl, _servers) = writable_cluster(&env);

    let mix = bench(
        &env,
        &vl,
        &["--op", "mix", "--ops", "200", "--concurrency", "4"],
    );
    assert_eq!(mix["op"], "mix", "{mix}");
    assert_eq!(mix["ops"], 200, "{mix}");
    assert_eq!(mix["succeeded"], 200, "{mix}");
    let (reads, writes) = (mix["reads"].as_u64(), mix["writes"].as_u64());
    assert_eq!(reads.zip(writes).map(|(r, w)| r + w), Some(200), "{mix}");
    assert!(reads > Some(50) && writes > Some(50), "a 50% mix: {mix}");
    assert_no_errors(&mix);
    assert_ordered_percentiles(&mix);
    assert!(mix["throughput"].as_f64() > Some(0.0), "{mix}");

    let paced = bench(
        &env,
        &vl,
        &[
            "--op",
            "getr",
            "--ops",
            "200",
            "--rate",
            "400",
            "--concurrency",
            "4",
        ],
    );
    assert_eq!(paced["loop"], "open", "{paced}");
    assert_eq!(paced["latency_from"], "intended", "{paced}");
    assert_eq!(paced["ops"], 200, "{paced}");
    assert_eq!(paced["succeeded"], 200, "{paced}");
    assert_no_errors(&paced);
    assert_ordered_percentiles(&paced);
    let elapsed = paced["elapsed_s"].as_f64().unwrap_or_default();
    assert!(
        elapsed >= 0.497,
        "200 operations at 400/s took {elapsed} s, before the last was due"
    );
    // Paced at a rate a 2-core loopback cluster carries easily, the run ends soon after the
    // last operation is due rather than queueing.
    assert!(elapsed < 5.0, "{paced}");
}
