//! `drive-mirror` throughput and rate limiting: splitvmm against qemu-storage-daemon doing
//! the same mirror with the same QMP command, and against `cp --sparse=always
//! --reflink=never` (followed by an fsync of the copy, as a mirror flushes its target
//! before READY) as the physical limit.
//!
//! - Throughput: a 4 GiB image, half allocated (1 MiB of data every other MiB), raw→raw
//!   and qcow2→qcow2; `drive-mirror sync=full` to a new file in the same directory, timed
//!   from the command to BLOCK_JOB_READY (the whole image copied and the target flushed),
//!   then cancelled (a point-in-time copy) and the target removed. The source is read once
//!   before the first round, so every contender reads it from the page cache (warm cache).
//!   Each round starts with another contender.
//! - Rate limit: a fully allocated 1 GiB raw image mirrored with `speed` set; the average
//!   speed over 10 s (from `query-block-jobs` offsets, 1 s after the start) against
//!   `speed`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::compared::{Better, Compared};
use crate::nbd::Server;
use crate::vm::{Scratch, run, splitvmm_bin};
use crate::wait_for;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// A QMP connection; events read while waiting for a reply are kept for [`Qmp::event`].
struct Qmp {
    rd: BufReader<UnixStream>,
    wr: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    fn connect(sock: &Path) -> Result<Self, String> {
        let s = UnixStream::connect(sock).map_err(|e| format!("{}: {e}", sock.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(600)))
            .map_err(|e| e.to_string())?;
        let mut q = Self {
            rd: BufReader::new(s.try_clone().map_err(|e| e.to_string())?),
            wr: s,
            events: Vec::new(),
        };
        q.read()?;
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        if self.rd.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("QMP connection closed".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("{line:?}: {e}"))
    }

    fn cmd(&mut self, execute: &str, arguments: Value) -> Result<Value, String> {
        let msg = json!({"execute": execute, "arguments": arguments}).to_string();
        self.wr
            .write_all(msg.as_bytes())
            .map_err(|e| e.to_string())?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            return match v.get("return") {
                Some(r) => Ok(r.clone()),
                None => Err(format!("{execute}: {v}")),
            };
        }
    }

    fn event(&mut self, name: &str) -> Result<Value, String> {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return Ok(self.events.remove(i));
        }
        loop {
            let v = self.read()?;
            if v["event"] == name {
                return Ok(v);
            }
        }
    }
}

/// Who copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Splitvmm,
    Qsd,
    Cp,
}

impl Who {
    const ALL: [Who; 3] = [Self::Splitvmm, Self::Qsd, Self::Cp];

    fn name(self) -> &'static str {
        match self {
            Self::Splitvmm => "splitvmm",
            Self::Qsd => "qemu-storage-daemon",
            Self::Cp => "cp",
        }
    }

    /// A server with `image` (format `fmt`) as device/node `disk`, QMP on its socket.
    fn start(self, dir: &Path, image: &Path, fmt: &str) -> Result<Server, String> {
        let sock = dir.join(format!("{}.qmp", self.name()));
        let _ = std::fs::remove_file(&sock);
        let qmp = format!("unix:{},server=on,wait=off", sock.display());
        let mut child = match self {
            Self::Splitvmm => Command::new(splitvmm_bin()?)
                .arg("--drive")
                .arg(format!("id=disk,file={},format={fmt}", image.display()))
                .arg("--image-dir")
                .arg(dir)
                .arg("--qmp")
                .arg(qmp)
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| format!("splitvmm: {e}"))?,
            Self::Qsd => Command::new("qemu-storage-daemon")
                .arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=file0,filename={}",
                    image.display()
                ))
                .arg("--blockdev")
                .arg(format!("driver={fmt},node-name=disk,file=file0"))
                .arg("--chardev")
                .arg(format!(
                    "socket,id=m,path={},server=on,wait=off",
                    sock.display()
                ))
                .args(["--monitor", "chardev=m"])
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| format!("qemu-storage-daemon: {e}"))?,
            Self::Cp => return Err("cp is not a server".into()),
        };
        wait_for(&sock, &mut child)?;
        Ok(Server { child, sock })
    }
}

