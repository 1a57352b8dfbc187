//! The node agent: `keel node run` (started in the background by `keel node start`).
//!
//! It owns the lifecycle of its node's servers. A server is launched as a child process in its
//! own process group (so a Ctrl-C or a crash of the agent does not take servers with it), with
//! stdout/stderr appended to `logs/<server>/native_*.log`. The agent then watches it two ways:
//! the child's exit (immediate) and an admin ping every `ping_interval_s` (a hung server that
//! stays silent for `ping_timeout_s` is killed, so its exit is handled like a crash).
//!
//! Exit handling is one decision (`Agent::on_exit`): a requested stop or a clean exit leaves the
//! server stopped; a recovery-mode run is never restarted; any other exit is a crash, restarted in
//! normal mode when the monitor policy has `auto_restart = true`, at most `max_start_attempts`
//! consecutive failed starts. `KEEL_FAULTS` reaches a server only through the operator's start
//! request, never through an automatic restart.
//!
//! Invariants:
//! - the slot table lock is never held across an `.await`;
//! - every launch bumps the slot's generation and a watcher acts only on its own generation, so
//!   a late exit of an old process can never change the state of a newer one;
//! - the agent reads the node's synchronized configuration copy, synchronizing from the master
//!   before each launch and at start (auto-sync), so a launch always uses the newest saved config.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use keel_admin::{
    AdminClient, AdminError, AdminObject, Credential, Delegate, OpFuture, Registry, Value,
};
use keel_config::{Config, Profile};
use keel_core::{catalog, emit, faults, layout::NODE_AGENT, ObjectName};
use serde_json::json;
use tokio::sync::watch;

mod certificates;
mod launch;

pub use launch::{alive as process_alive, is_profile_process, tail_reason};

#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub profile: PathBuf,
    /// Echo log lines to stdout (foreground runs).
    pub echo_stdout: bool,
}

/// Exit codes of the node agent process.
pub use keel_core::exit;

/// Stop waits this long for a server to exit after SIGTERM before it kills it.
const STOP_TIMEOUT_MS: u64 = 30_000;
/// How long one admin ping may take.
const PING_TIMEOUT_MS: u64 = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    Recovery,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Normal => "normal",
            Mode::Recovery => "recovery",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Stopped,
    Starting,
    Started,
    Stopping,
    Failed,
}

impl SlotState {
    fn as_str(self) -> &'static str {
        match self {
            SlotState::Stopped => "stopped",
            SlotState::Starting => "starting",
            SlotState::Started => "started",
            SlotState::Stopping => "stopping",
            SlotState::Failed => "failed",
        }
    }
    fn is_live(self) -> bool {
        matches!(
            self,
            SlotState::Starting | SlotState::Started | SlotState::Stopping
        )
    }
}

#[derive(Debug, Clone)]
struct Slot {
    state: SlotState,
    pid: Option<u32>,
    mode: Mode,
    generation: u64,
    desired_stop: bool,
    admin_port: u16,
    bus_port: u16,
    restarts: u32,
    last_exit: Option<String>,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            state: SlotState::Stopped,
            pid: None,
            mode: Mode::Normal,
            generation: 0,
            desired_stop: false,
            admin_port: 0,
            bus_port: 0,
            restarts: 0,
            last_exit: None,
        }
    }

    /// What every reader of a slot may rely on: a started server has a pid (status, stop and
    /// the watcher use it), and a server that is not live has none (a pid of a process that
    /// exited may already belong to another process).
    fn check(&self, server: &str) {
        assert!(
            self.state != SlotState::Started || self.pid.is_some(),
            "server {server}: a started slot has a pid"
        );
        assert!(
            self.state.is_live() || self.pid.is_none(),
            "server {server}: a {} slot holds pid {:?}",
            self.state.as_str(),
            self.pid
        );
    }
}

pub(crate) struct Agent {
    profile: Profile,
    node: String,
    credential: Credential,
    exe: PathBuf,
    slots: Mutex<BTreeMap<String, Slot>>,
    stop: watch::Sender<Option<String>>,
    started_at: SystemTime,
    admin_port: u16,
    /// The address of the node's host: its servers listen there.
    host: std::net::IpAddr,
    /// The node agent's certificate and the cell's CA: calls to servers use mutual TLS.
    tls: Option<Arc<keel_tls::rustls::ClientConfig>>,
    /// Admin ports of adopted servers that serve plain HTTP only (started by an earlier
    /// build): called over plain HTTP on loopback until they are started again.
    plain_ports: Mutex<std::collections::HashSet<u16>>,
}

