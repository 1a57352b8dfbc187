//! The transaction service of a server (DESIGN §6): the coordinator with its recovery logs,
//! the resources it coordinates (the server's messaging engines and the cell's data sources),
//! recovery, and resolution by hand.
//!
//! Resources: each engine ([`MeResource`]) and each data source of the cell
//! (`keel_tx::pg::PgResource`, `keel_tx::mariadb::MariaDbResource`; the password, from the
//! profile's secrets, goes into the URL in memory only). XIDs carry the recovery identity
//! `node/server` ([`recovery_id`]). A normal start checks that each data source can prepare
//! (`WTRN0013E`).
//!
//! Recovery logs live under `tranlog/<cell>/<node>/<server>/`: `tranlog/` holds commit
//! decisions, `partnerlog/` the resources (kind and configuration name, never a URL or a
//! password) that may hold branches of this server. Every configured resource is written to
//! the partnerlog (forced) before the first transaction of a run, so a crash at any moment
//! leaves a log naming every resource a branch could be prepared at: that is what makes a
//! `--recovery` start possible after a crash that happened before any decision was logged. A
//! partnerlog resource no longer configured is `WTRN0005W`, and the logs are kept for it.
//!
//! Recovery ([`TxService::recover`]) is complete after two passes in a row, a pause apart,
//! that find nothing and reach every resource (`WTRN0004I`): a PREPARE that a crashed process
//! had sent can complete at a database after a pass. Unreachable resources are `WTRN0003W`
//! and retried with back-off (1 s doubling to 30 s). A normal start runs it in the background
//! while new work runs (this run's own branches are never touched by it), then keeps finishing
//! this run's pending and unresolved work (checked every 5 s) and runs a pass every 60 s
//! anyway, since an earlier run's PREPARE can land late ([`TxService::watch_pending`]); a
//! `--recovery` start waits for it and exits.
//!
//! By hand (the `TransactionService` admin object, `keel tx list|commit|rollback`): `list`
//! shows logged decisions not finished (`committing`), earlier runs' branches with no decision
//! (`in-doubt`: recovery rolls them back), this run's (`running`), and every resource that did
//! not answer (`unknown`, with the reason, so `keel tx list` fails rather than say "none"; a
//! stopped engine's reason, `Engine::why_not_started`, names `--flush` for a restored store).
//! `commit` and `rollback` act on every prepared branch of the global id at every resource,
//! refuse this run's running transactions, act only when every resource answered, and log the
//! operator's decision before any branch hears it (a commit as a forced decision record; a
//! rollback by removing the logged decision and marking the transaction unresolved), so
//! recovery finishes whatever fails the same way; `WTRN0006W` says whether the outcome was
//! heuristic.
//!
//! A clean stop (after the applications and the recovery tasks) closes the logs and removes
//! their files only with nothing logged, recovery complete, nothing pending and no partner
//! missing (`WTRN0011I`: the next start is a cold start, and a `--recovery` start is refused,
//! there being nothing to recover); else it keeps them and says why (`WTRN0012W`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_core::{catalog, emit};
use keel_engine::messaging::{Messaging, MessagingError, Outcome, Transaction};
use keel_engine::Engine;
use keel_tx::coordinator::{
    Coordinator, Resource, ResourceError, ResourceFuture, TxError, Vote, Xid,
};
use keel_tx::log::{Op as LogOp, RecoveryLog};
use keel_tx::SqlResource;
/// What a data source check finds (`check_datasource`, `keel datasource create`).
pub use keel_tx::TwoPhase;
use serde::{Deserialize, Serialize};

/// Pause between recovery passes that found something (a late PREPARE may still land).
const PASS_PAUSE_MS: u64 = 250;
/// Back-off for unreachable resources.
const RETRY_FIRST_MS: u64 = 1_000;
const RETRY_MAX_MS: u64 = 30_000;
/// How often a running server looks for decisions of its own that wait for a resource.
const PENDING_CHECK_MS: u64 = 5_000;
/// How often a running server runs a recovery pass with nothing known to be pending.
const SLOW_PASS_MS: u64 = 60_000;

/// A messaging engine as a resource: branches are the engine's local transactions, prepared
/// durably in its store (`keel_engine::messaging::xa`).
pub struct MeResource {
    name: String,
    engine: Arc<Engine>,
    /// Branches begun and not prepared yet, with whether a rollback releases (true) or counts
    /// a failed delivery (false).
    open: Mutex<HashMap<Xid, (Transaction, bool)>>,
}

