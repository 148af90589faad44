//! Newtypes for the numbers that must never be mixed up.

use serde::{Deserialize, Serialize};

/// Position of a replica in its volume's replica list (stable: it is the config order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReplicaIndex(pub u8);

impl ReplicaIndex {
    /// At most this many replicas per volume: health is tracked in a `u64` bitmask.
    pub const MAX: usize = 64;

    pub fn get(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for ReplicaIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A byte offset into a volume (and, for local replicas, into the backing store).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ByteOffset(pub u64);

/// A length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ByteLen(pub u64);

impl ByteOffset {
    pub fn get(self) -> u64 {
        self.0
    }
}

impl ByteLen {
    pub fn get(self) -> u64 {
        self.0
    }
}

/// Owner generation of a volume: bumped every time a daemon activates the volume.
/// Later issues fence replicas with it; today it is persisted and reported.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Generation(pub u64);

impl Generation {
    pub fn next(self) -> Generation {
        self.checked_next().expect("generation overflow")
    }

    /// `None` at the maximum (a replica's stored generation is peer-controlled).
    pub fn checked_next(self) -> Option<Generation> {
        self.0.checked_add(1).map(Generation)
    }
}
