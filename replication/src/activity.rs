//! The activity log (AL): the 4 MiB extents of the volume where mutations may be in
//! flight, or may have marked a dirty map that is not saved yet. It is what makes a
//! crash of the owner cheap to recover from, as DRBD's activity log does:
//!
//! * A mutation *enters* its extents before it is sent anywhere. When they are all
//!   hot (the common case once a workload has warmed up) that is two atomic adds
//!   per extent; a cold extent costs the mutation one wait for the next AL commit
//!   (group commit: one small write and fdatasync for every mutation waiting).
//! * After an unclean stop, only the hot extents of the last commit may differ
//!   between replicas: they are resynced from one replica to the others (instead
//!   of pinning reads to one replica for good), and added to every saved dirty
//!   map (whose unsaved marks can only lie in hot extents).
//! * An extent goes cold (is evicted, least recently used first, when more than
//!   `capacity` are hot) only when no mutation uses it and none did since the
//!   commit pass began — so every mark made for it was made before that pass saved
//!   the dirty maps.
//!
//! Cost: 12 bytes of memory per 4 MiB extent (3 KiB per GiB); on disk two slots of
//! 4 bytes per hot extent. The extent is a trade: smaller resyncs less after a crash
//! and commits more often for a scattered workload.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::ReplicationError;
use crate::ids::{ByteLen, ByteOffset};

/// Bytes per AL extent.
pub const EXTENT: u64 = 4 << 20;

/// The bytes of extent `e` of a volume of `size` bytes (empty past the end).
pub fn extent_range(e: u32, size: ByteLen) -> (ByteOffset, ByteLen) {
    let start = (u64::from(e) * EXTENT).min(size.0);
    (
        ByteOffset(start),
        ByteLen((start + EXTENT).min(size.0) - start),
    )
}
const SHIFT: u32 = EXTENT.trailing_zeros();

/// Where commits go: the newest durable hot set.
pub trait AlStore: Send + Sync {
    /// Make `hot` (sorted extent numbers) durable as commit `seq`.
    fn save(&self, seq: u64, hot: &[u32]) -> Result<(), ReplicationError>;
}

/// An AL kept nowhere (tests, tools): commits succeed at once.
pub struct NoAlStore;

impl AlStore for NoAlStore {
    fn save(&self, _: u64, _: &[u32]) -> Result<(), ReplicationError> {
        Ok(())
    }
}

/// What [`ActivityLog::enter`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Every extent is hot: go.
    Ready,
    /// Wait until commit `n` is durable.
    Wait(u64),
}

pub struct ActivityLog {
    extents: u64,
    capacity: usize,
    /// One bit per extent: hot in the last durable commit.
    hot: Box<[AtomicU64]>,
    inflight: Box<[AtomicU32]>,
    /// The commit pass during which each extent was last entered or left.
    last_use: Box<[AtomicU64]>,
    pass: AtomicU64,
    /// The newest commit made durable.
    durable: AtomicU64,
    inner: Mutex<AlInner>,
    store: Box<dyn AlStore>,
}

struct AlInner {
    /// Extents asked for by waiting mutations, for commit `next`.
    wanted: BTreeSet<u32>,
    next: u64,
    hot: BTreeSet<u32>,
    /// The last run's hot extents, kept hot until the resync that makes them
    /// identical has ended ([`ActivityLog::release_carried`]): evicted before, a
    /// second crash would not find them again. Never used, they would otherwise
    /// be the first to go.
    carried: BTreeSet<u32>,
}

