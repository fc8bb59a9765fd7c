//! [`MetadataOrder`]: the qcow2 write-ordering rules imago 0.2.6 misses, enforced at the
//! storage layer, so that killing block-proc at any instant leaves an image `qemu-img
//! check` finds no error in (leaks aside).
//!
//! imago allocates clusters by raising their refcount in its refcount-block *cache*, and
//! means to write refcount blocks before anything that points to new clusters. It misses
//! in two ways:
//!
//! - Three kinds of pointer it writes straight to the file, without writing the refcount
//!   blocks first (QEMU flushes its refcount cache before each of them):
//!   1. an L1 entry pointing to a newly allocated L2 table;
//!   2. the header's L1 table pointer, when the L1 table grows into new clusters;
//!   3. a refcount-table entry pointing to a new refcount block whose own refcount lives in
//!      another (cached) refcount block.
//! - **L2 tables.** Before it evicts an L2 table from its cache, imago flushes the
//!   refcount-block cache, then writes the table. Another request may allocate a cluster
//!   and enter it into that table in between (the caches are shared by every request in
//!   flight), so the table reaches the disk pointing to a cluster whose refcount does not.
//!   The crash test (`acknowledged_writes_survive_sigkill`, six writers) caught this once.
//!
//! A crash between such a write and imago's next cache flush leaves a cluster in use with
//! refcount 0 on disk (`ERROR cluster N refcount=0 reference=1`), which a later allocation
//! could hand out again. The block layer cannot make imago flush in the middle of its own
//! call, but it sees every write to the image file ([`super::file::ImageFile`]): before a
//! write reaches the L1 table, the header's table pointers, the refcount table or an L2
//! table the L1 table points to, this module finds the clusters the write newly points to
//! (for a new L2 table, also those its entries on disk point to) and, if their refcount on
//! disk is still 0, writes 1 into the refcount block on disk (2 to 8 bytes, just that
//! entry). imago's cache holds the same value for them (it has just allocated them), so its
//! later write of the whole block agrees.
//!
//! Freeing needs no rule here. imago clears a pointer in its L2 cache, then announces the
//! freeing direction (taking its cache-direction lock exclusively), then lowers the count
//! in its refcount-block cache; every write of a refcount block, by a flush or an eviction,
//! holds that lock shared and writes the L2 cache first. So a refcount block carrying a
//! lowered count reaches the disk only after an L2 write-back that began after the pointer
//! was cleared. (The allocating race above exists because imago raises counts *after*
//! announcing the allocating direction, where the lock no longer orders them.)
//! `the_image_is_consistent_right_after_every_refcount_block_write` checks the image after
//! every refcount-block write while compressed clusters are replaced and freed; it fails if
//! the flush writes refcount blocks first. The eviction path it cannot reach with one
//! writer; that rests on the lock argument.
//!
//! Corrupt images: imago allocates whatever cluster the refcounts on disk call free, even
//! one that holds metadata, and writes over it. So a writable open is refused when a
//! cluster of the header, the L1 table, the refcount table or blocks, or an L2 table has
//! refcount 0 ([`MetadataOrder::new`]). One can still be freed later (a compressed entry
//! whose bytes lie in the header cluster counts for nothing, so overwriting it frees the
//! header); for that, a write that would change the header's magic, version or cluster size
//! is refused with QEMU's overlap-check words. Every offset read from the image is used
//! with saturating arithmetic.
//!
//! Refcount widths below 8 bits would need a read-modify-write of a byte shared with other
//! entries imago may be writing at the same time; images with such widths are not opened
//! for writing (see [`MetadataOrder::new`]).

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

/// Offset bits of an L1 entry.
const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Offset bits of a refcount-table entry.
const RT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Offset bits of a standard L2 entry.
const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// An L2 entry that describes compressed data.
const L2_COMPRESSED: u64 = 1 << 62;
/// Incompatible feature bits: an external data file (whose clusters have no refcounts),
/// extended L2 entries (16 bytes each, the offset in the first 8).
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_EXTL2: u64 = 1 << 4;
/// The header bytes that hold the table pointers (the v2 header).
const HEADER_FIELDS: u64 = 72;

