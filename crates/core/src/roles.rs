//! Who may do what (DESIGN §10): the administrative roles of the seeds' world and the bus roles,
//! and the rule that says whether a set of grants allows an action. Pure data and matching: the
//! users themselves (names, password hashes, grants) are configuration (`keel-config`), the
//! check at login is `keel-auth`'s, and each listener asks [`Grants::admin`] / [`Grants::bus`].
//!
//! Administrative roles nest: Administrator > Configurator, Operator > Monitor. An
//! Administrator holds every role, bus roles included (the profile's `admin` user keeps working
//! everywhere). Bus roles are granted per bus, and sender / receiver / browser per destination
//! name or pattern (`*` alone = every destination; a trailing `*` = a prefix).

use std::fmt;

use serde::{Deserialize, Serialize};

/// An administrative role: what an admin API or console caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AdminRole {
    /// Reads: states, attributes, queries, logs.
    Monitor,
    /// Runs the cell: start and stop, FLUSH start, recovery, transaction resolution, backups.
    Operator,
    /// Changes the configuration.
    Configurator,
    /// Everything, users and roles included.
    Administrator,
}

impl AdminRole {
    pub const ALL: [AdminRole; 4] = [
        AdminRole::Monitor,
        AdminRole::Operator,
        AdminRole::Configurator,
        AdminRole::Administrator,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AdminRole::Monitor => "Monitor",
            AdminRole::Operator => "Operator",
            AdminRole::Configurator => "Configurator",
            AdminRole::Administrator => "Administrator",
        }
    }

    /// Whether holding `self` allows what `needed` allows.
    pub fn implies(self, needed: AdminRole) -> bool {
        self == needed
            || self == AdminRole::Administrator
            || (needed == AdminRole::Monitor && self != AdminRole::Monitor)
    }

    /// Parses a role name, case-insensitively.
    pub fn parse(s: &str) -> Option<AdminRole> {
        AdminRole::ALL
            .into_iter()
            .find(|r| r.as_str().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for AdminRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A bus role: what an AMQP client may do on a bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusRole {
    /// May connect to the bus at all.
    Connector,
    /// May attach a sender link to a destination.
    Sender,
    /// May attach a receiver link (consume).
    Receiver,
    /// May browse (a receiver with the `copy` distribution mode).
    Browser,
}

impl BusRole {
    pub const ALL: [BusRole; 4] = [
        BusRole::Connector,
        BusRole::Sender,
        BusRole::Receiver,
        BusRole::Browser,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BusRole::Connector => "connector",
            BusRole::Sender => "sender",
            BusRole::Receiver => "receiver",
            BusRole::Browser => "browser",
        }
    }

    /// Parses a role name, case-insensitively.
    pub fn parse(s: &str) -> Option<BusRole> {
        BusRole::ALL
            .into_iter()
            .find(|r| r.as_str().eq_ignore_ascii_case(s))
    }

    /// Whether the role is granted per destination (all but connector).
    pub fn per_destination(self) -> bool {
        self != BusRole::Connector
    }
}

impl fmt::Display for BusRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One bus role granted on one bus, for destinations matching `destination` (None for
/// connector, which is per bus).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BusGrant {
    pub role: BusRole,
    pub bus: String,
    #[serde(default)]
    pub destination: Option<String>,
}

/// Longest destination pattern in a grant.
pub const MAX_PATTERN_LEN: usize = 128;

/// Whether `pattern` is well formed: `*`, a name, or a prefix ending in one `*`.
pub fn pattern_problem(pattern: &str) -> Option<String> {
    if pattern.is_empty() || pattern.len() > MAX_PATTERN_LEN {
        return Some(format!(
            "a destination pattern has 1 to {MAX_PATTERN_LEN} bytes"
        ));
    }
    let stars = pattern.matches('*').count();
    if stars > 1 || (stars == 1 && !pattern.ends_with('*')) {
        return Some(format!(
            "{pattern:?} may hold one `*`, at its end only (`*` alone = every destination, `orders.*` = every name starting with `orders.`)"
        ));
    }
    None
}

/// Whether a destination name matches a grant's pattern.
pub fn pattern_matches(pattern: &str, destination: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => destination.starts_with(prefix),
        None => pattern == destination,
    }
}

