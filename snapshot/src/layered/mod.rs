//! The layered copy-on-write store: a replica's container (file or raw block
//! device) holding the volume's base plus a writable head layer and sealed
//! snapshot layers, with O(1) reads whatever the number of snapshots.
//!
//! ```text
//! [ base: volume size ]  the volume's bytes at their own offsets (layer 0): a
//!                        flat image is a layered store without snapshots
//! [ label: 64 KiB ]      wire::label, unchanged
//! [ superblock: 2 x 32 KiB ]  layer table; slots written alternately (seq, CRC)
//! [ descriptor table ]   32 B per (layer, 64 KiB grain): pool grain, 4 KiB
//!                        presence and zero masks; written a 4 KiB page at a time
//! [ pool ]               64 KiB grains, allocated on first touch (a file grows
//!                        sparse; a device's reserve is its limit)
//! ```
//!
//! **Layers.** Sealed snapshots are immutable; only the head is written. A block
//! a layer lacks (in neither mask) falls through to its parent; a zero bit reads
//! zeroes (WRITE_ZEROES/DISCARD), never the parent. Each pool grain belongs to one
//! descriptor. Layer ids are never reused, so a descriptor of a layer the
//! superblock no longer lists is free space. The head view is an in-memory index,
//! one byte per block naming the newest layer that has it, rebuilt at open: a read
//! is two lookups at any depth. A snapshot leaves the index as it is (O(1)).
//!
//! **Writes.** A write to blocks the head has goes in place, with no metadata
//! (the flat store's path); with FUA over a block whose presence bit is not
//! committed yet, the write commits it too (else a crash would lose the write). A first touch takes the grain's lock, gets a pool
//! grain, writes the data (a sub-4 KiB write fills the rest of its block from the
//! layer below: read-modify-write under that lock), then sets presence bits in
//! memory. Descriptors reach the disk at the next FLUSH or FUA.
//!
//! **Write order and fsync points** (what a crash can leave):
//! 1. Commit (FLUSH, FUA on a first touch, every metadata operation): under the
//!    commit lock, encode the dirty descriptor pages *first* (they describe only
//!    writes already complete), `fdatasync` (their data is durable), write the
//!    pages, and when the table grew or layers changed, `fdatasync` and the
//!    superblock (it never counts a page not yet on disk), then `fdatasync`. A crash before the second sync loses presence bits of writes
//!    not yet flushed: those blocks read as before the write, which an unflushed
//!    write may. A presence bit is never durable before its data.
//! 2. Layer changes (snapshot, undo, revert, delete, the end of a merge) write the
//!    next superblock slot and sync before they are acknowledged; the older slot
//!    stays intact until then, so a torn superblock leaves the previous state.
//! 3. A freed descriptor slot or pool grain is reused only after its freeing is
//!    durable and every read that resolved to it before has finished (an epoch
//!    pair counts reads in flight), so no crash and no race shows one layer's old
//!    data in another.
//! 4. A format writes the first superblock into both slots (an older store's
//!    superblock left on a device never wins) and a random store id every
//!    descriptor carries (an older store's descriptors are free space).
//!
//! **Deletes** mark the layer hidden (durable), then merge it into its only child
//! grain by grain in the background ([`Layered::merge_step`]): a grain the child
//! lacks changes owner (one descriptor, no copy); otherwise the blocks the child
//! lacks are copied. A crash mid-merge resumes at open. The base cannot be merged
//! (its space is the volume's own): deleting it hides it.

pub mod format;
mod locks;
pub mod meta;
pub mod sim;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use wire::SnapshotUuid;

use crate::error::{Errno, StoreError};
use crate::IoResult;
pub use format::Geometry;
use format::{
    decode_desc, encode_super, pick_super, DescSlot, FormatError, LayerId, VolGrain, BLOCK,
    BLOCKS_PER_GRAIN, DESCS_PER_PAGE, DESC_LEN, DESC_PAGE, GRAIN, MAX_NAME, SB_SLOT,
};
use locks::KeyLocks;
pub use meta::{MergePlan, Meta, MetaError, Src};

/// The container I/O a layered store needs, at container offsets: the flat
/// store's handle on the data path, a crash-simulating disk in tests.
pub trait RawIo {
    fn read_at<'a>(&'a self, off: u64, buf: &'a mut [u8]) -> impl Future<Output = IoResult> + 'a;
    fn write_at<'a>(
        &'a self,
        off: u64,
        buf: &'a [u8],
        fua: bool,
    ) -> impl Future<Output = IoResult> + 'a;
    /// Every completed write durable.
    fn sync(&self) -> impl Future<Output = IoResult> + '_;
    /// The range reads zeroes (the base of a store without snapshots); with
    /// `no_unmap`, its space stays allocated.
    fn zero_at(&self, off: u64, len: u64, no_unmap: bool) -> impl Future<Output = IoResult> + '_;
    /// Which parts of the range may hold data (`None`: cannot tell), as
    /// `Replica::data_extents` says.
    fn extents(&self, _off: u64, _len: u64) -> Option<Vec<crate::Extent>> {
        None
    }
}

