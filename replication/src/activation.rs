//! Activation planning: which replicas a starting owner may trust, which
//! generation it takes, and what it writes into the labels — a pure function of
//! what the owner's record says and what the replicas' labels say ([`plan`]), so
//! the rules are tested with tables and the volume's start is a sequence of steps.
//!
//! The rules, in order:
//! 1. **Identity.** Every label must name this volume (name and uuid), its size and
//!    block size; a location whose label carries another replica uuid than the
//!    record knows for it (a device name that now points at another disk) is
//!    refused too. Refusals stop the start: nothing is ever overwritten.
//! 2. **Generation.** One above every generation seen (record and labels). If a
//!    label shows a newer generation than our record — or ours under another owner
//!    id — another owner ran the volume since: `takeover`.
//! 3. **Membership.** The newest epoch among the record and the labels is the truth
//!    (two different member lists at one epoch: split brain, refused). A replica is
//!    current — Online — if its own label is at that epoch, lists it, and is not
//!    marked outdated. Every other reachable replica is Faulted (stale, missing,
//!    new). When no membership exists yet (a fresh volume, or one made by ublkd
//!    0.1), present replicas are current, except those the record says are faulted.
//! 4. **Availability.** An unreachable replica that may be current is waited for
//!    (Connecting) until the grace period is over; after it, it is faulted only if
//!    a current replica is online. With no current replica reachable the owner
//!    waits ([`Decision::Wait`]) — it never faults the last copies of the data.
//! 5. **New epoch.** The online replicas form the next epoch, written into their
//!    labels (with the new generation) before the device serves.

use serde::{Deserialize, Serialize};
use wire::label::{Label, Membership};
use wire::{Epoch, Generation, OwnerId, ReplicaUuid, VolumeUuid};

use crate::state::{FaultReason, ReplicaState};

/// What the owner's state directory says about the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// `None` in a record of ublkd 0.1 (before labels).
    pub volume_uuid: Option<VolumeUuid>,
    pub generation: Generation,
    pub owner: OwnerId,
    /// `None` in a record of ublkd 0.1.
    pub membership: Option<Membership>,
    pub replicas: Vec<RecordedReplica>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedReplica {
    pub location: String,
    pub uuid: Option<ReplicaUuid>,
    pub state: ReplicaState,
}

/// What opening (local) or STAT (remote) found at one configured location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Label(Label),
    /// Opened, no label: a replica of ublkd 0.1, or a file created just now.
    Unlabelled {
        created: bool,
    },
    /// No such replica: the file is missing (and may not be created), or the
    /// server has none.
    Missing,
    /// Could not be opened or reached now.
    Unreachable {
        error: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub location: String,
    pub remote: bool,
    pub seen: Seen,
}

