//! NBD throughput: `nbdcopy` reading a whole export to `null:` and writing a whole image
//! into a writable export, for a raw and a qcow2 image, through splitvmm, qemu-storage-daemon
//! and qemu-nbd exporting the same file, one after the other in each round.
//!
//! Each round starts with a different contender, so none always runs first after the image
//! was made or after the other format's rounds, and the files are read once, untimed,
//! before the first round (page cache warm). Besides the throughput, every copy records the
//! CPU time of the server (its whole process tree) and of `nbdcopy`: on a shared machine
//! wall-clock throughput mostly says how much CPU the run got, CPU time per byte what each
//! server costs.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::wait_for;
use std::time::Instant;

/// One server exporting one image as `disk` on a unix socket (or, for the mirror
/// benchmark, any server stopped the same way).
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) sock: PathBuf,
}

impl Drop for Server {
    /// Stops the server and returns once the image is free for the next one. splitvmm shuts
    /// block-proc down on SIGTERM and exits after it; with SIGKILL, block-proc would die
    /// (parent-death signal) a moment after `wait` returns, still holding the image lock
    /// the next server takes.
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        if let Ok(pid) = i32::try_from(self.child.id())
            && kill(Pid::from_raw(pid), Signal::SIGTERM).is_ok()
        {
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// The servers compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contender {
    Splitvmm,
    QemuStorageDaemon,
    QemuNbd,
}

impl Contender {
    pub const ALL: [Contender; 3] = [Self::Splitvmm, Self::QemuStorageDaemon, Self::QemuNbd];

    pub fn name(self) -> &'static str {
        match self {
            Self::Splitvmm => "splitvmm",
            Self::QemuStorageDaemon => "qemu-storage-daemon",
            Self::QemuNbd => "qemu-nbd",
        }
    }

    fn start(self, dir: &Path, image: &Path, fmt: &str) -> Result<Server, String> {
        let sock = dir.join(format!("{}.sock", self.name()));
        let _ = std::fs::remove_file(&sock);
        let img = image.display();
        let mut child = match self {
            Self::Splitvmm => {
                let bin = std::env::current_exe().map_err(|e| e.to_string())?;
                let bin = bin.parent().ok_or("no bin dir")?.join("splitvmm");
                let qmp = dir.join("splitvmm-qmp.sock");
                let _ = std::fs::remove_file(&qmp);
                let mut child = Command::new(bin)
                    .arg("--drive")
                    .arg(format!("id=disk,file={img},format={fmt}"))
                    .arg("--qmp")
                    .arg(format!("unix:{},server=on,wait=off", qmp.display()))
                    .stdout(Stdio::null())
                    .spawn()
                    .map_err(|e| e.to_string())?;
                wait_for(&qmp, &mut child)?;
                let s = UnixStream::connect(&qmp).map_err(|e| e.to_string())?;
                let mut rd = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
                let mut wr = s;
                let mut line = String::new();
                for msg in [
                    r#"{"execute":"qmp_capabilities"}"#.to_string(),
                    format!(
                        r#"{{"execute":"nbd-server-start","arguments":{{"addr":{{"type":"unix","data":{{"path":"{}"}}}}}}}}"#,
                        sock.display()
                    ),
                    r#"{"execute":"nbd-server-add","arguments":{"device":"disk","writable":true}}"#
                        .to_string(),
                ] {
                    line.clear();
                    if msg.contains("qmp_capabilities") {
                        rd.read_line(&mut line).map_err(|e| e.to_string())?;
                        line.clear();
                    }
                    wr.write_all(msg.as_bytes()).map_err(|e| e.to_string())?;
                    rd.read_line(&mut line).map_err(|e| e.to_string())?;
                    if line.contains("\"error\"") {
                        return Err(format!("splitvmm: {line}"));
                    }
                }
                child
            }
            Self::QemuStorageDaemon => Command::new("qemu-storage-daemon")
                .arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=file0,filename={img},cache.direct=off"
                ))
                .arg("--blockdev")
                .arg(format!("driver={fmt},node-name=disk,file=file0"))
                .arg("--nbd-server")
                .arg(format!("addr.type=unix,addr.path={}", sock.display()))
                .args([
                    "--export",
                    "type=nbd,id=e0,node-name=disk,name=disk,writable=on",
                ])
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| e.to_string())?,
            Self::QemuNbd => Command::new("qemu-nbd")
                .args(["-f", fmt, "-x", "disk", "-t", "--shared=8", "-k"])
                .arg(&sock)
                .arg(image)
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| e.to_string())?,
        };
        wait_for(&sock, &mut child)?;
        Ok(Server { child, sock })
    }
}

