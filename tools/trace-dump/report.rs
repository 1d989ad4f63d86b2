//! What trace-dump prints: one line per datagram, a per-pair summary, or one transaction's
//! messages in order; each as text for people or JSON lines for scripts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use trireme::wire::codec::Kind;

use crate::decode::{Exchange, MessageInfo, Observation};

/// Which datagrams to show (all given conditions must hold).
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Sent to or by this address.
    pub peer: Option<SocketAddr>,
    /// Of this header kind or message name (lower case).
    pub kind: Option<String>,
    /// About this key.
    pub key: Option<String>,
    /// Of a transaction whose id starts with this (lower-case hex).
    pub txid: Option<String>,
    /// `kind` names the request of the exchange (so a summary keeps whole exchanges: a
    /// Prepare's responses and acks too) rather than each datagram's own message.
    pub whole_exchanges: bool,
}

impl Filter {
    /// Whether `observation` passes every condition.
    pub fn matches(&self, observation: &Observation) -> bool {
        let info = observation.message.as_ref();
        if let Some(peer) = self.peer
            && observation.src != peer
            && observation.dst != peer
        {
            return false;
        }
        if let Some(kind) = &self.kind {
            let named = if self.whole_exchanges {
                info.and_then(|i| i.request).unwrap_or_default()
            } else {
                label(observation)
            };
            if !named.eq_ignore_ascii_case(kind)
                && !header_kind(observation).eq_ignore_ascii_case(kind)
            {
                return false;
            }
        }
        if let Some(key) = &self.key
            && info.and_then(|i| i.key.as_deref()) != Some(key.as_str())
        {
            return false;
        }
        if let Some(txid) = &self.txid
            && !info
                .and_then(|i| i.txid.as_deref())
                .is_some_and(|t| t.starts_with(txid.as_str()))
        {
            return false;
        }
        true
    }
}

/// The header kind of an observation in lower case (`request`, ..., `garbage`).
fn header_kind(observation: &Observation) -> &'static str {
    match &observation.header {
        Ok(header) => match header.kind {
            Kind::Request => "request",
            Kind::Response => "response",
            Kind::Ack => "ack",
            Kind::Probe => "probe",
            Kind::Retry => "retry",
        },
        Err(_) => "garbage",
    }
}

/// The most specific name of what a datagram carries: the message name for requests and
/// responses whose message decoded, else the header kind.
fn label(observation: &Observation) -> &'static str {
    let info = observation.message.as_ref();
    match observation.header.as_ref().map(|h| h.kind) {
        Ok(Kind::Request) => info.and_then(|i| i.request).unwrap_or("request"),
        Ok(Kind::Response) => info.and_then(|i| i.response).unwrap_or("response"),
        _ => header_kind(observation),
    }
}

/// Every message name `--kind` accepts besides the header kinds.
pub const MESSAGE_NAMES: &[&str] = &[
    "Heartbeat",
    "QueryServers",
    "LockGet",
    "LockRelease",
    "LockWithdraw",
    "Print",
    "Set",
    "Get",
    "QueryAllKeys",
    "Prepare",
    "Commit",
    "Abort",
    "QueryTx",
    "Transfer",
    "GetR",
    "ViewPush",
    "HeartbeatAck",
    "HeartbeatRefused",
    "Servers",
    "LockGranted",
    "LockWaiting",
    "LockReleased",
    "Done",
    "Value",
    "Keys",
    "Error",
    "Prepared",
    "TxState",
    "Found",
];

/// Names for the trace files in output: the file stem, made unique.
pub fn observer_names(paths: &[std::path::PathBuf]) -> Vec<String> {
    let stems: Vec<String> = paths
        .iter()
        .map(|p| {
            p.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| p.display().to_string())
        })
        .collect();
    stems
        .iter()
        .enumerate()
        .map(|(i, stem)| {
            if stems.iter().filter(|s| *s == stem).count() > 1 {
                format!("{stem}#{}", i + 1)
            } else {
                stem.clone()
            }
        })
        .collect()
}

