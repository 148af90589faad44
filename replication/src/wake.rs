//! Waking futures across threads. A ublk queue thread sleeps in `io_uring_enter`,
//! so waking one of its tasks from another thread takes the task's waker *and* a
//! [`Kick`] of the thread's eventfd (which its ring polls); other executors need
//! only the waker.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

/// Wakes the thread that waits for a completion (a ublk queue thread's eventfd).
pub trait Kick: Send + Sync {
    fn kick(&self);
}

/// Wake every waker, then kick each distinct queue once.
pub fn wake_all(waiters: Vec<(Waker, Option<Arc<dyn Kick>>)>) {
    let mut kicks: Vec<Arc<dyn Kick>> = Vec::new();
    for (w, k) in waiters {
        w.wake();
        if let Some(k) = k {
            if !kicks.iter().any(|o| Arc::ptr_eq(o, &k)) {
                kicks.push(k);
            }
        }
    }
    for k in kicks {
        k.kick();
    }
}

struct Waiter {
    waker: Waker,
    kick: Option<Arc<dyn Kick>>,
    deadline: Option<Instant>,
}

/// A version number futures wait on to change, optionally with a deadline. A timer
/// thread (started with the first deadline) wakes the waiters whose time is up.
pub struct Signal {
    version: AtomicU64,
    waiters: Mutex<Vec<Waiter>>,
    timer: Condvar,
    timer_started: std::sync::Once,
}

impl Signal {
    pub fn new() -> Arc<Signal> {
        Arc::new(Signal {
            version: AtomicU64::new(0),
            waiters: Mutex::new(Vec::new()),
            timer: Condvar::new(),
            timer_started: std::sync::Once::new(),
        })
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Something changed: wake every waiter.
    pub fn notify(&self) {
        self.version.fetch_add(1, Ordering::AcqRel);
        let waiters: Vec<Waiter> = std::mem::take(&mut *self.waiters.lock().unwrap());
        wake_all(waiters.into_iter().map(|w| (w.waker, w.kick)).collect());
    }

    /// Resolves once the version differs from `since`, or (with `false`) once
    /// `deadline` passed.
    pub fn changed(
        self: &Arc<Self>,
        since: u64,
        deadline: Option<Instant>,
        kick: Option<Arc<dyn Kick>>,
    ) -> Changed {
        Changed {
            signal: self.clone(),
            since,
            deadline,
            kick,
        }
    }

    fn start_timer(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        self.timer_started.call_once(|| {
            std::thread::Builder::new()
                .name("signal-timer".into())
                .spawn(move || timer(me))
                .expect("spawn timer thread");
        });
    }
}

fn timer(me: std::sync::Weak<Signal>) {
    while let Some(s) = me.upgrade() {
        let mut w = s.waiters.lock().unwrap();
        let now = Instant::now();
        let (due, rest): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut *w)
            .into_iter()
            .partition(|x| x.deadline.is_some_and(|d| d <= now));
        *w = rest;
        let next = w.iter().filter_map(|x| x.deadline).min();
        if !due.is_empty() {
            drop(w);
            wake_all(due.into_iter().map(|x| (x.waker, x.kick)).collect());
            continue;
        }
        // Wake up for the next deadline, or now and then to notice the signal went.
        let wait = next
            .map(|d| d.saturating_duration_since(now))
            .unwrap_or(std::time::Duration::from_millis(500));
        let _ = s.timer.wait_timeout(w, wait).unwrap();
    }
}

pub struct Changed {
    signal: Arc<Signal>,
    since: u64,
    deadline: Option<Instant>,
    kick: Option<Arc<dyn Kick>>,
}

impl Future for Changed {
    /// `true`: the version changed; `false`: the deadline passed first.
    type Output = bool;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let s = &self.signal;
        if s.version() != self.since {
            return Poll::Ready(true);
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Poll::Ready(false);
        }
        let mut w = s.waiters.lock().unwrap();
        // Re-check under the lock: `notify` bumps before it takes the list.
        if s.version() != self.since {
            return Poll::Ready(true);
        }
        w.push(Waiter {
            waker: cx.waker().clone(),
            kick: self.kick.clone(),
            deadline: self.deadline,
        });
        drop(w);
        if self.deadline.is_some() {
            s.start_timer();
            s.timer.notify_one();
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_notify_from_another_thread_wakes_the_waiter() {
        let s = Signal::new();
        let v = s.version();
        let s2 = s.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            s2.notify();
        });
        assert!(futures::executor::block_on(s.changed(v, None, None)));
        t.join().unwrap();
    }

    #[test]
    fn a_deadline_wakes_the_waiter_without_a_notify() {
        let s = Signal::new();
        let t0 = Instant::now();
        let changed = futures::executor::block_on(s.changed(
            s.version(),
            Some(t0 + Duration::from_millis(100)),
            None,
        ));
        assert!(!changed);
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(100) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
    }
}
