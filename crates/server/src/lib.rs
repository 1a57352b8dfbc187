//! The server process: `keel server run NAME` (launched by the node agent, never by hand).
//!
//! Start sequence, normal mode: read the node's synchronized configuration, open the log, bind
//! the admin port and the bus port (a port in use fails the start with one sentence), write the
//! pid file, register admin objects, log `WSVR0001I`. Stop (SIGTERM, SIGINT or the `stop`
//! operation of the `Server` admin object): `WSVR0102I`, components stop in reverse order, pid
//! file removed, `WSVR0024I`, exit 0.
//!
//! Recovery mode (`--recovery`, `WSVR0103I`): refused with `WSVR0104E` when the server has no
//! recovery logs; otherwise only the admin port, the messaging engines' stores (each opened by
//! `Engine::start_for_recovery`, whatever its initial state) and the transaction service
//! run (no bus port, no links, no applications, no FLUSH); when recovery is complete
//! `WSVR0105I` and exit 0. Normal mode runs the same recovery in the background while it takes
//! new work, then starts the applications (`apps`).
//!
//! Exit codes (read by the node agent): 0 normal stop or recovery complete, 2 refused by
//! configuration or state, 3 a port or file could not be opened.
//!
//! Invariant: a fatal start error is written both to SystemOut.log (`WSVR0101E`) and as one line
//! on stderr, which the node agent captures in native_stderr.log and hands back to the operator.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use keel_admin::{AdminError, AdminObject, OpFuture, Registry, Value};
use keel_config::Profile;
use keel_core::{catalog, emit, faults, ObjectName};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub mod apps;
pub mod links;
pub mod recovery;
pub mod txsvc;

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub profile: PathBuf,
    pub server: String,
    pub recovery: bool,
}

/// Exit codes of a server process; the node agent reads them.
pub use keel_core::exit;

#[derive(Debug)]
struct Fatal {
    code: u8,
    reason: String,
}

impl Fatal {
    fn refused(reason: impl Into<String>) -> Fatal {
        Fatal {
            code: exit::REFUSED,
            reason: reason.into(),
        }
    }
    fn resource(reason: impl Into<String>) -> Fatal {
        Fatal {
            code: exit::RESOURCE,
            reason: reason.into(),
        }
    }
}

/// Runs a server process to completion and returns its exit code.
pub fn run(opts: RunOptions) -> u8 {
    let profile = match Profile::open(&opts.profile) {
        Ok(p) => p,
        Err(e) => {
            keel_logs::say!("keel server: {e}");
            return exit::REFUSED;
        }
    };
    if let Err(e) = keel_logs::init_process(profile.layout(), &opts.server, false) {
        keel_logs::say!(
            "keel server: cannot open the log of server {} under {}: {e}",
            opts.server,
            profile.layout().logs(&opts.server).display()
        );
        return exit::RESOURCE;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            keel_logs::say!("keel server: cannot start the async runtime: {e}");
            return exit::RESOURCE;
        }
    };
    let code = match rt.block_on(serve(profile, &opts)) {
        Ok(()) => exit::OK,
        Err(fatal) => {
            emit!(
                catalog::WSVR0101E,
                server = opts.server,
                reason = fatal.reason
            );
            keel_logs::say!("{}", fatal.reason);
            fatal.code
        }
    };
    // The last records (the stop, or why the start failed) reach the repository before the
    // process ends.
    keel_logs::flush();
    code
}

/// Server lifecycle states as the admin API shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Starting = 0,
    Started = 1,
    Stopping = 2,
}

impl State {
    fn from_u8(v: u8) -> State {
        match v {
            0 => State::Starting,
            1 => State::Started,
            _ => State::Stopping,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Started => "started",
            State::Stopping => "stopping",
        }
    }
}

