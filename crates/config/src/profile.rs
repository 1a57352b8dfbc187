//! A profile: one self-contained directory holding a cell's configuration, credentials, logs,
//! data stores, recovery logs and backups. Copying or deleting the directory is the whole
//! install, so creation is all-or-nothing, and the directory is made 0700 from the first
//! moment.
//!
//! Secrets live in `secrets/` (mode 0700), never in the configuration, logs or error messages:
//! `admin-password` (the admin credential), `datasources/<name>` (the password of data
//! source `<name>`) and `tls/` (the cell's CA and each process's certificate and key, see
//! `certs.rs`), each mode 0600, written by temp + fsync + rename. A secret file readable
//! by group or others is refused. `keel datasource create` writes a data source's password
//! before the configuration names it, and `delete` removes it after, so the configuration never
//! names a data source whose secret is gone. [`Profile::secure_directories`] (run by node
//! agents and servers at start) closes data directories an older build left open to others.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use keel_core::Layout;

use crate::error::{io_err, ConfigError, Result, FIX_PERM};
use crate::fsx;
use crate::model::{name_problem, Cell, Config, NodeCfg, MIN_PORT};
use crate::repo::Repository;

/// Length of the generated admin password; 32 alphanumerics are ~190 bits.
const PASSWORD_LEN: usize = 32;
/// Largest data source password file read; a password is one line.
const MAX_SECRET_BYTES: u64 = 4096;

/// What `keel profile create` may choose; the defaults are the documented ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// The node agent's admin port; each server then takes the next two (admin, bus).
    pub base_port: u16,
    pub cell: String,
    pub node: String,
    pub server: String,
    pub bus: String,
    /// The node's host: the address its processes bind and advertise (DESIGN §11).
    pub host: String,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            base_port: 7270,
            cell: "keelCell".into(),
            node: "node01".into(),
            server: "server1".into(),
            bus: "bus1".into(),
            host: "127.0.0.1".into(),
        }
    }
}

/// An existing profile directory.
#[derive(Debug, Clone)]
pub struct Profile {
    root: PathBuf,
    layout: Layout,
}

impl Profile {
    /// Creates the profile directory tree with the initial configuration (cell, node, server,
    /// and the server's ME on the bus) and a random admin password. Built in a sibling temp
    /// directory and renamed into place, so a failure never leaves half a profile behind.
    pub fn create(dir: &Path, opts: &CreateOptions) -> Result<Profile> {
        check_options(opts)?;
        let abs = std::path::absolute(dir).map_err(io_err("resolve", dir, FIX_PERM))?;
        if abs.join("config").join("cell.toml").exists() {
            return Err(ConfigError::AlreadyProfile {
                dir: dir.to_path_buf(),
            });
        }
        let existed = match std::fs::metadata(&abs) {
            Ok(m) if m.is_dir() => {
                let mut rd =
                    std::fs::read_dir(&abs).map_err(io_err("list directory", &abs, FIX_PERM))?;
                if let Some(entry) = rd.next() {
                    let entry = entry.map_err(io_err("list directory", &abs, FIX_PERM))?;
                    return Err(ConfigError::DirNotEmpty {
                        dir: dir.to_path_buf(),
                        entry: entry.file_name().to_string_lossy().into_owned(),
                    });
                }
                true
            }
            Ok(_) => {
                return Err(ConfigError::BadOption {
                    option: format!("profile directory {}", dir.display()),
                    problem: "exists and is not a directory".into(),
                    fix: "choose another path for the profile".into(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err("inspect", &abs, FIX_PERM)(e)),
        };
        let Some(name) = abs.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            return Err(ConfigError::BadOption {
                option: format!("profile directory {}", dir.display()),
                problem: "has no directory name of its own".into(),
                fix: "name a directory such as ./myprofile".into(),
            });
        };
        let parent = fsx::parent_of(&abs);
        std::fs::create_dir_all(&parent).map_err(|source| ConfigError::Io {
            action: "create the parent directory".into(),
            path: parent.clone(),
            source,
            fix: "choose a location you can write to, or create the directory with the right owner"
                .into(),
        })?;
        let tmp = parent.join(format!(".{name}.creating-{}", fsx::random_hex(6)));
        // Owner only from the first moment (the rename keeps the mode): the profile holds
        // messages, logs, backups and secrets.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(|source| ConfigError::Io {
                action: format!(
                    "create profile {} (writing the temporary directory {} in)",
                    dir.display(),
                    tmp.display()
                ),
                path: parent.clone(),
                source,
                fix: "choose a location you can write to".into(),
            })?;
        let built = build(&tmp, opts).and_then(|()| {
            if existed {
                // Only an empty directory: remove_dir refuses anything else, so a file that
                // appeared meanwhile makes us fail instead of clobbering it.
                std::fs::remove_dir(&abs).map_err(io_err(
                    "replace the empty directory",
                    &abs,
                    "make sure the directory is empty and writable",
                ))?;
            }
            std::fs::rename(&tmp, &abs).map_err(io_err(
                "move the new profile into",
                &abs,
                "make sure nothing else created the directory meanwhile",
            ))?;
            fsx::fsync_dir(&parent)
        });
        if let Err(e) = built {
            if let Err(rm) = std::fs::remove_dir_all(&tmp) {
                if tmp.exists() {
                    tracing::warn!(path = %tmp.display(), error = %rm, "could not remove the unfinished profile; delete it by hand");
                }
            }
            return Err(e);
        }
        tracing::info!(profile = %abs.display(), cell = %opts.cell, node = %opts.node, server = %opts.server, "profile created");
        Profile::open(&abs)
    }

