//! The reference model: per 512 B sector, the values a read may return.
//!
//! Every write has a unique id; each sector of its data is stamped with the
//! sector's index and the id, so any replica's contents decode to "which write
//! does this sector hold" (0: zeroes, never written, discarded or zeroed).
//! Per sector the model keeps the last acknowledged value and, while they are
//! unresolved, the values of mutations that failed to the application (they may or
//! may not have landed anywhere). An acknowledged mutation resolves the sector.

pub const SECTOR: usize = 512;

/// Fill `buf` (whole sectors) with write `id`'s data, from sector `first` on.
pub fn fill(buf: &mut [u8], first: usize, id: u64) {
    for (k, sec) in buf.chunks_mut(SECTOR).enumerate() {
        let s = (first + k) as u64;
        for chunk in sec.chunks_mut(16) {
            chunk[..8].copy_from_slice(&s.to_le_bytes());
            chunk[8..].copy_from_slice(&id.to_le_bytes());
        }
    }
}

/// The write id sector `s` holds (`sec` is its 512 bytes), or why it is garbage.
pub fn decode(sec: &[u8], s: usize) -> Result<u64, String> {
    let word = |i: usize| u64::from_le_bytes(sec[i..i + 8].try_into().unwrap());
    let (tag, id) = (word(0), word(8));
    if tag == 0 && id == 0 {
        return if sec.iter().all(|&b| b == 0) {
            Ok(0)
        } else {
            Err("torn (zeroes and data)".into())
        };
    }
    if tag != s as u64 {
        return Err(format!("holds sector {tag}'s data (write #{id})"));
    }
    for c in (16..SECTOR).step_by(16) {
        if word(c) != tag || word(c + 8) != id {
            return Err(format!("torn at byte {c} (write #{id} and others)"));
        }
    }
    Ok(id)
}

pub struct Model {
    acked: Vec<u64>,
    /// Values of failed mutations since the last acknowledged one.
    maybe: Vec<Vec<u64>>,
}

impl Model {
    pub fn new(sectors: usize) -> Model {
        Model {
            acked: vec![0; sectors],
            maybe: vec![Vec::new(); sectors],
        }
    }

    /// Sectors `[first, first + n)` acknowledged with value `id`.
    pub fn ack(&mut self, first: usize, n: usize, id: u64) {
        for s in first..first + n {
            self.acked[s] = id;
            self.maybe[s].clear();
        }
    }

    /// A mutation of value `id` failed: it may have landed.
    pub fn uncertain(&mut self, first: usize, n: usize, id: u64) {
        for s in first..first + n {
            if self.acked[s] != id && !self.maybe[s].contains(&id) {
                self.maybe[s].push(id);
            }
        }
    }

    pub fn determinate(&self, s: usize) -> bool {
        self.maybe[s].is_empty()
    }

    pub fn acked(&self, s: usize) -> u64 {
        self.acked[s]
    }

    fn allows(&self, s: usize, v: u64) -> bool {
        self.acked[s] == v || self.maybe[s].contains(&v)
    }

    fn describe(&self, s: usize) -> String {
        if self.maybe[s].is_empty() {
            format!("acked #{}", self.acked[s])
        } else {
            format!("acked #{} or failed {:?}", self.acked[s], self.maybe[s])
        }
    }

    /// Check `data`, the contents of sectors `first..` (whole sectors): every one
    /// must hold a value the model allows. The first violation, described.
    pub fn check(&self, data: &[u8], first: usize) -> Result<(), String> {
        let mut bad = Vec::new();
        for (k, sec) in data.chunks(SECTOR).enumerate() {
            let s = first + k;
            match decode(sec, s) {
                Ok(v) if self.allows(s, v) => {}
                Ok(v) => bad.push((s, format!("holds #{v}, model: {}", self.describe(s)))),
                Err(e) => bad.push((s, format!("{e}, model: {}", self.describe(s)))),
            }
        }
        match bad.first() {
            None => Ok(()),
            Some((s, why)) => Err(format!(
                "sector {s} (byte {}) {why}; {} bad sectors in {}..{}",
                s * SECTOR,
                bad.len(),
                bad[0].0,
                bad[bad.len() - 1].0 + 1
            )),
        }
    }
}
