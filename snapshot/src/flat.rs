//! The flat store: a regular file (created sparse at the volume size when missing)
//! or a raw block device, driven through io_uring.
//!
//! Data I/O uses an `O_DIRECT` descriptor whenever offset, length and buffer are
//! aligned to what the backing store accepts, and a buffered descriptor otherwise;
//! FLUSH is `fdatasync`, FUA is `RWF_DSYNC` on the write itself.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use io_uring::{opcode, types};

use wire::label::{self, AreaRead, Label, LABEL_AREA, SLOT_LEN};

use crate::error::{Errno, StoreError};
use crate::layered::{now, Done, Geometry, Layered, Layout, RawIo, Shared, DEFAULT_MAX_SNAPSHOTS};
use crate::uring::Uring;
use crate::{ByteLen, ByteOffset, Extent, IoResult, MAX_EXTENTS};
use wire::control::{SnapshotAction, SnapshotReply};
use wire::SnapshotUuid;

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingKind {
    File,
    BlockDevice,
}

/// Whether [`LocalBacking::open`] may create a missing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// First activation of a volume: a missing file is created sparse.
    IfMissing,
    /// The volume already has data: a missing backing is an error, not a fresh start.
    Never,
}

/// The open backing store of one local replica, shared by all queue threads.
#[derive(Debug)]
pub struct LocalBacking {
    path: PathBuf,
    location: String,
    kind: BackingKind,
    buffered: File,
    direct: Option<File>,
    /// Offset/length/address alignment the direct descriptor needs.
    dio_align: u64,
    /// Bytes of volume data; the label area (`LABEL_AREA`) follows.
    data_size: u64,
    /// The label last read or written, and its slot's sequence number (`None`:
    /// not read yet).
    label: std::sync::Mutex<Option<(u64, Option<Label>)>>,
    /// Memory-backed (tmpfs/ramfs): a read or write is a memcpy that never waits for a
    /// device, while io_uring would hand it to an io-wq worker thread (tmpfs has no
    /// non-blocking read/write path). Serve it inline on the queue thread instead.
    inline: bool,
    /// The replica's store: the flat image until its first snapshot, layered
    /// after (see [`crate::layered`]).
    store: Arc<Shared>,
    /// A merge thread runs.
    merging: std::sync::atomic::AtomicBool,
}

impl LocalBacking {
    /// Open a replica's backing: `volume_size` bytes of data, then the label area.
    /// With [`Create::IfMissing`] a missing regular file is created sparse (never
    /// under `/dev` but `/dev/shm`: a vanished disk must not come back as a file in
    /// devtmpfs). A file of exactly `volume_size` bytes (made by ublkd 0.1, before
    /// labels) is extended by the label area; a block device needs that room beyond
    /// the volume. Files are locked (`flock`), block devices opened `O_EXCL`, so two
    /// daemons can never write the same replica.
    pub fn open(path: &Path, volume_size: u64, create: Create) -> Result<LocalBacking, StoreError> {
        let err = |what: &'static str| {
            let path = path.to_path_buf();
            move |source| StoreError::Open { path, what, source }
        };
        let kind = match std::fs::metadata(path) {
            Ok(m) if m.file_type().is_block_device() => BackingKind::BlockDevice,
            Ok(m) if m.file_type().is_file() => BackingKind::File,
            Ok(_) => {
                return Err(StoreError::UnsupportedKind {
                    path: path.to_path_buf(),
                })
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && create == Create::IfMissing
                    && (!path.starts_with("/dev") || path.starts_with("/dev/shm")) =>
            {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(err("create parent directory"))?;
                }
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(err("create"))?;
                f.set_len(volume_size + LABEL_AREA)
                    .map_err(err("size new file"))?;
                f.sync_all().map_err(err("sync new file"))?;
                tracing::info!(path = %path.display(), volume_size, "created sparse replica file");
                BackingKind::File
            }
            Err(e) => return Err(err("stat")(e)),
        };

        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if kind == BackingKind::BlockDevice {
            opts.custom_flags(libc::O_EXCL);
        }
        let buffered = opts.open(path).map_err(err("open"))?;
        if kind == BackingKind::File {
            // SAFETY: plain flock on an fd we own.
            if unsafe { libc::flock(buffered.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                return Err(err("lock (is another ublkd using it?)")(
                    std::io::Error::last_os_error(),
                ));
            }
        }
        let size = match kind {
            BackingKind::File => buffered.metadata().map_err(err("stat"))?.len(),
            BackingKind::BlockDevice => {
                let mut sz: u64 = 0;
                // SAFETY: BLKGETSIZE64 writes one u64.
                if unsafe { libc::ioctl(buffered.as_raw_fd(), BLKGETSIZE64, &mut sz) } != 0 {
                    return Err(err("BLKGETSIZE64")(std::io::Error::last_os_error()));
                }
                sz
            }
        };
        if size < volume_size {
            return Err(StoreError::TooSmall {
                path: path.to_path_buf(),
                size,
                volume_size,
            });
        }
        if size < volume_size + LABEL_AREA {
            if kind == BackingKind::File && size == volume_size {
                // A replica of ublkd 0.1: its data ends at the volume size. Append the
                // (zeroed) label area; the owner labels it on adoption.
                buffered
                    .set_len(volume_size + LABEL_AREA)
                    .and_then(|()| buffered.sync_all())
                    .map_err(err("extend for the label area"))?;
                tracing::info!(path = %path.display(), "extended an unlabelled replica file by the label area");
            } else {
                return Err(StoreError::NoRoomForLabel {
                    path: path.to_path_buf(),
                    size,
                    needed: volume_size + LABEL_AREA,
                });
            }
        }
        // A second descriptor of the same open file description would share flags, so
        // open the path again. Block devices: O_EXCL is per open file, and both are ours.
        let direct = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        let dio_align = match (&direct, kind) {
            (Some(f), BackingKind::BlockDevice) => {
                let mut ssz: libc::c_int = 0;
                // SAFETY: BLKSSZGET writes one int.
                if unsafe { libc::ioctl(f.as_raw_fd(), BLKSSZGET, &mut ssz) } == 0 && ssz > 0 {
                    ssz as u64
                } else {
                    4096
                }
            }
            (Some(f), BackingKind::File) => probe_dio_align(f),
            (None, _) => 0,
        };
        if direct.is_none() {
            tracing::warn!(path = %path.display(), "O_DIRECT not supported: using buffered I/O");
        }
        let inline = kind == BackingKind::File && memory_backed(&buffered);
        let mut backing = LocalBacking {
            location: path.display().to_string(),
            path: path.to_path_buf(),
            kind,
            buffered,
            direct,
            dio_align,
            data_size: volume_size,
            label: std::sync::Mutex::new(None),
            inline,
            store: Arc::new(Shared::placeholder()),
            merging: std::sync::atomic::AtomicBool::new(false),
        };
        backing.store = Arc::new(backing.open_store(size)?);
        Ok(backing)
    }

