//! What vCPUs share and how: a spinlock (serial lines, a shared virtqueue) and a
//! write-once cell that vCPU 0 fills during set-up and the others read once it is
//! published.
//!
//! Compiled into the freestanding guest and into the host library (core only), where
//! tests run it with threads.

use core::cell::UnsafeCell;
use core::fmt;
use core::mem::MaybeUninit;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use core::hint::spin_loop;

/// A test-and-test-and-set spinlock (interrupts are always off; nothing preempts a
/// holder but the host).
pub struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the lock gives one vCPU at a time access to the value.
unsafe impl<T: Send> Sync for SpinLock<T> {}

impl<T> SpinLock<T> {
    pub const fn new(value: T) -> Self {
        Self {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Takes the lock if it is free.
    pub fn try_lock(&self) -> Option<SpinGuard<'_, T>> {
        let free = !self.locked.load(Ordering::Relaxed)
            && self
                .locked
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok();
        // Build the guard only on success: a guard made and dropped on failure (as
        // `then_some` would) unlocks the lock another vCPU holds.
        if free {
            Some(SpinGuard { lock: self })
        } else {
            None
        }
    }

    /// Takes the lock, however long that takes.
    pub fn lock(&self) -> SpinGuard<'_, T> {
        loop {
            if let Some(g) = self.try_lock() {
                return g;
            }
            spin_loop();
        }
    }

    /// Takes the lock unless `give_up()` says so first.
    pub fn lock_until(&self, mut give_up: impl FnMut() -> bool) -> Option<SpinGuard<'_, T>> {
        loop {
            if let Some(g) = self.try_lock() {
                return Some(g);
            }
            if give_up() {
                return None;
            }
            spin_loop();
        }
    }
}

impl<T> fmt::Debug for SpinLock<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpinLock")
            .field("locked", &self.locked.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Access to a locked value; unlocks on drop.
pub struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> fmt::Debug for SpinGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpinGuard").finish_non_exhaustive()
    }
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock, and `&mut self` makes this the only access.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}

const EMPTY: u32 = 0;
const FILLING: u32 = 1;
const READY: u32 = 2;

/// A value written once, then only read, by any vCPU.
pub struct Published<T> {
    state: AtomicU32,
    value: UnsafeCell<MaybeUninit<T>>,
}

// SAFETY: the value is written once, before `state` becomes READY with release ordering,
// and only read (shared) after an acquire load sees READY.
unsafe impl<T: Sync> Sync for Published<T> {}

impl<T> fmt::Debug for Published<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Published")
            .field("ready", &(self.state.load(Ordering::Relaxed) == READY))
            .finish_non_exhaustive()
    }
}

impl<T> Default for Published<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Published<T> {
    pub const fn new() -> Self {
        Self {
            state: AtomicU32::new(EMPTY),
            value: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    /// Stores the value and publishes it; `None` if it was already set (or being set).
    pub fn publish(&self, value: T) -> Option<&T> {
        self.state
            .compare_exchange(EMPTY, FILLING, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        // SAFETY: the FILLING transition above gives this caller the only access; nobody
        // reads before READY.
        let v = unsafe { (*self.value.get()).write(value) };
        self.state.store(READY, Ordering::Release);
        Some(v)
    }

    /// The value, if published.
    pub fn get(&self) -> Option<&T> {
        if self.state.load(Ordering::Acquire) == READY {
            // SAFETY: READY (acquired) means the value was fully written and is never
            // written again.
            Some(unsafe { (*self.value.get()).assume_init_ref() })
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_try_lock_leaves_the_holder_holding() {
        let l = SpinLock::new(0u32);
        let held = l.lock();
        assert!(l.try_lock().is_none());
        assert!(
            l.try_lock().is_none(),
            "the failed attempt released the lock"
        );
        assert!(l.lock_until(|| true).is_none());
        drop(held);
        assert!(l.try_lock().is_some());
    }

    #[test]
    fn the_lock_excludes_other_threads() {
        let l = SpinLock::new(0u64);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..20_000 {
                        let mut g = l.lock();
                        // A read and a write apart: lost updates show without exclusion.
                        let v = *g;
                        std::hint::black_box(&v);
                        *g = v + 1;
                    }
                });
            }
        });
        assert_eq!(*l.lock(), 80_000);
    }

    #[test]
    fn published_once_and_seen_by_other_threads() {
        let p = Published::new();
        assert!(p.get().is_none());
        std::thread::scope(|s| {
            let reader = s.spawn(|| {
                loop {
                    if let Some(v) = p.get() {
                        return *v;
                    }
                    std::hint::spin_loop();
                }
            });
            assert_eq!(p.publish(7u32), Some(&7));
            assert_eq!(reader.join().expect("reader"), 7);
        });
        assert_eq!(p.publish(8), None, "published twice");
        assert_eq!(p.get(), Some(&7));
    }
}
