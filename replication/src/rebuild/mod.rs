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

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::dirty::DirtyMap;
use crate::error::{Errno, ReplicationError};
use crate::health::{indices, Health, ReadVerdict};
use crate::ids::{ByteLen, ByteOffset, SlotIndex};
use crate::local::AlignedBuf;
use crate::ranges::RangeTable;
use crate::replica::Replica;
use crate::state::{FaultReason, IoOp, RebuildKind, RebuildStop, ReplicaState};
use wire::SnapshotUuid;

mod layers;
mod manager;
mod resync;

pub use layers::{plan_partial, NeedFull, PartialPlan};
pub use manager::{
    full_why, map_expired, next_rebuild, retry_delay, Candidate, Ended, FullWhy, HistoryEntry,
    Manager, ManagerConfig, NodeLimits, PartialWindow, Running, Trigger, Work,
    DEFAULT_PARTIAL_WINDOW, HISTORY_LEN,
};
pub use resync::resync;

/// How a rebuild copies.
#[derive(Debug, Clone)]
pub struct CopyConfig {
    /// Most bytes per copy (and per range lock held against the application).
    pub chunk: ByteLen,
    /// Bytes per second at most, read before every chunk (a reload changes it).
    pub rate: Rate,
    /// The target is flushed after this many copied bytes: what it acknowledged
    /// since its last flush counts as missing again if it fails (its host may lose
    /// its cache), so a stopped rebuild resumes from the last flush, not the start.
    pub flush_every: ByteLen,
}

/// Default of [`CopyConfig::flush_every`]: one flush per 64 MiB copied costs a
/// round trip per ~1 s of copying at the default rate.
pub const FLUSH_EVERY: ByteLen = ByteLen(64 << 20);

impl Default for CopyConfig {
    fn default() -> CopyConfig {
        CopyConfig {
            chunk: ByteLen(1 << 20),
            rate: Rate::uncapped(),
            flush_every: FLUSH_EVERY,
        }
    }
}

/// Flushes a copy's target now and then and keeps what it wrote since: a target
/// that fails before its next flush lacks those regions again (its host may lose
/// its cache), so they go back into its dirty map — and, for a remote replica,
/// into its unflushed regions, which its fault merges into the map whoever
/// faults it. A flush also makes the application's earlier writes durable there.
pub(crate) struct Durability {
    every: u64,
    since: u64,
    regions: Vec<(ByteOffset, ByteLen)>,
}

impl Durability {
    pub(crate) fn new(every: ByteLen) -> Durability {
        Durability {
            every: every.0.max(1),
            since: 0,
            regions: Vec::new(),
        }
    }

    /// The copy wrote `len` bytes at `offset` to `slot` (not FUA).
    pub(crate) fn wrote(
        &mut self,
        health: &Health,
        slot: SlotIndex,
        offset: ByteOffset,
        len: ByteLen,
    ) {
        if let Some(u) = health.unflushed(slot) {
            u.wrote(offset, len);
        }
        self.regions.push((offset, len));
        self.since += len.0;
    }

    /// Whether enough was copied since the last flush to flush again.
    pub(crate) fn due(&self) -> bool {
        self.since >= self.every
    }

    /// What was written since the last flush.
    pub(crate) fn unflushed(&self) -> &[(ByteOffset, ByteLen)] {
        &self.regions
    }

    /// Flush `target` (slot `slot`); what it acknowledged before is durable then.
    pub(crate) fn flush(
        &mut self,
        health: &Health,
        slot: SlotIndex,
        target: &dyn Replica,
    ) -> Result<(), Errno> {
        let u = health.unflushed(slot);
        let ticket = u.as_ref().map(|u| u.flush_sent());
        futures::executor::block_on(target.flush())?;
        if let (Some(u), Some(t)) = (u, ticket) {
            u.flushed(t);
        }
        self.since = 0;
        self.regions.clear();
        Ok(())
    }
}

/// How fast a rebuild may copy, shared and changeable (a reload sets it): a cap in
/// bytes per second (0: uncapped), and the share of its time a copy may take
/// while the volume serves application I/O (application first: after a round of
/// copying that took `t` while requests came in, the copier waits
/// `t * (100 / busy_percent - 1)`), so the cap needs no tuning per device.
#[derive(Debug, Clone)]
pub struct Rate(Arc<(AtomicU64, AtomicU32)>);

