//! Transaction
//!
//! > For every transactional interaction, one container acts as the transactional resource, and the
//! > other container acts as the transaction controller. The transactional resource performs
//! > transactional work as requested by the transaction controller.
//!
//! # Controller side
//!
//! Please see [`Controller`], [`Transaction`], and [`OwnedTransaction`], as well as the
//! [`TransactionBase`], [`TransactionDischarge`], [`TransactionPosting`],
//! [`TransactionRetirement`], and [`TransactionAcquisition`] traits that define the
//! transactional operations.
//!
//! # Resource side
//!
//! Accepting incoming control links is currently only supported on the listerner side.
//!
//! By default, the session will not accept remotely initiated control links even with both
//! `"acceptor"` and `"transaction"` features enabled. In order to allow remotely initiated control
//! links and thus allow remotely declared transactions, the user needs to assign a `ControlLinkAcceptor`
//! to a session acceptor.
//!
//! ```rust
//! use fe2o3_amqp::acceptor::SessionAcceptor;
//! use fe2o3_amqp::transaction::coordinator::ControlLinkAcceptor;
//! 
//! let session_acceptor = SessionAcceptor::builder()
//!     .control_link_acceptor(ControlLinkAcceptor::default())
//!     .build();
//! ```
//!

use std::future::Future;

use crate::{
    endpoint::ReceiverLink,
    link::{
        delivery::{DeliveryFut, DeliveryInfo, UnsettledMessage},
        sender::SenderInner,
        DispositionError, FlowError, LinkFrame, LinkTransfer,
    },
    util::TryConsume,
    Receiver, Sendable, Sender,
};

use bytes::{BufMut, BytesMut};
use fe2o3_amqp_types::{
    definitions::{self, AmqpError, DeliveryTag, Fields, SequenceNo},
    messaging::{
        message::__private::Serializable, Accepted, DeliveryState, Message, Modified, Outcome,
        Rejected, Released, SerializableBody, MESSAGE_FORMAT,
    },
    performatives::Transfer,
    primitives::{OrderedMap, Symbol},
    transaction::{Declared, Discharge, TransactionId, TransactionalState},
};

pub(crate) const TXN_ID_KEY: &str = "txn-id";

/// Default number of lock-acquisition / outcome-wait trials for the best-effort rollback
/// performed when a transaction is dropped.
pub const DEFAULT_ROLLBACK_ON_DROP_TRIALS: u32 = 20;

mod controller;
pub use controller::*;

mod error;
pub use error::*;
use serde::Serialize;
use serde_amqp::{ser::Serializer, Value};

mod acquisition;
pub use acquisition::*;
use tokio::sync::{mpsc::error::TryRecvError, oneshot};

use controller::ControlLink;

mod owned;
pub use owned::*;

cfg_acceptor! {
    pub(crate) mod control_link_frame;
    pub mod coordinator;
    pub mod frame;
    pub mod manager;
    // KEEL PATCH: see resource.rs.
    pub mod resource;
    pub mod session;
}

/// The base trait for transactions, providing access to the transaction identifier.
///
/// All other transaction traits extend this trait so that they can access the `txn-id`
/// of the transaction they operate on.
pub trait TransactionBase {
    /// Get the `txn-id` of the transaction
    fn txn_id(&self) -> &TransactionId;
}

/// Trait for generics for TxnAcquisition
pub trait TransactionDischarge: Sized {
    /// Errors with discharging
    type Error: Send;

    /// Whether the transaction is already discharged
    fn is_discharged(&self) -> bool;

    /// Discharge the transaction
    fn discharge(&mut self, fail: bool) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Rollback the transaction
    ///
    /// This will send a [`Discharge`] with the `fail` field set to true
    ///
    /// If the coordinator is unable to complete the discharge, the coordinator MUST convey the
    /// error to the controller as a transaction-error
    fn rollback(mut self) -> impl Future<Output = Result<(), Self::Error>> + Send 
    where
        Self: Send,
    {
        async move { self.discharge(true).await }
    }

