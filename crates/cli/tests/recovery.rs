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
use keel_testkit::mariatest::Maria;
use keel_testkit::pgtest::Cluster;

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
        let Some(bin) = keel_testkit::pgtest::pg_bin() else {
            eprintln!("SKIPPED: no PostgreSQL binaries under /usr/lib/postgresql (scripts/test installs them)");
            return None;
        };
        if !keel_testkit::mariatest::available() {
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

/// A profile with queue `in`, data sources `pg1` and `maria1` on `dbs`, server1 without
/// automatic restart (the seed's preparation: the operator chooses recovery mode), and its node
/// agent started.
fn mover_profile(dbs: &Dbs) -> Env {
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
    env.ok(&[
        "server",
        "set-monitor-policy",
        "server1",
        "--auto-restart",
        "false",
    ]);
    env.ok(&["node", "start"]);
    env
}

/// Creates the script application `mover` on `in` with `script` and `concurrency` handlers.
fn create_mover(env: &Env, script: &str, concurrency: u32) {
    let file = env.dir().join("mover.rhai");
    std::fs::write(&file, script).unwrap();
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
        file.to_str().unwrap(),
        "--concurrency",
        &concurrency.to_string(),
    ]);
}

/// Starts server1 with `point` set to crash (the start command may lose its server).
fn start_crashing_at(env: &Env, point: &str) {
    let mut c = env.cmd(&["server", "start", "server1"]);
    c.env("KEEL_FAULTS", format!("{point}:crash"));
    let _ = c.output().unwrap();
}

/// Message m1 waits on `in`; the mover (`concurrency` handlers) is created and the server
/// crashes at `point` while it handles m1.
fn crash_with_m1_in_flight(env: &Env, concurrency: u32, point: &str) {
    env.ok(&["server", "start", "server1"]);
    env.ok(&["send", "in", "--server", "server1", "--body", "m1"]);
    env.ok(&["server", "stop", "server1"]);
    create_mover(env, SCRIPT, concurrency);
    start_crashing_at(env, point);
    wait_stopped(env, "server1");
}

