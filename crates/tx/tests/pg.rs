//! Two-phase commit over PostgreSQL with a throwaway cluster (`max_prepared_transactions`):
//! a commit across two branches; then a child process that crashes (KEEL_FAULTS abort) right
//! after the commit decision, or right after preparing: the prepared branches hold their row
//! lock (another session times out on it), and recovery in a new coordinator commits
//! (decision logged) or rolls back (presumed abort), after which the lock is gone.

use std::path::Path;
use std::sync::Arc;

use keel_store::pgtest::{pg_bin, Cluster};
use keel_tx::coordinator::{Coordinator, Resource};
use keel_tx::log::RecoveryLog;
use keel_tx::pg::PgResource;

const ID: &str = "cell/node01/server1";

async fn sql(
    url: &str,
    statement: &str,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.query(statement, &[]).await
}

/// Statements in one session (simple protocol).
async fn batch(url: &str, statements: &str) -> Result<(), tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.batch_execute(statements).await
}

/// Moves 10 from account 1 to a new row of `ledger`, one statement per branch.
async fn transfer(c: &Coordinator, a: &Arc<PgResource>, b: &Arc<PgResource>, n: i32) {
    let mut tx = c.begin();
    let xa = tx.enlist(a.clone());
    let xb = tx.enlist(b.clone());
    a.begin(&xa).await.unwrap();
    b.begin(&xb).await.unwrap();
    a.execute(&xa, "UPDATE acct SET v = v - 10 WHERE id = 1", &[])
        .await
        .unwrap();
    b.execute(&xb, "INSERT INTO ledger VALUES ($1)", &[&n])
        .await
        .unwrap();
    c.commit(tx).await.unwrap();
}

#[test]
fn pg_child() {
    let (Ok(url), Ok(dir)) = (
        std::env::var("KEEL_TX_PG_URL"),
        std::env::var("KEEL_TX_PG_LOG"),
    ) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (log, _) = RecoveryLog::open(Path::new(&dir)).unwrap();
        let c = Coordinator::new(ID, 2, log);
        let a = Arc::new(PgResource::new("pg-a", &url));
        let b = Arc::new(PgResource::new("pg-b", &url));
        // KEEL_FAULTS aborts this process inside the commit.
        let n: i32 = std::env::var("KEEL_TX_PG_N").unwrap().parse().unwrap();
        transfer(&c, &a, &b, n).await;
    });
}

fn crash_child(url: &str, dir: &Path, point: &str, n: i32) {
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "pg_child", "--nocapture", "--test-threads", "1"])
        .env("KEEL_TX_PG_URL", url)
        .env("KEEL_TX_PG_LOG", dir)
        .env("KEEL_TX_PG_N", n.to_string())
        .env("KEEL_FAULTS", format!("{point}:crash"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the child crashed at {point}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_at_the_decision_and_before_it_are_recovered_atomically() {
    let Some(bin) = pg_bin() else {
        panic!("PostgreSQL is not installed (initdb and pg_ctl under /usr/lib/postgresql)");
    };
    let cluster = Cluster::start(bin);
    let url = cluster.url();
    sql(&url, "CREATE TABLE acct (id int PRIMARY KEY, v int)")
        .await
        .unwrap();
    sql(&url, "CREATE TABLE ledger (n int PRIMARY KEY)")
        .await
        .unwrap();
    sql(&url, "INSERT INTO acct VALUES (1, 100)").await.unwrap();
    let a = Arc::new(PgResource::new("pg-a", &url));
    let b = Arc::new(PgResource::new("pg-b", &url));
    let resources: Vec<Arc<dyn Resource>> = vec![a.clone(), b.clone()];
    let logs = tempfile::tempdir().unwrap();

    // A normal commit across the two branches.
    {
        let (log, _) = RecoveryLog::open(logs.path()).unwrap();
        let c = Coordinator::new(ID, 1, log);
        transfer(&c, &a, &b, 1).await;
    }
    let v = |rows: Vec<tokio_postgres::Row>| rows[0].get::<_, i32>(0);
    assert_eq!(v(sql(&url, "SELECT v FROM acct").await.unwrap()), 90);

    for (point, committed, n) in [
        ("tx.after_decision", true, 2),
        ("tx.after_prepare", false, 3),
    ] {
        crash_child(&url, logs.path(), point, n);
        // In doubt: both branches prepared, and the account row locked.
        let prepared = sql(&url, "SELECT gid FROM pg_prepared_xacts")
            .await
            .unwrap();
        assert_eq!(prepared.len(), 2, "{point}: prepared branches");
        let blocked = batch(
            &url,
            "SET lock_timeout = '300ms'; UPDATE acct SET v = v WHERE id = 1",
        )
        .await;
        let blocked = match blocked {
            Err(e) => e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE),
            Ok(_) => false,
        };
        assert!(blocked, "{point}: another session blocks on the locked row");

        // Recovery in a new coordinator (a restarted server).
        let (log, live) = RecoveryLog::open(logs.path()).unwrap();
        assert_eq!(
            live.len(),
            usize::from(committed),
            "{point}: decisions logged"
        );
        let c = Coordinator::new(ID, 3, log);
        let r = c.recover(&live, &resources).await.unwrap();
        if committed {
            assert_eq!(
                (r.committed, r.rolled_back, r.pending),
                (2, 0, 0),
                "{point}"
            );
        } else {
            assert_eq!(
                (r.committed, r.rolled_back, r.pending),
                (0, 2, 0),
                "{point}"
            );
        }
        assert!(sql(&url, "SELECT gid FROM pg_prepared_xacts")
            .await
            .unwrap()
            .is_empty());
        // The lock is gone, and the outcome is atomic across the two branches.
        batch(
            &url,
            "SET lock_timeout = '300ms'; UPDATE acct SET v = v WHERE id = 1",
        )
        .await
        .unwrap();
        let acct = v(sql(&url, "SELECT v FROM acct").await.unwrap());
        let ledger = sql(&url, &format!("SELECT n FROM ledger WHERE n = {n}"))
            .await
            .unwrap()
            .len();
        if committed {
            assert_eq!((acct, ledger), (80, 1), "{point}: committed everywhere");
        } else {
            assert_eq!(
                (acct, ledger),
                (80, 0),
                "{point}: rolled back everywhere (the earlier commit stays)"
            );
        }
        drop(c);
        let (_, live) = RecoveryLog::open(logs.path()).unwrap();
        assert!(live.is_empty(), "{point}: the log is empty after recovery");
    }
}
