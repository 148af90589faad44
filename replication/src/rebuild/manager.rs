//! The rebuild manager: one thread per volume that picks the next replica to
//! rebuild ([`next_rebuild`], a pure function) and runs the copier, within the
//! node's budget ([`NodeLimits`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{rebuild, resync, CopyConfig, Outcome, Progress, Rate};
use crate::dirty_file::{unix_ms, LogKind, LogOrigin};
use crate::error::ReplicationError;
use crate::health::Health;
use crate::ids::{ByteLen, ByteOffset, ReplicaUuid, SlotIndex};
use crate::ranges::RangeTable;
use crate::state::{FaultReason, RebuildKind, ReplicaState};

/// A node's rebuild budget, shared by its volumes' managers: the rate cap of each
/// rebuild, its share of time while the application is busy, and how many run at
/// once. Changed live by a reload.
#[derive(Debug)]
pub struct NodeLimits {
    pub rate: Rate,
    max_concurrent: AtomicU32,
    running: AtomicU32,
}

impl NodeLimits {
    pub fn new(rate: u64, busy_percent: u32, max_concurrent: u32) -> Arc<NodeLimits> {
        let limits = Arc::new(NodeLimits {
            rate: Rate::fixed(rate),
            max_concurrent: AtomicU32::new(max_concurrent.max(1)),
            running: AtomicU32::new(0),
        });
        limits.rate.set_busy_percent(busy_percent);
        limits
    }

    /// No cap at all (tests, tools).
    pub fn unlimited() -> Arc<NodeLimits> {
        NodeLimits::new(0, 100, u32::MAX)
    }

    pub fn set(&self, rate: u64, busy_percent: u32, max_concurrent: u32) {
        self.rate.set(rate);
        self.rate.set_busy_percent(busy_percent);
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
    /// An operator asked for it (in full: `Some(true)`): first, whatever the
    /// backoff or the kind of its fault.
    pub requested: Option<bool>,
}

/// Which rebuild to run next, one at a time per volume: a reachable faulted
/// replica, partial ones first (they restore redundancy soonest), then by slot.
pub fn next_rebuild(candidates: &[Candidate], now: Instant) -> Option<(SlotIndex, RebuildKind)> {
    let kind = |c: &Candidate| {
        if c.has_map && !c.map_expired && c.requested != Some(true) {
            RebuildKind::Partial
        } else {
            RebuildKind::Full
        }
    };
    let ready = |c: &&Candidate| c.has_backing && c.reachable;
    if let Some(c) = candidates
        .iter()
        .filter(ready)
        .filter(|c| c.requested.is_some())
        .min_by_key(|c| c.slot)
    {
        return Some((c.slot, kind(c)));
    }
    candidates
        .iter()
        .filter(ready)
        .filter(|c| c.faulted)
        .filter(|c| c.retry_at.is_none_or(|t| t <= now))
        .min_by_key(|c| (kind(c) == RebuildKind::Full, c.slot))
        .map(|c| (c.slot, kind(c)))
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
    pub partial_window: PartialWindow,
    /// The node's budget (rate cap, rebuilds at once), shared with other volumes.
    pub limits: Arc<NodeLimits>,
    /// Resync these ranges first ([`resync`]): after an unclean shutdown.
    pub resync: Vec<(ByteOffset, ByteLen)>,
    /// Where the history is kept (`None`: in memory only).
    pub history: Option<PathBuf>,
}

impl Default for ManagerConfig {
    fn default() -> ManagerConfig {
        ManagerConfig {
            chunk: CopyConfig::default().chunk,
            partial_window: PartialWindow::new(DEFAULT_PARTIAL_WINDOW),
            limits: NodeLimits::unlimited(),
            resync: Vec::new(),
            history: None,
        }
    }
}

/// The partial-rebuild window, shared with whoever may change it while the
/// manager runs (a reload): read at every decision.
#[derive(Debug, Clone)]
pub struct PartialWindow(Arc<AtomicU64>);

impl PartialWindow {
    pub fn new(window: Duration) -> PartialWindow {
        PartialWindow(Arc::new(AtomicU64::new(window.as_secs())))
    }

