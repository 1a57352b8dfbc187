//! The configuration's types: plain data, the defaults and limits operators see, and lookups.

use serde::{Deserialize, Serialize};

pub use keel_core::roles::{AdminRole, BusGrant, BusRole, Grants};

use crate::error::{ConfigError, Result};
use crate::fsx::natural_cmp;

/// Lowest port Keel hands out or accepts: below 1024 needs root, which Keel never asks for.
pub const MIN_PORT: u16 = 1024;
/// Longest object name; names become file and directory names, so they stay short.
pub const MAX_NAME_LEN: usize = 64;

/// A whole cell's configuration, as held by one repository (master or node copy).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Bumped by 1 on every change of the master, so a node copy knows it is behind.
    pub version: u64,
    pub cell: Cell,
    pub nodes: Vec<NodeCfg>,
    pub buses: Vec<BusCfg>,
    /// XA-capable databases applications use, in natural name order.
    #[serde(default)]
    pub datasources: Vec<DataSourceCfg>,
    /// Message-driven applications, in natural name order.
    #[serde(default)]
    pub apps: Vec<AppCfg>,
    /// Users of the admin API, the console and the bus, in natural name order. None at all
    /// means a profile made before users existed: its processes accept the admin credential
    /// of the profile's secrets until `keel_auth::ensure_users` makes user `admin`.
    #[serde(default)]
    pub users: Vec<UserCfg>,
}

/// One user: how it proves who it is (password verifiers, never the password) and what it may
/// do (`keel_core::roles`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserCfg {
    pub name: String,
    /// Argon2id PHC string; None: the user cannot log in with a password (it exists to be what
    /// anonymous clients of a bus act as).
    #[serde(default)]
    pub password_hash: Option<String>,
    /// SCRAM-SHA-256 verifier in PostgreSQL's form (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`),
    /// made with the hash from the same password, for clients that cannot use TLS.
    #[serde(default)]
    pub scram_sha_256: Option<String>,
    #[serde(default)]
    pub roles: Vec<AdminRole>,
    #[serde(default)]
    pub grants: Vec<BusGrant>,
}

impl UserCfg {
    /// What the user holds, as the listeners check it.
    pub fn grants(&self) -> Grants {
        Grants {
            roles: self.roles.clone(),
            bus: self.grants.clone(),
        }
    }
}

/// Longest password verifier (hash or SCRAM) a user file may hold.
pub const MAX_VERIFIER_LEN: usize = 512;
/// Most grants one user may hold (each is checked on every attach).
pub const MAX_GRANTS: usize = 256;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub name: String,
}

impl NodeCfg {
    /// The address the node's processes bind and that callers on any host reach them at
    /// (`host` as an IP address, else the first address its name resolves to), with `port`.
    pub fn endpoint(&self, port: u16) -> std::io::Result<std::net::SocketAddr> {
        use std::net::ToSocketAddrs;
        if let Ok(ip) = self.host.parse::<std::net::IpAddr>() {
            return Ok(std::net::SocketAddr::new(ip, port));
        }
        (self.host.as_str(), port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "host {} of node {} resolves to no address",
                        self.host, self.name
                    ),
                )
            })
    }
}

/// One node: its node agent's endpoint and the servers it supervises.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeCfg {
    pub name: String,
    /// Where the node agent's admin endpoint listens; loopback unless an operator opens it.
    pub host: String,
    pub admin_port: u16,
    pub servers: Vec<ServerCfg>,
}

/// One server process: its two endpoints and how its node agent watches it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerCfg {
    pub name: String,
    pub admin_port: u16,
    pub bus_port: u16,
    #[serde(default)]
    pub monitor: MonitorPolicy,
}

/// How the node agent supervises a server (WebSphere's monitoring policy).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorPolicy {
    /// Restart the server in normal mode when it ends without being asked to stop.
    #[serde(default = "default_auto_restart")]
    pub auto_restart: bool,
    #[serde(default = "default_ping_interval_s")]
    pub ping_interval_s: u32,
    /// A server silent this long is considered hung and is killed.
    #[serde(default = "default_ping_timeout_s")]
    pub ping_timeout_s: u32,
    /// Consecutive failed starts after which the node agent gives up.
    #[serde(default = "default_max_start_attempts")]
    pub max_start_attempts: u32,
    #[serde(default = "default_start_timeout_s")]
    pub start_timeout_s: u32,
}

