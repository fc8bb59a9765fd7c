//! Block jobs (DESIGN.md §5; QMP reference §2, §3): QEMU's job state machine and verb
//! table (`job.c`), kept here as the same two tables; the events every transition sends;
//! auto-finalize and auto-dismiss; pausing at pause points; cancelling (soft and force);
//! rate limiting in 100 ms slices; the error policies; and the `block-job-*`, `job-*`,
//! `query-block-jobs` and `query-jobs` commands with QEMU's errors.
//!
//! - A [`Job`] runs its [`JobDriver`] on a tokio task. The driver calls the job's
//!   [`Job::sleep`] / [`Job::pause_point`] between pieces of work; that is where pauses and
//!   cancellation take effect, as in QEMU.
//! - Every state change goes through `JobState::transition`, which checks the
//!   transition table and sends `JOB_STATUS_CHANGE`.
//! - When `run` returns, the job completes as QEMU's `job_completed` does: waiting →
//!   pending → (finalize: the driver's `prepare` and `commit`, or `abort`) →
//!   `BLOCK_JOB_COMPLETED` / `BLOCK_JOB_CANCELLED` → concluded → null.
//! - [`dirty`]: the dirty bitmaps fed by every write to a node; [`mirror`]: the mirror job;
//!   [`stream`]: the stream job; [`commit`]: the commit jobs; [`chain`]: drives' backing
//!   chains and external snapshots.

pub mod chain;
pub mod commit;
pub mod dirty;
pub mod mirror;
pub mod stream;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use ipc::QmpError;
use ipc::common::ErrorClass;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::Notify;

/// QEMU's `BLOCK_JOB_SLICE_TIME`: the rate-limit slice, and how long an idle job sleeps.
pub const SLICE: Duration = Duration::from_millis(100);

/// QAPI `JobStatus`, in QEMU's order (the tables' column order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    Undefined,
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Undefined => "undefined",
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Ready => "ready",
            Self::Standby => "standby",
            Self::Waiting => "waiting",
            Self::Pending => "pending",
            Self::Aborting => "aborting",
            Self::Concluded => "concluded",
            Self::Null => "null",
        }
    }
}

/// `JobSTT[from][to]` of `job.c` (column order U C R P Y S W D X E N).
const TRANSITIONS: [[bool; 11]; 11] = {
    const O: bool = false;
    const I: bool = true;
    [
        /* U: */ [O, I, O, O, O, O, O, O, O, O, O],
        /* C: */ [O, O, I, O, O, O, O, O, I, O, I],
        /* R: */ [O, O, O, I, I, O, I, O, I, O, O],
        /* P: */ [O, O, I, O, O, O, O, O, O, O, O],
        /* Y: */ [O, O, O, O, O, I, I, O, I, O, O],
        /* S: */ [O, O, O, O, I, O, O, O, O, O, O],
        /* W: */ [O, O, O, O, O, O, O, I, I, O, O],
        /* D: */ [O, O, O, O, O, O, O, O, I, I, O],
        /* X: */ [O, O, O, O, O, O, O, O, I, I, O],
        /* E: */ [O, O, O, O, O, O, O, O, O, O, I],
        /* N: */ [O, O, O, O, O, O, O, O, O, O, O],
    ]
};

/// QAPI `JobVerb`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Cancel,
    Pause,
    Resume,
    SetSpeed,
    Complete,
    Finalize,
    Dismiss,
    Change,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cancel => "cancel",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::SetSpeed => "set-speed",
            Self::Complete => "complete",
            Self::Finalize => "finalize",
            Self::Dismiss => "dismiss",
            Self::Change => "change",
        }
    }
}

/// `JobVerbTable[verb][state]` of `job.c` (same column order).
const VERBS: [[bool; 11]; 8] = {
    const O: bool = false;
    const I: bool = true;
    [
        /* cancel:    */ [O, I, I, I, I, I, I, I, O, O, O],
        /* pause:     */ [O, I, I, I, I, I, O, O, O, O, O],
        /* resume:    */ [O, I, I, I, I, I, O, O, O, O, O],
        /* set-speed: */ [O, I, I, I, I, I, O, O, O, O, O],
        /* complete:  */ [O, O, O, O, I, I, O, O, O, O, O],
        /* finalize:  */ [O, O, O, O, O, O, O, I, O, O, O],
        /* dismiss:   */ [O, O, O, O, O, O, O, O, O, I, O],
        /* change:    */ [O, I, I, I, I, I, O, O, O, O, O],
    ]
};

/// QAPI `JobType` (the ones splitvmm runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobType {
    Commit,
    Stream,
    Mirror,
}

impl JobType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Commit => "commit",
            Self::Stream => "stream",
            Self::Mirror => "mirror",
        }
    }
}

/// QAPI `BlockdevOnError`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    #[default]
    Report,
    Ignore,
    Enospc,
    Stop,
    Auto,
}

/// What an error policy decided (`BlockErrorAction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    Ignore,
    Report,
    Stop,
}

