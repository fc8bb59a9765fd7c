//! The workload guest (`docs/guest-abi.md`): a small freestanding x86_64 program that
//! splitvmm embeds and boots with `--kernel builtin:workload`, and that QEMU boots through
//! its PVH note for benchmarks.
//!
//! This library is the host side of it: [`WORKLOAD_ELF`] is the program itself, built
//! from `workload/` by `build.rs`, and the modules below are the logic the guest and host
//! tests share, compiled into both from the same files: the block [`pattern`], the
//! [`cmdline`] and the [`abi`] numbers.

pub mod abi;
pub mod cmdline;
pub mod pattern;

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