    /// The store, as the label says it is: layered (label format 2) or flat.
    fn open_store(&self, size: u64) -> Result<Shared, StoreError> {
        let layout = match self.read_label() {
            Ok(AreaRead::Label { label, .. }) if label.format == label::LABEL_FORMAT_LAYERED => {
                Layout::Layered
            }
            _ => Layout::Plain,
        };
        let room = match self.kind {
            BackingKind::File => Geometry::for_file(self.data_size),
            BackingKind::BlockDevice => Geometry::for_device(self.data_size, size),
        };
        let io = SyncIo(self);
        now(Shared::open(&io, room, layout, DEFAULT_MAX_SNAPSHOTS)).map_err(|e| match e {
            StoreError::Damaged(m) => StoreError::Damaged(format!("{}: {m}", self.path.display())),
            e => e,
        })
    }

    /// The replica's store (shared by every queue's handle).
    pub fn store(&self) -> &Arc<Shared> {
        &self.store
    }

    /// The store's operations run here, blocking (not on a queue).
    fn ops(&self) -> Layered<SyncIo<'_>> {
        Layered::new(self.store.clone(), SyncIo(self))
    }

    /// Take snapshot `uuid` (the caller holds writes off). The first one makes
    /// the replica layered: its label says so in both slots before this returns,
    /// so no ublkd without snapshots serves its base as the volume.
    pub fn snapshot(
        &self,
        uuid: SnapshotUuid,
        name: &str,
        created_ms: u64,
    ) -> Result<Done, StoreError> {
        if self.kind == BackingKind::File && !self.store.is_formatted() {
            self.write_trailer()?;
        }
        let done = now(self.ops().snapshot(uuid, name, created_ms))?;
        self.label_layered()?;
        Ok(done)
    }

    /// A file about to become layered grows past its label (superblocks, table,
    /// pool), so its length no longer tells where the label is: it is sized to the
    /// whole container (sparse) and ends with a trailer naming the volume size,
    /// written before anything else moves past the label. See [`volume_size_of`].
    fn write_trailer(&self) -> Result<(), StoreError> {
        use std::os::unix::fs::FileExt;
        let err = |what| {
            let path = self.path.clone();
            move |source| StoreError::Open { path, what, source }
        };
        let end = self.store.geometry().container_len();
        let trailer = encode_trailer(self.data_size);
        self.buffered
            .set_len(end + TRAILER_LEN)
            .map_err(err("size the snapshot store"))?;
        self.buffered
            .write_all_at(&trailer, end)
            .and_then(|()| self.buffered.sync_all())
            .map_err(err("write the size trailer"))
    }

    fn label_layered(&self) -> Result<(), StoreError> {
        let current = match self.label.lock().unwrap().as_ref() {
            Some((_, Some(l))) => Some(l.clone()),
            _ => None,
        };
        if let Some(l) = current {
            if l.format != label::LABEL_FORMAT_LAYERED {
                self.write_label(&l)?;
                self.write_label(&l)?;
            }
        }
        Ok(())
    }

    /// Undo snapshot `uuid` of a barrier that failed elsewhere (nothing was
    /// written after it).
    pub fn unsnapshot(&self, uuid: SnapshotUuid) -> Result<Done, StoreError> {
        now(self.ops().unsnapshot(uuid))
    }

    /// Hide snapshot `uuid`; [`LocalBacking::merge_step`] gives its space back.
    pub fn delete_snapshot(&self, uuid: SnapshotUuid) -> Result<Done, StoreError> {
        now(self.ops().delete(uuid))
    }

    /// Roll the volume back to snapshot `uuid` (no I/O may be in flight).
    pub fn revert(&self, uuid: SnapshotUuid) -> Result<Done, StoreError> {
        now(self.ops().revert(uuid))
    }

    /// Drop every snapshot (a full rebuild's target): the store is plain again
    /// and so is its label, in both slots, so a crash after this opens it plain.
    pub fn reset_snapshots(&self) -> Result<Done, StoreError> {
        let done = now(self.ops().reset())?;
        let current = match self.label.lock().unwrap().as_ref() {
            Some((_, Some(l))) => Some(l.clone()),
            _ => None,
        };
        if let Some(l) = current.filter(|l| l.format == label::LABEL_FORMAT_LAYERED) {
            self.write_label(&l)?;
            self.write_label(&l)?;
        }
        Ok(done)
    }

    /// Where snapshot `of` (`None`: the head) may differ from snapshot `since`
    /// (`None`: zeroes); see [`Layered::diff_extents`]. Blocking.
    pub fn diff_extents(
        &self,
        of: Option<SnapshotUuid>,
        since: Option<SnapshotUuid>,
        offset: ByteOffset,
        len: ByteLen,
    ) -> Result<Option<Vec<Extent>>, Errno> {
        self.ops().diff_extents(of, since, offset.0, len.0)
    }

    /// One grain of a deleted snapshot's merge; `false` when none is left.
    pub fn merge_step(&self) -> Result<bool, StoreError> {
        now(self.ops().merge_step())
    }

    /// One snapshot operation, as an owner or the replica server asks it
    /// (blocking). A delete's merge goes on in the background.
    pub fn snapshot_action(
        self: &Arc<Self>,
        action: &SnapshotAction,
    ) -> Result<SnapshotReply, StoreError> {
        let done = match action {
            SnapshotAction::Create {
                uuid,
                name,
                created_ms,
            } => self.snapshot(*uuid, name, *created_ms)?,
            SnapshotAction::Undo { uuid } => self.unsnapshot(*uuid)?,
            SnapshotAction::Delete { uuid } => self.delete_snapshot(*uuid)?,
            SnapshotAction::Revert { uuid } => self.revert(*uuid)?,
            SnapshotAction::Reset => self.reset_snapshots()?,
            SnapshotAction::List => Done::AlreadyDone,
        };
        self.resume_merge();
        Ok(SnapshotReply {
            done: done == Done::Done,
            snapshots: self.store.list(),
        })
    }

    /// Merge deleted snapshots on a thread of their own, if any wait and no
    /// merger runs (after a delete, and after an open that found one half done).
    pub fn resume_merge(self: &Arc<Self>) {
        if !self.store.merge_pending()
            || self.merging.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let b = self.clone();
        let spawned = std::thread::Builder::new()
            .name("merge".into())
            .spawn(move || {
                loop {
                    match b.merge_step() {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(e) => {
                            tracing::error!(replica = %b.path.display(), error = %e, "snapshot merge stopped");
                            break;
                        }
                    }
                }
                b.merging.store(false, std::sync::atomic::Ordering::SeqCst);
                tracing::info!(replica = %b.path.display(), "snapshot merge done");
            });
        if spawned.is_err() {
            self.merging
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Read the head, the volume as it is (blocking: tests, tools).
    pub fn read_head(&self, off: u64, buf: &mut [u8]) -> Result<(), Errno> {
        now(self.ops().read(off, buf))
    }

    /// Read snapshot `uuid` (blocking: export, tests).
    pub fn read_snapshot(&self, uuid: SnapshotUuid, off: u64, buf: &mut [u8]) -> Result<(), Errno> {
        now(self.ops().read_snapshot(uuid, off, buf))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    pub fn kind(&self) -> BackingKind {
        self.kind
    }

    /// Bytes of volume data (the label area follows).
    pub fn data_size(&self) -> u64 {
        self.data_size
    }

    /// What known data (a filesystem, LVM, a partition table) the start of the
    /// data area holds ([`crate::signature::detect`]); for a backing without a
    /// label, which a full rebuild would overwrite.
    pub fn foreign_signature(&self) -> Result<Option<&'static str>, StoreError> {
        use std::os::unix::fs::FileExt;
        let len = (crate::signature::HEAD_LEN as u64).min(self.data_size) as usize;
        let mut head = vec![0u8; len];
        self.buffered
            .read_exact_at(&mut head, 0)
            .map_err(|e| StoreError::Open {
                path: self.path.clone(),
                what: "read the start of the data",
                source: e,
            })?;
        Ok(crate::signature::detect(&head))
    }

    /// The replica's label, from the two slots of its label area.
    pub fn read_label(&self) -> Result<AreaRead, StoreError> {
        let mut slots = vec![0u8; 2 * SLOT_LEN];
        let fd = self.buffered.as_raw_fd();
        // SAFETY: pread into our own buffer of that length.
        let n = unsafe {
            libc::pread(
                fd,
                slots.as_mut_ptr().cast(),
                slots.len(),
                self.data_size as libc::off_t,
            )
        };
        if n != slots.len() as isize {
            return Err(self.label_error("read", std::io::Error::last_os_error()));
        }
        let area = label::read_area(&slots[..SLOT_LEN], &slots[SLOT_LEN..]).map_err(|e| {
            StoreError::Label {
                path: self.path.clone(),
                message: e.to_string(),
            }
        })?;
        *self.label.lock().unwrap() = Some(match &area {
            AreaRead::Label { seq, label } => (*seq, Some(label.clone())),
            AreaRead::NoLabel => (0, None),
        });
        Ok(area)
    }

    /// Write `label` durably into the slot after the current one (the current one
    /// stays intact until this one is complete).
    pub fn write_label(&self, label: &Label) -> Result<(), StoreError> {
        // The format says whether the replica has snapshots: the store decides it,
        // not the caller (an owner relabelling a replica writes a fresh label).
        let mut label = label.clone();
        label.format = if self.store.is_formatted() {
            label::LABEL_FORMAT_LAYERED
        } else {
            label::LABEL_FORMAT
        };
        let label = &label;
        let current = self.label.lock().unwrap().as_ref().map(|(s, _)| *s);
        let seq = match current {
            Some(s) => s,
            None => match self.read_label() {
                Ok(AreaRead::Label { seq, .. }) => seq,
                // A damaged area is rewritten whole, starting over.
                Ok(AreaRead::NoLabel) | Err(_) => 0,
            },
        } + 1;
        let bytes = label::encode_slot(label, seq);
        let at = self.data_size + (label::slot_of(seq) * SLOT_LEN) as u64;
        let fd = self.buffered.as_raw_fd();
        // SAFETY: pwrite from our own buffer of that length.
        let n = unsafe { libc::pwrite(fd, bytes.as_ptr().cast(), bytes.len(), at as libc::off_t) };
        if n != bytes.len() as isize {
            return Err(self.label_error("write", std::io::Error::last_os_error()));
        }
        self.buffered
            .sync_data()
            .map_err(|e| self.label_error("sync", e))?;
        *self.label.lock().unwrap() = Some((seq, Some(label.clone())));
        Ok(())
    }

    /// Zero both label slots durably: the storage is no replica any more (a
    /// retired replica on a device that cannot be deleted).
    pub fn wipe_label(&self) -> Result<(), StoreError> {
        let zeroes = vec![0u8; 2 * SLOT_LEN];
        let fd = self.buffered.as_raw_fd();
        // SAFETY: pwrite from our own buffer of that length.
        let n = unsafe {
            libc::pwrite(
                fd,
                zeroes.as_ptr().cast(),
                zeroes.len(),
                self.data_size as libc::off_t,
            )
        };
        if n != zeroes.len() as isize {
            return Err(self.label_error("wipe", std::io::Error::last_os_error()));
        }
        self.buffered
            .sync_data()
            .map_err(|e| self.label_error("sync", e))?;
        *self.label.lock().unwrap() = Some((0, None));
        Ok(())
    }

    /// Replace the membership part of the label (read or written before).
    pub fn update_label(&self, update: &wire::control::LabelUpdate) -> Result<(), StoreError> {
        let current = self
            .label
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|(_, l)| l.clone());
        let mut label = match current {
            Some(l) => l,
            None => match self.read_label()? {
                AreaRead::Label { label, .. } => label,
                AreaRead::NoLabel => {
                    return Err(StoreError::Label {
                        path: self.path.clone(),
                        message: "no label to update".into(),
                    })
                }
            },
        };
        label.membership = update.membership.clone();
        label.outdated = update.outdated;
        self.write_label(&label)
    }

    fn label_error(&self, what: &str, e: std::io::Error) -> StoreError {
        StoreError::Label {
            path: self.path.clone(),
            message: format!("{what}: {e}"),
        }
    }

    /// Whether a discard here reads back as zeroes without writing them: a hole
    /// punched in a file, or a device that zeroes with unmap. Probed on the unused
    /// last 4 KiB of the label area (zero, and zero afterwards).
    pub fn cheap_zeroing(&self) -> bool {
        let at = self.data_size + LABEL_AREA - 4096;
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on our own descriptor.
        unsafe { libc::fallocate(self.buffered.as_raw_fd(), mode, at as libc::off_t, 4096) == 0 }
    }

    /// Flush the backing's written data to stable storage (outside the data path).
    pub fn sync(&self) -> std::io::Result<()> {
        self.buffered.sync_data()
    }

    /// The descriptor to use for `[offset, offset+len)` with memory at `addr`.
    fn fd_for(&self, offset: u64, len: u64, addr: usize) -> RawFd {
        match &self.direct {
            Some(f)
                if offset.is_multiple_of(self.dio_align)
                    && len.is_multiple_of(self.dio_align)
                    && (addr as u64).is_multiple_of(self.dio_align) =>
            {
                f.as_raw_fd()
            }
            _ => self.buffered.as_raw_fd(),
        }
    }
}

