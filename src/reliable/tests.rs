//! Tests of the reliable layer in virtual time: endpoints wired through the crate's one
//! simulated network ([`crate::faults::network::Network`]), whose delay, loss, duplication
//! and reordering the product's own `--faults` injector decides. No sockets, no wall clock.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::faults::network::Network;
use crate::faults::{FaultInjector, FaultSpec};
use crate::util::rng::Rng;
use crate::wire::codec::{Header, Kind};

/// Decides, for a datagram about to enter the network, whether it is dropped.
type DropRule = Box<dyn FnMut(&Header, SocketAddr, SocketAddr) -> bool>;

/// The network's faults unless a test sets others: 1 ms one way, nothing lost.
const CLEAN: &str = "delay=1ms";

/// Endpoints connected by a simulated network, with an application on each that answers
/// every request with a function of its body after an optional execution delay.
struct Sim {
    /// Virtual now.
    now: Instant,
    /// The endpoints by address.
    nodes: BTreeMap<SocketAddr, Endpoint>,
    /// The network between them, seeded from the test's seed.
    net: Network,
    /// An extra drop rule (for dropping specific kinds), applied before the network.
    rule: Option<DropRule>,
    /// Random source of the endpoints created during a test.
    rng: Rng,
    /// How long the applications take to execute a request.
    exec_delay: Duration,
    /// Requests waiting for their execution to finish: (due, node, id, body).
    executing: Vec<(Instant, SocketAddr, IncomingId, Vec<u8>)>,
    /// Bodies of every request each node executed.
    executed: HashMap<SocketAddr, Vec<Vec<u8>>>,
    /// Responses delivered to requesters, by (requester, request id).
    responses: HashMap<(SocketAddr, RequestId), Result<Vec<u8>, RequestError>>,
    /// Datagrams dropped by the rule or the network, by kind.
    dropped: HashMap<Kind, u64>,
    /// Datagrams delivered, by kind.
    delivered: HashMap<Kind, u64>,
}

/// The address of simulated node `n`.
fn addr(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], 4000))
}

impl Sim {
    /// A network of `n` endpoints with `config`, 1 ms latency and no faults.
    fn new(n: u8, config: Config, seed: u64) -> Sim {
        let mut rng = Rng::seeded(seed);
        let nodes = (1..=n)
            .map(|i| (addr(i), Endpoint::new(config.clone(), &mut rng)))
            .collect();
        let spec = CLEAN.parse().expect("a valid spec");
        let net = Network::new(FaultInjector::with_rng(spec, rng.fork()));
        Sim {
            now: Instant::now(),
            nodes,
            net,
            rule: None,
            rng,
            exec_delay: Duration::ZERO,
            executing: Vec::new(),
            executed: HashMap::new(),
            responses: HashMap::new(),
            dropped: HashMap::new(),
            delivered: HashMap::new(),
        }
    }

    /// Applies the faults written as a `--faults` spec (e.g. `loss=0.2,delay=1ms`) to the
    /// datagrams sent from now on.
    fn set_faults(&mut self, text: &str) {
        let spec: FaultSpec = text.parse().expect("a valid spec");
        self.net.set_spec(spec);
    }

    /// The endpoint at `at`.
    fn node(&mut self, at: SocketAddr) -> &mut Endpoint {
        self.nodes.get_mut(&at).expect("no such node")
    }

    /// Starts a request from `from` to `to` and returns its handle.
    fn request(
        &mut self,
        from: SocketAddr,
        to: SocketAddr,
        body: Vec<u8>,
    ) -> (SocketAddr, RequestId) {
        let now = self.now;
        let id = self
            .node(from)
            .request(now, to, body, None)
            .expect("request");
        self.flush();
        (from, id)
    }

    /// Moves every queued datagram into the network and every event to the applications.
    fn flush(&mut self) {
        let addrs: Vec<SocketAddr> = self.nodes.keys().copied().collect();
        for at in addrs {
            while let Some(t) = self.node(at).poll_transmit() {
                self.send(at, t);
            }
            while let Some(event) = self.node(at).poll_event() {
                match event {
                    Event::Request { id, body, .. } => {
                        self.executed.entry(at).or_default().push(body.clone());
                        self.executing
                            .push((self.now + self.exec_delay, at, id, body));
                    }
                    Event::Response { id, result } => {
                        let twice = self.responses.insert((at, id), result).is_some();
                        assert!(!twice, "two outcomes for request {id} of {at}");
                    }
                }
            }
        }
    }

    /// Puts one datagram on the network (unless the test's rule drops it first), counting
    /// it by kind if it is lost. The datagrams of a bundle travel (and are lost) one by one
    /// here, so that the rules and counts see each.
    fn send(&mut self, from: SocketAddr, t: Transmit) {
        for part in codec::Bundle::new(&t.payload).parts() {
            let part = part.expect("endpoints send valid bundles");
            let header = Header::decode(part)
                .expect("endpoints send valid datagrams")
                .0;
            let ruled_out = self
                .rule
                .as_mut()
                .is_some_and(|rule| rule(&header, from, t.dst));
            if ruled_out || self.net.send(self.now, from, t.dst, part.to_vec()) == 0 {
                *self.dropped.entry(header.kind).or_default() += 1;
            }
        }
    }

    /// The next instant anything happens.
    fn next_instant(&self) -> Option<Instant> {
        let delivery = self.net.poll_timeout();
        let timers = self.nodes.values().filter_map(Endpoint::poll_timeout).min();
        let execution = self.executing.iter().map(|&(at, ..)| at).min();
        [delivery, timers, execution].into_iter().flatten().min()
    }

    /// Runs until `done` holds or `limit` of virtual time passes; returns whether `done` held.
    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let end = self.now + limit;
        while !done(self) {
            let Some(next) = self.next_instant() else {
                return false;
            };
            if next > end {
                return false;
            }
            self.now = self.now.max(next);
            let now = self.now;
            while let Some(d) = self.net.poll_delivery(now) {
                if let Ok((h, _)) = Header::decode(&d.payload) {
                    *self.delivered.entry(h.kind).or_default() += 1;
                }
                self.node(d.to).handle_datagram(now, d.from, &d.payload);
            }
            let (due, later): (Vec<_>, Vec<_>) =
                self.executing.drain(..).partition(|&(at, ..)| at <= now);
            self.executing = later;
            for (_, at, id, body) in due {
                let answer = answer_for(&body);
                self.node(at).respond(now, id, answer).expect("respond");
            }
            for endpoint in self.nodes.values_mut() {
                if endpoint.poll_timeout().is_some_and(|t| t <= now) {
                    endpoint.handle_timeout(now);
                }
            }
            self.flush();
        }
        true
    }

    /// Runs until request `id` has an outcome (at most a virtual minute) and returns it.
    fn outcome(&mut self, id: (SocketAddr, RequestId)) -> Result<Vec<u8>, RequestError> {
        assert!(self.run_until(Duration::from_secs(60), |s| s.responses.contains_key(&id)));
        self.responses.remove(&id).expect("outcome present")
    }

    /// How many requests node `at` executed.
    fn executions(&self, at: SocketAddr) -> usize {
        self.executed.get(&at).map_or(0, Vec::len)
    }
}

