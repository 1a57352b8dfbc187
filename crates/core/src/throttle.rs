//! Failed-login throttling (DESIGN §10): after a few failed logins from one source as one
//! user (or many, as any user), every further answer to that source and user waits, twice as
//! long after each failure up to a ceiling, so guessing a password costs time that grows with
//! the guesses. The delay is applied before the answer (correct or not): a throttled guesser
//! learns nothing sooner by guessing right. Listeners log the start of each burst once (the
//! `Failed::burst_started` flag), never each attempt.
//!
//! Attempts of one key are answered one after another, each its delay after the one before
//! (`reserve`): a guesser who opens many connections at once gets no more answers per second
//! than one who waits, and an attempt that would have to wait past `queue_max_ms` is refused
//! at once without its password being looked at (it guesses nothing).
//!
//! Pure bookkeeping with the clock passed in; the listeners sleep.
//!
//! Deliberately absent: a ban list. A delay slows guessing without letting an attacker lock a
//! user out. The state is per process and starts empty after a restart.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::admission::Source;

/// How failures turn into delays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Failures of one source and user answered without delay.
    pub free_failures: u32,
    /// Failures of one source, whatever the users, answered without delay (one user guessing
    /// many names must not get `free_failures` per name).
    pub source_free_failures: u32,
    /// The first delay; each further failure doubles it.
    pub first_delay_ms: u64,
    pub delay_max_ms: u64,
    /// A key with no failure for this long starts again from zero.
    pub forget_after_ms: u64,
    /// Keys remembered at once (the oldest are forgotten first).
    pub keys_max: usize,
    /// The longest an attempt waits in its key's queue; later ones are refused unevaluated.
    pub queue_max_ms: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            free_failures: 3,
            source_free_failures: 20,
            first_delay_ms: 250,
            delay_max_ms: 8_000,
            forget_after_ms: 15 * 60 * 1_000,
            keys_max: 4_096,
            queue_max_ms: 30_000,
        }
    }
}

/// User names longer than this are counted by their first bytes (a key is bounded).
const USER_KEY_BYTES_MAX: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    User(Source, String),
    Source(Source),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    last_failure: Instant,
    /// When the last reserved attempt of this key is answered.
    answer_at: Option<Instant>,
}

/// What one failure changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failed {
    /// The delay now owed by the next attempt of this source and user.
    pub delay: Duration,
    /// Failures of this source and user in a row.
    pub failures: u32,
    /// True exactly once per burst: when this failure made the key throttled.
    pub burst_started: bool,
}

#[derive(Debug)]
pub struct LoginThrottle {
    limits: Limits,
    keys: Mutex<HashMap<Key, Entry>>,
}

impl LoginThrottle {
    pub fn new(limits: Limits) -> LoginThrottle {
        assert!(limits.first_delay_ms <= limits.delay_max_ms && limits.keys_max >= 2);
        LoginThrottle {
            limits,
            keys: Mutex::default(),
        }
    }

    fn user_key(source: Source, user: &str) -> Key {
        let mut end = user.len().min(USER_KEY_BYTES_MAX);
        while !user.is_char_boundary(end) {
            end -= 1;
        }
        Key::User(source, user[..end].to_string())
    }

    fn delay_of(&self, entry: Option<&Entry>, free: u32, now: Instant) -> Duration {
        let Some(e) = entry else {
            return Duration::ZERO;
        };
        if now.saturating_duration_since(e.last_failure).as_millis()
            >= u128::from(self.limits.forget_after_ms)
            || e.failures <= free
        {
            return Duration::ZERO;
        }
        let doublings = (e.failures - free - 1).min(32);
        let ms = self
            .limits
            .first_delay_ms
            .saturating_mul(1u64 << doublings)
            .min(self.limits.delay_max_ms);
        Duration::from_millis(ms)
    }

    /// How long an attempt from `source` as `user` must wait before it is answered.
    pub fn delay(&self, source: Source, user: &str, now: Instant) -> Duration {
        let keys = self.keys.lock().expect("throttle lock");
        let by_user = self.delay_of(
            keys.get(&Self::user_key(source, user)),
            self.limits.free_failures,
            now,
        );
        let by_source = self.delay_of(
            keys.get(&Key::Source(source)),
            self.limits.source_free_failures,
            now,
        );
        by_user.max(by_source)
    }

