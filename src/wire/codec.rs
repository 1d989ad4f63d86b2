//! The one datagram codec.
//!
//! Every datagram is a fixed-layout [`Header`] (hand-coded, big-endian, frozen at protocol
//! version 1) followed by a payload. The payload of a `Request` or `Response` datagram is one
//! fragment of a message body; the payload of an `Ack` is an [`AckBody`]; a `Probe` has none.
//! Message bodies ([`crate::wire::message::Request`], [`crate::wire::message::Response`]) are serde types
//! encoded with bincode 2 in serde mode with an explicit configuration and a size limit. This
//! module is the only place that names bincode.
//!
//! Header layout (60 bytes):
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 4 | magic `TRIR` |
//! | 4 | 1 | protocol version (1) |
//! | 5 | 1 | kind: 1 request, 2 response, 3 ack, 4 probe |
//! | 6 | 2 | flags |
//! | 8 | 8 | sender incarnation (random per process start) |
//! | 16 | 8 | request id (the same for every retransmission: the dedup key) |
//! | 24 | 4 | transmission number (new on every send) |
//! | 28 | 4 | echo: the peer's transmission number this datagram answers (0: none) |
//! | 32 | 4 | fragment index |
//! | 36 | 4 | fragment count |
//! | 40 | 4 | message length (bytes of the whole reassembled body) |
//! | 44 | 16 | MAC (zero unless [`FLAG_MAC`] is set) |
//! | 60 | 8 | only with [`FLAG_MAC`]: stamp, the send time in µs since the Unix epoch |
//!
//! With a cluster key ([`crate::wire::auth`]) every datagram sets [`FLAG_MAC`], carries its stamp,
//! and its MAC covers every byte of the datagram with the MAC slot taken as zeros:
//! [`seal`] writes it, [`verify`] checks it. Without a key the header is 60 bytes.
//!
//! Several datagrams for the same peer may travel as one **bundle** (coalesced by the reliable
//! layer at the end of an event-loop turn): the magic `TRIB`, the version, then for each
//! datagram its length (2 bytes, big-endian) and its bytes, each a whole datagram as above
//! (sealed on its own with a cluster key). [`bundle`] builds one, [`Bundle::parts`] splits it.
//!
//! Decoding never panics on arbitrary bytes; errors tell [`DecodeError::Truncated`] (too
//! short) from [`DecodeError::Malformed`] (the bytes are there but wrong).

use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::wire::auth::{ClusterKey, macs_equal};

/// The four bytes every trireme datagram starts with.
pub const MAGIC: [u8; 4] = *b"TRIR";
/// The four bytes a bundle of datagrams starts with.
pub const BUNDLE_MAGIC: [u8; 4] = *b"TRIB";
/// Bytes before a bundle's first datagram: magic and version.
pub const BUNDLE_HEADER_LEN: usize = 5;
/// Bytes of the length in front of each datagram of a bundle.
pub const BUNDLE_LENGTH_LEN: usize = 2;
/// The protocol version this codec speaks.
pub const VERSION: u8 = 1;
/// Size of the fixed header in bytes.
pub const HEADER_LEN: usize = 60;
/// Size of the reserved MAC slot in bytes (the cluster key's truncated MAC: [`crate::wire::auth`]
/// owns it).
pub use crate::wire::auth::MAC_LEN;
/// Where the MAC slot starts.
pub const MAC_OFFSET: usize = 44;
/// Size of the stamp that follows the fixed header when [`FLAG_MAC`] is set.
pub const STAMP_LEN: usize = 8;
/// The longest header: the fixed part and the stamp.
pub const MAX_HEADER_LEN: usize = HEADER_LEN + STAMP_LEN;
/// The largest message body (after reassembly) anyone will encode or accept: a 1 MiB value
/// plus its key and framing fits with room to spare; rebalance batches stay below it.
pub const MAX_MESSAGE: usize = 8 << 20;

/// The smallest payload any fragment but the last may carry. It bounds the fragment count
/// of a message by its length, so a header cannot make a receiver allocate or scan a huge
/// fragment table for a small message.
pub const MIN_FRAGMENT_PAYLOAD: usize = 256;

