//! The nexus: one block request in, replica requests out, one result back.
//!
//! * READ goes to one replica of the read set: round-robin over the local ones when
//!   any is online, else over the remote ones (or pinned, see [`ReadPolicy`]); a
//!   failed read is reported to [`Health`] and retried where it says.
//! * WRITE, DISCARD and WRITE_ZEROES first take their range in the volume's
//!   [`RangeTable`] (overlapping mutations reach every replica in one order), then
//!   go to every replica of the write set at once and are acknowledged by
//!   [`Health::settle`], the one ack rule. FLUSH goes to the write set too.
//! * While no replica is online but the last one is reconnecting, requests wait for
//!   it, up to the no-replica timeout.
//!
//! A `Nexus` lives on one queue thread; all queues of a volume share its [`Health`]
//! and its range table. It makes its own per-queue replica handles from the
//! volume's [`crate::health::ReplicaSet`] and remakes them when the set changes;
//! each request keeps the handles it started with until it completes.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use futures::future::join_all;

use crate::backing::Backing;
use crate::error::Errno;
use crate::health::{bump, indices, Health, ReadPolicy, ReplicaSet, Settle};
use crate::ids::{ByteLen, ByteOffset, SlotIndex};
use crate::ranges::RangeTable;
use crate::replica::{IoFuture, Replica};
use crate::request::BlockRequest;
use crate::state::IoOp;
use crate::wake::Kick;

/// Makes this queue's handle of a replica.
pub type HandleFactory = Box<dyn Fn(&Backing) -> Box<dyn Replica>>;

/// This queue's handles of one replica set.
struct QueueSet {
    epoch: u64,
    /// Keeps the set (and so its slots' indices) alive while requests use it.
    _set: Arc<ReplicaSet>,
    handles: Vec<Option<Box<dyn Replica>>>,
}

impl QueueSet {
    fn handle(&self, i: SlotIndex) -> Option<&dyn Replica> {
        self.handles.get(i.get())?.as_deref()
    }

    /// Send `m` to slot `i`, keeping its unflushed regions (remote replicas) up
    /// to date: marked when a write completes, forgotten when a FLUSH sent after
    /// it completes.
    async fn send(&self, i: SlotIndex, m: &Mutation<'_>) -> Result<(), Errno> {
        let Some(r) = self.handle(i) else {
            return Err(Errno::EIO);
        };
        let Some(u) = self._set.unflushed.get(i.get()).and_then(Option::as_ref) else {
            return m.start(r).await;
        };
        match m.req {
            BlockRequest::Flush => {
                let t = u.flush_sent();
                m.start(r).await?;
                u.flushed(t);
            }
            BlockRequest::Write { fua: true, .. } => m.start(r).await?,
            req => {
                m.start(r).await?;
                if let Some((offset, len)) = req.range() {
                    u.wrote(offset, len);
                }
            }
        }
        Ok(())
    }
}

/// A mutation, as sent to each replica: the request, and a WRITE's data.
#[derive(Clone, Copy)]
struct Mutation<'d> {
    req: BlockRequest,
    data: &'d [u8],
}

impl<'d> Mutation<'d> {
    fn start<'a>(&self, r: &'a dyn Replica) -> IoFuture<'a>
    where
        'd: 'a,
    {
        match self.req {
            BlockRequest::Write { offset, fua, .. } => r.write(offset, self.data, fua),
            BlockRequest::Flush => r.flush(),
            BlockRequest::Discard { offset, len } => r.discard(offset, len),
            BlockRequest::WriteZeroes {
                offset,
                len,
                no_unmap,
            } => r.write_zeroes(offset, len, no_unmap),
            BlockRequest::Read { .. } => unreachable!("a read is not a mutation"),
        }
    }

    fn op(&self) -> IoOp {
        match self.req {
            BlockRequest::Write { .. } => IoOp::Write,
            BlockRequest::Flush => IoOp::Flush,
            BlockRequest::Discard { .. } => IoOp::Discard,
            BlockRequest::WriteZeroes { .. } => IoOp::WriteZeroes,
            BlockRequest::Read { .. } => IoOp::Read,
        }
    }
}