    /// Commit the transaction
    ///
    /// This will send a [`Discharge`] with the `fail` field set to false.
    ///
    /// If the coordinator is unable to complete the discharge, the coordinator MUST convey the
    /// error to the controller as a transaction-error
    fn commit(mut self) -> impl Future<Output = Result<(), Self::Error>> + Send 
    where
        Self: Send,
    {
        async move { self.discharge(false).await }
    }
}

/// Retiring a transaction
pub trait TransactionRetirement: TransactionBase {
    /// Error with retirement
    type RetireError: Send + From<DispositionError>;

    /// Associate an outcome with a transaction
    ///
    /// The delivery itself need not be associated with the same transaction as the outcome, or
    /// indeed with any transaction at all. However, the delivery MUST NOT be associated with a
    /// different non-discharged transaction than the outcome. If this happens then the control link
    /// MUST be terminated with a transaction-rollback error.
    fn retire<T>(
        &self,
        recver: &mut Receiver,
        delivery: T,
        outcome: Outcome,
    ) -> impl Future<Output = Result<(), Self::RetireError>> + Send
    where
        T: Into<DeliveryInfo> + Send,
        Self: Sync,
    {
        async move {
            let txn_state = TransactionalState {
                txn_id: self.txn_id().clone(),
                outcome: Some(outcome),
            };
            let state = DeliveryState::TransactionalState(txn_state);
            recver.inner.dispose(delivery, None, state).await?;
            Ok(())
        }
    }

    /// Associate an Accepted outcome with a transaction
    fn accept<T>(
        &self,
        recver: &mut Receiver,
        delivery: T,
    ) -> impl Future<Output = Result<(), Self::RetireError>> + Send
    where
        T: Into<DeliveryInfo> + Send,
        Self: Sync,
    {
        async move {
            let outcome = Outcome::Accepted(Accepted {});
            self.retire(recver, delivery, outcome).await
        }
    }

    /// Associate a Rejected outcome with a transaction
    fn reject<T>(
        &self,
        recver: &mut Receiver,
        delivery: T,
        error: Option<definitions::Error>,
    ) -> impl Future<Output = Result<(), Self::RetireError>> + Send
    where
        T: Into<DeliveryInfo> + Send,
        Self: Sync,
    {
        async move {
            let outcome = Outcome::Rejected(Rejected { error });
            self.retire(recver, delivery, outcome).await
        }
    }

    /// Associate a Released outcome with a transaction
    fn release<T>(
        &self,
        recver: &mut Receiver,
        delivery: T,
    ) -> impl Future<Output = Result<(), Self::RetireError>> + Send
    where
        T: Into<DeliveryInfo> + Send,
        Self: Sync,
    {
        async move {
            let outcome = Outcome::Released(Released {});
            self.retire(recver, delivery, outcome).await
        }
    }

    /// Associate a Modified outcome with a transaction
    fn modify<T>(
        &self,
        recver: &mut Receiver,
        delivery: T,
        modified: Modified,
    ) -> impl Future<Output = Result<(), Self::RetireError>> + Send
    where
        T: Into<DeliveryInfo> + Send,
        Self: Sync,
    {
        async move {
            let outcome = Outcome::Modified(modified);
            self.retire(recver, delivery, outcome).await
        }
    }
}

/// The aggregate trait for all transactional operations.
///
/// A type that implements this trait supports transactional posting, retirement, acquisition,
/// and discharging.
pub trait TransactionExt:
    TransactionBase
        + TransactionDischarge
        + TransactionPosting
        + TransactionAcquisition
        + TransactionRetirement
{
}

