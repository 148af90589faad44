//! io_uring driven from a current-thread tokio runtime: the ring's fd becomes
//! readable when completions are queued; a driver task reaps them and wakes the
//! submitters. Lets the server reuse [`replication::local::LocalReplica`] unchanged.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::IoUring;
use replication::uring::Uring;
use replication::ReplicationError;
use tokio::io::unix::AsyncFd;

/// io_uring driven from a current-thread tokio runtime (see the module docs).
#[derive(Clone)]
pub struct TokioUring {
    inner: Rc<UringInner>,
}

struct UringInner {
    /// The registration owns the ring, so its fd stays valid while registered.
    ring: AsyncFd<RingCell>,
    slots: RefCell<HashMap<u64, Slot>>,
    next: std::cell::Cell<u64>,
}

struct RingCell(RefCell<IoUring>);

impl AsRawFd for RingCell {
    fn as_raw_fd(&self) -> RawFd {
        self.0.borrow().as_raw_fd()
    }
}

#[derive(Default)]
struct Slot {
    result: Option<i32>,
    waker: Option<Waker>,
}

impl TokioUring {
    /// Must be called inside a `LocalSet`: it spawns the reaper task there (which
    /// lives as long as the `LocalSet`).
    pub fn new() -> Result<TokioUring, ReplicationError> {
        let ring = IoUring::new(1024).map_err(snapshot::StoreError::Uring)?;
        // SAFETY: `RingCell` owns the ring, so the fd is valid until the
        // registration is dropped with it.
        let ring = unsafe {
            AsyncFd::register_with_interest(
                RingCell(RefCell::new(ring)),
                tokio::io::Interest::READABLE,
            )
        }
        .map_err(|e| snapshot::StoreError::Uring(e.into()))?;
        let inner = Rc::new(UringInner {
            ring,
            slots: RefCell::new(HashMap::new()),
            next: std::cell::Cell::new(1),
        });
        let reaper = inner.clone();
        tokio::task::spawn_local(async move {
            loop {
                let Ok(mut guard) = reaper.ring.readable().await else {
                    return;
                };
                reaper.reap();
                guard.clear_ready();
                // A completion that raced with clear_ready is seen on this pass.
                reaper.reap();
            }
        });
        Ok(TokioUring { inner })
    }
}

impl UringInner {
    fn reap(&self) {
        let mut ring = self.ring.get_ref().0.borrow_mut();
        // An SQE whose submit failed earlier is still queued: push it in now.
        if !ring.submission().is_empty() {
            let _ = ring.submit();
        }
        let mut slots = self.slots.borrow_mut();
        for cqe in ring.completion() {
            if let Some(s) = slots.get_mut(&cqe.user_data()) {
                s.result = Some(cqe.result());
                if let Some(w) = s.waker.take() {
                    w.wake();
                }
            }
        }
    }
}

struct OpFuture {
    inner: Rc<UringInner>,
    key: u64,
}

impl Future for OpFuture {
    type Output = i32;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let mut slots = self.inner.slots.borrow_mut();
        let slot = slots.get_mut(&self.key).expect("slot of a pending op");
        match slot.result {
            Some(r) => {
                slots.remove(&self.key);
                Poll::Ready(r)
            }
            None => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Uring for TokioUring {
    fn submit(&self, sqe: io_uring::squeue::Entry) -> impl Future<Output = i32> {
        let key = self.inner.next.get();
        self.inner.next.set(key + 1);
        self.inner.slots.borrow_mut().insert(key, Slot::default());
        let mut ring = self.inner.ring.get_ref().0.borrow_mut();
        let sqe = sqe.user_data(key);
        // SAFETY: the caller keeps the SQE's buffers alive until the future resolves
        // (Uring's contract), and connections wait for their in-flight I/O.
        unsafe {
            while ring.submission().push(&sqe).is_err() {
                let _ = ring.submit();
            }
        }
        // The SQE is queued either way; a failed submit is retried by the next one
        // (its buffers must stay valid, so it is never reported as done here).
        while let Err(e) = ring.submit() {
            if !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) {
                tracing::error!(error = %e, "io_uring submit failed");
                break;
            }
        }
        OpFuture {
            inner: self.inner.clone(),
            key,
        }
    }
}
