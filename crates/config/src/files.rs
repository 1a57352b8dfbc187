//! The on-disk form of a repository and its translation to and from `Config`.
//!
//! ```text
//! cell.toml                          [repository] format, version, saved_at; [cell] name
//! nodes/<node>/node.toml             [node] name, host, admin_port
//! nodes/<node>/servers/<server>.toml [server] name, admin_port, bus_port; [monitor] …
//! buses/<bus>.toml                   [bus] name, allow_anonymous, anonymous_user,
//!                                      max_message_bytes, duplicate_window_hours;
//!                                    [[member]] node, server, me, uuid, initial_state,
//!                                      store_url (PostgreSQL store; absent = SQLite);
//!                                    [[destination]] name, type, me, reliability,
//!                                    default_reliability, default_priority,
//!                                    max_failed_deliveries, exception_destination
//! datasources/<name>.toml            [datasource] name, kind, url, pool_max
//!                                      (no password: it is in the profile's secrets)
//! apps/<name>.toml                   [app] name, server, bus, on, kind, to, datasource,
//!                                      statement, script, concurrency, timeout_s
//! users/<name>.toml                  [user] name, roles, password_hash, scram_sha_256
//!                                      (verifiers only, never a password);
//!                                    [[grant]] role, bus, destination
//! ```
//!
//! Files are read in three steps so that every mistake gets the most precise message: TOML
//! syntax (line and column), then a key schema (unknown, missing or mistyped keys, by name),
//! then the value rules (ranges, names, cross references), which are `Config::validate`'s and
//! run once, on the whole configuration. Reading itself checks only what the files alone
//! know: the format, that an object's name is its file's, and the spellings of enumerations.
//! So with several mistakes in a repository, loading names a reading error (syntax, key, file
//! name) before any rule's.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{io_err, ConfigError, Result, FIX_PERM};
use crate::fsx::read_file;
use crate::model::{
    self, invalid, AppCfg, AppKind, BusCfg, BusMember, Cell, Config, DataSourceCfg, DataSourceKind,
    DestinationCfg, DestinationKind, InitialState, MonitorPolicy, NodeCfg, Reliability, ServerCfg,
    UserCfg,
};
use crate::paths;
use keel_core::roles::{AdminRole, BusGrant, BusRole};

/// The repository format this code reads and writes (`[repository] format`).
pub(crate) const FORMAT: i64 = 1;
/// A configuration file bigger than this is not something a person wrote; refuse to parse it.
pub(crate) const MAX_FILE_BYTES: u64 = 1 << 20;
/// Upper bound on the files of one repository, so a runaway directory cannot exhaust memory.
pub(crate) const MAX_FILES: usize = 10_000;

/// Repository-relative path → file bytes.
pub(crate) type Tree = BTreeMap<PathBuf, Vec<u8>>;

