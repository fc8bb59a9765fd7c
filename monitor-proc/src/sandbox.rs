//! The monitor's jail: host namespaces (it creates every runtime socket), no exec (the
//! launcher alone may), and this seccomp allowlist.

use jail::seccomp::{allow, allow_if, arg_eq};
use jail::{Policy, SeccompPolicy, base_runtime_policy};

/// The monitor's syscalls beyond the base runtime's, each with why.
pub fn seccomp_policy() -> SeccompPolicy {
    base_runtime_policy().union(&SeccompPolicy::new([
        allow_if(libc::SYS_socket, &[arg_eq(0, libc::AF_UNIX)], "QMP sockets and socketpairs for the children"),
        allow_if(libc::SYS_socket, &[arg_eq(0, libc::AF_INET)], "QMP over TCP"),
        allow_if(libc::SYS_socket, &[arg_eq(0, libc::AF_INET6)], "QMP over TCP"),
        allow(libc::SYS_socketpair, "links to restarted children"),
        allow(libc::SYS_bind, "QMP listening sockets"),
        allow(libc::SYS_listen, "QMP listening sockets"),
        allow(libc::SYS_accept4, "QMP clients"),
        allow(libc::SYS_getsockname, "the address a socket was bound to"),
        allow(libc::SYS_getpeername, "logging who connected"),
        allow(libc::SYS_setsockopt, "TCP_NODELAY on QMP connections"),
        allow(libc::SYS_getsockopt, "socket errors after connect"),
        allow(libc::SYS_unlink, "remove the QMP sockets and the pidfile at exit"),
        allow(libc::SYS_unlinkat, "remove the QMP sockets and the pidfile at exit"),
        allow(libc::SYS_wait4, "reap the launcher at exit"),
    ]))
}

/// Enters the jail. The monitor keeps every descriptor it has (sockets, links, the
/// runtime's): it made them all.
pub fn enter() -> Result<(), jail::JailError> {
    let keep_fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    let policy = Policy {
        name: "splitvmm",
        keep_fds,
        empty_root: false,
        landlock: None,
        drop_caps: false,
        seccomp: seccomp_policy(),
    };
    jail::enter(&policy).map(drop)
}
