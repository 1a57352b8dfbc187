//! Message-driven applications (DESIGN §6): each receives from a queue of one of the server's
//! messaging engines and handles every message in one global transaction with what it touches:
//! the receive itself (a settle in the engine's branch), sends (same branch) and statements on
//! data sources (a branch each, enlisted on first use). Kinds:
//! - `forward`: sends the message (body and properties) to another destination;
//! - `sql`: runs one templated statement on a data source, the message's fields bound as
//!   parameters (`{body}`, `{id}`, `{dest}`, `{delivery_count}`, `{property.NAME}`; `{{` and
//!   `}}` for braces): never spliced into the SQL text;
//! - `script`: Rhai, `fn on_message(msg)` with `msg.id`, `msg.body`, `msg.properties`,
//!   `msg.dest`, `msg.delivery_count`; it calls `sql(ds, statement[, params])` (rows changed,
//!   or an array of row maps for a statement that returns rows) and `send(dest, body[,
//!   properties])`.
//!
//! An error rolls the whole transaction back: the message counts a failed delivery (then the
//! exception destination, after the destination's `max_failed_deliveries`), except when a data
//! source could not be reached at all: then the message is released unchanged and the
//! application's handlers back off (0.5 s doubling to 30 s), so a database restart does not
//! drain a queue onto its exception destination. An engine branch alone commits in one phase;
//! with a data source, in two. A message's work is bounded by the application's `timeout_s`.
//!
//! A script runs on a blocking thread whose thread-local context (`CTX`) holds the global
//! transaction, so `sql` and `send` reach the async resources with `Handle::block_on`, within
//! the transaction's deadline. An application that cannot start (a script that does not compile
//! or lacks `on_message`, an unknown data source, a bad template) is `WTRN0010E`, and the server
//! runs without it.
//!
//! Bounds: `concurrency` handlers per application (1..=64), each holding one message; scripts
//! run on blocking threads with Rhai's limits (operations, call depth, string, array and map
//! sizes), so a runaway script ends with an error instead of a hung handler.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use keel_config::{AppCfg, AppKind};
use keel_core::{catalog, emit};
use keel_engine::messaging::{Delivery, Outcome, OutgoingMessage, Properties};
use keel_tx::coordinator::{Transaction as GlobalTx, TxError, Xid};
use keel_tx::{SqlResource, SqlValue};

use crate::txsvc::{MeResource, TxService};

/// How long a handler waits for a message before looking at the stop signal again.
const RECEIVE_WAIT_MS: u64 = 1_000;
/// Back-off after a data source could not be reached, doubling.
const UNREACHABLE_FIRST_MS: u64 = 500;
const UNREACHABLE_MAX_MS: u64 = 30_000;
/// Rhai limits per message.
const SCRIPT_OPERATIONS_MAX: u64 = 10_000_000;
const SCRIPT_STRING_BYTES_MAX: usize = 16 * 1024 * 1024;
const SCRIPT_ARRAY_MAX: usize = 100_000;
const SCRIPT_MAP_MAX: usize = 10_000;
const SCRIPT_CALL_LEVELS_MAX: usize = 64;

/// Why a message's handling failed.
#[derive(Debug)]
enum Failure {
    /// The message or the handler: count a failed delivery.
    Message(String),
    /// A resource could not be reached: release the message, back off.
    Unreachable(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Message(s) | Failure::Unreachable(s) => f.write_str(s),
        }
    }
}

/// A resource error: "unreachable" when it happened opening the branch (connect), else the
/// statement's or the message's fault.
fn classify(e: keel_tx::coordinator::ResourceError, opening: bool) -> Failure {
    if opening {
        Failure::Unreachable(e.to_string())
    } else {
        Failure::Message(e.to_string())
    }
}

/// One part of a templated statement.
#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Body,
    Id,
    Dest,
    DeliveryCount,
    Property(String),
}

