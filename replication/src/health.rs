//! Replica health, shared by every queue of a volume.
//!
//! ## Replica state machine
//! ```text
//!   Online ──(I/O error, and another replica took the I/O)──▶ Faulted
//!   Faulted ──(rebuild completes: a later issue)───────────▶ Online
//! ```
//! The last replica holding acknowledged data is never faulted: its errors go to
//! the application instead. A fault is persisted (through [`StateSink`]) before
//! any I/O that skipped the faulted replica is acknowledged, so a restarted daemon
//! never trusts a replica that missed writes.
//!
//! The fast path reads one atomic bitmask of healthy replicas; the mutex is taken
//! only to change state.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{Errno, ReplicationError};
use crate::ids::ReplicaIndex;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    /// In the read and write set.
    Online,
    /// Out of the read and write set; holds stale data until rebuilt.
    Faulted,
}

impl ReplicaState {
    /// The transitions the state machine allows.
    pub fn can_become(self, next: ReplicaState) -> bool {
        matches!(
            (self, next),
            (ReplicaState::Online, ReplicaState::Faulted)
                | (ReplicaState::Faulted, ReplicaState::Online)
        )
    }
}

/// Volume state as users see it.
///
/// ```text
///   Stopped ─▶ Starting ─▶ Live ◀─▶ Degraded
///      ▲          │          │          │
///      │          ▼          ▼          ▼
///      └──────── Failed    Stopping ◀───┘ ─▶ Stopped
///   Starting ─▶ Recovering (found our QUIESCED device) ─▶ Live | Degraded | Failed
///   Starting | Recovering | Live | Degraded | Stopping ─▶ Fenced ─▶ Starting | Stopped
/// ```
/// Live and Degraded are derived from replica health; the others are lifecycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    #[default]
    Stopped,
    Starting,
    Recovering,
    /// Serving, every replica online.
    Live,
    /// Serving with at least one replica faulted.
    Degraded,
    Stopping,
    /// Could not start or lost its device; see the reason in status.
    Failed,
    /// A newer owner (higher generation) took the replicas: I/O fails and the
    /// device is removed. Restart the volume only once that owner is gone.
    Fenced,
}

impl VolumeState {
    pub fn can_become(self, next: VolumeState) -> bool {
        use VolumeState::*;
        matches!(
            (self, next),
            (Stopped, Starting)
                | (Stopped, Recovering)
                | (Starting, Recovering)
                | (Starting | Recovering, Live | Degraded | Failed | Stopping)
                | (Live, Degraded)
                | (Degraded, Live)
                | (Live | Degraded, Stopping | Failed)
                | (Stopping, Stopped | Failed)
                | (Failed, Starting | Recovering | Stopped)
                | (Starting | Recovering | Live | Degraded | Stopping, Fenced)
                | (Fenced, Starting | Stopped)
        )
    }

    pub fn is_serving(self) -> bool {
        matches!(self, VolumeState::Live | VolumeState::Degraded)
    }
}

/// One replica's health record: what is persisted and reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaHealth {
    pub location: String,
    pub state: ReplicaState,
    /// Why it was faulted (last error), for operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default)]
    pub errors: u64,
}

/// Where health changes are made durable (the daemon's state dir, later etcd).
pub trait StateSink: Send + Sync {
    fn persist(&self, replicas: &[ReplicaHealth]) -> Result<(), ReplicationError>;
}

impl<T: StateSink + ?Sized> StateSink for std::sync::Arc<T> {
    fn persist(&self, replicas: &[ReplicaHealth]) -> Result<(), ReplicationError> {
        (**self).persist(replicas)
    }
}

/// A sink that keeps nothing (tests, tools).
pub struct NoPersist;