/// The simulated application's answer to a request: the body reversed, or, for a body
/// starting with `big:`, a 1 MiB response, and for one starting with `wide:`, 1000 bytes
/// (one fragment, but more than three times a small request).
fn answer_for(body: &[u8]) -> Vec<u8> {
    if body.starts_with(b"big:") {
        (0..(1 << 20)).map(|i: u32| (i % 251) as u8).collect()
    } else if body.starts_with(b"wide:") {
        pattern(1000)
    } else {
        body.iter().rev().copied().collect()
    }
}

/// A body of `len` bytes with a recognisable pattern.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 239) as u8).collect()
}

/// A small exchange costs exactly two datagrams, one each way, and executes once.
#[test]
fn a_small_request_costs_two_datagrams() {
    let mut sim = Sim::new(2, Config::default(), 1);
    let id = sim.request(addr(1), addr(2), b"hello".to_vec());
    assert_eq!(sim.outcome(id).unwrap(), b"olleh");
    assert_eq!(sim.node(addr(1)).stats().datagrams_sent, 1);
    assert_eq!(sim.node(addr(2)).stats().datagrams_sent, 1);
    assert_eq!(sim.executions(addr(2)), 1);
}

/// Issue 18: requests queued for one peer in one turn leave as one bundle, and so do their
/// answers; other peers' datagrams, and a datagram too big to share one, go alone. Without
/// [`Config::coalesce`] every request is its own datagram.
#[test]
fn datagrams_for_one_peer_in_one_turn_travel_as_one_bundle() {
    let t0 = Instant::now();
    let mut rng = Rng::seeded(43);
    let mut a = Endpoint::new(Config::default(), &mut rng);
    let mut b = Endpoint::new(Config::default(), &mut rng);
    let big = vec![7u8; 1200];
    for body in [&b"one"[..], b"two", b"three", &big] {
        a.request(t0, addr(2), body.to_vec(), None).unwrap();
    }
    a.request(t0, addr(3), b"elsewhere".to_vec(), None).unwrap();
    let transmits: Vec<_> = std::iter::from_fn(|| a.poll_transmit()).collect();
    let to_b: Vec<_> = transmits.iter().filter(|t| t.dst == addr(2)).collect();
    // Until the peer has answered, requests are padded (so that their answers fit the
    // anti-amplification limit): here two share a bundle, the third and the big one go alone.
    let parts: Vec<usize> = to_b
        .iter()
        .map(|t| codec::Bundle::new(&t.payload).parts().count())
        .collect();
    assert_eq!(parts, [2, 1, 1]);
    assert!(
        to_b.iter()
            .all(|t| t.payload.len() <= Config::default().max_datagram)
    );
    assert_eq!(a.stats().bundles_sent, 1);
    assert_eq!(a.stats().datagrams_sent, 5);

    for t in &to_b {
        b.handle_datagram(t0, addr(1), &t.payload);
    }
    assert_eq!(b.stats().bundles_received, 1);
    assert_eq!(b.stats().datagrams_received, 4);
    let mut executed = Vec::new();
    while let Some(Event::Request { id, body, .. }) = b.poll_event() {
        b.respond(t0, id, answer_for(&body)).unwrap();
        executed.push(body);
    }
    assert_eq!(executed.len(), 4, "every bundled request is executed once");
    let answers: Vec<_> = std::iter::from_fn(|| b.poll_transmit()).collect();
    assert!(
        answers.len() < 4,
        "the answers share datagrams: {}",
        answers.len()
    );
    for t in &answers {
        a.handle_datagram(t0, addr(2), &t.payload);
    }
    let mut answered = 0;
    while let Some(event) = a.poll_event() {
        assert!(matches!(event, Event::Response { result: Ok(_), .. }));
        answered += 1;
    }
    assert_eq!(answered, 4);

    let config = Config {
        coalesce: false,
        ..Config::default()
    };
    let mut c = Endpoint::new(config, &mut rng);
    for body in [b"one", b"two"] {
        c.request(t0, addr(2), body.to_vec(), None).unwrap();
    }
    assert_eq!(std::iter::from_fn(|| c.poll_transmit()).count(), 2);
}

/// A dropped request is retransmitted exactly once and the responder executes it once.
#[test]
fn a_lost_request_is_retransmitted_and_executed_once() {
    let mut sim = Sim::new(2, Config::default(), 2);
    let mut first = true;
    sim.rule = Some(Box::new(move |h, _, _| {
        h.kind == Kind::Request && std::mem::take(&mut first)
    }));
    let id = sim.request(addr(1), addr(2), b"abc".to_vec());
    assert_eq!(sim.outcome(id).unwrap(), b"cba");
    assert_eq!(sim.dropped[&Kind::Request], 1);
    assert_eq!(sim.node(addr(1)).stats().retransmissions, 1);
    assert_eq!(sim.executions(addr(2)), 1);
}

/// README (at-most-once): when the response is lost, the resent request is answered from the
/// response cache and not executed again.
#[test]
fn a_lost_response_is_answered_from_the_cache_without_executing_again() {
    let mut sim = Sim::new(2, Config::default(), 3);
    let mut first = true;
    sim.rule = Some(Box::new(move |h, _, _| {
        h.kind == Kind::Response && std::mem::take(&mut first)
    }));
    let id = sim.request(addr(1), addr(2), b"abc".to_vec());
    assert_eq!(sim.outcome(id).unwrap(), b"cba");
    assert_eq!(sim.executions(addr(2)), 1);
    let stats = sim.node(addr(2)).stats().clone();
    assert_eq!(stats.responses_from_cache, 1);
    assert_eq!(stats.duplicates_suppressed, 1);
}

/// README (at-most-once): during a 3 s execution, resends and probes are suppressed or acked
/// as still executing, the requester keeps waiting, and the request runs once.
#[test]
fn a_request_retransmitted_many_times_while_executing_runs_once() {
    let mut sim = Sim::new(2, Config::default(), 4);
    // The application takes 3 s; meanwhile every retransmission must be suppressed, and the
    // "still executing" acks must keep the requester from giving up.
    sim.exec_delay = Duration::from_secs(3);
    let id = sim.request(addr(1), addr(2), b"slow".to_vec());
    assert_eq!(sim.outcome(id).unwrap(), b"wols");
    assert_eq!(sim.executions(addr(2)), 1);
    let requester = sim.node(addr(1)).stats().clone();
    let responder = sim.node(addr(2)).stats().clone();
    assert!(
        requester.retransmissions + requester.probes_sent >= 3,
        "{requester:?}"
    );
    assert!(responder.duplicates_suppressed >= 1, "{responder:?}");
}

