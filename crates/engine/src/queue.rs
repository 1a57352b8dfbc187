//! Queue points: where a queue's messages live on its engine, and how they are handed to
//! consumers.
//!
//! Persistent messages (reliable, assured) live in the data store. The engine keeps, per queue,
//! a *window*: at most `WINDOW_MAX` available messages in delivery order (priority DESC, seq
//! ASC), refilled from the store by cursor paging, so a queue of millions of messages costs
//! bounded memory. Non-persistent messages (best effort, express) live only in memory, bounded by
//! `NONPERSISTENT_MAX` per queue.
//!
//! Window invariant: every available persistent message with key ≤ `loaded_up_to` is in the
//! window; every one with a greater key is in the store only. A send inserts its message into
//! the window only when its key is ≤ `loaded_up_to` (or the store holds nothing beyond it);
//! otherwise the next refill finds it. Evicting the greatest key moves `loaded_up_to` down.
//! That keeps delivery order exact without ever scanning the whole queue.
//!
//! A delivered message is *locked* until settled: accepted (deleted from the store), released
//! (available again, delivery count unchanged), modified as failed (count + 1), or rejected
//! (moved to the exception destination). A message whose count reaches
//! `max_failed_deliveries` moves to the exception destination instead of being redelivered.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};

/// Available persistent messages kept in memory per queue.
pub const WINDOW_MAX: usize = 1_000;
/// How many messages one refill reads from the store.
pub const REFILL_BATCH: usize = 256;
/// Non-persistent messages held per queue before sends are refused.
pub const NONPERSISTENT_MAX: usize = 100_000;

/// Delivery-order key: higher priority first, then arrival.
pub type Key = (Reverse<u8>, u64);

pub fn key(priority: u8, seq: u64) -> Key {
    (Reverse(priority), seq)
}

/// One message as the engine holds it in memory.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub id: String,
    pub priority: u8,
    pub reliability: u8,
    pub expiry_ms: Option<u64>,
    pub delivery_count: u32,
    pub properties: Vec<u8>,
    pub body: Vec<u8>,
    pub persistent: bool,
}

impl Entry {
    pub fn key(&self) -> Key {
        key(self.priority, self.seq)
    }
}

#[derive(Debug, Default)]
pub struct QueueState {
    /// Available persistent messages, loaded from the store (bounded by WINDOW_MAX).
    pub window: BTreeMap<Key, Entry>,
    /// Greatest store key the window covers; None = nothing loaded yet.
    pub loaded_up_to: Option<Key>,
    /// The store may hold available messages beyond `loaded_up_to`.
    pub store_has_more: bool,
    /// Available non-persistent messages (memory only).
    pub volatile: BTreeMap<Key, Entry>,
    /// Delivered, not yet settled.
    pub locked: HashMap<u64, Entry>,
    /// Bound of `window` (WINDOW_MAX; tests use small ones to exercise eviction).
    pub window_max: usize,
    /// Persistent offers left to the store (not put in the window). A refill that read the
    /// store while this changed must not conclude that the store holds nothing more: the
    /// skipped message may have committed after its read.
    pub skipped_offers: u64,
}

impl QueueState {
    /// A fresh queue state whose window is empty and must be filled from the store.
    pub fn unloaded() -> QueueState {
        QueueState::unloaded_with(WINDOW_MAX)
    }

    pub fn unloaded_with(window_max: usize) -> QueueState {
        assert!(window_max >= 2, "a window holds at least two messages");
        QueueState {
            store_has_more: true,
            window_max,
            ..QueueState::default()
        }
    }

    /// Makes a persistent message available, keeping the window invariant.
    pub fn offer_persistent(&mut self, e: Entry) {
        let k = e.key();
        let covered = match self.loaded_up_to {
            Some(up_to) => k <= up_to || !self.store_has_more,
            None => !self.store_has_more,
        };
        if !covered {
            self.skipped_offers += 1;
            return; // the next refill reads it from the store
        }
        self.window.insert(k, e);
        if self.loaded_up_to.is_none_or(|u| k > u) {
            self.loaded_up_to = Some(k);
        }
        self.evict_over_bound();
    }

