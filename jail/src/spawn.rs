//! Starting a child the launcher's way: a fork-mode `clone` straight into new namespaces that
//! returns a pidfd; in the child, a parent-death signal, the requested fds at their target
//! numbers, every other fd closed, default signal state, then `execve`.
//!
//! Set-up failures in the child, `execve` included, are reported back over a close-on-exec
//! pipe, so [`spawn`] returns an error instead of a child that exits with 127.

use std::{
    ffi::{CStr, CString, OsStr, OsString},
    io::{self, Read},
    iter, mem,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
    path::PathBuf,
    ptr,
};

use libc::{c_char, c_int, c_long};
use nix::{
    sys::{
        signal::{self, SigSet, SigmaskHow, Signal},
        wait::waitpid,
    },
    unistd::Pid,
};

use crate::JailError;

/// Which new namespaces the child is cloned into.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Namespaces {
    /// New PID namespace: the child is its PID 1 (cloned there, never unshared, so the child
    /// can still create threads).
    pub pid: bool,
    /// New mount namespace (keeps the child's mounts out of the launcher's).
    pub mount: bool,
    /// New network namespace: only a loopback interface, down.
    pub net: bool,
    /// New System V IPC namespace.
    pub ipc: bool,
    /// New hostname namespace.
    pub uts: bool,
}

impl Namespaces {
    fn requested(self) -> impl Iterator<Item = (&'static str, c_int)> {
        [
            (self.pid, "pid", libc::CLONE_NEWPID),
            (self.mount, "mount", libc::CLONE_NEWNS),
            (self.net, "net", libc::CLONE_NEWNET),
            (self.ipc, "ipc", libc::CLONE_NEWIPC),
            (self.uts, "uts", libc::CLONE_NEWUTS),
        ]
        .into_iter()
        .filter(|(on, ..)| *on)
        .map(|(_, name, flag)| (name, flag))
    }
}

/// What to start and how.
#[derive(Debug)]
pub struct SpawnSpec {
    /// Path of the executable (no `PATH` search); also the child's `argv[0]`.
    pub exe: PathBuf,
    /// Arguments after `argv[0]`.
    pub args: Vec<OsString>,
    /// The child's whole environment.
    pub env: Vec<(OsString, OsString)>,
    /// Each fd and the number it gets in the child. Every other fd is closed, 0, 1 and 2
    /// included: list them to pass them on. Source numbers may collide with targets.
    pub fds: Vec<(OwnedFd, RawFd)>,
    /// New namespaces for the child.
    pub namespaces: Namespaces,
    /// Sent to the child when the thread that spawned it exits (`PR_SET_PDEATHSIG`); use
    /// SIGKILL for a child in a new PID namespace, whose PID 1 ignores other default signals.
    pub death_signal: Signal,
}

/// A started child.
#[derive(Debug)]
pub struct Child {
    /// Its PID in the caller's PID namespace.
    pub pid: Pid,
    /// A pidfd for it (close-on-exec): poll it to learn that it exited.
    pub pidfd: OwnedFd,
}

/// What the child was doing when it failed, reported by index over the status pipe.
const CHILD_STEPS: [&str; 5] = [
    "prctl(PR_SET_PDEATHSIG) in the child",
    "moving fds above the target numbers in the child",
    "dup3 onto a target fd in the child",
    "close_range of the other fds in the child",
    "execve",
];

/// Everything the child needs, prepared before `clone`: the child only reads it.
struct Plan<'a> {
    path: &'a CStr,
    argv: &'a [*const c_char],
    envp: &'a [*const c_char],
    /// (source fd, target fd).
    moves: &'a [(RawFd, RawFd)],
    /// Numbers below `floor` that are no target and get closed.
    gaps: &'a [RawFd],
    /// One above the highest target.
    floor: RawFd,
    status_read: RawFd,
    status_write: RawFd,
    death_signal: c_int,
}

