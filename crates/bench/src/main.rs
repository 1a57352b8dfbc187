//! `keel-bench`: reproducible measurements of Keel, printed as a table and (`--json`) as JSON.
//!
//! `keel-bench foundation` measures, on a throwaway profile on free loopback ports:
//! - server start to open: `keel server start` wall time (spawn, start sequence, readiness
//!   check by the node agent) and the in-process time from `WSVR0100I` to `WSVR0001I`;
//! - restart after SIGKILL: from the kill to the node agent reporting the new process open,
//!   with the monitor policy's ping interval at 1 s;
//! - admin invoke round trip: `state` on the Server object, directly and forwarded by the
//!   node agent.
//!
//! It drives the real `keel` binary (`--keel`, default: beside this executable), so build both
//! in the same profile: `cargo build --release --bin keel --bin keel-bench`.
//!
//! The other subcommands: `engine`, `tx`, `tx-pg`, `tx-recovery`, `logs`, `scale`, `flush`,
//! and `peers`. `peers` is behind the cargo feature `peers`, so the workspace build never pulls
//! broker clients; `--rounds N` repeats the systems (odd rounds in reverse order) and compares
//! them within each round (`rounds.rs`, outside the feature so its tests always run), because
//! this VM's speed drifts between runs. Both binaries use mimalloc (glibc malloc cost the
//! server CPU on the message path; BENCHMARKS.md). Every benchmark client sets `TCP_NODELAY`
//! (Keel's through the fe2o3 patch); without it the consumers' small frames waited on Nagle.

/// The clients of every system share the keel binary's allocator (mimalloc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use keel_admin::{AdminClient, Credential};
use serde_json::{json, Value};

mod engine_bench;
mod logs_bench;
#[cfg(feature = "peers")]
mod peers;
// Only `peers` uses it; outside the feature its tests still run.
#[cfg_attr(not(feature = "peers"), allow(dead_code))]
mod rounds;
mod tx_bench;
mod xa_bench;