/// Runs the node agent to completion; returns the process exit code.
pub fn run(opts: NodeOptions) -> u8 {
    let profile = match Profile::open(&opts.profile) {
        Ok(p) => p,
        Err(e) => {
            keel_logs::say!("keel node: {e}");
            return exit::REFUSED;
        }
    };
    if let Err(e) = keel_logs::init_process(profile.layout(), NODE_AGENT, opts.echo_stdout) {
        keel_logs::say!(
            "keel node: cannot open the node agent log under {}: {e}",
            profile.layout().logs(NODE_AGENT).display()
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
            keel_logs::say!("keel node: cannot start the async runtime: {e}");
            return exit::RESOURCE;
        }
    };
    let code = match rt.block_on(serve(profile)) {
        Ok(()) => exit::OK,
        Err((code, reason)) => {
            tracing::error!(target: "keel_node", "{reason}");
            keel_logs::say!("{reason}");
            code
        }
    };
    // The last records (the stop) reach the repository before the process ends.
    keel_logs::flush();
    code
}

async fn serve(profile: Profile) -> Result<(), (u8, String)> {
    let refused = |e: String| (exit::REFUSED, e);
    profile.secure_directories_logged();
    let node = profile.local_node().map_err(|e| refused(e.to_string()))?;
    // A profile made before users existed gets user `admin` now (ADMN0043I, said once).
    match keel_auth::ensure_users(&profile) {
        Ok(keel_auth::UpgradeOutcome::MadeAdmin) => {
            emit!(catalog::ADMN0043I, user = keel_auth::LEGACY_ADMIN)
        }
        Ok(keel_auth::UpgradeOutcome::HadUsers) => {}
        // The legacy credential keeps working meanwhile (`keel_auth::Users`).
        Err(e) => tracing::warn!("could not make the profile's first user: {e}"),
    }
    sync_config(&profile, &node);
    let cfg = profile
        .node_copy(&node)
        .load()
        .map_err(|e| refused(e.to_string()))?;
    let node_cfg = cfg
        .node(&node)
        .ok_or_else(|| refused(format!("node {node} is not defined in the configuration")))?
        .clone();
    certificates::ensure(&profile, &cfg, &node);

    let pid_file = profile.layout().pid_file(NODE_AGENT);
    // The node's host is the address its processes bind and advertise (DESIGN §11).
    let addr = node_cfg.endpoint(node_cfg.admin_port).map_err(|e| {
        refused(format!(
            "the host {} of node {node} gives no address to listen on ({e}); set `host` in its node.toml",
            node_cfg.host
        ))
    })?;
    let password = profile
        .admin_password()
        .map_err(|e| refused(e.to_string()))?;
    let credential = Credential {
        user: "admin".into(),
        password,
    };
    if let Some(pid) = launch::read_pid(&pid_file) {
        // Plain HTTP to a loopback host, else HTTPS (plain is for loopback only).
        let mut probe = AdminClient::new(addr, credential.clone()).with_timeout_ms(PING_TIMEOUT_MS);
        if !keel_core::plaintext::plain_allowed(addr.ip()) {
            if let Ok(tls) = profile.pki().client_config() {
                probe = probe.with_tls(tls);
            }
        }
        if launch::is_profile_process(pid, profile.root()) && probe.ping().await.is_ok() {
            return Err(refused(format!("the node agent of node {node} is already running (pid {pid}, admin {addr}); stop it with `keel node stop` first")));
        }
    }
    let cert = format!("{node}.{NODE_AGENT}");
    if let Some(problem) = keel_core::plaintext::bind_problem(
        addr,
        profile.pki().server_config(&cert).is_ok(),
        &format!("the node agent of node {node}"),
        &format!("make its certificate with `keel cert renew {cert}`, or bind a loopback address"),
    ) {
        return Err(refused(problem));
    }
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        (
            exit::RESOURCE,
            format!(
                "the node agent cannot listen on {addr}: {e}; stop the process using it, or change `admin_port` in {}",
                profile.layout().master_config().join("nodes").join(&node).join("node.toml").display()
            ),
        )
    })?;
    keel_config::write_pid_file(&pid_file).map_err(|e| {
        (
            exit::RESOURCE,
            format!("cannot write pid file {}: {e}", pid_file.display()),
        )
    })?;

    let exe = std::env::current_exe().map_err(|e| {
        (
            exit::RESOURCE,
            format!("cannot find the keel executable: {e}"),
        )
    })?;
    let agent_tls = profile
        .pki()
        .mutual_client_config(&format!("{node}.{NODE_AGENT}"));
    let (stop_tx, mut stop_rx) = watch::channel(None);
    let agent = Arc::new(Agent {
        profile,
        node: node.clone(),
        credential: credential.clone(),
        exe,
        slots: Mutex::new(BTreeMap::new()),
        stop: stop_tx.clone(),
        started_at: SystemTime::now(),
        admin_port: node_cfg.admin_port,
        host: addr.ip(),
        tls: match agent_tls {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(
                    "calls to the servers of node {node} use plain HTTP on loopback: {e}"
                );
                None
            }
        },
        plain_ports: Mutex::new(std::collections::HashSet::new()),
    });
    agent.adopt_running(&cfg).await;

    let registry = Registry::new();
    registry.register(Arc::new(NodeAgentObject {
        agent: agent.clone(),
        name: ObjectName::new(&[
            ("type", "NodeAgent"),
            ("name", NODE_AGENT),
            ("node", &node),
            ("process", NODE_AGENT),
        ]),
    }));
    if let Some(o) = keel_admin::logrepo::LogRepositoryObject::new(&node, NODE_AGENT) {
        registry.register(Arc::new(o));
    }
    registry.set_delegate(Arc::new(Peers {
        agent: agent.clone(),
    }));
    let shutdown = {
        let mut rx = stop_tx.subscribe();
        async move {
            let _ = rx.wait_for(|v| v.is_some()).await;
        }
    };
    let tls = match agent
        .profile
        .pki()
        .server_config(&format!("{node}.{NODE_AGENT}"))
    {
        Ok(c) => Some(c),
        Err(e) => {
            emit!(catalog::ADMN0042W, node = node, reason = e);
            None
        }
    };
    let settings = keel_admin::Settings {
        tls,
        identity: keel_admin::Identity {
            cell: cfg.cell.name.clone(),
            node: node.clone(),
            process: NODE_AGENT.to_string(),
        },
        limits: keel_admin::Limits::default(),
        logins: Default::default(),
    };
    let users = Arc::new(
        keel_auth::Users::watching(
            agent.profile.node_copy(&node),
            agent.profile.layout().admin_password(),
        )
        .map_err(|e| refused(format!("users of node {node}: {e}")))?,
    );
    let users_task = tokio::spawn(users.clone().keep_fresh());
    let admin_task = tokio::spawn(keel_admin::serve_with(
        listener, registry, users, settings, shutdown,
    ));
    spawn_signal_watch(stop_tx.clone());
    tokio::spawn(certificates::watch_expiry(
        agent.profile.clone(),
        node.clone(),
    ));
    emit!(
        catalog::ADMN0001I,
        node = node,
        pid = std::process::id(),
        admin_port = node_cfg.admin_port
    );

    let _ = stop_rx.wait_for(|v| v.is_some()).await;
    let _ = admin_task.await;
    users_task.abort();
    let _ = std::fs::remove_file(&pid_file);
    emit!(catalog::ADMN0002I, node = node);
    Ok(())
}

