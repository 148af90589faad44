//! The volume data path: the **nexus** that fans block requests out to a volume's
//! replicas, and the **health** that owns their states.
//!
//! Reading order (top to bottom, as one request flows):
//! 1. [`request`] — a raw ublk descriptor becomes a checked [`BlockRequest`].
//! 2. [`nexus`] — [`Nexus::submit`] takes the range ([`ranges`]), picks the replicas
//!    (reads: one of the read set; writes: the whole write set) and asks
//!    [`health::Health::settle`], the ack rule.
//! 3. [`replica`] — the per-queue [`Replica`] handle every replica kind implements;
//!    [`backing`] is the shared object behind it: [`local`] (a file or raw block
//!    device through io_uring, [`uring`]) or [`remote`] (a replica server over TCP).
//! 4. [`health`] — the one owner of replica states ([`state`]: the state machine and
//!    typed fault reasons), of the membership and of the replica set; it persists a
//!    fault into the survivors' labels and the daemon's record before the I/O that
//!    skipped the faulted replica is acknowledged.
//! 5. [`activation`] — which replicas a starting owner may trust, as a pure function
//!    of its record and the replicas' labels.
//!
//! Nothing here knows about libublk: the frontend in the `ublkd` crate hands in the
//! per-queue handles (on the ublk queue's own ring) and a [`wake::Kick`] that wakes
//! its queue thread.

pub mod ack;
pub mod activation;
pub mod activity;
pub mod backing;
pub mod dirty;
pub mod dirty_file;
pub mod durable;
pub mod error;
pub mod health;
pub mod ids;
pub mod latency;
pub mod local;
pub mod nexus;
pub mod ranges;
pub mod rebuild;
pub mod remote;
pub mod replica;
pub mod request;
pub use snapshot::signature;
pub mod snapshots;
pub mod state;
pub mod testing;
pub mod unflushed;
pub mod uring;
pub mod verify;
pub mod wake;

pub use error::{Errno, ReplicationError};
pub use health::Health;
pub use ids::{ByteLen, ByteOffset, Generation, SlotIndex};
pub use nexus::Nexus;
pub use replica::Replica;
pub use request::BlockRequest;
pub use state::{FaultReason, ReplicaState};

/// Most replicas one volume may be configured with.
pub const MAX_REPLICAS: usize = 8;
