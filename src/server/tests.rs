//! Unit tests of the server as a whole: requests in, actions out.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::placement::ring::Ring;
use crate::placement::view::{Epoch, Member, ServerId, View};
use crate::wire::message::{Entry, TxId};

/// A server with a known view leader and a 100 ms heartbeat.
fn server(now: Instant) -> Server {
    let config = ServerConfig {
        advertise: "127.0.0.1:38000".parse().unwrap(),
        viewleader: Some("127.0.0.1:39000".parse().unwrap()),
        heartbeat_interval: Duration::from_millis(100),
        candidates: Vec::new(),
    };
    Server::new(config, Rng::seeded(1), now)
}

/// Sends `request` from a client (not a server of any view) and returns the response.
fn ask(s: &mut Server, request: Request) -> Response {
    ask_from(s, "127.0.0.1:1".parse().unwrap(), request)
}

/// Sends `request` from `from` and returns the response.
fn ask_from(s: &mut Server, from: SocketAddr, request: Request) -> Response {
    let id = IncomingId {
        incarnation: 1,
        request: 1,
    };
    s.handle_request(Instant::now(), from, id, request);
    match s.poll_action() {
        Some(Action::Respond { response, .. }) => response,
        other => panic!("expected a response, got {other:?}"),
    }
}

/// Contract: raw `set` stores, `get` returns the value or `not_found`, and `query_all_keys`
/// lists the bucket's keys sorted.
#[test]
fn raw_set_get_and_query_all_keys() {
    let mut s = server(Instant::now());
    assert_eq!(
        ask(
            &mut s,
            Request::Set {
                key: "b".into(),
                value: "2".into()
            }
        ),
        Response::Done
    );
    assert_eq!(
        ask(
            &mut s,
            Request::Set {
                key: "a".into(),
                value: "1".into()
            }
        ),
        Response::Done
    );
    assert_eq!(
        ask(&mut s, Request::Get { key: "a".into() }),
        Response::Value { value: "1".into() }
    );
    let missing = ask(&mut s, Request::Get { key: "zz".into() });
    assert!(matches!(missing, Response::Error(ref e) if e.kind == ErrorKind::NotFound));
    assert_eq!(
        ask(&mut s, Request::QueryAllKeys),
        Response::Keys {
            keys: vec!["a".into(), "b".into()]
        }
    );
}

/// Contract: a key over 1024 bytes is refused with `bad_input` and nothing is stored.
#[test]
fn oversized_keys_are_refused() {
    let mut s = server(Instant::now());
    let answer = ask(
        &mut s,
        Request::Set {
            key: "k".repeat(2000),
            value: String::new(),
        },
    );
    assert!(matches!(answer, Response::Error(ref e) if e.kind == ErrorKind::BadInput));
    assert!(s.is_empty());
}

/// Assignment 3.4: heartbeats go out at once and then every interval, and the server learns
/// the current epoch from the heartbeat's acknowledgement.
#[test]
fn heartbeats_go_out_every_interval_and_learn_the_epoch() {
    let t0 = Instant::now();
    let mut s = server(t0);
    s.handle_timeout(t0);
    assert!(matches!(
        s.poll_action(),
        Some(Action::Request { token, .. }) if token == Reply::Heartbeat(1).token()
    ));
    assert_eq!(
        s.poll_timeout(),
        Some(t0 + Duration::from_millis(100)),
        "every interval"
    );
    let view = View {
        epoch: Epoch(4),
        members: vec![Member {
            id: s.id(),
            addr: "127.0.0.1:38000".parse().unwrap(),
        }],
        replicas: 3,
        vnodes: 64,
    };
    let completed = View::default();
    s.handle_response(
        t0,
        Reply::Heartbeat(1).token(),
        Ok(Response::HeartbeatAck {
            view,
            completed,
            delivered: Epoch(0),
            leader: None,
            recent: Vec::new(),
        }),
    );
    assert_eq!(s.epoch(), Epoch(4));
    // Nothing to send for the new epoch: the server reports that at once.
    assert_eq!(s.poll_timeout(), Some(t0));
}