/// Seconds since `start`, as `+S.UUUUUU`.
fn relative(time: Duration, start: Duration) -> String {
    let d = time.saturating_sub(start);
    format!("+{}.{:06}", d.as_secs(), d.subsec_micros())
}

/// The message part of a datagram line: name, key, txid, epoch and details.
fn describe(observation: &Observation) -> String {
    let Ok(header) = &observation.header else {
        return String::new();
    };
    let Some(info) = &observation.message else {
        return match header.kind {
            Kind::Request | Kind::Response if header.frag_count > 1 => {
                "(message incomplete)".into()
            }
            _ => String::new(),
        };
    };
    let mut parts = Vec::new();
    let about = |parts: &mut Vec<String>, info: &MessageInfo| {
        if let Some(key) = &info.key {
            parts.push(format!("key={key}"));
        }
        if let Some(txid) = &info.txid {
            parts.push(format!("txid={txid}"));
        }
    };
    match header.kind {
        Kind::Request => {
            parts.push(info.request.unwrap_or("?").to_string());
            about(&mut parts, info);
            if let Some(epoch) = info.epoch {
                parts.push(format!("epoch={epoch}"));
            }
            if !info.detail.is_empty() {
                parts.push(info.detail.clone());
            }
        }
        Kind::Response => {
            parts.push(info.response.unwrap_or("?").to_string());
            if !info.detail.is_empty() {
                parts.push(info.detail.clone());
            }
            if let Some(request) = info.request {
                parts.push(format!("(re {request}"));
                about(&mut parts, info);
                if let Some(last) = parts.last_mut() {
                    last.push(')');
                }
            }
        }
        Kind::Ack | Kind::Probe | Kind::Retry => {
            if let Some(request) = info.request {
                parts.push(format!("(re {request}"));
                about(&mut parts, info);
                if let Some(last) = parts.last_mut() {
                    last.push(')');
                }
            }
        }
    }
    parts.join(" ")
}

/// One text line for `observation`.
pub fn line(observation: &Observation, names: &[String], start: Duration) -> String {
    let who = &names[observation.file];
    let dir = match observation.sent {
        Some(true) => "sent",
        Some(false) => "recv",
        None => "seen",
    };
    let mut text = format!(
        "{} {who} {dir} {} > {} ",
        relative(observation.time, start),
        observation.src,
        observation.dst
    );
    match &observation.header {
        Err(e) => text.push_str(&format!("not trireme ({} B): {e}", observation.bytes)),
        Ok(header) => {
            text.push_str(&format!(
                "{:<8} id={} tx={}",
                header_kind(observation),
                header.request_id,
                header.transmission
            ));
            if header.echo != 0 {
                text.push_str(&format!(" echo={}", header.echo));
            }
            match header.kind {
                Kind::Request | Kind::Response => text.push_str(&format!(
                    " frag={}/{} {} B of {}",
                    header.frag_index + 1,
                    header.frag_count,
                    observation.bytes,
                    header.message_len
                )),
                Kind::Ack => {
                    text.push_str(&format!(" {} B", observation.bytes));
                    if let Some(ack) = &observation.ack {
                        let ranges: Vec<String> = ack
                            .ranges
                            .iter()
                            .map(|(a, b)| format!("{a}..{b}"))
                            .collect();
                        text.push_str(&format!(" ranges=[{}]", ranges.join(",")));
                        if ack.complete {
                            text.push_str(" complete");
                        }
                        if ack.unknown {
                            text.push_str(" unknown");
                        }
                    }
                }
                Kind::Probe | Kind::Retry => text.push_str(&format!(" {} B", observation.bytes)),
            }
            let message = describe(observation);
            if !message.is_empty() {
                text.push_str("  ");
                text.push_str(&message);
            }
        }
    }
    text
}

