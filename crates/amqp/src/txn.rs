//! AMQP transactions, made atomic and durable in the engine.
//!
//! fe2o3's coordinator (patched: `third_party/fe2o3-amqp/KEEL-PATCH.md`) declares transactions,
//! answers transactional transfers at once, and keeps a transaction's posts and settlements
//! until its discharge. On commit it hands them to `SessionLinks::commit`, which turns them
//! into one engine transaction (`Messaging::begin`, `tx_send`, `tx_settle`, `commit`: one
//! durable store commit) and only then lets the discharge be answered `accepted`. On rollback
//! nothing reaches the store, and deliveries the client settled in the transaction are released
//! (the client will not settle them again). Work of one transaction must go to one messaging
//! engine (one store); other work is refused. `SessionLinks` (one per session) knows the
//! session's links by the client's handle, with each consumer link's delivery tags.
//!
//! Bounds (`limits`, `TxnLimits`, enforced inside fe2o3's resource-side session, where the work
//! is held): a transaction holds at most `TXN_MESSAGES_MAX` posted and settled messages and
//! `TXN_BYTES_MAX` of posts (sized so that one store commit can carry it all), lives at most
//! `TXN_AGE_MAX_S` (`KEEL_AMQP_TXN_AGE_MAX_S` in the server's environment overrides it; the
//! coordinator ticks the session to expire idle ones), and a connection holds at most
//! `TXN_OPEN_MAX` open. Past a size or age bound the transaction is rolled back at once (its
//! frames dropped, `rollback` releases what it settled) and stays declared holding nothing: its
//! later posts are answered `rejected` with the reason, and its discharge is refused with
//! `amqp:transaction:rollback` or `amqp:transaction:timeout` and the reason. The client is told
//! on its next post or discharge, not by a detach: detaching the control link would end the
//! controller's other transactions, detaching the sending link its plain sends, and nothing
//! commits without a discharge, so the client always learns before it could believe the work
//! done. Transactional posts never reach their link, so the session counts them in flow control
//! itself (the link's credit is granted again with a flow per post); without that, a sender
//! stalled once it had used its credit (fe2o3's default, 200).
//!
//! Known gap: if the engine's commit itself fails (a store error), the deliveries the
//! transaction claimed become available again while the client may still hold them
//! (at-least-once there). Not supported: transactional acquisition (fe2o3 has none on the
//! resource side).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use fe2o3_amqp::transaction::resource::{TxnLimits, TxnResource, TxnWork};
use fe2o3_amqp::types::messaging::message::__private::Deserializable;
use fe2o3_amqp::types::messaging::{Body, Message};
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::types::transaction::TransactionId;
use keel_engine::messaging::{Messaging, Outcome, OutgoingMessage};

use crate::convert;

/// The bounds of a session's transactions; `open` counts the connection's open ones.
pub fn limits(open: &Arc<std::sync::atomic::AtomicUsize>) -> TxnLimits {
    TxnLimits {
        work_max: crate::TXN_MESSAGES_MAX,
        bytes_max: crate::TXN_BYTES_MAX,
        age_max: std::time::Duration::from_secs(age_max_s()),
        open_max: crate::TXN_OPEN_MAX,
        open: open.clone(),
    }
}

