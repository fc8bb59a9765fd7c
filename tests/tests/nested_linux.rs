//! Nested Linux boot: a real Debian kernel (L2) boots inside a software-emulated host (L1),
//! writes and reads its `/dev/vda`, and the image is then checked from the outside.
//!
//! These machines' `/dev/kvm` is PVM, on which a stock kernel cannot boot (DESIGN.md §4), so
//! L1 is Debian's generic 6.1 kernel under `qemu-system-x86_64 -accel tcg -cpu max`, which
//! gives it SVM with nested paging. Its initramfs (built by `scripts/nested-assets.sh` from
//! Debian's packages) loads `kvm_amd` and 9p, mounts this host's `/` read-only and the
//! test's work directory read-write at the same path, chroots into the host's `/` and runs
//! the `run.sh` the test wrote there. That script starts one or more L2 runs: Debian's cloud
//! kernel with an initramfs whose `/init` writes a pattern derived from a per-run token to
//! `/dev/vda`, reads it back with O_DIRECT, prints a verdict line and reboots; the boot after
//! the reboot finds the pattern on the disk, says so and powers off (`poweroff -f`). Asked
//! for one boot (`-- TOKEN once`), it powers off after the first verdict.
//!
//! The tests assert on the verdict lines and on each VMM's exit status, then compare each
//! qcow2 image with the expected contents (`qemu-img compare`) and check it (`qemu-img
//! check`) after L1 has exited.
//!
//! The L2 runners ([`L2Runner`]):
//! - QEMU (`-accel kvm -M pc`, virtio-blk-pci, one boot) proves the harness;
//! - splitvmm from this build, sandboxed as in production, with the disk as virtio-mmio
//!   that the kernel finds through ACPI: the bzImage on two vCPUs through a reboot (the
//!   kernel brings its second vCPU up with INIT/SIPI, the reboot reloads kernel and
//!   initramfs, the power-off ends splitvmm with status 0), and the unpacked vmlinux through
//!   its PVH entry for one boot.
//!
//! The tests take a lock so that two TCG hosts never compete for this machine's cores.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use tests::{TempDir, bin_dir, output, qemu_img_create, repo_root, run};

/// Whole-session limit: a healthy session takes 15-45 s here, depending on the machine's
/// load; past this, L1's QEMU is killed.
const TIMEOUT: Duration = Duration::from_secs(180);
/// Where L2's `/init` writes its pattern, and how much (it writes 1 MiB at 1 MiB).
const PATTERN_OFFSET: usize = 1 << 20;
const PATTERN_LEN: usize = 1 << 20;
const IMAGE_SIZE: usize = 64 << 20;
/// One TCG host at a time.
static ONE_L1: Mutex<()> = Mutex::new(());

/// The VMM that boots L2 inside L1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum L2Runner {
    /// The host's QEMU reached through 9p: `-accel kvm -M pc`, the disk as virtio-blk-pci;
    /// one boot.
    Qemu,
    /// splitvmm from this build, the disk as virtio-mmio found by the guest through ACPI:
    /// the bzImage on two vCPUs, booted twice (a reboot between the write and the check),
    /// or with `elf`, the unpacked vmlinux through its PVH entry, booted once.
    Splitvmm { elf: bool },
}

impl L2Runner {
    /// Whether L2 reboots once before it powers off.
    fn reboots(self) -> bool {
        self == L2Runner::Splitvmm { elf: false }
    }

