//! Fault points for crash tests: `KEEL_FAULTS=point[:action],...`.
//!
//! Code marks a point with `faults::hit("me.after_store_commit")`. Unset, a hit costs one relaxed
//! atomic load after the first call (the parsed set is cached), so points can sit on hot paths.
//! Actions: `crash` (the default: abort at once, like `kill -9`, no destructors, no flushing).
//! The points Keel defines are listed in `POINTS`; an unknown name in `KEEL_FAULTS` is reported
//! by `unknown_points` so a typo in a test does not silently test nothing.

use std::sync::OnceLock;

/// Environment variable read by every Keel process.
pub const ENV: &str = "KEEL_FAULTS";

/// Every fault point in the code base, with where it fires. Keep in step with `hit` calls.
pub const POINTS: &[(&str, &str)] = &[
    (
        "server.after_open",
        "a server process, right after it logged WSVR0001I (open for work)",
    ),
    (
        "server.before_open",
        "a server process, after its endpoints are bound, before WSVR0001I",
    ),
    (
        "server.before_stop",
        "a server process, when a normal stop begins, before WSVR0102I",
    ),
    (
        "node.after_launch",
        "the node agent, right after it spawned a server process",
    ),
    (
        "me.after_store_commit",
        "a messaging engine, after a sent message is durable, before the producer is answered",
    ),
    (
        "bus.target_after_commit",
        "a messaging engine receiving a delivery stream, after messages and the stream's prefix are durable, before the ack",
    ),
    (
        "bus.flush_after_begin",
        "a messaging engine's FLUSH start, after its streams were moved and the flush recorded, before CWSIP0109I",
    ),
    (
        "bus.flush_after_confirm",
        "a messaging engine running a FLUSH, after a peer's confirmation is durable",
    ),
    (
        "tx.after_prepare",
        "the transaction coordinator, after every branch of a transaction prepared, before the commit decision is logged",
    ),
    (
        "tx.after_decision",
        "the transaction coordinator, after the commit decision is forced to the tranlog, before any branch commits",
    ),
    (
        "tx.mid_commit",
        "the transaction coordinator, after the first branch committed, before the next",
    ),
    (
        "bus.source_after_flush",
        "a messaging engine asked by a flushing peer to move its stream, after the new stream is durable, before it is announced",
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Crash,
}

static ARMED: OnceLock<Vec<(String, Action)>> = OnceLock::new();

fn armed() -> &'static [(String, Action)] {
    ARMED.get_or_init(|| std::env::var(ENV).map(|v| parse(&v)).unwrap_or_default())
}

/// Parses `point[:action],...`; unknown actions fall back to `crash` (the only one so far).
pub fn parse(spec: &str) -> Vec<(String, Action)> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let point = s.split_once(':').map_or(s, |(p, _)| p);
            (point.to_string(), Action::Crash)
        })
        .collect()
}

/// Names in `KEEL_FAULTS` that are not fault points: the caller should warn about them.
pub fn unknown_points() -> Vec<String> {
    armed()
        .iter()
        .filter(|(p, _)| !POINTS.iter().any(|(known, _)| known == p))
        .map(|(p, _)| p.clone())
        .collect()
}

/// Acts if `point` is armed. Never returns when it crashes.
pub fn hit(point: &'static str) {
    debug_assert!(
        POINTS.iter().any(|(p, _)| *p == point),
        "fault point {point} is not listed in POINTS"
    );
    let armed = armed();
    if armed.is_empty() {
        return;
    }
    if let Some((_, Action::Crash)) = armed.iter().find(|(p, _)| p == point) {
        eprintln!("KEEL_FAULTS: crashing at fault point {point}");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `hit("...")` in the workspace names a listed point (else it would panic in debug
    /// builds only when reached, and be missing from the docs).
    #[test]
    fn every_hit_in_the_code_is_listed() {
        let crates = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut stack = vec![crates];
        let mut found = 0;
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    for part in text.split(concat!("faults::hit", "(\"")).skip(1) {
                        let point = &part[..part.find('"').unwrap()];
                        assert!(
                            POINTS.iter().any(|(n, _)| *n == point),
                            "{}: fault point {point} is not in POINTS",
                            p.display()
                        );
                        found += 1;
                    }
                }
            }
        }
        assert!(found >= POINTS.len(), "found only {found} hits");
    }

    #[test]
    fn parses_points_and_actions() {
        let v = parse(" tx.after_prepare:crash ,server.after_open,, ");
        assert_eq!(
            v,
            vec![
                ("tx.after_prepare".into(), Action::Crash),
                ("server.after_open".into(), Action::Crash)
            ]
        );
        assert!(parse("").is_empty());
    }
}
