//! Address validation against amplification, QUIC's way.
//!
//! An unauthenticated UDP request may come from a forged address. So that a node cannot be
//! used to flood a victim, a reply to an address not yet validated is at most
//! [`AMPLIFICATION_FACTOR`] times the size of the datagrams that caused it; a larger reply
//! is held and a small `Retry` carrying a token is sent instead. The requester echoes the
//! token in a `Probe`, which proves it receives at that address; the address is then
//! remembered as validated for a while and the held reply goes out. An address is also
//! validated when it answers a request of ours (the answer names our random request id).
//! With a cluster key every accepted datagram is authenticated, and no check applies.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::wire::auth::{TOKEN_LEN, TokenMinter};

/// A reply to an address not yet validated is at most this many times the bytes of the
/// datagrams that caused it (QUIC, RFC 9000 section 8).
pub const AMPLIFICATION_FACTOR: usize = 3;

/// A token is accepted back for this long after it was minted.
const TOKEN_LIFETIME_SECS: u32 = 30;

/// The validated addresses of one endpoint and the secret its tokens are minted with.
#[derive(Debug)]
pub(super) struct Guard {
    /// Mints and checks tokens.
    minter: TokenMinter,
    /// The instant token times count from (the first instant the guard saw).
    origin: Option<Instant>,
    /// Validated addresses and when they were (last) validated.
    validated: HashMap<SocketAddr, Instant>,
    /// Validations oldest first, for expiry and eviction (an entry counts only if the map
    /// still holds that instant for the address).
    order: VecDeque<(SocketAddr, Instant)>,
    /// How long a validation lasts.
    ttl: Duration,
    /// Most addresses remembered.
    max_entries: usize,
}

impl Guard {
    /// A guard minting with `seed`, remembering at most `max_entries` addresses for `ttl`.
    pub(super) fn new(seed: [u8; 32], ttl: Duration, max_entries: usize) -> Guard {
        Guard {
            minter: TokenMinter::new(seed),
            origin: None,
            validated: HashMap::new(),
            order: VecDeque::new(),
            ttl,
            max_entries: max_entries.max(1),
        }
    }

    /// Whether `peer` was validated within the last `ttl` before `now`.
    pub(super) fn is_validated(&self, now: Instant, peer: SocketAddr) -> bool {
        self.validated
            .get(&peer)
            .is_some_and(|&at| now.saturating_duration_since(at) < self.ttl)
    }

    /// Remembers `peer` as validated at `now`, forgetting expired or, past the bound, the
    /// oldest addresses. Returns whether it was not validated before.
    ///
    /// Called for every answer a peer sends us, so a validation younger than half its
    /// lifetime is left as it is: the common case costs one lookup, no queue entry.
    pub(super) fn validate(&mut self, now: Instant, peer: SocketAddr) -> bool {
        let fresh = !self.is_validated(now, peer);
        if !fresh
            && self
                .validated
                .get(&peer)
                .is_some_and(|&at| now.saturating_duration_since(at) < self.ttl / 2)
        {
            return false;
        }
        self.validated.insert(peer, now);
        self.order.push_back((peer, now));
        while let Some(&(addr, at)) = self.order.front() {
            let current = self.validated.get(&addr) == Some(&at);
            let expired = now.saturating_duration_since(at) >= self.ttl;
            if current && !expired && self.validated.len() <= self.max_entries {
                break;
            }
            self.order.pop_front();
            if current {
                self.validated.remove(&addr);
            }
        }
        // Stale queue entries of re-validated addresses are dropped as they reach the front;
        // bound them too, so the queue never outgrows the map by much.
        if self.order.len() > 2 * self.max_entries {
            let validated = &self.validated;
            self.order
                .retain(|(addr, at)| validated.get(addr) == Some(at));
        }
        fresh
    }

    /// A token for `peer` minted at `now`.
    pub(super) fn token(&mut self, now: Instant, peer: SocketAddr) -> [u8; TOKEN_LEN] {
        let secs = self.secs(now);
        self.minter.mint(peer, secs)
    }

    /// Whether `token` is one of ours for `peer`, still within its lifetime at `now`.
    pub(super) fn check_token(&mut self, now: Instant, peer: SocketAddr, token: &[u8]) -> bool {
        let secs = self.secs(now);
        self.minter.check(token, peer, secs, TOKEN_LIFETIME_SECS)
    }

    /// Seconds from the guard's origin to `now` (the origin is set by the first call).
    fn secs(&mut self, now: Instant) -> u32 {
        let origin = *self.origin.get_or_insert(now);
        now.saturating_duration_since(origin).as_secs() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn validations_expire_and_are_bounded() {
        let t0 = Instant::now();
        let mut guard = Guard::new([1; 32], Duration::from_secs(10), 2);
        assert!(!guard.is_validated(t0, addr(1)));
        assert!(guard.validate(t0, addr(1)));
        assert!(
            !guard.validate(t0 + Duration::from_secs(1), addr(1)),
            "already validated"
        );
        assert!(guard.is_validated(t0 + Duration::from_secs(9), addr(1)));
        assert!(
            !guard.is_validated(t0 + Duration::from_secs(11), addr(1)),
            "expired"
        );
        guard.validate(t0 + Duration::from_secs(2), addr(2));
        guard.validate(t0 + Duration::from_secs(3), addr(3));
        assert_eq!(guard.validated.len(), 2, "bounded: the oldest went");
        assert!(!guard.is_validated(t0 + Duration::from_secs(3), addr(1)));
        assert!(guard.is_validated(t0 + Duration::from_secs(3), addr(3)));
        // Answers within half the lifetime leave the validation as it is (no queue entry)...
        let queued = guard.order.len();
        for i in 0..1000 {
            guard.validate(
                t0 + Duration::from_secs(4) + Duration::from_millis(i),
                addr(3),
            );
        }
        assert_eq!(guard.order.len(), queued);
        // ...later ones refresh it, and stale queue entries never pile up.
        for i in 0..1000 {
            let at = t0 + Duration::from_secs(4 + 6 * i);
            guard.validate(at, addr(3));
            assert!(guard.is_validated(at + Duration::from_secs(4), addr(3)));
        }
        assert!(guard.order.len() <= 4, "{} queued", guard.order.len());
        assert!(
            guard.order.len() <= 4,
            "the queue stays bounded: {}",
            guard.order.len()
        );
    }

    #[test]
    fn a_token_validates_only_its_address_within_its_lifetime() {
        let t0 = Instant::now();
        let mut guard = Guard::new([1; 32], Duration::from_secs(600), 100);
        let token = guard.token(t0, addr(1));
        assert!(guard.check_token(t0 + Duration::from_secs(5), addr(1), &token));
        assert!(!guard.check_token(t0 + Duration::from_secs(5), addr(2), &token));
        assert!(!guard.check_token(t0 + Duration::from_secs(31), addr(1), &token));
        let mut other = Guard::new([2; 32], Duration::from_secs(600), 100);
        assert!(!other.check_token(t0, addr(1), &token));
    }
}