/// Default of the busy share: a quarter of the time, three quarters left to the
/// application (the bench's `rebuild_app_iops_ratio` target is 0.7).
pub const DEFAULT_BUSY_PERCENT: u32 = 25;

impl Default for Rate {
    fn default() -> Rate {
        Rate::fixed(0)
    }
}

impl Rate {
    /// No cap, and no yielding to the application.
    pub fn uncapped() -> Rate {
        let r = Rate::fixed(0);
        r.set_busy_percent(100);
        r
    }

    pub fn fixed(bytes_per_s: u64) -> Rate {
        Rate(Arc::new((
            AtomicU64::new(bytes_per_s),
            AtomicU32::new(DEFAULT_BUSY_PERCENT),
        )))
    }

    pub fn set(&self, bytes_per_s: u64) {
        self.0 .0.store(bytes_per_s, Ordering::Release);
    }

    pub fn get(&self) -> Option<u64> {
        Some(self.0 .0.load(Ordering::Acquire)).filter(|r| *r > 0)
    }

    /// 1..=100 (100: the copy does not yield).
    pub fn set_busy_percent(&self, percent: u32) {
        self.0 .1.store(percent.clamp(1, 100), Ordering::Release);
    }

    pub fn busy_percent(&self) -> u32 {
        self.0 .1.load(Ordering::Acquire)
    }
}

/// Paces a copy loop to a [`Rate`]: after each chunk, sleeps as long as the cap
/// asks (a cap changed meanwhile applies from the next chunk on; at most 1 s of
/// credit is kept, so an idle spell does not turn into a burst).
pub(crate) struct Pacer {
    rate: Rate,
    next_at: Instant,
}

impl Pacer {
    pub(crate) fn new(rate: Rate) -> Pacer {
        Pacer {
            rate,
            next_at: Instant::now(),
        }
    }

    /// After a round that copied `len` bytes in `took`, with application
    /// requests arriving meanwhile (`busy`) or not: sleep as long as the cap and
    /// the busy share ask.
    pub(crate) fn pace(&mut self, len: ByteLen, took: Duration, busy: bool) {
        if let Some(at) = self.delay(len, took, busy) {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
        }
    }

    /// Whether [`Pacer::pace`] may sleep after `len` more bytes: the cap is not
    /// met yet, or the application is busy and the copy yields to it.
    pub(crate) fn may_wait(&self, len: ByteLen, busy: bool) -> bool {
        let now = Instant::now();
        self.cap_until(now, len).is_some_and(|t| t > now)
            || (busy && self.rate.busy_percent() < 100)
    }

    /// Under a cap, when `len` more bytes are paid for (at most 1 s of credit).
    fn cap_until(&self, now: Instant, len: ByteLen) -> Option<Instant> {
        let rate = self.rate.get()?;
        let floor = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
        Some(self.next_at.max(floor) + Duration::from_secs_f64(len.0 as f64 / rate as f64))
    }

    /// When the copy may go on after such a round, if not now.
    fn delay(&mut self, len: ByteLen, took: Duration, busy: bool) -> Option<Instant> {
        let now = Instant::now();
        let mut until = now;
        if let Some(t) = self.cap_until(now, len) {
            self.next_at = t;
            until = until.max(t);
        }
        let share = self.rate.busy_percent();
        if busy && share < 100 {
            until = until.max(now + took.mul_f64(100.0 / share as f64 - 1.0));
        }
        (until > now).then_some(until)
    }
}

/// Thread handles of a volume's replicas, made on first use by a copy loop.
#[derive(Default)]
pub(crate) struct Handles(Vec<(SlotIndex, Box<dyn Replica>)>);

