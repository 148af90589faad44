//! Volume snapshots, owner side: one ordered barrier across the replicas.
//!
//! **Create.** Take the whole volume in the range table: that waits until every
//! earlier mutation has completed on every replica and holds every later one
//! (the drain DRBD's `suspend-io` lacks). Then CREATE on every replica; if one
//! fails, UNDO where this call took it (the heads above are provably empty: the
//! range is still held), and report the failure: no partial snapshot. Release.
//! Reads and flushes go on meanwhile; the pause writes see is the drain plus one
//! metadata commit per replica.
//!
//! A snapshot needs every replica online: one out (faulted, rebuilding) would
//! come back without it, since rebuilds do not carry snapshots yet.
//!
//! **Revert** runs under the same barrier and needs the volume unused (the
//! daemon checks that no one has the device open); **delete** hides the snapshot
//! at once and each replica merges its space back in the background.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use wire::control::{SnapshotAction, SnapshotEntry};
use wire::SnapshotUuid;

use crate::backing::Backing;
use crate::error::ReplicationError;
use crate::health::{indices, Health};
use crate::ids::{ByteOffset, SlotIndex};
use crate::ranges::RangeTable;
use crate::state::ReplicaState;

/// Test-only: take snapshots without the drain, so the barrier test can show it
/// catches what the drain prevents. Never set outside tests.
#[doc(hidden)]
pub static SKIP_DRAIN_FOR_TESTS: AtomicBool = AtomicBool::new(false);

/// What a create did.
#[derive(Debug, Clone, Serialize)]
pub struct Created {
    pub uuid: SnapshotUuid,
    pub name: String,
    pub created_ms: u64,
    pub replicas: usize,
    /// How long writes were held (drain + the replicas' commits).
    pub paused_us: u64,
    /// The snapshot existed already on every replica (a retried create).
    pub already: bool,
}

/// A snapshot of the volume, as the replicas hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeSnapshot {
    pub uuid: SnapshotUuid,
    pub name: String,
    pub created_ms: u64,
    /// The largest of the replicas' figures (they differ when their histories do).
    pub owned_bytes: u64,
    pub reclaimable_bytes: u64,
    pub deleting: bool,
    /// Replicas (locations) that hold it, and online ones that do not.
    pub on: Vec<String>,
    pub missing: Vec<String>,
}

/// Every replica, which must be online (a revert: one out would miss it).
fn all_online(health: &Health) -> Result<Vec<(String, Backing)>, ReplicationError> {
    let snap = health.snapshot();
    if let Some(s) = snap
        .slots
        .iter()
        .find(|s| !matches!(s.state, ReplicaState::Online | ReplicaState::Removed))
    {
        return Err(ReplicationError::SnapshotRefused(format!(
            "replica {} is {}: a revert needs every replica online; try again once `ublkctl status` shows it online",
            s.location,
            s.state.name()
        )));
    }
    online(health)
}

/// The online replicas, for a create: a faulted one gets the snapshot from its
/// rebuild, but one rebuilding now would miss it (its head is half copied), and
/// one connecting may come back online without a rebuild, so those wait. The
/// caller holds the snapshot gate.
fn for_create(health: &Health) -> Result<Vec<(String, Backing)>, ReplicationError> {
    let snap = health.snapshot();
    if let Some(s) = snap.slots.iter().find(|s| {
        matches!(
            s.state,
            ReplicaState::Rebuilding { .. } | ReplicaState::Connecting
        )
    }) {
        return Err(ReplicationError::SnapshotRefused(format!(
            "replica {} is {}: a snapshot now would miss it; try again once `ublkctl status` shows it online",
            s.location,
            s.state.name()
        )));
    }
    let replicas = online(health)?;
    if replicas.is_empty() {
        return Err(ReplicationError::SnapshotRefused(
            "no replica is online".into(),
        ));
    }
    Ok(replicas)
}

fn online(health: &Health) -> Result<Vec<(String, Backing)>, ReplicationError> {
    indices(health.read_mask())
        .map(|slot| {
            let b = health
                .backing(slot)
                .ok_or(ReplicationError::NoSuchSlot(slot))?;
            Ok((b.location(), b))
        })
        .collect()
}

