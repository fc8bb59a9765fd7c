//! Image locking, compatible with QEMU's file-posix driver, so splitvmm and QEMU tools
//! (`qemu-img`, `qemu-io`, `qemu-nbd`, QEMU itself) never write one image at the same time.
//!
//! The protocol (QEMU `block/file-posix.c`, `raw_apply_lock_bytes` and
//! `raw_check_lock_bytes`) uses open-file-description byte-range locks (`F_OFD_SETLK`,
//! always shared/read locks) on single bytes of the image file:
//!
//! - byte `100 + bit` is locked by every user that *holds* permission `bit`;
//! - byte `200 + bit` is locked by every user that does *not share* permission `bit`.
//!
//! Permission bits: consistent-read 0, write 1, write-unchanged 2, resize 3. (QEMU before
//! 6.1 also had graph-mod, bit 4; QEMU 10 neither takes nor checks bytes 104/204, and
//! neither do we.) To open, a user first takes its bytes, then tests (`F_OFD_GETLK` with a
//! write lock, which conflicts with anyone else's read lock) byte `200 + bit` for every bit
//! it holds (someone refuses to share it: `Failed to get "NAME" lock`) and byte `100 + bit`
//! for every bit it does not share (someone holds it: `Failed to get shared "NAME" lock`).
//! Taking before testing means two racing openers cannot both miss each other.
//!
//! What splitvmm takes (checked against `qemu-io`/`qemu-nbd` 10.0 in `/proc/locks`):
//!
//! | open | holds | does not share |
//! |---|---|---|
//! | read/write (qcow2 or raw) | consistent-read, write, resize | write, resize |
//! | read-only, and every backing file | consistent-read | write, resize |
//! | creating an image | write, resize | resize |
//!
//! A read/write qcow2 opened by QEMU takes exactly the first row. QEMU takes less on raw
//! files (it shares resize with a guest device, and shares write on a raw *backing* file);
//! we keep one rule for both formats, the safer one: nobody writes under an image we read.
//! Locks go with the open file description, so closing the image releases them.

use std::fs;
use std::io;
use std::os::fd::AsFd;

use nix::fcntl::{FcntlArg, fcntl};

/// A set of QEMU block permissions (`BLK_PERM_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms(u8);

impl Perms {
    pub const NONE: Self = Self(0);
    pub const CONSISTENT_READ: Self = Self(1 << 0);
    pub const WRITE: Self = Self(1 << 1);
    pub const WRITE_UNCHANGED: Self = Self(1 << 2);
    pub const RESIZE: Self = Self(1 << 3);
    pub const ALL: Self = Self(0x0f);

    /// The union of two sets.
    pub const fn with(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// `self` without `other`'s permissions.
    pub const fn without(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }

    fn has_bit(self, bit: u8) -> bool {
        self.0 & (1 << bit) != 0
    }

    /// Whether every permission of `other` is in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the two sets have a permission in common.
    pub const fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }

    /// Whether no permission is in the set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// QEMU's names of the permissions in the set, joined with ", " (`bdrv_perm_names`).
    pub fn names(self) -> String {
        (0..BITS)
            .filter(|b| self.has_bit(*b))
            .map(perm_name)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// First byte of the "holds permission" range.
const PERM_BASE: i64 = 100;
/// First byte of the "does not share permission" range.
const SHARED_BASE: i64 = 200;
/// Permission bits in use.
const BITS: u8 = 4;

/// QEMU's name of a permission bit (`bdrv_perm_names`).
fn perm_name(bit: u8) -> &'static str {
    match bit {
        0 => "consistent read",
        1 => "write",
        2 => "write unchanged",
        _ => "resize",
    }
}

/// What an open takes: the permissions it holds and those it lets others hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockMode {
    pub perm: Perms,
    pub shared: Perms,
}

impl LockMode {
    /// A read/write open (a guest disk, an export, a job target).
    pub const READ_WRITE: Self = Self {
        perm: Perms::CONSISTENT_READ
            .with(Perms::WRITE)
            .with(Perms::RESIZE),
        shared: Perms::CONSISTENT_READ.with(Perms::WRITE_UNCHANGED),
    };
    /// A read-only open, and every backing file.
    pub const READ_ONLY: Self = Self {
        perm: Perms::CONSISTENT_READ,
        shared: Perms::CONSISTENT_READ.with(Perms::WRITE_UNCHANGED),
    };
    /// No lock at all: holds nothing, shares everything (a `file` node nobody uses yet,
    /// or one opened with `locking=off`).
    pub const NONE: Self = Self {
        perm: Perms::NONE,
        shared: Perms::ALL,
    };
    /// Creating (formatting) an image file, as QEMU's `raw_co_create` does.
    pub const CREATE: Self = Self {
        perm: Perms::WRITE.with(Perms::RESIZE),
        shared: Perms::ALL.without(Perms::RESIZE),
    };

    /// What two users together take: the permissions either holds, sharing only what both
    /// share.
    pub const fn union(self, other: Self) -> Self {
        Self {
            perm: self.perm.with(other.perm),
            shared: Perms(self.shared.0 & other.shared.0),
        }
    }

