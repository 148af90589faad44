//! Image files a snapshot is exported to: raw (sparse) and qcow2 (v3), written
//! front to back from whole clusters, so an exporter streams a snapshot's data
//! extents straight into them. `qemu-img check` and `compare` read what these
//! write (tested).
//!
//! qcow2 layout (big-endian, 64 KiB clusters, 16-bit refcounts): cluster 0 holds
//! the header, the backing format extension and the backing file name; the L1
//! table follows; data clusters and L2 tables are appended as the data comes;
//! [`Qcow2Writer::finish`] then appends the refcount blocks and table, writes the
//! L2 tables and the L1 table, syncs, and writes the header last, so a file cut
//! short by a crash has no valid header (`qemu-img` refuses it, nothing half-read).
//! With a backing file (an incremental export), a cluster of zeroes is recorded
//! as a zero cluster (it must hide the backing file's data); without one it is
//! left unallocated.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Bytes of a qcow2 cluster, and the unit an exporter feeds a writer with.
pub const CLUSTER: u64 = 1 << 16;
const CLUSTER_BITS: u32 = 16;
const L2_ENTRIES: u64 = CLUSTER / 8;
const REFS_PER_BLOCK: u64 = CLUSTER / 2;
const COPIED: u64 = 1 << 63;
const ZERO: u64 = 1;
const HEADER_LEN: u32 = 104;
const BACKING_FORMAT_EXT: u32 = 0xE279_2ACA;

/// The image formats `snapshot export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

/// Where exported clusters go.
pub trait ImageWriter {
    /// Cluster-aligned `offset`; `data` whole clusters, except the image's last
    /// (the volume size is a 4 KiB multiple, not always a cluster one).
    fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    /// Everything durable; the image complete.
    fn finish(self: Box<Self>) -> std::io::Result<u64>;
}

