//! Tests of the NBD server and client: an in-memory sparse test device, a server listening
//! on a temporary unix socket and on 127.0.0.1, raw-socket protocol clients (well-behaved
//! and hostile), and the real QEMU and libnbd tools of this machine.

#![allow(clippy::unwrap_used)]

mod admin;
mod client;
mod hostile;
mod tools;

use std::collections::BTreeMap;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::proto::*;
use super::server::{Export, NbdListener, NbdServer, NbdServerConfig};
use crate::device::{BlockDevice, Extent};

/// Allocation granularity of [`MemDevice`].
pub const BS: u64 = 4096;
pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// An in-memory sparse device: 4 KiB blocks, absent blocks are holes reading as zeroes.
/// It can be made slow or failing at chosen offsets.
#[derive(Debug)]
pub struct MemDevice {
    size: u64,
    read_only: bool,
    blocks: Mutex<BTreeMap<u64, Vec<u8>>>,
    pub flushes: AtomicUsize,
    pub fua_writes: AtomicUsize,
    pub reads_started: AtomicUsize,
    pub reads_done: AtomicUsize,
    /// Reads starting at this offset sleep this long first.
    pub slow_read: Option<(u64, Duration)>,
    /// Reads covering this offset fail with EIO.
    pub failing_read: Option<u64>,
}

impl MemDevice {
    pub fn new(size: u64) -> Self {
        Self {
            size,
            read_only: false,
            blocks: Mutex::new(BTreeMap::new()),
            flushes: AtomicUsize::new(0),
            fua_writes: AtomicUsize::new(0),
            reads_started: AtomicUsize::new(0),
            reads_done: AtomicUsize::new(0),
            slow_read: None,
            failing_read: None,
        }
    }

    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Writes directly (test setup).
    pub fn fill(&self, offset: u64, data: &[u8]) {
        self.put(offset, data);
    }

