//! Rebuild: fill a faulted replica from a healthy one while the volume runs.
//!
//! 1. [`Health::begin_rebuild`] puts the target in the write set (Rebuilding): from
//!    then on every new mutation reaches it. What it lacks is its [`DirtyMap`]:
//!    the regions mutated without it (partial) or all of them (full).
//! 2. A barrier (the whole volume taken once in the range table) waits out the
//!    mutations that started before and so skipped the target: they mark its map
//!    when they settle, before the barrier is granted.
//! 3. The copier takes each marked run (adjacent regions, up to `chunk` bytes) in
//!    the range table — so no application write to it is in flight, and none can
//!    start until the copy is written — unmarks it, reads it from an online
//!    replica and writes it to the target. A write that arrives later reaches the
//!    target itself; one spanning copied and uncopied regions is ordered against
//!    the copy by the same lock (Crucible's #893 cannot happen: there is no
//!    watermark to straddle).
//! 4. Map clean, target flushed: [`Health::end_rebuild`] makes it Online.
//!
//! A failure leaves the target Faulted with what it still lacks in its map: a
//! failed source is faulted and another one is taken; none left, or a cancel, ends
//! with [`FaultReason::RebuildStopped`]; a failed target is faulted by the write
//! that failed. The copier runs on its own thread, never on a ublk queue.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::dirty::DirtyMap;
use crate::error::{Errno, ReplicationError};
use crate::health::{indices, Health, ReadVerdict};
use crate::ids::{ByteLen, ByteOffset, SlotIndex};
use crate::ranges::RangeTable;
use crate::replica::Replica;
use crate::state::{FaultReason, IoOp, RebuildKind, RebuildStop, ReplicaState};

mod manager;
mod resync;

pub use manager::{
    map_expired, next_rebuild, retry_delay, Candidate, Ended, HistoryEntry, Manager, ManagerConfig,
    NodeLimits, Running, Trigger, Work, DEFAULT_PARTIAL_WINDOW, HISTORY_LEN,
};
pub use resync::resync;

/// How a rebuild copies.
#[derive(Debug, Clone)]
pub struct CopyConfig {
    /// Most bytes per copy (and per range lock held against the application).
    pub chunk: ByteLen,
    /// Bytes per second at most, read before every chunk (a reload changes it).
    pub rate: Rate,
}

impl Default for CopyConfig {
    fn default() -> CopyConfig {
        CopyConfig {
            chunk: ByteLen(1 << 20),
            rate: Rate::uncapped(),
        }
    }
}

/// A rebuild rate cap in bytes per second (0: uncapped), shared and changeable.
#[derive(Debug, Clone, Default)]
pub struct Rate(Arc<AtomicU64>);

impl Rate {
    pub fn uncapped() -> Rate {
        Rate::default()
    }

    pub fn fixed(bytes_per_s: u64) -> Rate {
        Rate(Arc::new(AtomicU64::new(bytes_per_s)))
    }

    pub fn set(&self, bytes_per_s: u64) {
        self.0.store(bytes_per_s, Ordering::Release);
    }

    pub fn get(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Acquire)).filter(|r| *r > 0)
    }
}

/// A running rebuild's counters, read by status while the copier updates them.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes the target lacked when the copy started.
    pub total: AtomicU64,
    /// Bytes copied so far.
    pub done: AtomicU64,
    pub cancel: AtomicBool,
}

/// How a rebuild ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The target is online.
    Done { bytes: u64, millis: u64 },
    /// The target is faulted again, for this reason; its map keeps what it lacks.
    Stopped { bytes: u64, reason: FaultReason },
}