    /// Makes the profile directory and the directories Keel keeps data in readable by the owner
    /// only (0700), whatever the umask was when they were made: a file made 0644 by an older
    /// build, or by an operator's tool, is then out of reach of other users all the same.
    /// Node agents and servers call it at start; returns the directories it had to tighten.
    pub fn secure_directories(&self) -> Result<Vec<PathBuf>> {
        let l = &self.layout;
        let mut tightened = Vec::new();
        for dir in [
            self.root.clone(),
            l.master_config(),
            l.secrets(),
            l.run_dir(),
            l.root().join("logs"),
            l.databases(),
            l.root().join("tranlog"),
            l.backups(),
            l.root().join("node-config"),
        ] {
            let meta = match std::fs::metadata(&dir) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("read the mode of", &dir, FIX_PERM)(e)),
            };
            if meta.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io_err("make owner-only (0700)", &dir, FIX_PERM))?;
                tightened.push(dir);
            }
        }
        Ok(tightened)
    }

    /// [`Profile::secure_directories`] for a process starting on the profile: what it had to
    /// tighten, or why it could not, goes to the log (the process runs on either way).
    pub fn secure_directories_logged(&self) {
        match self.secure_directories() {
            Ok(tightened) => {
                for dir in tightened {
                    tracing::warn!(path = %dir.display(), "the directory was readable by other users; made it owner-only (0700)");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot make the profile's directories owner-only")
            }
        }
    }

    /// Opens an existing profile (checks that it has a master configuration; loads nothing).
    pub fn open(dir: &Path) -> Result<Profile> {
        if !dir.join("config").join("cell.toml").is_file() {
            return Err(ConfigError::NotAProfile {
                dir: dir.to_path_buf(),
            });
        }
        let root = std::path::absolute(dir).map_err(io_err("resolve", dir, FIX_PERM))?;
        Ok(Profile {
            layout: Layout::new(root.clone()),
            root,
        })
    }

    /// The profile directory, absolute (servers launched from another cwd still find it).
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The master repository, owned by the cell; changes are made here first.
    pub fn master(&self) -> Repository {
        Repository::at(self.layout.master_config())
    }

    /// A node's synchronized copy of the master.
    pub fn node_copy(&self, node: &str) -> Repository {
        Repository::at(self.layout.node_config(node))
    }

    /// The admin credential. Refuses a file others can read: a leaked password opens the admin
    /// API of every server in the profile.
    pub fn admin_password(&self) -> Result<String> {
        let file = self.layout.admin_password();
        let meta = match std::fs::metadata(&file) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ConfigError::Secret {
                    file,
                    problem: format!(
                        "the admin password file is missing, so the profile {} may be damaged",
                        self.root.display()
                    ),
                    fix: "restore the file from a copy of the profile, or create a new profile"
                        .into(),
                })
            }
            Err(e) => return Err(io_err("inspect", &file, FIX_PERM)(e)),
        };
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(ConfigError::Secret {
                file: file.clone(),
                problem: format!(
                    "the admin password file is readable by group or others (mode {mode:o})"
                ),
                fix: format!("run `chmod 600 {}`", file.display()),
            });
        }
        let text = std::fs::read_to_string(&file).map_err(io_err("read", &file, FIX_PERM))?;
        let pw = text.trim();
        if pw.is_empty() {
            return Err(ConfigError::Secret {
                file,
                problem: "the admin password file is empty".into(),
                fix: "write a password into it (one line, mode 600), or create a new profile"
                    .into(),
            });
        }
        Ok(pw.to_string())
    }

    /// Replaces the profile's admin password file (mode 0600, atomically, durable on return):
    /// `keel user passwd admin` keeps it equal to user admin's password, because keel commands
    /// and node agents on this host log in with it.
    pub fn set_admin_password(&self, password: &str) -> Result<()> {
        let file = self.layout.admin_password();
        if password.is_empty() || password.contains(['\n', '\r', '\0']) {
            return Err(ConfigError::BadOption {
                option: "the admin password".into(),
                problem: "is empty or holds a line break or NUL".into(),
                fix: "use a password of one line".into(),
            });
        }
        ensure_private_dir(&self.layout.secrets())?;
        fsx::write_atomic_private(&file, format!("{password}\n").as_bytes())
    }

    /// Where the password of data source `name` is kept (`secrets/datasources/<name>`),
    /// whether or not it exists.
    pub fn datasource_password_file(&self, name: &str) -> Result<PathBuf> {
        datasource_secret_file(&self.layout, name)
    }

    /// Saves the password of data source `name` in the profile's secrets (mode 0600, replaced
    /// atomically, durable on return). A password is one line of at most 4 KiB.
    pub fn set_datasource_password(&self, name: &str, password: &str) -> Result<()> {
        let file = datasource_secret_file(&self.layout, name)?;
        if password.is_empty()
            || password.contains(['\n', '\r', '\0'])
            || password.len() as u64 >= MAX_SECRET_BYTES
        {
            return Err(ConfigError::BadOption {
                option: format!("the password of data source {name}"),
                problem: format!(
                    "is empty, longer than {} bytes, or holds a line break or NUL",
                    MAX_SECRET_BYTES - 1
                ),
                fix: "use a password of one line".into(),
            });
        }
        ensure_private_dir(&self.layout.secrets())?;
        ensure_private_dir(&fsx::parent_of(&file))?;
        fsx::write_atomic_private(&file, format!("{password}\n").as_bytes())
    }

    /// The password of data source `name`, `None` when it has none (see
    /// [`read_datasource_password`]).
    pub fn datasource_password(&self, name: &str) -> Result<Option<String>> {
        read_datasource_password(&self.layout, name)
    }

    /// Deletes the password of data source `name`; a data source without one is fine.
    pub fn remove_datasource_password(&self, name: &str) -> Result<()> {
        let file = datasource_secret_file(&self.layout, name)?;
        match std::fs::remove_file(&file) {
            Ok(()) => fsx::fsync_dir(&fsx::parent_of(&file)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("delete", &file, FIX_PERM)(e)),
        }
    }

    /// The node this profile runs (profiles hold exactly one node for now). Read from the
    /// master's directory layout, not by loading it, so it works while a file is broken.
    pub fn local_node(&self) -> Result<String> {
        let dir = self.layout.master_config();
        let mut nodes: Vec<String> = crate::files::list_object_files(&dir)?
            .iter()
            .filter(|rel| rel.file_name().is_some_and(|n| n == "node.toml"))
            .filter_map(|rel| {
                rel.parent()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .collect();
        nodes.sort_by(|a, b| fsx::natural_cmp(a, b));
        nodes.into_iter().next().ok_or_else(|| ConfigError::Invalid {
            file: dir.join("nodes"),
            key: "node".into(),
            problem: format!("is missing: the profile {} has no node (no nodes/<node>/node.toml)", self.root.display()),
            fix: "restore the configuration with `keel config restore FILE`, or create a new profile".into(),
        })
    }
}

fn datasource_secret_file(layout: &Layout, name: &str) -> Result<PathBuf> {
    // The name becomes a file name: the naming rule keeps it inside secrets/datasources/.
    if let Some(problem) = name_problem(name) {
        return Err(ConfigError::BadName {
            what: "data source",
            name: name.into(),
            problem,
        });
    }
    Ok(layout.secrets().join("datasources").join(name))
}

/// The password of data source `name` from the profile's secrets (`secrets/datasources/<name>`,
/// one line), `None` when there is no such file. Refuses a file readable by group or others, or
/// an empty one. For the server process, which has a layout but no `Profile`.
pub fn read_datasource_password(layout: &Layout, name: &str) -> Result<Option<String>> {
    let file = datasource_secret_file(layout, name)?;
    let f = match std::fs::File::open(&file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("open", &file, FIX_PERM)(e)),
    };
    // Checked on the open file, so what is read is what was checked.
    let meta = f.metadata().map_err(io_err("inspect", &file, FIX_PERM))?;
    let secret_err = |problem: String, fix: String| ConfigError::Secret {
        file: file.clone(),
        problem,
        fix,
    };
    if !meta.is_file() {
        return Err(secret_err(
            format!("the password of data source {name} is not a regular file"),
            "replace it with a file holding the password (mode 600)".into(),
        ));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(secret_err(
            format!(
                "the password file of data source {name} is readable by group or others (mode {mode:o})"
            ),
            format!("run `chmod 600 {}`", file.display()),
        ));
    }
    let mut bytes = Vec::new();
    f.take(MAX_SECRET_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("read", &file, FIX_PERM))?;
    if bytes.len() as u64 > MAX_SECRET_BYTES {
        return Err(secret_err(
            format!(
                "the password file of data source {name} is larger than {MAX_SECRET_BYTES} bytes"
            ),
            "write the password alone into it, on one line".into(),
        ));
    }
    let Ok(text) = String::from_utf8(bytes) else {
        return Err(secret_err(
            format!("the password file of data source {name} is not UTF-8 text"),
            "write the password into it as text, on one line".into(),
        ));
    };
    let pw = text.strip_suffix('\n').unwrap_or(&text);
    let pw = pw.strip_suffix('\r').unwrap_or(pw);
    if pw.is_empty() {
        return Err(secret_err(
            format!("the password file of data source {name} is empty"),
            "write the password into it (one line, mode 600), or delete the file if the data source needs no password".into(),
        ));
    }
    Ok(Some(pw.to_string()))
}

