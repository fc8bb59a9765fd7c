//! The supervisor: brings the processes up in order, watches them, and takes everything
//! down cleanly.
//!
//! Start-up: bind the QMP sockets → start block-proc (and vmm-proc with `--kernel`) through
//! the launcher → handshake and configure each → write the pidfile → jail the monitor →
//! serve QMP. Shutdown (quit, a signal, or a child's death): SHUTDOWN event → ask the
//! children to exit, kill those that do not → stop the launcher → flush every QMP client →
//! remove the sockets and the pidfile.
//!
//! A block-proc death is recovered instead when [`crate::recovery`] allows it: the jobs it
//! ran end in error, the launcher starts a new block-proc (jailed as the first), the
//! monitor configures it and replays the journal, and vmm-proc is handed the new data path
//! and sends it the guest requests still in flight. The guest meanwhile stops in
//! `io-error` (vmm-proc's doing) until `cont`.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ipc::block::{BlockConfig, BlockReply, BlockRequest};
use ipc::common::RunState;
use ipc::launcher::{ChildKind, ExitStatus, LaunchRequest, LauncherMessage};
use ipc::vmm::{ErrorPolicy, KernelImage, VmmConfig, VmmEvent, VmmRequest};
use ipc::{AsyncChannel, Channel, IpcError, Link};
use nix::unistd::Pid;
use serde_json::json;
use tokio::sync::{mpsc, watch};

use crate::cli::{Cli, Kernel, Serial};
use crate::events::{EventBus, VENDOR_PREFIX};
use crate::link::{self, RpcClient};
use crate::server::{Listener, Sessions};
use crate::state::{Monitor, ShutdownCause, ThreadQuery};

/// How long a child gets to exit after being asked before it is killed.
const CHILD_EXIT_GRACE: Duration = Duration::from_secs(5);
/// How long each step of restarting block-proc may take.
const RESTART_STEP: Duration = Duration::from_secs(30);

/// A fatal start-up or runtime problem, said once on stderr.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("{0}")]
    Start(String),
    #[error("launcher link: {0}")]
    Launcher(#[from] IpcError),
}

/// The launcher's end as the supervisor sees it: spawn replies come back in order on one
/// queue, exits on another, thread lists on a third (for [`ThreadQuery`]).
struct Launcher {
    chan: Arc<AsyncChannel>,
    spawned: mpsc::UnboundedReceiver<Result<i32, String>>,
    exits: mpsc::UnboundedReceiver<(ChildKind, i32, ExitStatus)>,
    threads: Option<mpsc::UnboundedReceiver<Vec<(String, i32)>>>,
}

impl Launcher {
    fn start(chan: AsyncChannel) -> Self {
        let chan = Arc::new(chan);
        let (spawn_tx, spawned) = mpsc::unbounded_channel();
        let (exit_tx, exits) = mpsc::unbounded_channel();
        let (threads_tx, threads) = mpsc::unbounded_channel();
        let reader = chan.clone();
        tokio::spawn(async move {
            loop {
                match reader.recv::<LauncherMessage>().await.map(|r| r.msg) {
                    Ok(LauncherMessage::Spawned { pid, .. }) => {
                        let _ = spawn_tx.send(Ok(pid));
                    }
                    Ok(LauncherMessage::SpawnFailed { error, .. }) => {
                        let _ = spawn_tx.send(Err(error));
                    }
                    Ok(LauncherMessage::Exited { kind, pid, status }) => {
                        let _ = exit_tx.send((kind, pid, status));
                    }
                    Ok(LauncherMessage::Threads { threads }) => {
                        let _ = threads_tx.send(threads);
                    }
                    Err(e) => {
                        tracing::debug!("launcher link closed: {e}");
                        break;
                    }
                }
            }
        });
        Self {
            chan,
            spawned,
            exits,
            threads: Some(threads),
        }
    }

    /// The handle QMP commands use to ask for a child's threads (once).
    fn thread_query(&mut self) -> Option<ThreadQuery> {
        Some(ThreadQuery::new(self.chan.clone(), self.threads.take()?))
    }

