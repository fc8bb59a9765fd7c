//! Live migration of the workload guest between two instances on this machine, over a
//! unix socket, with `max-bandwidth` 0: splitvmm to splitvmm and QEMU (`-M microvm`) to
//! QEMU, alternating, the same guest, the same RAM, the same QMP driver. Per case (`idle`,
//! and `dirty` at a given rate): `downtime`, `total-time`, the `expected-downtime` of the
//! last pass (polled as fast as QMP answers; the state `device` shows it for splitvmm),
//! and the guest's PASS on the destination. The link bandwidth is measured in the same run
//! (a unix socket pair between two threads).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::vm::{self, Scratch, Spec, Vmm};

/// A QMP connection that skips events.
struct Qmp {
    rd: BufReader<UnixStream>,
    wr: UnixStream,
}

impl Qmp {
    fn connect(sock: &Path, child: &mut Child) -> Result<Self, String> {
        crate::wait_for(sock, child)?;
        let s = UnixStream::connect(sock).map_err(|e| e.to_string())?;
        let mut q = Self {
            rd: BufReader::new(s.try_clone().map_err(|e| e.to_string())?),
            wr: s,
        };
        q.line()?; // greeting
        q.exec("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn line(&mut self) -> Result<Value, String> {
        let mut l = String::new();
        if self.rd.read_line(&mut l).map_err(|e| e.to_string())? == 0 {
            return Err("QMP connection closed".into());
        }
        serde_json::from_str(&l).map_err(|e| format!("{e}: {l}"))
    }

    fn exec(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let msg = json!({ "execute": cmd, "arguments": args }).to_string();
        self.wr
            .write_all(msg.as_bytes())
            .map_err(|e| e.to_string())?;
        loop {
            let v = self.line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("{cmd}: {e}"));
            }
        }
    }
}

struct Proc(Option<Child>);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One migration's figures.
#[derive(Debug, Clone, Copy)]
struct Run {
    downtime_ms: f64,
    total_ms: f64,
    expected_ms: f64,
    /// Whether `expected_ms` was read in the `device` state (after the last sync).
    expected_final: bool,
}

/// Starts `vmm` with the guest: the source, or the destination listening on `incoming`.
fn start(
    vmm: Vmm,
    scratch: &Scratch,
    spec: &Spec<'_>,
    qmp: &Path,
    incoming: Option<&str>,
) -> Result<Proc, String> {
    let mut cmd = match vmm {
        Vmm::Splitvmm => {
            let mut c = vm::splitvmm(spec)?;
            c.arg("--qmp")
                .arg(format!("unix:{},server=on,wait=off", qmp.display()));
            if let Some(uri) = incoming {
                c.args(["--incoming", uri]);
            }
            c
        }
        Vmm::Qemu => {
            let mut c = vm::qemu(spec, &scratch.elf, None);
            c.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", qmp.display()));
            if let Some(uri) = incoming {
                c.args(["-incoming", uri]);
            }
            c
        }
    };
    cmd.stderr(Stdio::piped());
    Ok(Proc(Some(
        cmd.spawn()
            .map_err(|e| format!("{}: {e}", vm::Vmm::name(vmm)))?,
    )))
}

fn one(
    vmm: Vmm,
    scratch: &Scratch,
    memory_mib: u64,
    append: &str,
    tag: &str,
) -> Result<Run, String> {
    let dir = scratch.dir.join(format!("{tag}-{}", vmm.name()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (src_serial, dst_serial) = (dir.join("src.log"), dir.join("dst.log"));
    let spec = |serial| Spec {
        memory_mib,
        append,
        disk: None,
        serial,
        qemu_cache: vm::QemuCache::Writeback,
    };
    let (src_qmp, dst_qmp) = (dir.join("src.qmp"), dir.join("dst.qmp"));
    let mig = dir.join("mig.sock");
    let uri = format!("unix:{}", mig.display());
    let mut src = start(vmm, scratch, &spec(&src_serial), &src_qmp, None)?;
    let mut dst = start(vmm, scratch, &spec(&dst_serial), &dst_qmp, Some(&uri))?;
    let mut sq = Qmp::connect(&src_qmp, src.0.as_mut().ok_or("source")?)?;
    Qmp::connect(&dst_qmp, dst.0.as_mut().ok_or("destination")?)?;
    while !mig.exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
    // Let the guest's program get going.
    std::thread::sleep(Duration::from_millis(1500));
    sq.exec(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 0, "downtime-limit": 300 }),
    )?;
    sq.exec("migrate", json!({ "uri": uri }))?;
    let (mut expected, mut expected_final) = (f64::NAN, false);
    let deadline = Instant::now() + Duration::from_secs(120);
    let info = loop {
        let info = sq.exec("query-migrate", json!({}))?;
        match info["status"].as_str().unwrap_or_default() {
            "completed" => break info,
            "failed" | "cancelled" => return Err(format!("{}: migration {info}", vmm.name())),
            status => {
                if let Some(e) = info["expected-downtime"].as_f64() {
                    expected = e;
                    expected_final = status == "device";
                }
            }
        }
        if Instant::now() > deadline {
            return Err(format!("{}: migration did not complete", vmm.name()));
        }
    };
    let child = dst.0.take().ok_or("destination")?;
    vm::finish(vmm, child, &dst_serial, Duration::from_secs(120))?;
    Ok(Run {
        downtime_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
        total_ms: info["total-time"].as_f64().unwrap_or(f64::NAN),
        expected_ms: expected,
        expected_final,
    })
}

