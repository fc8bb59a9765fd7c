//! Applies one process's real seccomp filter (the very policy that process installs), then
//! makes a syscall that filter forbids. The test expects death by SIGSYS and the logged
//! syscall number.
//!
//! Usage: seccomp-probe vmm-proc|block-proc|splitvmm|launcher

fn main() {
    let which = std::env::args().nth(1).unwrap_or_default();
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
                keep_fds: Vec::new(),
                empty_root: false,
                landlock: None,
                drop_caps: false,
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
