//! Layer 1, network faults: parsing of `--faults SPEC` (or `TRIREME_FAULTS`), a seeded,
//! sans-IO injector that decides the fate of each outgoing datagram, and a virtual-time
//! lossy network ([`network::Network`]) built on that injector, which every test that needs a
//! network in virtual time uses (the reliable layer's unit tests, the cluster simulator).
//! The driver ([`crate::runtime::net`]) applies the same injector on its real send path.
//!
//! May import: [`crate::util`].
//!
//! A spec is a comma-separated list of `name=value` parts:
//!
//! | name      | value                                 | effect                                 |
//! |-----------|---------------------------------------|----------------------------------------|
//! | `loss`    | probability in `[0, 1]`               | drop the datagram                      |
//! | `dup`     | probability in `[0, 1]`               | send a second copy                     |
//! | `reorder` | probability in `[0, 1]`               | hold a copy back so later ones pass it |
//! | `delay`   | duration (`500us`, `20ms`, `1.5s`, `20`) | fixed extra latency                 |
//! | `jitter`  | duration                              | uniform extra latency in `[0, jitter]` |
//! | `seed`    | `u64`                                 | makes the injector's choices replayable |
//!
//! A bare duration number means milliseconds. An empty (or all-whitespace) spec, or `none`,
//! means no faults. [`FaultInjector::schedule`] never touches a socket or the clock: the
//! driver passes `now` in and gets back the instants at which each copy must be sent.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::util::rng::Rng;

pub mod network;

/// The names a spec part may use, in the order [`FaultSpec`]'s `Display` prints them.
const KNOWN_NAMES: [&str; 6] = ["loss", "dup", "reorder", "delay", "jitter", "seed"];

/// The smallest hold a reordered copy is based on, so that reordering works without delay.
const MIN_REORDER_HOLD: Duration = Duration::from_millis(5);

/// The largest offset from `now` a copy is ever scheduled at; keeps `Instant` arithmetic far
/// from overflow even for absurd specs built by hand (365 days).
const MAX_OFFSET: Duration = Duration::from_secs(365 * 24 * 3600);

/// Nanoseconds per second, as the wide integer the duration parser works in.
const NANOS_PER_SEC: u128 = 1_000_000_000;

/// What faults to inject into a process's outgoing datagrams; the default injects none.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct FaultSpec {
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// Probability that a (not dropped) datagram is sent twice.
    pub dup: f64,
    /// Probability that each copy is held back so that datagrams sent after it overtake it.
    pub reorder: f64,
    /// Fixed latency added to every copy.
    pub delay: Duration,
    /// Upper bound of the uniform random latency added to every copy on top of `delay`.
    pub jitter: Duration,
    /// Seed of the injector's generator; `None` seeds it from the operating system.
    pub seed: Option<u64>,
}

/// A spec part that could not be parsed: the offending text and why it is wrong.
#[derive(Debug, Clone, PartialEq, Error)]
#[error("bad fault spec part `{part}`: {reason}")]
pub struct FaultSpecError {
    /// The offending part of the spec, trimmed of surrounding whitespace.
    pub part: String,
    /// A human-readable explanation of what is wrong with it.
    pub reason: String,
}

impl FaultSpecError {
    /// Builds an error for the spec text `part`, explained by `reason`.
    fn new(part: &str, reason: impl Into<String>) -> FaultSpecError {
        FaultSpecError {
            part: part.to_string(),
            reason: reason.into(),
        }
    }
}

impl FaultSpec {
    /// Returns true when the spec changes nothing: no loss, duplication, reordering, delay or
    /// jitter (the seed alone does not count).
    pub fn is_none(&self) -> bool {
        self.loss == 0.0
            && self.dup == 0.0
            && self.reorder == 0.0
            && self.delay.is_zero()
            && self.jitter.is_zero()
    }

    /// Picks the spec from the `--faults` flag value if given, else from the environment
    /// value (`TRIREME_FAULTS`); with neither there are no faults. Returns the parse error of
    /// the chosen value.
    pub fn resolve(flag: Option<&str>, env: Option<&str>) -> Result<FaultSpec, FaultSpecError> {
        match flag.or(env) {
            Some(text) => text.parse(),
            None => Ok(FaultSpec::default()),
        }
    }
}