fn memory_backed(f: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    // SAFETY: fstatfs fills the struct we pass.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    matches!(st.f_type as i64, TMPFS_MAGIC | RAMFS_MAGIC)
}

/// Smallest alignment (512 or 4096) the filesystem accepts for O_DIRECT, found by
/// trying a read: `statx(STATX_DIOALIGN)` is not exposed by the libc crate yet.
fn probe_dio_align(f: &File) -> u64 {
    let buf = AlignedBuf::zeroed(4096);
    // SAFETY: reading 512 bytes into a 4096-byte buffer we own.
    let n = unsafe { libc::pread(f.as_raw_fd(), buf.ptr.cast(), 512, 512) };
    if n >= 0 {
        512
    } else {
        4096
    }
}

/// A page-aligned heap buffer (for zero-filling through O_DIRECT).
/// A zeroed, 4 KiB-aligned heap buffer: what O_DIRECT needs.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> AlignedBuf {
        // A zero-size layout may not be allocated: keep one byte.
        let layout = std::alloc::Layout::from_size_align(len.max(1), 4096).expect("valid layout");
        // SAFETY: non-zero size layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory allocating {len} bytes");
        AlignedBuf { ptr, layout }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: allocated and zeroed with this length.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

const ZERO_CHUNK: usize = 256 * 1024;

