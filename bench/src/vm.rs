//! The workload guest (`docs/guest-abi.md`) under splitvmm and under QEMU: the same ELF
//! (`guest::WORKLOAD_ELF`, embedded in splitvmm as `builtin:workload` and written to a file
//! for QEMU's `-kernel`), the same command line, the same disk image, the same RAM. Shared
//! by the `boot`, `disk` and `mem` benchmarks.
//!
//! QEMU runs as `qemu-system-x86_64 -M microvm,acpi=off -accel kvm -cpu
//! host,-arch-capabilities -nodefaults -no-reboot`, with the guest's debug-exit port
//! (`isa-debug-exit` at 0xf4) and a modern virtio-mmio `virtio-blk-device`
//! (`-global virtio-mmio.force-legacy=false`), as `tests/tests/guest_qemu.rs` does.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A scratch directory with the guest's ELF in it, removed on drop.
#[derive(Debug)]
pub struct Scratch {
    pub dir: PathBuf,
    pub elf: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("splitvmm-bench-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let elf = dir.join("workload.elf");
        std::fs::write(&elf, guest::WORKLOAD_ELF).map_err(|e| format!("{}: {e}", elf.display()))?;
        Ok(Self { dir, elf })
    }

    /// A raw image of `size` bytes, every byte data (no holes: reads hit the page cache,
    /// never the zero page), made once. The bytes are pseudo-random, no two pages alike,
    /// as real disks are. Made fresh for each run: how fast the page cache serves a file
    /// depends on its age on these hosts (docs/performance.md), and both VMMs read the same
    /// one, alternately.
    pub fn raw_image(&self, name: &str, size: u64) -> Result<PathBuf, String> {
        let path = self.dir.join(name);
        if path.exists() {
            return Ok(path);
        }
        let mut f = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?,
        );
        let mut chunk = vec![0u8; 1 << 20];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..size.div_ceil(1 << 20) {
            for word in chunk.chunks_exact_mut(8) {
                // xorshift64: fast, and never the same page twice in a benchmark image.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                word.copy_from_slice(&x.to_le_bytes());
            }
            std::io::Write::write_all(&mut f, &chunk).map_err(|e| e.to_string())?;
        }
        std::io::Write::flush(&mut f).map_err(|e| e.to_string())?;
        drop(f);
        Ok(path)
    }

    /// `raw` converted to qcow2 (every cluster allocated), made once.
    pub fn qcow2_image(&self, raw: &Path, name: &str) -> Result<PathBuf, String> {
        let path = self.dir.join(name);
        if !path.exists() {
            run(Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(raw)
                .arg(&path))?;
        }
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs a helper command to completion.
pub fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// The two VMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmm {
    Splitvmm,
    Qemu,
}

impl Vmm {
    pub fn name(self) -> &'static str {
        match self {
            Self::Splitvmm => "splitvmm",
            Self::Qemu => "QEMU",
        }
    }

    /// Both, splitvmm first in even rounds and QEMU first in odd ones, so neither always
    /// runs on a machine the other has just warmed (or loaded).
    pub fn order(round: u32) -> [Vmm; 2] {
        if round.is_multiple_of(2) {
            [Self::Splitvmm, Self::Qemu]
        } else {
            [Self::Qemu, Self::Splitvmm]
        }
    }
}

/// How QEMU's disk is cached: the two settings the `disk` benchmark can compare against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QemuCache {
    /// `cache=writeback,aio=threads` (QEMU's default): buffered I/O through the host page
    /// cache, completion when `pwrite` returns, `fdatasync` on FLUSH. What block-proc does.
    Writeback,
    /// `cache=none,aio=native`: O_DIRECT with Linux AIO, past the page cache.
    None,
}

impl QemuCache {
    pub fn drive_options(self) -> &'static str {
        match self {
            Self::Writeback => "cache=writeback,aio=threads",
            Self::None => "cache=none,aio=native",
        }
    }
}

/// One guest run.
#[derive(Debug, Clone)]
pub struct Spec<'a> {
    pub memory_mib: u64,
    pub append: &'a str,
    /// The disk image and its format (`raw` or `qcow2`).
    pub disk: Option<(&'a Path, &'a str)>,
    /// Where the guest's serial port goes (a file, read back for the PASS line).
    pub serial: &'a Path,
    pub qemu_cache: QemuCache,
}

