//! `keel admin query|invoke` and the scripting console (`-c`, `-f`, interactive).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use keel_admin::console::Console;
use keel_admin::{AdminClient, Value};

use crate::ctx::{runtime, Ctx, NodeAgent};

#[derive(Args, Debug)]
pub struct AdminArgs {
    /// Run CODE and print its final value (like wsadmin -c).
    #[arg(short = 'c', long = "command", conflicts_with = "file")]
    code: Option<String>,
    /// Run a script file.
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// Talk to this server's admin port instead of the node agent.
    #[arg(long)]
    server: Option<String>,
    #[command(subcommand)]
    verb: Option<AdminVerb>,
}

#[derive(Subcommand, Debug)]
enum AdminVerb {
    /// List admin objects whose names match PATTERN (e.g. 'type=Server,*').
    Query {
        /// An object name pattern: `key=value` pairs, `*` for any further keys.
        pattern: String,
    },
    /// Invoke operation OP on object NAME; each ARG is JSON if it parses, else a string.
    Invoke {
        /// The object's full name (as `query` prints it).
        name: String,
        /// The operation.
        op: String,
        /// Its arguments: JSON if it parses, else a string.
        args: Vec<String>,
    },
    /// Print the attributes of object NAME (or one attribute).
    Get {
        /// The object's full name (as `query` prints it).
        name: String,
        /// One attribute (default: all of them).
        attribute: Option<String>,
    },
}

/// Where admin calls go: the node agent (which answers for every running server of the
/// node), or one server directly with `--server`.
fn client(ctx: &Ctx, server: Option<&str>) -> Result<AdminClient> {
    let profile = ctx.profile()?;
    match server {
        None => {
            let rt = runtime()?;
            Ok(NodeAgent::connect(ctx, &rt, &profile)?.client)
        }
        Some(s) => {
            let (node, cfg) = ctx.config(&profile)?;
            let (_, scfg) = cfg
                .find_server(s)
                .ok_or_else(|| anyhow!("server {s} is not defined on node {node}"))?;
            ctx.client(&profile, scfg.admin_port)
        }
    }
}

pub fn run(ctx: &Ctx, a: AdminArgs) -> Result<ExitCode> {
    let client = client(ctx, a.server.as_deref())?;
    if let Some(verb) = a.verb {
        let rt = runtime()?;
        match verb {
            AdminVerb::Query { pattern } => {
                for n in rt.block_on(client.query(&pattern))? {
                    println!("{n}");
                }
            }
            AdminVerb::Invoke { name, op, args } => {
                let args: Vec<Value> = args
                    .iter()
                    .map(|s| serde_json::from_str(s).unwrap_or_else(|_| Value::from(s.as_str())))
                    .collect();
                print_value(&rt.block_on(client.invoke(&name, &op, args))?);
            }
            AdminVerb::Get { name, attribute } => match attribute {
                Some(attr) => print_value(&rt.block_on(client.attribute(&name, &attr))?),
                None => print_value(&Value::Object(rt.block_on(client.attributes(&name))?)),
            },
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut console = Console::new(client)?;
    match (a.code, a.file) {
        (Some(code), _) => console.run_script(&code, "-c", true)?,
        (None, Some(file)) => {
            let code = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read script {}", file.display()))?;
            console.run_script(&code, &file.display().to_string(), false)?;
        }
        (None, None) => {
            let profile = ctx.profile()?;
            console.interactive(&profile.layout().admin_history())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Strings print bare (so shell scripts can use them), everything else as JSON.
fn print_value(v: &Value) {
    match v {
        Value::String(s) => println!("{s}"),
        Value::Null => {}
        other => println!(
            "{}",
            serde_json::to_string_pretty(other).unwrap_or_else(|_| other.to_string())
        ),
    }
}
