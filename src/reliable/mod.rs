//! The reliable request layer, sans-IO.
//!
//! An [`Endpoint`] turns unreliable datagrams into request/response exchanges with
//! at-most-once execution. It owns no socket and reads no clock.
//!
//! # Calling contract
//!
//! - Feed it inputs: [`Endpoint::handle_datagram`] for every datagram received,
//!   [`Endpoint::handle_unreachable`] when the OS reports a peer unreachable,
//!   [`Endpoint::handle_timeout`] once the instant from [`Endpoint::poll_timeout`] has come.
//! - Give it work: [`Endpoint::request`] to send a request, [`Endpoint::respond`] to answer a
//!   request it raised, [`Endpoint::cancel`] to abandon one.
//! - After every call, drain [`Endpoint::poll_transmit`] (datagrams to send) and
//!   [`Endpoint::poll_event`] (requests to execute, responses to deliver), then re-read
//!   [`Endpoint::poll_timeout`].
//! - `now` must never go backwards between calls.
//!
//! # Protocol
//!
//! A message (request or response body) is cut into fragments that fit one datagram. A
//! single-fragment request is retransmitted by the requester until the response (or an ack
//! saying "complete, executing") arrives; the response itself is not acknowledged but is
//! cached, so a retransmitted request is answered from the cache and never executed twice.
//! A message of several fragments is sent by its sender with a window of fragments in flight;
//! the receiver answers with selective acks, and the sender resends only fragments that are
//! reported missing (three later fragments acknowledged) or that outlived the retransmission
//! timeout. Once a multi-fragment request is fully acknowledged the requester sends small
//! probes until the response comes. The retransmission timeout adapts per peer from
//! unambiguous RTT samples: every datagram carries a fresh transmission number and answers
//! echo the number they answer.

mod guard;
mod reassembly;
mod rtt;
mod transfer;

#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::debug;
use thiserror::Error;

use crate::util::ratelimit::LogLimiter;
use crate::util::rng::Rng;
use crate::wire::auth::{Auth, ClusterKey};
use crate::wire::codec::{
    self, AckBody, FLAG_ACK_RESPONSE, FLAG_MAC, FLAG_PADDED, HEADER_LEN, Header, Kind,
};

pub use self::guard::AMPLIFICATION_FACTOR;
use self::guard::Guard;
use self::reassembly::{Insert, Reassembly};
use self::rtt::RttEstimator;
use self::transfer::Transfer;

/// Floors are queued for expiry at most this many times per dedup TTL per incarnation.
const FLOOR_GRAIN: u32 = 8;

/// What an endpoint remembers of one requester incarnation's forgotten requests.
#[derive(Clone, Copy, Debug)]
struct Floor {
    /// Every request id below this was answered and forgotten.
    below: u64,
    /// When it was last raised.
    raised: Instant,
    /// The time of its newest entry in the expiry queue.
    queued: Instant,
}

/// Tunables of the reliable layer.
#[derive(Clone, Debug)]
pub struct Config {
    /// Largest datagram sent, header included.
    pub max_datagram: usize,
    /// Retransmission timeout before any RTT sample.
    pub initial_rto: Duration,
    /// Floor of the retransmission timeout.
    pub min_rto: Duration,
    /// Floor of the retransmission timeout of a one-fragment request: its answer (or ack)
    /// comes back at once, with no acknowledgement batching to wait for, so a lost one can
    /// be resent after little more than a round trip.
    pub min_rto_lone: Duration,
    /// Ceiling of the retransmission timeout, backoff included.
    pub max_rto: Duration,
    /// Consecutive timeouts without progress after which a request fails with `Timeout`.
    pub max_attempts: u32,
    /// Fragments of one message in flight at once.
    pub window: u32,
    /// Whether [`Endpoint::poll_transmit`] coalesces the datagrams queued for one peer into
    /// one bundle of at most `max_datagram` bytes (see [`codec::bundle`]). Receiving
    /// bundles works either way.
    pub coalesce: bool,
    /// Largest message accepted or sent.
    pub max_message: usize,
    /// How long an answered request stays in the response cache.
    pub dedup_ttl: Duration,
    /// Most entries in the response cache (requests being executed included).
    pub dedup_max_entries: usize,
    /// Most bytes of cached responses.
    pub dedup_max_bytes: usize,
    /// Most bytes of partly reassembled messages from one peer.
    pub reassembly_per_peer: usize,
    /// Most bytes of partly reassembled messages in total.
    pub reassembly_total: usize,
    /// A partly reassembled message with no new fragment for this long is dropped.
    pub reassembly_timeout: Duration,
    /// Most requester incarnations whose forgotten requests are remembered (floors); past
    /// it the oldest floor is dropped (counted in [`Stats::floors_evicted`]).
    pub floors_max: usize,
    /// The cluster key, if any: every datagram is then sealed with a MAC and stamped, and
    /// one that fails the MAC or the replay window is dropped unanswered.
    pub auth: Option<Auth>,
    /// Whether replies to unvalidated addresses obey the anti-amplification limit (no need
    /// with a cluster key: every accepted datagram is then authenticated).
    pub validate_addresses: bool,
    /// How long a validated address stays validated.
    pub validated_ttl: Duration,
    /// Most validated addresses remembered.
    pub validated_max: usize,
    /// The secret address-validation tokens are minted with. The network driver fills it
    /// from the operating system's entropy; when `None` (deterministic tests and the
    /// simulator) it is drawn from the endpoint's RNG, whose draws a peer can reconstruct
    /// from the incarnation it sees in every header (found in review: a forged token then
    /// validated a victim's address), so that is not for real use.
    pub token_secret: Option<[u8; 32]>,
}

impl Default for Config {
    /// Defaults suited to a LAN or loopback: 1400-byte datagrams, RTO 100 ms initially and
    /// between 5 ms (1 ms for a one-fragment request) and 2 s, 12 attempts (about 8 s of doubling from the floor before a
    /// silent peer is given up), 64-fragment window. The floor is what a loss costs on
    /// loopback; below it the receiver's ack of every second fragment (no ack timer) makes
    /// the timer fire on fragments still waiting for their ack.
    fn default() -> Config {
        Config {
            max_datagram: 1400,
            initial_rto: Duration::from_millis(100),
            min_rto: Duration::from_millis(5),
            min_rto_lone: Duration::from_millis(1),
            max_rto: Duration::from_secs(2),
            max_attempts: 12,
            window: 64,
            coalesce: true,
            max_message: codec::MAX_MESSAGE,
            dedup_ttl: Duration::from_secs(60),
            dedup_max_entries: 100_000,
            dedup_max_bytes: 64 << 20,
            reassembly_per_peer: 16 << 20,
            reassembly_total: 64 << 20,
            reassembly_timeout: Duration::from_secs(10),
            floors_max: 100_000,
            auth: None,
            validate_addresses: true,
            validated_ttl: Duration::from_secs(600),
            validated_max: 65_536,
            token_secret: None,
        }
    }
}

/// An answer echoes the transmission that triggered it only if that transmission arrived
/// this recently; otherwise the echo is 0 and the requester takes no RTT sample.
const ECHO_FRESHNESS: Duration = Duration::from_millis(5);

/// The requester's handle on a request it sent.
pub type RequestId = u64;

/// Identifies a request received from a peer: the peer's incarnation and its request id.
/// This pair is the deduplication key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IncomingId {
    /// The requester's incarnation.
    pub incarnation: u64,
    /// The requester's request id.
    pub request: u64,
}

impl IncomingId {
    /// The request a datagram with `header` from its requester belongs to.
    fn of(header: &Header) -> IncomingId {
        IncomingId {
            incarnation: header.incarnation,
            request: header.request_id,
        }
    }
}

/// A datagram to put on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Where to send it.
    pub dst: SocketAddr,
    /// The whole datagram, header included.
    pub payload: Vec<u8>,
}

/// Something the application must act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A new request to execute; answer it with [`Endpoint::respond`].
    Request {
        /// Who sent it.
        from: SocketAddr,
        /// The handle to respond with.
        id: IncomingId,
        /// The request body.
        body: Vec<u8>,
    },
    /// The outcome of a request sent with [`Endpoint::request`].
    Response {
        /// The request it answers.
        id: RequestId,
        /// The response body, or why none came.
        result: Result<Vec<u8>, RequestError>,
    },
}