fn default_auto_restart() -> bool {
    true
}
fn default_ping_interval_s() -> u32 {
    2
}
fn default_ping_timeout_s() -> u32 {
    10
}
fn default_max_start_attempts() -> u32 {
    3
}
fn default_start_timeout_s() -> u32 {
    60
}

impl Default for MonitorPolicy {
    fn default() -> Self {
        MonitorPolicy {
            auto_restart: default_auto_restart(),
            ping_interval_s: default_ping_interval_s(),
            ping_timeout_s: default_ping_timeout_s(),
            max_start_attempts: default_max_start_attempts(),
            start_timeout_s: default_start_timeout_s(),
        }
    }
}

/// A service integration bus, the servers that are its members and its destinations.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BusCfg {
    pub name: String,
    pub members: Vec<BusMember>,
    /// Queues and topic spaces, in natural name order.
    #[serde(default)]
    pub destinations: Vec<DestinationCfg>,
    /// Whether AMQP clients may authenticate with SASL ANONYMOUS on this bus.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// The user anonymous clients act as (its roles are theirs); None: [`DEFAULT_ANONYMOUS_USER`].
    #[serde(default)]
    pub anonymous_user: Option<String>,
    /// Largest message body the bus accepts, in bytes
    /// ([`MIN_MESSAGE_BYTES`]..=[`MAX_MESSAGE_BYTES`]).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: u64,
    /// How long an engine remembers which messages another engine delivered to it, so that
    /// those resent after a restart-after-restore (FLUSH) are dropped instead of delivered
    /// twice (DESIGN §5). Zero duplicates when it covers the age of the restored backup.
    #[serde(default = "default_duplicate_window_hours")]
    pub duplicate_window_hours: u32,
}

/// The user anonymous clients of a bus act as when the bus names none.
pub const DEFAULT_ANONYMOUS_USER: &str = "anonymous";

impl BusCfg {
    /// The user this bus's anonymous clients act as.
    pub fn anonymous_user(&self) -> &str {
        self.anonymous_user
            .as_deref()
            .unwrap_or(DEFAULT_ANONYMOUS_USER)
    }
}

/// `duplicate_window_hours` of a bus that does not set it: 7 days.
pub const DEFAULT_DUPLICATE_WINDOW_HOURS: u32 = 168;
/// Longest duplicate window: a year.
pub const MAX_DUPLICATE_WINDOW_HOURS: u32 = 8_784;

fn default_duplicate_window_hours() -> u32 {
    DEFAULT_DUPLICATE_WINDOW_HOURS
}

/// `max_message_bytes` of a bus that does not set it: 1 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 1_048_576;
/// Lowest `max_message_bytes`: 1 KiB.
pub const MIN_MESSAGE_BYTES: u64 = 1024;
/// Highest `max_message_bytes`: 256 MiB.
pub const MAX_MESSAGE_BYTES: u64 = 256 * 1024 * 1024;
/// Longest destination name.
pub const MAX_DESTINATION_NAME_LEN: usize = 128;
/// Prefix of the destinations messaging engines make for themselves; refused in configuration.
pub const SYSTEM_PREFIX: &str = "_SYSTEM.";
/// Default `default_priority` of a destination.
pub const DEFAULT_PRIORITY: u8 = 4;
/// Highest message priority.
pub const MAX_PRIORITY: u8 = 9;
/// Default `max_failed_deliveries` of a destination.
pub const DEFAULT_MAX_FAILED_DELIVERIES: u32 = 5;
/// Highest `max_failed_deliveries`.
pub const MAX_FAILED_DELIVERIES: u32 = 1000;

fn default_max_message_bytes() -> u64 {
    DEFAULT_MAX_MESSAGE_BYTES
}

/// The system exception destination of messaging engine `me`, where messages go after too
/// many failed deliveries when their destination names no exception destination.
pub fn system_exception_destination(me: &str) -> String {
    format!("{SYSTEM_PREFIX}Exception.Destination.{me}")
}

