//! `keel me ...` (messaging engines) and `keel store ...` (their data stores).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::Subcommand;
use keel_admin::{AdminClient, AdminError, Value};
use keel_config::{Config, InitialState, Profile};
use serde_json::json;

use crate::config_cmd::{after_save, SyncFlag};
use crate::ctx::{print_json, runtime, Ctx};

#[derive(Subcommand, Debug)]
pub enum MeCmd {
    /// Every messaging engine of the cell with its bus, server and state.
    List {
        /// One JSON array instead of lines of text.
        #[arg(long)]
        json: bool,
    },
    /// One engine's state: stopped, starting, started, stopping or failed (its data store
    /// failed); a data store that is not ok (disk full, failed) is said on a line of its own.
    State {
        /// The messaging engine (`keel me list` shows them).
        me: String,
        /// One JSON object: {me, state, flush_waiting} (flush_waiting: the peers a FLUSH
        /// start still waits for, or null).
        #[arg(long)]
        json: bool,
    },
    /// Start an engine (its server must be running).
    Start {
        /// The messaging engine to start.
        me: String,
        /// Restart after restore: resynchronise with peers after a data store restore.
        #[arg(long, conflicts_with = "force_normal")]
        flush: bool,
        /// Start normally although the store was restored (peers may discard new messages).
        #[arg(long)]
        force_normal: bool,
    },
    /// Stop an engine.
    Stop {
        /// The messaging engine to stop.
        me: String,
        /// Stop at once: transactions in flight roll back, consumers are cut off.
        #[arg(long)]
        force: bool,
    },
    /// Put the engine's data store in PostgreSQL (shared, so the engine can move between
    /// servers) or back in the embedded SQLite file. Data does not move with it.
    SetStore {
        /// The messaging engine whose store moves.
        me: String,
        /// postgresql://user@host:port/database (no password: use trust, peer, certificates or ~/.pgpass).
        #[arg(long, conflicts_with = "sqlite")]
        postgres: Option<String>,
        /// The embedded SQLite file under databases/ (the default).
        #[arg(long)]
        sqlite: bool,
        #[command(flatten)]
        sync: SyncFlag,
    },
    /// Whether the engine starts with its server.
    SetInitialState {
        /// The messaging engine.
        me: String,
        /// started: it starts with its server; stopped: it waits for `keel me start`.
        #[arg(value_enum)]
        state: crate::choices::InitialState,
        #[command(flatten)]
        sync: SyncFlag,
    },
}

#[derive(Subcommand, Debug)]
pub enum StoreCmd {
    /// The data store of an engine: uuid, backend, path, restore state, messages.
    Info {
        /// The messaging engine whose store to describe.
        me: String,
        /// One JSON object instead of lines of text.
        #[arg(long)]
        json: bool,
    },
    /// Online, consistent backup of an engine's data store (with a manifest beside it).
    Backup {
        /// The messaging engine whose store to back up.
        me: String,
        /// The backup file to write (FILE.manifest.json goes beside it).
        #[arg(long)]
        to: PathBuf,
        /// One JSON object: {me, path, online, manifest}.
        #[arg(long)]
        json: bool,
    },
    /// Full integrity check of an engine's data store (reads every page; safe while it runs).
    Verify {
        /// The messaging engine whose store to check.
        me: String,
        /// One JSON object: {me, path, ok, elapsed_ms}.
        #[arg(long)]
        json: bool,
    },
    /// Replace an engine's data store from a backup; the engine must be stopped. Marks the
    /// store `restored`: the next start must be a restart-after-restore (`keel me start ME --flush`).
    Restore {
        /// The messaging engine whose store to replace.
        me: String,
        /// The backup file (made by `keel store backup`).
        #[arg(long)]
        from: PathBuf,
        /// One JSON object: {me, from, messages, restore_state}.
        #[arg(long)]
        json: bool,
    },
}

/// Where an engine lives and how to reach it.
pub(crate) struct Target {
    pub(crate) me: String,
    pub(crate) uuid: String,
    pub(crate) store_url: Option<String>,
    pub(crate) server: String,
    /// The engine's admin object name.
    pub(crate) object: String,
    /// The SQLite file (whether or not the store is there).
    pub(crate) store: PathBuf,
    client: AdminClient,
}

