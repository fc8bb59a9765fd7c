//! [`Node`]: one opened image (raw or qcow2) with its backing chain, implementing
//! [`BlockDevice`] on imago.
//!
//! - **Opening.** The format is given, never probed. A qcow2 image's backing file comes
//!   from its header (name and backing-format extension, which must be present), is
//!   resolved against the image's own name as QEMU does, admitted by the [`DirGate`]
//!   (allowed directories), opened read-only as a `Node` of its own (recursively) and
//!   handed to imago explicitly; or the caller passes no backing, or an open `Node`.
//!   Every file is locked as QEMU locks it ([`super::lock`]).
//! - **I/O.** imago runs in its synchronous mode, on the tokio worker that asks, where it
//!   must not wait for the disk: reads and allocation-map lookups run in no-wait mode
//!   ([`without_waiting`]) and are redone through [`blocking`] (`block_in_place`) only when
//!   the page cache could not serve them; writes go to the page cache, which they wait for
//!   only when the kernel throttles dirty pages. What waits for the disk by nature (fsync,
//!   `fallocate`, resizing, opening, header rewrites) goes through [`blocking`]. Handing
//!   the worker over to another thread for every request (`block_in_place` each time) cost
//!   more than the I/O itself (docs/performance.md). A mirror's copies into an image
//!   ([`Node::copy_from`]: file to file in the kernel) run on tokio's blocking pool. The
//!   `FormatAccess` sits in a tokio `RwLock`: shared for reads, writes and zeroing that
//!   keeps allocations, exclusive for what invalidates mappings (discard, unmapping
//!   write-zeroes, shrinking) and for replacing the imago instance (header rewrite,
//!   backing change). Those need `&mut FormatAccess`, which exists only while no other
//!   image uses this one as its backing (`Arc::get_mut`); otherwise they fall back to
//!   allocation-keeping zeroing, or do nothing for a discard.
//! - **Acknowledgement rule** (`crate::device`): after any change, imago's metadata caches
//!   are written back to the file (imago `flush`, no fsync) before `Ok` is returned;
//!   concurrent writers share one write-back ([`GroupCommit`]). `flush()` adds an fsync,
//!   and so does `fua`.
//!   imago writes some table pointers before the refcounts they depend on; the image
//!   file's storage object puts those refcounts on disk first ([`super::order`]).
//! - **`block_status`** walks imago's shallow mappings down the chain and asks raw files
//!   for holes (`SEEK_DATA`), which is what `qemu-img map` reports.

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use imago::format::{Format, PreallocateMode};
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, FormatDriverBuilder, Mapping, ShallowMapping};
use ipc::block::{ImageFormat, ImageInfo, ImageInfoSpecific, ImageInfoSpecificQcow2};
use nix::fcntl::FallocateFlags;
use tokio::sync::RwLock;

use super::commit::{GroupCommit, blocking};
use super::error::Error;
use super::file::{ExtentCache, Faults, ImageFile, without_waiting, would_block};
use super::gate::DirGate;
use super::header::{self, Header};
use super::lock::{self, LockMode};
use crate::device::{BlockDevice, Extent};

/// imago's view of an image, as the block layer holds it.
pub(crate) type Access = FormatAccess<ImageFile>;

/// The qcow2 driver type: backing images are shared `FormatAccess` objects.
type Qcow2Image = Qcow2<ImageFile, Arc<Access>>;

/// Which backing image a qcow2 image gets.
#[derive(Debug, Clone, Default)]
pub enum Backing {
    /// The one its header names (with the backing-format extension; never probed).
    #[default]
    Default,
    /// None: unallocated clusters read as zeroes.
    None,
    /// This already opened node.
    Node(Arc<Node>),
}

/// An image file someone else opened (and locks): the block graph's `file` node under a
/// format node.
#[derive(Debug)]
pub struct OpenedFile {
    /// A descriptor of the file (a `dup`: same open file description, so same locks).
    pub file: fs::File,
    /// Its resolved path.
    pub resolved: PathBuf,
}

/// How to open an image.
#[derive(Debug)]
pub struct OpenOptions {
    /// The file name, as the user gave it (relative names are relative to the current
    /// directory); `query-block` shows it, and relative backing names resolve against it.
    pub filename: String,
    pub format: ImageFormat,
    pub read_only: bool,
    pub backing: Backing,
    /// Directories images may be opened under (canonical; see [`DirGate`]).
    pub allowed_dirs: Vec<PathBuf>,
    /// The locks to take on the image file; `None`: [`LockMode::READ_WRITE`] or
    /// [`LockMode::READ_ONLY`] by `read_only`.
    pub lock: Option<LockMode>,
    /// Use this already open file instead of opening `filename` (no gate, no locks: its
    /// opener did both).
    pub opened: Option<OpenedFile>,
    /// Fault-injection rules for the image file's reads (a read-only raw image only).
    pub faults: Option<Faults>,
}

