//! Per-key linearizability checking for a read/write register whose written values are unique.
//!
//! # Model
//!
//! One key is a register that starts absent (`None`). A [`Write`](OpKind::Write) stores a
//! value; a [`Read`](OpKind::Read) returns the current value. Every completed operation must
//! take effect atomically at one instant of its closed interval `[invoke, complete]`; a write
//! whose outcome is unknown (`complete == None`) takes effect at one instant after `invoke`, or
//! never. Two operations are ordered in real time only when one *strictly* precedes the other
//! (`a.complete < b.invoke`); intervals that merely touch count as concurrent.
//!
//! # Algorithm
//!
//! Since written values are unique, every read names the one write it observed, and the check is
//! the polynomial "zone" test of Gibbons and Korach (*Testing shared memories*, SIAM J. Comput.
//! 1997) instead of a Wing & Gong search. Its verdict is exact for this model (no false
//! positives, no false negatives); the test module cross-checks it against an exhaustive Wing &
//! Gong search with Lowe's memoization on random small histories.
//!
//! 1. A read of a value that no operation wrote, or a read that completed before the write of
//!    its value was invoked, is a violation. Unknown-outcome writes that no read observed are
//!    dropped (never applying them is always a valid choice); observed ones are treated as
//!    completing at +infinity.
//! 2. Each write with the reads of its value forms a *cluster* (the initial absent state is a
//!    virtual write at -infinity, clustered with the reads of `None`). In any linearization a
//!    cluster is a contiguous block: its write, then its reads. Let `f` be the earliest
//!    completion and `s` the latest invocation among the cluster's operations.
//!    * If `f < s` the cluster has a *forward zone* `[f, s]`: its block must span that whole
//!      interval, so its value is the register's value throughout.
//!    * Otherwise it has a *backward zone* `[s, f]`: all its operations overlap, and the block
//!      can be collapsed to any single instant of `[s, f]`.
//! 3. The history is linearizable iff, in addition to 1., no two forward zones overlap (share
//!    more than an endpoint) and no backward zone lies strictly inside a forward zone. Necessity:
//!    two blocks cannot interleave, and the op completing at `f` of the later block would have to
//!    follow the op invoked at `s > f` of the earlier one. Sufficiency: place each forward
//!    cluster's write at `f` and each read at `max(invoke, f)`, each backward cluster at an
//!    instant of `[s, f]` outside every forward zone's interior (one exists, since the interiors
//!    are disjoint open intervals and `[s, f]` is connected); sorting by these instants, ties
//!    broken as "ending block, collapsed blocks, starting block; write first", is a legal
//!    sequence consistent with real time.
//!
//! Forward zones are sorted by start and only neighbours need comparing; each backward zone is
//! binary-searched among them. The whole check is `O(n log n)` for `n` operations.
//!
//! # Step bound
//!
//! [`Stats::steps`] counts elementary steps: one per operation scanned, per cluster classified,
//! per sort comparison, per neighbour comparison and per binary-search probe. A history of `n`
//! operations takes at most about `4n + 2n·log2(n)` steps: about 6 000 for 300 operations,
//! though the generated 300-operation histories of the tests take about 1 000.
//! [`check`] gives up with [`Violation::Inconclusive`] past [`DEFAULT_MAX_STEPS`] steps;
//! [`check_with_budget`] takes another bound.

use std::collections::HashMap;
use std::fmt;

/// The step bound of [`check`]: ten million steps, far above the `O(n log n)` steps of any
/// history a simulation produces (about 300 000 steps for 10 000 operations on one key), and
/// well under a second of work.
pub const DEFAULT_MAX_STEPS: u64 = 10_000_000;

/// What one operation on one key did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// A write of `value` (values are unique per key across the history).
    Write {
        /// The value written.
        value: String,
    },
    /// A read that returned `Some(value)` or `None` (the key was absent).
    Read {
        /// The value the read returned; `None` when the key was absent.
        result: Option<String>,
    },
}

/// One operation of the history of one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    /// The caller's operation id, used only for reporting.
    pub id: usize,
    /// The client that ran the operation, used only for reporting.
    pub client: u64,
    /// What the operation did.
    pub kind: OpKind,
    /// The virtual time in ns at which the operation was invoked.
    pub invoke: u64,
    /// The virtual time in ns at which it returned; `None` when the outcome is unknown (the
    /// client crashed or the write timed out), which only writes may have: such a write takes
    /// effect at any instant after `invoke`, or never.
    pub complete: Option<u64>,
}

/// What a successful check did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// The elementary steps taken (see the module documentation for what counts as one).
    pub steps: u64,
    /// The operations in the history.
    pub ops: usize,
    /// The clusters (a write with the reads of its value, or the initial state with the reads
    /// of `None`) that were placed.
    pub clusters: usize,
    /// How many of those clusters had a forward zone (a value current across an interval).
    pub forward_zones: usize,
    /// Unknown-outcome writes that no read observed, and that were assumed never to apply.
    pub dropped_writes: usize,
}

/// Why a history was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// The history is not linearizable; the witness names the operations that cannot all be
    /// linearized.
    NotLinearizable(Box<Witness>),
    /// The history breaks the model's assumptions, so no verdict is given.
    Malformed {
        /// The id of the offending operation.
        op: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The step budget ran out before a verdict (the history is neither accepted nor rejected).
    Inconclusive {
        /// The steps taken when the check gave up.
        steps: u64,
        /// The budget that was exceeded.
        max_steps: u64,
    },
}

