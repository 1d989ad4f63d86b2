//! `client bench`: an in-process load generator, and what it measures.
//!
//! This module owns the shape of a load and its measurement: which operation and key each
//! operation gets, when it is due, the worker threads, and the [`Report`]. What the load is put
//! on is a [`Target`], in a submodule each: [`trireme`] (`setr`/`getr` through
//! [`crate::client::Client`], the code the `client` commands run), [`etcd`] (put and
//! serializable get through etcd's v3 JSON gateway, for comparison), `etcd_grpc` (the same
//! through etcd's native gRPC API, with the `etcd-grpc` feature) and [`echo`] (a datagram to
//! an echo thread in this process and back: the floor any UDP protocol pays on this machine).
//!
//! Every operation has an index `i`, drawn from a counter the workers share. The index alone
//! decides the operation ([`Workload::op`]: a seeded hash of `i`, so a mix keeps its ratio
//! whatever the interleaving), its key ([`KeySpace::key`]: `bench-(i mod N)`, so operations in
//! flight together touch different keys whenever N exceeds the concurrency: `setr` refuses a
//! second pending commit on a key) and, in open loop, when it is due ([`Schedule::offset`]:
//! `i / rate` after the start). Open-loop latency is measured from that due instant, not from
//! when a worker got round to sending, so time spent queued behind slow operations shows in the
//! percentiles instead of being omitted (coordinated omission). Without a rate the load is
//! closed-loop: a worker sends its next operation when its previous one finished, and latency
//! is measured from the send.
//!
//! Failed operations do not stop the run: they are counted by the contract's error kinds
//! ([`ErrorCounts`]). Latency percentiles cover the successful operations, recorded in an HDR
//! histogram per worker (3 significant digits from 1 ns to 60 s, in bounded memory whatever
//! the run's length), merged at the end. The report also gives the CPU time this process
//! spent over the measured run (`getrusage`, every thread: workers, network drivers, async
//! runtimes), so a comparison can weigh what each system's client costs per operation.

pub mod churn;
pub mod echo;
pub mod etcd;
#[cfg(feature = "etcd-grpc")]
pub mod etcd_grpc;
pub mod trireme;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use log::{info, warn};
use serde_json::json;
use thiserror::Error;

use crate::wire::message::{ErrorKind, OpError};

/// The longest latency the histogram tells apart; longer ones are recorded as this.
const LATENCY_CEILING: Duration = Duration::from_secs(60);

/// Significant decimal digits the histogram keeps (0.1% relative precision).
const LATENCY_DIGITS: u8 = 3;

/// How many workers preload the key space (preloading is not measured, so it need not run at
/// the measured concurrency).
const PRELOAD_CONCURRENCY: usize = 16;

/// Attempts per key when preloading, before the command gives up.
const PRELOAD_ATTEMPTS: u32 = 3;

/// A command-line value of `client bench` that does not parse.
#[derive(Debug, Error, PartialEq)]
pub enum ParseError {
    /// Not a decimal number.
    #[error("{0:?} is not a number")]
    NotANumber(String),
    /// A read ratio outside `0..=1`.
    #[error("a read ratio is within 0..=1, got {0}")]
    RatioOutOfRange(f64),
    /// A rate that is not a positive, finite number of operations per second.
    #[error("a rate is {min}..={max} operations per second, got {0}", min = Rate::MIN, max = Rate::MAX)]
    RateOutOfRange(f64),
    /// A duration that is not a positive, finite number of seconds.
    #[error("a duration is a positive number of seconds (at most a day), got {0}")]
    DurationOutOfRange(f64),
}

/// Parses a decimal number.
fn parse_number(text: &str) -> Result<f64, ParseError> {
    text.trim()
        .parse::<f64>()
        .map_err(|_| ParseError::NotANumber(text.to_owned()))
}

/// The fraction of a mix's operations that are reads, within `0..=1`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReadRatio(f64);

impl ReadRatio {
    /// The fraction, within `0..=1`.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl FromStr for ReadRatio {
    type Err = ParseError;

    /// Parses a fraction within `0..=1`.
    fn from_str(text: &str) -> Result<ReadRatio, ParseError> {
        let ratio = parse_number(text)?;
        if (0.0..=1.0).contains(&ratio) {
            Ok(ReadRatio(ratio))
        } else {
            Err(ParseError::RatioOutOfRange(ratio))
        }
    }
}

/// An open-loop rate: operations per second, across all workers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate(f64);

impl Rate {
    /// The lowest rate accepted (one operation every 100 s).
    pub const MIN: f64 = 0.01;
    /// The highest rate accepted (far above anything loopback can carry).
    pub const MAX: f64 = 1e8;

    /// Operations per second.
    pub fn per_second(self) -> f64 {
        self.0
    }
}

impl FromStr for Rate {
    type Err = ParseError;

    /// Parses a number of operations per second within [`Rate::MIN`]`..=`[`Rate::MAX`].
    fn from_str(text: &str) -> Result<Rate, ParseError> {
        let rate = parse_number(text)?;
        if (Rate::MIN..=Rate::MAX).contains(&rate) {
            Ok(Rate(rate))
        } else {
            Err(ParseError::RateOutOfRange(rate))
        }
    }
}

/// Parses `--duration SECS`: a positive number of seconds, at most a day.
pub fn parse_duration(text: &str) -> Result<Duration, ParseError> {
    let secs = parse_number(text)?;
    if secs > 0.0 && secs <= 86_400.0 {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(ParseError::DurationOutOfRange(secs))
    }
}

