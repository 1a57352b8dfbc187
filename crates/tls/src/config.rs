//! rustls configurations built from the profile's files: a listener's (`server_config`: the
//! process's certificate and key) and a client's that trusts the cell's CA (`client_config`).
//! ring is the crypto provider throughout (one provider per process, never the global
//! default, so nothing depends on which crate installed one first).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Result, TlsError};
use crate::pki::Pki;

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

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(path, format!("cannot be read as PEM ({e})")))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(path, format!("holds a damaged PEM certificate ({e})")))?;
    if certs.is_empty() {
        return Err(bad(path, "holds no certificate"));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| bad(path, format!("holds no private key ({e})")))
}

impl Pki {
    /// A listener's configuration for process `name` (`<node>.<process>`): its certificate
    /// and key; clients are not asked for a certificate.
    pub fn server_config(&self, name: &str) -> Result<Arc<rustls::ServerConfig>> {
        let (cert_path, key_path) = (self.cert_path(name), self.key_path(name));
        let chain = certs(&cert_path)?;
        let key = key(&key_path)?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&cert_path, e))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| {
                bad(
                    &cert_path,
                    format!("does not go with its key {} ({e})", key_path.display()),
                )
            })?;
        Ok(Arc::new(config))
    }

    /// A client's configuration that trusts the cell's CA (and nothing else).
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        client_config_from(&self.ca_cert_path())
    }
}

/// A client's configuration that trusts the CA certificates in `ca_file` (PEM).
pub fn client_config_from(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_file)? {
        roots.add(c).map_err(|e| {
            bad(
                ca_file,
                format!("holds a certificate that is no usable CA ({e})"),
            )
        })?;
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(ca_file, e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issue::Identity;
    use rustls::pki_types::ServerName;

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

    /// A whole handshake in memory; the first error either side reports.
    fn handshake(
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
        name: &str,
    ) -> std::result::Result<(), rustls::Error> {
        let name = ServerName::try_from(name.to_string()).unwrap();
        let mut c = rustls::ClientConnection::new(client, name)?;
        let mut s = rustls::ServerConnection::new(server)?;
        for _ in 0..16 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            if !buf.is_empty() {
                s.read_tls(&mut &buf[..]).unwrap();
                s.process_new_packets()?;
            }
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            if !buf.is_empty() {
                c.read_tls(&mut &buf[..]).unwrap();
                c.process_new_packets()?;
            }
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        panic!("the handshake did not finish");
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
