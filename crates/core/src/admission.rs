//! Admission of connections that have not authenticated yet (DESIGN §10): a cap in total and
//! one per source, so one peer (or one process) that opens connections and never finishes its
//! login cannot take every slot from the others. Pure bookkeeping: the listeners decide what
//! a refusal does (close the socket, log once per burst). A [`Ticket`] holds one place and
//! frees it when dropped, so no path can leak a place.
//!
//! A *source* is the peer's IPv4 address, or the /64 prefix of its IPv6 address (one host is
//! routinely given a whole /64, so a per-address cap would be no cap at all).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The caps of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Unauthenticated connections at once, from all sources together.
    pub total_max: usize,
    /// Unauthenticated connections at once from one source.
    pub per_source_max: usize,
}

/// Who a connection is counted against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    /// The source of a peer address: IPv4 (also when mapped into IPv6) as is, IPv6 by its /64.
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => {
                    let bits = u128::from(v6) & !((1u128 << 64) - 1);
                    Source(IpAddr::V6(bits.into()))
                }
            },
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{max} connections that have not authenticated yet are open already")]
    Total { max: usize },
    #[error("{max} connections from {from} that have not authenticated yet are open already")]
    Source { from: Source, max: usize },
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_source: HashMap<Source, usize>,
}

/// The unauthenticated connections of one listener.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    counts: Mutex<Counts>,
}

/// One admitted connection's place; dropping it (authenticated, or gone) frees the place.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    source: Source,
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Admission> {
        assert!(limits.per_source_max >= 1 && limits.per_source_max <= limits.total_max);
        Arc::new(Admission {
            limits,
            counts: Mutex::default(),
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A place for a new connection from `ip`, or why there is none.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refusal> {
        let source = Source::of(ip);
        let mut c = self.counts.lock().expect("admission lock");
        if c.total >= self.limits.total_max {
            return Err(Refusal::Total {
                max: self.limits.total_max,
            });
        }
        let n = c.by_source.entry(source).or_insert(0);
        if *n >= self.limits.per_source_max {
            return Err(Refusal::Source {
                from: source,
                max: self.limits.per_source_max,
            });
        }
        *n += 1;
        c.total += 1;
        Ok(Ticket {
            admission: self.clone(),
            source,
        })
    }

    /// (connections in total, from `ip`'s source) now.
    pub fn counts(&self, ip: IpAddr) -> (usize, usize) {
        let c = self.counts.lock().expect("admission lock");
        let mine = c.by_source.get(&Source::of(ip)).copied().unwrap_or(0);
        (c.total, mine)
    }
}

impl Ticket {
    pub fn source(&self) -> Source {
        self.source
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut guard = self.admission.counts.lock().expect("admission lock");
        let c = &mut *guard;
        assert!(c.total >= 1);
        c.total -= 1;
        let n = c
            .by_source
            .get_mut(&self.source)
            .expect("an admitted source is counted");
        assert!(*n >= 1);
        *n -= 1;
        if *n == 0 {
            // Only sources with connections stay in the map: it is bounded by total_max.
            c.by_source.remove(&self.source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_per_source_and_in_total_and_tickets_give_places_back() {
        let a = Admission::new(Limits {
            total_max: 5,
            per_source_max: 3,
        });
        let first: Vec<Ticket> = (0..3).map(|_| a.admit(ip("127.0.0.2")).unwrap()).collect();
        assert!(matches!(
            a.admit(ip("127.0.0.2")),
            Err(Refusal::Source { max: 3, .. })
        ));
        // Another source still gets in, up to the total.
        let other: Vec<Ticket> = (0..2).map(|_| a.admit(ip("127.0.0.1")).unwrap()).collect();
        assert_eq!(
            a.admit(ip("127.0.0.3")).unwrap_err(),
            Refusal::Total { max: 5 }
        );
        assert_eq!(a.counts(ip("127.0.0.2")), (5, 3));
        drop(first);
        assert_eq!(a.counts(ip("127.0.0.2")), (2, 0));
        let _again = a.admit(ip("127.0.0.2")).unwrap();
        drop(other);
        assert_eq!(a.counts(ip("127.0.0.1")), (1, 0));
        assert_eq!(a.counts.lock().unwrap().by_source.len(), 1);
    }

    #[test]
    fn ipv6_sources_are_their_64_prefix_and_mapped_ipv4_is_ipv4() {
        assert_eq!(
            Source::of(ip("2001:db8:1:2:aaaa::1")),
            Source::of(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            Source::of(ip("2001:db8:1:2::1")),
            Source::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            Source::of(ip("::ffff:127.0.0.2")),
            Source::of(ip("127.0.0.2"))
        );
        assert_eq!(Source::of(ip("2001:db8::7")).to_string(), "2001:db8::/64");
    }
}
