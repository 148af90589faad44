//! One peer's liveness as the monitor sees it through its probes (connect,
//! authenticate with the cluster secret, STAT: a reply proves the server process
//! runs and answers, not only that the host is up).
//!
//! ```text
//!                 probe fails               still failing `grace` later
//!   ┌─────▶ Alive ───────────▶ Suspected ─────────────────────────────▶ Dead
//!   │         ▲    probe ok       │                                      │
//!   │         └───────────────────┘                                      │
//!   └───────────────────── `rejoin_oks` probes ok in a row ──────────────┘
//! ```
//!
//! The hysteresis is the point: one good probe clears a suspicion (a peer that
//! answers at least once per `grace` is never declared dead, however often it
//! stalls), and a dead peer must answer `rejoin_oks` probes in a row before it
//! counts as back (a peer flapping after its death does not keep cancelling and
//! restarting its replacement).

use serde::{Deserialize, Serialize};
use wire::control::Capacity;

use crate::UnixMs;

/// Why a probe failed: typed, so that "the server process is gone" (refused: the
/// host answers) reads differently from "the host is unreachable".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "failure", rename_all = "snake_case")]
pub enum ProbeFailure {
    /// The host refused the connection: it is up, no server listens.
    Refused,
    /// No connection in time, or no route: the host is down or cut off.
    Unreachable { error: String },
    /// Connected, but no reply in time: the server is stopped or stuck.
    NoReply,
    /// The server answered but refused us (cluster secret, protocol version).
    Rejected { error: String },
}

impl std::fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeFailure::Refused => write!(f, "connection refused (host up, no server)"),
            ProbeFailure::Unreachable { error } => write!(f, "unreachable ({error})"),
            ProbeFailure::NoReply => write!(f, "connected but no reply in time"),
            ProbeFailure::Rejected { error } => write!(f, "refused us ({error})"),
        }
    }
}

/// What one probe of a peer found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// It answered a STAT; its storage has this much space.
    Answered {
        capacity: Capacity,
    },
    Failed(ProbeFailure),
}

/// The liveness rules (`[ha]` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerRules {
    /// A peer failing its probes this long is dead.
    pub grace_ms: u64,
    /// Good probes in a row that bring a dead peer back.
    pub rejoin_oks: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "liveness", rename_all = "snake_case")]
pub enum Liveness {
    Alive,
    /// Failing since `since`; not yet for `grace`.
    Suspected {
        since: UnixMs,
        why: ProbeFailure,
    },
    /// Failed for `grace`; `oks` good probes in a row since.
    Dead {
        since: UnixMs,
        why: ProbeFailure,
        oks: u32,
    },
}

/// A change worth an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerChange {
    Suspected(ProbeFailure),
    /// Failing since `since`.
    Died {
        since: UnixMs,
        why: ProbeFailure,
    },
    /// Back after `down_ms` (from its first failed probe).
    Returned {
        down_ms: u64,
    },
    /// Suspected, then answered: never declared dead.
    Cleared,
}

