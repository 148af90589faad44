//! The range table: mutations of overlapping byte ranges reach every replica in the
//! same order. One table per volume, shared by all its queues (and, later, by the
//! rebuild copier, which locks the chunk it copies).
//!
//! Without it, two in-flight writes to overlapping ranges (fio jobs sharing a
//! region, guests with `cache=none`, some databases) could complete in one order on
//! one replica and in the other order on another, and reads would then change with
//! no write. A mutation is granted once no *earlier* in-flight (or waiting)
//! mutation overlaps it, so grants are first come, first served per range and
//! nothing starves; the common case — no overlap — is one lock, a scan of the
//! mutations in flight and a push.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use crate::wake::{wake_all, Kick};

#[derive(Default)]
pub struct RangeTable {
    inner: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    next: u64,
    /// In arrival order (so `seq` ascends).
    entries: Vec<Entry>,
}

struct Entry {
    seq: u64,
    start: u64,
    end: u64,
    /// Later entries waiting for this one to finish.
    waiters: Vec<(Waker, Option<Arc<dyn Kick>>)>,
}

impl Table {
    /// The first earlier entry overlapping entry `seq`, if any.
    fn blocker(&self, seq: u64, start: u64, end: u64) -> Option<usize> {
        self.entries
            .iter()
            .take_while(|e| e.seq < seq)
            .position(|e| e.start < end && start < e.end)
    }

    fn remove(&mut self, seq: u64) -> Vec<(Waker, Option<Arc<dyn Kick>>)> {
        match self.entries.iter().position(|e| e.seq == seq) {
            Some(i) => self.entries.remove(i).waiters,
            None => Vec::new(),
        }
    }
}

impl RangeTable {
    pub fn new() -> Arc<RangeTable> {
        Arc::new(RangeTable::default())
    }

    /// Lock `[start, start + len)` for a mutation; `kick` wakes the caller's queue
    /// thread when another thread releases what it waits for. Without an earlier
    /// overlapping entry the lock is granted here, in one pass over the table.
    pub fn lock<'a>(&'a self, start: u64, len: u64, kick: &'a Option<Arc<dyn Kick>>) -> Lock<'a> {
        let end = start.saturating_add(len.max(1));
        let mut t = self.inner.lock().unwrap();
        let seq = t.next;
        t.next += 1;
        let granted = t.blocker(seq, start, end).is_none();
        t.entries.push(Entry {
            seq,
            start,
            end,
            waiters: Vec::new(),
        });
        Lock {
            table: self,
            seq,
            start,
            end,
            kick,
            granted,
            done: false,
        }
    }

    /// Mutations in flight or waiting (for tests and status).
    pub fn in_flight(&self) -> usize {
        self.inner.lock().unwrap().entries.len()
    }
}

/// Resolves to a [`RangeGuard`] once no earlier overlapping mutation is in flight.
/// Dropping it before that gives up the place in line.
pub struct Lock<'a> {
    table: &'a RangeTable,
    seq: u64,
    start: u64,
    end: u64,
    kick: &'a Option<Arc<dyn Kick>>,
    granted: bool,
    done: bool,
}

impl<'a> Future for Lock<'a> {
    type Output = RangeGuard<'a>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RangeGuard<'a>> {
        if !self.granted {
            let mut t = self.table.inner.lock().unwrap();
            match t.blocker(self.seq, self.start, self.end) {
                None => {}
                Some(i) => {
                    t.entries[i]
                        .waiters
                        .push((cx.waker().clone(), self.kick.clone()));
                    return Poll::Pending;
                }
            }
        }
        self.done = true;
        Poll::Ready(RangeGuard {
            table: self.table,
            seq: self.seq,
        })
    }
}

impl Drop for Lock<'_> {
    fn drop(&mut self) {
        if !self.done {
            let waiters = self.table.inner.lock().unwrap().remove(self.seq);
            wake_all(waiters);
        }
    }
}

/// Holds a range; releasing it lets the next overlapping mutation go.
pub struct RangeGuard<'a> {
    table: &'a RangeTable,
    seq: u64,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let waiters = self.table.inner.lock().unwrap().remove(self.seq);
        if !waiters.is_empty() {
            wake_all(waiters);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn disjoint_ranges_do_not_wait() {
        let t = RangeTable::new();
        let a = t.lock(0, 4096, &None).now_or_never().expect("granted");
        let b = t
            .lock(4096, 4096, &None)
            .now_or_never()
            .expect("adjacent is disjoint");
        assert_eq!(t.in_flight(), 2);
        drop((a, b));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn an_overlapping_mutation_waits_for_the_earlier_one() {
        let t = RangeTable::new();
        let a = t.lock(0, 8192, &None).now_or_never().unwrap();
        let mut b = t.lock(4096, 4096, &None);
        assert!((&mut b).now_or_never().is_none(), "overlaps a");
        // A third, overlapping only b, waits behind b (first come, first served).
        let mut c = t.lock(8192 - 512, 1024, &None);
        assert!((&mut c).now_or_never().is_none());
        drop(a);
        let b = (&mut b).now_or_never().expect("a released");
        assert!((&mut c).now_or_never().is_none(), "still behind b");
        drop(b);
        assert!(c.now_or_never().is_some());
    }

    #[test]
    fn a_release_on_another_thread_wakes_the_waiter() {
        let t = RangeTable::new();
        let a = t.lock(0, 4096, &None).now_or_never().unwrap();
        let waiter = {
            let t = t.clone();
            std::thread::spawn(move || {
                drop(futures::executor::block_on(t.lock(0, 512, &None)));
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        drop(a);
        waiter.join().unwrap();
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn giving_up_a_place_in_line_lets_the_next_one_go() {
        let t = RangeTable::new();
        let a = t.lock(0, 4096, &None).now_or_never().unwrap();
        let mut b = t.lock(0, 4096, &None);
        assert!((&mut b).now_or_never().is_none());
        let mut c = t.lock(0, 4096, &None);
        assert!((&mut c).now_or_never().is_none());
        drop(b);
        drop(a);
        assert!(c.now_or_never().is_some());
    }
}