async fn serve(profile: Profile, opts: &RunOptions) -> Result<(), Fatal> {
    let started_at = SystemTime::now();
    let t0 = Instant::now();
    profile.secure_directories_logged();
    let node = profile
        .local_node()
        .map_err(|e| Fatal::refused(e.to_string()))?;
    let cfg = profile.node_copy(&node).load().map_err(|e| Fatal::refused(format!("{e} (this is the node's synchronized copy; run `keel config sync` after fixing the master)")))?;
    let (_, server_cfg) = cfg.find_server(&opts.server).ok_or_else(|| {
        Fatal::refused(format!(
            "server {} is not defined on node {node}; create it with `keel server create {}`",
            opts.server, opts.server
        ))
    })?;
    let mode = if opts.recovery { "recovery" } else { "normal" };
    emit!(
        catalog::WSVR0100I,
        server = opts.server,
        mode = mode,
        pid = std::process::id(),
        config_version = cfg.version
    );
    let unknown = faults::unknown_points();
    if !unknown.is_empty() {
        emit!(catalog::WSVR0106W, points = unknown.join(", "));
    }

    let tranlog_dir = profile
        .layout()
        .tranlog(&cfg.cell.name, &node, &opts.server);
    if opts.recovery && !recovery::has_logs(&tranlog_dir) {
        emit!(
            catalog::WSVR0104E,
            server = opts.server,
            path = tranlog_dir.display()
        );
        return Err(Fatal::refused(format!(
            "server {} cannot start in recovery mode: it has no recovery logs under {}; start it normally with `keel server start {}`",
            opts.server,
            tranlog_dir.display(),
            opts.server
        )));
    }

    let node_cfg = cfg
        .node(&node)
        .ok_or_else(|| Fatal::refused(format!("node {node} is not in the configuration")))?
        .clone();
    let admin_listener = bind(
        server_cfg.admin_port,
        "admin_port",
        &profile,
        &node_cfg,
        &opts.server,
    )
    .await?;
    // The bus port is reserved in normal mode so a conflict shows at start, not when the
    // messaging engine arrives; recovery mode opens no bus port (it takes no new work).
    let bus_listener = if opts.recovery {
        None
    } else {
        Some(
            bind(
                server_cfg.bus_port,
                "bus_port",
                &profile,
                &node_cfg,
                &opts.server,
            )
            .await?,
        )
    };

    let pid_file = profile.layout().pid_file(&opts.server);
    keel_config::write_pid_file(&pid_file).map_err(|e| {
        Fatal::resource(format!(
            "cannot write pid file {}: {e}; check that the profile is writable",
            pid_file.display()
        ))
    })?;

    let password = profile
        .admin_password()
        .map_err(|e| Fatal::refused(e.to_string()))?;
    let (stop_tx, mut stop_rx) = watch::channel(None::<String>);
    let state = Arc::new(AtomicU8::new(State::Starting as u8));
    let registry = Registry::new();
    let engines = engines_of(&profile, &cfg, &node, &opts.server, opts.recovery);
    let server_obj = Arc::new(ServerObject {
        name: ObjectName::new(&[
            ("type", "Server"),
            ("name", &opts.server),
            ("node", &node),
            ("process", &opts.server),
        ]),
        server: opts.server.clone(),
        node: node.clone(),
        cell: cfg.cell.name.clone(),
        mode,
        admin_port: server_cfg.admin_port,
        bus_port: bus_listener.as_ref().map(|_| server_cfg.bus_port),
        config_version: cfg.version,
        started_at,
        state: state.clone(),
        stop: stop_tx.clone(),
        engines: engines.clone(),
    });
    registry.register(server_obj.clone());
    let health_task = serve_health(&profile, &opts.server, server_obj.clone());
    if let Some(o) = keel_admin::logrepo::LogRepositoryObject::new(&node, &opts.server) {
        registry.register(Arc::new(o));
    }
    for e in &engines {
        registry.register(Arc::new(keel_engine::EngineObject::new(e.clone())));
        for qp in keel_engine::QueuePointObject::all(e) {
            registry.register(Arc::new(qp));
        }
    }

    // The transaction service: its recovery logs and resources (the engines above, the
    // cell's data sources). A corrupt log stops the start here, with the file named.
    let tx_svc = txsvc::TxService::open(
        profile.layout(),
        &cfg,
        &node,
        &opts.server,
        &tranlog_dir,
        &engines,
    )
    .await
    .map_err(|e| {
        Fatal::refused(format!(
            "transaction service of server {}: {e}",
            opts.server
        ))
    })?;
    registry.register(Arc::new(txsvc::TxServiceObject::new(tx_svc.clone(), &node)));
    let (tx_stop, _) = watch::channel(false);
    let mut tx_tasks = tokio::task::JoinSet::new();
    let mut apps = None;

    let admin_shutdown = {
        let mut rx = stop_tx.subscribe();
        async move {
            let _ = rx.wait_for(|v| v.is_some()).await;
        }
    };
    // Links derive each bus's key from the profile's admin credential (`keel_bus::auth`).
    let link_secret = password.clone();
    // AMQP over TLS on the bus port, with this server's certificate (`keel cert`); without
    // one the port serves plain AMQP and CWSIT0001I says why.
    let cert_name = format!("{node}.{}", opts.server);
    // Clients may show a certificate of the cell's CA (engine links and node agents do:
    // mutual TLS); AMQP clients and browsers need none.
    let (tls, tls_note) = match profile
        .pki()
        .mutual_server_config(&cert_name)
        .or_else(|_| profile.pki().server_config(&cert_name))
    {
        Ok(c) => (Some(c), format!("plain and TLS, certificate {cert_name}")),
        Err(e) => (None, format!("plain only, no TLS: {e}")),
    };
    // Links to other engines run over mutual TLS with this certificate when it is there.
    let link_tls = match profile.pki().mutual_client_config(&cert_name) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(target: "keel_server", "engine links of server {} use plain TCP (loopback peers only): {e}", opts.server);
            None
        }
    };
    // The cell's users, from the node's copy of the configuration, read again when it changes.
    let users = Arc::new(
        keel_auth::Users::watching(profile.node_copy(&node), profile.layout().admin_password())
            .map_err(|e| Fatal::refused(format!("users of server {}: {e}", opts.server)))?,
    );
    let users_task = tokio::spawn(users.clone().keep_fresh());
    let amqp_settings = Arc::new(keel_amqp::Settings {
        tls: tls.clone(),
        tls_note,
        server: opts.server.clone(),
        users: users.clone(),
        hosted: engines
            .iter()
            .map(|e| {
                let bus = cfg.buses.iter().find(|b| b.name == e.config().bus);
                keel_amqp::Hosted {
                    engine: e.clone(),
                    allow_anonymous: bus.is_some_and(|b| b.allow_anonymous),
                    anonymous_user: bus
                        .map_or(keel_config::DEFAULT_ANONYMOUS_USER, |b| b.anonymous_user())
                        .to_string(),
                    max_message_bytes: e.config().max_message_bytes,
                }
            })
            .collect(),
        links: Some(
            Arc::new(links::LinkAcceptor::new(
                &cfg,
                &engines,
                password.as_bytes(),
            ))
            .handler(),
        ),
    });
    drop(password);
    let admin_task = tokio::spawn(keel_admin::serve_with(
        admin_listener,
        registry.clone(),
        users,
        keel_admin::Settings {
            identity: keel_admin::Identity {
                cell: cfg.cell.name.clone(),
                node: node.clone(),
                process: opts.server.clone(),
            },
            limits: keel_admin::Limits::default(),
            logins: Default::default(),
            // HTTPS beside plain HTTP on the admin port, with the bus port's certificate.
            tls,
        },
        admin_shutdown,
    ));
    // The bus port is bound (reserved) already; it is served once the engines have started,
    // so a client that connects during the start waits in the backlog instead of being
    // refused with "not started".
    let mut bus_task = None;
    let mut link_tasks = tokio::task::JoinSet::new();
    spawn_signal_watch(stop_tx.clone());

    if opts.recovery {
        state.store(State::Started as u8, Ordering::Release);
        emit!(catalog::WSVR0103I, server = opts.server);
        // Every engine opens its store (whatever its initial state): it may hold prepared
        // branches. Nothing else reaches it: no bus port, no links, no applications.
        for e in &engines {
            if let Err(err) = e.start_for_recovery().await {
                tracing::warn!(target: "keel_server", me = %e.config().me, error = %err, "the messaging engine cannot open for recovery; its branches wait");
            }
        }
        let svc = tx_svc.clone();
        let stop = stop_tx.clone();
        let server = opts.server.clone();
        let halt = tx_stop.subscribe();
        tx_tasks.spawn(async move {
            let s = svc.recover(halt).await;
            if s.complete {
                emit!(
                    catalog::WTRN0004I,
                    server = server,
                    committed = s.committed,
                    rolled_back = s.rolled_back,
                    passes = s.passes
                );
                emit!(
                    catalog::WSVR0105I,
                    server = server,
                    transactions = s.transactions,
                    committed = s.committed,
                    rolled_back = s.rolled_back
                );
                let _ = stop.send(Some("recovery complete".into()));
            }
        });
    } else {
        start_engines(&cfg, &engines).await;
        {
            let svc = tx_svc.clone();
            let server = opts.server.clone();
            let halt = tx_stop.subscribe();
            tx_tasks.spawn(async move {
                let s = svc.recover(halt.clone()).await;
                if s.complete {
                    emit!(
                        catalog::WTRN0004I,
                        server = server,
                        committed = s.committed,
                        rolled_back = s.rolled_back,
                        passes = s.passes
                    );
                    svc.watch_pending(halt).await;
                }
            });
        }
        {
            // Data sources that cannot prepare branches are named at start (WTRN0013E).
            let svc = tx_svc.clone();
            let mut halt = tx_stop.subscribe();
            tx_tasks.spawn(async move {
                tokio::select! {
                    _ = svc.check_datasources() => {}
                    _ = halt.wait_for(|v| *v) => {}
                }
            });
        }
        apps = Some(apps::Apps::start(&cfg, &opts.server, &tx_svc));
        bus_task = bus_listener.map(|l| tokio::spawn(keel_amqp::serve(l, amqp_settings)));
        for e in &engines {
            for peer in links::peers_of(&cfg, e) {
                link_tasks.spawn(links::keep_linked(
                    e.clone(),
                    link_secret.as_bytes().to_vec(),
                    peer,
                    link_tls.clone(),
                ));
            }
        }
        faults::hit("server.before_open");
        emit!(
            catalog::WSVR0001I,
            server = opts.server,
            pid = std::process::id(),
            admin_port = server_cfg.admin_port,
            bus_port = server_cfg.bus_port
        );
        // Flipped after WSVR0001I is written: whoever sees `started` finds the line in the log.
        state.store(State::Started as u8, Ordering::Release);
        tracing::debug!(target: "keel_server", elapsed_ms = t0.elapsed().as_millis() as u64, "start sequence finished");
        faults::hit("server.after_open");
    }

    let reason = stop_rx
        .wait_for(|v| v.is_some())
        .await
        .ok()
        .and_then(|v| v.clone())
        .unwrap_or_else(|| "stop requested".into());
    state.store(State::Stopping as u8, Ordering::Release);
    faults::hit("server.before_stop");
    if !opts.recovery {
        emit!(catalog::WSVR0102I, server = opts.server, reason = reason);
    }
    // Reverse order of start: bus, engines, then admin (so status stays answerable while
    // stopping).
    if let Some(t) = bus_task {
        t.abort();
    }
    link_tasks.abort_all();
    // Applications finish the message they hold; then recovery stops and the logs close
    // (empty when nothing is in doubt), before the engines the resources use.
    if let Some(a) = apps {
        a.stop().await;
    }
    users_task.abort();
    let _ = tx_stop.send(true);
    while tx_tasks.join_next().await.is_some() {}
    tx_svc.shutdown().await;
    for e in &engines {
        if e.state() == keel_engine::MeState::Started {
            if let Err(err) = e.stop(false).await {
                tracing::warn!(target: "keel_server", me = %e.config().me, error = %err, "stopping the messaging engine failed");
            }
        }
    }
    match admin_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(target: "keel_server", error = %e, "admin endpoint ended with an error")
        }
        Err(e) => tracing::warn!(target: "keel_server", error = %e, "admin endpoint task failed"),
    }
    if let Some(task) = health_task {
        task.abort(); // its socket file goes with it
        let _ = task.await;
    }
    if let Err(e) = std::fs::remove_file(&pid_file) {
        tracing::warn!(target: "keel_server", error = %e, path = %pid_file.display(), "cannot remove pid file");
    }
    emit!(catalog::WSVR0024I, server = opts.server);
    Ok(())
}

