//! The `SIBMessagingEngine` admin object.

use std::sync::Arc;

use keel_admin::{AdminObject, OpFuture, Value};
use keel_core::{catalog, emit, ObjectName};
use serde_json::json;

use crate::{Engine, StartMode};

pub struct EngineObject {
    engine: Arc<Engine>,
    name: ObjectName,
}

impl EngineObject {
    pub fn new(engine: Arc<Engine>) -> EngineObject {
        let name = engine.config().object_name();
        EngineObject { engine, name }
    }
}

impl EngineObject {
    /// The store's condition as JSON, with `text` for an operator; null while stopped.
    fn store_health(&self) -> Value {
        match self.engine.store_health() {
            None => Value::Null,
            Some(h) => {
                let mut v = h.to_json();
                v["text"] = Value::from(h.to_string());
                v
            }
        }
    }
}

impl AdminObject for EngineObject {
    fn name(&self) -> ObjectName {
        self.name.clone()
    }

    fn attributes(&self) -> serde_json::Map<String, Value> {
        let c = self.engine.config();
        keel_admin::attribute_map(json!({
            "name": c.me,
            "uuid": c.uuid,
            "bus": c.bus,
            "node": c.node,
            "server": c.server,
            "state": self.engine.reported_state(),
            "store_health": self.store_health(),
            "store_backend": self.engine.store_location().0,
            "store_path": self.engine.store_location().1,
        }))
    }

    fn operations(&self) -> Vec<keel_admin::Op> {
        vec![
            keel_admin::Op::monitor(
                "state",
                "the engine's state: stopped, starting, started, stopping, or failed (its data store failed: restart the engine)",
            ),
            keel_admin::Op::monitor(
                "storeHealth",
                "the data store's condition: state ok, disk-full or failed, since, and text (one line for an operator); null when stopped",
            ),
            keel_admin::Op::operator(
                "start",
                "start([\"FLUSH\"]): start the engine; FLUSH = restart after restore",
            ),
            keel_admin::Op::operator("stop", "stop([\"FORCE\"]): stop the engine"),
            keel_admin::Op::monitor(
                "flushState",
                "the restart-after-restore (FLUSH) still waiting for peers: pending, epoch, started_ms, waiting (null when none)",
            ),
            keel_admin::Op::monitor(
                "storeInfo",
                "the data store: uuid, backend, path, restore_state, messages, incarnation",
            ),
            keel_admin::Op::operator(
                "backup",
                "backup(FILE): online, consistent backup of the data store to FILE",
            ),
        ]
    }

    fn invoke<'a>(&'a self, op: &'a str, args: Vec<Value>) -> OpFuture<'a> {
        Box::pin(async move {
            let bad = |why: String| keel_admin::OpErrors::new(&self.name, op).bad(why);
            let failed = |why: String| keel_admin::OpErrors::new(&self.name, op).failed(why);
            let first = match args.as_slice() {
                [] => None,
                [Value::String(s)] => Some(s.clone()),
                _ => return Err(bad("expected at most one string argument".into())),
            };
            match op {
                "state" => Ok(Value::from(self.engine.reported_state())),
                "storeHealth" => Ok(self.store_health()),
                "start" => {
                    let mode =
                        StartMode::parse(first.as_deref().unwrap_or("")).ok_or_else(|| {
                            bad(
                                "the start mode must be FLUSH (restart after restore) or NORMAL"
                                    .into(),
                            )
                        })?;
                    self.engine
                        .start(mode)
                        .await
                        .map_err(|e| failed(e.to_string()))?;
                    Ok(Value::from(self.engine.state().as_str()))
                }
                "stop" => {
                    let force = first.is_some_and(|s| s.eq_ignore_ascii_case("force"));
                    self.engine
                        .stop(force)
                        .await
                        .map_err(|e| failed(e.to_string()))?;
                    Ok(Value::from(self.engine.state().as_str()))
                }
                "flushState" => {
                    let Ok(m) = self.engine.messaging() else {
                        return Ok(Value::Null);
                    };
                    Ok(match m.flush_status().await {
                        None => Value::Null,
                        Some(r) => json!({
                            "pending": true,
                            "epoch": r.epoch,
                            "started_ms": r.started_ms,
                            "waiting": r.waiting_for(),
                            "peers": r.peers.iter().map(|(p, f)| (p.clone(), json!({"outbound": f.outbound, "inbound": f.inbound}))).collect::<serde_json::Map<String, Value>>(),
                        }),
                    })
                }
                "storeInfo" => {
                    let info = self
                        .engine
                        .info()
                        .await
                        .map_err(|e| failed(e.to_string()))?;
                    Ok(crate::info_json(&self.engine.config().me, &info))
                }
                "backup" => {
                    let target = first.ok_or_else(|| bad("give the backup file".into()))?;
                    let me = &self.engine.config().me;
                    if self.engine.config().store_url.is_some() {
                        return Err(failed(format!("the data store of {me} is in PostgreSQL: back it up with PostgreSQL's own tools (pg_dump --schema={}, or base backups with WAL archiving)", crate::pg_schema(me, &self.engine.config().uuid))));
                    }
                    let store = self.engine.sqlite_store().ok_or_else(|| failed(format!("messaging engine {me} is not started; back up its store file offline with `keel store backup` while its server is down")))?;
                    let target_path = std::path::PathBuf::from(&target);
                    let manifest = tokio::task::spawn_blocking(move || {
                        // A string error: the store's error type is large to move across.
                        store
                            .backup_to(&target_path, &mut |_, _| {})
                            .map_err(|e| e.to_string())
                    })
                    .await
                    .map_err(|e| failed(format!("backup task failed: {e}")))?
                    .map_err(failed)?;
                    emit!(
                        catalog::CWSIP0107I,
                        me = self.engine.config().me,
                        path = target,
                        bytes = manifest.bytes,
                        messages = manifest.messages
                    );
                    Ok(serde_json::to_value(&manifest).unwrap_or(Value::Null))
                }
                _ => Err(keel_admin::OpErrors::new(&self.name, op).unknown(self)),
            }
        })
    }
}