/// Whether `b` is all zeroes, 16 bytes at a time: a byte loop over a gigabyte of
/// zeroes was a large part of an export's time.
fn is_zero(b: &[u8]) -> bool {
    // SAFETY: any bytes are a valid u128.
    let (head, body, tail) = unsafe { b.align_to::<u128>() };
    head.iter().all(|&x| x == 0) && body.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

/// A raw image: the volume's bytes at their offsets, zeroes left as holes.
pub struct RawWriter {
    file: File,
    written: u64,
}

impl RawWriter {
    pub fn create(file: File, size: u64) -> std::io::Result<RawWriter> {
        file.set_len(size)?;
        Ok(RawWriter { file, written: 0 })
    }
}

impl RawWriter {
    fn put(&mut self, offset: u64, data: &[u8], from: usize, to: usize) -> std::io::Result<()> {
        self.file
            .write_all_at(&data[from..to], offset + from as u64)?;
        self.written += (to - from) as u64;
        Ok(())
    }
}

impl ImageWriter for RawWriter {
    /// Each run of non-zero 4 KiB blocks in one write (a syscall per block cost
    /// a third of the export's time).
    fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut run: Option<usize> = None;
        for (i, block) in data.chunks(4096).enumerate() {
            match (is_zero(block), run) {
                (false, None) => run = Some(i * 4096),
                (true, Some(from)) => {
                    self.put(offset, data, from, i * 4096)?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(from) = run {
            self.put(offset, data, from, data.len())?;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> std::io::Result<u64> {
        self.file.sync_all()?;
        Ok(self.written)
    }
}

/// A qcow2 v3 image (module docs).
pub struct Qcow2Writer {
    file: File,
    size: u64,
    backing: Option<(String, String)>,
    l1_offset: u64,
    l1: Vec<u64>,
    /// L2 tables by L1 index: their cluster and entries, written at the end.
    l2: std::collections::BTreeMap<u64, (u64, Vec<u64>)>,
    /// The next free cluster (everything below is in use: refcount 1).
    next: u64,
    written: u64,
    /// Data clusters not written yet: where they start in the file, their bytes.
    pending: (u64, Vec<u8>),
}

impl Qcow2Writer {
    /// A qcow2 image of a `size`-byte disk in `file` (empty), optionally over
    /// `backing`: (file name as qemu should open it, its format).
    pub fn create(
        file: File,
        size: u64,
        backing: Option<(String, String)>,
    ) -> std::io::Result<Qcow2Writer> {
        let l1_len = size.div_ceil(CLUSTER * L2_ENTRIES);
        let l1_clusters = (l1_len * 8).div_ceil(CLUSTER).max(1);
        if let Some((name, fmt)) = &backing {
            // Header, extension (8 + padded format) and end marker, then the name.
            let need = HEADER_LEN as usize + 8 + fmt.len().div_ceil(8) * 8 + 8 + name.len();
            if need as u64 > CLUSTER || name.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the backing file name must be 1 to ~65000 bytes",
                ));
            }
        }
        Ok(Qcow2Writer {
            file,
            size,
            backing,
            l1_offset: CLUSTER,
            l1: vec![0; l1_len as usize],
            l2: Default::default(),
            next: 1 + l1_clusters,
            written: 0,
            pending: (0, Vec::new()),
        })
    }

    fn flush_pending(&mut self) -> std::io::Result<()> {
        if !self.pending.1.is_empty() {
            self.file.write_all_at(&self.pending.1, self.pending.0)?;
            self.pending.1.clear();
        }
        Ok(())
    }

    fn alloc(&mut self) -> u64 {
        let c = self.next;
        self.next += 1;
        c * CLUSTER
    }

    fn entry(&mut self, cluster: u64) -> &mut u64 {
        let (l1i, l2i) = (cluster / L2_ENTRIES, (cluster % L2_ENTRIES) as usize);
        if !self.l2.contains_key(&l1i) {
            let at = self.alloc();
            self.l1[l1i as usize] = at | COPIED;
            self.l2.insert(l1i, (at, vec![0; L2_ENTRIES as usize]));
        }
        &mut self.l2.get_mut(&l1i).expect("inserted").1[l2i]
    }

    fn header(&self, rt_offset: u64, rt_clusters: u32) -> Vec<u8> {
        let mut h = vec![0u8; CLUSTER as usize];
        let put32 =
            |h: &mut Vec<u8>, at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |h: &mut Vec<u8>, at: usize, v: u64| h[at..at + 8].copy_from_slice(&v.to_be_bytes());
        h[..4].copy_from_slice(b"QFI\xfb");
        put32(&mut h, 4, 3);
        put32(&mut h, 20, CLUSTER_BITS);
        put64(&mut h, 24, self.size);
        put32(&mut h, 36, self.l1.len() as u32);
        put64(&mut h, 40, self.l1_offset);
        put64(&mut h, 48, rt_offset);
        put32(&mut h, 56, rt_clusters);
        put32(&mut h, 96, 4);
        put32(&mut h, 100, HEADER_LEN);
        let mut at = HEADER_LEN as usize;
        if let Some((name, fmt)) = &self.backing {
            put32(&mut h, at, BACKING_FORMAT_EXT);
            put32(&mut h, at + 4, fmt.len() as u32);
            h[at + 8..at + 8 + fmt.len()].copy_from_slice(fmt.as_bytes());
            at += 8 + fmt.len().div_ceil(8) * 8;
            at += 8; // the end-of-extensions marker: zeroes
            put64(&mut h, 8, at as u64);
            put32(&mut h, 16, name.len() as u32);
            h[at..at + name.len()].copy_from_slice(name.as_bytes());
        }
        h
    }
}

impl ImageWriter for Qcow2Writer {
    fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        debug_assert!(offset.is_multiple_of(CLUSTER));
        for (i, c) in data.chunks(CLUSTER as usize).enumerate() {
            let cluster = offset / CLUSTER + i as u64;
            if is_zero(c) {
                if self.backing.is_some() {
                    *self.entry(cluster) = ZERO;
                }
                continue;
            }
            let at = self.alloc();
            // Data clusters allocated one after the other are adjacent in the
            // file (an L2 table allocated between them breaks the run): one write
            // per run.
            if self.pending.1.is_empty() || self.pending.0 + self.pending.1.len() as u64 != at {
                self.flush_pending()?;
                self.pending.0 = at;
            }
            self.pending.1.extend_from_slice(c);
            self.pending.1.resize(
                self.pending.1.len().div_ceil(CLUSTER as usize) * CLUSTER as usize,
                0,
            );
            *self.entry(cluster) = at | COPIED;
            self.written += CLUSTER;
        }
        self.flush_pending()
    }

    fn finish(self: Box<Self>) -> std::io::Result<u64> {
        let w = *self;
        // Refcount blocks and table go at the end and count themselves too.
        let data_end = w.next;
        let (mut blocks, mut table) = (1u64, 1u64);
        loop {
            let total = data_end + blocks + table;
            let (b, t) = (
                total.div_ceil(REFS_PER_BLOCK),
                (total.div_ceil(REFS_PER_BLOCK) * 8).div_ceil(CLUSTER),
            );
            if b <= blocks && t <= table {
                break;
            }
            (blocks, table) = (b.max(blocks), t.max(table));
        }
        let total = data_end + blocks + table;
        let rb_first = data_end;
        let rt_first = data_end + blocks;
        for bi in 0..blocks {
            let mut rb = vec![0u8; CLUSTER as usize];
            for k in 0..REFS_PER_BLOCK {
                if bi * REFS_PER_BLOCK + k < total {
                    rb[k as usize * 2..k as usize * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
                }
            }
            w.file.write_all_at(&rb, (rb_first + bi) * CLUSTER)?;
        }
        let mut rt = vec![0u8; (table * CLUSTER) as usize];
        for bi in 0..blocks {
            let at = bi as usize * 8;
            rt[at..at + 8].copy_from_slice(&((rb_first + bi) * CLUSTER).to_be_bytes());
        }
        w.file.write_all_at(&rt, rt_first * CLUSTER)?;
        for (at, entries) in w.l2.values() {
            let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
            w.file.write_all_at(&bytes, *at)?;
        }
        let l1: Vec<u8> = w.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        w.file.write_all_at(&l1, w.l1_offset)?;
        w.file.set_len(total * CLUSTER)?;
        w.file.sync_all()?;
        let header = w.header(rt_first * CLUSTER, table as u32);
        w.file.write_all_at(&header, 0)?;
        w.file.sync_all()?;
        Ok(w.written)
    }
}

/// A writer of `format` into `file` for a `size`-byte disk.
pub fn writer(
    format: Format,
    file: File,
    size: u64,
    backing: Option<(String, String)>,
) -> std::io::Result<Box<dyn ImageWriter + Send>> {
    Ok(match format {
        Format::Raw => Box::new(RawWriter::create(file, size)?),
        Format::Qcow2 => Box::new(Qcow2Writer::create(file, size, backing)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn zero_detection_sees_one_byte_anywhere() {
        let mut b = vec![0u8; 4096 + 3];
        assert!(is_zero(&b[1..]) && is_zero(&b[..]) && is_zero(&[]));
        for at in [0, 1, 15, 16, 17, 2048, 4095, 4098] {
            b[at] = 1;
            assert!(!is_zero(&b), "{at}");
            assert!(!is_zero(&b[at..]), "{at}");
            b[at] = 0;
        }
    }

    /// `qemu-img` from qemu-utils (CI installs it): the reader these images are for.
    fn qemu_img(args: &[&str]) -> (bool, String) {
        let out = Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img (apt install qemu-utils) reads the exported images");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// A disk of `size` bytes with data in some clusters, zeroes in others.
    fn disk(size: u64, seed: u8) -> Vec<u8> {
        let mut d = vec![0u8; size as usize];
        for (i, c) in d.chunks_mut(CLUSTER as usize).enumerate() {
            if i % 3 != 1 {
                for (j, b) in c.iter_mut().enumerate().step_by(509) {
                    *b = (i as u8).wrapping_mul(31) ^ seed ^ j as u8 | 1;
                }
            }
        }
        d
    }

    /// `d` as a sparse raw file, the reference the exports are compared with.
    fn reference(path: &std::path::Path, d: &[u8]) {
        let f = File::create(path).unwrap();
        f.set_len(d.len() as u64).unwrap();
        for (i, c) in d.chunks(CLUSTER as usize).enumerate() {
            if !is_zero(c) {
                f.write_all_at(c, i as u64 * CLUSTER).unwrap();
            }
        }
    }

    fn export(path: &std::path::Path, format: Format, d: &[u8], backing: Option<(String, String)>) {
        let f = File::create(path).unwrap();
        let mut w = writer(format, f, d.len() as u64, backing).unwrap();
        for (i, c) in d.chunks((4 * CLUSTER) as usize).enumerate() {
            w.write(i as u64 * 4 * CLUSTER, c).unwrap();
        }
        w.finish().unwrap();
    }

    #[test]
    fn qemu_img_checks_and_compares_what_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        // Spans two L2 tables (512 MiB each) and ends mid-cluster.
        let size = (600 << 20) + 12 * 4096;
        let mut d = disk(size, 7);
        // Most of it empty, as a real export: keep the test quick.
        d[(8 << 20)..(590 << 20)].fill(0);
        reference(&p("ref.raw"), &d);
        export(&p("a.qcow2"), Format::Qcow2, &d, None);
        export(&p("a.raw"), Format::Raw, &d, None);
        let (ok, out) = qemu_img(&["check", p("a.qcow2").to_str().unwrap()]);
        assert!(ok && out.contains("No errors"), "{out}");
        for img in ["a.qcow2", "a.raw"] {
            let (ok, out) = qemu_img(&[
                "compare",
                p("ref.raw").to_str().unwrap(),
                p(img).to_str().unwrap(),
            ]);
            assert!(ok, "{img}: {out}");
        }
        let raw_alloc = std::fs::metadata(p("a.raw")).unwrap();
        assert!(
            std::os::unix::fs::MetadataExt::blocks(&raw_alloc) * 512 < 16 << 20,
            "the raw export is sparse"
        );
        // An incremental one over it: changed clusters (and a zeroed one) only.
        let mut d2 = d.clone();
        d2[..CLUSTER as usize].fill(0);
        d2[(5 << 20)..(5 << 20) + 100].fill(0xee);
        reference(&p("ref2.raw"), &d2);
        let f = File::create(p("b.qcow2")).unwrap();
        let backing = Some((p("a.qcow2").to_str().unwrap().to_string(), "qcow2".into()));
        let mut w = writer(Format::Qcow2, f, size, backing).unwrap();
        w.write(0, &d2[..CLUSTER as usize]).unwrap();
        w.write(5 << 20, &d2[(5 << 20)..(5 << 20) + CLUSTER as usize])
            .unwrap();
        w.finish().unwrap();
        let (ok, out) = qemu_img(&["check", p("b.qcow2").to_str().unwrap()]);
        assert!(ok && out.contains("No errors"), "{out}");
        let (ok, out) = qemu_img(&[
            "compare",
            p("ref2.raw").to_str().unwrap(),
            p("b.qcow2").to_str().unwrap(),
        ]);
        assert!(ok, "{out}");
        assert!(
            std::fs::metadata(p("b.qcow2")).unwrap().len() < 8 * CLUSTER,
            "only what changed"
        );
    }
}
