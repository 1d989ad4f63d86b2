//! `--viewleader ADDR[,ADDR...]`, `--peers` and `--data-dir` on the real binaries (contract,
//! "Flags" and "View-leader group"): a server and a client given a list whose first address
//! is dead find the live view leader behind it, and everything works through it (`setr`,
//! `getr`, `locate`, locks); `query_servers` names it as the leader and the group. A bad
//! list is a usage error (exit 2) naming the bad part; a `viewleader` with `--peers` and no
//! `--bind` binds the first address of the list it can bind on this host.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use serde_json::{Value, json};

use crate::cluster_test;
use crate::util::{self, Env, Proc, Run, Server, ViewLeader, client_json, server_ids, wait_until};

/// `--timeout-ms` of commands expected to succeed: generous, since the faulty variant loses
/// a fifth of all datagrams.
const LONG_MS: &str = "10000";

/// An address nothing listens on: a loopback port bound and released at once (the OS then
/// answers datagrams to it with "port unreachable").
fn dead_addr() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
}

/// Three addresses of this host cannot bind: picked among documentation addresses (RFC
/// 5737), skipping any this host happens to have.
fn foreign_addrs() -> Vec<String> {
    [
        "192.0.2.1",
        "198.51.100.1",
        "203.0.113.1",
        "198.51.100.2",
        "203.0.113.2",
    ]
    .iter()
    .map(|ip| format!("{ip}:39000"))
    .filter(|addr| UdpSocket::bind(addr.as_str()).is_err())
    .take(3)
    .collect()
}

