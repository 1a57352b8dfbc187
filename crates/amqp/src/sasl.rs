//! SASL for the bus port: PLAIN against the cell's users (`keel_auth::Users`: Argon2id hashes),
//! ANONYMOUS only when a bus hosted here allows it (the client then acts as the bus's
//! anonymous user, resolved per link). One acceptor per connection, so the outcome (who the peer is) can be read
//! back by the connection's task. Failed logins are throttled per source and user
//! (`keel_core::throttle`, shared with the admin port's rules): a throttled attempt's outcome is
//! held back by the connection's write gate (`gate.rs`), right or wrong.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use keel_core::admission::Source;
use keel_core::throttle::LoginThrottle;

use crate::gate::Gate;

use fe2o3_amqp::acceptor::sasl_acceptor::{SaslAcceptor, SaslServerFrame};
use fe2o3_amqp::auth::scram::{
    ScramAuthenticator, ScramCredentialProvider, ScramVersion, StoredPassword,
};
use fe2o3_amqp::types::primitives::{Array, Symbol};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};

/// Who a connection authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    User(String),
    Anonymous,
}

/// What a connection's SASL exchange ended with: the principal, or why it was refused.
pub type Verdict = Arc<Mutex<Option<Result<Principal, String>>>>;

/// Who a connection's login attempts are counted against, and how its answers are delayed.
#[derive(Debug, Clone)]
pub struct LoginGuard {
    pub source: Source,
    pub throttle: Arc<LoginThrottle>,
    pub gate: Arc<Gate>,
}

#[derive(Clone)]
pub struct KeelSasl {
    users: Arc<keel_auth::Users>,
    allow_anonymous: bool,
    /// PLAIN sends the password as it is: offered only over TLS or from a loopback address
    /// (DESIGN §10), so a client cannot be talked into sending it across a network in clear.
    plain_allowed: bool,
    verdict: Verdict,
    guard: Option<LoginGuard>,
    /// A SCRAM-SHA-256 exchange in progress: (user, fe2o3's server side of it).
    scram: Option<(String, ScramAuthenticator<OneVerifier>)>,
}

/// SCRAM mechanism name (RFC 7677).
const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// The stored verifier of the one user a SCRAM exchange is about (looked up when it starts).
#[derive(Clone)]
struct OneVerifier {
    user: String,
    verifier: Option<keel_auth::scram::Verifier>,
    version: ScramVersion,
}

impl ScramCredentialProvider for OneVerifier {
    fn scram_version(&self) -> &ScramVersion {
        &self.version
    }

    fn get_stored_password<'a>(&'a self, username: &str) -> Option<StoredPassword<'a>> {
        let v = self.verifier.as_ref().filter(|_| username == self.user)?;
        Some(StoredPassword {
            salt: &v.salt,
            iterations: v.iterations,
            stored_key: &v.stored_key,
            server_key: &v.server_key,
        })
    }
}

/// The user of a SCRAM client-first message (`n,,n=USER,r=NONCE`, RFC 5802 §5.1: `=2C` and
/// `=3D` stand for `,` and `=`); None when it is not one.
fn scram_user(client_first: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(client_first).ok()?;
    let bare = text.strip_prefix("n,,")?;
    let name = bare.split(',').next()?.strip_prefix("n=")?;
    Some(name.replace("=2C", ",").replace("=3D", "="))
}

impl KeelSasl {
    pub fn new(users: Arc<keel_auth::Users>, allow_anonymous: bool) -> (KeelSasl, Verdict) {
        let verdict: Verdict = Arc::default();
        (
            KeelSasl {
                users,
                allow_anonymous,
                plain_allowed: true,
                verdict: verdict.clone(),
                guard: None,
                scram: None,
            },
            verdict,
        )
    }

    /// Counts this connection's failures and delays its answers (every real connection has
    /// one; unit tests of `decide` do without).
    pub fn guarded(mut self, guard: LoginGuard) -> KeelSasl {
        self.guard = Some(guard);
        self
    }

    /// Sets what the connection is: PLAIN is offered only when it is TLS or its peer is a
    /// loopback address.
    pub fn channel(mut self, tls: bool, peer: std::net::IpAddr) -> KeelSasl {
        self.plain_allowed = tls || peer.to_canonical().is_loopback();
        self
    }

    /// The user a SASL init claims to be ("" for ANONYMOUS or an unreadable response).
    fn claimed_user(init: &SaslInit) -> String {
        match (init.mechanism.0.as_str(), init.initial_response.as_ref()) {
            (SCRAM_SHA_256, Some(r)) => scram_user(r.as_ref()).unwrap_or_default(),
            ("PLAIN", Some(r)) => r
                .as_ref()
                .split(|b| *b == 0)
                .nth(1)
                .map(|u| String::from_utf8_lossy(u).into_owned())
                .unwrap_or_default(),
            _ => String::new(),
        }
    }

