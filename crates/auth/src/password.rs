//! Password hashes: Argon2id with the argon2 crate's default cost (19 MiB, 2 passes, 1 lane:
//! OWASP's baseline), written as PHC strings. The salt comes from the OS (`getrandom`).

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use crate::AuthError;

/// Shortest password `keel user add|passwd` accepts.
pub const MIN_PASSWORD_LEN: usize = 8;
/// Longest password accepted anywhere (HTTP Basic, SASL): hashing is costly, input is bounded.
pub const MAX_PASSWORD_LEN: usize = 1024;

/// Why a password chosen for a user is refused, or None.
pub fn password_problem(password: &str) -> Option<String> {
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_LEN {
        return Some(format!(
            "the password has {chars} characters; use at least {MIN_PASSWORD_LEN}"
        ));
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Some(format!(
            "the password is longer than {MAX_PASSWORD_LEN} bytes"
        ));
    }
    if password.chars().any(char::is_control) {
        return Some("the password holds a control character (a pasted newline?)".into());
    }
    None
}

/// The Argon2id PHC string of `password` with a fresh salt.
pub fn hash(password: &str) -> Result<String, AuthError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| AuthError::Random(e.to_string()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| AuthError::Hash(e.to_string()))?;
    let phc = Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| AuthError::Hash(e.to_string()))?
        .to_string();
    // Read back what will be stored: a hash that does not verify would lock the user out.
    debug_assert!(verify(&phc, password));
    Ok(phc)
}

/// Whether `password` matches the PHC string `phc` (false for a malformed string).
pub fn verify(phc: &str, password: &str) -> bool {
    if password.len() > MAX_PASSWORD_LEN {
        return false;
    }
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_password_only_and_salts_differ() {
        let a = hash("correct horse").unwrap();
        let b = hash("correct horse").unwrap();
        assert!(a.starts_with("$argon2id$"), "{a}");
        assert_ne!(a, b, "each hash has its own salt");
        assert!(verify(&a, "correct horse"));
        assert!(verify(&b, "correct horse"));
        assert!(!verify(&a, "correct hors"));
        assert!(!verify(&a, ""));
        assert!(!verify("not a hash", "correct horse"));
        assert!(!verify(&a, &"x".repeat(MAX_PASSWORD_LEN + 1)));
    }

    #[test]
    fn weak_passwords_are_named() {
        assert!(password_problem("short").is_some());
        assert!(password_problem("long enough\n").is_some());
        assert!(password_problem("long enough").is_none());
    }
}