impl MeResource {
    pub fn new(engine: Arc<Engine>) -> MeResource {
        MeResource {
            name: engine.config().me.clone(),
            engine,
            open: Mutex::new(HashMap::new()),
        }
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> ResourceError {
        ResourceError {
            resource: self.name.clone(),
            detail: format!("{what}: {e}"),
            not_found: false,
        }
    }

    pub fn messaging(&self) -> Result<Arc<Messaging>, ResourceError> {
        self.engine.messaging().map_err(|e| self.err("engine", e))
    }

    /// Opens branch `xid`: a local transaction of the engine.
    pub fn begin(&self, xid: &Xid) -> Result<(), ResourceError> {
        let m = self.messaging()?;
        self.open
            .lock()
            .expect("open lock")
            .insert(xid.clone(), (m.begin(), false));
        Ok(())
    }

    /// Runs `f` on branch `xid`'s transaction.
    pub fn with_tx<R>(
        &self,
        xid: &Xid,
        f: impl FnOnce(&Messaging, &mut Transaction) -> Result<R, MessagingError>,
    ) -> Result<R, ResourceError> {
        let m = self.messaging()?;
        let mut open = self.open.lock().expect("open lock");
        let (tx, _) = open.get_mut(xid).ok_or_else(|| ResourceError {
            resource: self.name.clone(),
            detail: format!("no open branch {xid}"),
            not_found: true,
        })?;
        f(&m, tx).map_err(|e| self.err("branch", e))
    }

    /// Makes a rollback of open branch `xid` release its deliveries instead of counting a
    /// failed delivery (the failure was not the message's).
    pub fn release_on_rollback(&self, xid: &Xid) {
        if let Some((_, release)) = self.open.lock().expect("open lock").get_mut(xid) {
            *release = true;
        }
    }

    /// A phase two's answer as the coordinator takes it ("not found": resolved before).
    fn resolved(
        &self,
        xid: &Xid,
        what: &str,
        r: Result<keel_engine::messaging::xa::Resolved, MessagingError>,
    ) -> Result<(), ResourceError> {
        match r {
            Ok(keel_engine::messaging::xa::Resolved::Done) => Ok(()),
            Ok(keel_engine::messaging::xa::Resolved::NotFound) => Err(ResourceError {
                resource: self.name.clone(),
                detail: format!("no prepared branch {xid}"),
                not_found: true,
            }),
            Err(e) => Err(self.err(what, e)),
        }
    }

    fn take(&self, xid: &Xid) -> Option<(Transaction, bool)> {
        self.open.lock().expect("open lock").remove(xid)
    }
}

impl Resource for MeResource {
    fn name(&self) -> &str {
        &self.name
    }

    fn prepare<'a>(&'a self, xid: &'a Xid) -> ResourceFuture<'a, Vote> {
        Box::pin(async move {
            let (tx, _) = self
                .take(xid)
                .ok_or_else(|| self.err("prepare", format!("no open branch {xid}")))?;
            let m = self.messaging()?;
            match m.xa_prepare(tx, &xid.to_string()).await {
                Ok(true) => Ok(Vote::Commit),
                Ok(false) => Ok(Vote::ReadOnly),
                Err(e) => Err(self.err("prepare", e)),
            }
        })
    }

    fn commit<'a>(&'a self, xid: &'a Xid, one_phase: bool) -> ResourceFuture<'a, ()> {
        Box::pin(async move {
            let m = self.messaging()?;
            if one_phase {
                let (tx, _) = self
                    .take(xid)
                    .ok_or_else(|| self.err("commit", format!("no open branch {xid}")))?;
                return m
                    .commit_or_release(tx)
                    .await
                    .map(|_| ())
                    .map_err(|e| self.err("commit", e));
            }
            self.resolved(xid, "commit", m.xa_commit(&xid.to_string()).await)
        })
    }

    fn rollback<'a>(&'a self, xid: &'a Xid) -> ResourceFuture<'a, ()> {
        Box::pin(async move {
            let m = self.messaging()?;
            if let Some((tx, release)) = self.take(xid) {
                let outcome = if release {
                    Outcome::Released
                } else {
                    Outcome::Failed
                };
                return m
                    .rollback_as(tx, outcome)
                    .await
                    .map_err(|e| self.err("rollback", e));
            }
            self.resolved(xid, "rollback", m.xa_rollback(&xid.to_string()).await)
        })
    }

    fn recover(&self) -> ResourceFuture<'_, Vec<Xid>> {
        Box::pin(async move {
            // Recovery and `keel tx list` start here: a stopped engine's reason says what
            // starts it (with `--flush` for a restored store: WTRN0003W repeats it).
            let m = match self.engine.messaging() {
                Ok(m) => m,
                Err(_) => return Err(self.err("engine", self.engine.why_not_started().await)),
            };
            let ids = m.xa_recover().await.map_err(|e| self.err("recover", e))?;
            // Ids that are not XIDs are not a coordinator's: leave them alone.
            Ok(ids.iter().filter_map(|id| id.parse().ok()).collect())
        })
    }
}

