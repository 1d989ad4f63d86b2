//! Fuzz bodies: the properties the `cargo fuzz` targets in `fuzz/` check, kept in the library
//! so that `tests/fuzz.rs` replays the fuzz corpus and runs proptest versions through the
//! very same code.
//!
//! Three targets, one function each, every one taking arbitrary bytes:
//!
//! - [`datagram`]: the codec. Header and ack decoding are canonical (decode, encode, decode
//!   gives back the same value and the same bytes); message bodies ([`Request`],
//!   [`Response`]) decode or fail with a typed error, and what decodes re-encodes to a value
//!   that decodes equal.
//! - [`reassembly`]: a [`reliable::Endpoint`] with small memory
//!   bounds, driven by a sequence of [`Step`]s read from the bytes (fragments of real encoded
//!   messages, acks, probes, raw bytes, requests, responses and time advances). After every
//!   step: the reassembly and response-cache bounds hold, every datagram the endpoint emits
//!   decodes, every request it raises carries exactly the bytes its fragments carried, and no
//!   request is executed twice within the dedup TTL.
//! - [`trace_reader`]: [`trace::parse`] on arbitrary bytes, and a file written by
//!   [`trace::write_file`] from entries read off the bytes reads back equal, and any prefix of
//!   it reads back as the records it holds whole.
//!
//! A broken property is returned as a [`Violation`]; the fuzz targets panic on it so libFuzzer
//! records the input. A panic inside the code under test propagates as it is.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use thiserror::Error;

use crate::placement::view::{Epoch, Member, ServerId, View};
use crate::reliable::{self, Endpoint, Event, IncomingId, RequestId};
use crate::runtime::trace::{self, Direction};
use crate::util::rng::Rng;
use crate::wire::codec::{
    self, AckBody, DecodeError, FLAG_ACK_RESPONSE, HEADER_LEN, Header, Kind, MAX_ACK_RANGES,
    MAX_MESSAGE, MIN_FRAGMENT_PAYLOAD,
};
use crate::wire::message::{self, Request, Response, TxId};

/// A property a fuzz body checks did not hold.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Violation {
    /// A decoded value did not survive encode then decode, or did not encode back to the
    /// bytes it was decoded from.
    #[error("{what} does not round-trip: {detail}")]
    RoundTrip {
        /// Which structure (header, ack, request body, ...).
        what: &'static str,
        /// What differed.
        detail: String,
    },
    /// A decode error of the wrong class (e.g. `Truncated` for input that was long enough).
    #[error("{what}: wrong decode error {error} for {len} bytes")]
    WrongError {
        /// Which structure.
        what: &'static str,
        /// The error the decoder returned.
        error: DecodeError,
        /// Length of the input.
        len: usize,
    },
    /// A decoded value breaks an invariant the decoder promises to check.
    #[error("{what} decoded but is invalid: {detail}")]
    Invalid {
        /// Which structure.
        what: &'static str,
        /// The broken invariant.
        detail: String,
    },
    /// A memory or cache bound of the endpoint was exceeded.
    #[error("step {step}: {what} is {value}, above its bound {bound}")]
    OverBound {
        /// Index of the step after which it was seen.
        step: usize,
        /// Which quantity.
        what: &'static str,
        /// Its value.
        value: usize,
        /// The configured bound.
        bound: usize,
    },
    /// The endpoint emitted a datagram that does not decode or is too large.
    #[error("step {step}: emitted datagram is bad: {detail}")]
    BadTransmit {
        /// Index of the step.
        step: usize,
        /// What is wrong with it.
        detail: String,
    },
    /// A request raised to the application does not carry the bytes its fragments carried.
    #[error("step {step}: request {id:?} delivered {len} bytes that are not its fragments'")]
    WrongBody {
        /// Index of the step.
        step: usize,
        /// The request.
        id: IncomingId,
        /// Length of the delivered body.
        len: usize,
    },
    /// A request was raised to the application again within the dedup TTL.
    #[error("step {step}: request {id:?} executed again {since:?} after its first execution")]
    ExecutedTwice {
        /// Index of the step.
        step: usize,
        /// The request.
        id: IncomingId,
        /// Time since it was raised before.
        since: Duration,
    },
    /// A response event that should not exist, or carries bytes no response fragment had.
    #[error("step {step}: response to request {id}: {detail}")]
    BadResponse {
        /// Index of the step.
        step: usize,
        /// The request it answers.
        id: RequestId,
        /// What is wrong.
        detail: String,
    },
    /// `poll_timeout` still named an instant already handled right after `handle_timeout`
    /// ran at it: a driver would spin.
    #[error("step {step}: the timer at {at:?} is still due after handle_timeout ran it")]
    StuckTimer {
        /// Index of the step.
        step: usize,
        /// The timer's instant, since the start of the run.
        at: Duration,
    },
    /// A trace read back differs from what was written.
    #[error("trace: {0}")]
    Trace(String),
}

/// Checks the codec on one datagram's worth of arbitrary bytes: the header decoder, and the
/// ack and body decoders on both the whole input and the payload after a header.
pub fn datagram(data: &[u8]) -> Result<(), Violation> {
    if let Ok((header, payload)) = check_header(data)? {
        check_ack(payload)?;
        check_bodies(payload)?;
        // The header with a fresh payload goes through the one datagram builder too.
        let rebuilt = codec::encode_datagram(&header, payload);
        if rebuilt != data {
            return Err(round_trip("datagram", "encode_datagram differs from input"));
        }
    }
    check_ack(data)?;
    check_bodies(data)
}

