//! The namespace scenarios, with kernel-level loss and duplication.
//!
//! `scenario_under_kernel_loss_and_duplication` runs `netem-scripts/scenario.sh` (3 servers,
//! 20 keys, 5% loss and 2% duplication on every host's link): a view leader, servers and a
//! client each in their own namespace behind a router namespace; servers are killed one by one
//! down to one and fresh ones started back up to three, and after every step every key and
//! every bucket is checked. The script prints which mechanism carries each impairment (netem
//! where the kernel has it, else iptables `statistic`/`TEE`, else the programs' own `--faults`).
//!
//! `partition_view_leader_cut_from_all_servers` runs `netem-scripts/partition.sh` on the same
//! hosts and impairments (issue 14): after 20 keys are written and checked, iptables rules in
//! the view leader's namespace cut it from every server for 3 × `--dead-after-ms` (1000 ms)
//! while the client still reaches it; the servers must be declared dead, and after the heal
//! (exactly those rules deleted) every key must read back with its value, placement be exact
//! once settled, and no epoch answered be lower than one answered before.
//!
//! `partition_isolating_the_group_leader` runs `netem-scripts/group-partition.sh` (issue 16):
//! the view leader is a group of three members, each on a host of its own, under the same
//! impairments; after 20 keys are written and checked, iptables rules in the leader's
//! namespace cut it from every other host (members, servers, client). The two others must
//! elect a new leader, `setr` must work again within 1.5 s of the cut (3/4 of
//! `--dead-after-ms` 2000, well under `--dead-after-ms` plus an election) and 10 new keys be
//! written and read back through them, and no server may be declared dead; after the heal the
//! old leader must follow the new one, every key (old and new) read back with its value,
//! placement be exact, the servers keep their ids, and no epoch go backwards.
//!
//! Namespaces need root and a kernel that allows them. Where `ip netns add` fails, each test
//! says why on stderr and passes without running, unless `TRIREME_REQUIRE_NETNS=1`, which turns
//! that into a failure. Each test uses its own name prefix (a letter of its own and the process
//! id), so the two never collide with each other or with a manual run of the scripts; they run
//! one at a time (both are timing-sensitive and the machines have few cores). A guard stops
//! the script (SIGTERM by PID, its trap tears everything down) and runs `hosts.sh down` when
//! the test ends, panics included.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// A scenario must finish within this (each test well under two minutes).
const DEADLINE: Duration = Duration::from_secs(100);

/// Held by each test while its scenario runs: one scenario at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// How long the script gets to tear down after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(20);

/// The membership scenario's steps: the start, two kills, two fresh starts.
const STEPS: usize = 5;

/// The number of keys the scenario writes.
const KEYS: usize = 20;

/// The number of keys `group-partition.sh` writes while its leader is cut off (`--new-keys`).
const GROUP_NEW_KEYS: usize = 10;

/// The repository root (where `netem-scripts/` lives).
fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The directory holding the `viewleader`, `server` and `client` binaries Cargo built.
fn bin_dir() -> PathBuf {
    let server = Path::new(env!("CARGO_BIN_EXE_server"));
    let dir = server
        .parent()
        .expect("the server binary has a directory")
        .to_path_buf();
    for other in [
        env!("CARGO_BIN_EXE_viewleader"),
        env!("CARGO_BIN_EXE_client"),
    ] {
        assert_eq!(
            Path::new(other).parent(),
            Some(dir.as_path()),
            "the scripts expect the three binaries in one directory"
        );
    }
    dir
}

/// A name prefix for this run: `letter` (one per test) and the process id in base 36 (at most
/// 8 characters, as the scripts require), unique among running processes and tests.
fn prefix(letter: char) -> String {
    let mut n = std::process::id();
    let mut digits = Vec::new();
    loop {
        digits.push(std::char::from_digit(n % 36, 36).expect("a base-36 digit"));
        n /= 36;
        if n == 0 {
            break;
        }
    }
    format!("{letter}{}", digits.iter().rev().collect::<String>())
}

