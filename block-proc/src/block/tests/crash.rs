//! The acknowledgement rule and qcow2's write order under SIGKILL: a child process writes
//! chunks through a `Node` (several tasks at once) and logs each acknowledged chunk; it is
//! SIGKILLed at a random point. Then `qemu-img check` must find no corruption (leaks are
//! allowed), every logged chunk must be in the image, and what no chunk wrote must be as it
//! was. Two workloads:
//! - [`Workload::BackingCow`]: copy-on-write over a backing file, new L2 tables and
//!   refcount blocks all the time (the allocating direction);
//! - [`Workload::Compressed`]: overwriting a compressed image, so writes free the compressed
//!   clusters they replace (and the host clusters those were packed in get used again) while
//!   others allocate; 512-byte clusters and 64-bit refcounts, so that a refcount block
//!   covers 32 KiB of file and imago's 32-block refcount cache evicts all the time (the
//!   freeing direction).
//!
//! The child is this test binary running the same test, which sees the image and log named
//! in its environment and plays [`crash_child`] instead.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipc::block::ImageFormat;

use super::*;

const ENV_IMG: &str = "SPLITVMM_BLOCK_CRASH_IMG";
const ENV_LOG: &str = "SPLITVMM_BLOCK_CRASH_LOG";
const ENV_DIR: &str = "SPLITVMM_BLOCK_CRASH_DIR";

const TASKS: u64 = 6;
const BACKING_BYTE: u8 = 0xaa;

#[derive(Clone, Copy, Debug)]
enum Workload {
    BackingCow,
    Compressed,
}

impl Workload {
    fn test_name(self) -> &'static str {
        match self {
            Self::BackingCow => "block::tests::crash::acknowledged_writes_survive_sigkill",
            Self::Compressed => {
                "block::tests::crash::overwritten_compressed_clusters_survive_sigkill"
            }
        }
    }

    fn size(self) -> u64 {
        match self {
            Self::BackingCow => 1 << 30,
            Self::Compressed => 4 << 20,
        }
    }

    fn chunks(self) -> u64 {
        match self {
            Self::BackingCow => 3000,
            Self::Compressed => 4000,
        }
    }

    fn chunk_len(self) -> u64 {
        match self {
            Self::BackingCow => 3000,
            Self::Compressed => 700,
        }
    }

    /// Where chunk `i` goes, unaligned, so each write copies the rest of its clusters from
    /// below. With a backing file: spread over the image (new L2 tables every 2 MiB with
    /// 4 KiB clusters, new refcount blocks every 8 MiB). Compressed: one after the other
    /// with 100 bytes between, so every compressed cluster of the first 3.2 MB is replaced
    /// (and the 512-byte host clusters they were packed in, about 30 to a cluster, are
    /// freed and used again).
    fn offset(self, i: u64) -> u64 {
        match self {
            Self::BackingCow => (i * ((1 << 20) + 4096 * 3 + 700)) % (self.size() - (1 << 20)),
            Self::Compressed => 50 + i * 800,
        }
    }

    /// The byte at `off` of the image before any chunk was written: the compressed
    /// image's pattern, or (around chunks) the backing file's.
    fn before(self, off: u64) -> u8 {
        match self {
            Self::BackingCow => BACKING_BYTE,
            Self::Compressed => (off / 512 % 200 + 40) as u8,
        }
    }

    /// Makes what every round's image starts from in `dir`.
    fn prepare(self, dir: &TempDir) {
        let size = self.size();
        let base = dir.file("base.raw");
        ok(
            "qemu-img",
            &["create", "-f", "raw", &base, &size.to_string()],
        );
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&base)
            .expect("open base");
        let write = |buf: &[u8], at: u64| {
            std::os::unix::fs::FileExt::write_all_at(&f, buf, at).expect("fill base")
        };
        match self {
            Self::BackingCow => {
                // Backing data only where chunks go (keeps the file small).
                for i in 0..self.chunks() {
                    let start = (self.offset(i) & !4095).saturating_sub(4096);
                    write(&[BACKING_BYTE; 20480], start);
                }
            }
            Self::Compressed => {
                let pattern: Vec<u8> = (0..size).map(|off| self.before(off)).collect();
                write(&pattern, 0);
                let packed = dir.file("packed.qcow2");
                compress_small(&base, &packed);
                let info = ok("qemu-img", &["check", &packed]);
                assert!(info.contains("100.00% compressed clusters"), "{info}");
            }
        }
    }

    /// A round's image at `img`, made from what [`Self::prepare`] left in `dir`.
    fn make_image(self, dir: &TempDir, img: &str) {
        match self {
            Self::BackingCow => {
                let opts = ["create", "-f", "qcow2", "-o", "cluster_size=4096"];
                ok(
                    "qemu-img",
                    &[&opts[..], &["-b", "base.raw", "-F", "raw", img]].concat(),
                );
            }
            Self::Compressed => {
                std::fs::copy(dir.file("packed.qcow2"), img).expect("copy the compressed image");
            }
        }
    }
}

