//! The messages the three programs exchange, as serde types.
//!
//! Every request any node can receive is a variant of [`Request`]; every answer is a
//! [`Response`]. They are encoded only through [`crate::wire::codec`], so the trace tool and the
//! tests decode exactly what the programs send. New variants go at the end of each enum, so
//! that older traces keep decoding.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::placement::view::{Epoch, Member, ServerId, View};
use crate::wire::codec::{self, DecodeError, EncodeError};

/// The longest key the store accepts, in bytes (contract: 1..=1024).
pub const MAX_KEY_LEN: usize = 1024;
/// The longest value the store accepts, in bytes (contract: 0..=1 MiB).
pub const MAX_VALUE_LEN: usize = 1 << 20;
/// The longest `print` text accepted, in bytes.
pub const MAX_PRINT_LEN: usize = 64 << 10;
/// The longest lock or requester name accepted, in bytes.
pub const MAX_LOCK_NAME_LEN: usize = 1024;

/// A request, to the view leader or to a server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A server's periodic liveness report to the view leader.
    Heartbeat {
        /// The server's current id.
        id: ServerId,
        /// The address the server is reached at.
        addr: SocketAddr,
        /// The last epoch this server finished rebalancing for (all its sends acknowledged,
        /// all its drops done).
        finished: Epoch,
        /// The last epoch all of whose sends from this server were acknowledged.
        sent: Epoch,
        /// The newest epoch this server has learned (kept across a rejoin): a restarted view
        /// leader publishes no view below the highest it hears, so epochs never go backwards.
        epoch: Epoch,
    },
    /// Asks the view leader for the current view.
    QueryServers,
    /// Asks for a lock (also the renewal of a waiting request).
    LockGet {
        /// The lock's name.
        lock: String,
        /// Who asks.
        requester: String,
        /// The number this `lock_get` picked (its renewals repeat it): the holding or wait
        /// it leads to remembers it, and a release or withdrawal naming another claim leaves
        /// them alone.
        claim: u64,
    },
    /// Releases a held lock.
    LockRelease {
        /// The lock's name.
        lock: String,
        /// Who releases.
        requester: String,
        /// Release only a holding of this claim (None: whatever `requester` holds).
        claim: Option<u64>,
    },
    /// Withdraws a waiting request (and releases the lock if a grant raced the withdrawal).
    LockWithdraw {
        /// The lock's name.
        lock: String,
        /// Who withdraws.
        requester: String,
        /// The claim of the `lock_get` that gives up: only its wait or holding is removed.
        claim: u64,
    },
    /// Asks a server to log a text.
    Print {
        /// The text to log.
        text: String,
    },
    /// A raw local write into one server's bucket.
    Set {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// A raw local read from one server's bucket.
    Get {
        /// The key.
        key: String,
    },
    /// Asks a server for the keys committed in its bucket.
    QueryAllKeys,
    /// Phase one of `setr`: asks a replica to vote on writing `value` under `key`.
    Prepare {
        /// The transaction, chosen at random by the coordinator.
        txid: TxId,
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// The epoch of the view the coordinator computed the replicas from.
        epoch: Epoch,
        /// The id the coordinator expects this replica to have.
        expected: ServerId,
        /// Every replica of the key in ring order; the first is the primary (commit point).
        participants: Vec<Member>,
        /// How long the coordinator may still take to decide, in milliseconds.
        timeout_ms: u32,
    },
    /// Phase two: the decision is commit, with the version the coordinator chose.
    Commit {
        /// The transaction.
        txid: TxId,
        /// The version of the new value (greater than every version the replicas reported).
        version: u64,
    },
    /// Phase two: the decision is abort.
    Abort {
        /// The transaction.
        txid: TxId,
    },
    /// Termination protocol: a participant asks another what became of a transaction.
    QueryTx {
        /// The transaction.
        txid: TxId,
        /// The key it writes (a peer with no record checks the key's last committed
        /// transaction).
        key: String,
        /// The id the asker expects the peer to have (a peer with another id knows nothing).
        expected: ServerId,
        /// The transaction's primary.
        primary: ServerId,
        /// The asker saw the primary leave the view and will abort if nobody committed: a
        /// peer still undecided must from now on refuse a commit from the coordinator (or
        /// relayed by the primary's late answer).
        close: bool,
    },
    /// Rebalancing: a batch of keys a server sends to a new replica of them.
    Transfer {
        /// The epoch the sender is rebalancing for.
        epoch: Epoch,
        /// The keys, with their values and versions.
        entries: Vec<Entry>,
    },
    /// A replicated read of `key` (answered only once no prepared write on it is pending).
    GetR {
        /// The key.
        key: String,
        /// The epoch of the view the client computed the replicas from.
        epoch: Epoch,
    },
    /// A Raft message between members of the view-leader group: one `eraftpb::Message`
    /// encoded by the `raft` crate (protobuf). Accepted only from a group member's address.
    Raft {
        /// The encoded message.
        message: Vec<u8>,
    },
    /// A group member that starts with no Raft state introduces itself to a peer (see
    /// `viewleader::group`): whether it may take part depends on what its peers remember.
    GroupHello {
        /// The sender's place in `--peers` (0-based).
        member: u32,
        /// A random number drawn when the sender's state began (kept in its `--data-dir`).
        incarnation: u64,
    },
    /// A request a group member passes on to the leader: `request` is an encoded
    /// [`Request`] (never itself forwarded) that arrived from `origin`.
    Forwarded {
        /// Where the request came from (a heartbeat must name it).
        origin: SocketAddr,
        /// The encoded request.
        request: Vec<u8>,
    },
    /// The view leader tells a server about a new view (or new rebalancing progress) as soon
    /// as it exists, instead of waiting for the server's next heartbeat; the fields are those
    /// of a heartbeat's acknowledgement ([`Response::HeartbeatAck`]). Accepted only from a
    /// view-leader address the server knows.
    ViewPush {
        /// The current view (its epoch included).
        view: View,
        /// The anchor of every rebalancing plan (see `HeartbeatAck`).
        completed: View,
        /// The last epoch whose sends every server has had acknowledged.
        delivered: Epoch,
        /// The views published before `view` that the server may have missed, oldest first.
        recent: Vec<View>,
    },
}

