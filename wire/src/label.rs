//! The replica label: who a replica is and what it last knew about its volume,
//! stored on the replica itself (right after its data, see [`LABEL_AREA`]) and
//! carried by STAT/OPEN for remote replicas.
//!
//! The membership record is what makes a replica's trustworthiness independent of
//! the owner's state directory: when an owner faults a replica, it writes a new
//! epoch without it to every surviving replica *before* it acknowledges the write
//! that skipped it. Any later owner reads the labels and trusts only the members of
//! the newest epoch (see `replication::activation`).
//!
//! On disk the area holds two slots written alternately, each a small header with
//! a sequence number and a CRC32C of the JSON body: a torn write of one slot leaves
//! the other, older one valid.

use serde::{Deserialize, Serialize};

use crate::error::WireError;
use crate::ids::{Epoch, Generation, OwnerId, ReplicaUuid, VolumeUuid};
use crate::names::valid_name;

/// Bytes reserved after a replica's data for its label. A file replica is this much
/// longer than the volume; a block device must have this much room beyond it.
pub const LABEL_AREA: u64 = 64 << 10;
/// One of the two slots of the area.
pub const SLOT_LEN: usize = 32 << 10;
const SLOT_HEADER: usize = 32;
pub const SLOT_MAGIC: [u8; 8] = *b"UBLKDLBL";
pub const LABEL_FORMAT: u32 = 1;
/// The label of a replica whose container holds snapshot layers (the `snapshot`
/// crate's layered store): ublkd before snapshots refuses it instead of serving
/// its base, which is an old snapshot.
pub const LABEL_FORMAT_LAYERED: u32 = 2;
/// More members than any volume can have replicas (config: 8, plus replacements).
pub const MAX_MEMBERS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Label {
    pub format: u32,
    /// The volume's name (for messages; identity is `volume_uuid`).
    pub volume: String,
    /// Nil only on a replica adopted from protocol v1 that no v2 owner opened yet.
    pub volume_uuid: VolumeUuid,
    pub replica_uuid: ReplicaUuid,
    /// Bytes of data (the volume size).
    pub size: u64,
    pub block_size: u32,
    /// Highest owner generation that opened the replica, and that owner.
    pub generation: Generation,
    pub owner: OwnerId,
    /// The replicas holding every acknowledged write, as last written here.
    pub membership: Membership,
    /// An owner recorded that this replica missed writes: nobody trusts it, whatever
    /// its membership says, until a rebuild makes it current again.
    pub outdated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Membership {
    pub epoch: Epoch,
    /// Generation of the owner that wrote this epoch.
    pub generation: Generation,
    pub members: Vec<ReplicaUuid>,
}

impl Membership {
    pub fn contains(&self, r: ReplicaUuid) -> bool {
        self.members.contains(&r)
    }
}

impl Label {
    /// A label for a replica created now: no membership yet (epoch 0, no member).
    pub fn new(
        volume: &str,
        volume_uuid: VolumeUuid,
        replica_uuid: ReplicaUuid,
        size: u64,
        block_size: u32,
    ) -> Label {
        Label {
            format: LABEL_FORMAT,
            volume: volume.to_string(),
            volume_uuid,
            replica_uuid,
            size,
            block_size,
            generation: Generation(0),
            owner: OwnerId(0),
            membership: Membership::default(),
            outdated: false,
        }
    }

    /// Whether the replica, by its own label, holds every write of epoch `epoch`.
    pub fn is_current_at(&self, epoch: Epoch) -> bool {
        !self.outdated
            && self.membership.epoch == epoch
            && self.membership.contains(self.replica_uuid)
    }

    fn validate(&self) -> Result<(), WireError> {
        let bad = |m: String| Err(WireError::Label(m));
        if !matches!(self.format, LABEL_FORMAT | LABEL_FORMAT_LAYERED) {
            return bad(format!("unknown label format {}", self.format));
        }
        if !valid_name(&self.volume) {
            return bad(format!("invalid volume name {:?}", self.volume));
        }
        if !matches!(self.block_size, 512 | 4096)
            || self.size == 0
            || !self.size.is_multiple_of(self.block_size as u64)
        {
            return bad(format!(
                "bad geometry: {} bytes of {}-byte blocks",
                self.size, self.block_size
            ));
        }
        if self.membership.members.len() > MAX_MEMBERS {
            return bad(format!(
                "{} members (at most {MAX_MEMBERS})",
                self.membership.members.len()
            ));
        }
        if self.replica_uuid.is_nil() {
            return bad("nil replica uuid".into());
        }
        Ok(())
    }

    /// Decode a label received in a control payload (checked like one read from disk).
    pub fn checked(self) -> Result<Label, WireError> {
        self.validate()?;
        Ok(self)
    }
}

/// A slot as stored: header (magic, format, body length, sequence, body CRC32C),
/// then the JSON body, zero-padded to a 4 KiB multiple (what is written).
pub fn encode_slot(label: &Label, seq: u64) -> Vec<u8> {
    let body = serde_json::to_vec(label).expect("labels serialize");
    // The last 4 KiB of the area stay unwritten (the cheap-zeroing probe).
    assert!(
        body.len() <= SLOT_LEN - SLOT_HEADER - 4096,
        "label too large"
    );
    let mut b = Vec::with_capacity(SLOT_HEADER + body.len());
    b.extend_from_slice(&SLOT_MAGIC);
    b.extend_from_slice(&label.format.to_le_bytes());
    b.extend_from_slice(&(body.len() as u32).to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&body);
    b.resize(b.len().div_ceil(4096) * 4096, 0);
    b
}

/// What one slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// Never written (no magic): a replica without a label yet.
    Empty,
    Label {
        seq: u64,
        label: Label,
    },
    /// The magic is there but the rest does not check out (a torn write).
    Corrupt(String),
}

