//! `splitvmm`: the monitor process. Parses the command line, forks the launcher while the
//! process is still single-threaded, then runs the supervisor and the QMP server.

use std::process::ExitCode;

use clap::Parser;
use monitor_proc::cli::Cli;
use monitor_proc::{launcher, supervisor};
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
    let (mine, theirs) = match ipc::Channel::pair() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("splitvmm: socketpair: {e}");
            return ExitCode::FAILURE;
        }
    };
    let monitor_pid = nix::unistd::getpid();
    // SAFETY: no thread has been started yet (the runtime is built below), so the child is
    // an exact, consistent copy; it runs only the launcher loop and exits.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(mine);
            launcher::run(theirs, helpers, monitor_pid, cli.sandbox, cli.runas)
        }
        Ok(ForkResult::Parent { child }) => {
            drop(theirs);
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
            rt.block_on(supervisor::run(cli, mine, child))
        }
        Err(e) => {
            eprintln!("splitvmm: cannot fork the launcher: {e}");
            ExitCode::FAILURE
        }
    }
}
