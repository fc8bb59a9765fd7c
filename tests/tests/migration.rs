//! Live migration between two splitvmm instances on this machine (real KVM, sandbox on):
//! the workload guest keeps running on the destination and ends with PASS; cancel,
//! a destination that dies and a corrupted stream leave the source running.

use std::time::Duration;

use guest::abi;
use serde_json::{Value, json};
use tests::{RawQmp, Splitvmm, TempDir, kvm_or_skip, wait_for_text};

/// One guest: its splitvmm, QMP connection and serial log.
struct Vm {
    vm: Splitvmm,
    qmp: RawQmp,
}

impl Vm {
    /// The workload guest with `append` on `cpus` vCPUs and `memory`, plus `extra` args.
    fn start(tag: &str, append: &str, memory: &str, cpus: u8, extra: &[&str]) -> Self {
        Self::start_in(TempDir::new(tag), append, memory, cpus, extra)
    }

    /// [`Vm::start`] in `dir`.
    fn start_in(dir: TempDir, append: &str, memory: &str, cpus: u8, extra: &[&str]) -> Self {
        Self::start_prefixed(dir, &[], append, memory, cpus, extra)
    }

    /// [`Vm::start_in`], splitvmm run by `prefix` (e.g. `ip netns exec NS`).
    fn start_prefixed(
        dir: TempDir,
        prefix: &[&str],
        append: &str,
        memory: &str,
        cpus: u8,
        extra: &[&str],
    ) -> Self {
        let serial = format!("file:{}", dir.join("serial.log").display());
        let cpus = cpus.to_string();
        let mut args = vec![
            "--kernel",
            "builtin:workload",
            "--append",
            append,
            "--memory",
            memory,
            "--cpus",
            &cpus,
            "--serial",
            &serial,
        ];
        args.extend_from_slice(extra);
        let vm = Splitvmm::start_prefixed(dir, prefix, &args);
        let mut qmp = vm.raw_qmp();
        qmp.ok(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "events", "state": true }] }),
        );
        Self { vm, qmp }
    }

    fn serial(&self) -> std::path::PathBuf {
        self.vm.dir.join("serial.log")
    }

    fn status(&mut self) -> String {
        self.qmp.ok("query-status", json!({}))["status"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits for `MIGRATION` with `status`, failing on a final status that is not it.
    fn migration_event(&mut self, status: &str) {
        loop {
            let ev = self.qmp.event("MIGRATION");
            let got = ev["data"]["status"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if got == status {
                return;
            }
            assert!(
                !matches!(got.as_str(), "completed" | "failed" | "cancelled"),
                "expected migration status {status}, got {got}: {}",
                self.vm.stderr_text()
            );
        }
    }

    /// Waits for the guest to power off; returns splitvmm's exit code and the last line.
    fn finish(mut self) -> (Option<i32>, String) {
        self.qmp.event("SHUTDOWN");
        let code = self.vm.wait_exit(Duration::from_secs(120)).code();
        let serial = std::fs::read_to_string(self.serial()).unwrap_or_default();
        let last = serial
            .lines()
            .map(str::trim_end)
            .rfind(|l| !l.is_empty())
            .unwrap_or("")
            .to_string();
        (code, last)
    }
}

/// A destination for a source started with `append`, `memory` and `cpus`, waiting on a
/// unix socket in its directory.
fn destination(append: &str, memory: &str, cpus: u8, extra: &[&str]) -> (Vm, String) {
    let dir = TempDir::new("mig-dst");
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut args = vec!["--incoming", uri.as_str()];
    args.extend_from_slice(extra);
    let mut dst = Vm::start_in(dir, append, memory, cpus, &args);
    assert_eq!(dst.status(), "inmigrate");
    (dst, uri)
}

fn query_migrate(qmp: &mut RawQmp) -> Value {
    qmp.ok("query-migrate", json!({}))
}

/// Migrates `src` to `uri` with unlimited bandwidth and waits for completion; returns
/// the final `query-migrate`.
fn migrate(src: &mut Vm, uri: &str) -> Value {
    migrate_with(src, json!({ "uri": uri }))
}

/// [`migrate`] with `migrate`'s arguments as given.
fn migrate_with(src: &mut Vm, args: Value) -> Value {
    src.qmp.ok(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 0, "downtime-limit": 300 }),
    );
    src.qmp.ok("migrate", args);
    src.migration_event("completed");
    query_migrate(&mut src.qmp)
}

