//! The transaction service over PostgreSQL and MariaDB together, each a throwaway server
//! started here (PostgreSQL with `max_prepared_transactions`, MariaDB 10.5+ whose prepared XA
//! branches survive their connection): a transaction updates a row in PostgreSQL and inserts one
//! in MariaDB; a child process crashes (KEEL_FAULTS abort) after the decision, between the two
//! commits, or after preparing; recovery in a new coordinator makes the outcome atomic: committed
//! in both when the decision was logged, rolled back in both before it, and the locks are gone.
//!
//! Crash torture: runs of 8 concurrent transactions aborted at a rotating fault point or at a
//! random moment, each followed by recovery and an atomicity check (every transaction's rows in
//! both databases or in neither, nothing left prepared); 9 runs by default,
//! `KEEL_TX_TORTURE_RUNS=N` for more. A coordinator that does not log its decision is caught
//! within 3 runs. The torture found that a `PREPARE` the crashed process had sent can complete
//! at the database after a recovery pass, which is why recovery repeats passes.
//!
//! Data sources: 20 sequential transactions use at most two PostgreSQL backends and two
//! MariaDB connections; 16 concurrent ones on a pool of 4, all updating one row, commit;
//! pooled connections killed from another session are replaced at the next begin (and a
//! branch held by a live session is not taken as resolved); parameters of every kind into
//! typed columns, text into integers, refused conversions naming the parameter, rows and column
//! names back, a failed statement rolling the transaction back, the row limit; a PostgreSQL
//! that cannot prepare is refused at check and at begin.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use keel_testkit::mariatest::Maria;
use keel_testkit::pgtest::{pg_bin, Cluster};
use keel_tx::coordinator::{Coordinator, Resource};
use keel_tx::log::RecoveryLog;
use keel_tx::mariadb::MariaDbResource;
use keel_tx::pg::PgResource;
use keel_tx::SqlValue;
use mysql_async::prelude::Queryable;

const ID: &str = "cell/node01/server1";

/// Both throwaway servers, MariaDB's `audit` table made and `pg_schema` run on PostgreSQL.
struct Servers {
    pg_url: String,
    maria_url: String,
    _pg: Cluster,
    _maria: Maria,
}

impl Servers {
    async fn start(pg_schema: &str) -> Servers {
        let bin = pg_bin()
            .expect("PostgreSQL is installed (initdb and pg_ctl under /usr/lib/postgresql)");
        let cluster = Cluster::start(bin);
        let m = Maria::start();
        maria(&m.url(""), "CREATE DATABASE keel").await.unwrap();
        let s = Servers {
            pg_url: cluster.url(),
            maria_url: m.url("keel"),
            _pg: cluster,
            _maria: m,
        };
        pg(&s.pg_url, pg_schema).await.unwrap();
        maria(
            &s.maria_url,
            "CREATE TABLE audit (n int PRIMARY KEY) ENGINE=InnoDB",
        )
        .await
        .unwrap();
        s
    }

    /// This test binary run again as child `test`, against these servers and log `dir`.
    fn child(&self, test: &str, dir: &Path) -> Command {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args(["--exact", test, "--nocapture", "--test-threads", "1"])
            .env("KEEL_TX_PG_URL", &self.pg_url)
            .env("KEEL_TX_MARIA_URL", &self.maria_url)
            .env("KEEL_TX_LOG", dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    }
}

async fn pg(
    url: &str,
    statements: &str,
) -> Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.simple_query(statements).await
}

async fn pg_value(url: &str, query: &str) -> String {
    pg(url, query)
        .await
        .unwrap()
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
            _ => None,
        })
        .unwrap_or_default()
}

async fn maria(url: &str, statements: &str) -> Result<Vec<mysql_async::Row>, mysql_async::Error> {
    let mut c = mysql_async::Conn::new(mysql_async::Opts::from_url(url).unwrap()).await?;
    let r = c.query(statements).await;
    let _ = c.disconnect().await;
    r
}

struct Resources {
    pg: Arc<PgResource>,
    maria: Arc<MariaDbResource>,
}

impl Resources {
    fn new(pg_url: &str, maria_url: &str) -> Resources {
        Resources::with_pool(pg_url, maria_url, 8)
    }

    fn with_pool(pg_url: &str, maria_url: &str, pool_max: usize) -> Resources {
        Resources {
            pg: Arc::new(PgResource::new("orders-pg", pg_url, pool_max)),
            maria: Arc::new(MariaDbResource::new("audit-maria", maria_url, pool_max).unwrap()),
        }
    }

    fn all(&self) -> Vec<Arc<dyn Resource>> {
        vec![self.pg.clone(), self.maria.clone()]
    }