/// The splitvmm binary: `$BENCH_SPLITVMM` if set (another build to compare, its helpers
/// next to it), else the one next to this binary (`target/release/`).
pub fn splitvmm_bin() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("BENCH_SPLITVMM") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    Ok(exe.parent().ok_or("no bin dir")?.join("splitvmm"))
}

/// `splitvmm --kernel builtin:workload ...` for `spec`.
pub fn splitvmm(spec: &Spec<'_>) -> Result<Command, String> {
    let mut cmd = Command::new(splitvmm_bin()?);
    // --no-reboot as QEMU's -no-reboot below: a crashing guest ends the run.
    cmd.args(["--kernel", "builtin:workload", "--append", spec.append])
        .arg("--no-reboot")
        .arg("--memory")
        .arg(format!("{}M", spec.memory_mib))
        .arg("--serial")
        .arg(format!("file:{}", spec.serial.display()));
    if let Some((image, format)) = spec.disk {
        cmd.arg("--drive")
            .arg(format!("id=disk0,file={},format={format}", image.display()));
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    Ok(cmd)
}

/// A new, empty image of `size` bytes at `path` (whatever was there is replaced): a
/// sparse raw file, or a qcow2 image with nothing allocated (`qemu-img create`'s defaults,
/// 64 KiB clusters).
pub fn empty_image(path: &Path, format: &str, size: u64) -> Result<(), String> {
    let _ = std::fs::remove_file(path);
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(path)
        .arg(size.to_string()))
}

/// `qemu-system-x86_64 -M microvm ... -kernel ELF` for `spec`; `debugcon` is where port
/// 0xe9 (the boot timer) goes, if anywhere.
pub fn qemu(spec: &Spec<'_>, elf: &Path, debugcon: Option<&Path>) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "microvm,acpi=off", "-accel", "kvm"])
        .args(["-cpu", "host,-arch-capabilities"])
        .arg("-m")
        .arg(format!("{}M", spec.memory_mib))
        .args(["-nodefaults", "-no-reboot", "-display", "none"])
        .arg("-serial")
        .arg(format!("file:{}", spec.serial.display()))
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .args(["-global", "virtio-mmio.force-legacy=false"]);
    if let Some(path) = debugcon {
        cmd.arg("-debugcon").arg(format!("file:{}", path.display()));
    }
    if let Some((image, format)) = spec.disk {
        cmd.arg("-drive")
            .arg(format!(
                "id=disk0,file={},format={format},if=none,{}",
                image.display(),
                spec.qemu_cache.drive_options()
            ))
            .args(["-device", "virtio-blk-device,drive=disk0"]);
    }
    cmd.arg("-kernel").arg(elf).arg("-append").arg(spec.append);
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    cmd
}

/// Whether `vmm` exited as the guest's debug-exit write of 0 (PASS) makes it: splitvmm
/// exits 0, QEMU `(0 << 1) | 1`.
fn passed(vmm: Vmm, status: ExitStatus) -> bool {
    status.code()
        == Some(match vmm {
            Vmm::Splitvmm => 0,
            Vmm::Qemu => 1,
        })
}

/// Waits for `child` (killing it after `timeout`), then returns the guest's PASS summary
/// from `serial`, or why there is none.
pub fn finish(
    vmm: Vmm,
    mut child: Child,
    serial: &Path,
    timeout: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{} still running after {timeout:?}", vmm.name()));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let out = std::fs::read_to_string(serial).unwrap_or_default();
    let last = out
        .lines()
        .map(str::trim_end)
        .rfind(|l| l.starts_with("workload: "))
        .unwrap_or("");
    match last.strip_prefix(guest::abi::PASS_PREFIX) {
        Some(summary) if passed(vmm, status) => Ok(summary.trim().to_string()),
        _ => Err(format!(
            "{}: guest did not pass ({status}): {last:?}\n{}",
            vmm.name(),
            stderr.trim_end()
        )),
    }
}

/// The number before `unit` in `text` (`"192.3 MB/s"` → 192.3).
pub fn number_before(text: &str, unit: &str) -> Option<f64> {
    let head = text[..text.find(unit)?].trim_end();
    let start = head
        .rfind(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or(0, |i| i + 1);
    head[start..].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_come_out_of_pass_summaries() {
        let s = "bench mode=randread bs=4096 qd=32: 46965.4 IOPS, 192.3 MB/s, 93934 requests";
        assert_eq!(number_before(s, " IOPS"), Some(46965.4));
        assert_eq!(number_before(s, " MB/s"), Some(192.3));
        assert_eq!(number_before(s, " GB/s"), None);
    }
}
