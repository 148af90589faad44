//! The layered store's metadata in memory: layers, their grain maps, the head's
//! block index, and the free lists. Pure: no I/O, no locks; the store calls it
//! under its lock and does the I/O it plans. Unit-tested without any disk.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use wire::SnapshotUuid;

use super::format::{
    encode_desc, Desc, DescSlot, Geometry, LayerId, LayerRecord, PoolGrain, Super, VolGrain, BLOCK,
    BLOCKS_PER_GRAIN, DESCS_PER_PAGE, DESC_LEN, DESC_PAGE, MAX_LAYERS,
};

/// Where one 4 KiB block of a view is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Src {
    /// At this offset of the container (the base, or a pool grain).
    At(u64),
    Zero,
}

/// One layer's entry for one volume grain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub desc: DescSlot,
    pub pool: Option<PoolGrain>,
    pub present: u16,
    pub zero: u16,
}

impl Entry {
    pub fn has(&self, bit: u16) -> bool {
        (self.present | self.zero) & bit != 0
    }
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub rec: LayerRecord,
    /// Its value in the head's block index.
    pub slot: u8,
    pub map: HashMap<VolGrain, Entry>,
}

/// Why a metadata change cannot be made. Rendered for people by the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaError {
    PoolFull,
    TableFull,
    TooManyLayers,
    NoSuchSnapshot(SnapshotUuid),
    Damaged(String),
}

#[derive(Debug)]
pub struct Meta {
    pub geo: Geometry,
    pub store_id: u64,
    /// Sequence of the superblock last made durable.
    pub seq: u64,
    next_layer: u32,
    /// The writable layer; the base while the store has no snapshot (writes then
    /// go to the volume's own offsets, exactly as a flat image).
    pub head: LayerId,
    pub layers: BTreeMap<LayerId, Layer>,
    slots: Vec<Option<LayerId>>,
    /// The head view: per block, the slot of the newest layer of the head's
    /// ancestry that has it (0: the base). Empty while there is no snapshot.
    index: Vec<u8>,
    desc_owner: Vec<Option<(LayerId, VolGrain)>>,
    free_desc: Vec<DescSlot>,
    /// Slots below this were handed out at some time.
    desc_hwm: u32,
    pub durable_hwm: u32,
    pool_used: Vec<bool>,
    free_pool: Vec<PoolGrain>,
    dirty: BTreeSet<DescSlot>,
    /// Freed but not reusable until the freeing is durable and no read that
    /// resolved to them can still be in flight.
    pending_desc: Vec<DescSlot>,
    pending_pool: Vec<PoolGrain>,
}

fn bit(b: u64) -> u16 {
    1 << (b % BLOCKS_PER_GRAIN)
}

fn grain_of(b: u64) -> VolGrain {
    VolGrain((b / BLOCKS_PER_GRAIN) as u32)
}

impl Meta {
    /// A store with only its base (what a flat image is) on this geometry.
    pub fn fresh(geo: Geometry, store_id: u64) -> Meta {
        let base = Layer {
            rec: LayerRecord {
                id: LayerId::BASE,
                parent: None,
                uuid: SnapshotUuid::default(),
                name: String::new(),
                created_ms: 0,
                deleting: false,
            },
            slot: 0,
            map: HashMap::new(),
        };
        let mut slots = vec![None; 256];
        slots[0] = Some(LayerId::BASE);
        Meta {
            geo,
            store_id,
            seq: 0,
            next_layer: 1,
            head: LayerId::BASE,
            layers: BTreeMap::from([(LayerId::BASE, base)]),
            slots,
            index: Vec::new(),
            desc_owner: Vec::new(),
            free_desc: Vec::new(),
            desc_hwm: 0,
            durable_hwm: 0,
            pool_used: vec![false; geo.pool_grains as usize],
            free_pool: (0..geo.pool_grains).rev().map(PoolGrain).collect(),
            dirty: BTreeSet::new(),
            pending_desc: Vec::new(),
            pending_pool: Vec::new(),
        }
    }

