//! QMP round trips: `query-version` (qemu-storage-daemon has no `query-status`) over a unix
//! socket, one request in flight, measured with the same raw-socket client for both.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::wait_for;
use std::time::Instant;

use crate::Report;

struct Server {
    child: Child,
    sock: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

fn start_splitvmm(dir: &Path) -> Result<Server, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe.parent().ok_or("no bin dir")?.join("splitvmm");
    let sock = dir.join("splitvmm.sock");
    let mut child = Command::new(&bin)
        .arg("--qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    wait_for(&sock, &mut child)?;
    Ok(Server { child, sock })
}

fn start_qsd(dir: &Path) -> Result<Server, String> {
    let sock = dir.join("qsd.sock");
    let mut child = Command::new("qemu-storage-daemon")
        .arg("--chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=qmp0",
            sock.display()
        ))
        .args(["--monitor", "chardev=qmp0"])
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("qemu-storage-daemon: {e}"))?;
    wait_for(&sock, &mut child)?;
    Ok(Server { child, sock })
}

/// Round trips per second over `seconds`.
fn round_trips(sock: &Path, seconds: f64) -> Result<f64, String> {
    let s = UnixStream::connect(sock).map_err(|e| e.to_string())?;
    let mut rd = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut wr = s;
    let mut line = String::new();
    rd.read_line(&mut line).map_err(|e| e.to_string())?;
    if !line.starts_with("{\"QMP\"") {
        return Err(format!("no QMP greeting: {line:?}"));
    }
    let mut exchange = |req: &[u8], line: &mut String| -> Result<(), String> {
        wr.write_all(req).map_err(|e| e.to_string())?;
        line.clear();
        rd.read_line(line).map_err(|e| e.to_string())?;
        if line.contains("\"error\"") || line.is_empty() {
            return Err(format!("unexpected reply {line:?}"));
        }
        Ok(())
    };
    exchange(br#"{"execute":"qmp_capabilities"}"#, &mut line)?;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        exchange(br#"{"execute":"query-version"}"#, &mut line)?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

pub fn run(seconds: f64, rounds: u32) -> Result<Report, String> {
    let dir = std::env::temp_dir().join(format!("splitvmm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let ours = start_splitvmm(&dir)?;
    let theirs = start_qsd(&dir)?;
    let mut report = Report {
        name: "QMP query-version round trips",
        unit: "req/s",
        splitvmm: Vec::new(),
        qemu: Vec::new(),
        qemu_name: "qemu-storage-daemon",
    };
    for _ in 0..rounds {
        report.splitvmm.push(round_trips(&ours.sock, seconds)?);
        report.qemu.push(round_trips(&theirs.sock, seconds)?);
    }
    drop((ours, theirs));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}