/// A partnerlog record: a resource that may hold branches of this server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Partner {
    kind: String,
    name: String,
}

impl Partner {
    /// Stable record id (FNV-1a of kind and name): the same resource is one record.
    fn id(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.kind.bytes().chain([0]).chain(self.name.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }
}

/// Wraps a resource to remember why it failed during a recovery pass (for WTRN0003W).
struct Watched {
    inner: Arc<dyn Resource>,
    errors: Arc<Mutex<Vec<(String, String)>>>,
}

impl Watched {
    fn note<T>(&self, r: Result<T, ResourceError>) -> Result<T, ResourceError> {
        if let Err(e) = &r {
            if !e.not_found {
                self.errors
                    .lock()
                    .expect("errors lock")
                    .push((self.inner.name().to_string(), e.detail.clone()));
            }
        }
        r
    }
}

impl Resource for Watched {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn prepare<'a>(&'a self, xid: &'a Xid) -> ResourceFuture<'a, Vote> {
        self.inner.prepare(xid)
    }
    fn commit<'a>(&'a self, xid: &'a Xid, one_phase: bool) -> ResourceFuture<'a, ()> {
        Box::pin(async move { self.note(self.inner.commit(xid, one_phase).await) })
    }
    fn rollback<'a>(&'a self, xid: &'a Xid) -> ResourceFuture<'a, ()> {
        Box::pin(async move { self.note(self.inner.rollback(xid).await) })
    }
    fn recover(&self) -> ResourceFuture<'_, Vec<Xid>> {
        Box::pin(async move { self.note(self.inner.recover().await) })
    }
}

/// What recovery did in all.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RecoveryStatus {
    pub complete: bool,
    pub passes: u64,
    pub committed: u64,
    pub rolled_back: u64,
    /// Transactions the committed and rolled-back branches belong to.
    pub transactions: u64,
    /// Decisions waiting for a resource at the last pass.
    pub pending: u64,
    pub last_error: Option<String>,
}

/// One transaction `keel tx list` shows.
#[derive(Debug, Clone, Serialize)]
pub struct InDoubt {
    /// The global transaction id (`FORMAT:GTRID:`), what `keel tx commit|rollback` take.
    pub xid: String,
    /// `committing` (decision logged, some branch not told yet), `in-doubt` (prepared by an
    /// earlier run with no decision: recovery rolls it back), or `running` (this run's, being
    /// decided now).
    pub state: &'static str,
    /// `resource: branch xid` of every branch known.
    pub branches: Vec<String>,
}

/// A resource that did not answer `keel tx list`: whether it holds transactions in doubt is
/// not known.
#[derive(Debug, Clone, Serialize)]
pub struct Unknown {
    pub resource: String,
    pub reason: String,
}

/// What `keel tx list` shows: the transactions in doubt found, and the resources that could
/// not be asked (an empty list of transactions means "none" only when this is empty too).
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub transactions: Vec<InDoubt>,
    pub unknown: Vec<Unknown>,
}

/// Most transactions recovery counts one by one (beyond it, the count stops growing).
const RESOLVED_COUNTED_MAX: usize = 1 << 20;

/// The transaction service of one server.
pub struct TxService {
    server: String,
    dir: PathBuf,
    coord: Arc<Coordinator>,
    partnerlog: RecoveryLog,
    /// Decisions of earlier runs (and pending ones of this run) not finished yet; held during
    /// a recovery pass and a resolution by hand, which therefore never overlap.
    live: tokio::sync::Mutex<BTreeMap<u64, Vec<u8>>>,
    mes: HashMap<String, Arc<MeResource>>,
    sql: HashMap<String, Arc<dyn SqlResource>>,
    /// Every configured resource, for recovery.
    resources: Vec<Arc<dyn Resource>>,
    /// Partnerlog resources that are not configured any more.
    missing: Vec<String>,
    status: Mutex<RecoveryStatus>,
    /// Global ids of the transactions recovery finished branches of (WSVR0105I counts
    /// transactions, not branches); at most `RESOLVED_COUNTED_MAX`.
    resolved: Mutex<std::collections::BTreeSet<Vec<u8>>>,
}

/// The recovery identity in XIDs: `node/server` (unique in the cell), hashed when longer than
/// XA allows.
pub fn recovery_id(node: &str, server: &str) -> String {
    let id = format!("{node}/{server}");
    if id.len() <= keel_tx::coordinator::RECOVERY_ID_BYTES_MAX {
        return id;
    }
    let p = Partner {
        kind: node.into(),
        name: server.into(),
    };
    format!("~{:016x}", p.id())
}

