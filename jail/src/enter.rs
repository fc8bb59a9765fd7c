//! [`enter`]: the one call that jails the calling process, step by step in a fixed order;
//! and [`seccomp_mode`], which tests use to see a filter from outside.

use std::{fs, io, path::PathBuf};

use landlock::{
    ABI, Access, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus,
};
use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{self, CloneFlags},
    sys::{prctl, resource},
    unistd::{self, Pid},
};

use crate::{JailError, SeccompPolicy, seccomp, sigsys};

/// Directories Landlock leaves reachable, and how; every other path is denied. Landlock
/// restricts what a path is opened or changed for (read, write, create, remove, rename,
/// link, truncate, execute, device ioctls), not `stat` or `readlink`.
#[derive(Clone, Debug, Default)]
pub struct LandlockRules {
    /// Read, write, create and remove regular files and unix sockets beneath these.
    pub read_write: Vec<PathBuf>,
    /// Read files and list directories beneath these.
    pub read_only: Vec<PathBuf>,
    /// Create unix sockets (`bind`) and remove directory entries beneath these; nothing is
    /// read, written or made otherwise. Landlock cannot tell a socket's entry from a regular
    /// file's when removing, so the caller removes only what it checked is a socket (and
    /// files it created itself).
    pub sockets: Vec<PathBuf>,
    /// Rename a regular file into place beneath these (a pidfile written before the jail):
    /// create and remove entries of regular files, without reading or writing any.
    pub publish: Vec<PathBuf>,
}

/// How a process jails itself.
#[derive(Debug)]
pub struct Policy {
    /// Process name, used in the SIGSYS log line.
    pub name: &'static str,
    /// Replace `/` by an empty read-only tmpfs, in a new mount namespace.
    pub empty_root: bool,
    /// Restrict file access with Landlock.
    pub landlock: Option<LandlockRules>,
    /// Drop every capability: bounding, ambient, effective, permitted and inheritable sets.
    pub drop_caps: bool,
    /// Switch to this uid and gid, with no supplementary groups (`--runas UID:GID`), once
    /// the root and Landlock are in place (they need the capabilities the switch clears).
    /// Every thread switches (glibc's set*id calls reach them all).
    pub runas: Option<(u32, u32)>,
    /// The syscall allowlist, installed last.
    pub seccomp: SeccompPolicy,
}

/// How far Landlock could be enforced by the running kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LandlockStatus {
    /// Every requested restriction holds.
    FullyEnforced,
    /// The kernel's Landlock ABI is older: some rights (e.g. truncate) are not restricted.
    PartiallyEnforced,
    /// The kernel has no Landlock.
    NotEnforced,
}

/// What [`enter`] achieved where it is best-effort.
#[derive(Debug)]
#[must_use]
pub struct Jailed {
    /// `None` if the policy asked for no Landlock rules.
    pub landlock: Option<LandlockStatus>,
}

/// The Landlock ABI whose filesystem rights we handle (Linux 6.15, the ABI of our hosts).
const LANDLOCK_ABI: ABI = ABI::V7;

/// The directory the empty root's tmpfs is mounted on before `pivot_root`.
const EMPTY_ROOT_MOUNT_POINT: &str = "/tmp";

