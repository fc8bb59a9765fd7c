//! `block-stream` of a backing chain: splitvmm (the chain's top as a `--drive`) against
//! qemu-storage-daemon (the same chain as a `--blockdev` node), each streaming the whole
//! chain into a fresh, empty qcow2 top image over the same base. The base is a qcow2
//! image of `size` with half of it allocated (two runs of data, a quarter of the image
//! each), so the copy follows the allocation. Each round starts with a different contender;
//! the base is read once, untimed, before the first round (page cache warm). The time is
//! from sending `block-stream` to `BLOCK_JOB_COMPLETED`; the figure is MiB of allocated
//! data streamed per second. After each run (untimed) `qemu-img compare` checks the top
//! against the base.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use crate::compared::{Better, Compared};
use crate::wait_for;

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// A QMP connection that reads replies and events line by line.
struct Qmp {
    rd: BufReader<UnixStream>,
    wr: UnixStream,
}

impl Qmp {
    fn connect(sock: &Path) -> Result<Self, String> {
        let s = UnixStream::connect(sock).map_err(|e| e.to_string())?;
        let rd = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        let mut q = Self { rd, wr: s };
        q.line()?; // greeting
        q.cmd(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(q)
    }

    fn line(&mut self) -> Result<String, String> {
        let mut l = String::new();
        match self.rd.read_line(&mut l) {
            Ok(0) => Err("QMP connection closed".into()),
            Ok(_) => Ok(l),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Sends a command; returns once its reply came (events before it are dropped).
    fn cmd(&mut self, msg: &str) -> Result<(), String> {
        self.wr
            .write_all(msg.as_bytes())
            .map_err(|e| e.to_string())?;
        loop {
            let l = self.line()?;
            if l.contains("\"error\"") {
                return Err(format!("{msg}: {l}"));
            }
            if l.contains("\"return\"") {
                return Ok(());
            }
        }
    }

    /// Waits for `BLOCK_JOB_COMPLETED`; an error in it is an error.
    fn completed(&mut self) -> Result<(), String> {
        loop {
            let l = self.line()?;
            if l.contains("BLOCK_JOB_COMPLETED") {
                return if l.contains("\"error\"") {
                    Err(l)
                } else {
                    Ok(())
                };
            }
        }
    }
}

struct Server(Child);

impl Server {
    /// `quit`, then waits (10 s at most) for the process to end, so the image is closed
    /// and unlocked before it is checked.
    fn quit(mut self, q: &mut Qmp) -> Result<(), String> {
        q.cmd(r#"{"execute":"quit"}"#)?;
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fresh empty top image over `base`.
fn fresh_top(base: &Path, top: &Path) -> Result<(), String> {
    let _ = std::fs::remove_file(top);
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(base)
        .arg(top))
}

/// Streams `top`'s chain with splitvmm; returns the seconds it took.
fn splitvmm(dir: &Path, top: &Path) -> Result<f64, String> {
    let bin = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = bin.parent().ok_or("no bin dir")?.join("splitvmm");
    let qmp = dir.join("splitvmm-qmp.sock");
    let _ = std::fs::remove_file(&qmp);
    let mut child = Command::new(bin)
        .arg("--drive")
        .arg(format!("id=disk,file={},format=qcow2", top.display()))
        .arg("--image-dir")
        .arg(dir)
        .arg("--qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    wait_for(&qmp, &mut child)?;
    let server = Server(child);
    let mut q = Qmp::connect(&qmp)?;
    let t = Instant::now();
    q.cmd(r#"{"execute":"block-stream","arguments":{"device":"disk"}}"#)?;
    q.completed()?;
    let secs = t.elapsed().as_secs_f64();
    server.quit(&mut q)?;
    Ok(secs)
}

/// Streams `top`'s chain with qemu-storage-daemon; returns the seconds it took.
fn qsd(dir: &Path, top: &Path) -> Result<f64, String> {
    let qmp = dir.join("qsd-qmp.sock");
    let _ = std::fs::remove_file(&qmp);
    let mut child = Command::new("qemu-storage-daemon")
        .arg("--chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=m",
            qmp.display()
        ))
        .args(["--monitor", "chardev=m"])
        .arg("--blockdev")
        .arg(format!(
            "driver=qcow2,node-name=disk,file.driver=file,file.filename={}",
            top.display()
        ))
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    wait_for(&qmp, &mut child)?;
    let server = Server(child);
    let mut q = Qmp::connect(&qmp)?;
    let t = Instant::now();
    q.cmd(r#"{"execute":"block-stream","arguments":{"device":"disk","job-id":"disk"}}"#)?;
    q.completed()?;
    let secs = t.elapsed().as_secs_f64();
    server.quit(&mut q)?;
    Ok(secs)
}

/// Runs `rounds` rounds of both; `size` in MiB.
pub fn run_all(size: u64, rounds: u32) -> Result<Vec<Compared>, String> {
    let dir = std::env::temp_dir().join(format!("splitvmm-bench-stream-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let result = (|| {
        let base = dir.join("base.qcow2");
        let top = dir.join("top.qcow2");
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg(format!("{size}M")))?;
        let q = size / 4;
        run(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c"])
            .arg(format!("write -P 0x5a 0 {q}M"))
            .arg("-c")
            .arg(format!("write -P 0xa5 {}M {q}M", 2 * q))
            .arg(&base))?;
        std::fs::read(&base).map_err(|e| e.to_string())?;
        let streamed = (2 * q) as f64;
        let mut c = Compared::new(
            format!(
                "block-stream of a {size} MiB chain, {} MiB allocated",
                2 * q
            ),
            "MiB/s",
            Better::Higher,
        )
        .with_target(1.0);
        for round in 0..rounds {
            for who in 0..2 {
                let ours = (round + who) % 2 == 0;
                fresh_top(&base, &top)?;
                if ours {
                    c.splitvmm.push(streamed / splitvmm(&dir, &top)?);
                } else {
                    c.qemu.push(streamed / qsd(&dir, &top)?);
                }
                // Untimed: the top now stands alone with the chain's contents.
                run(Command::new("qemu-img")
                    .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"])
                    .arg(&top)
                    .arg(&base))?;
            }
        }
        Ok(vec![c])
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
