//! QMP under load: 64 clients at once issuing queries while a mirror runs, splitvmm against
//! qemu-storage-daemon on the same image, alternating over rounds. Per contender: request
//! latency p50, p99 and max (every request of every client, one in flight per client) and
//! the PSS of the serving processes before the clients connect and after they are done
//! (splitvmm: monitor and block-proc; QEMU: the daemon).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::wait_for;

/// A running server and its QMP sockets: one per client plus one for control. splitvmm
/// serves every client on one socket; a QEMU monitor serves one client at a time, so
/// qemu-storage-daemon gets a monitor per client.
struct Server {
    child: Child,
    socks: Vec<PathBuf>,
}

impl Server {
    fn sock(&self, client: usize) -> PathBuf {
        self.socks[client % self.socks.len()].clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for s in &self.socks {
            let _ = std::fs::remove_file(s);
        }
    }
}

/// What one round measured for one contender.
#[derive(Debug, Clone)]
pub struct Round {
    /// Every request's latency, sorted.
    latencies: Vec<Duration>,
    pss_before_kib: u64,
    pss_after_kib: u64,
}

impl Round {
    fn quantile(&self, q: f64) -> Duration {
        let i = ((self.latencies.len() as f64 - 1.0) * q).round() as usize;
        self.latencies.get(i).copied().unwrap_or_default()
    }
}

fn start_splitvmm(dir: &Path, image: &Path) -> Result<Server, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe.parent().ok_or("no bin dir")?.join("splitvmm");
    let sock = dir.join("splitvmm.sock");
    let mut child = Command::new(&bin)
        .arg("--qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .arg("--drive")
        .arg(format!("id=disk0,file={},format=qcow2", image.display()))
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    wait_for(&sock, &mut child)?;
    Ok(Server {
        child,
        socks: vec![sock],
    })
}

fn start_qsd(dir: &Path, image: &Path, clients: usize) -> Result<Server, String> {
    let socks: Vec<PathBuf> = (0..=clients)
        .map(|i| dir.join(format!("qsd-{i}.sock")))
        .collect();
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=file0",
            image.display()
        ))
        .args(["--blockdev", "driver=qcow2,file=file0,node-name=disk0"]);
    for (i, sock) in socks.iter().enumerate() {
        cmd.arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=qmp{i}",
                sock.display()
            ))
            .arg("--monitor")
            .arg(format!("chardev=qmp{i}"));
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("qemu-storage-daemon: {e}"))?;
    for sock in &socks {
        wait_for(sock, &mut child)?;
    }
    Ok(Server { child, socks })
}

/// A negotiated QMP connection.
struct Qmp {
    rd: BufReader<UnixStream>,
    wr: UnixStream,
    line: String,
}

