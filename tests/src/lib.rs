//! Shared helpers for the integration tests: start the real `splitvmm` binary with its real
//! children, talk to it over real sockets (raw, or through the Python `qemu.qmp` client),
//! and inspect the process tree through `/proc`.

pub mod guest;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The directory holding `splitvmm`, `block-proc` and `vmm-proc` (cargo's target dir).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/<test> → target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// The repository root (for `tests/py`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "splitvmm-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
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

/// Whether `what`, which `test` needs, is `present`. Without it the test may skip only
/// outside CI, and says so.
pub fn present_or_skip(test: &str, what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: {what} is missing, and CI is set"
    );
    eprintln!("SKIPPED {test}: {what} is missing");
    false
}

/// Whether tests that need `/dev/kvm` can run; without it they skip (outside CI only).
pub fn kvm_or_skip(test: &str) -> bool {
    present_or_skip(test, "/dev/kvm", Path::new("/dev/kvm").exists())
}

/// Whether `qemu-system-x86_64` can run; without it tests skip (outside CI only).
pub fn qemu_system_or_skip(test: &str) -> bool {
    let found = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    present_or_skip(test, "qemu-system-x86_64", found)
}

/// Runs a command to completion and checks it succeeded.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A hostile peer's report of one finding (`PROGRAM: NAME: RESULT`), written whole in one
/// `write`: the monitor logs to the same stderr, and `eprintln!` writes a formatted line in
/// pieces that its lines can split.
pub fn say(program: &str, name: &str, result: impl std::fmt::Display) {
    use std::io::Write;
    let line = format!("{program}: {name}: {result}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// `qemu-img create -f FMT PATH SIZE`.
pub fn qemu_img_create(fmt: &str, path: &Path, size: &str) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", fmt])
        .arg(path)
        .arg(size));
}

/// `qemu-img create -f qcow2 -F BACKING_FMT -b BACKING PATH [SIZE]`: a qcow2 overlay. A
/// relative BACKING is taken, as qemu-img takes it, relative to PATH's directory.
pub fn qemu_img_overlay(
    path: impl AsRef<std::ffi::OsStr>,
    backing: impl AsRef<std::ffi::OsStr>,
    backing_fmt: &str,
    size: Option<&str>,
) {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-F", backing_fmt, "-b"])
        .arg(backing)
        .arg(path);
    if let Some(size) = size {
        cmd.arg(size);
    }
    run(&mut cmd);
}

/// The bytes of an image as a guest sees them: a raw file as it is, any other format
/// converted to raw by `qemu-img` (into `dir`).
pub fn image_bytes(path: &Path, format: &str, dir: &TempDir) -> Vec<u8> {
    if format == "raw" {
        return std::fs::read(path).expect("read image");
    }
    let out = dir.join("converted.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", format, "-O", "raw"])
        .arg(path)
        .arg(&out));
    std::fs::read(out).expect("read converted image")
}

/// A running splitvmm with a QMP unix socket and a pidfile in its own scratch directory.
#[derive(Debug)]
pub struct Splitvmm {
    pub child: Child,
    pub dir: TempDir,
    pub qmp: PathBuf,
    pub pidfile: PathBuf,
    pub stderr: PathBuf,
}

impl Splitvmm {
    /// Starts splitvmm with `args` plus a QMP socket and a pidfile, and waits for the
    /// pidfile (written once every socket listens).
    pub fn start(args: &[&str]) -> Self {
        let dir = TempDir::new("vm");
        Self::start_in(dir, args)
    }

    /// Like [`start`](Self::start), in a given directory (to put images there first).
    pub fn start_in(dir: TempDir, args: &[&str]) -> Self {
        Self::start_in_env(dir, args, &[])
    }

    /// The embedded workload guest (`--kernel builtin:workload --append APPEND`, 128 MiB)
    /// with one `--drive`, its serial console in `serial.log` and `dir` as its image
    /// directory (so jobs may create targets there).
    pub fn start_workload(dir: TempDir, append: &str, drive: &str) -> Self {
        let serial = format!("file:{}", dir.join("serial.log").display());
        let images = dir.path().display().to_string();
        let args = [
            "--kernel",
            "builtin:workload",
            "--append",
            append,
            "--memory",
            "128M",
            "--serial",
            &serial,
            "--image-dir",
            &images,
            "--drive",
            drive,
        ];
        Self::start_in(dir, &args)
    }

