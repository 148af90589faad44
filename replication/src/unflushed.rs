//! What a remote replica acknowledged but has not yet made durable: its server
//! may hold it in a page cache or a disk's volatile cache, and loses it if that
//! host goes down. Marked when a write completes on the replica, forgotten once a
//! FLUSH sent to it after that completes; when the replica is faulted (its
//! connection lost, its server maybe restarted) these regions join its dirty map,
//! so its rebuild copies them too.
//!
//! Two maps in turn: a write marks the map of the current generation; a FLUSH
//! bumps the generation when it is sent and, when it completes, clears the map of
//! the generation it closed — only if no later FLUSH was sent meanwhile (then the
//! map also holds writes that later FLUSH covers, cleared when it completes). A
//! write's mark is made after its completion, so a mark that lands in a map the
//! FLUSH then clears belongs to a write that completed before the FLUSH was sent.
//!
//! The mark is made when the queue polls the completion, which may be after the
//! replica was faulted and its regions merged into its dirty map. So the fault
//! *seals* the regions into that map: from then on a mark goes to the map too
//! (either the merge sees a mark, or the mark sees the seal: one lock orders them).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::dirty::{DirtyMap, Grain};
use crate::ids::{ByteLen, ByteOffset};

/// Unflushed regions of one replica.
pub struct Unflushed {
    maps: [DirtyMap; 2],
    generation: AtomicU64,
    /// Orders a FLUSH's bump against another one's clear.
    turn: Mutex<()>,
    /// The dirty map of the replica while it is out of the write set.
    sealed: Mutex<Option<Arc<DirtyMap>>>,
}

/// A FLUSH in flight: the generation it closes.
#[derive(Debug, Clone, Copy)]
pub struct FlushTicket(u64);

impl Unflushed {
    pub fn new(size: ByteLen) -> Unflushed {
        // 64 KiB regions, coarser on big volumes: at most 2^20 of them (128 KiB a
        // map), since a FLUSH clears a whole map.
        let mut grain = Grain::DEFAULT.0;
        while size.0 / u64::from(grain) > 1 << 20 && grain < Grain::MAX.0 {
            grain *= 2;
        }
        let map = || DirtyMap::new(size, Grain(grain)).expect("a grain within the bounds");
        Unflushed {
            maps: [map(), map()],
            generation: AtomicU64::new(0),
            turn: Mutex::new(()),
            sealed: Mutex::new(None),
        }
    }

    /// A non-FUA write (or discard, or zeroing) completed on the replica.
    pub fn wrote(&self, offset: ByteOffset, len: ByteLen) {
        let g = self.generation.load(Ordering::Acquire);
        self.maps[(g % 2) as usize].mark(offset, len);
        if let Some(into) = &*self.sealed.lock().unwrap() {
            into.mark(offset, len);
        }
    }

    /// The replica left the write set: every region possibly not durable on it
    /// goes to `into` (its map of what it lacks), now and as late marks come.
    pub fn seal(&self, into: &Arc<DirtyMap>) {
        *self.sealed.lock().unwrap() = Some(into.clone());
        for (offset, len) in self.regions() {
            into.mark(offset, len);
        }
    }

    /// The replica takes writes again (rebuilding, or online).
    pub fn unseal(&self) {
        *self.sealed.lock().unwrap() = None;
    }

    /// A FLUSH is about to be sent to the replica.
    pub fn flush_sent(&self) -> FlushTicket {
        let _t = self.turn.lock().unwrap();
        FlushTicket(self.generation.fetch_add(1, Ordering::AcqRel))
    }

    /// That FLUSH completed on the replica.
    pub fn flushed(&self, t: FlushTicket) {
        let _t = self.turn.lock().unwrap();
        if self.generation.load(Ordering::Acquire) == t.0 + 1 {
            let m = &self.maps[(t.0 % 2) as usize];
            m.clear(ByteOffset(0), m.size());
        }
    }

    /// Every region possibly not durable on the replica.
    pub fn regions(&self) -> Vec<(ByteOffset, ByteLen)> {
        let mut v = Vec::new();
        for m in &self.maps {
            v.extend(m.runs(ByteOffset(0), m.size()));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    #[test]
    fn a_flush_forgets_what_completed_before_it_was_sent() {
        let u = Unflushed::new(ByteLen(64 * M));
        u.wrote(ByteOffset(0), ByteLen(4096));
        let t = u.flush_sent();
        // Completed after the FLUSH was sent: not covered by it.
        u.wrote(ByteOffset(8 * M), ByteLen(4096));
        u.flushed(t);
        assert_eq!(u.regions(), vec![(ByteOffset(8 * M), ByteLen(64 << 10))]);
    }

    /// (L) A write whose completion the queue polls after its replica was
    /// faulted still reaches the replica's map of what it lacks.
    #[test]
    fn a_mark_after_the_seal_reaches_the_sealed_map() {
        let u = Unflushed::new(ByteLen(64 * M));
        u.wrote(ByteOffset(0), ByteLen(4096));
        let map = Arc::new(DirtyMap::new(ByteLen(64 * M), Grain::DEFAULT).unwrap());
        u.seal(&map);
        assert!(map.any(ByteOffset(0), ByteLen(4096)));
        u.wrote(ByteOffset(8 * M), ByteLen(4096));
        assert!(map.any(ByteOffset(8 * M), ByteLen(4096)), "the late mark");
        u.unseal();
        u.wrote(ByteOffset(16 * M), ByteLen(4096));
        assert!(
            !map.any(ByteOffset(16 * M), ByteLen(4096)),
            "taking writes again"
        );
    }

    #[test]
    fn overlapping_flushes_clear_only_what_the_last_one_covers() {
        let u = Unflushed::new(ByteLen(64 * M));
        u.wrote(ByteOffset(0), ByteLen(4096));
        let a = u.flush_sent();
        u.wrote(ByteOffset(8 * M), ByteLen(4096));
        let b = u.flush_sent();
        u.wrote(ByteOffset(16 * M), ByteLen(4096));
        // The first one completes: a later one was sent, so nothing is forgotten
        // (the map it closed now also takes writes after the second one).
        u.flushed(a);
        assert_eq!(u.regions().len(), 3);
        u.flushed(b);
        // The second one covers the first two writes, not the third.
        let r = u.regions();
        let g = ByteLen(64 << 10);
        assert!(r.contains(&(ByteOffset(16 * M), g)), "{r:?}");
        assert!(!r.contains(&(ByteOffset(8 * M), g)), "{r:?}");
    }
}