    async fn spawn(
        &mut self,
        kind: ChildKind,
        sandbox: bool,
        fds: &[OwnedFd],
    ) -> Result<i32, SupervisorError> {
        let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
        let req = LaunchRequest::Spawn {
            kind,
            peer_link: fds.len() == 2,
            sandbox,
        };
        self.chan.send(&req, &borrowed).await?;
        match self.spawned.recv().await {
            Some(Ok(pid)) => Ok(pid),
            Some(Err(e)) => Err(SupervisorError::Start(e)),
            None => Err(SupervisorError::Launcher(IpcError::Closed)),
        }
    }
}

/// The processes that are running, by kind and pid.
#[derive(Debug, Default)]
struct Children(Vec<(ChildKind, i32)>);

fn describe(status: ExitStatus) -> (String, serde_json::Value) {
    match status {
        ExitStatus::Code(c) => (format!("exited with status {c}"), json!({ "exit-code": c })),
        ExitStatus::Signal(s) => {
            let name = nix::sys::signal::Signal::try_from(s)
                .map(|s| s.as_str())
                .unwrap_or("unknown");
            (
                format!("was killed by signal {s} ({name})"),
                json!({ "signal": name, "signal-number": s }),
            )
        }
    }
}

/// Runs splitvmm until it shuts down. `launcher` is the monitor's end of the link to the
/// already forked launcher process.
pub async fn run(cli: Cli, host: HostFiles, launcher: Channel, launcher_pid: Pid) -> ExitCode {
    let launcher = match AsyncChannel::new(launcher) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("splitvmm: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = launcher.handshake(Link::Launcher).await {
        eprintln!("splitvmm: cannot reach the launcher: {e}");
        return ExitCode::FAILURE;
    }
    let mut launcher = Launcher::start(launcher);
    let mut children = Children::default();
    let mut cleanup = Cleanup::default();
    if let Some(tmp) = &host.pidfile_tmp {
        cleanup.add(tmp.clone());
    }
    let (shutdown_tx, mut shutdown_rx) = mpsc::unbounded_channel();
    let (closing_tx, closing_rx) = watch::channel(false);
    let sessions = Sessions::new(closing_rx);

    let mut signals = match crate::signals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("splitvmm: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = start(
        &cli,
        host,
        &mut launcher,
        &mut children,
        &mut cleanup,
        shutdown_tx,
    )
    .await;
    let (code, cause) = match started {
        Err(e) => {
            eprintln!("splitvmm: {e}");
            (ExitCode::FAILURE, None)
        }
        Ok((monitor, listeners)) => {
            for l in listeners {
                tokio::spawn(l.serve(monitor.clone(), sessions.clone()));
            }
            let cause = loop {
                tokio::select! {
                    Some(cause) = shutdown_rx.recv() => break cause,
                    () = signals.wait() => break ShutdownCause::Signal,
                    Some((kind, pid, status)) = launcher.exits.recv() => {
                        children.0.retain(|c| c.1 != pid);
                        let (text, mut data) = describe(status);
                        data["process"] = kind.name().into();
                        data["pid"] = pid.into();
                        monitor.events.emit(&format!("{VENDOR_PREFIX}CHILD_EXITED"), Some(data));
                        if kind == ChildKind::Block {
                            match monitor.recovery.begin() {
                                Ok(config) => {
                                    eprintln!("splitvmm: block-proc (pid {pid}) {text}; restarting it");
                                    match restart_block(config, cli.sandbox, &mut launcher, &mut children, &monitor).await {
                                        Ok(()) => continue,
                                        Err(e) => eprintln!("splitvmm: cannot restart block-proc: {e}; shutting down"),
                                    }
                                }
                                Err(why) => eprintln!("splitvmm: block-proc (pid {pid}) {text}; not restarted ({why}); shutting down"),
                            }
                        } else {
                            eprintln!("splitvmm: {} (pid {pid}) {text}; shutting down", kind.name());
                        }
                        break ShutdownCause::ChildDied;
                    }
                }
            };
            // Like QEMU's exit path: SHUTDOWN, and no STOP for the final stop.
            monitor.events.emit(
                "SHUTDOWN",
                Some(json!({ "guest": cause.guest(), "reason": cause.reason() })),
            );
            stop_children(&monitor).await;
            monitor.nbd.stopped();
            let code = if cause.success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
            (code, Some(cause))
        }
    };
    reap(&mut launcher, &mut children).await;
    let _ = launcher.chan.send(&LaunchRequest::Exit, &[]).await;
    let _ = tokio::task::spawn_blocking(move || nix::sys::wait::waitpid(launcher_pid, None)).await;
    let _ = closing_tx.send(true);
    sessions.drain().await;
    cleanup.run();
    tracing::debug!(?cause, "shut down");
    code
}