    fn evict_over_bound(&mut self) {
        while self.window.len() > self.window_max {
            let (k, _) = self
                .window
                .pop_last()
                .expect("window over bound is non-empty");
            self.store_has_more = true;
            self.loaded_up_to = self.window.last_key_value().map(|(k, _)| *k);
            debug_assert!(self.loaded_up_to.is_none_or(|u| u < k));
        }
    }

    /// Adds messages read from the store after `loaded_up_to`; `complete` says the page was
    /// short. `skipped_before` is `skipped_offers` as it was before the store was read.
    pub fn refill(&mut self, page: Vec<Entry>, complete: bool, skipped_before: u64) {
        let complete = complete && skipped_before == self.skipped_offers;
        for e in page {
            let k = e.key();
            assert!(
                self.loaded_up_to.is_none_or(|u| k > u),
                "refill must continue after the cursor"
            );
            if self.locked.contains_key(&e.seq) {
                continue; // in flight to a consumer: not available
            }
            self.window.insert(k, e);
            self.loaded_up_to = Some(k);
        }
        if complete {
            self.store_has_more = false;
        }
        self.evict_over_bound();
    }

    /// Whether the window should be refilled before taking the next message.
    pub fn needs_refill(&self) -> bool {
        self.store_has_more && self.window.len() < self.window_max / 2
    }

    /// The next available message in delivery order, across persistent and volatile ones; locks it.
    pub fn take_next(&mut self) -> Option<Entry> {
        let p = self.window.first_key_value().map(|(k, _)| *k);
        let v = self.volatile.first_key_value().map(|(k, _)| *k);
        let e = match (p, v) {
            (Some(pk), Some(vk)) if vk.0 > pk.0 => self.volatile.pop_first()?.1,
            (Some(_), _) => self.window.pop_first()?.1,
            (None, Some(_)) => self.volatile.pop_first()?.1,
            (None, None) => return None,
        };
        self.locked.insert(e.seq, e.clone());
        Some(e)
    }

    /// Available messages in memory (persistent window + volatile); the store may hold more.
    pub fn available_in_memory(&self) -> usize {
        self.window.len() + self.volatile.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(priority: u8, seq: u64) -> Entry {
        Entry {
            seq,
            id: format!("m{seq}"),
            priority,
            reliability: 3,
            expiry_ms: None,
            delivery_count: 0,
            properties: vec![],
            body: vec![],
            persistent: true,
        }
    }

    proptest! {
        /// The window, refilled from a model store and fed by sends, delivers exactly the
        /// model's order: priority DESC, seq ASC, nothing lost, nothing twice, bounded memory.
        #[test]
        fn window_delivers_in_store_order(window_max in 2usize..12, batch in 1usize..8, ops in proptest::collection::vec((0u8..10, any::<bool>()), 1..400)) {
            let mut store: BTreeMap<Key, Entry> = BTreeMap::new();
            let mut q = QueueState::unloaded_with(window_max);
            let mut seq = 0u64;
            let mut delivered = Vec::new();
            for (prio, is_send) in ops {
                if is_send {
                    seq += 1;
                    let e = entry(prio, seq);
                    store.insert(e.key(), e.clone());
                    q.offer_persistent(e);
                } else {
                    if q.needs_refill() || q.window.is_empty() {
                        let page: Vec<Entry> = store.range((match q.loaded_up_to { Some(u) => std::ops::Bound::Excluded(u), None => std::ops::Bound::Unbounded }, std::ops::Bound::Unbounded))
                            .take(batch).map(|(_, e)| e.clone()).filter(|e| !q.locked.contains_key(&e.seq)).collect();
                        let complete = page.len() < batch;
                        q.refill(page, complete, q.skipped_offers);
                    }
                    if let Some(e) = q.take_next() {
                        // It must be the first available message of the store.
                        let first = store.iter().find(|(_, s)| !q.locked.contains_key(&s.seq) || s.seq == e.seq).map(|(k, _)| *k);
                        prop_assert_eq!(Some(e.key()), first);
                        store.remove(&e.key());
                        q.locked.remove(&e.seq);
                        delivered.push(e.seq);
                    }
                }
                prop_assert!(q.window.len() <= window_max);
            }
            let mut sorted = delivered.clone();
            sorted.sort_unstable();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), delivered.len());
        }
    }
}
