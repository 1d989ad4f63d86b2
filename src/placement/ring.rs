//! The bucket allocator: which servers hold a key, as a pure function of the key and the view.
//!
//! This module owns the consistent-hashing ring of the contract ("The bucket allocator (exact,
//! so any tool can recompute it)") and of the assignment's section 3.2. Everything here is
//! computed from its arguments alone: no clock, no I/O, no cache, so `setr`, `getr`,
//! `locate`, rebalancing and any outside tool (`tools/ring-golden.py`) agree on every
//! placement as long as they agree on the view.
//!
//! # Algorithm
//!
//! - [`pos`]`(bytes)` is the first 8 bytes of SHA-1(`bytes`), read as a big-endian `u64`: a
//!   position on a ring of 2^64 slots.
//! - A server with id `S` (its 32-lowercase-hex form) owns `vnodes` points: point 0 at
//!   `pos(S)`, point `i > 0` at `pos(S + "#" + i)`. Points are ordered by
//!   `(position, server id, i)`, so even a (vanishingly unlikely) collision of positions is
//!   broken the same way by every implementation, and the order of the view's member list
//!   never matters.
//! - The replicas of key `K` start at the first point whose position is `>= pos(K)` (wrapping
//!   to the smallest), walk clockwise and collect distinct servers until
//!   `min(replicas, number of servers)` are collected. The first one is the primary.
//!
//! A [`Ring`] holds the sorted points, so a lookup is a binary search plus a short walk. The
//! free function [`replicas`] builds the ring for one lookup; callers placing many keys in the
//! same view build a [`Ring`] once and ask it.
//!
//! # Why it moves few keys
//!
//! Adding a server inserts its points and leaves every other point where it was. The
//! clockwise walk from any key therefore sees the same servers in the same first-seen order,
//! with the new server inserted wherever its first point falls. A key's replica set changes
//! only if the new server lands among its first `replicas` distinct servers; the new set is
//! then the old one with the new server inserted and the old last replica dropped. So only
//! keys whose new replica set contains the joining server move, about `replicas / (n + 1)` of
//! them, and each such key moves one copy. Removing a server is the mirror image: only the
//! keys that had it among their replicas change, each losing that server and gaining the next
//! distinct server on the walk (about `replicas / n` of the keys). With `vnodes` points per
//! server, each server's share of the ring is the sum of many small arcs, which evens out the
//! load (the `ring_balance` benchmark prints the figures).

use sha1::{Digest, Sha1};

use crate::placement::view::{Member, ServerId, View};

/// The ring position of `bytes`: the first 8 bytes of their SHA-1, read as a big-endian `u64`.
pub fn pos(bytes: &[u8]) -> u64 {
    let digest = Sha1::digest(bytes);
    let mut first = [0u8; 8];
    for (slot, byte) in first.iter_mut().zip(digest.iter()) {
        *slot = *byte;
    }
    u64::from_be_bytes(first)
}

/// The position of point `index` of server `id`: `pos(id)` for point 0, else `pos(id#index)`.
fn point_position(id: ServerId, index: u32) -> u64 {
    if index == 0 {
        pos(id.to_string().as_bytes())
    } else {
        pos(format!("{id}#{index}").as_bytes())
    }
}

/// One point on the ring, with its owner resolved to an index into [`Ring::members`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Point {
    /// Where the point sits on the ring; the first sort key.
    position: u64,
    /// The server owning the point; the second sort key, breaking position ties.
    id: ServerId,
    /// Which of the server's points this is; the third sort key.
    index: u32,
    /// The owner's index in [`Ring::members`], so the walk needs no lookup.
    member: usize,
}

/// The ring of one view: every server's points in ring order, and the servers themselves.
///
/// Build it once per view with [`Ring::new`] and ask it for any number of keys; it never
/// changes after construction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ring {
    /// All points, sorted by `(position, server id, index)`.
    points: Vec<Point>,
    /// The servers, sorted by id and deduplicated; the walk returns copies of these.
    members: Vec<Member>,
    /// How many distinct servers own at least one point: the most replicas a key can get.
    servers: usize,
}

