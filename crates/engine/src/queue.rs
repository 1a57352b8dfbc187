//! Queue points: where a queue's messages live on its engine, and how they are handed to
//! consumers.
//!
//! Persistent messages (reliable, assured) live in the data store. The engine keeps, per queue,
//! a *window*: available messages in delivery order (priority DESC, seq ASC), refilled from the
//! store by cursor paging, so a queue of millions of messages costs bounded memory. A window
//! holds at most `WINDOW_MAX` messages and `WINDOW_BYTES_MAX` bytes; beyond `WINDOW_BYTES_FLOOR`
//! it grows only while the engine's windows together hold less than their [`WindowBudget`].
//! Non-persistent messages (best effort, express) live only in memory, bounded by
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
//!
//! Refill invariant: a refill reads the store without the queue lock, so the rows it sees can
//! be stale by the time it applies them. It never makes available a message that is locked,
//! being settled (`claimed`: out of `locked`, its store change not yet committed), or whose row
//! left this queue while the read was in flight (`gone`); and if the window's cursor moved
//! meanwhile (an eviction), the page is dropped and read again. Without this, a message settled
//! during a read came back as a second delivery.
//!
//! A send that commits during a refill's read keeps that refill from declaring the store
//! exhausted: its offer asks the record of what recent refills loaded (`LOADED_PAGES_KEPT`
//! pages) whether its message was loaded, else stops the page short of it or lets the next
//! refill read from just below its key. A refill that read short while only new, never-loaded
//! messages waited aside takes those from memory and declares the store exhausted (without
//! this, steady sends made every message come back from a store read). A message released
//! during a read goes back as its in-memory copy (the read may hold an older delivery count).
//!
//! Dropped futures (guards in `messaging`): an abandoned refill read aborts the refill; a send
//! dropped between its commit and its offer makes the queue forget its window
//! (`forget_window`); an abandoned transaction commit keeps its deliveries claimed until a
//! restart rather than risk handing them out twice.
//!
//! Two property tests run against a model store with windows of a few messages: delivery in
//! store order, and exactly-once with true delivery counts while sends, late offers, takes,
//! settles (some failing their commit), refills, abandoned refills and cancelled sends
//! interleave.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Available persistent messages kept in memory per queue. A backlog that fits is handed out
/// from memory; beyond it, every message is written, evicted, and read back once. Small on
/// purpose: reading a backlog back from the WAL (still in the page cache) costs less than
/// holding it. In the peers benchmark, whose backlog grows all run, 4 096 / 4 MiB was about
/// 10 % faster than 32 768 / 32 MiB, 1 024 / 1 MiB no better, and an unbounded window 22 %
/// slower (BENCHMARKS.md, 2026-12-03). Consumers hold at most a few thousand at once.
pub const WINDOW_MAX: usize = 4_096;
/// Bytes of bodies, properties and ids one window holds at most.
pub const WINDOW_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Bytes every window may hold whatever the engine's budget says.
pub const WINDOW_BYTES_FLOOR: usize = 1024 * 1024;
/// Bytes all windows of one engine hold at most beyond their floors (see [`WindowBudget`]).
pub const ENGINE_WINDOW_BYTES_MAX: usize = 128 * 1024 * 1024;

/// How many messages one refill reads from the store.
pub const REFILL_BATCH: usize = 256;
/// Refill pages remembered for offers that overlapped them; an offer later than that takes
/// the slower path (a re-read), never a wrong one.
pub const LOADED_PAGES_KEPT: usize = 16;
/// Non-persistent messages held per queue before sends are refused.
pub const NONPERSISTENT_MAX: usize = 100_000;

/// The bytes all windows of one engine hold, shared by its queue points: a window beyond its
/// floor stops growing (and evicts) while the total is over the budget, so many queues with a
/// backlog cost at most `ENGINE_WINDOW_BYTES_MAX` plus a floor each.
#[derive(Debug)]
pub struct WindowBudget {
    bytes: std::sync::atomic::AtomicUsize,
    bytes_max: usize,
}

