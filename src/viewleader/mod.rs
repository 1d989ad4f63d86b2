//! (being written)
pub mod locks;