/// A proof that a history is not linearizable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Witness {
    /// A read returned a value that no operation wrote.
    UnwrittenValue {
        /// The read.
        read: Op,
    },
    /// A read returned a value whose write was invoked only after the read had completed.
    ReadBeforeWrite {
        /// The read.
        read: Op,
        /// The write of the value the read returned.
        write: Op,
    },
    /// Two values must each be the register's value throughout two overlapping intervals.
    OverlappingValues {
        /// The zone that starts first.
        first: Zone,
        /// The zone that starts inside `first`.
        second: Zone,
    },
    /// A write (with the reads of its value) must take effect strictly inside an interval
    /// throughout which another value must stay current: the read ending that interval missed
    /// the write.
    Overwritten {
        /// The interval during which the older value must stay current.
        current: Zone,
        /// The write that must take effect inside it.
        write: Op,
        /// The ids of the reads that returned `write`'s value (they share its window).
        reads: Vec<usize>,
        /// The start of the window in which `write` and its reads must all take effect (the
        /// latest invocation among them).
        start: u64,
        /// The end of that window (the earliest completion among them).
        end: u64,
    },
}

/// A forward zone: an interval throughout which one value must be the register's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Zone {
    /// The operation of the value's cluster that completed first: the value must be current
    /// from its completion on. `None` when the value is the initial absent state, current from
    /// the start of the history.
    pub from: Option<Op>,
    /// The read of the value that was invoked last: the value must be current until then.
    pub until: Op,
}

impl Violation {
    /// The ids of the operations the violation names, in the order its message names them
    /// (empty for [`Violation::Inconclusive`]); useful to pick the relevant part of a trace.
    pub fn op_ids(&self) -> Vec<usize> {
        match self {
            Violation::NotLinearizable(witness) => witness.op_ids(),
            Violation::Malformed { op, .. } => vec![*op],
            Violation::Inconclusive { .. } => Vec::new(),
        }
    }
}

impl Witness {
    /// The ids of the operations the witness names, in the order its message names them.
    pub fn op_ids(&self) -> Vec<usize> {
        match self {
            Witness::UnwrittenValue { read } => vec![read.id],
            Witness::ReadBeforeWrite { read, write } => vec![read.id, write.id],
            Witness::OverlappingValues { first, second } => {
                let mut ids = first.op_ids();
                ids.extend(second.op_ids());
                ids
            }
            Witness::Overwritten {
                current,
                write,
                reads,
                ..
            } => {
                let mut ids = current.op_ids();
                ids.push(write.id);
                ids.extend(reads);
                ids
            }
        }
    }
}

impl Zone {
    /// The ids of the operations bounding the zone (`from` if any, then `until`).
    fn op_ids(&self) -> Vec<usize> {
        self.from
            .iter()
            .map(|op| op.id)
            .chain([self.until.id])
            .collect()
    }

    /// The value that must stay current: what `until` read.
    fn value(&self) -> Option<&str> {
        match &self.until.kind {
            OpKind::Read { result } => result.as_deref(),
            OpKind::Write { value } => Some(value),
        }
    }
}

/// Formats a register value for messages: the quoted value, or `absent`.
struct ShowValue<'a>(Option<&'a str>);

impl fmt::Display for ShowValue<'_> {
    /// Writes `"value"` (quoted and escaped) or `absent`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(value) => write!(f, "{value:?}"),
            None => f.write_str("absent"),
        }
    }
}

impl fmt::Display for Op {
    /// Writes e.g. `op 3 (client 2, read -> "v1", [10, 20])`; `?` marks an unknown completion.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op {} (client {}, ", self.id, self.client)?;
        match &self.kind {
            OpKind::Write { value } => write!(f, "write {value:?}")?,
            OpKind::Read { result } => write!(f, "read -> {}", ShowValue(result.as_deref()))?,
        }
        match self.complete {
            Some(complete) => write!(f, ", [{}, {}])", self.invoke, complete),
            None => write!(f, ", [{}, ?])", self.invoke),
        }
    }
}

impl fmt::Display for Zone {
    /// Writes which value must stay current over which interval, and the operations bounding it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "value {} must stay current from ",
            ShowValue(self.value())
        )?;
        match &self.from {
            // A cluster's first completion is finite: only unknown writes lack one, and a
            // zone's cluster always has a completed read.
            Some(op) => write!(f, "t={} ({op} completed)", op.complete.unwrap_or(u64::MAX))?,
            None => f.write_str("the start of the history (initial state)")?,
        }
        write!(
            f,
            " until t={} ({} was invoked)",
            self.until.invoke, self.until
        )
    }
}

impl fmt::Display for Witness {
    /// Explains why the named operations cannot all be linearized.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Witness::UnwrittenValue { read } => {
                write!(f, "{read} returned a value that no operation wrote")
            }
            Witness::ReadBeforeWrite { read, write } => write!(
                f,
                "{read} completed before its value's write {write} was invoked"
            ),
            Witness::OverlappingValues { first, second } => write!(
                f,
                "{first}, but {second}; a register holds one value at a time, so these \
                 operations cannot all be linearized: {:?}",
                self.op_ids()
            ),
            Witness::Overwritten {
                current,
                write,
                reads,
                start,
                end,
            } => {
                write!(f, "{current}, but {write}")?;
                for (n, read) in reads.iter().enumerate() {
                    let separator = match (n, reads.len()) {
                        (0, 1) => " and its read op ",
                        (0, _) => " and its reads op ",
                        _ => ", op ",
                    };
                    write!(f, "{separator}{read}")?;
                }
                write!(
                    f,
                    " must take effect within [{start}, {end}], strictly inside that interval: \
                     op {} should have seen {} or a later value",
                    current.until.id,
                    ShowValue(match &write.kind {
                        OpKind::Write { value } => Some(value),
                        OpKind::Read { result } => result.as_deref(),
                    })
                )
            }
        }
    }
}