impl WindowBudget {
    pub fn new(bytes_max: usize) -> std::sync::Arc<WindowBudget> {
        std::sync::Arc::new(WindowBudget {
            bytes: std::sync::atomic::AtomicUsize::new(0),
            bytes_max,
        })
    }

    /// Bytes held by every window now.
    pub fn bytes(&self) -> usize {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn over(&self) -> bool {
        self.bytes() > self.bytes_max
    }

    fn add(&self, n: usize) {
        self.bytes
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        let before = self
            .bytes
            .fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
        assert!(before >= n, "window budget went below zero");
    }
}

/// Delivery-order key: higher priority first, then arrival.
pub type Key = (Reverse<u8>, u64);

pub fn key(priority: u8, seq: u64) -> Key {
    (Reverse(priority), seq)
}

/// Where refills stood before a store commit (see [`QueueState::refill_mark`]).
#[derive(Debug, Clone, Copy)]
pub struct RefillMark {
    epoch: u64,
    refilling: bool,
}

impl RefillMark {
    /// A mark from before any refill: every remembered page is looked at, and when pages
    /// were forgotten the offer takes the re-read path (safe, sometimes slower).
    pub const UNKNOWN: RefillMark = RefillMark {
        epoch: 0,
        refilling: true,
    };
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

    /// What the entry holds in memory, as the window counts it.
    pub fn bytes(&self) -> usize {
        self.body.len() + self.properties.len() + self.id.len()
    }
}

#[derive(Debug, Default)]
pub struct QueueState {
    /// Available persistent messages, loaded from the store (bounded by `window_max` and
    /// `WINDOW_BYTES_MAX`). Changed only through the `window_*` methods, which keep
    /// `window_bytes`.
    window: BTreeMap<Key, Entry>,
    /// Bytes of the window's entries ([`Entry::bytes`]), also counted in `budget`.
    window_bytes: usize,
    /// The engine's budget for all windows (None: this window alone, as in tests).
    budget: Option<std::sync::Arc<WindowBudget>>,
    /// Greatest store key the window covers; None = nothing loaded yet.
    pub loaded_up_to: Option<Key>,
    /// The store may hold available messages beyond `loaded_up_to`.
    pub store_has_more: bool,
    /// Available non-persistent messages (memory only).
    pub volatile: BTreeMap<Key, Entry>,
    /// Delivered, not yet settled.
    pub locked: HashMap<u64, Entry>,
    /// Being settled: taken out of `locked`, the store change not yet committed (or held by an
    /// open transaction). Bounded by what consumers may hold locked.
    claimed: HashSet<u64>,
    /// The cursor of the refill in flight (`Some(loaded_up_to)` as it was when the read began).
    refilling: Option<Option<Key>>,
    /// Seqs whose row left this queue (deleted, moved) while a refill was in flight. Bounded by
    /// locked + claimed deliveries: only those can leave.
    gone: HashSet<u64>,
    /// Counts refill starts and ends, so an offer can tell whether one overlapped its commit.
    refill_epoch: u64,
    /// Keys of messages offered while a refill was in flight that no one can tell were loaded
    /// or not (`offer_unknown`): the refill's read may have missed them, so it must not move
    /// the cursor past them. Bounded by the sends committed during one read.
    offered_meanwhile: Vec<Key>,
    /// New messages offered while a refill was in flight that no refill had loaded: like
    /// `offered_meanwhile`, the cursor must not pass them; and if the read turns out short,
    /// they are exactly what committed after it, so they join the window from memory instead
    /// of being read back (without this, under steady sends every refill overlapped an offer,
    /// never completed, and every message was read back from the store). Bounded likewise.
    offered_entries: Vec<Entry>,
    /// Seqs each recent refill loaded, with its epoch once applied: an offer that overlapped
    /// a refill looks its message up here. Bounded by LOADED_PAGES_KEPT pages.
    loaded_pages: std::collections::VecDeque<(u64, Vec<u64>)>,
    /// The greatest epoch of a page dropped from `loaded_pages`.
    loaded_forgotten_epoch: u64,
    /// Bound of `loaded_pages` (LOADED_PAGES_KEPT; tests use small ones).
    pub loaded_pages_max: usize,
    /// Messages released back to the store side while a refill was in flight, as they are
    /// now (the read may return an older copy). Bounded by claimed deliveries.
    restored_meanwhile: HashMap<u64, Entry>,
    /// The refill in flight must be dropped (the window was forgotten meanwhile).
    refill_void: bool,
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