impl ErrorAction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ignore => "ignore",
            Self::Report => "report",
            Self::Stop => "stop",
        }
    }
}

/// QAPI `BlockDeviceIoStatus` of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IoStatus {
    Ok,
    Failed,
    Nospace,
}

/// Where events go: block-proc's event queue to the monitor.
pub type EventSink = Arc<dyn Fn(&str, Value) + Send + Sync>;

/// Why a job's `run` ended without success.
#[derive(Debug)]
pub enum JobError {
    /// Force-cancelled: ends with `-ECANCELED`.
    Cancelled,
    /// An I/O error (`error` is `strerror`, as QEMU's).
    Io(std::io::Error),
    /// An error with its own message.
    Msg(String, i32),
}

/// A future the driver's `run` returns.
pub type RunFuture = Pin<Box<dyn Future<Output = Result<(), JobError>> + Send>>;

/// What a kind of job does (QEMU's `JobDriver` callbacks).
pub trait JobDriver: Send + Sync + 'static {
    /// The work. Returns when done, failed or cancelled.
    fn run(self: Arc<Self>, job: Arc<Job>) -> RunFuture;
    /// `.prepare`, on success before `commit`: an error fails the job.
    fn prepare(&self, _job: &Job) -> Result<(), String> {
        Ok(())
    }
    /// `.abort`, on failure or cancellation.
    fn abort(&self, _job: &Job) {}
    /// `.clean`, always, last.
    fn clean(&self, _job: &Job) {}
    /// `.cancel`: whether a cancel request is a force cancel (default: always).
    fn cancel(&self, _ready: bool, _force: bool) -> bool {
        true
    }
    /// `.complete`, if the job has one.
    fn complete(&self, _job: &Job) -> Option<Result<(), QmpError>> {
        None
    }
    /// Members of `query-block-jobs`' variant for this job type.
    fn query_extra(&self, _out: &mut Map<String, Value>) {}
    /// Nodes the job blocks besides its main one (`block_job_add_bdrv`: a mirror's
    /// target), until it has cleaned up.
    fn also_blocks(&self) -> Vec<String> {
        Vec::new()
    }
    /// `.change` (`block-job-change`, its arguments), if the job type has one.
    fn change(&self, _args: &Map<String, Value>) -> Result<(), QmpError> {
        Err(QmpError::generic("Job type does not support change"))
    }
}

/// Runs a job's asynchronous graph change from a synchronous callback (`prepare`), as
/// QEMU's main loop runs its graph changes: on block-proc's multi-threaded runtime the
/// worker hands its other tasks over meanwhile.
pub(crate) fn block_on<T>(fut: impl Future<Output = T>) -> T {
    let handle = tokio::runtime::Handle::current();
    crate::block::commit::blocking(|| handle.block_on(fut))
}

/// QEMU's `RateLimit` (`include/qemu/ratelimit.h`), counting bytes per [`SLICE`].
#[derive(Debug, Clone, Copy)]
struct RateLimit {
    quota: u64,
    slice_start: Instant,
    slice_end: Instant,
    dispatched: u64,
}

impl RateLimit {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            quota: 0,
            slice_start: now,
            slice_end: now,
            dispatched: 0,
        }
    }

    /// `ratelimit_set_speed(limit, speed, SLICE)`.
    fn set_speed(&mut self, speed: u64) {
        self.quota = if speed == 0 {
            0
        } else {
            (u128::from(speed) * SLICE.as_nanos() / 1_000_000_000).max(1) as u64
        };
    }

    /// `ratelimit_calculate_delay(limit, n)`.
    fn delay(&mut self, n: u64) -> Duration {
        if self.quota == 0 {
            return Duration::ZERO;
        }
        let now = Instant::now();
        if self.slice_end < now {
            // The next slice follows the last one when the job was only late to ask (a
            // timer's slack, a busy machine), so that lateness is not lost from the average
            // speed (QEMU loses it: about 8 % of `speed` on a loaded machine); after a
            // longer gap (the job was idle or paused) it starts now.
            let start = if now.duration_since(self.slice_end) < SLICE {
                self.slice_end
            } else {
                now
            };
            self.slice_start = start;
            self.slice_end = start + SLICE;
            self.dispatched = 0;
        }
        self.dispatched = self.dispatched.saturating_add(n);
        if self.dispatched < self.quota {
            return Duration::ZERO;
        }
        let slices = u32::try_from(self.dispatched / self.quota).unwrap_or(u32::MAX);
        self.slice_end = self.slice_start + SLICE.saturating_mul(slices);
        self.slice_end.saturating_duration_since(now)
    }
}

/// A job's mutable state (QEMU's `Job` fields).
#[derive(Debug)]
pub struct JobState {
    status: JobStatus,
    auto_finalize: bool,
    auto_dismiss: bool,
    speed: u64,
    limit: RateLimit,
    current: u64,
    remaining: u64,
    busy: bool,
    /// In [`Job::sleep`]: a kick makes it busy at once (QEMU's `job_enter`).
    sleeping: bool,
    pause_count: u32,
    user_paused: bool,
    /// Where a paused job goes back to.
    paused_from: Option<JobStatus>,
    cancelled: bool,
    force_cancel: bool,
    /// `run` returned (QEMU's `deferred_to_main_loop`).
    run_done: bool,
    ret: i32,
    error: Option<String>,
    iostatus: IoStatus,
}