/// Losing three datagrams of any one kind (request, response, ack or probe) still completes a
/// fragmented exchange with a 1 MiB response, executed once.
#[test]
fn every_datagram_kind_can_be_lost_and_a_fragmented_exchange_still_completes() {
    for lost_kind in [Kind::Request, Kind::Response, Kind::Ack, Kind::Probe] {
        let mut sim = Sim::new(2, Config::default(), 5);
        sim.exec_delay = Duration::from_millis(300); // long enough for probes to be sent
        let mut budget = 3;
        sim.rule = Some(Box::new(move |h, _, _| {
            if h.kind == lost_kind && budget > 0 {
                budget -= 1;
                return true;
            }
            false
        }));
        let mut body = b"big:".to_vec();
        body.extend(pattern(20_000));
        let id = sim.request(addr(1), addr(2), body);
        let response = sim
            .outcome(id)
            .unwrap_or_else(|e| panic!("losing {lost_kind:?}: {e}"));
        assert_eq!(response, answer_for(b"big:"), "losing {lost_kind:?}");
        assert_eq!(sim.executions(addr(2)), 1, "losing {lost_kind:?}");
        assert_eq!(
            sim.dropped.get(&lost_kind),
            Some(&3),
            "three {lost_kind:?} datagrams lost"
        );
    }
}

/// With half the datagrams duplicated and half reordered, 100 requests from two peers (some
/// fragmented) each get the right answer and execute exactly once.
#[test]
fn duplicated_and_reordered_datagrams_never_execute_twice() {
    let mut sim = Sim::new(3, Config::default(), 6);
    sim.set_faults("dup=0.5,reorder=0.5,delay=1ms");
    let mut ids = Vec::new();
    for i in 0..50u8 {
        let body = if i % 10 == 0 {
            pattern(10_000 + usize::from(i))
        } else {
            vec![i; 10]
        };
        ids.push((sim.request(addr(1), addr(2), body.clone()), body.clone()));
        ids.push((sim.request(addr(3), addr(2), body.clone()), body));
    }
    for (id, body) in ids {
        assert_eq!(sim.outcome(id).unwrap(), answer_for(&body));
    }
    assert_eq!(sim.executions(addr(2)), 100);
    assert!(sim.node(addr(2)).stats().duplicates_suppressed > 0);
}

/// README (fragmentation): a 1 MiB request losing 20% of its fragments completes, and the
/// retransmissions are exactly the fragments lost.
#[test]
fn a_megabyte_completes_under_20_percent_loss_resending_only_missing_fragments() {
    let mut sim = Sim::new(2, Config::default(), 7);
    // Drop 20% of the request's data fragments; acks get through, so every resend must be
    // of a fragment that really was lost.
    let mut rng = Rng::seeded(99);
    sim.rule = Some(Box::new(move |h, _, _| {
        h.kind == Kind::Request && rng.chance(0.2)
    }));
    let body = pattern(1 << 20);
    let id = sim.request(addr(1), addr(2), body.clone());
    assert_eq!(sim.outcome(id).unwrap(), answer_for(&body));
    let lost = sim.dropped[&Kind::Request];
    let stats = sim.node(addr(1)).stats().clone();
    assert!(lost > 100, "the test must actually lose fragments: {lost}");
    assert_eq!(
        stats.retransmissions, lost,
        "resent exactly the lost fragments"
    );
    assert_eq!(sim.executions(addr(2)), 1);
}

/// A 1 MiB request and a 1 MiB response complete with 20% of all datagrams lost both ways,
/// executing once and resending fewer fragments than were sent.
#[test]
fn a_megabyte_each_way_completes_under_20_percent_loss_in_both_directions() {
    let mut sim = Sim::new(2, Config::default(), 8);
    sim.set_faults("loss=0.2,delay=1ms");
    let mut body = b"big:".to_vec();
    body.extend(pattern(1 << 20));
    let id = sim.request(addr(1), addr(2), body);
    assert_eq!(sim.outcome(id).unwrap(), answer_for(b"big:"));
    assert_eq!(sim.executions(addr(2)), 1);
    // Resends stay proportionate: fewer than the fragments sent in all.
    let fragments = (1u64 << 20) / 1340;
    let resent =
        sim.node(addr(1)).stats().retransmissions + sim.node(addr(2)).stats().retransmissions;
    assert!(
        resent < fragments,
        "{resent} resends for {fragments} fragments each way"
    );
}

/// README (RFC 6298 RTO): on a 120 ms path SRTT settles near 120 ms, back on 2 ms the RTO
/// falls to 30 ms or less, and only the very first request is ever resent.
#[test]
fn rto_adapts_to_the_measured_round_trip() {
    let mut sim = Sim::new(2, Config::default(), 9);
    sim.set_faults("delay=60ms");
    for _ in 0..20 {
        let id = sim.request(addr(1), addr(2), b"x".to_vec());
        sim.outcome(id).unwrap();
    }
    let srtt = sim.node(addr(1)).srtt(addr(2)).expect("measured");
    assert!(
        srtt >= Duration::from_millis(115) && srtt <= Duration::from_millis(125),
        "{srtt:?}"
    );
    assert!(sim.node(addr(1)).rto(addr(2)) >= Duration::from_millis(120));
    sim.set_faults(CLEAN);
    for _ in 0..60 {
        let id = sim.request(addr(1), addr(2), b"x".to_vec());
        sim.outcome(id).unwrap();
    }
    let rto = sim.node(addr(1)).rto(addr(2));
    assert!(rto <= Duration::from_millis(30), "RTO came down to {rto:?}");
    // Only the very first request, sent with the initial 100 ms RTO before any sample on a
    // 120 ms path, is resent; once measured, nothing is resent spuriously.
    assert_eq!(
        sim.node(addr(1)).stats().retransmissions,
        1,
        "no spurious resends"
    );
}

/// README: a peer that never answers fails the request with `Timeout` after 10 resends, in
/// bounded time, leaving nothing outstanding.
#[test]
fn a_silent_peer_times_out_after_bounded_attempts() {
    let mut sim = Sim::new(2, Config::default(), 10);
    sim.set_faults("loss=1,delay=1ms");
    let id = sim.request(addr(1), addr(2), b"anyone?".to_vec());
    let started = sim.now;
    assert_eq!(
        sim.outcome(id),
        Err(RequestError::Timeout { peer: addr(2) })
    );
    let config = Config::default();
    assert_eq!(
        sim.node(addr(1)).stats().retransmissions,
        u64::from(config.max_attempts)
    );
    assert!(sim.now - started <= config.max_rto * (config.max_attempts + 1));
    assert_eq!(sim.node(addr(1)).outstanding(), 0);
}

