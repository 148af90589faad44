//! What one replica lacks: a bitmap of the volume's regions (a *region* is
//! `grain` bytes, a power of two, 64 KiB by default) that were mutated — written,
//! discarded, zeroed — without it. A faulted replica gets one from the moment it
//! leaves the write set; a rebuild copies the marked regions and clears them; a full
//! rebuild starts from a map with every region marked.
//!
//! Marking is lock-free (one atomic OR per 64 regions), so the write path of a
//! degraded volume pays one load when the region is already marked. Every word
//! changed since the map was last saved is remembered, so a save writes only the
//! changed 4 KiB pages of the bitmap, never the whole of it.
//!
//! Memory: one bit per region — 2 KiB per GiB of volume at 64 KiB, plus one bit per
//! 4 KiB bitmap page (1 bit per 2 GiB of volume).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::ReplicationError;
use crate::ids::{ByteLen, ByteOffset};

/// Bytes per region of a dirty map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Grain(pub u32);

impl Grain {
    pub const DEFAULT: Grain = Grain(64 << 10);
    /// Below one 4 KiB block a region means nothing; above 4 MiB a partial rebuild
    /// copies too much for one scattered write.
    pub const MIN: Grain = Grain(4 << 10);
    pub const MAX: Grain = Grain(4 << 20);

    pub fn check(self) -> Result<Grain, ReplicationError> {
        if !self.0.is_power_of_two() || self < Self::MIN || self > Self::MAX {
            return Err(ReplicationError::BadGrain(self.0));
        }
        Ok(self)
    }

    fn shift(self) -> u32 {
        self.0.trailing_zeros()
    }
}

/// Bitmap words per 4 KiB page of the saved bitmap.
pub const WORDS_PER_PAGE: usize = 4096 / 8;

/// The regions one replica lacks.
pub struct DirtyMap {
    shift: u32,
    size: u64,
    regions: u64,
    words: Box<[AtomicU64]>,
    /// One bit per bitmap page changed since [`DirtyMap::take_changed_pages`].
    changed: Box<[AtomicU64]>,
}

impl std::fmt::Debug for DirtyMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyMap")
            .field("grain", &self.grain())
            .field("regions", &self.regions)
            .field("dirty", &self.dirty_regions())
            .finish()
    }
}

