//! Host-crash resync: after an unclean shutdown, the regions where writes may
//! have been in flight are made identical on every online replica.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::{CopyConfig, Durability, Handles, Pacer, Progress};
use crate::health::{indices, Health, ReadVerdict};
use crate::ids::{ByteLen, ByteOffset, SlotIndex};
use crate::ranges::RangeTable;
use crate::state::{FaultReason, IoOp, RebuildStop};

/// Host-crash resync: make the online replicas identical where the last run may
/// have had mutations in flight (`in_flight`, the activity log's hot extents),
/// copying from the replica reads are pinned to (the first online one, so no read
/// sees a region change under it) to every other online one, each chunk under the
/// range lock. Then reads are spread again. A replica whose write fails is faulted
/// with what it still lacks in its map. Returns the bytes copied per target.
pub fn resync(
    health: &Arc<Health>,
    ranges: &RangeTable,
    in_flight: &[(ByteOffset, ByteLen)],
    cfg: &CopyConfig,
    progress: &Progress,
) -> Result<u64, FaultReason> {
    let total: u64 = in_flight.iter().map(|(_, l)| l.0).sum();
    progress.total.store(total, Ordering::Release);
    progress.done.store(0, Ordering::Release);
    let mut buf = vec![0u8; cfg.chunk.0 as usize];
    let mut handles = Handles::default();
    let mut pacer = Pacer::new(cfg.rate.clone());
    // Per target: what it was sent since its last flush.
    let mut durable: Vec<(SlotIndex, Durability)> = Vec::new();
    let pieces: Vec<(ByteOffset, ByteLen)> = in_flight
        .iter()
        .flat_map(|&(o, l)| {
            (o.0..o.0 + l.0)
                .step_by(cfg.chunk.0 as usize)
                .map(move |at| (ByteOffset(at), ByteLen(cfg.chunk.0.min(o.0 + l.0 - at))))
        })
        .collect();
    for (i, &(offset, len)) in pieces.iter().enumerate() {
        if progress.cancel.load(Ordering::Acquire) {
            return Err(FaultReason::RebuildStopped {
                why: RebuildStop::Cancelled,
            });
        }
        let (t0, requests) = (Instant::now(), health.app_requests());
        let _range = futures::executor::block_on(ranges.lock(offset.0, len.0, &None));
        let _al = futures::executor::block_on(health.enter_activity(offset, len, None)).map_err(
            |_| FaultReason::RebuildStopped {
                why: RebuildStop::LogFailed,
            },
        )?;
        let data = &mut buf[..len.0 as usize];
        // The pinned source; one that fails is faulted by read_failed and the next
        // online replica becomes the source (and where reads go).
        let src = loop {
            let Some(src) = indices(health.read_mask()).next() else {
                return Err(FaultReason::RebuildStopped {
                    why: RebuildStop::NoSource,
                });
            };
            let h = handles
                .get(health, src)
                .ok_or(FaultReason::RebuildStopped {
                    why: RebuildStop::NoSource,
                })?;
            match futures::executor::block_on(h.read(offset, data)) {
                Ok(()) => break src,
                Err(e) => {
                    if let ReadVerdict::Fail(_) = health.read_failed(src, e) {
                        return Err(FaultReason::RebuildStopped {
                            why: RebuildStop::NoSource,
                        });
                    }
                }
            }
        };
        for t in indices(health.read_mask() & !(1 << src.get())) {
            let Some(h) = handles.get(health, t) else {
                continue;
            };
            let d = match durable.iter().position(|(s, _)| *s == t) {
                Some(k) => &mut durable[k].1,
                None => {
                    durable.push((t, Durability::new(cfg.flush_every)));
                    &mut durable.last_mut().expect("pushed").1
                }
            };
            let res = futures::executor::block_on(h.write(offset, data, false))
                .map_err(|e| FaultReason::of_errno(IoOp::Write, e))
                .and_then(|()| {
                    d.wrote(health, t, offset, len);
                    match d.due() {
                        true => d
                            .flush(health, t, h)
                            .map_err(|e| FaultReason::of_errno(IoOp::Flush, e)),
                        false => Ok(()),
                    }
                });
            if let Err(reason) = res {
                lost(health, t, reason, d.unflushed(), &pieces[i..]);
            }
        }
        progress.done.fetch_add(len.0, Ordering::AcqRel);
        drop((_range, _al));
        pacer.pace(len, t0.elapsed(), health.app_requests() != requests);
    }
    // Durable on every target before reads are spread over them.
    for (t, d) in &mut durable {
        if health.read_mask() & (1 << t.get()) == 0 {
            continue; // faulted meanwhile, with what it lacks
        }
        let Some(h) = handles.get(health, *t) else {
            continue;
        };
        if let Err(e) = d.flush(health, *t, h) {
            lost(
                health,
                *t,
                FaultReason::of_errno(IoOp::Flush, e),
                d.unflushed(),
                &[],
            );
        }
    }
    // Every target durable (or faulted with what it lacks): the carried extents
    // have served their purpose.
    if let Some(al) = health.activity() {
        al.release_carried();
    }
    health.set_read_policy(crate::health::ReadPolicy::Spread);
    Ok(total)
}

