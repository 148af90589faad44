//! How one replica slot of a volume is reached: the shared object behind every
//! queue's per-queue [`crate::Replica`] handle. The nexus makes the handles (each
//! queue its own, on its own ring); [`crate::health::Health`] uses the backing for
//! what is not on the data path: labels and the final sync.

use std::sync::Arc;

use wire::control::LabelUpdate;

use crate::error::{Errno, ReplicationError};
use crate::local::LocalBacking;
use crate::remote::RemoteClient;
use crate::testing::MemStore;

#[derive(Clone)]
pub enum Backing {
    Local(Arc<LocalBacking>),
    Remote(Arc<RemoteClient>),
    /// In-memory, for tests of the logic above the replicas.
    Memory(Arc<MemStore>),
}

impl Backing {
    pub fn location(&self) -> String {
        match self {
            Backing::Local(b) => b.path().display().to_string(),
            Backing::Remote(c) => c.location().to_string(),
            Backing::Memory(m) => format!("mem:{:p}", Arc::as_ptr(m)),
        }
    }

    /// Remote replicas cost a network round trip: reads prefer local ones.
    /// A handle for a plain thread (one that is not a ublk queue): its own
    /// blocking io_uring for a local replica. The rebuild copier uses these.
    pub fn thread_handle(&self) -> Result<Box<dyn crate::replica::Replica>, ReplicationError> {
        Ok(match self {
            Backing::Memory(m) => Box::new(crate::testing::MemReplica::new(m.clone())),
            Backing::Local(l) => Box::new(crate::local::LocalReplica::new(
                l.clone(),
                crate::uring::BlockingUring::new()?,
            )),
            Backing::Remote(c) => Box::new(c.replica(None)),
        })
    }

    /// It left the volume's replica set: a remote replica stops reconnecting.
    pub fn retire(&self) {
        if let Backing::Remote(c) = self {
            c.retire();
        }
    }

    /// Whether I/O can reach it now (a remote replica's connection is up).
    pub fn is_reachable(&self) -> bool {
        match self {
            Backing::Remote(c) => c.is_connected(),
            Backing::Local(_) | Backing::Memory(_) => true,
        }
    }

    pub fn is_remote(&self) -> bool {
        match self {
            Backing::Remote(_) => true,
            Backing::Memory(m) => m.plays_remote(),
            Backing::Local(_) => false,
        }
    }

    /// Replace the membership part of the replica's label, durably. Blocks: call
    /// it off the data path (and not on the network runtime's thread).
    pub fn update_label(&self, update: &LabelUpdate) -> Result<(), Errno> {
        match self {
            Backing::Local(b) => b.update_label(update).map_err(|e| {
                tracing::error!(replica = %b.path().display(), error = %e, "label write failed");
                Errno::EIO
            }),
            Backing::Remote(c) => c.runtime().block_on(c.set_label(update)),
            Backing::Memory(m) => m.update_label(update),
        }
    }

    /// One snapshot operation (the owner's barrier, the operator's commands).
    /// Blocks; run it off the data path.
    pub fn snapshot_action(
        &self,
        action: &wire::control::SnapshotAction,
    ) -> Result<wire::control::SnapshotReply, ReplicationError> {
        match self {
            Backing::Local(b) => Ok(b.snapshot_action(action)?),
            Backing::Remote(c) => c.runtime().block_on(c.snapshot_action(action)),
            Backing::Memory(m) => m.snapshot_action(action),
        }
    }

    /// Every completed write durable (at a clean stop). Blocks.
    pub fn sync(&self) -> Result<(), Errno> {
        match self {
            Backing::Local(b) => b
                .sync()
                .map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EIO))),
            Backing::Remote(c) => c.runtime().block_on(c.flush()),
            Backing::Memory(m) => m.sync(),
        }
    }
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.location())
    }
}
