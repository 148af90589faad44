//! The replica set changes while the volume runs: a replica is removed and a new one
//! added, filled and brought online under a verifying workload from four "queues"
//! (threads, each with its own nexus), with no error and no lost write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::executor::block_on;
use replication::ranges::RangeTable;
use replication::state::RebuildKind;
use replication::testing::{fresh_mem_slot, mem_volume, stamp_of, stamped_block, test_nexus, Rng};
use replication::{BlockRequest, ByteLen, ByteOffset, ReplicaState, SlotIndex};

const BLOCK: usize = 4096;
const BLOCKS: usize = 256;
const QUEUES: usize = 4;

#[test]
fn a_replica_is_swapped_under_a_verifying_workload() {
    let (stores, health) = mem_volume(3);
    for s in &stores {
        s.set_latency(Duration::from_micros(200));
    }
    let ranges = RangeTable::new();
    let stop = AtomicBool::new(false);
    let (fresh, spec) = fresh_mem_slot(&stores[0]);
    fresh.set_latency(Duration::from_micros(200));
    let expected: Vec<Vec<u64>> = std::thread::scope(|sc| {
        let workers: Vec<_> = (0..QUEUES)
            .map(|q| {
                let (health, ranges, stop) = (&health, &ranges, &stop);
                sc.spawn(move || {
                    let nexus = test_nexus(health, ranges.clone());
                    let mut last = vec![0u64; BLOCKS];
                    let mut rng = Rng(q as u64 * 31 + 7);
                    let mut seq = 0u64;
                    let mut buf = vec![0u8; BLOCK];
                    while !stop.load(Ordering::SeqCst) {
                        // This queue owns the blocks ≡ q (mod QUEUES).
                        let b = rng.below(BLOCKS / QUEUES) * QUEUES + q;
                        let off = ByteOffset((b * BLOCK) as u64);
                        if rng.below(3) == 0 {
                            block_on(nexus.submit(
                                BlockRequest::Read {
                                    offset: off,
                                    len: ByteLen(BLOCK as u64),
                                },
                                &mut buf,
                            ))
                            .expect("read");
                            assert_eq!(stamp_of(b, &buf), last[b], "queue {q} block {b}");
                        } else {
                            seq += 1;
                            buf.copy_from_slice(&stamped_block(b, seq, BLOCK));
                            block_on(nexus.submit(
                                BlockRequest::Write {
                                    offset: off,
                                    len: ByteLen(BLOCK as u64),
                                    fua: false,
                                },
                                &mut buf,
                            ))
                            .expect("write");
                            last[b] = seq;
                        }
                    }
                    last
                })
            })
            .collect();

        // A failed assertion below must still stop the workers, or the scope waits
        // for them forever.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let _stop = StopOnDrop(&stop);
        std::thread::sleep(Duration::from_millis(150));
        // Out with replica 2, in with a new one: it takes writes at once...
        // `held` stands for a request of the old set still in flight (whether a
        // worker's request is in flight at this instant depends on scheduling):
        // slot 2's index is not reused while it lives.
        let held = health.replica_set();
        health.remove_slot(SlotIndex(2)).expect("remove");
        let new = health.add_slot(spec).expect("add");
        assert_eq!(
            new,
            SlotIndex(3),
            "slot 2 is still held by requests of the old set"
        );
        drop(held);
        health
            .set_state(
                new,
                ReplicaState::Rebuilding {
                    kind: RebuildKind::Full,
                },
            )
            .expect("rebuilding");
        // The workers write all the time, but a loaded host may not schedule one
        // during the copy below: wait (bounded) until one reaches the new replica.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while fresh.writes() == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        // ...and is filled chunk by chunk under the range table, so a copy never
        // overwrites a newer write.
        for chunk in 0..BLOCKS / 16 {
            let (off, len) = (chunk * 16 * BLOCK, 16 * BLOCK);
            let _g = block_on(ranges.lock(off as u64, len as u64, &None));
            fresh.put(off, &stores[0].bytes(off, len));
        }
        assert_eq!(fresh.reads(), 0, "a rebuilding replica takes no reads");
        assert!(fresh.writes() > 0, "it took writes while rebuilding");
        health.set_state(new, ReplicaState::Online).expect("online");
        let writes_at_removal = stores[2].writes();
        // Online, it serves reads: wait (bounded) for one, as above.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while fresh.reads() == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(50));
        stop.store(true, Ordering::SeqCst);
        let last = workers.into_iter().map(|w| w.join().unwrap()).collect();
        assert!(
            stores[2].writes() <= writes_at_removal + QUEUES as u64,
            "the removed replica kept taking writes"
        );
        last
    });
    assert!(fresh.reads() > 0, "online now: it serves reads");
    assert_eq!(health.stats.snapshot().errors, 0);
    let snap = health.snapshot();
    let names: Vec<&str> = snap.slots.iter().map(|s| s.state.name()).collect();
    assert_eq!(names, ["online", "online", "online"]);
    assert!(snap.membership.members.contains(&snap.slots[2].uuid));
    // Its label says so: it is a member of the newest epoch, like the others.
    let l = fresh.label().unwrap();
    assert!(l.is_current_at(snap.membership.epoch), "{l:?}");
    assert!(!stores[2]
        .label()
        .unwrap()
        .is_current_at(snap.membership.epoch));
    // Every current replica holds exactly the acknowledged writes.
    for (q, last) in expected.iter().enumerate() {
        for b in (q..BLOCKS).step_by(QUEUES) {
            for (name, s) in [("r0", &stores[0]), ("r1", &stores[1]), ("new", &fresh)] {
                assert_eq!(
                    stamp_of(b, &s.bytes(b * BLOCK, BLOCK)),
                    last[b],
                    "{name} block {b}"
                );
            }
        }
    }
}