/// What a load consists of.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Workload {
    /// Replicated writes only (etcd: put).
    Setr,
    /// Replicated reads only (etcd: serializable get).
    Getr,
    /// Reads with the given probability, writes otherwise.
    Mix(ReadRatio),
    /// Datagrams to an echo thread and back (a reference, no protocol at all).
    UdpEcho,
}

/// One operation a worker performs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write the key (`setr`, etcd put).
    Write,
    /// Read the key (`getr`, etcd serializable get).
    Read,
    /// One datagram to the echo thread and back.
    Echo,
}

impl Workload {
    /// The operation with index `index` in a run seeded with `seed`.
    pub fn op(self, seed: u64, index: u64) -> Op {
        match self {
            Workload::Setr => Op::Write,
            Workload::Getr => Op::Read,
            Workload::UdpEcho => Op::Echo,
            Workload::Mix(ratio) => {
                if unit_interval(seed, index) < ratio.get() {
                    Op::Read
                } else {
                    Op::Write
                }
            }
        }
    }

    /// True when the load reads, so the key space must be written before measuring.
    pub fn is_reading(self) -> bool {
        match self {
            Workload::Getr => true,
            Workload::Mix(ratio) => ratio.get() > 0.0,
            Workload::Setr | Workload::UdpEcho => false,
        }
    }

    /// The `--op` name of the load.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Setr => "setr",
            Workload::Getr => "getr",
            Workload::Mix(_) => "mix",
            Workload::UdpEcho => "udp-echo",
        }
    }
}

/// A number uniformly distributed in `[0, 1)`, determined by `seed` and `index` alone
/// (SplitMix64's output function over their combination).
fn unit_interval(seed: u64, index: u64) -> f64 {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// The keys a load touches: `bench-0` .. `bench-(N-1)`.
#[derive(Clone, Debug)]
pub struct KeySpace {
    /// The key names, built once so no operation formats a key.
    names: Vec<String>,
}

impl KeySpace {
    /// The key space of `count` keys.
    pub fn new(count: NonZeroUsize) -> KeySpace {
        KeySpace {
            names: (0..count.get()).map(|n| format!("bench-{n}")).collect(),
        }
    }

    /// The key of operation `index`: `bench-(index mod N)`.
    pub fn key(&self, index: u64) -> &str {
        // `names` is never empty (`count` is non-zero), and the remainder is below its length.
        &self.names[(index % self.names.len() as u64) as usize]
    }

    /// Every key, in order.
    pub fn all(&self) -> &[String] {
        &self.names
    }
}

/// How long a run lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Length {
    /// Send operations for this long (open loop: those due within it).
    Duration(Duration),
    /// Send exactly this many operations.
    Ops(u64),
}

/// When operations are due: whenever a worker is free (closed loop) or at a fixed rate
/// (open loop).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// The open-loop rate; `None` for closed loop.
    rate: Option<Rate>,
}

impl Schedule {
    /// Closed loop: each worker sends as soon as its previous operation finished.
    pub fn closed() -> Schedule {
        Schedule { rate: None }
    }

    /// Open loop at `rate` operations per second across all workers.
    pub fn open(rate: Rate) -> Schedule {
        Schedule { rate: Some(rate) }
    }

    /// The open-loop rate, if any.
    pub fn rate(self) -> Option<Rate> {
        self.rate
    }

    /// When operation `index` is due after the start (`index / rate`); `None` in closed loop.
    pub fn offset(self, index: u64) -> Option<Duration> {
        let rate = self.rate?;
        Some(Duration::try_from_secs_f64(index as f64 / rate.per_second()).unwrap_or(Duration::MAX))
    }

    /// How many operations fall due within `span` after the start; `None` in closed loop.
    pub fn due_within(self, span: Duration) -> Option<u64> {
        // Operation i is due within the span when i / rate < span, i.e. i < span * rate.
        let rate = self.rate?;
        Some((span.as_secs_f64() * rate.per_second()).ceil() as u64)
    }
}

/// A load, as the command line describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchConfig {
    /// The operations.
    pub workload: Workload,
    /// How many workers send at once (each with its own connection).
    pub concurrency: NonZeroUsize,
    /// How long the run lasts.
    pub length: Length,
    /// The size of every written value, in bytes.
    pub value_size: usize,
    /// How many distinct keys the load touches.
    pub keys: NonZeroUsize,
    /// Closed or open loop.
    pub schedule: Schedule,
    /// Seed of the mix's choices, so a run can be repeated operation for operation.
    pub seed: u64,
}

/// Something a load can be put on.
pub trait Target: Sync {
    /// How the report names the target.
    fn describe(&self) -> String;

    /// Opens the connection one worker uses for the whole run.
    fn connect(&self) -> Result<Box<dyn Connection>, OpError>;
}

/// One worker's connection to a [`Target`].
pub trait Connection: Send {
    /// Performs one operation on `key` (a write stores `value`).
    fn execute(&mut self, op: Op, key: &str, value: &str) -> Result<(), OpError>;
}

/// Why a run could not take place (failed operations during the run are counted instead).
#[derive(Debug, Error)]
pub enum BenchError {
    /// A worker could not open its connection.
    #[error("cannot connect to {target}: {}", error.message)]
    Connect {
        /// The target's description.
        target: String,
        /// What went wrong.
        error: OpError,
    },
    /// A key could not be written before measuring reads.
    #[error("preloading {key} failed {PRELOAD_ATTEMPTS} times; the last time: {}", error.message)]
    Preload {
        /// The key.
        key: String,
        /// The last failure.
        error: OpError,
    },
}

impl BenchError {
    /// The contract's error kind the command fails with.
    pub fn kind(&self) -> ErrorKind {
        match self {
            BenchError::Connect { error, .. } | BenchError::Preload { error, .. } => error.kind,
        }
    }
}

