//! The sending side of one message: fragments, a window, selective acks, loss detection.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::wire::codec::{self, AckBody};

/// A fragment is declared lost once this many fragments sent after it were acknowledged
/// (the fast-retransmit threshold, as TCP's three duplicate acks).
const REORDER_THRESHOLD: u64 = 3;

/// Per-fragment sending state.
#[derive(Clone, Debug, Default)]
struct Fragment {
    /// The receiver has it.
    acked: bool,
    /// Sent and neither acked nor declared lost.
    in_flight: bool,
    /// Waiting in the resend queue.
    queued: bool,
    /// Position of its last send within this transfer's send order.
    last_seq: u64,
    /// When it was last sent.
    sent_at: Option<Instant>,
    /// How many times it was sent.
    sends: u32,
}

/// What an acknowledgement changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AckOutcome {
    /// Fragments newly known to be received.
    pub newly_acked: u32,
    /// Fragments newly declared lost (queued for resending).
    pub newly_lost: u32,
    /// A round-trip sample, when the ack echoes a transmission of this transfer.
    pub rtt_sample: Option<Duration>,
}

/// One message being sent: its body, cut into fragments on demand.
#[derive(Debug)]
pub struct Transfer {
    /// The whole message body.
    body: Vec<u8>,
    /// Number of fragments.
    count: u32,
    /// Sending state per fragment.
    fragments: Vec<Fragment>,
    /// Fragments acknowledged so far.
    acked: u32,
    /// Every fragment below this one is acknowledged: scans of what is in flight start here,
    /// so an ack costs what is in the window, not what the whole message holds.
    base: u32,
    /// The next fragment never sent yet.
    next_new: u32,
    /// Fragments in flight.
    in_flight: u32,
    /// Counter giving each send its position in this transfer's send order.
    send_seq: u64,
    /// Fragments declared lost, to send again before any new one.
    lost: VecDeque<u32>,
    /// Consecutive timeouts without progress (drives exponential backoff).
    pub backoff: u32,
    /// Recent sends as (transmission number, instant): transmission numbers are unique, so
    /// an answer echoing any of them gives an unambiguous RTT sample, even when the timeout
    /// fired before the first answer came back.
    history: VecDeque<(u32, Instant)>,
}

/// How many recent sends a transfer remembers for RTT sampling.
const HISTORY: usize = 256;

impl Transfer {
    /// Prepares `body` for sending in fragments of at most `max_payload` bytes.
    pub fn new(body: Vec<u8>, max_payload: usize) -> Transfer {
        let count = codec::fragment_count(body.len(), max_payload);
        Transfer {
            body,
            count,
            fragments: vec![Fragment::default(); count as usize],
            acked: 0,
            base: 0,
            next_new: 0,
            in_flight: 0,
            send_seq: 0,
            lost: VecDeque::new(),
            backoff: 0,
            history: VecDeque::new(),
        }
    }

    /// Number of fragments.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Length of the whole message in bytes.
    pub fn body_len(&self) -> usize {
        self.body.len()
    }

    /// The whole message body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The payload of fragment `index`.
    pub fn fragment(&self, index: u32) -> &[u8] {
        &self.body[codec::fragment_range(self.body.len(), self.count, index)]
    }

    /// True once the receiver holds every fragment.
    pub fn is_complete(&self) -> bool {
        self.acked == self.count
    }

    /// The next fragment to put on the wire, if the window of `window` fragments allows:
    /// lost fragments first, then new ones. The caller must then call [`Transfer::on_sent`].
    pub fn next_to_send(&mut self, window: u32) -> Option<u32> {
        while let Some(index) = self.lost.pop_front() {
            let fragment = &mut self.fragments[index as usize];
            fragment.queued = false;
            if !fragment.acked {
                return Some(index);
            }
        }
        if self.in_flight < window && self.next_new < self.count {
            let index = self.next_new;
            self.next_new += 1;
            return Some(index);
        }
        None
    }

    /// Records that fragment `index` went out at `now` as transmission `tx`.
    /// Returns true when this was a retransmission.
    pub fn on_sent(&mut self, index: u32, tx: u32, now: Instant) -> bool {
        self.send_seq += 1;
        let fragment = &mut self.fragments[index as usize];
        if !fragment.in_flight {
            fragment.in_flight = true;
            self.in_flight += 1;
        }
        fragment.last_seq = self.send_seq;
        fragment.sent_at = Some(now);
        fragment.sends += 1;
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back((tx, now));
        fragment.sends > 1
    }