pub fn decode_slot(b: &[u8]) -> Slot {
    if b.len() < SLOT_HEADER || b[..8] != SLOT_MAGIC {
        return Slot::Empty;
    }
    let le32 = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let (format, len) = (le32(8), le32(12) as usize);
    let seq = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"));
    if !matches!(format, LABEL_FORMAT | LABEL_FORMAT_LAYERED) {
        return Slot::Corrupt(format!("unknown label format {format}"));
    }
    let Some(body) = b.get(SLOT_HEADER..SLOT_HEADER + len) else {
        return Slot::Corrupt(format!("body of {len} bytes overruns the slot"));
    };
    if crc32c::crc32c(body) != le32(24) {
        return Slot::Corrupt("checksum mismatch".into());
    }
    match serde_json::from_slice::<Label>(body)
        .map_err(|e| WireError::Label(e.to_string()))
        .and_then(Label::checked)
    {
        Ok(label) => Slot::Label { seq, label },
        Err(e) => Slot::Corrupt(e.to_string()),
    }
}

/// The label of an area given its two slots, and the sequence number of the slot
/// it came from (the next write goes to the other slot with `seq + 1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AreaRead {
    NoLabel,
    Label { label: Label, seq: u64 },
}

pub fn read_area(slot_a: &[u8], slot_b: &[u8]) -> Result<AreaRead, WireError> {
    match (decode_slot(slot_a), decode_slot(slot_b)) {
        (Slot::Empty, Slot::Empty) => Ok(AreaRead::NoLabel),
        (Slot::Corrupt(a), Slot::Corrupt(b)) => Err(WireError::Label(format!(
            "both label slots are damaged ({a}; {b})"
        ))),
        (Slot::Corrupt(why), Slot::Empty) | (Slot::Empty, Slot::Corrupt(why)) => Err(
            WireError::Label(format!("the only label slot is damaged ({why})")),
        ),
        (Slot::Label { seq: sa, label: la }, Slot::Label { seq: sb, label: lb }) => {
            Ok(if sa >= sb {
                AreaRead::Label { label: la, seq: sa }
            } else {
                AreaRead::Label { label: lb, seq: sb }
            })
        }
        (Slot::Label { seq, label }, _) | (_, Slot::Label { seq, label }) => {
            Ok(AreaRead::Label { label, seq })
        }
    }
}

/// Which slot (0 or 1) a label with sequence number `seq` goes to.
pub fn slot_of(seq: u64) -> usize {
    (seq % 2) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label() -> Label {
        let mut l = Label::new(
            "v",
            VolumeUuid::random(),
            ReplicaUuid::random(),
            1 << 20,
            4096,
        );
        l.membership = Membership {
            epoch: Epoch(3),
            generation: Generation(2),
            members: vec![l.replica_uuid, ReplicaUuid::random()],
        };
        l
    }

    #[test]
    fn slots_round_trip_and_the_newer_one_wins() {
        let l1 = label();
        let mut l2 = l1.clone();
        l2.membership.epoch = Epoch(4);
        let (a, b) = (encode_slot(&l1, 6), encode_slot(&l2, 7));
        assert_eq!(a.len() % 4096, 0);
        assert_eq!(
            read_area(&a, &b).unwrap(),
            AreaRead::Label {
                label: l2.clone(),
                seq: 7
            }
        );
        assert_eq!(
            read_area(&b, &a).unwrap(),
            AreaRead::Label { label: l2, seq: 7 }
        );
        assert_eq!(read_area(&[0; 64], &[0; 64]).unwrap(), AreaRead::NoLabel);
    }

    #[test]
    fn a_torn_slot_falls_back_to_the_other_one() {
        let l = label();
        let good = encode_slot(&l, 1);
        let mut torn = encode_slot(&l, 2);
        torn[40] ^= 0xff;
        assert!(matches!(decode_slot(&torn), Slot::Corrupt(_)));
        assert_eq!(
            read_area(&good, &torn).unwrap(),
            AreaRead::Label { label: l, seq: 1 }
        );
        assert!(read_area(&torn, &[0; 64]).is_err(), "only slot damaged");
        assert!(read_area(&torn, &torn).is_err());
    }

    #[test]
    fn currency_needs_membership_and_not_outdated() {
        let mut l = label();
        assert!(l.is_current_at(Epoch(3)));
        assert!(!l.is_current_at(Epoch(4)));
        l.outdated = true;
        assert!(!l.is_current_at(Epoch(3)));
        let mut l = label();
        l.membership.members.remove(0);
        assert!(!l.is_current_at(Epoch(3)));
    }

    #[test]
    fn invalid_labels_are_rejected() {
        let mut l = label();
        l.block_size = 1000;
        assert!(matches!(decode_slot(&encode_slot(&l, 0)), Slot::Corrupt(_)));
        let mut l = label();
        l.volume = "../x".into();
        assert!(l.checked().is_err());
    }
}
