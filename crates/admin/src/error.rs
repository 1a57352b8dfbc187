//! Admin errors and their wire form.
//!
//! Every Display text is a sentence an operator reads on stderr: what failed, on which object,
//! and what to do. The wire form carries the variant's fields next to the text so the client
//! rebuilds the same variant, and a command prints the server's sentence unchanged.

use keel_core::{NameError, ObjectName, ObjectPattern};
use serde::{Deserialize, Serialize};

/// Why an admin call failed. The same variants come out of a local [`crate::Registry`] and of
/// an [`crate::AdminClient`] (rebuilt from the wire), so callers match on one type.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "no admin object named {name} is registered (query with `keel admin query 'type=...,*'`)"
    )]
    NotFound { name: String },
    #[error(
        "admin object {name} has no operation `{op}`; its operations are: {}",
        list(known)
    )]
    UnknownOperation {
        name: String,
        op: String,
        known: Vec<String>,
    },
    #[error(
        "admin object {name} has no attribute `{attribute}`; its attributes are: {}",
        list(known)
    )]
    UnknownAttribute {
        name: String,
        attribute: String,
        known: Vec<String>,
    },
    #[error("operation `{op}` of {name} refused its arguments: {why}")]
    BadArguments {
        name: String,
        op: String,
        why: String,
    },
    #[error("operation `{op}` of {name} failed: {why}")]
    Failed {
        name: String,
        op: String,
        why: String,
    },
    #[error(transparent)]
    BadName(#[from] NameError),
    #[error("{}", unauthorized(addr, answered_by))]
    Unauthorized {
        addr: String,
        /// Who answered (`process P of node N, cell C`), when the endpoint said so.
        answered_by: String,
    },
    /// The caller is authenticated but lacks the role (HTTP 403); `why` names the user, the
    /// role and the object (`keel_core::roles::refusal`).
    #[error("{why}")]
    Forbidden { why: String },
    #[error("no Keel process answers at {addr} ({why}); check that the node agent or server is running and the port is right")]
    Unreachable { addr: String, why: String },
    #[error("the Keel process at {addr} did not answer within {timeout_ms} ms; it may be overloaded or hung (see its SystemOut.log), or the operation needs a longer timeout")]
    Timeout { addr: String, timeout_ms: u64 },
    #[error("the admin endpoint at {addr} answered outside the Keel admin protocol: {why}")]
    Protocol { addr: String, why: String },
}

/// A refused credential is most often a port that belongs to another profile: say who
/// answered, so the operator can tell.
fn unauthorized(addr: &str, answered_by: &str) -> String {
    let port = addr.rsplit(':').next().unwrap_or(addr);
    if answered_by.is_empty() {
        format!("the admin endpoint at {addr} refused the credential: use the profile's secrets/admin-password, or, if port {port} belongs to another Keel profile or process, give this profile its own ports")
    } else {
        format!("the admin endpoint at {addr} ({answered_by}) refused this profile's credential: if that is not this profile's process, port {port} belongs to another Keel profile or process (stop it, or give this profile its own ports); else use the profile's secrets/admin-password")
    }
}

fn list(known: &[String]) -> String {
    if known.is_empty() {
        "(none)".to_string()
    } else {
        known.join(", ")
    }
}

