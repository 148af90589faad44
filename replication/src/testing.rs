//! An in-memory replica with fault injection, for unit tests of the nexus logic
//! (and of anything built on it). Not used by the daemon.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::Errno;
use crate::ids::{ByteLen, ByteOffset};
use crate::replica::{IoFuture, Replica};
use wire::SnapshotUuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    None = 0,
    /// Every operation fails with EIO.
    All = 1,
    /// Reads fail with EIO; everything else works.
    Reads = 2,
    /// Writes (and flush/discard/zeroes) fail with EIO; reads work.
    Writes = 3,
    /// Every operation (labels too) fails with ENOTCONN: a remote replica whose
    /// connection is down (what its client answers until it is back).
    NotConn = 4,
}

/// The shared contents of one in-memory replica.
pub struct MemStore {
    data: Mutex<Vec<u8>>,
    fault: AtomicU8,
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    /// Each operation blocks its thread this long (µs), so concurrent requests overlap.
    latency_us: AtomicU64,
    label: Mutex<Option<wire::label::Label>>,
    /// Label writes fail with this errno (0: they do not).
    fail_labels: std::sync::atomic::AtomicI32,
    /// Counts as a remote replica (its unflushed writes are tracked).
    remote: std::sync::atomic::AtomicBool,
    /// Writes that reach this offset fail with EIO, and so does everything after
    /// the first of them (a disk dying at a known point of a copy, not at a time).
    fail_from: AtomicU64,
    /// Runs (once) inside the first read at or past its offset, before the data is
    /// taken: a fault or a write that lands while a read is in flight.
    on_read: Mutex<Option<ReadHook>>,
    /// With [`MemStore::track_durable`]: the contents as of the last flush, and the
    /// byte ranges written since.
    durable: Mutex<Option<Durable>>,
    /// Snapshots, oldest first, each with a copy of the data (small volumes).
    snapshots: Mutex<Vec<(wire::control::SnapshotEntry, Vec<u8>)>>,
    /// Snapshot operations fail with EIO.
    pub fail_snapshots: std::sync::atomic::AtomicBool,
}

type ReadHook = (u64, Box<dyn FnOnce() + Send>);

/// A [`MemStore`]'s contents as of its last flush, and the byte ranges
/// (offset, length) written since.
type Durable = (Vec<u8>, Vec<(usize, usize)>);

impl MemStore {
    /// A snapshot operation: a create copies the data, a revert copies it back.
    pub fn snapshot_action(
        &self,
        action: &wire::control::SnapshotAction,
    ) -> Result<wire::control::SnapshotReply, crate::ReplicationError> {
        use wire::control::{SnapshotAction as A, SnapshotEntry, SnapshotReply};
        if self.fail_snapshots.load(Ordering::SeqCst) {
            return Err(crate::ReplicationError::Store(snapshot::StoreError::Io(
                Errno::EIO,
            )));
        }
        let mut snaps = self.snapshots.lock().unwrap();
        let done = match action {
            A::Create {
                uuid,
                name,
                created_ms,
            } => {
                let new = !snaps.iter().any(|(s, _)| s.uuid == *uuid);
                if new {
                    let entry = SnapshotEntry {
                        uuid: *uuid,
                        name: name.clone(),
                        created_ms: *created_ms,
                        owned_bytes: 0,
                        reclaimable_bytes: 0,
                        deleting: false,
                    };
                    snaps.push((entry, self.data.lock().unwrap().clone()));
                }
                new
            }
            A::Undo { uuid } | A::Delete { uuid } => {
                let before = snaps.len();
                snaps.retain(|(s, _)| s.uuid != *uuid);
                snaps.len() != before
            }
            A::Revert { uuid } => match snaps.iter().find(|(s, _)| s.uuid == *uuid) {
                Some((_, d)) => {
                    self.data.lock().unwrap().copy_from_slice(d);
                    true
                }
                None => {
                    return Err(crate::ReplicationError::Store(
                        snapshot::StoreError::NoSuchSnapshot(*uuid),
                    ))
                }
            },
            A::Reset => {
                let had = !snaps.is_empty();
                snaps.clear();
                had
            }
            A::List => false,
        };
        Ok(SnapshotReply {
            done,
            snapshots: snaps.iter().map(|(e, _)| e.clone()).collect(),
        })
    }