pub struct Input<'a> {
    pub volume: &'a str,
    pub size: u64,
    pub block_size: u32,
    pub record: Option<&'a Recorded>,
    /// In config order.
    pub probes: &'a [Probe],
    /// The grace period for unreachable replicas is over.
    pub grace_over: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Go(Plan),
    /// No decision yet: these replicas may hold current data and are not reachable.
    Wait {
        for_replicas: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub volume_uuid: VolumeUuid,
    pub generation: Generation,
    /// Another owner ran the volume (up to this generation) since our last activation.
    pub takeover: Option<Generation>,
    /// The epoch to write: the online replicas.
    pub membership: Membership,
    /// In config order.
    pub replicas: Vec<ReplicaPlan>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaPlan {
    pub uuid: ReplicaUuid,
    pub state: ReplicaState,
    pub label: LabelAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LabelAction {
    /// It has a label: members get the new membership (and generation).
    Update,
    /// No label yet (new, or adopted from ublkd 0.1): write one with this uuid.
    Write,
    /// A remote replica new to the volume: create it (with this uuid) at OPEN.
    Create,
    /// Nothing can be written (unreachable or missing).
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActivationError {
    #[error("replica {location} belongs to another volume ({volume:?}, {uuid}): refusing to use or overwrite it")]
    ForeignReplica {
        location: String,
        volume: String,
        uuid: VolumeUuid,
    },
    #[error("replica {location} is {size} bytes of {block_size}-byte blocks, the volume {want_size} of {want_block_size}")]
    WrongGeometry {
        location: String,
        size: u64,
        block_size: u32,
        want_size: u64,
        want_block_size: u32,
    },
    #[error("{location} holds replica {found}, but the record knows replica {expected} there: did the device names change? (use stable /dev/disk/by-id paths)")]
    ReplicaMoved {
        location: String,
        expected: ReplicaUuid,
        found: ReplicaUuid,
    },
    #[error("split brain: two different memberships at epoch {epoch} ({a} and {b}): an operator must decide which replica holds the data")]
    SplitBrain { epoch: u64, a: String, b: String },
    #[error("no replica holds the volume's current data: {0}")]
    NoCurrentReplica(String),
    #[error("{location}: its {what} {value} is past any real history (limit {limit}): a damaged or hostile label or record; refusing to activate (check that replica, or remove it from the config)", limit = Generation::LIMIT.0)]
    Implausible {
        location: String,
        what: &'static str,
        value: u64,
    },
}

/// The activation decision (module docs).
pub fn plan(input: &Input) -> Result<Decision, ActivationError> {
    let labels: Vec<(&Probe, &Label)> = input
        .probes
        .iter()
        .filter_map(|p| match &p.seen {
            Seen::Label(l) => Some((p, l)),
            _ => None,
        })
        .collect();
    let record = input.record;
    let recorded = |loc: &str| record.and_then(|r| r.replicas.iter().find(|x| x.location == loc));

    // 1. Identity, and numbers no history reaches (the arithmetic below and the
    // running volume's epochs must not overflow).
    let implausible = |location: &str, what, value| ActivationError::Implausible {
        location: location.to_string(),
        what,
        value,
    };
    for (p, l) in &labels {
        if l.generation >= Generation::LIMIT {
            return Err(implausible(&p.location, "label generation", l.generation.0));
        }
        if l.membership.epoch >= Epoch::LIMIT {
            return Err(implausible(
                &p.location,
                "label membership epoch",
                l.membership.epoch.0,
            ));
        }
        if l.membership.generation >= Generation::LIMIT {
            return Err(implausible(
                &p.location,
                "label membership generation",
                l.membership.generation.0,
            ));
        }
    }
    if let Some(r) = record {
        let epoch = r.membership.as_ref().map_or(Epoch(0), |m| m.epoch);
        if r.generation >= Generation::LIMIT || epoch >= Epoch::LIMIT {
            let value = r.generation.0.max(epoch.0);
            return Err(implausible(
                "the owner's record",
                "generation or epoch",
                value,
            ));
        }
    }
    let mut volume_uuid = record.and_then(|r| r.volume_uuid);
    for (p, l) in &labels {
        let foreign = |uuid| ActivationError::ForeignReplica {
            location: p.location.clone(),
            volume: l.volume.clone(),
            uuid,
        };
        if l.volume != input.volume {
            return Err(foreign(l.volume_uuid));
        }
        if !l.volume_uuid.is_nil() {
            match volume_uuid {
                Some(u) if u != l.volume_uuid => return Err(foreign(l.volume_uuid)),
                Some(_) => {}
                None => volume_uuid = Some(l.volume_uuid),
            }
        }
        if l.size != input.size || l.block_size != input.block_size {
            return Err(ActivationError::WrongGeometry {
                location: p.location.clone(),
                size: l.size,
                block_size: l.block_size,
                want_size: input.size,
                want_block_size: input.block_size,
            });
        }
        if let Some(expected) = recorded(&p.location).and_then(|r| r.uuid) {
            if expected != l.replica_uuid {
                return Err(ActivationError::ReplicaMoved {
                    location: p.location.clone(),
                    expected,
                    found: l.replica_uuid,
                });
            }
        }
    }
    let volume_uuid = volume_uuid.unwrap_or_else(VolumeUuid::random);

    // 2. Generation.
    let (last_gen, last_owner) =
        record.map_or((Generation(0), OwnerId(0)), |r| (r.generation, r.owner));
    let newest = labels
        .iter()
        .map(|(_, l)| l.generation)
        .fold(last_gen, Generation::max);
    let generation = newest
        .checked_next()
        .filter(|g| *g < Generation::LIMIT)
        .ok_or_else(|| implausible("the newest label", "generation", newest.0))?;
    let foreign_gen = |l: &Label| {
        l.generation > last_gen
            || (l.generation == last_gen
                && l.generation > Generation(0)
                && last_owner != OwnerId(0)
                && l.owner != last_owner)
    };
    let takeover =
        (record.is_some() && labels.iter().any(|(_, l)| foreign_gen(l))).then_some(newest);

    // 3. Membership: the newest epoch anywhere.
    let mut sources: Vec<(String, &Membership)> = labels
        .iter()
        .filter(|(_, l)| l.membership.epoch > Epoch(0))
        .map(|(p, l)| (p.location.clone(), &l.membership))
        .collect();
    if let Some(m) = record.and_then(|r| r.membership.as_ref()) {
        if m.epoch > Epoch(0) {
            sources.push(("the owner's record".to_string(), m));
        }
    }
    // Histories are ordered by (generation, epoch): a newer owner's activation
    // writes an epoch above every one it saw, so in one line of history a newer
    // generation has the higher epochs too. An older generation at or above the
    // newest generation's epoch kept going after the newer one forked from it —
    // after a partition, an owner that faulted its unreachable replicas one by one
    // and acknowledged writes on the rest: two histories that both acknowledged
    // writes, split brain, for an operator to settle (never a silent rollback of
    // either side). (A newer generation that moved on past that epoch hides the
    // fork: there, refusing takeovers at an ordinary start protects the old side.)
    let order = |m: &Membership| (m.generation, m.epoch);
    let newest_at = sources.iter().map(|(_, m)| order(m)).max();
    let newest_epoch = newest_at.map(|(_, e)| e);
    let truth: Option<&Membership> = match newest_at {
        None => None,
        Some(e) => {
            let at: Vec<&(String, &Membership)> =
                sources.iter().filter(|(_, m)| order(m) == e).collect();
            let sorted = |m: &Membership| {
                let mut v = m.members.clone();
                v.sort();
                v
            };
            let first = sorted(at[0].1);
            if let Some(other) = at.iter().find(|(_, m)| sorted(m) != first) {
                return Err(ActivationError::SplitBrain {
                    epoch: e.1 .0,
                    a: at[0].0.clone(),
                    b: other.0.clone(),
                });
            }
            let forked = sources
                .iter()
                .find(|(_, m)| m.generation < e.0 && m.epoch >= e.1 && sorted(m) != first);
            if let Some(old) = forked {
                return Err(ActivationError::SplitBrain {
                    epoch: old.1.epoch.0,
                    a: old.0.clone(),
                    b: at[0].0.clone(),
                });
            }
            Some(at[0].1)
        }
    };
    let fresh = record.is_none() && labels.is_empty();

    // 4. Each replica.
    let mut out: Vec<ReplicaPlan> = Vec::with_capacity(input.probes.len());
    for p in input.probes {
        let rec = recorded(&p.location);
        let recorded_fault = rec.and_then(|r| r.state.fault_reason().cloned());
        let known_uuid = rec.and_then(|r| r.uuid);
        let faulted = |fallback: FaultReason| ReplicaState::Faulted {
            reason: recorded_fault.clone().unwrap_or(fallback),
        };
        // Could it hold every acknowledged write?
        let may_be_current = match (truth, known_uuid) {
            (Some(m), Some(u)) => m.contains(u),
            (Some(_), None) => false,
            // No membership yet: what the record says (ublkd 0.1), or trust.
            (None, _) => rec.is_none_or(|r| r.state == ReplicaState::Online),
        };
        let r = match &p.seen {
            Seen::Label(l) => {
                let current = match truth {
                    Some(m) => {
                        l.is_current_at(m.epoch)
                            && l.membership.generation == m.generation
                            && m.contains(l.replica_uuid)
                    }
                    None => !l.outdated && may_be_current,
                };
                let state = if current {
                    ReplicaState::Online
                } else if takeover.is_some() && l.generation < newest {
                    // Another owner ran the volume, and not with this replica.
                    faulted(FaultReason::MissedGeneration { generation: newest })
                } else {
                    faulted(FaultReason::Stale {
                        label_epoch: l.membership.epoch,
                        newest_epoch: newest_epoch.unwrap_or_default(),
                    })
                };
                let label = if l.volume_uuid.is_nil() && !p.remote {
                    LabelAction::Write
                } else {
                    LabelAction::Update
                };
                ReplicaPlan {
                    uuid: l.replica_uuid,
                    state,
                    label,
                }
            }
            Seen::Unlabelled { created } => {
                // Adopted (ublkd 0.1) when no membership exists yet; otherwise it
                // holds none of the volume's data (new, or its label is gone).
                let adopt = truth.is_none() && if *created { fresh } else { may_be_current };
                ReplicaPlan {
                    uuid: ReplicaUuid::random(),
                    state: if adopt {
                        ReplicaState::Online
                    } else if *created || known_uuid.is_none() {
                        ReplicaState::Faulted {
                            reason: FaultReason::NewReplica,
                        }
                    } else {
                        faulted(FaultReason::NewReplica)
                    },
                    label: LabelAction::Write,
                }
            }
            Seen::Missing if p.remote && rec.is_none() => ReplicaPlan {
                // New to the volume: created empty, current only in a fresh volume.
                uuid: ReplicaUuid::random(),
                state: if fresh {
                    ReplicaState::Online
                } else {
                    ReplicaState::Faulted {
                        reason: FaultReason::NewReplica,
                    }
                },
                label: LabelAction::Create,
            },
            Seen::Missing => ReplicaPlan {
                uuid: known_uuid.unwrap_or_else(ReplicaUuid::random),
                state: ReplicaState::Faulted {
                    reason: FaultReason::Missing,
                },
                label: LabelAction::None,
            },
            Seen::Unreachable { error } => ReplicaPlan {
                uuid: known_uuid.unwrap_or_else(ReplicaUuid::random),
                state: if may_be_current && (rec.is_some() || !input.grace_over) {
                    ReplicaState::Connecting
                } else {
                    faulted(FaultReason::OpenFailed {
                        error: error.clone(),
                    })
                },
                label: LabelAction::None,
            },
        };
        out.push(r);
    }

    let online = out.iter().any(|r| r.state == ReplicaState::Online);
    let locations = |f: &dyn Fn(&Probe, &ReplicaPlan) -> bool| -> Vec<String> {
        input
            .probes
            .iter()
            .zip(&out)
            .filter(|(p, r)| f(p, r))
            .map(|(p, _)| p.location.clone())
            .collect()
    };
    if !online {
        // Nothing current is reachable: wait for whatever is unreachable (it may
        // hold the data), never fault it.
        let unreachable = locations(&|p, _| matches!(p.seen, Seen::Unreachable { .. }));
        if !unreachable.is_empty() {
            return Ok(Decision::Wait {
                for_replicas: unreachable,
            });
        }
        let why: Vec<String> = input
            .probes
            .iter()
            .zip(&out)
            .map(|(p, r)| match r.state.fault_reason() {
                Some(f) => format!("{}: {f}", p.location),
                None => format!("{}: {}", p.location, r.state.name()),
            })
            .collect();
        return Err(ActivationError::NoCurrentReplica(why.join("; ")));
    }
    let connecting = locations(&|_, r| r.state == ReplicaState::Connecting);
    if !connecting.is_empty() && !input.grace_over {
        return Ok(Decision::Wait {
            for_replicas: connecting,
        });
    }
    // Unreachable members past the grace, with others online: they miss what
    // follows from now on.
    for ((p, r), probe) in out.iter_mut().zip(input.probes).map(|(r, p)| ((p, r), p)) {
        if r.state == ReplicaState::Connecting {
            let error = match &probe.seen {
                Seen::Unreachable { error } => error.clone(),
                _ => "unreachable".into(),
            };
            tracing::warn!(replica = %p.location, %error, "current replica unreachable past the grace period: faulted");
            r.state = ReplicaState::Faulted {
                reason: FaultReason::OpenFailed { error },
            };
        }
    }
    let members: Vec<ReplicaUuid> = out
        .iter()
        .filter(|r| r.state == ReplicaState::Online)
        .map(|r| r.uuid)
        .collect();
    Ok(Decision::Go(Plan {
        volume_uuid,
        generation,
        takeover,
        membership: Membership {
            epoch: newest_epoch.unwrap_or_default().next(),
            generation,
            members,
        },
        replicas: out,
    }))
}

/// Why a dirty map saved by an earlier run is not used: the replica it is for
/// gets a full rebuild instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "why", rename_all = "snake_case")]
pub enum MapRefused {
    /// Saved for another volume (the state dir was reused) or another replica.
    NotOurs,
    /// The volume's size or the map's region size changed since.
    Geometry,
    /// The replica's history is older than the partial-rebuild window.
    Expired { age_s: u64, window_s: u64 },
    /// The replica's label was written after the map began: someone else changed
    /// it, so the map no longer covers what it lacks.
    LabelNewer { label_epoch: Epoch, since: Epoch },
    /// Another owner ran the volume since the map's owner: its writes are in no
    /// map of ours.
    OtherOwner { generation: Generation },
}

impl std::fmt::Display for MapRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MapRefused::NotOurs => {
                write!(f, "the saved dirty map is for another volume or replica")
            }
            MapRefused::Geometry => write!(
                f,
                "the volume's geometry changed since the dirty map was saved"
            ),
            MapRefused::Expired { age_s, window_s } => write!(
                f,
                "away for {age_s} s, longer than the partial-rebuild window ({window_s} s)"
            ),
            MapRefused::LabelNewer { label_epoch, since } => write!(
                f,
                "its label (epoch {}) was written after the dirty map began (epoch {})",
                label_epoch.0, since.0
            ),
            MapRefused::OtherOwner { generation } => write!(
                f,
                "another owner (generation {}) ran the volume since the dirty map was saved: what it wrote is in no map of ours",
                generation.0
            ),
        }
    }
}

