//! Implements session that can handle transaction


use std::sync::{Arc, OnceLock};

use fe2o3_amqp_types::{
    definitions::{self},
    messaging::{Accepted, DeliveryState},
    performatives::{Attach, Begin, Detach, Disposition, End, Flow, Transfer},
    transaction::{TransactionError, TransactionId},
};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::{
    connection::ConnectionStopReason,
    control::SessionControl,
    endpoint::{self, IncomingChannel, InputHandle, LinkFlow, OutgoingChannel, OutputHandle},
    link::{target_archetype::VariantOfTargetArchetype, LinkRelay, SessionStopReason},
    session::{
        self,
        frame::{SessionFrame, SessionOutgoingItem},
    },
    Payload,
};

use super::{
    resource::TxnWork,
    frame::TxnWorkFrame,
    manager::{HandleControlLink, ResourceTransaction, TransactionManager},
    AllocTxnIdError, DischargeError,
};

pub(crate) async fn allocate_transaction_id(
    control: &mpsc::Sender<SessionControl>,
) -> Result<TransactionId, AllocTxnIdError> {
    let (resp, result) = oneshot::channel();

    control
        .send(SessionControl::AllocateTransactionId { resp })
        .await
        .map_err(|_| AllocTxnIdError::InvalidSessionState)?;
    result
        .await
        .map_err(|_| AllocTxnIdError::InvalidSessionState)?
}

pub(crate) async fn rollback_transaction(
    control: &mpsc::Sender<SessionControl>,
    txn_id: TransactionId,
) -> Result<Accepted, DischargeError> {
    let (resp, result) = oneshot::channel();

    control
        .send(SessionControl::RollbackTransaction { txn_id, resp })
        .await
        .map_err(|_| DischargeError::InvalidSessionState)?;
    result
        .await
        .map_err(|_| DischargeError::InvalidSessionState)?
        .map_err(Into::into)
}

pub(crate) async fn commit_transaction(
    control: &mpsc::Sender<SessionControl>,
    txn_id: TransactionId,
) -> Result<Accepted, DischargeError> {
    let (resp, result) = oneshot::channel();

    control
        .send(SessionControl::CommitTransaction { txn_id, resp })
        .await
        .map_err(|_| DischargeError::InvalidSessionState)?;
    result
        .await
        .map_err(|_| DischargeError::InvalidSessionState)?
        .map_err(Into::into)
}

/// A session wrapper that handles transactional work on the resource side.
#[derive(Debug)]
pub(crate) struct TxnSession<S>
where
    S: endpoint::Session,
{
    pub(crate) control: mpsc::Sender<SessionControl>,
    pub(crate) session: S,
    pub(crate) txn_manager: TransactionManager,
    /// The negotiated max frame size of the session's connection, used when
    /// accepting the transaction control link
    pub(crate) max_frame_size: usize,
    /// KEEL PATCH: handles of links in the middle of a multi-frame transactional post.
    pub(crate) posting: std::collections::HashSet<u32>,
    /// KEEL PATCH: link flows that give back the credit of transactional posts.
    pub(crate) pending_flows: Vec<crate::endpoint::LinkFlow>,
}

impl<S> TxnSession<S> where
    S: endpoint::Session<Error = session::error::SessionInnerError> + Send + Sync
{
}

