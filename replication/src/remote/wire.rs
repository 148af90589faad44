//! The replica wire protocol (docs/protocol.md is the specification; this is the
//! one implementation of its byte layout).
//!
//! After the handshake ([`super::auth`]) both directions carry frames: a fixed-size,
//! checksummed header, then `payload_len` bytes of payload. Headers and payloads are
//! separate so a receiver can read a payload straight into its final buffer, and a
//! sender can hand the payload to the kernel without copying it behind the header.
//!
//! Every decoder here is total: any byte string yields a value or a [`WireError`],
//! never a panic (fuzzed by `fuzz/fuzz_targets/frame_decoder.rs`).

use serde::{Deserialize, Serialize};

use crate::error::ReplicationError;

/// The only protocol version spoken. A peer offering another gets an explicit
/// version-mismatch reply (see `auth`), never a hang.
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest data payload (and READ length): the largest ublk request (`max_io`).
pub const MAX_DATA: u32 = 32 << 20;
/// Largest control payload (OPEN/STAT JSON, error messages).
pub const MAX_CONTROL: u32 = 64 << 10;

pub const REQUEST_MAGIC: u32 = u32::from_le_bytes(*b"UKRQ");
pub const REPLY_MAGIC: u32 = u32::from_le_bytes(*b"UKRP");
pub const REQUEST_HEADER_LEN: usize = 64;
pub const REPLY_HEADER_LEN: usize = 40;

/// Decoding errors are [`ReplicationError`] frame variants: a frame that must not be
/// acted on. The receiver closes the connection and logs the error (it names the problem).
pub type WireError = ReplicationError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum Op {
    Read = 1,
    Write = 2,
    Flush = 3,
    Discard = 4,
    WriteZeroes = 5,
    /// Open (optionally create) a replica for a volume owner at a generation.
    Open = 16,
    /// Report a replica's identity and stored generation without claiming it.
    Stat = 17,
    /// Liveness probe; no payload.
    Ping = 18,
}

impl Op {
    pub fn from_u8(v: u8) -> Result<Op, WireError> {
        Ok(match v {
            1 => Op::Read,
            2 => Op::Write,
            3 => Op::Flush,
            4 => Op::Discard,
            5 => Op::WriteZeroes,
            16 => Op::Open,
            17 => Op::Stat,
            18 => Op::Ping,
            _ => {
                return Err(WireError::UnknownField {
                    what: "op",
                    value: v as u64,
                })
            }
        })
    }

    /// I/O ops are fenced: they carry the session's generation, session and volume.
    pub fn is_io(self) -> bool {
        (self as u8) < 16
    }
}