/// Why namespaces cannot be used here, or `None` if `ip netns add` and `del` work.
fn netns_unavailable(prefix: &str) -> Option<String> {
    let probe = format!("{prefix}-chk");
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Err(e) => Some(format!("cannot run `ip` (iproute2): {e}")),
        Ok(out) if !out.status.success() => Some(format!(
            "`ip netns add {probe}` failed ({}): {} (network namespaces need root and a kernel \
             that allows them)",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(_) => {
            let del = Command::new("ip").args(["netns", "del", &probe]).output();
            match del {
                Ok(out) if out.status.success() => None,
                Ok(out) => Some(format!(
                    "`ip netns del {probe}` failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
                Err(e) => Some(format!("cannot run `ip netns del`: {e}")),
            }
        }
    }
}

/// Runs `hosts.sh --prefix PREFIX --keep-logs down`, which removes everything made under the
/// prefix but the logs of a failed run.
fn hosts_down(prefix: &str) {
    let status = Command::new("bash")
        .arg(repo().join("netem-scripts/hosts.sh"))
        .args(["--prefix", prefix, "--keep-logs", "down"])
        .stdout(Stdio::null())
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!("netem test: `hosts.sh --prefix {prefix} down` failed: {status:?}");
    }
}

/// Owns the running scenario script: on drop (the test's end, or a panic) it stops the script
/// with SIGTERM by PID (its trap tears the hosts down), kills it if it does not exit within
/// [`TERM_GRACE`], and runs `hosts.sh down` in any case.
struct ScenarioGuard {
    /// The script, while it may still be running.
    child: Option<Child>,
    /// The run's name prefix.
    prefix: String,
}

impl ScenarioGuard {
    /// Waits for the script to exit, until `deadline`; `None` if it is still running then.
    fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Some(status);
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(100)),
                Ok(None) => return None,
                Err(e) => panic!("cannot wait for the scenario script: {e}"),
            }
        }
    }
}

impl Drop for ScenarioGuard {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut()
            && matches!(child.try_wait(), Ok(None))
        {
            // By PID, never by name: the script's trap then tears its hosts down.
            eprintln!(
                "netem test: stopping the scenario script (PID {})",
                child.id()
            );
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            if self.wait_until(Instant::now() + TERM_GRACE).is_none()
                && let Some(child) = self.child.as_mut()
            {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        hosts_down(&self.prefix);
    }
}

/// One row of the script's result table.
#[derive(Debug)]
struct Row {
    /// The step's name (`start 3`, `kill s3`, ...).
    step: String,
    /// `live servers` (`3`, or `3 in view` during a cut).
    live: String,
    /// `keys ok` (`20/20`).
    keys_ok: String,
    /// `keys missing/wrong`.
    keys_bad: String,
    /// `placement ok` (`yes`).
    placement: String,
    /// `seconds` (`4.8`; `never` for an event that did not happen).
    seconds: String,
}

/// The rows of the result table in the script's stdout (the header and rule excluded).
fn table_rows(stdout: &str) -> Vec<Row> {
    stdout
        .lines()
        .filter(|line| line.starts_with("| ") && !line.starts_with("| step "))
        .map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            Row {
                step: cells.first().unwrap_or(&"").to_string(),
                live: cells.get(1).unwrap_or(&"").to_string(),
                keys_ok: cells.get(3).unwrap_or(&"").to_string(),
                keys_bad: cells.get(4).unwrap_or(&"").to_string(),
                placement: cells.get(5).unwrap_or(&"").to_string(),
                seconds: cells.get(6).unwrap_or(&"").to_string(),
            }
        })
        .collect()
}