/// One engine per bus this server is a member of. In recovery mode they exist (so their state
/// can be queried) but refuse to start.
fn engines_of(
    profile: &Profile,
    cfg: &keel_config::Config,
    node: &str,
    server: &str,
    recovery: bool,
) -> Vec<Arc<keel_engine::Engine>> {
    cfg.mes_of_server(node, server)
        .into_iter()
        .map(|(bus, m)| {
            let ecfg = keel_engine::EngineConfig {
                me: m.me.clone(),
                uuid: m.uuid.clone(),
                bus: bus.name.clone(),
                node: node.to_string(),
                server: server.to_string(),
                store_path: keel_engine::store_path(profile.layout(), &m.me),
                destinations: bus.destinations.clone(),
                max_message_bytes: bus.max_message_bytes,
                store_url: m.store_url.clone(),
                peers: bus
                    .members
                    .iter()
                    .filter(|p| p.me != m.me)
                    .map(|p| (p.me.clone(), p.uuid.clone()))
                    .collect(),
                duplicate_window_ms: u64::from(bus.duplicate_window_hours) * 3_600_000,
            };
            keel_engine::Engine::new(ecfg, recovery)
        })
        .collect()
}

/// Starts the engines whose initial state is `started`. A failure (a restored store, a damaged
/// file) leaves that engine stopped with its reason logged: the server still opens, so the
/// operator can act from the console, as the restore procedure expects.
async fn start_engines(cfg: &keel_config::Config, engines: &[Arc<keel_engine::Engine>]) {
    for e in engines {
        let me = &e.config().me;
        let initial = cfg.find_me(me).map(|(_, m)| m.initial_state);
        if initial != Some(keel_config::InitialState::Started) {
            emit!(
                catalog::CWSIP0106I,
                me = me,
                why = "its initial state is stopped"
            );
            continue;
        }
        match e.start(keel_engine::StartMode::Normal).await {
            Ok(()) => {}
            Err(keel_engine::EngineError::Restored { .. }) => {
                emit!(catalog::CWSIP0106I, me = me, why = "its data store was restored and needs a restart-after-restore (FLUSH) start")
            }
            Err(err) => emit!(catalog::CWSIP0106I, me = me, why = err),
        }
    }
}

