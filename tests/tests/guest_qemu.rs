//! The workload guest booted by QEMU (`-M microvm`, through its PVH note, one vCPU):
//! every program ends with `workload: PASS`, bad input ends with `workload: FAIL`, and
//! what the guest wrote is checked from outside with the `guest` library's pattern.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guest::pattern::{BLOCK_SIZE, Stamp};
use guest::{WORKLOAD_ELF, abi, written_image};
use tests::{TempDir, kvm_or_skip, qemu_system_or_skip};

/// QEMU's exit status after the guest's debug-exit write of 0 (PASS) or 1 (FAIL):
/// `(value << 1) | 1`.
const QEMU_PASS: i32 = ((abi::DEBUG_EXIT_PASS << 1) | 1) as i32;
const QEMU_FAIL: i32 = ((abi::DEBUG_EXIT_FAIL << 1) | 1) as i32;

#[derive(Clone, Copy, Debug)]
enum Accel {
    Kvm,
    Tcg,
}

/// One finished QEMU run.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    serial: String,
    /// From spawning QEMU to the guest's boot-timer byte on port 0xe9.
    boot: Option<Duration>,
}

impl Run {
    /// The final line (`workload: ...`).
    fn last_line(&self) -> &str {
        self.serial
            .lines()
            .map(str::trim_end)
            .rfind(|l| !l.is_empty())
            .unwrap_or("")
    }

    /// Asserts PASS (line and exit status) and returns the summary after it.
    fn passed(&self) -> &str {
        let last = self.last_line();
        assert!(
            last.starts_with(abi::PASS_PREFIX) && self.code == Some(QEMU_PASS),
            "expected PASS (exit {QEMU_PASS}), got exit {:?}; serial:\n{}",
            self.code,
            self.serial
        );
        last[abi::PASS_PREFIX.len()..].trim()
    }

    /// Asserts FAIL (line and exit status) and returns the reason.
    fn failed(&self) -> &str {
        let last = self.last_line();
        assert!(
            last.starts_with(abi::FAIL_PREFIX) && self.code == Some(QEMU_FAIL),
            "expected FAIL (exit {QEMU_FAIL}), got exit {:?}; serial:\n{}",
            self.code,
            self.serial
        );
        last[abi::FAIL_PREFIX.len()..].trim()
    }
}

/// A scratch directory with the guest's ELF in it.
fn scratch(tag: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new(tag);
    let elf = dir.join("workload.elf");
    std::fs::write(&elf, WORKLOAD_ELF).expect("write the guest ELF");
    (dir, elf)
}

/// A zero-filled raw image of `size` bytes.
fn raw_image(dir: &TempDir, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(size))
        .expect("create raw image");
    p
}

/// Whether QEMU (and, for KVM, /dev/kvm) is here; outside CI a missing one skips.
fn can_run(test: &str, accel: Accel) -> bool {
    qemu_system_or_skip(test) && (matches!(accel, Accel::Tcg) || kvm_or_skip(test))
}

/// Disk images, each with whether it is read-only.
type Disks<'a> = &'a [(&'a Path, bool)];

/// Boots the guest with one virtio-blk device per `(image, readonly)` and `append`.
fn boot(
    dir: &TempDir,
    elf: &Path,
    accel: Accel,
    disks: Disks<'_>,
    append: &str,
    legacy_mmio: bool,
) -> Run {
    let serial = dir.join("serial.log");
    let debugcon = dir.join("debugcon.log");
    let _ = std::fs::remove_file(&debugcon);
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "microvm,acpi=off", "-m", "256M"])
        .args(match accel {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host,-arch-capabilities"],
            Accel::Tcg => ["-accel", "tcg", "-cpu", "max"],
        })
        .args([
            "-nodefaults",
            "-no-reboot",
            "-nographic",
            "-serial",
            "stdio",
        ])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .arg("-chardev")
        .arg(format!("file,id=bootcon,path={}", debugcon.display()))
        .args(["-device", "isa-debugcon,iobase=0xe9,chardev=bootcon"]);
    if !legacy_mmio {
        cmd.args(["-global", "virtio-mmio.force-legacy=false"]);
    }
    for (i, (image, readonly)) in disks.iter().enumerate() {
        let ro = if *readonly { ",readonly=on" } else { "" };
        cmd.arg("-drive")
            .arg(format!(
                "id=d{i},file={},format=raw,if=none{ro}",
                image.display()
            ))
            .arg("-device")
            .arg(format!("virtio-blk-device,drive=d{i}"));
    }
    cmd.arg("-kernel").arg(elf).arg("-append").arg(append);
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(&serial).expect("serial log"))
        .stderr(Stdio::piped());

    let start = Instant::now();
    let mut child = cmd.spawn().expect("start qemu-system-x86_64");
    let mut boot = None;
    let deadline = start + Duration::from_secs(180);
    let status = loop {
        if boot.is_none() && std::fs::metadata(&debugcon).is_ok_and(|m| m.len() > 0) {
            boot = Some(start.elapsed());
        }
        if let Some(st) = child.try_wait().expect("wait for qemu") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "QEMU still running after 180 s ({append}); serial so far:\n{}",
                std::fs::read_to_string(&serial).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    let serial = std::fs::read_to_string(&serial).expect("read serial log");
    let timer = std::fs::read(&debugcon).unwrap_or_default();
    assert_eq!(
        timer.first(),
        Some(&abi::BOOT_TIMER_BYTE),
        "no boot-timer byte on port 0xe9; QEMU said: {stderr}\nserial:\n{serial}"
    );
    Run {
        code: status.code(),
        serial: format!("{serial}{stderr}"),
        boot,
    }
}

