//! The nexus: one block request in, replica requests out, one result back.
//!
//! * READ goes to one online replica: round-robin over the local ones when any is
//!   online, else over the remote ones (or pinned, see [`ReadPolicy`]); a failed read
//!   faults that replica (if another is online) and retries on the next one.
//! * WRITE, FLUSH, DISCARD and WRITE_ZEROES go to every online replica at once and
//!   are acknowledged by [`Health::settle`], the one ack rule.
//!
//! A `Nexus` lives on one queue thread; all queues of a volume share its [`Health`].

use std::cell::Cell;
use std::sync::Arc;

use futures::future::join_all;

use crate::error::Errno;
use crate::health::{bump, indices, Health, ReadPolicy};
use crate::ids::ReplicaIndex;
use crate::replica::{IoFuture, Replica};
use crate::request::BlockRequest;

pub struct Nexus<'r> {
    replicas: Vec<Box<dyn Replica + 'r>>,
    health: Arc<Health>,
    /// Bit i set = replica i is local: reads go there when one is online.
    local: u64,
    next_read: Cell<usize>,
}

impl<'r> Nexus<'r> {
    /// `replicas[i]` must be the replica whose health is `health`'s entry `i`.
    pub fn new(replicas: Vec<Box<dyn Replica + 'r>>, health: Arc<Health>) -> Nexus<'r> {
        assert_eq!(
            replicas.len(),
            health.replica_count(),
            "replica/health mismatch"
        );
        let local = replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.is_remote())
            .fold(0u64, |m, (i, _)| m | 1 << i);
        Nexus {
            replicas,
            health,
            local,
            next_read: Cell::new(0),
        }
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Serve one request. `buf` holds at least `req.payload_len()` bytes: the data to
    /// write, or room for the data read. Returns the bytes transferred.
    pub async fn submit(&self, req: BlockRequest, buf: &mut [u8]) -> Result<u32, Errno> {
        let stats = &self.health.stats;
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
            BlockRequest::Write { offset, len, fua } => {
                let data = &buf[..len.0 as usize];
                let res = self.fan_out(|r| r.write(offset, data, fua)).await;
                bump(&stats.writes, 1);
                bump(&stats.write_bytes, len.0);
                res.map(|()| len.0 as u32)
            }
            BlockRequest::Flush => {
                bump(&stats.flushes, 1);
                self.fan_out(|r| r.flush()).await.map(|()| 0)
            }
            BlockRequest::Discard { offset, len } => {
                bump(&stats.discards, 1);
                self.fan_out(|r| r.discard(offset, len)).await.map(|()| 0)
            }
            BlockRequest::WriteZeroes {
                offset,
                len,
                no_unmap,
            } => {
                bump(&stats.write_zeroes, 1);
                self.fan_out(|r| r.write_zeroes(offset, len, no_unmap))
                    .await
                    .map(|()| 0)
            }
        };
        if res.is_err() {
            bump(&stats.errors, 1);
        }
        res
    }

    async fn read(&self, offset: crate::ids::ByteOffset, buf: &mut [u8]) -> Result<(), Errno> {
        loop {
            let online = self.health.online_mask();
            let idx = self.pick_reader(online);
            match self.replicas[idx.get()].read(offset, buf).await {
                // A fenced read may come from a replica a newer owner has changed.
                Ok(()) if self.health.fence().is_tripped() => return Err(Errno::EIO),
                Ok(()) => return Ok(()),
                // Faults `idx` if another replica is online (they hold the data), then
                // retries there; if `idx` was the last one, the error is the app's.
                Err(e) => self.health.settle(online, &[(idx, e)])?,
            }
        }
    }

    fn pick_reader(&self, online: u64) -> ReplicaIndex {
        debug_assert!(online != 0);
        if self.health.read_policy() == ReadPolicy::Primary {
            return ReplicaIndex(online.trailing_zeros() as u8);
        }
        // Local replicas first: a remote read costs a network round trip.
        let online = match online & self.local {
            0 => online,
            local => local,
        };
        let n = online.count_ones() as usize;
        let k = self.next_read.get();
        self.next_read.set(k.wrapping_add(1));
        indices(online).nth(k % n).expect("k % n < n set bits")
    }

