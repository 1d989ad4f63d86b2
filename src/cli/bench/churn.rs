//! Churn: reads and writes on every key while the membership changes, sorted by whether the
//! view change moved the key (issue 17).
//!
//! [`Load`] runs worker threads that go round a key space doing `getr` and `setr` (each a
//! fresh [`Client`], as one `client` command: a view fetched from the view leader, then the
//! operation), and records every operation's key, kind, start, end and error kind. Once the
//! membership changed, [`analyse`] splits the keys by whether their replica set differs
//! between the view before and the view after, and reports what the users of each saw:
//! failures on keys the change did not move (the goal is none), how long after the view change
//! moved keys were still refused (their refusal window), and the longest stretch during which
//! no operation on any key succeeded. The benchmark (`cargo bench --bench rebalance`) prints
//! these figures; a cluster test bounds them generously.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::client::{Client, SetrHooks};
use crate::placement::ring::Ring;
use crate::placement::view::{ServerId, View};
use crate::runtime::net::Handle;
use crate::wire::message::ErrorKind;

/// One operation of the load and how it ended.
#[derive(Clone, Debug)]
pub struct Record {
    /// The key's index in the key space.
    pub key: usize,
    /// A `setr` (else a `getr`).
    pub write: bool,
    /// When it was started.
    pub start: Instant,
    /// When it ended.
    pub end: Instant,
    /// Its error kind, if it failed.
    pub error: Option<ErrorKind>,
    /// Its error message, if it failed (empty otherwise).
    pub message: String,
}

/// Worker threads doing `getr` and `setr` on a key space until stopped.
#[derive(Debug)]
pub struct Load {
    /// Set to stop the workers.
    stop: Arc<AtomicBool>,
    /// Operations finished so far, by every worker.
    done: Arc<AtomicUsize>,
    /// The workers, each returning its records.
    workers: Vec<JoinHandle<Vec<Record>>>,
}

impl Load {
    /// Starts `workers` threads sending through `handle` to the view leader at `viewleader`:
    /// worker `w` goes round the keys `w, w + workers, ...` of `keys` (every key, from `w` on,
    /// when there are fewer keys than workers), alternating `getr` and
    /// `setr` of a `value_len`-byte value, each operation bounded by `timeout`.
    pub fn start(
        handle: &Handle,
        viewleader: SocketAddr,
        keys: Arc<Vec<String>>,
        workers: usize,
        value_len: usize,
        timeout: Duration,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let workers = (0..workers)
            .map(|w| {
                let (handle, keys) = (handle.clone(), keys.clone());
                let (stop, done) = (stop.clone(), done.clone());
                std::thread::spawn(move || {
                    let shape = (w, workers, value_len);
                    work(&handle, viewleader, &keys, shape, timeout, (&stop, &done))
                })
            })
            .collect();
        Load {
            stop,
            done,
            workers,
        }
    }

