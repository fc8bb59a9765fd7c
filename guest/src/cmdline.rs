//! The guest's command line (`docs/guest-abi.md`): the program to run and its parameters,
//! the `virtio_mmio.device=` entries in Linux's form, and `tsc_khz=`.
//!
//! Compiled into the freestanding guest and into the host library alike (core only, no
//! allocation), so host tests pin down exactly what the guest accepts.

use crate::abi::MAX_DISKS;
use crate::pattern::BLOCK_SIZE;

/// What the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// Write the pattern over `bytes` of every disk.
    Write,
    /// Verify what `write` wrote (same seed, bytes, generation).
    Verify,
    /// Write random blocks, keep a record of every acknowledged write, verify it.
    WriteVerifyLoop,
    /// Dirty RAM at `rate` bytes per second.
    Dirty,
    /// Spin with `pause`.
    Idle,
    /// Disk throughput.
    Bench,
}

impl Program {
    /// The name used on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::Verify => "verify",
            Self::WriteVerifyLoop => "write-verify-loop",
            Self::Dirty => "dirty",
            Self::Idle => "idle",
            Self::Bench => "bench",
        }
    }

    /// Whether the program needs at least one disk.
    pub const fn needs_disk(self) -> bool {
        !matches!(self, Self::Dirty | Self::Idle)
    }

    /// Whether the program writes to its disks.
    pub const fn writes(self, mode: BenchMode) -> bool {
        match self {
            Self::Write | Self::WriteVerifyLoop => true,
            Self::Bench => mode.writes(),
            Self::Verify | Self::Dirty | Self::Idle => false,
        }
    }
}

/// The access pattern of `bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchMode {
    SeqRead,
    SeqWrite,
    RandRead,
    RandWrite,
}

impl BenchMode {
    /// The name used on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Self::SeqRead => "seqread",
            Self::SeqWrite => "seqwrite",
            Self::RandRead => "randread",
            Self::RandWrite => "randwrite",
        }
    }

    /// Whether requests are writes.
    pub const fn writes(self) -> bool {
        matches!(self, Self::SeqWrite | Self::RandWrite)
    }

    /// Whether offsets are random.
    pub const fn random(self) -> bool {
        matches!(self, Self::RandRead | Self::RandWrite)
    }
}

/// One `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MmioDevice {
    /// Size of the register window.
    pub size: u64,
    /// Guest-physical base address.
    pub base: u64,
    /// Interrupt line (unused: the guest polls).
    pub irq: u32,
}

/// The largest `bs=` of `bench`.
pub const MAX_BENCH_BS: u64 = 4 << 20;

/// The largest `qd=` of `bench`.
pub const MAX_BENCH_QD: u32 = 128;

/// `seconds=` of `write-verify-loop` when none is given.
pub const DEFAULT_LOOP_SECONDS: u64 = 5;

/// Everything the command line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub program: Program,
    /// `seed=`, default 1.
    pub seed: u64,
    /// `gen=`: the generation `write` writes and `verify` expects, default 1.
    pub generation: u64,
    /// `bytes=`: how much of each disk (from its start) the program uses; default all.
    pub bytes: Option<u64>,
    /// `seconds=`: how long; `None` means until stopped (`dirty`, `idle`) or the
    /// program's default.
    pub seconds: Option<u64>,
    /// `rate=`: bytes per second for `dirty`; `None` means as fast as it can.
    pub rate: Option<u64>,
    /// `mode=` of `bench`, default `randread`.
    pub mode: BenchMode,
    /// `bs=` of `bench` in bytes, default 4 KiB.
    pub bs: u64,
    /// `qd=` of `bench`: requests in flight per vCPU, default 1.
    pub qd: u32,
    /// `tsc_khz=` as the VMM measured it.
    pub tsc_khz: Option<u64>,
    devices: [MmioDevice; MAX_DISKS],
    device_count: usize,
}

impl Config {
    /// The `virtio_mmio.device=` entries, in command-line order.
    pub fn devices(&self) -> &[MmioDevice] {
        &self.devices[..self.device_count]
    }

    /// How long the program runs, if it ends by itself.
    pub fn duration(&self) -> Option<u64> {
        match (self.program, self.seconds) {
            (Program::WriteVerifyLoop, None) => Some(DEFAULT_LOOP_SECONDS),
            (Program::Bench, None) => Some(DEFAULT_LOOP_SECONDS),
            (_, s) => s,
        }
    }
}

/// A word of the command line the guest cannot accept, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Error<'a> {
    pub word: &'a str,
    pub why: &'static str,
}

/// A number: decimal, or hexadecimal with `0x`.
pub fn parse_number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() => u64::from_str_radix(hex, 16).ok(),
        Some(_) => None,
        None if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok(),
        None => None,
    }
}

