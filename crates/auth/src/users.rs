//! The users a process checks logins against: a snapshot of the configuration's users, read
//! again when the repository changes (`refresh`, which the process calls on a ticker), so a
//! password change or a removed user takes effect without a restart. Connections subscribe to
//! the snapshot's generation to notice a removed user (`subscribe`).
//!
//! A configuration without users is a profile made before users existed: then the profile's
//! admin credential (`secrets/admin-password`) logs in as `admin`, Administrator, until
//! `ensure_users` makes the user.
//!
//! Argon2 costs tens of milliseconds by design; a `keel` command makes several admin requests
//! with one password. A successful check is remembered as an HMAC, under a key made at start
//! and never stored, of (user, hash, password): a changed hash misses, nothing stored in memory
//! is the password or a fast hash of it alone, and the set is bounded.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use hmac::{Hmac, KeyInit, Mac};
use keel_config::{Config, Grants, Repository, UserCfg};
use sha2::Sha256;

use crate::scram::Verifier;
use crate::AuthError;

/// How often a process looks for changed users: a password change or a removed user takes
/// effect within this (plus the node agent's sync of the configuration).
pub const USERS_REFRESH_MS: u64 = 1_000;
/// Most remembered successful logins; the set is emptied when full.
const CACHED_LOGINS_MAX: usize = 1024;
/// The user a profile without users logs in as.
pub const LEGACY_ADMIN: &str = "admin";

/// Who a caller is once authenticated, and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    pub grants: Grants,
}

struct Snapshot {
    users: BTreeMap<String, UserCfg>,
    /// The admin password of a profile without users.
    legacy_admin: Option<String>,
    /// (inode, modified ns, length) of cell.toml when read: a save replaces the file.
    stamp: Option<(u64, i128, u64)>,
}

pub struct Users {
    snapshot: RwLock<Arc<Snapshot>>,
    /// Where to read users again; None: fixed (tests, tools).
    repo: Option<Repository>,
    legacy_file: Option<PathBuf>,
    cache_key: [u8; 32],
    cache: Mutex<HashSet<[u8; 32]>>,
    generation: tokio::sync::watch::Sender<u64>,
}

fn stamp(repo: &Repository) -> Option<(u64, i128, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(repo.dir().join("cell.toml")).ok()?;
    Some((
        m.ino(),
        i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        m.len(),
    ))
}

fn read_legacy(file: &Option<PathBuf>) -> Option<String> {
    let text = std::fs::read_to_string(file.as_ref()?).ok()?;
    let pw = text.trim();
    (!pw.is_empty()).then(|| pw.to_string())
}

/// Compares in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    std::hint::black_box(diff) == 0
}

impl Users {
    fn build(
        cfg: Option<&Config>,
        repo: Option<Repository>,
        legacy_file: Option<PathBuf>,
    ) -> Result<Users, AuthError> {
        let mut cache_key = [0u8; 32];
        getrandom::fill(&mut cache_key).map_err(|e| AuthError::Random(e.to_string()))?;
        let users = Users {
            snapshot: RwLock::new(Arc::new(Snapshot {
                users: BTreeMap::new(),
                legacy_admin: None,
                stamp: None,
            })),
            repo,
            legacy_file,
            cache_key,
            cache: Mutex::new(HashSet::new()),
            generation: tokio::sync::watch::Sender::new(0),
        };
        match cfg {
            Some(cfg) => users.install(cfg, None),
            None => users.reload()?,
        }
        Ok(users)
    }

    /// Fixed users (tests and tools): never read again. `legacy_admin` is the admin password
    /// of a configuration without users.
    pub fn fixed(cfg: &Config, legacy_admin: Option<String>) -> Result<Users, AuthError> {
        let users = Users::build(Some(cfg), None, None)?;
        if cfg.users.is_empty() {
            *users.write() = Arc::new(Snapshot {
                users: BTreeMap::new(),
                legacy_admin,
                stamp: None,
            });
        }
        Ok(users)
    }

    /// Only the legacy `admin` (Administrator) with `password`: tools and tests.
    pub fn admin_only(password: &str) -> Result<Users, AuthError> {
        let empty = Config {
            version: 1,
            cell: keel_config::Cell {
                name: "keel".into(),
            },
            nodes: Vec::new(),
            buses: Vec::new(),
            datasources: Vec::new(),
            apps: Vec::new(),
            users: Vec::new(),
        };
        Users::fixed(&empty, Some(password.to_string()))
    }

