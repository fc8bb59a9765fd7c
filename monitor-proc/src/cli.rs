//! The `splitvmm` command line (DESIGN.md §8): parsing and validation. A bad value names
//! the option and the value; `main` exits with status 1 on any of them.

use std::path::PathBuf;

use clap::Parser;
use ipc::block::{DriveConfig, ImageFormat, OnError};

const EXAMPLES: &str = "\
Examples:
  # Storage daemon (no guest): one qcow2 drive, QMP on a unix socket
  splitvmm --drive id=disk0,file=/srv/img/disk0.qcow2,format=qcow2 \\
           --qmp unix:/run/splitvmm/qmp.sock,server=on,wait=off --pidfile /run/splitvmm.pid

  # A VM running the embedded workload guest, QMP on TCP as well
  splitvmm --name vm1 --memory 512M --cpus 1 --kernel builtin:workload \\
           --drive id=disk0,file=disk0.raw,format=raw \\
           --qmp unix:/tmp/vm1.sock,server=on,wait=off --qmp tcp:127.0.0.1:4444,server=on,wait=off

  # A Linux guest (the drive is its /dev/vda; poweroff in the guest ends splitvmm)
  splitvmm --memory 1G --cpus 2 --kernel vmlinuz --initrd initrd.img \\
           --append 'console=ttyS0 root=/dev/vda' \\
           --drive id=vda,file=disk.qcow2,format=qcow2 --serial stdio";

/// splitvmm: a KVM virtual machine monitor split into three sandboxed processes, driven
/// over QMP like QEMU.
#[derive(Debug, Parser)]
#[command(name = "splitvmm", version, after_help = EXAMPLES)]
pub struct Cli {
    /// Name of the VM, reported by query-name.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Guest RAM size: a number with an optional K, M, G or T suffix (default unit: MiB).
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_memory)]
    pub memory: u64,

    /// Number of vCPUs (1 to 255).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=255))]
    pub cpus: u8,

    /// Guest kernel: a Linux bzImage or vmlinux, a static ELF with the workload guest's
    /// ABI, or builtin:workload for the embedded workload guest. Without it, splitvmm runs
    /// as a storage daemon (QMP + block-proc).
    #[arg(long, value_name = "PATH|builtin:NAME", value_parser = parse_kernel)]
    pub kernel: Option<Kernel>,

    /// Initial ramdisk for a Linux kernel.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line (or the workload guest's arguments).
    #[arg(long, value_name = "CMDLINE", requires = "kernel", default_value = "")]
    pub append: String,

    /// A disk: `id=ID,file=PATH,format=raw|qcow2[,readonly=on][,werror=W][,rerror=R]`.
    /// format= is required: images are never probed. W and R are report, ignore,
    /// enospc or stop (defaults: werror=enospc, rerror=report).
    #[arg(long, value_name = "SPEC", value_parser = parse_drive)]
    pub drive: Vec<DriveConfig>,

    /// A QMP server socket: unix:PATH,server=on,wait=off or tcp:HOST:PORT,server=on,wait=off.
    /// May be given several times.
    #[arg(long, value_name = "ADDR", value_parser = parse_qmp)]
    pub qmp: Vec<QmpAddr>,

    /// Where the guest's serial port goes: stdio, file:PATH or null.
    #[arg(long, value_name = "stdio|file:PATH|null", default_value = "null", value_parser = parse_serial)]
    pub serial: Serial,

    /// Wait for an incoming migration on URI (tcp:HOST:PORT, unix:PATH), or `defer` to
    /// wait for migrate-incoming.
    #[arg(long, value_name = "URI|defer")]
    pub incoming: Option<String>,

    /// Do not start the guest until `cont`.
    #[arg(long)]
    pub paused: bool,

    /// Exit instead of rebooting when the guest resets itself (i8042 reset line, triple
    /// fault), as QEMU's -no-reboot: SHUTDOWN with reason guest-reset.
    #[arg(long = "no-reboot")]
    pub no_reboot: bool,

    /// A directory images (and their backing files) may be opened under. May be repeated;
    /// each drive's own directory is always allowed.
    #[arg(long = "image-dir", value_name = "DIR", value_parser = parse_dir)]
    pub image_dir: Vec<PathBuf>,

    /// Run each process in its sandbox (on), or unconfined for debugging (off).
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub sandbox: bool,

    /// Drop to this user and group after start-up (monitor, block-proc and vmm-proc; the
    /// launcher stays root with only what starting a jailed child needs). Unix sockets and
    /// the pidfile are removed at exit as this user.
    #[arg(long, value_name = "UID:GID", value_parser = jail::parse_runas)]
    pub runas: Option<(u32, u32)>,

    /// Write the monitor's pid here once every socket is listening; removed at exit.
    #[arg(long, value_name = "PATH")]
    pub pidfile: Option<PathBuf>,
}