    /// Overwrite snapshot `uuid`'s data at `offset` (rot in a layer, for tests).
    pub fn snapshot_put(&self, uuid: SnapshotUuid, offset: usize, data: &[u8]) {
        let mut snaps = self.snapshots.lock().unwrap();
        let (_, d) = snaps
            .iter_mut()
            .find(|(s, _)| s.uuid == uuid)
            .expect("no such snapshot");
        d[offset..offset + data.len()].copy_from_slice(data);
    }

    /// Snapshot `uuid`'s data at `[offset, offset + len)`.
    fn snapshot_bytes(
        &self,
        uuid: SnapshotUuid,
        r: std::ops::Range<usize>,
    ) -> Result<Vec<u8>, Errno> {
        let snaps = self.snapshots.lock().unwrap();
        let (_, d) = snaps
            .iter()
            .find(|(s, _)| s.uuid == uuid)
            .ok_or(Errno(libc::ENOENT))?;
        Ok(d[r].to_vec())
    }

    pub fn new(size: usize) -> Arc<MemStore> {
        Arc::new(MemStore {
            data: Mutex::new(vec![0; size]),
            fault: AtomicU8::new(Fault::None as u8),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            latency_us: AtomicU64::new(0),
            label: Mutex::new(None),
            fail_labels: Default::default(),
            remote: Default::default(),
            fail_from: AtomicU64::new(u64::MAX),
            on_read: Mutex::new(None),
            durable: Mutex::new(None),
            snapshots: Mutex::new(Vec::new()),
            fail_snapshots: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Run `f` inside the first read that reaches `offset` or past it.
    pub fn on_read_at(&self, offset: u64, f: impl FnOnce() + Send + 'static) {
        *self.on_read.lock().unwrap() = Some((offset, Box::new(f)));
    }

    fn read_hook(&self, offset: u64, len: u64) {
        let mut hook = self.on_read.lock().unwrap();
        if hook.as_ref().is_some_and(|(at, _)| offset + len > *at) {
            let (_, f) = hook.take().expect("checked");
            drop(hook);
            f();
        }
    }

    /// Make it count as a remote replica (before the health is made).
    pub fn play_remote(&self) {
        self.remote.store(true, Ordering::Release);
    }

    pub fn plays_remote(&self) -> bool {
        self.remote.load(Ordering::Acquire)
    }

    pub fn set_latency(&self, d: std::time::Duration) {
        self.latency_us
            .store(d.as_micros() as u64, Ordering::SeqCst);
    }

    fn wait(&self) {
        let us = self.latency_us.load(Ordering::SeqCst);
        if us > 0 {
            std::thread::sleep(std::time::Duration::from_micros(us));
        }
    }

    pub fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    /// What `Backing::sync` does for a memory replica: a flush.
    pub fn sync(&self) -> Result<(), Errno> {
        self.mutate(None, false, |_| ())?;
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    pub fn label(&self) -> Option<wire::label::Label> {
        self.label.lock().unwrap().clone()
    }

    pub fn set_label(&self, l: Option<wire::label::Label>) {
        *self.label.lock().unwrap() = l;
    }

    /// Label writes fail with EIO (or stop failing).
    pub fn fail_labels(&self, fail: bool) {
        self.fail_labels_with(fail.then_some(Errno::EIO));
    }

    /// Label writes fail with `errno` (`None`: they do not).
    pub fn fail_labels_with(&self, errno: Option<Errno>) {
        self.fail_labels
            .store(errno.map_or(0, |e| e.0), Ordering::SeqCst);
    }

    /// What `Backing::update_label` does for a memory replica.
    pub fn update_label(&self, u: &wire::control::LabelUpdate) -> Result<(), Errno> {
        match self.fail_labels.load(Ordering::SeqCst) {
            0 => {}
            e => return Err(Errno(e)),
        }
        if let Some(e) = self.error(false) {
            return Err(e);
        }
        let mut l = self.label.lock().unwrap();
        let label = l.as_mut().ok_or(Errno::EIO)?;
        label.membership = u.membership.clone();
        label.outdated = u.outdated;
        Ok(())
    }

    /// The first write that reaches `offset` sets [`Fault::Writes`] (and fails).
    pub fn fail_writes_from(&self, offset: u64) {
        self.fail_from.store(offset, Ordering::SeqCst);
    }

    pub fn set_fault(&self, f: Fault) {
        self.fault.store(f as u8, Ordering::SeqCst);
    }

    pub fn bytes(&self, off: usize, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[off..off + len].to_vec()
    }

    /// Store `data` at `off` directly (a copier filling a new replica).
    pub fn put(&self, off: usize, data: &[u8]) {
        self.data.lock().unwrap()[off..off + data.len()].copy_from_slice(data);
    }

    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// The error an operation gets now (reads or the others), if any.
    fn error(&self, is_read: bool) -> Option<Errno> {
        match self.fault.load(Ordering::SeqCst) {
            x if x == Fault::All as u8 => Some(Errno::EIO),
            x if x == Fault::Reads as u8 && is_read => Some(Errno::EIO),
            x if x == Fault::Writes as u8 && !is_read => Some(Errno::EIO),
            x if x == Fault::NotConn as u8 => Some(Errno(libc::ENOTCONN)),
            _ => None,
        }
    }

    pub fn fault(&self) -> Fault {
        match self.fault.load(Ordering::SeqCst) {
            1 => Fault::All,
            2 => Fault::Reads,
            3 => Fault::Writes,
            4 => Fault::NotConn,
            _ => Fault::None,
        }
    }

    /// Look at the whole (volatile) contents without copying them.
    pub fn inspect<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        f(&self.data.lock().unwrap())
    }

    /// Keep a durable copy apart from the contents: from now on a
    /// [`MemStore::crash`] drops what was written since the last flush.
    pub fn track_durable(&self) {
        let data = self.data.lock().unwrap().clone();
        *self.durable.lock().unwrap() = Some((data, Vec::new()));
    }

    /// The replica's host crashes: its contents go back to the last flush (only
    /// with [`MemStore::track_durable`]). Returns the byte ranges that changed.
    pub fn crash(&self) -> Vec<(usize, usize)> {
        let mut d = self.durable.lock().unwrap();
        let Some((durable, dirty)) = d.as_mut() else {
            return Vec::new();
        };
        let mut data = self.data.lock().unwrap();
        let mut lost = Vec::new();
        for (o, l) in dirty.drain(..) {
            if data[o..o + l] != durable[o..o + l] {
                lost.push((o, l));
            }
            data[o..o + l].copy_from_slice(&durable[o..o + l]);
        }
        lost
    }

    /// Apply a mutation of the byte range `at` (`None`: a flush); a FUA write
    /// (`fua`) is durable at once.
    fn mutate(
        &self,
        at: Option<(usize, usize)>,
        fua: bool,
        f: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), Errno> {
        self.wait();
        if let Some(e) = self.error(false) {
            return Err(e);
        }
        let mut data = self.data.lock().unwrap();
        f(&mut data);
        let mut d = self.durable.lock().unwrap();
        if let Some((durable, dirty)) = d.as_mut() {
            match at {
                Some((o, l)) if fua => durable[o..o + l].copy_from_slice(&data[o..o + l]),
                Some(r) => dirty.push(r),
                // A flush: what was written is durable now.
                None => {
                    for (o, l) in dirty.drain(..) {
                        durable[o..o + l].copy_from_slice(&data[o..o + l]);
                    }
                }
            }
        }
        Ok(())
    }
}

pub struct MemReplica {
    store: Arc<MemStore>,
    location: String,
}

impl MemReplica {
    pub fn new(store: Arc<MemStore>) -> MemReplica {
        MemReplica {
            location: format!("mem:{:p}", Arc::as_ptr(&store)),
            store,
        }
    }
}

fn range(off: ByteOffset, len: u64) -> std::ops::Range<usize> {
    off.0 as usize..(off.0 + len) as usize
}

impl Replica for MemReplica {
    fn location(&self) -> &str {
        &self.location
    }

    fn read<'a>(&'a self, offset: ByteOffset, buf: &'a mut [u8]) -> IoFuture<'a> {
        gate_pass(|| {
            format!(
                "read {}@{}+{}",
                self.location,
                offset.0 >> 10,
                buf.len() >> 10
            )
        });
        self.store.reads.fetch_add(1, Ordering::SeqCst);
        self.store.read_hook(offset.0, buf.len() as u64);
        self.store.wait();
        let res = if let Some(e) = self.store.error(true) {
            Err(e)
        } else {
            let data = self.store.data.lock().unwrap();
            buf.copy_from_slice(&data[range(offset, buf.len() as u64)]);
            Ok(())
        };
        Box::pin(std::future::ready(res))
    }

    fn read_snapshot<'a>(
        &'a self,
        of: SnapshotUuid,
        offset: ByteOffset,
        buf: &'a mut [u8],
    ) -> IoFuture<'a> {
        self.store.reads.fetch_add(1, Ordering::SeqCst);
        let res = match self.store.error(true) {
            Some(e) => Err(e),
            None => self
                .store
                .snapshot_bytes(of, range(offset, buf.len() as u64))
                .map(|d| buf.copy_from_slice(&d)),
        };
        Box::pin(std::future::ready(res))
    }

    /// Compares the two views 4 KiB at a time.
    fn diff_extents(
        &self,
        of: Option<SnapshotUuid>,
        since: Option<SnapshotUuid>,
        offset: ByteOffset,
        len: ByteLen,
    ) -> crate::replica::ExtentsFuture<'_> {
        let r = range(offset, len.0);
        let view = |v: Option<SnapshotUuid>| match v {
            Some(u) => self.store.snapshot_bytes(u, r.clone()),
            None => Ok(self.store.data.lock().unwrap()[r.clone()].to_vec()),
        };
        let res = (|| {
            let a = view(of)?;
            let b = match since {
                Some(_) => view(since)?,
                None => vec![0u8; a.len()],
            };
            let mut out: Vec<crate::replica::Extent> = Vec::new();
            for (i, (x, y)) in a.chunks(4096).zip(b.chunks(4096)).enumerate() {
                if x == y {
                    continue;
                }
                let at = offset.0 + i as u64 * 4096;
                let n = x.len() as u64;
                match out.last_mut() {
                    Some((o, l)) if o.0 + l.0 == at => l.0 += n,
                    _ => out.push((ByteOffset(at), ByteLen(n))),
                }
            }
            if out.len() > crate::replica::MAX_EXTENTS {
                out.truncate(crate::replica::MAX_EXTENTS);
                let (o, l) = out.last_mut().expect("MAX_EXTENTS > 0");
                l.0 = offset.0 + len.0 - o.0;
            }
            Ok(Some(out))
        })();
        Box::pin(std::future::ready(res))
    }

