//! `keel tx list|commit|rollback`: transactions in doubt and their resolution by hand, through
//! the `TransactionService` admin object of a running server (normal or recovery mode).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::Subcommand;
use keel_admin::{AdminError, Value};
use keel_config::Config;

use crate::ctx::{print_json, runtime, Ctx};

#[derive(Subcommand, Debug)]
pub enum TxCmd {
    /// Transactions in doubt: decisions not finished, prepared branches of earlier runs. Fails
    /// (exit 1) when a resource does not answer: what it holds is not known.
    List {
        /// The server (default: every server of the node that is running).
        #[arg(long)]
        server: Option<String>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Commits every prepared branch of a transaction by hand (a heuristic outcome when no
    /// commit decision was logged).
    Commit {
        /// The transaction's XID, as `keel tx list` shows it.
        xid: String,
        /// The server it belongs to (default: read from the XID).
        #[arg(long)]
        server: Option<String>,
        /// JSON instead of text: {xid, server, outcome, branches, heuristic, message}.
        #[arg(long)]
        json: bool,
    },
    /// Rolls back every prepared branch of a transaction by hand (a heuristic outcome when a
    /// commit decision was logged).
    Rollback {
        /// The transaction's XID, as `keel tx list` shows it.
        xid: String,
        /// The server it belongs to (default: read from the XID).
        #[arg(long)]
        server: Option<String>,
        /// JSON instead of text: {xid, server, outcome, branches, heuristic, message}.
        #[arg(long)]
        json: bool,
    },
}

/// The servers to ask: the named one, or every server of the node.
fn servers<'a>(cfg: &'a Config, node: &str, server: Option<&'a str>) -> Result<Vec<&'a str>> {
    let all: Vec<&str> = cfg
        .node(node)
        .map(|n| n.servers.iter().map(|s| s.name.as_str()).collect())
        .unwrap_or_default();
    match server {
        Some(s) if all.contains(&s) => Ok(vec![s]),
        Some(s) => bail!(
            "there is no server {s} on node {node} (servers: {})",
            if all.is_empty() {
                "none".into()
            } else {
                all.join(", ")
            }
        ),
        None => Ok(all),
    }
}

fn object(node: &str, server: &str) -> String {
    keel_core::ObjectName::new(&[
        ("type", "TransactionService"),
        ("name", server),
        ("node", node),
        ("process", server),
    ])
    .to_string()
}

/// Invokes `op` on `server`'s transaction service; `Ok(None)` when the server is not running.
fn invoke(
    ctx: &Ctx,
    cfg: &Config,
    node: &str,
    server: &str,
    op: &str,
    args: Vec<Value>,
) -> Result<Option<Value>> {
    let profile = ctx.profile()?;
    let (_, s) = cfg
        .find_server(server)
        .ok_or_else(|| anyhow!("there is no server {server}"))?;
    let client = ctx
        .client(&profile, s.admin_port)?
        .with_timeout_ms(Duration::from_secs(120).as_millis() as u64);
    let rt = runtime()?;
    match rt.block_on(client.invoke(&object(node, server), op, args)) {
        Ok(v) => Ok(Some(v)),
        Err(AdminError::Unreachable { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub fn run(ctx: &Ctx, cmd: TxCmd) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    let (node, cfg) = ctx.config(&profile)?;
    match cmd {
        TxCmd::List { server, json } => {
            let mut rows = Vec::new();
            let mut down = Vec::new();
            // Resources a server could not ask: whether they hold transactions in doubt is not
            // known, so "none" must not be said (and the command fails).
            let mut unknown: Vec<(String, String, String)> = Vec::new();
            for s in servers(&cfg, &node, server.as_deref())? {
                match invoke(ctx, &cfg, &node, s, "list", vec![])? {
                    Some(Value::Object(listing)) => {
                        let (Some(Value::Array(list)), Some(Value::Array(missed))) =
                            (listing.get("transactions"), listing.get("unknown"))
                        else {
                            bail!("server {s} answered an unexpected list: {listing:?}");
                        };
                        for t in list {
                            let mut t = t.clone();
                            t["server"] = Value::from(s);
                            rows.push(t);
                        }
                        for u in missed {
                            unknown.push((
                                s.to_string(),
                                u["resource"].as_str().unwrap_or("?").to_string(),
                                u["reason"].as_str().unwrap_or("?").to_string(),
                            ));
                        }
                    }
                    Some(other) => bail!("server {s} answered an unexpected list: {other}"),
                    None => down.push(s.to_string()),
                }
            }
            if server.is_some() && !down.is_empty() {
                bail!(
                    "server {} is not running: transactions in doubt are listed by a running server; start it (`keel server start {} --recovery` finishes them and exits)",
                    down[0],
                    down[0]
                );
            }
            let mut unknown_names: Vec<&str> = unknown.iter().map(|(_, r, _)| r.as_str()).collect();
            unknown_names.sort_unstable();
            unknown_names.dedup();
            if json {
                print_json(&serde_json::json!({
                    "transactions": rows,
                    "unknown": unknown_names,
                    "unknown_reasons": unknown
                        .iter()
                        .map(|(s, r, why)| serde_json::json!({"server": s, "resource": r, "reason": why}))
                        .collect::<Vec<_>>(),
                    "not_running": down,
                }));
            } else if rows.is_empty() && unknown.is_empty() {
                println!("No transaction in doubt.");
            } else if rows.is_empty() {
                println!("No transaction in doubt at the resources that answered.");
            } else {
                for t in &rows {
                    println!(
                        "{}  {}  server {}",
                        t["xid"].as_str().unwrap_or("?"),
                        t["state"].as_str().unwrap_or("?"),
                        t["server"].as_str().unwrap_or("?")
                    );
                    for b in t["branches"].as_array().into_iter().flatten() {
                        println!("    {}", b.as_str().unwrap_or("?"));
                    }
                }
            }
            if !down.is_empty() && server.is_none() {
                eprintln!("(not running, not asked: {})", down.join(", "));
            }
            if !unknown.is_empty() {
                let each: Vec<String> = unknown
                    .iter()
                    .map(|(s, r, why)| format!("{r} did not answer server {s} ({why})"))
                    .collect();
                bail!(
                    "the answer is unknown for {}, which may hold transactions in doubt: {}; make it reachable and list again (recovery finishes what it holds by itself once it answers)",
                    unknown_names.join(", "),
                    each.join("; ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        TxCmd::Commit { xid, server, json } => {
            resolve(ctx, &cfg, &node, &xid, server, "commit", json)
        }
        TxCmd::Rollback { xid, server, json } => {
            resolve(ctx, &cfg, &node, &xid, server, "rollback", json)
        }
    }
}

/// The server whose transaction `xid` is: its global id starts with the server's recovery
/// identity `node/server`.
fn server_of(xid: &str) -> Option<String> {
    let gtrid = keel_core::hex::decode(xid.split(':').nth(1)?)?;
    let id = gtrid.get(..gtrid.len().checked_sub(16)?)?;
    let id = std::str::from_utf8(id).ok()?;
    id.split_once('/').map(|(_, s)| s.to_string())
}

fn resolve(
    ctx: &Ctx,
    cfg: &Config,
    node: &str,
    xid: &str,
    server: Option<String>,
    op: &str,
    json: bool,
) -> Result<ExitCode> {
    let server = match server.or_else(|| server_of(xid)) {
        Some(s) => s,
        None => bail!("cannot tell which server transaction {xid} belongs to; give --server (`keel tx list` shows it)"),
    };
    servers(cfg, node, Some(&server))?;
    match invoke(ctx, cfg, node, &server, op, vec![Value::from(xid)])? {
        Some(answer) => {
            // {message, outcome, branches, heuristic}; a server of an older build answers the
            // sentence alone.
            let mut obj = match answer {
                Value::Object(m) => m,
                Value::String(message) => {
                    let mut m = serde_json::Map::new();
                    m.insert("message".into(), Value::from(message));
                    m
                }
                other => bail!("server {server} answered {other} to {op}; expected the outcome"),
            };
            if json {
                obj.insert("xid".into(), Value::from(xid));
                obj.insert("server".into(), Value::from(server));
                print_json(&Value::Object(obj));
            } else {
                let message = obj.get("message").and_then(Value::as_str).unwrap_or("");
                println!("{message}");
            }
            Ok(ExitCode::SUCCESS)
        }
        None => bail!("server {server} is not running; start it (`keel server start {server} --recovery` resolves what the logs decide, then `keel tx list` shows what is left)"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_server_comes_from_the_recovery_identity() {
        let mut gtrid = b"node01/server1".to_vec();
        gtrid.extend_from_slice(&[0; 16]);
        let xid = format!("4b45454c:{}:", keel_core::hex::encode(&gtrid));
        assert_eq!(super::server_of(&xid).as_deref(), Some("server1"));
        assert_eq!(super::server_of("4b45454c:00:"), None);
        assert_eq!(super::server_of("nonsense"), None);
    }
}
