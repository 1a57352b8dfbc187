//! `keel`: the one binary. Operator commands talk to the node agent's admin API (or, where the
//! node agent is not needed, edit the configuration repository directly); the hidden `node run`
//! and `server run` subcommands are the node agent and server processes themselves.
//!
//! Errors: every command exits 0 on success and otherwise prints one sentence on stderr
//! (`keel: ...`) saying what failed, on what, and what to do, and exits 1 (2 for usage errors).
//! Every clap parse error is rendered as one `keel: ...` line (the accepted values, the usage
//! line, the command's `--help`); a unit test walks the clap tree and fails on any argument
//! without a help line.
//!
//! `main` sets the umask to 077 before anything else, so every file any keel process makes (the
//! node agent and servers inherit it) is 0600 and every directory 0700, whatever the shell's
//! umask (DESIGN §10).

/// mimalloc: the message path allocates per frame and per message (see Cargo.toml).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};

mod admin_cmd;
mod app_cmd;
mod cert_cmd;
mod choices;
mod config_cmd;
mod ctx;
mod dest_cmd;
mod logs_cmd;
mod me_cmd;
mod msg_cmd;
mod node_cmd;
mod quickstart;
mod server_cmd;
mod tx_cmd;
mod user_cmd;

pub use ctx::Ctx;

#[derive(Parser, Debug)]
#[command(
    name = "keel",
    version,
    about = "Keel: transactional messaging and application server",
    disable_help_subcommand = true
)]
struct Cli {
    /// Profile directory (default ./keel-profile).
    #[arg(long, global = true, env = "KEEL_PROFILE")]
    profile: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a profile (a self-contained install: config, logs, data stores, recovery logs).
    #[command(subcommand)]
    Profile(ProfileCmd),
    /// Start, stop and inspect the node agent.
    #[command(subcommand)]
    Node(node_cmd::NodeCmd),
    /// Create, start, stop and inspect servers.
    #[command(subcommand)]
    Server(server_cmd::ServerCmd),
    /// Bus membership.
    #[command(subcommand)]
    Bus(config_cmd::BusCmd),
    /// Back up, restore, validate and synchronize the configuration.
    #[command(subcommand)]
    Config(config_cmd::ConfigCmd),
    /// Messaging engines: list, state, start (--flush after a restore), stop, initial state.
    #[command(subcommand)]
    Me(me_cmd::MeCmd),
    /// Data stores of messaging engines: info, online backup, restore.
    #[command(subcommand)]
    Store(me_cmd::StoreCmd),
    /// Queues and topic spaces: create, list (with depths), delete.
    #[command(subcommand)]
    Destination(dest_cmd::DestinationCmd),
    /// XA-capable data sources (PostgreSQL, MariaDB/MySQL) that applications use.
    #[command(subcommand)]
    Datasource(app_cmd::DataSourceCmd),
    /// Message-driven applications (forward, sql, script) on a server.
    #[command(subcommand)]
    App(app_cmd::AppCmd),
    /// Transactions in doubt, and their resolution by hand.
    #[command(subcommand)]
    Tx(tx_cmd::TxCmd),
    /// The binary log repositories of servers and the node agent.
    #[command(subcommand)]
    Logs(logs_cmd::LogsCmd),
    /// Send messages to a queue.
    Send(msg_cmd::SendArgs),
    /// Receive (consume) messages from a queue; one per line.
    Receive(msg_cmd::ReceiveArgs),
    /// Query and invoke admin objects, or run the scripting console.
    Admin(admin_cmd::AdminArgs),
    /// The cell's certificate authority and each process's certificate: show, renew.
    #[command(subcommand)]
    Cert(cert_cmd::CertCmd),
    /// The cell's users: add, remove, list, passwd (Argon2id hashes; never a password kept).
    #[command(subcommand)]
    User(user_cmd::UserCmd),
    /// Administrative and bus roles of users: grant, revoke, list.
    #[command(subcommand)]
    Role(user_cmd::RoleCmd),
    /// Explain a message ID: what it means and what to do.
    Explain {
        /// A message ID such as WSVR0001I.
        id: String,
        /// One JSON object: {id, severity, text, explanation, action}.
        #[arg(long)]
        json: bool,
    },
    /// Create ./keel-profile if absent, start the node agent and server1, stay in the foreground.
    Quickstart,
}

#[derive(Subcommand, Debug)]
enum ProfileCmd {
    /// Create a profile in DIR with cell keelCell, node node01, server server1 and bus bus1.
    Create(ProfileCreate),
}

