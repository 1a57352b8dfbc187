//! Where each object of a repository lives, relative to the repository directory. Loading and
//! writing use these, and so do validation errors, which name the file to fix.

use std::path::{Path, PathBuf};

pub(crate) fn rel_cell() -> PathBuf {
    PathBuf::from("cell.toml")
}
pub(crate) fn rel_node(node: &str) -> PathBuf {
    Path::new("nodes").join(node).join("node.toml")
}
pub(crate) fn rel_server(node: &str, server: &str) -> PathBuf {
    Path::new("nodes")
        .join(node)
        .join("servers")
        .join(format!("{server}.toml"))
}
pub(crate) fn rel_bus(bus: &str) -> PathBuf {
    Path::new("buses").join(format!("{bus}.toml"))
}
pub(crate) fn rel_datasource(name: &str) -> PathBuf {
    Path::new("datasources").join(format!("{name}.toml"))
}
pub(crate) fn rel_app(name: &str) -> PathBuf {
    Path::new("apps").join(format!("{name}.toml"))
}
pub(crate) fn rel_user(name: &str) -> PathBuf {
    Path::new("users").join(format!("{name}.toml"))
}