#[derive(Clone, Copy)]
enum Dir {
    Read,
    Write { fua: bool },
}

/// Raw container I/O of a local replica on one queue's ring: the volume's own
/// offsets for a flat image, and whatever the layered store asks for.
pub struct FlatIo<U: Uring> {
    backing: Arc<LocalBacking>,
    ring: U,
    zeroes: std::cell::OnceCell<AlignedBuf>,
}

impl<U: Uring> FlatIo<U> {
    pub fn new(backing: Arc<LocalBacking>, ring: U) -> FlatIo<U> {
        FlatIo {
            backing,
            ring,
            zeroes: std::cell::OnceCell::new(),
        }
    }

    /// Submit with a few retries for transient results.
    async fn run(&self, make: impl Fn() -> io_uring::squeue::Entry) -> i32 {
        let mut res = 0;
        for _ in 0..4 {
            res = self.ring.submit(make()).await;
            if res != -libc::EAGAIN && res != -libc::EINTR {
                break;
            }
        }
        res
    }

    async fn read_impl(&self, offset: u64, buf: &mut [u8]) -> IoResult {
        self.transfer(Dir::Read, offset, buf.as_mut_ptr(), buf.len())
            .await
    }

    async fn write_impl(&self, offset: u64, buf: &[u8], fua: bool) -> IoResult {
        // The pointer is only read from for writes.
        self.transfer(
            Dir::Write { fua },
            offset,
            buf.as_ptr().cast_mut(),
            buf.len(),
        )
        .await
    }

