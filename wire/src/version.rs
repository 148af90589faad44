//! Protocol versions, oldest first: what each one added. The handshake carries the
//! version; peers speaking different versions get an explicit mismatch reply and
//! the error tells which side to upgrade.

/// Every version this crate knows of (docs/protocol.md §13 keeps the same list).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u16)]
pub enum ProtocolVersion {
    /// ublkd 0.1 (2026-11): HMAC-SHA256 challenge–response handshake over the cluster
    /// secret; frames with CRC32C on header and payload (integrity, no authenticity);
    /// READ, WRITE (FUA), FLUSH, DISCARD, WRITE_ZEROES, OPEN, STAT, PING; generation
    /// fencing; replica metadata in `<id>.meta`.
    V1 = 1,
    /// ublkd 0.2 (2026-12): the handshake also derives per-direction session keys;
    /// every frame carries a sequence number and SipHash-2-4-128 tags over header and
    /// payload instead of CRCs (no replay, reordering, deletion or forgery by anyone
    /// on the path); replica labels (identity + membership) in STAT/OPEN and the
    /// fenced SET_LABEL op; a v1 peer is refused with an upgrade message. Added
    /// within 2 (a server built before closes the connection on the op, so upgrade
    /// servers first): CHECKSUM (op 7, 2026-12-02), DATA_EXTENTS (op 8, 2026-12-05).
    V2 = 2,
}

impl ProtocolVersion {
    /// The one version this build speaks.
    pub const CURRENT: ProtocolVersion = ProtocolVersion::V2;

    pub fn number(self) -> u16 {
        self as u16
    }
}