/// A data source URL with its password put in (percent-encoded), for the connection only.
pub fn url_with_password(url: &str, password: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    let user = &rest[..at];
    if user.contains(':') {
        return url.to_string(); // has one already
    }
    let mut enc = String::with_capacity(password.len() * 3);
    for b in password.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            enc.push(b as char);
        } else {
            enc.push_str(&format!("%{b:02X}"));
        }
    }
    format!("{}{user}:{enc}{}", &url[..scheme_end + 3], &rest[at..])
}

/// The resource of data source `d`, its password (from the profile's secrets) put into the
/// URL in memory only.
fn sql_resource(
    d: &keel_config::DataSourceCfg,
    password: Option<&str>,
) -> Result<Arc<dyn SqlResource>, String> {
    let url = match password {
        Some(p) => url_with_password(&d.url, p),
        None => d.url.clone(),
    };
    let pool = d.pool_max as usize;
    Ok(match d.kind {
        keel_config::DataSourceKind::Postgres => {
            Arc::new(keel_tx::pg::PgResource::new(&d.name, &url, pool))
        }
        keel_config::DataSourceKind::MariaDb => Arc::new(
            keel_tx::mariadb::MariaDbResource::new(&d.name, &url, pool)
                .map_err(|e| e.to_string())?,
        ),
    })
}

/// Asks the database of data source `d` whether it can take part in two-phase commit, as
/// `keel datasource create` does before saving it. `Err`: it could not be asked (unreachable,
/// refused credentials, a URL that does not parse), with the reason.
pub async fn check_datasource(
    d: &keel_config::DataSourceCfg,
    password: Option<&str>,
) -> Result<TwoPhase, String> {
    let r = sql_resource(d, password)?;
    r.check().await.map_err(|e| e.detail)
}

/// What a resolution by hand did (`keel tx commit|rollback`, `--json` shows it whole).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Resolved {
    /// One sentence for the operator.
    pub message: String,
    /// `commit` or `rollback`.
    pub outcome: &'static str,
    /// Prepared branches finished.
    pub branches: usize,
    /// The outcome differs from what recovery would have decided.
    pub heuristic: bool,
}

impl TxService {
    /// Opens the recovery logs under `dir` and builds the resources: `engines` (the server's
    /// messaging engines) and every data source of `cfg` (passwords from the profile's
    /// secrets). A corrupt log is an error (nothing is discarded).
    pub async fn open(
        layout: &keel_core::Layout,
        cfg: &keel_config::Config,
        node: &str,
        server: &str,
        dir: &Path,
        engines: &[Arc<Engine>],
    ) -> Result<Arc<TxService>, String> {
        let (tranlog, live) = RecoveryLog::open(&dir.join("tranlog"))
            .map_err(|e| format!("the transaction log cannot be opened: {e}"))?;
        let (partnerlog, partners) = RecoveryLog::open(&dir.join("partnerlog"))
            .map_err(|e| format!("the partner log cannot be opened: {e}"))?;
        let rid = recovery_id(node, server);
        let coord = Arc::new(Coordinator::new(&rid, keel_core::unix_ms(), tranlog));
        if let Some(max) = live.keys().next_back() {
            coord.reserve_ids_above(*max);
        }

        let mut mes = HashMap::new();
        let mut resources: Vec<Arc<dyn Resource>> = Vec::new();
        let mut configured = Vec::new();
        for e in engines {
            let r = Arc::new(MeResource::new(e.clone()));
            configured.push(Partner {
                kind: "me".into(),
                name: r.name.clone(),
            });
            resources.push(r.clone());
            mes.insert(r.name.clone(), r);
        }
        let mut sql: HashMap<String, Arc<dyn SqlResource>> = HashMap::new();
        for d in &cfg.datasources {
            let password = keel_config::read_datasource_password(layout, &d.name)
                .map_err(|e| format!("data source {}: {e}", d.name))?;
            let r = sql_resource(d, password.as_deref())?;
            configured.push(Partner {
                kind: d.kind.as_str().into(),
                name: d.name.clone(),
            });
            resources.push(r.clone());
            sql.insert(d.name.clone(), r);
        }

        // Partnerlog: resources of earlier runs no longer configured are reported; every
        // configured one is recorded (forced) before any transaction of this run.
        let mut missing = Vec::new();
        let mut known = std::collections::HashSet::new();
        for (id, data) in &partners {
            match postcard::from_bytes::<Partner>(data) {
                Ok(p) => {
                    known.insert(*id);
                    if !configured.contains(&p) {
                        emit!(catalog::WTRN0005W, resource = p.name, server = server);
                        missing.push(p.name);
                    }
                }
                Err(e) => {
                    return Err(format!(
                        "the partner log under {} holds record {id} that does not decode ({e}); restore the recovery logs from a copy or report this",
                        dir.display()
                    ))
                }
            }
        }
        let new: Vec<LogOp> = configured
            .iter()
            .filter(|p| !known.contains(&p.id()))
            .map(|p| LogOp::Put {
                id: p.id(),
                data: postcard::to_stdvec(p).expect("partner records encode"),
            })
            .collect();
        if !new.is_empty() {
            partnerlog
                .write(new, true)
                .await
                .map_err(|e| format!("the partner log cannot be written: {e}"))?;
        }
        emit!(
            catalog::WTRN0001I,
            server = server,
            recovery_id = rid,
            incarnation = coord.incarnation(),
            resources = resources.len(),
            decisions = live.len()
        );
        Ok(Arc::new(TxService {
            server: server.to_string(),
            dir: dir.to_path_buf(),
            coord,
            partnerlog,
            live: tokio::sync::Mutex::new(live),
            mes,
            sql,
            resources,
            missing,
            status: Mutex::new(RecoveryStatus::default()),
            resolved: Mutex::new(std::collections::BTreeSet::new()),
        }))
    }