    /// Move `len` bytes at `addr` to/from `offset`, resubmitting after short transfers.
    /// The caller's borrow of the buffer outlives this future.
    async fn transfer(&self, dir: Dir, offset: u64, addr: *mut u8, len: usize) -> IoResult {
        if self.backing.inline {
            return self.transfer_inline(dir, offset, addr, len);
        }
        let mut done = 0usize;
        while done < len {
            let off = offset + done as u64;
            // SAFETY: done < len, inside the caller's buffer.
            let ptr = unsafe { addr.add(done) };
            let n = (len - done) as u32;
            let fd = types::Fd(self.backing.fd_for(off, n as u64, ptr as usize));
            let res = self
                .run(|| match dir {
                    Dir::Read => opcode::Read::new(fd, ptr, n).offset(off).build(),
                    Dir::Write { fua } => opcode::Write::new(fd, ptr, n)
                        .offset(off)
                        .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                        .build(),
                })
                .await;
            match res {
                r if r < 0 => return Err(Errno::from_cqe(r)),
                // The backing was checked to cover the volume: EOF means it shrank.
                0 => return Err(Errno::EIO),
                r => done += r as usize,
            }
        }
        Ok(())
    }

    /// Synchronous variant of [`Self::transfer`] for memory-backed files.
    fn transfer_inline(&self, dir: Dir, offset: u64, addr: *mut u8, len: usize) -> IoResult {
        let fd = self.backing.buffered.as_raw_fd();
        let mut done = 0usize;
        while done < len {
            // SAFETY: done < len, inside the caller's buffer, which outlives this call.
            let ptr = unsafe { addr.add(done) };
            let off = (offset + done as u64) as libc::off_t;
            let res = unsafe {
                match dir {
                    Dir::Read => libc::pread(fd, ptr.cast(), len - done, off),
                    Dir::Write { .. } => libc::pwrite(fd, ptr.cast(), len - done, off),
                }
            };
            match res {
                r if r < 0 => {
                    let e = Errno::last_os_error();
                    if e.0 != libc::EINTR {
                        return Err(e);
                    }
                }
                0 => return Err(Errno::EIO),
                r => done += r as usize,
            }
        }
        // tmpfs has no write cache to flush: FUA holds once the copy is done.
        Ok(())
    }

    async fn fallocate(&self, offset: u64, len: u64, mode: i32) -> i32 {
        let fd = self.backing.buffered.as_raw_fd();
        self.run(|| {
            opcode::Fallocate::new(types::Fd(fd), len)
                .offset(offset)
                .mode(mode)
                .build()
        })
        .await
    }