impl Request {
    /// A short name of the request's kind, for logs and traces.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Heartbeat { .. } => "heartbeat",
            Request::QueryServers => "query_servers",
            Request::LockGet { .. } => "lock_get",
            Request::LockRelease { .. } => "lock_release",
            Request::LockWithdraw { .. } => "lock_withdraw",
            Request::Print { .. } => "print",
            Request::Set { .. } => "set",
            Request::Get { .. } => "get",
            Request::QueryAllKeys => "query_all_keys",
            Request::Prepare { .. } => "prepare",
            Request::Commit { .. } => "commit",
            Request::Abort { .. } => "abort",
            Request::QueryTx { .. } => "query_tx",
            Request::GetR { .. } => "getr",
            Request::Transfer { .. } => "transfer",
            Request::Raft { .. } => "raft",
            Request::GroupHello { .. } => "group_hello",
            Request::Forwarded { .. } => "forwarded",
            Request::ViewPush { .. } => "view_push",
        }
    }

    /// Encodes the request as a message body.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        codec::encode_body(self)
    }

    /// Decodes a message body as a request.
    pub fn decode(bytes: &[u8]) -> Result<Request, DecodeError> {
        codec::decode_body(bytes)
    }
}

/// An answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The heartbeat was accepted; here is the current view.
    HeartbeatAck {
        /// The current view (its epoch included).
        view: View,
        /// The anchor of every rebalancing plan: the newest view all of whose servers had
        /// their sends acknowledged while it was current (named for the completed view it
        /// used to be; see `viewleader::ViewLeader`'s `anchor`).
        completed: View,
        /// The last epoch whose sends every server has had acknowledged: its copies are all
        /// delivered, so copies kept only in case a sender failed may now be dropped.
        delivered: Epoch,
        /// The view-leader group's leader, where heartbeats should go (`None`: the member
        /// that answered, a group of one).
        leader: Option<SocketAddr>,
        /// The views published after the epoch the heartbeat reported and before `view`,
        /// oldest first, as far as the view leader remembers them: with them a server knows
        /// every view it passed through, which tells it which keys stayed its own (see
        /// `server::readiness`).
        recent: Vec<View>,
    },
    /// The heartbeat came from a server already declared dead: it rejoins under a fresh id,
    /// keeping its bucket as unserved candidates until rebalancing reconciles them.
    HeartbeatRefused {
        /// The current view, for the log line.
        view: View,
    },
    /// The current view and its rebalancing status.
    Servers {
        /// The current view.
        view: View,
        /// True from a view change until every server finished rebalancing for it.
        rebalancing: bool,
        /// Servers that have not yet finished the current epoch.
        pending: Vec<ServerId>,
        /// The view-leader group's leader (`None`: the member that answered, a group of one).
        leader: Option<SocketAddr>,
        /// Every member of the view-leader group (empty: a group of one).
        group: Vec<SocketAddr>,
    },
    /// The lock is granted to the requester.
    LockGranted,
    /// The request waits; the requester must renew it until granted.
    LockWaiting {
        /// The current holder.
        holder: String,
        /// Place in the queue (1 = next).
        position: u32,
    },
    /// The lock was released or the request withdrawn.
    LockReleased,
    /// The operation was done; nothing to report.
    Done,
    /// The value of a key.
    Value {
        /// The value.
        value: String,
    },
    /// The keys of a bucket, sorted.
    Keys {
        /// The keys.
        keys: Vec<String>,
    },
    /// The request failed.
    Error(OpError),
    /// A yes vote on a `Prepare`.
    Prepared {
        /// The replica's current version of the key (`None` if it does not hold it).
        version: Option<u64>,
    },
    /// What a participant knows of a transaction (answer to `QueryTx`).
    TxState {
        /// The transaction's state there.
        state: TxOutcome,
    },
    /// A replicated read's answer: the value and its version.
    Found {
        /// The value.
        value: String,
        /// Its version (0 for a raw `set`).
        version: u64,
    },
    /// The answer to a `GroupHello`.
    GroupWelcome {
        /// The answering member has no Raft state either (the group has not started).
        fresh: bool,
        /// The answering member took part in the group with the asker at this very
        /// incarnation (so the asker lost nothing it promised).
        knows_you: bool,
    },
}

