//! Layer 2, what travels: the request and response types ([`message`]), the one datagram
//! codec ([`codec`]) and the cluster key's MACs, replay window and address tokens ([`auth`]).
//!
//! May import: [`crate::util`], [`crate::placement`] (the view types messages carry).

pub mod auth;
pub mod codec;
pub mod message;
