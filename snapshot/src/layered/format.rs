//! The on-disk records of the layered store, encoded and checked here and nowhere
//! else: the superblock (two alternating slots, like the label) and the 32-byte
//! grain descriptors. Pure functions over byte slices.

use wire::SnapshotUuid;

/// Presence is tracked per block; a 4 KiB write never copies anything.
pub const BLOCK: u64 = 4096;
/// Allocation unit of the pool (the dirty map's region size).
pub const GRAIN: u64 = 64 * 1024;
pub const BLOCKS_PER_GRAIN: u64 = GRAIN / BLOCK;
/// One superblock slot; two of them, written alternately.
pub const SB_SLOT: u64 = 32 * 1024;
pub const DESC_LEN: usize = 32;
/// Descriptors are written a page at a time (a page's unchanged descriptors are
/// rewritten with the bytes they already have, so a torn page loses nothing).
pub const DESC_PAGE: u64 = 4096;
pub const DESCS_PER_PAGE: u32 = (DESC_PAGE as usize / DESC_LEN) as u32;
/// Layers a store may hold (the in-memory index has one byte per block).
pub const MAX_LAYERS: usize = 250;
pub const MAX_NAME: usize = 64;

const SB_MAGIC: &[u8; 8] = b"UBLKLAYR";
const SB_VERSION: u32 = 1;
const SB_HEADER: usize = 32;
const LAYER_REC: usize = 104;

/// A layer's id: never reused within a store, so a descriptor naming a layer the
/// superblock no longer lists is free space, whatever else it says. Layer 0 is the
/// base (the volume's bytes at their own offsets), which has no descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LayerId(pub u32);

impl LayerId {
    pub const BASE: LayerId = LayerId(0);
}

/// A descriptor's slot in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DescSlot(pub u32);

/// A 64 KiB grain of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PoolGrain(pub u32);

/// A grain of the volume's address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolGrain(pub u32);

/// Where the store's parts are, in bytes from the start of the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub volume_size: u64,
    /// First superblock slot (after the label area).
    pub sb_offset: u64,
    pub table_offset: u64,
    pub desc_capacity: u32,
    pub pool_offset: u64,
    pub pool_grains: u32,
}

impl Geometry {
    /// The store after `volume_size` bytes of base and the label area, with room
    /// for `desc_capacity` descriptors and `pool_grains` grains.
    pub fn new(volume_size: u64, label_area: u64, desc_capacity: u32, pool_grains: u32) -> Self {
        let sb_offset = volume_size + label_area;
        let table_offset = sb_offset + 2 * SB_SLOT;
        let table_end =
            table_offset + (desc_capacity as u64).div_ceil(DESCS_PER_PAGE as u64) * DESC_PAGE;
        Geometry {
            volume_size,
            sb_offset,
            table_offset,
            desc_capacity,
            pool_offset: table_end.div_ceil(GRAIN) * GRAIN,
            pool_grains,
        }
    }

    pub fn volume_grains(&self) -> u32 {
        self.volume_size.div_ceil(GRAIN) as u32
    }

    pub fn volume_blocks(&self) -> u64 {
        self.volume_size / BLOCK
    }

    /// Bytes the container needs (the pool at its full size).
    pub fn container_len(&self) -> u64 {
        self.pool_offset + self.pool_grains as u64 * GRAIN
    }

    pub fn grain_offset(&self, g: PoolGrain) -> u64 {
        self.pool_offset + g.0 as u64 * GRAIN
    }

    pub fn page_offset(&self, page: u32) -> u64 {
        self.table_offset + page as u64 * DESC_PAGE
    }

    pub fn sb_slot_offset(&self, seq: u64) -> u64 {
        self.sb_offset + (seq % 2) * SB_SLOT
    }
}

/// A layer as the superblock records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRecord {
    pub id: LayerId,
    /// `None` for the base.
    pub parent: Option<LayerId>,
    /// Nil for the head (it is no snapshot yet).
    pub uuid: SnapshotUuid,
    pub name: String,
    pub created_ms: u64,
    /// Deleted by the user: hidden, its blocks being merged into its child.
    pub deleting: bool,
}

