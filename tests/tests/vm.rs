//! Real guests on real KVM, with the sandbox on: hand-assembled CPL3 guests
//! (`tests::guest`) drive virtio-blk, the serial port, the reset line and the debug-exit
//! port, and the tests check the run-state machine over QMP and the images from outside
//! with qemu-img.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use tests::guest::{
    self, DESC_INDIRECT, DESC_NEXT, DESC_WRITE, Disk, F_FLUSH, F_INDIRECT, F_MQ, Guest, S_IOERR,
    S_OK, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
};
use tests::{
    RawQmp, Splitvmm, TempDir, image_bytes, kvm_or_skip, qemu_img_create, run, wait_for_text,
};

const BLOCK: u64 = 4096;
const SECTORS_PER_BLOCK: u64 = BLOCK / 512;

/// Starts splitvmm paused with `guest` as its kernel, `--serial file:`, and `drives`
/// (`(id, file, format, extra options)`); returns it and a negotiated QMP connection.
fn boot(dir: TempDir, guest: &Guest, cpus: u8, drives: &[String]) -> (Splitvmm, RawQmp) {
    boot_with(dir, guest, cpus, drives, &[])
}

/// [`boot`] with more command-line options.
fn boot_with(
    dir: TempDir,
    guest: &Guest,
    cpus: u8,
    drives: &[String],
    extra: &[&str],
) -> (Splitvmm, RawQmp) {
    let kernel = dir.join("guest.elf");
    guest.write(&kernel);
    let serial = dir.join("serial.log");
    let cpus = cpus.to_string();
    let kernel_arg = kernel.display().to_string();
    let serial_arg = format!("file:{}", serial.display());
    let mut args = vec![
        "--kernel",
        &kernel_arg,
        "--memory",
        "64M",
        "--cpus",
        &cpus,
        "--serial",
        &serial_arg,
        "--paused",
    ];
    for d in drives {
        args.extend(["--drive", d]);
    }
    args.extend(extra);
    let vm = Splitvmm::start_in(dir, &args);
    let qmp = vm.raw_qmp();
    (vm, qmp)
}

fn serial(vm: &Splitvmm) -> std::path::PathBuf {
    vm.dir.join("serial.log")
}