/// Contract: a server declared dead rejoins at once under a fresh id and keeps what its
/// bucket held, serving none of it (raw `get`, `query_all_keys`) until reconciled; a late
/// refusal meant for the abandoned id causes no second rejoin.
#[test]
fn a_refused_heartbeat_keeps_the_bucket_as_candidates_and_changes_the_id() {
    let t0 = Instant::now();
    let mut s = server(t0);
    ask(
        &mut s,
        Request::Set {
            key: "k".into(),
            value: "v".into(),
        },
    );
    let old = s.id();
    s.handle_timeout(t0);
    s.poll_action();
    // Heartbeat 2 also went out under the old id before the refusal of 1 arrived.
    s.handle_timeout(t0 + Duration::from_millis(100));
    s.poll_action();
    let refused = || {
        Ok(Response::HeartbeatRefused {
            view: View::default(),
        })
    };
    s.handle_response(t0, Reply::Heartbeat(1).token(), refused());
    assert_ne!(s.id(), old);
    assert_eq!(s.len(), 1, "kept, never wiped");
    assert!(s.bucket().all(|(_, stored)| stored.candidate));
    let Some(Action::Request {
        request: Request::Heartbeat { id, .. },
        ..
    }) = s.poll_action()
    else {
        panic!("expected an immediate heartbeat under the new id");
    };
    assert_eq!(id, s.id());
    // The refusal of heartbeat 2 concerns the abandoned id: no second rejoin.
    let new_id = s.id();
    s.handle_response(t0, Reply::Heartbeat(2).token(), refused());
    assert_eq!(s.id(), new_id);
    let unserved = ask(&mut s, Request::Get { key: "k".into() });
    assert!(matches!(unserved, Response::Error(ref e) if e.kind == ErrorKind::NotFound));
    assert_eq!(
        ask(&mut s, Request::QueryAllKeys),
        Response::Keys { keys: vec![] }
    );
}

/// Issue 14 (keep, never wipe): after rejoining, the candidates go to every replica of
/// their key in the new view, whatever the anchor says; once the epoch is delivered (every
/// copy landed) the candidate of a key this server replicates is served again, with the
/// higher of its own and the received versions.
#[test]
fn candidates_are_sent_to_their_replicas_and_served_once_reconciled() {
    let t0 = Instant::now();
    let (mut s, anchor) = settled_in_a_pair(t0);
    let receive = Request::Transfer {
        epoch: Epoch(2),
        entries: vec![
            Entry {
                key: "old".into(),
                value: "kept".into(),
                version: 5,
                txid: None,
            },
            Entry {
                key: "newer".into(),
                value: "stale".into(),
                version: 5,
                txid: None,
            },
        ],
    };
    let peer: SocketAddr = "127.0.0.1:38001".parse().unwrap();
    assert_eq!(ask_from(&mut s, peer, receive), Response::Done);
    let epoch_before = s.epoch();
    let old_id = s.id();
    s.handle_response(
        t0,
        Reply::Heartbeat(3).token(),
        Ok(Response::HeartbeatRefused {
            view: View::default(),
        }),
    );
    drain(&mut s);
    assert_eq!(s.epoch(), epoch_before, "epochs never go backwards");
    // The new view: the new id and server 1; the anchor still names the old id.
    let view = learn(&mut s, t0, 4, &[1], &anchor, 2);
    assert!(!view.contains(old_id));
    let transfers: Vec<(SocketAddr, Vec<String>)> = drain(&mut s)
        .into_iter()
        .filter_map(|action| match action {
            Action::Request {
                dst,
                request: Request::Transfer { entries, .. },
                ..
            } => Some((dst, entries.into_iter().map(|e| e.key).collect())),
            _ => None,
        })
        .collect();
    assert_eq!(
        transfers,
        vec![(peer, vec!["newer".to_owned(), "old".to_owned()])],
        "both candidates go to the other replica (2 replicas of 2 servers)"
    );
    // Server 1 sends the newer copy of one key; our transfer is acknowledged.
    let newer = Request::Transfer {
        epoch: Epoch(4),
        entries: vec![Entry {
            key: "newer".into(),
            value: "current".into(),
            version: Epoch(3).version_floor() + 1,
            txid: None,
        }],
    };
    assert_eq!(ask_from(&mut s, peer, newer), Response::Done);
    assert_eq!(
        ask(&mut s, Request::QueryAllKeys),
        Response::Keys {
            keys: vec!["newer".into()]
        }
    );
    let token = Reply::Transfer(s.rebalancing.last_transfer).token();
    s.handle_response(t0, token, Ok(Response::Done));
    assert!(
        s.is_rebalancing(),
        "not served before the epoch is delivered"
    );
    learn(&mut s, t0, 4, &[1], &anchor, 4);
    assert!(!s.is_rebalancing());
    assert_eq!(
        ask(&mut s, Request::QueryAllKeys),
        Response::Keys {
            keys: vec!["newer".into(), "old".into()]
        }
    );
    assert_eq!(
        ask(
            &mut s,
            Request::Get {
                key: "newer".into()
            }
        ),
        Response::Value {
            value: "current".into()
        }
    );
    assert!(s.bucket().all(|(_, stored)| !stored.candidate));
}

