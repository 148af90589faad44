//! Snapshots through a rebuild: the target ends with every snapshot the volume
//! has, with the same contents, before its head is current. A snapshot is the
//! head as it was at its barrier; once the head moved on, only a source's layers
//! can give it back, so they are copied before the head.
//!
//! - **Partial** ([`carry_partial`]): the target lacks the snapshots taken while
//!   it was out, a suffix of the volume's list ([`plan_partial`]). While it is
//!   still faulted (it takes no write), each missing one in turn: the regions
//!   its dirty map marks are copied from that snapshot on a source into the
//!   target's head, then the target takes the snapshot. Outside the map nothing
//!   changed since it left, so its head then *is* that snapshot, and the next
//!   missing one needs only the source's diff from it. Snapshots
//!   deleted meanwhile are deleted on it. It joins the write set under the
//!   snapshot gate after a last look, so no snapshot is taken that it misses.
//! - **Full** ([`carry_full`]): the target joined the write set with every
//!   region marked, so it takes no application write yet (see
//!   `Health::skip_uncopied`). Its own snapshots are dropped (reset), every
//!   layer is written oldest first through the source's diff from the one
//!   before and snapshotted; the copier then copies only where the source's
//!   head differs from the newest snapshot (see `Chunks::copy_one`). Creates
//!   are refused while a replica rebuilds, so the list cannot grow meanwhile.

use std::sync::Arc;

use wire::control::{SnapshotAction, SnapshotEntry};
use wire::SnapshotUuid;

use crate::backing::Backing;
use crate::dirty::DirtyMap;
use crate::error::{Errno, ReplicationError};
use crate::health::{indices, Health};
use crate::ids::{ByteLen, ByteOffset, SlotIndex};
use crate::replica::Replica;
use crate::state::{FaultReason, RebuildKind, RebuildStop};

/// How a partial rebuild's target catches up with the volume's snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialPlan {
    /// Taken while it was out, oldest first: replayed in this order.
    pub missing: Vec<SnapshotEntry>,
    /// Deleted (or never completed) on the volume while it was out.
    pub extra: Vec<SnapshotUuid>,
}

/// Why a partial rebuild cannot carry the snapshots: it becomes a full one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NeedFull {
    /// The target lacks a snapshot older than one it holds: its head is not
    /// what the missing one grew from.
    Gap { lacks: String, holds: String },
}

impl std::fmt::Display for NeedFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NeedFull::Gap { lacks, holds } => write!(
                f,
                "it lacks snapshot {lacks} but holds the later {holds}: only a full rebuild can give it back"
            ),
        }
    }
}

/// Pure: what a returning replica holding `target`'s snapshots needs to hold the
/// volume's (`source`, oldest first; deleting ones left out by the caller).
pub fn plan_partial(
    source: &[SnapshotEntry],
    target: &[SnapshotEntry],
) -> Result<PartialPlan, NeedFull> {
    let holds = |u: SnapshotUuid| target.iter().any(|t| t.uuid == u);
    let missing: Vec<SnapshotEntry> = source.iter().filter(|s| !holds(s.uuid)).cloned().collect();
    if let Some(first) = missing.first() {
        let pos = source.iter().position(|s| s.uuid == first.uuid);
        if let Some(later) = source[pos.map_or(0, |p| p + 1)..]
            .iter()
            .find(|s| holds(s.uuid))
        {
            return Err(NeedFull::Gap {
                lacks: first.name.clone(),
                holds: later.name.clone(),
            });
        }
    }
    let extra = target
        .iter()
        .filter(|t| !source.iter().any(|s| s.uuid == t.uuid))
        .map(|t| t.uuid)
        .collect();
    Ok(PartialPlan { missing, extra })
}

