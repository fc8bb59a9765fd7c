//! Benchmarks that compare splitvmm with its QEMU equivalent on the same machine, in one
//! run, and report the ratio (splitvmm / QEMU; above 1.0 means splitvmm is faster).
//!
//! `cargo build --release --workspace && target/release/bench qmp` (or `bash bench/run.sh`).
//! Each benchmark alternates the two contenders over several rounds and reports medians,
//! so background noise hits both alike. Results are printed as a table and, with `--json`,
//! as one JSON object of named metrics.

mod nbd;
mod qmp;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "splitvmm against QEMU, same machine, same run")]
struct Args {
    #[command(subcommand)]
    which: Which,
    /// Also print the figures as one JSON object.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Which {
    /// QMP `query-version` round trips per second: splitvmm vs qemu-storage-daemon.
    Qmp {
        /// Seconds per round per contender.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Rounds (alternating the contenders).
        #[arg(long, default_value_t = 5)]
        rounds: u32,
    },
    /// nbdcopy throughput through splitvmm vs qemu-storage-daemon vs qemu-nbd.
    Nbd {
        /// Image size in GiB.
        #[arg(long, default_value_t = 2)]
        size: u64,
        /// Rounds (each runs every contender once).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let result = match args.which {
        Which::Qmp { seconds, rounds } => qmp::run(seconds, rounds),
        Which::Nbd { size, rounds } => return nbd_report(size, rounds, args.json),
    };
    match result {
        Ok(report) => {
            println!("{}", report.table());
            if args.json {
                println!("{}", report.json());
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// One benchmark's figures.
#[derive(Debug)]
pub struct Report {
    pub name: &'static str,
    pub unit: &'static str,
    pub splitvmm: Vec<f64>,
    pub qemu: Vec<f64>,
    pub qemu_name: &'static str,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

impl Report {
    pub fn ratio(&self) -> f64 {
        median(&self.splitvmm) / median(&self.qemu)
    }

    fn table(&self) -> String {
        format!(
            "{}\n  splitvmm            {:>12.0} {} (median of {})\n  {:<19} {:>12.0} {}\n  ratio splitvmm/QEMU {:>12.2}",
            self.name,
            median(&self.splitvmm),
            self.unit,
            self.splitvmm.len(),
            self.qemu_name,
            median(&self.qemu),
            self.unit,
            self.ratio()
        )
    }

    fn json(&self) -> String {
        serde_json::json!({
            "benchmark": self.name,
            "unit": self.unit,
            "splitvmm": self.splitvmm,
            "qemu": self.qemu,
            "splitvmm_median": median(&self.splitvmm),
            "qemu_median": median(&self.qemu),
            "ratio": self.ratio(),
        })
        .to_string()
    }
}

/// Runs the NBD benchmark and prints, per format and direction, splitvmm against
/// qemu-storage-daemon and against qemu-nbd: throughput, then MiB per CPU-second of the
/// server alone and of the server and nbdcopy together (higher is cheaper).
fn nbd_report(size: u64, rounds: u32, json: bool) -> std::process::ExitCode {
    match nbd::run_all(size, rounds) {
        Ok(all) => {
            for (label, f) in all {
                let measures = [
                    ("", "MiB/s", f.per_contender),
                    (", server CPU", "MiB/CPU-s", f.server_efficiency),
                    (", server+nbdcopy CPU", "MiB/CPU-s", f.total_efficiency),
                ];
                for (what, unit, [ours, qsd, qnbd]) in measures {
                    for (other, name) in [(qsd, "qemu-storage-daemon"), (qnbd, "qemu-nbd")] {
                        let report = Report {
                            name: "",
                            unit,
                            splitvmm: ours.clone(),
                            qemu: other,
                            qemu_name: name,
                        };
                        println!(
                            "{label}{what}\n{}",
                            report.table().split_once('\n').map_or("", |t| t.1)
                        );
                        if json {
                            println!(
                                "{}",
                                report.json().replacen(
                                    "\"benchmark\":\"\"",
                                    &format!("\"benchmark\":\"{label}{what} vs {name}\""),
                                    1
                                )
                            );
                        }
                    }
                }
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Waits until a server listens on `sock` (30 s at most), failing early if it exits.
pub fn wait_for(sock: &std::path::Path, child: &mut std::process::Child) -> Result<(), String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("server exited early: {st}"));
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("{} never listened", sock.display()));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}