/// Migrates a guest running `append` once it printed `settle`, with `migrate` given the
/// address as `uri` or (`channels`) as QEMU 9's `channels` list.
fn run_to_pass_after_migration(append: &str, cpus: u8, settle: &str, channels: bool) {
    let mut src = Vm::start("mig-src", append, "128M", cpus, &[]);
    let (dst, uri) = destination(append, "128M", cpus, &[]);
    wait_for_text(&src.serial(), Duration::from_secs(60), |t| {
        t.contains(settle)
    });
    // Let the program get going.
    std::thread::sleep(Duration::from_millis(500));
    let args = if channels {
        let path = uri.strip_prefix("unix:").unwrap_or_default();
        json!({ "channels": [{
            "channel-type": "main",
            "addr": { "transport": "socket", "type": "unix", "path": path },
        }] })
    } else {
        json!({ "uri": uri })
    };
    let info = migrate_with(&mut src, args);
    assert_eq!(info["status"], "completed", "{info}");
    for key in ["total-time", "downtime", "setup-time"] {
        assert!(info[key].is_u64(), "{key} missing: {info}");
    }
    let ram = &info["ram"];
    assert_eq!(ram["total"], 128u64 << 20, "{info}");
    assert!(
        ram["duplicate"].as_u64() > Some(0),
        "zero pages as such: {info}"
    );
    assert!(ram["normal"].as_u64() > Some(0), "{info}");
    assert!(ram["dirty-sync-count"].as_u64() >= Some(1), "{info}");
    assert_eq!(src.status(), "postmigrate");
    let (code, last) = dst.finish();
    assert!(
        last.starts_with(abi::PASS_PREFIX) && code == Some(0),
        "destination: exit {code:?}, last line {last:?}"
    );
}

#[test]
fn an_idle_guest_migrates_given_channels_and_finishes_on_the_destination() {
    if !kvm_or_skip("an_idle_guest_migrates_given_channels_and_finishes_on_the_destination") {
        return;
    }
    run_to_pass_after_migration("run=idle seconds=4", 1, "idle", true);
}

#[test]
fn a_dirtying_guest_migrates_and_its_pages_check_out_on_the_destination() {
    if !kvm_or_skip("a_dirtying_guest_migrates_and_its_pages_check_out_on_the_destination") {
        return;
    }
    // 64 MiB/s over 125 MiB: every page is rewritten (and its stamp checked) about every
    // 2 s, before and after the switch-over.
    run_to_pass_after_migration("run=dirty rate=64M seconds=8", 2, "free", false);
}

/// What the proxy between source and destination does to the stream.
#[derive(Debug, Clone, Copy, Default)]
struct Tamper {
    /// Flip a bit of the source's byte at this offset.
    flip_at: Option<u64>,
    /// Keep the destination's answers from the source.
    drop_answers: bool,
}

/// A TCP proxy on 127.0.0.1 in front of the destination's unix socket `uri`, doing
/// `tamper`; returns the `tcp:` URI the source migrates to.
fn proxy(uri: &str, tamper: Tamper) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let port = listener.local_addr().expect("addr").port();
    let path = uri.strip_prefix("unix:").expect("unix uri").to_string();
    std::thread::spawn(move || {
        let Ok((mut src, _)) = listener.accept() else {
            return;
        };
        let Ok(mut dst) = std::os::unix::net::UnixStream::connect(&path) else {
            return;
        };
        let (mut src_r, mut dst_w) = (
            src.try_clone().expect("clone"),
            dst.try_clone().expect("clone"),
        );
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            let mut at = 0u64;
            while let Ok(n) = src_r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Some(k) = tamper.flip_at
                    && (at..at + n as u64).contains(&k)
                {
                    buf[(k - at) as usize] ^= 0x10;
                }
                at += n as u64;
                if dst_w.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = dst_w.shutdown(std::net::Shutdown::Write);
        });
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = dst.read(&mut buf) {
            if n == 0 || (!tamper.drop_answers && src.write_all(&buf[..n]).is_err()) {
                break;
            }
        }
        if !tamper.drop_answers {
            let _ = src.shutdown(std::net::Shutdown::Write);
        } else {
            // Hold the source's side open: it waits for an answer that never comes.
            std::thread::sleep(Duration::from_secs(60));
        }
    });
    format!("tcp:127.0.0.1:{port}")
}

/// The guest on `src` is running and ends with PASS there.
fn source_goes_on_to_pass(mut src: Vm) {
    assert_eq!(src.status(), "running", "{}", src.vm.stderr_text());
    let (code, last) = src.finish();
    assert!(
        last.starts_with(abi::PASS_PREFIX) && code == Some(0),
        "source: exit {code:?}, last line {last:?}"
    );
}

/// The dirtying guest: any page the migration lost or mangled fails it.
const DIRTY: &str = "run=dirty rate=32M seconds=10";

