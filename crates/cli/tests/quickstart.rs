//! `keel quickstart` as a user runs it: the commands its banner prints work as shown, pasted
//! into another shell, and Ctrl-C stops what it started, also after the node agent was stopped
//! from another shell.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::Env;

/// A running `keel quickstart` and the lines it printed so far.
struct Quickstart {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Quickstart {
    /// Starts it on `env`'s profile and waits until it follows the logs.
    fn start(env: &Env) -> Quickstart {
        let mut child = env
            .cmd(&["quickstart"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut q = Quickstart {
            child,
            lines,
            seen: Vec::new(),
        };
        q.wait_line("Following the logs");
        q
    }

    fn wait_line(&mut self, needle: &str) {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(120)) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.seen.push(line);
                    if hit {
                        return;
                    }
                }
                Err(e) => panic!(
                    "no line with {needle:?} ({e}); so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Ctrl-C, then its exit status and everything it printed.
    fn interrupt(mut self) -> (i32, Vec<String>) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        let status = self.child.wait().unwrap();
        // The reader thread ends at EOF, after the last line.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(10)) {
            self.seen.push(line);
        }
        (status.code().unwrap_or(-1), self.seen)
    }

    /// The shell commands of the banner's "Try, in another terminal:" block.
    fn try_block(&self) -> Vec<String> {
        self.seen
            .iter()
            .skip_while(|l| !l.starts_with("Try, in another terminal:"))
            .skip(1)
            .take_while(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_string())
            .collect()
    }
}

fn pid_alive(pid: u64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn the_banner_commands_work_as_shown() {
    let env = Env::new();
    env.ok(&["destination", "create", "bus1", "orders", "--type", "queue"]);
    let q = Quickstart::start(&env);
    let block = q.try_block();
    let keel = std::fs::canonicalize(common::keel_bin()).unwrap();
    let keel = keel.to_str().unwrap();
    assert!(block.len() >= 6, "{block:?}");
    assert!(block[0].starts_with("export KEEL_PROFILE="), "{block:?}");
    // Not bare `keel`: this test's PATH has no keel on it.
    for cmd in &block[1..] {
        assert!(cmd.starts_with(&format!("{keel} ")), "{cmd}");
    }
    assert!(
        block.iter().any(|c| c.contains(" send orders ")),
        "{block:?}"
    );
    // Pasted into a shell elsewhere, as a user would (no KEEL_PROFILE of the test's own).
    let script = format!("set -e\ncd /\n{}\n", block.join("\n"));
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .env_remove("KEEL_PROFILE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the banner's commands failed:\n{script}\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| *l == "hello").count(),
        3,
        "received what was sent: {stdout}"
    );
    let (code, lines) = q.interrupt();
    assert_eq!(code, 0, "{lines:?}");
    assert!(lines.iter().any(|l| l == "Stopped."), "{lines:?}");
    assert_eq!(env.status("server1")["state"], "stopped");
}

#[test]
fn ctrl_c_stops_the_server_after_the_node_agent_was_stopped_elsewhere() {
    let env = Env::new();
    let q = Quickstart::start(&env);
    let pid = env.status("server1")["pid"].as_u64().unwrap();
    // Another shell stops the node agent; the server keeps running (DESIGN: node agent stop
    // leaves servers running).
    env.ok(&["node", "stop"]);
    assert!(pid_alive(pid), "server1 runs on without its node agent");
    let (code, lines) = q.interrupt();
    assert_eq!(code, 0, "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("through its own admin endpoint")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("had already stopped")),
        "{lines:?}"
    );
    assert!(!pid_alive(pid), "server1 (pid {pid}) was left running");
    assert!(
        env.log("server1").contains("WSVR0024I"),
        "an orderly stop: {}",
        env.log("server1")
    );
}
