//! Link credentials: proof that the engine opening a link belongs to the same bus.
//!
//! Each engine's `Open` frame carries `credential_proof` = the time it was made (u64 big-endian,
//! Unix ms) followed by HMAC-SHA-256 over that time, the bus, the engine's name and UUID, under
//! the bus's link key. The receiver recomputes it and refuses a wrong MAC or a time further
//! than [`PROOF_SKEW_MS`] from its own clock (so a captured `Open` replays for at most that
//! long). The key never travels; [`link_key`] derives it per bus from a secret the engines
//! share (the profile's admin credential), so one bus's proof is worthless on another.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// How far a proof's time may be from the receiver's clock.
pub const PROOF_SKEW_MS: u64 = 120_000;
const TIME_BYTES: usize = 8;
const MAC_BYTES: usize = 32;

/// Why a proof was refused (the receiver logs it and closes the link).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("the credential proof has {0} bytes, not {TIME_BYTES} + {MAC_BYTES}")]
    Length(usize),
    #[error("the credential proof was made {skew_ms} ms away from this server's clock (at most {PROOF_SKEW_MS} allowed): check the clocks, or a proof is being replayed")]
    Stale { skew_ms: u64 },
    #[error("the credential does not match this bus's link key: the engine belongs to another profile or bus")]
    Mismatch,
}

/// The link key of `bus`, derived from the shared secret.
pub fn link_key(shared_secret: &[u8], bus: &str) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(shared_secret).expect("HMAC takes any key");
    mac.update(b"keel bus link key v1\0");
    mac.update(bus.as_bytes());
    mac.finalize().into_bytes().into()
}

fn mac_of(key: &[u8; 32], time_ms: u64, bus: &str, me: &str, me_uuid: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(&time_ms.to_be_bytes());
    // Each field ends with a NUL so ("ab","c") and ("a","bc") differ; names hold no NUL.
    for field in [bus, me, me_uuid] {
        mac.update(field.as_bytes());
        mac.update(b"\0");
    }
    mac
}

/// The proof an engine sends in its `Open`.
pub fn make_proof(key: &[u8; 32], time_ms: u64, bus: &str, me: &str, me_uuid: &str) -> Vec<u8> {
    let tag = mac_of(key, time_ms, bus, me, me_uuid)
        .finalize()
        .into_bytes();
    let mut out = Vec::with_capacity(TIME_BYTES + MAC_BYTES);
    out.extend_from_slice(&time_ms.to_be_bytes());
    out.extend_from_slice(&tag);
    assert_eq!(out.len(), TIME_BYTES + MAC_BYTES);
    out
}

/// Checks a received proof against the claimed bus, engine and UUID at `now_ms`.
pub fn verify_proof(
    key: &[u8; 32],
    proof: &[u8],
    now_ms: u64,
    bus: &str,
    me: &str,
    me_uuid: &str,
) -> Result<(), ProofError> {
    if proof.len() != TIME_BYTES + MAC_BYTES {
        return Err(ProofError::Length(proof.len()));
    }
    let (time, tag) = proof.split_at(TIME_BYTES);
    let time_ms = u64::from_be_bytes(time.try_into().expect("8 bytes"));
    // The MAC first: a stale proof with a wrong key says "wrong key", which is what to fix.
    mac_of(key, time_ms, bus, me, me_uuid)
        .verify_slice(tag)
        .map_err(|_| ProofError::Mismatch)?;
    let skew_ms = now_ms.abs_diff(time_ms);
    if skew_ms > PROOF_SKEW_MS {
        return Err(ProofError::Stale { skew_ms });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 1_764_000_000_000;

    #[test]
    fn a_proof_verifies_only_for_its_bus_engine_key_and_time() {
        let key = link_key(b"secret", "bus1");
        let p = make_proof(&key, NOW, "bus1", "n.s-bus1", "u1");
        assert_eq!(
            verify_proof(&key, &p, NOW + 1_000, "bus1", "n.s-bus1", "u1"),
            Ok(())
        );
        assert_eq!(
            verify_proof(&key, &p, NOW, "bus2", "n.s-bus1", "u1"),
            Err(ProofError::Mismatch)
        );
        assert_eq!(
            verify_proof(&key, &p, NOW, "bus1", "n.t-bus1", "u1"),
            Err(ProofError::Mismatch)
        );
        assert_eq!(
            verify_proof(&key, &p, NOW, "bus1", "n.s-bus1", "u2"),
            Err(ProofError::Mismatch)
        );
        let other = link_key(b"other secret", "bus1");
        assert_eq!(
            verify_proof(&other, &p, NOW, "bus1", "n.s-bus1", "u1"),
            Err(ProofError::Mismatch)
        );
        assert_ne!(link_key(b"secret", "bus2"), key, "one key per bus");
        assert_eq!(
            verify_proof(&key, &p, NOW + PROOF_SKEW_MS + 1, "bus1", "n.s-bus1", "u1"),
            Err(ProofError::Stale {
                skew_ms: PROOF_SKEW_MS + 1
            })
        );
        assert_eq!(
            verify_proof(&key, &p[..10], NOW, "bus1", "n.s-bus1", "u1"),
            Err(ProofError::Length(10))
        );
    }

    proptest! {
        /// Any change to a proof's bytes makes it fail (never panic).
        #[test]
        fn a_damaged_proof_is_refused(i in 0usize..40, x in 1u8..=255) {
            let key = link_key(b"secret", "bus1");
            let mut p = make_proof(&key, NOW, "bus1", "me", "u");
            p[i] ^= x;
            prop_assert!(verify_proof(&key, &p, NOW, "bus1", "me", "u").is_err());
        }
    }
}
