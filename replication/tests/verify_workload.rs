//! A verifying workload through the nexus (in the spirit of Crucible's verifier): every
//! block carries the sequence number of its last write. Replicas fail at random (never
//! all at once); afterwards every block must read back as its last *acknowledged*
//! write — or, for a write that failed to the application, as either the old or the
//! new value — from every replica that is still online.

use std::sync::Arc;

use futures::executor::block_on;
use replication::backing::Backing;
use replication::health::NoPersist;
use replication::local::{Create, LocalBacking};
use replication::testing::{health_over, mem_nexus, stamp_of, stamped_block, Fault, MemStore, Rng};
use replication::{BlockRequest, ByteLen, ByteOffset};
use wire::{ReplicaUuid, VolumeUuid};

const BLOCK: usize = 4096;
const BLOCKS: usize = 256;

/// A [`stamped_block`] of this test's block size.
fn block_data(block: usize, seq: u64) -> Vec<u8> {
    stamped_block(block, seq, BLOCK)
}

#[test]
fn last_acknowledged_write_survives_random_replica_faults() {
    let faulted: u32 = (1..=20u64).map(run_seed).sum();
    // Not vacuous: the random faults really took replicas out along the way.
    assert!(faulted >= 10, "only {faulted} replica faults over 20 runs");
}

/// Returns how many replicas ended up faulted.
fn run_seed(seed: u64) -> u32 {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let dir = tempfile::tempdir().unwrap();
    let size = (BLOCKS * BLOCK) as u64;
    let local =
        Arc::new(LocalBacking::open(&dir.path().join("r0.img"), size, Create::IfMissing).unwrap());
    let mems: Vec<Arc<MemStore>> = (0..2).map(|_| MemStore::new(BLOCKS * BLOCK)).collect();
    let mut backings = vec![(ReplicaUuid::random(), Backing::Local(local))];
    backings.extend(
        mems.iter()
            .map(|m| (ReplicaUuid::random(), Backing::Memory(m.clone()))),
    );
    let health = health_over(
        "v",
        VolumeUuid::random(),
        size,
        backings,
        Box::new(NoPersist),
    );
    let nexus = mem_nexus(&health);

    // acked[b] = seq of the last acknowledged write; maybe[b] = a failed write's seq.
    let mut acked = vec![0u64; BLOCKS];
    let mut maybe: Vec<Option<u64>> = vec![None; BLOCKS];
    let mut seq = 0u64;
    for step in 0..600 {
        // Now and then a memory replica starts failing writes or reads (or recovers:
        // a faulted replica stays out of the set anyway).
        if step % 50 == 25 {
            let m = rng.below(2);
            let f = [Fault::None, Fault::Writes, Fault::Reads, Fault::All][rng.below(4)];
            mems[m].set_fault(f);
        }
        let b = rng.below(BLOCKS);
        let off = ByteOffset((b * BLOCK) as u64);
        if rng.below(3) == 0 {
            let mut buf = vec![0u8; BLOCK];
            let res = block_on(nexus.submit(
                BlockRequest::Read {
                    offset: off,
                    len: ByteLen(BLOCK as u64),
                },
                &mut buf,
            ));
            // The local replica never fails, so some online replica always answers.
            res.unwrap_or_else(|e| panic!("seed {seed} step {step}: read failed: {e}"));
            let got = if buf.iter().all(|&x| x == 0) {
                0
            } else {
                stamp_of(b, &buf)
            };
            assert!(
                got == acked[b] || Some(got) == maybe[b],
                "seed {seed} step {step}: block {b} reads seq {got}, acked {}",
                acked[b]
            );
        } else {
            seq += 1;
            let mut data = block_data(b, seq);
            let fua = rng.below(4) == 0;
            match block_on(nexus.submit(
                BlockRequest::Write {
                    offset: off,
                    len: ByteLen(BLOCK as u64),
                    fua,
                },
                &mut data,
            )) {
                Ok(n) => {
                    assert_eq!(n as usize, BLOCK);
                    acked[b] = seq;
                    maybe[b] = None;
                }
                Err(_) => maybe[b] = Some(seq),
            }
        }
    }
    assert!(
        health.read_mask() & 1 == 1,
        "the never-failing local replica stays online"
    );
    // Every online replica holds exactly what was acknowledged.
    let online = health.read_mask();
    for (b, &want) in acked.iter().enumerate() {
        let mut buf = vec![0u8; BLOCK];
        block_on(nexus.submit(
            BlockRequest::Read {
                offset: ByteOffset((b * BLOCK) as u64),
                len: ByteLen(BLOCK as u64),
            },
            &mut buf,
        ))
        .unwrap();
        let got = if buf.iter().all(|&x| x == 0) {
            0
        } else {
            stamp_of(b, &buf)
        };
        assert!(
            got == want || Some(got) == maybe[b],
            "seed {seed}: block {b}: {got} vs acked {want}"
        );
        for (i, m) in mems.iter().enumerate() {
            if online & (1 << (i + 1)) != 0 {
                let d = m.bytes(b * BLOCK, BLOCK);
                let g = if d.iter().all(|&x| x == 0) {
                    0
                } else {
                    stamp_of(b, &d)
                };
                assert!(
                    g == want || Some(g) == maybe[b],
                    "seed {seed}: online replica {} block {b}: {g} vs {want}",
                    i + 1
                );
            }
        }
    }
    3 - online.count_ones()
}