/// The number before `unit` in `text` (e.g. `"32.1 MiB/s"`).
fn number_before(text: &str, unit: &str) -> f64 {
    let at = text
        .find(unit)
        .unwrap_or_else(|| panic!("no {unit:?} in {text:?}"));
    let head = text[..at].trim_end();
    let start = head
        .rfind(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or(0, |i| i + 1);
    head[start..]
        .parse()
        .unwrap_or_else(|e| panic!("no number before {unit:?} in {text:?}: {e}"))
}

fn write_then_verify(accel: Accel, test: &str) {
    if !can_run(test, accel) {
        return;
    }
    let (dir, elf) = scratch("guest-write");
    let disk = raw_image(&dir, "disk.raw", 32 << 20);
    let bytes = 16u64 << 20;
    let run = |append| boot(&dir, &elf, accel, &[(&disk, false)], append, false);

    let written = run("run=write seed=7 bytes=16M gen=3");
    let summary = written.passed();
    assert!(
        summary.starts_with("write seed=7 gen=3: 16384 KiB"),
        "{summary}"
    );
    eprintln!(
        "{test}: QEMU ({accel:?}) spawn to first 0xe9 write: {:?}",
        written.boot.expect("boot timer seen")
    );

    let image = std::fs::read(&disk).expect("read image");
    let split = usize::try_from(bytes).expect("fits");
    assert!(
        image[..split] == written_image(7, 3, bytes),
        "the image's first 16 MiB differ from the pattern"
    );
    assert!(
        image[split..].iter().all(|b| *b == 0),
        "the guest wrote past bytes="
    );

    let summary = run("run=verify seed=7 bytes=16M gen=3");
    assert!(
        summary
            .passed()
            .starts_with("verify seed=7 gen=3: 16384 KiB verified")
    );

    // verify really looks: another seed or generation fails, naming what it found.
    let other_seed = run("run=verify seed=8 bytes=16M gen=3");
    let why = other_seed.failed();
    assert!(
        why.contains("block at 0x0: holds seed 7") && why.contains("expected seed 8"),
        "{why}"
    );
    let newer_generation = run("run=verify seed=7 bytes=16M gen=4");
    let why = newer_generation.failed();
    assert!(
        why.contains("generation 3, expected seed 7 generation 4"),
        "{why}"
    );
}

#[test]
fn write_leaves_the_exact_pattern_and_verify_checks_it_kvm() {
    write_then_verify(
        Accel::Kvm,
        "write_leaves_the_exact_pattern_and_verify_checks_it_kvm",
    );
}

#[test]
fn write_leaves_the_exact_pattern_and_verify_checks_it_tcg() {
    write_then_verify(
        Accel::Tcg,
        "write_leaves_the_exact_pattern_and_verify_checks_it_tcg",
    );
}

#[test]
fn write_verify_loop_is_the_default_and_leaves_only_whole_pattern_blocks() {
    let test = "write_verify_loop_is_the_default_and_leaves_only_whole_pattern_blocks";
    if !can_run(test, Accel::Kvm) {
        return;
    }
    let (dir, elf) = scratch("guest-wvl");
    let disk = raw_image(&dir, "disk.raw", 8 << 20);
    // No run=: the default program, here for 2 s instead of 5.
    let run = boot(
        &dir,
        &elf,
        Accel::Kvm,
        &[(&disk, false)],
        "seconds=2 seed=11",
        false,
    );
    let summary = run.passed();
    assert!(
        summary.starts_with("write-verify-loop seed=11:"),
        "{summary}"
    );
    let writes = number_before(summary, " writes acknowledged");
    let at_end = number_before(summary, " at the end");
    assert!(writes > 0.0 && at_end > 0.0, "{summary}");

    // From outside: every block the guest touched holds a whole pattern block of the
    // run's seed, for its own offset; every other block is still zero.
    let image = std::fs::read(&disk).expect("read image");
    let mut written = 0;
    for (i, block) in image.chunks(BLOCK_SIZE).enumerate() {
        let off = (i * BLOCK_SIZE) as u64;
        match Stamp::read(block) {
            Some(s) => {
                assert_eq!((s.seed, s.off), (11, off), "block {i}");
                assert!(s.generation >= 1, "block {i}");
                assert_eq!(s.check(block), Ok(()), "block {i}");
                written += 1;
            }
            None => assert!(block.iter().all(|b| *b == 0), "block {i} is neither"),
        }
    }
    assert_eq!(
        f64::from(written),
        at_end,
        "the guest verified a different number of blocks than it left"
    );
}

#[test]
fn dirty_keeps_to_its_rate_and_idle_and_bench_pass() {
    let test = "dirty_keeps_to_its_rate_and_idle_and_bench_pass";
    if !can_run(test, Accel::Kvm) {
        return;
    }
    let (dir, elf) = scratch("guest-dirty");
    let run = boot(
        &dir,
        &elf,
        Accel::Kvm,
        &[],
        "run=dirty rate=32M seconds=2",
        false,
    );
    let summary = run.passed();
    let rate = number_before(summary, "MiB/s (asked");
    assert!((16.0..=33.0).contains(&rate), "{summary}");

    let run = boot(&dir, &elf, Accel::Kvm, &[], "run=idle seconds=1", false);
    assert!(run.passed().starts_with("idle: 1.0"), "{}", run.serial);

    let disk = raw_image(&dir, "disk.raw", 16 << 20);
    for mode in ["seqread bs=64K qd=4", "randwrite bs=4K qd=32"] {
        let run = boot(
            &dir,
            &elf,
            Accel::Kvm,
            &[(&disk, false)],
            &format!("run=bench mode={mode} seconds=1"),
            false,
        );
        let summary = run.passed();
        assert!(number_before(summary, " IOPS") > 0.0, "{summary}");
        assert!(number_before(summary, " MB/s") > 0.0, "{summary}");
        eprintln!("{test}: {summary}");
    }
}

#[test]
fn bad_input_ends_in_a_fail_line_not_a_hang() {
    let test = "bad_input_ends_in_a_fail_line_not_a_hang";
    if !can_run(test, Accel::Kvm) {
        return;
    }
    let (dir, elf) = scratch("guest-bad");
    let disk = raw_image(&dir, "disk.raw", 4 << 20);
    let ro = raw_image(&dir, "ro.raw", 4 << 20);
    let cases: [(Disks<'_>, &str, bool, &str); 6] = [
        (
            &[],
            "run=fly",
            false,
            "command line: run=fly: unknown program",
        ),
        (&[], "run=write", false, "needs a virtio-blk disk"),
        (
            &[(&disk, false)],
            "run=write",
            true,
            "is legacy (version 1)",
        ),
        (
            &[(&disk, false)],
            "run=write bytes=8M",
            false,
            "bytes=8388608 but the disk holds 4194304",
        ),
        (
            &[(&disk, false), (&ro, true)],
            "run=write",
            false,
            "disk 1 is read-only",
        ),
        (
            &[(&disk, false)],
            "run=verify",
            false,
            "block at 0x0: no pattern header",
        ),
    ];
    for (disks, append, legacy, want) in cases {
        let run = boot(&dir, &elf, Accel::Kvm, disks, append, legacy);
        let why = run.failed();
        assert!(why.contains(want), "{append}: {why}");
    }
}