/// The header property: a header that decodes is valid, encodes back to exactly the bytes it
/// came from, and decodes equal again; `Truncated` only for input shorter than its header
/// (60 bytes, 68 with the MAC flag and its stamp).
/// Returns the decode result for further checks.
fn check_header(data: &[u8]) -> Result<Result<(Header, &[u8]), DecodeError>, Violation> {
    let decoded = Header::decode(data);
    match &decoded {
        Ok((header, payload)) => {
            if header.frag_count == 0 || header.frag_index >= header.frag_count {
                return Err(invalid("header", format!("fragment {header:?}")));
            }
            if header.message_len as usize > MAX_MESSAGE {
                return Err(invalid("header", format!("length {}", header.message_len)));
            }
            let mut bytes = Vec::with_capacity(HEADER_LEN);
            header.encode_into(&mut bytes);
            if data.get(..bytes.len()) != Some(&bytes[..]) {
                return Err(round_trip(
                    "header",
                    format!("{header:?} encodes differently"),
                ));
            }
            if bytes.len() + payload.len() != data.len() {
                return Err(round_trip("header", "payload is not the rest of the input"));
            }
            match Header::decode(&bytes) {
                Ok((again, rest)) if again == *header && rest.is_empty() => {}
                other => return Err(round_trip("header", format!("{header:?} -> {other:?}"))),
            }
        }
        Err(error @ DecodeError::Truncated { .. }) if data.len() >= header_len_of(data) => {
            return Err(wrong_error("header", error, data.len()));
        }
        Err(_) => {}
    }
    Ok(decoded)
}

/// The length of the header `data` starts with, as its flags say (60 bytes before the flags
/// are there).
fn header_len_of(data: &[u8]) -> usize {
    match data.get(6..8) {
        Some(&[hi, lo]) if u16::from_be_bytes([hi, lo]) & codec::FLAG_MAC != 0 => {
            codec::MAX_HEADER_LEN
        }
        _ => HEADER_LEN,
    }
}

/// The ack property: a decoded ack has non-empty, ascending, disjoint ranges, at most
/// [`MAX_ACK_RANGES`] of them, and encodes back to exactly its input.
fn check_ack(payload: &[u8]) -> Result<(), Violation> {
    let Ok(ack) = AckBody::decode(payload) else {
        return Ok(());
    };
    if ack.ranges.len() > MAX_ACK_RANGES {
        return Err(invalid("ack", format!("{} ranges", ack.ranges.len())));
    }
    let mut previous_end = 0;
    for &(start, end) in &ack.ranges {
        if start >= end || start < previous_end {
            return Err(invalid("ack", format!("range {start}..{end}")));
        }
        previous_end = end;
    }
    let bytes = ack.encode();
    if bytes != payload {
        return Err(round_trip("ack", format!("{ack:?} encodes differently")));
    }
    match AckBody::decode(&bytes) {
        Ok(again) if again == ack => Ok(()),
        other => Err(round_trip("ack", format!("{ack:?} -> {other:?}"))),
    }
}

/// The body property, for requests and responses: decoding fails with a typed error or gives
/// a value that encodes and decodes back equal; `Truncated` claims more bytes than given.
fn check_bodies(bytes: &[u8]) -> Result<(), Violation> {
    check_body::<Request>("request body", bytes, Request::decode, Request::encode)?;
    check_body::<Response>("response body", bytes, Response::decode, Response::encode)
}

/// The body property for one message type, given its decoder and encoder.
fn check_body<T: PartialEq + std::fmt::Debug>(
    what: &'static str,
    bytes: &[u8],
    decode: fn(&[u8]) -> Result<T, DecodeError>,
    encode: fn(&T) -> Result<Vec<u8>, codec::EncodeError>,
) -> Result<(), Violation> {
    match decode(bytes) {
        Ok(value) => {
            let encoded = encode(&value).map_err(|e| round_trip(what, format!("{e}")))?;
            match decode(&encoded) {
                Ok(again) if again == value => Ok(()),
                other => Err(round_trip(what, format!("{value:?} -> {other:?}"))),
            }
        }
        Err(error @ DecodeError::Truncated { needed, got })
            if needed <= got || got != bytes.len() =>
        {
            Err(wrong_error(what, &error, bytes.len()))
        }
        Err(_) => Ok(()),
    }
}

/// A [`Violation::RoundTrip`].
fn round_trip(what: &'static str, detail: impl Into<String>) -> Violation {
    Violation::RoundTrip {
        what,
        detail: detail.into(),
    }
}

/// A [`Violation::Invalid`].
fn invalid(what: &'static str, detail: String) -> Violation {
    Violation::Invalid { what, detail }
}

/// A [`Violation::WrongError`].
fn wrong_error(what: &'static str, error: &DecodeError, len: usize) -> Violation {
    Violation::WrongError {
        what,
        error: error.clone(),
        len,
    }
}

// ---------------------------------------------------------------------------------------
// Reassembly
// ---------------------------------------------------------------------------------------

/// Number of well-behaved peers; their addresses are [`peer_addr`]`(0..PEERS)`.
pub const PEERS: u8 = 4;
/// The peer index raw (possibly hostile) datagrams come from. Requests it creates are not
/// checked against a body (it may send any bytes), but are still executed at most once.
pub const RAW_PEER: u8 = PEERS;
/// Number of requester incarnations well-behaved peers use.
pub const SENDERS: u8 = 3;
/// Request ids the well-behaved requesters use are `0..REQUEST_IDS`: few, so that ids
/// repeat (duplicates, floors) and reach the cache bounds.
pub const REQUEST_IDS: u8 = 16;
/// Payload bytes per fragment a well-behaved sender uses unless the step says otherwise.
pub const NATURAL_PAYLOAD: usize = 300;

/// One input to the endpoint under test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// One fragment of a request to the endpoint: the fragment `index` of `count` of the
    /// `len`-byte body [`message_body`] gives request `request` of sender `sender`, sent from
    /// peer `peer`.
    RequestFragment {
        /// Sending peer (`0..PEERS`).
        peer: u8,
        /// Requester incarnation (index below [`SENDERS`]).
        sender: u8,
        /// Request id.
        request: u8,
        /// Whole message length.
        len: u32,
        /// Fragment count written in the header.
        count: u32,
        /// Fragment index written in the header.
        index: u32,
    },
    /// One fragment of a response to a request the endpoint sent (the `slot`-th it sent,
    /// modulo how many), from the peer it went to.
    ResponseFragment {
        /// Which request the endpoint sent.
        slot: u8,
        /// Whole response length.
        len: u32,
        /// Fragment count written in the header.
        count: u32,
        /// Fragment index written in the header.
        index: u32,
    },
    /// An ack from a peer: about a request the endpoint sent (`response` false) or about a
    /// response it is sending to a request it executed (`response` true).
    Ack {
        /// Which request (modulo how many there are).
        slot: u8,
        /// Ack of response fragments (else of request fragments).
        response: bool,
        /// The ack body.
        body: AckBody,
    },
    /// A probe about a request, from a well-behaved peer.
    Probe {
        /// Sending peer.
        peer: u8,
        /// Requester incarnation index.
        sender: u8,
        /// Request id.
        request: u8,
    },
    /// Arbitrary bytes from [`RAW_PEER`].
    Raw(Vec<u8>),
    /// The endpoint sends a request of `len` bytes to peer `peer`.
    Send {
        /// Destination peer.
        peer: u8,
        /// Body length.
        len: u32,
    },
    /// The application answers the `slot`-th request raised and not yet answered with a
    /// response of `len` bytes.
    Respond {
        /// Which pending request (modulo how many).
        slot: u8,
        /// Response length.
        len: u32,
    },
    /// The OS reports peer `peer` unreachable.
    Unreachable {
        /// The peer.
        peer: u8,
    },
    /// Virtual time passes, and due timers run.
    Advance {
        /// How long.
        millis: u32,
    },
}

