//! Pure logic: no I/O, no async, no clocks, no randomness of its own.
//! Events in, results out, so every piece can be tested exhaustively and
//! driven by a deterministic simulation.

pub mod dvv;
pub mod ring;