/// A size: a number with an optional binary suffix `K`, `M`, `G` or `T` (either case).
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        b't' | b'T' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    parse_number(digits)?.checked_mul(1 << shift)
}

/// `<size>@<base>:<irq>[:<id>]`.
fn parse_device(s: &str) -> Option<MmioDevice> {
    let (size, rest) = s.split_once('@')?;
    let mut parts = rest.split(':');
    let base = parse_number(parts.next()?)?;
    let irq = u32::try_from(parse_number(parts.next()?)?).ok()?;
    if let Some(id) = parts.next() {
        parse_number(id)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(MmioDevice {
        size: parse_size(size)?,
        base,
        irq,
    })
}

fn parse_program(s: &str) -> Option<Program> {
    [
        Program::Write,
        Program::Verify,
        Program::WriteVerifyLoop,
        Program::Dirty,
        Program::Idle,
        Program::Bench,
    ]
    .into_iter()
    .find(|p| p.name() == s)
}

fn parse_mode(s: &str) -> Option<BenchMode> {
    [
        BenchMode::SeqRead,
        BenchMode::SeqWrite,
        BenchMode::RandRead,
        BenchMode::RandWrite,
    ]
    .into_iter()
    .find(|m| m.name() == s)
}

/// Parses a command line. Unknown words are ignored (QEMU adds its own); a known key
/// with a bad value is an error naming the word.
pub fn parse(line: &str) -> Result<Config, Error<'_>> {
    let mut c = Config {
        program: Program::WriteVerifyLoop,
        seed: 1,
        generation: 1,
        bytes: None,
        seconds: None,
        rate: None,
        mode: BenchMode::RandRead,
        bs: BLOCK_SIZE as u64,
        qd: 1,
        tsc_khz: None,
        devices: [MmioDevice::default(); MAX_DISKS],
        device_count: 0,
    };
    for word in line.split_ascii_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        let bad = |why| Error { word, why };
        match key {
            "run" => c.program = parse_program(value).ok_or(bad("unknown program"))?,
            "seed" => c.seed = parse_number(value).ok_or(bad("not a number"))?,
            "gen" => {
                c.generation = parse_number(value)
                    .filter(|g| *g > 0)
                    .ok_or(bad("not a generation (1 or more)"))?;
            }
            "bytes" => {
                let b = parse_size(value).ok_or(bad("not a size"))?;
                if b == 0 || b % BLOCK_SIZE as u64 != 0 {
                    return Err(bad("not a positive multiple of 4096"));
                }
                c.bytes = Some(b);
            }
            "seconds" => c.seconds = Some(parse_number(value).ok_or(bad("not a number"))?),
            "rate" => {
                c.rate = Some(
                    parse_size(value)
                        .filter(|r| *r > 0)
                        .ok_or(bad("not a positive size"))?,
                );
            }
            "mode" => c.mode = parse_mode(value).ok_or(bad("unknown bench mode"))?,
            "bs" => {
                c.bs = parse_size(value)
                    .filter(|b| *b >= 512 && *b % 512 == 0 && *b <= MAX_BENCH_BS)
                    .ok_or(bad("not a multiple of 512 from 512 to 4M"))?;
            }
            "qd" => {
                c.qd = parse_number(value)
                    .and_then(|q| u32::try_from(q).ok())
                    .filter(|q| (1..=MAX_BENCH_QD).contains(q))
                    .ok_or(bad("not a queue depth from 1 to 128"))?;
            }
            "tsc_khz" => {
                c.tsc_khz = Some(
                    parse_number(value)
                        .filter(|k| *k > 0)
                        .ok_or(bad("not a positive number"))?,
                );
            }
            "virtio_mmio.device" => {
                let d = parse_device(value).ok_or(bad("not <size>@<base>:<irq>"))?;
                let slot = c
                    .devices
                    .get_mut(c.device_count)
                    .ok_or(bad("too many devices"))?;
                *slot = d;
                c.device_count += 1;
            }
            _ => {}
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_line_means_a_five_second_write_verify_loop() {
        let c = parse("").expect("parses");
        assert_eq!(c.program, Program::WriteVerifyLoop);
        assert_eq!(c.duration(), Some(5));
        assert_eq!((c.seed, c.generation, c.bytes), (1, 1, None));
        assert!(c.devices().is_empty());
    }

    #[test]
    fn vmm_entries_alone_still_mean_the_default_program() {
        let c = parse("virtio_mmio.device=4K@0xd0000000:5 tsc_khz=2994000").expect("parses");
        assert_eq!(c.program, Program::WriteVerifyLoop);
        assert_eq!(c.tsc_khz, Some(2_994_000));
        assert_eq!(
            c.devices(),
            &[MmioDevice {
                size: 4096,
                base: 0xd000_0000,
                irq: 5
            }]
        );
    }

    #[test]
    fn full_write_line() {
        let c = parse("run=write seed=7 bytes=16M gen=3").expect("parses");
        assert_eq!(c.program, Program::Write);
        assert_eq!((c.seed, c.generation, c.bytes), (7, 3, Some(16 << 20)));
        assert_eq!(c.duration(), None);
    }

    #[test]
    fn qemu_microvm_devices_in_order() {
        // What QEMU's microvm appends (acpi=off), among its other words.
        let c = parse(
            "run=verify earlyprintk=ttyS0 virtio_mmio.device=512@0xfeb00e00:12 \
             virtio_mmio.device=512@0xfeb00c00:11:3",
        )
        .expect("parses");
        assert_eq!(
            c.devices(),
            &[
                MmioDevice {
                    size: 512,
                    base: 0xfeb0_0e00,
                    irq: 12
                },
                MmioDevice {
                    size: 512,
                    base: 0xfeb0_0c00,
                    irq: 11
                }
            ]
        );
    }

    #[test]
    fn dirty_and_bench_parameters() {
        let c = parse("run=dirty rate=64M seconds=10").expect("parses");
        assert_eq!(
            (c.program, c.rate, c.duration()),
            (Program::Dirty, Some(64 << 20), Some(10))
        );
        assert_eq!(parse("run=idle").expect("parses").duration(), None);
        let b = parse("run=bench mode=seqwrite bs=1M qd=32 seconds=3").expect("parses");
        assert_eq!(
            (b.program, b.mode, b.bs, b.qd, b.duration()),
            (Program::Bench, BenchMode::SeqWrite, 1 << 20, 32, Some(3))
        );
        let d = parse("run=bench").expect("parses");
        assert_eq!(
            (d.mode, d.bs, d.qd, d.duration()),
            (BenchMode::RandRead, 4096, 1, Some(5))
        );
    }

    #[test]
    fn sizes_and_numbers() {
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("0x1000"), Some(4096));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("K"), None);
        assert_eq!(parse_size("16Q"), None);
        assert_eq!(parse_size("99999999999T"), None);
        assert_eq!(parse_number("0x"), None);
        assert_eq!(parse_number("-1"), None);
        assert_eq!(parse_number("+1"), None);
    }

    #[test]
    fn bad_values_name_the_word() {
        let cases = [
            ("run=fly", "run=fly", "unknown program"),
            ("seed=x", "seed=x", "not a number"),
            (
                "bytes=1000",
                "bytes=1000",
                "not a positive multiple of 4096",
            ),
            ("bytes=0", "bytes=0", "not a positive multiple of 4096"),
            ("gen=0", "gen=0", "not a generation (1 or more)"),
            ("rate=0", "rate=0", "not a positive size"),
            ("mode=fast", "mode=fast", "unknown bench mode"),
            ("bs=100", "bs=100", "not a multiple of 512 from 512 to 4M"),
            ("bs=8M", "bs=8M", "not a multiple of 512 from 512 to 4M"),
            ("qd=0", "qd=0", "not a queue depth from 1 to 128"),
            ("qd=129", "qd=129", "not a queue depth from 1 to 128"),
            ("tsc_khz=0", "tsc_khz=0", "not a positive number"),
            (
                "virtio_mmio.device=4K",
                "virtio_mmio.device=4K",
                "not <size>@<base>:<irq>",
            ),
            (
                "virtio_mmio.device=4K@0xd0000000:5:1:2",
                "virtio_mmio.device=4K@0xd0000000:5:1:2",
                "not <size>@<base>:<irq>",
            ),
        ];
        for (line, word, why) in cases {
            assert_eq!(parse(line), Err(Error { word, why }), "{line}");
        }
    }

    #[test]
    fn unknown_words_are_ignored_and_later_values_win() {
        let c = parse("console=ttyS0 quiet run=write run=verify seed=1 seed=2").expect("parses");
        assert_eq!((c.program, c.seed), (Program::Verify, 2));
    }

    #[test]
    fn at_most_max_disks_devices() {
        let mut line = String::new();
        for i in 0..MAX_DISKS {
            line += &format!(
                "virtio_mmio.device=4K@{:#x}:{} ",
                0xd000_0000 + i * 0x1000,
                5 + i
            );
        }
        assert_eq!(parse(&line).expect("parses").devices().len(), MAX_DISKS);
        line += "virtio_mmio.device=4K@0xd0100000:20";
        assert_eq!(
            parse(&line).map(|_| ()),
            Err(Error {
                word: "virtio_mmio.device=4K@0xd0100000:20",
                why: "too many devices"
            })
        );
    }
}
