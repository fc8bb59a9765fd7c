//! `vmm-proc`: runs the guest. Started by the splitvmm launcher in its own namespaces with
//! its IPC links on fixed descriptors; never started by hand.

use std::process::ExitCode;

use clap::Parser;

/// vmm-proc: the guest process of splitvmm (started by splitvmm, not by hand).
#[derive(Debug, Parser)]
struct Args {
    /// The descriptor of the link to the monitor.
    #[arg(long)]
    monitor_fd: i32,
    /// The descriptor of the link to block-proc.
    #[arg(long)]
    peer_fd: i32,
    /// Switch to this user and group in the jail (splitvmm's `--runas`).
    #[arg(long, value_name = "UID:GID", value_parser = jail::parse_runas)]
    runas: Option<(u32, u32)>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    ipc::logging::init("vmm-proc");
    match vmm_proc::run(args.monitor_fd, args.peer_fd, args.runas) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm-proc: {e}");
            ExitCode::FAILURE
        }
    }
}