impl Handles {
    pub(crate) fn get(&mut self, health: &Health, slot: SlotIndex) -> Option<&dyn Replica> {
        if !self.0.iter().any(|(s, _)| *s == slot) {
            let h = health.backing(slot)?.thread_handle().ok()?;
            self.0.push((slot, h));
        }
        self.0
            .iter()
            .find(|(s, _)| *s == slot)
            .map(|(_, h)| h.as_ref())
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
    // A copy takes whole regions of the map: one at least, whatever the config.
    let chunk = ByteLen(cfg.chunk.0.max(u64::from(health.grain().0)));
    // Snapshots first (see `layers`): a partial target catches up on them
    // before it takes writes; a full one takes them once it joined.
    let mut kind = kind;
    let mut joined = None;
    if kind == RebuildKind::Partial {
        match layers::carry_partial(health, slot, target.as_ref(), chunk) {
            Ok(layers::Partial::Joined(map)) => joined = Some(map),
            Ok(layers::Partial::NeedFull(why)) => {
                tracing::warn!(volume = health.volume(), replica = target.location(), %why,
                    "the partial rebuild becomes a full one to carry the snapshots");
                kind = RebuildKind::Full;
            }
            Err(layers::Carry::Stop(reason)) => return Ok(Outcome::Stopped { bytes: 0, reason }),
            Err(layers::Carry::Error(e)) => return Err(e),
        }
    }
    let map = match joined {
        Some(map) => map,
        None => {
            let _gate = health.snapshot_gate();
            health.begin_rebuild(slot, kind)?
        }
    };
    let base = if kind == RebuildKind::Full {
        match layers::carry_full(health, slot, target.as_ref(), chunk) {
            Ok(base) => base,
            Err(layers::Carry::Stop(reason)) => return stop(health, slot, 0, reason),
            Err(layers::Carry::Error(e)) => {
                let reason = FaultReason::RebuildStopped {
                    why: RebuildStop::SnapshotCopy { errno: libc::EIO },
                };
                tracing::warn!(volume = health.volume(), error = %e, "the rebuild could not copy the snapshots");
                return stop(health, slot, 0, reason);
            }
        }
    } else {
        None
    };
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
        bufs: (0..DEPTH)
            .map(|_| AlignedBuf::zeroed(chunk.0 as usize))
            .collect(),
        chunk,
        pacer: Pacer::new(cfg.rate),
        durability: Durability::new(cfg.flush_every),
        progress,
        sources: Handles::default(),
        cursor: ByteOffset(0),
        pace_due: false,
        base,
    };
    progress.total.store(map.dirty_bytes(), Ordering::Release);
    progress.done.store(0, Ordering::Release);
    let res = copier.copy_all().and_then(|()| {
        copier
            .durability
            .flush(health, slot, target.as_ref())
            .map_err(|e| FaultReason::of_errno(IoOp::Flush, e))
    });
    let bytes = progress.done.load(Ordering::Acquire);
    let end = match res {
        Ok(()) => health.end_rebuild(slot, Ok(())).map(|()| Outcome::Done {
            bytes,
            millis: t0.elapsed().as_millis() as u64,
        }),
        Err(reason) => {
            // Copied but never flushed: the target may not keep it.
            for &(o, l) in copier.durability.unflushed() {
                map.mark(o, l);
            }
            stop(health, slot, bytes, reason)
        }
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

/// Chunks a rebuild keeps in flight (each with a buffer of `chunk` bytes).
pub const DEPTH: usize = 4;

/// Why one chunk's copy failed.
#[derive(Debug, Clone, Copy)]
enum Lane {
    Source(Errno),
    /// The source left the read set while the chunk was read (faulted, removed):
    /// what it returned may lack a write it skipped. Copied again from another.
    SourceLeft,
    /// The target left the write set (faulted: its connection or host went
    /// down): nothing more is copied to it, and the chunk stays marked.
    TargetLeft,
    Target(Errno),
    Log,
    NoSource,
}

/// Why a stretch of copying paused.
enum Pause {
    /// The pass reached the map's end (the next one starts over, for regions
    /// marked again meanwhile), or pacing or a flush is due.
    Pass,
    Due,
    /// A chunk failed (every other chunk in flight has finished).
    Failed(ByteOffset, ByteLen, Lane, SlotIndex),
}

struct Copier<'a> {
    health: &'a Arc<Health>,
    ranges: &'a RangeTable,
    slot: SlotIndex,
    target: &'a dyn Replica,
    map: &'a DirtyMap,
    chunk: ByteLen,
    pacer: Pacer,
    durability: Durability,
    progress: &'a Progress,
    sources: Handles,
    /// Page-aligned, so a local source reads them with O_DIRECT (a plain `Vec`
    /// would go through the page cache: a copy more and the cache churned).
    bufs: Vec<AlignedBuf>,
    /// Where the current pass over the map goes on.
    cursor: ByteOffset,
    /// The pacer may want a pause once the chunks in flight are done.
    pace_due: bool,
    /// The snapshot the target's head equals where the map marks it (a full
    /// rebuild's newest layer): only where a source's head differs is copied.
    base: Option<SnapshotUuid>,
}

/// What one chunk's copy needs: shared by the chunks in flight.
#[derive(Clone, Copy)]
struct Chunks<'a> {
    health: &'a Health,
    ranges: &'a RangeTable,
    target: &'a dyn Replica,
    /// The target's slot: it must still be in the write set.
    slot: SlotIndex,
    map: &'a DirtyMap,
    base: Option<SnapshotUuid>,
}