/// One key travelling in a rebalancing transfer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value.
    pub value: String,
    /// Its version (the receiver keeps the higher one).
    pub version: u64,
    /// The transaction that wrote it (`None` for a raw `set`), so the receiver can answer a
    /// termination query about it from its bucket.
    pub txid: Option<TxId>,
}

/// A transaction id: 128 random bits, printed as 32 hex characters.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TxId(pub u128);

impl TxId {
    /// Draws a fresh random transaction id from `rng`.
    pub fn random(rng: &mut crate::util::rng::Rng) -> TxId {
        TxId((u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64()))
    }
}

impl fmt::Display for TxId {
    /// Formats the id as 32 lowercase hex characters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for TxId {
    /// Formats the id like `Display`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A transaction's state at one participant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxOutcome {
    /// Voted yes; no decision known yet.
    Prepared,
    /// Committed with this version.
    Committed {
        /// The version written.
        version: u64,
    },
    /// Aborted.
    Aborted,
    /// No information: the peer never saw the transaction (or is not the server the asker
    /// expected). Only the primary turns "never saw it" into `Aborted`.
    Unknown,
}

impl Response {
    /// Encodes the response as a message body.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        codec::encode_body(self)
    }

    /// Decodes a message body as a response.
    pub fn decode(bytes: &[u8]) -> Result<Response, DecodeError> {
        codec::decode_body(bytes)
    }

    /// Decodes a message body as a response; an undecodable one becomes a `bad_input` error
    /// answer, so callers handle it like any refusal.
    pub fn decode_or_error(bytes: &[u8]) -> Response {
        Response::decode(bytes).unwrap_or_else(|e| {
            Response::error(ErrorKind::BadInput, format!("undecodable answer: {e}"))
        })
    }

    /// True for an answer to `QueryServers` that only a view leader gives: a view, or
    /// `rebalancing` while it has no view to show yet (just started, or gathering). Servers
    /// answer `bad_input`. Discovery uses it to tell a view leader from anything else.
    pub fn is_from_viewleader(&self) -> bool {
        match self {
            Response::Servers { .. } => true,
            Response::Error(e) => e.kind == ErrorKind::Rebalancing,
            _ => false,
        }
    }

    /// Builds an error response of `kind` with a human explanation.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response::Error(OpError {
            kind,
            message: message.into(),
            cycle: Vec::new(),
        })
    }
}

/// A failed operation: reported by a peer, or found by the client itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpError {
    /// The contract's error kind.
    pub kind: ErrorKind,
    /// A human explanation.
    pub message: String,
    /// For `deadlock`: requesters and locks in wait order; empty otherwise.
    pub cycle: Vec<String>,
}