/// Header flag: the MAC slot holds a MAC over header and payload, and the stamp follows the
/// fixed header (cluster key in use).
pub const FLAG_MAC: u16 = 0x0001;
/// Header flag on an `Ack`: it acknowledges fragments of a response (else of a request).
pub const FLAG_ACK_RESPONSE: u16 = 0x0002;
/// Header flag on a one-fragment `Request`: zeros follow the message to fill the datagram
/// (a first contact pads so that the answer fits the anti-amplification limit).
pub const FLAG_PADDED: u16 = 0x0004;

/// What a datagram carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// One fragment of a request message.
    Request = 1,
    /// One fragment of a response message.
    Response = 2,
    /// A selective acknowledgement of fragments (payload: [`AckBody`]).
    Ack = 3,
    /// A requester asking what became of a fully delivered request (payload: empty, or the
    /// address-validation token a `Retry` carried).
    Probe = 4,
    /// A responder asking the requester to prove it receives at its address before it
    /// sends a reply larger than the anti-amplification limit (payload: a token, to be echoed
    /// in a `Probe`).
    Retry = 5,
}

impl Kind {
    /// Maps the wire byte to a kind, or `None` for an unknown value.
    pub fn from_byte(byte: u8) -> Option<Kind> {
        match byte {
            1 => Some(Kind::Request),
            2 => Some(Kind::Response),
            3 => Some(Kind::Ack),
            4 => Some(Kind::Probe),
            5 => Some(Kind::Retry),
            _ => None,
        }
    }

    /// A short lowercase name for logs and traces.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Request => "request",
            Kind::Response => "response",
            Kind::Ack => "ack",
            Kind::Probe => "probe",
            Kind::Retry => "retry",
        }
    }
}

/// The fixed header at the start of every datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What the payload is.
    pub kind: Kind,
    /// Bit flags ([`FLAG_MAC`], [`FLAG_ACK_RESPONSE`]); unknown bits are preserved.
    pub flags: u16,
    /// The sender's incarnation: random per process start, so restarts never collide.
    pub incarnation: u64,
    /// The request this datagram belongs to, in the requester's id space.
    pub request_id: u64,
    /// The sender's transmission number: unique per send, so RTT samples are unambiguous.
    pub transmission: u32,
    /// The peer transmission this datagram answers (0 when it answers none).
    pub echo: u32,
    /// Index of this fragment within its message.
    pub frag_index: u32,
    /// Number of fragments of the message (at least 1).
    pub frag_count: u32,
    /// Length in bytes of the whole message body.
    pub message_len: u32,
    /// The MAC slot: all zero unless [`FLAG_MAC`] is set.
    pub mac: [u8; MAC_LEN],
    /// The send time in µs since the Unix epoch; on the wire only with [`FLAG_MAC`].
    pub stamp: u64,
}

/// Why a datagram or body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The input ended before the structure did.
    #[error("truncated: needed {needed} bytes, got {got}")]
    Truncated {
        /// Bytes required to go on decoding.
        needed: usize,
        /// Bytes available.
        got: usize,
    },
    /// The bytes are present but do not form a valid structure.
    #[error("malformed: {0}")]
    Malformed(String),
}

/// Why a body could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// The encoded body would exceed [`MAX_MESSAGE`].
    #[error("message of {size} bytes exceeds the {limit}-byte limit")]
    TooLarge {
        /// Size the body would have had (at least).
        size: usize,
        /// The limit it exceeds.
        limit: usize,
    },
    /// The value could not be represented (a serde error).
    #[error("cannot encode: {0}")]
    Unencodable(String),
}

impl Header {
    /// Builds a header with no flags, no echo, a single fragment and an empty MAC slot.
    pub fn new(kind: Kind, incarnation: u64, request_id: u64, transmission: u32) -> Header {
        Header {
            kind,
            flags: 0,
            incarnation,
            request_id,
            transmission,
            echo: 0,
            frag_index: 0,
            frag_count: 1,
            message_len: 0,
            mac: [0; MAC_LEN],
            stamp: 0,
        }
    }

    /// The length of this header on the wire: 60 bytes, 68 with [`FLAG_MAC`].
    pub fn encoded_len(&self) -> usize {
        if self.flags & FLAG_MAC != 0 {
            MAX_HEADER_LEN
        } else {
            HEADER_LEN
        }
    }