fn server_object(node: &str, server: &str) -> String {
    ObjectName::new(&[
        ("type", "Server"),
        ("name", server),
        ("node", node),
        ("process", server),
    ])
    .to_string()
}

fn sync_config(profile: &Profile, node: &str) {
    match keel_config::sync(&profile.master(), &profile.node_copy(node)) {
        Ok(o) if o.from != Some(o.to) => {
            let from = o.from.map_or_else(|| "none".to_string(), |v| v.to_string());
            emit!(catalog::ADMN0020I, node = node, from = from, to = o.to);
        }
        Ok(_) => {}
        Err(e) => emit!(catalog::ADMN0021E, node = node, reason = e),
    }
}

fn spawn_signal_watch(stop: watch::Sender<Option<String>>) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::warn!(target: "keel_node", "cannot install signal handlers; stop the node agent through its admin API");
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = stop.send(Some("signal".into()));
    });
}

/// Options of `launchProcess`, as sent by `keel server start`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LaunchOptions {
    #[serde(default)]
    recovery: bool,
    /// KEEL_FAULTS for this start only.
    #[serde(default)]
    faults: Option<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StopOptions {
    #[serde(default)]
    force: bool,
    #[serde(default)]
    stop_servers: bool,
}

impl Agent {
    fn config(&self) -> Result<Config, String> {
        self.profile
            .node_copy(&self.node)
            .load()
            .map_err(|e| e.to_string())
    }

    /// Whether `server` answers its health ping: on its own Unix socket when it has one (no
    /// load on its admin port can starve that), else over the admin port.
    async fn answers_ping(&self, server: &str, admin_port: u16) -> bool {
        let socket = keel_admin::health::socket_path(&self.profile.layout().run_dir(), server)
            .filter(|p| p.exists());
        match socket {
            Some(path) => keel_admin::health::ping(&path, PING_TIMEOUT_MS)
                .await
                .is_ok(),
            None => self
                .client(admin_port)
                .with_timeout_ms(PING_TIMEOUT_MS)
                .ping()
                .await
                .is_ok(),
        }
    }