async fn bind(
    port: u16,
    key: &str,
    profile: &Profile,
    node: &keel_config::NodeCfg,
    server: &str,
) -> Result<TcpListener, Fatal> {
    // The node's host is the address its processes bind and advertise (DESIGN §11).
    let addr = node.endpoint(port).map_err(|e| {
        Fatal::refused(format!(
            "the host {} of node {} gives no address to listen on ({e}); set `host` in its node.toml",
            node.host, node.name
        ))
    })?;
    let node = node.name.as_str();
    let cert = format!("{node}.{server}");
    let serves_tls = profile.pki().server_config(&cert).is_ok();
    if let Some(problem) = keel_core::plaintext::bind_problem(
        addr,
        serves_tls,
        &format!("{key} of server {server}"),
        &format!("make its certificate with `keel cert renew {cert}`, or bind a loopback address"),
    ) {
        return Err(Fatal::refused(problem));
    }
    TcpListener::bind(addr).await.map_err(|e| {
        let file = profile.layout().master_config().join("nodes").join(node).join("servers").join(format!("{server}.toml"));
        Fatal::resource(format!(
            "cannot listen on {addr} ({key} of server {server}): {e}; stop the process using it, or change `{key}` in {} and run `keel config sync`",
            file.display()
        ))
    })
}

