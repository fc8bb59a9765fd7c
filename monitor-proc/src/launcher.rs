//! The launcher: a single-threaded process forked from `splitvmm` before any thread or
//! filter exists, and the only process of splitvmm that may exec. It starts block-proc and
//! vmm-proc in their namespaces on the monitor's request, reaps them through pidfds the
//! moment they exit, and reports every exit. It dies with the monitor (`PR_SET_PDEATHSIG`),
//! and its children die with it.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use ipc::launcher::{ChildKind, ExitStatus, LaunchRequest, LauncherMessage};
use ipc::{Channel, IpcError, Link};
use jail::{Namespaces, SpawnSpec};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

/// Where the sibling executables are: next to `splitvmm`, unless `SPLITVMM_HELPER_DIR`
/// says otherwise (tests, packaging).
pub fn helper_dir() -> std::io::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("SPLITVMM_HELPER_DIR") {
        return Ok(dir.into());
    }
    let exe = std::env::current_exe()?;
    Ok(exe.parent().unwrap_or(Path::new("/")).to_path_buf())
}

/// What the launcher keeps (as uid 0, in its bounding, effective and permitted sets, so
/// no child it execs can hold more): what starting and jailing a child needs.
/// - `CAP_SYS_ADMIN`: new pid, mount, net, ipc, uts namespaces at clone; vmm-proc's empty
///   root (mount, `pivot_root`);
/// - `CAP_SETPCAP`: each child drops its bounding set;
/// - `CAP_SETUID`, `CAP_SETGID`: each child switches to `--runas`;
/// - `CAP_DAC_OVERRIDE`: block-proc opens the command line's images before it switches,
///   as QEMU opens its `-drive` files before `-runas`;
/// - `CAP_KILL`: stop children that run as another user.
const LAUNCHER_CAPABILITIES: [u32; 6] = [
    jail::cap::CAP_SYS_ADMIN,
    jail::cap::CAP_SETPCAP,
    jail::cap::CAP_SETUID,
    jail::cap::CAP_SETGID,
    jail::cap::CAP_DAC_OVERRIDE,
    jail::cap::CAP_KILL,
];

struct Running {
    kind: ChildKind,
    pid: Pid,
    pidfd: OwnedFd,
}

/// Runs the launcher until the monitor says `Exit` or goes away. Never returns.
pub fn run(
    chan: Channel,
    helpers: PathBuf,
    monitor: Pid,
    sandbox: bool,
    runas: Option<(u32, u32)>,
) -> ! {
    // Die with the monitor. Set before checking, so a monitor that died in between is seen.
    // SAFETY: prctl with PR_SET_PDEATHSIG and a valid signal number has no memory effects.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if nix::unistd::getppid() != monitor {
        std::process::exit(0);
    }
    if sandbox {
        let jailed = jail::keep_capabilities(&LAUNCHER_CAPABILITIES)
            .and_then(|()| crate::sandbox::launcher_denylist().install("splitvmm launcher"));
        if let Err(e) = jailed {
            eprintln!("splitvmm launcher: sandbox: {e}");
            std::process::exit(1);
        }
    }
    let mut children: Vec<Running> = Vec::new();
    let status = match serve(&chan, &helpers, runas, &mut children) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("splitvmm launcher: {e}");
            1
        }
    };
    for c in &children {
        let _ = kill(c.pid, Signal::SIGKILL);
    }
    for c in children {
        let _ = waitpid(c.pid, None);
    }
    std::process::exit(status)
}

