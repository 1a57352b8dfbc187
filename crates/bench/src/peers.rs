//! `keel-bench peers`: one durable-messaging workload run side by side against RabbitMQ (AMQP
//! 0-9-1, quorum queue) and NATS JetStream (file storage), so Keel's figures have a reference.
//!
//! The workload is the same for every system:
//! - a fresh destination per run (unique name with a timestamp), deleted at the end;
//! - P producers publish `messages` persistent messages of `body_bytes` between them, each
//!   counted only once the broker confirmed it durable, with at most `inflight_per_producer`
//!   unconfirmed at a time; latency is from the publish call to its confirmation;
//! - C consumers consume concurrently with manual acks, from the first publish on;
//! - throughput is `messages` over the seconds from the first publish until every message has
//!   been consumed and acked. Each body starts with its message id, so consumers count distinct
//!   messages: fewer than `messages` fails the run, duplicates and redeliveries are reported.
//!
//! # Adding a system
//! Write `pub async fn run_x(url: &str, w: &Workload) -> Result<Report>` in `peers/x.rs`
//! (see `rabbitmq.rs`, the shortest) that:
//! 1. creates the destination, named with [`unique_suffix`];
//! 2. connects `w.producers` producer states and `w.consumers` consumer states up front, so
//!    connection setup is not timed;
//! 3. calls [`drive`] with them and two closures: a producer that hands [`pipeline`] a
//!    `publish(id)` future resolving to a confirmation future, and a consumer that loops on its
//!    deliveries, acks each, and passes its id (from [`message_id`]) to [`Tally::record`]
//!    until the stop signal, and only then closes its connection;
//! 4. deletes the destination whatever `drive` returned, and returns `drive`'s result.
//!
//! Then add it to [`run`]'s list of systems.

mod handshakes;
mod keel;
mod nats;
mod rabbitmq;

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use handshakes::run_handshakes;
pub use keel::default_keel_binary;
pub use keel::{run_flush, run_keel, run_keel_bus, run_keel_tls, run_scale};
pub use nats::run_nats;
pub use rabbitmq::run_rabbitmq;

/// No consumer progress for this long means messages were lost (or a broker is stuck).
const STALL_TIMEOUT_S: u64 = 30;
/// How long consumers get to notice the stop signal and close before they are aborted.
const CONSUMER_STOP_TIMEOUT_S: u64 = 5;
/// How often the driver checks consumer progress; the end time itself is taken by the consumer
/// that completes the run, so this does not blur the measurement.
const PROGRESS_POLL_MS: u64 = 20;

pub struct Opts {
    pub rabbitmq_url: String,
    /// RabbitMQ's TLS listener (`amqps://`) and the CA that signed its certificate.
    pub rabbitmq_tls_url: Option<String>,
    pub rabbitmq_ca: Option<std::path::PathBuf>,
    pub nats_url: String,
    /// The keel binary to measure; None = next to keel-bench.
    pub keel: Option<std::path::PathBuf>,
    pub keel_base_port: u16,
    /// Which systems to run, in order.
    pub systems: Vec<String>,
    pub workload: Workload,
    /// Times every system runs; odd rounds run the systems in reverse order, so none always
    /// goes first (this VM's speed drifts by ±10 % between runs).
    pub rounds: u32,
    pub json: bool,
}

#[derive(Clone, Debug)]
pub struct Workload {
    pub producers: usize,
    pub consumers: usize,
    pub messages: u64,
    pub body_bytes: usize,
    pub inflight_per_producer: usize,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            producers: 4,
            consumers: 4,
            messages: 100_000,
            body_bytes: 1024,
            inflight_per_producer: 256,
        }
    }
}

impl Workload {
    fn validate(&self) -> Result<()> {
        ensure!(
            self.producers > 0 && self.consumers > 0,
            "need at least one producer and one consumer"
        );
        ensure!(self.messages > 0, "need at least one message");
        ensure!(
            self.body_bytes >= 8,
            "body_bytes must be at least 8: each body starts with its message id"
        );
        ensure!(
            self.inflight_per_producer > 0,
            "inflight_per_producer must be at least 1"
        );
        Ok(())
    }

    /// Producer `index`'s share of message ids: contiguous, sizes differing by at most one.
    pub fn ids(&self, index: usize) -> Range<u64> {
        let producers = self.producers as u64;
        let (base, extra) = (self.messages / producers, self.messages % producers);
        let i = index as u64;
        let start = i * base + i.min(extra);
        start..start + base + u64::from(i < extra)
    }

    /// A body of `body_bytes` whose first 8 bytes are `id` (little endian).
    pub fn body(&self, id: u64) -> Vec<u8> {
        let mut body = vec![b'k'; self.body_bytes];
        body[..8].copy_from_slice(&id.to_le_bytes());
        body
    }
}