/// Bytes per second through a unix socket pair, one thread writing 4 MiB chunks and one
/// reading, for about a second: the link the migrations use.
fn link_bandwidth() -> Result<f64, String> {
    let (mut a, mut b) = UnixStream::pair().map_err(|e| e.to_string())?;
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 4 << 20];
        let mut n = 0u64;
        while let Ok(k) = b.read(&mut buf) {
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        n
    });
    let chunk = vec![0x5au8; 4 << 20];
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(1) {
        a.write_all(&chunk).map_err(|e| e.to_string())?;
    }
    drop(a);
    let n = reader.join().map_err(|_| "reader thread")?;
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs `rounds` of each case on both VMMs and prints the figures.
pub fn run(rounds: u32, memory_mib: u64, rate_mib: u64, json_out: bool) -> Result<(), String> {
    let scratch = Scratch::new("migrate")?;
    // Long enough for the migration to end well before the guest does.
    let cases = [
        ("idle", "run=idle seconds=8".to_string()),
        ("dirty", format!("run=dirty rate={rate_mib}M seconds=20")),
    ];
    let mut links = Vec::new();
    let mut out = Vec::new();
    for (name, append) in &cases {
        let mut runs: Vec<(Vmm, Run)> = Vec::new();
        for round in 0..rounds {
            links.push(link_bandwidth()?);
            for vmm in Vmm::order(round) {
                let r = one(vmm, &scratch, memory_mib, append, name)?;
                runs.push((vmm, r));
            }
        }
        let link = median(&links);
        println!(
            "migrate {name}: {memory_mib} MiB guest, `{append}`, max-bandwidth 0, {rounds} rounds"
        );
        for vmm in [Vmm::Splitvmm, Vmm::Qemu] {
            let of = |f: fn(&Run) -> f64| {
                median(
                    &runs
                        .iter()
                        .filter(|(v, _)| *v == vmm)
                        .map(|(_, r)| f(r))
                        .collect::<Vec<_>>(),
                )
            };
            let (down, total, exp) = (
                of(|r| r.downtime_ms),
                of(|r| r.total_ms),
                of(|r| r.expected_ms),
            );
            let finals = runs
                .iter()
                .filter(|(v, r)| *v == vmm && r.expected_final)
                .count();
            let bound = 1.2 * (memory_mib as f64 * 1048576.0) / link * 1000.0;
            println!(
                "  {:<9} downtime {down:>6.0} ms  total {total:>6.0} ms  expected-downtime at the last pass {exp:>6.0} ms ({finals}/{rounds} read after the last sync)  expected/measured {:.2}",
                vmm.name(),
                exp / down
            );
            if vmm == Vmm::Splitvmm {
                println!(
                    "  link {:.0} MB/s: 1.2 × RAM / link = {bound:.0} ms",
                    link / 1e6
                );
            }
            out.push(json!({
                "case": name, "vmm": vmm.name(), "downtime_ms": down, "total_ms": total,
                "expected_downtime_ms": exp, "link_bytes_per_s": link,
                "runs": runs.iter().filter(|(v, _)| *v == vmm).map(|(_, r)| json!({
                    "downtime_ms": r.downtime_ms, "total_ms": r.total_ms,
                    "expected_downtime_ms": r.expected_ms, "expected_final": r.expected_final,
                })).collect::<Vec<_>>(),
            }));
        }
    }
    println!("load average: {}", crate::compared::loadavg());
    if json_out {
        println!("{}", Value::Array(out));
    }
    Ok(())
}
