//! SCRAM-SHA-256 verifiers (RFC 5802, RFC 7677) in PostgreSQL's textual form:
//! `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, base64. A verifier lets the
//! bus port check a client's proof without knowing the password, and a stolen verifier does
//! not give the password (only an offline guessing attack, 4 096 PBKDF2 rounds a guess).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::AuthError;

/// PBKDF2 rounds of a new verifier (RFC 7677's minimum, PostgreSQL's default).
pub const ITERATIONS: u32 = 4096;
/// Most rounds a stored verifier may ask for: a login costs this many HMACs.
pub const ITERATIONS_MAX: u32 = 1_000_000;
const PREFIX: &str = "SCRAM-SHA-256$";

/// A parsed verifier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

impl Verifier {
    /// The verifier of `password` with a fresh salt. The password is used as given (no
    /// SASLprep): Keel's clients send UTF-8 passwords as typed.
    pub fn new(password: &str) -> Result<Verifier, AuthError> {
        let mut salt = vec![0u8; 16];
        getrandom::fill(&mut salt).map_err(|e| AuthError::Random(e.to_string()))?;
        Ok(Verifier::with_salt(password, salt, ITERATIONS))
    }

    /// A verifier no password matches (random keys) with `salt`: what an exchange about an
    /// unknown user, or a user without a password, runs against, so it fails at the proof like
    /// a wrong password instead of telling at once that the user does not exist. The caller
    /// gives the same salt for the same name ([`crate::Users::scram_or_decoy`]), as a real
    /// user's salt stays the same between attempts.
    pub fn unmatchable(salt: &[u8]) -> Result<Verifier, AuthError> {
        let mut keys = [0u8; 64];
        getrandom::fill(&mut keys).map_err(|e| AuthError::Random(e.to_string()))?;
        Ok(Verifier {
            iterations: ITERATIONS,
            salt: salt.to_vec(),
            stored_key: keys[..32].to_vec(),
            server_key: keys[32..].to_vec(),
        })
    }

    fn with_salt(password: &str, salt: Vec<u8>, iterations: u32) -> Verifier {
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2::<Hmac<Sha256>>(password.as_bytes(), &salt, iterations, &mut salted)
            .expect("32 bytes is a valid PBKDF2 output length");
        let client_key = hmac(&salted, b"Client Key");
        Verifier {
            iterations,
            salt,
            stored_key: Sha256::digest(&client_key).to_vec(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// Parses the textual form; None for anything malformed.
    pub fn parse(text: &str) -> Option<Verifier> {
        let rest = text.strip_prefix(PREFIX)?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let iterations: u32 = iterations.parse().ok()?;
        let v = Verifier {
            iterations,
            salt: STANDARD.decode(salt).ok()?,
            stored_key: STANDARD.decode(stored).ok()?,
            server_key: STANDARD.decode(server).ok()?,
        };
        let sane = (1..=ITERATIONS_MAX).contains(&v.iterations)
            && !v.salt.is_empty()
            && v.stored_key.len() == 32
            && v.server_key.len() == 32;
        sane.then_some(v)
    }
}

impl std::fmt::Display for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{PREFIX}{}:{}${}:{}",
            self.iterations,
            STANDARD.encode(&self.salt),
            STANDARD.encode(&self.stored_key),
            STANDARD.encode(&self.server_key)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_matches_rfc7677_example() {
        // RFC 7677 section 3: user "user", password "pencil", salt "W22ZaJ0SNY7soEsUEjb6gQ==", 4096 rounds.
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let v = Verifier::with_salt("pencil", salt, 4096);
        // ServerSignature of the RFC's exchange, recomputed from ServerKey and AuthMessage.
        let auth_message = "n=user,r=rOprNGfwEbeRWgbNEkqO,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let signature = hmac(&v.server_key, auth_message.as_bytes());
        assert_eq!(
            STANDARD.encode(signature),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
        let text = v.to_string();
        assert!(text.starts_with("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$"));
        assert_eq!(Verifier::parse(&text), Some(v));
    }

    #[test]
    fn malformed_verifiers_are_refused() {
        let good = Verifier::new("pencil-pencil").unwrap().to_string();
        assert!(Verifier::parse(&good).is_some());
        for bad in [
            "",
            "SCRAM-SHA-256$",
            "SCRAM-SHA-1$4096:c2FsdA==$AAAA:AAAA",
            &good.replacen("4096", "0", 1),
            &good.replacen("4096", "99999999", 1),
            &good[..good.len() - 4],
        ] {
            assert_eq!(Verifier::parse(bad), None, "{bad}");
        }
    }
}