/// Issue 17: a request given a budget of unacknowledged attempts gives up on a silent peer
/// whose round trip is known after that many resends; a live peer answers within it. A peer
/// never heard from keeps the usual limit (a fresh client under heavy loss is not given up
/// on by chance).
#[test]
fn a_budget_of_unacknowledged_attempts_gives_up_on_a_silent_peer_sooner() {
    let mut sim = Sim::new(2, Config::default(), 12);
    // Sends `body` from 1 to 2 with a budget of 3 and runs it to its outcome; returns the
    // outcome and the resends it took.
    let budgeted = |sim: &mut Sim, body: &[u8]| {
        let before = sim.node(addr(1)).stats().retransmissions;
        let now = sim.now;
        let id = sim
            .node(addr(1))
            .request_with(now, addr(2), body.to_vec(), None, Some(3))
            .expect("request");
        sim.flush();
        let outcome = sim.outcome((addr(1), id));
        (outcome, sim.node(addr(1)).stats().retransmissions - before)
    };
    let timeout = Err(RequestError::Timeout { peer: addr(2) });
    sim.set_faults("loss=1,delay=1ms");
    let (outcome, resends) = budgeted(&mut sim, b"first contact");
    assert_eq!(outcome, timeout);
    assert_eq!(
        resends,
        u64::from(Config::default().max_attempts),
        "no budget for an unknown peer"
    );
    // Once a round trip is measured, the budget applies.
    sim.set_faults("");
    let id = sim.request(addr(1), addr(2), b"measure".to_vec()).1;
    assert!(sim.outcome((addr(1), id)).is_ok());
    sim.set_faults("loss=1,delay=1ms");
    assert_eq!(budgeted(&mut sim, b"anyone?"), (timeout, 3));
    // A live peer answers within the same budget.
    sim.set_faults("");
    assert!(budgeted(&mut sim, b"there?").0.is_ok());
}

/// A caller's deadline ends a request with `Timeout` at that deadline, not later.
#[test]
fn a_deadline_bounds_the_request() {
    let mut sim = Sim::new(2, Config::default(), 11);
    sim.set_faults("loss=1,delay=1ms");
    let now = sim.now;
    let deadline = now + Duration::from_millis(250);
    let id = (
        addr(1),
        sim.node(addr(1))
            .request(now, addr(2), b"x".to_vec(), Some(deadline))
            .unwrap(),
    );
    sim.flush();
    assert!(matches!(sim.outcome(id), Err(RequestError::Timeout { .. })));
    assert!(
        sim.now <= deadline + Duration::from_millis(1),
        "gave up at the deadline"
    );
}

/// README (ICMP errors): an unreachable report fails the requests to that peer at once, and
/// only those.
#[test]
fn unreachable_fails_every_request_to_that_peer() {
    let mut sim = Sim::new(3, Config::default(), 12);
    sim.set_faults("loss=1,delay=1ms");
    let a = sim.request(addr(1), addr(2), b"a".to_vec());
    let b = sim.request(addr(1), addr(3), b"b".to_vec());
    let now = sim.now;
    sim.node(addr(1)).handle_unreachable(now, addr(2));
    sim.flush();
    assert_eq!(
        sim.responses.remove(&a),
        Some(Err(RequestError::Unreachable { peer: addr(2) }))
    );
    assert!(!sim.responses.contains_key(&b));
}

/// A responder that restarts mid-execution (new incarnation, state lost) gets the request
/// again and answers it: at most once per incarnation.
#[test]
fn a_restarted_responder_gets_the_request_again() {
    let mut sim = Sim::new(2, Config::default(), 13);
    sim.exec_delay = Duration::from_millis(200);
    let id = sim.request(addr(1), addr(2), pattern(5_000));
    // Let the request arrive and start executing, then "restart" the responder.
    sim.run_until(Duration::from_millis(20), |_| false);
    let mut rng = Rng::seeded(77);
    sim.nodes
        .insert(addr(2), Endpoint::new(Config::default(), &mut rng));
    sim.executing.clear();
    assert_eq!(sim.outcome(id).unwrap(), answer_for(&pattern(5_000)));
    assert_eq!(
        sim.executions(addr(2)),
        2,
        "once per incarnation of the responder"
    );
}

/// README: answered requests leave the response cache once its TTL (5 s here) has passed.
#[test]
fn answered_requests_expire_from_the_cache() {
    let config = Config {
        dedup_ttl: Duration::from_secs(5),
        ..Config::default()
    };
    let mut sim = Sim::new(2, config, 14);
    for i in 0..10u8 {
        let id = sim.request(addr(1), addr(2), vec![i]);
        sim.outcome(id).unwrap();
    }
    assert_eq!(sim.node(addr(2)).cached_entries(), 10);
    sim.run_until(Duration::from_secs(6), |_| false);
    assert_eq!(sim.node(addr(2)).cached_entries(), 0);
}

/// README: the response cache never holds more than its configured number of entries.
#[test]
fn the_response_cache_is_bounded_in_entries() {
    let config = Config {
        dedup_max_entries: 8,
        ..Config::default()
    };
    let mut sim = Sim::new(2, config, 15);
    for i in 0..30u8 {
        let id = sim.request(addr(1), addr(2), vec![i]);
        sim.outcome(id).unwrap();
    }
    assert!(sim.node(addr(2)).cached_entries() <= 8);
}

/// README: a flood of never-finished fragmented messages stays within the per-peer reassembly
/// budget, stalled ones are dropped after 10 s, and the node keeps serving.
#[test]
fn fragment_floods_are_bounded_and_abandoned() {
    let config = Config {
        reassembly_per_peer: 100_100,
        ..Config::default()
    };
    let mut sim = Sim::new(2, config, 16);
    let now = sim.now;
    let attacker = addr(9);
    // 1000 "first fragments" of 50 KB messages that never finish, each from a new incarnation.
    for i in 0..1000u64 {
        let mut h = Header::new(Kind::Request, 1000 + i, 1, 1);
        h.frag_count = 40;
        h.message_len = 50_000;
        let payload = vec![0u8; codec::fragment_range(50_000, 40, 0).len()];
        sim.node(addr(2))
            .handle_datagram(now, attacker, &codec::encode_datagram(&h, &payload));
    }
    let stats = sim.node(addr(2)).stats().clone();
    assert_eq!(
        stats.refused_over_limit, 998,
        "only two 50 KB messages (plus their fragment tables) fit in 100.1 KB"
    );
    assert_eq!(sim.node(addr(2)).cached_entries(), 2);
    sim.run_until(Duration::from_secs(11), |_| false);
    assert_eq!(
        sim.node(addr(2)).cached_entries(),
        0,
        "stalled reassemblies are dropped"
    );
    // And the node still serves.
    let id = sim.request(addr(1), addr(2), b"ok".to_vec());
    assert_eq!(sim.outcome(id).unwrap(), b"ko");
}

