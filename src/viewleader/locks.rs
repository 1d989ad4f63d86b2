//! The view leader's lock service: a sans-IO table of named locks.
//!
//! This module owns every lock's holder, its FIFO queue of waiting requests, the renewal and
//! confirmation timeouts, withdrawal of abandoned requests, release of a departed server's
//! locks, and deadlock detection over the wait-for graph. It never reads the clock: every
//! input carries the current [`Instant`], and [`LockTable::poll_timeout`] tells the driver
//! when [`LockTable::handle_timeout`] next has work.
//!
//! Protocol in brief: a `get` on a free lock (or by its holder) is granted at once; otherwise
//! the requester is queued and renews its request by repeating the `get`. When the holder
//! releases, the head waiter becomes the holder at once but *unconfirmed*; its next renewal
//! returns [`LockGetOutcome::Granted`] and confirms the grant. Waiting requests not renewed,
//! and grants not confirmed, within [`LockConfig::renew_timeout`] are dropped (a revoked grant
//! passes on to the next waiter). A confirmed holder keeps the lock until it releases it.
//!
//! Every operation on a lock first applies that lock's due timeouts, so the outcome does not
//! depend on how promptly the driver calls [`LockTable::handle_timeout`].
//!
//! # Claims
//!
//! Every `get` carries a [`Claim`]: a number its client picked for that one `lock_get`
//! (renewals repeat it). The holding and each waiting request remember the claim of the `get`
//! that last asked for them, and a release or withdrawal that names a claim touches only a
//! holding or request of that claim. So a release or withdrawal that arrives late (held in a
//! stalled view-leader member's buffer while its client moved on and asked again) can no
//! longer release a later grant to the same requester, which its client believes it holds.
//! A release naming no claim (the command-line `lock_release` run in another process)
//! releases whatever the requester holds, as before.
//!
//! # Bounds
//!
//! A flood of `lock_get` with fresh lock or requester names must not grow the table without
//! bound nor make each request slower and slower. [`LockConfig`] bounds the entries (held
//! locks plus waiting requests, which also bounds the wait-for graph), the waiters of one
//! lock, and the requesters one deadlock check may visit; beyond any of them a `get` returns
//! [`LockGetOutcome::Busy`] with the bound named and changes nothing. Timers are kept in a
//! queue, so finding the next one costs nothing however many locks are held.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use log::{debug, info};
use serde::{Deserialize, Serialize};

/// Tuning and bounds of a [`LockTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockConfig {
    /// How long a waiting request lives without a renewal, and how long a grant made to a
    /// waiter stays unconfirmed before it is revoked.
    pub renew_timeout: Duration,
    /// The most entries the table holds at once: held locks plus waiting requests (every
    /// edge of the wait-for graph is one of them). A `get` that would add one more returns
    /// [`LockGetOutcome::Busy`].
    pub max_entries: usize,
    /// The most waiting requests one lock queues; a `get` that would queue one more returns
    /// [`LockGetOutcome::Busy`].
    pub max_waiters_per_lock: usize,
    /// The most requesters one deadlock check visits in the wait-for graph; a wait whose
    /// check would visit more returns [`LockGetOutcome::Busy`] (its cycle, if any, cannot be
    /// ruled out at a bounded cost).
    pub max_deadlock_walk: usize,
}

/// Default of [`LockConfig::max_entries`].
pub const MAX_ENTRIES: usize = 100_000;
/// Default of [`LockConfig::max_waiters_per_lock`].
pub const MAX_WAITERS_PER_LOCK: usize = 1_000;
/// Default of [`LockConfig::max_deadlock_walk`].
pub const MAX_DEADLOCK_WALK: usize = 10_000;

impl Default for LockConfig {
    /// A 1 s renewal timeout (the contract's "about 1 s"), [`MAX_ENTRIES`] entries,
    /// [`MAX_WAITERS_PER_LOCK`] waiters per lock, [`MAX_DEADLOCK_WALK`] requesters per check.
    fn default() -> LockConfig {
        LockConfig {
            renew_timeout: Duration::from_secs(1),
            max_entries: MAX_ENTRIES,
            max_waiters_per_lock: MAX_WAITERS_PER_LOCK,
            max_deadlock_walk: MAX_DEADLOCK_WALK,
        }
    }
}

/// Which bound refused a `get` ([`LockGetOutcome::Busy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// The table holds [`LockConfig::max_entries`] entries.
    Entries(usize),
    /// The lock's queue holds [`LockConfig::max_waiters_per_lock`] requests.
    WaitersPerLock(usize),
    /// The deadlock check would visit more than [`LockConfig::max_deadlock_walk`] requesters.
    DeadlockWalk(usize),
}

impl fmt::Display for Bound {
    /// A phrase naming the bound, for the error message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bound::Entries(max) => write!(
                f,
                "the lock table is full ({max} entries: held locks plus waiting requests)"
            ),
            Bound::WaitersPerLock(max) => {
                write!(f, "the lock's queue is full ({max} waiting requests)")
            }
            Bound::DeadlockWalk(max) => write!(
                f,
                "the wait-for graph behind this lock is too large to check for a deadlock \
                 (over {max} requesters)"
            ),
        }
    }
}

/// The number a client picks for one `lock_get` (see the module doc, "Claims").
pub type Claim = u64;

/// The answer to a `lock_get` (a first request or a renewal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockGetOutcome {
    /// The requester holds the lock: it was free, already held by this requester, or granted
    /// while the requester waited (this renewal confirms that grant).
    Granted,
    /// The request is queued (or its renewal was recorded) behind the current holder.
    Waiting {
        /// The requester currently holding the lock.
        holder: String,
        /// The request's place in the queue; 1 means next in line.
        position: usize,
    },
    /// Waiting would close a cycle in the wait-for graph. The request was not queued (a
    /// renewal's existing wait is removed); locks already held stay held.
    Deadlock {
        /// The cycle in wait order, starting with the requester:
        /// `[requester, lock, holder, lock2, holder2, ..., lock_k]`, where `lock_k` is held by
        /// the requester.
        cycle: Vec<String>,
    },
    /// A bound was reached (see [`Bound`]). Nothing changed; the client may retry later.
    Busy(Bound),
}

/// The answer to a `lock_release`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockReleaseOutcome {
    /// The requester held the lock; it passed to the next waiter or became free.
    Released,
    /// The requester does not hold the lock (it may be free, held by another, or the
    /// requester may only be waiting for it). Nothing changed.
    NotHolder,
}

/// The requester holding a lock.
#[derive(Debug, Clone)]
struct Holder {
    /// The requester's name.
    name: String,
    /// False for a grant made to a waiter that has not yet renewed to learn of it.
    confirmed: bool,
    /// When the lock was granted to this holder; an unconfirmed grant expires
    /// `renew_timeout` later.
    granted_at: Instant,
    /// The claim of the `get` that last asked for this holding.
    claim: Claim,
}

/// One queued request.
#[derive(Debug, Clone)]
struct Waiter {
    /// The requester's name.
    name: String,
    /// When the request was made or last renewed; it expires `renew_timeout` later.
    renewed_at: Instant,
    /// The claim of its last renewal.
    claim: Claim,
}

