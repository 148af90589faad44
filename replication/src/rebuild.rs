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

use serde::{Deserialize, Serialize};

use crate::dirty::DirtyMap;
use crate::dirty_file::{unix_ms, LogKind, LogOrigin};
use crate::error::{Errno, ReplicationError};
use crate::health::{indices, Health, ReadVerdict};
use crate::ids::{ByteLen, ByteOffset, SlotIndex};
use crate::ranges::RangeTable;
use crate::replica::Replica;
use crate::state::{FaultReason, IoOp, RebuildKind, RebuildStop, ReplicaState};

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

/// A node's rebuild budget, shared by its volumes' managers: the rate cap of each
/// rebuild and how many run at once. Changed live by a reload.
#[derive(Debug)]
pub struct NodeLimits {
    pub rate: Rate,
    max_concurrent: AtomicU32,
    running: AtomicU32,
}

impl NodeLimits {
    pub fn new(rate: u64, max_concurrent: u32) -> Arc<NodeLimits> {
        Arc::new(NodeLimits {
            rate: Rate::fixed(rate),
            max_concurrent: AtomicU32::new(max_concurrent.max(1)),
            running: AtomicU32::new(0),
        })
    }

    /// No cap at all (tests, tools).
    pub fn unlimited() -> Arc<NodeLimits> {
        NodeLimits::new(0, u32::MAX)
    }

    pub fn set(&self, rate: u64, max_concurrent: u32) {
        self.rate.set(rate);
        self.max_concurrent
            .store(max_concurrent.max(1), Ordering::Release);
    }

    /// Rebuilds running on the node now.
    pub fn running(&self) -> u32 {
        self.running.load(Ordering::Acquire)
    }

    /// A turn to rebuild, if the node has one free.
    fn try_start(self: &Arc<Self>) -> Option<Turn> {
        let max = self.max_concurrent.load(Ordering::Acquire);
        self.running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Turn(self.clone()))
    }
}

/// One running rebuild's share of the node's budget.
struct Turn(Arc<NodeLimits>);

