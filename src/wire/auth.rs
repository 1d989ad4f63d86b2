//! The cluster key: datagram authentication and the wall clock replay refusal reads.
//!
//! With `--cluster-key-file FILE`, every datagram a program sends carries a MAC:
//! HMAC-SHA256 over the whole datagram (header with the MAC slot zeroed, then the payload),
//! truncated to the 16-byte slot of the header ([`crate::wire::codec`]; RFC 2104 allows truncation
//! to half the output). The HMAC key is SHA-256 of a context string and the file's contents,
//! so the file may hold any random secret of at least [`MIN_SECRET`] bytes (raw or, say,
//! base64); whitespace at either end is ignored, so an editor's trailing newline does not
//! split a cluster in two.
//!
//! A keyed datagram also carries its send time (the header's `stamp`, microseconds since the
//! Unix epoch, under the MAC): the reliable layer refuses one stamped outside its replay
//! window or before the receiving process started ([`crate::reliable`] explains the rule).
//! [`WallClock`] turns the monotonic `now` every sans-IO call gets into that time.
//!
//! Why HMAC-SHA256 rather than keyed BLAKE3 (both allowed by the issue): on our machines'
//! CPUs (SHA extensions) it measured about 4× faster for datagram-sized inputs, 0.82 µs
//! against 3.5–3.9 µs to seal 1400 bytes (`cargo bench --bench micro`); BLAKE3's SIMD only
//! pays off past one 1 KiB chunk. The keyed state (inner and outer pads) is computed once per
//! key and cloned per datagram. The key is one SHA-256 pass over the secret, so the secret
//! must be random, not a passphrase.

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Size of a datagram's MAC in bytes: HMAC-SHA256 truncated to the header's reserved slot.
pub const MAC_LEN: usize = 16;

/// The MAC every datagram and token is sealed with.
type HmacSha256 = Hmac<Sha256>;

/// Fewest bytes of secret a key file must hold (after trimming whitespace).
pub const MIN_SECRET: usize = 16;

/// The context string of the key derivation: changing it changes every key.
const KEY_CONTEXT: &str = "trireme 2026-11-24 cluster key for datagram MACs";

/// The context string of address-validation tokens (keyed by a per-process secret).
const TOKEN_CONTEXT: &str = "trireme 2026-11-24 address validation token";

/// Why a key file could not be used.
#[derive(Debug, Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("cannot read cluster key file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file holds too little secret.
    #[error(
        "cluster key file {path} holds {len} bytes of secret, at least {MIN_SECRET} are needed \
         (make one with: head -c 32 /dev/urandom | base64 > {path})"
    )]
    TooShort {
        /// The file.
        path: String,
        /// Bytes of secret it holds after trimming.
        len: usize,
    },
}

/// A cluster key: what every datagram's MAC is computed with.
#[derive(Clone)]
pub struct ClusterKey {
    /// The derived 32-byte HMAC key.
    key: [u8; 32],
    /// The HMAC state keyed with it, cloned for every MAC.
    keyed: HmacSha256,
}

impl PartialEq for ClusterKey {
    /// Keys are equal when their derived bytes are.
    fn eq(&self, other: &ClusterKey) -> bool {
        self.key == other.key
    }
}

impl Eq for ClusterKey {}

impl fmt::Debug for ClusterKey {
    /// Never prints the key itself.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    /// Derives a key from `secret` (trimmed of ASCII whitespace at both ends). Returns `None`
    /// when fewer than [`MIN_SECRET`] bytes remain.
    pub fn from_secret(secret: &[u8]) -> Option<ClusterKey> {
        let secret = secret.trim_ascii();
        (secret.len() >= MIN_SECRET).then(|| {
            let key = derive(KEY_CONTEXT, secret);
            ClusterKey {
                key,
                keyed: HmacSha256::new_from_slice(&key).expect("HMAC takes any key length"),
            }
        })
    }

    /// Reads the key file at `path` (`--cluster-key-file`).
    pub fn load(path: &Path) -> Result<ClusterKey, KeyError> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: shown.clone(),
            source,
        })?;
        ClusterKey::from_secret(&bytes).ok_or(KeyError::TooShort {
            path: shown,
            len: bytes.trim_ascii().len(),
        })
    }

    /// The MAC of a datagram given as `head` (the header bytes before the MAC slot), the
    /// slot taken as zeros, then `tail` (everything after the slot).
    pub fn mac(&self, head: &[u8], tail: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = self.keyed.clone();
        mac.update(head);
        mac.update(&[0; MAC_LEN]);
        mac.update(tail);
        truncate(mac)
    }
}

