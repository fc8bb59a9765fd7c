//! virtio-blk requests: one descriptor chain in, one checked [`Parsed`] out.
//!
//! The chain is read as the spec's two byte streams (VERSION_1 implies any layout): the
//! device-readable bytes (a 16-byte header, then data for writes and discard ranges) and,
//! after them, the device-writable bytes (data for reads and get-id, then the status byte
//! as the very last byte). Data segments are handed to block-proc as ranges of the guest
//! memory file (a guest-physical range translated by [`RamMap`]); nothing is copied.
//!
//! Everything the guest wrote is untrusted:
//! - a structurally broken chain (next index out of range, a loop, a bad or nested indirect
//!   table, more descriptors than allowed, no writable byte for the status) cannot be
//!   answered: it goes back on the used ring with length 0;
//! - a well-formed chain asking for something wrong (buffers outside RAM, wrong direction,
//!   a length that is not whole sectors, sectors past the end, a write to a read-only disk,
//!   too many segments or bytes) is answered `VIRTIO_BLK_S_IOERR`; an unknown or
//!   unnegotiated type `VIRTIO_BLK_S_UNSUPP`.

use ipc::vmm_block::{ID_BYTES, IoOp, MAX_REQUEST_BYTES, MAX_SEGMENTS, Segment};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::features::{VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES};
use crate::memory::RamMap;

pub const SECTOR: u64 = 512;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
const HEADER: u64 = 16;
/// `struct virtio_blk_discard_write_zeroes`: sector, num_sectors, flags.
const RANGE_SIZE: u64 = 16;
const WZ_UNMAP: u32 = 1;
/// The most descriptors one chain may have: data segments plus header and status.
pub const MAX_DESCRIPTORS: usize = MAX_SEGMENTS + 2;
/// The most discard or write-zeroes ranges per request (`max_discard_seg`).
pub const MAX_RANGES: u32 = 16;

/// What the request parser needs to know about the disk.
#[derive(Debug, Clone, Copy)]
pub struct DiskInfo {
    pub capacity_sectors: u64,
    pub read_only: bool,
    /// The features the driver acknowledged.
    pub features: u64,
    /// Where guest RAM is: buffers must lie inside it, and segments are sent as memfd
    /// offsets.
    pub ram: RamMap,
}

/// Which `query-blockstats` counters a request belongs to (QEMU's accounting:
/// write-zeroes is a write, discard an unmap, get-id nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acct {
    Read,
    Write,
    Flush,
    Unmap,
    None,
}

/// A request ready for block-proc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub head: u16,
    pub status_gpa: u64,
    pub op: IoOp,
    pub sector: u64,
    pub segments: Vec<Segment>,
    /// Bytes the device writes into the chain on success (data and status).
    pub used_len: u32,
    pub acct: Acct,
    /// Bytes read, written, zeroed or discarded, for statistics.
    pub bytes: u64,
    /// For writes: the byte offset just past the last byte written.
    pub end: u64,
}

/// The outcome for one chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Submit(Request),
    /// Answer at once with this status byte; `acct` says which counter of invalid
    /// requests it adds to (`Acct::None` for unsupported ones).
    Answer {
        head: u16,
        status_gpa: u64,
        status: u8,
        acct: Acct,
    },
    /// No usable status byte: return the chain with length 0.
    Drop {
        head: u16,
    },
}

