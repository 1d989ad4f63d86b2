//! The bucket: the keys this server stores, and the one rule by which writes meet.
//!
//! Raw `set` writes version 0 and always overwrites (its contract); commits, transfers and
//! late duplicates go through [`Bucket::keep_newer`], so a key's version never goes back.
//! After a rejoin every key is a *candidate*: kept, but neither served nor counted as a copy
//! until rebalancing has reconciled it ([`Bucket::reconcile_candidates`]).

use std::collections::BTreeMap;

use crate::placement::rebalance::Held;
use crate::placement::ring::Ring;
use crate::placement::view::ServerId;
use crate::txn::participant::Write;
use crate::wire::message::{Entry, ErrorKind, Response, TxId};

/// One stored value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// Orders writes to the same key; raw `set` writes use version 0.
    pub version: u64,
    /// The value.
    pub value: String,
    /// The transaction that wrote it (`None` for a raw `set`): lets the primary answer a
    /// termination query about a commit it no longer remembers.
    pub txid: Option<TxId>,
    /// Written by a raw `set` and not yet sent to the key's replicas (rebalancing sends it).
    pub stray: bool,
    /// Kept from before this server was declared dead (it rejoined under a fresh id): not
    /// served, not listed and not counted as a copy until rebalancing has reconciled it with
    /// the key's current holders (the higher version wins), or dropped as stale or misplaced.
    pub candidate: bool,
}

/// The keys this server stores. Not bounded: it is the data.
#[derive(Debug, Default)]
pub(super) struct Bucket {
    /// The entries, by key.
    store: BTreeMap<String, Stored>,
}

impl Bucket {
    /// Number of keys held (candidates included).
    pub(super) fn len(&self) -> usize {
        self.store.len()
    }

