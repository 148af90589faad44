//! The JSON payloads of the control ops (docs/protocol.md §6). Unknown fields are
//! rejected: within a protocol version both sides know every field.

use serde::{Deserialize, Serialize};

use crate::error::WireError;
use crate::ids::{Generation, OwnerId, ReplicaUuid, SessionId, SnapshotUuid, VolumeUuid};
use crate::label::{Label, Membership};

/// OPEN: claim (and with `create`, make) replica `replica` for `volume` at
/// `generation`. Accepted when `generation` is above the label's, or equal with the
/// same `owner` (the same activation reconnecting).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenRequest {
    /// The replica's id on the server (names its file there).
    pub replica: String,
    pub volume: String,
    pub volume_uuid: VolumeUuid,
    pub size: u64,
    pub block_size: u32,
    pub generation: Generation,
    /// Random per activation of the owner.
    pub owner: OwnerId,
    /// Create the replica (all zeroes, with this uuid) if the server has none. Only
    /// for a replica new to the volume: one that vanished from its server lost the
    /// volume's data and must be rebuilt, not silently recreated.
    pub create: Option<ReplicaUuid>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenReply {
    /// Carried by every fenced frame of this connection.
    pub session: SessionId,
    /// The replica's label after this OPEN (its generation is the request's).
    pub label: Label,
    /// The replica did not exist and was created (all zeroes).
    pub created: bool,
    /// Generation and owner the replica held before this OPEN: an owner that sees
    /// anything but what its STAT showed knows another owner got in between.
    pub previous_generation: Generation,
    pub previous_owner: OwnerId,
    /// DISCARD of this replica reads back as zeroes without writing them (the
    /// server's filesystem punches holes): owners advertise discard only then.
    pub cheap_zeroing: bool,
    /// The server's instance ([`crate::version::Features::INSTANCE`] sessions
    /// only; absent for a v2 owner, whose parser knows no such field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<ServerInstance>,
}

/// Which run of which boot of the server's host answered: a replica whose host
/// booted again since it acknowledged writes it had not flushed lost them (its
/// page cache went with the host); one whose process alone restarted did not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerInstance {
    /// The host's boot id (`/proc/sys/kernel/random/boot_id`): new at every boot.
    pub boot_id: String,
    /// Random per server process.
    pub process: u64,
}

impl ServerInstance {
    /// Whether `later` runs on another boot of the host than `self`.
    pub fn host_rebooted_by(&self, later: &ServerInstance) -> bool {
        self.boot_id != later.boot_id
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatRequest {
    pub replica: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatReply {
    /// `None`: the server has no such replica.
    pub label: Option<Label>,
    /// Space of the server's storage directory (placement of new replicas).
    pub capacity: Capacity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// DELETE: remove replica `replica` from the server, storage and all. Done only
/// when its label names `volume_uuid` and `replica_uuid` (the very copy the owner
/// retired, not one created since under the same id) and `generation`/`owner` may
/// OPEN it (section 8 of the protocol): the owner that retired it, or a newer one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteRequest {
    pub replica: String,
    pub volume_uuid: VolumeUuid,
    pub replica_uuid: ReplicaUuid,
    pub generation: Generation,
    pub owner: OwnerId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteReply {
    /// Bytes the replica's storage used (allocated, not its size).
    pub freed_bytes: u64,
}

/// SET_LABEL: replace the owner-controlled part of the label (fenced: only the
/// replica's current session may). Identity, geometry and generation never change
/// this way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelUpdate {
    pub membership: Membership,
    pub outdated: bool,
}

pub fn decode_control<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(payload).map_err(|e| WireError::Control(e.to_string()))
}

pub fn encode_control<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("control types serialize")
}

/// A snapshot operation on one replica (the owner's barrier sends CREATE to every
/// online replica; the rest follow the operator). Idempotent by uuid: a retry
/// after a lost reply answers `done: false`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum SnapshotAction {
    /// Seal the replica's head as this snapshot (no write may be in flight).
    Create {
        uuid: SnapshotUuid,
        name: String,
        created_ms: u64,
    },
    /// Undo a `Create` of a barrier that failed elsewhere (nothing written after).
    Undo {
        uuid: SnapshotUuid,
    },
    /// Hide it and give its space back in the background.
    Delete {
        uuid: SnapshotUuid,
    },
    /// Roll the replica back to it (no I/O in flight).
    Revert {
        uuid: SnapshotUuid,
    },
    /// Drop every snapshot and the head's own data (a full rebuild's target,
    /// which is rewritten whole: no I/O to it in flight).
    Reset,
    List,
}

/// One snapshot as a replica holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotEntry {
    pub uuid: SnapshotUuid,
    pub name: String,
    pub created_ms: u64,
    /// Bytes the snapshot's own grains take on this replica.
    pub owned_bytes: u64,
    /// Bytes a delete would give back here.
    pub reclaimable_bytes: u64,
    /// Deleted, its space being merged back.
    pub deleting: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotReply {
    /// The operation changed something (`false`: it was already so).
    pub done: bool,
    /// The replica's snapshots after the operation, oldest first.
    pub snapshots: Vec<SnapshotEntry>,
}