    /// The metadata a superblock and its table's descriptors describe. A
    /// descriptor of a layer the superblock does not list is free space.
    pub fn load(
        sup: &Super,
        descs: impl IntoIterator<Item = (DescSlot, Result<Option<Desc>, String>)>,
    ) -> Result<Meta, MetaError> {
        let geo = sup.geometry;
        let damaged = |m: String| MetaError::Damaged(m);
        let mut m = Meta::fresh(geo, sup.store_id);
        m.seq = sup.seq;
        m.next_layer = sup.next_layer;
        m.head = sup.head;
        m.layers.clear();
        m.slots = vec![None; 256];
        for (i, rec) in sup.layers.iter().enumerate() {
            if rec.id.0 >= sup.next_layer && rec.id != LayerId::BASE {
                return Err(damaged(format!("layer {} is above the next id", rec.id.0)));
            }
            let slot = i as u8;
            m.slots[i] = Some(rec.id);
            m.layers.insert(
                rec.id,
                Layer {
                    rec: rec.clone(),
                    slot,
                    map: HashMap::new(),
                },
            );
        }
        if !m.layers.contains_key(&LayerId::BASE) || !m.layers.contains_key(&sup.head) {
            return Err(damaged("the base or the head is missing".into()));
        }
        for l in m.layers.values() {
            if let Some(p) = l.rec.parent {
                if !m.layers.contains_key(&p) {
                    return Err(damaged(format!(
                        "layer {} has no parent {}",
                        l.rec.id.0, p.0
                    )));
                }
            }
        }
        m.desc_hwm = sup.desc_hwm;
        m.durable_hwm = sup.desc_hwm;
        m.desc_owner = vec![None; sup.desc_hwm as usize];
        m.free_pool.clear();
        for (slot, d) in descs {
            if slot.0 >= sup.desc_hwm {
                continue;
            }
            let d = d.map_err(|e| damaged(format!("descriptor {}: {e}", slot.0)))?;
            let Some(d) = d else { continue };
            let Some(layer) = m.layers.get_mut(&d.layer) else {
                continue; // a deleted layer's leftover: free
            };
            if d.layer == LayerId::BASE || d.vol.0 >= geo.volume_grains() {
                return Err(damaged(format!("descriptor {} is out of range", slot.0)));
            }
            if let Some(p) = d.pool {
                let used = m.pool_used.get_mut(p.0 as usize).ok_or_else(|| {
                    damaged(format!("descriptor {} points past the pool", slot.0))
                })?;
                if *used {
                    return Err(damaged(format!("pool grain {} owned twice", p.0)));
                }
                *used = true;
            }
            let e = Entry {
                desc: slot,
                pool: d.pool,
                present: d.present,
                zero: d.zero,
            };
            if layer.map.insert(d.vol, e).is_some() {
                return Err(damaged(format!(
                    "two descriptors for grain {} of layer {}",
                    d.vol.0, d.layer.0
                )));
            }
            m.desc_owner[slot.0 as usize] = Some((d.layer, d.vol));
        }
        m.free_desc = (0..sup.desc_hwm)
            .rev()
            .filter(|&s| m.desc_owner[s as usize].is_none())
            .map(DescSlot)
            .collect();
        m.free_pool = (0..geo.pool_grains)
            .rev()
            .filter(|&p| !m.pool_used[p as usize])
            .map(PoolGrain)
            .collect();
        if m.is_layered() {
            m.rebuild_index();
        }
        Ok(m)
    }

    /// Whether the store has a snapshot (writes go to a head layer).
    pub fn is_layered(&self) -> bool {
        self.head != LayerId::BASE
    }

    pub fn superblock(&self, seq: u64) -> Super {
        Super {
            seq,
            store_id: self.store_id,
            geometry: self.geo,
            next_layer: self.next_layer,
            head: self.head,
            desc_hwm: self.rounded_hwm(),
            layers: self.layers.values().map(|l| l.rec.clone()).collect(),
        }
    }