fn spawn_signal_watch(stop: watch::Sender<Option<String>>) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::warn!(target: "keel_server", "cannot install signal handlers; stop the server through its admin API");
            return;
        };
        let why = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        let _ = stop.send(Some(format!("{why} received")));
    });
}

/// Answers the node agent's health ping on the process's own Unix socket (`run/<server>.health`,
/// `keel_admin::health`) with the `Server` object's attributes, so no load on the admin port
/// can make a healthy server look hung. `None` (and a warning) when the socket cannot be made:
/// the node agent then pings over the admin port.
fn serve_health(
    profile: &Profile,
    server: &str,
    object: Arc<ServerObject>,
) -> Option<tokio::task::JoinHandle<()>> {
    let run_dir = profile.layout().run_dir();
    let Some(path) = keel_admin::health::socket_path(&run_dir, server) else {
        tracing::warn!(target: "keel_server", dir = %run_dir.display(), "no health socket: the profile's path is too long for a Unix socket; the node agent pings over the admin port");
        return None;
    };
    match keel_admin::health::bind(&path) {
        Ok(listener) => {
            let answer: keel_admin::health::Answer = Arc::new(move || {
                let mut m = object.attributes();
                m.insert("ok".into(), Value::Bool(true));
                Value::Object(m)
            });
            Some(tokio::spawn(keel_admin::health::serve(
                listener, path, answer,
            )))
        }
        Err(e) => {
            tracing::warn!(target: "keel_server", path = %path.display(), error = %e, "no health socket; the node agent pings over the admin port");
            None
        }
    }
}