impl Drop for Turn {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
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
        let res = self.read_source(offset, &mut buf[..n]).and_then(|()| {
            futures::executor::block_on(self.target.write(offset, &buf[..n], false))
                .map_err(|e| self.target_failed(offset, len, e))
        });
        self.buf = buf;
        if res.is_err() {
            self.map.mark(offset, len);
        }
        res
    }

    /// Read from an online replica, failing over to another when one fails.
    fn read_source(&mut self, offset: ByteOffset, buf: &mut [u8]) -> Result<(), FaultReason> {
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
            match futures::executor::block_on(handle.read(offset, buf)) {
                Ok(()) => return Ok(()),
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

/// Host-crash resync: make the online replicas identical where the last run may
/// have had mutations in flight (`in_flight`, the activity log's hot extents),
/// copying from the replica reads are pinned to (the first online one, so no read
/// sees a region change under it) to every other online one, each chunk under the
/// range lock. Then reads are spread again. A replica whose write fails is faulted
/// with what it still lacks in its map. Returns the bytes copied per target.
pub fn resync(
    health: &Arc<Health>,
    ranges: &RangeTable,
    in_flight: &[(ByteOffset, ByteLen)],
    cfg: &CopyConfig,
    progress: &Progress,
) -> Result<u64, FaultReason> {
    let total: u64 = in_flight.iter().map(|(_, l)| l.0).sum();
    progress.total.store(total, Ordering::Release);
    progress.done.store(0, Ordering::Release);
    let mut buf = vec![0u8; cfg.chunk.0 as usize];
    let mut handles: Vec<(SlotIndex, Box<dyn Replica>)> = Vec::new();
    let mut next_at = Instant::now();
    let pieces: Vec<(ByteOffset, ByteLen)> = in_flight
        .iter()
        .flat_map(|&(o, l)| {
            (o.0..o.0 + l.0)
                .step_by(cfg.chunk.0 as usize)
                .map(move |at| (ByteOffset(at), ByteLen(cfg.chunk.0.min(o.0 + l.0 - at))))
        })
        .collect();
    for (i, &(offset, len)) in pieces.iter().enumerate() {
        if progress.cancel.load(Ordering::Acquire) {
            return Err(FaultReason::RebuildStopped {
                why: RebuildStop::Cancelled,
            });
        }
        let _range = futures::executor::block_on(ranges.lock(offset.0, len.0, &None));
        let _al = futures::executor::block_on(health.enter_activity(offset, len, None)).map_err(
            |_| FaultReason::RebuildStopped {
                why: RebuildStop::LogFailed,
            },
        )?;
        let data = &mut buf[..len.0 as usize];
        // The pinned source; one that fails is faulted by read_failed and the next
        // online replica becomes the source (and where reads go).
        let src = loop {
            let Some(src) = indices(health.read_mask()).next() else {
                return Err(FaultReason::RebuildStopped {
                    why: RebuildStop::NoSource,
                });
            };
            let h = handle(health, &mut handles, src).ok_or(FaultReason::RebuildStopped {
                why: RebuildStop::NoSource,
            })?;
            match futures::executor::block_on(h.read(offset, data)) {
                Ok(()) => break src,
                Err(e) => {
                    if let ReadVerdict::Fail(_) = health.read_failed(src, e) {
                        return Err(FaultReason::RebuildStopped {
                            why: RebuildStop::NoSource,
                        });
                    }
                }
            }
        };
        for t in indices(health.read_mask() & !(1 << src.get())) {
            let Some(h) = handle(health, &mut handles, t) else {
                continue;
            };
            if let Err(e) = futures::executor::block_on(h.write(offset, data, false)) {
                let reason = FaultReason::of_errno(IoOp::Write, e);
                if let Err(err) = health.fault_missing(t, reason, &pieces[i..]) {
                    tracing::warn!(volume = health.volume(), slot = %t, error = %err, "resync target already out");
                }
            }
        }
        progress.done.fetch_add(len.0, Ordering::AcqRel);
        if let Some(rate) = cfg.rate.get() {
            next_at =
                next_at.max(Instant::now()) + Duration::from_secs_f64(len.0 as f64 / rate as f64);
            if let Some(w) = next_at.checked_duration_since(Instant::now()) {
                std::thread::sleep(w);
            }
        }
    }
    health.set_read_policy(crate::health::ReadPolicy::Spread);
    Ok(total)
}

fn handle<'a>(
    health: &Health,
    handles: &'a mut Vec<(SlotIndex, Box<dyn Replica>)>,
    slot: SlotIndex,
) -> Option<&'a dyn Replica> {
    if !handles.iter().any(|(s, _)| *s == slot) {
        let h = health.backing(slot)?.thread_handle().ok()?;
        handles.push((slot, h));
    }
    handles
        .iter()
        .find(|(s, _)| *s == slot)
        .map(|(_, h)| h.as_ref())
}

/// One faulted slot, as the rebuild scheduler sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub slot: SlotIndex,
    pub faulted: bool,
    /// Open (a replica that could not be opened has nothing to rebuild onto).
    pub has_backing: bool,
    /// Reachable now: a remote replica's connection is up again.
    pub reachable: bool,
    /// What it missed is known (partial), or not (full).
    pub has_map: bool,
    /// Its map is a missed-writes history older than the partial window.
    pub map_expired: bool,
    /// Not before (backoff after a failed rebuild).
    pub retry_at: Option<Instant>,
}

/// Which rebuild to run next, one at a time per volume: a reachable faulted
/// replica, partial ones first (they restore redundancy soonest), then by slot.
pub fn next_rebuild(candidates: &[Candidate], now: Instant) -> Option<(SlotIndex, RebuildKind)> {
    candidates
        .iter()
        .filter(|c| c.faulted && c.has_backing && c.reachable)
        .filter(|c| c.retry_at.is_none_or(|t| t <= now))
        .min_by_key(|c| (!c.has_map || c.map_expired, c.slot))
        .map(|c| {
            let kind = if c.has_map && !c.map_expired {
                RebuildKind::Partial
            } else {
                RebuildKind::Full
            };
            (c.slot, kind)
        })
}

/// Backoff after the `n`th failed rebuild of a replica in a row: 5 s, doubling,
/// at most 5 minutes.
pub fn retry_delay(n: u32) -> Duration {
    Duration::from_secs(
        5u64.saturating_mul(1 << n.saturating_sub(1).min(6))
            .min(300),
    )
}

/// What the manager is told.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Most bytes per copy.
    pub chunk: ByteLen,
    /// A replica away for longer gets a full rebuild, not a partial one.
    pub partial_window: Duration,
    /// The node's budget (rate cap, rebuilds at once), shared with other volumes.
    pub limits: Arc<NodeLimits>,
    /// Resync these ranges first ([`resync`]): after an unclean shutdown.
    pub resync: Vec<(ByteOffset, ByteLen)>,
}