/// One JSON object for `observation`.
pub fn line_json(observation: &Observation, names: &[String]) -> Value {
    let mut object = json!({
        "time_ns": observation.time.as_nanos() as u64,
        "observer": names[observation.file],
        "direction": match observation.sent {
            Some(true) => "sent",
            Some(false) => "received",
            None => "unknown",
        },
        "src": observation.src.to_string(),
        "dst": observation.dst.to_string(),
        "bytes": observation.bytes,
        "kind": header_kind(observation),
    });
    let map = object.as_object_mut().expect("an object");
    match &observation.header {
        Err(e) => {
            map.insert("error".into(), json!(e));
        }
        Ok(header) => {
            map.insert("request_id".into(), json!(header.request_id));
            map.insert(
                "incarnation".into(),
                json!(format!("{:016x}", header.incarnation)),
            );
            map.insert("transmission".into(), json!(header.transmission));
            map.insert("echo".into(), json!(header.echo));
            map.insert("frag_index".into(), json!(header.frag_index));
            map.insert("frag_count".into(), json!(header.frag_count));
            map.insert("message_len".into(), json!(header.message_len));
            if let Some(ack) = &observation.ack {
                map.insert("ack_ranges".into(), json!(ack.ranges));
                map.insert("ack_complete".into(), json!(ack.complete));
            }
        }
    }
    if let Some(info) = &observation.message {
        let fields = [
            ("request", info.request.map(|s| json!(s))),
            ("response", info.response.map(|s| json!(s))),
            ("key", info.key.as_ref().map(|s| json!(s))),
            ("txid", info.txid.as_ref().map(|s| json!(s))),
            ("epoch", info.epoch.map(|e| json!(e))),
        ];
        for (name, value) in fields {
            if let Some(value) = value {
                map.insert(name.into(), value);
            }
        }
        if !info.detail.is_empty() {
            map.insert("detail".into(), json!(info.detail));
        }
    }
    object
}

/// Traffic between one requester and one responder.
#[derive(Debug, Default)]
pub struct PairSummary {
    /// Distinct requests.
    pub requests: usize,
    /// Request fragments sent again (distinct transmissions beyond the first, as the
    /// requester's reliable layer counts its retransmissions).
    pub retransmissions: usize,
    /// Response fragments sent again: answers repeated from the responder's cache for a
    /// retransmitted request, and resent fragments of long responses.
    pub responses_resent: usize,
    /// Extra copies of request fragments the responder received (retransmissions and
    /// network duplicates), which it answered from its cache instead of executing again;
    /// `None` when no trace of the responder was given.
    pub duplicates_suppressed: Option<usize>,
    /// Distinct request and response fragments.
    pub fragments: usize,
    /// Bytes of distinct datagrams (every kind, both directions).
    pub bytes: usize,
    /// Request latency seen by the requester: first send of the request to the whole
    /// response (retransmission waits and execution included).
    pub latencies: Vec<Duration>,
    /// Round-trip times: a datagram sent by one side to the datagram of the other that
    /// echoes its transmission number (the reliable layer's own, unambiguous samples).
    pub rtts: Vec<Duration>,
}

/// The identity of one datagram on the wire, the same in its sender's and receiver's trace.
type WireId = (SocketAddr, u64, u32, u8, u32);

/// The wire identity of `observation`'s datagram.
fn wire_id(observation: &Observation, header: &trireme::wire::codec::Header) -> WireId {
    (
        observation.src,
        header.incarnation,
        header.transmission,
        header.kind as u8,
        header.frag_index,
    )
}

