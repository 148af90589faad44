//! Mapping a raw ublk I/O descriptor to a checked [`BlockRequest`].
//!
//! The kernel already validates requests against the device size, but the daemon
//! re-checks: a bad offset must never turn into a write outside the volume.

use crate::error::ReplicationError;
use crate::ids::{ByteLen, ByteOffset};

/// ublk operation codes (`UBLK_IO_OP_*` in the kernel's `ublk_cmd.h`).
pub mod op {
    pub const READ: u32 = 0;
    pub const WRITE: u32 = 1;
    pub const FLUSH: u32 = 2;
    pub const DISCARD: u32 = 3;
    pub const WRITE_SAME: u32 = 4;
    pub const WRITE_ZEROES: u32 = 5;
}

/// ublk I/O flags (`UBLK_IO_F_*`).
pub mod flag {
    pub const FUA: u32 = 1 << 13;
    pub const NOUNMAP: u32 = 1 << 15;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockRequest {
    Read {
        offset: ByteOffset,
        len: ByteLen,
    },
    Write {
        offset: ByteOffset,
        len: ByteLen,
        /// Force unit access: on stable storage before completion.
        fua: bool,
    },
    /// Make every completed write durable. Carries no range.
    Flush,
    Discard {
        offset: ByteOffset,
        len: ByteLen,
    },
    WriteZeroes {
        offset: ByteOffset,
        len: ByteLen,
        /// The caller wants the blocks to stay allocated (no hole punching).
        no_unmap: bool,
    },
}

/// What a volume accepts; the request mapping checks against it.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub size: u64,
    pub block_size: u32,
    /// Largest READ/WRITE payload: the ublk I/O buffer.
    pub max_io_bytes: u32,
}

impl BlockRequest {
    /// Decode `op_flags` / `start_sector` / `nr_sectors` from a `ublksrv_io_desc`.
    pub fn from_ublk(
        op_flags: u32,
        start_sector: u64,
        nr_sectors: u32,
        geo: &Geometry,
    ) -> Result<BlockRequest, ReplicationError> {
        let opcode = op_flags & 0xff;
        if opcode == op::FLUSH {
            return Ok(BlockRequest::Flush);
        }
        let offset = start_sector
            .checked_mul(512)
            .ok_or(ReplicationError::OutOfRange {
                offset: u64::MAX,
                len: nr_sectors as u64 * 512,
                size: geo.size,
            })?;
        let len = nr_sectors as u64 * 512;
        Self::check_range(offset, len, geo)?;
        let (offset, blen) = (ByteOffset(offset), ByteLen(len));
        match opcode {
            op::READ | op::WRITE => {
                if len > geo.max_io_bytes as u64 {
                    return Err(ReplicationError::TooLarge {
                        len,
                        max: geo.max_io_bytes as u64,
                    });
                }
                if opcode == op::READ {
                    Ok(BlockRequest::Read { offset, len: blen })
                } else {
                    Ok(BlockRequest::Write {
                        offset,
                        len: blen,
                        fua: op_flags & flag::FUA != 0,
                    })
                }
            }
            op::DISCARD => Ok(BlockRequest::Discard { offset, len: blen }),
            op::WRITE_ZEROES => Ok(BlockRequest::WriteZeroes {
                offset,
                len: blen,
                no_unmap: op_flags & flag::NOUNMAP != 0,
            }),
            other => Err(ReplicationError::UnsupportedOp(other)),
        }
    }