    fn write<'a>(&'a self, offset: ByteOffset, buf: &'a [u8], fua: bool) -> IoFuture<'a> {
        gate_pass(|| {
            format!(
                "write {}@{}+{}",
                self.location,
                offset.0 >> 10,
                buf.len() >> 10
            )
        });
        self.store.writes.fetch_add(1, Ordering::SeqCst);
        if offset.0 + buf.len() as u64 > self.store.fail_from.load(Ordering::SeqCst) {
            self.store.set_fault(Fault::Writes);
        }
        let r = range(offset, buf.len() as u64);
        let res = self
            .store
            .mutate(Some((r.start, r.len())), fua, |d| d[r].copy_from_slice(buf));
        Box::pin(std::future::ready(res))
    }

    fn flush(&self) -> IoFuture<'_> {
        gate_pass(|| format!("flush {}", self.location));
        Box::pin(std::future::ready(self.store.sync()))
    }

    fn discard(&self, offset: ByteOffset, len: ByteLen) -> IoFuture<'_> {
        gate_pass(|| {
            format!(
                "discard {}@{}+{}",
                self.location,
                offset.0 >> 10,
                len.0 >> 10
            )
        });
        let r = range(offset, len.0);
        let res = self
            .store
            .mutate(Some((r.start, r.len())), false, |d| d[r].fill(0));
        Box::pin(std::future::ready(res))
    }

    fn write_zeroes(&self, offset: ByteOffset, len: ByteLen, _no_unmap: bool) -> IoFuture<'_> {
        gate_pass(|| format!("zero {}@{}+{}", self.location, offset.0 >> 10, len.0 >> 10));
        let r = range(offset, len.0);
        let res = self
            .store
            .mutate(Some((r.start, r.len())), false, |d| d[r].fill(0));
        Box::pin(std::future::ready(res))
    }
}

