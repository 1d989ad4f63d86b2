//! The Wireshark dissector (`tools/trireme.lua`) against every message variant, the
//! view-leader group's included (`Raft`, `GroupHello`, `Forwarded`, `GroupWelcome`, and the
//! leader and group that `HeartbeatAck` and `Servers` carry), and the view leader's
//! `ViewPush`: a trace written with the
//! product's own codec and trace writer, read by tshark, must decode cleanly and name each
//! message. Real runs cover the common messages (`tracing`); this covers those a run of the
//! programs may not send.

use std::net::SocketAddr;
use std::time::SystemTime;

use trireme::placement::view::{Epoch, Member, ServerId, View};
use trireme::runtime::trace::{self, Direction, Entry};
use trireme::wire::codec::{self, Header, Kind};
use trireme::wire::message::{Entry as KeyEntry, ErrorKind, OpError, Request, Response, TxId};

use crate::tracing::{ScratchDir, check_with_tshark, tshark};

/// A view of one server at epoch 3.
fn view() -> View {
    View {
        epoch: Epoch(3),
        members: vec![Member {
            id: ServerId(1),
            addr: "127.0.0.1:38001".parse().unwrap(),
        }],
        replicas: 3,
        vnodes: 64,
    }
}

/// Group member `n`: 127.0.0.1:3900n.
fn member(n: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 39000 + n))
}

/// One instance of every request variant, in enum order, with its name as the dissector
/// shows it.
fn every_request() -> Vec<(&'static str, Request)> {
    let lock = || ("L".to_owned(), "alice".to_owned());
    vec![
        (
            "Heartbeat",
            Request::Heartbeat {
                id: ServerId(7),
                addr: "127.0.0.1:38000".parse().unwrap(),
                finished: Epoch(2),
                sent: Epoch(2),
                epoch: Epoch(3),
            },
        ),
        ("QueryServers", Request::QueryServers),
        ("LockGet", {
            let (lock, requester) = lock();
            Request::LockGet {
                lock,
                requester,
                claim: 300,
            }
        }),
        ("LockRelease", {
            let (lock, requester) = lock();
            Request::LockRelease {
                lock,
                requester,
                claim: Some(300),
            }
        }),
        ("LockWithdraw", {
            let (lock, requester) = lock();
            Request::LockWithdraw {
                lock,
                requester,
                claim: 300,
            }
        }),
        ("Print", Request::Print { text: "hi".into() }),
        (
            "Set",
            Request::Set {
                key: "k".into(),
                value: "v".into(),
            },
        ),
        ("Get", Request::Get { key: "k".into() }),
        ("QueryAllKeys", Request::QueryAllKeys),
        (
            "Prepare",
            Request::Prepare {
                txid: TxId(9),
                key: "k".into(),
                value: "v".into(),
                epoch: Epoch(3),
                expected: ServerId(1),
                participants: view().members,
                timeout_ms: 5000,
            },
        ),
        (
            "Commit",
            Request::Commit {
                txid: TxId(9),
                version: 4,
            },
        ),
        ("Abort", Request::Abort { txid: TxId(9) }),
        (
            "QueryTx",
            Request::QueryTx {
                txid: TxId(9),
                key: "k".into(),
                expected: ServerId(2),
                primary: ServerId(1),
                close: true,
            },
        ),
        (
            "Transfer",
            Request::Transfer {
                epoch: Epoch(3),
                entries: vec![KeyEntry {
                    key: "k".into(),
                    value: "v".into(),
                    version: 2,
                    txid: Some(TxId(0x5eed)),
                }],
            },
        ),
        (
            "GetR",
            Request::GetR {
                key: "k".into(),
                epoch: Epoch(3),
            },
        ),
        (
            "Raft",
            Request::Raft {
                message: vec![0x08, 0x03, 0x10, 0x01, 0x18, 0x02],
            },
        ),
        (
            "GroupHello",
            Request::GroupHello {
                member: 2,
                incarnation: 0x0123_4567_89ab_cdef,
            },
        ),
        (
            "Forwarded",
            Request::Forwarded {
                origin: "127.0.0.1:38000".parse().unwrap(),
                request: Request::QueryServers.encode().unwrap(),
            },
        ),
        (
            "ViewPush",
            Request::ViewPush {
                view: view(),
                completed: View::default(),
                delivered: Epoch(2),
                recent: vec![view(), view()],
            },
        ),
    ]
}

