//! ublkd: serves replicated volumes as `/dev/ublkbN`.
//!
//! * [`config`] — the TOML config file and its validation.
//! * [`state`] — what the daemon persists per volume (device id, generation, replica health).
//! * [`frontend`] — the ublk queue threads: kernel request → [`replication::Nexus`] → result.
//! * [`volume`] — one volume's lifecycle (add or recover its device, stop it).
//! * [`lifecycle`] — the volume's state machine as users see it.
//! * [`daemon`] — all volumes of the node, orphan detection.
//! * [`control`] — the local control socket `ublkctl` talks to.
//! * [`ha`] — the HA monitor's edge: probes of the replica servers.

pub mod clidocs;
pub mod config;
pub mod control;
pub mod daemon;
pub mod error;
pub mod freeze;
pub mod frontend;
pub mod ha;
pub mod lifecycle;
pub mod metrics;
pub mod reload;
pub mod schedule;
pub mod state;
pub mod utc;
pub mod volume;

pub use error::DaemonError;
