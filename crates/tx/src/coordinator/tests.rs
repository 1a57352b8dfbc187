use super::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// An in-process resource that keeps its prepared branches in memory (its "store" outlives a
/// coordinator in these tests, as a database outlives a crashed server).
#[derive(Default)]
pub struct Mem {
    name: String,
    state: Mutex<MemState>,
}

#[derive(Default, Debug)]
pub struct MemState {
    prepared: BTreeSet<Xid>,
    committed: Vec<Xid>,
    rolled_back: Vec<Xid>,
    refuse_prepare: bool,
    read_only: bool,
    unreachable: bool,
    /// Phase twos fail (the resource went away after it prepared).
    fail_phase_two: bool,
}

impl Mem {
    pub fn new(name: &str) -> Arc<Mem> {
        Arc::new(Mem {
            name: name.into(),
            state: Mutex::default(),
        })
    }

    fn set(&self, f: impl FnOnce(&mut MemState)) {
        f(&mut self.state.lock().unwrap());
    }

    fn counts(&self) -> (usize, usize, usize) {
        let s = self.state.lock().unwrap();
        (s.prepared.len(), s.committed.len(), s.rolled_back.len())
    }

    fn err(&self, detail: &str, not_found: bool) -> ResourceError {
        ResourceError {
            resource: self.name.clone(),
            detail: detail.into(),
            not_found,
        }
    }
}

impl Resource for Mem {
    fn name(&self) -> &str {
        &self.name
    }

    fn prepare<'a>(&'a self, xid: &'a Xid) -> ResourceFuture<'a, Vote> {
        Box::pin(async move {
            let mut s = self.state.lock().unwrap();
            if s.unreachable {
                return Err(self.err("unreachable", false));
            }
            if s.refuse_prepare {
                s.rolled_back.push(xid.clone());
                return Err(self.err("a constraint failed", false));
            }
            if s.read_only {
                return Ok(Vote::ReadOnly);
            }
            s.prepared.insert(xid.clone());
            Ok(Vote::Commit)
        })
    }

    fn commit<'a>(&'a self, xid: &'a Xid, one_phase: bool) -> ResourceFuture<'a, ()> {
        Box::pin(async move {
            let mut s = self.state.lock().unwrap();
            if s.unreachable {
                return Err(self.err("unreachable", false));
            }
            if !one_phase && s.fail_phase_two {
                return Err(self.err("gone", false));
            }
            if !one_phase && !s.prepared.remove(xid) {
                return Err(self.err("no such branch", true));
            }
            s.committed.push(xid.clone());
            Ok(())
        })
    }

    fn rollback<'a>(&'a self, xid: &'a Xid) -> ResourceFuture<'a, ()> {
        Box::pin(async move {
            let mut s = self.state.lock().unwrap();
            if s.unreachable || s.fail_phase_two {
                return Err(self.err("unreachable", false));
            }
            s.prepared.remove(xid);
            s.rolled_back.push(xid.clone());
            Ok(())
        })
    }

    fn recover(&self) -> ResourceFuture<'_, Vec<Xid>> {
        Box::pin(async move {
            let s = self.state.lock().unwrap();
            if s.unreachable {
                return Err(self.err("unreachable", false));
            }
            Ok(s.prepared.iter().cloned().collect())
        })
    }
}

fn coordinator(dir: &std::path::Path, incarnation: u64) -> (Coordinator, BTreeMap<u64, Vec<u8>>) {
    let (log, live) = RecoveryLog::open(dir).unwrap();
    (
        Coordinator::new("cell/node01/server1", incarnation, log),
        live,
    )
}

