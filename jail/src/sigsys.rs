//! The SIGSYS handler: logs the syscall the seccomp filter trapped, then dies by SIGSYS.
//!
//! It runs in signal context, so it only uses async-signal-safe code: no allocation, no locks,
//! raw `write` to fd 2, then `rt_sigaction`, `rt_sigprocmask` and `tgkill`.

use std::{io, mem, ptr, sync::OnceLock};

use libc::{c_int, c_uint, c_void};

use crate::JailError;

/// The process name for the log line; set once at install (a process has one name).
static NAME: OnceLock<&'static str> = OnceLock::new();

/// `si_code` of a SIGSYS raised by a seccomp `SECCOMP_RET_TRAP`.
const SYS_SECCOMP: c_int = 1;

/// The head of `siginfo_t` as the kernel fills it for SIGSYS (x86_64): three ints, padding to
/// align the union at offset 16, then `struct { void *_call_addr; int _syscall; unsigned int
/// _arch; } _sigsys`.
#[repr(C)]
struct SigsysInfo {
    _signo: c_int,
    _errno: c_int,
    code: c_int,
    _pad: c_int,
    _call_addr: *mut c_void,
    syscall: c_int,
    _arch: c_uint,
}

const _: () = assert!(mem::offset_of!(SigsysInfo, syscall) == 24);
const _: () = assert!(mem::size_of::<SigsysInfo>() <= mem::size_of::<libc::siginfo_t>());

/// Installs the handler for the whole process, logging as `name`.
pub(crate) fn install(name: &'static str) -> Result<(), JailError> {
    // The first name wins; the handler only needs one.
    let _ = NAME.set(name);
    // SAFETY: a zeroed sigaction is a valid value (empty mask, no flags) that we then fill in.
    let mut action: libc::sigaction = unsafe { mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is fully initialised and the handler has the SA_SIGINFO signature; the
    // old action is not requested.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, ptr::null_mut()) } != 0 {
        return Err(JailError::SigsysHandler(io::Error::last_os_error()));
    }
    Ok(())
}

extern "C" fn on_sigsys(_signo: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t, whose head SigsysInfo mirrors
    // (checked above to fit inside it); `_syscall` is meaningful when si_code is SYS_SECCOMP.
    let (code, nr) = unsafe {
        let info = &*info.cast::<SigsysInfo>();
        (info.code, info.syscall)
    };
    if code == SYS_SECCOMP {
        let mut line = [0u8; 128];
        let mut len = 0;
        let name = NAME.get().map_or("splitvmm", |n| n);
        for part in [name.as_bytes(), b": seccomp: forbidden syscall ".as_slice()] {
            let n = part.len().min(line.len() - 16 - len);
            line[len..len + n].copy_from_slice(&part[..n]);
            len += n;
        }
        len += format_decimal(nr, &mut line[len..]);
        line[len] = b'\n';
        // SAFETY: write(2) is async-signal-safe and `line` is valid for `len + 1` bytes; a
        // failed log write changes nothing.
        unsafe { libc::write(2, line.as_ptr().cast(), len + 1) };
    }
    // SAFETY: async-signal-safe syscalls on local, initialised values, and a read of the
    // register snapshot the kernel passed for this signal (SA_SIGINFO: a valid ucontext_t).
    //
    // SIGSYS goes back to its default action (terminate with core) and is unblocked (the
    // kernel blocked it while this handler runs). Then the very same syscall, with the same
    // arguments, is made again: the filter traps it again, and the kernel's forced SIGSYS
    // with the default action kills the process. Re-raising with tgkill would not do: a
    // process that is PID 1 of its namespace (block-proc, vmm-proc) ignores default-action
    // signals it sends itself, but not the kernel's forced ones. Should the call somehow
    // pass, the process exits with 128 + SIGSYS.
    unsafe {
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        let mut set: libc::sigset_t = mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, ptr::null_mut());
        if code == SYS_SECCOMP && !context.is_null() {
            let regs = &(*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs;
            let arg = |r: c_int| regs.get(r as usize).copied().unwrap_or(0);
            libc::syscall(
                libc::c_long::from(nr),
                arg(libc::REG_RDI),
                arg(libc::REG_RSI),
                arg(libc::REG_RDX),
                arg(libc::REG_R10),
                arg(libc::REG_R8),
                arg(libc::REG_R9),
            );
        }
        libc::syscall(libc::SYS_exit_group, libc::c_long::from(128 + libc::SIGSYS));
    }
}

/// Writes `value` in decimal at the start of `out` (at least 11 bytes) and returns its length.
fn format_decimal(value: c_int, out: &mut [u8]) -> usize {
    let mut digits = [0u8; 10];
    let mut rest = value.unsigned_abs();
    let mut n = 0;
    loop {
        digits[n] = b'0' + (rest % 10) as u8;
        n += 1;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let mut len = 0;
    if value < 0 {
        out[0] = b'-';
        len = 1;
    }
    for &digit in digits[..n].iter().rev() {
        out[len] = digit;
        len += 1;
    }
    len
}

#[cfg(test)]
mod tests {
    use super::format_decimal;

    #[test]
    fn formats_numbers_without_allocating() {
        for value in [0, 7, 257, 435, -1, i32::MIN, i32::MAX] {
            let mut out = [0u8; 11];
            let len = format_decimal(value, &mut out);
            assert_eq!(&out[..len], value.to_string().as_bytes());
        }
    }
}