/// The small configuration the reassembly target uses, so bounds are reached quickly: three
/// hundred payload bytes a datagram, a few kilobytes of reassembly memory, six cache entries.
pub fn small_config() -> reliable::Config {
    reliable::Config {
        max_datagram: HEADER_LEN + NATURAL_PAYLOAD,
        initial_rto: Duration::from_millis(20),
        min_rto: Duration::from_millis(5),
        min_rto_lone: Duration::from_millis(1),
        max_rto: Duration::from_millis(200),
        max_attempts: 4,
        window: 4,
        max_message: 6000,
        dedup_ttl: Duration::from_secs(1),
        dedup_max_entries: 6,
        dedup_max_bytes: 4000,
        reassembly_per_peer: 9000,
        reassembly_total: 13_000,
        reassembly_timeout: Duration::from_millis(300),
        // Address validation stays on: held answers, retries and padding are fuzzed too.
        ..reliable::Config::default()
    }
}

/// The address of peer `index` (its index modulo `PEERS + 1`; the last is [`RAW_PEER`]).
pub fn peer_addr(index: u8) -> SocketAddr {
    let n = index % (PEERS + 1);
    SocketAddr::from(([10, 0, 0, n + 1], 7000 + u16::from(n)))
}

/// The incarnation of well-behaved requester `sender` (modulo [`SENDERS`]).
pub fn sender_incarnation(sender: u8) -> u64 {
    0x5EED_0000_0000_0000 + u64::from(sender % SENDERS)
}

/// Real encoded message bodies the fragments carry: requests and responses from a few bytes
/// to a few kilobytes, so some fit the reassembly bounds and some do not.
pub fn templates() -> &'static [Vec<u8>] {
    static TEMPLATES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        let member = Member {
            id: ServerId(0x1234),
            addr: SocketAddr::from(([127, 0, 0, 1], 9000)),
        };
        let requests = [
            Request::Get { key: "k".into() },
            Request::Set {
                key: "key-1".into(),
                value: "v".repeat(700),
            },
            Request::Prepare {
                txid: TxId(0xfeed),
                key: "key-2".into(),
                value: "w".repeat(1500),
                epoch: Epoch(3),
                expected: ServerId(7),
                participants: vec![member; 3],
                timeout_ms: 500,
            },
            Request::Transfer {
                epoch: Epoch(4),
                entries: (0..20)
                    .map(|i| message::Entry {
                        key: format!("key-{i}"),
                        value: "x".repeat(100),
                        version: i,
                        txid: None,
                    })
                    .collect(),
            },
        ];
        let responses = [
            Response::Done,
            Response::Found {
                value: "y".repeat(900),
                version: 9,
            },
            Response::HeartbeatAck {
                view: View {
                    epoch: Epoch(5),
                    members: vec![member; 40],
                    replicas: 3,
                    vnodes: 8,
                },
                completed: View::default(),
                recent: Vec::new(),
                delivered: Epoch(4),
                leader: Some(SocketAddr::from(([10, 0, 0, 1], 39000))),
            },
            Response::Keys {
                keys: (0..300).map(|i| format!("key-{i}")).collect(),
            },
        ];
        let mut out: Vec<Vec<u8>> = requests.iter().filter_map(|r| r.encode().ok()).collect();
        out.extend(responses.iter().filter_map(|r| r.encode().ok()));
        out
    })
}

/// The body of `len` bytes a well-behaved sender sends for message `key`: its template
/// (chosen by `key`), cut or repeated to `len` bytes. Every fragment of the message, whatever
/// its count, is a slice of this, so a reassembled body must equal it.
pub fn message_body(key: u64, len: usize) -> Vec<u8> {
    message_slice(key, 0..len)
}

/// Bytes `range` of [`message_body`]`(key, _)` (of any length covering the range), without
/// building the whole body: what one fragment carries.
pub fn message_slice(key: u64, range: Range<usize>) -> Vec<u8> {
    let templates = templates();
    let template = &templates[(key % templates.len() as u64) as usize];
    let mut out = Vec::with_capacity(range.len());
    if template.is_empty() {
        out.resize(range.len(), 0);
        return out;
    }
    let mut at = range.start;
    while at < range.end {
        let offset = at % template.len();
        let n = (template.len() - offset).min(range.end - at);
        out.extend_from_slice(&template[offset..offset + n]);
        at += n;
    }
    out
}

/// The natural length of message `key`: its template's.
pub fn natural_len(key: u64) -> u32 {
    let templates = templates();
    templates[(key % templates.len() as u64) as usize].len() as u32
}

/// The message key of request `request` of incarnation `incarnation`.
pub fn request_key(incarnation: u64, request: u64) -> u64 {
    incarnation ^ request.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The message key of the response to our request `id`.
pub fn response_key(id: RequestId) -> u64 {
    id.wrapping_mul(0xC2B2_AE3D_27D4_EB4F) ^ 1
}

/// What a run of the reassembly target did, for tests that want more than "no violation".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Requests raised to the application, in order.
    pub delivered: Vec<IncomingId>,
    /// Responses to the endpoint's requests that arrived whole.
    pub responses_ok: usize,
    /// Requests of the endpoint that failed.
    pub responses_failed: usize,
    /// Datagrams the endpoint emitted.
    pub transmits: usize,
    /// Steps run.
    pub steps: usize,
}

