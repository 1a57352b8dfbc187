//! The command line itself: usage errors exit 2 with one `keel: ...` line, failures exit 1,
//! closed option values are checked before a command runs, the spellings scripts use keep
//! working, and `--json` is there on the commands that report state. No process is started.

mod common;

use common::Env;

/// Runs a command that must be a usage error: exit 2, one `keel: ` line naming `needle`.
fn usage(env: &Env, args: &[&str], needle: &str) {
    let r = env.keel(args);
    assert_eq!(
        r.code,
        2,
        "`keel {}` should be a usage error (exit 2):\nstdout: {}\nstderr: {}",
        args.join(" "),
        r.stdout,
        r.stderr
    );
    assert!(
        r.stderr.starts_with("keel: ") && r.stderr.trim_end().lines().count() == 1,
        "one `keel: ...` line: {}",
        r.stderr
    );
    assert!(r.stderr.contains(needle), "{needle} in {}", r.stderr);
    assert!(
        r.stderr.contains("--help`"),
        "points at --help: {}",
        r.stderr
    );
}

#[test]
fn closed_values_are_usage_errors_and_failures_are_not() {
    let env = Env::new();
    usage(
        &env,
        &["destination", "create", "bus1", "q", "--type", "pipe"],
        "queue, topic",
    );
    usage(
        &env,
        &[
            "destination",
            "create",
            "bus1",
            "q",
            "--type",
            "queue",
            "--reliability",
            "sometimes",
        ],
        "assured_persistent",
    );
    usage(
        &env,
        &[
            "send",
            "q",
            "--server",
            "server1",
            "--reliability",
            "sometimes",
            "--body",
            "x",
        ],
        "best_effort",
    );
    usage(
        &env,
        &["me", "set-initial-state", "node01.server1-bus1", "maybe"],
        "started, stopped",
    );
    usage(
        &env,
        &[
            "server",
            "set-monitor-policy",
            "server1",
            "--auto-restart",
            "maybe",
        ],
        "true, false",
    );
    usage(
        &env,
        &[
            "datasource",
            "create",
            "d",
            "--kind",
            "oracle",
            "--url",
            "x",
        ],
        "postgres, mariadb",
    );
    usage(
        &env,
        &[
            "app", "create", "a", "--server", "server1", "--on", "q", "--kind", "magic",
        ],
        "forward, sql, script",
    );
    usage(
        &env,
        &["logs", "view", "--format", "xml"],
        "text, json, advanced",
    );
    usage(
        &env,
        &["logs", "view", "--json", "--format", "text"],
        "--format",
    );
    usage(&env, &["me", "state"], "usage: keel me state");
    usage(&env, &["destination", "frobnicate"], "frobnicate");
    // A command that parses but fails is exit 1, as before.
    let r = env.keel(&["me", "state", "ghost"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.starts_with("keel: "), "{}", r.stderr);
    // Help is not an error.
    let r = env.keel(&["destination", "delete", "--help"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("--force"), "{}", r.stdout);
}

#[test]
fn existing_spellings_still_parse() {
    let env = Env::new();
    // Each parses; it then fails for a reason of its own (exit 1), never as usage (exit 2).
    for args in [
        &[
            "logs",
            "view",
            "--server",
            "server1",
            "--min-level",
            "WARNING",
        ][..],
        &[
            "logs",
            "view",
            "--server",
            "server1",
            "--min-level",
            "warn",
            "--max-level",
            "info",
        ],
        &["logs", "view", "--server", "server1", "--format", "json"],
        &["logs", "view", "--server", "server1", "--json"],
        &[
            "send",
            "q",
            "--server",
            "server1",
            "--reliability",
            "assured_persistent",
            "--body",
            "x",
        ],
    ] {
        let r = env.keel(args);
        assert_eq!(r.code, 1, "`keel {}`: {}", args.join(" "), r.stderr);
    }
    // And these succeed (configuration only).
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
    env.ok(&["me", "set-initial-state", "node01.server1-bus1", "stopped"]);
    env.ok(&[
        "server",
        "set-monitor-policy",
        "server1",
        "--auto-restart",
        "false",
    ]);
}

#[test]
fn state_reporting_commands_take_json() {
    let env = Env::new();
    let v: serde_json::Value =
        serde_json::from_str(&env.ok(&["explain", "WSVR0001I", "--json"])).unwrap();
    assert_eq!(v["id"], "WSVR0001I");
    assert_eq!(v["severity"], "informational");
    assert!(
        v["action"].is_string() && v["explanation"].is_string(),
        "{v}"
    );
    // No process runs: the engine is stopped, said as JSON.
    let v: serde_json::Value =
        serde_json::from_str(&env.ok(&["me", "state", "node01.server1-bus1", "--json"])).unwrap();
    assert_eq!(v["me"], "node01.server1-bus1");
    assert_eq!(v["state"], "stopped");
    assert!(v["flush_waiting"].is_null(), "{v}");
}

#[test]
fn store_commands_report_json() {
    let env = Env::new();
    let me = "node01.server1-bus1";
    env.ok(&["destination", "create", "bus1", "q1", "--type", "queue"]);
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    env.ok(&["send", "q1", "--server", "server1", "--body", "m"]);
    let backup = env.dir().join("me.backup");
    let backup = backup.to_str().unwrap();
    let json =
        |args: &[&str]| -> serde_json::Value { serde_json::from_str(&env.ok(args)).unwrap() };
    let v = json(&["store", "backup", me, "--to", backup, "--json"]);
    assert_eq!(v["me"], me);
    assert_eq!(v["online"], true, "{v}");
    assert_eq!(v["manifest"]["messages"], 1, "{v}");
    let v = json(&["store", "verify", me, "--json"]);
    assert_eq!(v["ok"], true, "{v}");
    env.ok(&["node", "stop", "--stop-servers"]);
    let v = json(&["store", "restore", me, "--from", backup, "--json"]);
    assert_eq!(v["messages"], 1, "{v}");
    assert_eq!(v["restore_state"], "restored", "{v}");
}
