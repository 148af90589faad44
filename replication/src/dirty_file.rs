//! A dirty map saved in the owner's state dir, one file per replica that lacks
//! regions: a 4 KiB header (whose replica, of which volume, since when), then the
//! bitmap. Saves write only the bitmap pages changed since the last save, in place:
//! a torn page mixes old and new sectors, and both the old and the new bits
//! over-approximate what the replica lacks once the activity log's hot extents are
//! added (marks only set bits; a rebuild clears a bit only after copying, so an
//! old set bit is merely copied again).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::dirty::{DirtyMap, Grain};
use crate::error::ReplicationError;
use crate::ids::{ByteLen, Epoch, ReplicaUuid, VolumeUuid};

const MAGIC: [u8; 8] = *b"UKDIRTY\x02";
const HEADER: u64 = 4096;
const PAGE: u64 = 4096;

/// What a map stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogKind {
    /// The mutations a replica missed since it left the write set: a partial
    /// rebuild copies them while the replica's history is recent enough.
    Missed,
    /// What a full rebuild has still to copy: resumed whatever its age.
    Rebuild,
}

/// Since when, and why, a replica's map is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogOrigin {
    pub kind: LogKind,
    /// The membership epoch when the map began: it covers every mutation since.
    pub since_epoch: Epoch,
    /// When it began (Unix ms): the partial-rebuild window counts from it.
    pub since_unix_ms: u64,
}

impl LogOrigin {
    /// A map that begins now.
    pub fn now(kind: LogKind, epoch: Epoch) -> LogOrigin {
        LogOrigin {
            kind,
            since_epoch: epoch,
            since_unix_ms: unix_ms(),
        }
    }

    /// How old the map is at `now_ms` (0 if the clock went back).
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.since_unix_ms)
    }
}

/// Wall-clock milliseconds since the Unix epoch (0 before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whose map it is, of which geometry, since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyHeader {
    pub volume: VolumeUuid,
    pub replica: ReplicaUuid,
    pub size: ByteLen,
    pub grain: Grain,
    pub origin: LogOrigin,
}

impl DirtyHeader {
    fn to_bytes(self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER as usize);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.volume.0);
        b.extend_from_slice(&self.replica.0);
        b.extend_from_slice(&self.size.0.to_le_bytes());
        b.extend_from_slice(&self.grain.0.to_le_bytes());
        b.extend_from_slice(&self.origin.since_epoch.0.to_le_bytes());
        b.extend_from_slice(&self.origin.since_unix_ms.to_le_bytes());
        b.push(match self.origin.kind {
            LogKind::Missed => 0,
            LogKind::Rebuild => 1,
        });
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.resize(HEADER as usize, 0);
        b
    }

    fn parse(b: &[u8]) -> Option<DirtyHeader> {
        const END: usize = 8 + 16 + 16 + 8 + 4 + 8 + 8 + 1;
        if b.len() < END + 4 || b[..8] != MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(b[END..END + 4].try_into().ok()?);
        if crc32c::crc32c(&b[..END]) != crc {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Some(DirtyHeader {
            volume: VolumeUuid(b[8..24].try_into().ok()?),
            replica: ReplicaUuid(b[24..40].try_into().ok()?),
            size: ByteLen(u64_at(40)),
            grain: Grain(u32::from_le_bytes(b[48..52].try_into().ok()?)),
            origin: LogOrigin {
                kind: match b[68] {
                    0 => LogKind::Missed,
                    1 => LogKind::Rebuild,
                    _ => return None,
                },
                since_epoch: Epoch(u64_at(52)),
                since_unix_ms: u64_at(60),
            },
        })
    }
}

/// A saved dirty map, open for saves.
pub struct DirtyFile {
    path: PathBuf,
    file: File,
    pub header: DirtyHeader,
    /// Pages whose save failed: written with the next save.
    retry: Mutex<Vec<usize>>,
}

impl DirtyFile {
    /// Save `map` whole as a new file at `path` (atomically: the old one, if any,
    /// or the new one).
    pub fn create(
        path: &Path,
        header: DirtyHeader,
        map: &DirtyMap,
    ) -> Result<DirtyFile, ReplicationError> {
        let mut bytes = header.to_bytes();
        map.mark_saved();
        bytes.extend_from_slice(&map.to_bytes());
        crate::durable::replace(path, &bytes).map_err(|e| io(path, "create the dirty log", e))?;
        Self::open_file(path, header)
    }