impl<S> TxnSession<S>
where
    S: endpoint::Session<Error = session::error::SessionInnerError> + Send + Sync,
{
    /// KEEL PATCH: rolls back transaction `txn_id` (if it is open) on the resource's behalf
    /// because of `error`: its frames are dropped and the resource hands back what it
    /// settled; the transaction stays declared, holding nothing, so that its discharge and
    /// any further post learn `error`.
    fn fail_transaction(&mut self, txn_id: &TransactionId, error: definitions::Error) {
        let Some(txn) = self.txn_manager.txns.get_mut(txn_id) else {
            return;
        };
        if txn.failed.is_some() {
            return;
        }
        let frames = std::mem::take(&mut txn.frames);
        txn.failed = Some(error);
        txn.bytes = 0;
        let work = keel_work(&self.session, &frames);
        drop(frames);
        if let Some(resource) = &self.txn_manager.control_link_acceptor.resource {
            resource.rollback(txn_id.clone(), work);
        }
    }

    /// KEEL PATCH: the error of a transaction held open too long.
    fn timeout_error(&self) -> definitions::Error {
        let age = self.txn_manager.control_link_acceptor.limits.age_max;
        definitions::Error::new(
            TransactionError::Timeout,
            format!(
                "the transaction was rolled back by the server: it was open longer than {} s, the longest a transaction may stay open; nothing of it took effect; discharge transactions sooner",
                age.as_secs()
            ),
            None,
        )
    }

    /// KEEL PATCH: the error of a transaction grown past its limits.
    fn too_large_error(&self) -> definitions::Error {
        let limits = &self.txn_manager.control_link_acceptor.limits;
        definitions::Error::new(
            TransactionError::Rollback,
            format!(
                "the transaction was rolled back by the server: it grew past {} posted and settled messages or {} bytes of posted messages, the most one transaction may hold; nothing of it took effect; commit in smaller transactions",
                limits.work_max, limits.bytes_max
            ),
            None,
        )
    }

    /// KEEL PATCH: rolls back `txn_id` if it is older than the limit; whether it failed.
    fn expire_one(&mut self, txn_id: &TransactionId) -> bool {
        let age_max = self.txn_manager.control_link_acceptor.limits.age_max;
        let Some(txn) = self.txn_manager.txns.get(txn_id) else {
            return false;
        };
        if txn.failed.is_none() && txn.declared.elapsed() > age_max {
            let error = self.timeout_error();
            self.fail_transaction(txn_id, error);
        }
        self.txn_manager
            .txns
            .get(txn_id)
            .is_some_and(|t| t.failed.is_some())
    }
}

/// KEEL PATCH: a transaction's kept frames as the application's work list.
fn keel_work<S: endpoint::Session>(session: &S, frames: &[TxnWorkFrame]) -> Vec<TxnWork> {
    let mut work = Vec::with_capacity(frames.len());
    for work_frame in frames {
        match work_frame {
            TxnWorkFrame::Post { transfer, payload } => work.push(TxnWork::Post {
                handle: transfer.handle.0,
                delivery_id: transfer.delivery_id,
                more: transfer.more,
                payload: payload.clone(),
            }),
            TxnWorkFrame::Retire(disposition) => {
                let outcome = match &disposition.state {
                    Some(DeliveryState::TransactionalState(s)) => s.outcome.clone(),
                    _ => None,
                };
                let last = disposition.last.unwrap_or(disposition.first);
                for id in disposition.first..=last {
                    if let Some((handle, delivery_tag)) =
                        session.delivery_tag_of(&disposition.role, id)
                    {
                        work.push(TxnWork::Retire {
                            handle,
                            delivery_tag,
                            outcome: outcome.clone(),
                        });
                    }
                }
            }
        }
    }
    work
}

impl<S> HandleControlLink for TxnSession<S>
where
    S: endpoint::Session<Error = session::error::SessionInnerError> + Send + Sync,
{
    type Error = S::Error;

    async fn on_incoming_control_attach(
        &mut self,
        remote_attach: Attach,
    ) -> Result<(), Self::Error> {
        let acceptor = self.txn_manager.control_link_acceptor.clone();
        let control = self.control.clone();
        let outgoing = self.txn_manager.control_link_outgoing.clone();
        let session_stop_reason = self.session.session_stop_reason().clone();
        let max_frame_size = self.max_frame_size;

        tokio::spawn(async move {
            // Error accepting new control link is handled by acceptor
            if let Ok(coordinator) = acceptor
                .accept_incoming_attach(
                    remote_attach,
                    control,
                    outgoing,
                    session_stop_reason,
                    max_frame_size,
                )
                .await
            {
                coordinator.event_loop().await
            }
        });

        Ok(())
    }
}