    /// The head's ancestry, oldest first.
    pub fn ancestry(&self, of: LayerId) -> Vec<LayerId> {
        let mut chain = vec![of];
        let mut at = of;
        while let Some(p) = self.layers[&at].rec.parent {
            chain.push(p);
            at = p;
        }
        chain.reverse();
        chain
    }

    fn rebuild_index(&mut self) {
        let mut index = vec![0u8; self.geo.volume_blocks() as usize];
        for id in self.ancestry(self.head) {
            let l = &self.layers[&id];
            for (g, e) in &l.map {
                for i in 0..BLOCKS_PER_GRAIN {
                    let b = g.0 as u64 * BLOCKS_PER_GRAIN + i;
                    if e.has(1 << i) && (b as usize) < index.len() {
                        index[b as usize] = l.slot;
                    }
                }
            }
        }
        self.index = index;
    }

    fn layer_at_slot(&self, slot: u8) -> &Layer {
        &self.layers[&self.slots[slot as usize].expect("index names a live slot")]
    }

    fn src_of(&self, l: &Layer, b: u64) -> Option<Src> {
        if l.rec.id == LayerId::BASE {
            return Some(Src::At(b * BLOCK));
        }
        let e = l.map.get(&grain_of(b))?;
        let m = bit(b);
        if e.zero & m != 0 {
            Some(Src::Zero)
        } else if e.present & m != 0 {
            let p = e.pool.expect("a present block has a pool grain");
            Some(Src::At(
                self.geo.grain_offset(p) + (b % BLOCKS_PER_GRAIN) * BLOCK,
            ))
        } else {
            None
        }
    }

    /// Block `b` of the head view: O(1) whatever the number of layers.
    pub fn resolve(&self, b: u64) -> Src {
        if !self.is_layered() {
            return Src::At(b * BLOCK);
        }
        let l = self.layer_at_slot(self.index[b as usize]);
        self.src_of(l, b)
            .expect("the index names a layer holding the block")
    }

    /// Block `b` as layer `of` sees it (a snapshot): walks its ancestry.
    pub fn resolve_in(&self, of: LayerId, b: u64) -> Src {
        let mut at = of;
        loop {
            let l = &self.layers[&at];
            if let Some(s) = self.src_of(l, b) {
                return s;
            }
            at = l.rec.parent.expect("the base holds every block");
        }
    }

    /// Every block of volume grain `g` as layer `of` sees it: [`Meta::resolve_in`]
    /// for the grain's blocks at once, one map lookup per layer instead of one
    /// per block (a rebuild's and an export's walk over a whole view).
    pub fn resolve_grain_in(&self, of: LayerId, g: u64) -> [Src; BLOCKS_PER_GRAIN as usize] {
        let mut out = [Src::Zero; BLOCKS_PER_GRAIN as usize];
        let mut todo: u16 = u16::MAX >> (16 - BLOCKS_PER_GRAIN);
        let mut at = of;
        while todo != 0 {
            let l = &self.layers[&at];
            if l.rec.id == LayerId::BASE {
                for (i, o) in out.iter_mut().enumerate() {
                    if todo & (1 << i) != 0 {
                        *o = Src::At((g * BLOCKS_PER_GRAIN + i as u64) * BLOCK);
                    }
                }
                break;
            }
            if let Some(e) = l.map.get(&VolGrain(g as u32)) {
                for (i, o) in out.iter_mut().enumerate() {
                    let m = 1u16 << i;
                    if todo & m == 0 {
                        continue;
                    }
                    if e.zero & m != 0 {
                        *o = Src::Zero;
                        todo &= !m;
                    } else if e.present & m != 0 {
                        let p = e.pool.expect("a present block has a pool grain");
                        *o = Src::At(self.geo.grain_offset(p) + i as u64 * BLOCK);
                        todo &= !m;
                    }
                }
            }
            at = l.rec.parent.expect("the base holds every block");
        }
        out
    }