/// Failed operations by the contract's error kind, with the first explanation of each kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorCounts {
    /// Failures per kind, indexed like [`ErrorKind::ALL`].
    counts: [u64; ErrorKind::ALL.len()],
    /// The first explanation seen of each kind, for the log.
    first: [Option<String>; ErrorKind::ALL.len()],
}

impl ErrorCounts {
    /// The index of `kind` in [`ErrorKind::ALL`].
    fn slot(kind: ErrorKind) -> usize {
        ErrorKind::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or_default()
    }

    /// Counts one failure.
    pub fn add(&mut self, error: &OpError) {
        let slot = Self::slot(error.kind);
        self.counts[slot] += 1;
        self.first[slot].get_or_insert_with(|| error.message.clone());
    }

    /// Adds another tally's counts (keeping this one's explanations first).
    pub fn merge(&mut self, other: ErrorCounts) {
        for (slot, (count, first)) in other.counts.into_iter().zip(other.first).enumerate() {
            self.counts[slot] += count;
            if self.first[slot].is_none() {
                self.first[slot] = first;
            }
        }
    }

    /// Failures of `kind`.
    pub fn count(&self, kind: ErrorKind) -> u64 {
        self.counts[Self::slot(kind)]
    }

    /// All failures.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Every kind with its count, in the contract's order (zeros included).
    pub fn iter(&self) -> impl Iterator<Item = (ErrorKind, u64)> + '_ {
        ErrorKind::ALL.into_iter().zip(self.counts)
    }

    /// The first explanation seen of `kind`, if any failed so.
    pub fn first(&self, kind: ErrorKind) -> Option<&str> {
        self.first[Self::slot(kind)].as_deref()
    }
}

/// Latency percentiles of the successful operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Latency {
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// The slowest.
    pub max: Duration,
    /// The mean.
    pub mean: Duration,
}

impl Latency {
    /// The percentiles of `histogram` (nanoseconds); `None` when it is empty.
    fn of(histogram: &Histogram<u64>) -> Option<Latency> {
        if histogram.is_empty() {
            return None;
        }
        let at = |q: f64| Duration::from_nanos(histogram.value_at_quantile(q));
        Some(Latency {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: Duration::from_nanos(histogram.max()),
            mean: Duration::from_secs_f64(histogram.mean() / 1e9),
        })
    }
}

/// A new, empty latency histogram in nanoseconds.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_CEILING.as_nanos() as u64, LATENCY_DIGITS)
        .expect("the histogram's constant bounds are valid")
}

/// What one worker measured.
struct Tally {
    /// Latencies of the successful operations, in nanoseconds.
    latency: Histogram<u64>,
    /// Successful operations.
    succeeded: u64,
    /// Reads sent.
    reads: u64,
    /// Writes sent.
    writes: u64,
    /// Failed operations.
    errors: ErrorCounts,
    /// The keys (their index in the key space) refused with `rebalancing` at least once.
    refused_keys: BTreeSet<u64>,
}

impl Tally {
    /// An empty tally.
    fn new() -> Tally {
        Tally {
            latency: latency_histogram(),
            succeeded: 0,
            reads: 0,
            writes: 0,
            errors: ErrorCounts::default(),
            refused_keys: BTreeSet::new(),
        }
    }

    /// Records one operation's outcome and latency (`key` is its key's index in the key
    /// space).
    fn record(&mut self, op: Op, key: u64, result: Result<(), OpError>, latency: Duration) {
        match op {
            Op::Read => self.reads += 1,
            Op::Write => self.writes += 1,
            Op::Echo => {}
        }
        match result {
            Ok(()) => {
                self.succeeded += 1;
                let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
                self.latency.saturating_record(nanos.max(1));
            }
            Err(error) => {
                if error.kind == ErrorKind::Rebalancing {
                    self.refused_keys.insert(key);
                }
                self.errors.add(&error);
            }
        }
    }

    /// Adds another worker's tally.
    fn merge(&mut self, other: Tally) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        self.succeeded += other.succeeded;
        self.reads += other.reads;
        self.writes += other.writes;
        self.errors.merge(other.errors);
        self.refused_keys.extend(other.refused_keys);
    }
}

/// What a run measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The target, as it describes itself.
    pub target: String,
    /// The load.
    pub config: BenchConfig,
    /// From the first operation due to the last one finished.
    pub elapsed: Duration,
    /// Operations that succeeded.
    pub succeeded: u64,
    /// Reads sent (in a mix, to check its ratio).
    pub reads: u64,
    /// Writes sent.
    pub writes: u64,
    /// Open loop with `--duration`: operations due within the run that no worker got to send
    /// before it ended (more than zero means the target, or the workers, fell behind the rate).
    pub unsent: u64,
    /// Failed operations by kind.
    pub errors: ErrorCounts,
    /// Distinct keys refused with `rebalancing` at least once (issue 17: only keys a view
    /// change moved should be).
    pub refused_keys: u64,
    /// The longest stretch of the run during which no operation succeeded (from the start to
    /// the first success, between two successes, or from the last one to the end).
    pub longest_gap: Duration,
    /// Latency of the successful operations; `None` if none succeeded.
    pub latency: Option<Latency>,
    /// CPU time (user + system) this process spent over the measured run, every thread
    /// counted (workers, network drivers, async runtimes); `None` if the OS did not tell.
    pub client_cpu: Option<Duration>,
}

/// Microseconds, for the report.
fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

