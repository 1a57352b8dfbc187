//! Messaging engine lifecycle and data store backup/restore with real processes: the
//! single-engine part of the restore procedure (the multi-engine stream flush is issue 4).

mod common;

use common::Env;

const ME: &str = "node01.server1-bus1";

fn store_info(env: &Env) -> serde_json::Value {
    serde_json::from_str(&env.ok(&["store", "info", ME, "--json"])).unwrap()
}

#[test]
fn restored_store_needs_a_flush_start_from_the_console() {
    let env = Env::new();
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    assert_eq!(env.ok(&["me", "state", ME]).trim(), "started");
    assert!(
        env.log("server1").contains("CWSIP0101I"),
        "{}",
        env.log("server1")
    );
    let list: serde_json::Value = serde_json::from_str(&env.ok(&["me", "list", "--json"])).unwrap();
    assert_eq!(list[0]["me"], ME);
    assert_eq!(list[0]["state"], "started");

    let info = store_info(&env);
    assert_eq!(info["me"], ME);
    assert_eq!(info["backend"], "sqlite");
    assert_eq!(info["restore_state"], "none");
    let config = std::fs::read_to_string(env.profile.join("config/buses/bus1.toml")).unwrap();
    assert!(
        config.contains(info["uuid"].as_str().unwrap()),
        "the store is stamped with the ME's uuid"
    );

    // Online backup while the engine runs.
    let backup = env.dir().join("me1.backup");
    env.ok(&["store", "backup", ME, "--to", backup.to_str().unwrap()]);
    assert!(backup.exists());
    assert!(env.log("server1").contains("CWSIP0107I"));

    // A restore under a running engine is refused.
    let err = env.fails(&["store", "restore", ME, "--from", backup.to_str().unwrap()]);
    assert!(err.contains("stop the engine first"), "{err}");

    // The procedure: stop, keep it from starting with its server, restore.
    env.ok(&["me", "stop", ME]);
    env.ok(&["me", "set-initial-state", ME, "stopped", "--sync"]);
    let out = env.ok(&["store", "restore", ME, "--from", backup.to_str().unwrap()]);
    assert!(out.contains("--flush"), "{out}");
    let restored = store_info(&env);
    assert_eq!(restored["restore_state"], "restored");
    let incarnation_before = restored["incarnation"].as_u64().unwrap();

    // A normal start of the restored engine is refused with a sentence naming FLUSH.
    let err = env.fails(&["me", "start", ME]);
    assert!(err.contains("--flush") && err.contains("restored"), "{err}");
    assert!(env.log("server1").contains("CWSIP0103E"));

    // Even if the initial state says started, the server opens with the engine stopped.
    env.ok(&["me", "set-initial-state", ME, "started", "--sync"]);
    env.ok(&["server", "stop", "server1"]);
    env.ok(&["server", "start", "server1"]);
    assert_eq!(env.ok(&["me", "state", ME]).trim(), "stopped");
    assert!(env.log("server1").contains("CWSIP0106I"));

    // The seed's console example, as written.
    let script = env.dir().join("flush.rhai");
    std::fs::write(
        &script,
        r#"let myME = AdminControl.queryNames("type=SIBMessagingEngine,*").splitlines()[0];
print(AdminControl.invoke(myME, "state"))            // "stopped"
AdminControl.invoke(myME, "start", ["FLUSH"])
print(AdminControl.invoke(myME, "state"))            // "started"
"#,
    )
    .unwrap();
    let out = env.ok(&["admin", "-f", script.to_str().unwrap()]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec!["stopped", "started"],
        "{out}"
    );
    assert!(env.log("server1").contains(&format!(
        "CWSIP0783E: Messaging engine {ME} started; flush of all delivery streams completed."
    )));
    let info = store_info(&env);
    assert_eq!(info["restore_state"], "none");
    assert_eq!(
        info["incarnation"].as_u64().map(|i| i > incarnation_before),
        Some(true),
        "a FLUSH start begins a new incarnation"
    );

    // Later starts are normal starts.
    env.ok(&["server", "stop", "server1"]);
    env.ok(&["server", "start", "server1"]);
    assert_eq!(env.ok(&["me", "state", ME]).trim(), "started");
    env.ok(&["node", "stop", "--stop-servers"]);
}