    /// The head's own entry for block `b`'s grain, when it holds the block.
    pub fn head_has(&self, b: u64) -> Option<u64> {
        if !self.is_layered() {
            return Some(b * BLOCK);
        }
        match self.src_of(&self.layers[&self.head], b) {
            Some(Src::At(o)) => Some(o),
            _ => None,
        }
    }

    fn alloc_desc(&mut self) -> Result<DescSlot, MetaError> {
        if let Some(s) = self.free_desc.pop() {
            return Ok(s);
        }
        if self.desc_hwm >= self.geo.desc_capacity {
            return Err(MetaError::TableFull);
        }
        self.desc_hwm += 1;
        self.desc_owner.push(None);
        Ok(DescSlot(self.desc_hwm - 1))
    }

    /// The head's entry for grain `g`, created (and given a pool grain when
    /// `with_pool`) if missing. Not yet durable: marked dirty.
    pub fn head_entry(&mut self, g: VolGrain, with_pool: bool) -> Result<Entry, MetaError> {
        let head = self.head;
        let existing = self.layers[&head].map.get(&g).copied();
        let mut e = match existing {
            Some(e) => e,
            None => {
                let desc = self.alloc_desc()?;
                self.desc_owner[desc.0 as usize] = Some((head, g));
                Entry {
                    desc,
                    pool: None,
                    present: 0,
                    zero: 0,
                }
            }
        };
        if with_pool && e.pool.is_none() {
            match self.free_pool.pop() {
                Some(p) => {
                    self.pool_used[p.0 as usize] = true;
                    e.pool = Some(p);
                }
                None => {
                    if existing.is_none() {
                        self.desc_owner[e.desc.0 as usize] = None;
                        self.free_desc.push(e.desc);
                    }
                    return Err(MetaError::PoolFull);
                }
            }
        }
        if existing != Some(e) {
            self.layers.get_mut(&head).expect("head").map.insert(g, e);
            self.dirty.insert(e.desc);
        }
        Ok(e)
    }

    /// Blocks `[first, first + n)` now hold data in the head (written, or being
    /// zeroed when `zero`): the head's masks and the index follow.
    pub fn mark(&mut self, first: u64, n: u64, zero: bool) {
        let head = self.head;
        let slot = self.layers[&head].slot;
        for b in first..first + n {
            let g = grain_of(b);
            let l = self.layers.get_mut(&head).expect("head");
            let e = l.map.get_mut(&g).expect("head_entry made it");
            let m = bit(b);
            let before = (e.present, e.zero);
            if zero {
                e.zero |= m;
                e.present &= !m;
            } else {
                e.present |= m;
                e.zero &= !m;
            }
            if (e.present, e.zero) != before {
                self.dirty.insert(e.desc);
            }
            self.index[b as usize] = slot;
        }
    }

    /// Whether the head's descriptor for block `b`'s grain waits for a commit (a
    /// FUA write there is durable only once that descriptor is).
    pub fn head_dirty(&self, b: u64) -> bool {
        self.layers[&self.head]
            .map
            .get(&grain_of(b))
            .is_some_and(|e| self.dirty.contains(&e.desc))
    }

    /// Descriptors of these pages must be written again (a commit failed).
    pub fn redirty(&mut self, pages: impl Iterator<Item = u32>) {
        for p in pages {
            for i in 0..DESCS_PER_PAGE {
                self.touch(DescSlot(p * DESCS_PER_PAGE + i));
            }
        }
    }

    /// Descriptor `s` must be written at the next commit.
    pub fn touch(&mut self, s: DescSlot) {
        if s.0 < self.desc_hwm {
            self.dirty.insert(s);
        }
    }