/// The most timers one time advance runs; more means a timer keeps firing at one instant.
const MAX_TIMERS_PER_ADVANCE: usize = 10_000;

/// The most steps one input runs (longer inputs are cut), so one execution stays short.
pub const MAX_STEPS: usize = 400;

/// The reassembly target on arbitrary bytes: reads steps off them ([`steps_from_bytes`]) and
/// runs them ([`run_steps`]).
pub fn reassembly(data: &[u8]) -> Result<Outcome, Violation> {
    run_steps(&steps_from_bytes(data))
}

/// A cursor over fuzz input that yields zeros once the bytes run out.
struct Cursor<'a> {
    /// The input.
    bytes: &'a [u8],
    /// Next unread position.
    pos: usize,
}

impl Cursor<'_> {
    /// True when every byte was read.
    fn is_empty(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    /// The next byte (0 past the end).
    fn u8(&mut self) -> u8 {
        let byte = self.bytes.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        byte
    }

    /// The next two bytes, big-endian.
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    /// The next four bytes, big-endian.
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// The next `n` bytes (fewer at the end).
    fn take(&mut self, n: usize) -> &[u8] {
        let start = self.pos.min(self.bytes.len());
        let end = start.saturating_add(n).min(self.bytes.len());
        self.pos = end;
        &self.bytes[start..end]
    }
}

/// A message length: mostly the natural one of `key`, sometimes any length up to a little
/// past the endpoint's limit.
fn pick_len(c: &mut Cursor<'_>, key: u64) -> u32 {
    let selector = c.u8();
    let arbitrary = u32::from(c.u16()) % 7000;
    if selector < 176 {
        natural_len(key)
    } else {
        arbitrary
    }
}

/// A fragment count for a `len`-byte message: mostly what a sender with 300-byte payloads
/// uses, sometimes any count up to one past the largest the codec accepts.
fn pick_count(c: &mut Cursor<'_>, len: u32) -> u32 {
    let selector = c.u8();
    let most = codec::fragment_count(len as usize, MIN_FRAGMENT_PAYLOAD);
    if selector < 160 {
        codec::fragment_count(len as usize, NATURAL_PAYLOAD)
    } else {
        1 + u32::from(selector) % (most + 1)
    }
}

/// Reads which request a request-fragment step is about, from `c`: peer, sender, request
/// id, then the message length and fragment count (mostly the natural ones).
fn read_request_shape(c: &mut Cursor<'_>) -> (u8, u8, u8, u32, u32) {
    let (peer, sender, request) = (c.u8() % PEERS, c.u8() % SENDERS, c.u8());
    let request = request % REQUEST_IDS;
    let key = request_key(sender_incarnation(sender), u64::from(request));
    let len = pick_len(c, key);
    let count = pick_count(c, len);
    (peer, sender, request, len, count)
}

/// Reads which response a response-fragment step is about, from `c`: the slot of the
/// endpoint's request, then the response length and fragment count.
fn read_response_shape(c: &mut Cursor<'_>) -> (u8, u32, u32) {
    let slot = c.u8();
    let len = u32::from(c.u16()) % 7000;
    let count = pick_count(c, len);
    (slot, len, count)
}

/// Reads a sequence of steps off fuzz input. Besides single steps it has "whole message"
/// steps: every fragment of one request or response, in order, minus those a drop mask
/// removes and plus a duplicated one, so complete messages are common.
///
/// (The byte format is the committed corpus's: a change here changes what every corpus file
/// means.)
pub fn steps_from_bytes(data: &[u8]) -> Vec<Step> {
    let mut c = Cursor {
        bytes: data,
        pos: 0,
    };
    let mut steps = Vec::new();
    while !c.is_empty() && steps.len() < MAX_STEPS {
        match c.u8() % 14 {
            0 | 1 => {
                let (peer, sender, request, len, count) = read_request_shape(&mut c);
                let index = u32::from(c.u8()) % (count + 1);
                steps.push(Step::RequestFragment {
                    peer,
                    sender,
                    request,
                    len,
                    count,
                    index,
                });
            }
            2..=4 => {
                let (peer, sender, request, len, count) = read_request_shape(&mut c);
                let (drop_mask, duplicate) = (c.u16(), c.u8());
                for index in 0..count.min(64) {
                    if drop_mask & (1 << (index % 16)) != 0 && index >= 2 {
                        continue;
                    }
                    let step = Step::RequestFragment {
                        peer,
                        sender,
                        request,
                        len,
                        count,
                        index,
                    };
                    if u32::from(duplicate) == index {
                        steps.push(step.clone());
                    }
                    steps.push(step);
                }
            }
            5 => {
                let (slot, len, count) = read_response_shape(&mut c);
                let drop_mask = c.u16();
                for index in 0..count.min(64) {
                    if drop_mask & (1 << (index % 16)) == 0 {
                        steps.push(Step::ResponseFragment {
                            slot,
                            len,
                            count,
                            index,
                        });
                    }
                }
            }
            6 => {
                let (slot, len, count) = read_response_shape(&mut c);
                let index = u32::from(c.u8()) % (count + 1);
                steps.push(Step::ResponseFragment {
                    slot,
                    len,
                    count,
                    index,
                });
            }
            7 => {
                let (slot, flags, n) = (c.u8(), c.u8(), c.u8() % 8);
                let mut ranges = Vec::new();
                let mut next = 0u32;
                for _ in 0..n {
                    let start = next + u32::from(c.u8() % 4);
                    let end = start + u32::from(c.u8() % 8);
                    ranges.push((start, end));
                    next = end;
                }
                steps.push(Step::Ack {
                    slot,
                    response: flags & 1 != 0,
                    body: AckBody {
                        complete: flags & 2 != 0,
                        unknown: flags & 4 != 0,
                        ranges,
                    },
                });
            }
            8 => steps.push(Step::Probe {
                peer: c.u8() % PEERS,
                sender: c.u8() % SENDERS,
                request: c.u8() % REQUEST_IDS,
            }),
            9 => {
                let n = usize::from(c.u16() % 1500);
                steps.push(Step::Raw(c.take(n).to_vec()));
            }
            10 => steps.push(Step::Send {
                peer: c.u8() % PEERS,
                len: u32::from(c.u16()) % 7000,
            }),
            11 => steps.push(Step::Respond {
                slot: c.u8(),
                len: u32::from(c.u16()) % 7000,
            }),
            12 => {
                let byte = c.u8();
                if byte == 255 {
                    steps.push(Step::Unreachable {
                        peer: c.u8() % PEERS,
                    });
                } else {
                    steps.push(Step::Advance {
                        millis: advance_millis(byte),
                    });
                }
            }
            _ => steps.push(Step::Advance {
                millis: advance_millis(c.u8()),
            }),
        }
    }
    steps
}