/// Where the tables are, as the header on disk says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    cluster_bits: u32,
    refcount_order: u32,
    l1_offset: u64,
    l1_entries: u64,
    rt_offset: u64,
    rt_clusters: u64,
}

impl Geometry {
    fn parse(h: &[u8], refcount_order: u32) -> Self {
        let be32 = |o: usize| {
            h.get(o..o + 4)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u32::from_be_bytes)
        };
        let be64 = |o: usize| {
            h.get(o..o + 8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_be_bytes)
        };
        Self {
            cluster_bits: be32(20),
            refcount_order,
            l1_entries: u64::from(be32(36)),
            l1_offset: be64(40),
            rt_offset: be64(48),
            rt_clusters: u64::from(be32(56)),
        }
    }

    fn rb_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.refcount_order
    }

    fn rt_entries(&self) -> u64 {
        (self.rt_clusters << self.cluster_bits) / 8
    }

    /// Where the L1 table ends (saturated: the offsets come from the image file).
    fn l1_end(&self) -> u64 {
        self.l1_offset.saturating_add(self.l1_entries * 8)
    }

    /// Where the refcount table ends (saturated likewise).
    fn rt_end(&self) -> u64 {
        self.rt_offset
            .saturating_add(self.rt_clusters << self.cluster_bits)
    }
}

/// Keeps pointer writes behind the refcounts they depend on. See the module documentation.
#[derive(Debug)]
pub struct MetadataOrder {
    /// The table regions, for a cheap check on every write.
    l1: (AtomicU64, AtomicU64),
    rt: (AtomicU64, AtomicU64),
    /// The full geometry; held across a pointer write and its refcount fix-ups.
    geometry: Mutex<Geometry>,
    /// The clusters of the L2 tables the L1 table on disk points to (none tracked for an
    /// image with an external data file: its L2 entries point into that file).
    l2_tables: RwLock<BTreeSet<u64>>,
    track_l2: bool,
    /// The cluster size (log2), which never changes: here so that `touches` takes no lock.
    cluster_bits: u32,
    /// Bytes per L2 entry: 8, or 16 with extended L2 entries.
    l2_entry: u64,
}

/// The clusters the bytes `start..end` of the file lie in; none for an empty range.
fn clusters_in(start: u64, end: u64, cluster_bits: u32) -> Range<u64> {
    if end <= start {
        return 0..0;
    }
    (start >> cluster_bits)..((end - 1) >> cluster_bits) + 1
}

fn overlaps(offset: u64, len: u64, start: u64, end: u64) -> bool {
    offset < end && start < offset.saturating_add(len)
}

fn read_exact(file: &fs::File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    file.read_exact_at(buf, offset)
}