/// Summarises traffic per (requester, responder) pair over `observations` (in time order).
pub fn summarise<'a>(
    observations: impl IntoIterator<Item = &'a Observation>,
) -> BTreeMap<(SocketAddr, SocketAddr), PairSummary> {
    let observations: Vec<&Observation> = observations.into_iter().collect();
    // The processes whose traces were given.
    let traced: HashSet<SocketAddr> = observations
        .iter()
        .filter_map(|o| o.observer_addr())
        .collect();
    let mut pairs: BTreeMap<(SocketAddr, SocketAddr), PairSummary> = BTreeMap::new();
    let mut seen_wire: HashSet<WireId> = HashSet::new();
    let mut exchanges: HashSet<Exchange> = HashSet::new();
    let mut fragments: HashSet<(Exchange, u8, u32)> = HashSet::new();
    let mut transmissions: HashMap<(Exchange, u8, u32), HashSet<u32>> = HashMap::new();
    let mut received: HashMap<(usize, Exchange, u32), usize> = HashMap::new();
    let mut first_sent: HashMap<Exchange, Duration> = HashMap::new();
    let mut answered: HashSet<Exchange> = HashSet::new();
    // Per trace file: when each of its datagrams was sent, by (peer, transmission).
    let mut sent_at: HashMap<(usize, SocketAddr, u32), Duration> = HashMap::new();
    for observation in &observations {
        let (Ok(header), Some(exchange)) = (&observation.header, observation.exchange) else {
            continue;
        };
        let pair = pairs
            .entry((exchange.requester, exchange.responder))
            .or_default();
        if traced.contains(&exchange.responder) {
            pair.duplicates_suppressed.get_or_insert(0);
        }
        let me = observation.observer_addr();
        if seen_wire.insert(wire_id(observation, header)) {
            pair.bytes += observation.bytes;
        }
        // Round trips: our datagram, and the peer's datagram echoing its transmission.
        match observation.sent {
            Some(true) => {
                sent_at
                    .entry((observation.file, observation.dst, header.transmission))
                    .or_insert(observation.time);
            }
            Some(false) if header.echo != 0 => {
                let key = (observation.file, observation.src, header.echo);
                if let Some(at) = sent_at.remove(&key) {
                    pair.rtts.push(observation.time.saturating_sub(at));
                }
            }
            _ => {}
        }
        if matches!(header.kind, Kind::Request | Kind::Response) {
            let fragment = (exchange, header.kind as u8, header.frag_index);
            if fragments.insert(fragment) {
                pair.fragments += 1;
            }
            transmissions
                .entry(fragment)
                .or_default()
                .insert(header.transmission);
        }
        if header.kind == Kind::Request {
            if exchanges.insert(exchange) {
                pair.requests += 1;
            }
            if me == Some(exchange.requester) && observation.sent == Some(true) {
                first_sent.entry(exchange).or_insert(observation.time);
            }
            if me == Some(exchange.responder) && observation.sent == Some(false) {
                let copies = received
                    .entry((observation.file, exchange, header.frag_index))
                    .or_default();
                *copies += 1;
                if *copies > 1
                    && let Some(count) = pair.duplicates_suppressed.as_mut()
                {
                    *count += 1;
                }
            }
        }
        if header.kind == Kind::Response
            && observation.completes
            && me == Some(exchange.requester)
            && let Some(sent) = first_sent.get(&exchange)
            && answered.insert(exchange)
        {
            pair.latencies.push(observation.time.saturating_sub(*sent));
        }
    }
    for ((exchange, kind, _), sends) in transmissions {
        if let Some(pair) = pairs.get_mut(&(exchange.requester, exchange.responder)) {
            let extra = sends.len().saturating_sub(1);
            if kind == Kind::Request as u8 {
                pair.retransmissions += extra;
            } else {
                pair.responses_resent += extra;
            }
        }
    }
    for pair in pairs.values_mut() {
        pair.latencies.sort();
        pair.rtts.sort();
    }
    pairs
}

/// The `q`-quantile (0..=1) of sorted `values`, nearest rank.
fn quantile(values: &[Duration], q: f64) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(values[rank - 1])
}

/// A duration in milliseconds with microsecond precision, or `-`.
fn millis(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".into(), |d| format!("{:.3}", d.as_secs_f64() * 1e3))
}

/// The summary as a text table.
pub fn summary_table(pairs: &BTreeMap<(SocketAddr, SocketAddr), PairSummary>) -> String {
    let row = |cells: [&str; 13]| {
        format!(
            "{:<21} {:<21} {:>8} {:>5} {:>6} {:>5} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5],
            cells[6],
            cells[7],
            cells[8],
            cells[9],
            cells[10],
            cells[11],
            cells[12]
        )
    };
    let mut out = row([
        "requester",
        "responder",
        "requests",
        "retx",
        "resent",
        "dups",
        "fragments",
        "bytes",
        "lat p50",
        "lat p99",
        "lat max",
        "rtt p50",
        "rtt p99",
    ]);
    out.push_str("(times in ms; dups need the responder's trace, latency the requester's)\n");
    for ((requester, responder), pair) in pairs {
        let dups = pair
            .duplicates_suppressed
            .map_or_else(|| "-".into(), |d| d.to_string());
        out.push_str(&row([
            &requester.to_string(),
            &responder.to_string(),
            &pair.requests.to_string(),
            &pair.retransmissions.to_string(),
            &pair.responses_resent.to_string(),
            &dups,
            &pair.fragments.to_string(),
            &pair.bytes.to_string(),
            &millis(quantile(&pair.latencies, 0.50)),
            &millis(quantile(&pair.latencies, 0.99)),
            &millis(pair.latencies.last().copied()),
            &millis(quantile(&pair.rtts, 0.50)),
            &millis(quantile(&pair.rtts, 0.99)),
        ]));
    }
    out
}

