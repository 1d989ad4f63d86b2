//! Layer 4, both halves of `setr`'s two-phase commit and `getr`'s read, as sans-IO state
//! machines: the participant a server runs for each key ([`participant`]), the coordinator
//! a client runs ([`coordinator`]), and the rules for routing an operation through a fetched
//! view ([`routing`]). The client drives them on a real network, the simulator in virtual
//! time.
//!
//! May import: [`crate::util`], [`crate::placement`], [`crate::wire`], [`crate::reliable`]
//! (its error type).

pub mod coordinator;
pub mod participant;
pub mod routing;