/// Runs `netem-scripts/SCRIPT --prefix P --servers 3 --keys KEYS --loss 5% --dup 2%` and the
/// script's own `extra` arguments with the binaries Cargo built, under the guard, one scenario at a time, and returns its exit status
/// and stdout; `None` (after saying why) where namespaces are unavailable and
/// `TRIREME_REQUIRE_NETNS` is not `1`. Panics if the script runs past [`DEADLINE`].
fn run_script(script: &str, letter: char, extra: &[&str]) -> Option<(ExitStatus, String)> {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let started = Instant::now();
    let prefix = prefix(letter);
    if let Some(why) = netns_unavailable(&prefix) {
        let message = format!(
            "\n**********************************************************************\n\
             netem test NOT RUN ({script}): network namespaces are unavailable here:\n  {why}\n\
             (set TRIREME_REQUIRE_NETNS=1 to make this a failure)\n\
             **********************************************************************"
        );
        if std::env::var("TRIREME_REQUIRE_NETNS").as_deref() == Ok("1") {
            panic!("{message}");
        }
        eprintln!("{message}");
        return None;
    }
    // A run that died with this process id before (it cannot still be running) may have left
    // hosts behind; the scenario refuses to start over existing ones.
    hosts_down(&prefix);

    let mut child = Command::new("bash")
        .arg(repo().join("netem-scripts").join(script))
        .args([
            "--prefix",
            &prefix,
            "--servers",
            "3",
            "--keys",
            &KEYS.to_string(),
        ])
        .args(["--loss", "5%", "--dup", "2%"])
        .args(extra)
        .env("TRIREME_BIN_DIR", bin_dir())
        .env_remove("TRIREME_FAULTS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start netem-scripts/{script}: {e}"));
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut guard = ScenarioGuard {
        child: Some(child),
        prefix,
    };
    let reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });

    let status = guard.wait_until(started + DEADLINE);
    let Some(status) = status else {
        panic!("{script} did not finish within {DEADLINE:?}");
    };
    let stdout = reader.join().expect("the stdout reader panicked");
    eprintln!("netem test: {script} output:\n{stdout}");
    drop(guard);

    assert!(
        !stdout.contains("netem on") || !stdout.contains("netem unavailable"),
        "the output claims netem both ran and was unavailable"
    );
    if stdout.contains("NOT kernel-level") {
        eprintln!(
            "\n*** netem test: some impairments were NOT kernel-level here (neither netem nor \
             iptables could carry them; see the mechanism lines above) ***\n"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(110),
        "{script} took {:?}, too close to two minutes",
        started.elapsed()
    );
    Some((status, stdout))
}

/// Asserts that `row` found every key with its value and the placement exact.
fn assert_row_all_good(row: &Row) {
    assert_eq!(
        row.keys_ok,
        format!("{KEYS}/{KEYS}"),
        "step {}: {row:?}",
        row.step
    );
    assert_eq!(row.keys_bad, "0", "step {}: {row:?}", row.step);
    assert_eq!(row.placement, "yes", "step {}: {row:?}", row.step);
}

/// The line of `stdout` that starts with `label`, or a panic naming it.
fn line_starting<'a>(stdout: &'a str, label: &str) -> &'a str {
    stdout
        .lines()
        .find(|line| line.starts_with(label))
        .unwrap_or_else(|| panic!("no line starting with {label:?} in the output"))
}

/// The membership scenario with 5% kernel-level loss and 2% duplication on every link.
#[test]
fn scenario_under_kernel_loss_and_duplication() {
    let Some((status, stdout)) = run_script("scenario.sh", 't', &[]) else {
        return;
    };
    assert!(
        status.success(),
        "the scenario failed ({status}); its output is above"
    );
    assert!(
        stdout.contains("RESULT: PASS"),
        "no RESULT: PASS in the output"
    );
    let rows = table_rows(&stdout);
    assert_eq!(
        rows.len(),
        STEPS,
        "expected {STEPS} steps in the table, got {rows:?}"
    );
    for row in &rows {
        assert_row_all_good(row);
    }
}

/// Issue 14: the view leader cut from every server for 3 × `--dead-after-ms` (iptables in its
/// namespace; the client still reaches it), under 5% kernel-level loss and 2% duplication on
/// every link. The servers are declared dead during the cut; after the heal every key reads
/// back with its value, placement is exact once settled, and epochs never go backwards.
#[test]
fn partition_view_leader_cut_from_all_servers() {
    let Some((status, stdout)) = run_script("partition.sh", 'p', &[]) else {
        return;
    };
    assert!(
        status.success(),
        "the partition scenario failed ({status}); its output is above"
    );
    assert!(
        stdout.contains("RESULT: PASS"),
        "no RESULT: PASS in the output"
    );
    let dead = line_starting(&stdout, "declared dead: ");
    assert!(
        dead.starts_with("declared dead: yes"),
        "the servers were not declared dead during the cut: {dead}"
    );
    let recovery = line_starting(&stdout, "recovery: ");
    assert!(
        recovery.starts_with("recovery: every key readable "),
        "no full recovery after the heal: {recovery}"
    );
    eprintln!("netem test: {recovery}");
    assert!(
        !stdout.contains("wrong reads after the heal"),
        "a getr after the heal answered a wrong value or not_found; the output is above"
    );
    let epochs = line_starting(&stdout, "epochs: ");
    assert!(
        epochs.contains("never lower than before the cut: yes")
            && epochs.contains("never backwards: yes"),
        "an epoch went backwards: {epochs}"
    );
    let rows = table_rows(&stdout);
    assert!(
        rows.len() == 3
            && rows[0].step == "start 3"
            && rows[1].step.starts_with("cut ")
            && rows[2].step == "heal",
        "expected the steps start 3, cut, heal in the table, got {rows:?}"
    );
    assert_row_all_good(&rows[0]);
    assert_row_all_good(&rows[2]);
}

