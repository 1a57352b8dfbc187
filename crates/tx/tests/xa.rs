//! The transaction service over PostgreSQL and MariaDB together, each a throwaway server
//! started here (PostgreSQL with `max_prepared_transactions`, MariaDB 10.5+ whose prepared XA
//! branches survive their connection): a transaction updates a row in PostgreSQL and inserts one
//! in MariaDB; a child process crashes (KEEL_FAULTS abort) after the decision, between the two
//! commits, or after preparing; recovery in a new coordinator makes the outcome atomic: committed
//! in both when the decision was logged, rolled back in both before it, and the locks are gone.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;

use keel_store::pgtest::{pg_bin, Cluster};
use keel_tx::coordinator::{Coordinator, Resource};
use keel_tx::log::RecoveryLog;
use keel_tx::mariadb::MariaDbResource;
use keel_tx::pg::PgResource;
use mysql_async::prelude::Queryable;

const ID: &str = "cell/node01/server1";

/// A throwaway MariaDB server, killed on drop.
struct Maria {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Maria {
    fn start() -> Maria {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let out = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args([
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ])
            .output()
            .expect("mariadb-install-db (MariaDB is installed)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        // Debian puts it in /usr/sbin, which a non-root PATH may lack.
        let server = ["/usr/sbin/mariadbd", "/usr/bin/mariadbd"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .unwrap_or("mariadbd");
        let child = Command::new(server)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", dir.path().join("sock").display()))
            .arg(format!("--port={port}"))
            .args([
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=16M",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mariadbd");
        let m = Maria {
            child,
            port,
            _dir: dir,
        };
        for _ in 0..300 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return m;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("MariaDB did not start");
    }

    fn url(&self, db: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for Maria {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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

fn free_port() -> u16 {
    (0..2000u16)
        .map(|i| 15_000 + (std::process::id() as u16 % 2000 + i * 7) % 4000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port")
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
        Resources {
            pg: Arc::new(PgResource::new("orders-pg", pg_url)),
            maria: Arc::new(MariaDbResource::new("audit-maria", maria_url).unwrap()),
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
            .execute(&xm, &format!("INSERT INTO audit VALUES ({n})"))
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
                    r.pg.execute(&xp, "INSERT INTO ledger VALUES ($1)", &[&n])
                        .await
                        .unwrap();
                    r.maria
                        .execute(&xm, &format!("INSERT INTO audit VALUES ({n})"))
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
        // client is gone), so recovery repeats until a pass finds nothing in doubt.
        let mut quiet = false;
        for pass in 0..20 {
            let rec = c.recover(&live, &r.all()).await.unwrap();
            assert_eq!(rec.pending, 0, "run {run}");
            recovered.0 += rec.committed;
            recovered.1 += rec.rolled_back;
            // At least one pause and a pass after it, whatever the first pass found.
            if pass > 0 && rec.committed + rec.rolled_back == 0 {
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
