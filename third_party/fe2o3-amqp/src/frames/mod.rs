//! Implements frame encoder and decoder

pub mod amqp;
// KEEL PATCH: announced lengths checked against the bytes present before serde_amqp reads.
#[doc(hidden)]
pub mod bounds;
// KEEL PATCH: direct codec for transfer, disposition and flow (see the module).
#[doc(hidden)]
pub mod fast;
pub mod sasl;

/// Type byte of AMQP frame
pub const FRAME_TYPE_AMQP: u8 = 0x00;

/// Type byte of SASL frame
pub const FRAME_TYPE_SASL: u8 = 0x01;

mod error;
pub use error::Error;
