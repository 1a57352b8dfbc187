//! Remote get on the accepting side: what one link borrowed, lent, settled and released.

use super::*;

/// Deliveries a target engine has lent to a peer's consumers at most, over one link.
pub const LENT_MAX: usize = 4_096;

/// Deliveries lent over one link, by queue: released when the link ends.
#[derive(Default)]
pub(crate) struct Lent {
    by_queue: HashMap<String, std::collections::BTreeSet<u64>>,
    count: usize,
}

/// The owning engine's answer to a remote `Get`.
pub(crate) async fn lend_messages(
    messaging: &Messaging,
    lent: &mut Lent,
    req: u64,
    queue: String,
    max: u32,
) -> LinkFrame {
    let room = LENT_MAX.saturating_sub(lent.count);
    let max = usize::try_from(max)
        .unwrap_or(usize::MAX)
        .min(room)
        .min(DELIVER_BATCH_MAX);
    let error = |e: String| LinkFrame::Got {
        req,
        msgs: Vec::new(),
        error: Some(e),
    };
    if let Err(e) = messaging.queue(&queue) {
        return error(e.to_string());
    }
    if max == 0 {
        return LinkFrame::Got {
            req,
            msgs: Vec::new(),
            error: None,
        };
    }
    // Taken a few at a time, up to GOT_BYTES_MAX (at least one message): one answer stays
    // within a frame and within what the peer's reader holds.
    let mut ds = Vec::new();
    let mut bytes = 0usize;
    while ds.len() < max && bytes < GOT_BYTES_MAX {
        let step = (max - ds.len()).min(8);
        match messaging.receive_now(&queue, step).await {
            Err(e) if ds.is_empty() => return error(e.to_string()),
            Err(_) => break,
            Ok(more) if more.is_empty() => break,
            Ok(more) => {
                let mut over = Vec::new();
                for d in more {
                    if bytes >= GOT_BYTES_MAX {
                        over.push((d.seq, keel_engine::messaging::Outcome::Released));
                        continue;
                    }
                    bytes += d.body.len() + 256;
                    ds.push(d);
                }
                if !over.is_empty() {
                    // Over the budget: back at once in one settle, delivered again (count
                    // unchanged); if that fails they stay locked until the engine restarts.
                    if let Err(e) = messaging.settle_batch(&queue, &over).await {
                        tracing::warn!(queue = %queue, error = %e, "giving back messages over a remote get's budget failed");
                    }
                }
            }
        }
    }
    let set = lent.by_queue.entry(queue).or_default();
    let msgs = ds
        .into_iter()
        .map(|d| {
            set.insert(d.seq);
            let (properties, reliability) = lend(&d);
            keel_bus::link::RemoteMessage {
                seq: d.seq,
                id: d.id,
                priority: d.priority,
                reliability,
                delivery_count: d.delivery_count,
                properties,
                body: d.body,
            }
        })
        .collect::<Vec<_>>();
    lent.count += msgs.len();
    LinkFrame::Got {
        req,
        msgs,
        error: None,
    }
}

/// The owning engine's answer to a remote `Settle`: only deliveries lent over this link.
pub(crate) async fn settle_lent(
    messaging: &Messaging,
    lent: &mut Lent,
    req: u64,
    queue: String,
    settles: Vec<(u64, u8)>,
) -> LinkFrame {
    let mut results: Vec<Option<String>> = vec![None; settles.len()];
    let mut valid = Vec::with_capacity(settles.len());
    let mut at = Vec::with_capacity(settles.len());
    let mut none = std::collections::BTreeSet::new();
    let set = lent.by_queue.get_mut(&queue).unwrap_or(&mut none);
    for (i, (seq, code)) in settles.into_iter().enumerate() {
        match outcome_of(code) {
            Some(o) if set.remove(&seq) => {
                valid.push((seq, o));
                at.push(i);
            }
            Some(_) => {
                results[i] = Some(format!(
                    "delivery {seq} of {queue} was not lent to this link"
                ))
            }
            None => results[i] = Some(format!("unknown outcome code {code}")),
        }
    }
    lent.count -= valid.len();
    if valid.is_empty() {
        return LinkFrame::Settled {
            req,
            results,
            error: None,
        };
    }
    match messaging.settle_batch(&queue, &valid).await {
        Ok(rs) => {
            for (i, r) in at.into_iter().zip(rs) {
                results[i] = r.err().map(|e| e.to_string());
            }
            LinkFrame::Settled {
                req,
                results,
                error: None,
            }
        }
        Err(e) => {
            // Nothing was settled (the engine stopped or its store failed): they stay lent, so
            // the end of the link still releases them.
            let set = lent.by_queue.entry(queue).or_default();
            for (seq, _) in &valid {
                set.insert(*seq);
            }
            lent.count += valid.len();
            LinkFrame::Settled {
                req,
                results: Vec::new(),
                error: Some(e.to_string()),
            }
        }
    }
}

/// Gives back what was lent over a link that ended: delivered again, count unchanged.
pub(crate) async fn release_lent(messaging: &Messaging, lent: Lent) {
    for (queue, seqs) in lent.by_queue {
        let settles: Vec<_> = seqs
            .into_iter()
            .map(|s| (s, keel_engine::messaging::Outcome::Released))
            .collect();
        for chunk in settles.chunks(DELIVER_BATCH_MAX) {
            if let Err(e) = messaging.settle_batch(&queue, chunk).await {
                tracing::warn!(queue = %queue, error = %e, "releasing deliveries lent over an ended link failed; they stay locked until the engine restarts");
            }
        }
    }
}
