//! The summary of a `peers --rounds N` run. Outside the `peers` feature so its tests run with
//! the workspace's.

use std::fmt::Write;

/// One system's throughput in one round.
pub struct Run<'a> {
    pub system: &'a str,
    /// 1-based.
    pub round: u32,
    pub msgs_per_s: f64,
}

/// Per system the median, lowest and highest throughput over the rounds; then, for the first
/// system against each other, the ratio of their throughputs within each round (both ran in
/// it, so the VM's drift between rounds cancels) and its median.
pub fn summary(systems: &[String], runs: &[Run]) -> String {
    let mut out = String::from("\nover the rounds\n");
    for system in systems {
        let mut v: Vec<f64> = runs
            .iter()
            .filter(|r| r.system == system)
            .map(|r| r.msgs_per_s)
            .collect();
        v.sort_by(f64::total_cmp);
        if let (Some(lo), Some(hi)) = (v.first(), v.last()) {
            let _ = writeln!(
                out,
                "{system:<12} median {:>8.0} msgs/s, lowest {lo:.0}, highest {hi:.0} ({} runs)",
                median(&v),
                v.len()
            );
        }
    }
    let Some(first) = systems.first() else {
        return out;
    };
    for other in systems.iter().skip(1) {
        let mut ratios: Vec<f64> = runs
            .iter()
            .filter(|a| a.system == first)
            .filter_map(|a| {
                runs.iter()
                    .find(|b| b.system == other && b.round == a.round)
                    .map(|b| a.msgs_per_s / b.msgs_per_s)
            })
            .collect();
        if ratios.is_empty() {
            continue;
        }
        ratios.sort_by(f64::total_cmp);
        let ahead = ratios.iter().filter(|&&r| r > 1.0).count();
        let _ = writeln!(
            out,
            "{first} / {other}: median {:.2}, lowest {:.2}, highest {:.2}; {first} ahead in {ahead} of {} rounds",
            median(&ratios),
            ratios[0],
            ratios[ratios.len() - 1],
            ratios.len()
        );
    }
    out
}

/// The median of sorted, non-empty `v`.
fn median(v: &[f64]) -> f64 {
    assert!(!v.is_empty());
    assert!(v.windows(2).all(|w| w[0] <= w[1]), "sorted");
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(system: &str, round: u32, msgs_per_s: f64) -> Run<'_> {
        Run {
            system,
            round,
            msgs_per_s,
        }
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0]), 3.0);
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
    }

    #[test]
    fn rounds_compare_systems_within_each_round() {
        let systems = vec!["keel".to_string(), "nats".to_string()];
        // Round 2 is slow for both: the ratio stays, the absolute figures do not.
        let runs = vec![
            run("keel", 1, 110.0),
            run("nats", 1, 100.0),
            run("nats", 2, 50.0),
            run("keel", 2, 45.0),
            run("keel", 3, 120.0),
            run("nats", 3, 100.0),
        ];
        let s = summary(&systems, &runs);
        assert!(
            s.contains("keel         median      110 msgs/s, lowest 45, highest 120 (3 runs)"),
            "{s}"
        );
        assert!(
            s.contains(
                "keel / nats: median 1.10, lowest 0.90, highest 1.20; keel ahead in 2 of 3 rounds"
            ),
            "{s}"
        );
    }

    #[test]
    fn a_system_missing_from_a_round_is_left_out_of_its_ratios() {
        let systems = vec!["keel".to_string(), "nats".to_string()];
        let runs = vec![
            run("keel", 1, 100.0),
            run("keel", 2, 100.0),
            run("nats", 2, 200.0),
        ];
        let s = summary(&systems, &runs);
        assert!(s.contains("keel / nats: median 0.50"), "{s}");
        assert!(s.contains("ahead in 0 of 1 rounds"), "{s}");
    }
}