#[tokio::test]
async fn two_resources_commit_through_a_logged_decision_that_then_leaves() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = coordinator(d.path(), 1);
    let (a, b) = (Mem::new("pg"), Mem::new("maria"));
    let mut tx = c.begin();
    let xa = tx.enlist(a.clone());
    let xb = tx.enlist(b.clone());
    assert_ne!(xa, xb);
    assert_eq!(xa.keel_tx("cell/node01/server1"), Some((1, 1)));
    assert_eq!(xa.keel_tx("cell/node01/server2"), None);
    c.commit(tx).await.unwrap();
    assert_eq!(a.counts(), (0, 1, 0));
    assert_eq!(b.counts(), (0, 1, 0));
    drop(c);
    let (_, live) = coordinator(d.path(), 2);
    assert!(live.is_empty(), "the decision left the log after phase two");
}

#[tokio::test]
async fn a_refused_prepare_rolls_every_branch_back_and_logs_nothing() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = coordinator(d.path(), 1);
    let (a, b) = (Mem::new("pg"), Mem::new("maria"));
    b.set(|s| s.refuse_prepare = true);
    let mut tx = c.begin();
    tx.enlist(a.clone());
    tx.enlist(b.clone());
    let e = c.commit(tx).await.unwrap_err();
    assert!(e.to_string().contains("a constraint failed"), "{e}");
    assert_eq!(a.counts(), (0, 0, 1));
    drop(c);
    assert!(coordinator(d.path(), 2).1.is_empty());
}

#[tokio::test]
async fn one_resource_commits_in_one_phase_and_read_only_votes_drop_out() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = coordinator(d.path(), 1);
    let a = Mem::new("pg");
    let mut tx = c.begin();
    tx.enlist(a.clone());
    c.commit(tx).await.unwrap();
    assert_eq!(a.counts(), (0, 1, 0));
    let (ro, rw) = (Mem::new("ro"), Mem::new("rw"));
    ro.set(|s| s.read_only = true);
    let mut tx = c.begin();
    tx.enlist(ro.clone());
    tx.enlist(rw.clone());
    c.commit(tx).await.unwrap();
    assert_eq!(ro.counts(), (0, 0, 0));
    assert_eq!(rw.counts(), (0, 1, 0));
}

#[tokio::test]
async fn recovery_commits_logged_decisions_and_rolls_back_the_rest() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (Mem::new("pg"), Mem::new("maria"));
    // A crash after the decision: both branches prepared, the decision logged.
    let (c, _) = coordinator(d.path(), 1);
    let mut decided = c.begin();
    let xa = decided.enlist(a.clone());
    let xb = decided.enlist(b.clone());
    for (r, x) in [(&a, &xa), (&b, &xb)] {
        r.prepare(x).await.unwrap();
    }
    let data = postcard::to_stdvec(&Decision {
        branches: vec![("pg".into(), xa.clone()), ("maria".into(), xb.clone())],
    })
    .unwrap();
    c.log
        .write(
            vec![Op::Put {
                id: decided.id,
                data,
            }],
            true,
        )
        .await
        .unwrap();
    // And one prepared but undecided (a crash before the decision): presumed abort.
    let mut undecided = c.begin();
    let ya = undecided.enlist(a.clone());
    a.prepare(&ya).await.unwrap();
    // Another coordinator's branch is left alone.
    let foreign = Xid {
        format_id: KEEL_FORMAT_ID,
        gtrid: b"cell/node01/server9\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0\x01".to_vec(),
        bqual: vec![0],
    };
    b.state.lock().unwrap().prepared.insert(foreign.clone());
    drop(c);

    let (c, live) = coordinator(d.path(), 2);
    assert_eq!(live.len(), 1);
    // The second resource is down at first: the decision stays pending.
    b.set(|s| s.unreachable = true);
    let resources: Vec<Arc<dyn Resource>> = vec![a.clone(), b.clone()];
    let r = c.recover(&live, &resources).await.unwrap();
    assert_eq!((r.committed, r.rolled_back, r.pending), (1, 1, 1));
    // Two branches, two transactions (the decided one's second branch waits).
    let both: std::collections::BTreeSet<Vec<u8>> = [xa.gtrid.clone(), ya.gtrid.clone()].into();
    assert_eq!(r.transactions, both);
    b.set(|s| s.unreachable = false);
    let r = c.recover(&live, &resources).await.unwrap();
    assert_eq!((r.committed, r.rolled_back, r.pending), (1, 0, 0));
    // The decided transaction's other branch: the same transaction, not a new one.
    assert_eq!(r.transactions, [xb.gtrid.clone()].into());
    assert_eq!(xa.gtrid, xb.gtrid);
    assert_eq!(a.state.lock().unwrap().committed, vec![xa]);
    assert_eq!(a.state.lock().unwrap().rolled_back, vec![ya]);
    assert_eq!(b.state.lock().unwrap().committed, vec![xb]);
    assert!(b.state.lock().unwrap().prepared.contains(&foreign));
    drop(c);
    assert!(
        coordinator(d.path(), 3).1.is_empty(),
        "done decisions leave"
    );
}