impl AdminError {
    /// Stable kind strings used on the wire (and by scripts that want to tell errors apart).
    pub fn kind(&self) -> &'static str {
        match self {
            AdminError::NotFound { .. } => "not_found",
            AdminError::UnknownOperation { .. } => "unknown_operation",
            AdminError::UnknownAttribute { .. } => "unknown_attribute",
            AdminError::BadArguments { .. } => "bad_arguments",
            AdminError::Failed { .. } => "failed",
            AdminError::BadName(_) => "bad_name",
            AdminError::Unauthorized { .. } => "unauthorized",
            AdminError::Forbidden { .. } => "forbidden",
            AdminError::Unreachable { .. } => "unreachable",
            AdminError::Timeout { .. } => "timeout",
            AdminError::Protocol { .. } => "protocol",
        }
    }

    /// The HTTP status a server answers this error with. `Unauthorized` from a *peer* is a
    /// gateway failure (502), never 401: a 401 would tell the caller its own credential is wrong.
    pub(crate) fn http_status(&self) -> u16 {
        match self {
            AdminError::BadName(_) | AdminError::BadArguments { .. } => 400,
            AdminError::NotFound { .. }
            | AdminError::UnknownOperation { .. }
            | AdminError::UnknownAttribute { .. } => 404,
            AdminError::Failed { .. } => 500,
            AdminError::Forbidden { .. } => 403,
            AdminError::Unreachable { .. }
            | AdminError::Unauthorized { .. }
            | AdminError::Protocol { .. } => 502,
            AdminError::Timeout { .. } => 504,
        }
    }

    pub(crate) fn to_wire(&self) -> WireError {
        let mut w = WireError {
            kind: self.kind().to_string(),
            message: self.to_string(),
            ..WireError::default()
        };
        match self {
            AdminError::NotFound { name } => w.name = Some(name.clone()),
            AdminError::UnknownOperation { name, op, known } => {
                w.name = Some(name.clone());
                w.op = Some(op.clone());
                w.known = Some(known.clone());
            }
            AdminError::UnknownAttribute {
                name,
                attribute,
                known,
            } => {
                w.name = Some(name.clone());
                w.attribute = Some(attribute.clone());
                w.known = Some(known.clone());
            }
            AdminError::BadArguments { name, op, why } | AdminError::Failed { name, op, why } => {
                w.name = Some(name.clone());
                w.op = Some(op.clone());
                w.why = Some(why.clone());
            }
            AdminError::BadName(NameError::Malformed { text, .. }) => w.text = Some(text.clone()),
            AdminError::Forbidden { why } => w.why = Some(why.clone()),
            AdminError::Unauthorized { addr, answered_by } => {
                w.addr = Some(addr.clone());
                w.why = Some(answered_by.clone());
            }
            AdminError::Unreachable { addr, why } | AdminError::Protocol { addr, why } => {
                w.addr = Some(addr.clone());
                w.why = Some(why.clone());
            }
            AdminError::Timeout { addr, timeout_ms } => {
                w.addr = Some(addr.clone());
                w.timeout_ms = Some(*timeout_ms);
            }
        }
        w
    }

    /// Rebuilds the error a server sent. `call` says what the client asked, so that an answer
    /// missing fields (an older or foreign server) still becomes a `Failed` naming the object
    /// and operation, carrying the server's message.
    pub(crate) fn from_wire(w: WireError, call: &CallContext<'_>) -> AdminError {
        let fallback = |w: &WireError| AdminError::Failed {
            name: call.name.to_string(),
            op: call.op.to_string(),
            why: w.message.clone(),
        };
        let rebuilt = match w.kind.as_str() {
            "not_found" => w.name.clone().map(|name| AdminError::NotFound { name }),
            "unknown_operation" => match (&w.name, &w.op, &w.known) {
                (Some(name), Some(op), Some(known)) => Some(AdminError::UnknownOperation {
                    name: name.clone(),
                    op: op.clone(),
                    known: known.clone(),
                }),
                _ => None,
            },
            "unknown_attribute" => match (&w.name, &w.attribute, &w.known) {
                (Some(name), Some(attribute), Some(known)) => Some(AdminError::UnknownAttribute {
                    name: name.clone(),
                    attribute: attribute.clone(),
                    known: known.clone(),
                }),
                _ => None,
            },
            "bad_arguments" | "failed" => match (&w.name, &w.op, &w.why) {
                (Some(name), Some(op), Some(why)) => {
                    let (name, op, why) = (name.clone(), op.clone(), why.clone());
                    Some(if w.kind == "failed" {
                        AdminError::Failed { name, op, why }
                    } else {
                        AdminError::BadArguments { name, op, why }
                    })
                }
                _ => None,
            },
            // NameError carries a `&'static str` reason, so it cannot travel; parsing the same
            // text again gives the same error (the client asked with this text).
            "bad_name" => w.text.as_deref().and_then(|text| {
                let reparsed = if call.is_pattern {
                    ObjectPattern::parse(text).err()
                } else {
                    ObjectName::parse(text).err()
                };
                reparsed.map(AdminError::BadName)
            }),
            "unauthorized" => w.addr.clone().map(|addr| AdminError::Unauthorized {
                addr,
                answered_by: w.why.clone().unwrap_or_default(),
            }),
            "forbidden" => w.why.clone().map(|why| AdminError::Forbidden { why }),
            "unreachable" | "protocol" => match (&w.addr, &w.why) {
                (Some(addr), Some(why)) => Some(if w.kind == "unreachable" {
                    AdminError::Unreachable {
                        addr: addr.clone(),
                        why: why.clone(),
                    }
                } else {
                    AdminError::Protocol {
                        addr: addr.clone(),
                        why: why.clone(),
                    }
                }),
                _ => None,
            },
            "timeout" => match (&w.addr, w.timeout_ms) {
                (Some(addr), Some(timeout_ms)) => Some(AdminError::Timeout {
                    addr: addr.clone(),
                    timeout_ms,
                }),
                _ => None,
            },
            _ => None,
        };
        rebuilt.unwrap_or_else(|| fallback(&w))
    }
}

