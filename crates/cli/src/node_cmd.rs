//! `keel node start|stop|status` and the hidden `keel node run` (the node agent process).

use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use keel_config::Profile;
use keel_core::layout::NODE_AGENT;
use serde_json::{json, Value};

use crate::ctx::{print_json, runtime, Ctx, NodeAgent};

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// Start the node agent in the background (or in the foreground with --foreground).
    Start {
        /// Run in this terminal, logging to it too, until Ctrl-C.
        #[arg(long)]
        foreground: bool,
    },
    /// Stop the node agent; servers keep running unless --stop-servers.
    Stop {
        /// Stop the node's servers first.
        #[arg(long)]
        stop_servers: bool,
    },
    /// Show the node agent and its servers.
    Status {
        /// One JSON object (the node agent's attributes, its servers included).
        #[arg(long)]
        json: bool,
    },
    /// The node agent process itself (used by `node start`).
    #[command(hide = true)]
    Run,
}

/// How long `node start` waits for the agent to answer.
const START_WAIT_MS: u64 = 15_000;

pub fn run(ctx: &Ctx, cmd: NodeCmd) -> Result<ExitCode> {
    match cmd {
        NodeCmd::Run => Ok(ExitCode::from(keel_node::run(keel_node::NodeOptions {
            profile: ctx.profile_dir().to_path_buf(),
            echo_stdout: false,
        }))),
        NodeCmd::Start { foreground: true } => {
            ctx.profile()?;
            Ok(ExitCode::from(keel_node::run(keel_node::NodeOptions {
                profile: ctx.profile_dir().to_path_buf(),
                echo_stdout: true,
            })))
        }
        NodeCmd::Start { foreground: false } => {
            let profile = ctx.profile()?;
            let (pid, port) = start_background(ctx, &profile)?;
            println!(
                "Node agent of node {} started (pid {pid}, admin {}).",
                profile.local_node()?,
                crate::ctx::endpoint(ctx, &profile, port)?
            );
            Ok(ExitCode::SUCCESS)
        }
        NodeCmd::Stop { stop_servers } => {
            let profile = ctx.profile()?;
            stop(ctx, &profile, stop_servers)?;
            Ok(ExitCode::SUCCESS)
        }
        NodeCmd::Status { json } => status(ctx, json),
    }
}

/// Spawns `keel node run` detached (own process group, output to logs/nodeagent/native_*.log)
/// and waits until it answers its admin ping. Returns (pid, admin port).
pub fn start_background(ctx: &Ctx, profile: &Profile) -> Result<(u32, u16)> {
    let rt = runtime()?;
    let node = profile.local_node()?;
    if let Ok(na) = NodeAgent::connect(ctx, &rt, profile) {
        let pid = rt
            .block_on(na.client.ping())
            .ok()
            .and_then(|v| v.get("pid").and_then(Value::as_u64))
            .unwrap_or(0);
        bail!("the node agent of node {node} is already running (pid {pid}); stop it with `keel --profile {} node stop`", ctx.profile_dir().display());
    }
    let layout = profile.layout();
    let logs = layout.logs(NODE_AGENT);
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let open = |name: &str| {
        let p = logs.join(name);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .with_context(|| format!("cannot open {}", p.display()))
    };
    let stderr = open("native_stderr.log")?;
    let stderr_offset = stderr.metadata().map(|m| m.len()).unwrap_or(0);
    let exe = std::env::current_exe().context("cannot find the keel executable")?;
    let mut child = std::process::Command::new(exe);
    std::os::unix::process::CommandExt::process_group(&mut child, 0);
    let mut child = child
        .arg("node")
        .arg("run")
        .arg("--profile")
        .arg(std::fs::canonicalize(profile.root()).unwrap_or_else(|_| profile.root().to_path_buf()))
        .stdin(Stdio::null())
        .stdout(open("native_stdout.log")?)
        .stderr(stderr)
        .spawn()
        .context("cannot launch the node agent")?;
    let deadline = Instant::now() + Duration::from_millis(START_WAIT_MS);
    loop {
        if let Some(status) = child.try_wait()? {
            let reason = keel_node::tail_reason(layout, NODE_AGENT, stderr_offset)
                .unwrap_or_else(|| format!("it ended ({status})"));
            bail!("the node agent of node {node} did not start: {reason}");
        }
        if let Ok(na) = NodeAgent::connect(ctx, &rt, profile) {
            return Ok((child.id(), na.client.addr().port()));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            bail!("the node agent of node {node} did not answer within {START_WAIT_MS} ms and was killed; see {}", layout.system_out(NODE_AGENT).display());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub fn stop(ctx: &Ctx, profile: &Profile, stop_servers: bool) -> Result<()> {
    let rt = runtime()?;
    let na = NodeAgent::connect(ctx, &rt, profile)?;
    let pid = rt
        .block_on(na.client.ping())?
        .get("pid")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let out = na.invoke(
        &rt,
        "stop",
        vec![json!({"stop_servers": stop_servers})],
        Duration::from_secs(120),
    )?;
    // The agent answers before it exits; wait for the process to be gone so a following
    // `node start` never races the old one for the port.
    let deadline = Instant::now() + Duration::from_secs(30);
    while pid != 0 && process_alive(pid as i32) {
        if Instant::now() >= deadline {
            bail!(
                "the node agent (pid {pid}) did not exit within 30 s of the stop request; see {}",
                profile.layout().system_out(NODE_AGENT).display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let stopped: Vec<String> = out
        .get("servers_stopped")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if stopped.is_empty() {
        println!("Node agent of node {} stopped.", na.node);
    } else {
        println!(
            "Node agent of node {} stopped, with servers {}.",
            na.node,
            stopped.join(", ")
        );
    }
    Ok(())
}

pub fn process_alive(pid: i32) -> bool {
    use nix::sys::wait::{waitpid, WaitPidFlag};
    // Reap it first if it happens to be our child (quickstart).
    let _ = waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
    u32::try_from(pid).is_ok_and(keel_node::process_alive)
}

fn status(ctx: &Ctx, json_out: bool) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    let rt = runtime()?;
    let na = NodeAgent::connect(ctx, &rt, &profile)?;
    let attrs = rt
        .block_on(na.client.attributes(&na.name))
        .map_err(|e| anyhow!(e))?;
    let v = Value::Object(attrs);
    if json_out {
        print_json(&v);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "Node agent of node {}: started (pid {}, admin {}), configuration version {} (master {})",
        na.node,
        v["pid"],
        na.client.addr(),
        v["config_version"],
        v["master_config_version"]
    );
    crate::server_cmd::print_table(v["servers"].as_array().map(Vec::as_slice).unwrap_or(&[]));
    Ok(ExitCode::SUCCESS)
}
