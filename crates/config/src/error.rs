//! One error type for the whole crate. Every variant is written for an operator reading it on a
//! terminal: it says what failed, on which file or object, and what to do next. Callers print it
//! with `Display` as one sentence; they never need to add context.

use std::path::PathBuf;

/// Everything that can go wrong while reading, changing, backing up or restoring configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The cell's certificates (keel-tls says which file and what to do).
    #[error(transparent)]
    Tls(#[from] keel_tls::TlsError),
    /// A value in a configuration file breaks a rule. `key` is the TOML path inside `file`
    /// (`monitor.ping_interval_s`, `member[2].uuid`, counting `[[member]]` tables from 1).
    #[error("{}: key `{key}` {problem}; fix: {fix}", file.display())]
    Invalid {
        file: PathBuf,
        key: String,
        problem: String,
        fix: String,
    },

    /// A configuration file is not valid TOML; `detail` carries the line and column.
    #[error("{}: TOML syntax error at {detail}; fix: correct the file, then run `keel config validate`", file.display())]
    Syntax { file: PathBuf, detail: String },

    /// An operating-system call failed on `path`.
    #[error("could not {action} {}: {source}; {fix}", path.display())]
    Io {
        action: String,
        path: PathBuf,
        source: std::io::Error,
        fix: String,
    },

    #[error("{} is not a configuration repository (no cell.toml); point at a profile's config/ directory, or create a profile with `keel profile create DIR`", dir.display())]
    NotARepository { dir: PathBuf },

    #[error("{} is not a Keel profile (no config/cell.toml); create one with `keel profile create {}`", dir.display(), dir.display())]
    NotAProfile { dir: PathBuf },

    #[error("{} is already a Keel profile (config/cell.toml exists); use it, or choose another directory", dir.display())]
    AlreadyProfile { dir: PathBuf },

    #[error("{} exists, is not empty (it holds `{entry}`) and is not a Keel profile; choose a new or empty directory for the profile", dir.display())]
    DirNotEmpty { dir: PathBuf, entry: String },

    /// A creation option (`--base-port`, `--cell` …) is unusable.
    #[error("{option} {problem}; fix: {fix}")]
    BadOption {
        option: String,
        problem: String,
        fix: String,
    },

    /// A name given to a command breaks the naming rule.
    #[error("`{name}` is not a valid {what} name: {problem}; use 1 to 64 letters, digits, `_`, `.` or `-`, starting with a letter or digit")]
    BadName {
        what: &'static str,
        name: String,
        problem: String,
    },

    #[error("there is no node `{node}` in the cell (known nodes: {}); use one of them", known.join(", "))]
    UnknownNode { node: String, known: Vec<String> },

    #[error("there is no server `{server}` in the cell (known servers: {}); create it first with `keel server create {server}`", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    UnknownServer { server: String, known: Vec<String> },

    #[error("there is no bus `{bus}` in the cell (known buses: {}); use one of them, or create it with `keel bus add-member {bus} --server NAME`", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    UnknownBus { bus: String, known: Vec<String> },

    /// No messaging engine of that name (`place` is empty or ` on bus B`).
    #[error("there is no messaging engine `{me}`{place} (known: {}); use one of them", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    UnknownMe {
        me: String,
        place: String,
        known: Vec<String>,
    },

    #[error("there is no data source `{name}` in the cell (known data sources: {}); create it with `keel datasource create {name} --kind postgres|mariadb --url URL`", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    UnknownDataSource { name: String, known: Vec<String> },

    #[error("there is no destination `{name}` on bus `{bus}` (its destinations: {}); `keel destination list` shows them", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    UnknownDestination {
        bus: String,
        name: String,
        known: Vec<String>,
    },

    #[error("there is no application `{name}` in the cell (known applications: {}); `keel app list` shows them", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    UnknownApp { name: String, known: Vec<String> },

    /// A data source cannot go while sql applications name it.
    #[error("there is no user `{name}` in the cell (known users: {}); add it with `keel user add {name} --role ROLE`", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    UnknownUser { name: String, known: Vec<String> },

    /// A change to users or roles that would leave the cell without a way in, or break a bus.
    #[error("{what} is refused: {why}")]
    UserChangeRefused { what: String, why: String },

    #[error("data source `{name}` is used by the sql application(s) {}; delete or change them first (`keel app delete NAME`)", apps.join(", "))]
    DataSourceInUse { name: String, apps: Vec<String> },

    /// A destination was created without `--me` on a bus that has not exactly one member.
    #[error("{}", if known.is_empty() { format!("bus `{bus}` has no members, so no messaging engine can hold the destination; add one first with `keel bus add-member {bus} --server NAME`") } else { format!("bus `{bus}` has several messaging engines ({}); give --me ME to choose the one that holds the destination", known.join(", ")) })]
    MeRequired { bus: String, known: Vec<String> },

    #[error("`{name}` is not a valid destination name: {problem}; use 1 to 128 letters, digits, `_`, `.` or `-`, starting with a letter or digit (names starting with `_SYSTEM.` are reserved)")]
    BadDestinationName { name: String, problem: String },

    #[error("a {what} named `{name}` already exists{place}; choose another name")]
    Duplicate {
        what: &'static str,
        name: String,
        place: String,
    },

    #[error("server `{server}` is already a member of bus `{bus}` (messaging engine {me}); nothing to do")]
    AlreadyMember {
        bus: String,
        server: String,
        me: String,
    },

    #[error("no two free ports are left above {highest} for server `{server}` (ports end at 65535); fix: lower the ports of existing servers or create a profile with a lower --base-port")]
    PortsExhausted { server: String, highest: u16 },

    /// The repository lock stayed taken for the whole bounded wait.
    #[error("could not lock configuration repository {} within {waited_s} s: another keel process holds {}{}; wait for it to finish, or stop that process if it hangs", dir.display(), lock.display(), holder.map(|p| format!(" (last locked for writing by pid {p})")).unwrap_or_default())]
    LockTimeout {
        dir: PathBuf,
        lock: PathBuf,
        waited_s: u64,
        holder: Option<u32>,
    },

    /// A secret (the admin credential, a data source password) is missing, empty or too open.
    #[error("{}: {problem}; fix: {fix}", file.display())]
    Secret {
        file: PathBuf,
        problem: String,
        fix: String,
    },

    #[error("config archive {} is damaged ({how}); nothing was restored. Use another backup.", file.display())]
    ArchiveDamaged { file: PathBuf, how: String },

    #[error("config archive {} is refused ({why}); nothing was restored. Use another backup.", file.display())]
    ArchiveRefused { file: PathBuf, why: String },

    #[error("config archive {} holds a configuration that does not validate: {source}; nothing was restored. Use another backup.", file.display())]
    ArchiveInvalid {
        file: PathBuf,
        source: Box<ConfigError>,
    },

    #[error("archive {} belongs to cell {archive_cell}, this profile is cell {profile_cell}; restore it into a profile of cell {archive_cell}", file.display())]
    ForeignArchive {
        file: PathBuf,
        archive_cell: String,
        profile_cell: String,
    },

    #[error("backup target {} already exists; choose another file name or move the old file away", path.display())]
    TargetExists { path: PathBuf },

    /// The restore failed after the current configuration was moved aside.
    #[error("restore failed while replacing the configuration: {source}; {}", if *rolled_back { format!("the previous configuration was put back (a copy remains in {})", set_aside.display()) } else { format!("the previous configuration is in {}: copy its contents back into config/ by hand", set_aside.display()) })]
    RestoreFailed {
        set_aside: PathBuf,
        rolled_back: bool,
        source: Box<ConfigError>,
    },
}

/// Result of every fallible call of this crate.
pub type Result<T> = std::result::Result<T, ConfigError>;

/// Builds a closure that wraps an `io::Error` with the action, the path and the fix, for
/// `.map_err(io_err("read", &path, FIX_READ))`.
pub(crate) fn io_err<'a>(
    action: &'a str,
    path: &'a std::path::Path,
    fix: &'a str,
) -> impl FnOnce(std::io::Error) -> ConfigError + 'a {
    move |source| ConfigError::Io {
        action: action.to_string(),
        path: path.to_path_buf(),
        source,
        fix: fix.to_string(),
    }
}

/// The usual advice for a failed file-system call.
pub(crate) const FIX_PERM: &str =
    "check that the path exists, that you have permission, and that the disk is not full";
