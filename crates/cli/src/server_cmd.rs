//! `keel server create|start|stop|status|set-monitor-policy` and the hidden `keel server run`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use clap::Subcommand;
use keel_admin::{AdminError, Value};
use keel_core::faults;
use serde_json::json;

use crate::config_cmd::{after_save, SyncFlag};
use crate::ctx::{print_json, runtime, Ctx, NodeAgent};

#[derive(Subcommand, Debug)]
pub enum ServerCmd {
    /// Add a server to the node (next free admin and bus ports).
    Create {
        /// The server's name (unique in the cell).
        name: String,
        #[command(flatten)]
        sync: SyncFlag,
    },
    /// Start a server through the node agent and wait until it is open for work.
    Start {
        /// The server to start.
        name: String,
        /// Recovery mode: finish in-doubt transactions, accept no new work, then stop.
        #[arg(long)]
        recovery: bool,
    },
    /// Stop a server (SIGTERM; --force kills it at once).
    Stop {
        /// The server to stop.
        name: String,
        /// Kill it at once (SIGKILL) instead of an orderly stop.
        #[arg(long)]
        force: bool,
    },
    /// State, pid and endpoints of one server or all.
    Status {
        /// One server (default: every server of the node).
        name: Option<String>,
        /// JSON: one object for a named server, else an array.
        #[arg(long)]
        json: bool,
    },
    /// Change a server's monitor policy.
    SetMonitorPolicy {
        /// The server whose policy changes.
        name: String,
        /// Whether the node agent restarts the server after an abnormal exit.
        #[arg(long, value_name = "true|false")]
        auto_restart: Option<bool>,
        /// Seconds between the node agent's pings of the server.
        #[arg(long)]
        ping_interval_s: Option<u32>,
        /// Seconds a ping may take before it counts as failed.
        #[arg(long)]
        ping_timeout_s: Option<u32>,
        /// Restarts tried in a row before the node agent gives up.
        #[arg(long)]
        max_start_attempts: Option<u32>,
        #[command(flatten)]
        sync: SyncFlag,
    },
    /// The server process itself (launched by the node agent).
    #[command(hide = true)]
    Run {
        /// The server this process is.
        name: String,
        /// Recovery mode (see `server start --recovery`).
        #[arg(long)]
        recovery: bool,
    },
}