/// Parses a `sql` application's statement template (see the module docs).
fn parse_template(stmt: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut chars = stmt.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) if name.len() < 200 => name.push(c),
                        _ => return Err("the statement has a `{` without its `}` (placeholders: {body}, {id}, {dest}, {delivery_count}, {property.NAME}; write `{{` for a brace)".into()),
                    }
                }
                if !text.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut text)));
                }
                parts.push(match name.trim() {
                    "body" => Part::Body,
                    "id" => Part::Id,
                    "dest" => Part::Dest,
                    "delivery_count" => Part::DeliveryCount,
                    n => match n.strip_prefix("property.") {
                        Some(p) if !p.is_empty() => Part::Property(p.to_string()),
                        _ => return Err(format!("the statement names placeholder {{{n}}}, which does not exist (placeholders: {{body}}, {{id}}, {{dest}}, {{delivery_count}}, {{property.NAME}})")),
                    },
                });
            }
            '}' => {
                return Err(
                    "the statement has a `}` without its `{` (write `}}` for a brace)".into(),
                )
            }
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    Ok(parts)
}

/// The statement with `$n` (PostgreSQL) or `?` (MariaDB) markers, and its values.
fn bind(parts: &[Part], d: &Delivery, dollar: bool) -> (String, Vec<SqlValue>) {
    let mut sql = String::new();
    let mut values = Vec::new();
    for p in parts {
        let v = match p {
            Part::Text(t) => {
                sql.push_str(t);
                continue;
            }
            Part::Body => match std::str::from_utf8(&d.body) {
                Ok(s) => SqlValue::Text(s.to_string()),
                Err(_) => SqlValue::Bytes(d.body.clone()),
            },
            Part::Id => SqlValue::Text(d.id.clone()),
            Part::Dest => SqlValue::Text(d.dest.clone()),
            Part::DeliveryCount => SqlValue::Int(i64::from(d.delivery_count)),
            Part::Property(name) => json_value(d.properties.get(name)),
        };
        values.push(v);
        if dollar {
            sql.push_str(&format!("${}", values.len()));
        } else {
            sql.push('?');
        }
    }
    (sql, values)
}

fn json_value(v: Option<&serde_json::Value>) -> SqlValue {
    match v {
        None | Some(serde_json::Value::Null) => SqlValue::Null,
        Some(serde_json::Value::Bool(b)) => SqlValue::Bool(*b),
        Some(serde_json::Value::Number(n)) => match n.as_i64() {
            Some(i) => SqlValue::Int(i),
            None => SqlValue::Float(n.as_f64().unwrap_or(0.0)),
        },
        Some(serde_json::Value::String(s)) => SqlValue::Text(s.clone()),
        Some(other) => SqlValue::Text(other.to_string()),
    }
}

/// What a running application needs.
struct App {
    cfg: AppCfg,
    svc: Arc<TxService>,
    me: Arc<MeResource>,
    handler: Handler,
    /// Until when handlers pause, and the last pause in ms (see `unreachable`).
    backoff: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl App {
    /// The transaction timeout.
    fn timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.cfg.timeout_s))
    }

    fn paused_until(&self) -> Option<std::time::Instant> {
        self.backoff.lock().expect("backoff lock").0
    }

    /// A data source could not be reached: pause every handler, doubling the pause.
    fn unreachable(&self) {
        let mut b = self.backoff.lock().expect("backoff lock");
        let now = std::time::Instant::now();
        if b.0.is_some_and(|t| t > now) {
            return; // another handler paused it already
        }
        let ms = if b.1 == 0 {
            UNREACHABLE_FIRST_MS
        } else {
            (b.1 * 2).min(UNREACHABLE_MAX_MS)
        };
        *b = (Some(now + Duration::from_millis(ms)), ms);
    }

    fn reachable(&self) {
        *self.backoff.lock().expect("backoff lock") = (None, 0);
    }
}

enum Handler {
    Forward {
        to: String,
    },
    Sql {
        ds: Arc<dyn SqlResource>,
        dollar: bool,
        parts: Vec<Part>,
    },
    Script(Arc<Script>),
}