impl MetadataOrder {
    /// Reads the table geometry from the qcow2 header in `file`. Refuses refcount widths
    /// below 8 bits, and images with metadata of refcount 0.
    pub fn new(file: &fs::File) -> io::Result<Self> {
        let mut h = [0u8; 104];
        read_exact(file, &mut h[..HEADER_FIELDS as usize], 0)?;
        let version = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let (refcount_order, incompatible) = if version >= 3 {
            read_exact(file, &mut h[72..100], 72)?;
            (
                u32::from_be_bytes([h[96], h[97], h[98], h[99]]),
                u64::from_be_bytes([h[72], h[73], h[74], h[75], h[76], h[77], h[78], h[79]]),
            )
        } else {
            (4, 0)
        };
        if refcount_order < 3 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "qcow2 images with refcount_bits={} cannot be opened read/write",
                    1u32 << refcount_order
                ),
            ));
        }
        let g = Geometry::parse(&h, refcount_order);
        let track_l2 = incompatible & INCOMPAT_DATA_FILE == 0;
        let l2_tables = l2_tables(file, &g)?;
        check_metadata_refcounts(file, &g, &l2_tables)?;
        let l2_tables = if track_l2 { l2_tables } else { BTreeSet::new() };
        let this = Self {
            l1: (AtomicU64::new(0), AtomicU64::new(0)),
            rt: (AtomicU64::new(0), AtomicU64::new(0)),
            geometry: Mutex::new(g),
            l2_tables: RwLock::new(l2_tables),
            track_l2,
            cluster_bits: g.cluster_bits,
            l2_entry: if incompatible & INCOMPAT_EXTL2 != 0 {
                16
            } else {
                8
            },
        };
        this.publish(&g);
        Ok(this)
    }

    fn publish(&self, g: &Geometry) {
        self.l1.0.store(g.l1_offset, Ordering::Release);
        self.l1.1.store(g.l1_end(), Ordering::Release);
        self.rt.0.store(g.rt_offset, Ordering::Release);
        self.rt.1.store(g.rt_end(), Ordering::Release);
    }

    /// Whether a write of `len` bytes at `offset` touches a pointer region or an L2 table.
    pub fn touches(&self, offset: u64, len: u64) -> bool {
        self.touches_l2(offset, len)
            || offset < HEADER_FIELDS
            || overlaps(
                offset,
                len,
                self.l1.0.load(Ordering::Acquire),
                self.l1.1.load(Ordering::Acquire),
            )
            || overlaps(
                offset,
                len,
                self.rt.0.load(Ordering::Acquire),
                self.rt.1.load(Ordering::Acquire),
            )
    }

    /// Whether a write of `len` bytes at `offset` overlaps an L2 table.
    fn touches_l2(&self, offset: u64, len: u64) -> bool {
        self.clusters_of(offset, len).is_some_and(|r| {
            let tables = self.l2_tables.read().unwrap_or_else(|p| p.into_inner());
            tables.range(r).next().is_some()
        })
    }

    /// The L2 tables a write of `len` bytes at `offset` overlaps.
    fn l2_tables_in(&self, offset: u64, len: u64) -> Vec<u64> {
        self.clusters_of(offset, len).map_or_else(Vec::new, |r| {
            let tables = self.l2_tables.read().unwrap_or_else(|p| p.into_inner());
            tables.range(r).copied().collect()
        })
    }

    /// The clusters a write of `len` bytes at `offset` spans, where L2 tables are watched.
    fn clusters_of(&self, offset: u64, len: u64) -> Option<Range<u64>> {
        self.track_l2
            .then(|| clusters_in(offset, offset.saturating_add(len), self.cluster_bits))
    }

    /// Counts L2 table `table`, about to become reachable: its own refcount and, where L2
    /// tables are watched, those of the clusters its entries on disk point to.
    fn reach_table(&self, file: &fs::File, g: &Geometry, table: u64) -> io::Result<()> {
        ensure_refcount(file, g, table, None)?;
        if self.track_l2 {
            self.count_entries(file, g, table)?;
        }
        Ok(())
    }

    /// Performs `write` (which writes `data` at `offset` to `file`) after making sure every
    /// cluster `data` newly points to has a refcount on disk.
    pub fn pointer_write(
        &self,
        file: &fs::File,
        offset: u64,
        data: &[u8],
        write: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        let mut g = self.geometry.lock().unwrap_or_else(|p| p.into_inner());
        let len = data.len() as u64;
        let mut new_geometry = *g;
        // What the write does to the set of L2 tables: a new set (the L1 table moved), or
        // tables leaving and joining it (L1 entries changed).
        let mut new_tables: Option<BTreeSet<u64>> = None;
        let mut left = Vec::new();
        let mut joined = Vec::new();

        if offset < HEADER_FIELDS {
            let mut h = [0u8; HEADER_FIELDS as usize];
            read_exact(file, &mut h, 0)?;
            let before = h;
            for (i, b) in data.iter().enumerate() {
                if let Some(slot) = h.get_mut((offset + i as u64) as usize) {
                    *slot = *b;
                }
            }
            // The magic, the version and the cluster size never change: a write that would
            // change them is not a header update but a table or data cluster of a corrupt
            // image landing on the header. QEMU's overlap check refuses it, with these words.
            if h[..8] != before[..8] || h[20..24] != before[20..24] {
                return Err(io::Error::other(
                    "Preventing invalid write on metadata (overlaps with qcow2_header)",
                ));
            }
            new_geometry = Geometry::parse(&h, g.refcount_order);
            let (n, bits) = (&new_geometry, g.cluster_bits);
            if n.l1_offset != g.l1_offset || n.l1_entries > g.l1_entries {
                for c in clusters_in(n.l1_offset, n.l1_end(), bits) {
                    ensure_refcount(file, n, c, None)?;
                }
            }
            if n.rt_offset != g.rt_offset || n.rt_clusters != g.rt_clusters {
                for c in clusters_in(n.rt_offset, n.rt_end(), bits) {
                    ensure_refcount(file, n, c, None)?;
                }
            }
            // A moved L1 table: the L2 tables it points to (already written there) become
            // the ones to watch, and any it points to anew must be counted, with their
            // entries, before the header makes them reachable.
            if self.track_l2
                && (new_geometry.l1_offset != g.l1_offset
                    || new_geometry.l1_entries != g.l1_entries)
            {
                let tables = l2_tables(file, &new_geometry)?;
                let old = self
                    .l2_tables
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                for &t in tables.difference(&old) {
                    self.reach_table(file, &new_geometry, t)?;
                }
                new_tables = Some(tables);
            }
        }

        let (l1_start, l1_end) = (g.l1_offset, g.l1_end());
        if overlaps(offset, len, l1_start, l1_end) {
            for (_, new, old) in changed_entries(file, offset, data, l1_start, l1_end)? {
                let (new, old) = (new & L1_OFFSET_MASK, old & L1_OFFSET_MASK);
                if new == old {
                    continue;
                }
                if new != 0 {
                    self.reach_table(file, &g, new >> g.cluster_bits)?;
                    joined.push(new >> g.cluster_bits);
                }
                if old != 0 {
                    left.push(old >> g.cluster_bits);
                }
            }
        }

        let tables = self.l2_tables_in(offset, len);
        if !tables.is_empty() {
            let mut clusters = Vec::new();
            for t in tables {
                let start = t << g.cluster_bits;
                let end = start.saturating_add(1 << g.cluster_bits);
                for (index, new, _) in changed_entries(file, offset, data, start, end)? {
                    // With 16-byte entries, every other word is a subcluster bitmap.
                    if (index * 8) % self.l2_entry == 0 {
                        clusters.extend(entry_clusters(new, g.cluster_bits).into_iter().flatten());
                    }
                }
            }
            ensure_covered_refcounts(file, &g, clusters)?;
        }

        let (rt_start, rt_end) = (g.rt_offset, g.rt_end());
        if overlaps(offset, len, rt_start, rt_end) {
            for (index, new, old) in changed_entries(file, offset, data, rt_start, rt_end)? {
                let (new, old) = (new & RT_OFFSET_MASK, old & RT_OFFSET_MASK);
                if new == 0 || new == old {
                    continue;
                }
                let cluster = new >> g.cluster_bits;
                // A refcount block that covers itself holds its own refcount.
                if cluster >> g.rb_bits() == index {
                    continue;
                }
                ensure_refcount(file, &g, cluster, Some((offset, data)))?;
            }
        }

        write()?;
        if new_geometry != *g {
            *g = new_geometry;
            self.publish(&g);
        }
        if self.track_l2 && (new_tables.is_some() || !left.is_empty() || !joined.is_empty()) {
            let mut set = self.l2_tables.write().unwrap_or_else(|p| p.into_inner());
            if let Some(tables) = new_tables {
                *set = tables;
            }
            for t in left {
                set.remove(&t);
            }
            set.extend(joined);
        }
        Ok(())
    }

    /// Makes the on-disk refcount of every cluster the entries of L2 table `table` (as on
    /// disk) point to at least 1: for a table about to become reachable.
    fn count_entries(&self, file: &fs::File, g: &Geometry, table: u64) -> io::Result<()> {
        let mut t = vec![0u8; 1 << g.cluster_bits];
        // A table imago has not written yet reads short (or as zeroes): nothing to count.
        let n = file.read_at(&mut t, table << g.cluster_bits)?;
        let mut clusters = Vec::new();
        for e in t[..n].chunks_exact(self.l2_entry as usize) {
            let entry = e
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_be_bytes);
            clusters.extend(entry_clusters(entry, g.cluster_bits).into_iter().flatten());
        }
        ensure_covered_refcounts(file, g, clusters)
    }
}

