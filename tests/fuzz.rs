//! The fuzz targets in CI (issue 8, item 5): every file of each target's corpus under
//! `fuzz/corpus/<target>/` replayed through the same library function the `cargo fuzz`
//! target calls ([`trireme::fuzzing`]), and proptest versions of the same properties with
//! structured generators: valid-header datagrams with random bodies, byte flips of real
//! datagrams, fragment sequences with drops, duplicates and reordering, random traces.
//!
//! `cargo test --test fuzz -- --ignored write_seeds` rewrites the hand-made seed files of the
//! corpus (see `fuzz/README.md`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use proptest::prelude::*;

use trireme::fuzzing::{
    self, NATURAL_PAYLOAD, PEERS, REQUEST_IDS, SENDERS, Step, Violation, natural_len, request_key,
    sender_incarnation, small_config, templates,
};
use trireme::runtime::trace::{self, Direction, Entry};
use trireme::wire::codec::{self, AckBody, Header, Kind, MIN_FRAGMENT_PAYLOAD};

/// The corpus directory of fuzz target `target`.
fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("corpus")
        .join(target)
}

/// Runs `body` on every file of `target`'s corpus; fails if the corpus is missing or empty
/// (so a lost corpus cannot pass silently) or if any file breaks a property.
fn replay(target: &str, body: fn(&[u8]) -> Result<(), Violation>) {
    let dir = corpus_dir(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {} is missing: {e}", dir.display()));
    let mut files = 0;
    let mut failures = Vec::new();
    for entry in entries {
        let path = entry.expect("corpus entry").path();
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).expect("corpus file");
        files += 1;
        if let Err(violation) = body(&bytes) {
            failures.push(format!("{}: {violation}", path.display()));
        }
    }
    assert!(files > 0, "corpus {} is empty", dir.display());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every file of the `datagram` corpus passes the codec properties.
#[test]
fn datagram_corpus_replays_clean() {
    replay("datagram", fuzzing::datagram);
}

/// Every file of the `reassembly` corpus runs against an endpoint with every invariant held.
#[test]
fn reassembly_corpus_replays_clean() {
    replay("reassembly", |data| fuzzing::reassembly(data).map(|_| ()));
}

/// Every file of the `trace_reader` corpus parses consistently and round-trips.
#[test]
fn trace_reader_corpus_replays_clean() {
    replay("trace_reader", fuzzing::trace_reader);
}

// ---------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------

/// Real datagrams: every template as a first fragment of a request and of a response, an
/// ack, a probe.
fn real_datagrams() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (i, body) in templates().iter().enumerate() {
        for kind in [Kind::Request, Kind::Response] {
            let mut header = Header::new(kind, 0xDEAD_BEEF, 40 + i as u64, 7);
            header.message_len = body.len() as u32;
            header.frag_count = codec::fragment_count(body.len(), 1340);
            let range = codec::fragment_range(body.len(), header.frag_count, 0);
            out.push(codec::encode_datagram(&header, &body[range]));
        }
    }
    let ack = AckBody {
        complete: false,
        unknown: false,
        ranges: vec![(0, 3), (5, 6), (9, 12)],
    };
    let mut header = Header::new(Kind::Ack, 0xDEAD_BEEF, 41, 8);
    header.echo = 7;
    out.push(codec::encode_datagram(&header, &ack.encode()));
    out.push(codec::encode_datagram(
        &Header::new(Kind::Probe, 0xDEAD_BEEF, 41, 9),
        &[],
    ));
    // Issue 8: a retry and a probe carrying a token, a padded first contact, a sealed and
    // stamped request.
    let token = [0x5a; trireme::wire::auth::TOKEN_LEN];
    out.push(codec::encode_datagram(
        &Header::new(Kind::Retry, 0xDEAD_BEEF, 41, 10),
        &token,
    ));
    out.push(codec::encode_datagram(
        &Header::new(Kind::Probe, 0xDEAD_BEEF, 41, 11),
        &token,
    ));
    let body = &templates()[0];
    let mut padded = Header::new(Kind::Request, 0xDEAD_BEEF, 42, 12);
    padded.flags = codec::FLAG_PADDED;
    padded.message_len = body.len() as u32;
    let mut datagram = codec::encode_datagram(&padded, body);
    datagram.resize(467.max(datagram.len()), 0);
    out.push(datagram);
    let key = trireme::wire::auth::ClusterKey::from_secret(b"the fuzz seeds' cluster key").unwrap();
    let mut sealed = Header::new(Kind::Request, 0xDEAD_BEEF, 43, 13);
    sealed.flags = codec::FLAG_MAC;
    sealed.stamp = 1_764_000_000_000_000;
    sealed.message_len = body.len() as u32;
    let mut datagram = codec::encode_datagram(&sealed, body);
    codec::seal(&mut datagram, &key);
    out.push(datagram);
    out
}