    /// One unit of work: 10 out of the PostgreSQL account, audit row `n` into MariaDB.
    async fn work(&self, c: &Coordinator, n: i32) -> Result<(), keel_tx::coordinator::TxError> {
        let mut tx = c.begin();
        let xp = tx.enlist(self.pg.clone());
        let xm = tx.enlist(self.maria.clone());
        self.pg.begin(&xp).await.unwrap();
        self.maria.begin(&xm).await.unwrap();
        self.pg
            .execute(&xp, "UPDATE acct SET v = v - 10 WHERE id = 1", &[])
            .await
            .unwrap();
        self.maria
            .execute(
                &xm,
                "INSERT INTO audit VALUES (?)",
                &[SqlValue::Int(n.into())],
            )
            .await
            .unwrap();
        c.commit(tx).await
    }
}

#[test]
fn xa_child() {
    let (Ok(pg_url), Ok(maria_url), Ok(dir), Ok(n)) = (
        std::env::var("KEEL_TX_PG_URL"),
        std::env::var("KEEL_TX_MARIA_URL"),
        std::env::var("KEEL_TX_LOG"),
        std::env::var("KEEL_TX_N"),
    ) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (log, _) = RecoveryLog::open(Path::new(&dir)).unwrap();
        let c = Coordinator::new(ID, 2, log);
        let r = Resources::new(&pg_url, &maria_url);
        // KEEL_FAULTS aborts this process inside the commit.
        let _ = r.work(&c, n.parse().unwrap()).await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_anywhere_in_two_phase_commit_recover_atomically_across_postgresql_and_mariadb() {
    let servers = Servers::start(
        "CREATE TABLE acct (id int PRIMARY KEY, v int); INSERT INTO acct VALUES (1, 1000)",
    )
    .await;
    let (pg_url, maria_url) = (servers.pg_url.clone(), servers.maria_url.clone());
    let r = Resources::new(&pg_url, &maria_url);
    let logs = tempfile::tempdir().unwrap();
    let logs_dir: PathBuf = logs.path().to_path_buf();

    // A normal transaction.
    {
        let (log, _) = RecoveryLog::open(&logs_dir).unwrap();
        let c = Coordinator::new(ID, 1, log);
        r.work(&c, 1).await.unwrap();
    }
    let mut expect_balance = 990;
    let mut expect_audit = vec![1];
    assert_eq!(
        pg_value(&pg_url, "SELECT v FROM acct").await,
        expect_balance.to_string()
    );

    let cases = [
        ("tx.after_decision", true, 2),
        ("tx.mid_commit", true, 3),
        ("tx.after_prepare", false, 4),
    ];
    for (point, decided, n) in cases {
        let status = servers
            .child("xa_child", &logs_dir)
            .env("KEEL_TX_N", n.to_string())
            .env("KEEL_FAULTS", format!("{point}:crash"))
            .status()
            .unwrap();
        assert!(!status.success(), "the child crashed at {point}");
        // In doubt: the PostgreSQL row is locked by a prepared branch (unless it already
        // committed between the two commits).
        let pg_prepared = pg_value(&pg_url, "SELECT count(*) FROM pg_prepared_xacts").await;
        let maria_prepared = maria(&maria_url, "XA RECOVER").await.unwrap().len();
        assert!(
            pg_prepared == "1" || maria_prepared == 1,
            "{point}: something in doubt"
        );
        if pg_prepared == "1" {
            let blocked = pg(
                &pg_url,
                "SET lock_timeout = '300ms'; UPDATE acct SET v = v WHERE id = 1",
            )
            .await;
            assert!(
                matches!(&blocked, Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)),
                "{point}: another session blocks on the locked row"
            );
        }

        let (log, live) = RecoveryLog::open(&logs_dir).unwrap();
        assert_eq!(live.len(), usize::from(decided), "{point}: decision logged");
        let c = Coordinator::new(ID, 3 + n as u64, log);
        let rec = c.recover(&live, &r.all()).await.unwrap();
        assert_eq!(rec.pending, 0, "{point}");
        assert_eq!(
            pg_value(&pg_url, "SELECT count(*) FROM pg_prepared_xacts").await,
            "0"
        );
        assert!(
            maria(&maria_url, "XA RECOVER").await.unwrap().is_empty(),
            "{point}"
        );
        pg(
            &pg_url,
            "SET lock_timeout = '300ms'; UPDATE acct SET v = v WHERE id = 1",
        )
        .await
        .unwrap();
        if decided {
            expect_balance -= 10;
            expect_audit.push(n);
        }
        assert_eq!(
            pg_value(&pg_url, "SELECT v FROM acct").await,
            expect_balance.to_string(),
            "{point}: PostgreSQL outcome"
        );
        let audit: Vec<i32> = maria(&maria_url, "SELECT n FROM audit ORDER BY n")
            .await
            .unwrap()
            .into_iter()
            .map(|row| row.get::<i32, _>(0).unwrap())
            .collect();
        assert_eq!(audit, expect_audit, "{point}: MariaDB outcome");
        drop(c);
        assert!(
            RecoveryLog::open(&logs_dir).unwrap().1.is_empty(),
            "{point}: log empty"
        );
    }
}

