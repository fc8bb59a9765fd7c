//! Each process's real seccomp filter kills a forbidden syscall and logs its number, and
//! the filters forbid what DESIGN.md says each process must never do.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use tests::bin_dir;

#[test]
fn each_real_filter_kills_a_forbidden_syscall_and_logs_its_number() {
    for (which, name) in [
        ("vmm-proc", "vmm-proc"),
        ("block-proc", "block-proc"),
        ("splitvmm", "splitvmm"),
        ("launcher", "launcher"),
    ] {
        let out = Command::new(bin_dir().join("seccomp-probe"))
            .arg(which)
            .output()
            .expect("run probe");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "{which}: {:?} {stderr}",
            out.status
        );
        let line = format!("{name}: seccomp: forbidden syscall {}\n", libc::SYS_ptrace);
        assert!(
            stderr.contains(&line),
            "{which}: expected {line:?} in {stderr:?}"
        );
    }
}

#[test]
fn filters_forbid_what_each_process_must_never_do() {
    let vmm = vmm_proc::sandbox::seccomp_policy();
    let block = block_proc::sandbox::seccomp_policy();
    let monitor = monitor_proc::sandbox::seccomp_policy();
    for nr in [
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_fork,
        libc::SYS_vfork,
        libc::SYS_ptrace,
    ] {
        assert!(
            !vmm.allows(nr) && !block.allows(nr) && !monitor.allows(nr),
            "syscall {nr} allowed"
        );
    }
    for nr in [
        libc::SYS_openat,
        libc::SYS_open,
        libc::SYS_socket,
        libc::SYS_connect,
        libc::SYS_bind,
    ] {
        assert!(!vmm.allows(nr), "vmm-proc may call {nr}");
    }
    for nr in [
        libc::SYS_socket,
        libc::SYS_connect,
        libc::SYS_bind,
        libc::SYS_listen,
    ] {
        assert!(!block.allows(nr), "block-proc may call {nr}");
    }
    assert!(
        monitor.allows(libc::SYS_socket) && monitor.allows(libc::SYS_bind),
        "the monitor makes the sockets"
    );
    // Once jailed, the monitor opens no file (`openat` fails with EACCES): what it reads
    // and writes was opened at start-up or arrives as descriptors.
    for nr in [
        libc::SYS_open,
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_creat,
        libc::SYS_open_by_handle_at,
    ] {
        assert!(!monitor.allows(nr), "the monitor may call {nr}");
    }
    let launcher = monitor_proc::sandbox::launcher_denylist();
    assert!(
        !launcher.denies(libc::SYS_execve),
        "the launcher must keep execve"
    );
    assert!(launcher.denies(libc::SYS_socket) && launcher.denies(libc::SYS_ptrace));
}

/// vmm-proc, the guest-facing process, has the narrowest filter. Prints the sizes that
/// docs/security.md quotes (`cargo test -p tests --test seccomp -- --nocapture`).
#[test]
fn vmm_proc_has_the_narrowest_filter() {
    let counts = [
        (
            "vmm-proc",
            vmm_proc::sandbox::seccomp_policy().syscall_count(),
        ),
        (
            "block-proc",
            block_proc::sandbox::seccomp_policy().syscall_count(),
        ),
        (
            "splitvmm",
            monitor_proc::sandbox::seccomp_policy().syscall_count(),
        ),
    ];
    for (name, n) in counts {
        println!("{name}: {n} syscalls allowed");
    }
    assert!(
        counts[0].1 <= counts[1].1 && counts[0].1 <= counts[2].1,
        "{counts:?}"
    );
    let vmm = vmm_proc::sandbox::seccomp_policy();
    let block = block_proc::sandbox::seccomp_policy();
    assert!(
        (0..460).all(|nr| !vmm.allows(nr) || block.allows(nr)),
        "vmm-proc allows a syscall block-proc does not"
    );
}

