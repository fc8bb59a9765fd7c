//! The workload guest (`docs/guest-abi.md`): a small freestanding x86_64 program that
//! splitvmm embeds and boots with `--kernel builtin:workload`, and that QEMU boots through
//! its PVH note for benchmarks.
//!
//! This library is the host side of it: [`WORKLOAD_ELF`] is the program itself, built
//! from `workload/` by `build.rs`, and the modules below are the logic the guest and host
//! tests share, compiled into both from the same files: the block [`pattern`], the
//! [`cmdline`], the [`abi`] numbers and the vCPUs' [`sync`] primitives.

pub mod abi;
pub mod cmdline;
pub mod pattern;
pub mod sync;

// Never compiled here (build.rs compiles the freestanding program on its own); declared
// so that `cargo fmt` formats and checks its sources too.
#[cfg(any())]
#[path = "../workload/main.rs"]
mod workload;

/// The workload guest: a static ELF64 executable linked at 1 MiB, with a PVH note.
pub static WORKLOAD_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/workload.elf"));

/// The expected content of the first `bytes` of a disk after `run=write seed=SEED
/// gen=GENERATION bytes=BYTES`, whatever the number of vCPUs (the pattern depends only on
/// the seed, the block's offset and its generation).
pub fn written_image(seed: u64, generation: u64, bytes: u64) -> Vec<u8> {
    let len = usize::try_from(bytes).expect("image fits in memory");
    let mut image = vec![0u8; len];
    for (i, block) in image.chunks_exact_mut(pattern::BLOCK_SIZE).enumerate() {
        pattern::Stamp {
            seed,
            off: (i * pattern::BLOCK_SIZE) as u64,
            generation,
        }
        .fill(block);
    }
    image
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_elf_is_a_static_x86_64_executable_at_1_mib() {
        let e = WORKLOAD_ELF;
        assert_eq!(&e[..4], b"\x7fELF");
        assert_eq!(e[4], 2, "ELFCLASS64");
        assert_eq!(u16::from_le_bytes([e[16], e[17]]), 2, "ET_EXEC");
        assert_eq!(u16::from_le_bytes([e[18], e[19]]), 62, "EM_X86_64");
        let entry = u64::from_le_bytes(e[24..32].try_into().expect("8 bytes"));
        assert!(entry >= abi::LOAD_ADDR, "entry {entry:#x} below 1 MiB");
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
    }

    /// (type, flags, offset, vaddr, paddr, filesz, memsz, align) of each program header.
    fn program_headers(e: &[u8]) -> Vec<[u64; 8]> {
        let (phoff, phentsize, phnum) = (u64_at(e, 32) as usize, u16_at(e, 54), u16_at(e, 56));
        assert_eq!(phentsize, 56);
        (0..usize::from(phnum))
            .map(|i| {
                let p = phoff + i * 56;
                [
                    u64::from(u32_at(e, p)),
                    u64::from(u32_at(e, p + 4)),
                    u64_at(e, p + 8),
                    u64_at(e, p + 16),
                    u64_at(e, p + 24),
                    u64_at(e, p + 32),
                    u64_at(e, p + 40),
                    u64_at(e, p + 48),
                ]
            })
            .collect()
    }

    #[test]
    fn segments_load_at_their_physical_address_from_1_mib_with_nothing_dynamic() {
        const PT_LOAD: u64 = 1;
        const PT_DYNAMIC: u64 = 2;
        const PT_INTERP: u64 = 3;
        let phs = program_headers(WORKLOAD_ELF);
        let loads: Vec<_> = phs.iter().filter(|p| p[0] == PT_LOAD).collect();
        assert!(!loads.is_empty());
        for p in &loads {
            assert_eq!(p[3], p[4], "vaddr = paddr");
            assert!(p[4] >= abi::LOAD_ADDR && p[5] <= p[6], "{p:x?}");
            assert!(p[4] + p[6] < abi::RAM_LIMIT);
        }
        assert!(phs.iter().all(|p| p[0] != PT_DYNAMIC && p[0] != PT_INTERP));
        // e_entry is the 64-bit entry, in an executable segment.
        let entry = u64_at(WORKLOAD_ELF, 24);
        assert!(
            loads
                .iter()
                .any(|p| p[1] & 1 != 0 && (p[4]..p[4] + p[5]).contains(&entry))
        );
    }

    #[test]
    fn pvh_note_names_a_32_bit_entry_in_the_code() {
        const PT_NOTE: u64 = 4;
        let phs = program_headers(WORKLOAD_ELF);
        let note = phs.iter().find(|p| p[0] == PT_NOTE).expect("a PT_NOTE");
        // QEMU reads the descriptor at name + align_up(namesz, p_align): 4 keeps it right
        // after "Xen\0".
        assert_eq!(note[7], 4, "PT_NOTE alignment");
        let n = usize::try_from(note[2]).expect("offset");
        let (namesz, descsz, kind) = (
            u32_at(WORKLOAD_ELF, n),
            u32_at(WORKLOAD_ELF, n + 4),
            u32_at(WORKLOAD_ELF, n + 8),
        );
        assert_eq!(
            (namesz, descsz, kind),
            (4, 8, 18),
            "XEN_ELFNOTE_PHYS32_ENTRY"
        );
        assert_eq!(&WORKLOAD_ELF[n + 12..n + 16], b"Xen\0");
        let pvh = u64_at(WORKLOAD_ELF, n + 16);
        assert!(pvh < 1 << 32, "a 32-bit entry");
        assert_ne!(pvh, u64_at(WORKLOAD_ELF, 24), "not the 64-bit entry");
        assert!(
            phs.iter()
                .any(|p| p[0] == 1 && p[1] & 1 != 0 && (p[4]..p[4] + p[5]).contains(&pvh))
        );
    }

    #[test]
    fn written_image_is_blocks_of_the_pattern() {
        let img = written_image(7, 1, 3 * 4096);
        assert_eq!(img.len(), 3 * 4096);
        for (i, b) in img.chunks(4096).enumerate() {
            let s = pattern::Stamp::read(b).expect("pattern header");
            assert_eq!((s.seed, s.off, s.generation), (7, (i * 4096) as u64, 1));
            assert_eq!(s.check(b), Ok(()));
        }
    }
}