/// The clusters of the image file that L2 `entry` points to: one for a standard entry
/// with an offset (data, or preallocated zeroes), those its bytes span for compressed data,
/// none for an unallocated one.
fn entry_clusters(entry: u64, cluster_bits: u32) -> Option<std::ops::RangeInclusive<u64>> {
    if entry & L2_COMPRESSED != 0 {
        // The offset takes the low 62 - (cluster_bits - 8) bits, the count of further
        // 512-byte sectors the rest up to bit 61.
        let x = 62 - (cluster_bits - 8);
        let off = entry & ((1u64 << x) - 1);
        let sectors = (entry >> x) & ((1u64 << (cluster_bits - 8)) - 1);
        let end = (off & !511) + (sectors + 1) * 512;
        return Some((off >> cluster_bits)..=((end - 1) >> cluster_bits));
    }
    let off = entry & L2_OFFSET_MASK;
    (off != 0).then(|| (off >> cluster_bits)..=(off >> cluster_bits))
}

/// The clusters of the L2 tables the L1 table on disk points to.
fn l2_tables(file: &fs::File, g: &Geometry) -> io::Result<BTreeSet<u64>> {
    let mut l1 = vec![0u8; (g.l1_entries * 8) as usize];
    let n = file.read_at(&mut l1, g.l1_offset)?;
    Ok(l1[..n]
        .chunks_exact(8)
        .filter_map(|b| b.try_into().ok())
        .map(|b| u64::from_be_bytes(b) & L1_OFFSET_MASK)
        .filter(|&off| off != 0)
        .map(|off| off >> g.cluster_bits)
        .collect())
}

