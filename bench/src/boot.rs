//! Boot time: from spawning the VMM process to the workload guest's first write to the
//! boot-timer port 0xe9 (the first thing its 64-bit entry does), for splitvmm and for QEMU
//! `-M microvm`, the same ELF, the same 256 MiB of RAM and the same 64 MiB raw disk, the
//! guest running `run=idle seconds=0` (it powers off right after its PASS line).
//!
//! How the moment is seen, the same way on both sides (the arrival of a write on a pipe the
//! benchmark reads in a thread of its own):
//! - splitvmm: vmm-proc logs `guest boot time: N us (boot timer port 0xe9)` at info level
//!   on its stderr as it handles the write (`RUST_LOG=warn,vmm_proc::bus=info`, nothing
//!   else logged), and stderr is a pipe to the benchmark;
//! - QEMU: `-debugcon file:FIFO`, the benchmark holding the FIFO's read end.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::compared::{Better, Compared};
use crate::vm::{self, QemuCache, Scratch, Spec, Vmm};

/// What vmm-proc logs when the guest first writes port 0xe9.
const BOOT_LOG: &str = "guest boot time:";
/// The guest's command line: boot, say PASS, power off.
const APPEND: &str = "run=idle seconds=0";
const TIMEOUT: Duration = Duration::from_secs(60);

/// Milliseconds from spawn to the boot-timer write, per VMM, over `rounds` alternating
/// rounds.
pub fn run(rounds: u32) -> Result<Compared, String> {
    let scratch = Scratch::new("boot")?;
    let disk = scratch.raw_image("disk.raw", 64 << 20)?;
    let mut figures = Compared::new(
        "boot: spawn to the guest's first write to port 0xe9",
        "ms",
        Better::Lower,
    )
    .with_target(0.5);
    for round in 0..rounds {
        for vmm in Vmm::order(round) {
            let serial = scratch
                .dir
                .join(format!("serial-{round}-{}.log", vmm.name()));
            let spec = Spec {
                memory_mib: 256,
                append: APPEND,
                disk: Some((&disk, "raw")),
                serial: &serial,
                qemu_cache: QemuCache::Writeback,
            };
            let ms = match vmm {
                Vmm::Splitvmm => splitvmm_once(&spec)?,
                Vmm::Qemu => qemu_once(&spec, &scratch, round)?,
            };
            match vmm {
                Vmm::Splitvmm => figures.splitvmm.push(ms),
                Vmm::Qemu => figures.qemu.push(ms),
            }
        }
    }
    Ok(figures)
}

fn splitvmm_once(spec: &Spec<'_>) -> Result<f64, String> {
    let mut cmd = vm::splitvmm(spec)?;
    cmd.env("RUST_LOG", "warn,vmm_proc::bus=info")
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("splitvmm: {e}"))?;
    let stderr = child.stderr.take().ok_or("no stderr pipe")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains(BOOT_LOG) {
                let _ = tx.send(Instant::now());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let result = vm::finish(Vmm::Splitvmm, child, spec.serial, TIMEOUT);
    let log = reader.join().unwrap_or_default();
    result.map_err(|e| format!("{e}\n{log}"))?;
    let at = rx
        .try_recv()
        .map_err(|_| format!("splitvmm never logged {BOOT_LOG:?}:\n{log}"))?;
    Ok(at.duration_since(start).as_secs_f64() * 1e3)
}

fn qemu_once(spec: &Spec<'_>, scratch: &Scratch, round: u32) -> Result<f64, String> {
    let fifo = scratch.dir.join(format!("debugcon-{round}"));
    let _ = std::fs::remove_file(&fifo);
    vm::run(Command::new("mkfifo").arg(&fifo))?;
    // Read and write, so opening does not wait for QEMU and a QEMU that never writes can
    // be unblocked from here.
    let mut port = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&fifo)
        .map_err(|e| format!("{}: {e}", fifo.display()))?;
    let mut unblock = port.try_clone().map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        if port.read(&mut byte).is_ok_and(|n| n == 1) {
            let _ = tx.send((Instant::now(), byte[0]));
        }
    });
    let mut cmd = vm::qemu(spec, &scratch.elf, Some(&fifo));
    cmd.stderr(Stdio::piped());
    let start = Instant::now();
    let child = cmd
        .spawn()
        .map_err(|e| format!("qemu-system-x86_64: {e}"))?;
    let result = vm::finish(Vmm::Qemu, child, spec.serial, TIMEOUT);
    let seen = rx.recv_timeout(Duration::from_millis(100));
    if seen.is_err() {
        let _ = unblock.write_all(&[0]);
    }
    let _ = reader.join();
    let _ = std::fs::remove_file(&fifo);
    result?;
    match seen {
        Ok((at, guest::abi::BOOT_TIMER_BYTE)) => Ok(at.duration_since(start).as_secs_f64() * 1e3),
        Ok((_, other)) => Err(format!("QEMU: port 0xe9 got {other:#x} first")),
        Err(_) => Err("QEMU: no write to port 0xe9".into()),
    }
}