/// Creates a directory only its owner may enter (fsyncing its parent); an existing one is left
/// as it is.
fn ensure_private_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(io_err("create directory", dir, FIX_PERM)(e)),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(
        "set permissions of",
        dir,
        FIX_PERM,
    ))?;
    fsx::fsync_dir(&fsx::parent_of(dir))
}

fn check_options(opts: &CreateOptions) -> Result<()> {
    for (what, value) in [
        ("--cell", &opts.cell),
        ("--node", &opts.node),
        ("--server", &opts.server),
        ("--bus", &opts.bus),
    ] {
        if let Some(p) = name_problem(value) {
            return Err(ConfigError::BadOption {
                option: format!("{what} {value:?}"),
                problem: format!("is not a valid name ({p})"),
                fix:
                    "use 1 to 64 letters, digits, `_`, `.` or `-`, starting with a letter or digit"
                        .into(),
            });
        }
    }
    if opts.server == keel_core::layout::NODE_AGENT {
        return Err(ConfigError::BadOption {
            option: format!("--server {}", opts.server),
            problem: "is reserved for the node agent".into(),
            fix: "choose another server name".into(),
        });
    }
    if opts.base_port < MIN_PORT || opts.base_port.checked_add(2).is_none() {
        return Err(ConfigError::BadOption {
            option: format!("--base-port {}", opts.base_port),
            problem: "is out of range: the profile needs base_port, base_port+1 and base_port+2, between 1024 and 65535".into(),
            fix: "choose a base port between 1024 and 65533".into(),
        });
    }
    Ok(())
}

