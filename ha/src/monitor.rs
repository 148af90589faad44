//! The monitor's `select → apply` loop. The daemon applies probe results
//! ([`Monitor::probed`]) and the outcome of what it carried out
//! ([`Monitor::failed`], [`Monitor::succeeded`]); [`Monitor::select`] looks at the
//! volumes as they are now and says what to do. The volumes' records own the
//! replacements in progress (they survive a restart); the monitor owns only what
//! it may forget on a restart: peers' liveness, backoffs, the reasons it waits.
//!
//! Rules, in the order `select` applies them to each replica of each volume:
//! 1. A replacement in progress whose old replica came back (its server alive,
//!    partially rebuildable) and lacks fewer bytes than the new one still does is
//!    abandoned: the new one is dropped, the old one caught up by a partial
//!    rebuild. Fewer bytes copied is sooner redundant, and the config keeps
//!    matching the running set. (Otherwise the replacement goes on and the old
//!    one is dropped once the new one is online.)
//! 2. A replica needs a replacement when its server is dead (failing probes for
//!    `grace`), or when its storage failed (a media error) and it stayed faulted
//!    for `grace` while its server answers: that replica alone.
//! 3. It gets one only if some other replica is online (a rebuild source), no
//!    other replacement of the volume is in progress (one at a time: the second
//!    would copy from a volume about to change again), fewer than
//!    `max_concurrent` are in progress on the node, its backoff after a failed
//!    attempt is over, automatic decisions are not paused, and a spare qualifies
//!    ([`crate::placement`]). Otherwise the reason it waits is kept for status.

use std::collections::{BTreeMap, BTreeSet};

use replication::state::FaultReason;
use serde::{Deserialize, Serialize};
use wire::control::Capacity;

use crate::event::{Event, EventKind, ReplaceReason};
use crate::peer::{Liveness, PeerChange, PeerRules, Probe};
use crate::placement::{place, Candidate, NoPlacement};
use crate::{PeerAddr, UnixMs};

/// `[ha]` in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    pub peer: PeerRules,
    /// Replacements in progress at once on this node.
    pub max_concurrent: usize,
    /// Backoff after a failed replacement: first delay, doubled up to the max.
    pub backoff_first_ms: u64,
    pub backoff_max_ms: u64,
    /// A flapping peer's suspicions are reported at most this often.
    pub report_every_ms: u64,
    /// A server the volumes only may use (a spare, a replaced replica's) is probed
    /// this often while nothing needs a replacement (see [`Monitor::to_probe`]).
    pub idle_probe_every_ms: u64,
}

/// A volume as the daemon sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeView {
    pub name: String,
    pub size: u64,
    pub spares: Vec<PeerAddr>,
    pub slots: Vec<SlotView>,
    /// Replacements in progress, from the volume's record.
    pub replacing: Vec<Replacing>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replacing {
    pub old: String,
    pub new: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotView {
    /// `id@host:port` or a path.
    pub location: String,
    /// Its server (`None`: a local replica).
    pub peer: Option<PeerAddr>,
    pub cond: SlotCond,
}

/// What the monitor needs of a replica's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotCond {
    Online,
    /// Waited for as possibly the only current copy.
    Connecting,
    Rebuilding {
        remaining_bytes: u64,
        partial: bool,
    },
    /// `missing_bytes`: what its dirty map says it lacks (`None`: no map, a full
    /// rebuild); `reachable`: its connection is up again.
    Faulted {
        reason: FaultReason,
        missing_bytes: Option<u64>,
        reachable: bool,
    },
}

/// What to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Make a new replica on `to` and swap it in for `old`.
    Replace {
        volume: String,
        old: String,
        to: PeerAddr,
        reason: ReplaceReason,
    },
    /// Drop the half-built `new`; `old` is caught up instead.
    Abandon {
        volume: String,
        old: String,
        new: String,
    },
}

/// Why a replica that needs a replacement does not get one yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "waiting", rename_all = "snake_case")]
pub enum Waiting {
    Paused,
    /// Its server is in maintenance (a planned reboot): its replicas are caught up
    /// when it is back, not replaced; until `until` (`None`: until it is ended).
    Maintenance {
        until: Option<UnixMs>,
    },
    /// No other replica is online to copy from.
    NoSource,
    /// Another replacement of this volume is in progress.
    VolumeBusy,
    /// `max_concurrent` replacements are in progress on this node.
    NodeBusy {
        max_concurrent: usize,
    },
    /// The last attempt failed; the next one at `until`.
    Backoff {
        until: UnixMs,
    },
    NoPlacement {
        why: NoPlacement,
    },
}

impl std::fmt::Display for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Waiting::Paused => write!(f, "HA is paused (ublkctl ha resume)"),
            Waiting::Maintenance { until } => {
                write!(f, "its server is in maintenance")?;
                if let Some(t) = until {
                    write!(f, " until {} ms", t.0)?;
                }
                write!(f, " (ublkctl ha maintenance end SERVER)")
            }
            Waiting::NoSource => write!(f, "no other replica is online to rebuild from"),
            Waiting::VolumeBusy => write!(f, "another replacement of this volume is in progress"),
            Waiting::NodeBusy { max_concurrent } => {
                write!(
                    f,
                    "{max_concurrent} replacements in progress on this node ([ha] max_concurrent)"
                )
            }
            Waiting::Backoff { until } => {
                write!(f, "the last attempt failed; next one at {} ms", until.0)
            }
            Waiting::NoPlacement { why } => write!(f, "{why}"),
        }
    }
}