/// Reliability levels, weakest first, so "at most the destination's maximum" is `<=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reliability {
    /// Not persisted; may be lost at any time, even without a failure.
    BestEffort,
    /// Not persisted; lost when its messaging engine stops.
    Express,
    /// Persisted in batches: a crash may lose the last few milliseconds.
    ReliablePersistent,
    /// Acknowledged only once durable; exactly once across engines, crashes included.
    AssuredPersistent,
}

impl Reliability {
    /// Every level, weakest first.
    pub const ALL: [Reliability; 4] = [
        Reliability::BestEffort,
        Reliability::Express,
        Reliability::ReliablePersistent,
        Reliability::AssuredPersistent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reliability::BestEffort => "best_effort",
            Reliability::Express => "express",
            Reliability::ReliablePersistent => "reliable_persistent",
            Reliability::AssuredPersistent => "assured_persistent",
        }
    }

    /// Whether messages of this level are written to the data store.
    pub fn is_persistent(self) -> bool {
        self >= Reliability::ReliablePersistent
    }
}

impl std::fmt::Display for Reliability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Reliability {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self> {
        Reliability::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| ConfigError::BadOption {
                option: "reliability".into(),
                problem: format!("{s:?} is not a reliability level"),
                fix: "use one of best_effort, express, reliable_persistent, assured_persistent"
                    .into(),
            })
    }
}

/// What a destination is: a queue (point to point) or a topic space (publish/subscribe).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DestinationKind {
    Queue,
    Topic,
}

impl DestinationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DestinationKind::Queue => "queue",
            DestinationKind::Topic => "topic",
        }
    }
}

impl std::fmt::Display for DestinationKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DestinationKind {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "queue" => Ok(DestinationKind::Queue),
            "topic" => Ok(DestinationKind::Topic),
            _ => Err(ConfigError::BadOption {
                option: "destination type".into(),
                problem: format!("{s:?} is not a destination type"),
                fix: "use queue or topic".into(),
            }),
        }
    }
}

/// A queue or topic space of a bus.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationCfg {
    pub name: String,
    pub kind: DestinationKind,
    /// The messaging engine that holds the destination's messages: the queue point for a
    /// queue, the publication point for a topic space.
    pub me: String,
    /// Maximum reliability a message sent to it may have (default assured_persistent).
    pub reliability: Reliability,
    /// Reliability given to a message that does not ask for one (default:
    /// reliable_persistent, capped at `reliability`).
    pub default_reliability: Reliability,
    /// Priority of a message that does not ask for one, 0..=9 (default 4).
    pub default_priority: u8,
    /// Failed deliveries after which a message is moved to the exception destination,
    /// 1..=1000 (default 5).
    pub max_failed_deliveries: u32,
    /// Where a message goes after `max_failed_deliveries`; `None` = the engine's system
    /// exception destination (`_SYSTEM.Exception.Destination.<me>`).
    pub exception_destination: Option<String>,
}

impl DestinationCfg {
    /// A destination with every optional setting at its default.
    pub fn new(name: &str, kind: DestinationKind, me: &str) -> DestinationCfg {
        DestinationCfg {
            name: name.into(),
            kind,
            me: me.into(),
            reliability: Reliability::AssuredPersistent,
            default_reliability: Reliability::ReliablePersistent,
            default_priority: DEFAULT_PRIORITY,
            max_failed_deliveries: DEFAULT_MAX_FAILED_DELIVERIES,
            exception_destination: None,
        }
    }

    /// The default reliability for a destination whose maximum is `max`.
    pub fn default_reliability_for(max: Reliability) -> Reliability {
        max.min(Reliability::ReliablePersistent)
    }

    /// The name of the destination that receives this destination's failed messages: the
    /// configured one, or the system exception destination of its ME.
    pub fn exception_target(&self) -> String {
        match &self.exception_destination {
            Some(d) => d.clone(),
            None => system_exception_destination(&self.me),
        }
    }
}

