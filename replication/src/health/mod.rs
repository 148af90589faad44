//! Replica health, shared by every queue of a volume: the one owner of each slot's
//! [`ReplicaState`], of the volume's membership (which replicas hold every
//! acknowledged write) and of the replica set itself.
//!
//! * The data path reads two atomic bitmasks, the **write set** (Online and
//!   Rebuilding slots) and the **read set** (Online slots); the mutex is taken only
//!   to change state.
//! * Everything that changes a state is an event reported here: an I/O result
//!   ([`Health::settle`], [`Health::read_failed`]), a connection lost or back
//!   ([`crate::remote::ConnEvents`]), a slot added, removed or rebuilt. Every
//!   transition is checked with [`ReplicaState::can_become`].
//! * **Fault before ack.** When an online replica is faulted, the membership gets a
//!   new epoch without it, and a write that skipped it is acknowledged only once that
//!   epoch is durable: written into the label of every surviving member (so that no
//!   owner, whatever its state directory says, trusts the faulted replica again) and
//!   into the daemon's record ([`StateSink`]). A persister thread does the writing,
//!   so queue threads never block on it; the requests wait for their ticket.
//! * The last online replica is never faulted: its I/O errors reach the
//!   application, and a lost connection sends it to Connecting, where I/O waits (up
//!   to the no-replica timeout) for it to come back.
//! * **What a faulted replica missed.** A slot that leaves the write set keeps a
//!   [`DirtyMap`]: every mutation acknowledged without it marks its regions there
//!   (in [`Health::settle`], before the ack), so a rebuild copies only those.
//! * The replica set can change while the volume runs ([`Health::add_slot`],
//!   [`Health::remove_slot`]): queues pick up a new [`ReplicaSet`] when its epoch
//!   changes; requests in flight keep the set they started with.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use wire::control::LabelUpdate;
use wire::label::{Label, Membership};

use crate::activity::{ActivityLog, FileAlStore};
use crate::backing::Backing;
use crate::dirty::{DirtyMap, Grain};
use crate::dirty_file::{DirtyFile, DirtyHeader, LogKind, LogOrigin};
use crate::error::{Errno, ReplicationError};
use crate::ids::{ByteLen, ByteOffset, Epoch, Generation, ReplicaUuid, SlotIndex};
use crate::remote::{ConnEvents, Lost};
use crate::state::{FaultReason, IoOp, ReplicaState};
use crate::unflushed::Unflushed;
use crate::wake::{Kick, Signal};

mod conn;
mod persist;

use persist::{open_logs, persister, save_logs};
pub use persist::{LogDir, SavedLogs};

/// What the persister makes durable besides the labels (the daemon's state dir).
pub trait StateSink: Send + Sync {
    fn persist(&self, snapshot: &HealthSnapshot) -> Result<(), ReplicationError>;
}

impl<T: StateSink + ?Sized> StateSink for Arc<T> {
    fn persist(&self, s: &HealthSnapshot) -> Result<(), ReplicationError> {
        (**self).persist(s)
    }
}

/// A sink that keeps nothing (tests, tools).
pub struct NoPersist;

impl StateSink for NoPersist {
    fn persist(&self, _: &HealthSnapshot) -> Result<(), ReplicationError> {
        Ok(())
    }
}

/// One slot as reported and persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotStatus {
    pub slot: SlotIndex,
    pub location: String,
    pub uuid: ReplicaUuid,
    #[serde(flatten)]
    pub state: ReplicaState,
    pub errors: u64,
    pub remote: bool,
    /// Since when and why its dirty map is kept (it lacks what the map marks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogOrigin>,
}

/// Everything the health knows, at one point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSnapshot {
    pub generation: Generation,
    pub membership: Membership,
    /// Slots in index order, without removed ones.
    pub slots: Vec<SlotStatus>,
    pub read_policy: ReadPolicy,
}

/// A slot to create.
pub struct SlotSpec {
    pub location: String,
    pub uuid: ReplicaUuid,
    /// `None` for a faulted replica that could not be opened at all.
    pub backing: Option<Backing>,
    pub remote: bool,
    pub state: ReplicaState,
    pub errors: u64,
    /// What it lacks, when known (a rebuild resumed, or a log kept across a
    /// restart); a replica out of the write set without one needs a full rebuild.
    pub dirty: Option<Log>,
}

/// A replica's dirty map, and since when and why it is kept.
#[derive(Clone)]
pub struct Log {
    pub map: Arc<DirtyMap>,
    pub origin: LogOrigin,
}

/// The backings of the current replica set, index = slot; queues make their
/// per-queue handles from it and keep it while their requests run.
pub struct ReplicaSet {
    pub epoch: u64,
    pub backings: Vec<Option<Backing>>,
    /// Per slot, for remote replicas: what they acknowledged and did not flush.
    pub unflushed: Vec<Option<Arc<Unflushed>>>,
}

/// Volume I/O counters (relaxed atomics: statistics only).
#[derive(Debug, Default)]
pub struct IoStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    /// Requests completed with an error to the application.
    pub errors: AtomicU64,
    /// Requests taken and not completed yet (the queue depth the volume sees).
    pub in_flight: AtomicU64,
    /// Time from taking a request to its completion, per kind.
    pub latency: Latencies,
}

/// Request latency histograms, one per kind of request.
#[derive(Debug, Default)]
pub struct Latencies {
    pub read: crate::latency::Histogram,
    pub write: crate::latency::Histogram,
    pub flush: crate::latency::Histogram,
    /// DISCARD and WRITE_ZEROES.
    pub trim: crate::latency::Histogram,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoStatsSnapshot {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub errors: u64,
    #[serde(default)]
    pub in_flight: u64,
}

impl IoStats {
    pub fn snapshot(&self) -> IoStatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IoStatsSnapshot {
            reads: l(&self.reads),
            writes: l(&self.writes),
            flushes: l(&self.flushes),
            discards: l(&self.discards),
            write_zeroes: l(&self.write_zeroes),
            read_bytes: l(&self.read_bytes),
            write_bytes: l(&self.write_bytes),
            errors: l(&self.errors),
            in_flight: l(&self.in_flight),
        }
    }
}