/// One job. See the module documentation.
pub struct Job {
    pub id: String,
    pub kind: JobType,
    /// The node the op blocker names (the device name if it has one).
    pub blocked_node: String,
    driver: Arc<dyn JobDriver>,
    st: Mutex<JobState>,
    kick: Notify,
    jobs: Weak<Jobs>,
    events: EventSink,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// Every job, newest first (QEMU's job list order).
pub struct Jobs {
    list: Mutex<Vec<Arc<Job>>>,
    events: EventSink,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs").finish_non_exhaustive()
    }
}

/// What a new job is given.
#[derive(Debug)]
pub struct NewJob {
    pub id: String,
    pub kind: JobType,
    pub blocked_node: String,
    pub speed: i64,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn negative_speed() -> QmpError {
    QmpError::generic("Parameter 'speed' expects a non-negative value")
}

impl JobState {
    /// Running → paused, ready → standby (unless paused already).
    fn enter_pause(&mut self, job: &Job) {
        if matches!(self.status, JobStatus::Paused | JobStatus::Standby) {
            return;
        }
        let back = self.status;
        let to = if back == JobStatus::Ready {
            JobStatus::Standby
        } else {
            JobStatus::Paused
        };
        self.paused_from = Some(back);
        self.transition(job, to);
    }

    /// Back to the state before the pause (if paused).
    fn leave_pause(&mut self, job: &Job) {
        if !matches!(self.status, JobStatus::Paused | JobStatus::Standby) {
            return;
        }
        let back = self.paused_from.take().unwrap_or(JobStatus::Running);
        self.transition(job, back);
    }

    /// `job_state_transition_locked`: checks the table; sends JOB_STATUS_CHANGE.
    fn transition(&mut self, job: &Job, to: JobStatus) {
        let from = self.status;
        if !TRANSITIONS[from as usize][to as usize] {
            tracing::error!(
                "job {}: transition {} -> {} is not allowed",
                job.id,
                from.as_str(),
                to.as_str()
            );
        }
        self.status = to;
        if from != to {
            (job.events)(
                "JOB_STATUS_CHANGE",
                json!({ "id": job.id, "status": to.as_str() }),
            );
        }
    }

    /// `job_apply_verb_locked`.
    fn apply_verb(&self, job: &Job, verb: Verb) -> Result<(), QmpError> {
        if VERBS[verb as usize][self.status as usize] {
            return Ok(());
        }
        Err(QmpError::generic(format!(
            "Job '{}' in state '{}' cannot accept command verb '{}'",
            job.id,
            self.status.as_str(),
            verb.as_str()
        )))
    }

    fn is_ready(&self) -> bool {
        matches!(self.status, JobStatus::Ready | JobStatus::Standby)
    }

    /// `job_is_cancelled`: force-cancelled.
    fn is_cancelled(&self) -> bool {
        self.cancelled && self.force_cancel
    }
}

impl Job {
    fn state(&self) -> MutexGuard<'_, JobState> {
        lock(&self.st)
    }

    /// The job's speed (bytes per second, 0 = unlimited).
    pub fn speed(&self) -> u64 {
        self.state().speed
    }

    /// Force-cancelled (the driver should stop).
    pub fn is_cancelled(&self) -> bool {
        self.state().is_cancelled()
    }

    /// Any cancel was requested (soft ones included).
    pub fn cancel_requested(&self) -> bool {
        self.state().cancelled
    }

    pub fn is_ready(&self) -> bool {
        self.state().is_ready()
    }

    /// `job_progress_update`.
    pub fn progress(&self, n: u64) {
        let mut s = self.state();
        s.current += n;
        s.remaining = s.remaining.saturating_sub(n);
    }

    /// `job_progress_set_remaining`.
    pub fn set_remaining(&self, n: u64) {
        self.state().remaining = n;
    }

    /// `block_job_ratelimit_processed_bytes`.
    pub fn ratelimit_processed(&self, n: u64) {
        self.state().limit.delay(n);
    }

    /// `block_job_ratelimit_sleep`: sleeps (a pause point) until the rate allows more.
    pub async fn ratelimit_sleep(self: &Arc<Self>) {
        loop {
            let delay = self.state().limit.delay(0);
            self.sleep(delay).await;
            if delay.is_zero() || self.is_cancelled() {
                return;
            }
        }
    }