/// Writes a sparse raw image of `size` with 1 MiB of data at every even MiB.
fn half_allocated(path: &Path, size: u64) -> Result<(), String> {
    let f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.set_len(size).map_err(|e| e.to_string())?;
    let mut chunk = vec![0u8; MIB as usize];
    for (i, b) in chunk.iter_mut().enumerate() {
        *b = (i % 253) as u8 | 0x80;
    }
    let mut off = 0;
    while off < size {
        f.write_all_at(&chunk, off).map_err(|e| e.to_string())?;
        off += 2 * MIB;
    }
    f.sync_all().map_err(|e| e.to_string())
}

/// Reads a file once so it is in the page cache.
fn warm(path: &Path) -> Result<(), String> {
    run(Command::new("cat")
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::null()))
}

/// Seconds one contender takes to copy `src` (format `fmt`) to `dst`.
fn one_copy(who: Who, dir: &Path, src: &Path, dst: &Path, fmt: &str) -> Result<f64, String> {
    let _ = std::fs::remove_file(dst);
    let secs = if who == Who::Cp {
        let t = Instant::now();
        run(Command::new("cp")
            .args(["--sparse=always", "--reflink=never"])
            .arg(src)
            .arg(dst))?;
        run(Command::new("sync").arg(dst))?;
        t.elapsed().as_secs_f64()
    } else {
        let server = who.start(dir, src, fmt)?;
        let mut q = Qmp::connect(&server.sock)?;
        let t = Instant::now();
        q.cmd(
            "drive-mirror",
            json!({"device": "disk", "job-id": "m", "target": dst, "format": fmt,
                   "sync": "full"}),
        )?;
        q.event("BLOCK_JOB_READY")?;
        let secs = t.elapsed().as_secs_f64();
        q.cmd("block-job-cancel", json!({"device": "m"}))?;
        q.event("BLOCK_JOB_COMPLETED")?;
        drop(q);
        drop(server);
        secs
    };
    check_copy(src, dst, fmt)?;
    std::fs::remove_file(dst).map_err(|e| e.to_string())?;
    Ok(secs)
}

/// The copy must hold the same data (a benchmark of a wrong copy is worth nothing).
fn check_copy(src: &Path, dst: &Path, fmt: &str) -> Result<(), String> {
    run(Command::new("qemu-img")
        .args(["compare", "-q", "-f", fmt, "-F", fmt])
        .arg(src)
        .arg(dst))
    .map_err(|e| format!("the copy differs from the source: {e}"))
}

/// Seconds to READY of each contender over `rounds` rounds, for one format.
fn throughput(
    scratch: &Scratch,
    size: u64,
    fmt: &str,
    rounds: u32,
) -> Result<Vec<Compared>, String> {
    let dir = &scratch.dir;
    let raw = dir.join("mirror-src.raw");
    if !raw.exists() {
        half_allocated(&raw, size)?;
    }
    let src: PathBuf = if fmt == "qcow2" {
        let q = dir.join("mirror-src.qcow2");
        if !q.exists() {
            run(Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(&q))?;
        }
        q
    } else {
        raw
    };
    warm(&src)?;
    let dst = dir.join(format!("mirror-dst.{fmt}"));
    let mut times: [Vec<f64>; 3] = Default::default();
    for round in 0..rounds {
        for i in 0..3 {
            let k = (i + round as usize) % 3;
            let t = one_copy(Who::ALL[k], dir, &src, &dst, fmt)?;
            eprintln!("  {fmt} round {round}: {} {t:.2} s", Who::ALL[k].name());
            times[k].push(t);
        }
    }
    let gib = size / GIB;
    let mut vs_qsd = Compared::new(
        format!(
            "drive-mirror {fmt}->{fmt}, {gib} GiB half allocated, to READY, vs qemu-storage-daemon"
        ),
        "s",
        Better::Lower,
    )
    .with_target(1.0);
    vs_qsd.splitvmm = times[0].clone();
    vs_qsd.qemu = times[1].clone();
    let mut vs_cp = Compared::new(
        format!(
            "drive-mirror {fmt}->{fmt}, {gib} GiB half allocated, vs cp --sparse=always \
             --reflink=never + fsync (the QEMU row is cp)"
        ),
        "s",
        Better::Lower,
    )
    .with_target(1.25);
    vs_cp.splitvmm = times[0].clone();
    vs_cp.qemu = times[2].clone();
    Ok(vec![vs_qsd, vs_cp])
}