#[tokio::test]
async fn concurrent_transactions_share_forces_and_all_commit() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = coordinator(d.path(), 1);
    let c = Arc::new(c);
    let (a, b) = (Mem::new("pg"), Mem::new("maria"));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..300 {
        let (c, a, b) = (c.clone(), a.clone(), b.clone());
        tasks.spawn(async move {
            let mut tx = c.begin();
            tx.enlist(a);
            tx.enlist(b);
            c.commit(tx).await
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    assert_eq!(a.counts(), (0, 300, 0));
    assert_eq!(b.counts(), (0, 300, 0));
}

#[tokio::test]
async fn a_new_incarnation_never_reuses_a_live_decision_number() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (Mem::new("a"), Mem::new("b"));
    {
        let (c, _) = coordinator(d.path(), 1);
        b.set(|s| s.fail_phase_two = true);
        let mut t = c.begin();
        t.enlist(a.clone());
        t.enlist(b.clone());
        assert!(matches!(
            c.commit(t).await,
            Err(TxError::CommitPending { .. })
        ));
    }
    let (c, live) = coordinator(d.path(), 2);
    assert_eq!(live.len(), 1, "the decision is logged");
    c.reserve_ids_above(*live.keys().next_back().unwrap());
    let mut t = c.begin();
    t.enlist(a.clone());
    t.enlist(Mem::new("c"));
    c.commit(t).await.unwrap();
    // The new transaction's record came and went without touching the old one.
    let (_, after) = coordinator(d.path(), 3);
    assert_eq!(after, live);
}

#[tokio::test]
async fn this_runs_unfinished_work_is_finished_by_the_next_pass() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (Mem::new("a"), Mem::new("b"));
    let (c, mut live) = coordinator(d.path(), 1);
    // A rollback b did not confirm: a refused to prepare, b prepared and then went away.
    a.set(|s| s.refuse_prepare = true);
    let mut t = c.begin();
    t.enlist(b.clone());
    t.enlist(a.clone());
    // (Mem prepares whatever `fail_phase_two` says; only the rollback fails.)
    b.set(|s| s.fail_phase_two = true);
    assert!(matches!(c.commit(t).await, Err(TxError::RolledBack { .. })));
    assert_eq!(b.counts().0, 1, "b's branch is still prepared");
    assert!(c.has_pending());
    // And a decision whose phase two did not reach b.
    a.set(|s| s.refuse_prepare = false);
    let mut t = c.begin();
    t.enlist(a.clone());
    t.enlist(b.clone());
    let r = c.commit(t).await;
    assert!(matches!(r, Err(TxError::CommitPending { .. })), "{r:?}");
    assert_eq!(b.counts().0, 2);
    // The resource is back: one pass finishes both, this run's branches notwithstanding.
    b.set(|s| s.fail_phase_two = false);
    let r = c
        .recover_pass(&mut live, &[a.clone(), b.clone()])
        .await
        .unwrap();
    assert_eq!((r.committed, r.rolled_back, r.pending), (1, 1, 0));
    assert_eq!(b.counts().0, 0);
    assert!(!c.has_pending() && live.is_empty());
}
