//! A local replica's per-queue handle: the replica's store (flat or layered) on
//! the queue's own ring. `replication` makes it a `Replica`; the replica server
//! serves it to remote owners.

use std::sync::Arc;

use crate::error::Errno;
use crate::flat::{AlignedBuf, FlatIo, LocalBacking};
use crate::layered::Layered;
use crate::uring::Uring;
use crate::{ByteLen, ByteOffset, Extent, IoResult};

pub struct LocalReplica<U: Uring> {
    backing: Arc<LocalBacking>,
    store: Layered<FlatIo<U>>,
}

impl<U: Uring> LocalReplica<U> {
    pub fn new(backing: Arc<LocalBacking>, ring: U) -> LocalReplica<U> {
        let store = Layered::new(backing.store().clone(), FlatIo::new(backing.clone(), ring));
        backing.resume_merge();
        LocalReplica { backing, store }
    }

    pub fn location(&self) -> &str {
        self.backing.location()
    }

    pub fn backing(&self) -> &Arc<LocalBacking> {
        &self.backing
    }

    /// Fill `buf` from `offset`: the whole buffer or an error, never short.
    pub async fn read(&self, offset: ByteOffset, buf: &mut [u8]) -> IoResult {
        self.store.read(offset.0, buf).await
    }

    /// Write all of `buf` at `offset`; with `fua`, durable before completion.
    pub async fn write(&self, offset: ByteOffset, buf: &[u8], fua: bool) -> IoResult {
        self.store.write(offset.0, buf, fua).await
    }

    /// Make every completed write durable.
    pub async fn flush(&self) -> IoResult {
        self.store.flush().await
    }

    /// Not advisory: replicas must stay identical, so a discarded range reads
    /// back as zeroes on every replica (see [`FlatIo::discard`]).
    pub async fn discard(&self, offset: ByteOffset, len: ByteLen) -> IoResult {
        self.store.write_zeroes(offset.0, len.0, false).await
    }

    /// The range reads back as zeroes afterwards.
    pub async fn write_zeroes(&self, offset: ByteOffset, len: ByteLen, no_unmap: bool) -> IoResult {
        self.store.write_zeroes(offset.0, len.0, no_unmap).await
    }

    /// The parts of the range that may hold data (`None`: cannot tell).
    pub fn data_extents(&self, offset: ByteOffset, len: ByteLen) -> Option<Vec<Extent>> {
        self.store.data_extents(offset.0, len.0)
    }

    /// Fill `buf` from snapshot `uuid` at `offset` (`ENOENT`: no such snapshot).
    pub async fn read_snapshot(
        &self,
        uuid: wire::SnapshotUuid,
        offset: ByteOffset,
        buf: &mut [u8],
    ) -> IoResult {
        self.store.read_snapshot(uuid, offset.0, buf).await
    }

    /// Where view `of` may differ from view `since` (see
    /// [`Layered::diff_extents`]).
    pub fn diff_extents(
        &self,
        of: Option<wire::SnapshotUuid>,
        since: Option<wire::SnapshotUuid>,
        offset: ByteOffset,
        len: ByteLen,
    ) -> Result<Option<Vec<Extent>>, Errno> {
        self.store.diff_extents(of, since, offset.0, len.0)
    }

    /// CRC32C (little-endian bytes) of the range, read through an aligned buffer
    /// so it goes `O_DIRECT` like the data path (no page cache filled by a verify).
    pub async fn checksum(&self, offset: ByteOffset, len: ByteLen) -> Result<[u8; 4], Errno> {
        self.checksum_of(None, offset, len).await
    }