impl FromStr for FaultSpec {
    type Err = FaultSpecError;

    /// Parses a comma-separated `name=value` spec; empty, whitespace or `none` gives no
    /// faults. Returns an error naming the first bad part.
    fn from_str(s: &str) -> Result<FaultSpec, FaultSpecError> {
        let s = s.trim();
        let mut spec = FaultSpec::default();
        if s.is_empty() || s.eq_ignore_ascii_case("none") {
            return Ok(spec);
        }
        let mut seen = [false; KNOWN_NAMES.len()];
        for raw in s.split(',') {
            let part = raw.trim();
            let Some((name, value)) = part.split_once('=') else {
                let reason = if part.is_empty() {
                    "empty part (stray comma?); expected name=value"
                } else {
                    "expected name=value"
                };
                return Err(FaultSpecError::new(part, reason));
            };
            let (name, value) = (name.trim(), value.trim());
            let Some(index) = KNOWN_NAMES.iter().position(|known| *known == name) else {
                let reason = format!(
                    "unknown fault `{name}`; known names are {}",
                    KNOWN_NAMES.join(", ")
                );
                return Err(FaultSpecError::new(part, reason));
            };
            if seen[index] {
                let reason = format!("`{name}` is given more than once");
                return Err(FaultSpecError::new(part, reason));
            }
            seen[index] = true;
            let bad = |reason: &str| FaultSpecError::new(part, reason);
            match name {
                "loss" => spec.loss = parse_probability(value).map_err(bad)?,
                "dup" => spec.dup = parse_probability(value).map_err(bad)?,
                "reorder" => spec.reorder = parse_probability(value).map_err(bad)?,
                "delay" => spec.delay = parse_duration(value).map_err(bad)?,
                "jitter" => spec.jitter = parse_duration(value).map_err(bad)?,
                _ => spec.seed = Some(parse_seed(value).map_err(bad)?),
            }
        }
        Ok(spec)
    }
}

impl fmt::Display for FaultSpec {
    /// Writes the non-zero settings as a spec that parses back to an equal value, e.g.
    /// `loss=0.1,delay=20ms`; writes `none` for a spec with no faults and no seed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        for (name, p) in [
            ("loss", self.loss),
            ("dup", self.dup),
            ("reorder", self.reorder),
        ] {
            if p != 0.0 {
                parts.push(format!("{name}={p}"));
            }
        }
        for (name, d) in [("delay", self.delay), ("jitter", self.jitter)] {
            if !d.is_zero() {
                parts.push(format!("{name}={}", format_duration(d)));
            }
        }
        if let Some(seed) = self.seed {
            parts.push(format!("seed={seed}"));
        }
        if parts.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&parts.join(","))
        }
    }
}

/// Parses a probability: a float in `[0, 1]` (`-0` becomes `0`). Returns the value or the
/// reason it is rejected.
fn parse_probability(value: &str) -> Result<f64, &'static str> {
    let p: f64 = value
        .parse()
        .map_err(|_| "a probability must be a number between 0 and 1")?;
    if (0.0..=1.0).contains(&p) {
        // Normalises -0.0, so that printing never shows a minus sign.
        Ok(if p == 0.0 { 0.0 } else { p })
    } else {
        Err("a probability must be between 0 and 1")
    }
}