/// `(index, new value, old value)` of each 8-byte table entry (table at `start..end`) that
/// `data`, to be written at `offset`, covers completely and changes. Runs on every L2 table
/// write-back, so it compares 64 bytes at a time and reads the old bytes into a buffer the
/// thread keeps.
fn changed_entries(
    file: &fs::File,
    offset: u64,
    data: &[u8],
    start: u64,
    end: u64,
) -> io::Result<Vec<(u64, u64, u64)>> {
    thread_local! {
        static OLD: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let Some(from) = offset.max(start).checked_next_multiple_of(8) else {
        return Ok(Vec::new());
    };
    let to = offset.saturating_add(data.len() as u64).min(end);
    if from.saturating_add(8) > to {
        return Ok(Vec::new());
    }
    let to = from + (to - from) / 8 * 8;
    let Some(new) = data.get((from - offset) as usize..(to - offset) as usize) else {
        return Ok(Vec::new());
    };
    OLD.with_borrow_mut(|old| {
        old.clear();
        old.resize(new.len(), 0);
        // The table may end beyond the end of the file while it is being extended: what
        // is not there reads as zeroes.
        let _ = file.read_at(old, from)?;
        let be = |b: &[u8]| b.try_into().map_or(0, u64::from_be_bytes);
        let mut out = Vec::new();
        for (k, (n, o)) in new.chunks(64).zip(old.chunks(64)).enumerate() {
            if n == o {
                continue;
            }
            for (j, (n8, o8)) in n.chunks_exact(8).zip(o.chunks_exact(8)).enumerate() {
                if n8 != o8 {
                    let pos = from + (k * 64 + j * 8) as u64;
                    out.push(((pos - start) / 8, be(n8), be(o8)));
                }
            }
        }
        Ok(out)
    })
}

/// Makes the on-disk refcount of `cluster` at least 1. `pending` is a refcount-table write
/// about to happen (`offset`, bytes), whose entries count as already on disk.
fn ensure_refcount(
    file: &fs::File,
    g: &Geometry,
    cluster: u64,
    pending: Option<(u64, &[u8])>,
) -> io::Result<()> {
    let rb_bits = g.rb_bits();
    let rt_index = cluster >> rb_bits;
    if rt_index >= g.rt_entries() {
        return Err(io::Error::other(format!(
            "qcow2: cluster {cluster} is beyond the refcount table"
        )));
    }
    let entry_at = g.rt_offset.saturating_add(rt_index * 8);
    let mut e = [0u8; 8];
    let from_pending = pending.and_then(|(off, data)| {
        let i = entry_at.checked_sub(off)? as usize;
        data.get(i..i + 8).and_then(|b| b.try_into().ok())
    });
    match from_pending {
        Some(b) => e = b,
        None => read_exact(file, &mut e, entry_at)?,
    }
    let rb_offset = u64::from_be_bytes(e) & RT_OFFSET_MASK;
    if rb_offset == 0 {
        return Err(io::Error::other(format!(
            "qcow2: no refcount block for cluster {cluster}"
        )));
    }
    raise_from_zero(file, g, rb_offset, cluster & ((1 << rb_bits) - 1))
}

/// As [`ensure_refcount`], for the clusters L2 entries point to, in one read of the
/// refcount-table entry and one of the refcounts for each refcount block they fall in. A
/// cluster the refcount table on disk does not cover yet is left alone, as it would be
/// without this module (imago writes refcount-table entries before it allocates from their
/// blocks).
fn ensure_covered_refcounts(file: &fs::File, g: &Geometry, clusters: Vec<u64>) -> io::Result<()> {
    for_each_unreferenced(file, g, clusters, |cluster, rb_offset| match rb_offset {
        Some(rb_offset) => raise_from_zero(file, g, rb_offset, cluster & ((1 << g.rb_bits()) - 1)),
        None => Ok(()),
    })
}

/// Calls `f(cluster, refcount block)` for each of `clusters` whose refcount on disk is 0,
/// reading the refcount-table entry and the refcounts once for each refcount block they
/// fall in; with no block (`None`) for those the refcount table does not cover.
fn for_each_unreferenced(
    file: &fs::File,
    g: &Geometry,
    mut clusters: Vec<u64>,
    mut f: impl FnMut(u64, Option<u64>) -> io::Result<()>,
) -> io::Result<()> {
    clusters.sort_unstable();
    clusters.dedup();
    let rb_bits = g.rb_bits();
    let width = 1u64 << (g.refcount_order - 3);
    let mut counts = Vec::new();
    for group in clusters.chunk_by(|a, b| a >> rb_bits == b >> rb_bits) {
        let rt_index = group[0] >> rb_bits;
        let mut e = [0u8; 8];
        if rt_index < g.rt_entries() {
            read_exact(file, &mut e, g.rt_offset.saturating_add(rt_index * 8))?;
        }
        let rb_offset = u64::from_be_bytes(e) & RT_OFFSET_MASK;
        if rb_offset == 0 {
            for &c in group {
                f(c, None)?;
            }
            continue;
        }
        let mask = (1u64 << rb_bits) - 1;
        let (first, last) = (group[0] & mask, group[group.len() - 1] & mask);
        counts.clear();
        counts.resize(((last - first + 1) * width) as usize, 0);
        read_exact(file, &mut counts, rb_offset.saturating_add(first * width))?;
        for &c in group {
            let i = (((c & mask) - first) * width) as usize;
            if counts[i..i + width as usize].iter().all(|b| *b == 0) {
                f(c, Some(rb_offset))?;
            }
        }
    }
    Ok(())
}

/// Refuses an image whose metadata (header, L1 table, refcount table and blocks, the L2
/// tables `l2_tables`) has a cluster of refcount 0: imago's allocator would hand that
/// cluster out and write over the table. QEMU opens such an image and refuses the first
/// write its overlap check catches, then marks the image corrupt; refused here before
/// anything is written.
fn check_metadata_refcounts(
    file: &fs::File,
    g: &Geometry,
    l2_tables: &BTreeSet<u64>,
) -> io::Result<()> {
    // QEMU's limit (`QCOW_MAX_REFTABLE_SIZE`) and words.
    let rt_bytes = g.rt_clusters << g.cluster_bits;
    if rt_bytes > 8 << 20 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "Reference count table too large",
        ));
    }
    let span = |start, end| clusters_in(start, end, g.cluster_bits);
    let mut metadata: Vec<(u64, &str)> = vec![(0, "the header")];
    metadata.extend(span(g.l1_offset, g.l1_end()).map(|c| (c, "the L1 table")));
    metadata.extend(span(g.rt_offset, g.rt_end()).map(|c| (c, "the refcount table")));
    let mut table = vec![0u8; rt_bytes as usize];
    read_exact(file, &mut table, g.rt_offset).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("Could not read the refcount table: {e}"),
        )
    })?;
    metadata.extend(
        table
            .chunks_exact(8)
            .filter_map(|b| b.try_into().ok())
            .map(|b| u64::from_be_bytes(b) & RT_OFFSET_MASK)
            .filter(|&off| off != 0)
            .map(|off| (off >> g.cluster_bits, "a refcount block")),
    );
    metadata.extend(l2_tables.iter().map(|&t| (t, "an L2 table")));
    let what: std::collections::HashMap<u64, &str> = metadata.iter().copied().collect();
    let clusters = metadata.into_iter().map(|(c, _)| c).collect();
    for_each_unreferenced(file, g, clusters, |cluster, _| {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "qcow2: cluster {cluster} holds {} but its refcount is 0: the image is \
                 corrupt; repair it with 'qemu-img check -r all'",
                what.get(&cluster).unwrap_or(&"metadata")
            ),
        ))
    })
}

