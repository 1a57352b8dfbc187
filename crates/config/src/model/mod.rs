//! The configuration model: one cell, its nodes and their servers, the buses with their
//! members and destinations, the data sources (XA-capable databases) and the applications
//! (message-driven handlers on a server). No I/O: `files` reads and writes it, `paths` says
//! where each object's file lives.
//!
//! - `types`: the plain data, its defaults and limits, lookups and the canonical order;
//! - `edit`: the changes the CLI and admin objects make (`add_server`, `add_destination`, ...);
//! - `validate`: every rule of a valid configuration, each in one place; `Config::validate`
//!   runs them all, once per load and before every save;
//! - `url`: passwords in data source URLs;
//! - `users`: the edits of users and their roles (`add_user`, `grant_admin`, ...), which refuse
//!   to leave the cell without an Administrator who can log in.
//!
//! This module re-exports them, so `keel_config::` paths do not depend on the split.
//!
//! Order: nodes, servers within a node, buses, destinations, data sources and applications are
//! kept in *natural name order* (`server2` before `server10`) because the files on disk carry no
//! order; members keep their file order.
//!
//! Data source passwords are never part of the model: a URL holding one is refused, and the
//! password lives in the profile's secrets (`Profile::set_datasource_password`).

mod edit;
mod types;
mod url;
mod users;
mod validate;

#[cfg(test)]
pub(crate) mod tests;

pub use types::*;
pub use url::{take_url_password, url_has_password};
pub(crate) use validate::*;