/// The procedure with the server crashing at `point`; `committed`: whether the decision was
/// logged before the crash (so recovery commits the first message everywhere).
fn recovery_mode_finishes_a_crash_at(point: &str, committed: bool) {
    let Some(dbs) = Dbs::start() else { return };
    let env = mover_profile(&dbs);

    // Two messages wait on the queue before the application exists: the first is the one in
    // flight at the crash, the second must stay untouched until the next normal start.
    env.ok(&["server", "start", "server1"]);
    env.ok(&["send", "in", "--server", "server1", "--body", "m1"]);
    env.ok(&["send", "in", "--server", "server1", "--body", "m2"]);
    env.ok(&["server", "stop", "server1"]);
    create_mover(&env, SCRIPT, 1);

    // The crash, inside two-phase commit of m1's transaction.
    let before = env.log("server1").len();
    start_crashing_at(&env, point);
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
    // The words of a recovery-mode run are true: the engine is not started (its store is
    // open for recovery only, and no line says it started); the node agent does not call the
    // server open for work; WSVR0105I counts the one transaction, not its three branches.
    let line = |log: &str, id: &str| {
        log.lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("no {id} in {log}"))
            .to_string()
    };
    let me_line = line(&log, "CWSIP0108I");
    assert!(
        me_line.contains("not started") && me_line.contains("open for transaction recovery only"),
        "{me_line}"
    );
    assert!(
        !log.contains("CWSIP0101I") && !log.contains("CWSIP0100I"),
        "a recovery-mode engine is not said to start: {log}"
    );
    let done = line(&log, "WSVR0105I");
    assert!(
        done.contains("1 in-doubt transaction(s) resolved") && done.contains("branch(es)"),
        "{done}"
    );
    let agent = env.log("nodeagent");
    let launched = agent
        .lines()
        .rfind(|l| l.contains("ADMN0011I") && l.contains("server1"))
        .unwrap_or_else(|| panic!("no ADMN0011I for server1: {agent}"));
    assert!(
        launched.contains("recovery mode") && !launched.contains("open for work"),
        "{launched}"
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

fn receive_json(env: &Env, dest: &str, count: u32) -> Vec<serde_json::Value> {
    env.ok(&[
        "receive",
        dest,
        "--server",
        "server1",
        "--count",
        &count.to_string(),
        "--timeout-s",
        "30",
        "--json",
    ])
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect()
}

/// The three kinds at work, and bad input: a script that does not compile is refused at start
/// (the server still opens), a statement that fails rolls its transaction back every time
/// until the message lands on the exception destination, with nothing committed.
#[test]
fn applications_forward_run_statements_and_roll_back_failures() {
    let Some(dbs) = Dbs::start() else { return };
    let env = Env::new();
    for q in ["in", "out", "rows", "bad", "never", "locked"] {
        env.ok(&["destination", "create", "bus1", q, "--type", "queue"]);
    }
    env.ok(&[
        "datasource",
        "create",
        "pg1",
        "--kind",
        "postgres",
        "--url",
        &dbs.pg.tcp_url(),
    ]);
    let app = |name: &str, on: &str, kind: &str, extra: &[&str]| {
        let mut args = vec![
            "app", "create", name, "--server", "server1", "--on", on, "--kind", kind,
        ];
        args.extend_from_slice(extra);
        env.ok(&args);
    };
    app(
        "fwd",
        "in",
        "forward",
        &["--to", "out", "--concurrency", "3"],
    );
    app(
        "rows",
        "rows",
        "sql",
        &[
            "--datasource",
            "pg1",
            "--statement",
            "INSERT INTO moved(id) VALUES ({body} || '-' || {property.tag})",
        ],
    );
    app(
        "broken",
        "bad",
        "sql",
        &[
            "--datasource",
            "pg1",
            "--statement",
            "INSERT INTO missing_table VALUES ({body})",
        ],
    );
    app(
        "locker",
        "locked",
        "sql",
        &[
            "--datasource",
            "pg1",
            "--statement",
            "UPDATE counters SET n = n + 1 WHERE name = 'moved'",
            "--timeout-s",
            "1",
        ],
    );
    let script = env.dir().join("typo.rhai");
    std::fs::write(&script, "fn on_message(msg) { let x = ; }").unwrap();
    app(
        "typo",
        "never",
        "script",
        &["--script", script.to_str().unwrap()],
    );
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    let log = env.log("server1");
    assert!(
        log.contains("WTRN0010E") && log.contains("typo") && log.contains("does not compile"),
        "{log}"
    );

    env.ok(&[
        "send", "in", "--server", "server1", "--count", "20", "--body", "f",
    ]);
    let out = receive_json(&env, "out", 20);
    assert_eq!(out.len(), 20, "every forwarded message arrives");
    assert!(out.iter().all(|m| m["body"] == "f"));

    for i in 0..3 {
        let body = format!("r{i}");
        env.ok(&[
            "send",
            "rows",
            "--server",
            "server1",
            "--body",
            &body,
            "--property",
            "tag=x",
        ]);
    }
    env.wait_for(Duration::from_secs(30), "three rows", || {
        (dbs.pg_sql("SELECT count(*) FROM moved").unwrap() == "3").then_some(())
    });
    assert_eq!(
        dbs.pg_sql("SELECT string_agg(id, ',' ORDER BY id) FROM moved")
            .unwrap(),
        "r0-x,r1-x,r2-x"
    );

    env.ok(&["send", "bad", "--server", "server1", "--body", "doomed"]);
    let exc = keel_config::system_exception_destination(ME);
    let moved = receive_json(&env, &exc, 1);
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0]["body"], "doomed");
    let log = env.log("server1");
    assert!(
        log.contains("WTRN0008W") && log.contains("missing_table"),
        "{log}"
    );
    assert_eq!(dbs.pg_state().2, "0", "nothing left prepared");

    // Transaction timeout: another session holds the row the statement needs; every attempt
    // gives up after 1 s and rolls back, until the message lands on the exception destination.
    let mut holder = dbs
        .pg
        .psql()
        .arg("-c")
        .arg("BEGIN; SELECT n FROM counters WHERE name = 'moved' FOR UPDATE; SELECT pg_sleep(60); COMMIT;")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    env.wait_for(Duration::from_secs(10), "the lock to be held", || {
        (dbs.pg_sql("SELECT count(*) FROM pg_locks WHERE mode = 'RowShareLock'")
            .unwrap()
            != "0")
            .then_some(())
    });
    env.ok(&["send", "locked", "--server", "server1", "--body", "stuck"]);
    let moved = receive_json(&env, &exc, 1);
    assert_eq!(moved.len(), 1, "{}", env.log("server1"));
    assert_eq!(moved[0]["body"], "stuck");
    assert!(env.log("server1").contains("timed out after 1 s"));
    let _ = holder.kill();
    let _ = holder.wait();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(dbs.pg_state().1, "0", "no timed-out update committed");
    env.ok(&["node", "stop", "--stop-servers"]);
}