/// `qemu-img convert -c` of the raw file `raw` into a qcow2 `img` with 512-byte clusters
/// and 64-bit refcounts: a refcount block then covers 32 KiB of file, so a few MiB of image
/// span more refcount blocks than imago's cache holds (32).
fn compress_small(raw: &str, img: &str) {
    let opts = "cluster_size=512,refcount_bits=64";
    let args = [
        "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, raw, img,
    ];
    ok("qemu-img", &args);
}

fn chunk_byte(i: u64) -> u8 {
    (i % 250 + 1) as u8
}

/// The child's part: writes and logs chunks until it is killed.
async fn crash_child(work: Workload, img: String, log: String, dir: String) {
    let dirs = vec![PathBuf::from(dir)];
    let node = Node::open(OpenOptions::new(img, ImageFormat::Qcow2, &dirs))
        .await
        .expect("child: open");
    let log = std::fs::OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(log)
        .expect("child: log");
    let log = Arc::new(log);
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let node = node.clone();
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while i < work.chunks() {
                let buf = vec![chunk_byte(i); work.chunk_len() as usize];
                node.write(&buf, work.offset(i), false)
                    .await
                    .expect("child: write");
                // One write(2) per line: the line is in the log file (page cache) when it
                // returns, and survives SIGKILL.
                (&*log)
                    .write_all(format!("{i}\n").as_bytes())
                    .expect("child: log");
                i += TASKS;
            }
        }));
    }
    for t in tasks {
        t.await.expect("child: join");
    }
    // Wait to be killed.
    tokio::time::sleep(Duration::from_secs(600)).await;
}