    pub fn get(&self) -> Duration {
        Duration::from_secs(self.0.load(Ordering::Acquire))
    }

    pub fn set(&self, window: Duration) {
        self.0.store(window.as_secs(), Ordering::Release);
    }
}

/// Default of `partial_window`: 10 minutes.
pub const DEFAULT_PARTIAL_WINDOW: Duration = Duration::from_secs(600);

/// Whether a map of `origin` is too old for a partial rebuild at `now_ms`.
pub fn map_expired(origin: &LogOrigin, now_ms: u64, window: Duration) -> bool {
    origin.kind == LogKind::Missed && origin.age_ms(now_ms) > window.as_millis() as u64
}

/// Why a faulted replica gets (or got) a full rebuild rather than a partial one:
/// shown by status and kept in the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "why", rename_all = "snake_case")]
pub enum FullWhy {
    /// Nothing says what it lacks: it is new to the volume (added by a reload, a
    /// replacement), or its saved dirty map was lost or not trusted at start (the
    /// owner's log says why).
    NoMap,
    /// Its map records missed writes since longer than the partial-rebuild window.
    Expired { age_s: u64, window_s: u64 },
    /// An operator asked for a full rebuild.
    Requested,
}

impl std::fmt::Display for FullWhy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FullWhy::NoMap => write!(
                f,
                "no record of what it missed (a new replica, or its dirty map was not kept)"
            ),
            FullWhy::Expired { age_s, window_s } => write!(
                f,
                "away for {age_s} s, longer than the partial-rebuild window ({window_s} s)"
            ),
            FullWhy::Requested => write!(f, "an operator asked for a full rebuild"),
        }
    }
}

/// Why a replica whose map is `map` (its origin, when it has one) is rebuilt in
/// full at `now_ms`, or `None`: a partial rebuild copies what its map marks.
pub fn full_why(
    map: Option<Option<LogOrigin>>,
    now_ms: u64,
    window: Duration,
    requested_full: bool,
) -> Option<FullWhy> {
    if requested_full {
        return Some(FullWhy::Requested);
    }
    match map {
        None => Some(FullWhy::NoMap),
        Some(Some(o)) if map_expired(&o, now_ms, window) => Some(FullWhy::Expired {
            age_s: o.age_ms(now_ms) / 1000,
            window_s: window.as_secs(),
        }),
        Some(_) => None,
    }
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

/// Why a rebuild or resync ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The manager's own choice (a faulted replica became reachable).
    Auto,
    /// `ublkctl rebuild start`.
    Operator,
    /// The last run ended uncleanly (resync).
    UncleanShutdown,
}

/// How a job ended, for the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Ended {
    Done {
        bytes: u64,
    },
    /// The target is faulted again, keeping what it lacks.
    Stopped {
        bytes: u64,
        reason: FaultReason,
    },
    /// It could not start (the replica was not in a state to be rebuilt).
    NotStarted {
        error: String,
    },
}

/// One finished rebuild or resync, as `ublkctl rebuild history` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub started_unix_ms: u64,
    pub ended_unix_ms: u64,
    /// The target (`None`: a resync of every online replica).
    pub slot: Option<SlotIndex>,
    pub location: String,
    pub work: Work,
    pub trigger: Trigger,
    /// What the target was faulted for when the rebuild began.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultReason>,
    /// Why a full rebuild rather than a partial one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_why: Option<FullWhy>,
    #[serde(flatten)]
    pub ended: Ended,
}

/// Entries kept (the oldest go first).
pub const HISTORY_LEN: usize = 100;