#[derive(Parser)]
#[command(about = "Keel benchmarks")]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand)]
enum What {
    /// One engine in-process: assured 1 KiB sends (group commit), receive+accept, restart, RSS.
    Engine {
        #[arg(long, default_value_t = 200_000)]
        messages: u64,
        #[arg(long, default_value_t = 64)]
        producers: u32,
        #[arg(long, default_value_t = 4)]
        consumers: u32,
        #[arg(long, default_value_t = 1024)]
        body_bytes: usize,
        /// Keep the store here instead of a temp directory.
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Two-phase commit with two in-process resources and the forced tranlog (group commit).
    Tx {
        #[arg(long, default_value_t = 200_000)]
        transactions: u64,
        #[arg(long, default_value_t = 512)]
        concurrency: u64,
        #[arg(long)]
        json: bool,
    },
    /// ME + PostgreSQL two-phase transactions per second, beside PostgreSQL alone doing the
    /// same prepared transactions (a throwaway cluster).
    TxPg {
        #[arg(long, default_value_t = 20_000)]
        transactions: u64,
        #[arg(long, default_value_t = 32)]
        concurrency: u64,
        #[arg(long)]
        json: bool,
    },
    /// Tranlog replay rate and recovery of N in-doubt ME + PostgreSQL transactions.
    TxRecovery {
        #[arg(long, default_value_t = 10_000)]
        transactions: u64,
        #[arg(long)]
        json: bool,
    },
    /// The binary log repository: records/s written, filtering by message ID and level.
    Logs {
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        #[arg(long)]
        json: bool,
    },
    /// Server start, restart after SIGKILL, admin round trip.
    Foundation {
        /// The keel binary (default: next to keel-bench).
        #[arg(long)]
        keel: Option<PathBuf>,
        /// Start/stop cycles and kill/restart cycles.
        #[arg(long, default_value_t = 10)]
        cycles: u32,
        /// Admin invokes per mode.
        #[arg(long, default_value_t = 2000)]
        invokes: u32,
        #[arg(long)]
        json: bool,
    },
    /// Fill one queue of a Keel server over AMQP, then restart it: memory and restart time
    /// with a large store (needs `--features peers`).
    Scale {
        #[arg(long, default_value_t = 5_000_000)]
        messages: u64,
        #[arg(long, default_value_t = 4)]
        producers: usize,
        #[arg(long, default_value_t = 1024)]
        body_bytes: usize,
        #[arg(long)]
        keel: Option<PathBuf>,
        #[arg(long, default_value_t = 27400)]
        keel_base_port: u16,
    },
    /// Two servers; the first engine's transmission queue holds `--messages` for the second
    /// (down), then the first is FLUSH-started: time to CWSIP0783E and to drain (needs
    /// `--features peers`).
    Flush {
        #[arg(long, default_value_t = 1_000_000)]
        messages: u64,
        #[arg(long, default_value_t = 4)]
        producers: usize,
        #[arg(long, default_value_t = 1024)]
        body_bytes: usize,
        #[arg(long)]
        keel: Option<PathBuf>,
        #[arg(long, default_value_t = 27400)]
        keel_base_port: u16,
    },
    /// TLS handshakes per second on a Keel server's bus port, full and resumed (needs
    /// `--features peers`).
    Handshakes {
        /// Concurrent clients (each connects, handshakes, closes, again).
        #[arg(long, default_value_t = 8)]
        connections: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long)]
        keel: Option<PathBuf>,
        #[arg(long, default_value_t = 27400)]
        keel_base_port: u16,
    },
    /// Keel (AMQP 1.0), RabbitMQ (quorum queue) and NATS JetStream (file storage) side by side:
    /// durable publishes with confirms, concurrent consumers with acks. Needs `--features peers`.
    Peers {
        #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
        rabbitmq: String,
        /// RabbitMQ over TLS (system `rabbitmq-tls`), e.g. the throwaway node of
        /// `scripts/rabbitmq-tls-node start DIR`: amqps://guest:guest@localhost:27671/%2f.
        #[arg(long)]
        rabbitmq_tls: Option<String>,
        /// The CA (PEM) that signed the RabbitMQ TLS listener's certificate.
        #[arg(long)]
        rabbitmq_ca: Option<PathBuf>,
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        nats: String,
        /// The keel binary whose server is measured (default: next to keel-bench).
        #[arg(long)]
        keel: Option<PathBuf>,
        /// First of the ports the benchmark's own Keel profile uses.
        #[arg(long, default_value_t = 27400)]
        keel_base_port: u16,
        /// Systems to run, in order (keel, rabbitmq, nats; keel-bus: the queue on a second
        /// engine, producers on the first; keel-tls: keel with every connection over TLS;
        /// rabbitmq-tls: RabbitMQ at --rabbitmq-tls trusting --rabbitmq-ca).
        #[arg(long, value_delimiter = ',', default_value = "keel,rabbitmq,nats")]
        systems: Vec<String>,
        #[arg(long, default_value_t = 4)]
        producers: usize,
        #[arg(long, default_value_t = 4)]
        consumers: usize,
        #[arg(long, default_value_t = 100_000)]
        messages: u64,
        #[arg(long, default_value_t = 1024)]
        body_bytes: usize,
        /// Unconfirmed publishes each producer may have outstanding.
        #[arg(long, default_value_t = 256)]
        inflight_per_producer: usize,
        /// Run every system this many times (odd rounds in reverse order) and print each
        /// system's median and the first system's throughput over each other's, per round.
        #[arg(long, default_value_t = 1)]
        rounds: u32,
        #[arg(long)]
        json: bool,
    },
}

/// The keel binary and the producers-only workload of `scale` and `flush`.
#[cfg(feature = "peers")]
fn fill_workload(
    keel: Option<PathBuf>,
    producers: usize,
    messages: u64,
    body_bytes: usize,
) -> Result<(PathBuf, peers::Workload)> {
    let keel = keel.map_or_else(peers::default_keel_binary, Ok)?;
    let w = peers::Workload {
        producers,
        consumers: 1,
        messages,
        body_bytes,
        inflight_per_producer: 256,
    };
    Ok((keel, w))
}