/// Transactional posting (AMQP 1.0 §4.4.4)
///
/// Posting transactional work associates an outgoing transfer with a transaction by setting the
/// state of the transfer to a `transactional-state` carrying the transaction identifier. The
/// resource will route the message upon the successful discharge (commit) of the transaction.
pub trait TransactionPosting: TransactionBase {
    /// Post a ref of transactional work and wait for the acknowledgement.
    fn post_batchable_ref<T: SerializableBody + 'static + Sync>(
        &self,
        sender: &mut Sender,
        sendable: &Sendable<T>,
    ) -> impl Future<Output = Result<DeliveryFut<Result<Outcome, PostError>>, PostError>> + Send
    where
        Self: Sync,
    {
        async move { post_ref_inner(self.txn_id(), sender, sendable, true).await }
    }

    /// Post a ref of transactional work
    fn post_ref<T: SerializableBody + 'static + Sync>(
        &self,
        sender: &mut Sender,
        sendable: &Sendable<T>,
    ) -> impl Future<Output = Result<Outcome, PostError>> + Send
    where
        Self: Sync,
    {
        async move { post_ref_inner(self.txn_id(), sender, sendable, false).await?.await }
    }

    /// Post a transactional work without waiting for the acknowledgement.
    ///
    /// This will set the `batchable` field of the `Transfer` performative to true.
    fn post_batchable<T: SerializableBody + 'static + Send>(
        &self,
        sender: &mut Sender,
        sendable: impl Into<Sendable<T>>,
    ) -> impl Future<Output = Result<DeliveryFut<Result<Outcome, PostError>>, PostError>> + Send
    where
        Self: Sync,
    {
        let sendable = sendable.into();
        async move { post_inner(self.txn_id(), sender, sendable, true).await }
    }

    /// Post a transactional work
    fn post<T: SerializableBody + 'static + Send>(
        &self,
        sender: &mut Sender,
        sendable: impl Into<Sendable<T>>,
    ) -> impl Future<Output = Result<Outcome, PostError>> + Send
    where
        Self: Sync,
    {
        let sendable = sendable.into();
        async move {
            let fut = post_inner(self.txn_id(), sender, sendable, false).await?;

            // On receiving a non-settled delivery associated with a live transaction, the
            // transactional resource MUST inform the controller of the presumptive terminal
            // outcome before it can successfully discharge the transaction. That is, the resource
            // MUST send a disposition performative which covers the posted transfer with the state
            // of the delivery being a transactional-state with the correct transaction identified,
            // and a terminal outcome. This informs the controller of the outcome that will be in
            // effect at the point that the transaction is successfully discharged.
            fut.await
        }
    }
}

/// Send a transactional posting with the given `batchable` flag.
///
/// If the transaction controller wishes to associate an outgoing transfer with a transaction, it
/// MUST set the state of the transfer with a transactional-state carrying the appropriate
/// transaction identifier. Note that if the delivery is split across several transfer frames then
/// all frames MUST be explicitly associated with the same transaction.
#[inline]
async fn post_inner<T>(
    txn_id: &TransactionId,
    sender: &mut Sender,
    sendable: Sendable<T>,
    batchable: bool,
) -> Result<DeliveryFut<Result<Outcome, PostError>>, PostError>
where
    T: SerializableBody + 'static + Send,
{
    let state = TransactionalState {
        txn_id: txn_id.clone(),
        outcome: None,
    };
    let state = DeliveryState::TransactionalState(state);
    let settlement = sender
        .inner
        .send_with_state::<T, PostError>(sendable, Some(state), batchable)
        .await?;

    Ok(DeliveryFut::new(settlement, sender.inner.link.session_stop_reason.clone()))
}

/// Send a ref of transactional posting with the given `batchable` flag.
///
/// If the transaction controller wishes to associate an outgoing transfer with a transaction, it
/// MUST set the state of the transfer with a transactional-state carrying the appropriate
/// transaction identifier. Note that if the delivery is split across several transfer frames then
/// all frames MUST be explicitly associated with the same transaction.
#[inline]
async fn post_ref_inner<T>(
    txn_id: &TransactionId,
    sender: &mut Sender,
    sendable: &Sendable<T>,
    batchable: bool,
) -> Result<DeliveryFut<Result<Outcome, PostError>>, PostError>
where
    T: SerializableBody + 'static + Sync,
{
    let state = TransactionalState {
        txn_id: txn_id.clone(),
        outcome: None,
    };
    let state = DeliveryState::TransactionalState(state);
    let settlement = sender
        .inner
        .send_ref_with_state::<T, PostError>(sendable, Some(state), batchable)
        .await?;

    Ok(DeliveryFut::new(settlement, sender.inner.link.session_stop_reason.clone()))
}

