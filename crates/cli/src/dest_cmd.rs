//! `keel destination create|list|delete`: queues and topic spaces of a bus.
//!
//! Destinations are configuration: every server of the bus reads them when it starts, so a
//! change reaches a running server only at its restart, and every command here says so.
//!
//! Counting a destination's messages (`list`'s depth, `delete`'s refusal) needs its engine or
//! its data store, never both: a running engine holds the store's exclusive lock. So the count
//! comes from the running engine's admin object when there is one (the engine's own admin
//! endpoint, which is what the node agent forwards to), else from the store opened here (its
//! lock then also keeps the engine from starting until the deletion is saved). When neither
//! can answer, the command says why and what to do.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::Subcommand;
use keel_admin::{AdminError, Value};
use keel_config::{Config, DestinationCfg, DestinationKind, Profile};
use keel_store::Store;
use serde_json::json;

use crate::choices::{DestinationType, Reliability};
use crate::config_cmd::{after_save, after_save_text, SyncFlag};
use crate::ctx::{print_json, runtime, Ctx};
use crate::me_cmd::{target, Target};

#[derive(Subcommand, Debug)]
pub enum DestinationCmd {
    /// Define a queue or topic space on a bus (servers read destinations when they start).
    Create {
        /// The bus it belongs to.
        bus: String,
        /// Its name (letters, digits, `_`, `.`, `-`).
        name: String,
        /// queue (point to point) or topic (topic space: publish/subscribe).
        #[arg(long = "type", value_enum, value_name = "TYPE")]
        kind: DestinationType,
        /// The engine holding its messages (default: the bus's only engine).
        #[arg(long)]
        me: Option<String>,
        /// Maximum reliability of its messages (default assured_persistent).
        #[arg(long, value_enum)]
        reliability: Option<Reliability>,
        #[command(flatten)]
        sync: SyncFlag,
    },
    /// Every destination of the cell: bus, name, type, engine, reliability, and the depth of
    /// each queue whose engine runs.
    List {
        /// Only the destinations of this bus.
        #[arg(long)]
        bus: Option<String>,
        /// One JSON array: {bus, name, type, me, reliability, depth, served} per destination
        /// (depth and served are null when the engine is not running).
        #[arg(long)]
        json: bool,
    },
    /// Delete a destination. Refused while it holds messages, or while they cannot be counted
    /// (its engine or its data store must answer), unless --force.
    Delete {
        /// The bus it belongs to.
        bus: String,
        /// The destination to delete.
        name: String,
        /// Delete it even if it holds messages or they cannot be counted: the messages stay in
        /// the engine's data store, unreachable, until a destination of the same name is
        /// created on that engine again.
        #[arg(long)]
        force: bool,
        /// One JSON object: {bus, name, type, me, messages, counted_by, forced, version,
        /// running_servers, restart_needed, sync}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        sync: SyncFlag,
    },
}