impl fmt::Display for Violation {
    /// Writes a one-line, human-readable explanation naming the operations involved.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::NotLinearizable(witness) => write!(f, "not linearizable: {witness}"),
            Violation::Malformed { op, reason } => {
                write!(f, "malformed history: op {op}: {reason}")
            }
            Violation::Inconclusive { steps, max_steps } => write!(
                f,
                "inconclusive: the budget of {max_steps} steps ran out after {steps} steps"
            ),
        }
    }
}

impl std::error::Error for Violation {}

/// Checks that `history` (every operation on one key) is linearizable for a register that
/// starts absent, within [`DEFAULT_MAX_STEPS`] steps.
///
/// Returns what the check did, or the [`Violation`] naming the operations that cannot be
/// linearized ([`Violation::Malformed`] or [`Violation::Inconclusive`] when no verdict is
/// possible). The verdict does not depend on the order of `history`; when there are several
/// violations, the one reported is the first found, checking in this order: malformed
/// operations, reads of unwritten values, reads completed before their write's invocation,
/// overlapping forward zones (earliest first), then overwritten values.
pub fn check(history: &[Op]) -> Result<Stats, Violation> {
    check_with_budget(history, DEFAULT_MAX_STEPS)
}

/// [`check`] with a step bound of `max_steps` instead of [`DEFAULT_MAX_STEPS`]: returns
/// [`Violation::Inconclusive`] as soon as more steps would be needed.
pub fn check_with_budget(history: &[Op], max_steps: u64) -> Result<Stats, Violation> {
    let mut budget = Budget {
        steps: 0,
        max_steps,
    };
    let mut clusters = vec![Cluster::initial()];
    // Which cluster (index into `clusters`) each written value belongs to.
    let mut cluster_of: HashMap<&str, usize> = HashMap::new();
    for (i, op) in history.iter().enumerate() {
        budget.tick(1)?;
        validate(op)?;
        if let OpKind::Write { value } = &op.kind {
            if let Some(&other) = cluster_of.get(value.as_str()) {
                let first = clusters[other].write.map_or(0, |w| history[w].id);
                return Err(malformed(
                    op,
                    format!(
                        "writes {value:?}, which op {first} already wrote (values must be unique)"
                    ),
                ));
            }
            cluster_of.insert(value, clusters.len());
            clusters.push(Cluster::of_write(i, op));
        }
    }

    for (i, op) in history.iter().enumerate() {
        let OpKind::Read { result } = &op.kind else {
            continue;
        };
        budget.tick(1)?;
        let c = match result {
            None => 0,
            Some(value) => match cluster_of.get(value.as_str()) {
                Some(&c) => c,
                None => return Err(witness(Witness::UnwrittenValue { read: op.clone() })),
            },
        };
        if let Some(w) = clusters[c].write {
            let write = &history[w];
            if time(op.complete) < Time::from(write.invoke) {
                return Err(witness(Witness::ReadBeforeWrite {
                    read: op.clone(),
                    write: write.clone(),
                }));
            }
        }
        clusters[c].add(history, i);
    }

    let mut stats = Stats {
        ops: history.len(),
        ..Stats::default()
    };
    let mut forward = Vec::new();
    let mut backward = Vec::new();
    for (c, cluster) in clusters.iter().enumerate() {
        budget.tick(1)?;
        if cluster.reads.is_empty() {
            match cluster.write {
                // The initial state with no reads of `None` is a point at -infinity, which
                // nothing can contain.
                None => continue,
                Some(w) if history[w].complete.is_none() => {
                    stats.dropped_writes += 1;
                    continue;
                }
                Some(_) => {}
            }
        }
        stats.clusters += 1;
        if cluster.first_complete.0 < cluster.last_invoke.0 {
            forward.push((cluster.first_complete.0, cluster.last_invoke.0, c));
        } else {
            backward.push((cluster.last_invoke.0, cluster.first_complete.0, c));
        }
    }
    stats.forward_zones = forward.len();

    let mut comparisons = 0u64;
    forward.sort_unstable_by(|a, b| {
        comparisons += 1;
        a.cmp(b)
    });
    budget.tick(comparisons)?;
    for pair in forward.windows(2) {
        budget.tick(1)?;
        let ((_, end, first), (start, _, second)) = (pair[0], pair[1]);
        if start < end {
            return Err(witness(Witness::OverlappingValues {
                first: clusters[first].zone(history),
                second: clusters[second].zone(history),
            }));
        }
    }

    for &(start, end, c) in &backward {
        let mut probes = 1u64;
        let after = forward.partition_point(|&(from, _, _)| {
            probes += 1;
            from < start
        });
        budget.tick(probes)?;
        let Some(&(_, until, f)) = after.checked_sub(1).map(|i| &forward[i]) else {
            continue;
        };
        if end < until {
            let cluster = &clusters[c];
            // A backward cluster outside the initial one always has a write (the initial
            // cluster with reads is forward, since its first completion is -infinity).
            let write = cluster.write.map(|w| history[w].clone());
            return Err(witness(Witness::Overwritten {
                current: clusters[f].zone(history),
                write: write.expect("a backward zone belongs to a write"),
                reads: cluster.reads.iter().map(|&r| history[r].id).collect(),
                start: u64::try_from(start).expect("a backward zone starts at an invocation"),
                end: u64::try_from(end).expect("a backward zone ends at a completion"),
            }));
        }
    }
    stats.steps = budget.steps;
    Ok(stats)
}

/// A virtual time: `u64` ns, widened so that the initial state can sit at -1 (before every
/// operation) and an unknown completion at `u64::MAX + 1` (after every operation).
type Time = i128;

/// When the initial absent state takes effect: before every operation.
const BEFORE_ALL: Time = -1;
/// When an unknown-outcome write completes: after every operation.
const AFTER_ALL: Time = u64::MAX as Time + 1;