    fn decide(&self, init: &SaslInit) -> Result<Principal, String> {
        match init.mechanism.0.as_str() {
            "PLAIN" if !self.plain_allowed => Err(
                "SASL PLAIN is refused on a connection that is neither TLS nor from a loopback address (the password would cross the network in clear); connect with amqps://".into(),
            ),
            "PLAIN" => {
                let response = init
                    .initial_response
                    .as_ref()
                    .ok_or("SASL PLAIN without an initial response")?;
                // authzid NUL authcid NUL password (RFC 4616).
                let mut parts = response.as_ref().split(|b| *b == 0);
                let (_authz, user, password) = match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(u), Some(p)) => (a, u, p),
                    _ => return Err("malformed SASL PLAIN response".into()),
                };
                let (Ok(user), Ok(password)) = (std::str::from_utf8(user), std::str::from_utf8(password))
                else {
                    return Err("the SASL PLAIN user or password is not UTF-8".into());
                };
                // Argon2 takes tens of milliseconds by design: tell the runtime this worker
                // blocks, so other connections' tasks move to another one meanwhile.
                let check = || self.users.authenticate(user, password);
                let checked = match tokio::runtime::Handle::try_current() {
                    Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                        tokio::task::block_in_place(check)
                    }
                    _ => check(),
                };
                checked.map(|p| Principal::User(p.user))
            }
            "ANONYMOUS" if self.allow_anonymous => Ok(Principal::Anonymous),
            "ANONYMOUS" => Err("SASL ANONYMOUS is not allowed on any bus of this server".into()),
            other => Err(format!("SASL mechanism {other} is not offered")),
        }
    }
}

impl KeelSasl {
    /// The first step of SCRAM-SHA-256: throttled like PLAIN (the delay owed is served before
    /// the challenge), then fe2o3's server side with the user's stored verifier. A user
    /// without one (or unknown) fails at the proof, like a wrong password.
    fn scram_init(&mut self, init: SaslInit) -> SaslServerFrame {
        let user = Self::claimed_user(&init);
        if let Some(g) = &self.guard {
            match g.throttle.reserve(g.source, &user, Instant::now()) {
                Err(retry) => {
                    *self.verdict.lock().expect("sasl verdict lock") = Some(Err(format!(
                        "too many login attempts from {} as user {:?}: refused without being checked; retry in {} s",
                        g.source,
                        keel_core::budget::clip(&user, 64),
                        retry.as_secs() + 1
                    )));
                    return SaslServerFrame::Outcome(SaslOutcome {
                        code: SaslCode::Auth,
                        additional_data: None,
                    });
                }
                Ok(owed) if !owed.is_zero() => {
                    g.gate.close_until(tokio::time::Instant::now() + owed)
                }
                Ok(_) => {}
            }
        }
        let provider = OneVerifier {
            verifier: self.users.scram_or_decoy(&user).ok(),
            user: user.clone(),
            version: ScramVersion::Sha256,
        };
        let mut scram = ScramAuthenticator::new(provider);
        let frame = scram.on_init(init);
        if matches!(frame, SaslServerFrame::Challenge(_)) {
            self.scram = Some((user, scram));
        } else {
            if let Some(g) = &self.guard {
                g.throttle
                    .failed_and_logged(g.source, &user, Instant::now());
            }
            *self.verdict.lock().expect("sasl verdict lock") = Some(Err(format!(
                "wrong user or password for user {:?} (SCRAM-SHA-256)",
                keel_core::budget::clip(&user, 64)
            )));
        }
        frame
    }
}

impl SaslAcceptor for KeelSasl {
    fn mechanisms(&self) -> Array<Symbol> {
        // SCRAM first: the client proves it knows the password without sending it, so it is
        // offered on every connection, TLS or not.
        let mut m = vec![Symbol::from(SCRAM_SHA_256)];
        if self.plain_allowed {
            m.push(Symbol::from("PLAIN"));
        }
        if self.allow_anonymous {
            m.push(Symbol::from("ANONYMOUS"));
        }
        Array::from(m)
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        if init.mechanism.0.as_str() == SCRAM_SHA_256 {
            return self.scram_init(init);
        }
        let verdict = match &self.guard {
            None => self.decide(&init),
            Some(g) => {
                let now = Instant::now();
                let user = Self::claimed_user(&init);
                match g.throttle.reserve(g.source, &user, now) {
                    // Over the key's queue: refused without looking at the password.
                    Err(retry) => Err(format!(
                        "too many login attempts from {} as user {:?}: refused without being checked; retry in {} s",
                        g.source,
                        keel_core::budget::clip(&user, 64),
                        retry.as_secs() + 1
                    )),
                    Ok(owed) => {
                        if !owed.is_zero() {
                            g.gate.close_until(tokio::time::Instant::now() + owed);
                        }
                        let verdict = self.decide(&init);
                        if verdict.is_ok() {
                            g.throttle.succeeded(g.source, &user);
                        } else {
                            g.throttle.failed_and_logged(g.source, &user, now);
                        }
                        verdict
                    }
                }
            }
        };
        let code = if verdict.is_ok() {
            SaslCode::Ok
        } else {
            SaslCode::Auth
        };
        *self.verdict.lock().expect("sasl verdict lock") = Some(verdict);
        SaslServerFrame::Outcome(SaslOutcome {
            code,
            additional_data: None,
        })
    }

