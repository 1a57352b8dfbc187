//! Shared vocabulary of Keel: admin object names, the message catalog, fault points and the
//! on-disk layout of a profile, file names (`fsname`), hex for bytes that travel as text, exit
//! codes, and the rules every listener applies to peers that have not authenticated (DESIGN
//! §10: `admission`, `throttle`, `budget`), kept here as pure bookkeeping so the admin port and
//! the bus port behave alike. Every other Keel crate except keel-bus and keel-testkit depends on
//! this one and it depends on none of them, so nothing here may know about processes,
//! configuration files or the network. No I/O and no sleeping (callers sleep); the exceptions
//! are the hidden test-support modules `fuzz` (a counting allocator) and `testfs` (mounts a
//! tmpfs).

pub mod admission;
pub mod budget;
pub mod catalog;
pub mod exit;
pub mod faults;
pub mod fsname;
#[doc(hidden)]
pub mod fuzz;
pub mod hex;
pub mod layout;
pub mod names;
pub mod plaintext;
pub mod roles;
#[doc(hidden)]
pub mod testfs;
pub mod throttle;

/// Re-exported so the `emit!` macro works in crates that name `tracing` differently.
pub use tracing;

pub use catalog::{Msg, Severity};

/// The wall clock in milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// 64 random bits from the operating system (0 if it has none to give: callers use them for
/// jitter, never for secrets).
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return 0;
    }
    u64::from_le_bytes(b)
}

/// The wall clock in whole seconds since the Unix epoch (certificate validity is in seconds).
pub fn unix_s() -> i64 {
    i64::try_from(unix_ms() / 1000).unwrap_or(i64::MAX)
}
pub use layout::Layout;
pub use names::{NameError, ObjectName, ObjectPattern};
