//! Test harness: a temporary profile on free ports, `keel` commands run as real processes, and
//! cleanup that kills every process the profile's pid files name (so a failed test leaks
//! nothing into the next one).

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub struct Env {
    _dir: tempfile::TempDir,
    pub profile: PathBuf,
    pub base_port: u16,
    _ports: PortClaim,
}

/// A port range claimed for one test process: tests run in parallel processes, and checking
/// that ports are free is not enough (two tests can check the same free range before either
/// binds it). The claim is a file created exclusively, holding the claimer's pid; it goes when
/// the claim drops, and a claim whose process is gone is taken over.
pub struct PortClaim {
    file: PathBuf,
}

impl PortClaim {
    fn take(base: u16) -> Option<PortClaim> {
        let dir = std::env::temp_dir().join("keel-test-ports");
        std::fs::create_dir_all(&dir).ok()?;
        let file = dir.join(base.to_string());
        for _attempt in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&file)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    f.write_all(std::process::id().to_string().as_bytes())
                        .ok()?;
                    return Some(PortClaim { file });
                }
                Err(_) => {
                    let holder: Option<u32> = std::fs::read_to_string(&file)
                        .ok()
                        .and_then(|t| t.trim().parse().ok());
                    // An empty file is a claim being written: leave it alone.
                    match holder {
                        Some(pid) if !Path::new(&format!("/proc/{pid}")).exists() => {
                            let _ = std::fs::remove_file(&file);
                        }
                        _ => return None,
                    }
                }
            }
        }
        None
    }
}

impl Drop for PortClaim {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn of(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into(),
            stderr: String::from_utf8_lossy(&o.stderr).into(),
        }
    }
}

pub fn keel_bin() -> &'static str {
    env!("CARGO_BIN_EXE_keel")
}

/// First port the kernel hands out for outgoing connections (32768 on Linux by default).
/// Test servers stay below it: a port chosen inside that range can be taken by any client
/// socket (the tests open thousands) between the check and the server's bind.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A base port with `count` free consecutive ports above it. Tests run in parallel processes,
/// so the start is spread by pid and time; each candidate range is checked by binding it.
pub fn free_base_port(count: u16) -> (u16, PortClaim) {
    // Ranges of 10 from 20000 up to the ephemeral range (or 3000 ranges where that is low).
    let slots = match ephemeral_low() {
        low if low > 21_000 => u64::from((low - 20_000) / 10 - 1),
        _ => 3_000,
    };
    let seed = (std::process::id() as u64).wrapping_mul(7919)
        ^ (Instant::now().elapsed().as_nanos() as u64)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
    for i in 0..500u64 {
        let base = 20_000 + ((seed.wrapping_add(i * 104_729)) % slots) as u16 * 10;
        let Some(claim) = PortClaim::take(base) else {
            continue;
        };
        let ok = (0..count).all(|p| TcpListener::bind(("127.0.0.1", base + p)).is_ok());
        if ok {
            return (base, claim);
        }
    }
    panic!("no free port range found");
}

impl Env {
    /// A fresh profile (not started).
    #[allow(clippy::new_without_default)]
    pub fn new() -> Env {
        Env::new_with(&[])
    }

    /// A fresh profile made with extra `profile create` options.
    pub fn new_with(extra: &[&str]) -> Env {
        Env::new_prepared(extra, |_| {})
    }

