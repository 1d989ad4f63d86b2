//! Rate limiting of log lines about hostile or broken input.
//!
//! A flood of bad datagrams must be counted, and may be logged, but must not turn into a
//! flood of log lines: [`LogLimiter`] lets one line through per interval and reports how
//! many it held back since the last one. Sans-IO: the caller passes `now`.

use std::time::{Duration, Instant};

/// Lets one log line through per `interval`, counting the ones it holds back.
#[derive(Clone, Debug)]
pub struct LogLimiter {
    /// The shortest gap between two lines let through.
    interval: Duration,
    /// When the last line was let through.
    last: Option<Instant>,
    /// Lines held back since then.
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter that lets one line through per `interval`.
    pub const fn new(interval: Duration) -> LogLimiter {
        LogLimiter {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// Asks to log one line at `now`. Returns `Some(n)` when the line may be written, `n`
    /// being how many lines were held back since the previous one (to be mentioned in it);
    /// `None` when it must be held back.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.interval)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

impl Default for LogLimiter {
    /// One line per second.
    fn default() -> LogLimiter {
        LogLimiter::new(Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_the_held_back_count() {
        let t0 = Instant::now();
        let mut limiter = LogLimiter::new(Duration::from_secs(1));
        assert_eq!(limiter.allow(t0), Some(0));
        assert_eq!(limiter.allow(t0 + Duration::from_millis(10)), None);
        assert_eq!(limiter.allow(t0 + Duration::from_millis(999)), None);
        assert_eq!(limiter.allow(t0 + Duration::from_secs(1)), Some(2));
        assert_eq!(limiter.allow(t0 + Duration::from_millis(1500)), None);
        assert_eq!(limiter.allow(t0 + Duration::from_secs(3)), Some(1));
    }
}