/// Transactional acquisition (AMQP 1.0 §4.4.3)
///
/// Transactionally acquiring work causes the resource to acquire (deliver) messages
/// transactionally, i.e. the deliveries are tagged with a `transactional-state` carrying the
/// transaction identifier, and are only retired from the resource upon the successful discharge
/// of the transaction.
pub trait TransactionAcquisition:
    Sized + TransactionBase + TransactionDischarge + TransactionRetirement + Send + Sync
{
    /// Acquire a transactional work
    ///
    /// This will set the `txn-id` property in the link's flow and send a flow frame with the
    /// given credit. The returned [`TxnAcquisition`] can be used to receive and retire the
    /// acquired deliveries.
    fn acquire<'r>(
        self,
        recver: &'r mut Receiver,
        credit: SequenceNo,
    ) -> impl Future<Output = Result<TxnAcquisition<'r, Self>, FlowError>> + Send {
        async move {
            let value = Value::Binary(self.txn_id().clone());
            {
                let mut writer = recver.inner.link.flow_state.lock.write();
                let fields = writer.properties.get_or_insert_with(Fields::new);
                if fields.contains_key(TXN_ID_KEY) {
                    return Err(FlowError::IllegalState);
                }

                fields.insert(Symbol::from(TXN_ID_KEY), value);
            }

            match recver
                .inner
                .link
                // The acquiring flow MUST carry the `txn-id` in its `properties`
                // so the resource associates the transaction with the link
                // (AMQP 1.0 §4.4.3), so the flow properties are explicitly
                // included.
                .send_flow(&recver.inner.outgoing, Some(credit), None, false, true)
                .await
            {
                Ok(_) => Ok(TxnAcquisition { txn: self, recver }),
                Err(error) => {
                    let mut writer = recver.inner.link.flow_state.lock.write();
                    if let Some(fields) = &mut writer.properties {
                        fields.swap_remove(TXN_ID_KEY);
                    }
                    Err(error)
                }
            }
        }
    }
}

/// A transaction scope for the client side
///
/// [`Transaction`] holds a reference to a [`Controller`], which thus allow reusing the same
/// control link for declaring and discharging of multiple transactions. [`OwnedTransaction`]
/// is an alternative that holds the ownership of a control link.
///
/// # Examples
///
/// Please note that only transactional posting has been tested.
///
/// ## Transactional posting
///
/// ```rust,ignore
/// use fe2o3_amqp::transaction::{
///     Controller, Transaction, TransactionDischarge, TransactionPosting,
/// };
///
/// let controller = Controller::attach(&mut session, "controller").await.unwrap();
/// let mut sender = Sender::attach(&mut session, "rust-sender-link-1", "q1")
///     .await
///     .unwrap();
///
/// // Commit
/// let mut txn = Transaction::declare(&controller, None).await.unwrap();
/// txn.post(&mut sender, "hello").await.unwrap();
/// txn.post(&mut sender, "world").await.unwrap();
/// txn.commit().await.unwrap();
///
/// // Rollback
/// let mut txn = Transaction::declare(&controller, None).await.unwrap();
/// txn.post(&mut sender, "foo").await.unwrap();
/// txn.rollback().await.unwrap();
///
/// controller.close().await.unwrap();
/// sender.close().await.unwrap();
/// ```
///
/// ## Transactional retirement
///
/// ```rust,ignore
/// use fe2o3_amqp::transaction::{
///     Controller, Transaction, TransactionDischarge, TransactionRetirement,
/// };
///
/// let controller = Controller::attach(&mut session, "controller").await.unwrap();
/// let mut receiver = Receiver::attach(&mut session, "rust-recver-1", "q1")
///     .await
///     .unwrap();
///
/// let delivery: Delivery<Value> = receiver.recv().await.unwrap();
///
/// // Transactionally retiring
/// let mut txn = Transaction::declare(&controller, None).await.unwrap();
/// txn.accept(&mut receiver, &delivery).await.unwrap();
/// txn.commit().await.unwrap();
///
/// controller.close().await.unwrap();
/// receiver.close().await.unwrap();
/// ```
///
/// ## Transactional acquisition
///
/// Please note that this is not supported on the resource side yet.
///
/// ```rust,ignore
/// use fe2o3_amqp::transaction::{
///     Controller, Transaction, TransactionAcquisition, TransactionRetirement,
/// };
///
/// let controller = Controller::attach(&mut session, "controller").await.unwrap();
/// let mut receiver = Receiver::attach(&mut session, "rust-recver-1", "q1")
///     .await
///     .unwrap();
///
/// // Transactionally acquiring
/// let mut txn = Transaction::declare(&controller, None).await.unwrap();
/// let mut txn_acq = txn.acquire(&mut receiver, 2).await.unwrap();
/// let delivery1: Delivery<Value> = txn_acq.recv().await.unwrap();
/// let delivery2: Delivery<Value> = txn_acq.recv().await.unwrap();
/// txn_acq.accept(&delivery1).await.unwrap();
/// txn_acq.accept(&delivery2).await.unwrap();
/// txn_acq.commit().await.unwrap();
///
/// controller.close().await.unwrap();
/// receiver.close().await.unwrap();
/// ```
#[derive(Debug)]
pub struct Transaction<'t> {
    controller: &'t Controller,
    declared: Declared,
    is_discharged: bool,
    rollback_on_drop_trials: u32,
}


