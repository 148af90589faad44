//! The layered store on the simulated disk: behaviours one by one, then a seeded
//! model check with power loss and process kills at every step.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::executor::block_on;
use wire::SnapshotUuid;

use super::format::Geometry;
use super::sim::{Rng, SimDisk};
use super::{Done, Layered, Layout, Shared};
use crate::error::StoreError;

const SIZE: u64 = 1 << 20;
const SECTOR: u64 = 512;

fn geo() -> Geometry {
    Geometry::new(SIZE, wire::label::LABEL_AREA, 16 * 65, 16 * 12)
}

fn open_with(disk: &Arc<SimDisk>, max: usize) -> Result<Layered<Arc<SimDisk>>, StoreError> {
    let shared = block_on(Shared::open(disk, Ok(geo()), Layout::Detect, max))?;
    Ok(Layered::new(Arc::new(shared), disk.clone()))
}

fn open(disk: &Arc<SimDisk>) -> Layered<Arc<SimDisk>> {
    open_with(disk, 8).unwrap()
}

fn uuid(n: u8) -> SnapshotUuid {
    SnapshotUuid([n; 16])
}

fn read(s: &Layered<Arc<SimDisk>>, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    block_on(s.read(off, &mut b)).unwrap();
    b
}

fn read_snap(s: &Layered<Arc<SimDisk>>, u: SnapshotUuid, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    block_on(s.read_snapshot(u, off, &mut b)).unwrap();
    b
}

fn write(s: &Layered<Arc<SimDisk>>, off: u64, data: &[u8]) {
    block_on(s.write(off, data, false)).unwrap();
}

fn snap(s: &Layered<Arc<SimDisk>>, n: u8) {
    assert_eq!(
        block_on(s.snapshot(uuid(n), &format!("s{n}"), n as u64)).unwrap(),
        Done::Done
    );
}

fn merge_all(s: &Layered<Arc<SimDisk>>) {
    while block_on(s.merge_step()).unwrap() {}
}

#[test]
fn without_snapshots_it_is_the_flat_image() {
    let disk = SimDisk::new();
    let s = open(&disk);
    write(&s, 8192, &[7u8; 4096]);
    let mut raw = vec![0u8; 4096];
    block_on(super::RawIo::read_at(&disk, 8192, &mut raw)).unwrap();
    assert_eq!(
        raw,
        vec![7u8; 4096],
        "the volume's bytes at their own offsets"
    );
    block_on(s.flush()).unwrap();
    let s = open(&disk);
    assert!(!s.shared().is_layered(), "no superblock was written");
    assert_eq!(read(&s, 8192, 4096), vec![7u8; 4096]);
}

#[test]
fn a_snapshot_keeps_its_data_and_the_head_moves_on() {
    let disk = SimDisk::new();
    let s = open(&disk);
    write(&s, 0, &[1u8; 65536]);
    snap(&s, 1);
    write(&s, 4096, &[2u8; 8192]);
    snap(&s, 2);
    write(&s, 8192, &[3u8; 4096]);
    let expect_head = [
        vec![1u8; 4096],
        vec![2u8; 4096],
        vec![3u8; 4096],
        vec![1u8; 4096],
    ]
    .concat();
    assert_eq!(read(&s, 0, 16384), expect_head);
    assert_eq!(read_snap(&s, uuid(1), 0, 16384), vec![1u8; 16384]);
    let expect_s2 = [vec![1u8; 4096], vec![2u8; 8192], vec![1u8; 4096]].concat();
    assert_eq!(read_snap(&s, uuid(2), 0, 16384), expect_s2);
    block_on(s.flush()).unwrap();
    // The same after a power loss right after the flush.
    disk.crash(&mut Rng::new(1));
    let s = open(&disk);
    s.shared().check().unwrap();
    assert_eq!(read(&s, 0, 16384), expect_head);
    assert_eq!(read_snap(&s, uuid(1), 0, 16384), vec![1u8; 16384]);
    assert_eq!(read_snap(&s, uuid(2), 0, 16384), expect_s2);
    let names: Vec<_> = s.shared().list().into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["s1", "s2"]);
}