/// The contract's error kinds; their `as_str` names are what users and scripts see.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The key is not stored where it was looked for.
    NotFound,
    /// A distributed commit was aborted, or the peer refused the operation.
    Aborted,
    /// The view is rebalancing; replicated operations are refused.
    Rebalancing,
    /// There are no servers in the view.
    NoServers,
    /// No answer within the time bound, or an outcome left unknown.
    Timeout,
    /// The operating system reported the peer unreachable.
    Unreachable,
    /// The input is invalid (too large, malformed, not meant for this node).
    BadInput,
    /// The requester does not hold the lock.
    NotHolder,
    /// Waiting would close a cycle in the wait-for graph.
    Deadlock,
}

impl ErrorKind {
    /// Every kind, in the contract's order (for tallies that list each kind).
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::NotFound,
        ErrorKind::Aborted,
        ErrorKind::Rebalancing,
        ErrorKind::NoServers,
        ErrorKind::Timeout,
        ErrorKind::Unreachable,
        ErrorKind::BadInput,
        ErrorKind::NotHolder,
        ErrorKind::Deadlock,
    ];

    /// The contract's snake_case name of the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::Aborted => "aborted",
            ErrorKind::Rebalancing => "rebalancing",
            ErrorKind::NoServers => "no_servers",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unreachable => "unreachable",
            ErrorKind::BadInput => "bad_input",
            ErrorKind::NotHolder => "not_holder",
            ErrorKind::Deadlock => "deadlock",
        }
    }
}

impl fmt::Display for ErrorKind {
    /// Writes the contract's name of the kind.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks a key against the contract (UTF-8 is given by `&str`; 1..=1024 bytes).
pub fn check_key(key: &str) -> Result<(), OpError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(OpError {
            kind: ErrorKind::BadInput,
            message: format!("a key is 1..={MAX_KEY_LEN} bytes, got {}", key.len()),
            cycle: Vec::new(),
        });
    }
    Ok(())
}

/// Checks a value against the contract (0..=1 MiB bytes).
pub fn check_value(value: &str) -> Result<(), OpError> {
    if value.len() > MAX_VALUE_LEN {
        return Err(OpError {
            kind: ErrorKind::BadInput,
            message: format!(
                "a value is at most {MAX_VALUE_LEN} bytes, got {}",
                value.len()
            ),
            cycle: Vec::new(),
        });
    }
    Ok(())
}

