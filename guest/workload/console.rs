//! The serial port: whole lines under a lock, a `cpuN: ` prefix when there is more than
//! one vCPU, and the one final `workload: PASS|FAIL` line followed by the debug-exit write.
//! Also the guest's error type, [`Fail`]: a line of text saying what went wrong.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::abi::{
    DEBUG_EXIT_FAIL, DEBUG_EXIT_PASS, DEBUG_EXIT_PORT, FAIL_PREFIX, PASS_PREFIX, SERIAL_PORT,
};
use crate::arch::{outb, outl, pause};
use crate::sync::SpinLock;

/// Longest line; longer text is cut.
const LINE_MAX: usize = 240;

/// A line being formatted (no allocation; text past [`LINE_MAX`] is dropped).
pub struct Line {
    buf: [u8; LINE_MAX],
    len: usize,
}

impl Line {
    pub const fn new() -> Self {
        Self {
            buf: [0; LINE_MAX],
            len: 0,
        }
    }

    pub fn from_args(args: fmt::Arguments<'_>) -> Self {
        let mut l = Self::new();
        // Line's write_str never fails; a failing Display impl just ends the text early.
        let _ = l.write_fmt(args);
        l
    }

    pub fn as_str(&self) -> &str {
        // Only whole `str`s are appended (cut at a char boundary), so this is valid UTF-8.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("<bad utf-8>")
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = LINE_MAX - self.len;
        let mut n = s.len().min(room);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong, as one line of text.
pub struct Fail(pub Line);

/// `Err(Fail)` with a formatted message.
macro_rules! fail {
    ($($arg:tt)*) => {
        Err($crate::console::Fail($crate::console::Line::from_args(format_args!($($arg)*))))
    };
}
pub(crate) use fail;

/// Prints a progress line from vCPU `$vcpu`.
macro_rules! say {
    ($vcpu:expr, $($arg:tt)*) => {
        $crate::console::say_line($vcpu, format_args!($($arg)*))
    };
}
pub(crate) use say;

static SERIAL: SpinLock<()> = SpinLock::new(());
static PREFIX: AtomicBool = AtomicBool::new(false);
static ENDED: AtomicBool = AtomicBool::new(false);

/// Turns the per-vCPU prefix on when there is more than one vCPU.
pub fn set_vcpus(count: usize) {
    PREFIX.store(count > 1, Ordering::Relaxed);
}

fn write_line(text: &str) {
    let _lock = SERIAL.lock();
    for b in text.bytes() {
        outb(SERIAL_PORT, b);
    }
    outb(SERIAL_PORT, b'\r');
    outb(SERIAL_PORT, b'\n');
}

/// Prints a progress line.
pub fn say_line(vcpu: usize, args: fmt::Arguments<'_>) {
    let mut line = Line::new();
    if PREFIX.load(Ordering::Relaxed) {
        let _ = write!(line, "cpu{vcpu}: ");
    }
    let _ = line.write_fmt(args);
    write_line(line.as_str());
}

/// Prints the final line and powers off through the debug-exit port. Only the first
/// caller prints; any other just spins.
pub fn end(pass: bool, args: fmt::Arguments<'_>) -> ! {
    if !ENDED.swap(true, Ordering::AcqRel) {
        let mut line = Line::new();
        let prefix = if pass { PASS_PREFIX } else { FAIL_PREFIX };
        let _ = write!(line, "{prefix} ");
        let _ = line.write_fmt(args);
        write_line(line.as_str());
        outl(
            DEBUG_EXIT_PORT,
            if pass {
                DEBUG_EXIT_PASS
            } else {
                DEBUG_EXIT_FAIL
            },
        );
    }
    // The VMM stops the VM on the debug-exit write; nothing is left to do until then.
    loop {
        pause();
    }
}