    pub fn coordinator(&self) -> &Arc<Coordinator> {
        &self.coord
    }

    pub fn me(&self, name: &str) -> Option<Arc<MeResource>> {
        self.mes.get(name).cloned()
    }

    /// The ME resource of `bus`.
    pub fn me_of_bus(&self, bus: &str) -> Option<Arc<MeResource>> {
        self.mes
            .values()
            .find(|m| m.engine.config().bus == bus)
            .cloned()
    }

    pub fn datasource(&self, name: &str) -> Option<Arc<dyn SqlResource>> {
        self.sql.get(name).cloned()
    }

    /// Asks every data source whether it can take part in two-phase commit (run at a normal
    /// start, beside new work): one that cannot is `WTRN0013E`, and its branches are refused
    /// when they begin (see `keel_tx::pg`), so its messages wait instead of failing at prepare.
    /// One that cannot be reached now is checked when a branch first connects to it.
    pub async fn check_datasources(&self) {
        for (name, ds) in &self.sql {
            match ds.check().await {
                Ok(TwoPhase::Ready) => {}
                Ok(TwoPhase::Unable(why)) => {
                    emit!(catalog::WTRN0013E, datasource = name, reason = why)
                }
                Err(e) => {
                    tracing::info!(target: "keel_server", datasource = %name, error = %e, "data source not checked at start (unreachable); its first connection checks it")
                }
            }
        }
    }

    pub fn status(&self) -> RecoveryStatus {
        self.status.lock().expect("status lock").clone()
    }

