//! An in-memory replica with fault injection, for unit tests of the nexus logic
//! (and of anything built on it). Not used by the daemon.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::Errno;
use crate::ids::{ByteLen, ByteOffset};
use crate::replica::{IoFuture, Replica};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    None = 0,
    /// Every operation fails with EIO.
    All = 1,
    /// Reads fail with EIO; everything else works.
    Reads = 2,
    /// Writes (and flush/discard/zeroes) fail with EIO; reads work.
    Writes = 3,
}

/// The shared contents of one in-memory replica.
pub struct MemStore {
    data: Mutex<Vec<u8>>,
    fault: AtomicU8,
    reads: AtomicU64,
    flushes: AtomicU64,
}

impl MemStore {
    pub fn new(size: usize) -> Arc<MemStore> {
        Arc::new(MemStore {
            data: Mutex::new(vec![0; size]),
            fault: AtomicU8::new(Fault::None as u8),
            reads: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        })
    }

    pub fn set_fault(&self, f: Fault) {
        self.fault.store(f as u8, Ordering::SeqCst);
    }

    pub fn bytes(&self, off: usize, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[off..off + len].to_vec()
    }

    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    fn fails(&self, is_read: bool) -> bool {
        match self.fault.load(Ordering::SeqCst) {
            x if x == Fault::All as u8 => true,
            x if x == Fault::Reads as u8 => is_read,
            x if x == Fault::Writes as u8 => !is_read,
            _ => false,
        }
    }

    fn mutate(&self, f: impl FnOnce(&mut Vec<u8>)) -> Result<(), Errno> {
        if self.fails(false) {
            return Err(Errno::EIO);
        }
        f(&mut self.data.lock().unwrap());
        Ok(())
    }
}

pub struct MemReplica {
    store: Arc<MemStore>,
    location: String,
}

impl MemReplica {
    pub fn new(store: Arc<MemStore>) -> MemReplica {
        MemReplica {
            location: format!("mem:{:p}", Arc::as_ptr(&store)),
            store,
        }
    }
}

fn range(off: ByteOffset, len: u64) -> std::ops::Range<usize> {
    off.0 as usize..(off.0 + len) as usize
}

impl Replica for MemReplica {
    fn location(&self) -> &str {
        &self.location
    }

    fn read<'a>(&'a self, offset: ByteOffset, buf: &'a mut [u8]) -> IoFuture<'a> {
        self.store.reads.fetch_add(1, Ordering::SeqCst);
        let res = if self.store.fails(true) {
            Err(Errno::EIO)
        } else {
            let data = self.store.data.lock().unwrap();
            buf.copy_from_slice(&data[range(offset, buf.len() as u64)]);
            Ok(())
        };
        Box::pin(std::future::ready(res))
    }

    fn write<'a>(&'a self, offset: ByteOffset, buf: &'a [u8], _fua: bool) -> IoFuture<'a> {
        let res = self
            .store
            .mutate(|d| d[range(offset, buf.len() as u64)].copy_from_slice(buf));
        Box::pin(std::future::ready(res))
    }

    fn flush(&self) -> IoFuture<'_> {
        let res = self.store.mutate(|_| ());
        if res.is_ok() {
            self.store.flushes.fetch_add(1, Ordering::SeqCst);
        }
        Box::pin(std::future::ready(res))
    }

    fn discard(&self, offset: ByteOffset, len: ByteLen) -> IoFuture<'_> {
        let res = self.store.mutate(|d| d[range(offset, len.0)].fill(0));
        Box::pin(std::future::ready(res))
    }

    fn write_zeroes(&self, offset: ByteOffset, len: ByteLen, _no_unmap: bool) -> IoFuture<'_> {
        let res = self.store.mutate(|d| d[range(offset, len.0)].fill(0));
        Box::pin(std::future::ready(res))
    }
}

/// A block for verifying workloads: every 16 bytes carry the block number and the
/// write's sequence number (xor the chunk index), so a reader can tell which write a
/// block holds, and that it is whole and not another block's.
pub fn stamped_block(block: usize, seq: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, chunk) in v.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&(block as u64).to_le_bytes());
        chunk[8..].copy_from_slice(&(seq ^ i as u64).to_le_bytes());
    }
    v
}

/// The sequence number a [`stamped_block`] holds (0: never written, all zeroes).
/// Panics if the block is torn, or holds another block's data.
pub fn stamp_of(block: usize, data: &[u8]) -> u64 {
    if data.iter().all(|&b| b == 0) {
        return 0;
    }
    let seq = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
    assert!(
        data == stamped_block(block, seq, data.len()),
        "block {block} is torn or holds another block's data"
    );
    seq
}

/// xorshift64*: a deterministic generator for test workloads, so a failure
/// reproduces from its seed (and no dependency is needed).
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough below `n` for tests.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}