#[derive(Args, Debug)]
struct ProfileCreate {
    /// The directory to create (it must not hold a profile already).
    dir: PathBuf,
    /// First port; the node agent takes it, each server the next two (admin, bus).
    #[arg(long, default_value_t = 7270)]
    base_port: u16,
    /// The cell's name.
    #[arg(long, default_value = "keelCell")]
    cell: String,
    /// The node's name (one node per profile).
    #[arg(long, default_value = "node01")]
    node: String,
    /// The first server's name.
    #[arg(long, default_value = "server1")]
    server: String,
    /// The first bus; the first server is its member.
    #[arg(long, default_value = "bus1")]
    bus: String,
    /// The node's host: the address its node agent and servers bind and advertise. Any
    /// other than a loopback address needs TLS, which the profile's certificates give.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
}

fn main() -> ExitCode {
    // Every file and directory a keel process makes (stores, body-log segments, logs, backups,
    // secrets, recovery logs) is the owner's only, whatever umask the shell had; node agents
    // and servers inherit it (DESIGN §10).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let ctx = Ctx::new(cli.profile);
    let result = match cli.command {
        Command::Profile(ProfileCmd::Create(c)) => profile_create(c),
        Command::Node(c) => node_cmd::run(&ctx, c),
        Command::Server(c) => server_cmd::run(&ctx, c),
        Command::Bus(c) => config_cmd::run_bus(&ctx, c),
        Command::Config(c) => config_cmd::run(&ctx, c),
        Command::Me(c) => me_cmd::run_me(&ctx, c),
        Command::Store(c) => me_cmd::run_store(&ctx, c),
        Command::Destination(c) => dest_cmd::run(&ctx, c),
        Command::Datasource(c) => app_cmd::run_datasource(&ctx, c),
        Command::App(c) => app_cmd::run_app(&ctx, c),
        Command::Tx(c) => tx_cmd::run(&ctx, c),
        Command::Logs(c) => logs_cmd::run(&ctx, c),
        Command::Send(a) => msg_cmd::send(&ctx, a),
        Command::Receive(a) => msg_cmd::receive(&ctx, a),
        Command::Admin(a) => admin_cmd::run(&ctx, a),
        Command::Cert(c) => cert_cmd::run(&ctx, c),
        Command::User(c) => user_cmd::run_user(&ctx, c),
        Command::Role(c) => user_cmd::run_role(&ctx, c),
        Command::Explain { id, json } => explain(&id, json),
        Command::Quickstart => quickstart::run(&ctx),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One reporter: the first sentence is the error, causes follow on the same line.
            let mut text = e.to_string();
            for cause in e.chain().skip(1) {
                text.push_str(": ");
                text.push_str(&cause.to_string());
            }
            eprintln!("keel: {text}");
            ExitCode::from(1)
        }
    }
}

/// Help and version go to stdout as clap writes them (exit 0); a bare `keel` or command group
/// prints its help (exit 2, as clap does). Every other parse error is a usage error: one
/// `keel: ...` line on stderr like every other error, with the accepted values and the usage
/// line, and exit 2.
fn usage_error(e: clap::Error) -> ExitCode {
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
    }
    let args: Vec<String> = std::env::args().collect();
    eprintln!(
        "keel: {}",
        one_line(&e.render().to_string(), &command_path(&args))
    );
    ExitCode::from(2)
}

/// The command an argument list names (`keel destination create`): each word that names a
/// subcommand of the command so far, in order.
fn command_path(args: &[String]) -> String {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let mut path = vec!["keel".to_string()];
    for a in args.iter().skip(1) {
        if let Some(sub) = cmd.find_subcommand(a).cloned() {
            path.push(sub.get_name().to_string());
            cmd = sub;
        }
    }
    path.join(" ")
}

/// clap's rendered error on one line: the error, its details in parentheses, the usage line
/// when clap gives one, and where to find more (`keel <command> --help`).
fn one_line(rendered: &str, path: &str) -> String {
    let mut first = String::new();
    let mut details = Vec::new();
    let mut usage = None;
    for line in rendered.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(u) = line.strip_prefix("Usage:") {
            usage = Some(u.trim().to_string());
        } else if line.starts_with("For more information") {
            // Replaced by the command's own --help below.
        } else if first.is_empty() {
            first = line
                .strip_prefix("error:")
                .unwrap_or(line)
                .trim()
                .to_string();
        } else {
            details.push(
                line.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
            );
        }
    }
    let mut out = first;
    if !details.is_empty() {
        // "... not provided:" is followed by what; other errors by what they add.
        match out.ends_with(':') {
            true => out.push_str(&format!(" {}", details.join(", "))),
            false => out.push_str(&format!(" ({})", details.join("; "))),
        }
    }
    if let Some(u) = usage {
        out.push_str(&format!("; usage: {u}"));
    }
    out.push_str(&format!("; see `{path} --help`"));
    out
}