/// A time step from one byte: up to 199 ms in 1 ms steps, then whole half seconds up to
/// 27.5 s (beyond twice the dedup TTL, so floors are forgotten too).
fn advance_millis(byte: u8) -> u32 {
    if byte < 200 {
        u32::from(byte)
    } else {
        u32::from(byte - 199) * 500
    }
}

/// The endpoint under test and what the checks remember about it.
struct Harness {
    /// The endpoint.
    endpoint: Endpoint,
    /// Its configuration.
    config: reliable::Config,
    /// Virtual time zero.
    start: Instant,
    /// Virtual now.
    now: Instant,
    /// Requests the endpoint sent: (id, destination), in order.
    sent: Vec<(RequestId, SocketAddr)>,
    /// Requests the endpoint sent that have had their response event.
    answered: HashSet<RequestId>,
    /// Requests raised and not yet answered by the application, with their peer.
    pending: Vec<(IncomingId, SocketAddr)>,
    /// Requests raised and answered, with their peer: targets of response acks.
    responded: Vec<(IncomingId, SocketAddr)>,
    /// When each request was last raised.
    raised_at: HashMap<IncomingId, Instant>,
    /// The last transmission number the peers used.
    next_tx: u32,
    /// A timer still due right after `handle_timeout` ran it (virtual time of the timer).
    stuck: Option<Duration>,
    /// What the run did.
    outcome: Outcome,
}

/// Runs `steps` against a fresh endpoint with [`small_config`], checking every invariant
/// after every step. Returns what happened, or the first violation.
pub fn run_steps(steps: &[Step]) -> Result<Outcome, Violation> {
    let config = small_config();
    let mut rng = Rng::seeded(0x00F0_225E);
    let start = Instant::now();
    let mut h = Harness {
        endpoint: Endpoint::new(config.clone(), &mut rng),
        config,
        start,
        now: start,
        sent: Vec::new(),
        answered: HashSet::new(),
        pending: Vec::new(),
        responded: Vec::new(),
        raised_at: HashMap::new(),
        next_tx: 0,
        stuck: None,
        outcome: Outcome::default(),
    };
    for (index, step) in steps.iter().enumerate() {
        h.apply(step);
        h.check(index)?;
    }
    h.outcome.steps = steps.len();
    Ok(h.outcome)
}

impl Harness {
    /// A fresh transmission number for a peer datagram (never 0).
    fn tx(&mut self) -> u32 {
        self.next_tx = self.next_tx.wrapping_add(1).max(1);
        self.next_tx
    }

    /// Feeds one step to the endpoint.
    fn apply(&mut self, step: &Step) {
        match *step {
            Step::RequestFragment {
                peer,
                sender,
                request,
                len,
                count,
                index,
            } => {
                let incarnation = sender_incarnation(sender);
                let key = request_key(incarnation, u64::from(request));
                let mut header =
                    Header::new(Kind::Request, incarnation, u64::from(request), self.tx());
                header.frag_index = index;
                header.frag_count = count;
                header.message_len = len;
                let range = codec::fragment_range(len as usize, count, index);
                let bytes = codec::encode_datagram(&header, &message_slice(key, range));
                self.endpoint
                    .handle_datagram(self.now, peer_addr(peer % PEERS), &bytes);
            }
            Step::ResponseFragment {
                slot,
                len,
                count,
                index,
            } => {
                let Some(&(id, dst)) = pick(&self.sent, slot) else {
                    return;
                };
                let mut header = Header::new(Kind::Response, 0xAB, id, self.tx());
                header.frag_index = index;
                header.frag_count = count;
                header.message_len = len;
                let range = codec::fragment_range(len as usize, count, index);
                let bytes =
                    codec::encode_datagram(&header, &message_slice(response_key(id), range));
                self.endpoint.handle_datagram(self.now, dst, &bytes);
            }
            Step::Ack {
                slot,
                response,
                ref body,
            } => {
                let target = if response {
                    pick(&self.responded, slot)
                        .map(|&(id, peer)| (id.incarnation, id.request, peer))
                } else {
                    pick(&self.sent, slot).map(|&(id, dst)| (0xAB, id, dst))
                };
                let Some((incarnation, request, peer)) = target else {
                    return;
                };
                let mut header = Header::new(Kind::Ack, incarnation, request, self.tx());
                if response {
                    header.flags = FLAG_ACK_RESPONSE;
                }
                let bytes = codec::encode_datagram(&header, &body.encode());
                self.endpoint.handle_datagram(self.now, peer, &bytes);
            }
            Step::Probe {
                peer,
                sender,
                request,
            } => {
                let header = Header::new(
                    Kind::Probe,
                    sender_incarnation(sender),
                    u64::from(request),
                    self.tx(),
                );
                let bytes = codec::encode_datagram(&header, &[]);
                self.endpoint
                    .handle_datagram(self.now, peer_addr(peer % PEERS), &bytes);
            }
            Step::Raw(ref bytes) => {
                self.endpoint
                    .handle_datagram(self.now, peer_addr(RAW_PEER), bytes);
            }
            Step::Send { peer, len } => {
                let dst = peer_addr(peer % PEERS);
                let body = message_body(u64::from(len), len as usize);
                if let Ok(id) = self.endpoint.request(self.now, dst, body, None) {
                    self.sent.push((id, dst));
                }
            }
            Step::Respond { slot, len } => {
                if self.pending.is_empty() {
                    return;
                }
                let (id, peer) = self.pending.remove(usize::from(slot) % self.pending.len());
                let body = message_body(id.request, len as usize);
                // Too large a response is refused with an error, which is fine.
                if self.endpoint.respond(self.now, id, body).is_ok() {
                    self.responded.push((id, peer));
                }
            }
            Step::Unreachable { peer } => {
                self.endpoint
                    .handle_unreachable(self.now, peer_addr(peer % PEERS));
            }
            Step::Advance { millis } => {
                let target = self.now + Duration::from_millis(u64::from(millis));
                // Run every timer at its own instant, as a driver that wakes on time would.
                for _ in 0..MAX_TIMERS_PER_ADVANCE {
                    match self.endpoint.poll_timeout() {
                        Some(at) if at <= target => {
                            self.now = at.max(self.now);
                            self.endpoint.handle_timeout(self.now);
                            if let Some(again) = self.endpoint.poll_timeout()
                                && again <= self.now
                            {
                                self.stuck = Some(again.saturating_duration_since(self.start));
                                return;
                            }
                        }
                        _ => break,
                    }
                }
                self.now = target;
                self.endpoint.handle_timeout(self.now);
            }
        }
    }