    /// The table pages holding every dirty descriptor, encoded now (what the
    /// next commit writes); the descriptors are clean from here on.
    pub fn capture(&mut self) -> Vec<(u32, Vec<u8>)> {
        let pages: BTreeSet<u32> = self.dirty.iter().map(|d| d.0 / DESCS_PER_PAGE).collect();
        self.dirty.clear();
        pages
            .into_iter()
            .map(|p| {
                let mut buf = vec![0u8; DESC_PAGE as usize];
                for i in 0..DESCS_PER_PAGE {
                    let s = p * DESCS_PER_PAGE + i;
                    let d = self.desc(DescSlot(s));
                    let at = i as usize * DESC_LEN;
                    encode_desc(self.store_id, d.as_ref(), &mut buf[at..at + DESC_LEN]);
                }
                (p, buf)
            })
            .collect()
    }

    fn desc(&self, s: DescSlot) -> Option<Desc> {
        let (layer, vol) = (*self.desc_owner.get(s.0 as usize)?)?;
        let e = self.layers.get(&layer)?.map.get(&vol)?;
        Some(Desc {
            layer,
            vol,
            pool: e.pool,
            present: e.present,
            zero: e.zero,
        })
    }

    /// The descriptor table grew past what the durable superblock says: the next
    /// commit writes the superblock too.
    pub fn hwm_grew(&self) -> bool {
        self.desc_hwm > self.durable_hwm
    }

    /// The high-water mark a superblock records: to the end of its page (a page
    /// is written whole, so the slots after the last used one are zeroes), so
    /// the superblock is rewritten once per 128 descriptors, not per one.
    fn rounded_hwm(&self) -> u32 {
        let used = self.desc_hwm.max(self.durable_hwm);
        (used.div_ceil(DESCS_PER_PAGE) * DESCS_PER_PAGE).min(self.geo.desc_capacity)
    }

    pub fn find(&self, uuid: SnapshotUuid) -> Option<LayerId> {
        self.layers
            .values()
            .find(|l| l.rec.id != self.head && l.rec.uuid == uuid && !uuid.is_nil())
            .map(|l| l.rec.id)
    }

    pub fn snapshots(&self) -> impl Iterator<Item = &Layer> {
        self.layers
            .values()
            .filter(move |l| l.rec.id != self.head && !l.rec.uuid.is_nil())
    }

    fn free_slot(&self) -> Option<u8> {
        (1..=255u8).find(|&s| self.slots[s as usize].is_none())
    }

    fn new_head(&mut self, parent: LayerId) -> Result<(), MetaError> {
        if self.layers.len() >= MAX_LAYERS {
            return Err(MetaError::TooManyLayers);
        }
        let slot = self.free_slot().ok_or(MetaError::TooManyLayers)?;
        let id = LayerId(self.next_layer);
        self.next_layer += 1;
        self.slots[slot as usize] = Some(id);
        self.layers.insert(
            id,
            Layer {
                rec: LayerRecord {
                    id,
                    parent: Some(parent),
                    uuid: SnapshotUuid::default(),
                    name: String::new(),
                    created_ms: 0,
                    deleting: false,
                },
                slot,
                map: HashMap::new(),
            },
        );
        self.head = id;
        Ok(())
    }

    /// Seal the head as snapshot `uuid` and start an empty head on it. The index
    /// is untouched: O(1). Undone by [`Meta::unseal`] while the new head is empty.
    pub fn seal(
        &mut self,
        uuid: SnapshotUuid,
        name: &str,
        created_ms: u64,
    ) -> Result<(), MetaError> {
        let free_desc =
            self.free_desc.len() as u64 + (self.geo.desc_capacity - self.desc_hwm) as u64;
        if free_desc < self.geo.volume_grains() as u64 {
            // The new head could not map every grain: refuse now, not mid-write.
            return Err(MetaError::TableFull);
        }
        let old = self.head;
        self.new_head(old)?;
        if self.index.is_empty() {
            self.index = vec![0u8; self.geo.volume_blocks() as usize];
        }
        let rec = &mut self.layers.get_mut(&old).expect("old head").rec;
        rec.uuid = uuid;
        rec.name = name.to_string();
        rec.created_ms = created_ms;
        Ok(())
    }