impl Qmp {
    fn connect(sock: &Path) -> Result<Self, String> {
        let s = UnixStream::connect(sock).map_err(|e| e.to_string())?;
        let rd = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        let mut q = Self {
            rd,
            wr: s,
            line: String::new(),
        };
        q.read()?;
        if !q.line.starts_with("{\"QMP\"") {
            return Err(format!("no QMP greeting: {:?}", q.line));
        }
        q.exec(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(q)
    }

    fn read(&mut self) -> Result<(), String> {
        self.line.clear();
        match self.rd.read_line(&mut self.line) {
            Ok(0) => Err("the server closed the connection".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Sends a command and reads up to its reply (skipping events); fails on an error reply.
    fn exec(&mut self, cmd: &str) -> Result<(), String> {
        self.wr
            .write_all(cmd.as_bytes())
            .map_err(|e| e.to_string())?;
        loop {
            self.read()?;
            if self.line.starts_with("{\"return\"") {
                return Ok(());
            }
            if !self.line.contains("\"event\"") {
                return Err(format!("{cmd}: {}", self.line.trim_end()));
            }
        }
    }
}

/// PSS (KiB) of `pid` and, for splitvmm, its block-proc (the launcher and vmm-proc are not
/// part of what serves QMP and block jobs).
fn pss_kib(pid: u32) -> Result<u64, String> {
    let mut pids = vec![pid];
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for c in children
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
    {
        let grand =
            std::fs::read_to_string(format!("/proc/{c}/task/{c}/children")).unwrap_or_default();
        pids.extend(
            grand
                .split_whitespace()
                .filter_map(|g| g.parse::<u32>().ok()),
        );
    }
    let mut total = 0;
    for p in pids {
        let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
        if p != pid && comm.trim_end() != "block-proc" {
            continue;
        }
        let rollup = std::fs::read_to_string(format!("/proc/{p}/smaps_rollup"))
            .map_err(|e| format!("/proc/{p}/smaps_rollup: {e}"))?;
        total += rollup
            .lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or("no Pss in smaps_rollup")?;
    }
    Ok(total)
}

/// One round against `server`: a slow mirror, then `clients` clients of `queries` each.
fn round(server: &Server, dir: &Path, clients: usize, queries: usize) -> Result<Round, String> {
    let pss_before_kib = pss_kib(server.child.id())?;
    let target = dir.join("target.qcow2");
    let _ = std::fs::remove_file(&target);
    let mut control = Qmp::connect(&server.sock(clients))?;
    control.exec(
        &serde_json::json!({"execute": "drive-mirror", "arguments": {
            "device": "disk0", "job-id": "load", "target": target, "sync": "full",
            "format": "qcow2", "speed": 1 << 20}})
        .to_string(),
    )?;
    let commands = [
        r#"{"execute":"query-block-jobs"}"#,
        r#"{"execute":"query-named-block-nodes"}"#,
        r#"{"execute":"query-version"}"#,
        r#"{"execute":"query-jobs"}"#,
    ];
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let sock = server.sock(c);
            std::thread::spawn(move || -> Result<Vec<Duration>, String> {
                let mut q = Qmp::connect(&sock)?;
                let mut lat = Vec::with_capacity(queries);
                for i in 0..queries {
                    let cmd = commands[(c + i) % commands.len()];
                    let start = Instant::now();
                    q.exec(cmd)?;
                    lat.push(start.elapsed());
                }
                Ok(lat)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(clients * queries);
    for t in threads {
        latencies.extend(t.join().map_err(|_| "a client panicked")??);
    }
    latencies.sort_unstable();
    let pss_after_kib = pss_kib(server.child.id())?;
    control.exec(r#"{"execute":"block-job-cancel","arguments":{"device":"load","force":true}}"#)?;
    Ok(Round {
        latencies,
        pss_before_kib,
        pss_after_kib,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs `rounds` rounds of each contender (fresh servers each round, alternating) and
/// prints the figures; with `json` also one JSON object.
pub fn run(clients: usize, queries: usize, rounds: u32, json: bool) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("splitvmm-bench-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let image = dir.join("disk0.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("64M")
        .status()
        .map_err(|e| format!("qemu-img: {e}"))?;
    let filled = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 32M"])
        .arg(&image)
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("qemu-io: {e}"))?;
    if !made.success() || !filled.success() {
        return Err("cannot make the image".into());
    }
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for r in 0..rounds {
        for first in [r % 2 == 0, r % 2 == 1] {
            if first {
                let s = start_splitvmm(&dir, &image)?;
                ours.push(round(&s, &dir, clients, queries)?);
            } else {
                let s = start_qsd(&dir, &image, clients)?;
                theirs.push(round(&s, &dir, clients, queries)?);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let ms = |rounds: &[Round], q: f64| {
        median(
            rounds
                .iter()
                .map(|r| r.quantile(q).as_secs_f64() * 1e3)
                .collect(),
        )
    };
    let kib = |rounds: &[Round], after: bool| {
        median(
            rounds
                .iter()
                .map(|r| {
                    (if after {
                        r.pss_after_kib
                    } else {
                        r.pss_before_kib
                    }) as f64
                })
                .collect(),
        )
    };
    println!(
        "QMP under load: {clients} clients x {queries} queries while a mirror runs (medians of {rounds} rounds)"
    );
    println!(
        "  {:<20} {:>9} {:>9} {:>9} {:>12} {:>12}",
        "", "p50 ms", "p99 ms", "max ms", "PSS before", "PSS after"
    );
    for (name, r) in [("splitvmm", &ours), ("qemu-storage-daemon", &theirs)] {
        println!(
            "  {:<20} {:>9.2} {:>9.2} {:>9.2} {:>9.0} KiB {:>9.0} KiB",
            name,
            ms(r, 0.5),
            ms(r, 0.99),
            ms(r, 1.0),
            kib(r, false),
            kib(r, true)
        );
    }
    let ratio = ms(&theirs, 0.99) / ms(&ours, 0.99);
    println!("  p99 ratio QEMU/splitvmm (above 1.0: splitvmm answers faster) {ratio:.2}");
    println!("  splitvmm PSS: the monitor and block-proc");
    if json {
        println!(
            "{}",
            serde_json::json!({
                "benchmark": "QMP under load",
                "clients": clients,
                "queries": queries,
                "splitvmm": {"p50_ms": ms(&ours, 0.5), "p99_ms": ms(&ours, 0.99),
                             "max_ms": ms(&ours, 1.0), "pss_before_kib": kib(&ours, false),
                             "pss_after_kib": kib(&ours, true)},
                "qemu": {"p50_ms": ms(&theirs, 0.5), "p99_ms": ms(&theirs, 0.99),
                         "max_ms": ms(&theirs, 1.0), "pss_before_kib": kib(&theirs, false),
                         "pss_after_kib": kib(&theirs, true)},
                "p99_ratio": ratio,
            })
        );
    }
    Ok(())
}