/// One bus member: a server and the messaging engine it runs for the bus.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BusMember {
    pub node: String,
    pub server: String,
    /// Always `<node>.<server>-<bus>`; stored so operators can grep for it.
    pub me: String,
    /// Stamped into the ME's data store, which refuses to open for any other UUID.
    pub uuid: String,
    pub initial_state: InitialState,
    /// The ME's data store in PostgreSQL (`postgresql://user@host:port/database`, no password),
    /// for a store shared between servers; None = the embedded SQLite file under databases/.
    pub store_url: Option<String>,
}

/// Whether an ME starts with its server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitialState {
    Started,
    Stopped,
}

impl InitialState {
    pub fn as_str(self) -> &'static str {
        match self {
            InitialState::Started => "started",
            InitialState::Stopped => "stopped",
        }
    }
}

/// `pool_max` of a data source that does not set it.
pub const DEFAULT_POOL_MAX: u32 = 16;
/// Highest `pool_max` of a data source.
pub const MAX_POOL_MAX: u32 = 256;
/// `concurrency` of an application that does not set it.
pub const DEFAULT_APP_CONCURRENCY: u32 = 4;
/// Highest `concurrency` of an application.
pub const MAX_APP_CONCURRENCY: u32 = 64;
/// `timeout_s` (transaction timeout) of an application that does not set it.
pub const DEFAULT_APP_TIMEOUT_S: u32 = 60;
/// Highest `timeout_s` of an application.
pub const MAX_APP_TIMEOUT_S: u32 = 3_600;
/// Longest `statement` of an sql application, in bytes.
pub const MAX_STATEMENT_BYTES: usize = 64 * 1024;
/// Longest `script` of a script application, in bytes.
pub const MAX_SCRIPT_BYTES: usize = 256 * 1024;

/// The database product behind a data source; both take part in global transactions (XA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataSourceKind {
    /// PostgreSQL (`PREPARE TRANSACTION` / `COMMIT PREPARED`).
    Postgres,
    /// MariaDB or MySQL (`XA START` ... `XA COMMIT`).
    MariaDb,
}

impl DataSourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DataSourceKind::Postgres => "postgres",
            DataSourceKind::MariaDb => "mariadb",
        }
    }

    /// The kind spelled `s` (`postgres` or `mariadb`), if any.
    pub fn parse(s: &str) -> Option<DataSourceKind> {
        match s {
            "postgres" => Some(DataSourceKind::Postgres),
            "mariadb" => Some(DataSourceKind::MariaDb),
            _ => None,
        }
    }

    /// The URL schemes a data source of this kind accepts.
    pub fn schemes(self) -> [&'static str; 2] {
        match self {
            DataSourceKind::Postgres => ["postgresql://", "postgres://"],
            DataSourceKind::MariaDb => ["mysql://", "mariadb://"],
        }
    }
}

impl std::fmt::Display for DataSourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An XA-capable database that applications use inside global transactions. The URL holds no
/// password: that is in the profile's secrets, one file per data source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataSourceCfg {
    pub name: String,
    pub kind: DataSourceKind,
    /// `postgresql://user@host:port/database` or `mysql://user@host:port/database`.
    pub url: String,
    /// Most connections the server keeps open to it (1..=256, default 16).
    pub pool_max: u32,
}

/// What an application does with each message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppKind {
    /// Sends the message on to another destination of the same engine.
    Forward,
    /// Runs one SQL statement on a data source.
    Sql,
    /// Runs a Rhai script's `fn on_message(msg)`.
    Script,
}

impl AppKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AppKind::Forward => "forward",
            AppKind::Sql => "sql",
            AppKind::Script => "script",
        }
    }

    /// The kind spelled `s` (`forward`, `sql` or `script`), if any.
    pub fn parse(s: &str) -> Option<AppKind> {
        match s {
            "forward" => Some(AppKind::Forward),
            "sql" => Some(AppKind::Sql),
            "script" => Some(AppKind::Script),
            _ => None,
        }
    }
}

