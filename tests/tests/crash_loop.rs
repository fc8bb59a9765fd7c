//! Crash loop: block-proc is SIGKILLed at a random moment while an NBD client writes hard
//! to a qcow2 image, 50 rounds. After each, `qemu-img check` finds no corruption (leaked
//! clusters are allowed: exit status 0 or 3) and every write the server acknowledged is
//! in the image. The seed is printed; `SPLITVMM_CRASH_SEED=N` replays a run.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use block_proc::device::BlockDevice;
use block_proc::nbd::NbdClient;
use serde_json::json;
use tests::{Splitvmm, TempDir, alive, descendants, proc_name, run};

const ROUNDS: u64 = 50;
const CHUNK: usize = 64 << 10;
const SLOTS: u64 = 256; // a 16 MiB image of 64 KiB slots

/// xorshift64*: enough randomness to place the kill, replayable from the seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The bytes a write of `generation` puts in `slot`: recognisable per slot and generation.
fn pattern(slot: u64, generation: u64) -> Vec<u8> {
    let mut v = vec![0u8; CHUNK];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (slot.wrapping_mul(31) ^ generation.wrapping_mul(7) ^ (i as u64 / 512)) as u8 | 1;
    }
    v
}

#[test]
fn killing_block_proc_during_nbd_writes_loses_no_acknowledged_write_and_corrupts_nothing() {
    let seed = std::env::var("SPLITVMM_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    println!("crash loop seed: {seed} (replay with SPLITVMM_CRASH_SEED={seed})");
    let mut rng = Rng(seed);
    let dir = TempDir::new("crash");
    let image = dir.join("disk.qcow2").display().to_string();
    run(Command::new("qemu-img").args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        &image,
        "16M",
    ]));
    // What each slot held when last verified (absent: never written, zeroes).
    let mut expected: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    for round in 0..ROUNDS {
        let sock = dir.join("nbd.sock");
        let _ = std::fs::remove_file(&sock);
        let vm = Splitvmm::start_in(
            TempDir::new("crash-vm"),
            &[
                "--image-dir",
                dir.path().to_str().expect("dir"),
                "--drive",
                &format!("id=d,file={image},format=qcow2"),
            ],
        );
        let mut q = vm.raw_qmp();
        q.ok(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": sock}}}),
        );
        q.ok("nbd-server-add", json!({"device": "d", "writable": true}));
        let block = descendants(vm.pid())
            .into_iter()
            .find(|p| proc_name(*p).as_deref() == Some("block-proc"))
            .expect("block-proc");
        let kill_after = Duration::from_micros(rng.next() % 150_000);
        // Writer w owns the slots with slot % 8 == w and writes them one at a time (it waits
        // for each acknowledgement), so per slot there is at most one write in flight.
        let plan: Vec<Vec<(u64, u64)>> = (0..8u64)
            .map(|w| {
                (0..16u64)
                    .map(|i| {
                        (
                            (rng.next() % (SLOTS / 8)) * 8 + w,
                            (round + 1) * 1000 + w * 16 + i,
                        )
                    })
                    .collect()
            })
            .collect();
        let log: Arc<Mutex<Vec<(u64, u64, bool)>>> = Arc::default(); // (slot, gen, acked)
        rt.block_on(async {
            let stream = tokio::net::UnixStream::connect(&sock)
                .await
                .expect("connect");
            let client = Arc::new(NbdClient::connect(stream, "d").await.expect("handshake"));
            let mut tasks = Vec::new();
            for writes in plan {
                let (client, log) = (client.clone(), log.clone());
                tasks.push(tokio::spawn(async move {
                    for (slot, generation) in writes {
                        log.lock().expect("lock").push((slot, generation, false));
                        if client
                            .write(&pattern(slot, generation), slot * CHUNK as u64, false)
                            .await
                            .is_err()
                        {
                            return;
                        }
                        log.lock().expect("lock").push((slot, generation, true));
                    }
                }));
            }
            tokio::time::sleep(kill_after).await;
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(block),
                nix::sys::signal::Signal::SIGKILL,
            )
            .expect("kill");
            for t in tasks {
                let _ = t.await;
            }
        });
        drop(q);
        drop(vm); // kills whatever is left of this splitvmm
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while alive(block) {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: block-proc survived SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let check = qemu_img_check(&image);
        let code = check.status.code();
        assert!(
            code == Some(0) || code == Some(3),
            "round {round} (seed {seed}): qemu-img check exited {code:?}:\n{}{}\nprocesses holding the image: {:?}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr),
            holders(&image)
        );
        let raw = dir.join("now.raw");
        run(Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw", &image])
            .arg(&raw));
        let bytes = std::fs::read(&raw).expect("read converted image");
        // Per slot: the last acknowledged write of this round, and the one write that may
        // have been in flight (acknowledged writes never are: each writer waits for its
        // acknowledgement before the next write to any of its slots).
        let mut last_acked: BTreeMap<u64, u64> = BTreeMap::new();
        let mut in_flight: BTreeMap<u64, u64> = BTreeMap::new();
        for (slot, generation, acked) in log.lock().expect("lock").iter().copied() {
            if acked {
                last_acked.insert(slot, generation);
                in_flight.remove(&slot);
            } else {
                in_flight.insert(slot, generation);
            }
        }
        for slot in 0..SLOTS {
            let at = (slot as usize) * CHUNK;
            let got = &bytes[at..at + CHUNK];
            // The acknowledged content: this round's last acknowledged write, else what the
            // slot held at the last check.
            let acked = match last_acked.get(&slot) {
                Some(g) => pattern(slot, *g),
                None => expected
                    .get(&slot)
                    .cloned()
                    .unwrap_or_else(|| vec![0; CHUNK]),
            };
            // An unacknowledged write may have landed in part: sector by sector, the slot
            // holds either the acknowledged content or the write that was in flight.
            let pending = in_flight.get(&slot).map(|g| pattern(slot, *g));
            for (i, sector) in got.chunks(512).enumerate() {
                let r = i * 512..(i + 1) * 512;
                let ok = sector == &acked[r.clone()]
                    || pending.as_ref().is_some_and(|p| sector == &p[r]);
                assert!(
                    ok,
                    "round {round} (seed {seed}): slot {slot} sector {i} lost its acknowledged data (last acknowledged: {:?}, in flight: {:?})",
                    last_acked.get(&slot),
                    in_flight.get(&slot)
                );
            }
            expected.insert(slot, got.to_vec());
        }
    }
}

/// `qemu-img check`, retried for up to 2 s while another process still holds the image's
/// lock (a process that was killed may take a moment to be gone entirely). Any other
/// outcome is returned at once.
fn qemu_img_check(image: &str) -> std::process::Output {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let out = Command::new("qemu-img")
            .args(["check", "-f", "qcow2", image])
            .output()
            .expect("qemu-img check");
        let locked = String::from_utf8_lossy(&out.stderr).contains("lock");
        if !locked || std::time::Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The processes that have `path` open, for a failure message.
fn holders(path: &str) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten();
        if fds
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|t| t.to_str() == Some(path))
        {
            found.push((pid, proc_name(pid).unwrap_or_default()));
        }
    }
    found
}