/// Contract (`--viewleader` default): the server adopts the first candidate in order that
/// answers, only once every earlier candidate has failed.
#[test]
fn discovery_adopts_the_lowest_candidate_that_answers() {
    let t0 = Instant::now();
    let mut config = server(t0).membership.config;
    config.viewleader = None;
    config.candidates = (1..=3)
        .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
        .collect();
    let mut s = Server::new(config, Rng::seeded(2), t0);
    s.handle_timeout(t0);
    let probes: Vec<Action> = std::iter::from_fn(|| s.poll_action()).collect();
    assert_eq!(probes.len(), 3);
    let servers = Response::Servers {
        view: View::default(),
        rebalancing: false,
        pending: vec![],
        group: Vec::new(),
        leader: None,
    };
    s.handle_response(t0, Reply::Probe(2).token(), Ok(servers.clone()));
    s.handle_response(t0, Reply::Probe(1).token(), Ok(servers));
    assert!(
        s.poll_action().is_none(),
        "candidate 0 has not answered yet"
    );
    let peer = SocketAddr::from(([127, 0, 0, 1], 1));
    s.handle_response(
        t0,
        Reply::Probe(0).token(),
        Err(RequestError::Unreachable { peer }),
    );
    let Some(Action::Request { dst, .. }) = s.poll_action() else {
        panic!("no heartbeat")
    };
    assert_eq!(dst.port(), 2);
}

/// A server at `epoch` in a view of itself and `others` (all at 127.0.0.1), learned from
/// a heartbeat acknowledgement whose anchor is `anchor` and delivered epoch `delivered`.
fn learn(
    s: &mut Server,
    now: Instant,
    epoch: u64,
    others: &[u128],
    anchor: &View,
    delivered: u64,
) -> View {
    let mut members = vec![Member {
        id: s.id(),
        addr: "127.0.0.1:38000".parse().unwrap(),
    }];
    members.extend(others.iter().map(|&n| Member {
        id: ServerId(n),
        addr: SocketAddr::from(([127, 0, 0, 1], 38000 + n as u16)),
    }));
    members.sort_by_key(|m| m.id);
    let view = View {
        epoch: Epoch(epoch),
        members,
        replicas: 2,
        vnodes: 8,
    };
    s.handle_response(
        now,
        Reply::Heartbeat(epoch).token(),
        Ok(Response::HeartbeatAck {
            view: view.clone(),
            completed: anchor.clone(),
            delivered: Epoch(delivered),
            leader: None,
            recent: Vec::new(),
        }),
    );
    view
}

/// Delivers `request` as request `n` of a client and returns every action it caused
/// (for requests whose answer may be held back, or comes with other actions).
fn deliver(s: &mut Server, now: Instant, n: u64, request: Request) -> Vec<Action> {
    let id = IncomingId {
        incarnation: 5,
        request: n,
    };
    s.handle_request(now, "127.0.0.1:1".parse().unwrap(), id, request);
    drain(s)
}

/// A server settled at epoch 2 in a view with one other server (anchor and delivered
/// epoch 2, nothing queued); returns it and the view.
fn settled_in_a_pair(now: Instant) -> (Server, View) {
    let mut s = server(now);
    let view = learn(&mut s, now, 2, &[1], &View::default(), 0);
    learn(&mut s, now, 2, &[1], &view, 2);
    drain(&mut s);
    (s, view)
}

/// Every action the server has queued.
fn drain(s: &mut Server) -> Vec<Action> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

/// A prepare of `key` = `value` as transaction `txid` with `participants` at `epoch`.
fn prepare(
    txid: u128,
    key: &str,
    value: &str,
    epoch: u64,
    expected: ServerId,
    participants: Vec<Member>,
) -> Request {
    Request::Prepare {
        txid: TxId(txid),
        key: key.into(),
        value: value.into(),
        epoch: Epoch(epoch),
        expected,
        participants,
        timeout_ms: 5_000,
    }
}

/// A key whose primary in `view` is (or is not) `me`.
fn key_with_primary(view: &View, me: ServerId, is_me: bool) -> (String, Vec<Member>) {
    let ring = Ring::new(view);
    (0..1000)
        .map(|i| format!("k{i}"))
        .map(|k| {
            let replicas = ring.replicas(&k, 2);
            (k, replicas)
        })
        .find(|(_, r)| (r[0].id == me) == is_me)
        .expect("a key")
}

/// Found by the simulator (README "How we test"): a transfer planned for an epoch the
/// receiver has left behind is refused, or its keys could stay where they no longer belong.
#[test]
fn a_transfer_for_an_older_epoch_is_refused() {
    let t0 = Instant::now();
    let mut s = server(t0);
    learn(&mut s, t0, 4, &[1], &View::default(), 0);
    drain(&mut s);
    let entry = |key: &str| Entry {
        key: key.into(),
        value: "v".into(),
        version: 1,
        txid: None,
    };
    let ask = |s: &mut Server, request| ask_from(s, PEER.parse().unwrap(), request);
    let stale = ask(
        &mut s,
        Request::Transfer {
            epoch: Epoch(3),
            entries: vec![entry("old")],
        },
    );
    assert!(
        matches!(stale, Response::Error(ref e) if e.kind == ErrorKind::Rebalancing),
        "{stale:?}"
    );
    assert!(s.bucket().all(|(k, _)| k != "old"));
    let current = ask(
        &mut s,
        Request::Transfer {
            epoch: Epoch(4),
            entries: vec![entry("new")],
        },
    );
    assert_eq!(current, Response::Done);
    assert!(s.bucket().any(|(k, _)| k == "new"));
}