impl OpenOptions {
    /// Options for `filename` in `format`, read/write, default backing.
    pub fn new(filename: impl Into<String>, format: ImageFormat, allowed_dirs: &[PathBuf]) -> Self {
        Self {
            filename: filename.into(),
            format,
            read_only: false,
            backing: Backing::Default,
            allowed_dirs: allowed_dirs.to_vec(),
            lock: None,
            opened: None,
            faults: None,
        }
    }

    /// Put the image file's requests through `faults`.
    pub fn faults(mut self, faults: Faults) -> Self {
        self.faults = Some(faults);
        self
    }

    /// Take `mode`'s locks on the image file instead of the default ones.
    pub fn lock(mut self, mode: LockMode) -> Self {
        self.lock = Some(mode);
        self
    }

    /// Work on a file that is already open (and locked by whoever opened it).
    pub fn opened(mut self, opened: OpenedFile) -> Self {
        self.opened = Some(opened);
        self
    }

    /// Open read-only (`true`) or read/write.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Which backing image to use.
    pub fn backing(mut self, backing: Backing) -> Self {
        self.backing = backing;
        self
    }
}

/// What may change about a node while it is open.
#[derive(Debug)]
struct Meta {
    /// The qcow2 header as last read (for `info`).
    header: Option<Header>,
    /// The backing node imago reads through.
    backing: Option<Arc<Node>>,
}

/// One opened image. See the module documentation.
#[derive(Debug)]
pub struct Node {
    filename: String,
    resolved: PathBuf,
    format: ImageFormat,
    /// Opened (or reopened, see [`Node::reopen`]) read-only.
    read_only: AtomicBool,
    /// The descriptor was opened for writing, so the node can be reopened read/write.
    fd_writable: bool,
    /// The node took the default locks on its file itself (no `lock` or `opened` given), so
    /// a reopen changes them.
    own_locks: bool,
    /// The image file (a descriptor on the same open file description as imago's).
    file: fs::File,
    /// The image file's extent cache, which [`Node::fallocate`] must invalidate.
    extents: Arc<ExtentCache>,
    fa: RwLock<Arc<Access>>,
    size: AtomicU64,
    meta: Mutex<Meta>,
    commit: GroupCommit,
    gate: DirGate,
    /// The OFD locks this open holds on its file (a migration hands a drive's locks from
    /// the source to the destination: [`Node::set_image_locks`]).
    held: std::sync::Mutex<LockMode>,
    /// The fault-injection rules of the image file (see [`OpenOptions::faults`]).
    faults: Option<Faults>,
}

/// The image file of an open: its name, and either the locks to take when opening it or
/// the file itself, already open.
struct Top<'a> {
    filename: &'a str,
    lock: Option<LockMode>,
    opened: Option<OpenedFile>,
    faults: Option<Faults>,
}

impl<'a> Top<'a> {
    /// A file to open by name, with the default locks.
    fn named(filename: &'a str) -> Self {
        Self {
            filename,
            lock: None,
            opened: None,
            faults: None,
        }
    }
}

/// The backing chosen for an open, resolved to a node and its imago instance.
enum BackingSpec {
    Default,
    None,
    Explicit(Arc<Node>, Arc<Access>),
}

/// QEMU's `path_combine`: a relative `name` is taken relative to the directory part of
/// `base` (everything up to its last `/`), an absolute one as it is.
pub fn path_combine(base: &str, name: &str) -> String {
    if name.starts_with('/') {
        return name.to_string();
    }
    match base.rfind('/') {
        Some(i) => format!("{}{name}", &base[..=i]),
        None => name.to_string(),
    }
}

/// The format a backing-format string names.
fn parse_format(s: &str) -> Result<ImageFormat, Error> {
    match s {
        "raw" | "file" => Ok(ImageFormat::Raw),
        "qcow2" => Ok(ImageFormat::Qcow2),
        other => Err(Error::UnknownFormat(other.to_string())),
    }
}