    fn open_file(path: &Path, header: DirtyHeader) -> Result<DirtyFile, ReplicationError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io(path, "open the dirty log", e))?;
        Ok(DirtyFile {
            path: path.into(),
            file,
            header,
            retry: Mutex::new(Vec::new()),
        })
    }

    /// Load the map saved at `path`.
    pub fn load(path: &Path) -> Result<(DirtyFile, DirtyMap), ReplicationError> {
        let bytes = std::fs::read(path).map_err(|e| io(path, "read the dirty log", e))?;
        let bad = |why: &str| ReplicationError::DirtyLog {
            path: path.into(),
            message: why.into(),
        };
        let header = DirtyHeader::parse(&bytes)
            .ok_or_else(|| bad("bad header (not a dirty log, or damaged)"))?;
        let map = DirtyMap::from_bytes(header.size, header.grain, &bytes[HEADER as usize..])
            .map_err(|_| bad("its bitmap does not match its header's geometry"))?;
        Ok((Self::open_file(path, header)?, map))
    }

    /// Write the pages of `map` changed since the last save, then fdatasync.
    pub fn save(&self, map: &DirtyMap) -> Result<(), ReplicationError> {
        let mut pages = std::mem::take(&mut *self.retry.lock().unwrap());
        pages.extend(map.take_changed_pages());
        if pages.is_empty() {
            return Ok(());
        }
        pages.sort_unstable();
        pages.dedup();
        let res = pages
            .iter()
            .try_for_each(|&p| {
                self.file
                    .write_all_at(&map.page_bytes(p), HEADER + p as u64 * PAGE)
            })
            .and_then(|()| self.file.sync_data());
        if let Err(e) = res {
            self.retry.lock().unwrap().extend(pages);
            return Err(io(&self.path, "save the dirty log", e));
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Delete the file (the replica is whole again, or gone).
    pub fn remove(self) -> Result<(), ReplicationError> {
        std::fs::remove_file(&self.path).map_err(|e| io(&self.path, "remove the dirty log", e))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io(dir, "sync the state dir", e))?;
        }
        Ok(())
    }
}

fn io(path: &Path, what: &'static str, e: std::io::Error) -> ReplicationError {
    ReplicationError::Open {
        path: path.into(),
        what,
        source: e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ByteOffset;

    fn header() -> DirtyHeader {
        DirtyHeader {
            volume: VolumeUuid::random(),
            replica: ReplicaUuid::random(),
            size: ByteLen(8 << 30),
            grain: Grain::DEFAULT,
            origin: LogOrigin {
                kind: LogKind::Missed,
                since_epoch: Epoch(7),
                since_unix_ms: 1_764_000_000_000,
            },
        }
    }

    #[test]
    fn a_saved_map_loads_with_its_header_and_later_saves() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.dirty");
        let h = header();
        let map = DirtyMap::new(h.size, h.grain).unwrap();
        map.mark(ByteOffset(0), ByteLen(4096));
        let f = DirtyFile::create(&p, h, &map).unwrap();
        // Later marks reach the file only with a save; 8 GiB at 64 KiB: 4 pages.
        map.mark(ByteOffset(5 << 30), ByteLen(1 << 20));
        let (_, before) = DirtyFile::load(&p).unwrap();
        assert_eq!(before.dirty_regions(), 1);
        f.save(&map).unwrap();
        let (g, after) = DirtyFile::load(&p).unwrap();
        assert_eq!(g.header, h);
        assert_eq!(after.dirty_regions(), 17);
        assert_eq!(after.to_bytes(), map.to_bytes());
        g.remove().unwrap();
        assert!(!p.exists());
    }

    #[test]
    fn a_damaged_or_foreign_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.dirty");
        let h = header();
        DirtyFile::create(&p, h, &DirtyMap::new(h.size, h.grain).unwrap()).unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[30] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        let e = DirtyFile::load(&p).err().expect("refused").to_string();
        assert!(e.contains("r.dirty") && e.contains("bad header"), "{e}");
        bytes[30] ^= 1;
        bytes.truncate(bytes.len() - 8);
        std::fs::write(&p, &bytes).unwrap();
        let e = DirtyFile::load(&p).err().expect("refused").to_string();
        assert!(e.contains("geometry"), "{e}");
    }
}