#[test]
fn a_corrupted_stream_fails_on_both_sides_and_the_source_keeps_running() {
    if !kvm_or_skip("a_corrupted_stream_fails_on_both_sides_and_the_source_keeps_running") {
        return;
    }
    let mut src = Vm::start("mig-src", DIRTY, "128M", 1, &[]);
    let (mut dst, uri) = destination(DIRTY, "128M", 1, &[]);
    let via = proxy(
        &uri,
        Tamper {
            flip_at: Some(64 << 10),
            ..Tamper::default()
        },
    );
    src.qmp
        .ok("migrate-set-parameters", json!({ "max-bandwidth": 0 }));
    src.qmp.ok("migrate", json!({ "uri": via }));
    src.migration_event("failed");
    let info = query_migrate(&mut src.qmp);
    assert_eq!(info["status"], "failed", "{info}");
    let desc = info["error-desc"].as_str().unwrap_or_default();
    assert!(desc.contains("checksum"), "source error-desc: {info}");
    dst.migration_event("failed");
    let dinfo = query_migrate(&mut dst.qmp);
    assert!(
        dinfo["error-desc"]
            .as_str()
            .is_some_and(|d| d.contains("checksum mismatch (corrupted)")),
        "{dinfo}"
    );
    assert_eq!(dst.status(), "inmigrate");
    source_goes_on_to_pass(src);
}

#[test]
fn a_destination_that_dies_mid_stream_fails_the_migration_not_the_guest() {
    if !kvm_or_skip("a_destination_that_dies_mid_stream_fails_the_migration_not_the_guest") {
        return;
    }
    let mut src = Vm::start("mig-src", DIRTY, "128M", 1, &[]);
    let (mut dst, uri) = destination(DIRTY, "128M", 1, &[]);
    // Slow enough to still be sending when the destination goes.
    src.qmp.ok(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 4 << 20 }),
    );
    src.qmp.ok("migrate", json!({ "uri": uri }));
    src.migration_event("active");
    std::thread::sleep(Duration::from_millis(500));
    dst.vm.child.kill().expect("kill the destination");
    src.migration_event("failed");
    let info = query_migrate(&mut src.qmp);
    assert!(info["error-desc"].is_string(), "{info}");
    source_goes_on_to_pass(src);
}