/// Why a request got no response.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum RequestError {
    /// Retransmissions were exhausted, or the deadline passed.
    #[error("no answer from {peer}")]
    Timeout {
        /// The peer that did not answer.
        peer: SocketAddr,
    },
    /// The operating system reported the peer unreachable.
    #[error("{peer} is unreachable")]
    Unreachable {
        /// The unreachable peer.
        peer: SocketAddr,
    },
    /// The message exceeds the size limit.
    #[error("message of {size} bytes exceeds the {limit}-byte limit")]
    TooLarge {
        /// The message size.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

/// Counters describing what the endpoint did; they only grow.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams handed to the wire.
    pub datagrams_sent: u64,
    /// Datagrams received (valid or not; each datagram of a bundle counts).
    pub datagrams_received: u64,
    /// Bundles sent (each counts once here and each of its datagrams in `datagrams_sent`).
    pub bundles_sent: u64,
    /// Bundles received.
    pub bundles_received: u64,
    /// Datagrams dropped because they did not decode or did not fit any state.
    pub bad_datagrams: u64,
    /// Requests started.
    pub requests_sent: u64,
    /// Requests raised to the application for execution.
    pub requests_executed: u64,
    /// Request or response fragments sent again.
    pub retransmissions: u64,
    /// One-fragment requests sent again although the first copy arrived: their answer
    /// echoes an earlier send (the round trip outgrew the timeout; nothing was lost).
    pub needless_resends: u64,
    /// Probes sent for a fully delivered request.
    pub probes_sent: u64,
    /// Acks sent.
    pub acks_sent: u64,
    /// Retransmitted request datagrams that were not executed again.
    pub duplicates_suppressed: u64,
    /// Responses re-sent from the cache.
    pub responses_from_cache: u64,
    /// Requests or fragments refused because a memory bound was reached.
    pub refused_over_limit: u64,
    /// Requests that failed with `Timeout`.
    pub timeouts: u64,
    /// Datagrams dropped because the cluster key did not authenticate them (no MAC, or a
    /// wrong one).
    pub auth_failures: u64,
    /// Authenticated datagrams dropped because their stamp lies outside the replay window
    /// or before this process started: replays, or a sender whose clock is far off.
    pub replays_refused: u64,
    /// Replies held until the requester's address is validated (anti-amplification).
    pub replies_held: u64,
    /// `Retry` datagrams sent (each asks a requester to echo a token).
    pub retries_sent: u64,
    /// Addresses validated by an echoed token.
    pub addresses_validated: u64,
    /// Floors dropped because [`Config::floors_max`] was reached.
    pub floors_evicted: u64,
}

impl Stats {
    /// A one-line account of what was refused or dropped since `earlier` (bad datagrams,
    /// authentication failures, refused replays, work refused over a bound, floors
    /// forgotten), or `None` if nothing was.
    pub fn drops_since(&self, earlier: &Stats) -> Option<String> {
        let counts = [
            (
                self.bad_datagrams - earlier.bad_datagrams,
                "malformed or unexpected",
            ),
            (
                self.auth_failures - earlier.auth_failures,
                "failed the cluster key",
            ),
            (
                self.replays_refused - earlier.replays_refused,
                "replays refused",
            ),
            (
                self.refused_over_limit - earlier.refused_over_limit,
                "refused over a memory bound",
            ),
            (
                self.floors_evicted - earlier.floors_evicted,
                "floors forgotten",
            ),
        ];
        let parts: Vec<String> = counts
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, what)| format!("{n} {what}"))
            .collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    }
}

/// Where a request we sent stands.
#[derive(Debug)]
enum OutPhase {
    /// Request fragments are going out.
    Sending,
    /// The request is fully delivered; waiting for the response, probing now and then.
    Awaiting {
        /// Consecutive probes without a sign of life.
        stalls: u32,
        /// Backoff exponent of the probe interval.
        backoff: u32,
        /// Transmission number of the last probe (for RTT samples).
        probe_tx: u32,
        /// When the last probe went out.
        probe_sent: Option<Instant>,
    },
    /// Response fragments are arriving.
    Receiving(Reassembly),
}

/// A request we sent and have no final answer to.
#[derive(Debug)]
struct Outgoing {
    /// The peer it goes to.
    dst: SocketAddr,
    /// The request body and its fragment state.
    transfer: Transfer,
    /// Where it stands.
    phase: OutPhase,
    /// Give up at this instant, if set.
    deadline: Option<Instant>,
    /// Give up after this many consecutive timeouts while the peer has not acknowledged the
    /// whole request (a silent peer: frozen, cut off, gone); `config.max_attempts` unless the
    /// caller asked for fewer ([`Endpoint::request_with`]).
    unacked_attempts: u32,
    /// The peer's latest transmission number seen (echoed in our acks).
    last_rx_tx: u32,
    /// The last echo an RTT sample was taken from (one sample per echoed transmission).
    sampled_echo: u32,
    /// The instant the timer is armed for (stale heap entries are ignored).
    timer_at: Option<Instant>,
    /// Every datagram of the request is padded to this many bytes (0: none): a first
    /// contact, so that the answer fits the peer's anti-amplification limit.
    pad_to: usize,
}

/// Where a request we received stands.
#[derive(Debug)]
enum InPhase {
    /// Its fragments are arriving.
    Receiving(Reassembly),
    /// The application is executing it.
    Executing,
    /// Answered; the response is cached (and, if fragmented, still being sent).
    Responded(Transfer),
    /// Answered, and the requester acknowledged the whole fragmented response.
    Delivered,
}

/// A request we received: the response cache entry and its transfer state.
#[derive(Debug)]
struct Incoming {
    /// The requester's address.
    peer: SocketAddr,
    /// Where it stands.
    phase: InPhase,
    /// The requester's latest transmission number seen (echoed in our answers).
    last_rx_tx: u32,
    /// When that transmission arrived: an answer echoes it only while it is fresh, so an
    /// RTT sample never includes a long execution.
    last_rx_at: Instant,
    /// When it was answered (its place in the expiry queue).
    responded_at: Option<Instant>,
    /// The instant the timer is armed for (stale heap entries are ignored).
    timer_at: Option<Instant>,
    /// Bytes of the request's datagrams (headers included, each fragment once): what the
    /// anti-amplification limit compares the response with.
    request_bytes: usize,
    /// The response waits for the requester's address to be validated.
    held: bool,
}

/// What a heap entry's timer belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKey {
    /// A request we sent.
    Out(RequestId),
    /// A request we received.
    In(IncomingId),
}

/// The datagram-producing half of the endpoint, split off so it can be borrowed while a
/// request's state is borrowed too.
#[derive(Debug)]
struct Wire {
    /// Our incarnation, stamped on every datagram.
    incarnation: u64,
    /// The cluster key every datagram is sealed with, if any.
    key: Option<ClusterKey>,
    /// The stamp of datagrams sent now (µs since the Unix epoch; set at every entry point).
    stamp: u64,
    /// The last transmission number used.
    last_tx: u32,
    /// Datagrams waiting for [`Endpoint::poll_transmit`].
    queue: VecDeque<Transmit>,
    /// Counters.
    stats: Stats,
}

impl Wire {
    /// Draws the next transmission number (never 0, which means "none" in `echo`).
    fn next_tx(&mut self) -> u32 {
        self.last_tx = self.last_tx.wrapping_add(1).max(1);
        self.last_tx
    }

    /// Queues a datagram with `header` (whose transmission number is filled in here).
    fn send(&mut self, dst: SocketAddr, header: Header, payload: &[u8]) -> u32 {
        self.send_padded(dst, header, payload, 0)
    }

    /// Queues a datagram with `header` and `payload`, padded with zeros to `pad_to` bytes
    /// (flagged [`FLAG_PADDED`]) if it is shorter.
    fn send_padded(
        &mut self,
        dst: SocketAddr,
        mut header: Header,
        payload: &[u8],
        pad_to: usize,
    ) -> u32 {
        header.transmission = self.next_tx();
        if self.key.is_some() {
            header.flags |= FLAG_MAC;
            header.stamp = self.stamp;
        }
        let padding = pad_to.saturating_sub(header.encoded_len() + payload.len());
        if padding > 0 {
            header.flags |= FLAG_PADDED;
        }
        let mut datagram = Vec::with_capacity(header.encoded_len() + payload.len() + padding);
        header.encode_into(&mut datagram);
        datagram.extend_from_slice(payload);
        datagram.resize(datagram.len() + padding, 0);
        if let Some(key) = &self.key {
            codec::seal(&mut datagram, key);
        }
        self.queue.push_back(Transmit {
            dst,
            payload: datagram,
        });
        self.stats.datagrams_sent += 1;
        header.transmission
    }

    /// Bytes of the header of every datagram sent: 60, or 68 with a cluster key.
    fn header_len(&self) -> usize {
        if self.key.is_some() {
            codec::MAX_HEADER_LEN
        } else {
            HEADER_LEN
        }
    }

    /// Queues an ack about request `request_id` answering transmission `echo`.
    fn send_ack(&mut self, dst: SocketAddr, request_id: u64, flags: u16, echo: u32, ack: &AckBody) {
        let mut header = Header::new(Kind::Ack, self.incarnation, request_id, 0);
        header.flags = flags;
        header.echo = echo;
        self.stats.acks_sent += 1;
        self.send(dst, header, &ack.encode());
    }