/// What a client call was about, for rebuilding errors.
pub(crate) struct CallContext<'a> {
    pub name: &'a str,
    pub op: &'a str,
    /// True when `name` is a pattern (query), false when it is an object name.
    pub is_pattern: bool,
}

/// `{"kind", "message", ...fields}`: the `error` member of an error answer.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct WireError {
    pub kind: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribute: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_variant() -> Vec<AdminError> {
        let name = "Keel:type=Server,name=s1".to_string();
        vec![
            AdminError::NotFound { name: name.clone() },
            AdminError::UnknownOperation {
                name: name.clone(),
                op: "x".into(),
                known: vec!["a".into(), "b".into()],
            },
            AdminError::UnknownAttribute {
                name: name.clone(),
                attribute: "y".into(),
                known: vec![],
            },
            AdminError::BadArguments {
                name: name.clone(),
                op: "start".into(),
                why: "too many".into(),
            },
            AdminError::Failed {
                name: name.clone(),
                op: "start".into(),
                why: "store locked".into(),
            },
            AdminError::BadName(ObjectName::parse("Keel:type").unwrap_err()),
            AdminError::Unauthorized {
                addr: "127.0.0.1:1".into(),
                answered_by: "process server1 of node node01, cell keelCell".into(),
            },
            AdminError::Unreachable {
                addr: "127.0.0.1:1".into(),
                why: "connection refused".into(),
            },
            AdminError::Timeout {
                addr: "127.0.0.1:1".into(),
                timeout_ms: 5,
            },
            AdminError::Protocol {
                addr: "127.0.0.1:1".into(),
                why: "not JSON".into(),
            },
        ]
    }

    #[test]
    fn every_variant_survives_the_wire_with_the_same_sentence() {
        let call = CallContext {
            name: "Keel:type",
            op: "invoke",
            is_pattern: false,
        };
        let mut kinds = Vec::new();
        for e in every_variant() {
            let json = serde_json::to_string(&e.to_wire()).unwrap();
            let back = AdminError::from_wire(serde_json::from_str(&json).unwrap(), &call);
            assert_eq!(back.kind(), e.kind(), "{json}");
            assert_eq!(back.to_string(), e.to_string());
            assert!(!kinds.contains(&e.kind()), "kind {} used twice", e.kind());
            kinds.push(e.kind());
        }
    }

    #[test]
    fn unknown_kinds_become_failed_with_the_server_message() {
        let call = CallContext {
            name: "Keel:type=Server,name=s1",
            op: "stop",
            is_pattern: false,
        };
        let w = WireError {
            kind: "quota_exceeded".into(),
            message: "too many stops today".into(),
            ..Default::default()
        };
        match AdminError::from_wire(w, &call) {
            AdminError::Failed { name, op, why } => {
                assert_eq!(
                    (name.as_str(), op.as_str(), why.as_str()),
                    (call.name, "stop", "too many stops today")
                );
            }
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    #[test]
    fn sentences_name_the_object_and_what_to_do() {
        let e = AdminError::UnknownOperation {
            name: "N".into(),
            op: "fly".into(),
            known: vec!["start".into(), "stop".into()],
        };
        assert_eq!(
            e.to_string(),
            "admin object N has no operation `fly`; its operations are: start, stop"
        );
        let e = AdminError::NotFound {
            name: "Keel:type=X".into(),
        };
        assert!(e
            .to_string()
            .starts_with("no admin object named Keel:type=X is registered"));
        let e = AdminError::Unreachable {
            addr: "127.0.0.1:9".into(),
            why: "connection refused".into(),
        };
        assert!(e
            .to_string()
            .starts_with("no Keel process answers at 127.0.0.1:9 (connection refused)"));
    }
}
