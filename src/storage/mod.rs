//! See the crate map in lib.rs.

pub mod io;
