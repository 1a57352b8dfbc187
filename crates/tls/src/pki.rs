//! The cell's certificates on disk, under a profile's `secrets/tls/` (0700):
//! `ca.pem`, `ca.key`, and `<node>.<process>.pem` / `.key` per process, each 0600, written by
//! temp + fsync + rename, each read back and checked before it takes the place of the old one.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{io_err, Result, TlsError, FIX_PERM};
use crate::info::CertInfo;
use crate::issue::{self, Identity};

/// The log warns this many days before a certificate expires.
pub const EXPIRY_WARNING_DAYS: i64 = 30;
/// Largest PEM file read (a certificate or key is a few KiB).
const PEM_BYTES_MAX: u64 = 64 * 1024;
pub(crate) const CA: &str = "ca";

/// The certificates of one profile.
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// The certificates under `dir` (a profile's `secrets/tls`).
    pub fn at(dir: impl Into<PathBuf>) -> Pki {
        Pki { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn cert_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    pub fn key_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }

    pub fn ca_cert_path(&self) -> PathBuf {
        self.cert_path(CA)
    }

    pub fn has_ca(&self) -> bool {
        self.ca_cert_path().exists()
    }

    /// Makes the cell's CA; refused when one exists (replacing it would orphan every
    /// certificate it signed: `renew_ca` does both).
    pub fn create_ca(&self, cell: &str, now_s: i64) -> Result<CertInfo> {
        if self.has_ca() {
            return Err(TlsError::Exists {
                what: "the cell's certificate authority".into(),
                path: self.ca_cert_path(),
                fix: "keep it, or replace it and every certificate with `keel cert renew --ca`"
                    .into(),
            });
        }
        self.ensure_dir()?;
        let made = issue::make_ca(cell, now_s)?;
        self.install(CA, &made, |info| {
            (info.is_ca && info.subject == info.issuer)
                .then_some(())
                .ok_or("is not a self-signed CA certificate".to_string())
        })
    }

    /// Signs a certificate for `id` with the cell's CA and installs it (replacing an older one
    /// of the same name).
    pub fn issue(&self, id: &Identity, now_s: i64) -> Result<CertInfo> {
        let ca_pem = self.read_pem(&self.ca_cert_path())?;
        if self.has_ca() && !self.key_path(CA).exists() {
            return Err(TlsError::Bad {
                path: self.ca_cert_path(),
                problem: format!("is an operator's CA whose key Keel does not hold, so Keel cannot sign a certificate for {}", id.name()),
                fix: format!("give {} a certificate signed by it with `keel cert use {} --tls-cert FILE --tls-key FILE`", id.name(), id.name()),
            });
        }
        let ca_key = self.read_pem(&self.key_path(CA))?;
        let ca = CertInfo::from_pem(&ca_pem)
            .map_err(|problem| self.bad(&self.ca_cert_path(), problem))?;
        let made = issue::make_leaf(id, &ca_pem, &ca_key, now_s)?;
        let hosts = id.hosts.clone();
        self.install(&id.name(), &made, |info| {
            if info.is_ca {
                return Err("is a CA certificate where a process certificate was expected".into());
            }
            if info.issuer != ca.subject {
                return Err(format!(
                    "was issued by {} instead of the cell's CA {}",
                    info.issuer, ca.subject
                ));
            }
            if info.names != hosts {
                return Err(format!("names {:?} instead of {:?}", info.names, hosts));
            }
            Ok(())
        })
    }

    /// Makes what is missing: the CA (for `cell`) and a certificate for each identity.
    /// Returns the names made, in order (empty: nothing was missing).
    pub fn ensure(&self, cell: &str, ids: &[Identity], now_s: i64) -> Result<Vec<String>> {
        let mut made = Vec::new();
        if !self.has_ca() {
            self.create_ca(cell, now_s)?;
            made.push(CA.to_string());
        }
        for id in ids {
            if !self.cert_path(&id.name()).exists() {
                self.issue(id, now_s)?;
                made.push(id.name());
            }
        }
        Ok(made)
    }

    /// The names of the certificates here, the CA first, then in order (nothing parsed).
    pub fn names(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list", &self.dir, FIX_PERM)(e)),
        };
        for entry in rd {
            let entry = entry.map_err(io_err("list", &self.dir, FIX_PERM))?;
            let file = entry.file_name().to_string_lossy().into_owned();
            if let Some(stem) = file.strip_suffix(".pem") {
                if !stem.starts_with('.') {
                    names.push(stem.to_string());
                }
            }
        }
        names.sort_by_key(|n| (n != CA, n.clone()));
        Ok(names)
    }

    /// Every certificate here, the CA first, then by name.
    pub fn list(&self) -> Result<Vec<(String, CertInfo)>> {
        self.names()?
            .into_iter()
            .map(|n| {
                let info = self.info(&n)?;
                Ok((n, info))
            })
            .collect()
    }

    /// One certificate's facts.
    pub fn info(&self, name: &str) -> Result<CertInfo> {
        let path = self.cert_path(name);
        if !path.exists() {
            let known = self.names()?;
            return Err(TlsError::Unknown {
                name: name.to_string(),
                dir: self.dir.clone(),
                known: if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                },
            });
        }
        let pem = self.read_pem(&path)?;
        CertInfo::from_pem(&pem).map_err(|p| self.bad(&path, p))
    }

    /// Replaces the CA and re-issues every process certificate with it (same names).
    pub fn renew_ca(&self, cell: &str, ids: &[Identity], now_s: i64) -> Result<Vec<String>> {
        self.ensure_dir()?;
        let made = issue::make_ca(cell, now_s)?;
        self.install(CA, &made, |info| {
            info.is_ca
                .then_some(())
                .ok_or("is not a CA certificate".to_string())
        })?;
        let mut out = vec![CA.to_string()];
        for id in ids {
            self.issue(id, now_s)?;
            out.push(id.name());
        }
        Ok(out)
    }

    fn bad(&self, path: &Path, problem: String) -> TlsError {
        TlsError::Bad {
            path: path.to_path_buf(),
            problem,
            fix: "replace it with a PEM certificate, or make a new one with `keel cert renew`"
                .into(),
        }
    }

    pub(crate) fn read_pem(&self, path: &Path) -> Result<String> {
        read_pem_file(
            path,
            "make the cell's certificates with `keel cert renew --ca` if they are missing",
        )
    }

    fn ensure_dir(&self) -> Result<()> {
        match std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&self.dir)
        {
            Ok(()) => {}
            Err(e) => return Err(io_err("create directory", &self.dir, FIX_PERM)(e)),
        }
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(
            "set permissions of",
            &self.dir,
            FIX_PERM,
        ))
    }

    /// Writes `name`'s key and certificate, after checking the certificate reads back whole
    /// and passes `check`; the key goes first, so a certificate on disk always has its key.
    fn install(
        &self,
        name: &str,
        made: &issue::Made,
        check: impl FnOnce(&CertInfo) -> std::result::Result<(), String>,
    ) -> Result<CertInfo> {
        self.install_pem(name, &made.cert_pem, Some(&made.key_pem), check)
    }

    /// As `install`, for PEM text from anywhere; without a key, an older key of `name` is
    /// removed (it belongs to the certificate being replaced).
    pub(crate) fn install_pem(
        &self,
        name: &str,
        cert_pem: &str,
        key_pem: Option<&str>,
        check: impl FnOnce(&CertInfo) -> std::result::Result<(), String>,
    ) -> Result<CertInfo> {
        let cert_path = self.cert_path(name);
        let info = CertInfo::from_pem(cert_pem)
            .and_then(|i| check(&i).map(|()| i))
            .map_err(|problem| TlsError::Generate {
                who: name.to_string(),
                problem: format!("the new certificate {problem}"),
            })?;
        self.ensure_dir()?;
        match key_pem {
            Some(key) => write_private(&self.key_path(name), key.as_bytes())?,
            None => match std::fs::remove_file(self.key_path(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", &self.key_path(name), FIX_PERM)(e)),
            },
        }
        write_private(&cert_path, cert_pem.as_bytes())?;
        // Read back what landed on disk: it is what every process will load.
        let back =
            CertInfo::from_pem(&self.read_pem(&cert_path)?).map_err(|p| self.bad(&cert_path, p))?;
        assert_eq!(back, info, "a certificate reads back as written");
        Ok(info)
    }
}