/// The running applications of a server.
pub struct Apps {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Apps {
    /// Starts every application of `server` in `cfg`; one that cannot start is logged
    /// (`WTRN0010E`) and left out.
    pub fn start(cfg: &keel_config::Config, server: &str, svc: &Arc<TxService>) -> Apps {
        let (stop, _) = tokio::sync::watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        for a in cfg.apps_of_server(server) {
            let app = match build(cfg, a, svc) {
                Ok(app) => Arc::new(app),
                Err(reason) => {
                    emit!(catalog::WTRN0010E, app = a.name, reason = reason);
                    continue;
                }
            };
            emit!(
                catalog::WTRN0009I,
                app = a.name,
                dest = format!("{}/{}", a.bus, a.on),
                kind = a.kind.as_str(),
                concurrency = a.concurrency
            );
            for _ in 0..a.concurrency.clamp(1, 64) {
                tasks.spawn(worker(app.clone(), stop.subscribe()));
            }
        }
        Apps { stop, tasks }
    }

    /// Stops every handler after the message it holds (bounded wait, then abort).
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .is_err()
        {
            self.tasks.abort_all();
        }
    }
}

fn build(cfg: &keel_config::Config, a: &AppCfg, svc: &Arc<TxService>) -> Result<App, String> {
    let me = svc.me_of_bus(&a.bus).ok_or_else(|| {
        format!(
            "this server hosts no messaging engine on bus {} (add it with `keel bus add-member {} --server {}`)",
            a.bus, a.bus, a.server
        )
    })?;
    let handler = match a.kind {
        AppKind::Forward => Handler::Forward {
            to: a.to.clone().ok_or("a forward application needs `to`")?,
        },
        AppKind::Sql => {
            let name = a
                .datasource
                .as_deref()
                .ok_or("an sql application needs `datasource`")?;
            let ds = svc
                .datasource(name)
                .ok_or_else(|| format!("data source {name} is not defined"))?;
            let kind = cfg
                .datasource(name)
                .map(|d| d.kind)
                .ok_or_else(|| format!("data source {name} is not defined"))?;
            Handler::Sql {
                ds,
                dollar: kind == keel_config::DataSourceKind::Postgres,
                parts: parse_template(a.statement.as_deref().unwrap_or(""))?,
            }
        }
        AppKind::Script => Handler::Script(Arc::new(Script::compile(
            a.script.as_deref().unwrap_or(""),
            svc.clone(),
        )?)),
    };
    Ok(App {
        cfg: a.clone(),
        svc: svc.clone(),
        me,
        handler,
        backoff: std::sync::Mutex::new((None, 0)),
    })
}

async fn worker(app: Arc<App>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        if *stop.borrow() {
            return;
        }
        // The whole application backs off while a data source is unreachable (not each
        // handler on its own, which would retry `concurrency` times per period).
        let pause = app
            .paused_until()
            .map(|t| t.saturating_duration_since(std::time::Instant::now()));
        if let Some(p) = pause.filter(|p| !p.is_zero()) {
            tokio::select! {
                _ = tokio::time::sleep(p) => continue,
                _ = stop.wait_for(|v| *v) => return,
            }
        }
        let m = match app.me.messaging() {
            Ok(m) => m,
            Err(_) => {
                // The engine is stopped: wait for it.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(RECEIVE_WAIT_MS)) => continue,
                    _ = stop.wait_for(|v| *v) => return,
                }
            }
        };
        let d = tokio::select! {
            r = m.receive(&app.cfg.on, Duration::from_millis(RECEIVE_WAIT_MS)) => r,
            _ = stop.wait_for(|v| *v) => return,
        };
        let d = match d {
            Ok(Some(d)) => d,
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!(target: "keel_server", app = %app.cfg.name, error = %e, "receive failed");
                tokio::time::sleep(Duration::from_millis(RECEIVE_WAIT_MS)).await;
                continue;
            }
        };
        match handle(&app, &d).await {
            Ok(()) => app.reachable(),
            Err(f) => {
                emit!(
                    catalog::WTRN0008W,
                    app = app.cfg.name,
                    id = d.id,
                    dest = app.cfg.on,
                    reason = f
                );
                if let Failure::Unreachable(_) = f {
                    app.unreachable();
                }
            }
        }
    }
}