impl DirtyMap {
    /// A clean map of a volume of `size` bytes.
    pub fn new(size: ByteLen, grain: Grain) -> Result<DirtyMap, ReplicationError> {
        let shift = grain.check()?.shift();
        let regions = size.0.div_ceil(1 << shift);
        let nwords = regions.div_ceil(64) as usize;
        let npages = nwords.div_ceil(WORDS_PER_PAGE);
        Ok(DirtyMap {
            shift,
            size: size.0,
            regions,
            words: (0..nwords).map(|_| AtomicU64::new(0)).collect(),
            changed: (0..npages.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        })
    }

    /// A map with every region marked: what a new replica lacks.
    pub fn full(size: ByteLen, grain: Grain) -> Result<DirtyMap, ReplicationError> {
        let m = DirtyMap::new(size, grain)?;
        m.mark(ByteOffset(0), ByteLen(size.0));
        Ok(m)
    }

    pub fn grain(&self) -> Grain {
        Grain(1 << self.shift)
    }

    pub fn size(&self) -> ByteLen {
        ByteLen(self.size)
    }

    pub fn regions(&self) -> u64 {
        self.regions
    }

    /// The regions `[first, end)` that `[offset, offset + len)` touches.
    fn span(&self, offset: ByteOffset, len: ByteLen) -> (u64, u64) {
        let end = offset.0.saturating_add(len.0).min(self.size);
        if len.0 == 0 || offset.0 >= end {
            return (0, 0);
        }
        (offset.0 >> self.shift, ((end - 1) >> self.shift) + 1)
    }

    /// Mark every region `[offset, offset + len)` touches. Returns whether a region
    /// was newly marked (then a saved copy is behind until the next save).
    pub fn mark(&self, offset: ByteOffset, len: ByteLen) -> bool {
        let (first, end) = self.span(offset, len);
        let mut new = false;
        for (w, bits) in word_masks(first, end) {
            // Load first: the common degraded case (already marked) stays read-only.
            if self.words[w].load(Ordering::Relaxed) & bits == bits {
                continue;
            }
            let old = self.words[w].fetch_or(bits, Ordering::AcqRel);
            if old & bits != bits {
                new = true;
                self.note_changed(w);
            }
        }
        new
    }

    /// Unmark every region wholly inside `[offset, offset + len)` (a region the
    /// range only partly covers stays marked: part of it is still missing).
    pub fn clear(&self, offset: ByteOffset, len: ByteLen) {
        let g = 1u64 << self.shift;
        let end = offset.0.saturating_add(len.0).min(self.size);
        let first = offset.0.div_ceil(g);
        // The volume's last region may be short: reaching the end covers it.
        let last_end = if end == self.size {
            self.regions
        } else {
            end / g
        };
        if first >= last_end {
            return;
        }
        for (w, bits) in word_masks(first, last_end) {
            let old = self.words[w].fetch_and(!bits, Ordering::AcqRel);
            if old & bits != 0 {
                self.note_changed(w);
            }
        }
    }

    fn note_changed(&self, word: usize) {
        let page = word / WORDS_PER_PAGE;
        self.changed[page / 64].fetch_or(1 << (page % 64), Ordering::AcqRel);
    }

    /// Whether any region `[offset, offset + len)` touches is marked.
    pub fn any(&self, offset: ByteOffset, len: ByteLen) -> bool {
        let (first, end) = self.span(offset, len);
        word_masks(first, end).any(|(w, bits)| self.words[w].load(Ordering::Acquire) & bits != 0)
    }

    pub fn is_clean(&self) -> bool {
        self.words.iter().all(|w| w.load(Ordering::Acquire) == 0)
    }

    pub fn dirty_regions(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// The bytes the marked regions cover (the last region may be short).
    pub fn dirty_bytes(&self) -> u64 {
        self.runs(ByteOffset(0), ByteLen(u64::MAX))
            .map(|(_, l)| l.0)
            .sum()
    }

    /// The marked byte ranges from `from` on, adjacent regions joined into runs of
    /// at most `max_run` bytes (at least one region).
    pub fn runs(&self, from: ByteOffset, max_run: ByteLen) -> Runs<'_> {
        let g = 1u64 << self.shift;
        Runs {
            map: self,
            next: from.0.div_ceil(g).min(self.regions),
            max_regions: (max_run.0 >> self.shift).max(1),
        }
    }

    fn is_marked(&self, region: u64) -> bool {
        self.words[(region / 64) as usize].load(Ordering::Acquire) & (1 << (region % 64)) != 0
    }

    /// The first marked region at or after `region`, if any.
    fn next_marked(&self, region: u64) -> Option<u64> {
        let mut w = (region / 64) as usize;
        let mut bits = self.words.get(w)?.load(Ordering::Acquire) & (!0u64 << (region % 64));
        loop {
            if bits != 0 {
                let r = w as u64 * 64 + u64::from(bits.trailing_zeros());
                return (r < self.regions).then_some(r);
            }
            w += 1;
            bits = self.words.get(w)?.load(Ordering::Acquire);
        }
    }

    /// Mark every region `other` marks (same geometry).
    pub fn merge(&self, other: &DirtyMap) -> Result<(), ReplicationError> {
        if other.shift != self.shift || other.size != self.size {
            return Err(ReplicationError::DirtyGeometry);
        }
        for (w, o) in other.words.iter().enumerate() {
            let bits = o.load(Ordering::Acquire);
            if bits != 0 && self.words[w].fetch_or(bits, Ordering::AcqRel) & bits != bits {
                self.note_changed(w);
            }
        }
        Ok(())
    }

    /// The bitmap pages changed since the last call, and forget them: a saver writes
    /// these pages (read after this call, so a concurrent mark lands either in what
    /// it writes or in the next round).
    pub fn take_changed_pages(&self) -> Vec<usize> {
        let mut pages = Vec::new();
        for (i, c) in self.changed.iter().enumerate() {
            let mut bits = c.swap(0, Ordering::AcqRel);
            while bits != 0 {
                pages.push(i * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
        pages
    }

    /// Forget every change (the map was just saved whole).
    pub fn mark_saved(&self) {
        for c in self.changed.iter() {
            c.store(0, Ordering::Release);
        }
    }

    pub fn pages(&self) -> usize {
        self.words.len().div_ceil(WORDS_PER_PAGE)
    }

    /// Page `page` of the bitmap as saved: little-endian words, the last page
    /// short when the bitmap is.
    pub fn page_bytes(&self, page: usize) -> Vec<u8> {
        let lo = page * WORDS_PER_PAGE;
        let hi = (lo + WORDS_PER_PAGE).min(self.words.len());
        self.words[lo..hi]
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
            .collect()
    }

    /// The whole bitmap as saved.
    pub fn to_bytes(&self) -> Vec<u8> {
        (0..self.pages()).flat_map(|p| self.page_bytes(p)).collect()
    }

    /// A map from its saved bitmap; bits past the volume's end are refused (the
    /// bytes belong to another geometry).
    pub fn from_bytes(
        size: ByteLen,
        grain: Grain,
        bytes: &[u8],
    ) -> Result<DirtyMap, ReplicationError> {
        let m = DirtyMap::new(size, grain)?;
        if bytes.len() != m.words.len() * 8 {
            return Err(ReplicationError::DirtyGeometry);
        }
        for (w, chunk) in m.words.iter().zip(bytes.chunks_exact(8)) {
            w.store(
                u64::from_le_bytes(chunk.try_into().expect("8 bytes")),
                Ordering::Relaxed,
            );
        }
        let tail = m.regions % 64;
        if tail != 0 {
            let last = m.words.last().expect("a partial word exists");
            if last.load(Ordering::Relaxed) >> tail != 0 {
                return Err(ReplicationError::DirtyGeometry);
            }
        }
        Ok(m)
    }
}

/// For the regions `[first, end)`: each word's index and the bits of it they cover.
fn word_masks(first: u64, end: u64) -> impl Iterator<Item = (usize, u64)> {
    let (fw, lw) = (first / 64, end.saturating_sub(1) / 64);
    (fw..=lw).filter(move |_| first < end).map(move |w| {
        let lo = if w == fw { first % 64 } else { 0 };
        let hi = if w == lw { (end - 1) % 64 + 1 } else { 64 };
        let bits = if hi - lo == 64 {
            !0
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        (w as usize, bits)
    })
}

/// See [`DirtyMap::runs`].
pub struct Runs<'a> {
    map: &'a DirtyMap,
    next: u64,
    max_regions: u64,
}

impl Iterator for Runs<'_> {
    type Item = (ByteOffset, ByteLen);

    fn next(&mut self) -> Option<(ByteOffset, ByteLen)> {
        let m = self.map;
        let start = m.next_marked(self.next)?;
        let mut end = start + 1;
        while end < m.regions && end - start < self.max_regions && m.is_marked(end) {
            end += 1;
        }
        self.next = end;
        let off = start << m.shift;
        let len = (end << m.shift).min(m.size) - off;
        Some((ByteOffset(off), ByteLen(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1024;

    fn map(size: u64, grain: u32) -> DirtyMap {
        DirtyMap::new(ByteLen(size), Grain(grain)).unwrap()
    }

    fn runs(m: &DirtyMap, max: u64) -> Vec<(u64, u64)> {
        m.runs(ByteOffset(0), ByteLen(max))
            .map(|(o, l)| (o.0, l.0))
            .collect()
    }

    #[test]
    fn grains_must_be_powers_of_two_between_4k_and_4m() {
        for bad in [0, 1000, 2048, 96 << 10, 8 << 20] {
            assert!(Grain(bad).check().is_err(), "{bad}");
        }
        for good in [4 << 10, 64 << 10, 4 << 20] {
            assert!(Grain(good).check().is_ok(), "{good}");
        }
    }

    #[test]
    fn a_write_marks_every_region_it_touches_once() {
        let m = map(1 << 20, 64 << 10);
        // 4 KiB straddling the boundary of regions 0 and 1.
        assert!(m.mark(ByteOffset(62 * K), ByteLen(4 * K)));
        assert!(
            !m.mark(ByteOffset(60 * K), ByteLen(8 * K)),
            "already marked"
        );
        assert_eq!(runs(&m, u64::MAX), [(0, 128 * K)]);
        assert_eq!(m.dirty_regions(), 2);
        assert!(m.any(ByteOffset(127 * K), ByteLen(1)));
        assert!(!m.any(ByteOffset(128 * K), ByteLen(4 * K)));
    }

    #[test]
    fn empty_and_out_of_range_marks_change_nothing() {
        let m = map(1 << 20, 64 << 10);
        assert!(!m.mark(ByteOffset(4096), ByteLen(0)));
        assert!(!m.mark(ByteOffset(1 << 20), ByteLen(4096)));
        assert!(!m.mark(ByteOffset(u64::MAX - 10), ByteLen(100)));
        assert!(m.is_clean());
    }

    #[test]
    fn marks_across_words_and_pages() {
        // 64 KiB regions, 4 GiB: 65536 regions, 1024 words, 2 bitmap pages.
        let m = map(4 << 30, 64 << 10);
        assert_eq!(m.pages(), 2);
        let off = 63 * 64 * K; // region 63, the last of word 0
        assert!(m.mark(ByteOffset(off), ByteLen(3 * 64 * K)));
        assert_eq!(m.dirty_regions(), 3);
        // Region 32767 is the last of page 0, 32768 the first of page 1.
        m.take_changed_pages();
        m.mark(ByteOffset(32767 * 64 * K), ByteLen(2 * 64 * K));
        assert_eq!(m.take_changed_pages(), [0, 1]);
        assert_eq!(m.take_changed_pages(), Vec::<usize>::new());
    }

    #[test]
    fn runs_join_neighbours_up_to_the_maximum() {
        let m = map(2 << 20, 64 << 10);
        m.mark(ByteOffset(0), ByteLen(5 * 64 * K));
        m.mark(ByteOffset(10 * 64 * K), ByteLen(1));
        assert_eq!(
            runs(&m, 128 * K),
            [
                (0, 128 * K),
                (128 * K, 128 * K),
                (256 * K, 64 * K),
                (640 * K, 64 * K)
            ]
        );
        assert_eq!(runs(&m, u64::MAX), [(0, 320 * K), (640 * K, 64 * K)]);
        // From an offset inside a region: the next whole region on.
        let from: Vec<u64> = m
            .runs(ByteOffset(65 * K), ByteLen(u64::MAX))
            .map(|(o, _)| o.0)
            .collect();
        assert_eq!(from, [128 * K, 640 * K]);
    }

    #[test]
    fn the_last_region_may_be_short() {
        let m = DirtyMap::full(ByteLen(100 * K), Grain(64 << 10)).unwrap();
        assert_eq!(runs(&m, u64::MAX), [(0, 100 * K)]);
        assert_eq!(m.dirty_bytes(), 100 * K);
        // Clearing up to the end covers the short region.
        m.clear(ByteOffset(64 * K), ByteLen(36 * K));
        assert_eq!(runs(&m, u64::MAX), [(0, 64 * K)]);
    }

    #[test]
    fn clear_unmarks_only_whole_regions() {
        let m = DirtyMap::full(ByteLen(1 << 20), Grain(64 << 10)).unwrap();
        m.clear(ByteOffset(32 * K), ByteLen(128 * K)); // half of 0, all of 1, half of 2
        assert_eq!(
            runs(&m, u64::MAX),
            [(0, 64 * K), (128 * K, (1 << 20) - 128 * K)]
        );
        assert_eq!(m.dirty_regions(), 15);
    }

    #[test]
    fn full_marks_everything_and_clear_all_empties_it() {
        let m = DirtyMap::full(ByteLen(10 << 20), Grain(64 << 10)).unwrap();
        assert_eq!(m.dirty_regions(), 160);
        assert_eq!(m.dirty_bytes(), 10 << 20);
        m.clear(ByteOffset(0), ByteLen(10 << 20));
        assert!(m.is_clean());
    }

    #[test]
    fn saved_bitmaps_round_trip_and_foreign_ones_are_refused() {
        let m = map(3 << 20, 64 << 10); // 48 regions: one partial word
        m.mark(ByteOffset(0), ByteLen(4096));
        m.mark(ByteOffset(47 * 64 * K), ByteLen(4096));
        let bytes = m.to_bytes();
        assert_eq!(bytes.len(), 8);
        let back = DirtyMap::from_bytes(ByteLen(3 << 20), Grain(64 << 10), &bytes).unwrap();
        assert_eq!(runs(&back, u64::MAX), runs(&m, u64::MAX));
        // A bit past the volume's end: written for another geometry.
        let mut bad = bytes.clone();
        bad[7] |= 0x80;
        assert!(DirtyMap::from_bytes(ByteLen(3 << 20), Grain(64 << 10), &bad).is_err());
        assert!(DirtyMap::from_bytes(ByteLen(3 << 20), Grain(64 << 10), &bytes[..4]).is_err());
    }

    #[test]
    fn merge_marks_the_union() {
        let a = map(1 << 20, 64 << 10);
        let b = map(1 << 20, 64 << 10);
        a.mark(ByteOffset(0), ByteLen(1));
        b.mark(ByteOffset(512 * K), ByteLen(1));
        a.merge(&b).unwrap();
        assert_eq!(runs(&a, u64::MAX), [(0, 64 * K), (512 * K, 64 * K)]);
        assert!(a.merge(&map(2 << 20, 64 << 10)).is_err());
    }

    #[test]
    fn concurrent_marks_are_all_kept() {
        let m = map(64 << 20, 4 << 10); // 16384 regions
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let m = &m;
                s.spawn(move || {
                    for r in (t..16384).step_by(4) {
                        m.mark(ByteOffset(r * 4096), ByteLen(4096));
                    }
                });
            }
        });
        assert_eq!(m.dirty_regions(), 16384);
    }
}