/// Jails the calling process. Call it after set-up and before reading untrusted input, while
/// the process is still single-threaded if the policy uses an empty root, Landlock or drops
/// capabilities (a mount namespace, Landlock and capabilities only apply to the calling
/// thread). Every descriptor open now stays: a child got only its own at spawn
/// ([`crate::spawn`] closes the rest), and the monitor made all it has. In order:
/// `no_new_privs`, empty root, Landlock, rlimits, bounding and ambient capabilities, uid and
/// gid (`runas`), the other capability sets, SIGSYS handler, seccomp filter on all threads.
pub fn enter(policy: &Policy) -> Result<Jailed, JailError> {
    // Compile first: a bad policy fails before anything irreversible happens.
    let program = policy.seccomp.compile()?;
    if policy.empty_root || policy.landlock.is_some() || policy.drop_caps {
        single_threaded(policy.name)?;
    }
    prctl::set_no_new_privs().map_err(step("prctl(PR_SET_NO_NEW_PRIVS)"))?;
    if policy.empty_root {
        enter_empty_root()?;
    }
    let landlock = policy
        .landlock
        .as_ref()
        .map(restrict_paths_of_this_thread)
        .transpose()?;
    // No core dumps: they would write guest memory and secrets to disk. RLIMIT_NPROC stays:
    // it counts every process and thread of the user, so a low value breaks thread creation
    // (tokio's blocking pool) and other processes of the same user; seccomp forbids fork.
    resource::setrlimit(resource::Resource::RLIMIT_CORE, 0, 0)
        .map_err(step("setrlimit(RLIMIT_CORE, 0)"))?;
    if policy.drop_caps {
        drop_bounding_and_ambient()?;
    }
    if let Some((uid, gid)) = policy.runas {
        switch_user(uid, gid)?;
    }
    if policy.drop_caps {
        set_capabilities(0)?;
    }
    sigsys::install(policy.name)?;
    seccomp::install(&program)?;
    tracing::debug!(name = policy.name, ?landlock, "jailed");
    Ok(Jailed { landlock })
}

/// The seccomp mode of process `pid` (0 none, 1 strict, 2 filter) from `/proc/PID/status`.
pub fn seccomp_mode(pid: Pid) -> io::Result<u32> {
    proc_status_field(&pid.to_string(), "Seccomp")
}

fn proc_status_field(pid: &str, key: &str) -> io::Result<u32> {
    let path = format!("/proc/{pid}/status");
    fs::read_to_string(&path)?
        .lines()
        .find_map(|line| {
            line.strip_prefix(key)?
                .strip_prefix(':')?
                .trim()
                .parse()
                .ok()
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no `{key}:` line in {path}"),
            )
        })
}

/// Maps an error of `step` (an io::Error or a nix Errno) to [`JailError::Enter`].
fn step<E: Into<io::Error>>(step: impl Into<String>) -> impl FnOnce(E) -> JailError {
    move |source| JailError::Enter {
        step: step.into(),
        source: source.into(),
    }
}