/// Runs of the server under concurrent load (4 handlers, messages arriving while it runs), each
/// ended by a crash at a rotating fault point or by SIGKILL at a random moment, then recovered
/// by a `--recovery` start or by a normal start; after each run, an atomicity check: the same
/// messages in both databases, counters equal to the rows, nothing prepared after a
/// recovery-mode run (a run left for the next normal start is checked only when nothing is in
/// doubt: until recovery, a cut transaction may be committed in one database only); at the end
/// every acknowledged message processed exactly once or (after repeated rollbacks) on the
/// exception destination, never both. `KEEL_APP_TORTURE_RUNS`
/// (default 6) sets the number of runs.
#[test]
fn crash_torture_of_applications_leaves_every_message_atomic_and_once() {
    let Some(dbs) = Dbs::start() else { return };
    let runs: u64 = std::env::var("KEEL_APP_TORTURE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let env = mover_profile(&dbs);
    // Acknowledged message IDs (a send cut by a crash acknowledges only what it printed).
    let mut acked: Vec<String> = Vec::new();
    let mut send = |n: u32| {
        let r = env.keel(&[
            "send",
            "in",
            "--server",
            "server1",
            "--count",
            &n.to_string(),
            "--body",
            "x",
        ]);
        acked.extend(
            r.stdout
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_string),
        );
    };
    env.ok(&["server", "start", "server1"]);
    send(100);
    env.ok(&["server", "stop", "server1"]);
    create_mover(&env, &SCRIPT.replace("msg.body", "msg.id"), 4);

    let points = [
        "tx.after_prepare",
        "tx.after_decision",
        "tx.mid_commit",
        "me.after_store_commit",
    ];
    let mut seed = std::process::id() as u64 ^ keel_core::unix_ms();
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let nothing_in_doubt = || dbs.pg_state().2 == "0" && dbs.maria_state().2 == "0";
    let mut in_doubt_left = 0;
    let check_atomic = |after: &str| {
        let (pg_rows, pg_n, _) = dbs.pg_state();
        let (maria_rows, maria_n, _) = dbs.maria_state();
        assert_eq!(
            pg_rows, maria_rows,
            "same messages in both databases ({after})"
        );
        let rows = pg_rows
            .split(',')
            .filter(|s| !s.is_empty())
            .count()
            .to_string();
        assert_eq!(
            (pg_n.as_str(), maria_n.as_str()),
            (rows.as_str(), rows.as_str()),
            "counters match rows ({after})"
        );
    };
    for run in 0..runs {
        let what = if run % 2 == 0 {
            let p = points[(run / 2) as usize % points.len()];
            start_crashing_at(&env, p);
            // New work keeps the fault point in reach whatever is left on the queue.
            send(20);
            p.to_string()
        } else {
            env.ok(&["server", "start", "server1"]);
            let pid = env.status("server1")["pid"].as_u64().unwrap();
            send(20);
            let wait_ms = next() % 400;
            std::thread::sleep(Duration::from_millis(wait_ms));
            common::sigkill(pid);
            format!("SIGKILL after {wait_ms} ms")
        };
        wait_stopped(&env, "server1");
        if run % 3 != 2 {
            env.ok(&["server", "start", "server1", "--recovery"]);
            wait_stopped(&env, "server1");
            let (_, _, pg_prepared) = dbs.pg_state();
            let (_, _, maria_prepared) = dbs.maria_state();
            assert_eq!(
                (pg_prepared.as_str(), maria_prepared.as_str()),
                ("0", "0"),
                "nothing prepared after recovery ({what})"
            );
            check_atomic(&what);
        } else if nothing_in_doubt() {
            check_atomic(&what);
        } else {
            // No recovery ran: a transaction cut between its commits is still prepared in one
            // database and committed in the other, as two-phase commit allows until recovery
            // (the next start's) finishes it. The next runs and the end check it.
            in_doubt_left += 1;
        }
    }
    // A clean finish: everything left is processed.
    env.ok(&["server", "start", "server1"]);
    let queue =
        format!("Keel:type=SIBQueuePoint,name=in@{ME},bus=bus1,node=node01,process=server1");
    env.wait_for(Duration::from_secs(120), "the queue to drain", || {
        let depth = env.ok(&["admin", "invoke", &queue, "depth"]);
        (depth.trim() == "0").then_some(())
    });
    // The start's recovery may still be committing the other branches of the last message.
    env.wait_for(Duration::from_secs(60), "nothing in doubt", || {
        nothing_in_doubt().then_some(())
    });
    check_atomic("the end");
    let exc = keel_config::system_exception_destination(ME);
    let failed: Vec<String> = receive_json(&env, &exc, 10_000)
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    let rows = dbs.pg_state().0;
    let processed: std::collections::HashSet<&str> =
        rows.split(',').filter(|s| !s.is_empty()).collect();
    for id in &failed {
        assert!(
            !processed.contains(id.as_str()),
            "message {id} both processed and on the exception destination"
        );
    }
    for id in &acked {
        assert!(
            processed.contains(id.as_str()) || failed.contains(id),
            "acknowledged message {id} was lost"
        );
    }
    // Nothing left in the engine's store either (no branch of it still prepared).
    assert_eq!(
        store_messages(&env),
        0,
        "the engine's store holds nothing more"
    );
    eprintln!(
        "{runs} runs: {} acknowledged, {} processed, {} on the exception destination; \
         {in_doubt_left} run(s) left a transaction in doubt for the next start",
        acked.len(),
        processed.len(),
        failed.len()
    );
    env.ok(&["node", "stop", "--stop-servers"]);
}