/// Run a future to completion on this thread (opening a store, the operations
/// run outside a queue): it parks while a lock another thread holds is busy.
pub fn now<F: Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// What the replica's label says the container is: the label is the authority,
/// so that what an earlier store left past the label of a reused device is
/// never taken for this replica's snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A flat image: the store area is ignored (formatted afresh, both superblock
    /// slots, at the first snapshot).
    Plain,
    /// Layered: the store must be there.
    Layered,
    /// Whatever the superblock area holds (tests, `store check`).
    Detect,
}

/// Snapshots a store keeps unless told otherwise.
pub const DEFAULT_MAX_SNAPSHOTS: usize = 32;
/// Hard limit (the layer table, the index's byte per block).
pub const MAX_SNAPSHOTS: usize = format::MAX_LAYERS - 2;

impl Geometry {
    /// A store in a file: room for every grain in 65 layers' maps, and a pool of
    /// four volumes (the file grows only as grains are used).
    pub fn for_file(volume_size: u64) -> Result<Geometry, String> {
        whole_blocks(volume_size)?;
        let grains = volume_size.div_ceil(GRAIN);
        let desc = (grains * 65).min(u32::MAX as u64 - 1) as u32;
        let pool = (grains * 4).min(u32::MAX as u64 - 1) as u32;
        Ok(Geometry::new(
            volume_size,
            wire::label::LABEL_AREA,
            desc,
            pool,
        ))
    }

    /// A store on a block device of `device_size` bytes: what lies beyond the
    /// volume and its label is the reserve, a sixteenth of it for descriptors.
    pub fn for_device(volume_size: u64, device_size: u64) -> Result<Geometry, String> {
        whole_blocks(volume_size)?;
        let first = Geometry::new(volume_size, wire::label::LABEL_AREA, 0, 0);
        let reserve = device_size.saturating_sub(first.table_offset);
        let grains = volume_size.div_ceil(GRAIN);
        let desc = (reserve / 16 / DESC_LEN as u64)
            .min(grains * 65)
            .min(u32::MAX as u64 - 1);
        let mut g = Geometry::new(volume_size, wire::label::LABEL_AREA, desc as u32, 0);
        let pool = device_size.saturating_sub(g.pool_offset) / GRAIN;
        g.pool_grains = pool.min(u32::MAX as u64 - 1) as u32;
        if desc < 2 * grains || pool < 16 {
            return Err(format!(
                "a {device_size}-byte device leaves no room for snapshots of a {volume_size}-byte volume: give it at least {} bytes (the volume, 64 KiB of label, and a reserve)",
                first.table_offset + 2 * grains * DESC_LEN as u64 * 16 + 16 * GRAIN + GRAIN
            ));
        }
        Ok(g)
    }
}

/// Snapshots track 4 KiB blocks: a volume of 512-byte blocks whose size is not a
/// 4 KiB multiple cannot have them.
fn whole_blocks(volume_size: u64) -> Result<(), String> {
    if volume_size == 0 || !volume_size.is_multiple_of(BLOCK) {
        return Err(format!(
            "snapshots need a volume size that is a multiple of 4 KiB, not {volume_size} bytes"
        ));
    }
    Ok(())
}

/// What a store's metadata operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    Done,
    /// Already so (a retried operation: snapshot ops are idempotent by uuid).
    AlreadyDone,
}

/// The state every queue's handle of one layered store shares.
pub struct Shared {
    /// Fixed at open (the copy in `meta` never changes): range checks take no lock.
    geo: Geometry,
    meta: RwLock<Meta>,
    /// Mirrors `meta.is_layered()`: a flat image's I/O takes no lock. It changes
    /// only under the owner's barrier (no I/O in flight).
    layered: AtomicBool,
    /// Why this container cannot take snapshots (a device without a reserve).
    no_room: Option<String>,
    grains: KeyLocks,
    /// Key 0: commits. Key 1: layer operations and merge steps.
    serial: KeyLocks,
    epoch: AtomicU64,
    active: [AtomicUsize; 2],
    max_snapshots: usize,
}

const COMMIT: u64 = 0;
const OPS: u64 = 1;

fn meta_err(e: MetaError) -> StoreError {
    match e {
        MetaError::PoolFull => StoreError::SnapshotSpace("the pool has no free grain".into()),
        MetaError::TableFull => StoreError::SnapshotSpace(
            "the descriptor table could not map a new head: delete snapshots first".into(),
        ),
        MetaError::TooManyLayers => StoreError::TooManySnapshots {
            limit: MAX_SNAPSHOTS,
        },
        MetaError::NoSuchSnapshot(u) => StoreError::NoSuchSnapshot(u),
        MetaError::Damaged(m) => StoreError::Damaged(m),
    }
}