impl<'t> TransactionDischarge for Transaction<'t> {
    type Error = ControllerSendError;

    fn is_discharged(&self) -> bool {
        self.is_discharged
    }

    async fn discharge(&mut self, fail: bool) -> Result<(), Self::Error> {
        if !self.is_discharged {
            let mut inner = self.controller.inner.lock().await;
            discharge_on_link(&mut inner, self.declared.txn_id.clone(), fail).await?;
            self.is_discharged = true;
        }
        Ok(())
    }
}


impl TransactionBase for Transaction<'_> {
    fn txn_id(&self) -> &TransactionId {
        &self.declared.txn_id
    }
}

impl TransactionRetirement for Transaction<'_> {
    type RetireError = DispositionError;
}

impl<'t> Transaction<'t> {
    /// Declares a transaction with a default controller
    ///
    /// The user needs to supply a name for the underlying control link.
    pub async fn declare(
        controller: &'t Controller,
        global_id: impl Into<Option<TransactionId>>,
    ) -> Result<Transaction<'t>, ControllerSendError> {
        let mut inner = controller.inner.lock().await;
        let declared = declare_on_link(&mut inner, global_id.into()).await?;
        Ok(Self {
            controller,
            declared,
            is_discharged: false,
            rollback_on_drop_trials: DEFAULT_ROLLBACK_ON_DROP_TRIALS,
        })
    }

    /// Number of lock-acquisition / outcome-wait trials for the best-effort rollback
    /// performed when the transaction is dropped (see [`DEFAULT_ROLLBACK_ON_DROP_TRIALS`]).
    pub fn rollback_on_drop_trials(&self) -> u32 {
        self.rollback_on_drop_trials
    }

    /// Sets the number of trials for the best-effort rollback performed when the transaction
    /// is dropped. Set to 0 to skip the rollback attempt.
    pub fn set_rollback_on_drop_trials(&mut self, trials: u32) {
        self.rollback_on_drop_trials = trials;
    }
}

impl TransactionPosting for Transaction<'_> {}

impl TransactionAcquisition for Transaction<'_> {}

impl TransactionExt for Transaction<'_> {}

impl<'t> Drop for Transaction<'t> {
    #[cfg_attr(feature = "tracing", tracing::instrument)]
    fn drop(&mut self) {
        if !self.is_discharged {
            let mut counter = 0u32;
            let mut guard = loop {
                if counter > self.rollback_on_drop_trials {
                    #[cfg(feature = "tracing")]
                    tracing::error!(
                        trials = self.rollback_on_drop_trials,
                        "rollback_on_drop: giving up acquiring the control link lock"
                    );
                    #[cfg(feature = "log")]
                    log::error!(
                        "rollback_on_drop: giving up acquiring the control link lock after {} trials",
                        self.rollback_on_drop_trials
                    );
                    return;
                }
                counter += 1;

                match self.controller.inner.try_lock() {
                    Ok(inner) => break inner,
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(
                        (10 * counter + 1) as u64,
                    )),
                }
            };
            rollback_on_drop(
                &mut guard,
                &self.declared.txn_id,
                self.rollback_on_drop_trials,
            );
        }
    }
}