/// WRITE: durable before the reply (RWF_DSYNC).
pub const FLAG_FUA: u8 = 1;
/// WRITE_ZEROES: keep the range allocated.
pub const FLAG_NO_UNMAP: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub op: Op,
    pub flags: u8,
    pub id: u64,
    pub offset: u64,
    /// Bytes of the volume the request covers (READ: bytes to return).
    pub len: u32,
    pub payload_len: u32,
    pub generation: u64,
    pub session: u64,
    pub volume: u64,
    pub payload_crc: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl RequestHeader {
    /// A header for `op` with everything else zero; fill in what the op needs.
    pub fn new(op: Op, id: u64) -> RequestHeader {
        RequestHeader {
            op,
            flags: 0,
            id,
            offset: 0,
            len: 0,
            payload_len: 0,
            generation: 0,
            session: 0,
            volume: 0,
            payload_crc: 0,
        }
    }

    /// Attach `payload`: its length and checksum.
    pub fn with_payload(mut self, payload: &[u8]) -> RequestHeader {
        self.payload_len = payload.len() as u32;
        self.payload_crc = crc32c::crc32c(payload);
        self
    }

    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_le_bytes());
        b[4] = self.op as u8;
        b[5] = self.flags;
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..32].copy_from_slice(&self.payload_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.generation.to_le_bytes());
        b[40..48].copy_from_slice(&self.session.to_le_bytes());
        b[48..56].copy_from_slice(&self.volume.to_le_bytes());
        b[56..60].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode and check everything that can be checked without knowing the replica
    /// (its size is checked by the server, its generation by the fence).
    pub fn decode(b: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, WireError> {
        let magic = le32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        if crc32c::crc32c(&b[..60]) != le32(b, 60) {
            return Err(WireError::HeaderCrc);
        }
        if b[6] != 0 || b[7] != 0 {
            return Err(WireError::Reserved);
        }
        let h = RequestHeader {
            op: Op::from_u8(b[4])?,
            flags: b[5],
            id: le64(b, 8),
            offset: le64(b, 16),
            len: le32(b, 24),
            payload_len: le32(b, 28),
            generation: le64(b, 32),
            session: le64(b, 40),
            volume: le64(b, 48),
            payload_crc: le32(b, 56),
        };
        h.validate()?;
        Ok(h)
    }

    fn validate(&self) -> Result<(), WireError> {
        let bad = |why| Err(WireError::Malformed { op: self.op, why });
        let allowed_flags = match self.op {
            Op::Write => FLAG_FUA,
            Op::WriteZeroes => FLAG_NO_UNMAP,
            _ => 0,
        };
        if self.flags & !allowed_flags != 0 {
            return bad("flags not valid for this op");
        }
        if self.offset.checked_add(self.len as u64).is_none() {
            return bad("offset + length overflows");
        }
        let max = if self.op.is_io() {
            MAX_DATA
        } else {
            MAX_CONTROL
        };
        if self.payload_len > max {
            return Err(WireError::FrameTooLarge {
                len: self.payload_len,
                max,
            });
        }
        match self.op {
            Op::Read if self.len == 0 || self.len > MAX_DATA => bad("length must be 1..=MAX_DATA"),
            Op::Read if self.payload_len != 0 => bad("carries a payload"),
            Op::Write if self.len == 0 || self.payload_len != self.len => {
                bad("payload length must equal the (non-zero) length")
            }
            Op::Flush if self.offset != 0 || self.len != 0 || self.payload_len != 0 => {
                bad("must have zero offset, length and payload")
            }
            Op::Discard | Op::WriteZeroes if self.len == 0 => bad("zero length"),
            Op::Discard | Op::WriteZeroes if self.payload_len != 0 => bad("carries a payload"),
            Op::Open | Op::Stat if self.payload_len == 0 => bad("needs a payload"),
            Op::Open | Op::Stat | Op::Ping if self.offset != 0 || self.len != 0 => {
                bad("must have zero offset and length")
            }
            Op::Ping if self.payload_len != 0 => bad("carries a payload"),
            _ => Ok(()),
        }
    }

    /// Check a received payload against this header.
    pub fn verify_payload(&self, payload: &[u8]) -> Result<(), WireError> {
        debug_assert_eq!(payload.len(), self.payload_len as usize);
        if crc32c::crc32c(payload) != self.payload_crc {
            return Err(WireError::PayloadCrc { id: self.id });
        }
        Ok(())
    }
}

/// Outcome of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    /// The replica's storage failed: for I/O, `aux` is the errno; for OPEN/STAT
    /// (metadata), `aux` is EIO or 0 and the payload is a message.
    IoError = 1,
    /// The request's generation is not the replica's current one (a newer owner
    /// took over), or an OPEN's generation is not above it (equal is only allowed
    /// for the owner that holds it); `aux` is the replica's generation.
    Fenced = 2,
    /// A control request with unacceptable arguments (bad names or geometry); the
    /// payload is a message. (An out-of-range I/O closes the connection instead.)
    Invalid = 3,
    /// No such replica (and OPEN did not ask to create it); payload is a message.
    NotFound = 4,
    /// The replica exists with another identity (volume, size); payload is a message.
    Conflict = 5,
    /// An I/O request on a connection without an open replica, with another
    /// session or volume id, or on a session a later OPEN of the same owner
    /// superseded (a reconnect).
    NotOpen = 6,
}

