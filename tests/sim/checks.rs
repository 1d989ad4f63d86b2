//! The invariants every simulated run must keep, checked on its history and final state.

use std::collections::{BTreeMap, BTreeSet};

use crate::linearizability::{self, Op, OpKind};
use crate::world::{Final, Outcome, Record};

/// What the checks looked at.
#[derive(Clone, Debug, Default)]
pub struct Checked {
    /// Keys checked.
    pub keys: usize,
    /// Operations in the linearizability histories (final reads included).
    pub ops: usize,
    /// Acknowledged setrs.
    pub acked_writes: usize,
    /// setrs whose outcome was left unknown.
    pub unknown_writes: usize,
    /// getrs that returned a value or `not_found`.
    pub reads: usize,
}

impl Checked {
    /// Adds another run's counts to these.
    pub fn add(&mut self, other: &Checked) {
        self.keys += other.keys;
        self.ops += other.ops;
        self.acked_writes += other.acked_writes;
        self.unknown_writes += other.unknown_writes;
        self.reads += other.reads;
    }
}

/// Checks a run: no transaction left undecided (no key stays locked); every bucket holds
/// exactly its keys and every key's replicas agree; no acknowledged setr is lost; two setrs
/// never both commit the same version of a key; and per key, the history of setr and getr
/// (with a final read of the settled state) is linearizable. Returns what was checked, or
/// every violation found.
pub fn check(history: &[Record], state: &Final) -> Result<Checked, String> {
    let mut problems = Vec::new();
    for (id, _, pending) in &state.servers {
        if *pending > 0 {
            problems.push(format!(
                "server {id} still has {pending} undecided transactions (their keys stay locked) after the cluster settled"
            ));
        }
    }
    let settled = settled_values(state, &mut problems);
    let mut checked = Checked {
        keys: settled.len(),
        ..Checked::default()
    };
    let keys: BTreeSet<&str> = history
        .iter()
        .map(|r| r.key.as_str())
        .chain(settled.keys().map(String::as_str))
        .collect();
    for key in keys {
        let records: Vec<&Record> = history.iter().filter(|r| r.key == key).collect();
        let last = settled.get(key);
        check_writes(key, &records, last, &mut problems);
        let ops = key_history(&records, last, state);
        checked.ops += ops.len();
        if let Err(violation) = linearizability::check(&ops) {
            problems.push(format!("key {key:?}: not linearizable: {violation}"));
        }
        for record in records {
            match record.outcome {
                Outcome::Written { .. } => checked.acked_writes += 1,
                Outcome::MaybeWritten(_) => checked.unknown_writes += 1,
                Outcome::Found { .. } | Outcome::Absent => checked.reads += 1,
                _ => {}
            }
        }
    }
    if problems.is_empty() {
        Ok(checked)
    } else {
        Err(problems.join("\n"))
    }
}

/// The settled value of every key: checks that each server in the view holds exactly the
/// keys whose replicas include it, and that every key's replicas hold the same version and
/// value. Returns key → (version, value).
fn settled_values(state: &Final, problems: &mut Vec<String>) -> BTreeMap<String, (u64, String)> {
    let all: BTreeSet<&String> = state
        .servers
        .iter()
        .flat_map(|(_, b, _)| b.keys())
        .collect();
    let mut settled = BTreeMap::new();
    for key in all {
        let replicas = state.placement.replicas(key);
        let mut copies = Vec::new();
        for member in &replicas {
            match state.servers.iter().find(|(id, _, _)| *id == member.id) {
                Some((_, bucket, _)) => match bucket.get(key) {
                    Some(copy) => copies.push(copy.clone()),
                    None => {
                        let holders: Vec<String> = state
                            .servers
                            .iter()
                            .filter_map(|(id, b, _)| b.get(key).map(|c| format!("{id} v{}", c.0)))
                            .collect();
                        problems.push(format!(
                            "key {key:?} is missing from its replica {} after rebalancing settled (held by {})",
                            member.id,
                            holders.join(", ")
                        ))
                    }
                },
                None => problems.push(format!(
                    "replica {} of key {key:?} is in the view but not running",
                    member.id
                )),
            }
        }
        for (id, bucket, _) in &state.servers {
            if bucket.contains_key(key) && !replicas.iter().any(|m| m.id == *id) {
                problems.push(format!(
                    "server {id} holds key {key:?} but is not one of its replicas"
                ));
            }
        }
        if let Some(first) = copies.first() {
            if copies.iter().any(|c| c != first) {
                problems.push(format!("the replicas of key {key:?} disagree: {copies:?}"));
            }
            settled.insert(key.clone(), first.clone());
        }
    }
    settled
}

/// Checks the setrs of one key: acknowledged ones have distinct versions (two setrs never
/// both commit on the same version), and the settled version is at least the newest
/// acknowledged one (no acknowledged write is lost).
fn check_writes(
    key: &str,
    records: &[&Record],
    last: Option<&(u64, String)>,
    problems: &mut Vec<String>,
) {
    let mut versions: BTreeMap<u64, &Record> = BTreeMap::new();
    for record in records {
        let Outcome::Written { version } = record.outcome else {
            continue;
        };
        if let Some(other) = versions.insert(version, record) {
            problems.push(format!(
                "key {key:?}: two setrs both committed version {version}: {other:?} and {record:?}"
            ));
        }
    }
    if let Some((&newest, record)) = versions.last_key_value() {
        match last {
            None => problems.push(format!(
                "key {key:?}: the acknowledged write {record:?} is lost: no server holds the key"
            )),
            Some((version, _)) if *version < newest => problems.push(format!(
                "key {key:?}: the acknowledged write {record:?} is lost: the replicas settled at version {version}"
            )),
            Some(_) => {}
        }
    }
}

/// The linearizability history of one key: completed setrs, setrs of unknown outcome, getrs
/// that returned a value or `not_found`, and a final read of the settled value.
fn key_history(records: &[&Record], last: Option<&(u64, String)>, state: &Final) -> Vec<Op> {
    let nanos = |d: std::time::Duration| d.as_nanos() as u64;
    let mut ops: Vec<Op> = records
        .iter()
        .filter_map(|record| {
            let kind = match (&record.outcome, &record.value) {
                (Outcome::Written { .. } | Outcome::MaybeWritten(_), Some(value)) => {
                    OpKind::Write {
                        value: value.clone(),
                    }
                }
                (Outcome::Found { value, .. }, _) => OpKind::Read {
                    result: Some(value.clone()),
                },
                (Outcome::Absent, _) => OpKind::Read { result: None },
                _ => return None,
            };
            let complete = match record.outcome {
                Outcome::MaybeWritten(_) => None,
                _ => record.completed.map(nanos),
            };
            if complete.is_none() && matches!(kind, OpKind::Read { .. }) {
                return None;
            }
            Some((record, kind, complete))
        })
        .enumerate()
        .map(|(id, (record, kind, complete))| Op {
            id,
            client: record.client as u64,
            kind,
            invoke: nanos(record.invoked),
            complete,
        })
        .collect();
    let at = nanos(state.at);
    ops.push(Op {
        id: ops.len(),
        client: u64::MAX,
        kind: OpKind::Read {
            result: last.map(|(_, value)| value.clone()),
        },
        invoke: at,
        complete: Some(at),
    });
    ops
}