    /// Applies a selective acknowledgement that echoes transmission `echo`.
    pub fn on_ack(&mut self, ack: &AckBody, echo: u32, now: Instant) -> AckOutcome {
        let mut outcome = AckOutcome::default();
        let mut highest_acked_seq = 0;
        outcome.rtt_sample = self
            .sent_at_of(echo)
            .map(|t| now.saturating_duration_since(t));
        // Nothing unsent can have been received: ranges past what was sent are ignored (a
        // forged or stale ack must not move `base` past `next_new`).
        for &(start, end) in &ack.ranges {
            for index in start.max(self.base)..end.min(self.next_new) {
                let fragment = &mut self.fragments[index as usize];
                if fragment.acked {
                    continue;
                }
                fragment.acked = true;
                highest_acked_seq = highest_acked_seq.max(fragment.last_seq);
                if fragment.in_flight {
                    fragment.in_flight = false;
                    self.in_flight -= 1;
                }
                self.acked += 1;
                outcome.newly_acked += 1;
            }
        }
        if ack.complete {
            outcome.newly_acked += self.mark_all_acked();
        }
        while self.base < self.next_new && self.fragments[self.base as usize].acked {
            self.base += 1;
        }
        if outcome.newly_acked > 0 {
            self.backoff = 0;
        }
        // Anything still in flight that was sent well before an acknowledged fragment is lost.
        if highest_acked_seq > REORDER_THRESHOLD {
            for index in self.unacked_sent() {
                let fragment = &mut self.fragments[index as usize];
                if fragment.in_flight && fragment.last_seq + REORDER_THRESHOLD <= highest_acked_seq
                {
                    fragment.in_flight = false;
                    self.in_flight -= 1;
                    if !fragment.queued {
                        fragment.queued = true;
                        self.lost.push_back(index);
                        outcome.newly_lost += 1;
                    }
                }
            }
        }
        outcome
    }

    /// Marks every fragment received (the receiver said the message is complete);
    /// returns how many were newly acknowledged.
    pub fn mark_all_acked(&mut self) -> u32 {
        let newly = self.count - self.acked;
        for fragment in &mut self.fragments {
            fragment.acked = true;
            fragment.in_flight = false;
        }
        self.acked = self.count;
        self.base = self.count;
        self.in_flight = 0;
        self.lost.clear();
        newly
    }

    /// The indexes of fragments sent and not yet known to be acknowledged all lie here:
    /// everything below `base` is acknowledged, nothing from `next_new` on was sent.
    fn unacked_sent(&self) -> std::ops::Range<u32> {
        self.base.min(self.next_new)..self.next_new
    }

    /// When the fragment last sent as transmission `tx` went out, if one was.
    pub fn sent_at_of(&self, tx: u32) -> Option<Instant> {
        if tx == 0 {
            return None;
        }
        self.history
            .iter()
            .rev()
            .find(|&&(sent, _)| sent == tx)
            .map(|&(_, at)| at)
    }

    /// Whether an answer echoing transmission `tx` shows that a resend was needless: the
    /// transfer was sent more than once and `tx` is one of its earlier sends, not the last.
    pub fn echo_shows_needless_resend(&self, tx: u32) -> bool {
        self.history.len() > 1
            && self.history.back().is_some_and(|&(last, _)| last != tx)
            && self.sent_at_of(tx).is_some()
    }

    /// When the oldest fragment in flight times out under retransmission timeout `rto`.
    pub fn deadline(&self, rto: Duration) -> Option<Instant> {
        let sent = self.unacked_sent();
        self.fragments[sent.start as usize..sent.end as usize]
            .iter()
            .filter(|f| f.in_flight)
            .filter_map(|f| f.sent_at)
            .min()
            .map(|oldest| oldest + rto)
    }

    /// The retransmission timer fired at `now`: every fragment in flight for `rto` or more is
    /// declared lost and queued for resending. Returns how many were queued.
    pub fn on_timeout(&mut self, now: Instant, rto: Duration) -> u32 {
        let mut queued = 0;
        for index in self.unacked_sent() {
            let fragment = &mut self.fragments[index as usize];
            let expired = fragment.sent_at.is_some_and(|t| t + rto <= now);
            if fragment.in_flight && expired {
                fragment.in_flight = false;
                self.in_flight -= 1;
                if !fragment.queued {
                    fragment.queued = true;
                    self.lost.push_back(index);
                    queued += 1;
                }
            }
        }
        if queued > 0 {
            self.backoff += 1;
        }
        queued
    }