    /// The users of `repo`, read again by [`Users::refresh`] when it changes; `legacy_file`
    /// is the profile's admin password file, used only while the repository has no users.
    pub fn watching(repo: Repository, legacy_file: PathBuf) -> Result<Users, AuthError> {
        Users::build(None, Some(repo), Some(legacy_file))
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Arc<Snapshot>> {
        self.snapshot.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn install(&self, cfg: &Config, stamp: Option<(u64, i128, u64)>) {
        let legacy_admin = if cfg.users.is_empty() {
            read_legacy(&self.legacy_file)
        } else {
            None
        };
        let snapshot = Snapshot {
            users: cfg
                .users
                .iter()
                .map(|u| (u.name.clone(), u.clone()))
                .collect(),
            legacy_admin,
            stamp,
        };
        *self.write() = Arc::new(snapshot);
        self.generation.send_modify(|g| *g += 1);
    }

    fn reload(&self) -> Result<(), AuthError> {
        let Some(repo) = &self.repo else {
            return Ok(());
        };
        let stamp = stamp(repo);
        let cfg = repo.load().map_err(|e| AuthError::Config(e.to_string()))?;
        self.install(&cfg, stamp);
        Ok(())
    }

    /// Reads the users again if the repository changed since the last read. On a
    /// configuration that does not load, keeps the users it has and says why.
    pub fn refresh(&self) -> Result<bool, AuthError> {
        let Some(repo) = &self.repo else {
            return Ok(false);
        };
        if stamp(repo) == self.read().stamp {
            return Ok(false);
        }
        self.reload()?;
        Ok(true)
    }

    /// Calls [`Users::refresh`] every [`USERS_REFRESH_MS`] for as long as the task runs,
    /// logging a configuration that does not load once per distinct reason.
    pub async fn keep_fresh(self: Arc<Users>) {
        let mut last_error = String::new();
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(USERS_REFRESH_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let users = self.clone();
            // Loading parses the repository: a blocking read, off the runtime's workers.
            let refreshed = tokio::task::spawn_blocking(move || users.refresh()).await;
            match refreshed {
                Ok(Ok(true)) => {
                    last_error.clear();
                    tracing::info!("read the users again: the configuration changed");
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    let text = e.to_string();
                    if text != last_error {
                        tracing::warn!("{text}");
                        last_error = text;
                    }
                }
                Err(e) => tracing::warn!("reading the users ended abnormally: {e}"),
            }
        }
    }

    /// Bumped on every read of the users: a connection re-checks its user when it changes.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Whether the configuration has users (false: a profile made before users existed).
    pub fn configured(&self) -> bool {
        !self.read().users.is_empty()
    }

    /// The principal of user `name` as it stands now, without a password (anonymous clients'
    /// user, a caller a node agent forwards for, a still-open connection's user).
    pub fn principal(&self, name: &str) -> Option<Principal> {
        let s = self.read();
        match s.users.get(name) {
            Some(u) => Some(Principal {
                user: u.name.clone(),
                grants: u.grants(),
            }),
            None if s.users.is_empty() && name == LEGACY_ADMIN => Some(Principal {
                user: LEGACY_ADMIN.into(),
                grants: Grants::administrator(),
            }),
            None => None,
        }
    }

    /// The SCRAM-SHA-256 verifier of `name`, if it has one.
    pub fn scram(&self, name: &str) -> Option<Verifier> {
        let s = self.read();
        let text = s.users.get(name)?.scram_sha_256.as_deref()?;
        Verifier::parse(text)
    }

    /// The verifier a SCRAM exchange about `name` runs against: the user's own, else one no
    /// password matches, with a salt that is the same for the same name in this process (a
    /// changing salt would tell that the user does not exist).
    pub fn scram_or_decoy(&self, name: &str) -> Result<Verifier, AuthError> {
        if let Some(v) = self.scram(name) {
            return Ok(v);
        }
        let salt = self.cache_mac("scram decoy salt", "", name);
        Verifier::unmatchable(&salt[..16])
    }

    fn cache_mac(&self, user: &str, phc: &str, password: &str) -> [u8; 32] {
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&self.cache_key).expect("any key length");
        for part in [user, phc, password] {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part.as_bytes());
        }
        mac.finalize().into_bytes().into()
    }