/// Reads one chain. Never fails: every problem becomes an answer.
pub fn parse<M: GuestMemory>(mem: &M, chain: DescriptorChain<&M>, disk: &DiskInfo) -> Parsed {
    let head = chain.head_index();
    let mut readable: Vec<(u64, u32)> = Vec::new();
    let mut writable: Vec<(u64, u32)> = Vec::new();
    let mut last_has_next = false;
    let mut count = 0usize;
    let mut out_of_order = false;
    for desc in chain {
        count += 1;
        if count > MAX_DESCRIPTORS {
            return Parsed::Drop { head };
        }
        last_has_next = desc.has_next();
        if desc.len() == 0 {
            continue;
        }
        let range = (desc.addr().0, desc.len());
        if desc.is_write_only() {
            writable.push(range);
        } else if writable.is_empty() {
            readable.push(range);
        } else {
            out_of_order = true;
        }
    }
    // The iterator stops early, silently, on a bad next index, a loop, a bad indirect
    // table or unreadable memory: the last descriptor then still says "next".
    if count == 0 || last_has_next {
        return Parsed::Drop { head };
    }
    let in_ram = |&(gpa, len): &(u64, u32)| disk.ram.contains(gpa, u64::from(len));
    let Some((data_in, status_gpa)) = split_last_byte(&writable) else {
        return Parsed::Drop { head };
    };
    if !in_ram(&(status_gpa, 1)) {
        return Parsed::Drop { head };
    }
    let unreadable = out_of_order || !readable.iter().chain(&writable).all(in_ram);
    let header = gather(mem, &readable, HEADER).filter(|_| !unreadable);
    let kind = header
        .as_ref()
        .map(|h| u32::from_le_bytes([h[0], h[1], h[2], h[3]]));
    let acct = match kind {
        Some(T_IN) => Acct::Read,
        Some(T_OUT | T_WRITE_ZEROES) => Acct::Write,
        Some(T_FLUSH) => Acct::Flush,
        Some(T_DISCARD) => Acct::Unmap,
        _ => Acct::None,
    };
    // Refused requests count as invalid ones of their kind; unsupported ones nowhere.
    let answer = |status| Parsed::Answer {
        head,
        status_gpa,
        status,
        acct: if status == S_IOERR { acct } else { Acct::None },
    };
    let (Some(header), Some(kind)) = (header, kind) else {
        return answer(S_IOERR);
    };
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    let data_out = skip(&readable, HEADER);
    let total = |r: &[(u64, u32)]| r.iter().map(|s| u64::from(s.1)).sum::<u64>();
    let submit = |op, sector: u64, data: &[(u64, u32)], used_len, bytes: u64, end: u64| {
        Parsed::Submit(Request {
            head,
            status_gpa,
            op,
            sector,
            // Every range was checked to be RAM above, so each has a memfd offset.
            segments: data
                .iter()
                .filter_map(|&(gpa, len)| {
                    let offset = disk.ram.file_offset(gpa, u64::from(len))?;
                    Some(Segment { gpa: offset, len })
                })
                .collect(),
            used_len,
            acct,
            bytes,
            end,
        })
    };
    let in_disk = |sector: u64, sectors: u64| {
        sector
            .checked_add(sectors)
            .is_some_and(|end| end <= disk.capacity_sectors)
    };
    match kind {
        T_IN | T_OUT => {
            let (data, other) = if kind == T_IN {
                (&data_in, &data_out)
            } else {
                (&data_out, &data_in)
            };
            let len = total(data);
            let bad = !other.is_empty()
                || !len.is_multiple_of(SECTOR)
                || len > MAX_REQUEST_BYTES
                || data.len() > MAX_SEGMENTS
                || !in_disk(sector, len / SECTOR)
                || (kind == T_OUT && disk.read_only);
            if bad {
                return answer(S_IOERR);
            }
            let (op, used, end) = if kind == T_IN {
                (IoOp::Read, len as u32 + 1, 0)
            } else {
                (IoOp::Write, 1, sector * SECTOR + len)
            };
            submit(op, sector, data, used, len, end)
        }
        T_FLUSH => submit(IoOp::Flush, 0, &[], 1, 0, 0),
        T_GET_ID => {
            let id = take(&data_in, u64::from(ID_BYTES));
            let len = total(&id);
            if !data_out.is_empty() || len == 0 {
                return answer(S_IOERR);
            }
            submit(IoOp::GetId, 0, &id, len as u32 + 1, 0, 0)
        }
        T_DISCARD | T_WRITE_ZEROES => {
            let feature = if kind == T_DISCARD {
                VIRTIO_BLK_F_DISCARD
            } else {
                VIRTIO_BLK_F_WRITE_ZEROES
            };
            if disk.features & feature == 0 {
                return answer(S_UNSUPP);
            }
            let len = total(&data_out);
            if !data_in.is_empty()
                || len == 0
                || !len.is_multiple_of(RANGE_SIZE)
                || len / RANGE_SIZE > u64::from(MAX_RANGES)
                || disk.read_only
            {
                return answer(S_IOERR);
            }
            let Some(raw) = gather(mem, &data_out, len) else {
                return answer(S_IOERR);
            };
            let mut ranges = Vec::new();
            let mut unmap = true;
            let mut bytes = 0u64;
            for r in raw.chunks_exact(RANGE_SIZE as usize) {
                let mut s = [0u8; 8];
                s.copy_from_slice(&r[..8]);
                let start = u64::from_le_bytes(s);
                let count = u32::from_le_bytes([r[8], r[9], r[10], r[11]]);
                let flags = u32::from_le_bytes([r[12], r[13], r[14], r[15]]);
                // Discard has no flags; write-zeroes only "unmap".
                let allowed = if kind == T_DISCARD { 0 } else { WZ_UNMAP };
                if flags & !allowed != 0 {
                    return answer(S_UNSUPP);
                }
                if count == 0 || !in_disk(start, u64::from(count)) {
                    return answer(S_IOERR);
                }
                unmap &= flags & WZ_UNMAP != 0;
                bytes += u64::from(count) * SECTOR;
                ranges.push((start, count));
            }
            let (op, end) = if kind == T_DISCARD {
                (IoOp::Discard(ranges), 0)
            } else {
                // The furthest byte zeroed counts as the end of a write.
                let end = ranges
                    .iter()
                    .map(|&(s, n)| (s + u64::from(n)) * SECTOR)
                    .max()
                    .unwrap_or(0);
                (IoOp::WriteZeroes { ranges, unmap }, end)
            };
            submit(op, 0, &[], 1, bytes, end)
        }
        _ => answer(S_UNSUPP),
    }
}