pub struct Nexus {
    health: Arc<Health>,
    ranges: Arc<RangeTable>,
    make: HandleFactory,
    set: RefCell<Rc<QueueSet>>,
    /// Wakes this queue's thread when another thread completes what it waits for.
    kick: Option<Arc<dyn Kick>>,
    next_read: Cell<usize>,
}

impl Nexus {
    pub fn new(
        health: Arc<Health>,
        ranges: Arc<RangeTable>,
        kick: Option<Arc<dyn Kick>>,
        make: HandleFactory,
    ) -> Nexus {
        let set = Rc::new(Self::make_set(&health, &make));
        Nexus {
            health,
            ranges,
            make,
            set: RefCell::new(set),
            kick,
            next_read: Cell::new(0),
        }
    }

    fn make_set(health: &Health, make: &HandleFactory) -> QueueSet {
        let set = health.replica_set();
        QueueSet {
            epoch: set.epoch,
            handles: set.backings.iter().map(|b| b.as_ref().map(make)).collect(),
            _set: set,
        }
    }

    /// This queue's handles of the current replica set.
    fn queue_set(&self) -> Rc<QueueSet> {
        let cur = self.set.borrow().clone();
        if cur.epoch == self.health.set_epoch() {
            return cur;
        }
        let fresh = Rc::new(Self::make_set(&self.health, &self.make));
        *self.set.borrow_mut() = fresh.clone();
        fresh
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Serve one request. `buf` holds at least `req.payload_len()` bytes: the data to
    /// write, or room for the data read. Returns the bytes transferred.
    pub async fn submit(&self, req: BlockRequest, buf: &mut [u8]) -> Result<u32, Errno> {
        let stats = &self.health.stats;
        let lat = &stats.latency;
        let _timed = Timed::start(
            &stats.in_flight,
            match req {
                BlockRequest::Read { .. } => &lat.read,
                BlockRequest::Write { .. } => &lat.write,
                BlockRequest::Discard { .. } | BlockRequest::WriteZeroes { .. } => &lat.trim,
                _ => &lat.flush,
            },
        );
        if self.health.fence().is_tripped() {
            bump(&stats.errors, 1);
            return Err(Errno::EIO);
        }
        let res = match req {
            BlockRequest::Read { offset, len } => {
                let res = self.read(offset, &mut buf[..len.0 as usize]).await;
                bump(&stats.reads, 1);
                bump(&stats.read_bytes, len.0);
                res.map(|()| len.0 as u32)
            }
            mutation => {
                let (counter, bytes) = match mutation {
                    BlockRequest::Write { len, .. } => {
                        bump(&stats.write_bytes, len.0);
                        (&stats.writes, len.0 as u32)
                    }
                    BlockRequest::Discard { .. } => (&stats.discards, 0),
                    BlockRequest::WriteZeroes { .. } => (&stats.write_zeroes, 0),
                    _ => (&stats.flushes, 0),
                };
                bump(counter, 1);
                // FLUSH has no range; the others take theirs in the range table and
                // enter it in the activity log.
                let (_range, _al) = match mutation.range() {
                    Some((offset, len)) => {
                        let range = self.range(offset, len).await;
                        match self
                            .health
                            .enter_activity(offset, len, self.kick.clone())
                            .await
                        {
                            Ok(al) => (range, al),
                            Err(e) => {
                                bump(&stats.errors, 1);
                                return Err(e);
                            }
                        }
                    }
                    None => (None, None),
                };
                let data = &buf[..mutation.payload_len()];
                self.mutate(Mutation {
                    req: mutation,
                    data,
                })
                .await
                .map(|()| bytes)
            }
        };
        if res.is_err() {
            bump(&stats.errors, 1);
        }
        res
    }

    /// Take `[offset, offset + len)` in the range table.
    async fn range(
        &self,
        offset: ByteOffset,
        len: ByteLen,
    ) -> Option<crate::ranges::RangeGuard<'_>> {
        if cfg!(feature = "bench-unordered") {
            return None;
        }
        Some(self.ranges.lock(offset.0, len.0, &self.kick).await)
    }