fn io_errno(e: MetaError) -> Errno {
    match e {
        MetaError::PoolFull | MetaError::TableFull => Errno::ENOSPC,
        _ => Errno::EIO,
    }
}

impl Shared {
    /// Open the store in a container: its superblock and descriptors when it has
    /// them and `layout` allows (then `geo` must agree on the volume size), else a
    /// store with only its base on `geo`, formatted at its first snapshot.
    pub async fn open<R: RawIo>(
        io: &R,
        room: Result<Geometry, String>,
        layout: Layout,
        max_snapshots: usize,
    ) -> Result<Shared, StoreError> {
        let (geo, no_room) = match room {
            Ok(g) => (g, None),
            Err(why) => (Geometry::new(0, 0, 0, 0), Some(why)),
        };
        if no_room.is_some() && layout == Layout::Plain {
            return Ok(Shared::with(Meta::fresh(geo, 0), no_room, max_snapshots));
        }
        let mut slots = vec![0u8; 2 * SB_SLOT as usize];
        if layout != Layout::Plain {
            io.read_at(geo.sb_offset, &mut slots)
                .await
                .map_err(StoreError::Io)?;
        }
        let meta = match pick_super(&slots[..SB_SLOT as usize], &slots[SB_SLOT as usize..]) {
            Err(FormatError::Absent) if layout == Layout::Layered => {
                return Err(StoreError::Damaged(
                    "the label says the replica has snapshots, but its store has no superblock"
                        .into(),
                ))
            }
            Err(FormatError::Absent) => Meta::fresh(geo, u64::from_le_bytes(wire::random::bytes())),
            Err(FormatError::Corrupt(m)) => return Err(StoreError::Damaged(m)),
            Ok(sup) => {
                if sup.geometry.volume_size != geo.volume_size {
                    return Err(StoreError::Damaged(format!(
                        "the store is of a {}-byte volume, not {}",
                        sup.geometry.volume_size, geo.volume_size
                    )));
                }
                let pages = sup.desc_hwm.div_ceil(DESCS_PER_PAGE);
                let mut descs = Vec::with_capacity(sup.desc_hwm as usize);
                let mut page = vec![0u8; DESC_PAGE as usize];
                for p in 0..pages {
                    io.read_at(sup.geometry.page_offset(p), &mut page)
                        .await
                        .map_err(StoreError::Io)?;
                    for i in 0..DESCS_PER_PAGE {
                        let at = i as usize * DESC_LEN;
                        descs.push((
                            DescSlot(p * DESCS_PER_PAGE + i),
                            decode_desc(sup.store_id, &page[at..at + DESC_LEN]),
                        ));
                    }
                }
                Meta::load(&sup, descs).map_err(meta_err)?
            }
        };
        Ok(Shared::with(meta, no_room, max_snapshots))
    }

    fn with(meta: Meta, no_room: Option<String>, max_snapshots: usize) -> Shared {
        Shared {
            geo: meta.geo,
            layered: AtomicBool::new(meta.is_layered()),
            meta: RwLock::new(meta),
            no_room,
            grains: KeyLocks::default(),
            serial: KeyLocks::default(),
            epoch: AtomicU64::new(0),
            active: [AtomicUsize::new(0), AtomicUsize::new(0)],
            max_snapshots: max_snapshots.min(MAX_SNAPSHOTS),
        }
    }

    /// A stand-in while a backing is being opened.
    pub fn placeholder() -> Shared {
        Shared::with(Meta::fresh(Geometry::new(0, 0, 0, 0), 0), None, 0)
    }

    /// Where the store's parts are.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Whether the store was ever formatted (it has a superblock): its label
    /// must say so, for an older ublkd to refuse it.
    pub fn is_formatted(&self) -> bool {
        self.meta.read().unwrap().seq > 0
    }

    fn sync_flag(&self) {
        let layered = self.meta.read().unwrap().is_layered();
        self.layered.store(layered, Ordering::Release);
    }

    pub fn is_layered(&self) -> bool {
        self.layered.load(Ordering::Acquire)
    }

    /// The snapshots, oldest first, with what each owns and a delete would free.
    pub fn list(&self) -> Vec<wire::control::SnapshotEntry> {
        let m = self.meta.read().unwrap();
        let mut v: Vec<wire::control::SnapshotEntry> = m
            .snapshots()
            .map(|l| {
                let (owned, reclaim) = m.usage(l.rec.id);
                wire::control::SnapshotEntry {
                    uuid: l.rec.uuid,
                    name: l.rec.name.clone(),
                    created_ms: l.rec.created_ms,
                    owned_bytes: owned,
                    reclaimable_bytes: reclaim,
                    deleting: l.rec.deleting,
                }
            })
            .collect();
        v.sort_by_key(|s| (s.created_ms, s.name.clone()));
        v
    }