    /// Checks a user name and password (HTTP Basic, SASL PLAIN). The refusal never says which
    /// of the two was wrong. May take tens of milliseconds (Argon2): call it off the async
    /// runtime's worker threads.
    pub fn authenticate(&self, user: &str, password: &str) -> Result<Principal, String> {
        let wrong = || format!("wrong user or password for user {user:?}");
        let s = self.read();
        if s.users.is_empty() {
            let ok = s.legacy_admin.as_deref().is_some_and(|pw| {
                constant_time_eq(user.as_bytes(), LEGACY_ADMIN.as_bytes())
                    & constant_time_eq(password.as_bytes(), pw.as_bytes())
            });
            return if ok {
                Ok(Principal {
                    user: LEGACY_ADMIN.into(),
                    grants: Grants::administrator(),
                })
            } else {
                Err(wrong())
            };
        }
        let Some(u) = s.users.get(user) else {
            // Spend about what a real check costs, so timing does not tell which users exist.
            let _ = crate::password::verify(DECOY_HASH, password);
            return Err(wrong());
        };
        let Some(phc) = u.password_hash.as_deref() else {
            // A user without a password (a bus's anonymous user) cannot log in; it is refused
            // in the same words and time as a wrong password, so probing tells nothing.
            let _ = crate::password::verify(DECOY_HASH, password);
            return Err(wrong());
        };
        let mac = self.cache_mac(user, phc, password);
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&mac);
        if !cached {
            if !crate::password::verify(phc, password) {
                return Err(wrong());
            }
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= CACHED_LOGINS_MAX {
                cache.clear();
            }
            cache.insert(mac);
        }
        Ok(Principal {
            user: u.name.clone(),
            grants: u.grants(),
        })
    }
}

/// An Argon2id hash of nothing anyone knows, checked for unknown users.
const DECOY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$a2VlbGRlY295c2FsdA$9a4pq9kH6q1x8mJr2hQbQq8n5hY0dE9x1cFzq3Ww1lE";

#[cfg(test)]
mod tests {
    use super::*;
    use keel_config::{AdminRole, Cell};

    fn cfg(users: Vec<UserCfg>) -> Config {
        Config {
            version: 1,
            cell: Cell { name: "c".into() },
            nodes: vec![],
            buses: vec![],
            datasources: vec![],
            apps: vec![],
            users,
        }
    }

    fn user(name: &str, password: Option<&str>, roles: Vec<AdminRole>) -> UserCfg {
        UserCfg {
            name: name.into(),
            password_hash: password.map(|p| crate::password::hash(p).unwrap()),
            scram_sha_256: None,
            roles,
            grants: vec![],
        }
    }

    #[test]
    fn the_decoy_is_a_real_hash() {
        assert!(argon2::password_hash::PasswordHash::new(DECOY_HASH).is_ok());
    }

    #[test]
    fn passwords_roles_and_the_cache() {
        let users = Users::fixed(
            &cfg(vec![
                user("alice", Some("alice-password"), vec![AdminRole::Monitor]),
                user("guest", None, vec![]),
            ]),
            Some("legacy-is-ignored".into()),
        )
        .unwrap();
        let p = users.authenticate("alice", "alice-password").unwrap();
        assert!(p.grants.admin(AdminRole::Monitor) && !p.grants.admin(AdminRole::Operator));
        // Second time from the cache, same answer; a wrong password never hits it.
        assert_eq!(users.authenticate("alice", "alice-password").unwrap(), p);
        let wrong = users.authenticate("alice", "alice-passwort").unwrap_err();
        let unknown = users.authenticate("bob", "alice-password").unwrap_err();
        assert_eq!(
            wrong.replace("alice", "bob"),
            unknown,
            "the refusal does not tell which part was wrong"
        );
        assert_eq!(
            users.authenticate("guest", "").unwrap_err(),
            "wrong user or password for user \"guest\"",
            "a user without a password is refused like a wrong password"
        );
        assert!(users.authenticate("admin", "legacy-is-ignored").is_err());
        assert!(users.principal("guest").is_some() && users.principal("bob").is_none());
    }

    #[test]
    fn scram_decoys_keep_their_salt_and_match_nothing() {
        let alice = crate::new_user("alice", Some("alice-password"), vec![]).unwrap();
        let users = Users::fixed(&cfg(vec![alice]), None).unwrap();
        let a = users.scram_or_decoy("nobody").unwrap();
        let b = users.scram_or_decoy("nobody").unwrap();
        assert_eq!(a.salt, b.salt, "the same name gets the same salt");
        assert_ne!(a.stored_key, b.stored_key);
        assert_ne!(users.scram_or_decoy("somebody").unwrap().salt, a.salt);
        assert_eq!(
            users.scram_or_decoy("alice").unwrap(),
            users.scram("alice").unwrap()
        );
    }

    #[test]
    fn without_users_the_legacy_admin_password_logs_in_as_administrator() {
        let users = Users::fixed(&cfg(vec![]), Some("s3cret-admin".into())).unwrap();
        let p = users.authenticate("admin", "s3cret-admin").unwrap();
        assert!(p.grants.is_administrator());
        assert!(users.authenticate("admin", "s3cret-admiN").is_err());
        assert!(users.authenticate("root", "s3cret-admin").is_err());
        assert!(!users.configured());
    }
}