#[cfg(feature = "peers")]
fn print_json(report: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(report)?);
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().what {
        What::Engine {
            messages,
            producers,
            consumers,
            body_bytes,
            dir,
            json,
        } => engine_bench::run(engine_bench::Opts {
            messages,
            producers,
            consumers,
            body_bytes,
            dir,
            json,
        }),
        What::Tx {
            transactions,
            concurrency,
            json,
        } => tx_bench::run(transactions, concurrency.max(1), json),
        What::TxPg {
            transactions,
            concurrency,
            json,
        } => xa_bench::throughput(transactions, concurrency.max(1), json),
        What::TxRecovery { transactions, json } => xa_bench::recovery(transactions.max(1), json),
        What::Logs { records, json } => logs_bench::run(records.max(1), json),
        What::Foundation {
            keel,
            cycles,
            invokes,
            json,
        } => {
            let keel = match keel {
                Some(k) => k,
                None => std::env::current_exe()?.with_file_name("keel"),
            };
            if !keel.exists() {
                bail!("keel binary not found at {}; build it with `cargo build --release --bin keel` or pass --keel", keel.display());
            }
            foundation(&keel, cycles.max(1), invokes.max(1), json)
        }
        #[cfg(feature = "peers")]
        What::Peers {
            rabbitmq,
            rabbitmq_tls,
            rabbitmq_ca,
            nats,
            keel,
            keel_base_port,
            systems,
            producers,
            consumers,
            messages,
            body_bytes,
            inflight_per_producer,
            rounds,
            json,
        } => peers::run(peers::Opts {
            rabbitmq_url: rabbitmq,
            rabbitmq_tls_url: rabbitmq_tls,
            rabbitmq_ca,
            nats_url: nats,
            keel,
            keel_base_port,
            systems,
            workload: peers::Workload {
                producers,
                consumers,
                messages,
                body_bytes,
                inflight_per_producer,
            },
            rounds,
            json,
        }),
        #[cfg(feature = "peers")]
        What::Scale {
            messages,
            producers,
            body_bytes,
            keel,
            keel_base_port,
        } => {
            let (keel, w) = fill_workload(keel, producers, messages, body_bytes)?;
            let rt = tokio::runtime::Runtime::new()?;
            print_json(&rt.block_on(peers::run_scale(&keel, keel_base_port, &w))?)
        }
        #[cfg(feature = "peers")]
        What::Flush {
            messages,
            producers,
            body_bytes,
            keel,
            keel_base_port,
        } => {
            let (keel, w) = fill_workload(keel, producers, messages, body_bytes)?;
            let rt = tokio::runtime::Runtime::new()?;
            print_json(&rt.block_on(peers::run_flush(&keel, keel_base_port, &w))?)
        }
        #[cfg(feature = "peers")]
        What::Handshakes {
            connections,
            seconds,
            keel,
            keel_base_port,
        } => {
            let keel = keel.map_or_else(peers::default_keel_binary, Ok)?;
            let rt = tokio::runtime::Runtime::new()?;
            print_json(&rt.block_on(peers::run_handshakes(
                &keel,
                keel_base_port,
                connections,
                seconds.max(1),
            ))?)
        }
        #[cfg(not(feature = "peers"))]
        What::Handshakes { .. } => bail!(
            "this keel-bench was built without its TLS client; rebuild it with `cargo build --release -p keel-bench --features peers`"
        ),
        #[cfg(not(feature = "peers"))]
        What::Flush { .. } => bail!(
            "this keel-bench was built without its AMQP client; rebuild it with `cargo build --release -p keel-bench --features peers`"
        ),
        #[cfg(not(feature = "peers"))]
        What::Scale { .. } => bail!(
            "this keel-bench was built without its AMQP client; rebuild it with `cargo build --release -p keel-bench --features peers`"
        ),
        #[cfg(not(feature = "peers"))]
        What::Peers { .. } => bail!(
            "this keel-bench was built without the RabbitMQ and NATS clients; rebuild it with `cargo build --release -p keel-bench --features peers`"
        ),
    }
}

struct Profile {
    keel: PathBuf,
    dir: PathBuf,
    base_port: u16,
}

impl Profile {
    fn keel(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.keel)
            .arg("--profile")
            .arg(&self.dir)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "keel {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
    fn status(&self) -> Result<Value> {
        Ok(serde_json::from_str(
            &self.keel(&["server", "status", "server1", "--json"])?,
        )?)
    }
}