impl Copier<'_> {
    /// Copy until the map is clean, or the reason the rebuild stops. Up to
    /// [`DEPTH`] chunks are in flight at once, a new one started as soon as one
    /// ends, so the source's reads and the target's writes overlap instead of
    /// taking turns; pacing and flushes wait for the chunks in flight first.
    fn copy_all(&mut self) -> Result<(), FaultReason> {
        let mut window = (Instant::now(), self.health.app_requests(), 0u64);
        let mut last_src = None;
        loop {
            if self.cursor == ByteOffset(0) && self.map.is_clean() {
                return self.target_ok();
            }
            if self.progress.cancel.load(Ordering::Acquire) {
                return Err(FaultReason::RebuildStopped {
                    why: RebuildStop::Cancelled,
                });
            }
            self.target_ok()?;
            let src = self.pick_source()?;
            if last_src.is_some_and(|l| l != src) {
                // The earlier source left the read set (faulted, removed): operators
                // see why the copy now reads elsewhere.
                tracing::info!(
                    volume = self.health.volume(),
                    replica = self.target.location(),
                    source = self
                        .health
                        .backing(src)
                        .map(|b| b.location())
                        .unwrap_or_default(),
                    "rebuild source changed"
                );
            }
            last_src = Some(src);
            let pause = self.stretch(src, &mut window);
            match pause {
                Pause::Pass => self.cursor = ByteOffset(0),
                Pause::Due => {}
                Pause::Failed(o, l, Lane::Target(e), _) => return Err(self.target_failed(o, l, e)),
                Pause::Failed(.., Lane::Log, _) => {
                    return Err(FaultReason::RebuildStopped {
                        why: RebuildStop::LogFailed,
                    })
                }
                Pause::Failed(.., Lane::NoSource, _) => {
                    return Err(FaultReason::RebuildStopped {
                        why: RebuildStop::NoSource,
                    })
                }
                // Its chunk is marked again: the pass finds it when it starts over,
                // copying from another source.
                Pause::Failed(.., Lane::SourceLeft, _) => continue,
                Pause::Failed(.., Lane::TargetLeft, _) => {
                    self.target_ok()?;
                    continue;
                }
                // The source is faulted; the next stretch takes another one (its
                // chunk is marked again: the pass finds it when it starts over).
                Pause::Failed(.., Lane::Source(e), src) => match self.health.read_failed(src, e) {
                    ReadVerdict::Retry => continue,
                    ReadVerdict::Fail(_) => {
                        return Err(FaultReason::RebuildStopped {
                            why: RebuildStop::NoSource,
                        })
                    }
                },
            }
            if self.durability.due() {
                self.durability
                    .flush(self.health, self.slot, self.target)
                    .map_err(|e| FaultReason::of_errno(IoOp::Flush, e))?;
            }
            // Paced over the whole round, the chunks drained included: the time
            // the copy was active is what the busy share is a share of.
            if std::mem::take(&mut self.pace_due) {
                let (t0, requests, bytes) = window;
                let busy = self.health.app_requests() != requests;
                self.pacer.pace(ByteLen(bytes), t0.elapsed(), busy);
                window = (Instant::now(), self.health.app_requests(), 0);
            }
        }
    }

    /// Copy from `src` with up to [`DEPTH`] chunks in flight, from the cursor on,
    /// until the pass ends, a chunk fails, or a flush, the pacer or a cancel
    /// wants a pause; every chunk in flight has ended on return. `window` counts
    /// what was copied since the last pacing (its start, the application
    /// requests then, bytes): once a round of [`DEPTH`] chunks was copied, the
    /// pacer is asked whether to wait, which needs the chunks drained.
    fn stretch(&mut self, src: SlotIndex, window: &mut (Instant, u64, u64)) -> Pause {
        let chunks = Chunks {
            health: self.health,
            ranges: self.ranges,
            target: self.target,
            slot: self.slot,
            map: self.map,
            base: self.base,
        };
        let mut sources = std::mem::take(&mut self.sources);
        let Some(handle) = sources.get(self.health, src) else {
            self.sources = sources;
            return Pause::Failed(self.cursor, ByteLen(0), Lane::NoSource, src);
        };
        let mut bufs = std::mem::take(&mut self.bufs);
        let round = DEPTH as u64 * self.chunk.0;
        let mut inflight = futures::stream::FuturesUnordered::new();
        let mut pause = None;
        futures::executor::block_on(async {
            loop {
                while pause.is_none() && inflight.len() < DEPTH {
                    let Some((o, l)) = self.map.runs(self.cursor, self.chunk).next() else {
                        pause = Some(Pause::Pass);
                        break;
                    };
                    self.cursor = ByteOffset(o.0 + l.0);
                    let mut buf = bufs.pop().expect("a buffer per chunk in flight");
                    inflight.push(async move {
                        let res = chunks
                            .copy_one((src, handle), o, l, &mut buf.as_mut_slice()[..l.0 as usize])
                            .await;
                        (o, l, res, buf)
                    });
                }
                let Some((o, l, res, buf)) = inflight.next().await else {
                    break;
                };
                bufs.push(buf);
                match res {
                    Ok(()) => {
                        self.durability.wrote(self.health, self.slot, o, l);
                        self.progress.done.fetch_add(l.0, Ordering::AcqRel);
                        window.2 += l.0;
                    }
                    // The first failure wins; the cursor goes back to it.
                    Err(e) => {
                        if !matches!(pause, Some(Pause::Failed(..))) {
                            pause = Some(Pause::Failed(o, l, e, src));
                        }
                    }
                }
                if pause.is_none() && window.2 >= round {
                    let busy = self.health.app_requests() != window.1;
                    if self.pacer.may_wait(ByteLen(window.2), busy) {
                        self.pace_due = true;
                    } else {
                        // Nothing to wait for: the pipeline stays full.
                        self.pacer
                            .pace(ByteLen(window.2), window.0.elapsed(), false);
                        *window = (Instant::now(), self.health.app_requests(), 0);
                    }
                }
                if pause.is_none()
                    && (self.durability.due()
                        || self.pace_due
                        || self.progress.cancel.load(Ordering::Acquire))
                {
                    pause = Some(Pause::Due);
                }
            }
        });
        drop(inflight);
        (self.sources, self.bufs) = (sources, bufs);
        if let Some(Pause::Failed(o, ..)) = &pause {
            self.cursor = self.cursor.min(*o);
        }
        pause.unwrap_or(Pause::Pass)
    }

    /// An online replica to copy from, local ones first (no network round trip) —
    /// unless reads are pinned to the first online replica (an unclean shutdown
    /// whose resync has not finished: the replicas may differ where writes were in
    /// flight, and that one is what reads see): then from it.
    fn pick_source(&self) -> Result<SlotIndex, FaultReason> {
        let online = self.health.read_mask() & !(1 << self.slot.get());
        let pinned = self.health.read_policy() == crate::health::ReadPolicy::Primary;
        let prefer = match online & self.health.local_mask() {
            _ if pinned => online & online.wrapping_neg(),
            0 => online,
            local => local,
        };
        indices(prefer).next().ok_or(FaultReason::RebuildStopped {
            why: RebuildStop::NoSource,
        })
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

    /// A copy write to the target failed: the target is faulted (keeping its map).
    fn target_failed(&self, offset: ByteOffset, len: ByteLen, e: Errno) -> FaultReason {
        let reason = FaultReason::of_errno(IoOp::Write, e);
        self.map.mark(offset, len);
        if let Err(err) = self.health.end_rebuild(self.slot, Err(reason.clone())) {
            tracing::debug!(error = %err, "target already faulted");
        }
        reason
    }
}