/// Found by the simulator: a transaction prepared under the old view must be decided
/// before the server copies its keys to their new replicas, or its write would reach only
/// the old ones.
#[test]
fn rebalancing_waits_for_undecided_transactions() {
    let t0 = Instant::now();
    let mut s = server(t0);
    let me = s.id();
    let alone = learn(&mut s, t0, 2, &[], &View::default(), 0);
    let alone = learn(&mut s, t0, 2, &[], &alone, 2);
    drain(&mut s);
    assert!(!s.is_rebalancing());
    let single = vec![Member {
        id: me,
        addr: "127.0.0.1:38000".parse().unwrap(),
    }];
    let vote = ask(&mut s, prepare(7, "k", "new", 2, me, single));
    assert_eq!(vote, Response::Prepared { version: None });
    // A server joins: "k" must go to it, but the transaction is undecided.
    learn(&mut s, t0, 3, &[1], &alone, 2);
    let transfers = |actions: &[Action]| {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Request {
                    request: Request::Transfer { entries, .. },
                    ..
                } => Some(entries.clone()),
                _ => None,
            })
            .flatten()
            .collect::<Vec<Entry>>()
    };
    assert!(
        transfers(&drain(&mut s)).is_empty(),
        "no transfer before the decision"
    );
    assert_eq!(
        ask(
            &mut s,
            Request::Commit {
                txid: TxId(7),
                version: 1
            }
        ),
        Response::Done
    );
    let sent = transfers(&drain(&mut s));
    assert_eq!(
        sent,
        vec![Entry {
            key: "k".into(),
            value: "new".into(),
            version: 1,
            txid: Some(TxId(7)),
        }],
        "the committed value goes to the new replica"
    );
}

/// Found by the simulator: the primary holds back reads of a key it committed until the
/// other replicas acknowledged the commit it sends them itself, so no read sees a value
/// that dies with the primary.
#[test]
fn the_primary_holds_reads_until_the_others_have_its_commit() {
    let t0 = Instant::now();
    let (mut s, view) = settled_in_a_pair(t0);
    let me = s.id();
    let (key, participants) = key_with_primary(&view, me, true);
    let vote = ask(&mut s, prepare(9, &key, "new", 2, me, participants.clone()));
    assert_eq!(vote, Response::Prepared { version: None });
    let commit = Request::Commit {
        txid: TxId(9),
        version: 1,
    };
    let actions = deliver(&mut s, t0, 4, commit);
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Respond {
            response: Response::Done,
            ..
        }
    )));
    let settle = actions
        .into_iter()
        .find_map(|a| match a {
            Action::Request {
                token,
                dst,
                request: Request::Commit { txid, version },
                ..
            } => {
                assert_eq!((txid, version), (TxId(9), 1));
                assert_eq!(dst, participants[1].addr);
                Some(token)
            }
            _ => None,
        })
        .expect("the primary sends the commit to the other replica");
    let read = Request::GetR {
        key: key.clone(),
        epoch: Epoch(2),
    };
    assert!(deliver(&mut s, t0, 5, read).is_empty(), "the read waits");
    s.handle_response(t0, settle, Ok(Response::Done));
    let answers = drain(&mut s);
    assert!(
        matches!(&answers[..], [Action::Respond { response: Response::Found { value, version: 1 }, .. }] if value == "new"),
        "{answers:?}"
    );
}

/// Found by the simulator: reads held back for a pending commit are refused, not answered
/// `not_found` from the emptied bucket, when the server learns it was declared dead.
#[test]
fn a_server_declared_dead_refuses_the_reads_it_held_back() {
    let t0 = Instant::now();
    let (mut s, view) = settled_in_a_pair(t0);
    let me = s.id();
    let (key, participants) = key_with_primary(&view, me, false);
    let vote = ask(&mut s, prepare(11, &key, "new", 2, me, participants));
    assert_eq!(vote, Response::Prepared { version: None });
    let read = Request::GetR {
        key,
        epoch: Epoch(2),
    };
    assert!(
        deliver(&mut s, t0, 5, read).is_empty(),
        "the read waits for the decision"
    );
    let id = IncomingId {
        incarnation: 5,
        request: 5,
    };
    s.handle_response(
        t0,
        Reply::Heartbeat(3).token(),
        Ok(Response::HeartbeatRefused { view }),
    );
    let answers = drain(&mut s);
    assert!(
        answers.iter().any(|a| matches!(a, Action::Respond { id: i, response: Response::Error(e) } if *i == id && e.kind == ErrorKind::Rebalancing)),
        "{answers:?}"
    );
}