pub fn run(ctx: &Ctx, cmd: DestinationCmd) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    match cmd {
        DestinationCmd::Create {
            bus,
            name,
            kind,
            me,
            reliability,
            sync,
        } => {
            let saved = profile.master().update(|c| {
                c.add_destination(
                    &bus,
                    &name,
                    kind.into(),
                    me.as_deref(),
                    reliability.map(Into::into),
                )
                .map(|_| ())
            })?;
            let d = saved
                .find_destination(&bus, &name)
                .ok_or_else(|| anyhow!("destination {name} vanished after saving"))?;
            println!(
                "Created {} {name} on bus {bus} (messages held by {}, maximum reliability {}); configuration version {}.",
                d.kind.as_str(),
                d.me,
                d.reliability.as_str(),
                saved.version
            );
            let running = running_members(ctx, &profile, &saved, &bus)?;
            println!("{}", restart_sentence(&running, &name));
            after_save(ctx, &profile, sync.sync)?;
        }
        DestinationCmd::List { bus, json } => list(ctx, &profile, bus.as_deref(), json)?,
        DestinationCmd::Delete {
            bus,
            name,
            force,
            json,
            sync,
        } => delete(ctx, &profile, &bus, &name, force, json, sync.sync)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// How long one admin call of these commands may take: they only read counters.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The servers of `bus`'s members whose admin endpoint answers now.
fn running_members(ctx: &Ctx, profile: &Profile, cfg: &Config, bus: &str) -> Result<Vec<String>> {
    let rt = runtime()?;
    let mut running = Vec::new();
    for m in cfg.bus(bus).map(|b| b.members.as_slice()).unwrap_or(&[]) {
        let Some((_, s)) = cfg.find_server(&m.server) else {
            continue;
        };
        let client = ctx.client(profile, s.admin_port)?.with_timeout_ms(1_000);
        if rt.block_on(client.ping()).is_ok() {
            running.push(m.server.clone());
        }
    }
    Ok(running)
}

/// What a change means for the running servers of the bus: they read destinations at start.
fn restart_sentence(running: &[String], name: &str) -> String {
    match running {
        [] => "No server of the bus is running: each reads the change when it starts.".into(),
        [one] => format!(
            "Servers read destinations when they start: server {one} is running, so the change to {name} takes effect there only when it restarts (`keel server stop {one}`, then `keel server start {one}`)."
        ),
        many => format!(
            "Servers read destinations when they start: servers {} are running, so the change to {name} takes effect there only when they restart (`keel server stop NAME`, then `keel server start NAME`).",
            many.join(", ")
        ),
    }
}

/// The admin name of queue point `dest` of the engine `t` (as `keel_engine::QueuePointObject`).
fn queue_point(cfg: &Config, t: &Target, dest: &str) -> String {
    let (bus, m) = cfg
        .find_me(&t.me)
        .expect("the target's engine is in the configuration");
    keel_core::ObjectName::new(&[
        ("type", "SIBQueuePoint"),
        ("name", &format!("{dest}@{}", t.me)),
        ("bus", &bus.name),
        ("node", &m.node),
        ("process", &m.server),
    ])
    .to_string()
}

/// What the running engine says about one queue: its depth, or that it does not serve it
/// (`None`: defined after the server started). `Err` for anything else.
fn engine_depth(
    rt: &tokio::runtime::Runtime,
    t: &Target,
    object: &str,
) -> Result<Option<u64>, AdminError> {
    let client = t.client().with_timeout_ms(CALL_TIMEOUT.as_millis() as u64);
    match rt.block_on(client.invoke(object, "depth", vec![])) {
        Ok(v) => Ok(v.as_u64()),
        Err(AdminError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The engine's state through its server's admin endpoint; `None` when the server is down.
fn engine_state(rt: &tokio::runtime::Runtime, t: &Target) -> Result<Option<String>> {
    Ok(t.invoke(rt, "state", vec![], CALL_TIMEOUT)?
        .and_then(|v| v.as_str().map(str::to_string)))
}

fn list(ctx: &Ctx, profile: &Profile, bus: Option<&str>, json_out: bool) -> Result<()> {
    // The master: what is defined, including changes no node has synchronized yet.
    let cfg = profile.master().load()?;
    if let Some(b) = bus {
        if cfg.bus(b).is_none() {
            let known: Vec<&str> = cfg.buses.iter().map(|b| b.name.as_str()).collect();
            bail!(
                "there is no bus {b} in the cell (buses: {}); `keel destination list` without --bus shows every destination",
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            );
        }
    }
    let rt = runtime()?;
    // One state call per engine, not per destination.
    let mut states: std::collections::HashMap<String, Option<String>> = Default::default();
    let mut rows = Vec::new();
    for b in cfg.buses.iter().filter(|b| bus.is_none_or(|x| x == b.name)) {
        for d in &b.destinations {
            let t = target(ctx, profile, &cfg, &d.me)?;
            let state = match states.get(&d.me) {
                Some(s) => s.clone(),
                None => {
                    let s = engine_state(&rt, &t)?;
                    states.insert(d.me.clone(), s.clone());
                    s
                }
            };
            // Depth is a queue's: a topic space's messages are on its subscriptions.
            let (depth, served) = match (d.kind, state.as_deref()) {
                (DestinationKind::Queue, Some("started")) => {
                    match engine_depth(&rt, &t, &queue_point(&cfg, &t, &d.name))? {
                        Some(n) => (Some(n), Some(true)),
                        None => (None, Some(false)),
                    }
                }
                _ => (None, None),
            };
            rows.push(json!({
                "bus": b.name, "name": d.name, "type": d.kind.as_str(), "me": d.me,
                "reliability": d.reliability.as_str(), "depth": depth, "served": served,
                "server": t.server,
            }));
        }
    }
    if json_out {
        print_json(&Value::Array(rows));
        return Ok(());
    }
    if rows.is_empty() {
        println!(
            "No destinations (create one with `keel destination create BUS NAME --type queue|topic`)."
        );
        return Ok(());
    }
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header(vec!["BUS", "NAME", "TYPE", "ME", "RELIABILITY", "DEPTH"]);
    let mut unserved = std::collections::BTreeSet::new();
    let mut not_running = std::collections::BTreeSet::new();
    for r in &rows {
        let text = |k: &str| r[k].as_str().unwrap_or("").to_string();
        let depth = match (&r["depth"], &r["served"]) {
            (Value::Number(n), _) => n.to_string(),
            (_, Value::Bool(false)) => {
                unserved.insert(text("server"));
                "restart".into()
            }
            _ if r["type"] == "queue" => {
                not_running.insert(text("me"));
                "-".into()
            }
            _ => "-".into(),
        };
        table.add_row(vec![
            text("bus"),
            text("name"),
            text("type"),
            text("me"),
            text("reliability"),
            depth,
        ]);
    }
    println!("{table}");
    if !not_running.is_empty() {
        println!(
            "DEPTH -: the engine is not running ({}), so nothing counts its queues here; `keel store info ME` counts a stopped engine's messages.",
            not_running.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    if !unserved.is_empty() {
        println!(
            "DEPTH restart: defined after the server started; servers read destinations when they start, so restart {} to serve it.",
            unserved.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// How many messages a destination holds, and who said so.
enum Count {
    Known {
        messages: u64,
        /// How the count is known, as said to the operator ("counted by its running engine X").
        by: String,
    },
    /// Nobody could count them; the sentence says why and what to do.
    Unknown(String),
}

/// Messages of `d` in a store's per-destination counts: a queue's own, or every durable
/// subscription's of a topic space (`<topic>::<subscription>`).
fn messages_of(d: &DestinationCfg, counts: &[(String, u64)]) -> u64 {
    let prefix = format!(
        "{}{}",
        d.name,
        keel_engine::messaging::SUBSCRIPTION_SEPARATOR
    );
    counts
        .iter()
        .filter(|(name, _)| match d.kind {
            DestinationKind::Queue => *name == d.name,
            DestinationKind::Topic => name.starts_with(&prefix),
        })
        .map(|(_, n)| n)
        .sum()
}

/// Counts `d`'s messages: through its running engine, else in its data store, which is then
/// returned open (holding its lock) so the engine cannot start before the deletion is saved.
fn count(
    rt: &tokio::runtime::Runtime,
    cfg: &Config,
    t: &Target,
    d: &DestinationCfg,
) -> Result<(Count, Option<Box<dyn Store>>)> {
    let what = format!("{} {}", d.kind.as_str(), d.name);
    match engine_state(rt, t)?.as_deref() {
        Some("started") => {
            if d.kind == DestinationKind::Queue {
                if let Some(n) = engine_depth(rt, t, &queue_point(cfg, t, &d.name))? {
                    let by = format!("counted by its running engine {}", t.me);
                    return Ok((Count::Known { messages: n, by }, None));
                }
            }
            // The engine holds the store; an empty store holds nothing of this destination.
            let total = t
                .invoke(rt, "storeInfo", vec![], CALL_TIMEOUT)?
                .and_then(|v| v["messages"].as_u64());
            if total == Some(0) {
                let by = format!("its running engine {} holds no message at all", t.me);
                return Ok((Count::Known { messages: 0, by }, None));
            }
            let why = match d.kind {
                DestinationKind::Queue => format!(
                    "its running engine {} does not serve it yet (it was defined after server {} started) and holds the data store",
                    t.me, t.server
                ),
                DestinationKind::Topic => format!(
                    "the messages of a topic space's durable subscriptions are counted in its data store, which its running engine {} holds",
                    t.me
                ),
            };
            Ok((
                Count::Unknown(format!(
                    "cannot count the messages of {what}: {why}; stop the engine (`keel me stop {}`) and retry",
                    t.me
                )),
                None,
            ))
        }
        // Stopped in a running server, or the server is down: the store is free to open.
        Some("stopped") | None => count_in_store(rt, t, d, &what),
        Some(other) => Ok((
            Count::Unknown(format!(
                "cannot count the messages of {what}: its engine {} is {other} and holds the data store; retry when it is started or stopped",
                t.me
            )),
            None,
        )),
    }
}

/// The stopped engine's data store: SQLite file or PostgreSQL schema.
fn count_in_store(
    rt: &tokio::runtime::Runtime,
    t: &Target,
    d: &DestinationCfg,
    what: &str,
) -> Result<(Count, Option<Box<dyn Store>>)> {
    let opened: keel_store::Result<Box<dyn Store>> = match &t.store_url {
        Some(url) => {
            let schema = keel_engine::pg_schema(&t.me, &t.uuid);
            rt.block_on(keel_store::PgStore::open(url, &schema, &t.me, &t.uuid))
                .map(|s| Box::new(s) as Box<dyn Store>)
        }
        None if !t.store.exists() => {
            let by = format!("engine {} has no data store yet", t.me);
            return Ok((Count::Known { messages: 0, by }, None));
        }
        None => keel_store::SqliteStore::open(&t.store, &t.me, &t.uuid)
            .map(|s| Box::new(s) as Box<dyn Store>),
    };
    let store = match opened {
        Ok(s) => s,
        Err(e) => {
            return Ok((
                Count::Unknown(format!(
                    "cannot count the messages of {what}: its engine {} is not running and its data store did not open ({e})",
                    t.me
                )),
                None,
            ));
        }
    };
    match rt.block_on(store.destinations()) {
        Ok(counts) => {
            let by = format!("counted in the data store of {}", t.me);
            Ok((
                Count::Known {
                    messages: messages_of(d, &counts),
                    by,
                },
                Some(store),
            ))
        }
        Err(e) => {
            let _ = rt.block_on(store.close());
            Ok((
                Count::Unknown(format!(
                    "cannot count the messages of {what}: reading the data store of {} failed ({e})",
                    t.me
                )),
                None,
            ))
        }
    }
}

fn delete(
    ctx: &Ctx,
    profile: &Profile,
    bus: &str,
    name: &str,
    force: bool,
    json_out: bool,
    sync: bool,
) -> Result<()> {
    let cfg = profile.master().load()?;
    let Some(d) = cfg.find_destination(bus, name).cloned() else {
        // The model's sentence (unknown bus or destination, with the known ones).
        let mut probe = cfg.clone();
        probe.remove_destination(bus, name)?;
        bail!("destination {name} of bus {bus} vanished while it was read");
    };
    let rt = runtime()?;
    let t = target(ctx, profile, &cfg, &d.me)?;
    let (counted, store) = count(&rt, &cfg, &t, &d)?;
    let kind = d.kind.as_str();
    let keep = format!(
        "its messages stay in the data store of {}, unreachable, until a {kind} named {name} is created on that engine again",
        d.me
    );
    let refusal = match (&counted, force) {
        (_, true) | (Count::Known { messages: 0, .. }, _) => None,
        (Count::Known { messages, by }, false) => Some(format!(
            "{kind} {name} of bus {bus} holds {messages} message(s) ({by}); receive them first (`keel receive {name} --server {} --count {messages}`), or give --force to delete it anyway ({keep})",
            t.server
        )),
        (Count::Unknown(why), false) => Some(format!(
            "{why}, or give --force to delete {kind} {name} without counting ({keep})"
        )),
    };
    let saved = match refusal {
        Some(sentence) => Err(anyhow!(sentence)),
        None => profile
            .master()
            .update(|c| c.remove_destination(bus, name).map(|_| ()))
            .map_err(Into::into),
    };
    // The store's lock is held until the deletion is saved (or refused).
    if let Some(s) = store {
        let _ = rt.block_on(s.close());
    }
    let saved = saved?;
    let running = running_members(ctx, profile, &saved, bus)?;
    let mut restart = restart_sentence(&running, name);
    if !running.is_empty() && d.kind == DestinationKind::Queue {
        restart.push_str(" Messages sent to it meanwhile stay in the data store, as with --force.");
    }
    let (messages, by) = match &counted {
        Count::Known { messages, by } => (Some(*messages), Some(by.clone())),
        Count::Unknown(_) => (None, None),
    };
    if json_out {
        let synced = after_save_text(ctx, profile, sync)?;
        print_json(&json!({
            "bus": bus, "name": name, "type": kind, "me": d.me, "messages": messages,
            "counted_by": by, "forced": force, "version": saved.version,
            "running_servers": running, "restart_needed": !running.is_empty(), "sync": synced,
        }));
        return Ok(());
    }
    match &counted {
        Count::Known { messages, by } => println!(
            "Deleted {kind} {name} from bus {bus} ({messages} message(s): {by}); configuration version {}.",
            saved.version
        ),
        Count::Unknown(_) => println!(
            "Deleted {kind} {name} from bus {bus} without counting its messages (--force); configuration version {}.",
            saved.version
        ),
    }
    match &counted {
        Count::Known { messages: 0, .. } => {}
        _ => println!("As --force says, {keep}."),
    }
    println!("{restart}");
    after_save(ctx, profile, sync)
}

#[cfg(test)]
mod tests {
    use keel_config::{DestinationCfg, DestinationKind};

    #[test]
    fn a_topic_counts_its_subscriptions_and_a_queue_only_itself() {
        let counts: Vec<(String, u64)> = [
            ("orders", 3),
            ("orders.dead", 5),
            ("prices::audit", 2),
            ("prices::ui", 4),
            ("pricesx::a", 7),
        ]
        .iter()
        .map(|(n, c)| (n.to_string(), *c))
        .collect();
        let queue = DestinationCfg::new("orders", DestinationKind::Queue, "me");
        assert_eq!(super::messages_of(&queue, &counts), 3);
        let topic = DestinationCfg::new("prices", DestinationKind::Topic, "me");
        assert_eq!(super::messages_of(&topic, &counts), 6);
        let empty = DestinationCfg::new("nothing", DestinationKind::Queue, "me");
        assert_eq!(super::messages_of(&empty, &counts), 0);
    }

    #[test]
    fn the_restart_sentence_names_the_running_servers() {
        let none = super::restart_sentence(&[], "q");
        assert!(none.contains("when it starts"), "{none}");
        let one = super::restart_sentence(&["server1".into()], "q");
        assert!(
            one.contains("server1 is running") && one.contains("keel server start server1"),
            "{one}"
        );
        let two = super::restart_sentence(&["a".into(), "b".into()], "q");
        assert!(
            two.contains("a, b are running") && two.contains("change to q"),
            "{two}"
        );
    }
}