// --- file structures (integers are i64 so that range errors come from our checks) -------------

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CellFile {
    repository: RepoSection,
    cell: CellSection,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RepoSection {
    format: i64,
    version: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    saved_at: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CellSection {
    name: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    node: NodeSection,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeSection {
    name: String,
    host: String,
    admin_port: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerFile {
    server: ServerSection,
    #[serde(default)]
    monitor: MonitorSection,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerSection {
    name: String,
    admin_port: i64,
    bus_port: i64,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct MonitorSection {
    auto_restart: Option<bool>,
    ping_interval_s: Option<i64>,
    ping_timeout_s: Option<i64>,
    max_start_attempts: Option<i64>,
    start_timeout_s: Option<i64>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BusFile {
    bus: BusSection,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    member: Vec<MemberSection>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    destination: Vec<DestinationSection>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BusSection {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    allow_anonymous: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    anonymous_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_message_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    duplicate_window_hours: Option<i64>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DestinationSection {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    me: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reliability: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    default_reliability: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    default_priority: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_failed_deliveries: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exception_destination: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberSection {
    node: String,
    server: String,
    me: String,
    uuid: String,
    initial_state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    store_url: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataSourceFile {
    datasource: DataSourceSection,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataSourceSection {
    name: String,
    kind: String,
    url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pool_max: Option<i64>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserFile {
    user: UserSection,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    grant: Vec<GrantSection>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserSection {
    name: String,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    password_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scram_sha_256: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantSection {
    role: String,
    bus: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    destination: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppFile {
    app: AppSection,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppSection {
    name: String,
    server: String,
    bus: String,
    on: String,
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    datasource: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    concurrency: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timeout_s: Option<i64>,
    // Last, so the long texts do not hide the short keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    statement: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    script: Option<String>,
}

// --- key schema --------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Int,
    Bool,
    /// An array of strings.
    StrList,
}

struct KeySpec {
    name: &'static str,
    kind: Kind,
    required: bool,
}

struct TableSpec {
    name: &'static str,
    keys: &'static [KeySpec],
    required: bool,
    /// Written as `[[name]]` (an array of tables).
    array: bool,
}

const fn key(name: &'static str, kind: Kind, required: bool) -> KeySpec {
    KeySpec {
        name,
        kind,
        required,
    }
}

const CELL_SCHEMA: &[TableSpec] = &[
    TableSpec {
        name: "repository",
        keys: &[
            key("format", Kind::Int, true),
            key("version", Kind::Int, true),
            key("saved_at", Kind::Str, false),
        ],
        required: true,
        array: false,
    },
    TableSpec {
        name: "cell",
        keys: &[key("name", Kind::Str, true)],
        required: true,
        array: false,
    },
];

const NODE_SCHEMA: &[TableSpec] = &[TableSpec {
    name: "node",
    keys: &[
        key("name", Kind::Str, true),
        key("host", Kind::Str, true),
        key("admin_port", Kind::Int, true),
    ],
    required: true,
    array: false,
}];

const SERVER_SCHEMA: &[TableSpec] = &[
    TableSpec {
        name: "server",
        keys: &[
            key("name", Kind::Str, true),
            key("admin_port", Kind::Int, true),
            key("bus_port", Kind::Int, true),
        ],
        required: true,
        array: false,
    },
    TableSpec {
        name: "monitor",
        keys: &[
            key("auto_restart", Kind::Bool, false),
            key("ping_interval_s", Kind::Int, false),
            key("ping_timeout_s", Kind::Int, false),
            key("max_start_attempts", Kind::Int, false),
            key("start_timeout_s", Kind::Int, false),
        ],
        required: false,
        array: false,
    },
];

const BUS_SCHEMA: &[TableSpec] = &[
    TableSpec {
        name: "bus",
        keys: &[
            key("name", Kind::Str, true),
            key("allow_anonymous", Kind::Bool, false),
            key("anonymous_user", Kind::Str, false),
            key("max_message_bytes", Kind::Int, false),
            key("duplicate_window_hours", Kind::Int, false),
        ],
        required: true,
        array: false,
    },
    TableSpec {
        name: "member",
        keys: &[
            key("node", Kind::Str, true),
            key("server", Kind::Str, true),
            key("me", Kind::Str, true),
            key("uuid", Kind::Str, true),
            key("initial_state", Kind::Str, true),
            key("store_url", Kind::Str, false),
        ],
        required: false,
        array: true,
    },
    TableSpec {
        name: "destination",
        keys: &[
            key("name", Kind::Str, true),
            key("type", Kind::Str, true),
            key("me", Kind::Str, true),
            key("reliability", Kind::Str, false),
            key("default_reliability", Kind::Str, false),
            key("default_priority", Kind::Int, false),
            key("max_failed_deliveries", Kind::Int, false),
            key("exception_destination", Kind::Str, false),
        ],
        required: false,
        array: true,
    },
];

const DATASOURCE_SCHEMA: &[TableSpec] = &[TableSpec {
    name: "datasource",
    keys: &[
        key("name", Kind::Str, true),
        key("kind", Kind::Str, true),
        key("url", Kind::Str, true),
        key("pool_max", Kind::Int, false),
    ],
    required: true,
    array: false,
}];

const USER_SCHEMA: &[TableSpec] = &[
    TableSpec {
        name: "user",
        keys: &[
            key("name", Kind::Str, true),
            key("roles", Kind::StrList, false),
            key("password_hash", Kind::Str, false),
            key("scram_sha_256", Kind::Str, false),
        ],
        required: true,
        array: false,
    },
    TableSpec {
        name: "grant",
        keys: &[
            key("role", Kind::Str, true),
            key("bus", Kind::Str, true),
            key("destination", Kind::Str, false),
        ],
        required: false,
        array: true,
    },
];

const APP_SCHEMA: &[TableSpec] = &[TableSpec {
    name: "app",
    keys: &[
        key("name", Kind::Str, true),
        key("server", Kind::Str, true),
        key("bus", Kind::Str, true),
        key("on", Kind::Str, true),
        key("kind", Kind::Str, true),
        key("to", Kind::Str, false),
        key("datasource", Kind::Str, false),
        key("statement", Kind::Str, false),
        key("script", Kind::Str, false),
        key("concurrency", Kind::Int, false),
        key("timeout_s", Kind::Int, false),
    ],
    required: true,
    array: false,
}];

fn describe(v: &toml::Value) -> String {
    match v {
        toml::Value::Table(_) => "a table".into(),
        toml::Value::Array(_) => "an array".into(),
        other => other.to_string(),
    }
}

fn schema_error(file: &Path, key: String, problem: String, fix: String) -> ConfigError {
    ConfigError::Invalid {
        file: file.to_path_buf(),
        key,
        problem,
        fix: format!("{fix}, then run `keel config validate`"),
    }
}

fn check_schema(file: &Path, doc: &toml::Table, schema: &[TableSpec]) -> Result<()> {
    let known = || {
        schema
            .iter()
            .map(|t| {
                if t.array {
                    format!("[[{}]]", t.name)
                } else {
                    format!("[{}]", t.name)
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (name, value) in doc {
        let Some(spec) = schema.iter().find(|t| t.name == name) else {
            return Err(schema_error(
                file,
                name.clone(),
                format!(
                    "is not a known table or key at the top of this file (this file holds {})",
                    known()
                ),
                "remove it or correct its spelling".into(),
            ));
        };
        if spec.array {
            let tables = value.as_array().filter(|a| a.iter().all(|t| t.is_table()));
            let Some(tables) = tables else {
                return Err(schema_error(
                    file,
                    name.clone(),
                    format!(
                        "= {} is invalid: must be written as [[{name}]] tables",
                        describe(value)
                    ),
                    format!("write each entry as a [[{name}]] table"),
                ));
            };
            for (i, t) in tables.iter().enumerate() {
                let t = t.as_table().expect("checked above");
                check_keys(file, &format!("{name}[{}]", i + 1), name, t, spec.keys)?;
            }
        } else {
            let Some(t) = value.as_table() else {
                return Err(schema_error(
                    file,
                    name.clone(),
                    format!(
                        "= {} is invalid: must be a table written as [{name}]",
                        describe(value)
                    ),
                    format!("write it as a [{name}] table"),
                ));
            };
            check_keys(file, name, name, t, spec.keys)?;
        }
    }
    for spec in schema.iter().filter(|t| t.required) {
        if !doc.contains_key(spec.name) {
            let keys: Vec<&str> = spec
                .keys
                .iter()
                .filter(|k| k.required)
                .map(|k| k.name)
                .collect();
            return Err(schema_error(
                file,
                spec.name.into(),
                "is missing".into(),
                format!(
                    "add a [{}] table with the keys {}",
                    spec.name,
                    keys.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

fn check_keys(
    file: &Path,
    prefix: &str,
    table: &str,
    t: &toml::Table,
    keys: &[KeySpec],
) -> Result<()> {
    for (k, v) in t {
        let full = format!("{prefix}.{k}");
        let Some(spec) = keys.iter().find(|s| s.name == k) else {
            let names: Vec<&str> = keys.iter().map(|s| s.name).collect();
            return Err(schema_error(
                file,
                full,
                format!(
                    "is not a known key (the keys of [{table}] are {})",
                    names.join(", ")
                ),
                "remove it or correct its spelling".into(),
            ));
        };
        let ok = match spec.kind {
            Kind::Str => v.is_str(),
            Kind::Int => v.is_integer(),
            Kind::Bool => v.is_bool(),
            Kind::StrList => v
                .as_array()
                .is_some_and(|a| a.iter().all(toml::Value::is_str)),
        };
        if !ok {
            let (want, fix) = match spec.kind {
                Kind::Str => ("a string", "write the value in double quotes"),
                Kind::Int => ("a whole number", "write a number without quotes"),
                Kind::Bool => ("true or false", "write true or false without quotes"),
                Kind::StrList => ("a list of strings", "write it as [\"A\", \"B\"]"),
            };
            return Err(schema_error(
                file,
                full,
                format!("= {} is invalid: must be {want}", describe(v)),
                fix.into(),
            ));
        }
    }
    for spec in keys.iter().filter(|s| s.required) {
        if !t.contains_key(spec.name) {
            return Err(schema_error(
                file,
                format!("{prefix}.{}", spec.name),
                "is missing".into(),
                format!("add `{} = …` to the [{table}] table", spec.name),
            ));
        }
    }
    Ok(())
}

/// 1-based line and column of a byte offset, for syntax errors.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let col = before.iter().rev().take_while(|b| **b != b'\n').count() + 1;
    (line, col)
}

/// toml's messages span lines ("invalid table header\nexpected ..."); errors are one line.
pub(crate) fn one_line(msg: &str) -> String {
    msg.trim().replace('\n', "; ")
}

/// Syntax + schema + serde, giving the typed file structure.
fn parse_doc<T: serde::de::DeserializeOwned>(
    file: &Path,
    bytes: &[u8],
    schema: &[TableSpec],
) -> Result<T> {
    let text = std::str::from_utf8(bytes).map_err(|e| ConfigError::Syntax {
        file: file.to_path_buf(),
        detail: format!("byte {}: the file is not UTF-8 text", e.valid_up_to()),
    })?;
    let doc: toml::Table = toml::from_str(text).map_err(|e| {
        let at = match e.span() {
            Some(span) => {
                let (l, c) = line_col(text, span.start);
                format!("line {l}, column {c}")
            }
            None => "an unknown position".into(),
        };
        ConfigError::Syntax {
            file: file.to_path_buf(),
            detail: format!("{at}: {}", one_line(e.message())),
        }
    })?;
    check_schema(file, &doc, schema)?;
    // The schema check makes this infallible in practice; keep the error precise anyway.
    toml::Value::Table(doc)
        .try_into::<T>()
        .map_err(|e| ConfigError::Syntax {
            file: file.to_path_buf(),
            detail: format!("an unknown position: {}", one_line(e.message())),
        })
}

// --- reading -----------------------------------------------------------------------------------

/// Reads the files of a repository directory into memory. Only the places the layout defines
/// are read; dot files (the lock, temp files of an interrupted write) are skipped.
pub(crate) fn read_tree(dir: &Path) -> Result<Tree> {
    let mut tree = Tree::new();
    if !dir.join("cell.toml").is_file() {
        return Err(ConfigError::NotARepository {
            dir: dir.to_path_buf(),
        });
    }
    add_file(&mut tree, dir, Path::new("cell.toml"))?;
    for rel in list_object_files(dir)? {
        add_file(&mut tree, dir, &rel)?;
    }
    Ok(tree)
}

/// The object files (node, server, bus, data source and application files) present in `dir`, repository-relative, by
/// walking the fixed layout. Works without a cell.toml, so a writer can find stale files.
pub(crate) fn list_object_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for node in list(dir, Path::new("nodes"), true)? {
        let node_dir = Path::new("nodes").join(&node);
        if dir.join(&node_dir).join("node.toml").is_file() {
            out.push(node_dir.join("node.toml"));
        }
        for server in list(dir, &node_dir.join("servers"), false)? {
            out.push(node_dir.join("servers").join(server));
        }
        if out.len() > MAX_FILES {
            break;
        }
    }
    for top in ["buses", "datasources", "apps", "users"] {
        for f in list(dir, Path::new(top), false)? {
            out.push(Path::new(top).join(f));
        }
    }
    debug_assert!(out.iter().all(|rel| is_object_file(rel)));
    Ok(out)
}

/// Names in `dir/rel` (sorted): subdirectories when `dirs`, else `*.toml` files.
fn list(dir: &Path, rel: &Path, dirs: bool) -> Result<Vec<String>> {
    let path = dir.join(rel);
    let rd = match std::fs::read_dir(&path) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list directory", &path, FIX_PERM)(e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(io_err("list directory", &path, FIX_PERM))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let is_dir = entry
            .file_type()
            .map_err(io_err("inspect", &entry.path(), FIX_PERM))?
            .is_dir();
        if dirs && is_dir || !dirs && !is_dir && name.ends_with(".toml") {
            out.push(name);
        } else {
            tracing::warn!(path = %entry.path().display(), "ignoring unexpected entry in configuration repository");
        }
        if out.len() > MAX_FILES {
            return Err(ConfigError::Invalid {
                file: path,
                key: "(directory)".into(),
                problem: format!("holds more than {MAX_FILES} entries"),
                fix: "remove what does not belong to the configuration, then run `keel config validate`".into(),
            });
        }
    }
    out.sort();
    Ok(out)
}

fn add_file(tree: &mut Tree, dir: &Path, rel: &Path) -> Result<()> {
    let path = dir.join(rel);
    let len = std::fs::metadata(&path)
        .map_err(io_err("inspect", &path, FIX_PERM))?
        .len();
    if len > MAX_FILE_BYTES {
        return Err(ConfigError::Invalid {
            file: path,
            key: "(file)".into(),
            problem: format!(
                "is {len} bytes; configuration files are at most {MAX_FILE_BYTES} bytes"
            ),
            fix: "restore the file from a backup, then run `keel config validate`".into(),
        });
    }
    if tree.len() >= MAX_FILES {
        return Err(ConfigError::Invalid {
            file: dir.to_path_buf(),
            key: "(directory)".into(),
            problem: format!("holds more than {MAX_FILES} configuration files"),
            fix:
                "remove what does not belong to the configuration, then run `keel config validate`"
                    .into(),
        });
    }
    tree.insert(rel.to_path_buf(), read_file(&path)?);
    Ok(())
}

/// What a repository-relative path holds.
enum Kind2<'a> {
    Cell,
    Node(&'a str),
    Server(&'a str, &'a str),
    Bus(&'a str),
    DataSource(&'a str),
    App(&'a str),
    User(&'a str),
    Other,
}

fn classify(rel: &Path) -> Kind2<'_> {
    let parts: Vec<&str> = rel
        .components()
        .filter_map(|c| {
            if let Component::Normal(s) = c {
                s.to_str()
            } else {
                None
            }
        })
        .collect();
    if parts.len() != rel.components().count() {
        return Kind2::Other;
    }
    match parts.as_slice() {
        ["cell.toml"] => Kind2::Cell,
        ["nodes", n, "node.toml"] => Kind2::Node(n),
        ["nodes", n, "servers", f] => f
            .strip_suffix(".toml")
            .map_or(Kind2::Other, |s| Kind2::Server(n, s)),
        ["buses", f] => f.strip_suffix(".toml").map_or(Kind2::Other, Kind2::Bus),
        ["datasources", f] => f
            .strip_suffix(".toml")
            .map_or(Kind2::Other, Kind2::DataSource),
        ["apps", f] => f.strip_suffix(".toml").map_or(Kind2::Other, Kind2::App),
        ["users", f] => f.strip_suffix(".toml").map_or(Kind2::Other, Kind2::User),
        _ => Kind2::Other,
    }
}

/// Error paths from `Config::validate` are repository-relative; make them point at `root`.
pub(crate) fn rebase(e: ConfigError, root: &Path) -> ConfigError {
    match e {
        ConfigError::Invalid {
            file,
            key,
            problem,
            fix,
        } => ConfigError::Invalid {
            file: root.join(file),
            key,
            problem,
            fix,
        },
        ConfigError::Syntax { file, detail } => ConfigError::Syntax {
            file: root.join(file),
            detail,
        },
        other => other,
    }
}

/// A file's integer in the model's type. Whether the value is allowed is `Config::validate`'s
/// question, asked once per load; a value the type cannot even hold breaks the rule too, and
/// `rule` (the rule's `i64` form) words the error.
fn typed<T: TryFrom<i64>>(value: i64, rule: impl FnOnce(i64) -> Result<T>) -> Result<T> {
    T::try_from(value).or_else(|_| rule(value))
}

/// The name inside an object's file must be the file's (or its directory's). The naming rule
/// is `Config::validate`'s; only for a name that also differs from the file's is it asked
/// here, because a name that breaks the rule is the more useful of the two errors.
fn name_matches(
    file: &Path,
    key: &str,
    what: &str,
    inside: &str,
    outside: &str,
    place: &str,
) -> Result<()> {
    if inside != outside {
        model::check_name(file, key, what, inside)?;
        return Err(invalid(
            file,
            key,
            format!("{inside:?}"),
            &format!("the {place} is named {outside:?}"),
            &format!("make the {place} name and `{key}` the same"),
        ));
    }
    Ok(())
}

/// Parses a cell.toml on its own into (cell name, version), with all of its checks (the
/// version of a repository without loading it).
pub(crate) fn parse_cell(file: &Path, bytes: &[u8]) -> Result<(String, u64)> {
    let (name, version) = read_cell(file, bytes)?;
    model::check_cell(file, &name, version)?;
    Ok((name, version))
}

/// Reads a cell.toml into (cell name, version): syntax, keys, format; its value rules are left
/// to `Config::validate` (or `parse_cell`).
fn read_cell(file: &Path, bytes: &[u8]) -> Result<(String, u64)> {
    let c: CellFile = parse_doc(file, bytes, CELL_SCHEMA)?;
    if c.repository.format != FORMAT {
        return Err(invalid(
            file,
            "repository.format",
            c.repository.format,
            &format!("this Keel reads repository format {FORMAT} only"),
            "use the Keel version that wrote this repository, or restore a backup made by this version",
        ));
    }
    let version = typed(c.repository.version, |v| model::check_version(file, v))?;
    Ok((c.cell.name, version))
}

/// Turns the files of a repository into a validated `Config` in canonical order. `root` is
/// where the files live (a directory, or `config` inside an archive), for error messages.
/// Reads every file first (syntax, keys, types, names matching files), then validates the
/// whole once.
pub(crate) fn parse_tree(tree: &Tree, root: &Path) -> Result<Config> {
    let Some(cell_bytes) = tree.get(Path::new("cell.toml")) else {
        return Err(ConfigError::NotARepository {
            dir: root.to_path_buf(),
        });
    };
    let (cell, version) = read_cell(&root.join("cell.toml"), cell_bytes)?;
    let mut nodes: BTreeMap<String, Option<NodeCfg>> = BTreeMap::new();
    let mut servers: Vec<(String, ServerCfg)> = Vec::new();
    let mut buses = Vec::new();
    let mut datasources = Vec::new();
    let mut apps = Vec::new();
    let mut users = Vec::new();
    for (rel, bytes) in tree {
        let file = root.join(rel);
        match classify(rel) {
            Kind2::Cell => {}
            Kind2::Node(dir_name) => {
                let n: NodeFile = parse_doc(&file, bytes, NODE_SCHEMA)?;
                name_matches(
                    &file,
                    "node.name",
                    "node",
                    &n.node.name,
                    dir_name,
                    "node directory",
                )?;
                let admin_port = typed(n.node.admin_port, |v| {
                    model::check_port(&file, "node.admin_port", v)
                })?;
                nodes.insert(
                    dir_name.to_string(),
                    Some(NodeCfg {
                        name: n.node.name,
                        host: n.node.host,
                        admin_port,
                        servers: Vec::new(),
                    }),
                );
            }
            Kind2::Server(node, stem) => {
                let s: ServerFile = parse_doc(&file, bytes, SERVER_SCHEMA)?;
                name_matches(
                    &file,
                    "server.name",
                    "server",
                    &s.server.name,
                    stem,
                    "server file",
                )?;
                let m = s.monitor;
                let d = MonitorPolicy::default();
                let value = |key: &str, v: Option<i64>, dflt: u32| match v {
                    None => Ok(dflt),
                    Some(v) => typed(v, |v| model::check_monitor_value(&file, key, v)),
                };
                let monitor = MonitorPolicy {
                    auto_restart: m.auto_restart.unwrap_or(d.auto_restart),
                    ping_interval_s: value(
                        "monitor.ping_interval_s",
                        m.ping_interval_s,
                        d.ping_interval_s,
                    )?,
                    ping_timeout_s: value(
                        "monitor.ping_timeout_s",
                        m.ping_timeout_s,
                        d.ping_timeout_s,
                    )?,
                    max_start_attempts: value(
                        "monitor.max_start_attempts",
                        m.max_start_attempts,
                        d.max_start_attempts,
                    )?,
                    start_timeout_s: value(
                        "monitor.start_timeout_s",
                        m.start_timeout_s,
                        d.start_timeout_s,
                    )?,
                };
                let port = |key: &str, v: i64| typed(v, |v| model::check_port(&file, key, v));
                let admin_port = port("server.admin_port", s.server.admin_port)?;
                let bus_port = port("server.bus_port", s.server.bus_port)?;
                servers.push((
                    node.to_string(),
                    ServerCfg {
                        name: s.server.name,
                        admin_port,
                        bus_port,
                        monitor,
                    },
                ));
                nodes.entry(node.to_string()).or_insert(None);
            }
            Kind2::Bus(stem) => {
                let b: BusFile = parse_doc(&file, bytes, BUS_SCHEMA)?;
                name_matches(&file, "bus.name", "bus", &b.bus.name, stem, "bus file")?;
                let mut members = Vec::with_capacity(b.member.len());
                for (i, m) in b.member.into_iter().enumerate() {
                    let initial_state = match m.initial_state.as_str() {
                        "started" => InitialState::Started,
                        "stopped" => InitialState::Stopped,
                        other => {
                            return Err(invalid(
                                &file,
                                &format!("member[{}].initial_state", i + 1),
                                format!("{other:?}"),
                                "must be \"started\" or \"stopped\"",
                                "set it to \"started\" or \"stopped\"",
                            ))
                        }
                    };
                    members.push(BusMember {
                        node: m.node,
                        server: m.server,
                        me: m.me,
                        uuid: m.uuid,
                        initial_state,
                        store_url: m.store_url,
                    });
                }
                let mut destinations = Vec::with_capacity(b.destination.len());
                for (i, d) in b.destination.into_iter().enumerate() {
                    destinations.push(parse_destination(&file, i, d)?);
                }
                let max_message_bytes = match b.bus.max_message_bytes {
                    None => model::DEFAULT_MAX_MESSAGE_BYTES,
                    Some(v) => typed(v, |v| model::check_message_bytes(&file, v))?,
                };
                let duplicate_window_hours = match b.bus.duplicate_window_hours {
                    None => model::DEFAULT_DUPLICATE_WINDOW_HOURS,
                    Some(v) => typed(v, |v| model::check_duplicate_window(&file, v))?,
                };
                buses.push(BusCfg {
                    name: b.bus.name,
                    members,
                    destinations,
                    allow_anonymous: b.bus.allow_anonymous.unwrap_or(false),
                    anonymous_user: b.bus.anonymous_user,
                    max_message_bytes,
                    duplicate_window_hours,
                });
            }
            Kind2::DataSource(stem) => datasources.push(parse_datasource(&file, bytes, stem)?),
            Kind2::App(stem) => apps.push(parse_app(&file, bytes, stem)?),
            Kind2::User(stem) => users.push(parse_user(&file, bytes, stem)?),
            Kind2::Other => {
                tracing::warn!(file = %file.display(), "ignoring a file that is not part of the configuration layout")
            }
        }
    }
    let mut node_list = Vec::with_capacity(nodes.len());
    for (dir_name, n) in nodes {
        let Some(mut n) = n else {
            let file = root.join(paths::rel_node(&dir_name));
            return Err(ConfigError::Invalid {
                file,
                key: "node".into(),
                problem: format!("is missing: nodes/{dir_name}/ holds servers but no node.toml"),
                fix: "restore node.toml from a backup or write it with [node] name, host, admin_port, then run `keel config validate`".into(),
            });
        };
        n.servers = servers
            .iter()
            .filter(|(node, _)| *node == dir_name)
            .map(|(_, s)| s.clone())
            .collect();
        node_list.push(n);
    }
    let mut cfg = Config {
        version,
        cell: Cell { name: cell },
        nodes: node_list,
        buses,
        datasources,
        apps,
        users,
    };
    // Validate before sorting: `[[destination]]` tables are sorted by name, and an error's
    // `destination[i]` must count the tables in the order the file has them.
    cfg.validate().map_err(|e| rebase(e, root))?;
    cfg.canonicalize();
    Ok(cfg)
}

/// One `[[destination]]` table (`i` counts from 0) with its defaults filled in and its
/// enumerations checked; value rules and cross references are left to `Config::validate`.
fn parse_destination(file: &Path, i: usize, d: DestinationSection) -> Result<DestinationCfg> {
    let k = |f: &str| format!("destination[{}].{f}", i + 1);
    let kind = match d.kind.as_str() {
        "queue" => DestinationKind::Queue,
        "topic" => DestinationKind::Topic,
        other => {
            return Err(invalid(
                file,
                &k("type"),
                format!("{other:?}"),
                "must be \"queue\" or \"topic\"",
                "set it to \"queue\" or \"topic\"",
            ))
        }
    };
    let level = |key: &str, v: &str| -> Result<Reliability> {
        v.parse::<Reliability>().map_err(|_| {
            invalid(
                file,
                &k(key),
                format!("{v:?}"),
                "must be \"best_effort\", \"express\", \"reliable_persistent\" or \"assured_persistent\"",
                "set it to one of these four levels",
            )
        })
    };
    let reliability = match &d.reliability {
        None => Reliability::AssuredPersistent,
        Some(v) => level("reliability", v)?,
    };
    let default_reliability = match &d.default_reliability {
        None => DestinationCfg::default_reliability_for(reliability),
        Some(v) => level("default_reliability", v)?,
    };
    let default_priority = match d.default_priority {
        None => model::DEFAULT_PRIORITY,
        Some(v) => typed(v, |v| {
            model::check_priority(file, &k("default_priority"), v)
        })?,
    };
    let max_failed_deliveries = match d.max_failed_deliveries {
        None => model::DEFAULT_MAX_FAILED_DELIVERIES,
        Some(v) => typed(v, |v| {
            model::check_failed_deliveries(file, &k("max_failed_deliveries"), v)
        })?,
    };
    Ok(DestinationCfg {
        name: d.name,
        kind,
        me: d.me,
        reliability,
        default_reliability,
        default_priority,
        max_failed_deliveries,
        exception_destination: d.exception_destination,
    })
}

/// One `datasources/<stem>.toml`: schema, name matching the file, kind; the value rules are
/// left to `Config::validate`.
fn parse_datasource(file: &Path, bytes: &[u8], stem: &str) -> Result<DataSourceCfg> {
    let d: DataSourceFile = parse_doc(file, bytes, DATASOURCE_SCHEMA)?;
    let d = d.datasource;
    name_matches(
        file,
        "datasource.name",
        "data source",
        &d.name,
        stem,
        "data source file",
    )?;
    let Some(kind) = DataSourceKind::parse(&d.kind) else {
        return Err(invalid(
            file,
            "datasource.kind",
            format!("{:?}", d.kind),
            "must be \"postgres\" or \"mariadb\"",
            "set it to \"postgres\" (PostgreSQL) or \"mariadb\" (MariaDB or MySQL)",
        ));
    };
    let pool_max = match d.pool_max {
        None => model::DEFAULT_POOL_MAX,
        Some(v) => typed(v, |v| model::check_pool_max(file, v))?,
    };
    Ok(DataSourceCfg {
        name: d.name,
        kind,
        url: d.url,
        pool_max,
    })
}

/// One `users/<stem>.toml`: schema, name matching the file, role spellings; the value rules
/// (verifier forms, patterns) are left to `Config::validate`.
fn parse_user(file: &Path, bytes: &[u8], stem: &str) -> Result<UserCfg> {
    let u: UserFile = parse_doc(file, bytes, USER_SCHEMA)?;
    name_matches(file, "user.name", "user", &u.user.name, stem, "user file")?;
    let mut roles = Vec::with_capacity(u.user.roles.len());
    for r in &u.user.roles {
        let Some(role) = AdminRole::parse(r) else {
            return Err(invalid(
                file,
                "user.roles",
                format!("{r:?}"),
                "is not an administrative role (Administrator, Configurator, Operator, Monitor)",
                "correct its spelling, or grant bus roles in [[grant]] tables",
            ));
        };
        roles.push(role);
    }
    let mut grants = Vec::with_capacity(u.grant.len());
    for (i, g) in u.grant.into_iter().enumerate() {
        let Some(role) = BusRole::parse(&g.role) else {
            return Err(invalid(
                file,
                &format!("grant[{}].role", i + 1),
                format!("{:?}", g.role),
                "is not a bus role (connector, sender, receiver, browser)",
                "correct its spelling; administrative roles go in `user.roles`",
            ));
        };
        grants.push(BusGrant {
            role,
            bus: g.bus,
            destination: g.destination,
        });
    }
    Ok(UserCfg {
        name: u.user.name,
        password_hash: u.user.password_hash,
        scram_sha_256: u.user.scram_sha_256,
        roles,
        grants,
    })
}

/// One `apps/<stem>.toml`: schema, name matching the file, kind; the value rules and
/// references are left to `Config::validate`.
fn parse_app(file: &Path, bytes: &[u8], stem: &str) -> Result<AppCfg> {
    let a: AppFile = parse_doc(file, bytes, APP_SCHEMA)?;
    let a = a.app;
    name_matches(
        file,
        "app.name",
        "application",
        &a.name,
        stem,
        "application file",
    )?;
    let Some(kind) = AppKind::parse(&a.kind) else {
        return Err(invalid(
            file,
            "app.kind",
            format!("{:?}", a.kind),
            "must be \"forward\", \"sql\" or \"script\"",
            "set it to one of these three kinds",
        ));
    };
    let concurrency = match a.concurrency {
        None => model::DEFAULT_APP_CONCURRENCY,
        Some(v) => typed(v, |v| model::check_app_concurrency(file, v))?,
    };
    let timeout_s = match a.timeout_s {
        None => model::DEFAULT_APP_TIMEOUT_S,
        Some(v) => typed(v, |v| model::check_app_timeout(file, v))?,
    };
    Ok(AppCfg {
        name: a.name,
        server: a.server,
        bus: a.bus,
        on: a.on,
        kind,
        to: a.to,
        datasource: a.datasource,
        statement: a.statement,
        script: a.script,
        concurrency,
        timeout_s,
    })
}

/// Best-effort (cell name, version) of a repository whose other files may be broken; used by
/// restore, which must work precisely when the current configuration is damaged.
pub(crate) fn read_cell_lenient(dir: &Path) -> Option<(String, u64)> {
    let bytes = std::fs::read(dir.join("cell.toml")).ok()?;
    let doc: toml::Table = toml::from_str(std::str::from_utf8(&bytes).ok()?).ok()?;
    let name = doc.get("cell")?.get("name")?.as_str()?.to_string();
    let version = doc
        .get("repository")
        .and_then(|r| r.get("version"))
        .and_then(|v| v.as_integer())
        .unwrap_or(0);
    Some((name, u64::try_from(version).unwrap_or(0)))
}

// --- writing -----------------------------------------------------------------------------------

fn to_toml<T: Serialize>(header: &str, value: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail: no maps with non-string keys, no NaN.
    let body = toml::to_string(value).expect("config file structures always serialize");
    let mut out = String::with_capacity(header.len() + body.len());
    out.push_str(header);
    out.push_str(&body);
    out.into_bytes()
}

/// The cell.toml of `cfg`, stamped with `saved_at`.
pub(crate) fn render_cell(cfg: &Config, saved_at: &str) -> Vec<u8> {
    assert!(
        cfg.version >= 1 && cfg.version <= i64::MAX as u64,
        "version {} out of range",
        cfg.version
    );
    let header = "# Keel configuration repository: the cell and the version of this repository.\n\
                  # The version goes up by one on every change; node copies compare it to know they are behind.\n\
                  # Written by keel. After editing any file here by hand, run `keel config validate`.\n\n";
    to_toml(
        header,
        &CellFile {
            repository: RepoSection {
                format: FORMAT,
                version: cfg.version as i64,
                saved_at: Some(saved_at.to_string()),
            },
            cell: CellSection {
                name: cfg.cell.name.clone(),
            },
        },
    )
}

/// Every file except cell.toml, keyed by repository-relative path. Deterministic, so equal
/// objects render to equal bytes and `update` can tell which files changed.
pub(crate) fn render_objects(cfg: &Config) -> Tree {
    let mut out = Tree::new();
    for n in &cfg.nodes {
        let header = format!(
            "# Keel node {}: where its node agent's admin endpoint listens.\n# Servers of the node are in servers/. After a hand edit, run `keel config validate`.\n\n",
            n.name
        );
        let file = NodeFile {
            node: NodeSection {
                name: n.name.clone(),
                host: n.host.clone(),
                admin_port: i64::from(n.admin_port),
            },
        };
        out.insert(paths::rel_node(&n.name), to_toml(&header, &file));
        for s in &n.servers {
            let header = format!(
                "# Keel server {} of node {}: its admin and bus ports and how the node agent monitors it.\n# After a hand edit, run `keel config validate`.\n\n",
                s.name, n.name
            );
            let m = &s.monitor;
            let file = ServerFile {
                server: ServerSection {
                    name: s.name.clone(),
                    admin_port: i64::from(s.admin_port),
                    bus_port: i64::from(s.bus_port),
                },
                monitor: MonitorSection {
                    auto_restart: Some(m.auto_restart),
                    ping_interval_s: Some(i64::from(m.ping_interval_s)),
                    ping_timeout_s: Some(i64::from(m.ping_timeout_s)),
                    max_start_attempts: Some(i64::from(m.max_start_attempts)),
                    start_timeout_s: Some(i64::from(m.start_timeout_s)),
                },
            };
            out.insert(paths::rel_server(&n.name, &s.name), to_toml(&header, &file));
        }
    }
    for b in &cfg.buses {
        let header = format!(
            "# Keel bus {}: its members, one messaging engine (ME) each, and its destinations. An ME's uuid\n# is stamped into its data store: never change it. After a hand edit, run `keel config validate`.\n\n",
            b.name
        );
        let file = BusFile {
            bus: BusSection {
                name: b.name.clone(),
                allow_anonymous: Some(b.allow_anonymous),
                anonymous_user: b.anonymous_user.clone(),
                max_message_bytes: Some(i64::try_from(b.max_message_bytes).unwrap_or(i64::MAX)),
                duplicate_window_hours: Some(i64::from(b.duplicate_window_hours)),
            },
            member: b
                .members
                .iter()
                .map(|m| MemberSection {
                    node: m.node.clone(),
                    server: m.server.clone(),
                    me: m.me.clone(),
                    uuid: m.uuid.clone(),
                    initial_state: m.initial_state.as_str().into(),
                    store_url: m.store_url.clone(),
                })
                .collect(),
            destination: b
                .destinations
                .iter()
                .map(|d| DestinationSection {
                    name: d.name.clone(),
                    kind: d.kind.as_str().into(),
                    me: d.me.clone(),
                    reliability: Some(d.reliability.as_str().into()),
                    default_reliability: Some(d.default_reliability.as_str().into()),
                    default_priority: Some(i64::from(d.default_priority)),
                    max_failed_deliveries: Some(i64::from(d.max_failed_deliveries)),
                    exception_destination: d.exception_destination.clone(),
                })
                .collect(),
        };
        out.insert(paths::rel_bus(&b.name), to_toml(&header, &file));
    }
    for d in &cfg.datasources {
        let header = format!(
            "# Keel data source {}: an XA-capable database applications use in global transactions.\n# Its password is never in the configuration: keel keeps it in the profile, in a file only its\n# owner can read. After a hand edit, run `keel config validate`.\n\n",
            d.name
        );
        let file = DataSourceFile {
            datasource: DataSourceSection {
                name: d.name.clone(),
                kind: d.kind.as_str().into(),
                url: d.url.clone(),
                pool_max: Some(i64::from(d.pool_max)),
            },
        };
        out.insert(paths::rel_datasource(&d.name), to_toml(&header, &file));
    }
    for a in &cfg.apps {
        let header = format!(
            "# Keel application {}: a message-driven handler on server {}; each message runs in one global\n# transaction. Servers read their applications when they start. After a hand edit, run\n# `keel config validate`.\n\n",
            a.name, a.server
        );
        let file = AppFile {
            app: AppSection {
                name: a.name.clone(),
                server: a.server.clone(),
                bus: a.bus.clone(),
                on: a.on.clone(),
                kind: a.kind.as_str().into(),
                to: a.to.clone(),
                datasource: a.datasource.clone(),
                concurrency: Some(i64::from(a.concurrency)),
                timeout_s: Some(i64::from(a.timeout_s)),
                statement: a.statement.clone(),
                script: a.script.clone(),
            },
        };
        out.insert(paths::rel_app(&a.name), to_toml(&header, &file));
    }
    for u in &cfg.users {
        let header = format!(
            "# Keel user {}: its administrative roles and bus grants. The password itself is never kept:\n# only an Argon2id hash and a SCRAM-SHA-256 verifier. Change them with `keel user passwd`.\n\n",
            u.name
        );
        let file = UserFile {
            user: UserSection {
                name: u.name.clone(),
                roles: u.roles.iter().map(|r| r.as_str().to_string()).collect(),
                password_hash: u.password_hash.clone(),
                scram_sha_256: u.scram_sha_256.clone(),
            },
            grant: u
                .grants
                .iter()
                .map(|g| GrantSection {
                    role: g.role.as_str().into(),
                    bus: g.bus.clone(),
                    destination: g.destination.clone(),
                })
                .collect(),
        };
        out.insert(paths::rel_user(&u.name), to_toml(&header, &file));
    }
    out
}

/// Whether a repository-relative path is one of the object files `render_objects` produces.
pub(crate) fn is_object_file(rel: &Path) -> bool {
    matches!(
        classify(rel),
        Kind2::Node(_)
            | Kind2::Server(..)
            | Kind2::Bus(_)
            | Kind2::DataSource(_)
            | Kind2::App(_)
            | Kind2::User(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::sample;

    fn tree_of(cfg: &Config) -> Tree {
        let mut t = render_objects(cfg);
        t.insert("cell.toml".into(), render_cell(cfg, "2025-01-01T00:00:00Z"));
        t
    }

    fn err_of(t: &Tree) -> ConfigError {
        parse_tree(t, Path::new("config")).expect_err("must fail")
    }

    fn server_file() -> PathBuf {
        paths::rel_server("node01", "server1")
    }

    fn edit(t: &mut Tree, rel: &Path, from: &str, to: &str) {
        let text = String::from_utf8(t[rel].clone()).expect("utf8");
        assert!(text.contains(from), "{from} not in {text}");
        t.insert(rel.to_path_buf(), text.replacen(from, to, 1).into_bytes());
    }

    #[test]
    fn rendered_files_parse_back_equal_and_carry_a_header() {
        let c = sample();
        let t = tree_of(&c);
        assert_eq!(parse_tree(&t, Path::new("config")).expect("parse"), c);
        for (rel, bytes) in &t {
            let text = std::str::from_utf8(bytes).expect("utf8");
            assert!(text.starts_with("# Keel"), "{}", rel.display());
            assert!(text.contains("keel config validate"), "{}", rel.display());
        }
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let mut t = tree_of(&sample());
        edit(
            &mut t,
            &server_file(),
            "bus_port = 7272",
            "bus_port = = 7272",
        );
        match err_of(&t) {
            ConfigError::Syntax { file, detail } => {
                assert_eq!(file, Path::new("config/nodes/node01/servers/server1.toml"));
                assert!(detail.starts_with("line 7, column"), "{detail}");
                assert!(!detail.contains('\n'), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_missing_and_mistyped_keys_are_named() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "ping_interval_s = 2",
                "pingg_interval_s = 2",
                "monitor.pingg_interval_s",
            ),
            ("[monitor]", "[monitr]", "monitr"),
            ("bus_port = 7272", "bus_port = \"7272\"", "server.bus_port"),
            ("bus_port = 7272", "", "server.bus_port"),
            (
                "auto_restart = true",
                "auto_restart = 1",
                "monitor.auto_restart",
            ),
            ("admin_port = 7271", "admin_port = 0", "server.admin_port"),
            (
                "admin_port = 7271",
                "admin_port = 70000",
                "server.admin_port",
            ),
            ("name = \"server1\"", "name = \"server2\"", "server.name"),
        ];
        for (from, to, want) in cases {
            let mut t = tree_of(&sample());
            edit(&mut t, &server_file(), from, to);
            match err_of(&t) {
                ConfigError::Invalid { file, key, .. } => {
                    assert_eq!(&key, want, "{from} -> {to}");
                    assert_eq!(file, Path::new("config/nodes/node01/servers/server1.toml"));
                }
                other => panic!("{from} -> {to}: {other:?}"),
            }
        }
    }

    #[test]
    fn bus_and_cell_rules() {
        let bus = paths::rel_bus("bus1");
        let mut t = tree_of(&sample());
        edit(
            &mut t,
            &bus,
            "initial_state = \"started\"",
            "initial_state = \"running\"",
        );
        assert!(
            matches!(err_of(&t), ConfigError::Invalid { key, .. } if key == "member[1].initial_state")
        );

        let mut t = tree_of(&sample());
        edit(&mut t, &bus, "[[member]]", "[member]");
        assert!(matches!(err_of(&t), ConfigError::Invalid { key, .. } if key == "member"));

        let mut t = tree_of(&sample());
        edit(&mut t, Path::new("cell.toml"), "format = 1", "format = 2");
        assert!(
            matches!(err_of(&t), ConfigError::Invalid { key, .. } if key == "repository.format")
        );

        let mut t = tree_of(&sample());
        edit(&mut t, Path::new("cell.toml"), "version = 1", "version = 0");
        assert!(
            matches!(err_of(&t), ConfigError::Invalid { key, .. } if key == "repository.version")
        );

        let mut t = tree_of(&sample());
        t.remove(&paths::rel_node("node01"));
        assert!(matches!(err_of(&t), ConfigError::Invalid { key, .. } if key == "node"));

        let mut t = tree_of(&sample());
        t.remove(Path::new("cell.toml"));
        assert!(matches!(err_of(&t), ConfigError::NotARepository { .. }));

        let mut t = tree_of(&sample());
        t.insert(server_file(), vec![0xff, 0xfe]);
        assert!(matches!(err_of(&t), ConfigError::Syntax { .. }));
    }

    #[test]
    fn monitor_keys_may_be_omitted() {
        let mut t = tree_of(&sample());
        let text = "[server]\nname = \"server1\"\nadmin_port = 7271\nbus_port = 7272\n";
        t.insert(server_file(), text.as_bytes().to_vec());
        let c = parse_tree(&t, Path::new("config")).expect("parse");
        assert_eq!(c.nodes[0].servers[0].monitor, MonitorPolicy::default());
    }

    fn bus_file() -> PathBuf {
        paths::rel_bus("bus1")
    }

    #[test]
    fn destinations_and_bus_keys_round_trip_and_are_all_written() {
        let c = crate::model::tests::sample_with_destinations();
        let t = tree_of(&c);
        assert_eq!(parse_tree(&t, Path::new("config")).expect("parse"), c);
        let text = std::str::from_utf8(&t[&bus_file()]).expect("utf8");
        for k in [
            "[[destination]]",
            "\nname = ",
            "\ntype = ",
            "\nme = ",
            "\nreliability = ",
            "\ndefault_reliability = ",
            "\ndefault_priority = ",
            "\nmax_failed_deliveries = ",
        ] {
            assert_eq!(
                text.matches(k).count(),
                if k == "\nname = " {
                    4
                } else if k == "\nme = " {
                    5
                } else {
                    3
                },
                "{k} in {text}"
            );
        }
        assert_eq!(
            text.matches("exception_destination = \"orders.dead\"")
                .count(),
            1
        );
        assert!(
            text.contains("allow_anonymous = true\nmax_message_bytes = 4096\n"),
            "{text}"
        );
        // Defaults are written out too.
        let t = tree_of(&sample());
        let text = std::str::from_utf8(&t[&bus_file()]).expect("utf8");
        assert!(
            text.contains("allow_anonymous = false\nmax_message_bytes = 1048576\n"),
            "{text}"
        );
        assert!(!text.contains("[[destination]]"), "{text}");
    }

    #[test]
    fn old_style_bus_file_and_short_destination_tables_load_with_defaults() {
        let c = sample();
        let m = &c.buses[0].members[0];
        let old = format!(
            "[bus]\nname = \"bus1\"\n\n[[member]]\nnode = \"node01\"\nserver = \"server1\"\nme = \"{}\"\nuuid = \"{}\"\ninitial_state = \"started\"\n",
            m.me, m.uuid
        );
        let mut t = tree_of(&c);
        t.insert(bus_file(), old.clone().into_bytes());
        let loaded = parse_tree(&t, Path::new("config")).expect("old file loads");
        assert_eq!(loaded, c);
        let b = &loaded.buses[0];
        assert!(!b.allow_anonymous && b.destinations.is_empty());
        assert_eq!(b.max_message_bytes, 1_048_576);

        let short = format!(
            "{old}\n[[destination]]\nname = \"q\"\ntype = \"queue\"\nme = \"{me}\"\n\n[[destination]]\nname = \"t\"\ntype = \"topic\"\nme = \"{me}\"\nreliability = \"best_effort\"\n",
            me = m.me
        );
        t.insert(bus_file(), short.into_bytes());
        let loaded = parse_tree(&t, Path::new("config")).expect("short tables load");
        let d = &loaded.buses[0].destinations;
        assert_eq!(
            d[0],
            DestinationCfg::new("q", DestinationKind::Queue, &m.me)
        );
        assert_eq!(
            (d[1].kind, d[1].reliability, d[1].default_reliability),
            (
                DestinationKind::Topic,
                Reliability::BestEffort,
                Reliability::BestEffort
            )
        );
    }

    #[test]
    fn destination_and_bus_key_errors_are_named() {
        // In the file: [[destination]] orders, orders.dead, prices.
        let cases: &[(&str, &str, &str)] = &[
            (
                "default_priority = 4",
                "default_priority = \"4\"",
                "destination[2].default_priority",
            ),
            (
                "reliability = \"express\"",
                "reliability = \"fast\"",
                "destination[3].reliability",
            ),
            (
                "default_reliability = \"express\"",
                "default_reliability = \"slow\"",
                "destination[3].default_reliability",
            ),
            (
                "default_reliability = \"express\"",
                "default_reliability = \"assured_persistent\"",
                "destination[3].default_reliability",
            ),
            (
                "max_failed_deliveries = 3",
                "max_failed_delivery = 3",
                "destination[1].max_failed_delivery",
            ),
            (
                "max_failed_deliveries = 3",
                "max_failed_deliveries = 0",
                "destination[1].max_failed_deliveries",
            ),
            (
                "max_failed_deliveries = 3",
                "max_failed_deliveries = 1001",
                "destination[1].max_failed_deliveries",
            ),
            (
                "default_priority = 7",
                "default_priority = -1",
                "destination[1].default_priority",
            ),
            (
                "default_priority = 7",
                "default_priority = 10",
                "destination[1].default_priority",
            ),
            ("type = \"topic\"\n", "", "destination[3].type"),
            (
                "type = \"topic\"",
                "type = \"topics\"",
                "destination[3].type",
            ),
            ("type = \"topic\"", "type = 1", "destination[3].type"),
            (
                "name = \"prices\"",
                "name = \"_SYSTEM.prices\"",
                "destination[3].name",
            ),
            (
                "name = \"prices\"",
                "name = \"orders\"",
                "destination[3].name",
            ),
            (
                "me = \"node01.server2-bus1\"\nreliability = \"express\"",
                "me = \"node01.server3-bus1\"\nreliability = \"express\"",
                "destination[3].me",
            ),
            (
                "exception_destination = \"orders.dead\"",
                "exception_destination = \"ghost\"",
                "destination[1].exception_destination",
            ),
            (
                "exception_destination = \"orders.dead\"",
                "exception_destination = 7",
                "destination[1].exception_destination",
            ),
            (
                "allow_anonymous = true",
                "allow_anonymous = \"yes\"",
                "bus.allow_anonymous",
            ),
            (
                "max_message_bytes = 4096",
                "max_message_bytes = 100",
                "bus.max_message_bytes",
            ),
            (
                "max_message_bytes = 4096",
                "max_message_bytes = 268435457",
                "bus.max_message_bytes",
            ),
            (
                "max_message_bytes = 4096",
                "max_message_byte = 4096",
                "bus.max_message_byte",
            ),
            ("[[destination]]", "[[destinations]]", "destinations"),
        ];
        for (from, to, want) in cases {
            let mut t = tree_of(&crate::model::tests::sample_with_destinations());
            edit(&mut t, &bus_file(), from, to);
            match err_of(&t) {
                ConfigError::Invalid { file, key, .. } => {
                    assert_eq!(&key, want, "{from} -> {to}");
                    assert_eq!(file, Path::new("config/buses/bus1.toml"));
                }
                other => panic!("{from} -> {to}: {other:?}"),
            }
        }
    }

    #[test]
    fn destination_errors_count_tables_in_file_order() {
        let c = crate::model::tests::sample_with_destinations();
        let mut t = tree_of(&c);
        let text = String::from_utf8(t[&bus_file()].clone()).expect("utf8");
        let parts: Vec<&str> = text.split("[[destination]]").collect();
        assert_eq!(parts.len(), 4);
        let (head, orders, dead, prices) = (parts[0], parts[1], parts[2], parts[3]);
        // Write prices first: the loaded config is still in name order.
        let reordered = format!(
            "{head}[[destination]]{prices}\n[[destination]]{orders}[[destination]]{}\n",
            dead.trim_end()
        );
        t.insert(bus_file(), reordered.into_bytes());
        assert_eq!(parse_tree(&t, Path::new("config")).expect("parse"), c);
        // An error in the first table of the file is destination[1], whatever its name.
        edit(
            &mut t,
            &bus_file(),
            "me = \"node01.server2-bus1\"\nreliability = \"express\"",
            "me = \"nowhere\"\nreliability = \"express\"",
        );
        assert!(
            matches!(err_of(&t), ConfigError::Invalid { key, .. } if key == "destination[1].me")
        );
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }

    #[test]
    fn member_store_urls_are_postgres_and_hold_no_password() {
        let bus = paths::rel_bus("bus1");
        let good =
            "initial_state = \"started\"\nstore_url = \"postgresql://keel@127.0.0.1:5432/keel\"";
        let mut t = tree_of(&sample());
        edit(&mut t, &bus, "initial_state = \"started\"", good);
        let cfg = parse_tree(&t, Path::new("/r")).unwrap();
        assert_eq!(
            cfg.buses[0].members[0].store_url.as_deref(),
            Some("postgresql://keel@127.0.0.1:5432/keel")
        );
        for bad in ["mysql://x@h/db", "postgresql://keel:secret@127.0.0.1/keel"] {
            let mut t = tree_of(&sample());
            edit(
                &mut t,
                &bus,
                "initial_state = \"started\"",
                &format!("initial_state = \"started\"\nstore_url = \"{bad}\""),
            );
            let e = err_of(&t);
            assert!(
                matches!(&e, ConfigError::Invalid { key, .. } if key == "member[1].store_url"),
                "{e}"
            );
            assert!(
                !e.to_string().contains("secret"),
                "the password never reaches an error: {e}"
            );
        }
    }

    #[test]
    fn datasources_and_apps_round_trip_with_a_header() {
        let c = crate::model::tests::sample_with_apps();
        let t = tree_of(&c);
        assert_eq!(parse_tree(&t, Path::new("config")).expect("parse"), c);
        let ds = std::str::from_utf8(&t[Path::new("datasources/pg1.toml")]).expect("utf8");
        assert!(ds.starts_with("# Keel data source pg1"), "{ds}");
        assert!(!ds.contains("secret"), "{ds}");
        for k in [
            "[datasource]",
            "name = \"pg1\"",
            "kind = \"postgres\"",
            "url = \"postgresql://keel@127.0.0.1:5432/db\"",
            "pool_max = 16",
        ] {
            assert!(ds.contains(k), "{k} in {ds}");
        }
        for (name, keys) in [
            (
                "fwd",
                &["kind = \"forward\"", "to = \"out\"", "concurrency = 4"][..],
            ),
            (
                "sq",
                &["kind = \"sql\"", "datasource = \"pg1\"", "statement = "][..],
            ),
            ("sc", &["kind = \"script\"", "script = "][..]),
        ] {
            let rel = PathBuf::from(format!("apps/{name}.toml"));
            let text = std::str::from_utf8(&t[&rel]).expect("utf8");
            assert!(
                text.starts_with(&format!("# Keel application {name}")),
                "{text}"
            );
            assert!(text.contains("keel config validate"), "{text}");
            for k in [
                "[app]",
                "server = \"server1\"",
                "bus = \"bus1\"",
                "on = \"in\"",
            ]
            .iter()
            .chain(keys)
            {
                assert!(text.contains(k), "{k} in {text}");
            }
        }
        // The script comes back byte for byte, and a hand-written multi-line literal loads too.
        let loaded = parse_tree(&t, Path::new("config")).expect("parse");
        assert_eq!(
            loaded.app("sc").and_then(|a| a.script.as_deref()),
            Some(crate::model::tests::TRICKY_SCRIPT)
        );
        let mut t2 = t.clone();
        let hand = "[app]\nname = \"sc\"\nserver = \"server1\"\nbus = \"bus1\"\non = \"in\"\nkind = \"script\"\nscript = '''\nfn on_message(msg) {\n    send(\"out\", \"a\\b\");\n}\n'''\n";
        t2.insert(PathBuf::from("apps/sc.toml"), hand.as_bytes().to_vec());
        let loaded = parse_tree(&t2, Path::new("config")).expect("hand-written");
        let a = loaded.app("sc").expect("sc");
        assert_eq!(
            a.script.as_deref(),
            Some("fn on_message(msg) {\n    send(\"out\", \"a\\b\");\n}\n")
        );
        assert_eq!(a.concurrency, 4, "concurrency defaults");
        assert!(is_object_file(Path::new("apps/sc.toml")));
        assert!(is_object_file(Path::new("datasources/pg1.toml")));
        assert!(!is_object_file(Path::new("apps/sc.txt")));
    }

    #[test]
    fn datasource_and_app_key_errors_are_named() {
        let ds = PathBuf::from("datasources/pg1.toml");
        let fwd = PathBuf::from("apps/fwd.toml");
        let sc = PathBuf::from("apps/sc.toml");
        let cases: &[(&PathBuf, &str, &str, &str)] = &[
            (
                &ds,
                "pool_max = 16",
                "pool_max = 16\npasword = \"x\"",
                "datasource.pasword",
            ),
            (&ds, "[datasource]", "[datasourc]", "datasourc"),
            (&ds, "kind = \"postgres\"\n", "", "datasource.kind"),
            (
                &ds,
                "kind = \"postgres\"",
                "kind = \"oracle\"",
                "datasource.kind",
            ),
            (
                &ds,
                "pool_max = 16",
                "pool_max = \"16\"",
                "datasource.pool_max",
            ),
            (&ds, "pool_max = 16", "pool_max = 0", "datasource.pool_max"),
            (&ds, "name = \"pg1\"", "name = \"pg2\"", "datasource.name"),
            (&ds, "@127.0.0.1", ":secret@127.0.0.1", "datasource.url"),
            (&ds, "postgresql://", "mysql://", "datasource.url"),
            (
                &fwd,
                "to = \"out\"",
                "to = \"out\"\nscirpt = \"x\"",
                "app.scirpt",
            ),
            (&fwd, "to = \"out\"", "", "app.to"),
            (&fwd, "on = \"in\"\n", "", "app.on"),
            (&fwd, "kind = \"forward\"", "kind = \"relay\"", "app.kind"),
            (
                &fwd,
                "concurrency = 4",
                "concurrency = 65",
                "app.concurrency",
            ),
            (
                &fwd,
                "concurrency = 4",
                "concurrency = true",
                "app.concurrency",
            ),
            (&fwd, "name = \"fwd\"", "name = \"fwd2\"", "app.name"),
            (
                &fwd,
                "server = \"server1\"",
                "server = \"server2\"",
                "app.on",
            ),
            (&sc, "kind = \"script\"", "kind = \"sql\"", "app.datasource"),
        ];
        for (rel, from, to, want) in cases {
            let mut t = tree_of(&crate::model::tests::sample_with_apps());
            edit(&mut t, rel, from, to);
            let e = err_of(&t);
            assert!(!e.to_string().contains("secret@"), "{e}");
            match e {
                ConfigError::Invalid { file, key, .. } => {
                    assert_eq!(&key, want, "{from} -> {to}");
                    assert_eq!(file, Path::new("config").join(rel));
                }
                other => panic!("{from} -> {to}: {other:?}"),
            }
        }
    }

    /// Loading reads values into the model's types and leaves their rules to
    /// `Config::validate`, except a value the type cannot hold, whose error the same rule words:
    /// both read exactly as they always have.
    #[test]
    fn value_errors_read_the_same_whether_or_not_the_value_fits_its_type() {
        let then = ", then run `keel config validate`";
        let ports = "must be between 1024 and 65535; fix: set it to a free port between 1024 and 65535 that no other node agent or server of the cell uses";
        let seconds =
            "must be between 1 and 3600; fix: set it to a number of seconds between 1 and 3600";
        let prio = "must be between 0 and 9; fix: set it to a priority between 0 and 9";
        let pool =
            "must be between 1 and 256; fix: set it to a number of connections between 1 and 256";
        let server = "config/nodes/node01/servers/server1.toml";
        let cases: &[(&str, &str, &str, String)] = &[
            ("cell.toml", "version = 1", "version = 0", format!("config/cell.toml: key `repository.version` = 0 is invalid: must be 1 or more; fix: restore the repository from a backup (`keel config restore FILE`), or set the version of the master above every node copy's{then}")),
            ("cell.toml", "version = 1", "version = -3", format!("config/cell.toml: key `repository.version` = -3 is invalid: must be 1 or more; fix: restore the repository from a backup (`keel config restore FILE`), or set the version of the master above every node copy's{then}")),
            ("nodes/node01/servers/server1.toml", "admin_port = 7271", "admin_port = 80", format!("{server}: key `server.admin_port` = 80 is invalid: {ports}{then}")),
            ("nodes/node01/servers/server1.toml", "admin_port = 7271", "admin_port = 70000", format!("{server}: key `server.admin_port` = 70000 is invalid: {ports}{then}")),
            ("nodes/node01/servers/server1.toml", "ping_interval_s = 2", "ping_interval_s = 3601", format!("{server}: key `monitor.ping_interval_s` = 3601 is invalid: {seconds}{then}")),
            ("nodes/node01/servers/server1.toml", "ping_interval_s = 2", "ping_interval_s = -1", format!("{server}: key `monitor.ping_interval_s` = -1 is invalid: {seconds}{then}")),
            ("nodes/node01/node.toml", "admin_port = 7270", "admin_port = -7270", format!("config/nodes/node01/node.toml: key `node.admin_port` = -7270 is invalid: {ports}{then}")),
            ("buses/bus1.toml", "default_priority = 7", "default_priority = 10", format!("config/buses/bus1.toml: key `destination[1].default_priority` = 10 is invalid: {prio}{then}")),
            ("buses/bus1.toml", "default_priority = 7", "default_priority = 256", format!("config/buses/bus1.toml: key `destination[1].default_priority` = 256 is invalid: {prio}{then}")),
            ("buses/bus1.toml", "max_message_bytes = 4096", "max_message_bytes = -1", format!("config/buses/bus1.toml: key `bus.max_message_bytes` = -1 is invalid: must be between 1024 and 268435456; fix: set it to a number of bytes between 1024 and 268435456{then}")),
            ("datasources/pg1.toml", "pool_max = 16", "pool_max = 257", format!("config/datasources/pg1.toml: key `datasource.pool_max` = 257 is invalid: {pool}{then}")),
            ("datasources/pg1.toml", "pool_max = 16", "pool_max = 4294967297", format!("config/datasources/pg1.toml: key `datasource.pool_max` = 4294967297 is invalid: {pool}{then}")),
            ("apps/fwd.toml", "concurrency = 4", "concurrency = -4", format!("config/apps/fwd.toml: key `app.concurrency` = -4 is invalid: must be between 1 and 64; fix: set it to a number of messages handled at once between 1 and 64{then}")),
            ("nodes/node01/servers/server1.toml", "name = \"server1\"", "name = \"server 1\"", format!("{server}: key `server.name` = \"server 1\" is invalid: a server name must be 1 to 64 letters, digits, `_`, `.` or `-`, starting with a letter or digit (it contains ' '); fix: rename the server (file or directory name and `server.name` must match){then}")),
        ];
        for (rel, from, to, want) in cases {
            let mut t = tree_of(&if rel.starts_with("buses") {
                crate::model::tests::sample_with_destinations()
            } else {
                crate::model::tests::sample_with_apps()
            });
            edit(&mut t, Path::new(rel), from, to);
            assert_eq!(&err_of(&t).to_string(), want, "{rel}: {from} -> {to}");
        }
    }
}
