//! JMX-style admin object names: `Keel:type=Server,name=server1,node=node01,process=server1`.
//!
//! A name is a domain and an ordered list of `key=value` properties. Patterns are what
//! `AdminControl.queryNames` takes: `type=Server,*` (no domain means any domain; a trailing `*`
//! means "other keys allowed"); values may use `*` and `?` wildcards.

use std::fmt;

/// The domain of every object Keel registers.
pub const DOMAIN: &str = "Keel";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("admin object name `{text}` is malformed: {why}; names look like `Keel:type=Server,name=server1`")]
    Malformed { text: String, why: &'static str },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectName {
    domain: String,
    props: Vec<(String, String)>,
}

impl ObjectName {
    /// Builds a name in the Keel domain; properties keep the order given (it is the display order).
    pub fn new(props: &[(&str, &str)]) -> ObjectName {
        ObjectName {
            domain: DOMAIN.to_string(),
            props: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    pub fn parse(text: &str) -> Result<ObjectName, NameError> {
        let pattern = ObjectPattern::parse(text)?;
        if pattern.any_keys || pattern.domain.is_none() {
            return Err(NameError::Malformed {
                text: text.into(),
                why: "a name needs a domain and no `*`",
            });
        }
        if pattern.props.iter().any(|(_, v)| v.contains(['*', '?'])) {
            return Err(NameError::Malformed {
                text: text.into(),
                why: "a name may not hold wildcards",
            });
        }
        Ok(ObjectName {
            domain: pattern.domain.unwrap_or_default(),
            props: pattern.props,
        })
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.props
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The `type` key: which kind of admin object this is.
    pub fn kind(&self) -> Option<&str> {
        self.get("type")
    }

    /// Two names denote the same object when domain and property *sets* are equal (JMX rule).
    pub fn same_object(&self, other: &ObjectName) -> bool {
        let mut a = self.props.clone();
        let mut b = other.props.clone();
        a.sort();
        b.sort();
        self.domain == other.domain && a == b
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.domain)?;
        for (i, (k, v)) in self.props.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectPattern {
    domain: Option<String>,
    props: Vec<(String, String)>,
    any_keys: bool,
}

impl ObjectPattern {
    pub fn parse(text: &str) -> Result<ObjectPattern, NameError> {
        let bad = |why| NameError::Malformed {
            text: text.to_string(),
            why,
        };
        let text_trim = text.trim();
        if text_trim.is_empty() {
            return Err(bad("it is empty"));
        }
        let (domain, rest) = match text_trim.split_once(':') {
            Some((d, r)) => (
                if d.is_empty() || d == "*" {
                    None
                } else {
                    Some(d.to_string())
                },
                r,
            ),
            None => (None, text_trim),
        };
        let mut props = Vec::new();
        let mut any_keys = false;
        for part in rest.split(',') {
            let part = part.trim();
            if part == "*" {
                any_keys = true;
                continue;
            }
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad("each property must be `key=value`"))?;
            let (k, v) = (k.trim(), v.trim());
            if k.is_empty() || v.is_empty() {
                return Err(bad("keys and values may not be empty"));
            }
            if props.iter().any(|(pk, _): &(String, String)| pk == k) {
                return Err(bad("a key appears twice"));
            }
            props.push((k.to_string(), v.to_string()));
        }
        if props.is_empty() && !any_keys {
            return Err(bad("it has no properties"));
        }
        Ok(ObjectPattern {
            domain,
            props,
            any_keys,
        })
    }

    pub fn matches(&self, name: &ObjectName) -> bool {
        if let Some(d) = &self.domain {
            if !wildcard_match(d, &name.domain) {
                return false;
            }
        }
        if !self.any_keys && self.props.len() != name.props.len() {
            return false;
        }
        self.props
            .iter()
            .all(|(k, pv)| name.get(k).is_some_and(|v| wildcard_match(pv, v)))
    }
}

/// `*` matches any run of characters, `?` exactly one. Iterative with one backtrack point, so
/// the cost is bounded by `pattern.len() * text.len()` whatever the input.
fn wildcard_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> ObjectName {
        ObjectName::new(&[
            ("type", "SIBMessagingEngine"),
            ("name", "node01.server1-bus1"),
            ("bus", "bus1"),
            ("node", "node01"),
            ("process", "server1"),
        ])
    }

    #[test]
    fn display_and_parse_round_trip() {
        let n = me();
        let text = n.to_string();
        assert_eq!(text, "Keel:type=SIBMessagingEngine,name=node01.server1-bus1,bus=bus1,node=node01,process=server1");
        assert_eq!(ObjectName::parse(&text).unwrap(), n);
    }

    #[test]
    fn patterns_match_like_jmx() {
        let n = me();
        assert!(ObjectPattern::parse("type=SIBMessagingEngine,*")
            .unwrap()
            .matches(&n));
        assert!(ObjectPattern::parse("Keel:type=SIBMessagingEngine,*")
            .unwrap()
            .matches(&n));
        assert!(ObjectPattern::parse("*:name=node01.*,*")
            .unwrap()
            .matches(&n));
        assert!(ObjectPattern::parse("type=SIB*,process=server?,*")
            .unwrap()
            .matches(&n));
        assert!(!ObjectPattern::parse("type=Server,*").unwrap().matches(&n));
        assert!(!ObjectPattern::parse("Other:type=SIBMessagingEngine,*")
            .unwrap()
            .matches(&n));
        // Without `*` the key set must be exact.
        assert!(!ObjectPattern::parse("type=SIBMessagingEngine")
            .unwrap()
            .matches(&n));
        assert!(ObjectPattern::parse("*").unwrap().matches(&n));
    }

    #[test]
    fn malformed_names_are_refused_with_a_reason() {
        for bad in [
            "",
            "Keel:",
            "Keel:type",
            "Keel:=x",
            "Keel:type=a,type=b",
            "type=Server",
        ] {
            let e = ObjectName::parse(bad).unwrap_err();
            assert!(e.to_string().contains("malformed"), "{bad}: {e}");
        }
    }

    #[test]
    fn same_object_ignores_property_order() {
        let a = ObjectName::parse("Keel:type=Server,name=s1").unwrap();
        let b = ObjectName::parse("Keel:name=s1,type=Server").unwrap();
        assert!(a.same_object(&b));
    }

    #[test]
    fn wildcards_are_bounded_and_correct() {
        assert!(wildcard_match("a*b*c", "axxbyyc"));
        assert!(!wildcard_match("a*b*c", "axxbyy"));
        assert!(wildcard_match("***", ""));
        assert!(!wildcard_match("?", ""));
        let long = "a".repeat(2000);
        assert!(!wildcard_match(&format!("{}b", "*a".repeat(50)), &long));
    }
}