    /// Runs recovery passes until one finds nothing in doubt and every resource answered
    /// (see the module docs), or `stop` turns true. Returns the totals; `complete` says which.
    pub async fn recover(&self, mut stop: tokio::sync::watch::Receiver<bool>) -> RecoveryStatus {
        let mut retry_ms = RETRY_FIRST_MS;
        let mut quiet_passes = 0;
        loop {
            if *stop.borrow() {
                return self.status();
            }
            let errors = Arc::new(Mutex::new(Vec::new()));
            let watched: Vec<Arc<dyn Resource>> = self
                .resources
                .iter()
                .map(|r| {
                    Arc::new(Watched {
                        inner: r.clone(),
                        errors: errors.clone(),
                    }) as Arc<dyn Resource>
                })
                .collect();
            let pass = {
                let mut live = self.live.lock().await;
                self.coord.recover_pass(&mut live, &watched).await
            };
            let errors = std::mem::take(&mut *errors.lock().expect("errors lock"));
            // progress: branches finished this pass; waiting: decisions that could not be.
            let (progress, waiting) = match &pass {
                Ok(r) => {
                    let transactions = {
                        let mut seen = self.resolved.lock().expect("resolved lock");
                        for g in &r.transactions {
                            if seen.len() >= RESOLVED_COUNTED_MAX {
                                break;
                            }
                            seen.insert(g.clone());
                        }
                        seen.len() as u64
                    };
                    let mut st = self.status.lock().expect("status lock");
                    st.passes += 1;
                    st.committed += r.committed as u64;
                    st.rolled_back += r.rolled_back as u64;
                    st.transactions = transactions;
                    let pending_changed = st.pending != r.pending as u64;
                    st.pending = r.pending as u64;
                    st.last_error = errors.first().map(|(r, e)| format!("{r}: {e}"));
                    if r.committed + r.rolled_back > 0 || pending_changed {
                        emit!(
                            catalog::WTRN0002I,
                            pass = st.passes,
                            server = self.server,
                            committed = r.committed,
                            rolled_back = r.rolled_back,
                            pending = r.pending
                        );
                    }
                    (r.committed + r.rolled_back > 0, r.pending > 0)
                }
                Err(e) => {
                    let mut st = self.status.lock().expect("status lock");
                    st.passes += 1;
                    st.last_error = Some(e.to_string());
                    tracing::error!(target: "keel_server", error = %e, "transaction recovery pass failed");
                    (false, true)
                }
            };
            let pause_ms = if progress {
                quiet_passes = 0;
                retry_ms = RETRY_FIRST_MS;
                PASS_PAUSE_MS
            } else if errors.is_empty() && !waiting {
                retry_ms = RETRY_FIRST_MS;
                quiet_passes += 1;
                // Two quiet passes in a row, a pause apart: a PREPARE a crashed process had in
                // flight has had time to land (and would have been found).
                if quiet_passes >= 2 {
                    let mut st = self.status.lock().expect("status lock");
                    st.complete = true;
                    st.pending = 0;
                    return st.clone();
                }
                PASS_PAUSE_MS
            } else {
                // A resource failed, or a decision waits for one that is not configured
                // (WTRN0005W at start; an operator resolves it by hand): not complete; try
                // again with back-off.
                quiet_passes = 0;
                let mut seen = std::collections::HashSet::new();
                for (r, e) in &errors {
                    if seen.insert(r.clone()) {
                        emit!(
                            catalog::WTRN0003W,
                            resource = r,
                            reason = e,
                            retry_s = retry_ms / 1000
                        );
                    }
                }
                let p = retry_ms;
                retry_ms = (retry_ms * 2).min(RETRY_MAX_MS);
                p
            };
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(pause_ms)) => {}
                _ = stop.wait_for(|v| *v) => return self.status(),
            }
        }
    }

    /// Keeps finishing this run's pending decisions and unconfirmed rollbacks while the
    /// server runs, and every `SLOW_PASS_MS` runs a pass anyway (an earlier run's PREPARE can
    /// land late at a slow database).
    pub async fn watch_pending(&self, stop: tokio::sync::watch::Receiver<bool>) {
        let mut stop2 = stop.clone();
        let mut since_pass_ms = 0;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(PENDING_CHECK_MS)) => {}
                _ = stop2.wait_for(|v| *v) => return,
            }
            since_pass_ms += PENDING_CHECK_MS;
            let due = self.coord.has_pending()
                || !self.live.lock().await.is_empty()
                || since_pass_ms >= SLOW_PASS_MS;
            if due {
                since_pass_ms = 0;
                let s = self.recover(stop.clone()).await;
                if s.complete && s.committed + s.rolled_back > 0 {
                    emit!(
                        catalog::WTRN0004I,
                        server = self.server,
                        committed = s.committed,
                        rolled_back = s.rolled_back,
                        passes = s.passes
                    );
                }
            }
        }
    }

    /// Commits a global transaction through the coordinator, logging what an operator needs.
    pub async fn commit(&self, t: keel_tx::coordinator::Transaction) -> Result<(), TxError> {
        let r = self.coord.commit(t).await;
        if let Err(TxError::CommitPending { xid, cause, .. }) = &r {
            emit!(catalog::WTRN0007E, xid = xid, reason = cause);
        }
        r
    }

    /// What `keel tx list` shows: logged decisions not finished, prepared branches of this
    /// server at every reachable resource, and the resources that did not answer.
    pub async fn list(&self) -> Result<Listing, String> {
        let mut live = self.live.lock().await;
        self.coord.merge_pending(&mut live);
        let decisions = self.coord.decisions(&live).map_err(|e| e.to_string())?;
        let mut out: BTreeMap<Vec<u8>, InDoubt> = BTreeMap::new();
        let global = |x: &Xid| {
            Xid {
                format_id: x.format_id,
                gtrid: x.gtrid.clone(),
                bqual: Vec::new(),
            }
            .to_string()
        };
        for (_, branches) in &decisions {
            for (r, x) in branches {
                out.entry(x.gtrid.clone())
                    .or_insert_with(|| InDoubt {
                        xid: global(x),
                        state: "committing",
                        branches: Vec::new(),
                    })
                    .branches
                    .push(format!("{r}: {x} (decision logged)"));
            }
        }
        let mut unknown = Vec::new();
        for r in &self.resources {
            let prepared = match r.recover().await {
                Ok(p) => p,
                Err(e) => {
                    // Not "nothing": the resource may hold branches; the listing says so.
                    unknown.push(Unknown {
                        resource: r.name().to_string(),
                        reason: e.detail,
                    });
                    continue;
                }
            };
            for x in prepared {
                if x.keel_tx(self.coord.recovery_id()).is_none() {
                    continue;
                }
                let state = if self.coord.is_recoverable(&x) {
                    "in-doubt"
                } else {
                    "running"
                };
                out.entry(x.gtrid.clone())
                    .or_insert_with(|| InDoubt {
                        xid: global(&x),
                        state,
                        branches: Vec::new(),
                    })
                    .branches
                    .push(format!("{}: {x} (prepared)", r.name()));
            }
        }
        Ok(Listing {
            transactions: out.into_values().collect(),
            unknown,
        })
    }

    /// Finishes transaction `xid` (global or branch form) by hand at every resource; against
    /// a logged decision a rollback is heuristic (WTRN0006W either way).
    pub async fn resolve(&self, xid: &str, commit: bool) -> Result<Resolved, String> {
        let x: Xid = xid.parse()?;
        if x.keel_tx(self.coord.recovery_id()).is_none() {
            return Err(format!(
                "transaction {xid} is not one of server {}'s (its id does not carry this server's recovery identity {})",
                self.server,
                self.coord.recovery_id()
            ));
        }
        let mut live = self.live.lock().await;
        self.coord.merge_pending(&mut live);
        let decisions = self.coord.decisions(&live).map_err(|e| e.to_string())?;
        let decided: Vec<u64> = decisions
            .iter()
            .filter(|(_, b)| b.iter().any(|(_, bx)| bx.gtrid == x.gtrid))
            .map(|(id, _)| *id)
            .collect();
        if decided.is_empty() && !self.coord.is_recoverable(&x) && !self.coord.is_unresolved(&x) {
            return Err(format!(
                "transaction {xid} is running in this server now; it finishes by itself"
            ));
        }
        // Every resource must answer first: a resolution that reached only some branches would
        // be finished the other way by recovery (a mixed outcome).
        let mut branches = Vec::new();
        for r in &self.resources {
            let prepared = r.recover().await.map_err(|e| {
                format!("transaction {xid}: nothing was done, because {e}; try again when the resource answers")
            })?;
            branches.extend(
                prepared
                    .into_iter()
                    .filter(|b| b.gtrid == x.gtrid)
                    .map(|b| (r.clone(), b)),
            );
        }
        // The operator's decision is durable before any branch hears it, so whatever fails
        // below is finished the same way by recovery.
        // The operator's decision replaces any logged one (whose branches at resources that
        // are not configured any more only an operator can see to: WTRN0005W).
        if commit {
            let named = branches
                .iter()
                .map(|(r, b)| (r.name().to_string(), b.clone()))
                .collect();
            self.coord
                .decide_by_hand(named)
                .await
                .map_err(|e| format!("transaction {xid}: the decision could not be logged: {e}"))?;
        } else {
            self.coord.rolled_back_by_hand(&x.gtrid);
        }
        for id in &decided {
            self.coord.forget(*id).await.map_err(|e| e.to_string())?;
            live.remove(id);
        }
        let mut done = 0usize;
        let mut failures = Vec::new();
        for (r, b) in &branches {
            let res = if commit {
                r.commit(b, false).await
            } else {
                r.rollback(b).await
            };
            match res {
                Ok(()) => done += 1,
                Err(e) if e.not_found => {}
                Err(e) => failures.push(e.to_string()),
            }
        }
        if commit {
            // Recovery's next pass removes the records (the logged ones and the operator's)
            // once nothing of them is prepared anywhere.
            self.coord.merge_pending(&mut live);
        }
        if !failures.is_empty() {
            return Err(format!(
                "transaction {xid}: {done} branch(es) finished; the others ({}) are finished the same way by recovery when their resource answers",
                failures.join("; ")
            ));
        }
        let outcome = if commit { "commit" } else { "rollback" };
        // A heuristic outcome: the operator's decision differs from what recovery would do.
        let heuristic = decided.is_empty() == commit;
        let mut detail = match (decided.is_empty(), commit) {
            (false, true) => "the logged decision was commit: no heuristic outcome".to_string(),
            (false, false) => "heuristic: the logged decision was commit, so branches told before may have committed".to_string(),
            (true, true) => "heuristic: no decision was logged, so recovery would have rolled it back".to_string(),
            (true, false) => "no decision was logged: the same outcome recovery gives".to_string(),
        };
        let unreached: std::collections::BTreeSet<&str> = decisions
            .iter()
            .filter(|(id, _)| decided.contains(id))
            .flat_map(|(_, b)| b.iter().map(|(r, _)| r.as_str()))
            .filter(|r| !self.resources.iter().any(|c| c.name() == *r))
            .collect();
        if !unreached.is_empty() {
            detail.push_str(&format!(
                "; its branches at {} (not configured) were not reached: finish them at the resource itself",
                unreached.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
        emit!(
            catalog::WTRN0006W,
            xid = xid,
            outcome = outcome,
            detail = detail
        );
        Ok(Resolved {
            message: format!(
                "transaction {xid}: {outcome} of {done} prepared branch(es); {detail}"
            ),
            outcome,
            branches: done,
            heuristic,
        })
    }

    /// Clean stop: closes the logs; with no decision logged, removes their files (a cold
    /// start next time). Returns the decisions left.
    pub async fn shutdown(&self) -> usize {
        // Held to the end: no resolution by hand runs while the logs close.
        let live = self.live.lock().await;
        let settled = live.is_empty() && !self.coord.has_pending() && self.status().complete;
        let left = match self.coord_close().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(target: "keel_server", error = %e, "closing the transaction log failed");
                return usize::MAX;
            }
        };
        let _ = self.partnerlog.close().await;
        if left == 0 && settled && self.missing.is_empty() {
            for sub in ["tranlog", "partnerlog"] {
                let d = self.dir.join(sub);
                for f in ["log1", "log2"] {
                    let _ = std::fs::remove_file(d.join(f));
                }
                if let Ok(f) = std::fs::File::open(&d) {
                    let _ = f.sync_all();
                }
            }
            emit!(catalog::WTRN0011I, server = self.server);
        } else {
            // Work in doubt only when it is known to be: an early stop, or a resource that
            // never answered, leaves it unknown (WTRN0012W says which).
            let what = if left > 0 {
                format!("{left} logged decision(s) not yet told to every branch: work in doubt")
            } else if !self.missing.is_empty() {
                format!(
                    "resources no longer configured may hold work in doubt: {}",
                    self.missing.join(", ")
                )
            } else {
                let unknown = "recovery of earlier runs had not finished, so whether any work is in doubt is not known";
                match self.status().last_error {
                    Some(e) => format!("{unknown} (last failure: {e})"),
                    None => unknown.to_string(),
                }
            };
            emit!(catalog::WTRN0012W, server = self.server, what = what);
        }
        left
    }

    async fn coord_close(&self) -> Result<usize, keel_tx::log::LogError> {
        self.coord.close_log().await
    }
}

