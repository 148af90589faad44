//! Where a replacement replica goes. Among the volume's spares, those that
//! qualify:
//! * alive: answered the last probe (so reachable, with the cluster secret);
//! * holding no replica of this volume (one node's death must not take two);
//! * with `free_bytes` ≥ the volume's size plus what this round already placed
//!   there (images are sparse, but a rebuild fills them);
//!
//! the one with the highest rendezvous score SipHash-1-3(volume, spare) wins.
//! Rendezvous ("highest random weight") hashing is deterministic (the same inputs
//! pick the same spare, after a restart too), spreads the volumes of a dead node
//! over the spares instead of piling them onto the emptiest (whose reported space
//! is from before this round), and moves few choices when a spare comes or goes.

use std::collections::BTreeMap;
use std::hash::Hasher;

use serde::{Deserialize, Serialize};
use wire::control::Capacity;

use crate::peer::Liveness;
use crate::PeerAddr;

/// A spare as the monitor last saw it.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub addr: &'a PeerAddr,
    /// `None`: not probed yet.
    pub liveness: Option<&'a Liveness>,
    /// From its last good probe.
    pub capacity: Option<Capacity>,
}

/// Why a spare was not taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "rejected", rename_all = "snake_case")]
pub enum Rejection {
    /// It holds (or is being given) a replica of this volume.
    HoldsReplica,
    /// Not probed yet (the daemon just started, or the spare was just added).
    NotProbed,
    /// Its last probe failed.
    Down,
    TooSmall {
        free_bytes: u64,
        need_bytes: u64,
    },
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::HoldsReplica => write!(f, "holds a replica of this volume"),
            Rejection::NotProbed => write!(f, "not probed yet"),
            Rejection::Down => write!(f, "not answering"),
            Rejection::TooSmall {
                free_bytes,
                need_bytes,
            } => write!(f, "{free_bytes} bytes free, {need_bytes} needed"),
        }
    }
}

/// No spare qualifies: each one with why (none at all: no spares configured).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoPlacement {
    pub rejected: Vec<(PeerAddr, Rejection)>,
}

impl std::fmt::Display for NoPlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.rejected.is_empty() {
            return write!(
                f,
                "no spares configured (add `spares` to the volume, then reload)"
            );
        }
        write!(f, "no spare qualifies: ")?;
        for (i, (a, r)) in self.rejected.iter().enumerate() {
            write!(f, "{}{a} {r}", if i > 0 { "; " } else { "" })?;
        }
        Ok(())
    }
}

/// The spare for a new replica of `volume` (`size` bytes); `in_use`: the peers
/// holding its replicas (the dead one included); `reserved`: bytes this round
/// already placed on each spare.
pub fn place(
    volume: &str,
    size: u64,
    spares: &[Candidate],
    in_use: &[&PeerAddr],
    reserved: &BTreeMap<PeerAddr, u64>,
) -> Result<PeerAddr, NoPlacement> {
    let mut rejected = Vec::new();
    let mut best: Option<(u64, &PeerAddr)> = None;
    for c in spares {
        let need = size + reserved.get(c.addr).copied().unwrap_or(0);
        let why = match (c.liveness, c.capacity) {
            _ if in_use.contains(&c.addr) => Some(Rejection::HoldsReplica),
            (None, _) => Some(Rejection::NotProbed),
            (Some(l), _) if *l != Liveness::Alive => Some(Rejection::Down),
            (_, None) => Some(Rejection::NotProbed),
            (_, Some(cap)) if cap.free_bytes < need => Some(Rejection::TooSmall {
                free_bytes: cap.free_bytes,
                need_bytes: need,
            }),
            _ => None,
        };
        match why {
            Some(r) => rejected.push((c.addr.clone(), r)),
            None => {
                let s = score(volume, c.addr);
                if best.is_none_or(|(b, a)| (s, c.addr) > (b, a)) {
                    best = Some((s, c.addr));
                }
            }
        }
    }
    best.map(|(_, a)| a.clone()).ok_or(NoPlacement { rejected })
}

