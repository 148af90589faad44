//! Online verify: compare every online replica region by region by checksum,
//! computed where the data is (a remote replica's server computes it: CHECKSUM,
//! docs/protocol.md §4.1), while the volume is in use.
//!
//! A region is first checksummed without holding anything, so the application is
//! not slowed; only when the replicas disagree is it checked again under the range
//! lock (no application write to it in flight then), because a write that reached
//! some replicas and not yet the others also makes them disagree. A mismatch under
//! the lock is real. With `repair`, the region is then copied, still under the
//! lock, to every replica that differs, from a replica [`repair_source`] picks:
//! one holding the checksum a majority of the compared replicas hold (so one
//! rotten replica, even the read-preferred one, is outvoted rather than copied
//! over the good ones); without a majority (two replicas, or all differ) the one
//! reads are served from first (the first online one: the local one when there
//! is one, as the host-crash resync does) — unless the operator names the source
//! ([`Repair::From`]: with two replicas that disagree only they can know which is
//! right). The report says which rule chose.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::future::join_all;
use serde::{Deserialize, Serialize};

use crate::error::ReplicationError;
use crate::health::{indices, Health};
use crate::ids::{ByteLen, ByteOffset, SlotIndex};
use crate::ranges::RangeTable;
use crate::rebuild::Progress;
use crate::replica::Replica;
use wire::SnapshotUuid;

/// A replica's CRC32C of a region: its slot, its location, the sum.
pub type Checksum = (SlotIndex, String, u32);

/// A region where the online replicas disagree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mismatch {
    pub offset: ByteOffset,
    pub len: ByteLen,
    /// Each replica's CRC32C of the region (under the range lock).
    pub checksums: Vec<(SlotIndex, String, u32)>,
    /// The replica a repair copies (copied, when `repaired`) the region from, and
    /// why that one.
    pub source: RepairSource,
    /// Rewritten from `source`.
    pub repaired: bool,
}

/// Which replica a repair takes a region from, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairSource {
    pub slot: SlotIndex,
    pub location: String,
    /// How many of the `of` compared replicas hold the source's checksum.
    pub agree: usize,
    pub of: usize,
    pub rule: SourceRule,
}

/// The rule that picked a [`RepairSource`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceRule {
    /// More than half of the compared replicas hold its checksum.
    Majority,
    /// No checksum is held by a majority: the replica reads prefer.
    ReadPreferred,
    /// The operator named it.
    Chosen,
}

/// What a verify does with a region where the replicas differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Report it only.
    No,
    /// Rewrite it from the replica [`repair_source`] picks.
    Vote,
    /// Rewrite it from this replica (it must be online).
    From(SlotIndex),
}

impl std::fmt::Display for RepairSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (loc, agree, of) = (&self.location, self.agree, self.of);
        match self.rule {
            SourceRule::Majority => write!(f, "{loc} (held by {agree} of {of} replicas)"),
            SourceRule::ReadPreferred => write!(
                f,
                "{loc} (no majority: {agree} of {of} replicas hold its data; \
                 the replica reads prefer)"
            ),
            SourceRule::Chosen => write!(
                f,
                "{loc} (chosen by the operator; {agree} of {of} replicas hold its data)"
            ),
        }
    }
}

/// The index in `sums` (in read-preference order) of the replica to repair a
/// region from: the first holding the checksum more than half of them hold, else
/// the first (the read-preferred one). Pure: the rule is table-tested.
pub fn repair_source(sums: &[u32]) -> (usize, usize, SourceRule) {
    let agree = |c: u32| sums.iter().filter(|&&x| x == c).count();
    match sums.iter().position(|&c| 2 * agree(c) > sums.len()) {
        Some(i) => (i, agree(sums[i]), SourceRule::Majority),
        None => (
            0,
            sums.first().map_or(0, |&c| agree(c)),
            SourceRule::ReadPreferred,
        ),
    }
}