fn status(qmp: &mut RawQmp) -> String {
    qmp.ok("query-status", json!({}))["status"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Waits for splitvmm to exit after the guest powered off; returns its exit code and
/// checks the SHUTDOWN event said the guest did it.
fn guest_exit(vm: &mut Splitvmm, qmp: &mut RawQmp) -> Option<i32> {
    let ev = qmp.event("SHUTDOWN");
    assert_eq!(
        ev["data"],
        json!({ "guest": true, "reason": "guest-shutdown" }),
        "{ev}"
    );
    vm.wait_exit(Duration::from_secs(20)).code()
}

/// Each vCPU writes 16 blocks of its own range through its own queue (4 blocks per
/// request, one segment per block), flushes, reads them back into fresh buffers and
/// compares; vCPU 0 also asks for the disk's id.
fn disk_io_guest(cpus: usize) -> Guest {
    let mut g = Guest::new(cpus);
    g.boot_timer(0);
    let features = F_FLUSH | F_INDIRECT | if cpus > 1 { F_MQ } else { 0 };
    let mut disk = Disk::setup(&mut g, 0, 0, cpus, features);
    let ready = g.zeroed(2, 2);
    let done = g.zeroed(2 * cpus, 2);
    g.w16(0, ready, 1);
    for cpu in 0..cpus {
        if cpu > 0 {
            g.wait16(cpu, ready, 1);
        }
        let first = cpu as u64 * 16;
        let mut writes = Vec::new();
        let mut reads = Vec::new();
        let mut statuses = Vec::new();
        for req in 0..4u64 {
            let blocks: Vec<u64> = (0..4).map(|b| first + req * 4 + b).collect();
            let src: Vec<(u64, u32)> = blocks
                .iter()
                .map(|&b| (g.alloc(&guest::pattern(7, b), BLOCK), BLOCK as u32))
                .collect();
            let dst: Vec<(u64, u32)> = blocks
                .iter()
                .map(|_| (g.zeroed(BLOCK as usize, BLOCK), BLOCK as u32))
                .collect();
            let sector = blocks[0] * SECTORS_PER_BLOCK;
            statuses.push(disk.request(&mut g, cpu, T_OUT, sector, &src));
            writes.push(src);
            reads.push((sector, dst));
        }
        statuses.push(disk.request(&mut g, cpu, T_FLUSH, 0, &[]));
        disk.submit(&mut g, cpu, cpu);
        for s in statuses.drain(..) {
            g.expect8(cpu, s, S_OK);
        }
        for (sector, dst) in &reads {
            statuses.push(disk.request(&mut g, cpu, T_IN, *sector, dst));
        }
        disk.submit(&mut g, cpu, cpu);
        for s in statuses.drain(..) {
            g.expect8(cpu, s, S_OK);
        }
        for (src, (_, dst)) in writes.iter().zip(&reads) {
            for (a, b) in src.iter().zip(dst) {
                g.expect_same(cpu, a.0, b.0, BLOCK);
            }
        }
        if cpu == 0 {
            let id = g.zeroed(20, 8);
            let s = disk.request(&mut g, 0, T_GET_ID, 0, &[(id, 20)]);
            disk.submit(&mut g, 0, 0);
            g.expect8(0, s, S_OK);
            let mut want = b"disk0".to_vec();
            want.resize(20, 0);
            let want = g.alloc(&want, 8);
            g.expect_same(0, id, want, 20);
        }
        g.w16(cpu, done + 2 * cpu as u64, 1);
    }
    for cpu in 1..cpus {
        g.wait16(0, done + 2 * cpu as u64, 1);
        g.idle(cpu);
    }
    g.pass(0);
    g
}

fn disk_io(cpus: usize, format: &str) {
    let dir = TempDir::new("vm-disk");
    let img = dir.join(&format!("disk0.{format}"));
    qemu_img_create(format, &img, "16M");
    let drive = format!("id=disk0,file={},format={format}", img.display());
    let (mut vm, mut qmp) = boot(dir, &disk_io_guest(cpus), cpus as u8, &[drive]);
    assert_eq!(status(&mut qmp), "prelaunch");
    qmp.cont();
    assert_eq!(
        guest_exit(&mut vm, &mut qmp),
        Some(0),
        "{}",
        vm.stderr_text()
    );
    let text = std::fs::read_to_string(serial(&vm)).unwrap_or_default();
    assert!(text.ends_with("workload: PASS\r\n"), "serial: {text:?}");
    let bytes = image_bytes(&img, format, &vm.dir);
    for block in 0..16 * cpus as u64 {
        let at = (block * BLOCK) as usize;
        assert!(
            bytes[at..at + BLOCK as usize] == guest::pattern(7, block)[..],
            "block {block} of the {format} image is not what the guest wrote"
        );
    }
    assert!(
        bytes[(16 * cpus as u64 * BLOCK) as usize..]
            .iter()
            .all(|&b| b == 0),
        "the guest wrote past its blocks"
    );
    if format == "qcow2" {
        run(Command::new("qemu-img").args(["check", "-q"]).arg(&img));
    }
}

#[test]
fn one_vcpu_writes_and_reads_a_raw_disk_and_qemu_img_sees_the_data() {
    if kvm_or_skip("one_vcpu_writes_and_reads_a_raw_disk_and_qemu_img_sees_the_data") {
        disk_io(1, "raw");
    }
}

#[test]
fn two_vcpus_write_a_qcow2_disk_through_their_own_queues() {
    if kvm_or_skip("two_vcpus_write_a_qcow2_disk_through_their_own_queues") {
        disk_io(2, "qcow2");
    }
}

/// A guest that loops forever: one disk write, then a dot on the serial port.
#[test]
fn stop_freezes_a_busy_guest_and_cont_resumes_it() {
    if !kvm_or_skip("stop_freezes_a_busy_guest_and_cont_resumes_it") {
        return;
    }
    let dir = TempDir::new("vm-stop");
    let img = dir.join("disk0.raw");
    qemu_img_create("raw", &img, "1M");
    let mut g = Guest::new(1);
    let mut disk = Disk::setup(&mut g, 0, 0, 1, 0);
    let buf = g.alloc(&guest::pattern(3, 0), BLOCK);
    let status = disk.request(&mut g, 0, T_OUT, 0, &[(buf, BLOCK as u32)]);
    disk.ring_of(&mut g, 0, 0);
    let top = g.here(0);
    g.fill(0, status, 0xff, 1);
    disk.loop_once(&mut g, 0, 0);
    g.expect8(0, status, S_OK);
    g.print(0, ".");
    g.jump(0, top);
    let drive = format!("id=disk0,file={},format=raw", img.display());
    let (vm, mut qmp) = boot(dir, &g, 1, &[drive]);
    qmp.cont();
    let log = serial(&vm);
    wait_for_text(&log, Duration::from_secs(20), |t| t.len() >= 20);
    assert_eq!(qmp.ok("stop", json!({})), json!({}));
    qmp.event("STOP");
    assert_eq!(
        status_of(&mut qmp),
        json!({ "running": false, "status": "paused" })
    );
    let frozen = std::fs::read_to_string(&log).unwrap_or_default().len();
    std::thread::sleep(Duration::from_millis(500));
    let later = std::fs::read_to_string(&log).unwrap_or_default().len();
    assert_eq!(frozen, later, "the guest ran while paused");
    // stop again: no error, no event.
    assert_eq!(qmp.ok("stop", json!({})), json!({}));
    qmp.cont();
    wait_for_text(&log, Duration::from_secs(20), |t| t.len() >= frozen + 20);
    assert_eq!(
        status_of(&mut qmp),
        json!({ "running": true, "status": "running" })
    );
    assert_eq!(qmp.ok("cont", json!({})), json!({}), "cont when running");
    assert_eq!(
        std::fs::read(&img).expect("image")[..BLOCK as usize],
        guest::pattern(3, 0)[..]
    );
    assert!(vm.stderr_text().is_empty(), "{}", vm.stderr_text());
}

fn status_of(qmp: &mut RawQmp) -> Value {
    qmp.ok("query-status", json!({}))
}

/// Broken and hostile requests: each gets IOERR or UNSUPP, or comes back unanswered when
/// it has no usable status byte; vmm-proc survives them and the disk still works.
#[test]
fn hostile_descriptors_get_ioerr_and_vmm_proc_survives() {
    if !kvm_or_skip("hostile_descriptors_get_ioerr_and_vmm_proc_survives") {
        return;
    }
    let dir = TempDir::new("vm-hostile");
    let img = dir.join("disk0.raw");
    let ro = dir.join("ro.raw");
    qemu_img_create("raw", &img, "1M");
    qemu_img_create("raw", &ro, "1M");
    let mut g = Guest::new(1);
    let mut disk = Disk::setup(&mut g, 0, 0, 1, F_INDIRECT);
    let mut rodisk = Disk::setup(&mut g, 0, 1, 1, 0);
    let buf = g.zeroed(BLOCK as usize, BLOCK);
    let header = |g: &mut Guest, kind: u32, sector: u64| {
        let mut h = kind.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&sector.to_le_bytes());
        g.alloc(&h, 16)
    };
    let mut expect = vec![
        // Data beyond guest RAM (64 MiB).
        (
            disk.request(&mut g, 0, T_IN, 0, &[(0x7000_0000, 4096)]),
            S_IOERR,
        ),
        // Sectors past the end of the disk, and a sector number that overflows.
        (disk.request(&mut g, 0, T_IN, 2047, &[(buf, 1024)]), S_IOERR),
        (
            disk.request(&mut g, 0, T_IN, u64::MAX, &[(buf, 512)]),
            S_IOERR,
        ),
        // Not whole sectors.
        (disk.request(&mut g, 0, T_IN, 0, &[(buf, 100)]), S_IOERR),
        // Write-zeroes was not negotiated; an unknown type.
        (disk.request(&mut g, 0, T_WRITE_ZEROES, 0, &[]), S_UNSUPP),
        (disk.request(&mut g, 0, 0x7777, 0, &[]), S_UNSUPP),
    ];
    // A read whose data buffer is device-readable (wrong direction).
    let h = header(&mut g, T_IN, 0);
    let st = g.alloc(&[0xff], 1);
    disk.raw_chain(
        &mut g,
        0,
        &[
            (h, 16, DESC_NEXT, 1),
            (buf, 512, DESC_NEXT, 2),
            (st, 1, DESC_WRITE, 0),
        ],
    );
    expect.push((st, S_IOERR));
    // Chains without a usable status byte come back untouched: a loop, a next index out
    // of the table, an indirect table of bogus size, no writable descriptor at all.
    let untouched = |g: &mut Guest| g.alloc(&[0xff], 1);
    let h = header(&mut g, T_IN, 0);
    let st = untouched(&mut g);
    disk.raw_chain(
        &mut g,
        0,
        &[(h, 16, DESC_NEXT, 1), (st, 1, DESC_WRITE | DESC_NEXT, 0)],
    );
    expect.push((st, 0xff));
    let st = untouched(&mut g);
    disk.raw_chain(
        &mut g,
        0,
        &[(h, 16, DESC_NEXT, 500), (st, 1, DESC_WRITE, 0)],
    );
    expect.push((st, 0xff));
    let table = g.zeroed(64, 16);
    let st = untouched(&mut g);
    disk.raw_chain(&mut g, 0, &[(table, 17, DESC_INDIRECT, 0)]);
    expect.push((st, 0xff));
    let st = untouched(&mut g);
    disk.raw_chain(&mut g, 0, &[(h, 16, 0, 0)]);
    expect.push((st, 0xff));
    disk.submit(&mut g, 0, 0);
    for (st, want) in expect {
        g.expect8(0, st, want);
    }
    // A write to the read-only disk.
    let st = rodisk.request(&mut g, 0, T_OUT, 0, &[(buf, 512)]);
    rodisk.submit(&mut g, 0, 0);
    g.expect8(0, st, S_IOERR);
    // The disk still works.
    let data = g.alloc(&guest::pattern(9, 0), BLOCK);
    let st = disk.request(&mut g, 0, T_OUT, 8, &[(data, BLOCK as u32)]);
    disk.submit(&mut g, 0, 0);
    g.expect8(0, st, S_OK);
    g.pass(0);
    let drives = [
        format!("id=disk0,file={},format=raw", img.display()),
        format!("id=ro,file={},format=raw,readonly=on", ro.display()),
    ];
    let (mut vm, mut qmp) = boot(dir, &g, 1, &drives);
    qmp.cont();
    assert_eq!(
        guest_exit(&mut vm, &mut qmp),
        Some(0),
        "{}",
        vm.stderr_text()
    );
    let bytes = std::fs::read(&img).expect("image");
    assert_eq!(bytes[4096..8192], guest::pattern(9, 0)[..]);
    assert!(bytes[..4096].iter().all(|&b| b == 0));
    assert!(std::fs::read(&ro).expect("ro").iter().all(|&b| b == 0));
    // The last write proved vmm-proc survived; nothing died on the way either.
    let stderr = vm.stderr_text();
    assert!(
        !stderr.contains("exited with") && !stderr.contains("killed by signal"),
        "{stderr}"
    );
}

/// A guest that says hello and idles.
fn hello_guest() -> Guest {
    let mut g = Guest::new(1);
    g.boot_timer(0);
    g.print(0, "hello from the guest\r\n");
    g.idle(0);
    g
}

#[test]
fn serial_output_goes_to_the_file_the_monitor_opened() {
    if !kvm_or_skip("serial_output_goes_to_the_file_the_monitor_opened") {
        return;
    }
    let (vm, mut qmp) = boot(TempDir::new("vm-serial"), &hello_guest(), 1, &[]);
    assert!(
        std::fs::read(serial(&vm)).expect("serial file").is_empty(),
        "output before cont"
    );
    qmp.cont();
    wait_for_text(&serial(&vm), Duration::from_secs(20), |t| {
        t == "hello from the guest\r\n"
    });
}

#[test]
fn system_reset_reboots_the_guest_and_keeps_the_run_state() {
    if !kvm_or_skip("system_reset_reboots_the_guest_and_keeps_the_run_state") {
        return;
    }
    let (vm, mut qmp) = boot(TempDir::new("vm-reset"), &hello_guest(), 1, &[]);
    let log = serial(&vm);
    let times = |n: usize| move |t: &str| t.matches("hello").count() == n;
    qmp.cont();
    wait_for_text(&log, Duration::from_secs(20), times(1));
    assert_eq!(qmp.ok("system_reset", json!({})), json!({}));
    let ev = qmp.event("RESET");
    assert_eq!(
        ev["data"],
        json!({ "guest": false, "reason": "host-qmp-system-reset" })
    );
    wait_for_text(&log, Duration::from_secs(20), times(2));
    assert_eq!(status(&mut qmp), "running");
    // From paused, a reset leaves the VM in prelaunch (QEMU's rule) until cont.
    qmp.ok("stop", json!({}));
    qmp.event("STOP");
    qmp.ok("system_reset", json!({}));
    qmp.event("RESET");
    assert_eq!(status(&mut qmp), "prelaunch");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("hello")
            .count(),
        2
    );
    qmp.cont();
    wait_for_text(&log, Duration::from_secs(20), times(3));
}