/// Parses a duration: a non-negative decimal number with unit `us`, `ms` or `s` (bare means
/// milliseconds), exact to the nanosecond (finer digits are truncated). Returns it or why not.
fn parse_duration(value: &str) -> Result<Duration, &'static str> {
    const SHAPE: &str = "a duration is a number with unit us, ms or s (e.g. 20ms, 1.5s, 500us)";
    let (number, nanos_per_unit) = if let Some(n) = value.strip_suffix("us") {
        (n, 1_000u128)
    } else if let Some(n) = value.strip_suffix("ms") {
        (n, 1_000_000)
    } else if let Some(n) = value.strip_suffix('s') {
        (n, NANOS_PER_SEC)
    } else {
        (value, 1_000_000)
    };
    let number = number.trim();
    if number.starts_with('-') {
        return Err("a duration must not be negative");
    }
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !all_digits(whole) || !all_digits(fraction) {
        return Err(SHAPE);
    }
    const TOO_LARGE: &str = "a duration must be at most u64::MAX seconds";
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| TOO_LARGE)?
    };
    // Nine fraction digits are exact for every unit; later digits only affect sub-nanosecond
    // parts, which are truncated anyway.
    let kept = &fraction[..fraction.len().min(9)];
    let fraction_nanos = if kept.is_empty() {
        0
    } else {
        let digits: u128 = kept.parse().map_err(|_| SHAPE)?;
        digits * nanos_per_unit / 10u128.pow(kept.len() as u32)
    };
    let nanos = whole
        .checked_mul(nanos_per_unit)
        .and_then(|n| n.checked_add(fraction_nanos))
        .ok_or(TOO_LARGE)?;
    let secs = u64::try_from(nanos / NANOS_PER_SEC).map_err(|_| TOO_LARGE)?;
    let subsec = (nanos % NANOS_PER_SEC) as u32;
    Ok(Duration::new(secs, subsec))
}

/// Parses a seed: a whole number that fits in a `u64`. Returns it or why not.
fn parse_seed(value: &str) -> Result<u64, &'static str> {
    value
        .parse()
        .map_err(|_| "a seed must be a whole number between 0 and 18446744073709551615")
}

/// Formats a duration in the largest of `s`, `ms`, `us` that expresses it exactly (falling
/// back to fractional microseconds), so that [`parse_duration`] reads back the same value.
fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos.is_multiple_of(NANOS_PER_SEC) {
        format!("{}s", nanos / NANOS_PER_SEC)
    } else if nanos.is_multiple_of(1_000_000) {
        format!("{}ms", nanos / 1_000_000)
    } else if nanos.is_multiple_of(1_000) {
        format!("{}us", nanos / 1_000)
    } else {
        let fraction = format!("{:03}", nanos % 1_000);
        format!("{}.{}us", nanos / 1_000, fraction.trim_end_matches('0'))
    }
}

/// Counts of what a [`FaultInjector`] has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Datagrams handed to [`FaultInjector::schedule`] (dropped ones included).
    pub sent: u64,
    /// Datagrams dropped entirely.
    pub dropped: u64,
    /// Datagrams sent twice (each counts once).
    pub duplicated: u64,
    /// Copies held back by the reorder hold.
    pub reordered: u64,
    /// Copies due strictly after the instant they were handed over (for any reason).
    pub delayed: u64,
}

/// A seeded fault injector for one process's outgoing datagrams (sans-IO).
#[derive(Debug, Clone)]
pub struct FaultInjector {
    /// The faults to inject.
    spec: FaultSpec,
    /// The generator every random choice is drawn from.
    rng: Rng,
    /// What has been done so far.
    stats: FaultStats,
}

impl FaultInjector {
    /// Builds an injector for `spec`, seeded from `spec.seed` if set, else from the operating
    /// system (the seed drawn is logged so that the run can be replayed).
    pub fn new(spec: FaultSpec) -> FaultInjector {
        let rng = match spec.seed {
            Some(seed) => Rng::seeded(seed),
            None => {
                let seed = Rng::from_entropy().next_u64();
                if !spec.is_none() {
                    log::info!("fault injection {spec}: replay with seed={seed}");
                }
                Rng::seeded(seed)
            }
        };
        FaultInjector::with_rng(spec, rng)
    }

    /// Builds an injector for `spec` that draws from `rng` (ignoring `spec.seed`).
    pub fn with_rng(spec: FaultSpec, rng: Rng) -> FaultInjector {
        FaultInjector {
            spec,
            rng,
            stats: FaultStats::default(),
        }
    }

    /// Returns the spec this injector applies.
    pub fn spec(&self) -> &FaultSpec {
        &self.spec
    }

    /// Applies `spec` from now on (its `seed` is ignored: the generator goes on where it
    /// is), keeping the counts; a test uses it to change the network's faults mid-run.
    pub fn set_spec(&mut self, spec: FaultSpec) {
        self.spec = spec;
    }

