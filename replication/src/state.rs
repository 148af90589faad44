//! The state of one replica slot of a running volume, and why a replica was faulted.
//! [`crate::health::Health`] owns these states: everything else reports events.
//!
//! ```text
//! Connecting ──(reached, its label current)──────────────────────▶ Online
//! Connecting ──(not reached in time, label stale, another one back)▶ Faulted
//! Online ──────(I/O error, deadline, connection lost; others online)▶ Faulted
//! Online ──────(connection lost while the last online one)────────▶ Connecting
//! Faulted ─────(rebuild starts)───────────────────────────────────▶ Rebuilding
//! Rebuilding ──(rebuild done: every block copied)─────────────────▶ Online
//! Rebuilding ──(I/O error, deadline, connection lost)─────────────▶ Faulted
//! Connecting | Online | Rebuilding | Faulted ──(taken out of the set)▶ Removed
//! ```
//!
//! | state | write set | read set | holds every acknowledged write |
//! |---|---|---|---|
//! | Connecting | no | no | maybe: it is waited for while no replica is online |
//! | Online | yes | yes | yes |
//! | Rebuilding | yes | no | not yet: what the rebuild copied, and new writes |
//! | Faulted | no | no | no |
//! | Removed | no | no | — (its slot is free once no request uses it) |
//!
//! The last online replica is never faulted: its errors reach the application, and
//! if its connection drops it goes back to Connecting, where I/O waits for it. A
//! slot is Connecting only while no slot is Online: the first one back serves, and
//! the others still waited for are faulted then, before any write is acknowledged
//! without them.

use serde::{Deserialize, Serialize};

use crate::error::Errno;
use crate::ids::{Epoch, Generation};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ReplicaState {
    /// Being opened, or reconnecting while it may hold the only current copy.
    Connecting,
    /// In the read and the write set.
    Online,
    /// In the write set only, while a rebuild fills it.
    Rebuilding { kind: RebuildKind },
    /// Out of both sets: it missed writes and needs a rebuild.
    Faulted { reason: FaultReason },
    /// Taken out of the volume's replica set.
    Removed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RebuildKind {
    /// Only the regions the replica missed.
    Partial,
    /// Everything.
    Full,
}

/// The operation that failed on a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoOp {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    /// Writing the replica's label (membership).
    Label,
    /// A snapshot operation (a revert that failed on it).
    Snapshot,
}

/// Why a replica is faulted: data, persisted as such; [`std::fmt::Display`] renders
/// it for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultReason {
    /// The replica's storage failed an operation.
    IoError { op: IoOp, errno: i32 },
    /// A request to the remote replica got no reply in time.
    MissedDeadline { waited_ms: u64 },
    /// The connection to the replica server broke.
    ConnectionLost,
    /// Its label says it missed writes: not a member of the newest membership
    /// epoch, or marked outdated by an owner.
    Stale {
        label_epoch: Epoch,
        newest_epoch: Epoch,
    },
    /// Another owner (this generation) ran the volume without it.
    MissedGeneration { generation: Generation },
    /// It could not be opened or reached in time (the error as the OS or the
    /// server put it).
    OpenFailed { error: String },
    /// It is gone: its file, device or server-side replica no longer exists.
    Missing,
    /// It holds none of the volume's data: new to the volume, or recreated.
    NewReplica,
    /// Its rebuild stopped before every missing region was copied: cancelled, or
    /// no healthy replica was left to copy from. What it still lacks is kept.
    RebuildStopped { why: RebuildStop },
    /// Recorded by ublkd 0.1, before reasons were typed.
    Legacy { detail: String },
}

/// Why a rebuild stopped short (its target was not at fault).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RebuildStop {
    Cancelled,
    NoSource,
    /// The activity log could not be committed (the owner's state dir failed).
    LogFailed,
    /// A snapshot could not be copied (the source lacked it, or a side failed).
    SnapshotCopy {
        errno: i32,
    },
}

impl FaultReason {
    /// The replica's storage itself failed (an I/O error, not a lost connection or
    /// a missed deadline): rebuilding onto it again is not automatic.
    pub fn is_media_error(&self) -> bool {
        matches!(self, FaultReason::IoError { .. })
    }

    /// The reason for an I/O error on `op`; the remote client reports a missed
    /// deadline as ETIMEDOUT and a lost connection as ENOTCONN.
    pub fn of_errno(op: IoOp, errno: Errno) -> FaultReason {
        match errno.0 {
            libc::ETIMEDOUT => FaultReason::MissedDeadline { waited_ms: 0 },
            libc::ENOTCONN => FaultReason::ConnectionLost,
            e => FaultReason::IoError { op, errno: e },
        }
    }
}

