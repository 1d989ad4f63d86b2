//! `--trace` and `trace-dump` on traces of real runs: every datagram recorded as a pcap that
//! an independent reader (tshark, when installed) opens; decoding, filters, the per-pair
//! summary, following one setr across processes, and damaged files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::util::{self, Env, Run};

/// Path of the trace tool.
const TRACE_DUMP: &str = env!("CARGO_BIN_EXE_trace-dump");

/// A scratch directory removed when dropped.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates a fresh directory named after `name` and this process.
    pub fn new(name: &str) -> ScratchDir {
        let dir = std::env::temp_dir().join(format!("trireme-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        ScratchDir(dir)
    }

    /// A path inside the directory, as a string for command lines.
    pub fn file(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for ScratchDir {
    /// Removes the directory and everything in it.
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs trace-dump with `args`.
fn trace_dump(args: &[&str]) -> Run {
    util::run_binary(TRACE_DUMP, args, &[])
}

/// Runs trace-dump with `args`, asserts success, and returns its stdout lines.
pub fn dump_lines(args: &[&str]) -> Vec<String> {
    let run = trace_dump(args);
    assert_eq!(run.code, 0, "trace-dump {args:?} failed: {}", run.stderr);
    run.stdout.lines().map(str::to_owned).collect()
}

/// Runs trace-dump with `--json` and `args`; returns one object per line.
fn dump_json(args: &[&str]) -> Vec<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    dump_lines(&all)
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// The traces of one small cluster run: view leader, three servers, and the clients of a
/// setr under loss, a getr and a fragmented setr.
struct Traces {
    /// Keeps the files until the test ends.
    dir: ScratchDir,
    /// Every trace file.
    all: Vec<String>,
    /// The lossy setr client's trace.
    setr: String,
    /// The three servers' addresses.
    servers: Vec<String>,
}

/// Runs the cluster with every process tracing, and stops it cleanly (SIGTERM, exit 0).
fn traced_run() -> Traces {
    let env = Env::clean();
    let dir = ScratchDir::new("tracing");
    let vl_trace = dir.file("viewleader.pcap");
    let vl = util::viewleader_with(
        &env,
        &[
            "--dead-after-ms",
            &util::DEAD_AFTER_MS.to_string(),
            "--trace",
            &vl_trace,
        ],
    );
    let mut all = vec![vl_trace];
    let mut servers = Vec::new();
    for i in 1..=3 {
        let trace = dir.file(&format!("server{i}.pcap"));
        servers.push(util::server_with(&env, &vl, &["--trace", &trace]));
        all.push(trace);
    }
    util::wait_for_servers(&env, &vl, 3);
    let vl_addr = vl.addr.to_string();
    assert!(util::wait_until(Duration::from_secs(10), || {
        util::query_servers(&env, &vl)["rebalancing"] == false
    }));
    let setr = dir.file("setr.pcap");
    // A fixed seed: the loss pattern, and so the retransmissions, are the same every run.
    let run = util::client(
        &env,
        &[
            "--viewleader",
            &vl_addr,
            "--timeout-ms",
            "20000",
            "--faults",
            "loss=0.3,seed=7",
            "--trace",
            &setr,
            "setr",
            "traced-key",
            "traced-value",
        ],
    );
    assert_eq!(run.code, 0, "setr failed: {}", run.stderr);
    let getr = dir.file("getr.pcap");
    let run = util::client(
        &env,
        &[
            "--viewleader",
            &vl_addr,
            "--trace",
            &getr,
            "getr",
            "traced-key",
        ],
    );
    assert_eq!(run.stdout, "traced-value\n", "{}", run.stderr);
    let big = dir.file("big.pcap");
    let value = "v".repeat(100_000);
    let run = util::client_with_stdin(
        &env,
        &[
            "--viewleader",
            &vl_addr,
            "--trace",
            &big,
            "setr",
            "big-key",
            "-",
        ],
        value.as_bytes(),
    );
    assert_eq!(run.code, 0, "big setr failed: {}", run.stderr);
    all.extend([setr.clone(), getr, big]);
    let addrs = servers.iter().map(|s| s.addr.to_string()).collect();
    for server in servers {
        assert_eq!(server.proc.terminate(), Some(0), "a server did not exit 0");
    }
    assert_eq!(
        vl.proc.terminate(),
        Some(0),
        "the view leader did not exit 0"
    );
    Traces {
        dir,
        all,
        setr,
        servers: addrs,
    }
}

#[test]
fn traces_of_real_runs_decode_filter_summarise_and_follow_a_setr() {
    let traces = traced_run();
    let all: Vec<&str> = traces.all.iter().map(String::as_str).collect();

    // Every datagram of every file is printed once, decoded as trireme.
    let recorded: usize = traces
        .all
        .iter()
        .map(|f| {
            trireme::runtime::trace::read_file(Path::new(f))
                .unwrap()
                .records
                .len()
        })
        .sum();
    let lines = dump_lines(&all);
    assert_eq!(lines.len(), recorded);
    assert!(
        lines
            .iter()
            .all(|l| l.contains(" sent ") || l.contains(" recv "))
    );
    assert!(
        !lines.iter().any(|l| l.contains("not trireme")),
        "undecoded datagrams"
    );
    for message in [
        "Heartbeat",
        "HeartbeatAck",
        "QueryServers",
        "Servers",
        "Prepare",
        "Prepared",
        "Commit",
        "GetR",
        "Found",
        "ViewPush",
    ] {
        assert!(
            lines.iter().any(|l| l
                .split("  ")
                .any(|part| part.split(' ').next() == Some(message))),
            "no {message} line"
        );
    }

    // The JSON form: one object per datagram, merged by time.
    let objects = dump_json(&all);
    assert_eq!(objects.len(), recorded);
    let times: Vec<u64> = objects
        .iter()
        .map(|o| o["time_ns"].as_u64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "not merged by time");

    // --kind Prepare on the lossy client: one Prepare to each of the three replicas, one txid.
    let prepares = dump_json(&["--kind", "prepare", &traces.setr]);
    let replicas: BTreeSet<&str> = prepares
        .iter()
        .map(|o| o["dst"].as_str().unwrap())
        .collect();
    let expected: BTreeSet<&str> = traces.servers.iter().map(String::as_str).collect();
    assert_eq!(replicas, expected);
    let txids: BTreeSet<&str> = prepares
        .iter()
        .map(|o| o["txid"].as_str().unwrap())
        .collect();
    assert_eq!(txids.len(), 1, "{txids:?}");
    let txid = txids.into_iter().next().unwrap().to_owned();
    assert!(
        prepares
            .iter()
            .all(|o| o["request"] == "Prepare" && o["key"] == "traced-key")
    );

    // --key keeps the whole exchange (requests, responses, acks; the commit by its txid).
    let keyed = dump_lines(&[&["--key", "traced-key"], all.as_slice()].concat());
    assert!(!keyed.is_empty());
    assert!(
        keyed.iter().all(|l| l.contains("key=traced-key")),
        "{keyed:?}"
    );
    for message in [
        "Prepare ",
        "Prepared ",
        "Commit ",
        "Done ",
        "GetR ",
        "Found ",
    ] {
        assert!(
            keyed.iter().any(|l| l.contains(message)),
            "no {message} for the key"
        );
    }
    assert!(!keyed.iter().any(|l| l.contains("big-key")));

    // --txid keeps exactly that transaction.
    let by_txid = dump_lines(&[&["--txid", &txid[..8]], all.as_slice()].concat());
    assert!(!by_txid.is_empty());
    assert!(by_txid.iter().all(|l| l.contains(&format!("txid={txid}"))));

    // --peer: only datagrams to or from that server.
    let peer = traces.servers[0].as_str();
    let by_peer = dump_lines(&[&["--peer", peer], all.as_slice()].concat());
    assert!(!by_peer.is_empty());
    assert!(by_peer.iter().all(|l| l.contains(peer)));

    // --follow-txid: per replica, prepare < vote < commit < commit acked, each delivered,
    // between the client and the replica. (The primary also sends the commit to the others
    // itself: those steps, between two servers, are counted apart.)
    let all_steps = dump_json(&[&["--follow-txid", &txid], all.as_slice()].concat());
    let is_server = |v: &Value| {
        traces
            .servers
            .iter()
            .any(|s| v.as_str() == Some(s.as_str()))
    };
    let (between_servers, steps): (Vec<&Value>, Vec<&Value>) = all_steps
        .iter()
        .partition(|step| is_server(&step["from"]) && is_server(&step["to"]));
    assert!(
        between_servers
            .iter()
            .all(|s| s["message"] == "Commit" || s["phase"] == "commit acked"),
        "only the primary's commits pass between servers: {between_servers:?}"
    );
    let mut order: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for step in &steps {
        let replica = if step["message"] == "Prepare" || step["message"] == "Commit" {
            &step["to"]
        } else {
            &step["from"]
        };
        order
            .entry(replica.as_str().unwrap().to_owned())
            .or_default()
            .push(step["phase"].as_str().unwrap().to_owned());
        assert!(step["received_ns"].is_u64(), "a step never arrived: {step}");
    }
    assert_eq!(order.len(), 3, "{order:?}");
    for phases in order.values() {
        assert_eq!(
            phases,
            &["prepare", "vote yes", "commit", "commit acked"],
            "{order:?}"
        );
    }
    let followed = dump_lines(&[&["--follow-txid", &txid], all.as_slice()].concat());
    assert_eq!(steps.len(), 12);
    assert_eq!(followed.len(), all_steps.len());

    // --summary: the lossy client retransmitted; requesters' traces give RTT samples; the
    // servers' traces count duplicates they suppressed.
    let summary = dump_json(&[&["--summary"], all.as_slice()].concat());
    let pairs = summary[0]["pairs"].as_array().unwrap();
    let setr_client = prepares[0]["src"].as_str().unwrap();
    let from_client: Vec<&Value> = pairs
        .iter()
        .filter(|p| p["requester"] == setr_client)
        .collect();
    assert_eq!(
        from_client.len(),
        4,
        "view leader and three replicas: {from_client:?}"
    );
    let retransmissions: u64 = from_client
        .iter()
        .map(|p| p["retransmissions"].as_u64().unwrap())
        .sum();
    assert!(
        retransmissions > 0,
        "30% loss retransmitted nothing: {from_client:?}"
    );
    assert!(
        from_client
            .iter()
            .all(|p| p["latency_samples"].as_u64().unwrap() > 0
                && p["rtt_samples"].as_u64().unwrap() > 0)
    );
    assert!(
        from_client
            .iter()
            .all(|p| p["duplicates_suppressed"].is_u64())
    );
    let table = dump_lines(&[&["--summary"], all.as_slice()].concat());
    assert!(table[0].starts_with("requester"));
    assert_eq!(
        table.len(),
        pairs.len() + 2,
        "header, legend, one row per pair"
    );

    // An independent reader: tshark sees the same datagrams with the same addresses.
    if let Some(tshark) = tshark() {
        check_with_tshark(
            &tshark,
            &traces.setr,
            &[
                "QueryServers",
                "Servers",
                "Prepare",
                "Prepared",
                "Commit",
                "Done",
            ],
        );
    }
    drop(traces.dir);
}

/// The tshark binary, or `None` with a loud message (a failure when
/// `TRIREME_REQUIRE_TSHARK=1`, as CI sets it once it has installed tshark).
pub fn tshark() -> Option<String> {
    let found = Command::new("tshark")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("tshark".into());
    }
    assert!(
        std::env::var("TRIREME_REQUIRE_TSHARK").as_deref() != Ok("1"),
        "TRIREME_REQUIRE_TSHARK=1 but tshark is not installed"
    );
    eprintln!(
        "!!! SKIPPED: tshark is not installed; the pcap was not checked by an independent reader !!!"
    );
    None
}

/// Checks `trace` with tshark: the same UDP datagrams, addresses and ports as the project's
/// reader sees, and our Lua dissector decodes every one as trireme, naming at least the
/// messages in `names`.
pub fn check_with_tshark(tshark: &str, trace: &str, names: &[&str]) {
    let ours = trireme::runtime::trace::read_file(Path::new(trace)).unwrap();
    let output = Command::new(tshark)
        .args(["-n", "-r", trace, "-T", "fields", "-E", "separator=,"])
        .args([
            "-e",
            "ip.src",
            "-e",
            "udp.srcport",
            "-e",
            "ip.dst",
            "-e",
            "udp.dstport",
        ])
        .output()
        .expect("tshark runs");
    assert!(
        output.status.success(),
        "tshark: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    let expected: Vec<String> = ours
        .records
        .iter()
        .map(|r| {
            format!(
                "{},{},{},{}",
                r.src.ip(),
                r.src.port(),
                r.dst.ip(),
                r.dst.port()
            )
        })
        .collect();
    assert_eq!(
        rows, expected,
        "tshark reads other datagrams than trace-dump"
    );

    // The dissector claims every datagram, cleanly. (Some ephemeral ports belong to other
    // dissectors, so heuristics go first; a missing or broken script makes tshark reject the
    // `trireme` filter and exit 2.)
    let lua = format!(
        "lua_script:{}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/tools/trireme.lua")
    );
    let dissect = |extra: &[&str]| {
        let output = Command::new(tshark)
            .args([
                "-n",
                "-o",
                "udp.try_heuristic_first:TRUE",
                "-X",
                &lua,
                "-r",
                trace,
            ])
            .args(extra)
            .output()
            .expect("tshark runs");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(
            output.status.success(),
            "tshark with the dissector: {stderr}"
        );
        stdout
    };
    let undecoded = dissect(&[
        "-Y",
        "udp && !(trireme && !trireme.malformed && !trireme.dissector_error && !_ws.malformed && !_ws.lua.error)",
    ]);
    assert_eq!(
        undecoded, "",
        "datagrams the dissector did not decode cleanly"
    );
    let messages = dissect(&[
        "-Y",
        "trireme.message",
        "-T",
        "fields",
        "-e",
        "trireme.message",
    ]);
    let named: BTreeSet<&str> = messages.lines().collect();
    for name in names {
        assert!(
            named.contains(name),
            "the dissector named no {name}: {named:?}"
        );
    }
}

#[test]
fn damaged_or_missing_traces_are_refused_naming_the_offset() {
    let env = Env::clean();
    let dir = ScratchDir::new("tracing-damaged");
    let trace = dir.file("viewleader.pcap");
    let vl = util::viewleader_with(&env, &["--trace", &trace]);
    util::query_servers(&env, &vl);
    // A one-exchange client trace: its own request is `sent`, the answer `received`, and the
    // summary has one request with one latency sample (directions come from the file).
    let client_trace = dir.file("client.pcap");
    let vl_addr = vl.addr.to_string();
    let run = util::client(
        &env,
        &[
            "--viewleader",
            &vl_addr,
            "--trace",
            &client_trace,
            "query_servers",
        ],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let lines = dump_json(&[&client_trace]);
    let directions: Vec<&str> = lines
        .iter()
        .map(|l| l["direction"].as_str().unwrap())
        .collect();
    assert_eq!(directions, ["sent", "received"], "{lines:?}");
    let summary = dump_json(&["--summary", &client_trace]);
    let pairs = summary[0]["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 1, "{pairs:?}");
    assert_eq!(pairs[0]["requests"], 1);
    assert_eq!(pairs[0]["retransmissions"], 0);
    assert_eq!(pairs[0]["latency_samples"], 1);
    assert!(
        pairs[0]["duplicates_suppressed"].is_null(),
        "no trace of the view leader given"
    );

    assert_eq!(vl.proc.terminate(), Some(0));
    let bytes = std::fs::read(&trace).unwrap();

    let records = trireme::runtime::trace::read_file(Path::new(&trace))
        .unwrap()
        .records;
    assert!(records.len() >= 2, "{records:?}");

    // Cut in the middle of the last record (a writer killed mid-write): the records before
    // it are shown, with a warning naming the offset.
    let last = records.last().unwrap().offset as usize;
    let cut = dir.file("cut.pcap");
    std::fs::write(&cut, &bytes[..last + 20]).unwrap();
    let run = trace_dump(&[&cut]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!("offset {last}")) && run.stderr.contains("ends inside"),
        "{}",
        run.stderr
    );
    assert_eq!(run.stdout.lines().count(), records.len() - 1);

    // A record header claiming more than any packet: damage, refused.
    let mut bad = bytes.clone();
    let second = records[1].offset as usize;
    bad[second + 8..second + 12].copy_from_slice(&u32::MAX.to_le_bytes());
    let bad_path = dir.file("bad.pcap");
    std::fs::write(&bad_path, &bad).unwrap();
    let run = trace_dump(&[&bad_path]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains(&format!("offset {second}: bad packet record")),
        "{}",
        run.stderr
    );

    // Not a pcap at all; a file that does not exist.
    let text = dir.file("text.pcap");
    std::fs::write(&text, "hello, this is not a capture").unwrap();
    let run = trace_dump(&[&text]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("offset 0: not a pcap file"),
        "{}",
        run.stderr
    );
    let run = trace_dump(&[&dir.file("missing.pcap")]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("missing.pcap"), "{}", run.stderr);

    // Usage errors exit 2.
    assert_eq!(trace_dump(&[]).code, 2);
    assert_eq!(trace_dump(&["--kind", "nonsense", &trace]).code, 2);
    assert_eq!(trace_dump(&["--txid", "xyz", &trace]).code, 2);

    // A trace file that cannot be created: a clear error, exit 1 (JSON from the client).
    let unwritable = dir.file("no-such-dir/trace.pcap");
    let run = util::run_binary(
        util::VIEWLEADER,
        &["--bind", "127.0.0.1:0", "--trace", &unwritable],
        &[],
    );
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("cannot open the trace file"),
        "{}",
        run.stderr
    );
    let (code, json) = util::client_json(&env, &["--trace", &unwritable, "query_servers"]);
    assert_eq!(code, 1);
    assert_eq!(json["kind"], "bad_input", "{json}");
}