    /// Sends every fragment of `transfer` its window allows, as datagrams of `kind` about
    /// request `request_id`, answering `echo`, each padded to `pad_to` bytes.
    #[allow(clippy::too_many_arguments)]
    fn pump(
        &mut self,
        now: Instant,
        dst: SocketAddr,
        kind: Kind,
        request_id: u64,
        echo: u32,
        transfer: &mut Transfer,
        window: u32,
        pad_to: usize,
    ) {
        while let Some(index) = transfer.next_to_send(window) {
            let mut header = Header::new(kind, self.incarnation, request_id, 0);
            header.echo = echo;
            header.frag_index = index;
            header.frag_count = transfer.count();
            header.message_len = transfer.body_len() as u32;
            let tx = self.send_padded(dst, header, transfer.fragment(index), pad_to);
            if transfer.on_sent(index, tx, now) {
                self.stats.retransmissions += 1;
            }
        }
    }
}

/// One node's reliable request layer. See the module documentation for the calling contract.
#[derive(Debug)]
pub struct Endpoint {
    /// Tunables.
    config: Config,
    /// The datagram output half.
    wire: Wire,
    /// The last request id used.
    last_request: RequestId,
    /// Requests we sent, by id.
    outgoing: HashMap<RequestId, Outgoing>,
    /// Requests we received: the response cache.
    incoming: HashMap<IncomingId, Incoming>,
    /// Answered requests in the order they were answered, for expiry and eviction.
    expiry: VecDeque<(IncomingId, Instant)>,
    /// Bytes of response bodies held in the cache.
    cached_bytes: usize,
    /// Per requester incarnation: ids below this were answered and then forgotten (expired
    /// or evicted); such a request is a late duplicate and is never executed again.
    floors: HashMap<u64, Floor>,
    /// When floors were raised, oldest first, for forgetting them once no duplicate can
    /// arrive: at most one entry per incarnation per [`FLOOR_GRAIN`] of the TTL, so its
    /// length is bounded by the incarnations heard from, not by the request rate.
    floor_order: VecDeque<(u64, Instant)>,
    /// Bytes of partly reassembled messages, per peer.
    reassembly_bytes: HashMap<SocketAddr, usize>,
    /// Round-trip estimators, per peer.
    rtt: HashMap<SocketAddr, RttEstimator>,
    /// Timer deadlines (lazily invalidated: an entry counts only if its owner still has it).
    timers: BinaryHeap<Reverse<(Instant, TimerKey)>>,
    /// Events waiting for [`Endpoint::poll_event`].
    events: VecDeque<Event>,
    /// Validated addresses and address-validation tokens (anti-amplification).
    guard: Guard,
    /// Rate limit of the debug lines about datagrams the cluster key refused.
    auth_log: LogLimiter,
    /// Rate limit of the debug lines about floors forgotten over the bound.
    floor_log: LogLimiter,
    /// The latest `now` the endpoint was given: time never goes backwards for it.
    last_now: Option<Instant>,
    /// Steps taken, for checking the counters every [`COUNTER_CHECK_EVERY`] steps in debug
    /// builds.
    steps: u64,
}

/// How often (in steps) a debug build checks that the endpoint's counters equal what they
/// count: every step would make the floods of the tests quadratic.
const COUNTER_CHECK_EVERY: u64 = 64;