    /// A fresh queue state whose window counts against the engine's budget.
    pub fn unloaded_in(budget: std::sync::Arc<WindowBudget>) -> QueueState {
        let mut q = QueueState::unloaded();
        q.budget = Some(budget);
        q
    }

    pub fn unloaded_with(window_max: usize) -> QueueState {
        assert!(window_max >= 2, "a window holds at least two messages");
        let mut q = QueueState::default();
        q.store_has_more = true;
        q.window_max = window_max;
        q.loaded_pages_max = LOADED_PAGES_KEPT;
        q
    }

    /// Taken before the store commit that inserts a message, handed to
    /// [`QueueState::offer_persistent`] after it: tells whether a refill may have read the new
    /// row in between.
    pub fn refill_mark(&self) -> RefillMark {
        RefillMark {
            epoch: self.refill_epoch,
            refilling: self.refilling.is_some(),
        }
    }

    /// Makes a newly stored persistent message available, keeping the window invariant.
    /// `mark` is [`QueueState::refill_mark`] from before its store commit.
    pub fn offer_persistent(&mut self, e: Entry, mark: RefillMark) {
        let k = e.key();
        if mark.refilling || mark.epoch != self.refill_epoch {
            // Refills ran since the commit began: one may have loaded the row already.
            match self.loaded_since(mark.epoch, e.seq) {
                Some(true) => return, // in the window, held by a consumer, or settled
                Some(false) => {}
                None => return self.offer_unknown(e),
            }
        }
        if self.refilling.is_some() && self.loaded_up_to.is_none_or(|u| k > u) {
            // The read in flight may have missed it: it must not move the cursor past it.
            self.skipped_offers += 1;
            self.offered_entries.push(e);
            return;
        }
        self.restore_persistent(e);
    }

    /// Whether a refill applied after `epoch` loaded `seq`; None when those pages are no
    /// longer all remembered.
    fn loaded_since(&self, epoch: u64, seq: u64) -> Option<bool> {
        if self.loaded_forgotten_epoch > epoch {
            return None;
        }
        Some(
            self.loaded_pages
                .iter()
                .filter(|(applied, _)| *applied > epoch)
                .any(|(_, seqs)| seqs.contains(&seq)),
        )
    }

    /// An offer that cannot tell whether a refill loaded its row: unless the message is in
    /// memory, let the next refill read from just below its key (the store knows).
    fn offer_unknown(&mut self, e: Entry) {
        let k = e.key();
        if self.window.contains_key(&k)
            || self.locked.contains_key(&e.seq)
            || self.claimed.contains(&e.seq)
        {
            return;
        }
        self.skipped_offers += 1;
        if self.refilling.is_some() {
            self.offered_meanwhile.push(k);
        }
        let beyond = self.store_has_more && self.loaded_up_to.is_none_or(|u| k > u);
        if !beyond {
            // The evicted messages are in the store and not held: the refill reads them again.
            let evicted = self.window.split_off(&k);
            self.window_bytes_sub(evicted.values().map(Entry::bytes).sum::<usize>());
            self.loaded_up_to = self.window.last_key_value().map(|(k, _)| *k);
            self.store_has_more = true;
        }
    }