/// What the monitor knows of a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerView {
    pub liveness: Liveness,
    /// From its last good probe.
    pub capacity: Option<Capacity>,
    /// When a suspicion of it was last reported, and how many were not since.
    #[serde(skip)]
    reported: Option<(UnixMs, u32)>,
    /// When it was last probed.
    #[serde(skip)]
    probed: Option<UnixMs>,
}

/// How this node's volumes use a server, for the probe plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerUse {
    pub peer: PeerAddr,
    /// A replica connection to it is up: that connection's pings (each answered
    /// within the I/O deadline, or the connection is dropped) say it lives.
    pub connected: bool,
    /// A replica of a volume lives there (not only a spare or a replaced one).
    pub holds_replica: bool,
    /// A volume may place a replacement there: its space must be fresh news.
    pub spare: bool,
}

#[derive(Debug, Clone)]
struct Backoff {
    until: UnixMs,
    delay_ms: u64,
    /// Spares an attempt failed on: the next attempts go elsewhere while another
    /// one qualifies (a spare that cannot take the replica is not retried forever).
    failed_on: BTreeSet<PeerAddr>,
}

type Key = (String, String);

pub struct Monitor {
    rules: Rules,
    paused: bool,
    peers: BTreeMap<PeerAddr, PeerView>,
    backoff: BTreeMap<Key, Backoff>,
    /// When a replica was first seen with a media error (its grace).
    media_since: BTreeMap<Key, UnixMs>,
    waiting: BTreeMap<Key, (ReplaceReason, Waiting)>,
    /// Servers in maintenance, each until when (`None`: until it is ended).
    maintenance: BTreeMap<PeerAddr, Option<UnixMs>>,
}

impl Monitor {
    pub fn new(rules: Rules, paused: bool) -> Monitor {
        Monitor {
            rules,
            paused,
            peers: BTreeMap::new(),
            backoff: BTreeMap::new(),
            media_since: BTreeMap::new(),
            waiting: BTreeMap::new(),
            maintenance: BTreeMap::new(),
        }
    }

    /// Put `peer` in maintenance (a planned reboot) until `until` (`None`: until
    /// [`Monitor::end_maintenance`]): its replicas are not replaced meanwhile, and no
    /// replacement is placed on it.
    pub fn start_maintenance(&mut self, peer: PeerAddr, until: Option<UnixMs>) {
        self.maintenance.insert(peer, until);
    }

    /// Whether `peer` was in maintenance.
    pub fn end_maintenance(&mut self, peer: &PeerAddr) -> bool {
        self.maintenance.remove(peer).is_some()
    }

    /// The servers in maintenance at `now` (those whose time ran out are dropped).
    pub fn maintenance(&mut self, now: UnixMs) -> &BTreeMap<PeerAddr, Option<UnixMs>> {
        self.maintenance
            .retain(|_, until| until.is_none_or(|t| now < t));
        &self.maintenance
    }

    fn in_maintenance(&self, peer: Option<&PeerAddr>, now: UnixMs) -> Option<Option<UnixMs>> {
        let until = *self.maintenance.get(peer?)?;
        until.is_none_or(|t| now < t).then_some(until)
    }

    pub fn set_rules(&mut self, rules: Rules) {
        self.rules = rules;
    }

    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    pub fn paused(&self) -> bool {
        self.paused
    }

    pub fn peers(&self) -> &BTreeMap<PeerAddr, PeerView> {
        &self.peers
    }

    /// Why each replica needing a replacement waits: (volume, replica) → why.
    pub fn waiting(&self) -> &BTreeMap<Key, (ReplaceReason, Waiting)> {
        &self.waiting
    }

    /// Forget the peers no longer used or offered as spares (after a reload).
    pub fn retain_peers(&mut self, keep: &BTreeSet<PeerAddr>) {
        self.peers.retain(|p, _| keep.contains(p));
    }

    /// Apply a probe of `peer`: its new liveness, and the events it is worth.
    pub fn probed(&mut self, peer: &PeerAddr, probe: &Probe, now: UnixMs) -> Vec<Event> {
        let rules = self.rules;
        let view = self.peers.entry(peer.clone()).or_insert(PeerView {
            liveness: Liveness::Alive,
            capacity: None,
            reported: None,
            probed: None,
        });
        view.probed = Some(now);
        if let Probe::Answered { capacity } = probe {
            view.capacity = Some(*capacity);
        }
        let (next, change) = view.liveness.after(probe, now, rules.peer);
        view.liveness = next;
        let event = |kind| Event {
            at: now,
            volume: None,
            replica: None,
            kind,
        };
        let kind = match change {
            None | Some(PeerChange::Cleared) => None,
            Some(PeerChange::Suspected(why)) => match view.reported {
                Some((at, n)) if now.since(at) < rules.report_every_ms => {
                    view.reported = Some((at, n + 1));
                    None
                }
                r => {
                    view.reported = Some((now, 0));
                    Some(EventKind::PeerSuspected {
                        peer: peer.clone(),
                        why,
                        repeats: r.map_or(0, |(_, n)| n),
                    })
                }
            },
            Some(PeerChange::Died { since, why }) => Some(EventKind::PeerDead {
                peer: peer.clone(),
                why,
                since,
            }),
            Some(PeerChange::Returned { down_ms }) => Some(EventKind::PeerReturned {
                peer: peer.clone(),
                down_ms,
            }),
        };
        kind.map(event).into_iter().collect()
    }