/// One message in one global transaction.
async fn handle(app: &App, d: &Delivery) -> Result<(), Failure> {
    let mut t = app.svc.coordinator().begin();
    let me_xid = t.enlist(app.me.clone());
    if let Err(e) = app.me.begin(&me_xid) {
        t.unenlist(&me_xid);
        let _ = settle_alone(app, d).await;
        return Err(Failure::Unreachable(e.to_string()));
    }
    let on = app.cfg.on.clone();
    let settled = app.me.with_tx(&me_xid, |m, tx| {
        m.tx_settle(tx, &on, d.seq, Outcome::Accepted)
    });
    if let Err(e) = settled {
        let _ = app.svc.coordinator().rollback(t).await;
        return Err(Failure::Message(e.to_string()));
    }
    let work = match &app.handler {
        Handler::Forward { to } => app
            .me
            .with_tx(&me_xid, |m, tx| {
                m.tx_send(
                    tx,
                    to,
                    OutgoingMessage {
                        body: d.body.clone(),
                        properties: d.properties.clone(),
                        priority: Some(d.priority),
                        reliability: Some(d.reliability),
                        ttl_ms: None,
                    },
                )
            })
            .map_err(|e| Failure::Message(e.to_string())),
        Handler::Sql { ds, dollar, parts } => {
            let (sql, values) = bind(parts, d, *dollar);
            let x = t.enlist(ds.clone());
            let work = async {
                match ds.begin(&x).await {
                    Err(e) => Err((classify(e, true), true)),
                    Ok(()) => ds
                        .execute(&x, &sql, &values)
                        .await
                        .map(|_| ())
                        .map_err(|e| (classify(e, false), false)),
                }
            };
            match tokio::time::timeout(app.timeout(), work).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err((f, not_opened))) => {
                    if not_opened {
                        t.unenlist(&x);
                    }
                    Err(f)
                }
                // Left enlisted: the rollback closes whatever of the branch was opened.
                Err(_) => Err(timed_out(app.cfg.timeout_s)),
            }
        }
        Handler::Script(s) => {
            let (back, r) = s
                .run(t, me_xid.clone(), app.me.clone(), d, app.cfg.timeout_s)
                .await;
            t = back;
            r
        }
    };
    match work {
        Ok(()) => match app.svc.commit(t).await {
            Ok(()) => Ok(()),
            // Committed: the rest is recovery's (WTRN0007E was logged).
            Err(TxError::CommitPending { .. }) => Ok(()),
            // The recovery log failed: not the message's fault; the branches stay prepared
            // for the next start's recovery.
            Err(e @ TxError::Log { .. }) => Err(Failure::Unreachable(e.to_string())),
            Err(e) => Err(Failure::Message(e.to_string())),
        },
        Err(f) => {
            if let Failure::Unreachable(_) = f {
                app.me.release_on_rollback(&me_xid);
            }
            if let Err(e) = app.svc.coordinator().rollback(t).await {
                tracing::warn!(target: "keel_server", app = %app.cfg.name, error = %e, "rollback incomplete; recovery finishes it");
            }
            Err(f)
        }
    }
}

fn timed_out(timeout_s: u32) -> Failure {
    Failure::Message(format!(
        "the transaction timed out after {timeout_s} s (the application's timeout_s)"
    ))
}

/// Releases a delivery no transaction could take (its engine's branch did not open).
async fn settle_alone(app: &App, d: &Delivery) -> Result<(), String> {
    let m = app.me.messaging().map_err(|e| e.to_string())?;
    m.settle(&d.dest, d.seq, Outcome::Released)
        .await
        .map_err(|e| e.to_string())
}

// --- scripts -------------------------------------------------------------------------------

/// What a script's `sql` and `send` reach while it handles one message (one per thread: a
/// script runs on a blocking thread, one message at a time).
struct ScriptCtx {
    rt: tokio::runtime::Handle,
    svc: Arc<TxService>,
    me: Arc<MeResource>,
    me_xid: Xid,
    t: GlobalTx,
    /// Data source branches enlisted so far.
    branches: HashMap<String, Xid>,
    /// A data source could not be reached (the failure is not the message's).
    unreachable: Option<String>,
    /// The transaction timeout: the script is stopped, and statements cut, at this moment.
    deadline: std::time::Instant,
    timeout_s: u32,
}

