//! The bucket allocator (being written).