impl<S> endpoint::HandleDeclare for TxnSession<S>
where
    S: endpoint::Session<Error = session::error::SessionInnerError> + Send + Sync,
{
    fn allocate_transaction_id(&mut self) -> Result<TransactionId, AllocTxnIdError> {
        // KEEL PATCH: a bounded number of open transactions.
        let limits = self.txn_manager.control_link_acceptor.limits.clone();
        let Some(slot) = super::resource::OpenSlot::take(&limits) else {
            return Err(AllocTxnIdError::Refused(definitions::Error::new(
                definitions::AmqpError::ResourceLimitExceeded,
                format!(
                    "this connection already has {} open transactions, the most it may have (one the server rolled back stays open until it is discharged); discharge one before declaring another",
                    limits.open_max
                ),
                None,
            )));
        };
        let mut txn_id = TransactionId::from(Uuid::new_v4().into_bytes());
        while self.txn_manager.txns.contains_key(&txn_id) {
            txn_id = TransactionId::from(Uuid::new_v4().into_bytes());
        }

        let _ = self
            .txn_manager
            .txns
            .insert(
                txn_id.clone(),
                ResourceTransaction {
                    _slot: Some(slot),
                    ..ResourceTransaction::new()
                },
            );
        Ok(txn_id)
    }
}


impl<S> endpoint::HandleDischarge for TxnSession<S>
where
    S: endpoint::Session<Error = session::error::SessionInnerError> + Send + Sync,
{
    #[cfg_attr(feature = "tracing", tracing::instrument(skip_all))]
    async fn commit_transaction(
        &mut self,
        txn_id: TransactionId,
    ) -> Result<Result<Accepted, definitions::Error>, Self::Error> {
        // KEEL PATCH: one rolled back by the server (a limit) says why.
        self.expire_one(&txn_id);
        let txn = match self.txn_manager.txns.swap_remove(&txn_id) {
            Some(txn) => txn,
            None => {
                return Ok(Err(definitions::Error::new(
                    TransactionError::UnknownId,
                    None,
                    None,
                )))
            }
        };
        if let Some(error) = txn.failed {
            return Ok(Err(error));
        }
        // KEEL PATCH: the application applies the work first, all or nothing; only then do
        // the settlements reach the links (the posts are already applied, so they are not
        // replayed).
        let resource = self.txn_manager.control_link_acceptor.resource.clone();
        if let Some(resource) = &resource {
            let work = keel_work(&self.session, &txn.frames);
            if let Err(why) = resource.commit(txn_id.clone(), work).await {
                return Ok(Err(definitions::Error::new(
                    TransactionError::Rollback,
                    why,
                    None,
                )));
            }
        }

        for work_frame in txn.frames {
            match work_frame {
                TxnWorkFrame::Post { .. } if resource.is_some() => {}
                TxnWorkFrame::Post {
                    mut transfer,
                    payload,
                } => {
                    // FIXME: This informs the controller of the outcome that will be in effect at the point that the
                    // transaction is successfully discharged
                    if let Some(DeliveryState::TransactionalState(txn_state)) = transfer.state {
                        transfer.state = txn_state.outcome.map(Into::into);
                    };

                    // Committing shuold never need to send an immediate disposition
                    if let Some(disposition) =
                        self.session.on_incoming_transfer(transfer, payload).await?
                    {
                        self.control
                            .send(SessionControl::Disposition(disposition))
                            .await
                            .map_err(|_| Self::Error::IllegalState)?
                    }
                }
                TxnWorkFrame::Retire(mut disposition) => {
                    // On a successful discharge, the resource will apply the given outcome and can immediately settle the transfers.
                    if let Some(DeliveryState::TransactionalState(txn_state)) = disposition.state {
                        disposition.state = txn_state.outcome.map(Into::into)
                    }
                    disposition.settled = true;

                    // TODO: Where should the echoing disposition be sent?
                    if let Some(dispositions) = self.session.on_incoming_disposition(disposition)? {
                        for disposition in dispositions {
                            self.control
                                .send(SessionControl::Disposition(disposition))
                                .await
                                .map_err(|_| Self::Error::IllegalState)?
                        }
                    }
                }
            }
        }

        Ok(Ok(Accepted {}))
    }

    fn rollback_transaction(
        &mut self,
        txn_id: TransactionId,
    ) -> Result<Result<Accepted, definitions::Error>, Self::Error> {
        match self.txn_manager.txns.swap_remove(&txn_id) {
            // KEEL PATCH: rolled back already by the server (a limit): what the controller
            // asks for is done.
            Some(txn) if txn.failed.is_some() => Ok(Ok(Accepted {})),
            // KEEL PATCH: the application learns what was rolled back.
            Some(txn) if self.txn_manager.control_link_acceptor.resource.is_some() => {
                let work = keel_work(&self.session, &txn.frames);
                if let Some(resource) = &self.txn_manager.control_link_acceptor.resource {
                    resource.rollback(txn_id, work);
                }
                Ok(Ok(Accepted {}))
            }
            Some(_) => {
                // TODO: Simply drop the frames?
                Ok(Ok(Accepted {}))
            }
            None => Ok(Err(definitions::Error::new(
                TransactionError::UnknownId,
                None,
                None,
            ))),
        }
    }

    // KEEL PATCH: transactions left open too long are rolled back.
    fn expire_transactions(&mut self) {
        let ids: Vec<TransactionId> = self.txn_manager.txns.keys().cloned().collect();
        for txn_id in ids {
            self.expire_one(&txn_id);
        }
    }
}