/// `--kernel`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kernel {
    Builtin(String),
    File(PathBuf),
}

/// The guests embedded in splitvmm.
pub const BUILTIN_KERNELS: &[&str] = &["workload"];

/// `--qmp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpAddr {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

/// `--serial`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serial {
    Stdio,
    File(PathBuf),
    Null,
}

fn parse_memory(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c.to_ascii_uppercase()),
        _ => (s, 'M'),
    };
    let shift = match unit {
        'K' => 10,
        'M' => 20,
        'G' => 30,
        'T' => 40,
        _ => return Err(format!("unknown size suffix '{unit}' (use K, M, G or T)")),
    };
    let n: u64 = digits.parse().map_err(|_| "not a size".to_string())?;
    let bytes = n
        .checked_shl(shift)
        .filter(|b| b >> shift == n)
        .ok_or("too large")?;
    if bytes < 2 << 20 {
        return Err("guest RAM must be at least 2M".into());
    }
    if bytes % 4096 != 0 {
        return Err("guest RAM must be a multiple of 4K".into());
    }
    Ok(bytes)
}

fn parse_kernel(s: &str) -> Result<Kernel, String> {
    match s.strip_prefix("builtin:") {
        Some(name) if BUILTIN_KERNELS.contains(&name) => Ok(Kernel::Builtin(name.into())),
        Some(name) => Err(format!(
            "no built-in kernel '{name}' (built in: {})",
            BUILTIN_KERNELS.join(", ")
        )),
        None => Ok(Kernel::File(s.into())),
    }
}

/// Splits `key=value,key=value`. A bare `key` is `key=on`.
fn options(s: &str) -> impl Iterator<Item = (&str, &str)> {
    s.split(',')
        .map(|kv| kv.split_once('=').unwrap_or((kv, "on")))
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err("expected on or off".into()),
    }
}

fn parse_on_error(key: &str, s: &str) -> Result<OnError, String> {
    match s {
        "report" => Ok(OnError::Report),
        "ignore" => Ok(OnError::Ignore),
        "enospc" => Ok(OnError::Enospc),
        "stop" => Ok(OnError::Stop),
        _ => Err(format!(
            "{key}={s}: expected report, ignore, enospc or stop"
        )),
    }
}

fn parse_drive(s: &str) -> Result<DriveConfig, String> {
    let (mut id, mut file, mut format) = (None, None, None);
    let (mut read_only, mut werror, mut rerror) = (false, OnError::Enospc, OnError::Report);
    for (k, v) in options(s) {
        match k {
            "id" if ipc::common::id_wellformed(v) => id = Some(v.to_string()),
            "id" => {
                return Err(format!(
                    "id={v}: ids start with a letter and contain only letters, digits, '-', '.', '_'"
                ));
            }
            "file" if !v.is_empty() => file = Some(PathBuf::from(v)),
            "format" => {
                format = Some(match v {
                    "raw" => ImageFormat::Raw,
                    "qcow2" => ImageFormat::Qcow2,
                    _ => return Err(format!("format={v}: expected raw or qcow2")),
                })
            }
            "readonly" => read_only = parse_on_off(v).map_err(|e| format!("readonly={v}: {e}"))?,
            "werror" => werror = parse_on_error(k, v)?,
            "rerror" => rerror = parse_on_error(k, v)?,
            _ => return Err(format!("unknown drive option '{k}'")),
        }
    }
    Ok(DriveConfig {
        id: id.ok_or("id= is required")?,
        file: file.ok_or("file= is required")?,
        format: format.ok_or("format= is required (images are never probed)")?,
        read_only,
        werror,
        rerror,
    })
}

fn parse_qmp(s: &str) -> Result<QmpAddr, String> {
    let (addr, opts) = s.split_once(',').unwrap_or((s, ""));
    let addr = if let Some(path) = addr.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("unix: needs a path".into());
        }
        QmpAddr::Unix(path.into())
    } else if let Some(hp) = addr.strip_prefix("tcp:") {
        let (host, port) = hp.rsplit_once(':').ok_or("tcp: needs HOST:PORT")?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = port.parse().map_err(|_| format!("bad port '{port}'"))?;
        QmpAddr::Tcp {
            host: if host.is_empty() {
                "0.0.0.0".into()
            } else {
                host.into()
            },
            port,
        }
    } else {
        return Err("expected unix:PATH or tcp:HOST:PORT".into());
    };
    let (mut server, mut wait) = (false, true);
    for (k, v) in options(opts).filter(|(k, _)| !k.is_empty()) {
        match k {
            "server" => server = parse_on_off(v).map_err(|e| format!("server={v}: {e}"))?,
            "wait" => wait = parse_on_off(v).map_err(|e| format!("wait={v}: {e}"))?,
            "nowait" => wait = false,
            _ => return Err(format!("unknown option '{k}'")),
        }
    }
    if !server || wait {
        return Err("only server=on,wait=off is supported".into());
    }
    Ok(addr)
}

