//! The node agent's care of its node's certificates (`secrets/tls/`, keel-tls): at start it
//! makes what the configuration needs and the profile lacks (profiles from before
//! certificates, servers added since; ADMN0040I), and at start and once a day it warns of
//! certificates of this node, and the cell's CA, that expire within
//! `keel_tls::EXPIRY_WARNING_DAYS` (ADMN0041W, once per certificate per check).
//! Problems are logged (ADMN0042W), never fatal: no listener requires TLS yet.

use std::time::Duration;

use keel_config::{Config, Profile};
use keel_core::{catalog, emit};
use serde_json::{json, Value};

/// How often expiry is checked while the node agent runs.
const EXPIRY_CHECK_INTERVAL_S: u64 = 86_400;

fn now_s() -> i64 {
    keel_core::unix_s()
}

/// The certificates that concern `node`: the CA and the node's processes'.
fn ours(name: &str, node: &str) -> bool {
    name == "ca" || name.strip_prefix(node).is_some_and(|r| r.starts_with('.'))
}

pub(crate) fn ensure(profile: &Profile, cfg: &Config, node: &str) {
    match profile.ensure_certificates(cfg) {
        Ok(made) if made.is_empty() => {}
        Ok(made) => emit!(
            catalog::ADMN0040I,
            names = made.join(", "),
            dir = profile.layout().tls_dir().display()
        ),
        Err(e) => emit!(catalog::ADMN0042W, node = node, reason = e),
    }
}

/// Warns once per certificate of `node` that expires within the warning window.
fn check_expiry(profile: &Profile, node: &str) {
    let list = match profile.pki().list() {
        Ok(l) => l,
        Err(e) => {
            emit!(catalog::ADMN0042W, node = node, reason = e);
            return;
        }
    };
    let now = now_s();
    for (name, info) in list.iter().filter(|(n, _)| ours(n, node)) {
        let days = info.days_left(now);
        if days <= keel_tls::EXPIRY_WARNING_DAYS {
            emit!(
                catalog::ADMN0041W,
                name = name,
                subject = info.subject,
                days = days,
                not_after = date(info.not_after_s)
            );
        }
    }
}

pub(crate) async fn watch_expiry(profile: Profile, node: String) {
    let mut tick = tokio::time::interval(Duration::from_secs(EXPIRY_CHECK_INTERVAL_S));
    loop {
        tick.tick().await;
        let (p, n) = (profile.clone(), node.clone());
        // Reading a few PEM files: off the runtime's worker threads all the same.
        let _ = tokio::task::spawn_blocking(move || check_expiry(&p, &n)).await;
    }
}

fn date(unix_s: i64) -> String {
    keel_tls::rfc3339(unix_s)
}

/// The NodeAgent object's `certificates` attribute: name, subject, expiry and days left of the
/// CA and this node's certificates (null when they cannot be read: ADMN0042W says why).
pub(crate) fn attribute(profile: &Profile, node: &str) -> Value {
    let Ok(list) = profile.pki().list() else {
        return Value::Null;
    };
    let now = now_s();
    Value::Array(
        list.iter()
            .filter(|(n, _)| ours(n, node))
            .map(|(n, i)| {
                json!({
                    "name": n,
                    "subject": i.subject,
                    "not_after": date(i.not_after_s),
                    "days_left": i.days_left(now),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::ours;

    #[test]
    fn a_node_sees_the_ca_and_its_own_processes_only() {
        assert!(ours("ca", "node01"));
        assert!(ours("node01.server1", "node01"));
        assert!(ours("node01.nodeagent", "node01"));
        assert!(!ours("node011.server1", "node01"));
        assert!(!ours("node02.server1", "node01"));
    }
}