/// Writes refcount 1 into entry `rb_index` of the refcount block at `rb_offset` if it is 0.
fn raise_from_zero(file: &fs::File, g: &Geometry, rb_offset: u64, rb_index: u64) -> io::Result<()> {
    let width = 1usize << (g.refcount_order - 3);
    let at = rb_offset.saturating_add(rb_index * width as u64);
    let mut cur = [0u8; 8];
    let cur = &mut cur[..width];
    read_exact(file, cur, at)?;
    if cur.iter().all(|b| *b == 0) {
        if let Some(last) = cur.last_mut() {
            *last = 1;
        }
        file.write_all_at(cur, at)?;
    }
    Ok(())
}

/// Tests: a function called after every write to a given image file, to look at what a
/// crash right then would leave. It gets the write's offset and length, and whether this
/// module watched it (a pointer or L2 table write).
#[cfg(test)]
pub mod test_hook {
    use std::sync::Mutex;

    type Hook = Box<dyn Fn(u64, u64, bool) + Send>;

    static HOOKS: Mutex<Vec<(String, Hook)>> = Mutex::new(Vec::new());

    /// Calls `f(offset, len, watched)` after each write to the image opened under `name`.
    pub fn register(name: &str, f: impl Fn(u64, u64, bool) + Send + 'static) {
        HOOKS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name.to_string(), Box::new(f)));
    }

    pub fn unregister(name: &str) {
        HOOKS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(n, _)| n != name);
    }

    pub(crate) fn fire(name: &str, offset: u64, len: u64, watched: bool) {
        let hooks = HOOKS.lock().unwrap_or_else(|p| p.into_inner());
        for (n, f) in hooks.iter() {
            if n == name {
                f(offset, len, watched);
            }
        }
    }
}
