//! The second seed procedure end to end (`../shared/seeds/004_*`): a server whose script
//! application moves each message into a row of PostgreSQL and of MariaDB (one global
//! transaction with the receive) crashes inside two-phase commit; the prepared branches hold
//! their locks (another session blocks); `keel server start server1 --recovery` finishes every
//! in-doubt transaction, releases the locks and exits by itself; outcomes are atomic across the
//! messaging engine, PostgreSQL and MariaDB; a message that waited on the queue is processed
//! exactly once at the next normal start.
//!
//! Real databases: a throwaway PostgreSQL cluster (`max_prepared_transactions`) and a throwaway
//! MariaDB server, both started here.

mod common;

use std::time::Duration;

use common::Env;
use keel_store::mariatest::Maria;
use keel_store::pgtest::Cluster;

const ME: &str = "node01.server1-bus1";

const SCRIPT: &str = r#"
// One message = one row in each database and one more on each counter, all or nothing.
fn on_message(msg) {
    sql("pg1", "INSERT INTO moved(id) VALUES ($1)", [msg.body]);
    sql("pg1", "UPDATE counters SET n = n + 1 WHERE name = 'moved'");
    sql("maria1", "INSERT INTO moved(id) VALUES (?)", [msg.body]);
    sql("maria1", "UPDATE counters SET n = n + 1 WHERE name = 'moved'");
}
"#;

struct Dbs {
    pg: Cluster,
    maria: Maria,
}

impl Dbs {
    fn start() -> Option<Dbs> {
        let Some(bin) = keel_store::pgtest::pg_bin() else {
            eprintln!("SKIPPED: no PostgreSQL binaries under /usr/lib/postgresql (scripts/test installs them)");
            return None;
        };
        if !keel_store::mariatest::available() {
            eprintln!("SKIPPED: no MariaDB server (scripts/test installs it)");
            return None;
        }
        let dbs = Dbs {
            pg: Cluster::start(bin),
            maria: Maria::start(),
        };
        dbs.pg_sql("CREATE TABLE moved(id text PRIMARY KEY); CREATE TABLE counters(name text PRIMARY KEY, n int NOT NULL); INSERT INTO counters VALUES ('moved', 0);")
            .unwrap();
        dbs.maria_sql("CREATE DATABASE keel; USE keel; CREATE TABLE moved(id varchar(64) PRIMARY KEY) ENGINE=InnoDB; CREATE TABLE counters(name varchar(64) PRIMARY KEY, n int NOT NULL) ENGINE=InnoDB; INSERT INTO counters VALUES ('moved', 0);")
            .unwrap();
        Some(dbs)
    }

