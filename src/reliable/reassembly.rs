//! Reassembly of one fragmented message on the receiving side.

use std::time::Instant;

use crate::wire::codec::{self, AckBody, Header, MAX_ACK_RANGES};

/// What became of a fragment handed to [`Reassembly::insert`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insert {
    /// A fragment not seen before, stored.
    New,
    /// A fragment already held (a retransmission or a duplicate).
    Duplicate,
    /// The fragment does not fit the message (wrong count, length or size).
    Invalid,
}

/// The fragments received so far of one message.
#[derive(Debug)]
pub struct Reassembly {
    /// Number of fragments of the message.
    count: u32,
    /// The message buffer, allocated at its full length on the first fragment.
    buffer: Vec<u8>,
    /// Which fragments have arrived.
    received: Vec<bool>,
    /// How many fragments have arrived.
    received_count: u32,
    /// Every fragment below this one has arrived: an ack reports that prefix as one range
    /// and scans only past it.
    contiguous: u32,
    /// New fragments since the last acknowledgement was sent.
    unacked: u32,
    /// The highest fragment index received so far (to spot gaps).
    highest: Option<u32>,
    /// When the last fragment arrived (for abandoning stalled messages).
    pub last_activity: Instant,
}

/// The least a partly received message is charged against the reassembly bounds, whatever
/// its size: with 64 MiB in all, at most 16 384 can be open at once, so a flood of small
/// unfinished requests cannot fill the response cache's entries (which are only evicted once
/// answered) and shut every new request out. (Found in review: 100 000 first fragments of
/// 257-byte requests did that with 26 MB of reassembly memory.)
pub const MIN_FOOTPRINT: usize = 4096;

impl Reassembly {
    /// Starts reassembling the message described by `header` (count and length).
    pub fn new(header: &Header, now: Instant) -> Reassembly {
        Reassembly {
            count: header.frag_count,
            buffer: vec![0; header.message_len as usize],
            received: vec![false; header.frag_count as usize],
            received_count: 0,
            contiguous: 0,
            unacked: 0,
            highest: None,
            last_activity: now,
        }
    }

    /// The memory a reassembly of the message described by `header` holds, in bytes: what
    /// the memory bounds are charged with, before it is allocated.
    pub fn footprint_of(header: &Header) -> usize {
        (header.message_len as usize + header.frag_count as usize).max(MIN_FOOTPRINT)
    }

    /// The memory this reassembly holds, in bytes (the same figure as [`Reassembly::footprint_of`]).
    pub fn footprint(&self) -> usize {
        (self.buffer.len() + self.received.len()).max(MIN_FOOTPRINT)
    }

    /// Stores one fragment, checking it against the message's count and length.
    /// Returns whether it was new; also says whether an ack should go out now.
    pub fn insert(&mut self, header: &Header, payload: &[u8], now: Instant) -> (Insert, bool) {
        if header.frag_count != self.count || header.message_len as usize != self.buffer.len() {
            return (Insert::Invalid, false);
        }
        let range = codec::fragment_range(self.buffer.len(), self.count, header.frag_index);
        if range.len() != payload.len() {
            return (Insert::Invalid, false);
        }
        self.last_activity = now;
        let index = header.frag_index as usize;
        if self.received[index] {
            // A duplicate means the sender has not seen our acks: answer at once.
            return (Insert::Duplicate, true);
        }
        self.buffer[range].copy_from_slice(payload);
        self.received[index] = true;
        self.received_count += 1;
        while self
            .received
            .get(self.contiguous as usize)
            .is_some_and(|&got| got)
        {
            self.contiguous += 1;
        }
        self.unacked += 1;
        let in_order = self.highest.is_none_or(|h| header.frag_index == h + 1);
        let gap_filled = self.highest.is_some_and(|h| header.frag_index < h);
        self.highest = Some(
            self.highest
                .map_or(header.frag_index, |h| h.max(header.frag_index)),
        );
        // Ack every second fragment, and at once on any reordering or completion, so the
        // sender's window keeps moving and losses are reported within one round trip.
        let ack_now = self.is_complete() || self.unacked >= 2 || !in_order || gap_filled;
        (Insert::New, ack_now)
    }

    /// True when every fragment has arrived.
    pub fn is_complete(&self) -> bool {
        self.received_count == self.count
    }