pub fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// Which online replica serves a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadPolicy {
    /// Round-robin over the online replicas (they are known to be identical).
    Spread,
    /// Always the first online replica: after an unclean shutdown replicas may differ
    /// where writes were in flight, and reads of one block must not flip between
    /// versions. Kept until a resync (rebuild) proves them identical again.
    Primary,
}

/// Trips once, when the volume learns that a newer owner (higher generation) took
/// its replicas. From then on every request fails: two writers must never coexist.
#[derive(Default)]
pub struct Fence {
    /// The volume's name, for the log.
    volume: String,
    reason: std::sync::OnceLock<(Generation, String)>,
    /// Told once when it trips (the volume's thread waits on events, not a timer).
    on_trip: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence")
            .field("reason", &self.reason.get())
            .finish()
    }
}

impl Fence {
    pub fn for_volume(volume: &str) -> Fence {
        Fence {
            volume: volume.to_string(),
            ..Fence::default()
        }
    }

    /// A newer owner, at generation `by`, took the replicas.
    pub fn trip(&self, by: Generation, reason: String) {
        if self.reason.set((by, reason.clone())).is_ok() {
            tracing::error!(volume = %self.volume, %reason, generation = by.0,
                "volume fenced: failing all I/O");
            if let Some(f) = self.on_trip.get() {
                f();
            }
        }
    }

    /// Call `f` when the fence trips (at once if it has); one hook per fence.
    pub fn on_trip(&self, f: Box<dyn Fn() + Send + Sync>) {
        if self.on_trip.set(f).is_ok() && self.is_tripped() {
            // Tripped before the hook was set: `trip` may not have seen it.
            (self.on_trip.get().expect("just set"))();
        }
    }

    /// The newer owner's generation, once tripped.
    pub fn by(&self) -> Option<Generation> {
        self.reason.get().map(|(g, _)| *g)
    }

    pub fn reason(&self) -> Option<&str> {
        self.reason.get().map(|(_, r)| r.as_str())
    }

    pub fn is_tripped(&self) -> bool {
        self.reason.get().is_some()
    }
}

/// The outcome of a mutation, by the ack rule ([`Health::settle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    Ack,
    Fail(Errno),
    /// Acknowledge once [`Health::durable`] for this ticket resolves.
    AwaitDurable(Ticket),
    /// No online replica holds it, but the last one is reconnecting: wait for a
    /// change of the sets, then submit the request again.
    Retry,
}

/// What a request waits for before it is acknowledged: the state version that must
/// be durable, and the persist attempts already started when it asked (one that
/// starts later and fails fails the request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub version: u64,
    pub attempts: u64,
}

/// What to do after a failed read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadVerdict {
    /// Read again (from another replica, or after waiting for one).
    Retry,
    Fail(Errno),
}

struct Slot {
    location: String,
    uuid: ReplicaUuid,
    state: ReplicaState,
    errors: u64,
    remote: bool,
    /// `None` once removed, or when it could not be opened (it is faulted then).
    backing: Option<Backing>,
    /// Faulted since the last persist while reachable: mark its label outdated
    /// (best effort) with the membership it last had.
    outdate: Option<Membership>,
    /// The regions mutated without it since it left the write set.
    dirty: Option<Arc<DirtyMap>>,
    /// Set with `dirty`.
    origin: Option<LogOrigin>,
    /// A remote replica's acknowledged writes not yet flushed.
    unflushed: Option<Arc<Unflushed>>,
    /// The newest membership epoch known to be in its label (written by this run,
    /// or read at activation): a label older than that was rolled back.
    label_epoch: Epoch,
}

struct Inner {
    slots: Vec<Slot>,
    generation: Generation,
    membership: Membership,
    set: Arc<ReplicaSet>,
    /// Earlier sets still held by requests in flight: a removed slot's index is free
    /// again once none of them is alive.
    retired: Vec<Weak<ReplicaSet>>,
    /// Mirrored in `primary_reads` for the data path.
    read_policy: ReadPolicy,
}

/// Configuration of a volume's health.
pub struct HealthConfig {
    /// The activation's generation.
    pub generation: Generation,
    /// The membership written at activation (epoch and members).
    pub membership: Membership,
    /// How long I/O waits for a reconnecting last replica before it fails.
    pub no_replica_timeout: Duration,
    /// Name for the persister thread and logs.
    pub volume: String,
    /// The volume's size, and the region size of its dirty maps.
    pub size: ByteLen,
    pub grain: Grain,
    /// Where the activity log and the dirty maps are saved (the owner's state dir);
    /// `None`: kept in memory only (tests, tools).
    pub logs: Option<LogDir>,
}

pub struct Health {
    write_mask: AtomicU64,
    read_mask: AtomicU64,
    local_mask: AtomicU64,
    connecting_mask: AtomicU64,
    /// Slots with a dirty map (faulted, or rebuilding): a mutation that did not
    /// reach one marks it — also one sent before a rebuilding slot joined the write
    /// set, which the rebuild's barrier waits for.
    logged_mask: AtomicU64,
    set_epoch: AtomicU64,
    /// Bumped for every change that must be durable before a write that depends on
    /// it is acknowledged; `durable` is the newest version persisted. `attempts`
    /// counts the persister's attempts, `failed` is the number of the last one that
    /// failed.
    wanted: AtomicU64,
    durable: AtomicU64,
    attempts: AtomicU64,
    failed: AtomicU64,
    primary_reads: AtomicBool,
    stopping: AtomicBool,
    /// The persister waits for a reconnecting member's label (status shows it).
    awaiting_member: AtomicBool,
    inner: Mutex<Inner>,
    /// The persister sleeps on `persist_wake` under this lock (never while holding
    /// `inner`), so a wake-up given under `inner` or not is never lost.
    persist_mx: Mutex<()>,
    persist_wake: Condvar,
    signal: Arc<Signal>,
    sink: Box<dyn StateSink>,
    fence: Arc<Fence>,
    no_replica_timeout: Duration,
    volume: String,
    size: ByteLen,
    grain: Grain,
    /// Bumped with `wanted` by changes of state (labels and record to write), not
    /// by activity-log commits; `state_durable` is the newest written.
    state_wanted: AtomicU64,
    state_durable: AtomicU64,
    logs: Option<LogDir>,
    al: Option<ActivityLog>,
    dirty_files: Mutex<std::collections::HashMap<ReplicaUuid, DirtyFile>>,
    snapshot_gate: Mutex<()>,
    pub stats: IoStats,
}

