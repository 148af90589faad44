//! Rebuilds against real replica servers (processes on 127.0.0.x, real TCP) under a
//! verifying workload: a server that loses the writes it never flushed, and a full
//! rebuild whose source or target dies half way.

mod support;

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use replication::rebuild::{rebuild, CopyConfig, Manager, ManagerConfig, Outcome, Progress, Rate};
use replication::state::RebuildKind;
use replication::{BlockRequest, ByteLen, ByteOffset, SlotIndex};
use support::*;
use wire::VolumeUuid;

/// Slow enough that a fault lands half way through a 2 MiB full rebuild.
fn slow_copy() -> CopyConfig {
    CopyConfig {
        chunk: ByteLen(64 << 10),
        rate: Rate::fixed(512 << 10),
        flush_every: ByteLen(256 << 10),
    }
}

fn reachable(owner: &Owner, slot: u8) -> bool {
    owner
        .health
        .backing(SlotIndex(slot))
        .is_some_and(|b| b.is_reachable())
}

/// The workload runs until `done` says stop (checked between rounds); `at` runs
/// once, when `when` first holds. Returns the outcome of every round together.
fn workload_until(
    nexus: &replication::Nexus,
    mut expected: Vec<u64>,
    mut seq: u64,
    mut done: impl FnMut() -> bool,
    mut when: impl FnMut() -> bool,
    mut at: impl FnMut(),
) -> Vec<u64> {
    let mut fired = false;
    let t0 = std::time::Instant::now();
    while !done() {
        assert!(t0.elapsed() < Duration::from_secs(60), "never done");
        if !fired && when() {
            fired = true;
            at();
        }
        let out = workload_from(nexus, expected, seq, 50, 4, u64::MAX, || {});
        assert_eq!(out.errors, 0, "application I/O errors");
        expected = out.expected;
        seq += 1 << 32;
    }
    assert!(fired, "the fault never ran");
    expected
}

/// A server's process dies with writes it acknowledged but was never asked to
/// flush, and its host loses them (its image reverts to what it held at the last
/// FLUSH). The owner counts those writes as missing too: the partial rebuild
/// after the server's return copies them, and the replica ends identical.
#[test]
fn writes_a_killed_server_acknowledged_but_never_flushed_are_rebuilt_too() {
    let tmp = tempfile::tempdir().unwrap();
    let a = start_server(tmp.path(), 40);
    let mut b = start_server(tmp.path(), 41);
    let rt = rt();
    let vu = VolumeUuid::random();
    let owner = Owner::open(
        &rt,
        vec![
            spec(&a, "u-r1", "u", vu, 1, 7),
            spec(&b, "u-r2", "u", vu, 1, 7),
        ],
        None,
    );
    let nexus = owner.nexus();
    let out = workload(&nexus, 300, 4, u64::MAX, || {});
    assert_eq!(out.errors, 0);
    flush(&nexus);
    let durable = data_of(&b.image("u-r2"));
    // Writes both servers acknowledge, without FUA and with no FLUSH after them.
    let mut expected = out.expected;
    let unflushed: Vec<usize> = (0..16).map(|i| (i * 37 + 5) % BLOCKS).collect();
    for (i, &block) in unflushed.iter().enumerate() {
        let seq = (1 << 32) + i as u64;
        let mut buf = block_data(block, seq);
        futures::executor::block_on(nexus.submit(
            BlockRequest::Write {
                offset: ByteOffset((block * BLOCK) as u64),
                len: ByteLen(BLOCK as u64),
                fua: false,
            },
            &mut buf,
        ))
        .expect("write");
        expected[block] = seq;
    }
    // The host loses its cache with the process: the image is what was flushed.
    b.kill();
    let img = std::fs::OpenOptions::new()
        .write(true)
        .open(b.image("u-r2"))
        .unwrap();
    img.write_all_at(&durable, 0).unwrap();
    img.sync_all().unwrap();
    drop(img);
    // Later writes fault it; they are in its map as well.
    let out = workload_from(&nexus, expected, 1 << 40, 40, 4, u64::MAX, || {});
    assert_eq!(out.errors, 0);
    assert_eq!(owner.states(), ["online", "faulted"]);
    let map = owner.health.dirty_map(SlotIndex(1)).expect("its dirty map");
    for &block in &unflushed {
        assert!(
            map.any(ByteOffset((block * BLOCK) as u64), ByteLen(BLOCK as u64)),
            "unflushed block {block} is not in the dirty map"
        );
    }
    assert!(map.dirty_bytes() < SIZE, "partial, not everything");
    b.start();
    let rebuilds = Manager::start(
        owner.health.clone(),
        owner.ranges.clone(),
        ManagerConfig::default(),
    )
    .unwrap();
    wait_until(30, "b rebuilt", || owner.states() == ["online", "online"]);
    drop(rebuilds);
    flush(&nexus);
    verify_image(&a.image("u-r1"), &out.expected);
    verify_image(&b.image("u-r2"), &out.expected);
}

