//! trireme: a replicated key-value store whose three programs talk only over UDP.
//!
//! # Layout
//!
//! The protocol logic is *sans-IO*: state machines that never touch a socket or read the
//! clock. They take `handle_*(now, ...)` inputs and hand back datagrams, timers and events.
//! Thin drivers own the sockets and the clock; the binaries in `src/bin/` only parse
//! arguments and call into this library.
//!
//! - [`codec`]: the one datagram codec: a hand-coded fixed header, acknowledgement bodies, and
//!   bincode-encoded message bodies. Everyone (the three programs, the tests, the trace tool)
//!   encodes and decodes through it.
//! - [`message`]: the request and response types every program exchanges.
//! - [`auth`]: the cluster key (`--cluster-key-file`): datagram MACs, the wall clock the
//!   replay window is read on, and address-validation tokens.
//! - [`reliable`]: the reliable request layer (sans-IO): retransmission with an adaptive RTO,
//!   at-most-once execution through a response cache, fragmentation with selective acks.
//! - [`faults`]: parsing of `--faults` specs and the seeded fault injector on the send path.
//! - [`net`]: the driver thread that runs a [`reliable::Endpoint`] on a real UDP socket, and
//!   the [`net::Handle`] applications use to talk through it.
//! - [`trace`]: `--trace` pcap files: the writer thread the driver records datagrams through,
//!   and the reader `trace-dump` (in `tools/trace-dump/`) and the tests use.
//! - [`viewleader`]: membership (heartbeats, epochs, views) and the lock service.
//! - [`server`]: one storage node: its bucket and its heartbeats.
//! - [`client`]: the command-line client's operations, one function per command.
//! - [`placement`]: a fetched view and its ring, and the rules for operating on one (shared
//!   by the client, the coordinators and the simulator).
//! - [`coordinator`]: `setr`'s two-phase commit and `getr`'s read as sans-IO state machines,
//!   driven by the client on a real network and by the simulator in virtual time.
//! - `bench` (feature `cli`): `client bench`, the load generator: operation schedule (closed
//!   or open loop), worker threads, HDR-histogram latency; targets trireme, etcd (for
//!   comparison) and a loopback UDP echo (the floor).
//! - `cli` (feature `cli`): command-line parsing shared by the binaries, and output
//!   formatting.
//! - `fuzzing` (feature `fuzzing`, or cargo-fuzz's `cfg(fuzzing)`): the properties the
//!   `cargo fuzz` targets in `fuzz/` check (codec, fragment reassembly, trace reader), shared
//!   with the tests that replay the fuzz corpus.
//!
//! # Features
//!
//! Both `cli` and `fuzzing` are on by default. The protocol core (everything else) builds
//! without them: `cargo build --lib --no-default-features` needs none of clap, simplelog,
//! signal-hook, hdrhistogram and serde_json.
//! - [`view`], [`rng`], [`ratelimit`]: small shared vocabulary: ids, epochs, views; the
//!   seeded RNG; the limiter of log lines about hostile input.
//!
//! Data flow of a request: an application calls [`net::Handle::call`]; the driver thread
//! hands the body to its [`reliable::Endpoint`], which fragments it into datagrams (encoded by
//! [`codec`]), retransmits them until answered, and delivers the answer back over a channel.
//! On the receiving side the endpoint reassembles and deduplicates the request and raises it
//! as an event; the node's state machine ([`viewleader::ViewLeader`], [`server::Server`])
//! computes a response, which the endpoint caches and sends.

pub mod auth;
#[cfg(feature = "cli")]
pub mod bench;
#[cfg(feature = "cli")]
pub mod cli;
pub mod client;
pub mod codec;
pub mod commit;
pub mod coordinator;
pub mod faults;
#[cfg(any(fuzzing, feature = "fuzzing"))]
pub mod fuzzing;
pub mod message;
pub mod net;
pub mod node;
pub mod placement;
pub mod ratelimit;
pub mod rebalance;
pub mod reliable;
pub mod ring;
pub mod rng;
pub mod server;
pub mod trace;
pub mod view;
pub mod viewleader;
