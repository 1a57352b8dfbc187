//! The cell's certificates (DESIGN §10): a certificate authority per cell and a certificate
//! per process (each node agent, each server), made with rcgen when a profile is created and
//! kept under `secrets/tls/` (directory 0700, files 0600). Every certificate is issued for both
//! server and client authentication, so the same pair serves a listener and mutual TLS.
//!
//! Rooms: `error.rs` (what failed, on which file, what to do), `info.rs` (what a certificate
//! says: names, validity, fingerprint, read back from PEM whoever made it), `issue.rs` (making a
//! CA and signing a process's certificate; no I/O), `pki.rs` (the files under `secrets/tls/`:
//! create, list, renew, written by temp + fsync + rename), `operator.rs` (an operator's own
//! files, installed once a TLS handshake in memory accepts them).
//!
//! Invariants (asserted): a certificate written is read back and checked (names, issuer,
//! validity) before it replaces the old one; a process certificate is signed by the cell's CA
//! on disk; no private key ever leaves `secrets/tls/` or reaches a log or an error message.
//! `config.rs` builds rustls configurations from these files (a listener's, a client's that
//! trusts the cell's CA). Deliberately absent so far: client certificates (mutual TLS),
//! revocation (a renewed certificate replaces the old; the old one stays
//! valid until it expires), and automatic renewal.

mod config;
mod error;
mod info;
mod issue;
mod operator;
pub mod pg;
mod pki;

pub use config::{client_config_from, peer_process};
pub use error::{Result, TlsError};
pub use info::CertInfo;
pub use issue::{Identity, CA_DAYS, LEAF_DAYS};
pub use pki::{read_pem_file, rfc3339, Pki, EXPIRY_WARNING_DAYS};
pub use rustls;