    fn on_response(&mut self, response: SaslResponse) -> SaslServerFrame {
        if let Some((user, mut scram)) = self.scram.take() {
            let frame = scram.on_response(response);
            let ok = matches!(&frame, SaslServerFrame::Outcome(o) if o.code == SaslCode::Ok);
            let verdict = if ok {
                Ok(Principal::User(user.clone()))
            } else {
                Err(format!(
                    "wrong user or password for user {user:?} (SCRAM-SHA-256)"
                ))
            };
            if let Some(g) = &self.guard {
                if ok {
                    g.throttle.succeeded(g.source, &user);
                } else {
                    g.throttle
                        .failed_and_logged(g.source, &user, Instant::now());
                }
            }
            *self.verdict.lock().expect("sasl verdict lock") = Some(verdict);
            return frame;
        }
        // PLAIN and ANONYMOUS have no second step.
        *self.verdict.lock().expect("sasl verdict lock") =
            Some(Err("unexpected SASL response".into()));
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Auth,
            additional_data: None,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn scram_user_names_are_unescaped() {
        assert_eq!(super::scram_user(b"n,,n=bob,r=abc").as_deref(), Some("bob"));
        assert_eq!(
            super::scram_user(b"n,,n=a=2Cb=3Dc,r=abc").as_deref(),
            Some("a,b=c")
        );
        assert_eq!(super::scram_user(b"p=tls-unique,,n=bob,r=abc"), None);
        assert_eq!(super::scram_user(b"n,,r=abc"), None);
    }

    use super::*;
    use fe2o3_amqp::types::primitives::Binary;

    fn init(mech: &str, resp: Option<&[u8]>) -> SaslInit {
        SaslInit {
            mechanism: Symbol::from(mech),
            initial_response: resp.map(|r| Binary::from(r.to_vec())),
            hostname: None,
        }
    }

    fn admin(password: &str) -> Arc<keel_auth::Users> {
        Arc::new(keel_auth::Users::admin_only(password).unwrap())
    }

    #[test]
    fn plain_checks_user_and_password_and_anonymous_needs_a_bus_that_allows_it() {
        let users = admin("s3cret");
        let (s, _) = KeelSasl::new(users.clone(), false);
        assert_eq!(
            s.decide(&init("PLAIN", Some(b"\0admin\0s3cret"))),
            Ok(Principal::User("admin".into()))
        );
        assert!(s.decide(&init("PLAIN", Some(b"\0admin\0wrong"))).is_err());
        assert!(s.decide(&init("PLAIN", Some(b"\0admin\0s3cretX"))).is_err());
        assert!(s.decide(&init("PLAIN", Some(b"garbage"))).is_err());
        assert!(s.decide(&init("PLAIN", None)).is_err());
        assert!(s.decide(&init("ANONYMOUS", None)).is_err());
        assert!(s.decide(&init("SCRAM-SHA-256", None)).is_err());
        let (a, _) = KeelSasl::new(users, true);
        assert_eq!(a.decide(&init("ANONYMOUS", None)), Ok(Principal::Anonymous));
        let offered: Vec<String> = a.mechanisms().0.iter().map(|m| m.0.clone()).collect();
        assert_eq!(offered, ["SCRAM-SHA-256", "PLAIN", "ANONYMOUS"]);
    }

    #[test]
    fn plain_is_offered_only_over_tls_or_from_loopback() {
        let users = admin("s3cret");
        let ok = init("PLAIN", Some(b"\0admin\0s3cret"));
        let remote: std::net::IpAddr = "198.18.0.2".parse().unwrap();
        let (s, _) = KeelSasl::new(users.clone(), false);
        let s = s.channel(false, remote);
        let e = s.decide(&ok).unwrap_err();
        assert!(e.contains("amqps://"), "{e}");
        let offered: Vec<String> = s.mechanisms().0.iter().map(|m| m.0.clone()).collect();
        assert_eq!(offered, ["SCRAM-SHA-256"], "PLAIN is not even offered");
        for (tls, peer) in [
            (true, remote),
            (false, "127.0.0.1".parse().unwrap()),
            (false, "::1".parse().unwrap()),
            (false, "::ffff:127.0.0.1".parse().unwrap()),
        ] {
            let (s, _) = KeelSasl::new(users.clone(), false);
            let s = s.channel(tls, peer);
            assert_eq!(
                s.decide(&ok),
                Ok(Principal::User("admin".into())),
                "{tls} {peer}"
            );
        }
    }
}