    /// Wait for the sets to change while no replica is online but one is coming
    /// back; `false` once the no-replica timeout (counted from the first wait) passed.
    async fn wait_for_replica(&self, since: u64, deadline: &mut Option<Instant>) -> bool {
        let d = *deadline.get_or_insert_with(|| Instant::now() + self.health.no_replica_timeout());
        self.health.changed(since, Some(d), self.kick.clone()).await || Instant::now() < d
    }

    async fn read(&self, offset: ByteOffset, buf: &mut [u8]) -> Result<(), Errno> {
        let mut deadline = None;
        loop {
            let version = self.health.signal().version();
            let online = self.health.read_mask();
            if online == 0 {
                if self.health.waiting() && self.wait_for_replica(version, &mut deadline).await {
                    continue;
                }
                return Err(Errno::EIO);
            }
            let set = self.queue_set();
            let idx = self.pick_reader(online);
            let Some(r) = set.handle(idx) else {
                // A slot newer than this queue's set: take the new set and pick again.
                continue;
            };
            match r.read(offset, buf).await {
                // A fenced read may come from a replica a newer owner has changed.
                Ok(()) if self.health.fence().is_tripped() => return Err(Errno::EIO),
                Ok(()) => return Ok(()),
                Err(e) => match self.health.read_failed(idx, e) {
                    crate::health::ReadVerdict::Retry => continue,
                    crate::health::ReadVerdict::Fail(e) => return Err(e),
                },
            }
        }
    }

    fn pick_reader(&self, online: u64) -> SlotIndex {
        debug_assert!(online != 0);
        if self.health.read_policy() == ReadPolicy::Primary {
            return SlotIndex(online.trailing_zeros() as u8);
        }
        // Local replicas first: a remote read costs a network round trip.
        let online = match online & self.health.local_mask() {
            0 => online,
            local => local,
        };
        let n = online.count_ones() as usize;
        let k = self.next_read.get();
        self.next_read.set(k.wrapping_add(1));
        indices(online).nth(k % n).expect("k % n < n set bits")
    }

    async fn mutate(&self, m: Mutation<'_>) -> Result<(), Errno> {
        let mut deadline = None;
        loop {
            let version = self.health.signal().version();
            let attempted = self.health.write_mask();
            if attempted & self.health.read_mask() == 0 {
                // Nothing online would hold it.
                if self.health.waiting() && self.wait_for_replica(version, &mut deadline).await {
                    continue;
                }
                return Err(Errno::EIO);
            }
            // (Only safe under the range lock, which the unordered cost model skips.)
            let attempted = if cfg!(feature = "bench-unordered") {
                attempted
            } else {
                self.health.skip_uncopied(attempted, m.req.range())
            };
            let set = self.queue_set();
            let failures = self.fan_out(&set, attempted, &m).await;
            match self
                .health
                .settle(attempted, &failures, m.op(), m.req.range())
            {
                Settle::Ack => return Ok(()),
                Settle::Fail(e) => return Err(e),
                Settle::AwaitDurable(t) => return self.health.durable(t, self.kick.clone()).await,
                Settle::Retry => {
                    if !self.wait_for_replica(version, &mut deadline).await {
                        return Err(Errno::EIO);
                    }
                }
            }
        }
    }

    /// Send `m` to every slot in `attempted`; the failures.
    async fn fan_out(
        &self,
        set: &QueueSet,
        attempted: u64,
        m: &Mutation<'_>,
    ) -> Vec<(SlotIndex, Errno)> {
        if attempted.count_ones() == 1 {
            // One replica: no join, no allocation on the hot path.
            let i = SlotIndex(attempted.trailing_zeros() as u8);
            return match set.send(i, m).await {
                Ok(()) => Vec::new(),
                Err(e) => vec![(i, e)],
            };
        }
        let targets: Vec<SlotIndex> = indices(attempted).collect();
        let results = join_all(targets.iter().map(|&i| set.send(i, m))).await;
        targets
            .into_iter()
            .zip(results)
            .filter_map(|(i, r)| r.err().map(|e| (i, e)))
            .collect()
    }
}

/// A request in flight: counted while it runs, its latency recorded when it ends
/// (on every path out of `submit`, errors included).
struct Timed<'a> {
    in_flight: &'a std::sync::atomic::AtomicU64,
    histogram: &'a crate::latency::Histogram,
    t0: Instant,
}