/// Starts a migration through a proxy (so a phase can be held), cancels it once `phase`
/// is reached, and checks the guest goes on on the source.
fn cancel_in(phase: &str) {
    let mut src = Vm::start("mig-src", DIRTY, "128M", 1, &[]);
    let (mut dst, uri) = destination(DIRTY, "128M", 1, &[]);
    let via = proxy(
        &uri,
        Tamper {
            drop_answers: phase == "device",
            ..Tamper::default()
        },
    );
    let bandwidth = if phase == "device" { 0 } else { 4 << 20 };
    src.qmp.ok(
        "migrate-set-parameters",
        json!({ "max-bandwidth": bandwidth }),
    );
    src.qmp.ok("migrate", json!({ "uri": via }));
    if phase != "setup" {
        src.migration_event(phase);
    }
    if phase == "device" {
        // Held until the (never forwarded) acknowledgement: the guest is stopped.
        let t0 = std::time::Instant::now();
        while src.status() != "finish-migrate" {
            assert!(t0.elapsed() < Duration::from_secs(30), "no switch-over");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The destination loaded and would run: take it away first.
        dst.vm.child.kill().expect("kill the destination");
    }
    src.qmp.ok("migrate_cancel", json!({}));
    src.migration_event("cancelled");
    let info = query_migrate(&mut src.qmp);
    assert_eq!(info, json!({ "status": "cancelled" }));
    // A second cancel is fine, as in QEMU.
    src.qmp.ok("migrate_cancel", json!({}));
    if phase != "device" {
        dst.migration_event("failed");
    }
    source_goes_on_to_pass(src);
}

#[test]
fn cancel_right_after_migrate_leaves_the_guest_running() {
    if !kvm_or_skip("cancel_right_after_migrate_leaves_the_guest_running") {
        return;
    }
    cancel_in("setup");
}

#[test]
fn cancel_while_active_leaves_the_guest_running() {
    if !kvm_or_skip("cancel_while_active_leaves_the_guest_running") {
        return;
    }
    cancel_in("active");
}

#[test]
fn cancel_during_the_switch_over_resumes_the_guest() {
    if !kvm_or_skip("cancel_during_the_switch_over_resumes_the_guest") {
        return;
    }
    cancel_in("device");
}

#[test]
fn incoming_defer_then_migrate_incoming_and_paused_until_cont() {
    if !kvm_or_skip("incoming_defer_then_migrate_incoming_and_paused_until_cont") {
        return;
    }
    let append = "run=dirty rate=16M seconds=5";
    let mut src = Vm::start("mig-src", append, "64M", 1, &[]);
    let mut dst = Vm::start(
        "mig-dst",
        append,
        "64M",
        1,
        &["--incoming", "defer", "--paused"],
    );
    assert_eq!(dst.status(), "inmigrate");
    assert_eq!(query_migrate(&mut dst.qmp), json!({}));
    let sock = dst.vm.dir.join("mig.sock");
    let uri = format!("unix:{}", sock.display());

    // QEMU's errors, in QEMU's words.
    assert_eq!(
        src.qmp.err("migrate-incoming", json!({ "uri": uri })).1,
        "'-incoming' was not specified on the command line"
    );
    assert_eq!(
        dst.qmp
            .err("migrate", json!({ "uri": "tcp:127.0.0.1:1" }))
            .1,
        "Guest is waiting for an incoming migration"
    );
    assert_eq!(
        src.qmp.err("migrate", json!({ "uri": "exec:cat" })).1,
        "unknown migration protocol: exec:cat"
    );
    assert_eq!(
        src.qmp.err("migrate", json!({})).1,
        "need either 'uri' or 'channels' argument"
    );
    assert_eq!(
        src.qmp
            .err(
                "migrate-set-parameters",
                json!({ "downtime-limit": 2_000_001 })
            )
            .1,
        "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"
    );
    assert_eq!(
        src.qmp.ok("query-migrate-parameters", json!({})),
        json!({ "downtime-limit": 300, "max-bandwidth": 134217728, "avail-switchover-bandwidth": 0 })
    );
    src.qmp.ok("migrate_set_speed", json!({ "value": -5 }));
    src.qmp.ok("migrate_set_downtime", json!({ "value": 0.5 }));
    assert_eq!(
        src.qmp.ok("query-migrate-parameters", json!({})),
        json!({ "downtime-limit": 500, "max-bandwidth": 0, "avail-switchover-bandwidth": 0 })
    );
    assert_eq!(
        src.qmp.ok("query-migrate-capabilities", json!({})),
        json!([{ "capability": "events", "state": true }])
    );

    dst.qmp.ok("migrate-incoming", json!({ "uri": uri }));
    assert_eq!(
        dst.qmp.err("migrate-incoming", json!({ "uri": uri })).1,
        "The incoming migration has already been started"
    );
    src.qmp.ok("migrate", json!({ "uri": uri }));
    assert_eq!(
        src.qmp.err("migrate", json!({ "uri": uri })).1,
        "There's a migration process in progress"
    );
    src.qmp.event("STOP");
    src.migration_event("completed");
    assert_eq!(src.status(), "postmigrate");
    assert_eq!(
        src.qmp.err("migrate", json!({ "uri": uri })).1,
        "Can't migrate the vm that was paused due to previous migration"
    );
    dst.migration_event("completed");
    assert_eq!(
        query_migrate(&mut dst.qmp),
        json!({ "status": "completed" })
    );
    // --paused: loaded, not running, until cont.
    assert_eq!(dst.status(), "paused");
    dst.qmp.cont();
    let (code, last) = dst.finish();
    assert!(
        last.starts_with(abi::PASS_PREFIX) && code == Some(0),
        "destination: exit {code:?}, last line {last:?}"
    );
}

/// Whether `qemu-io` may write `img` (a `fmt` image) now (it may not while a splitvmm
/// holds it).
fn image_writable(img: &std::path::Path, fmt: &str) -> (bool, String) {
    let out = tests::output(
        std::process::Command::new("qemu-io")
            .args(["-f", fmt, "-c", "write 0 512"])
            .arg(img),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && !text.contains("lock"), text)
}

#[test]
fn a_guest_writing_its_disk_goes_on_on_the_destination_which_takes_the_image_locks() {
    if !kvm_or_skip(
        "a_guest_writing_its_disk_goes_on_on_the_destination_which_takes_the_image_locks",
    ) {
        return;
    }
    let disk_dir = TempDir::new("mig-disk");
    let img = disk_dir.join("disk0.qcow2");
    tests::qemu_img_create("qcow2", &img, "32M");
    let drive = format!("id=disk0,file={},format=qcow2", img.display());
    let append = "run=write-verify-loop seed=11 seconds=8";
    let mut src = Vm::start("mig-src", append, "128M", 2, &["--drive", &drive]);
    // The source holds the image: another writer is refused...
    let (writable, text) = image_writable(&img, "qcow2");
    assert!(
        !writable && text.contains("Failed to get \"write\" lock"),
        "{text}"
    );
    // ...but the destination opens it without locks, as QEMU's incoming side does.
    let (dst, uri) = destination(append, "128M", 2, &["--drive", &drive]);
    wait_for_text(&src.serial(), Duration::from_secs(60), |t| {
        t.contains("write-verify-loop: 1.")
    });
    let info = migrate(&mut src, &uri);
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(src.status(), "postmigrate");
    // Handed over: the destination holds the image now.
    let (writable, text) = image_writable(&img, "qcow2");
    assert!(
        !writable && text.contains("Failed to get \"write\" lock"),
        "{text}"
    );
    // So the source cannot run its guest again (`cont` would take the image back).
    let (_, desc) = src.qmp.err("cont", json!({}));
    assert!(desc.contains("Failed to get \"write\" lock"), "{desc}");
    assert_eq!(src.status(), "postmigrate");
    let (code, last) = dst.finish();
    assert!(
        last.starts_with(abi::PASS_PREFIX) && code == Some(0),
        "destination: exit {code:?}, last line {last:?}"
    );
    // The source does not take the image back by itself.
    assert_eq!(src.status(), "postmigrate");
    let (writable, text) = image_writable(&img, "qcow2");
    assert!(writable, "nobody should hold the image now: {text}");
    tests::run(
        std::process::Command::new("qemu-img")
            .args(["check", "-q"])
            .arg(&img),
    );
    // With the destination gone, `cont` takes the image back and runs the source again
    // (RESUME). Its guest then finds the disk ahead of its memory, which is the operator's
    // doing: nothing more is checked.
    src.qmp.cont();
}

#[test]
fn a_reset_during_pre_copy_is_carried_and_the_bandwidth_can_change_midway() {
    if !kvm_or_skip("a_reset_during_pre_copy_is_carried_and_the_bandwidth_can_change_midway") {
        return;
    }
    let append = "run=dirty rate=16M seconds=6";
    let mut src = Vm::start("mig-src", append, "128M", 1, &[]);
    let (dst, uri) = destination(append, "128M", 1, &[]);
    wait_for_text(&src.serial(), Duration::from_secs(60), |t| {
        t.contains("free")
    });
    // Slow: still in the first pass when the guest resets (the loader rewrites RAM behind
    // KVM's dirty log).
    src.qmp.ok(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 4 << 20 }),
    );
    src.qmp.ok("migrate", json!({ "uri": uri }));
    src.migration_event("active");
    src.qmp.ok("system_reset", json!({}));
    src.qmp.event("RESET");
    std::thread::sleep(Duration::from_millis(300));
    let info = query_migrate(&mut src.qmp);
    assert_eq!(info["status"], "active", "{info}");
    src.qmp
        .ok("migrate-set-parameters", json!({ "max-bandwidth": 0 }));
    src.migration_event("completed");
    let (code, last) = dst.finish();
    assert!(
        last.starts_with(abi::PASS_PREFIX) && code == Some(0),
        "destination: exit {code:?}, last line {last:?}"
    );
}

