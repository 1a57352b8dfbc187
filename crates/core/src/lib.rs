//! Shared vocabulary of Keel: admin object names, the message catalog, fault points and the
//! on-disk layout of a profile. Every other crate depends on this one and it depends on none of
//! them, so nothing here may know about processes, configuration files or the network.

pub mod catalog;
pub mod faults;
pub mod layout;
pub mod names;

/// Re-exported so the `emit!` macro works in crates that name `tracing` differently.
pub use tracing;

pub use catalog::{Msg, Severity};
pub use layout::Layout;
pub use names::{NameError, ObjectName, ObjectPattern};
