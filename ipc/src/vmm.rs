//! monitor ↔ vmm-proc: the VM configuration, run-state control and vmm-proc's events.
//!
//! ```text
//! monitor                              vmm-proc
//!   Hello ──────────────────────────────►
//!   ◄────────────────────────────── Hello
//!   VmmCall{id, Configure}               set up the VM, enter the jail
//!     + /dev/kvm [+ serial] [+ kernel] [+ initrd] ─►
//!   ◄───────────── VmmMessage::Reply{id}
//!   VmmCall{id, Stop | Cont | SystemReset} ►
//!   ◄── VmmMessage::Event(RunState | Reset)  (STOP / RESUME / RESET on the QMP side)
//!   ◄───────────── VmmMessage::Reply{id}
//!   ◄── VmmMessage::Event(GuestShutdown | Reset | GuestPanicked)   (the guest did it)
//!   VmmCall{id, ReconnectBlock} + data-path socket ─►   after a block-proc restart
//!   VmmCall{id, Shutdown} ──────────────►   stop, reply, exit
//! ```
//!
//! Events always precede the reply to the request that caused them, so a QMP client sees
//! STOP before `stop` returns, as with QEMU.

use serde::{Deserialize, Serialize};

use crate::block::OnError;
use crate::common::RunState;
use crate::{CallId, Message, QmpError};

/// A request to vmm-proc.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmmCall {
    pub id: CallId,
    pub request: VmmRequest,
}

impl Message for VmmCall {
    fn fd_count(&self) -> usize {
        match &self.request {
            VmmRequest::Configure(c) => {
                1 + usize::from(c.serial)
                    + usize::from(c.kernel == KernelImage::File)
                    + usize::from(c.initrd)
            }
            VmmRequest::ReconnectBlock | VmmRequest::MigrateOut(_) | VmmRequest::MigrateIn => 1,
            _ => 0,
        }
    }
}

/// What the monitor asks of vmm-proc.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum VmmRequest {
    /// First request: the VM's configuration. Descriptors travel with it in this order:
    /// `/dev/kvm`, the serial output (if `serial`), the kernel file (if `KernelImage::File`),
    /// the initramfs file (if `initrd`).
    Configure(VmmConfig),
    QueryStatus,
    Stop,
    Cont,
    /// QMP `system_reset`: reset the machine and reload the guest.
    SystemReset,
    /// The guest disks' I/O counters (`query-blockstats`).
    QueryBlockStats,
    /// Stop the vCPUs and exit.
    Shutdown,
    /// block-proc was restarted (crash recovery): the new data-path socket travels with
    /// the message. vmm-proc checks the new block-proc offers the same drives, hands it the
    /// guest's memory and sends it every request still in flight.
    ReconnectBlock,
    /// QMP `migrate`: stream the VM to the connected socket that travels with the message.
    MigrateOut(MigrationParams),
    /// New parameters for the migration under way (`migrate-set-parameters`).
    MigrateSetParams(MigrationParams),
    /// QMP `migrate_cancel`.
    MigrateCancel,
    /// The destination: load the VM from the connected socket that travels with the
    /// message (the VM must be in `inmigrate`).
    MigrateIn,
    /// QMP `query-migrate`.
    QueryMigrate,
}

/// The migration parameters vmm-proc uses (QMP `MigrationParameters`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationParams {
    /// Bytes per second; 0 means unlimited.
    pub max_bandwidth: u64,
    /// Milliseconds.
    pub downtime_limit: u64,
    /// Bytes per second the switch-over may assume; 0 means "the measured bandwidth".
    pub avail_switchover_bandwidth: u64,
}

impl Default for MigrationParams {
    /// QEMU's defaults: `MAX_THROTTLE` (128 MiB/s) and 300 ms.
    fn default() -> Self {
        Self {
            max_bandwidth: 128 << 20,
            downtime_limit: 300,
            avail_switchover_bandwidth: 0,
        }
    }
}

/// QAPI `MigrationStatus` (the states splitvmm uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationStatus {
    None,
    Setup,
    Active,
    /// The source stopped the guest and sends the rest (QEMU's `device` stage).
    Device,
    Cancelling,
    Cancelled,
    Completed,
    Failed,
}

impl MigrationStatus {
    pub fn as_qapi_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Setup => "setup",
            Self::Active => "active",
            Self::Device => "device",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
            Self::Completed => "completed",
            Self::Failed => "failed",
        }
    }

    /// Whether a migration is under way (a new one is refused).
    pub fn in_progress(self) -> bool {
        matches!(
            self,
            Self::Setup | Self::Active | Self::Device | Self::Cancelling
        )
    }
}

/// QAPI `MigrationStats` (`ram`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RamStats {
    pub transferred: u64,
    pub remaining: u64,
    pub total: u64,
    pub duplicate: u64,
    pub normal: u64,
    pub normal_bytes: u64,
    pub dirty_pages_rate: u64,
    pub mbps: f64,
    pub dirty_sync_count: u64,
    pub pages_per_second: u64,
    pub precopy_bytes: u64,
    pub downtime_bytes: u64,
}