#[test]
fn a_destination_listening_on_tcp_takes_the_guest() {
    if !kvm_or_skip("a_destination_listening_on_tcp_takes_the_guest") {
        return;
    }
    let uri = format!("tcp:127.0.0.1:{}", free_port("127.0.0.1"));
    let append = "run=dirty rate=16M seconds=5";
    let mut src = Vm::start("mig-src", append, "64M", 1, &[]);
    let mut dst = Vm::start("mig-dst", append, "64M", 1, &["--incoming", &uri]);
    assert_eq!(dst.status(), "inmigrate");
    let info = migrate(&mut src, &uri);
    assert_eq!(info["status"], "completed", "{info}");
    dst.migration_event("completed");
    dst.qmp.event("RESUME");
    let (code, last) = dst.finish();
    assert!(
        last.starts_with(abi::PASS_PREFIX) && code == Some(0),
        "destination: exit {code:?}, last line {last:?}"
    );
}

/// A port nobody listens on now (bound by us on `ip`, then released).
fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Reads `qmp`'s events until `name`, failing on a `BLOCK_JOB_ERROR` or a
/// `BLOCK_JOB_COMPLETED` that is not `name`; returns it.
fn job_event(qmp: &mut RawQmp, name: &str) -> Value {
    loop {
        let ev = qmp.next_event();
        let got = ev["event"].as_str().unwrap_or_default();
        if got == name {
            return ev;
        }
        assert!(
            got != "BLOCK_JOB_ERROR" && got != "BLOCK_JOB_COMPLETED",
            "waiting for {name}: {ev}"
        );
    }
}

/// Where the two sides of a storage migration listen: the destination's migration
/// socket and NBD server, as the source reaches them.
struct Addrs {
    /// `migrate`'s `uri` (`tcp:IP:PORT`), also the destination's `--incoming`.
    migration: String,
    /// The IP the destination's NBD server binds and the source's mirror connects to.
    nbd_ip: String,
    nbd_port: u16,
}

