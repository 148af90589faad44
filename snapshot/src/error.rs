//! The crate's one error type, plus [`Errno`], the value a failed block request
//! carries back to the kernel.

use std::path::PathBuf;

/// A positive Linux errno (EIO, EINVAL, ...). The ublk completion wants its negation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const EOPNOTSUPP: Errno = Errno(libc::EOPNOTSUPP);
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);

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

impl From<std::io::Error> for Errno {
    fn from(e: std::io::Error) -> Errno {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
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
    #[error("replica {path}: {size} bytes leave no room for its label: a replica of this volume needs {needed} bytes (the volume, then 64 KiB of label)")]
    NoRoomForLabel {
        path: PathBuf,
        size: u64,
        needed: u64,
    },
    #[error("replica {path}: label: {message}")]
    Label { path: PathBuf, message: String },
    #[error("replica {path}: not a regular file or block device")]
    UnsupportedKind { path: PathBuf },
    #[error("io_uring setup failed: {0}")]
    Uring(#[source] std::io::Error),

    // The layered store.
    #[error("store I/O failed: {0}")]
    Io(Errno),
    #[error("the snapshot store is damaged: {0} (run `ublkctl store check`; the replica needs a rebuild)")]
    Damaged(String),
    #[error("no space for snapshots: {0}")]
    SnapshotSpace(String),
    #[error("the volume already has {limit} snapshots, its limit: delete one first")]
    TooManySnapshots { limit: usize },
    #[error("no snapshot {0}")]
    NoSuchSnapshot(wire::SnapshotUuid),
    #[error("bad snapshot request: {0}")]
    BadSnapshot(String),
}
