//! The HA monitor's decisions, as pure functions of what it observed; the daemon
//! (`ublkd::ha`) probes the peers, feeds the observations in and carries the
//! decisions out. Nothing here does I/O or reads a clock, so every rule is tested
//! with tables (Oxide Crucible's upstairs is the model).
//!
//! * [`peer`]: is a replica server alive? `Alive → Suspected → Dead`, with
//!   hysteresis both ways so that a flapping peer causes no replacement storm.
//! * [`placement`]: which spare takes a replacement (a documented, deterministic
//!   rule).
//! * [`monitor`]: the `select → apply` loop: which replicas to replace now (a dead
//!   peer, a failed disk), which half-built replacement to drop because the old
//!   replica came back and is cheaper to catch up, with caps and backoff.
//! * [`event`]: what happened and why, as data (persisted and listed by ublkd).

pub mod error;
pub mod event;
pub mod ids;
pub mod monitor;
pub mod peer;
pub mod placement;

pub use error::HaError;
pub use ids::{PeerAddr, UnixMs};
