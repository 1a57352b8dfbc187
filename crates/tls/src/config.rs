//! rustls configurations built from the profile's files: a listener's (`server_config`: the
//! process's certificate and key) and a client's that trusts the cell's CA (`client_config`).
//! ring is the crypto provider throughout (one provider per process, never the global
//! default, so nothing depends on which crate installed one first).

use std::path::{Path, PathBuf};
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

    /// A listener's configuration for process `name` that also asks clients for a
    /// certificate: one that is presented must chain to the cell's CA (else the handshake
    /// fails); a client without one is served as before (AMQP clients, browsers), and what
    /// needs a process's identity (engine links) checks that there was one
    /// ([`peer_process`]).
    pub fn mutual_server_config(&self, name: &str) -> Result<Arc<rustls::ServerConfig>> {
        let (chain, key, cert_path) = self.process_pair(name)?;
        let (roots, ca_path) = self.cell_roots()?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| bad(&ca_path, format!("cannot verify clients with it ({e})")))?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&cert_path, e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| bad(&cert_path, format!("does not go with its key ({e})")))?;
        Ok(Arc::new(config))
    }

    /// A client's configuration for process `name`: trusts the cell's CA and presents the
    /// process's certificate (mutual TLS between Keel processes).
    pub fn mutual_client_config(&self, name: &str) -> Result<Arc<rustls::ClientConfig>> {
        let (chain, key, cert_path) = self.process_pair(name)?;
        let (roots, ca_path) = self.cell_roots()?;
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&ca_path, e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| bad(&cert_path, format!("does not go with its key ({e})")))?;
        Ok(Arc::new(config))
    }

    /// Process `name`'s certificate chain and key, with the certificate's path (for errors).
    fn process_pair(
        &self,
        name: &str,
    ) -> Result<(
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
        PathBuf,
    )> {
        let (cert_path, key_path) = (self.cert_path(name), self.key_path(name));
        let (chain, key) = chain_and_key(
            &self.read_pem(&cert_path)?,
            &self.read_pem(&key_path)?,
            &cert_path,
        )?;
        Ok((chain, key, cert_path))
    }

    /// The cell's CA as rustls roots, with its path (for errors).
    fn cell_roots(&self) -> Result<(rustls::RootCertStore, PathBuf)> {
        let ca_path = self.ca_cert_path();
        let roots = roots_from_pem(
            &read_pem_file(&ca_path, "give the path of the CA's PEM certificate")?,
            &ca_path,
        )?;
        Ok((roots, ca_path))
    }
}

/// The Keel process (`node`, `process`) a peer's certificate chain names, from its leaf's
/// common name (`node/process`, as `keel cert` issues them); None without a certificate or
/// with one that names no process. Only meaningful on a connection whose handshake verified
/// the chain against the cell's CA.
pub fn peer_process(chain: Option<&[CertificateDer<'_>]>) -> Option<(String, String)> {
    let leaf = chain?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    let (node, process) = cn.split_once('/')?;
    Some((node.to_string(), process.to_string()))
}

fn chain_and_key(
    cert_pem: &str,
    key_pem: &str,
    cert_path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(cert_path, format!("holds a damaged PEM certificate ({e})")))?;
    if chain.is_empty() {
        return Err(bad(cert_path, "holds no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| bad(cert_path, format!("comes with no usable private key ({e})")))?;
    Ok((chain, key))
}

fn roots_from_pem(ca_pem: &str, ca_path: &Path) -> Result<rustls::RootCertStore> {
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
    Ok(roots)
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
    handshake_seen(server, client, name).map(|_| ())
}

/// [`handshake`], answering the certificate chain the server was shown by the client.
pub(crate) fn handshake_seen(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    name: &str,
) -> std::result::Result<Option<Vec<CertificateDer<'static>>>, rustls::Error> {
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
            return Ok(s.peer_certificates().map(|c| c.to_vec()));
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
    let (chain, key) = chain_and_key(cert_pem, key_pem, cert_path)?;
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
    let roots = roots_from_pem(ca_pem, ca_path)?;
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
    fn mutual_tls_names_the_client_process_and_refuses_another_cas_client() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::at(dir.path().join("a"));
        let s2 = Identity {
            process: "server2".into(),
            ..id()
        };
        pki.ensure("a", &[id(), s2], now_s()).unwrap();
        let server = pki.mutual_server_config("node01.server1").unwrap();
        let seen = handshake_seen(
            server.clone(),
            pki.mutual_client_config("node01.server2").unwrap(),
            "127.0.0.1",
        )
        .unwrap();
        assert_eq!(
            peer_process(seen.as_deref()),
            Some(("node01".to_string(), "server2".to_string()))
        );
        // A client without a certificate is served, and names no process.
        let seen =
            handshake_seen(server.clone(), pki.client_config().unwrap(), "127.0.0.1").unwrap();
        assert_eq!(peer_process(seen.as_deref()), None);
        // A client certificate of another cell's CA fails the handshake.
        let other = Pki::at(dir.path().join("b"));
        other.ensure("a", &[id()], now_s()).unwrap();
        // The client trusts our CA for the server side, so only its own certificate can fail.
        let mixed = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(
                roots_from_pem(
                    &std::fs::read_to_string(pki.ca_cert_path()).unwrap(),
                    &pki.ca_cert_path(),
                )
                .unwrap(),
            )
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(other.cert_path("node01.server1"))
                    .unwrap()
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_file(other.key_path("node01.server1")).unwrap(),
            )
            .unwrap();
        let e = handshake_seen(server, Arc::new(mixed), "127.0.0.1").unwrap_err();
        assert!(e.to_string().contains("certificate"), "{e}");
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
    fn mutual_tls_refuses_expired_and_self_signed_client_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::at(dir.path());
        let s2 = Identity {
            process: "server2".into(),
            ..id()
        };
        pki.ensure("c", &[id(), s2.clone()], now_s()).unwrap();
        let server = pki.mutual_server_config("node01.server1").unwrap();
        // Issued two years ago: expired a year ago.
        pki.issue(&s2, now_s() - 2 * 365 * 86_400).unwrap();
        let e = handshake(
            server.clone(),
            pki.mutual_client_config("node01.server2").unwrap(),
            "127.0.0.1",
        )
        .unwrap_err();
        assert!(e.to_string().contains("xpired"), "{e}");
        // Self-signed: no chain to the cell's CA.
        let own = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(
                roots_from_pem(
                    &std::fs::read_to_string(pki.ca_cert_path()).unwrap(),
                    &pki.ca_cert_path(),
                )
                .unwrap(),
            )
            .with_client_auth_cert(
                vec![own.cert.der().clone()],
                PrivateKeyDer::try_from(own.signing_key.serialize_der()).unwrap(),
            )
            .unwrap();
        let e = handshake(server, Arc::new(client), "127.0.0.1").unwrap_err();
        assert!(e.to_string().contains("certificate"), "{e}");
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