/// What a verify found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Bytes compared (the volume, unless it stopped early).
    pub bytes: u64,
    /// Regions checksummed again under the range lock (a write was in flight, or a
    /// real mismatch).
    pub rechecked: u64,
    /// The online replicas compared, by location.
    pub replicas: Vec<String>,
    pub mismatches: Vec<Mismatch>,
    /// Every snapshot, compared on the replicas holding it.
    #[serde(default)]
    pub snapshots: Vec<SnapshotCheck>,
}

/// One snapshot's verify: snapshots are immutable, so no lock and no recheck; a
/// difference is real. It is not repaired here (a layer is not rewritten in
/// place): a full rebuild of the replica that is wrong recreates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCheck {
    pub uuid: SnapshotUuid,
    pub name: String,
    pub bytes: u64,
    /// Online replicas that lack it although others hold it.
    pub missing: Vec<String>,
    /// Regions where its holders differ, each holder's checksum.
    pub mismatches: Vec<(ByteOffset, ByteLen, Vec<Checksum>)>,
}

impl Report {
    /// Every region matched (or was repaired), and every snapshot.
    pub fn clean(&self) -> bool {
        self.mismatches.iter().all(|m| m.repaired)
            && self
                .snapshots
                .iter()
                .all(|s| s.missing.is_empty() && s.mismatches.is_empty())
    }
}

/// Verify every region of `region` bytes of `health`'s online replicas (at least
/// two, else there is nothing to compare); see the module docs.
pub fn verify(
    health: &Arc<Health>,
    ranges: &RangeTable,
    region: ByteLen,
    repair: Repair,
    progress: &Progress,
) -> Result<Report, ReplicationError> {
    let slots: Vec<SlotIndex> = indices(health.read_mask()).collect();
    if slots.len() < 2 {
        return Err(ReplicationError::NothingToVerify(slots.len()));
    }
    if let Repair::From(s) = repair {
        if !slots.contains(&s) {
            return Err(ReplicationError::NotOnline(s));
        }
    }
    let mut handles: Vec<(SlotIndex, String, Box<dyn Replica>)> = Vec::new();
    for &s in &slots {
        let b = health.backing(s).ok_or(ReplicationError::NoSuchSlot(s))?;
        let h = b.thread_handle()?;
        handles.push((s, h.location().to_string(), h));
    }
    let size = health.size().0;
    let mut report = Report {
        replicas: handles.iter().map(|(_, l, _)| l.clone()).collect(),
        ..Report::default()
    };
    progress.total.store(size, Ordering::Release);
    progress.done.store(0, Ordering::Release);
    let mut at = 0;
    while at < size {
        if progress.cancel.load(Ordering::Acquire) {
            break;
        }
        let len = region.0.min(size - at);
        let (offset, rlen) = (ByteOffset(at), ByteLen(len));
        // A replica that left the read set meanwhile is no longer compared.
        let current = online_now(health, &handles)?;
        let sums = checksums(&current, None, offset, rlen)?;
        if sums.iter().any(|(_, _, c)| *c != sums[0].2) {
            report.rechecked += 1;
            if let Some(m) = locked_region(health, ranges, &handles, repair, offset, rlen)? {
                report.mismatches.push(m);
            }
        }
        at += len;
        report.bytes = at;
        progress.done.store(at, Ordering::Release);
    }
    if !progress.cancel.load(Ordering::Acquire) {
        report.snapshots = verify_snapshots(health, &handles, region, progress)?;
    }
    Ok(report)
}