    /// The shell command that boots L2 with the assets' kernel and initramfs and `image`
    /// as its disk; the kernel command line ends with `-- token [once]`, which L2's
    /// `/init` receives as its arguments.
    fn command(self, a: &Assets, work: &Path, image: &Path, token: &str) -> String {
        let kernel = a.dir.join(match self {
            L2Runner::Splitvmm { elf: true } => "l2-vmlinux",
            _ => "l2-vmlinuz",
        });
        let initrd = a.dir.join("l2.cpio");
        let (kernel, initrd, image) = (kernel.display(), initrd.display(), image.display());
        let args = if self.reboots() {
            token.to_string()
        } else {
            format!("{token} once")
        };
        match self {
            L2Runner::Qemu => format!(
                "qemu-system-x86_64 -accel kvm -M pc -cpu host -m 256M -smp 1 -nographic \
                 -no-reboot -nic none -kernel {kernel} -initrd {initrd} \
                 -append 'console=ttyS0 quiet panic=-1 -- {args}' \
                 -drive file={image},format=qcow2,if=none,id=vda \
                 -device virtio-blk-pci,drive=vda"
            ),
            // No reboot= on the command line: whichever way the kernel reboots ends at the
            // reset line (docs/linux-guests.md).
            L2Runner::Splitvmm { elf } => format!(
                "{splitvmm} --memory 256M --cpus {cpus} --kernel {kernel} --initrd {initrd} \
                 --append 'console=ttyS0 quiet panic=-1 -- {args}' \
                 --drive id=vda,file={image},format=qcow2 --serial stdio \
                 --image-dir {work}",
                splitvmm = bin_dir().join("splitvmm").display(),
                cpus = if elf { 1 } else { 2 },
                work = work.display(),
            ),
        }
    }
}

/// The kernels and initramfs images `scripts/nested-assets.sh` built.
#[derive(Debug)]
struct Assets {
    dir: PathBuf,
}

/// Whether the nested test can run here: it needs `qemu-system-x86_64` and the Debian
/// packages (downloaded once, then cached). Without them it skips, and says so, only if
/// `CI` is unset.
fn assets_or_skip(test: &str) -> Option<Assets> {
    let skip = |why: String| {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: {why}, and CI is set"
        );
        eprintln!("SKIPPED {test}: {why}");
        None
    };
    match Command::new("qemu-system-x86_64").arg("--version").output() {
        Ok(o) if o.status.success() => {
            let v = String::from_utf8_lossy(&o.stdout);
            eprintln!("{}", v.lines().next().unwrap_or_default());
        }
        _ => return skip("qemu-system-x86_64 is missing".into()),
    }
    let script = repo_root().join("scripts/nested-assets.sh");
    let out = match Command::new("bash").arg(&script).output() {
        Ok(o) => o,
        Err(e) => return skip(format!("cannot run {}: {e}", script.display())),
    };
    if !out.status.success() {
        return skip(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(PathBuf::from)
        .unwrap_or_default();
    for f in [
        "l1-vmlinuz",
        "l1.cpio",
        "l2-vmlinuz",
        "l2-vmlinux",
        "l2.cpio",
    ] {
        assert!(
            dir.join(f).is_file(),
            "{} did not produce {f} in {dir:?}",
            script.display()
        );
    }
    Some(Assets { dir })
}

/// One line of L1's console and when it arrived.
#[derive(Debug)]
struct Line {
    at: Duration,
    text: String,
}

/// What L1 printed and how long it ran.
#[derive(Debug)]
struct L1Run {
    lines: Vec<Line>,
    total: Duration,
}

impl L1Run {
    /// When the first line containing `needle` arrived.
    fn when(&self, needle: &str) -> Option<Duration> {
        self.lines
            .iter()
            .find(|l| l.text.contains(needle))
            .map(|l| l.at)
    }
    fn transcript(&self) -> String {
        self.lines
            .iter()
            .map(|l| format!("[{:6.2}] {}", l.at.as_secs_f64(), l.text))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Boots L1 under TCG with the two 9p shares; it runs `work/run.sh` and powers off.
fn run_l1(a: &Assets, work: &Path) -> L1Run {
    let run_sh = work.join("run.sh");
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2G"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(a.dir.join("l1-vmlinuz"))
        .arg("-initrd")
        .arg(a.dir.join("l1.cpio"))
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 mitigations=off -- {}",
            run_sh.display()
        ))
        .arg("-virtfs")
        .arg("local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap")
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=work,security_model=none",
            work.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64 for L1");
    let start = Instant::now();
    let (tx, rx) = mpsc::channel();
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(pipe);
            let mut buf = Vec::new();
            while matches!(r.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let text = strip_escapes(&String::from_utf8_lossy(&buf));
                buf.clear();
                if tx.send((start.elapsed(), text)).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut lines = Vec::new();
    let deadline = start + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, text)) => {
                eprintln!("[{:6.2}] {text}", at.as_secs_f64());
                lines.push(Line { at, text });
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("L1 did not finish within {TIMEOUT:?}");
            }
        }
    }
    let status = child.wait().expect("wait for L1's QEMU");
    let total = start.elapsed();
    assert!(status.success(), "L1's QEMU exited with {status}");
    L1Run { lines, total }
}