    /// Undo the latest [`Meta::seal`] of `uuid` (a barrier that failed on another
    /// replica): only while the head on top of it is still empty.
    pub fn unseal(&mut self, uuid: SnapshotUuid) -> Result<bool, MetaError> {
        let Some(s) = self.find(uuid) else {
            return Ok(false);
        };
        let head = &self.layers[&self.head];
        if head.rec.parent != Some(s) || !head.map.is_empty() {
            return Err(MetaError::Damaged(
                "the snapshot has data written after it: it cannot be unsealed".into(),
            ));
        }
        let slot = head.slot;
        self.layers.remove(&self.head);
        self.slots[slot as usize] = None;
        self.head = s;
        let rec = &mut self.layers.get_mut(&s).expect("sealed").rec;
        rec.uuid = SnapshotUuid::default();
        rec.name.clear();
        rec.created_ms = 0;
        if s == LayerId::BASE {
            self.index.clear();
        }
        Ok(true)
    }

    /// Drop the head and start an empty one on snapshot `uuid`: the volume reads
    /// as the snapshot did. The old head's space is freed (pending).
    pub fn revert(&mut self, uuid: SnapshotUuid) -> Result<(), MetaError> {
        let s = self.find(uuid).ok_or(MetaError::NoSuchSnapshot(uuid))?;
        let old = self.layers.remove(&self.head).expect("head");
        self.slots[old.slot as usize] = None;
        self.release(&old);
        self.new_head(s)?;
        self.rebuild_index();
        Ok(())
    }

    fn release(&mut self, l: &Layer) {
        for e in l.map.values() {
            self.desc_owner[e.desc.0 as usize] = None;
            self.pending_desc.push(e.desc);
            if let Some(p) = e.pool {
                self.pending_pool.push(p);
            }
        }
    }

    /// Freed space becomes reusable (the caller made the freeing durable and
    /// waited out the reads that could still use it).
    pub fn release_pending(&mut self) {
        for p in self.pending_pool.drain(..) {
            self.pool_used[p.0 as usize] = false;
            self.free_pool.push(p);
        }
        self.free_desc.append(&mut self.pending_desc);
    }

    pub fn has_pending(&self) -> bool {
        !self.pending_pool.is_empty() || !self.pending_desc.is_empty()
    }

    pub fn mark_deleting(&mut self, uuid: SnapshotUuid) -> Result<bool, MetaError> {
        let s = self.find(uuid).ok_or(MetaError::NoSuchSnapshot(uuid))?;
        let rec = &mut self.layers.get_mut(&s).expect("found").rec;
        let was = rec.deleting;
        rec.deleting = true;
        Ok(!was)
    }

    pub fn children(&self, of: LayerId) -> Vec<LayerId> {
        self.layers
            .values()
            .filter(|l| l.rec.parent == Some(of))
            .map(|l| l.rec.id)
            .collect()
    }

    /// The next piece of merge work: a deleting layer (not the base) with at most
    /// one child, and one of its grains (`None`: it has none left).
    pub fn next_merge(&self) -> Option<(LayerId, Option<VolGrain>)> {
        self.layers
            .values()
            .filter(|l| l.rec.deleting && l.rec.id != LayerId::BASE)
            .filter(|l| self.children(l.rec.id).len() <= 1)
            .map(|l| (l.rec.id, l.map.keys().next().copied()))
            .next()
    }