#[test]
fn the_i8042_reset_line_resets_the_machine() {
    if !kvm_or_skip("the_i8042_reset_line_resets_the_machine") {
        return;
    }
    let mut g = Guest::new(1);
    g.print(0, "boot\r\n");
    g.out8(0, 0x64, 0xfe);
    g.print(0, "the reset line did nothing\r\n");
    g.idle(0);
    let (vm, mut qmp) = boot(TempDir::new("vm-i8042"), &g, 1, &[]);
    qmp.cont();
    for _ in 0..3 {
        let ev = qmp.event("RESET");
        assert_eq!(
            ev["data"],
            json!({ "guest": true, "reason": "guest-reset" })
        );
    }
    let text = wait_for_text(&serial(&vm), Duration::from_secs(20), |t| {
        t.matches("boot").count() >= 3
    });
    assert!(!text.contains("did nothing"), "{text:?}");
    assert_eq!(status(&mut qmp), "running");
}

/// A guest that says "crash" and triple-faults: a store to a non-canonical address is a
/// #GP, and with no IDT that is a triple fault (`KVM_EXIT_SHUTDOWN`).
fn triple_fault_guest() -> Guest {
    let mut g = Guest::new(1);
    g.print(0, "crash\r\n");
    g.w32(0, 0x8000_0000_0000_0000, 1);
    g.print(0, "survived the fault\r\n");
    g.idle(0);
    g
}

