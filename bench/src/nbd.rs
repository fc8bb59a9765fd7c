//! NBD throughput: `nbdcopy` reading a whole export to `null:` and writing a whole image
//! into a writable export, for a raw and a qcow2 image, through splitvmm, qemu-storage-daemon
//! and qemu-nbd exporting the same file, one after the other in each round.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::wait_for;
use std::time::Instant;

/// One server exporting one image as `disk` on a unix socket.
struct Server {
    child: Child,
    sock: PathBuf,
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

/// MiB/s of one nbdcopy run.
fn copy(from: &str, to: &str, bytes: u64) -> Result<f64, String> {
    let start = Instant::now();
    run(Command::new("nbdcopy").args([from, to]))?;
    Ok(bytes as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64())
}

/// Figures of one operation on one format: MiB/s per contender, per round.
#[derive(Debug, Default)]
pub struct Figures {
    pub per_contender: [Vec<f64>; 3],
}

/// Runs the whole benchmark; returns (label, figures) per format and direction.
pub fn run_all(size_gib: u64, rounds: u32) -> Result<Vec<(String, Figures)>, String> {
    let dir = std::env::temp_dir().join(format!("splitvmm-bench-nbd-{}", std::process::id()));
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
        let (mut read, mut write) = (Figures::default(), Figures::default());
        for _ in 0..rounds {
            for (i, c) in Contender::ALL.into_iter().enumerate() {
                let server = c.start(&dir, &image, fmt)?;
                let uri = format!("nbd+unix:///disk?socket={}", server.sock.display());
                read.per_contender[i].push(copy(&uri, "null:", bytes)?);
                write.per_contender[i].push(copy(&source.display().to_string(), &uri, bytes)?);
                drop(server);
            }
        }
        results.push((format!("nbdcopy read, {size_gib} GiB {fmt}"), read));
        results.push((format!("nbdcopy write, {size_gib} GiB {fmt}"), write));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(results)
}