/// README: bad datagrams are counted and dropped; 500 junk ones leave the node serving.
#[test]
fn junk_datagrams_are_counted_and_dropped() {
    let mut sim = Sim::new(2, Config::default(), 17);
    let now = sim.now;
    let mut rng = Rng::seeded(5);
    for len in 0..500usize {
        let junk: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        sim.node(addr(2)).handle_datagram(now, addr(1), &junk);
    }
    assert_eq!(sim.node(addr(2)).stats().bad_datagrams, 500);
    let id = sim.request(addr(1), addr(2), b"still here".to_vec());
    assert_eq!(sim.outcome(id).unwrap(), b"ereh llits");
}

/// Regression (review #1): a header claiming billions of fragments for an empty message
/// once made the receiver allocate and scan a 4 GiB fragment table. It is refused at decode.
#[test]
fn a_huge_fragment_count_is_refused_without_allocating() {
    let mut sim = Sim::new(2, Config::default(), 18);
    let now = sim.now;
    let mut h = Header::new(Kind::Request, 5, 1, 1);
    h.frag_count = u32::MAX;
    h.frag_index = 7;
    h.message_len = 0;
    let mut bytes = Vec::new();
    h.encode_into(&mut bytes);
    sim.node(addr(2)).handle_datagram(now, addr(1), &bytes);
    assert_eq!(sim.node(addr(2)).stats().bad_datagrams, 1);
    assert_eq!(sim.node(addr(2)).cached_entries(), 0);
    assert_eq!(sim.node(addr(2)).reassembly_bytes(), 0);
}

/// Regression (review #2): evicting answered requests from a full cache must not let a
/// late duplicate execute a second time.
#[test]
fn a_duplicate_of_an_evicted_request_is_never_executed_again() {
    let config = Config {
        dedup_max_entries: 4,
        ..Config::default()
    };
    let mut sim = Sim::new(2, config, 19);
    let requester = sim.node(addr(1)).incarnation();
    for i in 0..10u8 {
        let id = sim.request(addr(1), addr(2), vec![i]);
        sim.outcome(id).unwrap();
    }
    assert!(sim.node(addr(2)).cached_entries() <= 4);
    // Replay request 1 (long evicted) and a probe for it.
    let mut h = Header::new(Kind::Request, requester, 1, 999);
    h.message_len = 1;
    let mut datagram = Vec::new();
    h.encode_into(&mut datagram);
    datagram.push(0);
    let now = sim.now;
    sim.node(addr(2)).handle_datagram(now, addr(1), &datagram);
    let mut probe = Vec::new();
    Header::new(Kind::Probe, requester, 1, 1000).encode_into(&mut probe);
    sim.node(addr(2)).handle_datagram(now, addr(1), &probe);
    sim.flush();
    assert_eq!(
        sim.executions(addr(2)),
        10,
        "the evicted request did not run again"
    );
    assert_eq!(
        sim.node(addr(2)).poll_transmit(),
        None,
        "and no answer invites a resend"
    );
}

/// Regression (review #3): a response too large for the requester's reassembly budget
/// fails the request at once instead of leaving it without a timer forever.
#[test]
fn a_response_over_the_reassembly_budget_fails_instead_of_hanging() {
    let mut sim = Sim::new(2, Config::default(), 20);
    let mut rng = Rng::seeded(21);
    let small = Config {
        reassembly_per_peer: 100_000,
        ..Config::default()
    };
    sim.nodes.insert(addr(1), Endpoint::new(small, &mut rng));
    let id = sim.request(addr(1), addr(2), b"big:".to_vec());
    assert!(matches!(
        sim.outcome(id),
        Err(RequestError::TooLarge { .. })
    ));
    assert_eq!(sim.node(addr(1)).outstanding(), 0);
    assert_eq!(sim.node(addr(1)).reassembly_bytes(), 0);
}

/// Regression (review #4): a long execution or a large response must not inflate the RTT
/// estimate (answers echo only fresh transmissions; one sample per echo).
#[test]
fn long_executions_and_large_responses_do_not_inflate_the_rtt() {
    let mut sim = Sim::new(2, Config::default(), 22);
    sim.exec_delay = Duration::from_millis(1500);
    let id = sim.request(addr(1), addr(2), b"slow".to_vec());
    sim.outcome(id).unwrap();
    sim.exec_delay = Duration::ZERO;
    let id = sim.request(addr(1), addr(2), b"big:".to_vec());
    sim.outcome(id).unwrap();
    let srtt = sim.node(addr(1)).srtt(addr(2)).expect("measured");
    assert!(
        srtt < Duration::from_millis(10),
        "true RTT is 2 ms, estimate {srtt:?}"
    );
}

/// Regression (review #5): reassembly memory is returned on every path, so the per-peer
/// charge goes back to zero after fragmented exchanges under loss.
#[test]
fn reassembly_memory_returns_to_zero_after_fragmented_exchanges() {
    let mut sim = Sim::new(2, Config::default(), 23);
    sim.set_faults("loss=0.1,dup=0.1,delay=1ms");
    for i in 0..5u8 {
        let mut body = b"big:".to_vec();
        body.extend(pattern(30_000 + usize::from(i)));
        let id = sim.request(addr(1), addr(2), body);
        sim.outcome(id).unwrap();
    }
    sim.run_until(Duration::from_secs(11), |_| false);
    assert_eq!(sim.node(addr(1)).reassembly_bytes(), 0);
    assert_eq!(sim.node(addr(2)).reassembly_bytes(), 0);
}

/// Review #6: fragments and probes for a request are accepted only from its sender.
#[test]
fn another_address_cannot_inject_into_or_read_a_request() {
    let mut sim = Sim::new(3, Config::default(), 24);
    sim.exec_delay = Duration::from_millis(100);
    let id = sim.request(addr(1), addr(2), b"mine".to_vec());
    sim.run_until(Duration::from_millis(5), |_| false);
    let requester = sim.node(addr(1)).incarnation();
    let mut probe = Vec::new();
    Header::new(Kind::Probe, requester, id.1, 77).encode_into(&mut probe);
    let now = sim.now;
    let before = sim.node(addr(2)).stats().bad_datagrams;
    sim.node(addr(2)).handle_datagram(now, addr(3), &probe);
    assert_eq!(sim.node(addr(2)).stats().bad_datagrams, before + 1);
    assert_eq!(sim.node(addr(2)).poll_transmit(), None);
    assert_eq!(sim.outcome(id).unwrap(), b"enim");
}

