use std::future::Future;

use fe2o3_amqp_types::{
    definitions::Error,
    messaging::Accepted,
    transaction::TransactionId,
};

use crate::transaction::AllocTxnIdError;

use super::Session;

pub(crate) trait HandleDeclare: Session {
    fn allocate_transaction_id(&mut self) -> Result<TransactionId, AllocTxnIdError>;
}


pub(crate) trait HandleDischarge: Session {
    fn commit_transaction(
        &mut self,
        txn_id: TransactionId,
    ) -> impl Future<Output = Result<Result<Accepted, Error>, Self::Error>> + Send;
    fn rollback_transaction(
        &mut self,
        txn_id: TransactionId,
    ) -> Result<Result<Accepted, Error>, Self::Error>;

    /// KEEL PATCH: rolls back the transactions older than their limit.
    fn expire_transactions(&mut self) {}
}
