//! Turns the datagrams of several trace files into decoded observations.
//!
//! Each trace file is one process's view: every datagram it sent or received. The files are
//! merged by time. Each datagram's header is decoded with the project's codec; fragments of
//! a request or response are put back together (per observer) so that the message itself can
//! be decoded, and what a request is about (its key, its transaction) is carried over to the
//! response, acknowledgements and probes of the same exchange, so filters keep a whole
//! exchange together.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use trireme::codec::{self, AckBody, Header, Kind};
use trireme::message::{Request, Response, TxOutcome};
use trireme::trace::{self, TraceError};

/// One datagram as one process saw it.
#[derive(Clone, Debug)]
pub struct Observation {
    /// When the observing process sent or received it (since the Unix epoch).
    pub time: Duration,
    /// Which trace file (index into the file list).
    pub file: usize,
    /// Whether the observer sent it (else received it).
    pub sent: bool,
    /// Sender.
    pub src: SocketAddr,
    /// Receiver.
    pub dst: SocketAddr,
    /// Datagram size in bytes (UDP payload).
    pub bytes: usize,
    /// The decoded header, or why the datagram is not a trireme datagram.
    pub header: Result<Header, String>,
    /// For an `Ack`: its body.
    pub ack: Option<AckBody>,
    /// The exchange this datagram belongs to (requester, responder, request id).
    pub exchange: Option<Exchange>,
    /// What the message this datagram carries (or answers, or acknowledges) says, once known.
    pub message: Option<MessageInfo>,
    /// For a Request or Response fragment: whether it completed its message at this observer.
    pub completes: bool,
    /// The datagram itself.
    pub payload: Vec<u8>,
}

/// The identity of one request/response exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Exchange {
    /// Who sent the request.
    pub requester: SocketAddr,
    /// Who answers it.
    pub responder: SocketAddr,
    /// The request id (in the requester's id space).
    pub request_id: u64,
}

/// What a decoded message says, in the terms filters and reports use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageInfo {
    /// The request's name (`Prepare`, `Heartbeat`, ...).
    pub request: Option<&'static str>,
    /// The response's name (`Prepared`, `Found`, ...), on responses.
    pub response: Option<&'static str>,
    /// The key the request is about.
    pub key: Option<String>,
    /// The transaction the request belongs to.
    pub txid: Option<String>,
    /// The epoch the message carries.
    pub epoch: Option<u64>,
    /// Further details worth a glance (value size, version, vote, ...).
    pub detail: String,
    /// Size of the whole message body in bytes.
    pub message_len: usize,
}

/// A trace file that could not be used, with the reason.
pub type LoadError = TraceError;

/// Reads every file and decodes the merged, time-ordered observations. Returns them with
/// each file's own address (the one address every datagram of the file involves).
pub fn load(
    paths: &[impl AsRef<Path>],
) -> Result<(Vec<Observation>, Vec<Option<SocketAddr>>), LoadError> {
    let mut raw = Vec::new();
    let mut owners = Vec::new();
    for (file, path) in paths.iter().enumerate() {
        let trace = trace::read_file(path.as_ref())?;
        owners.push(owner(&trace.records));
        raw.extend(trace.records.into_iter().map(|record| (file, record)));
    }
    // Stable: ties keep file order, then record order.
    raw.sort_by_key(|(file, record)| (record.time, *file));
    let mut observations: Vec<Observation> = raw
        .into_iter()
        .map(|(file, record)| observe(file, owners[file], record))
        .collect();
    annotate(&mut observations);
    Ok((observations, owners))
}

/// The address of the process that wrote a trace: the one in every record (the most
/// frequent endpoint, to be robust to a stray datagram).
fn owner(records: &[trace::Record]) -> Option<SocketAddr> {
    let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
    for record in records {
        *counts.entry(record.src).or_default() += 1;
        *counts.entry(record.dst).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|&(addr, count)| (count, std::cmp::Reverse(addr)))
        .map(|(addr, _)| addr)
}

/// Decodes one record's header (and ack body) as seen by the writer of `file`.
fn observe(file: usize, owner: Option<SocketAddr>, record: trace::Record) -> Observation {
    let decoded = Header::decode(&record.payload).map_err(|e| e.to_string());
    let ack = match &decoded {
        Ok((header, payload)) if header.kind == Kind::Ack => AckBody::decode(payload).ok(),
        _ => None,
    };
    let exchange = decoded
        .as_ref()
        .ok()
        .map(|(header, _)| exchange_of(header, record.src, record.dst));
    Observation {
        time: record.time,
        file,
        sent: owner == Some(record.src),
        src: record.src,
        dst: record.dst,
        bytes: record.payload.len(),
        header: decoded.map(|(header, _)| header),
        ack,
        exchange,
        message: None,
        completes: false,
        payload: record.payload,
    }
}

