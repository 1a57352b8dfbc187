//! The Keel admin API: admin objects (the MBeans of Keel), the registry that holds them, the
//! HTTP/JSON endpoint every server and node agent serves, the client the `keel` commands use, and
//! the scripting console (`keel admin`, the wsadmin equivalent).
//!
//! The transport knows nothing about messaging engines or transactions: later crates implement
//! [`AdminObject`] and register their objects, and a node agent sets a [`Delegate`] so that one
//! endpoint answers for every process of its node.
//!
//! Wire protocol (HTTP/1.1, JSON bodies, HTTP Basic auth on every request):
//!
//! | request | answer |
//! |---|---|
//! | `GET /v1/ping` | `{"ok": true, "pid": N, "cell", "node", "process"}` |
//! | `POST /v1/query {"pattern"}` | `{"names": [...]}` |
//! | `POST /v1/invoke {"name","op","args"}` | `{"result": ...}` |
//! | `POST /v1/attribute {"name","attribute"}` | `{"value": ...}` |
//! | `POST /v1/attributes {"name"}` | `{"attributes": {...}}` |
//!
//! Errors answer with a 4xx/5xx status and `{"error": {"kind", "message", ...}}`; the client
//! rebuilds the same [`AdminError`] so a command shows the server's sentence.

mod client;
pub mod console;
mod error;
pub mod health;
mod listener;
pub mod logrepo;
mod registry;
mod server;

pub use client::{AdminClient, Credential, DEFAULT_TIMEOUT_MS};
pub use console::{Console, ConsoleError};
pub use error::AdminError;
pub use keel_auth::{Principal, Users};
pub use keel_core::roles::AdminRole;
pub use listener::Limits;
pub use registry::{Delegate, Registry, MAX_OBJECTS, PEER_QUERY_TIMEOUT_MS};
pub use serde_json::Value;
pub use server::{serve, serve_with, Identity, Settings};

/// The future an [`AdminObject`] operation returns. Boxed so the trait stays object-safe.
pub type OpFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Value, AdminError>> + Send + 'a>>;

/// One admin object (an MBean). Servers and node agents implement it for their parts; later
/// crates register `SIBMessagingEngine`, `TransactionService`, ... without touching the
/// transport.
pub trait AdminObject: Send + Sync + 'static {
    /// The object's name; it must not change while the object is registered (the registry
    /// caches it).
    fn name(&self) -> keel_core::ObjectName;
    /// Current attribute values (a snapshot).
    fn attributes(&self) -> serde_json::Map<String, Value>;
    /// The operations, each with the role it needs and a one-line description. The registry
    /// refuses an operation not listed here with [`AdminError::UnknownOperation`], and a caller
    /// without its role with [`AdminError::Forbidden`], before calling [`AdminObject::invoke`].
    fn operations(&self) -> Vec<Op>;
    /// Runs one operation. Return [`AdminError::BadArguments`] for arguments the operation
    /// cannot take and [`AdminError::Failed`] when it ran and failed.
    fn invoke<'a>(&'a self, op: &'a str, args: Vec<Value>) -> OpFuture<'a>;
}

/// One operation of an admin object: its name, the administrative role a caller needs for it
/// (DESIGN §10: Monitor reads, Operator runs, Configurator changes, Administrator all), and a
/// one-line description for help and error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    pub name: &'static str,
    pub role: AdminRole,
    pub help: &'static str,
}

impl Op {
    /// Reads only.
    pub const fn monitor(name: &'static str, help: &'static str) -> Op {
        Op {
            name,
            role: AdminRole::Monitor,
            help,
        }
    }
    /// Runs the cell: start, stop, recovery, transaction resolution, backups.
    pub const fn operator(name: &'static str, help: &'static str) -> Op {
        Op {
            name,
            role: AdminRole::Operator,
            help,
        }
    }
    /// Changes the configuration.
    pub const fn configurator(name: &'static str, help: &'static str) -> Op {
        Op {
            name,
            role: AdminRole::Configurator,
            help,
        }
    }
}

/// Builds an operation's errors with the object's name and the operation filled in, so every
/// admin object reports bad arguments and failures in the same words.
pub struct OpErrors<'a> {
    name: String,
    op: &'a str,
}

impl<'a> OpErrors<'a> {
    pub fn new(name: &keel_core::ObjectName, op: &'a str) -> OpErrors<'a> {
        OpErrors {
            name: name.to_string(),
            op,
        }
    }
    pub fn bad(&self, why: impl Into<String>) -> AdminError {
        AdminError::BadArguments {
            name: self.name.clone(),
            op: self.op.into(),
            why: why.into(),
        }
    }
    pub fn failed(&self, why: impl Into<String>) -> AdminError {
        AdminError::Failed {
            name: self.name.clone(),
            op: self.op.into(),
            why: why.into(),
        }
    }
    /// For the fallback arm of `invoke`: the registry refuses unlisted operations before
    /// calling, so this answers only if an object lists an operation it does not implement.
    pub fn unknown(&self, obj: &dyn AdminObject) -> AdminError {
        AdminError::UnknownOperation {
            name: self.name.clone(),
            op: self.op.into(),
            known: obj
                .operations()
                .iter()
                .map(|o| o.name.to_string())
                .collect(),
        }
    }
}

/// The attribute map of a `json!({...})` literal, for `AdminObject::attributes`; anything that
/// is not an object gives an empty map.
pub fn attribute_map(v: Value) -> serde_json::Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}

/// Request bodies larger than this are refused (1 MiB): admin calls are small, and a bound keeps
/// one client from making the process allocate without limit.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Answers larger than this are refused by the client (16 MiB).
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;
/// Header a registry sets when it forwards a call to a peer, so that the peer answers from its
/// own objects only and a misconfigured delegate can never make calls loop between processes.
pub(crate) const FORWARDED_HEADER: &str = "x-keel-forwarded";
/// Header a forwarding registry sets to the user it acts for; honoured only from an
/// Administrator (the forwarder's own credential), so roles are checked where the object lives.
pub(crate) const ON_BEHALF_HEADER: &str = "x-keel-on-behalf-of";