/// Starts `spec.exe` as described by `spec` and returns once it has called `execve`.
///
/// Meant for the launcher, a single-threaded process: `PR_SET_PDEATHSIG` fires when the
/// *thread* that called `spawn` exits. The child only makes async-signal-safe calls between
/// `clone` and `execve`, so it is sound from a threaded process too (tests do that).
pub fn spawn(spec: SpawnSpec) -> Result<Child, JailError> {
    let exe = &spec.exe;
    let invalid = |reason: String| JailError::InvalidSpec {
        exe: exe.clone(),
        reason,
    };
    let cstring = |s: &OsStr| {
        CString::new(s.as_bytes()).map_err(|_| invalid(format!("{s:?} contains a NUL byte")))
    };

    let mut targets: Vec<RawFd> = spec.fds.iter().map(|(_, target)| *target).collect();
    targets.sort_unstable();
    if targets.first().is_some_and(|t| *t < 0) || targets.windows(2).any(|w| w[0] == w[1]) {
        return Err(invalid(format!(
            "target fds must be distinct and non-negative: {targets:?}"
        )));
    }
    if let Some((key, _)) = spec
        .env
        .iter()
        .find(|(k, _)| k.is_empty() || k.as_bytes().contains(&b'='))
    {
        return Err(invalid(format!("bad environment variable name {key:?}")));
    }
    let path = cstring(exe.as_os_str())?;
    let args = iter::once(exe.as_os_str())
        .chain(spec.args.iter().map(OsString::as_os_str))
        .map(cstring)
        .collect::<Result<Vec<_>, _>>()?;
    let env = spec
        .env
        .iter()
        .map(|(key, value)| {
            let mut pair = key.clone();
            pair.push("=");
            pair.push(value);
            cstring(&pair)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let argv: Vec<*const c_char> = args
        .iter()
        .map(|a| a.as_ptr())
        .chain([ptr::null()])
        .collect();
    let envp: Vec<*const c_char> = env
        .iter()
        .map(|e| e.as_ptr())
        .chain([ptr::null()])
        .collect();
    let floor = targets.last().map_or(0, |t| t + 1);
    let gaps: Vec<RawFd> = (0..floor)
        .filter(|fd| targets.binary_search(fd).is_err())
        .collect();
    let moves: Vec<(RawFd, RawFd)> = spec
        .fds
        .iter()
        .map(|(fd, target)| (fd.as_raw_fd(), *target))
        .collect();
    let mut scratch: Vec<RawFd> = vec![-1; moves.len()];
    let spawn_error = |step, source| JailError::Spawn {
        exe: exe.clone(),
        step,
        source,
    };
    let (mut status_read, status_write) =
        io::pipe().map_err(|e| spawn_error("creating the status pipe", e))?;
    let plan = Plan {
        path: &path,
        argv: &argv,
        envp: &envp,
        moves: &moves,
        gaps: &gaps,
        floor,
        status_read: status_read.as_raw_fd(),
        status_write: status_write.as_raw_fd(),
        death_signal: spec.death_signal as c_int,
    };
    let ns_flags = spec
        .namespaces
        .requested()
        .fold(0, |flags, (_, flag)| flags | flag);
    let flags = c_long::from(ns_flags | libc::CLONE_PIDFD | libc::SIGCHLD);

    // Block every signal around the clone so that none of the parent's handlers runs in the
    // child before it resets them; the parent's mask is restored right after.
    let mut old_mask = SigSet::empty();
    signal::pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old_mask),
    )
    .map_err(|e| spawn_error("blocking signals", e.into()))?;
    let mut pidfd: c_int = -1;
    // SAFETY: the raw clone syscall with no new stack (0) and no CLONE_VM behaves like fork:
    // the child gets a copy of this address space and returns here with 0. The libc wrappers
    // (fork, clone) cannot be used: fork takes no namespace flags or CLONE_PIDFD, and clone
    // wants a separate stack and entry function. Skipping glibc's fork bookkeeping (atfork
    // handlers, lock resets) is fine because the child only makes async-signal-safe raw calls
    // until execve. With CLONE_PIDFD the kernel writes the pidfd to `pidfd` (the parent_tid
    // argument), which outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags,
            0 as c_long,
            &raw mut pidfd,
            0 as c_long,
            0 as c_long,
        )
    };
    if ret == 0 {
        // SAFETY: we are the freshly cloned child and `plan` and `scratch` are our own copies.
        unsafe { run_child(&plan, &mut scratch) }
    }
    let clone_error = io::Error::last_os_error();
    signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None)
        .map_err(|e| spawn_error("restoring the signal mask", e.into()))?;
    if ret < 0 {
        let namespace_refused = matches!(
            clone_error.raw_os_error(),
            Some(libc::EPERM | libc::EINVAL | libc::ENOSPC | libc::EUSERS)
        );
        return Err(if ns_flags != 0 && namespace_refused {
            JailError::Namespaces {
                exe: exe.clone(),
                requested: spec
                    .namespaces
                    .requested()
                    .map(|(name, _)| name)
                    .collect::<Vec<_>>()
                    .join(", "),
                source: clone_error,
            }
        } else {
            spawn_error("clone", clone_error)
        });
    }
    let pid = Pid::from_raw(ret as libc::pid_t);
    // SAFETY: clone succeeded with CLONE_PIDFD, so `pidfd` is a new fd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    drop(status_write);
    let reap = || {
        let _ = signal::kill(pid, Signal::SIGKILL);
        let _ = waitpid(pid, None);
    };
    let mut report = Vec::new();
    if let Err(e) = status_read.read_to_end(&mut report) {
        reap();
        return Err(spawn_error("reading the child's status pipe", e));
    }
    match <[u8; 8]>::try_from(report.as_slice()) {
        // EOF without a report: execve succeeded and closed the write end.
        _ if report.is_empty() => Ok(Child { pid, pidfd }),
        Ok(report) => {
            reap();
            let [s0, s1, s2, s3, e0, e1, e2, e3] = report;
            let step = CHILD_STEPS.get(u32::from_ne_bytes([s0, s1, s2, s3]) as usize);
            let errno = i32::from_ne_bytes([e0, e1, e2, e3]);
            Err(spawn_error(
                step.copied().unwrap_or("child set-up"),
                io::Error::from_raw_os_error(errno),
            ))
        }
        Err(_) => {
            reap();
            Err(spawn_error(
                "child set-up",
                io::Error::other("garbled status report"),
            ))
        }
    }
}