/// CPU seconds (user and system) of process `pid` and all its descendants, threads that
/// have exited included; 0 for what cannot be read (a process that just went away).
fn tree_cpu_seconds(pid: u32) -> f64 {
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let mut total = 0.0;
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        // Fields after the command name, which is in parentheses and may hold spaces:
        // utime and stime are the 14th and 15th fields of the line.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        total += (ticks(11) + ticks(12)) / tick;
        let tasks = std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten();
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            todo.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    total
}

/// CPU seconds used by the children this process has waited for.
fn children_cpu_seconds() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_CHILDREN).map_or(0.0, |u| {
        let (a, b) = (u.user_time(), u.system_time());
        a.tv_sec() as f64 + b.tv_sec() as f64 + (a.tv_usec() + b.tv_usec()) as f64 / 1e6
    })
}

/// One nbdcopy run through `server`.
struct Sample {
    mib_per_s: f64,
    /// MiB per CPU-second of the server.
    server_mib_per_cpu_s: f64,
    /// MiB per CPU-second of the server and nbdcopy together.
    total_mib_per_cpu_s: f64,
}

fn copy(server: &Server, from: &str, to: &str, bytes: u64) -> Result<Sample, String> {
    let mib = bytes as f64 / (1 << 20) as f64;
    let (server0, client0) = (tree_cpu_seconds(server.child.id()), children_cpu_seconds());
    let start = Instant::now();
    run(Command::new("nbdcopy").args([from, to]))?;
    let secs = start.elapsed().as_secs_f64();
    let server_cpu = tree_cpu_seconds(server.child.id()) - server0;
    let client_cpu = children_cpu_seconds() - client0;
    Ok(Sample {
        mib_per_s: mib / secs,
        server_mib_per_cpu_s: mib / server_cpu.max(1e-3),
        total_mib_per_cpu_s: mib / (server_cpu + client_cpu).max(1e-3),
    })
}

/// Reads a file once, untimed, so that its pages are in the page cache.
fn warm(path: &Path) -> Result<(), String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    std::io::copy(&mut f, &mut std::io::sink()).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

/// Figures of one operation on one format, per contender, per round: MiB/s, and MiB per
/// CPU-second of the server alone and of the server and nbdcopy together.
#[derive(Debug, Default)]
pub struct Figures {
    pub per_contender: [Vec<f64>; 3],
    pub server_efficiency: [Vec<f64>; 3],
    pub total_efficiency: [Vec<f64>; 3],
}

impl Figures {
    fn push(&mut self, i: usize, s: Sample) {
        self.per_contender[i].push(s.mib_per_s);
        self.server_efficiency[i].push(s.server_mib_per_cpu_s);
        self.total_efficiency[i].push(s.total_mib_per_cpu_s);
    }
}

/// Runs the whole benchmark; returns (label, figures) per format and direction.
pub fn run_all(size_gib: u64, rounds: u32) -> Result<Vec<(String, Figures)>, String> {
    /// The scratch directory (two 2 GiB files and more), removed however the run ends.
    struct Scratch(PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let scratch =
        Scratch(std::env::temp_dir().join(format!("splitvmm-bench-nbd-{}", std::process::id())));
    let dir = scratch.0.clone();
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let bytes = size_gib << 30;
    // A source full of data (no holes, so every byte crosses the wire).
    let source = dir.join("source.raw");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&source)
        .arg(format!("{size_gib}G")))?;
    let mut fill = Command::new("qemu-io");
    fill.args(["-f", "raw"]);
    for i in 0..size_gib * 4 {
        fill.args(["-c", &format!("write -P 0x5a {}M 256M", i * 256)]);
    }
    run(fill.arg(&source))?;
    let mut results = Vec::new();
    for fmt in ["raw", "qcow2"] {
        let image = dir.join(format!("image.{fmt}"));
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", fmt])
            .arg(&source)
            .arg(&image))?;
        warm(&source)?;
        warm(&image)?;
        let (mut read, mut write) = (Figures::default(), Figures::default());
        let n = Contender::ALL.len();
        for round in 0..rounds as usize {
            for i in (0..n).map(|k| (k + round) % n) {
                let server = Contender::ALL[i].start(&dir, &image, fmt)?;
                let uri = format!("nbd+unix:///disk?socket={}", server.sock.display());
                read.push(i, copy(&server, &uri, "null:", bytes)?);
                write.push(
                    i,
                    copy(&server, &source.display().to_string(), &uri, bytes)?,
                );
                drop(server);
            }
        }
        results.push((format!("nbdcopy read, {size_gib} GiB {fmt}"), read));
        results.push((format!("nbdcopy write, {size_gib} GiB {fmt}"), write));
    }
    drop(scratch);
    Ok(results)
}
