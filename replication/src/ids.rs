//! Newtypes for the numbers that must never be mixed up. Those that cross the wire
//! or land in records come from the `wire` crate.

pub use wire::ids::*;

use serde::{Deserialize, Serialize};

/// A replica's slot in its running volume: the bit it has in the health masks.
/// Stable while the volume runs; slots are not persisted (locations and uuids are).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SlotIndex(pub u8);

impl SlotIndex {
    pub fn get(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for SlotIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}