/// Regression (micro-benchmark profile): the queue that expires floors holds a bounded number
/// of entries per requester incarnation, not one per forgotten request, and floors still
/// expire two TTLs after their last raise.
#[test]
fn forgotten_requests_keep_the_floor_queue_short_and_floors_expire() {
    let config = Config {
        dedup_max_entries: 4,
        ..Config::default()
    };
    let ttl = config.dedup_ttl;
    let mut sim = Sim::new(2, config, 23);
    for i in 0..2000u16 {
        let id = sim.request(addr(1), addr(2), i.to_be_bytes().to_vec());
        sim.outcome(id).unwrap();
    }
    let responder = sim.node(addr(2));
    assert_eq!(responder.floors.len(), 1);
    assert!(
        responder.floor_order.len() <= 2,
        "{} entries for one incarnation",
        responder.floor_order.len()
    );
    // The cached entries expire a TTL on (raising the floor once more), and two TTLs after
    // that the floor is gone.
    let expired = sim.now + ttl * 2;
    sim.node(addr(2)).handle_timeout(expired);
    assert_eq!(sim.node(addr(2)).cached_entries(), 0);
    let later = expired + ttl * 3;
    sim.node(addr(2)).handle_timeout(later);
    let responder = sim.node(addr(2));
    assert!(responder.floors.is_empty() && responder.floor_order.is_empty());
}

/// Found by the simulator (README "How we test"): a late answer to a request of an earlier
/// process on the same address (a restarted client) is not taken as the answer to a request
/// of the new process.
#[test]
fn a_late_answer_for_an_earlier_process_on_the_same_address_is_not_taken() {
    let mut rng = Rng::seeded(3);
    let t0 = Instant::now();
    let (client, server_addr) = (addr(1), addr(2));
    let mut server = Endpoint::new(Config::default(), &mut rng);
    let mut old = Endpoint::new(Config::default(), &mut rng);
    old.request(t0, server_addr, b"old".to_vec(), None).unwrap();
    while let Some(t) = old.poll_transmit() {
        server.handle_datagram(t0, client, &t.payload);
    }
    let Some(Event::Request { id, .. }) = server.poll_event() else {
        panic!("the server got the old request");
    };
    drop(old);
    let mut new = Endpoint::new(Config::default(), &mut rng);
    new.request(t0, server_addr, b"new".to_vec(), None).unwrap();
    server
        .respond(t0, id, b"answer for the old process".to_vec())
        .unwrap();
    while let Some(t) = server.poll_transmit() {
        new.handle_datagram(t0, server_addr, &t.payload);
    }
    assert!(
        !matches!(new.poll_event(), Some(Event::Response { .. })),
        "the new process took the old one's answer"
    );
}

/// The wall-clock time (µs since the Unix epoch) the keyed tests' clocks start at.
const WALL_T0: u64 = 1_700_000_000_000_000;

/// A config with the cluster key derived from `secret`, its wall clock reading [`WALL_T0`]
/// at `origin`.
fn keyed(secret: &[u8], origin: Instant) -> Config {
    keyed_at(secret, origin, WALL_T0)
}

/// A config with the cluster key derived from `secret`, its wall clock reading
/// `origin_micros` at `origin` (the process's start).
fn keyed_at(secret: &[u8], origin: Instant, origin_micros: u64) -> Config {
    Config {
        auth: Some(Auth {
            key: ClusterKey::from_secret(secret).expect("a long enough secret"),
            replay_window: Auth::DEFAULT_WINDOW,
            clock: crate::wire::auth::WallClock::anchored(origin, origin_micros),
        }),
        ..Config::default()
    }
}

impl Sim {
    /// Replaces the endpoint at `at` with a fresh one (a restarted process) with `config`.
    fn replace(&mut self, at: SocketAddr, config: Config) {
        let endpoint = Endpoint::new(config, &mut self.rng);
        self.nodes.insert(at, endpoint);
    }
}

/// A request datagram from requester incarnation `incarnation`, id `request`, carrying
/// `body` in one fragment (no MAC).
fn request_datagram(incarnation: u64, request: u64, body: &[u8]) -> Vec<u8> {
    let mut h = Header::new(Kind::Request, incarnation, request, 1);
    h.message_len = body.len() as u32;
    codec::encode_datagram(&h, body)
}

/// Issue 8: endpoints sharing a cluster key talk (every datagram sealed and stamped, a
/// fragmented exchange included); one with another key, or none, gets no reply at all, and
/// nothing is executed.
#[test]
fn with_a_cluster_key_only_key_holders_are_answered() {
    let secret = b"the cluster key of this test";
    let mut sim = Sim::new(2, Config::default(), 40);
    let origin = sim.now;
    sim.replace(addr(1), keyed(secret, origin));
    sim.replace(addr(2), keyed(secret, origin));
    sim.rule = Some(Box::new(|h, _, _| {
        assert!(h.flags & codec::FLAG_MAC != 0, "every datagram is sealed");
        assert!(h.stamp >= WALL_T0, "and stamped");
        false
    }));
    let id = sim.request(addr(1), addr(2), b"abc".to_vec());
    assert_eq!(sim.outcome(id).unwrap(), b"cba");
    let id = sim.request(addr(1), addr(2), b"big:".to_vec());
    assert_eq!(sim.outcome(id).unwrap().len(), 1 << 20);
    assert_eq!(sim.executions(addr(2)), 2);
    assert_eq!(sim.node(addr(2)).stats().auth_failures, 0);
    assert_eq!(
        sim.node(addr(2)).stats().retries_sent,
        0,
        "keyed: no validation needed"
    );
    sim.rule = None;

    for (name, config) in [
        (
            "another key",
            keyed(b"not the cluster key of this test", origin),
        ),
        ("no key", Config::default()),
    ] {
        sim.replace(addr(1), config);
        let sent_before = sim.node(addr(2)).stats().datagrams_sent;
        let failures_before = sim.node(addr(2)).stats().auth_failures;
        let id = sim.request(addr(1), addr(2), b"set x".to_vec());
        assert!(
            matches!(sim.outcome(id), Err(RequestError::Timeout { .. })),
            "{name}: no answer"
        );
        let stats = sim.node(addr(2)).stats().clone();
        assert_eq!(
            stats.datagrams_sent, sent_before,
            "{name}: not one datagram back"
        );
        assert!(stats.auth_failures > failures_before, "{name}: counted");
        assert_eq!(sim.executions(addr(2)), 2, "{name}: nothing executed");
    }
}