    /// Merge grain `g` of deleting layer `s` into its child: which blocks the
    /// caller must copy (from `s`'s pool grain to the child's, at these block
    /// offsets within the grain) before [`Meta::merge_finish`]. The child's pool
    /// grain is allocated here when it needs one. With no child, nothing to copy.
    pub fn merge_plan(&mut self, s: LayerId, g: VolGrain) -> Result<MergePlan, MetaError> {
        let es = self.layers[&s].map[&g];
        let Some(&c) = self.children(s).first() else {
            return Ok(MergePlan::Drop);
        };
        let Some(ec) = self.layers[&c].map.get(&g).copied() else {
            return Ok(MergePlan::Move { child: c });
        };
        let copy = es.present & !(ec.present | ec.zero);
        if copy == 0 {
            return Ok(MergePlan::Copy {
                child: c,
                from: None,
                to: ec.pool,
                blocks: 0,
            });
        }
        let ec = if ec.pool.is_none() {
            let p = self.free_pool.pop().ok_or(MetaError::PoolFull)?;
            self.pool_used[p.0 as usize] = true;
            let l = self.layers.get_mut(&c).expect("child");
            let e = l.map.get_mut(&g).expect("child entry");
            e.pool = Some(p);
            self.dirty.insert(e.desc);
            *e
        } else {
            ec
        };
        Ok(MergePlan::Copy {
            child: c,
            from: es.pool,
            to: ec.pool,
            blocks: copy,
        })
    }

    /// Finish merging grain `g` of `s` (the copies of the plan are written).
    /// The child's half of a `Copy` merge of grain `g` of `s`: it now has the
    /// copied blocks (and the zero blocks it lacked). Idempotent; `s` is unchanged.
    pub fn merge_grow_child(&mut self, s: LayerId, g: VolGrain, plan: &MergePlan) {
        let MergePlan::Copy { child, blocks, .. } = *plan else {
            return;
        };
        let es = self.layers[&s].map[&g];
        let e = self
            .layers
            .get_mut(&child)
            .expect("child")
            .map
            .get_mut(&g)
            .expect("child entry");
        let take_zero = es.zero & !(e.present | e.zero);
        e.present |= blocks;
        e.zero |= take_zero;
        self.dirty.insert(e.desc);
    }

    pub fn merge_finish(&mut self, s: LayerId, g: VolGrain, plan: &MergePlan) {
        self.merge_grow_child(s, g, plan);
        let es = self
            .layers
            .get_mut(&s)
            .expect("merging")
            .map
            .remove(&g)
            .expect("grain");
        let s_slot = self.layers[&s].slot;
        let child = match *plan {
            MergePlan::Drop => None,
            MergePlan::Move { child } => {
                // The same descriptor, relabelled: the child's view is unchanged.
                self.layers
                    .get_mut(&child)
                    .expect("child")
                    .map
                    .insert(g, es);
                self.desc_owner[es.desc.0 as usize] = Some((child, g));
                self.dirty.insert(es.desc);
                Some(child)
            }
            MergePlan::Copy { child, .. } => {
                self.desc_owner[es.desc.0 as usize] = None;
                self.dirty.insert(es.desc);
                self.pending_desc.push(es.desc);
                if let Some(p) = es.pool {
                    self.pending_pool.push(p);
                }
                Some(child)
            }
        };
        if matches!(plan, MergePlan::Drop) {
            self.desc_owner[es.desc.0 as usize] = None;
            self.dirty.insert(es.desc);
            self.pending_desc.push(es.desc);
            if let Some(p) = es.pool {
                self.pending_pool.push(p);
            }
        }
        // The head view named `s` for blocks now held by the child.
        if let Some(c) = child {
            if self.is_layered() && self.ancestry(self.head).contains(&c) {
                let c_slot = self.layers[&c].slot;
                for i in 0..BLOCKS_PER_GRAIN {
                    let b = (g.0 as u64 * BLOCKS_PER_GRAIN + i) as usize;
                    if b < self.index.len() && self.index[b] == s_slot {
                        self.index[b] = c_slot;
                    }
                }
            }
        }
    }