impl Endpoint {
    /// Creates an endpoint whose incarnation and first request id are drawn from `rng`.
    ///
    /// Request ids start at a random point: a response names only the request id (and the
    /// responder's incarnation), so a late answer meant for an earlier process on the same
    /// address must not match a request of this one. With both counting from 1, a restarted
    /// client once took another key's value for its own read (found by the simulator).
    ///
    /// A cluster key's replay window is kept at most half the dedup cache's lifetime, so that
    /// a replay young enough to be accepted always meets its request's cached answer.
    pub fn new(mut config: Config, rng: &mut Rng) -> Endpoint {
        let longest_window = config.dedup_ttl / 2;
        if let Some(auth) = &mut config.auth {
            auth.replay_window = auth.replay_window.min(longest_window);
        }
        let incarnation = rng.next_u64();
        let first_request = rng.next_u64() >> 1;
        let token_seed = config.token_secret.unwrap_or_else(|| {
            let mut seed = [0; 32];
            for chunk in seed.chunks_mut(8) {
                chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            seed
        });
        let guard = Guard::new(token_seed, config.validated_ttl, config.validated_max);
        let key = config.auth.as_ref().map(|a| a.key.clone());
        Endpoint {
            config,
            wire: Wire {
                incarnation,
                key,
                stamp: 0,
                last_tx: 0,
                queue: VecDeque::new(),
                stats: Stats::default(),
            },
            last_request: first_request,
            outgoing: HashMap::new(),
            incoming: HashMap::new(),
            expiry: VecDeque::new(),
            cached_bytes: 0,
            floors: HashMap::new(),
            floor_order: VecDeque::new(),
            reassembly_bytes: HashMap::new(),
            rtt: HashMap::new(),
            timers: BinaryHeap::new(),
            events: VecDeque::new(),
            guard,
            auth_log: LogLimiter::default(),
            floor_log: LogLimiter::default(),
            last_now: None,
            steps: 0,
        }
    }

    /// This endpoint's incarnation id (random per process start).
    pub fn incarnation(&self) -> u64 {
        self.wire.incarnation
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.wire.stats
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The current retransmission timeout towards `peer` (no backoff).
    pub fn rto(&self, peer: SocketAddr) -> Duration {
        self.rtt
            .get(&peer)
            .map_or(self.config.initial_rto, |r| r.rto(0))
    }

    /// The smoothed round-trip time towards `peer`, once measured.
    pub fn srtt(&self, peer: SocketAddr) -> Option<Duration> {
        self.rtt.get(&peer).and_then(RttEstimator::srtt)
    }

    /// Number of requests sent and not yet answered.
    pub fn outstanding(&self) -> usize {
        self.outgoing.len()
    }

    /// Number of entries in the response cache (executing requests included).
    pub fn cached_entries(&self) -> usize {
        self.incoming.len()
    }

    /// Starts a request to `dst`; its outcome arrives as [`Event::Response`]. `deadline`
    /// bounds the whole exchange (retransmissions are bounded by `max_attempts` anyway).
    pub fn request(
        &mut self,
        now: Instant,
        dst: SocketAddr,
        body: Vec<u8>,
        deadline: Option<Instant>,
    ) -> Result<RequestId, RequestError> {
        self.request_with(now, dst, body, deadline, None)
    }

    /// [`Endpoint::request`], giving up with `Timeout` after `unacked_attempts` consecutive
    /// retransmission timeouts while the peer has acknowledged nothing of the whole request
    /// (`None`: the configured `max_attempts`). The budget applies only to a peer whose round
    /// trip is known: its retransmission timeout is milliseconds, so a small budget tells a
    /// silent peer (frozen, cut off) quickly. With an unknown peer the usual limit applies
    /// (and the deadline bounds it anyway), as it does once the peer has the whole request
    /// (it is working on it).
    pub fn request_with(
        &mut self,
        now: Instant,
        dst: SocketAddr,
        body: Vec<u8>,
        deadline: Option<Instant>,
        unacked_attempts: Option<u32>,
    ) -> Result<RequestId, RequestError> {
        if body.len() > self.config.max_message {
            return Err(RequestError::TooLarge {
                size: body.len(),
                limit: self.config.max_message,
            });
        }
        self.tick(now);
        self.last_request += 1;
        let id = self.last_request;
        let transfer = Transfer::new(body, self.max_payload());
        // QUIC pads its first datagrams for the same reason: until the peer knows our address
        // is real, it may send back only three times what we sent, and a small request's
        // answer (a view, a value) often needs more. Padding a first contact's one-fragment
        // request to a third of a datagram lets any one-datagram answer come straight back.
        let pad_to =
            if transfer.count() == 1 && needs_validation(&self.config, &self.guard, now, dst) {
                self.config.max_datagram.div_ceil(AMPLIFICATION_FACTOR)
            } else {
                0
            };
        self.outgoing.insert(
            id,
            Outgoing {
                dst,
                transfer,
                phase: OutPhase::Sending,
                deadline,
                unacked_attempts: unacked_attempts.map_or(self.config.max_attempts, |a| {
                    a.min(self.config.max_attempts)
                }),
                last_rx_tx: 0,
                sampled_echo: 0,
                timer_at: None,
                pad_to,
            },
        );
        self.wire.stats.requests_sent += 1;
        self.pump_out(now, id);
        Ok(id)
    }

    /// Abandons request `id`: no event will be raised for it.
    pub fn cancel(&mut self, id: RequestId) {
        if let Some(out) = self.outgoing.remove(&id)
            && let OutPhase::Receiving(r) = &out.phase
        {
            self.release_reassembly(out.dst, r.footprint());
        }
    }

    /// Bytes of reassembly memory currently charged (all peers).
    pub fn reassembly_bytes(&self) -> usize {
        self.reassembly_bytes.values().sum()
    }

    /// Answers request `id` (raised as [`Event::Request`]) with `body`. The response is cached
    /// so retransmissions of the request are answered without executing it again. Answering
    /// an unknown or already answered request does nothing.
    pub fn respond(
        &mut self,
        now: Instant,
        id: IncomingId,
        body: Vec<u8>,
    ) -> Result<(), RequestError> {
        if body.len() > self.config.max_message {
            return Err(RequestError::TooLarge {
                size: body.len(),
                limit: self.config.max_message,
            });
        }
        self.tick(now);
        let max_payload = self.max_payload();
        let header_len = self.header_len();
        let Some(entry) = self.incoming.get_mut(&id) else {
            debug!("respond: request {id:?} is no longer known (evicted?)");
            return Ok(());
        };
        if !matches!(entry.phase, InPhase::Executing) {
            debug!("respond: request {id:?} was already answered");
            return Ok(());
        }
        self.cached_bytes += body.len();
        let transfer = Transfer::new(body, max_payload);
        let fragments = transfer.count();
        let response_bytes = fragments as usize * header_len + transfer.body_len();
        entry.phase = InPhase::Responded(transfer);
        entry.responded_at = Some(now);
        self.expiry.push_back((id, now));
        // A fragmented response is retransmitted on a timer, with nothing from the peer to
        // pay for it: it goes only to a validated address. A one-fragment response goes
        // only if it is small enough.
        let (peer, echo) = (entry.peer, entry.last_rx_tx);
        if fragments > 1 && needs_validation(&self.config, &self.guard, now, peer)
            || !may_reply(
                &self.config,
                &self.guard,
                now,
                peer,
                entry.request_bytes,
                response_bytes,
            )
        {
            entry.held = true;
            self.wire.stats.replies_held += 1;
            self.send_retry(now, peer, id.request, echo);
        } else {
            self.pump_in(now, id);
        }
        self.enforce_cache_bounds(now);
        Ok(())
    }

    /// Handles one datagram received from `from` at `now`. Anything malformed or unexpected
    /// is counted and dropped; nothing a peer sends can make this panic.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let bundle = codec::Bundle::new(datagram);
        if bundle.is_bundle() {
            self.wire.stats.bundles_received += 1;
        }
        for part in bundle.parts() {
            match part {
                Ok(part) => self.handle_one(now, from, part),
                Err(e) => {
                    self.wire.stats.bad_datagrams += 1;
                    debug!("dropping the rest of a bad bundle from {from}: {e}");
                }
            }
        }
    }

    /// Handles one datagram (alone, or one of a bundle) from `from`.
    fn handle_one(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        self.tick(now);
        self.wire.stats.datagrams_received += 1;
        let (header, payload) = match Header::decode(datagram) {
            Ok(decoded) => decoded,
            Err(e) => {
                self.wire.stats.bad_datagrams += 1;
                debug!(
                    "dropping a bad datagram of {} bytes from {from}: {e}",
                    datagram.len()
                );
                return;
            }
        };
        if !self.authentic(now, from, &header, datagram) {
            return;
        }
        let Some(payload) = codec::strip_padding(&header, payload) else {
            self.wire.stats.bad_datagrams += 1;
            debug!("dropping a badly padded datagram from {from}");
            return;
        };
        let received = datagram.len();
        match header.kind {
            Kind::Request => self.on_request_fragment(now, from, &header, payload, received),
            Kind::Response => self.on_response_fragment(now, from, &header, payload),
            Kind::Ack => match AckBody::decode(payload) {
                Ok(ack) if header.flags & FLAG_ACK_RESPONSE != 0 => {
                    self.on_response_ack(now, from, &header, &ack)
                }
                Ok(ack) => self.on_request_ack(now, from, &header, &ack),
                Err(e) => {
                    self.wire.stats.bad_datagrams += 1;
                    debug!("dropping a bad ack from {from}: {e}");
                }
            },
            Kind::Probe => self.on_probe(now, from, &header, payload, received),
            Kind::Retry => self.on_retry(from, &header, payload),
        }
    }

    /// Whether `datagram` (decoded as `header`) passes the cluster key: it carries a MAC
    /// the key gives, and a stamp inside the replay window and not before this process
    /// started. Without a key every datagram passes. A failure is counted and logged at
    /// debug level, at most once a second.
    fn authentic(
        &mut self,
        now: Instant,
        from: SocketAddr,
        header: &Header,
        datagram: &[u8],
    ) -> bool {
        let Some(auth) = &self.config.auth else {
            return true;
        };
        let refusal = if header.flags & FLAG_MAC == 0 {
            Refusal::NoMac
        } else if !codec::verify(datagram, &auth.key) {
            Refusal::BadMac
        } else {
            let wall = auth.clock.micros(now);
            let window = auth.replay_window.as_micros() as u64;
            if header.stamp.abs_diff(wall) <= window && header.stamp >= auth.clock.origin_micros() {
                return true;
            }
            Refusal::Stale {
                offset_ms: (i128::from(header.stamp) - i128::from(wall)) / 1000,
                window_ms: window / 1000,
            }
        };
        match refusal {
            Refusal::Stale { .. } => self.wire.stats.replays_refused += 1,
            _ => self.wire.stats.auth_failures += 1,
        }
        // Formatted only when a line goes out: under a flood most are held back.
        if let Some(held_back) = self.auth_log.allow(now) {
            debug!(
                "dropping a {}-byte datagram from {from} that {} (cluster key; {held_back} more refused since the last such line)",
                datagram.len(),
                refusal.describe()
            );
        }
        false
    }

    /// Sets the stamp of datagrams sent at `now` (with a cluster key).
    fn tick(&mut self, now: Instant) {
        debug_assert!(
            self.last_now.is_none_or(|last| now >= last),
            "time went backwards for the endpoint: {now:?} after {:?}",
            self.last_now
        );
        self.last_now = Some(self.last_now.map_or(now, |last| last.max(now)));
        self.steps += 1;
        if cfg!(debug_assertions) && self.steps.is_multiple_of(COUNTER_CHECK_EVERY) {
            self.check_counters();
        }
        if let Some(auth) = &self.config.auth {
            self.wire.stamp = auth.clock.micros(now);
        }
    }

    /// Debug builds: the counters kept by hand equal what they count (the response bodies
    /// cached, the reassembly memory charged to each peer). Panics naming the one that
    /// drifted.
    fn check_counters(&self) {
        let cached: usize = self
            .incoming
            .values()
            .map(|entry| match &entry.phase {
                InPhase::Responded(t) => t.body_len(),
                _ => 0,
            })
            .sum();
        assert_eq!(cached, self.cached_bytes, "cached_bytes drifted");
        let mut charged: HashMap<SocketAddr, usize> = HashMap::new();
        for entry in self.incoming.values() {
            if let InPhase::Receiving(r) = &entry.phase {
                *charged.entry(entry.peer).or_insert(0) += r.footprint();
            }
        }
        for out in self.outgoing.values() {
            if let OutPhase::Receiving(r) = &out.phase {
                *charged.entry(out.dst).or_insert(0) += r.footprint();
            }
        }
        for (peer, &bytes) in &self.reassembly_bytes {
            assert_eq!(
                charged.get(peer).copied().unwrap_or(0),
                bytes,
                "reassembly memory charged to {peer} drifted"
            );
        }
        for (peer, &bytes) in &charged {
            assert_eq!(
                self.reassembly_bytes.get(peer).copied().unwrap_or(0),
                bytes,
                "reassembly memory of {peer} not charged"
            );
        }
    }

    /// Bytes of the header of every datagram this endpoint sends.
    fn header_len(&self) -> usize {
        self.wire.header_len()
    }

    /// Asks the requester of `request_id` at `peer` to prove its address: a `Retry`
    /// carrying a token, answering transmission `echo`.
    fn send_retry(&mut self, now: Instant, peer: SocketAddr, request_id: u64, echo: u32) {
        let token = self.guard.token(now, peer);
        let mut header = Header::new(Kind::Retry, self.wire.incarnation, request_id, 0);
        header.echo = echo;
        self.wire.stats.retries_sent += 1;
        self.wire.send(peer, header, &token);
    }

    /// Handles a `Retry` about a request we sent: echoes its token in a probe, which
    /// proves we receive at our address.
    fn on_retry(&mut self, from: SocketAddr, header: &Header, token: &[u8]) {
        let id = header.request_id;
        if self.outgoing.get(&id).is_none_or(|o| o.dst != from) {
            return;
        }
        if token.len() != crate::wire::auth::TOKEN_LEN {
            self.wire.stats.bad_datagrams += 1;
            debug!(
                "dropping a retry from {from} with a {}-byte token",
                token.len()
            );
            return;
        }
        let mut probe = Header::new(Kind::Probe, self.wire.incarnation, id, 0);
        probe.echo = header.transmission;
        self.wire.stats.probes_sent += 1;
        self.wire.send(from, probe, token);
    }

    /// The OS reported `peer` unreachable (e.g. ICMP port unreachable): every request to it
    /// fails with `Unreachable`, and responses being sent to it are abandoned.
    pub fn handle_unreachable(&mut self, _now: Instant, peer: SocketAddr) {
        let failed: Vec<RequestId> = self
            .outgoing
            .iter()
            .filter(|(_, o)| o.dst == peer)
            .map(|(&id, _)| id)
            .collect();
        // In request order, so that a replayed run fails them in the same order.
        let mut failed = failed;
        failed.sort_unstable();
        for id in failed {
            self.fail(id, RequestError::Unreachable { peer });
        }
        for entry in self.incoming.values_mut() {
            if entry.peer == peer
                && let InPhase::Responded(t) = &entry.phase
                && t.count() > 1
            {
                self.cached_bytes -= t.body_len();
                entry.phase = InPhase::Delivered;
                entry.timer_at = None;
            }
        }
    }

    /// The earliest instant at which [`Endpoint::handle_timeout`] has work, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let timer = self.timers.peek().map(|Reverse((at, _))| *at);
        let expiry = self
            .expiry
            .front()
            .map(|&(_, at)| at + self.config.dedup_ttl);
        match (timer, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs every timer due at `now`: retransmissions, probes, deadlines, cache expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.tick(now);
        while let Some(Reverse((at, key))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            match key {
                TimerKey::Out(id) => {
                    if self
                        .outgoing
                        .get(&id)
                        .is_some_and(|o| o.timer_at == Some(at))
                    {
                        self.on_out_timer(now, id);
                    }
                }
                TimerKey::In(id) => {
                    if self
                        .incoming
                        .get(&id)
                        .is_some_and(|e| e.timer_at == Some(at))
                    {
                        self.on_in_timer(now, id);
                    }
                }
            }
        }
        while let Some(&(id, at)) = self.expiry.front() {
            if at + self.config.dedup_ttl > now {
                break;
            }
            self.expiry.pop_front();
            self.forget(now, id, at);
        }
        // A floor outlives its entries by a TTL: by then no duplicate of them can arrive.
        let keep = self.config.dedup_ttl * 2;
        while let Some(&(incarnation, at)) = self.floor_order.front() {
            if at + keep > now {
                break;
            }
            self.floor_order.pop_front();
            let Some(floor) = self.floors.get_mut(&incarnation) else {
                continue;
            };
            if floor.queued != at {
                continue; // a later entry of this incarnation is queued
            }
            if floor.raised + keep <= now {
                self.floors.remove(&incarnation);
            } else {
                // Raised since it was queued: look again a whole period from now.
                floor.queued = now;
                self.floor_order.push_back((incarnation, now));
            }
        }
    }

    /// The next datagram to send, if any. With [`Config::coalesce`], the datagrams queued
    /// for the same peer travel together as one bundle of at most [`Config::max_datagram`]
    /// bytes; calling this after every turn of the event loop (all input handled) is what
    /// makes that coalescing cost no latency.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let first = self.wire.queue.pop_front()?;
        if !self.config.coalesce {
            return Some(first);
        }
        let limit = self.config.max_datagram;
        let smallest = codec::bundled_len(codec::HEADER_LEN);
        let mut room = limit
            .saturating_sub(codec::BUNDLE_HEADER_LEN + codec::bundled_len(first.payload.len()));
        let mut parts = Vec::new();
        let mut i = 0;
        while room >= smallest && i < self.wire.queue.len() {
            let next = &self.wire.queue[i];
            let len = codec::bundled_len(next.payload.len());
            if next.dst == first.dst && len <= room {
                room -= len;
                parts.push(self.wire.queue.remove(i).expect("index checked").payload);
            } else {
                i += 1;
            }
        }
        if parts.is_empty() {
            return Some(first);
        }
        self.wire.stats.bundles_sent += 1;
        let payload = codec::bundle(
            std::iter::once(first.payload.as_slice()).chain(parts.iter().map(Vec::as_slice)),
        );
        Some(Transmit {
            dst: first.dst,
            payload,
        })
    }

