//! The first seed procedure (`shared/seeds/000_*`), as an operator runs it, with real
//! processes: messages flowing both ways between two servers' engines; store and
//! configuration backups; more traffic; the server of ME1 killed; its initial state set to
//! stopped; store and configuration restored; servers restarted; a FLUSH start from a console
//! script; `CWSIP0783E`; new traffic. The checker is DESIGN §5's oracle: every message produced
//! after the FLUSH start arrives exactly once, nothing acknowledged and still held by a
//! surviving engine is lost, and (the duplicate window covering the backup's age) nothing
//! resent from before the backup arrives twice.

mod common;
#[path = "common/numbers.rs"]
mod numbers;

use std::collections::BTreeMap;
use std::time::Duration;

use common::Env;
use numbers::{receive_every, send_numbers};

const ME1: &str = "node01.server1-bus1";
const ME2: &str = "node01.server2-bus1";

/// How often each number arrived.
#[derive(Default, Debug)]
struct Tally(BTreeMap<u64, u32>);

impl Tally {
    fn add(&mut self, got: Vec<u64>) {
        for n in got {
            *self.0.entry(n).or_default() += 1;
        }
    }

    /// Every number of `expected` exactly once, and nothing else.
    fn exactly_once(&self, what: &str, expected: impl Iterator<Item = u64>) {
        let want: Vec<u64> = expected.collect();
        let lost: Vec<u64> = want
            .iter()
            .copied()
            .filter(|n| !self.0.contains_key(n))
            .collect();
        let twice: Vec<(u64, u32)> = self
            .0
            .iter()
            .filter(|(_, c)| **c > 1)
            .map(|(n, c)| (*n, *c))
            .collect();
        let extra: Vec<u64> = self
            .0
            .keys()
            .copied()
            .filter(|n| !want.contains(n))
            .collect();
        assert!(
            lost.is_empty() && twice.is_empty() && extra.is_empty(),
            "{what}: lost {lost:?}, more than once {twice:?}, never sent {extra:?}"
        );
    }
}

struct Bus<'a> {
    env: &'a Env,
    rt: tokio::runtime::Runtime,
    password: String,
}

impl Bus<'_> {
    /// Sends `range` to `dest` through `server`; each message is accepted (durable).
    fn send(&self, server: &str, dest: &str, range: std::ops::Range<u64>) {
        let port = self.env.bus_port(server);
        send_numbers(&self.rt, port, &self.password, dest, range);
    }

    /// Receives from `dest` at `server` until `want` arrived (or 30 s passed), then for as
    /// long as anything else arrives.
    fn receive(&self, server: &str, dest: &str, want: usize) -> Vec<u64> {
        let port = self.env.bus_port(server);
        let limit = Duration::from_secs(30);
        receive_every(&self.rt, port, &self.password, dest, want, limit)
    }
}