    /// `job_sleep_ns`: not busy for `d` (or until kicked), then a pause point.
    pub async fn sleep(self: &Arc<Self>, d: Duration) {
        // Registered before the state says "sleeping", so no kick is lost.
        let notified = self.kick.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        let sleep = {
            let mut s = self.state();
            // A pending pause is not slept through (QEMU's `job_sleep_ns`).
            let sleep = !s.is_cancelled() && !d.is_zero() && s.pause_count == 0;
            if sleep {
                s.busy = false;
                s.sleeping = true;
            } else {
                // Not asleep after all (though the READY transition said so).
                s.busy = true;
                s.sleeping = false;
            }
            sleep
        };
        if sleep {
            let _ = tokio::time::timeout(d, notified).await;
            let mut s = self.state();
            s.busy = true;
            s.sleeping = false;
        }
        self.pause_point().await;
    }

    /// `job_pause_point`: a pending pause takes effect here (running → paused, ready →
    /// standby) until the job is resumed.
    pub async fn pause_point(self: &Arc<Self>) {
        {
            let mut s = self.state();
            if s.pause_count == 0 || s.is_cancelled() {
                return;
            }
            // A pause command may have paused the sleeping job already.
            s.enter_pause(self);
            s.busy = false;
        }
        loop {
            let notified = self.kick.notified();
            {
                let mut s = self.state();
                if s.pause_count == 0 || s.is_cancelled() {
                    s.busy = true;
                    // ...and a resume command resumed it already.
                    s.leave_pause(self);
                    return;
                }
            }
            notified.await;
        }
    }

    /// Wakes the job from a sleep or a pause.
    pub fn kick(&self) {
        {
            let mut s = self.state();
            if s.sleeping {
                s.sleeping = false;
                s.busy = true;
            }
        }
        self.kick.notify_waiters();
    }

    /// `job_transition_to_ready`: JOB_STATUS_CHANGE ready, then BLOCK_JOB_READY.
    pub fn transition_to_ready(&self) {
        let mut s = self.state();
        if s.status != JobStatus::Running {
            return;
        }
        s.transition(self, JobStatus::Ready);
        // In sync, the mirror's next step is its ready-state sleep. QEMU's job is in that
        // sleep before its monitor can answer anything sent on the READY event (a query
        // sees `busy: false`, a pause makes it standby at once), so it counts as sleeping
        // from here; [`Job::sleep`] or [`Job::completed`] says otherwise if it does not.
        s.busy = false;
        s.sleeping = true;
        let data = self.event_data(&s);
        (self.events)("BLOCK_JOB_READY", data);
    }

    /// `block_job_error_action`: the policy's action, BLOCK_JOB_ERROR, and for `stop` a
    /// user pause with the io-status set.
    pub fn error_action(&self, policy: OnError, read: bool, errno: i32) -> ErrorAction {
        let action = match policy {
            OnError::Enospc | OnError::Auto if errno == libc::ENOSPC => ErrorAction::Stop,
            OnError::Enospc | OnError::Auto | OnError::Report => ErrorAction::Report,
            OnError::Stop => ErrorAction::Stop,
            OnError::Ignore => ErrorAction::Ignore,
        };
        (self.events)(
            "BLOCK_JOB_ERROR",
            json!({
                "device": self.id,
                "operation": if read { "read" } else { "write" },
                "action": action.as_str(),
            }),
        );
        if action == ErrorAction::Stop {
            let mut s = self.state();
            if !s.user_paused {
                s.user_paused = true;
                s.pause_count += 1;
            }
            s.iostatus = if errno == libc::ENOSPC {
                IoStatus::Nospace
            } else {
                IoStatus::Failed
            };
        }
        action
    }

    /// `{type, device, len, offset, speed}` of the job events.
    fn event_data(&self, s: &JobState) -> Value {
        json!({
            "type": self.kind.as_str(),
            "device": self.id,
            "len": s.current + s.remaining,
            "offset": s.current,
            "speed": s.speed,
        })
    }

    /// `job_completed_locked` after `run` returned.
    fn completed(self: &Arc<Self>, result: Result<(), JobError>) {
        let mut s = self.state();
        s.run_done = true;
        s.busy = false;
        s.sleeping = false;
        match result {
            Ok(()) => {}
            Err(JobError::Cancelled) => s.ret = -libc::ECANCELED,
            Err(JobError::Io(e)) => {
                s.ret = -e.raw_os_error().unwrap_or(libc::EIO);
                s.error = Some(ipc::common::os_error_text(&e));
            }
            Err(JobError::Msg(m, errno)) => {
                s.ret = -errno;
                s.error = Some(m);
            }
        }
        self.update_rc(&mut s);
        if s.ret != 0 {
            drop(s);
            self.finalize_abort();
            return;
        }
        s.transition(self, JobStatus::Waiting);
        s.transition(self, JobStatus::Pending);
        if !s.auto_finalize {
            (self.events)(
                "BLOCK_JOB_PENDING",
                json!({ "type": self.kind.as_str(), "id": self.id }),
            );
            return;
        }
        drop(s);
        self.do_finalize();
    }

