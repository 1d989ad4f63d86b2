//! Layer 4, where the sans-IO core meets the operating system: the driver thread that runs
//! a reliable endpoint on a real UDP socket ([`net`]), the glue that runs a node's state
//! machine on it ([`node`]), the `--faults` injector on the send path ([`faults`]) and the
//! `--trace` pcap writer and reader ([`trace`]).
//!
//! May import: [`crate::util`], [`crate::wire`], [`crate::reliable`].

pub mod faults;
pub mod net;
pub mod node;
pub mod trace;
