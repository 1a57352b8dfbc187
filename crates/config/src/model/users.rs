//! Edits of users and their roles. Verifiers are made by the caller (`keel-auth`): this module
//! never sees a password. Every edit keeps one rule the listeners rely on: the cell keeps at
//! least one Administrator who can log in with a password, so no edit can lock every operator
//! out.

use crate::error::{ConfigError, Result};
use crate::fsx::natural_cmp;
use crate::paths::rel_user;

use super::edit::bad_name;
use super::types::*;
use super::validate::check_user;

impl Config {
    pub fn user(&self, name: &str) -> Option<&UserCfg> {
        self.users.iter().find(|u| u.name == name)
    }

    fn user_mut(&mut self, name: &str) -> Result<&mut UserCfg> {
        let known: Vec<String> = self.users.iter().map(|u| u.name.clone()).collect();
        self.users
            .iter_mut()
            .find(|u| u.name == name)
            .ok_or(ConfigError::UnknownUser {
                name: name.into(),
                known,
            })
    }

    /// Whether some user other than `except` is an Administrator with a password.
    fn another_administrator(&self, except: &str) -> bool {
        self.users.iter().any(|u| {
            u.name != except
                && u.password_hash.is_some()
                && u.roles.contains(&AdminRole::Administrator)
        })
    }

    /// Adds a user after checking it (name, verifier forms, grants).
    pub fn add_user(&mut self, u: UserCfg) -> Result<&UserCfg> {
        bad_name("user", &u.name)?;
        if self.user(&u.name).is_some() {
            return Err(ConfigError::Duplicate {
                what: "user",
                name: u.name,
                place: String::new(),
            });
        }
        check_user(&rel_user(&u.name), &u)?;
        let at = self
            .users
            .partition_point(|x| natural_cmp(&x.name, &u.name).is_lt());
        self.users.insert(at, u);
        Ok(&self.users[at])
    }

    /// Removes a user; refused for the last Administrator who can log in and for a bus's
    /// anonymous user.
    pub fn remove_user(&mut self, name: &str) -> Result<UserCfg> {
        let at = self
            .users
            .iter()
            .position(|u| u.name == name)
            .ok_or_else(|| ConfigError::UnknownUser {
                name: name.into(),
                known: self.users.iter().map(|u| u.name.clone()).collect(),
            })?;
        let what = format!("removing user `{name}`");
        if self.users[at].roles.contains(&AdminRole::Administrator)
            && !self.another_administrator(name)
        {
            return Err(ConfigError::UserChangeRefused {
                what,
                why: "it is the cell's last Administrator with a password; make another Administrator first".into(),
            });
        }
        if let Some(b) = self
            .buses
            .iter()
            .find(|b| b.allow_anonymous && b.anonymous_user() == name)
        {
            return Err(ConfigError::UserChangeRefused {
                what,
                why: format!("anonymous clients of bus `{}` act as this user; set the bus's anonymous_user to another user or stop allowing anonymous clients first", b.name),
            });
        }
        Ok(self.users.remove(at))
    }

    /// Replaces a user's verifiers (a password change, or None: no password login).
    pub fn set_user_verifiers(
        &mut self,
        name: &str,
        password_hash: Option<String>,
        scram_sha_256: Option<String>,
    ) -> Result<&UserCfg> {
        if password_hash.is_none()
            && self
                .user(name)
                .is_some_and(|u| u.roles.contains(&AdminRole::Administrator))
            && !self.another_administrator(name)
        {
            return Err(ConfigError::UserChangeRefused {
                what: format!("taking the password of user `{name}`"),
                why: "it is the cell's last Administrator with a password".into(),
            });
        }
        let u = self.user_mut(name)?;
        u.password_hash = password_hash;
        u.scram_sha_256 = scram_sha_256;
        check_user(&rel_user(name), u)?;
        Ok(u)
    }

    /// Grants an administrative role; false if the user held it already.
    pub fn grant_admin(&mut self, name: &str, role: AdminRole) -> Result<bool> {
        let u = self.user_mut(name)?;
        if u.roles.contains(&role) {
            return Ok(false);
        }
        u.roles.push(role);
        u.roles.sort();
        Ok(true)
    }

    /// Revokes an administrative role; false if the user did not hold it. Refused when it
    /// would leave the cell without an Administrator who can log in.
    pub fn revoke_admin(&mut self, name: &str, role: AdminRole) -> Result<bool> {
        if role == AdminRole::Administrator
            && self.user(name).is_some_and(|u| u.roles.contains(&role))
            && !self.another_administrator(name)
        {
            return Err(ConfigError::UserChangeRefused {
                what: format!("revoking Administrator from user `{name}`"),
                why: "it is the cell's last Administrator with a password; make another Administrator first".into(),
            });
        }
        let u = self.user_mut(name)?;
        let before = u.roles.len();
        u.roles.retain(|r| *r != role);
        Ok(u.roles.len() != before)
    }

    /// Grants a bus role (checked like a user file's `[[grant]]`); false if held already.
    pub fn grant_bus(&mut self, name: &str, grant: BusGrant) -> Result<bool> {
        let u = self.user_mut(name)?;
        if u.grants.contains(&grant) {
            return Ok(false);
        }
        // Checked on a copy, so a refused grant leaves the configuration as it was.
        let mut next = u.clone();
        next.grants.push(grant);
        next.grants.sort();
        check_user(&rel_user(name), &next)?;
        *u = next;
        Ok(true)
    }

    /// Lets anonymous clients (SASL ANONYMOUS) onto `bus`, acting as user `user` (its grants
    /// are theirs), or stops letting them on. The user must exist.
    pub fn set_anonymous(&mut self, bus: &str, allow: bool, user: Option<&str>) -> Result<&BusCfg> {
        if let Some(u) = user {
            if self.user(u).is_none() {
                return Err(ConfigError::UnknownUser {
                    name: u.into(),
                    known: self.users.iter().map(|u| u.name.clone()).collect(),
                });
            }
        }
        let known: Vec<String> = self.buses.iter().map(|b| b.name.clone()).collect();
        let has_users = !self.users.is_empty();
        let exists = |name: &str| self.users.iter().any(|u| u.name == name);
        let Some(at) = self.buses.iter().position(|b| b.name == bus) else {
            return Err(ConfigError::UnknownBus {
                bus: bus.into(),
                known,
            });
        };
        let effective = user
            .map(str::to_string)
            .unwrap_or_else(|| self.buses[at].anonymous_user().to_string());
        if allow && has_users && !exists(&effective) {
            return Err(ConfigError::UserChangeRefused {
                what: format!("letting anonymous clients onto bus `{bus}`"),
                why: format!("they would act as user `{effective}`, which does not exist; add it with `keel user add {effective} --no-password` and grant it the bus roles they need, or name another user with --as"),
            });
        }
        let b = &mut self.buses[at];
        b.allow_anonymous = allow;
        if let Some(u) = user {
            b.anonymous_user = Some(u.to_string());
        }
        Ok(b)
    }

    /// Revokes exactly one bus grant; false if the user did not hold it.
    pub fn revoke_bus(&mut self, name: &str, grant: &BusGrant) -> Result<bool> {
        let u = self.user_mut(name)?;
        let before = u.grants.len();
        u.grants.retain(|g| g != grant);
        Ok(u.grants.len() != before)
    }
}
