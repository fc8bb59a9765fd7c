//! The monitor's jail: host namespaces (it creates every runtime socket), Landlock (unix
//! sockets anywhere, the pidfile, nothing else), no exec (the launcher alone may), and its
//! seccomp allowlist; and the launcher's deny filter.
//!
//! The monitor jails itself in two steps. Landlock binds only the calling thread and the
//! threads it starts later (the kernels here have no Landlock `TSYNC`), so [`restrict_paths`]
//! runs in `main` while the monitor is single-threaded: after the launcher is forked (which
//! keeps host file access to start the children) and the host files are opened, before the
//! async runtime starts. [`enter`] installs the rest once the children are configured.

use std::path::{Path, PathBuf};

use jail::seccomp::{allow, allow_if, arg_eq};
use jail::{DenyList, LandlockRules, LandlockStatus, Policy, SeccompPolicy, base_runtime_policy};

/// The monitor's file access: it may create unix sockets anywhere (QMP, NBD and migration
/// listeners go where the client asks, as in QEMU) and remove entries (stale sockets before
/// a bind, its own sockets at exit: the code checks they are sockets), and it may rename a
/// file into place in the pidfile's directory. It reads, writes, creates, truncates, links
/// and executes nothing, anywhere: what it needs is opened before this, in `main`.
pub fn path_rules(pidfile: Option<&Path>) -> LandlockRules {
    LandlockRules {
        sockets: vec![PathBuf::from("/")],
        publish: pidfile
            .map(|p| {
                std::path::absolute(p)
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                    .unwrap_or_else(|| PathBuf::from("."))
            })
            .into_iter()
            .collect(),
        ..LandlockRules::default()
    }
}

/// Restricts the monitor's file access to [`path_rules`], for good. Call it single-threaded.
pub fn restrict_paths(pidfile: Option<&Path>) -> Result<LandlockStatus, jail::JailError> {
    jail::restrict_paths("splitvmm", &path_rules(pidfile))
}

/// The monitor's syscalls beyond the base runtime's, each with why.
pub fn seccomp_policy() -> SeccompPolicy {
    base_runtime_policy().union(&SeccompPolicy::new([
        allow_if(
            libc::SYS_socket,
            &[arg_eq(0, libc::AF_UNIX)],
            "QMP sockets and socketpairs for the children",
        ),
        allow_if(
            libc::SYS_socket,
            &[arg_eq(0, libc::AF_INET)],
            "QMP over TCP",
        ),
        allow_if(
            libc::SYS_socket,
            &[arg_eq(0, libc::AF_INET6)],
            "QMP over TCP",
        ),
        allow(libc::SYS_socketpair, "links to restarted children"),
        allow(libc::SYS_bind, "QMP listening sockets"),
        allow(
            libc::SYS_connect,
            "connect the NBD servers of blockdev-add driver=nbd nodes and of drive-mirror NBD \
             targets (block-proc may not)",
        ),
        allow(libc::SYS_listen, "QMP listening sockets"),
        allow(libc::SYS_accept4, "QMP clients"),
        allow(libc::SYS_getsockname, "the address a socket was bound to"),
        allow(libc::SYS_getpeername, "logging who connected"),
        allow(libc::SYS_setsockopt, "TCP_NODELAY on QMP connections"),
        allow(libc::SYS_getsockopt, "socket errors after connect"),
        allow(
            libc::SYS_unlink,
            "remove the QMP sockets and the pidfile at exit",
        ),
        allow(
            libc::SYS_unlinkat,
            "remove the QMP sockets and the pidfile at exit",
        ),
        allow(libc::SYS_wait4, "reap the launcher at exit"),
        allow(
            libc::SYS_rename,
            "publish the pidfile once jailed (written before)",
        ),
        allow(
            libc::SYS_renameat,
            "publish the pidfile once jailed (written before)",
        ),
        allow(
            libc::SYS_renameat2,
            "publish the pidfile once jailed (written before)",
        ),
    ]))
}

/// Enters the rest of the jail ([`restrict_paths`] came first). The monitor keeps every
/// descriptor it has (sockets, links, the runtime's): it made them all.
pub fn enter(runas: Option<(u32, u32)>) -> Result<(), jail::JailError> {
    let policy = Policy {
        name: "splitvmm",
        empty_root: false,
        landlock: None,
        drop_caps: false,
        runas,
        seccomp: seccomp_policy(),
    };
    jail::enter(&policy).map(drop)
}

/// What neither the launcher nor any child it starts ever needs. The launcher keeps
/// `execve`; each child narrows further with its own allowlist once it has started.
pub fn launcher_denylist() -> DenyList {
    use libc::*;
    DenyList::new([
        (SYS_ptrace, "no process inspects another"),
        (SYS_process_vm_readv, "no process reads another's memory"),
        (SYS_process_vm_writev, "no process writes another's memory"),
        (
            SYS_socket,
            "the monitor creates every socket; the children only use those handed to them",
        ),
        (SYS_connect, "the monitor makes every connection"),
        (SYS_bind, "the monitor binds every listening socket"),
        (SYS_listen, "the monitor binds every listening socket"),
        (SYS_setns, "nobody joins another namespace"),
        (SYS_chroot, "the empty root is made with pivot_root"),
        (
            SYS_open_by_handle_at,
            "a classic way out of a mount namespace",
        ),
        (SYS_name_to_handle_at, "goes with open_by_handle_at"),
        (SYS_bpf, "no BPF beyond the seccomp filters"),
        (SYS_perf_event_open, "no profiling interface"),
        (
            SYS_userfaultfd,
            "a common exploitation primitive; guest memory is a memfd",
        ),
        (SYS_io_uring_setup, "io_uring runs syscalls past seccomp"),
        (SYS_io_uring_enter, "io_uring runs syscalls past seccomp"),
        (SYS_io_uring_register, "io_uring runs syscalls past seccomp"),
        (SYS_keyctl, "no kernel keyrings"),
        (SYS_add_key, "no kernel keyrings"),
        (SYS_request_key, "no kernel keyrings"),
        (SYS_kexec_load, "host administration"),
        (SYS_kexec_file_load, "host administration"),
        (SYS_init_module, "host administration"),
        (SYS_finit_module, "host administration"),
        (SYS_delete_module, "host administration"),
        (SYS_reboot, "host administration"),
        (SYS_swapon, "host administration"),
        (SYS_swapoff, "host administration"),
        (SYS_acct, "host administration"),
        (SYS_settimeofday, "host administration"),
        (SYS_clock_settime, "host administration"),
        (SYS_clock_adjtime, "host administration"),
        (SYS_adjtimex, "host administration"),
        (SYS_syslog, "host administration"),
        (SYS_quotactl, "host administration"),
        (SYS_iopl, "no host port I/O"),
        (SYS_ioperm, "no host port I/O"),
        (SYS_fsopen, "the new mount API is not used"),
        (SYS_fsmount, "the new mount API is not used"),
        (SYS_move_mount, "the new mount API is not used"),
        (SYS_open_tree, "the new mount API is not used"),
        (SYS_personality, "no execution-domain tricks"),
    ])
}