    async fn write_zero_buffers(&self, offset: u64, len: u64) -> IoResult {
        let zeroes = self.zeroes.get_or_init(|| AlignedBuf::zeroed(ZERO_CHUNK));
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK as u64) as usize;
            self.write_impl(offset + done, &zeroes.as_slice()[..n], false)
                .await?;
            done += n as u64;
        }
        Ok(())
    }
}

/// A fallocate mode the backing cannot do (EINVAL: e.g. zero-range on a device whose
/// sector size the range does not fit): try the next way of zeroing.
fn is_unsupported(res: i32) -> bool {
    res == -libc::EOPNOTSUPP || res == -libc::ENOTSUP || res == -libc::EINVAL
}

/// The data extents of `[start, end)` of a file, from `SEEK_DATA` / `SEEK_HOLE`,
/// widened to 512-byte boundaries (within the range) and merged; past
/// [`MAX_EXTENTS`] the last one runs to `end`. `None` when the filesystem cannot
/// tell (an error other than ENXIO). Only ever reports more data, never less.
fn seek_data_extents(fd: RawFd, start: u64, end: u64) -> Option<Vec<Extent>> {
    let seek = |at: u64, whence| {
        // SAFETY: lseek on a descriptor we own; no memory is passed. The file
        // position it moves is unused (I/O is positioned).
        let r = unsafe { libc::lseek(fd, at as libc::off_t, whence) };
        if r < 0 {
            Err(std::io::Error::last_os_error().raw_os_error())
        } else {
            Ok(r as u64)
        }
    };
    let mut out: Vec<Extent> = Vec::new();
    let mut at = start;
    while at < end {
        let data = match seek(at, libc::SEEK_DATA) {
            Ok(d) => d.max(at),
            // ENXIO: no data at or after `at`.
            Err(Some(libc::ENXIO)) => break,
            Err(_) => return None,
        };
        if data >= end {
            break;
        }
        // A hole found at `data` itself (punched meanwhile) still counts one byte:
        // the walk moves on, and data is over-reported, never missed.
        let hole = seek(data, libc::SEEK_HOLE).map_or(end, |h| h.max(data + 1));
        let from = (data - data % 512).max(start);
        let to = hole.div_ceil(512).saturating_mul(512).min(end);
        let full = out.len() == MAX_EXTENTS;
        match out.last_mut() {
            Some((o, l)) if from <= o.0 + l.0 => l.0 = to.max(o.0 + l.0) - o.0,
            Some((o, l)) if full => {
                l.0 = end - o.0;
                break;
            }
            _ => out.push((ByteOffset(from), ByteLen(to - from))),
        }
        at = hole;
    }
    Some(out)
}

/// The flat image's block operations (the volume's own offsets).
impl<U: Uring> FlatIo<U> {
    pub fn location(&self) -> &str {
        &self.backing.location
    }

    pub fn backing(&self) -> &Arc<LocalBacking> {
        &self.backing
    }

    /// Fill `buf` from `offset`: the whole buffer or an error, never short.
    pub async fn read(&self, offset: ByteOffset, buf: &mut [u8]) -> IoResult {
        self.read_impl(offset.0, buf).await
    }

    /// Write all of `buf` at `offset`; with `fua`, durable before completion.
    pub async fn write(&self, offset: ByteOffset, buf: &[u8], fua: bool) -> IoResult {
        self.write_impl(offset.0, buf, fua).await
    }

    /// Make every completed write durable (`fdatasync`).
    pub async fn flush(&self) -> IoResult {
        let fd = self.backing.buffered.as_raw_fd();
        let res = self
            .run(|| {
                opcode::Fsync::new(types::Fd(fd))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
            })
            .await;
        if res < 0 {
            Err(Errno::from_cqe(res))
        } else {
            Ok(())
        }
    }

    /// Not advisory: replicas must stay identical, so a discarded range reads
    /// back as zeroes on every replica. Punching a hole does that on files and on
    /// devices that zero with unmap; otherwise zero it the way WRITE_ZEROES does
    /// (the volume advertises discard only when every replica can punch).
    pub async fn discard(&self, offset: ByteOffset, len: ByteLen) -> IoResult {
        self.write_zeroes(offset, len, false).await
    }

    /// The range reads back as zeroes afterwards.
    pub async fn write_zeroes(&self, offset: ByteOffset, len: ByteLen, no_unmap: bool) -> IoResult {
        // Cheapest first; every mode guarantees zeroes on read-back.
        let zero_range = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let modes: &[i32] = if no_unmap {
            &[zero_range]
        } else {
            &[punch, zero_range]
        };
        for &mode in modes {
            match self.fallocate(offset.0, len.0, mode).await {
                r if r >= 0 => return Ok(()),
                r if is_unsupported(r) => continue,
                r => return Err(Errno::from_cqe(r)),
            }
        }
        self.write_zero_buffers(offset.0, len.0).await
    }

    /// The parts of the range that may hold data: `SEEK_DATA` / `SEEK_HOLE` on
    /// files; `None` (unknown) on block devices.
    pub fn data_extents(&self, offset: ByteOffset, len: ByteLen) -> Option<Vec<Extent>> {
        match self.backing.kind {
            BackingKind::File => seek_data_extents(
                self.backing.buffered.as_raw_fd(),
                offset.0,
                offset.0 + len.0,
            ),
            BackingKind::BlockDevice => None,
        }
    }
}