/// Issue 8: a replayed (captured) request is answered from the dedup cache inside the
/// replay window, refused past it, and refused by a process started after it was sent;
/// it is executed once in all.
#[test]
fn a_replayed_datagram_is_answered_from_the_cache_then_refused() {
    let t0 = Instant::now();
    let config = keyed(b"the cluster key of this test", t0);
    let mut rng = Rng::seeded(41);
    let mut a = Endpoint::new(config.clone(), &mut rng);
    let mut b = Endpoint::new(config.clone(), &mut rng);
    a.request(t0, addr(2), b"set x 1".to_vec(), None).unwrap();
    let captured = a.poll_transmit().unwrap().payload;
    b.handle_datagram(t0, addr(1), &captured);
    let Some(Event::Request { id, .. }) = b.poll_event() else {
        panic!("the request is raised");
    };
    b.respond(t0, id, b"ok".to_vec()).unwrap();
    let answer = b.poll_transmit().unwrap().payload;

    // Inside the window: the cached answer, not a second execution.
    let t1 = t0 + Duration::from_secs(10);
    b.handle_timeout(t1);
    b.handle_datagram(t1, addr(1), &captured);
    assert_eq!(b.poll_event(), None, "not executed again");
    let again = b.poll_transmit().expect("the cached answer").payload;
    assert_eq!(
        Header::decode(&again).unwrap().1,
        Header::decode(&answer).unwrap().1
    );
    assert_eq!(b.stats().responses_from_cache, 1);

    // Past the window (the cache still holds the entry: the window is shorter): refused.
    let t2 = t0 + Auth::DEFAULT_WINDOW + Duration::from_secs(1);
    b.handle_timeout(t2);
    assert_eq!(b.cached_entries(), 1);
    b.handle_datagram(t2, addr(1), &captured);
    assert_eq!((b.poll_event(), b.poll_transmit()), (None, None));
    assert_eq!(b.stats().replays_refused, 1);

    // A process started after the datagram was sent refuses it, however young it is.
    let restarted_at = t0 + Duration::from_secs(2);
    let mut restarted = Endpoint::new(
        keyed_at(
            b"the cluster key of this test",
            restarted_at,
            WALL_T0 + 2_000_000,
        ),
        &mut rng,
    );
    restarted.handle_datagram(restarted_at, addr(1), &captured);
    assert_eq!(
        (restarted.poll_event(), restarted.poll_transmit()),
        (None, None)
    );
    assert_eq!(restarted.stats().replays_refused, 1);
    assert_eq!(b.stats().requests_executed, 1);
}

/// Issue 8 (anti-amplification): a request from a forged address gets back at most three
/// times its bytes: a large answer is held and only a small `Retry` goes out, again for
/// every copy or probe, never a fragment of the answer, however long one waits. A probe with
/// a forged token validates nothing.
#[test]
fn a_forged_source_gets_at_most_three_times_what_it_sent() {
    let t0 = Instant::now();
    let mut rng = Rng::seeded(42);
    let mut b = Endpoint::new(Config::default(), &mut rng);
    let victim = addr(9);
    for (request, body) in [(7, &b"big:"[..]), (8, &b"wide:"[..])] {
        // Each request in its own stretch of time: an endpoint's time never goes back.
        let t0 = t0 + Duration::from_secs(100 * (request - 7));
        let datagram = request_datagram(0xbad, request, body);
        let mut sent = 0;
        let mut received = 0;
        for copy in 0..3u64 {
            let now = t0 + Duration::from_secs(copy);
            b.handle_datagram(now, victim, &datagram);
            received += datagram.len();
            if let Some(Event::Request { id, body, .. }) = b.poll_event() {
                b.respond(now, id, answer_for(&body)).unwrap();
            }
            let mut probe = Header::new(Kind::Probe, 0xbad, request, 1);
            probe.message_len = 0;
            let forged = codec::encode_datagram(&probe, &[0x55; crate::wire::auth::TOKEN_LEN]);
            b.handle_datagram(now, victim, &forged);
            received += forged.len();
            b.handle_timeout(now + Duration::from_millis(900));
            while let Some(t) = b.poll_transmit() {
                assert_eq!(t.dst, victim);
                for part in codec::Bundle::new(&t.payload).parts() {
                    let kind = Header::decode(part.unwrap()).unwrap().0.kind;
                    assert_eq!(
                        kind,
                        Kind::Retry,
                        "only retries go to an unvalidated address"
                    );
                }
                // A bundle's own bytes count too.
                sent += t.payload.len();
            }
        }
        assert!(sent > 0, "the victim is asked to prove its address");
        assert!(
            sent <= AMPLIFICATION_FACTOR * received,
            "{sent} bytes sent for {received} received"
        );
        b.handle_timeout(t0 + Duration::from_secs(50));
        assert_eq!(
            b.poll_transmit(),
            None,
            "nothing more, however long one waits"
        );
    }
    let stats = b.stats();
    assert_eq!(stats.requests_executed, 2);
    assert_eq!(stats.replies_held, 2);
    assert_eq!(stats.addresses_validated, 0);
    assert!(stats.bad_datagrams >= 6, "forged tokens are counted");
}

/// Issue 8 (anti-amplification): an honest requester echoes the token and gets its large
/// answer, one round trip later; its address is then remembered, and a small answer never
/// needed the detour.
#[test]
fn an_honest_requester_proves_its_address_once() {
    let mut sim = Sim::new(2, Config::default(), 43);
    let id = sim.request(addr(1), addr(2), b"abc".to_vec());
    assert_eq!(sim.outcome(id).unwrap(), b"cba");
    assert_eq!(
        sim.node(addr(2)).stats().retries_sent,
        0,
        "small answers go at once"
    );
    let id = sim.request(addr(1), addr(2), b"wide:".to_vec());
    assert_eq!(sim.outcome(id).unwrap(), pattern(1000));
    assert_eq!(sim.node(addr(2)).stats().retries_sent, 1);
    assert_eq!(sim.node(addr(2)).stats().addresses_validated, 1);
    let id = sim.request(addr(1), addr(2), b"big:".to_vec());
    assert_eq!(sim.outcome(id).unwrap().len(), 1 << 20);
    assert_eq!(
        sim.node(addr(2)).stats().retries_sent,
        1,
        "the address is remembered"
    );
    // The other way round, node 1 asked node 2 and heard back: already validated.
    let id = sim.request(addr(2), addr(1), b"big:".to_vec());
    assert_eq!(sim.outcome(id).unwrap().len(), 1 << 20);
    assert_eq!(sim.node(addr(1)).stats().retries_sent, 0);
    assert_eq!(sim.executions(addr(2)), 3);
}

/// Issue 8 (anti-amplification) under loss: retries, token probes and held answers may be
/// lost, and every request still completes exactly once.
#[test]
fn address_validation_survives_loss_and_duplication() {
    let mut sim = Sim::new(3, Config::default(), 44);
    sim.set_faults("loss=0.2,dup=0.1,reorder=0.1,delay=1ms");
    let mut ids = Vec::new();
    for i in 0..20u8 {
        let body = if i % 2 == 0 {
            b"wide:".to_vec()
        } else {
            vec![b'w', b'i', b'd', b'e', b':', i]
        };
        ids.push(sim.request(addr(1 + i % 2), addr(3), body));
    }
    for id in ids {
        assert_eq!(sim.outcome(id).unwrap(), pattern(1000));
    }
    assert_eq!(sim.executions(addr(3)), 20);
}