    /// Appends the wire form of this header (60 bytes, 68 with [`FLAG_MAC`]) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.kind as u8);
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.incarnation.to_be_bytes());
        out.extend_from_slice(&self.request_id.to_be_bytes());
        out.extend_from_slice(&self.transmission.to_be_bytes());
        out.extend_from_slice(&self.echo.to_be_bytes());
        out.extend_from_slice(&self.frag_index.to_be_bytes());
        out.extend_from_slice(&self.frag_count.to_be_bytes());
        out.extend_from_slice(&self.message_len.to_be_bytes());
        out.extend_from_slice(&self.mac);
        if self.flags & FLAG_MAC != 0 {
            out.extend_from_slice(&self.stamp.to_be_bytes());
        }
    }

    /// Decodes the header at the start of `datagram` and returns it with the payload.
    /// Checks magic, version, kind, and that the fragment fields are consistent.
    pub fn decode(datagram: &[u8]) -> Result<(Header, &[u8]), DecodeError> {
        if datagram.len() < HEADER_LEN {
            // A datagram that does not even carry our magic is malformed, not truncated.
            let prefix = datagram.len().min(MAGIC.len());
            if datagram[..prefix] != MAGIC[..prefix] {
                return Err(DecodeError::Malformed("bad magic".into()));
            }
            return Err(DecodeError::Truncated {
                needed: HEADER_LEN,
                got: datagram.len(),
            });
        }
        let mut r = Reader {
            bytes: datagram,
            pos: 0,
        };
        if r.take(4)? != MAGIC {
            return Err(DecodeError::Malformed("bad magic".into()));
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::Malformed(format!(
                "unsupported protocol version {version}"
            )));
        }
        let kind_byte = r.u8()?;
        let kind = Kind::from_byte(kind_byte)
            .ok_or_else(|| DecodeError::Malformed(format!("unknown kind {kind_byte}")))?;
        let mut header = Header {
            kind,
            flags: r.u16()?,
            incarnation: r.u64()?,
            request_id: r.u64()?,
            transmission: r.u32()?,
            echo: r.u32()?,
            frag_index: r.u32()?,
            frag_count: r.u32()?,
            message_len: r.u32()?,
            mac: r
                .take(MAC_LEN)?
                .try_into()
                .map_err(|_| DecodeError::Malformed("mac".into()))?,
            stamp: 0,
        };
        if header.flags & FLAG_MAC != 0 {
            header.stamp = r.u64()?;
        }
        if header.frag_count == 0 || header.frag_index >= header.frag_count {
            return Err(DecodeError::Malformed(format!(
                "fragment {} of {}",
                header.frag_index, header.frag_count
            )));
        }
        if header.frag_count > fragment_count(header.message_len as usize, MIN_FRAGMENT_PAYLOAD) {
            return Err(DecodeError::Malformed(format!(
                "{} fragments for a {}-byte message",
                header.frag_count, header.message_len
            )));
        }
        if header.message_len as usize > MAX_MESSAGE {
            return Err(DecodeError::Malformed(format!(
                "message length {} exceeds {MAX_MESSAGE}",
                header.message_len
            )));
        }
        Ok((header, &datagram[header.encoded_len()..]))
    }
}

/// Writes the MAC of `datagram` (a whole encoded datagram with [`FLAG_MAC`] set and a zero
/// MAC slot) into its slot, with `key`.
pub fn seal(datagram: &mut [u8], key: &ClusterKey) {
    let mac = key.mac(&datagram[..MAC_OFFSET], &datagram[MAC_OFFSET + MAC_LEN..]);
    datagram[MAC_OFFSET..MAC_OFFSET + MAC_LEN].copy_from_slice(&mac);
}

/// Whether the MAC in `datagram`'s slot is the one `key` gives for the rest of its bytes.
/// False for anything shorter than a header.
pub fn verify(datagram: &[u8], key: &ClusterKey) -> bool {
    if datagram.len() < HEADER_LEN {
        return false;
    }
    let carried: &[u8; MAC_LEN] = datagram[MAC_OFFSET..MAC_OFFSET + MAC_LEN]
        .try_into()
        .expect("slice of MAC_LEN bytes");
    let expected = key.mac(&datagram[..MAC_OFFSET], &datagram[MAC_OFFSET + MAC_LEN..]);
    macs_equal(carried, &expected)
}