/// Issue 15 (simulator seed 1584): a read held back behind a pending write is refused with
/// `rebalancing` when the server learns a new view, not answered later from a bucket the
/// new view's rebalancing may have emptied (that answered `absent` for a key other replicas
/// held).
#[test]
fn a_new_view_refuses_the_reads_held_back_in_the_old_one() {
    let t0 = Instant::now();
    let (mut s, view) = settled_in_a_pair(t0);
    let me = s.id();
    let (key, participants) = key_with_primary(&view, me, false);
    let vote = ask(&mut s, prepare(11, &key, "new", 2, me, participants));
    assert_eq!(vote, Response::Prepared { version: None });
    let read = Request::GetR {
        key,
        epoch: Epoch(2),
    };
    assert!(
        deliver(&mut s, t0, 5, read).is_empty(),
        "the read waits for the decision"
    );
    let id = IncomingId {
        incarnation: 5,
        request: 5,
    };
    learn(&mut s, t0, 3, &[1, 2], &view, 2);
    let answers = drain(&mut s);
    assert!(
        answers.iter().any(|a| matches!(a, Action::Respond { id: i, response: Response::Error(e) } if *i == id && e.kind == ErrorKind::Rebalancing && e.message.contains("epoch 2 to 3"))),
        "{answers:?}"
    );
}

/// The address of server 1 in the views [`learn`] builds.
const PEER: &str = "127.0.0.1:38001";

/// Issue 8 (membership): a transfer is accepted only from a server of the receiver's
/// view; from anyone else it is refused (kind `rebalancing`, naming the address and the
/// view), counted, and writes nothing.
#[test]
fn a_transfer_from_a_non_member_is_refused() {
    let t0 = Instant::now();
    let (mut s, _) = settled_in_a_pair(t0);
    let transfer = || Request::Transfer {
        epoch: Epoch(2),
        entries: vec![Entry {
            key: "forged".into(),
            value: "v".into(),
            version: 99,
            txid: None,
        }],
    };
    let refused = ask(&mut s, transfer());
    let Response::Error(e) = refused else {
        panic!("{refused:?}")
    };
    assert_eq!(e.kind, ErrorKind::Rebalancing);
    assert_eq!(e.message, "refused: 127.0.0.1:1 is not a server in view 2");
    assert!(s.is_empty(), "nothing written");
    assert_eq!(s.refusals().not_a_member, 1);
    assert_eq!(
        ask_from(&mut s, PEER.parse().unwrap(), transfer()),
        Response::Done
    );
    assert_eq!(s.len(), 1);
}

/// Issue 8 (membership): a termination query from a non-member is refused and changes
/// nothing: a closing query from it does not make the participant refuse the
/// coordinator's commit, as one from a server of the view does.
#[test]
fn a_termination_query_from_a_non_member_is_refused() {
    let t0 = Instant::now();
    let (mut s, view) = settled_in_a_pair(t0);
    let me = s.id();
    let (key, participants) = key_with_primary(&view, me, false);
    let primary = participants[0].id;
    let vote = ask(&mut s, prepare(21, &key, "v", 2, me, participants.clone()));
    assert_eq!(vote, Response::Prepared { version: None });
    let close = Request::QueryTx {
        txid: TxId(21),
        key: key.clone(),
        expected: me,
        primary,
        close: true,
    };
    let refused = ask(&mut s, close.clone());
    assert!(
        matches!(&refused, Response::Error(e) if e.kind == ErrorKind::Rebalancing
            && e.message.contains("127.0.0.1:1 is not a server in view 2")),
        "{refused:?}"
    );
    assert_eq!(s.refusals().not_a_member, 1);
    let commit = Request::Commit {
        txid: TxId(21),
        version: 3,
    };
    assert_eq!(
        ask(&mut s, commit),
        Response::Done,
        "not closed by a stranger"
    );
    // The same query from the primary (a server of the view) is answered.
    let (mut s, _) = settled_in_a_pair(t0);
    assert_eq!(s.id(), me, "the same seed, the same id");
    ask(&mut s, prepare(21, &key, "v", 2, me, participants));
    let answer = ask_from(&mut s, PEER.parse().unwrap(), close);
    assert_eq!(
        answer,
        Response::TxState {
            state: message::TxOutcome::Prepared
        }
    );
}

/// Issue 8 (membership): a commit for a transaction never prepared here writes nothing,
/// locks nothing, is answered `not_found` and counted; an abort for one is counted too.
#[test]
fn a_commit_for_an_unknown_transaction_changes_nothing() {
    let t0 = Instant::now();
    let (mut s, _) = settled_in_a_pair(t0);
    let answer = ask(
        &mut s,
        Request::Commit {
            txid: TxId(404),
            version: 7,
        },
    );
    let Response::Error(e) = answer else {
        panic!("{answer:?}")
    };
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("not known here"), "{}", e.message);
    assert!(s.is_empty());
    assert_eq!(s.pending_transactions(), 0);
    assert_eq!(s.refusals().unknown_commits, 1);
    assert_eq!(
        ask(&mut s, Request::Abort { txid: TxId(405) }),
        Response::Done
    );
    assert_eq!(s.refusals().unknown_aborts, 1);
    assert_eq!(s.pending_transactions(), 0);
}