    /// Like [`start_in`](Self::start_in), with extra environment variables (e.g.
    /// `SPLITVMM_HELPER_DIR` to put a test program in a child's slot).
    pub fn start_in_env(dir: TempDir, args: &[&str], env: &[(&str, &Path)]) -> Self {
        Self::spawn(dir, &[], args, env)
    }

    /// Like [`start_in`](Self::start_in), splitvmm run by `prefix`, a command that execs
    /// its arguments in the same process (e.g. `ip netns exec NS`).
    pub fn start_prefixed(dir: TempDir, prefix: &[&str], args: &[&str]) -> Self {
        Self::spawn(dir, prefix, args, &[])
    }

    fn spawn(dir: TempDir, prefix: &[&str], args: &[&str], env: &[(&str, &Path)]) -> Self {
        let qmp = dir.join("qmp.sock");
        let pidfile = dir.join("splitvmm.pid");
        let stderr = dir.join("stderr.log");
        let bin = bin_dir().join("splitvmm");
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let child = cmd
            .envs(env.iter().copied())
            .args(args)
            .arg("--qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("--pidfile")
            .arg(&pidfile)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("start splitvmm");
        let mut vm = Self {
            child,
            dir,
            qmp,
            pidfile,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !vm.pidfile.exists() {
            if let Ok(Some(st)) = vm.child.try_wait() {
                panic!(
                    "splitvmm exited during start-up ({st}): {}",
                    vm.stderr_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no pidfile after 30 s: {}",
                vm.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        vm
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for splitvmm to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "splitvmm did not exit in {timeout:?}: {}",
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A negotiated raw QMP connection.
    pub fn raw_qmp(&self) -> RawQmp {
        let mut c = RawQmp::connect(&self.qmp);
        c.negotiate();
        c
    }

    /// Runs a Python script from `tests/py` with this splitvmm's socket as first argument.
    pub fn python(&self, script: &str, args: &[&str]) -> std::process::Output {
        Command::new("python3")
            .arg(repo_root().join("tests/py").join(script))
            .arg(&self.qmp)
            .args(args)
            .output()
            .expect("run python3")
    }
}

impl Drop for Splitvmm {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A QMP client on a raw socket, for what a well-behaved client would never send.
#[derive(Debug)]
pub struct RawQmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events read while waiting for a reply, for [`RawQmp::event`].
    events: std::collections::VecDeque<Value>,
}

impl RawQmp {
    /// Connects and reads the greeting.
    pub fn connect(path: &Path) -> Self {
        let s =
            UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut c = Self {
            reader: BufReader::new(s.try_clone().expect("clone")),
            writer: s,
            events: Default::default(),
        };
        let greeting = c.read_raw_line();
        assert!(
            greeting.ends_with("\r\n"),
            "greeting must end in CRLF: {greeting:?}"
        );
        c
    }

    pub fn negotiate(&mut self) {
        let r = self.cmd(r#"{"execute": "qmp_capabilities"}"#);
        assert_eq!(
            r["return"],
            serde_json::json!({}),
            "negotiation failed: {r}"
        );
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send");
    }

    /// Sends `bytes` in one message with `fds` as SCM_RIGHTS ancillary data (qemu.qmp's
    /// `send_fd_scm` sends a single space this way, then the command).
    pub fn send_with_fds(&mut self, bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        use std::os::fd::AsRawFd;
        let raw: Vec<_> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let sent = sendmsg::<()>(
            self.writer.as_raw_fd(),
            &[std::io::IoSlice::new(bytes)],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        assert_eq!(sent, bytes.len(), "short sendmsg");
    }

    /// One line exactly as the server wrote it.
    pub fn read_raw_line(&mut self) -> String {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .expect("read from splitvmm");
        assert!(n > 0, "splitvmm closed the connection");
        line
    }

    /// The next message (reply or event), parsed.
    pub fn read(&mut self) -> Value {
        let line = self.read_raw_line();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
    }

    /// The next reply; events read on the way are kept for [`RawQmp::event`].
    pub fn reply(&mut self) -> Value {
        loop {
            let v = self.read();
            if v.get("event").is_none() {
                return v;
            }
            self.events.push_back(v);
        }
    }

    /// Sends raw text and returns the next reply.
    pub fn cmd(&mut self, text: &str) -> Value {
        self.send(text.as_bytes());
        self.reply()
    }
}

/// The pids of `pid`'s children and their descendants (host pid namespace).
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut all = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        let path = format!("/proc/{p}/task/{p}/children");
        let kids: Vec<i32> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect();
        frontier.extend(&kids);
        all.extend(kids);
    }
    all
}

/// The `Name:` of a process.
pub fn proc_name(pid: i32) -> Option<String> {
    proc_status_field(pid, "Name")
}

/// A field of `/proc/PID/status`.
pub fn proc_status_field(pid: i32, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .map(|v| v.trim().to_string())
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    proc_status_field(pid, "State").is_some_and(|s| !s.starts_with('Z'))
}

/// Runs a command and returns its output, whatever its status.
pub fn output(cmd: &mut Command) -> std::process::Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// `qemu-io -c CMD... IMAGE` (image opened with `-f FMT`), checked to succeed.
pub fn qemu_io(fmt: &str, image: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(c.arg(image));
    assert!(
        !out.contains("error") && !out.contains("Pattern verification failed"),
        "qemu-io {cmds:?}: {out}"
    );
    out
}

impl RawQmp {
    /// Resumes a paused guest: `cont` answers `{}` and `RESUME` follows.
    pub fn cont(&mut self) {
        assert_eq!(
            self.ok("cont", serde_json::json!({})),
            serde_json::json!({})
        );
        self.event("RESUME");
    }

    /// Executes a command and returns its `return` value, failing the test on an error.
    pub fn ok(&mut self, execute: &str, arguments: Value) -> Value {
        let r = self.exec(execute, arguments.clone());
        match r.get("return") {
            Some(v) => v.clone(),
            None => panic!("{execute} {arguments} failed: {r}"),
        }
    }

    /// Executes a command and returns the reply (return or error).
    pub fn exec(&mut self, execute: &str, arguments: Value) -> Value {
        let msg = serde_json::json!({ "execute": execute, "arguments": arguments });
        self.cmd(&msg.to_string())
    }

    /// Executes a command expected to fail; returns (class, desc).
    pub fn err(&mut self, execute: &str, arguments: Value) -> (String, String) {
        let r = self.exec(execute, arguments.clone());
        let e = r
            .get("error")
            .unwrap_or_else(|| panic!("{execute} {arguments} succeeded: {r}"));
        (
            e["class"].as_str().unwrap_or_default().into(),
            e["desc"].as_str().unwrap_or_default().into(),
        )
    }

    /// Reads events up to and including the first named `last` (a reply fails the test);
    /// returns them all, in order.
    pub fn events_until(&mut self, last: &str) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let v = self.read();
            assert!(v.get("event").is_some(), "a reply nobody asked for: {v}");
            let done = v["event"] == last;
            seen.push(v);
            if done {
                return seen;
            }
        }
    }

    /// The next event: a kept one first, else the next read (a reply fails the test).
    pub fn next_event(&mut self) -> Value {
        if let Some(v) = self.events.pop_front() {
            return v;
        }
        let v = self.read();
        assert!(v.get("event").is_some(), "a reply nobody asked for: {v}");
        v
    }

    /// Reads messages until an event named `name` arrives; returns it.
    pub fn event(&mut self, name: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(i).unwrap_or_default();
        }
        loop {
            let v = self.read();
            if v.get("event").and_then(Value::as_str) == Some(name) {
                return v;
            }
        }
    }
}

/// A QMP connection that keeps every event it reads, in order: a test waits for events in
/// turn ([`EventLog::until`]) and can still look at the whole transcript afterwards.
#[derive(Debug)]
pub struct EventLog {
    qmp: RawQmp,
    log: Vec<Value>,
    /// Events before this index were already waited for.
    pos: usize,
}

impl EventLog {
    pub fn new(qmp: RawQmp) -> Self {
        Self {
            qmp,
            log: Vec::new(),
            pos: 0,
        }
    }

    /// Sends a command; returns the reply, keeping the events read before it.
    pub fn exec(&mut self, execute: &str, arguments: Value) -> Value {
        let msg = serde_json::json!({ "execute": execute, "arguments": arguments });
        self.qmp.send(msg.to_string().as_bytes());
        loop {
            let v = self.qmp.read();
            if v.get("event").is_some() {
                self.log.push(v);
            } else {
                return v;
            }
        }
    }

    /// Executes a command that must succeed; returns its `return`.
    pub fn ok(&mut self, execute: &str, arguments: Value) -> Value {
        let r = self.exec(execute, arguments.clone());
        r.get("return")
            .unwrap_or_else(|| panic!("{execute} {arguments}: {r}"))
            .clone()
    }

    /// Executes a command that must fail; returns (class, desc).
    pub fn err(&mut self, execute: &str, arguments: Value) -> (String, String) {
        let r = self.exec(execute, arguments.clone());
        let e = r
            .get("error")
            .unwrap_or_else(|| panic!("{execute} {arguments} succeeded: {r}"));
        (
            e["class"].as_str().unwrap_or_default().into(),
            e["desc"].as_str().unwrap_or_default().into(),
        )
    }

    /// Reads until an event after the last one waited for satisfies `want`; returns it.
    pub fn until(&mut self, want: impl Fn(&Value) -> bool) -> Value {
        loop {
            if let Some(i) = self.log[self.pos..].iter().position(&want) {
                self.pos += i + 1;
                return self.log[self.pos - 1].clone();
            }
            let v = self.qmp.read();
            assert!(v.get("event").is_some(), "unexpected reply {v}");
            self.log.push(v);
        }
    }

    /// The next event named `name` after the last one waited for.
    pub fn event(&mut self, name: &str) -> Value {
        self.until(|e| e["event"] == name)
    }

    /// Every event read so far, in order.
    pub fn events(&self) -> &[Value] {
        &self.log
    }
}

/// Waits until the text of `path` satisfies `done` (the file may not exist yet); returns
/// the text. Fails the test after `timeout`, showing what the file held.
pub fn wait_for_text(path: &Path, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if done(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} after {timeout:?}: {text:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `qemu-storage-daemon` with a QMP monitor on a unix socket: the reference the
/// differential tests compare splitvmm with.
#[derive(Debug)]
pub struct StorageDaemon {
    pub child: Child,
    pub qmp: PathBuf,
}

impl StorageDaemon {
    /// Starts qemu-storage-daemon with its QMP socket at `qmp` and waits for the socket.
    pub fn start(qmp: &Path) -> Self {
        Self::start_with(qmp, &[])
    }

    /// [`start`](Self::start) with more command-line arguments (`--blockdev ...`).
    pub fn start_with(qmp: &Path, extra: &[&str]) -> Self {
        let _ = std::fs::remove_file(qmp);
        let child = Command::new("qemu-storage-daemon")
            .arg("--chardev")
            .arg(format!(
                "socket,id=m,path={},server=on,wait=off",
                qmp.display()
            ))
            .args(["--monitor", "chardev=m"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start qemu-storage-daemon");
        let mut d = Self {
            child,
            qmp: qmp.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&d.qmp).is_err() {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("qemu-storage-daemon exited during start-up ({st})");
            }
            assert!(Instant::now() < deadline, "no qemu-storage-daemon socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// A negotiated QMP connection.
    pub fn raw_qmp(&self) -> RawQmp {
        let mut c = RawQmp::connect(&self.qmp);
        c.negotiate();
        c
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.qmp);
    }
}

/// A child process (an NBD server such as `qemu-nbd`) killed and reaped on drop.
#[derive(Debug)]
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `qemu-nbd` serving `image` (format `fmt`) as export `name` on the unix socket
/// `sock`, for up to 8 clients at once, read-only if `read_only`; waits until the export
/// answers (qemu-nbd listens before it opens and locks the image, so a socket that accepts
/// says nothing about the locks).
pub fn qemu_nbd(image: &Path, fmt: &str, name: &str, sock: &Path, read_only: bool) -> Reaped {
    let _ = std::fs::remove_file(sock);
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["--persistent", "--shared=8", "-f", fmt, "-x", name, "-k"])
        .arg(sock);
    if read_only {
        cmd.arg("--read-only");
    }
    let child = cmd
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-nbd");
    let mut r = Reaped(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    let uri = format!("nbd+unix:///{name}?socket={}", sock.display());
    loop {
        if let Ok(Some(st)) = r.0.try_wait() {
            panic!("qemu-nbd exited during start-up ({st})");
        }
        let ready = UnixStream::connect(sock).is_ok()
            && Command::new("qemu-img")
                .args(["info", "-f", "raw", &uri])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|st| st.success());
        if ready {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "qemu-nbd export {uri} never answered"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