impl ActivityLog {
    /// The AL of a volume of `size` bytes, at most `capacity` extents hot (soft: a
    /// commit never evicts an extent in use), starting from the hot set `hot` (what
    /// the last run left, once it has been resynced: then empty).
    pub fn new(
        size: ByteLen,
        capacity: usize,
        hot: &[u32],
        store: Box<dyn AlStore>,
    ) -> ActivityLog {
        let extents = size.0.div_ceil(EXTENT);
        let al = ActivityLog {
            extents,
            capacity: capacity.clamp(1, MAX_CAPACITY),
            hot: (0..extents.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            inflight: (0..extents).map(|_| AtomicU32::new(0)).collect(),
            last_use: (0..extents).map(|_| AtomicU64::new(0)).collect(),
            pass: AtomicU64::new(1),
            durable: AtomicU64::new(0),
            inner: Mutex::new(AlInner {
                wanted: BTreeSet::new(),
                next: 1,
                hot: BTreeSet::new(),
                carried: BTreeSet::new(),
            }),
            store,
        };
        {
            let mut inner = al.inner.lock().unwrap();
            for &e in hot.iter().filter(|&&e| u64::from(e) < extents) {
                inner.hot.insert(e);
                inner.carried.insert(e);
                al.set_hot(e, true);
            }
        }
        al
    }

    fn span(&self, offset: ByteOffset, len: ByteLen) -> std::ops::Range<u64> {
        let end = offset.0.saturating_add(len.0.max(1));
        (offset.0 >> SHIFT).min(self.extents)
            ..((end - 1) >> SHIFT).saturating_add(1).min(self.extents)
    }

    fn is_hot(&self, e: u64) -> bool {
        self.hot[(e / 64) as usize].load(Ordering::Acquire) & (1 << (e % 64)) != 0
    }

    fn set_hot(&self, e: u32, on: bool) {
        let (w, b) = ((e / 64) as usize, 1u64 << (e % 64));
        if on {
            self.hot[w].fetch_or(b, Ordering::AcqRel);
        } else {
            self.hot[w].fetch_and(!b, Ordering::AcqRel);
        }
    }

    /// A mutation of `[offset, offset + len)` starts: its extents are in use until
    /// [`ActivityLog::leave`]. It may be sent once its entry is durable.
    pub fn enter(&self, offset: ByteOffset, len: ByteLen) -> Entry {
        let pass = self.pass.load(Ordering::Acquire);
        let mut cold = false;
        for e in self.span(offset, len) {
            self.inflight[e as usize].fetch_add(1, Ordering::AcqRel);
            self.last_use[e as usize].store(pass, Ordering::Release);
            cold |= !self.is_hot(e);
        }
        if !cold {
            return Entry::Ready;
        }
        let mut inner = self.inner.lock().unwrap();
        let mut missing = false;
        for e in self.span(offset, len) {
            // Hot now? A commit may have landed since the check above.
            if !self.is_hot(e) {
                inner.wanted.insert(e as u32);
                missing = true;
            }
        }
        if missing {
            Entry::Wait(inner.next)
        } else {
            Entry::Ready
        }
    }

    /// The mutation that entered `[offset, offset + len)` has settled (its marks, if
    /// any, are made).
    pub fn leave(&self, offset: ByteOffset, len: ByteLen) {
        // A read-modify-write, not a load: when it sees the pass before a commit
        // began, the commit's own RMW of `pass` (begin_pass) reads after it and so
        // sees every mark made before this leave. A plain load gives that on x86
        // (TSO) only, not on ARM.
        let pass = self.pass.fetch_add(0, Ordering::AcqRel);
        for e in self.span(offset, len) {
            self.last_use[e as usize].store(pass, Ordering::Release);
            self.inflight[e as usize].fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Whether extents are waiting for a commit.
    pub fn wants_commit(&self) -> bool {
        !self.inner.lock().unwrap().wanted.is_empty()
    }

    /// Whether commit `n` is durable.
    pub fn is_durable(&self, n: u64) -> bool {
        self.durable.load(Ordering::Acquire) >= n
    }

    /// Start a commit pass: call before saving the dirty maps, then
    /// [`ActivityLog::commit`]. Extents used from now on are not evicted by it.
    pub fn begin_pass(&self) -> u64 {
        self.pass.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The extents a commit in pass `pass` would evict: idle ones beyond the
    /// capacity, least recently used first. Between this and the commit the set
    /// only shrinks (an extent used meanwhile is used in the pass).
    fn evictions(&self, inner: &AlInner, pass: u64) -> Vec<u32> {
        let mut hot = inner.hot.clone();
        hot.extend(inner.wanted.iter().copied());
        if hot.len() <= self.capacity {
            return Vec::new();
        }
        let mut idle: Vec<(u64, u32)> = hot
            .iter()
            .filter(|&&e| !inner.wanted.contains(&e) && !inner.carried.contains(&e))
            .filter(|&&e| self.inflight[e as usize].load(Ordering::Acquire) == 0)
            .map(|&e| (self.last_use[e as usize].load(Ordering::Acquire), e))
            .filter(|&(used, _)| used < pass)
            .collect();
        idle.sort_unstable();
        idle.into_iter()
            .take(hot.len() - self.capacity)
            .map(|(_, e)| e)
            .collect()
    }

    /// Whether a commit in pass `pass` would evict an extent: the caller makes the
    /// replicas' data durable first (DRBD flushes its backing device before an
    /// evicting AL transaction), since after it a crash no longer resyncs it.
    pub fn would_evict(&self, pass: u64) -> bool {
        !self.evictions(&self.inner.lock().unwrap(), pass).is_empty()
    }

    /// Commit: the wanted extents become hot; with `evict`, idle ones beyond the
    /// capacity go cold (only those not used since pass `pass` began). Returns the
    /// commit's number.
    pub fn commit(&self, pass: u64, evict: bool) -> Result<u64, ReplicationError> {
        let mut inner = self.inner.lock().unwrap();
        let n = inner.next;
        let evict = match evict {
            true => self.evictions(&inner, pass),
            false => Vec::new(),
        };
        let mut wanted = std::mem::take(&mut inner.wanted);
        let mut hot = inner.hot.clone();
        hot.extend(wanted.iter().copied());
        for e in &evict {
            hot.remove(e);
        }
        // Beyond the hard limit, the newest wanted extents wait for evictions.
        while hot.len() > MAX_HOT {
            let e = *wanted.last().expect("only wanted extents exceed the limit");
            wanted.remove(&e);
            hot.remove(&e);
            inner.wanted.insert(e);
        }
        // Cold before the commit is durable: an extent evicted in memory but still
        // hot on disk is only resynced needlessly after a crash.
        for &e in &evict {
            self.set_hot(e, false);
        }
        inner.next += 1;
        let list: Vec<u32> = hot.iter().copied().collect();
        drop(inner);
        if let Err(e) = self.store.save(n, &list) {
            // Try again with the next commit.
            let mut inner = self.inner.lock().unwrap();
            inner.wanted.extend(wanted);
            return Err(e);
        }
        let mut inner = self.inner.lock().unwrap();
        for &e in &wanted {
            self.set_hot(e, true);
        }
        inner.hot = hot;
        drop(inner);
        self.durable.fetch_max(n, Ordering::AcqRel);
        Ok(n)
    }

    /// The hot extents, as byte ranges (what a resync after a crash covers).
    pub fn hot_ranges(&self) -> Vec<(ByteOffset, ByteLen)> {
        self.inner
            .lock()
            .unwrap()
            .hot
            .iter()
            .map(|&e| (ByteOffset(u64::from(e) << SHIFT), ByteLen(EXTENT)))
            .collect()
    }

    /// The resync of the last run's hot extents has ended (its writes durable on
    /// every target): they may go cold like any other.
    pub fn release_carried(&self) {
        self.inner.lock().unwrap().carried.clear();
    }

    /// More extents are hot than the capacity: a commit may evict some.
    pub fn over_capacity(&self) -> bool {
        self.hot_count() > self.capacity
    }

    pub fn hot_count(&self) -> usize {
        self.inner.lock().unwrap().hot.len()
    }
}

/// Most extents hot at once, whatever the configured capacity (a commit that would
/// go beyond it leaves the extra extents waiting for evictions): 256 GiB.
pub const MAX_HOT: usize = 65536;

/// Most configurable capacity: commits may exceed it up to twice, within [`MAX_HOT`].
pub const MAX_CAPACITY: usize = MAX_HOT / 2;

/// The AL on a file: two fixed slots written in turn (commit `n` into slot `n % 2`),
/// each `magic, seq, count, extents…, crc32c` (only that prefix is written); the
/// valid slot with the higher seq wins, so a torn write leaves the previous commit,
/// which covered every extent a mutation was allowed to use.
pub struct FileAlStore {
    file: File,
    path: PathBuf,
}

const AL_MAGIC: [u8; 8] = *b"UKDAL\0\0\x01";
const SLOT_LEN: u64 = (24 + 4 * MAX_HOT as u64).next_multiple_of(4096);

impl FileAlStore {
    /// Open or create the AL file at `path`.
    pub fn open(path: &Path) -> Result<FileAlStore, ReplicationError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| ReplicationError::Open {
                path: path.into(),
                what: "open the activity log",
                source: e,
            })?;
        Ok(FileAlStore {
            file,
            path: path.into(),
        })
    }

    /// The newest valid commit on disk: its seq and hot extents (`None`: no AL yet).
    pub fn load(&self) -> Result<Option<(u64, Vec<u32>)>, ReplicationError> {
        let len = self
            .file
            .metadata()
            .map_err(|e| self.err("read the activity log", e))?
            .len();
        let mut best: Option<(u64, Vec<u32>)> = None;
        for slot in 0..2 {
            let at = slot * SLOT_LEN;
            if at >= len {
                break;
            }
            let mut buf = vec![0u8; (len - at).min(SLOT_LEN) as usize];
            self.file
                .read_exact_at(&mut buf, at)
                .map_err(|e| self.err("read the activity log", e))?;
            if let Some((seq, hot)) = parse_slot(&buf) {
                if best.as_ref().is_none_or(|(s, _)| seq > *s) {
                    best = Some((seq, hot));
                }
            }
        }
        Ok(best)
    }

    fn err(&self, what: &'static str, e: std::io::Error) -> ReplicationError {
        ReplicationError::Open {
            path: self.path.clone(),
            what,
            source: e,
        }
    }
}

fn parse_slot(buf: &[u8]) -> Option<(u64, Vec<u32>)> {
    if buf.len() < 24 || buf[..8] != AL_MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(buf[8..16].try_into().ok()?);
    let count = u32::from_le_bytes(buf[16..20].try_into().ok()?) as usize;
    if count > MAX_HOT {
        return None;
    }
    let end = 20 + 4 * count;
    if buf.len() < end + 4 {
        return None;
    }
    let crc = u32::from_le_bytes(buf[end..end + 4].try_into().ok()?);
    if crc32c::crc32c(&buf[..end]) != crc {
        return None;
    }
    let hot = buf[20..end]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    Some((seq, hot))
}

impl AlStore for FileAlStore {
    fn save(&self, seq: u64, hot: &[u32]) -> Result<(), ReplicationError> {
        assert!(
            hot.len() <= MAX_HOT,
            "the AL holds at most {MAX_HOT} extents"
        );
        let mut buf = Vec::with_capacity(24 + 4 * hot.len());
        buf.extend_from_slice(&AL_MAGIC);
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.extend_from_slice(&(hot.len() as u32).to_le_bytes());
        for e in hot {
            buf.extend_from_slice(&e.to_le_bytes());
        }
        let crc = crc32c::crc32c(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        self.file
            .write_all_at(&buf, (seq % 2) * SLOT_LEN)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| self.err("write the activity log", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    fn al(capacity: usize) -> ActivityLog {
        ActivityLog::new(ByteLen(64 * M), capacity, &[], Box::new(NoAlStore))
    }

    fn commit(al: &ActivityLog) -> u64 {
        let pass = al.begin_pass();
        al.commit(pass, true).unwrap()
    }

    #[test]
    fn a_cold_extent_waits_for_one_commit_then_is_free() {
        let al = al(8);
        let e = al.enter(ByteOffset(5 * M), ByteLen(4096));
        let Entry::Wait(n) = e else { panic!("{e:?}") };
        assert!(!al.is_durable(n));
        // A second mutation in the same extent rides the same commit.
        assert_eq!(al.enter(ByteOffset(6 * M), ByteLen(4096)), Entry::Wait(n));
        assert_eq!(commit(&al), n);
        assert!(al.is_durable(n));
        al.leave(ByteOffset(5 * M), ByteLen(4096));
        al.leave(ByteOffset(6 * M), ByteLen(4096));
        assert_eq!(al.enter(ByteOffset(7 * M), ByteLen(4096)), Entry::Ready);
        assert_eq!(al.hot_ranges(), [(ByteOffset(4 * M), ByteLen(4 * M))]);
    }

    #[test]
    fn a_mutation_spanning_two_extents_needs_both() {
        let al = al(8);
        commit(&al);
        assert!(matches!(
            al.enter(ByteOffset(4 * M - 4096), ByteLen(8192)),
            Entry::Wait(_)
        ));
        commit(&al);
        assert_eq!(al.hot_count(), 2);
    }

    #[test]
    fn idle_extents_beyond_the_capacity_go_cold_least_recent_first() {
        let al = al(2);
        for i in 0..2u64 {
            al.enter(ByteOffset(i * 4 * M), ByteLen(4096));
            commit(&al);
            al.leave(ByteOffset(i * 4 * M), ByteLen(4096));
        }
        // A third extent over a capacity of two: of the idle ones, the one used
        // longest ago goes.
        al.enter(ByteOffset(8 * M), ByteLen(4096));
        commit(&al);
        let hot: Vec<u64> = al.hot_ranges().iter().map(|(o, _)| o.0 / (4 * M)).collect();
        assert_eq!(hot, [1, 2]);
    }

    #[test]
    fn an_extent_in_use_is_never_evicted() {
        let al = al(1);
        al.enter(ByteOffset(0), ByteLen(4096)); // stays in flight
        commit(&al);
        al.enter(ByteOffset(4 * M), ByteLen(4096));
        commit(&al);
        al.leave(ByteOffset(4 * M), ByteLen(4096));
        commit(&al);
        commit(&al);
        let hot: Vec<u64> = al.hot_ranges().iter().map(|(o, _)| o.0).collect();
        assert_eq!(hot, [0], "extent 0 is busy: extent 1 went instead");
    }

    #[test]
    fn a_use_during_the_pass_keeps_the_extent_hot() {
        let al = al(1);
        al.enter(ByteOffset(0), ByteLen(4096));
        commit(&al);
        al.leave(ByteOffset(0), ByteLen(4096));
        al.enter(ByteOffset(4 * M), ByteLen(4096));
        // The pass begins (dirty maps are being saved) ...
        let pass = al.begin_pass();
        // ... and extent 0 is used and left again before the commit: its marks may
        // have missed the save, so it must stay hot.
        al.enter(ByteOffset(0), ByteLen(4096));
        al.leave(ByteOffset(0), ByteLen(4096));
        al.commit(pass, true).unwrap();
        assert_eq!(al.hot_count(), 2);
    }

    #[test]
    fn the_file_keeps_the_newest_intact_commit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.al");
        let store = FileAlStore::open(&p).unwrap();
        assert_eq!(store.load().unwrap(), None);
        store.save(1, &[1, 2, 3]).unwrap();
        store.save(2, &[2, 3, 9]).unwrap();
        assert_eq!(store.load().unwrap(), Some((2, vec![2, 3, 9])));
        // Commit 3 is torn (slot 1 garbled): commit 2 stands.
        store.save(3, &[7]).unwrap();
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xFF; 8], SLOT_LEN + 20).unwrap();
        let reopened = FileAlStore::open(&p).unwrap();
        assert_eq!(reopened.load().unwrap(), Some((2, vec![2, 3, 9])));
        // The largest hot set lands whole, and the slot after it is intact.
        let many: Vec<u32> = (0..MAX_HOT as u32).collect();
        reopened.save(4, &many).unwrap();
        assert_eq!(reopened.load().unwrap(), Some((4, many)));
        reopened.save(5, &[1]).unwrap();
        assert_eq!(reopened.load().unwrap(), Some((5, vec![1])));
    }

    /// (F) The last run's hot extents stay hot until their resync ended, however
    /// many others the workload uses meanwhile: a second crash during the resync
    /// must find them again.
    #[test]
    fn carried_extents_stay_hot_until_released() {
        let al = ActivityLog::new(ByteLen(64 * M), 2, &[3, 4], Box::new(NoAlStore));
        for e in [7u64, 8, 9, 10] {
            al.enter(ByteOffset(e * 4 * M), ByteLen(4096));
            commit(&al);
            al.leave(ByteOffset(e * 4 * M), ByteLen(4096));
        }
        commit(&al);
        let hot = |al: &ActivityLog| -> Vec<u64> {
            al.hot_ranges().iter().map(|(o, _)| o.0 / (4 * M)).collect()
        };
        assert_eq!(hot(&al), [3, 4]);
        al.release_carried();
        al.enter(ByteOffset(11 * 4 * M), ByteLen(4096));
        commit(&al);
        assert_eq!(hot(&al), [4, 11]);
    }

    #[test]
    fn a_restart_starts_from_the_saved_hot_set() {
        let al = ActivityLog::new(ByteLen(64 * M), 8, &[3, 99], Box::new(NoAlStore));
        // 99 is past the volume's end (another geometry): ignored.
        assert_eq!(al.hot_ranges(), [(ByteOffset(12 * M), ByteLen(4 * M))]);
        assert_eq!(al.enter(ByteOffset(13 * M), ByteLen(4096)), Entry::Ready);
    }
}
