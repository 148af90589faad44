//! Reused page-aligned buffers for large payloads.
//!
//! A fresh buffer of 128 KiB or more is a fresh mapping for the allocator: the
//! kernel zeroes it a page at a time on first touch and unmaps it on free. For a
//! rebuild's 1 MiB writes that was a good part of the server's CPU per byte (256
//! page faults per request under emulation). Buffers from 64 KiB up are kept and
//! handed out again, by power-of-two size class, within a process-wide cap.

use std::sync::Mutex;

use replication::local::AlignedBuf;

/// Smallest buffer kept (smaller ones come from the allocator's own free lists).
const MIN_POOLED: usize = 64 << 10;
/// Largest buffer kept (a frame may carry up to `wire::frame::MAX_DATA`, 32 MiB:
/// such rare ones come and go).
const MAX_POOLED: usize = 8 << 20;
/// Bytes kept at most, all classes together.
const MAX_CACHED: usize = 64 << 20;

struct Free {
    bufs: Vec<AlignedBuf>,
    bytes: usize,
}

static FREE: Mutex<Free> = Mutex::new(Free {
    bufs: Vec::new(),
    bytes: 0,
});

/// A page-aligned buffer of at least the asked length, back to the pool on drop.
/// Its contents are unspecified (a reused buffer holds an earlier payload): fill
/// it wholly before sending any of it.
pub struct PooledBuf {
    buf: Option<AlignedBuf>,
    len: usize,
}

fn class(len: usize) -> Option<usize> {
    (MIN_POOLED..=MAX_POOLED)
        .contains(&len.next_power_of_two())
        .then(|| len.next_power_of_two())
}

impl PooledBuf {
    pub fn take(len: usize) -> PooledBuf {
        let buf = match class(len) {
            Some(size) => {
                let mut free = FREE.lock().unwrap();
                match free.bufs.iter().position(|b| b.as_slice().len() == size) {
                    Some(i) => {
                        free.bytes -= size;
                        free.bufs.swap_remove(i)
                    }
                    None => AlignedBuf::zeroed(size),
                }
            }
            None => AlignedBuf::zeroed(len),
        };
        PooledBuf {
            buf: Some(buf),
            len,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf.as_ref().expect("held until drop").as_slice()[..self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf.as_mut().expect("held until drop").as_mut_slice()[..self.len]
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let Some(buf) = self.buf.take() else { return };
        let size = buf.as_slice().len();
        if class(size) != Some(size) {
            return;
        }
        let mut free = FREE.lock().unwrap();
        if free.bytes + size <= MAX_CACHED {
            free.bytes += size;
            free.bufs.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_buffer_is_reused_and_a_small_one_is_not_kept() {
        let addr = {
            let mut b = PooledBuf::take(1 << 20);
            assert_eq!(b.as_mut_slice().len(), 1 << 20);
            assert_eq!(b.as_slice().as_ptr() as usize % 4096, 0);
            b.as_slice().as_ptr() as usize
        };
        // Another thread's test may take it first; then it comes back soon.
        let again = (0..100).any(|_| {
            let b = PooledBuf::take(1000 << 10);
            assert_eq!(b.as_slice().len(), 1000 << 10);
            b.as_slice().as_ptr() as usize == addr
        });
        assert!(again, "a 1 MiB-class buffer was not reused");
        let small = PooledBuf::take(4096);
        assert_eq!(small.as_slice().len(), 4096);
        drop(small);
        assert!(FREE
            .lock()
            .unwrap()
            .bufs
            .iter()
            .all(|b| b.as_slice().len() >= MIN_POOLED));
        assert!(FREE.lock().unwrap().bytes <= MAX_CACHED);
    }
}