impl Default for ManagerConfig {
    fn default() -> ManagerConfig {
        ManagerConfig {
            chunk: CopyConfig::default().chunk,
            partial_window: DEFAULT_PARTIAL_WINDOW,
            limits: NodeLimits::unlimited(),
            resync: Vec::new(),
        }
    }
}

/// Default of `partial_window`: 10 minutes.
pub const DEFAULT_PARTIAL_WINDOW: Duration = Duration::from_secs(600);

/// Whether a map of `origin` is too old for a partial rebuild at `now_ms`.
pub fn map_expired(origin: &LogOrigin, now_ms: u64, window: Duration) -> bool {
    origin.kind == LogKind::Missed && origin.age_ms(now_ms) > window.as_millis() as u64
}

/// What the manager is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Work {
    Rebuild(RebuildKind),
    /// Host-crash resync of the online replicas.
    Resync,
}

/// The rebuild in progress, for status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Running {
    /// The target (`None`: a resync, whose targets are all online replicas).
    pub slot: Option<SlotIndex>,
    pub location: String,
    pub work: Work,
    pub total: u64,
    pub done: u64,
    pub elapsed_ms: u64,
}

/// Rebuilds a volume's faulted replicas on its own thread as they become
/// reachable ([`next_rebuild`]). Dropped, it cancels the rebuild in progress (the
/// replica keeps what it still lacks) and joins the thread.
pub struct Manager {
    stop: Arc<AtomicBool>,
    state: Arc<ManagerState>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The running job: target slot, its location, what, since when.
type Job = (Option<SlotIndex>, String, Work, Instant);

#[derive(Default)]
struct ManagerState {
    progress: Progress,
    running: std::sync::Mutex<Option<Job>>,
}

impl Manager {
    pub fn start(
        health: Arc<Health>,
        ranges: Arc<RangeTable>,
        cfg: ManagerConfig,
    ) -> Result<Manager, ReplicationError> {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(ManagerState::default());
        let (s, st) = (stop.clone(), state.clone());
        let thread = std::thread::Builder::new()
            .name(format!("rebuild-{}", health.volume()))
            .spawn(move || manage(&health, &ranges, cfg, &s, &st))
            .map_err(|e| ReplicationError::Persist(format!("start the rebuild thread: {e}")))?;
        Ok(Manager {
            stop,
            state,
            thread: Some(thread),
        })
    }