/// Plays the child if the environment names its files (and returns true).
fn child_part(work: Workload) -> bool {
    let (Ok(img), Ok(log), Ok(dir)) = (
        std::env::var(ENV_IMG),
        std::env::var(ENV_LOG),
        std::env::var(ENV_DIR),
    ) else {
        return false;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("child: runtime");
    rt.block_on(crash_child(work, img, log, dir));
    true
}

/// Three rounds of: a fresh image, a child writing into it, SIGKILL after a random number
/// of acknowledgements, and the checks.
fn kill_and_check(work: Workload) {
    let mut rng = Rng::new(seed(work.test_name()));
    let dir = TempDir::new("crash");
    work.prepare(&dir);
    let exe = std::env::current_exe().expect("test binary");
    let len = work.chunk_len() as usize;
    for round in 0..3 {
        let img = dir.file(&format!("top{round}.qcow2"));
        let log = dir.file(&format!("acks{round}.log"));
        std::fs::write(&log, b"").expect("log");
        work.make_image(&dir, &img);
        let mut child = Command::new(&exe)
            .args(["--exact", work.test_name(), "--test-threads=1"])
            .env(ENV_IMG, &img)
            .env(ENV_LOG, &log)
            .env(ENV_DIR, dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn child");
        // Kill after a random number of acknowledgements, plus a random few hundred µs.
        let kill_after = 1 + rng.below(work.chunks() * 9 / 10);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let acked = std::fs::read_to_string(&log)
                .map(|s| s.lines().count())
                .unwrap_or(0);
            if acked as u64 >= kill_after {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                panic!("child exited early ({status}):\n{err}");
            }
            assert!(Instant::now() < deadline, "child too slow: {acked} acks");
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(Duration::from_micros(rng.below(500)));
        child.kill().expect("SIGKILL");
        let _ = child.wait();

        let acked: Vec<u64> = std::fs::read_to_string(&log)
            .expect("read log")
            .lines()
            .map(|l| l.parse().expect("log line"))
            .collect();
        eprintln!(
            "{work:?} round {round}: killed after {} acknowledged chunks",
            acked.len()
        );
        assert!(acked.len() as u64 >= kill_after);
        qemu_check(&img, "qcow2");
        let data = qemu_contents(&img, "qcow2");
        for &i in &acked {
            let off = work.offset(i) as usize;
            assert!(
                data[off..off + len].iter().all(|b| *b == chunk_byte(i)),
                "round {round}: acknowledged chunk {i} at {off:#x} is not in the image"
            );
            // Copy-on-write kept what was there around it.
            if off > 0 {
                assert_eq!(
                    data[off - 1],
                    work.before(off as u64 - 1),
                    "chunk {i}: byte before"
                );
            }
            assert_eq!(
                data[off + len],
                work.before((off + len) as u64),
                "chunk {i}: byte after"
            );
        }
        if let Workload::Compressed = work {
            // Every byte is what it was, or what a chunk (acknowledged or in flight) wrote
            // there: a compressed cluster freed too early and reused would show here.
            let mut owner = vec![None; data.len()];
            for i in 0..work.chunks() {
                let off = work.offset(i) as usize;
                owner[off..off + len].fill(Some(i));
            }
            for (off, (&b, o)) in data.iter().zip(&owner).enumerate() {
                let ok = b == work.before(off as u64) || o.is_some_and(|i| b == chunk_byte(i));
                assert!(
                    ok,
                    "round {round}: byte {off:#x} is {b:#x}, which nothing wrote there"
                );
            }
        }
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    if !child_part(Workload::BackingCow) {
        kill_and_check(Workload::BackingCow);
    }
}

#[test]
fn overwritten_compressed_clusters_survive_sigkill() {
    if !child_part(Workload::Compressed) {
        kill_and_check(Workload::Compressed);
    }
}

/// The state on disk right after each write imago makes to a qcow2 table pointer (an L1
/// entry for a new L2 table, the header after the L1 table grew, a refcount-table entry for
/// a new refcount block) is what SIGKILL would leave at that instant: each must pass
/// `qemu-img check` (leaks allowed). imago alone fails this (it writes those pointers
/// before the refcounts of the clusters they point to); `block::order` makes it pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_is_consistent_right_after_every_table_pointer_write() {
    let dir = TempDir::new("pointer-writes");
    let img = dir.file("p.qcow2");
    let snaps = dir.path().join("snaps");
    std::fs::create_dir(&snaps).expect("snapshot dir");
    create_qcow2_4k(&img, "16M");
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let (img, snaps, count) = (img.clone(), snaps.clone(), count.clone());
        crate::block::order::test_hook::register(&img.clone(), move |_, _, watched| {
            if !watched {
                return;
            }
            let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::fs::copy(&img, snaps.join(format!("{n}.qcow2"))).expect("snapshot");
        });
    }
    let node = open(&img, ImageFormat::Qcow2, false, &dir).await;
    // One writer (so each snapshot is a single instant): new L2 tables every 2 MiB, new
    // refcount blocks every 8 MiB of file, and an L1 table that grows with the image.
    for i in 0..48u64 {
        if i == 16 {
            node.resize(160 << 20).await.expect("grow");
        }
        let size = node.size();
        let off = (i * ((2 << 20) + 4096 * 7 + 300)) % (size - 8192);
        node.write(&vec![(i + 1) as u8; 5000], off, false)
            .await
            .expect("write");
    }
    drop(node);
    crate::block::order::test_hook::unregister(&img);
    let n = count.load(std::sync::atomic::Ordering::SeqCst);
    assert!(n >= 40, "only {n} pointer writes seen");
    for i in 0..n {
        let snap = snaps.join(format!("{i}.qcow2")).display().to_string();
        qemu_check(&snap, "qcow2");
    }
    qemu_check_clean(&img, "qcow2");
}

/// The freeing direction, at every instant: the state on disk right after each write to a
/// refcount block must pass `qemu-img check` (leaks allowed). One writer replaces compressed
/// clusters, so each write frees what it replaces (imago must have written the L2 table
/// that lets go of a cluster before a refcount block that lowers its count) and allocates.
/// With 512-byte clusters and 64-bit refcounts a refcount block covers 32 KiB of file; the
/// writes go round more refcount blocks than imago's cache holds (32), so blocks are
/// evicted as well as flushed (though with one writer an evicted block never holds a count
/// lowered since the last flush: that race needs two, and `block::order` argues it), and
/// two groups are overwritten whole, so their packed host clusters reach refcount 0 and are
/// used again. Fails if imago's flush writes refcount blocks before L2 tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_is_consistent_right_after_every_refcount_block_write() {
    use std::collections::BTreeSet;
    use std::os::unix::fs::FileExt;
    use std::sync::Mutex;

    const CLUSTER: u64 = 512;
    const GROUP: u64 = 64 * CLUSTER;
    const GROUPS: u64 = 128;
    let dir = TempDir::new("refblock-writes");
    let base = dir.file("base.raw");
    let img = dir.file("c.qcow2");
    let snaps = dir.path().join("snaps");
    std::fs::create_dir(&snaps).expect("snapshot dir");
    // Groups of 64 clusters, packable and random in turn, so that the compressed clusters
    // (about 30 to a host cluster) are spread over the whole file between stored ones.
    let mut rng = Rng::new(7);
    let mut before = Vec::with_capacity((GROUPS * GROUP) as usize);
    for g in 0..GROUPS {
        for c in 0..64 {
            if g % 2 == 0 {
                before.extend(std::iter::repeat_n((c % 200 + 40) as u8, CLUSTER as usize));
            } else {
                before.extend((0..CLUSTER).map(|_| rng.next() as u8));
            }
        }
    }
    std::fs::write(&base, &before).expect("base");
    compress_small(&base, &img);

    // Which writes land in a refcount block, from the refcount table on disk.
    let refblocks = {
        let img = img.clone();
        move || -> BTreeSet<u64> {
            let f = std::fs::File::open(&img).expect("open");
            let mut h = [0u8; 12];
            f.read_exact_at(&mut h, 48).expect("header");
            let rt = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
            let rt_clusters = u32::from_be_bytes(h[8..].try_into().expect("4 bytes"));
            let mut table = vec![0u8; rt_clusters as usize * CLUSTER as usize];
            f.read_exact_at(&mut table, rt).expect("refcount table");
            table
                .chunks(8)
                .map(|e| u64::from_be_bytes(e.try_into().expect("8 bytes")) & !(CLUSTER - 1))
                .filter(|&o| o != 0)
                .collect()
        }
    };
    let written = Arc::new(Mutex::new(BTreeSet::new()));
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let (img, snaps, count, written) =
            (img.clone(), snaps.clone(), count.clone(), written.clone());
        crate::block::order::test_hook::register(&img.clone(), move |offset, len, _| {
            let hit: Vec<u64> = refblocks()
                .into_iter()
                .filter(|&rb| offset < rb + CLUSTER && rb < offset + len)
                .collect();
            if hit.is_empty() {
                return;
            }
            written.lock().expect("lock").extend(hit);
            let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::fs::copy(&img, snaps.join(format!("{n}.qcow2"))).expect("snapshot");
        });
    }

    // Two chunks in every packed group, group after group, then groups 0 and 2 whole.
    let chunk = |g: u64, k: u64| g * GROUP + k * 800 + 50;
    let mut chunks: Vec<u64> = (0..2)
        .flat_map(|k| (0..GROUPS).step_by(2).map(move |g| chunk(g, k)))
        .collect();
    chunks.extend(
        [0, 2]
            .into_iter()
            .flat_map(|g| (2..41).map(move |k| chunk(g, k))),
    );
    let mut want = before.clone();
    let first_end = std::fs::metadata(&img).expect("stat").len();
    let node = open(&img, ImageFormat::Qcow2, false, &dir).await;
    for (i, &off) in chunks.iter().enumerate() {
        let data = vec![(i % 250 + 1) as u8; 700];
        node.write(&data, off, false).await.expect("write");
        want[off as usize..off as usize + 700].copy_from_slice(&data);
    }
    drop(node);
    crate::block::order::test_hook::unregister(&img);

    let n = count.load(std::sync::atomic::Ordering::SeqCst);
    let blocks = written.lock().expect("lock").len();
    eprintln!("{n} refcount block writes, to {blocks} blocks");
    assert!(n >= chunks.len(), "only {n} refcount block writes seen");
    assert!(
        blocks > 32,
        "writes went to {blocks} refcount blocks, not more than imago caches"
    );
    for i in 0..n {
        let snap = snaps.join(format!("{i}.qcow2")).display().to_string();
        qemu_check(&snap, "qcow2");
    }
    qemu_check_clean(&img, "qcow2");
    assert_same("image", &qemu_contents(&img, "qcow2"), &want);
    // Below the first end of the file, a packed group can only have been given a cluster
    // that was freed: a host cluster of compressed data that reached refcount 0.
    let map = ok("qemu-img", &["map", "-f", "qcow2", "--output=json", &img]);
    let map: serde_json::Value = serde_json::from_str(&map).expect("map JSON");
    let reused = map
        .as_array()
        .expect("map array")
        .iter()
        .filter(|e| {
            e["start"]
                .as_u64()
                .is_some_and(|s| (s / GROUP).is_multiple_of(2))
        })
        .filter(|e| e["offset"].as_u64().is_some_and(|o| o < first_end))
        .count();
    assert!(reused > 0, "no freed host cluster was used again");
}