fn act(
    b: &Backing,
    action: &SnapshotAction,
) -> Result<wire::control::SnapshotReply, ReplicationError> {
    b.snapshot_action(action)
}

/// Take snapshot `uuid` of the running volume (see the module docs).
pub fn create(
    health: &Arc<Health>,
    ranges: &RangeTable,
    uuid: SnapshotUuid,
    name: &str,
    created_ms: u64,
) -> Result<Created, ReplicationError> {
    let _gate = health.snapshot_gate();
    let replicas = for_create(health)?;
    let guard = (!SKIP_DRAIN_FOR_TESTS.load(Ordering::SeqCst))
        .then(|| futures::executor::block_on(ranges.lock(0, health.size().0, &None)));
    let t0 = Instant::now();
    let action = SnapshotAction::Create {
        uuid,
        name: name.to_string(),
        created_ms,
    };
    let mut taken = Vec::new();
    let mut failed = None;
    for (location, b) in &replicas {
        match act(b, &action) {
            Ok(r) => taken.push((location, b, r.done)),
            Err(e) => {
                failed = Some((location.clone(), e));
                break;
            }
        }
    }
    if let Some((replica, e)) = failed {
        for (location, b, done) in taken {
            if done {
                if let Err(u) = act(b, &SnapshotAction::Undo { uuid }) {
                    tracing::error!(volume = health.volume(), replica = %location, error = %u,
                        "cannot undo a snapshot its barrier failed: the next activation undoes it");
                }
            }
        }
        drop(guard);
        return Err(ReplicationError::SnapshotFailed {
            replica,
            error: e.to_string(),
        });
    }
    let paused = t0.elapsed();
    drop(guard);
    let already = taken.iter().all(|(_, _, done)| !done);
    tracing::info!(volume = health.volume(), snapshot = %uuid, name, replicas = taken.len(),
        paused_us = paused.as_micros() as u64, "snapshot taken");
    Ok(Created {
        uuid,
        name: name.to_string(),
        created_ms,
        replicas: taken.len(),
        paused_us: paused.as_micros() as u64,
        already,
    })
}

/// The snapshots of the online replicas, oldest first.
pub fn list(health: &Health) -> Result<Vec<VolumeSnapshot>, ReplicationError> {
    let mut per_replica: Vec<(String, Vec<SnapshotEntry>)> = Vec::new();
    for slot in indices(health.read_mask()) {
        let Some(b) = health.backing(slot) else {
            continue;
        };
        per_replica.push((b.location(), act(&b, &SnapshotAction::List)?.snapshots));
    }
    Ok(merge_lists(&per_replica))
}

/// One list from the replicas' lists: which hold each snapshot, which lack it.
pub fn merge_lists(per_replica: &[(String, Vec<SnapshotEntry>)]) -> Vec<VolumeSnapshot> {
    let mut out: Vec<VolumeSnapshot> = Vec::new();
    for (location, entries) in per_replica {
        for e in entries {
            match out.iter_mut().find(|s| s.uuid == e.uuid) {
                Some(s) => {
                    s.owned_bytes = s.owned_bytes.max(e.owned_bytes);
                    s.reclaimable_bytes = s.reclaimable_bytes.max(e.reclaimable_bytes);
                    s.deleting |= e.deleting;
                    s.on.push(location.clone());
                }
                None => out.push(VolumeSnapshot {
                    uuid: e.uuid,
                    name: e.name.clone(),
                    created_ms: e.created_ms,
                    owned_bytes: e.owned_bytes,
                    reclaimable_bytes: e.reclaimable_bytes,
                    deleting: e.deleting,
                    on: vec![location.clone()],
                    missing: Vec::new(),
                }),
            }
        }
    }
    for s in &mut out {
        s.missing = per_replica
            .iter()
            .map(|(l, _)| l.clone())
            .filter(|l| !s.on.contains(l))
            .collect();
    }
    out.sort_by(|a, b| (a.created_ms, &a.name).cmp(&(b.created_ms, &b.name)));
    out
}

