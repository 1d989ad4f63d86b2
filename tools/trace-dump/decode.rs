//! Turns the datagrams of several trace files into decoded observations.
//!
//! Each trace file is one process's view: every datagram it sent or received (our traces
//! say which, in their Linux cooked-capture packet type). The files are merged by time.
//! Each datagram's header is decoded with the project's codec; fragments of a request or
//! response are put back together (per observer) so that the message itself can be decoded,
//! and what a request is about (its key, its transaction) is carried over to the response,
//! acknowledgements and probes of the same exchange, so filters keep a whole exchange
//! together. Memory: the files' bytes, plus the fragments of messages being reassembled,
//! bounded by [`MAX_PENDING_BYTES`].

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use trireme::runtime::trace::{self, Direction, TraceError};
use trireme::wire::codec::{self, AckBody, Header, Kind};
use trireme::wire::message::{Request, Response, TxOutcome};

/// The most bytes of unfinished messages kept for reassembly; fragments past it are not
/// kept (their message is shown undecoded), so a flood of fragment starts cannot exhaust
/// memory.
pub const MAX_PENDING_BYTES: usize = 256 << 20;

/// One datagram as one process saw it.
#[derive(Clone, Debug)]
pub struct Observation {
    /// When the observing process sent or received it (since the Unix epoch).
    pub time: Duration,
    /// Which trace file (index into the file list).
    pub file: usize,
    /// Whether the observer sent it (`Some(true)`) or received it; `None` when the file does
    /// not say and its owner cannot be told.
    pub sent: Option<bool>,
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
    /// The exchange this datagram belongs to.
    pub exchange: Option<Exchange>,
    /// What the message this datagram carries (or answers, or acknowledges) says, once known.
    pub message: Option<MessageInfo>,
    /// For a Request or Response fragment: whether it completed its message at this observer.
    pub completes: bool,
    /// The fragment's bytes, until reassembly has taken them.
    payload: Vec<u8>,
}

impl Observation {
    /// The observing process's own address in this datagram, when the direction is known.
    pub fn observer_addr(&self) -> Option<SocketAddr> {
        self.sent.map(|sent| if sent { self.src } else { self.dst })
    }
}

/// The identity of one request/response exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Exchange {
    /// Who sent the request.
    pub requester: SocketAddr,
    /// The requester's incarnation (request ids restart at 1 in every process, so a
    /// restarted process on the same address reuses them).
    pub incarnation: u64,
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

/// What loading found besides the observations.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The merged, time-ordered, decoded datagrams.
    pub observations: Vec<Observation>,
    /// Per file: where it ends inside a record, if it does (its writer was killed).
    pub truncated_at: Vec<Option<u64>>,
    /// Messages left undecoded because the reassembly budget was spent or their fragments
    /// disagreed.
    pub unassembled: usize,
}

/// Reads every file and decodes the merged, time-ordered observations.
pub fn load(paths: &[impl AsRef<Path>]) -> Result<Loaded, TraceError> {
    let mut raw = Vec::new();
    let mut loaded = Loaded::default();
    for (file, path) in paths.iter().enumerate() {
        let trace = trace::read_file(path.as_ref())?;
        loaded.truncated_at.push(trace.truncated_at);
        let owner = owner(&trace.records);
        raw.extend(
            trace
                .records
                .into_iter()
                .map(|record| (file, owner, record)),
        );
    }
    // Stable: ties keep file order, then record order.
    raw.sort_by_key(|(file, _, record)| (record.time, *file));
    let mut incarnations = HashMap::new();
    loaded.observations = raw
        .into_iter()
        .map(|(file, owner, record)| observe(file, owner, record, &mut incarnations))
        .collect();
    loaded.unassembled = annotate(&mut loaded.observations);
    Ok(loaded)
}

