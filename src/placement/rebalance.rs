//! Rebalancing plans: which keys a server sends to whom after a view change, and which it
//! drops (sans-IO, a pure function of what the server holds and two views).
//!
//! Servers skip epochs (views reach them only in heartbeat acknowledgements), so a plan
//! never depends on which views a server happened to see. It is anchored on two views every
//! server learns from the view leader: the **anchor** (the newest view all of whose servers
//! had their sends acknowledged while it was current: from then on each of its replicas holds
//! each of its keys; the parameter is still called `completed`) and the **newest** view. For each key a server holds:
//!
//! - `old` = the key's replicas in the completed view, `new` = in the newest view, and
//!   `survivors` = the members of `old` still in the newest view, in ring order.
//! - If some old replica survives, exactly one server sends: the first survivor. It sends the
//!   key to every member of `new` that is not in `old` (they lack it; the old ones hold it).
//!   Every server computes the same sender, so each missing copy is sent once.
//! - If no old replica survives (all failed together), every holder sends the key to every
//!   new replica but itself: duplicates are possible, loss is not.
//! - A **stray** key (a raw `set`, which may exist on no other replica) is sent by its holder
//!   to every new replica but itself.
//! - A **candidate** (kept by a server the view leader declared dead, which rejoined under a
//!   fresh id) is sent the same way, whatever the anchor says: its holder was no replica of
//!   anything since its old id left the view, yet it may hold the newest or the only copy.
//!   Receivers keep the higher version, so after every send of the epoch is delivered each
//!   new replica holds the best copy any holder had; the candidate holder then serves its
//!   copy (it received the current holders' copies, if any) or has dropped it.
//! - A sender that is not in `new` drops the key once its sends are acknowledged. A holder
//!   that is not the sender and not in `new` keeps its copy until the newest epoch completes
//!   (if the sender fails meanwhile, the next plan still finds the key), then drops it.
//!
//! Receivers keep the higher version, so a copy never replaces a newer value. When view
//! changes overlap, servers simply plan again against the newest view from what they hold;
//! the completed view stays the anchor, so a key survives as long as fewer than `replicas` of
//! its holders fail.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::placement::ring::Ring;
use crate::placement::view::{Epoch, Member, ServerId, View};

/// What one server must do for one view change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The newest epoch this plan brings the server to.
    pub epoch: Epoch,
    /// Keys to send, per destination server (with its address).
    pub sends: BTreeMap<ServerId, (SocketAddr, Vec<String>)>,
    /// Keys to drop once every send of this plan is acknowledged.
    pub drop_after_sending: Vec<String>,
    /// Stray keys that stay here (we are a replica) and stop being strays once sent.
    pub settle_after_sending: Vec<String>,
}

impl Plan {
    /// Number of key copies the plan sends.
    pub fn copies(&self) -> usize {
        self.sends.values().map(|(_, keys)| keys.len()).sum()
    }
}

/// A key as the planner sees it.
#[derive(Clone, Copy, Debug)]
pub struct Held<'a> {
    /// The key.
    pub key: &'a str,
    /// Written by a raw `set` and not yet sent to its replicas.
    pub stray: bool,
    /// Kept from before its holder was declared dead; not yet reconciled.
    pub candidate: bool,
}