/// Checks a lock or requester name (1..=1024 bytes).
pub fn check_lock_name(what: &str, name: &str) -> Result<(), OpError> {
    if name.is_empty() || name.len() > MAX_LOCK_NAME_LEN {
        return Err(OpError {
            kind: ErrorKind::BadInput,
            message: format!(
                "a {what} is 1..={MAX_LOCK_NAME_LEN} bytes, got {}",
                name.len()
            ),
            cycle: Vec::new(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// One instance of every request variant.
    fn every_request() -> Vec<Request> {
        vec![
            Request::Heartbeat {
                id: ServerId(7),
                addr: "127.0.0.1:38000".parse().unwrap(),
                finished: Epoch(2),
                sent: Epoch(2),
                epoch: Epoch(3),
            },
            Request::Transfer {
                epoch: Epoch(3),
                entries: vec![Entry {
                    key: "k".into(),
                    value: "v".into(),
                    version: 2,
                    txid: None,
                }],
            },
            Request::QueryServers,
            Request::LockGet {
                lock: "L".into(),
                requester: "alice".into(),
                claim: 7,
            },
            Request::LockRelease {
                lock: "L".into(),
                requester: "alice".into(),
                claim: Some(7),
            },
            Request::LockRelease {
                lock: "L".into(),
                requester: "alice".into(),
                claim: None,
            },
            Request::LockWithdraw {
                lock: "L".into(),
                requester: "alice".into(),
                claim: 7,
            },
            Request::Print {
                text: "hello world".into(),
            },
            Request::Set {
                key: "k".into(),
                value: "v".repeat(3000),
            },
            Request::Get { key: "k".into() },
            Request::QueryAllKeys,
            Request::Prepare {
                txid: TxId(9),
                key: "k".into(),
                value: "v".into(),
                epoch: Epoch(3),
                expected: ServerId(1),
                participants: vec![Member {
                    id: ServerId(1),
                    addr: "127.0.0.1:1".parse().unwrap(),
                }],
                timeout_ms: 5000,
            },
            Request::Commit {
                txid: TxId(9),
                version: 4,
            },
            Request::Abort { txid: TxId(9) },
            Request::QueryTx {
                txid: TxId(9),
                key: "k".into(),
                expected: ServerId(2),
                primary: ServerId(1),
                close: true,
            },
            Request::GetR {
                key: "k".into(),
                epoch: Epoch(3),
            },
            Request::ViewPush {
                view: View {
                    epoch: Epoch(4),
                    members: vec![Member {
                        id: ServerId(1),
                        addr: "127.0.0.1:1".parse().unwrap(),
                    }],
                    replicas: 3,
                    vnodes: 64,
                },
                completed: View::default(),
                delivered: Epoch(3),
                recent: vec![View {
                    epoch: Epoch(3),
                    ..View::default()
                }],
            },
        ]
    }

    /// One instance of every response variant.
    fn every_response() -> Vec<Response> {
        let view = View {
            epoch: Epoch(3),
            members: vec![Member {
                id: ServerId(1),
                addr: "127.0.0.1:1".parse().unwrap(),
            }],
            replicas: 3,
            vnodes: 64,
        };
        vec![
            Response::HeartbeatAck {
                view: view.clone(),
                completed: View::default(),
                delivered: Epoch(1),
                leader: None,
                recent: vec![view.clone()],
            },
            Response::HeartbeatRefused { view: view.clone() },
            Response::Servers {
                view,
                rebalancing: true,
                pending: vec![ServerId(1)],
                group: Vec::new(),
                leader: None,
            },
            Response::LockGranted,
            Response::LockWaiting {
                holder: "bob".into(),
                position: 2,
            },
            Response::LockReleased,
            Response::Done,
            Response::Value { value: "v".into() },
            Response::Keys {
                keys: vec!["a".into(), "b".into()],
            },
            Response::Error(OpError {
                kind: ErrorKind::Deadlock,
                message: "cycle".into(),
                cycle: vec!["a".into(), "B".into()],
            }),
            Response::Prepared { version: Some(2) },
            Response::Prepared { version: None },
            Response::TxState {
                state: TxOutcome::Committed { version: 3 },
            },
            Response::TxState {
                state: TxOutcome::Prepared,
            },
            Response::TxState {
                state: TxOutcome::Aborted,
            },
            Response::TxState {
                state: TxOutcome::Unknown,
            },
            Response::Found {
                value: "v".into(),
                version: 7,
            },
        ]
    }

    /// Every `Request` variant encodes and decodes back to an equal value.
    #[test]
    fn every_request_round_trips() {
        for request in every_request() {
            let bytes = request.encode().unwrap();
            assert_eq!(Request::decode(&bytes).unwrap(), request);
        }
    }

    /// Every `Response` variant, a deadlock error with its cycle included, decodes back equal.
    #[test]
    fn every_response_round_trips() {
        for response in every_response() {
            let bytes = response.encode().unwrap();
            assert_eq!(Response::decode(&bytes).unwrap(), response);
        }
    }

    /// Contract: keys are 1..=1024 bytes and values 0..=1 MiB; an empty or longer key and a
    /// longer value are refused.
    #[test]
    fn key_and_value_limits_follow_the_contract() {
        assert!(check_key("").is_err());
        assert!(check_key(&"k".repeat(MAX_KEY_LEN)).is_ok());
        assert!(check_key(&"k".repeat(MAX_KEY_LEN + 1)).is_err());
        assert!(check_value("").is_ok());
        assert!(check_value(&"v".repeat(MAX_VALUE_LEN + 1)).is_err());
    }

    proptest! {
        /// README: decoding never panics on any bytes (up to 300) read as a request or a response.
        #[test]
        fn arbitrary_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Request::decode(&bytes);
            let _ = Response::decode(&bytes);
        }

        /// A `Set` with any printable key (1-40 chars) and value (0-200 chars) round-trips.
        #[test]
        fn set_requests_round_trip(key in "\\PC{1,40}", value in "\\PC{0,200}") {
            let request = Request::Set { key, value };
            prop_assert_eq!(Request::decode(&request.encode().unwrap()).unwrap(), request);
        }
    }
}
