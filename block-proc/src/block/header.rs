//! The qcow2 image header as the block layer reads it (for `query-block`/`qemu-img info`
//! members, the feature bits checked before imago opens an image, and the backing-format
//! extension of v2 images, which imago 0.2.6 does not parse), and the in-place rewrite of
//! the backing file name and backing-format extension, which imago lacks.
//!
//! Layout (qcow2 spec, `docs/interop/qcow2.txt`): the fixed header (72 bytes in v2,
//! `header_length` >= 104 in v3), then header extensions (`u32 type, u32 length, data`
//! padded to 8 bytes, ended by type 0), then, anywhere in the first cluster, the backing
//! file name (`backing_file_offset`, `backing_file_size`). QEMU parses extensions only up
//! to `backing_file_offset` when there is a backing file, so the name must follow them.
//!
//! # Rewriting the backing file, and what a crash leaves
//!
//! [`rewrite_backing`] never overwrites bytes the header on disk still refers to, and syncs
//! after every step, so a crash (process or host) at any point leaves one of these states:
//!
//! 1. Only when the backing *format* changes or goes away: the extension area is rewritten
//!    without the backing-format extension (it only shrinks, so it ends before the old name).
//!    State: old name, no format. splitvmm refuses to open such an image rather than probe;
//!    QEMU probes the (old, intact) backing file.
//! 2. The new name is written into free space in the first cluster, after both the old and
//!    the new extension area and not overlapping the old name. State: unchanged (nothing on
//!    disk refers to those bytes yet).
//! 3. `backing_file_offset` and `backing_file_size` (12 bytes within the first sector, one
//!    write) switch to the new name. State: new name, no format (or the old format when it
//!    did not change, which is then the right one).
//! 4. The final extension area is written, with the new backing-format extension. It may
//!    overwrite the old name, which nothing refers to any more. State: final.
//!
//! Removing the backing file clears the pointer first (step 3 with zeroes), then rewrites the
//! extension area. If an image has no end-of-extensions marker before its old name (very
//! old v2 images), steps 3 and 4 become one write of the fixed header and extension area.
//! If the name does not fit in the first cluster, the feature-name table (optional) is
//! dropped to make room; if it still does not fit, nothing is written.

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;

/// qcow2 magic, "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Backing file format name extension.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table extension.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// External data file name extension.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Compatible feature bits.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature bits.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Largest active L1 table QEMU opens (`QCOW_MAX_L1_SIZE`), in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;

/// Longest backing file name QEMU accepts.
const MAX_BACKING_NAME: usize = 1023;

