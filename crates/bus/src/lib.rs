//! Delivery streams between messaging engines (DESIGN §5), as pure state machines: no I/O, no
//! clock, no store. The engine persists each state change in the same store transaction as the
//! message change it describes and carries frames over ME-to-ME links; this crate decides what
//! the states and frames mean, so the protocol can be tested exhaustively on its own.
//!
//! A stream carries messages from one source engine to one target engine, numbered by *ticks*
//! 1, 2, 3 … under a random `stream_id`.
//! - Source: assigns ticks, keeps every unacknowledged message, forgets a message when the
//!   target's cumulative ack covers it, resends from any tick the target asks for.
//! - Target: keeps `prefix`, the highest tick such that every tick up to it is complete. Tick ≤
//!   prefix: a duplicate, dropped and re-acked. Tick = prefix + 1: delivered, prefix advances.
//!   Beyond: a gap; the target asks for a resend from prefix + 1.
//! - Connect: the source states its `next_tick` and `acked`; the target answers with its prefix,
//!   or finds one of the two impossible situations that only a store gone back in time causes:
//!   1. the target completed ticks the source says it never sent: the *source* was restored;
//!   2. the source holds acks beyond the target's prefix: the *target* was restored.
//!
//!   3. both went back, to different points, and the stream's history forked: the same tick
//!      carries different messages on the two sides. The target answers `Resume` with the
//!      identity of the message at its prefix; the source compares it with its own message at
//!      that tick, and holds on a mismatch. Tick numbers alone cannot see this (a source copied
//!      back to a backup reuses the old stream id and tick numbers for new messages).
//!
//!   Any of the three holds the stream (nothing is dropped: the source keeps its messages)
//!   until a FLUSH.
//! - FLUSH: the source moves its unacknowledged messages, in order, onto a new stream with
//!   ticks from 1, and the target discards the old stream's state.
//!
//! The source's side is [`SourceState`] (`source.rs`): the engine drives it and persists it,
//! keeping the messages in its store; [`Source`] (`memory.rs`) drives the same type with the
//! messages in memory for the property tests (`tests.rs`), so they test the code that runs.
//!
//! Invariants (asserted): `acked < next_tick`; the unacked ticks are exactly
//! `acked+1 .. next_tick`; a target's prefix only grows within one stream.

pub mod auth;
pub mod link;
mod memory;
pub mod source;

pub use memory::Source;
pub use source::{AckBeyond, Held, Resumption, SourceState};

use std::collections::BTreeMap;

/// A message's identity: unique for all time, never issued twice, not even by a store copied
/// back from a backup: the engine's system IDs carry an incarnation that every start moves to at
/// least the Unix time in ms (`keel_store::next_incarnation`), for this reason.
/// The handshake compares identities to find forked stream histories (case 3 above).
pub trait Identified {
    fn identity(&self) -> String;
}

/// What a source announces when a link comes up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub stream_id: String,
    /// The tick the next new message will get (every tick below it was assigned).
    pub next_tick: u64,
    /// Every tick up to this one was acknowledged by the target.
    pub acked: u64,
}

/// The target's answer to a `Hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Consistent so far: the source resends from `from` (everything at or below `from - 1` is
    /// complete at the target, so the source may forget it), once it has checked that its own
    /// message at tick `from - 1` has the identity `last` (None when `from` is 1).
    Resume { from: u64, last: Option<String> },
    /// The target completed ticks the source never sent: the source's store went back in time.
    SourceRestored {
        target_prefix: u64,
        source_next_tick: u64,
    },
    /// The source was acknowledged beyond the target's prefix: the target's store went back.
    TargetRestored {
        target_prefix: u64,
        source_acked: u64,
    },
    /// A FLUSH of the source replaced this stream; a source announcing it again went back in
    /// time (its store was put back to a copy from before that flush).
    Replaced,
}

/// Frames on an ME-to-ME link for one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<M> {
    Data {
        stream_id: String,
        tick: u64,
        msg: M,
    },
    /// Cumulative: every tick up to `upto` is complete at the target.
    Ack { stream_id: String, upto: u64 },
    /// The target has a gap: resend from `from`.
    Resend { stream_id: String, from: u64 },
}

/// What a target does with one data frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery<M> {
    /// New and in order: deliver it and persist the new prefix in the same store transaction,
    /// then send the ack.
    Deliver { msg: M, ack: Frame<M> },
    /// Already complete: drop it, re-send the ack.
    Duplicate { ack: Frame<M> },
    /// Ahead of the prefix: drop it and ask for the missing ticks.
    Gap { resend: Frame<M> },
    /// For a stream this target does not know, or one it was told to discard.
    UnknownStream,
}