/// The facts a saved map is checked against.
#[derive(Debug, Clone, Copy)]
pub struct MapCheck<'a> {
    pub volume_uuid: VolumeUuid,
    pub replica_uuid: ReplicaUuid,
    pub size: u64,
    pub grain: crate::dirty::Grain,
    /// What the replica's label says now (`None`: unreachable; checked again
    /// when it connects, by the label's uuid).
    pub label: Option<&'a Label>,
    pub now_unix_ms: u64,
    pub partial_window: std::time::Duration,
    /// Another owner ran the volume since our last activation
    /// ([`Plan::takeover`]): at this generation.
    pub taken_over: Option<Generation>,
}

/// May the saved map with `header` be trusted to say what the replica lacks? A
/// full rebuild's remainder is resumed at any age; a missed-writes map only
/// within the partial window (DRBD keeps a bitmap forever; the window bounds how
/// long a replica's stale data is kept as the basis of a rebuild).
pub fn check_saved_map(
    header: &crate::dirty_file::DirtyHeader,
    c: &MapCheck,
) -> Result<(), MapRefused> {
    use crate::dirty_file::LogKind;
    if header.volume != c.volume_uuid || header.replica != c.replica_uuid {
        return Err(MapRefused::NotOurs);
    }
    if header.size.0 != c.size || header.grain != c.grain {
        return Err(MapRefused::Geometry);
    }
    if let Some(generation) = c.taken_over {
        return Err(MapRefused::OtherOwner { generation });
    }
    if let Some(l) = c.label {
        if l.replica_uuid != c.replica_uuid || l.volume_uuid != c.volume_uuid {
            return Err(MapRefused::NotOurs);
        }
        if l.membership.epoch > header.origin.since_epoch {
            return Err(MapRefused::LabelNewer {
                label_epoch: l.membership.epoch,
                since: header.origin.since_epoch,
            });
        }
    }
    let age = header.origin.age_ms(c.now_unix_ms);
    if header.origin.kind == LogKind::Missed && age > c.partial_window.as_millis() as u64 {
        return Err(MapRefused::Expired {
            age_s: age / 1000,
            window_s: c.partial_window.as_secs(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 20;

    struct World {
        vu: VolumeUuid,
        uuids: Vec<ReplicaUuid>,
    }

    impl World {
        fn new() -> World {
            World {
                vu: VolumeUuid::random(),
                uuids: (0..3).map(|_| ReplicaUuid::random()).collect(),
            }
        }

        /// Replica `i`'s label at `epoch` listing `members` (indices), generation `g`.
        fn label(&self, i: usize, epoch: u64, members: &[usize], g: u64) -> Seen {
            let mut l = Label::new("v", self.vu, self.uuids[i], SIZE, 4096);
            l.generation = Generation(g);
            l.owner = OwnerId(1);
            l.membership = self.membership(epoch, members, g);
            Seen::Label(l)
        }

        fn membership(&self, epoch: u64, members: &[usize], g: u64) -> Membership {
            Membership {
                epoch: Epoch(epoch),
                generation: Generation(g),
                members: members.iter().map(|&i| self.uuids[i]).collect(),
            }
        }

        fn record(&self, epoch: u64, members: &[usize], g: u64) -> Recorded {
            Recorded {
                volume_uuid: Some(self.vu),
                generation: Generation(g),
                owner: OwnerId(1),
                membership: Some(self.membership(epoch, members, g)),
                replicas: (0..3)
                    .map(|i| RecordedReplica {
                        location: loc(i),
                        uuid: Some(self.uuids[i]),
                        state: if members.contains(&i) {
                            ReplicaState::Online
                        } else {
                            ReplicaState::Faulted {
                                reason: FaultReason::ConnectionLost,
                            }
                        },
                    })
                    .collect(),
            }
        }
    }

    fn loc(i: usize) -> String {
        format!("r{i}")
    }

    fn probes(seen: Vec<Seen>) -> Vec<Probe> {
        seen.into_iter()
            .enumerate()
            .map(|(i, seen)| Probe {
                location: loc(i),
                remote: i > 0,
                seen,
            })
            .collect()
    }

    fn run(
        record: Option<&Recorded>,
        seen: Vec<Seen>,
        grace_over: bool,
    ) -> Result<Decision, ActivationError> {
        let p = probes(seen);
        plan(&Input {
            volume: "v",
            size: SIZE,
            block_size: 4096,
            record,
            probes: &p,
            grace_over,
        })
    }

    /// The state names of a Go plan, or "wait", or the error's start.
    fn outcome(d: Result<Decision, ActivationError>) -> String {
        match d {
            Ok(Decision::Go(p)) => p
                .replicas
                .iter()
                .map(|r| match &r.state {
                    ReplicaState::Faulted { reason } => match reason {
                        FaultReason::Stale { .. } => "stale",
                        FaultReason::NewReplica => "new",
                        FaultReason::Missing => "missing",
                        FaultReason::OpenFailed { .. } => "unreachable",
                        FaultReason::ConnectionLost => "faulted(recorded)",
                        FaultReason::MissedGeneration { .. } => "missed-generation",
                        _ => "faulted",
                    },
                    s => s.name(),
                })
                .collect::<Vec<_>>()
                .join(" "),
            Ok(Decision::Wait { .. }) => "wait".into(),
            Err(e) => format!("error: {e}"),
        }
    }

    fn outdated(s: Seen) -> Seen {
        let Seen::Label(mut l) = s else {
            unreachable!()
        };
        l.outdated = true;
        Seen::Label(l)
    }

    fn unreachable() -> Seen {
        Seen::Unreachable {
            error: "connection refused".into(),
        }
    }

    #[test]
    fn trust_table() {
        let w = World::new();
        let all = [0, 1, 2];
        // (what, record, probes, grace over, expected)
        type Case = (
            &'static str,
            Option<Recorded>,
            Vec<Seen>,
            bool,
            &'static str,
        );
        let cases: Vec<Case> = vec![
            (
                "all current",
                Some(w.record(4, &all, 3)),
                vec![
                    w.label(0, 4, &all, 3),
                    w.label(1, 4, &all, 3),
                    w.label(2, 4, &all, 3),
                ],
                true,
                "online online online",
            ),
            (
                "r2 faulted: the survivors moved on",
                Some(w.record(5, &[0, 1], 3)),
                vec![
                    w.label(0, 5, &[0, 1], 3),
                    w.label(1, 5, &[0, 1], 3),
                    w.label(2, 4, &all, 3),
                ],
                true,
                "online online faulted(recorded)",
            ),
            (
                "r2 faulted, the state dir lost: the labels still tell",
                None,
                vec![
                    w.label(0, 5, &[0, 1], 3),
                    w.label(1, 5, &[0, 1], 3),
                    w.label(2, 4, &all, 3),
                ],
                true,
                "online online stale",
            ),
            (
                "an old backup of the state dir: the labels are newer",
                Some(w.record(2, &all, 1)),
                vec![
                    w.label(0, 5, &[0, 1], 3),
                    w.label(1, 5, &[0, 1], 3),
                    w.label(2, 4, &all, 3),
                ],
                true,
                "online online stale",
            ),
            (
                "a member marked outdated is not trusted",
                None,
                vec![
                    w.label(0, 4, &all, 3),
                    w.label(1, 4, &all, 3),
                    outdated(w.label(2, 4, &all, 3)),
                ],
                true,
                "online online stale",
            ),
            (
                "only an outdated replica reachable, no record: wait for the others",
                None,
                vec![
                    unreachable(),
                    unreachable(),
                    outdated(w.label(2, 4, &all, 3)),
                ],
                true,
                "wait",
            ),
            (
                "a current member unreachable within the grace: wait",
                Some(w.record(4, &all, 3)),
                vec![
                    w.label(0, 4, &all, 3),
                    unreachable(),
                    w.label(2, 4, &all, 3),
                ],
                false,
                "wait",
            ),
            (
                "a current member unreachable past the grace: faulted, the others serve",
                Some(w.record(4, &all, 3)),
                vec![
                    w.label(0, 4, &all, 3),
                    unreachable(),
                    w.label(2, 4, &all, 3),
                ],
                true,
                "online unreachable online",
            ),
            (
                "every current member unreachable: wait, never fault them",
                Some(w.record(5, &[1, 2], 3)),
                vec![w.label(0, 4, &all, 3), unreachable(), unreachable()],
                true,
                "wait",
            ),
            (
                "a stale replica alone, the record knows better: wait for the members",
                Some(w.record(5, &[1], 3)),
                vec![
                    w.label(0, 4, &all, 3),
                    unreachable(),
                    w.label(2, 4, &all, 3),
                ],
                true,
                "wait",
            ),
            (
                "a new remote replica in an existing volume: created, needs a rebuild",
                Some({
                    let mut r = w.record(4, &[0, 1], 3);
                    r.replicas.truncate(2);
                    r
                }),
                vec![
                    w.label(0, 4, &[0, 1], 3),
                    w.label(1, 4, &[0, 1], 3),
                    Seen::Missing,
                ],
                true,
                "online online new",
            ),
            (
                "a remote replica its server lost: missing, not recreated",
                Some(w.record(4, &all, 3)),
                vec![
                    w.label(0, 4, &all, 3),
                    w.label(1, 4, &all, 3),
                    Seen::Missing,
                ],
                true,
                "online online missing",
            ),
            (
                "a labelled replica whose label is gone: new",
                Some(w.record(4, &all, 3)),
                vec![
                    w.label(0, 4, &all, 3),
                    Seen::Unlabelled { created: false },
                    w.label(2, 4, &all, 3),
                ],
                true,
                "online new online",
            ),
            (
                "a fresh volume: everything present is current, missing remotes are created",
                None,
                vec![
                    Seen::Unlabelled { created: true },
                    Seen::Missing,
                    Seen::Missing,
                ],
                true,
                "online online online",
            ),
            (
                "nothing current at all",
                Some(w.record(6, &[1], 3)),
                vec![
                    w.label(0, 4, &all, 3),
                    w.label(1, 5, &[0, 1], 3),
                    w.label(2, 4, &all, 3),
                ],
                true,
                "error: no replica holds the volume's current data",
            ),
        ];
        for (what, record, seen, grace_over, want) in cases {
            let got = outcome(run(record.as_ref(), seen, grace_over));
            assert!(got.starts_with(want), "{what}: got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn adoption_of_ublkd_0_1_replicas() {
        let online = |i: usize| RecordedReplica {
            location: loc(i),
            uuid: None,
            state: ReplicaState::Online,
        };
        let v1 = Recorded {
            volume_uuid: None,
            generation: Generation(3),
            owner: OwnerId(1),
            membership: None,
            replicas: vec![
                online(0),
                online(1),
                RecordedReplica {
                    state: ReplicaState::Faulted {
                        reason: FaultReason::Legacy {
                            detail: "I/O error".into(),
                        },
                    },
                    ..online(2)
                },
            ],
        };
        // The remote ones come labelled by their servers (nil volume uuid).
        let legacy = |outdated: bool| {
            let mut l = Label::new(
                "v",
                VolumeUuid::default(),
                ReplicaUuid::random(),
                SIZE,
                4096,
            );
            l.generation = Generation(3);
            l.owner = OwnerId(1);
            l.outdated = outdated;
            Seen::Label(l)
        };
        let d = run(
            Some(&v1),
            vec![
                Seen::Unlabelled { created: false },
                legacy(false),
                legacy(true),
            ],
            true,
        )
        .unwrap();
        let Decision::Go(p) = d else { panic!("{d:?}") };
        let states: Vec<&str> = p.replicas.iter().map(|r| r.state.name()).collect();
        assert_eq!(states, ["online", "online", "faulted"]);
        assert_eq!(p.replicas[0].label, LabelAction::Write);
        assert_eq!(p.generation, Generation(4));
        assert_eq!(p.membership.epoch, Epoch(1));
        assert_eq!(
            p.membership.members,
            vec![p.replicas[0].uuid, p.replicas[1].uuid]
        );
        assert_eq!(p.takeover, None);
    }

    #[test]
    fn identity_refusals() {
        let w = World::new();
        let all = [0, 1, 2];
        let rec = w.record(4, &all, 3);
        let other = World::new();
        let e = run(
            Some(&rec),
            vec![
                w.label(0, 4, &all, 3),
                other.label(1, 4, &[1], 3),
                w.label(2, 4, &all, 3),
            ],
            true,
        );
        assert!(
            matches!(e, Err(ActivationError::ForeignReplica { ref location, .. }) if location == "r1"),
            "{e:?}"
        );
        // Two replicas' device names swapped.
        let Seen::Label(l1) = w.label(1, 4, &all, 3) else {
            unreachable!()
        };
        let Seen::Label(l2) = w.label(2, 4, &all, 3) else {
            unreachable!()
        };
        let e = run(
            Some(&rec),
            vec![w.label(0, 4, &all, 3), Seen::Label(l2), Seen::Label(l1)],
            true,
        );
        assert!(
            matches!(e, Err(ActivationError::ReplicaMoved { .. })),
            "{e:?}"
        );
        // Another size.
        let Seen::Label(mut l) = w.label(0, 4, &all, 3) else {
            unreachable!()
        };
        l.size = SIZE * 2;
        let e = run(
            Some(&rec),
            vec![
                Seen::Label(l),
                w.label(1, 4, &all, 3),
                w.label(2, 4, &all, 3),
            ],
            true,
        );
        assert!(
            matches!(e, Err(ActivationError::WrongGeometry { .. })),
            "{e:?}"
        );
        // Split brain: two owners both wrote epoch 5, with different members.
        let e = run(
            None,
            vec![
                w.label(0, 5, &[0], 3),
                w.label(1, 5, &[1, 2], 4),
                w.label(2, 5, &[1, 2], 4),
            ],
            true,
        );
        assert!(
            matches!(e, Err(ActivationError::SplitBrain { epoch: 5, .. })),
            "{e:?}"
        );
    }

    /// (R) A partition: the old owner (generation 3) lost both remotes and faulted
    /// them one by one, counting epochs up to 6 on its local replica alone, while a
    /// new owner (generation 4) took the remotes over from epoch 4 and wrote epoch
    /// 5. By epochs alone the old owner's local replica wins and the new owner's
    /// acknowledged writes would be rebuilt away; by (generation, epoch) the newer
    /// generation's history is the truth, and the start is a takeover.
    #[test]
    fn after_a_partition_the_newer_generation_wins_not_the_higher_epoch() {
        let w = World::new();
        let rec = w.record(6, &[0], 3);
        let seen = || {
            vec![
                w.label(0, 6, &[0], 3),
                w.label(1, 5, &[1, 2], 4),
                w.label(2, 5, &[1, 2], 4),
            ]
        };
        // Both sides acknowledged writes after the fork: split brain, whoever starts.
        let d = run(Some(&rec), seen(), true);
        assert!(
            matches!(&d, Err(ActivationError::SplitBrain { epoch: 6, a, .. }) if a == "r0"),
            "{d:?}"
        );
        let rec4 = w.record(5, &[1, 2], 4);
        let d = run(Some(&rec4), seen(), true);
        assert!(
            matches!(d, Err(ActivationError::SplitBrain { .. })),
            "{d:?}"
        );
        // The new owner moved on past the old one's epochs: its history is the
        // truth, never the old owner's local replica; the old owner's start is a
        // takeover (which the daemon refuses unless the operator forces it).
        let seen = || {
            vec![
                w.label(0, 5, &[0], 3),
                w.label(1, 7, &[1, 2], 4),
                w.label(2, 7, &[1, 2], 4),
            ]
        };
        let rec = w.record(5, &[0], 3);
        let d = run(Some(&rec), seen(), true);
        assert_eq!(outcome(d.clone()), "missed-generation online online");
        let Ok(Decision::Go(p)) = d else {
            unreachable!()
        };
        assert_eq!(p.takeover, Some(Generation(4)));
        assert_eq!(
            (p.generation, p.membership.epoch),
            (Generation(5), Epoch(8))
        );
        let rec4 = w.record(7, &[1, 2], 4);
        let d = run(Some(&rec4), seen(), true);
        assert_eq!(outcome(d), "faulted(recorded) online online");
        // Two histories at the same (generation, epoch) that differ: split brain.
        let d = run(
            Some(&w.record(5, &[1, 2], 4)),
            vec![
                w.label(0, 5, &[0], 4),
                w.label(1, 5, &[1, 2], 4),
                w.label(2, 5, &[1, 2], 4),
            ],
            true,
        );
        assert!(matches!(
            d,
            Err(ActivationError::SplitBrain { epoch: 5, .. })
        ));
    }

    #[test]
    fn generation_and_takeover() {
        let w = World::new();
        let all = [0, 1, 2];
        let rec = w.record(4, &all, 3);
        let go = |d: Result<Decision, ActivationError>| match d.unwrap() {
            Decision::Go(p) => p,
            other => panic!("{other:?}"),
        };
        let p = go(run(
            Some(&rec),
            vec![
                w.label(0, 4, &all, 3),
                w.label(1, 4, &all, 3),
                w.label(2, 4, &all, 3),
            ],
            true,
        ));
        assert_eq!((p.generation, p.takeover), (Generation(4), None));
        assert_eq!(p.membership.epoch, Epoch(5));
        assert_eq!(p.membership.generation, Generation(4));
        // Another owner took generation 7 and moved the remotes on without r0.
        let p = go(run(
            Some(&rec),
            vec![
                w.label(0, 4, &all, 3),
                w.label(1, 6, &[1, 2], 7),
                w.label(2, 6, &[1, 2], 7),
            ],
            true,
        ));
        assert_eq!(
            (p.generation, p.takeover),
            (Generation(8), Some(Generation(7)))
        );
        assert_eq!(
            outcome(Ok(Decision::Go(p))),
            "missed-generation online online"
        );
        // Our generation number, but another owner's id: also a takeover.
        let Seen::Label(mut l) = w.label(1, 4, &all, 3) else {
            unreachable!()
        };
        l.owner = OwnerId(99);
        let p = go(run(
            Some(&rec),
            vec![
                w.label(0, 4, &all, 3),
                Seen::Label(l),
                w.label(2, 4, &all, 3),
            ],
            true,
        ));
        assert_eq!(p.takeover, Some(Generation(3)));
        // (T) A peer's label at the top of the number range is refused with a
        // clear error, never a panic on the next generation or epoch.
        for (generation, epoch, what) in [
            (u64::MAX, 4, "label generation"),
            (1 << 63, 4, "label generation"),
            (3, u64::MAX, "label membership epoch"),
        ] {
            let Seen::Label(mut l) = w.label(1, epoch, &all, 3) else {
                unreachable!()
            };
            l.generation = Generation(generation);
            let res = run(
                Some(&rec),
                vec![
                    w.label(0, 4, &all, 3),
                    Seen::Label(l),
                    w.label(2, 4, &all, 3),
                ],
                true,
            );
            assert!(
                matches!(&res, Err(ActivationError::Implausible { what: w, .. }) if *w == what),
                "{res:?}"
            );
        }
        let Seen::Label(near) = w.label(1, 4, &all, (1 << 63) - 2) else {
            unreachable!()
        };
        let p = go(run(
            Some(&rec),
            vec![
                w.label(0, 4, &all, 3),
                Seen::Label(near),
                w.label(2, 4, &all, 3),
            ],
            true,
        ));
        assert_eq!(p.generation, Generation((1 << 63) - 1));
    }

    #[test]
    fn a_saved_map_is_trusted_only_for_its_replica_geometry_history_and_window() {
        use crate::dirty::Grain;
        use crate::dirty_file::{DirtyHeader, LogKind, LogOrigin};
        let w = World::new();
        let now = 1_800_000_000_000u64;
        let header = |kind, age_ms: u64| DirtyHeader {
            volume: w.vu,
            replica: w.uuids[1],
            size: crate::ByteLen(SIZE),
            grain: Grain::DEFAULT,
            origin: LogOrigin {
                kind,
                since_epoch: Epoch(5),
                since_unix_ms: now - age_ms,
            },
        };
        let Seen::Label(at5) = w.label(1, 5, &[0, 1], 1) else {
            unreachable!()
        };
        let Seen::Label(at6) = w.label(1, 6, &[0, 1], 1) else {
            unreachable!()
        };
        let Seen::Label(other) = w.label(2, 5, &[0, 2], 1) else {
            unreachable!()
        };
        let min = 60_000;
        let window = std::time::Duration::from_secs(600);
        let refused = |why| Err::<(), MapRefused>(why);
        // (map kind, age, label now, size, expected)
        type Case<'a> = (LogKind, u64, Option<&'a Label>, u64, Result<(), MapRefused>);
        let cases: Vec<Case> = vec![
            (LogKind::Missed, min, Some(&at5), SIZE, Ok(())),
            (LogKind::Missed, min, None, SIZE, Ok(())),
            (
                LogKind::Missed,
                11 * min,
                Some(&at5),
                SIZE,
                refused(MapRefused::Expired {
                    age_s: 660,
                    window_s: 600,
                }),
            ),
            // A full rebuild's remainder resumes whatever its age.
            (LogKind::Rebuild, 60 * min, Some(&at5), SIZE, Ok(())),
            (
                LogKind::Missed,
                min,
                Some(&at6),
                SIZE,
                refused(MapRefused::LabelNewer {
                    label_epoch: Epoch(6),
                    since: Epoch(5),
                }),
            ),
            (
                LogKind::Missed,
                min,
                Some(&other),
                SIZE,
                refused(MapRefused::NotOurs),
            ),
            (
                LogKind::Missed,
                min,
                Some(&at5),
                2 * SIZE,
                refused(MapRefused::Geometry),
            ),
        ];
        for (i, (kind, age, label, size, want)) in cases.into_iter().enumerate() {
            let c = MapCheck {
                volume_uuid: w.vu,
                replica_uuid: w.uuids[1],
                size,
                grain: Grain::DEFAULT,
                label,
                now_unix_ms: now,
                partial_window: window,
                taken_over: None,
            };
            assert_eq!(check_saved_map(&header(kind, age), &c), want, "case {i}");
        }
        // (G) Another owner ran the volume since (a takeover, then failback): its
        // writes are in no map of ours, whatever the replica's label says.
        for kind in [LogKind::Missed, LogKind::Rebuild] {
            let c = MapCheck {
                volume_uuid: w.vu,
                replica_uuid: w.uuids[1],
                size: SIZE,
                grain: Grain::DEFAULT,
                label: Some(&at5),
                now_unix_ms: now,
                partial_window: window,
                taken_over: Some(Generation(3)),
            };
            assert_eq!(
                check_saved_map(&header(kind, min), &c),
                refused(MapRefused::OtherOwner {
                    generation: Generation(3)
                })
            );
        }
        // Another volume's map.
        let mut foreign = header(LogKind::Missed, min);
        foreign.volume = VolumeUuid::random();
        let c = MapCheck {
            volume_uuid: w.vu,
            replica_uuid: w.uuids[1],
            size: SIZE,
            grain: Grain::DEFAULT,
            label: None,
            now_unix_ms: now,
            partial_window: window,
            taken_over: None,
        };
        assert_eq!(check_saved_map(&foreign, &c), refused(MapRefused::NotOurs));
    }
}
