//! Plain TCP only on loopback (DESIGN §10, `keel_core::plaintext`), tried in a host of a
//! network-namespace lab (`keel_testkit::netlab`, address 198.18.0.1): a connection from that
//! address is one from a non-loopback peer, and nothing leaves the lab. The admin endpoint
//! listens on every address of the namespace: plain HTTP from 127.0.0.1 is served, plain HTTP
//! from 198.18.0.1 is closed without an answer, HTTPS from 198.18.0.1 is served.
//!
//! The test re-runs its own binary inside the namespace (`plaintext_child`), because a
//! process's threads share one network namespace only if they all enter it.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{credential, users};
use keel_admin::{AdminClient, AdminError, Registry, Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHILD_ENV: &str = "KEEL_PLAINTEXT_CHILD";
const HOST: &str = "198.18.0.1";

#[test]
fn plain_http_is_served_to_loopback_only_https_to_anyone() {
    // One host of a lab: its address is 198.18.0.1 (HOST), and nothing leaves the lab.
    let lab = keel_testkit::netlab::Lab::new(1).unwrap();
    assert_eq!(lab.addr(0), HOST);
    lab.run_child_test(
        0,
        "plaintext_child",
        CHILD_ENV,
        "plaintext child: all checks passed",
    );
}

/// What a plain HTTP request to `addr` gets: the status line, or "" when the connection is
/// closed without an answer.
async fn plain_request(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s
        .write_all(b"GET /v1/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn plaintext_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return; // Run by the test above, inside its namespace.
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let pki = keel_tls::Pki::at(dir.path());
        pki.ensure(
            "c",
            &[keel_tls::Identity {
                node: "node01".into(),
                process: "s1".into(),
                hosts: vec!["127.0.0.1".into(), HOST.into()],
            }],
            keel_core::unix_s(),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let settings = Settings {
            tls: Some(pki.server_config("node01.s1").unwrap()),
            ..Settings::default()
        };
        tokio::spawn(keel_admin::serve_with(
            listener,
            Registry::new(),
            users(),
            settings,
            std::future::pending(),
        ));
        let local: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let host: SocketAddr = format!("{HOST}:{port}").parse().unwrap();

        // Plain from loopback: served (401: no credential).
        let status = plain_request(local).await;
        assert!(status.contains("401"), "plain from loopback: {status:?}");
        // Plain from 198.18.0.1: closed unanswered.
        let status = plain_request(host).await;
        assert_eq!(status, "", "plain from {HOST} must get no answer");
        let plain = AdminClient::new(host, credential());
        assert!(
            matches!(plain.ping().await, Err(AdminError::Unreachable { .. })),
            "a plain client from {HOST}"
        );
        // HTTPS from 198.18.0.1: served.
        let https = AdminClient::new(host, credential()).with_tls(pki.client_config().unwrap());
        assert_eq!(https.ping().await.unwrap()["ok"], true);
        println!("plaintext child: all checks passed");
    });
}
