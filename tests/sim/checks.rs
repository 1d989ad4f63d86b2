//! The invariants every simulated run must keep, checked on its history, its final state,
//! and what the world observed on the way (who held which write, who crashed, the epochs
//! each server process, client incarnation and group member saw, the view each member
//! applied at each epoch, the copies at stable points, the lock clients' grants and
//! releases).

use std::collections::{BTreeMap, BTreeSet};

use crate::linearizability::{self, Op, OpKind};
use crate::locker::{LockEvent, LockStep};
use crate::world::{Final, Observed, Outcome, Record, describe_view};

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
    /// Acknowledged setrs lost with every server process that held them crashed (allowed;
    /// the linearizability check takes them as of unknown outcome).
    pub excused_losses: usize,
    /// Epochs checked for going backwards: each change of a server process's epoch, of the
    /// epoch of the views a client incarnation received, and of a group member's applied
    /// epoch.
    pub epochs: usize,
    /// Epochs whose view was compared between group members (and clients, in a group of 3
    /// or 5).
    pub views: usize,
    /// Lock grants checked for mutual exclusion.
    pub lock_grants: usize,
    /// Grants that overlapped a holder's of an earlier view-leader generation (a group of
    /// one restarted with no memory forgets its lock table: allowed).
    pub excused_grants: usize,
    /// Group members that agreed on the view at the end (leaders and followers).
    pub agreeing_members: usize,
}

impl Checked {
    /// Adds another run's counts to these.
    pub fn add(&mut self, other: &Checked) {
        self.keys += other.keys;
        self.ops += other.ops;
        self.acked_writes += other.acked_writes;
        self.unknown_writes += other.unknown_writes;
        self.reads += other.reads;
        self.excused_losses += other.excused_losses;
        self.epochs += other.epochs;
        self.views += other.views;
        self.lock_grants += other.lock_grants;
        self.excused_grants += other.excused_grants;
        self.agreeing_members += other.agreeing_members;
    }
}

