//! `keel config backup|restore|validate|sync` and `keel bus add-member`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Result};
use clap::{Args, Subcommand};
use keel_config::Profile;

use crate::ctx::{runtime, Ctx, NodeAgent};

#[derive(Args, Debug, Clone, Copy)]
pub struct SyncFlag {
    /// Synchronize the change to the node now (otherwise at the next server start or sync).
    #[arg(long)]
    pub sync: bool,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Archive the master configuration (manifest with versions, time and checksums).
    Backup {
        /// The archive to write (default backups/config-<cell>-v<version>-<time>.keelcfg).
        #[arg(long)]
        to: Option<PathBuf>,
    },
    /// Replace the master configuration from an archive; the replaced files are kept aside.
    Restore {
        /// The archive (made by `keel config backup`).
        file: PathBuf,
        #[command(flatten)]
        sync: SyncFlag,
    },
    /// Check every configuration file; report the first problem with its file, key and fix.
    Validate,
    /// Copy the master configuration to the node now.
    Sync,
}

#[derive(Subcommand, Debug)]
pub enum BusCmd {
    /// Make a server a member of a bus; it gets the messaging engine <node>.<server>-<bus>.
    AddMember {
        /// The bus (created if it does not exist yet).
        bus: String,
        /// The server that joins it.
        #[arg(long)]
        server: String,
        #[command(flatten)]
        sync: SyncFlag,
    },
    /// Let anonymous AMQP clients (SASL ANONYMOUS) onto a bus, acting as a named user whose
    /// bus roles are theirs, or stop letting them on. Servers apply it when they start.
    Anonymous {
        /// The bus.
        bus: String,
        /// on: allow anonymous clients; off: refuse them.
        #[arg(value_parser = ["on", "off"])]
        allow: String,
        /// The user they act as (default: the bus's current one, `anonymous` unless set).
        #[arg(long = "as", value_name = "USER")]
        user: Option<String>,
        #[command(flatten)]
        sync: SyncFlag,
    },
}

pub fn run(ctx: &Ctx, cmd: ConfigCmd) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    match cmd {
        ConfigCmd::Backup { to } => {
            let info = keel_config::create_backup(&profile, to.as_deref())?;
            println!(
                "Backed up configuration of cell {} (version {}, {} files, {} bytes) to {}",
                info.cell,
                info.version,
                info.files,
                info.bytes,
                info.path.display()
            );
        }
        ConfigCmd::Restore { file, sync } => {
            let info = keel_config::restore_backup(&profile, &file)?;
            println!(
                "Restored configuration from {} (was version {}, now version {}); the replaced files are in {}",
                file.display(),
                info.from_version,
                info.to_version,
                info.set_aside.display()
            );
            after_save(ctx, &profile, sync.sync)?;
        }
        ConfigCmd::Validate => {
            let cfg = profile.master().load()?;
            let servers: usize = cfg.nodes.iter().map(|n| n.servers.len()).sum();
            println!(
                "Configuration of cell {} is valid (version {}: {} node(s), {servers} server(s), {} bus(es)).",
                cfg.cell.name,
                cfg.version,
                cfg.nodes.len(),
                cfg.buses.len()
            );
        }
        ConfigCmd::Sync => println!("{}", sync_now(ctx, &profile)?),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_bus(ctx: &Ctx, cmd: BusCmd) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    match cmd {
        BusCmd::AddMember { bus, server, sync } => {
            let cfg = profile
                .master()
                .update(|c| c.add_bus_member(&bus, &server).map(|_| ()))?;
            let m = cfg
                .buses
                .iter()
                .find(|b| b.name == bus)
                .and_then(|b| b.members.iter().find(|m| m.server == server))
                .ok_or_else(|| anyhow!("member {server} of bus {bus} vanished after saving"))?;
            println!("Server {server} is a member of bus {bus} with messaging engine {} (uuid {}); configuration version {}.", m.me, m.uuid, cfg.version);
            after_save(ctx, &profile, sync.sync)?;
        }
        BusCmd::Anonymous {
            bus,
            allow,
            user,
            sync,
        } => {
            crate::user_cmd::upgrade(&profile)?;
            let allow = allow == "on";
            let cfg = profile
                .master()
                .update(|c| c.set_anonymous(&bus, allow, user.as_deref()).map(|_| ()))?;
            let b = cfg
                .buses
                .iter()
                .find(|b| b.name == bus)
                .ok_or_else(|| anyhow!("bus {bus} vanished after saving"))?;
            if allow {
                println!("Anonymous clients may connect to bus {bus}, acting as user {} (its bus roles are theirs); servers apply it when they start.", b.anonymous_user());
            } else {
                println!(
                    "Anonymous clients are refused on bus {bus}; servers apply it when they start."
                );
            }
            after_save(ctx, &profile, sync.sync)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// After a change to the master: synchronize now with `--sync`, else say when it applies.
pub fn after_save(ctx: &Ctx, profile: &Profile, sync: bool) -> Result<()> {
    println!("{}", after_save_text(ctx, profile, sync)?);
    Ok(())
}

/// [`after_save`]'s work, returning its sentence instead of printing it (for `--json`).
pub fn after_save_text(ctx: &Ctx, profile: &Profile, sync: bool) -> Result<String> {
    if sync {
        sync_now(ctx, profile)
    } else {
        Ok("Saved to the master configuration; the node picks it up at its next synchronization (a server start, or `keel config sync`).".into())
    }
}

/// Through the node agent when it runs (it logs ADMN0020I), else directly on the files.
fn sync_now(ctx: &Ctx, profile: &Profile) -> Result<String> {
    let node = profile.local_node()?;
    let rt = runtime()?;
    let (from, to) = match NodeAgent::connect(ctx, &rt, profile) {
        Ok(na) => {
            let v = na.invoke(&rt, "syncConfig", vec![], Duration::from_secs(30))?;
            (v["from"].as_u64(), v["to"].as_u64().unwrap_or(0))
        }
        Err(_) => {
            let o = keel_config::sync(&profile.master(), &profile.node_copy(&node))?;
            (o.from, o.to)
        }
    };
    Ok(match from {
        Some(f) if f == to => format!("Node {node} already has configuration version {to}."),
        Some(f) => format!("Synchronized node {node} from configuration version {f} to {to}."),
        None => format!("Synchronized node {node} to configuration version {to}."),
    })
}
