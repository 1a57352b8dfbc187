//! `keel datasource create|list|delete` and `keel app create|list|delete`: data sources
//! (XA-capable databases) and the message-driven applications that use them. Both are
//! configuration only: servers read them when they start. `app create` checks a kind's options
//! by name (`check_kind_options`) before the model checks the rest.
//!
//! A data source's password never enters the configuration: `datasource create` takes it out
//! of the URL (or reads it from `--password-env VAR`) and keeps it in the profile's secrets
//! (`secrets/datasources/<name>`, mode 0600), written before the configuration names the data
//! source. `datasource create` also asks the database whether it can prepare branches and
//! refuses one that cannot (PostgreSQL with `max_prepared_transactions` 0); when the database
//! does not answer, the check waits for the server (`WTRN0013E`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use keel_admin::Value;
use keel_config::{AppCfg, AppKind, Config, DataSourceCfg, DataSourceKind};
use serde_json::json;

use crate::config_cmd::{after_save, SyncFlag};
use crate::ctx::{print_json, Ctx};

#[derive(Subcommand, Debug)]
pub enum DataSourceCmd {
    /// Define an XA-capable data source. A password in the URL
    /// (scheme://user:PASSWORD@host/db) is taken out and kept in the profile's secrets.
    Create {
        /// The data source's name (applications name it with --datasource).
        name: String,
        /// The database product.
        #[arg(long, value_enum)]
        kind: crate::choices::DataSourceKind,
        /// postgresql://user@host:port/database (postgres) or mysql://user@host:port/database
        /// (mariadb, also MySQL).
        #[arg(long)]
        url: String,
        /// Read the password from this environment variable instead of the URL.
        #[arg(long, value_name = "VAR")]
        password_env: Option<String>,
        /// Most connections a server keeps open to it (1 to 256).
        #[arg(long, default_value_t = keel_config::DEFAULT_POOL_MAX)]
        pool_max: u32,
        #[command(flatten)]
        sync: SyncFlag,
    },
    /// Every data source of the cell (never a password).
    List {
        /// One JSON array instead of lines of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete a data source and its password; refused while an sql application uses it.
    Delete {
        /// The data source to delete.
        name: String,
        #[command(flatten)]
        sync: SyncFlag,
    },
}

#[derive(Subcommand, Debug)]
pub enum AppCmd {
    /// Define a message-driven application: it receives from queue --on of its server's
    /// messaging engine and handles each message in one global transaction.
    Create {
        /// The application's name.
        name: String,
        /// The server it runs in.
        #[arg(long)]
        server: String,
        /// The queue it receives from (held by the server's messaging engine on the bus).
        #[arg(long)]
        on: String,
        /// What it does with each message.
        #[arg(long, value_enum)]
        kind: crate::choices::AppKind,
        /// forward: the destination each message goes on to (same engine).
        #[arg(long)]
        to: Option<String>,
        /// sql: the data source the statement runs on.
        #[arg(long)]
        datasource: Option<String>,
        /// sql: the statement run for each message.
        #[arg(long)]
        statement: Option<String>,
        /// script: a Rhai file defining `fn on_message(msg)` (its text is stored in the
        /// configuration; the server checks it when it starts).
        #[arg(long, value_name = "FILE")]
        script: Option<PathBuf>,
        /// The bus of --on (default: the only bus the server is a member of).
        #[arg(long)]
        bus: Option<String>,
        /// Messages handled at once (1 to 64).
        #[arg(long, default_value_t = keel_config::DEFAULT_APP_CONCURRENCY)]
        concurrency: u32,
        /// Transaction timeout in seconds: a message's handling that takes longer rolls back.
        #[arg(long, default_value_t = keel_config::DEFAULT_APP_TIMEOUT_S)]
        timeout_s: u32,
        #[command(flatten)]
        sync: SyncFlag,
    },
    /// The applications of the cell, or of one server.
    List {
        /// Only the applications of this server.
        #[arg(long)]
        server: Option<String>,
        /// One JSON array instead of lines of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete an application.
    Delete {
        /// The application to delete.
        name: String,
        #[command(flatten)]
        sync: SyncFlag,
    },
}

/// Said after every change: nothing reaches a running server before it restarts.
const AT_START: &str = "Servers read data sources and applications when they start";

pub fn run_datasource(ctx: &Ctx, cmd: DataSourceCmd) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    match cmd {
        DataSourceCmd::Create {
            name,
            kind,
            url,
            password_env,
            pool_max,
            sync,
        } => {
            let kind = DataSourceKind::from(kind);
            let (url, from_url) = keel_config::take_url_password(&url);
            let (password, source) = match (from_url, password_env) {
                (Some(_), Some(var)) => bail!(
                    "the URL holds a password and --password-env {var} names another; give the password one way only"
                ),
                (Some(p), None) => (Some(p), "taken out of the URL"),
                (None, Some(var)) => (Some(password_from_env(&var)?), "read from the environment"),
                (None, None) => (None, ""),
            };
            if password.is_some() && !names_user(&url) {
                bail!("the URL {url} names no user, so a password has nothing to go with; write it as scheme://USER@host:port/database");
            }
            let d = DataSourceCfg {
                name: name.clone(),
                kind,
                url: url.clone(),
                pool_max,
            };
            // Acceptable to the model first (no connection for a name taken or a URL of the
            // wrong kind), then asked whether it can prepare branches.
            profile.master().load()?.add_datasource(d.clone())?;
            let checked = check_datasource(&d, password.as_deref())?;
            // The secret is written inside the update, once the data source is known to be
            // acceptable (so an existing data source's password is never overwritten) and
            // before the configuration that names it.
            let saved = profile.master().update(|c| {
                c.add_datasource(d)?;
                match &password {
                    Some(p) => profile.set_datasource_password(&name, p),
                    // A password file left by an earlier data source of this name must not
                    // be picked up by this one.
                    None => profile.remove_datasource_password(&name),
                }
            })?;
            let where_pw = match &password {
                Some(_) => format!(
                    "password {source} and kept in the profile's secrets: {}",
                    profile.datasource_password_file(&name)?.display()
                ),
                None => "no password: none in the URL, no --password-env".into(),
            };
            println!(
                "Data source {name} created ({}, {url}, {where_pw}); configuration version {}. {checked} {AT_START}: a running server can use it after its next start.",
                kind.as_str(),
                saved.version
            );
            after_save(ctx, &profile, sync.sync)?;
        }
        DataSourceCmd::List { json } => {
            let cfg = profile.master().load()?;
            let mut rows = Vec::new();
            for d in &cfg.datasources {
                let used_by: Vec<&str> = cfg
                    .apps
                    .iter()
                    .filter(|a| a.datasource.as_deref() == Some(d.name.as_str()))
                    .map(|a| a.name.as_str())
                    .collect();
                let has_password = profile.datasource_password_file(&d.name)?.exists();
                rows.push(json!({
                    "name": d.name,
                    "kind": d.kind.as_str(),
                    "url": d.url,
                    "pool_max": d.pool_max,
                    "has_password": has_password,
                    "used_by": used_by,
                }));
            }
            if json {
                print_json(&Value::Array(rows));
            } else if rows.is_empty() {
                println!("No data sources (create one with `keel datasource create NAME --kind postgres|mariadb --url URL`).");
            } else {
                for (d, r) in cfg.datasources.iter().zip(&rows) {
                    let used: Vec<&str> = r["used_by"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    println!(
                        "{}  {}  {}  pool_max {}  {}  used by: {}",
                        d.name,
                        d.kind.as_str(),
                        d.url,
                        d.pool_max,
                        if r["has_password"].as_bool() == Some(true) {
                            "password in secrets"
                        } else {
                            "no password"
                        },
                        if used.is_empty() {
                            "none".to_string()
                        } else {
                            used.join(", ")
                        }
                    );
                }
            }
        }
        DataSourceCmd::Delete { name, sync } => {
            let saved = profile
                .master()
                .update(|c| c.remove_datasource(&name).map(|_| ()))?;
            // After the configuration: it must never name a data source whose secret is gone.
            profile.remove_datasource_password(&name)?;
            println!(
                "Data source {name} deleted, with its password; configuration version {}. {AT_START}: a running server keeps it until its next start.",
                saved.version
            );
            after_save(ctx, &profile, sync.sync)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks the database whether it can take part in two-phase commit: refused when it cannot (a
/// data source whose every message would fail at prepare); when it cannot be asked now, the
/// sentence says the check waits for the server (WTRN0013E at its start or first connection).
fn check_datasource(d: &DataSourceCfg, password: Option<&str>) -> Result<String> {
    let rt = crate::ctx::runtime()?;
    match rt.block_on(keel_server::txsvc::check_datasource(d, password)) {
        Ok(keel_server::txsvc::TwoPhase::Ready) => {
            Ok("Checked: the database answered and can take part in two-phase commit.".into())
        }
        Ok(keel_server::txsvc::TwoPhase::Unable(why)) => bail!(
            "data source {} is not created: its database cannot take part in two-phase commit: {why}; then create it again",
            d.name
        ),
        Err(why) => Ok(format!(
            "Not checked: the database did not answer now ({why}); whether it can take part in two-phase commit is checked when a server starts or first connects to it (WTRN0013E if it cannot)."
        )),
    }
}

pub fn run_app(ctx: &Ctx, cmd: AppCmd) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    match cmd {
        AppCmd::Create {
            name,
            server,
            on,
            kind,
            to,
            datasource,
            statement,
            script,
            bus,
            concurrency,
            timeout_s,
            sync,
        } => {
            let kind = AppKind::from(kind);
            check_kind_options(kind, &to, &datasource, &statement, &script)?;
            if !(1..=keel_config::MAX_APP_CONCURRENCY).contains(&concurrency) {
                bail!(
                    "--concurrency {concurrency} is out of range; use 1 to {}",
                    keel_config::MAX_APP_CONCURRENCY
                );
            }
            let script = script.as_deref().map(read_script).transpose()?;
            let bus = match bus {
                Some(b) => b,
                None => only_bus(&profile.master().load()?, &server)?,
            };
            let a = AppCfg {
                name: name.clone(),
                server: server.clone(),
                bus: bus.clone(),
                on: on.clone(),
                kind,
                to: to.clone(),
                datasource: datasource.clone(),
                statement,
                script,
                concurrency,
                timeout_s,
            };
            let saved = profile.master().update(|c| c.add_app(a).map(|_| ()))?;
            let what = match kind {
                AppKind::Forward => format!(
                    "forward, on {bus}/{on} to {bus}/{}",
                    to.as_deref().unwrap_or("")
                ),
                AppKind::Sql => format!(
                    "sql on data source {}, on {bus}/{on}",
                    datasource.as_deref().unwrap_or("")
                ),
                AppKind::Script => format!("script, on {bus}/{on}"),
            };
            println!(
                "Application {name} created on {server} ({what}); configuration version {}. {AT_START}: {server} runs it after its next start.",
                saved.version
            );
            after_save(ctx, &profile, sync.sync)?;
        }
        AppCmd::List { server, json } => {
            let cfg = profile.master().load()?;
            let apps: Vec<&AppCfg> = match &server {
                Some(s) => {
                    if cfg.find_server(s).is_none() {
                        return Err(keel_config::ConfigError::UnknownServer {
                            server: s.clone(),
                            known: server_names(&cfg),
                        }
                        .into());
                    }
                    cfg.apps_of_server(s)
                }
                None => cfg.apps.iter().collect(),
            };
            if json {
                let rows = apps
                    .iter()
                    .map(|a| {
                        json!({
                            "name": a.name,
                            "server": a.server,
                            "bus": a.bus,
                            "on": a.on,
                            "kind": a.kind.as_str(),
                            "to": a.to,
                            "datasource": a.datasource,
                            "statement": a.statement,
                            "script_bytes": a.script.as_ref().map(String::len),
                            "concurrency": a.concurrency,
                            "timeout_s": a.timeout_s,
                        })
                    })
                    .collect();
                print_json(&Value::Array(rows));
            } else if apps.is_empty() {
                println!("No applications (create one with `keel app create NAME --server S --on QUEUE --kind forward|sql|script`).");
            } else {
                for a in apps {
                    let detail = match a.kind {
                        AppKind::Forward => {
                            format!("to {}/{}", a.bus, a.to.as_deref().unwrap_or(""))
                        }
                        AppKind::Sql => {
                            format!("on data source {}", a.datasource.as_deref().unwrap_or(""))
                        }
                        AppKind::Script => {
                            format!("({} bytes)", a.script.as_ref().map_or(0, String::len))
                        }
                    };
                    println!(
                        "{}  server {}  on {}/{}  {} {}  concurrency {}",
                        a.name,
                        a.server,
                        a.bus,
                        a.on,
                        a.kind.as_str(),
                        detail,
                        a.concurrency
                    );
                }
            }
        }
        AppCmd::Delete { name, sync } => {
            let mut removed = None;
            let saved = profile.master().update(|c| {
                removed = Some(c.remove_app(&name)?);
                Ok(())
            })?;
            let server = removed.map(|a| a.server).unwrap_or_default();
            println!(
                "Application {name} deleted from {server}; configuration version {}. {AT_START}: a running {server} keeps running it until its next start.",
                saved.version
            );
            after_save(ctx, &profile, sync.sync)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Each kind takes its own options and no others; said with the option names, before any
/// file is read.
fn check_kind_options(
    kind: AppKind,
    to: &Option<String>,
    datasource: &Option<String>,
    statement: &Option<String>,
    script: &Option<PathBuf>,
) -> Result<()> {
    let given = [
        ("--to DEST", to.is_some()),
        ("--datasource DS", datasource.is_some()),
        ("--statement SQL", statement.is_some()),
        ("--script FILE", script.is_some()),
    ];
    let (needs, why): (&[&str], &str) = match kind {
        AppKind::Forward => (&["--to DEST"], "the destination each message goes on to"),
        AppKind::Sql => (
            &["--datasource DS", "--statement SQL"],
            "the data source and the statement run for each message",
        ),
        AppKind::Script => (
            &["--script FILE"],
            "a Rhai file defining fn on_message(msg)",
        ),
    };
    for (opt, present) in given {
        if needs.contains(&opt) && !present {
            bail!(
                "an application of kind {kind} needs {} ({why}); add {opt}",
                needs.join(" and ")
            );
        }
        if !needs.contains(&opt) && present {
            bail!(
                "{} is not used by an application of kind {kind}; remove it (a {kind} application takes {})",
                opt.split(' ').next().unwrap_or(opt),
                needs.join(" and ")
            );
        }
    }
    Ok(())
}

/// Whether `url` (without its password) has a user: `scheme://USER@host...`.
fn names_user(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    authority.rfind('@').is_some_and(|at| at > 0)
}

fn password_from_env(var: &str) -> Result<String> {
    match std::env::var(var) {
        Ok(p) if !p.is_empty() => Ok(p),
        Ok(_) => bail!("environment variable {var} (--password-env) is empty; set it to the data source's password"),
        Err(std::env::VarError::NotPresent) => bail!("environment variable {var} (--password-env) is not set; export it with the data source's password, then retry"),
        Err(std::env::VarError::NotUnicode(_)) => bail!("environment variable {var} (--password-env) is not valid UTF-8 text"),
    }
}

/// The text of a script file, at most `MAX_SCRIPT_BYTES`.
fn read_script(path: &Path) -> Result<String> {
    let limit = keel_config::MAX_SCRIPT_BYTES;
    let unreadable = || {
        format!(
            "cannot read the script file {} (--script); give a readable Rhai file",
            path.display()
        )
    };
    let f = std::fs::File::open(path).with_context(unreadable)?;
    let mut bytes = Vec::new();
    f.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(unreadable)?;
    if bytes.len() > limit {
        bail!(
            "the script file {} is larger than {limit} bytes; a script application's script is at most 256 KiB",
            path.display()
        );
    }
    String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "the script file {} is not UTF-8 text (byte {}); save it as UTF-8",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// The bus of an application created without `--bus`: the only bus its server is a member of.
fn only_bus(cfg: &Config, server: &str) -> Result<String> {
    let Some((node, _)) = cfg.find_server(server) else {
        return Err(keel_config::ConfigError::UnknownServer {
            server: server.into(),
            known: server_names(cfg),
        }
        .into());
    };
    let buses: Vec<&str> = cfg
        .mes_of_server(&node.name, server)
        .into_iter()
        .map(|(b, _)| b.name.as_str())
        .collect();
    match buses.as_slice() {
        [one] => Ok(one.to_string()),
        [] => bail!("server {server} is not a member of any bus, so it has no queue to receive from; make it one with `keel bus add-member BUS --server {server}`"),
        many => bail!(
            "server {server} is a member of several buses ({}); give --bus BUS to say which one --on is on",
            many.join(", ")
        ),
    }
}

fn server_names(cfg: &Config) -> Vec<String> {
    cfg.nodes
        .iter()
        .flat_map(|n| n.servers.iter().map(|s| s.name.clone()))
        .collect()
}