    /// Makes a persistent message available again that no refill could load meanwhile (it
    /// was locked or claimed all along: a release, a rollback), keeping the window invariant.
    pub fn restore_persistent(&mut self, e: Entry) {
        let k = e.key();
        let covered = match self.loaded_up_to {
            Some(up_to) => k <= up_to || !self.store_has_more,
            None => !self.store_has_more,
        };
        if !covered {
            self.skipped_offers += 1;
            if self.refilling.is_some() {
                // The read in flight may return this row as it was before its settle
                // committed (an older delivery count): the refill takes this copy instead.
                self.restored_meanwhile.insert(e.seq, e);
            }
            return; // the next refill reads it from the store
        }
        self.window_insert(k, e);
        if self.loaded_up_to.is_none_or(|u| k > u) {
            self.loaded_up_to = Some(k);
        }
        self.evict_over_bound();
    }

    /// Forgets what the window holds and reads the queue again from its start: for when sends
    /// may have committed rows whose offers will never come (the sending future was dropped).
    pub fn forget_window(&mut self) {
        // A read in flight may have missed those rows and would move the cursor past them.
        self.refill_void = self.refilling.is_some();
        self.window.clear();
        self.window_bytes_sub(self.window_bytes);
        self.loaded_up_to = None;
        self.store_has_more = true;
        self.skipped_offers += 1;
    }

    fn evict_over_bound(&mut self) {
        // A single message larger than the byte bound stays: the window always holds one.
        while self.window.len() > self.window_max
            || (self.window.len() > 1 && self.window_bytes > self.window_bytes_allowed())
        {
            let (k, e) = self
                .window
                .pop_last()
                .expect("window over bound is non-empty");
            self.window_bytes_sub(e.bytes());
            self.store_has_more = true;
            self.loaded_up_to = self.window.last_key_value().map(|(k, _)| *k);
            debug_assert!(self.loaded_up_to.is_none_or(|u| u < k));
        }
    }

    /// Starts a refill when one is needed: returns the cursor to read after and
    /// `skipped_offers` now, both to hand back to [`QueueState::refill`]. Callers run one refill
    /// at a time per queue; one still marked in flight was abandoned (its future dropped), so it
    /// is forgotten here.
    pub fn begin_refill(&mut self) -> Option<(Option<Key>, u64)> {
        if !self.needs_refill() {
            return None;
        }
        self.refilling = Some(self.loaded_up_to);
        self.refill_void = false;
        self.refill_epoch += 1;
        self.gone.clear();
        self.offered_meanwhile.clear();
        self.offered_entries.clear();
        self.restored_meanwhile.clear();
        Some((self.loaded_up_to, self.skipped_offers))
    }

    /// The read of a refill failed: nothing to apply.
    pub fn abort_refill(&mut self) {
        self.refilling = None;
        self.refill_void = false;
        self.refill_epoch += 1;
        self.gone.clear();
        self.offered_meanwhile.clear();
        self.offered_entries.clear();
        self.restored_meanwhile.clear();
    }

    /// Takes a locked delivery out of `locked` to settle it; until [`QueueState::settled`] or
    /// [`QueueState::unclaim`] no refill makes it available again.
    pub fn claim(&mut self, seq: u64) -> Option<Entry> {
        let e = self.locked.remove(&seq)?;
        let fresh = self.claimed.insert(seq);
        assert!(fresh, "delivery {seq} both locked and claimed");
        Some(e)
    }

    /// The settle did not take effect: the delivery is locked again.
    pub fn unclaim(&mut self, e: Entry) {
        let was = self.claimed.remove(&e.seq);
        assert!(was, "unclaim of delivery {} that was not claimed", e.seq);
        self.locked.insert(e.seq, e);
    }

    /// The settle committed; `left` = its row left this queue (accepted, moved away).
    pub fn settled(&mut self, seq: u64, left: bool) {
        let was = self.claimed.remove(&seq);
        assert!(was, "settle of delivery {seq} that was not claimed");
        if left {
            self.note_gone(seq);
        }
    }

