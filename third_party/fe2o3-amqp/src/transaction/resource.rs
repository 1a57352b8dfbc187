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