#[test]
fn restore_and_flush_as_the_seed_procedure_runs_it() {
    let env = Env::new();
    let bus = two_engines(&env);
    // q1 is ME1's (fed from server2), q2 is ME2's (fed from server1).
    let (mut q1, mut q2) = (Tally::default(), Tally::default());

    // Messages flowing between the two servers.
    bus.send("server1", "q2", 0..50);
    bus.send("server2", "q1", 0..50);
    q2.add(bus.receive("server2", "q2", 50));
    q1.add(bus.receive("server1", "q1", 50));

    // Messages on ME1's transmission queue when the backup is taken: ME2 is down.
    env.ok(&["server", "stop", "server2"]);
    bus.send("server1", "q2", 50..100);

    // Store and configuration backups, taken together.
    let store_backup = env.dir().join("me1.backup");
    let config_backup = env.dir().join("config.keelcfg");
    env.ok(&[
        "store",
        "backup",
        ME1,
        "--to",
        store_backup.to_str().unwrap(),
    ]);
    env.ok(&["config", "backup", "--to", config_backup.to_str().unwrap()]);

    // More traffic: ME2 comes back and takes what waited; both directions flow.
    env.ok(&["server", "start", "server2"]);
    q2.add(bus.receive("server2", "q2", 50));
    bus.send("server1", "q2", 100..150);
    bus.send("server2", "q1", 50..100);
    q2.add(bus.receive("server2", "q2", 50));
    q1.add(bus.receive("server1", "q1", 50));

    // The failure: server1 is killed; the node agent restarts it.
    let pid = env.status("server1")["pid"].as_u64().unwrap();
    common::sigkill(pid);
    env.wait_restarted("server1", 1);

    // The procedure. Keep ME1 from starting with its server, and stop its server.
    env.ok(&["me", "set-initial-state", ME1, "stopped", "--sync"]);
    env.ok(&["server", "stop", "server1"]);
    // Meanwhile producers at server2 go on: ME2 holds these for ME1.
    bus.send("server2", "q1", 100..150);
    // Restore the data store and the configuration backed up with it.
    let out = env.ok(&[
        "store",
        "restore",
        ME1,
        "--from",
        store_backup.to_str().unwrap(),
    ]);
    assert!(out.contains("--flush"), "{out}");
    env.ok(&[
        "config",
        "restore",
        config_backup.to_str().unwrap(),
        "--sync",
    ]);
    // Restart the server: ME1 stays stopped (its store is restored; the restored config
    // says started, and the server says why it did not start it).
    env.ok(&["server", "start", "server1"]);
    assert_eq!(
        env.ok(&["me", "state", ME1]).lines().next(),
        Some("stopped")
    );
    assert!(env.log("server1").contains("CWSIP0106I"));

    // FLUSH start from a console script, as the seed writes it.
    let script = env.dir().join("flush.rhai");
    std::fs::write(
        &script,
        r#"let myME = AdminControl.queryNames("type=SIBMessagingEngine,*").splitlines()[0];
print(AdminControl.invoke(myME, "state"))
AdminControl.invoke(myME, "start", ["FLUSH"])
print(AdminControl.invoke(myME, "state"))
"#,
    )
    .unwrap();
    let out = env.ok(&["admin", "-f", script.to_str().unwrap()]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec!["stopped", "started"],
        "{out}"
    );
    env.wait_for(Duration::from_secs(30), "CWSIP0783E", || {
        env.log("server1")
            .contains(&format!(
            "CWSIP0783E: Messaging engine {ME1} started; flush of all delivery streams completed."
        ))
            .then_some(())
    });
    let info: serde_json::Value =
        serde_json::from_str(&env.ok(&["store", "info", ME1, "--json"])).unwrap();
    assert_eq!(info["restore_state"], "none");

    // New traffic, both ways.
    bus.send("server1", "q2", 200..300);
    bus.send("server2", "q1", 150..250);
    q2.add(bus.receive("server2", "q2", 100));
    q1.add(bus.receive("server1", "q1", 150));

    // The oracle. q2: the pre-backup messages 50..100 that ME1's restored store resent were
    // dropped by ME2's duplicate window; everything once. q1: what ME2 held while ME1 was down
    // arrived; everything once.
    q2.exactly_once("q2 (ME1 -> ME2)", (0..150).chain(200..300));
    q1.exactly_once("q1 (ME2 -> ME1)", 0..250);
    assert!(
        env.log("server2").contains("resent after a flush"),
        "the resent pre-backup messages reached ME2 and were recognised"
    );
    env.ok(&["node", "stop", "--stop-servers"]);
}

/// Two servers with q1 on ME1 and q2 on ME2, both started, with the node agent.
fn two_engines(env: &Env) -> Bus<'_> {
    env.add_second_member();
    for (q, me) in [("q1", ME1), ("q2", ME2)] {
        env.ok(&[
            "destination",
            "create",
            "bus1",
            q,
            "--type",
            "queue",
            "--me",
            me,
        ]);
    }
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    env.ok(&["server", "start", "server2"]);
    Bus {
        env,
        rt: tokio::runtime::Runtime::new().unwrap(),
        password: env.admin_password(),
    }
}

fn restore_state(env: &Env, me: &str) -> String {
    let info: serde_json::Value =
        serde_json::from_str(&env.ok(&["store", "info", me, "--json"])).unwrap();
    info["restore_state"].as_str().unwrap().to_string()
}

/// Stops `me`, restores `backup` into its store and starts it with FLUSH.
fn restore_and_flush(env: &Env, me: &str, backup: &std::path::Path) {
    env.ok(&["me", "stop", me]);
    env.ok(&["store", "restore", me, "--from", backup.to_str().unwrap()]);
    env.ok(&["me", "start", me, "--flush"]);
}

#[test]
fn a_flush_waits_for_a_peer_that_is_down_and_completes_when_it_returns() {
    let env = Env::new();
    let bus = two_engines(&env);
    bus.send("server1", "q2", 0..20);
    let mut q2 = Tally::default();
    q2.add(bus.receive("server2", "q2", 20));
    let backup = env.dir().join("me1.backup");
    env.ok(&["store", "backup", ME1, "--to", backup.to_str().unwrap()]);

    env.ok(&["server", "stop", "server2"]);
    restore_and_flush(&env, ME1, &backup);
    // Pending, and said so: by the state, the store and the log.
    let state = env.ok(&["me", "state", ME1]);
    assert_eq!(
        state.lines().collect::<Vec<_>>(),
        vec![
            "started",
            &format!("flush pending: waiting for {ME2} (outbound, inbound)")[..]
        ],
        "{state}"
    );
    assert_eq!(restore_state(&env, ME1), "flush-pending");
    assert!(env.log("server1").contains("CWSIP0109I"));
    assert!(!env.log("server1").contains("CWSIP0783E"));
    // The engine takes work meanwhile; messages for ME2 wait on the new stream.
    bus.send("server1", "q2", 20..40);
    // A restart of server1 continues the same flush (a normal start of a flush-pending store).
    env.ok(&["server", "stop", "server1"]);
    env.ok(&["server", "start", "server1"]);
    assert!(env.log("server1").contains("CWSIP0111I"));
    assert_eq!(
        env.ok(&["me", "state", ME1]).lines().next(),
        Some("started")
    );

    // The peer returns: the flush completes.
    env.ok(&["server", "start", "server2"]);
    env.wait_for(Duration::from_secs(30), "CWSIP0783E", || {
        env.log("server1").contains("CWSIP0783E").then_some(())
    });
    assert_eq!(env.ok(&["me", "state", ME1]).trim(), "started");
    assert_eq!(restore_state(&env, ME1), "none");
    q2.add(bus.receive("server2", "q2", 20));
    q2.exactly_once("q2", 0..40);
    env.ok(&["node", "stop", "--stop-servers"]);
}

