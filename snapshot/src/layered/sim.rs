//! A disk in memory that can lose power: writes are volatile until a sync, and a
//! crash keeps a random subset of the unsynced 512-byte sectors (a drive's cache
//! reorders and tears). It can also die after a given number of operations (the
//! process killed at that step: every later operation fails). The layered store's
//! crash tests run on it; it is public for the crates above (their simulators).

use std::sync::{Arc, Mutex};

use super::RawIo;
use crate::error::Errno;
use crate::IoResult;

const SECTOR: usize = 512;

#[derive(Default)]
struct Inner {
    durable: Vec<u8>,
    /// What reads see: durable plus every unsynced write.
    volatile: Vec<u8>,
    /// Unsynced writes in issue order; a FUA write is there too (marked), so a
    /// crash never lets an older cached write land over it.
    pending: Vec<(u64, Vec<u8>, bool)>,
    /// Operations left before the disk dies (`None`: never).
    ops_left: Option<u64>,
    ops: u64,
    syncs: u64,
    reads: u64,
    /// Bytes from here on that were never written read as this old data (a
    /// device's earlier contents), not zeroes.
    garbage_from: Option<u64>,
    /// A test's own checking reads: neither counted nor able to die.
    paused: bool,
}

const GARBAGE: u8 = 0xA5;

#[derive(Default)]
pub struct SimDisk {
    inner: Mutex<Inner>,
}

/// A small deterministic generator (xorshift), so a failing seed replays.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

fn put(img: &mut Vec<u8>, off: u64, data: &[u8], fill: u8) {
    let end = off as usize + data.len();
    if img.len() < end {
        img.resize(end, fill);
    }
    img[off as usize..end].copy_from_slice(data);
}

impl Inner {
    fn fill(&self) -> u8 {
        if self.garbage_from.is_some() {
            GARBAGE
        } else {
            0
        }
    }
}

impl SimDisk {
    pub fn new() -> Arc<SimDisk> {
        Arc::new(SimDisk::default())
    }

    /// A disk whose bytes past `from` hold old data until written (the store's
    /// area of a reused device): the first `from` bytes read zeroes.
    pub fn with_garbage_from(from: u64) -> Arc<SimDisk> {
        let d = SimDisk::default();
        {
            let mut g = d.inner.lock().unwrap();
            g.durable = vec![0; from as usize];
            g.volatile = vec![0; from as usize];
            g.garbage_from = Some(from);
        }
        Arc::new(d)
    }

    /// Die after `n` more operations (reads, writes, syncs): a process killed at
    /// that point of whatever it was doing.
    pub fn die_after(&self, n: u64) {
        self.inner.lock().unwrap().ops_left = Some(n);
    }

    /// Set to die (or dead).
    pub fn is_armed(&self) -> bool {
        self.inner.lock().unwrap().ops_left.is_some()
    }

    pub fn is_dead(&self) -> bool {
        self.inner.lock().unwrap().ops_left == Some(0)
    }

    /// Operations so far (to choose a step to die at).
    pub fn ops(&self) -> u64 {
        self.inner.lock().unwrap().ops
    }

    pub fn syncs(&self) -> u64 {
        self.inner.lock().unwrap().syncs
    }

    pub fn reads(&self) -> u64 {
        self.inner.lock().unwrap().reads
    }

    /// Power loss: each unsynced sector is kept or lost at random; the disk lives
    /// again (the next process opens what is left).
    pub fn crash(&self, rng: &mut Rng) {
        let mut g = self.inner.lock().unwrap();
        let pending = std::mem::take(&mut g.pending);
        let fill = g.fill();
        for (off, data, fua) in pending {
            for (i, s) in data.chunks(SECTOR).enumerate() {
                if fua || rng.below(2) == 0 {
                    put(&mut g.durable, off + (i * SECTOR) as u64, s, fill);
                }
            }
        }
        g.volatile = g.durable.clone();
        g.ops_left = None;
    }

    /// The process died but the machine did not: nothing written is lost.
    pub fn kill(&self) {
        let mut g = self.inner.lock().unwrap();
        g.ops_left = None;
    }

    /// While paused, operations are neither counted nor made to fail (a test's
    /// checks between the steps under test).
    pub fn set_paused(&self, paused: bool) {
        self.inner.lock().unwrap().paused = paused;
    }

    fn op(&self) -> Result<std::sync::MutexGuard<'_, Inner>, Errno> {
        let mut g = self.inner.lock().unwrap();
        if g.paused {
            return Ok(g);
        }
        g.ops += 1;
        match &mut g.ops_left {
            Some(0) => return Err(Errno::EIO),
            Some(n) => *n -= 1,
            None => {}
        }
        Ok(g)
    }
}

impl RawIo for Arc<SimDisk> {
    async fn read_at(&self, off: u64, buf: &mut [u8]) -> IoResult {
        let mut g = self.op()?;
        g.reads += 1;
        let start = (off as usize).min(g.volatile.len());
        let end = (off as usize + buf.len()).min(g.volatile.len());
        buf.fill(g.fill());
        buf[..end - start].copy_from_slice(&g.volatile[start..end]);
        Ok(())
    }

    async fn write_at(&self, off: u64, buf: &[u8], fua: bool) -> IoResult {
        let mut g = self.op()?;
        let fill = g.fill();
        put(&mut g.volatile, off, buf, fill);
        if fua {
            put(&mut g.durable, off, buf, fill);
        }
        g.pending.push((off, buf.to_vec(), fua));
        Ok(())
    }

    async fn sync(&self) -> IoResult {
        let mut g = self.op()?;
        let pending = std::mem::take(&mut g.pending);
        let fill = g.fill();
        for (off, data, _) in pending {
            put(&mut g.durable, off, &data, fill);
        }
        g.syncs += 1;
        Ok(())
    }

    async fn zero_at(&self, off: u64, len: u64, _no_unmap: bool) -> IoResult {
        self.write_at(off, &vec![0u8; len as usize], false).await
    }
}