    /// The bytes this mode locks.
    fn bytes(self) -> impl Iterator<Item = i64> {
        let held = (0..BITS)
            .filter(move |b| self.perm.has_bit(*b))
            .map(|b| PERM_BASE + i64::from(b));
        let unshared = (0..BITS)
            .filter(move |b| !self.shared.has_bit(*b))
            .map(|b| SHARED_BASE + i64::from(b));
        held.chain(unshared)
    }
}

/// Why a lock could not be taken. The text is QEMU's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    /// Someone does not share a permission we need.
    #[error("Failed to get \"{0}\" lock")]
    Perm(&'static str),
    /// Someone holds a permission we do not share.
    #[error("Failed to get shared \"{0}\" lock")]
    Shared(&'static str),
    /// The lock byte itself could not be locked.
    #[error("Failed to lock byte {0}")]
    Byte(i64),
    /// Testing a lock failed for another reason.
    #[error("Failed to check lock byte {byte}: {errno}")]
    Check { byte: i64, errno: nix::errno::Errno },
}

impl LockError {
    /// QEMU's hint under the error (`qemu-img` prints it on a second line).
    pub fn hint(&self, filename: &str) -> String {
        format!("Is another process using the image [{filename}]?")
    }
}

impl From<LockError> for io::Error {
    fn from(e: LockError) -> Self {
        let kind = match e {
            LockError::Perm(_) | LockError::Shared(_) => io::ErrorKind::ResourceBusy,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e.to_string())
    }
}

fn flock(kind: i32, byte: i64) -> libc::flock {
    libc::flock {
        l_type: kind as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    }
}

fn set(file: &fs::File, kind: i32, byte: i64) -> nix::Result<()> {
    fcntl(file.as_fd(), FcntlArg::F_OFD_SETLK(&flock(kind, byte))).map(drop)
}

/// Whether another open file description holds a lock on `byte`.
fn taken_by_others(file: &fs::File, byte: i64) -> Result<bool, LockError> {
    let mut fl = flock(libc::F_WRLCK, byte);
    fcntl(file.as_fd(), FcntlArg::F_OFD_GETLK(&mut fl))
        .map_err(|errno| LockError::Check { byte, errno })?;
    Ok(i32::from(fl.l_type) != libc::F_UNLCK)
}

/// Takes `mode`'s locks on `file` (which holds none yet), or takes none and says why.
pub fn acquire(file: &fs::File, mode: LockMode) -> Result<(), LockError> {
    let result = apply_and_check(file, mode);
    if result.is_err() {
        release(file);
    }
    result
}

fn apply_and_check(file: &fs::File, mode: LockMode) -> Result<(), LockError> {
    for byte in mode.bytes() {
        set(file, libc::F_RDLCK, byte).map_err(|_| LockError::Byte(byte))?;
    }
    for bit in 0..BITS {
        if mode.perm.has_bit(bit) && taken_by_others(file, SHARED_BASE + i64::from(bit))? {
            return Err(LockError::Perm(perm_name(bit)));
        }
    }
    for bit in 0..BITS {
        if !mode.shared.has_bit(bit) && taken_by_others(file, PERM_BASE + i64::from(bit))? {
            return Err(LockError::Shared(perm_name(bit)));
        }
    }
    Ok(())
}

/// Changes `file`'s locks from `from` to `to` (a reopen): takes the new bytes, checks,
/// then drops the bytes only `from` needed. On failure the old locks stay as they were.
pub fn change(file: &fs::File, from: LockMode, to: LockMode) -> Result<(), LockError> {
    let old: Vec<i64> = from.bytes().collect();
    let new: Vec<i64> = to.bytes().collect();
    let added: Vec<i64> = new.iter().copied().filter(|b| !old.contains(b)).collect();
    let result = (|| {
        for &byte in &added {
            set(file, libc::F_RDLCK, byte).map_err(|_| LockError::Byte(byte))?;
        }
        for bit in 0..BITS {
            if to.perm.has_bit(bit) && taken_by_others(file, SHARED_BASE + i64::from(bit))? {
                return Err(LockError::Perm(perm_name(bit)));
            }
        }
        for bit in 0..BITS {
            if !to.shared.has_bit(bit) && taken_by_others(file, PERM_BASE + i64::from(bit))? {
                return Err(LockError::Shared(perm_name(bit)));
            }
        }
        Ok(())
    })();
    let drop_bytes = if result.is_ok() {
        old.iter().copied().filter(|b| !new.contains(b)).collect()
    } else {
        added
    };
    for byte in drop_bytes {
        // Unlocking a byte cannot conflict with anyone; an error here leaves a stale lock
        // that goes away when the file is closed.
        let _ = set(file, libc::F_UNLCK, byte);
    }
    result
}

/// Drops every lock byte this open file description holds.
pub fn release(file: &fs::File) {
    for byte in
        (PERM_BASE..PERM_BASE + i64::from(BITS)).chain(SHARED_BASE..SHARED_BASE + i64::from(BITS))
    {
        let _ = set(file, libc::F_UNLCK, byte);
    }
}
