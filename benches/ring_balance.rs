//! Bucket allocator figures, printed as markdown tables (run with
//! `cargo bench --bench ring_balance`):
//!
//! 1. balance: 100 000 keys (`key0`..`key99999`) on 3, 10 and 50 servers, 1 and 64 points per
//!    server, 3 replicas; for primary placement and for all-replica placement, the most and
//!    the fewest keys on one server relative to the mean;
//! 2. movement: with 10 servers, the keys whose replica set changes when one server joins and
//!    when one leaves, against the ideal `replicas / (n + 1)` resp. `replicas / n`;
//! 3. lookup cost: nanoseconds per `Ring::replicas` on a prebuilt ring of 50 servers with 64
//!    points each (and, for contrast, the cost of building that ring).
//!
//! Server ids come from a fixed seed, so every run prints the same placement figures.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Instant;

use trireme::placement::ring::{self, Ring};
use trireme::placement::view::{Epoch, Member, ServerId, View};
use trireme::util::rng::Rng;

/// Keys placed in every measurement.
const KEYS: usize = 100_000;

/// Replication count of every view measured.
const REPLICAS: u32 = 3;

/// Seed of the server ids.
const SEED: u64 = 0x7269_6e67;

/// A view of `ids` (addresses 127.0.0.1:38000 + i) with `vnodes` points per server.
fn view_of(ids: &[ServerId], vnodes: u32) -> View {
    let members = ids
        .iter()
        .zip(38000u16..)
        .map(|(&id, port)| Member {
            id,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        })
        .collect();
    View {
        epoch: Epoch(1),
        members,
        replicas: REPLICAS,
        vnodes,
    }
}

/// `n` server ids drawn from the fixed seed (a prefix of the same sequence for every `n`).
fn server_ids(n: usize) -> Vec<ServerId> {
    let mut rng = Rng::seeded(SEED);
    (0..n).map(|_| ServerId::random(&mut rng)).collect()
}

/// The benchmark's keys.
fn keys() -> Vec<String> {
    (0..KEYS).map(|n| format!("key{n}")).collect()
}

/// `(max / mean, min / mean)` of `counts`, with `mean = total / counts.len()`.
fn spread(counts: &[usize], total: usize) -> (f64, f64) {
    let mean = total as f64 / counts.len().max(1) as f64;
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    let min = counts.iter().copied().min().unwrap_or(0) as f64;
    (max / mean, min / mean)
}

/// Prints one balance row per (servers, vnodes) pair.
fn balance(keys: &[String]) {
    println!("## Balance: {KEYS} keys, {REPLICAS} replicas\n");
    println!(
        "| servers | vnodes | primary max/mean | primary min/mean | all-replica max/mean | all-replica min/mean |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for n in [3, 10, 50] {
        let ids = server_ids(n);
        for vnodes in [1, 64] {
            let ring = Ring::new(&view_of(&ids, vnodes));
            let mut primary = vec![0usize; n];
            let mut all = vec![0usize; n];
            let mut placed = 0;
            for key in keys {
                let chosen = ring.replicas(key, REPLICAS as usize);
                for (rank, member) in chosen.iter().enumerate() {
                    if let Some(slot) = ids.iter().position(|&id| id == member.id) {
                        all[slot] += 1;
                        placed += 1;
                        if rank == 0 {
                            primary[slot] += 1;
                        }
                    }
                }
            }
            let (pmax, pmin) = spread(&primary, keys.len());
            let (amax, amin) = spread(&all, placed);
            println!("| {n} | {vnodes} | {pmax:.2} | {pmin:.2} | {amax:.2} | {amin:.2} |");
        }
    }
    println!();
}

/// Counts the keys whose replica set differs between `before` and `after`.
fn moved(keys: &[String], before: &Ring, after: &Ring) -> usize {
    keys.iter()
        .filter(|key| {
            let mut old: Vec<ServerId> = before
                .replicas(key, REPLICAS as usize)
                .iter()
                .map(|m| m.id)
                .collect();
            let mut new: Vec<ServerId> = after
                .replicas(key, REPLICAS as usize)
                .iter()
                .map(|m| m.id)
                .collect();
            old.sort_unstable();
            new.sort_unstable();
            old != new
        })
        .count()
}

/// Prints the keys that move when an 11th server joins 10, and when one of 10 leaves.
fn movement(keys: &[String]) {
    let n = 10;
    println!("## Movement: {KEYS} keys, {n} servers, {REPLICAS} replicas\n");
    println!("| vnodes | change | keys moved | % moved | ideal % |");
    println!("|---:|---|---:|---:|---:|");
    let all = server_ids(n + 1);
    let ten = &all[..n];
    let nine = &all[1..n];
    for vnodes in [64, 1] {
        let base = Ring::new(&view_of(ten, vnodes));
        let joined = Ring::new(&view_of(&all, vnodes));
        let left = Ring::new(&view_of(nine, vnodes));
        let rows = [
            (
                "one joins (10 -> 11)",
                moved(keys, &base, &joined),
                REPLICAS as f64 / (n + 1) as f64,
            ),
            (
                "one leaves (10 -> 9)",
                moved(keys, &base, &left),
                REPLICAS as f64 / n as f64,
            ),
        ];
        for (change, count, ideal) in rows {
            println!(
                "| {vnodes} | {change} | {count} | {:.1} | {:.1} |",
                100.0 * count as f64 / keys.len() as f64,
                100.0 * ideal
            );
        }
    }
    println!();
}

/// Prints the cost of a lookup on a prebuilt ring, of building the ring, and of the
/// one-shot `ring::replicas` (which builds the ring each time).
fn lookup_cost(keys: &[String]) {
    let view = view_of(&server_ids(50), 64);
    println!("## Lookup cost: 50 servers, 64 vnodes, {REPLICAS} replicas\n");
    println!("| operation | iterations | ns per operation |");
    println!("|---|---:|---:|");

    let ring = Ring::new(&view);
    let rounds = 10;
    let started = Instant::now();
    for _ in 0..rounds {
        for key in keys {
            black_box(ring.replicas(black_box(key), REPLICAS as usize));
        }
    }
    let lookups = rounds * keys.len();
    let per = started.elapsed().as_nanos() as f64 / lookups as f64;
    println!("| `Ring::replicas` (prebuilt ring) | {lookups} | {per:.0} |");

    let builds = 200;
    let started = Instant::now();
    for _ in 0..builds {
        black_box(Ring::new(black_box(&view)));
    }
    let per = started.elapsed().as_nanos() as f64 / builds as f64;
    println!("| `Ring::new` (3200 points) | {builds} | {per:.0} |");

    let started = Instant::now();
    for key in keys.iter().take(builds) {
        black_box(ring::replicas(black_box(&view), key));
    }
    let per = started.elapsed().as_nanos() as f64 / builds as f64;
    println!("| `ring::replicas(view, key)` (builds the ring) | {builds} | {per:.0} |");
    println!();
}

/// Prints every table.
fn main() {
    let keys = keys();
    balance(&keys);
    movement(&keys);
    lookup_cost(&keys);
}
