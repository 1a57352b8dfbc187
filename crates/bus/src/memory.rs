//! `Source`: a [`SourceState`] with its messages kept in memory, as rows keyed the way the
//! engine keys its transmission queue (`(row stream, row tick)`), so that the property tests
//! drive the production state machine through the same row arithmetic the engine uses; a
//! flush that renumbered wrongly would find the wrong rows here too. The engine does not use
//! this type: it keeps the rows in its store and drives `SourceState` itself.

use std::collections::BTreeMap;

use crate::source::{Resumption, SourceState};
use crate::{Frame, Hello, Identified, Verdict};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source<M> {
    state: SourceState,
    /// `(row stream, row tick)` → message, for every unacknowledged tick.
    rows: BTreeMap<(String, u64), M>,
    /// Held after a handshake found a restored store or a forked history: nothing is sent until
    /// a FLUSH (a link's state in the engine, not stored).
    held: bool,
}

impl<M: Clone + Identified> Source<M> {
    pub fn new(stream_id: impl Into<String>) -> Source<M> {
        Source {
            state: SourceState::new(stream_id),
            rows: BTreeMap::new(),
            held: false,
        }
    }

    pub fn state(&self) -> &SourceState {
        &self.state
    }

    pub fn stream_id(&self) -> &str {
        self.state.stream_id()
    }

    pub fn hello(&self) -> Hello {
        self.state.hello()
    }

    pub fn is_held(&self) -> bool {
        self.held
    }

    fn row_key(&self, tick: u64) -> (String, u64) {
        (self.state.row_stream().to_string(), self.state.row_of(tick))
    }

    fn at(&self, tick: u64) -> &M {
        self.rows
            .get(&self.row_key(tick))
            .unwrap_or_else(|| panic!("no row for unacknowledged tick {tick}"))
    }

    /// Messages waiting for an ack, in tick order.
    pub fn unacked(&self) -> impl Iterator<Item = (u64, &M)> {
        self.state.unacked_ticks().map(|t| (t, self.at(t)))
    }

    /// Assigns the next tick to `msg` and keeps it until acked; returns the frame to send
    /// (None while the stream is held: the message waits in the source).
    pub fn send(&mut self, msg: M) -> (u64, Option<Frame<M>>) {
        let tick = self.state.next_tick();
        let next = self.state.assigned(1);
        self.rows.insert(self.row_key(tick), msg.clone());
        self.state = next;
        self.check();
        let frame = (!self.held).then(|| Frame::Data {
            stream_id: self.stream_id().to_string(),
            tick,
            msg,
        });
        (tick, frame)
    }

    /// A cumulative ack; acks for another stream or below what is known are ignored (late or
    /// duplicated frames). An ack beyond what was sent is a protocol violation (returned).
    pub fn on_ack(&mut self, stream_id: &str, upto: u64) -> Result<(), String> {
        if stream_id != self.stream_id() || upto <= self.state.acked() {
            return Ok(());
        }
        if upto >= self.state.next_tick() {
            // Checked before a row is looked up: the row does not exist.
            return Err(self
                .state
                .acked_to(upto, "")
                .expect_err("beyond next_tick")
                .to_string());
        }
        let identity = self.at(upto).identity();
        let next = self
            .state
            .acked_to(upto, identity)
            .map_err(|e| e.to_string())?
            .expect("an ack beyond acked moves it");
        for t in self.state.acked() + 1..=upto {
            let key = self.row_key(t);
            self.rows.remove(&key).expect("an acknowledged row existed");
        }
        self.state = next;
        self.check();
        Ok(())
    }

    /// Frames resending every unacked message from `from` on, in order.
    pub fn resend_from(&self, from: u64) -> Vec<Frame<M>> {
        if self.held {
            return Vec::new();
        }
        (from.max(self.state.acked() + 1)..self.state.next_tick())
            .map(|t| Frame::Data {
                stream_id: self.stream_id().to_string(),
                tick: t,
                msg: self.at(t).clone(),
            })
            .collect()
    }

    /// Applies the target's verdict after a connect; returns the frames to (re)send. The
    /// stream is held (see `is_held`) when the target found a restored store, or when the
    /// target's message at its prefix is not the source's message at that tick (a fork).
    pub fn on_verdict(&mut self, v: &Verdict) -> Vec<Frame<M>> {
        let from = match self.state.resumption(v) {
            Resumption::Hold(_) => None,
            Resumption::Resume { from, check } => {
                let forked = check.is_some_and(|(tick, theirs)| {
                    let ours = if tick == self.state.acked() {
                        self.state.acked_identity().map(str::to_string)
                    } else {
                        Some(self.at(tick).identity())
                    };
                    self.state
                        .fork_check(tick, ours.as_deref(), theirs.as_deref())
                        .is_err()
                });
                (!forked).then_some(from)
            }
        };
        let Some(from) = from else {
            self.held = true;
            return Vec::new();
        };
        self.held = false;
        // The target holds everything below `from`: same as an ack.
        if from > 1 {
            let id = self.stream_id().to_string();
            self.on_ack(&id, from - 1)
                .expect("a resume point within the assigned ticks");
        }
        self.resend_from(from)
    }

    /// FLUSH: every unacked message moves, in order, onto `new_stream_id` with ticks from 1;
    /// no row moves. Returns the old stream's id (the target must discard it).
    pub fn flush(&mut self, new_stream_id: impl Into<String>) -> String {
        let old = self.stream_id().to_string();
        self.state = self.state.flushed(new_stream_id, None);
        self.held = false;
        self.check();
        old
    }

    /// Rows are exactly the unacknowledged ticks.
    fn check(&self) {
        debug_assert_eq!(
            self.rows.len() as u64,
            self.state.unacked(),
            "one row per unacknowledged tick"
        );
    }
}