/// Which exchange a datagram with `header` from `src` to `dst` belongs to.
fn exchange_of(header: &Header, src: SocketAddr, dst: SocketAddr) -> Exchange {
    let from_requester = match header.kind {
        Kind::Request | Kind::Probe => true,
        Kind::Response => false,
        // An ack of response fragments comes from the requester; of request ones, from the
        // responder.
        Kind::Ack => header.flags & codec::FLAG_ACK_RESPONSE != 0,
    };
    let (requester, responder) = if from_requester {
        (src, dst)
    } else {
        (dst, src)
    };
    Exchange {
        requester,
        responder,
        request_id: header.request_id,
    }
}

/// Fragments of one message as one observer received or sent them.
#[derive(Default)]
struct Partial {
    /// Fragment index to payload.
    fragments: BTreeMap<u32, Vec<u8>>,
    /// Set once the message was decoded.
    done: bool,
}

/// Reassembles and decodes messages, then gives every datagram of an exchange what its
/// request (and response) said.
fn annotate(observations: &mut [Observation]) {
    let mut partials: HashMap<(usize, Exchange, bool), Partial> = HashMap::new();
    let mut requests: HashMap<Exchange, MessageInfo> = HashMap::new();
    let mut responses: HashMap<Exchange, MessageInfo> = HashMap::new();
    for observation in observations.iter_mut() {
        let (Ok(header), Some(exchange)) = (&observation.header, observation.exchange) else {
            continue;
        };
        let is_request = match header.kind {
            Kind::Request => true,
            Kind::Response => false,
            _ => continue,
        };
        let partial = partials
            .entry((observation.file, exchange, is_request))
            .or_default();
        if partial.done {
            continue;
        }
        let body = observation
            .payload
            .get(codec::HEADER_LEN..)
            .unwrap_or_default();
        partial.fragments.insert(header.frag_index, body.to_vec());
        if partial.fragments.len() < header.frag_count as usize {
            continue;
        }
        partial.done = true;
        observation.completes = true;
        let message: Vec<u8> = std::mem::take(&mut partial.fragments)
            .into_values()
            .flatten()
            .collect();
        let info = if is_request {
            describe_request(&message)
        } else {
            describe_response(&message)
        };
        let table = if is_request {
            &mut requests
        } else {
            &mut responses
        };
        table.entry(exchange).or_insert(info);
    }
    // Commit, Abort and their answers name only the transaction: give them its key.
    let keys: HashMap<String, String> = requests
        .values()
        .filter_map(|info| Some((info.txid.clone()?, info.key.clone()?)))
        .collect();
    for info in requests.values_mut() {
        if info.key.is_none()
            && let Some(key) = info.txid.as_ref().and_then(|txid| keys.get(txid))
        {
            info.key = Some(key.clone());
        }
    }
    for observation in observations.iter_mut() {
        let Some(exchange) = observation.exchange else {
            continue;
        };
        let mut info = requests.get(&exchange).cloned().unwrap_or_default();
        if let Ok(header) = &observation.header
            && header.kind == Kind::Response
            && let Some(response) = responses.get(&exchange)
        {
            info.response = response.response;
            info.detail = response.detail.clone();
            info.message_len = response.message_len;
            info.epoch = response.epoch.or(info.epoch);
        }
        if info != MessageInfo::default() {
            observation.message = Some(info);
        }
    }
}

