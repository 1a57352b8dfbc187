//! An operator's own certificates instead of Keel's (`keel cert use`): a process's certificate
//! and key, or the cell's CA (with its key Keel can still sign; without it, every process
//! certificate comes from the operator). Nothing is installed before a TLS handshake in memory
//! shows it works the way peers will use it: the chain to the cell's CA, the validity, the key
//! and a name the process answers on.

use std::path::Path;

use crate::config::{client_config_from_pem, handshake, server_config_from_pem};
use crate::error::{Result, TlsError};
use crate::info::CertInfo;
use crate::issue::{self, Identity};
use crate::pki::{Pki, CA};

fn refused(source: &Path, problem: String, fix: &str) -> TlsError {
    TlsError::Bad {
        path: source.to_path_buf(),
        problem,
        fix: fix.to_string(),
    }
}

impl Pki {
    /// Installs an operator's certificate (`cert_pem`, read from `source`) and key for process
    /// `id`, once a client trusting the cell's CA accepts it for one of `id.hosts`. Returns its
    /// facts and the names of `id.hosts` it does not hold (clients calling those refuse it).
    pub fn use_process(
        &self,
        id: &Identity,
        cert_pem: &str,
        key_pem: &str,
        source: &Path,
        now_s: i64,
    ) -> Result<(CertInfo, Vec<String>)> {
        let info = CertInfo::from_pem(cert_pem)
            .map_err(|p| refused(source, p, "give the PEM file of one certificate"))?;
        if info.is_ca {
            return Err(refused(
                source,
                "is a CA certificate, not a process's".into(),
                "give the CA with `keel cert use ca --tls-ca FILE`",
            ));
        }
        if !info.valid_at(now_s) {
            return Err(refused(
                source,
                format!("is not valid now ({} days left)", info.days_left(now_s)),
                "give a certificate valid today",
            ));
        }
        let Some(host) = id.hosts.iter().find(|h| info.names.contains(h)) else {
            return Err(refused(
                source,
                format!(
                    "names {} but {} answers on {}",
                    if info.names.is_empty() {
                        "no host".into()
                    } else {
                        info.names.join(", ")
                    },
                    id.name(),
                    id.hosts.join(", ")
                ),
                "give a certificate whose subject alternative names hold the node's host",
            ));
        };
        let server = server_config_from_pem(cert_pem, key_pem, source)?;
        let ca_path = self.ca_cert_path();
        let client = client_config_from_pem(&self.read_pem(&ca_path)?, &ca_path)?;
        handshake(server, client, host).map_err(|e| {
            refused(
                source,
                format!("is refused by a client trusting the cell's CA {} ({e})", ca_path.display()),
                "give a certificate signed by the cell's CA, or install its CA first with `keel cert use ca --tls-ca FILE`",
            )
        })?;
        let missing: Vec<String> = id
            .hosts
            .iter()
            .filter(|h| !info.names.contains(h))
            .cloned()
            .collect();
        let installed = self.install_pem(&id.name(), cert_pem, Some(key_pem), |i| {
            (i == &info)
                .then_some(())
                .ok_or("changed while installed".into())
        })?;
        Ok((installed, missing))
    }

