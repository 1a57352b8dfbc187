//! Test support shared by Keel's crates, kept out of the product: throwaway database servers
//! that tests (and `keel-bench`) start and drop, each in a temp dir on a free port below the
//! ephemeral range. A dev-dependency of keel-store, keel-tx and keel-cli, and a dependency of
//! keel-bench (`tx-pg`) only; nothing the server links.
//!
//! - [`pgtest`]: a PostgreSQL cluster (initdb + pg_ctl) in a temp dir, on a free port;
//! - [`mariatest`]: a MariaDB server (mariadb-install-db + mariadbd) in a temp dir;
//! - [`dbcerts`]: a CA and a server certificate for the databases started with TLS;
//! - [`netlab`]: hosts on one machine, as network namespaces joined to a bridge, with
//!   partitions (DESIGN §11).

pub mod dbcerts;
pub mod mariatest;
pub mod netlab;
pub mod pgtest;