    /// `job_update_rc_locked`.
    fn update_rc(&self, s: &mut JobState) {
        if s.ret == 0 && s.is_cancelled() {
            s.ret = -libc::ECANCELED;
        }
        if s.ret != 0 {
            if s.error.is_none() {
                s.error = Some(ipc::common::os_error_text(
                    &std::io::Error::from_raw_os_error(-s.ret),
                ));
            }
            s.transition(self, JobStatus::Aborting);
        }
    }

    /// `job_do_finalize_locked`: prepare, then commit or abort.
    fn do_finalize(self: &Arc<Self>) {
        if let Err(e) = self.driver.prepare(self) {
            let mut s = self.state();
            s.ret = -libc::EPERM;
            s.error = Some(e);
            self.update_rc(&mut s);
            drop(s);
            self.finalize_abort();
            return;
        }
        self.driver.clean(self);
        self.finalize_end();
    }

    /// Failure or cancellation: abort and clean (the job is in `aborting`).
    fn finalize_abort(self: &Arc<Self>) {
        self.driver.abort(self);
        self.driver.clean(self);
        self.finalize_end();
    }

    /// The end of `job_finalize_single_locked`: the completion event, concluded, and
    /// null with auto-dismiss.
    ///
    /// With auto-dismiss, concluded and null happen under the job list's lock (list, then
    /// state: the order queries take them in), as QEMU does them in one step of its main
    /// loop: a client that saw the completion event never finds the job afterwards.
    fn finalize_end(self: &Arc<Self>) {
        let jobs = self.jobs.upgrade();
        let mut list = jobs.as_ref().map(|j| lock(&j.list));
        let mut s = self.state();
        let mut data = self.event_data(&s);
        if s.is_cancelled() {
            (self.events)("BLOCK_JOB_CANCELLED", data);
        } else {
            if s.ret != 0
                && let (Some(obj), Some(e)) = (data.as_object_mut(), s.error.clone())
            {
                obj.insert("error".into(), e.into());
            }
            (self.events)("BLOCK_JOB_COMPLETED", data);
        }
        s.transition(self, JobStatus::Concluded);
        if s.auto_dismiss {
            if let Some(list) = list.as_mut() {
                list.retain(|j| !Arc::ptr_eq(j, self));
            }
            s.transition(self, JobStatus::Null);
            drop(s);
            drop(list);
            self.kick();
        }
    }

    /// `job_do_dismiss_locked`: null, and the job is gone.
    ///
    /// The job leaves the list while the list is locked and before the `null` event goes
    /// out, so a client that saw `null` never finds the job in `query-block-jobs`.
    fn dismiss(self: &Arc<Self>) {
        match self.jobs.upgrade() {
            Some(jobs) => {
                let mut list = lock(&jobs.list);
                list.retain(|j| !Arc::ptr_eq(j, self));
                self.state().transition(self, JobStatus::Null);
            }
            None => self.state().transition(self, JobStatus::Null),
        }
        self.kick();
    }

    /// `job_cancel_locked(job, force)` after the verb check.
    fn cancel(self: &Arc<Self>, force: bool) {
        let mut s = self.state();
        if s.status == JobStatus::Concluded {
            drop(s);
            self.dismiss();
            return;
        }
        let force = self.driver.cancel(s.is_ready(), force);
        if s.user_paused {
            s.user_paused = false;
            s.pause_count = s.pause_count.saturating_sub(1);
        }
        if !s.cancelled {
            s.cancelled = true;
            s.force_cancel = force;
        } else if force {
            s.force_cancel = true;
        }
        if s.run_done {
            // Waiting for finalization: a (force) cancel aborts it now.
            if s.is_cancelled() {
                self.update_rc(&mut s);
                drop(s);
                self.finalize_abort();
            }
            return;
        }
        drop(s);
        self.kick();
    }

    /// `query-block-jobs`' `BlockJobInfo`.
    fn block_job_info(&self) -> Value {
        let s = self.state();
        let mut m = Map::new();
        m.insert("type".into(), self.kind.as_str().into());
        m.insert("device".into(), self.id.clone().into());
        m.insert("len".into(), (s.current + s.remaining).into());
        m.insert("offset".into(), s.current.into());
        m.insert("busy".into(), s.busy.into());
        m.insert("paused".into(), (s.pause_count > 0).into());
        m.insert("speed".into(), s.speed.into());
        let io = match s.iostatus {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::Nospace => "nospace",
        };
        m.insert("io-status".into(), io.into());
        m.insert("ready".into(), s.is_ready().into());
        m.insert("status".into(), s.status.as_str().into());
        m.insert("auto-finalize".into(), s.auto_finalize.into());
        m.insert("auto-dismiss".into(), s.auto_dismiss.into());
        if s.ret != 0
            && let Some(e) = &s.error
        {
            m.insert("error".into(), e.clone().into());
        }
        drop(s);
        self.driver.query_extra(&mut m);
        Value::Object(m)
    }