/// SHA-256 of `context` and `secret`: a 32-byte key bound to its use.
fn derive(context: &str, secret: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(context.as_bytes());
    hash.update([0]);
    hash.update(secret);
    hash.finalize().into()
}

/// Compares two MACs in time independent of where they differ.
pub fn macs_equal(a: &[u8; MAC_LEN], b: &[u8; MAC_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The first [`MAC_LEN`] bytes of an HMAC's output.
fn truncate(mac: HmacSha256) -> [u8; MAC_LEN] {
    let full = mac.finalize().into_bytes();
    let mut out = [0; MAC_LEN];
    out.copy_from_slice(&full[..MAC_LEN]);
    out
}

/// Mints and checks address-validation tokens with a per-process secret: a token names the
/// address it was sent to and when, so only someone who receives datagrams at that address
/// can echo it back in time.
#[derive(Clone)]
pub struct TokenMinter {
    /// HMAC keyed with the per-process secret (which never leaves the process).
    keyed: HmacSha256,
}

impl fmt::Debug for TokenMinter {
    /// Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenMinter(..)")
    }
}

/// Bytes of a token: 4 bytes of issue time (seconds on the minter's clock), 16 of MAC.
pub const TOKEN_LEN: usize = 4 + MAC_LEN;

impl TokenMinter {
    /// A minter with the secret `seed` (drawn from the endpoint's RNG).
    pub fn new(seed: [u8; 32]) -> TokenMinter {
        TokenMinter {
            keyed: HmacSha256::new_from_slice(&derive(TOKEN_CONTEXT, &seed))
                .expect("HMAC takes any key length"),
        }
    }

    /// A token for `addr` issued at `secs` on the minter's clock.
    pub fn mint(&self, addr: std::net::SocketAddr, secs: u32) -> [u8; TOKEN_LEN] {
        let mut token = [0; TOKEN_LEN];
        token[..4].copy_from_slice(&secs.to_be_bytes());
        token[4..].copy_from_slice(&self.tag(addr, secs));
        token
    }

    /// Whether `token` was minted by us for `addr` no more than `lifetime_secs` before `secs`.
    pub fn check(
        &self,
        token: &[u8],
        addr: std::net::SocketAddr,
        secs: u32,
        lifetime_secs: u32,
    ) -> bool {
        let Ok(token) = <&[u8; TOKEN_LEN]>::try_from(token) else {
            return false;
        };
        let issued = u32::from_be_bytes([token[0], token[1], token[2], token[3]]);
        let mac: &[u8; MAC_LEN] = token[4..].try_into().expect("TOKEN_LEN = 4 + MAC_LEN");
        issued <= secs && secs - issued <= lifetime_secs && macs_equal(mac, &self.tag(addr, issued))
    }

    /// The MAC part of the token for `addr` at `secs`.
    fn tag(&self, addr: std::net::SocketAddr, secs: u32) -> [u8; MAC_LEN] {
        let mut mac = self.keyed.clone();
        match addr.ip() {
            std::net::IpAddr::V4(ip) => mac.update(&ip.octets()),
            std::net::IpAddr::V6(ip) => mac.update(&ip.octets()),
        }
        mac.update(&addr.port().to_be_bytes());
        mac.update(&secs.to_be_bytes());
        truncate(mac)
    }
}

/// Maps the monotonic instants of sans-IO calls to wall-clock time: one reading of both
/// clocks, taken together, anchors the mapping. The anchor is also the process's start as
/// the replay rule sees it.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    /// The monotonic side of the anchor.
    origin: Instant,
    /// The wall-clock side, in microseconds since the Unix epoch.
    origin_micros: u64,
}

impl WallClock {
    /// Anchors the mapping on the real clocks, read now.
    pub fn system() -> WallClock {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        WallClock::anchored(Instant::now(), micros)
    }

    /// Anchors the mapping on `origin` = `origin_micros` (virtual time in the simulator).
    pub fn anchored(origin: Instant, origin_micros: u64) -> WallClock {
        WallClock {
            origin,
            origin_micros,
        }
    }