    /// A claimed delivery goes back unchanged in the store (released, or its transaction
    /// ended without effect): available again.
    pub fn release(&mut self, e: Entry) {
        self.settled(e.seq, false);
        if e.persistent {
            self.restore_persistent(e);
        } else {
            self.volatile.insert(e.key(), e);
        }
    }

    /// A locked delivery whose row was deleted without a settle (expired).
    pub fn unlock_gone(&mut self, seq: u64) {
        self.locked.remove(&seq);
        self.note_gone(seq);
    }

    fn note_gone(&mut self, seq: u64) {
        if self.refilling.is_some() {
            self.gone.insert(seq);
        }
    }

    /// Adds messages read from the store after the cursor [`QueueState::begin_refill`] gave;
    /// `complete` says the page was short. `skipped_before` is what `begin_refill` returned.
    pub fn refill(&mut self, page: Vec<Entry>, complete: bool, skipped_before: u64) {
        let cursor = self
            .refilling
            .take()
            .expect("refill applied without begin_refill");
        self.refill_epoch += 1;
        let gone = std::mem::take(&mut self.gone);
        let offered = std::mem::take(&mut self.offered_meanwhile);
        let offered_entries = std::mem::take(&mut self.offered_entries);
        let mut restored = std::mem::take(&mut self.restored_meanwhile);
        if cursor != self.loaded_up_to || std::mem::take(&mut self.refill_void) {
            // Evicted meanwhile: the page starts after messages the window no longer holds.
            // Drop it; the next refill reads from the new cursor.
            return;
        }
        let skipped_meanwhile = self
            .skipped_offers
            .checked_sub(skipped_before)
            .expect("skipped offers only grow");
        assert!(skipped_meanwhile >= offered_entries.len() as u64);
        // A short read, and every offer left aside meanwhile is a new message held here: the
        // store holds nothing beyond the page but those, so they join from memory.
        let from_memory = complete && skipped_meanwhile == offered_entries.len() as u64;
        // Otherwise a message offered during the read and missing from the page committed
        // after it: the page stops short of it, so the next refill reads it.
        let missed = if from_memory {
            None
        } else {
            offered
                .into_iter()
                .chain(offered_entries.iter().map(Entry::key))
                .filter(|k| !page.iter().any(|e| e.key() == *k))
                .min()
        };
        let complete = from_memory || (complete && skipped_meanwhile == 0 && missed.is_none());
        let mut loaded = Vec::with_capacity(page.len());
        for e in page
            .into_iter()
            .take_while(|e| missed.is_none_or(|m| e.key() < m))
        {
            let k = e.key();
            assert!(
                self.loaded_up_to.is_none_or(|u| k > u),
                "refill must continue after the cursor"
            );
            // Covered either way: a held message comes back through `restore_persistent`.
            self.loaded_up_to = Some(k);
            if self.locked.contains_key(&e.seq)
                || self.claimed.contains(&e.seq)
                || gone.contains(&e.seq)
            {
                continue; // in flight to a consumer, being settled, or settled: not available
            }
            loaded.push(e.seq);
            // What memory holds is at least as fresh as what the read saw.
            let e = restored.remove(&e.seq).unwrap_or(e);
            if !self.window.contains_key(&k) {
                self.window_insert(k, e);
            }
        }
        if from_memory {
            for e in offered_entries {
                let k = e.key();
                if self.window.contains_key(&k) {
                    continue; // the read saw it: in the window from the page
                }
                // Offered after no refill loaded it, kept aside since: nobody can hold it.
                assert!(
                    cursor.is_none_or(|c| k > c),
                    "offer kept aside below the cursor"
                );
                assert!(!self.locked.contains_key(&e.seq) && !self.claimed.contains(&e.seq));
                if self.loaded_up_to.is_none_or(|u| k > u) {
                    self.loaded_up_to = Some(k);
                }
                self.window_insert(k, e);
            }
        }
        if self.loaded_pages.len() >= self.loaded_pages_max {
            let (epoch, _) = self.loaded_pages.pop_front().expect("full");
            self.loaded_forgotten_epoch = epoch;
        }
        self.loaded_pages.push_back((self.refill_epoch, loaded));
        if complete {
            self.store_has_more = false;
        }
        self.evict_over_bound();
    }

