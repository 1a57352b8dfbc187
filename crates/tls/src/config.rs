//! rustls configurations built from the profile's files: a listener's (`server_config`: the
//! process's certificate and key) and a client's that trusts the cell's CA (`client_config`).
//! ring is the crypto provider throughout (one provider per process, never the global
//! default, so nothing depends on which crate installed one first).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Result, TlsError};
use crate::pki::{read_pem_file, Pki};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn bad(path: &Path, problem: impl std::fmt::Display) -> TlsError {
    TlsError::Bad {
        path: path.to_path_buf(),
        problem: problem.to_string(),
        fix:
            "replace it with a PEM file of the right kind, or make a new one with `keel cert renew`"
                .into(),
    }
}

impl Pki {
    /// A listener's configuration for process `name` (`<node>.<process>`): its certificate
    /// and key; clients are not asked for a certificate.
    pub fn server_config(&self, name: &str) -> Result<Arc<rustls::ServerConfig>> {
        let (cert_path, key_path) = (self.cert_path(name), self.key_path(name));
        let key = self.read_pem(&key_path)?;
        server_config_from_pem(&self.read_pem(&cert_path)?, &key, &cert_path)
    }

    /// A client's configuration that trusts the cell's CA (and nothing else).
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        client_config_from(&self.ca_cert_path())
    }
}

/// A client's configuration that trusts the CA certificates in `ca_file` (PEM).
pub fn client_config_from(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>> {
    client_config_from_pem(
        &read_pem_file(ca_file, "give the path of the CA's PEM certificate")?,
        ca_file,
    )
}

/// A whole TLS handshake in memory between `server` and a client of `client` calling
/// `name`: the first error either side reports. It checks a certificate exactly as a peer
/// will (chain, validity, name, key) before an operator's file is installed.
pub(crate) fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    name: &str,
) -> std::result::Result<(), rustls::Error> {
    let name = rustls::pki_types::ServerName::try_from(name.to_string())
        .map_err(|e| rustls::Error::General(format!("{name} is no host name or address ({e})")))?;
    let mut c = rustls::ClientConnection::new(client, name)?;
    let mut s = rustls::ServerConnection::new(server)?;
    // A TLS 1.3 handshake takes two round trips; a few more rounds are slack.
    for _ in 0..16 {
        let mut buf = Vec::new();
        c.write_tls(&mut buf)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        if !buf.is_empty() {
            s.read_tls(&mut &buf[..])
                .map_err(|e| rustls::Error::General(e.to_string()))?;
            s.process_new_packets()?;
        }
        let mut buf = Vec::new();
        s.write_tls(&mut buf)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        if !buf.is_empty() {
            c.read_tls(&mut &buf[..])
                .map_err(|e| rustls::Error::General(e.to_string()))?;
            c.process_new_packets()?;
        }
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok(());
        }
    }
    Err(rustls::Error::General(
        "the handshake did not finish".into(),
    ))
}

/// A listener's configuration from PEM text (an operator's files, before they are installed).
pub(crate) fn server_config_from_pem(
    cert_pem: &str,
    key_pem: &str,
    cert_path: &Path,
) -> Result<Arc<rustls::ServerConfig>> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(cert_path, format!("holds a damaged PEM certificate ({e})")))?;
    if chain.is_empty() {
        return Err(bad(cert_path, "holds no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| bad(cert_path, format!("comes with no usable private key ({e})")))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(cert_path, e))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| bad(cert_path, format!("does not go with its key ({e})")))?;
    Ok(Arc::new(config))
}

/// A client's configuration trusting the CA certificates in `ca_pem`.
pub(crate) fn client_config_from_pem(
    ca_pem: &str,
    ca_path: &Path,
) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let c = c.map_err(|e| bad(ca_path, format!("holds a damaged PEM certificate ({e})")))?;
        roots.add(c).map_err(|e| {
            bad(
                ca_path,
                format!("holds a certificate that is no usable CA ({e})"),
            )
        })?;
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(ca_path, e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issue::Identity;

    fn now_s() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn id() -> Identity {
        Identity {
            node: "node01".into(),
            process: "server1".into(),
            hosts: vec!["localhost".into(), "127.0.0.1".into()],
        }
    }

    #[test]
    fn a_client_trusting_the_cell_ca_accepts_the_right_name_only() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::at(dir.path());
        pki.ensure("c", &[id()], now_s()).unwrap();
        let server = pki.server_config("node01.server1").unwrap();
        let client = pki.client_config().unwrap();
        handshake(server.clone(), client.clone(), "127.0.0.1").unwrap();
        handshake(server.clone(), client.clone(), "localhost").unwrap();
        let e = handshake(server, client, "keel.example").unwrap_err();
        assert!(
            e.to_string().contains("certificate not valid for name"),
            "{e}"
        );
    }

    #[test]
    fn another_ca_and_an_expired_certificate_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::at(dir.path().join("a"));
        pki.ensure("a", &[id()], now_s()).unwrap();
        let other = Pki::at(dir.path().join("b"));
        other.ensure("b", &[id()], now_s()).unwrap();
        let e = handshake(
            pki.server_config("node01.server1").unwrap(),
            other.client_config().unwrap(),
            "127.0.0.1",
        )
        .unwrap_err();
        assert!(e.to_string().contains("UnknownIssuer"), "{e}");
        // Issued two years ago: expired a year ago.
        pki.issue(&id(), now_s() - 2 * 365 * 86_400).unwrap();
        let e = handshake(
            pki.server_config("node01.server1").unwrap(),
            pki.client_config().unwrap(),
            "127.0.0.1",
        )
        .unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");
    }

    #[test]
    fn a_missing_or_mismatched_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::at(dir.path());
        pki.ensure("c", &[id()], now_s()).unwrap();
        std::fs::copy(pki.key_path("ca"), pki.key_path("node01.server1")).unwrap();
        let e = pki.server_config("node01.server1").unwrap_err().to_string();
        assert!(e.contains("does not go with its key"), "{e}");
        std::fs::remove_file(pki.key_path("node01.server1")).unwrap();
        let e = pki.server_config("node01.server1").unwrap_err().to_string();
        assert!(e.contains("node01.server1.key"), "{e}");
    }
}