    /// Installs an operator's CA. With its key, Keel signs with it, and `reissue` gets new
    /// certificates for those processes; without `reissue`, every process certificate present
    /// must already chain to it (else none is changed, and the error lists them).
    pub fn use_ca(
        &self,
        cell: &str,
        ca_pem: &str,
        key_pem: Option<&str>,
        reissue: Option<&[Identity]>,
        source: &Path,
        now_s: i64,
    ) -> Result<CertInfo> {
        let info = CertInfo::from_pem(ca_pem)
            .map_err(|p| refused(source, p, "give the PEM file of one CA certificate"))?;
        if !info.is_ca {
            return Err(refused(
                source,
                "is not a CA certificate (no basicConstraints CA:true)".into(),
                "give the CA that signs the cell's certificates",
            ));
        }
        let client = client_config_from_pem(ca_pem, source)?;
        if let Some(key) = key_pem {
            // The key signs: a throwaway certificate it makes must be accepted under the CA.
            let probe = Identity {
                node: cell.to_string(),
                process: "probe".into(),
                hosts: vec!["localhost".into()],
            };
            let made = issue::make_leaf(&probe, ca_pem, key, now_s).map_err(|e| {
                refused(
                    source,
                    format!("cannot sign with the key given ({e})"),
                    "give the CA's own key",
                )
            })?;
            let server = server_config_from_pem(&made.cert_pem, &made.key_pem, source)?;
            handshake(server, client.clone(), "localhost").map_err(|e| {
                refused(
                    source,
                    format!("does not go with the key given ({e})"),
                    "give the CA's own key",
                )
            })?;
        }
        if reissue.is_some() && key_pem.is_none() {
            return Err(refused(
                source,
                "comes without its key, so Keel cannot re-issue certificates with it".into(),
                "give --tls-key with the CA, or give each process its certificate with `keel cert use NAME`",
            ));
        }
        if reissue.is_none() {
            let mut strays = Vec::new();
            for name in self.names()?.into_iter().filter(|n| n != CA) {
                let (cert_path, key_path) = (self.cert_path(&name), self.key_path(&name));
                let cert = self.read_pem(&cert_path)?;
                let key = self.read_pem(&key_path)?;
                let facts = CertInfo::from_pem(&cert)
                    .map_err(|p| refused(&cert_path, p, "remove or replace it"))?;
                let host = facts
                    .names
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "localhost".into());
                let ok = server_config_from_pem(&cert, &key, &cert_path)
                    .ok()
                    .is_some_and(|server| handshake(server, client.clone(), &host).is_ok());
                if !ok {
                    strays.push(name);
                }
            }
            if !strays.is_empty() {
                return Err(refused(
                    source,
                    format!("does not sign the certificates of {}", strays.join(", ")),
                    "give it with its key and --reissue, or give those processes certificates it signed first (`keel cert use NAME`)",
                ));
            }
        }
        let installed = self.install_pem(CA, ca_pem, key_pem, |i| {
            (i == &info)
                .then_some(())
                .ok_or("changed while installed".into())
        })?;
        for id in reissue.unwrap_or(&[]) {
            self.issue(id, now_s)?;
        }
        Ok(installed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_796_000_000;

    fn id() -> Identity {
        Identity {
            node: "node01".into(),
            process: "server1".into(),
            hosts: vec!["localhost".into(), "127.0.0.1".into(), "mq.example".into()],
        }
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap()
    }

    #[test]
    fn an_operators_process_certificate_is_checked_then_installed() {
        let dir = tempfile::tempdir().unwrap();
        let cell = Pki::at(dir.path().join("cell"));
        cell.ensure("c", &[], NOW).unwrap();
        // The operator's PKI here is another Keel CA; its certificate for the process:
        let other = Pki::at(dir.path().join("other"));
        other.ensure("o", &[id()], NOW).unwrap();
        let (cert, key) = (
            read(&other.cert_path("node01.server1")),
            read(&other.key_path("node01.server1")),
        );
        let src = other.cert_path("node01.server1");
        // Not signed by the cell's CA: refused, nothing installed.
        let e = cell
            .use_process(&id(), &cert, &key, &src, NOW)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("refused by a client trusting the cell's CA"),
            "{e}"
        );
        assert!(!cell.cert_path("node01.server1").exists());
        // Its CA, with key, becomes the cell's; then the certificate is accepted.
        let (ca, ca_key) = (read(&other.ca_cert_path()), read(&other.key_path("ca")));
        cell.use_ca("c", &ca, Some(&ca_key), None, &other.ca_cert_path(), NOW)
            .unwrap();
        let (info, missing) = cell.use_process(&id(), &cert, &key, &src, NOW).unwrap();
        assert!(missing.is_empty(), "{missing:?}");
        assert_eq!(cell.info("node01.server1").unwrap(), info);
        // A key that is not the certificate's: refused.
        let e = cell
            .use_process(&id(), &cert, &ca_key, &src, NOW)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not go with its key"), "{e}");
        // Expired: refused.
        let e = cell
            .use_process(&id(), &cert, &key, &src, NOW + 500 * 86_400)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not valid now"), "{e}");
    }

    #[test]
    fn an_operators_ca_must_sign_what_is_there_or_reissue_it() {
        let dir = tempfile::tempdir().unwrap();
        let cell = Pki::at(dir.path().join("cell"));
        cell.ensure("c", &[id()], NOW).unwrap();
        let other = Pki::at(dir.path().join("other"));
        other.ensure("o", &[], NOW).unwrap();
        let (ca, ca_key, src) = (
            read(&other.ca_cert_path()),
            read(&other.key_path("ca")),
            other.ca_cert_path(),
        );
        let e = cell
            .use_ca("c", &ca, None, None, &src, NOW)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("does not sign the certificates of node01.server1"),
            "{e}"
        );
        let e = cell
            .use_ca("c", &ca, None, Some(&[id()]), &src, NOW)
            .unwrap_err()
            .to_string();
        assert!(e.contains("without its key"), "{e}");
        let wrong_key = read(&cell.key_path("ca"));
        let e = cell
            .use_ca("c", &ca, Some(&wrong_key), None, &src, NOW)
            .unwrap_err()
            .to_string();
        assert!(e.contains("key"), "{e}");
        let server_cert = read(&cell.cert_path("node01.server1"));
        let e = cell
            .use_ca("c", &server_cert, None, None, &src, NOW)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a CA"), "{e}");
        // With its key and --reissue: installed, and the process signed by it.
        cell.use_ca("c", &ca, Some(&ca_key), Some(&[id()]), &src, NOW)
            .unwrap();
        let new_ca = cell.info("ca").unwrap();
        assert_eq!(cell.info("node01.server1").unwrap().issuer, new_ca.subject);
        // Without its key: Keel cannot sign, and says what to do instead.
        cell.use_ca("c", &ca, None, None, &src, NOW).unwrap();
        assert!(!cell.key_path("ca").exists());
        let e = cell.issue(&id(), NOW).unwrap_err().to_string();
        assert!(e.contains("keel cert use node01.server1"), "{e}");
    }
}