/// `Keel:type=SIBQueuePoint,name=DEST@ME,bus=B,node=N,process=S`: one queue point of an engine.
pub struct QueuePointObject {
    engine: Arc<Engine>,
    dest: String,
    name: ObjectName,
}

impl QueuePointObject {
    pub fn new(engine: Arc<Engine>, dest: &str) -> QueuePointObject {
        let c = engine.config();
        let qp = format!("{dest}@{}", c.me);
        let name = ObjectName::new(&[
            ("type", "SIBQueuePoint"),
            ("name", &qp),
            ("bus", &c.bus),
            ("node", &c.node),
            ("process", &c.server),
        ]);
        QueuePointObject {
            engine,
            dest: dest.to_string(),
            name,
        }
    }

    /// The queue points an engine serves: its configured queues and its exception destination.
    pub fn all(engine: &Arc<Engine>) -> Vec<QueuePointObject> {
        let c = engine.config();
        let mut names: Vec<String> = c
            .destinations
            .iter()
            .filter(|d| d.me == c.me && d.kind == keel_config::DestinationKind::Queue)
            .map(|d| d.name.clone())
            .collect();
        names.push(keel_config::system_exception_destination(&c.me));
        names
            .iter()
            .map(|d| QueuePointObject::new(engine.clone(), d))
            .collect()
    }
}

/// Options of the `send` operation.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SendOptions {
    priority: Option<u8>,
    reliability: Option<String>,
    ttl_ms: Option<u64>,
    #[serde(default)]
    properties: crate::messaging::Properties,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiveOptions {
    #[serde(default = "one")]
    count: u32,
    #[serde(default)]
    timeout_ms: u64,
}

fn one() -> u32 {
    1
}

/// Bounds one `receive` call: an admin answer is not a bulk transfer.
const RECEIVE_COUNT_MAX: u32 = 10_000;
const RECEIVE_TIMEOUT_MS_MAX: u64 = 600_000;

impl AdminObject for QueuePointObject {
    fn name(&self) -> ObjectName {
        self.name.clone()
    }

    fn attributes(&self) -> serde_json::Map<String, Value> {
        let base = json!({"destination": self.dest, "me": self.engine.config().me, "state": self.engine.state().as_str()});
        let mut m = keel_admin::attribute_map(base);
        if let Ok(msg) = self.engine.messaging() {
            if let Ok(q) = msg.queue(&self.dest) {
                let c = &q.counters;
                let get =
                    |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
                for (k, v) in [
                    ("depth", get(&c.depth)),
                    ("sent", get(&c.sent)),
                    ("delivered", get(&c.delivered)),
                    ("accepted", get(&c.accepted)),
                    ("redelivered", get(&c.redelivered)),
                    ("to_exception", get(&c.to_exception)),
                ] {
                    m.insert(k.into(), Value::from(v));
                }
                m.insert(
                    "max_failed_deliveries".into(),
                    Value::from(q.cfg.max_failed_deliveries),
                );
                m.insert(
                    "reliability".into(),
                    Value::from(q.cfg.reliability.as_str()),
                );
            }
        }
        m
    }

