//! Node agent and server lifecycle with real processes: start, open, stop, crash and restart,
//! monitor policy, fault forwarding, recovery-mode refusal.

mod common;

use std::time::{Duration, Instant};

use common::{sigkill, Env};

#[test]
fn server_starts_opens_and_stops_normally() {
    let env = Env::new();
    let out = env.ok(&["node", "start"]);
    assert!(out.contains("Node agent of node node01 started"), "{out}");
    let out = env.ok(&["server", "start", "server1"]);
    assert!(out.contains("Server server1 started"), "{out}");

    let st = env.status("server1");
    assert_eq!(st["name"], "server1");
    assert_eq!(st["state"], "started");
    assert!(st["pid"].as_u64().unwrap() > 0);
    assert_eq!(
        st["endpoints"]["admin"],
        format!("127.0.0.1:{}", env.base_port + 1)
    );
    assert_eq!(
        st["endpoints"]["bus"],
        format!("127.0.0.1:{}", env.base_port + 2)
    );
    assert!(
        env.log("server1")
            .contains("WSVR0001I: Server server1 open for work"),
        "{}",
        env.log("server1")
    );
    assert!(
        env.log("nodeagent").contains("ADMN0001I"),
        "{}",
        env.log("nodeagent")
    );

    // A second start of a running server is refused and changes nothing.
    let err = env.fails(&["server", "start", "server1"]);
    assert!(err.contains("already started"), "{err}");
    assert_eq!(env.status("server1")["pid"], st["pid"]);

    env.ok(&["server", "stop", "server1"]);
    assert!(env
        .log("server1")
        .contains("WSVR0024I: Server server1 stopped."));
    assert_eq!(env.status("server1")["state"], "stopped");
    env.ok(&["node", "stop"]);
    assert!(env.log("nodeagent").contains("ADMN0002I"));
    // Status still answers without the node agent.
    assert_eq!(env.status("server1")["state"], "stopped");
}

#[test]
fn crashed_server_is_restarted_by_the_node_agent() {
    let env = Env::new();
    env.ok(&[
        "server",
        "set-monitor-policy",
        "server1",
        "--ping-interval-s",
        "1",
    ]);
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    let pid1 = env.status("server1")["pid"].as_u64().unwrap();
    let t0 = Instant::now();
    sigkill(pid1);
    // Goal: ping interval (1 s) plus a few seconds at most.
    let pid2 = env.wait_for(Duration::from_secs(6), "a restarted server1", || {
        let st = env.status("server1");
        let pid = st["pid"].as_u64();
        assert!(
            st["state"] != "started" || pid.is_some(),
            "a started server has a pid: {st}"
        );
        (st["state"] == "started" && pid != Some(pid1)).then(|| pid.unwrap())
    });
    eprintln!("restart after SIGKILL took {:?}", t0.elapsed());
    assert_ne!(pid1, pid2);
    let log = env.log("nodeagent");
    assert!(
        log.contains("ADMN0012W") && log.contains("ADMN0013I"),
        "{log}"
    );
    assert_eq!(env.status("server1")["restarts"], 1);
    env.ok(&["server", "stop", "server1"]);
    env.ok(&["node", "stop"]);
}