impl StateSink for NoPersist {
    fn persist(&self, _: &[ReplicaHealth]) -> Result<(), ReplicationError> {
        Ok(())
    }
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
#[derive(Debug, Default)]
pub struct Fence {
    reason: std::sync::OnceLock<String>,
}

impl Fence {
    pub fn trip(&self, reason: String) {
        if self.reason.set(reason.clone()).is_ok() {
            tracing::error!(%reason, "volume fenced: failing all I/O");
        }
    }

    pub fn reason(&self) -> Option<&str> {
        self.reason.get().map(String::as_str)
    }

    pub fn is_tripped(&self) -> bool {
        self.reason.get().is_some()
    }
}

pub struct Health {
    /// Bit i set = replica i online. Readers on the fast path use this alone.
    online: AtomicU64,
    /// `ReadPolicy::Primary` when set.
    primary_reads: AtomicBool,
    /// A fault is recorded in memory but not yet durable: no I/O that skips a
    /// replica may be acknowledged until it is.
    persist_pending: AtomicBool,
    inner: Mutex<Vec<ReplicaHealth>>,
    sink: Box<dyn StateSink>,
    fence: std::sync::Arc<Fence>,
    pub stats: IoStats,
}

impl Health {
    /// `replicas` is the persisted (or fresh) health; at least one must be online.
    pub fn new(
        replicas: Vec<ReplicaHealth>,
        sink: Box<dyn StateSink>,
    ) -> Result<Health, ReplicationError> {
        assert!(
            !replicas.is_empty() && replicas.len() <= ReplicaIndex::MAX,
            "1..={} replicas",
            ReplicaIndex::MAX
        );
        let online = mask_of(&replicas);
        if online == 0 {
            return Err(ReplicationError::Persist(
                "no replica is online: refusing to serve stale data".into(),
            ));
        }
        Ok(Health {
            online: AtomicU64::new(online),
            primary_reads: AtomicBool::new(false),
            persist_pending: AtomicBool::new(false),
            inner: Mutex::new(replicas),
            sink,
            fence: Default::default(),
            stats: IoStats::default(),
        })
    }

    /// Share `fence` with the replicas that can trip it.
    pub fn with_fence(mut self, fence: std::sync::Arc<Fence>) -> Health {
        self.fence = fence;
        self
    }

    pub fn fence(&self) -> &std::sync::Arc<Fence> {
        &self.fence
    }

    pub fn set_read_policy(&self, p: ReadPolicy) {
        self.primary_reads
            .store(p == ReadPolicy::Primary, Ordering::Release);
    }

    pub fn read_policy(&self) -> ReadPolicy {
        if self.primary_reads.load(Ordering::Acquire) {
            ReadPolicy::Primary
        } else {
            ReadPolicy::Spread
        }
    }

    /// Bitmask of online replicas.
    pub fn online_mask(&self) -> u64 {
        self.online.load(Ordering::Acquire)
    }

    pub fn replica_count(&self) -> usize {
        self.inner.lock().unwrap().len()
    }

    pub fn snapshot(&self) -> Vec<ReplicaHealth> {
        self.inner.lock().unwrap().clone()
    }

    /// Live if every replica is online, Degraded otherwise.
    pub fn serving_state(&self) -> VolumeState {
        let n = self.replica_count();
        if self.online_mask().count_ones() as usize == n {
            VolumeState::Live
        } else {
            VolumeState::Degraded
        }
    }

    /// Whether an I/O may be acknowledged without first retrying a failed persist.
    pub fn durable(&self) -> bool {
        !self.persist_pending.load(Ordering::Acquire)
    }