/// The ranges without their very last byte, and that byte's address.
fn split_last_byte(ranges: &[(u64, u32)]) -> Option<(Vec<(u64, u32)>, u64)> {
    let (&(gpa, len), rest) = ranges.split_last()?;
    let mut out = rest.to_vec();
    if len > 1 {
        out.push((gpa, len - 1));
    }
    Some((out, gpa.checked_add(u64::from(len) - 1)?))
}

/// The ranges without their first `n` bytes.
fn skip(ranges: &[(u64, u32)], mut n: u64) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    for &(gpa, len) in ranges {
        let len64 = u64::from(len);
        if n >= len64 {
            n -= len64;
        } else {
            out.push((gpa + n, (len64 - n) as u32));
            n = 0;
        }
    }
    out
}

/// The first `n` bytes of the ranges (fewer if they hold fewer).
fn take(ranges: &[(u64, u32)], mut n: u64) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    for &(gpa, len) in ranges {
        if n == 0 {
            break;
        }
        let part = u64::from(len).min(n);
        out.push((gpa, part as u32));
        n -= part;
    }
    out
}

/// Copies the first `n` bytes of the ranges out of guest memory; `None` if they hold fewer
/// or the memory cannot be read.
fn gather<M: GuestMemory>(mem: &M, ranges: &[(u64, u32)], n: u64) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(usize::try_from(n).ok()?);
    for (gpa, len) in take(ranges, n) {
        let start = out.len();
        out.resize(start + len as usize, 0);
        mem.read_slice(&mut out[start..], GuestAddress(gpa)).ok()?;
    }
    (out.len() as u64 == n).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::features::VIRTIO_F_VERSION_1;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::GuestMemoryMmap;

    const RAM: u64 = 1 << 20;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;

    fn disk(read_only: bool) -> DiskInfo {
        DiskInfo {
            capacity_sectors: 128,
            read_only,
            features: VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_DISCARD,
            ram: RamMap::new(RAM),
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).expect("mem")
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(at)).expect("w");
        mem.write_obj(sector, GuestAddress(at + 8)).expect("w");
    }

    /// Puts `descs` (addr, len, flags, next) in a fresh queue and parses its first chain.
    fn parse_descs(mem: &GuestMemoryMmap, descs: &[(u64, u32, u16, u16)], d: &DiskInfo) -> Parsed {
        let q = MockSplitQueue::new(mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, l, f, n)| RawDescriptor::from(Descriptor::new(a, l, f, n)))
            .collect();
        // As written: next indices and flags unchanged, one available entry per chain head.
        q.add_desc_chains(&raw, 0).expect("chain");
        let mut queue: Queue = q.create_queue().expect("queue");
        let chain = queue.iter(mem).expect("iter").next().expect("chain");
        parse(mem, chain, d)
    }

    #[test]
    fn a_read_points_into_guest_memory_and_the_status_is_the_last_byte() {
        let m = mem();
        header(&m, 0x8000, T_IN, 4);
        let p = parse_descs(
            &m,
            &[
                (0x8000, 16, F_NEXT, 1),
                (0x9000, 1024, F_NEXT | F_WRITE, 2),
                (0xa000, 1, F_WRITE, 0),
            ],
            &disk(false),
        );
        let Parsed::Submit(r) = p else {
            panic!("{p:?}")
        };
        assert_eq!(
            (r.op, r.sector, r.status_gpa, r.used_len),
            (IoOp::Read, 4, 0xa000, 1025)
        );
        assert_eq!(
            r.segments,
            vec![Segment {
                gpa: 0x9000,
                len: 1024
            }]
        );
    }

    #[test]
    fn any_layout_header_data_and_status_may_share_descriptors() {
        let m = mem();
        header(&m, 0x8000, T_OUT, 2);
        // Header and 512 data bytes in one readable descriptor.
        let p = parse_descs(
            &m,
            &[(0x8000, 16 + 512, F_NEXT, 1), (0xa000, 1, F_WRITE, 0)],
            &disk(false),
        );
        let Parsed::Submit(r) = p else {
            panic!("{p:?}")
        };
        assert_eq!(
            r.segments,
            vec![Segment {
                gpa: 0x8010,
                len: 512
            }]
        );
        // Read data and status in one writable descriptor.
        header(&m, 0x8000, T_IN, 0);
        let p = parse_descs(
            &m,
            &[(0x8000, 16, F_NEXT, 1), (0x9000, 513, F_WRITE, 0)],
            &disk(false),
        );
        let Parsed::Submit(r) = p else {
            panic!("{p:?}")
        };
        assert_eq!((r.status_gpa, r.segments.len()), (0x9200, 1));
    }

    #[test]
    fn indirect_tables_are_followed() {
        let m = mem();
        header(&m, 0x8000, T_OUT, 0);
        let table = [
            Descriptor::new(0x8000, 16, F_NEXT, 1),
            Descriptor::new(0x9000, 4096, F_NEXT, 2),
            Descriptor::new(0xa000, 1, F_WRITE, 0),
        ];
        for (i, d) in table.iter().enumerate() {
            m.write_obj(
                RawDescriptor::from(*d),
                GuestAddress(0x20000 + 16 * i as u64),
            )
            .expect("w");
        }
        let p = parse_descs(&m, &[(0x20000, 48, F_INDIRECT, 0)], &disk(false));
        let Parsed::Submit(r) = p else {
            panic!("{p:?}")
        };
        assert_eq!((r.op, r.bytes), (IoOp::Write, 4096));
    }

    #[test]
    fn hostile_chains_get_ioerr_or_are_dropped() {
        let m = mem();
        let d = disk(false);
        let ioerr = |p: Parsed| {
            matches!(
                p,
                Parsed::Answer {
                    status: S_IOERR,
                    ..
                }
            )
        };
        header(&m, 0x8000, T_IN, 0);
        // Data outside guest RAM.
        assert!(ioerr(parse_descs(
            &m,
            &[
                (0x8000, 16, F_NEXT, 1),
                (RAM - 256, 512, F_NEXT | F_WRITE, 2),
                (0xa000, 1, F_WRITE, 0)
            ],
            &d
        )));
        // Not whole sectors.
        assert!(ioerr(parse_descs(
            &m,
            &[
                (0x8000, 16, F_NEXT, 1),
                (0x9000, 100, F_NEXT | F_WRITE, 2),
                (0xa000, 1, F_WRITE, 0)
            ],
            &d
        )));
        // Wrong direction: a read whose data is device-readable.
        assert!(ioerr(parse_descs(
            &m,
            &[
                (0x8000, 16, F_NEXT, 1),
                (0x9000, 512, F_NEXT, 2),
                (0xa000, 1, F_WRITE, 0)
            ],
            &d
        )));
        // Past the end of the disk.
        header(&m, 0x8000, T_IN, 127);
        assert!(ioerr(parse_descs(
            &m,
            &[
                (0x8000, 16, F_NEXT, 1),
                (0x9000, 1024, F_NEXT | F_WRITE, 2),
                (0xa000, 1, F_WRITE, 0)
            ],
            &d
        )));
        header(&m, 0x8000, T_IN, u64::MAX);
        assert!(ioerr(parse_descs(
            &m,
            &[
                (0x8000, 16, F_NEXT, 1),
                (0x9000, 512, F_NEXT | F_WRITE, 2),
                (0xa000, 1, F_WRITE, 0)
            ],
            &d
        )));
        // A write to a read-only disk.
        header(&m, 0x8000, T_OUT, 0);
        assert!(ioerr(parse_descs(
            &m,
            &[
                (0x8000, 16, F_NEXT, 1),
                (0x9000, 512, F_NEXT, 2),
                (0xa000, 1, F_WRITE, 0)
            ],
            &disk(true)
        )));
        // A short header.
        assert!(ioerr(parse_descs(
            &m,
            &[(0x8000, 8, F_NEXT, 1), (0xa000, 1, F_WRITE, 0)],
            &d
        )));
        // Unknown type; write-zeroes not negotiated.
        header(&m, 0x8000, 99, 0);
        assert!(matches!(
            parse_descs(&m, &[(0x8000, 16, F_NEXT, 1), (0xa000, 1, F_WRITE, 0)], &d),
            Parsed::Answer {
                status: S_UNSUPP,
                ..
            }
        ));
        header(&m, 0x8000, T_WRITE_ZEROES, 0);
        assert!(matches!(
            parse_descs(&m, &[(0x8000, 16, F_NEXT, 1), (0xa000, 1, F_WRITE, 0)], &d),
            Parsed::Answer {
                status: S_UNSUPP,
                ..
            }
        ));
        // Structurally broken: next out of range, a loop, no status byte, an empty
        // indirect table.
        header(&m, 0x8000, T_IN, 0);
        let dropped = |p: Parsed| matches!(p, Parsed::Drop { .. });
        assert!(dropped(parse_descs(&m, &[(0x8000, 16, F_NEXT, 9)], &d)));
        assert!(dropped(parse_descs(
            &m,
            &[(0x8000, 16, F_NEXT, 1), (0x9000, 512, F_NEXT | F_WRITE, 0)],
            &d
        )));
        assert!(dropped(parse_descs(&m, &[(0x8000, 16, 0, 0)], &d)));
        assert!(dropped(parse_descs(&m, &[(0x20000, 0, F_INDIRECT, 0)], &d)));
        assert!(dropped(parse_descs(
            &m,
            &[(0x20000, 17, F_INDIRECT, 0)],
            &d
        )));
    }

    #[test]
    fn discard_ranges_are_read_and_checked() {
        let m = mem();
        let d = disk(false);
        header(&m, 0x8000, T_DISCARD, 0);
        m.write_obj(8u64, GuestAddress(0x8010)).expect("w");
        m.write_obj(16u32, GuestAddress(0x8018)).expect("w");
        m.write_obj(0u32, GuestAddress(0x801c)).expect("w");
        let p = parse_descs(&m, &[(0x8000, 32, F_NEXT, 1), (0xa000, 1, F_WRITE, 0)], &d);
        let Parsed::Submit(r) = p else {
            panic!("{p:?}")
        };
        assert_eq!(r.op, IoOp::Discard(vec![(8, 16)]));
        m.write_obj(120u64, GuestAddress(0x8010)).expect("w");
        assert!(matches!(
            parse_descs(&m, &[(0x8000, 32, F_NEXT, 1), (0xa000, 1, F_WRITE, 0)], &d),
            Parsed::Answer {
                status: S_IOERR,
                ..
            }
        ));
    }

    #[test]
    fn get_id_takes_at_most_twenty_bytes() {
        let m = mem();
        header(&m, 0x8000, T_GET_ID, 0);
        let p = parse_descs(
            &m,
            &[
                (0x8000, 16, F_NEXT, 1),
                (0x9000, 64, F_NEXT | F_WRITE, 2),
                (0xa000, 1, F_WRITE, 0),
            ],
            &disk(false),
        );
        let Parsed::Submit(r) = p else {
            panic!("{p:?}")
        };
        assert_eq!((r.op, r.used_len), (IoOp::GetId, 21));
        assert_eq!(
            r.segments,
            vec![Segment {
                gpa: 0x9000,
                len: 20
            }]
        );
    }
}