/// Files splitvmm created and removes at exit.
#[derive(Debug, Default)]
pub struct Cleanup(Vec<PathBuf>);

impl Cleanup {
    pub fn add(&mut self, p: PathBuf) {
        self.0.push(p);
    }
    /// `old` was renamed to `new`.
    fn replace(&mut self, old: &std::path::Path, new: PathBuf) {
        self.0.retain(|p| p != old);
        self.0.push(new);
    }
    fn run(&mut self) {
        for p in self.0.drain(..) {
            if let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!("cannot remove {}: {e}", p.display());
            }
        }
    }
}

async fn start(
    cli: &Cli,
    mut host: HostFiles,
    launcher: &mut Launcher,
    children: &mut Children,
    cleanup: &mut Cleanup,
    shutdown: mpsc::UnboundedSender<ShutdownCause>,
) -> Result<(Arc<Monitor>, Vec<Listener>), SupervisorError> {
    let mut listeners = Vec::new();
    for addr in &cli.qmp {
        let l = Listener::bind(addr).map_err(|e| SupervisorError::Start(format!("--qmp: {e}")))?;
        if let Some(p) = l.path() {
            cleanup.add(p);
        }
        listeners.push(l);
    }
    // block-proc first: vmm-proc asks it for the drives during its own set-up.
    let (block, vmm_peer) =
        spawn_block(launcher, children, cli.sandbox, cli.kernel.is_some()).await?;
    let block = RpcClient::<link::Block>::new(block);
    let mut image_dirs = cli.image_dir.clone();
    for d in &cli.drive {
        let dir = std::path::absolute(&d.file)
            .ok()
            .and_then(|p| p.parent().map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("."));
        image_dirs.push(dir);
    }
    let config = BlockConfig {
        drives: cli.drive.clone(),
        image_dirs,
        sandbox: cli.sandbox,
        incoming: cli.incoming.is_some(),
    };
    let events = EventBus::default();
    let recovery = Arc::new(crate::recovery::Recovery::default());
    read_block_events(&block, &events, &recovery);
    recovery.set_config(config.clone());
    configure_block(&block, config)
        .await
        .map_err(SupervisorError::Start)?;

    let mut runstate = RunState::Running;
    let vmm = match (&cli.kernel, vmm_peer) {
        (Some(kernel), Some(peer_fd)) => {
            let (vmm_mon, vmm_child) =
                Channel::pair().map_err(|e| SupervisorError::Start(format!("socketpair: {e}")))?;
            // vmm-proc opens nothing: the monitor opened what it needs, before any jail.
            let fds = std::mem::take(&mut host.vmm_fds);
            let pid = launcher
                .spawn(ChildKind::Vmm, cli.sandbox, &[vmm_child.into_fd(), peer_fd])
                .await?;
            children.0.push((ChildKind::Vmm, pid));
            let vmm = connect::<link::Vmm>(vmm_mon, Link::MonitorVmm).await?;
            let config = VmmConfig {
                memory_bytes: cli.memory,
                cpus: cli.cpus,
                kernel: match kernel {
                    Kernel::Builtin(n) => KernelImage::Builtin(n.clone()),
                    Kernel::File(_) => KernelImage::File,
                },
                initrd: cli.initrd.is_some(),
                cmdline: cli.append.clone(),
                start_paused: cli.paused,
                no_reboot: cli.no_reboot,
                sandbox: cli.sandbox,
                serial: cli.serial != Serial::Null,
                error_policies: cli
                    .drive
                    .iter()
                    .map(|d| ErrorPolicy {
                        id: d.id.clone(),
                        werror: d.werror,
                        rerror: d.rerror,
                    })
                    .collect(),
                incoming: cli.incoming.is_some(),
            };
            if cli.incoming.is_some() {
                runstate = RunState::InMigrate;
            } else if cli.paused {
                runstate = RunState::Prelaunch;
            }
            Some((vmm, config, fds))
        }
        _ => None,
    };

    let mut monitor = Monitor::new(
        cli.name.clone(),
        events,
        block,
        vmm.as_ref().map(|v| v.0.clone()),
        runstate,
        shutdown,
    );
    monitor.cpus = if vmm.is_some() { cli.cpus } else { 0 };
    monitor.threads = launcher.thread_query();
    monitor.recovery = recovery;
    if cli.incoming.is_some() {
        monitor.migration.set_incoming();
    }
    let monitor = Arc::new(monitor);
    if let Some((vmm, config, fds)) = vmm {
        let reader = vmm.clone();
        let m = monitor.clone();
        tokio::spawn(async move {
            let e = reader.read_loop(|ev| vmm_event(&m, ev)).await;
            tracing::debug!("vmm-proc link closed: {e}");
        });
        let fds: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
        vmm.call(VmmRequest::Configure(config), &fds)
            .await
            .map_err(|e| SupervisorError::Start(format!("vmm-proc: {}", e.desc)))?;
    }

    // `--incoming URI` listens before the jail, like the QMP sockets.
    if let Some(uri) = cli.incoming.as_deref().filter(|u| *u != "defer") {
        crate::migration::listen_at_start(&monitor, uri)
            .await
            .map_err(|e| SupervisorError::Start(format!("--incoming {uri}: {e}")))?;
    }

    if cli.sandbox {
        crate::sandbox::enter(cli.runas)
            .map_err(|e| SupervisorError::Start(format!("sandbox: {e}")))?;
    } else {
        eprintln!("splitvmm: WARNING: --sandbox off: no process is confined. For debugging only.");
    }
    // The pidfile says "ready": it appears (renamed into place, which needs no open) only
    // once the monitor is jailed, just before the first client is accepted.
    if let (Some(tmp), Some(p)) = (host.pidfile_tmp.take(), &cli.pidfile) {
        std::fs::rename(&tmp, p)
            .map_err(|e| SupervisorError::Start(format!("--pidfile {}: {e}", p.display())))?;
        cleanup.replace(&tmp, p.clone());
    }
    Ok((monitor, listeners))
}