/// One lock in the table. A lock with no holder is removed from the table, so every entry
/// has a holder (and a lock with waiters therefore always has one to wait for).
#[derive(Debug, Clone)]
struct LockState {
    /// The current holder.
    holder: Holder,
    /// Waiting requests in FIFO order; each name appears at most once.
    waiters: VecDeque<Waiter>,
}

impl LockState {
    /// Returns the 0-based queue index of `requester`'s waiting request, if it has one.
    fn queue_index(&self, requester: &str) -> Option<usize> {
        self.waiters.iter().position(|w| w.name == requester)
    }
}

/// The wait-for graph's requester-to-lock edges: for each requester name, the locks it is
/// queued for (several clients may share a name). Kept in step with every queue change.
#[derive(Debug, Default)]
struct WaitIndex {
    /// Requester name to the names of the locks it waits for; never holds an empty set.
    by_requester: HashMap<String, BTreeSet<String>>,
    /// The number of edges (waiting requests in all queues).
    edges: usize,
}

impl WaitIndex {
    /// Records that `requester` waits for `lock`.
    fn add(&mut self, requester: &str, lock: &str) {
        if self
            .by_requester
            .entry(requester.to_owned())
            .or_default()
            .insert(lock.to_owned())
        {
            self.edges += 1;
        }
    }

    /// Forgets that `requester` waits for `lock` (no-op if it did not).
    fn remove(&mut self, requester: &str, lock: &str) {
        if let Some(locks) = self.by_requester.get_mut(requester) {
            if locks.remove(lock) {
                self.edges -= 1;
            }
            if locks.is_empty() {
                self.by_requester.remove(requester);
            }
        }
    }

    /// Forgets every wait of `requester`; returns the locks it waited for (empty if none).
    fn remove_requester(&mut self, requester: &str) -> BTreeSet<String> {
        let locks = self.by_requester.remove(requester).unwrap_or_default();
        self.edges -= locks.len();
        locks
    }

    /// Returns the locks `requester` waits for, in name order (empty if none).
    fn locks_of<'a>(&'a self, requester: &str) -> impl Iterator<Item = &'a str> + 'a {
        self.by_requester
            .get(requester)
            .into_iter()
            .flat_map(|locks| locks.iter().map(String::as_str))
    }
}

/// The lock table: every lock with a holder, its waiters, and the wait-for index.
#[derive(Debug)]
pub struct LockTable {
    /// Timeouts and bounds.
    config: LockConfig,
    /// Lock name to its state; only locks with a holder are present.
    locks: HashMap<String, LockState>,
    /// Which locks each requester waits for (for the deadlock walk).
    waits: WaitIndex,
    /// When to look at which lock's timeouts, earliest first. May hold stale entries (the
    /// lock was renewed, released or removed since): an entry counts only while `scheduled`
    /// names its instant for its lock, so a stale one only costs an early look.
    timers: BinaryHeap<Reverse<(Instant, String)>>,
    /// The live entry of `timers` per lock: never later than the lock's earliest deadline.
    scheduled: HashMap<String, Instant>,
}

impl LockTable {
    /// Builds an empty table with the given timeouts and bounds.
    pub fn new(config: LockConfig) -> LockTable {
        LockTable {
            config,
            locks: HashMap::new(),
            waits: WaitIndex::default(),
            timers: BinaryHeap::new(),
            scheduled: HashMap::new(),
        }
    }

    /// The number of entries: held locks plus waiting requests (see
    /// [`LockConfig::max_entries`]).
    pub fn entries(&self) -> usize {
        self.locks.len() + self.waits.edges
    }

    /// Handles `lock_get lock requester` with `claim` at `now`: a first request or a
    /// renewal. Grants a free lock (or confirms a pending grant), queues or renews a wait, or
    /// refuses the wait with `Deadlock` or `Busy`; see [`LockGetOutcome`]. A holding or wait
    /// it grants, confirms or renews takes `claim`.
    pub fn get(
        &mut self,
        now: Instant,
        lock: &str,
        requester: &str,
        claim: Claim,
    ) -> LockGetOutcome {
        self.expire(now, lock);
        let outcome = self.get_unexpired(now, lock, requester, claim);
        self.schedule(lock);
        outcome
    }

    /// [`LockTable::get`] once `lock`'s due timeouts are applied.
    fn get_unexpired(
        &mut self,
        now: Instant,
        lock: &str,
        requester: &str,
        claim: Claim,
    ) -> LockGetOutcome {
        let holder = match self.locks.get_mut(lock) {
            None => return self.grant_free(now, lock, requester, claim),
            Some(state) if state.holder.name == requester => {
                state.holder.claim = claim;
                if !state.holder.confirmed {
                    state.holder.confirmed = true;
                    info!("lock {lock}: grant to {requester} confirmed");
                }
                return LockGetOutcome::Granted;
            }
            Some(state) => state.holder.name.clone(),
        };
        let renewal = self
            .locks
            .get(lock)
            .is_some_and(|state| state.queue_index(requester).is_some());
        // Bounds first (a renewal adds nothing), so a refused wait costs no graph walk.
        if !renewal {
            if let Some(state) = self.locks.get(lock)
                && state.waiters.len() >= self.config.max_waiters_per_lock
            {
                debug!("lock {lock}: {requester} refused, queue full");
                return LockGetOutcome::Busy(Bound::WaitersPerLock(
                    self.config.max_waiters_per_lock,
                ));
            }
            if self.entries() >= self.config.max_entries {
                debug!("lock {lock}: {requester} refused, table full");
                return LockGetOutcome::Busy(Bound::Entries(self.config.max_entries));
            }
        }
        // A renewal is checked too: grants passed on since the wait began can close a cycle
        // when several clients share a requester name.
        match self.find_cycle(lock, requester, &holder) {
            Walk::Clear => {}
            Walk::Cycle(cycle) => {
                self.remove_waiter(lock, requester);
                info!("lock {lock}: {requester} refused, deadlock {cycle:?}");
                return LockGetOutcome::Deadlock { cycle };
            }
            Walk::TooLong => {
                // Neither a deadlock nor its absence is known: no new wait (a renewal is not
                // recorded either, so its wait lapses unless a later check succeeds).
                debug!("lock {lock}: {requester} refused, wait-for graph too large");
                return LockGetOutcome::Busy(Bound::DeadlockWalk(self.config.max_deadlock_walk));
            }
        }
        self.enqueue_or_renew(now, lock, requester, claim, holder)
    }

    /// Handles `lock_release lock requester` at `now`: if `requester` holds the lock
    /// (confirmed or not), under `claim` when one is named, passes it on and returns
    /// `Released`; otherwise `NotHolder`.
    pub fn release(
        &mut self,
        now: Instant,
        lock: &str,
        requester: &str,
        claim: Option<Claim>,
    ) -> LockReleaseOutcome {
        self.expire(now, lock);
        if !self.holds(lock, requester, claim) {
            return LockReleaseOutcome::NotHolder;
        }
        info!("lock {lock}: released by {requester}");
        self.pass_on(now, lock);
        self.schedule(lock);
        LockReleaseOutcome::Released
    }

