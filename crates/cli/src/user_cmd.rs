//! `keel user add|remove|list|passwd` and `keel role grant|revoke|list` (DESIGN §10): the
//! cell's users and what they may do. Passwords come from an environment variable or stdin,
//! never from the command line (it would sit in the shell history and `ps`), and are kept only
//! as an Argon2id hash and a SCRAM-SHA-256 verifier in the configuration.
//!
//! Every change is saved to the master and copied to this node's configuration at once; the
//! node agent and servers read users again within `keel_auth::USERS_REFRESH_MS`, so a new
//! password applies to the next login and a removed user's AMQP connections are closed.

use std::io::BufRead;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use keel_config::{AdminRole, BusGrant, BusRole, Profile};
use serde_json::{json, Value};

use crate::ctx::{print_json, Ctx};

#[derive(Args, Debug)]
pub struct PasswordFrom {
    /// Read the password from this environment variable.
    #[arg(long, value_name = "VAR", conflicts_with = "password_stdin")]
    password_env: Option<String>,
    /// Read the password from the first line of stdin.
    #[arg(long)]
    password_stdin: bool,
}

#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// Add a user with a password (`--password-env VAR` or `--password-stdin`), or one that
    /// cannot log in (`--no-password`: what a bus's anonymous clients act as).
    Add {
        /// The user's name (letters, digits, `_`, `.`, `-`).
        name: String,
        /// Administrative roles: Administrator, Configurator, Operator, Monitor (repeatable).
        #[arg(long = "role", value_name = "ROLE")]
        roles: Vec<String>,
        #[command(flatten)]
        password: PasswordFrom,
        /// No password: the user cannot log in; a bus's anonymous clients may act as it.
        #[arg(long, conflicts_with_all = ["password_env", "password_stdin"])]
        no_password: bool,
    },
    /// Remove a user; its open AMQP connections are closed when the servers read users again.
    Remove {
        /// The user to remove.
        name: String,
    },
    /// Every user: roles, bus grants, whether it can log in (never a password or hash).
    List {
        /// One JSON array: {name, roles, grants: [{role, bus, destination}], password} per user.
        #[arg(long)]
        json: bool,
    },
    /// Set a user's password; the next login needs the new one. For `admin`, also the
    /// profile's secrets/admin-password, which keel commands and node agents here use.
    Passwd {
        /// The user whose password changes.
        name: String,
        #[command(flatten)]
        password: PasswordFrom,
    },
}

#[derive(Subcommand, Debug)]
pub enum RoleCmd {
    /// Grant a role: an administrative one (Administrator, Configurator, Operator, Monitor),
    /// or a bus one (connector with --bus; sender, receiver, browser with --bus and
    /// --destination NAME, PREFIX* or *).
    Grant(RoleArgs),
    /// Revoke a role granted as `keel role grant` granted it.
    Revoke(RoleArgs),
    /// The roles of every user, or of one.
    List {
        /// Only this user's roles.
        #[arg(long)]
        user: Option<String>,
        /// One JSON array: {user, role, bus, destination} per grant.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct RoleArgs {
    /// Administrator, Configurator, Operator, Monitor; or connector, sender, receiver, browser.
    role: String,
    /// The user who gets or loses the role.
    #[arg(long)]
    user: String,
    /// The bus of a bus role.
    #[arg(long)]
    bus: Option<String>,
    /// The destination of a sender, receiver or browser role: a name, a prefix ending in `*`,
    /// or `*` for every destination of the bus.
    #[arg(long)]
    destination: Option<String>,
}

enum Role {
    Admin(AdminRole),
    Bus(BusGrant),
}

fn parse_role(a: &RoleArgs) -> Result<Role> {
    if let Some(r) = AdminRole::parse(&a.role) {
        if a.bus.is_some() || a.destination.is_some() {
            bail!(
                "{r} is an administrative role of the whole cell: give no --bus or --destination"
            );
        }
        return Ok(Role::Admin(r));
    }
    let Some(role) = BusRole::parse(&a.role) else {
        bail!(
            "`{}` is not a role; administrative roles are Administrator, Configurator, Operator, Monitor; bus roles are connector, sender, receiver, browser",
            a.role
        );
    };
    let Some(bus) = a.bus.clone() else {
        bail!("{role} is a bus role: give --bus BUS");
    };
    match (role.per_destination(), &a.destination) {
        (true, None) => bail!("{role} is granted per destination: give --destination NAME, a prefix such as 'orders.*', or '*'"),
        (false, Some(_)) => bail!("connector is granted per bus: give no --destination"),
        _ => {}
    }
    Ok(Role::Bus(BusGrant {
        role,
        bus,
        destination: a.destination.clone(),
    }))
}

fn read_password(from: &PasswordFrom) -> Result<String> {
    let password = match (&from.password_env, from.password_stdin) {
        (Some(var), _) => std::env::var(var)
            .with_context(|| format!("environment variable {var} is not set (or not UTF-8)"))?,
        (None, true) => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("reading the password from stdin")?;
            line.trim_end_matches(['\n', '\r']).to_string()
        }
        (None, false) => bail!("give the password with --password-env VAR or --password-stdin (never on the command line)"),
    };
    if let Some(problem) = keel_auth::password::password_problem(&password) {
        bail!("{problem}");
    }
    Ok(password)
}

