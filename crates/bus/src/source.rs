//! The source side of one delivery stream as the engine stores it: which ticks were assigned
//! and acknowledged, where their rows are, which flush made the stream, and what the source
//! does with the target's verdict when a link comes up. Storage-agnostic: the caller keeps the
//! messages (the engine in its store's transmission queue, `Source` in memory for the
//! property tests) and persists each new state in the same commit as the message change it
//! describes; every transition returns the new state rather than changing this one, so a
//! failed commit leaves the caller's copy as the store has it.
//!
//! Ticks are the wire's; a message's row is stored under `row_stream()` at
//! `row_of(tick) = tick + row_base`, so a FLUSH renumbers the unacknowledged messages from
//! tick 1 by moving `row_base`, without rewriting a row.
//!
//! Invariants (asserted after every transition): `acked < next_tick`; the unacknowledged
//! ticks are exactly `acked + 1 .. next_tick`; `acked` only grows within one stream; a flush
//! keeps every unacknowledged message at the same row; a stream made by a flush resends
//! exactly its first `resend_upto` ticks.

use serde::{Deserialize, Serialize};

use crate::{Hello, Verdict};

/// A source stream's durable state (the engine's JSON record of it keeps these names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceState {
    stream_id: String,
    next_tick: u64,
    acked: u64,
    /// ID of the message at tick `acked` (None when `acked` is 0): the fork check compares it.
    acked_identity: Option<String>,
    /// The stream id the rows are stored under (None: `stream_id`).
    #[serde(default)]
    row_stream: Option<String>,
    #[serde(default)]
    row_base: u64,
    /// The flush this stream was made for (None: not made by a FLUSH).
    #[serde(default)]
    flush_epoch: Option<String>,
    /// Ticks 1 ..= this of a stream made by a FLUSH are resent messages (the old stream's
    /// unacknowledged ones): the only ones a target may recognise as already delivered.
    #[serde(default)]
    resend_upto: u64,
}

/// Why a source holds its stream after a handshake: a store went back in time, or the two
/// histories forked. Nothing is sent until a FLUSH; nothing is dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// The target's own verdict: `SourceRestored`, `TargetRestored` or `Replaced`.
    Verdict(Verdict),
    /// A resume point behind what the target acknowledged, or past what was assigned.
    BadResume {
        from: u64,
        acked: u64,
        next_tick: u64,
    },
    /// The same tick carries different messages on the two sides.
    Forked {
        tick: u64,
        ours: String,
        theirs: Option<String>,
    },
}

impl Held {
    /// The operator's sentence for a hold of `stream_id` towards engine `peer` (CWSIT0009E).
    pub fn reason(&self, peer: &str, stream_id: &str) -> String {
        match self {
            Held::Verdict(Verdict::SourceRestored {
                target_prefix,
                source_next_tick,
            }) => format!(
                "engine {peer} has completed tick {target_prefix} of it but this engine's next tick is {source_next_tick}: this engine's data store went back in time"
            ),
            Held::Verdict(Verdict::TargetRestored {
                target_prefix,
                source_acked,
            }) => format!(
                "engine {peer} has completed only tick {target_prefix} of it but acknowledged tick {source_acked} before: that engine's data store went back in time"
            ),
            Held::Verdict(Verdict::Replaced) => format!(
                "engine {peer} retired this stream when a FLUSH of this engine replaced it: this engine's data store went back in time"
            ),
            Held::Verdict(Verdict::Resume { .. }) => {
                unreachable!("a resume verdict holds as BadResume or Forked")
            }
            Held::BadResume {
                from,
                acked,
                next_tick,
            } => format!(
                "engine {peer} asks to resume at tick {from}, but it acknowledged tick {acked} and tick {next_tick} is the next to assign"
            ),
            Held::Forked { tick, ours, theirs } => format!(
                "tick {tick} of stream {stream_id} is message {ours} here but {} at engine {peer}: the two histories forked (a store went back in time)",
                theirs.as_deref().unwrap_or("none")
            ),
        }
    }
}

/// What a source does with a verdict (see [`SourceState::resumption`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resumption {
    Hold(Held),
    /// Resend from `from` once [`SourceState::fork_check`] passed for `check`: the tick
    /// before `from` and the identity the target holds there (None: nothing to compare,
    /// `from` is 1). Everything below `from` is then acknowledged.
    Resume {
        from: u64,
        check: Option<(u64, Option<String>)>,
    },
}