    /// Withdraws `requester`'s `lock_get` of `claim` on `lock` at `now` (it gave up):
    /// removes its waiting request, or, if a grant raced the withdrawal, releases the lock to
    /// the next waiter; a wait or holding last asked for under another claim is left alone.
    /// Returns true if a wait or a hold of `requester` was removed.
    pub fn withdraw(&mut self, now: Instant, lock: &str, requester: &str, claim: Claim) -> bool {
        self.expire(now, lock);
        let waiting_under_claim = self.locks.get(lock).is_some_and(|state| {
            state
                .waiters
                .iter()
                .any(|w| w.name == requester && w.claim == claim)
        });
        if waiting_under_claim && self.remove_waiter(lock, requester) {
            debug!("lock {lock}: {requester} withdrew its request");
            return true;
        }
        if self.holds(lock, requester, Some(claim)) {
            info!("lock {lock}: {requester} withdrew after being granted; releasing");
            self.pass_on(now, lock);
            self.schedule(lock);
            return true;
        }
        false
    }

    /// Forgets departed servers at `now`: removes every waiting request of `requesters` and
    /// releases every lock they hold (passing it on). Returns the released locks' names,
    /// sorted.
    pub fn release_all_of(&mut self, now: Instant, requesters: &[&str]) -> Vec<String> {
        for &name in requesters {
            for lock in self.waits.remove_requester(name) {
                if let Some(state) = self.locks.get_mut(&lock) {
                    state.waiters.retain(|w| w.name != name);
                    debug!("lock {lock}: request of departed {name} removed");
                }
            }
        }
        let gone: HashSet<&str> = requesters.iter().copied().collect();
        let mut held: Vec<String> = self
            .locks
            .iter()
            .filter(|(_, state)| gone.contains(state.holder.name.as_str()))
            .map(|(lock, _)| lock.clone())
            .collect();
        held.sort();
        for lock in &held {
            info!("lock {lock}: released, its holder left the view");
            self.pass_on(now, lock);
            self.schedule(lock);
        }
        held
    }

    /// Applies every due timeout at `now`: drops waiting requests not renewed within
    /// `renew_timeout`, and revokes unconfirmed grants older than that (passing them on).
    /// Looks only at the locks whose timer came due.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((at, _))) = self.timers.peek()
            && *at <= now
        {
            let Some(Reverse((at, lock))) = self.timers.pop() else {
                break;
            };
            if self.scheduled.get(&lock) != Some(&at) {
                continue; // stale: the lock's live entry is another one
            }
            self.scheduled.remove(&lock);
            self.expire(now, &lock);
            self.schedule(&lock);
        }
    }

    /// Returns an instant at which [`LockTable::handle_timeout`] may have work (a waiter's
    /// renewal or an unconfirmed grant's confirmation falls due), or None. Never later than
    /// the earliest such deadline; it may be earlier (a renewal since), in which case
    /// `handle_timeout` changes nothing and the next call returns a later instant.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Makes sure `lock`'s earliest deadline (if any) has a timer no later than it. Called
    /// after every change to the lock.
    fn schedule(&mut self, lock: &str) {
        let timeout = self.config.renew_timeout;
        let Some(state) = self.locks.get(lock) else {
            return;
        };
        let grant = (!state.holder.confirmed).then_some(state.holder.granted_at);
        let Some(earliest) = grant
            .into_iter()
            .chain(state.waiters.iter().map(|w| w.renewed_at))
            .filter_map(|since| since.checked_add(timeout))
            .min()
        else {
            return;
        };
        if self.scheduled.get(lock).is_some_and(|&at| at <= earliest) {
            return;
        }
        self.scheduled.insert(lock.to_owned(), earliest);
        self.timers.push(Reverse((earliest, lock.to_owned())));
    }

    /// Returns true if `requester` holds `lock` (confirmed or not), under `claim` if one is
    /// named.
    fn holds(&self, lock: &str, requester: &str, claim: Option<Claim>) -> bool {
        self.locks.get(lock).is_some_and(|state| {
            state.holder.name == requester && claim.is_none_or(|c| c == state.holder.claim)
        })
    }

    /// Returns the name of `lock`'s holder (confirmed or not), or None if it is free.
    pub fn holder(&self, lock: &str) -> Option<&str> {
        self.locks.get(lock).map(|state| state.holder.name.as_str())
    }

    /// Returns the number of locks in the table (held locks; free ones are not kept).
    pub fn len(&self) -> usize {
        self.locks.len()
    }

    /// Returns true if no lock is held.
    pub fn is_empty(&self) -> bool {
        self.locks.is_empty()
    }

    /// Grants the absent (free) `lock` to `requester` under `claim` at `now`, confirmed,
    /// unless the table is full (`Busy`).
    fn grant_free(
        &mut self,
        now: Instant,
        lock: &str,
        requester: &str,
        claim: Claim,
    ) -> LockGetOutcome {
        if self.entries() >= self.config.max_entries {
            debug!("lock {lock}: {requester} refused, table full");
            return LockGetOutcome::Busy(Bound::Entries(self.config.max_entries));
        }
        let holder = Holder {
            name: requester.to_owned(),
            confirmed: true,
            granted_at: now,
            claim,
        };
        self.locks.insert(
            lock.to_owned(),
            LockState {
                holder,
                waiters: VecDeque::new(),
            },
        );
        debug!("lock {lock}: granted to {requester}");
        LockGetOutcome::Granted
    }

    /// Renews `requester`'s existing wait for `lock` at `now` under `claim`, or queues a new
    /// one (the caller checked the bounds). `holder` is the lock's current holder, for the
    /// answer.
    fn enqueue_or_renew(
        &mut self,
        now: Instant,
        lock: &str,
        requester: &str,
        claim: Claim,
        holder: String,
    ) -> LockGetOutcome {
        let Some(state) = self.locks.get_mut(lock) else {
            // Not reachable (the caller saw a holder), but a missing lock is simply free.
            return self.grant_free(now, lock, requester, claim);
        };
        if let Some(index) = state.queue_index(requester) {
            if let Some(waiter) = state.waiters.get_mut(index) {
                waiter.renewed_at = now;
                waiter.claim = claim;
            }
            return LockGetOutcome::Waiting {
                holder,
                position: index + 1,
            };
        }
        state.waiters.push_back(Waiter {
            name: requester.to_owned(),
            renewed_at: now,
            claim,
        });
        let position = state.waiters.len();
        self.waits.add(requester, lock);
        debug!("lock {lock}: {requester} waits behind {holder} at position {position}");
        LockGetOutcome::Waiting { holder, position }
    }

    /// Removes `requester`'s waiting request for `lock`; returns true if there was one.
    fn remove_waiter(&mut self, lock: &str, requester: &str) -> bool {
        let Some(state) = self.locks.get_mut(lock) else {
            return false;
        };
        let Some(index) = state.queue_index(requester) else {
            return false;
        };
        state.waiters.remove(index);
        self.waits.remove(requester, lock);
        true
    }

    /// Takes `lock` from its holder at `now` and grants it (unconfirmed) to the first waiter
    /// still live, or removes the lock from the table if none is.
    fn pass_on(&mut self, now: Instant, lock: &str) {
        let timeout = self.config.renew_timeout;
        let Some(state) = self.locks.get_mut(lock) else {
            return;
        };
        match next_holder(lock, &mut state.waiters, &mut self.waits, now, timeout) {
            Some(holder) => state.holder = holder,
            None => {
                self.locks.remove(lock);
                debug!("lock {lock}: now free");
            }
        }
    }

    /// Applies `lock`'s due timeouts at `now` (see [`expire_state`]), removing it if it
    /// became free.
    fn expire(&mut self, now: Instant, lock: &str) {
        let timeout = self.config.renew_timeout;
        let Some(state) = self.locks.get_mut(lock) else {
            return;
        };
        if !expire_state(lock, state, &mut self.waits, now, timeout) {
            self.locks.remove(lock);
        }
    }

    /// Looks for a wait-for cycle that `requester` waiting for `lock` (held by `holder`)
    /// would close. Walks depth-first from `holder` through the locks each requester waits
    /// for and their holders, visiting each requester once and at most
    /// [`LockConfig::max_deadlock_walk`] of them. Returns the cycle in wait order (see
    /// [`LockGetOutcome::Deadlock`]), that there is none, or that the walk was cut short.
    fn find_cycle<'a>(&'a self, lock: &'a str, requester: &'a str, holder: &'a str) -> Walk {
        // For each requester reached: (the lock it holds that led here, the waiter on it).
        let mut parent: HashMap<&str, (&str, &str)> = HashMap::new();
        let mut visited: HashSet<&str> = HashSet::from([holder]);
        let mut stack = vec![holder];
        while let Some(current) = stack.pop() {
            // The locks `current` waits for, in name order, each with its holder.
            let edges: Vec<(&str, &str)> = self
                .waits
                .locks_of(current)
                .filter_map(|waited| Some((waited, self.locks.get(waited)?.holder.name.as_str())))
                .collect();
            if let Some(&(waited, _)) = edges.iter().find(|&&(_, next)| next == requester) {
                return Walk::Cycle(trace_cycle(
                    &parent, lock, requester, holder, waited, current,
                ));
            }
            // Pushed in reverse so that the walk explores them in name order.
            for &(waited, next) in edges.iter().rev() {
                if visited.insert(next) {
                    if visited.len() > self.config.max_deadlock_walk {
                        return Walk::TooLong;
                    }
                    parent.insert(next, (waited, current));
                    stack.push(next);
                }
            }
        }
        Walk::Clear
    }
}