    /// Forgets all sending progress so the whole message goes out again (the receiver lost
    /// its state, e.g. it restarted).
    pub fn restart(&mut self) {
        let body = std::mem::take(&mut self.body);
        let backoff = self.backoff;
        let max_payload = codec::fragment_range(body.len(), self.count, 0)
            .len()
            .max(1);
        *self = Transfer::new(body, max_payload);
        self.backoff = backoff;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends everything the window allows at `now`, numbering transmissions from `tx`.
    fn send_all(t: &mut Transfer, window: u32, tx: &mut u32, now: Instant) -> Vec<u32> {
        let mut sent = Vec::new();
        while let Some(index) = t.next_to_send(window) {
            *tx += 1;
            t.on_sent(index, *tx, now);
            sent.push(index);
        }
        sent
    }

    /// At most `window` fragments are in flight; an ack frees room for as many more and gives an
    /// RTT sample from the echoed transmission.
    #[test]
    fn window_limits_fragments_in_flight() {
        let now = Instant::now();
        let mut t = Transfer::new(vec![7; 1000], 100);
        assert_eq!(t.count(), 10);
        let mut tx = 0;
        assert_eq!(send_all(&mut t, 4, &mut tx, now), vec![0, 1, 2, 3]);
        let ack = AckBody {
            complete: false,
            unknown: false,
            ranges: vec![(0, 2)],
        };
        let outcome = t.on_ack(&ack, 2, now + Duration::from_millis(5));
        assert_eq!(outcome.newly_acked, 2);
        assert_eq!(outcome.rtt_sample, Some(Duration::from_millis(5)));
        assert_eq!(send_all(&mut t, 4, &mut tx, now), vec![4, 5]);
    }

    /// README: a fragment is resent once later fragments (three or more) are acknowledged; only
    /// that hole is resent, not fragments still in flight.
    #[test]
    fn later_acks_declare_a_hole_lost_and_only_it_is_resent() {
        let now = Instant::now();
        let mut t = Transfer::new(vec![1; 800], 100);
        let mut tx = 0;
        send_all(&mut t, 8, &mut tx, now);
        // Fragment 1 never arrived; 0 and 2..=5 did.
        let ack = AckBody {
            complete: false,
            unknown: false,
            ranges: vec![(0, 1), (2, 6)],
        };
        let outcome = t.on_ack(&ack, 0, now);
        assert_eq!(outcome.newly_lost, 1);
        assert_eq!(t.next_to_send(8), Some(1));
        assert!(
            t.on_sent(1, 100, now),
            "a resend counts as a retransmission"
        );
        assert_eq!(
            t.next_to_send(8),
            None,
            "6 and 7 are still in flight, not lost"
        );
    }

    /// README: on timeout only fragments that outlived the RTO are requeued, and the backoff grows.
    #[test]
    fn timeout_requeues_only_expired_fragments_and_backs_off() {
        let start = Instant::now();
        let mut t = Transfer::new(vec![1; 300], 100);
        let mut tx = 0;
        send_all(&mut t, 2, &mut tx, start);
        let later = start + Duration::from_millis(50);
        t.on_ack(
            &AckBody {
                complete: false,
                unknown: false,
                ranges: vec![(0, 1)],
            },
            0,
            later,
        );
        send_all(&mut t, 2, &mut tx, later);
        let rto = Duration::from_millis(100);
        assert_eq!(t.deadline(rto), Some(start + rto));
        assert_eq!(
            t.on_timeout(start + rto, rto),
            1,
            "only fragment 1 is old enough"
        );
        assert_eq!(t.backoff, 1);
        assert_eq!(t.next_to_send(2), Some(1));
    }

    /// An ack marked complete finishes the transfer and leaves no retransmission deadline.
    #[test]
    fn complete_ack_finishes_the_transfer() {
        let now = Instant::now();
        let mut t = Transfer::new(vec![1; 300], 100);
        let mut tx = 0;
        send_all(&mut t, 8, &mut tx, now);
        t.on_ack(
            &AckBody {
                complete: true,
                unknown: false,
                ranges: vec![],
            },
            0,
            now,
        );
        assert!(t.is_complete());
        assert_eq!(t.deadline(Duration::from_millis(10)), None);
    }

    /// Regression (review): an ack naming fragments never sent (forged, or stale after a
    /// restart) acknowledges nothing beyond what was sent and never panics the timer.
    #[test]
    fn an_ack_beyond_what_was_sent_is_ignored_past_the_sent_prefix() {
        let now = Instant::now();
        let mut t = Transfer::new(vec![1; 25_000], 100);
        assert_eq!(t.count(), 250);
        let mut tx = 0;
        assert_eq!(send_all(&mut t, 64, &mut tx, now).len(), 64);
        let forged = AckBody {
            complete: false,
            unknown: false,
            ranges: vec![(0, 250)],
        };
        let outcome = t.on_ack(&forged, 0, now);
        assert_eq!(outcome.newly_acked, 64, "only what was sent");
        assert!(t.deadline(Duration::from_millis(5)).is_none());
        assert!(!t.is_complete());
        // The rest still goes out and completes.
        let rest = send_all(&mut t, 64, &mut tx, now);
        assert_eq!(rest.first(), Some(&64));
    }

    proptest::proptest! {
        /// Arbitrary acks (ranges in any order, beyond the message, complete or not) keep the
        /// sending state consistent: nothing panics, in-flight counts match the fragments.
        #[test]
        fn arbitrary_acks_keep_the_state_consistent(
            acks in proptest::collection::vec(
                (proptest::collection::vec((0u32..300, 0u32..300), 0..6), proptest::bool::weighted(0.05)),
                1..30,
            )
        ) {
            let now = Instant::now();
            let mut t = Transfer::new(vec![1; 25_000], 100);
            let mut tx = 0;
            for (ranges, complete) in acks {
                send_all(&mut t, 64, &mut tx, now);
                let ack = AckBody { complete, unknown: false, ranges };
                t.on_ack(&ack, tx, now);
                let _ = t.deadline(Duration::from_millis(5));
                t.on_timeout(now + Duration::from_secs(1), Duration::from_millis(5));
                let flying = t.fragments.iter().filter(|f| f.in_flight).count() as u32;
                proptest::prop_assert_eq!(flying, t.in_flight);
                proptest::prop_assert!(t.base <= t.next_new || t.is_complete());
            }
        }
    }
}
