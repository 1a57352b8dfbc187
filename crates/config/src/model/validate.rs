//! The rules that make a configuration valid, each in one place. `Config::validate` runs them
//! all, once per load (`files::parse_tree` only reads: syntax, keys, types, file names) and
//! before every save; edits run the ones for the object they add, for an early precise error.
//!
//! A value rule that a file's integer may break before it even fits the model's type (a port of
//! 70000 in a `u16`) has an `i64` form returning the typed value; loading calls it only for
//! such a value, to word the error, and leaves every other value to `Config::validate`.
//!
//! Rules across objects: server names are unique in the cell (they name processes, pid files
//! and log directories; `nodeagent` is reserved), and so are ports and ME UUIDs. An
//! application's queue and its forward target are on one engine, so its transaction stays
//! there. A server, member, destination or data source that an application needs cannot be
//! removed (removing it fails validation). Every error names the file, the key and the fix; a
//! script or statement is named by its size, never by its text.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Display;
use std::path::{Path, PathBuf};

use crate::error::{ConfigError, Result};
use crate::paths::{rel_app, rel_bus, rel_cell, rel_datasource, rel_node, rel_server, rel_user};

use super::types::*;
use super::url::{store_url_has_password, url_has_password};

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
    check_priority(
        file,
        &key("default_priority"),
        i64::from(d.default_priority),
    )?;
    check_failed_deliveries(
        file,
        &key("max_failed_deliveries"),
        i64::from(d.max_failed_deliveries),
    )?;
    Ok(())
}

/// A destination's `default_priority`: 0 to [`MAX_PRIORITY`].
pub(crate) fn check_priority(file: &Path, key: &str, value: i64) -> Result<u8> {
    check_range(file, key, value, 0, u32::from(MAX_PRIORITY), "priority").map(|p| p as u8)
}