/// A console line without its terminal escape sequences (SeaBIOS clears the screen).
fn strip_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters... final byte in @..~; other escapes are two characters.
            if chars.next() == Some('[') {
                for f in chars.by_ref() {
                    if ('@'..='~').contains(&f) {
                        break;
                    }
                }
            }
        } else if c != '\r' {
            out.push(c);
        }
    }
    out.trim_end().to_string()
}

/// The bytes L2's `/init` writes: `yes "splitvmm-nested TOKEN" | head -c 1048576`.
fn pattern(token: &str) -> Vec<u8> {
    let line = format!("splitvmm-nested {token}\n");
    line.bytes().cycle().take(PATTERN_LEN).collect()
}

/// One L2 run of a session, and what its console lines were.
#[derive(Debug)]
struct L2Run {
    runner: L2Runner,
    token: String,
    image: PathBuf,
}

/// Boots L1 once and has it run each of `runners` in turn, then checks every run.
fn nested_session(test: &str, runners: &[L2Runner]) {
    let _one = ONE_L1.lock().unwrap_or_else(|e| e.into_inner());
    let Some(assets) = assets_or_skip(test) else {
        return;
    };
    let work = TempDir::new("nested");
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let runs: Vec<L2Run> = runners
        .iter()
        .enumerate()
        .map(|(i, &runner)| L2Run {
            runner,
            token: format!("{:x}{stamp:x}{i}", std::process::id()),
            image: work.join(&format!("disk{i}.qcow2")),
        })
        .collect();
    let mut script = String::from("#!/bin/sh\nup() { cut -d' ' -f1 /proc/uptime; }\n");
    for (i, r) in runs.iter().enumerate() {
        qemu_img_create("qcow2", &r.image, &IMAGE_SIZE.to_string());
        script.push_str(&format!(
            "echo \"NESTED-L1: L2 {i} starting ({runner:?}) at $(up) s\"\n\
             {cmd}\n\
             echo \"NESTED-L1: L2 {i} exited with $? at $(up) s\"\n",
            runner = r.runner,
            cmd = r.runner.command(&assets, work.path(), &r.image, &r.token)
        ));
    }
    std::fs::write(work.join("run.sh"), script).expect("write run.sh");

    let l1 = run_l1(&assets, work.path());
    let Some(l1_ready) = l1.when("NESTED-L1: running") else {
        panic!("L1 never reached its chroot:\n{}", l1.transcript());
    };
    eprintln!(
        "nested timings: L1 boot to its chroot {:.1} s, whole session {:.1} s",
        l1_ready.as_secs_f64(),
        l1.total.as_secs_f64()
    );
    for (i, r) in runs.iter().enumerate() {
        check_run(&l1, i, r);
    }
}