fn io_other(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

fn read_only_error() -> io::Error {
    io::Error::from_raw_os_error(libc::EPERM)
}

/// Largest zero buffer written at once when zeroes must be written as data.
const ZERO_CHUNK: u64 = 1 << 20;
/// Most extents one `block_status` call returns.
const MAX_EXTENTS: usize = 1024;

impl Node {
    /// Opens an image and (by default) its backing chain.
    pub async fn open(opts: OpenOptions) -> Result<Arc<Node>, Error> {
        let gate = DirGate::new(&opts.allowed_dirs);
        let spec = match &opts.backing {
            Backing::Default => BackingSpec::Default,
            Backing::None => BackingSpec::None,
            Backing::Node(n) => {
                let fa = n.fa.read().await.clone();
                BackingSpec::Explicit(n.clone(), fa)
            }
        };
        let OpenOptions {
            filename,
            format,
            read_only,
            lock,
            opened,
            faults,
            ..
        } = opts;
        let node = blocking(|| {
            let mut seen = Vec::new();
            let top = Top {
                filename: &filename,
                lock,
                opened,
                faults,
            };
            Self::open_sync(top, format, read_only, spec, &gate, &mut seen)
        })?;
        Ok(Arc::new(node))
    }

    fn open_sync(
        top: Top<'_>,
        format: ImageFormat,
        read_only: bool,
        backing: BackingSpec,
        gate: &DirGate,
        seen: &mut Vec<PathBuf>,
    ) -> Result<Node, Error> {
        let filename = top.filename;
        let own_locks = top.opened.is_none() && top.lock.is_none();
        let mut held = LockMode::NONE;
        let faults = top.faults;
        let (mut storage, resolved) = match top.opened {
            Some(o) => {
                let storage = ImageFile::new(o.file, filename, !read_only)
                    .map_err(|e| Error::open(filename, &e))?;
                (storage, o.resolved)
            }
            None => {
                let mode = top.lock.unwrap_or(if read_only {
                    LockMode::READ_ONLY
                } else {
                    LockMode::READ_WRITE
                });
                held = mode;
                gate.open_file(filename, !read_only, mode)?
            }
        };
        storage.inject_faults(faults.clone());
        seen.push(resolved.clone());
        let file = storage
            .file()
            .try_clone()
            .map_err(|e| Error::open(filename, &e))?;
        let extents = storage.extent_cache();
        let image_gate = gate.for_image(!read_only);

        let (fa, header, backing_node) = match format {
            ImageFormat::Raw => {
                if let BackingSpec::Explicit(..) = backing {
                    return Err(Error::other(format!(
                        "'{filename}': raw images have no backing file"
                    )));
                }
                let raw = Raw::builder(storage)
                    .write(!read_only)
                    .open(image_gate)
                    .map_err(|e| Error::open(filename, &e))?;
                (FormatAccess::new(raw), None, None)
            }
            ImageFormat::Qcow2 => {
                let header = Header::read(&file).map_err(|e| Error::open(filename, &e))?;
                if header.crypt_method != 0 {
                    return Err(Error::other(format!(
                        "'{filename}': encrypted qcow2 images are not supported"
                    )));
                }
                let hidden =
                    header.incompatible & (header::INCOMPAT_DIRTY | header::INCOMPAT_CORRUPT);
                if !read_only && header.corrupt() {
                    return Err(Error::Corrupt);
                }
                if !read_only && header.dirty() {
                    return Err(Error::Dirty(filename.to_string()));
                }
                if read_only {
                    storage.hide_incompatible(hidden);
                } else {
                    storage
                        .order_metadata_writes()
                        .map_err(|e| Error::open(filename, &e))?;
                }
                let (backing_fa, backing_node) = match backing {
                    BackingSpec::None => (None, None),
                    BackingSpec::Explicit(node, fa) => (Some(fa), Some(node)),
                    BackingSpec::Default => match &header.backing_file {
                        None => (None, None),
                        Some(name) => {
                            let fmt =
                                header
                                    .backing_format()
                                    .ok_or_else(|| Error::NoBackingFormat {
                                        image: filename.to_string(),
                                        backing: name.clone(),
                                    })?;
                            let fmt = parse_format(&fmt)?;
                            let full = path_combine(filename, name);
                            if let Ok(r) = fs::canonicalize(&full)
                                && seen.contains(&r)
                            {
                                return Err(Error::Loop {
                                    image: filename.to_string(),
                                    backing: full,
                                });
                            }
                            let node = Self::open_sync(
                                Top::named(&full),
                                fmt,
                                true,
                                BackingSpec::Default,
                                gate,
                                seen,
                            )
                            .map_err(|e| Error::Backing(Box::new(e)))?;
                            let node = Arc::new(node);
                            let fa = node
                                .fa
                                .try_read()
                                .map_err(|_| Error::other("backing node busy"))?
                                .clone();
                            (Some(fa), Some(node))
                        }
                    },
                };
                let qcow2: Qcow2Image = Qcow2::builder(storage)
                    .write(!read_only)
                    .backing(backing_fa)
                    .open(image_gate)
                    .map_err(|e| Error::open(filename, &e))?;
                (FormatAccess::new(qcow2), Some(header), backing_node)
            }
        };
        Ok(Node {
            filename: filename.to_string(),
            resolved,
            format,
            read_only: AtomicBool::new(read_only),
            fd_writable: !read_only,
            own_locks,
            file,
            extents,
            size: AtomicU64::new(fa.size()),
            fa: RwLock::new(Arc::new(fa)),
            meta: Mutex::new(Meta {
                header,
                backing: backing_node,
            }),
            commit: GroupCommit::default(),
            gate: gate.clone(),
            held: std::sync::Mutex::new(held),
            faults,
        })
    }

    /// Takes (`active`) or gives up every lock on the image file, as QEMU's
    /// `bdrv_activate_all` / `bdrv_inactivate_all` do at a migration's switch-over: the
    /// source gives them up, the destination (which opened the drive without them)
    /// takes them. The backing chain keeps its read-only locks, which both sides may hold.
    pub fn set_image_locks(&self, active: bool) -> io::Result<()> {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let target = match (active, self.is_read_only()) {
            (false, _) => LockMode::NONE,
            (true, true) => LockMode::READ_ONLY,
            (true, false) => LockMode::READ_WRITE,
        };
        if *held == target {
            return Ok(());
        }
        lock::change(&self.file, *held, target)?;
        let taken_over = *held == LockMode::NONE;
        *held = target;
        drop(held);
        // Whoever held the image until now wrote to it: forget what was cached of its
        // metadata (QEMU's `bdrv_invalidate_cache` on activation). No request is in
        // flight at a switch-over, so the format lock is free.
        if active && taken_over && self.is_qcow2() {
            let reload = || -> io::Result<()> {
                let backing = match self.backing() {
                    Some(b) => Some(
                        b.fa.try_read()
                            .map_err(|_| io_other("the backing image is busy"))?
                            .clone(),
                    ),
                    None => None,
                };
                let mut fa = self
                    .fa
                    .try_write()
                    .map_err(|_| io_other("the image is busy"))?;
                self.reinstantiate(&mut fa, backing)?;
                let size = fa.size();
                self.size.store(size, Ordering::Release);
                Ok(())
            };
            reload().map_err(|e| io_other(format!("reloading the image metadata: {e}")))?;
        }
        Ok(())
    }

    fn meta(&self) -> std::sync::MutexGuard<'_, Meta> {
        // Meta is replaced field by field; a panic cannot leave it half-written.
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file name the image was opened under.
    pub fn filename(&self) -> &str {
        &self.filename
    }

    /// The file's resolved path.
    pub fn path(&self) -> &Path {
        &self.resolved
    }

    /// The image file (the open file description holding its locks).
    pub fn os_file(&self) -> &fs::File {
        &self.file
    }

    pub fn format(&self) -> ImageFormat {
        self.format
    }

    /// Whether the image is (now) read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// QEMU's `bdrv_reopen_set_read_only`: makes what was written durable, changes the
    /// file's locks (when the node took them itself) and reinstantiates imago read-only or
    /// read/write. Going read/write needs a descriptor opened for writing: an image opened
    /// read-only (a backing file) cannot be reopened here; open it anew instead.
    ///
    /// Images that use this one as their backing keep reading through the imago instance
    /// they were given; callers hand them the new one with [`Node::set_backing`].
    pub async fn reopen(&self, read_only: bool) -> io::Result<()> {
        if self.is_read_only() == read_only {
            return Ok(());
        }
        if !read_only && !self.fd_writable {
            return Err(io_other(format!(
                "'{}' was opened read-only and cannot be reopened read/write",
                self.filename
            )));
        }
        let mut guard = self.fa.write().await;
        let backing_fa = self.backing_access().await;
        blocking(|| -> io::Result<()> {
            guard.flush()?;
            guard.sync()?;
            let (from, to) = if read_only {
                (LockMode::READ_WRITE, LockMode::READ_ONLY)
            } else {
                (LockMode::READ_ONLY, LockMode::READ_WRITE)
            };
            if self.own_locks {
                super::lock::change(&self.file, from, to)?;
            }
            self.read_only.store(read_only, Ordering::Release);
            let r = if self.is_qcow2() {
                self.reinstantiate(&mut guard, backing_fa)
            } else {
                let file = self.file.try_clone()?;
                let mut storage = ImageFile::new(file, &self.filename, !read_only)?;
                storage.inject_faults(self.faults.clone());
                Raw::builder(storage)
                    .write(!read_only)
                    .open(self.gate.for_image(!read_only))
                    .map(|raw| *guard = Arc::new(FormatAccess::new(raw)))
            };
            if let Err(e) = r {
                // Back as it was: the old imago instance is still in place.
                self.read_only.store(!read_only, Ordering::Release);
                if self.own_locks {
                    let _ = super::lock::change(&self.file, to, from);
                }
                return Err(e);
            }
            Ok(())
        })
    }

    /// While a job writes this read-only image's file through a read/write node of its
    /// own (`block-commit`'s base: QEMU reopens such a node in place), this one must let
    /// others write (`share`); afterwards it takes its usual locks again. A no-op for a
    /// writable node or one that took no locks itself.
    pub fn share_writes(&self, share: bool) -> io::Result<()> {
        if !self.own_locks || !self.is_read_only() {
            return Ok(());
        }
        let sharing = LockMode {
            perm: super::lock::Perms::CONSISTENT_READ,
            shared: super::lock::Perms::ALL,
        };
        let (from, to) = if share {
            (LockMode::READ_ONLY, sharing)
        } else {
            (sharing, LockMode::READ_ONLY)
        };
        super::lock::change(&self.file, from, to).map_err(io::Error::from)
    }

    /// Drops every lock this node took on its file: it will not be used again (a job's
    /// node that was not switched in), though something may still hold it.
    pub fn release_locks(&self) {
        if self.own_locks {
            super::lock::release(&self.file);
        }
    }

    /// The backing node, if any.
    pub fn backing(&self) -> Option<Arc<Node>> {
        self.meta().backing.clone()
    }

    /// Number of backing images below this one (`backing_file_depth`).
    pub fn backing_depth(&self) -> u32 {
        let mut depth = 0;
        let mut cur = self.backing();
        while let Some(n) = cur {
            depth += 1;
            cur = n.backing();
        }
        depth
    }

    fn is_qcow2(&self) -> bool {
        self.format == ImageFormat::Qcow2
    }

    fn qcow2_version(&self) -> u32 {
        self.meta().header.as_ref().map_or(0, |h| h.version)
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.is_read_only() {
            Err(read_only_error())
        } else {
            Ok(())
        }
    }

    /// Writes imago's metadata caches back, shared with concurrent writers.
    async fn commit(&self, fa: &Access) -> io::Result<()> {
        if self.is_qcow2() {
            self.commit.commit(|| fa.flush()).await
        } else {
            Ok(())
        }
    }

    /// Writes zeroes as data over `[offset, offset + length)`.
    fn write_zero_data(fa: &Access, mut offset: u64, length: u64) -> io::Result<()> {
        let end = offset + length;
        let zeroes = vec![0u8; ZERO_CHUNK.min(length) as usize];
        while offset < end {
            let n = (end - offset).min(ZERO_CHUNK) as usize;
            fa.write(&zeroes[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    /// `fallocate` on the image file, for raw images.
    fn fallocate(&self, flags: FallocateFlags, offset: u64, length: u64) -> io::Result<()> {
        let off = i64::try_from(offset).map_err(|_| io_other("offset overflow"))?;
        let len = i64::try_from(length).map_err(|_| io_other("length overflow"))?;
        let r = loop {
            match nix::fcntl::fallocate(self.file.as_fd(), flags, off, len) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => break r.map_err(io::Error::from),
            }
        };
        // Even a failed call may have punched part of the range.
        self.extents.invalidate();
        r
    }

    /// Runs `f`, which only reads, here without waiting for the disk; if the page cache
    /// could not serve it, runs it again through [`blocking`].
    fn read_call<R>(mut f: impl FnMut() -> io::Result<R>) -> io::Result<R> {
        match without_waiting(&mut f) {
            Err(e) if would_block(&e) => blocking(f),
            r => r,
        }
    }

    /// Copies `[offset, offset + length)` of `src`'s guest data into the same range of this
    /// image without going through user memory: for each run the source holds as data in
    /// an image file (its recursively resolved mapping), the target's clusters are
    /// allocated together (one imago mapping for the whole run, not one per cluster), the
    /// data goes from file to file in the kernel (`copy_file_range`, as `cp` copies), and
    /// only then is the new mapping made visible, as imago's own writes do. Runs on tokio's
    /// blocking pool, so that copies in flight use more than the two runtime workers; the
    /// metadata write-back follows once, shared with concurrent copies (the
    /// acknowledgement rule). Returns how many bytes from `offset` on were copied: it stops
    /// where the source is not plain data in a file (zero, compressed, a hole beyond a
    /// backing file's end), and the caller copies the rest otherwise.
    pub async fn copy_from(
        self: &Arc<Self>,
        src: &Arc<Node>,
        offset: u64,
        length: u64,
    ) -> io::Result<u64> {
        self.check_writable()?;
        let (from, to) = (src.clone(), self.clone());
        let copied = tokio::task::spawn_blocking(move || to.copy_from_sync(&from, offset, length))
            .await
            .map_err(|e| io_other(format!("copy: {e}")))??;
        if copied > 0 {
            let fa = self.fa.read().await;
            self.commit(&fa).await?;
        }
        Ok(copied)
    }

    /// [`Node::copy_from`]'s copy, on a thread that may wait for the disk.
    fn copy_from_sync(&self, src: &Node, offset: u64, length: u64) -> io::Result<u64> {
        let sfa = src.fa.blocking_read();
        let dfa = self.fa.blocking_read();
        let end = offset
            .saturating_add(length)
            .min(sfa.size())
            .min(dfa.size());
        let mut pos = offset;
        while pos < end {
            let (mapping, n) = sfa.get_mapping(pos, end - pos)?;
            let Mapping::Raw {
                storage,
                offset: host,
                ..
            } = mapping
            else {
                break;
            };
            let n = n.min(end - pos);
            if n == 0 {
                break;
            }
            let mut done = 0;
            while done < n {
                let target = dfa.prepare_data_mapping(pos + done, n - done, true)?;
                let len = target.length();
                let out = target.storage();
                copy_file_range_all(
                    storage.file(),
                    host + done,
                    out.file(),
                    target.offset(),
                    len,
                )?;
                out.extent_cache().invalidate();
                dfa.commit_data_mapping(target)?;
                done += len;
            }
            pos += n;
        }
        Ok(pos - offset)
    }

    /// Resizes the image (`block_resize`). Growing a qcow2 image whose backing file
    /// reaches beyond the old end zeroes the new range, as QEMU does, so backing data
    /// cannot show through.
    pub async fn resize(&self, new_size: u64) -> io::Result<()> {
        self.check_writable()?;
        if self.is_qcow2() && !new_size.is_multiple_of(512) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "The new size must be a multiple of 512",
            ));
        }
        let mut guard = self.fa.write().await;
        let old = guard.size();
        let has_backing = self.meta().backing.is_some();
        blocking(|| -> io::Result<()> {
            if new_size > old {
                let mode = if self.is_qcow2() && has_backing {
                    PreallocateMode::Zero
                } else {
                    PreallocateMode::None
                };
                guard.resize_grow(new_size, mode)?;
            } else if new_size < old {
                let fa = Arc::get_mut(&mut guard).ok_or_else(|| {
                    io_other("Cannot shrink an image that is in use as a backing file")
                })?;
                fa.resize_shrink(new_size)?;
            }
            guard.flush()
        })?;
        self.size.store(guard.size(), Ordering::Release);
        Ok(())
    }

    /// Takes in a change of a raw image's length made through another descriptor (a qcow2
    /// node on the same file grew it): a fresh imago instance of the file's current length
    /// replaces the old one. Returns the length. qcow2 images keep theirs.
    pub async fn refresh_size(&self) -> io::Result<u64> {
        let len = self.file.metadata()?.len();
        if self.is_qcow2() || len == self.size() {
            return Ok(self.size());
        }
        let mut guard = self.fa.write().await;
        if guard.size() != len {
            let file = self.file.try_clone()?;
            let writable = !self.is_read_only();
            let mut storage = ImageFile::new(file, &self.filename, writable)?;
            storage.inject_faults(self.faults.clone());
            let raw = blocking(|| {
                Raw::builder(storage)
                    .write(writable)
                    .open(self.gate.for_image(writable))
            })?;
            *guard = Arc::new(FormatAccess::new(raw));
        }
        self.size.store(guard.size(), Ordering::Release);
        Ok(guard.size())
    }

    /// Rewrites the backing file name and format in the image header (QEMU's
    /// `change-backing-file`, `qemu-img rebase -u`). The image keeps reading through the
    /// backing node it has; see [`Node::set_backing`] to change that.
    pub async fn set_backing_file(&self, backing: Option<(&str, ImageFormat)>) -> io::Result<()> {
        self.check_writable()?;
        if !self.is_qcow2() {
            return Err(io_other(format!(
                "'{}': raw images have no backing file",
                self.filename
            )));
        }
        let mut guard = self.fa.write().await;
        let backing_fa = self.backing_access().await;
        blocking(|| -> io::Result<()> {
            guard.flush()?;
            let h = header::rewrite_backing(&self.file, backing.map(|(n, f)| (n, f.as_str())))?;
            self.meta().header = Some(h);
            self.reinstantiate(&mut guard, backing_fa)
        })
    }

    /// Makes imago read unallocated clusters from `backing` (or from nowhere), without
    /// touching the image header (block jobs pair it with [`Node::set_backing_file`]).
    pub async fn set_backing(&self, backing: Option<Arc<Node>>) -> io::Result<()> {
        if !self.is_qcow2() {
            return Err(io_other(format!(
                "'{}': raw images have no backing file",
                self.filename
            )));
        }
        let backing_fa = match &backing {
            Some(b) => Some(b.fa.read().await.clone()),
            None => None,
        };
        let mut guard = self.fa.write().await;
        blocking(|| self.reinstantiate(&mut guard, backing_fa))?;
        self.meta().backing = backing;
        Ok(())
    }

    /// The imago instance of the current backing node.
    async fn backing_access(&self) -> Option<Arc<Access>> {
        let b = self.backing()?;
        Some(b.fa.read().await.clone())
    }

    /// Replaces the imago instance with a fresh one over the same file (same open file
    /// description, so the locks stay), reading the header anew.
    fn reinstantiate(&self, fa: &mut Arc<Access>, backing: Option<Arc<Access>>) -> io::Result<()> {
        let h = Header::read(&self.file)?;
        if h.has_data_file() {
            return Err(io_other(
                "Changing the backing of an image with an external data file is not supported",
            ));
        }
        fa.flush()?;
        let file = self.file.try_clone()?;
        let read_only = self.is_read_only();
        let mut storage = ImageFile::new(file, &self.filename, !read_only)?;
        if read_only {
            storage.hide_incompatible(
                h.incompatible & (header::INCOMPAT_DIRTY | header::INCOMPAT_CORRUPT),
            );
        } else {
            storage.order_metadata_writes()?;
        }
        let qcow2: Qcow2Image = Qcow2::builder(storage)
            .write(!read_only)
            .backing(backing)
            .open(self.gate.for_image(!read_only))?;
        *fa = Arc::new(FormatAccess::new(qcow2));
        self.meta().header = Some(h);
        Ok(())
    }

    /// `ImageInfo` for `query-block` (and `qemu-img info`), with the backing chain.
    pub fn info(&self) -> ImageInfo {
        let meta = self.meta();
        let actual_size = self
            .file
            .metadata()
            .ok()
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512);
        let h = meta.header.as_ref();
        let backing_filename = h.and_then(|h| h.backing_file.clone());
        ImageInfo {
            filename: self.filename.clone(),
            format: self.format.as_str().to_string(),
            virtual_size: self.size(),
            actual_size,
            dirty_flag: Some(h.is_some_and(|h| h.dirty())),
            cluster_size: h.map(|h| h.cluster_size()),
            full_backing_filename: backing_filename
                .as_ref()
                .map(|b| path_combine(&self.filename, b)),
            backing_filename,
            backing_filename_format: h.and_then(|h| h.backing_format()),
            format_specific: h.map(|h| ImageInfoSpecific {
                kind: "qcow2".to_string(),
                data: qcow2_specific(h),
            }),
            backing_image: meta.backing.as_ref().map(|b| Box::new(b.info())),
        }
    }

    /// The allocation map, computed under a shared lock (see [`BlockDevice::block_status`]).
    fn status(fa: &Access, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(length).min(fa.size());
        let mut pos = offset;
        let mut out: Vec<Extent> = Vec::new();
        while pos < end && out.len() < MAX_EXTENTS {
            let (zero, data, allocated, len) = layer_status(fa, pos, end - pos)?;
            let len = len.min(end - pos);
            if len == 0 {
                break;
            }
            match out.last_mut() {
                Some(last)
                    if last.zero == zero
                        && last.data == data
                        && last.allocated_here == allocated =>
                {
                    last.length += len;
                }
                _ => out.push(Extent {
                    length: len,
                    zero,
                    data,
                    allocated_here: allocated,
                }),
            }
            pos += len;
        }
        Ok(out)
    }
}

