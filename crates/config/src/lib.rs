//! Keel's configuration: the profile directory, the cell's configuration repository (master
//! and node copies, TOML files), node synchronization, and config backup/restore.
//!
//! Modelled on WebSphere: a *profile* holds one cell; the cell's *master repository*
//! (`config/`) is changed only through [`Repository::update`], which bumps a version number;
//! each node keeps a synchronized copy ([`sync`]) and knows it is behind by comparing versions.
//! Every file is checked on load ([`Repository::load`]) and every error names the file, the
//! key and the fix, because operators edit these files by hand.

pub mod backup;
mod error;
mod files;
mod fsx;
mod model;
mod profile;
mod repo;

pub use backup::{
    create_backup, restore_backup, verify_backup, BackupInfo, RestoreInfo, VerifiedBackup,
};
pub use error::{ConfigError, Result};
pub use model::{
    me_name, system_exception_destination, BusCfg, BusMember, Cell, Config, DestinationCfg,
    DestinationKind, InitialState, MonitorPolicy, NodeCfg, Reliability, ServerCfg,
    DEFAULT_MAX_FAILED_DELIVERIES, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_PRIORITY,
    MAX_DESTINATION_NAME_LEN, MAX_FAILED_DELIVERIES, MAX_MESSAGE_BYTES, MAX_PRIORITY,
    MIN_MESSAGE_BYTES, SYSTEM_PREFIX,
};
pub use profile::{CreateOptions, Profile};
pub use repo::{sync, Repository, SyncOutcome};
