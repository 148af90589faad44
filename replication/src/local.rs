//! A local replica: a store of the `snapshot` crate on this node, driven through
//! the queue's io_uring. This module makes it a [`Replica`].

pub use snapshot::flat::{AlignedBuf, BackingKind, Create, LocalBacking};
pub use snapshot::replica::LocalReplica;

use crate::ids::{ByteLen, ByteOffset};
use crate::replica::{ExtentsFuture, IoFuture, Replica};
use crate::uring::Uring;
use wire::SnapshotUuid;

impl<U: Uring> Replica for LocalReplica<U> {
    fn location(&self) -> &str {
        LocalReplica::location(self)
    }

    fn read<'a>(&'a self, offset: ByteOffset, buf: &'a mut [u8]) -> IoFuture<'a> {
        Box::pin(LocalReplica::read(self, offset, buf))
    }

    fn write<'a>(&'a self, offset: ByteOffset, buf: &'a [u8], fua: bool) -> IoFuture<'a> {
        Box::pin(LocalReplica::write(self, offset, buf, fua))
    }

    fn flush(&self) -> IoFuture<'_> {
        Box::pin(LocalReplica::flush(self))
    }

    fn discard(&self, offset: ByteOffset, len: ByteLen) -> IoFuture<'_> {
        Box::pin(LocalReplica::discard(self, offset, len))
    }

    fn write_zeroes(&self, offset: ByteOffset, len: ByteLen, no_unmap: bool) -> IoFuture<'_> {
        Box::pin(LocalReplica::write_zeroes(self, offset, len, no_unmap))
    }

    fn data_extents(&self, offset: ByteOffset, len: ByteLen) -> ExtentsFuture<'_> {
        Box::pin(std::future::ready(Ok(LocalReplica::data_extents(
            self, offset, len,
        ))))
    }

    fn read_snapshot<'a>(
        &'a self,
        of: SnapshotUuid,
        offset: ByteOffset,
        buf: &'a mut [u8],
    ) -> IoFuture<'a> {
        Box::pin(LocalReplica::read_snapshot(self, of, offset, buf))
    }

    fn diff_extents(
        &self,
        of: Option<SnapshotUuid>,
        since: Option<SnapshotUuid>,
        offset: ByteOffset,
        len: ByteLen,
    ) -> ExtentsFuture<'_> {
        Box::pin(std::future::ready(LocalReplica::diff_extents(
            self, of, since, offset, len,
        )))
    }

    fn checksum_snapshot<'a>(
        &'a self,
        of: SnapshotUuid,
        offset: ByteOffset,
        len: ByteLen,
        out: &'a mut [u8; 4],
    ) -> IoFuture<'a> {
        Box::pin(async move {
            *out = LocalReplica::checksum_of(self, Some(of), offset, len).await?;
            Ok(())
        })
    }

    fn checksum<'a>(
        &'a self,
        offset: ByteOffset,
        len: ByteLen,
        out: &'a mut [u8; 4],
    ) -> IoFuture<'a> {
        Box::pin(async move {
            *out = LocalReplica::checksum(self, offset, len).await?;
            Ok(())
        })
    }
}