    /// The wall-clock time of `now`, in microseconds since the Unix epoch.
    pub fn micros(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.origin);
        self.origin_micros.saturating_add(since.as_micros() as u64)
    }

    /// The anchor's wall-clock time: the process's start for the replay rule.
    pub fn origin_micros(&self) -> u64 {
        self.origin_micros
    }
}

/// The cluster key in force on an endpoint and the replay window it enforces.
#[derive(Clone, Debug)]
pub struct Auth {
    /// The key every datagram is sealed and checked with.
    pub key: ClusterKey,
    /// A datagram stamped further than this from the receiver's clock is refused. Must stay
    /// below the dedup cache's lifetime, so that a replay young enough to be accepted always
    /// finds its request's cached answer.
    pub replay_window: Duration,
    /// The clock stamps are written and checked with.
    pub clock: WallClock,
}

impl Auth {
    /// The default replay window: 30 s, half the dedup cache's default lifetime, and far
    /// above the clock skew of hosts kept in step by NTP.
    pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);

    /// Authentication with `key`, the default window, and the system clock read now.
    pub fn new(key: ClusterKey) -> Auth {
        Auth {
            key,
            replay_window: Auth::DEFAULT_WINDOW,
            clock: WallClock::system(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_trimmed_secrets_of_at_least_16_bytes() {
        assert!(ClusterKey::from_secret(b"short").is_none());
        assert!(ClusterKey::from_secret(b"  fifteen bytes!\n").is_none());
        let a = ClusterKey::from_secret(b"sixteen bytes!!!").unwrap();
        let b = ClusterKey::from_secret(b"sixteen bytes!!!\n").unwrap();
        let c = ClusterKey::from_secret(b"sixteen bytes!!?").unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(format!("{a:?}"), "ClusterKey(..)");
    }

    #[test]
    fn a_mac_depends_on_key_and_every_byte() {
        let a = ClusterKey::from_secret(b"0123456789abcdef").unwrap();
        let b = ClusterKey::from_secret(b"0123456789abcdeg").unwrap();
        let mac = a.mac(b"head", b"tail");
        assert!(macs_equal(&mac, &a.mac(b"head", b"tail")));
        assert!(!macs_equal(&mac, &b.mac(b"head", b"tail")));
        assert!(!macs_equal(&mac, &a.mac(b"heae", b"tail")));
        assert!(!macs_equal(&mac, &a.mac(b"head", b"tail!")));
    }

    #[test]
    fn a_missing_or_short_key_file_is_a_precise_error() {
        let dir = std::env::temp_dir().join(format!("trireme-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let short = dir.join("short");
        std::fs::write(&short, "abc\n").unwrap();
        let e = ClusterKey::load(&short).unwrap_err().to_string();
        assert!(
            e.contains("holds 3 bytes") && e.contains("at least 16"),
            "{e}"
        );
        let e = ClusterKey::load(&dir.join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read cluster key file"), "{e}");
        let good = dir.join("good");
        std::fs::write(&good, "a secret of more than sixteen bytes\n").unwrap();
        assert!(ClusterKey::load(&good).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tokens_name_their_address_and_expire() {
        let minter = TokenMinter::new([7; 32]);
        let here: std::net::SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let there: std::net::SocketAddr = "127.0.0.1:4001".parse().unwrap();
        let token = minter.mint(here, 100);
        assert!(minter.check(&token, here, 100, 30));
        assert!(minter.check(&token, here, 130, 30));
        assert!(!minter.check(&token, here, 131, 30), "expired");
        assert!(!minter.check(&token, here, 99, 30), "from the future");
        assert!(!minter.check(&token, there, 100, 30), "another address");
        assert!(!minter.check(&token[1..], here, 100, 30), "truncated");
        assert!(!TokenMinter::new([8; 32]).check(&token, here, 100, 30));
    }

    #[test]
    fn the_wall_clock_follows_the_monotonic_one() {
        let t0 = Instant::now();
        let clock = WallClock::anchored(t0, 1_000_000);
        assert_eq!(clock.micros(t0), 1_000_000);
        assert_eq!(clock.micros(t0 + Duration::from_millis(3)), 1_003_000);
        assert_eq!(clock.origin_micros(), 1_000_000);
    }
}
