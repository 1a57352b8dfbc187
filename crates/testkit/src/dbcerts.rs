//! Throwaway certificates for database servers started with TLS (`pgtest::Cluster::start_tls`,
//! `mariatest::Maria::start_tls`): a CA with one server certificate for localhost and
//! 127.0.0.1, and another CA, whose trust must not be enough.

use std::path::Path;

/// The database's CA (in `dir/db`), its certificate and key as PEM, and another CA (in
/// `dir/other`).
pub struct DbCerts {
    pub pki: keel_tls::Pki,
    pub other: keel_tls::Pki,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Makes [`DbCerts`] for the database server `process` under `dir`.
pub fn db_certs(dir: &Path, process: &str) -> DbCerts {
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs() as i64;
    let db = keel_tls::Identity {
        node: "db".into(),
        process: process.into(),
        hosts: vec!["localhost".into(), "127.0.0.1".into()],
    };
    let pki = keel_tls::Pki::at(dir.join("db"));
    pki.ensure("dbca", std::slice::from_ref(&db), now_s)
        .expect("the database's CA and certificate");
    let other = keel_tls::Pki::at(dir.join("other"));
    other.ensure("other", &[], now_s).expect("another CA");
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).expect("a PEM file just written");
    let (cert_pem, key_pem) = (
        read(pki.cert_path(&db.name())),
        read(pki.key_path(&db.name())),
    );
    DbCerts {
        pki,
        other,
        cert_pem,
        key_pem,
    }
}