/// TXN_AGE_MAX_S, or `KEEL_AMQP_TXN_AGE_MAX_S` from the server's environment (read once).
fn age_max_s() -> u64 {
    static AGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *AGE.get_or_init(|| {
        std::env::var("KEEL_AMQP_TXN_AGE_MAX_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|s| *s > 0)
            .unwrap_or(crate::TXN_AGE_MAX_S)
    })
}

/// Deliveries a consumer link has sent and not yet seen settled: tag → the engine's seq.
/// foldhash, not SipHash: the tags are the link's own counter (no flooding to defend against),
/// and two lookups per message showed up in profiles.
#[derive(Default)]
pub struct Tags(Mutex<HashMap<Vec<u8>, u64, foldhash::fast::RandomState>>);

impl Tags {
    pub fn insert(&self, tag: Vec<u8>, seq: u64) {
        self.0.lock().expect("tags lock").insert(tag, seq);
    }

    /// Takes a delivery out; None when a transaction (or an earlier settle) took it.
    pub fn remove(&self, tag: &[u8]) -> Option<u64> {
        self.0.lock().expect("tags lock").remove(tag)
    }

    /// Takes several deliveries out under one lock: which of them were still there.
    pub fn remove_many<'a>(&self, tags: impl Iterator<Item = &'a [u8]>) -> Vec<bool> {
        let mut map = self.0.lock().expect("tags lock");
        tags.map(|t| map.remove(t).is_some()).collect()
    }

    fn get(&self, tag: &[u8]) -> Option<u64> {
        self.0.lock().expect("tags lock").get(tag).copied()
    }
}

/// A transactional settlement: queue, seq, outcome, and the link's tags with its tag.
type TxnSettle = (String, u64, Outcome, Arc<Tags>, Vec<u8>);
/// Deliveries to give back on one queue of one engine.
type Releases = (Arc<Messaging>, String, Vec<(u64, Outcome)>);

/// A link of the session, by the client's handle for it.
#[derive(Clone)]
pub enum LinkInfo {
    /// The client sends on it: transactional posts go to `dest`.
    Incoming {
        messaging: Arc<Messaging>,
        dest: String,
    },
    /// The client receives from `queue` on it: transactional settlements name its deliveries
    /// by tag.
    Outgoing {
        messaging: Arc<Messaging>,
        queue: String,
        tags: Arc<Tags>,
    },
}

/// The links of one session; the resource of its transactions.
#[derive(Default)]
pub struct SessionLinks {
    links: Mutex<HashMap<u32, LinkInfo>>,
}

impl std::fmt::Debug for SessionLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.links.lock().map(|l| l.len()).unwrap_or(0);
        write!(f, "SessionLinks({n} links)")
    }
}

impl SessionLinks {
    pub fn add(&self, remote_handle: u32, link: LinkInfo) {
        self.links
            .lock()
            .expect("links lock")
            .insert(remote_handle, link);
    }

    pub fn remove(&self, remote_handle: u32) {
        self.links
            .lock()
            .expect("links lock")
            .remove(&remote_handle);
    }

    fn link(&self, handle: u32) -> Result<LinkInfo, String> {
        self.links
            .lock()
            .expect("links lock")
            .get(&handle)
            .cloned()
            .ok_or_else(|| {
                format!("transactional work on link handle {handle}, which is not attached")
            })
    }