/// Lets a simulator run a background job (a rebuild, a verify) on its own thread
/// one replica operation at a time: a thread that [`Gate::enter`]ed parks before
/// every memory replica operation until the simulator grants it the next one, so
/// the job's operations interleave with the application's at points the simulator
/// chooses (deterministically, from its seed).
#[derive(Default)]
pub struct Gate {
    state: Mutex<GateState>,
    cv: std::sync::Condvar,
}

#[derive(Default)]
struct GateState {
    permits: u64,
    parked: bool,
    done: bool,
    passed: u64,
    /// The operations passed since [`Gate::take_log`], described.
    log: Vec<String>,
}

/// Where a gated thread is after [`Gate::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateAt {
    /// Parked before its next replica operation.
    Parked,
    /// Its job ended ([`Gate::done`]).
    Done,
    /// Neither within the timeout (blocked on something else).
    Stuck,
}

thread_local! {
    static GATE: std::cell::RefCell<Option<Arc<Gate>>> = const { std::cell::RefCell::new(None) };
}

fn gate_pass(op: impl FnOnce() -> String) {
    if let Some(g) = GATE.with(|g| g.borrow().clone()) {
        g.pass(op());
    }
}

impl Gate {
    /// Gate the calling thread's memory replica operations.
    pub fn enter(self: &Arc<Self>) {
        GATE.with(|g| *g.borrow_mut() = Some(self.clone()));
    }