    /// Builds the selective acknowledgement of what has arrived and resets the ack counter.
    pub fn ack(&mut self) -> AckBody {
        self.unacked = 0;
        let mut ranges = Vec::new();
        if self.contiguous > 0 {
            ranges.push((0, self.contiguous));
        }
        // Past the contiguous prefix, only up to the highest fragment received can be held.
        let end = self.highest.map_or(0, |h| h + 1).max(self.contiguous);
        let mut start = None;
        for index in self.contiguous..end {
            if ranges.len() == MAX_ACK_RANGES {
                start = None;
                break;
            }
            match (self.received[index as usize], start) {
                (true, None) => start = Some(index),
                (false, Some(s)) => {
                    ranges.push((s, index));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start
            && ranges.len() < MAX_ACK_RANGES
        {
            ranges.push((s, end));
        }
        AckBody {
            complete: self.is_complete(),
            unknown: false,
            ranges,
        }
    }

    /// Takes the reassembled message out (call only once complete).
    pub fn into_message(self) -> Vec<u8> {
        self.buffer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::codec::Kind;

    /// A header for fragment `index` of a `count`-fragment, `len`-byte message.
    fn header(index: u32, count: u32, len: u32) -> Header {
        let mut h = Header::new(Kind::Request, 1, 1, index + 1);
        h.frag_index = index;
        h.frag_count = count;
        h.message_len = len;
        h
    }

    /// Out-of-order and duplicate fragments reassemble into the exact message; the ack lists the
    /// ranges received and reports completion.
    #[test]
    fn reassembles_out_of_order_and_reports_ranges() {
        let message: Vec<u8> = (0..25u8).collect();
        let now = Instant::now();
        let mut r = Reassembly::new(&header(0, 3, 25), now);
        let part = |i: u32| &message[codec::fragment_range(25, 3, i)];
        assert_eq!(r.insert(&header(2, 3, 25), part(2), now).0, Insert::New);
        assert_eq!(r.ack().ranges, vec![(2, 3)]);
        assert_eq!(
            r.insert(&header(2, 3, 25), part(2), now),
            (Insert::Duplicate, true)
        );
        assert_eq!(r.insert(&header(0, 3, 25), part(0), now).0, Insert::New);
        assert_eq!(r.ack().ranges, vec![(0, 1), (2, 3)]);
        assert!(!r.is_complete());
        assert_eq!(
            r.insert(&header(1, 3, 25), part(1), now),
            (Insert::New, true)
        );
        assert!(r.is_complete());
        assert!(r.ack().complete);
        assert_eq!(r.into_message(), message);
    }

    /// A fragment whose count, message length or size disagrees with the message is invalid; a
    /// fitting one is accepted.
    #[test]
    fn rejects_fragments_that_do_not_fit() {
        let now = Instant::now();
        let mut r = Reassembly::new(&header(0, 3, 25), now);
        assert_eq!(r.insert(&header(0, 4, 25), &[0; 7], now).0, Insert::Invalid);
        assert_eq!(r.insert(&header(0, 3, 26), &[0; 9], now).0, Insert::Invalid);
        assert_eq!(r.insert(&header(0, 3, 25), &[0; 8], now).0, Insert::Invalid);
        assert_eq!(r.insert(&header(0, 3, 25), &[0; 9], now).0, Insert::New);
    }

    /// The ranges a scan of every fragment would report (the definition the incremental
    /// `ack` must match).
    fn naive_ranges(received: &[bool]) -> Vec<(u32, u32)> {
        let mut ranges: Vec<(u32, u32)> = Vec::new();
        for (index, &got) in received.iter().enumerate() {
            let index = index as u32;
            match ranges.last_mut() {
                Some(last) if got && last.1 == index => last.1 += 1,
                _ if got => ranges.push((index, index + 1)),
                _ => {}
            }
        }
        ranges.truncate(MAX_ACK_RANGES);
        ranges
    }

    proptest::proptest! {
        /// Whatever order fragments arrive in (duplicates included), every ack lists exactly
        /// the ranges received.
        #[test]
        fn acks_list_exactly_what_arrived(order in proptest::collection::vec(0u32..300, 1..600)) {
            let now = Instant::now();
            let (count, len) = (300u32, 300u32 * 10);
            let mut r = Reassembly::new(&header(0, count, len), now);
            let mut received = vec![false; count as usize];
            for index in order {
                let size = codec::fragment_range(len as usize, count, index).len();
                r.insert(&header(index, count, len), &vec![1; size], now);
                received[index as usize] = true;
                proptest::prop_assert_eq!(r.ack().ranges, naive_ranges(&received));
            }
        }
    }
}