/// An acknowledgement the stream cannot have had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stream {stream_id}: acknowledgement of tick {upto}, but only ticks below {next_tick} were assigned")]
pub struct AckBeyond {
    pub stream_id: String,
    pub upto: u64,
    pub next_tick: u64,
}

impl SourceState {
    /// A new stream: nothing assigned yet.
    pub fn new(stream_id: impl Into<String>) -> SourceState {
        let s = SourceState {
            stream_id: stream_id.into(),
            next_tick: 1,
            acked: 0,
            acked_identity: None,
            row_stream: None,
            row_base: 0,
            flush_epoch: None,
            resend_upto: 0,
        };
        s.check();
        s
    }

    /// A new stream made for flush `epoch` with nothing on it (a peer this source never
    /// sent to: its target retires the source's older streams on seeing it).
    pub fn new_for_flush(stream_id: impl Into<String>, epoch: &str) -> SourceState {
        SourceState {
            flush_epoch: Some(epoch.to_string()),
            ..SourceState::new(stream_id)
        }
    }

    /// A state read back from a store: checked before anything trusts it.
    pub fn validated(self) -> Result<SourceState, String> {
        if self.acked >= self.next_tick {
            return Err(format!(
                "acked tick {} is not below next tick {}",
                self.acked, self.next_tick
            ));
        }
        if self.acked > 0 && self.acked_identity.is_none() {
            return Err(format!("acked tick {} has no message identity", self.acked));
        }
        if self.resend_upto >= self.next_tick {
            return Err(format!(
                "resent ticks up to {} but only ticks below {} were assigned",
                self.resend_upto, self.next_tick
            ));
        }
        self.row_base
            .checked_add(self.next_tick)
            .ok_or_else(|| format!("row base {} overflows", self.row_base))?;
        Ok(self)
    }

    pub fn stream_id(&self) -> &str {
        &self.stream_id
    }

    /// The tick the next new message gets (every tick below it was assigned).
    pub fn next_tick(&self) -> u64 {
        self.next_tick
    }

