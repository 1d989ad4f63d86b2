//! Shared harness of the cluster tests: real binaries on `127.0.0.1:0`, each process owned
//! by a guard that kills it when dropped, and polling helpers with deadlines.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use trireme::placement::view::{Epoch, Member, View};
use trireme::util::rng::Rng;

/// The fault spec the current test runs under (set per test by the `with_faults!` macro's
/// generated tests through [`Env`]).
#[derive(Clone, Debug, Default)]
pub struct Env {
    /// Value of `TRIREME_FAULTS` for every process started, if any.
    pub faults: Option<String>,
}

impl Env {
    /// No fault injection.
    pub fn clean() -> Env {
        Env { faults: None }
    }

    /// Fault injection with `spec` on every process.
    pub fn faulty(spec: &str) -> Env {
        Env {
            faults: Some(spec.to_owned()),
        }
    }

    /// A command for the binary at `path` with a cleaned environment (plus the fault spec).
    pub fn command(&self, path: &str) -> Command {
        let mut command = Command::new(path);
        command.env_clear();
        if let Ok(path) = std::env::var("PATH") {
            command.env("PATH", path);
        }
        if let Some(faults) = &self.faults {
            command.env("TRIREME_FAULTS", faults);
        }
        command
    }
}

/// Path of the view leader binary.
pub const VIEWLEADER: &str = env!("CARGO_BIN_EXE_viewleader");
/// Path of the server binary.
pub const SERVER: &str = env!("CARGO_BIN_EXE_server");
/// Path of the client binary.
pub const CLIENT: &str = env!("CARGO_BIN_EXE_client");

/// A running program, killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    /// The child process.
    child: Child,
    /// What it wrote on stderr so far (collected by a reader thread).
    stderr: Arc<Mutex<String>>,
    /// The first line it printed on stdout.
    pub first_line: String,
}