/// Compare every snapshot the online replicas hold, region by region, on the
/// replicas holding it (see [`SnapshotCheck`]).
fn verify_snapshots(
    health: &Health,
    handles: &[Handle],
    region: ByteLen,
    progress: &Progress,
) -> Result<Vec<SnapshotCheck>, ReplicationError> {
    let list: Vec<_> = match crate::snapshots::list(health) {
        Ok(l) => l.into_iter().filter(|s| !s.deleting).collect(),
        // A replica server from before snapshots: the volume has none.
        Err(ReplicationError::SnapshotRefused(_)) => Vec::new(),
        Err(e) => return Err(e),
    };
    let size = health.size().0;
    progress
        .total
        .fetch_add(size * list.len() as u64, Ordering::AcqRel);
    let mut out = Vec::new();
    for snap in list {
        let holders: Vec<&Handle> = handles
            .iter()
            .filter(|(_, loc, _)| snap.on.contains(loc))
            .collect();
        let mut check = SnapshotCheck {
            uuid: snap.uuid,
            name: snap.name.clone(),
            bytes: 0,
            missing: snap.missing.clone(),
            mismatches: Vec::new(),
        };
        let mut at = 0;
        while at < size && holders.len() > 1 {
            if progress.cancel.load(Ordering::Acquire) {
                break;
            }
            let len = region.0.min(size - at);
            let sums = checksums(&holders, Some(snap.uuid), ByteOffset(at), ByteLen(len))?;
            if sums.iter().any(|(_, _, c)| *c != sums[0].2) {
                tracing::warn!(volume = health.volume(), snapshot = %snap.name, offset = at, len,
                    checksums = ?sums, "a snapshot differs between replicas");
                check.mismatches.push((ByteOffset(at), ByteLen(len), sums));
            }
            at += len;
            check.bytes = at;
            progress.done.fetch_add(len, Ordering::AcqRel);
        }
        out.push(check);
    }
    Ok(out)
}

type Handle = (SlotIndex, String, Box<dyn Replica>);

/// The handles of the replicas online now: at least two, else nothing to compare.
fn online_now<'a>(
    health: &Health,
    handles: &'a [Handle],
) -> Result<Vec<&'a Handle>, ReplicationError> {
    let live = health.read_mask();
    let current: Vec<&Handle> = handles
        .iter()
        .filter(|(s, _, _)| live & (1 << s.get()) != 0)
        .collect();
    match current.len() {
        n if n < 2 => Err(ReplicationError::NothingToVerify(n)),
        _ => Ok(current),
    }
}

/// A region whose replicas differed, compared again under its range lock (and
/// repaired): the mismatch, if it is real. The replicas compared, and the source,
/// are those online *under the lock*, checked again once they answered: one
/// faulted meanwhile (for a write elsewhere, while it still reads) may lack a write
/// acknowledged to this region before the lock was taken, and must neither be
/// outvoted nor copied from. A replica leaving while the region is compared
/// starts the region over (each time one fewer, so this ends).
fn locked_region(
    health: &Health,
    ranges: &RangeTable,
    handles: &[Handle],
    repair: Repair,
    offset: ByteOffset,
    rlen: ByteLen,
) -> Result<Option<Mismatch>, ReplicationError> {
    loop {
        let _lock = futures::executor::block_on(ranges.lock(offset.0, rlen.0, &None));
        let current = online_now(health, handles)?;
        let mask = current.iter().fold(0u64, |m, (s, _, _)| m | 1 << s.get());
        let still = || health.read_mask() & mask == mask;
        let sums = checksums(&current, None, offset, rlen)?;
        if !still() {
            continue;
        }
        if sums.iter().all(|(_, _, c)| *c == sums[0].2) {
            return Ok(None);
        }
        let plain: Vec<u32> = sums.iter().map(|(_, _, c)| *c).collect();
        let (i, agree, rule) = match repair {
            Repair::From(s) => {
                // It may have left the read set since the start.
                let i = sums
                    .iter()
                    .position(|(x, _, _)| *x == s)
                    .ok_or(ReplicationError::NotOnline(s))?;
                let agree = plain.iter().filter(|&&c| c == plain[i]).count();
                (i, agree, SourceRule::Chosen)
            }
            Repair::No | Repair::Vote => repair_source(&plain),
        };
        let source = RepairSource {
            slot: sums[i].0,
            location: sums[i].1.clone(),
            agree,
            of: sums.len(),
            rule,
        };
        let repaired = match repair {
            Repair::No => false,
            _ => match rewrite(&current, &sums, i, offset, rlen, &still)? {
                Rewrite::Done => {
                    // Replicas that were not compared (rebuilding, faulted)
                    // lack the region as it is now.
                    health.mark_missed(mask, offset, rlen);
                    true
                }
                Rewrite::SourceLeft => continue,
            },
        };
        tracing::warn!(volume = health.volume(), offset = offset.0, len = rlen.0, repaired,
            checksums = ?sums, source = %source, "replicas differ");
        return Ok(Some(Mismatch {
            offset,
            len: rlen,
            checksums: sums,
            source,
            repaired,
        }));
    }
}