/// A PEM file's text, bounded: a certificate or key is a few KiB, and the bound keeps a wrong
/// path (a log, a disk image) out of memory. `fix` says what to do when it cannot be read.
pub fn read_pem_file(path: &Path, fix: &str) -> Result<String> {
    let len = std::fs::metadata(path)
        .map_err(io_err("read", path, fix))?
        .len();
    if len > PEM_BYTES_MAX {
        return Err(TlsError::Bad {
            path: path.to_path_buf(),
            problem: format!("is {len} bytes, more than a PEM file holds"),
            fix: "give the PEM file itself".into(),
        });
    }
    std::fs::read_to_string(path).map_err(io_err("read", path, FIX_PERM))
}

/// Unix seconds as RFC 3339 (`2026-12-08T01:00:00Z`), how certificates' dates are shown.
pub fn rfc3339(unix_s: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(unix_s).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Writes `bytes` to `path` (mode 0600) by temp + fsync + rename + directory fsync.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = keel_core::fsname::parent_of(path);
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        keel_core::fsname::random_hex(6)
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("create", &tmp, FIX_PERM))?;
        f.write_all(bytes)
            .map_err(io_err("write", &tmp, FIX_PERM))?;
        f.sync_all().map_err(io_err("fsync", &tmp, FIX_PERM))?;
        std::fs::rename(&tmp, path).map_err(io_err("replace", path, FIX_PERM))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync directory", &dir, FIX_PERM))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issue::{CA_DAYS, LEAF_DAYS};
    use std::os::unix::fs::MetadataExt;

    const NOW: i64 = 1_796_000_000;

    fn id(process: &str) -> Identity {
        Identity {
            node: "node01".into(),
            process: process.into(),
            hosts: vec!["localhost".into(), "127.0.0.1".into()],
        }
    }

    #[test]
    fn a_cell_gets_a_ca_and_signed_process_certificates_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::at(dir.path().join("tls"));
        let made = pki
            .ensure("keelCell", &[id("nodeagent"), id("server1")], NOW)
            .unwrap();
        assert_eq!(made, ["ca", "node01.nodeagent", "node01.server1"]);
        assert!(pki
            .ensure("keelCell", &[id("nodeagent")], NOW)
            .unwrap()
            .is_empty());
        let list = pki.list().unwrap();
        assert_eq!(list.len(), 3);
        let (ca_name, ca) = &list[0];
        assert_eq!(ca_name, "ca");
        assert!(
            ca.is_ca && ca.subject.contains("Keel cell keelCell CA"),
            "{ca:?}"
        );
        assert_eq!(ca.days_left(NOW), CA_DAYS);
        let s = pki.info("node01.server1").unwrap();
        assert!(!s.is_ca);
        assert_eq!(s.issuer, ca.subject);
        assert!(s.subject.contains("node01/server1"), "{}", s.subject);
        assert_eq!(s.names, ["localhost", "127.0.0.1"]);
        assert!(s.valid_at(NOW) && !s.valid_at(NOW + (LEAF_DAYS + 1) * 86_400));
        assert_eq!(s.days_left(NOW), LEAF_DAYS);
        assert_eq!(s.days_left(NOW + (LEAF_DAYS + 2) * 86_400), -2);
        for f in std::fs::read_dir(pki.dir()).unwrap() {
            let m = f.unwrap().metadata().unwrap();
            assert_eq!(m.mode() & 0o777, 0o600);
        }
        assert_eq!(std::fs::metadata(pki.dir()).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn renewing_replaces_the_certificate_and_keeps_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::at(dir.path());
        pki.ensure("c", &[id("server1")], NOW).unwrap();
        let before = pki.info("node01.server1").unwrap();
        let after = pki.issue(&id("server1"), NOW + 86_400).unwrap();
        assert_ne!(before.sha256, after.sha256);
        assert_ne!(before.serial, after.serial);
        assert_eq!(after.not_after_s - before.not_after_s, 86_400);
        assert!(
            pki.create_ca("c", NOW).is_err(),
            "a CA is never replaced by accident"
        );
        let old_ca = pki.info("ca").unwrap();
        let renewed = pki.renew_ca("c", &[id("server1")], NOW).unwrap();
        assert_eq!(renewed, ["ca", "node01.server1"]);
        let new_ca = pki.info("ca").unwrap();
        assert_ne!(old_ca.sha256, new_ca.sha256);
        assert_eq!(pki.info("node01.server1").unwrap().issuer, new_ca.subject);
    }

    #[test]
    fn bad_files_are_named_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::at(dir.path());
        pki.ensure("c", &[id("server1")], NOW).unwrap();
        std::fs::write(pki.cert_path("node01.server1"), "not a certificate").unwrap();
        let e = pki.info("node01.server1").unwrap_err().to_string();
        assert!(e.contains("node01.server1.pem") && e.contains("PEM"), "{e}");
        let key = std::fs::read_to_string(pki.key_path("ca")).unwrap();
        std::fs::write(pki.cert_path("x"), &key).unwrap();
        let e = pki.info("x").unwrap_err().to_string();
        assert!(
            e.contains("PRIVATE KEY") && !e.contains(key.lines().nth(1).unwrap()),
            "{e}"
        );
        let e = pki.info("nobody").unwrap_err().to_string();
        assert!(
            e.contains("no certificate named nobody") && e.contains("ca"),
            "{e}"
        );
        // Two certificates in one file.
        let ca = std::fs::read_to_string(pki.ca_cert_path()).unwrap();
        std::fs::write(pki.cert_path("two"), format!("{ca}{ca}")).unwrap();
        assert!(pki
            .info("two")
            .unwrap_err()
            .to_string()
            .contains("more than one"));
    }
}
