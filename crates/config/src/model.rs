//! The configuration model: one cell, its nodes and their servers, the buses with their
//! members and destinations, the data sources (XA-capable databases) and the applications
//! (message-driven handlers on a server). Plain data plus the rules that make it valid; no I/O
//! (see `repo` for files).
//!
//! Order: nodes, servers within a node, buses, destinations, data sources and applications are
//! kept in *natural name order* (`server2` before `server10`) because the files on disk carry no
//! order; members keep their file order.
//!
//! Data source passwords are never part of the model: a URL holding one is refused, and the
//! password lives in the profile's secrets (`Profile::set_datasource_password`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Display;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub name: String,
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

// --- passwords in URLs ---------------------------------------------------------------------

/// Byte range of the password in `url` (`scheme://user:PASSWORD@host/...`), if it has one.
/// Deliberately broad, so that a password is never stored by mistake: the user information is
/// everything before the *last* `@` (a password may hold an unescaped `@` or `/`), and any `:` in
/// it starts a password. A `@` elsewhere in a URL is written `%40`.
fn url_password_range(url: &str) -> Option<std::ops::Range<usize>> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let at = rest.rfind('@')?;
    let colon = rest[..at].find(':')?;
    Some(start + colon + 1..start + at)
}

/// Whether `url` holds a password (see [`take_url_password`]).
pub fn url_has_password(url: &str) -> bool {
    url_password_range(url).is_some()
}

/// Splits the password out of `url`: `postgresql://u:secret@h/db` gives
/// (`postgresql://u@h/db`, `Some("secret")`). The password is percent-decoded (`p%40ss` is
/// `p@ss`) unless that would not give UTF-8 text. A URL without a password comes back as is.
pub fn take_url_password(url: &str) -> (String, Option<String>) {
    let Some(r) = url_password_range(url) else {
        return (url.to_string(), None);
    };
    let raw = &url[r.clone()];
    let password = percent_decode(raw).unwrap_or_else(|| raw.to_string());
    // Drop the `:` before the password too.
    let clean = format!("{}{}", &url[..r.start - 1], &url[r.end..]);
    (clean, Some(password))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

// --- repository-relative file names, used by validation errors --------------------------------

pub(crate) fn rel_cell() -> PathBuf {
    PathBuf::from("cell.toml")
}
pub(crate) fn rel_node(node: &str) -> PathBuf {
    Path::new("nodes").join(node).join("node.toml")
}
pub(crate) fn rel_server(node: &str, server: &str) -> PathBuf {
    Path::new("nodes")
        .join(node)
        .join("servers")
        .join(format!("{server}.toml"))
}
pub(crate) fn rel_bus(bus: &str) -> PathBuf {
    Path::new("buses").join(format!("{bus}.toml"))
}
pub(crate) fn rel_datasource(name: &str) -> PathBuf {
    Path::new("datasources").join(format!("{name}.toml"))
}
pub(crate) fn rel_app(name: &str) -> PathBuf {
    Path::new("apps").join(format!("{name}.toml"))
}

/// The ME name of a bus member, fixed by the operator contract.
pub fn me_name(node: &str, server: &str, bus: &str) -> String {
    format!("{node}.{server}-{bus}")
}

// --- rule checks shared by file loading and `Config::validate` --------------------------------

/// An `Invalid` error in the documented shape; `fix` gets the validate hint appended.
pub(crate) fn invalid(
    file: &Path,
    key: &str,
    value: impl Display,
    why: &str,
    fix: &str,
) -> ConfigError {
    ConfigError::Invalid {
        file: file.to_path_buf(),
        key: key.to_string(),
        problem: format!("= {value} is invalid: {why}"),
        fix: format!("{fix}, then run `keel config validate`"),
    }
}

/// Why `name` breaks the naming rule, or `None` if it is fine.
pub(crate) fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("it is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Some(format!(
            "it is {} characters long, the limit is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Some(format!("it contains {c:?}"));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Some("it must start with a letter or digit".into());
    }
    None
}

pub(crate) fn check_name(file: &Path, key: &str, what: &str, name: &str) -> Result<()> {
    match name_problem(name) {
        None => Ok(()),
        Some(p) => Err(invalid(
            file,
            key,
            format!("{name:?}"),
            &format!("a {what} name must be 1 to {MAX_NAME_LEN} letters, digits, `_`, `.` or `-`, starting with a letter or digit ({p})"),
            &format!("rename the {what} (file or directory name and `{key}` must match)"),
        )),
    }
}

/// Why `name` breaks the destination naming rule, or `None` if it is fine.
pub(crate) fn destination_name_problem(name: &str) -> Option<String> {
    if name.starts_with(SYSTEM_PREFIX) {
        return Some(format!(
            "names starting with `{SYSTEM_PREFIX}` are reserved for the destinations messaging engines make"
        ));
    }
    if name.is_empty() {
        return Some("it is empty".into());
    }
    if name.len() > MAX_DESTINATION_NAME_LEN {
        return Some(format!(
            "it is {} characters long, the limit is {MAX_DESTINATION_NAME_LEN}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Some(format!("it contains {c:?}"));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Some("it must start with a letter or digit".into());
    }
    None
}

/// The value rules of one destination that need no other object: name, reliabilities,
/// priority, failed deliveries. `key` builds `destination[i].<field>`.
pub(crate) fn check_destination_values(
    file: &Path,
    key: &dyn Fn(&str) -> String,
    d: &DestinationCfg,
) -> Result<()> {
    if let Some(p) = destination_name_problem(&d.name) {
        return Err(invalid(
            file,
            &key("name"),
            format!("{:?}", d.name),
            &format!("a destination name must be 1 to {MAX_DESTINATION_NAME_LEN} letters, digits, `_`, `.` or `-`, starting with a letter or digit ({p})"),
            "rename the destination",
        ));
    }
    if d.default_reliability > d.reliability {
        return Err(invalid(
            file,
            &key("default_reliability"),
            format!("{:?}", d.default_reliability.as_str()),
            &format!(
                "is above the destination's maximum reliability {:?}",
                d.reliability.as_str()
            ),
            &format!(
                "set it to {:?} or a weaker level, or raise `{}`",
                d.reliability.as_str(),
                key("reliability")
            ),
        ));
    }
    check_range(
        file,
        &key("default_priority"),
        i64::from(d.default_priority),
        0,
        u32::from(MAX_PRIORITY),
        "priority",
    )?;
    check_range(
        file,
        &key("max_failed_deliveries"),
        i64::from(d.max_failed_deliveries),
        1,
        MAX_FAILED_DELIVERIES,
        "number of deliveries",
    )?;
    Ok(())
}

pub(crate) fn check_message_bytes(file: &Path, value: i64) -> Result<u64> {
    // 256 MiB fits in u32, so the shared range check applies.
    check_range(
        file,
        "bus.max_message_bytes",
        value,
        MIN_MESSAGE_BYTES as u32,
        MAX_MESSAGE_BYTES as u32,
        "number of bytes",
    )
    .map(u64::from)
}

pub(crate) fn check_duplicate_window(file: &Path, value: i64) -> Result<u32> {
    check_range(
        file,
        "bus.duplicate_window_hours",
        value,
        1,
        MAX_DUPLICATE_WINDOW_HOURS,
        "number of hours",
    )
}

pub(crate) fn check_port(file: &Path, key: &str, value: i64) -> Result<u16> {
    if (i64::from(MIN_PORT)..=65535).contains(&value) {
        Ok(value as u16)
    } else {
        Err(invalid(file, key, value, "must be between 1024 and 65535", "set it to a free port between 1024 and 65535 that no other node agent or server of the cell uses"))
    }
}

pub(crate) fn check_range(
    file: &Path,
    key: &str,
    value: i64,
    lo: u32,
    hi: u32,
    unit: &str,
) -> Result<u32> {
    assert!(lo <= hi);
    if (i64::from(lo)..=i64::from(hi)).contains(&value) {
        Ok(value as u32)
    } else {
        Err(invalid(
            file,
            key,
            value,
            &format!("must be between {lo} and {hi}"),
            &format!("set it to a {unit} between {lo} and {hi}"),
        ))
    }
}

pub(crate) fn check_version(file: &Path, value: i64) -> Result<u64> {
    if value >= 1 {
        Ok(value as u64)
    } else {
        Err(invalid(file, "repository.version", value, "must be 1 or more", "restore the repository from a backup (`keel config restore FILE`), or set the version of the master above every node copy's"))
    }
}

pub(crate) fn check_host(file: &Path, key: &str, host: &str) -> Result<()> {
    if host.is_empty()
        || host.len() > 253
        || host.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid(
            file,
            key,
            format!("{host:?}"),
            "must be a host name or IP address without spaces",
            "set it to the address the node agent listens on, normally \"127.0.0.1\"",
        ));
    }
    Ok(())
}

/// Monitor policy ranges, keyed as in the server file.
pub(crate) fn check_monitor(file: &Path, m: &MonitorPolicy) -> Result<()> {
    check_range(
        file,
        "monitor.ping_interval_s",
        i64::from(m.ping_interval_s),
        1,
        3600,
        "number of seconds",
    )?;
    check_range(
        file,
        "monitor.ping_timeout_s",
        i64::from(m.ping_timeout_s),
        1,
        3600,
        "number of seconds",
    )?;
    check_range(
        file,
        "monitor.max_start_attempts",
        i64::from(m.max_start_attempts),
        1,
        100,
        "number of attempts",
    )?;
    check_range(
        file,
        "monitor.start_timeout_s",
        i64::from(m.start_timeout_s),
        1,
        3600,
        "number of seconds",
    )?;
    Ok(())
}