    /// `query-jobs`' `JobInfo`.
    fn job_info(&self) -> Value {
        let s = self.state();
        let mut v = json!({
            "id": self.id,
            "type": self.kind.as_str(),
            "status": s.status.as_str(),
            "current-progress": s.current,
            "total-progress": s.current + s.remaining,
        });
        if s.ret != 0
            && let (Some(obj), Some(e)) = (v.as_object_mut(), &s.error)
        {
            obj.insert("error".into(), e.clone().into());
        }
        v
    }
}

#[derive(Deserialize)]
struct DeviceArg {
    device: String,
}

#[derive(Deserialize)]
struct IdArg {
    id: String,
}

#[derive(Deserialize)]
struct SetSpeedArgs {
    device: String,
    speed: i64,
}

#[derive(Deserialize)]
struct CancelArgs {
    device: String,
    force: Option<bool>,
}

fn decode<T: serde::de::DeserializeOwned>(command: &str, arguments: &str) -> Result<T, QmpError> {
    serde_json::from_str(arguments).map_err(|e| {
        QmpError::generic(format!(
            "{command}: arguments the schema let through do not decode: {e}"
        ))
    })
}

/// The commands [`Jobs::execute`] answers.
pub const COMMANDS: &[&str] = &[
    "query-block-jobs",
    "query-jobs",
    "block-job-set-speed",
    "block-job-cancel",
    "block-job-pause",
    "block-job-resume",
    "block-job-complete",
    "block-job-finalize",
    "block-job-dismiss",
    "block-job-change",
    "job-pause",
    "job-resume",
    "job-cancel",
    "job-complete",
    "job-finalize",
    "job-dismiss",
];

impl Jobs {
    pub fn new(events: EventSink) -> Arc<Self> {
        Arc::new(Self {
            list: Mutex::new(Vec::new()),
            events,
        })
    }

    fn list(&self) -> Vec<Arc<Job>> {
        lock(&self.list).clone()
    }

    /// The jobs a query shows: a job dismissed after the list was read is gone already.
    fn live(&self) -> impl Iterator<Item = Arc<Job>> {
        self.list()
            .into_iter()
            .filter(|j| j.state().status != JobStatus::Null)
    }

    /// `bdrv_op_is_blocked`: the job using `node` (its device name or node name), worded
    /// as QEMU's op blocker.
    pub fn check_blocker(&self, names: &[&str]) -> Result<(), QmpError> {
        for job in self.list() {
            let also = job.driver.also_blocks();
            if let Some(name) = names
                .iter()
                .find(|n| **n == job.blocked_node || also.iter().any(|a| a == **n))
            {
                return Err(QmpError::generic(format!(
                    "Node '{name}' is busy: block device is in use by block job: {}",
                    job.kind.as_str()
                )));
            }
        }
        Ok(())
    }

    /// Whether a mirror job uses the node (device) `name`, as its source or its target:
    /// QEMU has a node above it then (the mirror filter, the target's job node), so it is
    /// no longer a root node.
    pub fn in_mirror(&self, name: &str) -> bool {
        self.list().iter().any(|j| {
            j.kind == JobType::Mirror
                && (j.blocked_node == name || j.driver.also_blocks().iter().any(|a| a == name))
        })
    }

    /// Whether `name` is a node a job holds besides its main one (a mirror's target),
    /// which QEMU's `blockdev-del` finds in use.
    pub fn holds(&self, name: &str) -> bool {
        self.list()
            .iter()
            .any(|j| j.driver.also_blocks().iter().any(|a| a == name))
    }

    /// `job_create` + `block_job_create`'s checks (id, speed), then the job is listed in
    /// `created` and JOB_STATUS_CHANGE is sent. `driver` is made once the id is known good.
    pub fn create(
        self: &Arc<Self>,
        new: NewJob,
        driver: impl FnOnce() -> Result<Arc<dyn JobDriver>, QmpError>,
    ) -> Result<Arc<Job>, QmpError> {
        if !ipc::common::id_wellformed(&new.id) {
            return Err(QmpError::generic(format!("Invalid job ID '{}'", new.id)));
        }
        if self.list().iter().any(|j| j.id == new.id) {
            return Err(QmpError::generic(format!(
                "Job ID '{}' already in use",
                new.id
            )));
        }
        let driver = driver()?;
        let Ok(speed) = u64::try_from(new.speed) else {
            // QEMU has made the job by then: it appears and goes (created, null).
            for status in [JobStatus::Created, JobStatus::Null] {
                (self.events)(
                    "JOB_STATUS_CHANGE",
                    json!({ "id": new.id, "status": status.as_str() }),
                );
            }
            return Err(negative_speed());
        };
        let mut limit = RateLimit::new();
        limit.set_speed(speed);
        let job = Arc::new(Job {
            id: new.id,
            kind: new.kind,
            blocked_node: new.blocked_node,
            driver,
            st: Mutex::new(JobState {
                status: JobStatus::Undefined,
                auto_finalize: new.auto_finalize,
                auto_dismiss: new.auto_dismiss,
                speed,
                limit,
                current: 0,
                remaining: 0,
                busy: false,
                sleeping: false,
                pause_count: 0,
                user_paused: false,
                paused_from: None,
                cancelled: false,
                force_cancel: false,
                run_done: false,
                ret: 0,
                error: None,
                iostatus: IoStatus::Ok,
            }),
            kick: Notify::new(),
            jobs: Arc::downgrade(self),
            events: self.events.clone(),
        });
        job.state().transition(&job, JobStatus::Created);
        lock(&self.list).insert(0, job.clone());
        Ok(job)
    }

