//! The transaction service (DESIGN §6). So far: its recovery logs ([`log`]), the two-phase
//! commit coordinator over XA-style resources ([`coordinator`]), and PostgreSQL ([`pg`]) and
//! MariaDB ([`mariadb`]) as resources and pooled data sources ([`sql`]).
//!
//! A server's recovery logs live under `tranlog/<cell>/<node>/<server>/`: `tranlog/` holds the
//! commit decisions of in-doubt transactions, `partnerlog/` the resources that took part (by
//! configuration name, never a password). Each is a [`log::RecoveryLog`]: a pair of append-only
//! files of CRC-framed records, forced at a commit decision with concurrent forces batched.

pub mod coordinator;
pub mod log;
pub mod mariadb;
pub mod pg;
mod pool;
pub mod sql;

pub use sql::{Rows, SqlResource, SqlValue, TwoPhase};
