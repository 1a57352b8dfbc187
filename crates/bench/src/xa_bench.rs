//! Transactions over real resources: a messaging engine in this process (SQLite store) and a
//! throwaway PostgreSQL cluster (`max_prepared_transactions` set), both the real resource code
//! the server uses (`keel_server::txsvc::MeResource`, `keel_tx::pg::PgResource`).
//!
//! - `tx-pg`: ME + PostgreSQL two-phase transactions per second (each sends one message and
//!   inserts one row; prepare both, forced decision, commit both), beside PostgreSQL alone doing
//!   the same prepared transactions (insert, `PREPARE TRANSACTION`, `COMMIT PREPARED`).
//! - `tx-recovery`: N transactions left in doubt with their decisions logged (phase two refused
//!   by the resources, as after a crash between decision and commit), the engine restarted,
//!   then the tranlog replayed (records/s) and everything recovered (time to resolve N in-doubt
//!   transactions at both resources), checked: N rows, N messages, nothing prepared.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use keel_engine::messaging::OutgoingMessage;
use keel_engine::StartMode;
use keel_server::txsvc::MeResource;
use keel_tx::coordinator::{
    Coordinator, Resource, ResourceError, ResourceFuture, TxError, Vote, Xid,
};
use keel_tx::log::RecoveryLog;
use keel_tx::pg::PgResource;
use keel_tx::SqlValue;
use serde_json::json;

const QUEUE: &str = "bench";

/// Passes everything through, except that a two-phase commit fails while `refuse` is set (a
/// resource that went away between the decision and phase two).
struct Refusing {
    inner: Arc<dyn Resource>,
    refuse: Arc<AtomicBool>,
}

impl Resource for Refusing {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn prepare<'a>(&'a self, xid: &'a Xid) -> ResourceFuture<'a, Vote> {
        self.inner.prepare(xid)
    }
    fn commit<'a>(&'a self, xid: &'a Xid, one_phase: bool) -> ResourceFuture<'a, ()> {
        if !one_phase && self.refuse.load(Ordering::Relaxed) {
            return Box::pin(async move {
                Err(ResourceError {
                    resource: self.inner.name().to_string(),
                    detail: "gone (benchmark)".into(),
                    not_found: false,
                })
            });
        }
        self.inner.commit(xid, one_phase)
    }
    fn rollback<'a>(&'a self, xid: &'a Xid) -> ResourceFuture<'a, ()> {
        self.inner.rollback(xid)
    }
    fn recover(&self) -> ResourceFuture<'_, Vec<Xid>> {
        self.inner.recover()
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    pg_cluster: keel_testkit::pgtest::Cluster,
    dir: std::path::PathBuf,
    engine: Arc<keel_engine::Engine>,
    me: Arc<MeResource>,
    pg: Arc<PgResource>,
}

async fn setup(max_prepared: u32, pool: usize) -> Result<Setup> {
    let Some(bin) = keel_testkit::pgtest::pg_bin() else {
        bail!("no PostgreSQL binaries under /usr/lib/postgresql");
    };
    let pg = keel_testkit::pgtest::Cluster::start_with(bin, max_prepared);
    let pg_url = pg.tcp_url();
    let dir = tempfile::Builder::new()
        .prefix("keel-bench-xa-")
        .tempdir()?;
    let engine = crate::engine_bench::engine(dir.path());
    engine.start(StartMode::Normal).await?;
    let out = pg
        .psql()
        .arg("-c")
        .arg("CREATE TABLE t(id bigint PRIMARY KEY, body text)")
        .output()?;
    if !out.status.success() {
        bail!("psql: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(Setup {
        dir: dir.path().to_path_buf(),
        _dir: dir,
        pg_cluster: pg,
        me: Arc::new(MeResource::new(engine.clone())),
        engine,
        pg: Arc::new(PgResource::new("pg1", &pg_url, pool)),
    })
}