/// The id a [`Workload::body`] carries.
pub fn message_id(body: &[u8]) -> Result<u64> {
    let head = body
        .get(..8)
        .with_context(|| format!("a {}-byte body has no message id", body.len()))?;
    Ok(u64::from_le_bytes(head.try_into().context("8-byte id")?))
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub system: String,
    /// 1-based; absent when the benchmark ran one round.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub round: Option<u32>,
    pub msgs_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub messages: u64,
    pub seconds: f64,
    /// Acked deliveries of a message already acked (the brokers promise at-least-once).
    pub duplicates: u64,
    /// Acked deliveries that the broker flagged as redelivered.
    pub redelivered: u64,
}

/// Per-message latencies in microseconds; a Vec rather than a histogram because a run is at
/// most a few million messages and sorting gives exact percentiles.
#[derive(Default)]
pub struct Latencies(Vec<u32>);

impl Latencies {
    pub fn with_capacity(n: usize) -> Self {
        Latencies(Vec::with_capacity(n))
    }

    pub fn record(&mut self, latency: Duration) {
        self.0
            .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
    }

    pub fn merge(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }

    /// (p50, p99) in milliseconds; NaN when nothing was recorded.
    pub fn p50_p99_ms(mut self) -> (f64, f64) {
        if self.0.is_empty() {
            return (f64::NAN, f64::NAN);
        }
        self.0.sort_unstable();
        let at = |p: f64| {
            let index = ((self.0.len() - 1) as f64 * p).round() as usize;
            f64::from(self.0[index]) / 1000.0
        };
        (at(0.5), at(0.99))
    }
}

/// Which messages the consumers have acked, shared by all of them.
pub struct Tally {
    /// One bit per message id, so duplicates are told from first deliveries in O(1) memory per
    /// message.
    seen: Vec<AtomicU64>,
    target: u64,
    distinct: AtomicU64,
    duplicates: AtomicU64,
    flagged_redelivered: AtomicU64,
    done_at: OnceLock<Instant>,
}