    /// THE ACK RULE for a mutation sent to the replicas in `attempted`, of which those
    /// in `failures` failed. Returns `Ok` when the request may be acknowledged:
    ///
    /// * at least one replica that took the write is *still* online (another queue may
    ///   have faulted it meanwhile), and
    /// * every failed replica is faulted and that fault is durable.
    ///
    /// Otherwise the request fails (first error) and no replica is faulted for it:
    /// the data reached no replica that stays in the set, so the application must
    /// know, and the last good copy is never thrown away.
    ///
    /// A fenced volume acknowledges nothing (a newer owner took the replicas).
    pub fn settle(&self, attempted: u64, failures: &[(ReplicaIndex, Errno)]) -> Result<(), Errno> {
        if self.fence.is_tripped() {
            return Err(Errno::EIO);
        }
        if failures.is_empty() && self.durable() {
            return Ok(());
        }
        let mut replicas = self.inner.lock().unwrap();
        let failed_mask = failures.iter().fold(0u64, |m, (i, _)| m | 1 << i.get());
        let took_it = attempted & !failed_mask & self.online_mask();
        if took_it == 0 {
            return Err(failures.first().map(|f| f.1).unwrap_or(Errno::EIO));
        }
        for (idx, errno) in failures {
            let r = &mut replicas[idx.get()];
            r.errors += 1;
            if r.state == ReplicaState::Online {
                assert!(r.state.can_become(ReplicaState::Faulted));
                r.state = ReplicaState::Faulted;
                r.reason = Some(match errno.0 {
                    // What the remote replica client reports (remote::client).
                    libc::ETIMEDOUT => {
                        "missed the I/O deadline (replica hung or unreachable)".into()
                    }
                    libc::ENOTCONN => "connection to the replica server lost".into(),
                    _ => format!("I/O error: {errno}"),
                });
                self.persist_pending.store(true, Ordering::Release);
                tracing::error!(replica = %r.location, %errno, "replica faulted");
            }
        }
        let online = mask_of(&replicas);
        assert!(online != 0, "the last online replica was faulted");
        self.online.store(online, Ordering::Release);
        if self.persist_pending.load(Ordering::Acquire) {
            match self.sink.persist(&replicas) {
                Ok(()) => self.persist_pending.store(false, Ordering::Release),
                Err(e) => {
                    tracing::error!(error = %e, "cannot persist replica fault: failing I/O until it is durable");
                    return Err(Errno::EIO);
                }
            }
        }
        Ok(())
    }

    /// Marks a replica online again (after a rebuild) and persists it.
    pub fn set_online(&self, idx: ReplicaIndex) -> Result<(), ReplicationError> {
        let mut replicas = self.inner.lock().unwrap();
        let r = replicas
            .get_mut(idx.get())
            .ok_or(ReplicationError::NoSuchReplica(idx))?;
        if r.state == ReplicaState::Online {
            return Ok(());
        }
        assert!(r.state.can_become(ReplicaState::Online));
        r.state = ReplicaState::Online;
        r.reason = None;
        self.sink.persist(&replicas)?;
        self.online.store(mask_of(&replicas), Ordering::Release);
        Ok(())
    }
}

fn mask_of(replicas: &[ReplicaHealth]) -> u64 {
    replicas
        .iter()
        .enumerate()
        .filter(|(_, r)| r.state == ReplicaState::Online)
        .fold(0, |m, (i, _)| m | 1 << i)
}

/// Iterate the indices of set bits.
pub fn indices(mut mask: u64) -> impl Iterator<Item = ReplicaIndex> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let i = mask.trailing_zeros();
        mask &= mask - 1;
        Some(ReplicaIndex(i as u8))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn online(n: usize) -> Vec<ReplicaHealth> {
        (0..n)
            .map(|i| ReplicaHealth {
                location: format!("r{i}"),
                state: ReplicaState::Online,
                reason: None,
                errors: 0,
            })
            .collect()
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Vec<ReplicaHealth>>>, AtomicBool);
    impl StateSink for Recorder {
        fn persist(&self, r: &[ReplicaHealth]) -> Result<(), ReplicationError> {
            if self.1.load(Ordering::SeqCst) {
                return Err(ReplicationError::Persist("disk full".into()));
            }
            self.0.lock().unwrap().push(r.to_vec());
            Ok(())
        }
    }