/// The `Server` admin object (`Keel:type=Server,name=S,node=N,process=S`).
struct ServerObject {
    name: ObjectName,
    server: String,
    node: String,
    cell: String,
    mode: &'static str,
    admin_port: u16,
    bus_port: Option<u16>,
    config_version: u64,
    started_at: SystemTime,
    state: Arc<AtomicU8>,
    stop: watch::Sender<Option<String>>,
    /// For the health its resources report (DESIGN §10).
    engines: Vec<Arc<keel_engine::Engine>>,
}

impl ServerObject {
    fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire))
    }

    /// `ok`, `degraded` (a resource refuses work for a while and takes it again by itself: a
    /// data store on a full disk) or `failed` (a resource takes no work until an operator acts:
    /// a failed data store), with one sentence naming each resource that is not ok. It is in
    /// the health ping's answer too, so a node agent or a monitor reads it without the admin
    /// port.
    fn health(&self) -> (&'static str, String) {
        let mut word = "ok";
        let mut detail = Vec::new();
        for e in &self.engines {
            let h = match e.store_health() {
                None | Some(keel_engine::StoreHealth::Ok) => continue,
                Some(h) => h,
            };
            word = match (&h, word) {
                (keel_engine::StoreHealth::Failed { .. }, _) | (_, "failed") => "failed",
                _ => "degraded",
            };
            detail.push(format!(
                "data store of messaging engine {}: {h}",
                e.config().me
            ));
        }
        (word, detail.join("; "))
    }
}

impl AdminObject for ServerObject {
    fn name(&self) -> ObjectName {
        self.name.clone()
    }

    fn attributes(&self) -> serde_json::Map<String, Value> {
        let uptime_s = self.started_at.elapsed().map(|d| d.as_secs()).unwrap_or(0);
        let (health, health_detail) = self.health();
        keel_admin::attribute_map(json!({
            "health": health,
            "health_detail": health_detail,
            "name": self.server,
            "node": self.node,
            "cell": self.cell,
            "state": self.state().as_str(),
            "mode": self.mode,
            "pid": std::process::id(),
            "admin_port": self.admin_port,
            "bus_port": self.bus_port,
            "config_version": self.config_version,
            "started_at": humantime::format_rfc3339_seconds(self.started_at).to_string(),
            "uptime_s": uptime_s,
        }))
    }

    fn operations(&self) -> Vec<keel_admin::Op> {
        vec![
            keel_admin::Op::monitor("state", "the server's state: starting, started or stopping"),
            keel_admin::Op::operator("stop", "stop the server normally (WSVR0024I)"),
            keel_admin::Op::monitor("ping", "answers \"pong\""),
        ]
    }

    fn invoke<'a>(&'a self, op: &'a str, args: Vec<Value>) -> OpFuture<'a> {
        Box::pin(async move {
            if !args.is_empty() {
                return Err(AdminError::BadArguments {
                    name: self.name.to_string(),
                    op: op.into(),
                    why: "this operation takes no arguments".into(),
                });
            }
            match op {
                "state" => Ok(Value::from(self.state().as_str())),
                "ping" => Ok(Value::from("pong")),
                "stop" => {
                    let _ = self
                        .stop
                        .send(Some("stop requested through the admin API".into()));
                    Ok(Value::from("stopping"))
                }
                _ => Err(keel_admin::OpErrors::new(&self.name, op).unknown(self)),
            }
        })
    }
}