/// The checks for run `i`, on the console lines between its start and end markers and,
/// for a disk run, on its image.
fn check_run(l1: &L1Run, i: usize, r: &L2Run) {
    let start = format!("NESTED-L1: L2 {i} starting");
    let end = format!("NESTED-L1: L2 {i} exited with");
    let from = l1.lines.iter().position(|l| l.text.contains(&start));
    let to = l1.lines.iter().position(|l| l.text.contains(&end));
    let (Some(from), Some(to)) = (from, to) else {
        panic!(
            "L2 run {i} ({:?}) never ran to its end:\n{}",
            r.runner,
            l1.transcript()
        );
    };
    let lines = &l1.lines[from..=to];
    let find = |needle: &str| lines.iter().find(|l| l.text.contains(needle));
    let has = |needle: &str| find(needle).is_some();
    let inits: Vec<&Line> = lines
        .iter()
        .filter(|l| l.text.contains("NESTED-L2: init at"))
        .collect();
    eprintln!(
        "nested timings: L2 run {i} ({:?}) {:.1} s, to its /init {}",
        r.runner,
        (lines[lines.len() - 1].at - lines[0].at).as_secs_f64(),
        if inits.is_empty() {
            "never".to_string()
        } else {
            inits
                .iter()
                .map(|l| format!("{:.1} s", (l.at - lines[0].at).as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    let transcript = || l1.transcript();
    assert!(
        lines[lines.len() - 1].text.contains(&format!("{end} 0 ")),
        "L2 run {i} ({:?}) failed:\n{}",
        r.runner,
        transcript()
    );

    let verdicts: Vec<&Line> = lines
        .iter()
        .filter(|l| l.text.contains("NESTED-L2: VERDICT"))
        .collect();
    let mut want = vec![format!(
        "NESTED-L2: VERDICT PASS wrote and read back 1048576 bytes at 1048576 of /dev/vda, token {}",
        r.token
    )];
    if r.runner.reboots() {
        want.push(format!(
            "NESTED-L2: VERDICT PASS found 1048576 bytes at 1048576 of /dev/vda after a reboot, token {}",
            r.token
        ));
    }
    let got: Vec<&str> = verdicts.iter().map(|l| l.text.as_str()).collect();
    assert!(
        got.len() == want.len() && got.iter().zip(&want).all(|(g, w)| g.contains(w.as_str())),
        "L2 run {i} ({:?}): verdicts {got:#?}, wanted {want:#?}:\n{}",
        r.runner,
        transcript()
    );
    // Every boot saw all its vCPUs: with two, the kernel brought the second up itself
    // (INIT/SIPI through the in-kernel LAPIC), after the reboot too.
    let cpus = match r.runner {
        L2Runner::Splitvmm { elf: false } => "CPUs 0-1",
        _ => "CPUs 0",
    };
    assert!(
        inits.len() == want.len() && inits.iter().all(|l| l.text.ends_with(cpus)),
        "L2 run {i} ({:?}): wanted {} boot(s) with {cpus}:\n{}",
        r.runner,
        want.len(),
        transcript()
    );
    if matches!(r.runner, L2Runner::Splitvmm { .. }) {
        // The sandbox was on, as in production (splitvmm warns when it is off).
        assert!(
            !has("--sandbox off"),
            "L2 run {i} ran unconfined:\n{}",
            transcript()
        );
    }
    // From the outside: the image holds the pattern at 1 MiB and zeros elsewhere.
    let mut expected = vec![0u8; IMAGE_SIZE];
    expected[PATTERN_OFFSET..PATTERN_OFFSET + PATTERN_LEN].copy_from_slice(&pattern(&r.token));
    let expected_path = r.image.with_extension("expected.raw");
    std::fs::write(&expected_path, expected).expect("write the expected image");
    let cmp = output(
        Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&r.image)
            .arg(&expected_path),
    );
    assert!(
        cmp.status.success(),
        "the image of L2 run {i} does not hold what L2 wrote: {}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
    run(Command::new("qemu-img").arg("check").arg(&r.image));
}

/// The harness itself, with QEMU as the L2 VMM.
#[test]
fn debian_l2_booted_by_qemu_inside_a_tcg_host_writes_its_disk() {
    nested_session(
        "debian_l2_booted_by_qemu_inside_a_tcg_host_writes_its_disk",
        &[L2Runner::Qemu],
    );
}

/// The disk test with splitvmm as the L2 VMM: Debian's bzImage on two vCPUs, with a reboot
/// between the write and the check.
#[test]
fn debian_l2_booted_by_splitvmm_inside_a_tcg_host_writes_its_disk_across_a_reboot() {
    nested_session(
        "debian_l2_booted_by_splitvmm_inside_a_tcg_host_writes_its_disk_across_a_reboot",
        &[L2Runner::Splitvmm { elf: false }],
    );
}

/// The same kernel unpacked (the vmlinux inside the bzImage), booted by splitvmm through
/// its PVH entry; one boot. A session of its own, so that neither takes a minute.
#[test]
fn debian_vmlinux_booted_by_splitvmm_through_pvh_writes_its_disk() {
    nested_session(
        "debian_vmlinux_booted_by_splitvmm_through_pvh_writes_its_disk",
        &[L2Runner::Splitvmm { elf: true }],
    );
}