/// An L2 table that reaches the disk pointing to a cluster whose refcount is still only in
/// imago's cache (the eviction race in `block::order`'s documentation; the SIGKILL test
/// above caught it once with six writers) must find the refcount counted first. Played here
/// without the race, through the rule itself: entry 1 of the image's first L2 table is
/// pointed at a fresh cluster at the end of the file; then a new L2 table, written while
/// nothing points to it, is made reachable by its L1 entry. After each write the image
/// must pass `qemu-img check` and read as written.
#[tokio::test]
async fn an_l2_table_never_lands_before_the_refcounts_of_its_clusters() {
    use std::os::unix::fs::FileExt;

    use crate::block::order::MetadataOrder;

    let dir = TempDir::new("l2-order");
    let img = dir.file("l2.qcow2");
    create_qcow2_4k(&img, "16M");
    {
        let node = open(&img, ImageFormat::Qcow2, false, &dir).await;
        node.write(&[7u8; 4096], 0, false).await.expect("write");
    }
    let file = open_rw(&img);
    let be64 = |off: u64| be64_at(&file, off);
    let l1 = be64(40);
    let table = be64(l1) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(table, 0, "the first write made an L2 table");
    // Three fresh clusters past the end: data for the old table, a new table, its data.
    let end = file.metadata().expect("stat").len().next_multiple_of(4096);
    let (data1, table2, data2) = (end, end + 4096, end + 8192);
    file.set_len(end + 3 * 4096).expect("grow");
    file.write_all_at(&[9u8; 4096], data1).expect("data1");
    file.write_all_at(&[5u8; 4096], data2).expect("data2");
    let entry = |off: u64| (off | 1 << 63).to_be_bytes();
    let order = MetadataOrder::new(&file).expect("order");
    // Writes a table entry at `at` pointing to `to`, through the rule.
    let point = |at: u64, to: u64| {
        order.pointer_write(&file, at, &entry(to), || file.write_all_at(&entry(to), at))
    };

    assert!(
        order.touches(table + 8, 8),
        "writes into an L2 table are watched"
    );
    point(table + 8, data1).expect("L2 write");
    qemu_check(&img, "qcow2");

    assert!(
        !order.touches(table2, 8),
        "an unreachable table is not watched"
    );
    file.write_all_at(&entry(data2), table2).expect("new table");
    point(l1 + 8, table2).expect("L1 write");
    qemu_check(&img, "qcow2");
    assert!(
        order.touches(table2 + 16, 8),
        "the new table is watched now"
    );

    let data = qemu_contents(&img, "qcow2");
    assert_same("old table's new cluster", &data[4096..8192], &[9u8; 4096]);
    assert_same(
        "new table's cluster",
        &data[2 << 20..(2 << 20) + 4096],
        &[5u8; 4096],
    );
}
