//! TLS to PostgreSQL (and, through `tls_request`, MariaDB) for data stores (`store_url`) and
//! data sources, as libpq spells it in the
//! URL: `sslmode=verify-full&sslrootcert=FILE` (URL form) or `sslmode=verify-full
//! sslrootcert=FILE` (key-value form). Only `verify-full` (the server's certificate chains to
//! the CA in FILE and names the host called) and `disable` are offered: `require`, `prefer`
//! and `verify-ca` would encrypt without checking who answers, which is no protection against
//! the attacker TLS is for. Without `sslmode` the connection is plain, as before.

use std::sync::Arc;

use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::client_config_from;

/// A PostgreSQL connection's configuration and, when it asks for TLS, the connector.
pub struct PgTarget {
    pub config: tokio_postgres::Config,
    pub tls: Option<MakeRustlsConnect>,
}

/// The value of option `key` taken out of `url` (the rest of the URL returned), in either form.
fn take_option(url: &str, key: &str) -> (String, Option<String>) {
    // URL form (`postgresql://`, `mysql://`): options in the query; else libpq's key-value form.
    let is_url = url.contains("://");
    if is_url {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_string(), None);
        };
        let mut value = None;
        let kept: Vec<&str> = query
            .split('&')
            .filter(|p| match p.split_once('=') {
                Some((k, v)) if k == key => {
                    value = Some(
                        percent_encoding::percent_decode_str(v)
                            .decode_utf8_lossy()
                            .into_owned(),
                    );
                    false
                }
                _ => true,
            })
            .collect();
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        (rest, value)
    } else {
        let mut value = None;
        let kept: Vec<&str> = url
            .split_whitespace()
            .filter(|t| match t.split_once('=') {
                Some((k, v)) if k == key => {
                    value = Some(v.trim_matches('\'').to_string());
                    false
                }
                _ => true,
            })
            .collect();
        (kept.join(" "), value)
    }
}

/// For clients other than tokio-postgres (MariaDB): `url` without the two TLS options, and the
/// CA file when it asks for `verify-full` (None: plain). Other modes are refused as below.
pub fn tls_request(url: &str) -> Result<(String, Option<String>), String> {
    let (rest, mode) = take_option(url, "sslmode");
    let (rest, root) = take_option(&rest, "sslrootcert");
    match mode.as_deref() {
        None | Some("disable") => Ok((rest, None)),
        Some("verify-full") => match root {
            Some(root) => Ok((rest, Some(root))),
            None => Err("sslmode=verify-full needs sslrootcert=FILE, the CA that signed the database server's certificate".into()),
        },
        Some(other) => Err(format!(
            "sslmode={other} is not offered: Keel checks the database server's certificate and name, so use sslmode=verify-full&sslrootcert=FILE (or sslmode=disable)"
        )),
    }
}

/// Parses `url` into what `tokio_postgres` connects with; the error is one sentence (without
/// the URL, which may hold a password).
pub fn pg_target(url: &str) -> Result<PgTarget, String> {
    let (rest, root) = tls_request(url)?;
    let mut config: tokio_postgres::Config = rest
        .parse()
        .map_err(|e| format!("the connection URL does not parse ({e})"))?;
    let tls = match root {
        None => {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            None
        }
        Some(root) => {
            let client =
                client_config_from(std::path::Path::new(&root)).map_err(|e| e.to_string())?;
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            Some(MakeRustlsConnect::new(Arc::unwrap_or_clone(client)))
        }
    };
    Ok(PgTarget { config, tls })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_taken_out_of_both_forms() {
        let (rest, v) = take_option(
            "postgresql://u@h:5/db?sslmode=verify-full&connect_timeout=3&sslrootcert=%2Fa%20b.pem",
            "sslmode",
        );
        assert_eq!(v.as_deref(), Some("verify-full"));
        let (rest, root) = take_option(&rest, "sslrootcert");
        assert_eq!(root.as_deref(), Some("/a b.pem"));
        assert_eq!(rest, "postgresql://u@h:5/db?connect_timeout=3");
        let (rest, v) = take_option("host=h port=5 sslmode=disable user=u", "sslmode");
        assert_eq!(
            (rest.as_str(), v.as_deref()),
            ("host=h port=5 user=u", Some("disable"))
        );
        assert!(pg_target("postgresql://u@h/db?sslmode=require")
            .err()
            .unwrap()
            .contains("verify-full"));
        assert!(pg_target("postgresql://u@h/db?sslmode=verify-full")
            .err()
            .unwrap()
            .contains("sslrootcert"));
        assert!(pg_target("postgresql://u@h/db").unwrap().tls.is_none());
    }
}

#[cfg(test)]
mod live {
    //! Against a throwaway PostgreSQL that takes TCP over TLS only (hostssl), with a
    //! certificate from a Keel CA for `localhost` and `127.0.0.1`.
    use super::*;
    use crate::issue::Identity;
    use crate::Pki;
    use keel_testkit::pgtest::{pg_bin, Cluster};

    fn now_s() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    async fn ssl_in_use(t: PgTarget) -> Result<bool, String> {
        let client = match t.tls {
            Some(tls) => {
                let (client, conn) = t.config.connect(tls).await.map_err(|e| format!("{e:?}"))?;
                tokio::spawn(conn);
                client
            }
            None => {
                let (client, conn) = t
                    .config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(|e| format!("{e:?}"))?;
                tokio::spawn(conn);
                client
            }
        };
        let row = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(row.get(0))
    }

    #[tokio::test]
    async fn verify_full_connects_over_tls_and_refuses_another_ca() {
        let Some(bin) = pg_bin() else {
            eprintln!("PostgreSQL binaries not found: skipped");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::at(dir.path().join("db"));
        let db = Identity {
            node: "db".into(),
            process: "pg".into(),
            hosts: vec!["localhost".into(), "127.0.0.1".into()],
        };
        pki.ensure("dbca", std::slice::from_ref(&db), now_s())
            .unwrap();
        let cert = std::fs::read_to_string(pki.cert_path(&db.name())).unwrap();
        let key = std::fs::read_to_string(pki.key_path(&db.name())).unwrap();
        let cluster = Cluster::start_tls(bin, &cert, &key);
        let base = cluster.tcp_url();
        let ca = pki.ca_cert_path().display().to_string();

        let url = format!("{base}?sslmode=verify-full&sslrootcert={ca}");
        assert!(
            ssl_in_use(pg_target(&url).unwrap()).await.unwrap(),
            "TLS in use"
        );
        // Plain is refused by the server (hostssl only): the test's TLS is real.
        let e = ssl_in_use(pg_target(&base).unwrap()).await.unwrap_err();
        assert!(e.contains("no encryption") || e.contains("pg_hba"), "{e}");
        // A CA that did not sign the server's certificate: refused by the client.
        let other = Pki::at(dir.path().join("other"));
        other.ensure("other", &[], now_s()).unwrap();
        let url = format!(
            "{base}?sslmode=verify-full&sslrootcert={}",
            other.ca_cert_path().display()
        );
        let e = ssl_in_use(pg_target(&url).unwrap()).await.unwrap_err();
        assert!(
            e.to_lowercase().contains("certificate") || e.contains("tls"),
            "{e}"
        );
    }
}
