//! A virtual-time lossy network: the one simulated network every test in virtual time uses
//! (the reliable layer's unit tests, the whole-cluster simulator in `tests/sim/`).
//!
//! Datagrams in flight wait in a queue keyed by the instant they are due, ties broken by the
//! order in which the copies entered the network, so a run replays exactly. What becomes of
//! each datagram (lost, duplicated, delayed, jittered, held back so that later ones overtake
//! it) is decided by the product's own [`FaultInjector`], the one `--faults` applies on a
//! real socket: tests and the product share one fault model. On top of it, links between two
//! addresses can be cut until an instant (both directions; a cut loses what is sent over the
//! link and what was in flight on it when it is due).
//!
//! What happens at the receiving host (nobody listening, a frozen process, a full socket
//! buffer) is the caller's: the network only says which datagram is due when.
//!
//! Calling contract (sans-IO, like the protocol state machines): the caller owns the clock
//! and passes `now` in; time must never go backwards across calls. Call
//! [`Network::send`] for each datagram a host emits, wake at [`Network::poll_timeout`], and
//! drain [`Network::poll_delivery`] until it returns `None`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use super::{FaultInjector, FaultSpec, FaultStats};

/// A datagram in the network, or handed out by it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// The sender's address.
    pub from: SocketAddr,
    /// The receiver's address.
    pub to: SocketAddr,
    /// The bytes, as sent.
    pub payload: Vec<u8>,
}

/// Counts of what a [`Network`] has done beyond its injector's [`FaultStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetworkStats {
    /// Copies handed out by [`Network::poll_delivery`].
    pub delivered: u64,
    /// Datagrams (at send) and copies (when due) lost to a cut link.
    pub cut: u64,
}

/// A seeded, virtual-time network between socket addresses (see the module doc).
#[derive(Debug, Clone)]
pub struct Network {
    /// Decides each datagram's fate: its copies and when each is due.
    injector: FaultInjector,
    /// Copies in flight, by (instant due, entry number).
    in_flight: BTreeMap<(Instant, u64), Datagram>,
    /// Copies that entered so far; numbers them, so that same-instant ties keep send order.
    entered: u64,
    /// Cut links, each pair in address order, with the instant each heals.
    cuts: BTreeMap<(SocketAddr, SocketAddr), Instant>,
    /// What has been done so far.
    stats: NetworkStats,
}

/// The key of the link between `a` and `b` (either direction): the pair in address order.
fn link(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    if a <= b { (a, b) } else { (b, a) }
}

impl Network {
    /// Builds an empty network whose datagrams meet the faults `injector` decides (seed the
    /// injector with [`FaultInjector::with_rng`] for a replayable run). Returns it, no link cut.
    pub fn new(injector: FaultInjector) -> Network {
        Network {
            injector,
            in_flight: BTreeMap::new(),
            entered: 0,
            cuts: BTreeMap::new(),
            stats: NetworkStats::default(),
        }
    }

    /// Returns the faults applied to datagrams sent from now on.
    pub fn spec(&self) -> &FaultSpec {
        self.injector.spec()
    }

    /// Applies `spec` to datagrams sent from now on (those in flight keep their fate); the
    /// generator and the counts go on.
    pub fn set_spec(&mut self, spec: FaultSpec) {
        self.injector.set_spec(spec);
    }

    /// Puts a datagram from `from` to `to` on the network at `now`. Returns how many copies
    /// are now in flight: 0 when it is lost (to the injector, or to a cut link), 2 when
    /// duplicated.
    pub fn send(
        &mut self,
        now: Instant,
        from: SocketAddr,
        to: SocketAddr,
        payload: Vec<u8>,
    ) -> usize {
        if self.is_cut(now, from, to) {
            self.stats.cut += 1;
            return 0;
        }
        let due = self.injector.schedule(now);
        let copies = due.len();
        for at in due {
            self.entered += 1;
            let datagram = Datagram {
                from,
                to,
                payload: payload.clone(),
            };
            self.in_flight.insert((at, self.entered), datagram);
        }
        copies
    }