    /// True when no key is held.
    pub(super) fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    /// Every entry, in key order (candidates included).
    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &Stored)> {
        self.store
            .iter()
            .map(|(key, stored)| (key.as_str(), stored))
    }

    /// The entry of `key`, candidate or not (what the rebalancing planner sends).
    pub(super) fn get(&self, key: &str) -> Option<&Stored> {
        self.store.get(key)
    }

    /// The version of `key` held (candidate or not), reported in a yes vote.
    pub(super) fn version(&self, key: &str) -> Option<u64> {
        self.store.get(key).map(|s| s.version)
    }

    /// The transaction that last wrote `key` here and its version (`None` for a raw `set`
    /// or an absent key): answers a termination query about a forgotten commit.
    pub(super) fn last_committed(&self, key: &str) -> Option<(TxId, u64)> {
        self.store
            .get(key)
            .and_then(|s| s.txid.map(|t| (t, s.version)))
    }

    /// Rejoin (declared dead): keeps every key, as a candidate and no longer a stray, so
    /// nothing is served or counted as a copy until the next rebalancing reconciled it.
    pub(super) fn reset(&mut self) {
        for stored in self.store.values_mut() {
            stored.candidate = true;
            stored.stray = false;
        }
    }

    /// A raw `set` of `key` to `value`: version 0, overwriting whatever is there (the raw
    /// commands' contract), marked stray until rebalancing sends it to the key's replicas.
    pub(super) fn set_raw(&mut self, key: String, value: String) {
        self.store.insert(
            key,
            Stored {
                version: 0,
                value,
                txid: None,
                stray: true,
                candidate: false,
            },
        );
    }

    /// The entry of `key` this server serves: none while it is only a candidate.
    pub(super) fn committed(&self, key: &str) -> Option<&Stored> {
        self.store.get(key).filter(|stored| !stored.candidate)
    }

    /// A raw `get`'s answer: the value, or `not_found`.
    pub(super) fn get_raw(&self, key: &str) -> Response {
        match self.committed(key) {
            Some(stored) => Response::Value {
                value: stored.value.clone(),
            },
            None => Self::not_found(key),
        }
    }

    /// A replicated read's answer: the value and its version, or `not_found`.
    pub(super) fn read(&self, key: &str) -> Response {
        match self.committed(key) {
            Some(stored) => Response::Found {
                value: stored.value.clone(),
                version: stored.version,
            },
            None => Self::not_found(key),
        }
    }

    /// The answer for a key this server does not serve.
    fn not_found(key: &str) -> Response {
        Response::error(
            ErrorKind::NotFound,
            format!("{key:?} is not in this bucket"),
        )
    }

    /// `query_all_keys`'s answer: the served keys, sorted (candidates are not listed).
    pub(super) fn query_all_keys(&self) -> Response {
        Response::Keys {
            keys: self
                .store
                .iter()
                .filter(|(_, stored)| !stored.candidate)
                .map(|(key, _)| key.clone())
                .collect(),
        }
    }

    /// Stores a committed write unless the bucket already holds a newer version.
    pub(super) fn apply(&mut self, write: Write) {
        let before = self.version(&write.key);
        let key = write.key.clone();
        let stored = Stored {
            version: write.version,
            value: write.value,
            txid: Some(write.txid),
            stray: false,
            candidate: false,
        };
        self.keep_newer(write.key, stored);
        debug_assert!(
            self.version(&key) >= before,
            "a commit never takes {key:?} back to an older version"
        );
    }

    /// Stores the entries of a transfer, keeping the higher version of each; returns the
    /// keys and value bytes received (for the rebalancing log).
    pub(super) fn receive(&mut self, entries: Vec<Entry>) -> (usize, usize) {
        let (mut keys, mut bytes) = (0, 0);
        for entry in entries {
            keys += 1;
            bytes += entry.key.len() + entry.value.len();
            let stored = Stored {
                version: entry.version,
                value: entry.value,
                txid: entry.txid,
                stray: false,
                candidate: false,
            };
            self.keep_newer(entry.key, stored);
        }
        (keys, bytes)
    }

    /// Stores `stored` under `key` unless the bucket already holds the same or a newer
    /// version: the one rule by which commits, late duplicates and rebalance copies meet, so a
    /// value never goes back to an older one.
    fn keep_newer(&mut self, key: String, stored: Stored) {
        if self
            .store
            .get(&key)
            .is_none_or(|s| s.version < stored.version)
        {
            self.store.insert(key, stored);
        }
    }

    /// Drops `key` (sent to its new replicas, or no longer ours).
    pub(super) fn remove(&mut self, key: &str) {
        self.store.remove(key);
    }

    /// `key` was sent to its replicas: it is no longer a stray.
    pub(super) fn unstray(&mut self, key: &str) {
        if let Some(stored) = self.store.get_mut(key) {
            stored.stray = false;
        }
    }

    /// The bucket as the rebalancing planner sees it.
    pub(super) fn held(&self) -> impl Iterator<Item = Held<'_>> {
        self.store.iter().map(|(key, stored)| Held {
            key,
            stray: stored.stray,
            candidate: stored.candidate,
        })
    }

    /// Every send of the epoch is delivered (they carried each candidate to every replica of
    /// its key): a candidate of a key `me` replicates on `ring` (`count` replicas per key)
    /// now holds the best copy any holder had, so it is served again; one of a key it does
    /// not replicate is dropped. Returns how many were kept and dropped.
    pub(super) fn reconcile_candidates(
        &mut self,
        ring: &Ring,
        count: usize,
        me: ServerId,
    ) -> (usize, usize) {
        let (mut kept, mut dropped) = (0, 0);
        self.store.retain(|key, stored| {
            if !stored.candidate {
                return true;
            }
            if ring.replicas(key, count).iter().any(|m| m.id == me) {
                stored.candidate = false;
                kept += 1;
                true
            } else {
                dropped += 1;
                false
            }
        });
        (kept, dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A commit of `key` = `value` at `version` by transaction `tx`.
    fn write(tx: u128, key: &str, value: &str, version: u64) -> Write {
        Write {
            txid: TxId(tx),
            key: key.into(),
            value: value.into(),
            version,
            participants: Vec::new(),
        }
    }

    /// Contract: a commit or a transfer never takes a key back to an older version, while a
    /// raw `set` (version 0) always overwrites.
    #[test]
    fn versions_never_go_back_but_raw_set_overwrites() {
        let mut bucket = Bucket::default();
        bucket.apply(write(1, "k", "new", 5));
        bucket.apply(write(2, "k", "old", 4));
        let entry = Entry {
            key: "k".into(),
            value: "older".into(),
            version: 3,
            txid: None,
        };
        assert_eq!(bucket.receive(vec![entry]), (1, 6));
        assert_eq!(
            bucket.read("k"),
            Response::Found {
                value: "new".into(),
                version: 5
            }
        );
        assert_eq!(bucket.last_committed("k"), Some((TxId(1), 5)));
        bucket.set_raw("k".into(), "raw".into());
        assert_eq!(
            bucket.get_raw("k"),
            Response::Value {
                value: "raw".into()
            }
        );
        assert_eq!(bucket.last_committed("k"), None);
    }

    /// Issue 14: after a rejoin every key is a candidate, served and listed again only once
    /// reconciled.
    #[test]
    fn a_reset_keeps_every_key_as_an_unserved_candidate() {
        let mut bucket = Bucket::default();
        bucket.set_raw("k".into(), "v".into());
        bucket.reset();
        assert_eq!(bucket.len(), 1);
        assert!(bucket.iter().all(|(_, s)| s.candidate && !s.stray));
        assert!(bucket.committed("k").is_none());
        assert_eq!(bucket.query_all_keys(), Response::Keys { keys: vec![] });
    }
}