/// Rounds to one decimal, so reports do not carry noise digits.
fn tenth(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

impl Report {
    /// Failed operations.
    pub fn failed(&self) -> u64 {
        self.errors.total()
    }

    /// Successful operations per second.
    pub fn throughput(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.succeeded as f64 / secs
        } else {
            0.0
        }
    }

    /// The `--json` object: `"ok": true` and the figures (latencies in microseconds).
    pub fn json(&self) -> serde_json::Value {
        let config = &self.config;
        let errors: serde_json::Map<String, serde_json::Value> = self
            .errors
            .iter()
            .map(|(kind, count)| (kind.as_str().to_owned(), json!(count)))
            .collect();
        let latency = self.latency.map(|l| {
            json!({
                "p50": tenth(micros(l.p50)),
                "p90": tenth(micros(l.p90)),
                "p99": tenth(micros(l.p99)),
                "p999": tenth(micros(l.p999)),
                "max": tenth(micros(l.max)),
                "mean": tenth(micros(l.mean)),
            })
        });
        let (length_ops, length_s) = match config.length {
            Length::Ops(n) => (Some(n), None),
            Length::Duration(d) => (None, Some(d.as_secs_f64())),
        };
        json!({
            "ok": true,
            "target": self.target,
            "op": config.workload.name(),
            "read_ratio": match config.workload {
                Workload::Mix(ratio) => Some(ratio.get()),
                _ => None,
            },
            "concurrency": config.concurrency.get(),
            "value_size": config.value_size,
            "keys": config.keys.get(),
            "loop": if config.schedule.rate().is_some() { "open" } else { "closed" },
            "rate": config.schedule.rate().map(Rate::per_second),
            "latency_from": if config.schedule.rate().is_some() { "intended" } else { "sent" },
            "requested_ops": length_ops,
            "requested_duration_s": length_s,
            "elapsed_s": (self.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            "ops": self.succeeded + self.failed(),
            "succeeded": self.succeeded,
            "failed": self.failed(),
            "reads": self.reads,
            "writes": self.writes,
            "unsent": self.unsent,
            "refused_keys": self.refused_keys,
            "longest_gap_ms": tenth(self.longest_gap.as_secs_f64() * 1e3),
            "throughput": tenth(self.throughput()),
            "errors": errors,
            "latency_us": latency,
            "client_cpu_us": self.client_cpu.map(|cpu| u64::try_from(cpu.as_micros()).unwrap_or(u64::MAX)),
        })
    }

    /// The human report: a small two-column table.
    pub fn table(&self) -> String {
        let config = &self.config;
        let mut rows: Vec<(&str, String)> = Vec::new();
        rows.push(("target", self.target.clone()));
        let op = match config.workload {
            Workload::Mix(ratio) => format!("mix ({:.0}% getr)", ratio.get() * 100.0),
            other => other.name().to_owned(),
        };
        let pacing = match config.schedule.rate() {
            Some(rate) => format!("open loop at {} ops/s", rate.per_second()),
            None => "closed loop".to_owned(),
        };
        let length = match config.length {
            Length::Ops(n) => format!("{n} ops"),
            Length::Duration(d) => format!("{:.1} s", d.as_secs_f64()),
        };
        let shape = if config.workload == Workload::UdpEcho {
            String::new()
        } else {
            format!(", {} B values, {} keys", config.value_size, config.keys)
        };
        rows.push((
            "load",
            format!(
                "{op}{shape}, concurrency {}, {pacing}, {length}",
                config.concurrency
            ),
        ));
        let mut ops = format!("{} succeeded, {} failed", self.succeeded, self.failed());
        if matches!(config.workload, Workload::Mix(_)) {
            let _ = write!(ops, " ({} getr, {} setr sent)", self.reads, self.writes);
        }
        if self.unsent > 0 {
            let _ = write!(ops, ", {} due but never sent (fell behind)", self.unsent);
        }
        rows.push(("ops", ops));
        rows.push(("elapsed", format!("{:.3} s", self.elapsed.as_secs_f64())));
        rows.push((
            "stall",
            format!(
                "{:.1} ms: the longest stretch with no operation succeeding",
                self.longest_gap.as_secs_f64() * 1e3
            ),
        ));
        rows.push(("throughput", format!("{:.1} ops/s", self.throughput())));
        let from = if config.schedule.rate().is_some() {
            "from the intended send time"
        } else {
            "from the send"
        };
        let latency = match self.latency {
            Some(l) => format!(
                "p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1} µs ({from})",
                micros(l.p50),
                micros(l.p90),
                micros(l.p99),
                micros(l.p999),
                micros(l.max),
                micros(l.mean)
            ),
            None => "no operation succeeded".to_owned(),
        };
        rows.push(("latency", latency));
        let ops = self.succeeded + self.failed();
        rows.push((
            "client cpu",
            match self.client_cpu {
                Some(cpu) if ops > 0 => format!(
                    "{:.1} ms user+sys in this process over the run, {:.1} µs per operation",
                    cpu.as_secs_f64() * 1e3,
                    micros(cpu) / ops as f64
                ),
                Some(cpu) => format!(
                    "{:.1} ms user+sys in this process over the run",
                    cpu.as_secs_f64() * 1e3
                ),
                None => "unknown (getrusage failed)".to_owned(),
            },
        ));
        let errors: Vec<String> = self
            .errors
            .iter()
            .filter(|(_, count)| *count > 0)
            .map(|(kind, count)| format!("{kind} {count}"))
            .collect();
        rows.push((
            "errors",
            if errors.is_empty() {
                "none".to_owned()
            } else if self.refused_keys > 0 {
                format!(
                    "{} ({} keys refused with rebalancing)",
                    errors.join(", "),
                    self.refused_keys
                )
            } else {
                errors.join(", ")
            },
        ));
        rows.iter()
            .map(|(name, value)| format!("{name:<10}  {value}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The value every write stores: `size` printable bytes.
fn value_of(size: usize) -> String {
    "0123456789abcdefghijklmnopqrstuvwxyz"
        .chars()
        .cycle()
        .take(size)
        .collect()
}

/// Opens `count` connections to `target`.
fn connect_all(target: &dyn Target, count: usize) -> Result<Vec<Box<dyn Connection>>, BenchError> {
    (0..count)
        .map(|_| {
            target.connect().map_err(|error| BenchError::Connect {
                target: target.describe(),
                error,
            })
        })
        .collect()
}

/// Writes every key of `keys` once (each up to [`PRELOAD_ATTEMPTS`] times), so reads hit.
fn preload(target: &dyn Target, keys: &KeySpace, value: &str) -> Result<(), BenchError> {
    let workers = PRELOAD_CONCURRENCY.min(keys.all().len());
    let mut connections = connect_all(target, workers)?;
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let started = Instant::now();
    let results: Vec<Result<(), BenchError>> = std::thread::scope(|scope| {
        let workers: Vec<_> = connections
            .iter_mut()
            .map(|connection| {
                let (next, failed) = (&next, &failed);
                scope.spawn(move || {
                    while !failed.load(Ordering::Relaxed) {
                        let Some(key) = keys.all().get(next.fetch_add(1, Ordering::Relaxed)) else {
                            return Ok(());
                        };
                        let mut attempt = 1;
                        while let Err(error) = connection.execute(Op::Write, key, value) {
                            if attempt == PRELOAD_ATTEMPTS {
                                failed.store(true, Ordering::Relaxed);
                                return Err(BenchError::Preload {
                                    key: key.clone(),
                                    error,
                                });
                            }
                            attempt += 1;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a preload worker panicked"))
            .collect()
    });
    results.into_iter().collect::<Result<(), _>>()?;
    info!(
        "preloaded {} keys in {:.2} s",
        keys.all().len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What every worker of a run shares.
struct Plan<'a> {
    /// The load.
    config: &'a BenchConfig,
    /// The keys.
    keys: &'a KeySpace,
    /// The value written.
    value: &'a str,
    /// When the run started (open loop: when operation 0 is due).
    start: Instant,
    /// The index of the next operation to send.
    next: AtomicU64,
    /// When the latest successful operation ended, in ns since `start`.
    last_success: AtomicU64,
    /// The longest stretch between two successes seen so far, in ns.
    longest_gap: AtomicU64,
}

impl Plan<'_> {
    /// Notes at `end` the end of a successful operation: the stretch since the previous
    /// success (or the start) may be the longest with no success.
    fn succeeded_at(&self, end: Instant) {
        let at =
            u64::try_from(end.saturating_duration_since(self.start).as_nanos()).unwrap_or(u64::MAX);
        let previous = self.last_success.fetch_max(at, Ordering::Relaxed);
        self.longest_gap
            .fetch_max(at.saturating_sub(previous), Ordering::Relaxed);
    }

    /// The longest stretch with no success, up to `end` (the end of the run).
    fn longest_gap(&self, end: Instant) -> Duration {
        let end = end.saturating_duration_since(self.start).as_nanos() as u64;
        let tail = end.saturating_sub(self.last_success.load(Ordering::Relaxed));
        Duration::from_nanos(self.longest_gap.load(Ordering::Relaxed).max(tail))
    }
}

impl Plan<'_> {
    /// Sends operations on `connection` until the run is over; returns what it measured.
    fn work(&self, connection: &mut dyn Connection) -> Tally {
        let mut tally = Tally::new();
        let schedule = self.config.schedule;
        if schedule.rate().is_some() {
            // Sleeps until a due instant overshoot by the thread's timer slack (50 µs by
            // default), which open loop counts as latency: ask for 1 ns instead.
            // SAFETY: PR_SET_TIMERSLACK takes an integer argument and touches no memory.
            unsafe {
                libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
            }
        }
        loop {
            let index = self.next.fetch_add(1, Ordering::Relaxed);
            let offset = schedule.offset(index);
            let in_run = match self.config.length {
                Length::Ops(n) => index < n,
                // Open loop: operations due within the run, sent before it ends; closed loop:
                // operations sent before it ends.
                Length::Duration(span) => {
                    offset.is_none_or(|o| o < span) && self.start.elapsed() < span
                }
            };
            if !in_run {
                return tally;
            }
            let due = match offset {
                Some(offset) => match self.start.checked_add(offset) {
                    Some(due) => {
                        sleep_until(due);
                        due
                    }
                    None => return tally,
                },
                None => Instant::now(),
            };
            let op = self.config.workload.op(self.config.seed, index);
            let result = connection.execute(op, self.keys.key(index), self.value);
            if result.is_ok() {
                self.succeeded_at(Instant::now());
            }
            let key = index % self.config.keys.get() as u64;
            tally.record(op, key, result, due.elapsed());
        }
    }
}

/// The CPU time (user + system) this process has used so far, all threads counted; `None` if
/// `getrusage` fails.
fn process_cpu() -> Option<Duration> {
    // SAFETY: getrusage writes one `rusage` into the zeroed value it is given, nothing else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        (libc::getrusage(libc::RUSAGE_SELF, &mut usage) == 0).then_some(usage)
    }?;
    let time = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).ok()?)
            .checked_add(Duration::from_micros(u64::try_from(t.tv_usec).ok()?))
    };
    time(usage.ru_utime)?.checked_add(time(usage.ru_stime)?)
}

/// Sleeps until `instant` (at once if it has passed).
fn sleep_until(instant: Instant) {
    let now = Instant::now();
    if instant > now {
        std::thread::sleep(instant - now);
    }
}

/// Runs the load `config` describes against `target`: connects every worker, preloads the
/// key space if the load reads, then measures.
pub fn run(target: &dyn Target, config: &BenchConfig) -> Result<Report, BenchError> {
    let keys = KeySpace::new(config.keys);
    let value = value_of(config.value_size);
    let mut connections = connect_all(target, config.concurrency.get())?;
    if config.workload.is_reading() {
        preload(target, &keys, &value)?;
    }
    info!(
        "measuring {} on {} with {} workers",
        config.workload.name(),
        target.describe(),
        config.concurrency
    );
    let cpu_before = process_cpu();
    let plan = Plan {
        config,
        keys: &keys,
        value: &value,
        start: Instant::now(),
        next: AtomicU64::new(0),
        last_success: AtomicU64::new(0),
        longest_gap: AtomicU64::new(0),
    };
    let tallies: Vec<Tally> = std::thread::scope(|scope| {
        let workers: Vec<_> = connections
            .iter_mut()
            .map(|connection| {
                let plan = &plan;
                scope.spawn(move || plan.work(connection.as_mut()))
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a bench worker panicked"))
            .collect()
    });
    let ended = Instant::now();
    let client_cpu = cpu_before
        .zip(process_cpu())
        .map(|(before, after)| after.saturating_sub(before));
    let elapsed = ended.saturating_duration_since(plan.start);
    let longest_gap = plan.longest_gap(ended);
    let mut total = Tally::new();
    for tally in tallies {
        total.merge(tally);
    }
    let sent = total.succeeded + total.errors.total();
    let unsent = match config.length {
        Length::Duration(span) => config
            .schedule
            .due_within(span)
            .map_or(0, |due| due.saturating_sub(sent)),
        Length::Ops(_) => 0,
    };
    for (kind, count) in total.errors.iter().filter(|(_, count)| *count > 0) {
        warn!(
            "{count} operations failed with {kind}; the first: {}",
            total.errors.first(kind).unwrap_or_default()
        );
    }
    Ok(Report {
        target: target.describe(),
        config: config.clone(),
        elapsed,
        succeeded: total.succeeded,
        reads: total.reads,
        writes: total.writes,
        unsent,
        errors: total.errors,
        refused_keys: total.refused_keys.len() as u64,
        longest_gap,
        latency: Latency::of(&total.latency),
        client_cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A config for the tests: `workload`, `concurrency` workers, `ops` operations, 10 keys.
    fn config(workload: Workload, concurrency: usize, length: Length) -> BenchConfig {
        BenchConfig {
            workload,
            concurrency: NonZeroUsize::new(concurrency).unwrap(),
            length,
            value_size: 8,
            keys: NonZeroUsize::new(10).unwrap(),
            schedule: Schedule::closed(),
            seed: 7,
        }
    }

    /// A target in memory: remembers what was written, fails every `fail_every`-th operation
    /// with `timeout`, and reads fail with `not_found` for keys never written.
    struct Memory {
        /// Keys written and their values.
        store: Mutex<std::collections::HashMap<String, String>>,
        /// Every operation, in the order executed.
        log: Mutex<Vec<(Op, String)>>,
        /// Fail operations whose running number is a multiple of this (0: never).
        fail_every: u64,
        /// Running number of operations.
        count: AtomicU64,
    }

    impl Memory {
        /// A fresh store failing every `fail_every`-th operation.
        fn new(fail_every: u64) -> Memory {
            Memory {
                store: Mutex::default(),
                log: Mutex::default(),
                fail_every,
                count: AtomicU64::new(0),
            }
        }
    }

    /// A connection to a [`Memory`].
    struct MemoryConnection<'a>(&'a Memory);

    impl Connection for MemoryConnection<'static> {
        /// Performs `op` on the shared map.
        fn execute(&mut self, op: Op, key: &str, value: &str) -> Result<(), OpError> {
            let memory = self.0;
            memory.log.lock().unwrap().push((op, key.to_owned()));
            let n = memory.count.fetch_add(1, Ordering::Relaxed) + 1;
            if memory.fail_every > 0 && n.is_multiple_of(memory.fail_every) {
                return Err(OpError {
                    kind: ErrorKind::Timeout,
                    message: format!("operation {n} fails"),
                    cycle: Vec::new(),
                });
            }
            let mut store = memory.store.lock().unwrap();
            match op {
                Op::Write => {
                    store.insert(key.to_owned(), value.to_owned());
                    Ok(())
                }
                Op::Read if store.contains_key(key) => Ok(()),
                Op::Read | Op::Echo => Err(OpError {
                    kind: ErrorKind::NotFound,
                    message: key.to_owned(),
                    cycle: Vec::new(),
                }),
            }
        }
    }

    impl Target for &'static Memory {
        /// "memory".
        fn describe(&self) -> String {
            "memory".into()
        }

        /// A connection to the shared map.
        fn connect(&self) -> Result<Box<dyn Connection>, OpError> {
            Ok(Box::new(MemoryConnection(self)))
        }
    }

    /// A leaked in-memory target (connections borrow it for the whole test).
    fn memory(fail_every: u64) -> &'static Memory {
        Box::leak(Box::new(Memory::new(fail_every)))
    }

    /// Open loop: operation i is due i / rate after the start, and the count due within a span
    /// is the number of such instants before its end; closed loop has no due times.
    #[test]
    fn open_loop_schedule_is_evenly_spaced_at_the_rate() {
        let schedule = Schedule::open("200".parse().unwrap());
        assert_eq!(schedule.offset(0), Some(Duration::ZERO));
        assert_eq!(schedule.offset(1), Some(Duration::from_millis(5)));
        assert_eq!(schedule.offset(200), Some(Duration::from_secs(1)));
        assert_eq!(schedule.offset(1001), Some(Duration::from_millis(5005)));
        // Due within 1 s: offsets 0, 5, ..., 995 ms (200 of them); 1.001 s adds the one at 1 s.
        assert_eq!(schedule.due_within(Duration::from_secs(1)), Some(200));
        assert_eq!(schedule.due_within(Duration::from_millis(1001)), Some(201));
        let fractional = Schedule::open("3".parse().unwrap());
        assert_eq!(
            fractional.offset(1).unwrap().as_nanos(),
            333_333_333,
            "a third of a second, to the nanosecond"
        );
        assert_eq!(Schedule::closed().offset(5), None);
        assert_eq!(Schedule::closed().due_within(Duration::from_secs(1)), None);
    }

    /// Rates, ratios and durations parse at the edge; out-of-range values are refused.
    #[test]
    fn flags_parse_into_checked_values() {
        assert_eq!("0.25".parse::<ReadRatio>().unwrap().get(), 0.25);
        assert_eq!(
            "1.5".parse::<ReadRatio>(),
            Err(ParseError::RatioOutOfRange(1.5))
        );
        assert!(matches!(
            "half".parse::<ReadRatio>(),
            Err(ParseError::NotANumber(_))
        ));
        assert_eq!("1000".parse::<Rate>().unwrap().per_second(), 1000.0);
        assert!("0".parse::<Rate>().is_err());
        assert!("inf".parse::<Rate>().is_err());
        assert!("NaN".parse::<Rate>().is_err());
        assert_eq!(parse_duration("2.5"), Ok(Duration::from_millis(2500)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("-1").is_err());
    }

    /// Operation i touches `bench-(i mod N)`: consecutive operations (those in flight together)
    /// touch distinct keys, and every key is touched equally often.
    #[test]
    fn keys_cycle_through_the_key_space() {
        let keys = KeySpace::new(NonZeroUsize::new(4).unwrap());
        assert_eq!(keys.all(), ["bench-0", "bench-1", "bench-2", "bench-3"]);
        let touched: Vec<&str> = (0..9).map(|i| keys.key(i)).collect();
        assert_eq!(
            touched,
            [
                "bench-0", "bench-1", "bench-2", "bench-3", "bench-0", "bench-1", "bench-2",
                "bench-3", "bench-0"
            ]
        );
        assert_eq!(keys.key(u64::MAX), "bench-3");
    }

    /// A mix reads with the requested probability (within 1% over 100 000 operations), its
    /// choices depend only on the seed and the index, and the pure loads never mix.
    #[test]
    fn mix_reads_at_the_requested_ratio() {
        for ratio in [0.0, 0.1, 0.5, 0.9, 1.0] {
            let mix = Workload::Mix(ReadRatio(ratio));
            let reads = (0..100_000u64)
                .filter(|&i| mix.op(42, i) == Op::Read)
                .count();
            let measured = reads as f64 / 100_000.0;
            assert!(
                (measured - ratio).abs() < 0.01,
                "ratio {ratio}: measured {measured}"
            );
        }
        let mix = Workload::Mix(ReadRatio(0.5));
        let first: Vec<Op> = (0..64).map(|i| mix.op(1, i)).collect();
        let again: Vec<Op> = (0..64).map(|i| mix.op(1, i)).collect();
        let other_seed: Vec<Op> = (0..64).map(|i| mix.op(2, i)).collect();
        assert_eq!(first, again);
        assert_ne!(first, other_seed);
        assert!((0..100).all(|i| Workload::Setr.op(3, i) == Op::Write));
        assert!((0..100).all(|i| Workload::Getr.op(3, i) == Op::Read));
    }

    /// A run sends exactly `--ops` operations across its workers, preloads the key space
    /// before reading (so every read hits), counts failures by kind without stopping, and
    /// orders its percentiles.
    #[test]
    fn a_run_counts_every_operation_and_failure() {
        let target = memory(10);
        let config = config(Workload::Mix(ReadRatio(0.5)), 4, Length::Ops(500));
        let report = run(&target, &config).unwrap();
        let log = target.log.lock().unwrap();
        // The preload wrote the 10 keys first (one failure on the 10th operation: retried).
        let preload = &log[..11];
        assert!(preload.iter().all(|(op, _)| *op == Op::Write));
        assert_eq!(report.succeeded + report.failed(), 500);
        assert_eq!(report.reads + report.writes, 500);
        // Operations 20, 30, ... of the 511 fail: 50 of them in the measured 500.
        assert_eq!(report.errors.count(ErrorKind::Timeout), 50);
        assert_eq!(report.errors.count(ErrorKind::NotFound), 0, "reads hit");
        assert_eq!(report.failed(), 50);
        assert!(report.errors.first(ErrorKind::Timeout).is_some());
        let l = report.latency.unwrap();
        assert!(l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.p999 && l.p999 <= l.max);
        assert_eq!(report.unsent, 0);
        assert!(report.longest_gap <= report.elapsed, "{report:?}");
        assert!(report.client_cpu.is_some(), "getrusage answers on Linux");
    }

    /// Without a preload every read would miss: a write-only load does not preload, and a
    /// read that misses is counted as `not_found`.
    #[test]
    fn a_write_load_does_not_preload() {
        let target = memory(0);
        let report = run(&target, &config(Workload::Setr, 2, Length::Ops(30))).unwrap();
        assert_eq!(target.log.lock().unwrap().len(), 30);
        assert_eq!(report.writes, 30);
        assert_eq!(report.failed(), 0);
    }

    /// Open loop: a run paced at 1000 ops/s for 0.2 s sends the 200 operations due, and takes
    /// (at least) the 0.2 s the schedule spans.
    #[test]
    fn an_open_loop_run_follows_the_schedule() {
        let target = memory(0);
        let mut config = config(
            Workload::Setr,
            2,
            Length::Duration(Duration::from_millis(200)),
        );
        config.schedule = Schedule::open("1000".parse().unwrap());
        let report = run(&target, &config).unwrap();
        assert_eq!(report.succeeded + report.unsent, 200);
        // One success due every millisecond: the longest stretch without one is at least
        // about that (the schedule's spacing), and well below the 200 ms run.
        assert!(
            report.longest_gap >= Duration::from_micros(500)
                && report.longest_gap < Duration::from_millis(150),
            "{:?}",
            report.longest_gap
        );
        assert!(report.elapsed >= Duration::from_millis(199));
        assert!(report.succeeded > 0);
    }

    /// The `--json` object: `"ok": true`, the load, every error kind (zeros included),
    /// and ordered percentiles in microseconds.
    #[test]
    fn json_report_has_the_documented_shape() {
        let mut errors = ErrorCounts::default();
        errors.add(&OpError {
            kind: ErrorKind::Aborted,
            message: "no".into(),
            cycle: Vec::new(),
        });
        let report = Report {
            target: "trireme via view leader 127.0.0.1:39000".into(),
            config: BenchConfig {
                schedule: Schedule::open("500".parse().unwrap()),
                ..config(Workload::Mix(ReadRatio(0.25)), 4, Length::Ops(200))
            },
            elapsed: Duration::from_millis(400),
            succeeded: 199,
            reads: 50,
            writes: 150,
            unsent: 0,
            errors,
            refused_keys: 0,
            longest_gap: Duration::from_micros(2500),
            latency: Some(Latency {
                p50: Duration::from_micros(100),
                p90: Duration::from_micros(150),
                p99: Duration::from_micros(300),
                p999: Duration::from_micros(900),
                max: Duration::from_micros(1200),
                mean: Duration::from_nanos(120_050),
            }),
            client_cpu: Some(Duration::from_micros(31_000)),
        };
        let json = report.json();
        let expected = json!({
            "ok": true,
            "target": "trireme via view leader 127.0.0.1:39000",
            "op": "mix",
            "read_ratio": 0.25,
            "concurrency": 4,
            "value_size": 8,
            "keys": 10,
            "loop": "open",
            "rate": 500.0,
            "latency_from": "intended",
            "requested_ops": 200,
            "requested_duration_s": null,
            "elapsed_s": 0.4,
            "ops": 200,
            "succeeded": 199,
            "failed": 1,
            "reads": 50,
            "writes": 150,
            "unsent": 0,
            "refused_keys": 0,
            "longest_gap_ms": 2.5,
            "throughput": 497.5,
            "errors": {
                "not_found": 0, "aborted": 1, "rebalancing": 0, "no_servers": 0, "timeout": 0,
                "unreachable": 0, "bad_input": 0, "not_holder": 0, "deadlock": 0
            },
            "latency_us": {
                "p50": 100.0, "p90": 150.0, "p99": 300.0, "p999": 900.0, "max": 1200.0,
                "mean": 120.1
            },
            "client_cpu_us": 31_000,
        });
        assert_eq!(json, expected);
        let table = report.table();
        assert!(table.contains("aborted 1"), "{table}");
        assert!(table.contains("497.5 ops/s"), "{table}");
        assert!(
            table.contains("31.0 ms user+sys in this process over the run, 155.0 µs per operation"),
            "{table}"
        );
    }

    /// The CPU clock this process reads around a run moves with work done on any thread: a
    /// thread burns 30 ms of its own CPU time (measured by its thread clock, so a loaded
    /// machine only makes it take longer), and the process clock moves by at least that.
    #[test]
    fn process_cpu_counts_work_on_other_threads() {
        /// The calling thread's CPU time.
        fn thread_cpu() -> Duration {
            let mut now = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `now` is a valid timespec for the call to fill.
            let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
            assert_eq!(rc, 0, "the thread clock answers on Linux");
            Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
        }
        let before = process_cpu().expect("getrusage answers on Linux");
        std::thread::spawn(|| {
            let mut x = 1u64;
            while thread_cpu() < Duration::from_millis(30) {
                x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
            }
        })
        .join()
        .unwrap();
        let spent = process_cpu().unwrap().saturating_sub(before);
        // getrusage counts in clock ticks on some kernels: allow one 10 ms tick of rounding.
        assert!(spent >= Duration::from_millis(20), "{spent:?}");
    }

    /// Issue 17: the report counts the distinct keys refused with `rebalancing`, across
    /// workers; other failures do not count.
    #[test]
    fn refusals_are_counted_per_key() {
        let refusal = |kind| {
            Err(OpError {
                kind,
                message: "refused".into(),
                cycle: Vec::new(),
            })
        };
        let mut a = Tally::new();
        a.record(Op::Read, 3, refusal(ErrorKind::Rebalancing), Duration::ZERO);
        a.record(
            Op::Write,
            3,
            refusal(ErrorKind::Rebalancing),
            Duration::ZERO,
        );
        a.record(Op::Write, 4, refusal(ErrorKind::Aborted), Duration::ZERO);
        let mut b = Tally::new();
        b.record(Op::Read, 5, refusal(ErrorKind::Rebalancing), Duration::ZERO);
        b.record(Op::Read, 3, Ok(()), Duration::from_micros(5));
        a.merge(b);
        assert_eq!(a.refused_keys.len(), 2);
        assert_eq!(a.errors.count(ErrorKind::Rebalancing), 3);
    }
}