impl Tally {
    fn new(target: u64) -> Self {
        Tally {
            seen: (0..target.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            target,
            distinct: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            flagged_redelivered: AtomicU64::new(0),
            done_at: OnceLock::new(),
        }
    }

    /// Records one acked delivery of message `id`; `redelivered` is the broker's own flag.
    pub fn record(&self, id: u64, redelivered: bool) -> Result<()> {
        ensure!(
            id < self.target,
            "consumed message id {id}, but this run published only {} (a foreign message?)",
            self.target
        );
        if redelivered {
            self.flagged_redelivered.fetch_add(1, Ordering::Relaxed);
        }
        let bit = 1u64 << (id % 64);
        if self.seen[(id / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        } else if self.distinct.fetch_add(1, Ordering::AcqRel) + 1 == self.target {
            let _ = self.done_at.set(Instant::now());
        }
        Ok(())
    }

    /// Every message has been consumed and acked at least once.
    pub fn complete(&self) -> bool {
        self.done_at.get().is_some()
    }

    fn distinct(&self) -> u64 {
        self.distinct.load(Ordering::Acquire)
    }
}

/// Publishes `ids` with at most `inflight` unconfirmed messages, returning each message's
/// latency from the publish call to its confirmation.
///
/// `publish(id)` sends message `id` and resolves to a future of its durable confirmation. Each
/// confirmation is awaited in its own task so its latency is taken when it resolves, not when
/// this loop gets round to it; the JoinSet holds at most `inflight` of them.
pub async fn pipeline<F, Sent, Confirmed>(
    ids: Range<u64>,
    inflight: usize,
    mut publish: F,
) -> Result<Latencies>
where
    F: FnMut(u64) -> Sent,
    Sent: Future<Output = Result<Confirmed>>,
    Confirmed: Future<Output = Result<()>> + Send + 'static,
{
    let mut latencies = Latencies::with_capacity((ids.end - ids.start) as usize);
    let mut pending: JoinSet<Result<Duration>> = JoinSet::new();
    for id in ids {
        while pending.len() >= inflight {
            latencies.record(next_confirmation(&mut pending).await?);
        }
        let start = Instant::now();
        let confirmed = publish(id)
            .await
            .with_context(|| format!("publishing message {id}"))?;
        pending.spawn(async move {
            confirmed
                .await
                .with_context(|| format!("confirmation of message {id}"))?;
            Ok(start.elapsed())
        });
    }
    while !pending.is_empty() {
        latencies.record(next_confirmation(&mut pending).await?);
    }
    Ok(latencies)
}

async fn next_confirmation(pending: &mut JoinSet<Result<Duration>>) -> Result<Duration> {
    pending
        .join_next()
        .await
        .context("no confirmation pending")?
        .context("confirmation task")?
}

/// Runs one measurement: starts the consumers, then the producers (the clock starts here),
/// and waits until every message has been acked, a task fails, or progress stalls.
///
/// `producers` and `consumers` are already-connected per-task states, so connecting is not
/// timed. `produce(state, ids)` publishes `ids` (usually through [`pipeline`]);
/// `consume(state, tally, stop)` acks deliveries into `tally` until `stop` turns true, which
/// happens once the tally is complete (or the run failed).
pub async fn drive<P, C, Produce, Produced, Consume, Consumed>(
    system: &str,
    w: &Workload,
    producers: Vec<P>,
    produce: Produce,
    consumers: Vec<C>,
    consume: Consume,
) -> Result<Report>
where
    Produce: Fn(P, Range<u64>) -> Produced,
    Produced: Future<Output = Result<Latencies>> + Send + 'static,
    Consume: Fn(C, Arc<Tally>, watch::Receiver<bool>) -> Consumed,
    Consumed: Future<Output = Result<()>> + Send + 'static,
{
    let tally = Arc::new(Tally::new(w.messages));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut consuming = JoinSet::new();
    for c in consumers {
        consuming.spawn(consume(c, tally.clone(), stop_rx.clone()));
    }
    let start = Instant::now();
    let mut producing = JoinSet::new();
    for (index, p) in producers.into_iter().enumerate() {
        producing.spawn(produce(p, w.ids(index)));
    }

    let outcome = wait(&tally, &mut producing, &mut consuming).await;
    // Stop the consumers whatever happened, so a failed run does not leave tasks acking.
    let _ = stop_tx.send(true);
    producing.abort_all();
    let stopped = tokio::time::timeout(Duration::from_secs(CONSUMER_STOP_TIMEOUT_S), async {
        while let Some(joined) = consuming.join_next().await {
            joined.context("consumer task")??;
        }
        Ok::<_, anyhow::Error>(())
    })
    .await;
    let latencies = outcome?;
    match stopped {
        Ok(result) => result.context("a consumer failed while stopping")?,
        Err(_) => {
            consuming.abort_all();
            eprintln!(
                "{system}: warning: consumers did not stop within {CONSUMER_STOP_TIMEOUT_S} s"
            );
        }
    }

    let done_at = *tally.done_at.get().context("run ended before completion")?;
    let seconds = done_at.duration_since(start).as_secs_f64();
    let duplicates = tally.duplicates.load(Ordering::Relaxed);
    let redelivered = tally.flagged_redelivered.load(Ordering::Relaxed);
    // Keel's assured messages are exactly once: a duplicate that was not a flagged redelivery
    // (none happen in this run: nothing fails) is a bug, not a figure.
    ensure!(
        !system.starts_with("keel") || duplicates == 0,
        "{system} delivered {duplicates} messages twice ({redelivered} flagged redelivered): \
         assured messages must arrive exactly once"
    );
    if duplicates > 0 || redelivered > 0 {
        eprintln!(
            "{system}: warning: {duplicates} duplicate deliveries, {redelivered} flagged redelivered"
        );
    }
    let (p50_ms, p99_ms) = latencies.p50_p99_ms();
    Ok(Report {
        system: system.to_string(),
        round: None,
        msgs_per_s: w.messages as f64 / seconds,
        p50_ms,
        p99_ms,
        messages: w.messages,
        seconds,
        duplicates,
        redelivered,
    })
}

/// Waits for the producers' latencies and for the tally to complete, failing on the first task
/// error or when consumers make no progress for [`STALL_TIMEOUT_S`].
async fn wait(
    tally: &Tally,
    producing: &mut JoinSet<Result<Latencies>>,
    consuming: &mut JoinSet<Result<()>>,
) -> Result<Latencies> {
    let mut latencies = Latencies::with_capacity(tally.target as usize);
    let mut consumers_left = consuming.len();
    let mut poll = tokio::time::interval(Duration::from_millis(PROGRESS_POLL_MS));
    let (mut last_distinct, mut last_progress) = (0, Instant::now());
    loop {
        tokio::select! {
            Some(joined) = producing.join_next() => {
                latencies.merge(joined.context("producer task")?.context("a producer failed")?);
            }
            Some(joined) = consuming.join_next(), if !tally.complete() => {
                joined.context("consumer task")?.context("a consumer failed")?;
                consumers_left -= 1;
                if consumers_left == 0 && !tally.complete() {
                    bail!("every consumer ended with {} of {} messages", tally.distinct(), tally.target);
                }
            }
            _ = poll.tick() => {
                let distinct = tally.distinct();
                if distinct != last_distinct {
                    (last_distinct, last_progress) = (distinct, Instant::now());
                } else if last_progress.elapsed() > Duration::from_secs(STALL_TIMEOUT_S) {
                    bail!(
                        "consumers received {distinct} of {} messages, then nothing for {STALL_TIMEOUT_S} s",
                        tally.target
                    );
                }
                if producing.is_empty() && tally.complete() {
                    return Ok(latencies);
                }
            }
        }
    }
}

/// Milliseconds since the Unix epoch, to name this run's queue or stream.
pub fn unique_suffix() -> Result<u128> {
    Ok(SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("system clock before 1970")?
        .as_millis())
}

/// Runs every system in turn and prints a table or (`--json`) a JSON array of [`Report`]s.
/// A system that fails is reported on stderr and the others still run; the exit is then an
/// error.
pub fn run(o: Opts) -> Result<()> {
    o.workload.validate()?;
    anyhow::ensure!(
        (1..=ROUNDS_MAX).contains(&o.rounds),
        "--rounds must be 1 to {ROUNDS_MAX} (got {}): each round runs every system once",
        o.rounds
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let (reports, failed) = rt.block_on(async {
        let mut reports = Vec::new();
        let mut failed = Vec::new();
        for round in 0..o.rounds {
            let mut order: Vec<&str> = o.systems.iter().map(String::as_str).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for system in order {
                match run_system(&o, system).await {
                    Ok(mut report) => {
                        report.round = (o.rounds > 1).then_some(round + 1);
                        reports.push(report);
                    }
                    Err(e) => {
                        eprintln!("{system}: error: {e:#}");
                        failed.push(system.to_string());
                    }
                }
            }
        }
        (reports, failed)
    });
    if o.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&reports).context("reports to JSON")?
        );
    } else {
        println!(
            "{:<12} {:>12} {:>10} {:>10} {:>10} {:>9}",
            "system", "msgs/s", "p50 ms", "p99 ms", "messages", "seconds"
        );
        for r in &reports {
            println!(
                "{:<12} {:>12.0} {:>10.2} {:>10.2} {:>10} {:>9.2}",
                r.system, r.msgs_per_s, r.p50_ms, r.p99_ms, r.messages, r.seconds
            );
        }
        if o.rounds > 1 {
            let runs: Vec<crate::rounds::Run> = reports
                .iter()
                .filter_map(|r| {
                    r.round.map(|round| crate::rounds::Run {
                        system: &r.system,
                        round,
                        msgs_per_s: r.msgs_per_s,
                    })
                })
                .collect();
            print!("{}", crate::rounds::summary(&o.systems, &runs));
        }
    }
    if !failed.is_empty() {
        return Err(anyhow!("failed: {}", failed.join(", ")));
    }
    Ok(())
}