    /// `job_start`: running, and the driver's `run` on a task of its own.
    pub fn start(&self, job: &Arc<Job>) {
        {
            let mut s = job.state();
            s.busy = true;
            s.transition(job, JobStatus::Running);
        }
        let job = job.clone();
        tokio::spawn(async move {
            job.pause_point().await;
            let result = if job.is_cancelled() {
                Err(JobError::Cancelled)
            } else {
                job.driver.clone().run(job.clone()).await
            };
            job.completed(result);
        });
    }

    /// A block job by id (`find_block_job_locked`).
    fn block_job(&self, id: &str) -> Result<Arc<Job>, QmpError> {
        self.list().into_iter().find(|j| j.id == id).ok_or_else(|| {
            QmpError::new(
                ErrorClass::DeviceNotActive,
                format!("Block job '{id}' not found"),
            )
        })
    }

    /// A job by id (`find_job_locked`).
    fn job(&self, id: &str) -> Result<Arc<Job>, QmpError> {
        self.list()
            .into_iter()
            .find(|j| j.id == id)
            .ok_or_else(|| QmpError::generic("Job not found"))
    }

    /// Runs one of [`COMMANDS`].
    pub fn execute(&self, command: &str, arguments: &str) -> Result<Value, QmpError> {
        match command {
            "query-block-jobs" => {
                return Ok(self.live().map(|j| j.block_job_info()).collect());
            }
            "query-jobs" => return Ok(self.live().map(|j| j.job_info()).collect()),
            "block-job-set-speed" => {
                let a: SetSpeedArgs = decode(command, arguments)?;
                set_speed(&self.block_job(&a.device)?, a.speed)?;
            }
            "block-job-cancel" => {
                let a: CancelArgs = decode(command, arguments)?;
                let job = self.block_job(&a.device)?;
                let force = a.force.unwrap_or(false);
                let s = job.state();
                if s.user_paused && !force {
                    return Err(QmpError::generic(format!(
                        "The block job for device '{}' is currently paused",
                        a.device
                    )));
                }
                s.apply_verb(&job, Verb::Cancel)?;
                drop(s);
                job.cancel(force);
            }
            "block-job-pause" | "block-job-resume" | "block-job-complete" => {
                let a: DeviceArg = decode(command, arguments)?;
                let job = self.block_job(&a.device)?;
                match command {
                    "block-job-pause" => user_pause(&job)?,
                    "block-job-resume" => user_resume(&job)?,
                    _ => complete(&job)?,
                }
            }
            "block-job-change" => {
                let a: Map<String, Value> = decode(command, arguments)?;
                let id = a.get("id").and_then(Value::as_str).unwrap_or_default();
                let job = self.block_job(id)?;
                job.state().apply_verb(&job, Verb::Change)?;
                job.driver.change(&a)?;
            }
            "block-job-finalize" | "block-job-dismiss" => {
                let a: IdArg = decode(command, arguments)?;
                let job = self.block_job(&a.id)?;
                if command == "block-job-finalize" {
                    finalize(&job)?;
                } else {
                    dismiss(&job)?;
                }
            }
            "job-pause" | "job-resume" | "job-cancel" | "job-complete" | "job-finalize"
            | "job-dismiss" => {
                let a: IdArg = decode(command, arguments)?;
                let job = self.job(&a.id)?;
                match command {
                    "job-pause" => user_pause(&job)?,
                    "job-resume" => user_resume(&job)?,
                    "job-cancel" => {
                        job.state().apply_verb(&job, Verb::Cancel)?;
                        job.cancel(true);
                    }
                    "job-complete" => complete(&job)?,
                    "job-finalize" => finalize(&job)?,
                    _ => dismiss(&job)?,
                }
            }
            _ => {
                return Err(QmpError::command_not_found(format!(
                    "The command {command} has not been found"
                )));
            }
        }
        Ok(json!({}))
    }