/// vmm-proc's filter stays at most `vmm_proc::sandbox::MAX_SYSCALLS` syscalls (the KVM
/// ioctl request numbers are arguments of one syscall and do not count).
#[test]
fn vmm_proc_allows_at_most_45_syscalls_and_no_file_or_socket_call() {
    let vmm = vmm_proc::sandbox::seccomp_policy();
    assert_eq!(vmm_proc::sandbox::MAX_SYSCALLS, 45);
    assert!(
        vmm.syscall_count() <= vmm_proc::sandbox::MAX_SYSCALLS,
        "{} syscalls:\n{vmm}",
        vmm.syscall_count()
    );
    for nr in [
        libc::SYS_open,
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_creat,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_socket,
        libc::SYS_socketpair,
        libc::SYS_connect,
        libc::SYS_accept4,
        libc::SYS_memfd_create,
        libc::SYS_mount,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_kill,
        libc::SYS_process_vm_writev,
    ] {
        assert!(!vmm.allows(nr), "vmm-proc may call {nr}");
    }
}

/// Runs `seccomp-probe vmm-proc-open LAST` in vmm-proc's namespaces with a read-only file
/// at fd 3; returns its stdout, stderr and wait status.
fn vmm_proc_open_probe(last: &str) -> (String, String, nix::sys::wait::WaitStatus) {
    use std::io::Read;
    let dir = tests::TempDir::new("open-probe");
    let held = dir.join("kernel");
    std::fs::write(&held, b"kernel bytes").expect("write");
    let held = std::fs::File::open(&held).expect("open held file");
    let (out_r, out_w) = nix::unistd::pipe().expect("pipe");
    let (err_r, err_w) = nix::unistd::pipe().expect("pipe");
    let stdin = std::fs::File::open("/dev/null").expect("/dev/null");
    let child = jail::spawn(jail::SpawnSpec {
        exe: bin_dir().join("seccomp-probe"),
        args: vec!["vmm-proc-open".into(), last.into()],
        env: Vec::new(),
        fds: vec![(stdin.into(), 0), (out_w, 1), (err_w, 2), (held.into(), 3)],
        // As the launcher starts vmm-proc (monitor-proc/src/launcher.rs).
        namespaces: jail::Namespaces {
            pid: true,
            mount: true,
            net: true,
            ipc: true,
            uts: true,
        },
        death_signal: nix::sys::signal::Signal::SIGKILL,
    })
    .expect("spawn the probe in vmm-proc's namespaces");
    let mut out = String::new();
    std::fs::File::from(out_r)
        .read_to_string(&mut out)
        .expect("read stdout");
    let mut err = String::new();
    std::fs::File::from(err_r)
        .read_to_string(&mut err)
        .expect("read stderr");
    let status = nix::sys::wait::waitpid(child.pid, None).expect("waitpid");
    (out, err, status)
}

/// Inside vmm-proc's real jail nothing opens a file: not a path, not a held descriptor
/// reopened through `/proc/self/fd` with more rights, not through another process's root;
/// `openat` fails with EACCES and every other way to open kills the process, logged.
#[test]
fn vmm_proc_cannot_open_etc_passwd_not_even_through_proc_self_fd() {
    for (last, nr) in [
        ("open", libc::SYS_open),
        ("creat", libc::SYS_creat),
        ("openat2", libc::SYS_openat2),
        ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ] {
        let (out, err, status) = vmm_proc_open_probe(last);
        for line in [
            "openat /etc/passwd 0o0: EACCES",
            "openat /proc/self/fd/3 0o2: EACCES",
            "openat /proc/self/fd/3 0o0: EACCES",
            "openat /proc/1/root/etc/passwd 0o0: EACCES",
            &format!("write to fd 3: -1 errno {}", libc::EBADF),
        ] {
            assert!(
                out.lines().any(|l| l == line),
                "{last}: no {line:?} in {out:?} {err:?}"
            );
        }
        assert!(
            matches!(
                status,
                nix::sys::wait::WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGSYS, _)
            ),
            "{last}: {status:?} {err}"
        );
        let logged = format!("vmm-proc: seccomp: forbidden syscall {nr}\n");
        assert!(
            err.contains(&logged),
            "{last}: expected {logged:?} in {err:?}"
        );
    }
}