/// The cloned child: arms the death signal, lays out the fds, resets signals and execs.
///
/// # Safety
///
/// Only for the child of a fork-mode clone: it closes fds other code in this address space
/// may own, and it never returns. It makes only async-signal-safe calls and does not allocate.
unsafe fn run_child(plan: &Plan<'_>, scratch: &mut [RawFd]) -> ! {
    // SAFETY: every call below is an async-signal-safe syscall wrapper on plain integers or on
    // pointers into `plan`, which stays alive (the child has its own copy of the memory).
    unsafe {
        libc::close(plan.status_read);
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            plan.death_signal as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            fail(plan.status_write, 0);
        }
        // If the parent died before the prctl, its end of the status pipe is closed (exit closes
        // files before it signals children), so POLLERR shows it. getppid() cannot tell: in a
        // new PID namespace it returns 0.
        let mut pollfd = libc::pollfd {
            fd: plan.status_write,
            events: 0,
            revents: 0,
        };
        if libc::poll(&mut pollfd, 1, 0) < 0 || pollfd.revents & libc::POLLERR != 0 {
            libc::_exit(127);
        }
        // Move the status pipe and every source above all targets, so no dup3 onto a target
        // clobbers a source still to be moved.
        let status = libc::fcntl(plan.status_write, libc::F_DUPFD_CLOEXEC, plan.floor);
        if status < 0 {
            fail(plan.status_write, 1);
        }
        for (slot, (source, _)) in scratch.iter_mut().zip(plan.moves) {
            *slot = libc::fcntl(*source, libc::F_DUPFD_CLOEXEC, plan.floor);
            if *slot < 0 {
                fail(status, 1);
            }
        }
        // dup3 without O_CLOEXEC: the targets stay open across execve.
        for (moved, (_, target)) in scratch.iter().zip(plan.moves) {
            if libc::dup3(*moved, *target, 0) < 0 {
                fail(status, 2);
            }
        }
        for gap in plan.gaps {
            libc::close(*gap);
        }
        // Everything from `floor` up except the status pipe (close-on-exec) goes.
        let close_range = |first: c_int, last: libc::c_uint| {
            libc::syscall(
                libc::SYS_close_range,
                first as libc::c_uint,
                last,
                0 as libc::c_uint,
            )
        };
        if (status > plan.floor && close_range(plan.floor, (status - 1) as libc::c_uint) != 0)
            || close_range(status + 1, libc::c_uint::MAX) != 0
        {
            fail(status, 3);
        }
        // Default dispositions (ignored signals would survive execve), then an empty mask.
        // SIGKILL, SIGSTOP and glibc's two internal signals refuse; that is fine.
        for signo in 1..=64 {
            libc::signal(signo, libc::SIG_DFL);
        }
        let mut empty: libc::sigset_t = mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, ptr::null_mut());
        libc::execve(plan.path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr());
        fail(status, 4)
    }
}

/// Reports `CHILD_STEPS[step]` and errno to the parent and on fd 2, then exits with 127.
fn fail(status: RawFd, step: usize) -> ! {
    let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let mut report = [0u8; 8];
    report[..4].copy_from_slice(&(step as u32).to_ne_bytes());
    report[4..].copy_from_slice(&errno.to_ne_bytes());
    let message = CHILD_STEPS[step].as_bytes();
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffers are valid for the
    // lengths given. A failed write changes nothing: the parent then sees a bare exit.
    unsafe {
        libc::write(status, report.as_ptr().cast(), report.len());
        libc::write(2, b"jail: spawn failed: ".as_ptr().cast(), 20);
        libc::write(2, message.as_ptr().cast(), message.len());
        libc::write(2, b"\n".as_ptr().cast(), 1);
        libc::_exit(127)
    }
}
