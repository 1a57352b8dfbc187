//! Keel over AMQP 1.0 (fe2o3-amqp as the client): a queue of assured persistent messages on a
//! server this run starts itself, in a temporary profile on the same disk as the peers' data.
//! A message counts once the server accepted it, which it does only after the store commit is
//! durable (fsync; DESIGN §4). One connection per producer and per consumer, as for the peers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::{Batch, Body, Data, Header, Message, Outcome};
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use tokio::sync::{watch, Mutex};

use super::{drive, message_id, pipeline, unique_suffix, Report, Tally, Workload};

/// Credit each consumer gives: the unsettled window, as RabbitMQ's prefetch.
const CREDIT: u32 = 256;

/// A Keel node agent and server in a temporary profile, stopped on drop.
pub struct KeelServer {
    keel: PathBuf,
    profile: tempfile::TempDir,
    pub url: String,
    /// The second server's AMQP URL, when the profile has two (`start_two`).
    pub url2: Option<String>,
}

impl KeelServer {
    /// Creates a profile with `queue` on bus1 and starts its server through the node agent.
    pub fn start(keel: &Path, base_port: u16, queue: &str) -> Result<KeelServer> {
        KeelServer::start_with(keel, base_port, queue, false)
    }

    /// Two servers on bus1, `queue` on server2's engine: producers on server1 reach it over
    /// the delivery stream between the two engines.
    pub fn start_two(keel: &Path, base_port: u16, queue: &str) -> Result<KeelServer> {
        KeelServer::start_with(keel, base_port, queue, true)
    }

    fn start_with(keel: &Path, base_port: u16, queue: &str, two: bool) -> Result<KeelServer> {
        let profile = tempfile::Builder::new()
            .prefix("keel-bench-")
            .tempdir()
            .context("temporary profile directory")?;
        let dir = profile.path().join("p");
        let mut server = KeelServer {
            keel: keel.to_path_buf(),
            profile,
            url: String::new(),
            url2: None,
        };
        server.keel(&[
            "profile",
            "create",
            dir.to_str().context("profile path")?,
            "--base-port",
            &base_port.to_string(),
        ])?;
        if two {
            server.keel(&["server", "create", "server2"])?;
            server.keel(&["bus", "add-member", "bus1", "--server", "server2"])?;
            server.keel(&[
                "destination",
                "create",
                "bus1",
                queue,
                "--type",
                "queue",
                "--me",
                "node01.server2-bus1",
            ])?;
        } else {
            server.keel(&["destination", "create", "bus1", queue, "--type", "queue"])?;
        }
        server.keel(&["node", "start"])?;
        let password = std::fs::read_to_string(dir.join("secrets/admin-password"))
            .context("reading the profile's admin password")?;
        let url_of = |s: &KeelServer, name: &str| -> Result<String> {
            s.keel(&["server", "start", name])?;
            let status: serde_json::Value =
                serde_json::from_str(&s.keel(&["server", "status", name, "--json"])?)
                    .context("server status JSON")?;
            let bus = status["endpoints"]["bus"]
                .as_str()
                .context("server status has no bus endpoint")?;
            Ok(format!("amqp://admin:{}@{bus}", password.trim()))
        };
        server.url = url_of(&server, "server1")?;
        if two {
            server.url2 = Some(url_of(&server, "server2")?);
        }
        Ok(server)
    }

    /// The profile this run made (its certificates are under `secrets/tls/`).
    pub fn profile_dir(&self) -> PathBuf {
        self.profile.path().join("p")
    }