impl ScriptCtx {
    /// Runs `fut` on the runtime within the transaction's deadline.
    fn within<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, keel_tx::coordinator::ResourceError>>,
    ) -> Result<T, Box<rhai::EvalAltResult>> {
        let left = self
            .deadline
            .saturating_duration_since(std::time::Instant::now());
        match self.rt.block_on(tokio::time::timeout(left, fut)) {
            Ok(r) => r.map_err(script_err),
            Err(_) => Err(script_err(timed_out(self.timeout_s))),
        }
    }
}

thread_local! {
    static CTX: RefCell<Option<ScriptCtx>> = const { RefCell::new(None) };
}

/// A compiled script application.
pub struct Script {
    engine: rhai::Engine,
    ast: rhai::AST,
    svc: Arc<TxService>,
}

fn script_err(e: impl std::fmt::Display) -> Box<rhai::EvalAltResult> {
    e.to_string().into()
}

fn with_ctx<R>(
    f: impl FnOnce(&mut ScriptCtx) -> Result<R, Box<rhai::EvalAltResult>>,
) -> Result<R, Box<rhai::EvalAltResult>> {
    CTX.with(|c| {
        let mut c = c.borrow_mut();
        let ctx = c
            .as_mut()
            .ok_or_else(|| script_err("sql() and send() work only inside on_message"))?;
        f(ctx)
    })
}

fn to_sql_value(v: &rhai::Dynamic) -> Result<SqlValue, Box<rhai::EvalAltResult>> {
    if v.is_unit() {
        Ok(SqlValue::Null)
    } else if let Some(b) = v.clone().try_cast::<bool>() {
        Ok(SqlValue::Bool(b))
    } else if let Some(i) = v.clone().try_cast::<rhai::INT>() {
        Ok(SqlValue::Int(i))
    } else if let Some(f) = v.clone().try_cast::<rhai::FLOAT>() {
        Ok(SqlValue::Float(f))
    } else if let Some(s) = v.clone().try_cast::<rhai::ImmutableString>() {
        Ok(SqlValue::Text(s.to_string()))
    } else if let Some(b) = v.clone().try_cast::<rhai::Blob>() {
        Ok(SqlValue::Bytes(b))
    } else {
        Err(script_err(format!(
            "sql() parameters are strings, numbers, booleans, blobs or () for NULL, not {}",
            v.type_name()
        )))
    }
}

fn from_sql_value(v: SqlValue) -> rhai::Dynamic {
    match v {
        SqlValue::Null => rhai::Dynamic::UNIT,
        SqlValue::Bool(b) => b.into(),
        SqlValue::Int(i) => i.into(),
        SqlValue::Float(f) => f.into(),
        SqlValue::Text(s) => s.into(),
        SqlValue::Bytes(b) => rhai::Dynamic::from_blob(b),
    }
}

/// Whether a statement returns rows (then `sql` returns them).
fn returns_rows(stmt: &str) -> bool {
    let s = stmt.trim_start().to_ascii_lowercase();
    ["select", "with", "show", "values", "table"]
        .iter()
        .any(|k| s.starts_with(k))
        || s.contains(" returning ")
}

fn script_sql(
    ds: &str,
    stmt: &str,
    params: rhai::Array,
) -> Result<rhai::Dynamic, Box<rhai::EvalAltResult>> {
    let values = params
        .iter()
        .map(to_sql_value)
        .collect::<Result<Vec<_>, _>>()?;
    with_ctx(|ctx| {
        let r = ctx.svc.datasource(ds).ok_or_else(|| {
            script_err(format!(
                "sql(): data source {ds} is not defined (`keel datasource list`)"
            ))
        })?;
        let xid = match ctx.branches.get(ds) {
            Some(x) => x.clone(),
            None => {
                let x = ctx.t.enlist(r.clone());
                let left = ctx
                    .deadline
                    .saturating_duration_since(std::time::Instant::now());
                match ctx.rt.block_on(tokio::time::timeout(left, r.begin(&x))) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        ctx.t.unenlist(&x);
                        ctx.unreachable = Some(e.to_string());
                        return Err(script_err(e));
                    }
                    // Left enlisted: the rollback closes whatever of it was opened.
                    Err(_) => return Err(script_err(timed_out(ctx.timeout_s))),
                }
                ctx.branches.insert(ds.to_string(), x.clone());
                x
            }
        };
        if returns_rows(stmt) {
            let rows = ctx.within(r.query(&xid, stmt, &values))?;
            let mut out = rhai::Array::with_capacity(rows.rows.len());
            for row in rows.rows {
                let mut m = rhai::Map::new();
                for (c, v) in rows.columns.iter().zip(row) {
                    m.insert(c.as_str().into(), from_sql_value(v));
                }
                out.push(m.into());
            }
            Ok(out.into())
        } else {
            let n = ctx.within(r.execute(&xid, stmt, &values))?;
            Ok((n as rhai::INT).into())
        }
    })
}

