//! The client against qemu-nbd (structured replies, base:allocation), nbdkit without
//! structured replies, and this server (pipelining, errors, splitting of large requests).

use std::process::{Child, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::*;
use crate::nbd::client::NbdClient;

/// A spawned server process, killed (by its pid) if still running when dropped.
struct Spawned(Child);

impl Spawned {
    fn new(program: &str, args: &[&str]) -> Self {
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        Self(child)
    }

    /// Waits (bounded) for it to exit by itself; whether it did, successfully.
    async fn exited_ok(&mut self) -> bool {
        for _ in 0..500 {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status.success();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Connects to a unix socket that a spawned server is about to create.
async fn connect_when_ready(sock: &Path) -> std::os::unix::net::UnixStream {
    for _ in 0..500 {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(sock) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("nothing listens on {}", sock.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_against_qemu_nbd() {
    let dir = TempDir::new("qemu-nbd");
    let img = dir.join("a.qcow2");
    let img_s = img.to_str().unwrap();
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", img_s, "16M"]).await;
    run_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 1M 64k", img_s],
    )
    .await;
    let sock = dir.join("q.sock");
    let mut qemu_nbd = Spawned::new(
        "qemu-nbd",
        &[
            "--socket",
            sock.to_str().unwrap(),
            "--export-name",
            "exp",
            "--format",
            "qcow2",
            img_s,
        ],
    );
    let stream = connect_when_ready(&sock).await;
    let c = within(10, NbdClient::connect_fd(OwnedFd::from(stream), "exp"))
        .await
        .unwrap();
    let info = c.info().clone();
    assert_eq!(info.size, 16 * MIB);
    assert!(info.structured && info.base_allocation, "{info:?}");
    assert!(!c.read_only());
    assert_ne!(info.flags & TFLAG_SEND_WRITE_ZEROES, 0);

    let mut buf = vec![0u8; 64 * KIB as usize];
    c.read(&mut buf, MIB).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    let map = c.block_status(0, 16 * MIB).await.unwrap();
    assert_eq!(
        map[0],
        Extent {
            length: MIB,
            zero: true,
            data: false,
            allocated_here: false
        }
    );
    assert_eq!(map[1].length, 64 * KIB);
    assert!(map[1].data && !map[1].zero);
    assert!(map.iter().map(|e| e.length).sum::<u64>() <= 16 * MIB);

    // Sixteen writers at once, then read back.
    let c = Arc::new(c);
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let off = 2 * MIB + i * 64 * KIB;
            let data = vec![0x10 + i as u8; 64 * KIB as usize];
            c.write(&data, off, i % 2 == 0).await.unwrap();
            let mut back = vec![0u8; data.len()];
            c.read(&mut back, off).await.unwrap();
            assert!(back == data);
        }));
    }
    for t in tasks {
        within(10, t).await.unwrap();
    }
    c.write_zeroes(MIB, 32 * KIB, true).await.unwrap();
    c.write_zeroes(MIB + 32 * KIB, 32 * KIB, false)
        .await
        .unwrap();
    c.read(&mut buf, MIB).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    c.discard(8 * MIB, MIB).await.unwrap();
    c.flush().await.unwrap();
    // Past the end: refused locally.
    assert!(c.read(&mut buf, 16 * MIB - 4096).await.is_err());
    c.disconnect().await.unwrap();
    assert!(c.read(&mut buf, 0).await.is_err());

    // qemu-nbd serves one client and exits when it has gone.
    assert!(qemu_nbd.exited_ok().await, "qemu-nbd did not exit cleanly");
    run_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x11 2112k 64k",
            "-c",
            "read -P 0 1M 64k",
            img_s,
        ],
    )
    .await;
    let out = run_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 0x1f 3008k 64k", img_s],
    )
    .await;
    assert!(!out.contains("failed"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_structured_replies_against_nbdkit() {
    let dir = TempDir::new("nbdkit");
    let sock = dir.join("k.sock");
    let _nbdkit = Spawned::new(
        "nbdkit",
        &[
            "-f",
            "--exit-with-parent",
            "--no-sr",
            "-U",
            sock.to_str().unwrap(),
            "memory",
            "4M",
        ],
    );
    let stream = connect_when_ready(&sock).await;
    let c = within(10, NbdClient::connect_fd(OwnedFd::from(stream), ""))
        .await
        .unwrap();
    assert!(!c.info().structured && !c.info().base_allocation);
    assert_eq!(c.info().size, 4 * MIB);
    let data = pattern(3 * MIB as usize, 4);
    c.write(&data, 512, true).await.unwrap();
    let mut back = vec![0u8; data.len()];
    c.read(&mut back, 512).await.unwrap();
    assert!(back == data);
    // Without base:allocation everything is data.
    assert_eq!(
        c.block_status(0, 4 * MIB).await.unwrap(),
        [Extent {
            length: 4 * MIB,
            zero: false,
            data: true,
            allocated_here: true
        }]
    );
    c.write_zeroes(512, 4096, false).await.unwrap();
    c.read(&mut back[..4096], 512).await.unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0));
    c.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_against_this_server() {
    let (e1, dev) = export("w", MemDevice::new(48 * MIB), true);
    let ro = MemDevice::new(MIB).read_only();
    ro.fill(0, &pattern(4096, 2));
    let (e2, _ro) = export("ro", ro, false);
    let t = TestServer::start(NbdServerConfig::default(), vec![e1, e2]).await;

    let unknown = NbdClient::connect(t.unix_stream().await, "nope").await;
    assert_eq!(unknown.unwrap_err().kind(), io::ErrorKind::NotFound);

    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", t.port))
        .await
        .unwrap();
    let c = Arc::new(NbdClient::connect(tcp, "w").await.unwrap());
    assert!(c.info().structured && c.info().base_allocation);
    assert_eq!(
        (
            c.info().min_block,
            c.info().preferred_block,
            c.info().max_block
        ),
        (1, 4096, 32 << 20)
    );

    // Many requests from many tasks at once.
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let off = i * 256 * KIB;
            let data = pattern(64 * KIB as usize, i as u8);
            c.write(&data, off, i % 2 == 0).await.unwrap();
            let mut back = vec![0u8; data.len()];
            c.read(&mut back, off).await.unwrap();
            assert!(back == data, "task {i}");
        }));
    }
    for t in tasks {
        within(20, t).await.unwrap();
    }
    assert_eq!(dev.fua_writes.load(Ordering::SeqCst), 32);
    let contents = dev.contents();
    for i in 0..64usize {
        let off = i * 256 * KIB as usize;
        assert!(contents[off..off + 64 * KIB as usize] == pattern(64 * KIB as usize, i as u8)[..]);
    }

    // The allocation map through base:allocation.
    let map = c.block_status(0, 48 * MIB).await.unwrap();
    assert_eq!(map[0].length, 64 * KIB);
    assert!(map[0].data);
    assert_eq!(map[1].length, 192 * KIB);
    assert!(!map[1].data && map[1].zero);

    // Larger than the maximum block size: split into several requests.
    let big = pattern(40 * MIB as usize, 77);
    c.write(&big, 8 * MIB - 512, false).await.unwrap();
    let mut back = vec![0u8; big.len()];
    c.read(&mut back, 8 * MIB - 512).await.unwrap();
    assert!(back == big);
    c.write_zeroes(8 * MIB, 36 * MIB, true).await.unwrap();
    assert!(
        dev.contents()[8 * MIB as usize..44 * MIB as usize]
            .iter()
            .all(|&b| b == 0)
    );
    c.discard(0, 48 * MIB).await.unwrap();
    assert!(dev.allocated_blocks().is_empty());
    c.flush().await.unwrap();
    assert!(dev.flushes.load(Ordering::SeqCst) >= 1);
    let e = c.read(&mut back[..4096], 48 * MIB).await.unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));

    // Read-only export.
    let r = NbdClient::connect(t.unix_stream().await, "ro")
        .await
        .unwrap();
    assert!(r.read_only());
    let e = r.write(&[1u8; 512], 0, false).await.unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    let mut b = vec![0u8; 4096];
    r.read(&mut b, 0).await.unwrap();
    assert!(b == pattern(4096, 2));
    r.disconnect().await.unwrap();
    c.disconnect().await.unwrap();
    t.wait_no_connections().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_survives_requests_given_up_by_their_callers() {
    let mut dev = MemDevice::new(MIB);
    dev.slow_read = Some((0, Duration::from_millis(300)));
    dev.fill(0, &pattern(8192, 3));
    let (e, _dev) = export("a", dev, false);
    let t = TestServer::start(NbdServerConfig::default(), vec![e]).await;
    let c = NbdClient::connect(t.unix_stream().await, "a")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    // Given up after being sent: its late reply must be absorbed.
    let slow = tokio::time::timeout(Duration::from_millis(50), c.read(&mut buf, 0)).await;
    assert!(slow.is_err());
    c.read(&mut buf, 4096).await.unwrap();
    assert!(buf == pattern(8192, 3)[4096..]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    c.read(&mut buf, 4096).await.unwrap();
    assert!(buf == pattern(8192, 3)[4096..]);
    c.disconnect().await.unwrap();
}

/// A fake server: negotiates (structured replies or not, no meta context, a 1 MiB
/// export), then answers the first request with `reply` (given the request).
async fn lying_server(
    structured: bool,
    go_reply: Option<Vec<u8>>,
    reply: impl FnOnce(Request) -> Vec<u8> + Send + 'static,
) -> (tokio::net::UnixStream, JoinHandle<()>) {
    let (client_end, mut s) = tokio::net::UnixStream::pair().unwrap();
    let task = tokio::spawn(async move {
        let mut hello = NBDMAGIC.to_be_bytes().to_vec();
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&hello).await.unwrap();
        let _flags = s.read_u32().await.unwrap();
        loop {
            let mut h = [0u8; 16];
            if s.read_exact(&mut h).await.is_err() {
                return;
            }
            let (opt, len) = decode_option_header(&h).unwrap();
            let mut d = vec![0u8; len as usize];
            s.read_exact(&mut d).await.unwrap();
            let mut out = Vec::new();
            match opt {
                OPT_STRUCTURED_REPLY if structured => put_option_reply(&mut out, opt, REP_ACK, &[]),
                OPT_GO => {
                    if let Some(r) = go_reply {
                        s.write_all(&r).await.unwrap();
                        return;
                    }
                    let mut i = INFO_EXPORT.to_be_bytes().to_vec();
                    i.extend_from_slice(&MIB.to_be_bytes());
                    i.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH).to_be_bytes());
                    put_option_reply(&mut out, opt, REP_INFO, &i);
                    put_option_reply(&mut out, opt, REP_ACK, &[]);
                    s.write_all(&out).await.unwrap();
                    break;
                }
                _ => put_option_reply(&mut out, opt, REP_ERR_UNSUP, &[]),
            }
            s.write_all(&out).await.unwrap();
        }
        let mut h = [0u8; REQUEST_LEN];
        s.read_exact(&mut h).await.unwrap();
        let req = Request::decode(&h).unwrap();
        let _ = s.write_all(&reply(req)).await;
        // Keep the connection open until the client closes it.
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
    });
    (client_end, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_lying_server() {
    // An option reply claiming a gigabyte: refused before allocating it.
    let mut huge = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    huge.extend_from_slice(&OPT_GO.to_be_bytes());
    huge.extend_from_slice(&REP_INFO.to_be_bytes());
    huge.extend_from_slice(&(1u32 << 30).to_be_bytes());
    let (s, _t) = lying_server(false, Some(huge), |_| Vec::new()).await;
    let e = within(5, NbdClient::connect(s, "x")).await.unwrap_err();
    assert!(e.to_string().contains("option reply of"), "{e}");

    type Lie = fn(Request) -> Vec<u8>;
    let lies: [(bool, Lie, &str); 4] = [
        (
            false,
            |req| {
                let mut b = Vec::new();
                put_simple_reply(&mut b, 0, req.cookie + 1);
                b
            },
            "unknown cookie",
        ),
        (
            true,
            |req| {
                // Claims 4 GiB of data for a 4 KiB read.
                let mut b = Vec::new();
                put_chunk_header(
                    &mut b,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    req.cookie,
                    u32::MAX,
                );
                b.extend_from_slice(&req.offset.to_be_bytes());
                b
            },
            "outside the request",
        ),
        (
            true,
            |req| {
                // Success without covering the request.
                let mut b = Vec::new();
                put_chunk_header(
                    &mut b,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_HOLE,
                    req.cookie,
                    12,
                );
                b.extend_from_slice(&req.offset.to_be_bytes());
                b.extend_from_slice(&1024u32.to_be_bytes());
                b
            },
            "does not cover",
        ),
        (
            false,
            |_| b"this is not an NBD reply".to_vec(),
            "bad reply magic",
        ),
    ];
    for (structured, lie, what) in lies {
        let (s, _t) = lying_server(structured, None, lie).await;
        let c = within(5, NbdClient::connect(s, "x")).await.unwrap();
        assert_eq!(c.info().structured, structured);
        let mut buf = vec![0u8; 4096];
        let e = within(5, c.read(&mut buf, 0)).await.unwrap_err();
        assert!(e.to_string().contains(what), "{what}: {e}");
    }
}