    /// Drains the endpoint's outputs and checks every invariant, after step `step`.
    fn check(&mut self, step: usize) -> Result<(), Violation> {
        if let Some(at) = self.stuck {
            return Err(Violation::StuckTimer { step, at });
        }
        let reassembly = self.endpoint.reassembly_bytes();
        if reassembly > self.config.reassembly_total {
            return Err(Violation::OverBound {
                step,
                what: "reassembly memory",
                value: reassembly,
                bound: self.config.reassembly_total,
            });
        }
        let entries = self.endpoint.cached_entries();
        if entries > self.config.dedup_max_entries {
            return Err(Violation::OverBound {
                step,
                what: "response cache entries",
                value: entries,
                bound: self.config.dedup_max_entries,
            });
        }
        while let Some(transmit) = self.endpoint.poll_transmit() {
            self.outcome.transmits += 1;
            check_transmit(step, &transmit.payload, self.config.max_datagram)?;
        }
        while let Some(event) = self.endpoint.poll_event() {
            match event {
                Event::Request { from, id, body } => self.on_request(step, from, id, &body)?,
                Event::Response { id, result } => self.on_response(step, id, result)?,
            }
        }
        Ok(())
    }

    /// Checks a request raised to the application: not raised before within the dedup TTL,
    /// and carrying the bytes its fragments carried (unless the raw peer sent it).
    fn on_request(
        &mut self,
        step: usize,
        from: SocketAddr,
        id: IncomingId,
        body: &[u8],
    ) -> Result<(), Violation> {
        if let Some(&before) = self.raised_at.get(&id) {
            let since = self.now.saturating_duration_since(before);
            if since < self.config.dedup_ttl {
                return Err(Violation::ExecutedTwice { step, id, since });
            }
        }
        self.raised_at.insert(id, self.now);
        if from != peer_addr(RAW_PEER) {
            let expected = message_body(request_key(id.incarnation, id.request), body.len());
            if body != expected {
                return Err(Violation::WrongBody {
                    step,
                    id,
                    len: body.len(),
                });
            }
        }
        self.pending.push((id, from));
        self.outcome.delivered.push(id);
        Ok(())
    }

    /// Checks a response event: about a request the endpoint sent, the first for it, and
    /// carrying the bytes the response fragments carried.
    fn on_response(
        &mut self,
        step: usize,
        id: RequestId,
        result: Result<Vec<u8>, reliable::RequestError>,
    ) -> Result<(), Violation> {
        let bad = |detail: &str| Violation::BadResponse {
            step,
            id,
            detail: detail.to_string(),
        };
        if !self.sent.iter().any(|&(sent, _)| sent == id) {
            return Err(bad("the endpoint never sent this request"));
        }
        if !self.answered.insert(id) {
            return Err(bad("a second response event"));
        }
        match result {
            Ok(body) => {
                if body != message_body(response_key(id), body.len()) {
                    return Err(bad("bytes no response fragment carried"));
                }
                self.outcome.responses_ok += 1;
            }
            Err(_) => self.outcome.responses_failed += 1,
        }
        Ok(())
    }
}

/// Checks one datagram the endpoint emitted: no larger than `max_datagram`, and each datagram
/// it carries (itself, or those of a bundle) well formed ([`check_one_transmit`]).
fn check_transmit(step: usize, datagram: &[u8], max_datagram: usize) -> Result<(), Violation> {
    let bad = |detail: String| Violation::BadTransmit { step, detail };
    if datagram.len() > max_datagram {
        return Err(bad(format!(
            "{} bytes, above max_datagram {max_datagram}",
            datagram.len()
        )));
    }
    for part in codec::Bundle::new(datagram).parts() {
        let part = part.map_err(|e| bad(format!("bundle does not split: {e}")))?;
        check_one_transmit(step, part)?;
    }
    Ok(())
}

/// Checks one datagram (alone, or one of a bundle): its header decodes, an ack's body
/// decodes, a fragment is exactly as long as its place in the message.
fn check_one_transmit(step: usize, datagram: &[u8]) -> Result<(), Violation> {
    let bad = |detail: String| Violation::BadTransmit { step, detail };
    let (header, payload) =
        Header::decode(datagram).map_err(|e| bad(format!("header does not decode: {e}")))?;
    match header.kind {
        Kind::Ack => {
            AckBody::decode(payload).map_err(|e| bad(format!("ack does not decode: {e}")))?;
        }
        Kind::Request | Kind::Response => {
            let payload = codec::strip_padding(&header, payload)
                .ok_or_else(|| bad("badly padded".to_string()))?;
            let range = codec::fragment_range(
                header.message_len as usize,
                header.frag_count,
                header.frag_index,
            );
            if range.len() != payload.len() {
                return Err(bad(format!(
                    "fragment {} of {} of a {}-byte message carries {} bytes",
                    header.frag_index,
                    header.frag_count,
                    header.message_len,
                    payload.len()
                )));
            }
        }
        Kind::Probe if payload.is_empty() || payload.len() == crate::wire::auth::TOKEN_LEN => {}
        Kind::Retry if payload.len() == crate::wire::auth::TOKEN_LEN => {}
        Kind::Probe | Kind::Retry => {
            return Err(bad(format!(
                "a {} carrying {} bytes",
                header.kind.name(),
                payload.len()
            )));
        }
    }
    Ok(())
}