impl Proc {
    /// Starts `command`, waits (up to 10 s) for its first stdout line, and collects stderr.
    pub fn start(mut command: Command) -> Proc {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let collected = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&collected);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line.trim_end().to_owned());
            // Keep draining so the child never blocks on a full pipe.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let first_line = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
        Proc {
            child,
            stderr: collected,
            first_line,
        }
    }

    /// Everything the process wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's peak resident memory so far (`VmHWM` in `/proc/PID/status`), in KiB;
    /// `None` if it cannot be read (the process is gone).
    pub fn peak_memory_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP`) to this process only.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    /// Sends SIGTERM and waits (up to 5 s) for the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Proc {
    /// Kills and reaps the process.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A view leader started on an OS-chosen port.
pub struct ViewLeader {
    /// The process.
    pub proc: Proc,
    /// Its address.
    pub addr: SocketAddr,
}

/// A server started on an OS-chosen port.
pub struct Server {
    /// The process.
    pub proc: Proc,
    /// Its address.
    pub addr: SocketAddr,
    /// Its id at start.
    pub id: String,
}

/// Heartbeat interval the tests use (ms).
pub const HEARTBEAT_MS: u64 = 100;
/// `--dead-after-ms` the tests use: well over four heartbeat intervals, so two busy cores
/// never make a live server look dead.
pub const DEAD_AFTER_MS: u64 = 1000;

/// Starts a view leader with the tests' `--dead-after-ms`.
pub fn viewleader(env: &Env) -> ViewLeader {
    viewleader_with(env, &["--dead-after-ms", &DEAD_AFTER_MS.to_string()])
}

/// Starts a view leader with extra flags.
pub fn viewleader_with(env: &Env, extra: &[&str]) -> ViewLeader {
    viewleader_bound(env, "127.0.0.1:0", extra)
}

/// Starts a view leader bound to `bind` (e.g. the address of one that was just stopped, to
/// restart it in place) with extra flags.
pub fn viewleader_bound(env: &Env, bind: &str, extra: &[&str]) -> ViewLeader {
    let mut command = env.command(VIEWLEADER);
    command.args(["--bind", bind]).args(extra);
    let proc = Proc::start(command);
    let addr = proc
        .first_line
        .strip_prefix("listening on ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "view leader said {:?}; stderr: {}",
                proc.first_line,
                proc.stderr()
            )
        });
    ViewLeader { proc, addr }
}

/// Starts a server attached to `vl` with the tests' heartbeat interval.
pub fn server(env: &Env, vl: &ViewLeader) -> Server {
    server_with(env, vl, &[])
}

/// Starts a server attached to `vl` with the tests' heartbeat interval and extra flags.
pub fn server_with(env: &Env, vl: &ViewLeader, extra: &[&str]) -> Server {
    let mut command = env.command(SERVER);
    command.args([
        "--bind",
        "127.0.0.1:0",
        "--viewleader",
        &vl.addr.to_string(),
    ]);
    command.args(["--heartbeat-interval-ms", &HEARTBEAT_MS.to_string()]);
    command.args(extra);
    let proc = Proc::start(command);
    let words: Vec<&str> = proc.first_line.split(' ').collect();
    match words.as_slice() {
        ["listening", "on", addr, "id", id] if id.len() == 32 => Server {
            addr: addr.parse().expect("server address"),
            id: (*id).to_owned(),
            proc,
        },
        _ => panic!(
            "server said {:?}; stderr: {}",
            proc.first_line,
            proc.stderr()
        ),
    }
}

/// The outcome of one client run.
#[derive(Debug)]
pub struct Run {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Parses stdout as the single JSON object `--json` prints.
    pub fn json(&self) -> Value {
        let lines: Vec<&str> = self.stdout.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "expected one JSON line, got {:?} (stderr {:?})",
            self.stdout,
            self.stderr
        );
        serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{e}: {:?}", self.stdout))
    }
}

/// Runs the client with `args` to completion.
pub fn client(env: &Env, args: &[&str]) -> Run {
    let output: Output = env
        .command(CLIENT)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("client runs");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs the client with `args` and `--json`, returning exit code and the object.
pub fn client_json(env: &Env, args: &[&str]) -> (i32, Value) {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let run = client(env, &all);
    let json = run.json();
    (run.code, json)
}

/// A client run in the background, killed if still running when dropped.
pub struct Background {
    /// The child process.
    child: Child,
}

impl Background {
    /// Waits (up to `limit`) for the client to finish and returns its run.
    pub fn finish(mut self, limit: Duration) -> Run {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut stdout = String::new();
                let mut stderr = String::new();
                if let Some(mut out) = self.child.stdout.take() {
                    let _ = out.read_to_string(&mut stdout);
                }
                if let Some(mut err) = self.child.stderr.take() {
                    let _ = err.read_to_string(&mut stderr);
                }
                return Run {
                    code: status.code().unwrap_or(-1),
                    stdout,
                    stderr,
                };
            }
            assert!(
                Instant::now() < deadline,
                "background client still running after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// True while the client is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGINT (Ctrl-C) to the client.
    pub fn interrupt(&self) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
    }
}

impl Drop for Background {
    /// Kills and reaps the client if it is still running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns the client with `args`, stdin closed, stdout and stderr captured. The caller owns
/// the child and must stop it (the guards below do).
pub fn spawn_client(env: &Env, args: &[&str]) -> Child {
    env.command(CLIENT)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("client spawns")
}

/// Starts the client with `args` in the background (output captured).
pub fn client_background(env: &Env, args: &[&str]) -> Background {
    Background {
        child: spawn_client(env, args),
    }
}

/// Polls `condition` every 20 ms until it holds or `limit` passes; returns whether it held.
pub fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The view leader's `query_servers --json` answer. A view leader with no view to show yet
/// (started less than `--dead-after-ms` ago and has heard no server, or gathering the
/// servers that came back) answers `rebalancing`; that is waited out (up to 20 s), any other
/// failure fails the test.
pub fn query_servers(env: &Env, vl: &ViewLeader) -> Value {
    // A generous bound: under 20% loss a 5 s bound fails about once in 10 000 exchanges.
    let vl = vl.addr.to_string();
    let mut answer = (0, Value::Null);
    let shown = wait_until(Duration::from_secs(20), || {
        answer = client_json(
            env,
            &[
                "--viewleader",
                &vl,
                "--timeout-ms",
                "20000",
                "query_servers",
            ],
        );
        answer.0 != 1 || answer.1["kind"] != "rebalancing"
    });
    let (code, json) = answer;
    assert!(shown, "the view leader never showed a view: {json}");
    assert_eq!(code, 0, "query_servers failed: {json}");
    json
}

/// The ids of the servers in the current view.
pub fn server_ids(view: &Value) -> Vec<String> {
    view["servers"]
        .as_array()
        .map(|servers| {
            servers
                .iter()
                .filter_map(|s| s["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (up to 10 s) until the view holds exactly `n` servers; returns the view.
pub fn wait_for_servers(env: &Env, vl: &ViewLeader, n: usize) -> Value {
    let mut last = Value::Null;
    let held = wait_until(Duration::from_secs(10), || {
        last = query_servers(env, vl);
        server_ids(&last).len() == n
    });
    assert!(held, "view never reached {n} servers; last {last}");
    last
}

/// Runs the client with `args`, feeding `input` on standard input.
pub fn client_with_stdin(env: &Env, args: &[&str], input: &[u8]) -> Run {
    use std::io::Write;
    let mut child = env
        .command(CLIENT)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("client spawns");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let output = child.wait_with_output().expect("client runs");
    let _ = writer.join();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs a binary at `path` with `args` (clean environment plus `env_vars`) to completion.
pub fn run_binary(path: &str, args: &[&str], env_vars: &[(&str, &str)]) -> Run {
    let mut command = Env::clean().command(path);
    command.args(args).stdin(Stdio::null());
    for (name, value) in env_vars {
        command.env(name, value);
    }
    let output = command.output().expect("binary runs");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The last epoch a server logged learning ("epoch A -> B"), if any.
pub fn last_learned_epoch(s: &Server) -> Option<u64> {
    s.proc
        .stderr()
        .lines()
        .filter_map(|line| line.split("epoch ").nth(1))
        .filter_map(|rest| {
            let (_, new) = rest.split_once(" -> ")?;
            new.split(':').next()?.trim().parse().ok()
        })
        .next_back()
}

/// `len` bytes drawn from `rng` (the product's seeded generator, so a failing run can be
/// replayed).
pub fn random_bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

/// A member (`{"id","addr"}`) of a JSON answer.
pub fn member_of(json: &Value) -> Member {
    Member {
        id: json["id"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("bad member id in {json}")),
        addr: json["addr"]
            .as_str()
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("bad member addr in {json}")),
    }
}

/// The members of a JSON array of `{"id","addr"}`, in order.
pub fn members_of(json: &Value) -> Vec<Member> {
    json.as_array()
        .unwrap_or_else(|| panic!("not a list of servers: {json}"))
        .iter()
        .map(member_of)
        .collect()
}

/// The library's [`View`] for a `query_servers --json` answer.
pub fn view_of(json: &Value) -> View {
    let number = |field: &str| {
        json[field]
            .as_u64()
            .unwrap_or_else(|| panic!("no {field} in {json}"))
    };
    View {
        epoch: Epoch(number("epoch")),
        members: members_of(&json["servers"]),
        replicas: number("replicas") as u32,
        vnodes: number("vnodes") as u32,
    }
}

/// `n` free loopback UDP addresses (each bound to port 0, read, and released), for processes
/// whose addresses must be known before they start (a view-leader group's `--peers`).
pub fn free_loopback_addrs(n: usize) -> Vec<SocketAddr> {
    let sockets: Vec<std::net::UdpSocket> = (0..n)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").expect("bind"))
        .collect();
    sockets
        .iter()
        .map(|s| s.local_addr().expect("addr"))
        .collect()
}

/// A view-leader group of real `viewleader --peers` processes on loopback, each member owned
/// by its [`Proc`] guard (killed when dropped); the members' data directories, if any, are
/// removed when the group is dropped.
pub struct VlGroup {
    /// The members' processes in `--peers` order (`None` while one is stopped).
    pub members: Vec<Option<Proc>>,
    /// The members' addresses, in `--peers` order.
    pub addrs: Vec<SocketAddr>,
    /// The directory holding one data directory per member, if the group is durable.
    dir: Option<std::path::PathBuf>,
}

impl VlGroup {
    /// Starts a group of `n` members on free loopback ports with the tests'
    /// `--dead-after-ms`, member `i` with the extra flags `flags(i)` and, if `durable`, a
    /// `--data-dir` of its own. Returns once every member printed its address.
    pub fn start(
        env: &Env,
        n: usize,
        durable: bool,
        flags: impl Fn(usize) -> Vec<String>,
    ) -> VlGroup {
        let addrs = free_loopback_addrs(n);
        let dir = durable.then(|| {
            std::env::temp_dir().join(format!(
                "trireme-vlgroup-hostile-{}-{}",
                std::process::id(),
                addrs[0].port()
            ))
        });
        let mut group = VlGroup {
            members: (0..n).map(|_| None).collect(),
            addrs,
            dir,
        };
        for i in 0..n {
            let extra = flags(i);
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            group.start_member(env, i, &extra);
        }
        group
    }

    /// The `--peers` / `--viewleader` list of the group.
    pub fn list(&self) -> String {
        self.addrs
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// (Re)starts member `i` in its place with the extra flags `extra` (and its data
    /// directory, if the group is durable); panics unless it prints its address.
    pub fn start_member(&mut self, env: &Env, i: usize, extra: &[&str]) {
        let mut command = env.command(VIEWLEADER);
        command.args([
            "--bind",
            &self.addrs[i].to_string(),
            "--peers",
            &self.list(),
            "--dead-after-ms",
            &DEAD_AFTER_MS.to_string(),
        ]);
        if let Some(dir) = &self.dir {
            command.arg("--data-dir").arg(dir.join(format!("m{i}")));
        }
        command.args(extra);
        let proc = Proc::start(command);
        assert_eq!(
            proc.first_line,
            format!("listening on {}", self.addrs[i]),
            "member {i}: {}",
            proc.stderr()
        );
        self.members[i] = Some(proc);
    }

    /// Kills member `i` (SIGKILL) and reaps it.
    pub fn kill(&mut self, i: usize) {
        self.members[i].take();
    }

    /// The running process of member `i` (panics if it is stopped).
    pub fn member(&self, i: usize) -> &Proc {
        self.members[i].as_ref().expect("a running member")
    }

    /// The place (in `--peers`) of the leader that `query_servers` through the whole list
    /// names, run with the client flags `flags` (e.g. a cluster key); waits up to 10 s for
    /// an answer naming a running member.
    pub fn leader(&self, env: &Env, flags: &[&str]) -> usize {
        let mut found = None;
        let named = wait_until(Duration::from_secs(10), || {
            found = group_query(env, &self.list(), flags)
                .and_then(|json| leader_of(&json))
                .and_then(|leader| self.addrs.iter().position(|&a| a == leader));
            found.is_some_and(|i| self.members[i].is_some())
        });
        assert!(named, "no running leader named by the group");
        found.expect("a leader")
    }

    /// Every running member's stderr so far, each under a line naming its address (for
    /// failure messages).
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .zip(&self.addrs)
            .filter_map(|(member, addr)| {
                let log = member.as_ref()?.stderr();
                Some(format!("\n--- member {addr}:\n{log}"))
            })
            .collect()
    }

    /// Starts a server given the whole group (`--viewleader A,B,C`) with the tests'
    /// heartbeat interval and the extra flags `extra`.
    pub fn server(&self, env: &Env, extra: &[&str]) -> Server {
        let mut command = env.command(SERVER);
        command.args([
            "--bind",
            "127.0.0.1:0",
            "--viewleader",
            &self.list(),
            "--heartbeat-interval-ms",
            &HEARTBEAT_MS.to_string(),
        ]);
        command.args(extra);
        let proc = Proc::start(command);
        let words: Vec<&str> = proc.first_line.split(' ').collect();
        match words.as_slice() {
            ["listening", "on", addr, "id", id] if id.len() == 32 => Server {
                addr: addr.parse().expect("server address"),
                id: (*id).to_owned(),
                proc,
            },
            _ => panic!("server said {:?}: {}", proc.first_line, proc.stderr()),
        }
    }
}

impl Drop for VlGroup {
    /// Kills the members, then removes the data directories.
    fn drop(&mut self) {
        for member in &mut self.members {
            member.take();
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// `query_servers --json` sent to `viewleader` (one address or a list) with the client
/// flags `flags` and a 3 s bound; the answer if the client exited 0, else `None`.
pub fn group_query(env: &Env, viewleader: &str, flags: &[&str]) -> Option<Value> {
    let mut args: Vec<&str> = flags.to_vec();
    args.extend([
        "--viewleader",
        viewleader,
        "--timeout-ms",
        "3000",
        "query_servers",
    ]);
    let (code, json) = client_json(env, &args);
    (code == 0).then_some(json)
}

/// The leader a `query_servers --json` answer names, if any.
pub fn leader_of(json: &Value) -> Option<SocketAddr> {
    json["leader"].as_str()?.parse().ok()
}

/// Every change of role raft-rs logged in a member's stderr `log` ("became follower at term
/// 3", "became pre-candidate at term 3", "became candidate at term 4", ...), in order, as
/// (role, term).
pub fn raft_role_changes(log: &str) -> Vec<(String, u64)> {
    log.lines()
        .filter_map(|line| line.split_once("] became ")?.1.split_once(" at term "))
        .filter_map(|(role, rest)| {
            let term = rest.split(',').next()?.trim().parse().ok()?;
            Some((role.to_owned(), term))
        })
        .collect()
}

/// An exclusive lock shared by every test process (an OS file lock on a file in the temp
/// directory), held while this guard lives. Tests that load both cores on their own (the
/// floods) take it, so that no two of them overlap, whether as threads of `cargo test` or as
/// the processes nextest runs two at a time: two floods at once starve the programs they
/// flood into failing over.
pub struct ExclusiveLock {
    /// The locked file (closing it releases the lock).
    _file: std::fs::File,
}

impl ExclusiveLock {
    /// Waits for the lock named `name` and takes it.
    pub fn take(name: &str) -> ExclusiveLock {
        let path = std::env::temp_dir().join(format!("trireme-test-{name}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        file.lock()
            .unwrap_or_else(|e| panic!("lock {}: {e}", path.display()));
        ExclusiveLock { _file: file }
    }
}
