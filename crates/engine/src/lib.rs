//! Messaging engines: one per bus a server is a member of, each with its own data store.
//!
//! This part holds an engine's lifecycle (`stopped` → `starting` → `started` → `stopping`),
//! opens and stamps its data store, and refuses a normal start of a restored store
//! (`CWSIP0103E`). Every start moves the store to a new incarnation before it mints an ID, so
//! message IDs never collide with earlier ones, also when a store file was copied back without
//! a restore mark. A restart-after-restore (FLUSH) start moves the restore state from `restored`
//! to `flush-pending` in the commit of `messaging::streams::begin_flush`; the last peer's
//! confirmation (`Messaging::flush_confirm`) moves it to `none` in its commit, then
//! `CWSIP0783E` (at once when there is no peer to wait for). A normal start of a
//! `flush-pending` store continues the flush (`messaging::streams::continue_flush`).
//!
//! Invariants:
//! - an open store holds an exclusive lock on `<store>.lock` (keel-store), and a store restore
//!   takes the same lock, so a restore can never replace the file under a running engine, and an
//!   engine can never start on a file half restored;
//! - the store is opened only in `start` and closed in `stop`: a stopped engine holds no file;
//! - state transitions are serialised by one async mutex, so concurrent start/stop requests
//!   (admin API, server start, server stop) see a consistent state.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use keel_core::{catalog, emit, ObjectName};
use keel_store::{PgStore, RestoreState, SqliteStore, Store, StoreInfo};

mod admin;
pub mod messaging;
pub mod queue;

pub use admin::{EngineObject, QueuePointObject};

/// How an engine is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    Normal,
    /// Restart after restore.
    Flush,
    /// Normal start on a restored store, on the operator's explicit say-so (logged).
    ForceNormal,
}

