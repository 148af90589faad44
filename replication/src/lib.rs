//! The volume data path: the **nexus** that fans block requests out to a volume's
//! replicas and tracks their health.
//!
//! Reading order (top to bottom, as one request flows):
//! 1. [`request`] — a raw ublk descriptor becomes a checked [`BlockRequest`].
//! 2. [`nexus`] — [`Nexus::submit`] picks the replicas (reads: one; writes: all healthy)
//!    and applies the ack rule in [`nexus::write_outcome`].
//! 3. [`replica`] — the [`Replica`] trait every replica kind implements; [`local`] is a
//!    file or raw block device driven through io_uring ([`uring`]).
//! 4. [`health`] — the replica/volume state machines, shared by all queues of a volume,
//!    persisted through a [`health::StateSink`] before a fault is acknowledged.
//!
//! Nothing here knows about libublk: the frontend in the `ublkd` crate hands in an
//! io_uring submitter ([`uring::Uring`]) that uses the ublk queue's own ring.

pub mod error;
pub mod health;
pub mod ids;
pub mod local;
pub mod nexus;
pub mod remote;
pub mod replica;
pub mod request;
pub mod testing;
pub mod uring;

pub use error::{Errno, ReplicationError};
pub use health::{Health, ReplicaState, VolumeState};
pub use ids::{ByteLen, ByteOffset, Generation, ReplicaIndex};
pub use nexus::Nexus;
pub use replica::Replica;
pub use request::BlockRequest;