    /// Decides the fate of one outgoing datagram handed over at `now`: the returned Vec holds
    /// the instant at which each copy must go on the wire (empty = dropped, two entries =
    /// duplicated), in ascending order. A copy due at `now` goes out immediately.
    pub fn schedule(&mut self, now: Instant) -> Vec<Instant> {
        self.stats.sent += 1;
        if self.spec.is_none() {
            return vec![now];
        }
        if self.rng.chance(self.spec.loss) {
            self.stats.dropped += 1;
            log::trace!("fault injection: dropped a datagram");
            return Vec::new();
        }
        let copies = if self.rng.chance(self.spec.dup) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        let mut due = Vec::with_capacity(copies);
        for _ in 0..copies {
            let offset = self.copy_offset().min(MAX_OFFSET);
            if !offset.is_zero() {
                self.stats.delayed += 1;
            }
            // Cannot fail with offsets capped at MAX_OFFSET; a copy that could not be
            // represented would never be sent anyway.
            if let Some(at) = now.checked_add(offset) {
                due.push(at);
            }
        }
        due.sort();
        due
    }

    /// Returns the counts of what this injector has done so far.
    pub fn stats(&self) -> FaultStats {
        self.stats
    }

    /// Draws how long after hand-over one copy goes out: `delay + uniform[0, jitter]`, plus
    /// (with probability `reorder`) a hold uniform in `[hold/2, hold]`, where
    /// `hold = max(2 × (delay + jitter), 5 ms)`. Counts reordered copies.
    fn copy_offset(&mut self) -> Duration {
        let FaultSpec { delay, jitter, .. } = self.spec;
        let mut offset = delay.saturating_add(self.uniform_up_to(jitter));
        if self.rng.chance(self.spec.reorder) {
            self.stats.reordered += 1;
            let base = delay.saturating_add(jitter);
            let hold = base.saturating_add(base).max(MIN_REORDER_HOLD);
            let half = hold / 2;
            offset = offset
                .saturating_add(half)
                .saturating_add(self.uniform_up_to(hold - half));
        }
        offset
    }

