//! The bytes of the replica protocol and of replica labels, and nothing else: no
//! sockets, no async runtime, no io_uring (so the fuzz target stays light).
//! docs/protocol.md is the specification; this crate is its one implementation.
//!
//! * [`ids`] — newtypes for generations, epochs, sessions, uuids, offsets.
//! * [`names`] — the one rule for volume names and replica ids.
//! * [`version`] — the protocol versions and what each one added.
//! * [`handshake`] — HELLO/CHALLENGE/PROOF/RESULT as pure transformations; session keys.
//! * [`frame`] — request and reply headers, sealing (sequence + SipHash tags) and opening.
//! * [`control`] — the JSON payloads of OPEN, STAT and SET_LABEL.
//! * [`label`] — the label every replica carries: identity and membership.

pub mod control;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod ids;
pub mod label;
pub mod names;
pub mod random;
pub mod version;

pub use error::WireError;
pub use ids::{
    ByteLen, ByteOffset, Epoch, FrameSeq, Generation, OwnerId, ReplicaUuid, RequestId, SessionId,
    SnapshotUuid, VolumeTag, VolumeUuid,
};
pub use version::ProtocolVersion;
