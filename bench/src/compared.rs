//! Figures of one metric for splitvmm and QEMU, round by round, with their medians, spread
//! and ratio, printed as a table line and as JSON (used by `boot`, `disk` and `mem`).

/// Which way is better for a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// One metric, both VMMs.
#[derive(Debug, Clone)]
pub struct Compared {
    pub name: String,
    pub unit: &'static str,
    pub better: Better,
    /// The ratio splitvmm / QEMU this metric should reach (at least, for `Higher`; at most,
    /// for `Lower`).
    pub target: Option<f64>,
    pub splitvmm: Vec<f64>,
    pub qemu: Vec<f64>,
}

/// Minimum, first quartile, median, third quartile and maximum (nearest rank).
pub fn five(v: &[f64]) -> [f64; 5] {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return [f64::NAN; 5];
    }
    let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
    [at(0.0), at(0.25), at(0.5), at(0.75), at(1.0)]
}

/// The load average (1, 5, 15 minutes) as `/proc/loadavg` gives it.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

impl Compared {
    pub fn new(name: impl Into<String>, unit: &'static str, better: Better) -> Self {
        Self {
            name: name.into(),
            unit,
            better,
            target: None,
            splitvmm: Vec::new(),
            qemu: Vec::new(),
        }
    }

    pub fn with_target(mut self, target: f64) -> Self {
        self.target = Some(target);
        self
    }

    pub fn ratio(&self) -> f64 {
        five(&self.splitvmm)[2] / five(&self.qemu)[2]
    }

    /// Whether the target is met (`None` without one).
    pub fn met(&self) -> Option<bool> {
        let (t, r) = (self.target?, self.ratio());
        Some(match self.better {
            Better::Higher => r >= t,
            Better::Lower => r <= t,
        })
    }

    pub fn table(&self) -> String {
        let line = |who: &str, v: &[f64]| {
            let [min, q1, med, q3, max] = five(v);
            format!(
                "  {who:<9} median {med:>10.2} {unit}  (min {min:.2}, quartiles {q1:.2}-{q3:.2}, max {max:.2}; n={})",
                v.len(),
                unit = self.unit
            )
        };
        let target = match (self.target, self.met()) {
            (Some(t), Some(met)) => format!(
                "  (target {} {t}: {})",
                if self.better == Better::Higher {
                    "≥"
                } else {
                    "≤"
                },
                if met { "met" } else { "NOT met" }
            ),
            _ => String::new(),
        };
        format!(
            "{} ({}, {} is better)\n{}\n{}\n  ratio splitvmm/QEMU {:.2}{target}",
            self.name,
            self.unit,
            if self.better == Better::Higher {
                "higher"
            } else {
                "lower"
            },
            line("splitvmm", &self.splitvmm),
            line("QEMU", &self.qemu),
            self.ratio()
        )
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "benchmark": self.name,
            "unit": self.unit,
            "better": if self.better == Better::Higher { "higher" } else { "lower" },
            "splitvmm": self.splitvmm,
            "qemu": self.qemu,
            "splitvmm_median": five(&self.splitvmm)[2],
            "qemu_median": five(&self.qemu)[2],
            "ratio": self.ratio(),
            "target": self.target,
            "target_met": self.met(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_quartiles_and_targets() {
        assert_eq!(five(&[5.0, 1.0, 3.0, 2.0, 4.0]), [1.0, 2.0, 3.0, 4.0, 5.0]);
        let mut c = Compared::new("boot", "ms", Better::Lower).with_target(0.5);
        c.splitvmm = vec![30.0, 40.0, 35.0];
        c.qemu = vec![100.0, 90.0, 110.0];
        assert!((c.ratio() - 0.35).abs() < 1e-9);
        assert_eq!(c.met(), Some(true));
        c.better = Better::Higher;
        assert_eq!(c.met(), Some(false));
    }
}
