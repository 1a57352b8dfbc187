//! `keel-bench tx`: two-phase commit throughput with two in-process resources (they vote and
//! commit at once) and the real forced tranlog, so what is measured is the coordinator and its
//! group-committed log. N transactions run concurrently; each prepares both branches, forces
//! its decision (shared fdatasyncs), commits both and removes its record.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use keel_tx::coordinator::{Coordinator, Resource, ResourceFuture, Vote, Xid};
use keel_tx::log::RecoveryLog;

struct Instant2pc(&'static str);

impl Resource for Instant2pc {
    fn name(&self) -> &str {
        self.0
    }
    fn prepare<'a>(&'a self, _: &'a Xid) -> ResourceFuture<'a, Vote> {
        Box::pin(async { Ok(Vote::Commit) })
    }
    fn commit<'a>(&'a self, _: &'a Xid, _: bool) -> ResourceFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }
    fn rollback<'a>(&'a self, _: &'a Xid) -> ResourceFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }
    fn recover(&self) -> ResourceFuture<'_, Vec<Xid>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

pub fn run(transactions: u64, concurrency: u64, json: bool) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("keel-bench-tx-")
        .tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let elapsed = rt.block_on(async {
        let (log, _) = RecoveryLog::open(dir.path())?;
        let c = Arc::new(Coordinator::new("bench/node01/server1", 1, log));
        let a: Arc<dyn Resource> = Arc::new(Instant2pc("a"));
        let b: Arc<dyn Resource> = Arc::new(Instant2pc("b"));
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        let per = transactions / concurrency;
        for _ in 0..concurrency {
            let (c, a, b) = (c.clone(), a.clone(), b.clone());
            tasks.spawn(async move {
                for _ in 0..per {
                    let mut tx = c.begin();
                    tx.enlist(a.clone());
                    tx.enlist(b.clone());
                    c.commit(tx).await?;
                }
                Ok::<_, anyhow::Error>(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        Ok::<_, anyhow::Error>(started.elapsed())
    })?;
    let done = transactions / concurrency * concurrency;
    let tps = done as f64 / elapsed.as_secs_f64();
    if json {
        println!(
            "{}",
            serde_json::json!({"transactions": done, "concurrency": concurrency, "seconds": elapsed.as_secs_f64(), "tx_per_s": tps})
        );
    } else {
        println!(
            "2PC, two in-process resources, forced tranlog: {done} transactions, {concurrency} concurrent, {:.2} s: {tps:.0} tx/s",
            elapsed.as_secs_f64()
        );
    }
    Ok(())
}