/// One instance of every response variant, in enum order, with its name; `HeartbeatAck`
/// and `Servers` twice: with and without a leader and group.
fn every_response() -> Vec<(&'static str, Response)> {
    vec![
        (
            "HeartbeatAck",
            Response::HeartbeatAck {
                view: view(),
                completed: View::default(),
                delivered: Epoch(1),
                leader: None,
                recent: Vec::new(),
            },
        ),
        (
            "HeartbeatAck",
            Response::HeartbeatAck {
                view: view(),
                completed: view(),
                delivered: Epoch(3),
                leader: Some(member(2)),
                recent: vec![view(), view()],
            },
        ),
        (
            "HeartbeatRefused",
            Response::HeartbeatRefused { view: view() },
        ),
        (
            "Servers",
            Response::Servers {
                view: view(),
                rebalancing: false,
                pending: Vec::new(),
                leader: None,
                group: Vec::new(),
            },
        ),
        (
            "Servers",
            Response::Servers {
                view: view(),
                rebalancing: true,
                pending: vec![ServerId(1)],
                leader: Some(member(1)),
                group: vec![member(0), member(1), "[::1]:39002".parse().unwrap()],
            },
        ),
        ("LockGranted", Response::LockGranted),
        (
            "LockWaiting",
            Response::LockWaiting {
                holder: "bob".into(),
                position: 2,
            },
        ),
        ("LockReleased", Response::LockReleased),
        ("Done", Response::Done),
        ("Value", Response::Value { value: "v".into() }),
        (
            "Keys",
            Response::Keys {
                keys: vec!["a".into(), "b".into()],
            },
        ),
        (
            "Error",
            Response::Error(OpError {
                kind: ErrorKind::Deadlock,
                message: "cycle".into(),
                cycle: vec!["a".into(), "B".into()],
            }),
        ),
        ("Prepared", Response::Prepared { version: Some(2) }),
        (
            "TxState",
            Response::TxState {
                state: trireme::wire::message::TxOutcome::Committed { version: 3 },
            },
        ),
        (
            "Found",
            Response::Found {
                value: "v".into(),
                version: 7,
            },
        ),
        (
            "GroupWelcome",
            Response::GroupWelcome {
                fresh: true,
                knows_you: false,
            },
        ),
    ]
}

/// One datagram of `kind` carrying `body` whole, as request `id`.
fn datagram(kind: Kind, id: u64, body: &[u8]) -> Vec<u8> {
    let mut header = Header::new(kind, 0x5eed, id, 1);
    header.message_len = u32::try_from(body.len()).unwrap();
    codec::encode_datagram(&header, body)
}

/// Contract (README, the trace tools): the dissector decodes every request and response
/// variant cleanly, the view-leader group's new ones and the leader hints included, and
/// names each; and a bundle of datagrams, each as its own.
#[test]
fn the_dissector_decodes_every_message_variant() {
    let Some(tshark) = tshark() else { return };
    let (a, b): (SocketAddr, SocketAddr) = (member(0), member(1));
    let mut entries = Vec::new();
    let mut names = Vec::new();
    for (id, (name, request)) in (1..).zip(every_request()) {
        let payload = datagram(Kind::Request, id, &request.encode().unwrap());
        entries.push(Entry {
            time: SystemTime::now(),
            direction: Direction::Sent,
            src: a,
            dst: b,
            payload,
        });
        names.push(name);
    }
    for (id, (name, response)) in (1..).zip(every_response()) {
        let payload = datagram(Kind::Response, id, &response.encode().unwrap());
        entries.push(Entry {
            time: SystemTime::now(),
            direction: Direction::Received,
            src: b,
            dst: a,
            payload,
        });
        names.push(name);
    }
    // A bundle (issue 18: datagrams for one peer coalesced) of a request and a response:
    // each decoded as its own subtree.
    let (name, request) = every_request().remove(0);
    let (_, response) = every_response().remove(0);
    let first = datagram(Kind::Request, 1000, &request.encode().unwrap());
    let second = datagram(Kind::Response, 1001, &response.encode().unwrap());
    entries.push(Entry {
        time: SystemTime::now(),
        direction: Direction::Sent,
        src: a,
        dst: b,
        payload: codec::bundle([first.as_slice(), second.as_slice()]),
    });
    names.push(name);
    let dir = ScratchDir::new("dissector-variants");
    let path = dir.file("variants.pcap");
    trace::write_file(std::path::Path::new(&path), &entries).unwrap();
    check_with_tshark(&tshark, &path, &names);
}