/// Checks an event block-proc asks the monitor to emit; `Some(data)` to emit it. block-proc
/// may be compromised, so it may only emit block and job events (`BLOCK_*`, `JOB_*`: never
/// `SHUTDOWN`, `STOP` or anything a client would act on for the VM), each with a JSON object
/// as its data, if any.
fn block_event(name: &str, data: Option<&str>) -> Option<Option<serde_json::Value>> {
    let well_formed = (name.starts_with("BLOCK_") || name.starts_with("JOB_"))
        && name.bytes().all(|b| b.is_ascii_uppercase() || b == b'_');
    if !well_formed {
        tracing::warn!("block-proc sent event {name:?}, which is not a block event; dropped");
        return None;
    }
    match data.map(serde_json::from_str::<serde_json::Value>) {
        None => Some(None),
        Some(Ok(v)) if v.is_object() => Some(Some(v)),
        Some(Ok(_)) => {
            tracing::warn!("block-proc sent event {name} with data that is no object; dropped");
            None
        }
        Some(Err(e)) => {
            tracing::warn!("block-proc sent event {name} with bad data ({e}); dropped");
            None
        }
    }
}

/// Starts block-proc through the launcher and makes the handshake. With `guest`, also the
/// data-path socketpair: block-proc gets one end, vmm-proc's end is returned.
async fn spawn_block(
    launcher: &mut Launcher,
    children: &mut Children,
    sandbox: bool,
    guest: bool,
) -> Result<(AsyncChannel, Option<OwnedFd>), SupervisorError> {
    let pair = || Channel::pair().map_err(|e| SupervisorError::Start(format!("socketpair: {e}")));
    let (block_mon, block_child) = pair()?;
    let mut block_fds = vec![block_child.into_fd()];
    let mut vmm_peer = None;
    if guest {
        let (vmm_end, block_end) = pair()?;
        block_fds.push(block_end.into_fd());
        vmm_peer = Some(vmm_end.into_fd());
    }
    let pid = launcher
        .spawn(ChildKind::Block, sandbox, &block_fds)
        .await?;
    children.0.push((ChildKind::Block, pid));
    drop(block_fds);
    let chan = handshake(block_mon, Link::MonitorBlock, "block-proc").await?;
    Ok((chan, vmm_peer))
}