    /// The servers to probe now. A probe is a new connection and a handshake on
    /// both sides, so an idle node makes none it can do without:
    /// - a server never probed, or suspected or dead, is probed every round;
    /// - a spare (its free space decides a placement) every round while a replica
    ///   of this node is in trouble (faulted, connecting, waiting for a
    ///   replacement, or on a server not alive), else every `idle_probe_every_ms`;
    /// - otherwise one with a replica connection up is not: the connection's pings
    ///   prove it (its death is seen when a ping misses the I/O deadline, then it is
    ///   probed);
    /// - one holding a replica without a connection is probed every round;
    /// - any other (a replaced replica's server) every round while a replica is in
    ///   trouble, else every `idle_probe_every_ms`.
    pub fn to_probe(&self, now: UnixMs, uses: &[PeerUse], volumes: &[VolumeView]) -> Vec<PeerAddr> {
        // Only the servers holding replicas count: a replaced replica's server that
        // stays dead for good must not keep every spare probed every round.
        let attention = !self.waiting.is_empty()
            || uses.iter().any(|u| {
                u.holds_replica
                    && self
                        .peers
                        .get(&u.peer)
                        .is_some_and(|v| v.liveness != Liveness::Alive)
            })
            || volumes.iter().any(|v| {
                !v.replacing.is_empty()
                    || v.slots
                        .iter()
                        .any(|s| matches!(s.cond, SlotCond::Faulted { .. } | SlotCond::Connecting))
            });
        let stale = |v: &PeerView| {
            v.probed
                .is_none_or(|at| now.since(at) >= self.rules.idle_probe_every_ms)
        };
        uses.iter()
            .filter(|u| match self.peers.get(&u.peer) {
                None => true,
                Some(v) if v.probed.is_none() || v.liveness != Liveness::Alive => true,
                Some(v) if u.spare => attention || stale(v),
                Some(_) if u.connected => false,
                Some(_) if u.holds_replica => true,
                Some(v) => attention || stale(v),
            })
            .map(|u| u.peer.clone())
            .collect()
    }

    /// A replacement of `old` in `volume` on spare `on` failed: wait before the
    /// next attempt, and make it elsewhere if another spare qualifies. Returns the
    /// delay.
    pub fn failed(&mut self, volume: &str, old: &str, on: &PeerAddr, now: UnixMs) -> u64 {
        let key = (volume.to_string(), old.to_string());
        let (delay_ms, mut failed_on) = match self.backoff.remove(&key) {
            Some(b) => ((b.delay_ms * 2).min(self.rules.backoff_max_ms), b.failed_on),
            None => (self.rules.backoff_first_ms, BTreeSet::new()),
        };
        failed_on.insert(on.clone());
        self.backoff.insert(
            key,
            Backoff {
                until: now.plus_ms(delay_ms),
                delay_ms,
                failed_on,
            },
        );
        delay_ms
    }

    /// A replacement of `old` went through: no more backoff for it.
    pub fn succeeded(&mut self, volume: &str, old: &str) {
        self.backoff.remove(&(volume.to_string(), old.to_string()));
    }

