//! `keel cert show|renew`: the cell's certificate authority and each process's certificate
//! (`secrets/tls/`, made by `keel profile create`; DESIGN §10). Renewing writes new files;
//! a running process keeps the certificate it loaded until it restarts.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Subcommand;
use keel_tls::{CertInfo, EXPIRY_WARNING_DAYS};
use serde_json::{json, Value};

use crate::ctx::{print_json, Ctx};

#[derive(Subcommand, Debug)]
pub enum CertCmd {
    /// The cell's CA and every process certificate: subject, names, expiry, days left.
    Show {
        /// Only this certificate (`ca`, or `<node>.<process>` such as node01.server1).
        name: Option<String>,
        /// One JSON array: {name, subject, issuer, names, is_ca, not_before, not_after,
        /// days_left, sha256, serial, file} per certificate.
        #[arg(long)]
        json: bool,
    },
    /// Make new certificates, signed by the cell's CA: the named ones, every process's
    /// (--all), or a new CA and every certificate with it (--ca). Processes load their
    /// certificate when they start.
    Renew {
        /// Certificates to renew (`<node>.<process>`, as `keel cert show` names them).
        names: Vec<String>,
        /// Every process certificate of the cell.
        #[arg(long, conflicts_with = "names")]
        all: bool,
        /// A new CA, and every process certificate signed by it (peers that trust the old CA
        /// must be given the new one).
        #[arg(long, conflicts_with_all = ["names", "all"])]
        ca: bool,
        /// One JSON object: {renewed: [names], certificates: [as `show --json`]}.
        #[arg(long)]
        json: bool,
    },
    /// Use an operator's own PEM files instead of Keel's: a process's certificate and key
    /// (`NAME --tls-cert FILE --tls-key FILE`), or the cell's CA (`ca --tls-ca FILE`, with
    /// `--tls-key` if Keel should still sign with it). Checked by a TLS handshake in memory
    /// before anything is replaced; processes load it when they start.
    Use {
        /// `ca`, or the process (`<node>.<process>`, as `keel cert show` names them).
        name: String,
        /// A process's certificate (PEM; signed by the cell's CA).
        #[arg(long, value_name = "FILE", conflicts_with = "tls_ca")]
        tls_cert: Option<std::path::PathBuf>,
        /// The private key of the certificate or CA given (PEM).
        #[arg(long, value_name = "FILE")]
        tls_key: Option<std::path::PathBuf>,
        /// The cell's CA certificate (PEM), with `ca` as NAME.
        #[arg(long, value_name = "FILE")]
        tls_ca: Option<std::path::PathBuf>,
        /// With `--tls-ca` and its `--tls-key`: re-issue every process certificate with it.
        #[arg(long, requires = "tls_ca")]
        reissue: bool,
        /// One JSON object: {used, certificate: (as `show --json`), missing_names}.
        #[arg(long)]
        json: bool,
    },
}

/// A PEM file an operator names (bounded by keel-tls).
fn read_pem(path: &std::path::Path) -> Result<String> {
    Ok(keel_tls::read_pem_file(
        path,
        "check the path, and that the user running keel can read it",
    )?)
}