/// One header extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// The parsed qcow2 header.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    /// Entries of the active L1 table, and where it is.
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub nb_snapshots: u32,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    /// Extensions in on-disk order (without the end marker).
    pub extensions: Vec<Extension>,
    /// Where the extension area ends (after the end marker, or where parsing had to stop).
    pub ext_end: u64,
    /// Whether the extension area has an end marker.
    pub ext_terminated: bool,
    pub backing_file: Option<String>,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn be32(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(o..o + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(o..o + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

impl Header {
    /// Reads and checks the header of `file`. Errors are worded as QEMU's qcow2 driver
    /// words them where it has a text.
    pub fn read(file: &fs::File) -> io::Result<Self> {
        let mut fixed = [0u8; 112];
        let n = read_at_most(file, &mut fixed, 0)?;
        if n < 72 || be32(&fixed, 0) != MAGIC {
            return Err(invalid("Image is not in qcow2 format"));
        }
        let version = be32(&fixed, 4);
        if !(2..=3).contains(&version) {
            return Err(invalid(format!("Unsupported qcow2 version {version}")));
        }
        let cluster_bits = be32(&fixed, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(invalid(format!(
                "Cluster size must be a power of two between 512 and 2048k (2^{cluster_bits})"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(&fixed, 8),
            backing_file_size: be32(&fixed, 16),
            cluster_bits,
            size: be64(&fixed, 24),
            crypt_method: be32(&fixed, 32),
            l1_size: be32(&fixed, 36),
            l1_table_offset: be64(&fixed, 40),
            nb_snapshots: be32(&fixed, 60),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 72,
            compression_type: 0,
            extensions: Vec::new(),
            ext_end: 72,
            ext_terminated: false,
            backing_file: None,
        };
        if version == 3 {
            if n < 104 {
                return Err(invalid("qcow2 header exceeds cluster size"));
            }
            h.incompatible = be64(&fixed, 72);
            h.compatible = be64(&fixed, 80);
            h.autoclear = be64(&fixed, 88);
            h.refcount_order = be32(&fixed, 96);
            h.header_length = be32(&fixed, 100);
            if h.header_length < 104 {
                return Err(invalid("qcow2 header too short"));
            }
            if u64::from(h.header_length) > cluster_size {
                return Err(invalid("qcow2 header exceeds cluster size"));
            }
            if h.header_length > 104 {
                h.compression_type = fixed[104];
            }
        }
        if h.refcount_order > 6 {
            return Err(invalid(
                "Reference count entry width too large; may not exceed 64 bits",
            ));
        }
        h.check_l1()?;

        let mut cluster = vec![0u8; usize::try_from(cluster_size).unwrap_or(512)];
        let n = read_at_most(file, &mut cluster, 0)?;
        cluster.truncate(n);
        if version == 3 {
            check_extensions_for_imago(&cluster, h.header_length, cluster_size)?;
        }

        let ext_limit = if h.backing_file_offset != 0 {
            h.backing_file_offset.min(cluster_size)
        } else {
            cluster_size
        };
        let mut off = u64::from(h.header_length);
        h.ext_end = off;
        while off < ext_limit {
            if off + 8 > ext_limit {
                return Err(invalid("Header extension too large"));
            }
            let o = usize::try_from(off).map_err(|_| invalid("Header extension too large"))?;
            let kind = be32(&cluster, o);
            let len = u64::from(be32(&cluster, o + 4));
            off += 8;
            if kind == 0 {
                h.ext_terminated = true;
                break;
            }
            if len > ext_limit - off {
                return Err(invalid("Header extension too large"));
            }
            let start = o + 8;
            let data = cluster
                .get(start..start + len as usize)
                .ok_or_else(|| invalid("Header extension too large"))?
                .to_vec();
            h.extensions.push(Extension { kind, data });
            off += len.next_multiple_of(8);
        }
        h.ext_end = off.min(ext_limit.max(u64::from(h.header_length)));

        if h.backing_file_offset != 0 {
            let len = h.backing_file_size as usize;
            if h.backing_file_offset > cluster_size || len > MAX_BACKING_NAME {
                return Err(invalid("Backing file name too long"));
            }
            let start = h.backing_file_offset as usize;
            let name = cluster
                .get(start..start + len)
                .ok_or_else(|| invalid("Backing file name too long"))?;
            let name = String::from_utf8(name.to_vec())
                .map_err(|_| invalid("Backing file name is not valid UTF-8"))?;
            h.backing_file = Some(name);
        }
        Ok(h)
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// QEMU's checks of the active L1 table (`qcow2_do_open`), with its words: the table is
    /// at most [`MAX_L1_BYTES`], cluster-aligned, and has an entry for every part of the
    /// virtual size, which may not need more than `INT_MAX` entries. imago 0.2.6 checks only
    /// the first two: an image whose L1 table is smaller than its size opened, and a
    /// `block_status` over its whole (up to 2^64-byte) size then walked the uncovered part
    /// one L2 range at a time, practically forever (found by the `qcow2_open` fuzz target).
    fn check_l1(&self) -> io::Result<()> {
        let entries = u64::from(self.l1_size);
        if entries > MAX_L1_BYTES / 8 {
            return Err(invalid("Active L1 table too large"));
        }
        let end_ok = (i64::MAX as u64)
            .checked_sub(entries * 8)
            .is_some_and(|room| self.l1_table_offset <= room);
        if !end_ok || !self.l1_table_offset.is_multiple_of(self.cluster_size()) {
            return Err(invalid("Active L1 table offset invalid"));
        }
        // Bytes one L1 entry maps: a cluster of L2 entries (16 bytes each with extended L2),
        // each mapping a cluster. QEMU's `size_to_l1`, without its wrap-around near 2^64.
        let l2_bits = self.cluster_bits - if self.extended_l2() { 4 } else { 3 };
        let shift = self.cluster_bits + l2_bits;
        let needed = (u128::from(self.size) + (1u128 << shift) - 1) >> shift;
        if needed > i32::MAX as u128 {
            return Err(invalid("Image is too big"));
        }
        if u128::from(entries) < needed {
            return Err(invalid("L1 table is too small"));
        }
        Ok(())
    }

    fn ext_string(&self, kind: u32) -> Option<String> {
        self.extensions
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| String::from_utf8_lossy(&e.data).into_owned())
    }

    /// The backing-format extension (`backing-filename-format`).
    pub fn backing_format(&self) -> Option<String> {
        self.ext_string(EXT_BACKING_FORMAT)
    }

    /// The external data file name extension.
    pub fn data_file(&self) -> Option<String> {
        self.ext_string(EXT_DATA_FILE)
    }

    pub fn dirty(&self) -> bool {
        self.incompatible & INCOMPAT_DIRTY != 0
    }

    pub fn corrupt(&self) -> bool {
        self.incompatible & INCOMPAT_CORRUPT != 0
    }

    pub fn lazy_refcounts(&self) -> bool {
        self.compatible & COMPAT_LAZY_REFCOUNTS != 0
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    pub fn has_data_file(&self) -> bool {
        self.incompatible & INCOMPAT_DATA_FILE != 0
    }

    pub fn data_file_raw(&self) -> bool {
        self.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0
    }

    /// `compression-type` as QEMU names it.
    pub fn compression_name(&self) -> &'static str {
        if self.incompatible & INCOMPAT_COMPRESSION != 0 && self.compression_type == 1 {
            "zstd"
        } else {
            "zlib"
        }
    }
}

/// Size of one entry of the feature name table.
const FEATURE_ENTRY: u32 = 48;

/// Refuses what imago 0.2.6 would panic on, walking the v3 extension area as it does (from
/// `header_length` to the end marker, within the first cluster, whatever the backing file
/// offset): a feature name table whose length is not a whole number of 48-byte entries
/// (its parser indexes into a short last entry, and a panic aborts block-proc). QEMU reads
/// such a table anyway; refusing the image is a deviation, for images no QEMU tool writes.
/// Found by the `qcow2_open` fuzz target.
fn check_extensions_for_imago(
    cluster: &[u8],
    header_length: u32,
    cluster_size: u64,
) -> io::Result<()> {
    let mut off = u64::from(header_length);
    while off + 8 <= cluster_size {
        let Some(o) = usize::try_from(off)
            .ok()
            .filter(|&o| o + 8 <= cluster.len())
        else {
            // Past the end of the file: imago reads no further extension.
            return Ok(());
        };
        let (kind, len) = (be32(cluster, o), be32(cluster, o + 4));
        if kind == 0 {
            return Ok(());
        }
        if kind == EXT_FEATURE_TABLE && len % FEATURE_ENTRY != 0 {
            return Err(invalid(format!(
                "Feature name table of {len} bytes is not a whole number of \
                 {FEATURE_ENTRY}-byte entries"
            )));
        }
        off += 8 + u64::from(len).next_multiple_of(8);
    }
    Ok(())
}

/// Reads up to `buf.len()` bytes at `offset`; returns how many (short at EOF).
fn read_at_most(file: &fs::File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let Some(rest) = buf.get_mut(done..) else {
            break;
        };
        match file.read_at(rest, offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The extension area's bytes for `exts`, end marker included.
fn serialize_extensions(exts: &[Extension]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    for e in exts {
        let len = u32::try_from(e.data.len()).map_err(|_| invalid("Header extension too large"))?;
        out.extend_from_slice(&e.kind.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&e.data);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out.extend_from_slice(&[0u8; 8]);
    Ok(out)
}

/// Writes the steps of a rewrite, each followed by `fdatasync`. Tests stop it after a
/// number of writes to look at what a crash would leave.
struct Steps<'a> {
    file: &'a fs::File,
    /// Writes still allowed (`None`: all).
    budget: Option<usize>,
}

impl Steps<'_> {
    fn write(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &mut self.budget {
            Some(0) => return Ok(()),
            Some(n) => *n -= 1,
            None => {}
        }
        self.file.write_all_at(buf, offset)?;
        self.file.sync_data()
    }
}

/// Rewrites the backing file name and backing-format extension of the qcow2 image in
/// `file` in place, in the crash-safe order the module documentation describes. `file`
/// must be open read/write, and nobody may change the header meanwhile (the caller holds
/// the image exclusively). Returns the header as it now is on disk.
pub fn rewrite_backing(file: &fs::File, backing: Option<(&str, &str)>) -> io::Result<Header> {
    rewrite_backing_steps(file, backing, None)
}

/// [`rewrite_backing`], stopping after `budget` writes if given (a simulated crash).
pub(crate) fn rewrite_backing_steps(
    file: &fs::File,
    backing: Option<(&str, &str)>,
    budget: Option<usize>,
) -> io::Result<Header> {
    let mut steps = Steps { file, budget };
    let old = Header::read(file)?;
    let cs = old.cluster_size();
    let ext_start = u64::from(old.header_length);

    if let Some((name, fmt)) = backing {
        if name.is_empty() {
            return Err(invalid("Backing file name must not be empty"));
        }
        if name.len() > MAX_BACKING_NAME {
            return Err(invalid("Backing file name too long"));
        }
        if fmt.is_empty() {
            return Err(invalid("Backing file format must not be empty"));
        }
    }

    let others = |drop_table: bool| -> Vec<Extension> {
        old.extensions
            .iter()
            .filter(|e| {
                e.kind != EXT_BACKING_FORMAT && !(drop_table && e.kind == EXT_FEATURE_TABLE)
            })
            .cloned()
            .collect()
    };
    let old_format = old.backing_format();
    let old_name = old.backing_file.as_ref().map(|n| {
        (
            old.backing_file_offset,
            old.backing_file_offset + n.len() as u64,
        )
    });

    let Some((name, fmt)) = backing else {
        // Removal: pointer first, then the extension area without the format.
        let exts = serialize_extensions(&others(false))?;
        if ext_start + exts.len() as u64 > cs {
            return Err(invalid("Header extensions exceed the first cluster"));
        }
        write_pointer_and_area(&mut steps, &old, [0u8; 12], &exts)?;
        return Header::read(file);
    };

    // Find a layout: keep the feature-name table if the name still fits.
    let mut plan = None;
    for drop_table in [false, true] {
        let mut exts = others(drop_table);
        // QEMU writes the backing format right after the fixed header.
        exts.insert(
            0,
            Extension {
                kind: EXT_BACKING_FORMAT,
                data: fmt.as_bytes().to_vec(),
            },
        );
        let final_area = serialize_extensions(&exts)?;
        let interim_area = serialize_extensions(&others(drop_table))?;
        let new_ext_end = ext_start + final_area.len() as u64;
        let mut at = new_ext_end.max(old.ext_end);
        if let Some((s, e)) = old_name
            && at < e
            && at + name.len() as u64 > s
        {
            at = e;
        }
        if at + (name.len() as u64) < cs {
            plan = Some((final_area, interim_area, at));
            break;
        }
        if !old.extensions.iter().any(|e| e.kind == EXT_FEATURE_TABLE) {
            break;
        }
    }
    let Some((final_area, interim_area, at)) = plan else {
        return Err(invalid(format!(
            "Backing file name '{name}' does not fit in the image header"
        )));
    };

    // 1. Drop a format that is about to change.
    if old_format.is_some() && old_format.as_deref() != Some(fmt) && old.ext_terminated {
        steps.write(&interim_area, ext_start)?;
    }
    // 2. The new name, in bytes nothing refers to.
    steps.write(name.as_bytes(), at)?;
    // 3 and 4. Pointer, then the final extension area.
    let mut ptr = [0u8; 12];
    ptr[..8].copy_from_slice(&at.to_be_bytes());
    ptr[8..].copy_from_slice(&(name.len() as u32).to_be_bytes());
    write_pointer_and_area(&mut steps, &old, ptr, &final_area)?;
    Header::read(file)
}

/// Steps 3 and 4: the backing name pointer (`backing_file_offset`, `backing_file_size`),
/// then the extension area `area`.
fn write_pointer_and_area(
    steps: &mut Steps<'_>,
    old: &Header,
    ptr: [u8; 12],
    area: &[u8],
) -> io::Result<()> {
    let ext_start = u64::from(old.header_length);
    if old.ext_terminated || old.backing_file.is_none() {
        steps.write(&ptr, 8)?;
        return steps.write(area, ext_start);
    }
    // No end marker before the old name: the old extension area runs into the old name,
    // so the pointer and the extension area must change together, in one write.
    let len = usize::try_from(ext_start - 8).map_err(|_| invalid("qcow2 header too large"))?;
    let mut fixed = vec![0u8; len];
    read_at_most(steps.file, &mut fixed, 8)?;
    if let Some(p) = fixed.get_mut(..12) {
        p.copy_from_slice(&ptr);
    }
    fixed.extend_from_slice(area);
    steps.write(&fixed, 8)
}