impl<U: Uring> RawIo for FlatIo<U> {
    async fn read_at(&self, off: u64, buf: &mut [u8]) -> IoResult {
        self.read_impl(off, buf).await
    }

    async fn write_at(&self, off: u64, buf: &[u8], fua: bool) -> IoResult {
        self.write_impl(off, buf, fua).await
    }

    async fn sync(&self) -> IoResult {
        self.flush().await
    }

    async fn zero_at(&self, off: u64, len: u64, no_unmap: bool) -> IoResult {
        self.write_zeroes(ByteOffset(off), ByteLen(len), no_unmap)
            .await
    }

    fn extents(&self, off: u64, len: u64) -> Option<Vec<Extent>> {
        self.data_extents(ByteOffset(off), ByteLen(len))
    }
}

/// Bytes of the trailer that ends a layered file replica.
pub const TRAILER_LEN: u64 = 4096;
const TRAILER_MAGIC: &[u8; 8] = b"UBLKSIZE";

fn encode_trailer(volume_size: u64) -> Vec<u8> {
    let mut t = vec![0u8; TRAILER_LEN as usize];
    t[..8].copy_from_slice(TRAILER_MAGIC);
    t[8..16].copy_from_slice(&volume_size.to_le_bytes());
    let crc = crc32c::crc32c(&t[..16]);
    t[16..20].copy_from_slice(&crc.to_le_bytes());
    t
}

/// The volume size of a replica file found without knowing it (the replica
/// server at start): the trailer of a layered file, else the length less the
/// label area (a flat image's last 4 KiB are the label area's unused tail).
pub fn volume_size_of(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    if len >= TRAILER_LEN {
        let mut t = vec![0u8; TRAILER_LEN as usize];
        f.read_exact_at(&mut t, len - TRAILER_LEN)?;
        let crc = u32::from_le_bytes(t[16..20].try_into().expect("4"));
        if &t[..8] == TRAILER_MAGIC && crc32c::crc32c(&t[..16]) == crc {
            return Ok(u64::from_le_bytes(t[8..16].try_into().expect("8")));
        }
    }
    Ok(len.saturating_sub(LABEL_AREA))
}

/// Blocking container I/O on the buffered descriptor, for opening a store (not
/// the data path). Reads past the end of a file read zeroes.
struct SyncIo<'a>(&'a LocalBacking);

