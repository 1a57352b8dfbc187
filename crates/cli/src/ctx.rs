//! What every command needs: the profile, the admin credential, clients for the node agent and
//! servers, and a small runtime to drive them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use keel_admin::{AdminClient, AdminError, Credential, Value};
use keel_config::{Config, Profile};
use keel_core::layout::NODE_AGENT;
use keel_core::ObjectName;

pub struct Ctx {
    profile_dir: PathBuf,
}

impl Ctx {
    pub fn new(profile: Option<PathBuf>) -> Ctx {
        Ctx {
            profile_dir: profile.unwrap_or_else(|| PathBuf::from("keel-profile")),
        }
    }

    pub fn profile_dir(&self) -> &std::path::Path {
        &self.profile_dir
    }

    pub fn profile(&self) -> Result<Profile> {
        Ok(Profile::open(&self.profile_dir)?)
    }

    /// Who `keel` commands log in as: `KEEL_USER` with the password in `KEEL_PASSWORD` when
    /// set (an operator acting with their own roles), else the profile's own `admin` with
    /// secrets/admin-password.
    pub fn credential(&self, profile: &Profile) -> Result<Credential> {
        if let Ok(user) = std::env::var("KEEL_USER") {
            let password = std::env::var("KEEL_PASSWORD").map_err(|_| {
                anyhow!(
                    "KEEL_USER is set to {user:?}, so KEEL_PASSWORD must hold that user's password"
                )
            })?;
            return Ok(Credential { user, password });
        }
        Ok(Credential {
            user: "admin".into(),
            password: profile.admin_password()?,
        })
    }

    /// A client of this node's process listening on `port`, as this command's user: plain
    /// HTTP on a loopback host, else HTTPS trusting the cell's CA (plain TCP is for loopback
    /// only, DESIGN §10).
    pub fn client(&self, profile: &Profile, port: u16) -> Result<AdminClient> {
        let addr = endpoint(self, profile, port)?;
        let client = AdminClient::new(addr, self.credential(profile)?);
        if keel_core::plaintext::plain_allowed(addr.ip()) {
            Ok(client)
        } else {
            Ok(client.with_tls(profile.pki().client_config()?))
        }
    }

    /// The node's synchronized configuration when present, else the master (before the first
    /// node agent start the copy may not exist yet).
    pub fn config(&self, profile: &Profile) -> Result<(String, Config)> {
        let node = profile.local_node()?;
        let cfg = match profile.node_copy(&node).load() {
            Ok(c) => c,
            Err(_) => profile.master().load()?,
        };
        Ok((node, cfg))
    }
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Where this node's process listening on `port` is: the node's host (DESIGN §11).
pub fn endpoint(ctx: &Ctx, profile: &Profile, port: u16) -> Result<SocketAddr> {
    let (node, cfg) = ctx.config(profile)?;
    let n = cfg
        .node(&node)
        .ok_or_else(|| anyhow!("node {node} is not in the configuration"))?;
    n.endpoint(port)
        .with_context(|| format!("the host {} of node {node} gives no address", n.host))
}

/// A connection to the node agent, or the sentence an operator needs when it is not running.
pub struct NodeAgent {
    pub client: AdminClient,
    pub name: String,
    pub node: String,
}

impl NodeAgent {
    pub fn connect(
        ctx: &Ctx,
        rt: &tokio::runtime::Runtime,
        profile: &Profile,
    ) -> Result<NodeAgent> {
        let (node, cfg) = ctx.config(profile)?;
        let port = cfg
            .node(&node)
            .map(|n| n.admin_port)
            .ok_or_else(|| anyhow!("node {node} is not in the configuration"))?;
        let client = ctx.client(profile, port)?;
        match rt.block_on(client.clone().with_timeout_ms(2_000).ping()) {
            Ok(_) => {}
            Err(AdminError::Unreachable { .. }) | Err(AdminError::Timeout { .. }) => {
                return Err(anyhow!(
                    "the node agent of node {node} is not running (nothing answers at {}); start it with `keel --profile {} node start`, then retry",
                    client.addr(),
                    ctx.profile_dir.display()
                ))
            }
            Err(e) => return Err(e.into()),
        }
        let name = ObjectName::new(&[
            ("type", "NodeAgent"),
            ("name", NODE_AGENT),
            ("node", &node),
            ("process", NODE_AGENT),
        ])
        .to_string();
        Ok(NodeAgent { client, name, node })
    }

    pub fn invoke(
        &self,
        rt: &tokio::runtime::Runtime,
        op: &str,
        args: Vec<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        let client = self
            .client
            .clone()
            .with_timeout_ms(timeout.as_millis() as u64);
        Ok(rt.block_on(client.invoke(&self.name, op, args))?)
    }
}

/// Prints JSON for `--json` (pretty, one document).
pub fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}
