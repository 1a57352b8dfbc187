//! A configuration repository on disk (the master `config/` or a node's copy) and the node
//! synchronization between the two.
//!
//! Write discipline, so that a crash at any point leaves a repository that loads: each file is
//! replaced atomically (temp + fsync + rename + directory fsync), and `cell.toml`, which holds
//! the version, is written last. A reader that sees the new version therefore sees every file
//! of that version. Writers hold the exclusive lock `<dir>/.lock`; readers the shared one.
//!
//! Invariants: the only way to change a repository is [`Repository::update`]. It holds the
//! exclusive lock (the file records the writer's pid; a waiter gives up after `LOCK_WAIT`,
//! 10 s, naming the holder), validates the whole new configuration before it writes anything,
//! and rewrites only the files that changed, so an operator's comments in the others survive.
//! [`Repository::load`] takes the lock shared, so a reader never sees half an update. [`sync`]
//! holds the master's lock while it writes the node copy, so a copy's version never goes
//! backwards.

use std::path::{Path, PathBuf};

use crate::error::{io_err, ConfigError, Result, FIX_PERM};
use crate::files::{self, Tree};
use crate::fsx::{self, RepoLock};
use crate::model::Config;

/// A configuration repository directory. Cheap to construct; every call goes to disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repository {
    dir: PathBuf,
}

/// What `sync` did: `from` is the node copy's version before (`None` when it was absent or
/// unreadable), `to` the version it has now. `from == Some(to)` means nothing was copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncOutcome {
    pub from: Option<u64>,
    pub to: u64,
}