pub fn run(ctx: &Ctx, cmd: ServerCmd) -> Result<ExitCode> {
    match cmd {
        ServerCmd::Run { name, recovery } => {
            Ok(ExitCode::from(keel_server::run(keel_server::RunOptions {
                profile: ctx.profile_dir().to_path_buf(),
                server: name,
                recovery,
            })))
        }
        ServerCmd::Create { name, sync } => {
            let profile = ctx.profile()?;
            let node = profile.local_node()?;
            let cfg = profile
                .master()
                .update(|c| c.add_server(&node, &name).map(|_| ()))?;
            let (_, s) = cfg.find_server(&name).ok_or_else(|| {
                anyhow!("server {name} vanished from the configuration after saving it")
            })?;
            let host = cfg.node(&node).map_or("127.0.0.1", |n| n.host.as_str());
            println!("Created server {name} on node {node} (admin {host}:{}, bus {host}:{}); configuration version {}.", s.admin_port, s.bus_port, cfg.version);
            after_save(ctx, &profile, sync.sync)?;
            Ok(ExitCode::SUCCESS)
        }
        ServerCmd::Start { name, recovery } => start(ctx, &name, recovery),
        ServerCmd::Stop { name, force } => stop(ctx, &name, force),
        ServerCmd::Status { name, json } => status(ctx, name.as_deref(), json),
        ServerCmd::SetMonitorPolicy {
            name,
            auto_restart,
            ping_interval_s,
            ping_timeout_s,
            max_start_attempts,
            sync,
        } => {
            let profile = ctx.profile()?;
            if auto_restart.is_none()
                && ping_interval_s.is_none()
                && ping_timeout_s.is_none()
                && max_start_attempts.is_none()
            {
                bail!("nothing to change: give at least one of --auto-restart, --ping-interval-s, --ping-timeout-s, --max-start-attempts");
            }
            let cfg = profile.master().update(|c| {
                let known: Vec<String> = c
                    .nodes
                    .iter()
                    .flat_map(|n| n.servers.iter().map(|s| s.name.clone()))
                    .collect();
                let s = c
                    .nodes
                    .iter_mut()
                    .flat_map(|n| n.servers.iter_mut())
                    .find(|s| s.name == name)
                    .ok_or_else(|| keel_config::ConfigError::UnknownServer {
                        server: name.clone(),
                        known: known.clone(),
                    })?;
                if let Some(v) = auto_restart {
                    s.monitor.auto_restart = v;
                }
                if let Some(v) = ping_interval_s {
                    s.monitor.ping_interval_s = v;
                }
                if let Some(v) = ping_timeout_s {
                    s.monitor.ping_timeout_s = v;
                }
                if let Some(v) = max_start_attempts {
                    s.monitor.max_start_attempts = v;
                }
                Ok(())
            })?;
            let m = &cfg
                .find_server(&name)
                .map(|(_, s)| s.monitor.clone())
                .unwrap_or_default();
            println!(
                "Monitor policy of server {name}: auto_restart = {}, ping_interval_s = {}, ping_timeout_s = {}, max_start_attempts = {}; configuration version {}.",
                m.auto_restart, m.ping_interval_s, m.ping_timeout_s, m.max_start_attempts, cfg.version
            );
            after_save(ctx, &profile, sync.sync)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn start(ctx: &Ctx, name: &str, recovery: bool) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    let rt = runtime()?;
    let na = NodeAgent::connect(ctx, &rt, &profile)?;
    // KEEL_FAULTS of this command reaches this start only (DESIGN §3), never a restart.
    let mut opts = json!({"recovery": recovery});
    if let Ok(spec) = std::env::var(faults::ENV) {
        opts["faults"] = Value::from(spec);
    }
    let out = na.invoke(
        &rt,
        "launchProcess",
        vec![Value::from(name), opts],
        Duration::from_secs(3600),
    )?;
    if recovery {
        match out.get("outcome").and_then(Value::as_str) {
            Some(outcome) => {
                println!("Server {name} ran in recovery mode: {outcome}; it has stopped.")
            }
            None => {
                println!("Server {name} started in recovery mode (pid {}); it stops by itself when recovery is complete.", out["pid"]);
                wait_stopped(&rt, &na, name, Duration::from_secs(3600))?;
                println!("Server {name} finished recovery and stopped.");
            }
        }
    } else {
        println!(
            "Server {name} started (pid {}, open for work after {} ms).",
            out["pid"], out["elapsed_ms"]
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn wait_stopped(
    rt: &tokio::runtime::Runtime,
    na: &NodeAgent,
    name: &str,
    limit: Duration,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let st = na.invoke(
            rt,
            "serverStatus",
            vec![Value::from(name)],
            Duration::from_secs(10),
        )?;
        if st["state"] == "stopped" || st["state"] == "failed" {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "server {name} is still {} after {} s",
                st["state"],
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stop(ctx: &Ctx, name: &str, force: bool) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    let rt = runtime()?;
    match NodeAgent::connect(ctx, &rt, &profile) {
        Ok(na) => {
            let out = na.invoke(
                &rt,
                "stopProcess",
                vec![Value::from(name), json!({"force": force})],
                Duration::from_secs(120),
            )?;
            let how = if out["forced"] == true {
                " (killed)"
            } else {
                ""
            };
            println!("Server {name} stopped{how} (pid {}).", out["pid"]);
        }
        Err(na_err) => match stop_direct(ctx, &profile, &rt, name, force)? {
            Some(pid) => {
                println!("Server {name} stopped (pid {pid}); the node agent is not running.")
            }
            None => bail!("server {name} is not running ({na_err})"),
        },
    }
    Ok(ExitCode::SUCCESS)
}

/// Stops a server without its node agent: through the server's own admin endpoint (an orderly
/// stop, WSVR0024I), or SIGKILL with `force`, found by its pid file (only a process of this
/// profile). Waits until the process is gone. `Ok(None)` when it is not running.
pub fn stop_direct(
    ctx: &Ctx,
    profile: &keel_config::Profile,
    rt: &tokio::runtime::Runtime,
    name: &str,
    force: bool,
) -> Result<Option<i32>> {
    let (_, cfg) = ctx.config(profile)?;
    let (_, s) = cfg.find_server(name).ok_or_else(|| {
        anyhow!("server {name} is not defined; `keel server status` lists the servers")
    })?;
    let pid = std::fs::read_to_string(profile.layout().pid_file(name))
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok());
    let Some(pid) = pid.filter(|p| {
        u32::try_from(*p).is_ok_and(|p| keel_node::is_profile_process(p, profile.root()))
    }) else {
        return Ok(None);
    };
    if force {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    } else {
        let client = ctx.client(profile, s.admin_port)?;
        let server_obj = format!(
            "Keel:type=Server,name={name},node={},process={name}",
            profile.local_node()?
        );
        rt.block_on(client.invoke(&server_obj, "stop", vec![]))?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while crate::node_cmd::process_alive(pid) {
        if Instant::now() >= deadline {
            bail!(
                "server {name} (pid {pid}) did not exit within 30 s; use `keel server stop {name} --force`"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Some(pid))
}

/// Status from the node agent when it runs, else by probing each server's pid file and admin
/// port, so `status` answers even with the node agent down.
fn status(ctx: &Ctx, name: Option<&str>, json_out: bool) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    let rt = runtime()?;
    let (node, cfg) = ctx.config(&profile)?;
    if let Some(n) = name {
        if cfg.find_server(n).is_none() {
            let known: Vec<&str> = cfg
                .nodes
                .iter()
                .flat_map(|nd| nd.servers.iter().map(|s| s.name.as_str()))
                .collect();
            bail!(
                "server {n} is not defined on node {node}; known servers: {}",
                known.join(", ")
            );
        }
    }
    let all: Vec<Value> = match NodeAgent::connect(ctx, &rt, &profile) {
        Ok(na) => na
            .invoke(&rt, "status", vec![], Duration::from_secs(10))?
            .as_array()
            .cloned()
            .unwrap_or_default(),
        // The node agent answered and refused this caller: probing the servers with the same
        // credential would only show them all as stopped.
        Err(e) if e.downcast_ref::<AdminError>().is_some() => return Err(e),
        Err(_) => {
            let servers = cfg
                .node(&node)
                .map(|n| n.servers.clone())
                .unwrap_or_default();
            let endpoint = |port| {
                crate::ctx::endpoint(ctx, &profile, port)
                    .map_or_else(|e| e.to_string(), |a| a.to_string())
            };
            let mut all = Vec::new();
            for s in &servers {
                let client = ctx.client(&profile, s.admin_port)?.with_timeout_ms(1_000);
                all.push((s, rt.block_on(client.ping()).ok()));
            }
            all.into_iter()
                .map(|(s, ping)| {
                    let pid = ping.as_ref().and_then(|p| p.get("pid").cloned());
                    json!({
                        "name": s.name, "node": node,
                        "state": if ping.is_some() { "started" } else { "stopped" },
                        "pid": pid,
                        "endpoints": {"admin": endpoint(s.admin_port), "bus": endpoint(s.bus_port)},
                        "auto_restart": s.monitor.auto_restart,
                        "node_agent": "not running",
                    })
                })
                .collect()
        }
    };
    let selected: Vec<Value> = all
        .into_iter()
        .filter(|s| name.is_none_or(|n| s["name"] == n))
        .collect();
    if json_out {
        match name {
            Some(_) => print_json(selected.first().unwrap_or(&Value::Null)),
            None => print_json(&Value::Array(selected)),
        }
    } else {
        print_table(&selected);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn print_table(servers: &[Value]) {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header(vec![
        "SERVER",
        "STATE",
        "PID",
        "ADMIN",
        "BUS",
        "AUTO RESTART",
        "RESTARTS",
    ]);
    let show = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for s in servers {
        t.add_row(vec![
            show(&s["name"]),
            show(&s["state"]),
            show(&s["pid"]),
            show(&s["endpoints"]["admin"]),
            show(&s["endpoints"]["bus"]),
            show(&s["auto_restart"]),
            show(&s["restarts"]),
        ]);
    }
    println!("{t}");
}