#[test]
fn a_triple_fault_resets_the_machine_as_qemu_does() {
    if !kvm_or_skip("a_triple_fault_resets_the_machine_as_qemu_does") {
        return;
    }
    let (vm, mut qmp) = boot(TempDir::new("vm-triple"), &triple_fault_guest(), 1, &[]);
    qmp.cont();
    // Every fault is a guest reset and the guest boots again; nothing stops the VM.
    let mut resets = 0;
    while resets < 3 {
        let msg = qmp.read();
        match msg["event"].as_str() {
            Some("RESET") => {
                assert_eq!(
                    msg["data"],
                    json!({ "guest": true, "reason": "guest-reset" })
                );
                resets += 1;
            }
            Some(other) => panic!("unexpected event {other}: {msg}"),
            None => panic!("unexpected message {msg}"),
        }
    }
    let text = wait_for_text(&serial(&vm), Duration::from_secs(20), |t| {
        t.matches("crash").count() >= 3
    });
    assert!(!text.contains("survived"), "{text:?}");
    assert_eq!(status(&mut qmp), "running");
}

#[test]
fn with_no_reboot_a_triple_fault_shuts_down_with_reason_guest_reset() {
    if !kvm_or_skip("with_no_reboot_a_triple_fault_shuts_down_with_reason_guest_reset") {
        return;
    }
    let (mut vm, mut qmp) = boot_with(
        TempDir::new("vm-no-reboot"),
        &triple_fault_guest(),
        1,
        &[],
        &["--no-reboot"],
    );
    qmp.cont();
    // QEMU -no-reboot: no RESET, one SHUTDOWN, and exit status 0. The guest faults at
    // once, so SHUTDOWN may come before `cont`'s reply: take it from the kept events too.
    let msg = qmp.next_event();
    assert_eq!(msg["event"], "SHUTDOWN", "{msg}");
    assert_eq!(
        msg["data"],
        json!({ "guest": true, "reason": "guest-reset" })
    );
    assert_eq!(
        vm.wait_exit(Duration::from_secs(20)).code(),
        Some(0),
        "{}",
        vm.stderr_text()
    );
    let text = std::fs::read_to_string(serial(&vm)).unwrap_or_default();
    assert_eq!(text, "crash\r\n");
}

#[test]
fn a_failing_guest_makes_splitvmm_exit_1() {
    if !kvm_or_skip("a_failing_guest_makes_splitvmm_exit_1") {
        return;
    }
    let mut g = Guest::new(2);
    g.print(0, "workload: FAIL on purpose\r\n");
    g.out32(0, 0xf4, 1);
    g.idle(0);
    g.idle(1);
    let (mut vm, mut qmp) = boot(TempDir::new("vm-fail"), &g, 2, &[]);
    qmp.cont();
    assert_eq!(guest_exit(&mut vm, &mut qmp), Some(1));
    assert!(!vm.qmp.exists() && !vm.pidfile.exists());
}

/// Starts splitvmm paused with `guest` packed as a bzImage (the Linux path), `initrd` if
/// any, `--serial file:` and `drives`.
fn boot_linux(
    dir: TempDir,
    guest: &Guest,
    cpus: u8,
    memory: &str,
    initrd: Option<&[u8]>,
    append: &str,
    drives: &[String],
) -> (Splitvmm, RawQmp) {
    let kernel = dir.join("bzImage");
    std::fs::write(&kernel, guest.bzimage()).expect("write the bzImage");
    let initrd_path = dir.join("initrd");
    let serial = dir.join("serial.log");
    let cpus = cpus.to_string();
    let kernel_arg = kernel.display().to_string();
    let initrd_arg = initrd_path.display().to_string();
    let serial_arg = format!("file:{}", serial.display());
    let mut args = vec![
        "--kernel",
        &kernel_arg,
        "--memory",
        memory,
        "--cpus",
        &cpus,
        "--append",
        append,
        "--serial",
        &serial_arg,
        "--paused",
    ];
    if let Some(bytes) = initrd {
        std::fs::write(&initrd_path, bytes).expect("write the initrd");
        args.extend(["--initrd", &initrd_arg]);
    }
    for d in drives {
        args.extend(["--drive", d]);
    }
    let vm = Splitvmm::start_in(dir, &args);
    let qmp = vm.raw_qmp();
    (vm, qmp)
}

/// `boot_params` (the zero page) and the fields of it the tests read.
const ZERO_PAGE: u64 = 0x7000;
const BP_RSDP: u64 = ZERO_PAGE + 0x070;
const BP_E820_ENTRIES: u64 = ZERO_PAGE + 0x1e8;
const BP_HDRS: u64 = ZERO_PAGE + 0x202;
const BP_LOADER_TYPE: u64 = ZERO_PAGE + 0x210;
const BP_RAMDISK_IMAGE: u64 = ZERO_PAGE + 0x218;
const BP_RAMDISK_SIZE: u64 = ZERO_PAGE + 0x21c;
const BP_CMDLINE_PTR: u64 = ZERO_PAGE + 0x228;
const BP_E820_TABLE: u64 = ZERO_PAGE + 0x2d0;
const CMDLINE: u64 = 0x2_0000;
const RSDP: u64 = 0xe_0000;
const VIRTIO_MAGIC: u32 = u32::from_le_bytes(*b"virt");

/// An initramfs of `len` bytes that no two offsets of fill alike.
fn initrd_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// Where the loader puts an initramfs of `len` bytes in `mem` bytes of RAM (below 3 GiB):
/// at the top, page-aligned.
fn initrd_at(mem: u64, len: usize) -> u64 {
    (mem.min(0xc000_0000) - len as u64) & !0xfff
}