#[test]
fn crashed_server_stays_down_when_auto_restart_is_off() {
    let env = Env::new();
    env.ok(&[
        "server",
        "set-monitor-policy",
        "server1",
        "--auto-restart",
        "false",
        "--ping-interval-s",
        "1",
    ]);
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    let pid = env.status("server1")["pid"].as_u64().unwrap();
    sigkill(pid);
    env.wait_for(Duration::from_secs(5), "ADMN0014W", || {
        env.log("nodeagent").contains("ADMN0014W").then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let st = env.status("server1");
    assert_eq!(st["state"], "stopped", "{st}");
    assert!(!env.log("nodeagent").contains("ADMN0013I"));
    env.ok(&["node", "stop"]);
}

#[test]
fn server_start_without_node_agent_names_the_node_agent() {
    let env = Env::new();
    let err = env.fails(&["server", "start", "server1"]);
    assert!(
        err.contains("node agent") && err.contains("node start"),
        "{err}"
    );
}

#[test]
fn keel_faults_reach_only_the_requested_start() {
    let env = Env::new();
    env.ok(&[
        "server",
        "set-monitor-policy",
        "server1",
        "--ping-interval-s",
        "1",
    ]);
    env.ok(&["node", "start"]);
    // A fault point that fires before open makes that start fail, with the reason.
    let mut c = env.cmd(&["server", "start", "server1"]);
    c.env("KEEL_FAULTS", "server.before_open:crash");
    let out = c.output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.before_open"), "{err}");
    assert_eq!(
        env.status("server1")["state"],
        "stopped",
        "a failed operator start is not retried"
    );

    // Armed at start: crash instead of a clean stop. Kill the server: the automatic restart
    // must come without KEEL_FAULTS, so the following stop is clean (WSVR0024I).
    let mut c = env.cmd(&["server", "start", "server1"]);
    c.env("KEEL_FAULTS", "server.before_stop:crash");
    assert!(c.status().unwrap().success());
    let pid1 = env.status("server1")["pid"].as_u64().unwrap();
    sigkill(pid1);
    env.wait_for(Duration::from_secs(8), "restart", || {
        let st = env.status("server1");
        (st["state"] == "started" && st["pid"].as_u64() != Some(pid1)).then_some(())
    });
    assert!(!env.log("server1").contains("WSVR0024I"));
    env.ok(&["server", "stop", "server1"]);
    assert!(
        env.log("server1").contains("WSVR0024I"),
        "the restarted server must stop cleanly: {}",
        env.log("server1")
    );
    env.ok(&["node", "stop"]);
}

#[test]
fn recovery_start_without_recovery_logs_is_refused() {
    let env = Env::new();
    env.ok(&["node", "start"]);
    let err = env.fails(&["server", "start", "server1", "--recovery"]);
    assert!(err.contains("no recovery logs"), "{err}");
    assert!(env.log("server1").contains("WSVR0104E"));
    assert_eq!(env.status("server1")["state"], "stopped");
    env.ok(&["node", "stop"]);
}

#[test]
fn port_in_use_fails_the_start_with_one_sentence() {
    let env = Env::new();
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", env.base_port + 2)).unwrap();
    env.ok(&["node", "start"]);
    let err = env.fails(&["server", "start", "server1"]);
    assert!(
        err.contains(&format!("127.0.0.1:{}", env.base_port + 2)) && err.contains("bus_port"),
        "{err}"
    );
    assert_eq!(env.status("server1")["state"], "stopped");
    env.ok(&["node", "stop"]);
}

#[test]
fn node_agent_adopts_servers_left_running() {
    let env = Env::new();
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    let pid = env.status("server1")["pid"].clone();
    env.ok(&["node", "stop"]);
    // The server outlives its node agent and the next agent supervises it again.
    assert_eq!(env.status("server1")["state"], "started");
    env.ok(&["node", "start"]);
    let st = env.status("server1");
    assert_eq!(st["state"], "started");
    assert_eq!(st["pid"], pid);
    assert!(env.log("nodeagent").contains("ADMN0019I"));

    // An adopted server is not our child (no exit status): a crash is still a crash...
    let pid1 = pid.as_u64().unwrap();
    sigkill(pid1);
    let pid2 = env.wait_for(
        Duration::from_secs(8),
        "restart of the adopted server",
        || {
            let st = env.status("server1");
            (st["state"] == "started" && st["pid"].as_u64() != Some(pid1))
                .then(|| st["pid"].as_u64().unwrap())
        },
    );
    assert!(env.log("nodeagent").contains("ADMN0013I"));

    // ...and a clean stop through its own admin object is not restarted.
    env.ok(&["node", "stop"]);
    env.ok(&["node", "start"]);
    assert_eq!(env.status("server1")["pid"].as_u64(), Some(pid2));
    env.ok(&[
        "admin",
        "invoke",
        "Keel:type=Server,name=server1,node=node01,process=server1",
        "stop",
    ]);
    env.wait_for(Duration::from_secs(8), "the clean stop", || {
        (env.status("server1")["state"] == "stopped").then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(env.status("server1")["state"], "stopped");
    assert!(
        env.log("nodeagent")
            .contains("exited cleanly (adopted process)")
            || env
                .log("nodeagent")
                .contains("stopped by the server itself")
    );
    env.ok(&["node", "stop", "--stop-servers"]);
    assert_eq!(env.status("server1")["state"], "stopped");
}

#[test]
fn quickstart_runs_in_the_foreground_and_stops_cleanly_on_ctrl_c() {
    use std::io::{BufRead, BufReader};
    let env = Env::new();
    let mut child = env
        .cmd(&["quickstart"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("press Ctrl-C") {
            break;
        }
    }
    assert!(
        seen.contains("Keel is running")
            && seen.contains(&format!("127.0.0.1:{}", env.base_port + 1)),
        "{seen}"
    );
    let st = env.status("server1");
    assert_eq!(st["state"], "started");
    let pid = st["pid"].as_u64().unwrap();
    // Ctrl-C: the terminal sends SIGINT; quickstart stops what it started.
    let st = std::process::Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(st.success());
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    assert!(
        status.success(),
        "quickstart exited with {status}: {stderr}"
    );
    assert!(
        rest.iter().any(|l| l.contains("WSVR0001I")),
        "the logs are followed: {rest:?}"
    );
    assert!(rest.last().is_some_and(|l| l == "Stopped."), "{rest:?}");
    assert!(env.log("server1").contains("WSVR0024I"));
    assert!(env.log("nodeagent").contains("ADMN0002I"));
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z")
    );
}