impl Repository {
    pub fn at(dir: PathBuf) -> Repository {
        Repository { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads and validates every file (under the shared lock, so never a half-applied update).
    /// Nodes, servers and buses come back in natural name order.
    pub fn load(&self) -> Result<Config> {
        self.require_cell()?;
        let _lock = RepoLock::shared(&self.dir)?;
        self.load_unlocked().map(|(cfg, _)| cfg)
    }

    /// Just the version number: reads `cell.toml` only (it is replaced atomically, so no lock).
    pub fn version(&self) -> Result<u64> {
        self.require_cell()?;
        let file = self.dir.join("cell.toml");
        let bytes = fsx::read_file(&file)?;
        files::parse_cell(&file, &bytes).map(|(_, v)| v)
    }

    /// The one way to change a repository: under the exclusive lock, loads, applies `f`,
    /// validates, bumps the version by one and writes the files that changed (cell.toml last).
    /// If `f` or validation fails, nothing is written. Returns the saved config (in canonical
    /// order). `f` cannot set the version: whatever it writes there is replaced.
    pub fn update<F: FnOnce(&mut Config) -> Result<()>>(&self, f: F) -> Result<Config> {
        self.require_cell()?;
        let _lock = RepoLock::exclusive(&self.dir)?;
        let (old, _) = self.load_unlocked()?;
        let mut cfg = old.clone();
        f(&mut cfg).map_err(|e| files::rebase(e, &self.dir))?;
        cfg.canonicalize();
        cfg.version = old
            .version
            .checked_add(1)
            .filter(|v| *v <= i64::MAX as u64)
            .ok_or_else(|| ConfigError::Invalid {
                file: self.dir.join("cell.toml"),
                key: "repository.version".into(),
                problem: format!("= {} is invalid: it cannot go higher", old.version),
                fix: "restore the repository from a backup, then run `keel config validate`".into(),
            })?;
        cfg.validate().map_err(|e| files::rebase(e, &self.dir))?;
        // Every object of `old` was loaded from its file, so its rendering lists exactly the
        // object files on disk; comparing renderings finds the files that really changed.
        write_repo(&self.dir, &cfg, Some(&files::render_objects(&old)))?;
        tracing::info!(repository = %self.dir.display(), version = cfg.version, "configuration saved");
        Ok(cfg)
    }

    /// Writes a whole config as given (version included), under the lock, with the same atomic
    /// discipline; files of objects not in `cfg` are deleted and files whose bytes are already
    /// right are left alone. Used by profile creation and sync.
    pub fn replace(&self, cfg: &Config) -> Result<()> {
        let mut cfg = cfg.clone();
        cfg.canonicalize();
        cfg.validate().map_err(|e| files::rebase(e, &self.dir))?;
        let _lock = RepoLock::exclusive(&self.dir)?;
        write_repo(&self.dir, &cfg, None)
    }

    fn require_cell(&self) -> Result<()> {
        if self.dir.join("cell.toml").is_file() {
            Ok(())
        } else {
            Err(ConfigError::NotARepository {
                dir: self.dir.clone(),
            })
        }
    }

    /// Load without taking the lock; the caller holds it. Also returns the raw files.
    pub(crate) fn load_unlocked(&self) -> Result<(Config, Tree)> {
        let tree = files::read_tree(&self.dir)?;
        let cfg = files::parse_tree(&tree, &self.dir)?;
        Ok((cfg, tree))
    }
}

/// Writes `cfg` into `dir`. `old` is the rendering of the objects currently on disk when the
/// caller knows it (update), so only changed files are rewritten and hand-made comments of
/// unchanged files survive; otherwise the files on disk are compared byte for byte.
fn write_repo(dir: &Path, cfg: &Config, old: Option<&Tree>) -> Result<()> {
    let new = files::render_objects(cfg);
    let existing: Tree = match old {
        Some(t) => t.clone(),
        None => {
            let mut t = Tree::new();
            for rel in files::list_object_files(dir)? {
                let bytes = fsx::read_file(&dir.join(&rel))?;
                t.insert(rel, bytes);
            }
            t
        }
    };
    for (rel, bytes) in &new {
        if existing.get(rel) == Some(bytes) {
            continue;
        }
        let path = dir.join(rel);
        fsx::ensure_dir(&fsx::parent_of(&path))?;
        fsx::write_atomic(&path, bytes)?;
    }
    for rel in existing.keys().filter(|rel| !new.contains_key(*rel)) {
        let path = dir.join(rel);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("delete", &path, FIX_PERM)(e)),
        }
        let parent = fsx::parent_of(&path);
        fsx::fsync_dir(&parent)?;
        // A removed node leaves nodes/<node>/servers/ and nodes/<node>/: drop them if empty.
        // remove_dir refuses non-empty directories, which is exactly the guard we want.
        let mut d = parent;
        for _ in 0..2 {
            if d == dir
                || !d.starts_with(dir)
                || d.file_name().is_some_and(|n| {
                    n == "nodes" || n == "buses" || n == "datasources" || n == "apps"
                })
            {
                break;
            }
            if std::fs::remove_dir(&d).is_err() {
                break;
            }
            let up = fsx::parent_of(&d);
            fsx::fsync_dir(&up)?;
            d = up;
        }
    }
    // Last: the version makes the new state visible to sync and to readers of `version()`.
    fsx::write_atomic(
        &dir.join("cell.toml"),
        &files::render_cell(cfg, &fsx::now_rfc3339()),
    )
}