/// Rebuild `slot` of `health` (it must be Faulted, with a backing). Blocks until the
/// rebuild ends; an error means it could not even start (nothing changed then).
pub fn rebuild(
    health: &Arc<Health>,
    ranges: &RangeTable,
    slot: SlotIndex,
    kind: RebuildKind,
    cfg: CopyConfig,
    progress: &Progress,
) -> Result<Outcome, ReplicationError> {
    let target = health
        .backing(slot)
        .ok_or(ReplicationError::NoSuchSlot(slot))?
        .thread_handle()?;
    let map = health.begin_rebuild(slot, kind)?;
    tracing::info!(
        volume = health.volume(),
        replica = target.location(),
        ?kind,
        missing_bytes = map.dirty_bytes(),
        "rebuild started"
    );
    // Mutations in flight from before the target took writes mark its map first.
    drop(futures::executor::block_on(ranges.lock(
        0,
        health.size().0,
        &None,
    )));
    let t0 = Instant::now();
    let mut copier = Copier {
        health,
        ranges,
        slot,
        target: target.as_ref(),
        map: &map,
        buf: vec![0u8; cfg.chunk.0 as usize],
        cfg,
        progress,
        sources: Vec::new(),
        next_at: t0,
    };
    progress.total.store(map.dirty_bytes(), Ordering::Release);
    progress.done.store(0, Ordering::Release);
    let res = copier.copy_all();
    let bytes = progress.done.load(Ordering::Acquire);
    let end = match res {
        Ok(()) => match futures::executor::block_on(target.flush()) {
            Ok(()) => health.end_rebuild(slot, Ok(())).map(|()| Outcome::Done {
                bytes,
                millis: t0.elapsed().as_millis() as u64,
            }),
            Err(e) => stop(health, slot, bytes, FaultReason::of_errno(IoOp::Flush, e)),
        },
        Err(reason) => stop(health, slot, bytes, reason),
    };
    match &end {
        Ok(Outcome::Done { bytes, millis }) => {
            tracing::info!(
                volume = health.volume(),
                replica = target.location(),
                bytes,
                millis,
                "rebuild done"
            )
        }
        Ok(Outcome::Stopped { reason, .. }) => {
            tracing::warn!(volume = health.volume(), replica = target.location(), %reason, "rebuild stopped")
        }
        Err(e) => {
            tracing::error!(volume = health.volume(), replica = target.location(), error = %e, "rebuild could not end")
        }
    }
    end
}

/// Leave the target Faulted for `reason` (unless a failed write faulted it already).
fn stop(
    health: &Health,
    slot: SlotIndex,
    bytes: u64,
    reason: FaultReason,
) -> Result<Outcome, ReplicationError> {
    let state = health
        .snapshot()
        .slots
        .into_iter()
        .find(|s| s.slot == slot)
        .map(|s| s.state);
    let reason = match state {
        Some(ReplicaState::Rebuilding { .. }) => {
            health.end_rebuild(slot, Err(reason.clone()))?;
            reason
        }
        Some(ReplicaState::Faulted { reason }) => reason,
        _ => reason,
    };
    Ok(Outcome::Stopped { bytes, reason })
}

/// What a source read found.
enum Read {
    Data,
    Hole,
}

struct Copier<'a> {
    health: &'a Arc<Health>,
    ranges: &'a RangeTable,
    slot: SlotIndex,
    target: &'a dyn Replica,
    map: &'a DirtyMap,
    cfg: CopyConfig,
    progress: &'a Progress,
    /// Handles of source slots, made on first use.
    sources: Vec<(SlotIndex, Box<dyn Replica>)>,
    buf: Vec<u8>,
    /// When the next chunk may start, by the rate cap.
    next_at: Instant,
}