    fn pg_sql(&self, sql: &str) -> Result<String, String> {
        let out = self.pg.psql().arg("-c").arg(sql).output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    fn maria_sql(&self, sql: &str) -> Result<String, String> {
        let out = self.maria.client().arg("-e").arg(sql).output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// (rows of `moved`, the counter, prepared transactions) in PostgreSQL.
    fn pg_state(&self) -> (String, String, String) {
        (
            self.pg_sql("SELECT string_agg(id, ',' ORDER BY id) FROM moved")
                .unwrap(),
            self.pg_sql("SELECT n FROM counters").unwrap(),
            self.pg_sql("SELECT count(*) FROM pg_prepared_xacts")
                .unwrap(),
        )
    }

    fn maria_state(&self) -> (String, String, String) {
        let xa = self.maria_sql("XA RECOVER").unwrap();
        (
            self.maria_sql("SELECT IFNULL(GROUP_CONCAT(id ORDER BY id), 'NULL') FROM keel.moved")
                .unwrap()
                .replace("NULL", ""),
            self.maria_sql("SELECT n FROM keel.counters").unwrap(),
            xa.lines()
                .filter(|l| !l.trim().is_empty())
                .count()
                .to_string(),
        )
    }

    /// Whether another session can lock the counter row in each database now.
    fn counter_locked(&self) -> (bool, bool) {
        let pg = self
            .pg_sql("BEGIN; SET LOCAL lock_timeout = '300ms'; SELECT n FROM counters WHERE name = 'moved' FOR UPDATE; COMMIT;");
        let maria = self.maria_sql("SET SESSION innodb_lock_wait_timeout = 1; BEGIN; SELECT n FROM keel.counters WHERE name = 'moved' FOR UPDATE; COMMIT;");
        if let Err(e) = &pg {
            assert!(e.contains("lock timeout"), "{e}");
        }
        if let Err(e) = &maria {
            assert!(e.contains("1205") || e.contains("Lock wait timeout"), "{e}");
        }
        (pg.is_err(), maria.is_err())
    }
}

fn store_messages(env: &Env) -> u64 {
    let info: serde_json::Value =
        serde_json::from_str(&env.ok(&["store", "info", ME, "--json"])).unwrap();
    info["messages"].as_u64().unwrap()
}

fn wait_stopped(env: &Env, server: &str) {
    env.wait_for(Duration::from_secs(60), "the server to exit", || {
        let st = env.status(server);
        (st["state"] == "stopped" || st["state"] == "failed").then_some(())
    });
}

/// The procedure with the server crashing at `point`; `committed`: whether the decision was
/// logged before the crash (so recovery commits the first message everywhere).
fn recovery_mode_finishes_a_crash_at(point: &str, committed: bool) {
    let Some(dbs) = Dbs::start() else { return };
    let env = Env::new();
    env.ok(&["destination", "create", "bus1", "in", "--type", "queue"]);
    env.ok(&[
        "datasource",
        "create",
        "pg1",
        "--kind",
        "postgres",
        "--url",
        &dbs.pg.tcp_url(),
    ]);
    env.ok(&[
        "datasource",
        "create",
        "maria1",
        "--kind",
        "mariadb",
        "--url",
        &dbs.maria.url("keel"),
    ]);
    // The seed's preparation: no automatic restart, so the operator chooses recovery mode.
    env.ok(&[
        "server",
        "set-monitor-policy",
        "server1",
        "--auto-restart",
        "false",
    ]);
    env.ok(&["node", "start"]);

    // Two messages wait on the queue before the application exists: the first is the one in
    // flight at the crash, the second must stay untouched until the next normal start.
    env.ok(&["server", "start", "server1"]);
    env.ok(&["send", "in", "--server", "server1", "--body", "m1"]);
    env.ok(&["send", "in", "--server", "server1", "--body", "m2"]);
    env.ok(&["server", "stop", "server1"]);
    let script = env.dir().join("mover.rhai");
    std::fs::write(&script, SCRIPT).unwrap();
    env.ok(&[
        "app",
        "create",
        "mover",
        "--server",
        "server1",
        "--on",
        "in",
        "--kind",
        "script",
        "--script",
        script.to_str().unwrap(),
        "--concurrency",
        "1",
    ]);

    // The crash, inside two-phase commit of m1's transaction.
    let before = env.log("server1").len();
    let mut c = env.cmd(&["server", "start", "server1"]);
    c.env("KEEL_FAULTS", format!("{point}:crash"));
    let _ = c.output().unwrap();
    wait_stopped(&env, "server1");
    let crashed_run = env.log("server1")[before..].to_string();
    assert!(
        crashed_run.contains("WTRN0009I") && !crashed_run.contains("WSVR0024I"),
        "the server crashed, it did not stop: {crashed_run}"
    );

    // In doubt: prepared branches at both databases, holding the counter row's lock.
    let (pg_rows, pg_n, pg_prepared) = dbs.pg_state();
    let (maria_rows, maria_n, maria_prepared) = dbs.maria_state();
    assert_eq!(
        (pg_rows.as_str(), pg_n.as_str()),
        ("", "0"),
        "nothing visible yet"
    );
    assert_eq!((maria_rows.as_str(), maria_n.as_str()), ("", "0"));
    assert_eq!(pg_prepared, "1", "PostgreSQL holds a prepared branch");
    assert_eq!(maria_prepared, "1", "MariaDB holds a prepared branch");
    assert_eq!(
        dbs.counter_locked(),
        (true, true),
        "another session blocks on the locked row"
    );

    // Recovery mode: resolves everything and exits by itself, taking no new work.
    let before = env.log("server1").len();
    let out = env.ok(&["server", "start", "server1", "--recovery"]);
    assert!(out.contains("recovery"), "{out}");
    wait_stopped(&env, "server1");
    let log = env.log("server1")[before..].to_string();
    assert!(log.contains("WSVR0103I"), "{log}");
    assert!(
        log.contains("WTRN0004I") && log.contains("WSVR0105I"),
        "{log}"
    );
    assert!(
        !log.contains("WTRN0009I"),
        "no application runs in recovery mode"
    );
    assert_eq!(
        dbs.counter_locked(),
        (false, false),
        "the locks are released"
    );

    let expect_rows = if committed { "m1" } else { "" };
    let expect_n = if committed { "1" } else { "0" };
    assert_eq!(
        dbs.pg_state(),
        (expect_rows.into(), expect_n.into(), "0".into()),
        "PostgreSQL"
    );
    assert_eq!(
        dbs.maria_state(),
        (expect_rows.into(), expect_n.into(), "0".into()),
        "MariaDB"
    );
    // The engine's branch went the same way: m1 is gone when committed, back when not; m2 was
    // never touched.
    assert_eq!(store_messages(&env), if committed { 1 } else { 2 });

    // A recovery-mode start now finds no logs: refused.
    let err = env.fails(&["server", "start", "server1", "--recovery"]);
    assert!(err.contains("no recovery logs"), "{err}");

    // Normal start: the waiting messages are processed, each exactly once.
    env.ok(&["server", "start", "server1"]);
    env.wait_for(Duration::from_secs(60), "both messages moved", || {
        (dbs.pg_state().1 == "2" && store_messages(&env) == 0).then_some(())
    });
    assert_eq!(dbs.pg_state(), ("m1,m2".into(), "2".into(), "0".into()));
    assert_eq!(dbs.maria_state(), ("m1,m2".into(), "2".into(), "0".into()));
    env.ok(&["node", "stop", "--stop-servers"]);
}

#[test]
fn recovery_mode_commits_after_a_crash_after_the_decision() {
    recovery_mode_finishes_a_crash_at("tx.after_decision", true);
}

#[test]
fn recovery_mode_rolls_back_after_a_crash_before_the_decision() {
    recovery_mode_finishes_a_crash_at("tx.after_prepare", false);
}

#[test]
fn recovery_mode_finishes_a_commit_cut_in_the_middle() {
    recovery_mode_finishes_a_crash_at("tx.mid_commit", true);
}