/// After an owner died in the barrier of snapshot `uuid` (its record says it was
/// under way): where some online replicas hold it and others lack it, it is
/// undone where it is. No write can have followed it (the barrier held them; run
/// this before the volume serves), and a replica whose head has data after it
/// refuses the undo and keeps it. Held by all, it stays (the barrier got that
/// far). Returns the replicas (locations) it was undone on.
pub fn settle_half_taken(health: &Health, uuid: SnapshotUuid) -> Vec<(String, SnapshotUuid)> {
    let mut holders = Vec::new();
    let mut lacking = 0;
    for slot in indices(health.read_mask()) {
        let Some(b) = health.backing(slot) else {
            continue;
        };
        match act(&b, &SnapshotAction::List) {
            Ok(r) if r.snapshots.iter().any(|s| s.uuid == uuid) => holders.push(b),
            Ok(_) => lacking += 1,
            // Cannot tell (a remote replica without snapshots): leave it.
            Err(_) => return Vec::new(),
        }
    }
    if lacking == 0 {
        return Vec::new();
    }
    let mut undone = Vec::new();
    for b in &holders {
        let location = b.location();
        match act(b, &SnapshotAction::Undo { uuid }) {
            Ok(r) if r.done => {
                tracing::warn!(volume = health.volume(), replica = %location, snapshot = %uuid,
                    "undid a snapshot an interrupted barrier left half taken");
                undone.push((location, uuid));
            }
            Ok(_) => {}
            Err(e) => {
                tracing::info!(volume = health.volume(), replica = %location, snapshot = %uuid,
                error = %e, "kept a snapshot other replicas lack")
            }
        }
    }
    undone
}

/// The snapshot an operator names: its name, or its uuid.
pub fn find(health: &Health, name_or_uuid: &str) -> Result<VolumeSnapshot, ReplicationError> {
    let all = list(health)?;
    let hits: Vec<_> = all
        .iter()
        .filter(|s| !s.deleting && (s.name == name_or_uuid || s.uuid.to_string() == name_or_uuid))
        .collect();
    match hits.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(ReplicationError::SnapshotRefused(format!(
            "no snapshot {name_or_uuid:?} (ublkctl snapshot list shows them)"
        ))),
        _ => Err(ReplicationError::SnapshotRefused(format!(
            "{} snapshots are named {name_or_uuid:?}: name one by its uuid",
            hits.len()
        ))),
    }
}

/// Delete snapshot `uuid` on every online or rebuilding replica (its space comes
/// back in the background); one that is out drops it at its rebuild. A replica
/// that fails keeps it; a retry finishes the job.
pub fn delete(health: &Health, uuid: SnapshotUuid) -> Result<usize, ReplicationError> {
    let mut done = 0;
    let _gate = health.snapshot_gate();
    for slot in indices(health.write_mask()) {
        let Some(b) = health.backing(slot) else {
            continue;
        };
        act(&b, &SnapshotAction::Delete { uuid })?;
        done += 1;
    }
    Ok(done)
}