/// Starts a server with `--viewleader LIST` and the tests' heartbeat interval.
fn server_with_list(env: &Env, list: &str) -> Server {
    let mut command = env.command(util::SERVER);
    command.args(["--bind", "127.0.0.1:0", "--viewleader", list]);
    command.args(["--heartbeat-interval-ms", &util::HEARTBEAT_MS.to_string()]);
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

/// Runs `client --json --viewleader LIST --timeout-ms LONG COMMAND...`.
fn via_list(env: &Env, list: &str, command: &[&str]) -> (i32, Value) {
    let mut args = vec!["--viewleader", list, "--timeout-ms", LONG_MS];
    args.extend_from_slice(command);
    client_json(env, &args)
}

/// Asserts that `answer` succeeded, naming `what` otherwise.
fn assert_ok(answer: &(i32, Value), what: &str) {
    assert_eq!(answer.0, 0, "{what} failed: {}", answer.1);
    assert_eq!(answer.1["ok"], json!(true), "{what}: {}", answer.1);
}

/// Contract (`--viewleader ADDR[,ADDR...]`: any members of the group; the process finds the
/// leader itself): a server and a client given `DEAD,LIVE` skip the dead address; the
/// server joins the view through LIVE, and the client's `query_servers` names LIVE as the
/// leader and the whole group (a view leader without `--peers` is a group of one), and
/// `setr`, `getr`, `locate` and the lock commands work through the list.
fn a_dead_first_address_is_skipped(env: &Env) {
    let vl: ViewLeader = util::viewleader(env);
    let live = vl.addr;
    let list = format!("{},{live}", dead_addr());
    let server = server_with_list(env, &list);

    let mut view = Value::Null;
    let joined = wait_until(Duration::from_secs(20), || {
        let answer = via_list(env, &list, &["query_servers"]);
        view = answer.1;
        answer.0 == 0 && server_ids(&view) == vec![server.id.clone()]
    });
    assert!(
        joined,
        "the server never joined through {list}: {view}; server stderr: {}",
        server.proc.stderr()
    );
    assert_eq!(view["leader"], json!(live.to_string()), "{view}");
    assert_eq!(view["viewleaders"], json!([live.to_string()]), "{view}");

    // Human output names them too.
    let human: Run = util::client(
        env,
        &[
            "--viewleader",
            &list,
            "--timeout-ms",
            LONG_MS,
            "query_servers",
        ],
    );
    assert_eq!(human.code, 0, "{human:?}");
    let first = human.stdout.lines().next().unwrap_or_default();
    assert!(
        first.ends_with(&format!("leader {live} viewleaders {live}")),
        "{first:?}"
    );

    let mut stored = (0, Value::Null);
    // A setr may meet the view still settling (rebalancing) right after the join: --wait.
    let written = wait_until(Duration::from_secs(20), || {
        stored = via_list(env, &list, &["setr", "--wait", "k", "v1"]);
        stored.0 == 0
    });
    assert!(written, "setr through {list}: {}", stored.1);
    let read = via_list(env, &list, &["getr", "--wait", "k"]);
    assert_ok(&read, "getr");
    assert_eq!(read.1["value"], json!("v1"));
    let located = via_list(env, &list, &["locate", "k"]);
    assert_ok(&located, "locate");
    assert_eq!(
        located.1["replicas"][0]["id"],
        json!(server.id),
        "{}",
        located.1
    );
    assert_ok(
        &via_list(env, &list, &["lock_get", "L", "alice"]),
        "lock_get",
    );
    assert_ok(
        &via_list(env, &list, &["lock_release", "L", "alice"]),
        "lock_release",
    );
}

cluster_test!(a_dead_first_address_is_skipped);

/// Runs `path` with `args` and returns the run.
fn run(path: &str, args: &[&str]) -> Run {
    util::run_binary(path, args, &[])
}

/// Contract ("a usage error exits 2"; `--peers` and `--viewleader` lists): a list with a
/// bad element, an empty one, port 0 in `--peers`, or a `--peers` list that is no group (2
/// members, a repeated address) exits 2 with an `error:` line naming the problem, before
/// binding anything.
#[test]
fn bad_lists_are_usage_errors() {
    let cases: [(&str, &[&str], &str); 7] = [
        (
            util::VIEWLEADER,
            &["--peers", "127.0.0.1:39001,nonsense,127.0.0.1:39003"],
            "nonsense",
        ),
        (util::VIEWLEADER, &["--peers", ""], "IP:PORT"),
        (
            util::VIEWLEADER,
            &["--peers", "127.0.0.1:0,127.0.0.1:39001,127.0.0.1:39002"],
            "port 0",
        ),
        (
            util::VIEWLEADER,
            &["--peers", "127.0.0.1:39001,127.0.0.1:39002"],
            "1, 3 or 5",
        ),
        (
            util::VIEWLEADER,
            &["--peers", "127.0.0.1:39001,127.0.0.1:39002,127.0.0.1:39001"],
            "twice",
        ),
        (
            util::SERVER,
            &["--viewleader", "127.0.0.1:39001,127.0.0.1:x"],
            "127.0.0.1:x",
        ),
        (
            util::CLIENT,
            &["--viewleader", "127.0.0.1:39001,,", "query_servers"],
            "IP:PORT",
        ),
    ];
    for (path, args, named) in cases {
        let result = run(path, args);
        assert_eq!(result.code, 2, "{path} {args:?}: {result:?}");
        assert!(
            result.stderr.contains("error:") && result.stderr.contains(named),
            "{path} {args:?} does not name {named:?}: {}",
            result.stderr
        );
        assert_eq!(result.stdout, "", "{path} {args:?}");
    }
}

/// Contract (`--peers`, "its own address among them"): without `--bind`, a member binds the
/// first address of the list it can bind on this host, skipping one of another host; with
/// `--bind` outside the list it is refused (exit 2); when no address of the list can be
/// bound it exits 1 naming each.
#[test]
fn a_member_binds_the_first_address_of_the_list_it_can() {
    let env = Env::clean();
    let foreign = foreign_addrs();
    assert_eq!(
        foreign.len(),
        3,
        "this host has every documentation address"
    );
    let free: Vec<SocketAddr> = {
        let sockets: Vec<UdpSocket> = (0..2)
            .map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind"))
            .collect();
        sockets.iter().map(|s| s.local_addr().unwrap()).collect()
    };
    let list = format!("{},{},{}", foreign[0], free[0], free[1]);
    let mut command = env.command(util::VIEWLEADER);
    command.args(["--peers", &list]);
    let member = Proc::start(command);
    assert_eq!(
        member.first_line,
        format!("listening on {}", free[0]),
        "stderr: {}",
        member.stderr()
    );
    drop(member);

    let outside = run(
        util::VIEWLEADER,
        &["--peers", &list, "--bind", "127.0.0.1:0"],
    );
    assert_eq!(outside.code, 2, "{outside:?}");
    assert!(outside.stderr.contains("not in the list"), "{outside:?}");

    let unbindable = run(util::VIEWLEADER, &["--peers", &foreign.join(",")]);
    assert_eq!(unbindable.code, 1, "{unbindable:?}");
    assert!(
        foreign
            .iter()
            .all(|addr| unbindable.stderr.contains(addr.as_str())),
        "names every address: {}",
        unbindable.stderr
    );
    assert_eq!(unbindable.stdout, "");
}

/// Contract (`--data-dir`; "One `viewleader` without `--peers` is a group of one and behaves
/// as a single view leader"): a group of one with a data directory starts and answers
/// `query_servers`, naming itself as leader and group.
#[test]
fn a_group_of_one_with_a_data_dir_serves() {
    let env = Env::clean();
    let dir = std::env::temp_dir().join(format!("trireme-vl-list-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("data dir");
    let data_dir = dir.to_string_lossy().into_owned();
    let vl = util::viewleader_with(
        &env,
        &[
            "--dead-after-ms",
            &util::DEAD_AFTER_MS.to_string(),
            "--data-dir",
            &data_dir,
        ],
    );
    let view = util::query_servers(&env, &vl);
    assert_eq!(view["leader"], json!(vl.addr.to_string()));
    assert_eq!(view["viewleaders"], json!([vl.addr.to_string()]));
    drop(vl);
    let _ = std::fs::remove_dir_all(&dir);
}