/// The `slot`-th item of `items` (modulo its length), or `None` if it is empty.
fn pick<T>(items: &[T], slot: u8) -> Option<&T> {
    if items.is_empty() {
        None
    } else {
        items.get(usize::from(slot) % items.len())
    }
}

// ---------------------------------------------------------------------------------------
// Trace reader
// ---------------------------------------------------------------------------------------

/// Size of a pcap file header.
const PCAP_HEADER_LEN: usize = 24;
/// Size of a pcap record header.
const PCAP_RECORD_HEADER_LEN: usize = 16;
/// Size of the Linux cooked header our traces put in front of each IP packet.
const COOKED_LEN: usize = 16;

/// The trace reader target: [`trace::parse`] on the bytes as they are (never panics, and what
/// it returns is consistent with the input), then a write and read back of trace entries read
/// off the same bytes ([`entries_from_bytes`], [`trace_round_trip`]).
pub fn trace_reader(data: &[u8]) -> Result<(), Violation> {
    check_parse(data)?;
    let (entries, cut) = entries_from_bytes(data);
    trace_round_trip(&entries, cut)
}

/// What [`trace::parse`] returns is consistent with `data`: records at increasing offsets
/// inside the file, payloads no longer than the file, a cut point inside the file.
fn check_parse(data: &[u8]) -> Result<(), Violation> {
    let Ok(parsed) = trace::parse(data) else {
        return Ok(());
    };
    let mut previous = None;
    for record in &parsed.records {
        let offset = usize::try_from(record.offset).unwrap_or(usize::MAX);
        if offset < PCAP_HEADER_LEN || offset >= data.len() || previous >= Some(offset) {
            return Err(Violation::Trace(format!(
                "record at offset {offset} in a {}-byte file",
                data.len()
            )));
        }
        if record.payload.len() > data.len() - offset {
            return Err(Violation::Trace(format!(
                "a {}-byte payload at offset {offset} of a {}-byte file",
                record.payload.len(),
                data.len()
            )));
        }
        previous = Some(offset);
    }
    if let Some(cut) = parsed.truncated_at
        && (cut as usize >= data.len() || Some(cut as usize) <= previous)
    {
        return Err(Violation::Trace(format!(
            "truncated at {cut} in a {}-byte file",
            data.len()
        )));
    }
    Ok(())
}

/// Reads trace entries off fuzz input (up to eight; times that fit a pcap timestamp, IPv4 or
/// IPv6 addresses, payloads up to 1500 bytes), and a cut point (a fraction of the file, in
/// 1/256ths) for the prefix check.
pub fn entries_from_bytes(data: &[u8]) -> (Vec<trace::Entry>, u8) {
    let mut c = Cursor {
        bytes: data,
        pos: 0,
    };
    let cut = c.u8();
    let count = c.u8() % 8;
    let mut entries = Vec::new();
    for _ in 0..count {
        if c.is_empty() {
            break;
        }
        let seconds = u64::from(c.u32());
        let nanos = c.u32() % 1_000_000_000;
        let flags = c.u8();
        let src = address(&mut c, flags & 1 != 0);
        let dst = address(&mut c, flags & 2 != 0);
        let len = usize::from(c.u16() % 1501);
        entries.push(trace::Entry {
            time: UNIX_EPOCH + Duration::new(seconds, nanos),
            direction: if flags & 4 != 0 {
                Direction::Sent
            } else {
                Direction::Received
            },
            src,
            dst,
            payload: c.take(len).to_vec(),
        });
    }
    (entries, cut)
}

/// A socket address read off fuzz input: IPv6 if `v6`, else IPv4.
fn address(c: &mut Cursor<'_>, v6: bool) -> SocketAddr {
    let ip = if v6 {
        let mut octets = [0u8; 16];
        for octet in &mut octets {
            *octet = c.u8();
        }
        IpAddr::V6(Ipv6Addr::from(octets))
    } else {
        IpAddr::V4(Ipv4Addr::new(c.u8(), c.u8(), c.u8(), c.u8()))
    };
    SocketAddr::new(ip, c.u16())
}

/// An address as the trace reader gives it back: IPv4-mapped IPv6 addresses come back as
/// IPv4 (a trace cannot tell them apart).
fn as_read_back(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// The size of the record [`trace::write_file`] writes for `entry`.
fn record_len(entry: &trace::Entry) -> usize {
    let ip = match (entry.src.ip(), entry.dst.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => 20,
        _ => 40,
    };
    PCAP_RECORD_HEADER_LEN + COOKED_LEN + ip + 8 + entry.payload.len()
}

/// A scratch file path unique to this process and call.
fn scratch_path() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "trireme-fuzz-trace-{}-{n}.pcap",
        std::process::id()
    ))
}

/// Writes `entries` with [`trace::write_file`] and reads the file back: every entry comes
/// back as a record equal to it (time, direction, addresses, payload) at the offset its size
/// implies. Then the prefix of the file `cut`/256 of the way in reads back as the records it
/// holds whole, and says it was cut inside the next one (if it was).
pub fn trace_round_trip(entries: &[trace::Entry], cut: u8) -> Result<(), Violation> {
    let path = scratch_path();
    let written = trace::write_file(&path, entries);
    let bytes = std::fs::read(&path);
    let _ = std::fs::remove_file(&path);
    written.map_err(|e| Violation::Trace(format!("write_file failed: {e}")))?;
    let bytes = bytes.map_err(|e| Violation::Trace(format!("cannot read back: {e}")))?;
    let parsed = trace::parse(&bytes)
        .map_err(|(offset, reason)| Violation::Trace(format!("offset {offset}: {reason}")))?;
    let mut offset = PCAP_HEADER_LEN;
    let mut ends = Vec::with_capacity(entries.len());
    if parsed.records.len() != entries.len() || parsed.skipped != 0 {
        return Err(Violation::Trace(format!(
            "{} entries written, {} records and {} skipped read",
            entries.len(),
            parsed.records.len(),
            parsed.skipped
        )));
    }
    for (entry, record) in entries.iter().zip(&parsed.records) {
        let time = entry.time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let same = record.time == time
            && record.direction == Some(entry.direction)
            && record.src == as_read_back(entry.src)
            && record.dst == as_read_back(entry.dst)
            && record.payload == entry.payload
            && record.offset == offset as u64;
        if !same {
            return Err(Violation::Trace(format!(
                "wrote {entry:?} at offset {offset}, read {record:?}"
            )));
        }
        offset += record_len(entry);
        ends.push(offset);
    }
    if parsed.truncated_at.is_some() || offset != bytes.len() {
        return Err(Violation::Trace(format!(
            "a whole {}-byte file read as cut at {:?} (records end at {offset})",
            bytes.len(),
            parsed.truncated_at
        )));
    }
    check_prefix(&bytes, &ends, cut)
}

