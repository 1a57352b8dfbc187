//! `keel`: the one binary. Operator commands talk to the node agent's admin API (or, where the
//! node agent is not needed, edit the configuration repository directly); the hidden `node run`
//! and `server run` subcommands are the node agent and server processes themselves.
//!
//! Errors: every command exits 0 on success and otherwise prints one sentence on stderr
//! (`keel: ...`) saying what failed, on what, and what to do, and exits 1 (2 for usage errors).

/// mimalloc: the message path allocates per frame and per message (see Cargo.toml).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod admin_cmd;
mod app_cmd;
mod config_cmd;
mod ctx;
mod logs_cmd;
mod me_cmd;
mod msg_cmd;
mod node_cmd;
mod quickstart;
mod server_cmd;
mod tx_cmd;

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
    /// Queues and topic spaces.
    #[command(subcommand)]
    Destination(me_cmd::DestinationCmd),
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
    /// Explain a message ID: what it means and what to do.
    Explain {
        /// A message ID such as WSVR0001I.
        id: String,
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
    dir: PathBuf,
    /// First port; the node agent takes it, each server the next two (admin, bus).
    #[arg(long, default_value_t = 7270)]
    base_port: u16,
    #[arg(long, default_value = "keelCell")]
    cell: String,
    #[arg(long, default_value = "node01")]
    node: String,
    #[arg(long, default_value = "server1")]
    server: String,
    #[arg(long, default_value = "bus1")]
    bus: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let ctx = Ctx::new(cli.profile);
    let result = match cli.command {
        Command::Profile(ProfileCmd::Create(c)) => profile_create(c),
        Command::Node(c) => node_cmd::run(&ctx, c),
        Command::Server(c) => server_cmd::run(&ctx, c),
        Command::Bus(c) => config_cmd::run_bus(&ctx, c),
        Command::Config(c) => config_cmd::run(&ctx, c),
        Command::Me(c) => me_cmd::run_me(&ctx, c),
        Command::Store(c) => me_cmd::run_store(&ctx, c),
        Command::Destination(c) => me_cmd::run_destination(&ctx, c),
        Command::Datasource(c) => app_cmd::run_datasource(&ctx, c),
        Command::App(c) => app_cmd::run_app(&ctx, c),
        Command::Tx(c) => tx_cmd::run(&ctx, c),
        Command::Logs(c) => logs_cmd::run(&ctx, c),
        Command::Send(a) => msg_cmd::send(&ctx, a),
        Command::Receive(a) => msg_cmd::receive(&ctx, a),
        Command::Admin(a) => admin_cmd::run(&ctx, a),
        Command::Explain { id } => explain(&id),
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

fn profile_create(c: ProfileCreate) -> anyhow::Result<ExitCode> {
    let opts = keel_config::CreateOptions {
        base_port: c.base_port,
        cell: c.cell,
        node: c.node,
        server: c.server,
        bus: c.bus,
    };
    let profile = keel_config::Profile::create(&c.dir, &opts)?;
    let cfg = profile.master().load()?;
    let node = &cfg.nodes[0];
    println!("Created profile {}", profile.root().display());
    println!(
        "  cell {}, node {} (node agent admin 127.0.0.1:{})",
        cfg.cell.name, node.name, node.admin_port
    );
    for s in &node.servers {
        println!(
            "  server {} (admin 127.0.0.1:{}, bus 127.0.0.1:{})",
            s.name, s.admin_port, s.bus_port
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

fn explain(id: &str) -> anyhow::Result<ExitCode> {
    let m = keel_core::catalog::lookup(id).ok_or_else(|| {
        anyhow::anyhow!("message ID {id} is not in Keel's catalog; IDs look like WSVR0001I (`keel explain` knows {} IDs, see docs/MESSAGES.md)", keel_core::catalog::ALL.len())
    })?;
    let severity = match m.severity {
        keel_core::Severity::Info => "informational",
        keel_core::Severity::Warning => "warning",
        keel_core::Severity::Error => "error",
    };
    println!("{} ({severity})", m.id);
    println!("  Message:     {}", m.text);
    println!("  Explanation: {}", m.explanation);
    println!("  User action: {}", m.action);
    Ok(ExitCode::SUCCESS)
}