/// A header with every field drawn, the fragment fields consistent (so it decodes).
fn valid_header() -> impl Strategy<Value = Header> {
    (
        prop::sample::select(vec![
            Kind::Request,
            Kind::Response,
            Kind::Ack,
            Kind::Probe,
            Kind::Retry,
        ]),
        any::<u16>(),
        any::<u64>(),
        any::<u64>(),
        any::<(u32, u32)>(),
        0u32..20_000,
        any::<(u32, u32)>(),
    )
        .prop_map(
            |(kind, flags, incarnation, request, (tx, echo), len, (c, i))| {
                let mut header = Header::new(kind, incarnation, request, tx);
                header.flags = flags;
                header.echo = echo;
                header.message_len = len;
                header.frag_count =
                    1 + c % codec::fragment_count(len as usize, MIN_FRAGMENT_PAYLOAD);
                header.frag_index = i % header.frag_count;
                if flags & codec::FLAG_MAC != 0 {
                    header.stamp = incarnation.rotate_left(17);
                }
                header
            },
        )
}

/// Any one step, with fields mostly in the ranges well-behaved peers use.
fn any_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..PEERS, 0..SENDERS, 0..REQUEST_IDS, 0u32..7000, 1u32..30, 0u32..30).prop_map(
            |(peer, sender, request, len, count, index)| Step::RequestFragment {
                peer,
                sender,
                request,
                len,
                count,
                index: index % count,
            }
        ),
        2 => (any::<u8>(), 0u32..7000, 1u32..30, 0u32..30).prop_map(|(slot, len, count, index)| {
            Step::ResponseFragment {
                slot,
                len,
                count,
                index: index % count,
            }
        }),
        1 => (any::<u8>(), any::<bool>(), any::<(bool, bool)>(), prop::collection::vec((0u32..4, 1u32..8), 0..6))
            .prop_map(|(slot, response, (complete, unknown), deltas)| {
                let mut next = 0;
                let ranges = deltas
                    .into_iter()
                    .map(|(gap, len)| {
                        let start = next + gap;
                        next = start + len;
                        (start, next)
                    })
                    .collect();
                Step::Ack {
                    slot,
                    response,
                    body: AckBody {
                        complete,
                        unknown,
                        ranges,
                    },
                }
            }),
        1 => (0..PEERS, 0..SENDERS, 0..REQUEST_IDS)
            .prop_map(|(peer, sender, request)| Step::Probe { peer, sender, request }),
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(Step::Raw),
        1 => (0..PEERS, 0u32..7000).prop_map(|(peer, len)| Step::Send { peer, len }),
        1 => (any::<u8>(), 0u32..7000).prop_map(|(slot, len)| Step::Respond { slot, len }),
        1 => (0..PEERS).prop_map(|peer| Step::Unreachable { peer }),
        2 => prop_oneof![0u32..50, 0u32..3000].prop_map(|millis| Step::Advance { millis }),
    ]
}

/// The fragments of one request as a well-behaved sender cuts it (natural length, 300-byte
/// payloads), each `(index, copies)`: 0 copies is a drop, 2 a duplicate; in a drawn order.
fn fragment_plan() -> impl Strategy<Value = (u8, u8, u8, Vec<(u32, u8)>)> {
    (0..PEERS, 0..SENDERS, 0..REQUEST_IDS).prop_flat_map(|(peer, sender, request)| {
        let key = request_key(sender_incarnation(sender), u64::from(request));
        let count = codec::fragment_count(natural_len(key) as usize, NATURAL_PAYLOAD);
        let copies = prop::collection::vec(
            prop_oneof![1 => Just(0u8), 6 => Just(1u8), 1 => Just(2u8)],
            count as usize,
        );
        copies
            .prop_map(|copies| {
                copies
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| (i as u32, c))
                    .collect::<Vec<_>>()
            })
            .prop_shuffle()
            .prop_map(move |plan| (peer, sender, request, plan))
    })
}

