//! `keel quickstart`: the first command a new user runs. Creates ./keel-profile if absent,
//! starts the node agent and the first server, prints what runs where and what to try next,
//! follows the logs, and on Ctrl-C stops what it started.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use keel_config::{CreateOptions, Profile};
use keel_core::layout::NODE_AGENT;
use serde_json::{json, Value};

use crate::ctx::{runtime, Ctx, NodeAgent};

/// The queue a new quickstart profile gets.
const DEMO_QUEUE: &str = "orders";

pub fn run(ctx: &Ctx) -> Result<ExitCode> {
    let dir = ctx.profile_dir().to_path_buf();
    let profile = if dir.join("config").join("cell.toml").exists() {
        Profile::open(&dir)?
    } else {
        let p = Profile::create(&dir, &CreateOptions::default())?;
        // Something to send to: a queue `orders` on the first bus.
        p.master().update(|c| {
            let Some(bus) = c.buses.first().map(|b| b.name.clone()) else {
                return Ok(());
            };
            if c.find_destination(&bus, DEMO_QUEUE).is_none() {
                c.add_destination(
                    &bus,
                    DEMO_QUEUE,
                    keel_config::DestinationKind::Queue,
                    None,
                    None,
                )?;
            }
            Ok(())
        })?;
        println!(
            "Created profile {} with queue {DEMO_QUEUE}",
            p.root().display()
        );
        p
    };
    let root =
        std::fs::canonicalize(profile.root()).unwrap_or_else(|_| profile.root().to_path_buf());
    let rt = runtime()?;
    let started_agent = match NodeAgent::connect(ctx, &rt, &profile) {
        Ok(_) => false,
        Err(_) => {
            crate::node_cmd::start_background(ctx, &profile)?;
            true
        }
    };
    let na = NodeAgent::connect(ctx, &rt, &profile)?;
    let (node, cfg) = ctx.config(&profile)?;
    let server = cfg
        .node(&node)
        .and_then(|n| n.servers.first())
        .ok_or_else(|| {
            anyhow!("node {node} has no server; create one with `keel server create server1`")
        })?
        .clone();
    let state = na.invoke(
        &rt,
        "serverStatus",
        vec![Value::from(server.name.as_str())],
        Duration::from_secs(10),
    )?;
    let started_server = state["state"] != "started";
    if started_server {
        na.invoke(
            &rt,
            "launchProcess",
            vec![Value::from(server.name.as_str())],
            Duration::from_secs(120),
        )?;
    }
    let p = root.display();
    println!();
    println!("Keel is running (profile {p})");
    println!(
        "  node agent {node}:   admin http://127.0.0.1:{}",
        cfg.node(&node).map(|n| n.admin_port).unwrap_or(0)
    );
    println!(
        "  server {}:     admin http://127.0.0.1:{}, bus 127.0.0.1:{}",
        server.name, server.admin_port, server.bus_port
    );
    println!("  admin user admin, password in {p}/secrets/admin-password");
    println!(
        "  logs: {p}/logs/{}/SystemOut.log, {p}/logs/{NODE_AGENT}/SystemOut.log",
        server.name
    );
    println!();
    println!("Try, in another terminal:");
    println!("  export KEEL_PROFILE={p}");
    println!("  keel server status");
    println!("  keel admin query 'type=Server,*'");
    println!("  keel admin -c 'AdminControl.invoke(AdminControl.queryNames(\"type=Server,*\").splitlines()[0], \"state\")'");
    println!(
        "  keel send {DEMO_QUEUE} --server {} --body hello --count 3",
        server.name
    );
    println!(
        "  keel receive {DEMO_QUEUE} --server {} --count 3",
        server.name
    );
    println!(
        "  AMQP 1.0 clients: amqp://admin:<password>@127.0.0.1:{}, address {DEMO_QUEUE}",
        server.bus_port
    );
    println!("  keel admin                       # interactive console");
    println!("  keel explain WSVR0001I");
    println!();
    println!("Following the logs; press Ctrl-C to stop.");

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [nix::sys::signal::SIGINT, nix::sys::signal::SIGTERM] {
        // Ctrl-C only raises a flag; the loop below does the orderly stop.
        let flag = stop.clone();
        let _ = rt.block_on(async move {
            let mut s =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(sig as i32))?;
            tokio::spawn(async move {
                s.recv().await;
                flag.store(true, Ordering::SeqCst);
            });
            Ok::<(), std::io::Error>(())
        });
    }
    let mut tails = vec![
        Tail::new(profile.layout().system_out(NODE_AGENT)),
        Tail::new(profile.layout().system_out(&server.name)),
    ];
    while !stop.load(Ordering::SeqCst) {
        for t in &mut tails {
            t.print_new();
        }
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(200)).await });
    }
    println!();
    println!("Stopping...");
    if started_server {
        let _ = na.invoke(
            &rt,
            "stopProcess",
            vec![Value::from(server.name.as_str()), json!({"force": false})],
            Duration::from_secs(60),
        );
    }
    if started_agent {
        crate::node_cmd::stop(ctx, &profile, false)?;
    }
    for t in &mut tails {
        t.print_new();
    }
    println!("Stopped.");
    Ok(ExitCode::SUCCESS)
}

/// Prints what a log file gains, from the position it had when the tail was made.
struct Tail {
    path: PathBuf,
    pos: u64,
}

impl Tail {
    fn new(path: PathBuf) -> Tail {
        // Start a little before the end so the start messages just written show up.
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        Tail {
            path,
            pos: len.saturating_sub(600),
        }
    }

    fn print_new(&mut self) {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.pos {
            self.pos = 0;
        }
        if len == self.pos || f.seek(SeekFrom::Start(self.pos)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        // Bounded read per poll; the rest comes on the next one.
        if f.take(1 << 20).read_to_end(&mut buf).is_err() {
            return;
        }
        let end = match buf.iter().rposition(|b| *b == b'\n') {
            Some(i) => i + 1,
            None => return,
        };
        let text = String::from_utf8_lossy(&buf[..end]);
        let skip_partial = self.pos > 0 && !text.is_empty();
        for (i, line) in text.lines().enumerate() {
            if i == 0 && skip_partial && !line.starts_with('[') {
                continue;
            }
            println!("{line}");
        }
        self.pos += end as u64;
    }
}