impl<S> endpoint::Session for TxnSession<S>
where
    S: endpoint::Session<Error = session::error::SessionInnerError> + Send + Sync,
{
    type AllocError = S::AllocError;
    type BeginError = S::BeginError;
    type EndError = S::EndError;
    type Error = S::Error;
    type State = S::State;

    fn local_state(&self) -> &Self::State {
        self.session.local_state()
    }

    // KEEL PATCH: see endpoint::Session::delivery_tag_of.
    fn delivery_tag_of(
        &self,
        remote_role: &fe2o3_amqp_types::definitions::Role,
        delivery_id: fe2o3_amqp_types::definitions::DeliveryNumber,
    ) -> Option<(u32, Vec<u8>)> {
        self.session.delivery_tag_of(remote_role, delivery_id)
    }

    fn set_session_stop_reason(&mut self, reason: SessionStopReason) {
        self.session.set_session_stop_reason(reason)
    }

    fn session_stop_reason(&self) -> &Arc<OnceLock<SessionStopReason>> {
        self.session.session_stop_reason()
    }

    fn connection_stop_reason(&self) -> &Arc<OnceLock<ConnectionStopReason>> {
        self.session.connection_stop_reason()
    }

    fn outgoing_channel(&self) -> OutgoingChannel {
        self.session.outgoing_channel()
    }

    // Allocate new local handle for new Link
    fn allocate_link(
        &mut self,
        link_name: String,
        link_relay: Option<LinkRelay<()>>,
    ) -> Result<OutputHandle, Self::AllocError> {
        self.session.allocate_link(link_name, link_relay)
    }

    fn allocate_incoming_link(
        &mut self,
        link_name: String,
        link_relay: LinkRelay<()>,
        input_handle: InputHandle,
    ) -> Result<OutputHandle, Self::AllocError> {
        self.session
            .allocate_incoming_link(link_name, link_relay, input_handle)
    }

    fn deallocate_link(&mut self, output_handle: OutputHandle) -> bool {
        self.session.deallocate_link(output_handle)
    }

    fn on_incoming_begin(
        &mut self,
        channel: IncomingChannel,
        begin: Begin,
    ) -> Result<(), Self::BeginError> {
        self.session.on_incoming_begin(channel, begin)
    }

    async fn on_incoming_attach(&mut self, attach: Attach) -> Result<(), Self::Error> {
        match attach.target.as_ref().map(|t| t.is_coordinator()) {
            Some(true) => self.on_incoming_control_attach(attach).await,
            Some(false) | None => self.session.on_incoming_attach(attach).await,
        }
    }

    async fn on_incoming_flow(
        &mut self,
        flow: Flow,
    ) -> Result<Option<SessionOutgoingItem>, Self::Error> {
        // TODO: implement transactional acquisition
        // match flow
        //     .properties
        //     .as_ref()
        //     .map(|fields| fields.contains_key(TXN_ID_KEY))
        // {
        //     Some(true) => {
        //         // self.on_incoming_txn_flow(flow).await
        //     }
        //     Some(false) | None => self.session.on_incoming_flow(flow).await,
        // }
        self.session.on_incoming_flow(flow).await
    }

    async fn on_incoming_transfer(
        &mut self,
        transfer: Transfer,
        payload: Payload,
    ) -> Result<Option<Disposition>, Self::Error> {
        let txn_id = match &transfer.state {
            Some(DeliveryState::TransactionalState(state)) => state.txn_id.clone(),
            Some(_) | None => return self.session.on_incoming_transfer(transfer, payload).await,
        };
        // KEEL PATCH: the post counts in flow control although its link never sees it.
        let handle = transfer.handle.0;
        let first_frame = !self.posting.contains(&handle);
        if transfer.more {
            self.posting.insert(handle);
        } else {
            self.posting.remove(&handle);
        }
        if let Some(flow) = self.session.on_transactional_post(&transfer, first_frame) {
            self.pending_flows.push(flow);
        }
        if !self.txn_manager.txns.contains_key(&txn_id) {
            return Err(S::Error::UnknownTxnId);
        }
        // KEEL PATCH: bounded in age, deliveries and bytes; past a bound the transaction is
        // rolled back at once (nothing more of it is kept) and its posts are rejected.
        if !self.expire_one(&txn_id) {
            let limits = &self.txn_manager.control_link_acceptor.limits;
            let (work_max, bytes_max) = (limits.work_max, limits.bytes_max);
            let txn = self.txn_manager.txns.get_mut(&txn_id).expect("checked above");
            if first_frame {
                txn.work += 1;
            }
            txn.bytes = txn.bytes.saturating_add(payload.len());
            if txn.work > work_max || txn.bytes > bytes_max {
                let error = self.too_large_error();
                self.fail_transaction(&txn_id, error);
            }
        }
        let txn = self.txn_manager.txns.get_mut(&txn_id).expect("checked above");
        if let Some(error) = &txn.failed {
            let settled = transfer.settled.unwrap_or(false);
            return Ok(match transfer.delivery_id {
                Some(delivery_id) if first_frame && !settled => Some(Disposition {
                    role: definitions::Role::Receiver,
                    first: delivery_id,
                    last: None,
                    settled: true,
                    state: Some(DeliveryState::TransactionalState(
                        fe2o3_amqp_types::transaction::TransactionalState {
                            txn_id,
                            outcome: Some(fe2o3_amqp_types::messaging::Outcome::Rejected(
                                fe2o3_amqp_types::messaging::Rejected {
                                    error: Some(error.clone()),
                                },
                            )),
                        },
                    )),
                    batchable: false,
                }),
                _ => None,
            });
        }
        Ok(txn.on_incoming_post(txn_id, transfer, payload))
    }

    // KEEL PATCH: see endpoint::Session::take_pending_link_flows.
    fn take_pending_link_flows(&mut self) -> Vec<crate::endpoint::LinkFlow> {
        std::mem::take(&mut self.pending_flows)
    }

    fn on_incoming_disposition(
        &mut self,
        disposition: Disposition,
    ) -> Result<Option<Vec<Disposition>>, Self::Error> {
        match &disposition.state {
            Some(DeliveryState::TransactionalState(state)) => {
                let txn_id = state.txn_id.clone();
                if !self.txn_manager.txns.contains_key(&txn_id) {
                    // FIXME: Should this stop the session or just the coordinator associated with the txn?
                    return Err(S::Error::UnknownTxnId);
                }
                // KEEL PATCH: settlements count against the transaction's bound; those
                // of a transaction the server rolled back go back to the resource at once
                // (the controller will not settle them again).
                let count = disposition
                    .last
                    .unwrap_or(disposition.first)
                    .saturating_sub(disposition.first) as usize
                    + 1;
                let work_max = self.txn_manager.control_link_acceptor.limits.work_max;
                let failed = self.expire_one(&txn_id);
                let txn = self.txn_manager.txns.get_mut(&txn_id).expect("checked above");
                if failed {
                    let work = keel_work(&self.session, &[TxnWorkFrame::Retire(disposition)]);
                    if let Some(resource) = &self.txn_manager.control_link_acceptor.resource {
                        resource.rollback(txn_id, work);
                    }
                    return Ok(None);
                }
                txn.work = txn.work.saturating_add(count);
                txn.frames.push(TxnWorkFrame::Retire(disposition));
                if txn.work > work_max {
                    let error = self.too_large_error();
                    self.fail_transaction(&txn_id, error);
                }
                Ok(None) // TODO: need to consider the receiver settle mode?
            }
            Some(_) | None => self.session.on_incoming_disposition(disposition),
        }
    }

    async fn on_incoming_detach(
        &mut self,
        detach: Detach,
    ) -> Result<Option<Detach>, Self::Error> {
        self.session.on_incoming_detach(detach).await
    }

    fn on_incoming_end(
        &mut self,
        channel: IncomingChannel,
        end: End,
    ) -> Result<(), Self::EndError> {
        self.session.on_incoming_end(channel, end)
    }

    // Handling SessionFrames
    async fn send_begin(
        &mut self,
        writer: &mpsc::Sender<SessionFrame>,
    ) -> Result<(), Self::BeginError> {
        self.session.send_begin(writer).await
    }

    async fn send_end(
        &mut self,
        writer: &mpsc::Sender<SessionFrame>,
        error: Option<definitions::Error>,
    ) -> Result<(), Self::EndError> {
        self.session.send_end(writer, error).await
    }

    // Intercepting LinkFrames
    fn on_outgoing_attach(&mut self, attach: Attach) -> Result<SessionFrame, Self::Error> {
        self.session.on_outgoing_attach(attach)
    }

    fn on_outgoing_flow(&mut self, flow: LinkFlow) -> Result<SessionFrame, Self::Error> {
        self.session.on_outgoing_flow(flow)
    }

    fn maybe_outgoing_session_flow(&mut self) -> Option<SessionOutgoingItem> {
        self.session.maybe_outgoing_session_flow()
    }

    fn on_outgoing_transfer(
        &mut self,
        input_handle: InputHandle,
        transfer: Transfer,
        payload: Payload,
        is_first: bool,
    ) -> Result<Option<SessionOutgoingItem>, Self::Error> {
        self.session
            .on_outgoing_transfer(input_handle, transfer, payload, is_first)
    }

    fn on_outgoing_disposition(
        &mut self,
        disposition: Disposition,
    ) -> Result<SessionFrame, Self::Error> {
        self.session.on_outgoing_disposition(disposition)
    }

    fn on_outgoing_detach(&mut self, detach: Detach, expects_echo: bool) -> Option<SessionFrame> {
        self.session.on_outgoing_detach(detach, expects_echo)
    }
}
