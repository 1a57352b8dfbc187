//! Where plain TCP may be used (DESIGN §10): only on loopback. A listener on a non-loopback
//! address must be able to serve TLS (it needs a certificate) or it does not start, and a
//! plain (non-TLS) connection is served only when its peer is a loopback address; from
//! anywhere else it is closed before a byte of the protocol is answered. Every listener (the
//! bus port, the admin ports) applies these two rules, so no password, message or engine link
//! crosses a network in clear.

use std::net::{IpAddr, SocketAddr};

/// Whether a connection from `peer` may speak plain TCP.
pub fn plain_allowed(peer: IpAddr) -> bool {
    peer.to_canonical().is_loopback()
}

/// Why a listener may not be bound to `addr`, or None: a non-loopback address needs TLS.
/// `what` names the listener, `fix` says how to give it a certificate.
pub fn bind_problem(addr: SocketAddr, serves_tls: bool, what: &str, fix: &str) -> Option<String> {
    if serves_tls || addr.ip().to_canonical().is_loopback() {
        return None;
    }
    Some(format!(
        "{what} would listen on {addr}, which is not a loopback address, without TLS: plain TCP is allowed on loopback addresses only (passwords and messages would cross the network in clear); {fix}"
    ))
}

/// The sentence logged when a plain connection from elsewhere is closed.
pub fn plain_refusal(peer: SocketAddr) -> String {
    format!(
        "it connected from {} without TLS; plain TCP is served to loopback addresses only: use TLS (amqps://, https://)",
        peer.ip()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_only_on_loopback() {
        for ok in ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"] {
            assert!(plain_allowed(ok.parse().unwrap()), "{ok}");
        }
        for no in [
            "198.18.0.2",
            "10.0.0.1",
            "::ffff:198.18.0.2",
            "fe80::1",
            "0.0.0.0",
        ] {
            assert!(!plain_allowed(no.parse().unwrap()), "{no}");
        }
    }

    #[test]
    fn binding_elsewhere_needs_tls() {
        let lo: SocketAddr = "127.0.0.1:7272".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:7272".parse().unwrap();
        let host: SocketAddr = "198.18.0.2:7272".parse().unwrap();
        assert_eq!(bind_problem(lo, false, "the bus port", "fix"), None);
        assert_eq!(bind_problem(host, true, "the bus port", "fix"), None);
        for a in [any, host] {
            let p = bind_problem(
                a,
                false,
                "the bus port of server s1",
                "run `keel cert renew`",
            )
            .unwrap();
            assert!(
                p.contains("not a loopback address") && p.contains("keel cert renew"),
                "{p}"
            );
        }
    }
}