/// Reads block-proc's link until it breaks: replies to their callers, events to QMP
/// clients (and to the recovery record).
fn read_block_events(
    block: &Arc<RpcClient<link::Block>>,
    events: &EventBus,
    recovery: &Arc<crate::recovery::Recovery>,
) {
    let (reader, bus, recovery) = (block.clone(), events.clone(), recovery.clone());
    tokio::spawn(async move {
        let e = reader
            .read_loop(|(name, data)| {
                if let Some(data) = block_event(&name, data.as_deref()) {
                    recovery.observe(&name, data.as_ref());
                    bus.emit(&name, data);
                }
            })
            .await;
        tracing::debug!("block-proc link closed: {e}");
    });
}

/// block-proc's first request: its drives and image directories (it then jails itself).
async fn configure_block(
    block: &RpcClient<link::Block>,
    config: BlockConfig,
) -> Result<(), String> {
    match block.call(BlockRequest::Configure(config), &[]).await {
        Ok(BlockReply::Done) => Ok(()),
        Ok(other) => Err(format!("block-proc: unexpected reply {other:?}")),
        Err(e) => Err(e.desc),
    }
}

/// Puts a new block-proc where the dead one was (see the module's documentation), and
/// reports it with `CHILD_RESTARTED`.
async fn restart_block(
    config: BlockConfig,
    sandbox: bool,
    launcher: &mut Launcher,
    children: &mut Children,
    monitor: &Arc<Monitor>,
) -> Result<(), String> {
    monitor.recovery.fail_jobs(monitor);
    let step = |what: &'static str| move |_| format!("{what} took over {RESTART_STEP:?}");
    let (chan, vmm_peer) = tokio::time::timeout(
        RESTART_STEP,
        spawn_block(launcher, children, sandbox, monitor.vmm.is_some()),
    )
    .await
    .map_err(step("starting block-proc"))?
    .map_err(|e| e.to_string())?;
    monitor.block.reattach(chan);
    read_block_events(&monitor.block, &monitor.events, &monitor.recovery);
    tokio::time::timeout(RESTART_STEP, configure_block(&monitor.block, config))
        .await
        .map_err(step("configuring block-proc"))??;
    tokio::time::timeout(RESTART_STEP, monitor.recovery.replay(monitor))
        .await
        .map_err(step("replaying the block configuration"))?
        .map_err(|e| e.desc)?;
    if let (Some(vmm), Some(peer)) = (&monitor.vmm, vmm_peer) {
        tokio::time::timeout(
            RESTART_STEP,
            vmm.call(VmmRequest::ReconnectBlock, &[peer.as_fd()]),
        )
        .await
        .map_err(step("reconnecting vmm-proc"))?
        .map_err(|e| format!("vmm-proc: {}", e.desc))?;
    }
    let pid = children
        .0
        .iter()
        .rev()
        .find(|c| c.0 == ChildKind::Block)
        .map_or(0, |c| c.1);
    eprintln!("splitvmm: block-proc restarted (pid {pid})");
    monitor.events.emit(
        &format!("{VENDOR_PREFIX}CHILD_RESTARTED"),
        Some(json!({ "process": "block-proc", "pid": pid })),
    );
    Ok(())
}