    fn keel(&self, args: &[&str]) -> Result<String> {
        let dir = self.profile.path().join("p");
        let out = Command::new(&self.keel)
            .arg("--profile")
            .arg(&dir)
            .args(args)
            .output()
            .with_context(|| format!("running {}", self.keel.display()))?;
        ensure!(
            out.status.success(),
            "`keel {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for KeelServer {
    fn drop(&mut self) {
        if let Err(e) = self.keel(&["node", "stop", "--stop-servers"]) {
            eprintln!("keel: warning: stopping the benchmark's node agent: {e:#}");
        }
    }
}

/// The `keel` binary next to this benchmark's (both built into the same target directory).
pub fn default_keel_binary() -> Result<PathBuf> {
    let me = std::env::current_exe().context("locating keel-bench")?;
    Ok(me.with_file_name("keel"))
}

pub async fn run_keel(keel: &Path, base_port: u16, w: &Workload) -> Result<Report> {
    let queue = format!("bench{}", unique_suffix()?);
    let server = KeelServer::start(keel, base_port, &queue)?;
    measure("keel", &server.url, &server.url, &queue, w, None).await
}

/// The same workload as `run_keel`, every connection AMQP over TLS on the same bus port
/// (`amqps://localhost`, the server's certificate, the run's cell CA trusted).
pub async fn run_keel_tls(keel: &Path, base_port: u16, w: &Workload) -> Result<Report> {
    let queue = format!("bench{}", unique_suffix()?);
    let server = KeelServer::start(keel, base_port, &queue)?;
    let ca = server.profile_dir().join("secrets/tls/ca.pem");
    let config = keel_tls::client_config_from(&ca).context("the cell CA")?;
    let tls = tokio_rustls::TlsConnector::from(config);
    let url =
        server
            .url
            .replacen("amqp://", "amqps://", 1)
            .replacen("@127.0.0.1:", "@localhost:", 1);
    measure("keel-tls", &url, &url, &queue, w, Some(tls)).await
}

/// The same workload across two engines: producers on server1, the queue and its consumers
/// on server2; every message crosses the delivery stream.
pub async fn run_keel_bus(keel: &Path, base_port: u16, w: &Workload) -> Result<Report> {
    let queue = format!("bench{}", unique_suffix()?);
    let server = KeelServer::start_two(keel, base_port, &queue)?;
    let consumers = server.url2.clone().context("two servers")?;
    measure("keel-bus", &server.url, &consumers, &queue, w, None).await
}

struct Client {
    connection: ConnectionHandle<()>,
    session: SessionHandle<()>,
}

async fn connect(
    url: &str,
    name: &str,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<Client> {
    let mut connection = match tls {
        // `amqps://`: fe2o3 asks for TLS with the AMQP TLS header (protocol id 2), which the
        // bus port answers before the handshake.
        Some(tls) => Connection::builder()
            .container_id(name)
            .tls_connector(tls.clone())
            .open(url)
            .await
            .with_context(|| format!("connecting {name} over TLS"))?,
        None => Connection::open(name, url)
            .await
            .with_context(|| format!("connecting {name}"))?,
    };
    let session = Session::begin(&mut connection)
        .await
        .context("beginning a session")?;
    Ok(Client {
        connection,
        session,
    })
}

async fn close(mut c: Client) -> Result<()> {
    c.session.end().await.context("ending a session")?;
    c.connection.close().await.context("closing a connection")
}

fn message(body: Vec<u8>) -> Message<Body<Value>> {
    Message::builder()
        .header(Header {
            durable: true,
            ..Header::default()
        })
        .body(Body::Data(Batch::new(vec![Data(body.into())])))
        .build()
}

/// Sends `ids` through `sender` with the workload's window; each counts once accepted.
async fn produce(
    sender: &Arc<Mutex<Sender>>,
    ids: std::ops::Range<u64>,
    w: &Workload,
) -> Result<super::Latencies> {
    pipeline(ids, w.inflight_per_producer, |id| {
        let (sender, body) = (sender.clone(), w.body(id));
        async move {
            let fut = sender
                .lock()
                .await
                .send_batchable(message(body))
                .await
                .context("sending")?;
            Ok::<_, anyhow::Error>(async move {
                match fut.await.context("waiting for the outcome")? {
                    Outcome::Accepted(_) => Ok(()),
                    other => bail!("the server did not accept the message: {other:?}"),
                }
            })
        }
    })
    .await
}

async fn measure(
    system: &'static str,
    url: &str,
    consumer_url: &str,
    queue: &str,
    w: &Workload,
    tls: Option<tokio_rustls::TlsConnector>,
) -> Result<Report> {
    let mut producers = Vec::with_capacity(w.producers);
    for index in 0..w.producers {
        let mut c = connect(url, &format!("producer-{index}"), tls.as_ref()).await?;
        let sender = Sender::attach(&mut c.session, format!("p{index}"), queue)
            .await
            .context("attaching a sender")?;
        producers.push((c, Arc::new(Mutex::new(sender))));
    }
    let mut consumers = Vec::with_capacity(w.consumers);
    for index in 0..w.consumers {
        let mut c = connect(consumer_url, &format!("consumer-{index}"), tls.as_ref()).await?;
        let receiver = Receiver::builder()
            .name(format!("c{index}"))
            .source(queue)
            .credit_mode(CreditMode::Auto(CREDIT))
            .attach(&mut c.session)
            .await
            .context("attaching a receiver")?;
        consumers.push((c, receiver));
    }

    let producer_w = w.clone();
    let producer_task = move |(client, sender): (Client, Arc<Mutex<Sender>>), ids| {
        let w = producer_w.clone();
        async move {
            let latencies = produce(&sender, ids, &w).await?;
            let sender = Arc::try_unwrap(sender)
                .map_err(|_| anyhow::anyhow!("sender still shared"))?
                .into_inner();
            sender.close().await.context("closing a sender")?;
            close(client).await?;
            Ok(latencies)
        }
    };

    let consumer_task = move |(client, mut receiver): (Client, Receiver),
                              tally: Arc<Tally>,
                              mut stop: watch::Receiver<bool>| async move {
        loop {
            let delivery = tokio::select! {
                _ = stop.changed() => break,
                d = receiver.recv::<Body<Value>>() => d.context("receiving")?,
            };
            let id = match delivery.body() {
                Body::Data(batch) => {
                    message_id(batch.first().context("empty data body")?.0.as_ref())?
                }
                other => bail!("unexpected body {other:?}"),
            };
            let redelivered = delivery
                .message()
                .header
                .as_ref()
                .is_some_and(|h| h.delivery_count > 0);
            receiver
                .accept(&delivery)
                .await
                .with_context(|| format!("accepting message {id}"))?;
            tally.record(id, redelivered)?;
        }
        receiver.close().await.context("closing a receiver")?;
        close(client).await
    };

    drive(
        system,
        w,
        producers,
        producer_task,
        consumers,
        consumer_task,
    )
    .await
}

/// What `keel-bench scale` measured.
#[derive(Debug, serde::Serialize)]
pub struct ScaleReport {
    pub messages: u64,
    pub body_bytes: usize,
    pub fill_msgs_per_s: f64,
    /// Peak resident memory of the server process while filling (VmHWM).
    pub server_peak_rss_mib: f64,
    /// Resident memory of the server process with the full store open, after the restart.
    pub restarted_rss_mib: f64,
    /// `keel server start` until it returned (the server logged WSVR0001I).
    pub restart_to_open_ms: f64,
    /// From the start command to the first message received over AMQP.
    pub restart_to_first_message_ms: f64,
    pub store_mib: f64,
}

fn status_kib(pid: u64, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{field} of process {pid}"))
}

/// Puts `w.messages` on `queue` through the server at `url` with `w.producers` producers;
/// returns the seconds it took.
async fn fill(url: &str, queue: &str, w: &Workload) -> Result<f64> {
    let mut producers = Vec::with_capacity(w.producers);
    for index in 0..w.producers {
        let mut c = connect(url, &format!("producer-{index}"), None).await?;
        let sender = Sender::attach(&mut c.session, format!("p{index}"), queue)
            .await
            .context("attaching a sender")?;
        producers.push((c, sender));
    }
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (index, (client, sender)) in producers.into_iter().enumerate() {
        let ids = w.ids(index);
        let w = w.clone();
        tasks.spawn(async move {
            let sender = Arc::new(Mutex::new(sender));
            produce(&sender, ids, &w).await?;
            close(client).await
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.context("producer task")??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Fills one queue with `w.messages` assured persistent messages over AMQP (the server's
/// memory stays bounded: messages page to disk), restarts the server and times how soon it is
/// open and hands out the first message.
pub async fn run_scale(keel: &Path, base_port: u16, w: &Workload) -> Result<ScaleReport> {
    let queue = format!("scale{}", unique_suffix()?);
    let server = KeelServer::start(keel, base_port, &queue)?;
    let pid = server_pid(&server)?;
    let fill_s = fill(&server.url, &queue, w).await?;
    let peak_kib = status_kib(pid, "VmHWM:")?;

    server.keel(&["server", "stop", "server1"])?;
    let restart = std::time::Instant::now();
    server.keel(&["server", "start", "server1"])?;
    let open_ms = restart.elapsed().as_secs_f64() * 1000.0;
    let mut c = connect(&server.url, "consumer", None).await?;
    let mut receiver = Receiver::attach(&mut c.session, "first", queue.as_str())
        .await
        .context("attaching a receiver")?;
    let first = receiver.recv::<Body<Value>>().await.context("receiving")?;
    let first_ms = restart.elapsed().as_secs_f64() * 1000.0;
    receiver.accept(&first).await.context("accepting")?;
    receiver.close().await.context("closing a receiver")?;
    close(c).await?;
    let pid = server_pid(&server)?;
    let restarted_kib = status_kib(pid, "VmRSS:")?;
    let store = server
        .profile
        .path()
        .join("p/databases/node01.server1-bus1.sqlite");
    let store_bytes =
        keel_store::disk_bytes(&store).with_context(|| format!("{}", store.display()))?;
    Ok(ScaleReport {
        messages: w.messages,
        body_bytes: w.body_bytes,
        fill_msgs_per_s: w.messages as f64 / fill_s,
        server_peak_rss_mib: peak_kib as f64 / 1024.0,
        restarted_rss_mib: restarted_kib as f64 / 1024.0,
        restart_to_open_ms: open_ms,
        restart_to_first_message_ms: first_ms,
        store_mib: store_bytes as f64 / (1024.0 * 1024.0),
    })
}

fn server_pid(server: &KeelServer) -> Result<u64> {
    let status: serde_json::Value =
        serde_json::from_str(&server.keel(&["server", "status", "server1", "--json"])?)
            .context("server status JSON")?;
    status["pid"].as_u64().context("server status has no pid")
}

/// What `keel-bench flush` measured.
#[derive(Debug, serde::Serialize)]
pub struct FlushReport {
    pub messages: u64,
    pub body_bytes: usize,
    /// Filling server1's transmission queue towards server2's engine (server2 down).
    pub fill_msgs_per_s: f64,
    /// From `keel me start ME1 --flush` until it returned (the FLUSH start's local part).
    pub flush_start_ms: f64,
    /// From the FLUSH start command to `CWSIP0783E` in server1's log (both peers confirmed).
    pub flush_to_cwsip0783e_ms: f64,
    /// From the FLUSH start command until the transmission queue was empty (every message
    /// stored by server2's engine and acknowledged).
    pub drain_s: f64,
    pub drain_msgs_per_s: f64,
}

/// An engine holding `w.messages` on its transmission queue is FLUSH-started: how long until
/// `CWSIP0783E`, and until every message reached the other engine (checked: exactly
/// `w.messages` stored there, none left behind).
pub async fn run_flush(keel: &Path, base_port: u16, w: &Workload) -> Result<FlushReport> {
    const ME1: &str = "node01.server1-bus1";
    const ME2: &str = "node01.server2-bus1";
    let queue = format!("flush{}", unique_suffix()?);
    let server = KeelServer::start_two(keel, base_port, &queue)?;
    server.keel(&["server", "stop", "server2"])?;
    let fill_s = fill(&server.url, &queue, w).await?;
    let stored = |me: &str| -> Result<u64> {
        let info: serde_json::Value =
            serde_json::from_str(&server.keel(&["store", "info", me, "--json"])?)
                .context("store info JSON")?;
        info["messages"]
            .as_u64()
            .context("store info has no messages")
    };
    ensure!(
        stored(ME1)? == w.messages,
        "the transmission queue should hold every message"
    );

    server.keel(&["me", "stop", ME1])?;
    server.keel(&["server", "start", "server2"])?;
    let log = server.profile.path().join("p/logs/server1/SystemOut.log");
    let flush = std::time::Instant::now();
    server.keel(&["me", "start", ME1, "--flush"])?;
    let flush_start_ms = flush.elapsed().as_secs_f64() * 1000.0;
    let deadline = std::time::Duration::from_secs(600);
    let confirmed_ms = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("CWSIP0783E") {
            break flush.elapsed().as_secs_f64() * 1000.0;
        }
        ensure!(
            flush.elapsed() < deadline,
            "no CWSIP0783E within {deadline:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    let drain_s = loop {
        if stored(ME1)? == 0 {
            break flush.elapsed().as_secs_f64();
        }
        ensure!(
            flush.elapsed() < deadline,
            "not drained within {deadline:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let arrived = stored(ME2)?;
    ensure!(
        arrived == w.messages,
        "{arrived} messages arrived at {ME2}, not {}",
        w.messages
    );
    Ok(FlushReport {
        messages: w.messages,
        body_bytes: w.body_bytes,
        fill_msgs_per_s: w.messages as f64 / fill_s,
        flush_start_ms,
        flush_to_cwsip0783e_ms: confirmed_ms,
        drain_s,
        drain_msgs_per_s: w.messages as f64 / drain_s,
    })
}