    /// The next event for the application, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Payload bytes one datagram can carry.
    fn max_payload(&self) -> usize {
        self.config
            .max_datagram
            .saturating_sub(self.header_len())
            .max(1)
    }

    /// The RTT estimator for `peer`, created on first use.
    fn rtt_of(&mut self, peer: SocketAddr) -> &mut RttEstimator {
        let (initial, min, max) = (
            self.config.initial_rto,
            self.config.min_rto,
            self.config.max_rto,
        );
        self.rtt
            .entry(peer)
            .or_insert_with(|| RttEstimator::new(initial, min, max))
    }

    /// Arms the timer of `key` for `at` (replacing any earlier arming).
    fn arm(&mut self, key: TimerKey, at: Option<Instant>) {
        match key {
            TimerKey::Out(id) => {
                if let Some(out) = self.outgoing.get_mut(&id) {
                    out.timer_at = at;
                }
            }
            TimerKey::In(id) => {
                if let Some(entry) = self.incoming.get_mut(&id) {
                    entry.timer_at = at;
                }
            }
        }
        if let Some(at) = at {
            self.timers.push(Reverse((at, key)));
        }
    }

    /// Sends what request `id`'s window allows and re-arms its timer.
    fn pump_out(&mut self, now: Instant, id: RequestId) {
        let window = self.config.window;
        let Some(out) = self.outgoing.get_mut(&id) else {
            return;
        };
        if !matches!(out.phase, OutPhase::Sending) {
            return;
        }
        let echo = out.last_rx_tx;
        self.wire.pump(
            now,
            out.dst,
            Kind::Request,
            id,
            echo,
            &mut out.transfer,
            window,
            out.pad_to,
        );
        let (dst, backoff, deadline) = (out.dst, out.transfer.backoff, out.deadline);
        let fragments = out.transfer.count();
        let floor = self.request_floor(fragments);
        let rto = self.rtt_of(dst).rto_with_floor(backoff, floor);
        let out = &self.outgoing[&id];
        let at = earliest(out.transfer.deadline(rto), deadline);
        self.arm(TimerKey::Out(id), at);
    }

    /// The retransmission floor of a request of `fragments` fragments.
    fn request_floor(&self, fragments: u32) -> Duration {
        if fragments == 1 {
            self.config.min_rto_lone
        } else {
            self.config.min_rto
        }
    }

    /// Sends what the response transfer of `id` allows and re-arms its timer.
    fn pump_in(&mut self, now: Instant, id: IncomingId) {
        let window = self.config.window;
        let Some(entry) = self.incoming.get_mut(&id) else {
            return;
        };
        if entry.held {
            return;
        }
        let InPhase::Responded(transfer) = &mut entry.phase else {
            return;
        };
        let fresh = now.saturating_duration_since(entry.last_rx_at) <= ECHO_FRESHNESS;
        let (peer, echo) = (entry.peer, if fresh { entry.last_rx_tx } else { 0 });
        self.wire.pump(
            now,
            peer,
            Kind::Response,
            id.request,
            echo,
            transfer,
            window,
            0,
        );
        // A one-fragment response is never acknowledged: it just sits in the cache.
        let timer = if transfer.count() > 1 {
            let backoff = transfer.backoff;
            let rto = self.rtt_of(peer).rto(backoff);
            match &self.incoming[&id].phase {
                InPhase::Responded(t) => t.deadline(rto),
                _ => None,
            }
        } else {
            None
        };
        self.arm(TimerKey::In(id), timer);
    }