impl std::fmt::Display for FaultReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FaultReason::IoError { op, errno } => {
                write!(f, "{op:?} failed: {}", Errno(*errno))
            }
            FaultReason::MissedDeadline { waited_ms: 0 } => {
                f.write_str("missed the I/O deadline (replica hung or unreachable)")
            }
            FaultReason::MissedDeadline { waited_ms } => write!(
                f,
                "missed the I/O deadline: no reply for {waited_ms} ms (replica hung or unreachable)"
            ),
            FaultReason::ConnectionLost => f.write_str("connection to the replica server lost"),
            FaultReason::Stale {
                label_epoch,
                newest_epoch,
            } => write!(
                f,
                "stale: its label is at membership epoch {} but the volume moved on to {} without it (it missed writes)",
                label_epoch.0, newest_epoch.0
            ),
            FaultReason::MissedGeneration { generation } => write!(
                f,
                "missed the writes of generation {} (another owner)",
                generation.0
            ),
            FaultReason::OpenFailed { error } => write!(f, "cannot open: {error}"),
            FaultReason::Missing => f.write_str("missing: its data is gone"),
            FaultReason::NewReplica => {
                f.write_str("holds none of the volume's data (new replica): needs a full rebuild")
            }
            FaultReason::RebuildStopped {
                why: RebuildStop::Cancelled,
            } => f.write_str("its rebuild was cancelled before it finished"),
            FaultReason::RebuildStopped {
                why: RebuildStop::NoSource,
            } => f.write_str("its rebuild stopped: no healthy replica was left to copy from"),
            FaultReason::RebuildStopped {
                why: RebuildStop::LogFailed,
            } => f.write_str("its rebuild stopped: the activity log could not be saved"),
            FaultReason::RebuildStopped {
                why: RebuildStop::SnapshotCopy { errno },
            } => write!(
                f,
                "its rebuild stopped: a snapshot could not be copied to it ({})",
                Errno(*errno)
            ),
            FaultReason::Legacy { detail } => f.write_str(detail),
        }
    }
}

impl ReplicaState {
    /// The transitions the state machine allows (the diagram above, exactly).
    pub fn can_become(&self, next: &ReplicaState) -> bool {
        use ReplicaState::*;
        matches!(
            (self, next),
            (Connecting, Online | Faulted { .. } | Removed)
                | (Online, Faulted { .. } | Connecting | Removed)
                | (Faulted { .. }, Rebuilding { .. } | Removed)
                | (Rebuilding { .. }, Online | Faulted { .. } | Removed)
        )
    }

    /// Takes writes.
    pub fn in_write_set(&self) -> bool {
        matches!(self, ReplicaState::Online | ReplicaState::Rebuilding { .. })
    }

    /// Takes reads (and holds every acknowledged write).
    pub fn in_read_set(&self) -> bool {
        matches!(self, ReplicaState::Online)
    }

    /// The state's name, as the CLI shows it.
    pub fn name(&self) -> &'static str {
        match self {
            ReplicaState::Connecting => "connecting",
            ReplicaState::Online => "online",
            ReplicaState::Rebuilding { .. } => "rebuilding",
            ReplicaState::Faulted { .. } => "faulted",
            ReplicaState::Removed => "removed",
        }
    }

    /// The state names, as in the diagram.
    pub const NAMES: [&'static str; 5] =
        ["Connecting", "Online", "Rebuilding", "Faulted", "Removed"];

    /// One value of the state named `name` (as in the diagram), for checks.
    pub fn example(name: &str) -> Option<ReplicaState> {
        Some(match name {
            "Connecting" => ReplicaState::Connecting,
            "Online" => ReplicaState::Online,
            "Rebuilding" => ReplicaState::Rebuilding {
                kind: RebuildKind::Full,
            },
            "Faulted" => ReplicaState::Faulted {
                reason: FaultReason::ConnectionLost,
            },
            "Removed" => ReplicaState::Removed,
            _ => return None,
        })
    }

    pub fn fault_reason(&self) -> Option<&FaultReason> {
        match self {
            ReplicaState::Faulted { reason } => Some(reason),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::diagram_edges;

    #[test]
    fn the_diagram_and_can_become_say_the_same_thing() {
        let drawn = diagram_edges(include_str!("state.rs"), &ReplicaState::NAMES);
        assert!(drawn.len() >= 8, "diagram not found: {drawn:?}");
        for from in ReplicaState::NAMES {
            for to in ReplicaState::NAMES {
                let allowed = ReplicaState::example(from)
                    .unwrap()
                    .can_become(&ReplicaState::example(to).unwrap());
                let is_drawn = drawn.contains(&(from.to_string(), to.to_string()));
                assert_eq!(
                    allowed, is_drawn,
                    "{from} -> {to}: can_become says {allowed}, the diagram {is_drawn}"
                );
            }
        }
    }

    #[test]
    fn sets_follow_the_table() {
        for (name, write, read) in [
            ("Connecting", false, false),
            ("Online", true, true),
            ("Rebuilding", true, false),
            ("Faulted", false, false),
            ("Removed", false, false),
        ] {
            let s = ReplicaState::example(name).unwrap();
            assert_eq!((s.in_write_set(), s.in_read_set()), (write, read), "{name}");
        }
    }

    #[test]
    fn states_persist_as_typed_data() {
        let s = ReplicaState::Faulted {
            reason: FaultReason::IoError {
                op: IoOp::Write,
                errno: libc::EIO,
            },
        };
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(
            j,
            r#"{"state":"faulted","reason":{"kind":"io_error","op":"write","errno":5}}"#
        );
        assert_eq!(serde_json::from_str::<ReplicaState>(&j).unwrap(), s);
        assert_eq!(
            s.fault_reason().unwrap().to_string(),
            "Write failed: Input/output error (os error 5)"
        );
        assert_eq!(
            FaultReason::of_errno(IoOp::Read, Errno(libc::ENOTCONN)),
            FaultReason::ConnectionLost
        );
    }
}