/// For a file whose records do not say their direction: the address of the process that
/// wrote it, if one address is in strictly more records than any other.
fn owner(records: &[trace::Record]) -> Option<SocketAddr> {
    if records.iter().all(|r| r.direction.is_some()) {
        return None;
    }
    let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
    for record in records {
        *counts.entry(record.src).or_default() += 1;
        *counts.entry(record.dst).or_default() += 1;
    }
    let mut ranked: Vec<(usize, SocketAddr)> = counts.into_iter().map(|(a, c)| (c, a)).collect();
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    match ranked.as_slice() {
        [(first, addr), (second, _), ..] if first > second => Some(*addr),
        [(_, addr)] => Some(*addr),
        _ => None,
    }
}

/// Decodes one record's header (and ack body) as seen by the writer of `file`. Records
/// come in time order; `incarnations` remembers each requester's latest incarnation, for the
/// datagrams of an exchange that carry the responder's.
fn observe(
    file: usize,
    owner: Option<SocketAddr>,
    record: trace::Record,
    incarnations: &mut HashMap<SocketAddr, u64>,
) -> Observation {
    let decoded = Header::decode(&record.payload).map_err(|e| e.to_string());
    let ack = match &decoded {
        Ok((header, payload)) if header.kind == Kind::Ack => AckBody::decode(payload).ok(),
        _ => None,
    };
    let exchange = decoded
        .as_ref()
        .ok()
        .map(|(header, _)| exchange_of(header, record.src, record.dst, incarnations));
    let sent = match record.direction {
        Some(direction) => Some(direction == Direction::Sent),
        None => owner.map(|owner| owner == record.src),
    };
    Observation {
        time: record.time,
        file,
        sent,
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
fn exchange_of(
    header: &Header,
    src: SocketAddr,
    dst: SocketAddr,
    incarnations: &mut HashMap<SocketAddr, u64>,
) -> Exchange {
    let from_requester = match header.kind {
        Kind::Request | Kind::Probe => true,
        Kind::Response | Kind::Retry => false,
        // An ack of response fragments comes from the requester; of request ones, from the
        // responder.
        Kind::Ack => header.flags & codec::FLAG_ACK_RESPONSE != 0,
    };
    let (requester, responder) = if from_requester {
        (src, dst)
    } else {
        (dst, src)
    };
    let incarnation = if from_requester {
        incarnations.insert(requester, header.incarnation);
        header.incarnation
    } else {
        incarnations.get(&requester).copied().unwrap_or_default()
    };
    Exchange {
        requester,
        incarnation,
        responder,
        request_id: header.request_id,
    }
}

/// Fragments of one message as one observer received or sent them.
#[derive(Default)]
struct Partial {
    /// Fragment index to payload.
    fragments: BTreeMap<u32, Vec<u8>>,
    /// The message length and fragment count every fragment must agree on.
    shape: Option<(u32, u32)>,
    /// Bytes held.
    bytes: usize,
    /// Set once the message was decoded, or given up.
    done: bool,
}

/// Reassembles and decodes messages, then gives every datagram of an exchange what its
/// request (and response) said. Returns how many messages could not be reassembled.
fn annotate(observations: &mut [Observation]) -> usize {
    let mut partials: HashMap<(usize, Exchange, bool), Partial> = HashMap::new();
    let mut requests: HashMap<Exchange, MessageInfo> = HashMap::new();
    let mut responses: HashMap<Exchange, MessageInfo> = HashMap::new();
    let mut pending_bytes = 0usize;
    let mut unassembled = 0usize;
    for observation in observations.iter_mut() {
        let payload = std::mem::take(&mut observation.payload);
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
        let body = payload.get(header.encoded_len()..).unwrap_or_default();
        let body = codec::strip_padding(header, body).unwrap_or(body);
        let shape = (header.message_len, header.frag_count);
        let expected = codec::fragment_range(
            header.message_len as usize,
            header.frag_count,
            header.frag_index,
        );
        let fits = *partial.shape.get_or_insert(shape) == shape && body.len() == expected.len();
        if fits && partial.fragments.contains_key(&header.frag_index) {
            continue;
        }
        if !fits || pending_bytes + body.len() > MAX_PENDING_BYTES {
            // Fragments that disagree, or no room left: give this message up.
            pending_bytes -= partial.bytes;
            *partial = Partial {
                done: true,
                ..Partial::default()
            };
            unassembled += 1;
            continue;
        }
        partial.bytes += body.len();
        pending_bytes += body.len();
        partial.fragments.insert(header.frag_index, body.to_vec());
        if partial.fragments.len() < header.frag_count as usize {
            continue;
        }
        pending_bytes -= partial.bytes;
        partial.done = true;
        partial.bytes = 0;
        observation.completes = true;
        let message: Vec<u8> = std::mem::take(&mut partial.fragments)
            .into_values()
            .flatten()
            .collect();
        let (table, info) = if is_request {
            (&mut requests, describe_request(&message))
        } else {
            (&mut responses, describe_response(&message))
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
    unassembled
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
            epoch,
        } => (
            "Heartbeat",
            format!("id={id} addr={addr} epoch={epoch} sent={sent} finished={finished}"),
        ),
        Request::QueryServers => ("QueryServers", String::new()),
        Request::LockGet {
            lock,
            requester,
            claim,
        } => (
            "LockGet",
            format!("lock={lock} requester={requester} claim={claim}"),
        ),
        Request::LockRelease {
            lock,
            requester,
            claim,
        } => {
            let claim = claim.map_or_else(|| "any".to_owned(), |c| c.to_string());
            (
                "LockRelease",
                format!("lock={lock} requester={requester} claim={claim}"),
            )
        }
        Request::LockWithdraw {
            lock,
            requester,
            claim,
        } => (
            "LockWithdraw",
            format!("lock={lock} requester={requester} claim={claim}"),
        ),
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
        Request::Raft { message } => ("Raft", describe_raft(&message)),
        Request::GroupHello {
            member,
            incarnation,
        } => (
            "GroupHello",
            format!("member={member} incarnation={incarnation:016x}"),
        ),
        Request::Forwarded { origin, request } => {
            let inner = describe_request(&request);
            let name = inner.request.unwrap_or("undecodable");
            (
                "Forwarded",
                format!("origin={origin} request={name} {}", inner.detail),
            )
        }
        Request::ViewPush {
            view,
            completed,
            delivered,
            recent,
        } => {
            info.epoch = Some(view.epoch.0);
            let recent: Vec<String> = recent.iter().map(|v| v.epoch.to_string()).collect();
            (
                "ViewPush",
                format!(
                    "servers={} completed={} delivered={delivered} recent=[{}]",
                    view.members.len(),
                    completed.epoch,
                    recent.join(",")
                ),
            )
        }
    };
    info.request = Some(name);
    info.detail = detail;
    info
}

/// One line for a Raft message of the view-leader group: its type, sender, receiver, term,
/// log position, commit index and entry count.
fn describe_raft(bytes: &[u8]) -> String {
    match codec::decode_raft(bytes) {
        Ok(m) => format!(
            "{:?} from={} to={} term={} index={} log_term={} commit={} entries={}",
            m.get_msg_type(),
            m.from,
            m.to,
            m.term,
            m.index,
            m.log_term,
            m.commit,
            m.entries.len()
        ),
        Err(e) => format!("undecodable raft message: {e}"),
    }
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
            leader: _,
            recent,
        } => {
            info.epoch = Some(view.epoch.0);
            let recent: Vec<String> = recent.iter().map(|v| v.epoch.to_string()).collect();
            (
                "HeartbeatAck",
                format!(
                    "servers={} completed={} delivered={delivered} recent=[{}]",
                    view.members.len(),
                    completed.epoch,
                    recent.join(",")
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
            leader: _,
            group: _,
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
        Response::GroupWelcome { fresh, knows_you } => (
            "GroupWelcome",
            format!("fresh={fresh} knows_you={knows_you}"),
        ),
    };
    info.response = Some(name);
    info.detail = detail;
    info
}