/// What one principal holds: its administrative roles and its bus grants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grants {
    pub roles: Vec<AdminRole>,
    pub bus: Vec<BusGrant>,
}

impl Grants {
    /// Everything (the profile's own `admin`, internal callers).
    pub fn administrator() -> Grants {
        Grants {
            roles: vec![AdminRole::Administrator],
            bus: Vec::new(),
        }
    }

    pub fn is_administrator(&self) -> bool {
        self.roles.contains(&AdminRole::Administrator)
    }

    /// Whether these grants allow an administrative action that needs `needed`.
    pub fn admin(&self, needed: AdminRole) -> bool {
        self.roles.iter().any(|r| r.implies(needed))
    }

    /// Whether these grants allow `role` on `bus` (and `destination`, for per-destination roles).
    pub fn bus(&self, bus: &str, role: BusRole, destination: Option<&str>) -> bool {
        if self.is_administrator() {
            return true;
        }
        self.bus.iter().any(|g| {
            g.role == role
                && g.bus == bus
                && match (&g.destination, destination) {
                    (_, None) => !role.per_destination(),
                    (Some(p), Some(d)) => pattern_matches(p, d),
                    (None, Some(_)) => false,
                }
        })
    }
}

/// The sentence of a refusal: who lacked which role for what (HTTP 403, amqp:unauthorized-access).
pub fn refusal(user: &str, role: impl fmt::Display, object: &str) -> String {
    format!("user {user:?} does not hold the {role} role needed for {object}; an Administrator can grant it with `keel role grant {role} --user {user}`")
}

/// The sentence of a bus refusal (amqp:unauthorized-access): who lacked which bus role, on
/// which bus and destination, and the grant that would allow it.
pub fn bus_refusal(user: &str, role: BusRole, bus: &str, destination: Option<&str>) -> String {
    match destination {
        Some(d) => format!("user {user:?} does not hold the {role} role for destination {d} of bus {bus}; an Administrator can grant it with `keel role grant {role} --user {user} --bus {bus} --destination {d}`"),
        None => format!("user {user:?} does not hold the {role} role of bus {bus}; an Administrator can grant it with `keel role grant {role} --user {user} --bus {bus}`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_roles_nest() {
        use AdminRole::*;
        for held in AdminRole::ALL {
            assert!(held.implies(held));
            assert!(held.implies(Monitor));
            assert!(Administrator.implies(held));
        }
        assert!(!Monitor.implies(Operator));
        assert!(!Operator.implies(Configurator));
        assert!(!Configurator.implies(Operator));
        assert!(!Operator.implies(Administrator));
        assert!(!Configurator.implies(Administrator));
        assert_eq!(AdminRole::parse("operator"), Some(Operator));
        assert_eq!(AdminRole::parse("root"), None);
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("*", "q1"));
        assert!(pattern_matches("orders.*", "orders.eu"));
        assert!(!pattern_matches("orders.*", "order"));
        assert!(pattern_matches("q1", "q1"));
        assert!(!pattern_matches("q1", "q10"));
        assert!(pattern_problem("a*b").is_some());
        assert!(pattern_problem("**").is_some());
        assert!(pattern_problem("").is_some());
        assert!(pattern_problem("orders.*").is_none());
    }

    #[test]
    fn bus_grants_are_per_bus_role_and_destination() {
        let g = Grants {
            roles: vec![AdminRole::Monitor],
            bus: vec![
                BusGrant {
                    role: BusRole::Connector,
                    bus: "b1".into(),
                    destination: None,
                },
                BusGrant {
                    role: BusRole::Sender,
                    bus: "b1".into(),
                    destination: Some("orders.*".into()),
                },
            ],
        };
        assert!(g.bus("b1", BusRole::Connector, None));
        assert!(!g.bus("b2", BusRole::Connector, None));
        assert!(g.bus("b1", BusRole::Sender, Some("orders.x")));
        assert!(!g.bus("b1", BusRole::Sender, Some("invoices")));
        assert!(!g.bus("b1", BusRole::Receiver, Some("orders.x")));
        assert!(!g.bus("b1", BusRole::Sender, None));
        assert!(!g.admin(AdminRole::Operator));
        assert!(g.admin(AdminRole::Monitor));
        assert!(Grants::administrator().bus("any", BusRole::Browser, Some("q")));
    }
}