enum Rewrite {
    Done,
    /// A compared replica left the read set while the source was read.
    SourceLeft,
}

/// Each replica's checksum of the region of snapshot `of` (`None`: the head).
fn checksums(
    replicas: &[&Handle],
    of: Option<SnapshotUuid>,
    offset: ByteOffset,
    len: ByteLen,
) -> Result<Vec<(SlotIndex, String, u32)>, ReplicationError> {
    let mut outs = vec![[0u8; 4]; replicas.len()];
    let results = futures::executor::block_on(join_all(replicas.iter().zip(outs.iter_mut()).map(
        |((_, _, r), out)| match of {
            Some(u) => r.checksum_snapshot(u, offset, len, out),
            None => r.checksum(offset, len, out),
        },
    )));
    replicas
        .iter()
        .zip(results)
        .zip(outs)
        .map(|(((s, loc, _), res), out)| match res {
            Ok(()) => Ok((*s, loc.clone(), u32::from_le_bytes(out))),
            Err(e) => Err(ReplicationError::VerifyIo {
                replica: loc.clone(),
                offset: offset.0,
                errno: e,
            }),
        })
        .collect()
}

/// Copy the region from replica `from` to those whose checksum differs from its,
/// if every compared replica is `still` online once the source was read.
fn rewrite(
    replicas: &[&Handle],
    sums: &[(SlotIndex, String, u32)],
    from: usize,
    offset: ByteOffset,
    len: ByteLen,
    still: &dyn Fn() -> bool,
) -> Result<Rewrite, ReplicationError> {
    let mut buf = vec![0u8; len.0 as usize];
    let err = |loc: &str, e| ReplicationError::VerifyIo {
        replica: loc.to_string(),
        offset: offset.0,
        errno: e,
    };
    let (_, src_loc, src) = replicas[from];
    futures::executor::block_on(src.read(offset, &mut buf)).map_err(|e| err(src_loc, e))?;
    if !still() {
        return Ok(Rewrite::SourceLeft);
    }
    for ((_, loc, r), (_, _, c)) in replicas.iter().zip(sums) {
        if *c != sums[from].2 {
            futures::executor::block_on(r.write(offset, &buf, true)).map_err(|e| err(loc, e))?;
        }
    }
    Ok(Rewrite::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mem_volume, test_nexus, write_through, MemStore};

    /// `n` in-memory replicas whose first MiB holds 5s.
    fn filled(n: usize) -> (Vec<Arc<MemStore>>, Arc<Health>, Arc<RangeTable>) {
        let (stores, h) = mem_volume(n);
        let ranges = RangeTable::new();
        write_through(&test_nexus(&h, ranges.clone()), 0, 1 << 20, 5).unwrap();
        (stores, h, ranges)
    }

    /// (C) While the region is compared, replica 0 is faulted (a write error; it
    /// still reads) and a write to the region is acknowledged on replica 1 only.
    /// With two replicas there is no majority: the repair must not copy the faulted
    /// one's stale data over the only copy of that write.
    #[test]
    fn a_replica_faulted_during_the_region_is_neither_compared_nor_copied_from() {
        let (stores, h, ranges) = filled(2);
        let (h2, r2, s0) = (h.clone(), ranges.clone(), stores[0].clone());
        stores[0].on_read_at(256 << 10, move || {
            s0.set_fault(crate::testing::Fault::Writes);
            std::thread::spawn(move || write_through(&test_nexus(&h2, r2), 260 << 10, 4096, 8))
                .join()
                .unwrap()
                .unwrap();
        });
        let p = Progress::default();
        let r = verify(&h, &ranges, ByteLen(64 << 10), Repair::Vote, &p);
        assert!(
            matches!(r, Err(ReplicationError::NothingToVerify(1))),
            "{r:?}"
        );
        assert_eq!(h.read_mask(), 0b10);
        assert_eq!(stores[1].bytes(260 << 10, 4096), vec![8u8; 4096]);
    }

    /// (M) A repair changes the online replicas' data: a faulted replica's map
    /// must cover the repaired region, or its partial rebuild would skip it.
    #[test]
    fn a_repair_marks_the_map_of_a_replica_it_did_not_compare() {
        let (stores, h, ranges) = filled(3);
        stores[2].set_fault(crate::testing::Fault::All);
        write_through(&test_nexus(&h, ranges.clone()), 0, 4096, 6).unwrap();
        let map = h.dirty_map(SlotIndex(2)).expect("faulted: a map");
        assert!(!map.any(ByteOffset(512 << 10), ByteLen(64 << 10)));
        stores[1].put(520 << 10, &[3u8; 4096]);
        let p = Progress::default();
        let r = verify(
            &h,
            &ranges,
            ByteLen(64 << 10),
            Repair::From(SlotIndex(1)),
            &p,
        )
        .unwrap();
        assert!(r.clean() && r.mismatches.len() == 1, "{r:?}");
        assert_eq!(stores[0].bytes(520 << 10, 4096), vec![3u8; 4096]);
        assert!(map.any(ByteOffset(512 << 10), ByteLen(64 << 10)));
    }

    #[test]
    fn identical_replicas_verify_clean_and_a_difference_is_found_and_repaired() {
        let (stores, h, ranges) = filled(3);
        let p = Progress::default();
        let r = verify(&h, &ranges, ByteLen(64 << 10), Repair::No, &p).unwrap();
        assert!(r.clean() && r.mismatches.is_empty(), "{r:?}");
        assert_eq!((r.bytes, r.replicas.len()), (1 << 20, 3));
        // One block of replica 2 rots.
        stores[2].put(300 << 10, &[9u8; 4096]);
        let r = verify(&h, &ranges, ByteLen(64 << 10), Repair::No, &p).unwrap();
        assert!(!r.clean());
        assert_eq!(r.mismatches.len(), 1);
        let m = &r.mismatches[0];
        assert_eq!(
            (m.offset, m.len),
            (ByteOffset(256 << 10), ByteLen(64 << 10))
        );
        assert_eq!(m.checksums[0].2, m.checksums[1].2);
        assert_ne!(m.checksums[0].2, m.checksums[2].2);
        assert_ne!(stores[2].bytes(0, 1 << 20), stores[0].bytes(0, 1 << 20));
        let r = verify(&h, &ranges, ByteLen(64 << 10), Repair::Vote, &p).unwrap();
        assert!(r.clean() && r.mismatches[0].repaired, "{r:?}");
        assert_eq!(stores[2].bytes(0, 1 << 20), stores[0].bytes(0, 1 << 20));
        assert!(verify(&h, &ranges, ByteLen(64 << 10), Repair::No, &p)
            .unwrap()
            .mismatches
            .is_empty());
        // Now the read-preferred replica rots: the two that agree outvote it, and
        // the repair rewrites it rather than copying its rot over them.
        stores[0].put(700 << 10, &[7u8; 4096]);
        let r = verify(&h, &ranges, ByteLen(64 << 10), Repair::Vote, &p).unwrap();
        assert!(r.clean(), "{r:?}");
        let m = &r.mismatches[0];
        assert_eq!(m.offset, ByteOffset(640 << 10));
        assert_eq!(
            (m.source.slot, m.source.agree, m.source.of, m.source.rule),
            (SlotIndex(1), 2, 3, SourceRule::Majority)
        );
        for s in &stores {
            assert_eq!(s.bytes(0, 1 << 20), vec![5u8; 1 << 20]);
        }
    }

    #[test]
    fn an_operator_names_the_source_when_two_replicas_disagree() {
        let (stores, h, ranges) = filled(2);
        // The read-preferred replica rots: with two there is no majority.
        stores[0].put(0, &[7u8; 4096]);
        let p = Progress::default();
        let r = verify(&h, &ranges, ByteLen(64 << 10), Repair::No, &p).unwrap();
        let src = &r.mismatches[0].source;
        assert_eq!(
            (src.slot, src.rule),
            (SlotIndex(0), SourceRule::ReadPreferred)
        );
        // A replica that is not online cannot be the source; nothing is written.
        let e = verify(
            &h,
            &ranges,
            ByteLen(64 << 10),
            Repair::From(SlotIndex(5)),
            &p,
        );
        assert!(
            matches!(e, Err(ReplicationError::NotOnline(SlotIndex(5)))),
            "{e:?}"
        );
        assert_eq!(stores[1].bytes(0, 4096), vec![5u8; 4096]);
        // The operator knows replica 1 is right.
        let r = verify(
            &h,
            &ranges,
            ByteLen(64 << 10),
            Repair::From(SlotIndex(1)),
            &p,
        )
        .unwrap();
        let src = &r.mismatches[0].source;
        assert!(r.clean(), "{r:?}");
        assert_eq!((src.slot, src.rule), (SlotIndex(1), SourceRule::Chosen));
        for s in &stores {
            assert_eq!(s.bytes(0, 1 << 20), vec![5u8; 1 << 20]);
        }
    }

    #[test]
    fn the_repair_source_is_the_majority_else_the_read_preferred_replica() {
        use SourceRule::*;
        // (checksums in read-preference order, (index, agree, rule))
        type Pick = (usize, usize, SourceRule);
        let table: &[(&[u32], Pick)] = &[
            (&[1, 1, 2], (0, 2, Majority)),
            (&[2, 1, 1], (1, 2, Majority)),
            (&[1, 2, 1], (0, 2, Majority)),
            (&[1, 2], (0, 1, ReadPreferred)),
            (&[1, 2, 3], (0, 1, ReadPreferred)),
            (&[1, 1, 2, 2], (0, 2, ReadPreferred)),
            (&[3, 1, 1, 1], (1, 3, Majority)),
            (&[4, 5, 5, 6, 5], (1, 3, Majority)),
        ];
        for (sums, want) in table {
            assert_eq!(repair_source(sums), *want, "{sums:?}");
        }
    }

    #[test]
    fn every_snapshot_is_compared_and_a_rotten_or_missing_one_reported() {
        use wire::control::SnapshotAction;
        let (stores, h, ranges) = filled(3);
        let (a, b) = (SnapshotUuid([1; 16]), SnapshotUuid([2; 16]));
        crate::snapshots::create(&h, &ranges, a, "a", 1).unwrap();
        let n = crate::testing::test_nexus(&h, ranges.clone());
        crate::testing::write_through(&n, 0, 8192, 0x55).unwrap();
        crate::snapshots::create(&h, &ranges, b, "b", 2).unwrap();
        let run = || {
            verify(
                &h,
                &ranges,
                ByteLen(64 << 10),
                Repair::No,
                &Progress::default(),
            )
        };
        let r = run().unwrap();
        assert!(r.clean(), "{r:?}");
        assert_eq!(r.snapshots.len(), 2);
        assert!(r.snapshots.iter().all(|s| s.bytes == h.size().0));
        // Rot in one replica's copy of `a`, and `b` gone from another.
        stores[2].snapshot_put(a, 70 << 10, &[9; 512]);
        stores[1]
            .snapshot_action(&SnapshotAction::Delete { uuid: b })
            .unwrap();
        let r = run().unwrap();
        assert!(!r.clean());
        assert!(r.mismatches.is_empty(), "the heads agree");
        let sa = r.snapshots.iter().find(|s| s.name == "a").unwrap();
        assert_eq!(sa.mismatches.len(), 1);
        assert_eq!(sa.mismatches[0].0, ByteOffset(64 << 10));
        let sb = r.snapshots.iter().find(|s| s.name == "b").unwrap();
        assert_eq!(sb.missing.len(), 1, "{sb:?}");
        assert!(sb.mismatches.is_empty());
    }

    #[test]
    fn one_online_replica_has_nothing_to_compare_with() {
        let (_stores, h) = mem_volume(1);
        let e = verify(
            &h,
            &RangeTable::new(),
            ByteLen(1 << 20),
            Repair::No,
            &Progress::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("1 online replica"), "{e}");
    }
}