/// The steps of a fragment plan: each fragment as often as it says, in the plan's order.
fn plan_steps(peer: u8, sender: u8, request: u8, plan: &[(u32, u8)]) -> Vec<Step> {
    let key = request_key(sender_incarnation(sender), u64::from(request));
    let len = natural_len(key);
    let count = codec::fragment_count(len as usize, NATURAL_PAYLOAD);
    let mut steps = Vec::new();
    for &(index, copies) in plan {
        for _ in 0..copies {
            steps.push(Step::RequestFragment {
                peer,
                sender,
                request,
                len,
                count,
                index,
            });
        }
    }
    steps
}

/// A trace entry: any time a pcap timestamp holds, IPv4 or IPv6 ends, a payload.
fn any_entry() -> impl Strategy<Value = Entry> {
    let addr = prop_oneof![
        any::<([u8; 4], u16)>().prop_map(SocketAddr::from),
        any::<([u8; 16], u16)>().prop_map(SocketAddr::from),
    ];
    (
        any::<u32>(),
        0u32..1_000_000_000,
        any::<bool>(),
        addr.clone(),
        addr,
        prop::collection::vec(any::<u8>(), 0..400),
    )
        .prop_map(|(seconds, nanos, sent, src, dst, payload)| Entry {
            time: UNIX_EPOCH + Duration::new(u64::from(seconds), nanos),
            direction: if sent {
                Direction::Sent
            } else {
                Direction::Received
            },
            src,
            dst,
            payload,
        })
}

/// The bytes of a real trace file holding `entries`.
fn pcap_bytes(entries: &[Entry]) -> Vec<u8> {
    let path = std::env::temp_dir().join(format!(
        "trireme-fuzz-test-{}-{:?}.pcap",
        std::process::id(),
        std::thread::current().id()
    ));
    trace::write_file(&path, entries).expect("write trace");
    let bytes = std::fs::read(&path).expect("read trace");
    let _ = std::fs::remove_file(&path);
    bytes
}