#[test]
fn a_whole_block_write_after_a_snapshot_reads_nothing() {
    let disk = SimDisk::new();
    let s = open(&disk);
    write(&s, 0, &[1u8; 65536]);
    snap(&s, 1);
    let before = disk.reads();
    write(&s, 4096, &[2u8; 4096]);
    write(&s, 3 * 4096, &[2u8; 8192]);
    assert_eq!(disk.reads(), before, "no copy of the old blocks");
    // A 512-byte write into a block only the snapshot has reads that block once.
    write(&s, 32768 + 512, &[9u8; 512]);
    assert_eq!(
        disk.reads(),
        before + 1,
        "read-modify-write of one 4 KiB block"
    );
    let got = read(&s, 32768, 4096);
    assert_eq!(&got[..512], &[1u8; 512]);
    assert_eq!(&got[512..1024], &[9u8; 512]);
    assert_eq!(&got[1024..], &[1u8; 3072][..]);
    assert_eq!(read_snap(&s, uuid(1), 32768, 4096), vec![1u8; 4096]);
}

#[test]
fn reads_cost_one_lookup_whatever_the_number_of_snapshots() {
    let disk = SimDisk::new();
    let s = open(&disk);
    write(&s, 0, &[1u8; 4096]);
    for n in 1..=8 {
        snap(&s, n);
        write(&s, 65536 * n as u64, &[n; 4096]);
    }
    let before = disk.reads();
    assert_eq!(read(&s, 0, 4096), vec![1u8; 4096]);
    assert_eq!(
        disk.reads(),
        before + 1,
        "one data read, no metadata read, no chain walk"
    );
}

#[test]
fn zeroes_after_a_snapshot_read_zero_and_the_snapshot_keeps_its_data() {
    let disk = SimDisk::new();
    let s = open(&disk);
    write(&s, 0, &[5u8; 131072]);
    snap(&s, 1);
    block_on(s.write_zeroes(4096, 65536, false)).unwrap();
    block_on(s.write_zeroes(100_000, 1000, false)).unwrap();
    let head = read(&s, 0, 131072);
    for (i, b) in head.iter().enumerate() {
        let zero = (4096..4096 + 65536).contains(&i) || (100_000..101_000).contains(&i);
        assert_eq!(*b, if zero { 0 } else { 5 }, "byte {i}");
    }
    assert_eq!(read_snap(&s, uuid(1), 0, 131072), vec![5u8; 131072]);
    // Written again after the zeroes: the data, not zeroes, not the snapshot.
    write(&s, 8192, &[6u8; 512]);
    let b = read(&s, 8192, 4096);
    assert_eq!(&b[..512], &[6u8; 512]);
    assert!(b[512..].iter().all(|&x| x == 0));
    block_on(s.flush()).unwrap();
    let s = open(&disk);
    assert_eq!(read(&s, 0, 131072)[4096..8192], [0u8; 4096]);
    assert_eq!(read_snap(&s, uuid(1), 0, 131072), vec![5u8; 131072]);
}