impl Ring {
    /// Builds the ring of `view`: `view.vnodes` points for each member.
    ///
    /// A view with `vnodes == 0` is treated as `vnodes == 1` (the view leader refuses 0; a
    /// view of live servers that placed no key anywhere would be useless). Member order does
    /// not matter.
    pub fn new(view: &View) -> Ring {
        let vnodes = view.vnodes.max(1);
        let capacity = view
            .members
            .len()
            .saturating_mul(usize::try_from(vnodes).unwrap_or(0));
        let mut points = Vec::with_capacity(capacity);
        for member in &view.members {
            for index in 0..vnodes {
                points.push((point_position(member.id, index), member.id, index));
            }
        }
        Ring::from_points(points, view.members.clone())
    }

    /// Builds a ring from explicit points `(position, server id, index)` and their servers,
    /// for tests that inject positions (such as the assignment's worked example).
    ///
    /// The points are sorted into ring order. A point whose server is not in `members` is
    /// skipped; a member without points is never chosen. If `members` lists an id twice, the
    /// entry with the smaller address is kept, so the result does not depend on their order.
    pub fn from_points(points: Vec<(u64, ServerId, u32)>, mut members: Vec<Member>) -> Ring {
        members.sort_by_key(|m| (m.id, m.addr));
        members.dedup_by_key(|m| m.id);
        let mut owns_points = vec![false; members.len()];
        let mut resolved: Vec<Point> = points
            .into_iter()
            .filter_map(|(position, id, index)| {
                let member = members.binary_search_by_key(&id, |m| m.id).ok()?;
                if let Some(owns) = owns_points.get_mut(member) {
                    *owns = true;
                }
                Some(Point {
                    position,
                    id,
                    index,
                    member,
                })
            })
            .collect();
        resolved.sort_unstable_by_key(|p| (p.position, p.id, p.index));
        let servers = owns_points.iter().filter(|&&owns| owns).count();
        Ring {
            points: resolved,
            members,
            servers,
        }
    }

    /// The first `count` distinct servers on the clockwise walk from `key_pos` (fewer if the
    /// ring has fewer servers), primary first.
    ///
    /// Costs a binary search over the points plus a walk that stops as soon as `count`
    /// distinct servers are collected (and never passes more than every point once).
    pub fn replicas_at(&self, key_pos: u64, count: usize) -> Vec<Member> {
        let want = count.min(self.servers);
        let mut chosen: Vec<Member> = Vec::with_capacity(want);
        if want == 0 {
            return chosen;
        }
        let start = self.points.partition_point(|p| p.position < key_pos);
        let (wrapped, from_start) = self.points.split_at(start);
        for point in from_start.iter().chain(wrapped) {
            // `want` is small (the replication count), so a scan beats a set.
            if let Some(member) = self.members.get(point.member)
                && !chosen.iter().any(|c| c.id == member.id)
            {
                chosen.push(*member);
                if chosen.len() == want {
                    break;
                }
            }
        }
        chosen
    }

    /// The first `count` distinct servers for `key`: [`Ring::replicas_at`]`(pos(key), count)`.
    pub fn replicas(&self, key: &str, count: usize) -> Vec<Member> {
        self.replicas_at(pos(key.as_bytes()), count)
    }

