//! `keel-bench engine`: one messaging engine in this process over a SQLite store in a temp
//! directory (or `--dir`), no network. N producers send 1 KiB assured-persistent messages
//! (each acknowledged only once durable: group commit), then M consumers receive and accept
//! them. Prints throughput and send latency, the process's peak RSS, and the time to reopen
//! the store and take the first message after a restart.
//!
//! This isolates the engine and store; the side-by-side with RabbitMQ and NATS goes through
//! AMQP (the same client path as theirs) and lives in its own subcommand.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use keel_config::{DestinationCfg, DestinationKind, Reliability};
use keel_engine::messaging::{Outcome, OutgoingMessage};
use keel_engine::{Engine, EngineConfig, StartMode};
use serde_json::json;

const ME: &str = "node01.bench-bus1";

pub struct Opts {
    pub messages: u64,
    pub producers: u32,
    pub consumers: u32,
    pub body_bytes: usize,
    pub dir: Option<std::path::PathBuf>,
    pub json: bool,
}

pub(crate) fn engine(dir: &std::path::Path) -> Arc<Engine> {
    let q = DestinationCfg::new("bench", DestinationKind::Queue, ME);
    Engine::new(
        EngineConfig {
            me: ME.into(),
            uuid: "0b5e0c1e-5a1d-4c38-9c0e-b3e1c0ffee00".into(),
            bus: "bus1".into(),
            node: "node01".into(),
            server: "bench".into(),
            store_path: dir.join("bench.sqlite"),
            destinations: vec![q],
            max_message_bytes: 1 << 20,
            store_url: None,
            peers: Vec::new(),
            duplicate_window_ms: 3_600_000,
        },
        false,
    )
}

/// Peak and current resident set of this process, from /proc (KiB).
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

pub fn run(o: Opts) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = o.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let e = engine(&dir);
        e.start(StartMode::Normal).await?;
        let m = e.messaging()?;
        let body = vec![b'k'; o.body_bytes];
        let per = o.messages / u64::from(o.producers.max(1));
        let total = per * u64::from(o.producers.max(1));
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..o.producers.max(1) {
            let m = m.clone();
            let body = body.clone();
            tasks.push(tokio::spawn(async move {
                // Sample every 16th latency: bounded memory at millions of messages.
                let mut lat = Vec::with_capacity((per / 16 + 1) as usize);
                for i in 0..per {
                    let s = Instant::now();
                    m.send(
                        "bench",
                        OutgoingMessage {
                            body: body.clone(),
                            reliability: Some(Reliability::AssuredPersistent),
                            ..Default::default()
                        },
                    )
                    .await?;
                    if i % 16 == 0 {
                        lat.push(s.elapsed().as_secs_f64() * 1000.0);
                    }
                }
                Ok::<_, anyhow::Error>(lat)
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.context("producer task")??);
        }
        let send_s = t0.elapsed().as_secs_f64();
        lat.sort_by(|a, b| a.total_cmp(b));
        let (hwm_after_send, _) = rss_kib();
        let depth = m.depth("bench").await?;
        assert_eq!(depth, total, "every acknowledged message is stored");

        // Restart: reopen the store with everything in it and take the first message.
        e.stop(false).await?;
        let t1 = Instant::now();
        e.start(StartMode::Normal).await?;
        let m = e.messaging()?;
        let first = m
            .receive("bench", Duration::from_secs(5))
            .await?
            .context("a message after restart")?;
        let reopen_ms = t1.elapsed().as_secs_f64() * 1000.0;
        m.settle("bench", first.seq, Outcome::Released).await?;

        let t2 = Instant::now();
        let mut consumers = Vec::new();
        for _ in 0..o.consumers.max(1) {
            let m = m.clone();
            consumers.push(tokio::spawn(async move {
                let mut n = 0u64;
                while let Some(d) = m.receive("bench", Duration::from_millis(200)).await? {
                    m.settle("bench", d.seq, Outcome::Accepted).await?;
                    n += 1;
                }
                Ok::<_, anyhow::Error>(n)
            }));
        }
        let mut received = 0;
        for c in consumers {
            received += c.await.context("consumer task")??;
        }
        let recv_s = t2.elapsed().as_secs_f64();
        assert_eq!(received, total, "every message received once");
        let (hwm, rss) = rss_kib();
        let store_bytes = keel_store::disk_bytes(&dir.join("bench.sqlite")).unwrap_or(0);
        let out = json!({
            "system": "keel-engine-inprocess",
            "messages": total,
            "body_bytes": o.body_bytes,
            "producers": o.producers,
            "consumers": o.consumers,
            "send_msgs_per_s": total as f64 / send_s,
            "send_p50_ms": pct(&lat, 0.5),
            "send_p99_ms": pct(&lat, 0.99),
            "receive_accept_msgs_per_s": total as f64 / recv_s.max(1e-9),
            "restart_to_first_message_ms": reopen_ms,
            "peak_rss_mib_after_send": hwm_after_send as f64 / 1024.0,
            "peak_rss_mib": hwm as f64 / 1024.0,
            "rss_mib_end": rss as f64 / 1024.0,
            "store_mib": store_bytes as f64 / (1024.0 * 1024.0),
        });
        if o.json {
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            for (k, v) in out.as_object().into_iter().flatten() {
                println!("{k:<30} {v}");
            }
        }
        e.stop(false).await?;
        Ok(())
    })
}
