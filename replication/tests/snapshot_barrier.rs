//! The snapshot barrier under load: writers on four threads keep writes in
//! flight through the nexus to two file replicas (layered stores) while a
//! snapshot is taken. The snapshot must be identical on both replicas and hold
//! exactly the writes acknowledged before the call (or overwritten by writes
//! issued before it returned), none issued after. The same run without the drain
//! (a test-only switch) must fail: the test has teeth.
//!
//! Its own test binary: the switch is process-wide.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::executor::block_on;
use replication::backing::Backing;
use replication::health::NoPersist;
use replication::local::{Create, LocalBacking};
use replication::ranges::RangeTable;
use replication::testing::{health_over, stamp_of, stamped_block, test_nexus, Rng};
use replication::{BlockRequest, ByteLen, ByteOffset};
use wire::{ReplicaUuid, SnapshotUuid, VolumeUuid};

const BLOCK: usize = 4096;
const BLOCKS: usize = 512;

/// Every write: (block, seq, issued at, acknowledged at), on one event clock
/// shared with the snapshot's call and return.
#[derive(Default)]
struct Log {
    writes: Vec<(usize, u64, u64, Option<u64>)>,
}

fn run(round: u64, drain: bool) -> Result<(), String> {
    replication::snapshots::SKIP_DRAIN_FOR_TESTS.store(!drain, Ordering::SeqCst);
    let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")).unwrap();
    let size = (BLOCKS * BLOCK) as u64;
    let replicas: Vec<Arc<LocalBacking>> = (0..2)
        .map(|i| {
            Arc::new(
                LocalBacking::open(
                    &dir.path().join(format!("r{i}.img")),
                    size,
                    Create::IfMissing,
                )
                .unwrap(),
            )
        })
        .collect();
    let health = health_over(
        "v",
        VolumeUuid::random(),
        size,
        replicas
            .iter()
            .map(|b| (ReplicaUuid::random(), Backing::Local(b.clone())))
            .collect(),
        Box::new(NoPersist),
    );
    let ranges = RangeTable::new();
    // A global clock of events: issue, ack, snapshot call, snapshot return.
    let clock = Arc::new(AtomicU64::new(1));
    let seqs = Arc::new(AtomicU64::new(1));
    let log = Arc::new(Mutex::new(Log::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let (health, ranges, clock, seqs, log, stop) = (
                health.clone(),
                ranges.clone(),
                clock.clone(),
                seqs.clone(),
                log.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let nexus = test_nexus(&health, ranges);
                let mut rng = Rng(round * 977 + t * 31 + 7);
                while !stop.load(Ordering::SeqCst) {
                    let b = rng.below(BLOCKS);
                    let seq = seqs.fetch_add(1, Ordering::SeqCst);
                    let issued = clock.fetch_add(1, Ordering::SeqCst);
                    let mut data = stamped_block(b, seq, BLOCK);
                    block_on(nexus.submit(
                        BlockRequest::Write {
                            offset: ByteOffset((b * BLOCK) as u64),
                            len: ByteLen(BLOCK as u64),
                            fua: false,
                        },
                        &mut data,
                    ))
                    .expect("write");
                    let acked = clock.fetch_add(1, Ordering::SeqCst);
                    log.lock()
                        .unwrap()
                        .writes
                        .push((b, seq, issued, Some(acked)));
                }
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(30));
    let uuid = SnapshotUuid::random();
    let called = clock.fetch_add(1, Ordering::SeqCst);
    replication::snapshots::create(&health, &ranges, uuid, "s", 1).map_err(|e| e.to_string())?;
    let returned = clock.fetch_add(1, Ordering::SeqCst);
    std::thread::sleep(std::time::Duration::from_millis(20));
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    let log = log.lock().unwrap();
    // What each replica's snapshot holds.
    let held: Vec<Vec<u64>> = replicas
        .iter()
        .map(|r| {
            let mut buf = vec![0u8; BLOCK];
            (0..BLOCKS)
                .map(|b| {
                    r.read_snapshot(uuid, (b * BLOCK) as u64, &mut buf).unwrap();
                    stamp_of(b, &buf)
                })
                .collect()
        })
        .collect();
    let issued_by: std::collections::HashMap<u64, (usize, u64)> =
        log.writes.iter().map(|&(b, s, i, _)| (s, (b, i))).collect();
    for (b, (&got, &other)) in held[0].iter().zip(&held[1]).enumerate() {
        if got != other {
            return Err(format!(
                "round {round}: block {b} differs between the replicas' snapshots: seq {got} vs {other}"
            ));
        }
        // The newest write of b acknowledged before the call must be in, or a later
        // one issued before the snapshot returned.
        let last_acked = log
            .writes
            .iter()
            .filter(|w| w.0 == b && w.3.is_some_and(|a| a < called))
            .map(|w| w.1)
            .max()
            .unwrap_or(0);
        if got < last_acked {
            return Err(format!(
                "round {round}: block {b} holds seq {got}, older than seq {last_acked} acknowledged before the snapshot"
            ));
        }
        if got != 0 {
            let (wb, issued) = issued_by[&got];
            assert_eq!(wb, b);
            if issued > returned {
                return Err(format!(
                    "round {round}: block {b} holds seq {got}, issued after the snapshot returned"
                ));
            }
        }
    }
    let writes_after = log.writes.iter().filter(|w| w.2 > returned).count();
    assert!(writes_after > 0, "the writers went on after the snapshot");
    Ok(())
}

#[test]
fn the_barrier_takes_the_same_snapshot_everywhere_and_without_the_drain_it_does_not() {
    for round in 0..8 {
        run(round, true).unwrap_or_else(|e| panic!("with the drain: {e}"));
    }
    let failures = (0..8).filter(|&r| run(100 + r, false).is_err()).count();
    replication::snapshots::SKIP_DRAIN_FOR_TESTS.store(false, Ordering::SeqCst);
    assert!(
        failures > 0,
        "without the drain every round passed: the test cannot see what the drain prevents"
    );
}

/// The owner died mid-barrier after one replica took the snapshot: the next
/// activation undoes it there (the replicas' snapshot sets agree again, the data
/// is untouched); a snapshot both took is kept.
#[test]
fn a_barrier_interrupted_by_the_owners_death_is_undone_at_the_next_activation() {
    let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")).unwrap();
    let size = (64 * BLOCK) as u64;
    let open = |i: usize| {
        Arc::new(
            LocalBacking::open(
                &dir.path().join(format!("r{i}.img")),
                size,
                Create::IfMissing,
            )
            .unwrap(),
        )
    };
    let (a, b) = (open(0), open(1));
    let health = health_over(
        "v",
        VolumeUuid::random(),
        size,
        vec![
            (ReplicaUuid::random(), Backing::Local(a.clone())),
            (ReplicaUuid::random(), Backing::Local(b.clone())),
        ],
        Box::new(NoPersist),
    );
    let nexus = replication::testing::mem_nexus(&health);
    let mut data = stamped_block(3, 7, BLOCK);
    block_on(nexus.submit(
        BlockRequest::Write {
            offset: ByteOffset((3 * BLOCK) as u64),
            len: ByteLen(BLOCK as u64),
            fua: true,
        },
        &mut data,
    ))
    .unwrap();
    let both = SnapshotUuid::random();
    a.snapshot(both, "both", 10).unwrap();
    b.snapshot(both, "both", 10).unwrap();
    let half = SnapshotUuid::random();
    a.snapshot(half, "half", 20).unwrap();
    // Not the one under way: an older snapshot one replica lacks stays.
    assert!(replication::snapshots::settle_half_taken(&health, both).is_empty());
    let undone = replication::snapshots::settle_half_taken(&health, half);
    assert_eq!(undone, [(a.path().display().to_string(), half)]);
    let names = |r: &LocalBacking| {
        r.store()
            .list()
            .into_iter()
            .map(|s| s.name)
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&a), ["both"]);
    assert_eq!(names(&b), ["both"]);
    let mut buf = vec![0u8; BLOCK];
    block_on(nexus.submit(
        BlockRequest::Read {
            offset: ByteOffset((3 * BLOCK) as u64),
            len: ByteLen(BLOCK as u64),
        },
        &mut buf,
    ))
    .unwrap();
    assert_eq!(stamp_of(3, &buf), 7);
    // Settled: nothing more to undo.
    assert!(replication::snapshots::settle_half_taken(&health, half).is_empty());
}