/// The payload of a datagram decoded as `header` without its padding, if it is flagged
/// [`FLAG_PADDED`]: only a one-fragment request may be padded, and only with zeros after its
/// whole message. `None` if a padded datagram breaks those rules.
pub fn strip_padding<'a>(header: &Header, payload: &'a [u8]) -> Option<&'a [u8]> {
    if header.flags & FLAG_PADDED == 0 {
        return Some(payload);
    }
    let len = header.message_len as usize;
    let fits = header.kind == Kind::Request && header.frag_count == 1 && payload.len() >= len;
    (fits && payload[len..].iter().all(|&b| b == 0)).then(|| &payload[..len])
}

/// Builds a whole datagram: `header` followed by `payload`.
pub fn encode_datagram(header: &Header, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(header.encoded_len() + payload.len());
    header.encode_into(&mut out);
    out.extend_from_slice(payload);
    out
}

/// Builds a bundle of `datagrams` (each a whole datagram, at most 65 535 bytes). Returns
/// the bundle's bytes.
pub fn bundle<'a>(datagrams: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&BUNDLE_MAGIC);
    out.push(VERSION);
    for datagram in datagrams {
        let len = u16::try_from(datagram.len()).expect("a datagram fits in 64 KiB");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(datagram);
    }
    out
}

/// The bytes a datagram takes inside a bundle: its length prefix and itself.
pub fn bundled_len(datagram_len: usize) -> usize {
    BUNDLE_LENGTH_LEN + datagram_len
}

/// A received datagram seen as what it carries: one datagram, or a bundle of them.
#[derive(Clone, Copy, Debug)]
pub struct Bundle<'a> {
    /// The datagram as received.
    bytes: &'a [u8],
}

impl<'a> Bundle<'a> {
    /// Wraps a received datagram.
    pub fn new(bytes: &'a [u8]) -> Bundle<'a> {
        Bundle { bytes }
    }

    /// Whether the datagram is a bundle (starts with [`BUNDLE_MAGIC`]).
    pub fn is_bundle(&self) -> bool {
        self.bytes.starts_with(&BUNDLE_MAGIC)
    }

    /// The datagrams it carries, in order: itself if it is not a bundle. A bundle that is
    /// cut short, names another version or holds an empty part yields the parts before the
    /// damage and then one `Err` (and nothing after it).
    pub fn parts(self) -> impl Iterator<Item = Result<&'a [u8], DecodeError>> {
        let single = (!self.is_bundle()).then_some(Ok(self.bytes));
        let mut rest = if self.is_bundle() {
            match self.bytes.get(BUNDLE_MAGIC.len()) {
                Some(&VERSION) => Ok(&self.bytes[BUNDLE_HEADER_LEN..]),
                Some(version) => Err(DecodeError::Malformed(format!(
                    "bundle of unsupported protocol version {version}"
                ))),
                None => Err(DecodeError::Truncated {
                    needed: BUNDLE_HEADER_LEN,
                    got: self.bytes.len(),
                }),
            }
        } else {
            Ok(&[][..])
        };
        let parts = std::iter::from_fn(move || {
            let bytes = match &mut rest {
                Ok([]) => return None,
                Ok(bytes) => bytes,
                Err(_) => {
                    let error = std::mem::replace(&mut rest, Ok(&[][..]));
                    return error.err().map(Err);
                }
            };
            let part = match bytes {
                [hi, lo, tail @ ..] => {
                    let len = usize::from(u16::from_be_bytes([*hi, *lo]));
                    if len == 0 {
                        Err(DecodeError::Malformed("empty datagram in a bundle".into()))
                    } else if tail.len() < len {
                        Err(DecodeError::Truncated {
                            needed: len,
                            got: tail.len(),
                        })
                    } else {
                        let (part, after) = tail.split_at(len);
                        *bytes = after;
                        return Some(Ok(part));
                    }
                }
                _ => Err(DecodeError::Truncated {
                    needed: BUNDLE_LENGTH_LEN,
                    got: bytes.len(),
                }),
            };
            rest = Ok(&[][..]);
            Some(part)
        });
        single.into_iter().chain(parts)
    }
}

/// The byte range of fragment `index` in a message of `message_len` bytes cut into `count`
/// fragments. Every fragment but the last is `ceil(message_len / count)` bytes long, so the
/// receiver can place any fragment without knowing the sender's datagram size.
pub fn fragment_range(message_len: usize, count: u32, index: u32) -> std::ops::Range<usize> {
    let count = count.max(1) as usize;
    let size = message_len.div_ceil(count);
    let start = (index as usize * size).min(message_len);
    let end = (start + size).min(message_len);
    start..end
}