/// The completion time of an operation as a [`Time`]: `complete`, or [`AFTER_ALL`] if unknown.
fn time(complete: Option<u64>) -> Time {
    complete.map_or(AFTER_ALL, Time::from)
}

/// Counts steps against a bound.
struct Budget {
    /// The steps taken so far.
    steps: u64,
    /// The bound on `steps`.
    max_steps: u64,
}

impl Budget {
    /// Records `steps` more steps; fails with [`Violation::Inconclusive`] past the bound.
    fn tick(&mut self, steps: u64) -> Result<(), Violation> {
        self.steps = self.steps.saturating_add(steps);
        if self.steps > self.max_steps {
            return Err(Violation::Inconclusive {
                steps: self.steps,
                max_steps: self.max_steps,
            });
        }
        Ok(())
    }
}

/// A write and the reads of its value (or the initial state and the reads of `None`), with
/// the extreme times that bound its zone.
struct Cluster {
    /// The history index of the write; `None` for the initial state.
    write: Option<usize>,
    /// The history indices of the reads of the write's value, in history order.
    reads: Vec<usize>,
    /// The earliest completion among the cluster's operations, with the history index of the
    /// operation (`None` for the initial state).
    first_complete: (Time, Option<usize>),
    /// The latest invocation among the cluster's operations, with the history index of the
    /// operation (`None` for the initial state).
    last_invoke: (Time, Option<usize>),
}

impl Cluster {
    /// The cluster of the initial absent state: a virtual write at [`BEFORE_ALL`].
    fn initial() -> Self {
        Cluster {
            write: None,
            reads: Vec::new(),
            first_complete: (BEFORE_ALL, None),
            last_invoke: (BEFORE_ALL, None),
        }
    }

    /// The cluster of `write`, found at history index `index`, before any read is added.
    fn of_write(index: usize, write: &Op) -> Self {
        Cluster {
            write: Some(index),
            reads: Vec::new(),
            first_complete: (time(write.complete), None),
            last_invoke: (Time::from(write.invoke), None),
        }
    }

    /// Adds the read at history index `read`, widening the cluster's zone.
    fn add(&mut self, history: &[Op], read: usize) {
        let op = &history[read];
        let complete = time(op.complete);
        if complete < self.first_complete.0 {
            self.first_complete = (complete, Some(read));
        }
        // `>=`: on a tie with the write's invocation, the zone ends at a read.
        let invoke = Time::from(op.invoke);
        if invoke >= self.last_invoke.0 {
            self.last_invoke = (invoke, Some(read));
        }
        self.reads.push(read);
    }

    /// The forward zone of this cluster, for a witness.
    fn zone(&self, history: &[Op]) -> Zone {
        let from = self
            .first_complete
            .1
            .or(self.write)
            .map(|i| history[i].clone());
        let until = self
            .last_invoke
            .1
            .or(self.write)
            .map(|i| history[i].clone());
        Zone {
            from,
            until: until.expect("a forward zone ends at a read's invocation"),
        }
    }
}

/// Rejects an operation the model has no meaning for: a completion before the invocation, or a
/// read without a completion.
fn validate(op: &Op) -> Result<(), Violation> {
    match (&op.kind, op.complete) {
        (_, Some(complete)) if complete < op.invoke => Err(malformed(
            op,
            format!(
                "completes at {complete}, before its invocation at {}",
                op.invoke
            ),
        )),
        (OpKind::Read { .. }, None) => Err(malformed(
            op,
            "is a read without a completion (pass only reads that returned)".to_string(),
        )),
        _ => Ok(()),
    }
}

/// A [`Violation::Malformed`] for `op`.
fn malformed(op: &Op, reason: String) -> Violation {
    Violation::Malformed { op: op.id, reason }
}

/// A [`Violation::NotLinearizable`] with `witness`.
fn witness(witness: Witness) -> Violation {
    Violation::NotLinearizable(Box::new(witness))
}

#[cfg(test)]
mod tests {
    //! Hand-written accepted and rejected histories, property tests against generated
    //! executions and against an exhaustive reference search, and a step-budget test.

    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;
    use std::time::Instant;

    /// A completed write of `value` by `client` over `[invoke, complete]`, with id `id`.
    fn w(id: usize, client: u64, value: &str, invoke: u64, complete: u64) -> Op {
        Op {
            id,
            client,
            kind: OpKind::Write {
                value: value.to_string(),
            },
            invoke,
            complete: Some(complete),
        }
    }

    /// An unknown-outcome write of `value` by `client` invoked at `invoke`, with id `id`.
    fn w_unknown(id: usize, client: u64, value: &str, invoke: u64) -> Op {
        Op {
            complete: None,
            ..w(id, client, value, invoke, invoke)
        }
    }

    /// A read by `client` over `[invoke, complete]` that returned `result`, with id `id`.
    fn r(id: usize, client: u64, result: Option<&str>, invoke: u64, complete: u64) -> Op {
        Op {
            id,
            client,
            kind: OpKind::Read {
                result: result.map(str::to_string),
            },
            invoke,
            complete: Some(complete),
        }
    }

    /// Asserts that `history` is accepted, and that the reference search agrees.
    fn assert_accepted(history: &[Op]) -> Stats {
        let stats = check(history).unwrap_or_else(|v| panic!("rejected: {v}"));
        assert!(
            reference_linearizable(history),
            "the reference search rejects it"
        );
        stats
    }