/// Two threads write different 512-byte sectors of one 4 KiB block that only the
/// snapshot holds, over and over: the grain lock keeps either read-modify-write
/// from undoing the other.
#[test]
fn concurrent_sub_block_writes_into_a_snapshot_block_lose_nothing() {
    for round in 0..20u8 {
        let disk = SimDisk::new();
        let s = open(&disk);
        write(&s, 0, &[1u8; 65536]);
        snap(&s, 1);
        let shared = s.shared().clone();
        let threads: Vec<_> = (0..2u64)
            .map(|t| {
                let (shared, disk) = (shared.clone(), disk.clone());
                std::thread::spawn(move || {
                    let h = Layered::new(shared, disk);
                    for k in 0..4u64 {
                        let sector = t * 4 + k;
                        block_on(h.write(sector * 512, &[10 + sector as u8; 512], false)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let b = read(&s, 0, 4096);
        for sector in 0..8usize {
            assert_eq!(
                b[sector * 512],
                10 + sector as u8,
                "round {round} sector {sector}"
            );
        }
    }
}

/// Two faults together: a block first written after a snapshot and not yet
/// flushed (its presence bit only in memory), then overwritten with FUA, then a
/// power loss. The FUA write was acknowledged as durable: it must be what the
/// block reads, not the snapshot's data below it.
#[test]
fn a_fua_write_over_an_unflushed_first_touch_survives_a_power_loss() {
    for crash_seed in 0..16 {
        let disk = SimDisk::new();
        let s = open(&disk);
        write(&s, 0, &[1u8; 8192]);
        snap(&s, 1);
        write(&s, 0, &[2u8; 8192]);
        block_on(s.write(4096, &[3u8; 4096], true)).unwrap();
        disk.crash(&mut Rng::new(crash_seed));
        let s = open(&disk);
        s.shared().check().unwrap();
        assert!(
            read(&s, 4096, 4096) == vec![3u8; 4096],
            "crash seed {crash_seed}: the FUA write is lost"
        );
    }
}

#[test]
fn revert_brings_the_snapshot_back_and_frees_the_head() {
    let disk = SimDisk::new();
    let s = open(&disk);
    write(&s, 0, &[1u8; 65536]);
    snap(&s, 1);
    write(&s, 0, &[2u8; 4 * 65536]);
    snap(&s, 2);
    write(&s, 0, &[3u8; 65536]);
    let used = s.shared().pool_usage().0;
    assert_eq!(block_on(s.revert(uuid(1))).unwrap(), Done::Done);
    assert!(
        s.shared().pool_usage().0 < used,
        "the old head's grains are free"
    );
    assert_eq!(read(&s, 0, 65536), vec![1u8; 65536]);
    assert_eq!(read(&s, 65536, 4096), vec![0u8; 4096]);
    assert_eq!(
        read_snap(&s, uuid(2), 0, 65536),
        vec![2u8; 65536],
        "later snapshots stay"
    );
    write(&s, 0, &[4u8; 4096]);
    block_on(s.flush()).unwrap();
    let s = open(&disk);
    s.shared().check().unwrap();
    assert_eq!(
        read(&s, 0, 8192),
        [vec![4u8; 4096], vec![1u8; 4096]].concat()
    );
    assert_eq!(read_snap(&s, uuid(2), 0, 4096), vec![2u8; 4096]);
}

#[test]
fn deleting_a_middle_snapshot_merges_it_and_frees_its_space() {
    let disk = SimDisk::new();
    let s = open(&disk);
    write(&s, 0, &[1u8; 4 * 65536]);
    snap(&s, 1);
    write(&s, 0, &[2u8; 4 * 65536]);
    snap(&s, 2);
    // S3 overwrites half of what S2 wrote: S2's copy of that half is garbage.
    write(&s, 0, &[3u8; 2 * 65536]);
    write(&s, 3 * 65536 + 4096, &[3u8; 4096]);
    snap(&s, 3);
    write(&s, 65536, &[4u8; 4096]);
    let (used, _) = s.shared().pool_usage();
    let info = s.shared().list();
    assert_eq!(info[1].reclaimable_bytes, 2 * 65536 + 4096, "{info:?}");
    let s3 = read_snap(&s, uuid(3), 0, 4 * 65536);
    let head = read(&s, 0, 4 * 65536);
    assert_eq!(block_on(s.delete(uuid(2))).unwrap(), Done::Done);
    assert_eq!(block_on(s.delete(uuid(2))).unwrap(), Done::AlreadyDone);
    let mut b = vec![0u8; 4096];
    assert!(
        block_on(s.read_snapshot(uuid(2), 0, &mut b)).is_err(),
        "hidden at once"
    );
    merge_all(&s);
    s.shared().check().unwrap();
    assert!(
        s.shared().pool_usage().0 < used,
        "S2's overwritten grains are free"
    );
    assert_eq!(read_snap(&s, uuid(1), 0, 4 * 65536), vec![1u8; 4 * 65536]);
    assert_eq!(read_snap(&s, uuid(3), 0, 4 * 65536), s3);
    assert_eq!(read(&s, 0, 4 * 65536), head);
    let names: Vec<_> = s.shared().list().into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["s1", "s3"]);
    let s = open(&disk);
    s.shared().check().unwrap();
    assert_eq!(read_snap(&s, uuid(3), 0, 4 * 65536), s3);
    assert_eq!(read(&s, 0, 4 * 65536), head);
}

#[test]
fn snapshots_are_idempotent_by_uuid_and_undone_while_empty() {
    let disk = SimDisk::new();
    let s = open(&disk);
    write(&s, 0, &[1u8; 4096]);
    snap(&s, 1);
    assert_eq!(
        block_on(s.snapshot(uuid(1), "s1", 1)).unwrap(),
        Done::AlreadyDone
    );
    assert_eq!(s.shared().list().len(), 1);
    assert_eq!(block_on(s.unsnapshot(uuid(1))).unwrap(), Done::Done);
    assert_eq!(block_on(s.unsnapshot(uuid(1))).unwrap(), Done::AlreadyDone);
    assert!(s.shared().list().is_empty());
    assert!(!s.shared().is_layered(), "back to the flat image");
    snap(&s, 2);
    write(&s, 0, &[2u8; 4096]);
    let err = block_on(s.unsnapshot(uuid(2))).unwrap_err();
    assert!(err.to_string().contains("written after"), "{err}");
}

#[test]
fn the_snapshot_limit_is_a_clear_error() {
    let disk = SimDisk::new();
    let s = open_with(&disk, 3).unwrap();
    for n in 1..=3 {
        snap(&s, n);
    }
    let err = block_on(s.snapshot(uuid(4), "s4", 4)).unwrap_err();
    assert!(
        matches!(err, StoreError::TooManySnapshots { limit: 3 }),
        "{err}"
    );
    assert!(err.to_string().contains("delete one"), "{err}");
    let err = block_on(s.snapshot(uuid(5), &"x".repeat(65), 5)).unwrap_err();
    assert!(err.to_string().contains("name longer"), "{err}");
}

/// A device reused for a new replica: the label says plain, so the old store's
/// superblock and descriptors are not this replica's snapshots; the first
/// snapshot formats afresh, and a later open with the label saying layered finds
/// only the new one.
#[test]
fn an_old_store_on_a_reused_device_is_ignored() {
    let disk = SimDisk::new();
    let old = open(&disk);
    write(&old, 0, &[1u8; 65536]);
    for n in 1..=5 {
        snap(&old, n);
        write(&old, 0, &[n; 4096]);
    }
    block_on(old.flush()).unwrap();
    let plain = block_on(Shared::open(&disk, Ok(geo()), Layout::Plain, 8)).unwrap();
    assert!(plain.list().is_empty() && !plain.is_layered());
    let s = Layered::new(Arc::new(plain), disk.clone());
    snap(&s, 9);
    write(&s, 0, &[9u8; 4096]);
    block_on(s.flush()).unwrap();
    let s = Layered::new(
        Arc::new(block_on(Shared::open(&disk, Ok(geo()), Layout::Layered, 8)).unwrap()),
        disk.clone(),
    );
    let names: Vec<_> = s.shared().list().into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["s9"]);
    s.shared().check().unwrap();
    assert_eq!(read(&s, 0, 4096), vec![9u8; 4096]);
    let fresh = SimDisk::new();
    let err = block_on(Shared::open(&fresh, Ok(geo()), Layout::Layered, 8))
        .err()
        .unwrap();
    assert!(err.to_string().contains("no superblock"), "{err}");
}

fn extents(s: &Layered<Arc<SimDisk>>, of: Option<u8>, since: Option<u8>) -> Vec<(u64, u64)> {
    s.diff_extents(of.map(uuid), since.map(uuid), 0, SIZE)
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|(o, l)| (o.0, l.0))
        .collect()
}

#[test]
fn diff_extents_name_what_a_view_changed_since_an_older_one() {
    let disk = SimDisk::new();
    let s = open(&disk);
    write(&s, 0, &[1u8; 4096]);
    snap(&s, 1);
    write(&s, 8192, &[2u8; 4096]);
    block_on(s.write_zeroes(16384, 4096, false)).unwrap();
    snap(&s, 2);
    write(&s, 32768, &[3u8; 512]);
    assert_eq!(extents(&s, Some(2), Some(1)), [(8192, 4096), (16384, 4096)]);
    assert_eq!(extents(&s, None, Some(2)), [(32768, 4096)]);
    assert_eq!(
        extents(&s, None, Some(1)),
        [(8192, 4096), (16384, 4096), (32768, 4096)]
    );
    assert_eq!(extents(&s, Some(1), None), [(0, SIZE)], "the base is data");
    assert_eq!(
        extents(&s, Some(2), None),
        [(0, 16384), (20480, SIZE - 20480)],
        "a zeroed block is a hole"
    );
    let err = |of: Option<u8>, since: Option<u8>| {
        s.diff_extents(of.map(uuid), since.map(uuid), 0, SIZE)
            .unwrap_err()
    };
    assert_eq!(err(Some(7), None).0, libc::ENOENT);
    assert_eq!(err(None, Some(7)).0, libc::ENOENT);
    assert_eq!(
        s.diff_extents(None, None, SIZE - 4096, 8192).unwrap_err().0,
        libc::EINVAL
    );
    block_on(s.delete(uuid(1))).unwrap();
    assert_eq!(err(Some(1), None).0, libc::ENOENT, "a deleted one is gone");
}

#[test]
fn a_grain_resolves_as_its_blocks_do_in_every_layer() {
    let disk = SimDisk::new();
    let s = open(&disk);
    let mut rng = Rng::new(3);
    for n in 1..=5u8 {
        for _ in 0..20 {
            let off = rng.below(SIZE / 512) * 512;
            let len = ((rng.below(24) + 1) * 512).min(SIZE - off);
            if rng.below(4) == 0 {
                block_on(s.write_zeroes(off, len, false)).unwrap();
            } else {
                write(&s, off, &vec![n; len as usize]);
            }
        }
        snap(&s, n);
    }
    block_on(s.delete(uuid(3))).unwrap();
    let m = s.shared().meta.read().unwrap();
    let layers: Vec<_> = m.layers.keys().copied().collect();
    for l in layers {
        for g in 0..m.geo.volume_grains() as u64 {
            let got = m.resolve_grain_in(l, g);
            for (i, src) in got.iter().enumerate() {
                let b = g * super::format::BLOCKS_PER_GRAIN + i as u64;
                assert_eq!(*src, m.resolve_in(l, b), "layer {l:?} block {b}");
            }
        }
    }
}

/// What a full rebuild does: each layer written through its diff from the one
/// before, then snapshotted, then the head's diff from the newest; every view of
/// the copy reads as the original's.
#[test]
fn layers_replayed_through_their_diffs_rebuild_every_snapshot() {
    let src_disk = SimDisk::new();
    let src = open(&src_disk);
    let mut rng = Rng::new(7);
    for n in 1..=6u8 {
        for _ in 0..12 {
            let off = rng.below(SIZE / 512) * 512;
            let len = (rng.below(16) + 1) * 512;
            let len = len.min(SIZE - off);
            if rng.below(5) == 0 {
                block_on(src.write_zeroes(off, len, false)).unwrap();
            } else {
                write(&src, off, &vec![n * 10 + rng.below(9) as u8; len as usize]);
            }
        }
        snap(&src, n);
    }
    write(&src, 4096 * 3, &[99u8; 8192]);
    let dst_disk = SimDisk::new();
    // The target had a stale history of its own: reset drops it.
    let dst = open(&dst_disk);
    write(&dst, 0, &[5u8; 65536]);
    snap(&dst, 200);
    write(&dst, 0, &[6u8; 4096]);
    assert_eq!(block_on(dst.reset()).unwrap(), Done::Done);
    assert!(dst.shared().list().is_empty() && !dst.shared().is_layered());
    assert_eq!(block_on(dst.reset()).unwrap(), Done::AlreadyDone);
    let copy = |of: Option<u8>, since: Option<u8>| {
        if since.is_none() {
            block_on(dst.write_zeroes(0, SIZE, false)).unwrap();
        }
        for (o, l) in extents(&src, of, since) {
            let data = match of {
                Some(n) => read_snap(&src, uuid(n), o, l as usize),
                None => read(&src, o, l as usize),
            };
            write(&dst, o, &data);
        }
    };
    let mut prev = None;
    for n in 1..=6u8 {
        copy(Some(n), prev);
        snap(&dst, n);
        prev = Some(n);
    }
    copy(None, prev);
    block_on(dst.flush()).unwrap();
    let dst = open(&dst_disk);
    dst.shared().check().unwrap();
    for n in 1..=6u8 {
        assert_eq!(
            read_snap(&dst, uuid(n), 0, SIZE as usize),
            read_snap(&src, uuid(n), 0, SIZE as usize),
            "snapshot {n}"
        );
    }
    assert_eq!(read(&dst, 0, SIZE as usize), read(&src, 0, SIZE as usize));
    let names: Vec<_> = dst.shared().list().into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["s1", "s2", "s3", "s4", "s5", "s6"]);
}

#[test]
fn a_device_too_small_for_a_reserve_is_refused_with_the_size_it_needs() {
    let err = Geometry::for_device(1 << 30, (1 << 30) + 65536).unwrap_err();
    assert!(err.contains("give it at least"), "{err}");
    let g = Geometry::for_device(1 << 30, (1 << 30) + (256 << 20)).unwrap();
    assert!(g.container_len() <= (1 << 30) + (256 << 20));
    assert!(g.pool_grains > 3000);
}

// ---------------------------------------------------------------------------
// The model check.

/// Sector contents are tagged by the write that made them: 0 is zeroes.
fn fill(id: u32, first_sector: u64, n: u64) -> Vec<u8> {
    let mut v = vec![0u8; (n * SECTOR) as usize];
    if id == 0 {
        return v;
    }
    for (i, s) in v.chunks_mut(SECTOR as usize).enumerate() {
        let tag = [
            id.to_le_bytes(),
            ((first_sector + i as u64) as u32).to_le_bytes(),
        ]
        .concat();
        for c in s.chunks_mut(8) {
            c.copy_from_slice(&tag);
        }
    }
    v
}

fn ids(buf: &[u8], first_sector: u64) -> Vec<u32> {
    buf.chunks(SECTOR as usize)
        .enumerate()
        .map(|(i, s)| {
            let id = u32::from_le_bytes(s[..4].try_into().unwrap());
            assert_eq!(
                s,
                &fill(id, first_sector + i as u64, 1)[..],
                "sector {} is torn or misplaced",
                first_sector + i as u64
            );
            id
        })
        .collect()
}

#[derive(Clone, Default)]
struct Model {
    cur: Vec<u32>,
    /// What each sector may hold after a power loss.
    possible: Vec<Vec<u32>>,
    snaps: BTreeMap<u8, Vec<u32>>,
    deleted: Vec<u8>,
}

impl Model {
    fn new() -> Model {
        let n = (SIZE / SECTOR) as usize;
        Model {
            cur: vec![0; n],
            possible: vec![vec![0]; n],
            ..Model::default()
        }
    }
    fn flushed(&mut self) {
        for (p, c) in self.possible.iter_mut().zip(&self.cur) {
            *p = vec![*c];
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    /// With `fua`, durable when it returns (the sectors can hold nothing else
    /// after a crash).
    Write {
        sector: u64,
        n: u64,
        id: u32,
        fua: bool,
    },
    Zero {
        sector: u64,
        n: u64,
    },
    Flush,
    Snap(u8),
    Unsnap(u8),
    Delete(u8),
    Merge,
    Revert(u8),
}

fn pick_op(
    rng: &mut Rng,
    m: &Model,
    next_id: &mut u32,
    next_snap: &mut u8,
    last: Option<Op>,
) -> Op {
    let total = SIZE / SECTOR;
    let range = |rng: &mut Rng| {
        // Mostly 4 KiB-aligned, sometimes not; up to 40 sectors.
        let n = 1 + rng.below(40);
        let mut sector = rng.below(total - n);
        if rng.below(3) > 0 {
            sector -= sector % 8;
        }
        (sector, n)
    };
    match rng.below(20) {
        0..=8 => {
            let (sector, n) = range(rng);
            *next_id += 1;
            let fua = rng.below(4) == 0;
            Op::Write {
                sector,
                n,
                id: *next_id,
                fua,
            }
        }
        9 | 10 => {
            let (sector, n) = range(rng);
            Op::Zero { sector, n }
        }
        11 | 12 => Op::Flush,
        13 | 14 => {
            *next_snap += 1;
            Op::Snap(*next_snap)
        }
        15 => match last {
            Some(Op::Snap(n)) => Op::Unsnap(n),
            _ => Op::Flush,
        },
        16 | 17 if !m.snaps.is_empty() => {
            let keys: Vec<_> = m.snaps.keys().copied().collect();
            Op::Delete(keys[rng.below(keys.len() as u64) as usize])
        }
        18 => Op::Merge,
        19 if !m.snaps.is_empty() => {
            let keys: Vec<_> = m.snaps.keys().copied().collect();
            Op::Revert(keys[rng.below(keys.len() as u64) as usize])
        }
        _ => Op::Merge,
    }
}

/// Apply `op` to the store and, on success, to the model. `Err` when the disk
/// died under it.
fn apply(s: &Layered<Arc<SimDisk>>, m: &mut Model, op: Op) -> Result<(), String> {
    let sec = |sector: u64| sector * SECTOR;
    match op {
        Op::Write { sector, n, id, fua } => {
            for i in sector..sector + n {
                m.possible[i as usize].push(id);
            }
            block_on(s.write(sec(sector), &fill(id, sector, n), fua)).map_err(|e| e.to_string())?;
            for i in sector..sector + n {
                m.cur[i as usize] = id;
                if fua {
                    m.possible[i as usize] = vec![id];
                }
            }
        }
        Op::Zero { sector, n } => {
            for i in sector..sector + n {
                m.possible[i as usize].push(0);
            }
            block_on(s.write_zeroes(sec(sector), n * SECTOR, false)).map_err(|e| e.to_string())?;
            for i in sector..sector + n {
                m.cur[i as usize] = 0;
            }
        }
        Op::Flush => {
            block_on(s.flush()).map_err(|e| e.to_string())?;
            m.flushed();
        }
        Op::Snap(n) => match block_on(s.snapshot(uuid(n), &format!("s{n}"), n as u64)) {
            Ok(_) => {
                m.flushed();
                m.snaps.insert(n, m.cur.clone());
            }
            Err(StoreError::TooManySnapshots { .. }) => {}
            Err(e) => return Err(e.to_string()),
        },
        Op::Unsnap(n) => {
            block_on(s.unsnapshot(uuid(n))).map_err(|e| e.to_string())?;
            m.snaps.remove(&n);
        }
        Op::Delete(n) => {
            block_on(s.delete(uuid(n))).map_err(|e| e.to_string())?;
            m.snaps.remove(&n);
            m.deleted.push(n);
        }
        Op::Merge => {
            block_on(s.merge_step()).map_err(|e| e.to_string())?;
        }
        Op::Revert(n) => {
            block_on(s.revert(uuid(n))).map_err(|e| e.to_string())?;
            m.cur = m.snaps[&n].clone();
            m.flushed();
        }
    }
    Ok(())
}

fn check_live(s: &Layered<Arc<SimDisk>>, m: &Model, rng: &mut Rng, ctx: &str) {
    s.shared().check().unwrap_or_else(|e| panic!("{ctx}: {e}"));
    let n = 1 + rng.below(64);
    let sector = rng.below(SIZE / SECTOR - n);
    let got = ids(&read(s, sector * SECTOR, (n * SECTOR) as usize), sector);
    assert_eq!(
        got,
        m.cur[sector as usize..(sector + n) as usize],
        "{ctx}: head at sector {sector}"
    );
}

fn check_all_snapshots(s: &Layered<Arc<SimDisk>>, m: &Model, ctx: &str) {
    for (n, want) in &m.snaps {
        let got = ids(&read_snap(s, uuid(*n), 0, SIZE as usize), 0);
        assert!(got == *want, "{ctx}: snapshot {n} differs");
    }
}

/// After a crash in the middle of `dying` (or between operations): the store
/// opens, passes its check, every acknowledged snapshot is exact, the head holds
/// for each sector a value a crash may leave, and the operation that died is
/// either whole or absent.
fn check_after_crash(s: &Layered<Arc<SimDisk>>, m: &Model, dying: Option<Op>, ctx: &str) -> Model {
    s.shared().check().unwrap_or_else(|e| panic!("{ctx}: {e}"));
    let listed: Vec<SnapshotUuid> = s
        .shared()
        .list()
        .iter()
        .filter(|i| !i.deleting)
        .map(|i| i.uuid)
        .collect();
    let mut after = m.clone();
    for (n, want) in &m.snaps {
        let exists = listed.contains(&uuid(*n));
        match dying {
            Some(Op::Delete(d)) if d == *n => {
                if !exists {
                    after.snaps.remove(n);
                    continue;
                }
            }
            Some(Op::Unsnap(d)) if d == *n => {
                if !exists {
                    after.snaps.remove(n);
                    continue;
                }
            }
            _ => assert!(exists, "{ctx}: acknowledged snapshot {n} is gone"),
        }
        let got = ids(&read_snap(s, uuid(*n), 0, SIZE as usize), 0);
        assert!(got == *want, "{ctx}: snapshot {n} differs after the crash");
    }
    if let Some(Op::Snap(n)) = dying {
        if listed.contains(&uuid(n)) {
            let got = ids(&read_snap(s, uuid(n), 0, SIZE as usize), 0);
            assert!(
                got.iter().zip(&m.possible).all(|(g, p)| p.contains(g)),
                "{ctx}: half-taken snapshot {n} holds what no write left"
            );
            after.snaps.insert(n, got);
        }
    }
    for d in &m.deleted {
        assert!(
            !listed.contains(&uuid(*d)),
            "{ctx}: deleted snapshot {d} is back"
        );
    }
    let head = ids(&read(s, 0, SIZE as usize), 0);
    let reverted = match dying {
        Some(Op::Revert(n)) => m.snaps.get(&n).is_some_and(|sn| *sn == head),
        _ => false,
    };
    if !reverted {
        for (i, (h, p)) in head.iter().zip(&m.possible).enumerate() {
            assert!(
                p.contains(h),
                "{ctx}: sector {i} holds write {h}, possible {p:?}"
            );
        }
    }
    after.cur = head;
    after.flushed();
    after
}

/// How a run dies: at the store's `at`-th disk operation, by power loss (with
/// the crash's own seed) or by a kill.
#[derive(Debug, Clone, Copy)]
struct Death {
    at: u64,
    power: bool,
    crash_seed: u64,
}

/// `ops` random operations from `seed`, checked against the model after each;
/// returns the disk operations the store made (to place deaths).
fn run_seed(seed: u64, ops: usize, death: Option<Death>) -> u64 {
    let mut rng = Rng::new(seed);
    let mut check_rng = Rng::new(seed ^ 0xC4EC);
    // Half the runs on a reused device: old data past the label.
    let disk = if seed.is_multiple_of(2) {
        SimDisk::new()
    } else {
        SimDisk::with_garbage_from(geo().sb_offset)
    };
    let mut s = open_with(&disk, 6).unwrap();
    let mut m = Model::new();
    let (mut next_id, mut next_snap) = (0u32, 0u8);
    let mut last = None;
    if let Some(d) = death {
        disk.die_after(d.at.saturating_sub(disk.ops()));
    }
    for step in 0..ops {
        let op = pick_op(&mut rng, &m, &mut next_id, &mut next_snap, last);
        let ctx = format!("seed {seed} step {step} {op:?} {death:?}");
        match apply(&s, &mut m, op) {
            Ok(()) => {
                disk.set_paused(true);
                check_live(&s, &m, &mut check_rng, &ctx);
                disk.set_paused(false);
            }
            Err(e) => {
                let d = death.expect("only a death fails an operation");
                assert!(disk.is_dead(), "{ctx}: failed without a fault: {e}");
                if d.power {
                    disk.crash(&mut Rng::new(d.crash_seed));
                } else {
                    disk.kill();
                }
                s = open_with(&disk, 6).unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
                // A kill loses nothing written; the same check holds (only the
                // dying operation is in doubt).
                m = check_after_crash(&s, &m, Some(op), &ctx);
                check_all_snapshots(&s, &m, &ctx);
                last = None;
                continue;
            }
        }
        last = Some(op);
    }
    let used = disk.ops();
    // Armed past the end: nothing failed.
    disk.kill();
    check_all_snapshots(&s, &m, &format!("seed {seed} end"));
    // A clean reopen changes nothing.
    block_on(s.flush()).unwrap();
    let s = open_with(&disk, 6).unwrap();
    s.shared().check().unwrap();
    let head = ids(&read(&s, 0, SIZE as usize), 0);
    assert_eq!(head, m.cur, "seed {seed}: head after a clean reopen");
    check_all_snapshots(&s, &m, &format!("seed {seed} reopened"));
    used
}

#[test]
fn model_check_without_faults() {
    for seed in 0..20 {
        run_seed(seed, 300, None);
    }
}

/// Every step of a run is a place to die: for each seed, a dry run counts the
/// store's disk operations, then the run is replayed dying at each of them (a
/// power loss with a random subset of the unsynced sectors kept, or a kill).
/// `UBLKD_SIM_SEEDS` runs more seeds (the long run is noted in BENCHMARKS.md).
#[test]
fn model_check_dying_at_every_step() {
    let seeds: u64 = std::env::var("UBLKD_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    for seed in 0..seeds {
        let seed = 1000 + seed;
        let total = run_seed(seed, 40, None);
        for at in 0..total {
            for (power, k) in [(false, 0), (true, 1), (true, 2)] {
                let crash_seed = (seed * 7919 + at) * 3 + k;
                run_seed(
                    seed,
                    40,
                    Some(Death {
                        at,
                        power,
                        crash_seed,
                    }),
                );
            }
        }
    }
}

/// The table grows into a page a reused device holds old data in: a power loss
/// at the commit's last sync, whatever sectors it keeps, never leaves the
/// superblock counting a page that was not written (the store would not open).
#[test]
fn a_power_loss_while_the_table_grows_keeps_the_store_openable() {
    for crash_seed in 0..64 {
        let disk = SimDisk::with_garbage_from(geo().sb_offset);
        let s = open(&disk);
        write(&s, 0, &[1u8; 4096]);
        snap(&s, 1);
        write(&s, 0, &[2u8; 4096]);
        let before = disk.ops();
        block_on(s.flush()).unwrap();
        let last_sync = disk.ops() - before - 1;
        let disk = SimDisk::with_garbage_from(geo().sb_offset);
        let s = open(&disk);
        write(&s, 0, &[1u8; 4096]);
        snap(&s, 1);
        write(&s, 0, &[2u8; 4096]);
        disk.die_after(last_sync);
        assert!(block_on(s.flush()).is_err());
        disk.crash(&mut Rng::new(crash_seed));
        let s = open_with(&disk, 8).unwrap_or_else(|e| panic!("crash seed {crash_seed}: {e}"));
        s.shared().check().unwrap();
        let b = read(&s, 0, 4096);
        assert!(
            b == vec![1u8; 4096] || b == vec![2u8; 4096],
            "crash seed {crash_seed}"
        );
        assert_eq!(read_snap(&s, uuid(1), 0, 4096), vec![1u8; 4096]);
    }
}