fn script_send(
    dest: &str,
    body: rhai::Dynamic,
    props: rhai::Map,
) -> Result<(), Box<rhai::EvalAltResult>> {
    let body = if let Some(b) = body.clone().try_cast::<rhai::Blob>() {
        b
    } else {
        body.to_string().into_bytes()
    };
    let properties: Properties = match rhai::serde::from_dynamic::<serde_json::Value>(&props.into())
    {
        Ok(serde_json::Value::Object(m)) => m,
        _ => return Err(script_err("send(): properties must be a map")),
    };
    with_ctx(|ctx| {
        ctx.me
            .with_tx(&ctx.me_xid, |m, tx| {
                m.tx_send(
                    tx,
                    dest,
                    OutgoingMessage {
                        body,
                        properties,
                        ..Default::default()
                    },
                )
            })
            .map_err(script_err)
    })
}

impl Script {
    /// Compiles `source`; it must define `fn on_message(msg)`.
    pub fn compile(source: &str, svc: Arc<TxService>) -> Result<Script, String> {
        let mut engine = rhai::Engine::new();
        engine.set_max_operations(SCRIPT_OPERATIONS_MAX);
        engine.set_max_string_size(SCRIPT_STRING_BYTES_MAX);
        engine.set_max_array_size(SCRIPT_ARRAY_MAX);
        engine.set_max_map_size(SCRIPT_MAP_MAX);
        engine.set_max_call_levels(SCRIPT_CALL_LEVELS_MAX);
        engine.register_fn("sql", |ds: &str, stmt: &str| {
            script_sql(ds, stmt, rhai::Array::new())
        });
        engine.register_fn("sql", |ds: &str, stmt: &str, params: rhai::Array| {
            script_sql(ds, stmt, params)
        });
        engine.register_fn("send", |dest: &str, body: rhai::Dynamic| {
            script_send(dest, body, rhai::Map::new())
        });
        engine.register_fn(
            "send",
            |dest: &str, body: rhai::Dynamic, props: rhai::Map| script_send(dest, body, props),
        );
        engine.on_print(|s| tracing::info!(target: "keel_server::app", "{s}"));
        // The transaction timeout stops a looping script (checked every 4 096 operations).
        engine.on_progress(|ops| {
            if ops % 4096 != 0 {
                return None;
            }
            let late = CTX.with(|c| {
                c.try_borrow().ok().and_then(|c| {
                    c.as_ref()
                        .filter(|c| std::time::Instant::now() > c.deadline)
                        .map(|c| c.timeout_s)
                })
            });
            late.map(|t| timed_out(t).to_string().into())
        });
        let ast = engine
            .compile(source)
            .map_err(|e| format!("the script does not compile: {e}"))?;
        if !ast
            .iter_functions()
            .any(|f| f.name == "on_message" && f.params.len() == 1)
        {
            return Err("the script defines no `fn on_message(msg)`".into());
        }
        Ok(Script { engine, ast, svc })
    }