/// The outcome of a deadlock check ([`LockTable::find_cycle`]).
enum Walk {
    /// No cycle.
    Clear,
    /// This cycle, in wait order.
    Cycle(Vec<String>),
    /// The walk reached [`LockConfig::max_deadlock_walk`] requesters before finishing.
    TooLong,
}

/// Builds the cycle found by [`LockTable::find_cycle`]: `requester` waits for `lock` held by
/// `holder`, ..., `last_waiter` waits for `last_lock` held by `requester`. Follows `parent`
/// back from `last_waiter` to `holder` and returns `[requester, lock, holder, ..., last_lock]`.
fn trace_cycle(
    parent: &HashMap<&str, (&str, &str)>,
    lock: &str,
    requester: &str,
    holder: &str,
    last_lock: &str,
    last_waiter: &str,
) -> Vec<String> {
    let mut reversed = vec![last_lock, last_waiter];
    let mut at = last_waiter;
    while at != holder {
        let Some(&(held, waiter)) = parent.get(at) else {
            break;
        };
        reversed.push(held);
        reversed.push(waiter);
        at = waiter;
    }
    reversed.push(lock);
    reversed.push(requester);
    reversed.into_iter().rev().map(str::to_owned).collect()
}

/// A lock table as plain data, for the snapshots of the view-leader group: instants are
/// microseconds since an origin instant of the member that took it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockImage {
    /// Every lock with a holder, by name.
    locks: Vec<LockEntryImage>,
}

/// One lock of a [`LockImage`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct LockEntryImage {
    /// The lock's name.
    name: String,
    /// Its holder's name.
    holder: String,
    /// Whether the holder confirmed the grant.
    confirmed: bool,
    /// When it was granted, µs since the origin.
    granted_at: u64,
    /// The holding's claim.
    claim: Claim,
    /// Waiting requesters in FIFO order, each with its last renewal (µs since the origin)
    /// and its claim.
    waiters: Vec<(String, u64, Claim)>,
}

/// Microseconds from `origin` to `at` (0 if `at` is earlier).
fn micros_since(origin: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(origin).as_micros()).unwrap_or(u64::MAX)
}

impl LockTable {
    /// The table as plain data, instants measured from `origin` (see [`LockImage`]).
    pub fn image(&self, origin: Instant) -> LockImage {
        let mut locks: Vec<LockEntryImage> = self
            .locks
            .iter()
            .map(|(name, state)| LockEntryImage {
                name: name.clone(),
                holder: state.holder.name.clone(),
                confirmed: state.holder.confirmed,
                granted_at: micros_since(origin, state.holder.granted_at),
                claim: state.holder.claim,
                waiters: state
                    .waiters
                    .iter()
                    .map(|w| (w.name.clone(), micros_since(origin, w.renewed_at), w.claim))
                    .collect(),
            })
            .collect();
        locks.sort_by(|a, b| a.name.cmp(&b.name));
        LockImage { locks }
    }

    /// Rebuilds a table with settings `config` from `image`, whose instants are measured
    /// from `origin`; the wait-for index and the timers are derived again.
    pub fn restore(config: LockConfig, image: &LockImage, origin: Instant) -> LockTable {
        let mut table = LockTable::new(config);
        let at = |micros: u64| origin + Duration::from_micros(micros);
        for entry in &image.locks {
            let waiters: VecDeque<Waiter> = entry
                .waiters
                .iter()
                .map(|(name, renewed, claim)| Waiter {
                    name: name.clone(),
                    renewed_at: at(*renewed),
                    claim: *claim,
                })
                .collect();
            for w in &waiters {
                table.waits.add(&w.name, &entry.name);
            }
            table.locks.insert(
                entry.name.clone(),
                LockState {
                    holder: Holder {
                        name: entry.holder.clone(),
                        confirmed: entry.confirmed,
                        granted_at: at(entry.granted_at),
                        claim: entry.claim,
                    },
                    waiters,
                },
            );
            table.schedule(&entry.name);
        }
        table
    }
}

/// Applies `lock`'s due timeouts at `now`: drops waiters not renewed within `timeout` and
/// revokes an unconfirmed grant older than `timeout`, passing it on. Keeps `waits` in step.
/// Returns false if the lock became free (the caller removes it from the table).
fn expire_state(
    lock: &str,
    state: &mut LockState,
    waits: &mut WaitIndex,
    now: Instant,
    timeout: Duration,
) -> bool {
    state.waiters.retain(|w| {
        if !expired(w.renewed_at, timeout, now) {
            return true;
        }
        info!("lock {lock}: request of {} dropped, not renewed", w.name);
        waits.remove(&w.name, lock);
        false
    });
    let holder = &state.holder;
    if holder.confirmed || !expired(holder.granted_at, timeout, now) {
        return true;
    }
    info!("lock {lock}: unconfirmed grant to {} revoked", holder.name);
    match next_holder(lock, &mut state.waiters, waits, now, timeout) {
        Some(next) => {
            state.holder = next;
            true
        }
        None => {
            debug!("lock {lock}: now free");
            false
        }
    }
}