/// The rules of one data source that need no other object: name, URL (scheme of its kind, no
/// password), pool size. Keys as in `datasources/<name>.toml`.
pub(crate) fn check_datasource(file: &Path, d: &DataSourceCfg) -> Result<()> {
    check_name(file, "datasource.name", "data source", &d.name)?;
    check_datasource_url(file, d.kind, &d.url)?;
    check_range(
        file,
        "datasource.pool_max",
        i64::from(d.pool_max),
        1,
        MAX_POOL_MAX,
        "number of connections",
    )?;
    Ok(())
}

/// Longest data source URL.
const MAX_URL_LEN: usize = 2048;

pub(crate) fn check_datasource_url(file: &Path, kind: DataSourceKind, url: &str) -> Result<()> {
    let key = "datasource.url";
    // First, so that no later message echoes a password.
    if url_has_password(url) {
        return Err(invalid(
            file,
            key,
            "a URL with a password",
            "must not hold a password (it would end up in every copy and backup of the configuration)",
            "remove the password from the URL: `keel datasource create` takes it out of the URL and keeps it in the profile's secrets (secrets/datasources/<name>); if the `:` before an `@` is not a password, write that `@` as %40",
        ));
    }
    let [a, b] = kind.schemes();
    let example = format!("write it as {a}user@host:port/database");
    let Some(rest) = url.strip_prefix(a).or_else(|| url.strip_prefix(b)) else {
        return Err(invalid(
            file,
            key,
            format!("{url:?}"),
            &format!("a {kind} data source needs a URL starting with {a} or {b}"),
            &format!("{example}, or correct `datasource.kind`"),
        ));
    };
    if rest.is_empty()
        || url.len() > MAX_URL_LEN
        || url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid(
            file,
            key,
            format!("{url:?}"),
            &format!(
                "must name a database server, without spaces, in at most {MAX_URL_LEN} characters"
            ),
            &example,
        ));
    }
    Ok(())
}