    /// A client of a server's admin port: mutual TLS with the node agent's certificate, or
    /// plain HTTP on loopback (allowed there, DESIGN §10) for a server that serves nothing
    /// else (adopted from an earlier build) or when the agent has no certificate.
    fn client(&self, admin_port: u16) -> AdminClient {
        let plain = AdminClient::new(
            std::net::SocketAddr::new(self.host, admin_port),
            self.credential.clone(),
        );
        match &self.tls {
            Some(tls) if !self.is_plain(admin_port) => plain.with_tls(tls.clone()),
            _ => plain,
        }
    }

    fn is_plain(&self, admin_port: u16) -> bool {
        self.plain_ports
            .lock()
            .expect("plain ports lock")
            .contains(&admin_port)
    }

    /// How the agent calls a server on `admin_port`, for `status`.
    fn transport(&self, admin_port: u16) -> &'static str {
        if self.tls.is_some() && !self.is_plain(admin_port) {
            "mutual TLS"
        } else {
            "plain HTTP on loopback"
        }
    }

    /// For an adopted server: if it does not answer over TLS but does in plain HTTP, call it
    /// in plain HTTP until it is started again.
    async fn learn_transport(&self, server: &str, admin_port: u16) {
        if self.tls.is_none()
            || self
                .client(admin_port)
                .with_timeout_ms(PING_TIMEOUT_MS)
                .ping()
                .await
                .is_ok()
        {
            return;
        }
        self.plain_ports
            .lock()
            .expect("plain ports lock")
            .insert(admin_port);
        if self
            .client(admin_port)
            .with_timeout_ms(PING_TIMEOUT_MS)
            .ping()
            .await
            .is_ok()
        {
            tracing::warn!("server {server} (started by an earlier build) does not answer over TLS: the node agent calls it in plain HTTP on loopback until it is started again");
        } else {
            self.plain_ports
                .lock()
                .expect("plain ports lock")
                .remove(&admin_port);
        }
    }

    /// Servers left running by an earlier node agent (their pid file names a live process that
    /// answers its admin ping) are supervised again instead of being started twice.
    async fn adopt_running(self: &Arc<Self>, cfg: &Config) {
        let Some(node) = cfg.node(&self.node) else {
            return;
        };
        for s in &node.servers {
            let Some(pid) = launch::read_pid(&self.profile.layout().pid_file(&s.name)) else {
                continue;
            };
            if !launch::is_profile_process(pid, self.profile.root())
                || !self.answers_ping(&s.name, s.admin_port).await
            {
                continue;
            }
            let generation = {
                let mut slots = self.slots.lock().expect("slot lock");
                let slot = slots.entry(s.name.clone()).or_insert_with(Slot::new);
                slot.generation += 1;
                slot.state = SlotState::Started;
                slot.pid = Some(pid);
                slot.admin_port = s.admin_port;
                slot.bus_port = s.bus_port;
                slot.check(&s.name);
                slot.generation
            };
            self.learn_transport(&s.name, s.admin_port).await;
            emit!(catalog::ADMN0019I, server = s.name, pid = pid);
            let agent = self.clone();
            let name = s.name.clone();
            tokio::spawn(async move { agent.watch(name, generation, pid, None).await });
        }
    }

    /// Operator start (`keel server start`): one attempt, the reason of a failure goes back to
    /// the caller. Automatic restarts go through `restart`.
    async fn start(self: &Arc<Self>, server: &str, opts: LaunchOptions) -> Result<Value, String> {
        let mode = if opts.recovery {
            Mode::Recovery
        } else {
            Mode::Normal
        };
        {
            let mut slots = self.slots.lock().expect("slot lock");
            let slot = slots.entry(server.to_string()).or_insert_with(Slot::new);
            if slot.state.is_live() {
                let pid = slot.pid.map_or_else(String::new, |p| format!(" (pid {p})"));
                return Err(format!("server {server} is already {}{pid}; stop it first with `keel server stop {server}`", slot.state.as_str()));
            }
            slot.state = SlotState::Starting;
            slot.mode = mode;
            slot.desired_stop = false;
            slot.restarts = 0;
        }
        let result = self
            .launch_once(server, mode, opts.faults.as_deref(), 1, 1)
            .await;
        if result.is_err() {
            self.set_state(server, SlotState::Stopped);
        }
        result
    }

    fn set_state(&self, server: &str, state: SlotState) {
        let mut slots = self.slots.lock().expect("slot lock");
        if let Some(slot) = slots.get_mut(server) {
            slot.state = state;
            if !state.is_live() {
                slot.pid = None;
            }
            slot.check(server);
        }
    }

    /// One launch attempt: spawn, wait until the server answers its admin ping (or exits, or
    /// the start timeout passes), then hand the process to a watcher.
    async fn launch_once(
        self: &Arc<Self>,
        server: &str,
        mode: Mode,
        faults: Option<&str>,
        attempt: u32,
        max_attempts: u32,
    ) -> Result<Value, String> {
        sync_config(&self.profile, &self.node);
        let cfg = self.config()?;
        if let Some((_, s)) = cfg.find_server(server) {
            // A server this agent starts is of its build: it serves TLS.
            self.plain_ports
                .lock()
                .expect("plain ports lock")
                .remove(&s.admin_port);
        }
        let (_, scfg) = cfg
            .find_server(server)
            .ok_or_else(|| format!("server {server} is not defined on node {}; create it with `keel server create {server}`", self.node))?;
        let scfg = scfg.clone();
        emit!(
            catalog::ADMN0010I,
            server = server,
            mode = mode.as_str(),
            attempt = attempt,
            max_attempts = max_attempts
        );
        let t0 = Instant::now();
        let (mut child, stderr_offset) = launch::spawn(
            &self.exe,
            self.profile.root(),
            self.profile.layout(),
            server,
            mode == Mode::Recovery,
            faults,
        )?;
        faults::hit("node.after_launch");
        let pid = child.id().unwrap_or(0);
        let generation = {
            let mut slots = self.slots.lock().expect("slot lock");
            let slot = slots.entry(server.to_string()).or_insert_with(Slot::new);
            slot.generation += 1;
            slot.pid = Some(pid);
            slot.admin_port = scfg.admin_port;
            slot.bus_port = scfg.bus_port;
            slot.generation
        };
        let client = self
            .client(scfg.admin_port)
            .with_timeout_ms(PING_TIMEOUT_MS);
        let deadline = t0 + Duration::from_secs(u64::from(scfg.monitor.start_timeout_s));
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    let reason = launch::tail_reason(self.profile.layout(), server, stderr_offset)
                        .unwrap_or_else(|| format!("the process ended ({status})"));
                    if mode == Mode::Recovery && status.success() {
                        emit!(
                            catalog::ADMN0018I,
                            server = server,
                            pid = pid,
                            status = status
                        );
                        self.set_state(server, SlotState::Stopped);
                        return Ok(
                            json!({"server": server, "pid": pid, "mode": "recovery", "state": "stopped", "outcome": "recovery complete"}),
                        );
                    }
                    self.record_exit(server, generation, format!("{status}"));
                    return Err(format!(
                        "server {server} did not start: {reason} (see {})",
                        self.profile.layout().native_stderr(server).display()
                    ));
                }
                Ok(None) => {}
                Err(e) => return Err(format!("cannot watch server {server} (pid {pid}): {e}")),
            }
            // Open means the Server object says `started` (WSVR0001I is logged just before it
            // flips), not merely that the admin port answers.
            if client
                .invoke(&server_object(&self.node, server), "state", vec![])
                .await
                .is_ok_and(|v| v == "started")
            {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.start_kill();
                let _ = child.wait().await;
                self.record_exit(server, generation, "killed: start timeout".into());
                return Err(format!(
                    "server {server} (pid {pid}) did not open within start_timeout_s = {} and was killed; see logs/{server}/SystemOut.log",
                    scfg.monitor.start_timeout_s
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed_ms = t0.elapsed().as_millis() as u64;
        {
            let mut slots = self.slots.lock().expect("slot lock");
            if let Some(slot) = slots.get_mut(server) {
                // Unless an exit was recorded meanwhile (it cleared the pid).
                if slot.generation == generation && slot.pid.is_some() {
                    slot.state = SlotState::Started;
                    slot.check(server);
                }
            }
        }
        // A recovery-mode server answers like an open one, but takes no work.
        let how = match mode {
            Mode::Recovery => "running in recovery mode: it takes no new work and stops by itself when recovery is complete",
            Mode::Normal => "open for work",
        };
        emit!(
            catalog::ADMN0011I,
            server = server,
            how = how,
            pid = pid,
            elapsed_ms = elapsed_ms
        );
        let agent = self.clone();
        let name = server.to_string();
        tokio::spawn(async move { agent.watch(name, generation, pid, Some(child)).await });
        Ok(
            json!({"server": server, "pid": pid, "mode": mode.as_str(), "state": "started", "elapsed_ms": elapsed_ms}),
        )
    }

    fn record_exit(&self, server: &str, generation: u64, what: String) {
        let mut slots = self.slots.lock().expect("slot lock");
        if let Some(slot) = slots.get_mut(server) {
            if slot.generation == generation {
                slot.last_exit = Some(what);
                slot.pid = None;
            }
        }
    }

    /// Watches one server process until it exits: the child's exit status when it is our
    /// child, polling its pid otherwise (adopted), and an admin ping every ping interval.
    async fn watch(
        self: Arc<Self>,
        server: String,
        generation: u64,
        pid: u32,
        mut child: Option<tokio::process::Child>,
    ) {
        let mut last_ok = Instant::now();
        // (clean, description) of the exit.
        let (clean, status): (bool, String) = loop {
            let policy = self
                .config()
                .ok()
                .and_then(|c| c.find_server(&server).map(|(_, s)| s.monitor.clone()))
                .unwrap_or_default();
            let interval = Duration::from_secs(u64::from(policy.ping_interval_s));
            let ended = match child.as_mut() {
                Some(c) => tokio::select! {
                    st = c.wait() => Some(match st {
                        Ok(s) => (s.success(), s.to_string()),
                        Err(e) => (false, format!("unknown ({e})")),
                    }),
                    _ = tokio::time::sleep(interval) => None,
                },
                None => {
                    // Not our child: poll the pid at a short interval so exit is noticed fast.
                    let until = Instant::now() + interval;
                    let mut gone = false;
                    while Instant::now() < until {
                        if !launch::alive(pid) {
                            gone = true;
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    // Not our child, so no exit status: a server removes its pid file only
                    // on a clean stop, which tells a clean exit from a crash.
                    gone.then(|| {
                        let pid_file_left = self.profile.layout().pid_file(&server).exists();
                        let how = if pid_file_left {
                            "ended without a clean stop (adopted process)"
                        } else {
                            "exited cleanly (adopted process)"
                        };
                        (!pid_file_left, how.to_string())
                    })
                }
            };
            if let Some(st) = ended {
                break st;
            }
            let (admin_port, live) = {
                let slots = self.slots.lock().expect("slot lock");
                match slots.get(&server) {
                    Some(s) if s.generation == generation => {
                        (s.admin_port, s.state != SlotState::Stopping)
                    }
                    _ => (0, false),
                }
            };
            if !live {
                continue; // a stop is in progress; its exit ends this loop
            }
            if self.answers_ping(&server, admin_port).await {
                last_ok = Instant::now();
            } else {
                let silent_ms = last_ok.elapsed().as_millis() as u64;
                let timeout_ms = u64::from(policy.ping_timeout_s) * 1000;
                if silent_ms >= timeout_ms {
                    emit!(
                        catalog::ADMN0016W,
                        server = server,
                        pid = pid,
                        silent_ms = silent_ms,
                        timeout_ms = timeout_ms
                    );
                    launch::kill(pid, true);
                }
            }
        };
        self.on_exit(&server, generation, pid, clean, status);
    }

    /// The single place that decides what an exit means (see the crate docs).
    fn on_exit(
        self: &Arc<Self>,
        server: &str,
        generation: u64,
        pid: u32,
        clean: bool,
        status: String,
    ) {
        let (desired, mode) = {
            let mut slots = self.slots.lock().expect("slot lock");
            let Some(slot) = slots.get_mut(server) else {
                return;
            };
            if slot.generation != generation {
                return;
            }
            // The process is gone: never "started" without a pid, not even until the policy
            // below decides between stopped and a restart.
            slot.pid = None;
            slot.state = SlotState::Stopped;
            slot.last_exit = Some(status.clone());
            (slot.desired_stop, slot.mode)
        };
        if desired {
            self.set_state(server, SlotState::Stopped);
            return; // the stop request logs the outcome
        }
        if mode == Mode::Recovery {
            emit!(
                catalog::ADMN0018I,
                server = server,
                pid = pid,
                status = status
            );
            self.set_state(server, SlotState::Stopped);
            return;
        }
        if clean {
            emit!(
                catalog::ADMN0017I,
                server = server,
                pid = pid,
                how = " (stopped by the server itself)"
            );
            self.set_state(server, SlotState::Stopped);
            return;
        }
        emit!(
            catalog::ADMN0012W,
            server = server,
            pid = pid,
            status = status
        );
        let policy = self
            .config()
            .ok()
            .and_then(|c| c.find_server(server).map(|(_, s)| s.monitor.clone()));
        match policy {
            Some(p) if p.auto_restart => {
                emit!(catalog::ADMN0013I, server = server);
                self.set_state(server, SlotState::Starting);
                let agent = self.clone();
                let name = server.to_string();
                tokio::spawn(async move { agent.restart(&name, p.max_start_attempts).await });
            }
            Some(_) => {
                emit!(
                    catalog::ADMN0014W,
                    server = server,
                    why = "auto_restart is false in its monitor policy"
                );
                self.set_state(server, SlotState::Stopped);
            }
            None => {
                emit!(
                    catalog::ADMN0014W,
                    server = server,
                    why = "it is no longer in the configuration"
                );
                self.set_state(server, SlotState::Stopped);
            }
        }
    }

    /// Automatic restart after a crash: normal mode, no fault points, bounded attempts with a
    /// short growing back-off so a crash loop does not spin.
    async fn restart(self: &Arc<Self>, server: &str, max_attempts: u32) {
        let mut reason = String::new();
        for attempt in 1..=max_attempts.max(1) {
            if self
                .slots
                .lock()
                .expect("slot lock")
                .get(server)
                .is_some_and(|s| s.desired_stop)
            {
                return;
            }
            match self
                .launch_once(server, Mode::Normal, None, attempt, max_attempts)
                .await
            {
                Ok(_) => {
                    if let Some(s) = self.slots.lock().expect("slot lock").get_mut(server) {
                        s.restarts += 1;
                    }
                    return;
                }
                Err(e) => reason = e,
            }
            tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt))).await;
        }
        emit!(
            catalog::ADMN0015E,
            server = server,
            attempts = max_attempts,
            reason = reason
        );
        self.set_state(server, SlotState::Failed);
    }

    async fn stop_server(self: &Arc<Self>, server: &str, force: bool) -> Result<Value, String> {
        let (pid, generation) = {
            let mut slots = self.slots.lock().expect("slot lock");
            let slot = slots
                .get_mut(server)
                .filter(|s| s.state.is_live() && s.pid.is_some());
            let Some(slot) = slot else {
                return Err(format!(
                    "server {server} is not running on node {}",
                    self.node
                ));
            };
            slot.desired_stop = true;
            slot.state = SlotState::Stopping;
            (slot.pid.unwrap_or(0), slot.generation)
        };
        launch::kill(pid, force);
        let deadline = Instant::now() + Duration::from_millis(STOP_TIMEOUT_MS);
        let mut forced = force;
        loop {
            let done = {
                let slots = self.slots.lock().expect("slot lock");
                slots
                    .get(server)
                    .is_none_or(|s| s.generation != generation || s.state == SlotState::Stopped)
            };
            if done {
                break;
            }
            if !forced && Instant::now() >= deadline {
                tracing::warn!(target: "keel_node", server, pid, "server did not stop within {STOP_TIMEOUT_MS} ms of SIGTERM; killing it");
                launch::kill(pid, true);
                forced = true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        emit!(
            catalog::ADMN0017I,
            server = server,
            pid = pid,
            how = if forced { " (forced)" } else { "" }
        );
        Ok(json!({"server": server, "pid": pid, "forced": forced}))
    }

    fn server_status(&self, cfg: &Config, server: &str) -> Option<Value> {
        let (_, s) = cfg.find_server(server)?;
        let slots = self.slots.lock().expect("slot lock");
        let slot = slots.get(server).cloned().unwrap_or_else(Slot::new);
        slot.check(server);
        let live = slot.state.is_live();
        // Ports of a live process are the ones it was started with; config may have moved on.
        let (admin, bus) = if live {
            (slot.admin_port, slot.bus_port)
        } else {
            (s.admin_port, s.bus_port)
        };
        let bus_served = !(live && slot.mode == Mode::Recovery);
        Some(json!({
            "name": server,
            "node": self.node,
            "state": slot.state.as_str(),
            "pid": slot.pid,
            "mode": if live { Some(slot.mode.as_str()) } else { None },
            "endpoints": {"admin": std::net::SocketAddr::new(self.host, admin).to_string(), "bus": if bus_served { Some(std::net::SocketAddr::new(self.host, bus).to_string()) } else { None }},
            "auto_restart": s.monitor.auto_restart,
            "admin_transport": self.transport(admin),
            "restarts": slot.restarts,
            "last_exit": slot.last_exit,
        }))
    }

    fn status(&self) -> Result<Value, String> {
        let cfg = self.config()?;
        let node = cfg
            .node(&self.node)
            .ok_or_else(|| format!("node {} is not in the configuration", self.node))?;
        Ok(Value::Array(
            node.servers
                .iter()
                .filter_map(|s| self.server_status(&cfg, &s.name))
                .collect(),
        ))
    }

    async fn shutdown(self: &Arc<Self>, stop_servers: bool) -> Result<Value, String> {
        let mut stopped = Vec::new();
        if stop_servers {
            let live: Vec<String> = self
                .slots
                .lock()
                .expect("slot lock")
                .iter()
                .filter(|(_, s)| s.state.is_live())
                .map(|(n, _)| n.clone())
                .collect();
            for s in live {
                self.stop_server(&s, false).await?;
                stopped.push(s);
            }
        }
        let _ = self.stop.send(Some("stop requested".into()));
        Ok(json!({"stopping": true, "servers_stopped": stopped}))
    }
}

struct Peers {
    agent: Arc<Agent>,
}

impl Delegate for Peers {
    fn peers(&self) -> Vec<(String, AdminClient)> {
        let slots = self.agent.slots.lock().expect("slot lock");
        slots
            .iter()
            .filter(|(_, s)| s.state.is_live() && s.pid.is_some())
            .map(|(n, s)| (n.clone(), self.agent.client(s.admin_port)))
            .collect()
    }
}

/// `Keel:type=NodeAgent,name=nodeagent,node=N,process=nodeagent`.
struct NodeAgentObject {
    agent: Arc<Agent>,
    name: ObjectName,
}

fn parse_args<T: serde::de::DeserializeOwned + Default>(
    name: &ObjectName,
    op: &str,
    args: &[Value],
    first_is_server: bool,
) -> Result<(Option<String>, T), AdminError> {
    let bad = |why: String| keel_admin::OpErrors::new(name, op).bad(why);
    let mut it = args.iter();
    let server = if first_is_server {
        Some(
            it.next()
                .and_then(Value::as_str)
                .ok_or_else(|| bad("the first argument must be a server name".into()))?
                .to_string(),
        )
    } else {
        None
    };
    let opts = match it.next() {
        None => T::default(),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| bad(format!("options: {e}")))?,
    };
    if it.next().is_some() {
        return Err(bad("too many arguments".into()));
    }
    Ok((server, opts))
}

impl AdminObject for NodeAgentObject {
    fn name(&self) -> ObjectName {
        self.name.clone()
    }

    fn attributes(&self) -> serde_json::Map<String, Value> {
        let a = &self.agent;
        let node_version = a.profile.node_copy(&a.node).version().ok();
        let master_version = a.profile.master().version().ok();
        keel_admin::attribute_map(json!({
            "node": a.node,
            "pid": std::process::id(),
            "admin_port": a.admin_port,
            "state": "started",
            "config_version": node_version,
            "master_config_version": master_version,
            "started_at": humantime::format_rfc3339_seconds(a.started_at).to_string(),
            "servers": a.status().unwrap_or(Value::Null),
            "certificates": certificates::attribute(&a.profile, &a.node),
        }))
    }

    fn operations(&self) -> Vec<keel_admin::Op> {
        vec![
            keel_admin::Op::operator("launchProcess", "launchProcess(server[, {recovery, faults}]): start a server and wait until it is open"),
            keel_admin::Op::operator("stopProcess", "stopProcess(server[, {force}]): stop a server (SIGTERM, or SIGKILL with force)"),
            keel_admin::Op::monitor("status", "status(): every server of the node with state, pid and endpoints"),
            keel_admin::Op::monitor("serverStatus", "serverStatus(server): one server's state, pid and endpoints"),
            keel_admin::Op::configurator("syncConfig", "syncConfig(): copy the master configuration to this node now"),
            keel_admin::Op::operator("stop", "stop([{stop_servers}]): stop the node agent (servers keep running unless stop_servers)"),
        ]
    }

    fn invoke<'a>(&'a self, op: &'a str, args: Vec<Value>) -> OpFuture<'a> {
        Box::pin(async move {
            let failed = |why: String| keel_admin::OpErrors::new(&self.name, op).failed(why);
            match op {
                "launchProcess" => {
                    let (server, opts) = parse_args::<LaunchOptions>(&self.name, op, &args, true)?;
                    self.agent
                        .start(&server.unwrap_or_default(), opts)
                        .await
                        .map_err(failed)
                }
                "stopProcess" => {
                    let (server, opts) = parse_args::<StopOptions>(&self.name, op, &args, true)?;
                    self.agent
                        .stop_server(&server.unwrap_or_default(), opts.force)
                        .await
                        .map_err(failed)
                }
                "status" => self.agent.status().map_err(failed),
                "serverStatus" => {
                    let (server, ()) = parse_args::<()>(&self.name, op, &args, true)?;
                    let server = server.unwrap_or_default();
                    let cfg = self.agent.config().map_err(&failed)?;
                    self.agent.server_status(&cfg, &server).ok_or_else(|| {
                        failed(format!(
                            "server {server} is not defined on node {}",
                            self.agent.node
                        ))
                    })
                }
                "syncConfig" => {
                    let o = keel_config::sync(
                        &self.agent.profile.master(),
                        &self.agent.profile.node_copy(&self.agent.node),
                    )
                    .map_err(|e| failed(e.to_string()))?;
                    if o.from != Some(o.to) {
                        let from = o.from.map_or_else(|| "none".to_string(), |v| v.to_string());
                        emit!(
                            catalog::ADMN0020I,
                            node = self.agent.node,
                            from = from,
                            to = o.to
                        );
                    }
                    Ok(json!({"from": o.from, "to": o.to}))
                }
                "stop" => {
                    let (_, opts) = parse_args::<StopOptions>(&self.name, op, &args, false)?;
                    self.agent.shutdown(opts.stop_servers).await.map_err(failed)
                }
                _ => Err(keel_admin::OpErrors::new(&self.name, op).unknown(self)),
            }
        })
    }
}