    /// Whether the window should be refilled before taking the next message.
    pub fn needs_refill(&self) -> bool {
        self.store_has_more
            && self.window.len() < self.window_max / 2
            && self.window_bytes < self.window_bytes_allowed() / 2
    }

    /// The next available message in delivery order, across persistent and volatile ones; locks it.
    pub fn take_next(&mut self) -> Option<Entry> {
        let p = self.window.first_key_value().map(|(k, _)| *k);
        let v = self.volatile.first_key_value().map(|(k, _)| *k);
        let e = match (p, v) {
            (Some(pk), Some(vk)) if vk.0 > pk.0 => self.volatile.pop_first()?.1,
            (Some(_), _) => {
                let e = self.window.pop_first()?.1;
                self.window_bytes_sub(e.bytes());
                e
            }
            (None, Some(_)) => self.volatile.pop_first()?.1,
            (None, None) => return None,
        };
        self.locked.insert(e.seq, e.clone());
        Some(e)
    }

    /// Puts an entry in the window (its key not there yet), counting its bytes.
    fn window_insert(&mut self, k: Key, e: Entry) {
        self.window_bytes += e.bytes();
        if let Some(b) = &self.budget {
            b.add(e.bytes());
        }
        let old = self.window.insert(k, e);
        assert!(old.is_none(), "window entry {k:?} inserted twice");
    }

    fn window_bytes_sub(&mut self, n: usize) {
        self.window_bytes = self
            .window_bytes
            .checked_sub(n)
            .expect("window bytes went below zero");
        if let Some(b) = &self.budget {
            b.sub(n);
        }
    }

    /// How many bytes this window may hold now: its maximum, or only its floor while the
    /// engine's windows are over their budget.
    fn window_bytes_allowed(&self) -> usize {
        match &self.budget {
            Some(b) if b.over() => WINDOW_BYTES_FLOOR,
            _ => WINDOW_BYTES_MAX,
        }
    }

    /// Persistent messages the window holds.
    pub fn window_len(&self) -> usize {
        self.window.len()
    }

    /// Available messages in memory (persistent window + volatile); the store may hold more.
    pub fn available_in_memory(&self) -> usize {
        self.window.len() + self.volatile.len()
    }
}

impl Drop for QueueState {
    /// A queue point removed (a durable subscription deleted) gives its bytes back.
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            b.sub(self.window_bytes);
        }
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

    #[test]
    fn windows_share_the_engine_budget() {
        const BODY: usize = 64 * 1024;
        let big = |seq| Entry {
            body: vec![0; BODY],
            ..entry(4, seq)
        };
        let budget = WindowBudget::new(2 * 1024 * 1024);
        let mut a = QueueState::unloaded_in(budget.clone());
        let mut b = QueueState::unloaded_in(budget.clone());
        a.store_has_more = false;
        b.store_has_more = false;
        for seq in 1..=24 {
            a.restore_persistent(big(seq));
        }
        assert_eq!(a.window_len(), 24, "under the budget: nothing evicted");
        for seq in 1..=24 {
            b.restore_persistent(big(seq));
        }
        // Over the budget: b keeps no more than its floor, and knows the store holds the rest.
        assert!(b.window_bytes <= WINDOW_BYTES_FLOOR, "{}", b.window_bytes);
        assert!(b.window_len() < 24 && b.store_has_more);
        assert_eq!(
            a.window_len(),
            24,
            "a window is only shrunk by its own changes"
        );
        assert_eq!(budget.bytes(), a.window_bytes + b.window_bytes);
        while b.take_next().is_some() {}
        assert_eq!(budget.bytes(), a.window_bytes);
        drop(a);
        assert_eq!(budget.bytes(), 0, "a dropped queue gives its bytes back");
    }

