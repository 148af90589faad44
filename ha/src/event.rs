//! What the HA monitor saw and decided, as data: persisted (bounded) by ublkd,
//! listed by `ublkctl events`, rendered to text only for people.

use replication::state::{FaultReason, RebuildKind};
use serde::{Deserialize, Serialize};

use crate::peer::ProbeFailure;
use crate::placement::NoPlacement;
use crate::{PeerAddr, UnixMs};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub at: UnixMs,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// The replica's location (`id@host:port`, or a path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// Why a replica is replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum ReplaceReason {
    /// Its server has not answered since `since`.
    PeerDead { peer: PeerAddr, since: UnixMs },
    /// Its storage failed while its server answers.
    DiskFailed { fault: FaultReason },
    /// `ublkctl replica replace`.
    Operator,
}

impl std::fmt::Display for ReplaceReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplaceReason::PeerDead { peer, .. } => write!(f, "its server {peer} is dead"),
            ReplaceReason::DiskFailed { fault } => write!(f, "its storage failed: {fault}"),
            ReplaceReason::Operator => write!(f, "asked by an operator"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// A probe failed; `repeats`: suspicions of this peer not reported since the
    /// last event (a flapping peer is reported once a minute).
    PeerSuspected {
        peer: PeerAddr,
        why: ProbeFailure,
        repeats: u32,
    },
    PeerDead {
        peer: PeerAddr,
        why: ProbeFailure,
        since: UnixMs,
    },
    PeerReturned {
        peer: PeerAddr,
        down_ms: u64,
    },
    /// A new replica `new` on `to` takes the place of the event's replica.
    ReplacementPlaced {
        new: String,
        to: PeerAddr,
        reason: ReplaceReason,
    },
    /// The replacement could not be made; retried after `retry_in_ms`.
    ReplacementFailed {
        error: String,
        retry_in_ms: u64,
    },
    /// The replica needs a replacement and none can be placed (said again only
    /// when the reason changes).
    NoPlacement {
        reason: ReplaceReason,
        why: NoPlacement,
    },
    /// `new` holds every acknowledged write: the event's replica is dropped.
    ReplacementOnline {
        new: String,
    },
    /// The event's replica came back and lacks less than the half-built `new`:
    /// `new` is dropped and the old one caught up by a partial rebuild.
    PartialInsteadOfFull {
        new: String,
        old_missing_bytes: u64,
        new_remaining_bytes: u64,
    },
    RebuildStarted {
        kind: RebuildKind,
    },
    RebuildEnded {
        kind: RebuildKind,
        ended: replication::rebuild::Ended,
    },
    /// A replaced replica's server answers again: the replica is stale, not used,
    /// and its storage kept until an operator reclaims it.
    StaleRefused {
        peer: PeerAddr,
    },
    /// An operator reclaimed the storage of the event's (retired) replica.
    Reclaimed {
        freed_bytes: u64,
    },
    /// The event's replica left the mirror (its writes skip it until a rebuild).
    ReplicaFaulted {
        reason: FaultReason,
    },
    Paused,
    Resumed,
    /// An operator put a server in maintenance (a planned reboot): its replicas are
    /// not replaced meanwhile (`until`: when it ends by itself).
    MaintenanceStarted {
        peer: PeerAddr,
        until: Option<UnixMs>,
    },
    MaintenanceEnded {
        peer: PeerAddr,
    },
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(v) = &self.volume {
            write!(f, "{v}: ")?;
        }
        if let Some(r) = &self.replica {
            write!(f, "{r}: ")?;
        }
        use EventKind::*;
        match &self.kind {
            PeerSuspected { peer, why, repeats } => {
                write!(f, "peer {peer} suspected: {why}")?;
                if *repeats > 0 {
                    write!(f, " ({repeats} more times since the last report)")?;
                }
                Ok(())
            }
            PeerDead { peer, why, since } => write!(
                f,
                "peer {peer} declared dead: {why} for {} ms",
                self.at.since(*since)
            ),
            PeerReturned { peer, down_ms } => write!(f, "peer {peer} back after {down_ms} ms"),
            ReplacementPlaced { new, to, reason } => {
                write!(f, "replaced by {new} on {to} because {reason}")
            }
            ReplacementFailed { error, retry_in_ms } => {
                write!(f, "replacement failed: {error}; retrying in {retry_in_ms} ms")
            }
            NoPlacement { reason, why } => {
                write!(f, "needs a replacement ({reason}) but {why}")
            }
            ReplacementOnline { new } => write!(f, "{new} is online: this replica is dropped"),
            PartialInsteadOfFull {
                new,
                old_missing_bytes,
                new_remaining_bytes,
            } => write!(
                f,
                "came back lacking {old_missing_bytes} bytes, less than the {new_remaining_bytes} {new} still lacks: caught up by a partial rebuild, {new} dropped"
            ),
            RebuildStarted { kind } => {
                write!(f, "{} rebuild started", format!("{kind:?}").to_lowercase())
            }
            RebuildEnded { kind, ended } => {
                use replication::rebuild::Ended;
                let kind = format!("{kind:?}").to_lowercase();
                match ended {
                    Ended::Done { bytes } => write!(f, "{kind} rebuild done: {bytes} bytes copied"),
                    Ended::Stopped { bytes, reason } => {
                        write!(f, "{kind} rebuild stopped after {bytes} bytes: {reason}")
                    }
                    Ended::NotStarted { error } => write!(f, "{kind} rebuild not started: {error}"),
                }
            }
            StaleRefused { peer } => write!(
                f,
                "its server {peer} answers again, but it was replaced: stale, not used (reclaim its storage with ublkctl replica reclaim)"
            ),
            Reclaimed { freed_bytes } => {
                write!(f, "retired replica's storage reclaimed ({freed_bytes} bytes freed)")
            }
            ReplicaFaulted { reason } => write!(f, "faulted: {reason}"),
            Paused => write!(f, "automatic HA decisions paused"),
            Resumed => write!(f, "automatic HA decisions resumed"),
            MaintenanceStarted { peer, until } => {
                write!(f, "server {peer} in maintenance: its replicas are caught up when it is back, not replaced")?;
                match until {
                    Some(t) => write!(f, " (until {} ms)", t.0),
                    None => write!(f, " (until ublkctl ha maintenance end {peer})"),
                }
            }
            MaintenanceEnded { peer } => write!(f, "server {peer} out of maintenance"),
        }
    }
}