/// Copies the master to this node's configuration now, on the files (not through the node
/// agent: a password change must not need the password it replaces).
fn apply(profile: &Profile) -> Result<String> {
    let node = profile.local_node()?;
    let o = keel_config::sync(&profile.master(), &profile.node_copy(&node))?;
    Ok(format!(
        "configuration version {}; the node agent and servers of node {node} apply it within {} s",
        o.to,
        keel_auth::USERS_REFRESH_MS.div_ceil(1000)
    ))
}

fn parse_roles(names: &[String]) -> Result<Vec<AdminRole>> {
    names
        .iter()
        .map(|n| {
            AdminRole::parse(n).ok_or_else(|| anyhow!("`{n}` is not an administrative role (Administrator, Configurator, Operator, Monitor); grant bus roles with `keel role grant`"))
        })
        .collect()
}

pub fn run_user(ctx: &Ctx, cmd: UserCmd) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    upgrade(&profile)?;
    match cmd {
        UserCmd::Add {
            name,
            roles,
            password,
            no_password,
        } => {
            let roles = parse_roles(&roles)?;
            let pw = if no_password {
                None
            } else {
                Some(read_password(&password)?)
            };
            let user = keel_auth::new_user(&name, pw.as_deref(), roles)?;
            profile
                .master()
                .update(|cfg| cfg.add_user(user).map(|_| ()))?;
            println!("Added user {name}; {}.", apply(&profile)?);
        }
        UserCmd::Remove { name } => {
            profile
                .master()
                .update(|cfg| cfg.remove_user(&name).map(|_| ()))?;
            println!(
                "Removed user {name}; {}; its open AMQP connections are closed then.",
                apply(&profile)?
            );
        }
        UserCmd::Passwd { name, password } => {
            let pw = read_password(&password)?;
            let u = keel_auth::new_user(&name, Some(&pw), Vec::new())?;
            profile.master().update(|cfg| {
                cfg.set_user_verifiers(&name, u.password_hash, u.scram_sha_256)
                    .map(|_| ())
            })?;
            let mut also = String::new();
            if name == keel_auth::LEGACY_ADMIN {
                profile.set_admin_password(&pw)?;
                also = format!(
                    " and in {} (keel commands and node agents on this host use it; engine links take the new key when their servers restart)",
                    profile.layout().admin_password().display()
                );
            }
            println!(
                "Changed the password of user {name}{also}; {}.",
                apply(&profile)?
            );
        }
        UserCmd::List { json } => {
            let cfg = profile.master().load()?;
            let rows: Vec<Value> = cfg
                .users
                .iter()
                .map(|u| {
                    json!({
                        "name": u.name,
                        "roles": u.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
                        "grants": u.grants.iter().map(grant_json).collect::<Vec<_>>(),
                        "password": u.password_hash.is_some(),
                    })
                })
                .collect();
            if json {
                print_json(&Value::Array(rows));
            } else {
                let mut t = comfy_table::Table::new();
                t.load_preset(comfy_table::presets::NOTHING);
                t.set_header(["USER", "ROLES", "BUS GRANTS", "LOGIN"]);
                for u in &cfg.users {
                    let grants: Vec<String> = u.grants.iter().map(grant_text).collect();
                    t.add_row([
                        u.name.clone(),
                        join_or_none(u.roles.iter().map(|r| r.to_string())),
                        join_or_none(grants.into_iter()),
                        if u.password_hash.is_some() {
                            "password"
                        } else {
                            "none (anonymous only)"
                        }
                        .to_string(),
                    ]);
                }
                println!("{t}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_role(ctx: &Ctx, cmd: RoleCmd) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    upgrade(&profile)?;
    match cmd {
        RoleCmd::Grant(a) => {
            let role = parse_role(&a)?;
            let mut changed = false;
            profile.master().update(|cfg| {
                changed = match &role {
                    Role::Admin(r) => cfg.grant_admin(&a.user, *r)?,
                    Role::Bus(g) => cfg.grant_bus(&a.user, g.clone())?,
                };
                Ok(())
            })?;
            if changed {
                println!(
                    "Granted {} to user {}; {}.",
                    what(&role),
                    a.user,
                    apply(&profile)?
                );
            } else {
                println!(
                    "User {} holds {} already; nothing changed.",
                    a.user,
                    what(&role)
                );
            }
        }
        RoleCmd::Revoke(a) => {
            let role = parse_role(&a)?;
            let mut changed = false;
            profile.master().update(|cfg| {
                changed = match &role {
                    Role::Admin(r) => cfg.revoke_admin(&a.user, *r)?,
                    Role::Bus(g) => cfg.revoke_bus(&a.user, g)?,
                };
                Ok(())
            })?;
            if changed {
                println!(
                    "Revoked {} from user {}; {}.",
                    what(&role),
                    a.user,
                    apply(&profile)?
                );
            } else {
                println!("User {} does not hold {}; nothing changed (`keel role list --user {}` shows what it holds).", a.user, what(&role), a.user);
            }
        }
        RoleCmd::List { user, json } => {
            let cfg = profile.master().load()?;
            if let Some(u) = &user {
                if cfg.user(u).is_none() {
                    bail!(keel_config::ConfigError::UnknownUser {
                        name: u.clone(),
                        known: cfg.users.iter().map(|u| u.name.clone()).collect(),
                    });
                }
            }
            let mut rows = Vec::new();
            for u in cfg
                .users
                .iter()
                .filter(|u| user.as_ref().is_none_or(|n| *n == u.name))
            {
                for r in &u.roles {
                    rows.push(json!({"user": u.name, "role": r.as_str(), "bus": null, "destination": null}));
                }
                for g in &u.grants {
                    rows.push(json!({"user": u.name, "role": g.role.as_str(), "bus": g.bus, "destination": g.destination}));
                }
            }
            if json {
                print_json(&Value::Array(rows));
            } else {
                let mut t = comfy_table::Table::new();
                t.load_preset(comfy_table::presets::NOTHING);
                t.set_header(["USER", "ROLE", "BUS", "DESTINATION"]);
                for r in &rows {
                    let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
                    t.add_row([s("user"), s("role"), s("bus"), s("destination")]);
                }
                println!("{t}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn what(role: &Role) -> String {
    match role {
        Role::Admin(r) => r.to_string(),
        Role::Bus(g) => grant_text(g),
    }
}

fn grant_text(g: &BusGrant) -> String {
    match &g.destination {
        Some(d) => format!("{} on {}/{}", g.role, g.bus, d),
        None => format!("{} on {}", g.role, g.bus),
    }
}

fn grant_json(g: &BusGrant) -> Value {
    json!({"role": g.role.as_str(), "bus": g.bus, "destination": g.destination})
}

fn join_or_none(items: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = items.collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(", ")
    }
}

/// A profile made before users existed gets user `admin` first (ADMN0043I, said once).
pub fn upgrade(profile: &Profile) -> Result<()> {
    if keel_auth::ensure_users(profile)? == keel_auth::UpgradeOutcome::MadeAdmin {
        let m = keel_core::catalog::ADMN0043I;
        let text =
            keel_core::catalog::render(m.text, &[("user", keel_auth::LEGACY_ADMIN.to_string())]);
        eprintln!("{} {text}", m.id);
    }
    Ok(())
}