    /// What a store read after `cursor` returns.
    fn read_page(store: &BTreeMap<Key, Entry>, cursor: Option<Key>, batch: usize) -> Vec<Entry> {
        let from = match cursor {
            Some(u) => std::ops::Bound::Excluded(u),
            None => std::ops::Bound::Unbounded,
        };
        store
            .range((from, std::ops::Bound::Unbounded))
            .take(batch)
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// One step of the concurrent model: what the engine's tasks interleave.
    #[derive(Debug, Clone)]
    enum Step {
        /// A send commits to the store; its offer to the window comes later (tasks race).
        Send(u8),
        /// One of the committed sends offers its message (in any order).
        Offer(usize),
        Take,
        /// A consumer starts settling one of its deliveries (accept or release).
        Claim(usize, bool),
        /// A settle's store commit finishes (or fails, and the delivery is locked again).
        Finish(usize, bool),
        BeginRefill,
        /// The refill's store read runs.
        Read,
        Apply,
        /// The refill's future is dropped (a consumer went away).
        Abandon,
        /// A send's future is dropped after its commit, before its offer.
        Cancel(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0u8..3).prop_map(Step::Send),
            3 => any::<usize>().prop_map(Step::Offer),
            3 => Just(Step::Take),
            2 => (any::<usize>(), any::<bool>()).prop_map(|(i, a)| Step::Claim(i, a)),
            2 => (any::<usize>(), prop::bool::weighted(0.9)).prop_map(|(i, ok)| Step::Finish(i, ok)),
            1 => Just(Step::BeginRefill),
            1 => Just(Step::Read),
            1 => Just(Step::Apply),
            1 => Just(Step::Abandon),
            1 => any::<usize>().prop_map(Step::Cancel),
        ]
    }

    enum Refill {
        Idle,
        Begun(Option<Key>, u64),
        Read(Vec<Entry>, bool, u64),
    }