/// The libvirt flow for non-shared disks: the source (qcow2, the write-verify-loop guest)
/// mirrors its disk to an NBD export of the destination's empty raw image, migrates on
/// READY, cancels the mirror once migrated; the destination then stops its NBD server and
/// resumes the guest, which verifies every block it wrote. `prefixes` run the source's
/// and the destination's splitvmm (e.g. in a network namespace each). With
/// `script_transcript`, scripts/storage-migration-example.py runs the QMP part and writes
/// its transcript there.
fn storage_migration(
    tag: &str,
    prefixes: [&[&str]; 2],
    addrs: &Addrs,
    script_transcript: Option<&std::path::Path>,
) {
    let [src_prefix, dst_prefix] = prefixes;
    let src_dir = TempDir::new(&format!("{tag}-src"));
    let dst_dir = TempDir::new(&format!("{tag}-dst"));
    // The images outlive both splitvmm directories, for the comparison.
    let disks = TempDir::new(&format!("{tag}-disks"));
    let src_img = disks.join("src.qcow2");
    let dst_img = disks.join("dst.raw");
    tests::qemu_img_create("qcow2", &src_img, "32M");
    tests::qemu_img_create("raw", &dst_img, "32M");
    let append = "run=write-verify-loop seed=23 seconds=10";
    let src_drive = format!("id=disk0,file={},format=qcow2", src_img.display());
    let dst_drive = format!("id=disk0,file={},format=raw", dst_img.display());
    let mut src = Vm::start_prefixed(
        src_dir,
        src_prefix,
        append,
        "128M",
        2,
        &["--drive", &src_drive],
    );
    let mut dst = Vm::start_prefixed(
        dst_dir,
        dst_prefix,
        append,
        "128M",
        2,
        &[
            "--drive",
            &dst_drive,
            "--incoming",
            &addrs.migration,
            "--paused",
        ],
    );
    assert_eq!(dst.status(), "inmigrate");
    wait_for_text(&src.serial(), Duration::from_secs(60), |t| {
        t.contains("write-verify-loop: 1.")
    });
    if let Some(transcript) = script_transcript {
        run_example_script(&src, &dst, addrs, transcript);
    } else {
        qmp_flow(&mut src, &mut dst, addrs);
    }
    assert_eq!(dst.status(), "paused");
    // Both guests stopped, the mirror done: the images match. `-U`: the destination
    // holds its image's locks since the switch-over.
    let out = tests::output(
        std::process::Command::new("qemu-img")
            .args(["compare", "-U", "-f", "qcow2", "-F", "raw"])
            .arg(&src_img)
            .arg(&dst_img),
    );
    assert!(
        out.status.success(),
        "images differ: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Its own image, which the source never held, is the destination's since the
    // switch-over.
    let (writable, text) = image_writable(&dst_img, "raw");
    assert!(
        !writable && text.contains("Failed to get \"write\" lock"),
        "{text}"
    );
    dst.qmp.cont();
    let (code, last) = dst.finish();
    assert!(
        last.starts_with(abi::PASS_PREFIX) && code == Some(0),
        "destination: exit {code:?}, last line {last:?}"
    );
}

/// The libvirt flow's QMP part, from the destination's NBD server to its
/// `nbd-server-stop`; leaves the destination paused.
fn qmp_flow(src: &mut Vm, dst: &mut Vm, addrs: &Addrs) {
    dst.qmp.ok(
        "nbd-server-start",
        json!({ "addr": { "type": "inet",
                          "data": { "host": addrs.nbd_ip, "port": addrs.nbd_port.to_string() } } }),
    );
    dst.qmp.ok(
        "nbd-server-add",
        json!({ "device": "disk0", "writable": true }),
    );
    let target = format!("nbd://{}:{}/disk0", addrs.nbd_ip, addrs.nbd_port);
    // write-blocking (libvirt's VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES): this guest
    // dirties its disk faster than a background copy drains it, which then never gets
    // READY.
    src.qmp.ok(
        "drive-mirror",
        json!({ "device": "disk0", "target": target, "sync": "full", "mode": "existing",
                "format": "raw", "copy-mode": "write-blocking" }),
    );
    job_event(&mut src.qmp, "BLOCK_JOB_READY");
    src.qmp.ok(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 0, "downtime-limit": 300 }),
    );
    src.qmp.ok("migrate", json!({ "uri": addrs.migration }));
    src.migration_event("completed");
    assert_eq!(src.status(), "postmigrate");
    src.qmp.ok("block-job-cancel", json!({ "device": "disk0" }));
    let done = job_event(&mut src.qmp, "BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    // A cancelled READY mirror is in sync: all of it was copied.
    assert_eq!(done["data"]["offset"], done["data"]["len"], "{done}");
    dst.migration_event("completed");
    dst.qmp.ok("nbd-server-stop", json!({}));
}

