//! Errors for operators: what failed, on which file or certificate, and what to do.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, TlsError>;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot {action} {path}: {source}; {fix}")]
    Io {
        action: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
        fix: String,
    },
    #[error("certificate file {path} {problem}; {fix}")]
    Bad {
        path: PathBuf,
        problem: String,
        fix: String,
    },
    #[error("making the certificate of {who} failed: {problem}")]
    Generate { who: String, problem: String },
    #[error("{what} already exists at {path}; {fix}")]
    Exists {
        what: String,
        path: PathBuf,
        fix: String,
    },
    #[error("no certificate named {name} in {dir}; known: {known}")]
    Unknown {
        name: String,
        dir: PathBuf,
        known: String,
    },
}

pub(crate) const FIX_PERM: &str =
    "check that the profile's secrets directory exists and belongs to the user running keel";

pub(crate) fn io_err(
    action: &str,
    path: &std::path::Path,
    fix: &str,
) -> impl FnOnce(std::io::Error) -> TlsError {
    let (action, path, fix) = (action.to_string(), path.to_path_buf(), fix.to_string());
    move |source| TlsError::Io {
        action,
        path,
        source,
        fix,
    }
}