/// Issue 16: the leader of a three-member view-leader group (each member on a host of its own)
/// cut from every other host (iptables in its namespace), under 5% kernel-level loss and 2%
/// duplication on every link (README "Running a view-leader group": partitioning the leader
/// costs at most an election, well under `--dead-after-ms`, and declares no server dead). The
/// survivors elect a new leader, `setr` works again within the bound and new keys read back,
/// no server leaves the view; after the heal the old leader follows the new one, every key
/// (old and new) reads back with its value, placement is exact, and epochs never go backwards.
#[test]
fn partition_isolating_the_group_leader() {
    // A failed failover must still end in the table, within [`DEADLINE`]: every step that
    // waits (the rejoin, the view after the heal) gives up after 20 s.
    let new_keys = GROUP_NEW_KEYS.to_string();
    let Some((status, stdout)) = run_script(
        "group-partition.sh",
        'g',
        &["--new-keys", &new_keys, "--step-deadline", "20"],
    ) else {
        return;
    };
    assert!(
        status.success(),
        "the group partition scenario failed ({status}); its output is above"
    );
    assert!(
        stdout.contains("RESULT: PASS"),
        "no RESULT: PASS in the output"
    );
    let leader = line_starting(&stdout, "new leader: ");
    assert!(
        leader.starts_with("new leader: yes"),
        "the survivors elected no new leader: {leader}"
    );
    eprintln!("netem test: {leader}");
    let setr = line_starting(&stdout, "first setr: ");
    assert!(
        setr.ends_with("within the bound: yes"),
        "setr did not work again within the bound after the cut: {setr}"
    );
    eprintln!("netem test: {setr}");
    let dead = line_starting(&stdout, "declared dead: ");
    assert!(
        dead.starts_with("declared dead: none"),
        "a server was declared dead while the leader was cut off: {dead}"
    );
    let rejoin = line_starting(&stdout, "rejoin: ");
    assert!(
        rejoin.starts_with("rejoin: yes"),
        "the old leader did not rejoin as a follower: {rejoin}"
    );
    let ids = line_starting(&stdout, "server ids: ");
    assert!(
        ids.starts_with("server ids: kept"),
        "the servers' ids changed across the failover: {ids}"
    );
    let epochs = line_starting(&stdout, "epochs: ");
    assert!(
        epochs.contains("never lower than before the cut: yes")
            && epochs.contains("never backwards: yes"),
        "an epoch went backwards: {epochs}"
    );

    let rows = table_rows(&stdout);
    let steps: Vec<&str> = rows.iter().map(|r| r.step.as_str()).collect();
    assert!(
        rows.len() == 6
            && steps[0] == "start 3"
            && steps[1] == "new leader"
            && steps[2] == "first setr"
            && steps[3].starts_with("cut ")
            && steps[4] == "rejoin"
            && steps[5] == "heal",
        "expected the steps start 3, new leader, first setr, cut, rejoin, heal, got {rows:?}"
    );
    for row in &rows {
        assert!(
            row.seconds.parse::<f64>().is_ok(),
            "step {} did not happen (seconds {:?}): {row:?}",
            row.step,
            row.seconds
        );
    }
    assert_row_all_good(&rows[0]);
    for row in &rows[1..4] {
        assert_eq!(row.live, "3 in view", "step {}: {row:?}", row.step);
    }
    assert_eq!(
        (rows[2].keys_ok.as_str(), rows[2].keys_bad.as_str()),
        ("1/1", "0"),
        "the first setr after the cut: {:?}",
        rows[2]
    );
    assert_eq!(
        (rows[3].keys_ok.clone(), rows[3].keys_bad.as_str()),
        (format!("{GROUP_NEW_KEYS}/{GROUP_NEW_KEYS}"), "0"),
        "the keys written and read during the cut: {:?}",
        rows[3]
    );
    assert_eq!(
        rows[4].live, "3",
        "the view after the rejoin: {:?}",
        rows[4]
    );
    let all = KEYS + GROUP_NEW_KEYS;
    assert_eq!(
        (
            rows[5].keys_ok.clone(),
            rows[5].keys_bad.as_str(),
            rows[5].placement.as_str()
        ),
        (format!("{all}/{all}"), "0", "yes"),
        "every key, old and new, after the heal: {:?}",
        rows[5]
    );
}