/// Turns what vmm-proc reports into QMP events and state.
fn vmm_event(m: &Monitor, ev: VmmEvent) {
    match ev {
        VmmEvent::RunState(s) => m.set_runstate(s),
        VmmEvent::Reset { guest } => {
            let reason = if guest {
                "guest-reset"
            } else {
                "host-qmp-system-reset"
            };
            m.events
                .emit("RESET", Some(json!({ "guest": guest, "reason": reason })));
        }
        VmmEvent::GuestShutdown { code } => m.request_shutdown(ShutdownCause::GuestShutdown(code)),
        VmmEvent::GuestResetShutdown => m.request_shutdown(ShutdownCause::GuestReset),
        // QEMU's order: GUEST_PANICKED, then STOP with the run state change that follows.
        VmmEvent::GuestPanicked => m
            .events
            .emit("GUEST_PANICKED", Some(json!({ "action": "pause" }))),
        // Likewise BLOCK_IO_ERROR, then STOP when the action stops the VM. As in QEMU's
        // blk_error_action, a stopping error sets the drive's io-status first.
        VmmEvent::BlockIoError(e) => {
            if e.action == ipc::vmm::ErrorAction::Stop {
                m.io_error(&e.device, e.nospace);
            }
            // QAPI member order: qom-path, device, node-name, operation, action, nospace,
            // reason.
            let mut data = json!({
                "qom-path": format!("/machine/peripheral-anon/device[{}]/virtio-backend", e.index),
                "device": e.device,
            });
            if let Some(node) = e.node_name {
                data["node-name"] = node.into();
            }
            data["operation"] = if e.write { "write" } else { "read" }.into();
            data["action"] = e.action.as_qapi_str().into();
            if e.io_status {
                data["nospace"] = e.nospace.into();
            }
            data["reason"] = if e.nospace {
                "No space left on device"
            } else {
                "Input/output error"
            }
            .into();
            m.events.emit("BLOCK_IO_ERROR", Some(data));
        }
        VmmEvent::Migration(status) => {
            m.migration.status_changed(status);
            if status == ipc::vmm::MigrationStatus::Completed {
                // The image locks moved: a restarted block-proc could not know who holds
                // them (a destination opened its drives without locks until now).
                m.recovery
                    .set_unreplayable("a migration moved the image locks");
            }
            if m.migration.events_on() {
                m.events
                    .emit("MIGRATION", Some(json!({ "status": status.as_qapi_str() })));
            }
        }
        VmmEvent::MigrationPass(pass) => {
            if m.migration.events_on() {
                m.events
                    .emit("MIGRATION_PASS", Some(json!({ "pass": pass })));
            }
        }
    }
}

/// What the monitor opens on the host, in `main` before it restricts its own file access
/// (see [`crate::sandbox`]): vmm-proc's descriptors, and the pidfile's first copy.
#[derive(Debug, Default)]
pub struct HostFiles {
    /// For vmm-proc, in the order it takes them: `/dev/kvm`, the serial output (unless
    /// `null`), the kernel file and the initramfs (with `--kernel FILE` and `--initrd`).
    /// Empty without `--kernel`.
    vmm_fds: Vec<OwnedFd>,
    /// The pidfile written beside its final name, renamed into place once the monitor is
    /// jailed (removed at exit if start-up fails first).
    pidfile_tmp: Option<PathBuf>,
}

impl HostFiles {
    /// Opens them; the error is a line for the user.
    pub fn open(cli: &Cli) -> Result<Self, String> {
        let mut host = HostFiles::default();
        if let Some(kernel) = &cli.kernel {
            host.vmm_fds.push(open_kvm()?);
            if let Some(serial) = open_serial(&cli.serial)? {
                host.vmm_fds.push(serial);
            }
            // The kernel and initramfs are read-only inputs: vmm-proc reads them at boot
            // and again at every reset, through these descriptors.
            let open_input = |option: &str, p: &PathBuf| {
                std::fs::File::open(p)
                    .map(OwnedFd::from)
                    .map_err(|e| format!("{option} {}: {e}", p.display()))
            };
            if let Kernel::File(p) = kernel {
                host.vmm_fds.push(open_input("--kernel", p)?);
            }
            if let Some(p) = &cli.initrd {
                host.vmm_fds.push(open_input("--initrd", p)?);
            }
        }
        if let Some(p) = &cli.pidfile {
            let mut tmp = p.clone().into_os_string();
            tmp.push(".tmp");
            let tmp = PathBuf::from(tmp);
            std::fs::write(&tmp, format!("{}\n", std::process::id()))
                .map_err(|e| format!("--pidfile {}: {e}", p.display()))?;
            host.pidfile_tmp = Some(tmp);
        }
        Ok(host)
    }