/// What `query-migrate` reports (QAPI `MigrationInfo`), raw: the monitor picks the
/// members each state shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationInfo {
    pub status: Option<MigrationStatus>,
    pub setup_time: u64,
    pub total_time: u64,
    pub expected_downtime: u64,
    pub downtime: u64,
    pub ram: RamStats,
    pub error_desc: Option<String>,
}

/// Where the guest kernel comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KernelImage {
    /// An image embedded in splitvmm (`builtin:NAME`).
    Builtin(String),
    /// A file the monitor opened; its descriptor travels with the message.
    File,
}

/// vmm-proc's start-up configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmmConfig {
    pub memory_bytes: u64,
    pub cpus: u8,
    pub kernel: KernelImage,
    /// Whether an initramfs file descriptor travels with the message (`--initrd`).
    pub initrd: bool,
    pub cmdline: String,
    /// `--paused`: stay in `prelaunch` until `cont`.
    pub start_paused: bool,
    /// `--no-reboot`: a guest reset (i8042 reset line, triple fault) shuts down instead.
    pub no_reboot: bool,
    pub sandbox: bool,
    /// Whether a serial output descriptor travels with the message (`--serial null`: no).
    pub serial: bool,
    /// Each drive's `werror=` and `rerror=`, by drive id.
    pub error_policies: Vec<ErrorPolicy>,
    /// `--incoming`: wait in `inmigrate` for `MigrateIn` instead of booting.
    pub incoming: bool,
}

/// What a guest disk does when a request fails (`--drive werror=W,rerror=R`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorPolicy {
    pub id: String,
    pub werror: OnError,
    pub rerror: OnError,
}

/// vmm-proc to monitor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum VmmMessage {
    Reply {
        id: CallId,
        result: Result<VmmReply, QmpError>,
    },
    Event(VmmEvent),
}

impl Message for VmmMessage {}

/// Successful answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum VmmReply {
    Done,
    Status(RunState),
    BlockStats(Vec<DiskStats>),
    Migration(MigrationInfo),
}

/// One guest disk's I/O counters, as QEMU accounts them for `query-blockstats`:
/// write-zeroes counts as a write, discard as an unmap; requests the device refused as
/// malformed are `invalid`, requests the image failed are `failed` (their latency still
/// counts in the total time, QEMU's `account_failed`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStats {
    pub id: String,
    pub rd: OpStats,
    pub wr: OpStats,
    pub flush: OpStats,
    pub unmap: OpStats,
    /// The end of the furthest write, in bytes.
    pub wr_highest_offset: u64,
    /// Nanoseconds since the last completed request, if there was one.
    pub idle_ns: Option<u64>,
}

/// The counters of one kind of request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpStats {
    pub operations: u64,
    pub bytes: u64,
    pub total_time_ns: u64,
    pub failed: u64,
    pub invalid: u64,
}

/// Things vmm-proc reports unasked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum VmmEvent {
    /// The run state changed (the monitor emits STOP or RESUME).
    RunState(RunState),
    /// The machine was reset: by the guest (i8042 reset, triple fault) or by
    /// `system_reset`.
    Reset { guest: bool },
    /// The guest powered off by writing `code` to the debug-exit port (0 means PASS).
    /// The vCPUs are stopped; the monitor shuts splitvmm down.
    GuestShutdown { code: u32 },
    /// The guest reset itself (i8042 reset line, triple fault) under `--no-reboot`: the
    /// vCPUs are stopped and the monitor shuts splitvmm down (QEMU's SHUTDOWN reason
    /// `guest-reset`).
    GuestResetShutdown,
    /// The guest crashed (KVM internal error, failed entry); the vCPUs are
    /// stopped and the run state becomes `guest-panicked` right after.
    GuestPanicked,
    /// A guest disk request failed (QMP `BLOCK_IO_ERROR`). With `action` stop the run state
    /// becomes `io-error` right after, and `cont` retries the request.
    BlockIoError(BlockIoError),
    /// The migration's status changed (QMP `MIGRATION`).
    Migration(MigrationStatus),
    /// A dirty-bitmap sync (QMP `MIGRATION_PASS`), counted from 1.
    MigrationPass(u64),
}

/// A failed guest disk request and what was done about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockIoError {
    pub device: String,
    /// The node the drive's requests went to, if block-proc said.
    pub node_name: Option<String>,
    /// The disk's index (its place among the guest's virtio devices).
    pub index: u16,
    pub write: bool,
    pub action: ErrorAction,
    /// Whether the error was ENOSPC.
    pub nospace: bool,
    /// Whether the drive keeps an I/O status ([`OnError::keeps_io_status`]); QEMU reports
    /// `nospace` only for those.
    pub io_status: bool,
}

/// QAPI `BlockErrorAction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorAction {
    Ignore,
    Report,
    Stop,
}

impl ErrorAction {
    /// What `policy` does with an error (`nospace`: it was ENOSPC).
    pub fn of(policy: OnError, nospace: bool) -> Self {
        match policy {
            OnError::Report => Self::Report,
            OnError::Ignore => Self::Ignore,
            OnError::Stop => Self::Stop,
            OnError::Enospc if nospace => Self::Stop,
            OnError::Enospc => Self::Report,
        }
    }

    pub fn as_qapi_str(self) -> &'static str {
        match self {
            Self::Ignore => "ignore",
            Self::Report => "report",
            Self::Stop => "stop",
        }
    }
}