    /// The gated thread's job ended (call on it, last).
    pub fn done(&self) {
        GATE.with(|g| *g.borrow_mut() = None);
        self.state.lock().unwrap().done = true;
        self.cv.notify_all();
    }

    fn pass(&self, op: String) {
        let mut s = self.state.lock().unwrap();
        s.log.push(op);
        s.parked = true;
        self.cv.notify_all();
        while s.permits == 0 {
            s = self.cv.wait(s).unwrap();
        }
        s.permits -= 1;
        s.parked = false;
        s.passed += 1;
    }

    /// The operations it did (or is parked before) since the last call.
    pub fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut self.state.lock().unwrap().log)
    }

    /// Operations passed so far.
    pub fn passed(&self) -> u64 {
        self.state.lock().unwrap().passed
    }

    /// Wait until the gated thread parks or ends (the first time after its start).
    pub fn wait(&self, timeout: std::time::Duration) -> GateAt {
        let deadline = std::time::Instant::now() + timeout;
        let mut s = self.state.lock().unwrap();
        loop {
            if s.done {
                return GateAt::Done;
            }
            if s.parked && s.permits == 0 {
                return GateAt::Parked;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return GateAt::Stuck;
            }
            s = self.cv.wait_timeout(s, deadline - now).unwrap().0;
        }
    }

    /// Let the gated thread run free from now on (a simulator giving up on it).
    pub fn open(&self) {
        self.state.lock().unwrap().permits = u64::MAX / 2;
        self.cv.notify_all();
    }

    /// Let the gated thread do its next operation, and wait until it parks again
    /// or ends.
    pub fn step(&self, timeout: std::time::Duration) -> GateAt {
        {
            let mut s = self.state.lock().unwrap();
            if s.done {
                return GateAt::Done;
            }
            s.permits += 1;
            self.cv.notify_all();
        }
        self.wait(timeout)
    }
}

/// A block for verifying workloads: every 16 bytes carry the block number and the
/// write's sequence number (xor the chunk index), so a reader can tell which write a
/// block holds, and that it is whole and not another block's.
pub fn stamped_block(block: usize, seq: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, chunk) in v.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&(block as u64).to_le_bytes());
        chunk[8..].copy_from_slice(&(seq ^ i as u64).to_le_bytes());
    }
    v
}