/// `keel tx list` when only `resource` does not answer: not "No transaction in doubt.", a
/// failure naming it, and `--json` listing it as unknown. Returns the sentence and the JSON.
fn tx_list_unknown_for(env: &Env, resource: &str) -> (String, serde_json::Value) {
    let r = env.keel(&["tx", "list"]);
    assert_ne!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        !r.stdout.contains("No transaction in doubt."),
        "{}",
        r.stdout
    );
    assert!(
        r.stderr.contains(&format!("unknown for {resource}")),
        "{}",
        r.stderr
    );
    let j = env.keel(&["tx", "list", "--server", "server1", "--json"]);
    assert_ne!(j.code, 0, "{}{}", j.stdout, j.stderr);
    let listing: serde_json::Value = serde_json::from_str(&j.stdout).unwrap();
    assert_eq!(
        listing["unknown"],
        serde_json::json!([resource]),
        "{listing}"
    );
    (r.stderr, listing)
}

/// Creates PostgreSQL data source `down` on a port nothing listens on (bound and released at
/// once); returns what the command printed.
fn create_unreachable_datasource(env: &Env) -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgresql://keel@127.0.0.1:{port}/db");
    let r = create_pg_datasource(env, "down", &url);
    assert_eq!(r.code, 0, "{}", r.stderr);
    r.stdout
}