/// The summary as one JSON object.
pub fn summary_json(pairs: &BTreeMap<(SocketAddr, SocketAddr), PairSummary>) -> Value {
    let micros = |d: Option<Duration>| d.map(|d| d.as_micros() as u64);
    let rows: Vec<Value> = pairs
        .iter()
        .map(|((requester, responder), pair)| {
            json!({
                "requester": requester.to_string(),
                "responder": responder.to_string(),
                "requests": pair.requests,
                "retransmissions": pair.retransmissions,
                "responses_resent": pair.responses_resent,
                "duplicates_suppressed": pair.duplicates_suppressed,
                "fragments": pair.fragments,
                "bytes": pair.bytes,
                "latency_samples": pair.latencies.len(),
                "latency_p50_us": micros(quantile(&pair.latencies, 0.50)),
                "latency_p90_us": micros(quantile(&pair.latencies, 0.90)),
                "latency_p99_us": micros(quantile(&pair.latencies, 0.99)),
                "latency_max_us": micros(pair.latencies.last().copied()),
                "rtt_samples": pair.rtts.len(),
                "rtt_p50_us": micros(quantile(&pair.rtts, 0.50)),
                "rtt_p90_us": micros(quantile(&pair.rtts, 0.90)),
                "rtt_p99_us": micros(quantile(&pair.rtts, 0.99)),
                "rtt_max_us": micros(pair.rtts.last().copied()),
            })
        })
        .collect();
    json!({ "pairs": rows })
}

/// One message of a followed transaction: when it left and when it was whole at the other
/// end, as far as the traces saw.
#[derive(Debug)]
pub struct Step {
    /// The exchange.
    pub exchange: Exchange,
    /// Request or response.
    pub is_request: bool,
    /// Its name (`Prepare`, `Prepared`, ...).
    pub name: &'static str,
    /// What it says.
    pub info: MessageInfo,
    /// First time any trace saw it.
    pub first_seen: Duration,
    /// When its sender first sent it (if the sender's trace was given).
    pub sent: Option<Duration>,
    /// When its receiver had all of it (if the receiver's trace was given).
    pub received: Option<Duration>,
    /// Datagrams of it seen on the wire (distinct transmissions).
    pub datagrams: usize,
    /// Whether a trace of its receiver was given (else its arrival could not be seen).
    pub receiver_traced: bool,
}

impl Step {
    /// The sender and the receiver of this message.
    fn ends(&self) -> (SocketAddr, SocketAddr) {
        if self.is_request {
            (self.exchange.requester, self.exchange.responder)
        } else {
            (self.exchange.responder, self.exchange.requester)
        }
    }
}

