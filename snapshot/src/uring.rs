//! Who executes an io_uring SQE for a replica.
//!
//! On a ublk queue thread the frontend implements [`Uring`] over the queue's own ring,
//! so replica I/O and ublk commands share one `io_uring_enter`. Tests and tools use
//! [`BlockingUring`], a private ring that completes each SQE before returning.

use std::cell::RefCell;
use std::future::Future;

use io_uring::{squeue, IoUring};

use crate::error::StoreError;

/// Submits one SQE; the future resolves to the CQE's `res`.
///
/// Safety contract for callers: buffers referenced by the SQE must stay valid until
/// the future resolves, and the future must be polled to completion (never dropped
/// while the operation is in flight).
pub trait Uring {
    fn submit(&self, sqe: squeue::Entry) -> impl Future<Output = i32>;
}

/// A private ring that submits and waits synchronously. Not for the data path.
pub struct BlockingUring {
    ring: RefCell<IoUring>,
}

impl BlockingUring {
    pub fn new() -> Result<BlockingUring, StoreError> {
        Ok(BlockingUring {
            ring: RefCell::new(IoUring::new(8).map_err(StoreError::Uring)?),
        })
    }
}

impl Uring for BlockingUring {
    fn submit(&self, sqe: squeue::Entry) -> impl Future<Output = i32> {
        let mut ring = self.ring.borrow_mut();
        // SAFETY: the caller keeps the SQE's buffers alive until this returns, and
        // we wait for the completion before returning.
        let res = unsafe {
            ring.submission()
                .push(&sqe.user_data(1))
                .expect("submission queue has room: one SQE at a time");
            match ring.submit_and_wait(1) {
                Ok(_) => ring
                    .completion()
                    .next()
                    .map(|c| c.result())
                    .unwrap_or(-libc::EIO),
                Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
            }
        };
        std::future::ready(res)
    }
}
