//! KEEL PATCH: a hook that lets the application make a transaction's work atomic and durable
//! at discharge. Without it, the accepting session keeps a transaction's transfers and
//! settlements in memory and replays them to the links after answering the discharge, so the
//! application cannot apply them together nor before the controller learns the outcome.

use std::{future::Future, pin::Pin};

use fe2o3_amqp_types::{messaging::Outcome, transaction::TransactionId};

/// One piece of a transaction's work, in the order it arrived.
#[derive(Debug, Clone)]
pub enum TxnWork {
    /// One transfer frame posted under the transaction on the link whose remote handle is
    /// `handle`; a message spanning several frames comes as several posts with `more` set on
    /// all but the last.
    Post {
        /// The remote peer's handle of the link.
        handle: u32,
        /// The delivery id of the transfer (first frame of a delivery).
        delivery_id: Option<u32>,
        /// More frames of the same delivery follow.
        more: bool,
        /// The frame's payload (a part of the encoded message).
        payload: bytes::Bytes,
    },
    /// A delivery settled under the transaction: on the link whose remote handle is `handle`,
    /// the delivery with tag `delivery_tag`, with `outcome`.
    Retire {
        /// The remote peer's handle of the link.
        handle: u32,
        /// The tag of the settled delivery.
        delivery_tag: Vec<u8>,
        /// The outcome that takes effect on commit.
        outcome: Option<Outcome>,
    },
}

/// The application's side of a transaction's discharge.
pub trait TxnResource: Send + Sync + std::fmt::Debug {
    /// Applies all of `work` or none of it; the discharge is answered with `accepted` only
    /// after this returned `Ok`, and with `amqp:transaction:rollback` after an `Err`.
    fn commit(
        &self,
        txn_id: TransactionId,
        work: Vec<TxnWork>,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;

    /// The transaction was rolled back: none of `work` takes effect. Deliveries it settled
    /// are settled at the controller's side already, so the application gives them back
    /// (released) rather than waiting for a settlement that will not come.
    fn rollback(&self, txn_id: TransactionId, work: Vec<TxnWork>);
}

/// KEEL PATCH: what the accepting side lets one transaction hold, and how many may be open.
/// Upstream keeps every post and settlement of a transaction in memory until its discharge,
/// with no bound: a client could grow one transaction until the server ran out of memory, or
/// leave it open for ever (holding the deliveries it settled in it).
#[derive(Debug, Clone)]
pub struct TxnLimits {
    /// Posted deliveries plus settled deliveries one transaction may hold.
    pub work_max: usize,
    /// Payload bytes of the posts one transaction may hold.
    pub bytes_max: usize,
    /// How long a transaction may stay open; older ones are rolled back.
    pub age_max: std::time::Duration,
    /// Open transactions (declared, not discharged) counted in `open`.
    pub open_max: usize,
    /// The count `open_max` bounds; share one among the sessions of a connection to bound
    /// the connection.
    pub open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Default for TxnLimits {
    fn default() -> Self {
        Self {
            work_max: usize::MAX,
            bytes_max: usize::MAX,
            age_max: std::time::Duration::MAX,
            open_max: usize::MAX,
            open: Default::default(),
        }
    }
}

/// One counted open transaction; the count goes down when it is dropped.
#[derive(Debug)]
pub(crate) struct OpenSlot(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl OpenSlot {
    /// Takes a slot, or None when `limits.open_max` are taken.
    pub(crate) fn take(limits: &TxnLimits) -> Option<Self> {
        use std::sync::atomic::Ordering;
        limits
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limits.open_max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(limits.open.clone()))
    }
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}