    /// Remove deleting layer `s`, whose grains are all merged: its child now
    /// hangs off its parent.
    pub fn merge_done(&mut self, s: LayerId) {
        let l = self.layers.remove(&s).expect("merging");
        assert!(l.map.is_empty(), "every grain merged first");
        self.slots[l.slot as usize] = None;
        for c in self.children(s) {
            self.layers.get_mut(&c).expect("child").rec.parent = l.rec.parent;
        }
    }

    /// Bytes of pool a layer owns, and how many of its blocks a delete would free
    /// (those its only child also has).
    pub fn usage(&self, id: LayerId) -> (u64, u64) {
        let l = &self.layers[&id];
        let owned =
            l.map.values().filter(|e| e.pool.is_some()).count() as u64 * super::format::GRAIN;
        let children = self.children(id);
        let reclaim = match children.as_slice() {
            [c] => {
                let cl = &self.layers[c];
                l.map
                    .iter()
                    .map(|(g, e)| {
                        let shadowed = cl.map.get(g).map_or(0, |ec| ec.present | ec.zero);
                        (e.present & shadowed).count_ones() as u64 * BLOCK
                    })
                    .sum()
            }
            [] => l
                .map
                .values()
                .map(|e| e.present.count_ones() as u64 * BLOCK)
                .sum(),
            _ => 0,
        };
        (owned, reclaim)
    }

    /// Pool grains in use and free.
    pub fn pool_usage(&self) -> (u32, u32) {
        let free = self.free_pool.len() as u32;
        (self.geo.pool_grains - free, free)
    }

    /// Every grain owned by exactly one entry, the index agreeing with the maps:
    /// what `store check` and the tests assert.
    pub fn check(&self) -> Result<(), String> {
        let mut owner = vec![None; self.geo.pool_grains as usize];
        for l in self.layers.values() {
            for (g, e) in &l.map {
                if e.present & e.zero != 0 {
                    return Err(format!(
                        "layer {} grain {}: present and zero",
                        l.rec.id.0, g.0
                    ));
                }
                if e.present != 0 && e.pool.is_none() {
                    return Err(format!(
                        "layer {} grain {}: data without a grain",
                        l.rec.id.0, g.0
                    ));
                }
                if let Some(p) = e.pool {
                    if let Some(o) = owner[p.0 as usize].replace((l.rec.id, *g)) {
                        return Err(format!(
                            "pool grain {} owned by {o:?} and {:?}",
                            p.0,
                            (l.rec.id, g)
                        ));
                    }
                }
            }
        }
        for p in &self.free_pool {
            if owner[p.0 as usize].is_some() {
                return Err(format!("pool grain {} is free and owned", p.0));
            }
        }
        if self.is_layered() {
            let mut m = Meta {
                index: Vec::new(),
                ..self.clone_shallow()
            };
            m.rebuild_index();
            if m.index != self.index {
                return Err("the block index disagrees with the maps".into());
            }
        }
        Ok(())
    }

    fn clone_shallow(&self) -> Meta {
        Meta {
            geo: self.geo,
            store_id: self.store_id,
            seq: self.seq,
            next_layer: self.next_layer,
            head: self.head,
            layers: self.layers.clone(),
            slots: self.slots.clone(),
            index: Vec::new(),
            desc_owner: Vec::new(),
            free_desc: Vec::new(),
            desc_hwm: 0,
            durable_hwm: 0,
            pool_used: Vec::new(),
            free_pool: Vec::new(),
            dirty: BTreeSet::new(),
            pending_desc: Vec::new(),
            pending_pool: Vec::new(),
        }
    }
}

/// How one grain of a deleting layer goes into its child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergePlan {
    /// No child: the grain is simply freed.
    Drop,
    /// The child lacks the grain: the entry becomes the child's.
    Move { child: LayerId },
    /// The child has the grain: copy `blocks` it lacks.
    Copy {
        child: LayerId,
        from: Option<PoolGrain>,
        to: Option<PoolGrain>,
        blocks: u16,
    },
}
