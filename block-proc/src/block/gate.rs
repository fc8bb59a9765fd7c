//! [`DirGate`]: the one place where the block layer opens image files, as an imago
//! [`ImplicitOpenGate`]. A file is opened only if its name, resolved (symlinks followed,
//! `..` removed) relative to the current directory, lies under one of the allowed
//! directories; the open takes the image locks ([`super::lock`]) before anything is read.
//!
//! The block layer opens the top image and every backing file itself through
//! [`DirGate::open_file`] (it reads the backing name and format from the header and never
//! probes). imago calls the gate for the dependencies it opens implicitly: an external data
//! file comes through [`ImplicitOpenGate::open_storage`]; format layers are never opened
//! implicitly (every qcow2 image is given its backing explicitly), so
//! [`ImplicitOpenGate::open_format`] refuses.
//!
//! Landlock (DESIGN.md §7) enforces the same directories once block-proc is jailed; the
//! gate gives a clear error before that, and applies when the jail is off.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use imago::format::gate::ImplicitOpenGate;
use imago::{FormatAccess, FormatDriverBuilder, StorageOpenOptions};

use super::error::Error;
use super::file::ImageFile;
use super::lock::{self, LockMode};

/// Opens files under the allowed directories only.
#[derive(Debug, Clone)]
pub struct DirGate {
    /// Canonical allowed directories.
    dirs: Vec<PathBuf>,
    /// Writability and locks for files imago opens implicitly (a data file).
    writable: bool,
    mode: LockMode,
}

impl DirGate {
    /// A gate for `dirs` (canonicalised here; directories that do not exist are dropped).
    /// An empty list allows nothing.
    pub fn new(dirs: &[PathBuf]) -> Self {
        Self {
            dirs: dirs
                .iter()
                .filter_map(|d| fs::canonicalize(d).ok())
                .collect(),
            writable: false,
            mode: LockMode::READ_ONLY,
        }
    }

    /// The same gate, for files that belong to an image opened with `writable`.
    pub fn for_image(&self, writable: bool) -> Self {
        Self {
            dirs: self.dirs.clone(),
            writable,
            mode: if writable {
                LockMode::READ_WRITE
            } else {
                LockMode::READ_ONLY
            },
        }
    }

    /// Resolves `name` and checks it lies under an allowed directory.
    pub fn admit(&self, name: &str) -> Result<PathBuf, Error> {
        let resolved = fs::canonicalize(name).map_err(|e| Error::open(name, &e))?;
        if self.dirs.iter().any(|d| resolved.starts_with(d)) {
            Ok(resolved)
        } else {
            Err(Error::OutsideDirs {
                name: name.to_string(),
                resolved: resolved.display().to_string(),
            })
        }
    }

    /// Opens `name` (read/write if `writable`), taking the locks of `mode`. Returns the
    /// storage object and the resolved path.
    pub fn open_file(
        &self,
        name: &str,
        writable: bool,
        mode: LockMode,
    ) -> Result<(ImageFile, PathBuf), Error> {
        let resolved = self.admit(name)?;
        let file = open_resolved(&resolved, writable).map_err(|e| Error::open(name, &e))?;
        lock::acquire(&file, mode)?;
        let storage = ImageFile::new(file, name, writable).map_err(|e| Error::open(name, &e))?;
        Ok((storage, resolved))
    }
}

/// Opens an already resolved path; refuses a last component that turned into a symlink
/// since it was resolved.
fn open_resolved(path: &Path, writable: bool) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

impl ImplicitOpenGate<ImageFile> for DirGate {
    fn open_format<F: FormatDriverBuilder<ImageFile>>(
        &mut self,
        builder: F,
    ) -> io::Result<FormatAccess<ImageFile>> {
        let name = builder
            .get_image_path()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("Opening implicitly referenced image '{name}' denied"),
        ))
    }

    fn open_storage(&mut self, opts: StorageOpenOptions) -> io::Result<ImageFile> {
        let name = opts
            .get_filename()
            .map(|p| p.display().to_string())
            .ok_or_else(|| io::Error::other("Implicitly referenced file has no name"))?;
        let (storage, _) = self.open_file(&name, self.writable, self.mode)?;
        Ok(storage)
    }
}
