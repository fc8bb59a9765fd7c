//! Test helper for jail's integration tests (not shipped): each mode jails itself, or spawns a
//! child, and reports what it sees on stdout so the tests can check the sandbox from outside.

use std::{
    env, fs,
    io::{self, Read},
    os::fd::AsFd,
    path::PathBuf,
    process::ExitCode,
    thread,
    time::Duration,
};

use jail::{
    LandlockRules, Namespaces, Policy, SeccompPolicy, SpawnSpec, base_runtime_policy,
    seccomp::{Rule, allow},
};
use nix::{sys::signal::Signal, unistd::geteuid};

type Result = std::result::Result<(), Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let mode = args.first().map_or("", String::as_str);
    let result = match mode {
        "socket" => socket(),
        "idle" => idle(),
        "landlock" => landlock(&args[1..]),
        "ns-report" => ns_report(),
        "spawn-sleeper" => spawn_sleeper(args.get(1).is_some_and(|a| a == "pidns")),
        "sleep" => {
            thread::sleep(Duration::from_secs(60));
            Ok(())
        }
        _ => Err(format!("unknown mode {mode:?}").into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jail-probe {mode}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn policy(extra: Vec<Rule>) -> Policy {
    Policy {
        name: "jail-probe",
        empty_root: false,
        landlock: None,
        drop_caps: false,
        runas: None,
        seccomp: base_runtime_policy().union(&SeccompPolicy::new(extra)),
    }
}

/// Jails itself without socket, then makes one: SIGSYS must kill it.
fn socket() -> Result {
    let _ = jail::enter(&policy(Vec::new()))?;
    let made = std::net::UdpSocket::bind("127.0.0.1:0");
    Err(format!("socket returned {made:?} instead of killing the process").into())
}

/// Jails itself (dropping capabilities as root), starts a thread (clone3 gets ENOSYS, glibc
/// must fall back to clone), says "ready" and waits for stdin to close.
fn idle() -> Result {
    let _ = jail::enter(&Policy {
        drop_caps: geteuid().is_root(),
        runas: None,
        ..policy(Vec::new())
    })?;
    thread::spawn(|| ()).join().map_err(|_| "thread panicked")?;
    println!("ready");
    io::stdin().read_to_end(&mut Vec::new())?;
    Ok(())
}

/// Landlock with `args[0]` read-write: writes a file inside and one in `args[1]`.
fn landlock(args: &[String]) -> Result {
    let [inside, outside] = args else {
        return Err("usage: landlock RW_DIR OTHER_DIR".into());
    };
    let jailed = jail::enter(&Policy {
        landlock: Some(LandlockRules {
            read_write: vec![PathBuf::from(inside)],
            ..LandlockRules::default()
        }),
        ..policy(vec![allow(libc::SYS_openat, "the files under test")])
    })?;
    let write = |dir: &str| match fs::write(PathBuf::from(dir).join("probe.txt"), "x") {
        Ok(()) => "ok".to_string(),
        Err(e) => e
            .raw_os_error()
            .map_or(e.to_string(), |errno| errno.to_string()),
    };
    println!(
        "landlock={:?} inside={} outside={}",
        jailed.landlock,
        write(inside),
        write(outside)
    );
    Ok(())
}

/// Reports pid, open fds, network interfaces and the contents of fds 200 and 201, then enters
/// an empty root and lists `/`.
fn ns_report() -> Result {
    // SAFETY: F_GETFD only queries whether a number is an open fd.
    let fds: Vec<i32> = (0..1024)
        .filter(|fd| unsafe { libc::fcntl(*fd, libc::F_GETFD) } >= 0)
        .collect();
    let ifaces: Vec<String> = fs::read_to_string("/proc/net/dev")?
        .lines()
        .skip(2)
        .filter_map(|line| Some(line.split_once(':')?.0.trim().to_string()))
        .collect();
    let fd200 = fs::read_to_string("/proc/self/fd/200")?;
    let fd201 = fs::read_to_string("/proc/self/fd/201")?;
    let env = env::var("JAIL_TEST").unwrap_or_default();
    let pid = std::process::id();
    let _ = jail::enter(&Policy {
        empty_root: true,
        drop_caps: true,
        runas: None,
        ..policy(vec![
            allow(libc::SYS_openat, "list /"),
            allow(libc::SYS_getdents64, "list /"),
        ])
    })?;
    let root_entries = fs::read_dir("/")?.count();
    println!(
        "pid={pid} fds={fds:?} ifaces={ifaces:?} fd200={fd200} fd201={fd201} env={env} root_entries={root_entries}"
    );
    Ok(())
}

/// Spawns `jail-probe sleep` with PDEATHSIG SIGKILL, prints its pid and waits to be killed.
fn spawn_sleeper(pidns: bool) -> Result {
    let stderr = io::stderr().as_fd().try_clone_to_owned()?;
    let child = jail::spawn(SpawnSpec {
        exe: env::current_exe()?,
        args: vec!["sleep".into()],
        env: Vec::new(),
        fds: vec![(stderr, 2)],
        namespaces: Namespaces {
            pid: pidns,
            ..Namespaces::default()
        },
        death_signal: Signal::SIGKILL,
    })?;
    println!("{}", child.pid);
    io::stdin().read_to_end(&mut Vec::new())?;
    Ok(())
}