    #[test]
    fn failed_replica_is_faulted_and_persisted_before_ack() {
        let rec = Arc::new(Recorder::default());
        let h = Health::new(online(2), Box::new(rec.clone())).unwrap();
        assert_eq!(h.settle(0b11, &[(ReplicaIndex(1), Errno::EIO)]), Ok(()));
        assert_eq!(h.online_mask(), 0b01);
        let persisted = rec.0.lock().unwrap();
        assert_eq!(persisted.len(), 1);
        assert_eq!(persisted[0][1].state, ReplicaState::Faulted);
        assert_eq!(h.serving_state(), VolumeState::Degraded);
    }

    #[test]
    fn last_online_replica_is_never_faulted() {
        let h = Health::new(online(1), Box::new(NoPersist)).unwrap();
        assert_eq!(
            h.settle(0b1, &[(ReplicaIndex(0), Errno::EIO)]),
            Err(Errno::EIO)
        );
        assert_eq!(h.online_mask(), 0b1);
    }

    #[test]
    fn all_failed_returns_error_and_faults_none() {
        let h = Health::new(online(2), Box::new(NoPersist)).unwrap();
        let f = [(ReplicaIndex(0), Errno(5)), (ReplicaIndex(1), Errno(28))];
        assert_eq!(h.settle(0b11, &f), Err(Errno(5)));
        assert_eq!(h.online_mask(), 0b11);
    }

    #[test]
    fn crossed_failures_never_ack_data_held_only_by_a_faulted_replica() {
        // Queue A: write reached r0 only. Queue B: write reached r1 only.
        let h = Health::new(online(2), Box::new(NoPersist)).unwrap();
        assert_eq!(h.settle(0b11, &[(ReplicaIndex(1), Errno::EIO)]), Ok(()));
        // B's only copy is on r1, which A just faulted: B must fail, r0 stays online.
        assert_eq!(
            h.settle(0b11, &[(ReplicaIndex(0), Errno::EIO)]),
            Err(Errno::EIO)
        );
        assert_eq!(h.online_mask(), 0b01);
    }

    #[test]
    fn persist_failure_fails_io_until_durable() {
        let rec = Arc::new(Recorder::default());
        rec.1.store(true, Ordering::SeqCst);
        let h = Health::new(online(3), Box::new(rec.clone())).unwrap();
        assert_eq!(
            h.settle(0b111, &[(ReplicaIndex(2), Errno::EIO)]),
            Err(Errno::EIO)
        );
        assert_eq!(h.online_mask(), 0b011, "fault kept in memory");
        // A clean write still may not be acked while the fault is not durable.
        assert_eq!(h.settle(0b011, &[]), Err(Errno::EIO));
        rec.1.store(false, Ordering::SeqCst);
        assert_eq!(h.settle(0b011, &[]), Ok(()));
        assert!(h.durable());
        assert_eq!(rec.0.lock().unwrap().len(), 1);
    }

    #[test]
    fn refuses_to_start_with_no_online_replica() {
        let mut r = online(2);
        r[0].state = ReplicaState::Faulted;
        r[1].state = ReplicaState::Faulted;
        assert!(Health::new(r, Box::new(NoPersist)).is_err());
    }

    #[test]
    fn volume_state_transitions() {
        use VolumeState::*;
        assert!(Stopped.can_become(Starting));
        assert!(Starting.can_become(Live));
        assert!(Live.can_become(Degraded));
        assert!(Degraded.can_become(Stopping));
        assert!(!Stopped.can_become(Live));
        assert!(!Stopping.can_become(Live));
        assert!(ReplicaState::Online.can_become(ReplicaState::Faulted));
        assert!(!ReplicaState::Online.can_become(ReplicaState::Online));
    }

    #[test]
    fn indices_lists_set_bits() {
        let v: Vec<u8> = indices(0b1010_0101).map(|i| i.0).collect();
        assert_eq!(v, vec![0, 2, 5, 7]);
    }
}