/// The sequence number a [`stamped_block`] holds (0: never written, all zeroes).
/// Panics if the block is torn, or holds another block's data.
pub fn stamp_of(block: usize, data: &[u8]) -> u64 {
    if data.iter().all(|&b| b == 0) {
        return 0;
    }
    let seq = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
    assert!(
        data == stamped_block(block, seq, data.len()),
        "block {block} is torn or holds another block's data"
    );
    seq
}

/// xorshift64*: a deterministic generator for test workloads, so a failure
/// reproduces from its seed (and no dependency is needed).
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough below `n` for tests.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The edges drawn in the first ```` ```text ```` block of `source` (a module's doc
/// comment): lines of `A ──(label)──▶ B`, where either side may be `X | Y` and a
/// line may chain several arrows. Names must be in `names`, so a typo in the
/// diagram fails the test instead of drawing nothing.
pub fn diagram_edges(source: &str, names: &[&str]) -> Vec<(String, String)> {
    let mut edges = Vec::new();
    let mut in_block = false;
    for line in source.lines() {
        let l = line
            .trim_start()
            .trim_start_matches("//!")
            .trim_start_matches("///")
            .trim();
        if !in_block {
            in_block = l.starts_with("```text");
            continue;
        }
        if l.starts_with("```") {
            break;
        }
        let mut bare = String::new();
        let mut depth = 0;
        for c in l.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ if depth == 0 => bare.push(c),
                _ => {}
            }
        }
        let bare = bare.replace('─', "");
        let parts: Vec<Vec<&str>> = bare
            .split('▶')
            .map(|p| {
                p.split('|')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .collect()
            })
            .collect();
        for pair in parts.windows(2) {
            for a in &pair[0] {
                for b in &pair[1] {
                    for n in [a, b] {
                        assert!(
                            names.contains(n),
                            "diagram names an unknown state {n:?}: {line}"
                        );
                    }
                    edges.push((a.to_string(), b.to_string()));
                }
            }
        }
    }
    edges
}

/// A sink that records what it persists and can be told to fail.
#[derive(Default)]
pub struct RecordingSink {
    pub persisted: Mutex<Vec<crate::health::HealthSnapshot>>,
    failing: std::sync::atomic::AtomicBool,
}

impl RecordingSink {
    pub fn fail(&self, fail: bool) {
        self.failing.store(fail, Ordering::SeqCst);
    }
}

impl crate::health::StateSink for RecordingSink {
    fn persist(
        &self,
        s: &crate::health::HealthSnapshot,
    ) -> Result<(), crate::error::ReplicationError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(crate::error::ReplicationError::Persist("disk full".into()));
        }
        self.persisted.lock().unwrap().push(s.clone());
        Ok(())
    }
}

/// `n` in-memory replicas of 1 MiB, all online and members at epoch 1.
pub fn mem_volume(n: usize) -> (Vec<Arc<MemStore>>, Arc<crate::health::Health>) {
    let (s, h, _) = mem_volume_with_sink(n);
    (s, h)
}

/// A new file of `len` bytes at `path` holding an ext4 filesystem, made by the
/// real `mkfs.ext4` (e2fsprogs, which `.ci/run` installs).
pub fn mkfs_ext4(path: &std::path::Path, len: u64) {
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
    let st = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .status()
        .expect("run mkfs.ext4 (e2fsprogs)");
    assert!(st.success(), "mkfs.ext4 {}", path.display());
}

/// [`mem_volume`] with its sink.
pub fn mem_volume_with_sink(
    n: usize,
) -> (
    Vec<Arc<MemStore>>,
    Arc<crate::health::Health>,
    Arc<RecordingSink>,
) {
    mem_volume_logged(n, None)
}

/// [`mem_volume_with_sink`] keeping its activity log and dirty maps in `logs`.
pub fn mem_volume_logged(
    n: usize,
    logs: Option<&std::path::Path>,
) -> (
    Vec<Arc<MemStore>>,
    Arc<crate::health::Health>,
    Arc<RecordingSink>,
) {
    mem_volume_of((0..n).map(|_| MemStore::new(1 << 20)).collect(), logs)
}

