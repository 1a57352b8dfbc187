//! New users, and the one-time upgrade of a profile made before users existed: its admin
//! password (secrets/admin-password, which `keel` commands on the profile's host still use to
//! log in) becomes user `admin`, Administrator, in the master configuration.

use keel_config::{AdminRole, Profile, UserCfg};

use crate::scram::Verifier;
use crate::{AuthError, LEGACY_ADMIN};

/// A user with verifiers made from `password` (None: cannot log in with a password).
pub fn new_user(
    name: &str,
    password: Option<&str>,
    roles: Vec<AdminRole>,
) -> Result<UserCfg, AuthError> {
    let (password_hash, scram_sha_256) = match password {
        Some(p) => (
            Some(crate::password::hash(p)?),
            Some(Verifier::new(p)?.to_string()),
        ),
        None => (None, None),
    };
    Ok(UserCfg {
        name: name.into(),
        password_hash,
        scram_sha_256,
        roles,
        grants: Vec::new(),
    })
}

/// What [`ensure_users`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeOutcome {
    /// The configuration had users already.
    HadUsers,
    /// User `admin` was made from the profile's admin password (ADMN0043I said so).
    MadeAdmin,
}

/// Makes user `admin` (Administrator) from the profile's admin password if the master
/// configuration has no users; says so once (ADMN0043I), which the caller logs or prints.
pub fn ensure_users(profile: &Profile) -> Result<UpgradeOutcome, AuthError> {
    if !profile.master().load()?.users.is_empty() {
        return Ok(UpgradeOutcome::HadUsers);
    }
    let password = profile.admin_password()?;
    // Hashed outside the repository's lock: Argon2 takes a while.
    let admin = new_user(
        LEGACY_ADMIN,
        Some(&password),
        vec![AdminRole::Administrator],
    )?;
    let mut made = false;
    profile.master().update(|cfg| {
        // Another process may have made users meanwhile: then there is nothing to do.
        if cfg.users.is_empty() {
            cfg.add_user(admin)?;
            made = true;
        }
        Ok(())
    })?;
    Ok(if made {
        UpgradeOutcome::MadeAdmin
    } else {
        UpgradeOutcome::HadUsers
    })
}