pub(crate) fn target(ctx: &Ctx, profile: &Profile, cfg: &Config, me: &str) -> Result<Target> {
    let (bus, m) = cfg.find_me(me).ok_or_else(|| {
        let known: Vec<&str> = cfg.buses.iter().flat_map(|b| b.members.iter().map(|m| m.me.as_str())).collect();
        anyhow!("there is no messaging engine {me} (known: {}); a server gets one with `keel bus add-member BUS --server NAME`", if known.is_empty() { "none".into() } else { known.join(", ") })
    })?;
    let (_, s) = cfg.find_server(&m.server).ok_or_else(|| {
        anyhow!(
            "messaging engine {me} names server {} which is not defined",
            m.server
        )
    })?;
    let object = keel_core::ObjectName::new(&[
        ("type", "SIBMessagingEngine"),
        ("name", me),
        ("bus", &bus.name),
        ("node", &m.node),
        ("process", &m.server),
    ])
    .to_string();
    Ok(Target {
        me: me.to_string(),
        uuid: m.uuid.clone(),
        store_url: m.store_url.clone(),
        server: m.server.clone(),
        object,
        store: keel_engine::store_path(profile.layout(), me),
        client: ctx.client(profile, s.admin_port)?,
    })
}

impl Target {
    /// Invokes an operation on the engine in its server; `Ok(None)` when the server is down.
    pub(crate) fn invoke(
        &self,
        rt: &tokio::runtime::Runtime,
        op: &str,
        args: Vec<Value>,
        timeout: Duration,
    ) -> Result<Option<Value>> {
        match rt.block_on(
            self.client
                .clone()
                .with_timeout_ms(timeout.as_millis() as u64)
                .invoke(&self.object, op, args),
        ) {
            Ok(v) => Ok(Some(v)),
            Err(AdminError::Unreachable { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Refuses file operations on a PostgreSQL store, naming the tools that do them there.
    fn require_sqlite(&self, what: &str) -> Result<()> {
        if let Some(url) = &self.store_url {
            bail!(
                "the data store of {} is in PostgreSQL ({url}, schema {}): {what} it with PostgreSQL's own tools (pg_dump/pg_restore --schema, or base backups with WAL archiving)",
                self.me,
                keel_engine::pg_schema(&self.me, &self.uuid)
            );
        }
        Ok(())
    }

    /// A client of the engine's server's admin endpoint.
    pub(crate) fn client(&self) -> AdminClient {
        self.client.clone()
    }

    fn server_down(&self) -> anyhow::Error {
        anyhow!("server {} hosting messaging engine {} is not running; start it with `keel server start {}`", self.server, self.me, self.server)
    }
}

/// The data store's condition of a running engine (`storeHealth`): `None` when its server is
/// down or the engine is stopped.
fn store_health(t: &Target, rt: &tokio::runtime::Runtime) -> Result<Option<Value>> {
    let v = t.invoke(rt, "storeHealth", vec![], Duration::from_secs(5))?;
    Ok(v.filter(|v| !v.is_null()))
}

/// A store that is not ok is said on a line of its own (`store: disk-full since ...`).
fn print_store_health(store: Option<&Value>) {
    let Some(h) = store else { return };
    if h["state"] != "ok" {
        println!("store: {}", h["text"].as_str().unwrap_or("unknown"));
    }
}

pub fn run_me(ctx: &Ctx, cmd: MeCmd) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    let (_, cfg) = ctx.config(&profile)?;
    let rt = runtime()?;
    match cmd {
        MeCmd::List { json } => {
            let mut rows = Vec::new();
            for b in &cfg.buses {
                for m in &b.members {
                    let t = target(ctx, &profile, &cfg, &m.me)?;
                    let state = t
                        .invoke(&rt, "state", vec![], Duration::from_secs(5))?
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_else(|| "stopped".into());
                    rows.push(json!({"me": m.me, "bus": b.name, "node": m.node, "server": m.server, "uuid": m.uuid, "state": state, "initial_state": m.initial_state.as_str()}));
                }
            }
            if json {
                print_json(&Value::Array(rows));
            } else {
                for r in rows {
                    println!(
                        "{}  bus {}  server {}  {}  (initial state {})",
                        r["me"].as_str().unwrap_or(""),
                        r["bus"].as_str().unwrap_or(""),
                        r["server"].as_str().unwrap_or(""),
                        r["state"].as_str().unwrap_or(""),
                        r["initial_state"].as_str().unwrap_or("")
                    );
                }
            }
        }
        MeCmd::State { me, json } => {
            let t = target(ctx, &profile, &cfg, &me)?;
            let state = t.invoke(&rt, "state", vec![], Duration::from_secs(5))?;
            let state = state.as_ref().and_then(Value::as_str).unwrap_or("stopped");
            let waiting = match t.invoke(&rt, "flushState", vec![], Duration::from_secs(5))? {
                Some(flush) => flush
                    .get("waiting")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                None => None,
            };
            let store = store_health(&t, &rt)?;
            if json {
                print_json(
                    &json!({"me": me, "state": state, "flush_waiting": waiting, "store_health": store}),
                );
            } else {
                println!("{state}");
                // A FLUSH still waiting for peers is said on a second line (scripts read the first).
                if let Some(waiting) = waiting {
                    println!("flush pending: waiting for {waiting}");
                }
                print_store_health(store.as_ref());
            }
        }
        MeCmd::Start {
            me,
            flush,
            force_normal,
        } => {
            let t = target(ctx, &profile, &cfg, &me)?;
            let mode = if flush {
                "FLUSH"
            } else if force_normal {
                "FORCE_NORMAL"
            } else {
                "NORMAL"
            };
            t.invoke(
                &rt,
                "start",
                vec![Value::from(mode)],
                Duration::from_secs(600),
            )?
            .ok_or_else(|| t.server_down())?;
            if flush {
                println!("Messaging engine {me} started in restart-after-restore mode (look for CWSIP0783E in logs/{}/SystemOut.log).", t.server);
            } else {
                println!("Messaging engine {me} started.");
            }
        }
        MeCmd::Stop { me, force } => {
            let t = target(ctx, &profile, &cfg, &me)?;
            let args = if force {
                vec![Value::from("FORCE")]
            } else {
                vec![]
            };
            t.invoke(&rt, "stop", args, Duration::from_secs(120))?
                .ok_or_else(|| t.server_down())?;
            println!("Messaging engine {me} stopped.");
        }
        MeCmd::SetStore {
            me,
            postgres,
            sqlite,
            sync,
        } => {
            if postgres.is_none() && !sqlite {
                bail!("give --postgres URL or --sqlite");
            }
            let saved = profile
                .master()
                .update(|c| c.set_store_url(&me, postgres.clone()).map(|_| ()))?;
            match &postgres {
                Some(url) => println!("The data store of messaging engine {me} is now in PostgreSQL at {url} (schema {}); configuration version {}. Existing messages stay in the old store: move them with a backup and restore, or drain it first.", keel_engine::pg_schema(&me, &target(ctx, &profile, &saved, &me)?.uuid), saved.version),
                None => println!("The data store of messaging engine {me} is the embedded SQLite file again; configuration version {}.", saved.version),
            }
            after_save(ctx, &profile, sync.sync)?;
        }
        MeCmd::SetInitialState { me, state, sync } => {
            let st = InitialState::from(state);
            let saved = profile
                .master()
                .update(|c| c.set_initial_state(&me, st).map(|_| ()))?;
            println!(
                "Initial state of messaging engine {me} is {}; configuration version {}.",
                st.as_str(),
                saved.version
            );
            after_save(ctx, &profile, sync.sync)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_store(ctx: &Ctx, cmd: StoreCmd) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    let (_, cfg) = ctx.config(&profile)?;
    let rt = runtime()?;
    match cmd {
        StoreCmd::Info { me, json } => {
            let t = target(ctx, &profile, &cfg, &me)?;
            let v = match t.invoke(&rt, "storeInfo", vec![], Duration::from_secs(30))? {
                Some(v) => v,
                None if t.store_url.is_some() => {
                    let url = t.store_url.clone().unwrap_or_default();
                    let schema = keel_engine::pg_schema(&me, &t.uuid);
                    rt.block_on(async {
                        let s = keel_store::PgStore::open(&url, &schema, &me, &t.uuid).await?;
                        let info = keel_store::Store::info(&s).await;
                        keel_store::Store::close(&s).await?;
                        Ok::<_, keel_store::StoreError>(keel_engine::info_json(&me, &info?))
                    })?
                }
                None => {
                    if !t.store.exists() {
                        bail!("messaging engine {me} has no data store yet ({} does not exist): it is created when the engine first starts", t.store.display());
                    }
                    keel_engine::info_json(&me, &keel_store::read_info(&t.store)?)
                }
            };
            if json {
                print_json(&v);
            } else {
                for k in [
                    "me",
                    "uuid",
                    "backend",
                    "path",
                    "restore_state",
                    "messages",
                    "incarnation",
                    "schema_version",
                ] {
                    println!(
                        "{k:<15} {}",
                        v[k].as_str()
                            .map_or_else(|| v[k].to_string(), str::to_string)
                    );
                }
            }
        }
        StoreCmd::Backup { me, to, json } => {
            let t = target(ctx, &profile, &cfg, &me)?;
            t.require_sqlite("back up")?;
            let to = absolute(&to)?;
            let online = t
                .invoke(&rt, "state", vec![], Duration::from_secs(5))?
                .as_ref()
                .and_then(Value::as_str)
                == Some("started");
            let manifest = match online {
                true => {
                    // The server copies; the command can only show that it is still at it.
                    let spin =
                        spinner(&format!("backing up {me} (online, in server {})", t.server));
                    let out = t.invoke(
                        &rt,
                        "backup",
                        vec![Value::from(to.display().to_string())],
                        Duration::from_secs(3600),
                    );
                    spin.finish_and_clear();
                    out?.ok_or_else(|| t.server_down())?
                }
                false => {
                    // Offline: take the store lock so the engine cannot start meanwhile.
                    if !t.store.exists() {
                        bail!(
                            "messaging engine {me} has no data store yet ({} does not exist)",
                            t.store.display()
                        );
                    }
                    let store = keel_store::SqliteStore::open(&t.store, &me, &t.uuid)?;
                    let bar = progress_bar(&format!("backing up {me}"));
                    let m = store.backup_to(&to, &mut |done, total| {
                        bar.set_length(total);
                        bar.set_position(done);
                    })?;
                    bar.finish_and_clear();
                    let _ = rt.block_on(keel_store::Store::close(&store));
                    serde_json::to_value(&m)?
                }
            };
            if json {
                print_json(
                    &json!({"me": me, "path": to.display().to_string(), "online": online, "manifest": manifest}),
                );
            } else {
                println!(
                    "Backed up the data store of messaging engine {me} to {} ({} bytes, {} message(s)).",
                    to.display(),
                    manifest["bytes"],
                    manifest["messages"]
                );
            }
        }
        StoreCmd::Verify { me, json } => {
            let t = target(ctx, &profile, &cfg, &me)?;
            t.require_sqlite("check")?;
            let t0 = std::time::Instant::now();
            let spin = spinner(&format!("checking every page of {}", t.store.display()));
            let checked = keel_store::verify_file(&t.store, &me, &t.uuid);
            spin.finish_and_clear();
            checked?;
            if json {
                print_json(
                    &json!({"me": me, "path": t.store.display().to_string(), "ok": true, "elapsed_ms": t0.elapsed().as_millis() as u64}),
                );
            } else {
                println!(
                    "The data store of messaging engine {me} ({}) passed the integrity check in {:.1} s.",
                    t.store.display(),
                    t0.elapsed().as_secs_f64()
                );
            }
        }
        StoreCmd::Restore { me, from, json } => {
            let t = target(ctx, &profile, &cfg, &me)?;
            t.require_sqlite("restore")?;
            // The store holds its lock while its engine runs, and the restore takes it: a
            // restore can never swap the file under a running engine.
            let spin = spinner(&format!("verifying {} and restoring {me}", from.display()));
            let restored = keel_store::restore_from(&from, &t.store, &me, &t.uuid);
            spin.finish_and_clear();
            let report = match restored {
                Ok(r) => r,
                Err(keel_store::StoreError::InUse { .. }) => bail!(
                    "cannot restore the data store of messaging engine {me}: it is in use; stop the engine first (`keel me stop {me}`) and set its initial state to stopped (`keel me set-initial-state {me} stopped --sync`)"
                ),
                Err(e) => return Err(anyhow::Error::new(e).context(format!("restore of the data store of {me} from {} refused", from.display()))),
            };
            if json {
                print_json(
                    &json!({"me": me, "from": from.display().to_string(), "messages": report.messages, "restore_state": "restored"}),
                );
            } else {
                println!(
                    "Restored the data store of messaging engine {me} from {} ({} message(s)); it is marked restored: start it with `keel me start {me} --flush`.",
                    from.display(),
                    report.messages
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn absolute(p: &std::path::Path) -> Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

/// A byte-style progress bar on stderr; indicatif draws nothing when stderr is not a terminal,
/// so scripts and logs see only the final sentence.
fn progress_bar(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} pages ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    bar
}

/// A spinner for work whose size the command cannot see; ticks on its own.
fn spinner(what: &str) -> indicatif::ProgressBar {
    let s = indicatif::ProgressBar::new_spinner();
    s.set_message(what.to_string());
    s.enable_steady_tick(Duration::from_millis(120));
    s
}