/// `keel datasource create NAME --kind postgres --url URL`.
fn create_pg_datasource(env: &Env, name: &str, url: &str) -> common::Run {
    env.keel(&[
        "datasource",
        "create",
        name,
        "--kind",
        "postgres",
        "--url",
        url,
    ])
}

/// Creates sql application `name` of server1 on queue `on`, running `statement` on
/// `datasource`.
fn create_sql_app(env: &Env, name: &str, on: &str, datasource: &str, statement: &str) {
    env.ok(&[
        "app",
        "create",
        name,
        "--server",
        "server1",
        "--on",
        on,
        "--kind",
        "sql",
        "--datasource",
        datasource,
        "--statement",
        statement,
    ]);
}

/// With application `app` deleted and server1 restarted, the one message on `queue` is `body`,
/// released unchanged: no failed delivery was counted while it waited.
fn waits_unchanged_for_the_next_start(env: &Env, app: &str, queue: &str, body: &str) {
    env.ok(&["app", "delete", app]);
    env.ok(&["server", "stop", "server1"]);
    env.ok(&["server", "start", "server1"]);
    let waiting = receive_json(env, queue, 1);
    assert_eq!(waiting.len(), 1);
    assert_eq!(
        (
            waiting[0]["body"].as_str(),
            waiting[0]["delivery_count"].as_u64()
        ),
        (Some(body), Some(0)),
        "released unchanged, never counted"
    );
}

/// A handler that runs past its transaction timeout rolls back (a looping script is stopped),
/// and a data source that cannot be reached releases the message unchanged instead of counting
/// failures: a database restart does not drain a queue onto the exception destination.
#[test]
fn applications_time_out_and_wait_for_unreachable_data_sources() {
    let env = Env::new();
    for q in ["spin", "db"] {
        env.ok(&["destination", "create", "bus1", q, "--type", "queue"]);
    }
    create_unreachable_datasource(&env);
    let spin = env.dir().join("spin.rhai");
    std::fs::write(&spin, "fn on_message(msg) { let n = 0; loop { n += 1; } }").unwrap();
    env.ok(&[
        "app",
        "create",
        "spinner",
        "--server",
        "server1",
        "--on",
        "spin",
        "--kind",
        "script",
        "--script",
        spin.to_str().unwrap(),
        "--timeout-s",
        "1",
    ]);
    create_sql_app(
        &env,
        "writer",
        "db",
        "down",
        "INSERT INTO t VALUES ({body})",
    );
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    env.ok(&["send", "spin", "--server", "server1", "--body", "forever"]);
    env.ok(&["send", "db", "--server", "server1", "--body", "patient"]);

    // The spinning message is stopped at each attempt and ends on the exception destination.
    let exc = keel_config::system_exception_destination(ME);
    let moved = receive_json(&env, &exc, 1);
    assert_eq!(moved.len(), 1, "{}", env.log("server1"));
    assert_eq!(moved[0]["body"], "forever");
    // Whichever stops it first: the timeout or the script's operation limit.
    let log = env.log("server1");
    assert!(
        log.contains("timed out after 1 s") || log.contains("Too many operations"),
        "{log}"
    );

    // The unreachable database: tried, released unchanged, tried again after a back-off.
    env.wait_for(Duration::from_secs(30), "two attempts", || {
        (env.log("server1")
            .matches("WTRN0008W: Application writer")
            .count()
            >= 2)
            .then_some(())
    });
    waits_unchanged_for_the_next_start(&env, "writer", "db", "patient");
    env.ok(&["node", "stop", "--stop-servers"]);
}