/// Three servers; the third is killed and comes back, then gets a full rebuild
/// (slow, 64 KiB chunks) while the verifying workload runs. Returns the servers,
/// the owner and the expected stamps before the rebuild.
fn three_with_a_returning_third(
    root: &std::path::Path,
    rt: &tokio::runtime::Runtime,
    base: u8,
    name: &str,
) -> (Vec<ServerProc>, Owner, Vec<u64>) {
    let mut servers: Vec<ServerProc> = (0..3).map(|i| start_server(root, base + i)).collect();
    let vu = VolumeUuid::random();
    let specs = servers
        .iter()
        .enumerate()
        .map(|(i, s)| spec(s, &format!("{name}-r{i}"), name, vu, 1, 9))
        .collect();
    let owner = Owner::open(rt, specs, None);
    let nexus = owner.nexus();
    let out = workload(&nexus, 200, 4, 100, || servers[2].kill());
    assert_eq!(out.errors, 0);
    let out = workload_from(&nexus, out.expected, 1 << 31, 200, 4, u64::MAX, || {});
    assert_eq!(out.errors, 0);
    assert_eq!(owner.states(), ["online", "online", "faulted"]);
    servers[2].start();
    wait_until(20, "the third reconnects", || reachable(&owner, 2));
    (servers, owner, out.expected)
}

/// Runs a slow full rebuild of the third replica under a verifying workload and
/// SIGKILLs `victim` once a quarter is copied; returns the rebuild's outcome and
/// what the replicas must now hold.
fn full_rebuild_of_third_killing(
    owner: &Owner,
    victim: &mut ServerProc,
    expected: Vec<u64>,
) -> (Outcome, Vec<u64>) {
    let nexus = owner.nexus();
    let progress = Progress::default();
    std::thread::scope(|sc| {
        let job = sc.spawn(|| {
            rebuild(
                &owner.health,
                &owner.ranges,
                SlotIndex(2),
                RebuildKind::Full,
                slow_copy(),
                &progress,
            )
        });
        // The kill has a thread of its own, watching the copy's progress: a round
        // of the workload may take long on a loaded host, and the copy would be
        // over before the next one.
        sc.spawn(|| {
            let t0 = std::time::Instant::now();
            while progress.done.load(Ordering::Acquire) < SIZE / 4
                && t0.elapsed() < Duration::from_secs(60)
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            victim.kill();
        });
        let expected = workload_until(
            &nexus,
            expected,
            1 << 40,
            || job.is_finished(),
            || true,
            || {},
        );
        (job.join().unwrap().unwrap(), expected)
    })
}

/// The source of a full rebuild dies half way: the copier takes the other online
/// replica and finishes; the application sees no error and both survivors hold
/// every acknowledged write.
#[test]
fn a_full_rebuild_whose_source_dies_half_way_finishes_from_another_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = rt();
    let (mut servers, owner, expected) = three_with_a_returning_third(tmp.path(), &rt, 42, "fs");
    // The first online replica is the source.
    let (out, expected) = full_rebuild_of_third_killing(&owner, &mut servers[0], expected);
    let nexus = owner.nexus();
    match out {
        Outcome::Done { bytes, .. } => assert_eq!(bytes, SIZE),
        other => panic!("{other:?}"),
    }
    assert_eq!(owner.states(), ["faulted", "online", "online"]);
    flush(&nexus);
    verify_image(&servers[1].image("fs-r1"), &expected);
    verify_image(&servers[2].image("fs-r2"), &expected);
}