/// Roll the volume back to snapshot `uuid` under the barrier; the caller made
/// sure nothing uses the device (its page cache would be stale). A replica that
/// fails is faulted: it is no longer a copy of the volume.
pub fn revert(
    health: &Arc<Health>,
    ranges: &RangeTable,
    uuid: SnapshotUuid,
) -> Result<Duration, ReplicationError> {
    let replicas = all_online(health)?;
    // Every replica must hold it, or the revert would leave them different.
    for (location, b) in &replicas {
        let has = act(b, &SnapshotAction::List)?
            .snapshots
            .iter()
            .any(|s| s.uuid == uuid && !s.deleting);
        if !has {
            return Err(ReplicationError::SnapshotRefused(format!(
                "replica {location} does not hold snapshot {uuid}: nothing was reverted"
            )));
        }
    }
    let _guard = futures::executor::block_on(ranges.lock(0, health.size().0, &None));
    let t0 = Instant::now();
    let mut failures = Vec::new();
    for slot in indices(health.read_mask()) {
        let Some(b) = health.backing(slot) else {
            continue;
        };
        if let Err(e) = act(&b, &SnapshotAction::Revert { uuid }) {
            failures.push((slot, b.location(), e.to_string()));
        }
    }
    if failures.len() == replicas.len() {
        return Err(ReplicationError::SnapshotFailed {
            replica: failures[0].1.clone(),
            error: failures[0].2.clone(),
        });
    }
    for (slot, location, error) in failures {
        tracing::error!(volume = health.volume(), replica = %location, %error, "revert failed: faulting the replica");
        let reason = crate::state::FaultReason::IoError {
            op: crate::state::IoOp::Snapshot,
            errno: libc::EIO,
        };
        // Its map must name the whole volume: the rollback changed anything.
        health.fault_missing(slot, reason, &[(ByteOffset(0), health.size())])?;
    }
    Ok(t0.elapsed())
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Exported {
    /// The replica it was read from.
    pub replica: String,
    /// Bytes read from the snapshot (its data, or what changed since the older).
    pub bytes_read: u64,
    /// Bytes the image file holds as data.
    pub bytes_written: u64,
    pub millis: u64,
}

/// Export snapshot `uuid` to `w`: all of its data, or with `since` only where it
/// differs from that older snapshot (for an image over the older one's export),
/// in whole clusters. Read from an online replica holding both, local first;
/// the snapshot does not change, so nothing is locked against the application.
/// `progress` counts the volume's bytes gone through.
pub fn export(
    health: &Health,
    uuid: SnapshotUuid,
    since: Option<SnapshotUuid>,
    w: Box<dyn snapshot::export::ImageWriter + Send>,
    progress: &crate::rebuild::Progress,
) -> Result<Exported, ReplicationError> {
    use snapshot::export::CLUSTER;
    let t0 = Instant::now();
    let all = list(health)?;
    let on = |u: SnapshotUuid| -> Vec<String> {
        all.iter()
            .find(|s| s.uuid == u && !s.deleting)
            .map(|s| s.on.clone())
            .unwrap_or_default()
    };
    let holders: Vec<String> = on(uuid)
        .into_iter()
        .filter(|l| since.is_none_or(|s| on(s).contains(l)))
        .collect();
    let online: Vec<SlotIndex> = indices(health.read_mask()).collect();
    let local = health.local_mask();
    let slot = online
        .iter()
        .copied()
        .filter(|s| {
            health
                .backing(*s)
                .is_some_and(|b| holders.contains(&b.location()))
        })
        .min_by_key(|s| local & (1 << s.get()) == 0)
        .ok_or_else(|| {
            ReplicationError::SnapshotRefused(
                "no online replica holds the snapshot (and the older one, with --since)".into(),
            )
        })?;
    let backing = health
        .backing(slot)
        .ok_or(ReplicationError::NoSuchSlot(slot))?;
    let replica = backing.location();
    let h = backing.thread_handle()?;
    let read_err = |at: u64, e: crate::error::Errno| {
        ReplicationError::Export(format!(
            "reading the snapshot from {replica} at offset {at} failed: {e}; run it again"
        ))
    };
    let size = health.size().0;
    let window = u64::from(wire::frame::MAX_EXTENTS_RANGE);
    // The image is written on a thread of its own, a chunk behind the reads: the
    // two overlap instead of taking turns.
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, crate::local::AlignedBuf, usize)>(2);
    let (back_tx, back_rx) = std::sync::mpsc::channel::<crate::local::AlignedBuf>();
    for _ in 0..3 {
        let _ = back_tx.send(crate::local::AlignedBuf::zeroed(64 * CLUSTER as usize));
    }
    let writer = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut w = w;
        for (o, buf, n) in rx {
            w.write(o, &buf.as_slice()[..n])?;
            if back_tx.send(buf).is_err() {
                break;
            }
        }
        w.finish()
    });
    let (mut read, mut at) = (0u64, 0u64);
    progress.total.store(size, Ordering::Release);
    let reading = (|| -> Result<(), ReplicationError> {
        while at < size {
            if progress.cancel.load(Ordering::Acquire) {
                return Err(ReplicationError::Export("cancelled".into()));
            }
            let len = (size - at).min(window);
            let extents = futures::executor::block_on(h.diff_extents(
                Some(uuid),
                since,
                ByteOffset(at),
                crate::ids::ByteLen(len),
            ))
            .map_err(|e| read_err(at, e))?
            .unwrap_or_else(|| vec![(ByteOffset(at), crate::ids::ByteLen(len))]);
            // Whole clusters: an image maps clusters, and the rest of a changed
            // one is the snapshot's too.
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for (o, l) in extents {
                let (a, b) = (
                    o.0 / CLUSTER * CLUSTER,
                    (o.0 + l.0).div_ceil(CLUSTER) * CLUSTER,
                );
                match runs.last_mut() {
                    Some((_, e)) if *e >= a => *e = (*e).max(b),
                    _ => runs.push((a, b)),
                }
            }
            for (a, b) in runs {
                let mut o = a;
                while o < b.min(size) {
                    // A buffer back from the writer; none: it stopped (its error
                    // is the answer).
                    let Ok(mut buf) = back_rx.recv() else {
                        return Ok(());
                    };
                    let n = (b.min(size) - o).min(buf.as_slice().len() as u64) as usize;
                    futures::executor::block_on(h.read_snapshot(
                        uuid,
                        ByteOffset(o),
                        &mut buf.as_mut_slice()[..n],
                    ))
                    .map_err(|e| read_err(o, e))?;
                    if tx.send((o, buf, n)).is_err() {
                        return Ok(());
                    }
                    read += n as u64;
                    o += n as u64;
                    progress.done.store(o, Ordering::Release);
                }
            }
            at += len;
            progress.done.store(at, Ordering::Release);
        }
        Ok(())
    })();
    drop(tx);
    let written = writer.join().expect("the image writer");
    reading?;
    let written =
        written.map_err(|e| ReplicationError::Export(format!("writing the image: {e}")))?;
    Ok(Exported {
        replica,
        bytes_read: read,
        bytes_written: written,
        millis: t0.elapsed().as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u8, name: &str, created_ms: u64) -> SnapshotEntry {
        SnapshotEntry {
            uuid: SnapshotUuid([n; 16]),
            name: name.into(),
            created_ms,
            owned_bytes: n as u64 * 100,
            reclaimable_bytes: 0,
            deleting: false,
        }
    }

    #[test]
    fn a_create_skips_a_faulted_replica_and_waits_for_one_rebuilding() {
        use crate::ids::SlotIndex;
        use crate::state::{FaultReason, RebuildKind};
        let (stores, h) = crate::testing::mem_volume(3);
        let ranges = RangeTable::new();
        let take = |n: u8| create(&h, &ranges, SnapshotUuid([n; 16]), &format!("s{n}"), 1);
        h.fault_missing(SlotIndex(2), FaultReason::ConnectionLost, &[])
            .unwrap();
        assert_eq!(take(2).unwrap().replicas, 2, "the faulted one skipped");
        h.begin_rebuild(SlotIndex(2), RebuildKind::Full).unwrap();
        let err = take(3).unwrap_err().to_string();
        assert!(err.contains("rebuilding"), "{err}");
        let held = |i: usize| {
            stores[i]
                .snapshot_action(&SnapshotAction::List)
                .unwrap()
                .snapshots
                .len()
        };
        assert_eq!((held(0), held(1), held(2)), (1, 1, 0));
    }

    #[test]
    fn lists_merge_by_uuid_and_name_the_replicas_lacking_one() {
        let lists = vec![
            (
                "a".to_string(),
                vec![entry(1, "s1", 10), entry(2, "s2", 20)],
            ),
            ("b".to_string(), vec![entry(2, "s2", 20)]),
            (
                "c".to_string(),
                vec![entry(1, "s1", 10), entry(2, "s2", 20)],
            ),
        ];
        let merged = merge_lists(&lists);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].name, "s1");
        assert_eq!(merged[0].on, ["a", "c"]);
        assert_eq!(merged[0].missing, ["b"]);
        assert_eq!(merged[1].on, ["a", "b", "c"]);
        assert!(merged[1].missing.is_empty());
    }
}