    /// Cancels every job (force) and waits a little for them to end, for shutdown.
    pub async fn cancel_all(&self) {
        for job in self.list() {
            let cancellable = VERBS[Verb::Cancel as usize][job.state().status as usize];
            if cancellable {
                job.cancel(true);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.list().iter().any(|j| !j.state().run_done) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// `block_job_set_speed_locked`.
fn set_speed(job: &Arc<Job>, speed: i64) -> Result<(), QmpError> {
    let mut s = job.state();
    s.apply_verb(job, Verb::SetSpeed)?;
    let speed = u64::try_from(speed).map_err(|_| negative_speed())?;
    let old = s.speed;
    s.speed = speed;
    s.limit.set_speed(speed);
    drop(s);
    if speed == 0 || speed > old {
        job.kick();
    }
    Ok(())
}

/// `job_user_pause_locked`.
fn user_pause(job: &Arc<Job>) -> Result<(), QmpError> {
    let mut s = job.state();
    s.apply_verb(job, Verb::Pause)?;
    if s.user_paused {
        return Err(QmpError::generic("Job is already paused"));
    }
    s.user_paused = true;
    s.pause_count += 1;
    // `job_pause_locked` enters a sleeping job, which pauses at once: its
    // JOB_STATUS_CHANGE comes before the command's reply, as QEMU's.
    if s.sleeping {
        s.enter_pause(job);
    }
    drop(s);
    // To its pause point now, out of any sleep.
    job.kick();
    Ok(())
}

/// `job_user_resume_locked` (and `block_job_user_resume`: io-status back to ok).
fn user_resume(job: &Arc<Job>) -> Result<(), QmpError> {
    let mut s = job.state();
    if !s.user_paused {
        return Err(QmpError::generic("Can't resume a job that was not paused"));
    }
    s.apply_verb(job, Verb::Resume)?;
    s.iostatus = IoStatus::Ok;
    s.user_paused = false;
    s.pause_count = s.pause_count.saturating_sub(1);
    // `job_resume_locked` enters the job, which leaves its pause point at once.
    if s.pause_count == 0 {
        s.leave_pause(job);
    }
    drop(s);
    job.kick();
    Ok(())
}

/// `job_complete_locked`.
fn complete(job: &Arc<Job>) -> Result<(), QmpError> {
    let cannot = || {
        QmpError::generic(format!(
            "The active block job '{}' cannot be completed",
            job.id
        ))
    };
    let s = job.state();
    s.apply_verb(job, Verb::Complete)?;
    if s.cancelled {
        return Err(cannot());
    }
    drop(s);
    job.driver.complete(job).unwrap_or_else(|| Err(cannot()))?;
    job.kick();
    Ok(())
}

/// `job_finalize_locked`.
fn finalize(job: &Arc<Job>) -> Result<(), QmpError> {
    job.state().apply_verb(job, Verb::Finalize)?;
    job.do_finalize();
    Ok(())
}

/// `job_dismiss_locked`.
fn dismiss(job: &Arc<Job>) -> Result<(), QmpError> {
    job.state().apply_verb(job, Verb::Dismiss)?;
    job.dismiss();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_match_qemu() {
        use JobStatus::*;
        let allowed = |from: JobStatus| -> Vec<JobStatus> {
            [
                Undefined, Created, Running, Paused, Ready, Standby, Waiting, Pending, Aborting,
                Concluded, Null,
            ]
            .into_iter()
            .filter(|to| TRANSITIONS[from as usize][*to as usize])
            .collect()
        };
        assert_eq!(allowed(Created), [Running, Aborting, Null]);
        assert_eq!(allowed(Running), [Paused, Ready, Waiting, Aborting]);
        assert_eq!(allowed(Ready), [Standby, Waiting, Aborting]);
        assert_eq!(allowed(Pending), [Aborting, Concluded]);
        assert_eq!(allowed(Null), []);
        assert!(VERBS[Verb::Complete as usize][Ready as usize]);
        assert!(!VERBS[Verb::Complete as usize][Running as usize]);
        assert!(VERBS[Verb::Cancel as usize][Pending as usize]);
        assert!(!VERBS[Verb::Cancel as usize][Concluded as usize]);
        assert!(VERBS[Verb::Dismiss as usize][Concluded as usize]);
    }

    #[test]
    fn rate_limit_lets_one_request_through_then_waits() {
        let mut r = RateLimit::new();
        r.set_speed(1024 * 1024);
        assert_eq!(r.quota, 104_857);
        assert_eq!(r.delay(0), Duration::ZERO);
        r.delay(10 * 104_857);
        let d = r.delay(0);
        assert!(d > Duration::from_millis(800) && d <= Duration::from_millis(1000));
        r.set_speed(0);
        assert_eq!(r.delay(1 << 30), Duration::ZERO);
        r.set_speed(1);
        assert_eq!(r.quota, 1);
    }

    #[test]
    fn rate_limit_slices_follow_each_other_when_the_job_is_late() {
        let mut r = RateLimit::new();
        r.set_speed(10 * 104_858);
        let t0 = Instant::now();
        r.slice_start = t0 - SLICE - Duration::from_millis(5);
        r.slice_end = t0 - Duration::from_millis(5);
        r.dispatched = r.quota;
        let d = r.delay(r.quota);
        assert_eq!(
            r.slice_start,
            t0 - Duration::from_millis(5),
            "continues the last slice"
        );
        assert!(
            d <= SLICE - Duration::from_millis(5),
            "{d:?}: waits for the slice's end"
        );
        r.slice_end = t0 - 2 * SLICE;
        r.delay(0);
        assert!(r.slice_start >= t0, "after a long gap a slice starts now");
    }
}