    /// How many operations have finished so far (to wait for some progress).
    pub fn done(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    /// Stops the workers and returns every operation's record, in no particular order.
    pub fn stop(self) -> Vec<Record> {
        self.stop.store(true, Ordering::Relaxed);
        self.workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    }
}

/// One worker's loop (see [`Load::start`]; `(w, of, value_len)`: this worker's number, how
/// many there are, the value size): operations until `stop`, each counted in `done`,
/// returning their records.
fn work(
    handle: &Handle,
    viewleader: SocketAddr,
    keys: &[String],
    (w, of, value_len): (usize, usize, usize),
    timeout: Duration,
    (stop, done): (&AtomicBool, &AtomicUsize),
) -> Vec<Record> {
    let mut records = Vec::new();
    // Disjoint shares while there are keys enough; otherwise every worker goes round every
    // key from its own starting point (writers of one key then contend, as clients do).
    let mine: Vec<usize> = if keys.len() >= of {
        (w..keys.len()).step_by(of.max(1)).collect()
    } else {
        (0..keys.len()).map(|i| (i + w) % keys.len()).collect()
    };
    let mut round = 0usize;
    while !stop.load(Ordering::Relaxed) && !mine.is_empty() {
        let key = mine[round % mine.len()];
        let write = (round / mine.len()) % 2 == 1;
        round += 1;
        let mut client = Client::new(
            handle.clone(),
            Some(viewleader),
            Vec::new(),
            viewleader,
            Some(timeout),
        )
        .with_operations_on_driver();
        let start = Instant::now();
        let failure = if write {
            let value = format!("{round:0>value_len$}");
            client.setr(&keys[key], &value, SetrHooks::default()).err()
        } else {
            client.getr(&keys[key]).err()
        };
        records.push(Record {
            key,
            write,
            start,
            end: Instant::now(),
            error: failure.as_ref().map(|e| e.kind),
            message: failure.map(|e| e.message).unwrap_or_default(),
        });
        done.fetch_add(1, Ordering::Relaxed);
    }
    records
}

/// What the users of the moved and the unmoved keys saw (see [`analyse`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Keys whose replica set is the same before and after.
    pub unmoved_keys: usize,
    /// Keys whose replica set changed.
    pub moved_keys: usize,
    /// Operations on unmoved keys.
    pub unmoved_ops: usize,
    /// Failed operations on unmoved keys, by error kind (the goal: none).
    pub unmoved_failures: BTreeMap<String, usize>,
    /// The first few of those failures: key, `getr`/`setr`, message.
    pub unmoved_examples: Vec<String>,
    /// Operations on moved keys.
    pub moved_ops: usize,
    /// Failed operations on moved keys, by error kind.
    pub moved_failures: BTreeMap<String, usize>,
    /// Moved keys that were refused at least once.
    pub moved_keys_refused: usize,
    /// Failed `getr`s, on any key.
    pub failed_reads: usize,
    /// From the view change to the end of the last failed operation on a moved key (zero if
    /// none failed after it).
    pub moved_window: Duration,
    /// The longest stretch, within the load, with no operation succeeding on any key.
    pub longest_gap: Duration,
}

impl Report {
    /// One line of figures.
    pub fn line(&self) -> String {
        format!(
            "unmoved keys {}: {} ops, failures {:?}; moved keys {}: {} ops, failures {:?}, \
             {} keys refused, refusal window {} ms after the view change; failed getr {}; \
             longest stretch with no success {} ms",
            self.unmoved_keys,
            self.unmoved_ops,
            self.unmoved_failures,
            self.moved_keys,
            self.moved_ops,
            self.moved_failures,
            self.moved_keys_refused,
            self.moved_window.as_millis(),
            self.failed_reads,
            self.longest_gap.as_millis()
        )
    }
}

/// Sorts the `records` of a load on `keys` by whether `before` → `after` changed each key's
/// replica set; `changed` is when the view changed (as the view leader published it, or as
/// near as the caller could tell).
pub fn analyse(
    records: &[Record],
    keys: &[String],
    before: &View,
    after: &View,
    changed: Instant,
) -> Report {
    let (old, new) = (Ring::new(before), Ring::new(after));
    let set = |ring: &Ring, view: &View, key: &str| -> BTreeSet<ServerId> {
        ring.replicas(key, view.replicas as usize)
            .iter()
            .map(|m| m.id)
            .collect()
    };
    let moved: Vec<bool> = keys
        .iter()
        .map(|k| set(&old, before, k) != set(&new, after, k))
        .collect();
    let mut report = Report {
        moved_keys: moved.iter().filter(|&&m| m).count(),
        unmoved_keys: moved.iter().filter(|&&m| !m).count(),
        ..Report::default()
    };
    let mut refused = BTreeSet::new();
    for r in records {
        report.failed_reads += usize::from(!r.write && r.error.is_some());
        let failures = if moved[r.key] {
            report.moved_ops += 1;
            if let Some(kind) = r.error {
                refused.insert(r.key);
                if r.end > changed {
                    report.moved_window = report.moved_window.max(r.end - changed);
                }
                Some((kind, &mut report.moved_failures))
            } else {
                None
            }
        } else {
            report.unmoved_ops += 1;
            if r.error.is_some() && report.unmoved_examples.len() < 5 {
                let op = if r.write { "setr" } else { "getr" };
                let example = format!("{op} {}: {}", keys[r.key], r.message);
                report.unmoved_examples.push(example);
            }
            r.error.map(|kind| (kind, &mut report.unmoved_failures))
        };
        if let Some((kind, counts)) = failures {
            *counts.entry(kind.to_string()).or_default() += 1;
        }
    }
    report.moved_keys_refused = refused.len();
    report.longest_gap = longest_gap(records);
    report
}

