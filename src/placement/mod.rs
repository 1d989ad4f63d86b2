//! Layer 1, where keys live: server ids, epochs and views ([`view`]), the consistent-hash
//! ring that places a key on its replicas ([`ring`]), and the plan of which keys move
//! between two views ([`rebalance`]). Pure functions of a view; no messages, no I/O.
//!
//! May import: [`crate::util`].

pub mod rebalance;
pub mod ring;
pub mod view;
