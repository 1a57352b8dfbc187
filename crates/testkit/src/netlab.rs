//! A lab of hosts on one machine (DESIGN §11): network namespaces that the lab makes, each with
//! one interface joined by a veth pair to a bridge in a namespace of its own (the "switch"), and
//! an address from 198.18.0.0/15, the range reserved for such testing. Nothing is added to the
//! machine's own namespace, so no traffic can leave the lab. A partition is a host's link set
//! down at the switch; [`Lab::heal`] sets it up again. Everything is deleted when the lab is
//! dropped, also when a test panics; labs left by a killed test process are deleted by the
//! next [`Lab::new`] (their names carry the dead process's pid).
//!
//! Needs root and iproute2 (`ip netns`, veth, bridge), as CI has.

use std::process::{Command, Output};

/// First octets of every lab address: hosts are 198.18.0.1, .2, ... on a /24.
pub const SUBNET: &str = "198.18.0";
/// Most hosts in one lab.
pub const HOSTS_MAX: usize = 16;
const PREFIX: &str = "keel-lab";

/// One lab; dropped, it deletes its namespaces.
pub struct Lab {
    id: String,
    hosts: Vec<String>,
}

fn run(args: &[&str]) -> Result<Output, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| {
            format!(
                "`{}` could not run: {e} (the lab needs iproute2)",
                args.join(" ")
            )
        })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "`{}` failed: {} (the lab needs root to make network namespaces)",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes the namespaces of labs whose process is gone.
fn sweep_stale() {
    let Ok(out) = run(&["ip", "netns", "list"]) else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(&format!("{PREFIX}-")) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !pid_alive(p)) {
            let _ = run(&["ip", "netns", "delete", name]);
        }
    }
}

impl Lab {
    /// A lab of `hosts` hosts: host i (from 0) is namespace [`Lab::ns`]`(i)` with address
    /// [`Lab::addr`]`(i)` on its `eth0`, and loopback up.
    pub fn new(hosts: usize) -> Result<Lab, String> {
        assert!(
            (1..=HOSTS_MAX).contains(&hosts),
            "a lab has 1 to {HOSTS_MAX} hosts"
        );
        sweep_stale();
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{PREFIX}-{}-{n}", std::process::id());
        let mut lab = Lab {
            id: id.clone(),
            hosts: Vec::new(),
        };
        // From here on, Drop deletes whatever was made, also on an error.
        let switch = lab.switch();
        run(&["ip", "netns", "add", &switch])?;
        run(&["ip", "-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &switch, "link", "set", "br0", "up"])?;
        for i in 0..hosts {
            let ns = format!("{id}-h{i}");
            run(&["ip", "netns", "add", &ns])?;
            lab.hosts.push(ns.clone());
            // The pair is made in the host's namespace, then one end moves to the switch.
            let port = format!("p{i}");
            run(&[
                "ip", "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port,
            ])?;
            run(&["ip", "-n", &ns, "link", "set", &port, "netns", &switch])?;
            run(&["ip", "-n", &switch, "link", "set", &port, "master", "br0"])?;
            run(&["ip", "-n", &switch, "link", "set", &port, "up"])?;
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", lab.addr(i)),
                "dev",
                "eth0",
            ])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }

    fn switch(&self) -> String {
        format!("{}-sw", self.id)
    }

    /// The namespace of host `i`.
    pub fn ns(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    /// The address of host `i` (198.18.0.<i+1>).
    pub fn addr(&self, i: usize) -> String {
        format!("{SUBNET}.{}", i + 1)
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// A command that runs `program` on host `i` (`ip netns exec`).
    pub fn cmd(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.ns(i)]).arg(program);
        c
    }

    /// Runs test `test` of the running test binary on host `i`, with `env` set to 1 (a test
    /// that returns at once when `env` is unset), and panics with its output unless it passed
    /// and printed `passed`: a process's threads are all in one network namespace only if the
    /// process started there.
    pub fn run_child_test(&self, i: usize, test: &str, env: &str, passed: &str) {
        let exe = std::env::current_exe().expect("the test binary's path");
        let out = self
            .cmd(i, exe)
            .args(["--exact", test, "--nocapture"])
            .env(env, "1")
            .output()
            .expect("running the test binary in the lab");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(passed),
            "{test} on host {i} ({}) failed:\n{stdout}\n{}",
            self.ns(i),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Cuts host `i` off the others: its port on the switch goes down.
    pub fn partition(&self, i: usize) -> Result<(), String> {
        self.set_port(i, "down")
    }

    /// Joins host `i` again after [`Lab::partition`].
    pub fn heal(&self, i: usize) -> Result<(), String> {
        self.set_port(i, "up")
    }

    fn set_port(&self, i: usize, state: &str) -> Result<(), String> {
        let port = format!("p{i}");
        run(&["ip", "-n", &self.switch(), "link", "set", &port, state]).map(|_| ())
    }

    /// The namespaces this lab holds now (hosts and switch), as `ip netns list` shows them.
    pub fn namespaces(&self) -> Vec<String> {
        run(&["ip", "netns", "list"])
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter_map(|l| l.split_whitespace().next())
                    .filter(|n| n.starts_with(&format!("{}-", self.id)))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace deletes its interfaces, so the veth pairs and the bridge go too.
        for ns in self.hosts.iter().chain(std::iter::once(&self.switch())) {
            let _ = run(&["ip", "netns", "delete", ns]);
        }
    }
}