impl Status {
    pub fn from_u8(v: u8) -> Result<Status, WireError> {
        Ok(match v {
            0 => Status::Ok,
            1 => Status::IoError,
            2 => Status::Fenced,
            3 => Status::Invalid,
            4 => Status::NotFound,
            5 => Status::Conflict,
            6 => Status::NotOpen,
            _ => {
                return Err(WireError::UnknownField {
                    what: "status",
                    value: v as u64,
                })
            }
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyHeader {
    pub status: Status,
    pub id: u64,
    pub aux: u64,
    pub payload_len: u32,
    pub payload_crc: u32,
}

impl ReplyHeader {
    pub fn new(status: Status, id: u64) -> ReplyHeader {
        ReplyHeader {
            status,
            id,
            aux: 0,
            payload_len: 0,
            payload_crc: 0,
        }
    }

    pub fn with_payload(mut self, payload: &[u8]) -> ReplyHeader {
        self.payload_len = payload.len() as u32;
        self.payload_crc = crc32c::crc32c(payload);
        self
    }

    pub fn encode(&self) -> [u8; REPLY_HEADER_LEN] {
        let mut b = [0u8; REPLY_HEADER_LEN];
        b[0..4].copy_from_slice(&REPLY_MAGIC.to_le_bytes());
        b[4] = self.status as u8;
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.aux.to_le_bytes());
        b[24..28].copy_from_slice(&self.payload_len.to_le_bytes());
        b[28..32].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..36]);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; REPLY_HEADER_LEN]) -> Result<ReplyHeader, WireError> {
        let magic = le32(b, 0);
        if magic != REPLY_MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        if crc32c::crc32c(&b[..36]) != le32(b, 36) {
            return Err(WireError::HeaderCrc);
        }
        if b[5..8] != [0, 0, 0] || b[32..36] != [0; 4] {
            return Err(WireError::Reserved);
        }
        let h = ReplyHeader {
            status: Status::from_u8(b[4])?,
            id: le64(b, 8),
            aux: le64(b, 16),
            payload_len: le32(b, 24),
            payload_crc: le32(b, 28),
        };
        if h.payload_len > MAX_DATA {
            return Err(WireError::FrameTooLarge {
                len: h.payload_len,
                max: MAX_DATA,
            });
        }
        Ok(h)
    }

    pub fn verify_payload(&self, payload: &[u8]) -> Result<(), WireError> {
        if crc32c::crc32c(payload) != self.payload_crc {
            return Err(WireError::PayloadCrc { id: self.id });
        }
        Ok(())
    }
}

/// OPEN payload: claim (and with `create`, make) replica `replica` for `volume` at
/// `generation`. Accepted when `generation` is above the stored one, or equal with
/// the same `owner` (the same activation reconnecting).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenRequest {
    pub replica: String,
    pub volume: String,
    pub size: u64,
    pub block_size: u32,
    pub generation: u64,
    /// Random per activation of the owner.
    pub owner: u64,
    pub create: bool,
    /// The owner knows this replica missed writes (faulted, or new to the volume):
    /// the server records it, durably and for good (until a rebuild), so a later
    /// owner never trusts it either.
    #[serde(default)]
    pub stale: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenReply {
    /// Carried by every I/O frame of this connection.
    pub session: u64,
    pub generation: u64,
    pub size: u64,
    /// The replica did not exist and was created (all zeroes).
    pub created: bool,
    /// Generation and owner the replica held before this OPEN: an owner that sees
    /// anything but what its STAT showed knows another owner got in between.
    pub previous_generation: u64,
    pub previous_owner: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatRequest {
    pub replica: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatReply {
    pub exists: bool,
    pub volume: Option<String>,
    pub size: u64,
    pub generation: u64,
    /// The activation that holds `generation`.
    pub owner: u64,
    /// Marked stale by an owner (see [`OpenRequest::stale`]).
    pub stale: bool,
}

pub fn decode_control<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(payload).map_err(|e| WireError::Control(e.to_string()))
}

pub fn encode_control<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("control types serialize")
}

