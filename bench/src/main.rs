//! Benchmarks that compare splitvmm with its QEMU equivalent on the same machine, in one
//! run, and report the ratio (splitvmm / QEMU; above 1.0 means splitvmm is faster).
//!
//! `cargo build --release --workspace && target/release/bench qmp` (or `bash bench/run.sh`).
//! Each benchmark alternates the two contenders over several rounds and reports medians,
//! so background noise hits both alike. Results are printed as a table and, with `--json`,
//! as one JSON object of named metrics.
//!
//! `migrate` moves the workload guest between two instances of each ([`migrate`]).
//!
//! `boot`, `disk` and `mem` boot the workload guest (`guest/`) under splitvmm and under
//! QEMU `-M microvm` ([`vm`]); their figures carry their spread and the load average.

mod boot;
mod compared;
mod disk;
mod load;
mod mem;
mod migrate;
mod mirror;
mod nbd;
mod qmp;
mod stream;
mod vm;

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
    /// `block-stream` of a backing chain: splitvmm vs qemu-storage-daemon.
    Stream {
        /// Image size in MiB (half of it allocated in the base).
        #[arg(long, default_value_t = 1024)]
        size: u64,
        /// Rounds (each runs both, alternating which goes first).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
    /// Spawn to the workload guest's first boot-timer write (port 0xe9): splitvmm vs QEMU
    /// microvm.
    Boot {
        /// Rounds (each boots both, alternating which goes first).
        #[arg(long, default_value_t = 20)]
        rounds: u32,
    },
    /// Guest disk throughput (the workload guest's `bench` program): splitvmm vs QEMU
    /// virtio-blk on the same image.
    Disk {
        /// Seconds per guest run.
        #[arg(long, default_value_t = 3)]
        seconds: u32,
        /// Rounds per case (each runs both, alternating which goes first).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Image formats.
        #[arg(long, value_delimiter = ',', default_value = "raw")]
        format: Vec<String>,
        /// QEMU's cache setting to compare against.
        #[arg(long, value_enum, default_value_t = vm::QemuCache::Writeback)]
        qemu_cache: vm::QemuCache,
        /// Image size in MiB.
        #[arg(long, default_value_t = 1024)]
        size: u64,
        /// Only the cases named here, as MODE or MODE:QD (e.g. `seqwrite:1,seqread:1`);
        /// all eight by default.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// A new, empty image (sparse raw, or qcow2 with nothing allocated) for every guest
        /// run, so that writes allocate; meant for the write cases.
        #[arg(long)]
        allocating: bool,
    },
    /// QMP latency (p50, p99, max) with many clients at once while a mirror runs, and the
    /// servers' PSS before and after: splitvmm vs qemu-storage-daemon.
    Load {
        /// QMP clients at once.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Queries per client.
        #[arg(long, default_value_t = 50)]
        queries: usize,
        /// Rounds (each runs both, alternating which goes first).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
    /// drive-mirror time to READY (splitvmm vs qemu-storage-daemon vs cp) and rate-limit
    /// accuracy.
    Mirror {
        /// Image size in GiB (half of it allocated).
        #[arg(long, default_value_t = 4)]
        size: u64,
        /// Rounds (each runs every contender once).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Image formats.
        #[arg(long, value_delimiter = ',', default_value = "raw,qcow2")]
        format: Vec<String>,
    },
    /// PSS beyond guest RAM with the workload guest running: splitvmm's processes vs QEMU.
    Mem {
        /// Rounds (each runs both, alternating which goes first).
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// The guest program: write-verify-loop or idle.
        #[arg(long, default_value = "write-verify-loop")]
        program: String,
        /// Seconds each guest runs.
        #[arg(long, default_value_t = 8)]
        seconds: u32,
        /// Seconds into the run when memory is sampled.
        #[arg(long, default_value_t = 4)]
        settle: u32,
    },
    /// Live migration of the workload guest, idle and dirtying memory, max-bandwidth 0:
    /// downtime, total time and the last expected-downtime, splitvmm and QEMU microvm,
    /// with the link bandwidth of the same run.
    Migrate {
        /// Rounds (each migrates both, alternating which goes first).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 512)]
        memory: u64,
        /// The dirtying guest's rate in MiB/s.
        #[arg(long, default_value_t = 100)]
        rate: u64,
    },
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let load = compared::loadavg();
    let result = match args.which {
        Which::Qmp { seconds, rounds } => qmp::run(seconds, rounds),
        Which::Nbd { size, rounds } => return nbd_report(size, rounds, args.json),
        Which::Stream { size, rounds } => {
            let r = stream::run_all(size, rounds).map(|c| (c, String::new()));
            return compared_report(r, &load, args.json);
        }
        Which::Load {
            clients,
            queries,
            rounds,
        } => {
            return match load::run(clients, queries, rounds, args.json) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("bench: {e}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Which::Boot { rounds } => {
            let r = boot::run(rounds).map(|c| (vec![c], String::new()));
            return compared_report(r, &load, args.json);
        }
        Which::Disk {
            seconds,
            rounds,
            format,
            qemu_cache,
            size,
            only,
            allocating,
        } => {
            let o = disk::Options {
                seconds,
                rounds,
                formats: format,
                qemu_cache,
                size_mib: size,
                only,
                allocating,
            };
            let note = format!("QEMU drive: {}", qemu_cache.drive_options());
            return compared_report(disk::run(&o).map(|c| (c, note)), &load, args.json);
        }
        Which::Mirror {
            size,
            rounds,
            format,
        } => {
            let r = mirror::run_all(size, rounds, &format);
            return compared_report(r, &load, args.json);
        }
        Which::Migrate {
            rounds,
            memory,
            rate,
        } => {
            return match migrate::run(rounds, memory, rate, args.json) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("bench: {e}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Which::Mem {
            rounds,
            program,
            seconds,
            settle,
        } => {
            let r = mem::run(rounds, &program, seconds, settle)
                .map(|m| (vec![m.compared], mem::breakdown(&m.last)));
            return compared_report(r, &load, args.json);
        }
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

/// Prints the figures of `boot`, `disk` or `mem` (tables, a note, the load average before
/// and after, and with `json` one JSON object per figure).
fn compared_report(
    result: Result<(Vec<compared::Compared>, String), String>,
    load_before: &str,
    json: bool,
) -> std::process::ExitCode {
    match result {
        Ok((figures, note)) => {
            for f in &figures {
                println!("{}", f.table());
            }
            if !note.is_empty() {
                println!("{}", note.trim_end());
            }
            println!(
                "load average (1, 5, 15 min) before: {load_before}, after: {} ({} CPUs)",
                compared::loadavg(),
                std::thread::available_parallelism().map_or(0, |n| n.get())
            );
            if json {
                for f in &figures {
                    println!("{}", f.json());
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