    /// Returns the instant the next copy in flight is due, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.in_flight.keys().next().map(|&(at, _)| at)
    }

    /// Hands out the next copy due at or before `now` (earliest first, ties in send order),
    /// or `None` when none is due. A copy due on a link that is cut at `now` is lost (and
    /// counted) instead.
    pub fn poll_delivery(&mut self, now: Instant) -> Option<Datagram> {
        while let Some(entry) = self.in_flight.first_entry() {
            if entry.key().0 > now {
                return None;
            }
            let datagram = entry.remove();
            if self.is_cut(now, datagram.from, datagram.to) {
                self.stats.cut += 1;
                continue;
            }
            self.stats.delivered += 1;
            return Some(datagram);
        }
        None
    }

    /// Cuts the link between `a` and `b` (both directions) from `now` until `until`; a cut
    /// of that link already lasting longer stays as it is. Returns the instant the link heals.
    pub fn cut(&mut self, now: Instant, a: SocketAddr, b: SocketAddr, until: Instant) -> Instant {
        self.cuts.retain(|_, heal| *heal > now);
        let heal = self.cuts.entry(link(a, b)).or_insert(until);
        *heal = (*heal).max(until);
        *heal
    }

    /// Returns true when the link between `a` and `b` is cut at `now`.
    pub fn is_cut(&self, now: Instant, a: SocketAddr, b: SocketAddr) -> bool {
        self.cuts.get(&link(a, b)).is_some_and(|&heal| heal > now)
    }

    /// Returns the links cut at `now` (each pair in address order), with when each heals.
    pub fn cuts(
        &self,
        now: Instant,
    ) -> impl Iterator<Item = (SocketAddr, SocketAddr, Instant)> + '_ {
        self.cuts
            .iter()
            .filter(move |&(_, &heal)| heal > now)
            .map(|(&(a, b), &heal)| (a, b, heal))
    }

    /// Returns the next copy due (earliest, ties in send order) without taking it, if any.
    pub fn peek(&self) -> Option<&Datagram> {
        self.in_flight.values().next()
    }

    /// Returns how many copies are in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Returns the counts of deliveries and cut losses so far.
    pub fn stats(&self) -> NetworkStats {
        self.stats
    }

    /// Returns the injector's counts so far: datagrams that got past the cut links, and how
    /// many of those it lost, duplicated, held back and delayed.
    pub fn fault_stats(&self) -> FaultStats {
        self.injector.stats()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::util::rng::Rng;

    /// The address of test host `n`.
    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 4000))
    }

    /// A network applying the spec written as `text`, seeded with `seed`.
    fn network(text: &str, seed: u64) -> Network {
        let spec: FaultSpec = text.parse().expect("a valid spec");
        Network::new(FaultInjector::with_rng(spec, Rng::seeded(seed)))
    }

    /// Drains the network to the end, waking at each instant something is due; returns the
    /// payloads in delivery order.
    fn drain(net: &mut Network) -> Vec<Vec<u8>> {
        let mut order = Vec::new();
        while let Some(at) = net.poll_timeout() {
            while let Some(d) = net.poll_delivery(at) {
                order.push(d.payload);
            }
        }
        order
    }

    /// Sends `n` numbered datagrams from host 1 to host 2 at `now`, then drains the network
    /// to the end; returns the numbers in delivery order.
    fn deliver_all(net: &mut Network, now: Instant, n: u32) -> Vec<u32> {
        for i in 0..n {
            net.send(now, addr(1), addr(2), i.to_be_bytes().to_vec());
        }
        drain(net)
            .into_iter()
            .map(|p| u32::from_be_bytes(p.try_into().expect("4 bytes")))
            .collect()
    }

    /// A fixed delay delivers every datagram once, exactly that late, in send order.
    #[test]
    fn a_delay_alone_delivers_everything_in_order_that_late() {
        let mut net = network("delay=3ms", 1);
        let now = Instant::now();
        net.send(now, addr(1), addr(2), b"a".to_vec());
        net.send(now, addr(2), addr(1), b"b".to_vec());
        assert_eq!(net.poll_timeout(), Some(now + Duration::from_millis(3)));
        assert_eq!(net.poll_delivery(now + Duration::from_micros(2999)), None);
        let at = now + Duration::from_millis(3);
        let first = net.poll_delivery(at).expect("due");
        assert_eq!(
            (first.from, first.to, first.payload),
            (addr(1), addr(2), b"a".to_vec())
        );
        assert_eq!(net.poll_delivery(at).expect("due").payload, b"b");
        assert_eq!(net.poll_delivery(at), None);
        assert_eq!(net.stats().delivered, 2);
        assert_eq!(deliver_all(&mut net, at, 100), (0..100).collect::<Vec<_>>());
    }

    /// Loss, duplication and reordering all happen at about their rates, and the same seed
    /// replays the same deliveries.
    #[test]
    fn loss_duplication_and_reordering_follow_the_spec_and_replay() {
        let spec = "loss=0.2,dup=0.1,reorder=0.3,delay=1ms,jitter=100us";
        let now = Instant::now();
        let mut net = network(spec, 5);
        let order = deliver_all(&mut net, now, 10_000);
        let faults = net.fault_stats();
        assert!((1_700..2_300).contains(&faults.dropped), "{faults:?}");
        assert!((600..1_000).contains(&faults.duplicated), "{faults:?}");
        assert!(faults.reordered > 2_000, "{faults:?}");
        assert_eq!(
            order.len() as u64,
            10_000 - faults.dropped + faults.duplicated
        );
        let overtaken = order.windows(2).filter(|w| w[0] > w[1]).count();
        assert!(overtaken > 1_000, "only {overtaken} datagrams overtaken");
        assert_eq!(deliver_all(&mut network(spec, 5), now, 10_000), order);
        assert_ne!(deliver_all(&mut network(spec, 6), now, 10_000), order);
    }

    /// A cut link loses what is sent over it and what was in flight on it, in both
    /// directions, until it heals; other links are untouched, and a shorter cut of the same
    /// link does not shorten it.
    #[test]
    fn a_cut_loses_both_directions_until_it_heals() {
        let mut net = network("delay=1ms", 2);
        let now = Instant::now();
        net.send(now, addr(2), addr(1), b"in flight".to_vec());
        let heal = now + Duration::from_millis(10);
        assert_eq!(net.cut(now, addr(1), addr(2), heal), heal);
        assert_eq!(
            net.cut(now, addr(2), addr(1), now + Duration::from_millis(5)),
            heal
        );
        assert!(net.is_cut(now, addr(2), addr(1)));
        assert_eq!(net.send(now, addr(1), addr(2), b"lost".to_vec()), 0);
        assert_eq!(net.send(now, addr(1), addr(3), b"other link".to_vec()), 1);
        let at = now + Duration::from_millis(1);
        assert_eq!(net.poll_delivery(at).expect("due").payload, b"other link");
        assert_eq!(net.poll_delivery(at), None);
        assert_eq!(net.stats().cut, 2);
        assert_eq!(net.cuts(at).count(), 1);
        assert!(!net.is_cut(heal, addr(1), addr(2)), "healed at its instant");
        assert_eq!(net.cuts(heal).count(), 0);
        assert_eq!(net.send(heal, addr(1), addr(2), b"through".to_vec()), 1);
        let at = heal + Duration::from_millis(1);
        assert_eq!(net.poll_delivery(at).expect("due").payload, b"through");
    }

    /// A changed spec applies to datagrams sent afterwards; those in flight keep their fate.
    #[test]
    fn a_changed_spec_applies_from_then_on() {
        let mut net = network("delay=60ms", 3);
        let now = Instant::now();
        net.send(now, addr(1), addr(2), b"slow".to_vec());
        net.set_spec("delay=1ms".parse().expect("valid"));
        net.send(now, addr(1), addr(2), b"fast".to_vec());
        assert_eq!(net.in_flight(), 2);
        assert_eq!(drain(&mut net), [b"fast".to_vec(), b"slow".to_vec()]);
        assert_eq!(net.stats().delivered, 2);
        net.set_spec("loss=1,delay=1ms".parse().expect("valid"));
        assert_eq!(net.send(now, addr(1), addr(2), b"gone".to_vec()), 0);
        assert_eq!(net.fault_stats().dropped, 1);
    }
}