    /// Draws a duration uniformly from `[0, max]` at nanosecond resolution (capped at
    /// `u64::MAX - 1` ns); draws nothing when `max` is zero.
    fn uniform_up_to(&mut self, max: Duration) -> Duration {
        if max.is_zero() {
            return Duration::ZERO;
        }
        let max_nanos = u64::try_from(max.as_nanos())
            .unwrap_or(u64::MAX)
            .min(u64::MAX - 1);
        Duration::from_nanos(self.rng.below(max_nanos + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    use crate::util::rng::Rng;

    /// Parses `text`, failing the test with the error if it is rejected.
    fn parse(text: &str) -> FaultSpec {
        match text.parse() {
            Ok(spec) => spec,
            Err(e) => panic!("`{text}` was rejected: {e}"),
        }
    }

    /// Builds a seeded injector for the spec written as `text`.
    fn injector(text: &str) -> FaultInjector {
        FaultInjector::with_rng(parse(text), Rng::seeded(7))
    }

    /// The documented full example parses to exactly the values it names.
    #[test]
    fn parses_the_full_example_to_exact_values() {
        let spec = parse("loss=0.1,dup=0.05,reorder=0.1,delay=20ms,jitter=10ms,seed=42");
        let expected = FaultSpec {
            loss: 0.1,
            dup: 0.05,
            reorder: 0.1,
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(10),
            seed: Some(42),
        };
        assert_eq!(spec, expected);
        assert!(!spec.is_none());
    }

    /// Empty, whitespace-only and `none` specs inject nothing; a seed alone is still none.
    #[test]
    fn empty_whitespace_and_none_mean_no_faults() {
        for text in ["", "   ", "\t\n", "none", " NONE "] {
            let spec = parse(text);
            assert_eq!(spec, FaultSpec::default(), "`{text}`");
            assert!(spec.is_none());
        }
        assert!(parse("seed=3").is_none(), "a seed alone changes nothing");
        assert!(!parse("jitter=1us").is_none());
    }

    /// Durations take `us`, `ms`, `s` or no unit (milliseconds), decimals included.
    #[test]
    fn durations_accept_us_ms_s_and_bare_milliseconds() {
        let cases = [
            ("500us", Duration::from_micros(500)),
            ("20ms", Duration::from_millis(20)),
            ("1.5s", Duration::from_millis(1500)),
            ("2s", Duration::from_secs(2)),
            ("20", Duration::from_millis(20)),
            ("0.25", Duration::from_micros(250)),
            ("1.5us", Duration::from_nanos(1500)),
            (".5ms", Duration::from_micros(500)),
            ("3.", Duration::from_millis(3)),
            ("0", Duration::ZERO),
            (" 7 ms ", Duration::from_millis(7)),
            ("0.0000000019s", Duration::from_nanos(1)),
        ];
        for (text, expected) in cases {
            assert_eq!(
                parse(&format!("delay={text}")).delay,
                expected,
                "delay={text}"
            );
        }
    }

    /// Each kind of bad part is rejected with `part` set to the offending text.
    #[test]
    fn every_kind_of_bad_part_is_named_in_the_error() {
        let cases: &[(&str, &str, &str)] = &[
            ("loss=1.5", "loss=1.5", "between 0 and 1"),
            ("dup=-0.1", "dup=-0.1", "between 0 and 1"),
            ("reorder=NaN", "reorder=NaN", "between 0 and 1"),
            ("loss=inf", "loss=inf", "between 0 and 1"),
            ("loss=lots", "loss=lots", "between 0 and 1"),
            ("loss=", "loss=", "between 0 and 1"),
            ("delay=-5ms", "delay=-5ms", "negative"),
            ("delay=fast", "delay=fast", "unit"),
            ("delay=5h", "delay=5h", "unit"),
            ("jitter=1e3ms", "jitter=1e3ms", "unit"),
            ("jitter=ms", "jitter=ms", "unit"),
            ("jitter=1.2.3", "jitter=1.2.3", "unit"),
            (
                "delay=99999999999999999999999s",
                "delay=99999999999999999999999s",
                "at most",
            ),
            ("seed=-1", "seed=-1", "seed"),
            ("seed=1.5", "seed=1.5", "seed"),
            (
                "seed=18446744073709551616",
                "seed=18446744073709551616",
                "seed",
            ),
            (
                "bogus=1",
                "bogus=1",
                "known names are loss, dup, reorder, delay, jitter, seed",
            ),
            (
                "loss=0.1, latency=5ms",
                "latency=5ms",
                "unknown fault `latency`",
            ),
            ("loss", "loss", "name=value"),
            ("loss=0.1,,dup=0.1", "", "empty part"),
            ("loss=0.1,", "", "empty part"),
            ("delay=1ms , loss = 2", "loss = 2", "between 0 and 1"),
        ];
        for (text, part, reason) in cases {
            match text.parse::<FaultSpec>() {
                Ok(spec) => panic!("`{text}` was accepted as {spec:?}"),
                Err(e) => {
                    assert_eq!(e.part, *part, "part for `{text}`");
                    assert!(
                        e.reason.contains(reason),
                        "reason for `{text}`: {}",
                        e.reason
                    );
                }
            }
        }
    }

    /// The error prints as `bad fault spec part `...`: reason`.
    #[test]
    fn error_display_names_the_part_and_reason() {
        let err = "loss=1.5".parse::<FaultSpec>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad fault spec part `loss=1.5`: a probability must be between 0 and 1"
        );
    }

    /// A name given twice is rejected, naming the second occurrence.
    #[test]
    fn a_name_given_twice_is_rejected() {
        let err = "loss=0.1,delay=5ms,loss=0.2"
            .parse::<FaultSpec>()
            .unwrap_err();
        assert_eq!(err.part, "loss=0.2");
        assert!(err.reason.contains("more than once"), "{}", err.reason);
        assert!("seed=1,seed=1".parse::<FaultSpec>().is_err());
    }

    /// Display prints canonical specs that parse back to equal values.
    #[test]
    fn display_round_trips() {
        let cases = [
            ("loss=0.1,delay=20ms", "loss=0.1,delay=20ms"),
            (
                "seed=42,jitter=10ms,delay=20ms,reorder=0.1,dup=0.05,loss=0.1",
                "loss=0.1,dup=0.05,reorder=0.1,delay=20ms,jitter=10ms,seed=42",
            ),
            ("delay=1.5s,jitter=500us", "delay=1500ms,jitter=500us"),
            ("delay=1.5us", "delay=1.5us"),
            ("delay=3000", "delay=3s"),
            ("", "none"),
            ("loss=0", "none"),
            ("seed=9", "seed=9"),
        ];
        for (input, printed) in cases {
            let spec = parse(input);
            assert_eq!(spec.to_string(), printed, "display of `{input}`");
            assert_eq!(parse(printed), spec, "round trip of `{input}`");
        }
    }

    proptest! {
        /// Any valid spec prints as text that parses back to an equal spec.
        #[test]
        fn display_round_trips_for_any_valid_spec(
            loss in 0.0..=1.0f64,
            dup in prop_oneof![Just(0.0), Just(1.0), 0.0..=1.0f64],
            reorder in prop_oneof![Just(0.0), 0.0..=1.0f64],
            delay_secs in prop_oneof![Just(0u64), 0..10u64, any::<u64>()],
            delay_nanos in prop_oneof![Just(0u32), 0..1_000_000_000u32],
            jitter_nanos in any::<u64>(),
            seed in any::<Option<u64>>(),
        ) {
            let spec = FaultSpec {
                loss,
                dup,
                reorder,
                delay: Duration::new(delay_secs, delay_nanos),
                jitter: Duration::from_nanos(jitter_nanos),
                seed,
            };
            let text = spec.to_string();
            prop_assert_eq!(text.parse::<FaultSpec>(), Ok(spec), "text {}", text);
        }

        /// Parsing never panics, whatever the input.
        #[test]
        fn parsing_arbitrary_text_never_panics(text in ".{0,40}") {
            let _ = text.parse::<FaultSpec>();
        }
    }

    /// `resolve` takes the flag over the environment value, and neither means none.
    #[test]
    fn resolve_prefers_the_flag_over_the_environment() {
        let flag = FaultSpec::resolve(Some("loss=0.5"), Some("loss=0.25")).unwrap();
        assert_eq!(flag.loss, 0.5);
        let env = FaultSpec::resolve(None, Some("loss=0.25")).unwrap();
        assert_eq!(env.loss, 0.25);
        assert!(FaultSpec::resolve(None, None).unwrap().is_none());
        assert!(
            FaultSpec::resolve(Some(""), Some("loss=0.25"))
                .unwrap()
                .is_none()
        );
        assert!(FaultSpec::resolve(Some("loss=0.1"), Some("bogus")).is_ok());
        assert_eq!(
            FaultSpec::resolve(None, Some("bogus")).unwrap_err().part,
            "bogus"
        );
    }

    /// A none spec schedules exactly `[now]` and draws no random numbers.
    #[test]
    fn none_spec_sends_each_datagram_once_at_once() {
        let mut inj = FaultInjector::with_rng(FaultSpec::default(), Rng::seeded(1));
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(inj.schedule(now), vec![now]);
        }
        let stats = inj.stats();
        assert_eq!(
            stats,
            FaultStats {
                sent: 100,
                ..FaultStats::default()
            }
        );
        // Draws no random numbers: the generator is where it started.
        let mut fresh = Rng::seeded(1);
        assert_eq!(inj.rng.next_u64(), fresh.next_u64());
    }

    /// `loss=1` drops every datagram, even with duplication on.
    #[test]
    fn loss_one_drops_everything() {
        let mut inj = injector("loss=1,dup=1,delay=5ms");
        let now = Instant::now();
        for _ in 0..1000 {
            assert!(inj.schedule(now).is_empty());
        }
        assert_eq!(inj.stats().sent, 1000);
        assert_eq!(inj.stats().dropped, 1000);
        assert_eq!(inj.stats().duplicated, 0);
    }

    /// `dup=1` sends every datagram twice.
    #[test]
    fn dup_one_gives_two_copies() {
        let mut inj = injector("dup=1");
        let now = Instant::now();
        for _ in 0..1000 {
            assert_eq!(inj.schedule(now), vec![now, now]);
        }
        assert_eq!(inj.stats().duplicated, 1000);
        assert_eq!(inj.stats().delayed, 0);
    }

    /// Over 10 000 datagrams, `loss=0.2` drops between 17% and 23%.
    #[test]
    fn loss_rate_matches_the_probability() {
        let mut inj = injector("loss=0.2");
        let now = Instant::now();
        let dropped = (0..10_000).filter(|_| inj.schedule(now).is_empty()).count();
        let rate = dropped as f64 / 10_000.0;
        assert!((0.17..=0.23).contains(&rate), "drop rate {rate}");
        assert_eq!(inj.stats().dropped, dropped as u64);
    }

    /// The same seed replays the same schedule; another seed changes it.
    #[test]
    fn same_seed_gives_identical_schedules() {
        let spec = parse("loss=0.1,dup=0.2,reorder=0.3,delay=20ms,jitter=10ms,seed=42");
        let now = Instant::now();
        let run = |spec: FaultSpec| {
            let mut inj = FaultInjector::new(spec);
            (0..500).map(|_| inj.schedule(now)).collect::<Vec<_>>()
        };
        let first = run(spec);
        assert_eq!(first, run(spec));
        let other = run(FaultSpec {
            seed: Some(43),
            ..spec
        });
        assert_ne!(first, other, "a different seed should change the schedule");
    }

    /// Without reordering every copy is due within `[now + delay, now + delay + jitter]`.
    #[test]
    fn delay_and_jitter_keep_copies_within_bounds_without_reorder() {
        let mut inj = injector("dup=0.5,delay=20ms,jitter=10ms");
        let now = Instant::now();
        let (low, high) = (
            now + Duration::from_millis(20),
            now + Duration::from_millis(30),
        );
        let mut seen = Vec::new();
        for _ in 0..2000 {
            for at in inj.schedule(now) {
                assert!(low <= at && at <= high, "copy at {:?}", at - now);
                seen.push(at);
            }
        }
        let spread = *seen.iter().max().unwrap() - *seen.iter().min().unwrap();
        assert!(
            spread > Duration::from_millis(9),
            "jitter spread only {spread:?}"
        );
        assert_eq!(inj.stats().delayed, seen.len() as u64);
        assert_eq!(inj.stats().reordered, 0);
    }

    /// `reorder=1` holds each copy at least 2.5 ms beyond its delay, at most a full hold.
    #[test]
    fn reorder_one_holds_copies_at_least_two_and_a_half_ms_beyond_delay() {
        let now = Instant::now();
        for (text, delay, max_extra) in [
            ("reorder=1", Duration::ZERO, Duration::from_millis(5)),
            (
                "reorder=1,delay=1ms",
                Duration::from_millis(1),
                Duration::from_millis(5),
            ),
            (
                "reorder=1,delay=10ms,jitter=2ms",
                Duration::from_millis(10),
                Duration::from_millis(26),
            ),
        ] {
            let mut inj = injector(text);
            for _ in 0..1000 {
                let due = inj.schedule(now);
                assert_eq!(due.len(), 1);
                let offset = due[0] - now;
                assert!(
                    offset >= delay + Duration::from_micros(2500),
                    "{text}: {offset:?}"
                );
                assert!(offset <= delay + max_extra, "{text}: {offset:?}");
            }
            assert_eq!(inj.stats().reordered, 1000, "{text}");
        }
    }

    /// Absurd hand-built specs (NaN, >1, `Duration::MAX`) schedule without panicking.
    #[test]
    fn huge_hand_built_specs_do_not_panic() {
        let spec = FaultSpec {
            loss: f64::NAN,
            dup: 2.0,
            reorder: 1.0,
            delay: Duration::MAX,
            jitter: Duration::MAX,
            seed: Some(1),
        };
        let mut inj = FaultInjector::new(spec);
        let now = Instant::now();
        let due = inj.schedule(now);
        assert_eq!(due.len(), 2);
        assert!(due.iter().all(|at| *at <= now + MAX_OFFSET));
    }
}
