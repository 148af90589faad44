//! Async locks by key, for futures on different threads (each ublk queue runs its
//! own executor): a grain's lock, the commit lock. Waiters are woken when the key
//! is released and race for it again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::task::{Poll, Waker};

#[derive(Default)]
pub struct KeyLocks {
    held: Mutex<HashMap<u64, Vec<Waker>>>,
}

pub struct KeyGuard<'a> {
    locks: &'a KeyLocks,
    key: u64,
}

impl KeyLocks {
    pub async fn lock(&self, key: u64) -> KeyGuard<'_> {
        std::future::poll_fn(|cx| {
            let mut held = self.held.lock().unwrap();
            match held.get_mut(&key) {
                Some(waiters) => {
                    if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                        waiters.push(cx.waker().clone());
                    }
                    Poll::Pending
                }
                None => {
                    held.insert(key, Vec::new());
                    Poll::Ready(())
                }
            }
        })
        .await;
        KeyGuard { locks: self, key }
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        let waiters = self.locks.held.lock().unwrap().remove(&self.key);
        for w in waiters.into_iter().flatten() {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Threads each running their own executor take one key in turn: never two
    /// holders at once, and every waiter gets it.
    #[test]
    fn one_holder_per_key_across_threads() {
        let locks = Arc::new(KeyLocks::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let total = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (locks, inside, total) = (locks.clone(), inside.clone(), total.clone());
                std::thread::spawn(move || {
                    futures::executor::block_on(async {
                        for _ in 0..200 {
                            let _g = locks.lock(7).await;
                            assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                            std::thread::yield_now();
                            inside.fetch_sub(1, Ordering::SeqCst);
                            total.fetch_add(1, Ordering::SeqCst);
                        }
                    })
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(total.load(Ordering::SeqCst), 800);
        let _other = futures::executor::block_on(locks.lock(8));
        let _again = futures::executor::block_on(locks.lock(7));
    }
}