/// One number from PostgreSQL, through the cluster's psql.
fn pg_scalar(pg: &keel_testkit::pgtest::Cluster, sql: &str) -> Result<i64> {
    let out = pg.psql().arg("-c").arg(sql).output()?;
    if !out.status.success() {
        bail!("psql: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// One ME + PostgreSQL transaction: a message and a row.
async fn me_pg_tx(
    c: &Coordinator,
    me: &Arc<MeResource>,
    me_r: Arc<dyn Resource>,
    pg: &Arc<PgResource>,
    pg_r: Arc<dyn Resource>,
    n: i64,
) -> Result<(), TxError> {
    let mut t = c.begin();
    let x1 = t.enlist(me_r);
    me.begin(&x1).expect("engine branch");
    me.with_tx(&x1, |m, tx| {
        m.tx_send(
            tx,
            QUEUE,
            OutgoingMessage {
                body: vec![b'x'; 100],
                ..Default::default()
            },
        )
    })
    .expect("send in the branch");
    let x2 = t.enlist(pg_r);
    pg.begin(&x2).await.expect("PostgreSQL branch");
    pg.execute(
        &x2,
        "INSERT INTO t(id, body) VALUES ($1, 'x')",
        &[SqlValue::Int(n)],
    )
    .await
    .expect("insert");
    c.commit(t).await
}

pub fn throughput(transactions: u64, concurrency: u64, json_out: bool) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let s = setup(256, concurrency as usize + 2).await?;
        let (log, _) = RecoveryLog::open(&s.dir.join("tranlog"))?;
        let c = Arc::new(Coordinator::new("bench/server1", keel_core::unix_ms(), log));
        let per = transactions / concurrency;
        let done = per * concurrency;

        // PostgreSQL alone: the same prepared transactions, no coordinator, no engine.
        let next = Arc::new(AtomicU64::new(1_000_000_000));
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let (c, pg, next) = (c.clone(), s.pg.clone(), next.clone());
            tasks.spawn(async move {
                for _ in 0..per {
                    let mut t = c.begin();
                    let x = t.enlist(pg.clone());
                    pg.begin(&x).await?;
                    let n = next.fetch_add(1, Ordering::Relaxed) as i64;
                    pg.execute(&x, "INSERT INTO t(id, body) VALUES ($1, 'x')", &[SqlValue::Int(n)])
                        .await?;
                    pg.prepare(&x).await?;
                    pg.commit(&x, false).await?;
                }
                Ok::<_, anyhow::Error>(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        let pg_alone = started.elapsed();

        let next = Arc::new(AtomicU64::new(1));
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let (c, me, pg, next) = (c.clone(), s.me.clone(), s.pg.clone(), next.clone());
            tasks.spawn(async move {
                for _ in 0..per {
                    let n = next.fetch_add(1, Ordering::Relaxed) as i64;
                    me_pg_tx(&c, &me, me.clone(), &pg, pg.clone(), n).await?;
                }
                Ok::<_, anyhow::Error>(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        let both = started.elapsed();
        let rows = pg_scalar(&s.pg_cluster, "SELECT count(*) FROM t")?;
        let depth = s.engine.messaging()?.depth(QUEUE).await?;
        if rows != 2 * done as i64 || depth != done {
            bail!("check failed: {rows} rows (expected {}), {depth} messages (expected {done})", 2 * done);
        }
        let (a, b) = (
            done as f64 / pg_alone.as_secs_f64(),
            done as f64 / both.as_secs_f64(),
        );
        if json_out {
            println!(
                "{}",
                json!({"transactions": done, "concurrency": concurrency, "pg_alone_tx_per_s": a, "me_pg_tx_per_s": b})
            );
        } else {
            println!("PostgreSQL alone (insert, PREPARE TRANSACTION, COMMIT PREPARED): {done} transactions, {concurrency} concurrent, {:.2} s: {a:.0} tx/s", pg_alone.as_secs_f64());
            println!("ME + PostgreSQL two-phase (send + insert, forced decision):      {done} transactions, {concurrency} concurrent, {:.2} s: {b:.0} tx/s ({:.0} % of PostgreSQL alone)", both.as_secs_f64(), 100.0 * b / a);
        }
        Ok(())
    })
}

pub fn recovery(transactions: u64, json_out: bool) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let s = setup(transactions as u32 + 100, 66).await?;
        let log_dir = s.dir.join("tranlog");
        let refuse = Arc::new(AtomicBool::new(true));
        {
            let (log, _) = RecoveryLog::open(&log_dir)?;
            let c = Arc::new(Coordinator::new("bench/server1", 1_000, log));
            let me_r: Arc<dyn Resource> = Arc::new(Refusing {
                inner: s.me.clone(),
                refuse: refuse.clone(),
            });
            let pg_r: Arc<dyn Resource> = Arc::new(Refusing {
                inner: s.pg.clone(),
                refuse: refuse.clone(),
            });
            let next = Arc::new(AtomicU64::new(1));
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..64 {
                let (c, me, pg, me_r, pg_r, next) = (
                    c.clone(),
                    s.me.clone(),
                    s.pg.clone(),
                    me_r.clone(),
                    pg_r.clone(),
                    next.clone(),
                );
                tasks.spawn(async move {
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n > transactions {
                            return Ok::<_, anyhow::Error>(());
                        }
                        match me_pg_tx(&c, &me, me_r.clone(), &pg, pg_r.clone(), n as i64).await {
                            Err(TxError::CommitPending { .. }) => {}
                            other => bail!("expected the commit to stay in doubt: {other:?}"),
                        }
                    }
                });
            }
            while let Some(r) = tasks.join_next().await {
                r??;
            }
            c.close_log().await?;
        }
        // "The crash": the engine restarts (its branches now live in its store only).
        s.engine.stop(false).await?;
        s.engine.start(StartMode::Normal).await?;
        let in_doubt = pg_scalar(&s.pg_cluster, "SELECT count(*) FROM pg_prepared_xacts")?;
        let log_bytes: u64 = ["log1", "log2"]
            .iter()
            .filter_map(|f| std::fs::metadata(log_dir.join(f)).ok())
            .map(|m| m.len())
            .sum();

        let started = Instant::now();
        let (log, mut live) = RecoveryLog::open(&log_dir)?;
        let replay = started.elapsed();
        let records = live.len();
        let c = Coordinator::new("bench/server1", 2_000, log);
        if let Some(max) = live.keys().next_back() {
            c.reserve_ids_above(*max);
        }
        let resources: Vec<Arc<dyn Resource>> = vec![s.me.clone(), s.pg.clone()];
        let mut passes = 0;
        let (mut committed, mut rolled_back) = (0, 0);
        loop {
            passes += 1;
            let r = c.recover_pass(&mut live, &resources).await?;
            committed += r.committed;
            rolled_back += r.rolled_back;
            if r.committed + r.rolled_back + r.pending == 0 {
                break;
            }
            if passes > 10 {
                bail!("recovery did not finish in 10 passes");
            }
        }
        let recovered = started.elapsed();
        let rows = pg_scalar(&s.pg_cluster, "SELECT count(*) FROM t")?;
        let prepared = pg_scalar(&s.pg_cluster, "SELECT count(*) FROM pg_prepared_xacts")?;
        let depth = s.engine.messaging()?.depth(QUEUE).await?;
        if rows != transactions as i64 || depth != transactions || prepared != 0 {
            bail!("check failed: {rows} rows, {depth} messages, {prepared} prepared (expected {transactions}, {transactions}, 0)");
        }
        let rate = records as f64 / replay.as_secs_f64();
        if json_out {
            println!(
                "{}",
                json!({"in_doubt": transactions, "pg_prepared_before": in_doubt, "log_records": records, "log_bytes": log_bytes,
                       "replay_s": replay.as_secs_f64(), "replay_records_per_s": rate,
                       "recovery_s": recovered.as_secs_f64(), "branches_committed": committed, "branches_rolled_back": rolled_back, "passes": passes})
            );
        } else {
            println!("tranlog replay: {records} decisions ({:.1} MiB) in {:.1} ms: {rate:.0} records/s", log_bytes as f64 / 1048576.0, replay.as_secs_f64() * 1e3);
            println!("recovery of {transactions} in-doubt transactions (ME + PostgreSQL, {in_doubt} prepared at PostgreSQL): {:.2} s, {committed} branches committed, {rolled_back} rolled back, {passes} passes", recovered.as_secs_f64());
        }
        Ok(())
    })
}
