//! Replica storage: what one replica's bytes live in, for the owner's local
//! replicas and the replica server alike.
//!
//! - [`flat`]: today's image, a file (created sparse) or a raw block device: the
//!   volume's bytes at their own offsets, then the label area (`wire::label`).
//! - [`layered`]: the copy-on-write store: the same container with snapshot
//!   layers after the label (format, write order and crash rules in its docs).
//! - [`replica`]: a local replica's per-queue handle over its store.
//! - [`export`]: the image files a snapshot is exported to (raw, qcow2).
//! - [`uring`]: who executes the io_uring entries of a store (a ublk queue's ring,
//!   the server's per-connection ring, or a private blocking one).
//! - [`signature`]: what known data (a filesystem, LVM) a store holds, before it is
//!   adopted as a replica.

pub mod error;
pub mod export;
pub mod flat;
pub mod layered;
pub mod replica;
pub mod signature;
pub mod uring;

pub use error::{Errno, StoreError};
pub use wire::frame::{Extent, MAX_EXTENTS};
pub use wire::ids::{ByteLen, ByteOffset};

/// The result of one block operation.
pub type IoResult = Result<(), Errno>;

/// The piece of a range read at once to checksum it.
pub const CHECKSUM_CHUNK: u64 = 1 << 20;