    /// The structural check of the metadata (`store check`, the tests).
    pub fn check(&self) -> Result<(), String> {
        self.meta.read().unwrap().check()
    }

    /// Pool grains used and free.
    pub fn pool_usage(&self) -> (u32, u32) {
        self.meta.read().unwrap().pool_usage()
    }

    /// Whether a deleted snapshot still has merge work.
    pub fn merge_pending(&self) -> bool {
        self.meta.read().unwrap().next_merge().is_some()
    }

    /// Register a read that resolved under the meta lock (held by the caller).
    fn enter(&self) -> usize {
        let e = (self.epoch.load(Ordering::SeqCst) & 1) as usize;
        self.active[e].fetch_add(1, Ordering::SeqCst);
        e
    }

    fn leave(&self, e: usize) {
        self.active[e].fetch_sub(1, Ordering::SeqCst);
    }

    /// Wait until no read that resolved before now is in flight.
    fn grace(&self) {
        let old = {
            let _w = self.meta.write().unwrap();
            (self.epoch.fetch_add(1, Ordering::SeqCst) & 1) as usize
        };
        while self.active[old].load(Ordering::SeqCst) != 0 {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.meta.read().unwrap();
        write!(f, "store(layers {}, head {})", m.layers.len(), m.head.0)
    }
}

/// A per-queue handle: the shared store plus this queue's container I/O.
pub struct Layered<R: RawIo> {
    shared: Arc<Shared>,
    io: R,
}

/// A piece of a request: `len` bytes at `buf_off` of the caller's buffer, from or
/// to `src`.
struct Piece {
    buf_off: usize,
    len: usize,
    src: Src,
}

fn push_piece(v: &mut Vec<Piece>, buf_off: usize, len: usize, src: Src) {
    if let Some(last) = v.last_mut() {
        let contiguous = match (last.src, src) {
            (Src::At(a), Src::At(b)) => a + last.len as u64 == b,
            (Src::Zero, Src::Zero) => true,
            _ => false,
        };
        if contiguous && last.buf_off + last.len == buf_off {
            last.len += len;
            return;
        }
    }
    v.push(Piece { buf_off, len, src });
}

/// The pieces of `[off, off + len)` per 4 KiB block, through `resolve`.
fn pieces(off: u64, len: usize, mut resolve: impl FnMut(u64) -> Option<Src>) -> Option<Vec<Piece>> {
    let mut v = Vec::new();
    let mut at = off;
    let end = off + len as u64;
    while at < end {
        let b = at / BLOCK;
        let in_block = at % BLOCK;
        let n = (BLOCK - in_block).min(end - at);
        let src = match resolve(b)? {
            Src::At(o) => Src::At(o + in_block),
            Src::Zero => Src::Zero,
        };
        push_piece(&mut v, (at - off) as usize, n as usize, src);
        at += n;
    }
    Some(v)
}

/// The runs of whole blocks of `[off, off + len)` for which `data` holds,
/// clipped to the range: sorted, merged, at most `MAX_EXTENTS` (past that the
/// last runs to the range's end, over-reporting, which is safe).
fn block_runs(off: u64, len: u64, data: impl Fn(u64) -> bool) -> Vec<crate::Extent> {
    let end = off + len;
    let mut out: Vec<crate::Extent> = Vec::new();
    let mut at = off;
    while at < end {
        let b = at / BLOCK;
        let next = ((b + 1) * BLOCK).min(end);
        if data(b) {
            let full = out.len() == crate::MAX_EXTENTS;
            match out.last_mut() {
                Some((o, l)) if o.0 + l.0 == at => l.0 = next - o.0,
                Some((o, l)) if full => {
                    l.0 = end - o.0;
                    break;
                }
                _ => out.push((crate::ByteOffset(at), crate::ByteLen(next - at))),
            }
        }
        at = next;
    }
    out
}

impl<R: RawIo> Layered<R> {
    pub fn new(shared: Arc<Shared>, io: R) -> Layered<R> {
        Layered { shared, io }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn io(&self) -> &R {
        &self.io
    }

    fn check_range(&self, off: u64, len: u64) -> IoResult {
        let size = self.shared.geo.volume_size;
        if off.checked_add(len).is_none_or(|e| e > size) {
            return Err(Errno::EINVAL);
        }
        Ok(())
    }

    /// Read the head view (the volume).
    pub async fn read(&self, off: u64, buf: &mut [u8]) -> IoResult {
        if !self.shared.is_layered() {
            return self.io.read_at(off, buf).await;
        }
        self.check_range(off, buf.len() as u64)?;
        let plan = {
            let m = self.shared.meta.read().unwrap();
            m.is_layered().then(|| {
                let ps = pieces(off, buf.len(), |b| Some(m.resolve(b))).expect("total");
                (ps, self.shared.enter())
            })
        };
        let Some((ps, e)) = plan else {
            return self.io.read_at(off, buf).await;
        };
        let r = self.read_pieces(&ps, buf).await;
        self.shared.leave(e);
        r
    }

    /// Read snapshot `uuid` as it was taken (walks its ancestry: rebuild, verify
    /// and export use it, not the data path).
    pub async fn read_snapshot(&self, uuid: SnapshotUuid, off: u64, buf: &mut [u8]) -> IoResult {
        self.check_range(off, buf.len() as u64)?;
        let (ps, e) = {
            let m = self.shared.meta.read().unwrap();
            let Some(s) = m.find(uuid).filter(|s| !m.layers[s].rec.deleting) else {
                return Err(Errno(libc::ENOENT));
            };
            let ps = pieces(off, buf.len(), |b| Some(m.resolve_in(s, b))).expect("total");
            (ps, self.shared.enter())
        };
        let r = self.read_pieces(&ps, buf).await;
        self.shared.leave(e);
        r
    }

    async fn read_pieces(&self, ps: &[Piece], buf: &mut [u8]) -> IoResult {
        for p in ps {
            let dst = &mut buf[p.buf_off..p.buf_off + p.len];
            match p.src {
                Src::At(o) => self.io.read_at(o, dst).await?,
                Src::Zero => dst.fill(0),
            }
        }
        Ok(())
    }

    /// Write to the head.
    pub async fn write(&self, off: u64, buf: &[u8], fua: bool) -> IoResult {
        if !self.shared.is_layered() {
            return self.io.write_at(off, buf, fua).await;
        }
        self.check_range(off, buf.len() as u64)?;
        let mut commit = false;
        let fast = {
            let m = self.shared.meta.read().unwrap();
            if m.is_layered() {
                // A FUA write over blocks whose presence is not committed yet is
                // durable only with that commit: a crash would find the layer below.
                commit = fua
                    && (off / BLOCK..=(off + buf.len() as u64 - 1) / BLOCK)
                        .any(|b| m.head_dirty(b));
                pieces(off, buf.len(), |b| m.head_has(b).map(Src::At))
            } else {
                // The flat image: the volume's own offsets.
                Some(vec![Piece {
                    buf_off: 0,
                    len: buf.len(),
                    src: Src::At(off),
                }])
            }
        };
        if let Some(ps) = fast {
            for p in &ps {
                if let Src::At(o) = p.src {
                    self.io
                        .write_at(o, &buf[p.buf_off..p.buf_off + p.len], fua && !commit)
                        .await?;
                }
            }
            if commit {
                self.commit().await?;
            }
            return Ok(());
        }
        self.first_touch(off, buf).await?;
        if fua {
            self.commit().await?;
        }
        Ok(())
    }

    /// A write touching blocks the head lacks: under the grains' locks, get pool
    /// grains, write (read-modify-write for partial blocks), then mark.
    async fn first_touch(&self, off: u64, buf: &[u8]) -> IoResult {
        let end = off + buf.len() as u64;
        let (g0, g1) = (off / GRAIN, (end - 1) / GRAIN);
        let mut guards = Vec::with_capacity((g1 - g0 + 1) as usize);
        for g in g0..=g1 {
            guards.push(self.shared.grains.lock(g).await);
        }
        {
            let mut m = self.shared.meta.write().unwrap();
            for g in g0..=g1 {
                m.head_entry(VolGrain(g as u32), true).map_err(io_errno)?;
            }
        }
        let (b0, b1) = (off / BLOCK, (end - 1) / BLOCK);
        // Per block: where the head keeps it, and for a partial block the head
        // lacks, where the rest of it is read from (the grain locks keep it so).
        let plan: Vec<(u64, Option<Src>)> = {
            let m = self.shared.meta.read().unwrap();
            let head = &m.layers[&m.head];
            (b0..=b1)
                .map(|b| {
                    let bs = b * BLOCK;
                    let entry = head.map[&VolGrain((b / BLOCKS_PER_GRAIN) as u32)];
                    let target = m.geo.grain_offset(entry.pool.expect("allocated above"))
                        + (b % BLOCKS_PER_GRAIN) * BLOCK;
                    let present = entry.present & (1 << (b % BLOCKS_PER_GRAIN)) != 0;
                    let whole = off <= bs && bs + BLOCK <= end;
                    (target, (!present && !whole).then(|| m.resolve(b)))
                })
                .collect()
        };
        let mut block: Vec<u8> = Vec::new();
        let mut direct: Vec<Piece> = Vec::new();
        for (b, (target, rmw)) in (b0..=b1).zip(plan) {
            let bs = b * BLOCK;
            let (from, to) = (off.max(bs), end.min(bs + BLOCK));
            let Some(old) = rmw else {
                push_piece(
                    &mut direct,
                    (from - off) as usize,
                    (to - from) as usize,
                    Src::At(target + (from - bs)),
                );
                continue;
            };
            // Read-modify-write: the rest of the block from the layer below.
            block.resize(BLOCK as usize, 0);
            match old {
                Src::At(o) => self.io.read_at(o, &mut block).await?,
                Src::Zero => block.fill(0),
            }
            block[(from - bs) as usize..(to - bs) as usize]
                .copy_from_slice(&buf[(from - off) as usize..(to - off) as usize]);
            self.io.write_at(target, &block, false).await?;
        }
        for p in &direct {
            if let Src::At(o) = p.src {
                self.io
                    .write_at(o, &buf[p.buf_off..p.buf_off + p.len], false)
                    .await?;
            }
        }
        self.shared
            .meta
            .write()
            .unwrap()
            .mark(b0, b1 - b0 + 1, false);
        drop(guards);
        Ok(())
    }

    /// The range reads zeroes; a snapshot below keeps its data.
    pub async fn write_zeroes(&self, off: u64, len: u64, no_unmap: bool) -> IoResult {
        if !self.shared.is_layered() {
            return self.io.zero_at(off, len, no_unmap).await;
        }
        self.check_range(off, len)?;
        let end = off + len;
        let (full0, full1) = (off.div_ceil(BLOCK) * BLOCK, end / BLOCK * BLOCK);
        if full0 >= full1 {
            return self.write(off, &vec![0u8; len as usize], false).await;
        }
        if off < full0 {
            self.write(off, &vec![0u8; (full0 - off) as usize], false)
                .await?;
        }
        if full1 < end {
            self.write(full1, &vec![0u8; (end - full1) as usize], false)
                .await?;
        }
        let (g0, g1) = (full0 / GRAIN, (full1 - 1) / GRAIN);
        let mut guards = Vec::new();
        for g in g0..=g1 {
            guards.push(self.shared.grains.lock(g).await);
        }
        let mut m = self.shared.meta.write().unwrap();
        for g in g0..=g1 {
            m.head_entry(VolGrain(g as u32), false).map_err(io_errno)?;
        }
        m.mark(full0 / BLOCK, (full1 - full0) / BLOCK, true);
        drop(m);
        drop(guards);
        Ok(())
    }

    /// The parts of `[off, off + len)` of the head that may hold data: the
    /// flat image's holes, or per block from the maps (a zeroed block is a hole;
    /// a block in the base or the pool is data). Sorted, merged, at most
    /// `MAX_EXTENTS` (past that the last runs to the end).
    pub fn data_extents(&self, off: u64, len: u64) -> Option<Vec<crate::Extent>> {
        if !self.shared.is_layered() {
            return self.io.extents(off, len);
        }
        let m = self.shared.meta.read().unwrap();
        let blocks = m.geo.volume_blocks();
        Some(block_runs(off, len, |b| {
            b < blocks && m.resolve(b) != Src::Zero
        }))
    }

    /// The parts of `[off, off + len)` where view `of` (a snapshot; `None`: the
    /// head) may differ from view `since` (an older snapshot; `None`: zeroes, so
    /// the view's data): per block, where the two resolve to different places.
    /// Over-reports, never under-reports (a grain a merge moved counts as
    /// changed). `ENOENT` names a snapshot the store lacks or is deleting; a
    /// rebuild reads the layers through it, oldest first.
    pub fn diff_extents(
        &self,
        of: Option<SnapshotUuid>,
        since: Option<SnapshotUuid>,
        off: u64,
        len: u64,
    ) -> Result<Option<Vec<crate::Extent>>, Errno> {
        self.check_range(off, len)?;
        let m = self.shared.meta.read().unwrap();
        let find = |u: SnapshotUuid| {
            m.find(u)
                .filter(|s| !m.layers[s].rec.deleting)
                .ok_or(Errno(libc::ENOENT))
        };
        let of = of.map(find).transpose()?;
        let since = since.map(find).transpose()?;
        if of.is_none() && since.is_none() {
            drop(m);
            return Ok(self.data_extents(off, len));
        }
        let of = of.unwrap_or(m.head);
        // Whole grains at a time: the walk goes block by block, in order.
        let grain = |l: LayerId, g: u64| (g, m.resolve_grain_in(l, g));
        let cache =
            std::cell::RefCell::new((grain(of, off / GRAIN), since.map(|s| grain(s, off / GRAIN))));
        let differs = |b: u64| {
            let (g, i) = (b / BLOCKS_PER_GRAIN, (b % BLOCKS_PER_GRAIN) as usize);
            let mut c = cache.borrow_mut();
            if c.0 .0 != g {
                *c = (grain(of, g), since.map(|s| grain(s, g)));
            }
            match &c.1 {
                None => c.0 .1[i] != Src::Zero,
                Some((_, older)) => c.0 .1[i] != older[i],
            }
        };
        Ok(Some(block_runs(off, len, differs)))
    }

    /// FLUSH: every completed write durable, with the metadata that finds it.
    pub async fn flush(&self) -> IoResult {
        self.commit().await
    }

    async fn commit(&self) -> IoResult {
        let _c = self.shared.serial.lock(COMMIT).await;
        self.commit_locked(false).await
    }

    /// Write the dirty descriptors (and the superblock when `layers_changed` or
    /// the table grew) after a sync of the data; the caller holds the commit lock.
    async fn commit_locked(&self, layers_changed: bool) -> IoResult {
        let (pages, sup, geo) = {
            let mut m = self.shared.meta.write().unwrap();
            let sup = (layers_changed || m.hwm_grew()).then(|| m.superblock(m.seq + 1));
            (m.capture(), sup, m.geo)
        };
        let result = self.write_meta(&pages, sup.as_ref(), &geo).await;
        let mut m = self.shared.meta.write().unwrap();
        match result {
            Ok(()) => {
                if let Some(s) = sup {
                    // A format wrote seq 2 as well (into the other slot).
                    m.seq = s.seq.max(2);
                    m.durable_hwm = s.desc_hwm;
                }
                Ok(())
            }
            Err(e) => {
                m.redirty(pages.iter().map(|(p, _)| *p));
                Err(e)
            }
        }
    }

    async fn write_meta(
        &self,
        pages: &[(u32, Vec<u8>)],
        sup: Option<&format::Super>,
        geo: &Geometry,
    ) -> IoResult {
        self.io.sync().await?;
        if pages.is_empty() && sup.is_none() {
            return Ok(());
        }
        for (p, bytes) in pages {
            self.io.write_at(geo.page_offset(*p), bytes, false).await?;
        }
        if sup.is_some() && !pages.is_empty() {
            // The superblock may count a page for the first time: that page must
            // be on disk first (a reused device's old bytes are no descriptors).
            self.io.sync().await?;
        }
        if let Some(s) = sup {
            self.io
                .write_at(geo.sb_slot_offset(s.seq), &encode_super(s), false)
                .await?;
            if s.seq == 1 {
                // A fresh format: both slots ours (see the module docs, rule 4).
                let twin = format::Super {
                    seq: 2,
                    ..s.clone()
                };
                self.io
                    .write_at(geo.sb_slot_offset(2), &encode_super(&twin), false)
                    .await?;
            }
        }
        self.io.sync().await
    }

    /// Take snapshot `uuid` of the head (the caller holds writes off: the owner's
    /// barrier). Idempotent: a snapshot with this uuid is `AlreadyDone`.
    pub async fn snapshot(
        &self,
        uuid: SnapshotUuid,
        name: &str,
        created_ms: u64,
    ) -> Result<Done, StoreError> {
        if uuid.is_nil() {
            return Err(StoreError::BadSnapshot("a nil uuid".into()));
        }
        if let Some(why) = &self.shared.no_room {
            return Err(StoreError::SnapshotSpace(why.clone()));
        }
        if name.len() > MAX_NAME {
            return Err(StoreError::BadSnapshot(format!(
                "name longer than {MAX_NAME} bytes"
            )));
        }
        let _ops = self.shared.serial.lock(OPS).await;
        let _c = self.shared.serial.lock(COMMIT).await;
        {
            let mut m = self.shared.meta.write().unwrap();
            if m.find(uuid).is_some() {
                return Ok(Done::AlreadyDone);
            }
            if m.snapshots().count() >= self.shared.max_snapshots {
                return Err(StoreError::TooManySnapshots {
                    limit: self.shared.max_snapshots,
                });
            }
            m.seal(uuid, name, created_ms).map_err(meta_err)?;
        }
        self.shared.sync_flag();
        if let Err(e) = self.commit_locked(true).await {
            let _ = self.shared.meta.write().unwrap().unseal(uuid);
            self.shared.sync_flag();
            return Err(StoreError::Io(e));
        }
        Ok(Done::Done)
    }

    /// Undo snapshot `uuid` taken by a barrier that failed elsewhere: only while
    /// nothing was written after it. `AlreadyDone` when there is no such snapshot.
    pub async fn unsnapshot(&self, uuid: SnapshotUuid) -> Result<Done, StoreError> {
        let _ops = self.shared.serial.lock(OPS).await;
        let _c = self.shared.serial.lock(COMMIT).await;
        let undone = self
            .shared
            .meta
            .write()
            .unwrap()
            .unseal(uuid)
            .map_err(meta_err)?;
        if !undone {
            return Ok(Done::AlreadyDone);
        }
        self.shared.sync_flag();
        self.commit_locked(true).await.map_err(StoreError::Io)?;
        Ok(Done::Done)
    }

    /// Roll the head back to snapshot `uuid` (the volume must be quiet: no I/O in
    /// flight). Later snapshots stay.
    pub async fn revert(&self, uuid: SnapshotUuid) -> Result<Done, StoreError> {
        let _ops = self.shared.serial.lock(OPS).await;
        let _c = self.shared.serial.lock(COMMIT).await;
        // The old head's uncommitted descriptors go out first: written after its
        // release they would be zeroes, and a crash before the superblock that
        // drops it would leave it listed but missing grains.
        self.commit_locked(false).await.map_err(StoreError::Io)?;
        self.shared
            .meta
            .write()
            .unwrap()
            .revert(uuid)
            .map_err(meta_err)?;
        self.commit_locked(true).await.map_err(StoreError::Io)?;
        drop(_c);
        self.shared.grace();
        self.shared.meta.write().unwrap().release_pending();
        Ok(Done::Done)
    }

    /// Drop every snapshot and the head's own data: the store is its base
    /// again, unformatted (its old table is ignored: the next format has a new
    /// store id). For a full rebuild, which rewrites the whole volume; the caller
    /// labels the replica plain. `AlreadyDone` when it had no store.
    pub async fn reset(&self) -> Result<Done, StoreError> {
        let _ops = self.shared.serial.lock(OPS).await;
        let _c = self.shared.serial.lock(COMMIT).await;
        let mut m = self.shared.meta.write().unwrap();
        if m.seq == 0 && !m.is_layered() {
            return Ok(Done::AlreadyDone);
        }
        *m = Meta::fresh(self.shared.geo, u64::from_le_bytes(wire::random::bytes()));
        drop(m);
        self.shared.sync_flag();
        Ok(Done::Done)
    }

    /// Hide snapshot `uuid` and queue its merge ([`Layered::merge_step`]).
    pub async fn delete(&self, uuid: SnapshotUuid) -> Result<Done, StoreError> {
        let _ops = self.shared.serial.lock(OPS).await;
        let _c = self.shared.serial.lock(COMMIT).await;
        let marked = match self.shared.meta.write().unwrap().mark_deleting(uuid) {
            Ok(m) => m,
            Err(MetaError::NoSuchSnapshot(_)) => return Ok(Done::AlreadyDone),
            Err(e) => return Err(meta_err(e)),
        };
        if !marked {
            return Ok(Done::AlreadyDone);
        }
        self.commit_locked(true).await.map_err(StoreError::Io)?;
        Ok(Done::Done)
    }

    /// One grain of merge work; `false` when there is none. Blocks in a grace
    /// period: run it on a thread of its own, not a queue's.
    pub async fn merge_step(&self) -> Result<bool, StoreError> {
        let _ops = self.shared.serial.lock(OPS).await;
        let Some((s, g)) = self.shared.meta.read().unwrap().next_merge() else {
            return Ok(false);
        };
        let Some(g) = g else {
            let _c = self.shared.serial.lock(COMMIT).await;
            self.shared.meta.write().unwrap().merge_done(s);
            self.commit_locked(true).await.map_err(StoreError::Io)?;
            return Ok(true);
        };
        let _grain = self.shared.grains.lock(g.0 as u64).await;
        let (plan, geo) = {
            let mut m = self.shared.meta.write().unwrap();
            (m.merge_plan(s, g).map_err(meta_err)?, m.geo)
        };
        if let MergePlan::Copy {
            from: Some(from),
            to: Some(to),
            blocks,
            ..
        } = plan
        {
            let mut block = vec![0u8; BLOCK as usize];
            for i in 0..BLOCKS_PER_GRAIN {
                if blocks & (1 << i) != 0 {
                    let (src, dst) = (
                        geo.grain_offset(from) + i * BLOCK,
                        geo.grain_offset(to) + i * BLOCK,
                    );
                    self.io
                        .read_at(src, &mut block)
                        .await
                        .map_err(StoreError::Io)?;
                    self.io
                        .write_at(dst, &block, false)
                        .await
                        .map_err(StoreError::Io)?;
                }
            }
        }
        if let MergePlan::Copy { .. } = plan {
            // The child's descriptor first, durable, then the freed one: the two
            // may sit in different table pages, and a power loss that kept only
            // the freeing would lose the copied blocks from the child's view.
            self.shared
                .meta
                .write()
                .unwrap()
                .merge_grow_child(s, g, &plan);
            self.commit().await.map_err(StoreError::Io)?;
        }
        self.shared.meta.write().unwrap().merge_finish(s, g, &plan);
        drop(_grain);
        self.commit().await.map_err(StoreError::Io)?;
        if self.shared.meta.read().unwrap().has_pending() {
            self.shared.grace();
            self.shared.meta.write().unwrap().release_pending();
        }
        Ok(true)
    }
}