fn enter_empty_root() -> Result<(), JailError> {
    // pivot_root moves every process of the mount namespace whose root is the old root, so it
    // must happen in a namespace nobody else uses, even if the caller forgot
    // `Namespaces::mount`: a fresh one, unshared here (safe: we are single-threaded).
    sched::unshare(CloneFlags::CLONE_NEWNS).map_err(step("unshare(CLONE_NEWNS)"))?;
    let none = None::<&str>;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(step("making / recursively private (empty root)"))?;
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("tmpfs"),
        EMPTY_ROOT_MOUNT_POINT,
        Some("tmpfs"),
        hardened,
        Some("size=16k,mode=0555"),
    )
    .map_err(step(format!(
        "mounting a tmpfs on {EMPTY_ROOT_MOUNT_POINT}"
    )))?;
    unistd::chdir(EMPTY_ROOT_MOUNT_POINT)
        .map_err(step(format!("chdir({EMPTY_ROOT_MOUNT_POINT})")))?;
    // The old root ends up stacked on the new one at "."; detaching it leaves the tmpfs.
    unistd::pivot_root(".", ".").map_err(step("pivot_root into an empty root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step("detaching the old root (empty root)"))?;
    unistd::chdir("/").map_err(step("chdir(/) in the empty root"))?;
    mount(
        none,
        "/",
        none,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | hardened,
        none,
    )
    .map_err(step("remounting the empty root read-only"))?;
    let entries = fs::read_dir("/")
        .map_err(step("listing the empty root"))?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<io::Result<Vec<_>>>()
        .map_err(step("listing the empty root"))?;
    if !entries.is_empty() {
        return Err(JailError::RootNotEmpty(entries));
    }
    Ok(())
}

/// Fails unless the calling process has one thread: what applies to the calling thread only
/// (a mount namespace, Landlock, capabilities) would leave the others free.
fn single_threaded(name: &'static str) -> Result<(), JailError> {
    let threads =
        proc_status_field("self", "Threads").map_err(step("reading /proc/self/status"))?;
    if threads != 1 {
        return Err(JailError::Threaded { name, threads });
    }
    Ok(())
}

/// Restricts the file access of the calling process to `rules`, for good; it must still be
/// single-threaded (Landlock binds the calling thread and the threads it starts later). For
/// a process that jails itself in two steps: paths while it is single-threaded, the rest of
/// [`enter`] (with `landlock: None`) once its runtime runs. `no_new_privs` comes with it.
pub fn restrict_paths(
    name: &'static str,
    rules: &LandlockRules,
) -> Result<LandlockStatus, JailError> {
    single_threaded(name)?;
    let status = restrict_paths_of_this_thread(rules)?;
    tracing::debug!(name, ?status, "Landlock rules in force");
    Ok(status)
}

/// Landlock for the calling thread (and those it starts later); the caller checked the
/// process is single-threaded.
fn restrict_paths_of_this_thread(rules: &LandlockRules) -> Result<LandlockStatus, JailError> {
    let read_only: BitFlags<AccessFs> = AccessFs::ReadFile | AccessFs::ReadDir;
    let read_write = read_only
        | AccessFs::WriteFile
        | AccessFs::Truncate
        | AccessFs::MakeReg
        | AccessFs::MakeSock
        | AccessFs::RemoveFile;
    let sockets = AccessFs::MakeSock | AccessFs::RemoveFile;
    let publish = AccessFs::MakeReg | AccessFs::RemoveFile;
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(LANDLOCK_ABI))?
        .create()?;
    for (paths, access) in [
        (&rules.read_write, read_write),
        (&rules.read_only, read_only),
        (&rules.sockets, sockets),
        (&rules.publish, publish),
    ] {
        for path in paths {
            ruleset = ruleset.add_rule(PathBeneath::new(PathFd::new(path)?, access))?;
        }
    }
    let status = match ruleset.restrict_self()?.ruleset {
        RulesetStatus::FullyEnforced => LandlockStatus::FullyEnforced,
        RulesetStatus::PartiallyEnforced => LandlockStatus::PartiallyEnforced,
        RulesetStatus::NotEnforced => LandlockStatus::NotEnforced,
    };
    if status != LandlockStatus::FullyEnforced {
        tracing::warn!(?status, "Landlock is not fully enforced by this kernel");
    }
    Ok(status)
}

fn cap_prctl(option: libc::c_int, arg: libc::c_ulong) -> libc::c_int {
    // SAFETY: capability prctls take integers only and touch no memory of ours.
    unsafe {
        libc::prctl(
            option,
            arg,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    }
}

/// Clears the ambient set and drops from the bounding set every capability not in `keep`
/// (a bit mask). The bounding set limits what an execve could ever grant (even to uid 0).
/// Dropping needs CAP_SETPCAP, so it comes before capset and the uid switch.
fn drop_bounding_and_ambient_except(keep: u64) -> Result<(), JailError> {
    if cap_prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
    ) != 0
    {
        return Err(step("prctl(PR_CAP_AMBIENT_CLEAR_ALL)")(
            io::Error::last_os_error(),
        ));
    }
    // PR_CAPBSET_READ fails past the last capability the kernel knows.
    for cap in 0..64 {
        if keep & (1 << cap) != 0 {
            continue;
        }
        match cap_prctl(libc::PR_CAPBSET_READ, cap) {
            0 => {}
            1 if cap_prctl(libc::PR_CAPBSET_DROP, cap) == 0 => {}
            1 => {
                return Err(step(format!(
                    "prctl(PR_CAPBSET_DROP, {cap}) (needs CAP_SETPCAP)"
                ))(io::Error::last_os_error()));
            }
            _ => break,
        }
    }
    Ok(())
}

