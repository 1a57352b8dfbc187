//! `keel destination list|delete` with real processes: depths from the running engine, queues
//! a running server does not serve yet, a deletion refused while messages are there (or
//! cannot be counted), `--force` and where the messages of a forced deletion stay.

mod common;

use common::Env;

const ME: &str = "node01.server1-bus1";

fn list(env: &Env) -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(&env.ok(&["destination", "list", "--json"])).unwrap();
    v.as_array().unwrap().clone()
}

fn row<'a>(rows: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {rows:?}"))
}

#[test]
fn list_and_delete_without_a_running_server() {
    let env = Env::new();
    env.ok(&["destination", "create", "bus1", "q1", "--type", "queue"]);
    env.ok(&[
        "destination",
        "create",
        "bus1",
        "t1",
        "--type",
        "topic",
        "--reliability",
        "express",
    ]);
    let rows = list(&env);
    assert_eq!(rows.len(), 2, "{rows:?}");
    let q1 = row(&rows, "q1");
    assert_eq!(q1["bus"], "bus1");
    assert_eq!(q1["type"], "queue");
    assert_eq!(q1["me"], ME);
    assert_eq!(q1["reliability"], "assured_persistent");
    assert!(q1["depth"].is_null() && q1["served"].is_null(), "{q1}");
    assert_eq!(row(&rows, "t1")["reliability"], "express");
    let text = env.ok(&["destination", "list"]);
    assert!(
        text.contains("q1") && text.contains("the engine is not running"),
        "{text}"
    );

    // Never started: no data store, so nothing to lose.
    let out = env.ok(&["destination", "delete", "bus1", "q1"]);
    assert!(
        out.contains("Deleted queue q1") && out.contains("has no data store yet"),
        "{out}"
    );
    assert!(out.contains("No server of the bus is running"), "{out}");
    assert_eq!(list(&env).len(), 1);
    let err = env.fails(&["destination", "delete", "bus1", "q1"]);
    assert!(
        err.contains("no destination `q1`") && err.contains("t1"),
        "{err}"
    );
    let err = env.fails(&["destination", "delete", "nobus", "t1"]);
    assert!(err.contains("nobus"), "{err}");
}

#[test]
fn delete_counts_refuses_and_forces() {
    let env = Env::new();
    env.ok(&["destination", "create", "bus1", "q1", "--type", "queue"]);
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    env.ok(&[
        "send", "q1", "--server", "server1", "--body", "m", "--count", "2",
    ]);

    // Depth from the running engine.
    let q1 = row(&list(&env), "q1").clone();
    assert_eq!(q1["depth"], 2, "{q1}");
    assert_eq!(q1["served"], true, "{q1}");

    // Defined while the server runs: said, and listed as not served yet.
    let out = env.ok(&["destination", "create", "bus1", "q2", "--type", "queue"]);
    assert!(
        out.contains("server server1 is running") && out.contains("only when it restarts"),
        "{out}"
    );
    let q2 = row(&list(&env), "q2").clone();
    assert_eq!(q2["served"], false, "{q2}");
    assert!(q2["depth"].is_null(), "{q2}");
    let text = env.ok(&["destination", "list"]);
    assert!(text.contains("restart server1"), "{text}");

    // Messages there: refused, saying what --force does.
    let err = env.fails(&["destination", "delete", "bus1", "q1"]);
    assert!(
        err.contains("holds 2 message(s)")
            && err.contains("--force")
            && err.contains("stay in the data store"),
        "{err}"
    );
    // Not served by the running engine, whose store holds messages: cannot be counted.
    let err = env.fails(&["destination", "delete", "bus1", "q2"]);
    assert!(
        err.contains("cannot count") && err.contains("keel me stop") && err.contains("--force"),
        "{err}"
    );

    // Forced: deleted, the count and the restart said.
    let v: serde_json::Value = serde_json::from_str(&env.ok(&[
        "destination",
        "delete",
        "bus1",
        "q1",
        "--force",
        "--json",
    ]))
    .unwrap();
    assert_eq!(v["messages"], 2, "{v}");
    assert_eq!(v["forced"], true);
    assert_eq!(v["restart_needed"], true);
    assert_eq!(v["running_servers"], serde_json::json!(["server1"]));
    assert!(
        v["counted_by"].as_str().unwrap().contains("running engine"),
        "{v}"
    );

    // With the engine stopped, its store is opened and counted: q2 holds nothing.
    env.ok(&["me", "stop", ME]);
    let out = env.ok(&["destination", "delete", "bus1", "q2"]);
    assert!(
        out.contains("0 message(s): counted in the data store of"),
        "{out}"
    );
    assert!(
        out.contains("takes effect there only when it restarts"),
        "{out}"
    );

    // After the restart q1 is gone; its messages are still in the store, and come back with a
    // queue of the same name, as --force said.
    env.ok(&["server", "stop", "server1"]);
    env.ok(&["server", "start", "server1"]);
    let err = env.fails(&["send", "q1", "--server", "server1", "--body", "m"]);
    assert!(err.contains("q1"), "{err}");
    let info: serde_json::Value =
        serde_json::from_str(&env.ok(&["store", "info", ME, "--json"])).unwrap();
    assert_eq!(info["messages"], 2, "{info}");
    env.ok(&["destination", "create", "bus1", "q1", "--type", "queue"]);
    env.ok(&["server", "stop", "server1"]);
    env.ok(&["server", "start", "server1"]);
    let got = env.ok(&["receive", "q1", "--server", "server1", "--count", "5"]);
    assert_eq!(got.lines().collect::<Vec<_>>(), ["m", "m"], "{got}");
    env.ok(&["node", "stop", "--stop-servers"]);
}
