//! Remote get (DESIGN §5, issue 4): a consumer attached to this engine receives from a queue
//! whose queue point is on another engine of the bus. The messages stay on their queue point:
//! the owning engine locks a few for this engine's link (`Get`), this engine hands them to its
//! consumer, and the consumer's outcomes go back (`Settle`) and are applied there. The link
//! that carries the requests is the server's (`keel_server::links`); it registers itself here
//! while it is up ([`Messaging::attach_remote_link`]).
//!
//! Invariants: a remote delivery is settled only by the engine that holds its queue point, in
//! its store; when the link ends, that engine releases what it had locked for the link (the
//! messages are delivered again: at least once, as when a consumer's connection drops), so a
//! lost link never loses a message. The consumer's engine hands its consumers *loan numbers*
//! ([`Messaging::next_loan`]) as delivery seqs, unique per engine run and mapped per link to
//! the queue's seqs, so a late settle from an ended link never reaches a message lent again
//! over a newer one. Requests wait for at most REMOTE_WAIT_MS and the request channel is
//! bounded. Deliberately absent: remote get inside a transaction (refused: the transaction's
//! store commit is on this engine, the queue point is not), and push delivery (a waiting
//! consumer polls with back-off: REMOTE_POLL_FIRST_MS .. REMOTE_POLL_MAX_MS).

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{Delivery, Messaging, MessagingError, Outcome};

/// Requests queued towards one link, and sent on it unanswered, before callers wait. Bounds
/// what a link's reader may have to hold: answers to these, each at most GOT_BYTES_MAX.
pub const REMOTE_REQUESTS_MAX: usize = 64;
/// Bytes of message bodies and properties one `Got` answer carries at most (at least one
/// message, whatever its size).
pub const GOT_BYTES_MAX: usize = 1024 * 1024;
/// How long one request may wait for the owning engine's answer.
pub const REMOTE_WAIT_MS: u64 = 10_000;
/// A waiting remote consumer looks again after this long, doubling up to REMOTE_POLL_MAX_MS.
pub const REMOTE_POLL_FIRST_MS: u64 = 5;
pub const REMOTE_POLL_MAX_MS: u64 = 200;

/// What a link carries for remote get, answered by the owning engine.
pub enum RemoteRequest {
    Get {
        queue: String,
        max: u32,
        reply: oneshot::Sender<Result<Vec<Delivery>, String>>,
    },
    Settle {
        queue: String,
        settles: Vec<(u64, Outcome)>,
        reply: oneshot::Sender<Result<Vec<Result<(), String>>, String>>,
    },
}

/// Remote links by peer engine (registered by the link while it is up), and the next loan.
pub struct RemoteLinks(
    std::sync::Mutex<std::collections::HashMap<String, mpsc::Sender<RemoteRequest>>>,
    std::sync::atomic::AtomicU64,
);

impl Default for RemoteLinks {
    fn default() -> Self {
        RemoteLinks(Default::default(), std::sync::atomic::AtomicU64::new(1))
    }
}

/// Outcomes on the wire.
pub fn outcome_code(o: Outcome) -> u8 {
    match o {
        Outcome::Accepted => 0,
        Outcome::Released => 1,
        Outcome::Failed => 2,
        Outcome::Rejected => 3,
    }
}

pub fn outcome_of(code: u8) -> Option<Outcome> {
    Some(match code {
        0 => Outcome::Accepted,
        1 => Outcome::Released,
        2 => Outcome::Failed,
        3 => Outcome::Rejected,
        _ => return None,
    })
}