#[test]
fn a_linux_kernel_finds_its_boot_params_initrd_acpi_and_disk_and_powers_off_through_acpi() {
    let test =
        "a_linux_kernel_finds_its_boot_params_initrd_acpi_and_disk_and_powers_off_through_acpi";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new("vm-linux");
    let img = dir.join("disk0.raw");
    qemu_img_create("raw", &img, "1M");
    let initrd = initrd_bytes(10_000);
    let append = "console=ttyS0 splitvmm-test=1";
    let mut g = Guest::new(2);
    g.print(0, "linux entry\r\n");
    g.expect32(0, BP_HDRS, u32::from_le_bytes(*b"HdrS"));
    g.expect8(0, BP_LOADER_TYPE, 0xff);
    // The command line, exactly as given (nothing appended for a Linux guest).
    g.expect32(0, BP_CMDLINE_PTR, CMDLINE as u32);
    let mut want = append.as_bytes().to_vec();
    want.push(0);
    let want_at = g.alloc(&want, 1);
    g.expect_same(0, CMDLINE, want_at, want.len() as u64);
    // The initramfs, read by vmm-proc from the descriptor the monitor opened.
    let at = initrd_at(64 << 20, initrd.len());
    g.expect32(0, BP_RAMDISK_IMAGE, at as u32);
    g.expect32(0, BP_RAMDISK_SIZE, initrd.len() as u32);
    let copy = g.alloc(&initrd, 1);
    g.expect_same(0, at, copy, initrd.len() as u64);
    // ACPI: the RSDP where boot_params says; 64 MiB is four e820 entries.
    g.expect32(0, BP_RSDP, RSDP as u32);
    g.expect32(0, RSDP, u32::from_le_bytes(*b"RSD "));
    g.expect32(0, RSDP + 4, u32::from_le_bytes(*b"PTR "));
    g.expect8(0, BP_E820_ENTRIES, 4);
    // The disk, where the DSDT says it is.
    g.expect32(0, 0xd000_0000, VIRTIO_MAGIC);
    g.expect32(0, 0xd000_0008, 2);
    g.print(0, "checks passed\r\n");
    // ACPI S5 through the FADT's sleep control register.
    g.out8(0, 0x3c0, 0x34);
    g.print(0, "the sleep register did nothing\r\n");
    g.idle(0);
    // The other vCPU waits for an INIT/SIPI that never comes.
    g.print(1, "AP ran\r\n");
    g.idle(1);
    let drive = format!("id=disk0,file={},format=raw", img.display());
    let (mut vm, mut qmp) = boot_linux(dir, &g, 2, "64M", Some(&initrd), append, &[drive]);
    qmp.cont();
    assert_eq!(
        guest_exit(&mut vm, &mut qmp),
        Some(0),
        "{}",
        vm.stderr_text()
    );
    let text = std::fs::read_to_string(serial(&vm)).unwrap_or_default();
    assert!(
        text.starts_with("linux entry\r\nchecks passed\r\n"),
        "{text:?}"
    );
    assert!(
        !text.contains("did nothing") && !text.contains("AP ran"),
        "{text:?}"
    );
}

#[test]
fn a_linux_guest_reboot_reloads_the_kernel_and_initrd_and_keeps_the_aps_waiting() {
    let test = "a_linux_guest_reboot_reloads_the_kernel_and_initrd_and_keeps_the_aps_waiting";
    if !kvm_or_skip(test) {
        return;
    }
    let initrd = initrd_bytes(5000);
    let mut g = Guest::new(2);
    g.print(0, "boot\r\n");
    // Each boot finds what the one before destroyed: the initramfs, a word of the
    // kernel's own data and boot_params are loaded again.
    let at = initrd_at(64 << 20, initrd.len());
    let copy = g.alloc(&initrd, 1);
    let marker = g.alloc(b"KERN", 4);
    g.expect_same(0, at, copy, initrd.len() as u64);
    g.expect32(0, marker, u32::from_le_bytes(*b"KERN"));
    g.expect32(0, BP_HDRS, u32::from_le_bytes(*b"HdrS"));
    g.fill(0, at, 0, initrd.len() as u64);
    g.w32(0, marker, 0);
    g.w32(0, BP_HDRS, 0);
    // The i8042 reset line, which is also the FADT's reset register.
    g.out8(0, 0x64, 0xfe);
    g.print(0, "the reset line did nothing\r\n");
    g.idle(0);
    g.print(1, "AP ran\r\n");
    g.idle(1);
    let (mut vm, mut qmp) = boot_linux(
        TempDir::new("vm-linux-reset"),
        &g,
        2,
        "64M",
        Some(&initrd),
        "console=ttyS0",
        &[],
    );
    qmp.cont();
    for _ in 0..3 {
        let ev = qmp.event("RESET");
        assert_eq!(
            ev["data"],
            json!({ "guest": true, "reason": "guest-reset" })
        );
    }
    qmp.ok("stop", json!({}));
    qmp.event("STOP");
    let text = wait_for_text(&serial(&vm), Duration::from_secs(20), |t| {
        t.matches("boot").count() >= 3
    });
    assert!(
        !text.contains("did nothing") && !text.contains("AP ran"),
        "{text:?}"
    );
    // A failed check would have powered the VM off with a non-zero value.
    assert_eq!(status(&mut qmp), "paused", "{}", vm.stderr_text());
    // system_reset does the same reload: from paused, the VM waits in prelaunch, then
    // boots again (and goes on rebooting) once continued.
    let boots = text.matches("boot").count();
    qmp.ok("system_reset", json!({}));
    // Guest resets from before the stop may still be queued: skip to the host's.
    let host = loop {
        let ev = qmp.event("RESET");
        if ev["data"]["guest"] != json!(true) {
            break ev;
        }
    };
    assert_eq!(
        host["data"],
        json!({ "guest": false, "reason": "host-qmp-system-reset" })
    );
    assert_eq!(status(&mut qmp), "prelaunch");
    qmp.cont();
    qmp.event("RESET");
    let text = wait_for_text(&serial(&vm), Duration::from_secs(20), |t| {
        t.matches("boot").count() > boots + 1
    });
    assert!(
        !text.contains("did nothing") && !text.contains("AP ran"),
        "{text:?}"
    );
    qmp.ok("quit", json!({}));
    assert_eq!(vm.wait_exit(Duration::from_secs(20)).code(), Some(0));
}