/// [`mem_volume`] whose replicas `remote` count as remote ones.
pub fn mem_volume_remote(
    n: usize,
    remote: &[usize],
) -> (Vec<Arc<MemStore>>, Arc<crate::health::Health>) {
    let stores: Vec<Arc<MemStore>> = (0..n).map(|_| MemStore::new(1 << 20)).collect();
    for &i in remote {
        stores[i].play_remote();
    }
    let (s, h, _) = mem_volume_of(stores, None);
    (s, h)
}

/// A volume over `stores` (of one size), all online, its logs in `logs`.
pub fn mem_volume_of(
    stores: Vec<Arc<MemStore>>,
    logs: Option<&std::path::Path>,
) -> (
    Vec<Arc<MemStore>>,
    Arc<crate::health::Health>,
    Arc<RecordingSink>,
) {
    let sink = Arc::new(RecordingSink::default());
    let backings = stores
        .iter()
        .map(|s| {
            (
                wire::ReplicaUuid::random(),
                crate::backing::Backing::Memory(s.clone()),
            )
        })
        .collect();
    let vu = wire::VolumeUuid::random();
    let logs = logs.map(|dir| crate::health::LogDir {
        dir: dir.into(),
        volume_uuid: vu,
        al_capacity: 4,
        carry: Vec::new(),
    });
    let size = stores[0].size();
    let health = health_over_in("mem", vu, size, backings, Box::new(sink.clone()), logs);
    (stores, health, sink)
}

/// A health over `backings`, all online: every one gets a label (memory and
/// local: a whole new one; remote: the membership, on top of what OPEN wrote) with
/// membership epoch 1 listing them all, as an activation would write.
pub fn health_over(
    volume: &str,
    volume_uuid: wire::VolumeUuid,
    size: u64,
    backings: Vec<(wire::ReplicaUuid, crate::backing::Backing)>,
    sink: Box<dyn crate::health::StateSink>,
) -> Arc<crate::health::Health> {
    health_over_in(volume, volume_uuid, size, backings, sink, None)
}

/// [`health_over`] with its logs kept in `logs`.
pub fn health_over_in(
    volume: &str,
    volume_uuid: wire::VolumeUuid,
    size: u64,
    backings: Vec<(wire::ReplicaUuid, crate::backing::Backing)>,
    sink: Box<dyn crate::health::StateSink>,
    logs: Option<crate::health::LogDir>,
) -> Arc<crate::health::Health> {
    use crate::backing::Backing;
    use crate::health::{Health, HealthConfig, SlotSpec};
    use crate::state::ReplicaState;
    use wire::label::{Label, Membership};
    use wire::{Epoch, Generation};
    let generation = match backings.iter().find_map(|(_, b)| match b {
        Backing::Remote(c) => Some(c.generation()),
        _ => None,
    }) {
        Some(g) => g,
        None => Generation(1),
    };
    let membership = Membership {
        epoch: Epoch(1),
        generation,
        members: backings.iter().map(|(u, _)| *u).collect(),
    };
    for (u, b) in &backings {
        let mut l = Label::new(volume, volume_uuid, *u, size, 4096);
        l.generation = generation;
        l.membership = membership.clone();
        match b {
            Backing::Memory(m) => m.set_label(Some(l)),
            Backing::Local(lb) => lb.write_label(&l).expect("label a local replica"),
            Backing::Remote(_) => b
                .update_label(&wire::control::LabelUpdate {
                    membership: membership.clone(),
                    outdated: false,
                })
                .expect("label a remote replica"),
        }
    }
    let health = Health::new(
        HealthConfig {
            generation,
            membership,
            no_replica_timeout: std::time::Duration::from_secs(10),
            volume: volume.into(),
            size: crate::ids::ByteLen(size),
            grain: crate::dirty::Grain::DEFAULT,
            logs,
        },
        backings
            .iter()
            .map(|(u, b)| SlotSpec {
                location: b.location(),
                uuid: *u,
                backing: Some(b.clone()),
                remote: b.is_remote(),
                state: ReplicaState::Online,
                errors: 0,
                dirty: None,
            })
            .collect(),
        sink,
    )
    .expect("health");
    for (i, (_, b)) in backings.iter().enumerate() {
        if let Backing::Remote(c) = b {
            c.set_events(health.conn_events(crate::ids::SlotIndex(i as u8)));
        }
    }
    health
}