impl Messaging {
    /// A number for a remote delivery as this engine's consumers see it (its `seq`), unique
    /// for the engine's run, so a settle always names one loan of one link.
    pub fn next_loan(&self) -> u64 {
        self.remote_links
            .1
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Registers the link towards `peer` that carries remote get requests; returns the
    /// receiving end the link serves. A newer link replaces an older one.
    pub fn attach_remote_link(&self, peer: &str) -> mpsc::Receiver<RemoteRequest> {
        let (tx, rx) = mpsc::channel(REMOTE_REQUESTS_MAX);
        self.remote_links
            .0
            .lock()
            .expect("remote links lock")
            .insert(peer.to_string(), tx);
        rx
    }

    fn remote_link(&self, peer: &str) -> Option<mpsc::Sender<RemoteRequest>> {
        self.remote_links
            .0
            .lock()
            .expect("remote links lock")
            .get(peer)
            .filter(|tx| !tx.is_closed())
            .cloned()
    }

    fn unreachable(&self, peer: &str, why: &str) -> MessagingError {
        MessagingError::Stream {
            me: self.me.clone(),
            peer: peer.to_string(),
            problem: format!("remote get: {why}"),
        }
    }

    /// One request to `peer` within `wait` (queueing included); Ok(None) when there is no
    /// link to it now, or no answer came in time for a caller that may simply look again.
    async fn remote_ask<T: Unanswered>(
        &self,
        peer: &str,
        wait: Duration,
        make: impl FnOnce(oneshot::Sender<Result<T, String>>) -> RemoteRequest,
    ) -> Result<Option<T>, MessagingError> {
        let Some(tx) = self.remote_link(peer) else {
            return Ok(None);
        };
        let deadline = tokio::time::Instant::now() + wait;
        let (reply, answer) = oneshot::channel();
        match tokio::time::timeout_at(deadline, tx.send(make(reply))).await {
            Ok(Ok(())) => {}
            // The link ended, or it is saturated: nothing was asked.
            Ok(Err(_)) | Err(_) => return Ok(None),
        }
        // If this future is dropped or times out after the answer came, what it brought is
        // given back (`Unanswered::give_back`), never left lent.
        let mut guard = AnswerGuard {
            answer: Some(answer),
            link: tx,
        };
        let answer = guard.answer.as_mut().expect("set above");
        let got = tokio::time::timeout_at(deadline, answer).await;
        if got.is_ok() {
            // Read: nothing left for the guard. (After a timeout it looks once more as it
            // drops; an answer later than that fails to arrive and the link gives it back.)
            guard.answer = None;
        }
        match got {
            Ok(Ok(Ok(v))) => Ok(Some(v)),
            Ok(Ok(Err(why))) => Err(self.unreachable(peer, &why)),
            // The link ended with the request: as if there were no link.
            Ok(Err(_)) => Ok(None),
            Err(_) => T::late(self, peer),
        }
    }

    /// Up to `max` messages of remote queue `dest` (on engine `peer`), not waiting for
    /// messages (at most `wait` for the answer).
    pub(crate) async fn remote_receive_now(
        &self,
        peer: &str,
        dest: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, MessagingError> {
        let max = u32::try_from(max).unwrap_or(u32::MAX);
        Ok(self
            .remote_ask(peer, wait, |reply| RemoteRequest::Get {
                queue: dest.to_string(),
                max,
                reply,
            })
            .await?
            .unwrap_or_default())
    }

    /// One message of remote queue `dest`, waiting up to `timeout` (polling with back-off).
    pub(crate) async fn remote_receive(
        &self,
        peer: &str,
        dest: &str,
        timeout: Duration,
    ) -> Result<Option<Delivery>, MessagingError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pause_ms = REMOTE_POLL_FIRST_MS;
        loop {
            self.check_open()?;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let wait = left.max(Duration::from_millis(REMOTE_POLL_MAX_MS));
            let mut got = self.remote_receive_now(peer, dest, 1, wait).await?;
            assert!(
                got.len() <= 1,
                "the link checks answers against the request"
            );
            if let Some(d) = got.pop() {
                return Ok(Some(d));
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            tokio::time::sleep(left.min(Duration::from_millis(pause_ms))).await;
            pause_ms = (pause_ms * 2).min(REMOTE_POLL_MAX_MS);
        }
    }

    /// Settles remote deliveries of `dest` at the engine that holds its queue point.
    pub(crate) async fn remote_settle(
        &self,
        peer: &str,
        dest: &str,
        settles: &[(u64, Outcome)],
    ) -> Result<Vec<Result<(), MessagingError>>, MessagingError> {
        let answer = self
            .remote_ask(peer, Duration::from_millis(REMOTE_WAIT_MS), |reply| {
                RemoteRequest::Settle {
                    queue: dest.to_string(),
                    settles: settles.to_vec(),
                    reply,
                }
            })
            .await?;
        let Some(results) = answer else {
            // No link: the owning engine released them when the link ended.
            return Err(self.unreachable(
                peer,
                "the link ended; the deliveries were released there and will be delivered again",
            ));
        };
        Ok(results
            .into_iter()
            .map(|r| r.map_err(MessagingError::Relayed))
            .collect())
    }
}

/// What to do with an answer nobody waits for any more.
trait Unanswered: Sized {
    /// Hands what the answer brought back to the queue's engine (through the link).
    fn give_back(self, link: &mpsc::Sender<RemoteRequest>);
    /// The caller's result when no answer came in time.
    fn late(m: &Messaging, peer: &str) -> Result<Option<Self>, MessagingError>;
}

impl Unanswered for Vec<Delivery> {
    fn give_back(self, link: &mpsc::Sender<RemoteRequest>) {
        let Some(queue) = self.first().map(|d| d.dest.clone()) else {
            return;
        };
        let (reply, _) = oneshot::channel();
        // Best effort without waiting: if the link is gone or full, the queue's engine
        // releases them when the link ends.
        let _ = link.try_send(RemoteRequest::Settle {
            queue,
            settles: self.iter().map(|d| (d.seq, Outcome::Released)).collect(),
            reply,
        });
    }

    fn late(_: &Messaging, _: &str) -> Result<Option<Self>, MessagingError> {
        // A receiver looks again; the late answer is given back by the guard.
        Ok(None)
    }
}

impl Unanswered for Vec<Result<(), String>> {
    fn give_back(self, _: &mpsc::Sender<RemoteRequest>) {}

    fn late(m: &Messaging, peer: &str) -> Result<Option<Self>, MessagingError> {
        Err(m.unreachable(
            peer,
            "no answer to a settle in time; it may or may not have been applied",
        ))
    }
}

/// Gives back an answer that arrived for a request whose caller went away.
struct AnswerGuard<T: Unanswered> {
    answer: Option<oneshot::Receiver<Result<T, String>>>,
    link: mpsc::Sender<RemoteRequest>,
}

impl<T: Unanswered> Drop for AnswerGuard<T> {
    fn drop(&mut self) {
        if let Some(mut answer) = self.answer.take() {
            if let Ok(Ok(v)) = answer.try_recv() {
                v.give_back(&self.link);
            }
        }
    }
}

/// A remote delivery as this engine's consumer sees it.
#[allow(clippy::too_many_arguments)]
pub fn delivery_from(
    queue: &str,
    seq: u64,
    id: String,
    priority: u8,
    reliability: u8,
    delivery_count: u32,
    properties: &[u8],
    body: Vec<u8>,
) -> Delivery {
    Delivery {
        dest: queue.to_string(),
        seq,
        id,
        priority,
        reliability: super::reliability_of(reliability),
        delivery_count,
        properties: if properties.is_empty() {
            super::Properties::new()
        } else {
            serde_json::from_slice(properties).unwrap_or_default()
        },
        body,
    }
}

/// A local delivery's properties and reliability as they travel.
pub fn lend(d: &Delivery) -> (Vec<u8>, u8) {
    let properties = if d.properties.is_empty() {
        Vec::new()
    } else {
        serde_json::to_vec(&d.properties).expect("properties serialize")
    };
    (properties, super::reliability_code(d.reliability))
}