/// Entries made of real datagrams between two peers, for real traces.
fn real_entries() -> Vec<Entry> {
    let a: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
    let b: SocketAddr = "[2001:db8::2]:5000".parse().expect("addr");
    real_datagrams()
        .into_iter()
        .enumerate()
        .map(|(i, payload)| Entry {
            time: UNIX_EPOCH + Duration::new(1_764_000_000 + i as u64, 1000 * i as u32),
            direction: if i % 2 == 0 {
                Direction::Sent
            } else {
                Direction::Received
            },
            src: if i % 3 == 0 { b } else { a },
            dst: a,
            payload,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

    /// A datagram with a valid header and any payload decodes, and passes the codec
    /// properties (header canonical; payload as ack and bodies never panics).
    #[test]
    fn valid_header_datagrams_pass_the_codec_properties(
        header in valid_header(),
        payload in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let bytes = codec::encode_datagram(&header, &payload);
        prop_assert_eq!(Header::decode(&bytes).map(|(h, _)| h), Ok(header));
        prop_assert_eq!(fuzzing::datagram(&bytes), Ok(()));
    }

    /// Real datagrams with up to four bytes changed, or cut short, pass the codec properties.
    #[test]
    fn flipped_real_datagrams_pass_the_codec_properties(
        which in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in any::<prop::sample::Index>(),
        shorten in any::<bool>(),
    ) {
        let all = real_datagrams();
        let mut bytes = which.get(&all).clone();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if shorten {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        prop_assert_eq!(fuzzing::datagram(&bytes), Ok(()));
    }

    /// Random bytes pass the codec properties (mostly: fail to decode with a typed error).
    #[test]
    fn random_bytes_pass_the_codec_properties(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        prop_assert_eq!(fuzzing::datagram(&bytes), Ok(()));
    }

    /// A valid header in front of a real message body: the body decodes back equal.
    #[test]
    fn message_bodies_behind_headers_round_trip(which in any::<prop::sample::Index>(), cut in any::<prop::sample::Index>()) {
        let body = which.get(templates());
        let bytes = &body[..cut.index(body.len() + 1)];
        let mut header = Header::new(Kind::Request, 1, 2, 3);
        header.message_len = bytes.len() as u32;
        prop_assert_eq!(fuzzing::datagram(&codec::encode_datagram(&header, bytes)), Ok(()));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 5000, ..ProptestConfig::default() })]

    /// A request's fragments with drops, duplicates and any order: every invariant holds, and
    /// if none was dropped and the message fits the reassembly bounds it is raised exactly
    /// once, with exactly its bytes (checked inside `run_steps`).
    #[test]
    fn reordered_duplicated_fragments_reassemble_once((peer, sender, request, plan) in fragment_plan()) {
        let steps = plan_steps(peer, sender, request, &plan);
        let outcome = fuzzing::run_steps(&steps);
        prop_assert!(outcome.is_ok(), "{:?}", outcome);
        let outcome = outcome.unwrap_or_default();
        let key = request_key(sender_incarnation(sender), u64::from(request));
        let len = natural_len(key) as usize;
        let count = codec::fragment_count(len, NATURAL_PAYLOAD) as usize;
        let config = small_config();
        let fits = count == 1 || len + count <= config.reassembly_per_peer;
        let dropped = plan.iter().any(|&(_, copies)| copies == 0);
        if fits && !dropped {
            prop_assert_eq!(outcome.delivered.len(), 1);
        }
        prop_assert!(outcome.delivered.len() <= 1);
    }

    /// Several requests' fragment plans interleaved with time advances, probes and answers:
    /// every invariant holds after every step.
    #[test]
    fn interleaved_messages_keep_every_invariant(
        plans in prop::collection::vec(fragment_plan(), 1..5),
        extra in prop::collection::vec((any::<prop::sample::Index>(), any_step()), 0..30),
    ) {
        let mut steps = Vec::new();
        for (peer, sender, request, plan) in &plans {
            steps.extend(plan_steps(*peer, *sender, *request, plan));
        }
        for (at, step) in extra {
            let i = at.index(steps.len() + 1);
            steps.insert(i, step);
        }
        let outcome = fuzzing::run_steps(&steps);
        prop_assert!(outcome.is_ok(), "{:?}", outcome);
    }

    /// Any sequence of steps keeps every invariant.
    #[test]
    fn random_steps_keep_every_invariant(steps in prop::collection::vec(any_step(), 0..120)) {
        let outcome = fuzzing::run_steps(&steps);
        prop_assert!(outcome.is_ok(), "{:?}", outcome);
    }

    /// Random bytes read as steps keep every invariant (the fuzz target's own decoding).
    #[test]
    fn random_bytes_keep_every_invariant(bytes in prop::collection::vec(any::<u8>(), 0..1500)) {
        let outcome = fuzzing::reassembly(&bytes);
        prop_assert!(outcome.is_ok(), "{:?}", outcome);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Traces written by `trace::write_file` read back equal, whole and cut anywhere.
    #[test]
    fn written_traces_read_back_equal(entries in prop::collection::vec(any_entry(), 0..8), cut in any::<u8>()) {
        prop_assert_eq!(fuzzing::trace_round_trip(&entries, cut), Ok(()));
    }

    /// A real trace with up to six bytes changed parses consistently or fails with an offset.
    #[test]
    fn flipped_real_traces_parse_consistently(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
    ) {
        let mut bytes = pcap_bytes(&real_entries());
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        prop_assert_eq!(fuzzing::trace_reader(&bytes), Ok(()));
    }

    /// Random bytes behind a valid pcap header of each link type the reader knows parse
    /// consistently.
    #[test]
    fn random_records_parse_consistently(
        link in prop::sample::select(vec![0u32, 1, 101, 113, 228, 229, 276]),
        tail in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut bytes = vec![0x4d, 0x3c, 0xb2, 0xa1, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        bytes.extend_from_slice(&(1u32 << 18).to_le_bytes());
        bytes.extend_from_slice(&link.to_le_bytes());
        bytes.extend_from_slice(&tail);
        prop_assert_eq!(fuzzing::trace_reader(&bytes), Ok(()));
    }
}

// ---------------------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------------------

/// Writes the hand-made seed files of every target's corpus (`seed-*`; files libFuzzer
/// found are named by their hash and left alone). Run it by hand after changing the input
/// formats: `cargo test --test fuzz -- --ignored write_seeds`.
#[test]
#[ignore = "writes into fuzz/corpus; run by hand"]
fn write_seeds() {
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed");
    };
    for (i, datagram) in real_datagrams().iter().enumerate() {
        write("datagram", &format!("real-{i}"), datagram);
    }
    for (i, body) in templates().iter().enumerate() {
        write("datagram", &format!("body-{i}"), body);
    }
    for (name, bytes) in reassembly_seeds() {
        write("reassembly", name, &bytes);
    }
    let entries = real_entries();
    write("trace_reader", "real-pcap", &pcap_bytes(&entries));
    write("trace_reader", "real-pcap-one", &pcap_bytes(&entries[..1]));
    write("trace_reader", "empty-pcap", &pcap_bytes(&[]));
    // Bytes read as entries (`fuzzing::entries_from_bytes`): cut, count, then one entry.
    let mut as_entries = vec![128, 2];
    for v6 in [false, true] {
        as_entries.extend_from_slice(&1_764_000_000u32.to_be_bytes());
        as_entries.extend_from_slice(&5u32.to_be_bytes());
        as_entries.push(if v6 { 3 } else { 4 });
        let ip_len = if v6 { 16 } else { 4 };
        for _ in 0..2 {
            as_entries.extend(std::iter::repeat_n(10, ip_len));
            as_entries.extend_from_slice(&4000u16.to_be_bytes());
        }
        let datagram = &real_datagrams()[2];
        as_entries.extend_from_slice(&(datagram.len() as u16).to_be_bytes());
        as_entries.extend_from_slice(datagram);
    }
    write("trace_reader", "entries", &as_entries);
}

/// Hand-made inputs of the reassembly target (the byte format of
/// `fuzzing::steps_from_bytes`): whole messages, a response, drops, time, raw datagrams.
fn reassembly_seeds() -> Vec<(&'static str, Vec<u8>)> {
    // Opcodes: 2 whole request, 0 one request fragment, 5 whole response, 7 ack, 8 probe,
    // 9 raw, 10 send, 11 respond, 12/13 advance.
    let whole =
        |peer: u8, sender: u8, request: u8| vec![2, peer, sender, request, 0, 0, 0, 0, 0, 0, 255];
    let mut seeds = Vec::new();
    let mut all = Vec::new();
    for request in 0..8 {
        all.extend(whole(request % 4, request % 3, request));
        all.extend([11, 0, 0, 200]);
    }
    seeds.push(("whole-requests", all));
    let mut dropped = whole(1, 1, 5);
    dropped[9] = 0b100; // the low byte of the drop mask: drop fragment 2
    dropped.extend([13, 150, 13, 201, 13, 250, 8, 1, 1, 5]);
    seeds.push(("drop-and-wait", dropped));
    // A 512-byte request to peer 2 answered by a 2000-byte response in fragments, then a
    // one-fragment request answered at once, then an ack about the first.
    let mut response = vec![10, 2, 0x02, 0x00, 5, 0, 0x07, 0xd0, 0, 0, 0, 13, 20];
    response.extend([10, 1, 0, 40, 6, 1, 0, 10, 0, 0, 7, 0, 0, 1, 0, 3]);
    seeds.push(("send-and-answer", response));
    let mut respond_big = whole(0, 0, 2);
    respond_big.extend([11, 0, 0x0f, 0xa0, 7, 0, 1, 1, 0, 2, 13, 60, 13, 220]);
    seeds.push(("respond-in-fragments", respond_big));
    let mut raw = Vec::new();
    for datagram in &real_datagrams()[..3] {
        raw.push(9);
        raw.extend_from_slice(&(datagram.len() as u16).to_be_bytes());
        raw.extend_from_slice(datagram);
    }
    raw.extend([13, 255, 13, 255]);
    seeds.push(("raw-real-datagram", raw));
    let mut churn = Vec::new();
    for request in 0..12 {
        churn.extend(whole(0, 0, request));
        churn.extend([11, 0, 0, 50, 13, 205]);
    }
    churn.extend(whole(0, 0, 0));
    seeds.push(("cache-churn", churn));
    seeds
}