impl Copier<'_> {
    /// Copy until the map is clean, or the reason the rebuild stops.
    fn copy_all(&mut self) -> Result<(), FaultReason> {
        // Runs are taken afresh from the start until none is left: regions
        // re-marked by a failed copy are found again.
        while let Some((offset, len)) = self.map.runs(ByteOffset(0), self.cfg.chunk).next() {
            if self.progress.cancel.load(Ordering::Acquire) {
                return Err(FaultReason::RebuildStopped {
                    why: RebuildStop::Cancelled,
                });
            }
            self.target_ok()?;
            self.copy(offset, len)?;
            self.progress.done.fetch_add(len.0, Ordering::AcqRel);
            self.pace(len);
        }
        self.target_ok()
    }

    /// The target is still rebuilding (a failed application write faults it).
    fn target_ok(&self) -> Result<(), FaultReason> {
        match self
            .health
            .snapshot()
            .slots
            .into_iter()
            .find(|s| s.slot == self.slot)
            .map(|s| s.state)
        {
            Some(ReplicaState::Rebuilding { .. }) => Ok(()),
            Some(ReplicaState::Faulted { reason }) => Err(reason),
            _ => Err(FaultReason::Missing),
        }
    }

    fn copy(&mut self, offset: ByteOffset, len: ByteLen) -> Result<(), FaultReason> {
        let _guard = futures::executor::block_on(self.ranges.lock(offset.0, len.0, &None));
        // In the activity log like an application write: the saved map may lose
        // the bits cleared below before the copy is written, and a crash then
        // finds the region through the log's hot extents.
        let _al = futures::executor::block_on(self.health.enter_activity(offset, len, None))
            .map_err(|_| FaultReason::RebuildStopped {
                why: RebuildStop::LogFailed,
            })?;
        // Unmarked before the copy: an application write cannot come in between
        // (the range is ours), and a failure below marks it again.
        self.map.clear(offset, len);
        let n = len.0 as usize;
        let mut buf = std::mem::take(&mut self.buf);
        let res = self.read_source(offset, &mut buf[..n]).and_then(|read| {
            let write = match read {
                Read::Data => self.target.write(offset, &buf[..n], false),
                // A hole on the source: zeroed on the target (a punch), not copied.
                Read::Hole => self.target.write_zeroes(offset, len, false),
            };
            futures::executor::block_on(write).map_err(|e| self.target_failed(offset, len, e))
        });
        self.buf = buf;
        if res.is_err() {
            self.map.mark(offset, len);
        }
        res
    }

    /// Read from an online replica, failing over to another when one fails; a
    /// range the source knows to be a hole is not read.
    fn read_source(&mut self, offset: ByteOffset, buf: &mut [u8]) -> Result<Read, FaultReason> {
        loop {
            let online = self.health.read_mask() & !(1 << self.slot.get());
            // Local replicas first: no network round trip.
            let prefer = match online & self.health.local_mask() {
                0 => online,
                local => local,
            };
            let Some(src) = indices(prefer).next() else {
                return Err(FaultReason::RebuildStopped {
                    why: RebuildStop::NoSource,
                });
            };
            let handle = match self.source(src) {
                Some(h) => h,
                None => {
                    return Err(FaultReason::RebuildStopped {
                        why: RebuildStop::NoSource,
                    })
                }
            };
            if handle.is_hole(offset, ByteLen(buf.len() as u64)) == Some(true) {
                return Ok(Read::Hole);
            }
            match futures::executor::block_on(handle.read(offset, buf)) {
                Ok(()) => return Ok(Read::Data),
                Err(e) => match self.health.read_failed(src, e) {
                    ReadVerdict::Retry => continue,
                    ReadVerdict::Fail(_) => {
                        return Err(FaultReason::RebuildStopped {
                            why: RebuildStop::NoSource,
                        })
                    }
                },
            }
        }
    }

    fn source(&mut self, slot: SlotIndex) -> Option<&dyn Replica> {
        if !self.sources.iter().any(|(s, _)| *s == slot) {
            let h = self.health.backing(slot)?.thread_handle().ok()?;
            self.sources.push((slot, h));
        }
        self.sources
            .iter()
            .find(|(s, _)| *s == slot)
            .map(|(_, h)| h.as_ref())
    }

    /// A copy write to the target failed: the target is faulted (keeping its map).
    fn target_failed(&self, offset: ByteOffset, len: ByteLen, e: Errno) -> FaultReason {
        let reason = FaultReason::of_errno(IoOp::Write, e);
        self.map.mark(offset, len);
        if let Err(err) = self.health.end_rebuild(self.slot, Err(reason.clone())) {
            tracing::debug!(error = %err, "target already faulted");
        }
        reason
    }

    /// Sleep as long as the rate cap asks after copying `len` bytes (a cap
    /// changed meanwhile applies from the next chunk on; at most 1 s of credit is
    /// kept, so an idle spell does not turn into a burst).
    fn pace(&mut self, len: ByteLen) {
        let Some(rate) = self.cfg.rate.get() else {
            return;
        };
        let now = Instant::now();
        let floor = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
        self.next_at =
            self.next_at.max(floor) + Duration::from_secs_f64(len.0 as f64 / rate as f64);
        if let Some(wait) = self.next_at.checked_duration_since(now) {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::request::BlockRequest;
    use crate::testing::{fresh_mem_slot, mem_volume, test_nexus, Fault};
    use futures::executor::block_on;

    pub(crate) const K: u64 = 1024;

    pub(crate) fn write(n: &crate::Nexus, off: u64, len: u64, byte: u8) {
        let mut buf = vec![byte; len as usize];
        block_on(n.submit(
            BlockRequest::Write {
                offset: ByteOffset(off),
                len: ByteLen(len),
                fua: false,
            },
            &mut buf,
        ))
        .expect("write");
    }

    pub(crate) fn state(h: &Health, i: usize) -> ReplicaState {
        h.snapshot().slots[i].state.clone()
    }

    /// A partial rebuild of `slot` in 128 KiB copies.
    fn partial(
        h: &Arc<Health>,
        ranges: &RangeTable,
        slot: usize,
        p: &Progress,
    ) -> Result<Outcome, ReplicationError> {
        let cfg = CopyConfig {
            chunk: ByteLen(128 * K),
            rate: Rate::uncapped(),
        };
        rebuild(
            h,
            ranges,
            SlotIndex(slot as u8),
            RebuildKind::Partial,
            cfg,
            p,
        )
    }

    #[test]
    fn a_partial_rebuild_copies_exactly_the_missed_regions() {
        let (stores, h) = mem_volume(2);
        let ranges = RangeTable::new();
        let n = test_nexus(&h, ranges.clone());
        write(&n, 0, 1 << 20, 1);
        stores[1].set_fault(Fault::All);
        // Three regions of 64 KiB: one write inside region 0, one straddling 7|8.
        write(&n, 4 * K, 4 * K, 2);
        write(&n, 8 * 64 * K - 4 * K, 8 * K, 3);
        assert!(matches!(state(&h, 1), ReplicaState::Faulted { .. }));
        let map = h.dirty_map(SlotIndex(1)).expect("a faulted replica's map");
        assert_eq!(map.dirty_bytes(), 3 * 64 * K);
        stores[1].set_fault(Fault::None);
        let p = Progress::default();
        let out = partial(&h, &ranges, 1, &p).unwrap();
        assert!(
            matches!(out, Outcome::Done { bytes, .. } if bytes == 3 * 64 * K),
            "{out:?}"
        );
        assert_eq!(state(&h, 1), ReplicaState::Online);
        assert_eq!(stores[0].bytes(0, 1 << 20), stores[1].bytes(0, 1 << 20));
        // Back in the membership, so the label of both says so.
        let u1 = h.snapshot().slots[1].uuid;
        assert!(stores[0].label().unwrap().membership.members.contains(&u1));
        assert!(h.dirty_map(SlotIndex(1)).is_none());
    }

    #[test]
    fn a_full_rebuild_under_concurrent_writes_leaves_identical_replicas() {
        let (stores, h) = mem_volume(1);
        let ranges = RangeTable::new();
        let n = test_nexus(&h, ranges.clone());
        for i in 0..16 {
            write(&n, i * 64 * K, 64 * K, i as u8 + 1);
        }
        let (fresh, spec) = fresh_mem_slot(&stores[0]);
        let slot = h.add_slot(spec).unwrap();
        let stop = AtomicBool::new(false);
        std::thread::scope(|sc| {
            let writer = sc.spawn(|| {
                let n = test_nexus(&h, ranges.clone());
                let mut x = 1u64;
                let mut i = 0u64;
                while !stop.load(Ordering::Acquire) || i < 200 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    // 4-36 KiB anywhere, spanning copy chunks as they go.
                    let len = 4 * K * (1 + (x >> 60));
                    let off = ((x >> 20) % ((1 << 20) - len)) & !4095;
                    write(&n, off, len, (x >> 8) as u8);
                    i += 1;
                }
                i
            });
            let p = Progress::default();
            let cfg = CopyConfig {
                chunk: ByteLen(64 * K),
                rate: Rate::uncapped(),
            };
            let out = rebuild(&h, &ranges, slot, RebuildKind::Full, cfg, &p).unwrap();
            stop.store(true, Ordering::Release);
            assert!(
                matches!(out, Outcome::Done { bytes, .. } if bytes == 1 << 20),
                "{out:?}"
            );
            assert!(writer.join().unwrap() >= 200);
        });
        assert_eq!(state(&h, slot.get()), ReplicaState::Online);
        assert_eq!(stores[0].bytes(0, 1 << 20), fresh.bytes(0, 1 << 20));
    }

    #[test]
    fn a_failed_target_is_faulted_again_and_keeps_what_it_lacks() {
        let (stores, h) = mem_volume(2);
        let ranges = RangeTable::new();
        let n = test_nexus(&h, ranges.clone());
        stores[1].set_fault(Fault::All);
        write(&n, 0, 4 * K, 9);
        stores[1].set_fault(Fault::Writes);
        let p = Progress::default();
        let out = partial(&h, &ranges, 1, &p).unwrap();
        assert!(
            matches!(
                &out,
                Outcome::Stopped {
                    reason: FaultReason::IoError {
                        op: IoOp::Write,
                        ..
                    },
                    ..
                }
            ),
            "{out:?}"
        );
        assert!(matches!(state(&h, 1), ReplicaState::Faulted { .. }));
        assert_eq!(h.dirty_map(SlotIndex(1)).unwrap().dirty_bytes(), 64 * K);
        // Fixed, it is rebuilt from what was kept.
        stores[1].set_fault(Fault::None);
        let out = partial(&h, &ranges, 1, &p);
        assert!(matches!(out, Ok(Outcome::Done { .. })), "{out:?}");
        assert_eq!(stores[1].bytes(0, 4096), vec![9; 4096]);
    }

    #[test]
    fn a_failed_source_is_faulted_and_another_one_copies() {
        let (stores, h) = mem_volume(3);
        let ranges = RangeTable::new();
        let n = test_nexus(&h, ranges.clone());
        stores[2].set_fault(Fault::All);
        write(&n, 64 * K, 4 * K, 5);
        stores[2].set_fault(Fault::None);
        stores[0].set_fault(Fault::Reads);
        let p = Progress::default();
        let out = partial(&h, &ranges, 2, &p).unwrap();
        assert!(matches!(out, Outcome::Done { .. }), "{out:?}");
        assert!(matches!(state(&h, 0), ReplicaState::Faulted { .. }));
        assert_eq!(stores[2].bytes(64 * K as usize, 4096), vec![5; 4096]);
    }

    #[test]
    fn without_a_source_or_when_cancelled_it_stops_and_keeps_the_map() {
        let (stores, h) = mem_volume(2);
        let ranges = RangeTable::new();
        let n = test_nexus(&h, ranges.clone());
        stores[1].set_fault(Fault::All);
        write(&n, 0, 4 * K, 1);
        stores[1].set_fault(Fault::None);
        // The only source cannot read: it stays online (the last copy), the
        // rebuild stops.
        stores[0].set_fault(Fault::Reads);
        let p = Progress::default();
        let out = partial(&h, &ranges, 1, &p);
        assert_eq!(
            out.unwrap(),
            Outcome::Stopped {
                bytes: 0,
                reason: FaultReason::RebuildStopped {
                    why: RebuildStop::NoSource
                }
            }
        );
        assert_eq!(state(&h, 0), ReplicaState::Online);
        stores[0].set_fault(Fault::None);
        p.cancel.store(true, Ordering::Release);
        let out = partial(&h, &ranges, 1, &p);
        assert!(
            matches!(
                &out,
                Ok(Outcome::Stopped {
                    reason: FaultReason::RebuildStopped {
                        why: RebuildStop::Cancelled
                    },
                    ..
                })
            ),
            "{out:?}"
        );
        assert_eq!(h.dirty_map(SlotIndex(1)).unwrap().dirty_bytes(), 64 * K);
    }

    #[test]
    fn the_activity_log_and_the_dirty_map_reach_the_log_dir_and_go_when_rebuilt() {
        use crate::activity::FileAlStore;
        use crate::dirty_file::DirtyFile;
        let dir = tempfile::tempdir().unwrap();
        let (stores, h, _) = crate::testing::mem_volume_logged(2, Some(dir.path()));
        let ranges = RangeTable::new();
        let n = test_nexus(&h, ranges.clone());
        let al_on_disk = || {
            FileAlStore::open(&dir.path().join("activity.al"))
                .unwrap()
                .load()
                .unwrap()
                .map(|(_, hot)| hot)
        };
        // The write waited for a commit naming its extent.
        write(&n, 0, 4 * K, 1);
        assert_eq!(al_on_disk(), Some(vec![0]));
        stores[1].set_fault(Fault::All);
        write(&n, 512 * K, 4 * K, 2);
        let uuid = h.snapshot().slots[1].uuid;
        let path = dir.path().join(format!("{uuid}.dirty"));
        // Created before the write that faulted it was acknowledged.
        let (file, saved) = DirtyFile::load(&path).expect("a saved map");
        assert_eq!(file.header.replica, uuid);
        assert_eq!(saved.dirty_regions(), 1);
        // Later marks are saved lazily (within a persister round).
        write(&n, 128 * K, 4 * K, 3);
        let t0 = Instant::now();
        while DirtyFile::load(&path).unwrap().1.dirty_regions() < 2 {
            assert!(t0.elapsed() < Duration::from_secs(5), "never saved");
            std::thread::sleep(Duration::from_millis(20));
        }
        stores[1].set_fault(Fault::None);
        let p = Progress::default();
        assert!(matches!(
            partial(&h, &ranges, 1, &p),
            Ok(Outcome::Done { .. })
        ));
        assert!(!path.exists(), "a replica lacking nothing has no dirty log");
    }

    #[test]
    fn a_write_sent_before_the_target_joined_the_write_set_marks_its_map() {
        let (_stores, h) = mem_volume(2);
        h.set_state(
            SlotIndex(1),
            ReplicaState::Faulted {
                reason: FaultReason::ConnectionLost,
            },
        )
        .unwrap();
        // A write starts: its write set is slot 0 only.
        let attempted = h.write_mask();
        assert_eq!(attempted, 0b01);
        // The rebuild begins meanwhile (the copier's barrier then waits for it).
        let map = h.begin_rebuild(SlotIndex(1), RebuildKind::Partial).unwrap();
        assert!(map.is_clean());
        // It completes on slot 0 only: slot 1 lacks it, and its map must say so.
        let range = (ByteOffset(640 * K), ByteLen(4 * K));
        let _ = h.settle(attempted, &[], crate::state::IoOp::Write, Some(range));
        assert!(
            map.any(range.0, range.1),
            "the write slot 1 never got is lost"
        );
        // A write sent to the rebuilding target marks nothing.
        let _ = h.settle(
            0b11,
            &[],
            crate::state::IoOp::Write,
            Some((ByteOffset(0), ByteLen(4 * K))),
        );
        assert!(!map.any(ByteOffset(0), ByteLen(4 * K)));
    }

    #[test]
    fn a_partial_rebuild_needs_a_map() {
        let (_stores, h) = mem_volume(2);
        let ranges = RangeTable::new();
        h.set_state(
            SlotIndex(1),
            ReplicaState::Faulted {
                reason: FaultReason::ConnectionLost,
            },
        )
        .unwrap();
        // set_state leaves the write set too: it gets a map.
        assert!(h.dirty_map(SlotIndex(1)).is_some());
        let (_fresh, spec) = fresh_mem_slot(&_stores[0]);
        let s = h.add_slot(spec).unwrap();
        let p = Progress::default();
        assert!(matches!(
            partial(&h, &ranges, s.get(), &p),
            Err(ReplicationError::NoDirtyLog(_))
        ));
        assert!(matches!(state(&h, s.get()), ReplicaState::Faulted { .. }));
    }

    #[test]
    fn a_full_rebuild_from_a_sparse_local_source_zeroes_its_holes_on_the_target() {
        use crate::backing::Backing;
        use crate::local::{Create, LocalBacking};
        const SIZE: u64 = 8 << 20;
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| {
            Arc::new(LocalBacking::open(&dir.path().join(name), SIZE, Create::IfMissing).unwrap())
        };
        let (a, b) = (open("a.img"), open("b.img"));
        // The target is stale: garbage everywhere a hole of the source must read zero.
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.path().join("b.img"))
                .unwrap();
            f.write_all_at(&vec![0xAB; SIZE as usize], 0).unwrap();
            f.sync_all().unwrap();
        }
        let h = crate::testing::health_over(
            "sparse",
            wire::VolumeUuid::random(),
            SIZE,
            vec![
                (wire::ReplicaUuid::random(), Backing::Local(a.clone())),
                (wire::ReplicaUuid::random(), Backing::Local(b.clone())),
            ],
            Box::new(crate::testing::RecordingSink::default()),
        );
        h.set_state(
            SlotIndex(1),
            ReplicaState::Faulted {
                reason: FaultReason::NewReplica,
            },
        )
        .unwrap();
        let ranges = RangeTable::new();
        let n = test_nexus(&h, ranges.clone());
        write(&n, 3 << 20, 64 * K, 7);
        let out = rebuild(
            &h,
            &ranges,
            SlotIndex(1),
            RebuildKind::Full,
            CopyConfig::default(),
            &Progress::default(),
        )
        .unwrap();
        assert!(matches!(out, Outcome::Done { bytes: SIZE, .. }), "{out:?}");
        let data = |p: &str| {
            let mut v = std::fs::read(dir.path().join(p)).unwrap();
            v.truncate(SIZE as usize);
            v
        };
        let (da, db) = (data("a.img"), data("b.img"));
        assert_eq!(da[(3 << 20) as usize], 7);
        assert!(da == db, "the target holds the source's data and zeroes");
        // Where the filesystem reports holes, the copy skipped them: the target
        // has (about) the one written megabyte allocated, not eight.
        let handle = Backing::Local(a).thread_handle().unwrap();
        if handle.is_hole(ByteOffset(0), ByteLen(1 << 20)) == Some(true) {
            use std::os::unix::fs::MetadataExt;
            let allocated = std::fs::metadata(dir.path().join("b.img"))
                .unwrap()
                .blocks()
                * 512;
            assert!(
                allocated <= 2 << 20,
                "{allocated} bytes allocated on the target"
            );
        }
    }

    #[test]
    fn what_a_remote_replica_acked_but_did_not_flush_is_rebuilt_after_its_fault() {
        use crate::testing::mem_volume_remote;
        let (stores, h) = mem_volume_remote(2, &[1]);
        let ranges = RangeTable::new();
        let n = test_nexus(&h, ranges.clone());
        write(&n, 0, 4 * K, 1);
        futures::executor::block_on(n.submit(BlockRequest::Flush, &mut [])).unwrap();
        // Acknowledged by both, never flushed: the server may lose it.
        write(&n, 512 * K, 4 * K, 2);
        // Its host goes down: the unflushed write is gone with its cache.
        stores[1].put(512 * K as usize, &[0u8; 4096]);
        stores[1].set_fault(Fault::All);
        write(&n, 700 * K, 4 * K, 3);
        assert!(matches!(state(&h, 1), ReplicaState::Faulted { .. }));
        let map = h.dirty_map(SlotIndex(1)).unwrap();
        assert!(
            map.any(ByteOffset(512 * K), ByteLen(4 * K)),
            "the unflushed write"
        );
        assert!(
            map.any(ByteOffset(700 * K), ByteLen(4 * K)),
            "the missed write"
        );
        assert!(!map.any(ByteOffset(0), ByteLen(4 * K)), "flushed: not lost");
        stores[1].set_fault(Fault::None);
        let out = partial(&h, &ranges, 1, &Progress::default()).unwrap();
        assert!(matches!(out, Outcome::Done { .. }), "{out:?}");
        assert_eq!(stores[0].bytes(0, 1 << 20), stores[1].bytes(0, 1 << 20));
    }
}
