//! Why a link could not come up, or why it ended: the sentence operators read in CWSIT0004W,
//! CWSIT0006I and CWSIT0008W, typed so that callers (and the TLS and cross-host layers to come)
//! can tell a network failure from a peer that broke the protocol or this engine's own store.

use std::fmt::Display;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The TCP connection could not be made.
    #[error("cannot connect ({0})")]
    Connect(#[source] std::io::Error),
    /// The connection's keepalive or user timeout could not be set.
    #[error("cannot set keepalive ({0})")]
    Socket(#[source] std::io::Error),
    /// A write to the peer failed (the connection broke, or a frame over the bound).
    #[error("cannot write ({0})")]
    Write(#[source] keel_bus::link::LinkError),
    /// A frame from the peer that does not decode: length over the bound, checksum, payload.
    #[error(transparent)]
    Frame(#[from] keel_bus::link::LinkError),
    /// The peer sent nothing in time.
    #[error("no {what} within {ms} ms")]
    Timeout { what: &'static str, ms: u64 },
    /// The peer closed the connection at a point where it owed an answer.
    #[error("the peer closed the connection {when}")]
    Closed { when: &'static str },
    /// The peer refused the link with a `Close` frame and this reason.
    #[error("refused by the peer: {0}")]
    Refused(String),
    /// The peer broke the link protocol: a frame out of place, an answer from another engine,
    /// a credential that does not verify, too many FLUSH rounds.
    #[error("{0}")]
    Protocol(String),
    /// This side's engine or data store failed (the link ends and is tried again).
    #[error("{0}")]
    Engine(String),
}

impl LinkError {
    pub(crate) fn engine(e: impl Display) -> LinkError {
        LinkError::Engine(e.to_string())
    }

    pub(crate) fn write(e: impl Into<keel_bus::link::LinkError>) -> LinkError {
        LinkError::Write(e.into())
    }
}