/// A target's state for one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Prefix {
    /// Every tick up to this one is complete.
    tick: u64,
    /// Identity of the message at `tick` (None when `tick` is 0).
    identity: Option<String>,
}

/// The receiving side of the streams of one source engine.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Target {
    prefixes: BTreeMap<String, Prefix>,
    /// Streams a FLUSH replaced: never taken again.
    retired: std::collections::BTreeSet<String>,
}

impl Target {
    pub fn prefix(&self, stream_id: &str) -> Option<u64> {
        self.prefixes.get(stream_id).map(|p| p.tick)
    }

    /// The connect handshake (see the crate docs). A stream the target has never seen starts at
    /// prefix 0, unless the source already holds acks for it (case 2).
    pub fn on_hello(&mut self, h: &Hello) -> Verdict {
        if self.retired.contains(&h.stream_id) {
            return Verdict::Replaced;
        }
        let (prefix, last) = match self.prefixes.get(&h.stream_id) {
            Some(p) => (p.tick, p.identity.clone()),
            None => (0, None),
        };
        if prefix >= h.next_tick {
            return Verdict::SourceRestored {
                target_prefix: prefix,
                source_next_tick: h.next_tick,
            };
        }
        if h.acked > prefix {
            return Verdict::TargetRestored {
                target_prefix: prefix,
                source_acked: h.acked,
            };
        }
        self.prefixes.entry(h.stream_id.clone()).or_insert(Prefix {
            tick: 0,
            identity: None,
        });
        Verdict::Resume {
            from: prefix + 1,
            last,
        }
    }

    pub fn on_data<M: Identified>(&mut self, stream_id: &str, tick: u64, msg: M) -> Delivery<M> {
        assert!(tick >= 1, "ticks start at 1");
        let Some(prefix) = self.prefixes.get_mut(stream_id) else {
            return Delivery::UnknownStream;
        };
        let ack = |upto| Frame::Ack {
            stream_id: stream_id.to_string(),
            upto,
        };
        if tick <= prefix.tick {
            return Delivery::Duplicate {
                ack: ack(prefix.tick),
            };
        }
        if tick > prefix.tick + 1 {
            return Delivery::Gap {
                resend: Frame::Resend {
                    stream_id: stream_id.to_string(),
                    from: prefix.tick + 1,
                },
            };
        }
        *prefix = Prefix {
            tick,
            identity: Some(msg.identity()),
        };
        Delivery::Deliver {
            msg,
            ack: ack(tick),
        }
    }

    /// A stream's prefix as this target's store recorded it (read when a link comes up).
    pub fn restore(&mut self, stream_id: &str, tick: u64, identity: Option<String>) {
        self.prefixes
            .insert(stream_id.to_string(), Prefix { tick, identity });
    }

    /// FLUSH: forget a stream the source has replaced; it is never taken again (a source
    /// announcing it once more went back in time: `Verdict::Replaced`).
    pub fn discard(&mut self, stream_id: &str) {
        self.prefixes.remove(stream_id);
        self.retired.insert(stream_id.to_string());
    }

    /// Whether a FLUSH replaced `stream_id`.
    pub fn is_retired(&self, stream_id: &str) -> bool {
        self.retired.contains(stream_id)
    }
}

/// The target's memory of recently delivered message IDs from one source engine, so that
/// pre-backup messages resent after a FLUSH (new stream, new ticks, same IDs) are recognised
/// and dropped. Bounded: the oldest IDs leave first; a window that covers the backup's age
/// gives zero duplicates (DESIGN §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupWindow {
    capacity: usize,
    order: std::collections::VecDeque<String>,
    ids: std::collections::HashSet<String>,
}

impl DedupWindow {
    pub fn new(capacity: usize) -> DedupWindow {
        assert!(capacity > 0, "a window holds at least one ID");
        DedupWindow {
            capacity,
            order: std::collections::VecDeque::with_capacity(capacity.min(1 << 16)),
            ids: std::collections::HashSet::new(),
        }
    }

    /// Records `id`; returns false when it was already there (a duplicate to drop).
    pub fn admit(&mut self, id: &str) -> bool {
        if self.ids.contains(id) {
            return false;
        }
        if self.order.len() == self.capacity {
            let old = self.order.pop_front().expect("a full window is non-empty");
            self.ids.remove(&old);
        }
        self.order.push_back(id.to_string());
        self.ids.insert(id.to_string());
        debug_assert_eq!(self.order.len(), self.ids.len());
        true
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests;