    /// The rebuild in progress, if any.
    pub fn running(&self) -> Option<Running> {
        let r = self.state.running.lock().unwrap();
        let (slot, location, work, t0) = r.as_ref()?;
        Some(Running {
            slot: *slot,
            location: location.clone(),
            work: *work,
            total: self.state.progress.total.load(Ordering::Acquire),
            done: self.state.progress.done.load(Ordering::Acquire),
            elapsed_ms: t0.elapsed().as_millis() as u64,
        })
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.state.progress.cancel.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn manage(
    health: &Arc<Health>,
    ranges: &RangeTable,
    cfg: ManagerConfig,
    stop: &AtomicBool,
    state: &ManagerState,
) {
    let mut failures: std::collections::HashMap<crate::ids::ReplicaUuid, (u32, Instant)> =
        std::collections::HashMap::new();
    // A replica whose own disk failed while we ran is not rebuilt onto that disk
    // again by itself (an operator's restart or command, or a replacement, is the
    // way back); one that was faulted when we started is tried.
    let faulted_at_start: std::collections::HashSet<crate::ids::ReplicaUuid> = health
        .snapshot()
        .slots
        .iter()
        .filter(|s| matches!(s.state, ReplicaState::Faulted { .. }))
        .map(|s| s.uuid)
        .collect();
    if !cfg.resync.is_empty() {
        *state.running.lock().unwrap() =
            Some((None, "online replicas".into(), Work::Resync, Instant::now()));
        let copy = CopyConfig {
            chunk: cfg.chunk,
            rate: cfg.limits.rate.clone(),
        };
        let t0 = Instant::now();
        match resync(health, ranges, &cfg.resync, &copy, &state.progress) {
            Ok(bytes) => tracing::info!(volume = health.volume(), bytes,
                millis = t0.elapsed().as_millis() as u64,
                "resync done: the replicas are identical where writes were in flight; reads are spread again"),
            Err(reason) => tracing::error!(volume = health.volume(), %reason,
                "resync stopped: reads stay on one replica"),
        }
        *state.running.lock().unwrap() = None;
    }
    while !stop.load(Ordering::SeqCst) {
        let version = health.signal().version();
        let snap = health.snapshot();
        let candidates: Vec<Candidate> = snap
            .slots
            .iter()
            .map(|s| {
                let backing = health.backing(s.slot);
                Candidate {
                    slot: s.slot,
                    faulted: match &s.state {
                        ReplicaState::Faulted { reason } => {
                            !reason.is_media_error() || faulted_at_start.contains(&s.uuid)
                        }
                        _ => false,
                    },
                    has_backing: backing.is_some(),
                    reachable: backing.as_ref().is_some_and(|b| b.is_reachable()),
                    has_map: health.dirty_map(s.slot).is_some(),
                    map_expired: s
                        .log
                        .is_some_and(|o| map_expired(&o, unix_ms(), cfg.partial_window)),
                    retry_at: failures.get(&s.uuid).map(|(_, t)| *t),
                }
            })
            .collect();
        let Some((slot, kind)) = next_rebuild(&candidates, Instant::now()) else {
            // Reconnects are state changes too; a backoff ends on its own.
            let _ = futures::executor::block_on(health.changed(
                version,
                Some(Instant::now() + Duration::from_secs(1)),
                None,
            ));
            continue;
        };
        let Some(slot_status) = snap.slots.iter().find(|s| s.slot == slot) else {
            continue;
        };
        let uuid = slot_status.uuid;
        let Some(turn) = cfg.limits.try_start() else {
            // The node's other rebuilds come first: look again shortly.
            std::thread::sleep(Duration::from_millis(500));
            continue;
        };
        if let (RebuildKind::Full, Some(o)) = (kind, slot_status.log) {
            tracing::info!(volume = health.volume(), replica = %slot_status.location,
                age_s = o.age_ms(unix_ms()) / 1000, window_s = cfg.partial_window.as_secs(),
                "away longer than the partial-rebuild window: full rebuild");
        }
        *state.running.lock().unwrap() = Some((
            Some(slot),
            slot_status.location.clone(),
            Work::Rebuild(kind),
            Instant::now(),
        ));
        let copy = CopyConfig {
            chunk: cfg.chunk,
            rate: cfg.limits.rate.clone(),
        };
        let out = rebuild(health, ranges, slot, kind, copy, &state.progress);
        drop(turn);
        *state.running.lock().unwrap() = None;
        match out {
            Ok(Outcome::Done { .. }) => {
                failures.remove(&uuid);
            }
            Ok(Outcome::Stopped { .. }) | Err(_) => {
                if let Err(e) = &out {
                    tracing::warn!(volume = health.volume(), slot = %slot, error = %e, "rebuild could not run");
                }
                let n = failures.get(&uuid).map_or(1, |(n, _)| n + 1);
                failures.insert(uuid, (n, Instant::now() + retry_delay(n)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::BlockRequest;
    use crate::testing::{fresh_mem_slot, mem_volume, test_nexus, Fault};
    use futures::executor::block_on;

    const K: u64 = 1024;

    fn write(n: &crate::Nexus, off: u64, len: u64, byte: u8) {
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

    fn state(h: &Health, i: usize) -> ReplicaState {
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
    fn a_resync_makes_the_online_replicas_identical_where_writes_were_in_flight() {
        let (stores, h) = mem_volume(3);
        let ranges = RangeTable::new();
        let n = test_nexus(&h, ranges.clone());
        write(&n, 0, 1 << 20, 1);
        // As a host crash leaves them: a write reached replica 0 and 2 only, one
        // other reached replica 1 only, both in the first 256 KiB.
        stores[0].put(8 * K as usize, &[7u8; 4096]);
        stores[2].put(8 * K as usize, &[7u8; 4096]);
        stores[1].put(200 * K as usize, &[9u8; 4096]);
        h.set_read_policy(crate::health::ReadPolicy::Primary);
        let p = Progress::default();
        let hot = [(ByteOffset(0), ByteLen(256 * K))];
        let cfg = CopyConfig {
            chunk: ByteLen(64 * K),
            rate: Rate::uncapped(),
        };
        assert_eq!(resync(&h, &ranges, &hot, &cfg, &p), Ok(256 * K));
        // The pinned replica (the first online one) won everywhere.
        let first = stores[0].bytes(0, 1 << 20);
        assert_eq!(first[8 * K as usize], 7);
        assert_eq!(first[200 * K as usize], 1);
        assert_eq!(stores[1].bytes(0, 1 << 20), first);
        assert_eq!(stores[2].bytes(0, 1 << 20), first);
        assert_eq!(h.read_policy(), crate::health::ReadPolicy::Spread);
        assert_eq!(h.snapshot().read_policy, crate::health::ReadPolicy::Spread);
        // A target that fails is faulted with what it still lacks.
        h.set_read_policy(crate::health::ReadPolicy::Primary);
        stores[2].set_fault(Fault::Writes);
        assert_eq!(resync(&h, &ranges, &hot, &cfg, &p), Ok(256 * K));
        assert!(matches!(state(&h, 2), ReplicaState::Faulted { .. }));
        let map = h.dirty_map(SlotIndex(2)).expect("its map");
        assert_eq!(map.dirty_bytes(), 256 * K, "every range it did not get");
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
    fn the_scheduler_takes_reachable_faulted_replicas_partial_first() {
        let now = Instant::now();
        let c = |slot: u8, faulted, reachable, has_map, retry_in: Option<i64>| Candidate {
            slot: SlotIndex(slot),
            faulted,
            has_backing: true,
            reachable,
            has_map,
            map_expired: false,
            retry_at: retry_in.map(|s| {
                if s >= 0 {
                    now + Duration::from_secs(s as u64)
                } else {
                    now - Duration::from_secs((-s) as u64)
                }
            }),
        };
        let full = Some((SlotIndex(1), RebuildKind::Full));
        type Case = (
            &'static str,
            Vec<Candidate>,
            Option<(SlotIndex, RebuildKind)>,
        );
        let cases: &[Case] = &[
            (
                "nothing faulted",
                vec![c(0, false, true, false, None)],
                None,
            ),
            (
                "faulted, unreachable",
                vec![c(1, true, false, true, None)],
                None,
            ),
            (
                "faulted, reachable, no map",
                vec![c(1, true, true, false, None)],
                full,
            ),
            (
                "partial before full",
                vec![c(1, true, true, false, None), c(2, true, true, true, None)],
                Some((SlotIndex(2), RebuildKind::Partial)),
            ),
            ("backing off", vec![c(1, true, true, false, Some(3))], None),
            (
                "backoff over",
                vec![c(1, true, true, false, Some(-1))],
                full,
            ),
            (
                "lowest slot among equals",
                vec![c(3, true, true, true, None), c(2, true, true, true, None)],
                Some((SlotIndex(2), RebuildKind::Partial)),
            ),
        ];
        for (name, cands, want) in cases {
            assert_eq!(next_rebuild(cands, now), *want, "{name}");
        }
        let mut expired = c(2, true, true, true, None);
        expired.map_expired = true;
        assert_eq!(
            next_rebuild(&[expired, c(1, true, true, false, None)], now),
            full,
            "an expired history is no better than none: full, by slot"
        );
        let mut no_backing = c(1, true, true, true, None);
        no_backing.has_backing = false;
        assert_eq!(
            next_rebuild(&[no_backing], now),
            None,
            "nothing to rebuild onto"
        );
    }

    #[test]
    fn retries_back_off_from_5_s_to_5_min() {
        let d: Vec<u64> = (1..=9).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(d, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }

    #[test]
    fn the_manager_rebuilds_a_faulted_replica_once_it_is_reachable() {
        let (stores, h) = mem_volume(2);
        let ranges = RangeTable::new();
        let n = test_nexus(&h, ranges.clone());
        stores[1].set_fault(Fault::All);
        write(&n, 0, 4 * K, 1);
        write(&n, 300 * K, 8 * K, 2);
        stores[1].set_fault(Fault::None);
        let m = Manager::start(h.clone(), ranges.clone(), ManagerConfig::default()).unwrap();
        let t0 = Instant::now();
        while state(&h, 1) != ReplicaState::Online {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "not rebuilt: {:?}",
                state(&h, 1)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(m);
        assert_eq!(stores[0].bytes(0, 1 << 20), stores[1].bytes(0, 1 << 20));
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
}