fn free_base_port() -> u16 {
    let seed = std::process::id() as u16;
    (0..1000u16)
        .map(|i| 30_000 + (seed.wrapping_add(i * 37) % 2_000) * 10)
        .find(|b| (0..10).all(|p| std::net::TcpListener::bind(("127.0.0.1", b + p)).is_ok()))
        .unwrap_or(37_270)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn summary(name: &str, mut ms: Vec<f64>) -> Value {
    ms.sort_by(|a, b| a.total_cmp(b));
    json!({"metric": name, "n": ms.len(), "p50_ms": percentile(&ms, 0.5), "p99_ms": percentile(&ms, 0.99), "max_ms": ms.last().copied().unwrap_or(f64::NAN)})
}

/// Milliseconds between the last WSVR0100I and the following WSVR0001I in a SystemOut.log.
fn in_process_start_ms(log: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let ts = |line: &str| -> Option<std::time::SystemTime> { humantime_parse(line.get(1..25)?) };
    let start = text.lines().rev().find(|l| l.contains("WSVR0100I"))?;
    let open = text.lines().rev().find(|l| l.contains("WSVR0001I"))?;
    Some(ts(open)?.duration_since(ts(start)?).ok()?.as_secs_f64() * 1000.0)
}

/// Parses `2026-11-24T10:36:08.123Z` (the log's timestamp) without another dependency.
fn humantime_parse(s: &str) -> Option<std::time::SystemTime> {
    let (date, time) = s.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (h, mi, se) = (t.next()??, t.next()??, t.next()??);
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + se;
    let ms: u64 = format!("{frac:0<3}")[..3].parse().ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs as u64) + Duration::from_millis(ms))
}

fn foundation(keel: &Path, cycles: u32, invokes: u32, json_out: bool) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let base_port = free_base_port();
    let p = Profile {
        keel: keel.to_path_buf(),
        dir: tmp.path().join("profile"),
        base_port,
    };
    p.keel(&[
        "profile",
        "create",
        p.dir.to_str().context("path")?,
        "--base-port",
        &base_port.to_string(),
    ])?;
    p.keel(&[
        "server",
        "set-monitor-policy",
        "server1",
        "--ping-interval-s",
        "1",
    ])?;
    p.keel(&["node", "start"])?;
    let result = measure(&p, cycles, invokes);
    let _ = p.keel(&["node", "stop", "--stop-servers"]);
    let results = result?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&Value::Array(results))?);
    } else {
        println!(
            "{:<40} {:>6} {:>10} {:>10} {:>10}",
            "metric", "n", "p50 ms", "p99 ms", "max ms"
        );
        for r in &results {
            println!(
                "{:<40} {:>6} {:>10.2} {:>10.2} {:>10.2}",
                r["metric"].as_str().unwrap_or(""),
                r["n"],
                r["p50_ms"].as_f64().unwrap_or(f64::NAN),
                r["p99_ms"].as_f64().unwrap_or(f64::NAN),
                r["max_ms"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    Ok(())
}

fn measure(p: &Profile, cycles: u32, invokes: u32) -> Result<Vec<Value>> {
    let log = p.dir.join("logs/server1/SystemOut.log");
    let (mut start_wall, mut start_inproc) = (Vec::new(), Vec::new());
    for _ in 0..cycles {
        let t0 = Instant::now();
        p.keel(&["server", "start", "server1"])?;
        start_wall.push(t0.elapsed().as_secs_f64() * 1000.0);
        if let Some(ms) = in_process_start_ms(&log) {
            start_inproc.push(ms);
        }
        p.keel(&["server", "stop", "server1"])?;
    }
    p.keel(&["server", "start", "server1"])?;

    let mut restart = Vec::new();
    for _ in 0..cycles {
        let pid = p.status()?["pid"].as_u64().context("pid")?;
        let t0 = Instant::now();
        Command::new("kill")
            .arg("-9")
            .arg(pid.to_string())
            .status()?;
        loop {
            let st = p.status()?;
            if st["state"] == "started" && st["pid"].as_u64() != Some(pid) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("server1 was not restarted within 30 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        restart.push(t0.elapsed().as_secs_f64() * 1000.0);
    }

    let password = std::fs::read_to_string(p.dir.join("secrets/admin-password"))?
        .trim()
        .to_string();
    let cred = Credential {
        user: "admin".into(),
        password,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let name = "Keel:type=Server,name=server1,node=node01,process=server1";
    let mut rtt = Vec::new();
    for (label, port) in [
        ("admin invoke, direct to server", p.base_port + 1),
        ("admin invoke, forwarded by node agent", p.base_port),
    ] {
        let client = AdminClient::new(
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            cred.clone(),
        );
        let mut ms = Vec::with_capacity(invokes as usize);
        for _ in 0..invokes {
            let t0 = Instant::now();
            rt.block_on(client.invoke(name, "state", vec![]))?;
            ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        rtt.push(summary(label, ms));
    }
    let mut out = vec![
        summary("server start to open (keel server start)", start_wall),
        summary("server start, WSVR0100I to WSVR0001I", start_inproc),
        summary("restart after SIGKILL (ping interval 1 s)", restart),
    ];
    out.extend(rtt);
    Ok(out)
}