/// Fixed keys: the same choice on every node and every version.
fn score(volume: &str, spare: &PeerAddr) -> u64 {
    let mut h =
        siphasher::sip::SipHasher13::new_with_keys(0x7562_6c6b_6468_6121, 0x7370_6172_6573_2121);
    h.write(volume.as_bytes());
    h.write_u8(0);
    h.write(spare.as_str().as_bytes());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u8) -> PeerAddr {
        PeerAddr::new(&format!("10.0.0.{n}:7450")).unwrap()
    }

    fn cap(free: u64) -> Option<Capacity> {
        Some(Capacity {
            total_bytes: 1 << 40,
            free_bytes: free,
        })
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn only_qualifying_spares_are_taken_and_the_rejections_say_why() {
        let (a4, a5, a6, a7, a8) = (addr(4), addr(5), addr(6), addr(7), addr(8));
        let alive = Liveness::Alive;
        let down = Liveness::Suspected {
            since: crate::UnixMs(0),
            why: crate::peer::ProbeFailure::Refused,
        };
        let spares = [
            Candidate {
                addr: &a4,
                liveness: Some(&alive),
                capacity: cap(100 * GIB),
            },
            Candidate {
                addr: &a5,
                liveness: Some(&down),
                capacity: cap(100 * GIB),
            },
            Candidate {
                addr: &a6,
                liveness: None,
                capacity: None,
            },
            Candidate {
                addr: &a7,
                liveness: Some(&alive),
                capacity: cap(GIB),
            },
            Candidate {
                addr: &a8,
                liveness: Some(&alive),
                capacity: cap(100 * GIB),
            },
        ];
        let none = BTreeMap::new();
        // a8 holds a replica already: a4 is the only one left.
        assert_eq!(
            place("vol0", 10 * GIB, &spares, &[&a8], &none),
            Ok(a4.clone())
        );
        let err = place("vol0", 10 * GIB, &spares, &[&a8, &a4], &none).unwrap_err();
        assert_eq!(
            err.rejected,
            [
                (a4.clone(), Rejection::HoldsReplica),
                (a5.clone(), Rejection::Down),
                (a6.clone(), Rejection::NotProbed),
                (
                    a7.clone(),
                    Rejection::TooSmall {
                        free_bytes: GIB,
                        need_bytes: 10 * GIB
                    }
                ),
                (a8.clone(), Rejection::HoldsReplica),
            ]
        );
        let text = err.to_string();
        assert!(
            text.contains("10.0.0.7:7450 1073741824 bytes free"),
            "{text}"
        );
        // What this round placed already counts against the space.
        let reserved = BTreeMap::from([(a4.clone(), 95 * GIB)]);
        assert!(place("vol0", 10 * GIB, &spares, &[&a8], &reserved).is_err());
        let e = place("vol0", 1, &[], &[], &none).unwrap_err();
        assert!(e.to_string().contains("no spares configured"), "{e}");
    }

    #[test]
    fn the_choice_is_deterministic_and_spreads_volumes_over_the_spares() {
        let addrs: Vec<PeerAddr> = (10..14).map(addr).collect();
        let alive = Liveness::Alive;
        let spares: Vec<Candidate> = addrs
            .iter()
            .map(|a| Candidate {
                addr: a,
                liveness: Some(&alive),
                capacity: cap(1 << 50),
            })
            .collect();
        let none = BTreeMap::new();
        let mut per_spare = BTreeMap::new();
        for v in 0..400 {
            let name = format!("vol{v}");
            let p = place(&name, GIB, &spares, &[], &none).unwrap();
            // Same inputs, same answer; the order of the list does not matter.
            let mut rev = spares.clone();
            rev.reverse();
            assert_eq!(place(&name, GIB, &rev, &[], &none).unwrap(), p);
            *per_spare.entry(p).or_insert(0) += 1;
        }
        assert_eq!(per_spare.len(), 4);
        for (a, n) in &per_spare {
            assert!((60..=140).contains(n), "{a}: {n} of 400");
        }
        // A spare going away moves only the volumes that were on it.
        let moved = (0..400)
            .filter(|v| {
                let name = format!("vol{v}");
                let before = place(&name, GIB, &spares, &[], &none).unwrap();
                let after = place(&name, GIB, &spares[1..], &[], &none).unwrap();
                before != after
            })
            .count();
        assert_eq!(moved, per_spare[&addrs[0]]);
    }
}