/// The average speed (bytes/s) a mirror with `speed` keeps over `window`, 1 s after its
/// start.
fn rate(who: Who, dir: &Path, src: &Path, speed: u64, window: Duration) -> Result<f64, String> {
    let dst = dir.join("rate-dst.raw");
    let _ = std::fs::remove_file(&dst);
    let server = who.start(dir, src, "raw")?;
    let mut q = Qmp::connect(&server.sock)?;
    q.cmd(
        "drive-mirror",
        json!({"device": "disk", "job-id": "m", "target": dst, "format": "raw",
               "sync": "full", "speed": speed}),
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let offset = |q: &mut Qmp| -> Result<(u64, Instant), String> {
        let jobs = q.cmd("query-block-jobs", json!({}))?;
        let o = jobs[0]["offset"]
            .as_u64()
            .ok_or(format!("no job: {jobs}"))?;
        Ok((o, Instant::now()))
    };
    let (o1, t1) = offset(&mut q)?;
    std::thread::sleep(window);
    let (o2, t2) = offset(&mut q)?;
    q.cmd("block-job-cancel", json!({"device": "m", "force": true}))?;
    q.event("BLOCK_JOB_CANCELLED")?;
    drop(q);
    drop(server);
    let _ = std::fs::remove_file(&dst);
    Ok((o2 - o1) as f64 / (t2 - t1).as_secs_f64())
}

/// Every mirror figure: throughput per format, then the rate-limit error (percent).
pub fn run_all(
    size_gib: u64,
    rounds: u32,
    formats: &[String],
) -> Result<(Vec<Compared>, String), String> {
    let scratch = Scratch::new("mirror")?;
    let mut all = Vec::new();
    for fmt in formats {
        all.extend(throughput(&scratch, size_gib * GIB, fmt, rounds)?);
        let _ = std::fs::remove_file(scratch.dir.join(format!("mirror-src.{fmt}")));
    }
    let _ = std::fs::remove_file(scratch.dir.join("mirror-src.raw"));
    let src = scratch.raw_image("rate-src.raw", GIB)?;
    warm(&src)?;
    let speed = 50 * MIB;
    let window = Duration::from_secs(10);
    let mut err = Compared::new(
        format!(
            "rate limit: |average speed over 10 s / speed - 1|, speed {} MiB/s",
            speed / MIB
        ),
        "%",
        Better::Lower,
    );
    let mut note = String::new();
    for round in 0..rounds {
        for who in [Who::Splitvmm, Who::Qsd] {
            let r = rate(who, &scratch.dir, &src, speed, window)?;
            let e = (r / speed as f64 - 1.0).abs() * 100.0;
            eprintln!(
                "  rate round {round}: {} {:.2} MiB/s ({e:.2} % off)",
                who.name(),
                r / MIB as f64
            );
            match who {
                Who::Splitvmm => err.splitvmm.push(e),
                _ => err.qemu.push(e),
            }
        }
    }
    let worst = err.splitvmm.iter().copied().fold(0.0, f64::max);
    note.push_str(&format!(
        "rate limit: splitvmm's worst error {worst:.2} % (target: within 2 %: {})\n",
        if worst <= 2.0 { "met" } else { "NOT met" }
    ));
    note.push_str("page cache warm: each source read once before the first round");
    all.push(err);
    Ok((all, note))
}
