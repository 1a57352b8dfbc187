//! SQL databases as data sources for applications (DESIGN §6): statements with parameters in a
//! global transaction's branch, over a bounded connection pool. [`SqlResource`] is what the
//! server holds for a data source, whether PostgreSQL ([`crate::pg::PgResource`]) or MariaDB
//! ([`crate::mariadb::MariaDbResource`]).
//!
//! A branch: [`SqlResource::begin`], statements ([`SqlResource::execute`],
//! [`SqlResource::query`]), then the coordinator's prepare/commit, or [`Resource::rollback`]
//! (which, for a branch not prepared yet, rolls it back on its own connection and returns the
//! connection to the pool: what a failed handler needs). After a statement failed, a branch
//! can only roll back (prepare and commit refuse it): PostgreSQL would turn `PREPARE` or
//! `COMMIT` of an aborted transaction into a silent rollback. Each branch has its own lock. A
//! query returns at most `ROWS_MAX` (10 000) rows.

pub use crate::pool::{POOL_MAX_LIMIT, POOL_WAIT_MS};

use crate::coordinator::{Resource, ResourceFuture, Xid};

/// Most rows a query returns (more is an error).
pub const ROWS_MAX: usize = 10_000;

/// A statement parameter or a result value.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    Bytes(Vec<u8>),
}

impl SqlValue {
    /// The kind, for messages (never the value: it may be private).
    pub fn kind(&self) -> &'static str {
        match self {
            SqlValue::Null => "Null",
            SqlValue::Bool(_) => "Bool",
            SqlValue::Int(_) => "Int",
            SqlValue::Float(_) => "Float",
            SqlValue::Text(_) => "Text",
            SqlValue::Bytes(_) => "Bytes",
        }
    }
}

/// A query's result: column names and at most [`ROWS_MAX`] rows.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<SqlValue>>,
}

/// A SQL database usable as a data source: a [`Resource`] whose branches run statements.
pub trait SqlResource: Resource {
    /// Opens branch `xid` on a pooled connection (waiting, bounded, when all are busy).
    fn begin<'a>(&'a self, xid: &'a Xid) -> ResourceFuture<'a, ()>;
    /// Runs a statement in branch `xid`; returns the rows it changed.
    fn execute<'a>(
        &'a self,
        xid: &'a Xid,
        sql: &'a str,
        params: &'a [SqlValue],
    ) -> ResourceFuture<'a, u64>;
    /// Runs a query in branch `xid`; returns its rows (at most [`ROWS_MAX`]).
    fn query<'a>(
        &'a self,
        xid: &'a Xid,
        sql: &'a str,
        params: &'a [SqlValue],
    ) -> ResourceFuture<'a, Rows>;
    /// Connects (or takes a pooled connection) and asks whether the database can take part in
    /// two-phase commit: a check at start and when a data source is created. An error: the
    /// database could not be asked (unreachable, refused).
    fn check<'a>(&'a self) -> ResourceFuture<'a, TwoPhase>;
}

/// Whether a database can prepare branches, as [`SqlResource::check`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TwoPhase {
    Ready,
    /// It cannot (a setting of the database): why, and what to change.
    Unable(String),
}

/// The text of an error for a parameter that does not convert.
pub(crate) fn bad_param(index: usize, value: &SqlValue, expected: &str) -> String {
    format!(
        "parameter {} ({} value) does not convert to {expected}",
        index + 1,
        value.kind()
    )
}

/// Days since 1970-01-01 as (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `HH:MM:SS` with `.ffffff` when there are microseconds.
pub(crate) fn time_text(h: u64, m: u64, s: u64, micros: u64) -> String {
    if micros == 0 {
        format!("{h:02}:{m:02}:{s:02}")
    } else {
        format!("{h:02}:{m:02}:{s:02}.{micros:06}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(10_957), (2000, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-719_528), (0, 1, 1));
    }

    #[test]
    fn parameter_errors_name_number_kind_and_type_not_the_value() {
        let e = bad_param(0, &SqlValue::Text("secret".into()), "int4");
        assert_eq!(e, "parameter 1 (Text value) does not convert to int4");
    }
}