    /// Handles one fragment of a request from `from`.
    fn on_request_fragment(
        &mut self,
        now: Instant,
        from: SocketAddr,
        header: &Header,
        payload: &[u8],
        received: usize,
    ) {
        let id = IncomingId::of(header);
        let Some(entry) = self.incoming.get_mut(&id) else {
            self.on_new_request(now, from, id, header, payload, received);
            return;
        };
        if entry.peer != from {
            self.wire.stats.bad_datagrams += 1;
            debug!(
                "dropping a fragment of {id:?} from {from}: the request came from {}",
                entry.peer
            );
            return;
        }
        // The answer echoes the send that the application is answering: a copy that arrives
        // while it executes does not replace it, so a requester can tell from the echo that
        // its resend was needless (see `Stats::needless_resends`).
        if !matches!(entry.phase, InPhase::Executing) {
            entry.last_rx_tx = header.transmission;
            entry.last_rx_at = now;
        }
        match &mut entry.phase {
            InPhase::Receiving(r) => {
                let (insert, ack_now) = r.insert(header, payload, now);
                if insert == Insert::Invalid {
                    self.wire.stats.bad_datagrams += 1;
                    debug!("dropping a fragment from {from} that does not fit request {id:?}");
                    return;
                }
                if ack_now {
                    let ack = r.ack();
                    let ack_bytes = self.wire.header_len() + ack.encoded_len();
                    // Acks are advisory: one too large for an unvalidated peer is skipped.
                    if may_reply(&self.config, &self.guard, now, from, received, ack_bytes) {
                        self.wire
                            .send_ack(from, id.request, 0, header.transmission, &ack);
                    }
                }
                if r.is_complete() {
                    let InPhase::Receiving(r) =
                        std::mem::replace(&mut entry.phase, InPhase::Executing)
                    else {
                        return;
                    };
                    entry.timer_at = None;
                    let peer = entry.peer;
                    self.release_reassembly(peer, r.footprint());
                    self.deliver_request(from, id, r.into_message());
                }
            }
            InPhase::Executing => {
                // Still working on it: say so, which also stops the fragment resends.
                self.wire.stats.duplicates_suppressed += 1;
                let ack = AckBody {
                    complete: true,
                    unknown: false,
                    ranges: Vec::new(),
                };
                self.wire
                    .send_ack(from, id.request, 0, header.transmission, &ack);
            }
            InPhase::Responded(_) => {
                self.wire.stats.duplicates_suppressed += 1;
                self.answer_again(now, from, id, header.transmission, received);
            }
            InPhase::Delivered => self.wire.stats.duplicates_suppressed += 1,
        }
    }

    /// Answers a duplicate of answered request `id` (a request datagram or probe of
    /// `received` bytes, transmission `echo`): a held response goes out once `from` is
    /// validated, else a `Retry` asks for that; a one-fragment response is sent again if
    /// the anti-amplification limit allows, else a `Retry` goes instead. A fragmented
    /// response being sent is left to its own timer.
    fn answer_again(
        &mut self,
        now: Instant,
        from: SocketAddr,
        id: IncomingId,
        echo: u32,
        received: usize,
    ) {
        let header_len = self.header_len();
        let Some(entry) = self.incoming.get_mut(&id) else {
            return;
        };
        let InPhase::Responded(transfer) = &entry.phase else {
            return;
        };
        let response_bytes = header_len + transfer.body_len();
        let single = transfer.count() == 1;
        if entry.held {
            if needs_validation(&self.config, &self.guard, now, from) {
                self.send_retry(now, from, id.request, echo);
            } else {
                entry.held = false;
                self.pump_in(now, id);
            }
        } else if single {
            if may_reply(
                &self.config,
                &self.guard,
                now,
                from,
                received,
                response_bytes,
            ) {
                self.resend_cached(from, id, echo);
            } else {
                self.send_retry(now, from, id.request, echo);
            }
        }
    }

    /// Handles the first datagram of a request not seen before.
    #[allow(clippy::too_many_arguments)]
    fn on_new_request(
        &mut self,
        now: Instant,
        from: SocketAddr,
        id: IncomingId,
        header: &Header,
        payload: &[u8],
        received: usize,
    ) {
        if self
            .floors
            .get(&id.incarnation)
            .is_some_and(|floor| id.request < floor.below)
        {
            // Answered long ago and forgotten: a late duplicate, never executed again.
            self.wire.stats.duplicates_suppressed += 1;
            return;
        }
        if self.incoming.len() >= self.config.dedup_max_entries && !self.evict_oldest(now) {
            self.wire.stats.refused_over_limit += 1;
            debug!("refusing a request from {from}: the response cache is full");
            return;
        }
        // A one-fragment request counts with its padding; a fragmented one as if every
        // fragment had come once.
        let request_bytes = if header.frag_count == 1 {
            received
        } else {
            header.frag_count as usize * header.encoded_len() + header.message_len as usize
        };
        if header.frag_count == 1 {
            if payload.len() != header.message_len as usize {
                self.wire.stats.bad_datagrams += 1;
                return;
            }
            self.incoming.insert(
                id,
                Incoming {
                    peer: from,
                    phase: InPhase::Executing,
                    last_rx_tx: header.transmission,
                    last_rx_at: now,
                    responded_at: None,
                    timer_at: None,
                    request_bytes,
                    held: false,
                },
            );
            self.deliver_request(from, id, payload.to_vec());
            return;
        }
        let size = header.message_len as usize;
        let footprint = Reassembly::footprint_of(header);
        if size > self.config.max_message || !self.reserve_reassembly(from, footprint) {
            self.wire.stats.refused_over_limit += 1;
            debug!("refusing a {size}-byte request from {from}: reassembly memory bound reached");
            return;
        }
        let mut r = Reassembly::new(header, now);
        let (insert, ack_now) = r.insert(header, payload, now);
        if insert == Insert::Invalid {
            self.release_reassembly(from, r.footprint());
            self.wire.stats.bad_datagrams += 1;
            debug!("dropping a first fragment from {from} that does not fit its own header");
            return;
        }
        if ack_now {
            let ack = r.ack();
            let ack_bytes = self.wire.header_len() + ack.encoded_len();
            if may_reply(&self.config, &self.guard, now, from, received, ack_bytes) {
                self.wire
                    .send_ack(from, id.request, 0, header.transmission, &ack);
            }
        }
        self.incoming.insert(
            id,
            Incoming {
                peer: from,
                phase: InPhase::Receiving(r),
                last_rx_tx: header.transmission,
                last_rx_at: now,
                responded_at: None,
                timer_at: None,
                request_bytes,
                held: false,
            },
        );
        self.arm(TimerKey::In(id), Some(now + self.config.reassembly_timeout));
    }

    /// Raises a complete request to the application.
    fn deliver_request(&mut self, from: SocketAddr, id: IncomingId, body: Vec<u8>) {
        self.wire.stats.requests_executed += 1;
        self.events.push_back(Event::Request { from, id, body });
    }

    /// Sends the cached one-fragment response of `id` again, answering transmission `echo`.
    fn resend_cached(&mut self, to: SocketAddr, id: IncomingId, echo: u32) {
        let Some(Incoming {
            phase: InPhase::Responded(t),
            ..
        }) = self.incoming.get(&id)
        else {
            return;
        };
        let mut header = Header::new(Kind::Response, self.wire.incarnation, id.request, 0);
        header.echo = echo;
        header.message_len = t.body_len() as u32;
        let body = t.body().to_vec();
        self.wire.stats.responses_from_cache += 1;
        self.wire.send(to, header, &body);
    }

    /// Handles one fragment of a response to a request we sent.
    fn on_response_fragment(
        &mut self,
        now: Instant,
        from: SocketAddr,
        header: &Header,
        payload: &[u8],
    ) {
        let id = header.request_id;
        if self.outgoing.get(&id).is_some_and(|o| o.dst == from) {
            // It answers our random request id: it receives at its address.
            self.guard.validate(now, from);
        }
        let Some(out) = self.outgoing.get_mut(&id).filter(|o| o.dst == from) else {
            // A late copy of an answer we already have: make a fragmented sender stop.
            if header.frag_count > 1 {
                let ack = AckBody {
                    complete: true,
                    unknown: false,
                    ranges: Vec::new(),
                };
                self.wire
                    .send_ack(from, id, FLAG_ACK_RESPONSE, header.transmission, &ack);
            }
            return;
        };
        out.last_rx_tx = header.transmission;
        if header.echo != out.sampled_echo
            && let Some(sample) = echo_sample(out, header.echo, now)
        {
            out.sampled_echo = header.echo;
            if out.transfer.count() == 1 && out.transfer.echo_shows_needless_resend(header.echo) {
                self.wire.stats.needless_resends += 1;
            }
            self.rtt_of(from).sample(sample);
        }
        let Some(out) = self.outgoing.get_mut(&id) else {
            return;
        };
        if header.frag_count == 1 {
            if payload.len() != header.message_len as usize {
                self.wire.stats.bad_datagrams += 1;
                return;
            }
            self.complete(id, Ok(payload.to_vec()));
            return;
        }
        if !matches!(out.phase, OutPhase::Receiving(_)) {
            let footprint = Reassembly::footprint_of(header);
            if !self.reserve_reassembly(from, footprint) {
                // Nothing would ever re-arm this request: fail it now.
                self.wire.stats.refused_over_limit += 1;
                let limit = self.config.reassembly_per_peer;
                self.fail(
                    id,
                    RequestError::TooLarge {
                        size: footprint,
                        limit,
                    },
                );
                return;
            }
            let out = self.outgoing.get_mut(&id).expect("checked above");
            out.transfer.mark_all_acked();
            out.phase = OutPhase::Receiving(Reassembly::new(header, now));
        }
        let out = self.outgoing.get_mut(&id).expect("checked above");
        let OutPhase::Receiving(r) = &mut out.phase else {
            return;
        };
        let (insert, ack_now) = r.insert(header, payload, now);
        if insert == Insert::Invalid {
            self.wire.stats.bad_datagrams += 1;
            debug!("dropping a response fragment from {from} that does not fit request {id}");
            return;
        }
        if ack_now {
            let ack = r.ack();
            self.wire
                .send_ack(from, id, FLAG_ACK_RESPONSE, header.transmission, &ack);
        }
        if r.is_complete() {
            let OutPhase::Receiving(r) = std::mem::replace(&mut out.phase, OutPhase::Sending)
            else {
                return;
            };
            self.release_reassembly(from, r.footprint());
            self.complete(id, Ok(r.into_message()));
        } else {
            // While the responder drives the transfer, only its silence can time us out.
            let idle = now + self.config.max_rto * 2;
            let at = earliest(Some(idle), out.deadline);
            self.arm(TimerKey::Out(id), at);
        }
    }