    /// Books an attempt from `source` as `user` arriving `now`: how long it waits before it
    /// is answered (zero for a key without failures), each attempt of a throttled key its delay
    /// after the one before; or, when that wait would pass `queue_max_ms`, `Err` with how long
    /// until the queue has room (the attempt is then refused without evaluation).
    pub fn reserve(&self, source: Source, user: &str, now: Instant) -> Result<Duration, Duration> {
        let mut keys = self.keys.lock().expect("throttle lock");
        let user_key = Self::user_key(source, user);
        let source_key = Key::Source(source);
        let d = self
            .delay_of(keys.get(&user_key), self.limits.free_failures, now)
            .max(self.delay_of(keys.get(&source_key), self.limits.source_free_failures, now));
        if d.is_zero() {
            return Ok(Duration::ZERO);
        }
        let previous = [&user_key, &source_key]
            .iter()
            .filter_map(|k| keys.get(*k).and_then(|e| e.answer_at))
            .max();
        let at = match previous {
            Some(p) if p > now => p + d,
            _ => now + d,
        };
        let wait = at - now;
        if wait > Duration::from_millis(self.limits.queue_max_ms) {
            return Err(wait - Duration::from_millis(self.limits.queue_max_ms));
        }
        for k in [&user_key, &source_key] {
            if let Some(e) = keys.get_mut(k) {
                e.answer_at = Some(at);
            }
        }
        Ok(wait)
    }

    /// Records a failed login.
    pub fn failed(&self, source: Source, user: &str, now: Instant) -> Failed {
        let mut keys = self.keys.lock().expect("throttle lock");
        let mut bump = |key: Key, free: u32| -> (u32, bool) {
            let forget = self.limits.forget_after_ms;
            if !keys.contains_key(&key) && keys.len() >= self.limits.keys_max {
                Self::make_room(&mut keys, forget, now);
            }
            let e = keys.entry(key).or_insert(Entry {
                failures: 0,
                last_failure: now,
                answer_at: None,
            });
            if now.saturating_duration_since(e.last_failure).as_millis() >= u128::from(forget) {
                e.failures = 0;
            }
            e.failures = e.failures.saturating_add(1);
            e.last_failure = now;
            (e.failures, e.failures == free + 1)
        };
        let (failures, user_started) =
            bump(Self::user_key(source, user), self.limits.free_failures);
        let (_, source_started) = bump(Key::Source(source), self.limits.source_free_failures);
        drop(keys);
        Failed {
            delay: self.delay(source, user, now),
            failures,
            burst_started: user_started || source_started,
        }
    }

    /// Records a failed login and logs ADMN0031W when it starts a burst (once per burst).
    pub fn failed_and_logged(&self, source: Source, user: &str, now: Instant) -> Failed {
        let failed = self.failed(source, user, now);
        if failed.burst_started {
            crate::emit!(
                crate::catalog::ADMN0031W,
                peer = source,
                user = crate::budget::clip(user, 64),
                failures = failed.failures,
                delay_ms = failed.delay.as_millis(),
                delay_max_ms = self.limits.delay_max_ms
            );
        }
        failed
    }

    /// A successful login forgets that user's failures from that source (not the source's).
    pub fn succeeded(&self, source: Source, user: &str) {
        self.keys
            .lock()
            .expect("throttle lock")
            .remove(&Self::user_key(source, user));
    }

    /// Forgets expired keys, and the oldest one if none expired.
    fn make_room(keys: &mut HashMap<Key, Entry>, forget_after_ms: u64, now: Instant) {
        keys.retain(|_, e| {
            now.saturating_duration_since(e.last_failure).as_millis() < u128::from(forget_after_ms)
        });
        if let Some(oldest) = keys
            .iter()
            .min_by_key(|(_, e)| e.last_failure)
            .map(|(k, _)| k.clone())
        {
            keys.remove(&oldest);
        }
    }