    /// Start-up failed before the supervisor ran: removes the pidfile's first copy.
    pub fn discard(self) {
        if let Some(tmp) = self.pidfile_tmp {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// `/dev/kvm`, opened for vmm-proc (which creates the VM itself).
fn open_kvm() -> Result<OwnedFd, String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(OwnedFd::from)
        .map_err(|e| {
            format!(
                "Could not access KVM kernel module: {}",
                ipc::common::os_error_text(&e)
            )
        })
}

/// Where the guest's serial output goes, opened here (vmm-proc never opens a path).
/// `file:` truncates, as QEMU's file chardev does.
fn open_serial(serial: &Serial) -> Result<Option<OwnedFd>, String> {
    match serial {
        Serial::Null => Ok(None),
        Serial::Stdio => std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .map(Some)
            .map_err(|e| format!("--serial stdio: {e}")),
        Serial::File(p) => std::fs::File::create(p)
            .map(|f| Some(f.into()))
            .map_err(|e| format!("--serial file:{}: {e}", p.display())),
    }
}

async fn connect<P: link::Protocol>(
    chan: Channel,
    which: Link,
) -> Result<Arc<RpcClient<P>>, SupervisorError> {
    Ok(RpcClient::new(handshake(chan, which, P::PEER).await?))
}

async fn handshake(
    chan: Channel,
    which: Link,
    peer: &str,
) -> Result<AsyncChannel, SupervisorError> {
    let chan = AsyncChannel::new(chan).map_err(|e| SupervisorError::Start(e.to_string()))?;
    chan.handshake(which)
        .await
        .map_err(|e| SupervisorError::Start(format!("{peer}: {e}")))?;
    Ok(chan)
}

/// Asks the children to exit: vmm-proc first (it stops using the disks), then block-proc.
async fn stop_children(monitor: &Monitor) {
    if let Some(vmm) = &monitor.vmm {
        let _ = tokio::time::timeout(CHILD_EXIT_GRACE, vmm.call(VmmRequest::Shutdown, &[])).await;
    }
    let _ = tokio::time::timeout(
        CHILD_EXIT_GRACE,
        monitor.block.call(BlockRequest::Shutdown, &[]),
    )
    .await;
}

/// Waits for every child to be reaped, killing those that outstay the grace period.
async fn reap(launcher: &mut Launcher, children: &mut Children) {
    let mut killed = false;
    while !children.0.is_empty() {
        match tokio::time::timeout(CHILD_EXIT_GRACE, launcher.exits.recv()).await {
            Ok(Some((_, pid, _))) => children.0.retain(|c| c.1 != pid),
            Ok(None) => break,
            Err(_) if !killed => {
                for (kind, pid) in &children.0 {
                    eprintln!(
                        "splitvmm: {} (pid {pid}) did not exit; killing it",
                        kind.name()
                    );
                    let _ = launcher
                        .chan
                        .send(&LaunchRequest::Kill { kind: *kind }, &[])
                        .await;
                }
                killed = true;
            }
            Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_proc_may_emit_only_block_and_job_events_with_object_data() {
        let data = r#"{"device": "d"}"#;
        assert_eq!(
            block_event("BLOCK_JOB_READY", Some(data)),
            Some(Some(json!({"device": "d"})))
        );
        assert_eq!(block_event("JOB_STATUS_CHANGE", None), Some(None));
        for name in ["SHUTDOWN", "STOP", "RESUME", "BLOCK_job", "BLOCK_\n", ""] {
            assert_eq!(block_event(name, Some(data)), None, "{name:?}");
        }
        for bad in ["{not json", "[1, 2]", "\"text\"", "7"] {
            assert_eq!(block_event("BLOCK_JOB_READY", Some(bad)), None, "{bad}");
        }
    }
}