/// A resync target failed: faulted, lacking what it was sent since its last flush
/// and what the resync has not reached yet.
fn lost(
    health: &Health,
    t: SlotIndex,
    reason: FaultReason,
    unflushed: &[(ByteOffset, ByteLen)],
    rest: &[(ByteOffset, ByteLen)],
) {
    let missing: Vec<_> = unflushed.iter().chain(rest).copied().collect();
    if let Err(err) = health.fault_missing(t, reason, &missing) {
        tracing::warn!(volume = health.volume(), slot = %t, error = %err, "resync target already out");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::SlotIndex;
    use crate::rebuild::tests::{state, write, K};
    use crate::rebuild::Rate;
    use crate::state::ReplicaState;
    use crate::testing::{mem_volume, test_nexus, Fault};

    #[test]
    fn a_resync_makes_the_online_replicas_identical_where_writes_were_in_flight() {
        let (stores, h) = mem_volume(3);
        let ranges = RangeTable::new();
        let n = test_nexus(&h, ranges.clone());
        write(&n, 0, 1 << 20, 1);
        // As a host crash leaves them: a write reached replica 0 and 2 only, one
        // other reached replica 1 only, both in the first 256 KiB.
        stores[0].put(8 * K as usize, &[7u8; 4096]);
        stores[2].put(8 * K as usize, &[7u8; 4096]);
        stores[1].put(200 * K as usize, &[9u8; 4096]);
        h.set_read_policy(crate::health::ReadPolicy::Primary);
        let p = Progress::default();
        let hot = [(ByteOffset(0), ByteLen(256 * K))];
        let cfg = CopyConfig {
            chunk: ByteLen(64 * K),
            rate: Rate::uncapped(),
            flush_every: ByteLen(128 * K),
        };
        assert_eq!(resync(&h, &ranges, &hot, &cfg, &p), Ok(256 * K));
        // The pinned replica (the first online one) won everywhere.
        let first = stores[0].bytes(0, 1 << 20);
        assert_eq!(first[8 * K as usize], 7);
        assert_eq!(first[200 * K as usize], 1);
        assert_eq!(stores[1].bytes(0, 1 << 20), first);
        assert_eq!(stores[2].bytes(0, 1 << 20), first);
        assert_eq!(h.read_policy(), crate::health::ReadPolicy::Spread);
        assert_eq!(h.snapshot().read_policy, crate::health::ReadPolicy::Spread);
        // A target that fails is faulted with what it still lacks.
        h.set_read_policy(crate::health::ReadPolicy::Primary);
        // The policy's persist writes labels: done before the disk fails.
        while !h.is_durable() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        stores[2].set_fault(Fault::Writes);
        assert_eq!(resync(&h, &ranges, &hot, &cfg, &p), Ok(256 * K));
        assert!(matches!(state(&h, 2), ReplicaState::Faulted { .. }));
        let map = h.dirty_map(SlotIndex(2)).expect("its map");
        assert_eq!(map.dirty_bytes(), 256 * K, "every range it did not get");
    }
}
