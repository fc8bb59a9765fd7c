//! The workload guest (`docs/guest-abi.md`), freestanding: every vCPU enters
//! `workload_main` at CPL3 (see `entry.rs`). vCPU 0 reads the start info and command
//! line, sets up the devices and lays out RAM, then publishes the result; every vCPU runs
//! the program on its share; vCPU 0 waits for all of them and prints the final line.
//!
//! Built by `build.rs` with rustc for `x86_64-unknown-linux-gnu`, `#![no_std]`, no
//! start files, its own linker script. `abi`, `cmdline`, `pattern` and `sync` are the same
//! files as the host library's.

#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
// Errors are a line of text (`console::Fail`) since there is no allocator to box them in;
// they are only built on the way to the final FAIL line.
#![allow(clippy::result_large_err)]

// The host library's modules: the host uses a few items the guest does not.
#[allow(dead_code)]
#[path = "../src/abi.rs"]
mod abi;
#[allow(dead_code)]
#[path = "../src/cmdline.rs"]
mod cmdline;
#[allow(dead_code)]
#[path = "../src/pattern.rs"]
mod pattern;
#[path = "../src/sync.rs"]
mod sync;

mod arch;
mod blk;
mod boot;
mod clock;
mod console;
mod entry;
mod mem;
mod programs;
mod setup;
mod virtio;

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use crate::abi::MAX_VCPUS;
use crate::clock::Deadline;
use crate::console::{Fail, end, say};
use crate::programs::Stats;
use crate::sync::{Published, SpinLock};

/// The set-up, published by vCPU 0.
static SETUP: Published<setup::Setup> = Published::new();
/// Set when vCPU 0's set-up failed (it reports that itself).
static SETUP_FAILED: AtomicBool = AtomicBool::new(false);
/// Bit i: vCPU i has entered.
static STARTED: AtomicU32 = AtomicU32::new(0);
/// vCPUs that finished their program.
static FINISHED: AtomicUsize = AtomicUsize::new(0);
/// Each vCPU's result.
static RESULTS: [SpinLock<Option<Result<Stats, Fail>>>; MAX_VCPUS] =
    [const { SpinLock::new(None) }; MAX_VCPUS];
/// The first vCPU that failed (its reason goes into the final line).
static FIRST_FAILURE: AtomicUsize = AtomicUsize::new(usize::MAX);

/// How long vCPUs wait for each other to start or for vCPU 0's set-up.
const START_TIMEOUT_MS: u64 = 60_000;

/// Whether another vCPU failed (programs stop early then).
pub fn aborted() -> bool {
    FIRST_FAILURE.load(Ordering::Relaxed) != usize::MAX
}

#[unsafe(no_mangle)]
extern "C" fn workload_main(index: u64, start_info: u64, count: u64) -> ! {
    let vcpu = index as usize; // below MAX_VCPUS: entry.rs gives no stack otherwise
    STARTED.fetch_or(1 << vcpu, Ordering::AcqRel);
    if vcpu == 0 {
        vcpu0(start_info, count)
    } else {
        other_vcpu(vcpu)
    }
}

fn vcpu0(start_info: u64, count: u64) -> ! {
    let vcpus = match usize::try_from(count) {
        Ok(n @ 1..=MAX_VCPUS) => n,
        _ => end(
            false,
            format_args!("vCPU count {count} (rdx) is not 1 to {MAX_VCPUS}"),
        ),
    };
    console::set_vcpus(vcpus);
    let setup = match setup::run(start_info, vcpus) {
        Ok(s) => s,
        Err(Fail(why)) => {
            SETUP_FAILED.store(true, Ordering::Release);
            end(false, format_args!("{why}"))
        }
    };
    let Some(setup) = SETUP.publish(setup) else {
        end(false, format_args!("set-up published twice"))
    };
    let all = (1u32 << vcpus) - 1;
    let deadline = Deadline::after_ms(START_TIMEOUT_MS);
    while STARTED.load(Ordering::Acquire) & all != all {
        if deadline.passed() {
            let missing = all & !STARTED.load(Ordering::Acquire);
            end(
                false,
                format_args!(
                    "vCPU {} did not start within {} s (started mask {:#x} of {all:#x})",
                    missing.trailing_zeros(),
                    START_TIMEOUT_MS / 1000,
                    all & !missing
                ),
            );
        }
        arch::pause();
    }
    run_program(0, setup);
    while FINISHED.load(Ordering::Acquire) < vcpus {
        arch::pause();
    }
    let first = FIRST_FAILURE.load(Ordering::Acquire);
    if first != usize::MAX {
        let r = RESULTS[first].lock();
        let why = match &*r {
            Some(Err(Fail(why))) => why.as_str(),
            _ => "no reason recorded",
        };
        if vcpus > 1 {
            end(false, format_args!("vCPU {first}: {why}"))
        }
        end(false, format_args!("{why}"))
    }
    let mut total = Stats::default();
    for r in RESULTS.iter().take(vcpus) {
        if let Some(Ok(s)) = &*r.lock() {
            total.add(s);
        }
    }
    end(true, format_args!("{}", programs::Summary { setup, total }))
}

fn other_vcpu(vcpu: usize) -> ! {
    let deadline = Deadline::after_ms(START_TIMEOUT_MS);
    let setup = loop {
        if let Some(s) = SETUP.get() {
            break s;
        }
        if SETUP_FAILED.load(Ordering::Acquire) {
            park();
        }
        if deadline.passed() {
            end(
                false,
                format_args!(
                    "vCPU {vcpu}: vCPU 0 published no set-up within {} s",
                    START_TIMEOUT_MS / 1000
                ),
            );
        }
        arch::pause();
    };
    if vcpu >= setup.vcpus {
        // More vCPUs run than rdx said: vCPU 0 does not wait for this one.
        say!(
            vcpu,
            "vCPU {vcpu} is past the vCPU count {}; idle",
            setup.vcpus
        );
        park();
    }
    run_program(vcpu, setup);
    park()
}

fn run_program(vcpu: usize, setup: &'static setup::Setup) {
    let result = programs::run(&programs::Ctx { vcpu, setup });
    if let Err(Fail(why)) = &result {
        if setup.vcpus > 1 {
            say!(vcpu, "error: {why}");
        }
        let _ =
            FIRST_FAILURE.compare_exchange(usize::MAX, vcpu, Ordering::AcqRel, Ordering::Relaxed);
    }
    *RESULTS[vcpu].lock() = Some(result);
    FINISHED.fetch_add(1, Ordering::AcqRel);
}

/// Spins until the VM is stopped.
fn park() -> ! {
    loop {
        arch::pause();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    match entry::vcpu_of_stack(entry::stack_pointer()) {
        Some(vcpu) => end(false, format_args!("panic on vCPU {vcpu}: {info}")),
        None => end(false, format_args!("panic: {info}")),
    }
}