    /// The number of points on the ring.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Returns true if the ring has no points (no servers).
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

/// The replicas of `key` in `view`, primary first: `min(view.replicas, servers)` distinct
/// members. A pure function of `(key, view)`; an empty view gives an empty list.
///
/// Builds the view's [`Ring`] (`vnodes` SHA-1s per server) for this one lookup; to place many
/// keys in one view, build a [`Ring`] once and call [`Ring::replicas`].
pub fn replicas(view: &View, key: &str) -> Vec<Member> {
    let count = usize::try_from(view.replicas).unwrap_or(usize::MAX);
    Ring::new(view).replicas(key, count)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::SocketAddr;

    use proptest::prelude::*;

    use super::*;
    use crate::placement::view::Epoch;
    use crate::util::rng::Rng;

    /// A member with `id` and a loopback address derived from `port`.
    fn member(id: u128, port: u16) -> Member {
        Member {
            id: ServerId(id),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// A view of `ids` (addresses 127.0.0.1:38000 + i) with the given placement parameters.
    fn view_of(ids: &[ServerId], vnodes: u32, replicas: u32) -> View {
        let members = ids
            .iter()
            .zip(38000u16..)
            .map(|(id, port)| member(id.0, port))
            .collect();
        View {
            epoch: Epoch(1),
            members,
            replicas,
            vnodes,
        }
    }

    /// `n` server ids drawn from a generator seeded with `seed`.
    fn random_ids(seed: u64, n: usize) -> Vec<ServerId> {
        let mut rng = Rng::seeded(seed);
        (0..n).map(|_| ServerId::random(&mut rng)).collect()
    }

    /// The ids of `members`, in order.
    fn ids(members: &[Member]) -> Vec<ServerId> {
        members.iter().map(|m| m.id).collect()
    }

    /// A second, deliberately naive reading of the contract: every point, sorted, and a
    /// linear scan for the start. The property test compares the ring against it.
    fn naive_replicas(view: &View, key: &str) -> Vec<ServerId> {
        let mut points = Vec::new();
        for m in &view.members {
            for i in 0..view.vnodes.max(1) {
                let name = if i == 0 {
                    m.id.to_string()
                } else {
                    format!("{}#{i}", m.id)
                };
                points.push((pos(name.as_bytes()), m.id, i));
            }
        }
        points.sort();
        let servers: BTreeSet<ServerId> = view.members.iter().map(|m| m.id).collect();
        let want = (view.replicas as usize).min(servers.len());
        let key_pos = pos(key.as_bytes());
        let start = points
            .iter()
            .position(|p| p.0 >= key_pos)
            .unwrap_or_default();
        let mut chosen = Vec::new();
        for step in 0..points.len() {
            if chosen.len() == want {
                break;
            }
            let id = points[(start + step) % points.len()].1;
            if !chosen.contains(&id) {
                chosen.push(id);
            }
        }
        chosen
    }

    /// Contract: `pos` is the first 8 bytes of SHA-1, big-endian. Expected values computed
    /// with Python's `hashlib` (`int.from_bytes(sha1(b).digest()[:8], "big")`).
    #[test]
    fn pos_matches_python_hashlib() {
        assert_eq!(pos(b""), 0xda39_a3ee_5e6b_4b0d);
        assert_eq!(pos(b"abc"), 0xa999_3e36_4706_816a);
        assert_eq!(pos(b"a"), 0x86f7_e437_faa5_a7fc);
        assert_eq!(pos(b"key1"), 0x1073_ab6c_da4b_991c);
        assert_eq!(pos("clé".as_bytes()), 0xfb91_0ef7_d45d_e1be);
        assert_eq!(
            pos(b"00000000000000000000000000000001"),
            0x6856_38cd_a0a3_bb07
        );
        assert_eq!(
            pos(b"00000000000000000000000000000001#1"),
            0x6249_23ff_7be1_4cd8
        );
    }

    /// Contract: point 0 of a server is `pos(id)` and point `i` is `pos(id#i)`, with the id
    /// in its zero-padded 32-hex form.
    #[test]
    fn server_points_hash_the_padded_hex_id() {
        assert_eq!(point_position(ServerId(1), 0), 0x6856_38cd_a0a3_bb07);
        assert_eq!(point_position(ServerId(1), 1), 0x6249_23ff_7be1_4cd8);
        let ring = Ring::new(&view_of(&[ServerId(1)], 5, 3));
        assert_eq!(ring.len(), 5);
        let mut expected: Vec<u64> = (0..5).map(|i| point_position(ServerId(1), i)).collect();
        expected.sort_unstable();
        let found: Vec<u64> = ring.points.iter().map(|p| p.position).collect();
        assert_eq!(found, expected);
    }

    /// Contract: every placement in `src/placement/ring_golden.txt`, computed by the independent
    /// Python implementation `tools/ring-golden.py`, is what `replicas` returns.
    #[test]
    fn placements_match_the_python_golden_table() {
        let mut view = View::default();
        let mut set_name = String::new();
        let mut checked = 0;
        for line in include_str!("ring_golden.txt").lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split('\t').collect();
            assert_eq!(fields.len(), 5, "malformed golden line {line:?}");
            let parse_ids = |text: &str| -> Vec<ServerId> {
                text.split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.parse().unwrap())
                    .collect()
            };
            if fields[0] == "SET" {
                set_name = fields[1].to_string();
                view = view_of(
                    &parse_ids(fields[4]),
                    fields[2].parse().unwrap(),
                    fields[3].parse().unwrap(),
                );
                continue;
            }
            assert_eq!(fields[0], set_name, "key line outside its set: {line:?}");
            assert_eq!(fields[1].parse::<u32>().unwrap(), view.vnodes);
            assert_eq!(fields[2].parse::<u32>().unwrap(), view.replicas);
            let bytes: Vec<u8> = (0..fields[3].len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&fields[3][i..i + 2], 16).unwrap())
                .collect();
            let key = String::from_utf8(bytes).unwrap();
            assert_eq!(
                ids(&replicas(&view, &key)),
                parse_ids(fields[4]),
                "set {set_name}, key {key:?}"
            );
            checked += 1;
        }
        assert_eq!(checked, 240, "the golden table has 6 sets of 40 keys");
    }

