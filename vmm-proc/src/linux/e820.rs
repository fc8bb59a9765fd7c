//! The guest's memory map: which guest-physical ranges are RAM, and the e820 table that
//! tells the kernel (in `boot_params`, or the PVH memory map, which uses the same types).
//!
//! RAM fills the space below the device window at 0xc000_0000; what does not fit there
//! continues at 4 GiB. The window itself and the legacy area below 1 MiB are reserved.

use super::layout::{EBDA_START, HIMEM_START, MMIO_HOLE_END, MMIO_HOLE_START};

/// e820 entry types (the kernel's `E820_TYPE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
}

/// One range of the memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

impl E820Entry {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.addr + self.size
    }
}

/// The guest-physical ranges `(start, size)` that hold `mem_size` bytes of RAM: the VM core
/// maps guest memory at exactly these addresses.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    let low = mem_size.min(MMIO_HOLE_START);
    let mut regions = vec![(0, low)];
    if mem_size > low {
        regions.push((MMIO_HOLE_END, mem_size - low));
    }
    regions
}

/// The e820 table for a guest with `mem_size` bytes of RAM (at least 1 MiB), sorted by
/// address, with no overlaps.
pub fn memory_map(mem_size: u64) -> Vec<E820Entry> {
    let entry = |addr, end: u64, kind| E820Entry {
        addr,
        size: end - addr,
        kind,
    };
    let low_end = mem_size.min(MMIO_HOLE_START);
    let mut map = vec![
        entry(0, EBDA_START, E820Kind::Ram),
        entry(EBDA_START, HIMEM_START, E820Kind::Reserved),
    ];
    if low_end > HIMEM_START {
        map.push(entry(HIMEM_START, low_end, E820Kind::Ram));
    }
    map.push(entry(MMIO_HOLE_START, MMIO_HOLE_END, E820Kind::Reserved));
    if mem_size > MMIO_HOLE_START {
        map.push(entry(
            MMIO_HOLE_END,
            MMIO_HOLE_END + (mem_size - MMIO_HOLE_START),
            E820Kind::Ram,
        ));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_total(map: &[E820Entry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum()
    }

    /// Sorted, non-overlapping, non-empty entries; RAM never in the device window.
    fn assert_sane(map: &[E820Entry]) {
        for e in map {
            assert!(e.size > 0, "empty entry {e:?}");
            if e.kind == E820Kind::Ram {
                assert!(
                    e.end() <= MMIO_HOLE_START || e.addr >= MMIO_HOLE_END,
                    "RAM in the device window: {e:?}"
                );
            }
        }
        for w in map.windows(2) {
            assert!(w[0].end() <= w[1].addr, "overlap or disorder: {w:?}");
        }
    }

    #[test]
    fn small_guest_has_ram_below_the_window_and_the_window_reserved() {
        let mem = 256 << 20;
        let map = memory_map(mem);
        assert_sane(&map);
        // The legacy hole is reserved, so RAM is the memory size minus 0x9fc00..1 MiB.
        assert_eq!(ram_total(&map), mem - (HIMEM_START - EBDA_START));
        assert!(map.contains(&E820Entry {
            addr: MMIO_HOLE_START,
            size: MMIO_HOLE_END - MMIO_HOLE_START,
            kind: E820Kind::Reserved
        }));
        assert_eq!(ram_regions(mem), vec![(0, mem)]);
    }

    #[test]
    fn large_guest_continues_above_4_gib() {
        let mem = 6 << 30;
        let map = memory_map(mem);
        assert_sane(&map);
        assert_eq!(ram_total(&map), mem - (HIMEM_START - EBDA_START));
        let high = map.last().copied();
        assert_eq!(
            high,
            Some(E820Entry {
                addr: 1 << 32,
                size: mem - MMIO_HOLE_START,
                kind: E820Kind::Ram
            })
        );
        assert_eq!(
            ram_regions(mem),
            vec![(0, MMIO_HOLE_START), (1 << 32, mem - MMIO_HOLE_START)]
        );
    }

    #[test]
    fn exactly_3_gib_fills_low_memory_and_nothing_above() {
        let mem = MMIO_HOLE_START;
        let map = memory_map(mem);
        assert_sane(&map);
        assert!(map.iter().all(|e| e.addr < MMIO_HOLE_END));
        assert_eq!(ram_regions(mem), vec![(0, mem)]);
    }
}
