//! HTTPS on the admin port (issue 21, DESIGN §10): the same port serves HTTP and HTTPS, told
//! apart by the first byte; `AdminClient::with_tls` calls over HTTPS trusting the cell's CA and
//! checking that the certificate names the address; a client trusting another CA fails with a
//! reason; a stalled TLS handshake is closed at the head deadline like a stalled request head.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{credential, users};
use keel_admin::{AdminClient, AdminError, Limits, Registry, Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn pki(dir: &std::path::Path, cell: &str) -> keel_tls::Pki {
    let pki = keel_tls::Pki::at(dir);
    pki.ensure(
        cell,
        &[keel_tls::Identity {
            node: "node01".into(),
            process: "s1".into(),
            hosts: vec!["localhost".into(), "127.0.0.1".into()],
        }],
        now_s(),
    )
    .unwrap();
    pki
}

async fn start(
    tls: Arc<keel_tls::rustls::ServerConfig>,
    limits: Limits,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let settings = Settings {
        limits,
        tls: Some(tls),
        ..Settings::default()
    };
    tokio::spawn(keel_admin::serve_with(
        listener,
        Registry::new(),
        users(),
        settings,
        async move {
            let _ = rx.await;
        },
    ));
    (addr, tx)
}

#[tokio::test]
async fn https_and_http_on_one_port_and_only_the_cell_ca_is_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let ours = pki(&dir.path().join("a"), "a");
    let theirs = pki(&dir.path().join("b"), "b");
    let (addr, _stop) = start(ours.server_config("node01.s1").unwrap(), Limits::default()).await;

    let https = AdminClient::new(addr, credential()).with_tls(ours.client_config().unwrap());
    assert!(https.is_tls());
    let pong = https.ping().await.unwrap();
    assert_eq!(pong["ok"], true, "{pong}");
    // Plain HTTP on the same port (loopback) still answers.
    let plain = AdminClient::new(addr, credential());
    assert_eq!(plain.ping().await.unwrap()["ok"], true);

    let wrong = AdminClient::new(addr, credential()).with_tls(theirs.client_config().unwrap());
    match wrong.ping().await {
        Err(AdminError::Unreachable { why, .. }) => {
            assert!(why.contains("TLS handshake failed"), "{why}")
        }
        other => panic!("a client trusting another CA got {other:?}"),
    }
}

#[tokio::test]
async fn a_stalled_tls_handshake_is_closed_at_the_head_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let ours = pki(dir.path(), "a");
    let limits = Limits {
        header_read_ms: 500,
        ..Limits::default()
    };
    let (addr, _stop) = start(ours.server_config("node01.s1").unwrap(), limits).await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Half a ClientHello, then nothing.
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await.unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed before 5 s")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t0.elapsed()
    );
}