    proptest! {
        /// Sends, offers, takes, settles and refills interleaved as the engine's tasks can
        /// interleave them: a message is never handed out while a consumer holds it or after its
        /// row was deleted, and in the end every stored message is delivered.
        #[test]
        fn interleaved_refills_and_settles_deliver_each_message_once(window_max in 2usize..10, batch in 1usize..6, pages_kept in 1usize..4, steps in proptest::collection::vec(step(), 1..300)) {
            let mut store: BTreeMap<Key, Entry> = BTreeMap::new();
            let mut q = QueueState::unloaded_with(window_max);
            q.loaded_pages_max = pages_kept;
            let mut seq = 0u64;
            let mut pending: Vec<(Entry, RefillMark)> = Vec::new();
            let mut held: HashSet<u64> = HashSet::new();
            let mut settling: Vec<(Entry, bool)> = Vec::new();
            let mut refill = Refill::Idle;
            let take = |q: &mut QueueState, store: &BTreeMap<Key, Entry>, held: &mut HashSet<u64>| -> Result<bool, TestCaseError> {
                let Some(e) = q.take_next() else { return Ok(false) };
                let Some(row) = store.get(&e.key()) else {
                    prop_assert!(false, "message {} handed out after its row was deleted", e.seq);
                    unreachable!()
                };
                prop_assert_eq!(e.delivery_count, row.delivery_count, "message {} handed out with a stale delivery count", e.seq);
                prop_assert!(held.insert(e.seq), "message {} handed out while a consumer holds it", e.seq);
                Ok(true)
            };
            for s in steps {
                prop_assert_eq!(q.window_bytes, q.window.values().map(Entry::bytes).sum::<usize>(), "window bytes miscounted");
                match s {
                    Step::Send(prio) => {
                        seq += 1;
                        let e = entry(prio, seq);
                        let mark = q.refill_mark();
                        store.insert(e.key(), e.clone());
                        pending.push((e, mark));
                    }
                    Step::Offer(i) if !pending.is_empty() => {
                        let (e, mark) = pending.remove(i % pending.len());
                        q.offer_persistent(e, mark);
                    }
                    Step::Take => { take(&mut q, &store, &mut held)?; }
                    Step::Claim(i, accept) if !q.locked.is_empty() => {
                        let mut seqs: Vec<u64> = q.locked.keys().copied().collect();
                        seqs.sort_unstable();
                        let e = q.claim(seqs[i % seqs.len()]).expect("locked");
                        settling.push((e, accept));
                    }
                    Step::Finish(i, ok) if !settling.is_empty() => {
                        let (e, accept) = settling.remove(i % settling.len());
                        if !ok {
                            q.unclaim(e);
                        } else if accept {
                            store.remove(&e.key());
                            q.settled(e.seq, true);
                            held.remove(&e.seq);
                        } else {
                            // Failed: the count goes up in the store, then in memory.
                            let mut e = e;
                            store.get_mut(&e.key()).expect("held rows exist").delivery_count += 1;
                            e.delivery_count += 1;
                            held.remove(&e.seq);
                            q.release(e);
                        }
                    }
                    Step::Cancel(i) if !pending.is_empty() => {
                        // A send whose future was dropped after its commit: no offer comes.
                        pending.remove(i % pending.len());
                        q.forget_window();
                    }
                    Step::BeginRefill if matches!(refill, Refill::Idle) => {
                        if let Some((cursor, skipped)) = q.begin_refill() {
                            refill = Refill::Begun(cursor, skipped);
                        }
                    }
                    Step::Read => {
                        if let Refill::Begun(cursor, skipped) = refill {
                            let page = read_page(&store, cursor, batch);
                            let complete = page.len() < batch;
                            refill = Refill::Read(page, complete, skipped);
                        }
                    }
                    Step::Apply => {
                        if let Refill::Read(page, complete, skipped) = std::mem::replace(&mut refill, Refill::Idle) {
                            q.refill(page, complete, skipped);
                        }
                    }
                    Step::Abandon => {
                        // The read's future is dropped: the engine's guard aborts the refill.
                        if !matches!(refill, Refill::Idle) {
                            q.abort_refill();
                        }
                        refill = Refill::Idle;
                    }
                    _ => {}
                }
                prop_assert!(q.window.len() <= window_max);
                // What tracks a refill exists only while one runs (bounded by it).
                if q.refilling.is_none() {
                    prop_assert!(q.gone.is_empty() && q.offered_meanwhile.is_empty() && q.offered_entries.is_empty() && q.restored_meanwhile.is_empty());
                }
            }
            // Quiesce: every task finishes, consumers accept everything, refills run in turn.
            for (e, mark) in pending.drain(..) {
                q.offer_persistent(e, mark);
            }
            for (e, _) in settling.drain(..) {
                store.remove(&e.key());
                q.settled(e.seq, true);
                held.remove(&e.seq);
            }
            let mut rounds = 0;
            while !store.is_empty() {
                rounds += 1;
                prop_assert!(rounds < 10_000, "messages never delivered: {:?}", store.keys().collect::<Vec<_>>());
                if let Some((cursor, skipped)) = q.begin_refill() {
                    let page = read_page(&store, cursor, batch);
                    let complete = page.len() < batch;
                    q.refill(page, complete, skipped);
                }
                let mut seqs: Vec<u64> = q.locked.keys().copied().collect();
                seqs.sort_unstable();
                for s in seqs {
                    let e = q.claim(s).expect("locked");
                    store.remove(&e.key());
                    q.settled(s, true);
                    held.remove(&s);
                }
                take(&mut q, &store, &mut held)?;
            }
        }

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
                    let mark = q.refill_mark();
                    store.insert(e.key(), e.clone());
                    q.offer_persistent(e, mark);
                } else {
                    if let Some((cursor, skipped)) = q.begin_refill() {
                        let page = read_page(&store, cursor, batch);
                        let complete = page.len() < batch;
                        q.refill(page, complete, skipped);
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