/// What a request body says; a body that does not decode says so in `detail`.
fn describe_request(body: &[u8]) -> MessageInfo {
    let mut info = MessageInfo {
        message_len: body.len(),
        ..MessageInfo::default()
    };
    let request = match codec::decode_body::<Request>(body) {
        Ok(request) => request,
        Err(e) => {
            info.detail = format!("undecodable request: {e}");
            return info;
        }
    };
    let (name, detail) = match request {
        Request::Heartbeat {
            id,
            addr,
            finished,
            sent,
        } => (
            "Heartbeat",
            format!("id={id} addr={addr} sent={sent} finished={finished}"),
        ),
        Request::QueryServers => ("QueryServers", String::new()),
        Request::LockGet { lock, requester } => {
            ("LockGet", format!("lock={lock} requester={requester}"))
        }
        Request::LockRelease { lock, requester } => {
            ("LockRelease", format!("lock={lock} requester={requester}"))
        }
        Request::LockWithdraw { lock, requester } => {
            ("LockWithdraw", format!("lock={lock} requester={requester}"))
        }
        Request::Print { text } => ("Print", format!("text={} B", text.len())),
        Request::Set { key, value } => {
            info.key = Some(key);
            ("Set", format!("value={} B", value.len()))
        }
        Request::Get { key } => {
            info.key = Some(key);
            ("Get", String::new())
        }
        Request::QueryAllKeys => ("QueryAllKeys", String::new()),
        Request::Prepare {
            txid,
            key,
            value,
            epoch,
            participants,
            timeout_ms,
            ..
        } => {
            info.key = Some(key);
            info.txid = Some(txid.to_string());
            info.epoch = Some(epoch.0);
            (
                "Prepare",
                format!(
                    "value={} B participants={} timeout={timeout_ms}ms",
                    value.len(),
                    participants.len()
                ),
            )
        }
        Request::Commit { txid, version } => {
            info.txid = Some(txid.to_string());
            ("Commit", format!("version={version}"))
        }
        Request::Abort { txid } => {
            info.txid = Some(txid.to_string());
            ("Abort", String::new())
        }
        Request::QueryTx {
            txid, key, close, ..
        } => {
            info.key = Some(key);
            info.txid = Some(txid.to_string());
            ("QueryTx", format!("close={close}"))
        }
        Request::Transfer { epoch, entries } => {
            info.epoch = Some(epoch.0);
            let bytes: usize = entries.iter().map(|e| e.key.len() + e.value.len()).sum();
            (
                "Transfer",
                format!("entries={} data={bytes} B", entries.len()),
            )
        }
        Request::GetR { key, epoch } => {
            info.key = Some(key);
            info.epoch = Some(epoch.0);
            ("GetR", String::new())
        }
    };
    info.request = Some(name);
    info.detail = detail;
    info
}

/// What a response body says; a body that does not decode says so in `detail`.
fn describe_response(body: &[u8]) -> MessageInfo {
    let mut info = MessageInfo {
        message_len: body.len(),
        ..MessageInfo::default()
    };
    let response = match codec::decode_body::<Response>(body) {
        Ok(response) => response,
        Err(e) => {
            info.detail = format!("undecodable response: {e}");
            return info;
        }
    };
    let (name, detail) = match response {
        Response::HeartbeatAck {
            view,
            completed,
            delivered,
        } => {
            info.epoch = Some(view.epoch.0);
            (
                "HeartbeatAck",
                format!(
                    "servers={} completed={} delivered={delivered}",
                    view.members.len(),
                    completed.epoch
                ),
            )
        }
        Response::HeartbeatRefused { view } => {
            info.epoch = Some(view.epoch.0);
            ("HeartbeatRefused", String::new())
        }
        Response::Servers {
            view,
            rebalancing,
            pending,
        } => {
            info.epoch = Some(view.epoch.0);
            (
                "Servers",
                format!(
                    "servers={} rebalancing={rebalancing} pending={}",
                    view.members.len(),
                    pending.len()
                ),
            )
        }
        Response::LockGranted => ("LockGranted", String::new()),
        Response::LockWaiting { holder, position } => (
            "LockWaiting",
            format!("holder={holder} position={position}"),
        ),
        Response::LockReleased => ("LockReleased", String::new()),
        Response::Done => ("Done", String::new()),
        Response::Value { value } => ("Value", format!("value={} B", value.len())),
        Response::Keys { keys } => ("Keys", format!("keys={}", keys.len())),
        Response::Error(error) => ("Error", format!("{}: {}", error.kind, error.message)),
        Response::Prepared { version } => (
            "Prepared",
            match version {
                Some(v) => format!("vote=yes current-version={v}"),
                None => "vote=yes current-version=none".into(),
            },
        ),
        Response::TxState { state } => (
            "TxState",
            match state {
                TxOutcome::Prepared => "state=prepared".into(),
                TxOutcome::Committed { version } => format!("state=committed version={version}"),
                TxOutcome::Aborted => "state=aborted".into(),
                TxOutcome::Unknown => "state=unknown".into(),
            },
        ),
        Response::Found { value, version } => (
            "Found",
            format!("value={} B version={version}", value.len()),
        ),
    };
    info.response = Some(name);
    info.detail = detail;
    info
}
