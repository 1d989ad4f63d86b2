//! Round-trip time estimation and the retransmission timeout, RFC 6298 style.

use std::time::Duration;

/// Smoothed RTT state for one peer.
#[derive(Clone, Debug)]
pub struct RttEstimator {
    /// Smoothed round-trip time; `None` until the first sample.
    srtt: Option<Duration>,
    /// Round-trip time variation.
    rttvar: Duration,
    /// The RTO used before any sample arrives.
    initial: Duration,
    /// The RTO never goes below this.
    min: Duration,
    /// The RTO never goes above this (backoff included).
    max: Duration,
}

/// Clock granularity term of RFC 6298 (`G`): the RTO exceeds SRTT by at least this much.
const GRANULARITY: Duration = Duration::from_millis(1);

impl RttEstimator {
    /// Creates an estimator with no samples, bounded by `min` and `max`.
    pub fn new(initial: Duration, min: Duration, max: Duration) -> RttEstimator {
        RttEstimator {
            srtt: None,
            rttvar: Duration::ZERO,
            initial,
            min,
            max,
        }
    }

    /// Folds one unambiguous round-trip sample in (RFC 6298 section 2.2 and 2.3).
    pub fn sample(&mut self, rtt: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let delta = srtt.abs_diff(rtt);
                self.rttvar = self.rttvar * 3 / 4 + delta / 4;
                self.srtt = Some(srtt * 7 / 8 + rtt / 8);
            }
        }
    }

    /// The smoothed RTT, if any sample has arrived.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// The retransmission timeout after `backoff` consecutive expiries (doubling each time),
    /// clamped to the configured floor and ceiling.
    pub fn rto(&self, backoff: u32) -> Duration {
        self.rto_with_floor(backoff, self.min)
    }

    /// [`RttEstimator::rto`] with another floor (at most the ceiling).
    pub fn rto_with_floor(&self, backoff: u32, floor: Duration) -> Duration {
        let base = match self.srtt {
            None => self.initial,
            Some(srtt) => srtt + (self.rttvar * 4).max(GRANULARITY),
        };
        let backed_off = base.saturating_mul(1u32 << backoff.min(16));
        backed_off.clamp(floor.min(self.max), self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An estimator with a 100 ms initial RTO, 10 ms floor and 2 s ceiling.
    fn estimator() -> RttEstimator {
        RttEstimator::new(
            Duration::from_millis(100),
            Duration::from_millis(10),
            Duration::from_secs(2),
        )
    }

    /// RFC 6298: the RTO starts at the initial value, falls toward small samples (staying above
    /// the floor) and rises above large ones.
    #[test]
    fn rto_starts_at_initial_and_adapts_to_samples() {
        let mut rtt = estimator();
        assert_eq!(rtt.rto(0), Duration::from_millis(100));
        for _ in 0..50 {
            rtt.sample(Duration::from_millis(4));
        }
        let rto = rtt.rto(0);
        assert!(
            rto >= Duration::from_millis(10) && rto < Duration::from_millis(20),
            "{rto:?}"
        );
        for _ in 0..50 {
            rtt.sample(Duration::from_millis(200));
        }
        assert!(rtt.rto(0) >= Duration::from_millis(200), "{:?}", rtt.rto(0));
    }

    /// Each backoff step doubles the RTO (100, 200, 400 ms) until the 2 s ceiling caps it.
    #[test]
    fn backoff_doubles_and_is_capped() {
        let rtt = estimator();
        assert_eq!(rtt.rto(1), Duration::from_millis(200));
        assert_eq!(rtt.rto(2), Duration::from_millis(400));
        assert_eq!(rtt.rto(10), Duration::from_secs(2));
        assert_eq!(rtt.rto(100), Duration::from_secs(2));
    }
}