/// The target of a full rebuild dies half way: the rebuild stops, the target stays
/// faulted with what it still lacks in its map, and once back the rest is copied;
/// it then holds every acknowledged write.
#[test]
fn a_full_rebuild_whose_target_dies_half_way_is_resumed_when_it_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = rt();
    let (mut servers, owner, expected) = three_with_a_returning_third(tmp.path(), &rt, 45, "ft");
    let (out, expected) = full_rebuild_of_third_killing(&owner, &mut servers[2], expected);
    let nexus = owner.nexus();
    let Outcome::Stopped { bytes, reason } = out else {
        panic!("the rebuild did not stop: {out:?}");
    };
    assert!((SIZE / 4..SIZE).contains(&bytes), "{bytes}");
    assert!(
        !reason.is_media_error(),
        "a lost server, not a disk: {reason}"
    );
    assert_eq!(owner.states(), ["online", "online", "faulted"]);
    let left = owner
        .health
        .dirty_map(SlotIndex(2))
        .expect("the map is kept")
        .dirty_bytes();
    assert!(left > 0, "what it lacks is kept");
    servers[2].start();
    wait_until(20, "the target reconnects", || reachable(&owner, 2));
    let rebuilds = Manager::start(
        owner.health.clone(),
        owner.ranges.clone(),
        ManagerConfig::default(),
    )
    .unwrap();
    let expected = workload_until(
        &nexus,
        expected,
        1 << 50,
        || owner.states() == ["online", "online", "online"],
        || true,
        || {},
    );
    // The replica is online a moment before the manager records the job.
    wait_until(10, "the resumed rebuild is recorded", || {
        !rebuilds.history().is_empty()
    });
    let history = rebuilds.history();
    let last = history.last().expect("the resumed rebuild is recorded");
    assert!(
        matches!(last.ended, replication::rebuild::Ended::Done { bytes } if bytes == left),
        "copies what was left ({left} bytes): {last:?}"
    );
    drop(rebuilds);
    flush(&nexus);
    for (i, s) in servers.iter().enumerate() {
        verify_image(&s.image(&format!("ft-r{i}")), &expected);
    }
}

/// A full rebuild whose only source is a remote replica asks it (DATA_EXTENTS)
/// which chunks hold data: the holes of a mostly-discarded volume are punched on
/// the target instead of copied, so the target, fully allocated before, ends up
/// with about the bytes written since, and the same data as the source.
#[test]
fn a_full_rebuild_from_a_remote_source_zeroes_its_holes_instead_of_copying_them() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let a = start_server(tmp.path(), 48);
    let mut b = start_server(tmp.path(), 49);
    let rt = rt();
    let vu = VolumeUuid::random();
    let owner = Owner::open(
        &rt,
        vec![
            spec(&a, "sp-r1", "sp", vu, 1, 7),
            spec(&b, "sp-r2", "sp", vu, 1, 7),
        ],
        None,
    );
    let nexus = owner.nexus();
    let submit = |req: BlockRequest, buf: &mut [u8]| {
        futures::executor::block_on(nexus.submit(req, buf)).expect("application I/O");
    };
    let write = |block: usize, seq: u64| {
        let req = BlockRequest::Write {
            offset: ByteOffset((block * BLOCK) as u64),
            len: ByteLen(BLOCK as u64),
            fua: false,
        };
        submit(req, &mut block_data(block, seq));
    };
    for block in 0..BLOCKS {
        write(block, 1);
    }
    flush(&nexus);
    let allocated = |s: &ServerProc| std::fs::metadata(s.image("sp-r2")).unwrap().blocks() * 512;
    assert!(allocated(&b) >= SIZE, "the target starts fully allocated");
    // While the target is away the volume is discarded, then four 64 KiB regions
    // (the dirty map's and here the copy's unit) are written again.
    b.kill();
    let discard = BlockRequest::Discard {
        offset: ByteOffset(0),
        len: ByteLen(SIZE),
    };
    submit(discard, &mut []);
    let mut expected = vec![0u64; BLOCKS];
    const REGION: usize = (64 << 10) / BLOCK;
    for region in [1, 9, 20, 30] {
        let blocks = region * REGION..(region + 1) * REGION;
        for (block, seq) in blocks.clone().zip(&mut expected[blocks]) {
            write(block, 2);
            *seq = 2;
        }
    }
    flush(&nexus);
    assert_eq!(owner.states(), ["online", "faulted"]);
    b.start();
    wait_until(20, "the target reconnects", || reachable(&owner, 1));
    // One chunk per region: a chunk is copied whole or zeroed whole.
    let copy = CopyConfig {
        chunk: ByteLen(64 << 10),
        rate: Rate::uncapped(),
        ..CopyConfig::default()
    };
    let progress = Progress::default();
    let out = rebuild(
        &owner.health,
        &owner.ranges,
        SlotIndex(1),
        RebuildKind::Full,
        copy,
        &progress,
    )
    .unwrap();
    assert!(matches!(out, Outcome::Done { bytes: SIZE, .. }), "{out:?}");
    assert_eq!(owner.states(), ["online", "online"]);
    flush(&nexus);
    verify_image(&a.image("sp-r1"), &expected);
    verify_image(&b.image("sp-r2"), &expected);
    assert!(
        data_of(&a.image("sp-r1")) == data_of(&b.image("sp-r2")),
        "source and target differ"
    );
    // The written blocks and the label area, not the volume.
    let written = 4 << 16;
    let on_target = allocated(&b);
    assert!(
        (written..=written + wire::label::LABEL_AREA).contains(&on_target),
        "{on_target} bytes allocated on the target for {written} written"
    );
}
