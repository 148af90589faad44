//! The replica abstraction. Every kind of replica (local file or device, a remote
//! replica server, a copy-on-write snapshot store later) implements [`Replica`];
//! the nexus sees nothing else.
//!
//! A `Replica` value is a *per-queue handle*: it runs on one ublk queue thread and
//! may hold that thread's io_uring, so it is not `Send`. State shared between queues
//! (open files, connections) sits behind an `Arc` inside the implementation.

use std::future::Future;
use std::pin::Pin;

use crate::error::Errno;
use crate::ids::{ByteLen, ByteOffset};
pub use wire::frame::{Extent, MAX_EXTENTS};
use wire::SnapshotUuid;

pub type IoResult = Result<(), Errno>;
/// **Contract: poll every `IoFuture` to completion; never drop one that is pending.**
/// The kernel (io_uring) or another thread (remote replicas) may still read or write
/// the buffer the future borrows until it resolves, and the type system cannot see
/// that borrow once the future is boxed. The nexus awaits every future it creates.
/// Boxed so `dyn Replica` works across replica kinds; one small allocation per op.
pub type IoFuture<'a> = Pin<Box<dyn Future<Output = IoResult> + 'a>>;

/// Which parts of a range may hold data: `Ok(None)` when the replica cannot tell.
pub type ExtentsResult = Result<Option<Vec<Extent>>, Errno>;
/// **Contract: as for [`IoFuture`], poll every `ExtentsFuture` to completion.**
pub type ExtentsFuture<'a> = Pin<Box<dyn Future<Output = ExtentsResult> + 'a>>;

pub trait Replica {
    /// Human-readable location (path, address) for logs and the CLI.
    fn location(&self) -> &str;
    /// Remote replicas cost a network round trip: reads prefer local ones.
    fn is_remote(&self) -> bool {
        false
    }
    /// Fill `buf` from `offset`. The whole buffer or an error: never short.
    fn read<'a>(&'a self, offset: ByteOffset, buf: &'a mut [u8]) -> IoFuture<'a>;
    /// Write all of `buf` at `offset`; with `fua`, durable before completion.
    fn write<'a>(&'a self, offset: ByteOffset, buf: &'a [u8], fua: bool) -> IoFuture<'a>;
    /// Make every completed write durable.
    fn flush(&self) -> IoFuture<'_>;
    /// Advisory: the range's contents become unspecified. Unsupported is not an error.
    fn discard(&self, offset: ByteOffset, len: ByteLen) -> IoFuture<'_>;
    /// The range reads back as zeroes afterwards.
    fn write_zeroes(&self, offset: ByteOffset, len: ByteLen, no_unmap: bool) -> IoFuture<'_>;
    /// The parts of `[offset, offset + len)` that may hold data: sorted, disjoint
    /// extents inside the range, at most [`MAX_EXTENTS`] (past that the last one
    /// runs to the range's end); the rest certainly reads back as zeroes. So
    /// `Some(vec![])` is a hole, which a rebuild zeroes on the target instead of
    /// copying. `None`: unknown (the default, block devices); a remote replica asks
    /// its server. The answer is stale as soon as a write reaches the range: ask
    /// under the range lock, and never keep it past the lock.
    fn data_extents(&self, _offset: ByteOffset, _len: ByteLen) -> ExtentsFuture<'_> {
        Box::pin(std::future::ready(Ok(None)))
    }
    /// Fill `buf` from snapshot `of` at `offset` (rebuild, verify, export).
    /// `ENOENT`: this replica lacks that snapshot; `EOPNOTSUPP`: it keeps none.
    fn read_snapshot<'a>(
        &'a self,
        _of: SnapshotUuid,
        _offset: ByteOffset,
        _buf: &'a mut [u8],
    ) -> IoFuture<'a> {
        Box::pin(std::future::ready(Err(Errno(libc::EOPNOTSUPP))))
    }
    /// Where view `of` (a snapshot; `None`: the head) may differ from view
    /// `since` (an older snapshot; `None`: zeroes), as [`Replica::data_extents`]
    /// reports data: a rebuild copies a layer through it. Errors as for
    /// [`Replica::read_snapshot`].
    fn diff_extents(
        &self,
        of: Option<SnapshotUuid>,
        since: Option<SnapshotUuid>,
        offset: ByteOffset,
        len: ByteLen,
    ) -> ExtentsFuture<'_> {
        if of.is_none() && since.is_none() {
            return self.data_extents(offset, len);
        }
        Box::pin(std::future::ready(Err(Errno(libc::EOPNOTSUPP))))
    }
    /// [`Replica::checksum`] of snapshot `of`. This default reads it here.
    fn checksum_snapshot<'a>(
        &'a self,
        of: SnapshotUuid,
        offset: ByteOffset,
        len: ByteLen,
        out: &'a mut [u8; 4],
    ) -> IoFuture<'a> {
        Box::pin(async move {
            let mut buf = vec![0u8; len.0.min(CHECKSUM_CHUNK) as usize];
            *out = checksum_through(self, Some(of), &mut buf, offset, len).await?;
            Ok(())
        })
    }
    /// CRC32C of `[offset, offset + len)` into `out`, computed where the data is: a
    /// remote replica asks its server (the data does not cross the network). This
    /// default reads the range here, 1 MiB at a time.
    fn checksum<'a>(
        &'a self,
        offset: ByteOffset,
        len: ByteLen,
        out: &'a mut [u8; 4],
    ) -> IoFuture<'a> {
        Box::pin(async move {
            let mut buf = vec![0u8; len.0.min(CHECKSUM_CHUNK) as usize];
            *out = checksum_through(self, None, &mut buf, offset, len).await?;
            Ok(())
        })
    }
}

/// CRC32C (little-endian bytes) of `[offset, offset + len)` of `r`, read through
/// `buf` (at most its length at a time; of snapshot `of`, or the head): the loop
/// of every [`Replica::checksum`]
/// that reads the data itself, whatever buffer its reads need.
pub async fn checksum_through<R: Replica + ?Sized>(
    r: &R,
    of: Option<SnapshotUuid>,
    buf: &mut [u8],
    offset: ByteOffset,
    len: ByteLen,
) -> Result<[u8; 4], Errno> {
    let mut crc = 0u32;
    let mut at = 0;
    while at < len.0 {
        let n = (len.0 - at).min(buf.len() as u64) as usize;
        let at_off = ByteOffset(offset.0 + at);
        match of {
            Some(u) => r.read_snapshot(u, at_off, &mut buf[..n]).await?,
            None => r.read(at_off, &mut buf[..n]).await?,
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        at += n as u64;
    }
    Ok(crc.to_le_bytes())
}

/// The piece of a range read at once to checksum it.
pub const CHECKSUM_CHUNK: u64 = 1 << 20;