    /// [`LocalReplica::checksum`] of snapshot `of` (`None`: the head).
    pub async fn checksum_of(
        &self,
        of: Option<wire::SnapshotUuid>,
        offset: ByteOffset,
        len: ByteLen,
    ) -> Result<[u8; 4], Errno> {
        let mut buf = AlignedBuf::zeroed(len.0.min(crate::CHECKSUM_CHUNK) as usize);
        let mut crc = 0u32;
        let mut at = 0;
        while at < len.0 {
            let n = (len.0 - at).min(buf.as_slice().len() as u64) as usize;
            let chunk = &mut buf.as_mut_slice()[..n];
            match of {
                Some(u) => self.store.read_snapshot(u, offset.0 + at, chunk).await?,
                None => self.store.read(offset.0 + at, chunk).await?,
            }
            crc = crc32c::crc32c_append(crc, chunk);
            at += n as u64;
        }
        Ok(crc.to_le_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flat::Create;
    use crate::uring::BlockingUring;
    use futures::executor::block_on;
    use wire::label::{AreaRead, Label, LABEL_FORMAT, LABEL_FORMAT_LAYERED, SLOT_LEN};
    use wire::{ReplicaUuid, SnapshotUuid, VolumeUuid};

    const SIZE: u64 = 4 << 20;

    fn disk_dir() -> tempfile::TempDir {
        tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")).unwrap()
    }

    fn open(path: &std::path::Path) -> (Arc<LocalBacking>, LocalReplica<BlockingUring>) {
        let b = Arc::new(LocalBacking::open(path, SIZE, Create::IfMissing).unwrap());
        let r = LocalReplica::new(b.clone(), BlockingUring::new().unwrap());
        (b, r)
    }

    fn read(r: &LocalReplica<BlockingUring>, off: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        block_on(r.read(ByteOffset(off), &mut buf)).unwrap();
        buf
    }

    /// A real file replica through io_uring: a labelled flat image takes a
    /// snapshot, its label becomes format 2 in both slots (what an older ublkd
    /// refuses), the head and the snapshot diverge, and a reopen finds both.
    #[test]
    fn a_file_replica_becomes_layered_at_its_first_snapshot() {
        let dir = disk_dir();
        let path = dir.path().join("r.img");
        let (b, r) = open(&path);
        let label = Label::new("v", VolumeUuid([1; 16]), ReplicaUuid([2; 16]), SIZE, 4096);
        b.write_label(&label).unwrap();
        block_on(r.write(ByteOffset(0), &[1u8; 65536], false)).unwrap();
        assert!(!b.store().is_layered());
        let u = SnapshotUuid([3; 16]);
        b.snapshot(u, "first", 1).unwrap();
        let slots = std::fs::read(&path).unwrap();
        let label_at = SIZE as usize;
        for slot in 0..2 {
            let header = &slots[label_at + slot * SLOT_LEN + 8..label_at + slot * SLOT_LEN + 12];
            assert_eq!(
                u32::from_le_bytes(header.try_into().unwrap()),
                LABEL_FORMAT_LAYERED,
                "slot {slot}: an older ublkd (format {LABEL_FORMAT} only) must find no label it serves"
            );
        }
        block_on(r.write(ByteOffset(4096), &[2u8; 4096], false)).unwrap();
        block_on(r.write_zeroes(ByteOffset(8192), ByteLen(4096), false)).unwrap();
        block_on(r.flush()).unwrap();
        let head = [
            vec![1u8; 4096],
            vec![2u8; 4096],
            vec![0u8; 4096],
            vec![1u8; 4096],
        ]
        .concat();
        assert_eq!(read(&r, 0, 16384), head);
        // A relabel by an owner (a fresh label, format 1) keeps the format.
        b.write_label(&label).unwrap();
        drop((r, b));
        let (b, r) = open(&path);
        match b.read_label().unwrap() {
            AreaRead::Label { label, .. } => assert_eq!(label.format, LABEL_FORMAT_LAYERED),
            AreaRead::NoLabel => panic!("label lost"),
        }
        assert!(b.store().is_layered());
        assert_eq!(read(&r, 0, 16384), head);
        let mut snap = vec![0u8; 16384];
        b.read_snapshot(u, 0, &mut snap).unwrap();
        assert_eq!(snap, vec![1u8; 16384]);
        let extents = r.data_extents(ByteOffset(0), ByteLen(SIZE)).unwrap();
        assert_eq!(
            extents,
            [
                (ByteOffset(0), ByteLen(8192)),
                (ByteOffset(12288), ByteLen(SIZE - 12288))
            ],
            "the zeroed block is a hole; the base counts as data"
        );
        let crc = block_on(r.checksum(ByteOffset(0), ByteLen(16384))).unwrap();
        assert_eq!(crc, crc32c::crc32c(&head).to_le_bytes());
    }

    #[test]
    fn a_volume_of_odd_size_cannot_take_snapshots() {
        let dir = disk_dir();
        let b =
            LocalBacking::open(&dir.path().join("odd.img"), SIZE - 512, Create::IfMissing).unwrap();
        let err = b.snapshot(SnapshotUuid([1; 16]), "s", 1).unwrap_err();
        assert!(err.to_string().contains("multiple of 4 KiB"), "{err}");
    }
}