/// The same with scripts/storage-migration-example.py, which writes its QMP transcript to
/// `transcript`.
fn run_example_script(src: &Vm, dst: &Vm, addrs: &Addrs, transcript: &std::path::Path) {
    let out = tests::output(
        std::process::Command::new("python3")
            .arg(tests::repo_root().join("scripts/storage-migration-example.py"))
            .arg(&src.vm.qmp)
            .arg(&dst.vm.qmp)
            .args(["--migrate", &addrs.migration])
            .arg("--nbd")
            .arg(format!("{}:{}", addrs.nbd_ip, addrs.nbd_port))
            .arg("--no-cont")
            .arg("--transcript")
            .arg(transcript),
    );
    assert!(
        out.status.success(),
        "storage-migration-example.py: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The order the recipe promises: the destination's NBD server goes only after the
    // source's mirror completed, itself after the migration.
    let text = std::fs::read_to_string(transcript).expect("the transcript");
    let at = |needle: &str| {
        text.find(needle)
            .unwrap_or_else(|| panic!("no {needle} in the transcript:\n{text}"))
    };
    let migrated = at(r#""event": "MIGRATION", "data": {"status": "completed"}"#);
    let mirrored = at(r#""event": "BLOCK_JOB_COMPLETED""#);
    let stopped = at(r#"dst-> {"execute": "nbd-server-stop"}"#);
    assert!(migrated < mirrored && mirrored < stopped, "{text}");
}

#[test]
fn a_disk_that_is_not_shared_is_mirrored_over_nbd_and_the_guest_goes_on() {
    if !kvm_or_skip("a_disk_that_is_not_shared_is_mirrored_over_nbd_and_the_guest_goes_on") {
        return;
    }
    let addrs = Addrs {
        migration: format!("tcp:127.0.0.1:{}", free_port("127.0.0.1")),
        nbd_ip: "127.0.0.1".into(),
        nbd_port: free_port("127.0.0.1"),
    };
    storage_migration("smig", [&[], &[]], &addrs, None);
}

/// Two network namespaces ("hosts") joined by a veth pair, each end up with an address;
/// dropped (with the pair) even when the test fails.
struct Hosts {
    names: [String; 2],
    veth: String,
    ips: [String; 2],
}

impl Hosts {
    /// Creates them, or says which `ip` command failed.
    fn create() -> Result<Self, String> {
        let pid = std::process::id();
        let net = format!("10.232.{}", pid % 250);
        let hosts = Self {
            names: [format!("smigA{pid}"), format!("smigB{pid}")],
            veth: format!("smvA{pid}"),
            ips: [format!("{net}.1"), format!("{net}.2")],
        };
        let [a, b] = &hosts.names;
        let peer = format!("smvB{pid}");
        let ends = [(a, &hosts.veth, &hosts.ips[0]), (b, &peer, &hosts.ips[1])];
        let mut steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), a.clone()],
            vec!["netns".into(), "add".into(), b.clone()],
            [
                "link",
                "add",
                &hosts.veth,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
            ]
            .map(String::from)
            .to_vec(),
        ];
        for (ns, dev, ip) in ends {
            let cidr = format!("{ip}/24");
            steps.push(["link", "set", dev, "netns", ns].map(String::from).to_vec());
            steps.push(
                ["-n", ns, "addr", "add", &cidr, "dev", dev]
                    .map(String::from)
                    .to_vec(),
            );
            steps.push(
                ["-n", ns, "link", "set", dev, "up"]
                    .map(String::from)
                    .to_vec(),
            );
            steps.push(
                ["-n", ns, "link", "set", "lo", "up"]
                    .map(String::from)
                    .to_vec(),
            );
        }
        for step in steps {
            let out = std::process::Command::new("ip")
                .args(&step)
                .output()
                .map_err(|e| format!("ip {}: {e}", step.join(" ")))?;
            if !out.status.success() {
                return Err(format!(
                    "ip {}: {}",
                    step.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Ok(hosts)
    }

    /// The command prefix that runs a program on host `i`.
    fn exec(&self, i: usize) -> [&str; 4] {
        ["ip", "netns", "exec", &self.names[i]]
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end in it, and with it the pair; the pair
        // is deleted by name too in case creation stopped before moving it.
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.veth])
            .stderr(std::process::Stdio::null())
            .status();
        for ns in &self.names {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

#[test]
fn a_disk_that_is_not_shared_migrates_between_two_network_namespaces() {
    let test = "a_disk_that_is_not_shared_migrates_between_two_network_namespaces";
    if !kvm_or_skip(test) {
        return;
    }
    let hosts = match Hosts::create() {
        Ok(h) => h,
        Err(why) => {
            tests::present_or_skip(test, &format!("ip netns ({why})"), false);
            return;
        }
    };
    // The source on host A reaches the destination on host B over the veth pair only.
    let addrs = Addrs {
        migration: format!("tcp:{}:4444", hosts.ips[1]),
        nbd_ip: hosts.ips[1].clone(),
        nbd_port: 10809,
    };
    // The QMP part by the documented example script, whose transcript docs/migration.md
    // shows.
    let out = TempDir::new("smig-transcript");
    let transcript = out.join("transcript.jsonl");
    storage_migration(
        "smig-netns",
        [&hosts.exec(0), &hosts.exec(1)],
        &addrs,
        Some(&transcript),
    );
    if let Some(keep) = std::env::var_os("SMIG_TRANSCRIPT") {
        std::fs::copy(&transcript, keep).expect("copy the transcript");
    }
}

/// The source is given a socket connected to the destination's `--incoming unix:` with
/// `getfd` (descriptor sent with the command itself, and qemu.qmp's way: a space carrying
/// it, then the command), and `migrate uri=fd:NAME` takes it; the named fd is consumed.
#[test]
fn migrate_to_a_descriptor_named_with_getfd() {
    if !kvm_or_skip("migrate_to_a_descriptor_named_with_getfd") {
        return;
    }
    use std::os::fd::AsFd;
    let append = "run=dirty rate=16M seconds=5";
    let mut src = Vm::start("mig-src", append, "64M", 1, &[]);
    let (mut dst, uri) = destination(append, "64M", 1, &[]);
    let path = uri.strip_prefix("unix:").unwrap_or_default();

    // A spare descriptor named, renamed over, and closed.
    let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    src.qmp.send_with_fds(b" ", &[a.as_fd()]);
    assert_eq!(src.qmp.ok("getfd", json!({"fdname": "spare"})), json!({}));
    assert_eq!(src.qmp.ok("closefd", json!({"fdname": "spare"})), json!({}));
    assert_eq!(
        src.qmp.err("closefd", json!({"fdname": "spare"})).1,
        "File descriptor named 'spare' not found"
    );

    let conn = std::os::unix::net::UnixStream::connect(path).expect("connect destination");
    let getfd = json!({"execute": "getfd", "arguments": {"fdname": "mig"}}).to_string();
    src.qmp.send_with_fds(getfd.as_bytes(), &[conn.as_fd()]);
    assert_eq!(src.qmp.reply()["return"], json!({}));
    drop(conn);
    let info = migrate(&mut src, "fd:mig");
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(src.status(), "postmigrate");
    // `migrate` took it.
    assert_eq!(
        src.qmp.err("closefd", json!({"fdname": "mig"})).1,
        "File descriptor named 'mig' not found"
    );
    dst.migration_event("completed");
    let (code, last) = dst.finish();
    assert!(
        last.starts_with(abi::PASS_PREFIX) && code == Some(0),
        "destination: exit {code:?}, last line {last:?}"
    );
}

/// QEMU's errors for `getfd`, `closefd` and `migrate fd:` without a good descriptor; the
/// guest keeps running.
#[test]
fn getfd_closefd_and_migrate_fd_errors() {
    if !kvm_or_skip("getfd_closefd_and_migrate_fd_errors") {
        return;
    }
    use std::os::fd::AsFd;
    let mut src = Vm::start("mig-src", "run=dirty rate=16M seconds=3", "64M", 1, &[]);
    let q = &mut src.qmp;
    assert_eq!(
        q.err("getfd", json!({"fdname": "x"})),
        (
            "GenericError".into(),
            "No file descriptor supplied via SCM_RIGHTS".into()
        )
    );
    let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    q.send_with_fds(b" ", &[a.as_fd()]);
    assert_eq!(
        q.err("getfd", json!({"fdname": "1x"})).1,
        "Parameter 'fdname' expects a name not starting with a digit"
    );
    // The descriptor went with that command; none is left for the next.
    assert_eq!(
        q.err("getfd", json!({"fdname": "x"})).1,
        "No file descriptor supplied via SCM_RIGHTS"
    );
    // Too many at once are all refused.
    let many: Vec<_> = (0..17).map(|_| a.as_fd()).collect();
    q.send_with_fds(b" ", &many);
    assert_eq!(
        q.err("getfd", json!({"fdname": "x"})).1,
        "No file descriptor supplied via SCM_RIGHTS"
    );
    assert_eq!(
        q.err("closefd", json!({"fdname": "x"})),
        (
            "GenericError".into(),
            "File descriptor named 'x' not found".into()
        )
    );
    assert_eq!(
        q.err("migrate", json!({"uri": "fd:nope"})).1,
        "File descriptor named 'nope' has not been found"
    );
    assert_eq!(src.status(), "running");
    let (code, last) = src.finish();
    assert!(
        last.starts_with(abi::PASS_PREFIX) && code == Some(0),
        "source: exit {code:?}, last line {last:?}"
    );
}

/// Both ends by descriptor: the two ends of one socketpair, named with `getfd` on each
/// side, `migrate-incoming uri=fd:in` on the destination and `migrate uri=fd:out` on the
/// source.
#[test]
fn a_socketpair_given_to_both_sides_carries_the_migration() {
    if !kvm_or_skip("a_socketpair_given_to_both_sides_carries_the_migration") {
        return;
    }
    use std::os::fd::AsFd;
    let append = "run=dirty rate=16M seconds=5";
    let mut src = Vm::start("mig-src", append, "64M", 1, &[]);
    let mut dst = Vm::start("mig-dst", append, "64M", 1, &["--incoming", "defer"]);
    let (out, inc) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    dst.qmp.send_with_fds(b" ", &[inc.as_fd()]);
    dst.qmp.ok("getfd", json!({"fdname": "in"}));
    src.qmp.send_with_fds(b" ", &[out.as_fd()]);
    src.qmp.ok("getfd", json!({"fdname": "out"}));
    drop((out, inc));
    dst.qmp.ok("migrate-incoming", json!({"uri": "fd:in"}));
    let info = migrate(&mut src, "fd:out");
    assert_eq!(info["status"], "completed", "{info}");
    dst.migration_event("completed");
    let (code, last) = dst.finish();
    assert!(
        last.starts_with(abi::PASS_PREFIX) && code == Some(0),
        "destination: exit {code:?}, last line {last:?}"
    );
}