#[allow(clippy::too_many_arguments)]
fn use_files(
    ctx: &Ctx,
    pki: &keel_tls::Pki,
    name: &str,
    tls_cert: Option<&std::path::Path>,
    tls_key: Option<&std::path::Path>,
    tls_ca: Option<&std::path::Path>,
    reissue: bool,
    json: bool,
) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    let (_, cfg) = ctx.config(&profile)?;
    let ids = keel_config::identities(&cfg);
    let now_s = now_s();
    let (info, missing) = match (name, tls_cert, tls_ca) {
        ("ca", None, Some(ca)) => {
            let key = tls_key.map(read_pem).transpose()?;
            let info = pki.use_ca(
                &cfg.cell.name,
                &read_pem(ca)?,
                key.as_deref(),
                reissue.then_some(&ids[..]),
                ca,
                now_s,
            )?;
            (info, Vec::new())
        }
        ("ca", _, None) => bail!("give the CA with --tls-ca FILE (and --tls-key FILE if Keel should sign with it)"),
        (n, Some(cert), None) => {
            let Some(key) = tls_key else {
                bail!("give the certificate's key with --tls-key FILE");
            };
            let Some(id) = ids.iter().find(|i| i.name() == n) else {
                bail!(
                    "no process {n} in the configuration; known: {}",
                    ids.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
                );
            };
            pki.use_process(id, &read_pem(cert)?, &read_pem(key)?, cert, now_s)?
        }
        (n, None, _) => bail!("give {n}'s certificate with --tls-cert FILE and its key with --tls-key FILE (--tls-ca is for `keel cert use ca`)"),
        (_, Some(_), Some(_)) => unreachable!("clap keeps --tls-cert and --tls-ca apart"),
    };
    if json {
        print_json(&json!({
            "used": name,
            "certificate": cert_json(pki, name, &info, now_s),
            "missing_names": missing,
        }));
    } else {
        println!(
            "Certificate {name} is now the operator's ({}), valid until {} ({} days).",
            info.subject,
            date(info.not_after_s),
            info.days_left(now_s)
        );
        if !missing.is_empty() {
            println!(
                "It does not name {}: clients calling the process by those names will refuse it.",
                missing.join(", ")
            );
        }
        if reissue {
            println!("Every process certificate was re-issued with it.");
        }
        println!("Processes load their certificate when they start: restart them to use it.");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(ctx: &Ctx, cmd: CertCmd) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    let pki = profile.pki();
    let now_s = now_s();
    match cmd {
        CertCmd::Show { name, json } => {
            let list = match name {
                Some(n) => vec![(n.clone(), pki.info(&n)?)],
                None => pki.list()?,
            };
            if list.is_empty() {
                bail!(
                    "profile {} has no certificates in {}; make them with `keel cert renew --ca`",
                    profile.root().display(),
                    pki.dir().display()
                );
            }
            if json {
                print_json(&Value::Array(
                    list.iter()
                        .map(|(n, i)| cert_json(&pki, n, i, now_s))
                        .collect(),
                ));
            } else {
                print_table(&list, now_s);
            }
            Ok(ExitCode::SUCCESS)
        }
        CertCmd::Use {
            name,
            tls_cert,
            tls_key,
            tls_ca,
            reissue,
            json,
        } => use_files(
            ctx,
            &pki,
            &name,
            tls_cert.as_deref(),
            tls_key.as_deref(),
            tls_ca.as_deref(),
            reissue,
            json,
        ),
        CertCmd::Renew {
            names,
            all,
            ca,
            json,
        } => {
            let (_, cfg) = ctx.config(&profile)?;
            let ids = keel_config::identities(&cfg);
            let renewed = if ca {
                pki.renew_ca(&cfg.cell.name, &ids, now_s)?
            } else {
                let chosen: Vec<&keel_tls::Identity> = if all {
                    ids.iter().collect()
                } else if names.is_empty() {
                    bail!("name the certificates to renew (see `keel cert show`), or give --all or --ca");
                } else {
                    names
                        .iter()
                        .map(|n| {
                            ids.iter().find(|i| i.name() == *n).ok_or_else(|| {
                                anyhow::anyhow!(
                                    "no process {n} in the configuration; known: {}",
                                    ids.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
                                )
                            })
                        })
                        .collect::<Result<_>>()?
                };
                let mut out = Vec::new();
                for id in chosen {
                    pki.issue(id, now_s)?;
                    out.push(id.name());
                }
                out
            };
            let list: Vec<(String, CertInfo)> = renewed
                .iter()
                .map(|n| Ok((n.clone(), pki.info(n)?)))
                .collect::<Result<_>>()?;
            if json {
                print_json(&json!({
                    "renewed": renewed,
                    "certificates": list.iter().map(|(n, i)| cert_json(&pki, n, i, now_s)).collect::<Vec<_>>(),
                }));
            } else {
                for (n, i) in &list {
                    println!(
                        "Renewed certificate {n}: valid until {} ({} days).",
                        date(i.not_after_s),
                        i.days_left(now_s)
                    );
                }
                println!("Processes load their certificate when they start: restart them to use the new ones.");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn now_s() -> i64 {
    keel_core::unix_s()
}

fn date(unix_s: i64) -> String {
    keel_tls::rfc3339(unix_s)
}

fn cert_json(pki: &keel_tls::Pki, name: &str, i: &CertInfo, now_s: i64) -> Value {
    json!({
        "name": name,
        "subject": i.subject,
        "issuer": i.issuer,
        "names": i.names,
        "is_ca": i.is_ca,
        "not_before": date(i.not_before_s),
        "not_after": date(i.not_after_s),
        "days_left": i.days_left(now_s),
        "sha256": i.sha256,
        "serial": i.serial,
        "file": pki.cert_path(name).display().to_string(),
    })
}

fn print_table(list: &[(String, CertInfo)], now_s: i64) {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header(vec!["NAME", "SUBJECT", "EXPIRES", "DAYS LEFT", "NAMES"]);
    let mut soon = Vec::new();
    for (n, i) in list {
        let left = i.days_left(now_s);
        if left <= EXPIRY_WARNING_DAYS {
            soon.push(format!("{n} ({left} days)"));
        }
        t.add_row(vec![
            n.clone(),
            i.subject.clone(),
            date(i.not_after_s),
            left.to_string(),
            i.names.join(", "),
        ]);
    }
    println!("{t}");
    if !soon.is_empty() {
        println!(
            "Expiring within {EXPIRY_WARNING_DAYS} days or expired: {}; renew with `keel cert renew NAME`.",
            soon.join(", ")
        );
    }
}
