//! Deterministic simulation of the whole cluster (README "How we test").
//!
//! Each seed builds a [`world::World`]: the real view leader, servers and client
//! coordinators, each on a real reliable-layer endpoint, in one thread and in virtual time,
//! over a network that loses, duplicates, reorders and delays datagrams and cuts links, while
//! servers crash and restart and clients are killed (preferably between the votes and the
//! decision of a setr). Then the faults stop, the cluster settles, and [`checks::check`]
//! verifies the invariants and the linearizability of every key's history.
//!
//! - `TRIREME_SIM_SEEDS=N` runs N seeds in all (default 2048), spread over the eight
//!   `seeds_*` tests; `TRIREME_SIM_FIRST_SEED=K` starts at seed K.
//! - `TRIREME_SIM_SEED=S` makes `replay` run seed S alone, and `TRIREME_SIM_TRACE=FILE`
//!   writes its datagrams as a trace for `trace-dump`.

mod checks;
mod linearizability;
mod world;

use std::path::Path;
use std::time::Duration;

use world::{Params, World};

/// How long the cluster may take to settle once the faults stop (virtual time): long
/// enough for a participant's longest wait for a decision (30 s) and its termination.
const SETTLE_LIMIT: Duration = Duration::from_secs(90);

/// Seeds that once found a bug, now fixed; run on every test run (see README "How we test").
const REGRESSION_SEEDS: &[u64] = &[
    64, 88, 168, 200, 221, 275, 287, 327, 345, 434, 556, 1449, 1905, 2023, 3630, 13441,
];

/// What one seed's run amounted to.
#[derive(Debug)]
struct Summary {
    /// The run's parameters.
    params: Params,
    /// Its counters.
    stats: world::Stats,
    /// What the checks looked at.
    checked: checks::Checked,
    /// The run's digest.
    digest: u64,
}

/// Runs seed `seed` and checks it; with `trace`, writes its datagrams there. The error names
/// the seed, what broke, and how to replay it.
fn run_seed(seed: u64, trace: Option<&Path>) -> Result<Summary, String> {
    let params = Params::from_seed(seed);
    let mut world = World::new(params.clone(), trace.is_some());
    world.verbose = std::env::var_os("TRIREME_SIM_LOG").is_some();
    if world.verbose {
        let _ = simplelog::TermLogger::init(
            log::LevelFilter::Debug,
            simplelog::Config::default(),
            simplelog::TerminalMode::Stderr,
            simplelog::ColorChoice::Never,
        );
    }
    let outcome = world
        .run(SETTLE_LIMIT)
        .and_then(|state| checks::check(&world.history, &state));
    if let Some(path) = trace {
        trireme::trace::write_file(path, world.trace()).map_err(|e| e.to_string())?;
    }
    match outcome {
        Ok(checked) => Ok(Summary {
            params,
            stats: world.stats.clone(),
            checked,
            digest: world.digest,
        }),
        Err(problem) => Err(format!(
            "seed {seed} failed: {problem}\n  parameters: {params:?}\n  faults: {:?}\n  replay: TRIREME_SIM_SEED={seed} TRIREME_SIM_TRACE=/tmp/sim-{seed}.pcap cargo nextest run --test sim replay --no-capture && trace-dump /tmp/sim-{seed}.pcap --summary",
            world.stats
        )),
    }
}

/// An environment variable as a number.
fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Runs part `part` of eight of the configured seeds and fails with every failing seed.
fn run_part(part: u64) {
    let total = env_number("TRIREME_SIM_SEEDS").unwrap_or(2048);
    let first = env_number("TRIREME_SIM_FIRST_SEED").unwrap_or(0);
    let mut failures = Vec::new();
    let mut totals = checks::Checked::default();
    let mut faults = world::Stats::default();
    let mut seeds = 0;
    for seed in (first..first + total).filter(|s| s % 8 == part) {
        seeds += 1;
        match run_seed(seed, None) {
            Ok(summary) => {
                totals.add(&summary.checked);
                faults.add(&summary.stats);
            }
            Err(failure) => failures.push(failure),
        }
    }
    eprintln!(
        "{seeds} seeds: {} operations checked ({} acknowledged setrs, {} of unknown outcome, {} reads); faults: {} datagrams dropped, {} duplicated, {} reordered of {} delivered, {} server crashes, {} cuts, {} clients killed ({} between votes and decision); {} runs with a cluster key; {} Retry datagrams (replies held for address validation)",
        totals.ops,
        totals.acked_writes,
        totals.unknown_writes,
        totals.reads,
        faults.dropped,
        faults.duplicated,
        faults.reordered,
        faults.delivered,
        faults.crashes,
        faults.partitions,
        faults.client_kills,
        faults.kills_before_decision,
        faults.keyed_runs,
        faults.retries
    );
    assert!(
        failures.is_empty(),
        "{} of {seeds} seeds failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert!(
        seeds == 0 || totals.acked_writes > 0,
        "no setr succeeded in {seeds} seeds: the simulation tests nothing"
    );
}

/// Defines the tests that run one eighth of the seeds each (so they run in parallel).
macro_rules! seed_parts {
    ($($name:ident = $part:expr),*) => {$(
        /// Runs one eighth of the seeds: every invariant holds on every seed.
        #[test]
        fn $name() {
            run_part($part);
        }
    )*};
}

seed_parts!(
    seeds_0 = 0,
    seeds_1 = 1,
    seeds_2 = 2,
    seeds_3 = 3,
    seeds_4 = 4,
    seeds_5 = 5,
    seeds_6 = 6,
    seeds_7 = 7
);