/// The initial configuration of a new profile.
fn initial_config(opts: &CreateOptions) -> Result<Config> {
    let mut cfg = Config {
        version: 1,
        cell: Cell {
            name: opts.cell.clone(),
        },
        nodes: vec![NodeCfg {
            name: opts.node.clone(),
            host: opts.host.clone(),
            admin_port: opts.base_port,
            servers: Vec::new(),
        }],
        buses: Vec::new(),
        datasources: Vec::new(),
        apps: Vec::new(),
        users: Vec::new(),
    };
    let s = cfg.add_server(&opts.node, &opts.server)?;
    assert_eq!(
        (s.admin_port, s.bus_port),
        (opts.base_port + 1, opts.base_port + 2)
    );
    cfg.add_bus_member(&opts.bus, &opts.server)?;
    cfg.validate()?;
    Ok(cfg)
}

/// Fills the temp directory `root` with a complete profile.
fn build(root: &Path, opts: &CreateOptions) -> Result<()> {
    let layout = Layout::new(root);
    let cfg = initial_config(opts)?;
    Repository::at(layout.master_config()).replace(&cfg)?;
    Repository::at(layout.node_config(&opts.node)).replace(&cfg)?;
    for d in [
        layout.run_dir(),
        layout.root().join("logs"),
        layout.databases(),
        layout.root().join("tranlog"),
        layout.backups(),
    ] {
        fsx::ensure_dir(&d)?;
    }
    let secrets = layout.secrets();
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&secrets)
        .map_err(io_err("create directory", &secrets, FIX_PERM))?;
    // The umask can only remove bits, but be explicit: the directory guards the credential.
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o700)).map_err(io_err(
        "set permissions of",
        &secrets,
        FIX_PERM,
    ))?;
    let file = layout.admin_password();
    let password = generate_password()?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)
        .map_err(io_err("create", &file, FIX_PERM))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io_err("set permissions of", &file, FIX_PERM))?;
    f.write_all(format!("{password}\n").as_bytes())
        .map_err(io_err("write", &file, FIX_PERM))?;
    f.sync_all().map_err(io_err("fsync", &file, FIX_PERM))?;
    // The cell's CA and a certificate per process (DESIGN §10).
    keel_tls::Pki::at(layout.tls_dir()).ensure(
        &cfg.cell.name,
        &crate::certs::identities(&cfg),
        keel_core::unix_s(),
    )?;
    fsx::fsync_dir(&secrets)?;
    fsx::fsync_dir(root)
}

