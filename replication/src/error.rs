//! The crate's one error type, plus [`Errno`], the value a failed block request
//! carries back to the kernel.

use std::path::PathBuf;

use crate::ids::ReplicaIndex;

/// A positive Linux errno (EIO, EINVAL, ...). The ublk completion wants its negation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const EOPNOTSUPP: Errno = Errno(libc::EOPNOTSUPP);

    /// From an io_uring CQE result (negative errno).
    pub fn from_cqe(res: i32) -> Errno {
        debug_assert!(res < 0, "not an error result: {res}");
        Errno(-res)
    }

    pub fn last_os_error() -> Errno {
        Errno(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("replica {path}: {what}: {source}")]
    Open {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("replica {path}: {size} bytes is smaller than the volume ({volume_size} bytes)")]
    TooSmall {
        path: PathBuf,
        size: u64,
        volume_size: u64,
    },
    #[error("replica {path}: not a regular file or block device")]
    UnsupportedKind { path: PathBuf },
    #[error("request out of range: offset {offset} + length {len} > volume size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("request not aligned to {align} bytes: offset {offset}, length {len}")]
    Unaligned { offset: u64, len: u64, align: u32 },
    #[error("unsupported ublk operation {0}")]
    UnsupportedOp(u32),
    #[error("request of {len} bytes exceeds the I/O buffer ({max} bytes)")]
    TooLarge { len: u64, max: u64 },
    #[error("replica {0} does not exist")]
    NoSuchReplica(ReplicaIndex),
    #[error("persisting volume state failed: {0}")]
    Persist(String),
    #[error("io_uring setup failed: {0}")]
    Uring(#[source] std::io::Error),

    // Remote replicas: connection and handshake.
    #[error("cannot connect to replica server {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("network: {0}")]
    Net(#[source] std::io::Error),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("protocol version mismatch: we speak {ours}, the peer {theirs}")]
    Version { ours: u16, theirs: u16 },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("replica {replica} is fenced: it holds generation {theirs}, ours is {ours} (a newer owner took over)")]
    Fenced {
        replica: String,
        ours: u64,
        theirs: u64,
    },
    #[error("replica {replica} refused: {status:?}: {message}")]
    Remote {
        replica: String,
        status: crate::remote::wire::Status,
        message: String,
    },

    // Frame decoding (remote::wire): the connection is closed.
    #[error("bad frame magic {0:#010x}")]
    BadMagic(u32),
    #[error("frame header checksum mismatch")]
    HeaderCrc,
    #[error("payload checksum mismatch (request {id})")]
    PayloadCrc { id: u64 },
    #[error("unknown {what} {value}")]
    UnknownField { what: &'static str, value: u64 },
    #[error("reserved frame bits set")]
    Reserved,
    #[error("malformed {op:?} frame: {why}")]
    Malformed {
        op: crate::remote::wire::Op,
        why: &'static str,
    },
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: u32, max: u32 },
    #[error("bad control payload: {0}")]
    Control(String),
}