/// Issue 8 (bounded resources): a primary passing on [`MAX_SETTLING`] commits to a silent
/// replica votes no on a prepare that would add one more, with the bound named; it still
/// votes yes where it is not the primary.
#[test]
fn a_primary_with_too_many_settling_commits_votes_no() {
    let t0 = Instant::now();
    let (mut s, view) = settled_in_a_pair(t0);
    let me = s.id();
    let ring = Ring::new(&view);
    let mut keys = (0..).map(|i| format!("k{i}")).map(|k| {
        let replicas = ring.replicas(&k, 2);
        (k, replicas)
    });
    let mut primary_keys = keys.by_ref().filter(|(_, r)| r[0].id == me);
    for tx in 0..MAX_SETTLING as u128 {
        let (key, participants) = primary_keys.next().unwrap();
        ask(&mut s, prepare(tx, &key, "v", 2, me, participants));
        let commit = Request::Commit {
            txid: TxId(tx),
            version: 1,
        };
        deliver(&mut s, t0, 10, commit);
    }
    assert_eq!(s.pending_transactions(), 0);
    let (key, participants) = primary_keys.next().unwrap();
    let vote = ask(&mut s, prepare(1 << 50, &key, "v", 2, me, participants));
    assert!(
        matches!(&vote, Response::Error(e) if e.kind == ErrorKind::Aborted
            && e.message.contains("too many commits are settling")),
        "{vote:?}"
    );
    assert_eq!(s.refusals().pending_full, 1);
    let (key, participants) = keys.find(|(_, r)| r[0].id != me).unwrap();
    let vote = ask(&mut s, prepare(1 << 51, &key, "v", 2, me, participants));
    assert_eq!(vote, Response::Prepared { version: None });
}

/// Issue 8 (bounded resources): beyond [`MAX_DEFERRED_READS`] held-back reads, a read of a
/// key with a pending commit is refused at once, counted.
#[test]
fn reads_held_back_are_bounded() {
    let t0 = Instant::now();
    let (mut s, view) = settled_in_a_pair(t0);
    let me = s.id();
    let (key, participants) = key_with_primary(&view, me, false);
    ask(&mut s, prepare(5, &key, "v", 2, me, participants));
    let read = || Request::GetR {
        key: key.clone(),
        epoch: Epoch(2),
    };
    for n in 0..MAX_DEFERRED_READS as u64 {
        assert!(deliver(&mut s, t0, n, read()).is_empty());
    }
    let refused = ask(&mut s, read());
    assert!(
        matches!(&refused, Response::Error(e) if e.kind == ErrorKind::Aborted
            && e.message.contains("at most 10000")),
        "{refused:?}"
    );
    assert_eq!(s.refusals().deferred_full, 1);
}

/// Issue 15 (typed routing): every kind of reply token round-trips through its node
/// token, and a token this server never handed out is none of them.
#[test]
fn reply_tokens_round_trip_and_unknown_ones_are_refused() {
    for reply in [
        Reply::Probe(3),
        Reply::Heartbeat(1 << 40),
        Reply::Transfer(7),
        Reply::Settle(0),
        Reply::Query(12),
    ] {
        assert_eq!(Reply::from_token(reply.token()), Some(reply));
    }
    assert_eq!(Reply::from_token(0), None);
    assert_eq!(Reply::from_token(u64::MAX), None);
}

/// The refusal `response` is of kind `kind` with exactly `message`.
fn assert_refused(response: &Response, kind: ErrorKind, message: &str) {
    assert!(
        matches!(response, Response::Error(e) if e.kind == kind && e.message == message),
        "expected {kind:?} {message:?}, got {response:?}"
    );
}

/// Issue 15 (one place for the prepare checks): the server answers each no vote of the
/// participant as `aborted` with its reason, word for word (a key not settled here yet as
/// `rebalancing`, issue 17); a key over the limit is `bad_input` before any vote.
#[test]
fn prepare_refusals_name_the_reason() {
    let t0 = Instant::now();
    let mut s = server(t0);
    let me = s.id();
    let no_view = ask(&mut s, prepare(1, "k", "v", 0, me, vec![]));
    assert_refused(
        &no_view,
        ErrorKind::Aborted,
        "this replica has not learned a view yet",
    );
    let view = learn(&mut s, t0, 2, &[1], &View::default(), 0);
    drain(&mut s);
    assert!(s.is_rebalancing());
    let (key, participants) = key_with_primary(&view, me, true);
    let busy = ask(&mut s, prepare(2, &key, "v", 2, me, participants.clone()));
    assert_refused(
        &busy,
        ErrorKind::Rebalancing,
        &format!("key {key:?} is not settled at this replica in epoch 2 yet (rebalancing)"),
    );

    let (mut s, _) = settled_in_a_pair(t0);
    let stranger = ServerId(77);
    let wrong_id = ask(
        &mut s,
        prepare(3, &key, "v", 2, stranger, participants.clone()),
    );
    assert_refused(
        &wrong_id,
        ErrorKind::Aborted,
        &format!("server id mismatch: expected {stranger}, this is {me}"),
    );
    // A coordinator behind this replica is judged by the key's replicas (issue 17): the
    // participants are still the replicas, so the vote is yes.
    let behind = ask(&mut s, prepare(7, &key, "v", 1, me, participants.clone()));
    assert!(matches!(behind, Response::Prepared { .. }), "{behind:?}");
    assert_eq!(s.pending_transactions(), 1);
    let _ = ask(&mut s, Request::Abort { txid: TxId(7) });
    let mut reversed = participants.clone();
    reversed.reverse();
    let forged = ask(&mut s, prepare(5, &key, "v", 2, me, reversed));
    assert_refused(
        &forged,
        ErrorKind::Aborted,
        &format!("the participants are not {key:?}'s replicas at epoch 2"),
    );
    let oversized = ask(
        &mut s,
        prepare(6, &"k".repeat(2000), "v", 2, me, participants),
    );
    assert!(
        matches!(&oversized, Response::Error(e) if e.kind == ErrorKind::BadInput),
        "{oversized:?}"
    );
    assert_eq!(s.pending_transactions(), 0);
}

