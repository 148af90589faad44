//! The crate's one error type: a frame, handshake or payload that must not be
//! acted on. Receivers close the connection and log it (the text names the problem).

use crate::frame::Op;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    // Handshake.
    #[error("authentication failed: {0}")]
    Auth(&'static str),
    #[error("{}", version_message(*ours, *theirs))]
    Version { ours: u16, theirs: u16 },

    // Frames.
    #[error("bad frame magic {0:#010x}")]
    BadMagic(u32),
    #[error("frame header tag mismatch (forged, corrupted or from another session)")]
    HeaderTag,
    #[error("frame out of sequence: expected {expected}, got {got} (replayed, reordered or deleted frame)")]
    Sequence { expected: u64, got: u64 },
    #[error("payload tag mismatch (request {id}): forged or corrupted payload")]
    PayloadTag { id: u64 },
    #[error("unknown {what} {value}")]
    UnknownField { what: &'static str, value: u64 },
    #[error("reserved frame bits set")]
    Reserved,
    #[error("malformed {op:?} frame: {why}")]
    Malformed { op: Op, why: &'static str },
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: u32, max: u32 },

    // Control payloads and labels.
    #[error("bad control payload: {0}")]
    Control(String),
    #[error("replica label: {0}")]
    Label(String),
}

fn version_message(ours: u16, theirs: u16) -> String {
    let side = if theirs < ours {
        "upgrade ublkd on the peer"
    } else {
        "upgrade this ublkd"
    };
    format!("protocol version mismatch: we speak {ours}, the peer {theirs}: {side} (all nodes must run the same protocol version)")
}