impl<'a> Timed<'a> {
    fn start(
        in_flight: &'a std::sync::atomic::AtomicU64,
        histogram: &'a crate::latency::Histogram,
    ) -> Timed<'a> {
        in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Timed {
            in_flight,
            histogram,
            t0: Instant::now(),
        }
    }
}

impl Drop for Timed<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.t0.elapsed());
        self.in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ReplicaState;
    use crate::testing::{mem_nexus, mem_volume, Fault};
    use futures::executor::block_on;

    fn write(n: &Nexus, off: u64, byte: u8) -> Result<u32, Errno> {
        let mut buf = vec![byte; 4096];
        block_on(n.submit(
            BlockRequest::Write {
                offset: ByteOffset(off),
                len: ByteLen(4096),
                fua: false,
            },
            &mut buf,
        ))
    }

    fn read(n: &Nexus, off: u64) -> Result<Vec<u8>, Errno> {
        let mut buf = vec![0; 4096];
        block_on(n.submit(
            BlockRequest::Read {
                offset: ByteOffset(off),
                len: ByteLen(4096),
            },
            &mut buf,
        ))
        .map(|_| buf)
    }

    fn state(n: &Nexus, i: usize) -> ReplicaState {
        n.health().snapshot().slots[i].state.clone()
    }

    #[test]
    fn writes_reach_every_replica() {
        let (stores, h) = mem_volume(3);
        let n = mem_nexus(&h);
        assert_eq!(write(&n, 8192, 0x5A), Ok(4096));
        for s in &stores {
            assert_eq!(s.bytes(8192, 4096), vec![0x5A; 4096]);
        }
    }

    #[test]
    fn reads_are_spread_over_replicas() {
        let (stores, h) = mem_volume(2);
        let n = mem_nexus(&h);
        write(&n, 0, 1).unwrap();
        for _ in 0..10 {
            assert_eq!(read(&n, 0).unwrap(), vec![1; 4096]);
        }
        assert_eq!(stores[0].reads(), 5);
        assert_eq!(stores[1].reads(), 5);
    }

    #[test]
    fn write_error_faults_replica_and_the_survivors_record_it_before_the_ack() {
        let (stores, h) = mem_volume(2);
        let n = mem_nexus(&h);
        let epoch0 = h.snapshot().membership.epoch;
        stores[1].set_fault(Fault::All);
        assert_eq!(write(&n, 0, 9), Ok(4096));
        assert_eq!(h.read_mask(), 0b01);
        assert!(matches!(state(&n, 1), ReplicaState::Faulted { .. }));
        // Acknowledged only after the survivor's label shows the new epoch without it.
        let l0 = stores[0].label().unwrap();
        assert!(l0.membership.epoch > epoch0);
        assert_eq!(l0.membership.members, vec![l0.replica_uuid]);
        // Later writes skip the faulted replica entirely.
        stores[1].set_fault(Fault::None);
        write(&n, 4096, 7).unwrap();
        assert_eq!(stores[1].bytes(4096, 4096), vec![0; 4096]);
        assert_eq!(stores[0].bytes(4096, 4096), vec![7; 4096]);
        assert_eq!(h.stats.snapshot().errors, 0);
    }

    #[test]
    fn primary_policy_pins_reads_to_the_first_online_replica() {
        let (stores, h) = mem_volume(3);
        let n = mem_nexus(&h);
        h.set_read_policy(ReadPolicy::Primary);
        write(&n, 0, 4).unwrap();
        for _ in 0..6 {
            read(&n, 0).unwrap();
        }
        assert_eq!(
            (stores[0].reads(), stores[1].reads(), stores[2].reads()),
            (6, 0, 0)
        );
        // The primary fails: the next online replica takes over, still pinned.
        stores[0].set_fault(Fault::Reads);
        for _ in 0..3 {
            assert_eq!(read(&n, 0).unwrap(), vec![4; 4096]);
        }
        assert_eq!((stores[1].reads(), stores[2].reads()), (3, 0));
    }

    #[test]
    fn read_error_fails_over_to_another_replica() {
        let (stores, h) = mem_volume(2);
        let n = mem_nexus(&h);
        write(&n, 0, 3).unwrap();
        stores[0].set_fault(Fault::Reads);
        for _ in 0..4 {
            assert_eq!(read(&n, 0).unwrap(), vec![3; 4096]);
        }
        assert_eq!(h.read_mask(), 0b10);
    }

    #[test]
    fn last_replica_errors_reach_the_app_and_it_is_never_faulted() {
        let (stores, h) = mem_volume(2);
        let n = mem_nexus(&h);
        stores[0].set_fault(Fault::All);
        write(&n, 0, 1).unwrap();
        stores[1].set_fault(Fault::All);
        assert_eq!(write(&n, 0, 2), Err(Errno::EIO));
        assert_eq!(read(&n, 0), Err(Errno::EIO));
        assert_eq!(h.read_mask(), 0b10, "last replica stays online");
        stores[1].set_fault(Fault::None);
        assert_eq!(read(&n, 0).unwrap(), vec![1; 4096]);
        assert_eq!(h.stats.snapshot().errors, 2);
    }

    #[test]
    fn crossed_failures_never_ack_data_held_only_by_a_faulted_replica() {
        let (_, h) = mem_volume(2);
        // Queue A: its write reached r0 only. Queue B: its write reached r1 only.
        assert!(matches!(
            h.settle(0b11, &[(SlotIndex(1), Errno::EIO)], IoOp::Write, None),
            Settle::Ack | Settle::AwaitDurable(_)
        ));
        // B's only copy is on r1, which A just faulted: B must fail, r0 stays online.
        assert_eq!(
            h.settle(0b11, &[(SlotIndex(0), Errno::EIO)], IoOp::Write, None),
            Settle::Fail(Errno::EIO)
        );
        assert_eq!(h.read_mask(), 0b01);
    }

    #[test]
    fn a_label_that_cannot_take_the_fault_faults_its_replica_too() {
        let (stores, h) = mem_volume(3);
        let n = mem_nexus(&h);
        stores[2].set_fault(Fault::Writes);
        stores[1].fail_labels(true);
        assert_eq!(write(&n, 0, 5), Ok(4096));
        assert_eq!(h.read_mask(), 0b001, "r1 could not record r2's fault");
        let l = stores[0].label().unwrap();
        assert_eq!(l.membership.members, vec![l.replica_uuid]);
    }

    #[test]
    fn a_persist_failure_fails_io_until_durable() {
        let (stores, h, sink) = crate::testing::mem_volume_with_sink(3);
        let n = mem_nexus(&h);
        sink.fail(true);
        stores[2].set_fault(Fault::All);
        assert_eq!(write(&n, 0, 1), Err(Errno::EIO));
        assert_eq!(h.read_mask(), 0b011, "fault kept in memory");
        // A clean write still may not be acknowledged while the fault is not durable.
        assert_eq!(write(&n, 4096, 1), Err(Errno::EIO));
        sink.fail(false);
        assert_eq!(write(&n, 8192, 1), Ok(4096));
        assert!(h.is_durable());
    }

    #[test]
    fn flush_discard_and_write_zeroes_fan_out() {
        let (stores, h) = mem_volume(2);
        let n = mem_nexus(&h);
        write(&n, 0, 0xFF).unwrap();
        let mut none = [];
        block_on(n.submit(BlockRequest::Flush, &mut none)).unwrap();
        block_on(n.submit(
            BlockRequest::WriteZeroes {
                offset: ByteOffset(0),
                len: ByteLen(2048),
                no_unmap: false,
            },
            &mut none,
        ))
        .unwrap();
        block_on(n.submit(
            BlockRequest::Discard {
                offset: ByteOffset(8192),
                len: ByteLen(4096),
            },
            &mut none,
        ))
        .unwrap();
        for s in &stores {
            assert_eq!(s.flushes(), 1);
            assert_eq!(s.bytes(0, 2048), vec![0; 2048]);
            assert_eq!(s.bytes(2048, 2048), vec![0xFF; 2048]);
        }
        let st = h.stats.snapshot();
        assert_eq!(
            (st.writes, st.flushes, st.discards, st.write_zeroes),
            (1, 1, 1, 1)
        );
    }
}
