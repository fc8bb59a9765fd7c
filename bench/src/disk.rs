//! Guest disk throughput: the workload guest's `bench` program (`run=bench mode=MODE bs=BS
//! qd=QD seconds=S`, one vCPU, one disk) under splitvmm (virtio-mmio in vmm-proc, I/O in
//! block-proc straight from guest memory) and under QEMU (`virtio-blk-device`), the same
//! image file, the same guest, one after the other in each round.
//!
//! The image is written full of data first (no holes), so it sits in the host page cache.
//! block-proc does buffered I/O (no O_DIRECT) and completes a write when `pwrite` returns,
//! syncing on FLUSH; QEMU's matching setting is `cache=writeback,aio=threads` (its
//! default), the benchmark's default. `--qemu-cache none` compares against
//! `cache=none,aio=native` instead.
//!
//! `--allocating` gives every guest run a new, empty image instead (sparse raw, or qcow2
//! with nothing allocated), so that the writes allocate: for qcow2 that is where imago's
//! cluster allocation and block-proc's metadata write order (`block::order`) cost.

use std::path::Path;
use std::time::Duration;

use crate::compared::{Better, Compared};
use crate::vm::{self, QemuCache, Scratch, Spec, Vmm};

/// The cases: (mode, block size, queue depth).
pub const CASES: [(&str, &str, u32); 8] = [
    ("seqread", "1M", 1),
    ("seqread", "1M", 32),
    ("seqwrite", "1M", 1),
    ("seqwrite", "1M", 32),
    ("randread", "4K", 1),
    ("randread", "4K", 32),
    ("randwrite", "4K", 1),
    ("randwrite", "4K", 32),
];

/// What the `disk` benchmark runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub seconds: u32,
    pub rounds: u32,
    pub formats: Vec<String>,
    pub qemu_cache: QemuCache,
    pub size_mib: u64,
    /// Case filter: `MODE` or `MODE:QD`; empty runs every case.
    pub only: Vec<String>,
    /// A new, empty image for every guest run.
    pub allocating: bool,
}

impl Options {
    fn runs(&self, mode: &str, qd: u32) -> bool {
        self.only.is_empty()
            || self
                .only
                .iter()
                .any(|o| o == mode || *o == format!("{mode}:{qd}"))
    }
}

/// One figure per case and format.
pub fn run(o: &Options) -> Result<Vec<Compared>, String> {
    let scratch = Scratch::new("disk")?;
    let raw = if o.allocating {
        None
    } else {
        Some(scratch.raw_image("disk.raw", o.size_mib << 20)?)
    };
    let mut out = Vec::new();
    for format in &o.formats {
        let image = match (format.as_str(), &raw) {
            (_, None) => scratch.dir.join(format!("empty.{format}")),
            ("raw", Some(raw)) => raw.clone(),
            ("qcow2", Some(raw)) => scratch.qcow2_image(raw, "disk.qcow2")?,
            (other, _) => return Err(format!("unknown format {other}")),
        };
        for (mode, bs, qd) in CASES.into_iter().filter(|c| o.runs(c.0, c.2)) {
            let seq = mode.starts_with("seq");
            let (unit, target) = if seq { ("MB/s", 1.0) } else { ("IOPS", 0.8) };
            let fresh = if o.allocating { " allocating" } else { "" };
            let mut c = Compared::new(
                format!("disk {format}{fresh} {mode} bs={bs} qd={qd}"),
                unit,
                Better::Higher,
            )
            .with_target(target);
            for round in 0..o.rounds {
                for vmm in Vmm::order(round) {
                    if o.allocating {
                        vm::empty_image(&image, format, o.size_mib << 20)?;
                    }
                    let v = once(&scratch, vmm, &image, format, mode, bs, qd, o)?;
                    let at = if seq { " MB/s" } else { " IOPS" };
                    let n = vm::number_before(&v, at).ok_or_else(|| format!("no{at} in {v:?}"))?;
                    match vmm {
                        Vmm::Splitvmm => c.splitvmm.push(n),
                        Vmm::Qemu => c.qemu.push(n),
                    }
                }
            }
            eprintln!("{}", c.table());
            out.push(c);
        }
    }
    Ok(out)
}

/// One guest run; returns its PASS summary.
#[allow(clippy::too_many_arguments)]
fn once(
    scratch: &Scratch,
    vmm: Vmm,
    image: &Path,
    format: &str,
    mode: &str,
    bs: &str,
    qd: u32,
    o: &Options,
) -> Result<String, String> {
    let serial = scratch.dir.join("serial.log");
    let _ = std::fs::remove_file(&serial);
    let append = format!(
        "run=bench mode={mode} bs={bs} qd={qd} seconds={}",
        o.seconds
    );
    let spec = Spec {
        memory_mib: 256,
        append: &append,
        disk: Some((image, format)),
        serial: &serial,
        qemu_cache: o.qemu_cache,
    };
    let mut cmd = match vmm {
        Vmm::Splitvmm => vm::splitvmm(&spec)?,
        Vmm::Qemu => vm::qemu(&spec, &scratch.elf, None),
    };
    cmd.stderr(std::process::Stdio::piped());
    let child = cmd.spawn().map_err(|e| format!("{}: {e}", vmm.name()))?;
    let timeout = Duration::from_secs(u64::from(o.seconds) + 60);
    vm::finish(vmm, child, &serial, timeout)
}