/// A destination's `max_failed_deliveries`: 1 to [`MAX_FAILED_DELIVERIES`].
pub(crate) fn check_failed_deliveries(file: &Path, key: &str, value: i64) -> Result<u32> {
    check_range(
        file,
        key,
        value,
        1,
        MAX_FAILED_DELIVERIES,
        "number of deliveries",
    )
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

/// The rules of cell.toml: the version (1 or more, and a TOML integer) and the cell's name.
pub(crate) fn check_cell(file: &Path, name: &str, version: u64) -> Result<()> {
    match i64::try_from(version) {
        Ok(v) => {
            check_version(file, v)?;
        }
        // TOML integers are signed 64-bit: a bigger version could not be written.
        Err(_) => {
            return Err(invalid(
                file,
                "repository.version",
                version,
                &format!("must be at most {}", i64::MAX),
                "restore the repository from a backup",
            ))
        }
    }
    check_name(file, "cell.name", "cell", name)
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
    for (key, value) in [
        ("monitor.ping_interval_s", m.ping_interval_s),
        ("monitor.ping_timeout_s", m.ping_timeout_s),
        ("monitor.max_start_attempts", m.max_start_attempts),
        ("monitor.start_timeout_s", m.start_timeout_s),
    ] {
        check_monitor_value(file, key, i64::from(value))?;
    }
    Ok(())
}

/// One value of the monitor policy (`key` as in the server file): 1 to 100 start attempts, or
/// 1 to 3600 seconds.
pub(crate) fn check_monitor_value(file: &Path, key: &str, value: i64) -> Result<u32> {
    if key == "monitor.max_start_attempts" {
        check_range(file, key, value, 1, 100, "number of attempts")
    } else {
        check_range(file, key, value, 1, 3600, "number of seconds")
    }
}

/// One user: its name, the forms of its verifiers (never checked against a password here),
/// its grants (bus name, pattern, connector without a destination, the others with one).
/// Keys as in `users/<name>.toml`.
pub(crate) fn check_user(file: &Path, u: &UserCfg) -> Result<()> {
    check_name(file, "user.name", "user", &u.name)?;
    for (key, value, prefix, how) in [
        (
            "user.password_hash",
            &u.password_hash,
            "$argon2id$",
            "an Argon2id PHC string",
        ),
        (
            "user.scram_sha_256",
            &u.scram_sha_256,
            "SCRAM-SHA-256$",
            "a SCRAM-SHA-256 verifier",
        ),
    ] {
        if let Some(v) = value {
            if !v.starts_with(prefix)
                || v.len() > MAX_VERIFIER_LEN
                || v.contains(char::is_whitespace)
            {
                return Err(invalid(
                    file,
                    key,
                    "(not shown)",
                    &format!("must be {how} starting with `{prefix}`, at most {MAX_VERIFIER_LEN} bytes; a password is never written here"),
                    &format!("set the password with `keel user passwd {}`", u.name),
                ));
            }
        }
    }
    if u.grants.len() > MAX_GRANTS {
        return Err(invalid(
            file,
            "grant",
            format!("{} tables", u.grants.len()),
            &format!("a user holds at most {MAX_GRANTS} bus grants"),
            "grant patterns (`orders.*`) instead of one grant per destination",
        ));
    }
    for (i, g) in u.grants.iter().enumerate() {
        let at = |k: &str| format!("grant[{}].{k}", i + 1);
        check_name(file, &at("bus"), "bus", &g.bus)?;
        match (&g.destination, g.role.per_destination()) {
            (Some(d), false) => {
                return Err(invalid(
                    file,
                    &at("destination"),
                    format!("{d:?}"),
                    "the connector role is granted per bus, not per destination",
                    "remove `destination` from this grant",
                ))
            }
            (None, true) => {
                return Err(missing(
                    file,
                    &at("destination"),
                    &format!("the {} role is granted per destination", g.role),
                    "add `destination = \"NAME\"`, a prefix such as \"orders.*\", or \"*\" for every destination",
                ))
            }
            (Some(d), true) => {
                if let Some(p) = keel_core::roles::pattern_problem(d) {
                    return Err(invalid(file, &at("destination"), format!("{d:?}"), &p, "correct the pattern"));
                }
            }
            (None, false) => {}
        }
    }
    Ok(())
}

/// The rules of one data source that need no other object: name, URL (scheme of its kind, no
/// password), pool size. Keys as in `datasources/<name>.toml`.
pub(crate) fn check_datasource(file: &Path, d: &DataSourceCfg) -> Result<()> {
    check_name(file, "datasource.name", "data source", &d.name)?;
    check_datasource_url(file, d.kind, &d.url)?;
    check_pool_max(file, i64::from(d.pool_max))?;
    Ok(())
}

/// A data source's `pool_max`: 1 to [`MAX_POOL_MAX`].
pub(crate) fn check_pool_max(file: &Path, value: i64) -> Result<u32> {
    check_range(
        file,
        "datasource.pool_max",
        value,
        1,
        MAX_POOL_MAX,
        "number of connections",
    )
}

/// An application's `concurrency`: 1 to [`MAX_APP_CONCURRENCY`].
pub(crate) fn check_app_concurrency(file: &Path, value: i64) -> Result<u32> {
    check_range(
        file,
        "app.concurrency",
        value,
        1,
        MAX_APP_CONCURRENCY,
        "number of messages handled at once",
    )
}

/// An application's `timeout_s`: 1 to [`MAX_APP_TIMEOUT_S`].
pub(crate) fn check_app_timeout(file: &Path, value: i64) -> Result<u32> {
    check_range(
        file,
        "app.timeout_s",
        value,
        1,
        MAX_APP_TIMEOUT_S,
        "number of seconds",
    )
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

impl Config {
    /// Every rule of one application that spans objects. Keys as in `apps/<name>.toml`.
    pub(crate) fn check_app(&self, file: &Path, a: &AppCfg) -> Result<()> {
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
        check_app_concurrency(file, i64::from(a.concurrency))?;
        check_app_timeout(file, i64::from(a.timeout_s))?;
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

    /// Checks every rule that spans fields or files. Errors name the file relative to the
    /// repository directory (`nodes/node01/servers/server1.toml`) and the key.
    pub fn validate(&self) -> Result<()> {
        let cell = rel_cell();
        check_cell(&cell, &self.cell.name, self.version)?;
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
                    if store_url_has_password(rest) {
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
        let mut user_names = HashSet::new();
        for u in &self.users {
            let uf = rel_user(&u.name);
            check_user(&uf, u)?;
            if !user_names.insert(u.name.as_str()) {
                return Err(invalid(
                    &uf,
                    "user.name",
                    format!("{:?}", u.name),
                    "another user has the same name",
                    "give each user its own name",
                ));
            }
        }
        for b in &self.buses {
            if let Some(anon) = &b.anonymous_user {
                let bf = rel_bus(&b.name);
                check_name(&bf, "bus.anonymous_user", "user", anon)?;
                if !self.users.is_empty() && !user_names.contains(anon.as_str()) {
                    return Err(invalid(
                        &bf,
                        "bus.anonymous_user",
                        format!("{anon:?}"),
                        "names no user of the cell",
                        &format!("add the user with `keel user add {anon} --no-password`, then grant it the bus roles anonymous clients need"),
                    ));
                }
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