/// The number of fragments a message of `message_len` bytes needs when each fragment may
/// carry at most `max_payload` bytes (at least one, even for an empty message).
pub fn fragment_count(message_len: usize, max_payload: usize) -> u32 {
    message_len.div_ceil(max_payload.max(1)).max(1) as u32
}

/// The payload of an `Ack` datagram: which fragments of a message the receiver holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AckBody {
    /// The whole message was received and handed to the application.
    pub complete: bool,
    /// The receiver has no record of the request (it must be sent again from scratch).
    pub unknown: bool,
    /// Received fragment ranges `[start, end)`, ascending and disjoint.
    pub ranges: Vec<(u32, u32)>,
}

/// Bit in the ack flags byte: message complete.
const ACK_COMPLETE: u8 = 0x01;
/// Bit in the ack flags byte: request unknown.
const ACK_UNKNOWN: u8 = 0x02;
/// The most ranges one ack may carry (keeps an ack well inside one datagram).
pub const MAX_ACK_RANGES: usize = 128;

impl AckBody {
    /// Encodes the ack payload: flags byte, range count (u16), then (start, end) u32 pairs.
    pub fn encode(&self) -> Vec<u8> {
        let ranges = &self.ranges[..self.ranges.len().min(MAX_ACK_RANGES)];
        let mut out = Vec::with_capacity(3 + 8 * ranges.len());
        let mut flags = 0;
        if self.complete {
            flags |= ACK_COMPLETE;
        }
        if self.unknown {
            flags |= ACK_UNKNOWN;
        }
        out.push(flags);
        out.extend_from_slice(&(ranges.len() as u16).to_be_bytes());
        for &(start, end) in ranges {
            out.extend_from_slice(&start.to_be_bytes());
            out.extend_from_slice(&end.to_be_bytes());
        }
        out
    }

    /// Bytes [`AckBody::encode`] produces for this ack.
    pub fn encoded_len(&self) -> usize {
        3 + 8 * self.ranges.len().min(MAX_ACK_RANGES)
    }

    /// Decodes an ack payload, checking that ranges are non-empty, ascending and disjoint.
    pub fn decode(payload: &[u8]) -> Result<AckBody, DecodeError> {
        let mut r = Reader {
            bytes: payload,
            pos: 0,
        };
        let flags = r.u8()?;
        if flags & !(ACK_COMPLETE | ACK_UNKNOWN) != 0 {
            return Err(DecodeError::Malformed(format!(
                "unknown ack flags {flags:#x}"
            )));
        }
        let n = r.u16()? as usize;
        if n > MAX_ACK_RANGES {
            return Err(DecodeError::Malformed(format!("{n} ack ranges")));
        }
        let mut ranges = Vec::with_capacity(n);
        let mut previous_end = 0;
        for _ in 0..n {
            let (start, end) = (r.u32()?, r.u32()?);
            if start >= end || start < previous_end {
                return Err(DecodeError::Malformed(format!(
                    "bad ack range {start}..{end}"
                )));
            }
            previous_end = end;
            ranges.push((start, end));
        }
        if r.pos != payload.len() {
            return Err(DecodeError::Malformed("trailing bytes after ack".into()));
        }
        Ok(AckBody {
            complete: flags & ACK_COMPLETE != 0,
            unknown: flags & ACK_UNKNOWN != 0,
            ranges,
        })
    }
}

/// The bincode configuration of every message body: variable-length integers, little
/// endian, and a hard limit so a hostile length prefix cannot make us allocate much.
fn body_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit::<MAX_MESSAGE>()
}

/// Encodes a message body with the project's one bincode configuration.
pub fn encode_body<T: Serialize>(value: &T) -> Result<Vec<u8>, EncodeError> {
    let bytes = bincode::serde::encode_to_vec(value, body_config()).map_err(|e| match e {
        bincode::error::EncodeError::UnexpectedEnd => EncodeError::TooLarge {
            size: MAX_MESSAGE + 1,
            limit: MAX_MESSAGE,
        },
        other => EncodeError::Unencodable(other.to_string()),
    })?;
    if bytes.len() > MAX_MESSAGE {
        return Err(EncodeError::TooLarge {
            size: bytes.len(),
            limit: MAX_MESSAGE,
        });
    }
    Ok(bytes)
}