/// A random alphanumeric password, unbiased (bytes that would skew the modulo are rejected).
fn generate_password() -> Result<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    const LIMIT: u8 = (256 - 256 % ALPHABET.len()) as u8; // 248: a multiple of 62
    let mut out = String::with_capacity(PASSWORD_LEN);
    // Each round keeps ~97% of 64 bytes, so one round almost always suffices; 16 is plenty.
    for _round in 0..16 {
        let mut buf = [0u8; 64];
        getrandom::fill(&mut buf).map_err(|e| ConfigError::Io {
            action: "read random bytes for the admin password from".into(),
            path: PathBuf::from("the operating system's random source"),
            source: std::io::Error::other(e.to_string()),
            fix: "check that /dev/urandom (or getrandom(2)) works on this machine".into(),
        })?;
        for b in buf.into_iter().filter(|b| *b < LIMIT) {
            out.push(ALPHABET[usize::from(b) % ALPHABET.len()] as char);
            if out.len() == PASSWORD_LEN {
                return Ok(out);
            }
        }
    }
    unreachable!("the random source returned biased bytes 16 times in a row")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{InitialState, MonitorPolicy};

    use crate::repo::tests::snapshot;

    #[test]
    fn create_open_load_gives_the_documented_defaults() {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("a/b/prof");
        let p = Profile::create(&dir, &CreateOptions::default()).expect("create");
        let p = Profile::open(p.root()).expect("open");
        let cfg = p.master().load().expect("load");
        assert_eq!(cfg.version, 1);
        assert_eq!(cfg.cell.name, "keelCell");
        assert_eq!(cfg.nodes.len(), 1);
        let n = &cfg.nodes[0];
        assert_eq!(
            (n.name.as_str(), n.host.as_str(), n.admin_port),
            ("node01", "127.0.0.1", 7270)
        );
        let s = cfg.server("node01", "server1").expect("server1");
        assert_eq!((s.admin_port, s.bus_port), (7271, 7272));
        assert_eq!(
            s.monitor,
            MonitorPolicy {
                auto_restart: true,
                ping_interval_s: 2,
                ping_timeout_s: 10,
                max_start_attempts: 3,
                start_timeout_s: 60
            }
        );
        assert_eq!(cfg.buses.len(), 1);
        let m = &cfg.buses[0].members[0];
        assert_eq!(
            (m.node.as_str(), m.server.as_str(), m.me.as_str()),
            ("node01", "server1", "node01.server1-bus1")
        );
        assert_eq!(m.initial_state, InitialState::Started);
        assert_eq!(
            uuid::Uuid::parse_str(&m.uuid)
                .expect("uuid")
                .get_version_num(),
            4
        );

        assert_eq!(p.node_copy("node01").load().expect("copy"), cfg);
        assert_eq!(p.local_node().expect("node"), "node01");
        for d in ["run", "logs", "databases", "tranlog", "backups"] {
            assert!(p.root().join(d).is_dir(), "{d}");
        }
        let pw = p.admin_password().expect("password");
        assert!(
            pw.len() >= 24 && pw.chars().all(|c| c.is_ascii_alphanumeric()),
            "{pw}"
        );
        let mode = std::fs::metadata(p.layout().admin_password())
            .expect("meta")
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let mode = std::fs::metadata(p.layout().secrets())
            .expect("meta")
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
        // No temp directory left beside the profile.
        let left: Vec<_> = std::fs::read_dir(t.path().join("a/b"))
            .expect("ls")
            .map(|e| e.expect("e").file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("prof")]);
    }

    #[test]
    fn create_with_options_and_into_an_empty_dir() {
        let t = tempfile::tempdir().expect("tempdir");
        let opts = CreateOptions {
            base_port: 20000,
            cell: "c1".into(),
            node: "n1".into(),
            server: "s1".into(),
            bus: "b1".into(),
            host: "127.0.0.1".into(),
        };
        let p = Profile::create(t.path(), &opts).expect("create into the empty tempdir");
        let cfg = p.master().load().expect("load");
        assert_eq!(cfg.buses[0].members[0].me, "n1.s1-b1");
        assert_eq!(
            cfg.find_server("s1")
                .map(|(n, s)| (n.name.as_str(), s.bus_port)),
            Some(("n1", 20002))
        );
    }

    #[test]
    fn create_twice_is_refused_and_leaves_the_first_untouched() {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("prof");
        Profile::create(&dir, &CreateOptions::default()).expect("create");
        let before = snapshot(&dir);
        let e = Profile::create(
            &dir,
            &CreateOptions {
                base_port: 9000,
                ..CreateOptions::default()
            },
        )
        .expect_err("twice");
        assert!(matches!(e, ConfigError::AlreadyProfile { .. }));
        let msg = e.to_string();
        assert!(
            msg.contains(&dir.display().to_string())
                && msg.contains("is already a Keel profile (config/cell.toml exists)"),
            "{msg}"
        );
        assert_eq!(snapshot(&dir), before);
    }

    #[test]
    fn create_refuses_a_non_empty_directory_and_bad_options() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::write(t.path().join("notes.txt"), b"mine").expect("write");
        let e = Profile::create(t.path(), &CreateOptions::default()).expect_err("non-empty");
        assert!(e.to_string().contains("notes.txt"), "{e}");
        assert_eq!(std::fs::read_dir(t.path()).expect("ls").count(), 1);

        let dir = t.path().join("p");
        for opts in [
            CreateOptions {
                base_port: 80,
                ..CreateOptions::default()
            },
            CreateOptions {
                base_port: 65534,
                ..CreateOptions::default()
            },
            CreateOptions {
                server: "bad name".into(),
                ..CreateOptions::default()
            },
            CreateOptions {
                server: "nodeagent".into(),
                ..CreateOptions::default()
            },
        ] {
            let e = Profile::create(&dir, &opts).expect_err("bad option");
            assert!(matches!(e, ConfigError::BadOption { .. }), "{e}");
        }
        assert!(!dir.exists());
        assert_eq!(
            std::fs::read_dir(t.path()).expect("ls").count(),
            1,
            "no temp dirs left"
        );
    }

    #[test]
    fn unwritable_parent_gives_an_error_naming_the_path() {
        let t = tempfile::tempdir().expect("tempdir");
        let parent = t.path().join("ro");
        std::fs::create_dir(&parent).expect("mkdir");
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o500)).expect("chmod");
        // Root ignores permission bits: detect that by trying, and skip the assertion then.
        let probe = parent.join("probe");
        let root_can_write = std::fs::create_dir(&probe).is_ok();
        let r = Profile::create(&parent.join("prof"), &CreateOptions::default());
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o700))
            .expect("chmod back");
        if root_can_write {
            eprintln!("skipping: this user can write into a 0500 directory (root)");
            return;
        }
        let e = r.expect_err("unwritable");
        let msg = e.to_string();
        assert!(msg.contains(&parent.display().to_string()), "{msg}");
        assert!(msg.contains("Permission denied"), "{msg}");
    }

    #[test]
    fn a_file_in_the_way_gives_an_error_naming_the_path() {
        // Fails for root too (unlike a permission test).
        let t = tempfile::tempdir().expect("tempdir");
        let blocker = t.path().join("file");
        std::fs::write(&blocker, b"x").expect("write");
        let e = Profile::create(&blocker.join("sub/prof"), &CreateOptions::default())
            .expect_err("not a dir")
            .to_string();
        assert!(e.contains(&blocker.display().to_string()), "{e}");
        let e = Profile::create(&blocker, &CreateOptions::default())
            .expect_err("is a file")
            .to_string();
        assert!(e.contains("exists and is not a directory"), "{e}");
    }

    #[test]
    fn open_refuses_a_non_profile() {
        let t = tempfile::tempdir().expect("tempdir");
        let e = Profile::open(t.path())
            .expect_err("not a profile")
            .to_string();
        assert!(
            e.contains(
                "is not a Keel profile (no config/cell.toml); create one with `keel profile create"
            ),
            "{e}"
        );
    }

    #[test]
    fn admin_password_refuses_open_modes_and_missing_file() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = Profile::create(&t.path().join("p"), &CreateOptions::default()).expect("create");
        let file = p.layout().admin_password();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = p.admin_password().expect_err("mode").to_string();
        assert!(e.contains(&format!("chmod 600 {}", file.display())), "{e}");
        std::fs::remove_file(&file).expect("rm");
        let e = p.admin_password().expect_err("missing").to_string();
        assert!(
            e.contains("may be damaged") && e.contains("admin-password"),
            "{e}"
        );
    }

    #[test]
    fn passwords_differ() {
        let a = generate_password().expect("pw");
        let b = generate_password().expect("pw");
        assert_eq!(a.len(), PASSWORD_LEN);
        assert_ne!(a, b);
    }

    #[test]
    fn datasource_passwords_are_private_files_in_secrets() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = Profile::create(&t.path().join("p"), &CreateOptions::default()).expect("create");
        assert_eq!(p.datasource_password("pg1").expect("absent"), None);
        p.remove_datasource_password("pg1").expect("absent is fine");

        p.set_datasource_password("pg1", "s3cret with spaces ")
            .expect("set");
        let file = p.datasource_password_file("pg1").expect("path");
        assert_eq!(file, p.layout().secrets().join("datasources").join("pg1"));
        let mode = |path: &Path| std::fs::metadata(path).expect("stat").mode() & 0o777;
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(file.parent().expect("dir")), 0o700);
        assert_eq!(
            p.datasource_password("pg1").expect("read").as_deref(),
            Some("s3cret with spaces ")
        );
        assert_eq!(
            read_datasource_password(p.layout(), "pg1")
                .expect("read")
                .as_deref(),
            Some("s3cret with spaces ")
        );
        // Replaced atomically, no temp files left.
        p.set_datasource_password("pg1", "0th3r-pw")
            .expect("set again");
        assert_eq!(
            p.datasource_password("pg1").expect("read").as_deref(),
            Some("0th3r-pw")
        );
        let entries: Vec<_> = std::fs::read_dir(file.parent().expect("dir"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(entries, ["pg1"]);

        // Readable by group: refused, with the fix, and without the password.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let e = p.datasource_password("pg1").expect_err("group").to_string();
        assert!(e.contains(&format!("chmod 600 {}", file.display())), "{e}");
        assert!(!e.contains("0th3r-pw"), "{e}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o604)).expect("chmod");
        assert!(p.datasource_password("pg1").is_err(), "others");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");

        // A hand-written file with a trailing newline; an empty one is refused.
        std::fs::write(&file, "by hand\n").expect("write");
        assert_eq!(
            p.datasource_password("pg1").expect("read").as_deref(),
            Some("by hand")
        );
        std::fs::write(&file, "\n").expect("write");
        assert!(p.datasource_password("pg1").is_err(), "empty");

        p.remove_datasource_password("pg1").expect("remove");
        assert!(!file.exists());
        assert_eq!(p.datasource_password("pg1").expect("absent"), None);

        // Names stay inside secrets/datasources/; passwords are one line.
        for bad in ["../admin-password", "", "a/b", ".x"] {
            assert!(p.set_datasource_password(bad, "x").is_err(), "{bad:?}");
            assert!(p.datasource_password(bad).is_err(), "{bad:?}");
        }
        for bad in ["", "two\nlines", "nul\0"] {
            assert!(p.set_datasource_password("pg1", bad).is_err(), "{bad:?}");
        }
        assert!(!file.exists());
    }
}
