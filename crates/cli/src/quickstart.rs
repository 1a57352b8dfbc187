//! `keel quickstart`: the first command a new user runs. Creates ./keel-profile if absent,
//! starts the node agent and the first server, prints what runs where and what to try next,
//! follows the logs, and on Ctrl-C stops what it started (also when the node agent was stopped
//! from another shell meanwhile: the server is then stopped through its own admin endpoint).
//!
//! The commands it prints work as shown, pasted into another terminal: they name this very
//! binary by its absolute path (`std::env::current_exe`), or bare `keel` when that name on PATH
//! is this binary. Not `cargo run --bin keel --`: that works only inside the source tree, may
//! rebuild first, and is wrong for an installed binary; the path is right in every case.

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
use crate::server_cmd::stop_direct;

/// The queue a new quickstart profile gets.
const DEMO_QUEUE: &str = "orders";

pub fn run(ctx: &Ctx) -> Result<ExitCode> {
    let dir = ctx.profile_dir().to_path_buf();
    let profile = if dir.join("config").join("cell.toml").exists() {
        Profile::open(&dir)?
    } else {
        let p = Profile::create(&dir, &CreateOptions::default())?;
        keel_auth::ensure_users(&p)?;
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
    let p = shell_word(&root.display().to_string());
    let keel = keel_command();
    let queue = demo_queue(&cfg, &node, &server.name);
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
    let root_text = root.display();
    println!("  admin user admin, password in {root_text}/secrets/admin-password");
    println!(
        "  logs: {root_text}/logs/{}/SystemOut.log, {root_text}/logs/{NODE_AGENT}/SystemOut.log",
        server.name
    );
    println!();
    // Every line of this block is a shell command, run as shown (a test runs them).
    println!("Try, in another terminal:");
    println!("  export KEEL_PROFILE={p}");
    println!("  {keel} server status");
    println!("  {keel} admin query 'type=Server,*'");
    println!(
        "  {keel} admin -c 'AdminControl.invoke(AdminControl.queryNames(\"type=Server,*\").splitlines()[0], \"state\")'"
    );
    if let Some(q) = &queue {
        println!(
            "  {keel} send {q} --server {} --body hello --count 3",
            server.name
        );
        println!("  {keel} receive {q} --server {} --count 3", server.name);
    }
    println!("  {keel} destination list");
    println!("  {keel} explain WSVR0001I");
    println!();
    println!("Also:");
    println!("  {keel} admin                      # the interactive console");
    match &queue {
        Some(q) => println!(
            "  AMQP 1.0 clients: amqp://admin:<password>@127.0.0.1:{}, address {q}",
            server.bus_port
        ),
        None => println!(
            "  no queue on {}'s engine yet: `{keel} destination create BUS NAME --type queue`, then restart the server (servers read destinations when they start)",
            server.name
        ),
    }
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
    // The node agent may have been stopped (or replaced) from another shell meanwhile: ask
    // again rather than trust the connection made at start.
    let agent = NodeAgent::connect(ctx, &rt, &profile).ok();
    let mut failed = Vec::new();
    if started_server {
        let stopped = match &agent {
            Some(na) => na
                .invoke(
                    &rt,
                    "stopProcess",
                    vec![Value::from(server.name.as_str()), json!({"force": false})],
                    Duration::from_secs(60),
                )
                .map(|_| ()),
            None => {
                println!(
                    "The node agent is not running any more; stopping server {} through its own admin endpoint.",
                    server.name
                );
                stop_direct(ctx, &profile, &rt, &server.name, false).map(|pid| {
                    if pid.is_none() {
                        println!("Server {} was not running.", server.name);
                    }
                })
            }
        };
        if let Err(e) = stopped {
            failed.push(format!("server {}: {e:#}", server.name));
        }
    }
    if started_agent {
        match &agent {
            Some(_) => {
                if let Err(e) = crate::node_cmd::stop(ctx, &profile, false) {
                    failed.push(format!("node agent: {e:#}"));
                }
            }
            None => println!("The node agent of node {node} had already stopped."),
        }
    }
    for t in &mut tails {
        t.print_new();
    }
    if !failed.is_empty() {
        return Err(anyhow!(
            "quickstart could not stop everything it started ({}); `keel server status` shows what still runs, `keel server stop NAME --force` ends a server",
            failed.join("; ")
        ));
    }
    println!("Stopped.");
    Ok(ExitCode::SUCCESS)
}

/// How the printed commands name `keel`: bare when `keel` on PATH is this binary, else this
/// binary's absolute path (see the module comment).
fn keel_command() -> String {
    let Ok(exe) = std::env::current_exe().and_then(std::fs::canonicalize) else {
        return "keel".into();
    };
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .any(|dir| std::fs::canonicalize(dir.join("keel")).is_ok_and(|found| found == exe))
    });
    if on_path {
        "keel".into()
    } else {
        shell_word(&exe.display().to_string())
    }
}

/// `s` as one POSIX shell word: as is when it holds only safe characters, else single-quoted.
fn shell_word(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+:=@%,".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The queue the banner sends to: `orders` if the server's engine holds it, else the first
/// queue it holds, else none.
fn demo_queue(cfg: &keel_config::Config, node: &str, server: &str) -> Option<String> {
    let queues: Vec<&str> = cfg
        .mes_of_server(node, server)
        .into_iter()
        .flat_map(|(b, m)| {
            b.destinations
                .iter()
                .filter(move |d| d.me == m.me && d.kind == keel_config::DestinationKind::Queue)
                .map(|d| d.name.as_str())
        })
        .collect();
    queues
        .iter()
        .find(|q| **q == DEMO_QUEUE)
        .or(queues.first())
        .map(|q| q.to_string())
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

#[cfg(test)]
mod tests {
    #[test]
    fn shell_words_survive_the_shell() {
        assert_eq!(
            super::shell_word("/work/target/debug/keel"),
            "/work/target/debug/keel"
        );
        assert_eq!(super::shell_word("/my dir/keel"), "'/my dir/keel'");
        assert_eq!(super::shell_word("/it's/keel"), "'/it'\\''s/keel'");
        assert_eq!(super::shell_word(""), "''");
    }
}