impl std::fmt::Display for AppKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message-driven application: it receives from one queue on its server's messaging engine
/// and handles each message in one global transaction with everything it touches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppCfg {
    pub name: String,
    pub server: String,
    pub bus: String,
    /// A queue of `bus` held by the server's messaging engine on that bus.
    pub on: String,
    pub kind: AppKind,
    /// forward: a destination of `bus` held by the same engine (a transaction stays on one
    /// engine).
    pub to: Option<String>,
    /// sql: the data source the statement runs on.
    pub datasource: Option<String>,
    /// sql: the statement.
    pub statement: Option<String>,
    /// script: the Rhai source text itself.
    pub script: Option<String>,
    /// Messages handled at once (1..=64, default 4).
    pub concurrency: u32,
    /// Transaction timeout: a message's handling that takes longer rolls back (1..=3600,
    /// default 60).
    pub timeout_s: u32,
}

/// The ME name of a bus member, fixed by the operator contract.
pub fn me_name(node: &str, server: &str, bus: &str) -> String {
    format!("{node}.{server}-{bus}")
}

impl Config {
    pub fn node(&self, name: &str) -> Option<&NodeCfg> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn server(&self, node: &str, server: &str) -> Option<&ServerCfg> {
        self.node(node)?.servers.iter().find(|s| s.name == server)
    }

    /// Finds a server by name alone: server names are unique in the cell (they name processes,
    /// pid files and log directories of one profile).
    pub fn find_server(&self, server: &str) -> Option<(&NodeCfg, &ServerCfg)> {
        self.nodes
            .iter()
            .find_map(|n| n.servers.iter().find(|s| s.name == server).map(|s| (n, s)))
    }

    pub fn bus(&self, name: &str) -> Option<&BusCfg> {
        self.buses.iter().find(|b| b.name == name)
    }

    /// The bus member whose messaging engine is `me`, searching every bus.
    pub fn find_me(&self, me: &str) -> Option<(&BusCfg, &BusMember)> {
        self.buses
            .iter()
            .find_map(|b| b.members.iter().find(|m| m.me == me).map(|m| (b, m)))
    }

    /// The MEs a server hosts (one per bus it is a member of), in bus order.
    pub fn mes_of_server(&self, node: &str, server: &str) -> Vec<(&BusCfg, &BusMember)> {
        self.buses
            .iter()
            .filter_map(|b| {
                b.members
                    .iter()
                    .find(|m| m.node == node && m.server == server)
                    .map(|m| (b, m))
            })
            .collect()
    }

    pub fn find_destination(&self, bus: &str, name: &str) -> Option<&DestinationCfg> {
        self.bus(bus)?.destinations.iter().find(|d| d.name == name)
    }

    pub fn datasource(&self, name: &str) -> Option<&DataSourceCfg> {
        self.datasources.iter().find(|d| d.name == name)
    }

    pub fn app(&self, name: &str) -> Option<&AppCfg> {
        self.apps.iter().find(|a| a.name == name)
    }

    /// The applications of a server, in name order.
    pub fn apps_of_server(&self, server: &str) -> Vec<&AppCfg> {
        self.apps.iter().filter(|a| a.server == server).collect()
    }

    pub(crate) fn server_names(&self) -> Vec<String> {
        self.nodes
            .iter()
            .flat_map(|n| n.servers.iter().map(|s| s.name.clone()))
            .collect()
    }

    /// Puts nodes, servers, buses, destinations, data sources and applications in natural name
    /// order, the order `Repository::load` returns, so a saved and reloaded config compares equal.
    pub(crate) fn canonicalize(&mut self) {
        self.nodes.sort_by(|a, b| natural_cmp(&a.name, &b.name));
        for n in &mut self.nodes {
            n.servers.sort_by(|a, b| natural_cmp(&a.name, &b.name));
        }
        self.buses.sort_by(|a, b| natural_cmp(&a.name, &b.name));
        for b in &mut self.buses {
            b.destinations.sort_by(|x, y| natural_cmp(&x.name, &y.name));
        }
        self.datasources
            .sort_by(|a, b| natural_cmp(&a.name, &b.name));
        self.apps.sort_by(|a, b| natural_cmp(&a.name, &b.name));
        self.users.sort_by(|a, b| natural_cmp(&a.name, &b.name));
        for u in &mut self.users {
            u.roles.sort();
            u.roles.dedup();
            u.grants.sort();
            u.grants.dedup();
        }
    }
}