/// The messages of the transaction(s) whose id starts with `txid`, in the order they were
/// first seen across all traces.
pub fn follow(observations: &[Observation], txid: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut index: HashMap<(Exchange, bool), usize> = HashMap::new();
    let mut seen_wire: HashSet<WireId> = HashSet::new();
    for observation in observations {
        let (Ok(header), Some(exchange), Some(info)) = (
            &observation.header,
            observation.exchange,
            &observation.message,
        ) else {
            continue;
        };
        if !info.txid.as_deref().is_some_and(|t| t.starts_with(txid)) {
            continue;
        }
        let is_request = match header.kind {
            Kind::Request => true,
            Kind::Response => false,
            _ => continue,
        };
        let name = if is_request {
            info.request
        } else {
            info.response
        }
        .unwrap_or("?");
        let at = *index.entry((exchange, is_request)).or_insert_with(|| {
            steps.push(Step {
                exchange,
                is_request,
                name,
                info: info.clone(),
                first_seen: observation.time,
                sent: None,
                received: None,
                datagrams: 0,
                receiver_traced: false,
            });
            steps.len() - 1
        });
        let step = &mut steps[at];
        if seen_wire.insert(wire_id(observation, header)) {
            step.datagrams += 1;
        }
        match observation.sent {
            Some(true) => {
                step.sent.get_or_insert(observation.time);
            }
            Some(false) if observation.completes => {
                step.received.get_or_insert(observation.time);
            }
            _ => {}
        }
    }
    let traced: HashSet<SocketAddr> = observations
        .iter()
        .filter_map(|o| o.observer_addr())
        .collect();
    for step in &mut steps {
        step.receiver_traced = traced.contains(&step.ends().1);
    }
    steps
}

/// What a step means in two-phase commit terms.
fn phase(step: &Step) -> &'static str {
    match step.name {
        "Prepare" => "prepare",
        "Prepared" => "vote yes",
        "Error" if step.info.request == Some("Prepare") => "vote no",
        "Commit" => "commit",
        "Abort" => "abort",
        "Done" if step.info.request == Some("Commit") => "commit acked",
        "Done" if step.info.request == Some("Abort") => "abort acked",
        "QueryTx" => "termination query",
        "TxState" => "termination answer",
        _ => "",
    }
}

/// The followed transaction as text lines.
pub fn follow_lines(steps: &[Step], start: Duration) -> Vec<String> {
    steps
        .iter()
        .map(|step| {
            let (from, to) = step.ends();
            let mut text = format!(
                "{} {from} -> {to} {:<18} {}",
                relative(step.first_seen, start),
                phase(step),
                step.name
            );
            if step.is_request
                && let Some(key) = &step.info.key
            {
                text.push_str(&format!(" key={key}"));
            }
            if step.is_request
                && let Some(epoch) = step.info.epoch
            {
                text.push_str(&format!(" epoch={epoch}"));
            }
            if !step.info.detail.is_empty() {
                text.push_str(&format!(" {}", step.info.detail));
            }
            match (step.sent, step.received) {
                (Some(sent), Some(received)) => text.push_str(&format!(
                    "  [delivered in {:.3} ms]",
                    received.saturating_sub(sent).as_secs_f64() * 1e3
                )),
                (_, None) if step.receiver_traced => text.push_str("  [not seen arriving]"),
                _ => {}
            }
            if step.datagrams > 1 {
                text.push_str(&format!(" [{} datagrams]", step.datagrams));
            }
            text
        })
        .collect()
}