impl StartMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StartMode::Normal => "normal",
            StartMode::Flush => "restart-after-restore (FLUSH)",
            StartMode::ForceNormal => "normal (restored check overridden)",
        }
    }

    /// Parses the admin argument (`FLUSH`, `NORMAL`, `FORCE_NORMAL`, any case).
    pub fn parse(s: &str) -> Option<StartMode> {
        match s.to_ascii_uppercase().as_str() {
            "" | "NORMAL" => Some(StartMode::Normal),
            "FLUSH" => Some(StartMode::Flush),
            "FORCE_NORMAL" | "FORCE-NORMAL" => Some(StartMode::ForceNormal),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeState {
    Stopped,
    Starting,
    Started,
    Stopping,
}

impl MeState {
    pub fn as_str(self) -> &'static str {
        match self {
            MeState::Stopped => "stopped",
            MeState::Starting => "starting",
            MeState::Started => "started",
            MeState::Stopping => "stopping",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("messaging engine {me} is not started: its data store was restored from a backup; start it in restart-after-restore mode with `keel me start {me} --flush` (or AdminControl.invoke(me, \"start\", [\"FLUSH\"]))")]
    Restored { me: String },
    #[error("messaging engine {me} is already {state}")]
    AlreadyInState { me: String, state: &'static str },
    #[error("messaging engine {me} is in a recovery-mode server: it is not started there (FLUSH is ignored in recovery mode); start the server normally, then start the engine")]
    RecoveryMode { me: String },
    #[error("messaging engine {me} could not begin its restart-after-restore (FLUSH): {source}")]
    Flush {
        me: String,
        #[source]
        source: Box<messaging::MessagingError>,
    },
    #[error("messaging engine {me} could not open its data store: {source}")]
    Store {
        me: String,
        #[source]
        source: keel_store::StoreError,
    },
}

/// What an engine needs to know, from the configuration.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub me: String,
    pub uuid: String,
    pub bus: String,
    pub node: String,
    pub server: String,
    pub store_path: PathBuf,
    /// Every destination of the bus; the engine serves those whose `me` is itself.
    pub destinations: Vec<keel_config::DestinationCfg>,
    pub max_message_bytes: u64,
    /// PostgreSQL store URL; None = the SQLite file at `store_path`.
    pub store_url: Option<String>,
    /// The other member engines of the bus (name, UUID): the peers a FLUSH waits for.
    pub peers: Vec<(String, String)>,
    /// How long a target remembers which messages a source delivered, to drop those resent
    /// after a FLUSH (the bus's duplicate window).
    pub duplicate_window_ms: u64,
}

impl EngineConfig {
    /// `Keel:type=SIBMessagingEngine,name=ME,bus=B,node=N,process=S` (DESIGN §3).
    pub fn object_name(&self) -> ObjectName {
        ObjectName::new(&[
            ("type", "SIBMessagingEngine"),
            ("name", &self.me),
            ("bus", &self.bus),
            ("node", &self.node),
            ("process", &self.server),
        ])
    }
}

/// What a data store says about its condition (`Engine::store_health`).
pub use keel_store::StoreHealth;

/// The store file of an engine inside a profile: `databases/<me>.sqlite`.
pub use keel_store::sqlite_path as store_path;

struct Running {
    store: Arc<dyn Store>,
    /// The same store when it is the embedded SQLite file (file backups need it).
    sqlite: Option<Arc<SqliteStore>>,
    messaging: Arc<messaging::Messaging>,
}

/// The PostgreSQL schema of an engine's store: `keel_<me>_<uuid prefix>`, lowercased with
/// other characters as `_`. The UUID part keeps two names that map alike apart.
pub fn pg_schema(me: &str, uuid: &str) -> String {
    let tail: String = uuid
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(8)
        .collect::<String>()
        .to_ascii_lowercase();
    let mut body: String = me
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    // PostgreSQL keeps 63 bytes of a name: "keel_" + body + "_" + 8.
    body.truncate(63 - 5 - 1 - tail.len());
    format!("keel_{body}_{tail}")
}

/// CWSIP0108I's `flush` field: a recovery-mode server never runs a restart-after-restore.
const RECOVERY_NO_FLUSH: &str = "; a restart after restore (FLUSH) is not done in recovery mode";

pub struct Engine {
    cfg: EngineConfig,
    /// Serialises lifecycle transitions.
    transition: tokio::sync::Mutex<()>,
    state: Mutex<MeState>,
    running: Mutex<Option<Running>>,
    recovery_mode: bool,
    /// Why the last start failed (cleared when one succeeds): a recovery-mode engine that is
    /// still opening its store must not be reported as one that could not.
    start_failure: Mutex<Option<String>>,
}

impl Engine {
    pub fn new(cfg: EngineConfig, recovery_mode: bool) -> Arc<Engine> {
        Arc::new(Engine {
            cfg,
            transition: tokio::sync::Mutex::new(()),
            state: Mutex::new(MeState::Stopped),
            running: Mutex::new(None),
            recovery_mode,
            start_failure: Mutex::new(None),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn state(&self) -> MeState {
        *self.state.lock().expect("state lock")
    }

    fn set_state(&self, s: MeState) {
        *self.state.lock().expect("state lock") = s;
    }

    /// The open SQLite store of a started engine (None when stopped or in PostgreSQL).
    pub fn sqlite_store(&self) -> Option<Arc<SqliteStore>> {
        self.running
            .lock()
            .expect("running lock")
            .as_ref()
            .and_then(|r| r.sqlite.clone())
    }

    fn open_store(&self) -> Option<Arc<dyn Store>> {
        self.running
            .lock()
            .expect("running lock")
            .as_ref()
            .map(|r| r.store.clone())
    }

    /// The data store's own account of its condition (DESIGN §10); `None` while stopped.
    pub fn store_health(&self) -> Option<StoreHealth> {
        self.open_store().map(|s| s.health())
    }

    /// The state operators see: `failed` for a started engine whose data store failed (it takes
    /// no work until restarted: `keel me stop`, then `keel me start`), else the lifecycle state.
    /// The lifecycle state stays `started` underneath, so a stop still closes the store.
    pub fn reported_state(&self) -> &'static str {
        let state = self.state();
        match self.store_health() {
            Some(StoreHealth::Failed { .. }) if state == MeState::Started => "failed",
            _ => state.as_str(),
        }
    }

    /// "sqlite" or "postgresql", and where.
    pub fn store_location(&self) -> (&'static str, String) {
        match &self.cfg.store_url {
            Some(url) => (
                "postgresql",
                format!("{url} schema {}", pg_schema(&self.cfg.me, &self.cfg.uuid)),
            ),
            None => ("sqlite", self.cfg.store_path.display().to_string()),
        }
    }

    async fn open_pg(&self, url: &str) -> Result<PgStore, keel_store::StoreError> {
        let schema = pg_schema(&self.cfg.me, &self.cfg.uuid);
        match PgStore::open(url, &schema, &self.cfg.me, &self.cfg.uuid).await {
            Err(keel_store::StoreError::Missing { .. }) => {
                PgStore::create(url, &schema, &self.cfg.me, &self.cfg.uuid).await
            }
            other => other,
        }
    }

    pub async fn start(&self, mode: StartMode) -> Result<(), EngineError> {
        if self.recovery_mode {
            return Err(EngineError::RecoveryMode {
                me: self.cfg.me.clone(),
            });
        }
        self.start_inner(mode).await
    }

    /// Opens the engine's store for the transaction service of a recovery-mode server, which
    /// resolves the engine's prepared branches: the server opens no bus port and runs no links
    /// or applications, so nothing else reaches the engine. Operators still cannot start it.
    pub async fn start_for_recovery(&self) -> Result<(), EngineError> {
        assert!(
            self.recovery_mode,
            "only a recovery-mode engine starts for recovery"
        );
        self.start_inner(StartMode::Normal).await
    }

    async fn start_inner(&self, mode: StartMode) -> Result<(), EngineError> {
        let me = &self.cfg.me;
        let _t = self.transition.lock().await;
        let state = self.state();
        if state != MeState::Stopped {
            return Err(EngineError::AlreadyInState {
                me: me.clone(),
                state: state.as_str(),
            });
        }
        self.set_state(MeState::Starting);
        let result = self.open(mode).await;
        *self.start_failure.lock().expect("start_failure lock") =
            result.as_ref().err().map(|e| e.to_string());
        match &result {
            Ok(info) => {
                self.set_state(MeState::Started);
                if self.recovery_mode {
                    // Open for the transaction service only: not "started" for work.
                    emit!(
                        catalog::CWSIP0108I,
                        me = me,
                        messages = info.messages,
                        flush = RECOVERY_NO_FLUSH
                    );
                } else {
                    emit!(
                        catalog::CWSIP0101I,
                        me = me,
                        uuid = info.uuid,
                        incarnation = info.incarnation,
                        messages = info.messages
                    );
                }
            }
            Err(e) => {
                self.set_state(MeState::Stopped);
                match e {
                    EngineError::Restored { .. } => {}
                    other => emit!(catalog::CWSIP0105E, me = me, reason = other),
                }
            }
        }
        result.map(|_| ())
    }

    async fn open(&self, mode: StartMode) -> Result<StoreInfo, EngineError> {
        let me = &self.cfg.me;
        let path = &self.cfg.store_path;
        let (backend, location) = self.store_location();
        // A recovery-mode open is no start: CWSIP0108I alone says what happened.
        if !self.recovery_mode {
            emit!(
                catalog::CWSIP0100I,
                me = me,
                mode = mode.as_str(),
                backend = backend,
                location = location
            );
        }
        let store_err = |source| EngineError::Store {
            me: me.clone(),
            source,
        };
        let (store, sqlite): (Arc<dyn Store>, Option<Arc<SqliteStore>>) = match &self.cfg.store_url
        {
            Some(url) => (Arc::new(self.open_pg(url).await.map_err(store_err)?), None),
            None => {
                let s = Arc::new(if path.exists() {
                    SqliteStore::open(path, me, &self.cfg.uuid).map_err(store_err)?
                } else {
                    SqliteStore::create(path, me, &self.cfg.uuid).map_err(store_err)?
                });
                (s.clone(), Some(s))
            }
        };
        let mut info = store.info().await.map_err(store_err)?;
        if info.restore_state == RestoreState::Restored {
            match mode {
                StartMode::Normal => {
                    emit!(
                        catalog::CWSIP0103E,
                        me = me,
                        restored = "restore state: restored"
                    );
                    let _ = store.close().await;
                    return Err(EngineError::Restored { me: me.clone() });
                }
                StartMode::ForceNormal => emit!(catalog::CWSIP0104W, me = me),
                StartMode::Flush => {}
            }
        }
        // Every start mints IDs in a new incarnation, so they are unique for all time even
        // if this store file is an older copy put back without a restore mark.
        info.incarnation = store.begin_incarnation(false).await.map_err(store_err)?;
        let flush_err = |e| EngineError::Flush {
            me: me.clone(),
            source: Box::new(e),
        };
        let flush = if mode == StartMode::Flush {
            let (record, streams, messages) =
                messaging::streams::begin_flush(&*store, me, &self.cfg.peers)
                    .await
                    .map_err(flush_err)?;
            keel_core::faults::hit("bus.flush_after_begin");
            emit!(
                catalog::CWSIP0109I,
                me = me,
                streams = streams,
                messages = messages,
                waiting = record
                    .as_ref()
                    .map_or("nobody".to_string(), |r| r.waiting_for())
            );
            if record.is_none() {
                info.restore_state = RestoreState::None;
                emit!(catalog::CWSIP0783E, me = me);
            } else {
                info.restore_state = RestoreState::FlushPending;
            }
            record
        } else if info.restore_state == RestoreState::FlushPending {
            let record = messaging::streams::continue_flush(&*store, me, &self.cfg.peers)
                .await
                .map_err(flush_err)?;
            match &record {
                Some(r) => emit!(catalog::CWSIP0111I, me = me, waiting = r.waiting_for()),
                None => {
                    // Every peer had confirmed, or those left are no longer members.
                    info.restore_state = RestoreState::None;
                    emit!(catalog::CWSIP0783E, me = me);
                }
            }
            record
        } else {
            None
        };
        let messaging =
            messaging::Messaging::new(&self.cfg, info.incarnation, store.clone(), flush);
        messaging.load_subscriptions().await.map_err(store_err)?;
        messaging.init_depths().await.map_err(store_err)?;
        *self.running.lock().expect("running lock") = Some(Running {
            store,
            sqlite,
            messaging: Arc::new(messaging),
        });
        Ok(info)
    }

    /// Stops the engine: closes the store (committed data stays) and releases the lock.
    pub async fn stop(&self, force: bool) -> Result<(), EngineError> {
        let _t = self.transition.lock().await;
        let state = self.state();
        if state != MeState::Started {
            return Err(EngineError::AlreadyInState {
                me: self.cfg.me.clone(),
                state: state.as_str(),
            });
        }
        self.set_state(MeState::Stopping);
        let running = self.running.lock().expect("running lock").take();
        if let Some(r) = running {
            r.messaging.close();
            if !force {
                if let Err(e) = r.store.close().await {
                    tracing::warn!(target: "keel_engine", me = %self.cfg.me, error = %e, "closing the data store failed");
                }
            }
            drop(r);
        }
        self.set_state(MeState::Stopped);
        emit!(
            catalog::CWSIP0102I,
            me = self.cfg.me,
            how = if force { "forced" } else { "normal" }
        );
        Ok(())
    }

    /// The messaging side of a started engine.
    pub fn messaging(&self) -> Result<Arc<messaging::Messaging>, messaging::MessagingError> {
        self.running
            .lock()
            .expect("running lock")
            .as_ref()
            .map(|r| r.messaging.clone())
            .ok_or_else(|| messaging::MessagingError::NotStarted {
                me: self.cfg.me.clone(),
            })
    }

    /// Why this engine takes no work now, with what starts it, for messages about a stopped
    /// engine: a restored data store needs a restart-after-restore (FLUSH) start (a plain
    /// `keel me start ME` is refused for it), and a recovery-mode server takes no operator
    /// start at all.
    pub async fn why_not_started(&self) -> String {
        let me = &self.cfg.me;
        // Unreadable store facts: the plain reason (the start itself says what is wrong).
        let restored = self
            .info()
            .await
            .is_ok_and(|i| i.restore_state == RestoreState::Restored);
        match (self.recovery_mode, restored) {
            (true, true) => format!(
                "messaging engine {me} is not open: its data store was restored from a backup, which a recovery-mode server does not open; stop this server, start it normally (`keel server start {}`) and start the engine with `keel me start {me} --flush`, after which recovery finishes its branches",
                self.cfg.server
            ),
            (true, false) => {
                let failure = self.start_failure.lock().expect("start_failure lock").clone();
                match failure {
                    // Recovery opens the store just after the transaction service starts: a
                    // question asked in between is early, not a sign of a broken store.
                    None => format!(
                        "messaging engine {me} is still opening its data store for recovery; ask again in a moment"
                    ),
                    Some(reason) => format!(
                        "messaging engine {me} could not open its data store for recovery ({reason}; CWSIP0105E); fix that, stop this server and start it again"
                    ),
                }
            }
            (false, true) => EngineError::Restored { me: me.clone() }.to_string(),
            (false, false) => messaging::MessagingError::NotStarted { me: me.clone() }.to_string(),
        }
    }

    /// Store facts for the admin API and `keel store info`, whether started or not.
    pub async fn info(&self) -> Result<StoreInfo, keel_store::StoreError> {
        if let Some(s) = self.open_store() {
            return s.info().await;
        }
        match &self.cfg.store_url {
            None => keel_store::read_info(&self.cfg.store_path),
            Some(url) => {
                let s = self.open_pg(url).await?;
                let info = s.info().await;
                s.close().await?;
                info
            }
        }
    }
}

/// The JSON of `keel store info --json` (DESIGN §3: at least me, uuid, backend, path,
/// restore_state, messages).
pub fn info_json(me: &str, info: &StoreInfo) -> serde_json::Value {
    serde_json::json!({
        "me": me,
        "uuid": info.uuid,
        "backend": info.backend,
        "path": info.location,
        "restore_state": info.restore_state.as_str(),
        "messages": info.messages,
        "incarnation": info.incarnation,
        "schema_version": info.schema_version,
    })
}