/// Copies the master config into the node copy when their versions differ, or when the copy is
/// missing or does not load. The master is loaded (and so validated) first, under its lock,
/// which is held until the copy is written so that two syncs cannot write versions out of order.
/// On any master error the node copy is untouched.
pub fn sync(master: &Repository, node_copy: &Repository) -> Result<SyncOutcome> {
    assert_ne!(
        master.dir(),
        node_copy.dir(),
        "a repository cannot be synchronized onto itself"
    );
    master.require_cell()?;
    let _master_lock = RepoLock::exclusive(master.dir())?;
    let (cfg, _) = master.load_unlocked()?;
    let from = match node_copy.version() {
        Ok(v) => Some(v),
        Err(ConfigError::NotARepository { .. }) => None,
        Err(e) => {
            tracing::warn!(error = %e, "node copy unreadable; replacing it with the master");
            None
        }
    };
    if from == Some(cfg.version) {
        // Same version: copy only if the copy is damaged (a file lost or edited into garbage).
        match node_copy.load() {
            Ok(copy) if copy == cfg => {
                return Ok(SyncOutcome {
                    from,
                    to: cfg.version,
                })
            }
            Ok(_) => {
                tracing::warn!(copy = %node_copy.dir().display(), "node copy differs from the master at the same version; replacing it")
            }
            Err(e) => {
                tracing::warn!(error = %e, "node copy does not load; replacing it with the master")
            }
        }
    }
    node_copy.replace(&cfg)?;
    tracing::info!(copy = %node_copy.dir().display(), from = ?from, to = cfg.version, "node configuration synchronized");
    Ok(SyncOutcome {
        from,
        to: cfg.version,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::tests::sample;
    use crate::model::{
        BusCfg, BusMember, Cell, DestinationCfg, DestinationKind, InitialState, MonitorPolicy,
        NodeCfg, Reliability, ServerCfg,
    };
    use proptest::prelude::*;

    fn repo_with_sample(t: &tempfile::TempDir) -> Repository {
        let r = Repository::at(t.path().join("config"));
        r.replace(&sample()).expect("replace");
        r
    }

    /// Every file under `dir` with its bytes, for "nothing changed" assertions.
    pub(crate) fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("ls") {
                let p = e.expect("entry").path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push((p.clone(), std::fs::read(&p).expect("read")));
                }
            }
        }
        out.sort();
        out
    }

    fn server_file(r: &Repository) -> PathBuf {
        r.dir().join("nodes/node01/servers/server1.toml")
    }

    fn rewrite(path: &Path, from: &str, to: &str) {
        let text = std::fs::read_to_string(path).expect("read");
        assert!(text.contains(from), "{from} not in {text}");
        std::fs::write(path, text.replacen(from, to, 1)).expect("write");
    }

    #[test]
    fn replace_then_load_round_trips_and_version_is_cheap() {
        let t = tempfile::tempdir().expect("tempdir");
        let r = Repository::at(t.path().join("config"));
        let c = sample();
        r.replace(&c).expect("replace");
        assert_eq!(r.load().expect("load"), c);
        assert_eq!(r.version().expect("version"), 1);
        let cell = std::fs::read_to_string(r.dir().join("cell.toml")).expect("read");
        assert!(
            cell.contains("format = 1")
                && cell.contains("version = 1")
                && cell.contains("saved_at = \"")
                && cell.contains("name = \"keelCell\""),
            "{cell}"
        );
    }

    #[test]
    fn missing_cell_toml_is_not_a_repository() {
        let t = tempfile::tempdir().expect("tempdir");
        let r = Repository::at(t.path().to_path_buf());
        let e = r.load().expect_err("empty dir").to_string();
        assert!(
            e.contains("is not a configuration repository (no cell.toml)"),
            "{e}"
        );
        assert!(matches!(
            r.version(),
            Err(ConfigError::NotARepository { .. })
        ));
        assert!(matches!(
            r.update(|_| Ok(())),
            Err(ConfigError::NotARepository { .. })
        ));
    }

    #[test]
    fn invalid_toml_in_a_server_file_is_a_syntax_error_naming_the_file() {
        let t = tempfile::tempdir().expect("tempdir");
        let r = repo_with_sample(&t);
        rewrite(&server_file(&r), "[monitor]", "[monitor");
        let e = r.load().expect_err("syntax");
        match &e {
            ConfigError::Syntax { file, detail } => {
                assert_eq!(file, &server_file(&r));
                assert!(detail.contains("line 9"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            e.to_string().starts_with(&format!(
                "{}: TOML syntax error at line 9",
                server_file(&r).display()
            )),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_is_named_with_its_file() {
        let t = tempfile::tempdir().expect("tempdir");
        let r = repo_with_sample(&t);
        rewrite(&server_file(&r), "ping_interval_s", "ping_intervall_s");
        let e = r.load().expect_err("unknown key");
        let msg = e.to_string();
        assert!(
            matches!(&e, ConfigError::Invalid { file, key, .. } if *file == server_file(&r) && key == "monitor.ping_intervall_s"),
            "{e:?}"
        );
        assert!(
            msg.contains("is not a known key") && msg.contains("ping_interval_s"),
            "{msg}"
        );
    }

    #[test]
    fn port_zero_and_duplicate_port_name_the_key() {
        let t = tempfile::tempdir().expect("tempdir");
        let r = repo_with_sample(&t);
        rewrite(&server_file(&r), "admin_port = 7271", "admin_port = 0");
        let e = r.load().expect_err("port 0");
        assert!(
            matches!(&e, ConfigError::Invalid { file, key, .. } if *file == server_file(&r) && key == "server.admin_port"),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .contains("key `server.admin_port` = 0 is invalid: must be between 1024 and 65535"),
            "{e}"
        );

        rewrite(&server_file(&r), "admin_port = 0", "admin_port = 7270");
        let e = r.load().expect_err("duplicate port");
        assert!(
            matches!(&e, ConfigError::Invalid { file, key, .. } if *file == server_file(&r) && key == "server.admin_port"),
            "{e:?}"
        );
        assert!(e.to_string().contains("node.admin_port"), "{e}");
    }

    #[test]
    fn update_bumps_version_and_writes_changed_files_only() {
        let t = tempfile::tempdir().expect("tempdir");
        let r = repo_with_sample(&t);
        // A hand-made comment in an unchanged file survives an update.
        let node_file = r.dir().join("nodes/node01/node.toml");
        let mut text = std::fs::read_to_string(&node_file).expect("read");
        text.push_str("# operator note\n");
        std::fs::write(&node_file, &text).expect("write");

        let cfg = r
            .update(|c| c.add_server("node01", "server2").map(|_| ()))
            .expect("update");
        assert_eq!(cfg.version, 2);
        assert_eq!(r.version().expect("version"), 2);
        assert_eq!(r.load().expect("load"), cfg);
        assert!(r.dir().join("nodes/node01/servers/server2.toml").is_file());
        assert_eq!(std::fs::read_to_string(&node_file).expect("read"), text);

        let cfg = r.update(|c| {
            c.nodes[0].servers.retain(|s| s.name != "server2");
            Ok(())
        });
        assert_eq!(cfg.expect("update").version, 3);
        assert!(!r.dir().join("nodes/node01/servers/server2.toml").exists());
    }

    #[test]
    fn update_removes_the_directories_of_a_removed_node() {
        let t = tempfile::tempdir().expect("tempdir");
        let r = repo_with_sample(&t);
        r.update(|c| {
            c.nodes.push(NodeCfg {
                name: "node02".into(),
                host: "127.0.0.1".into(),
                admin_port: 8000,
                servers: vec![],
            });
            c.add_server("node02", "s2").map(|_| ())
        })
        .expect("add node");
        assert!(r.dir().join("nodes/node02/servers/s2.toml").is_file());
        r.update(|c| {
            c.nodes.retain(|n| n.name != "node02");
            Ok(())
        })
        .expect("remove node");
        assert!(!r.dir().join("nodes/node02").exists());
        assert_eq!(r.load().expect("load").nodes.len(), 1);
    }

    #[test]
    fn update_whose_closure_or_validation_fails_writes_nothing() {
        let t = tempfile::tempdir().expect("tempdir");
        let r = repo_with_sample(&t);
        let before = snapshot(r.dir());
        let e = r.update(|c| {
            c.add_server("node01", "server2")?;
            c.add_server("node01", "server1").map(|_| ())
        });
        assert!(matches!(e, Err(ConfigError::Duplicate { .. })), "{e:?}");
        assert_eq!(snapshot(r.dir()), before);
        let e = r.update(|c| {
            c.nodes[0].servers[0].monitor.ping_timeout_s = 0;
            Ok(())
        });
        match e {
            Err(ConfigError::Invalid { file, key, .. }) => {
                assert_eq!(file, server_file(&r));
                assert_eq!(key, "monitor.ping_timeout_s");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(snapshot(r.dir()), before);
    }

    #[test]
    fn concurrent_updates_all_land() {
        let t = tempfile::tempdir().expect("tempdir");
        let r = repo_with_sample(&t);
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let r = r.clone();
                std::thread::spawn(move || {
                    r.update(|c| c.add_server("node01", &format!("s{i}")).map(|_| ()))
                        .expect("update")
                        .version
                })
            })
            .collect();
        let mut versions: Vec<u64> = threads
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect();
        versions.sort();
        assert_eq!(
            versions,
            (2..=9).collect::<Vec<_>>(),
            "each update got its own version"
        );
        let cfg = r.load().expect("final files parse");
        assert_eq!(cfg.version, 9);
        assert_eq!(cfg.nodes[0].servers.len(), 9);
        for i in 0..8 {
            assert!(
                cfg.server("node01", &format!("s{i}")).is_some(),
                "s{i} lost"
            );
        }
    }

    #[test]
    fn update_waits_for_a_held_lock() {
        let t = tempfile::tempdir().expect("tempdir");
        let r = repo_with_sample(&t);
        let held = crate::fsx::RepoLock::exclusive(r.dir()).expect("lock");
        let r2 = r.clone();
        let h = std::thread::spawn(move || r2.update(|_| Ok(())).expect("update").version);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(
            r.version().expect("version"),
            1,
            "update must wait for the lock"
        );
        drop(held);
        assert_eq!(h.join().expect("thread"), 2);
    }

    #[test]
    fn sync_copies_reports_and_is_idempotent() {
        let t = tempfile::tempdir().expect("tempdir");
        let master = repo_with_sample(&t);
        let copy = Repository::at(t.path().join("node-config/node01"));
        assert_eq!(
            sync(&master, &copy).expect("sync"),
            SyncOutcome { from: None, to: 1 }
        );
        assert_eq!(copy.load().expect("copy"), master.load().expect("master"));
        let before = snapshot(copy.dir());
        assert_eq!(
            sync(&master, &copy).expect("sync"),
            SyncOutcome {
                from: Some(1),
                to: 1
            }
        );
        assert_eq!(
            snapshot(copy.dir()),
            before,
            "equal versions: nothing written"
        );

        master
            .update(|c| c.add_server("node01", "server2").map(|_| ()))
            .expect("update");
        master
            .update(|c| c.add_bus_member("bus1", "server2").map(|_| ()))
            .expect("update");
        assert_eq!(
            sync(&master, &copy).expect("sync"),
            SyncOutcome {
                from: Some(1),
                to: 3
            }
        );
        assert_eq!(copy.load().expect("copy"), master.load().expect("master"));

        // A damaged copy at the same version is repaired.
        std::fs::write(
            copy.dir().join("nodes/node01/servers/server2.toml"),
            "garbage = [",
        )
        .expect("write");
        assert_eq!(
            sync(&master, &copy).expect("sync"),
            SyncOutcome {
                from: Some(3),
                to: 3
            }
        );
        assert_eq!(copy.load().expect("copy"), master.load().expect("master"));
    }

    #[test]
    fn sync_from_an_invalid_master_leaves_the_copy_untouched() {
        let t = tempfile::tempdir().expect("tempdir");
        let master = repo_with_sample(&t);
        let copy = Repository::at(t.path().join("node-config/node01"));
        sync(&master, &copy).expect("sync");
        let before = snapshot(copy.dir());
        master
            .update(|c| c.add_server("node01", "server2").map(|_| ()))
            .expect("update");
        rewrite(
            &master.dir().join("nodes/node01/servers/server2.toml"),
            "bus_port = 7274",
            "bus_port = 1",
        );
        assert!(matches!(
            sync(&master, &copy),
            Err(ConfigError::Invalid { .. })
        ));
        assert_eq!(snapshot(copy.dir()), before);
    }

    #[test]
    fn update_adds_destinations_and_sets_initial_states() {
        use crate::model::{DestinationKind, Reliability};
        let t = tempfile::tempdir().expect("tempdir");
        let r = repo_with_sample(&t);
        let v = r.version().expect("version");
        let saved = r
            .update(|c| {
                c.add_destination(
                    "bus1",
                    "q1",
                    DestinationKind::Queue,
                    None,
                    Some(Reliability::ReliablePersistent),
                )?;
                c.set_initial_state("node01.server1-bus1", InitialState::Stopped)?;
                Ok(())
            })
            .expect("update");
        assert_eq!(saved.version, v + 1);
        let loaded = r.load().expect("load");
        assert_eq!(loaded, saved);
        let d = loaded.find_destination("bus1", "q1").expect("q1");
        assert_eq!(d.me, "node01.server1-bus1");
        assert_eq!(d.reliability, Reliability::ReliablePersistent);
        let (_, m) = loaded.find_me("node01.server1-bus1").expect("me");
        assert_eq!(m.initial_state, InitialState::Stopped);
        // A failing change writes nothing.
        let before = snapshot(r.dir());
        assert!(r
            .update(|c| c
                .add_destination("bus1", "q1", DestinationKind::Topic, None, None)
                .map(|_| ()))
            .is_err());
        assert_eq!(snapshot(r.dir()), before);
    }

    // --- property: any valid config survives replace + load ------------------------------------

    fn name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9][a-zA-Z0-9_.-]{0,20}"
    }

    fn monitor() -> impl Strategy<Value = MonitorPolicy> {
        (
            any::<bool>(),
            1u32..=3600,
            1u32..=3600,
            1u32..=100,
            1u32..=3600,
        )
            .prop_map(|(a, b, c, d, e)| MonitorPolicy {
                auto_restart: a,
                ping_interval_s: b,
                ping_timeout_s: c,
                max_start_attempts: d,
                start_timeout_s: e,
            })
    }

    fn reliability() -> impl Strategy<Value = Reliability> {
        prop::sample::select(Reliability::ALL.to_vec())
    }

    /// A destination's settings apart from its name, ME and exception destination:
    /// (kind, maximum, default, priority, max failed deliveries, exception destination index).
    type DestSeed = (
        bool,
        Reliability,
        Reliability,
        u8,
        u32,
        Option<prop::sample::Index>,
    );

    fn dest_seed() -> impl Strategy<Value = DestSeed> {
        (
            any::<bool>(),
            reliability(),
            reliability(),
            0u8..=9,
            1u32..=1000,
            prop::option::of(any::<prop::sample::Index>()),
        )
    }

    /// Destinations for a bus whose engines are `mes` (none when it has no member).
    fn destinations(
        mes: &[String],
        seeds: Vec<(String, prop::sample::Index, DestSeed)>,
    ) -> Vec<DestinationCfg> {
        if mes.is_empty() {
            return Vec::new();
        }
        let mut out: Vec<DestinationCfg> = seeds
            .iter()
            .enumerate()
            .map(|(j, (n, me, (queue, a, b, prio, mfd, _)))| DestinationCfg {
                name: format!("d{j}{n}"),
                kind: if *queue {
                    DestinationKind::Queue
                } else {
                    DestinationKind::Topic
                },
                me: mes[me.index(mes.len())].clone(),
                reliability: (*a).max(*b),
                default_reliability: (*a).min(*b),
                default_priority: *prio,
                max_failed_deliveries: *mfd,
                exception_destination: None,
            })
            .collect();
        let names: Vec<String> = out.iter().map(|d| d.name.clone()).collect();
        for (j, (_, _, (.., x))) in seeds.iter().enumerate() {
            if let Some(x) = x {
                let target = &names[x.index(names.len())];
                if *target != names[j] {
                    out[j].exception_destination = Some(target.clone());
                }
            }
        }
        out
    }

    prop_compose! {
        fn arb_config()(
            cell in name(),
            version in 1u64..=(i64::MAX as u64),
            nodes in prop::collection::vec((name(), prop::sample::select(vec!["127.0.0.1", "localhost", "10.1.2.3", "host-a.example"]), prop::collection::vec((name(), monitor()), 0..4)), 1..4),
            buses in prop::collection::vec((name(), prop::collection::vec((any::<prop::sample::Index>(), any::<bool>(), any::<u128>()), 0..5), prop::collection::vec((name(), any::<prop::sample::Index>(), dest_seed()), 0..4), any::<bool>(), 1024u64..=(256 << 20)), 0..3),
            start in 1024u16..40000,
            gaps in prop::collection::vec(1u16..100, 32),
        ) -> Config {
            let mut port = start;
            let mut gap = gaps.iter().cycle();
            let mut next = move || { port += *gap.next().expect("cycle"); port };
            let mut k = 0;
            let nodes: Vec<NodeCfg> = nodes.into_iter().enumerate().map(|(i, (n, host, servers))| NodeCfg {
                name: format!("{i}{n}"),
                host: host.to_string(),
                admin_port: next(),
                servers: servers.into_iter().map(|(s, monitor)| { k += 1; ServerCfg { name: format!("s{k}{s}"), admin_port: next(), bus_port: next(), monitor } }).collect(),
            }).collect();
            let all: Vec<(String, String)> = nodes.iter().flat_map(|n| n.servers.iter().map(|s| (n.name.clone(), s.name.clone()))).collect();
            let buses = buses.into_iter().enumerate().map(|(i, (b, members, dests, allow_anonymous, max_message_bytes))| {
                let bus = format!("b{i}{b}");
                let mut out: Vec<BusMember> = Vec::new();
                for (idx, started, u) in members {
                    if all.is_empty() { break; }
                    let (node, server) = &all[idx.index(all.len())];
                    if out.iter().any(|m| &m.server == server) { continue; }
                    out.push(BusMember {
                        me: crate::model::me_name(node, server, &bus),
                        node: node.clone(),
                        server: server.clone(),
                        uuid: uuid::Uuid::from_u128(u ^ ((i as u128) << 100) ^ (out.len() as u128)).to_string(),
                        initial_state: if started { InitialState::Started } else { InitialState::Stopped },
                        store_url: (!started).then(|| format!("postgresql://keel@127.0.0.1:5432/db{i}")),
                    });
                }
                let mes: Vec<String> = out.iter().map(|m| m.me.clone()).collect();
                BusCfg { name: bus, members: out, destinations: destinations(&mes, dests), allow_anonymous, anonymous_user: None, max_message_bytes, duplicate_window_hours: 1 + (max_message_bytes % 500) as u32 }
            }).collect();
            let mut c = Config { version, cell: Cell { name: cell }, nodes, buses, datasources: Vec::new(), apps: Vec::new(), users: Vec::new() };
            c.canonicalize();
            c
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn any_valid_config_round_trips_through_replace_and_load(a in arb_config(), b in arb_config()) {
            // Generated uuids may collide across buses only with negligible probability; the
            // generator must produce valid configs, so check that first.
            prop_assume!(a.validate().is_ok() && b.validate().is_ok());
            let t = tempfile::tempdir().expect("tempdir");
            let r = Repository::at(t.path().join("config"));
            r.replace(&a).expect("replace a");
            prop_assert_eq!(r.load().expect("load a"), a);
            // Replacing with another config removes every file of the first.
            r.replace(&b).expect("replace b");
            prop_assert_eq!(r.load().expect("load b"), b);
        }
    }
}
