//! Layer 0, shared helpers that know nothing of the protocol: the seeded random generator
//! every test and node draws from, and the limiter of log lines about hostile input.
//!
//! May import: nothing in the crate.

pub mod ratelimit;
pub mod rng;