/// A heartbeat acknowledgement carrying `view`, the views `recent` before it, anchor
/// `anchor` and delivered epoch `delivered`.
fn ack_with_recent(view: &View, recent: &[View], anchor: &View, delivered: u64) -> Response {
    Response::HeartbeatAck {
        view: view.clone(),
        completed: anchor.clone(),
        delivered: Epoch(delivered),
        leader: None,
        recent: recent.to_vec(),
    }
}

/// Issue 17 (readiness per key): while the view that added a server rebalances, a key that
/// stayed this server's replica is served (`getr`, `setr`'s prepare) at once; a key it is no
/// longer a replica of is refused with `rebalancing` naming it; and when a view in between
/// is missing, nothing is vouched for until the heartbeat brings the missed view.
#[test]
fn during_a_rebalancing_keys_that_stayed_are_served_and_the_others_refused() {
    let t0 = Instant::now();
    let (mut s, settled) = settled_in_a_pair(t0);
    let me = s.id();
    let grown = |epoch: u64, extra: &[u128]| {
        let mut members = settled.members.clone();
        members.extend(extra.iter().map(|&n| Member {
            id: ServerId(n),
            addr: SocketAddr::from(([127, 0, 0, 1], 38000 + n as u16)),
        }));
        members.sort_by_key(|m| m.id);
        View {
            epoch: Epoch(epoch),
            members,
            ..settled.clone()
        }
    };
    let (three, four) = (grown(3, &[5]), grown(4, &[5, 6]));
    let mine = |view: &View, key: &str| Ring::new(view).replicas(key, 2).iter().any(|m| m.id == me);
    let stayed = (0..1000)
        .map(|i| format!("k{i}"))
        .find(|k| mine(&three, k) && mine(&four, k))
        .expect("a key that stays");
    let left = (0..1000)
        .map(|i| format!("k{i}"))
        .find(|k| !mine(&four, k))
        .expect("a key that leaves");
    let getr = |key: &str, epoch: u64| Request::GetR {
        key: key.into(),
        epoch: Epoch(epoch),
    };
    // Epoch 4 learned with epoch 3 missing: a gap, nothing is vouched for.
    s.handle_response(
        t0,
        Reply::Heartbeat(10).token(),
        Ok(ack_with_recent(&four, &[], &settled, 2)),
    );
    drain(&mut s);
    assert!(s.is_rebalancing());
    assert_refused(
        &ask(&mut s, getr(&stayed, 4)),
        ErrorKind::Rebalancing,
        &format!("key {stayed:?} is not settled at this replica in epoch 4 yet (rebalancing)"),
    );
    // The next answer brings epoch 3 along: the chain 2, 3, 4 is whole.
    s.handle_response(
        t0,
        Reply::Heartbeat(11).token(),
        Ok(ack_with_recent(
            &four,
            std::slice::from_ref(&three),
            &settled,
            2,
        )),
    );
    drain(&mut s);
    assert!(s.is_rebalancing(), "epoch 4 is not finished");
    assert!(matches!(
        ask(&mut s, getr(&stayed, 4)),
        Response::Error(e) if e.kind == ErrorKind::NotFound
    ));
    let participants = Ring::new(&four).replicas(&stayed, 2);
    assert_eq!(
        ask(&mut s, prepare(40, &stayed, "v", 4, me, participants)),
        Response::Prepared { version: None }
    );
    assert_refused(
        &ask(&mut s, getr(&left, 4)),
        ErrorKind::Rebalancing,
        &format!(
            "this server is not a replica of key {left:?} in epoch 4 (the client's view is \
             epoch 4)"
        ),
    );
}