/// Plans server `me`'s part of bringing `keys` from the `completed` view to the `newest`.
pub fn plan<'a>(
    me: ServerId,
    completed: &View,
    newest: &View,
    keys: impl IntoIterator<Item = Held<'a>>,
) -> Plan {
    let old_ring = Ring::new(completed);
    let new_ring = Ring::new(newest);
    let old_count = completed.replicas as usize;
    let new_count = newest.replicas as usize;
    let mut plan = Plan {
        epoch: newest.epoch,
        ..Plan::default()
    };
    for held in keys {
        let new = new_ring.replicas(held.key, new_count);
        let in_new = new.iter().any(|m| m.id == me);
        let targets: Vec<Member> = if held.stray || held.candidate {
            new.iter().copied().filter(|m| m.id != me).collect()
        } else {
            let old = old_ring.replicas(held.key, old_count);
            let sender = old.iter().find(|m| newest.contains(m.id));
            match sender {
                Some(sender) if sender.id == me => new
                    .iter()
                    .copied()
                    .filter(|m| !old.iter().any(|o| o.id == m.id))
                    .collect(),
                Some(_) => Vec::new(),
                None => new.iter().copied().filter(|m| m.id != me).collect(),
            }
        };
        let sends = !targets.is_empty();
        for target in targets {
            let entry = plan
                .sends
                .entry(target.id)
                .or_insert_with(|| (target.addr, Vec::new()));
            entry.1.push(held.key.to_owned());
        }
        match (in_new, held.stray) {
            (false, _) if sends => plan.drop_after_sending.push(held.key.to_owned()),
            (true, true) => plan.settle_after_sending.push(held.key.to_owned()),
            _ => {}
        }
    }
    plan
}