#[test]
fn a_linux_kernel_is_read_again_at_each_reset_and_a_broken_one_stops_the_vm() {
    let test = "a_linux_kernel_is_read_again_at_each_reset_and_a_broken_one_stops_the_vm";
    if !kvm_or_skip(test) {
        return;
    }
    let mut g = Guest::new(1);
    g.print(0, "boot\r\n");
    g.idle(0);
    let (vm, mut qmp) = boot_linux(TempDir::new("vm-linux-reload"), &g, 1, "64M", None, "", &[]);
    let log = serial(&vm);
    let boots = |n: usize| move |t: &str| t.matches("boot").count() == n;
    qmp.cont();
    wait_for_text(&log, Duration::from_secs(20), boots(1));
    // The kernel file, cut short in place: the descriptor vmm-proc holds sees it, so the
    // reset cannot load a kernel and the VM stops, panicked.
    let kernel = vm.dir.join("bzImage");
    let image = std::fs::read(&kernel).expect("read the bzImage");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&kernel)
        .and_then(|f| f.set_len(100))
        .expect("truncate the bzImage");
    let (class, desc) = qmp.err("system_reset", json!({}));
    assert_eq!(class, "GenericError");
    assert!(desc.contains("too small for a bzImage"), "{desc}");
    qmp.event("GUEST_PANICKED");
    assert_eq!(status(&mut qmp), "guest-panicked");
    // Written back in place, it loads again.
    std::fs::write(&kernel, &image).expect("restore the bzImage");
    qmp.ok("system_reset", json!({}));
    qmp.event("RESET");
    assert_eq!(status(&mut qmp), "prelaunch");
    qmp.cont();
    wait_for_text(&log, Duration::from_secs(20), boots(2));
}

#[test]
fn a_linux_guest_with_more_than_3_gib_has_ram_at_4_gib() {
    if !kvm_or_skip("a_linux_guest_with_more_than_3_gib_has_ram_at_4_gib") {
        return;
    }
    let mut g = Guest::new(1);
    // 3 GiB + 64 MiB: five e820 entries, the last one RAM at 4 GiB.
    g.expect8(0, BP_E820_ENTRIES, 5);
    let last = BP_E820_TABLE + 4 * 20;
    g.expect32(0, last, 0);
    g.expect32(0, last + 4, 1);
    g.expect32(0, last + 8, 64 << 20);
    g.expect32(0, last + 12, 0);
    g.expect32(0, last + 16, 1);
    g.print(0, "RAM at 4 GiB\r\n");
    g.out8(0, 0x3c0, 0x34);
    g.idle(0);
    let (mut vm, mut qmp) = boot_linux(TempDir::new("vm-linux-4g"), &g, 1, "3136M", None, "", &[]);
    qmp.cont();
    assert_eq!(
        guest_exit(&mut vm, &mut qmp),
        Some(0),
        "{}",
        vm.stderr_text()
    );
    let text = std::fs::read_to_string(serial(&vm)).unwrap_or_default();
    assert_eq!(text, "RAM at 4 GiB\r\n");
}

