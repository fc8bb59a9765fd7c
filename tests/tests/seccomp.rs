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