/// Rebuilds a volume's faulted replicas on its own thread as they become
/// reachable ([`next_rebuild`]), or when an operator asks; keeps their history.
/// Dropped, it cancels the rebuild in progress (the replica keeps what it still
/// lacks) and joins the thread.
pub struct Manager {
    window: PartialWindow,
    stop: Arc<AtomicBool>,
    state: Arc<ManagerState>,
    health: Arc<Health>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The running job: target slot, its location, what, since when.
type Job = (Option<SlotIndex>, String, Work, Instant);

#[derive(Default)]
struct ManagerState {
    progress: Progress,
    running: Mutex<Option<Job>>,
    /// Operator requests not yet taken: replica, full or not.
    requests: Mutex<Vec<(ReplicaUuid, bool)>>,
    /// Replicas whose rebuild an operator cancelled: left alone until asked again.
    held: Mutex<HashSet<ReplicaUuid>>,
    history: Mutex<VecDeque<HistoryEntry>>,
}

impl Manager {
    pub fn start(
        health: Arc<Health>,
        ranges: Arc<RangeTable>,
        cfg: ManagerConfig,
    ) -> Result<Manager, ReplicationError> {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(ManagerState::default());
        if let Some(path) = &cfg.history {
            *state.history.lock().unwrap() = load_history(path);
        }
        let window = cfg.partial_window.clone();
        let (s, st, h) = (stop.clone(), state.clone(), health.clone());
        let thread = std::thread::Builder::new()
            .name(format!("rebuild-{}", health.volume()))
            .spawn(move || manage(&h, &ranges, cfg, &s, &st))
            .map_err(|e| ReplicationError::Persist(format!("start the rebuild thread: {e}")))?;
        Ok(Manager {
            window,
            stop,
            state,
            health,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The partial-rebuild window in force (a reload changes it).
    pub fn partial_window(&self) -> &PartialWindow {
        &self.window
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

    /// Rebuild faulted `slot` now (in full if `full`, else partial when its map
    /// allows), whatever its fault, backoff or an earlier cancel.
    pub fn request(&self, slot: SlotIndex, full: bool) -> Result<(), ReplicationError> {
        let snap = self.health.snapshot();
        let s = snap
            .slots
            .iter()
            .find(|s| s.slot == slot)
            .ok_or(ReplicationError::NoSuchSlot(slot))?;
        if !matches!(s.state, ReplicaState::Faulted { .. }) {
            return Err(ReplicationError::NotFaulted {
                replica: s.location.clone(),
                state: s.state.name(),
            });
        }
        if self.health.backing(slot).is_none() {
            return Err(ReplicationError::NotOpen(s.location.clone()));
        }
        self.state.held.lock().unwrap().remove(&s.uuid);
        self.state.requests.lock().unwrap().push((s.uuid, full));
        self.health.signal().notify();
        Ok(())
    }

    /// Cancel the rebuild of `slot` (or whichever runs): it stops after the chunk
    /// in flight, keeps what it lacks, and is not restarted until requested.
    /// Returns the slot cancelled, `None` if nothing ran.
    pub fn cancel(&self, slot: Option<SlotIndex>) -> Option<SlotIndex> {
        let running = self.state.running.lock().unwrap();
        let (Some(target), ..) = running.as_ref()? else {
            return None;
        };
        if slot.is_some_and(|s| s != *target) {
            return None;
        }
        let uuid = self
            .health
            .snapshot()
            .slots
            .iter()
            .find(|s| s.slot == *target)
            .map(|s| s.uuid)?;
        self.state.held.lock().unwrap().insert(uuid);
        self.state.progress.cancel.store(true, Ordering::SeqCst);
        Some(*target)
    }

    /// Finished rebuilds and resyncs, oldest first.
    pub fn history(&self) -> Vec<HistoryEntry> {
        self.state.history.lock().unwrap().iter().cloned().collect()
    }
}

impl Manager {
    /// Cancel what runs and start nothing more; returns once the copier stopped
    /// (a volume's clean stop calls it before the sync that makes the stop clean).
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.state.progress.cancel.store(true, Ordering::SeqCst);
        // An idle manager sleeps until the volume's state changes: wake it.
        self.health.signal().notify();
        let thread = self.thread.lock().unwrap().take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn load_history(path: &Path) -> VecDeque<HistoryEntry> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "rebuild history unreadable: starting a new one");
            VecDeque::new()
        }),
        Err(_) => VecDeque::new(),
    }
}

/// Append `e` to the history (and its file, best effort: it is for people).
/// Run one job: shown as running while `work` runs, then recorded in the history.
fn run_job(
    state: &ManagerState,
    cfg: &ManagerConfig,
    (slot, location, what): (Option<SlotIndex>, String, Work),
    (trigger, fault, full_why): (Trigger, Option<FaultReason>, Option<FullWhy>),
    work: impl FnOnce() -> Ended,
) {
    *state.running.lock().unwrap() = Some((slot, location.clone(), what, Instant::now()));
    let started = unix_ms();
    let ended = work();
    *state.running.lock().unwrap() = None;
    record(
        state,
        cfg,
        HistoryEntry {
            started_unix_ms: started,
            ended_unix_ms: unix_ms(),
            slot,
            location,
            work: what,
            trigger,
            fault,
            full_why,
            ended,
        },
    );
}

fn record(state: &ManagerState, cfg: &ManagerConfig, e: HistoryEntry) {
    let mut h = state.history.lock().unwrap();
    h.push_back(e);
    while h.len() > HISTORY_LEN {
        h.pop_front();
    }
    if let Some(path) = &cfg.history {
        let bytes = serde_json::to_vec(&*h).expect("history serializes");
        if let Err(e) = crate::durable::replace(path, &bytes) {
            tracing::warn!(path = %path.display(), error = %e, "cannot save the rebuild history");
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
    let mut failures: HashMap<ReplicaUuid, (u32, Instant)> = HashMap::new();
    // A replica whose own disk failed while we ran is not rebuilt onto that disk
    // again by itself (an operator's command or restart, or a replacement, is the
    // way back); one that was faulted when we started is tried.
    let faulted_at_start: HashSet<ReplicaUuid> = health
        .snapshot()
        .slots
        .iter()
        .filter(|s| matches!(s.state, ReplicaState::Faulted { .. }))
        .map(|s| s.uuid)
        .collect();
    let copy = || CopyConfig {
        chunk: cfg.chunk,
        rate: cfg.limits.rate.clone(),
        ..CopyConfig::default()
    };
    if !cfg.resync.is_empty() {
        let job = (None, "online replicas".to_string(), Work::Resync);
        run_job(
            state,
            &cfg,
            job,
            (Trigger::UncleanShutdown, None, None),
            || {
                let t0 = Instant::now();
                match resync(health, ranges, &cfg.resync, &copy(), &state.progress) {
                    Ok(bytes) => {
                        tracing::info!(volume = health.volume(), bytes,
                        millis = t0.elapsed().as_millis() as u64,
                        "resync done: the replicas are identical where writes were in flight; reads are spread again");
                        Ended::Done { bytes }
                    }
                    Err(reason) => {
                        tracing::error!(volume = health.volume(), %reason,
                        "resync stopped: reads stay on one replica");
                        Ended::Stopped {
                            bytes: state.progress.done.load(Ordering::Acquire),
                            reason,
                        }
                    }
                }
            },
        );
    }
    let mut requested: HashMap<ReplicaUuid, bool> = HashMap::new();
    loop {
        // The version before the stop flag: a shutdown between the two is then a
        // change seen by the wait below (it sets the flag, then notifies).
        let version = health.signal().version();
        if stop.load(Ordering::SeqCst) {
            break;
        }
        for (u, full) in state.requests.lock().unwrap().drain(..) {
            failures.remove(&u);
            requested.insert(u, full);
        }
        let held = state.held.lock().unwrap().clone();
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
                            !held.contains(&s.uuid)
                                && (!reason.is_media_error() || faulted_at_start.contains(&s.uuid))
                        }
                        _ => false,
                    },
                    has_backing: backing.is_some(),
                    reachable: backing.as_ref().is_some_and(|b| b.is_reachable()),
                    has_map: health.dirty_map(s.slot).is_some(),
                    map_expired: s
                        .log
                        .is_some_and(|o| map_expired(&o, unix_ms(), cfg.partial_window.get())),
                    retry_at: failures.get(&s.uuid).map(|(_, t)| *t),
                    requested: match (&s.state, requested.get(&s.uuid)) {
                        (ReplicaState::Faulted { .. }, Some(full)) => Some(*full),
                        _ => None,
                    },
                }
            })
            .collect();
        let Some((slot, kind)) = next_rebuild(&candidates, Instant::now()) else {
            // Reconnects, requests and the shutdown are state changes too. Only a
            // replica waiting for a rebuild needs a look at the clock (a backoff
            // ends, a dirty map expires); with none, this sleeps until a change.
            let waiting = candidates
                .iter()
                .any(|c| c.faulted || c.requested.is_some());
            let _ = futures::executor::block_on(health.changed(
                version,
                waiting.then(|| Instant::now() + Duration::from_secs(1)),
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
        let asked = requested.remove(&uuid);
        let trigger = match asked {
            Some(_) => Trigger::Operator,
            None => Trigger::Auto,
        };
        let why_full = match kind {
            RebuildKind::Full => full_why(
                health.dirty_map(slot).map(|_| slot_status.log),
                unix_ms(),
                cfg.partial_window.get(),
                asked == Some(true),
            ),
            RebuildKind::Partial => None,
        };
        if let Some(w) = &why_full {
            tracing::info!(volume = health.volume(), replica = %slot_status.location, why = %w,
                "full rebuild");
        }
        // A cancel of an earlier job does not reach this one.
        state
            .progress
            .cancel
            .store(stop.load(Ordering::SeqCst), Ordering::SeqCst);
        let job = (
            Some(slot),
            slot_status.location.clone(),
            Work::Rebuild(kind),
        );
        let why = (trigger, slot_status.state.fault_reason().cloned(), why_full);
        run_job(state, &cfg, job, why, || {
            let out = rebuild(health, ranges, slot, kind, copy(), &state.progress);
            drop(turn);
            if let Err(e) = &out {
                tracing::warn!(volume = health.volume(), slot = %slot, error = %e, "rebuild could not run");
            }
            let ended = match out {
                Ok(Outcome::Done { bytes, .. }) => Ended::Done { bytes },
                Ok(Outcome::Stopped { bytes, reason }) => Ended::Stopped { bytes, reason },
                Err(e) => Ended::NotStarted {
                    error: e.to_string(),
                },
            };
            if let Ended::Done { .. } = ended {
                failures.remove(&uuid);
            } else {
                let n = failures.get(&uuid).map_or(1, |(n, _)| n + 1);
                failures.insert(uuid, (n, Instant::now() + retry_delay(n)));
            }
            ended
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rebuild::tests::{state, write, K};
    use crate::testing::{mem_volume, test_nexus, Fault};

    #[test]
    fn why_a_full_rebuild_is_named_from_the_map_its_age_and_the_request() {
        let window = Duration::from_secs(600);
        let at = |kind, age_s: u64| LogOrigin {
            kind,
            since_epoch: wire::Epoch(3),
            since_unix_ms: 1_000_000_000 - age_s * 1000,
        };
        let now = 1_000_000_000;
        type Case = (
            &'static str,
            Option<Option<LogOrigin>>,
            bool,
            Option<FullWhy>,
        );
        let cases: Vec<Case> = vec![
            ("no map", None, false, Some(FullWhy::NoMap)),
            (
                "fresh map",
                Some(Some(at(LogKind::Missed, 60))),
                false,
                None,
            ),
            (
                "map past the window",
                Some(Some(at(LogKind::Missed, 700))),
                false,
                Some(FullWhy::Expired {
                    age_s: 700,
                    window_s: 600,
                }),
            ),
            // A full rebuild's remainder resumes at any age: not expired.
            (
                "old rebuild map",
                Some(Some(at(LogKind::Rebuild, 9000))),
                false,
                None,
            ),
            (
                "map, asked in full",
                Some(Some(at(LogKind::Missed, 1))),
                true,
                Some(FullWhy::Requested),
            ),
        ];
        for (name, map, asked, want) in cases {
            assert_eq!(full_why(map, now, window, asked), want, "{name}");
        }
        assert!(FullWhy::Expired {
            age_s: 700,
            window_s: 600
        }
        .to_string()
        .contains("longer than the partial-rebuild window (600 s)"));
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
            requested: None,
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
        // An operator's request comes first, whatever the backoff or the fault.
        let mut asked = c(3, false, true, true, Some(60));
        asked.requested = Some(false);
        assert_eq!(
            next_rebuild(&[c(1, true, true, true, None), asked], now),
            Some((SlotIndex(3), RebuildKind::Partial))
        );
        asked.requested = Some(true);
        assert_eq!(
            next_rebuild(&[asked], now),
            Some((SlotIndex(3), RebuildKind::Full)),
            "asked in full"
        );
        asked.reachable = false;
        assert_eq!(next_rebuild(&[asked], now), None, "not while unreachable");
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
    fn a_cancelled_rebuild_waits_for_a_request_and_both_are_in_the_history() {
        let (stores, h) = mem_volume(2);
        let ranges = RangeTable::new();
        let n = test_nexus(&h, ranges.clone());
        stores[1].set_fault(Fault::All);
        write(&n, 0, 1 << 20, 3);
        stores[1].set_fault(Fault::None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rebuilds.json");
        let limits = NodeLimits::new(256 * K, 100, 1);
        let cfg = ManagerConfig {
            chunk: ByteLen(64 * K),
            history: Some(path.clone()),
            limits: limits.clone(),
            ..ManagerConfig::default()
        };
        let m = Manager::start(h.clone(), ranges.clone(), cfg.clone()).unwrap();
        let t0 = Instant::now();
        while m.running().is_none() {
            assert!(t0.elapsed() < Duration::from_secs(10), "never started");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(m.cancel(Some(SlotIndex(0))), None, "not the one running");
        assert_eq!(m.cancel(None), Some(SlotIndex(1)));
        while m.running().is_some() || m.history().is_empty() {
            assert!(t0.elapsed() < Duration::from_secs(10), "not cancelled");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(300));
        assert!(m.running().is_none(), "a cancelled replica is left alone");
        let first = &m.history()[0];
        assert_eq!(first.trigger, Trigger::Auto);
        assert!(
            matches!(
                &first.ended,
                Ended::Stopped {
                    reason: FaultReason::RebuildStopped {
                        why: crate::state::RebuildStop::Cancelled
                    },
                    ..
                }
            ),
            "{first:?}"
        );
        limits.set(0, 100, 1);
        m.request(SlotIndex(1), false).unwrap();
        while state(&h, 1) != ReplicaState::Online {
            assert!(t0.elapsed() < Duration::from_secs(20), "not rebuilt");
            std::thread::sleep(Duration::from_millis(5));
        }
        while m.history().len() < 2 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let second = &m.history()[1];
        assert_eq!(second.trigger, Trigger::Operator);
        assert!(matches!(second.ended, Ended::Done { .. }), "{second:?}");
        assert!(
            m.request(SlotIndex(1), false).is_err(),
            "an online replica is not rebuilt"
        );
        drop(m);
        assert_eq!(stores[0].bytes(0, 1 << 20), stores[1].bytes(0, 1 << 20));
        // The history outlives the manager.
        let m = Manager::start(h.clone(), ranges.clone(), cfg).unwrap();
        assert_eq!(m.history().len(), 2);
    }
}