    /// Handles an ack about fragments of a request we sent.
    fn on_request_ack(&mut self, now: Instant, from: SocketAddr, header: &Header, ack: &AckBody) {
        let id = header.request_id;
        let Some(out) = self.outgoing.get_mut(&id).filter(|o| o.dst == from) else {
            return;
        };
        // It names our random request id: it receives at its address.
        self.guard.validate(now, from);
        out.last_rx_tx = header.transmission;
        if ack.unknown {
            // The responder has no record of this request (it restarted, or evicted it):
            // send it again from scratch.
            debug!("request {id} unknown at {from}; sending it again");
            out.transfer.restart();
            if let OutPhase::Receiving(r) = std::mem::replace(&mut out.phase, OutPhase::Sending) {
                self.release_reassembly(from, r.footprint());
            }
            self.pump_out(now, id);
            return;
        }
        match &mut out.phase {
            OutPhase::Sending => {
                let outcome = out.transfer.on_ack(ack, header.echo, now);
                if let Some(sample) = outcome.rtt_sample {
                    self.rtt_of(from).sample(sample);
                }
                let out = self.outgoing.get_mut(&id).expect("checked above");
                if out.transfer.is_complete() {
                    out.phase = OutPhase::Awaiting {
                        stalls: 0,
                        backoff: 0,
                        probe_tx: 0,
                        probe_sent: None,
                    };
                    let rto = self.rtt_of(from).rto(0);
                    let deadline = self.outgoing[&id].deadline;
                    self.arm(TimerKey::Out(id), earliest(Some(now + rto), deadline));
                } else {
                    self.pump_out(now, id);
                }
            }
            OutPhase::Awaiting {
                stalls,
                backoff,
                probe_tx,
                probe_sent,
            } => {
                // The responder is alive and executing: keep waiting, however long it takes
                // (the deadline still bounds it), probing at most every 8 RTOs so that a lost
                // response is noticed soon without chattering during a long execution.
                *stalls = 0;
                *backoff = (*backoff).min(3);
                if header.echo != 0
                    && header.echo == *probe_tx
                    && let Some(sent) = probe_sent.take()
                {
                    let sample = now.saturating_duration_since(sent);
                    self.rtt_of(from).sample(sample);
                }
            }
            OutPhase::Receiving(_) => {}
        }
    }

    /// Handles an ack about fragments of a response we are sending.
    fn on_response_ack(&mut self, now: Instant, from: SocketAddr, header: &Header, ack: &AckBody) {
        let id = IncomingId::of(header);
        let Some(entry) = self.incoming.get_mut(&id).filter(|e| e.peer == from) else {
            return;
        };
        entry.last_rx_tx = header.transmission;
        entry.last_rx_at = now;
        let InPhase::Responded(transfer) = &mut entry.phase else {
            return;
        };
        let outcome = transfer.on_ack(ack, header.echo, now);
        if transfer.is_complete() {
            self.cached_bytes -= transfer.body_len();
            entry.phase = InPhase::Delivered;
            entry.timer_at = None;
        }
        if let Some(sample) = outcome.rtt_sample {
            self.rtt_of(from).sample(sample);
        }
        self.pump_in(now, id);
    }

    /// Handles a probe: a requester asking what became of a request it fully delivered,
    /// or echoing (in `payload`) the token of a `Retry`, which validates its address.
    fn on_probe(
        &mut self,
        now: Instant,
        from: SocketAddr,
        header: &Header,
        payload: &[u8],
        received: usize,
    ) {
        let id = IncomingId::of(header);
        let echo = header.transmission;
        if !payload.is_empty() {
            if self.guard.check_token(now, from, payload) {
                if self.guard.validate(now, from) {
                    self.wire.stats.addresses_validated += 1;
                }
            } else {
                self.wire.stats.bad_datagrams += 1;
                debug!("a probe from {from} carries a token that is not ours, or expired");
            }
        }
        let forgotten = self
            .floors
            .get(&id.incarnation)
            .is_some_and(|floor| id.request < floor.below);
        if let Some(entry) = self.incoming.get_mut(&id) {
            if entry.peer != from {
                self.wire.stats.bad_datagrams += 1;
                return;
            }
            entry.last_rx_tx = echo;
            entry.last_rx_at = now;
        } else if forgotten {
            // Answered and forgotten: saying "unknown" would invite a second execution.
            return;
        }
        let ack = match self.incoming.get_mut(&id).map(|e| &mut e.phase) {
            None => AckBody {
                complete: false,
                unknown: true,
                ranges: Vec::new(),
            },
            Some(InPhase::Receiving(r)) => r.ack(),
            Some(InPhase::Executing) => AckBody {
                complete: true,
                unknown: false,
                ranges: Vec::new(),
            },
            Some(InPhase::Responded(_)) => {
                self.answer_again(now, from, id, echo, received);
                return;
            }
            Some(InPhase::Delivered) => return,
        };
        let ack_bytes = self.wire.header_len() + ack.encoded_len();
        if may_reply(&self.config, &self.guard, now, from, received, ack_bytes) {
            self.wire.send_ack(from, id.request, 0, echo, &ack);
        }
    }

    /// Runs the timer of request `id` that we sent.
    fn on_out_timer(&mut self, now: Instant, id: RequestId) {
        let max_attempts = self.config.max_attempts;
        let Some(out) = self.outgoing.get_mut(&id) else {
            return;
        };
        let peer = out.dst;
        if out.deadline.is_some_and(|d| d <= now) {
            self.fail(id, RequestError::Timeout { peer });
            return;
        }
        match &mut out.phase {
            OutPhase::Sending => {
                let (backoff, fragments) = (out.transfer.backoff, out.transfer.count());
                let budget = out.unacked_attempts;
                let floor = self.request_floor(fragments);
                let rtt = self.rtt_of(peer);
                let rto = rtt.rto_with_floor(backoff, floor);
                // The budget judges a peer whose round trip is known: an unknown one (a
                // fresh process's first contact) keeps the usual limit, since under heavy
                // loss (20% each way) eight attempts in a row fail once in 3 600.
                let limit = if rtt.srtt().is_some() {
                    budget
                } else {
                    max_attempts
                };
                let out = self.outgoing.get_mut(&id).expect("checked above");
                out.transfer.on_timeout(now, rto);
                if out.transfer.backoff > limit {
                    self.fail(id, RequestError::Timeout { peer });
                    return;
                }
                self.pump_out(now, id);
            }
            OutPhase::Awaiting {
                stalls,
                backoff,
                probe_tx,
                probe_sent,
            } => {
                *stalls += 1;
                if *stalls > max_attempts {
                    self.fail(id, RequestError::Timeout { peer });
                    return;
                }
                *backoff += 1;
                let header = Header::new(Kind::Probe, self.wire.incarnation, id, 0);
                *probe_tx = self.wire.send(peer, header, &[]);
                *probe_sent = Some(now);
                self.wire.stats.probes_sent += 1;
                let backoff = *backoff;
                let deadline = out.deadline;
                let rto = self.rtt_of(peer).rto(backoff);
                self.arm(TimerKey::Out(id), earliest(Some(now + rto), deadline));
            }
            OutPhase::Receiving(r) => {
                let idle_since = r.last_activity;
                let deadline = out.deadline;
                if idle_since + self.config.max_rto * 2 <= now {
                    self.fail(id, RequestError::Timeout { peer });
                } else {
                    let at = earliest(Some(idle_since + self.config.max_rto * 2), deadline);
                    self.arm(TimerKey::Out(id), at);
                }
            }
        }
    }

