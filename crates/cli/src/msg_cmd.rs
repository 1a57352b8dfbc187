//! `keel send` and `keel receive`: operator access to queues, through the queue point's admin
//! object on the server that holds the queue (the AMQP endpoint is the application path).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use keel_admin::{AdminClient, Value};
use serde_json::json;

use crate::ctx::{runtime, Ctx};

#[derive(Args, Debug)]
pub struct SendArgs {
    /// Destination (queue) name.
    dest: String,
    /// The server whose engine holds the destination.
    #[arg(long)]
    server: String,
    /// Send the same body this many times.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// The messages' reliability (capped at the destination's maximum).
    #[arg(long, value_enum)]
    reliability: Option<crate::choices::Reliability>,
    /// Priority 0 (lowest) to 9 (default: the destination's).
    #[arg(long)]
    priority: Option<u8>,
    /// Time to live in milliseconds: an older message expires unread.
    #[arg(long)]
    ttl_ms: Option<u64>,
    /// The body, as text.
    #[arg(long, conflicts_with = "file")]
    body: Option<String>,
    /// Read the body from this file.
    #[arg(long)]
    file: Option<PathBuf>,
    /// An application property, KEY=VALUE (repeatable); the value is a string.
    #[arg(long = "property", value_name = "KEY=VALUE")]
    properties: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ReceiveArgs {
    /// Destination (queue) name; a durable subscription is `TOPIC::NAME`.
    dest: String,
    /// The server whose engine holds the destination.
    #[arg(long)]
    server: String,
    /// Receive at most this many messages.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Wait up to this long for messages (0: take what is there).
    #[arg(long, default_value_t = 0)]
    timeout_s: u64,
    /// One JSON object per line instead of the bodies.
    #[arg(long)]
    json: bool,
}

/// Bounds one admin call's batch so a large `--count` streams in pieces.
const BATCH_MAX: u32 = 1_000;

fn queue_point(ctx: &Ctx, server: &str, dest: &str) -> Result<(AdminClient, String)> {
    let profile = ctx.profile()?;
    let (node, cfg) = ctx.config(&profile)?;
    let (_, s) = cfg
        .find_server(server)
        .ok_or_else(|| anyhow!("server {server} is not defined on node {node}"))?;
    let (bus, m) = cfg.mes_of_server(&node, server).into_iter().next().ok_or_else(|| anyhow!("server {server} is not a member of any bus; add it with `keel bus add-member BUS --server {server}`"))?;
    // The engine's exception destination is not configured but can be read (and replayed).
    if dest != keel_config::system_exception_destination(&m.me) {
        // Created since the node's last synchronization: in the master only.
        let in_master = || {
            profile
                .master()
                .load()
                .is_ok_and(|c| c.find_destination(&bus.name, dest).is_some())
        };
        let d = match cfg.find_destination(&bus.name, dest) {
            Some(d) => d,
            None if in_master() => {
                return Err(not_served_yet(
                    server_running(ctx, &profile, s.admin_port),
                    server,
                    dest,
                    &bus.name,
                ));
            }
            None => bail!(
                "destination {dest} is not defined on bus {}; create it with `keel destination create {} {dest} --type queue`",
                bus.name,
                bus.name
            ),
        };
        if d.me != m.me {
            bail!("destination {dest} is held by messaging engine {}, not by {} on server {server}; use the server of {}", d.me, m.me, d.me);
        }
    }
    let name = keel_core::ObjectName::new(&[
        ("type", "SIBQueuePoint"),
        ("name", &format!("{dest}@{}", m.me)),
        ("bus", &bus.name),
        ("node", &node),
        ("process", server),
    ])
    .to_string();
    Ok((ctx.client(&profile, s.admin_port)?, name))
}

/// Whether the server whose admin port is `admin_port` answers.
fn server_running(ctx: &Ctx, profile: &keel_config::Profile, admin_port: u16) -> bool {
    let Ok(client) = ctx.client(profile, admin_port) else {
        return false;
    };
    let client = client.with_timeout_ms(2_000);
    runtime().is_ok_and(|rt| rt.block_on(client.ping()).is_ok())
}

/// A destination that is configured but that `server` does not serve: servers take new
/// destinations when they start (creating one in a running server comes later).
fn not_served_yet(running: bool, server: &str, dest: &str, bus: &str) -> anyhow::Error {
    if running {
        anyhow!(
            "destination {dest} on bus {bus} was created after server {server} started, and a server takes new destinations only when it starts: restart it (`keel server stop {server}`, then `keel server start {server}`) for {dest} to take effect"
        )
    } else {
        anyhow!(
            "destination {dest} on bus {bus} is created, but server {server} is not running; start it (`keel server start {server}`): it takes the destination when it starts"
        )
    }
}

/// An admin call on the queue point; a running server that has no such object started
/// before the destination was created.
fn on_queue_point(
    rt: &tokio::runtime::Runtime,
    client: &AdminClient,
    name: &str,
    op: &str,
    args: Vec<Value>,
    server: &str,
    dest: &str,
) -> Result<Value> {
    match rt.block_on(client.invoke(name, op, args)) {
        Ok(v) => Ok(v),
        Err(keel_admin::AdminError::NotFound { .. }) => {
            let bus = keel_core::ObjectName::parse(name)
                .ok()
                .and_then(|n| n.get("bus").map(str::to_string))
                .unwrap_or_default();
            Err(not_served_yet(true, server, dest, &bus))
        }
        Err(e) => Err(e.into()),
    }
}

pub fn send(ctx: &Ctx, a: SendArgs) -> Result<ExitCode> {
    let body = match (a.body, a.file) {
        (Some(b), _) => b,
        (None, Some(f)) => {
            std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?
        }
        (None, None) => bail!("give the message with --body TEXT or --file FILE"),
    };
    let (client, name) = queue_point(ctx, &a.server, &a.dest)?;
    let mut opts = json!({});
    if let Some(r) = a.reliability {
        opts["reliability"] = Value::from(keel_config::Reliability::from(r).as_str());
    }
    if let Some(p) = a.priority {
        opts["priority"] = Value::from(p);
    }
    if let Some(t) = a.ttl_ms {
        opts["ttl_ms"] = Value::from(t);
    }
    if !a.properties.is_empty() {
        let mut props = serde_json::Map::new();
        for p in &a.properties {
            let Some((k, v)) = p.split_once('=').filter(|(k, _)| !k.is_empty()) else {
                bail!("--property takes KEY=VALUE, not `{p}`");
            };
            props.insert(k.to_string(), Value::from(v));
        }
        opts["properties"] = Value::Object(props);
    }
    let rt = runtime()?;
    for _ in 0..a.count {
        let id = on_queue_point(
            &rt,
            &client,
            &name,
            "send",
            vec![Value::from(body.clone()), opts.clone()],
            &a.server,
            &a.dest,
        )?;
        println!("{}", id.as_str().unwrap_or_default());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn receive(ctx: &Ctx, a: ReceiveArgs) -> Result<ExitCode> {
    let (client, name) = queue_point(ctx, &a.server, &a.dest)?;
    let rt = runtime()?;
    let client = client.with_timeout_ms(a.timeout_s.saturating_mul(1000) + 30_000);
    let mut left = a.count;
    let deadline = std::time::Instant::now() + Duration::from_secs(a.timeout_s);
    while left > 0 {
        let timeout_ms = deadline
            .saturating_duration_since(std::time::Instant::now())
            .as_millis() as u64;
        let got = on_queue_point(
            &rt,
            &client,
            &name,
            "receive",
            vec![json!({"count": left.min(BATCH_MAX), "timeout_ms": timeout_ms})],
            &a.server,
            &a.dest,
        )?;
        let msgs = got.as_array().cloned().unwrap_or_default();
        if msgs.is_empty() {
            break;
        }
        for m in &msgs {
            if a.json {
                println!("{m}");
            } else {
                println!("{}", m["body"].as_str().unwrap_or_default());
            }
        }
        left -= msgs.len() as u32;
    }
    Ok(ExitCode::SUCCESS)
}
