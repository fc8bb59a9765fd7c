//! Tests of the block layer against QEMU's own tools (`qemu-img`, `qemu-io`), which are the
//! oracle for image contents, allocation maps, header members and locks. Every test works
//! in its own directory under /tmp, removed when it ends.

mod crash;
mod create;
mod info;
mod lock;
mod open;
mod read;
mod status;
mod write;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use ipc::block::ImageFormat;

use super::node::{Backing, Node, OpenOptions};
use crate::device::{BlockDevice, Extent};

/// A scratch directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = PathBuf::from(format!(
            "/tmp/splitvmm-block-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `name` inside the directory, as a string.
    pub fn file(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }

    /// The directory as the allowed-directories list.
    pub fn dirs(&self) -> Vec<PathBuf> {
        vec![self.0.clone()]
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a program, returning its output whatever the exit status.
pub fn run(prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

/// Runs a program, again (for up to a second) while it fails on an image lock.
///
/// Tests run in parallel and spawn processes: a child forked by one test holds copies of
/// every descriptor of this process until it calls exec, and with them the OFD locks of
/// images another test has just closed. Tests that are about locks use [`run`].
pub fn run_settled(prog: &str, args: &[&str]) -> Output {
    let mut tries = 0;
    loop {
        let out = run(prog, args);
        let locked =
            String::from_utf8_lossy(&out.stderr).contains("Is another process using the image");
        if out.status.success() || !locked || tries == 40 {
            return out;
        }
        tries += 1;
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
}

/// Runs a program that must succeed; returns its stdout.
pub fn ok(prog: &str, args: &[&str]) -> String {
    let out = run_settled(prog, args);
    assert!(
        out.status.success(),
        "{prog} {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img create -f qcow2 -o cluster_size=4096 IMG SIZE`: small clusters, so a few
/// writes make new L2 tables and refcount blocks.
pub fn create_qcow2_4k(img: &str, size: &str) {
    create_qcow2(img, 4096, size);
}

/// `qemu-img create -f qcow2 -o cluster_size=CLUSTER IMG SIZE`.
pub fn create_qcow2(img: &str, cluster: u32, size: &str) {
    let opts = format!("cluster_size={cluster}");
    ok(
        "qemu-img",
        &["create", "-f", "qcow2", "-o", &opts, img, size],
    );
}

/// `img` opened for reading and writing, to change an image behind the block layer's back.
pub fn open_rw(img: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap_or_else(|e| panic!("open {img}: {e}"))
}

/// The big-endian 64-bit word at `offset` of `file` (a header field or table entry).
pub fn be64_at(file: &std::fs::File, offset: u64) -> u64 {
    let mut b = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(file, &mut b, offset).expect("read");
    u64::from_be_bytes(b)
}

/// `qemu-io -f FMT -c CMD... IMG`.
pub fn qemu_io(img: &str, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img);
    let out = ok("qemu-io", &args);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io {cmds:?} on {img}: {out}"
    );
}

/// The guest-visible contents of `img`, as `qemu-img convert -O raw` gives them.
pub fn qemu_contents(img: &str, fmt: &str) -> Vec<u8> {
    let out = format!("{img}.converted.raw");
    ok(
        "qemu-img",
        &["convert", "-U", "-f", fmt, "-O", "raw", img, &out],
    );
    let data = std::fs::read(&out).expect("read converted image");
    let _ = std::fs::remove_file(&out);
    data
}

/// `qemu-img check`: panics on corruption (exit 2) or any other failure; leaks (exit 3)
/// are allowed.
pub fn qemu_check(img: &str, fmt: &str) {
    let out = run_settled("qemu-img", &["check", "-f", fmt, img]);
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 3,
        "qemu-img check {img} exit {code}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img check` must find nothing at all (no leaks either).
pub fn qemu_check_clean(img: &str, fmt: &str) {
    let out = run_settled("qemu-img", &["check", "-f", fmt, img]);
    assert!(
        out.status.success(),
        "qemu-img check {img}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts two images' contents are equal, naming the first difference.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i:#x}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

pub fn fmt_str(f: ImageFormat) -> &'static str {
    f.as_str()
}

/// Opens `name` with default backing. A lock conflict is retried for a while: the
/// tests run in parallel threads of one process, and a `qemu-img` another test forks
/// holds copies of this process's descriptors (and so their OFD locks) until it execs,
/// which a loaded machine can stretch; no other process uses this test's images.
pub async fn open(name: &str, fmt: ImageFormat, read_only: bool, dir: &TempDir) -> Arc<Node> {
    let mut tries = 0;
    loop {
        match Node::open(OpenOptions::new(name, fmt, &dir.dirs()).read_only(read_only)).await {
            Ok(node) => return node,
            Err(e) if tries < 50 && e.to_string().contains("lock") => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("open {name}: {e}"),
        }
    }
}

/// Opens `name` with the given backing.
pub async fn open_with(
    name: &str,
    fmt: ImageFormat,
    read_only: bool,
    backing: Backing,
    dir: &TempDir,
) -> Arc<Node> {
    Node::open(
        OpenOptions::new(name, fmt, &dir.dirs())
            .read_only(read_only)
            .backing(backing),
    )
    .await
    .unwrap_or_else(|e| panic!("open {name}: {e}"))
}

/// Reads the whole device in pieces of varying (unaligned) sizes.
pub async fn read_all(dev: &Node) -> Vec<u8> {
    let size = dev.size();
    let mut out = vec![0u8; size as usize];
    let steps = [65536usize, 4096 + 17, 1 << 20, 511, 200_000];
    let mut pos = 0usize;
    let mut i = 0;
    while pos < out.len() {
        let n = steps[i % steps.len()].min(out.len() - pos);
        dev.read(&mut out[pos..pos + n], pos as u64)
            .await
            .unwrap_or_else(|e| panic!("read {n} at {pos}: {e}"));
        pos += n;
        i += 1;
    }
    out
}

/// A byte map of `(zero, data, allocated_here)` flattened from extents, as runs.
pub type Runs = Vec<(u64, u64, bool, bool, bool)>;

/// Merges adjacent runs with equal flags.
fn merge(runs: impl IntoIterator<Item = (u64, u64, bool, bool, bool)>) -> Runs {
    let mut out: Runs = Vec::new();
    for r in runs {
        match out.last_mut() {
            Some(l) if l.0 + l.1 == r.0 && (l.2, l.3, l.4) == (r.2, r.3, r.4) => l.1 += r.1,
            _ => out.push(r),
        }
    }
    out
}

/// `qemu-img map --output=json` as runs: allocated_here is `depth == 0 && present`.
pub fn qemu_map(img: &str, fmt: &str) -> Runs {
    let out = ok("qemu-img", &["map", "-U", "-f", fmt, "--output=json", img]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("map JSON");
    let arr = v.as_array().expect("map array");
    merge(arr.iter().map(|e| {
        let n = |k: &str| {
            e[k].as_u64()
                .unwrap_or_else(|| panic!("map member {k}: {e}"))
        };
        let b = |k: &str| {
            e[k].as_bool()
                .unwrap_or_else(|| panic!("map member {k}: {e}"))
        };
        (
            n("start"),
            n("length"),
            b("zero"),
            b("data"),
            n("depth") == 0 && b("present"),
        )
    }))
}

/// The whole device's block status as runs, asked for in pieces of `step` bytes.
pub async fn node_map(dev: &Node, step: u64) -> Runs {
    let size = dev.size();
    let mut runs = Vec::new();
    let mut pos = 0;
    while pos < size {
        let ext: Vec<Extent> = dev
            .block_status(pos, step.min(size - pos))
            .await
            .unwrap_or_else(|e| panic!("block_status at {pos}: {e}"));
        assert!(!ext.is_empty(), "no extent at {pos}");
        for e in ext {
            assert!(e.length > 0, "empty extent at {pos}");
            runs.push((pos, e.length, e.zero, e.data, e.allocated_here));
            pos += e.length;
        }
    }
    assert_eq!(pos, size, "extents overrun the image");
    merge(runs)
}

/// A small deterministic PRNG (xorshift64*), seeded per test.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A seed from the clock, printed so a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let s = std::env::var("SPLITVMM_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{test}: seed {s} (replay with SPLITVMM_TEST_SEED={s})");
    s
}
