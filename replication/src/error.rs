//! The crate's one error type, plus [`Errno`], the value a failed block request
//! carries back to the kernel.

use std::path::PathBuf;

use crate::ids::SlotIndex;
use wire::Generation;

pub use snapshot::Errno;

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("replica {path}: {what}: {source}")]
    Open {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("request out of range: offset {offset} + length {len} > volume size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("request not aligned to {align} bytes: offset {offset}, length {len}")]
    Unaligned { offset: u64, len: u64, align: u32 },
    #[error("unsupported ublk operation {0}")]
    UnsupportedOp(u32),
    #[error("request of {len} bytes exceeds the I/O buffer ({max} bytes)")]
    TooLarge { len: u64, max: u64 },
    #[error("replica slot {0} does not exist")]
    NoSuchSlot(SlotIndex),
    #[error("replica {replica} is {state}, not faulted: only a faulted replica is rebuilt")]
    NotFaulted {
        replica: String,
        state: &'static str,
    },
    #[error("replica {0} is not open (unreachable since the start): it is rebuilt once it can be opened")]
    NotOpen(String),
    #[error("nothing to verify: {0} online replica(s), a comparison needs at least 2")]
    NothingToVerify(usize),
    #[error("replica #{} is not online: a repair copies only from an online replica (see status)", .0.0)]
    NotOnline(SlotIndex),
    #[error("verify: replica {replica} failed at offset {offset}: {errno}")]
    VerifyIo {
        replica: String,
        offset: u64,
        errno: Errno,
    },
    #[error("no replica is online: refusing to serve stale data")]
    NoOnlineReplica,
    #[error("replica {replica}: cannot go from {from} to {to}")]
    Transition {
        replica: String,
        from: &'static str,
        to: &'static str,
    },
    #[error("replica {0} is the last replica holding every acknowledged write (online, or awaited while it reconnects): it holds the only current copy")]
    LastOnline(String),
    #[error("the volume has no free replica slot (64 in use): restart it to compact the set")]
    TooManySlots,
    #[error("persisting volume state failed: {0}")]
    Persist(String),
    #[error("replica {0} has no log of what it missed: only a full rebuild can bring it back")]
    NoDirtyLog(String),
    #[error("replica {0} still lacks regions: its rebuild is not done")]
    NotRebuilt(String),
    #[error("dirty-log grain {0} bytes: must be a power of two from 4 KiB to 4 MiB")]
    BadGrain(u32),
    #[error("dirty log {path}: {message}")]
    DirtyLog { path: PathBuf, message: String },
    #[error("dirty map of another geometry (volume size or grain differ)")]
    DirtyGeometry,
    #[error(transparent)]
    Store(#[from] snapshot::StoreError),
    #[error("snapshot refused: {0}")]
    SnapshotRefused(String),
    #[error("snapshot failed on replica {replica}: {error} (nothing was kept: the replicas that took it undid it)")]
    SnapshotFailed { replica: String, error: String },
    #[error("export stopped: {0}")]
    Export(String),

    // Remote replicas.
    #[error("cannot connect to replica server {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("network: {0}")]
    Net(#[source] std::io::Error),
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("replica {replica} is fenced: it holds generation {theirs}, ours is {ours} (a newer owner took over)", ours = ours.0, theirs = theirs.0)]
    Fenced {
        replica: String,
        ours: Generation,
        theirs: Generation,
    },
    #[error("replica {replica} refused: {status:?}: {message}")]
    Remote {
        replica: String,
        status: wire::frame::Status,
        message: String,
    },
}