/// A decision that names a data source removed from the configuration keeps a recovery-mode
/// server waiting (WTRN0005W); `keel tx list` shows the transaction, `keel tx commit` resolves
/// it by hand at every resource still configured, and the server then completes and exits.
#[test]
fn an_operator_resolves_what_recovery_cannot_reach() {
    let Some(dbs) = Dbs::start() else { return };
    let env = mover_profile(&dbs);
    crash_with_m1_in_flight(&env, 4, "tx.after_decision");

    // The operator removes MariaDB from the configuration (the wrong thing to do, but done).
    env.ok(&["app", "delete", "mover"]);
    env.ok(&["datasource", "delete", "maria1"]);
    // `server start --recovery` waits until the server stopped: it runs beside the operator.
    let starter = env
        .cmd(&["server", "start", "server1", "--recovery"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The engine's store opens just after the transaction service starts (WTRN0005W): ask
    // once both happened in this run, or the engine's answer is "still opening".
    env.wait_for(Duration::from_secs(30), "WTRN0005W and CWSIP0108I", || {
        let log = env.log("server1");
        let run = &log[log.rfind("starting in recovery mode")?..];
        (run.contains("WTRN0005W") && run.contains("CWSIP0108I")).then_some(())
    });
    let listing: serde_json::Value =
        serde_json::from_str(&env.ok(&["tx", "list", "--server", "server1", "--json"])).unwrap();
    assert_eq!(listing["unknown"], serde_json::json!([]), "{listing}");
    let list = listing["transactions"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["state"], "committing");
    let xid = list[0]["xid"].as_str().unwrap().to_string();
    assert!(
        list[0]["branches"].to_string().contains("maria1"),
        "{list:?}"
    );
    assert_eq!(env.status("server1")["state"], "started", "still waiting");

    let out: serde_json::Value =
        serde_json::from_str(&env.ok(&["tx", "commit", &xid, "--json"])).unwrap();
    assert_eq!(out["xid"], xid.as_str(), "{out}");
    assert_eq!(out["server"], "server1", "{out}");
    assert_eq!(out["outcome"], "commit", "{out}");
    // The logged decision was commit: committing by hand is no heuristic outcome.
    assert_eq!(out["heuristic"], false, "{out}");
    // Recovery finished PostgreSQL's and the engine's branches already; MariaDB's is not
    // configured, so none was left for the operator to finish here.
    assert_eq!(out["branches"], 0, "{out}");
    let message = out["message"].as_str().unwrap();
    assert!(message.contains("maria1 (not configured)"), "{out}");
    let done = starter.wait_with_output().unwrap();
    assert!(done.status.success(), "{done:?}");
    assert!(
        String::from_utf8_lossy(&done.stdout).contains("finished recovery and stopped"),
        "{done:?}"
    );
    wait_stopped(&env, "server1");
    assert!(env.log("server1").contains("WTRN0006W"));
    assert!(env.log("server1").contains("WSVR0105I"));
    // PostgreSQL and the engine committed; MariaDB's branch is the operator's to finish.
    assert_eq!(dbs.pg_state(), ("m1".into(), "1".into(), "0".into()));
    assert_eq!(store_messages(&env), 0);
    assert_eq!(
        dbs.maria_state().2,
        "1",
        "MariaDB still holds its prepared branch"
    );
    env.ok(&["node", "stop"]);
}

/// A damaged recovery log (here its header, so the file holds no complete keypoint) stops the
/// start, normal or recovery mode, with the log named and what to do, and nothing is
/// discarded: the file is left as it was for an operator to restore. (Damage in the middle of
/// a log is tested on the log itself, `keel-tx`.)
#[test]
fn a_corrupt_recovery_log_stops_the_start_with_a_clear_error() {
    let env = Env::new();
    env.ok(&[
        "server",
        "set-monitor-policy",
        "server1",
        "--auto-restart",
        "false",
    ]);
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    // A crash keeps the logs (a clean stop with nothing in doubt would remove them).
    let pid = env.status("server1")["pid"].as_u64().unwrap();
    common::sigkill(pid);
    wait_stopped(&env, "server1");
    let log = env
        .dir()
        .join("profile/tranlog/keelCell/node01/server1/partnerlog/log1");
    let mut bytes = std::fs::read(&log).unwrap();
    assert!(bytes.len() > 40, "the partnerlog holds records");
    bytes[12] ^= 0xff;
    std::fs::write(&log, &bytes).unwrap();

    for args in [
        &["server", "start", "server1"][..],
        &["server", "start", "server1", "--recovery"][..],
    ] {
        let err = env.fails(args);
        assert!(
            err.contains("partnerlog") && err.contains("restore the log directory from a backup"),
            "{err}"
        );
    }
    assert_eq!(std::fs::read(&log).unwrap(), bytes, "nothing discarded");
    env.ok(&["node", "stop"]);
}

/// A data source that does not answer may hold transactions in doubt: `keel tx list` says the
/// answer is unknown for it and fails, instead of "No transaction in doubt."; `--json` names it
/// beside the transactions. A clean stop before recovery could ask it keeps the logs without
/// claiming work in doubt (WTRN0012W says it is not known).
#[test]
fn a_data_source_that_does_not_answer_is_unknown_not_nothing() {
    let env = Env::new();
    let out = create_unreachable_datasource(&env);
    assert!(
        out.contains("Not checked") && out.contains("two-phase commit"),
        "the check is deferred, and says so: {out}"
    );
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    env.wait_for(Duration::from_secs(30), "WTRN0003W for down", || {
        env.log("server1")
            .lines()
            .any(|l| l.contains("WTRN0003W") && l.contains("Resource down"))
            .then_some(())
    });

    let (stderr, listing) = tx_list_unknown_for(&env, "down");
    assert!(stderr.contains("server server1"), "{stderr}");
    assert_eq!(listing["transactions"], serde_json::json!([]), "{listing}");
    assert_eq!(listing["unknown_reasons"][0]["server"], "server1");

    let before = env.log("server1").len();
    env.ok(&["server", "stop", "server1"]);
    let stop = env.log("server1")[before..].to_string();
    let kept = stop
        .lines()
        .find(|l| l.contains("WTRN0012W"))
        .unwrap_or_else(|| panic!("the logs are kept: {stop}"));
    assert!(
        !kept.contains("with work in doubt")
            && kept.contains("is not known")
            && kept.contains("down"),
        "{kept}"
    );
    env.ok(&["node", "stop"]);
}

/// The reported case: a crash leaves a branch prepared in PostgreSQL, which then stops taking
/// connections; the next start rolls back the engine's and MariaDB's branches, so every
/// resource that answers holds nothing, yet `keel tx list` must not say "No transaction in
/// doubt.": the answer is unknown for pg1, which holds the branch.
#[test]
fn tx_list_says_unknown_for_an_unreachable_data_source_holding_a_branch() {
    let Some(dbs) = Dbs::start() else { return };
    let env = mover_profile(&dbs);
    crash_with_m1_in_flight(&env, 1, "tx.after_prepare");
    assert_eq!(dbs.pg_state().2, "1", "PostgreSQL holds a prepared branch");
    // From another database: PostgreSQL keeps the branch, and refuses every connection to
    // the data source's database from here on.
    let off = dbs
        .pg
        .psql()
        .arg("-d")
        .arg(dbs.pg.url().replace("dbname=postgres", "dbname=template1"))
        .arg("-c")
        .arg("ALTER DATABASE postgres ALLOW_CONNECTIONS false")
        .output()
        .unwrap();
    assert!(off.status.success(), "{off:?}");

    let before = env.log("server1").len();
    env.ok(&["server", "start", "server1"]);
    env.wait_for(Duration::from_secs(60), "the others rolled back", || {
        let log = env.log("server1")[before..].to_string();
        (log.contains("WTRN0002I") && log.contains("Resource pg1")).then_some(())
    });
    assert_eq!(dbs.maria_state().2, "0", "MariaDB's branch is rolled back");
    tx_list_unknown_for(&env, "pg1");
    env.ok(&["node", "stop", "--stop-servers"]);
}

/// A restored data store whose engine is therefore stopped: recovery's WTRN0003W (and `keel tx
/// list`) name the start that works, `keel me start ME --flush`, not the refused plain start.
#[test]
fn recovery_names_the_flush_start_for_a_restored_engine() {
    let env = Env::new();
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    let backup = env.dir().join("me.backup");
    env.ok(&["store", "backup", ME, "--to", backup.to_str().unwrap()]);
    env.ok(&["server", "stop", "server1"]);
    env.ok(&["store", "restore", ME, "--from", backup.to_str().unwrap()]);
    let before = env.log("server1").len();
    env.ok(&["server", "start", "server1"]);
    let warned = env.wait_for(Duration::from_secs(30), "WTRN0003W for the engine", || {
        env.log("server1")[before..]
            .lines()
            .find(|l| l.contains("WTRN0003W") && l.contains(ME))
            .map(str::to_string)
    });
    assert!(
        warned.contains(&format!("keel me start {ME} --flush")),
        "{warned}"
    );
    let r = env.keel(&["tx", "list", "--server", "server1"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("--flush"), "{}", r.stderr);
    env.ok(&["node", "stop", "--stop-servers"]);
}

/// PostgreSQL with `max_prepared_transactions = 0` cannot prepare a branch. `keel datasource
/// create` refuses such a database when it answers, and says the check is deferred when it
/// does not; a server names the setting at start (WTRN0013E) and begins no branch on it, so
/// messages wait on their queue instead of burning their retries onto the exception
/// destination.
#[test]
fn a_database_that_cannot_prepare_is_named_and_its_messages_wait() {
    let Some(bin) = keel_testkit::pgtest::pg_bin() else {
        eprintln!("SKIPPED: no PostgreSQL binaries under /usr/lib/postgresql");
        return;
    };
    let pg = Cluster::start_with(bin, 0);
    let env = Env::new();
    env.ok(&["destination", "create", "bus1", "rows", "--type", "queue"]);

    // Reachable: refused, with the setting and how to set it.
    let r = create_pg_datasource(&env, "pg0", &pg.tcp_url());
    let err = r.stderr;
    assert_eq!(r.code, 1, "{err}");
    assert!(
        err.contains("pg0 is not created")
            && err.contains("max_prepared_transactions is 0")
            && err.contains("ALTER SYSTEM SET max_prepared_transactions"),
        "{err}"
    );
    assert!(!env.ok(&["datasource", "list"]).contains("pg0"));

    // Its database does not exist yet: not asked, created, the check deferred.
    let url = format!("{}/later", pg.tcp_url().strip_suffix("/postgres").unwrap());
    let r = create_pg_datasource(&env, "pg0", &url);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("Not checked"), "{}", r.stdout);
    let made = pg
        .psql()
        .arg("-c")
        .arg("CREATE DATABASE later")
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    create_sql_app(&env, "rows", "rows", "pg0", "SELECT length({body})");
    env.ok(&["node", "start"]);
    env.ok(&["server", "start", "server1"]);
    let named = env.wait_for(Duration::from_secs(30), "WTRN0013E", || {
        env.log("server1")
            .lines()
            .find(|l| l.contains("WTRN0013E"))
            .map(str::to_string)
    });
    assert!(
        named.contains("pg0")
            && named.contains("max_prepared_transactions is 0")
            && named.contains("restart PostgreSQL"),
        "{named}"
    );

    env.ok(&["send", "rows", "--server", "server1", "--body", "waits"]);
    env.wait_for(Duration::from_secs(30), "two refused attempts", || {
        (env.log("server1")
            .lines()
            .filter(|l| l.contains("WTRN0008W") && l.contains("max_prepared_transactions"))
            .count()
            >= 2)
            .then_some(())
    });
    // Nothing reached the exception destination; the message waits with no failure counted.
    let exc = keel_config::system_exception_destination(ME);
    let out = env.ok(&["receive", &exc, "--server", "server1", "--timeout-s", "0"]);
    assert_eq!(out.trim(), "", "nothing on the exception destination");
    waits_unchanged_for_the_next_start(&env, "rows", "rows", "waits");
    env.ok(&["node", "stop", "--stop-servers"]);
}