/// Decodes a whole message body; trailing bytes are malformed, a short input is truncated.
pub fn decode_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    match bincode::serde::decode_from_slice::<T, _>(bytes, body_config()) {
        Ok((value, used)) if used == bytes.len() => Ok(value),
        Ok((_, used)) => Err(DecodeError::Malformed(format!(
            "{} trailing bytes after the body",
            bytes.len() - used
        ))),
        Err(bincode::error::DecodeError::UnexpectedEnd { additional }) => {
            Err(DecodeError::Truncated {
                needed: bytes.len() + additional,
                got: bytes.len(),
            })
        }
        Err(other) => Err(DecodeError::Malformed(other.to_string())),
    }
}

/// Encodes a Raft message of the view-leader group with the `raft` crate's own codec
/// (protobuf), to travel as the body of a `Request::Raft`.
pub fn encode_raft(message: &raft::eraftpb::Message) -> Result<Vec<u8>, EncodeError> {
    use protobuf::Message as _;
    let bytes = message
        .write_to_bytes()
        .map_err(|e| EncodeError::Unencodable(e.to_string()))?;
    if bytes.len() > MAX_MESSAGE {
        return Err(EncodeError::TooLarge {
            size: bytes.len(),
            limit: MAX_MESSAGE,
        });
    }
    Ok(bytes)
}

/// Decodes a Raft message carried by a `Request::Raft`; anything protobuf refuses is
/// malformed.
pub fn decode_raft(bytes: &[u8]) -> Result<raft::eraftpb::Message, DecodeError> {
    use protobuf::Message as _;
    raft::eraftpb::Message::parse_from_bytes(bytes)
        .map_err(|e| DecodeError::Malformed(format!("raft message: {e}")))
}

