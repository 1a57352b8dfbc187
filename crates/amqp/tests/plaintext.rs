//! The bus port's downgrade rules (DESIGN §10), tried from a non-loopback address in a host of a
//! network-namespace lab (`keel_testkit::netlab`, 198.18.0.1; nothing leaves the lab): plain
//! AMQP from 198.18.0.1 is closed before its protocol header is answered, so SASL PLAIN is never
//! even offered in clear; over TLS from the same address the SASL mechanisms include PLAIN;
//! plain AMQP from 127.0.0.1 is served. The test re-runs its own binary inside the namespace.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const CHILD_ENV: &str = "KEEL_AMQP_PLAINTEXT_CHILD";
const HOST: &str = "198.18.0.1";
const SASL_HEADER: &[u8; 8] = b"AMQP\x03\x01\x00\x00";

#[test]
fn plain_amqp_from_elsewhere_is_closed_and_plain_is_offered_only_over_tls() {
    // One host of a lab: its address is 198.18.0.1 (HOST), and nothing leaves the lab.
    let lab = keel_testkit::netlab::Lab::new(1).unwrap();
    assert_eq!(lab.addr(0), HOST);
    lab.run_child_test(
        0,
        "amqp_plaintext_child",
        CHILD_ENV,
        "amqp plaintext child: all checks passed",
    );
}

/// Sends the SASL protocol header and returns what the server sends within 5 s (its header
/// and the sasl-mechanisms frame), or nothing when it closes.
async fn sasl_opening<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> Vec<u8> {
    if s.write_all(SASL_HEADER).await.is_err() {
        return Vec::new();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while got.len() < 8 + 8 || !contains(&got, b"PLAIN") && !contains(&got, b"SCRAM") {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    got
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn amqp_plaintext_child() {
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
        let settings = Arc::new(keel_amqp::Settings {
            server: "s1".into(),
            users: Arc::new(keel_auth::Users::admin_only("s3cret-pw").unwrap()),
            hosted: Vec::new(),
            links: None,
            tls: Some(pki.mutual_server_config("node01.s1").unwrap()),
            tls_note: "test".into(),
        });
        tokio::spawn(keel_amqp::serve(listener, settings));

        // Plain from loopback: answered, PLAIN offered.
        let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let got = sasl_opening(s).await;
        assert!(
            got.starts_with(SASL_HEADER) && contains(&got, b"PLAIN"),
            "loopback: {got:?}"
        );
        // Plain from 198.18.0.1: closed before a byte of AMQP is answered.
        let s = tokio::net::TcpStream::connect((HOST, port)).await.unwrap();
        let got = sasl_opening(s).await;
        assert!(got.is_empty(), "plain from {HOST} was answered: {got:?}");
        // TLS from 198.18.0.1: answered, PLAIN and SCRAM-SHA-256 offered.
        let tcp = tokio::net::TcpStream::connect((HOST, port)).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(pki.client_config().unwrap());
        let name = keel_tls::rustls::pki_types::ServerName::try_from(HOST).unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let got = sasl_opening(tls).await;
        assert!(
            got.starts_with(SASL_HEADER)
                && contains(&got, b"PLAIN")
                && contains(&got, b"SCRAM-SHA-256"),
            "TLS from {HOST}: {got:?}"
        );
        println!("amqp plaintext child: all checks passed");
    });
}