/// An sql statement or a script: text, not blank, at most `limit` bytes. The value is never
/// echoed (a script can be long), only its size.
fn check_text(file: &Path, key: &str, what: &str, text: &str, limit: usize) -> Result<()> {
    let why = if text.trim().is_empty() {
        Some("must not be empty".to_string())
    } else if text.len() > limit {
        Some(format!("is longer than the limit of {limit} bytes"))
    } else {
        text.char_indices()
            .find(|(_, c)| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
            .map(|(i, c)| {
                format!(
                    "holds the control character U+{:04X} at byte {i} (only tabs and line breaks may appear)",
                    c as u32
                )
            })
    };
    match why {
        None => Ok(()),
        Some(why) => Err(invalid(
            file,
            key,
            format!("a {what} of {} bytes", text.len()),
            &why,
            &format!("give a {what} of 1 to {limit} bytes of text"),
        )),
    }
}

/// A required key that is absent, in the shape of `invalid`.
fn missing(file: &Path, key: &str, why: &str, fix: &str) -> ConfigError {
    ConfigError::Invalid {
        file: file.to_path_buf(),
        key: key.to_string(),
        problem: format!("is missing: {why}"),
        fix: format!("{fix}, then run `keel config validate`"),
    }
}

fn known_list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = names.collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn bad_name(what: &'static str, name: &str) -> Result<()> {
    match name_problem(name) {
        None if what == "server" && name == keel_core::layout::NODE_AGENT => {
            Err(ConfigError::BadName {
                what,
                name: name.into(),
                problem: "it is reserved for the node agent".into(),
            })
        }
        None => Ok(()),
        Some(problem) => Err(ConfigError::BadName {
            what,
            name: name.into(),
            problem,
        }),
    }
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

    /// Every port the cell uses, highest last; ports are allocated above the highest.
    fn max_port(&self) -> u16 {
        let mut max = 0u16;
        for n in &self.nodes {
            max = max.max(n.admin_port);
            for s in &n.servers {
                max = max.max(s.admin_port).max(s.bus_port);
            }
        }
        max
    }

    /// Adds a server to `node` with the next two ports above the highest one in the cell, so
    /// ports never collide and stay in creation order; the monitor policy is the default.
    pub fn add_server(&mut self, node: &str, server: &str) -> Result<&ServerCfg> {
        bad_name("server", server)?;
        if let Some((n, _)) = self.find_server(server) {
            return Err(ConfigError::Duplicate {
                what: "server",
                name: server.into(),
                place: format!(" on node {}", n.name),
            });
        }
        let highest = self.max_port();
        let admin_port = highest.checked_add(1).filter(|p| *p >= MIN_PORT);
        let bus_port = highest.checked_add(2).filter(|p| *p >= MIN_PORT);
        let (Some(admin_port), Some(bus_port)) = (admin_port, bus_port) else {
            return Err(ConfigError::PortsExhausted {
                server: server.into(),
                highest,
            });
        };
        let known: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        let Some(n) = self.nodes.iter_mut().find(|n| n.name == node) else {
            return Err(ConfigError::UnknownNode {
                node: node.into(),
                known,
            });
        };
        let at = n
            .servers
            .partition_point(|s| natural_cmp(&s.name, server).is_lt());
        n.servers.insert(
            at,
            ServerCfg {
                name: server.into(),
                admin_port,
                bus_port,
                monitor: MonitorPolicy::default(),
            },
        );
        assert!(admin_port < bus_port);
        Ok(&n.servers[at])
    }

    /// Makes `server` a member of `bus` (creating the bus if needed) with a new messaging engine:
    /// name `<node>.<server>-<bus>`, a fresh UUID, starting with its server.
    pub fn add_bus_member(&mut self, bus: &str, server: &str) -> Result<&BusMember> {
        bad_name("bus", bus)?;
        let Some((node, _)) = self.find_server(server) else {
            let known = self
                .nodes
                .iter()
                .flat_map(|n| n.servers.iter().map(|s| s.name.clone()))
                .collect();
            return Err(ConfigError::UnknownServer {
                server: server.into(),
                known,
            });
        };
        let node = node.name.clone();
        let at = match self.buses.iter().position(|b| b.name == bus) {
            Some(i) => i,
            None => {
                let at = self
                    .buses
                    .partition_point(|b| natural_cmp(&b.name, bus).is_lt());
                self.buses.insert(
                    at,
                    BusCfg {
                        name: bus.into(),
                        members: Vec::new(),
                        destinations: Vec::new(),
                        allow_anonymous: false,
                        max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
                        duplicate_window_hours: DEFAULT_DUPLICATE_WINDOW_HOURS,
                    },
                );
                at
            }
        };
        let b = &mut self.buses[at];
        if let Some(m) = b.members.iter().find(|m| m.server == server) {
            return Err(ConfigError::AlreadyMember {
                bus: bus.into(),
                server: server.into(),
                me: m.me.clone(),
            });
        }
        b.members.push(BusMember {
            me: me_name(&node, server, bus),
            node,
            server: server.into(),
            uuid: uuid::Uuid::new_v4().to_string(),
            initial_state: InitialState::Started,
            store_url: None,
        });
        Ok(b.members.last().expect("just pushed"))
    }

    pub fn bus(&self, name: &str) -> Option<&BusCfg> {
        self.buses.iter().find(|b| b.name == name)
    }

    /// The bus member whose messaging engine is `me`, searching every bus.
    /// Puts an ME's data store in PostgreSQL (`Some(url)`) or back in the embedded SQLite file
    /// (`None`). The data does not move: take a backup first and restore into the new store.
    pub fn set_store_url(&mut self, me: &str, url: Option<String>) -> Result<&BusMember> {
        let known: Vec<String> = self
            .buses
            .iter()
            .flat_map(|b| b.members.iter().map(|m| m.me.clone()))
            .collect();
        let m = self
            .buses
            .iter_mut()
            .flat_map(|b| b.members.iter_mut())
            .find(|m| m.me == me)
            .ok_or_else(|| ConfigError::UnknownMe {
                me: me.to_string(),
                place: String::new(),
                known,
            })?;
        m.store_url = url;
        Ok(m)
    }

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

    /// Sets whether the messaging engine `me` (searched on every bus) starts with its server.
    pub fn set_initial_state(&mut self, me: &str, state: InitialState) -> Result<&BusMember> {
        let Some((bi, mi)) = self
            .buses
            .iter()
            .enumerate()
            .find_map(|(bi, b)| b.members.iter().position(|m| m.me == me).map(|mi| (bi, mi)))
        else {
            let known = self
                .buses
                .iter()
                .flat_map(|b| b.members.iter().map(|m| m.me.clone()))
                .collect();
            return Err(ConfigError::UnknownMe {
                me: me.into(),
                place: String::new(),
                known,
            });
        };
        let m = &mut self.buses[bi].members[mi];
        m.initial_state = state;
        Ok(m)
    }

    /// Adds a destination to `bus`, every optional setting at its default. `me` `None` means
    /// the bus's only member's ME; `reliability` `None` means assured_persistent. The default
    /// reliability is reliable_persistent, capped at `reliability`.
    pub fn add_destination(
        &mut self,
        bus: &str,
        name: &str,
        kind: DestinationKind,
        me: Option<&str>,
        reliability: Option<Reliability>,
    ) -> Result<&DestinationCfg> {
        if let Some(problem) = destination_name_problem(name) {
            return Err(ConfigError::BadDestinationName {
                name: name.into(),
                problem,
            });
        }
        let Some(at) = self.buses.iter().position(|b| b.name == bus) else {
            return Err(ConfigError::UnknownBus {
                bus: bus.into(),
                known: self.buses.iter().map(|b| b.name.clone()).collect(),
            });
        };
        let b = &mut self.buses[at];
        let known: Vec<String> = b.members.iter().map(|m| m.me.clone()).collect();
        let me = match me {
            Some(me) if known.iter().any(|k| k == me) => me.to_string(),
            Some(me) => {
                return Err(ConfigError::UnknownMe {
                    me: me.into(),
                    place: format!(" on bus {bus}"),
                    known,
                })
            }
            None if known.len() == 1 => known[0].clone(),
            None => {
                return Err(ConfigError::MeRequired {
                    bus: bus.into(),
                    known,
                })
            }
        };
        if b.destinations.iter().any(|d| d.name == name) {
            return Err(ConfigError::Duplicate {
                what: "destination",
                name: name.into(),
                place: format!(" on bus {bus}"),
            });
        }
        let mut d = DestinationCfg::new(name, kind, &me);
        if let Some(r) = reliability {
            d.reliability = r;
            d.default_reliability = DestinationCfg::default_reliability_for(r);
        }
        let at = b
            .destinations
            .partition_point(|x| natural_cmp(&x.name, name).is_lt());
        b.destinations.insert(at, d);
        Ok(&b.destinations[at])
    }

    /// Removes destination `name` from `bus`. Whether its messages allow it is the caller's
    /// question (the model does not see data stores); an application or exception destination
    /// that still names it fails validation at save.
    pub fn remove_destination(&mut self, bus: &str, name: &str) -> Result<DestinationCfg> {
        let Some(b) = self.buses.iter_mut().find(|b| b.name == bus) else {
            return Err(ConfigError::UnknownBus {
                bus: bus.into(),
                known: self.buses.iter().map(|b| b.name.clone()).collect(),
            });
        };
        match b.destinations.iter().position(|d| d.name == name) {
            Some(at) => Ok(b.destinations.remove(at)),
            None => Err(ConfigError::UnknownDestination {
                bus: bus.into(),
                name: name.into(),
                known: b.destinations.iter().map(|d| d.name.clone()).collect(),
            }),
        }
    }

    pub fn datasource(&self, name: &str) -> Option<&DataSourceCfg> {
        self.datasources.iter().find(|d| d.name == name)
    }

    /// Adds a data source after checking it (name, URL without password, pool size).
    pub fn add_datasource(&mut self, d: DataSourceCfg) -> Result<&DataSourceCfg> {
        bad_name("data source", &d.name)?;
        if self.datasource(&d.name).is_some() {
            return Err(ConfigError::Duplicate {
                what: "data source",
                name: d.name,
                place: String::new(),
            });
        }
        check_datasource(&rel_datasource(&d.name), &d)?;
        let at = self
            .datasources
            .partition_point(|x| natural_cmp(&x.name, &d.name).is_lt());
        self.datasources.insert(at, d);
        Ok(&self.datasources[at])
    }

    /// Removes a data source; refused while an sql application uses it (the error names them).
    pub fn remove_datasource(&mut self, name: &str) -> Result<DataSourceCfg> {
        let Some(at) = self.datasources.iter().position(|d| d.name == name) else {
            return Err(ConfigError::UnknownDataSource {
                name: name.into(),
                known: self.datasources.iter().map(|d| d.name.clone()).collect(),
            });
        };
        let users: Vec<String> = self
            .apps
            .iter()
            .filter(|a| a.kind == AppKind::Sql && a.datasource.as_deref() == Some(name))
            .map(|a| a.name.clone())
            .collect();
        if !users.is_empty() {
            return Err(ConfigError::DataSourceInUse {
                name: name.into(),
                apps: users,
            });
        }
        Ok(self.datasources.remove(at))
    }

    pub fn app(&self, name: &str) -> Option<&AppCfg> {
        self.apps.iter().find(|a| a.name == name)
    }

    /// Adds an application after checking it against the rest of the configuration (server,
    /// bus membership, the queue it receives from, what its kind needs).
    pub fn add_app(&mut self, a: AppCfg) -> Result<&AppCfg> {
        bad_name("application", &a.name)?;
        if let Some(old) = self.app(&a.name) {
            return Err(ConfigError::Duplicate {
                what: "message-driven application",
                name: a.name,
                place: format!(" (on server {})", old.server),
            });
        }
        if self.find_server(&a.server).is_none() {
            return Err(ConfigError::UnknownServer {
                server: a.server,
                known: self.server_names(),
            });
        }
        if self.bus(&a.bus).is_none() {
            return Err(ConfigError::UnknownBus {
                bus: a.bus,
                known: self.buses.iter().map(|b| b.name.clone()).collect(),
            });
        }
        if let Some(ds) = a.datasource.as_deref().filter(|_| a.kind == AppKind::Sql) {
            if self.datasource(ds).is_none() {
                return Err(ConfigError::UnknownDataSource {
                    name: ds.into(),
                    known: self.datasources.iter().map(|d| d.name.clone()).collect(),
                });
            }
        }
        self.check_app(&rel_app(&a.name), &a)?;
        let at = self
            .apps
            .partition_point(|x| natural_cmp(&x.name, &a.name).is_lt());
        self.apps.insert(at, a);
        Ok(&self.apps[at])
    }

    pub fn remove_app(&mut self, name: &str) -> Result<AppCfg> {
        match self.apps.iter().position(|a| a.name == name) {
            Some(at) => Ok(self.apps.remove(at)),
            None => Err(ConfigError::UnknownApp {
                name: name.into(),
                known: self.apps.iter().map(|a| a.name.clone()).collect(),
            }),
        }
    }

    /// The applications of a server, in name order.
    pub fn apps_of_server(&self, server: &str) -> Vec<&AppCfg> {
        self.apps.iter().filter(|a| a.server == server).collect()
    }

    fn server_names(&self) -> Vec<String> {
        self.nodes
            .iter()
            .flat_map(|n| n.servers.iter().map(|s| s.name.clone()))
            .collect()
    }

    /// Every rule of one application that spans objects. Keys as in `apps/<name>.toml`.
    fn check_app(&self, file: &Path, a: &AppCfg) -> Result<()> {
        check_name(file, "app.name", "application", &a.name)?;
        let Some((node, _)) = self.find_server(&a.server) else {
            let known = self.server_names();
            return Err(invalid(
                file,
                "app.server",
                format!("{:?}", a.server),
                &format!(
                    "no such server (known: {})",
                    known_list(known.iter().map(String::as_str))
                ),
                "name an existing server, or remove the application",
            ));
        };
        let Some(bus) = self.bus(&a.bus) else {
            return Err(invalid(
                file,
                "app.bus",
                format!("{:?}", a.bus),
                &format!(
                    "no such bus (known: {})",
                    known_list(self.buses.iter().map(|b| b.name.as_str()))
                ),
                &format!("name a bus server {} is a member of", a.server),
            ));
        };
        let Some(member) = bus
            .members
            .iter()
            .find(|m| m.node == node.name && m.server == a.server)
        else {
            let its = self.mes_of_server(&node.name, &a.server);
            return Err(invalid(
                file,
                "app.bus",
                format!("{:?}", a.bus),
                &format!(
                    "server {} is not a member of this bus (its buses: {})",
                    a.server,
                    known_list(its.iter().map(|(b, _)| b.name.as_str()))
                ),
                &format!(
                    "make it one with `keel bus add-member {} --server {}`, or name one of its buses",
                    a.bus, a.server
                ),
            ));
        };
        let me = member.me.as_str();
        let Some(on) = bus.destinations.iter().find(|d| d.name == a.on) else {
            return Err(invalid(
                file,
                "app.on",
                format!("{:?}", a.on),
                &format!("bus {} has no destination of that name", bus.name),
                &format!(
                    "create the queue with `keel destination create {} {} --type queue --me {me}`, or name a queue of bus {} held by {me}",
                    bus.name, a.on, bus.name
                ),
            ));
        };
        if on.kind != DestinationKind::Queue {
            return Err(invalid(
                file,
                "app.on",
                format!("{:?}", a.on),
                "is a topic space: an application receives from a queue",
                &format!("name a queue of bus {} held by {me}", bus.name),
            ));
        }
        if on.me != me {
            return Err(invalid(
                file,
                "app.on",
                format!("{:?}", a.on),
                &format!(
                    "is held by messaging engine {}, not by {me} (the engine of server {} on bus {}): an application receives from a queue of its own server's engine",
                    on.me, a.server, bus.name
                ),
                &format!(
                    "name a queue held by {me}, or run the application on the server of {}",
                    on.me
                ),
            ));
        }
        check_range(
            file,
            "app.concurrency",
            i64::from(a.concurrency),
            1,
            MAX_APP_CONCURRENCY,
            "number of messages handled at once",
        )?;
        check_range(
            file,
            "app.timeout_s",
            i64::from(a.timeout_s),
            1,
            MAX_APP_TIMEOUT_S,
            "number of seconds",
        )?;
        let unused = |key: &str, shown: Option<String>| -> Result<()> {
            match shown {
                None => Ok(()),
                Some(v) => Err(invalid(
                    file,
                    key,
                    v,
                    &format!("is not used by a {} application", a.kind),
                    "remove the key, or set `app.kind` to the kind that uses it",
                )),
            }
        };
        let quoted = |v: &Option<String>| v.as_ref().map(|v| format!("{v:?}"));
        let sized = |what: &str, v: &Option<String>| {
            v.as_ref().map(|v| format!("a {what} of {} bytes", v.len()))
        };
        match a.kind {
            AppKind::Forward => {
                let Some(to) = &a.to else {
                    return Err(missing(
                        file,
                        "app.to",
                        "a forward application needs the destination it forwards to",
                        &format!(
                            "add `to = \"DEST\"`, a destination of bus {} held by {me}",
                            bus.name
                        ),
                    ));
                };
                let fix = format!("name a destination of bus {} held by {me}", bus.name);
                let Some(d) = bus.destinations.iter().find(|d| d.name == *to) else {
                    return Err(invalid(
                        file,
                        "app.to",
                        format!("{to:?}"),
                        &format!("bus {} has no destination of that name", bus.name),
                        &fix,
                    ));
                };
                if d.name == on.name {
                    return Err(invalid(
                        file,
                        "app.to",
                        format!("{to:?}"),
                        "is the queue the application receives from: every message would come straight back",
                        &fix,
                    ));
                }
                if d.me != me {
                    return Err(invalid(
                        file,
                        "app.to",
                        format!("{to:?}"),
                        &format!("is held by messaging engine {}, not by {me}: the transaction of a forward application stays on one engine", d.me),
                        &fix,
                    ));
                }
                unused("app.datasource", quoted(&a.datasource))?;
                unused("app.statement", sized("statement", &a.statement))?;
                unused("app.script", sized("script", &a.script))?;
            }
            AppKind::Sql => {
                let Some(ds) = &a.datasource else {
                    return Err(missing(
                        file,
                        "app.datasource",
                        "an sql application needs the data source its statement runs on",
                        "add `datasource = \"NAME\"`, a data source of the cell",
                    ));
                };
                if self.datasource(ds).is_none() {
                    return Err(invalid(
                        file,
                        "app.datasource",
                        format!("{ds:?}"),
                        &format!(
                            "no such data source (known: {})",
                            known_list(self.datasources.iter().map(|d| d.name.as_str()))
                        ),
                        &format!("create it with `keel datasource create {ds} --kind postgres|mariadb --url URL`, or name an existing one"),
                    ));
                }
                let Some(st) = &a.statement else {
                    return Err(missing(
                        file,
                        "app.statement",
                        "an sql application needs the statement it runs for each message",
                        "add `statement = \"...\"`",
                    ));
                };
                check_text(file, "app.statement", "statement", st, MAX_STATEMENT_BYTES)?;
                unused("app.to", quoted(&a.to))?;
                unused("app.script", sized("script", &a.script))?;
            }
            AppKind::Script => {
                let Some(script) = &a.script else {
                    return Err(missing(
                        file,
                        "app.script",
                        "a script application needs its script (a Rhai `fn on_message(msg)`)",
                        "add `script = \"\"\"...\"\"\"` with the script's text",
                    ));
                };
                check_text(file, "app.script", "script", script, MAX_SCRIPT_BYTES)?;
                unused("app.to", quoted(&a.to))?;
                unused("app.datasource", quoted(&a.datasource))?;
                unused("app.statement", sized("statement", &a.statement))?;
            }
        }
        Ok(())
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
    }

    /// Checks every rule that spans fields or files. Errors name the file relative to the
    /// repository directory (`nodes/node01/servers/server1.toml`) and the key.
    pub fn validate(&self) -> Result<()> {
        let cell = rel_cell();
        if self.version == 0 {
            check_version(&cell, 0)?;
        }
        if self.version > i64::MAX as u64 {
            // TOML integers are signed 64-bit: a bigger version could not be written.
            return Err(invalid(
                &cell,
                "repository.version",
                self.version,
                &format!("must be at most {}", i64::MAX),
                "restore the repository from a backup",
            ));
        }
        check_name(&cell, "cell.name", "cell", &self.cell.name)?;
        if self.nodes.is_empty() {
            return Err(ConfigError::Invalid {
                file: PathBuf::from("nodes"),
                key: "node".into(),
                problem: "is missing: a cell needs at least one node (nodes/<node>/node.toml)".into(),
                fix: "restore the configuration from a backup (`keel config restore FILE`) or create a new profile, then run `keel config validate`".into(),
            });
        }

        // Ports are unique across the cell: every endpoint of one profile binds on one host.
        let mut ports: HashMap<u16, (PathBuf, String)> = HashMap::new();
        let mut claim = |port: u16, file: &Path, key: &str| -> Result<()> {
            if let Some((f, k)) = ports.get(&port) {
                return Err(invalid(
                    file,
                    key,
                    port,
                    &format!("port {port} is already used by `{k}` in {}", f.display()),
                    "choose a port no other node agent or server of the cell uses",
                ));
            }
            ports.insert(port, (file.to_path_buf(), key.to_string()));
            Ok(())
        };
        let mut node_names = HashSet::new();
        let mut server_names: HashMap<&str, &str> = HashMap::new();
        for n in &self.nodes {
            let nf = rel_node(&n.name);
            check_name(&nf, "node.name", "node", &n.name)?;
            if !node_names.insert(n.name.as_str()) {
                return Err(invalid(
                    &nf,
                    "node.name",
                    format!("{:?}", n.name),
                    "another node has the same name",
                    "give each node its own name",
                ));
            }
            check_host(&nf, "node.host", &n.host)?;
            check_port(&nf, "node.admin_port", i64::from(n.admin_port))?;
            claim(n.admin_port, &nf, "node.admin_port")?;
            for s in &n.servers {
                let sf = rel_server(&n.name, &s.name);
                check_name(&sf, "server.name", "server", &s.name)?;
                if s.name == keel_core::layout::NODE_AGENT {
                    return Err(invalid(
                        &sf,
                        "server.name",
                        format!("{:?}", s.name),
                        "the name is reserved for the node agent",
                        "rename the server",
                    ));
                }
                if let Some(other) = server_names.insert(&s.name, &n.name) {
                    return Err(invalid(
                        &sf,
                        "server.name",
                        format!("{:?}", s.name),
                        &format!("node {other} already has a server of that name (server names are unique in the cell)"),
                        "rename one of the servers",
                    ));
                }
                check_port(&sf, "server.admin_port", i64::from(s.admin_port))?;
                check_port(&sf, "server.bus_port", i64::from(s.bus_port))?;
                claim(s.admin_port, &sf, "server.admin_port")?;
                claim(s.bus_port, &sf, "server.bus_port")?;
                check_monitor(&sf, &s.monitor)?;
            }
        }

        let mut bus_names = HashSet::new();
        let mut uuids: BTreeMap<uuid::Uuid, String> = BTreeMap::new();
        for b in &self.buses {
            let bf = rel_bus(&b.name);
            check_name(&bf, "bus.name", "bus", &b.name)?;
            if !bus_names.insert(b.name.as_str()) {
                return Err(invalid(
                    &bf,
                    "bus.name",
                    format!("{:?}", b.name),
                    "another bus has the same name",
                    "give each bus its own name",
                ));
            }
            let mut members = HashSet::new();
            for (i, m) in b.members.iter().enumerate() {
                let k = |f: &str| format!("member[{}].{f}", i + 1);
                let Some(node) = self.node(&m.node) else {
                    let known: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
                    return Err(invalid(
                        &bf,
                        &k("node"),
                        format!("{:?}", m.node),
                        &format!("no such node (known: {})", known.join(", ")),
                        "name an existing node, or remove this [[member]]",
                    ));
                };
                if !node.servers.iter().any(|s| s.name == m.server) {
                    return Err(invalid(
                        &bf,
                        &k("server"),
                        format!("{:?}", m.server),
                        &format!("node {} has no such server", node.name),
                        "name an existing server of that node, or remove this [[member]]",
                    ));
                }
                if let Some(url) = &m.store_url {
                    let rest = url
                        .strip_prefix("postgresql://")
                        .or_else(|| url.strip_prefix("postgres://"));
                    let Some(rest) = rest else {
                        return Err(invalid(&bf, &k("store_url"), format!("{url:?}"), "must be a PostgreSQL URL", "use postgresql://user@host:port/database, or remove the key for the embedded SQLite store"));
                    };
                    // A password in the URL would end up in logs and in config backups; never
                    // echo it, not even in this error.
                    if rest.contains('@')
                        && rest
                            .split('@')
                            .next()
                            .is_some_and(|userinfo| userinfo.contains(':'))
                    {
                        return Err(invalid(&bf, &k("store_url"), "a URL with a password", "must not hold a password", "remove the password from the URL; use trust, peer or certificate authentication, or a ~/.pgpass file"));
                    }
                }
                let want = me_name(&m.node, &m.server, &b.name);
                if m.me != want {
                    return Err(invalid(
                        &bf,
                        &k("me"),
                        format!("{:?}", m.me),
                        &format!("the messaging engine of this member must be named {want:?}"),
                        &format!("set it to {want:?}"),
                    ));
                }
                let Ok(u) = uuid::Uuid::parse_str(&m.uuid) else {
                    return Err(invalid(&bf, &k("uuid"), format!("{:?}", m.uuid), "is not a UUID", "restore the original UUID of this messaging engine (its data store is stamped with it) from a backup"));
                };
                if let Some(other) = uuids.insert(u, m.me.clone()) {
                    return Err(invalid(&bf, &k("uuid"), format!("{:?}", m.uuid), &format!("messaging engine {other} has the same UUID"), "give each messaging engine its own UUID (a copied [[member]] table keeps the original's)"));
                }
                if !members.insert((m.node.as_str(), m.server.as_str())) {
                    return Err(invalid(&bf, &k("server"), format!("{:?}", m.server), "the server is already a member of this bus (one member per server per bus)", "remove the duplicate [[member]] table"));
                }
            }
            check_message_bytes(&bf, i64::try_from(b.max_message_bytes).unwrap_or(i64::MAX))?;
            check_duplicate_window(&bf, i64::from(b.duplicate_window_hours))?;
            let mes: Vec<&str> = b.members.iter().map(|m| m.me.as_str()).collect();
            let mut dest_names = HashSet::new();
            for (i, d) in b.destinations.iter().enumerate() {
                let k = |f: &str| format!("destination[{}].{f}", i + 1);
                check_destination_values(&bf, &k, d)?;
                if !dest_names.insert(d.name.as_str()) {
                    return Err(invalid(
                        &bf,
                        &k("name"),
                        format!("{:?}", d.name),
                        "another destination of this bus has the same name",
                        "give each destination of the bus its own name, or remove the duplicate [[destination]] table",
                    ));
                }
                if !mes.contains(&d.me.as_str()) {
                    return Err(invalid(
                        &bf,
                        &k("me"),
                        format!("{:?}", d.me),
                        &format!(
                            "is not the messaging engine of a member of this bus (its engines: {})",
                            if mes.is_empty() {
                                "none".to_string()
                            } else {
                                mes.join(", ")
                            }
                        ),
                        "name the messaging engine of a member of this bus",
                    ));
                }
                if let Some(x) = &d.exception_destination {
                    let why = if *x == d.name {
                        Some("a destination cannot be its own exception destination".to_string())
                    } else if !b.destinations.iter().any(|o| o.name == *x) {
                        Some(format!("bus {} has no destination of that name", b.name))
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        return Err(invalid(
                            &bf,
                            &k("exception_destination"),
                            format!("{x:?}"),
                            &why,
                            "name another destination of this bus, or remove the key to use the messaging engine's system exception destination",
                        ));
                    }
                }
            }
        }

        let mut ds_names = HashSet::new();
        for d in &self.datasources {
            let df = rel_datasource(&d.name);
            check_datasource(&df, d)?;
            if !ds_names.insert(d.name.as_str()) {
                return Err(invalid(
                    &df,
                    "datasource.name",
                    format!("{:?}", d.name),
                    "another data source has the same name",
                    "give each data source its own name",
                ));
            }
        }
        // After the buses and data sources: applications refer to both. A removed server, bus
        // member, destination or data source leaves its applications dangling, caught here.
        let mut app_names = HashSet::new();
        for a in &self.apps {
            let af = rel_app(&a.name);
            self.check_app(&af, a)?;
            if !app_names.insert(a.name.as_str()) {
                return Err(invalid(
                    &af,
                    "app.name",
                    format!("{:?}", a.name),
                    "another application has the same name",
                    "give each application its own name",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The config a fresh profile gets, built through the public API.
    pub(crate) fn sample() -> Config {
        let mut c = Config {
            version: 1,
            cell: Cell {
                name: "keelCell".into(),
            },
            nodes: vec![NodeCfg {
                name: "node01".into(),
                host: "127.0.0.1".into(),
                admin_port: 7270,
                servers: vec![],
            }],
            buses: vec![],
            datasources: vec![],
            apps: vec![],
        };
        c.add_server("node01", "server1").expect("add server");
        c.add_bus_member("bus1", "server1").expect("add member");
        c
    }

    fn invalid_key(r: Result<()>) -> String {
        match r {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn sample_is_valid_and_has_documented_ports() {
        let c = sample();
        c.validate().expect("valid");
        let s = c.server("node01", "server1").expect("server1");
        assert_eq!((s.admin_port, s.bus_port), (7271, 7272));
        assert_eq!(s.monitor, MonitorPolicy::default());
        assert_eq!(c.buses[0].members[0].me, "node01.server1-bus1");
    }

    #[test]
    fn names_follow_the_rule() {
        assert!(name_problem("server1").is_none());
        assert!(name_problem("a.b-c_d").is_none());
        assert!(name_problem("").is_some());
        assert!(name_problem("-x").is_some());
        assert!(name_problem(".x").is_some());
        assert!(name_problem("a b").is_some());
        assert!(name_problem("a/b").is_some());
        assert!(name_problem(&"a".repeat(64)).is_none());
        assert!(name_problem(&"a".repeat(65)).is_some());
    }

    #[test]
    fn add_server_allocates_the_next_two_ports_cell_wide() {
        let mut c = sample();
        let s = c.add_server("node01", "server2").expect("add").clone();
        assert_eq!((s.admin_port, s.bus_port), (7273, 7274));
        // A port raised by hand moves the allocation above it.
        c.nodes[0].servers[0].bus_port = 9000;
        let s = c.add_server("node01", "server10").expect("add").clone();
        assert_eq!((s.admin_port, s.bus_port), (9001, 9002));
        let names: Vec<_> = c.nodes[0].servers.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["server1", "server2", "server10"]);
        c.validate().expect("valid");
    }

    #[test]
    fn add_server_errors() {
        let mut c = sample();
        let e = c
            .add_server("node99", "s")
            .expect_err("unknown node")
            .to_string();
        assert!(e.contains("node99") && e.contains("node01"), "{e}");
        let e = c
            .add_server("node01", "server1")
            .expect_err("dup")
            .to_string();
        assert!(e.contains("already exists"), "{e}");
        let e = c
            .add_server("node01", "bad name")
            .expect_err("name")
            .to_string();
        assert!(e.contains("not a valid server name"), "{e}");
        assert!(c.add_server("node01", "nodeagent").is_err());
        c.nodes[0].admin_port = 65534;
        assert!(matches!(
            c.add_server("node01", "s9"),
            Err(ConfigError::PortsExhausted { .. })
        ));
    }

    #[test]
    fn add_bus_member_creates_bus_and_refuses_twice() {
        let mut c = sample();
        c.add_server("node01", "server2").expect("add");
        let m = c.add_bus_member("bus2", "server2").expect("member").clone();
        assert_eq!(m.me, "node01.server2-bus2");
        assert_eq!(m.initial_state, InitialState::Started);
        uuid::Uuid::parse_str(&m.uuid).expect("uuid");
        let m2 = c.add_bus_member("bus1", "server2").expect("member").clone();
        assert_ne!(m.uuid, m2.uuid);
        assert_eq!(
            c.buses.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
            ["bus1", "bus2"]
        );
        assert_eq!(c.buses[0].members.len(), 2);
        assert!(matches!(
            c.add_bus_member("bus1", "server2"),
            Err(ConfigError::AlreadyMember { .. })
        ));
        let e = c
            .add_bus_member("bus1", "ghost")
            .expect_err("unknown")
            .to_string();
        assert!(e.contains("ghost") && e.contains("server1"), "{e}");
        c.validate().expect("valid");
    }

    #[test]
    fn validate_catches_each_rule() {
        let mut c = sample();
        c.nodes[0].servers[0].bus_port = 7270;
        assert_eq!(invalid_key(c.validate()), "server.bus_port");

        let mut c = sample();
        c.nodes[0].servers[0].admin_port = 80;
        let e = c.validate().expect_err("low port");
        assert!(
            e.to_string().contains(
                "nodes/node01/servers/server1.toml: key `server.admin_port` = 80 is invalid"
            ),
            "{e}"
        );

        let mut c = sample();
        c.nodes[0].servers[0].monitor.ping_interval_s = 0;
        let e = c.validate().expect_err("ping").to_string();
        assert_eq!(
            e,
            "nodes/node01/servers/server1.toml: key `monitor.ping_interval_s` = 0 is invalid: must be between 1 and 3600; fix: set it to a number of seconds between 1 and 3600, then run `keel config validate`"
        );

        let mut c = sample();
        c.nodes[0].servers[0].monitor.max_start_attempts = 101;
        assert_eq!(invalid_key(c.validate()), "monitor.max_start_attempts");

        let mut c = sample();
        c.buses[0].members[0].me = "x".into();
        assert_eq!(invalid_key(c.validate()), "member[1].me");

        let mut c = sample();
        c.buses[0].members[0].uuid = "nope".into();
        assert_eq!(invalid_key(c.validate()), "member[1].uuid");

        let mut c = sample();
        c.buses[0].members[0].server = "ghost".into();
        assert_eq!(invalid_key(c.validate()), "member[1].server");

        let mut c = sample();
        let m = c.buses[0].members[0].clone();
        c.buses[0].members.push(BusMember {
            uuid: uuid::Uuid::new_v4().to_string(),
            ..m
        });
        assert_eq!(invalid_key(c.validate()), "member[2].server");

        let mut c = sample();
        c.nodes.clear();
        assert_eq!(invalid_key(c.validate()), "node");

        let mut c = sample();
        c.version = 0;
        assert_eq!(invalid_key(c.validate()), "repository.version");

        let mut c = sample();
        c.cell.name = "bad/cell".into();
        assert_eq!(invalid_key(c.validate()), "cell.name");

        let mut c = sample();
        c.nodes[0].host = String::new();
        assert_eq!(invalid_key(c.validate()), "node.host");
    }

    /// `sample` plus server2 as a second member of bus1, and a queue and a topic on bus1.
    pub(crate) fn sample_with_destinations() -> Config {
        let mut c = sample();
        c.add_server("node01", "server2").expect("add server");
        c.add_bus_member("bus1", "server2").expect("add member");
        c.add_destination(
            "bus1",
            "orders",
            DestinationKind::Queue,
            Some("node01.server1-bus1"),
            None,
        )
        .expect("queue");
        c.add_destination(
            "bus1",
            "prices",
            DestinationKind::Topic,
            Some("node01.server2-bus1"),
            Some(Reliability::Express),
        )
        .expect("topic");
        c.add_destination(
            "bus1",
            "orders.dead",
            DestinationKind::Queue,
            Some("node01.server2-bus1"),
            None,
        )
        .expect("queue");
        let d = &mut c.buses[0].destinations;
        let orders = d.iter_mut().find(|d| d.name == "orders").expect("orders");
        orders.exception_destination = Some("orders.dead".into());
        orders.default_priority = 7;
        orders.max_failed_deliveries = 3;
        c.buses[0].allow_anonymous = true;
        c.buses[0].max_message_bytes = 4096;
        c.validate().expect("valid");
        c
    }

    #[test]
    fn remove_destination_takes_it_out_and_validation_guards_its_users() {
        let mut c = sample_with_destinations();
        let d = c.remove_destination("bus1", "prices").expect("remove");
        assert_eq!(d.kind, DestinationKind::Topic);
        assert!(c.find_destination("bus1", "prices").is_none());
        c.validate().expect("nothing names prices");
        match c.remove_destination("bus1", "prices") {
            Err(ConfigError::UnknownDestination { known, .. }) => {
                assert_eq!(known, ["orders", "orders.dead"])
            }
            other => panic!("expected UnknownDestination, got {other:?}"),
        }
        assert!(matches!(
            c.remove_destination("nobus", "orders"),
            Err(ConfigError::UnknownBus { .. })
        ));
        // orders.dead is the exception destination of orders: the save would be refused.
        c.remove_destination("bus1", "orders.dead").expect("remove");
        assert!(c.validate().is_err());
    }

    #[test]
    fn reliability_is_ordered_and_spelled_as_documented() {
        use std::str::FromStr;
        let words = [
            "best_effort",
            "express",
            "reliable_persistent",
            "assured_persistent",
        ];
        for (i, r) in Reliability::ALL.iter().enumerate() {
            assert_eq!(r.as_str(), words[i]);
            assert_eq!(r.to_string(), words[i]);
            assert_eq!(Reliability::from_str(words[i]).expect("parse"), *r);
            assert_eq!(
                toml::Value::try_from(*r).expect("ser"),
                toml::Value::String(words[i].into())
            );
        }
        assert!(Reliability::BestEffort < Reliability::Express);
        assert!(Reliability::Express < Reliability::ReliablePersistent);
        assert!(Reliability::ReliablePersistent < Reliability::AssuredPersistent);
        assert!(!Reliability::Express.is_persistent());
        assert!(Reliability::ReliablePersistent.is_persistent());
        let e = "assured"
            .parse::<Reliability>()
            .expect_err("bad")
            .to_string();
        for w in words {
            assert!(e.contains(w), "{e}");
        }
        assert!(e.contains("\"assured\""), "{e}");

        assert_eq!(
            "queue".parse::<DestinationKind>().expect("q"),
            DestinationKind::Queue
        );
        assert_eq!(
            "topic".parse::<DestinationKind>().expect("t"),
            DestinationKind::Topic
        );
        assert_eq!(DestinationKind::Topic.as_str(), "topic");
        let e = "Queue"
            .parse::<DestinationKind>()
            .expect_err("bad")
            .to_string();
        assert!(e.contains("queue") && e.contains("topic"), "{e}");
        assert_eq!(
            toml::Value::try_from(DestinationKind::Queue).expect("ser"),
            toml::Value::String("queue".into())
        );
    }

    #[test]
    fn add_destination_defaults_to_the_only_member() {
        let mut c = sample();
        let d = c
            .add_destination("bus1", "q1", DestinationKind::Queue, None, None)
            .expect("add")
            .clone();
        assert_eq!(
            d,
            DestinationCfg {
                name: "q1".into(),
                kind: DestinationKind::Queue,
                me: "node01.server1-bus1".into(),
                reliability: Reliability::AssuredPersistent,
                default_reliability: Reliability::ReliablePersistent,
                default_priority: 4,
                max_failed_deliveries: 5,
                exception_destination: None,
            }
        );
        assert_eq!(
            d.exception_target(),
            "_SYSTEM.Exception.Destination.node01.server1-bus1"
        );
        // The default reliability is capped at the maximum.
        let d = c
            .add_destination(
                "bus1",
                "t1",
                DestinationKind::Topic,
                None,
                Some(Reliability::Express),
            )
            .expect("add")
            .clone();
        assert_eq!(
            (d.reliability, d.default_reliability),
            (Reliability::Express, Reliability::Express)
        );
        let d = c
            .add_destination(
                "bus1",
                "q10",
                DestinationKind::Queue,
                Some("node01.server1-bus1"),
                Some(Reliability::ReliablePersistent),
            )
            .expect("add")
            .clone();
        assert_eq!(d.default_reliability, Reliability::ReliablePersistent);
        c.add_destination("bus1", "q2", DestinationKind::Queue, None, None)
            .expect("add");
        let names: Vec<_> = c.buses[0]
            .destinations
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        assert_eq!(names, ["q1", "q2", "q10", "t1"], "natural name order");
        c.validate().expect("valid");
        assert_eq!(
            c.find_destination("bus1", "t1").map(|d| d.kind),
            Some(DestinationKind::Topic)
        );
        assert!(c.find_destination("bus1", "nope").is_none());
        assert!(c.find_destination("bus9", "q1").is_none());
    }

    #[test]
    fn add_destination_errors() {
        let mut c = sample();
        c.add_server("node01", "server2").expect("add");
        c.add_bus_member("bus1", "server2").expect("member");
        let before = c.clone();

        let e = c
            .add_destination("bus1", "q", DestinationKind::Queue, None, None)
            .expect_err("two members");
        assert!(matches!(e, ConfigError::MeRequired { .. }), "{e:?}");
        let e = e.to_string();
        assert!(
            e.contains("node01.server1-bus1")
                && e.contains("node01.server2-bus1")
                && e.contains("--me ME"),
            "{e}"
        );

        let e = c
            .add_destination(
                "bus1",
                "q",
                DestinationKind::Queue,
                Some("node01.server1-bus2"),
                None,
            )
            .expect_err("unknown me")
            .to_string();
        assert!(
            e.contains("node01.server1-bus2") && e.contains("node01.server2-bus1"),
            "{e}"
        );

        let e = c
            .add_destination("bus9", "q", DestinationKind::Queue, None, None)
            .expect_err("unknown bus")
            .to_string();
        assert!(e.contains("bus9") && e.contains("known buses: bus1"), "{e}");

        for bad in ["_SYSTEM.Exception.Destination.x", "", "a b", "-q", "q/1"] {
            let e = c
                .add_destination(
                    "bus1",
                    bad,
                    DestinationKind::Queue,
                    Some("node01.server1-bus1"),
                    None,
                )
                .expect_err(bad);
            assert!(
                matches!(e, ConfigError::BadDestinationName { .. }),
                "{bad}: {e:?}"
            );
        }
        let long = "q".repeat(129);
        assert!(c
            .add_destination(
                "bus1",
                &long,
                DestinationKind::Queue,
                Some("node01.server1-bus1"),
                None
            )
            .is_err());
        assert_eq!(c, before, "failed calls change nothing");

        let ok = "q".repeat(128);
        c.add_destination(
            "bus1",
            &ok,
            DestinationKind::Queue,
            Some("node01.server2-bus1"),
            None,
        )
        .expect("128 characters are fine");
        let e = c
            .add_destination(
                "bus1",
                &ok,
                DestinationKind::Topic,
                Some("node01.server1-bus1"),
                None,
            )
            .expect_err("dup");
        assert!(
            matches!(
                e,
                ConfigError::Duplicate {
                    what: "destination",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("on bus bus1"), "{e}");
        c.validate().expect("valid");

        // A bus without members cannot hold a destination.
        c.buses[0].members.clear();
        c.buses[0].destinations.clear();
        let e = c
            .add_destination("bus1", "q", DestinationKind::Queue, None, None)
            .expect_err("no members")
            .to_string();
        assert!(
            e.contains("has no members") && e.contains("add-member"),
            "{e}"
        );
    }

    #[test]
    fn set_initial_state_finds_the_engine_on_any_bus() {
        let mut c = sample();
        c.add_server("node01", "server2").expect("add");
        c.add_bus_member("bus2", "server2").expect("member");
        let m = c
            .set_initial_state("node01.server2-bus2", InitialState::Stopped)
            .expect("set")
            .clone();
        assert_eq!(
            (m.server.as_str(), m.initial_state),
            ("server2", InitialState::Stopped)
        );
        assert_eq!(c.buses[1].members[0].initial_state, InitialState::Stopped);
        assert_eq!(c.buses[0].members[0].initial_state, InitialState::Started);
        c.set_initial_state("node01.server2-bus2", InitialState::Started)
            .expect("set");
        assert_eq!(c.buses[1].members[0].initial_state, InitialState::Started);
        let before = c.clone();
        let e = c
            .set_initial_state("node01.server9-bus1", InitialState::Stopped)
            .expect_err("unknown");
        assert!(matches!(e, ConfigError::UnknownMe { .. }), "{e:?}");
        let e = e.to_string();
        assert!(
            e.contains("node01.server9-bus1")
                && e.contains("node01.server1-bus1")
                && e.contains("node01.server2-bus2"),
            "{e}"
        );
        assert_eq!(c, before);
    }

    #[test]
    fn find_me_and_mes_of_server() {
        let mut c = sample();
        c.add_server("node01", "server2").expect("add");
        c.add_bus_member("bus2", "server1").expect("member");
        c.add_bus_member("bus10", "server1").expect("member");
        c.add_bus_member("bus2", "server2").expect("member");
        let (b, m) = c.find_me("node01.server2-bus2").expect("found");
        assert_eq!((b.name.as_str(), m.server.as_str()), ("bus2", "server2"));
        assert!(c.find_me("node01.server2-bus1").is_none());
        let mes: Vec<_> = c
            .mes_of_server("node01", "server1")
            .into_iter()
            .map(|(b, m)| (b.name.clone(), m.me.clone()))
            .collect();
        assert_eq!(
            mes,
            [
                ("bus1".to_string(), "node01.server1-bus1".to_string()),
                ("bus2".to_string(), "node01.server1-bus2".to_string()),
                ("bus10".to_string(), "node01.server1-bus10".to_string()),
            ]
        );
        assert_eq!(c.mes_of_server("node01", "server2").len(), 1);
        assert!(c.mes_of_server("node02", "server1").is_empty());
        assert!(c.mes_of_server("node01", "server9").is_empty());
    }

    #[test]
    fn validate_catches_each_destination_rule() {
        fn with(f: impl FnOnce(&mut BusCfg)) -> Result<()> {
            let mut c = sample_with_destinations();
            f(&mut c.buses[0]);
            c.validate()
        }
        // Destinations in order: orders, orders.dead, prices.
        let file = |r: Result<()>| match r {
            Err(ConfigError::Invalid { file, key, .. }) => (file, key),
            other => panic!("expected Invalid, got {other:?}"),
        };
        type Edit = Box<dyn FnOnce(&mut BusCfg)>;
        let cases: Vec<(&str, Edit)> = vec![
            (
                "destination[3].name",
                Box::new(|b| b.destinations[2].name = "bad name".into()),
            ),
            (
                "destination[3].name",
                Box::new(|b| b.destinations[2].name = "_SYSTEM.x".into()),
            ),
            (
                "destination[3].name",
                Box::new(|b| b.destinations[2].name = "_x".into()),
            ),
            (
                "destination[3].name",
                Box::new(|b| b.destinations[2].name = "x".repeat(129)),
            ),
            (
                "destination[3].name",
                Box::new(|b| b.destinations[2].name = "orders.dead".into()),
            ),
            (
                "destination[3].me",
                Box::new(|b| b.destinations[2].me = "node01.server1-bus2".into()),
            ),
            (
                "destination[3].default_reliability",
                Box::new(|b| {
                    b.destinations[2].default_reliability = Reliability::ReliablePersistent
                }),
            ),
            (
                "destination[1].default_priority",
                Box::new(|b| b.destinations[0].default_priority = 10),
            ),
            (
                "destination[1].max_failed_deliveries",
                Box::new(|b| b.destinations[0].max_failed_deliveries = 0),
            ),
            (
                "destination[1].max_failed_deliveries",
                Box::new(|b| b.destinations[0].max_failed_deliveries = 1001),
            ),
            (
                "destination[1].exception_destination",
                Box::new(|b| b.destinations[0].exception_destination = Some("orders".into())),
            ),
            (
                "destination[1].exception_destination",
                Box::new(|b| b.destinations[0].exception_destination = Some("ghost".into())),
            ),
            (
                "bus.max_message_bytes",
                Box::new(|b| b.max_message_bytes = 1023),
            ),
            (
                "bus.max_message_bytes",
                Box::new(|b| b.max_message_bytes = (256 << 20) + 1),
            ),
            (
                "bus.max_message_bytes",
                Box::new(|b| b.max_message_bytes = u64::MAX),
            ),
        ];
        for (want, f) in cases {
            let (f, key) = file(with(f));
            assert_eq!(key, want);
            assert_eq!(f, Path::new("buses/bus1.toml"));
        }
        // The edges are accepted.
        with(|b| {
            b.max_message_bytes = 1024;
            b.destinations[0].default_priority = 0;
            b.destinations[0].max_failed_deliveries = 1000;
            b.destinations[1].reliability = Reliability::BestEffort;
            b.destinations[1].default_reliability = Reliability::BestEffort;
        })
        .expect("valid");
        with(|b| b.max_message_bytes = 256 << 20).expect("valid");

        let e = with(|b| b.destinations[2].default_reliability = Reliability::AssuredPersistent)
            .expect_err("above max")
            .to_string();
        assert!(
            e.starts_with("buses/bus1.toml: key `destination[3].default_reliability` = \"assured_persistent\" is invalid: is above the destination's maximum reliability \"express\""),
            "{e}"
        );
        let e = with(|b| b.destinations[0].me = "node01.server9-bus1".into())
            .expect_err("me")
            .to_string();
        assert!(
            e.contains("node01.server1-bus1, node01.server2-bus1"),
            "{e}"
        );
    }

    #[test]
    fn monitor_policy_defaults_fill_missing_fields() {
        let m: MonitorPolicy = toml::from_str("auto_restart = false").expect("parse");
        assert_eq!(
            m,
            MonitorPolicy {
                auto_restart: false,
                ..MonitorPolicy::default()
            }
        );
        assert_eq!(
            toml::Value::try_from(InitialState::Stopped).expect("ser"),
            toml::Value::String("stopped".into())
        );
    }

    /// A script with quotes, backslashes, TOML string delimiters, tabs and CRLF, so the file
    /// round trip is tested on the hard cases.
    pub(crate) const TRICKY_SCRIPT: &str = "// mover\nfn on_message(msg) {\n\tlet q = \"say \\\"hi\\\"\";\n    let p = 'c';\n    let s = \"\"\"not toml\"\"\" + '''nor this''';\n    send(\"out\", msg.body + \"\\\\n\");\r\n}\n";

    /// `sample` plus: server2 as a member of bus1 and of bus2; queues `in`, `out`, topic `news`
    /// on server1's engine and queue `far` on server2's, on bus1; data source pg1; applications
    /// fwd (forward in → out), sq (sql on pg1) and sc (script), all on server1.
    pub(crate) fn sample_with_apps() -> Config {
        let mut c = sample();
        c.add_server("node01", "server2").expect("add server");
        c.add_bus_member("bus1", "server2").expect("member");
        c.add_bus_member("bus2", "server2").expect("member");
        let me1 = "node01.server1-bus1";
        for (name, kind, me) in [
            ("in", DestinationKind::Queue, me1),
            ("out", DestinationKind::Queue, me1),
            ("news", DestinationKind::Topic, me1),
            ("far", DestinationKind::Queue, "node01.server2-bus1"),
        ] {
            c.add_destination("bus1", name, kind, Some(me), None)
                .expect("destination");
        }
        c.add_datasource(DataSourceCfg {
            name: "pg1".into(),
            kind: DataSourceKind::Postgres,
            url: "postgresql://keel@127.0.0.1:5432/db".into(),
            pool_max: DEFAULT_POOL_MAX,
        })
        .expect("datasource");
        c.add_app(app("fwd", AppKind::Forward)).expect("forward");
        c.add_app(app("sq", AppKind::Sql)).expect("sql");
        c.add_app(app("sc", AppKind::Script)).expect("script");
        c.validate().expect("valid");
        c
    }

    /// A valid application of `kind` on server1 receiving from bus1/in.
    pub(crate) fn app(name: &str, kind: AppKind) -> AppCfg {
        let mut a = AppCfg {
            name: name.into(),
            server: "server1".into(),
            bus: "bus1".into(),
            on: "in".into(),
            kind,
            to: None,
            datasource: None,
            statement: None,
            script: None,
            concurrency: DEFAULT_APP_CONCURRENCY,
            timeout_s: DEFAULT_APP_TIMEOUT_S,
        };
        match kind {
            AppKind::Forward => a.to = Some("out".into()),
            AppKind::Sql => {
                a.datasource = Some("pg1".into());
                a.statement = Some("INSERT INTO t(body) VALUES ($1)".into());
            }
            AppKind::Script => a.script = Some(TRICKY_SCRIPT.into()),
        }
        a
    }

    #[test]
    fn kinds_are_spelled_as_documented() {
        for k in [DataSourceKind::Postgres, DataSourceKind::MariaDb] {
            assert_eq!(DataSourceKind::parse(k.as_str()), Some(k));
            assert_eq!(
                toml::Value::try_from(k).expect("ser"),
                toml::Value::String(k.as_str().into())
            );
        }
        assert_eq!(DataSourceKind::MariaDb.as_str(), "mariadb");
        assert_eq!(DataSourceKind::parse("mysql"), None);
        for k in [AppKind::Forward, AppKind::Sql, AppKind::Script] {
            assert_eq!(AppKind::parse(k.as_str()), Some(k));
            assert_eq!(
                toml::Value::try_from(k).expect("ser"),
                toml::Value::String(k.as_str().into())
            );
        }
        assert_eq!(
            [AppKind::Forward, AppKind::Sql, AppKind::Script].map(AppKind::as_str),
            ["forward", "sql", "script"]
        );
        assert_eq!(AppKind::parse("Forward"), None);
    }

    #[test]
    fn url_passwords_are_found_and_taken_out() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            (
                "postgresql://u:secret@127.0.0.1:5432/db",
                "postgresql://u@127.0.0.1:5432/db",
                Some("secret"),
            ),
            ("mysql://u:p%40ss%2F@h/db", "mysql://u@h/db", Some("p@ss/")),
            (
                "mysql://u:p@ss/x@h:3306/db",
                "mysql://u@h:3306/db",
                Some("p@ss/x"),
            ),
            ("mariadb://u:100%@h/db", "mariadb://u@h/db", Some("100%")),
            ("postgresql://u@h/db", "postgresql://u@h/db", None),
            ("postgresql://h:5432/db", "postgresql://h:5432/db", None),
            ("postgresql:///db", "postgresql:///db", None),
            ("u:pw@h", "u@h", Some("pw")),
        ];
        for (url, clean, pw) in cases {
            let (c, p) = take_url_password(url);
            assert_eq!((c.as_str(), p.as_deref()), (*clean, *pw), "{url}");
            assert_eq!(url_has_password(url), pw.is_some(), "{url}");
            assert!(!url_has_password(&c), "{c}");
        }
    }

    #[test]
    fn datasource_and_app_api() {
        let mut c = sample_with_apps();
        let names: Vec<&str> = c.apps.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["fwd", "sc", "sq"]);
        assert_eq!(c.apps_of_server("server1").len(), 3);
        assert!(c.apps_of_server("server2").is_empty());
        assert_eq!(c.app("sq").map(|a| a.kind), Some(AppKind::Sql));
        assert_eq!(c.datasource("pg1").map(|d| d.pool_max), Some(16));
        let before = c.clone();

        // Refusals change nothing.
        let e = c.add_app(app("sq", AppKind::Sql)).expect_err("dup");
        assert!(matches!(e, ConfigError::Duplicate { .. }), "{e:?}");
        let e = c
            .add_app(AppCfg {
                server: "ghost".into(),
                ..app("a1", AppKind::Forward)
            })
            .expect_err("server");
        assert!(matches!(e, ConfigError::UnknownServer { .. }), "{e:?}");
        let e = c
            .add_app(AppCfg {
                bus: "bus9".into(),
                ..app("a1", AppKind::Forward)
            })
            .expect_err("bus");
        assert!(matches!(e, ConfigError::UnknownBus { .. }), "{e:?}");
        let e = c
            .add_app(AppCfg {
                datasource: Some("ghost".into()),
                ..app("a1", AppKind::Sql)
            })
            .expect_err("ds");
        assert!(e.to_string().contains("no data source `ghost`"), "{e}");
        let e = c
            .add_app(AppCfg {
                on: "far".into(),
                ..app("a1", AppKind::Forward)
            })
            .expect_err("on");
        assert!(
            matches!(&e, ConfigError::Invalid { key, .. } if key == "app.on"),
            "{e:?}"
        );
        assert!(c.add_app(app("bad name", AppKind::Forward)).is_err());
        let e = c
            .add_datasource(c.datasources[0].clone())
            .expect_err("dup ds");
        assert!(matches!(e, ConfigError::Duplicate { .. }), "{e:?}");
        let e = c
            .add_datasource(DataSourceCfg {
                name: "m1".into(),
                kind: DataSourceKind::MariaDb,
                url: "mysql://u:s3cret@h/db".into(),
                pool_max: 4,
            })
            .expect_err("password");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let e = c.remove_datasource("pg1").expect_err("in use").to_string();
        assert!(e.contains("pg1") && e.contains("sq"), "{e}");
        assert!(matches!(
            c.remove_datasource("pg9"),
            Err(ConfigError::UnknownDataSource { .. })
        ));
        assert!(matches!(
            c.remove_app("nope"),
            Err(ConfigError::UnknownApp { .. })
        ));
        assert_eq!(c, before);

        c.add_datasource(DataSourceCfg {
            name: "m10".into(),
            kind: DataSourceKind::MariaDb,
            url: "mariadb://keel@127.0.0.1:3306/db".into(),
            pool_max: 256,
        })
        .expect("mariadb");
        c.add_datasource(DataSourceCfg {
            name: "m2".into(),
            kind: DataSourceKind::MariaDb,
            url: "mysql://keel@127.0.0.1/db".into(),
            pool_max: 1,
        })
        .expect("mysql");
        let names: Vec<&str> = c.datasources.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["m2", "m10", "pg1"], "natural name order");
        assert_eq!(c.remove_app("sq").expect("remove").name, "sq");
        assert_eq!(c.remove_datasource("pg1").expect("remove").name, "pg1");
        c.validate().expect("valid");
    }

    #[test]
    fn validate_catches_each_datasource_rule() {
        type Edit = Box<dyn FnOnce(&mut Config)>;
        fn ds(f: fn(&mut DataSourceCfg)) -> Edit {
            Box::new(move |c| f(&mut c.datasources[0]))
        }
        let cases: Vec<(&str, Edit)> = vec![
            ("datasource.name", ds(|d| d.name = "bad name".into())),
            (
                "datasource.name",
                Box::new(|c| {
                    let d = c.datasources[0].clone();
                    c.datasources.push(d);
                }),
            ),
            ("datasource.url", ds(|d| d.url = "mysql://keel@h/db".into())),
            (
                "datasource.url",
                ds(|d| {
                    d.kind = DataSourceKind::MariaDb;
                    d.url = "postgresql://keel@h/db".into();
                }),
            ),
            ("datasource.url", ds(|d| d.url = "postgresql://".into())),
            (
                "datasource.url",
                ds(|d| d.url = "postgresql://h/my db".into()),
            ),
            ("datasource.pool_max", ds(|d| d.pool_max = 0)),
            ("datasource.pool_max", ds(|d| d.pool_max = 257)),
        ];
        for (want, f) in cases {
            let mut c = sample_with_apps();
            f(&mut c);
            assert_eq!(invalid_key(c.validate()), want);
        }
        // A password is refused and never echoed, whatever the scheme.
        for url in [
            "postgresql://keel:s3cret@h/db",
            "postgres://keel:s3cret@h/db",
            "mysql://keel:s3cret@h/db",
            "keel:s3cret@h/db",
        ] {
            let mut c = sample_with_apps();
            c.datasources[0].url = url.into();
            let e = c.validate().expect_err(url);
            assert!(
                matches!(&e, ConfigError::Invalid { key, file, .. } if key == "datasource.url" && file == Path::new("datasources/pg1.toml")),
                "{e:?}"
            );
            let e = e.to_string();
            assert!(!e.contains("s3cret") && e.contains("password"), "{e}");
        }
        let mut c = sample_with_apps();
        c.datasources[0].pool_max = 256;
        c.datasources[0].url = "postgres://keel@[::1]:5432/db?sslmode=disable".into();
        c.validate().expect("edges are valid");
    }

    #[test]
    fn validate_catches_each_app_rule() {
        type Edit = Box<dyn FnOnce(&mut AppCfg)>;
        fn long(n: usize) -> String {
            "x".repeat(n)
        }
        // (app to edit, expected key, edit)
        let cases: Vec<(&str, &str, Edit)> = vec![
            ("fwd", "app.name", Box::new(|a| a.name = "-x".into())),
            ("fwd", "app.server", Box::new(|a| a.server = "ghost".into())),
            ("fwd", "app.bus", Box::new(|a| a.bus = "bus9".into())),
            // server1 is not a member of bus2.
            ("fwd", "app.bus", Box::new(|a| a.bus = "bus2".into())),
            ("fwd", "app.on", Box::new(|a| a.on = "ghost".into())),
            ("fwd", "app.on", Box::new(|a| a.on = "news".into())),
            ("fwd", "app.on", Box::new(|a| a.on = "far".into())),
            ("fwd", "app.concurrency", Box::new(|a| a.concurrency = 0)),
            ("fwd", "app.concurrency", Box::new(|a| a.concurrency = 65)),
            ("fwd", "app.to", Box::new(|a| a.to = None)),
            ("fwd", "app.to", Box::new(|a| a.to = Some("ghost".into()))),
            ("fwd", "app.to", Box::new(|a| a.to = Some("far".into()))),
            ("fwd", "app.to", Box::new(|a| a.to = Some("in".into()))),
            (
                "fwd",
                "app.datasource",
                Box::new(|a| a.datasource = Some("pg1".into())),
            ),
            (
                "fwd",
                "app.statement",
                Box::new(|a| a.statement = Some("SELECT 1".into())),
            ),
            (
                "fwd",
                "app.script",
                Box::new(|a| a.script = Some("fn on_message(m) {}".into())),
            ),
            ("sq", "app.datasource", Box::new(|a| a.datasource = None)),
            (
                "sq",
                "app.datasource",
                Box::new(|a| a.datasource = Some("pg9".into())),
            ),
            ("sq", "app.statement", Box::new(|a| a.statement = None)),
            (
                "sq",
                "app.statement",
                Box::new(|a| a.statement = Some(" \n".into())),
            ),
            (
                "sq",
                "app.statement",
                Box::new(|a| a.statement = Some(long(64 * 1024 + 1))),
            ),
            (
                "sq",
                "app.statement",
                Box::new(|a| a.statement = Some("SELECT \u{1}".into())),
            ),
            ("sq", "app.to", Box::new(|a| a.to = Some("out".into()))),
            (
                "sq",
                "app.script",
                Box::new(|a| a.script = Some("x".into())),
            ),
            ("sc", "app.script", Box::new(|a| a.script = None)),
            (
                "sc",
                "app.script",
                Box::new(|a| a.script = Some(String::new())),
            ),
            (
                "sc",
                "app.script",
                Box::new(|a| a.script = Some(long(256 * 1024 + 1))),
            ),
            (
                "sc",
                "app.script",
                Box::new(|a| a.script = Some("fn on_message(m) {\0}".into())),
            ),
            ("sc", "app.to", Box::new(|a| a.to = Some("out".into()))),
            (
                "sc",
                "app.datasource",
                Box::new(|a| a.datasource = Some("pg1".into())),
            ),
            (
                "sc",
                "app.statement",
                Box::new(|a| a.statement = Some("SELECT 1".into())),
            ),
        ];
        for (name, want, f) in cases {
            let mut c = sample_with_apps();
            let a = c.apps.iter_mut().find(|a| a.name == name).expect("app");
            f(a);
            let file = rel_app(&a.name);
            match c.validate() {
                Err(ConfigError::Invalid { key, file: f, .. }) => {
                    assert_eq!((name, key.as_str()), (name, want));
                    assert_eq!(f, file);
                }
                other => panic!("{name} {want}: expected Invalid, got {other:?}"),
            }
        }
        // Duplicate names.
        let mut c = sample_with_apps();
        let a = c.apps[0].clone();
        c.apps.push(a);
        assert_eq!(invalid_key(c.validate()), "app.name");
        // A script is never echoed in an error, only its size.
        let mut c = sample_with_apps();
        c.apps[0].script = Some("let secret_token = 1;".into());
        let e = c.validate().expect_err("forward with script").to_string();
        assert!(
            !e.contains("secret_token") && e.contains("a script of 21 bytes"),
            "{e}"
        );
        // The edges are accepted.
        let mut c = sample_with_apps();
        for a in &mut c.apps {
            a.concurrency = if a.kind == AppKind::Sql { 1 } else { 64 };
            match a.kind {
                AppKind::Forward => a.to = Some("news".into()),
                AppKind::Sql => a.statement = Some(long(64 * 1024)),
                AppKind::Script => a.script = Some(long(256 * 1024)),
            }
        }
        c.validate().expect("edges are valid");
    }

    #[test]
    fn removing_what_an_app_needs_is_caught() {
        // The server (with its memberships and the queues of its engines).
        let mut c = sample_with_apps();
        for b in &mut c.buses {
            b.members.retain(|m| m.server != "server1");
            b.destinations.retain(|d| d.me != "node01.server1-bus1");
        }
        c.nodes[0].servers.retain(|s| s.name != "server1");
        assert_eq!(invalid_key(c.validate()), "app.server");
        // The bus membership (and the queues of the engine that went with it).
        let mut c = sample_with_apps();
        c.buses[0].members.retain(|m| m.server != "server1");
        c.buses[0]
            .destinations
            .retain(|d| d.me != "node01.server1-bus1");
        assert_eq!(invalid_key(c.validate()), "app.bus");
        // A destination.
        let mut c = sample_with_apps();
        c.buses[0].destinations.retain(|d| d.name != "out");
        assert_eq!(invalid_key(c.validate()), "app.to");
        // A data source.
        let mut c = sample_with_apps();
        c.datasources.clear();
        assert_eq!(invalid_key(c.validate()), "app.datasource");
    }
}