    /// Runs `on_message` for `d` on a blocking thread; gives the global transaction back with
    /// the outcome.
    async fn run(
        self: &Arc<Self>,
        t: GlobalTx,
        me_xid: Xid,
        me: Arc<MeResource>,
        d: &Delivery,
        timeout_s: u32,
    ) -> (GlobalTx, Result<(), Failure>) {
        let this = self.clone();
        let svc = self.svc.clone();
        let mut msg = rhai::Map::new();
        msg.insert("id".into(), d.id.clone().into());
        msg.insert("dest".into(), d.dest.clone().into());
        msg.insert(
            "body".into(),
            String::from_utf8_lossy(&d.body).into_owned().into(),
        );
        msg.insert(
            "delivery_count".into(),
            (i64::from(d.delivery_count) as rhai::INT).into(),
        );
        msg.insert(
            "properties".into(),
            rhai::serde::to_dynamic(serde_json::Value::Object(d.properties.clone()))
                .unwrap_or_else(|_| rhai::Map::new().into()),
        );
        let rt = tokio::runtime::Handle::current();
        let ctx = ScriptCtx {
            rt,
            svc: svc.clone(),
            me,
            me_xid,
            t,
            branches: HashMap::new(),
            unreachable: None,
            deadline: std::time::Instant::now() + Duration::from_secs(u64::from(timeout_s)),
            timeout_s,
        };
        let joined = tokio::task::spawn_blocking(move || {
            CTX.with(|c| *c.borrow_mut() = Some(ctx));
            let mut scope = rhai::Scope::new();
            // A panic inside the engine must not lose the context: it holds the transaction
            // whose branches must roll back.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                this.engine
                    .call_fn::<rhai::Dynamic>(&mut scope, &this.ast, "on_message", (msg,))
            }))
            .unwrap_or_else(|_| Err("the script engine panicked".into()));
            let ctx = CTX
                .with(|c| c.borrow_mut().take())
                .expect("the context is set");
            (ctx, r)
        })
        .await;
        match joined {
            Ok((ctx, r)) => {
                // A data source that could not be reached fails the message even if the
                // script caught the error: committing without its write is not what it meant.
                let out = match (r, ctx.unreachable) {
                    (_, Some(u)) => Err(Failure::Unreachable(u)),
                    (Ok(_), None) => Ok(()),
                    // Stopped by the timeout check in `on_progress`: its token is the reason
                    // (rhai's own text for it is only "Script terminated.").
                    (Err(e), None) => Err(Failure::Message(match *e {
                        rhai::EvalAltResult::ErrorTerminated(token, _) => token.to_string(),
                        e => format!("script error: {e}"),
                    })),
                };
                (ctx.t, out)
            }
            // The blocking thread panicked: the transaction is lost with it; its branches
            // were never prepared, so nothing is in doubt (the engine releases on restart).
            Err(e) => (
                svc.coordinator().begin(),
                Err(Failure::Message(format!("the script handler failed: {e}"))),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_bind_values_never_splice_them() {
        let parts =
            parse_template("INSERT INTO t(id, body, n, x) VALUES ({id}, {body}, {delivery_count}, {property.x}) -- {{literal}}")
                .unwrap();
        let mut props = Properties::new();
        props.insert("x".into(), serde_json::json!(7));
        let d = Delivery {
            dest: "in".into(),
            seq: 1,
            id: "m-1".into(),
            priority: 4,
            reliability: keel_config::Reliability::AssuredPersistent,
            delivery_count: 2,
            properties: props,
            body: b"it's; DROP TABLE t".to_vec(),
        };
        let (sql, values) = bind(&parts, &d, true);
        assert_eq!(
            sql,
            "INSERT INTO t(id, body, n, x) VALUES ($1, $2, $3, $4) -- {literal}"
        );
        assert_eq!(
            values,
            vec![
                SqlValue::Text("m-1".into()),
                SqlValue::Text("it's; DROP TABLE t".into()),
                SqlValue::Int(2),
                SqlValue::Int(7)
            ]
        );
        let (sql, _) = bind(&parts, &d, false);
        assert!(sql.contains("VALUES (?, ?, ?, ?)"), "{sql}");
    }

    #[test]
    fn bad_templates_are_refused_with_the_reason() {
        assert!(parse_template("SELECT {nope}")
            .unwrap_err()
            .contains("{nope}"));
        assert!(parse_template("SELECT {body")
            .unwrap_err()
            .contains("without"));
        assert!(parse_template("SELECT }").unwrap_err().contains("without"));
        assert!(parse_template("SELECT {property.}").is_err());
    }

    #[test]
    fn statements_that_return_rows_are_recognised() {
        assert!(returns_rows("  SELECT 1"));
        assert!(returns_rows("with x as (select 1) select * from x"));
        assert!(returns_rows("INSERT INTO t VALUES (1) RETURNING id"));
        assert!(!returns_rows("UPDATE t SET a = 1"));
    }
}
