//! Cluster membership vocabulary: server ids, epochs and views.
//!
//! These are the typed values that travel in heartbeats and `query_servers` answers. The view
//! leader owns the authoritative [`View`]; servers and clients hold copies learned from it.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::util::rng::Rng;

/// A server's identity: 128 random bits, fresh at every start (and at every rejoin after
/// the server was declared dead). Printed as 32 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServerId(pub u128);

impl ServerId {
    /// Draws a fresh random id from `rng`.
    pub fn random(rng: &mut Rng) -> ServerId {
        ServerId((u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64()))
    }
}

impl fmt::Display for ServerId {
    /// Formats the id as 32 lowercase hex characters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for ServerId {
    /// Formats the id like `Display`, so logs and test failures show the familiar form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for ServerId {
    type Err = String;

    /// Parses exactly 32 hex characters.
    fn from_str(s: &str) -> Result<ServerId, String> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("a server id is 32 hex characters, got {s:?}"));
        }
        u128::from_str_radix(s, 16)
            .map(ServerId)
            .map_err(|e| format!("bad server id {s:?}: {e}"))
    }
}

/// A view number. It grows by one on every join and every departure.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The lowest version a `setr` decided in the view of this epoch writes. Versions carry
    /// the epoch in their high 32 bits, so they are ordered across epochs: any write decided
    /// in a later view beats anything written before it, even a copy kept by a server the
    /// view leader dropped while every other copy was lost (a bare counter restarting at 1
    /// would let that old copy win). Raw `set` writes version 0, older than any `setr`.
    pub fn version_floor(self) -> u64 {
        self.0.min(u64::from(u32::MAX)) << 32
    }
}

impl fmt::Display for Epoch {
    /// Formats the epoch as its plain number.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One live server as the view leader sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// The server's current id.
    pub id: ServerId,
    /// The address the server is reached at (its advertised address).
    pub addr: SocketAddr,
}

/// The set of live servers at one epoch, plus the placement parameters every view carries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    /// The epoch this view belongs to.
    pub epoch: Epoch,
    /// Live servers, sorted by id.
    pub members: Vec<Member>,
    /// Replication count (`--replicas`).
    pub replicas: u32,
    /// Ring points per server (`--vnodes`).
    pub vnodes: u32,
}

impl View {
    /// Returns the member with `id`, if it is in this view.
    pub fn member(&self, id: ServerId) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    /// Returns true if a member with `id` is in this view.
    pub fn contains(&self, id: ServerId) -> bool {
        self.member(id).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Contract: a server id prints as 32 lowercase hex chars and parses back; non-hex text
    /// is refused.
    #[test]
    fn server_id_prints_and_parses_as_32_hex() {
        let mut rng = Rng::seeded(3);
        let id = ServerId::random(&mut rng);
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_eq!(text.parse::<ServerId>().unwrap(), id);
        assert_eq!(ServerId(1).to_string(), "00000000000000000000000000000001");
        assert!("xyz".parse::<ServerId>().is_err());
    }

    /// Issue 14 (versions ordered across epochs): every version floor of a later epoch is
    /// above any version reachable by counting up within an earlier epoch, and above 0 (raw
    /// `set`).
    #[test]
    fn version_floors_order_writes_across_epochs() {
        assert_eq!(Epoch(0).version_floor(), 0);
        assert!(Epoch(1).version_floor() > 0);
        assert!(Epoch(8).version_floor() > Epoch(7).version_floor() + u64::from(u32::MAX - 1));
        assert_eq!(Epoch(u64::MAX).version_floor(), u64::from(u32::MAX) << 32);
    }
}
