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

/// The waiters and the timer's wake-up, shared with the timer thread (which must
/// not keep the [`Signal`] alive: its drop is what ends the thread).
#[derive(Default)]
struct Waiters {
    list: Mutex<WaitList>,
    timer: Condvar,
}

#[derive(Default)]
struct WaitList {
    waiters: Vec<Waiter>,
    /// The signal is gone: the timer thread ends.
    closed: bool,
}

/// A version number futures wait on to change, optionally with a deadline. A timer
/// thread (started with the first deadline) wakes the waiters whose time is up; with
/// no deadline pending it sleeps until one comes (an idle volume wakes nobody).
pub struct Signal {
    version: AtomicU64,
    waiters: Arc<Waiters>,
    timer_started: std::sync::Once,
}

impl Signal {
    pub fn new() -> Arc<Signal> {
        Arc::new(Signal {
            version: AtomicU64::new(0),
            waiters: Arc::default(),
            timer_started: std::sync::Once::new(),
        })
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Something changed: wake every waiter.
    pub fn notify(&self) {
        self.version.fetch_add(1, Ordering::AcqRel);
        let waiters: Vec<Waiter> = std::mem::take(&mut self.waiters.list.lock().unwrap().waiters);
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

    fn start_timer(&self) {
        let w = self.waiters.clone();
        self.timer_started.call_once(|| {
            std::thread::Builder::new()
                .name("signal-timer".into())
                .spawn(move || timer(&w))
                .expect("spawn timer thread");
        });
    }
}

impl Drop for Signal {
    fn drop(&mut self) {
        self.waiters.list.lock().unwrap().closed = true;
        self.waiters.timer.notify_one();
    }
}

fn timer(w: &Waiters) {
    let mut list = w.list.lock().unwrap();
    while !list.closed {
        let now = Instant::now();
        let (due, rest): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut list.waiters)
            .into_iter()
            .partition(|x| x.deadline.is_some_and(|d| d <= now));
        list.waiters = rest;
        if !due.is_empty() {
            drop(list);
            wake_all(due.into_iter().map(|x| (x.waker, x.kick)).collect());
            list = w.list.lock().unwrap();
            continue;
        }
        // Until the next deadline; with none, until a waiter with one (or the drop).
        list = match list.waiters.iter().filter_map(|x| x.deadline).min() {
            Some(d) => {
                w.timer
                    .wait_timeout(list, d.saturating_duration_since(now))
                    .unwrap()
                    .0
            }
            None => w.timer.wait(list).unwrap(),
        };
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
        let mut w = s.waiters.list.lock().unwrap();
        // Re-check under the lock: `notify` bumps before it takes the list.
        if s.version() != self.since {
            return Poll::Ready(true);
        }
        w.waiters.push(Waiter {
            waker: cx.waker().clone(),
            kick: self.kick.clone(),
            deadline: self.deadline,
        });
        drop(w);
        if self.deadline.is_some() {
            s.start_timer();
            s.waiters.timer.notify_one();
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
    fn dropping_the_signal_ends_its_timer_thread() {
        let s = Signal::new();
        let _ = futures::executor::block_on(s.changed(
            s.version(),
            Some(Instant::now() + Duration::from_millis(1)),
            None,
        ));
        let inner = Arc::downgrade(&s.waiters);
        drop(s);
        // The timer thread holds the waiters until it ends.
        let t0 = Instant::now();
        while inner.strong_count() > 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "the timer thread outlived its signal"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
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