#[test]
fn a_backup_of_another_engine_is_refused_and_changes_nothing() {
    let env = Env::new();
    env.add_second_member();
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    env.ok(&["server", "start", "server2"]);
    let other = env.dir().join("me2.backup");
    env.ok(&[
        "store",
        "backup",
        "node01.server2-bus1",
        "--to",
        other.to_str().unwrap(),
    ]);
    env.ok(&["node", "stop", "--stop-servers"]);
    let store = env.profile.join(format!("databases/{ME}.sqlite"));
    let before = std::fs::read(&store).unwrap();
    let err = env.fails(&["store", "restore", ME, "--from", other.to_str().unwrap()]);
    assert!(
        err.contains("node01.server2-bus1") || err.contains("another"),
        "{err}"
    );
    assert_eq!(before, std::fs::read(&store).unwrap());
    assert_eq!(store_info(&env)["restore_state"], "none");
    // The full integrity check, and its finding on a damaged file.
    assert!(env.ok(&["store", "verify", ME]).contains("passed"));
    // An offline backup works with the server down.
    let offline = env.dir().join("me1.offline");
    env.ok(&["store", "backup", ME, "--to", offline.to_str().unwrap()]);
    assert!(offline.exists());
}

#[test]
fn destinations_are_defined_on_the_bus() {
    let env = Env::new();
    let out = env.ok(&["destination", "create", "bus1", "orders", "--type", "queue"]);
    assert!(out.contains(ME), "{out}");
    env.ok(&[
        "destination",
        "create",
        "bus1",
        "prices",
        "--type",
        "topic",
        "--reliability",
        "express",
    ]);
    let err = env.fails(&["destination", "create", "bus1", "orders", "--type", "queue"]);
    assert!(err.contains("orders"), "{err}");
    let err = env.fails(&["destination", "create", "nobus", "x", "--type", "queue"]);
    assert!(err.contains("nobus"), "{err}");
    let err = env.fails(&[
        "destination",
        "create",
        "bus1",
        "y",
        "--type",
        "queue",
        "--reliability",
        "sometimes",
    ]);
    assert!(err.contains("assured_persistent"), "{err}");
    let bus = std::fs::read_to_string(env.profile.join("config/buses/bus1.toml")).unwrap();
    assert!(bus.contains("orders") && bus.contains("prices"), "{bus}");
}

