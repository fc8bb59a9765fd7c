//! Applies one process's real seccomp filter (the very policy that process installs), then
//! makes a syscall that filter forbids. The test expects death by SIGSYS and the logged
//! syscall number.
//!
//! Usage: seccomp-probe vmm-proc|block-proc|splitvmm|launcher
//!
//! `seccomp-probe vmm-proc-open SYSCALL` runs as vmm-proc does, started by the test in
//! vmm-proc's namespaces with a read-only descriptor at fd 3 (as the kernel file arrives):
//! it enters vmm-proc's real jail (`vmm_proc::sandbox::enter`: empty root, no capabilities,
//! the filter), prints what each way of opening a file gave (`openat /etc/passwd: EACCES`),
//! then makes SYSCALL (`open`, `openat2`, `open_by_handle_at`, `creat`), which must kill it.
//!
//! `seccomp-probe splitvmm-paths DIR PIDFILE` applies the monitor's real Landlock rules
//! (`monitor_proc::sandbox::restrict_paths(PIDFILE)`) and nothing else (the seccomp filter
//! would stop most of these calls first), then tries each kind of file access in DIR and
//! beside PIDFILE and prints `what: ok` or `what: ERRNO` for each.

use std::ffi::CString;

fn main() {
    let which = std::env::args().nth(1).unwrap_or_default();
    if which == "vmm-proc-open" {
        open_as_vmm_proc(&std::env::args().nth(2).unwrap_or_default());
    }
    if which == "splitvmm-paths" {
        let args: Vec<String> = std::env::args().skip(2).collect();
        monitor_paths(&args);
    }
    let installed = match which.as_str() {
        "launcher" => monitor_proc::sandbox::launcher_denylist().install("launcher"),
        name => {
            let (name, seccomp) = match name {
                "vmm-proc" => ("vmm-proc", vmm_proc::sandbox::seccomp_policy()),
                "block-proc" => ("block-proc", block_proc::sandbox::seccomp_policy()),
                "splitvmm" => ("splitvmm", monitor_proc::sandbox::seccomp_policy()),
                other => {
                    eprintln!("seccomp-probe: unknown process {other:?}");
                    std::process::exit(2);
                }
            };
            let policy = jail::Policy {
                name,
                empty_root: false,
                landlock: None,
                drop_caps: false,
                runas: None,
                seccomp,
            };
            jail::enter(&policy).map(drop)
        }
    };
    if let Err(e) = installed {
        eprintln!("seccomp-probe: cannot install the filter: {e}");
        std::process::exit(2);
    }
    // ptrace is forbidden to every process of splitvmm.
    // SAFETY: PTRACE_TRACEME with null arguments touches no memory of ours.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_TRACEME,
            0,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    eprintln!("seccomp-probe: ptrace returned {r}: the filter let it through");
    std::process::exit(3);
}

/// What `openat(AT_FDCWD, path, flags)` gave: the fd's number or the errno's name.
fn try_openat(path: &str, flags: i32) -> String {
    let c = CString::new(path).expect("no NUL in a literal path");
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    let fd = unsafe { libc::openat(libc::AT_FDCWD, c.as_ptr(), flags) };
    if fd >= 0 {
        return format!("opened fd {fd}");
    }
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    match errno {
        libc::EACCES => "EACCES".into(),
        libc::ENOENT => "ENOENT".into(),
        e => format!("errno {e}"),
    }
}