/// Checks a run: no transaction left undecided (no key stays locked); no entry left a
/// candidate (unreconciled since a rejoin); every bucket holds exactly its keys and every
/// key's replicas agree; no acknowledged setr is lost unless every server process that held
/// it crashed; two setrs never both commit the same version of a key, and the versions of
/// acknowledged setrs follow real time; no server process, no client incarnation and no
/// group member sees its epoch go backwards; every member (and client) that saw an epoch saw
/// the same view at it, and at the end the members that take part agree on the view while
/// a member restarted without its state is refused; no lock ever has two holders at once;
/// and per key, the history of setr and getr (with a final read of the settled state) is
/// linearizable. Returns what was checked, or every violation found.
pub fn check(history: &[Record], state: &Final) -> Result<Checked, String> {
    let mut problems = Vec::new();
    for (id, _, pending) in &state.servers {
        if *pending > 0 {
            problems.push(format!(
                "server {id} still has {pending} undecided transactions (their keys stay locked) after the cluster settled"
            ));
        }
    }
    for (at, missing) in &state.observed.unstable {
        problems.push(format!(
            "at {:.6} s the cluster was stable (every server finished the current epoch, no transaction in flight), yet {missing}",
            at.as_secs_f64()
        ));
    }
    for (id, key) in &state.candidates {
        problems.push(format!(
            "server {id} still keeps key {key:?} as an unreconciled candidate after the cluster settled"
        ));
    }
    let settled = settled_values(state, &mut problems);
    let (lock_grants, excused_grants) = check_locks(&state.observed.locks, &mut problems);
    let mut checked = Checked {
        keys: settled.len(),
        epochs: check_epochs(&state.observed, &mut problems),
        views: state.observed.views.len(),
        lock_grants,
        excused_grants,
        agreeing_members: check_members(state, &mut problems),
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
        check_version_order(key, &records, &mut problems);
        let excused = check_writes(key, &records, last, &state.observed, &mut problems);
        checked.excused_losses += excused.len();
        let ops = key_history(&records, last, state, &excused);
        checked.ops += ops.len();
        if let Err(violation) = linearizability::check(&ops) {
            problems.push(format!(
                "key {key:?}: not linearizable: {violation}\n  (key {key:?} was held by: {})",
                describe_holders(&state.observed, key)
            ));
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

/// The copies missing from `state`: for every key any server holds (candidate or not), each
/// of its replicas in the view that runs but does not hold it (as a reconciled entry). Used
/// at stable points, where rebalancing has finished: "after rebalancing for a view has
/// finished, every server's bucket holds exactly the keys whose replica sets include it".
pub fn missing_copies(state: &Final) -> Vec<String> {
    let keys: BTreeSet<&str> = state
        .servers
        .iter()
        .flat_map(|(_, b, _)| b.keys().map(String::as_str))
        .chain(state.candidates.iter().map(|(_, key)| key.as_str()))
        .collect();
    let mut missing = Vec::new();
    for key in keys {
        for member in state.placement.replicas(key) {
            let Some((_, bucket, _)) = state.servers.iter().find(|(id, _, _)| *id == member.id)
            else {
                continue;
            };
            if !bucket.contains_key(key) {
                let holders: Vec<String> = state
                    .servers
                    .iter()
                    .filter_map(|(id, b, _)| b.get(key).map(|c| format!("{id} v{}", c.0)))
                    .chain(
                        state
                            .candidates
                            .iter()
                            .filter(|(_, k)| k == key)
                            .map(|(id, _)| format!("{id} (candidate)")),
                    )
                    .collect();
                missing.push(format!(
                    "key {key:?} is missing from its replica {} (held by {})",
                    member.id,
                    holders.join(", ")
                ));
            }
        }
    }
    missing
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
/// both commit on the same version), and none is lost (the key settled below its version, or
/// at its version with another value, or no server holds the key) unless every server
/// process that ever held it (its version and value, or a newer version; candidate or not)
/// crashed: declarations, rejoins, pauses and cuts never excuse a loss. Returns the values of
/// the acknowledged setrs lost with all their holders crashed (allowed).
fn check_writes(
    key: &str,
    records: &[&Record],
    last: Option<&(u64, String)>,
    observed: &Observed,
    problems: &mut Vec<String>,
) -> BTreeSet<String> {
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
    let settled = match last {
        None => "no server holds the key".to_owned(),
        Some((version, value)) => {
            format!("the replicas settled at version {version}, value {value:?}")
        }
    };
    let held = observed.held.get(key);
    let mut excused = BTreeSet::new();
    for (&version, record) in versions.iter().rev() {
        let written = record.value.as_deref().unwrap_or_default();
        // The write or a newer one: a higher version, or this version with this value.
        let covers =
            |(held, value): (u64, &str)| held > version || (held == version && value == written);
        if last.is_some_and(|(v, value)| covers((*v, value))) {
            break;
        }
        let holders: Vec<u64> = held
            .into_iter()
            .flatten()
            .filter(|&(_, (v, value))| covers((*v, value)))
            .map(|(&process, _)| process)
            .collect();
        let running: Vec<String> = holders
            .iter()
            .filter(|p| observed.servers.get(p).is_none_or(|s| !s.crashed))
            .map(|p| describe_process(observed, *p))
            .collect();
        if holders.is_empty() {
            problems.push(format!(
                "key {key:?}: the acknowledged write {record:?} is lost ({settled}), and no server process was ever seen holding it"
            ));
        } else if !running.is_empty() {
            problems.push(format!(
                "key {key:?}: the acknowledged write {record:?} is lost ({settled}) although server processes that held it never crashed: {}",
                running.join("; ")
            ));
        } else {
            excused.insert(written.to_owned());
        }
    }
    excused
}

/// Checks that the versions of one key's acknowledged setrs follow real time: a setr invoked
/// after another one was acknowledged gets a higher version (versions are ordered across
/// epochs, so a write after a server was dropped, or after the view leader restarted, beats
/// what that server kept). A later write with a lower version would be undone by the older
/// one wherever the two meet (higher version wins). Reports the first offence of the key.
fn check_version_order(key: &str, records: &[&Record], problems: &mut Vec<String>) {
    let acked: Vec<(&Record, u64, std::time::Duration)> = records
        .iter()
        .filter_map(|r| match (r.outcome.clone(), r.completed) {
            (Outcome::Written { version }, Some(completed)) => Some((*r, version, completed)),
            _ => None,
        })
        .collect();
    let mut by_completion: Vec<usize> = (0..acked.len()).collect();
    by_completion.sort_by_key(|&i| acked[i].2);
    let mut by_invocation: Vec<usize> = (0..acked.len()).collect();
    by_invocation.sort_by_key(|&i| acked[i].0.invoked);
    // The acknowledged setr with the highest version among those completed so far.
    let mut newest: Option<usize> = None;
    let mut completed = by_completion.iter().peekable();
    for i in by_invocation {
        let (record, version, _) = acked[i];
        while let Some(&&j) = completed.peek() {
            if acked[j].2 >= record.invoked {
                break;
            }
            if newest.is_none_or(|n| acked[j].1 > acked[n].1) {
                newest = Some(j);
            }
            completed.next();
        }
        if let Some(n) = newest
            && acked[n].1 >= version
        {
            let (before, before_version, _) = acked[n];
            problems.push(format!(
                "key {key:?}: versions go back in time: the acknowledged write {record:?} got version {version}, not above version {before_version} of the acknowledged write {before:?} that completed before it was invoked"
            ));
            return;
        }
    }
}

/// Lists the server processes that ever held `key`, for a message: each with the highest
/// version it held and whether it crashed.
fn describe_holders(observed: &Observed, key: &str) -> String {
    let holders: Vec<String> = observed
        .held
        .get(key)
        .into_iter()
        .flatten()
        .map(|(&process, (version, _))| {
            let crashed = observed.servers.get(&process).is_some_and(|s| s.crashed);
            format!(
                "{} up to version {version}{}",
                describe_process(observed, process),
                if crashed { ", crashed" } else { "" }
            )
        })
        .collect();
    if holders.is_empty() {
        "nobody".into()
    } else {
        holders.join("; ")
    }
}

/// Names server process `process` for a message: its number, slot and ids.
fn describe_process(observed: &Observed, process: u64) -> String {
    match observed.servers.get(&process) {
        Some(seen) => {
            let ids: Vec<String> = seen.ids.iter().map(ToString::to_string).collect();
            format!(
                "process {process} (slot {}, ids {})",
                seen.slot,
                ids.join(" then ")
            )
        }
        None => format!("process {process}"),
    }
}

/// Checks that epochs never go backwards: the epoch each server process reports (across
/// rejoins under fresh ids, which are no crash) and the epoch of the views each client
/// incarnation receives. Returns how many epoch changes were checked.
fn check_epochs(observed: &Observed, problems: &mut Vec<String>) -> usize {
    let mut checked = 0;
    for (&process, seen) in &observed.servers {
        checked += seen.epochs.len();
        for pair in seen.epochs.windows(2) {
            let ((_, before), (at, after)) = (pair[0], pair[1]);
            if after < before {
                problems.push(format!(
                    "the epoch of server {} went backwards from {before} to {after} at {:.6} s",
                    describe_process(observed, process),
                    at.as_secs_f64()
                ));
            }
        }
    }
    for (&life, seen) in &observed.members {
        checked += seen.epochs.len();
        for pair in seen.epochs.windows(2) {
            let ((_, before), (at, after)) = (pair[0], pair[1]);
            if after < before {
                problems.push(format!(
                    "group member {} (life {life}) went back from epoch {before} to {after} at {:.6} s",
                    seen.slot,
                    at.as_secs_f64()
                ));
            }
        }
    }
    for (&life, seen) in &observed.clients {
        checked += seen.epochs.len();
        for pair in seen.epochs.windows(2) {
            let ((_, before), (at, after)) = (pair[0], pair[1]);
            if after < before {
                problems.push(format!(
                    "client {} (life {life}) received a view of epoch {after} at {:.6} s after one of epoch {before}: epochs went backwards",
                    seen.index,
                    at.as_secs_f64()
                ));
            }
        }
    }
    checked
}

/// The linearizability history of one key: completed setrs, setrs of unknown outcome, getrs
/// that returned a value or `not_found`, and a final read of the settled value. An
/// acknowledged setr lost with all its holders crashed (its value in `excused`) counts as of
/// unknown outcome, and the getrs that returned its value are left out: the rest of the
/// history is still checked.
fn key_history(
    records: &[&Record],
    last: Option<&(u64, String)>,
    state: &Final,
    excused: &BTreeSet<String>,
) -> Vec<Op> {
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
                (Outcome::Found { value, .. }, _) if excused.contains(value) => return None,
                (Outcome::Found { value, .. }, _) => OpKind::Read {
                    result: Some(value.clone()),
                },
                (Outcome::Absent, _) => OpKind::Read { result: None },
                _ => return None,
            };
            let lost = record.value.as_ref().is_some_and(|v| excused.contains(v));
            let complete = match record.outcome {
                Outcome::MaybeWritten(_) => None,
                Outcome::Written { .. } if lost => None,
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

/// Checks the view-leader group: every view seen at an epoch was the one first seen at it
/// (members apply one log: a view is a function of its epoch); at the end every member that
/// takes part shows the leader's view and rebalancing status, and every member restarted
/// without its state (in a group of 3 or 5) is refused, never taking part with amnesia.
/// Returns how many members agreed.
fn check_members(state: &Final, problems: &mut Vec<String>) -> usize {
    for (at, conflict) in &state.observed.view_conflicts {
        problems.push(format!(
            "at {:.6} s, {conflict}: the members did not apply the same view at that epoch",
            at.as_secs_f64()
        ));
    }
    let taking_part: Vec<_> = state
        .members
        .iter()
        .filter(|m| matches!(m.phase, "leader" | "follower" | "candidate"))
        .collect();
    if let Some(leader) = state.members.iter().find(|m| m.phase == "leader") {
        for member in &taking_part {
            if member.view != leader.view || member.rebalancing != leader.rebalancing {
                problems.push(format!(
                    "after the cluster settled, group member {} shows epoch {} {} (rebalancing {}) but the leader {} shows epoch {} {} (rebalancing {})",
                    member.slot,
                    member.view.epoch,
                    describe_view(&member.view),
                    member.rebalancing,
                    leader.slot,
                    leader.view.epoch,
                    describe_view(&leader.view),
                    leader.rebalancing
                ));
            }
        }
    }
    for member in state.members.iter().filter(|m| m.restarted) {
        if member.phase != "refused" {
            problems.push(format!(
                "group member {} was restarted without its state while the others had state, yet it is {} (it must be refused: it may have voted before it forgot)",
                member.slot, member.phase
            ));
        }
    }
    taking_part.len()
}

/// Checks mutual exclusion from the lock clients' side: from the moment a client learned it
/// holds a lock (its grant arrived) until it sent the release, no other client learns it
/// holds that lock. A grant that overlaps a holder of an earlier view-leader generation is
/// allowed (a group of one restarted with no memory has forgotten its lock table) and
/// counted. Returns the grants checked and the grants excused.
fn check_locks(events: &[LockEvent], problems: &mut Vec<String>) -> (usize, usize) {
    // Lock → requester → (generation, when) of the grant it acts on.
    let mut holders: BTreeMap<&str, BTreeMap<&str, (u64, f64)>> = BTreeMap::new();
    let (mut grants, mut excused) = (0, 0);
    for event in events {
        let at = event.at.as_secs_f64();
        let held = holders.entry(event.lock.as_str()).or_default();
        match event.step {
            LockStep::Granted => {
                grants += 1;
                for (&other, &(generation, since)) in held.iter() {
                    if other == event.requester {
                        continue;
                    }
                    if generation == event.generation {
                        problems.push(format!(
                            "lock {:?} granted to {} at {at:.6} s while {other} held it (granted at {since:.6} s, not released since): two holders at once",
                            event.lock, event.requester
                        ));
                    } else {
                        excused += 1;
                    }
                }
                held.insert(event.requester.as_str(), (event.generation, at));
            }
            LockStep::ReleaseSent => {
                held.remove(event.requester.as_str());
            }
        }
    }
    (grants, excused)
}