    /// Runs the timer of request `id` that we received (reassembly or response transfer).
    fn on_in_timer(&mut self, now: Instant, id: IncomingId) {
        let max_attempts = self.config.max_attempts;
        let Some(entry) = self.incoming.get_mut(&id) else {
            return;
        };
        let peer = entry.peer;
        match &mut entry.phase {
            InPhase::Receiving(r) => {
                let idle_until = r.last_activity + self.config.reassembly_timeout;
                if idle_until <= now {
                    debug!("abandoning a partly received request from {peer}");
                    let footprint = r.footprint();
                    self.incoming.remove(&id);
                    self.release_reassembly(peer, footprint);
                } else {
                    self.arm(TimerKey::In(id), Some(idle_until));
                }
            }
            InPhase::Responded(transfer) => {
                let rto = match self.rtt.get(&peer) {
                    Some(r) => r.rto(transfer.backoff),
                    None => self.config.initial_rto,
                };
                transfer.on_timeout(now, rto);
                if transfer.backoff > max_attempts {
                    debug!("giving up sending a response to {peer}");
                    self.cached_bytes -= transfer.body_len();
                    entry.phase = InPhase::Delivered;
                    entry.timer_at = None;
                    return;
                }
                self.pump_in(now, id);
            }
            InPhase::Executing | InPhase::Delivered => {}
        }
    }

    /// Ends request `id` with `result`, raising the event and releasing any reassembly
    /// memory the request held.
    fn complete(&mut self, id: RequestId, result: Result<Vec<u8>, RequestError>) {
        let Some(out) = self.outgoing.remove(&id) else {
            return;
        };
        if let OutPhase::Receiving(r) = &out.phase {
            self.release_reassembly(out.dst, r.footprint());
        }
        if matches!(result, Err(RequestError::Timeout { .. })) {
            self.wire.stats.timeouts += 1;
        }
        self.events.push_back(Event::Response { id, result });
    }

    /// Fails request `id` with `error`.
    fn fail(&mut self, id: RequestId, error: RequestError) {
        self.complete(id, Err(error));
    }

    /// Tries to charge `footprint` bytes of reassembly memory to `peer`; false if a bound
    /// forbids it.
    fn reserve_reassembly(&mut self, peer: SocketAddr, footprint: usize) -> bool {
        let total: usize = self.reassembly_bytes.values().sum();
        let mine = self.reassembly_bytes.get(&peer).copied().unwrap_or(0);
        if mine + footprint > self.config.reassembly_per_peer
            || total + footprint > self.config.reassembly_total
        {
            return false;
        }
        *self.reassembly_bytes.entry(peer).or_insert(0) += footprint;
        true
    }

    /// Returns `footprint` bytes of reassembly memory charged to `peer` (the same figure
    /// [`Reassembly::footprint_of`] charged).
    fn release_reassembly(&mut self, peer: SocketAddr, footprint: usize) {
        if let Some(bytes) = self.reassembly_bytes.get_mut(&peer) {
            *bytes = bytes.saturating_sub(footprint);
            if *bytes == 0 {
                self.reassembly_bytes.remove(&peer);
            }
        }
    }

    /// Forgets answered entry `id` if it is still the one answered at `stamp`, raising its
    /// incarnation's floor so that a late duplicate is never executed again. A fragmented
    /// response still being sent is kept (queued again with a new stamp). Returns whether
    /// the entry was forgotten.
    fn forget(&mut self, now: Instant, id: IncomingId, stamp: Instant) -> bool {
        let Some(entry) = self.incoming.get_mut(&id) else {
            return false;
        };
        if entry.responded_at != Some(stamp) {
            return false;
        }
        // A held response waits for an address that may never prove itself: forgettable.
        if !entry.held && matches!(&entry.phase, InPhase::Responded(t) if t.count() > 1) {
            entry.responded_at = Some(now);
            self.expiry.push_back((id, now));
            return false;
        }
        if let Some(Incoming {
            phase: InPhase::Responded(t),
            ..
        }) = self.incoming.remove(&id)
        {
            self.cached_bytes -= t.body_len();
        }
        let grain = self.config.dedup_ttl / FLOOR_GRAIN;
        let floor = self.floors.entry(id.incarnation).or_insert(Floor {
            below: 0,
            raised: now,
            queued: now,
        });
        let fresh = floor.below == 0;
        floor.below = floor.below.max(id.request.saturating_add(1));
        floor.raised = now;
        if fresh || floor.queued + grain <= now {
            floor.queued = now;
            self.floor_order.push_back((id.incarnation, now));
        }
        if fresh {
            self.enforce_floor_bound(now);
        }
        true
    }

    /// Drops the floors raised longest ago while more than [`Config::floors_max`] are held
    /// (a flood of requests from ever new incarnations must not grow them without bound).
    /// A dropped floor's late duplicates are then refused only by the replay window of a
    /// cluster key, if one is in force.
    fn enforce_floor_bound(&mut self, now: Instant) {
        while self.floors.len() > self.config.floors_max.max(1) {
            let Some((incarnation, at)) = self.floor_order.pop_front() else {
                return;
            };
            // Each floor has exactly one queue entry stamped with its `queued` time.
            if self
                .floors
                .get(&incarnation)
                .is_some_and(|f| f.queued == at)
            {
                self.floors.remove(&incarnation);
                self.wire.stats.floors_evicted += 1;
                if let Some(held_back) = self.floor_log.allow(now) {
                    debug!(
                        "forgot the floor of requester incarnation {incarnation:#x}: more than {} floors ({held_back} more such lines held back)",
                        self.config.floors_max
                    );
                }
            }
        }
    }

    /// Forgets the oldest answered entry that may be forgotten; false if there is none.
    fn evict_oldest(&mut self, now: Instant) -> bool {
        // Entries still sending are queued again, so look at each queued entry at most once.
        for _ in 0..self.expiry.len() {
            let Some((id, stamp)) = self.expiry.pop_front() else {
                return false;
            };
            if self.forget(now, id, stamp) {
                return true;
            }
        }
        false
    }

    /// Forgets the oldest answered entries while the cache holds too many bytes.
    fn enforce_cache_bounds(&mut self, now: Instant) {
        while self.cached_bytes > self.config.dedup_max_bytes && self.evict_oldest(now) {}
    }
}

/// An RTT sample from a response echoing transmission `echo` of request `out`, if it does.
fn echo_sample(out: &Outgoing, echo: u32, now: Instant) -> Option<Duration> {
    if echo == 0 {
        return None;
    }
    if let OutPhase::Awaiting {
        probe_tx,
        probe_sent: Some(sent),
        ..
    } = out.phase
        && probe_tx == echo
    {
        return Some(now.saturating_duration_since(sent));
    }
    out.transfer
        .sent_at_of(echo)
        .map(|sent| now.saturating_duration_since(sent))
}

/// Why the cluster key refused a datagram.
enum Refusal {
    /// It carries no MAC.
    NoMac,
    /// Its MAC is not the one the key gives.
    BadMac,
    /// Its stamp lies outside the replay window, or before this process started.
    Stale {
        /// Stamp minus the receiver's clock, in ms.
        offset_ms: i128,
        /// The replay window, in ms.
        window_ms: u64,
    },
}

impl Refusal {
    /// The refusal as the end of a log line ("a datagram that ...").
    fn describe(&self) -> String {
        match self {
            Refusal::NoMac => "carries no MAC".into(),
            Refusal::BadMac => "fails the MAC check".into(),
            Refusal::Stale {
                offset_ms,
                window_ms,
            } => format!(
                "is stamped {offset_ms} ms from now, outside the {window_ms} ms replay window or \
                 before this process started"
            ),
        }
    }
}

/// Whether a reply to `peer` at `now` must wait for its address to be validated: the
/// anti-amplification check is on, no cluster key authenticated the request, and `peer` was
/// not validated recently.
fn needs_validation(config: &Config, guard: &Guard, now: Instant, peer: SocketAddr) -> bool {
    config.validate_addresses && config.auth.is_none() && !guard.is_validated(now, peer)
}

/// Whether a reply of `reply_bytes` may go to `peer` at `now` in answer to datagrams of
/// `received` bytes: always to a validated address or under a cluster key, otherwise only
/// within [`AMPLIFICATION_FACTOR`] times `received`.
fn may_reply(
    config: &Config,
    guard: &Guard,
    now: Instant,
    peer: SocketAddr,
    received: usize,
    reply_bytes: usize,
) -> bool {
    reply_bytes <= AMPLIFICATION_FACTOR * received || !needs_validation(config, guard, now, peer)
}

/// The earlier of two optional instants.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