/// A mutation's entry in the activity log, left when dropped.
pub struct ActivityGuard<'a> {
    al: &'a ActivityLog,
    offset: ByteOffset,
    len: ByteLen,
}

impl Drop for ActivityGuard<'_> {
    fn drop(&mut self) {
        self.al.leave(self.offset, self.len);
    }
}

/// At most this many slots: states are bitmasks in a `u64`. Configured replicas are
/// far fewer ([`crate::MAX_REPLICAS`]); the rest is room for replacements.
pub const MAX_SLOTS: usize = 64;

impl From<SlotSpec> for Slot {
    fn from(s: SlotSpec) -> Slot {
        Slot {
            location: s.location,
            uuid: s.uuid,
            remote: s.remote,
            state: s.state,
            errors: s.errors,
            backing: s.backing,
            outdate: None,
            origin: s.dirty.as_ref().map(|l| l.origin),
            dirty: s.dirty.map(|l| l.map),
            unflushed: None,
            label_epoch: Epoch(0),
        }
    }
}

/// `slot`, if it may go to `next`.
fn checked<'a>(
    inner: &'a Inner,
    slot: SlotIndex,
    next: &ReplicaState,
) -> Result<&'a Slot, ReplicationError> {
    let s = inner
        .slots
        .get(slot.get())
        .ok_or(ReplicationError::NoSuchSlot(slot))?;
    if !s.state.can_become(next) {
        return Err(ReplicationError::Transition {
            replica: s.location.clone(),
            from: s.state.name(),
            to: next.name(),
        });
    }
    Ok(s)
}

fn mask_of(slots: &[Slot], f: impl Fn(&Slot) -> bool) -> u64 {
    slots
        .iter()
        .enumerate()
        .filter(|(_, s)| f(s))
        .fold(0, |m, (i, _)| m | 1 << i)
}

/// Whether a slot outside `except` is Online, by the lock's view.
fn online_besides(inner: &Inner, except: u64) -> bool {
    inner
        .slots
        .iter()
        .enumerate()
        .any(|(i, s)| except & (1 << i) == 0 && s.state == ReplicaState::Online)
}