/// Copies `len` bytes from `from` at `src` to `to` at `dst` in the kernel, all of them.
fn copy_file_range_all(
    from: &fs::File,
    src: u64,
    to: &fs::File,
    dst: u64,
    len: u64,
) -> io::Result<()> {
    let too_far = || io_other("copy beyond the largest file offset");
    let mut src = libc::off64_t::try_from(src).map_err(|_| too_far())?;
    let mut dst = libc::off64_t::try_from(dst).map_err(|_| too_far())?;
    let mut left = len;
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(usize::MAX);
        // SAFETY: both descriptors are open files borrowed for the call, and the two
        // offsets are valid locals the kernel only reads and updates.
        let k = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut src,
                to.as_raw_fd(),
                &mut dst,
                want,
                0,
            )
        };
        match u64::try_from(k) {
            Ok(0) => {
                return Err(io_other(
                    "copy_file_range: unexpected end of the source file",
                ));
            }
            Ok(k) => left -= k.min(left),
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// QEMU's `ImageInfoSpecificQCow2` for `h`.
fn qcow2_specific(h: &Header) -> ImageInfoSpecificQcow2 {
    let v3 = h.version >= 3;
    ImageInfoSpecificQcow2 {
        compat: if v3 { "1.1" } else { "0.10" }.to_string(),
        data_file: h.data_file(),
        data_file_raw: (v3 && h.has_data_file()).then(|| h.data_file_raw()),
        extended_l2: v3.then(|| h.extended_l2()),
        lazy_refcounts: v3.then(|| h.lazy_refcounts()),
        corrupt: v3.then(|| h.corrupt()),
        refcount_bits: 1 << h.refcount_order,
        compression_type: h.compression_name().to_string(),
    }
}

/// `(zero, data, allocated in this layer, length)` at `offset` of one layer, following
/// unallocated ranges down the chain. Matches QEMU's `bdrv_block_status` in its precise
/// mode (what `qemu-img map` and NBD `base:allocation` use): a raw file is data, or zero
/// where it has a hole; a qcow2 data cluster is data (QEMU asks the file for holes under
/// qcow2 data only for images preallocated with `preallocation=metadata`, which splitvmm
/// does not detect); a qcow2 zero cluster is zero, not data; a compressed cluster is
/// data; unallocated all the way down reads as zero.
fn layer_status(fa: &Access, offset: u64, max: u64) -> io::Result<(bool, bool, bool, u64)> {
    let (mapping, len) = fa.get_shallow_mapping(offset, max)?;
    Ok(match mapping {
        ShallowMapping::Raw {
            storage,
            offset: host,
            ..
        } => match fa.inner().format() {
            Format::Raw => {
                let (hole, hlen) = storage.hole_or_data(host, len)?;
                (hole, !hole, true, hlen.min(len).max(1))
            }
            _ => (false, true, true, len),
        },
        ShallowMapping::Indirect {
            layer,
            offset: lower,
            ..
        } => {
            let (zero, data, _, l) = layer_status(layer, lower, len)?;
            (zero, data, false, l.min(len))
        }
        ShallowMapping::Zero { explicit, .. } => (true, false, explicit, len),
        // Beyond the end of a backing image: reads as zeroes.
        ShallowMapping::Eof { .. } => (true, false, false, max),
        ShallowMapping::Special { .. } => (false, true, true, len),
        _ => (false, true, true, len.max(1)),
    })
}

impl BlockDevice for Node {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.is_read_only()
    }

    async fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let fa = self.fa.read().await;
        match without_waiting(|| fa.read(&mut *buf, offset)) {
            Err(e) if would_block(&e) => {
                // It has to wait for the disk: give way once first, so a caller that tried
                // it in passing (the guest path polls small requests once before giving
                // them a task) hands it to a task rather than waiting here.
                tokio::task::yield_now().await;
                blocking(|| fa.read(&mut *buf, offset))
            }
            r => r,
        }
    }

    async fn write(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.check_writable()?;
        let fa = self.fa.read().await;
        fa.write(buf, offset)?;
        self.commit(&fa).await?;
        if fua {
            blocking(|| fa.sync())?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> io::Result<()> {
        self.check_writable()?;
        if length == 0 {
            return Ok(());
        }
        match (self.format, self.qcow2_version()) {
            (ImageFormat::Raw, _) => {
                let fa = self.fa.read().await;
                let punch =
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
                let zero =
                    FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
                blocking(|| {
                    let first = if may_unmap { punch } else { zero };
                    self.fallocate(first, offset, length)
                        .or_else(|_| self.fallocate(zero, offset, length))
                        .or_else(|_| Self::write_zero_data(&fa, offset, length))
                })
            }
            (_, v) if v >= 3 && may_unmap => {
                let mut guard = self.fa.write().await;
                blocking(|| {
                    match Arc::get_mut(&mut guard) {
                        Some(fa) => fa.discard_to_zero(offset, length)?,
                        None => guard.write_zeroes(offset, length)?,
                    }
                    guard.flush()
                })
            }
            (_, v) if v >= 3 => {
                let fa = self.fa.read().await;
                blocking(|| fa.write_zeroes(offset, length))?;
                self.commit(&fa).await
            }
            _ => {
                // qcow2 v2 has no zero clusters: write zeroes as data, as QEMU does.
                let fa = self.fa.read().await;
                blocking(|| Self::write_zero_data(&fa, offset, length))?;
                self.commit(&fa).await
            }
        }
    }

    async fn discard(&self, offset: u64, length: u64) -> io::Result<()> {
        self.check_writable()?;
        if length == 0 {
            return Ok(());
        }
        if !self.is_qcow2() {
            let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            let _fa = self.fa.read().await;
            // Discard is advisory: a file system that cannot punch holes keeps the data.
            return match blocking(|| self.fallocate(punch, offset, length)) {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
                r => r,
            };
        }
        let v3 = self.qcow2_version() >= 3;
        let mut guard = self.fa.write().await;
        blocking(|| {
            if let Some(fa) = Arc::get_mut(&mut guard) {
                // v3: clusters become zero clusters and their space is freed; v2 has no
                // zero clusters, so (as in QEMU) they become unallocated.
                let r = if v3 {
                    fa.discard_to_any(offset, length)
                } else {
                    fa.discard_to_backing(offset, length)
                };
                match r {
                    Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
                    r => r?,
                }
            }
            guard.flush()
        })
    }

    async fn flush(&self) -> io::Result<()> {
        let fa = self.fa.read().await;
        if !self.is_read_only() {
            self.commit(&fa).await?;
        }
        blocking(|| fa.sync())
    }

    async fn block_status(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        let fa = self.fa.read().await;
        if offset >= fa.size() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "block status request beyond the end of the image",
            ));
        }
        Self::read_call(|| Self::status(&fa, offset, length))
    }
}