fn serve(
    chan: &Channel,
    helpers: &Path,
    runas: Option<(u32, u32)>,
    children: &mut Vec<Running>,
) -> Result<(), IpcError> {
    chan.handshake(Link::Launcher)?;
    loop {
        let (chan_ready, exited) = {
            let mut fds: Vec<PollFd> = std::iter::once(chan.as_fd())
                .chain(children.iter().map(|c| c.pidfd.as_fd()))
                .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
                .collect();
            match poll(&mut fds, PollTimeout::NONE) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => r.map_err(|e| IpcError::Io(e.into()))?,
            };
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            let exited: Vec<usize> = fds
                .iter()
                .skip(1)
                .enumerate()
                .filter(|(_, f)| ready(f))
                .map(|(i, _)| i)
                .collect();
            (fds.first().is_some_and(ready), exited)
        };
        // Report exits first: a monitor waiting for one must see it before anything else.
        for i in exited.into_iter().rev() {
            let c = children.remove(i);
            let status = match waitpid(c.pid, None) {
                Ok(WaitStatus::Exited(_, code)) => ExitStatus::Code(code),
                Ok(WaitStatus::Signaled(_, sig, _)) => ExitStatus::Signal(sig as i32),
                other => {
                    eprintln!("splitvmm launcher: unexpected wait status {other:?}");
                    ExitStatus::Code(-1)
                }
            };
            chan.send(
                &LauncherMessage::Exited {
                    kind: c.kind,
                    pid: c.pid.as_raw(),
                    status,
                },
                &[],
            )?;
        }
        if !chan_ready {
            continue;
        }
        let req = match chan.recv::<LaunchRequest>() {
            Err(IpcError::Closed) => return Ok(()),
            r => r?,
        };
        match req.msg {
            LaunchRequest::Spawn {
                kind,
                peer_link,
                sandbox,
            } => {
                let reply = match spawn(kind, peer_link, sandbox, runas, helpers, req.fds) {
                    Ok(child) => {
                        let pid = child.pid.as_raw();
                        children.push(child);
                        LauncherMessage::Spawned { kind, pid }
                    }
                    Err(error) => LauncherMessage::SpawnFailed { kind, error },
                };
                chan.send(&reply, &[])?;
            }
            LaunchRequest::Kill { kind } => {
                for c in children.iter().filter(|c| c.kind == kind) {
                    let _ = kill(c.pid, Signal::SIGKILL);
                }
            }
            LaunchRequest::Threads { kind } => {
                let threads = children
                    .iter()
                    .find(|c| c.kind == kind)
                    .map(|c| threads_of(c.pid))
                    .unwrap_or_default();
                chan.send(&LauncherMessage::Threads { threads }, &[])?;
            }
            LaunchRequest::Exit => return Ok(()),
        }
    }
}

/// The threads of process `pid`: name and host thread id, from `/proc/PID/task`.
fn threads_of(pid: Pid) -> Vec<(String, i32)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let tid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
        Some((comm.trim_end().to_string(), tid))
    })
    .collect()
}

fn spawn(
    kind: ChildKind,
    peer_link: bool,
    sandbox: bool,
    runas: Option<(u32, u32)>,
    helpers: &Path,
    fds: Vec<OwnedFd>,
) -> Result<Running, String> {
    let exe = helpers.join(kind.name());
    let mut args: Vec<OsString> = vec!["--monitor-fd".into(), "3".into()];
    if peer_link {
        args.extend(["--peer-fd".into(), "4".into()]);
    }
    if let Some((uid, gid)) = runas {
        args.extend(["--runas".into(), format!("{uid}:{gid}").into()]);
    }
    let namespaces = match (sandbox, kind) {
        (false, _) => Namespaces::default(),
        (true, ChildKind::Block) => Namespaces {
            pid: true,
            ipc: true,
            uts: true,
            ..Default::default()
        },
        (true, ChildKind::Vmm) => Namespaces {
            pid: true,
            mount: true,
            net: true,
            ipc: true,
            uts: true,
        },
    };
    let env = ["RUST_LOG", "RUST_BACKTRACE"]
        .into_iter()
        .filter_map(|k| std::env::var_os(k).map(|v| (OsString::from(k), v)))
        .collect();
    // stdio goes through to the child (its logs and the serial console), then the links.
    let mut all = Vec::new();
    for n in 0..3 {
        // SAFETY: 0, 1 and 2 stay open for the launcher's whole life; borrowing one to dup it is sound.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(n) };
        all.push((
            fd.try_clone_to_owned()
                .map_err(|e| format!("dup stdio: {e}"))?,
            n,
        ));
    }
    all.extend(fds.into_iter().zip(3..));
    let fds = all;
    let spec = SpawnSpec {
        exe: exe.clone(),
        args,
        env,
        fds,
        namespaces,
        death_signal: Signal::SIGKILL,
    };
    let child = jail::spawn(spec).map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    Ok(Running {
        kind,
        pid: child.pid,
        pidfd: child.pidfd,
    })
}