fn open_as_vmm_proc(last: &str) -> ! {
    if let Err(e) = vmm_proc::sandbox::enter(None) {
        eprintln!("seccomp-probe: cannot enter vmm-proc's jail: {e}");
        std::process::exit(2);
    }
    for (path, flags) in [
        ("/etc/passwd", libc::O_RDONLY),
        ("/proc/self/fd/3", libc::O_RDWR),
        ("/proc/self/fd/3", libc::O_RDONLY),
        ("/proc/1/root/etc/passwd", libc::O_RDONLY),
    ] {
        println!("openat {path} {flags:#o}: {}", try_openat(path, flags));
    }
    // The held descriptor stays what it was: read-only.
    // SAFETY: writing one byte from a valid buffer to fd 3, which the test passed.
    let w = unsafe { libc::write(3, b"x".as_ptr().cast(), 1) };
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    println!("write to fd 3: {w} errno {errno}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let path = c"/etc/passwd";
    // SAFETY: raw syscalls with a valid path and null or zero other arguments; each must be
    // trapped by the filter before the kernel reads anything.
    let r = unsafe {
        match last {
            "open" => libc::syscall(libc::SYS_open, path.as_ptr(), libc::O_RDONLY),
            "creat" => libc::syscall(libc::SYS_creat, path.as_ptr(), 0o600),
            "openat2" => libc::syscall(
                libc::SYS_openat2,
                libc::AT_FDCWD,
                path.as_ptr(),
                std::ptr::null::<u8>(),
                0,
            ),
            "open_by_handle_at" => libc::syscall(
                libc::SYS_open_by_handle_at,
                3,
                std::ptr::null::<u8>(),
                libc::O_RDONLY,
            ),
            other => {
                eprintln!("seccomp-probe: unknown syscall {other:?}");
                std::process::exit(2);
            }
        }
    };
    eprintln!("seccomp-probe: {last} returned {r}: the filter let it through");
    std::process::exit(3);
}

/// `ok`, or the errno's number.
fn outcome<T>(r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => e.raw_os_error().map_or(e.to_string(), |n| n.to_string()),
    }
}

fn monitor_paths(args: &[String]) -> ! {
    use std::fs;
    use std::os::unix::net::UnixListener;
    use std::path::Path;
    let [dir, pidfile] = args else {
        eprintln!("usage: seccomp-probe splitvmm-paths DIR PIDFILE");
        std::process::exit(2);
    };
    let (dir, pidfile) = (Path::new(dir), Path::new(pidfile));
    let tmp = pidfile.with_extension("tmp");
    if let Err(e) = fs::write(&tmp, "1\n") {
        eprintln!("seccomp-probe: {}: {e}", tmp.display());
        std::process::exit(2);
    }
    match monitor_proc::sandbox::restrict_paths(Some(pidfile)) {
        Ok(status) => println!("landlock: {status:?}"),
        Err(e) => {
            eprintln!("seccomp-probe: cannot restrict paths: {e}");
            std::process::exit(2);
        }
    }
    let secret = dir.join("secret");
    let sock = dir.join("probe.sock");
    let checks: Vec<(&str, String)> = vec![
        ("read", outcome(fs::read(&secret))),
        (
            "write",
            outcome(fs::OpenOptions::new().append(true).open(&secret)),
        ),
        ("create", outcome(fs::File::create(dir.join("new")))),
        ("mkdir", outcome(fs::create_dir(dir.join("sub")))),
        ("list", outcome(fs::read_dir(dir))),
        ("rename", outcome(fs::rename(&secret, dir.join("moved")))),
        (
            "hardlink",
            outcome(fs::hard_link(&secret, dir.join("linked"))),
        ),
        (
            "symlink",
            outcome(std::os::unix::fs::symlink(&secret, dir.join("sym"))),
        ),
        ("read /etc/passwd", outcome(fs::read("/etc/passwd"))),
        ("bind", outcome(UnixListener::bind(&sock))),
        ("remove socket", outcome(fs::remove_file(&sock))),
        ("publish pidfile", outcome(fs::rename(&tmp, pidfile))),
        (
            "rename into the pidfile's directory",
            outcome(fs::rename(&secret, pidfile.with_extension("stolen"))),
        ),
        ("remove pidfile", outcome(fs::remove_file(pidfile))),
    ];
    for (what, result) in checks {
        println!("{what}: {result}");
    }
    std::process::exit(0);
}