/// The `TransactionService` admin object of a server.
pub struct TxServiceObject {
    name: keel_core::ObjectName,
    svc: Arc<TxService>,
}

impl TxServiceObject {
    pub fn new(svc: Arc<TxService>, node: &str) -> TxServiceObject {
        TxServiceObject {
            name: keel_core::ObjectName::new(&[
                ("type", "TransactionService"),
                ("name", &svc.server),
                ("node", node),
                ("process", &svc.server),
            ]),
            svc,
        }
    }
}

impl keel_admin::AdminObject for TxServiceObject {
    fn name(&self) -> keel_core::ObjectName {
        self.name.clone()
    }

    fn attributes(&self) -> serde_json::Map<String, serde_json::Value> {
        let s = self.svc.status();
        keel_admin::attribute_map(serde_json::json!({
            "server": self.svc.server,
            "recovery_id": self.svc.coord.recovery_id(),
            "incarnation": self.svc.coord.incarnation(),
            "recovery_complete": s.complete,
            "recovery_passes": s.passes,
            "committed": s.committed,
            "rolled_back": s.rolled_back,
            "pending": s.pending,
            "last_error": s.last_error,
            "resources": self.svc.resources.iter().map(|r| r.name().to_string()).collect::<Vec<_>>(),
        }))
    }