impl Liveness {
    pub fn name(&self) -> &'static str {
        match self {
            Liveness::Alive => "alive",
            Liveness::Suspected { .. } => "suspected",
            Liveness::Dead { .. } => "dead",
        }
    }

    pub fn is_dead(&self) -> bool {
        matches!(self, Liveness::Dead { .. })
    }

    /// The transitions of the diagram above (staying in a state is always allowed).
    pub fn can_become(&self, next: &Liveness) -> bool {
        use Liveness::*;
        matches!(
            (self, next),
            (Alive, Alive | Suspected { .. })
                | (Suspected { .. }, Alive | Suspected { .. } | Dead { .. })
                | (Dead { .. }, Dead { .. } | Alive)
        )
    }

    /// The liveness after `probe` at `now`, and the change if any.
    pub fn after(
        &self,
        probe: &Probe,
        now: UnixMs,
        rules: PeerRules,
    ) -> (Liveness, Option<PeerChange>) {
        use Liveness::*;
        let next = match (self, probe) {
            (Alive, Probe::Answered { .. }) => (Alive, None),
            (Alive, Probe::Failed(why)) => (
                Suspected {
                    since: now,
                    why: why.clone(),
                },
                Some(PeerChange::Suspected(why.clone())),
            ),
            (Suspected { .. }, Probe::Answered { .. }) => (Alive, Some(PeerChange::Cleared)),
            (Suspected { since, .. }, Probe::Failed(why))
                if now.since(*since) >= rules.grace_ms =>
            {
                (
                    Dead {
                        since: *since,
                        why: why.clone(),
                        oks: 0,
                    },
                    Some(PeerChange::Died {
                        since: *since,
                        why: why.clone(),
                    }),
                )
            }
            (Suspected { since, .. }, Probe::Failed(why)) => (
                Suspected {
                    since: *since,
                    why: why.clone(),
                },
                None,
            ),
            (Dead { since, oks, .. }, Probe::Answered { .. }) if oks + 1 >= rules.rejoin_oks => (
                Alive,
                Some(PeerChange::Returned {
                    down_ms: now.since(*since),
                }),
            ),
            (Dead { since, why, oks }, Probe::Answered { .. }) => (
                Dead {
                    since: *since,
                    why: why.clone(),
                    oks: oks + 1,
                },
                None,
            ),
            (Dead { since, .. }, Probe::Failed(why)) => (
                Dead {
                    since: *since,
                    why: why.clone(),
                    oks: 0,
                },
                None,
            ),
        };
        debug_assert!(self.can_become(&next.0), "{self:?} -> {:?}", next.0);
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: PeerRules = PeerRules {
        grace_ms: 5000,
        rejoin_oks: 3,
    };

    fn ok() -> Probe {
        Probe::Answered {
            capacity: Capacity {
                total_bytes: 1 << 30,
                free_bytes: 1 << 29,
            },
        }
    }

    fn fail() -> Probe {
        Probe::Failed(ProbeFailure::Refused)
    }

    /// Runs probes (at the given ms) from Alive; the liveness names after each.
    fn run(probes: &[(u64, Probe)]) -> Vec<&'static str> {
        let mut l = Liveness::Alive;
        probes
            .iter()
            .map(|(t, p)| {
                l = l.after(p, UnixMs(*t), RULES).0;
                l.name()
            })
            .collect()
    }

    #[test]
    fn liveness_follows_the_probes_with_hysteresis() {
        type Case<'a> = (&'a str, Vec<(u64, Probe)>, &'a [&'a str]);
        let flapping = ["suspected", "alive"].repeat(10);
        let table: &[Case] = &[
            ("steady", vec![(0, ok()), (1000, ok())], &["alive", "alive"]),
            (
                "dead once failing for the grace",
                vec![(0, fail()), (4999, fail()), (5000, fail())],
                &["suspected", "suspected", "dead"],
            ),
            (
                "one good probe clears a suspicion",
                vec![(0, fail()), (4000, ok()), (6000, fail()), (10000, fail())],
                &["suspected", "alive", "suspected", "suspected"],
            ),
            (
                "stop/cont every second: never dead",
                (0..20)
                    .map(|i| (i * 1000, if i % 2 == 0 { fail() } else { ok() }))
                    .collect(),
                &flapping,
            ),
            (
                "a dead peer needs rejoin_oks good probes in a row",
                vec![
                    (0, fail()),
                    (5000, fail()),
                    (6000, ok()),
                    (7000, ok()),
                    (8000, fail()),
                    (9000, ok()),
                    (10000, ok()),
                    (11000, ok()),
                ],
                &[
                    "suspected",
                    "dead",
                    "dead",
                    "dead",
                    "dead",
                    "dead",
                    "dead",
                    "alive",
                ],
            ),
        ];
        for (name, probes, want) in table {
            assert_eq!(run(probes), *want, "{name}");
        }
    }

    #[test]
    fn changes_say_when_the_peer_failed_first_and_how_long_it_was_down() {
        let mut l = Liveness::Alive;
        let mut changes = Vec::new();
        for (t, p) in [
            (100, fail()),
            (5100, fail()),
            (9000, ok()),
            (10000, ok()),
            (11000, ok()),
        ] {
            let (next, c) = l.after(&p, UnixMs(t), RULES);
            l = next;
            changes.extend(c);
        }
        assert_eq!(
            changes,
            [
                PeerChange::Suspected(ProbeFailure::Refused),
                PeerChange::Died {
                    since: UnixMs(100),
                    why: ProbeFailure::Refused
                },
                PeerChange::Returned { down_ms: 10900 },
            ]
        );
    }

    #[test]
    fn can_become_is_the_diagram() {
        let s = || Liveness::Suspected {
            since: UnixMs(0),
            why: ProbeFailure::NoReply,
        };
        let d = || Liveness::Dead {
            since: UnixMs(0),
            why: ProbeFailure::NoReply,
            oks: 0,
        };
        let a = || Liveness::Alive;
        for (from, to, allowed) in [
            (a(), s(), true),
            (a(), d(), false),
            (s(), a(), true),
            (s(), d(), true),
            (d(), a(), true),
            (d(), s(), false),
        ] {
            assert_eq!(from.can_become(&to), allowed, "{from:?} -> {to:?}");
        }
    }
}