    /// Asserts that `history` is rejected as not linearizable, that the reference search
    /// agrees, and that the message names every id of `ids`; returns the witness.
    fn assert_rejected(history: &[Op], ids: &[usize]) -> Witness {
        assert!(
            !reference_linearizable(history),
            "the reference search accepts it"
        );
        match check(history) {
            Err(Violation::NotLinearizable(witness)) => {
                let message = Violation::NotLinearizable(witness.clone()).to_string();
                for id in ids {
                    assert!(witness.op_ids().contains(id), "{id} not named: {message}");
                    assert!(names(&message, *id), "{id} not in the message: {message}");
                }
                *witness
            }
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    /// Whether `message` names operation `id` (as `op <id>` not followed by a digit).
    fn names(message: &str, id: usize) -> bool {
        let needle = format!("op {id}");
        message
            .match_indices(&needle)
            .any(|(at, _)| !message[at + needle.len()..].starts_with(|c: char| c.is_ascii_digit()))
    }

    /// Decides linearizability by exhaustive search: Wing & Gong's algorithm with Lowe's
    /// memoization of (set of linearized ops, register value). Exponential in the worst
    /// case, so only for the small histories of the cross-checks (at most 64 operations).
    ///
    /// An operation may be linearized next when no other unlinearized completed operation
    /// strictly precedes it; unknown-outcome writes may be left out. Returns whether every
    /// completed operation can be linearized.
    fn reference_linearizable(history: &[Op]) -> bool {
        assert!(
            history.len() <= 64,
            "the reference search is for small histories"
        );
        let completed = history
            .iter()
            .enumerate()
            .filter(|(_, op)| op.complete.is_some())
            .fold(0u64, |set, (i, _)| set | 1 << i);
        let mut failed = HashSet::new();
        search(history, completed, 0, None, &mut failed)
    }

    /// One level of [`reference_linearizable`]: whether, with the ops of `done` linearized and
    /// the register holding `value`, the rest of the `required` ops can be linearized.
    /// `failed` memoizes the (done, value) states known to fail.
    fn search<'a>(
        history: &'a [Op],
        required: u64,
        done: u64,
        value: Option<&'a str>,
        failed: &mut HashSet<(u64, Option<&'a str>)>,
    ) -> bool {
        if done & required == required {
            return true;
        }
        if !failed.insert((done, value)) {
            return false;
        }
        let pending = |i: &usize| done & (1 << i) == 0;
        let horizon = (0..history.len())
            .filter(pending)
            .filter_map(|i| history[i].complete)
            .min()
            .unwrap_or(u64::MAX);
        (0..history.len())
            .filter(pending)
            .filter(|&i| history[i].invoke <= horizon)
            .any(|i| match &history[i].kind {
                OpKind::Write { value: new } => {
                    search(history, required, done | 1 << i, Some(new), failed)
                }
                OpKind::Read { result } => {
                    result.as_deref() == value
                        && search(history, required, done | 1 << i, value, failed)
                }
            })
    }

    /// A tiny deterministic random number generator (splitmix64) for generated histories.
    struct Rng(u64);

    impl Rng {
        /// The next 64 random bits.
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// A number in `low..high` (`low` when the range is empty).
        fn range(&mut self, low: u64, high: u64) -> u64 {
            low + self.next() % (high - low).max(1)
        }

        /// `true` with probability `percent`%.
        fn chance(&mut self, percent: u64) -> bool {
            self.next() % 100 < percent
        }
    }

    /// Generates a linearizable history of `ops` operations on one key by `clients` sequential
    /// clients, from `seed`.
    ///
    /// Each client invokes one operation at a time (half writes of fresh values, half reads),
    /// picks its linearization point inside its interval and completes after it. A write
    /// becomes unknown-outcome with probability `unknown_percent`%: then it takes effect at a
    /// random later instant or never, and its client moves on after a timeout. Reads return
    /// the value of the sequential execution ordered by linearization points.
    fn generate(seed: u64, ops: usize, clients: u64, unknown_percent: u64) -> Vec<Op> {
        let mut rng = Rng(seed);
        let mut free_at: Vec<u64> = (0..clients).map(|_| rng.range(0, 50)).collect();
        let mut history = Vec::with_capacity(ops);
        let mut points = Vec::new();
        for id in 0..ops {
            let client = (0..clients)
                .min_by_key(|&c| (free_at[c as usize], c))
                .expect("at least one client");
            let invoke = free_at[client as usize];
            let point = invoke + rng.range(1, 100);
            let mut complete = Some(point + rng.range(0, 100));
            let kind = if rng.chance(50) {
                if rng.chance(unknown_percent) {
                    complete = None;
                    if rng.chance(50) {
                        points.push((invoke + rng.range(0, 1000), id));
                    }
                } else {
                    points.push((point, id));
                }
                OpKind::Write {
                    value: format!("v{id}"),
                }
            } else {
                points.push((point, id));
                OpKind::Read { result: None }
            };
            free_at[client as usize] = match complete {
                Some(complete) => complete + rng.range(0, 50),
                None => invoke + rng.range(100, 300),
            };
            history.push(Op {
                id,
                client,
                kind,
                invoke,
                complete,
            });
        }
        points.sort_unstable();
        let mut value = None;
        for (_, i) in points {
            match &mut history[i].kind {
                OpKind::Write { value: written } => value = Some(written.clone()),
                OpKind::Read { result } => *result = value.clone(),
            }
        }
        history
    }

    /// The (read, newer write, stale value) triples of `history` whose mutation must be
    /// rejected: a completed read, a completed write that completed before the read was
    /// invoked, and a value older than that write (`None`, or the value of a completed write
    /// that completed before the newer write was invoked). The newer write must take effect
    /// after the stale value's write and before the read, whatever else is concurrent.
    fn stale_mutations(history: &[Op]) -> Vec<(usize, usize, Option<String>)> {
        let completed_writes = || {
            history
                .iter()
                .enumerate()
                .filter_map(|(i, op)| match (&op.kind, op.complete) {
                    (OpKind::Write { value }, Some(complete)) => {
                        Some((i, value, op.invoke, complete))
                    }
                    _ => None,
                })
        };
        let mut found = Vec::new();
        for (read, op) in history.iter().enumerate() {
            let OpKind::Read { .. } = op.kind else {
                continue;
            };
            for (newer, _, newer_invoke, newer_complete) in completed_writes() {
                if newer_complete >= op.invoke {
                    continue;
                }
                found.push((read, newer, None));
                for (_, value, _, complete) in completed_writes() {
                    if complete < newer_invoke {
                        found.push((read, newer, Some(value.clone())));
                    }
                }
            }
        }
        found
    }

    /// The largest number of completed operations in progress at one instant.
    fn max_concurrency(history: &[Op]) -> usize {
        let mut events: Vec<(u64, i8)> = history
            .iter()
            .filter_map(|op| op.complete.map(|c| [(op.invoke, 1), (c + 1, -1)]))
            .flatten()
            .collect();
        events.sort_unstable_by_key(|&(t, delta)| (t, delta));
        let mut now = 0i64;
        let mut max = 0;
        for (_, delta) in events {
            now += i64::from(delta);
            max = max.max(now);
        }
        usize::try_from(max).expect("non-negative")
    }

    /// An empty history is linearizable.
    #[test]
    fn empty_history_is_accepted() {
        assert_eq!(assert_accepted(&[]).clusters, 0);
    }

    /// Non-overlapping writes and reads, each read seeing the last write.
    #[test]
    fn sequential_history_is_accepted() {
        let history = [
            r(0, 0, None, 0, 5),
            w(1, 0, "a", 10, 20),
            r(2, 1, Some("a"), 30, 40),
            w(3, 1, "b", 50, 60),
            r(4, 0, Some("b"), 70, 80),
            r(5, 1, Some("b"), 90, 95),
        ];
        let stats = assert_accepted(&history);
        assert_eq!((stats.ops, stats.clusters), (6, 3));
    }

    /// A read overlapping a write may return the old value or the new one, even when two
    /// concurrent reads see them in the opposite order of their invocations.
    #[test]
    fn concurrent_read_sees_old_or_new_value() {
        let old = [
            w(0, 0, "a", 0, 10),
            w(1, 0, "b", 20, 40),
            r(2, 1, Some("a"), 25, 30),
        ];
        assert_accepted(&old);
        let new = [
            w(0, 0, "a", 0, 10),
            w(1, 0, "b", 20, 40),
            r(2, 1, Some("b"), 25, 30),
        ];
        assert_accepted(&new);
        let both = [
            w(0, 0, "a", 0, 10),
            w(1, 0, "b", 20, 40),
            r(2, 1, Some("b"), 21, 30),
            r(3, 2, Some("a"), 22, 35),
        ];
        assert_accepted(&both);
    }

    /// An unknown-outcome write may take effect long after its client gave up on it.
    #[test]
    fn unknown_write_observed_later_is_accepted() {
        let history = [
            w(0, 0, "a", 0, 10),
            w_unknown(1, 1, "b", 20),
            r(2, 2, Some("a"), 100, 110),
            r(3, 2, Some("b"), 200, 210),
            r(4, 0, Some("b"), 300, 310),
        ];
        assert_accepted(&history);
    }

    /// An unknown-outcome write may never take effect.
    #[test]
    fn unknown_write_never_observed_is_accepted() {
        let history = [
            w(0, 0, "a", 0, 10),
            w_unknown(1, 1, "b", 20),
            r(2, 2, Some("a"), 100, 110),
            r(3, 2, Some("a"), 200, 210),
        ];
        let stats = assert_accepted(&history);
        assert_eq!(stats.dropped_writes, 1);
    }

    /// Reads of an absent key before (and concurrently with) the first write.
    #[test]
    fn read_of_none_before_any_write_is_accepted() {
        let history = [
            r(0, 0, None, 0, 5),
            w(1, 1, "a", 10, 20),
            r(2, 0, None, 12, 15),
            r(3, 0, Some("a"), 30, 35),
        ];
        assert_accepted(&history);
    }

    /// Intervals are closed: a read invoked at the very instant a write completed may still
    /// be ordered before it, one invoked a nanosecond later may not.
    #[test]
    fn touching_intervals_are_concurrent() {
        assert_accepted(&[w(0, 0, "a", 0, 10), r(1, 1, None, 10, 20)]);
        assert_rejected(&[w(0, 0, "a", 0, 10), r(1, 1, None, 11, 20)], &[0, 1]);
    }

    /// Two values whose must-be-current intervals share only an endpoint: at that instant
    /// the read of the first is linearized just before the write of the second.
    #[test]
    fn values_current_over_touching_intervals_are_accepted() {
        let touching = [
            w(0, 0, "a", 0, 10),
            r(1, 1, Some("a"), 20, 30),
            w(2, 2, "b", 15, 20),
            r(3, 1, Some("b"), 40, 50),
        ];
        assert_eq!(assert_accepted(&touching).forward_zones, 2);
        let overlapping = [
            w(0, 0, "a", 0, 10),
            r(1, 1, Some("a"), 20, 30),
            w(2, 2, "b", 15, 19),
            r(3, 1, Some("b"), 40, 50),
        ];
        assert_rejected(&overlapping, &[0, 1, 2, 3]);
    }

    /// A read that began after a write was acknowledged returns the value before it.
    #[test]
    fn stale_read_after_acknowledged_write_is_rejected() {
        let history = [
            w(0, 0, "a", 0, 10),
            w(1, 1, "b", 20, 30),
            r(2, 2, Some("a"), 40, 50),
        ];
        let witness = assert_rejected(&history, &[0, 1, 2]);
        let Witness::Overwritten { current, write, .. } = &witness else {
            panic!("expected an overwritten value, got {witness:?}");
        };
        assert_eq!((current.until.id, write.id), (2, 1));
    }

    /// A read returns a value that nobody wrote.
    #[test]
    fn read_of_unwritten_value_is_rejected() {
        let history = [w(0, 0, "a", 0, 10), r(1, 1, Some("ghost"), 20, 30)];
        let witness = assert_rejected(&history, &[1]);
        assert!(
            matches!(witness, Witness::UnwrittenValue { .. }),
            "{witness:?}"
        );
    }

    /// Two sequential reads see `b` and then `a`, though `b`'s write completed after `a`'s
    /// and before the first read.
    #[test]
    fn reads_going_back_in_time_are_rejected() {
        let history = [
            w(0, 0, "a", 0, 10),
            w(1, 0, "b", 20, 30),
            r(2, 1, Some("b"), 40, 50),
            r(3, 1, Some("a"), 60, 70),
        ];
        let witness = assert_rejected(&history, &[0, 1, 2, 3]);
        assert!(
            matches!(witness, Witness::OverlappingValues { .. }),
            "{witness:?}"
        );
    }

    /// A read of an absent key after a write completed, and after an observed unknown write.
    #[test]
    fn read_of_none_after_completed_write_is_rejected() {
        assert_rejected(&[w(0, 0, "a", 0, 10), r(1, 1, None, 20, 30)], &[0, 1]);
        let observed = [
            w_unknown(0, 0, "a", 0),
            r(1, 1, Some("a"), 20, 30),
            r(2, 1, None, 40, 50),
        ];
        assert_rejected(&observed, &[1, 2]);
    }

    /// A read completed before the write of its value was invoked.
    #[test]
    fn write_observed_before_its_invocation_is_rejected() {
        let history = [r(0, 1, Some("a"), 0, 10), w(1, 0, "a", 20, 30)];
        let witness = assert_rejected(&history, &[0, 1]);
        assert!(
            matches!(witness, Witness::ReadBeforeWrite { .. }),
            "{witness:?}"
        );
        let unknown = [r(0, 1, Some("a"), 0, 10), w_unknown(1, 0, "a", 20)];
        assert_rejected(&unknown, &[0, 1]);
    }

    /// Histories the model has no meaning for get no verdict.
    #[test]
    fn malformed_histories_are_reported() {
        let duplicate = [w(0, 0, "a", 0, 10), w(1, 0, "a", 20, 30)];
        let backwards = [w(0, 0, "a", 10, 5)];
        let unanswered = [Op {
            complete: None,
            ..r(0, 0, None, 0, 0)
        }];
        for (history, id) in [(&duplicate[..], 1), (&backwards, 0), (&unanswered, 0)] {
            match check(history) {
                Err(v @ Violation::Malformed { .. }) => assert_eq!(v.op_ids(), [id], "{v}"),
                other => panic!("expected a malformed history, got {other:?}"),
            }
        }
    }

    /// A budget smaller than the work needed gives an inconclusive result, not a verdict.
    #[test]
    fn exhausted_budget_is_inconclusive() {
        let history = generate(7, 50, 4, 30);
        let steps = check(&history)
            .expect("generated histories are linearizable")
            .steps;
        assert_eq!(
            check_with_budget(&history, steps).map(|s| s.steps),
            Ok(steps)
        );
        match check_with_budget(&history, steps - 1) {
            Err(v @ Violation::Inconclusive { .. }) => assert!(v.op_ids().is_empty()),
            other => panic!("expected an inconclusive result, got {other:?}"),
        }
    }

    /// The step budget for one history of 300 operations. The generated ones take about
    /// 1 000 to 1 100 steps; the worst case `4n + 2n·log2(n)` for `n = 300` is about 6 100.
    const STEPS_FOR_300_OPS: u64 = 2_000;

    /// 300 operations by 8 clients, about 30% of them unknown-outcome writes (60% of the
    /// writes), check within [`STEPS_FOR_300_OPS`] steps: accepted as generated, and rejected
    /// once a read is made stale. Wall time is only printed (`--no-capture`), not asserted.
    #[test]
    fn three_hundred_ops_by_eight_clients_check_within_the_step_budget() {
        let mut slowest = std::time::Duration::ZERO;
        let mut unknown_total = 0;
        for seed in 0..20 {
            let mut history = generate(seed, 300, 8, 60);
            let unknown = history.iter().filter(|op| op.complete.is_none()).count();
            assert!(
                unknown * 100 >= history.len() * 20,
                "{unknown} unknown writes"
            );
            unknown_total += unknown;
            assert!(max_concurrency(&history) >= 7, "not concurrent enough");

            let started = Instant::now();
            let result = check_with_budget(&history, STEPS_FOR_300_OPS);
            slowest = slowest.max(started.elapsed());
            let stats = result.unwrap_or_else(|v| panic!("seed {seed}: {v}"));
            assert!(stats.forward_zones > 0, "seed {seed}: {stats:?}");
            eprintln!(
                "seed {seed}: accepted in {:?}: {stats:?}",
                started.elapsed()
            );

            let mutations = stale_mutations(&history);
            let (read, _, stale) = mutations[mutations.len() / 2].clone();
            history[read].kind = OpKind::Read { result: stale };
            let started = Instant::now();
            let result = check_with_budget(&history, STEPS_FOR_300_OPS);
            slowest = slowest.max(started.elapsed());
            assert!(
                matches!(result, Err(Violation::NotLinearizable(_))),
                "seed {seed}: {result:?}"
            );
        }
        assert!(
            unknown_total * 100 >= 20 * 300 * 28,
            "{unknown_total} unknown writes"
        );
        eprintln!(
            "slowest check of a 300-op history: {slowest:?}; {:.1}% unknown-outcome writes",
            unknown_total as f64 / 60.0
        );
    }

    /// Applies `changes` random changes to `history`, from `seed`: a read returns another
    /// written value (or `None`), an operation's interval moves, or a write's outcome becomes
    /// unknown (or known again).
    fn perturb(history: &mut [Op], seed: u64, changes: usize) {
        let mut rng = Rng(!seed);
        let mut values: Vec<Option<String>> = history
            .iter()
            .filter_map(|op| match &op.kind {
                OpKind::Write { value } => Some(Some(value.clone())),
                OpKind::Read { .. } => None,
            })
            .collect();
        values.push(None);
        for _ in 0..changes {
            let len = history.len() as u64;
            let op = &mut history[rng.range(0, len) as usize];
            match (rng.range(0, 3), &mut op.kind) {
                (0, OpKind::Read { result }) => {
                    *result = values[rng.range(0, values.len() as u64) as usize].clone();
                }
                (1, _) => {
                    let shift = rng.range(0, 200);
                    if rng.chance(50) {
                        op.invoke += shift;
                        op.complete = op.complete.map(|c| c + shift);
                    } else {
                        op.invoke = op.invoke.saturating_sub(shift);
                        op.complete = op.complete.map(|c| c.saturating_sub(shift));
                    }
                }
                (2, OpKind::Write { .. }) => {
                    op.complete = match op.complete {
                        Some(_) => None,
                        None => Some(op.invoke + rng.range(0, 200)),
                    };
                }
                _ => {}
            }
        }
    }

    /// A random history of `ops` operations on one key from `seed`, mostly not linearizable:
    /// invocations in `0..40`, durations in `0..15`, half writes (a third of them with unknown
    /// outcome), reads returning any written value or `None`.
    fn random_history(seed: u64, ops: usize) -> Vec<Op> {
        let mut rng = Rng(seed);
        let writes = (0..ops).filter(|_| rng.chance(50)).count() as u64;
        (0..ops)
            .map(|id| {
                let invoke = rng.range(0, 40);
                let complete = Some(invoke + rng.range(0, 15));
                let client = id as u64;
                if (id as u64) < writes {
                    let value = format!("v{id}");
                    let complete = if rng.chance(33) { None } else { complete };
                    Op {
                        complete,
                        ..w(id, client, &value, invoke, 0)
                    }
                } else {
                    let value = rng.range(0, writes + 1);
                    let result = (value < writes).then(|| format!("v{value}"));
                    Op {
                        complete,
                        ..r(id, client, result.as_deref(), invoke, 0)
                    }
                }
            })
            .collect()
    }

    /// Checks that [`check`] and [`reference_linearizable`] agree on `history`, and that a
    /// rejection is a [`Violation::NotLinearizable`] naming operations of the history.
    fn assert_agrees(history: &[Op]) -> Result<(), TestCaseError> {
        let expected = reference_linearizable(history);
        let verdict = check(history);
        prop_assert_eq!(verdict.is_ok(), expected, "{:?}: {:?}", history, verdict);
        if let Err(v) = verdict {
            prop_assert!(matches!(v, Violation::NotLinearizable(_)), "{}", v);
            for id in v.op_ids() {
                prop_assert!(history.iter().any(|op| op.id == id), "{}", v);
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Histories generated from a random sequential execution are accepted, in any order.
        #[test]
        fn generated_histories_are_accepted(
            seed in any::<u64>(),
            ops in 0usize..120,
            clients in 1u64..=8,
            unknown_percent in 0u64..=60,
        ) {
            let mut history = generate(seed, ops, clients, unknown_percent);
            let verdict = check(&history);
            prop_assert!(verdict.is_ok(), "{}", verdict.unwrap_err());
            history.reverse();
            // Only the step count (sort comparisons) may depend on the order.
            let shape = |stats: Stats| (stats.clusters, stats.forward_zones, stats.dropped_writes);
            prop_assert_eq!(check(&history).map(shape), verdict.map(shape));
        }

        /// Making a completed read that follows a completed write return an older value is
        /// always rejected, and the message names the read.
        #[test]
        fn stale_reads_are_rejected(
            seed in any::<u64>(),
            ops in 4usize..120,
            clients in 1u64..=8,
            unknown_percent in 0u64..=60,
            choice in any::<prop::sample::Index>(),
        ) {
            let mut history = generate(seed, ops, clients, unknown_percent);
            let mutations = stale_mutations(&history);
            prop_assume!(!mutations.is_empty());
            let (read, _, stale) = mutations[choice.index(mutations.len())].clone();
            history[read].kind = OpKind::Read { result: stale };
            match check(&history) {
                Err(v @ Violation::NotLinearizable(_)) => {
                    prop_assert!(names(&v.to_string(), read), "{}", v);
                }
                other => prop_assert!(false, "read {} made stale, got {:?}", read, other),
            }
        }

    }

    proptest! {
        // The cross-checks are cheap (a few microseconds each) and worth many cases.
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// On small generated histories, perturbed `changes` times, the checker and the
        /// exhaustive search agree.
        #[test]
        fn agrees_with_the_reference_on_perturbed_histories(
            seed in any::<u64>(),
            ops in 1usize..12,
            clients in 1u64..=4,
            unknown_percent in 0u64..=60,
            changes in 0usize..3,
        ) {
            let mut history = generate(seed, ops, clients, unknown_percent);
            perturb(&mut history, seed, changes);
            assert_agrees(&history)?;
        }

        /// On small random histories (mostly not linearizable, with many equal times), the
        /// checker and the exhaustive search agree.
        #[test]
        fn agrees_with_the_reference_on_random_histories(
            seed in any::<u64>(),
            ops in 1usize..10,
        ) {
            assert_agrees(&random_history(seed, ops))?;
        }
    }
}
