//! The block layer (in progress).
