//! The view-leader group (issue 16) on the real binaries: three `viewleader` processes with
//! `--peers`, servers and clients given every member. Killing the leader costs at most an
//! election; locks and the view survive it; a member restarted with its `--data-dir`
//! resumes its place, one restarted without it is refused and says so.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster_test;
use crate::util::{self, Env, Proc, Server, client_json, server_ids, wait_until};

/// One member of a group under test.
struct Member {
    /// The process, while it runs.
    proc: Option<Proc>,
    /// Its address (fixed: it is in every member's `--peers`).
    addr: SocketAddr,
    /// Its data directory, if it has one.
    data_dir: Option<PathBuf>,
}

/// A group of view leaders and the directory their data lives in (removed on drop).
struct Group {
    /// The members in `--peers` order.
    members: Vec<Member>,
    /// The temporary directory of the data dirs.
    dir: PathBuf,
}

impl Drop for Group {
    /// Stops the members and removes the data directories.
    fn drop(&mut self) {
        for m in &mut self.members {
            m.proc.take();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `n` free loopback UDP addresses (bound to port 0, read, released).
fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let sockets: Vec<UdpSocket> = (0..n)
        .map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind"))
        .collect();
    sockets.iter().map(|s| s.local_addr().unwrap()).collect()
}

impl Group {
    /// Starts a group of `n` members, each with a data dir if `durable`.
    fn start(env: &Env, n: usize, durable: bool) -> Group {
        let addrs = free_addrs(n);
        let dir = std::env::temp_dir().join(format!(
            "trireme-vlgroup-{}-{}",
            std::process::id(),
            addrs[0].port()
        ));
        let members = addrs
            .iter()
            .enumerate()
            .map(|(i, &addr)| Member {
                proc: None,
                addr,
                data_dir: durable.then(|| dir.join(format!("m{i}"))),
            })
            .collect();
        let mut group = Group { members, dir };
        for i in 0..n {
            group.start_member(env, i);
        }
        group
    }

    /// The `--peers` / `--viewleader` list.
    fn list(&self) -> String {
        self.members
            .iter()
            .map(|m| m.addr.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// (Re)starts member `i` with its data dir, if it has one.
    fn start_member(&mut self, env: &Env, i: usize) {
        let list = self.list();
        let member = &mut self.members[i];
        let mut command = env.command(util::VIEWLEADER);
        command.args([
            "--bind",
            &member.addr.to_string(),
            "--peers",
            &list,
            "--dead-after-ms",
            &util::DEAD_AFTER_MS.to_string(),
        ]);
        if let Some(dir) = &member.data_dir {
            command.arg("--data-dir").arg(dir);
        }
        let proc = Proc::start(command);
        assert_eq!(
            proc.first_line,
            format!("listening on {}", member.addr),
            "member {i}: {}",
            proc.stderr()
        );
        member.proc = Some(proc);
    }

    /// Kills member `i` (SIGKILL).
    fn kill(&mut self, i: usize) {
        self.members[i].proc.take();
    }

    /// `query_servers --json` through the whole list; None if it failed.
    fn query(&self, env: &Env) -> Option<Value> {
        let (code, json) = client_json(
            env,
            &[
                "--viewleader",
                &self.list(),
                "--timeout-ms",
                "3000",
                "query_servers",
            ],
        );
        (code == 0).then_some(json)
    }

    /// The place of the current leader, as a member answers (waits up to 10 s).
    fn leader(&self, env: &Env) -> usize {
        let mut found = None;
        let ok = wait_until(Duration::from_secs(10), || {
            found = self.query(env).and_then(|json| {
                let leader: SocketAddr = json["leader"].as_str()?.parse().ok()?;
                self.members.iter().position(|m| m.addr == leader)
            });
            found.is_some_and(|i| self.members[i].proc.is_some())
        });
        assert!(ok, "no leader named by the group");
        found.unwrap()
    }
}

/// Starts a server given every member of `group`.
fn server(env: &Env, group: &Group) -> Server {
    let mut command = env.command(util::SERVER);
    command.args([
        "--bind",
        "127.0.0.1:0",
        "--viewleader",
        &group.list(),
        "--heartbeat-interval-ms",
        &util::HEARTBEAT_MS.to_string(),
    ]);
    let proc = Proc::start(command);
    let words: Vec<&str> = proc.first_line.split(' ').collect();
    match words.as_slice() {
        ["listening", "on", addr, "id", id] => Server {
            addr: addr.parse().expect("server address"),
            id: (*id).to_owned(),
            proc,
        },
        _ => panic!("server said {:?}: {}", proc.first_line, proc.stderr()),
    }
}

/// Waits until the group's view holds `n` servers and is not rebalancing; returns it.
fn wait_for_view(env: &Env, group: &Group, n: usize) -> Value {
    let mut last = None;
    let ok = wait_until(Duration::from_secs(20), || {
        last = group.query(env);
        last.as_ref()
            .is_some_and(|v| server_ids(v).len() == n && v["rebalancing"] == Value::Bool(false))
    });
    assert!(ok, "the view never settled on {n} servers: {last:?}");
    last.unwrap()
}

/// Runs the client against the whole group with `args` and a 3 s bound; (exit code, JSON).
fn client(env: &Env, group: &Group, args: &[&str]) -> (i32, Value) {
    client_within(env, group, 3000, args)
}

/// Runs the client against the whole group with `args` and `--timeout-ms timeout_ms`.
fn client_within(env: &Env, group: &Group, timeout_ms: u64, args: &[&str]) -> (i32, Value) {
    let list = group.list();
    let timeout = timeout_ms.to_string();
    let mut all = vec!["--viewleader", &list, "--timeout-ms", &timeout];
    all.extend_from_slice(args);
    client_json(env, &all)
}

/// Kill the leader of a group of three under a running cluster: a new leader takes over
/// within an election, the view (epoch and servers) and a held lock survive, and `setr` /
/// `getr` work again well within `--dead-after-ms` of the kill (the time is printed).
fn killing_the_leader_costs_one_election(env: &Env) {
    let mut group = Group::start(env, 3, false);
    let _servers: Vec<Server> = (0..3).map(|_| server(env, &group)).collect();
    let before = wait_for_view(env, &group, 3);
    assert_eq!(before["viewleaders"].as_array().map(Vec::len), Some(3));
    let (code, json) = client(env, &group, &["setr", "k", "v1"]);
    assert_eq!(code, 0, "setr before: {json}");
    let (code, json) = client(env, &group, &["lock_get", "L", "alice"]);
    assert_eq!(code, 0, "lock_get: {json}");

    let leader = group.leader(env);
    group.kill(leader);
    let killed = Instant::now();
    let mut n = 0;
    let resumed = wait_until(Duration::from_secs(10), || {
        n += 1;
        client(env, &group, &["setr", "k", &format!("v{n}")]).0 == 0
    });
    let took = killed.elapsed();
    assert!(resumed, "setr never succeeded after the leader was killed");
    eprintln!(
        "leader killed: first successful setr after {} ms",
        took.as_millis()
    );

    let after = wait_for_view(env, &group, 3);
    assert_eq!(
        server_ids(&after).len(),
        3,
        "no server was declared dead by the failover: {after}"
    );
    assert!(
        after["epoch"].as_u64() >= before["epoch"].as_u64(),
        "epochs never go back"
    );
    let new_leader: SocketAddr = after["leader"].as_str().unwrap().parse().unwrap();
    assert_ne!(
        new_leader, group.members[leader].addr,
        "a new leader answers"
    );
    let (code, json) = client(env, &group, &["getr", "k"]);
    assert_eq!(code, 0, "getr after: {json}");
    assert_eq!(json["value"], format!("v{n}"));
    // The lock is still alice's: bob waits (and gives up), alice releases.
    let (code, json) = client_within(env, &group, 500, &["lock_get", "L", "bob"]);
    assert_eq!(code, 1, "bob must not get alice's lock: {json}");
    assert_eq!(json["kind"], "timeout", "bob waited: {json}");
    let (code, json) = client(env, &group, &["lock_release", "L", "alice"]);
    assert_eq!(code, 0, "alice still held L after the failover: {json}");
}
cluster_test!(killing_the_leader_costs_one_election);

/// A member killed and restarted with its `--data-dir` resumes its place: it answers
/// `query_servers` with the group's view, and the group survives the loss of another member.
fn a_member_restarted_with_its_data_dir_resumes(env: &Env) {
    let mut group = Group::start(env, 3, true);
    let _servers: Vec<Server> = (0..2).map(|_| server(env, &group)).collect();
    let before = wait_for_view(env, &group, 2);
    let leader = group.leader(env);
    let follower = (leader + 1) % 3;
    group.kill(follower);
    group.start_member(env, follower);
    // Through the restarted member alone.
    let only = group.members[follower].addr.to_string();
    let mut answer = (1, Value::Null);
    let ok = wait_until(Duration::from_secs(10), || {
        answer = client_json(
            env,
            &[
                "--viewleader",
                &only,
                "--timeout-ms",
                "2000",
                "query_servers",
            ],
        );
        answer.0 == 0 && server_ids(&answer.1).len() == 2
    });
    assert!(
        ok,
        "the restarted member never answered with the view: {:?}",
        answer.1
    );
    assert!(answer.1["epoch"].as_u64() >= before["epoch"].as_u64());
    // It takes part: with the old leader gone, it and the third member still elect one.
    group.kill(leader);
    let (code, json) = (0..50)
        .map(|_| client(env, &group, &["lock_get", "M", "carol"]))
        .find(|(code, _)| *code == 0)
        .unwrap_or((1, Value::Null));
    assert_eq!(code, 0, "no majority after the restart: {json}");
}
cluster_test!(a_member_restarted_with_its_data_dir_resumes);

/// A member killed and restarted without a data dir has forgotten what it promised: it is
/// refused (its log says so) and never takes part, and the group goes on without it.
fn a_member_restarted_without_data_is_refused(env: &Env) {
    let mut group = Group::start(env, 3, false);
    let _server = server(env, &group);
    wait_for_view(env, &group, 1);
    let leader = group.leader(env);
    let follower = (leader + 1) % 3;
    group.kill(follower);
    group.start_member(env, follower);
    let refused = wait_until(Duration::from_secs(10), || {
        group.members[follower]
            .proc
            .as_ref()
            .is_some_and(|p| p.stderr().contains("refused"))
    });
    assert!(
        refused,
        "the restarted member did not say it was refused: {}",
        group.members[follower].proc.as_ref().unwrap().stderr()
    );
    let (code, json) = client(env, &group, &["lock_get", "N", "dave"]);
    assert_eq!(code, 0, "the group goes on with two members: {json}");
}
cluster_test!(a_member_restarted_without_data_is_refused);

/// The leader paused (SIGSTOP) past `--dead-after-ms`: the others elect a new leader within
/// an election and no server is declared dead; resumed, the old leader follows (it sees the
/// newer term) and every member agrees on the view.
fn pausing_the_leader_past_dead_after_costs_one_election(env: &Env) {
    let group = Group::start(env, 3, false);
    let _servers: Vec<Server> = (0..3).map(|_| server(env, &group)).collect();
    let before = wait_for_view(env, &group, 3);
    let leader = group.leader(env);
    let paused = group.members[leader].proc.as_ref().unwrap();
    paused.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    let mut n = 0;
    let resumed = wait_until(Duration::from_secs(10), || {
        n += 1;
        client(env, &group, &["setr", "p", &format!("v{n}")]).0 == 0
    });
    eprintln!(
        "leader paused: first successful setr after {} ms",
        stopped.elapsed().as_millis()
    );
    assert!(resumed, "setr never succeeded with the leader paused");
    // Stay paused past dead-after: the servers heartbeat to the new leader meanwhile.
    let past = Duration::from_millis(util::DEAD_AFTER_MS * 2);
    while stopped.elapsed() < past {
        std::thread::sleep(Duration::from_millis(50));
    }
    let during = wait_for_view(env, &group, 3);
    assert_eq!(
        server_ids(&during),
        server_ids(&before),
        "nobody declared dead"
    );
    group.members[leader]
        .proc
        .as_ref()
        .unwrap()
        .signal(libc::SIGCONT);
    // Every member, asked alone, shows the same servers and an epoch no lower than before.
    for m in &group.members {
        let only = m.addr.to_string();
        let mut answer = (1, Value::Null);
        let ok = wait_until(Duration::from_secs(10), || {
            answer = client_json(
                env,
                &[
                    "--viewleader",
                    &only,
                    "--timeout-ms",
                    "2000",
                    "query_servers",
                ],
            );
            answer.0 == 0 && server_ids(&answer.1) == server_ids(&before)
        });
        let logs: String = group
            .members
            .iter()
            .map(|m| {
                let log = m.proc.as_ref().map(Proc::stderr).unwrap_or_default();
                format!("\n--- member {}:\n{log}", m.addr)
            })
            .collect();
        assert!(
            ok,
            "member {only} (leader before: {}) disagrees after the pause: {:?}; logs:{logs}",
            group.members[leader].addr, answer.1,
        );
        assert!(answer.1["epoch"].as_u64() >= before["epoch"].as_u64());
    }
    let (code, json) = client(env, &group, &["getr", "p"]);
    assert_eq!(code, 0, "getr after the pause: {json}");
    assert_eq!(json["value"], format!("v{n}"));
}
cluster_test!(pausing_the_leader_past_dead_after_costs_one_election);