    #[cfg(test)]
    fn keys_len(&self) -> usize {
        self.keys.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(s: &str) -> Source {
        Source::of(s.parse().unwrap())
    }

    fn limits() -> Limits {
        Limits {
            free_failures: 2,
            source_free_failures: 5,
            first_delay_ms: 100,
            delay_max_ms: 1_000,
            forget_after_ms: 60_000,
            keys_max: 8,
            queue_max_ms: 3_000,
        }
    }

    #[test]
    fn concurrent_attempts_of_a_throttled_key_are_answered_one_delay_apart_and_then_refused() {
        let t = LoginThrottle::new(limits());
        let now = Instant::now();
        let s = src("127.0.0.2");
        assert_eq!(t.reserve(s, "admin", now), Ok(Duration::ZERO));
        for _ in 0..4 {
            t.failed(s, "admin", now);
        }
        // Delay now 200 ms: ten attempts at once are spaced 200 ms apart, up to the 3 s queue.
        let waits: Vec<Result<u128, u128>> = (0..17)
            .map(|_| {
                t.reserve(s, "admin", now)
                    .map(|d| d.as_millis())
                    .map_err(|d| d.as_millis())
            })
            .collect();
        let expected: Vec<Result<u128, u128>> = (1..=15)
            .map(|k| Ok(200 * k))
            .chain([Err(200), Err(200)])
            .collect();
        assert_eq!(waits, expected);
        // Once the queue has drained, the next attempt waits one delay again.
        let later = now + Duration::from_secs(4);
        assert_eq!(t.reserve(s, "admin", later), Ok(Duration::from_millis(200)));
        // Another user of the same source is not in this queue (the source has 4 failures, 5 free).
        assert_eq!(t.reserve(s, "other", now), Ok(Duration::ZERO));
    }

    #[test]
    fn delays_double_after_the_free_failures_up_to_the_ceiling_and_a_burst_starts_once() {
        let t = LoginThrottle::new(limits());
        let now = Instant::now();
        let s = src("127.0.0.2");
        let mut delays = Vec::new();
        let mut starts = 0;
        for _ in 0..8 {
            let f = t.failed(s, "admin", now);
            delays.push(f.delay.as_millis());
            starts += usize::from(f.burst_started);
        }
        assert_eq!(delays, [0, 0, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(starts, 2, "the user's burst and then the source's burst");
        assert_eq!(t.delay(s, "admin", now), Duration::from_millis(1_000));
        // Another source is not delayed by this one's failures.
        assert_eq!(t.delay(src("127.0.0.1"), "admin", now), Duration::ZERO);
        // Success forgets the user's failures; the source's remain (8 > 5 free).
        t.succeeded(s, "admin");
        assert_eq!(t.delay(s, "admin", now), Duration::from_millis(400));
        // Silence long enough forgets everything.
        let later = now + Duration::from_secs(61);
        assert_eq!(t.delay(s, "admin", later), Duration::ZERO);
        assert_eq!(t.failed(s, "admin", later).failures, 1);
    }

    #[test]
    fn many_user_names_from_one_source_are_throttled_as_the_source() {
        let t = LoginThrottle::new(Limits {
            keys_max: 64,
            ..limits()
        });
        let now = Instant::now();
        let s = src("::1");
        for i in 0..7 {
            t.failed(s, &format!("user{i}"), now);
        }
        // Each name failed once, the source seven times (5 free).
        assert_eq!(t.delay(s, "someone-new", now), Duration::from_millis(200));
    }

    #[test]
    fn keys_are_bounded_and_long_names_are_cut() {
        let t = LoginThrottle::new(limits());
        let now = Instant::now();
        for i in 0..100u32 {
            let at = now + Duration::from_millis(u64::from(i));
            t.failed(src(&format!("10.0.{}.{}", i / 200, i % 200)), "x", at);
        }
        assert!(t.keys_len() <= 8, "{}", t.keys_len());
        let long = "é".repeat(1_000);
        let later = now + Duration::from_secs(1);
        let f = t.failed(src("127.0.0.9"), &long, later);
        assert_eq!(f.failures, 1);
        assert_eq!(t.failed(src("127.0.0.9"), &long[..200], later).failures, 2);
    }
}