/// The keys server `me` should drop once `completed` is complete: those it holds (not
/// strays, not candidates: their plans send and drop them) whose replicas in `completed` do
/// not include it.
pub fn leftovers<'a>(
    me: ServerId,
    completed: &View,
    keys: impl IntoIterator<Item = Held<'a>>,
) -> Vec<String> {
    let ring = Ring::new(completed);
    let count = completed.replicas as usize;
    keys.into_iter()
        .filter(|held| !held.stray && !held.candidate)
        .filter(|held| !ring.replicas(held.key, count).iter().any(|m| m.id == me))
        .map(|held| held.key.to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use super::*;
    use crate::util::rng::Rng;

    /// `n` servers with ids from a fixed seed, on ports 1..=n.
    fn servers(n: usize, seed: u64) -> Vec<Member> {
        let mut rng = Rng::seeded(seed);
        (1..=n)
            .map(|i| Member {
                id: ServerId::random(&mut rng),
                addr: SocketAddr::from(([127, 0, 0, 1], i as u16)),
            })
            .collect()
    }

    /// A view of `members` at `epoch` with 3 replicas and 16 vnodes.
    fn view(epoch: u64, members: &[Member]) -> View {
        let mut members = members.to_vec();
        members.sort_by_key(|m| m.id);
        View {
            epoch: Epoch(epoch),
            members,
            replicas: 3,
            vnodes: 16,
        }
    }

    /// Buckets as the completion invariant leaves them: each server holds exactly its keys.
    fn settled(v: &View, keys: &[String]) -> HashMap<ServerId, BTreeSet<String>> {
        let ring = Ring::new(v);
        let mut buckets: HashMap<ServerId, BTreeSet<String>> =
            v.members.iter().map(|m| (m.id, BTreeSet::new())).collect();
        for key in keys {
            for m in ring.replicas(key, 3) {
                buckets.entry(m.id).or_default().insert(key.clone());
            }
        }
        buckets
    }

    /// Runs every surviving server's plan from `completed` to `newest`, delivers the copies,
    /// applies the drops, then the leftover drops at completion; returns the buckets and the
    /// number of copies sent.
    fn rebalance(
        completed: &View,
        newest: &View,
        mut buckets: HashMap<ServerId, BTreeSet<String>>,
    ) -> (HashMap<ServerId, BTreeSet<String>>, usize) {
        buckets.retain(|id, _| newest.contains(*id));
        for m in &newest.members {
            buckets.entry(m.id).or_default();
        }
        let plans: Vec<(ServerId, Plan)> = buckets
            .iter()
            .map(|(&id, keys)| {
                let held = keys.iter().map(|k| Held {
                    key: k,
                    stray: false,
                    candidate: false,
                });
                (id, plan(id, completed, newest, held))
            })
            .collect();
        let mut copies = 0;
        for (me, plan) in &plans {
            for (target, (_, keys)) in &plan.sends {
                copies += keys.len();
                buckets
                    .entry(*target)
                    .or_default()
                    .extend(keys.iter().cloned());
            }
            let bucket = buckets.entry(*me).or_default();
            for key in &plan.drop_after_sending {
                bucket.remove(key);
            }
        }
        for (id, bucket) in buckets.iter_mut() {
            let held: Vec<String> = bucket.iter().cloned().collect();
            let held = held.iter().map(|k| Held {
                key: k,
                stray: false,
                candidate: false,
            });
            for key in leftovers(*id, newest, held) {
                bucket.remove(&key);
            }
        }
        (buckets, copies)
    }

    /// The keys `key0`..`key{n}`.
    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("key{i}")).collect()
    }

    /// Assignment 3.2: after a join, every bucket holds exactly its keys, and every copy sent
    /// is one the allocator requires (the minimum: one per key per new replica).
    #[test]
    fn a_join_sends_each_missing_copy_exactly_once() {
        let all = servers(6, 1);
        let before = view(5, &all[..5]);
        let after = view(6, &all);
        let keys = keys(2000);
        let (buckets, copies) = rebalance(&before, &after, settled(&before, &keys));
        assert_eq!(buckets, settled(&after, &keys));
        let joined = all[5].id;
        let minimum = settled(&after, &keys)[&joined].len();
        assert_eq!(
            copies, minimum,
            "only the newcomer's keys are copied, once each"
        );
    }

    /// Assignment 3.2: after a departure, every key regains its third replica with one copy.
    #[test]
    fn a_departure_sends_each_missing_copy_exactly_once() {
        let all = servers(6, 2);
        let before = view(5, &all);
        let after = view(6, &all[1..]);
        let keys = keys(2000);
        let (buckets, copies) = rebalance(&before, &after, settled(&before, &keys));
        assert_eq!(buckets, settled(&after, &keys));
        let lost = settled(&before, &keys)[&all[0].id].len();
        assert_eq!(copies, lost, "one copy per key the departed server held");
    }

    /// Assignment 3.2: kill servers one by one down to one (which then holds every key), then
    /// grow back; nothing is lost and every bucket is exact after every step.
    #[test]
    fn shrinking_to_one_server_and_growing_back_loses_nothing() {
        let all = servers(5, 3);
        let keys = keys(500);
        let mut members = all.clone();
        let mut current = view(1, &members);
        let mut buckets = settled(&current, &keys);
        let mut epoch = 1;
        while members.len() > 1 {
            members.remove(0);
            epoch += 1;
            let next = view(epoch, &members);
            buckets = rebalance(&current, &next, buckets).0;
            assert_eq!(
                buckets,
                settled(&next, &keys),
                "after shrinking to {}",
                members.len()
            );
            current = next;
        }
        assert_eq!(
            buckets[&members[0].id].len(),
            keys.len(),
            "the last server holds every key"
        );
        for newcomer in servers(4, 4) {
            members.push(newcomer);
            epoch += 1;
            let next = view(epoch, &members);
            buckets = rebalance(&current, &next, buckets).0;
            assert_eq!(
                buckets,
                settled(&next, &keys),
                "after growing to {}",
                members.len()
            );
            current = next;
        }
    }

    /// Two of five servers failing at once (fewer than the 3 replicas) loses no key.
    #[test]
    fn two_simultaneous_failures_lose_nothing() {
        let all = servers(5, 5);
        let before = view(1, &all);
        let after = view(2, &all[2..]);
        let keys = keys(1000);
        let (buckets, _) = rebalance(&before, &after, settled(&before, &keys));
        assert_eq!(buckets, settled(&after, &keys));
    }

    /// Overlapping view changes: a plan against an intermediate view is abandoned halfway and
    /// the servers plan again from what they hold against the newest view, still anchored on
    /// the completed view; nothing is lost and the result is exact.
    #[test]
    fn a_second_change_before_the_first_completes_replans_from_the_anchor() {
        let all = servers(6, 6);
        let keys = keys(800);
        let completed = view(1, &all[..5]);
        let start = settled(&completed, &keys);
        // Epoch 2 (a join of server 6) gets half its copies delivered, no drops...
        let middle = view(2, &all);
        let mut buckets = start.clone();
        for m in &completed.members {
            let held: Vec<String> = start[&m.id].iter().cloned().collect();
            let p = plan(
                m.id,
                &completed,
                &middle,
                held.iter().map(|k| Held {
                    key: k,
                    stray: false,
                    candidate: false,
                }),
            );
            for (target, (_, keys)) in p.sends {
                let half = keys.len() / 2;
                buckets
                    .entry(target)
                    .or_default()
                    .extend(keys.into_iter().take(half));
            }
        }
        // ...then server 1 dies (epoch 3) before epoch 2 completes.
        let newest = view(3, &all[1..]);
        let (buckets, _) = rebalance(&completed, &newest, buckets);
        assert_eq!(buckets, settled(&newest, &keys));
    }

    /// Contract: a raw `set` key is subject to rebalancing: its holder sends it to the key's
    /// replicas and drops it if it is not one of them.
    #[test]
    fn a_stray_key_is_sent_to_its_replicas_and_dropped_by_a_non_replica() {
        let all = servers(5, 7);
        let v = view(3, &all);
        let ring = Ring::new(&v);
        let key = (0..)
            .map(|i| format!("raw{i}"))
            .find(|k| !ring.replicas(k, 3).iter().any(|m| m.id == all[0].id))
            .unwrap();
        let p = plan(
            all[0].id,
            &v,
            &v,
            [Held {
                key: &key,
                stray: true,
                candidate: false,
            }],
        );
        let targets: BTreeSet<ServerId> = p.sends.keys().copied().collect();
        let replicas: BTreeSet<ServerId> = ring.replicas(&key, 3).iter().map(|m| m.id).collect();
        assert_eq!(targets, replicas);
        assert_eq!(p.drop_after_sending, vec![key]);
    }

    /// Issue 14 (keep, never wipe): a candidate is sent to every replica of the key in the
    /// newest view whatever the anchor claims (its holder may have the only copy), dropped
    /// after sending by a holder that is no replica, kept (for reconciliation) by one that
    /// is, and never counted among the leftovers an anchor would drop.
    #[test]
    fn a_candidate_is_sent_to_every_replica_whatever_the_anchor_says() {
        let all = servers(5, 11);
        let anchor = view(3, &all[..4]);
        // The candidate's holder rejoined under a fresh id: all[4] is new in epoch 4.
        let newest = view(4, &all);
        let ring = Ring::new(&newest);
        let me = all[4].id;
        let mine = (0..)
            .map(|i| format!("c{i}"))
            .find(|k| ring.replicas(k, 3).iter().any(|m| m.id == me))
            .unwrap();
        let other = (0..)
            .map(|i| format!("d{i}"))
            .find(|k| !ring.replicas(k, 3).iter().any(|m| m.id == me))
            .unwrap();
        let held = [&mine, &other].map(|k| Held {
            key: k,
            stray: false,
            candidate: true,
        });
        let p = plan(me, &anchor, &newest, held);
        for key in [&mine, &other] {
            let expected: BTreeSet<ServerId> = ring
                .replicas(key, 3)
                .iter()
                .map(|m| m.id)
                .filter(|&id| id != me)
                .collect();
            let sent: BTreeSet<ServerId> = p
                .sends
                .iter()
                .filter(|(_, (_, keys))| keys.contains(key))
                .map(|(&id, _)| id)
                .collect();
            assert_eq!(sent, expected, "{key}");
        }
        assert_eq!(p.drop_after_sending, vec![other.clone()]);
        assert!(p.settle_after_sending.is_empty());
        assert!(leftovers(me, &newest, held).is_empty());
    }
}
