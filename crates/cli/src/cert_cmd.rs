//! `keel cert show|renew`: the cell's certificate authority and each process's certificate
//! (`secrets/tls/`, made by `keel profile create`; DESIGN §10). Renewing writes new files;
//! a running process keeps the certificate it loaded until it restarts.

use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

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
    (keel_core::unix_ms() / 1000) as i64
}

fn date(unix_s: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(u64::try_from(unix_s).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
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