#[test]
fn two_engines_restored_and_flushed_at_once() {
    let env = Env::new();
    let bus = two_engines(&env);
    let (mut q1, mut q2) = (Tally::default(), Tally::default());
    bus.send("server1", "q2", 0..30);
    bus.send("server2", "q1", 0..30);
    q2.add(bus.receive("server2", "q2", 30));
    q1.add(bus.receive("server1", "q1", 30));
    let (b1, b2) = (env.dir().join("me1.backup"), env.dir().join("me2.backup"));
    env.ok(&["store", "backup", ME1, "--to", b1.to_str().unwrap()]);
    env.ok(&["store", "backup", ME2, "--to", b2.to_str().unwrap()]);
    // Traffic after the backups, then both stores go back.
    bus.send("server1", "q2", 30..60);
    bus.send("server2", "q1", 30..60);
    q2.add(bus.receive("server2", "q2", 30));
    q1.add(bus.receive("server1", "q1", 30));
    restore_and_flush(&env, ME1, &b1);
    restore_and_flush(&env, ME2, &b2);
    for server in ["server1", "server2"] {
        env.wait_for(Duration::from_secs(30), "CWSIP0783E", || {
            env.log(server).contains("CWSIP0783E").then_some(())
        });
    }
    assert_eq!(restore_state(&env, ME1), "none");
    assert_eq!(restore_state(&env, ME2), "none");
    // Messages produced after the FLUSH starts: exactly once, both ways.
    bus.send("server1", "q2", 100..150);
    bus.send("server2", "q1", 100..150);
    q2.add(bus.receive("server2", "q2", 50));
    q1.add(bus.receive("server1", "q1", 50));
    q2.exactly_once("q2", (0..60).chain(100..150));
    q1.exactly_once("q1", (0..60).chain(100..150));
    env.ok(&["node", "stop", "--stop-servers"]);
}

/// A FLUSH interrupted by a crash at fault point `point` of `crashing` finishes after the node
/// agent restarts that server (a normal start continues a pending flush), and every message
/// arrives once: the pre-backup ones resent from ME1's restored transmission queue are dropped
/// by ME2's duplicate window.
fn a_flush_survives_a_crash_at(point: &str, crashing: &str) {
    let env = Env::new();
    let bus = two_engines(&env);
    env.ok(&["server", "stop", "server2"]);
    bus.send("server1", "q2", 0..40);
    let backup = env.dir().join("me1.backup");
    env.ok(&["store", "backup", ME1, "--to", backup.to_str().unwrap()]);
    env.ok(&["server", "start", "server2"]);
    let mut q2 = Tally::default();
    q2.add(bus.receive("server2", "q2", 40));

    env.ok(&["me", "stop", ME1]);
    env.ok(&["store", "restore", ME1, "--from", backup.to_str().unwrap()]);
    env.ok(&["server", "stop", crashing]);
    let mut c = env.cmd(&["server", "start", crashing]);
    c.env("KEEL_FAULTS", format!("{point}:crash"));
    assert!(c.status().unwrap().success());
    // The command may lose its server mid-way: the crash is the point.
    let _ = env.keel(&["me", "start", ME1, "--flush"]);
    env.wait_restarted(crashing, 1);
    env.wait_for(Duration::from_secs(60), "CWSIP0783E", || {
        env.log("server1").contains("CWSIP0783E").then_some(())
    });
    assert_eq!(restore_state(&env, ME1), "none");
    bus.send("server1", "q2", 40..80);
    q2.add(bus.receive("server2", "q2", 40));
    q2.exactly_once("q2", 0..80);
    env.ok(&["node", "stop", "--stop-servers"]);
}

#[test]
fn a_flush_survives_a_crash_right_after_it_began() {
    a_flush_survives_a_crash_at("bus.flush_after_begin", "server1");
}

#[test]
fn a_flush_survives_a_crash_after_a_confirmation() {
    a_flush_survives_a_crash_at("bus.flush_after_confirm", "server1");
}

#[test]
fn a_flush_survives_a_crash_of_the_peer_after_it_moved_its_stream() {
    a_flush_survives_a_crash_at("bus.source_after_flush", "server2");
}
