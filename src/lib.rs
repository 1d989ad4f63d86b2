//! trireme: a replicated key-value store whose three programs talk only over UDP.
//!
//! # Layout
//!
//! The protocol logic is *sans-IO*: state machines that never touch a socket or read the
//! clock. They take `handle_*(now, ...)` inputs and hand back datagrams, timers and events.
//! Thin drivers own the sockets and the clock; the binaries in `src/bin/` only call
//! [`cli`]. Each folder of `src/` is one layer, and a layer imports only the layers above it
//! in this list (no cycles; ARCHITECTURE.md draws the map):
//!
//! | layer | folder | what it holds |
//! |---|---|---|
//! | 0 | [`util`] | the seeded RNG, the log-line limiter |
//! | 1 | [`placement`] | ids, epochs and views; the ring; the rebalancing plan |
//! | 1 | [`faults`] | `--faults` specs and the injector; the virtual-time lossy network of the tests |
//! | 2 | [`wire`] | messages, the one datagram codec, the cluster key |
//! | 3 | [`reliable`] | the reliable request layer: retransmission, at-most-once, fragments |
//! | 4 | [`txn`] | both halves of two-phase commit, `getr`'s read, routing through a view |
//! | 4 | [`runtime`] | the UDP driver thread (applying `--faults`), node glue, `--trace` |
//! | 5 | [`server`], [`viewleader`], [`client`] | the three programs' logic |
//! | 6 | `cli` (feature `cli`) | argument parsing, output, the load generator (`cli::bench`) |
//!
//! `fuzzing` (feature `fuzzing`, or cargo-fuzz's `cfg(fuzzing)`) holds the properties the
//! `cargo fuzz` targets in `fuzz/` check, shared with the tests that replay the corpus.
//!
//! Data flow of a request: an application calls [`runtime::net::Handle::call`]; the driver
//! thread hands the body to its [`reliable::Endpoint`], which fragments it into datagrams
//! (encoded by [`wire::codec`]), retransmits them until answered, and delivers the answer
//! back over a channel. On the receiving side the endpoint reassembles and deduplicates the
//! request and raises it as an event; the node's state machine ([`viewleader::ViewLeader`],
//! [`server::Server`]) computes a response, which the endpoint caches and sends.
//!
//! # Features
//!
//! Both `cli` and `fuzzing` are on by default. The protocol core (everything else) builds
//! without them: `cargo build --lib --no-default-features` needs none of clap, simplelog,
//! signal-hook, hdrhistogram and serde_json.

#[cfg(feature = "cli")]
pub mod cli;
pub mod client;
pub mod faults;
#[cfg(any(fuzzing, feature = "fuzzing"))]
pub mod fuzzing;
pub mod placement;
pub mod reliable;
pub mod runtime;
pub mod server;
pub mod txn;
pub mod util;
pub mod viewleader;
pub mod wire;
