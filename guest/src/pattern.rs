//! The block pattern of `docs/guest-abi.md`: what a 4 KiB block written at byte offset
//! `off` with generation `generation` under `seed` holds, and the checks against it.
//!
//! This is the one copy: the freestanding guest compiles this file, and host tests use it
//! through the `guest` library to rebuild the exact image a guest wrote. Core only.

/// Size of a pattern block.
pub const BLOCK_SIZE: usize = 4096;

/// First 8 bytes of every pattern block.
pub const MAGIC: [u8; 8] = *b"SPLITVMM";

/// Bytes of the header: magic, seed, offset, generation (little-endian u64 each).
pub const HEADER_LEN: usize = 32;

/// What identifies a pattern block: the header's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The run's seed.
    pub seed: u64,
    /// The block's byte offset on its disk.
    pub off: u64,
    /// The block's generation (1 for the first write).
    pub generation: u64,
}

/// How a block differs from the block expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    /// The header is not the expected one; `found` is what the block's header says, if
    /// it is a pattern header at all.
    Header { found: Option<Stamp> },
    /// The header is right but the data differs, first at byte `at` of the block.
    Data { at: usize },
}

/// splitmix64's output function: a good 64-bit mixer.
const fn mix(z: u64) -> u64 {
    let z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A xorshift64 generator; also the guest's source of random block choices.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator whose state is mixed from `seed` (never zero).
    pub const fn new(seed: u64) -> Self {
        let s = mix(seed);
        Self(if s == 0 { 1 } else { s })
    }

    /// The next 64-bit value.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A value in `0..bound` (`bound` > 0; slightly biased, which is fine for picking blocks).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

impl Stamp {
    /// The generator whose stream fills the block after its header.
    fn stream(&self) -> XorShift {
        XorShift::new(self.seed ^ mix(self.off ^ mix(self.generation)))
    }

    /// The 32-byte header.
    pub fn header(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(&MAGIC);
        h[8..16].copy_from_slice(&self.seed.to_le_bytes());
        h[16..24].copy_from_slice(&self.off.to_le_bytes());
        h[24..32].copy_from_slice(&self.generation.to_le_bytes());
        h
    }

    /// Reads the stamp from a block's header, if it has the pattern's magic.
    pub fn read(block: &[u8]) -> Option<Self> {
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(block.get(i..i + 8)?);
            Some(u64::from_le_bytes(b))
        };
        if block.get(..8)? != MAGIC {
            return None;
        }
        Some(Self {
            seed: word(8)?,
            off: word(16)?,
            generation: word(24)?,
        })
    }

    /// Fills `block` (exactly [`BLOCK_SIZE`] bytes) with this stamp's pattern.
    pub fn fill(&self, block: &mut [u8]) {
        assert_eq!(block.len(), BLOCK_SIZE, "a pattern block is 4 KiB");
        block[..HEADER_LEN].copy_from_slice(&self.header());
        let mut rng = self.stream();
        for word in block[HEADER_LEN..].chunks_exact_mut(8) {
            word.copy_from_slice(&rng.next().to_le_bytes());
        }
    }

    /// Checks that `block` (exactly [`BLOCK_SIZE`] bytes) holds this stamp's pattern.
    pub fn check(&self, block: &[u8]) -> Result<(), Mismatch> {
        assert_eq!(block.len(), BLOCK_SIZE, "a pattern block is 4 KiB");
        if block[..HEADER_LEN] != self.header() {
            return Err(Mismatch::Header {
                found: Self::read(block),
            });
        }
        let mut rng = self.stream();
        for (i, word) in block[HEADER_LEN..].chunks_exact(8).enumerate() {
            let want = rng.next().to_le_bytes();
            if word != want {
                let byte = word.iter().zip(want).position(|(a, b)| *a != b);
                return Err(Mismatch::Data {
                    at: HEADER_LEN + i * 8 + byte.unwrap_or(0),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(seed: u64, off: u64, generation: u64) -> [u8; BLOCK_SIZE] {
        let mut b = [0u8; BLOCK_SIZE];
        Stamp {
            seed,
            off,
            generation,
        }
        .fill(&mut b);
        b
    }

    #[test]
    fn header_layout_is_the_documented_one() {
        let b = block(7, 0x3000, 2);
        assert_eq!(&b[..8], b"SPLITVMM");
        assert_eq!(b[8..16], 7u64.to_le_bytes());
        assert_eq!(b[16..24], 0x3000u64.to_le_bytes());
        assert_eq!(b[24..32], 2u64.to_le_bytes());
    }

    #[test]
    fn pattern_is_stable_across_versions() {
        // Pinned values: images written by an older guest must still verify.
        let b = block(7, 0x3000, 2);
        let w = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        assert_eq!(
            (w(HEADER_LEN), w(BLOCK_SIZE - 8)),
            (0x44af_ad38_deee_e5af, 0x651a_c4d1_2abf_47bf)
        );
    }

    #[test]
    fn every_field_changes_the_data() {
        let base = block(1, 4096, 1);
        for other in [block(2, 4096, 1), block(1, 8192, 1), block(1, 4096, 2)] {
            assert_ne!(base[HEADER_LEN..], other[HEADER_LEN..]);
        }
    }

    #[test]
    fn check_accepts_its_own_block_and_reads_the_stamp() {
        let s = Stamp {
            seed: 9,
            off: 1 << 30,
            generation: 5,
        };
        let b = block(9, 1 << 30, 5);
        assert_eq!(s.check(&b), Ok(()));
        assert_eq!(Stamp::read(&b), Some(s));
    }

    #[test]
    fn check_reports_a_stale_generation_from_the_header() {
        let b = block(9, 4096, 4);
        let want = Stamp {
            seed: 9,
            off: 4096,
            generation: 5,
        };
        assert_eq!(
            want.check(&b),
            Err(Mismatch::Header {
                found: Some(Stamp {
                    generation: 4,
                    ..want
                })
            })
        );
        assert_eq!(
            want.check(&[0u8; BLOCK_SIZE]),
            Err(Mismatch::Header { found: None })
        );
    }

    #[test]
    fn check_reports_the_first_corrupt_byte() {
        let s = Stamp {
            seed: 3,
            off: 0,
            generation: 1,
        };
        let mut b = block(3, 0, 1);
        b[1000] ^= 0x10;
        b[2000] ^= 0x01;
        assert_eq!(s.check(&b), Err(Mismatch::Data { at: 1000 }));
    }

    #[test]
    fn xorshift_below_stays_in_range_and_spreads() {
        let mut r = XorShift::new(42);
        let mut seen = [false; 10];
        for _ in 0..1000 {
            let v = r.below(10);
            assert!(v < 10);
            seen[usize::try_from(v).expect("small")] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }
}
