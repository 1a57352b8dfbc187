//! Who is calling, and with which rights (DESIGN §10): password hashes (`password`, Argon2id),
//! SCRAM-SHA-256 verifiers (`scram`), the users a running process checks logins against
//! (`users`, read again when the configuration changes), and the one-time upgrade of profiles
//! made before users existed (`upgrade`). The roles themselves and the rule that says whether
//! grants allow an action are `keel_core::roles`; the configuration's users are
//! `keel_config::UserCfg`.
//!
//! Deliberately absent: any network code. The admin port and the bus port call
//! [`Users::authenticate`] and check [`Principal::grants`] themselves.

pub mod password;
pub mod scram;
mod upgrade;
mod users;

pub use upgrade::{ensure_users, new_user, UpgradeOutcome};
pub use users::{Principal, Users, LEGACY_ADMIN, USERS_REFRESH_MS};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the operating system gave no random bytes for a salt: {0}")]
    Random(String),
    #[error("could not hash the password: {0}")]
    Hash(String),
    #[error("the users could not be read from the configuration: {0}; the users read before stay in force")]
    Config(String),
    #[error("{0}")]
    Profile(#[from] keel_config::ConfigError),
}