/// Runs `TRIREME_SIM_SEED` if set (writing its trace to `TRIREME_SIM_TRACE` if set), else the
/// seeds that once found bugs, printing what each run did.
#[test]
fn replay() {
    let seeds: Vec<u64> = match env_number("TRIREME_SIM_SEED") {
        Some(seed) => vec![seed],
        None => REGRESSION_SEEDS.to_vec(),
    };
    let trace = std::env::var_os("TRIREME_SIM_TRACE");
    for seed in seeds {
        let trace = trace.as_deref().map(Path::new);
        match run_seed(seed, trace) {
            Ok(summary) => eprintln!(
                "seed {seed}: passed; digest {:016x}; {} keys, {} operations checked ({} acknowledged setrs, {} of unknown outcome, {} reads); faults {:?}; parameters {:?}",
                summary.digest,
                summary.checked.keys,
                summary.checked.ops,
                summary.checked.acked_writes,
                summary.checked.unknown_writes,
                summary.checked.reads,
                summary.stats,
                summary.params
            ),
            Err(failure) => panic!("{failure}"),
        }
    }
}

/// A seed replays exactly: the same datagrams at the same virtual instants, the same
/// history; another seed gives another run.
#[test]
fn a_seed_replays_exactly() {
    let run = |seed| {
        let mut world = World::new(Params::from_seed(seed), false);
        let state = world.run(SETTLE_LIMIT).expect("the run settles");
        (world.digest, world.history.clone(), state.at)
    };
    let (digest, history, at) = run(11);
    assert!(!history.is_empty(), "the run did something");
    assert_eq!(run(11), (digest, history, at), "seed 11 replays exactly");
    assert_ne!(run(12).0, digest, "seed 12 is another run");
}

/// The checks can fail: a run's final state or history, broken on purpose in each way an
/// invariant forbids, is refused with a message saying what broke.
#[test]
fn the_checks_catch_broken_runs() {
    let (seed, mut world, state) = (0..64)
        .find_map(|seed| {
            let mut world = World::new(Params::from_seed(seed), false);
            let state = world.run(SETTLE_LIMIT).ok()?;
            let written = world
                .history
                .iter()
                .any(|r| matches!(r.outcome, world::Outcome::Written { .. }));
            (written && state.servers.len() >= 2).then_some((seed, world, state))
        })
        .expect("a seed with an acknowledged write");
    checks::check(&world.history, &state).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    let written = world
        .history
        .iter()
        .rev()
        .find(|r| matches!(r.outcome, world::Outcome::Written { .. }))
        .cloned()
        .expect("a write");
    let refused = |state: &world::Final, history: &[world::Record], expect: &str| {
        let error = checks::check(history, state).expect_err(expect);
        assert!(error.contains(expect), "expected {expect:?} in: {error}");
    };

    // A replica loses the key.
    let mut broken = state.clone();
    let replica = state.placement.replicas(&written.key)[0].id;
    for (id, bucket, _) in &mut broken.servers {
        if *id == replica {
            bucket.remove(&written.key);
        }
    }
    refused(&broken, &world.history, "is missing from its replica");

    // The replicas disagree.
    let mut broken = state.clone();
    for (id, bucket, _) in &mut broken.servers {
        if *id == replica
            && let Some(copy) = bucket.get_mut(&written.key)
        {
            copy.0 += 7;
        }
    }
    refused(&broken, &world.history, "disagree");

    // Every replica loses the key: an acknowledged write is lost.
    let mut broken = state.clone();
    for (_, bucket, _) in &mut broken.servers {
        bucket.remove(&written.key);
    }
    refused(&broken, &world.history, "is lost");

    // A transaction stays undecided.
    let mut broken = state.clone();
    broken.servers[0].2 = 1;
    refused(&broken, &world.history, "undecided");

    // A read after the acknowledged write returns a value nobody wrote.
    let mut history = world.history.clone();
    let completed = written.completed.expect("completed");
    history.push(world::Record {
        client: 99,
        key: written.key.clone(),
        value: None,
        invoked: completed + Duration::from_millis(1),
        completed: Some(completed + Duration::from_millis(2)),
        outcome: world::Outcome::Found {
            value: "never written".into(),
            version: 1,
        },
    });
    refused(&state, &history, "not linearizable");

    // Two setrs claim the same version.
    let mut twin = written.clone();
    twin.value = Some("twin".into());
    world.history.push(twin);
    refused(&state, &world.history, "both committed version");
}

/// A simulated run's trace is a trace file like any other: the trace reader reads every
/// datagram back and `trace-dump` summarises it.
#[test]
fn a_simulated_trace_reads_back_in_trace_dump() {
    let dir = std::env::temp_dir().join(format!("trireme-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let path = dir.join("seed-5.pcap");
    let mut world = World::new(Params::from_seed(5), true);
    world.run(SETTLE_LIMIT).expect("the run settles");
    trireme::trace::write_file(&path, world.trace()).expect("trace written");
    let trace = trireme::trace::read_file(&path).expect("trace read back");
    assert_eq!(trace.records.len(), world.trace().len());
    assert!(world.trace().len() as u64 >= world.stats.sent);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_trace-dump"))
        .arg(&path)
        .arg("--summary")
        .output()
        .expect("trace-dump runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "trace-dump failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("10.0.0.1:39000"),
        "the view leader appears: {stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