/// The torture child: 8 concurrent transactions at a time (PostgreSQL `ledger` row and MariaDB
/// `audit` row, both `n`), until a fault point or a timer aborts the process.
#[test]
fn torture_child() {
    let (Ok(pg_url), Ok(maria_url), Ok(dir), Ok(base)) = (
        std::env::var("KEEL_TX_PG_URL"),
        std::env::var("KEEL_TX_MARIA_URL"),
        std::env::var("KEEL_TX_LOG"),
        std::env::var("KEEL_TX_TORTURE_BASE"),
    ) else {
        return;
    };
    let base: i32 = base.parse().unwrap();
    if let Some(ms) = std::env::var("KEEL_TX_ABORT_AFTER_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(ms));
            std::process::abort();
        });
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (log, _) = RecoveryLog::open(Path::new(&dir)).unwrap();
        let c = Arc::new(Coordinator::new(ID, base as u64, log));
        let r = Arc::new(Resources::new(&pg_url, &maria_url));
        let mut tasks = Vec::new();
        for t in 0..8 {
            let (c, r) = (c.clone(), r.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..500 {
                    let n = base + t * 1_000 + i;
                    let mut tx = c.begin();
                    let xp = tx.enlist(r.pg.clone());
                    let xm = tx.enlist(r.maria.clone());
                    r.pg.begin(&xp).await.unwrap();
                    r.maria.begin(&xm).await.unwrap();
                    let p = [SqlValue::Int(n.into())];
                    r.pg.execute(&xp, "INSERT INTO ledger VALUES ($1)", &p)
                        .await
                        .unwrap();
                    r.maria
                        .execute(&xm, "INSERT INTO audit VALUES (?)", &p)
                        .await
                        .unwrap();
                    let _ = c.commit(tx).await;
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_torture_leaves_no_transaction_half_committed() {
    let runs: u64 = std::env::var("KEEL_TX_TORTURE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(9);
    let servers = Servers::start("CREATE TABLE ledger (n int PRIMARY KEY)").await;
    let (pg_url, maria_url) = (servers.pg_url.clone(), servers.maria_url.clone());
    let r = Resources::new(&pg_url, &maria_url);
    let logs = tempfile::tempdir().unwrap();
    let points = ["tx.after_prepare", "tx.after_decision", "tx.mid_commit", ""];
    let mut recovered = (0usize, 0usize);
    for run in 0..runs {
        let point = points[(run % 4) as usize];
        let base = (run as i32 + 1) * 100_000;
        let mut cmd = servers.child("torture_child", logs.path());
        cmd.env("KEEL_TX_TORTURE_BASE", base.to_string());
        if point.is_empty() {
            // A random moment instead of a fault point.
            cmd.env("KEEL_TX_ABORT_AFTER_MS", (20 + run * 37 % 300).to_string());
        } else {
            cmd.env("KEEL_FAULTS", format!("{point}:crash"));
        }
        let status = cmd.status().unwrap();
        assert!(
            !status.success(),
            "run {run}: the child crashed ({point:?})"
        );
        let (log, live) = RecoveryLog::open(logs.path()).unwrap();
        let c = Coordinator::new(ID, 1_000_000 + run, log);
        // A PREPARE the crashed process had sent may still complete at the database after a
        // recovery pass (the backend finishes the statement it received before it notices the
        // client is gone), so recovery repeats until a pass finds nothing in doubt. A branch
        // can also be busy for a moment (PostgreSQL: "prepared transaction … is busy" while the
        // crashed process's backend finishes; MariaDB: still tied to its ended session), which
        // leaves its decision pending for the next pass.
        let mut quiet = false;
        for pass in 0..20 {
            let rec = c.recover(&live, &r.all()).await.unwrap();
            recovered.0 += rec.committed;
            recovered.1 += rec.rolled_back;
            // At least one pause and a pass after it, whatever the first pass found.
            if pass > 0 && rec.committed + rec.rolled_back + rec.pending == 0 {
                quiet = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(quiet, "run {run}: recovery kept finding branches in doubt");
        // Atomic: every transaction is in both databases or in neither; nothing in doubt.
        let ledger: std::collections::BTreeSet<i32> = pg(&pg_url, "SELECT n FROM ledger")
            .await
            .unwrap()
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
                _ => None,
            })
            .collect();
        let audit: std::collections::BTreeSet<i32> = maria(&maria_url, "SELECT n FROM audit")
            .await
            .unwrap()
            .into_iter()
            .map(|row| row.get::<i32, _>(0).unwrap())
            .collect();
        let only_pg: Vec<_> = ledger.difference(&audit).collect();
        let only_maria: Vec<_> = audit.difference(&ledger).collect();
        assert!(
            only_pg.is_empty() && only_maria.is_empty(),
            "run {run} ({point:?}): half-committed transactions: only in PostgreSQL {only_pg:?}, only in MariaDB {only_maria:?}"
        );
        assert_eq!(
            pg_value(&pg_url, "SELECT count(*) FROM pg_prepared_xacts").await,
            "0"
        );
        assert!(maria(&maria_url, "XA RECOVER").await.unwrap().is_empty());
        drop(c);
    }
    eprintln!(
        "{runs} crash runs: {} branches committed and {} rolled back by recovery, no inconsistent outcome",
        recovered.0, recovered.1
    );
}

/// The PostgreSQL backend pid and MariaDB connection id of a transaction's two branches.
async fn backend_ids(
    r: &Resources,
    xp: &keel_tx::coordinator::Xid,
    xm: &keel_tx::coordinator::Xid,
) -> (i64, i64) {
    let p =
        r.pg.query(xp, "SELECT pg_backend_pid()", &[])
            .await
            .unwrap();
    let m = r
        .maria
        .query(xm, "SELECT CONNECTION_ID()", &[])
        .await
        .unwrap();
    let id = |rows: &keel_tx::Rows| match rows.rows[..] {
        [ref row] => match row[..] {
            [SqlValue::Int(n)] => n,
            _ => panic!("{rows:?}"),
        },
        _ => panic!("{rows:?}"),
    };
    (id(&p), id(&m))
}

/// One two-branch transaction (PostgreSQL row `n` in `ledger`, MariaDB row `n` in `audit`);
/// returns the backend ids its branches ran on.
async fn pooled_work(r: &Resources, c: &Coordinator, n: i64) -> (i64, i64) {
    let mut tx = c.begin();
    let xp = tx.enlist(r.pg.clone());
    let xm = tx.enlist(r.maria.clone());
    r.pg.begin(&xp).await.unwrap();
    r.maria.begin(&xm).await.unwrap();
    let ids = backend_ids(r, &xp, &xm).await;
    let p = [SqlValue::Int(n)];
    assert_eq!(
        r.pg.execute(&xp, "INSERT INTO ledger VALUES ($1)", &p)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        r.maria
            .execute(&xm, "INSERT INTO audit VALUES (?)", &p)
            .await
            .unwrap(),
        1
    );
    c.commit(tx).await.unwrap();
    ids
}

async fn counts(servers: &Servers) -> (String, usize) {
    (
        pg_value(&servers.pg_url, "SELECT count(*) FROM ledger").await,
        maria(&servers.maria_url, "SELECT n FROM audit")
            .await
            .unwrap()
            .len(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_are_reused_and_a_dead_one_is_replaced() {
    let servers = Servers::start("CREATE TABLE ledger (n int PRIMARY KEY)").await;
    let r = Resources::with_pool(&servers.pg_url, &servers.maria_url, 4);
    let logs = tempfile::tempdir().unwrap();
    let (log, _) = RecoveryLog::open(logs.path()).unwrap();
    let c = Coordinator::new(ID, 1, log);

    // 20 sequential two-phase transactions: branches, phase two and a recovery scan in
    // between all share the pooled connections.
    let mut pids = std::collections::BTreeSet::new();
    let mut conns = std::collections::BTreeSet::new();
    for n in 0..20 {
        let (p, m) = pooled_work(&r, &c, n).await;
        pids.insert(p);
        conns.insert(m);
        if n % 5 == 0 {
            assert!(r.pg.recover().await.unwrap().is_empty());
            assert!(r.maria.recover().await.unwrap().is_empty());
        }
    }
    assert_eq!(counts(&servers).await, ("20".to_string(), 20));
    assert!(pids.len() <= 2, "PostgreSQL backends used: {pids:?}");
    assert!(conns.len() <= 2, "MariaDB connections used: {conns:?}");

    // A one-phase commit and a rollback give their connections back too.
    for commit in [true, false] {
        let mut tx = c.begin();
        let xp = tx.enlist(r.pg.clone());
        r.pg.begin(&xp).await.unwrap();
        r.pg.execute(
            &xp,
            "INSERT INTO ledger VALUES (100 + $1)",
            &[SqlValue::Int(commit.into())],
        )
        .await
        .unwrap();
        let pid =
            r.pg.query(&xp, "SELECT pg_backend_pid()", &[])
                .await
                .unwrap();
        assert!(matches!(pid.rows[0][0], SqlValue::Int(p) if pids.contains(&p)));
        if commit {
            c.commit(tx).await.unwrap();
        } else {
            c.rollback(tx).await.unwrap();
        }
    }
    assert_eq!(
        pg_value(&servers.pg_url, "SELECT count(*) FROM ledger").await,
        "21"
    );

    // The pooled connections are killed from another session (as a database restart would):
    // the next begin (and recovery scan) replace them transparently.
    for p in &pids {
        pg(
            &servers.pg_url,
            &format!("SELECT pg_terminate_backend({p})"),
        )
        .await
        .unwrap();
    }
    for m in &conns {
        maria(&servers.maria_url, &format!("KILL {m}"))
            .await
            .unwrap();
    }
    let (p, m) = pooled_work(&r, &c, 1_000).await;
    assert!(
        !pids.contains(&p) && !conns.contains(&m),
        "fresh connections"
    );
    assert_eq!(counts(&servers).await, ("22".to_string(), 21));
    for m in [m] {
        maria(&servers.maria_url, &format!("KILL {m}"))
            .await
            .unwrap();
    }
    pg(
        &servers.pg_url,
        &format!("SELECT pg_terminate_backend({p})"),
    )
    .await
    .unwrap();
    assert!(r.pg.recover().await.unwrap().is_empty());
    assert!(r.maria.recover().await.unwrap().is_empty());
    keel_tx::SqlResource::check(&*r.pg).await.unwrap();
    keel_tx::SqlResource::check(&*r.maria).await.unwrap();

    // A MariaDB branch prepared on a session still open (as a crashed process's may be for a
    // moment): another session gets XAER_NOTA, which must not pass for "already resolved".
    let xid = keel_tx::coordinator::Xid {
        format_id: keel_tx::coordinator::KEEL_FORMAT_ID,
        gtrid: b"held".to_vec(),
        bqual: vec![0, 0, 0, 1],
    };
    let x = format!(
        "X'68656c64',X'00000001',{}",
        keel_tx::coordinator::KEEL_FORMAT_ID
    );
    let mut held = mysql_async::Conn::new(mysql_async::Opts::from_url(&servers.maria_url).unwrap())
        .await
        .unwrap();
    for s in [
        format!("XA START {x}"),
        "INSERT INTO audit VALUES (5000)".to_string(),
        format!("XA END {x}"),
        format!("XA PREPARE {x}"),
    ] {
        held.query_drop(s).await.unwrap();
    }
    let e = r.maria.commit(&xid, false).await.unwrap_err();
    assert!(!e.not_found && e.detail.contains("still tied"), "{e}");
    held.disconnect().await.unwrap();
    let mut committed = false;
    for _ in 0..50 {
        if r.maria.commit(&xid, false).await.is_ok() {
            committed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(committed, "committed once its session ended");
    assert_eq!(counts(&servers).await, ("22".to_string(), 22));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transactions_wait_for_pooled_connections_and_all_commit() {
    let servers = Servers::start(
        "CREATE TABLE ledger (n int PRIMARY KEY); CREATE TABLE acct (id int PRIMARY KEY, v int); INSERT INTO acct VALUES (1, 1000)",
    )
    .await;
    let r = Arc::new(Resources::with_pool(&servers.pg_url, &servers.maria_url, 4));
    let logs = tempfile::tempdir().unwrap();
    let (log, _) = RecoveryLog::open(logs.path()).unwrap();
    let c = Arc::new(Coordinator::new(ID, 1, log));
    let mut tasks = Vec::new();
    for n in 0..16i64 {
        let (r, c) = (r.clone(), c.clone());
        tasks.push(tokio::spawn(async move {
            let mut tx = c.begin();
            let xp = tx.enlist(r.pg.clone());
            let xm = tx.enlist(r.maria.clone());
            r.pg.begin(&xp).await.unwrap();
            r.maria.begin(&xm).await.unwrap();
            let ids = backend_ids(&r, &xp, &xm).await;
            // Every transaction updates the same row: branches wait for the lock of a
            // prepared one, whose phase two still finds a connection.
            r.pg.execute(
                &xp,
                "UPDATE acct SET v = v - $1 WHERE id = 1",
                &[SqlValue::Int(10)],
            )
            .await
            .unwrap();
            r.pg.execute(&xp, "INSERT INTO ledger VALUES ($1)", &[SqlValue::Int(n)])
                .await
                .unwrap();
            r.maria
                .execute(&xm, "INSERT INTO audit VALUES (?)", &[SqlValue::Int(n)])
                .await
                .unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            c.commit(tx).await.unwrap();
            ids
        }));
    }
    let mut pids = std::collections::BTreeSet::new();
    let mut conns = std::collections::BTreeSet::new();
    for t in tasks {
        let (p, m) = tokio::time::timeout(std::time::Duration::from_secs(60), t)
            .await
            .expect("no deadlock")
            .unwrap();
        pids.insert(p);
        conns.insert(m);
    }
    assert_eq!(counts(&servers).await, ("16".to_string(), 16));
    assert_eq!(pg_value(&servers.pg_url, "SELECT v FROM acct").await, "840");
    assert!(pids.len() <= 4, "PostgreSQL backends used: {pids:?}");
    assert!(conns.len() <= 4, "MariaDB connections used: {conns:?}");
    assert_eq!(
        pg_value(&servers.pg_url, "SELECT count(*) FROM pg_prepared_xacts").await,
        "0"
    );
    assert!(maria(&servers.maria_url, "XA RECOVER")
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_take_parameters_and_queries_return_rows_on_both() {
    let servers = Servers::start(
        "CREATE TABLE typed (id int PRIMARY KEY, name text, tag varchar(8), data bytea, amount numeric(10,2), at timestamp, ok boolean, ratio float8, big bigint, spot point)",
    )
    .await;
    maria(
        &servers.maria_url,
        "CREATE TABLE typed (id int PRIMARY KEY, name varchar(20), data blob, amount decimal(10,2), at datetime, day date, ratio double) ENGINE=InnoDB",
    )
    .await
    .unwrap();
    let r = Resources::with_pool(&servers.pg_url, &servers.maria_url, 2);
    let logs = tempfile::tempdir().unwrap();
    let (log, _) = RecoveryLog::open(logs.path()).unwrap();
    let c = Coordinator::new(ID, 1, log);
    use SqlValue::{Bool, Bytes, Float, Int, Null, Text};

    // Both kinds held alike, as the server does.
    let sources: [Arc<dyn keel_tx::SqlResource>; 2] = [r.pg.clone(), r.maria.clone()];
    for s in &sources {
        // The test cluster allows prepared transactions; MariaDB needs no setting.
        assert_eq!(s.check().await.unwrap(), keel_tx::TwoPhase::Ready);
    }

    let mut tx = c.begin();
    let xp = tx.enlist(r.pg.clone());
    let xm = tx.enlist(r.maria.clone());
    sources[0].begin(&xp).await.unwrap();
    sources[1].begin(&xm).await.unwrap();
    let insert_pg = "INSERT INTO typed (id, name, tag, data, amount, at, ok, ratio, big) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
    let n = sources[0]
        .execute(
            &xp,
            insert_pg,
            &[
                Int(1),
                Text("Ada".into()),
                Null,
                Bytes(vec![0, 255, 7]),
                Text("12.50".into()),
                Text("2024-02-29 13:14:15.25".into()),
                Bool(true),
                Float(0.5),
                Int(1 << 40),
            ],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    // Text "42" into an integer parameter; Int into numeric and text; Null anywhere.
    sources[0]
        .execute(
            &xp,
            insert_pg,
            &[
                Text("42".into()),
                Int(7),
                Text("t".into()),
                Null,
                Int(3),
                Null,
                Null,
                Int(2),
                Null,
            ],
        )
        .await
        .unwrap();
    // A value that does not convert: refused before it runs, naming the parameter.
    let e = sources[0]
        .execute(
            &xp,
            "UPDATE typed SET name = 'x' WHERE id = $1",
            &[Text("abc".into())],
        )
        .await
        .unwrap_err();
    assert!(
        e.detail
            .contains("parameter 1 (Text value) does not convert to int4"),
        "{e}"
    );
    let e = sources[0]
        .execute(&xp, "UPDATE typed SET data = $1 WHERE id = 1", &[Int(3)])
        .await
        .unwrap_err();
    assert!(
        e.detail
            .contains("parameter 1 (Int value) does not convert to bytea"),
        "{e}"
    );
    let e = sources[0]
        .query(&xp, "SELECT spot FROM typed", &[])
        .await
        .unwrap_err();
    assert!(e.detail.contains("column spot has type point"), "{e}");
    let rows = sources[0]
        .query(&xp, "SELECT id, name, tag, data, amount, at, ok, ratio, big FROM typed WHERE id >= $1 ORDER BY id", &[Int(0)])
        .await
        .unwrap();
    assert_eq!(
        rows.columns,
        ["id", "name", "tag", "data", "amount", "at", "ok", "ratio", "big"]
    );
    assert_eq!(
        rows.rows,
        vec![
            vec![
                Int(1),
                Text("Ada".into()),
                Null,
                Bytes(vec![0, 255, 7]),
                Text("12.50".into()),
                Text("2024-02-29 13:14:15.250000".into()),
                Bool(true),
                Float(0.5),
                Int(1 << 40)
            ],
            vec![
                Int(42),
                Text("7".into()),
                Text("t".into()),
                Null,
                Text("3.00".into()),
                Null,
                Null,
                Float(2.0),
                Null
            ],
        ]
    );

    let insert_maria =
        "INSERT INTO typed (id, name, data, amount, at, day, ratio) VALUES (?, ?, ?, ?, ?, ?, ?)";
    for params in [
        [
            Int(1),
            Text("Ada".into()),
            Bytes(vec![0, 255, 7]),
            Text("12.50".into()),
            Text("2024-02-29 13:14:15".into()),
            Text("2024-02-29".into()),
            Float(0.5),
        ],
        [Text("42".into()), Null, Null, Int(3), Null, Null, Int(2)],
    ] {
        assert_eq!(
            sources[1]
                .execute(&xm, insert_maria, &params)
                .await
                .unwrap(),
            1
        );
    }
    let e = sources[1]
        .execute(&xm, insert_maria, &[Int(1)])
        .await
        .unwrap_err();
    assert!(e.detail.contains("7 parameter(s), 1 given"), "{e}");
    let rows = sources[1]
        .query(
            &xm,
            "SELECT id, name, data, amount, at, day, ratio FROM typed WHERE id >= ? ORDER BY id",
            &[Int(0)],
        )
        .await
        .unwrap();
    assert_eq!(
        rows.columns,
        ["id", "name", "data", "amount", "at", "day", "ratio"]
    );
    assert_eq!(
        rows.rows,
        vec![
            vec![
                Int(1),
                Text("Ada".into()),
                Bytes(vec![0, 255, 7]),
                Text("12.50".into()),
                Text("2024-02-29 13:14:15".into()),
                Text("2024-02-29".into()),
                Float(0.5)
            ],
            vec![
                Int(42),
                Null,
                Null,
                Text("3.00".into()),
                Null,
                Null,
                Float(2.0)
            ],
        ]
    );
    c.commit(tx).await.unwrap();
    assert_eq!(
        pg_value(&servers.pg_url, "SELECT count(*) FROM typed").await,
        "2"
    );
    assert_eq!(
        maria(&servers.maria_url, "SELECT id FROM typed")
            .await
            .unwrap()
            .len(),
        2
    );

    // A statement the database refuses: the branch can only roll back, and the transaction
    // with it; its connection is reused afterwards.
    let mut tx = c.begin();
    let xp = tx.enlist(r.pg.clone());
    let xm = tx.enlist(r.maria.clone());
    r.pg.begin(&xp).await.unwrap();
    r.maria.begin(&xm).await.unwrap();
    r.maria
        .execute(&xm, "INSERT INTO typed (id) VALUES (?)", &[Int(5)])
        .await
        .unwrap();
    let e =
        r.pg.execute(&xp, "INSERT INTO typed (id) VALUES ($1)", &[Int(1)])
            .await
            .unwrap_err();
    assert!(e.detail.contains("duplicate key"), "{e}");
    let e =
        r.pg.execute(&xp, "INSERT INTO typed (id) VALUES ($1)", &[Int(6)])
            .await
            .unwrap_err();
    assert!(e.detail.contains("can only roll back"), "{e}");
    let e = c.commit(tx).await.unwrap_err();
    assert!(e.to_string().contains("rolled back"), "{e}");
    assert_eq!(
        maria(&servers.maria_url, "SELECT id FROM typed")
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(maria(&servers.maria_url, "XA RECOVER")
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        pg_value(&servers.pg_url, "SELECT count(*) FROM pg_prepared_xacts").await,
        "0"
    );

    // More rows than a query may return.
    let mut tx = c.begin();
    let xp = tx.enlist(r.pg.clone());
    r.pg.begin(&xp).await.unwrap();
    let e =
        r.pg.query(
            &xp,
            "SELECT g FROM generate_series(1, $1) g",
            &[Int(10_001)],
        )
        .await
        .unwrap_err();
    assert!(e.detail.contains("more than 10000 rows"), "{e}");
    let all =
        r.pg.query(
            &xp,
            "SELECT g FROM generate_series(1, $1) g",
            &[Int(10_000)],
        )
        .await
        .unwrap();
    assert_eq!(all.rows.len(), 10_000);
    c.rollback(tx).await.unwrap();
}

/// PostgreSQL with `max_prepared_transactions = 0` cannot prepare a branch: the check says so
/// (naming the setting and how to set it), and no branch begins on it, so a caller finds out
/// before doing any work rather than at prepare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_that_cannot_prepare_is_refused_at_check_and_begin() {
    let bin =
        pg_bin().expect("PostgreSQL is installed (initdb and pg_ctl under /usr/lib/postgresql)");
    let cluster = Cluster::start_with(bin, 0);
    let r = PgResource::new("pg0", &cluster.url(), 2);
    let keel_tx::TwoPhase::Unable(why) = keel_tx::SqlResource::check(&r).await.unwrap() else {
        panic!("a cluster without prepared transactions is not ready");
    };
    assert!(
        why.contains("max_prepared_transactions is 0") && why.contains("ALTER SYSTEM SET"),
        "{why}"
    );
    let logs = tempfile::tempdir().unwrap();
    let (log, _) = RecoveryLog::open(logs.path()).unwrap();
    let c = Coordinator::new(ID, 1, log);
    let mut tx = c.begin();
    let r = Arc::new(r);
    let x = tx.enlist(r.clone());
    let e = r.begin(&x).await.unwrap_err();
    assert!(e.detail.contains("max_prepared_transactions is 0"), "{e}");
    // Recovery still reads it: nothing is prepared there.
    assert!(r.recover().await.unwrap().is_empty());
}

/// A data source whose URL asks for TLS (`sslmode=verify-full&sslrootcert=FILE`) runs its
/// two-phase work over TLS against a PostgreSQL that takes TCP over TLS only; the same URL
/// trusting another CA cannot connect, and `sslmode=require` is refused with what to use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_source_over_verified_tls_prepares_and_commits() {
    let bin =
        pg_bin().expect("PostgreSQL is installed (initdb and pg_ctl under /usr/lib/postgresql)");
    let certs = tempfile::tempdir().unwrap();
    let keel_testkit::dbcerts::DbCerts {
        pki,
        other,
        cert_pem: cert,
        key_pem: key,
    } = keel_testkit::dbcerts::db_certs(certs.path(), "pg");
    let cluster = Cluster::start_tls(bin, &cert, &key);
    cluster
        .psql()
        .args(["-c", "CREATE TABLE t (v int)"])
        .output()
        .unwrap();
    let url = |ca: &Path| {
        format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            cluster.tcp_url(),
            ca.display()
        )
    };

    let r = Arc::new(PgResource::new("pg-tls", &url(&pki.ca_cert_path()), 2));
    let logs = tempfile::tempdir().unwrap();
    let (log, _) = RecoveryLog::open(logs.path()).unwrap();
    let c = Coordinator::new(ID, 1, log);
    let mut tx = c.begin();
    let x = tx.enlist(r.clone());
    r.begin(&x).await.unwrap();
    r.execute(&x, "INSERT INTO t VALUES ($1)", &[SqlValue::Int(7)])
        .await
        .unwrap();
    c.commit(tx).await.unwrap();
    let out = cluster
        .psql()
        .args(["-c", "SELECT sum(v) FROM t"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "7");

    let wrong = PgResource::new("pg-wrong-ca", &url(&other.ca_cert_path()), 2);
    let e = keel_tx::SqlResource::check(&wrong).await.unwrap_err();
    assert!(e.detail.contains("connect over TLS"), "{e}");
    let plain = PgResource::new(
        "pg-require",
        &format!("{}?sslmode=require", cluster.tcp_url()),
        2,
    );
    let e = keel_tx::SqlResource::check(&plain).await.unwrap_err();
    assert!(e.detail.contains("sslmode=verify-full"), "{e}");
}

/// The same for MariaDB: a data source URL with `sslmode=verify-full&sslrootcert=FILE` runs
/// two-phase work over TLS against a server that requires secure transport; the CA is checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mariadb_data_source_over_verified_tls_prepares_and_commits() {
    let certs = tempfile::tempdir().unwrap();
    let keel_testkit::dbcerts::DbCerts {
        pki,
        other,
        cert_pem: cert,
        key_pem: key,
    } = keel_testkit::dbcerts::db_certs(certs.path(), "maria");
    let m = Maria::start_tls(&cert, &key);
    let out = m
        .client()
        .args(["-e", "CREATE DATABASE keel; CREATE TABLE keel.t (v int)"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = |ca: &Path| {
        format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            m.url("keel"),
            ca.display()
        )
    };
    let r = Arc::new(MariaDbResource::new("maria-tls", &url(&pki.ca_cert_path()), 2).unwrap());
    let logs = tempfile::tempdir().unwrap();
    let (log, _) = RecoveryLog::open(logs.path()).unwrap();
    let c = Coordinator::new(ID, 1, log);
    let mut tx = c.begin();
    let x = tx.enlist(r.clone());
    r.begin(&x).await.unwrap();
    r.execute(&x, "INSERT INTO t VALUES (?)", &[SqlValue::Int(9)])
        .await
        .unwrap();
    c.commit(tx).await.unwrap();
    let out = m
        .client()
        .args(["-e", "SELECT sum(v) FROM keel.t"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "9");
    // Plain TCP is refused by the server (secure transport required): the TLS above is real.
    assert!(maria(&m.url("keel"), "SELECT 1").await.is_err());
    let wrong = MariaDbResource::new("maria-wrong-ca", &url(&other.ca_cert_path()), 2).unwrap();
    assert!(keel_tx::SqlResource::check(&wrong).await.is_err());
    let e = MariaDbResource::new(
        "maria-require",
        &format!("{}?sslmode=require", m.url("keel")),
        2,
    )
    .err()
    .unwrap();
    assert!(e.detail.contains("sslmode=verify-full"), "{e}");
}