/// A cursor over a byte slice that turns running out of bytes into `Truncated`.
struct Reader<'a> {
    /// The bytes being read.
    bytes: &'a [u8],
    /// The next unread position.
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Takes the next `n` bytes.
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(DecodeError::Truncated {
                needed: self.pos + n,
                got: self.bytes.len(),
            })?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    /// Reads one byte.
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    /// Reads a big-endian u16.
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// Reads a big-endian u32.
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Reads a big-endian u64.
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut word = [0u8; 8];
        word.copy_from_slice(b);
        Ok(u64::from_be_bytes(word))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Builds a header with every field set to a distinct non-default value.
    fn sample_header(kind: Kind) -> Header {
        Header {
            kind,
            flags: FLAG_ACK_RESPONSE,
            incarnation: 0x0102_0304_0506_0708,
            request_id: 99,
            transmission: 7,
            echo: 5,
            frag_index: 2,
            frag_count: 3,
            message_len: 4000,
            mac: [0; MAC_LEN],
            stamp: 0,
        }
    }

    /// A header of each kind (request, response, ack, probe) decodes back equal, and the payload
    /// after its 60 bytes comes back intact.
    #[test]
    fn header_round_trips_for_every_kind() {
        for kind in [
            Kind::Request,
            Kind::Response,
            Kind::Ack,
            Kind::Probe,
            Kind::Retry,
        ] {
            let header = sample_header(kind);
            let bytes = encode_datagram(&header, b"payload");
            assert_eq!(bytes.len(), HEADER_LEN + 7);
            let (decoded, payload) = Header::decode(&bytes).unwrap();
            assert_eq!(decoded, header);
            assert_eq!(payload, b"payload");
        }
    }

    /// With [`FLAG_MAC`] the stamp follows the fixed header, the payload comes after it, and
    /// a sealed datagram verifies with its key only, and only while every byte is intact.
    #[test]
    fn a_sealed_datagram_carries_its_stamp_and_verifies_only_intact() {
        let key = ClusterKey::from_secret(b"a cluster key for the codec test").unwrap();
        let other = ClusterKey::from_secret(b"another cluster key, not the one").unwrap();
        let mut header = sample_header(Kind::Request);
        header.flags |= FLAG_MAC;
        header.stamp = 0x1122_3344_5566_7788;
        let mut bytes = encode_datagram(&header, b"payload");
        assert_eq!(bytes.len(), MAX_HEADER_LEN + 7);
        assert_eq!(&bytes[60..68], &header.stamp.to_be_bytes());
        assert!(!verify(&bytes, &key), "not sealed yet");
        seal(&mut bytes, &key);
        assert!(verify(&bytes, &key));
        assert!(!verify(&bytes, &other));
        let (decoded, payload) = Header::decode(&bytes).unwrap();
        assert_eq!(decoded.stamp, header.stamp);
        assert_eq!(payload, b"payload");
        for i in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[i] ^= 0x20;
            assert!(!verify(&flipped, &key), "byte {i} flipped still verifies");
        }
        assert!(!verify(&bytes[..bytes.len() - 1], &key), "truncated");
        assert!(!verify(&bytes[..20], &key), "shorter than a header");
        let cut = &bytes[..HEADER_LEN + 3];
        assert!(
            matches!(Header::decode(cut), Err(DecodeError::Truncated { .. })),
            "a MAC'd header without its whole stamp is truncated"
        );
    }

    /// README: the 60-byte big-endian header of protocol version 1 is frozen; pins each field's
    /// offset (magic `TRIR`, version, kind, flags, ids, fragment fields, length, MAC slot).
    #[test]
    fn header_layout_is_frozen() {
        let bytes = encode_datagram(&sample_header(Kind::Ack), b"");
        assert_eq!(&bytes[0..4], b"TRIR");
        assert_eq!(bytes[4], 1, "version");
        assert_eq!(bytes[5], 3, "kind");
        assert_eq!(&bytes[6..8], &[0, 2], "flags");
        assert_eq!(&bytes[8..16], &[1, 2, 3, 4, 5, 6, 7, 8], "incarnation");
        assert_eq!(&bytes[16..24], &99u64.to_be_bytes(), "request id");
        assert_eq!(&bytes[24..28], &7u32.to_be_bytes(), "transmission");
        assert_eq!(&bytes[28..32], &5u32.to_be_bytes(), "echo");
        assert_eq!(&bytes[32..36], &2u32.to_be_bytes(), "fragment index");
        assert_eq!(&bytes[36..40], &3u32.to_be_bytes(), "fragment count");
        assert_eq!(&bytes[40..44], &4000u32.to_be_bytes(), "message length");
        assert_eq!(&bytes[44..60], &[0; 16], "mac");
    }

    /// A bundle splits back into its datagrams, in order; a lone datagram is its own only
    /// part; a damaged bundle yields the parts before the damage and then one error.
    #[test]
    fn a_bundle_splits_into_its_datagrams_and_damage_stops_the_split() {
        let one = encode_datagram(&Header::new(Kind::Request, 1, 2, 0), b"first");
        let two = encode_datagram(&Header::new(Kind::Response, 3, 4, 0), b"second");
        let both = bundle([one.as_slice(), two.as_slice()]);
        assert_eq!(
            both.len(),
            BUNDLE_HEADER_LEN + bundled_len(one.len()) + bundled_len(two.len())
        );
        let parts: Vec<_> = Bundle::new(&both).parts().collect();
        assert_eq!(parts, vec![Ok(&one[..]), Ok(&two[..])]);
        assert_eq!(
            Bundle::new(&one).parts().collect::<Vec<_>>(),
            vec![Ok(&one[..])]
        );
        assert!(!Bundle::new(&one).is_bundle());

        // Cut inside the second datagram: the first, then Truncated.
        let cut = &both[..both.len() - 3];
        let parts: Vec<_> = Bundle::new(cut).parts().collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], Ok(&one[..]));
        assert!(matches!(parts[1], Err(DecodeError::Truncated { .. })));

        // Another version, a zero length, and a lone byte of length: one error each.
        let mut other = both.clone();
        other[4] = VERSION + 1;
        let zero = bundle(std::iter::empty())
            .into_iter()
            .chain([0, 0])
            .collect::<Vec<_>>();
        let stub = bundle(std::iter::empty())
            .into_iter()
            .chain([7])
            .collect::<Vec<_>>();
        for damaged in [other, zero, stub, BUNDLE_MAGIC.to_vec()] {
            let parts: Vec<_> = Bundle::new(&damaged).parts().collect();
            assert_eq!(parts.len(), 1, "{damaged:?}");
            assert!(parts[0].is_err(), "{damaged:?}");
        }
        // An empty bundle carries nothing.
        assert_eq!(Bundle::new(&bundle(std::iter::empty())).parts().count(), 0);
    }

    /// Decode errors tell truncated input (under 60 bytes) from malformed input: bad magic,
    /// version or kind, or a fragment index not below the count.
    #[test]
    fn short_input_is_truncated_and_wrong_input_is_malformed() {
        let bytes = encode_datagram(&sample_header(Kind::Request), b"");
        assert!(matches!(
            Header::decode(&bytes[..30]),
            Err(DecodeError::Truncated { .. })
        ));
        assert!(matches!(
            Header::decode(b"GET / HTTP/1.1"),
            Err(DecodeError::Malformed(_))
        ));
        let mut bad_version = bytes.clone();
        bad_version[4] = 9;
        assert!(matches!(
            Header::decode(&bad_version),
            Err(DecodeError::Malformed(_))
        ));
        let mut bad_kind = bytes.clone();
        bad_kind[5] = 0;
        assert!(matches!(
            Header::decode(&bad_kind),
            Err(DecodeError::Malformed(_))
        ));
        let mut bad_fragment = bytes;
        bad_fragment[32..36].copy_from_slice(&3u32.to_be_bytes());
        assert!(matches!(
            Header::decode(&bad_fragment),
            Err(DecodeError::Malformed(_))
        ));
    }

    /// A selective ack round-trips; overlapping ranges are malformed and a cut body truncated.
    #[test]
    fn ack_body_round_trips_and_rejects_bad_ranges() {
        let ack = AckBody {
            complete: true,
            unknown: false,
            ranges: vec![(0, 3), (5, 9)],
        };
        assert_eq!(AckBody::decode(&ack.encode()).unwrap(), ack);
        let overlapping = AckBody {
            complete: false,
            unknown: false,
            ranges: vec![(0, 5), (3, 9)],
        };
        assert!(matches!(
            AckBody::decode(&overlapping.encode()),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            AckBody::decode(&[0, 0, 1, 0]),
            Err(DecodeError::Truncated { .. })
        ));
    }

    /// For sizes from 0 bytes to 1 MiB, fragments of at most 1340 bytes cover the message in
    /// order, with no gap and no overlap.
    #[test]
    fn fragments_tile_the_message_exactly() {
        for len in [0usize, 1, 1339, 1340, 1341, 1 << 20] {
            let count = fragment_count(len, 1340);
            let mut next = 0;
            for index in 0..count {
                let range = fragment_range(len, count, index);
                assert_eq!(range.start, next);
                assert!(range.len() <= 1340);
                next = range.end;
            }
            assert_eq!(next, len, "message of {len} bytes");
        }
    }

    /// A length prefix claiming 4 GiB is refused without allocating; a cut body decodes as
    /// truncated and trailing bytes as malformed.
    #[test]
    fn body_limit_is_enforced_on_decode() {
        // A length prefix claiming a 4 GiB string must not allocate; it is refused.
        let hostile = [0xfc, 0xff, 0xff, 0xff, 0xff, 0x00];
        assert!(decode_body::<String>(&hostile).is_err());
        let bytes = encode_body(&"hello".to_string()).unwrap();
        assert_eq!(decode_body::<String>(&bytes).unwrap(), "hello");
        assert!(matches!(
            decode_body::<String>(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Truncated { .. })
        ));
        let mut trailing = bytes;
        trailing.push(0);
        assert!(matches!(
            decode_body::<String>(&trailing),
            Err(DecodeError::Malformed(_))
        ));
    }

    proptest! {
        /// README: decoding never panics; the header and ack decoders survive arbitrary bytes.
        #[test]
        fn arbitrary_bytes_never_panic_the_header_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Header::decode(&bytes);
            let _ = AckBody::decode(&bytes);
        }

        /// Changing any one header byte either fails to decode or yields a header whose fragment
        /// index is below its count, with the payload untouched.
        #[test]
        fn any_mutation_of_a_valid_header_decodes_or_errors(index in 0usize..HEADER_LEN, value in any::<u8>()) {
            let mut bytes = encode_datagram(&sample_header(Kind::Request), b"xyz");
            bytes[index] = value;
            if let Ok((header, payload)) = Header::decode(&bytes) {
                prop_assert!(header.frag_index < header.frag_count);
                prop_assert_eq!(payload, b"xyz");
            }
        }
    }
}