    async fn fan_out<'a>(
        &'a self,
        op: impl Fn(&'a (dyn Replica + 'r)) -> IoFuture<'a>,
    ) -> Result<(), Errno> {
        let attempted = self.health.online_mask();
        if attempted.count_ones() == 1 {
            // One replica online: no join, no allocations on the hot path.
            let i = ReplicaIndex(attempted.trailing_zeros() as u8);
            return match op(&*self.replicas[i.get()]).await {
                Ok(()) => self.health.settle(attempted, &[]),
                Err(e) => self.health.settle(attempted, &[(i, e)]),
            };
        }
        let targets: Vec<ReplicaIndex> = indices(attempted).collect();
        let results = join_all(targets.iter().map(|i| op(&*self.replicas[i.get()]))).await;
        let failures: Vec<(ReplicaIndex, Errno)> = targets
            .into_iter()
            .zip(results)
            .filter_map(|(i, r)| r.err().map(|e| (i, e)))
            .collect();
        self.health.settle(attempted, &failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{NoPersist, ReplicaHealth, ReplicaState};
    use crate::ids::{ByteLen, ByteOffset};
    use crate::testing::{Fault, MemReplica, MemStore};
    use futures::executor::block_on;

    fn setup(n: usize) -> (Vec<Arc<MemStore>>, Nexus<'static>) {
        let stores: Vec<_> = (0..n).map(|_| MemStore::new(1 << 20)).collect();
        let health = (0..n)
            .map(|i| ReplicaHealth {
                location: format!("mem{i}"),
                state: ReplicaState::Online,
                reason: None,
                errors: 0,
            })
            .collect();
        let health = Arc::new(Health::new(health, Box::new(NoPersist)).unwrap());
        let replicas = stores
            .iter()
            .map(|s| Box::new(MemReplica::new(s.clone())) as Box<dyn Replica>)
            .collect();
        (stores, Nexus::new(replicas, health))
    }

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

    #[test]
    fn writes_reach_every_replica() {
        let (stores, n) = setup(3);
        assert_eq!(write(&n, 8192, 0x5A), Ok(4096));
        for s in &stores {
            assert_eq!(s.bytes(8192, 4096), vec![0x5A; 4096]);
        }
    }

    #[test]
    fn reads_are_spread_over_replicas() {
        let (stores, n) = setup(2);
        write(&n, 0, 1).unwrap();
        for _ in 0..10 {
            assert_eq!(read(&n, 0).unwrap(), vec![1; 4096]);
        }
        assert_eq!(stores[0].reads(), 5);
        assert_eq!(stores[1].reads(), 5);
    }

    #[test]
    fn write_error_faults_replica_and_app_sees_success() {
        let (stores, n) = setup(2);
        stores[1].set_fault(Fault::All);
        assert_eq!(write(&n, 0, 9), Ok(4096));
        assert_eq!(n.health().online_mask(), 0b01);
        assert_eq!(n.health().snapshot()[1].state, ReplicaState::Faulted);
        // Later writes skip the faulted replica entirely.
        stores[1].set_fault(Fault::None);
        write(&n, 4096, 7).unwrap();
        assert_eq!(stores[1].bytes(4096, 4096), vec![0; 4096]);
        assert_eq!(stores[0].bytes(4096, 4096), vec![7; 4096]);
        assert_eq!(n.health().stats.snapshot().errors, 0);
    }

    #[test]
    fn primary_policy_pins_reads_to_the_first_online_replica() {
        let (stores, n) = setup(3);
        n.health().set_read_policy(ReadPolicy::Primary);
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
        let (stores, n) = setup(2);
        write(&n, 0, 3).unwrap();
        stores[0].set_fault(Fault::Reads);
        for _ in 0..4 {
            assert_eq!(read(&n, 0).unwrap(), vec![3; 4096]);
        }
        assert_eq!(n.health().online_mask(), 0b10);
    }

    #[test]
    fn last_replica_errors_reach_the_app() {
        let (stores, n) = setup(2);
        stores[0].set_fault(Fault::All);
        write(&n, 0, 1).unwrap();
        stores[1].set_fault(Fault::All);
        assert_eq!(write(&n, 0, 2), Err(Errno::EIO));
        assert_eq!(read(&n, 0), Err(Errno::EIO));
        assert_eq!(n.health().online_mask(), 0b10, "last replica stays online");
        stores[1].set_fault(Fault::None);
        assert_eq!(read(&n, 0).unwrap(), vec![1; 4096]);
        assert_eq!(n.health().stats.snapshot().errors, 2);
    }

    #[test]
    fn flush_discard_and_write_zeroes_fan_out() {
        let (stores, n) = setup(2);
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
        let st = n.health().stats.snapshot();
        assert_eq!(
            (st.writes, st.flushes, st.discards, st.write_zeroes),
            (1, 1, 1, 1)
        );
    }
}