fn profile_create(c: ProfileCreate) -> anyhow::Result<ExitCode> {
    let opts = keel_config::CreateOptions {
        base_port: c.base_port,
        cell: c.cell,
        node: c.node,
        server: c.server,
        bus: c.bus,
        host: c.host,
    };
    let profile = keel_config::Profile::create(&c.dir, &opts)?;
    // The first user, `admin` (Administrator), with the password of secrets/admin-password.
    keel_auth::ensure_users(&profile)?;
    let cfg = profile.master().load()?;
    let node = &cfg.nodes[0];
    println!("Created profile {}", profile.root().display());
    println!(
        "  cell {}, node {} (node agent admin {}:{})",
        cfg.cell.name, node.name, node.host, node.admin_port
    );
    for s in &node.servers {
        println!(
            "  server {} (admin {}:{}, bus {}:{})",
            s.name, node.host, s.admin_port, node.host, s.bus_port
        );
    }
    for b in &cfg.buses {
        for m in &b.members {
            println!(
                "  bus {} member {} with messaging engine {}",
                b.name, m.server, m.me
            );
        }
    }
    println!(
        "  admin credential: user admin, password in {}",
        profile.layout().admin_password().display()
    );
    println!(
        "Next: keel --profile {} node start",
        profile.root().display()
    );
    Ok(ExitCode::SUCCESS)
}

fn explain(id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let m = keel_core::catalog::lookup(id).ok_or_else(|| {
        anyhow::anyhow!("message ID {id} is not in Keel's catalog; IDs look like WSVR0001I (`keel explain` knows {} IDs, see docs/MESSAGES.md)", keel_core::catalog::ALL.len())
    })?;
    let severity = match m.severity {
        keel_core::Severity::Info => "informational",
        keel_core::Severity::Warning => "warning",
        keel_core::Severity::Error => "error",
    };
    if json {
        ctx::print_json(&serde_json::json!({
            "id": m.id, "severity": severity, "text": m.text,
            "explanation": m.explanation, "action": m.action,
        }));
        return Ok(ExitCode::SUCCESS);
    }
    println!("{} ({severity})", m.id);
    println!("  Message:     {}", m.text);
    println!("  Explanation: {}", m.explanation);
    println!("  User action: {}", m.action);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    /// Every argument and option of every command, by its path, that has no help line.
    fn without_help(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            if a.get_help().is_none() && a.get_long_help().is_none() {
                out.push(format!("{path} {}", a.get_id()));
            }
        }
        for sub in cmd.get_subcommands() {
            without_help(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_argument_has_a_help_line() {
        let mut cmd = super::Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        without_help(&cmd, "keel", &mut missing);
        assert!(
            missing.is_empty(),
            "{} argument(s) without a help line:\n{}",
            missing.len(),
            missing.join("\n")
        );
    }

    /// The line `keel` prints for the usage error of `args`.
    fn usage_line(args: &[&str]) -> String {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let e = super::Cli::try_parse_from(&args).unwrap_err();
        super::one_line(&e.render().to_string(), &super::command_path(&args))
    }

    #[test]
    fn a_usage_error_is_one_line_naming_the_values_and_the_help() {
        let line = usage_line(&["keel", "destination", "create", "b", "q", "--type", "pipe"]);
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.contains("'pipe'") && line.contains("queue, topic"),
            "{line}"
        );
        assert!(
            line.ends_with("see `keel destination create --help`"),
            "{line}"
        );
        // A missing argument: clap gives the usage line, kept on the same line.
        let line = usage_line(&["keel", "--profile", "p", "me", "state"]);
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains("usage: keel me state"), "{line}");
        assert!(line.ends_with("see `keel me state --help`"), "{line}");
    }

    /// The walk itself finds a missing help line, at any depth.
    #[test]
    fn the_walk_finds_an_argument_without_help() {
        let cmd = clap::Command::new("x").subcommand(
            clap::Command::new("y")
                .arg(clap::Arg::new("z"))
                .arg(clap::Arg::new("w").long("w").help("has one")),
        );
        let mut missing = Vec::new();
        without_help(&cmd, "x", &mut missing);
        assert_eq!(missing, ["x y z"]);
    }

    #[test]
    fn the_command_tree_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