    /// Assignment 3.4's worked example, with positions injected: servers at 2, 5, 10 and 15;
    /// a key at 7 goes to 10, then 15, then 2; after a server joins at 9 it goes to 9, 10, 15.
    /// Keys at 3 and 0 (primaries 5 and 2) take the new server as secondary resp. tertiary.
    #[test]
    fn assignment_worked_example_with_injected_positions() {
        let (a, b, c, d, e) = (
            member(0xa, 1),
            member(0xb, 2),
            member(0xc, 3),
            member(0xd, 4),
            member(0xe, 5),
        );
        let points = vec![(2, a.id, 0), (5, b.id, 0), (10, c.id, 0), (15, d.id, 0)];
        let before = Ring::from_points(points.clone(), vec![a, b, c, d]);
        assert_eq!(before.len(), 4);
        assert_eq!(before.replicas_at(7, 3), vec![c, d, a]);
        assert_eq!(
            before.replicas_at(16, 3),
            vec![a, b, c],
            "wraps past the top"
        );
        assert_eq!(
            before.replicas_at(10, 3),
            vec![c, d, a],
            "a point at the key's position"
        );
        assert_eq!(before.replicas_at(3, 3), vec![b, c, d]);
        assert_eq!(before.replicas_at(0, 3), vec![a, b, c]);

        let mut with_e = points;
        with_e.push((9, e.id, 0));
        let after = Ring::from_points(with_e, vec![e, d, c, b, a]);
        assert_eq!(after.replicas_at(7, 3), vec![e, c, d]);
        assert_eq!(
            after.replicas_at(3, 3),
            vec![b, e, c],
            "9 becomes the secondary"
        );
        assert_eq!(
            after.replicas_at(0, 3),
            vec![a, b, e],
            "9 becomes the tertiary"
        );
        assert_eq!(after.replicas_at(16, 3), vec![a, b, e]);
    }

    /// Contract: points at the same position are ordered by server id, then point index.
    #[test]
    fn equal_positions_are_ordered_by_server_id_then_index() {
        let (a, b) = (member(0xa, 1), member(0xb, 2));
        let ring = Ring::from_points(
            vec![(10, b.id, 0), (10, a.id, 1), (20, b.id, 1)],
            vec![b, a],
        );
        assert_eq!(ring.replicas_at(10, 2), vec![a, b]);
        assert_eq!(ring.replicas_at(11, 2), vec![b, a]);
    }

    /// Points of unknown servers are skipped; members without points are never chosen; a
    /// count beyond the number of servers returns each server once.
    #[test]
    fn from_points_skips_unknown_ids_and_caps_the_count() {
        let (a, b, c) = (member(0xa, 1), member(0xb, 2), member(0xc, 3));
        let ring = Ring::from_points(
            vec![(5, a.id, 0), (7, ServerId(0x99), 0), (9, b.id, 0)],
            vec![a, b, c],
        );
        assert_eq!(ring.len(), 2);
        assert_eq!(ring.replicas_at(6, 10), vec![b, a]);
        assert_eq!(ring.replicas_at(6, 0), Vec::<Member>::new());
    }

    /// An empty view (or a view asking for no replicas) places a key nowhere.
    #[test]
    fn empty_view_gives_no_replicas() {
        let empty = View::default();
        assert!(Ring::new(&empty).is_empty());
        assert!(replicas(&empty, "k").is_empty());
        assert!(replicas(&view_of(&random_ids(1, 3), 8, 0), "k").is_empty());
    }