    fn check_range(offset: u64, len: u64, geo: &Geometry) -> Result<(), ReplicationError> {
        let bs = geo.block_size as u64;
        if len == 0 || !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(ReplicationError::Unaligned {
                offset,
                len,
                align: geo.block_size,
            });
        }
        match offset.checked_add(len) {
            Some(end) if end <= geo.size => Ok(()),
            _ => Err(ReplicationError::OutOfRange {
                offset,
                len,
                size: geo.size,
            }),
        }
    }

    /// Whether the request changes data (and so must reach every healthy replica).
    pub fn is_mutation(&self) -> bool {
        !matches!(self, BlockRequest::Read { .. })
    }

    /// The byte range a request covers (FLUSH covers none).
    pub fn range(&self) -> Option<(ByteOffset, ByteLen)> {
        match *self {
            BlockRequest::Flush => None,
            BlockRequest::Read { offset, len }
            | BlockRequest::Write { offset, len, .. }
            | BlockRequest::Discard { offset, len }
            | BlockRequest::WriteZeroes { offset, len, .. } => Some((offset, len)),
        }
    }

    /// Payload bytes moved between the kernel and the daemon's buffer.
    pub fn payload_len(&self) -> usize {
        match self {
            BlockRequest::Read { len, .. } | BlockRequest::Write { len, .. } => len.0 as usize,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEO: Geometry = Geometry {
        size: 1 << 20,
        block_size: 4096,
        max_io_bytes: 512 * 1024,
    };

    #[test]
    fn read_and_write_map_sectors_to_bytes() {
        assert_eq!(
            BlockRequest::from_ublk(op::READ, 8, 8, &GEO).unwrap(),
            BlockRequest::Read {
                offset: ByteOffset(4096),
                len: ByteLen(4096)
            }
        );
        assert_eq!(
            BlockRequest::from_ublk(op::WRITE | flag::FUA, 16, 16, &GEO).unwrap(),
            BlockRequest::Write {
                offset: ByteOffset(8192),
                len: ByteLen(8192),
                fua: true
            }
        );
    }

    #[test]
    fn flush_ignores_range() {
        assert_eq!(
            BlockRequest::from_ublk(op::FLUSH, u64::MAX, 0, &GEO).unwrap(),
            BlockRequest::Flush
        );
    }

    #[test]
    fn write_zeroes_keeps_nounmap() {
        assert_eq!(
            BlockRequest::from_ublk(op::WRITE_ZEROES | flag::NOUNMAP, 0, 2048, &GEO).unwrap(),
            BlockRequest::WriteZeroes {
                offset: ByteOffset(0),
                len: ByteLen(1 << 20),
                no_unmap: true
            }
        );
    }

    #[test]
    fn past_end_is_rejected() {
        let end_sector = GEO.size / 512;
        let err = BlockRequest::from_ublk(op::WRITE, end_sector - 8, 16, &GEO).unwrap_err();
        assert!(matches!(err, ReplicationError::OutOfRange { .. }), "{err}");
        // Overflowing sector arithmetic is out of range, not a wrap-around.
        let err = BlockRequest::from_ublk(op::WRITE, u64::MAX / 256, 8, &GEO).unwrap_err();
        assert!(matches!(err, ReplicationError::OutOfRange { .. }), "{err}");
    }

    #[test]
    fn misaligned_and_empty_are_rejected() {
        let err = BlockRequest::from_ublk(op::WRITE, 1, 8, &GEO).unwrap_err();
        assert!(matches!(err, ReplicationError::Unaligned { .. }), "{err}");
        let err = BlockRequest::from_ublk(op::READ, 0, 0, &GEO).unwrap_err();
        assert!(matches!(err, ReplicationError::Unaligned { .. }), "{err}");
    }

    #[test]
    fn oversized_payload_and_unknown_ops_are_rejected() {
        let err = BlockRequest::from_ublk(op::READ, 0, 2048, &GEO).unwrap_err();
        assert!(matches!(err, ReplicationError::TooLarge { .. }), "{err}");
        let err = BlockRequest::from_ublk(op::WRITE_SAME, 0, 8, &GEO).unwrap_err();
        assert!(matches!(err, ReplicationError::UnsupportedOp(4)), "{err}");
    }

    #[test]
    fn no_input_maps_outside_the_volume() {
        // Random descriptors, biased towards the edges: every accepted request lies
        // inside the volume, is block-aligned and fits the buffer.
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let sectors = GEO.size / 512;
        for _ in 0..200_000 {
            let op = (next() % 8) as u32 | (next() as u32 & (flag::FUA | flag::NOUNMAP));
            let start = match next() % 4 {
                0 => next(),
                1 => sectors - next() % 64,
                _ => next() % (sectors + 64),
            };
            let nr = match next() % 3 {
                0 => next() as u32,
                _ => (next() % 4096) as u32,
            };
            let Ok(req) = BlockRequest::from_ublk(op, start, nr, &GEO) else {
                continue;
            };
            match req {
                BlockRequest::Flush => {}
                BlockRequest::Read { offset, len }
                | BlockRequest::Write { offset, len, .. }
                | BlockRequest::Discard { offset, len }
                | BlockRequest::WriteZeroes { offset, len, .. } => {
                    assert!(len.0 > 0 && offset.0 + len.0 <= GEO.size, "{req:?}");
                    assert!(offset.0 % 4096 == 0 && len.0 % 4096 == 0, "{req:?}");
                    assert!(req.payload_len() <= GEO.max_io_bytes as usize, "{req:?}");
                }
            }
        }
    }
}
