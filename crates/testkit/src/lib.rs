//! Test support shared by Keel's crates, kept out of the product: throwaway database servers
//! that tests (and `keel-bench`) start and drop. A dev-dependency of the crates whose tests use
//! it; nothing the server links.
//!
//! - [`pgtest`]: a PostgreSQL cluster (initdb + pg_ctl) in a temp dir, on a free port;
//! - [`mariatest`]: a MariaDB server (mariadb-install-db + mariadbd) in a temp dir.

pub mod mariatest;
pub mod pgtest;