    fn operations(&self) -> Vec<keel_admin::Op> {
        vec![
            keel_admin::Op::monitor("depth", "messages on the queue point, counted in the store"),
            keel_admin::Op::operator("send", "send(body[, {priority, reliability, ttl_ms, properties}]): returns the message ID once stored"),
            keel_admin::Op::operator("receive", "receive([{count, timeout_ms}]): consume up to count messages (accepted on return)"),
        ]
    }

    fn invoke<'a>(&'a self, op: &'a str, args: Vec<Value>) -> OpFuture<'a> {
        Box::pin(async move {
            let bad = |why: String| keel_admin::OpErrors::new(&self.name, op).bad(why);
            let failed = |why: String| keel_admin::OpErrors::new(&self.name, op).failed(why);
            let m = self.engine.messaging().map_err(|e| failed(e.to_string()))?;
            match op {
                "depth" => Ok(Value::from(
                    m.depth(&self.dest)
                        .await
                        .map_err(|e| failed(e.to_string()))?,
                )),
                "send" => {
                    let mut it = args.into_iter();
                    let body = match it.next() {
                        Some(Value::String(s)) => s.into_bytes(),
                        _ => {
                            return Err(bad(
                                "the first argument is the message body (a string)".into()
                            ))
                        }
                    };
                    let opts: SendOptions = match it.next() {
                        None => SendOptions::default(),
                        Some(v) => {
                            serde_json::from_value(v).map_err(|e| bad(format!("options: {e}")))?
                        }
                    };
                    let reliability = opts
                        .reliability
                        .map(|r| r.parse::<keel_config::Reliability>())
                        .transpose()
                        .map_err(|e| bad(e.to_string()))?;
                    let msg = crate::messaging::OutgoingMessage {
                        body,
                        properties: opts.properties,
                        priority: opts.priority,
                        reliability,
                        ttl_ms: opts.ttl_ms,
                    };
                    Ok(Value::from(
                        m.send(&self.dest, msg)
                            .await
                            .map_err(|e| failed(e.to_string()))?,
                    ))
                }
                "receive" => {
                    let opts: ReceiveOptions = match args.into_iter().next() {
                        None => ReceiveOptions {
                            count: 1,
                            timeout_ms: 0,
                        },
                        Some(v) => {
                            serde_json::from_value(v).map_err(|e| bad(format!("options: {e}")))?
                        }
                    };
                    if opts.count == 0
                        || opts.count > RECEIVE_COUNT_MAX
                        || opts.timeout_ms > RECEIVE_TIMEOUT_MS_MAX
                    {
                        return Err(bad(format!("count must be 1..={RECEIVE_COUNT_MAX} and timeout_ms at most {RECEIVE_TIMEOUT_MS_MAX}")));
                    }
                    let deadline = std::time::Instant::now()
                        + std::time::Duration::from_millis(opts.timeout_ms);
                    let mut out = Vec::new();
                    while out.len() < opts.count as usize {
                        let left = deadline.saturating_duration_since(std::time::Instant::now());
                        let Some(d) = m
                            .receive(&self.dest, left)
                            .await
                            .map_err(|e| failed(e.to_string()))?
                        else {
                            break;
                        };
                        m.settle(&self.dest, d.seq, crate::messaging::Outcome::Accepted)
                            .await
                            .map_err(|e| failed(e.to_string()))?;
                        out.push(json!({
                            "id": d.id,
                            "destination": d.dest,
                            "priority": d.priority,
                            "reliability": d.reliability.as_str(),
                            "delivery_count": d.delivery_count,
                            "properties": d.properties,
                            "body": String::from_utf8_lossy(&d.body),
                        }));
                    }
                    Ok(Value::Array(out))
                }
                _ => Err(keel_admin::OpErrors::new(&self.name, op).unknown(self)),
            }
        })
    }
}