impl RawIo for SyncIo<'_> {
    async fn read_at(&self, off: u64, buf: &mut [u8]) -> IoResult {
        use std::os::unix::fs::FileExt;
        let mut done = 0;
        while done < buf.len() {
            match self.0.buffered.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    async fn write_at(&self, off: u64, buf: &[u8], _fua: bool) -> IoResult {
        use std::os::unix::fs::FileExt;
        self.0.buffered.write_all_at(buf, off).map_err(Errno::from)
    }

    async fn sync(&self) -> IoResult {
        self.0.buffered.sync_data().map_err(Errno::from)
    }

    async fn zero_at(&self, off: u64, len: u64, _no_unmap: bool) -> IoResult {
        self.write_at(off, &vec![0u8; len as usize], false).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uring::BlockingUring;
    use futures::executor::block_on;

    fn replica(dir: &tempfile::TempDir, size: u64) -> FlatIo<BlockingUring> {
        let backing =
            LocalBacking::open(&dir.path().join("r.img"), size, Create::IfMissing).unwrap();
        FlatIo::new(Arc::new(backing), BlockingUring::new().unwrap())
    }

    #[test]
    fn creates_sparse_file_of_volume_size() {
        let dir = tempfile::tempdir().unwrap();
        let r = replica(&dir, 8 << 20);
        let meta = std::fs::metadata(dir.path().join("r.img")).unwrap();
        assert_eq!(
            meta.len(),
            (8 << 20) + LABEL_AREA,
            "data, then the label area"
        );
        assert_eq!(r.backing.kind(), BackingKind::File);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 8 << 20, "file should be sparse");
    }

    /// Disk-backed scratch space (the target dir), so I/O takes the io_uring path.
    fn disk_dir() -> tempfile::TempDir {
        tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")).unwrap()
    }

    #[test]
    fn write_read_roundtrip_through_io_uring() {
        let dir = disk_dir();
        let r = replica(&dir, 1 << 20);
        assert!(!r.backing.inline, "target dir should be disk-backed");
        roundtrip(&r);
    }

    #[test]
    fn write_read_roundtrip_inline_on_tmpfs() {
        let dir = tempfile::tempdir_in("/dev/shm").expect("tmpfs at /dev/shm");
        let r = replica(&dir, 1 << 20);
        assert!(r.backing.inline, "tmpfs files are served inline");
        roundtrip(&r);
    }

    /// SEEK_DATA / SEEK_HOLE of a sparse file: exact extents clipped to the asked
    /// range, a hole as an empty list, and past MAX_EXTENTS the last one running to
    /// the end of the range (more data, never less).
    #[test]
    fn data_extents_of_a_sparse_file() {
        const MIB: u64 = 1 << 20;
        let dir = disk_dir();
        let r = replica(&dir, 32 * MIB);
        let extents = |off: u64, len: u64| {
            r.data_extents(ByteOffset(off), ByteLen(len))
                .expect("a file on disk knows its holes")
                .into_iter()
                .map(|(o, l)| (o.0, l.0))
                .collect::<Vec<_>>()
        };
        assert_eq!(extents(0, 32 * MIB), [], "fresh: all hole");
        let block = vec![0x5au8; 8192];
        block_on(r.write(ByteOffset(MIB), &block[..4096], false)).unwrap();
        block_on(r.write(ByteOffset(5 * MIB), &block, false)).unwrap();
        assert_eq!(extents(0, 32 * MIB), [(MIB, 4096), (5 * MIB, 8192)]);
        assert_eq!(
            extents(MIB + 512, 4 * MIB),
            [(MIB + 512, 3584), (5 * MIB, 512)],
            "clipped"
        );
        assert_eq!(extents(5 * MIB + 4096, 512), [(5 * MIB + 4096, 512)]);
        assert_eq!(extents(2 * MIB, MIB), [], "between the two");
        // More extents than a reply may carry: one 4 KiB block every 64 KiB from 8 MiB.
        let n = MAX_EXTENTS as u64 + 4;
        for i in 0..n {
            block_on(r.write(ByteOffset(8 * MIB + i * 65536), &block[..4096], false)).unwrap();
        }
        let got = extents(8 * MIB, 24 * MIB);
        assert_eq!(got.len(), MAX_EXTENTS);
        let last = MAX_EXTENTS as u64 - 1;
        assert_eq!(
            got[..MAX_EXTENTS - 1],
            (0..last)
                .map(|i| (8 * MIB + i * 65536, 4096))
                .collect::<Vec<_>>()[..]
        );
        assert_eq!(
            got[MAX_EXTENTS - 1],
            (8 * MIB + last * 65536, 24 * MIB - last * 65536)
        );
    }

    fn roundtrip(r: &FlatIo<BlockingUring>) {
        let mut aligned = AlignedBuf::zeroed(8192);
        // SAFETY: test-only mutable view of our own buffer.
        let data = unsafe { std::slice::from_raw_parts_mut(aligned.ptr, 8192) };
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        block_on(r.write(ByteOffset(4096), data, true)).unwrap();
        // Sector-aligned but not page-aligned: goes through the buffered descriptor.
        block_on(r.write(ByteOffset(512), &[7u8; 512], false)).unwrap();
        let mut back = vec![0u8; 8192];
        block_on(r.read(ByteOffset(4096), &mut back)).unwrap();
        assert_eq!(&back[..], &data[..]);
        let mut small = vec![0u8; 512];
        block_on(r.read(ByteOffset(512), &mut small)).unwrap();
        assert_eq!(small, vec![7u8; 512]);
        block_on(r.flush()).unwrap();
        let _ = &mut aligned;
    }

    #[test]
    fn write_zeroes_and_discard_read_back_zero() {
        let dir = tempfile::tempdir().unwrap();
        let r = replica(&dir, 1 << 20);
        block_on(r.write(ByteOffset(0), &[0xAB; 65536], false)).unwrap();
        block_on(r.write_zeroes(ByteOffset(4096), ByteLen(8192), true)).unwrap();
        block_on(r.write_zeroes(ByteOffset(16384), ByteLen(4096), false)).unwrap();
        block_on(r.discard(ByteOffset(32768), ByteLen(4096))).unwrap();
        let mut back = vec![0u8; 65536];
        block_on(r.read(ByteOffset(0), &mut back)).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0xAB));
        assert!(back[4096..12288].iter().all(|&b| b == 0));
        assert!(back[12288..16384].iter().all(|&b| b == 0xAB));
        assert!(back[16384..20480].iter().all(|&b| b == 0));
        assert!(back[36864..].iter().all(|&b| b == 0xAB));
    }

    #[test]
    fn existing_smaller_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("small.img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let err = LocalBacking::open(&p, 1 << 20, Create::IfMissing).unwrap_err();
        assert!(matches!(err, StoreError::TooSmall { .. }), "{err}");
    }

    #[test]
    fn second_open_of_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.img");
        let _first = LocalBacking::open(&p, 1 << 20, Create::IfMissing).unwrap();
        let err = LocalBacking::open(&p, 1 << 20, Create::IfMissing).unwrap_err();
        assert!(err.to_string().contains("lock"), "{err}");
    }

    #[test]
    fn missing_backing_is_created_only_when_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("gone.img");
        let err = LocalBacking::open(&p, 1 << 20, Create::Never).unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }), "{err}");
        assert!(!p.exists());
        let err = LocalBacking::open(
            Path::new("/dev/ublkd-no-such-disk"),
            1 << 20,
            Create::IfMissing,
        )
        .unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }), "{err}");
        assert!(!Path::new("/dev/ublkd-no-such-disk").exists());
    }

    #[test]
    fn directory_is_not_a_replica() {
        let dir = tempfile::tempdir().unwrap();
        let err = LocalBacking::open(dir.path(), 1 << 20, Create::IfMissing).unwrap_err();
        assert!(matches!(err, StoreError::UnsupportedKind { .. }), "{err}");
    }
}