/// Pops `lock`'s waiters (keeping `waits` in step) until one still live at `now` is found,
/// and returns it as the new, unconfirmed holder granted at `now`; None if no live waiter.
fn next_holder(
    lock: &str,
    waiters: &mut VecDeque<Waiter>,
    waits: &mut WaitIndex,
    now: Instant,
    timeout: Duration,
) -> Option<Holder> {
    while let Some(waiter) = waiters.pop_front() {
        waits.remove(&waiter.name, lock);
        if expired(waiter.renewed_at, timeout, now) {
            info!(
                "lock {lock}: request of {} dropped, not renewed",
                waiter.name
            );
            continue;
        }
        info!(
            "lock {lock}: granted to waiter {} (unconfirmed)",
            waiter.name
        );
        return Some(Holder {
            name: waiter.name,
            confirmed: false,
            granted_at: now,
            claim: waiter.claim,
        });
    }
    None
}

/// Returns true if something stamped at `since` has lived `timeout` or more at `now`. A
/// deadline beyond the range of [`Instant`] never expires.
fn expired(since: Instant, timeout: Duration, now: Instant) -> bool {
    since
        .checked_add(timeout)
        .is_some_and(|deadline| now >= deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns a table with the default configuration (1 s renewal timeout).
    fn table() -> LockTable {
        LockTable::new(LockConfig::default())
    }

    /// Returns the instant `ms` milliseconds after `base` (virtual time).
    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    /// Builds the `Waiting` outcome for `holder` and `position`.
    fn waiting(holder: &str, position: usize) -> LockGetOutcome {
        LockGetOutcome::Waiting {
            holder: holder.to_owned(),
            position,
        }
    }

    /// Returns the names queued for `lock`, in order (empty if the lock is absent).
    fn queue(table: &LockTable, lock: &str) -> Vec<String> {
        table
            .locks
            .get(lock)
            .map(|s| s.waiters.iter().map(|w| w.name.clone()).collect())
            .unwrap_or_default()
    }

    /// Returns whether `lock`'s current grant is confirmed (None if the lock is free).
    fn confirmed(table: &LockTable, lock: &str) -> Option<bool> {
        table.locks.get(lock).map(|s| s.holder.confirmed)
    }

    /// Builds a `Deadlock` outcome from the cycle's names.
    fn deadlock(cycle: &[&str]) -> LockGetOutcome {
        LockGetOutcome::Deadlock {
            cycle: cycle.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Contract: `lock_get` of a free lock is granted at once, and the grant is confirmed.
    #[test]
    fn free_lock_is_granted_at_once() {
        let t0 = Instant::now();
        let mut t = table();
        assert!(t.is_empty());
        assert_eq!(t.get(t0, "L", "a", 0), LockGetOutcome::Granted);
        assert_eq!(t.holder("L"), Some("a"));
        assert_eq!(confirmed(&t, "L"), Some(true));
        assert_eq!(t.len(), 1);
    }

    /// Contract: `lock_get` by the lock's own holder is granted again at once, without queueing.
    #[test]
    fn holder_getting_its_lock_again_is_granted() {
        let t0 = Instant::now();
        let mut t = table();
        t.get(t0, "L", "a", 0);
        assert_eq!(t.get(at(t0, 5_000), "L", "a", 0), LockGetOutcome::Granted);
        assert_eq!(t.holder("L"), Some("a"));
        assert!(queue(&t, "L").is_empty());
    }

    /// Contract: other requesters wait in FIFO order, told the holder and their position; a
    /// renewal keeps a waiter's place in line.
    #[test]
    fn second_requester_waits_with_holder_and_position() {
        let t0 = Instant::now();
        let mut t = table();
        t.get(t0, "L", "a", 0);
        assert_eq!(t.get(t0, "L", "b", 0), waiting("a", 1));
        assert_eq!(t.get(t0, "L", "c", 0), waiting("a", 2));
        // A renewal keeps the place in line.
        assert_eq!(t.get(at(t0, 250), "L", "b", 0), waiting("a", 1));
        assert_eq!(queue(&t, "L"), ["b", "c"]);
    }

    /// Contract: each release grants the head waiter (FIFO order); README: the grant stays
    /// unconfirmed until that waiter's next renewal.
    #[test]
    fn release_grants_waiters_in_fifo_order_each_confirmed_by_renewal() {
        let t0 = Instant::now();
        let mut t = table();
        t.get(t0, "L", "h", 0);
        t.get(t0, "L", "w1", 0);
        t.get(t0, "L", "w2", 0);
        t.get(t0, "L", "w3", 0);
        let mut now = t0;
        let mut previous = "h";
        for (i, next) in ["w1", "w2", "w3"].into_iter().enumerate() {
            now += Duration::from_millis(200);
            // Everyone still waiting renews, so nobody is dropped.
            for w in ["w1", "w2", "w3"].iter().skip(i) {
                t.get(now, "L", w, 0);
            }
            assert_eq!(
                t.release(now, "L", previous, None),
                LockReleaseOutcome::Released
            );
            assert_eq!(t.holder("L"), Some(next));
            assert_eq!(confirmed(&t, "L"), Some(false));
            assert_eq!(t.get(now, "L", next, 0), LockGetOutcome::Granted);
            assert_eq!(confirmed(&t, "L"), Some(true));
            previous = next;
        }
        assert_eq!(
            t.release(now, "L", "w3", None),
            LockReleaseOutcome::Released
        );
        assert_eq!(t.holder("L"), None);
        assert!(t.is_empty());
    }

    /// Contract: `lock_release` by a requester that does not hold the lock, even one waiting for
    /// it, is `not_holder` and changes nothing.
    #[test]
    fn release_by_non_holder_or_by_waiter_is_not_holder() {
        let t0 = Instant::now();
        let mut t = table();
        assert_eq!(t.release(t0, "L", "a", None), LockReleaseOutcome::NotHolder);
        t.get(t0, "L", "a", 0);
        t.get(t0, "L", "b", 0);
        assert_eq!(t.release(t0, "L", "x", None), LockReleaseOutcome::NotHolder);
        assert_eq!(t.release(t0, "L", "b", None), LockReleaseOutcome::NotHolder);
        assert_eq!(t.holder("L"), Some("a"));
        assert_eq!(queue(&t, "L"), ["b"]);
    }

    /// Contract: a waiter not renewed for 1 s is dropped (with its wait-for edges); one that
    /// keeps renewing keeps its place.
    #[test]
    fn unrenewed_waiter_is_dropped_and_renewed_waiter_kept() {
        let t0 = Instant::now();
        let mut t = table();
        t.get(t0, "L", "a", 0);
        t.get(t0, "L", "stale", 0);
        t.get(t0, "L", "live", 0);
        t.get(at(t0, 300), "L", "live", 0);
        t.get(at(t0, 600), "L", "live", 0);
        t.handle_timeout(at(t0, 999));
        assert_eq!(queue(&t, "L"), ["stale", "live"]);
        t.handle_timeout(at(t0, 1_000));
        assert_eq!(queue(&t, "L"), ["live"]);
        assert!(t.waits.locks_of("stale").next().is_none());
        assert_eq!(t.get(at(t0, 1_100), "L", "live", 0), waiting("a", 1));
        assert_eq!(t.holder("L"), Some("a"));
    }

    /// README: a grant not confirmed within 1 s is revoked and passes to the next live waiter;
    /// the revoked requester has to queue again as a newcomer.
    #[test]
    fn unconfirmed_grant_revoked_after_renew_timeout_passes_to_next_waiter() {
        let t0 = Instant::now();
        let mut t = table();
        t.get(t0, "L", "a", 0);
        t.get(t0, "L", "b", 0);
        t.get(t0, "L", "c", 0);
        t.get(at(t0, 500), "L", "b", 0);
        t.get(at(t0, 500), "L", "c", 0);
        t.release(at(t0, 500), "L", "a", None);
        assert_eq!(t.holder("L"), Some("b"));
        // c keeps renewing; b never confirms.
        t.get(at(t0, 900), "L", "c", 0);
        t.get(at(t0, 1_400), "L", "c", 0);
        t.handle_timeout(at(t0, 1_499));
        assert_eq!(t.holder("L"), Some("b"));
        t.handle_timeout(at(t0, 1_500));
        assert_eq!(t.holder("L"), Some("c"));
        assert_eq!(confirmed(&t, "L"), Some(false));
        assert_eq!(t.get(at(t0, 1_600), "L", "c", 0), LockGetOutcome::Granted);
        // The revoked requester is only a newcomer now.
        assert_eq!(t.get(at(t0, 1_700), "L", "b", 0), waiting("c", 1));
    }

    /// Issue 16 (simulator seed 9757): a release naming the claim of an earlier `lock_get`
    /// arrives after the same requester was granted the lock again under a new claim: it
    /// leaves the new holding alone. A release naming no claim still releases it.
    #[test]
    fn a_late_release_of_an_earlier_claim_leaves_a_later_grant_alone() {
        let t0 = Instant::now();
        let mut t = table();
        assert_eq!(t.get(t0, "L", "a", 1), LockGetOutcome::Granted);
        assert_eq!(
            t.release(t0, "L", "a", Some(1)),
            LockReleaseOutcome::Released
        );
        assert_eq!(t.get(at(t0, 10), "L", "a", 2), LockGetOutcome::Granted);
        assert_eq!(
            t.release(at(t0, 20), "L", "a", Some(1)),
            LockReleaseOutcome::NotHolder
        );
        assert_eq!(t.holder("L"), Some("a"));
        // A waiter granted the lock carries its claim into the holding.
        assert_eq!(t.get(at(t0, 30), "L", "b", 5), waiting("a", 1));
        assert_eq!(
            t.release(at(t0, 40), "L", "a", None),
            LockReleaseOutcome::Released
        );
        assert_eq!(t.holder("L"), Some("b"));
        assert_eq!(
            t.release(at(t0, 50), "L", "b", Some(4)),
            LockReleaseOutcome::NotHolder
        );
        assert_eq!(
            t.release(at(t0, 60), "L", "b", Some(5)),
            LockReleaseOutcome::Released
        );
        assert_eq!(t.holder("L"), None);
    }

    /// A holder asking again takes the new claim: the earlier claim no longer releases it.
    #[test]
    fn asking_again_for_a_held_lock_moves_the_holding_to_the_new_claim() {
        let t0 = Instant::now();
        let mut t = table();
        t.get(t0, "L", "a", 1);
        assert_eq!(t.get(t0, "L", "a", 2), LockGetOutcome::Granted);
        assert!(!t.withdraw(t0, "L", "a", 1));
        assert_eq!(
            t.release(t0, "L", "a", Some(1)),
            LockReleaseOutcome::NotHolder
        );
        assert_eq!(t.holder("L"), Some("a"));
        assert!(t.withdraw(t0, "L", "a", 2));
        assert_eq!(t.holder("L"), None);
    }

    /// A late withdrawal of an earlier claim leaves a wait renewed under a later one (and a
    /// grant it led to) alone; the withdrawal of the current claim removes it.
    #[test]
    fn a_withdrawal_removes_only_the_wait_of_its_claim() {
        let t0 = Instant::now();
        let mut t = table();
        t.get(t0, "L", "a", 1);
        t.get(t0, "L", "b", 7);
        t.get(at(t0, 100), "L", "b", 8);
        assert!(!t.withdraw(at(t0, 150), "L", "b", 7));
        assert_eq!(queue(&t, "L"), ["b"]);
        assert!(t.withdraw(at(t0, 200), "L", "b", 8));
        assert!(queue(&t, "L").is_empty());
        // A grant that raced: the withdrawal of the claim it was made under releases it.
        t.get(at(t0, 300), "L", "b", 9);
        t.release(at(t0, 400), "L", "a", None);
        assert_eq!(t.holder("L"), Some("b"));
        assert!(!t.withdraw(at(t0, 500), "L", "b", 8));
        assert_eq!(t.holder("L"), Some("b"));
        assert!(t.withdraw(at(t0, 500), "L", "b", 9));
        assert_eq!(t.holder("L"), None);
    }

    /// Claims survive a snapshot: the restored table judges releases as the original did.
    #[test]
    fn claims_survive_an_image_and_restore() {
        let t0 = Instant::now();
        let mut t = table();
        t.get(t0, "L", "a", 1);
        t.get(t0, "L", "b", 2);
        let image = t.image(t0);
        let mut restored = LockTable::restore(LockConfig::default(), &image, t0);
        assert_eq!(restored.image(t0), image);
        assert!(!restored.withdraw(t0, "L", "b", 1));
        assert_eq!(
            restored.release(t0, "L", "a", Some(2)),
            LockReleaseOutcome::NotHolder
        );
        assert_eq!(
            restored.release(t0, "L", "a", Some(1)),
            LockReleaseOutcome::Released
        );
        assert_eq!(restored.holder("L"), Some("b"));
        assert!(restored.withdraw(t0, "L", "b", 2));
        assert_eq!(restored.holder("L"), None);
    }

    /// A revoked grant with no waiter left to take it frees the lock and empties the table.
    #[test]
    fn revoked_grant_with_no_live_waiter_frees_the_lock() {
        let t0 = Instant::now();
        let mut t = table();
        t.get(t0, "L", "a", 0);
        t.get(t0, "L", "b", 0);
        t.release(at(t0, 100), "L", "a", None);
        t.handle_timeout(at(t0, 1_100));
        assert_eq!(t.holder("L"), None);
        assert!(t.is_empty());
        assert!(t.waits.by_requester.is_empty());
    }

    /// A confirmed holder keeps its lock however long it goes without renewing (an hour here).
    #[test]
    fn confirmed_holder_never_expires() {
        let t0 = Instant::now();
        let mut t = table();
        t.get(t0, "L", "a", 0);
        t.get(t0, "L", "b", 0);
        t.release(t0, "L", "a", None);
        t.get(at(t0, 100), "L", "b", 0);
        t.handle_timeout(at(t0, 3_600_000));
        assert_eq!(t.holder("L"), Some("b"));
    }

    /// Contract: a `lock_get` that gives up withdraws its wait and later waiters move up; a
    /// repeated or unknown withdrawal reports false.
    #[test]
    fn withdraw_removes_a_waiter() {
        let t0 = Instant::now();
        let mut t = table();
        t.get(t0, "L", "a", 0);
        t.get(t0, "L", "b", 0);
        t.get(t0, "L", "c", 0);
        assert!(t.withdraw(t0, "L", "b", 0));
        assert_eq!(queue(&t, "L"), ["c"]);
        assert_eq!(t.holder("L"), Some("a"));
        assert!(!t.withdraw(t0, "L", "b", 0));
        assert!(!t.withdraw(t0, "M", "b", 0));
        assert_eq!(t.get(t0, "L", "c", 0), waiting("a", 1));
    }

    /// Contract: if a grant raced the withdrawal, withdrawing releases the lock to the next waiter.
    #[test]
    fn withdraw_after_raced_grant_releases_to_next_waiter() {
        let t0 = Instant::now();
        let mut t = table();
        t.get(t0, "L", "a", 0);
        t.get(t0, "L", "b", 0);
        t.get(t0, "L", "c", 0);
        t.release(at(t0, 100), "L", "a", None);
        assert_eq!(t.holder("L"), Some("b"));
        assert!(t.withdraw(at(t0, 150), "L", "b", 0));
        assert_eq!(t.holder("L"), Some("c"));
        assert!(queue(&t, "L").is_empty());
        assert!(t.withdraw(at(t0, 200), "L", "c", 0));
        assert!(t.is_empty());
    }

    /// Contract: when a server leaves, the locks its requester names hold pass to their next
    /// waiters or are freed, and their waits are removed.
    #[test]
    fn release_all_of_releases_held_locks_and_removes_waits() {
        let t0 = Instant::now();
        let mut t = table();
        t.get(t0, "A", "s1", 0);
        t.get(t0, "B", "s1", 0);
        t.get(t0, "C", "s2", 0);
        t.get(t0, "A", "x", 0);
        t.get(t0, "C", "s1", 0);
        t.get(t0, "C", "y", 0);
        t.get(t0, "D", "z", 0);
        t.get(t0, "D", "s2", 0);
        let released = t.release_all_of(at(t0, 10), &["s1", "s2"]);
        assert_eq!(released, ["A", "B", "C"]);
        assert_eq!(t.holder("A"), Some("x"));
        assert_eq!(t.holder("B"), None);
        assert_eq!(t.holder("C"), Some("y"));
        assert_eq!(t.holder("D"), Some("z"));
        assert!(queue(&t, "D").is_empty());
        assert_eq!(t.len(), 3);
        assert!(t.waits.by_requester.is_empty());
    }

    /// Contract: a wait closing a two-party cycle fails at once with `deadlock` naming
    /// `[a, B, b, A]`; locks already held and the queues stay as they were.
    #[test]
    fn two_party_deadlock_reports_cycle_and_changes_nothing() {
        let t0 = Instant::now();
        let mut t = table();
        t.get(t0, "A", "a", 0);
        t.get(t0, "B", "b", 0);
        assert_eq!(t.get(t0, "A", "b", 0), waiting("a", 1));
        assert_eq!(t.get(t0, "B", "a", 0), deadlock(&["a", "B", "b", "A"]));
        assert_eq!(t.holder("A"), Some("a"));
        assert_eq!(t.holder("B"), Some("b"));
        assert!(queue(&t, "B").is_empty());
        assert_eq!(queue(&t, "A"), ["b"]);
    }

    /// Contract: a three-party wait-for cycle fails with `deadlock`, named in wait order, and the
    /// closing wait is not queued.
    #[test]
    fn three_party_deadlock_is_detected() {
        let t0 = Instant::now();
        let mut t = table();
        t.get(t0, "A", "a", 0);
        t.get(t0, "B", "b", 0);
        t.get(t0, "C", "c", 0);
        assert_eq!(t.get(t0, "C", "b", 0), waiting("c", 1));
        assert_eq!(t.get(t0, "A", "c", 0), waiting("a", 1));
        assert_eq!(
            t.get(t0, "B", "a", 0),
            deadlock(&["a", "B", "b", "C", "c", "A"])
        );
        assert!(queue(&t, "B").is_empty());
    }

    /// A wait-for walk that branches (a diamond) without coming back to the requester is no
    /// deadlock; a later wait that does close a cycle is reported.
    #[test]
    fn chain_not_returning_to_requester_is_not_a_deadlock() {
        let t0 = Instant::now();
        let mut t = table();
        t.get(t0, "A", "a", 0);
        t.get(t0, "B", "b", 0);
        t.get(t0, "C", "c", 0);
        t.get(t0, "E", "e", 0);
        t.get(t0, "B", "a", 0);
        t.get(t0, "C", "b", 0);
        t.get(t0, "C", "e", 0);
        // A diamond: a (a name shared by two clients) waits for B and E, whose holders both
        // wait for C, held by c.
        assert_eq!(t.get(t0, "E", "a", 0), waiting("e", 1));
        // d holds nothing, so the walk a -> {b, e} -> c never comes back to d.
        assert_eq!(t.get(t0, "A", "d", 0), waiting("a", 1));
        // c holds C: its wait on A closes c -> A -> a -> B -> b -> C.
        assert_eq!(
            t.get(t0, "A", "c", 0),
            deadlock(&["c", "A", "a", "B", "b", "C"])
        );
    }

    /// The deadlock walk terminates when it meets a cycle the requester is not part of, and the
    /// requester simply waits.
    #[test]
    fn walk_terminates_on_a_cycle_not_involving_the_requester() {
        let t0 = Instant::now();
        let mut t = table();
        // A cycle y <-> z formed by a grant passing on (y is a name shared by two clients).
        t.get(t0, "L", "h", 0);
        t.get(t0, "M", "z", 0);
        t.get(t0, "L", "y", 0);
        t.get(t0, "M", "y", 0);
        t.get(t0, "L", "z", 0);
        t.release(t0, "L", "h", None);
        assert_eq!(t.holder("L"), Some("y"));
        // r holds nothing, so its wait on L closes no cycle even though the walk meets one.
        assert_eq!(t.get(t0, "L", "r", 0), waiting("y", 2));
    }

    /// A renewal that closes a cycle (after a grant moved on) fails with `deadlock` and drops that
    /// wait; the other party's wait and held locks stay.
    #[test]
    fn renewal_closing_a_cycle_reports_deadlock_and_drops_the_wait() {
        let t0 = Instant::now();
        let mut t = table();
        t.get(t0, "L", "h", 0);
        t.get(t0, "M", "z", 0);
        t.get(t0, "L", "y", 0);
        t.get(t0, "M", "y", 0);
        t.get(t0, "L", "z", 0);
        t.release(t0, "L", "h", None);
        // Now z waits for L held by y, and y waits for M held by z.
        assert_eq!(
            t.get(at(t0, 100), "L", "z", 0),
            deadlock(&["z", "L", "y", "M"])
        );
        assert!(queue(&t, "L").is_empty());
        assert_eq!(t.holder("M"), Some("z"));
        assert_eq!(t.get(at(t0, 100), "M", "y", 0), waiting("z", 1));
    }

    /// `poll_timeout` is None when nothing can expire, else the earliest deadline of a waiter or
    /// an unconfirmed grant (last renewal + 1 s).
    #[test]
    fn poll_timeout_is_none_when_empty_and_earliest_deadline_otherwise() {
        let t0 = Instant::now();
        let mut t = table();
        assert_eq!(t.poll_timeout(), None);
        t.get(t0, "L", "a", 0);
        // A confirmed holder alone has no deadline.
        assert_eq!(t.poll_timeout(), None);
        t.get(at(t0, 100), "L", "b", 0);
        t.get(at(t0, 200), "L", "c", 0);
        assert_eq!(t.poll_timeout(), Some(at(t0, 1_100)));
        // b renews: its old deadline (1 100) stays armed, the earliest one true deadline
        // after it is c's (1 200).
        t.get(at(t0, 300), "L", "b", 0);
        assert_eq!(t.poll_timeout(), Some(at(t0, 1_100)));
        t.handle_timeout(at(t0, 1_100));
        assert_eq!(t.poll_timeout(), Some(at(t0, 1_200)));
        // An unconfirmed grant counts too.
        t.release(at(t0, 400), "L", "a", None);
        assert_eq!(t.holder("L"), Some("b"));
        assert_eq!(t.poll_timeout(), Some(at(t0, 1_200)));
        t.withdraw(at(t0, 400), "L", "c", 0);
        t.handle_timeout(at(t0, 1_200));
        assert_eq!(t.poll_timeout(), Some(at(t0, 1_400)));
    }

    /// Issue 8 (bounded resources): at `max_entries` (held locks plus waiting requests) a
    /// request for a new lock, or a new wait, is `Busy` and creates nothing; existing locks
    /// still work, and freeing one makes room.
    #[test]
    fn busy_when_max_entries_reached() {
        let t0 = Instant::now();
        let mut t = LockTable::new(LockConfig {
            max_entries: 3,
            ..LockConfig::default()
        });
        t.get(t0, "A", "a", 0);
        t.get(t0, "B", "a", 0);
        assert_eq!(t.get(t0, "A", "b", 0), waiting("a", 1));
        assert_eq!(t.entries(), 3);
        let full = LockGetOutcome::Busy(Bound::Entries(3));
        assert_eq!(t.get(t0, "C", "a", 0), full);
        assert_eq!(t.get(t0, "B", "c", 0), full, "a new wait is an entry too");
        assert_eq!(t.len(), 2);
        assert_eq!(t.holder("C"), None);
        assert_eq!(queue(&t, "B"), Vec::<String>::new());
        // A renewal and the holders' own requests still work, and freeing one makes room.
        assert_eq!(t.get(t0, "A", "b", 0), waiting("a", 1));
        assert_eq!(t.get(t0, "A", "a", 0), LockGetOutcome::Granted);
        t.release(t0, "B", "a", None);
        assert_eq!(t.get(t0, "C", "a", 0), LockGetOutcome::Granted);
        assert!(
            Bound::Entries(3)
                .to_string()
                .contains("lock table is full (3 entries")
        );
    }

    /// Issue 8 (bounded resources): a flood of requests with fresh names stays within
    /// `max_entries`, and the wait-for index with it.
    #[test]
    fn a_flood_of_fresh_names_stays_within_the_bound() {
        let t0 = Instant::now();
        let mut t = LockTable::new(LockConfig {
            max_entries: 1_000,
            ..LockConfig::default()
        });
        let mut busy = 0;
        for i in 0..5_000 {
            // Fresh locks, and fresh waiters on the locks already held.
            let outcome = if i % 2 == 0 {
                t.get(t0, &format!("L{i}"), &format!("r{i}"), 0)
            } else {
                t.get(t0, &format!("L{}", i % 100 * 2), &format!("w{i}"), 0)
            };
            busy += usize::from(matches!(outcome, LockGetOutcome::Busy(_)));
        }
        assert_eq!(t.entries(), 1_000);
        assert_eq!(t.entries(), t.len() + t.waits.edges);
        assert_eq!(busy, 4_000);
        // The waiters lapse unrenewed; the room they leave is free again.
        t.handle_timeout(at(t0, 1_000));
        assert_eq!(t.entries(), t.len());
        assert!(t.waits.by_requester.is_empty());
    }

    /// Issue 8 (bounded resources): a deadlock check that would visit more than
    /// `max_deadlock_walk` requesters refuses the wait as `Busy` instead of walking on.
    #[test]
    fn a_deadlock_check_past_its_bound_is_busy() {
        let t0 = Instant::now();
        let mut t = LockTable::new(LockConfig {
            max_deadlock_walk: 3,
            ..LockConfig::default()
        });
        // A chain: r{i} holds L{i} and waits for L{i+1}.
        for i in 0..6 {
            t.get(t0, &format!("L{i}"), &format!("r{i}"), 0);
        }
        for i in 0..5 {
            assert!(matches!(
                t.get(t0, &format!("L{}", i + 1), &format!("r{i}"), 0),
                LockGetOutcome::Waiting { .. }
            ));
        }
        // Waiting behind r0 would walk r0, r1, r2, r3, ...: past the bound.
        assert_eq!(
            t.get(t0, "L0", "x", 0),
            LockGetOutcome::Busy(Bound::DeadlockWalk(3))
        );
        assert!(queue(&t, "L0").is_empty());
        // Behind r4 (r3 waits there already) the walk is short.
        assert_eq!(t.get(t0, "L4", "x", 0), waiting("r4", 2));
    }

    /// Timers: a stale timer (the waiter renewed since) costs one early look that changes
    /// nothing, after which the true deadline is due.
    #[test]
    fn a_renewal_moves_the_timer_after_one_early_look() {
        let t0 = Instant::now();
        let mut t = table();
        t.get(t0, "L", "a", 0);
        t.get(t0, "L", "b", 0);
        t.get(at(t0, 600), "L", "b", 0);
        assert_eq!(t.poll_timeout(), Some(at(t0, 1_000)), "never later");
        t.handle_timeout(at(t0, 1_000));
        assert_eq!(queue(&t, "L"), ["b"]);
        assert_eq!(t.poll_timeout(), Some(at(t0, 1_600)));
        t.handle_timeout(at(t0, 1_600));
        assert!(queue(&t, "L").is_empty());
        assert_eq!(t.poll_timeout(), None);
    }

    /// At `max_waiters_per_lock` a new waiter is `Busy`, while a renewal of an existing wait is
    /// still answered.
    #[test]
    fn busy_when_max_waiters_per_lock_reached() {
        let t0 = Instant::now();
        let mut t = LockTable::new(LockConfig {
            max_waiters_per_lock: 1,
            ..LockConfig::default()
        });
        t.get(t0, "A", "a", 0);
        assert_eq!(t.get(t0, "A", "b", 0), waiting("a", 1));
        assert_eq!(
            t.get(t0, "A", "c", 0),
            LockGetOutcome::Busy(Bound::WaitersPerLock(1))
        );
        assert_eq!(queue(&t, "A"), ["b"]);
        // A renewal of an existing wait is not refused.
        assert_eq!(t.get(t0, "A", "b", 0), waiting("a", 1));
    }

    /// Released locks nobody waits for are removed, so the table does not grow with lock names.
    #[test]
    fn free_lock_is_removed_from_the_table() {
        let t0 = Instant::now();
        let mut t = table();
        for i in 0..100 {
            let name = format!("L{i}");
            t.get(t0, &name, "a", 0);
            t.release(t0, &name, "a", None);
        }
        assert!(t.is_empty());
        assert_eq!(t.len(), 0);
    }
}
