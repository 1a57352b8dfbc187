//! Keel's configuration: the profile directory and its secrets (the admin credential, data
//! source passwords), the cell's configuration repository (master and node copies, TOML files:
//! nodes, servers, buses, data sources, applications), node synchronization, and config
//! backup/restore.
//!
//! Modelled on WebSphere: a *profile* holds one cell; the cell's *master repository*
//! (`config/`) is changed only through [`Repository::update`], which bumps a version number;
//! each node keeps a synchronized copy ([`sync`]) and knows it is behind by comparing versions.
//! Every file is checked on load ([`Repository::load`]) and every error names the file, the
//! key and the fix, because operators edit these files by hand.

pub mod backup;
mod certs;
mod error;
mod files;
mod fsx;
mod model;
mod paths;
mod profile;
mod repo;

pub use backup::{
    create_backup, restore_backup, verify_backup, BackupInfo, RestoreInfo, VerifiedBackup,
};
pub use certs::identities;
pub use error::{ConfigError, Result};
pub use fsx::write_pid_file;
pub use model::{
    me_name, system_exception_destination, take_url_password, url_has_password, AdminRole, AppCfg,
    AppKind, BusCfg, BusGrant, BusMember, BusRole, Cell, Config, DataSourceCfg, DataSourceKind,
    DestinationCfg, DestinationKind, Grants, InitialState, MonitorPolicy, NodeCfg, Reliability,
    ServerCfg, UserCfg, DEFAULT_ANONYMOUS_USER, DEFAULT_APP_CONCURRENCY, DEFAULT_APP_TIMEOUT_S,
    DEFAULT_MAX_FAILED_DELIVERIES, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_POOL_MAX, DEFAULT_PRIORITY,
    MAX_APP_CONCURRENCY, MAX_DESTINATION_NAME_LEN, MAX_FAILED_DELIVERIES, MAX_MESSAGE_BYTES,
    MAX_POOL_MAX, MAX_PRIORITY, MAX_SCRIPT_BYTES, MAX_STATEMENT_BYTES, MIN_MESSAGE_BYTES,
    SYSTEM_PREFIX,
};
pub use profile::{read_datasource_password, CreateOptions, Profile};
pub use repo::{sync, Repository, SyncOutcome};