/// A nexus over a health, with [`test_handle`]s.
/// A new memory replica of the volume `like` belongs to (labelled, as OPEN with
/// create or a new file would), as a slot to add: Faulted, a new replica.
pub fn fresh_mem_slot(like: &MemStore) -> (Arc<MemStore>, crate::health::SlotSpec) {
    let l = like.label().expect("a labelled replica");
    let fresh = MemStore::new(l.size as usize);
    let uuid = wire::ReplicaUuid::random();
    let mut label = wire::label::Label::new(&l.volume, l.volume_uuid, uuid, l.size, l.block_size);
    // Opened by the running owner, as a remote replica's OPEN would stamp it.
    (label.generation, label.owner) = (l.generation, l.owner);
    fresh.set_label(Some(label));
    let spec = crate::health::SlotSpec {
        location: format!("mem:{:p}", Arc::as_ptr(&fresh)),
        uuid,
        backing: Some(crate::backing::Backing::Memory(fresh.clone())),
        remote: false,
        state: crate::state::ReplicaState::Faulted {
            reason: crate::state::FaultReason::NewReplica,
        },
        errors: 0,
        dirty: None,
    };
    (fresh, spec)
}

/// Write `len` bytes of `byte` at `off` through `n`, as the application would.
pub fn write_through(n: &crate::nexus::Nexus, off: u64, len: u64, byte: u8) -> Result<u32, Errno> {
    let mut buf = vec![byte; len as usize];
    futures::executor::block_on(n.submit(
        crate::request::BlockRequest::Write {
            offset: ByteOffset(off),
            len: ByteLen(len),
            fua: false,
        },
        &mut buf,
    ))
}

pub fn mem_nexus(h: &Arc<crate::health::Health>) -> crate::nexus::Nexus {
    test_nexus(h, crate::ranges::RangeTable::new())
}

/// A nexus with [`test_handle`]s, sharing `ranges` (one table per volume).
pub fn test_nexus(
    h: &Arc<crate::health::Health>,
    ranges: Arc<crate::ranges::RangeTable>,
) -> crate::nexus::Nexus {
    crate::nexus::Nexus::new(h.clone(), ranges, None, Box::new(test_handle))
}

/// The per-queue handle of a backing, off a ublk queue: local replicas on a
/// private blocking ring, remote ones with no queue to kick (their futures' wakers
/// suffice), memory ones.
pub fn test_handle(b: &crate::backing::Backing) -> Box<dyn Replica> {
    b.thread_handle().expect("a thread's replica handle")
}

/// Wraps a replica handle so its mutations fail (EIO) while `fail` is set: error
/// injection on a real replica (its label and the rest of its backing keep working).
pub struct Failing {
    pub inner: Box<dyn Replica>,
    pub fail: Arc<std::sync::atomic::AtomicBool>,
}

impl Failing {
    fn failing(&self) -> bool {
        self.fail.load(Ordering::SeqCst)
    }
}

impl Replica for Failing {
    fn location(&self) -> &str {
        self.inner.location()
    }
    fn is_remote(&self) -> bool {
        self.inner.is_remote()
    }
    fn read<'a>(&'a self, offset: ByteOffset, buf: &'a mut [u8]) -> IoFuture<'a> {
        self.inner.read(offset, buf)
    }
    fn write<'a>(&'a self, offset: ByteOffset, buf: &'a [u8], fua: bool) -> IoFuture<'a> {
        if self.failing() {
            return Box::pin(std::future::ready(Err(Errno::EIO)));
        }
        self.inner.write(offset, buf, fua)
    }
    fn flush(&self) -> IoFuture<'_> {
        if self.failing() {
            return Box::pin(std::future::ready(Err(Errno::EIO)));
        }
        self.inner.flush()
    }
    fn discard(&self, offset: ByteOffset, len: ByteLen) -> IoFuture<'_> {
        if self.failing() {
            return Box::pin(std::future::ready(Err(Errno::EIO)));
        }
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: ByteOffset, len: ByteLen, no_unmap: bool) -> IoFuture<'_> {
        if self.failing() {
            return Box::pin(std::future::ready(Err(Errno::EIO)));
        }
        self.inner.write_zeroes(offset, len, no_unmap)
    }
}