/// Most rounds one benchmark run takes (each round runs every system once).
pub const ROUNDS_MAX: u32 = 100;

async fn run_system(o: &Opts, system: &str) -> Result<Report> {
    let w = &o.workload;
    match system {
        "keel" => {
            let bin = o.keel.clone().map_or_else(keel::default_keel_binary, Ok)?;
            run_keel(&bin, o.keel_base_port, w)
                .await
                .with_context(|| format!("Keel ({})", bin.display()))
        }
        "keel-bus" => {
            let bin = o.keel.clone().map_or_else(keel::default_keel_binary, Ok)?;
            run_keel_bus(&bin, o.keel_base_port, w)
                .await
                .with_context(|| format!("Keel, two engines ({})", bin.display()))
        }
        "keel-tls" => {
            let bin = o.keel.clone().map_or_else(keel::default_keel_binary, Ok)?;
            run_keel_tls(&bin, o.keel_base_port, w)
                .await
                .with_context(|| format!("Keel over TLS ({})", bin.display()))
        }
        "rabbitmq" => run_rabbitmq(&o.rabbitmq_url, None, w)
            .await
            .with_context(|| format!("RabbitMQ at {}", o.rabbitmq_url)),
        "rabbitmq-tls" => {
            let (Some(url), Some(ca)) = (&o.rabbitmq_tls_url, &o.rabbitmq_ca) else {
                return Err(anyhow!(
                    "rabbitmq-tls needs --rabbitmq-tls amqps://... and --rabbitmq-ca FILE (scripts/rabbitmq-tls-node start DIR prints both)"
                ));
            };
            let pem = std::fs::read_to_string(ca)
                .with_context(|| format!("reading the RabbitMQ CA {}", ca.display()))?;
            run_rabbitmq(url, Some(pem), w)
                .await
                .with_context(|| format!("RabbitMQ over TLS at {url}"))
        }
        "nats" => run_nats(&o.nats_url, w)
            .await
            .with_context(|| format!("NATS at {}", o.nats_url)),
        other => Err(anyhow!(
            "unknown system {other} (keel, keel-bus, keel-tls, rabbitmq, rabbitmq-tls, nats)"
        )),
    }
}
