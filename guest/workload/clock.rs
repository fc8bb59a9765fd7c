//! Time from `rdtsc`: where the TSC frequency comes from (`tsc_khz=`, else CPUID, else a
//! calibration against the PIT, else an assumed 2 GHz), deadlines for every poll, and
//! durations and rates for the report.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::{cpuid, inb, outb, rdtsc};

/// TSC ticks per second, set once by vCPU 0 during set-up.
static TSC_HZ: AtomicU64 = AtomicU64::new(ASSUMED_HZ);

const ASSUMED_HZ: u64 = 2_000_000_000;

/// Where the TSC frequency came from.
#[derive(Clone, Copy)]
pub enum Source {
    Cmdline,
    /// CPUID leaf 0x40000010 (hypervisor timing leaf, QEMU's `vmware-cpuid-freq`).
    HypervisorLeaf,
    /// CPUID leaf 0x15 (TSC/crystal ratio).
    Leaf15,
    /// CPUID leaf 0x16 (base frequency in MHz).
    Leaf16,
    /// Measured against the PIT's 1.193182 MHz clock.
    Pit,
    Assumed,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Self::Cmdline => "tsc_khz=",
            Self::HypervisorLeaf => "CPUID 0x40000010",
            Self::Leaf15 => "CPUID 0x15",
            Self::Leaf16 => "CPUID 0x16",
            Self::Pit => "the PIT",
            Self::Assumed => "nothing (assumed 2 GHz)",
        }
    }
}

/// Works out the TSC frequency and sets it for everyone.
pub fn calibrate(tsc_khz: Option<u64>) -> (u64, Source) {
    let (hz, source) = detect(tsc_khz);
    TSC_HZ.store(hz, Ordering::Relaxed);
    (hz, source)
}

fn detect(tsc_khz: Option<u64>) -> (u64, Source) {
    if let Some(khz) = tsc_khz {
        return (khz.saturating_mul(1000), Source::Cmdline);
    }
    let hypervisor = cpuid(1).2 & (1 << 31) != 0;
    if hypervisor && cpuid(0x4000_0000).0 >= 0x4000_0010 {
        let khz = u64::from(cpuid(0x4000_0010).0);
        if khz != 0 {
            return (khz * 1000, Source::HypervisorLeaf);
        }
    }
    let max = cpuid(0).0;
    if max >= 0x15 {
        let (den, num, crystal, _) = cpuid(0x15);
        if den != 0 && num != 0 && crystal != 0 {
            return (
                u64::from(crystal) * u64::from(num) / u64::from(den),
                Source::Leaf15,
            );
        }
    }
    if max >= 0x16 {
        let mhz = u64::from(cpuid(0x16).0 & 0xffff);
        if mhz != 0 {
            return (mhz * 1_000_000, Source::Leaf16);
        }
    }
    match pit_calibrate() {
        Some(hz) => (hz, Source::Pit),
        None => (ASSUMED_HZ, Source::Assumed),
    }
}

/// The PIT's input clock.
const PIT_HZ: u64 = 1_193_182;
/// PIT ticks to measure over (50 ms).
const PIT_TICKS: u64 = PIT_HZ / 20;
/// Identical samples in a row that mean the PIT does not count (or is absent: 0xffff).
/// A counting PIT changes between any two samples more than a microsecond apart.
const PIT_STUCK_SAMPLES: u32 = 1_000;
/// Samples before giving up altogether.
const PIT_MAX_SAMPLES: u32 = 10_000_000;

/// PIT channel 0's current count (latched).
fn pit_count() -> u16 {
    outb(0x43, 0x00);
    let lo = inb(0x40);
    let hi = inb(0x40);
    u16::from_le_bytes([lo, hi])
}

/// Measures the TSC against PIT channel 0, reprogrammed as a rate generator (mode 2)
/// counting down from 65536; interrupts are off, so its IRQ 0 goes nowhere. Each sample
/// is three port accesses (VM exits), so samples are far closer than the 55 ms wrap.
fn pit_calibrate() -> Option<u64> {
    outb(0x43, 0x34);
    outb(0x40, 0);
    outb(0x40, 0);
    let mut last = pit_count();
    let start = rdtsc();
    let (mut ticks, mut same) = (0u64, 0u32);
    for _ in 0..PIT_MAX_SAMPLES {
        let now = pit_count();
        if now == last {
            same += 1;
            if same == PIT_STUCK_SAMPLES {
                return None;
            }
            continue;
        }
        same = 0;
        ticks += u64::from(last.wrapping_sub(now));
        last = now;
        if ticks >= PIT_TICKS {
            let hz = u128::from(rdtsc() - start) * u128::from(PIT_HZ) / u128::from(ticks);
            let hz = u64::try_from(hz).ok()?;
            // Anything outside 100 MHz to 10 GHz is not a TSC clock but a broken PIT.
            return (100_000_000..=10_000_000_000).contains(&hz).then_some(hz);
        }
    }
    None
}

/// TSC ticks per second.
pub fn hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// The TSC now.
pub fn now() -> u64 {
    rdtsc()
}

/// Ticks in `ms` milliseconds.
pub fn ms_ticks(ms: u64) -> u64 {
    let t = u128::from(hz()) * u128::from(ms) / 1000;
    u64::try_from(t).unwrap_or(u64::MAX)
}

/// A point in time that polls give up at.
pub struct Deadline {
    end: u64,
}

impl Deadline {
    /// `ms` milliseconds from now.
    pub fn after_ms(ms: u64) -> Self {
        Self {
            end: now().saturating_add(ms_ticks(ms)),
        }
    }

    /// `seconds` from now, or never.
    pub fn after_secs(seconds: Option<u64>) -> Self {
        match seconds {
            Some(s) => Self::after_ms(s.saturating_mul(1000)),
            None => Self { end: u64::MAX },
        }
    }

    pub fn passed(&self) -> bool {
        now() >= self.end
    }
}

/// A duration in ticks, shown as seconds with two decimals.
pub struct Secs(pub u64);

impl fmt::Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let centis = u128::from(self.0) * 100 / u128::from(hz().max(1));
        write!(f, "{}.{:02} s", centis / 100, centis % 100)
    }
}

/// `amount` per second over `ticks`, shown with one decimal after dividing by `unit`
/// (e.g. bytes over 1_000_000 gives MB/s).
pub struct Rate {
    pub amount: u64,
    pub unit: u64,
    pub ticks: u64,
}

impl Rate {
    /// The rate per second, in `unit`s, times ten.
    pub fn tenths(&self) -> u128 {
        if self.ticks == 0 {
            return 0;
        }
        u128::from(self.amount) * u128::from(hz()) * 10
            / u128::from(self.ticks)
            / u128::from(self.unit.max(1))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.tenths();
        write!(f, "{}.{}", t / 10, t % 10)
    }
}
