//! Where things live inside a profile directory. Pure path arithmetic: no I/O, so every
//! process and command agrees on the layout by construction.
//!
//! ```text
//! <profile>/config/                      master configuration repository (TOML)
//! <profile>/node-config/<node>/          the node's synchronized copy of the master
//! <profile>/secrets/admin-password       admin credential (mode 0600)
//! <profile>/secrets/tls/                 the cell's CA and each process's certificate
//! <profile>/run/<process>.pid            pid files of the node agent and servers
//! <profile>/logs/<process>/SystemOut.log text log; native_stderr.log beside it
//! <profile>/databases/                   data stores of messaging engines
//! <profile>/tranlog/<cell>/<node>/<server>/{tranlog,partnerlog}/  recovery logs
//! <profile>/backups/                     default target of `config backup`
//! ```

use std::path::{Path, PathBuf};

/// The process name of the node agent in logs, pid files and admin object names.
pub const NODE_AGENT: &str = "nodeagent";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn master_config(&self) -> PathBuf {
        self.root.join("config")
    }
    pub fn node_config(&self, node: &str) -> PathBuf {
        self.root.join("node-config").join(node)
    }
    pub fn secrets(&self) -> PathBuf {
        self.root.join("secrets")
    }
    pub fn admin_password(&self) -> PathBuf {
        self.secrets().join("admin-password")
    }
    pub fn tls_dir(&self) -> PathBuf {
        self.secrets().join("tls")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn pid_file(&self, process: &str) -> PathBuf {
        self.run_dir().join(format!("{process}.pid"))
    }
    pub fn logs(&self, process: &str) -> PathBuf {
        self.root.join("logs").join(process)
    }
    pub fn system_out(&self, process: &str) -> PathBuf {
        self.logs(process).join("SystemOut.log")
    }
    pub fn native_stderr(&self, process: &str) -> PathBuf {
        self.logs(process).join("native_stderr.log")
    }
    pub fn databases(&self) -> PathBuf {
        self.root.join("databases")
    }
    pub fn tranlog(&self, cell: &str, node: &str, server: &str) -> PathBuf {
        self.root.join("tranlog").join(cell).join(node).join(server)
    }
    pub fn backups(&self) -> PathBuf {
        self.root.join("backups")
    }
    pub fn admin_history(&self) -> PathBuf {
        self.root.join("run").join("admin-history")
    }
}