/// The followed transaction as JSON objects.
pub fn follow_json(steps: &[Step]) -> Vec<Value> {
    steps
        .iter()
        .map(|step| {
            let (from, to) = step.ends();
            json!({
                "time_ns": step.first_seen.as_nanos() as u64,
                "from": from.to_string(),
                "to": to.to_string(),
                "message": step.name,
                "phase": phase(step),
                "key": step.info.key,
                "txid": step.info.txid,
                "epoch": step.info.epoch,
                "detail": step.info.detail,
                "sent_ns": step.sent.map(|t| t.as_nanos() as u64),
                "received_ns": step.received.map(|t| t.as_nanos() as u64),
                "datagrams": step.datagrams,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use trireme::runtime::trace::{Direction, Tracer};
    use trireme::wire::codec::{Header, Kind, encode_datagram};
    use trireme::wire::message::{Request, Response};

    use super::*;
    use crate::decode;

    /// A datagram of `kind` for request 1 with transmission `tx`, echoing `echo`, carrying
    /// `body` whole.
    fn datagram(kind: Kind, incarnation: u64, tx: u32, echo: u32, body: &[u8]) -> Vec<u8> {
        let mut header = Header::new(kind, incarnation, 1, tx);
        header.echo = echo;
        header.message_len = body.len() as u32;
        encode_datagram(&header, body)
    }

    /// A known history, traced at both ends, gives exactly its counts: the first request
    /// lost, the retransmission duplicated by the network, the duplicate answered from the
    /// cache.
    #[test]
    fn the_summary_counts_a_known_history_exactly() {
        let dir = std::env::temp_dir();
        let client_path = dir.join(format!("trace-dump-{}-client.pcap", std::process::id()));
        let server_path = dir.join(format!("trace-dump-{}-server.pcap", std::process::id()));
        let client: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let server: SocketAddr = "10.0.0.2:2000".parse().unwrap();
        let request = Request::Get { key: "k".into() }.encode().unwrap();
        let response = Response::Value { value: "v".into() }.encode().unwrap();
        let c = Tracer::create(&client_path).unwrap();
        let s = Tracer::create(&server_path).unwrap();
        let pause = || std::thread::sleep(Duration::from_millis(2));
        let first = datagram(Kind::Request, 7, 1, 0, &request);
        c.record(Direction::Sent, client, server, &first); // lost
        pause();
        let again = datagram(Kind::Request, 7, 2, 0, &request);
        c.record(Direction::Sent, client, server, &again);
        s.record(Direction::Received, server, client, &again);
        s.record(Direction::Received, server, client, &again); // a network duplicate
        let answer = datagram(Kind::Response, 9, 1, 2, &response);
        s.record(Direction::Sent, server, client, &answer);
        let cached = datagram(Kind::Response, 9, 2, 2, &response);
        s.record(Direction::Sent, server, client, &cached);
        pause();
        c.record(Direction::Received, client, server, &answer);
        c.record(Direction::Received, client, server, &cached);
        drop((c, s));
        let loaded = decode::load(&[&client_path, &server_path]).unwrap();
        std::fs::remove_file(&client_path).unwrap();
        std::fs::remove_file(&server_path).unwrap();

        let pairs = summarise(&loaded.observations);
        assert_eq!(pairs.len(), 1);
        let pair = &pairs[&(client, server)];
        assert_eq!(pair.requests, 1);
        assert_eq!(pair.retransmissions, 1);
        assert_eq!(pair.responses_resent, 1);
        assert_eq!(pair.duplicates_suppressed, Some(1));
        assert_eq!(pair.fragments, 2);
        assert_eq!(pair.latencies.len(), 1);
        assert!(
            pair.latencies[0] >= Duration::from_millis(4),
            "{:?}",
            pair.latencies
        );
        assert_eq!(
            pair.rtts.len(),
            1,
            "one echo of the client's second transmission"
        );
        assert!(pair.rtts[0] < pair.latencies[0]);
        // Directions come from the file: the client's first datagram is its own send.
        let first_seen = &loaded.observations[0];
        assert_eq!(first_seen.sent, Some(true));
        assert_eq!(first_seen.observer_addr(), Some(client));
        let info = first_seen.message.as_ref().unwrap();
        assert_eq!(
            (info.request, info.key.as_deref()),
            (Some("Get"), Some("k"))
        );
    }

    /// A restarted requester reusing its address and request ids starts new exchanges.
    #[test]
    fn a_new_incarnation_on_the_same_address_is_a_new_exchange() {
        let path = std::env::temp_dir().join(format!("trace-dump-{}-inc.pcap", std::process::id()));
        let client: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let server: SocketAddr = "10.0.0.2:2000".parse().unwrap();
        let tracer = Tracer::create(&path).unwrap();
        for (incarnation, key) in [(1, "first"), (2, "second")] {
            let request = Request::Get { key: key.into() }.encode().unwrap();
            let datagram = datagram(Kind::Request, incarnation, 1, 0, &request);
            tracer.record(Direction::Sent, client, server, &datagram);
        }
        drop(tracer);
        let loaded = decode::load(&[&path]).unwrap();
        std::fs::remove_file(&path).unwrap();
        let keys: Vec<Option<String>> = loaded
            .observations
            .iter()
            .map(|o| o.message.as_ref().and_then(|m| m.key.clone()))
            .collect();
        assert_eq!(keys, [Some("first".into()), Some("second".into())]);
        assert_eq!(
            summarise(&loaded.observations)[&(client, server)].requests,
            2
        );
    }
}
