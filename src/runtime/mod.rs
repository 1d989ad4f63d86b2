//! Layer 4, where the sans-IO core meets the operating system: the driver thread that runs
//! a reliable endpoint on a real UDP socket ([`net`]), the glue that runs a node's state
//! machine on it ([`node`]), with the `--faults` injector ([`crate::faults`]) on its send path,
//! and the `--trace` pcap writer and reader ([`trace`]).
//!
//! May import: [`crate::util`], [`crate::faults`], [`crate::wire`], [`crate::reliable`].

pub mod net;
pub mod node;
pub mod trace;