/// The replica's snapshots, oldest first, without those being deleted; `None`
/// when it keeps none (a replica server from before snapshots).
fn listed(b: &Backing) -> Result<Option<Vec<SnapshotEntry>>, ReplicationError> {
    match b.snapshot_action(&SnapshotAction::List) {
        Ok(r) => Ok(Some(
            r.snapshots.into_iter().filter(|s| !s.deleting).collect(),
        )),
        Err(ReplicationError::SnapshotRefused(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A replica to copy snapshots from: online, not the target, local first.
fn source_slot(health: &Health, target: SlotIndex) -> Option<SlotIndex> {
    let online = health.read_mask() & !(1 << target.get());
    let prefer = match online & health.local_mask() {
        0 => online,
        local => local,
    };
    indices(prefer).next()
}

fn stop(errno: Errno) -> FaultReason {
    FaultReason::RebuildStopped {
        why: RebuildStop::SnapshotCopy { errno: errno.0 },
    }
}

/// Why the snapshot part of a rebuild did not finish.
pub(super) enum Carry {
    /// It stops for this reason (the target keeps what it lacks).
    Stop(FaultReason),
    /// It could not even start.
    Error(ReplicationError),
}

impl From<ReplicationError> for Carry {
    fn from(e: ReplicationError) -> Carry {
        Carry::Error(e)
    }
}

/// The source's side and the target's, for one layer's copy.
struct Sides {
    source: Box<dyn Replica>,
    source_backing: Backing,
    target_backing: Backing,
}

fn sides(health: &Health, slot: SlotIndex) -> Result<Sides, Carry> {
    let src = source_slot(health, slot).ok_or(Carry::Stop(FaultReason::RebuildStopped {
        why: RebuildStop::NoSource,
    }))?;
    let source_backing = health
        .backing(src)
        .ok_or(ReplicationError::NoSuchSlot(src))?;
    let target_backing = health
        .backing(slot)
        .ok_or(ReplicationError::NoSuchSlot(slot))?;
    Ok(Sides {
        source: source_backing.thread_handle()?,
        source_backing,
        target_backing,
    })
}

/// Take snapshot `s` on the target, its data flushed first.
fn seal(target: &dyn Replica, backing: &Backing, s: &SnapshotEntry) -> Result<(), Carry> {
    futures::executor::block_on(target.flush()).map_err(|e| Carry::Stop(stop(e)))?;
    backing
        .snapshot_action(&SnapshotAction::Create {
            uuid: s.uuid,
            name: s.name.clone(),
            created_ms: s.created_ms,
        })
        .map_err(|e| {
            tracing::warn!(error = %e, snapshot = %s.name, "the rebuild's target could not take a snapshot");
            Carry::Stop(stop(Errno::EIO))
        })?;
    Ok(())
}

/// Copy `[offset, offset + len)` of snapshot `of` on `source` to the head of
/// `target`, through `buf`.
fn copy_range(
    source: &dyn Replica,
    target: &dyn Replica,
    of: SnapshotUuid,
    offset: ByteOffset,
    len: ByteLen,
    buf: &mut [u8],
) -> Result<(), Carry> {
    let mut at = 0;
    while at < len.0 {
        let n = (len.0 - at).min(buf.len() as u64) as usize;
        let o = ByteOffset(offset.0 + at);
        futures::executor::block_on(source.read_snapshot(of, o, &mut buf[..n]))
            .map_err(|e| Carry::Stop(stop(e)))?;
        futures::executor::block_on(target.write(o, &buf[..n], false))
            .map_err(|e| Carry::Stop(FaultReason::of_errno(crate::state::IoOp::Write, e)))?;
        at += n as u64;
    }
    Ok(())
}

/// What [`carry_partial`] ended with.
pub(super) enum Partial {
    /// The target holds every snapshot and is in the write set: this is its map.
    Joined(Arc<DirtyMap>),
    /// Only a full rebuild can carry the snapshots.
    NeedFull(NeedFull),
}

/// A partial rebuild's snapshots, then its start (module docs). The target is
/// faulted throughout, so nothing else writes to it.
pub(super) fn carry_partial(
    health: &Arc<Health>,
    slot: SlotIndex,
    target: &dyn Replica,
    chunk: ByteLen,
) -> Result<Partial, Carry> {
    let mut buf = crate::local::AlignedBuf::zeroed(chunk.0 as usize);
    // A snapshot taken while this one replays is replayed on the next round; the
    // last round holds the gate through the target's start.
    for _round in 0..8 {
        let s = sides(health, slot)?;
        let source_list = listed(&s.source_backing)?.unwrap_or_default();
        let target_list = match listed(&s.target_backing)? {
            Some(l) => l,
            None if source_list.is_empty() => Vec::new(),
            None => return Err(Carry::Stop(stop(Errno(libc::EOPNOTSUPP)))),
        };
        let plan = match plan_partial(&source_list, &target_list) {
            Ok(p) => p,
            Err(why) => return Ok(Partial::NeedFull(why)),
        };
        for uuid in &plan.extra {
            s.target_backing
                .snapshot_action(&SnapshotAction::Delete { uuid: *uuid })?;
        }
        if plan.missing.is_empty() {
            let gate = health.snapshot_gate();
            // A snapshot taken since the list was read waits for another round.
            let now = listed(&s.source_backing)?.unwrap_or_default();
            if now.len() == source_list.len()
                && now.iter().zip(&source_list).all(|(a, b)| a.uuid == b.uuid)
            {
                let map = health.begin_rebuild(slot, RebuildKind::Partial)?;
                drop(gate);
                return Ok(Partial::Joined(map));
            }
            continue;
        }
        let map = health
            .dirty_map(slot)
            .ok_or_else(|| ReplicationError::NoDirtyLog(s.target_backing.location()))?;
        let mut prev: Option<SnapshotUuid> = None;
        for snap in &plan.missing {
            tracing::info!(volume = health.volume(), replica = %s.target_backing.location(),
                snapshot = %snap.name, "rebuild: replaying a snapshot taken while the replica was out");
            match prev {
                // The target's head is the previous one now: the source's diff
                // between the two is all it lacks (cheaper than the map again,
                // and no pool space for what did not change).
                Some(p) => copy_diff(health, &s, target, snap.uuid, Some(p), &mut buf)?,
                None => {
                    // Read now, after the snapshot exists: every write before it
                    // has settled and marked the map (its barrier drained them).
                    let runs: Vec<_> = map.runs(ByteOffset(0), chunk).collect();
                    for (o, l) in runs {
                        copy_range(
                            s.source.as_ref(),
                            target,
                            snap.uuid,
                            o,
                            l,
                            buf.as_mut_slice(),
                        )?;
                    }
                }
            }
            seal(target, &s.target_backing, snap)?;
            prev = Some(snap.uuid);
        }
    }
    // Snapshots keep coming faster than one replays: try again later.
    Err(Carry::Stop(stop(Errno(libc::EAGAIN))))
}

/// A full rebuild's snapshots: every layer of the volume onto the target, which
/// is rebuilding with its whole map marked (module docs). Returns the snapshot
/// its head now equals (the newest), which the copier diffs against.
pub(super) fn carry_full(
    health: &Arc<Health>,
    slot: SlotIndex,
    target: &dyn Replica,
    chunk: ByteLen,
) -> Result<Option<SnapshotUuid>, Carry> {
    let s = sides(health, slot)?;
    let list = listed(&s.source_backing)?.unwrap_or_default();
    match s.target_backing.snapshot_action(&SnapshotAction::Reset) {
        Ok(_) => {}
        // A server before snapshots holds none to drop, and can take none.
        Err(ReplicationError::SnapshotRefused(_)) if list.is_empty() => return Ok(None),
        Err(ReplicationError::SnapshotRefused(_)) => {
            return Err(Carry::Stop(stop(Errno(libc::EOPNOTSUPP))))
        }
        Err(e) => return Err(e.into()),
    }
    let mut buf = crate::local::AlignedBuf::zeroed(chunk.0 as usize);
    let mut since: Option<SnapshotUuid> = None;
    for snap in &list {
        tracing::info!(volume = health.volume(), replica = %s.target_backing.location(),
            snapshot = %snap.name, "rebuild: copying a snapshot");
        copy_diff(health, &s, target, snap.uuid, since, &mut buf)?;
        seal(target, &s.target_backing, snap)?;
        since = Some(snap.uuid);
    }
    Ok(since)
}

/// Make the target's head snapshot `of` where it may differ from `since` on the
/// source (the target's head is `since` now; `None`: the target's head is
/// anything, so what `of` lacks is zeroed).
fn copy_diff(
    health: &Health,
    s: &Sides,
    target: &dyn Replica,
    of: SnapshotUuid,
    since: Option<SnapshotUuid>,
    buf: &mut crate::local::AlignedBuf,
) -> Result<(), Carry> {
    let size = health.size().0;
    let window = u64::from(wire::frame::MAX_EXTENTS_RANGE);
    let mut at = 0;
    while at < size {
        let len = (size - at).min(window);
        let extents = futures::executor::block_on(s.source.diff_extents(
            Some(of),
            since,
            ByteOffset(at),
            ByteLen(len),
        ))
        .map_err(|e| Carry::Stop(stop(e)))?
        .unwrap_or_else(|| vec![(ByteOffset(at), ByteLen(len))]);
        let mut zero_from = at;
        for (o, l) in extents {
            if since.is_none() && o.0 > zero_from {
                zero(target, zero_from, o.0 - zero_from)?;
            }
            copy_range(s.source.as_ref(), target, of, o, l, buf.as_mut_slice())?;
            zero_from = o.0 + l.0;
        }
        if since.is_none() && at + len > zero_from {
            zero(target, zero_from, at + len - zero_from)?;
        }
        at += len;
    }
    Ok(())
}

fn zero(target: &dyn Replica, offset: u64, len: u64) -> Result<(), Carry> {
    futures::executor::block_on(target.write_zeroes(ByteOffset(offset), ByteLen(len), false))
        .map_err(|e| Carry::Stop(FaultReason::of_errno(crate::state::IoOp::WriteZeroes, e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(n: u8) -> SnapshotEntry {
        SnapshotEntry {
            uuid: SnapshotUuid([n; 16]),
            name: format!("s{n}"),
            created_ms: n as u64,
            owned_bytes: 0,
            reclaimable_bytes: 0,
            deleting: false,
        }
    }

    fn names(v: &[SnapshotEntry]) -> Vec<u8> {
        v.iter().map(|s| s.uuid.0[0]).collect()
    }

    #[test]
    fn a_returning_replica_replays_the_snapshots_it_missed_and_drops_the_deleted() {
        // (volume's, target's) -> Ok((missing, extra)) or a gap.
        type Want = Result<(&'static [u8], &'static [u8]), (u8, u8)>;
        let table: &[(&[u8], &[u8], Want)] = &[
            (&[], &[], Ok((&[], &[]))),
            (&[1, 2], &[1, 2], Ok((&[], &[]))),
            (&[1, 2, 3, 4], &[1, 2], Ok((&[3, 4], &[]))),
            (&[1, 2, 3], &[], Ok((&[1, 2, 3], &[]))),
            (&[2, 3], &[1, 2], Ok((&[3], &[1]))),
            (&[3], &[1, 2], Ok((&[3], &[1, 2]))),
            (&[], &[7], Ok((&[], &[7]))),
            (&[1, 2, 3], &[1, 3], Err((2, 3))),
            (&[1, 2, 3], &[3], Err((1, 3))),
        ];
        for (src, tgt, want) in table {
            let src: Vec<_> = src.iter().map(|&n| e(n)).collect();
            let tgt: Vec<_> = tgt.iter().map(|&n| e(n)).collect();
            let got = plan_partial(&src, &tgt);
            match (got, want) {
                (Ok(p), Ok((missing, extra))) => {
                    assert_eq!(names(&p.missing), *missing, "{src:?} {tgt:?}");
                    let extra_got: Vec<u8> = p.extra.iter().map(|u| u.0[0]).collect();
                    assert_eq!(extra_got, *extra, "{src:?} {tgt:?}");
                }
                (Err(NeedFull::Gap { lacks, holds }), Err((l, h))) => {
                    assert_eq!((lacks, holds), (format!("s{l}"), format!("s{h}")));
                }
                (got, want) => panic!("{got:?} vs {want:?}"),
            }
        }
    }
}
