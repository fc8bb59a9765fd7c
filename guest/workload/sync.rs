//! What vCPUs share and how: a spinlock (serial lines, a shared virtqueue) and a
//! write-once cell that vCPU 0 fills during set-up and the others read once it is
//! published.

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::arch::pause;
use crate::clock::Deadline;

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

    fn try_lock(&self) -> Option<SpinGuard<'_, T>> {
        (!self.locked.load(Ordering::Relaxed)
            && self
                .locked
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok())
        .then_some(SpinGuard { lock: self })
    }

    /// Takes the lock, however long that takes.
    pub fn lock(&self) -> SpinGuard<'_, T> {
        loop {
            if let Some(g) = self.try_lock() {
                return g;
            }
            pause();
        }
    }

    /// Takes the lock unless `deadline` passes first.
    pub fn lock_until(&self, deadline: &Deadline) -> Option<SpinGuard<'_, T>> {
        loop {
            if let Some(g) = self.try_lock() {
                return Some(g);
            }
            if deadline.passed() {
                return None;
            }
            pause();
        }
    }
}

/// Access to a locked value; unlocks on drop.
pub struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
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