    /// A fresh profile made with extra `profile create` options; `prepare` gets the profile's
    /// path before it exists (a test mounts a small file system on its parent, the test's empty
    /// temporary directory).
    pub fn new_prepared(extra: &[&str], prepare: impl FnOnce(&Path)) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let profile = dir.path().join("profile");
        prepare(&profile);
        let (base_port, ports) = free_base_port(10);
        let env = Env {
            _dir: dir,
            profile,
            base_port,
            _ports: ports,
        };
        let port = base_port.to_string();
        let mut args = vec![
            "profile",
            "create",
            env.profile.to_str().unwrap(),
            "--base-port",
            &port,
        ];
        args.extend_from_slice(extra);
        let r = env.keel(&args);
        assert_eq!(r.code, 0, "profile create failed: {}", r.stderr);
        env
    }

    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(keel_bin());
        c.arg("--profile").arg(&self.profile).args(args);
        c.env_remove("KEEL_FAULTS").env_remove("KEEL_PROFILE");
        c
    }

    pub fn keel(&self, args: &[&str]) -> Run {
        Run::of(self.cmd(args).output().unwrap())
    }

    /// Runs a command that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.keel(args);
        assert_eq!(
            r.code,
            0,
            "`keel {}` failed:\nstdout: {}\nstderr: {}",
            args.join(" "),
            r.stdout,
            r.stderr
        );
        r.stdout
    }

    /// Runs a command that must fail with one sentence on stderr; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let r = self.keel(args);
        assert_ne!(
            r.code,
            0,
            "`keel {}` should have failed:\nstdout: {}",
            args.join(" "),
            r.stdout
        );
        assert!(
            r.stderr.starts_with("keel: "),
            "stderr should be one `keel: ...` sentence: {}",
            r.stderr
        );
        assert_eq!(
            r.stderr.trim_end().lines().count(),
            1,
            "stderr should be one line: {}",
            r.stderr
        );
        r.stderr
    }

    pub fn status(&self, server: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["server", "status", server, "--json"])).unwrap()
    }

    pub fn log(&self, process: &str) -> String {
        std::fs::read_to_string(
            self.profile
                .join("logs")
                .join(process)
                .join("SystemOut.log"),
        )
        .unwrap_or_default()
    }

    /// Polls `f` every 50 ms until it returns Some, or panics after `limit` with `what`.
    pub fn wait_for<T>(&self, limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {limit:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the node agent restarted `server` (its `restarts` count reached
    /// `restarts`) and the server is open again.
    pub fn wait_restarted(&self, server: &str, restarts: u64) {
        self.wait_for(Duration::from_secs(20), "the automatic restart", || {
            let st = self.status(server);
            (st["restarts"] == restarts && st["state"] == "started").then_some(())
        });
    }

    /// Creates server2 and makes it a member of bus1 (engine node01.server2-bus1).
    pub fn add_second_member(&self) {
        self.ok(&["server", "create", "server2"]);
        self.ok(&["bus", "add-member", "bus1", "--server", "server2"]);
    }

    /// The port of a started server's bus endpoint (AMQP and ME-to-ME links).
    pub fn bus_port(&self, server: &str) -> u16 {
        let bus = self.status(server)["endpoints"]["bus"]
            .as_str()
            .expect("a started server has a bus endpoint")
            .to_string();
        bus.rsplit(':').next().unwrap().parse().unwrap()
    }

    pub fn admin_password(&self) -> String {
        std::fs::read_to_string(self.profile.join("secrets/admin-password"))
            .unwrap()
            .trim()
            .to_string()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test shows what its processes said (the profile goes with the test).
            for process in ["node01", "server1", "server2"] {
                for file in ["SystemOut.log", "native_stderr.log"] {
                    let path = self.profile.join("logs").join(process).join(file);
                    if let Ok(text) = std::fs::read_to_string(&path) {
                        let tail: Vec<&str> = text.lines().rev().take(60).collect();
                        eprintln!("--- {process}/{file} (last {} lines)", tail.len());
                        for line in tail.into_iter().rev() {
                            eprintln!("{line}");
                        }
                    }
                }
            }
        }
        let run = self.profile.join("run");
        if let Ok(entries) = std::fs::read_dir(&run) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "pid") {
                    if let Some(pid) = std::fs::read_to_string(e.path())
                        .ok()
                        .and_then(|t| t.trim().parse::<i32>().ok())
                    {
                        // A stale pid file (a crashed process) may name a pid the kernel has
                        // given to another test's process by now (pid_max is 32768 here):
                        // kill only a process whose command line names this profile.
                        let cmdline =
                            std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                        if String::from_utf8_lossy(&cmdline)
                            .contains(self.profile.to_str().unwrap())
                        {
                            let _ = nix_kill(pid);
                        }
                    }
                }
            }
        }
    }
}

fn nix_kill(pid: i32) -> std::io::Result<()> {
    let st = Command::new("kill")
        .arg("-9")
        .arg(pid.to_string())
        .output()?;
    let _ = st;
    Ok(())
}

pub fn sigkill(pid: u64) {
    let st = Command::new("kill")
        .arg("-9")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(st.success(), "kill -9 {pid} failed");
}

/// Sends one raw HTTP request to 127.0.0.1:port and returns the status code.
pub fn http_status(port: u16, request: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"))
}

/// Resident memory of process `pid` in KiB.
pub fn rss_kib(pid: u64) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// The depth of queue `q1` of server1's engine on bus1, through the admin API.
pub fn q1_depth(env: &Env) -> u64 {
    env.ok(&[
        "admin",
        "invoke",
        "Keel:type=SIBQueuePoint,name=q1@node01.server1-bus1,bus=bus1,node=node01,process=server1",
        "depth",
    ])
    .trim()
    .parse()
    .unwrap()
}

/// Standard base64 (RFC 4648) of `s`, for hand-written HTTP Basic headers.
pub fn base64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &c)| acc | (u32::from(c) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