    fn operations(&self) -> Vec<keel_admin::Op> {
        vec![
            keel_admin::Op::monitor(
                "list",
                "transactions in doubt {transactions: [{xid, state (committing, in-doubt, running), branches}], unknown: [{resource, reason}]}: resources in unknown did not answer, so they may hold more",
            ),
            keel_admin::Op::operator(
                "commit",
                "commit(XID): commit every prepared branch of the transaction by hand",
            ),
            keel_admin::Op::operator(
                "rollback",
                "rollback(XID): roll back every prepared branch of the transaction by hand",
            ),
            keel_admin::Op::monitor(
                "recoveryStatus",
                "complete, passes, committed, rolled_back, pending, last_error",
            ),
        ]
    }

    fn invoke<'a>(&'a self, op: &'a str, args: Vec<serde_json::Value>) -> keel_admin::OpFuture<'a> {
        Box::pin(async move {
            let errs = keel_admin::OpErrors::new(&self.name, op);
            match op {
                "list" => {
                    let l = self.svc.list().await.map_err(|e| errs.failed(e))?;
                    Ok(serde_json::to_value(l).expect("lists serialize"))
                }
                "recoveryStatus" => {
                    Ok(serde_json::to_value(self.svc.status()).expect("status serializes"))
                }
                "commit" | "rollback" => {
                    let xid = match args.as_slice() {
                        [serde_json::Value::String(x)] => x.clone(),
                        _ => return Err(errs.bad("expected one argument: the transaction id")),
                    };
                    self.svc
                        .resolve(&xid, op == "commit")
                        .await
                        .map(|r| serde_json::to_value(r).expect("a Resolved serializes"))
                        .map_err(|e| errs.failed(e))
                }
                _ => Err(errs.bad("unknown operation")),
            }
        })
    }
}