/// The superblock's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Super {
    pub seq: u64,
    /// Random, chosen when the store is formatted; every descriptor carries it, so
    /// one left on the device by an earlier store is never taken for ours.
    pub store_id: u64,
    pub geometry: Geometry,
    pub next_layer: u32,
    pub head: LayerId,
    /// Descriptors at or above this slot were never written: open reads no further.
    pub desc_hwm: u32,
    pub layers: Vec<LayerRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("no layered store here (no superblock)")]
    Absent,
    #[error("superblock: {0}")]
    Corrupt(String),
}

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

struct Reader<'a>(&'a [u8]);
impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], FormatError> {
        if self.0.len() < n {
            return Err(FormatError::Corrupt("body too short".into()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
}

/// One slot's bytes (`SB_SLOT` long).
pub fn encode_super(s: &Super) -> Vec<u8> {
    assert!(s.layers.len() <= MAX_LAYERS);
    let g = &s.geometry;
    let mut body = Vec::with_capacity(64 + s.layers.len() * LAYER_REC);
    put_u64(&mut body, s.store_id);
    put_u64(&mut body, g.volume_size);
    put_u64(&mut body, g.sb_offset);
    put_u64(&mut body, g.table_offset);
    put_u32(&mut body, g.desc_capacity);
    put_u64(&mut body, g.pool_offset);
    put_u32(&mut body, g.pool_grains);
    put_u32(&mut body, s.next_layer);
    put_u32(&mut body, s.head.0);
    put_u32(&mut body, s.desc_hwm);
    put_u32(&mut body, s.layers.len() as u32);
    for l in &s.layers {
        let start = body.len();
        put_u32(&mut body, l.id.0);
        put_u32(&mut body, l.parent.map_or(u32::MAX, |p| p.0));
        body.extend_from_slice(&l.uuid.0);
        put_u64(&mut body, l.created_ms);
        put_u32(&mut body, u32::from(l.deleting));
        let name = l.name.as_bytes();
        assert!(name.len() <= MAX_NAME, "name checked by the caller");
        body.push(name.len() as u8);
        body.extend_from_slice(name);
        body.resize(start + LAYER_REC, 0);
    }
    let mut out = Vec::with_capacity(SB_SLOT as usize);
    out.extend_from_slice(SB_MAGIC);
    put_u32(&mut out, SB_VERSION);
    put_u32(&mut out, body.len() as u32);
    put_u64(&mut out, s.seq);
    put_u32(&mut out, crc32c::crc32c(&body));
    put_u32(&mut out, 0);
    out.extend_from_slice(&body);
    out.resize(SB_SLOT as usize, 0);
    out
}

/// One slot: `Absent` when it holds no superblock at all (zeroes, never written).
pub fn decode_super(b: &[u8]) -> Result<Super, FormatError> {
    if b.len() < SB_HEADER || &b[..8] != SB_MAGIC {
        return Err(FormatError::Absent);
    }
    let le32 = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4"));
    if le32(8) != SB_VERSION {
        return Err(FormatError::Corrupt(format!(
            "unknown store version {} (made by a newer ublkd?)",
            le32(8)
        )));
    }
    let len = le32(12) as usize;
    let seq = u64::from_le_bytes(b[16..24].try_into().expect("8"));
    let body = b
        .get(SB_HEADER..SB_HEADER + len)
        .ok_or_else(|| FormatError::Corrupt(format!("body of {len} bytes overruns the slot")))?;
    if crc32c::crc32c(body) != le32(24) {
        return Err(FormatError::Corrupt("checksum mismatch".into()));
    }
    let mut r = Reader(body);
    let store_id = r.u64()?;
    let geometry = Geometry {
        volume_size: r.u64()?,
        sb_offset: r.u64()?,
        table_offset: r.u64()?,
        desc_capacity: r.u32()?,
        pool_offset: r.u64()?,
        pool_grains: r.u32()?,
    };
    let next_layer = r.u32()?;
    let head = LayerId(r.u32()?);
    let desc_hwm = r.u32()?;
    let n = r.u32()? as usize;
    if n == 0 || n > MAX_LAYERS {
        return Err(FormatError::Corrupt(format!("{n} layers")));
    }
    let mut layers = Vec::with_capacity(n);
    for _ in 0..n {
        let rec = r.take(LAYER_REC)?;
        let mut lr = Reader(rec);
        let id = LayerId(lr.u32()?);
        let parent = match lr.u32()? {
            u32::MAX => None,
            p => Some(LayerId(p)),
        };
        let uuid = SnapshotUuid(lr.take(16)?.try_into().expect("16"));
        let created_ms = lr.u64()?;
        let deleting = lr.u32()? != 0;
        let name_len = lr.take(1)?[0] as usize;
        if name_len > MAX_NAME {
            return Err(FormatError::Corrupt(format!(
                "layer {} name too long",
                id.0
            )));
        }
        let name = String::from_utf8(lr.take(name_len)?.to_vec())
            .map_err(|_| FormatError::Corrupt(format!("layer {} name not UTF-8", id.0)))?;
        layers.push(LayerRecord {
            id,
            parent,
            uuid,
            name,
            created_ms,
            deleting,
        });
    }
    Ok(Super {
        seq,
        store_id,
        geometry,
        next_layer,
        head,
        desc_hwm,
        layers,
    })
}

/// The newer of two slots that decode; an error only when neither does.
pub fn pick_super(a: &[u8], b: &[u8]) -> Result<Super, FormatError> {
    match (decode_super(a), decode_super(b)) {
        (Ok(x), Ok(y)) => Ok(if x.seq >= y.seq { x } else { y }),
        (Ok(x), Err(_)) | (Err(_), Ok(x)) => Ok(x),
        (Err(FormatError::Absent), Err(FormatError::Absent)) => Err(FormatError::Absent),
        (Err(e @ FormatError::Corrupt(_)), _) | (_, Err(e)) => Err(e),
    }
}

/// What a descriptor says: grain `vol` of layer `layer` has its blocks in pool
/// grain `pool` (when any block holds data); `present` and `zero` are per-block
/// bit masks (a block in neither falls through to the layer below).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub layer: LayerId,
    pub vol: VolGrain,
    pub pool: Option<PoolGrain>,
    pub present: u16,
    pub zero: u16,
}

pub fn encode_desc(store_id: u64, d: Option<&Desc>, out: &mut [u8]) {
    out[..DESC_LEN].fill(0);
    let Some(d) = d else { return };
    out[16..24].copy_from_slice(&store_id.to_le_bytes());
    out[0..4].copy_from_slice(&d.layer.0.to_le_bytes());
    out[4..8].copy_from_slice(&d.vol.0.to_le_bytes());
    out[8..12].copy_from_slice(&d.pool.map_or(u32::MAX, |p| p.0).to_le_bytes());
    out[12..14].copy_from_slice(&d.present.to_le_bytes());
    out[14..16].copy_from_slice(&d.zero.to_le_bytes());
    let crc = crc32c::crc32c(&out[..28]);
    out[28..32].copy_from_slice(&crc.to_le_bytes());
}

/// `Ok(None)`: a free slot (zeroes, or a descriptor of another store).
pub fn decode_desc(store_id: u64, b: &[u8]) -> Result<Option<Desc>, String> {
    let b = &b[..DESC_LEN];
    if b.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let le32 = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4"));
    if crc32c::crc32c(&b[..28]) != le32(28) {
        return Err("descriptor checksum mismatch".into());
    }
    if u64::from_le_bytes(b[16..24].try_into().expect("8")) != store_id {
        return Ok(None);
    }
    let present = u16::from_le_bytes([b[12], b[13]]);
    let zero = u16::from_le_bytes([b[14], b[15]]);
    if present & zero != 0 {
        return Err("a block both present and zero".into());
    }
    Ok(Some(Desc {
        layer: LayerId(le32(0)),
        vol: VolGrain(le32(4)),
        pool: match le32(8) {
            u32::MAX => None,
            p => Some(PoolGrain(p)),
        },
        present,
        zero,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Super {
        Super {
            seq: 7,
            store_id: 0x1234_5678_9abc_def0,
            geometry: Geometry::new(1 << 30, 65536, 1 << 20, 4096),
            next_layer: 3,
            head: LayerId(2),
            desc_hwm: 128,
            layers: vec![
                LayerRecord {
                    id: LayerId::BASE,
                    parent: None,
                    uuid: SnapshotUuid([1; 16]),
                    name: "nightly-1".into(),
                    created_ms: 1_700_000_000_000,
                    deleting: false,
                },
                LayerRecord {
                    id: LayerId(2),
                    parent: Some(LayerId::BASE),
                    uuid: SnapshotUuid::default(),
                    name: String::new(),
                    created_ms: 0,
                    deleting: true,
                },
            ],
        }
    }

    #[test]
    fn superblock_round_trips_and_the_newer_slot_wins() {
        let s = sample();
        let a = encode_super(&s);
        assert_eq!(a.len(), SB_SLOT as usize);
        assert_eq!(decode_super(&a), Ok(s.clone()));
        let mut newer = s.clone();
        newer.seq = 8;
        newer.head = LayerId(5);
        let b = encode_super(&newer);
        assert_eq!(pick_super(&a, &b).unwrap(), newer);
        assert_eq!(pick_super(&b, &a).unwrap(), newer);
        // A torn newer slot: the older one stands.
        let mut torn = b.clone();
        torn[100] ^= 1;
        assert_eq!(pick_super(&a, &torn).unwrap(), s);
        let zero = vec![0u8; SB_SLOT as usize];
        assert_eq!(pick_super(&zero, &zero), Err(FormatError::Absent));
        assert!(matches!(
            pick_super(&torn, &zero),
            Err(FormatError::Corrupt(_))
        ));
    }

    #[test]
    fn the_largest_layer_table_fits_a_slot() {
        let mut s = sample();
        let l = s.layers[1].clone();
        s.layers = (0..MAX_LAYERS as u32)
            .map(|i| LayerRecord {
                id: LayerId(i),
                name: "n".repeat(MAX_NAME),
                ..l.clone()
            })
            .collect();
        let b = encode_super(&s);
        assert_eq!(b.len(), SB_SLOT as usize, "no overflow past the slot");
        assert_eq!(decode_super(&b).unwrap(), s);
    }

    #[test]
    fn descriptors_round_trip_and_damage_is_caught() {
        let d = Desc {
            layer: LayerId(3),
            vol: VolGrain(77),
            pool: Some(PoolGrain(9)),
            present: 0b1010,
            zero: 0b0100,
        };
        let mut b = [0u8; DESC_LEN];
        encode_desc(42, Some(&d), &mut b);
        assert_eq!(decode_desc(42, &b), Ok(Some(d)));
        assert_eq!(
            decode_desc(43, &b),
            Ok(None),
            "another store's descriptor is free"
        );
        let none = Desc { pool: None, ..d };
        encode_desc(42, Some(&none), &mut b);
        assert_eq!(decode_desc(42, &b), Ok(Some(none)));
        encode_desc(42, None, &mut b);
        assert_eq!(decode_desc(42, &b), Ok(None));
        encode_desc(42, Some(&d), &mut b);
        b[5] ^= 0x10;
        assert!(decode_desc(42, &b).is_err());
    }

    #[test]
    fn the_pool_starts_on_a_grain_after_the_table() {
        let g = Geometry::new(1 << 30, 65536, 1000, 10);
        assert_eq!(g.sb_offset, (1 << 30) + 65536);
        assert_eq!(g.table_offset, g.sb_offset + 2 * SB_SLOT);
        assert!(g.pool_offset >= g.table_offset + 1000 * DESC_LEN as u64);
        assert_eq!(g.pool_offset % GRAIN, 0);
        assert_eq!(g.container_len(), g.pool_offset + 10 * GRAIN);
    }
}