/// The longest stretch between the first start and the last end of `records` during which
/// no operation succeeded (a success counts at its end).
pub fn longest_gap(records: &[Record]) -> Duration {
    let Some(first) = records.iter().map(|r| r.start).min() else {
        return Duration::ZERO;
    };
    let last = records.iter().map(|r| r.end).max().unwrap_or(first);
    let mut ends: Vec<Instant> = records
        .iter()
        .filter(|r| r.error.is_none())
        .map(|r| r.end)
        .collect();
    ends.sort();
    let mut previous = first;
    let mut longest = Duration::ZERO;
    for end in ends.into_iter().chain([last]) {
        longest = longest.max(end.saturating_duration_since(previous));
        previous = previous.max(end);
    }
    longest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::view::{Epoch, Member};

    /// A view at `epoch` of servers with ids `ids` (3 replicas, 64 vnodes).
    fn view(epoch: u64, ids: &[u128]) -> View {
        View {
            epoch: Epoch(epoch),
            members: ids
                .iter()
                .map(|&id| Member {
                    id: ServerId(id),
                    addr: SocketAddr::from(([127, 0, 0, 1], 1000 + id as u16)),
                })
                .collect(),
            replicas: 3,
            vnodes: 64,
        }
    }

    /// A record of key `key` from `start` to `end` ms after `t0`, failed with `error`.
    fn record(
        t0: Instant,
        key: usize,
        (start, end): (u64, u64),
        error: Option<ErrorKind>,
    ) -> Record {
        Record {
            key,
            write: false,
            start: t0 + Duration::from_millis(start),
            end: t0 + Duration::from_millis(end),
            error,
            message: String::new(),
        }
    }

    /// Keys are sorted by whether their replica set changed; failures are counted on their
    /// side; the moved keys' window runs from the change to the last failure's end; the
    /// longest stretch with no success is found across all keys.
    #[test]
    fn failures_are_sorted_by_whether_the_key_moved() {
        let keys: Vec<String> = (0..200).map(|i| format!("k{i}")).collect();
        let (before, after) = (view(1, &[1, 2, 3, 4]), view(2, &[1, 2, 3, 4, 5]));
        let (old, new) = (Ring::new(&before), Ring::new(&after));
        let moved = |k: &str| {
            let ids = |ring: &Ring| -> BTreeSet<ServerId> {
                ring.replicas(k, 3).iter().map(|m| m.id).collect()
            };
            ids(&old) != ids(&new)
        };
        let a = keys.iter().position(|k| moved(k)).expect("a moved key");
        let b = keys.iter().position(|k| !moved(k)).expect("an unmoved key");
        let t0 = Instant::now();
        let records = vec![
            record(t0, b, (0, 10), None),
            record(t0, a, (5, 40), Some(ErrorKind::Rebalancing)),
            record(t0, a, (40, 70), None),
            record(t0, b, (100, 300), Some(ErrorKind::Timeout)),
            record(t0, b, (300, 310), None),
        ];
        let report = analyse(
            &records,
            &keys,
            &before,
            &after,
            t0 + Duration::from_millis(20),
        );
        assert_eq!(report.moved_keys + report.unmoved_keys, keys.len());
        assert!(report.moved_keys > 0 && report.unmoved_keys > 0);
        assert_eq!((report.moved_ops, report.unmoved_ops), (2, 3));
        assert_eq!(report.moved_failures.get("rebalancing"), Some(&1));
        assert_eq!(report.unmoved_failures.get("timeout"), Some(&1));
        assert_eq!(report.moved_keys_refused, 1);
        assert_eq!(report.failed_reads, 2);
        assert_eq!(report.moved_window, Duration::from_millis(20));
        assert_eq!(report.longest_gap, Duration::from_millis(240));
    }
}
