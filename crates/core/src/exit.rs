//! Exit codes of the node agent and server processes: the node agent reads a server's, and the
//! CLI reads both, so they are defined once.

/// A normal stop, or a recovery-mode run that completed.
pub const OK: u8 = 0;
/// Refused by configuration or state (the process says why on stderr).
pub const REFUSED: u8 = 2;
/// A port or file could not be opened.
pub const RESOURCE: u8 = 3;