fn drop_bounding_and_ambient() -> Result<(), JailError> {
    drop_bounding_and_ambient_except(0)
}

/// Sets the effective and permitted sets to `caps` (a bit mask, which may only shrink
/// them) and empties the inheritable set, on the calling thread.
fn set_capabilities(caps: u64) -> Result<(), JailError> {
    // struct __user_cap_header_struct { u32 version; int pid; } and, for version 3, two
    // struct __user_cap_data_struct { u32 effective, permitted, inheritable; }.
    let header: [u32; 2] = [0x2008_0522, 0];
    let (low, high) = (caps as u32, (caps >> 32) as u32);
    let data = [low, low, 0, high, high, 0];
    // SAFETY: header and data have the layouts capset(2) reads for _LINUX_CAPABILITY_VERSION_3
    // and live across the call; pid 0 means the calling thread.
    if unsafe { libc::syscall(libc::SYS_capset, header.as_ptr(), data.as_ptr()) } != 0 {
        return Err(step(format!("capset({caps:#x})"))(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Becomes `uid`:`gid` with no supplementary groups, real, effective and saved ids alike,
/// so there is no way back; the kernel clears the capabilities of a thread whose uids all
/// leave 0. glibc applies each call to every thread of the process.
fn switch_user(uid: u32, gid: u32) -> Result<(), JailError> {
    let (uid, gid) = (unistd::Uid::from_raw(uid), unistd::Gid::from_raw(gid));
    unistd::setgroups(&[gid]).map_err(step(format!("setgroups([{gid}]) for --runas")))?;
    unistd::setresgid(gid, gid, gid).map_err(step(format!("setresgid({gid}) for --runas")))?;
    unistd::setresuid(uid, uid, uid).map_err(step(format!("setresuid({uid}) for --runas")))?;
    // Make sure: a process that could switch back would not have dropped anything.
    let root = unistd::Uid::from_raw(0);
    if !uid.is_root() && unistd::setresuid(root, root, root).is_ok() {
        return Err(JailError::Enter {
            step: format!("--runas {uid}:{gid}"),
            source: io::Error::other("the process could become root again"),
        });
    }
    Ok(())
}

/// Parses `UID:GID` (numeric ids), the value of `--runas` in every process.
pub fn parse_runas(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s.split_once(':').ok_or("expected UID:GID")?;
    let id = |x: &str| {
        x.parse::<u32>()
            .map_err(|_| format!("'{x}' is not a numeric id"))
    };
    Ok((id(u)?, id(g)?))
}

/// For the launcher, which must keep starting jailed children: keeps only the capabilities
/// in `keep` (bounding, effective, permitted; ambient and inheritable emptied), so what it
/// execs can never hold more. Without CAP_SETPCAP (not started as root) the bounding set
/// stays; the other sets still shrink to `keep`.
pub fn keep_capabilities(keep: &[u32]) -> Result<(), JailError> {
    let mask = keep.iter().fold(0u64, |m, c| m | (1 << c));
    let permitted = permitted_capabilities()?;
    if permitted & (1 << crate::cap::CAP_SETPCAP) != 0 {
        drop_bounding_and_ambient_except(mask)?;
    }
    set_capabilities(permitted & mask)
}

/// The calling thread's permitted capability set.
fn permitted_capabilities() -> Result<u64, JailError> {
    let header: [u32; 2] = [0x2008_0522, 0];
    let mut data = [0u32; 6];
    // SAFETY: header and data have the layouts capget(2) uses for _LINUX_CAPABILITY_VERSION_3;
    // the kernel writes at most the two data structs.
    if unsafe { libc::syscall(libc::SYS_capget, header.as_ptr(), data.as_mut_ptr()) } != 0 {
        return Err(step("capget")(io::Error::last_os_error()));
    }
    Ok(u64::from(data[1]) | (u64::from(data[4]) << 32))
}