/// Issue 17 (views are pushed): a view the view leader pushes is learned at once, as a
/// heartbeat's answer would be, and starts the rebalancing it calls for; a push from an
/// address that is no view leader this server knows is refused with `bad_input`, counted,
/// and changes nothing.
#[test]
fn a_pushed_view_is_learned_only_from_a_known_view_leader() {
    let t0 = Instant::now();
    let mut s = server(t0);
    let me = s.id();
    let view = View {
        epoch: Epoch(3),
        members: vec![Member {
            id: me,
            addr: "127.0.0.1:38000".parse().unwrap(),
        }],
        replicas: 2,
        vnodes: 8,
    };
    let push = Request::ViewPush {
        view: view.clone(),
        completed: View::default(),
        delivered: Epoch(0),
        recent: Vec::new(),
    };
    let stranger: SocketAddr = "127.0.0.1:4444".parse().unwrap();
    let forged = ask_from(&mut s, stranger, push.clone());
    assert_refused(
        &forged,
        ErrorKind::BadInput,
        "refused: 127.0.0.1:4444 is not a view leader this server knows",
    );
    assert_eq!(s.epoch(), Epoch(0));
    assert_eq!(s.refusals().not_a_member, 1);
    let viewleader: SocketAddr = "127.0.0.1:39000".parse().unwrap();
    assert_eq!(ask_from(&mut s, viewleader, push), Response::Done);
    assert_eq!(s.epoch(), Epoch(3));
    // An older view pushed late changes nothing.
    let late = Request::ViewPush {
        view: View {
            epoch: Epoch(2),
            ..view
        },
        completed: View::default(),
        delivered: Epoch(0),
        recent: Vec::new(),
    };
    assert_eq!(ask_from(&mut s, viewleader, late), Response::Done);
    assert_eq!(s.epoch(), Epoch(3));
    // A newer view that does not name this server's id (meant for an id abandoned since, a
    // late push after a rejoin) is not acted on.
    let stranger_view = View {
        epoch: Epoch(9),
        members: vec![Member {
            id: ServerId(4242),
            addr: "127.0.0.1:38000".parse().unwrap(),
        }],
        ..view
    };
    let other = Request::ViewPush {
        view: stranger_view,
        completed: View::default(),
        delivered: Epoch(9),
        recent: Vec::new(),
    };
    assert_eq!(ask_from(&mut s, viewleader, other), Response::Done);
    assert_eq!(s.epoch(), Epoch(3));
}

/// Issue 17: a `getr` or `prepare` from a client that learned a newer view before this
/// server did is held (and a heartbeat goes out at once), then served as soon as the view
/// arrives; one whose view never comes is refused as `rebalancing` after about a heartbeat
/// interval, naming both epochs.
#[test]
fn a_request_from_a_newer_view_waits_for_that_view() {
    let t0 = Instant::now();
    let (mut s, view) = settled_in_a_pair(t0);
    let me = s.id();
    let (key, participants) = key_with_primary(&view, me, true);
    let actions = deliver(
        &mut s,
        t0,
        1,
        prepare(4, &key, "v", 3, me, participants.clone()),
    );
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Respond { .. })),
        "held: {actions:?}"
    );
    assert!(
        actions.iter().any(|a| matches!(
            a,
            Action::Request {
                request: Request::Heartbeat { .. },
                ..
            }
        )),
        "a heartbeat goes out at once: {actions:?}"
    );
    // The view of epoch 3 (the same servers) arrives: the prepare is voted on.
    let mut newer = view.clone();
    newer.epoch = Epoch(3);
    s.handle_request(
        t0,
        "127.0.0.1:39000".parse().unwrap(),
        IncomingId {
            incarnation: 9,
            request: 1,
        },
        Request::ViewPush {
            view: newer,
            completed: view.clone(),
            delivered: Epoch(2),
            recent: Vec::new(),
        },
    );
    let answered = drain(&mut s);
    assert!(
        answered.iter().any(|a| matches!(
            a,
            Action::Respond {
                id: IncomingId {
                    incarnation: 5,
                    request: 1
                },
                response: Response::Prepared { .. },
            }
        )),
        "{answered:?}"
    );
    // A read from epoch 9, which never comes, is refused after the wait.
    let actions = deliver(
        &mut s,
        t0,
        2,
        Request::GetR {
            key: key.clone(),
            epoch: Epoch(9),
        },
    );
    assert!(!actions.iter().any(|a| matches!(a, Action::Respond { .. })));
    let until = s.poll_timeout().expect("a timer for the held read");
    assert!(until <= t0 + Duration::from_secs(1), "{until:?}");
    s.handle_timeout(t0 + Duration::from_secs(1));
    let refused: Vec<Response> = drain(&mut s)
        .into_iter()
        .filter_map(|a| match a {
            Action::Respond { response, .. } => Some(response),
            _ => None,
        })
        .collect();
    assert_eq!(refused.len(), 1);
    assert_refused(
        &refused[0],
        ErrorKind::Rebalancing,
        "replica at epoch 3, client at 9",
    );
}