/// Roll back an undischarged transaction when it is dropped.
///
/// This is a best-effort synchronous operation: the discharge transfer is serialized and
/// sent over the control link without `.await` (which is not possible in `Drop`), retrying
/// the outcome wait for a limited number of trials.
///
/// The caller must hold exclusive access to the control link.
pub(crate) fn rollback_on_drop(
    inner: &mut SenderInner<ControlLink>,
    txn_id: &TransactionId,
    trials: u32,
) {
    let discharge = Discharge {
        txn_id: txn_id.clone(),
        fail: Some(true),
    };
    // As with the declare message, it is an error if the sender sends the transfer pre-settled.
    let message = Message::builder().value(discharge).build();
    let mut payload = BytesMut::new();
    let mut serializer = Serializer::from((&mut payload).writer());
    if let Err(_error) = Serializable(message).serialize(&mut serializer) {
        #[cfg(feature = "tracing")]
        tracing::error!(error = ?_error);
        #[cfg(feature = "log")]
        log::error!("error = {:?}", _error);
        return;
    }
    let payload = payload.freeze();
    let payload_copy = payload.clone();

    match inner.link.flow_state.try_consume(1) {
        Ok(_) => {
            let input_handle = match inner.link.input_handle.clone().ok_or(AmqpError::IllegalState)
            {
                Ok(handle) => handle,
                Err(_error) => {
                    #[cfg(feature = "tracing")]
                    tracing::error!(error = ?_error);
                    #[cfg(feature = "log")]
                    log::error!("error = {:?}", _error);
                    return;
                }
            };
            let handle = match inner.link.output_handle.clone() {
                Some(handle) => handle.into(),
                None => return,
            };
            let tag = match inner.link.flow_state.state().lock.try_read() {
                Some(inner) => inner.delivery_count.to_be_bytes(),
                None => return,
            };
            let delivery_tag = DeliveryTag::from(tag);

            let transfer = Transfer {
                handle,
                delivery_id: None,
                delivery_tag: Some(delivery_tag.clone()),
                message_format: Some(MESSAGE_FORMAT),
                settled: Some(false),
                more: false, // This message should be small enough
                rcv_settle_mode: None,
                state: None,
                resume: false,
                aborted: false,
                batchable: false,
            };

            // try receive in case of detach
            match inner.incoming.try_recv() {
                Ok(_) => {
                    // The only frames that are relayed is detach
                    return;
                }
                Err(error) => match error {
                    TryRecvError::Empty => {}
                    TryRecvError::Disconnected => return,
                },
            }

            // Send out Rollback
            let frame = LinkFrame::FirstTransfer(LinkTransfer {
                input_handle,
                performative: transfer,
                payload,
            });
            if let Err(_error) = inner.outgoing.try_send(frame) {
                // The channel to the session is already closed
                #[cfg(feature = "tracing")]
                tracing::error!(txn_id = ?txn_id, "rollback_on_drop: failed to send the discharge transfer, the control link channel is closed");
                #[cfg(feature = "log")]
                log::error!("rollback_on_drop: failed to send the discharge transfer, the control link channel is closed");
                return;
            }

            // TODO: Wait for accept or not?
            // The transfer is sent unsettled and will be
            // inserted into
            let (tx, mut rx) = oneshot::channel();
            let unsettled = UnsettledMessage::new(payload_copy, None, MESSAGE_FORMAT, tx);
            {
                let mut guard = match inner.link.unsettled.try_write() {
                    Some(guard) => guard,
                    None => return,
                };
                guard
                    .get_or_insert(OrderedMap::new())
                    .insert(delivery_tag, unsettled);
            }
            let mut counter = 0u32;
            loop {
                // TODO:: limits?
                if counter > trials {
                    #[cfg(feature = "tracing")]
                    tracing::error!(txn_id = ?txn_id, trials, "rollback_on_drop: giving up waiting for the discharge outcome");
                    #[cfg(feature = "log")]
                    log::error!("rollback_on_drop: giving up waiting for the discharge outcome after {trials} trials");
                    return;
                }
                counter += 1;

                match rx.try_recv() {
                    Ok(Ok(Some(state))) => match state {
                        DeliveryState::Accepted(_) => break,
                        _ => {
                            #[cfg(feature = "tracing")]
                            tracing::error!(error = ?state);
                            #[cfg(feature = "log")]
                            log::error!("error = {:?}", state);
                            break;
                        }
                    },
                    Ok(Ok(None)) => {
                        std::thread::sleep(std::time::Duration::from_millis(
                            (10 * counter + 1) as u64,
                        ));
                    }
                    // A link-state error was delivered through the channel
                    // (e.g. the remote closed the control link): the discharge
                    // outcome will not arrive, so give up waiting.
                    Ok(Err(_error)) => {
                        #[cfg(feature = "tracing")]
                        tracing::error!(error = ?_error);
                        #[cfg(feature = "log")]
                        log::error!("error = {:?}", _error);
                        return;
                    }
                    Err(_error) => {
                        #[cfg(feature = "tracing")]
                        tracing::error!(error = ?_error);
                        #[cfg(feature = "log")]
                        log::error!("error = {:?}", _error);
                    }
                };
            }
        }
        Err(_error) => {
            #[cfg(feature = "tracing")]
            tracing::error!(error = ?_error);
            #[cfg(feature = "log")]
            log::error!("error = {:?}", _error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        TransactionAcquisition, TransactionBase, TransactionDischarge, TransactionRetirement,
    };
    use crate::link::test_util::make_receiver_inner_with_channels;
    use crate::link::{LinkFrame, Receiver};
    use fe2o3_amqp_types::primitives::{Binary, Symbol, Value};

    /// `TransactionAcquisition::acquire` must record the `txn-id` on the link
    /// and send the acquiring credit flow with the flow properties included,
    /// so the resource associates the transaction with the link
    /// (AMQP 1.0 §4.4.3). This guards the regression where the acquiring flow
    /// was sent with `include_properties = false` and the `txn-id` was dropped.
    #[tokio::test]
    async fn acquire_flow_carries_the_txn_id() {
        // `acquire`'s default body only needs `txn_id`. `is_discharged()`
        // returns `true` so `TxnAcquisition`'s `Drop` (which uses a blocking
        // send) does not run inside the async runtime; the recorded properties
        // are therefore left intact for inspection.
        struct FakeTxn {
            id: Binary,
        }
        impl TransactionBase for FakeTxn {
            fn txn_id(&self) -> &Binary {
                &self.id
            }
        }
        impl TransactionDischarge for FakeTxn {
            type Error = crate::link::FlowError;
            fn is_discharged(&self) -> bool {
                true
            }
            async fn discharge(&mut self, _fail: bool) -> Result<(), Self::Error> {
                Ok(())
            }
        }
        impl TransactionRetirement for FakeTxn {
            type RetireError = crate::link::DispositionError;
        }
        impl TransactionAcquisition for FakeTxn {}

        let (inner, _session_rx, mut outgoing_rx, _incoming_tx) =
            make_receiver_inner_with_channels(4096);
        let mut receiver = Receiver { inner };

        let id = Binary::from(vec![1u8, 2, 3]);
        let acq = FakeTxn { id: id.clone() }
            .acquire(&mut receiver, 1)
            .await
            .expect("acquiring");

        // The acquiring flow must carry the txn-id in its properties.
        match outgoing_rx.recv().await {
            Some(LinkFrame::Flow(flow)) => {
                let props = flow
                    .properties
                    .expect("the acquiring flow must carry properties");
                assert_eq!(
                    props.get(&Symbol::from("txn-id")),
                    Some(&Value::Binary(id.clone()))
                );
            }
            other => panic!("unexpected frame: {other:?}"),
        }

        drop(acq); // no-op Drop (is_discharged() == true), releases the borrow

        // ...and the txn-id was recorded on the link's flow state.
        assert!(
            receiver
                .inner
                .link
                .flow_state
                .lock
                .read()
                .properties
                .as_ref()
                .expect("properties must be recorded")
                .contains_key(&Symbol::from("txn-id")),
            "the link must record the txn-id"
        );
    }
}