    /// The whole contents.
    pub fn contents(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.size as usize];
        self.get(0, &mut v);
        v
    }

    pub fn allocated_blocks(&self) -> Vec<u64> {
        self.blocks.lock().unwrap().keys().copied().collect()
    }

    fn get(&self, offset: u64, buf: &mut [u8]) {
        let blocks = self.blocks.lock().unwrap();
        let mut pos = offset;
        let mut done = 0usize;
        while done < buf.len() {
            let b = pos / BS;
            let in_block = (pos % BS) as usize;
            let n = (BS as usize - in_block).min(buf.len() - done);
            match blocks.get(&b) {
                Some(data) => buf[done..done + n].copy_from_slice(&data[in_block..in_block + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
            pos += n as u64;
        }
    }

    fn put(&self, offset: u64, buf: &[u8]) {
        let mut blocks = self.blocks.lock().unwrap();
        let mut pos = offset;
        let mut done = 0usize;
        while done < buf.len() {
            let b = pos / BS;
            let in_block = (pos % BS) as usize;
            let n = (BS as usize - in_block).min(buf.len() - done);
            let data = blocks.entry(b).or_insert_with(|| vec![0u8; BS as usize]);
            data[in_block..in_block + n].copy_from_slice(&buf[done..done + n]);
            done += n;
            pos += n as u64;
        }
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }

    fn check_write(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.check(offset, len)
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    async fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.reads_started.fetch_add(1, Ordering::SeqCst);
        if let Some((at, delay)) = self.slow_read
            && at == offset
        {
            tokio::time::sleep(delay).await;
        }
        if let Some(bad) = self.failing_read
            && (offset..offset + buf.len() as u64).contains(&bad)
        {
            self.reads_done.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.get(offset, buf);
        self.reads_done.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn write(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        self.put(offset, buf);
        if fua {
            self.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> io::Result<()> {
        self.check_write(offset, length)?;
        let mut blocks = self.blocks.lock().unwrap();
        let end = offset + length;
        let mut pos = offset;
        while pos < end {
            let b = pos / BS;
            let in_block = pos % BS;
            let n = (BS - in_block).min(end - pos);
            if n == BS && may_unmap {
                blocks.remove(&b);
            } else if let Some(data) = blocks.get_mut(&b) {
                data[in_block as usize..(in_block + n) as usize].fill(0);
            } else if !may_unmap {
                blocks.insert(b, vec![0u8; BS as usize]);
            }
            pos += n;
        }
        Ok(())
    }

    async fn discard(&self, offset: u64, length: u64) -> io::Result<()> {
        self.check_write(offset, length)?;
        let mut blocks = self.blocks.lock().unwrap();
        let first = offset.div_ceil(BS);
        let last = (offset + length) / BS;
        for b in first..last {
            blocks.remove(&b);
        }
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn block_status(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        self.check(offset, length)?;
        let blocks = self.blocks.lock().unwrap();
        let end = offset + length;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let b = pos / BS;
            let n = (BS - pos % BS).min(end - pos);
            let data = blocks.contains_key(&b);
            match out.last_mut() {
                Some(last) if last.data == data => last.length += n,
                _ => out.push(Extent {
                    length: n,
                    zero: !data,
                    data,
                    allocated_here: data,
                }),
            }
            pos += n;
        }
        Ok(out)
    }
}

/// A deterministic, non-repeating byte pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8 ^ seed)
        .collect()
}

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "nbd-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server listening on a temporary unix socket and on 127.0.0.1.
pub struct TestServer {
    pub server: Arc<NbdServer<MemDevice>>,
    pub deleted: mpsc::UnboundedReceiver<String>,
    pub sock: PathBuf,
    pub port: u16,
    pub serving: Vec<JoinHandle<io::Result<()>>>,
    pub dir: TempDir,
}

impl TestServer {
    pub async fn start(config: NbdServerConfig, exports: Vec<Export<MemDevice>>) -> Self {
        let dir = TempDir::new("srv");
        let sock = dir.join("nbd.sock");
        let (server, deleted) = NbdServer::new(config);
        for e in exports {
            server.add_export(e).unwrap();
        }
        // Handed over as bare descriptors, as block-proc receives them.
        let unix = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        let mut serving = Vec::new();
        for fd in [OwnedFd::from(unix), OwnedFd::from(tcp)] {
            let listener = NbdListener::from_fd(fd).unwrap();
            let s = server.clone();
            serving.push(tokio::spawn(async move { s.serve(listener).await }));
        }
        Self {
            server,
            deleted,
            sock,
            port,
            serving,
            dir,
        }
    }

    pub fn unix_uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }

    pub fn tcp_uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.port)
    }

    pub async fn unix_stream(&self) -> tokio::net::UnixStream {
        tokio::net::UnixStream::connect(&self.sock).await.unwrap()
    }

    /// Waits (bounded) until the server has no connections left.
    pub async fn wait_no_connections(&self) {
        for _ in 0..200 {
            if self.server.connection_count() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("connections still open: {}", self.server.connection_count());
    }
}

pub fn export(name: &str, dev: MemDevice, writable: bool) -> (Export<MemDevice>, Arc<MemDevice>) {
    let device = Arc::new(dev);
    (
        Export {
            name: name.to_owned(),
            description: None,
            device: device.clone(),
            writable,
        },
        device,
    )
}

/// Runs a program to completion off the runtime's threads; returns (success, stdout,
/// stderr).
pub async fn run(program: &str, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let desc = format!("{program} {}", args.join(" "));
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || cmd.output()),
    )
    .await
    .unwrap_or_else(|_| panic!("{desc}: timed out"))
    .unwrap()
    .unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a program that must succeed; returns its stdout.
pub async fn run_ok(program: &str, args: &[&str]) -> String {
    let (ok, stdout, stderr) = run(program, args).await;
    assert!(
        ok,
        "{program} {} failed:\n{stdout}\n{stderr}",
        args.join(" ")
    );
    let lower = stderr.to_lowercase();
    assert!(
        !lower.contains("warn") && !lower.contains("error"),
        "{program} {} complained:\n{stderr}",
        args.join(" ")
    );
    stdout
}

/// Bounds a test step.
pub async fn within<T>(secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test step timed out")
}

/// A raw protocol client for tests: it sends whatever it is told.
pub struct Raw {
    pub s: tokio::net::UnixStream,
}

/// One structured reply chunk.
#[derive(Debug)]
pub struct Chunk {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

impl Raw {
    /// Connects and reads the server's greeting.
    pub async fn connect(path: &Path) -> Self {
        let s = tokio::net::UnixStream::connect(path).await.unwrap();
        let mut r = Self { s };
        let mut g = [0u8; 18];
        within(5, r.s.read_exact(&mut g)).await.unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        r
    }

    /// Connects and sends fixed-newstyle, no-zeroes client flags.
    pub async fn hello(path: &Path) -> Self {
        let mut r = Self::connect(path).await;
        r.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .await;
        r
    }

    pub async fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).await.unwrap();
    }

    pub async fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = Vec::new();
        put_option(&mut b, opt, data);
        self.send(&b).await;
    }

    /// (option, reply type, data)
    pub async fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        within(5, self.s.read_exact(&mut h)).await.unwrap();
        let mut r = Reader::new(&h);
        assert_eq!(r.u64(), Some(OPTION_REPLY_MAGIC));
        let (opt, typ, len) = (r.u32().unwrap(), r.u32().unwrap(), r.u32().unwrap());
        let mut data = vec![0u8; len as usize];
        within(5, self.s.read_exact(&mut data)).await.unwrap();
        (opt, typ, data)
    }

    /// Sends an option and expects a single reply of type `want`.
    pub async fn expect_reply(&mut self, opt: u32, data: &[u8], want: u32) -> Vec<u8> {
        self.option(opt, data).await;
        let (o, t, d) = self.option_reply().await;
        assert_eq!(o, opt);
        assert_eq!(
            t,
            want,
            "{}: reply {t:#x}, data {:?}",
            option_name(opt),
            String::from_utf8_lossy(&d)
        );
        d
    }

    /// Negotiates structured replies if asked, base:allocation if asked, then GO.
    /// Returns (size, transmission flags).
    pub async fn go(path: &Path, name: &str, structured: bool, meta: bool) -> (Self, u64, u16) {
        let mut r = Self::hello(path).await;
        if structured {
            r.expect_reply(OPT_STRUCTURED_REPLY, &[], REP_ACK).await;
        }
        if meta {
            r.option(
                OPT_SET_META_CONTEXT,
                &meta_request(name, &[BASE_ALLOCATION]),
            )
            .await;
            let (_, t, d) = r.option_reply().await;
            assert_eq!(t, REP_META_CONTEXT);
            assert_eq!(&d[4..], BASE_ALLOCATION.as_bytes());
            assert_eq!(r.option_reply().await.1, REP_ACK);
        }
        r.option(OPT_GO, &info_request(name, &[])).await;
        let mut size_flags = None;
        loop {
            let (_, t, d) = r.option_reply().await;
            match t {
                REP_INFO => {
                    let mut rd = Reader::new(&d);
                    if rd.u16() == Some(INFO_EXPORT) {
                        size_flags = Some((rd.u64().unwrap(), rd.u16().unwrap()));
                    }
                }
                REP_ACK => break,
                other => panic!("GO {name}: reply {other:#x}"),
            }
        }
        let (size, flags) = size_flags.unwrap();
        (r, size, flags)
    }

    pub async fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) {
        let req = Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        self.send(&req.encode()).await;
    }

    /// (error, cookie)
    pub async fn simple_reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        within(10, self.s.read_exact(&mut h)).await.unwrap();
        let mut r = Reader::new(&h);
        assert_eq!(r.u32(), Some(SIMPLE_REPLY_MAGIC));
        (r.u32().unwrap(), r.u64().unwrap())
    }

    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        within(10, self.s.read_exact(&mut b)).await.unwrap();
        b
    }

    pub async fn chunk(&mut self) -> Chunk {
        let mut h = [0u8; 20];
        within(10, self.s.read_exact(&mut h)).await.unwrap();
        let mut r = Reader::new(&h);
        assert_eq!(r.u32(), Some(STRUCTURED_REPLY_MAGIC));
        let (flags, typ, cookie, len) = (
            r.u16().unwrap(),
            r.u16().unwrap(),
            r.u64().unwrap(),
            r.u32().unwrap(),
        );
        let payload = self.read_exact(len as usize).await;
        Chunk {
            flags,
            typ,
            cookie,
            payload,
        }
    }

    /// Whether the server closes the connection (within `secs`), reading and discarding
    /// anything it still sends.
    pub async fn closed_within(&mut self, secs: u64) -> bool {
        let mut buf = [0u8; 4096];
        let wait = async {
            loop {
                match self.s.read(&mut buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => continue,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(secs), wait)
            .await
            .unwrap_or(false)
    }
}

pub fn info_request(name: &str, reqs: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
    for r in reqs {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

pub fn meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Checks that the server still serves a well-behaved client on `name`: GO, READ.
pub async fn still_serves(path: &Path, name: &str) {
    let (mut r, size, _) = Raw::go(path, name, false, false).await;
    assert!(size >= 4096);
    r.request(0, CMD_READ, 77, 0, 4096).await;
    assert_eq!(r.simple_reply().await, (0, 77));
    r.read_exact(4096).await;
    r.request(0, CMD_DISC, 78, 0, 0).await;
    assert!(r.closed_within(5).await);
}