/// The prefix of a trace file `cut`/256 of the way in (never inside the file header) reads
/// back as the records that end inside it, cut at the start of the next one if it is partly
/// there. `ends` are the end offsets of the file's records.
fn check_prefix(bytes: &[u8], ends: &[usize], cut: u8) -> Result<(), Violation> {
    let body = bytes.len() - PCAP_HEADER_LEN;
    let at = PCAP_HEADER_LEN + body * usize::from(cut) / 256;
    let prefix = &bytes[..at];
    let parsed = trace::parse(prefix)
        .map_err(|(offset, reason)| Violation::Trace(format!("prefix: {offset}: {reason}")))?;
    let whole = ends.iter().take_while(|&&end| end <= at).count();
    let last_end = if whole == 0 {
        PCAP_HEADER_LEN
    } else {
        ends[whole - 1]
    };
    let expected_cut = (last_end < at).then_some(last_end as u64);
    if parsed.records.len() != whole || parsed.truncated_at != expected_cut {
        return Err(Violation::Trace(format!(
            "a prefix of {at} bytes read as {} records cut at {:?}; expected {whole} cut at \
             {expected_cut:?}",
            parsed.records.len(),
            parsed.truncated_at
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every template is a real message: requests decode as requests, responses as responses.
    #[test]
    fn templates_are_real_messages() {
        let templates = templates();
        assert_eq!(templates.len(), 8);
        for body in &templates[..4] {
            assert!(Request::decode(body).is_ok());
        }
        for body in &templates[4..] {
            assert!(Response::decode(body).is_ok());
        }
    }

    /// A fragment's bytes built alone equal the same range of the whole body, for ranges that
    /// start and end anywhere in the repeated template.
    #[test]
    fn message_slices_are_ranges_of_the_body() {
        for key in 0..8 {
            let body = message_body(key, 7000);
            for (start, end) in [(0, 0), (0, 3), (1, 700), (299, 2500), (6999, 7000)] {
                assert_eq!(message_slice(key, start..end), body[start..end], "{key}");
            }
        }
    }

    /// A real datagram of each kind passes the datagram properties.
    #[test]
    fn real_datagrams_pass_the_codec_properties() {
        let mut header = Header::new(Kind::Request, 7, 9, 1);
        header.message_len = templates()[0].len() as u32;
        let request = codec::encode_datagram(&header, &templates()[0]);
        assert_eq!(datagram(&request), Ok(()));
        let ack = AckBody {
            complete: false,
            unknown: false,
            ranges: vec![(0, 2), (4, 5)],
        };
        let header = Header::new(Kind::Ack, 7, 9, 2);
        assert_eq!(
            datagram(&codec::encode_datagram(&header, &ack.encode())),
            Ok(())
        );
        assert_eq!(datagram(b""), Ok(()));
        assert_eq!(datagram(b"TRIR"), Ok(()));
    }

    /// Every fragment of a real message, in reverse order and with a duplicate, reassembles to
    /// exactly that message, raised once.
    #[test]
    fn a_whole_message_out_of_order_is_delivered_once_and_intact() {
        let key = request_key(sender_incarnation(1), 3);
        let len = natural_len(key);
        let count = codec::fragment_count(len as usize, NATURAL_PAYLOAD);
        let mut steps: Vec<Step> = (0..count)
            .rev()
            .map(|index| Step::RequestFragment {
                peer: 0,
                sender: 1,
                request: 3,
                len,
                count,
                index,
            })
            .collect();
        steps.push(steps[0].clone());
        let outcome = run_steps(&steps).unwrap();
        assert_eq!(outcome.delivered.len(), 1, "{outcome:?}");
    }

    /// The endpoint's own requests complete when every response fragment arrives.
    #[test]
    fn a_response_in_fragments_completes_the_request() {
        let mut steps = vec![Step::Send { peer: 1, len: 100 }];
        let len = 1000;
        let count = codec::fragment_count(len as usize, NATURAL_PAYLOAD);
        steps.extend((0..count).map(|index| Step::ResponseFragment {
            slot: 0,
            len,
            count,
            index,
        }));
        let outcome = run_steps(&steps).unwrap();
        assert_eq!(outcome.responses_ok, 1, "{outcome:?}");
    }

    /// A trace of IPv4, IPv6 and mapped addresses reads back equal, whole and cut anywhere.
    #[test]
    fn traces_read_back_whole_and_cut() {
        let v4: SocketAddr = "10.1.2.3:4000".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::7]:5000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.9.9.9]:6000".parse().unwrap();
        let entries = vec![
            trace::Entry {
                time: UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
                direction: Direction::Sent,
                src: v4,
                dst: v4,
                payload: b"first".to_vec(),
            },
            trace::Entry {
                time: UNIX_EPOCH + Duration::new(1_700_000_001, 0),
                direction: Direction::Received,
                src: v6,
                dst: mapped,
                payload: vec![7; 300],
            },
        ];
        for cut in [0, 1, 50, 128, 200, 255] {
            assert_eq!(trace_round_trip(&entries, cut), Ok(()), "cut {cut}");
        }
        assert_eq!(trace_reader(b"not a pcap"), Ok(()));
    }

    /// Arbitrary bytes read as steps and entries without panicking, and short inputs run.
    #[test]
    fn any_bytes_make_steps() {
        for data in [&b""[..], b"\x00", b"\xff\xff\xff", &[3u8; 64]] {
            assert!(steps_from_bytes(data).len() <= MAX_STEPS);
            assert!(reassembly(data).is_ok());
            let _ = entries_from_bytes(data);
        }
    }
}