    /// Every tick up to this one was acknowledged by the target.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    pub fn acked_identity(&self) -> Option<&str> {
        self.acked_identity.as_deref()
    }

    pub fn flush_epoch(&self) -> Option<&str> {
        self.flush_epoch.as_deref()
    }

    pub fn resend_upto(&self) -> u64 {
        self.resend_upto
    }

    /// The stream id the rows are stored under.
    pub fn row_stream(&self) -> &str {
        self.row_stream.as_deref().unwrap_or(&self.stream_id)
    }

    pub fn row_base(&self) -> u64 {
        self.row_base
    }

    /// The row of wire tick `tick`.
    pub fn row_of(&self, tick: u64) -> u64 {
        assert!(tick >= 1, "ticks start at 1");
        tick + self.row_base
    }

    /// The wire tick of row `row`.
    pub fn tick_of(&self, row: u64) -> u64 {
        assert!(
            row > self.row_base,
            "row {row} is at or below the row base {} (a row of an acknowledged message)",
            self.row_base
        );
        row - self.row_base
    }

    /// Messages waiting for the target's ack.
    pub fn unacked(&self) -> u64 {
        self.next_tick - 1 - self.acked
    }

    /// Their ticks.
    pub fn unacked_ticks(&self) -> std::ops::Range<u64> {
        self.acked + 1..self.next_tick
    }

    /// What the source announces when a link comes up.
    pub fn hello(&self) -> Hello {
        Hello {
            stream_id: self.stream_id.clone(),
            next_tick: self.next_tick,
            acked: self.acked,
        }
    }

    /// Whether this stream was made for flush `epoch` and nothing on it was acknowledged yet
    /// (a repeated request for that flush, after a lost link, changes nothing).
    pub fn is_flushed_for(&self, epoch: &str) -> bool {
        self.flush_epoch.as_deref() == Some(epoch) && self.acked == 0
    }

    /// `n` more messages assigned ticks `next_tick ..`: the state to store with their rows.
    pub fn assigned(&self, n: u64) -> SourceState {
        let next = SourceState {
            next_tick: self
                .next_tick
                .checked_add(n)
                .expect("ticks do not overflow u64"),
            ..self.clone()
        };
        next.check();
        next
    }

    /// The target completed every tick up to `upto`, the message at `upto` having identity
    /// `identity`: the state to store with the removal of those rows. `Ok(None)` for an ack
    /// at or below `acked` (late or repeated: nothing changes).
    pub fn acked_to(
        &self,
        upto: u64,
        identity: impl Into<String>,
    ) -> Result<Option<SourceState>, AckBeyond> {
        if upto <= self.acked {
            return Ok(None);
        }
        if upto >= self.next_tick {
            return Err(AckBeyond {
                stream_id: self.stream_id.clone(),
                upto,
                next_tick: self.next_tick,
            });
        }
        let next = SourceState {
            acked: upto,
            acked_identity: Some(identity.into()),
            ..self.clone()
        };
        next.check();
        assert!(next.acked > self.acked, "acked only grows");
        Ok(Some(next))
    }

    /// FLUSH: the same unacknowledged messages on stream `new_stream_id` (for flush `epoch`,
    /// if a flush start asked for it), as ticks 1 .. in their order; their rows stay where
    /// they are.
    pub fn flushed(&self, new_stream_id: impl Into<String>, epoch: Option<&str>) -> SourceState {
        let new_stream_id = new_stream_id.into();
        assert_ne!(
            new_stream_id, self.stream_id,
            "a flush needs a new stream id"
        );
        let new = SourceState {
            stream_id: new_stream_id,
            next_tick: self.next_tick - self.acked,
            acked: 0,
            acked_identity: None,
            row_stream: Some(self.row_stream().to_string()),
            row_base: self.row_base + self.acked,
            flush_epoch: epoch.map(str::to_string),
            resend_upto: self.next_tick - 1 - self.acked,
        };
        new.check();
        assert_eq!(new.unacked(), self.unacked(), "a flush keeps every message");
        assert_eq!(
            new.resend_upto,
            new.next_tick - 1,
            "a flush resends them all"
        );
        assert!(
            self.unacked_ticks()
                .zip(new.unacked_ticks())
                .all(|(old, t)| self.row_of(old) == new.row_of(t)),
            "a flush keeps every message at its row, in order"
        );
        new
    }

    /// The first step with the target's verdict after a connect: hold the stream (a store went
    /// back in time), or resume once the fork check of `check` passes.
    pub fn resumption(&self, v: &Verdict) -> Resumption {
        match v {
            Verdict::SourceRestored { .. } | Verdict::TargetRestored { .. } | Verdict::Replaced => {
                Resumption::Hold(Held::Verdict(v.clone()))
            }
            Verdict::Resume { from, last } => {
                // A resume behind what the target acknowledged (tick 0 included), or past what
                // was assigned, is what a restored or broken target says: hold, never trust it.
                if *from <= self.acked || *from > self.next_tick {
                    return Resumption::Hold(Held::BadResume {
                        from: *from,
                        acked: self.acked,
                        next_tick: self.next_tick,
                    });
                }
                Resumption::Resume {
                    from: *from,
                    check: (*from > 1).then(|| (from - 1, last.clone())),
                }
            }
        }
    }

    /// The fork check of a resume: the source's message at `tick` has identity `ours`
    /// (None: not known to the source: a row it no longer holds), the target's has `theirs`.
    /// Only a known, different identity is a fork.
    pub fn fork_check(
        &self,
        tick: u64,
        ours: Option<&str>,
        theirs: Option<&str>,
    ) -> Result<(), Held> {
        assert!(
            tick >= self.acked && tick < self.next_tick,
            "a fork check at tick {tick} outside {}..{}",
            self.acked,
            self.next_tick
        );
        match ours {
            Some(o) if Some(o) != theirs => Err(Held::Forked {
                tick,
                ours: o.to_string(),
                theirs: theirs.map(str::to_string),
            }),
            _ => Ok(()),
        }
    }

    fn check(&self) {
        assert!(
            self.acked < self.next_tick,
            "acked {} must be below next_tick {}",
            self.acked,
            self.next_tick
        );
        assert!(
            self.acked == 0 || self.acked_identity.is_some(),
            "an acknowledged tick has its message's identity"
        );
        assert!(
            self.resend_upto < self.next_tick,
            "resent ticks {} must have been assigned (next tick {})",
            self.resend_upto,
            self.next_tick
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_renumbers_without_moving_rows_and_keeps_every_message() {
        let st = SourceState::new("s1").assigned(10); // ticks 1..=10
        let st = st.acked_to(4, "m4").unwrap().unwrap(); // 5..=10 unacknowledged
        let f = st.flushed("s2", Some("e1"));
        assert_eq!(f.stream_id(), "s2");
        assert_eq!((f.next_tick(), f.acked(), f.resend_upto()), (7, 0, 6));
        assert_eq!(f.row_stream(), "s1", "rows stay where they are");
        assert_eq!(
            f.row_of(1),
            5,
            "wire tick 1 of the new stream is old tick 5"
        );
        assert!(f.is_flushed_for("e1") && !f.is_flushed_for("e2"));
        // A second flush after 2 more sends and 3 acks composes.
        let g = f.assigned(2).acked_to(3, "m7").unwrap().unwrap();
        let h = g.flushed("s3", None);
        assert_eq!((h.next_tick(), h.resend_upto()), (6, 5));
        assert_eq!(h.row_of(1), 8, "old tick 8 = row 8");
        assert_eq!(h.row_stream(), "s1");
        assert_eq!(h.flush_epoch(), None);
    }

    #[test]
    fn acks_move_forward_only_and_never_past_what_was_assigned() {
        let st = SourceState::new("s1").assigned(3);
        assert_eq!(st.acked_to(0, "x").unwrap(), None);
        let a = st.acked_to(2, "m2").unwrap().unwrap();
        assert_eq!(a.acked_identity(), Some("m2"));
        assert_eq!(a.acked_to(1, "m1").unwrap(), None, "late");
        assert!(a.acked_to(4, "m4").is_err());
        assert_eq!(a.unacked_ticks(), 3..4);
    }

    #[test]
    fn verdicts_resume_or_hold() {
        let st = SourceState::new("s1")
            .assigned(5)
            .acked_to(2, "m2")
            .unwrap()
            .unwrap();
        let resume = |from, last: Option<&str>| {
            st.resumption(&Verdict::Resume {
                from,
                last: last.map(str::to_string),
            })
        };
        assert!(matches!(
            resume(2, None),
            Resumption::Hold(Held::BadResume { .. })
        ));
        assert!(matches!(
            resume(0, None),
            Resumption::Hold(Held::BadResume { .. })
        ));
        assert!(matches!(
            resume(7, None),
            Resumption::Hold(Held::BadResume { .. })
        ));
        assert_eq!(
            resume(4, Some("m3")),
            Resumption::Resume {
                from: 4,
                check: Some((3, Some("m3".into())))
            }
        );
        assert_eq!(st.fork_check(3, Some("m3"), Some("m3")), Ok(()));
        assert!(st.fork_check(3, Some("m3"), Some("other")).is_err());
        assert_eq!(
            st.fork_check(3, None, Some("m3")),
            Ok(()),
            "unknown: no fork seen"
        );
        let fresh = SourceState::new("s0");
        assert_eq!(
            fresh.resumption(&Verdict::Resume {
                from: 1,
                last: None
            }),
            Resumption::Resume {
                from: 1,
                check: None
            }
        );
    }

    #[test]
    fn a_state_read_back_is_checked_and_keeps_the_stored_names() {
        let st = SourceState::new("s1")
            .assigned(3)
            .acked_to(1, "m1")
            .unwrap()
            .unwrap();
        let json = serde_json::to_string(&st).unwrap();
        for name in [
            "stream_id",
            "next_tick",
            "acked",
            "acked_identity",
            "row_base",
            "resend_upto",
        ] {
            assert!(json.contains(name), "{json}");
        }
        let back: SourceState = serde_json::from_str(&json).unwrap();
        assert_eq!(back.validated().unwrap(), st);
        let bad: SourceState = serde_json::from_str(
            r#"{"stream_id":"s","next_tick":2,"acked":2,"acked_identity":"m"}"#,
        )
        .unwrap();
        assert!(bad.validated().is_err());
    }
}
