//! The log budget for what peers that have not authenticated make a process say (DESIGN §10):
//! a refused request, connection or login is worth a log record, but a flood of them must not
//! rotate the operator's logs away. A token bucket per listener lets a burst through, then one
//! record per second; the record that goes through next says how many were left out, so the
//! count survives even what the text does not. Fields a peer chose are clipped (`clip`).

use std::borrow::Cow;
use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug)]
pub struct LogBudget {
    burst: u32,
    per_s: u32,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tokens_milli: u64,
    last: Instant,
    left_out: u64,
}

impl LogBudget {
    /// Up to `burst` records at once, then `per_s` a second.
    pub fn new(burst: u32, per_s: u32) -> LogBudget {
        assert!(burst >= 1 && per_s >= 1);
        LogBudget {
            burst,
            per_s,
            state: Mutex::new(State {
                tokens_milli: u64::from(burst) * 1_000,
                last: Instant::now(),
                left_out: 0,
            }),
        }
    }

    /// `Some(n)` when a record may be written now (`n` were left out since the last one
    /// written), `None` when this one is to be left out (and counted).
    pub fn take(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().expect("log budget lock");
        let elapsed_ms = now.saturating_duration_since(s.last).as_millis();
        let earned =
            u64::try_from(elapsed_ms.saturating_mul(u128::from(self.per_s))).unwrap_or(u64::MAX);
        s.tokens_milli = s
            .tokens_milli
            .saturating_add(earned)
            .min(u64::from(self.burst) * 1_000);
        s.last = now;
        if s.tokens_milli < 1_000 {
            s.left_out = s.left_out.saturating_add(1);
            return None;
        }
        s.tokens_milli -= 1_000;
        Some(std::mem::take(&mut s.left_out))
    }
}

/// ` (and N more like it not logged)` for a record that `take` let through, or nothing.
pub fn left_out_note(left_out: u64) -> String {
    if left_out == 0 {
        String::new()
    } else {
        format!(" (and {left_out} more like it not logged)")
    }
}

/// `text` cut to at most `bytes_max` bytes (on a character boundary), saying how long it was.
pub fn clip(text: &str, bytes_max: usize) -> Cow<'_, str> {
    if text.len() <= bytes_max {
        return Cow::Borrowed(text);
    }
    let mut end = bytes_max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}… ({} bytes)", &text[..end], text.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_one_a_second_and_the_next_record_counts_the_left_out() {
        let b = LogBudget::new(3, 1);
        let t0 = Instant::now();
        let taken: Vec<Option<u64>> = (0..6).map(|_| b.take(t0)).collect();
        assert_eq!(taken, [Some(0), Some(0), Some(0), None, None, None]);
        assert_eq!(b.take(t0 + Duration::from_millis(500)), None);
        assert_eq!(b.take(t0 + Duration::from_millis(1_000)), Some(4));
        assert_eq!(b.take(t0 + Duration::from_millis(1_001)), None);
        // A long silence refills only up to the burst.
        let later = t0 + Duration::from_secs(3_600);
        let n = (0..10).filter(|_| b.take(later).is_some()).count();
        assert_eq!(n, 3);
    }

    #[test]
    fn clip_cuts_on_a_character_boundary_and_says_the_length() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("ééé", 3), "é… (6 bytes)");
        let long = "/".repeat(60_000);
        assert!(clip(&long, 128).len() < 160);
        assert_eq!(left_out_note(0), "");
        assert_eq!(left_out_note(7), " (and 7 more like it not logged)");
    }
}