fn parse_serial(s: &str) -> Result<Serial, String> {
    match s {
        "stdio" => Ok(Serial::Stdio),
        "null" => Ok(Serial::Null),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(Serial::File(p.into())),
            _ => Err("expected stdio, file:PATH or null".into()),
        },
    }
}

fn parse_dir(s: &str) -> Result<PathBuf, String> {
    let p = std::fs::canonicalize(s).map_err(|e| e.to_string())?;
    if !p.is_dir() {
        return Err("not a directory".into());
    }
    Ok(p)
}

impl Cli {
    /// Checks that hold across options; each message names the option and value.
    pub fn validate(&self) -> Result<(), String> {
        let mut ids = std::collections::HashSet::new();
        for d in &self.drive {
            if !ids.insert(&d.id) {
                return Err(format!("--drive id={}: duplicate drive id", d.id));
            }
        }
        if let Some(name) = &self.name
            && (name.is_empty() || name.contains(','))
        {
            return Err(format!(
                "--name '{name}': must be non-empty and without ','"
            ));
        }
        if let (Some(Kernel::Builtin(_)), Some(initrd)) = (&self.kernel, &self.initrd) {
            return Err(format!(
                "--initrd {}: a built-in kernel takes no initrd",
                initrd.display()
            ));
        }
        if let Some(uri) = &self.incoming
            && self.kernel.is_none()
        {
            return Err(format!("--incoming {uri}: needs a guest (--kernel)"));
        }
        if let (Some((u, g)), false) = (self.runas, self.sandbox) {
            return Err(format!(
                "--runas {u}:{g}: needs the sandbox (the user switch is part of each jail)"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        let cli = Cli::try_parse_from(std::iter::once("splitvmm").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.validate()?;
        Ok(cli)
    }

    #[test]
    fn full_command_line() {
        let cli = parse(&[
            "--name",
            "vm1",
            "--memory",
            "1G",
            "--cpus",
            "2",
            "--kernel",
            "builtin:workload",
            "--append",
            "x=1",
            "--drive",
            "id=d0,file=/tmp/a.qcow2,format=qcow2,readonly=on,werror=stop",
            "--qmp",
            "unix:/tmp/q.sock,server=on,wait=off",
            "--qmp",
            "tcp:127.0.0.1:4444,server,nowait",
            "--serial",
            "file:/tmp/s.log",
            "--paused",
            "--image-dir",
            "/tmp",
            "--sandbox",
            "off",
            "--pidfile",
            "/tmp/p",
        ])
        .expect("valid");
        assert_eq!(cli.memory, 1 << 30);
        assert_eq!(cli.kernel, Some(Kernel::Builtin("workload".into())));
        assert_eq!(cli.drive[0].format, ImageFormat::Qcow2);
        assert!(cli.drive[0].read_only);
        assert_eq!(cli.drive[0].werror, OnError::Stop);
        assert_eq!(
            cli.qmp[1],
            QmpAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 4444
            }
        );
        assert_eq!(cli.serial, Serial::File("/tmp/s.log".into()));
        assert!(!cli.sandbox);
    }

    #[test]
    fn bad_values_name_the_option_and_the_value() {
        for (args, needle) in [
            (&["--memory", "12X"][..], "'12X' for '--memory"),
            (&["--memory", "1"][..], "'1' for '--memory"),
            (&["--cpus", "0"][..], "'0' for '--cpus"),
            (&["--drive", "id=d0,file=/x"][..], "format= is required"),
            (&["--drive", "id=0d,file=/x,format=raw"][..], "id=0d"),
            (&["--drive", "id=d0,file=/x,format=vmdk"][..], "format=vmdk"),
            (&["--qmp", "unix:/x"][..], "'unix:/x' for '--qmp"),
            (&["--qmp", "udp:1:2,server=on,wait=off"][..], "--qmp"),
            (&["--kernel", "builtin:nope"][..], "builtin:nope"),
            (&["--sandbox", "maybe"][..], "'maybe' for '--sandbox"),
            (&["--image-dir", "/nonexistent/dir"][..], "/nonexistent/dir"),
            (&["--serial", "pty"][..], "'pty' for '--serial"),
        ] {
            let err = parse(args).expect_err("must fail");
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        let err = parse(&[
            "--drive",
            "id=a,file=/x,format=raw",
            "--drive",
            "id=a,file=/y,format=raw",
        ])
        .expect_err("duplicate");
        assert!(err.contains("id=a"), "{err}");
    }
}