/// The 64-bit volume id carried in I/O frames: a hash of the volume name, so a frame
/// meant for one volume can never be applied to another's replica.
pub fn volume_id(name: &str) -> u64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(name.as_bytes());
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// Replica ids and volume names: 1-64 of `[A-Za-z0-9_.-]`, not `.` or `..`, so an id
/// can name a file in the server's storage directory and nothing else.
pub fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_op() -> impl Strategy<Value = Op> {
        prop::sample::select(vec![
            Op::Read,
            Op::Write,
            Op::Flush,
            Op::Discard,
            Op::WriteZeroes,
            Op::Open,
            Op::Stat,
            Op::Ping,
        ])
    }

    /// Headers that satisfy the per-op rules.
    fn valid_request() -> impl Strategy<Value = RequestHeader> {
        (
            any_op(),
            any::<u64>(),
            0u64..(1 << 50),
            1u32..=MAX_DATA,
            any::<(u64, u64, u64, u32)>(),
            any::<bool>(),
        )
            .prop_map(
                |(op, id, off, len, (generation, session, volume, crc), f)| {
                    let mut h = RequestHeader::new(op, id);
                    h.generation = generation;
                    h.session = session;
                    h.volume = volume;
                    h.payload_crc = crc;
                    match op {
                        Op::Read => (h.offset, h.len) = (off, len),
                        Op::Write => {
                            (h.offset, h.len, h.payload_len) = (off, len, len);
                            h.flags = if f { FLAG_FUA } else { 0 };
                        }
                        Op::Discard => (h.offset, h.len) = (off, len),
                        Op::WriteZeroes => {
                            (h.offset, h.len) = (off, len);
                            h.flags = if f { FLAG_NO_UNMAP } else { 0 };
                        }
                        Op::Open | Op::Stat => h.payload_len = 1 + len % MAX_CONTROL,
                        Op::Flush | Op::Ping => {}
                    }
                    h
                },
            )
    }

    proptest! {
        #[test]
        fn request_round_trips(h in valid_request()) {
            prop_assert_eq!(RequestHeader::decode(&h.encode()).ok(), Some(h));
        }

        #[test]
        fn reply_round_trips(st in 0u8..=6, id: u64, aux: u64, len in 0..=MAX_DATA, crc: u32) {
            let h = ReplyHeader { status: Status::from_u8(st).unwrap(), id, aux, payload_len: len, payload_crc: crc };
            prop_assert_eq!(ReplyHeader::decode(&h.encode()).ok(), Some(h));
        }

        /// Any single corrupted byte is caught (header CRC, or a field check).
        #[test]
        fn corrupted_request_is_rejected(h in valid_request(), at in 0usize..REQUEST_HEADER_LEN, x in 1u8..=255) {
            let mut b = h.encode();
            b[at] ^= x;
            prop_assert!(RequestHeader::decode(&b).is_err());
        }

        /// Arbitrary bytes never panic the decoders.
        #[test]
        fn garbage_never_panics(b in prop::array::uniform32(any::<u8>()), c in prop::array::uniform32(any::<u8>())) {
            let mut req = [0u8; REQUEST_HEADER_LEN];
            req[..32].copy_from_slice(&b);
            req[32..].copy_from_slice(&c);
            let _ = RequestHeader::decode(&req);
            let mut rep = [0u8; REPLY_HEADER_LEN];
            rep.copy_from_slice(&req[..REPLY_HEADER_LEN]);
            let _ = ReplyHeader::decode(&rep);
        }

        #[test]
        fn payload_checksum_detects_flips(data in prop::collection::vec(any::<u8>(), 1..4096), at: prop::sample::Index, x in 1u8..=255) {
            let h = RequestHeader::new(Op::Write, 1).with_payload(&data);
            prop_assert!(h.verify_payload(&data).is_ok());
            let mut bad = data.clone();
            bad[at.index(data.len())] ^= x;
            let caught = matches!(h.verify_payload(&bad), Err(WireError::PayloadCrc { id: 1 }));
            prop_assert!(caught, "flip not detected");
        }
    }

    #[test]
    fn op_rules_are_enforced() {
        let mut h = RequestHeader::new(Op::Write, 1);
        h.len = 4096;
        h.payload_len = 512;
        assert!(matches!(
            RequestHeader::decode(&h.encode()),
            Err(WireError::Malformed { op: Op::Write, .. })
        ));
        let mut h = RequestHeader::new(Op::Read, 1);
        h.offset = u64::MAX - 10;
        h.len = 4096;
        assert!(RequestHeader::decode(&h.encode()).is_err(), "overflow");
        let mut h = RequestHeader::new(Op::Read, 1);
        h.len = MAX_DATA + 1;
        assert!(
            RequestHeader::decode(&h.encode()).is_err(),
            "oversized read"
        );
        let mut h = RequestHeader::new(Op::Flush, 1);
        h.flags = FLAG_FUA;
        assert!(RequestHeader::decode(&h.encode()).is_err(), "flag on flush");
        let mut h = RequestHeader::new(Op::Open, 1);
        h.payload_len = MAX_CONTROL + 1;
        assert!(matches!(
            RequestHeader::decode(&h.encode()),
            Err(WireError::FrameTooLarge { .. })
        ));
        let mut b = RequestHeader::new(Op::Ping, 1).encode();
        b[4] = 99;
        let crc = crc32c::crc32c(&b[..60]);
        b[60..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            RequestHeader::decode(&b),
            Err(WireError::UnknownField {
                what: "op",
                value: 99
            })
        ));
    }

    #[test]
    fn names_cannot_escape_the_storage_dir() {
        for ok in ["v1-r2", "a", "A.b_c-9"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "../x", "a b", &"x".repeat(65), "é"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn volume_ids_differ_by_name() {
        assert_eq!(volume_id("v1"), volume_id("v1"));
        assert_ne!(volume_id("v1"), volume_id("v2"));
    }
}
