//! TLS handshakes per second on a Keel server's bus port (issue 21): `connections` concurrent
//! clients each open TCP, finish a TLS handshake with the server's certificate (the run's cell
//! CA trusted), exchange the AMQP SASL header with the server and close, for `seconds`; once with resumption disabled (every handshake full)
//! and once with rustls's default client session cache (resumed after the first). Each
//! resumed handshake is checked to be one (`handshake_kind`).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

use super::keel::KeelServer;

#[derive(Debug, Serialize)]
pub struct HandshakeReport {
    pub connections: usize,
    pub seconds: u64,
    pub full_per_s: f64,
    pub resumed_per_s: f64,
    /// Of the resumed run's handshakes, how many were resumptions (the rest were full).
    pub resumed_share: f64,
}

/// (handshakes per second, share resumed).
async fn run_one(
    port: u16,
    config: Arc<rustls::ClientConfig>,
    connections: usize,
    seconds: u64,
) -> Result<(f64, f64)> {
    let total = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(seconds);
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (config, total, resumed) = (config.clone(), total.clone(), resumed.clone());
        tasks.spawn(async move {
            let connector = tokio_rustls::TlsConnector::from(config);
            while Instant::now() < end {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                tcp.set_nodelay(true)?;
                let name = rustls::pki_types::ServerName::try_from("localhost")?;
                let mut tls = connector.connect(name, tcp).await?;
                if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    resumed.fetch_add(1, Ordering::Relaxed);
                }
                // The AMQP SASL header and the server's answer: a connection's real start, and
                // what lets the client read the session tickets the server sends after the
                // handshake (TLS 1.3), without which nothing could resume.
                tls.write_all(b"AMQP\x03\x01\x00\x00").await?;
                let mut header = [0u8; 8];
                tls.read_exact(&mut header).await?;
                ensure!(
                    &header == b"AMQP\x03\x01\x00\x00",
                    "the server answered {header:?}"
                );
                total.fetch_add(1, Ordering::Relaxed);
                let _ = tls.shutdown().await;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.context("a handshake task")??;
    }
    let n = total.load(Ordering::Relaxed);
    ensure!(n > 0, "no handshake finished");
    let per_s = n as f64 / t0.elapsed().as_secs_f64();
    Ok((per_s, resumed.load(Ordering::Relaxed) as f64 / n as f64))
}

pub async fn run_handshakes(
    keel: &Path,
    base_port: u16,
    connections: usize,
    seconds: u64,
) -> Result<HandshakeReport> {
    // Within the bus port's unauthenticated bound per source (32).
    ensure!((1..=16).contains(&connections), "1 to 16 connections");
    let server = KeelServer::start(keel, base_port, "handshakes")?;
    let port: u16 = server
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("the bus port in the server's URL")?;
    let ca = server.profile_dir().join("secrets/tls/ca.pem");
    let resuming = keel_tls::client_config_from(&ca)?;
    let mut full = (*resuming).clone();
    full.resumption = rustls::client::Resumption::disabled();
    let (full_per_s, _) = run_one(port, Arc::new(full), connections, seconds).await?;
    let (resumed_per_s, resumed_share) = run_one(port, resuming, connections, seconds).await?;
    Ok(HandshakeReport {
        connections,
        seconds,
        full_per_s,
        resumed_per_s,
        resumed_share,
    })
}