/// Receives everything on q1 of server1; returns the message IDs.
fn drain(env: &Env) -> Vec<String> {
    let out = env.ok(&[
        "receive", "q1", "--server", "server1", "--count", "100000", "--json",
    ]);
    out.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn send_and_receive_through_the_queue_point() {
    let env = Env::new();
    env.ok(&["destination", "create", "bus1", "q1", "--type", "queue"]);
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    let ids = env.ok(&[
        "send", "q1", "--server", "server1", "--count", "3", "--body", "hello",
    ]);
    assert_eq!(ids.lines().count(), 3);
    let q = env.ok(&["admin", "query", "type=SIBQueuePoint,*"]);
    assert!(q.contains(&format!("name=q1@{ME}")), "{q}");
    let depth = env.ok(&[
        "admin",
        "invoke",
        &format!("Keel:type=SIBQueuePoint,name=q1@{ME},bus=bus1,node=node01,process=server1"),
        "depth",
    ]);
    assert_eq!(depth.trim(), "3");
    let got = env.ok(&["receive", "q1", "--server", "server1", "--count", "10"]);
    assert_eq!(got.lines().collect::<Vec<_>>(), vec!["hello"; 3]);
    let err = env.fails(&["send", "nosuch", "--server", "server1", "--body", "x"]);
    assert!(err.contains("destination create"), "{err}");
    env.ok(&["node", "stop", "--stop-servers"]);
}

#[test]
fn sigkill_at_the_commit_point_loses_no_acknowledged_message() {
    let env = Env::new();
    env.ok(&["destination", "create", "bus1", "q1", "--type", "queue"]);
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    let acked: Vec<String> = env
        .ok(&[
            "send", "q1", "--server", "server1", "--count", "20", "--body", "before",
        ])
        .lines()
        .map(str::to_string)
        .collect();
    env.ok(&["server", "stop", "server1"]);
    // Armed for this start only: the next send crashes after its commit, before its answer.
    let mut c = env.cmd(&["server", "start", "server1"]);
    c.env("KEEL_FAULTS", "me.after_store_commit:crash");
    assert!(c.status().unwrap().success());
    let r = env.keel(&["send", "q1", "--server", "server1", "--body", "in-doubt"]);
    assert_ne!(r.code, 0, "the producer must not get an acknowledgement");
    // The node agent restarts the server (without the fault); every acknowledged message is
    // there exactly once, and the unacknowledged one at most once.
    env.wait_restarted("server1", 1);
    let got = drain(&env);
    for id in &acked {
        assert_eq!(
            got.iter().filter(|g| *g == id).count(),
            1,
            "acknowledged {id} must arrive exactly once"
        );
    }
    assert!(got.len() <= acked.len() + 1, "{got:?}");
    env.ok(&["node", "stop", "--stop-servers"]);
}

#[test]
fn sigkill_under_load_loses_no_acknowledged_message() {
    let env = Env::new();
    env.ok(&["destination", "create", "bus1", "q1", "--type", "queue"]);
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    let pid = env.status("server1")["pid"].as_u64().unwrap();
    // A producer that prints each acknowledged ID, killed under it mid-run.
    let producer = env
        .cmd(&[
            "send",
            "q1",
            "--server",
            "server1",
            "--count",
            "100000",
            "--body",
            "load",
            "--reliability",
            "assured_persistent",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    common::sigkill(pid);
    let out = producer.wait_with_output().unwrap();
    assert_ne!(
        out.status.code(),
        Some(0),
        "the producer sees the server die"
    );
    let acked: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert!(
        acked.len() > 10,
        "the producer should have sent for a while: {}",
        acked.len()
    );
    env.wait_for(std::time::Duration::from_secs(10), "restart", || {
        let st = env.status("server1");
        (st["state"] == "started" && st["pid"].as_u64() != Some(pid)).then_some(())
    });
    let got = drain(&env);
    let mut seen = std::collections::HashSet::new();
    for g in &got {
        assert!(seen.insert(g.clone()), "duplicate {g}");
    }
    for id in &acked {
        assert!(seen.contains(id), "acknowledged {id} was lost");
    }
    assert!(
        got.len() <= acked.len() + 1,
        "at most the one in-flight send is extra: {} vs {}",
        got.len(),
        acked.len()
    );
    env.ok(&["node", "stop", "--stop-servers"]);
}

#[test]
fn a_damaged_store_keeps_its_engine_stopped_with_a_clear_message() {
    let env = Env::new();
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    env.ok(&["server", "stop", "server1"]);
    // Garbage over the file's header: not a database any more.
    let store = env.profile.join(format!("databases/{ME}.sqlite"));
    let mut bytes = std::fs::read(&store).unwrap();
    bytes[..100].fill(0x5a);
    std::fs::write(&store, &bytes).unwrap();
    env.ok(&["server", "start", "server1"]);
    assert_eq!(
        env.ok(&["me", "state", ME]).trim(),
        "stopped",
        "the server opens, the engine stays stopped"
    );
    let log = env.log("server1");
    let line = log
        .lines()
        .find(|l| l.contains("CWSIP0105E"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains("restore"),
        "the message says what to do: {line}"
    );
    let err = env.fails(&["store", "verify", ME]);
    assert!(
        err.contains(store.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
    let err = env.fails(&["me", "start", ME]);
    assert!(err.contains("restore"), "{err}");
    env.ok(&["node", "stop", "--stop-servers"]);
}

#[test]
fn an_engine_can_keep_its_store_in_postgresql() {
    let Some(bin) = keel_testkit::pgtest::pg_bin() else {
        eprintln!("SKIPPED: no PostgreSQL binaries under /usr/lib/postgresql (scripts/test installs them)");
        return;
    };
    let cluster = keel_testkit::pgtest::Cluster::start(bin);
    let env = Env::new();
    let url = cluster.tcp_url();
    let out = env.ok(&["me", "set-store", ME, "--postgres", &url]);
    assert!(out.contains("schema keel_"), "{out}");
    let err = env.fails(&[
        "me",
        "set-store",
        ME,
        "--postgres",
        "postgresql://postgres:secret@127.0.0.1/postgres",
    ]);
    assert!(err.contains("password") && !err.contains("secret"), "{err}");
    env.ok(&["destination", "create", "bus1", "q1", "--type", "queue"]);
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    assert_eq!(
        env.ok(&["me", "state", ME]).trim(),
        "started",
        "{}",
        env.log("server1")
    );
    env.ok(&[
        "send",
        "q1",
        "--server",
        "server1",
        "--count",
        "5",
        "--body",
        "in-postgres",
    ]);
    env.ok(&["server", "stop", "server1"]);
    let info: serde_json::Value =
        serde_json::from_str(&env.ok(&["store", "info", ME, "--json"])).unwrap();
    assert_eq!(info["backend"], "postgresql");
    assert_eq!(info["messages"], 5);
    assert!(!info["path"].as_str().unwrap().contains("secret"));
    env.ok(&["server", "start", "server1"]);
    let got = env.ok(&["receive", "q1", "--server", "server1", "--count", "10"]);
    assert_eq!(got.lines().collect::<Vec<_>>(), vec!["in-postgres"; 5]);
    let err = env.fails(&[
        "store",
        "backup",
        ME,
        "--to",
        env.dir().join("x").to_str().unwrap(),
    ]);
    assert!(err.contains("pg_dump"), "{err}");
    env.ok(&["node", "stop", "--stop-servers"]);
}

/// A queue created while its server runs takes effect at the server's next start (live
/// creation comes later): until then `keel send` and `keel receive` say that a restart of the
/// server is needed, never to create the queue just created, whether or not the node's copy
/// of the configuration was synchronized; after the restart the queue works.
#[test]
fn a_queue_created_while_its_server_runs_asks_for_a_restart() {
    let env = Env::new();
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    env.ok(&["destination", "create", "bus1", "late", "--type", "queue"]);
    let says_restart = |err: &str| {
        assert!(
            err.contains("created after server server1 started")
                && err.contains("`keel server stop server1`, then `keel server start server1`")
                && !err.contains("create it"),
            "{err}"
        );
    };
    says_restart(&env.fails(&["send", "late", "--server", "server1", "--body", "x"]));
    // The node's copy has it now; the running server still does not.
    env.ok(&["config", "sync"]);
    says_restart(&env.fails(&["send", "late", "--server", "server1", "--body", "x"]));
    says_restart(&env.fails(&["receive", "late", "--server", "server1"]));
    env.ok(&["server", "stop", "server1"]);
    env.ok(&["server", "start", "server1"]);
    env.ok(&["send", "late", "--server", "server1", "--body", "x"]);
    assert_eq!(
        env.ok(&["receive", "late", "--server", "server1"]).trim(),
        "x"
    );
    env.ok(&["node", "stop", "--stop-servers"]);
}