/// Issue 8 (bounded resources): a flood of requests from ever new incarnations leaves at
/// most `floors_max` floors behind, and says how many it dropped.
#[test]
fn floors_are_bounded() {
    let config = Config {
        floors_max: 10,
        dedup_max_entries: 5,
        ..Config::default()
    };
    let t0 = Instant::now();
    let mut b = Endpoint::new(config, &mut Rng::seeded(45));
    for incarnation in 1..=50u64 {
        b.handle_datagram(t0, addr(1), &request_datagram(incarnation, 3, b"x"));
        while let Some(Event::Request { id, .. }) = b.poll_event() {
            b.respond(t0, id, b"y".to_vec()).unwrap();
        }
    }
    assert!(b.cached_entries() <= 5);
    assert!(b.floors.len() <= 10, "{} floors", b.floors.len());
    assert_eq!(b.stats().floors_evicted, 50 - 5 - 10);
    // The newest floors still refuse their late duplicates.
    b.handle_datagram(t0, addr(1), &request_datagram(44, 3, b"x"));
    assert_eq!(b.poll_event(), None);
}

/// Issue 8 (anti-amplification), QUIC's first-contact padding: a one-fragment request to a
/// peer never heard from is padded to a third of a datagram, so a one-datagram answer comes
/// straight back without a `Retry`; later requests go unpadded. Padding anywhere else, or
/// not made of zeros, is refused.
#[test]
fn a_first_contact_is_padded_so_a_one_datagram_answer_needs_no_retry() {
    let mut sim = Sim::new(2, Config::default(), 46);
    let id = sim.request(addr(1), addr(2), b"wide:".to_vec());
    let flight = sim.net.peek().expect("the first request in flight");
    assert_eq!(
        flight.payload.len(),
        Config::default().max_datagram.div_ceil(3),
        "padded"
    );
    assert_eq!(sim.outcome(id).unwrap(), pattern(1000));
    assert_eq!(sim.node(addr(2)).stats().retries_sent, 0);
    let id = sim.request(addr(1), addr(2), b"abc".to_vec());
    let flight = sim.net.peek().expect("the second request in flight");
    assert_eq!(
        flight.payload.len(),
        HEADER_LEN + 3,
        "not padded once heard from"
    );
    assert_eq!(sim.outcome(id).unwrap(), b"cba");

    let now = sim.now;
    let mut bad = request_datagram(9, 1, b"xyz");
    bad[6..8].copy_from_slice(&codec::FLAG_PADDED.to_be_bytes());
    bad.extend([0, 0, 1]);
    sim.node(addr(2)).handle_datagram(now, addr(1), &bad);
    let mut response = Header::new(Kind::Response, 9, 2, 1);
    response.flags = codec::FLAG_PADDED;
    response.message_len = 1;
    let mut padded_response = codec::encode_datagram(&response, b"r");
    padded_response.extend([0; 8]);
    sim.node(addr(2))
        .handle_datagram(now, addr(1), &padded_response);
    assert_eq!(sim.node(addr(2)).stats().bad_datagrams, 2);
    assert_eq!(sim.node(addr(2)).poll_event(), None);
}

/// Issue 8 (bounded resources): answers held for addresses that never prove themselves are
/// forgotten like any answer, under cache pressure and at expiry; a flood of forged large
/// requests cannot pin the cache and shut honest requesters out.
#[test]
fn held_answers_for_forged_addresses_do_not_pin_the_cache() {
    let config = Config {
        dedup_max_entries: 8,
        dedup_max_bytes: 3 << 20,
        ..Config::default()
    };
    let t0 = Instant::now();
    let mut b = Endpoint::new(config.clone(), &mut Rng::seeded(47));
    for i in 0..50u64 {
        let victim = SocketAddr::from(([10, 0, 0, 1], 1000 + i as u16));
        b.handle_datagram(t0, victim, &request_datagram(0xbad0 + i, 1, b"big:"));
        while let Some(Event::Request { id, body, .. }) = b.poll_event() {
            b.respond(t0, id, answer_for(&body)).unwrap();
        }
        assert!(b.cached_entries() <= 8);
        assert!(b.cached_bytes <= 3 << 20, "{} bytes cached", b.cached_bytes);
    }
    assert_eq!(b.stats().requests_executed, 50, "no request was refused");
    b.handle_timeout(t0 + config.dedup_ttl + Duration::from_secs(1));
    assert_eq!(b.cached_entries(), 0, "and they expire");
}

/// Issue 8 review: first fragments of small requests that never finish are charged at least
/// `MIN_FOOTPRINT` each, so they run into the reassembly bound long before they could fill
/// the response cache's entries, and a new request is still executed.
#[test]
fn small_unfinished_requests_cannot_fill_the_cache() {
    let config = Config {
        dedup_max_entries: 50,
        reassembly_per_peer: 64 << 10,
        reassembly_total: 64 << 10,
        ..Config::default()
    };
    let t0 = Instant::now();
    let mut b = Endpoint::new(config, &mut Rng::seeded(48));
    for incarnation in 0..200u64 {
        let mut h = Header::new(Kind::Request, incarnation, 1, 1);
        h.frag_count = 2;
        h.message_len = 257;
        let len = codec::fragment_range(257, 2, 0).len();
        b.handle_datagram(t0, addr(1), &codec::encode_datagram(&h, &vec![1; len]));
    }
    assert_eq!(
        b.cached_entries(),
        16,
        "64 KiB of reassembly holds 16 of them"
    );
    b.handle_datagram(t0, addr(2), &request_datagram(9999, 1, b"honest"));
    assert!(matches!(b.poll_event(), Some(Event::Request { .. })));
}

/// Issue 15 (invariants in the code): a debug build stops at the step that broke a counter
/// or gave the endpoint an earlier `now` than it had seen.
#[test]
#[cfg(debug_assertions)]
fn a_drifted_counter_or_time_going_back_stops_a_debug_build() {
    let t0 = Instant::now();
    let mut rng = Rng::seeded(7);
    let mut b = Endpoint::new(Config::default(), &mut rng);
    b.check_counters();
    b.cached_bytes += 1;
    let drifted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.check_counters()));
    assert!(drifted.is_err(), "a drifted cached_bytes is caught");
    b.cached_bytes -= 1;
    b.handle_timeout(t0 + Duration::from_secs(1));
    let back = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.handle_timeout(t0)));
    assert!(back.is_err(), "time going backwards is caught");
}
