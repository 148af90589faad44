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
    /// ublkd 0.3 (2026-12): capability negotiation in the handshake (HELLO offers
    /// [`Features`], CHALLENGE answers the ones the session uses, both covered by
    /// the proofs so nobody on the path can strip them); [`Features::INSTANCE`]:
    /// the OPEN reply names the server's instance (boot id and process nonce), so
    /// an owner tells a replica whose host rebooted, and lost what it had not
    /// flushed, from one whose process restarted. A v3 server still serves v2
    /// owners (no features); a v3 owner needs v3 servers: upgrade servers first.
    V3 = 3,
}

/// The capabilities a v3 session may use: a bit set offered by the client in
/// HELLO, answered by the server with the ones both know. Later additions within
/// v3 are new bits, so peers of different builds agree on what they share instead
/// of closing the connection on an op the other does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features(pub u32);

impl Features {
    /// The OPEN reply carries the server's [`crate::control::ServerInstance`].
    pub const INSTANCE: Features = Features(1 << 0);
    /// The fenced SNAPSHOT op (op 9): the replica's store takes, undoes, deletes,
    /// reverts and lists snapshots (ublkd 0.3, 2026-12-07).
    pub const SNAPSHOTS: Features = Features(1 << 1);
    pub const NONE: Features = Features(0);
    /// Every feature this build knows.
    pub const ALL: Features = Features(Features::INSTANCE.0 | Features::SNAPSHOTS.0);

    pub fn has(self, f: Features) -> bool {
        self.0 & f.0 == f.0
    }

    /// What both sides know.
    pub fn common(self, other: Features) -> Features {
        Features(self.0 & other.0 & Features::ALL.0)
    }
}

impl ProtocolVersion {
    /// The version this build speaks (a server also accepts [`ProtocolVersion::V2`]
    /// owners).
    pub const CURRENT: ProtocolVersion = ProtocolVersion::V3;

    pub fn number(self) -> u16 {
        self as u16
    }
}