impl Health {
    /// `slots` in slot order; at least one must be Online (activation guarantees it).
    pub fn new(
        cfg: HealthConfig,
        slots: Vec<SlotSpec>,
        sink: Box<dyn StateSink>,
    ) -> Result<Arc<Health>, ReplicationError> {
        assert!(
            !slots.is_empty() && slots.len() <= MAX_SLOTS,
            "1..={MAX_SLOTS} slots"
        );
        if !slots
            .iter()
            .any(|s| s.state == ReplicaState::Online && s.backing.is_some())
        {
            return Err(ReplicationError::NoOnlineReplica);
        }
        for s in &slots {
            assert!(
                s.backing.is_some() || !s.state.in_write_set(),
                "replica {} takes I/O but has no backing",
                s.location
            );
        }
        let mut slots: Vec<Slot> = slots.into_iter().map(Slot::from).collect();
        for s in slots.iter_mut().filter(|s| s.remote) {
            s.unflushed = Some(Arc::new(Unflushed::new(cfg.size)));
        }
        // Activation wrote the membership into every member's label.
        for s in slots.iter_mut().filter(|s| cfg.membership.contains(s.uuid)) {
            s.label_epoch = cfg.membership.epoch;
        }
        let al = match &cfg.logs {
            Some(logs) => Some(open_logs(logs, cfg.size, &slots)?),
            None => None,
        };
        let set = Arc::new(ReplicaSet {
            epoch: 1,
            backings: slots.iter().map(|s| s.backing.clone()).collect(),
            unflushed: slots.iter().map(|s| s.unflushed.clone()).collect(),
        });
        let h = Arc::new(Health {
            write_mask: AtomicU64::new(0),
            read_mask: AtomicU64::new(0),
            local_mask: AtomicU64::new(0),
            connecting_mask: AtomicU64::new(0),
            logged_mask: AtomicU64::new(0),
            set_epoch: AtomicU64::new(1),
            wanted: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            primary_reads: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            awaiting_member: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                slots,
                generation: cfg.generation,
                membership: cfg.membership,
                set,
                retired: Vec::new(),
                read_policy: ReadPolicy::Spread,
            }),
            persist_mx: Mutex::new(()),
            persist_wake: Condvar::new(),
            signal: Signal::new(),
            sink,
            fence: Arc::new(Fence::for_volume(&cfg.volume)),
            no_replica_timeout: cfg.no_replica_timeout,
            volume: cfg.volume,
            size: cfg.size,
            grain: cfg.grain.check()?,
            state_wanted: AtomicU64::new(0),
            state_durable: AtomicU64::new(0),
            logs: cfg.logs,
            al,
            dirty_files: Mutex::default(),
            snapshot_gate: Mutex::new(()),
            stats: IoStats::default(),
        });
        h.publish_masks(&h.inner.lock().unwrap());
        let weak = Arc::downgrade(&h);
        std::thread::Builder::new()
            .name(format!("persist-{}", h.volume))
            .spawn(move || persister(weak))
            .map_err(|e| ReplicationError::Persist(format!("start the persister thread: {e}")))?;
        Ok(h)
    }

    fn publish_masks(&self, inner: &Inner) {
        let s = &inner.slots;
        self.local_mask.store(
            mask_of(s, |x| !x.remote && x.backing.is_some()),
            Ordering::Release,
        );
        self.connecting_mask.store(
            mask_of(s, |x| x.state == ReplicaState::Connecting),
            Ordering::Release,
        );
        // Before the write mask: a request that no longer sends to a slot finds its
        // map when it settles. A rebuilding slot stays logged: a request that started
        // before it took writes (and so skipped it) must mark what it lacks.
        self.logged_mask
            .store(mask_of(s, |x| x.dirty.is_some()), Ordering::SeqCst);
        self.read_mask
            .store(mask_of(s, |x| x.state.in_read_set()), Ordering::Release);
        self.write_mask
            .store(mask_of(s, |x| x.state.in_write_set()), Ordering::Release);
        self.signal.notify();
    }

    pub fn fence(&self) -> &Arc<Fence> {
        &self.fence
    }

    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// Bitmask of slots that take writes.
    pub fn write_mask(&self) -> u64 {
        self.write_mask.load(Ordering::Acquire)
    }

    /// Bitmask of slots that take reads (and hold every acknowledged write).
    pub fn read_mask(&self) -> u64 {
        self.read_mask.load(Ordering::Acquire)
    }

    /// Bitmask of local slots (reads prefer them).
    pub fn local_mask(&self) -> u64 {
        self.local_mask.load(Ordering::Acquire)
    }

    /// No replica takes reads, but one that may hold the data is reconnecting:
    /// I/O waits for it.
    pub fn waiting(&self) -> bool {
        self.read_mask() == 0 && self.connecting_mask.load(Ordering::Acquire) != 0
    }

    /// A membership change is not durable yet because the member it must reach
    /// first is reconnecting: the writes that depend on it wait for that member.
    pub fn awaits_member(&self) -> bool {
        self.awaiting_member.load(Ordering::Acquire)
    }

    pub fn no_replica_timeout(&self) -> Duration {
        self.no_replica_timeout
    }

    /// Epoch of the replica set; changes when a slot is added or removed.
    pub fn set_epoch(&self) -> u64 {
        self.set_epoch.load(Ordering::Acquire)
    }

    pub fn replica_set(&self) -> Arc<ReplicaSet> {
        self.inner.lock().unwrap().set.clone()
    }

    pub fn signal(&self) -> &Arc<Signal> {
        &self.signal
    }

    /// Resolves when any state changes (or at `deadline`, with `false`).
    pub fn changed(
        &self,
        since: u64,
        deadline: Option<Instant>,
        kick: Option<Arc<dyn Kick>>,
    ) -> crate::wake::Changed {
        self.signal.changed(since, deadline, kick)
    }

    /// Set the read policy; a change is persisted (with the next state persist).
    pub fn set_read_policy(&self, p: ReadPolicy) {
        let mut inner = self.inner.lock().unwrap();
        self.primary_reads
            .store(p == ReadPolicy::Primary, Ordering::Release);
        if inner.read_policy != p {
            inner.read_policy = p;
            self.want_persist();
        }
    }

    /// Fault online or rebuilding `slot` for `reason`, and mark `missing` in its
    /// map too: regions it has not got although no mutation skipped it (a resync
    /// that could not write them). Durable on return.
    pub fn fault_missing(
        &self,
        slot: SlotIndex,
        reason: FaultReason,
        missing: &[(ByteOffset, ByteLen)],
    ) -> Result<(), ReplicationError> {
        let mut inner = self.inner.lock().unwrap();
        let next = ReplicaState::Faulted { reason };
        checked(&inner, slot, &next)?;
        self.transition(&mut inner, slot.get(), next);
        if let Some(m) = &inner.slots[slot.get()].dirty {
            for (offset, len) in missing {
                m.mark(*offset, *len);
            }
        }
        self.commit(inner, "the fault")
    }

    pub fn read_policy(&self) -> ReadPolicy {
        if self.primary_reads.load(Ordering::Acquire) {
            ReadPolicy::Primary
        } else {
            ReadPolicy::Spread
        }
    }

    pub fn snapshot(&self) -> HealthSnapshot {
        snapshot_of(&self.inner.lock().unwrap())
    }

    /// Every slot online (Live), or not (Degraded).
    pub fn all_online(&self) -> bool {
        let inner = self.inner.lock().unwrap();
        inner
            .slots
            .iter()
            .filter(|s| s.state != ReplicaState::Removed)
            .all(|s| s.state == ReplicaState::Online)
    }

    /// Whether every change so far is durable.
    pub fn is_durable(&self) -> bool {
        self.durable.load(Ordering::Acquire) >= self.wanted.load(Ordering::Acquire)
    }

    fn ticket(&self) -> Settle {
        let version = self.wanted.load(Ordering::Acquire);
        if self.durable.load(Ordering::Acquire) >= version {
            Settle::Ack
        } else {
            Settle::AwaitDurable(Ticket {
                version,
                attempts: self.attempts.load(Ordering::Acquire),
            })
        }
    }

    /// The ticket for everything so far.
    fn ticket_now(&self) -> Ticket {
        Ticket {
            version: self.wanted.load(Ordering::Acquire),
            attempts: self.attempts.load(Ordering::Acquire),
        }
    }

    /// Resolves once everything up to `ticket` is durable; fails (EIO) if a persist
    /// attempt started after the ticket was taken failed.
    pub async fn durable(&self, ticket: Ticket, kick: Option<Arc<dyn Kick>>) -> Result<(), Errno> {
        loop {
            let v = self.signal.version();
            if self.durable.load(Ordering::Acquire) >= ticket.version {
                return Ok(());
            }
            if self.failed.load(Ordering::Acquire) > ticket.attempts {
                return Err(Errno::EIO);
            }
            self.signal.changed(v, None, kick.clone()).await;
        }
    }

    /// Record a change of state that must be durable; wakes the persister.
    fn want_persist(&self) {
        let v = self.wanted.fetch_add(1, Ordering::AcqRel) + 1;
        self.state_wanted.fetch_max(v, Ordering::AcqRel);
        self.wake_persister();
    }

    /// Wake the persister: after the change it must see (the lock orders the two).
    pub(super) fn wake_persister(&self) {
        drop(self.persist_mx.lock().unwrap());
        self.persist_wake.notify_all();
    }

    /// Ask for an activity-log commit; the ticket is durable once it is done.
    pub fn want_log(&self) -> Ticket {
        self.wanted.fetch_add(1, Ordering::AcqRel);
        self.wake_persister();
        self.ticket_now()
    }

    /// The owner's dir of this volume's logs, when they are kept.
    pub fn log_dir(&self) -> Option<&std::path::Path> {
        self.logs.as_ref().map(|l| l.dir.as_path())
    }

    /// The volume's activity log, when its logs are kept.
    pub fn activity(&self) -> Option<&ActivityLog> {
        self.al.as_ref()
    }

    /// Enter `[offset, offset + len)` in the activity log: at once when its extents
    /// are hot, else after the next commit. Left when the guard drops (after the
    /// mutation settled, so its dirty marks are made).
    pub async fn enter_activity(
        &self,
        offset: ByteOffset,
        len: ByteLen,
        kick: Option<Arc<dyn Kick>>,
    ) -> Result<Option<ActivityGuard<'_>>, Errno> {
        let Some(al) = self.activity() else {
            return Ok(None);
        };
        let entry = al.enter(offset, len);
        let guard = ActivityGuard { al, offset, len };
        if let crate::activity::Entry::Wait(_) = entry {
            let ticket = self.want_log();
            self.durable(ticket, kick).await?;
        }
        Ok(Some(guard))
    }

    /// Move `slot` to `next`, checked. Returns whether the membership changed: a
    /// member stays one while Online or Connecting (reconnecting, it may hold the
    /// only current copy); a rebuilt replica becomes one when it goes Online.
    fn transition(&self, inner: &mut Inner, slot: usize, next: ReplicaState) -> bool {
        let s = &inner.slots[slot];
        assert!(
            s.state.can_become(&next),
            "volume {}: replica {} cannot go from {:?} to {next:?}",
            self.volume,
            s.location,
            s.state
        );
        match &next {
            ReplicaState::Faulted { reason } => {
                tracing::error!(volume = %self.volume, replica = %s.location, %reason, "replica faulted")
            }
            n => {
                tracing::info!(volume = %self.volume, replica = %s.location, state = n.name(), "replica state")
            }
        }
        let uuid = s.uuid;
        // A Connecting member was in the write set until its connection dropped, and
        // nothing was acknowledged since (no replica was online): from here on,
        // what it misses is logged like for a replica faulted while online.
        let member_now = inner.membership.contains(uuid);
        let leaves_write_set = (s.state.in_write_set()
            || (s.state == ReplicaState::Connecting && member_now))
            && !next.in_write_set();
        let member_next = match next {
            ReplicaState::Online => true,
            ReplicaState::Connecting => member_now,
            _ => false,
        };
        if member_now && !member_next && matches!(next, ReplicaState::Faulted { .. }) {
            inner.slots[slot].outdate = Some(inner.membership.clone());
        }
        let s = &mut inner.slots[slot];
        match next {
            // From now on, what it misses is logged. A rebuilding replica keeps the
            // map of what it still lacks.
            ReplicaState::Faulted { .. } if leaves_write_set && s.dirty.is_none() => {
                s.dirty = DirtyMap::new(self.size, self.grain).ok().map(Arc::new);
                s.origin = Some(LogOrigin::now(LogKind::Missed, inner.membership.epoch));
            }
            _ => {}
        }
        // What it acknowledged without flushing may be gone with its server's cache
        // (also what completed before and is marked only now: sealed).
        if let Some(u) = &s.unflushed {
            match (&next, leaves_write_set, &s.dirty) {
                (ReplicaState::Faulted { .. }, true, Some(m)) => u.seal(m),
                _ if next.in_write_set() => u.unseal(),
                _ => {}
            }
        }
        match next {
            ReplicaState::Online | ReplicaState::Removed => {
                s.dirty = None;
                s.origin = None;
            }
            _ => {}
        }
        inner.slots[slot].state = next;
        if member_now == member_next {
            return false;
        }
        let m = &mut inner.membership;
        m.members.retain(|u| *u != uuid);
        if member_next {
            m.members.push(uuid);
        }
        m.epoch = m.epoch.next();
        m.generation = inner.generation;
        true
    }

    /// **A slot is Connecting only while no slot is Online**
    /// ([`crate::ack::unawaited`]): once a replica is online again (the first of
    /// several back, a rebuild done), the others waited for leave the membership,
    /// with a map of what they miss, before any write is acknowledged without them
    /// (the caller persists when this returns `true`). Otherwise the second one back
    /// would come Online without the writes the first took alone.
    fn fault_unawaited(&self, inner: &mut Inner) -> bool {
        let waiting = crate::ack::unawaited(inner.slots.iter().map(|s| &s.state));
        for &i in &waiting {
            let reason = FaultReason::ConnectionLost;
            self.transition(inner, i, ReplicaState::Faulted { reason });
        }
        !waiting.is_empty()
    }

    /// THE ACK RULE ([`crate::ack::ack_rule`], where it is stated and tested
    /// exhaustively) for a mutation sent to the slots in `attempted`, of which those
    /// in `failures` failed, applied to the slots as they are under the lock:
    ///
    /// * acknowledged once durable if a slot that took it is still online;
    ///   every failed slot of the write set is faulted first (a new membership
    ///   epoch, durable before the ack);
    /// * otherwise it fails (first error), and no replica is faulted for a media
    ///   error — the data reached no replica that stays in the set, so the
    ///   application must know, and the last good copy is never thrown away;
    ///   except when the online replicas lost their connection: they go to
    ///   Connecting and the request is retried once one is back (or times out).
    ///
    /// A fenced volume acknowledges nothing (a newer owner took the replicas).
    pub fn settle(
        &self,
        attempted: u64,
        failures: &[(SlotIndex, Errno)],
        op: IoOp,
        range: Option<(ByteOffset, ByteLen)>,
    ) -> Settle {
        if self.fence.is_tripped() {
            return Settle::Fail(Errno::EIO);
        }
        // The common case, without the lock: every slot took it and one of them
        // still holds it (the rule's answer then is Ack, nothing moves).
        let holders = self.read_mask() | self.connecting_mask.load(Ordering::Acquire);
        if failures.is_empty() && attempted & holders != 0 {
            self.log_missed(attempted, range);
            return self.ticket();
        }
        let mut inner = self.inner.lock().unwrap();
        let failed = failures.iter().fold(0u64, |m, (i, _)| m | 1 << i.get());
        let views: Vec<crate::ack::SlotView> = inner
            .slots
            .iter()
            .map(|s| crate::ack::SlotView {
                state: s.state.clone(),
                remote: s.remote,
            })
            .collect();
        let mut outcomes = vec![crate::ack::Outcome::NotSent; views.len()];
        for i in indices(attempted & !failed) {
            outcomes[i.get()] = crate::ack::Outcome::Took;
        }
        for (slot, errno) in failures {
            outcomes[slot.get()] = crate::ack::Outcome::Failed(*errno);
            inner.slots[slot.get()].errors += 1;
        }
        let verdict = crate::ack::ack_rule(&views, &outcomes, op);
        let mut record = false;
        for (i, to) in verdict.moves {
            record |= matches!(to, ReplicaState::Faulted { .. });
            record |= self.transition(&mut inner, i, to);
        }
        self.publish_masks(&inner);
        if record {
            self.want_persist();
        }
        drop(inner);
        match verdict.answer {
            crate::ack::Answer::Ack => {
                self.log_missed(attempted & !failed, range);
                self.ticket()
            }
            // What a rebuilding target (or any logged slot) took of a request that
            // fails, the online replicas may not hold: its copy must be redone.
            crate::ack::Answer::Fail(e) => {
                self.log_missed(0, range);
                Settle::Fail(e)
            }
            crate::ack::Answer::Retry => {
                self.log_missed(0, range);
                Settle::Retry
            }
        }
    }

    /// Data written into `[offset, offset + len)` outside the application path (a
    /// repair) reached only the slots in `took_it`: every replica with a dirty map
    /// that it skipped (rebuilding, faulted) now lacks the region.
    pub fn mark_missed(&self, took_it: u64, offset: ByteOffset, len: ByteLen) {
        self.log_missed(took_it, Some((offset, len)));
    }

    /// Mark the range of a mutation that reached only the slots in `took_it` in
    /// the dirty map of every logged slot it skipped.
    fn log_missed(&self, took_it: u64, range: Option<(ByteOffset, ByteLen)>) {
        if cfg!(feature = "bench-no-dirty-log") {
            return;
        }
        let missed = self.logged_mask.load(Ordering::SeqCst) & !took_it;
        let Some((offset, len)) = range.filter(|_| missed != 0) else {
            return;
        };
        let inner = self.inner.lock().unwrap();
        for i in indices(missed) {
            if let Some(m) = &inner.slots[i.get()].dirty {
                m.mark(offset, len);
            }
        }
    }

    /// `attempted` without the rebuilding slots that still lack part of `range`.
    ///
    /// Such a slot need not take the mutation: its map keeps the range marked
    /// (the mutation's settle marks what it skipped), and the copier copies the
    /// region from a source that holds this mutation, after it — the copy takes
    /// the range in the range table, which the caller holds until it settles, and
    /// only the copier clears marks, under that lock. So a rebuilding target takes
    /// application writes only where it is already whole, and a full rebuild does
    /// not cost the application a third replica's writes for regions not yet
    /// copied (they would be overwritten by the copy anyway). A mutation that
    /// straddles copied and uncopied regions skips it too; the copied part is
    /// copied again.
    pub fn skip_uncopied(&self, attempted: u64, range: Option<(ByteOffset, ByteLen)>) -> u64 {
        let logged = attempted & self.logged_mask.load(Ordering::SeqCst);
        let Some((offset, len)) = range.filter(|_| logged != 0) else {
            return attempted;
        };
        let inner = self.inner.lock().unwrap();
        let mut out = attempted;
        for i in indices(logged) {
            let s = &inner.slots[i.get()];
            if !matches!(s.state, ReplicaState::Rebuilding { .. }) {
                continue;
            }
            if s.dirty.as_ref().is_some_and(|m| m.any(offset, len)) {
                out &= !(1 << i.get());
            }
        }
        out
    }

    /// Put faulted `slot` into the write set to be rebuilt. Returns what it lacks,
    /// which the rebuild copies: the regions its dirty map marks for a partial
    /// rebuild (it must have one), every region for a full one. Durable on return.
    pub fn begin_rebuild(
        &self,
        slot: SlotIndex,
        kind: crate::state::RebuildKind,
    ) -> Result<Arc<DirtyMap>, ReplicationError> {
        use crate::state::RebuildKind;
        let mut inner = self.inner.lock().unwrap();
        let epoch = inner.membership.epoch;
        let s = inner
            .slots
            .get_mut(slot.get())
            .ok_or(ReplicationError::NoSuchSlot(slot))?;
        let next = ReplicaState::Rebuilding { kind };
        if !s.state.can_become(&next) || s.backing.is_none() {
            return Err(ReplicationError::Transition {
                replica: s.location.clone(),
                from: s.state.name(),
                to: next.name(),
            });
        }
        let map = match (kind, &s.dirty) {
            (RebuildKind::Partial, Some(m)) => m.clone(),
            (RebuildKind::Partial, None) => {
                return Err(ReplicationError::NoDirtyLog(s.location.clone()))
            }
            (RebuildKind::Full, _) => {
                s.origin = Some(LogOrigin::now(LogKind::Rebuild, epoch));
                Arc::new(DirtyMap::full(self.size, self.grain)?)
            }
        };
        s.dirty = Some(map.clone());
        self.transition(&mut inner, slot.get(), next);
        self.commit(inner, "the rebuild's start")?;
        Ok(map)
    }

    /// Publish a change made under `inner` and wait until it is durable.
    fn commit(
        &self,
        inner: std::sync::MutexGuard<'_, Inner>,
        what: &str,
    ) -> Result<(), ReplicationError> {
        self.publish_masks(&inner);
        self.want_persist();
        let ticket = self.ticket_now();
        drop(inner);
        futures::executor::block_on(self.durable(ticket, None))
            .map_err(|_| ReplicationError::Persist(format!("{what} could not be made durable")))
    }

    /// End `slot`'s rebuild: `Ok` when its map is clean (it joins the read set and
    /// the membership), or back to Faulted with `why`, keeping what it still lacks.
    /// Durable on return.
    pub fn end_rebuild(
        &self,
        slot: SlotIndex,
        outcome: Result<(), FaultReason>,
    ) -> Result<(), ReplicationError> {
        let mut inner = self.inner.lock().unwrap();
        let s = inner
            .slots
            .get(slot.get())
            .ok_or(ReplicationError::NoSuchSlot(slot))?;
        let next = match outcome {
            Ok(()) => ReplicaState::Online,
            Err(reason) => ReplicaState::Faulted { reason },
        };
        if !matches!(s.state, ReplicaState::Rebuilding { .. }) {
            return Err(ReplicationError::Transition {
                replica: s.location.clone(),
                from: s.state.name(),
                to: next.name(),
            });
        }
        if next == ReplicaState::Online && s.dirty.as_ref().is_some_and(|m| !m.is_clean()) {
            return Err(ReplicationError::NotRebuilt(s.location.clone()));
        }
        self.transition(&mut inner, slot.get(), next);
        self.fault_unawaited(&mut inner);
        self.commit(inner, "the rebuild's end")
    }

    /// The backing of `slot`, while it has one.
    pub fn backing(&self, slot: SlotIndex) -> Option<Backing> {
        self.inner
            .lock()
            .unwrap()
            .slots
            .get(slot.get())?
            .backing
            .clone()
    }

    /// Held by a snapshot's barrier, and by a rebuild from its last look at the
    /// volume's snapshots until its target takes writes: no snapshot is taken
    /// in between that the target would miss.
    pub fn snapshot_gate(&self) -> std::sync::MutexGuard<'_, ()> {
        self.snapshot_gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Application requests served so far (a rebuild yields while it grows).
    pub fn app_requests(&self) -> u64 {
        let s = &self.stats;
        [
            &s.reads,
            &s.writes,
            &s.flushes,
            &s.discards,
            &s.write_zeroes,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }

    /// What a remote replica acknowledged and has not flushed (`None`: local).
    pub fn unflushed(&self, slot: SlotIndex) -> Option<Arc<Unflushed>> {
        let inner = self.inner.lock().unwrap();
        inner.slots.get(slot.get())?.unflushed.clone()
    }

    /// The dirty map of `slot`: what it lacks (`None`: unknown, or nothing).
    pub fn dirty_map(&self, slot: SlotIndex) -> Option<Arc<DirtyMap>> {
        let inner = self.inner.lock().unwrap();
        inner.slots.get(slot.get())?.dirty.clone()
    }

    pub fn size(&self) -> ByteLen {
        self.size
    }

    pub fn grain(&self) -> Grain {
        self.grain
    }

    /// A read from `slot` failed with `errno`.
    pub fn read_failed(&self, slot: SlotIndex, errno: Errno) -> ReadVerdict {
        if self.fence.is_tripped() {
            return ReadVerdict::Fail(Errno::EIO);
        }
        let mut inner = self.inner.lock().unwrap();
        let i = slot.get();
        inner.slots[i].errors += 1;
        if inner.slots[i].state != ReplicaState::Online {
            return ReadVerdict::Retry; // someone faulted it meanwhile
        }
        let others = self.read_mask() & !(1 << i);
        if others != 0 {
            let reason = FaultReason::of_errno(IoOp::Read, errno);
            self.transition(&mut inner, i, ReplicaState::Faulted { reason });
            self.want_persist();
        } else if crate::ack::lost_connection(inner.slots[i].remote, errno) {
            self.transition(&mut inner, i, ReplicaState::Connecting);
        } else {
            return ReadVerdict::Fail(errno);
        }
        self.publish_masks(&inner);
        ReadVerdict::Retry
    }

    /// Move `slot` to `next` (rebuild start/finish, operator actions); the change is
    /// durable when this returns.
    pub fn set_state(&self, slot: SlotIndex, next: ReplicaState) -> Result<(), ReplicationError> {
        let mut inner = self.inner.lock().unwrap();
        let s = checked(&inner, slot, &next)?;
        if s.state == ReplicaState::Online
            && self.read_mask() & !(1 << slot.get()) == 0
            && next != ReplicaState::Connecting
        {
            return Err(ReplicationError::LastOnline(s.location.clone()));
        }
        self.transition(&mut inner, slot.get(), next);
        self.fault_unawaited(&mut inner);
        self.commit(inner, "the change")
    }

    /// Add a slot to the running set (the rebuild and HA steps add a replacement as
    /// Rebuilding, or as Faulted until its rebuild starts). Returns its index.
    pub fn add_slot(&self, spec: SlotSpec) -> Result<SlotIndex, ReplicationError> {
        if spec.state.in_read_set() || (spec.backing.is_none() && spec.state.in_write_set()) {
            // Only a rebuild makes a replica current.
            return Err(ReplicationError::Transition {
                replica: spec.location,
                from: "new",
                to: spec.state.name(),
            });
        }
        let mut inner = self.inner.lock().unwrap();
        inner.retired.retain(|w| w.strong_count() > 0);
        let busy = |i: usize, inner: &Inner| {
            inner.retired.iter().any(|w| {
                w.upgrade()
                    .is_some_and(|set| set.backings.get(i).is_some_and(Option::is_some))
            })
        };
        let free = (0..inner.slots.len())
            .find(|&i| inner.slots[i].state == ReplicaState::Removed && !busy(i, &inner));
        let mut slot = Slot::from(spec);
        if slot.remote {
            slot.unflushed = Some(Arc::new(Unflushed::new(self.size)));
        }
        let i = match free {
            Some(i) => {
                inner.slots[i] = slot;
                i
            }
            None if inner.slots.len() < MAX_SLOTS => {
                inner.slots.push(slot);
                inner.slots.len() - 1
            }
            None => return Err(ReplicationError::TooManySlots),
        };
        self.publish_set(&mut inner);
        self.publish_masks(&inner);
        self.want_persist();
        Ok(SlotIndex(i as u8))
    }

    /// Give faulted `slot`, which could not be opened at activation, its backing
    /// now that it can (a remote replica reachable again): it can be rebuilt.
    pub fn attach_backing(
        &self,
        slot: SlotIndex,
        backing: Backing,
    ) -> Result<(), ReplicationError> {
        let mut inner = self.inner.lock().unwrap();
        let s = inner
            .slots
            .get_mut(slot.get())
            .ok_or(ReplicationError::NoSuchSlot(slot))?;
        if !matches!(s.state, ReplicaState::Faulted { .. }) || s.backing.is_some() {
            return Err(ReplicationError::Transition {
                replica: s.location.clone(),
                from: s.state.name(),
                to: "attached",
            });
        }
        s.backing = Some(backing);
        self.publish_set(&mut inner);
        self.publish_masks(&inner);
        drop(inner);
        self.signal.notify();
        Ok(())
    }

    /// Slots without a backing (faulted, not opened), with their location.
    pub fn unopened(&self) -> Vec<(SlotIndex, String)> {
        let inner = self.inner.lock().unwrap();
        inner
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.backing.is_none() && matches!(s.state, ReplicaState::Faulted { .. }))
            .map(|(i, s)| (SlotIndex(i as u8), s.location.clone()))
            .collect()
    }

    /// Take `slot` out of the set. The last online replica cannot be removed.
    pub fn remove_slot(&self, slot: SlotIndex) -> Result<(), ReplicationError> {
        let mut inner = self.inner.lock().unwrap();
        let i = slot.get();
        let s = inner
            .slots
            .get(i)
            .filter(|s| s.state != ReplicaState::Removed)
            .ok_or(ReplicationError::NoSuchSlot(slot))?;
        // The last replica holding every acknowledged write stays, Online or
        // waited for as Connecting: the membership must never become empty.
        let current = |x: &Slot| matches!(x.state, ReplicaState::Online | ReplicaState::Connecting);
        let others = inner
            .slots
            .iter()
            .enumerate()
            .any(|(j, x)| j != i && current(x));
        if current(s) && !others {
            return Err(ReplicationError::LastOnline(s.location.clone()));
        }
        self.transition(&mut inner, i, ReplicaState::Removed);
        if let Some(b) = inner.slots[i].backing.take() {
            b.retire();
        }
        self.publish_set(&mut inner);
        self.commit(inner, "the removal")
    }

    /// Publish a new replica set (epoch + 1); the old one lives on while requests
    /// hold it.
    fn publish_set(&self, inner: &mut Inner) {
        let epoch = inner.set.epoch + 1;
        let old = std::mem::replace(
            &mut inner.set,
            Arc::new(ReplicaSet {
                epoch,
                backings: inner.slots.iter().map(|s| s.backing.clone()).collect(),
                unflushed: inner.slots.iter().map(|s| s.unflushed.clone()).collect(),
            }),
        );
        inner.retired.push(Arc::downgrade(&old));
        self.set_epoch.store(epoch, Ordering::Release);
    }

    /// Stop the persister (after the last I/O): a final persist runs first. Later
    /// connection events change nothing.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.wake_persister();
        // The last marks reach the saved maps: a clean stop loses none (a crash is
        // covered by the activity log instead).
        if let Err(e) = save_logs(self) {
            tracing::warn!(volume = %self.volume, error = %e, "cannot save the dirty logs at stop");
        }
    }

    /// Flush every write-set replica (clean stop). Returns the ones that failed.
    pub fn sync_all(&self) -> Vec<(String, Errno)> {
        let members: Vec<(String, Backing)> = {
            let inner = self.inner.lock().unwrap();
            inner
                .slots
                .iter()
                .filter(|s| s.state.in_write_set())
                .filter_map(|s| Some((s.location.clone(), s.backing.clone()?)))
                .collect()
        };
        members
            .into_iter()
            .filter_map(|(loc, b)| b.sync().err().map(|e| (loc, e)))
            .collect()
    }
}

fn snapshot_of(inner: &Inner) -> HealthSnapshot {
    HealthSnapshot {
        generation: inner.generation,
        membership: inner.membership.clone(),
        read_policy: inner.read_policy,
        slots: inner
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state != ReplicaState::Removed)
            .map(|(i, s)| SlotStatus {
                slot: SlotIndex(i as u8),
                location: s.location.clone(),
                uuid: s.uuid,
                state: s.state.clone(),
                errors: s.errors,
                remote: s.remote,
                log: s.origin,
            })
            .collect(),
    }
}

/// Iterate the indices of set bits.
pub fn indices(mut mask: u64) -> impl Iterator<Item = SlotIndex> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let i = mask.trailing_zeros();
        mask &= mask - 1;
        Some(SlotIndex(i as u8))
    })
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("volume", &self.volume)
            .field("write_mask", &self.write_mask())
            .field("read_mask", &self.read_mask())
            .finish()
    }
}

/// The membership epoch of `m` advanced by one (what activation writes).
pub fn next_epoch(m: &Membership) -> Epoch {
    m.epoch.next()
}

#[cfg(test)]
mod tests;