impl Chunks<'_> {
    /// Copy one chunk from `source`, holding its range against the application;
    /// a failure leaves it marked in the map again. A range the source knows to
    /// be a hole is zeroed on the target (a punch), not read and copied.
    async fn copy_one(
        &self,
        (src, source): (SlotIndex, &dyn Replica),
        offset: ByteOffset,
        len: ByteLen,
        buf: &mut [u8],
    ) -> Result<(), Lane> {
        // Checked after the source answered, under the range lock: a source still
        // online then held every write to the range acknowledged so far (a later
        // one waits for the lock). One faulted meanwhile — for a write error, while
        // it still reads — or removed by a reload may lack a write it skipped.
        let still_source = || {
            if self.health.read_mask() & (1 << src.get()) == 0 {
                Err(Lane::SourceLeft)
            } else {
                Ok(())
            }
        };
        let _guard = self.ranges.lock(offset.0, len.0, &None).await;
        // In the activity log like an application write: the saved map may lose
        // the bits cleared below before the copy is written, and a crash then
        // finds the region through the log's hot extents.
        let _al = self
            .health
            .enter_activity(offset, len, None)
            .await
            .map_err(|_| Lane::Log)?;
        // A target faulted meanwhile (its host went down, then came back) is
        // copied to no more: what it took after its fault would be in no map, and
        // gone with its cache at its next crash. Checked before the map is cleared
        // and again once it acknowledged the chunk.
        let target_in = || self.health.write_mask() & (1 << self.slot.get()) != 0;
        if !target_in() {
            return Err(Lane::TargetLeft);
        }
        // Unmarked before the copy: an application write cannot come in between
        // (the range is ours), and a failure below marks it again.
        self.map.clear(offset, len);
        let res = async {
            if let Some(base) = self.base {
                // Asked under the range lock, like the holes below. A source
                // without the snapshot cannot tell: the whole chunk is copied.
                if let Ok(Some(changed)) = source.diff_extents(None, Some(base), offset, len).await
                {
                    for &(o, l) in &changed {
                        let at = (o.0 - offset.0) as usize;
                        let part = &mut buf[at..at + l.0 as usize];
                        source.read(o, part).await.map_err(Lane::Source)?;
                    }
                    still_source()?;
                    for &(o, l) in &changed {
                        let at = (o.0 - offset.0) as usize;
                        self.target
                            .write(o, &buf[at..at + l.0 as usize], false)
                            .await
                            .map_err(Lane::Target)?;
                    }
                    return Ok(());
                }
            }
            // Asked under the range lock: no write can land in the hole meanwhile.
            if matches!(source.data_extents(offset, len).await, Ok(Some(e)) if e.is_empty()) {
                still_source()?;
                return self
                    .target
                    .write_zeroes(offset, len, false)
                    .await
                    .map_err(Lane::Target);
            }
            source.read(offset, buf).await.map_err(Lane::Source)?;
            still_source()?;
            self.target
                .write(offset, buf, false)
                .await
                .map_err(Lane::Target)
        }
        .await;
        let res = res.and_then(|()| match target_in() {
            true => Ok(()),
            false => Err(Lane::TargetLeft),
        });
        if res.is_err() {
            self.map.mark(offset, len);
        }
        res
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
        crate::testing::write_through(n, off, len, byte).expect("write");
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
            ..CopyConfig::default()
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
                ..CopyConfig::default()
            };
            let out = rebuild(&h, &ranges, slot, RebuildKind::Full, cfg, &p).unwrap();
            stop.store(true, Ordering::Release);
            // Every region at least once; a write straddling the copied and the
            // uncopied part skipped the target and had its copied part copied again.
            assert!(
                matches!(out, Outcome::Done { bytes, .. } if bytes >= 1 << 20),
                "{out:?}"
            );
            assert!(writer.join().unwrap() >= 200);
        });
        assert_eq!(state(&h, slot.get()), ReplicaState::Online);
        assert_eq!(stores[0].bytes(0, 1 << 20), fresh.bytes(0, 1 << 20));
    }

    #[test]
    fn a_rebuilding_target_takes_writes_only_where_it_is_already_whole() {
        let (stores, h) = mem_volume(1);
        let ranges = RangeTable::new();
        let n = test_nexus(&h, ranges.clone());
        let (fresh, spec) = fresh_mem_slot(&stores[0]);
        let slot = h.add_slot(spec).unwrap();
        let map = h.begin_rebuild(slot, RebuildKind::Full).unwrap();
        // Region 0 not copied yet: the write skips the target and stays marked.
        let before = fresh.writes();
        write(&n, 4 * K, 4 * K, 7);
        assert_eq!(
            fresh.writes(),
            before,
            "an uncopied region's write reached the target"
        );
        assert_eq!(fresh.bytes(4 * K as usize, 4), vec![0; 4]);
        assert!(map.any(ByteOffset(0), ByteLen(64 * K)));
        // Region 0 copied (as the copier does, under the range lock): writes reach it.
        map.clear(ByteOffset(0), ByteLen(64 * K));
        write(&n, 8 * K, 4 * K, 8);
        assert_eq!(fresh.bytes(8 * K as usize, 4), vec![8; 4]);
        assert!(!map.any(ByteOffset(0), ByteLen(64 * K)));
        // A write straddling copied region 0 and uncopied region 1 skips the target
        // and marks region 0 again, so the copier brings the whole write.
        write(&n, 60 * K, 8 * K, 9);
        assert_eq!(fresh.bytes(60 * K as usize, 4), vec![0; 4]);
        assert!(map.any(ByteOffset(0), ByteLen(4 * K)));
        // The copy leaves the replicas identical.
        let p = Progress::default();
        let cfg = CopyConfig {
            chunk: ByteLen(128 * K),
            rate: Rate::uncapped(),
            ..CopyConfig::default()
        };
        let mut copier = Copier {
            health: &h,
            ranges: &ranges,
            slot,
            target: &*h.backing(slot).unwrap().thread_handle().unwrap(),
            map: &map,
            bufs: (0..DEPTH)
                .map(|_| AlignedBuf::zeroed(cfg.chunk.0 as usize))
                .collect(),
            chunk: cfg.chunk,
            pacer: Pacer::new(cfg.rate),
            durability: Durability::new(cfg.flush_every),
            progress: &p,
            sources: Handles::default(),
            cursor: ByteOffset(0),
            pace_due: false,
            base: None,
        };
        copier.copy_all().unwrap();
        h.end_rebuild(slot, Ok(())).unwrap();
        assert_eq!(state(&h, slot.get()), ReplicaState::Online);
        assert_eq!(stores[0].bytes(0, 1 << 20), fresh.bytes(0, 1 << 20));
        assert_eq!(
            fresh.bytes(60 * K as usize, 8 * K as usize),
            vec![9; 8 * K as usize]
        );
    }

    #[test]
    fn a_copy_chunk_smaller_than_a_map_region_copies_whole_regions() {
        let (stores, h) = mem_volume(1);
        let ranges = RangeTable::new();
        let n = test_nexus(&h, ranges.clone());
        write(&n, 0, 256 * K, 5);
        let (fresh, spec) = fresh_mem_slot(&stores[0]);
        let slot = h.add_slot(spec).unwrap();
        let cfg = CopyConfig {
            chunk: ByteLen(4 * K),
            rate: Rate::uncapped(),
            ..CopyConfig::default()
        };
        let p = Progress::default();
        let out = rebuild(&h, &ranges, slot, RebuildKind::Full, cfg, &p).unwrap();
        assert!(
            matches!(out, Outcome::Done { bytes, .. } if bytes == 1 << 20),
            "{out:?}"
        );
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
    fn a_target_failing_half_way_lacks_again_only_what_it_got_since_its_last_flush() {
        let (stores, h) = mem_volume(1);
        let ranges = RangeTable::new();
        let n = test_nexus(&h, ranges.clone());
        write(&n, 0, 1 << 20, 3);
        let (fresh, spec) = fresh_mem_slot(&stores[0]);
        let slot = h.add_slot(spec).unwrap();
        let p = Progress::default();
        // The target dies at the chunk at 576 KiB, past the second flush (at 512
        // KiB): at a point of the copy, not at a time the test thread may miss.
        fresh.fail_writes_from(576 * K);
        let cfg = CopyConfig {
            chunk: ByteLen(64 * K),
            rate: Rate::fixed(2 << 20),
            flush_every: ByteLen(256 * K),
        };
        let out = rebuild(&h, &ranges, slot, RebuildKind::Full, cfg, &p).unwrap();
        assert!(matches!(out, Outcome::Stopped { .. }), "{out:?}");
        let left = h.dirty_map(slot).expect("its map").dirty_bytes();
        // Flushed once 256 KiB were copied (after the chunks in flight: at 256 to
        // 448 KiB), before the fault at 576 KiB: the rebuild resumes from the last
        // flush, never from the start.
        assert!(fresh.flushes() >= 1);
        assert!(
            left > 0 && left <= (1024 - 256) * K && left % (64 * K) == 0,
            "{left}"
        );
        let map = h.dirty_map(slot).unwrap();
        assert!(
            !map.any(ByteOffset(0), ByteLen((1 << 20) - left)),
            "flushed"
        );
        fresh.fail_writes_from(u64::MAX);
        fresh.set_fault(Fault::None);
        let out = partial(&h, &ranges, slot.get(), &p).unwrap();
        assert!(
            matches!(out, Outcome::Done { bytes, .. } if bytes == left),
            "{out:?}"
        );
        assert_eq!(fresh.bytes(0, 1 << 20), stores[0].bytes(0, 1 << 20));
    }

    /// (B) The source is faulted for a *write* error while the copy reads it, and
    /// still reads fine: a write it skipped must not be overwritten on the target
    /// by its stale copy (the chunk is copied again from a replica still online).
    #[test]
    fn a_source_faulted_for_writes_mid_copy_is_not_copied_from() {
        let (stores, h) = mem_volume(2);
        let ranges = RangeTable::new();
        let n = test_nexus(&h, ranges.clone());
        write(&n, 0, 1 << 20, 1);
        let (fresh, spec) = fresh_mem_slot(&stores[0]);
        let slot = h.add_slot(spec).unwrap();
        // While the copier reads 256 KiB from slot 0: slot 0's disk starts failing
        // writes, and the application writes 768 KiB, which the target has not got
        // yet (it skips the target) and slot 0 misses (it is faulted).
        let (h2, r2, s0) = (h.clone(), ranges.clone(), stores[0].clone());
        stores[0].on_read_at(256 * K, move || {
            s0.set_fault(Fault::Writes);
            std::thread::spawn(move || write(&test_nexus(&h2, r2), 768 * K, 4 * K, 9))
                .join()
                .unwrap();
        });
        let cfg = CopyConfig {
            chunk: ByteLen(64 * K),
            ..CopyConfig::default()
        };
        let p = Progress::default();
        let out = rebuild(&h, &ranges, slot, RebuildKind::Full, cfg, &p).unwrap();
        assert!(matches!(out, Outcome::Done { .. }), "{out:?}");
        assert!(matches!(state(&h, 0), ReplicaState::Faulted { .. }));
        assert_eq!(stores[0].bytes(768 * K as usize, 4096), vec![1; 4096]);
        assert_eq!(fresh.bytes(768 * K as usize, 4096), vec![9; 4096]);
        assert_eq!(fresh.bytes(0, 1 << 20), stores[1].bytes(0, 1 << 20));
    }

    /// (P) Reads are pinned to the first online replica (a resync that stopped):
    /// a rebuild copies from it too, not from the local replica it would prefer,
    /// or the target would hold what no read has shown where the two differ.
    #[test]
    fn with_reads_pinned_a_rebuild_copies_from_the_pinned_replica() {
        let (stores, h) = crate::testing::mem_volume_remote(2, &[0]);
        let ranges = RangeTable::new();
        let n = test_nexus(&h, ranges.clone());
        write(&n, 0, 1 << 20, 1);
        // As a host crash leaves them: a write reached the remote slot 0 only.
        stores[0].put(64 * K as usize, &[7u8; 4096]);
        h.set_read_policy(crate::health::ReadPolicy::Primary);
        let (fresh, spec) = fresh_mem_slot(&stores[1]);
        let slot = h.add_slot(spec).unwrap();
        let p = Progress::default();
        let out = rebuild(
            &h,
            &ranges,
            slot,
            RebuildKind::Full,
            CopyConfig::default(),
            &p,
        );
        assert!(matches!(out, Ok(Outcome::Done { .. })), "{out:?}");
        assert_eq!(fresh.bytes(64 * K as usize, 4096), vec![7u8; 4096]);
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
        if block_on(handle.data_extents(ByteOffset(0), ByteLen(1 << 20))) == Ok(Some(vec![])) {
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
