//! A node on its own host (DESIGN §11: the node's `host` is the address its processes bind
//! and advertise), in a network-namespace lab (`keel_testkit::netlab`): the node agent and its
//! server listen on 198.18.0.1 only, `keel` on that host reaches them over HTTPS (plain is for
//! loopback only), and from the lab's other host python-qpid-proton sends and receives over
//! amqps:// with the cell's CA while plain AMQP is refused.

mod common;

use std::path::Path;
use std::process::Command;

use keel_testkit::netlab::Lab;

const BASE_PORT: &str = "7270";

/// `keel` on host `i` of the lab.
fn keel(lab: &Lab, i: usize, profile: &Path, args: &[&str]) -> common::Run {
    let mut c = lab.cmd(i, common::keel_bin());
    c.arg("--profile").arg(profile).args(args);
    c.env_remove("KEEL_FAULTS").env_remove("KEEL_PROFILE");
    common::Run::of(c.output().unwrap())
}

fn ok(lab: &Lab, i: usize, profile: &Path, args: &[&str]) -> String {
    let r = keel(lab, i, profile, args);
    assert_eq!(
        r.code,
        0,
        "`keel {}` on host {i}: {}\n{}",
        args.join(" "),
        r.stderr,
        r.stdout
    );
    r.stdout
}

/// Stops what the test started on host 0, also when it fails (processes outlive a deleted
/// namespace otherwise).
struct Stop<'a>(&'a Lab, &'a Path);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        let _ = keel(self.0, 0, self.1, &["node", "stop", "--stop-servers"]);
    }
}

#[test]
fn a_node_listens_on_its_host_and_serves_other_hosts_over_tls_only() {
    let lab = Lab::new(2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("profile");
    let host = lab.addr(0);
    let r = common::Run::of(
        Command::new(common::keel_bin())
            .args(["profile", "create"])
            .arg(&profile)
            .args(["--base-port", BASE_PORT, "--host", &host])
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .contains(&format!("node agent admin {host}:{BASE_PORT}")),
        "{}",
        r.stdout
    );
    ok(
        &lab,
        0,
        &profile,
        &["destination", "create", "bus1", "q1", "--type", "queue"],
    );
    let _stop = Stop(&lab, &profile);
    ok(&lab, 0, &profile, &["node", "start"]);
    ok(&lab, 0, &profile, &["server", "start", "server1"]);
    let status: serde_json::Value = serde_json::from_str(&ok(
        &lab,
        0,
        &profile,
        &["server", "status", "server1", "--json"],
    ))
    .unwrap();
    let status = if status.is_array() {
        status[0].clone()
    } else {
        status
    };
    let bus = status["endpoints"]["bus"].as_str().unwrap().to_string();
    assert_eq!(bus, format!("{host}:7272"), "{status}");
    assert_eq!(status["admin_transport"], "mutual TLS", "{status}");

    // From the other host: amqps:// with the cell's CA works, plain amqp:// is refused.
    let password = std::fs::read_to_string(profile.join("secrets/admin-password")).unwrap();
    let ca = profile.join("secrets/tls/ca.pem");
    let script = format!("{}/tests/amqp_remote.py", env!("CARGO_MANIFEST_DIR"));
    let out = lab
        .cmd(1, "/usr/bin/python3")
        .arg(&script)
        .args([&host, "7272", password.trim(), "q1", ca.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} on host 1: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(found["round_trip"], 5, "{found}");
    let log = std::fs::read_to_string(profile.join("logs/server1/SystemOut.log")).unwrap();
    assert!(
        log.contains(&format!("listening on {host}:7272")),
        "CWSIT0001I names the host's address:\n{log}"
    );
    assert!(
        log.contains(&format!("from {}", lab.addr(1))) && log.contains("without TLS"),
        "the plain connection from host 1 was refused and logged:\n{log}"
    );
    ok(&lab, 0, &profile, &["node", "stop", "--stop-servers"]);
}