    /// The volume's spares as placement sees them, and the servers it already uses.
    fn candidates<'a>(&'a self, v: &'a VolumeView) -> (Vec<Candidate<'a>>, Vec<&'a PeerAddr>) {
        let candidates = v
            .spares
            .iter()
            .map(|a| Candidate {
                addr: a,
                liveness: self.peers.get(a).map(|p| &p.liveness),
                capacity: self.peers.get(a).and_then(|p| p.capacity),
            })
            .collect();
        let in_use = v.slots.iter().filter_map(|o| o.peer.as_ref()).collect();
        (candidates, in_use)
    }

    /// Where a replacement of one of `v`'s replicas would go now (an operator's
    /// replacement: no backoff, no caps; a spare in maintenance is no candidate).
    pub fn place(&self, v: &VolumeView, now: UnixMs) -> Result<PeerAddr, NoPlacement> {
        let (candidates, in_use) = self.candidates(v);
        let candidates: Vec<Candidate> = candidates
            .into_iter()
            .filter(|c| self.in_maintenance(Some(c.addr), now).is_none())
            .collect();
        place(&v.name, v.size, &candidates, &in_use, &BTreeMap::new())
    }

    fn alive(&self, peer: Option<&PeerAddr>) -> bool {
        peer.is_none_or(|p| {
            self.peers
                .get(p)
                .is_some_and(|v| v.liveness == Liveness::Alive)
        })
    }

    /// What to do now about `volumes`, and the events of the decisions not to.
    pub fn select(&mut self, now: UnixMs, volumes: &[VolumeView]) -> (Vec<Decision>, Vec<Event>) {
        let mut decisions = Vec::new();
        let mut events = Vec::new();
        let previous = std::mem::take(&mut self.waiting);
        let mut busy = volumes.iter().filter(|v| !v.replacing.is_empty()).count();
        let mut reserved = BTreeMap::new();
        let mut seen_media = BTreeSet::new();
        let mut vols: Vec<&VolumeView> = volumes.iter().collect();
        vols.sort_by(|a, b| a.name.cmp(&b.name));
        for v in vols {
            let slot = |loc: &str| v.slots.iter().find(|s| s.location == loc);
            // 1. Replacements whose old replica is back and cheaper.
            for r in &v.replacing {
                let (Some(old), Some(new)) = (slot(&r.old), slot(&r.new)) else {
                    continue;
                };
                let old_missing = match &old.cond {
                    SlotCond::Rebuilding {
                        remaining_bytes,
                        partial: true,
                    } => Some(*remaining_bytes),
                    SlotCond::Faulted {
                        reason,
                        missing_bytes: Some(m),
                        reachable: true,
                    } if !reason.is_media_error() => Some(*m),
                    _ => None,
                };
                let new_remaining = match &new.cond {
                    SlotCond::Rebuilding {
                        remaining_bytes, ..
                    } => Some(*remaining_bytes),
                    SlotCond::Faulted { .. } | SlotCond::Connecting => Some(v.size),
                    SlotCond::Online => None,
                };
                if let (Some(m), Some(n), false) = (old_missing, new_remaining, self.paused) {
                    if m < n && self.alive(old.peer.as_ref()) {
                        decisions.push(Decision::Abandon {
                            volume: v.name.clone(),
                            old: r.old.clone(),
                            new: r.new.clone(),
                        });
                        events.push(Event {
                            at: now,
                            volume: Some(v.name.clone()),
                            replica: Some(r.old.clone()),
                            kind: EventKind::PartialInsteadOfFull {
                                new: r.new.clone(),
                                old_missing_bytes: m,
                                new_remaining_bytes: n,
                            },
                        });
                    }
                }
            }
            // 2. Replicas that need a replacement.
            let in_progress = |loc: &str| v.replacing.iter().any(|r| r.old == loc || r.new == loc);
            let mut volume_busy = !v.replacing.is_empty();
            for s in &v.slots {
                if in_progress(&s.location) {
                    continue;
                }
                let key = (v.name.clone(), s.location.clone());
                let reason = match (&s.cond, s.peer.as_ref().and_then(|p| self.peers.get(p))) {
                    (
                        _,
                        Some(PeerView {
                            liveness: Liveness::Dead { since, .. },
                            ..
                        }),
                    ) => Some(ReplaceReason::PeerDead {
                        peer: s.peer.clone().expect("a peer's view"),
                        since: *since,
                    }),
                    (SlotCond::Faulted { reason, .. }, _)
                        if reason.is_media_error() && self.alive(s.peer.as_ref()) =>
                    {
                        seen_media.insert(key.clone());
                        let since = *self.media_since.entry(key.clone()).or_insert(now);
                        (now.since(since) >= self.rules.peer.grace_ms).then(|| {
                            ReplaceReason::DiskFailed {
                                fault: reason.clone(),
                            }
                        })
                    }
                    _ => None,
                };
                let Some(reason) = reason else { continue };
                // 3. Whether it gets one now.
                let has_source = v
                    .slots
                    .iter()
                    .any(|o| o.location != s.location && o.cond == SlotCond::Online);
                let backoff = self.backoff.get(&key).filter(|b| b.until > now);
                let wait = if self.paused {
                    Some(Waiting::Paused)
                } else if let Some(until) = self.in_maintenance(s.peer.as_ref(), now) {
                    Some(Waiting::Maintenance { until })
                } else if !has_source {
                    Some(Waiting::NoSource)
                } else if volume_busy {
                    Some(Waiting::VolumeBusy)
                } else if busy >= self.rules.max_concurrent {
                    Some(Waiting::NodeBusy {
                        max_concurrent: self.rules.max_concurrent,
                    })
                } else if let Some(b) = backoff {
                    Some(Waiting::Backoff { until: b.until })
                } else {
                    let (candidates, in_use) = self.candidates(v);
                    let candidates: Vec<Candidate> = candidates
                        .into_iter()
                        .filter(|c| self.in_maintenance(Some(c.addr), now).is_none())
                        .collect();
                    let avoid: Vec<Candidate> = candidates
                        .iter()
                        .filter(|c| {
                            !self
                                .backoff
                                .get(&key)
                                .is_some_and(|b| b.failed_on.contains(c.addr))
                        })
                        .cloned()
                        .collect();
                    let placed = match place(&v.name, v.size, &avoid, &in_use, &reserved) {
                        Err(_) if avoid.len() < candidates.len() => {
                            place(&v.name, v.size, &candidates, &in_use, &reserved)
                        }
                        r => r,
                    };
                    match placed {
                        Ok(to) => {
                            *reserved.entry(to.clone()).or_insert(0) += v.size;
                            decisions.push(Decision::Replace {
                                volume: v.name.clone(),
                                old: s.location.clone(),
                                to,
                                reason: reason.clone(),
                            });
                            volume_busy = true;
                            busy += 1;
                            None
                        }
                        Err(why) => Some(Waiting::NoPlacement { why }),
                    }
                };
                if let Some(w) = wait {
                    // Said once per reason: the placement's is worth an event.
                    if let Waiting::NoPlacement { why } = &w {
                        let said = matches!(previous.get(&key), Some((_, Waiting::NoPlacement { why: p })) if p == why);
                        if !said {
                            events.push(Event {
                                at: now,
                                volume: Some(v.name.clone()),
                                replica: Some(s.location.clone()),
                                kind: EventKind::NoPlacement {
                                    reason: reason.clone(),
                                    why: why.clone(),
                                },
                            });
                        }
                    }
                    self.waiting.insert(key, (reason, w));
                }
            }
        }
        self.media_since.retain(|k, _| seen_media.contains(k));
        (decisions, events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::ProbeFailure;

    const GIB: u64 = 1 << 30;

    fn rules() -> Rules {
        Rules {
            peer: PeerRules {
                grace_ms: 5000,
                rejoin_oks: 2,
            },
            max_concurrent: 2,
            backoff_first_ms: 5000,
            backoff_max_ms: 300_000,
            report_every_ms: 60_000,
            idle_probe_every_ms: 30_000,
        }
    }

    fn addr(n: u8) -> PeerAddr {
        PeerAddr::new(&format!("10.0.0.{n}:7450")).unwrap()
    }

    fn ok() -> Probe {
        Probe::Answered {
            capacity: Capacity {
                total_bytes: 100 * GIB,
                free_bytes: 100 * GIB,
            },
        }
    }

    fn refused() -> Probe {
        Probe::Failed(ProbeFailure::Refused)
    }

    fn remote(n: u8, id: &str, cond: SlotCond) -> SlotView {
        SlotView {
            location: format!("{id}@10.0.0.{n}:7450"),
            peer: Some(addr(n)),
            cond,
        }
    }

    fn local(cond: SlotCond) -> SlotView {
        SlotView {
            location: "/var/lib/ublkd/vol0-a.img".into(),
            peer: None,
            cond,
        }
    }

    fn faulted(reason: FaultReason) -> SlotCond {
        SlotCond::Faulted {
            reason,
            missing_bytes: Some(64 << 10),
            reachable: false,
        }
    }

    fn eio() -> FaultReason {
        FaultReason::IoError {
            op: replication::state::IoOp::Write,
            errno: 5,
        }
    }

    /// vol0: a local replica and two remote ones (on .2 and .3), spares .4 and .5.
    fn vol0(b: SlotCond, c: SlotCond) -> VolumeView {
        VolumeView {
            name: "vol0".into(),
            size: 10 * GIB,
            spares: vec![addr(4), addr(5)],
            slots: vec![
                local(SlotCond::Online),
                remote(2, "vol0-b", b),
                remote(3, "vol0-c", c),
            ],
            replacing: vec![],
        }
    }

    /// A monitor that has probed these peers at these times.
    fn probed(m: &mut Monitor, probes: &[(u64, u8, Probe)]) -> Vec<Event> {
        probes
            .iter()
            .flat_map(|(t, n, p)| m.probed(&addr(*n), p, UnixMs(*t)))
            .collect()
    }

    fn all_alive(m: &mut Monitor, t: u64) {
        for n in 2..=5 {
            m.probed(&addr(n), &ok(), UnixMs(t));
        }
    }

    fn replaced(d: &[Decision]) -> Vec<(String, String)> {
        d.iter()
            .filter_map(|d| match d {
                Decision::Replace { old, to, .. } => Some((old.clone(), to.to_string())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_dead_peer_gets_its_replica_replaced_after_the_grace_and_not_before() {
        let mut m = Monitor::new(rules(), false);
        all_alive(&mut m, 0);
        let lost = || faulted(FaultReason::ConnectionLost);
        let v = [vol0(lost(), SlotCond::Online)];
        probed(&mut m, &[(1000, 2, refused())]);
        assert!(m.select(UnixMs(1000), &v).0.is_empty(), "suspected only");
        probed(&mut m, &[(5999, 2, refused())]);
        assert!(
            m.select(UnixMs(5999), &v).0.is_empty(),
            "4999 ms of the 5000"
        );
        let ev = probed(&mut m, &[(6000, 2, refused())]);
        assert!(
            matches!(
                ev[..],
                [Event {
                    kind: EventKind::PeerDead {
                        since: UnixMs(1000),
                        ..
                    },
                    ..
                }]
            ),
            "{ev:?}"
        );
        let (d, _) = m.select(UnixMs(6000), &v);
        let to = place(
            "vol0",
            10 * GIB,
            &[
                Candidate {
                    addr: &addr(4),
                    liveness: Some(&Liveness::Alive),
                    capacity: ok_cap(),
                },
                Candidate {
                    addr: &addr(5),
                    liveness: Some(&Liveness::Alive),
                    capacity: ok_cap(),
                },
            ],
            &[],
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(
            replaced(&d),
            [("vol0-b@10.0.0.2:7450".to_string(), to.to_string())]
        );
        assert!(matches!(
            &d[0],
            Decision::Replace {
                reason: ReplaceReason::PeerDead {
                    since: UnixMs(1000),
                    ..
                },
                ..
            }
        ));
    }

    fn ok_cap() -> Option<Capacity> {
        match ok() {
            Probe::Answered { capacity } => Some(capacity),
            _ => None,
        }
    }

    #[test]
    fn an_idle_volume_on_a_dead_peer_is_replaced_even_while_its_replica_looks_online() {
        let mut m = Monitor::new(rules(), false);
        all_alive(&mut m, 0);
        probed(&mut m, &[(0, 2, refused()), (5000, 2, refused())]);
        let (d, _) = m.select(UnixMs(5000), &[vol0(SlotCond::Online, SlotCond::Online)]);
        assert_eq!(replaced(&d).len(), 1);
    }

    #[test]
    fn a_failed_disk_is_replaced_alone_once_it_stayed_faulted_for_the_grace() {
        let mut m = Monitor::new(rules(), false);
        all_alive(&mut m, 0);
        let v = [vol0(faulted(eio()), faulted(FaultReason::ConnectionLost))];
        assert!(
            m.select(UnixMs(100), &v).0.is_empty(),
            "its grace starts now"
        );
        all_alive(&mut m, 5000);
        assert!(m.select(UnixMs(5099), &v).0.is_empty());
        let (d, _) = m.select(UnixMs(5100), &v);
        assert_eq!(
            replaced(&d)
                .iter()
                .map(|r| r.0.as_str())
                .collect::<Vec<_>>(),
            ["vol0-b@10.0.0.2:7450"],
            "the disconnected one on a live peer is caught up by a rebuild, not replaced"
        );
        // A media error that clears (rebuilt) restarts its grace next time.
        let healthy = [vol0(SlotCond::Online, SlotCond::Online)];
        m.select(UnixMs(6000), &healthy);
        assert!(m.select(UnixMs(7000), &v).0.is_empty());
    }

    #[test]
    fn a_flapping_peer_is_never_declared_dead_and_reported_once_a_minute() {
        let mut m = Monitor::new(rules(), false);
        all_alive(&mut m, 0);
        let v = [vol0(
            faulted(FaultReason::MissedDeadline { waited_ms: 5000 }),
            SlotCond::Online,
        )];
        let mut events = Vec::new();
        let mut decisions = Vec::new();
        for s in 0..120u64 {
            let p = if s % 2 == 0 { refused() } else { ok() };
            events.extend(probed(&mut m, &[(s * 1000, 2, p)]));
            decisions.extend(m.select(UnixMs(s * 1000), &v).0);
        }
        assert!(decisions.is_empty(), "{decisions:?}");
        let repeats: Vec<u32> = events
            .iter()
            .map(|e| match &e.kind {
                EventKind::PeerSuspected { repeats, .. } => *repeats,
                k => panic!("{k:?}"),
            })
            .collect();
        assert_eq!(
            repeats,
            [0, 29],
            "two reports in two minutes, the second counting the rest"
        );
    }

    #[test]
    fn caps_backoff_and_pause_hold_replacements_back_and_say_why() {
        let mut m = Monitor::new(
            Rules {
                max_concurrent: 1,
                ..rules()
            },
            false,
        );
        all_alive(&mut m, 0);
        probed(
            &mut m,
            &[
                (0, 2, refused()),
                (5000, 2, refused()),
                (0, 3, refused()),
                (5000, 3, refused()),
            ],
        );
        let lost = || faulted(FaultReason::ConnectionLost);
        let mut vol1 = vol0(lost(), SlotCond::Online);
        vol1.name = "vol1".into();
        let both = [vol0(lost(), lost()), vol1];
        let (d, _) = m.select(UnixMs(5000), &both);
        // vol0 first (by name): one of its two, then the node cap holds vol1.
        assert_eq!(replaced(&d).len(), 1);
        let w = m.waiting();
        assert_eq!(
            w[&("vol0".into(), "vol0-c@10.0.0.3:7450".into())].1,
            Waiting::VolumeBusy
        );
        assert_eq!(
            w[&("vol1".into(), "vol0-b@10.0.0.2:7450".into())].1,
            Waiting::NodeBusy { max_concurrent: 1 }
        );

        // The attempt failed: backoff 5 s, then 10 s (.3 is back, out of the way).
        probed(&mut m, &[(6000, 3, ok()), (7000, 3, ok())]);
        assert_eq!(
            m.failed("vol0", "vol0-b@10.0.0.2:7450", &addr(4), UnixMs(5000)),
            5000
        );
        let one = [vol0(lost(), SlotCond::Online)];
        assert!(m.select(UnixMs(9999), &one).0.is_empty());
        assert_eq!(
            m.waiting()[&("vol0".into(), "vol0-b@10.0.0.2:7450".into())].1,
            Waiting::Backoff {
                until: UnixMs(10000)
            }
        );
        assert_eq!(replaced(&m.select(UnixMs(10000), &one).0).len(), 1);
        assert_eq!(
            m.failed("vol0", "vol0-b@10.0.0.2:7450", &addr(4), UnixMs(10000)),
            10000
        );
        m.succeeded("vol0", "vol0-b@10.0.0.2:7450");
        assert_eq!(replaced(&m.select(UnixMs(10001), &one).0).len(), 1);

        m.set_paused(true);
        assert!(m.select(UnixMs(20000), &one).0.is_empty());
        assert_eq!(
            m.waiting()[&("vol0".into(), "vol0-b@10.0.0.2:7450".into())].1,
            Waiting::Paused
        );
    }

    #[test]
    fn after_a_failed_attempt_the_next_one_goes_to_another_spare_while_one_qualifies() {
        let mut m = Monitor::new(rules(), false);
        all_alive(&mut m, 0);
        probed(&mut m, &[(0, 2, refused()), (5000, 2, refused())]);
        let v = [vol0(faulted(FaultReason::ConnectionLost), SlotCond::Online)];
        let old = "vol0-b@10.0.0.2:7450";
        let first = replaced(&m.select(UnixMs(5000), &v).0)[0].1.clone();
        let first = PeerAddr::new(&first).unwrap();
        let other = if first == addr(4) { addr(5) } else { addr(4) };
        let delay = m.failed("vol0", old, &first, UnixMs(5000));
        let second = replaced(&m.select(UnixMs(5000 + delay), &v).0);
        assert_eq!(second, [(old.to_string(), other.to_string())]);
        // Both failed: back to the rule's choice rather than no attempt at all.
        let delay2 = m.failed("vol0", old, &other, UnixMs(5000 + delay));
        let third = replaced(&m.select(UnixMs(5000 + delay + delay2), &v).0);
        assert_eq!(third, [(old.to_string(), first.to_string())]);
        // A success forgets the failures.
        m.succeeded("vol0", old);
        assert_eq!(
            replaced(&m.select(UnixMs(900_000), &v).0)[0].1,
            first.to_string()
        );
    }

    #[test]
    fn no_source_or_no_spare_means_degraded_with_the_reason_said_once() {
        let mut m = Monitor::new(rules(), false);
        probed(
            &mut m,
            &[(0, 2, refused()), (5000, 2, refused()), (0, 3, ok())],
        );
        let lost = || faulted(FaultReason::ConnectionLost);
        // The local replica faulted too: nothing to copy from.
        let mut v = vol0(lost(), SlotCond::Online);
        v.slots[0].cond = lost();
        v.slots[2].cond = lost();
        assert!(m.select(UnixMs(5000), &[v]).0.is_empty());
        assert_eq!(
            m.waiting()[&("vol0".into(), "vol0-b@10.0.0.2:7450".into())].1,
            Waiting::NoSource
        );
        // Spares .4 and .5 never probed: no placement, said once.
        let v = [vol0(lost(), SlotCond::Online)];
        let (d, ev) = m.select(UnixMs(6000), &v);
        assert!(d.is_empty());
        assert_eq!(ev.len(), 1);
        assert!(ev[0].to_string().contains("not probed yet"), "{}", ev[0]);
        assert!(
            m.select(UnixMs(7000), &v).1.is_empty(),
            "same reason: no new event"
        );
        // A spare appears (a reload added it, its probe answered).
        let mut with_spare = v.clone();
        with_spare[0].spares.push(addr(9));
        probed(&mut m, &[(8000, 9, ok())]);
        assert_eq!(
            replaced(&m.select(UnixMs(8000), &with_spare).0),
            [("vol0-b@10.0.0.2:7450".to_string(), addr(9).to_string())]
        );
    }

    #[test]
    fn a_returning_replica_that_lacks_less_than_its_half_built_replacement_wins() {
        let mut m = Monitor::new(rules(), false);
        all_alive(&mut m, 0);
        let back = |missing| SlotCond::Faulted {
            reason: FaultReason::ConnectionLost,
            missing_bytes: Some(missing),
            reachable: true,
        };
        let view = |old: SlotCond, new: SlotCond| {
            let mut v = vol0(old, SlotCond::Online);
            v.slots.push(remote(4, "vol0-b", new));
            v.replacing.push(Replacing {
                old: "vol0-b@10.0.0.2:7450".into(),
                new: "vol0-b@10.0.0.4:7450".into(),
            });
            v
        };
        let building = |remaining| SlotCond::Rebuilding {
            remaining_bytes: remaining,
            partial: false,
        };
        let table: &[(&str, SlotCond, SlotCond, bool)] = &[
            (
                "back, lacks 1 MiB, the new one 8 GiB",
                back(1 << 20),
                building(8 * GIB),
                true,
            ),
            (
                "back and already partially rebuilding",
                SlotCond::Rebuilding {
                    remaining_bytes: 1 << 20,
                    partial: true,
                },
                building(8 * GIB),
                true,
            ),
            (
                "back but the new one is nearly done",
                back(GIB),
                building(1 << 20),
                false,
            ),
            (
                "back without a dirty map: full either way",
                SlotCond::Faulted {
                    reason: FaultReason::ConnectionLost,
                    missing_bytes: None,
                    reachable: true,
                },
                building(8 * GIB),
                false,
            ),
            (
                "not reachable yet",
                SlotCond::Faulted {
                    reason: FaultReason::ConnectionLost,
                    missing_bytes: Some(1),
                    reachable: false,
                },
                building(8 * GIB),
                false,
            ),
            (
                "its disk failed: never back",
                SlotCond::Faulted {
                    reason: eio(),
                    missing_bytes: Some(1),
                    reachable: true,
                },
                building(8 * GIB),
                false,
            ),
            (
                "the new one is online already",
                back(1),
                SlotCond::Online,
                false,
            ),
        ];
        for (name, old, new, abandon) in table {
            let (d, ev) = m.select(UnixMs(1000), &[view(old.clone(), new.clone())]);
            let got = d.iter().any(|d| matches!(d, Decision::Abandon { .. }));
            assert_eq!(got, *abandon, "{name}: {d:?}");
            assert_eq!(
                ev.iter()
                    .any(|e| matches!(e.kind, EventKind::PartialInsteadOfFull { .. })),
                *abandon,
                "{name}"
            );
            assert!(
                replaced(&d).is_empty(),
                "{name}: one replacement per volume at a time"
            );
        }
        // Its peer still counts as dead until it answered `rejoin_oks` probes.
        probed(
            &mut m,
            &[(2000, 2, refused()), (7000, 2, refused()), (8000, 2, ok())],
        );
        let (d, _) = m.select(UnixMs(8000), &[view(back(1), building(8 * GIB))]);
        assert!(d.is_empty(), "{d:?}");
        probed(&mut m, &[(9000, 2, ok())]);
        let (d, _) = m.select(UnixMs(9000), &[view(back(1), building(8 * GIB))]);
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn two_volumes_of_a_dead_node_are_not_placed_beyond_a_spares_space() {
        let mut m = Monitor::new(rules(), false);
        probed(
            &mut m,
            &[(0, 2, refused()), (5000, 2, refused()), (0, 3, ok())],
        );
        let small = Probe::Answered {
            capacity: Capacity {
                total_bytes: 15 * GIB,
                free_bytes: 15 * GIB,
            },
        };
        probed(&mut m, &[(0, 4, small.clone()), (0, 5, small)]);
        let lost = || faulted(FaultReason::ConnectionLost);
        let vols: Vec<VolumeView> = (0..3)
            .map(|i| {
                let mut v = vol0(lost(), SlotCond::Online);
                v.name = format!("vol{i}");
                v
            })
            .collect();
        m.rules.max_concurrent = 10;
        let (d, _) = m.select(UnixMs(5000), &vols);
        let mut per: BTreeMap<String, u32> = BTreeMap::new();
        for (_, to) in replaced(&d) {
            *per.entry(to).or_default() += 1;
        }
        assert_eq!(
            per.values().sum::<u32>(),
            2,
            "{per:?}: a 10 GiB volume each on two 15 GiB spares"
        );
        assert!(per.values().all(|n| *n == 1), "{per:?}");
    }

    #[test]
    fn the_probe_plan_skips_connected_servers_and_probes_idle_spares_seldom() {
        let use_ = |n: u8, connected: bool, holds_replica: bool, spare: bool| PeerUse {
            peer: addr(n),
            connected,
            holds_replica,
            spare,
        };
        // .2 and .3 hold replicas (.2 connected), .4 and .5 are spares, .6 a replaced
        // replica's server, .7 a spare that holds a connected replica of another volume.
        let uses = [
            use_(2, true, true, false),
            use_(3, false, true, false),
            use_(4, false, false, true),
            use_(5, false, false, true),
            use_(6, false, false, false),
            use_(7, true, true, true),
        ];
        let healthy = [vol0(SlotCond::Online, SlotCond::Online)];
        let faulty = [vol0(SlotCond::Online, faulted(FaultReason::ConnectionLost))];
        let plan = |m: &Monitor, t: u64, v: &[VolumeView]| -> Vec<u8> {
            m.to_probe(UnixMs(t), &uses, v)
                .iter()
                .map(|p| {
                    p.as_str()
                        .split(['.', ':'])
                        .nth(3)
                        .unwrap()
                        .parse()
                        .unwrap()
                })
                .collect()
        };
        let mut m = Monitor::new(rules(), false);
        assert_eq!(
            plan(&m, 0, &healthy),
            [2, 3, 4, 5, 6, 7],
            "never probed: all"
        );
        for n in 2..=7 {
            m.probed(&addr(n), &ok(), UnixMs(0));
        }
        for (t, vols, want, why) in [
            (
                1_000,
                &healthy,
                vec![3],
                "connected .2 skipped, the others probed lately",
            ),
            (
                29_999,
                &healthy,
                vec![3],
                "idle: not before idle_probe_every_ms",
            ),
            (
                30_000,
                &healthy,
                vec![3, 4, 5, 6, 7],
                "idle: every idle_probe_every_ms",
            ),
            (
                1_000,
                &faulty,
                vec![3, 4, 5, 6, 7],
                "in trouble: every round, .7 too (its space)",
            ),
        ] {
            assert_eq!(plan(&m, t, vols), want, "{why}");
        }
        // A connected server under suspicion is probed all the same, and so is
        // everything else while a replica's server is not alive.
        probed(&mut m, &[(2_000, 2, refused())]);
        assert_eq!(plan(&m, 3_000, &healthy), [2, 3, 4, 5, 6, 7]);
        // A replaced replica's server dead for good is probed, but keeps nobody else
        // probed every round.
        let mut m = Monitor::new(rules(), false);
        for n in 2..=7 {
            m.probed(&addr(n), &ok(), UnixMs(0));
        }
        probed(&mut m, &[(1_000, 6, refused()), (7_000, 6, refused())]);
        assert_eq!(plan(&m, 8_000, &healthy), [3, 6]);
    }

    #[test]
    fn a_server_in_maintenance_is_not_replaced_nor_used_as_a_spare_until_it_ends() {
        let mut m = Monitor::new(rules(), false);
        all_alive(&mut m, 0);
        let lost = || faulted(FaultReason::ConnectionLost);
        let v = [vol0(lost(), SlotCond::Online)];
        // .2 rebooted for maintenance until t = 60 s; .4 (a spare) too, for good.
        m.start_maintenance(addr(2), Some(UnixMs(60_000)));
        m.start_maintenance(addr(4), None);
        probed(&mut m, &[(1000, 2, refused()), (6000, 2, refused())]);
        let (d, _) = m.select(UnixMs(6000), &v);
        assert!(d.is_empty(), "dead but in maintenance: {d:?}");
        let key = ("vol0".to_string(), "vol0-b@10.0.0.2:7450".to_string());
        assert_eq!(
            m.waiting().get(&key).map(|(_, w)| w.clone()),
            Some(Waiting::Maintenance {
                until: Some(UnixMs(60_000))
            })
        );
        // Its time is up: replaced, and not on the spare in maintenance.
        probed(&mut m, &[(60_000, 2, refused())]);
        let (d, _) = m.select(UnixMs(60_000), &v);
        assert_eq!(
            replaced(&d),
            [("vol0-b@10.0.0.2:7450".into(), addr(5).to_string())]
        );
        assert_eq!(
            m.maintenance(UnixMs(60_000)).keys().collect::<Vec<_>>(),
            [&addr(4)]
        );
        // An operator's placement skips spares in maintenance too.
        m.start_maintenance(addr(5), None);
        assert!(
            m.place(&v[0], UnixMs(60_000)).is_err(),
            "both spares in maintenance"
        );
        assert!(m.end_maintenance(&addr(5)));
        assert_eq!(m.place(&v[0], UnixMs(60_000)), Ok(addr(5)));
        assert!(m.end_maintenance(&addr(4)));
        assert!(!m.end_maintenance(&addr(4)), "ended once");
    }
}