    /// Assignment 3.2: replicas are distinct servers, `min(replicas, servers)` of them.
    #[test]
    fn replicas_are_distinct_and_capped_by_the_server_count() {
        let three = Ring::new(&view_of(&random_ids(7, 3), 64, 3));
        let two = Ring::new(&view_of(&random_ids(8, 2), 64, 3));
        assert_eq!((three.len(), two.len()), (192, 128));
        for n in 0..2_000 {
            let key = format!("key{n}");
            let got: BTreeSet<ServerId> = ids(&three.replicas(&key, 3)).into_iter().collect();
            assert_eq!(got.len(), 3, "{key}");
            let got: BTreeSet<ServerId> = ids(&two.replicas(&key, 3)).into_iter().collect();
            assert_eq!(got.len(), 2, "{key}");
        }
    }

    /// Assignment 3.2 (minimise rebalancing), 10 servers with 64 points each, 20 000 keys.
    ///
    /// Join of server X: every key's new list is either its old list, or its old list with X
    /// inserted at some position and the old last replica dropped (so exactly one server is
    /// replaced, and only keys whose new set contains X change). Departure of server Y: keys
    /// without Y keep their list; keys with Y get the old list minus Y, in order, plus one
    /// server that was not in the old list appended at the end.
    #[test]
    fn a_join_or_a_departure_moves_only_the_keys_it_must() {
        let all = random_ids(42, 11);
        let (old_ids, joiner) = (&all[..10], all[10]);
        let old = Ring::new(&view_of(old_ids, 64, 3));
        let joined = Ring::new(&view_of(&all, 64, 3));
        let leaver = old_ids[3];
        let remaining: Vec<ServerId> = old_ids.iter().copied().filter(|&id| id != leaver).collect();
        let left = Ring::new(&view_of(&remaining, 64, 3));
        let (mut moved_on_join, mut moved_on_leave) = (0, 0);
        for n in 0..20_000 {
            let key = format!("key{n}");
            let before = ids(&old.replicas(&key, 3));

            let after = ids(&joined.replicas(&key, 3));
            if after != before {
                moved_on_join += 1;
                let k = after
                    .iter()
                    .position(|&id| id == joiner)
                    .expect("joiner present");
                let mut expected = before.clone();
                expected.insert(k, joiner);
                expected.truncate(3);
                assert_eq!(after, expected, "{key}");
            }

            let after = ids(&left.replicas(&key, 3));
            if before.contains(&leaver) {
                moved_on_leave += 1;
                let kept: Vec<ServerId> =
                    before.iter().copied().filter(|&id| id != leaver).collect();
                assert_eq!(after[..2], kept[..], "{key}");
                assert!(!before.contains(&after[2]), "{key}");
            } else {
                assert_eq!(after, before, "{key}");
            }
        }
        // About 3/11 and 3/10 of the keys; loose bounds, only to catch a broken walk.
        assert!((3_000..8_000).contains(&moved_on_join), "{moved_on_join}");
        assert!((3_000..9_000).contains(&moved_on_leave), "{moved_on_leave}");
    }

    /// A strategy for views: 1..8 servers with random ids, 1..16 points, 1..4 replicas.
    fn any_view() -> impl Strategy<Value = View> {
        (
            proptest::collection::btree_set(any::<u128>(), 1..8),
            1u32..16,
            1u32..4,
        )
            .prop_map(|(ids, vnodes, replicas)| {
                let ids: Vec<ServerId> = ids.into_iter().map(ServerId).collect();
                view_of(&ids, vnodes, replicas)
            })
    }

    proptest! {
        /// Assignment 3.2 (the allocator is a pure function of key and view): for any view and
        /// key, the replicas are distinct, `min(replicas, servers)` of them, equal to a naive
        /// reading of the contract, the same when computed again, and the same whatever the
        /// order of the view's member list.
        #[test]
        fn replicas_are_a_pure_function_of_key_and_view(
            view in any_view(),
            key in "\\PC{1,40}",
            shuffle_seed in any::<u64>(),
        ) {
            let got = replicas(&view, &key);
            let distinct: BTreeSet<ServerId> = ids(&got).into_iter().collect();
            prop_assert_eq!(distinct.len(), got.len());
            prop_assert_eq!(got.len(), (view.replicas as usize).min(view.members.len()));
            prop_assert_eq!(ids(&got), naive_replicas(&view, &key));
            prop_assert_eq!(&replicas(&view, &key), &got);

            let mut shuffled = view.clone();
            let mut rng = Rng::seeded(shuffle_seed);
            for i in (1..shuffled.members.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                shuffled.members.swap(i, j);
            }
            prop_assert_eq!(&replicas(&shuffled, &key), &got);
        }
    }
}