#[test]
fn broken_linux_kernels_and_misplaced_initrds_are_refused_clearly() {
    if !kvm_or_skip("broken_linux_kernels_and_misplaced_initrds_are_refused_clearly") {
        return;
    }
    let dir = TempDir::new("vm-linux-bad");
    let run = |kernel: &[u8], extra: &[&str]| {
        let path = dir.join("kernel");
        std::fs::write(&path, kernel).expect("write");
        let out = Command::new(tests::bin_dir().join("splitvmm"))
            .arg("--kernel")
            .arg(&path)
            .args(["--memory", "64M"])
            .args(extra)
            .output()
            .expect("run splitvmm");
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    // A setup header with no boot sector signature.
    let mut bz = vec![0u8; 4096];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    let e = run(&bz, &[]);
    assert!(e.contains("not a bzImage"), "{e}");
    // A bzImage that would unpack past the end of RAM.
    let mut big = Guest::new(1).bzimage();
    big[0x260..0x264].copy_from_slice(&(200u32 << 20).to_le_bytes()); // init_size
    let e = run(&big, &[]);
    assert!(e.contains("does not fit"), "{e}");
    // An initramfs for the workload guest, which takes none.
    let initrd = dir.join("initrd");
    std::fs::write(&initrd, b"x").expect("write");
    let e = run(
        &Guest::new(1).elf(),
        &["--initrd", &initrd.display().to_string()],
    );
    assert!(e.contains("takes no initrd"), "{e}");
}

#[test]
fn query_blockstats_counts_what_the_guest_did() {
    if !kvm_or_skip("query_blockstats_counts_what_the_guest_did") {
        return;
    }
    let dir = TempDir::new("vm-stats");
    let img = dir.join("disk0.qcow2");
    qemu_img_create("qcow2", &img, "1M");
    let mut g = Guest::new(1);
    let mut disk = Disk::setup(&mut g, 0, 0, 1, F_FLUSH);
    let a = g.alloc(&guest::pattern(1, 0), BLOCK);
    let b = g.alloc(&guest::pattern(1, 1), BLOCK);
    let back = g.zeroed(2 * BLOCK as usize, BLOCK);
    let ok = [
        disk.request(&mut g, 0, T_OUT, 0, &[(a, BLOCK as u32)]),
        disk.request(&mut g, 0, T_OUT, 24, &[(b, BLOCK as u32)]),
        disk.request(&mut g, 0, T_FLUSH, 0, &[]),
    ];
    disk.submit(&mut g, 0, 0);
    let read = disk.request(&mut g, 0, T_IN, 0, &[(back, 2 * BLOCK as u32)]);
    // Past the end of the 1 MiB disk: an invalid read.
    let invalid = disk.request(&mut g, 0, T_IN, 2048, &[(back, 512)]);
    disk.submit(&mut g, 0, 0);
    for s in ok.into_iter().chain([read]) {
        g.expect8(0, s, S_OK);
    }
    g.expect8(0, invalid, S_IOERR);
    g.print(0, "done\r\n");
    g.idle(0);
    let drive = format!("id=disk0,file={},format=qcow2", img.display());
    let (vm, mut qmp) = boot(dir, &g, 1, &[drive]);
    let before = qmp.ok("query-blockstats", json!({}));
    assert_eq!(before[0]["device"], "disk0");
    assert_eq!(before[0]["stats"]["wr_operations"], 0);
    assert!(before[0]["stats"].get("idle_time_ns").is_none(), "{before}");
    qmp.cont();
    wait_for_text(&serial(&vm), Duration::from_secs(20), |t| t == "done\r\n");
    let all = qmp.ok("query-blockstats", json!({}));
    let s = &all[0]["stats"];
    let counts = json!({
        "wr_operations": s["wr_operations"], "wr_bytes": s["wr_bytes"],
        "rd_operations": s["rd_operations"], "rd_bytes": s["rd_bytes"],
        "flush_operations": s["flush_operations"],
        "invalid_rd_operations": s["invalid_rd_operations"],
        "failed_rd_operations": s["failed_rd_operations"],
        "wr_highest_offset": s["wr_highest_offset"],
    });
    assert_eq!(
        counts,
        json!({
            "wr_operations": 2, "wr_bytes": 8192, "rd_operations": 1, "rd_bytes": 8192,
            "flush_operations": 1, "invalid_rd_operations": 1, "failed_rd_operations": 0,
            "wr_highest_offset": 24 * 512 + 4096,
        }),
        "{all}"
    );
    assert!(s["rd_total_time_ns"].as_u64() > Some(0), "{all}");
    assert!(s["idle_time_ns"].as_u64().is_some(), "{all}");
    assert!(all[0]["node-name"].as_str().is_some(), "{all}");
    let nodes = qmp.ok("query-blockstats", json!({ "query-nodes": true }));
    assert!(nodes[0].get("device").is_none(), "{nodes}");
    assert_eq!(nodes[0]["node-name"], all[0]["node-name"]);
    assert_eq!(nodes[0]["stats"]["wr_operations"], 0);
    assert_eq!(nodes[0]["stats"]["wr_highest_offset"], 24 * 512 + 4096);
    let (class, _) = qmp.err("query-blockstats", json!({ "query-nodes": "yes" }));
    assert_eq!(class, "GenericError");
}

/// BLOCK_IO_ERROR's members in QEMU's order (qapi/block-core.json), `node-name` and
/// `nospace` present as they are for a `-drive` whose policy can stop the VM.
const BLOCK_IO_ERROR_MEMBERS: [&str; 7] = [
    "qom-path",
    "device",
    "node-name",
    "operation",
    "action",
    "nospace",
    "reason",
];

/// An object's member names, in the order they came on the wire.
fn keys(v: &Value) -> Vec<&str> {
    v.as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default()
}

/// `query-block`'s `io-status` of `device` (`None` when the drive keeps none).
fn io_status(qmp: &mut RawQmp, device: &str) -> Option<String> {
    let list = qmp.ok("query-block", json!({}));
    let info = list
        .as_array()
        .and_then(|l| l.iter().find(|b| b["device"] == device))
        .unwrap_or_else(|| panic!("no {device} in {list}"))
        .clone();
    info.get("io-status")
        .map(|s| s.as_str().unwrap_or_default().to_string())
}

/// A tmpfs of a few pages mounted for one test, unmounted on drop: a real file system
/// that runs out of space.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(at: &std::path::Path, size: &str) -> Self {
        let out = tests::output(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size}"))
                .arg("tmpfs")
                .arg(at),
        );
        assert!(
            out.status.success(),
            "mounting a tmpfs on {} (the test needs root, as the suite does): {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Self(at.to_path_buf())
    }

    /// Fills the file system with `name` until a write fails with ENOSPC.
    fn fill(&self, name: &str) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.join(name);
        let mut f = std::fs::File::create(&path).expect("create the filler");
        let chunk = [0x5au8; 4096];
        loop {
            match f.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A guest that writes one block at 512 KiB, reads it back, compares and says "read
/// back", then idles (so the VM still runs when the test looks at it afterwards): fails at
/// the write while the test has shrunk the disk under it.
fn write_past_a_shrink_guest() -> Guest {
    let mut g = Guest::new(1);
    let mut disk = Disk::setup(&mut g, 0, 0, 1, 0);
    let data = g.alloc(&guest::pattern(5, 128), BLOCK);
    let back = g.zeroed(BLOCK as usize, BLOCK);
    let w = disk.request(&mut g, 0, T_OUT, 1024, &[(data, BLOCK as u32)]);
    disk.submit(&mut g, 0, 0);
    g.print(0, "written\r\n");
    let r = disk.request(&mut g, 0, T_IN, 1024, &[(back, BLOCK as u32)]);
    disk.submit(&mut g, 0, 0);
    g.expect8(0, w, S_OK);
    g.expect8(0, r, S_OK);
    g.expect_same(0, data, back, BLOCK);
    g.print(0, "read back\r\n");
    g.idle(0);
    g
}

/// Waits for [`write_past_a_shrink_guest`] to have read its block back, and checks the
/// image holds it.
fn read_back(vm: &Splitvmm, img: &std::path::Path) {
    let text = wait_for_text(&serial(vm), Duration::from_secs(20), |t| {
        t.contains("read back") || t.contains("FAIL")
    });
    assert!(text.contains("read back"), "{text:?}");
    let bytes = std::fs::read(img).expect("image");
    assert_eq!(
        bytes[512 << 10..(512 << 10) + 4096],
        guest::pattern(5, 128)[..]
    );
}

#[test]
fn werror_stop_pauses_in_io_error_and_cont_retries_the_write() {
    if !kvm_or_skip("werror_stop_pauses_in_io_error_and_cont_retries_the_write") {
        return;
    }
    let dir = TempDir::new("vm-werror");
    let img = dir.join("disk0.raw");
    qemu_img_create("raw", &img, "1M");
    let drive = format!(
        "id=disk0,file={},format=raw,werror=stop,rerror=stop",
        img.display()
    );
    let (vm, mut qmp) = boot(dir, &write_past_a_shrink_guest(), 1, &[drive]);
    qmp.ok(
        "block_resize",
        json!({ "device": "disk0", "size": 256 << 10 }),
    );
    qmp.cont();
    let ev = qmp.event("BLOCK_IO_ERROR");
    assert_eq!(
        ev["data"],
        json!({
            "qom-path": "/machine/peripheral-anon/device[0]/virtio-backend",
            "device": "disk0", "node-name": "#block001", "operation": "write",
            "action": "stop", "nospace": false, "reason": "Input/output error",
        })
    );
    assert_eq!(keys(&ev["data"]), BLOCK_IO_ERROR_MEMBERS);
    qmp.event("STOP");
    assert_eq!(
        status_of(&mut qmp),
        json!({ "running": false, "status": "io-error" })
    );
    assert_eq!(io_status(&mut qmp, "disk0"), Some("failed".into()));
    assert!(
        !std::fs::read_to_string(serial(&vm))
            .unwrap_or_default()
            .contains("written"),
        "the guest saw its failed write complete"
    );
    qmp.ok(
        "block_resize",
        json!({ "device": "disk0", "size": 1 << 20 }),
    );
    qmp.cont();
    // cont set it back to ok before retrying the write, which succeeds now.
    read_back(&vm, &img);
    assert_eq!(io_status(&mut qmp, "disk0"), Some("ok".into()));
    assert_eq!(status(&mut qmp), "running");
}

#[test]
fn enospc_stops_the_vm_with_io_status_nospace_until_cont_retries() {
    if !kvm_or_skip("enospc_stops_the_vm_with_io_status_nospace_until_cont_retries") {
        return;
    }
    // The image lives on a full tmpfs: the guest's write into a hole of the sparse image
    // needs a page the file system does not have.
    let small = TempDir::new("vm-enospc-fs");
    let fs = SmallFs::mount(small.path(), "256k");
    let img = small.join("disk0.raw");
    qemu_img_create("raw", &img, "1M");
    let filler = fs.fill("filler");
    // The default werror is enospc, which stops the VM on ENOSPC (and keeps an io-status).
    let drive = format!("id=disk0,file={},format=raw", img.display());
    let (vm, mut qmp) = boot(
        TempDir::new("vm-enospc"),
        &write_past_a_shrink_guest(),
        1,
        &[drive],
    );
    assert_eq!(io_status(&mut qmp, "disk0"), Some("ok".into()));
    qmp.cont();
    let ev = qmp.event("BLOCK_IO_ERROR");
    assert_eq!(
        ev["data"],
        json!({
            "qom-path": "/machine/peripheral-anon/device[0]/virtio-backend",
            "device": "disk0", "node-name": "#block001", "operation": "write",
            "action": "stop", "nospace": true, "reason": "No space left on device",
        })
    );
    assert_eq!(keys(&ev["data"]), BLOCK_IO_ERROR_MEMBERS);
    qmp.event("STOP");
    assert_eq!(status(&mut qmp), "io-error");
    assert_eq!(io_status(&mut qmp, "disk0"), Some("nospace".into()));
    // Still nospace while stopped; `stop` does not reset it, `cont` does.
    qmp.ok("stop", json!({}));
    assert_eq!(io_status(&mut qmp, "disk0"), Some("nospace".into()));
    std::fs::remove_file(&filler).expect("free the space");
    qmp.cont();
    read_back(&vm, &img);
    assert_eq!(io_status(&mut qmp, "disk0"), Some("ok".into()));
    assert_eq!(status(&mut qmp), "running");
    drop(vm);
    drop(fs);
}

#[test]
fn werror_report_fails_the_write_and_rerror_ignore_hides_the_read_error() {
    if !kvm_or_skip("werror_report_fails_the_write_and_rerror_ignore_hides_the_read_error") {
        return;
    }
    let dir = TempDir::new("vm-report");
    let img = dir.join("disk0.raw");
    qemu_img_create("raw", &img, "1M");
    let drive = format!(
        "id=disk0,file={},format=raw,werror=report,rerror=ignore",
        img.display()
    );
    let mut g = Guest::new(1);
    let mut disk = Disk::setup(&mut g, 0, 0, 1, 0);
    let buf = g.zeroed(BLOCK as usize, BLOCK);
    let w = disk.request(&mut g, 0, T_OUT, 1024, &[(buf, BLOCK as u32)]);
    let r = disk.request(&mut g, 0, T_IN, 1024, &[(buf, BLOCK as u32)]);
    disk.submit(&mut g, 0, 0);
    g.expect8(0, w, S_IOERR);
    g.expect8(0, r, S_OK);
    g.pass(0);
    let (mut vm, mut qmp) = boot(dir, &g, 1, &[drive]);
    // Neither policy can stop the VM: the drive keeps no io-status (QEMU's
    // blk_iostatus_is_enabled).
    assert_eq!(io_status(&mut qmp, "disk0"), None);
    qmp.ok(
        "block_resize",
        json!({ "device": "disk0", "size": 256 << 10 }),
    );
    qmp.cont();
    let mut actions = Vec::new();
    for _ in 0..2 {
        let ev = qmp.event("BLOCK_IO_ERROR");
        // No nospace: the drive keeps no io-status.
        assert_eq!(
            keys(&ev["data"]),
            [
                "qom-path",
                "device",
                "node-name",
                "operation",
                "action",
                "reason"
            ],
            "{ev}"
        );
        actions.push((
            ev["data"]["operation"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            ev["data"]["action"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ));
    }
    actions.sort();
    assert_eq!(
        actions,
        [
            ("read".into(), "ignore".into()),
            ("write".into(), "report".into())
        ]
    );
    assert_eq!(
        guest_exit(&mut vm, &mut qmp),
        Some(0),
        "{}",
        vm.stderr_text()
    );
}

#[test]
fn query_cpus_fast_names_each_vcpu_thread_by_its_host_id() {
    if !kvm_or_skip("query_cpus_fast_names_each_vcpu_thread_by_its_host_id") {
        return;
    }
    let mut g = Guest::new(2);
    g.idle(0);
    g.idle(1);
    let (vm, mut qmp) = boot(TempDir::new("vm-cpus"), &g, 2, &[]);
    let cpus = qmp.ok("query-cpus-fast", json!({}));
    let vmm = tests::descendants(vm.pid())
        .into_iter()
        .find(|&p| tests::proc_name(p).as_deref() == Some("vmm-proc"))
        .expect("vmm-proc runs");
    assert_eq!(cpus.as_array().map(Vec::len), Some(2), "{cpus}");
    for (i, cpu) in cpus.as_array().into_iter().flatten().enumerate() {
        assert_eq!(cpu["cpu-index"], i);
        assert_eq!(cpu["target"], "x86_64");
        assert_eq!(
            cpu["props"],
            json!({ "socket-id": 0, "core-id": i, "thread-id": 0 })
        );
        let tid = cpu["thread-id"].as_i64().expect("thread-id");
        let comm = std::fs::read_to_string(format!("/proc/{vmm}/task/{tid}/comm"))
            .unwrap_or_else(|e| panic!("thread {tid} is not vmm-proc's: {e}"));
        assert_eq!(comm.trim_end(), format!("vcpu{i}"));
    }
}

#[test]
fn query_cpus_fast_is_empty_without_a_guest() {
    let vm = Splitvmm::start(&[]);
    assert_eq!(vm.raw_qmp().ok("query-cpus-fast", json!({})), json!([]));
}