    async fn apply(&self, work: Vec<TxnWork>) -> Result<(), String> {
        let mut engine: Option<Arc<Messaging>> = None;
        let mut one_engine = |m: &Arc<Messaging>| match &engine {
            Some(e) if !Arc::ptr_eq(e, m) => {
                Err("a transaction's work must stay on one messaging engine (one bus)".to_string())
            }
            Some(_) => Ok(()),
            None => {
                engine = Some(m.clone());
                Ok(())
            }
        };
        let mut sends: Vec<(String, OutgoingMessage)> = Vec::new();
        let mut settles: Vec<TxnSettle> = Vec::new();
        // Frames of a message posted in several transfers, until its last one.
        let mut partial: Option<(u32, Vec<u8>)> = None;
        for w in work {
            match w {
                TxnWork::Post {
                    handle,
                    more,
                    payload,
                    ..
                } => {
                    let mut bytes = match partial.take() {
                        Some((h, b)) if h == handle => b,
                        Some(_) => return Err("interleaved multi-frame transactional posts".into()),
                        None => Vec::with_capacity(payload.len()),
                    };
                    bytes.extend_from_slice(&payload);
                    if more {
                        partial = Some((handle, bytes));
                        continue;
                    }
                    let LinkInfo::Incoming { messaging, dest } = self.link(handle)? else {
                        return Err("a transactional post on a receiving link".into());
                    };
                    one_engine(&messaging)?;
                    let Deserializable(msg) =
                        serde_amqp::from_slice::<Deserializable<Message<Body<Value>>>>(&bytes)
                            .map_err(|e| format!("a posted message does not decode: {e}"))?;
                    let msg = convert::incoming(msg).map_err(|e| e.to_string())?;
                    sends.push((dest, msg));
                }
                TxnWork::Retire {
                    handle,
                    delivery_tag,
                    outcome,
                } => {
                    let LinkInfo::Outgoing {
                        messaging,
                        queue,
                        tags,
                    } = self.link(handle)?
                    else {
                        return Err("a transactional settlement on a sending link".into());
                    };
                    one_engine(&messaging)?;
                    let seq = tags.get(&delivery_tag).ok_or_else(|| {
                        "a transactional settlement of a delivery that is already settled"
                            .to_string()
                    })?;
                    let outcome = crate::engine_outcome(outcome.as_ref());
                    settles.push((queue, seq, outcome, tags, delivery_tag));
                }
            }
        }
        if partial.is_some() {
            return Err("a transactional post ended in the middle of a message".into());
        }
        let Some(m) = engine else {
            return Ok(());
        };
        let mut tx = m.begin();
        for (dest, msg) in sends {
            m.tx_send(&mut tx, &dest, msg).map_err(|e| e.to_string())?;
        }
        for (queue, seq, outcome, _, _) in &settles {
            m.tx_settle(&mut tx, queue, *seq, *outcome)
                .map_err(|e| e.to_string())?;
        }
        m.commit(tx).await.map_err(|e| e.to_string())?;
        // Committed: the links' own settle paths must not settle these again.
        for (_, _, _, tags, tag) in settles {
            tags.remove(&tag);
        }
        Ok(())
    }
}

impl TxnResource for SessionLinks {
    fn commit(
        &self,
        txn_id: TransactionId,
        work: Vec<TxnWork>,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let n = work.len();
            let r = self.apply(work).await;
            match &r {
                Ok(()) => {
                    tracing::debug!(target: "keel_amqp", txn = ?txn_id, work = n, "transaction committed")
                }
                Err(why) => {
                    tracing::warn!(target: "keel_amqp", txn = ?txn_id, why = %why, "transaction rolled back at discharge")
                }
            }
            r
        })
    }

    fn rollback(&self, txn_id: TransactionId, work: Vec<TxnWork>) {
        // Deliveries the controller settled in the transaction come back (released): it
        // will not settle them again. Posts need nothing: they never reached the engine.
        let mut by_engine: Vec<Releases> = Vec::new();
        for w in work {
            let TxnWork::Retire {
                handle,
                delivery_tag,
                ..
            } = w
            else {
                continue;
            };
            let Ok(LinkInfo::Outgoing {
                messaging,
                queue,
                tags,
            }) = self.link(handle)
            else {
                continue;
            };
            let Some(seq) = tags.remove(&delivery_tag) else {
                continue;
            };
            match by_engine
                .iter_mut()
                .find(|(m, q, _)| Arc::ptr_eq(m, &messaging) && *q == queue)
            {
                Some((_, _, seqs)) => seqs.push((seq, Outcome::Released)),
                None => by_engine.push((messaging, queue, vec![(seq, Outcome::Released)])),
            }
        }
        tracing::debug!(target: "keel_amqp", txn = ?txn_id, "transaction rolled back");
        if by_engine.is_empty() {
            return;
        }
        // Called inside the session's event loop, which must not wait on the store.
        tokio::spawn(async move {
            for (m, queue, settles) in by_engine {
                if let Err(e) = m.settle_batch(&queue, &settles).await {
                    tracing::warn!(target: "keel_amqp", queue = %queue, error = %e, "releasing deliveries of a rolled-back transaction failed");
                }
            }
        });
    }
}
