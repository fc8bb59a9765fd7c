//! `splitvmm`: the monitor process. Parses the command line, opens the host files it hands
//! on, forks the launcher while the process is still single-threaded, restricts its own file
//! access (Landlock, see [`monitor_proc::sandbox`]), then runs the supervisor and the QMP
//! server.

use std::process::ExitCode;

use clap::Parser;
use monitor_proc::cli::Cli;
use monitor_proc::{launcher, sandbox, supervisor};
use nix::unistd::{ForkResult, fork};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = cli.validate() {
        eprintln!("splitvmm: {e}");
        return ExitCode::FAILURE;
    }
    ipc::logging::init("splitvmm");
    let helpers = match launcher::helper_dir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("splitvmm: cannot find block-proc and vmm-proc: {e}");
            return ExitCode::FAILURE;
        }
    };
    let host = match supervisor::HostFiles::open(&cli) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("splitvmm: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (mine, theirs) = match ipc::Channel::pair() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("splitvmm: socketpair: {e}");
            host.discard();
            return ExitCode::FAILURE;
        }
    };
    let monitor_pid = nix::unistd::getpid();
    // SAFETY: no thread has been started yet (the runtime is built below), so the child is
    // an exact, consistent copy; it runs only the launcher loop and exits.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(mine);
            // The monitor's files are not the launcher's (it keeps the pidfile's path only).
            drop(host);
            launcher::run(theirs, helpers, monitor_pid, cli.sandbox, cli.runas)
        }
        Ok(ForkResult::Parent { child }) => {
            drop(theirs);
            if cli.sandbox
                && let Err(e) = sandbox::restrict_paths(cli.pidfile.as_deref())
            {
                eprintln!("splitvmm: sandbox: {e}");
                host.discard();
                return ExitCode::FAILURE;
            }
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("splitvmm: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            rt.block_on(supervisor::run(cli, host, mine, child))
        }
        Err(e) => {
            eprintln!("splitvmm: cannot fork the launcher: {e}");
            host.discard();
            ExitCode::FAILURE
        }
    }
}
