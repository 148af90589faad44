//! The HA monitor's edge: probing replica servers. The decisions are in the `ha`
//! crate ([`ha::monitor`]); this module turns the network into its inputs.

use std::time::Duration;

use ha::peer::{Probe, ProbeFailure};
use replication::remote::client::stat;
use replication::remote::{RemoteSpec, Secret};
use replication::ReplicationError;
use wire::control::OpenRequest;

/// The replica id a probe STATs: any valid name will do (the reply's capacity
/// and the fact of a reply are what count); one no volume uses keeps the
/// server's log readable.
const PROBE_ID: &str = "ublkd-ha-probe";

/// One probe of the replica server at `addr`: connect, authenticate with the
/// cluster secret, STAT, all within `timeout`.
pub async fn probe(addr: &str, secret: &Secret, timeout: Duration) -> Probe {
    let spec = RemoteSpec {
        addr: addr.to_string(),
        secret: secret.clone(),
        open: OpenRequest {
            replica: PROBE_ID.into(),
            volume: PROBE_ID.into(),
            volume_uuid: wire::VolumeUuid::default(),
            size: 0,
            block_size: 4096,
            generation: wire::Generation(0),
            owner: wire::OwnerId(0),
            create: None,
        },
        deadline: timeout,
        connect_timeout: timeout,
    };
    match tokio::time::timeout(timeout, stat(&spec)).await {
        Ok(Ok(reply)) => Probe::Answered {
            capacity: reply.capacity,
        },
        // It answered with an error (its storage fails): the process is alive, so
        // it is no dead peer; zero space keeps placement off it.
        Ok(Err(ReplicationError::Remote { .. })) => Probe::Answered {
            capacity: wire::control::Capacity {
                total_bytes: 0,
                free_bytes: 0,
            },
        },
        Ok(Err(e)) => Probe::Failed(classify(&e)),
        Err(_) => Probe::Failed(ProbeFailure::NoReply),
    }
}

/// What a failed probe says about the peer.
pub fn classify(e: &ReplicationError) -> ProbeFailure {
    use std::io::ErrorKind;
    match e {
        ReplicationError::Connect { source, .. }
            if source.kind() == ErrorKind::ConnectionRefused =>
        {
            ProbeFailure::Refused
        }
        // A connect that timed out: nothing answered at all.
        ReplicationError::Connect { source, .. } => ProbeFailure::Unreachable {
            error: source.to_string(),
        },
        // Connected, then the handshake or the reply did not come in time.
        ReplicationError::Net(source) if source.kind() == ErrorKind::TimedOut => {
            ProbeFailure::NoReply
        }
        ReplicationError::Net(source) => ProbeFailure::Unreachable {
            error: source.to_string(),
        },
        other => ProbeFailure::Rejected {
            error: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_errors_say_whether_the_host_or_the_server_is_gone() {
        let io = |k| std::io::Error::from(k);
        let connect = |k| ReplicationError::Connect {
            addr: "10.0.0.2:7450".into(),
            source: io(k),
        };
        use std::io::ErrorKind::*;
        for (e, want) in [
            (connect(ConnectionRefused), "refused"),
            (connect(TimedOut), "unreachable"),
            (connect(HostUnreachable), "unreachable"),
            (ReplicationError::Net(io(TimedOut)), "no_reply"),
            (ReplicationError::Net(io(ConnectionReset)), "unreachable"),
            (ReplicationError::Protocol("bad tag".into()), "rejected"),
        ] {
            let got = serde_json::to_value(classify(&e)).unwrap();
            assert_eq!(got["failure"], want, "{e}");
        }
    }
    #[test]
    fn the_event_log_is_bounded_persisted_and_numbered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let ev = |i: u64| Event {
            at: UnixMs(i),
            volume: Some("vol0".into()),
            replica: None,
            kind: EventKind::Paused,
        };
        let log = EventLog::open(path.clone());
        for i in 0..(2 * EVENTS_KEPT as u64 + 10) {
            log.push(ev(i));
        }
        let all = log.since(None);
        assert_eq!(all.len(), EVENTS_KEPT);
        assert_eq!(all.last().unwrap().seq, 2 * EVENTS_KEPT as u64 + 10);
        assert_eq!(log.since(Some(all.last().unwrap().seq - 3)).len(), 3);
        // The file was compacted once it held twice the kept number of lines.
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines <= 2 * EVENTS_KEPT, "{lines}");
        // A restart reads them back, numbers go on, a torn line is skipped.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"seq\": 5, torn")
            .unwrap();
        let again = EventLog::open(path);
        assert_eq!(again.since(None), all);
        again.push(ev(1));
        assert_eq!(
            again.since(None).last().unwrap().seq,
            all.last().unwrap().seq + 1
        );
        assert_eq!(
            EventLog::open(dir.path().join("events.jsonl")).since(None),
            again.since(None)
        );
    }
}

// ---------------------------------------------------------------------------
// The monitor's state on this node, its event log and its loop.
// ---------------------------------------------------------------------------

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ha::event::{Event, EventKind, ReplaceReason};
use ha::monitor::{Decision, Monitor, PeerUse, Rules, VolumeView, Waiting};
use ha::{PeerAddr, UnixMs};
use serde::{Deserialize, Serialize};

use crate::config::HaConfig;
use crate::error::DaemonError;
use crate::state::StateDir;
use crate::volume::VolumeShared;

/// Events kept (in memory and, after compaction, in the file).
pub const EVENTS_KEPT: usize = 1000;

/// An event with its number: `ublkctl events --follow` asks for those after
/// the last one it showed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logged {
    pub seq: u64,
    #[serde(flatten)]
    pub event: Event,
}

/// The bounded, persisted event log: `<state_dir>/events.jsonl`, one JSON object
/// per line, appended; rewritten with the last [`EVENTS_KEPT`] once twice that
/// many lines are in it.
pub struct EventLog {
    path: PathBuf,
    inner: Mutex<(VecDeque<Logged>, u64, usize)>,
    /// Events pushed by this process, by kind (the metrics' counters).
    counts: Mutex<BTreeMap<String, u64>>,
}

impl EventLog {
    pub fn open(path: PathBuf) -> EventLog {
        let mut recent = VecDeque::new();
        let mut lines = 0;
        if let Ok(text) = std::fs::read_to_string(&path) {
            // A crash mid-append left a torn last line: the next one starts afresh.
            if !text.is_empty() && !text.ends_with('\n') {
                let _ = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .and_then(|mut f| f.write_all(b"\n"));
            }
            for line in text.lines() {
                lines += 1;
                match serde_json::from_str::<Logged>(line) {
                    Ok(l) => recent.push_back(l),
                    Err(e) => tracing::warn!(file = %path.display(), error = %e,
                        "an event line cannot be read: skipped"),
                }
                if recent.len() > EVENTS_KEPT {
                    recent.pop_front();
                }
            }
        }
        let seq = recent.back().map_or(0, |l| l.seq);
        EventLog {
            path,
            inner: Mutex::new((recent, seq, lines)),
            counts: Mutex::default(),
        }
    }

    /// Events pushed by this process, by kind (`peer_dead`, ...).
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.counts.lock().unwrap().clone()
    }

    pub fn push(&self, event: Event) {
        tracing::info!(event = %event, "ha");
        let kind = serde_json::to_value(&event.kind)
            .ok()
            .and_then(|v| Some(v.get("event")?.as_str()?.to_string()))
            .unwrap_or_else(|| "unknown".into());
        *self.counts.lock().unwrap().entry(kind).or_default() += 1;
        let mut g = self.inner.lock().unwrap();
        let (recent, seq, lines) = &mut *g;
        *seq += 1;
        let l = Logged { seq: *seq, event };
        let line = serde_json::to_string(&l).expect("events serialize");
        recent.push_back(l);
        if recent.len() > EVENTS_KEPT {
            recent.pop_front();
        }
        *lines += 1;
        let res = if *lines > 2 * EVENTS_KEPT {
            *lines = recent.len();
            let text: String = recent
                .iter()
                .map(|l| serde_json::to_string(l).expect("events serialize") + "\n")
                .collect();
            replication::durable::replace(&self.path, text.as_bytes()).map_err(|e| e.to_string())
        } else {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()))
                .map_err(|e| e.to_string())
        };
        if let Err(e) = res {
            tracing::warn!(file = %self.path.display(), error = %e, "cannot persist an event");
        }
    }

    /// The events after `seq` (all kept ones with `None`).
    pub fn since(&self, seq: Option<u64>) -> Vec<Logged> {
        let g = self.inner.lock().unwrap();
        g.0.iter()
            .filter(|l| seq.is_none_or(|s| l.seq > s))
            .cloned()
            .collect()
    }
}

/// What `ublkctl ha status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HaStatus {
    pub paused: bool,
    /// Servers in maintenance (their replicas are not replaced).
    #[serde(default)]
    pub maintenance: Vec<MaintenanceStatus>,
    /// Every server probed: its liveness and space.
    pub peers: Vec<PeerStatus>,
    /// Replicas that need a replacement and wait, with why.
    pub waiting: Vec<WaitingReplica>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub peer: String,
    pub liveness: ha::peer::Liveness,
    pub capacity: Option<wire::control::Capacity>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WaitingReplica {
    pub volume: String,
    pub replica: String,
    pub reason: ReplaceReason,
    pub waiting: Waiting,
}

/// What `ha.json` keeps across restarts: the operator's pause and maintenance.
#[derive(Serialize, Deserialize, Default)]
struct Persisted {
    paused: bool,
    /// Servers in maintenance: address → until (unix ms; `None`: until ended).
    #[serde(default)]
    maintenance: BTreeMap<String, Option<u64>>,
}

/// A server in maintenance, as `ublkctl ha status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MaintenanceStatus {
    pub peer: String,
    /// Unix ms (`None`: until `ublkctl ha maintenance end`).
    pub until: Option<u64>,
}

/// The HA monitor of this node.
pub struct Ha {
    monitor: Mutex<Monitor>,
    pub events: EventLog,
    paused_file: PathBuf,
    /// Replacements already reported online: (volume, new location).
    announced: Mutex<BTreeSet<(String, String)>>,
    /// Per volume: the rebuild last seen running (target, start) and the end of
    /// the newest finished one reported.
    rebuilds: Mutex<BTreeMap<String, RebuildsSeen>>,
    /// Replicas seen faulted, (volume, location): each fault is reported once.
    /// `None` until the first round, which only takes note (a fault from before
    /// this daemon started is in the status, not news).
    faulted: Mutex<Option<BTreeSet<(String, String)>>>,
}

type RebuildsSeen = (Option<(String, u64)>, u64);

pub fn rules(c: &HaConfig) -> Rules {
    Rules {
        peer: ha::peer::PeerRules {
            grace_ms: c.grace_ms.into(),
            rejoin_oks: c.rejoin_probes,
        },
        max_concurrent: c.max_concurrent as usize,
        backoff_first_ms: 5_000,
        backoff_max_ms: 300_000,
        report_every_ms: 60_000,
        idle_probe_every_ms: 30_000,
    }
}

fn now() -> UnixMs {
    UnixMs(replication::dirty_file::unix_ms())
}

impl Ha {
    pub fn new(state_dir: &StateDir, c: &HaConfig) -> Ha {
        let paused_file = state_dir.node_file("ha.json");
        let kept: Persisted = std::fs::read(&paused_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if kept.paused {
            tracing::warn!("HA decisions are paused (ublkctl ha resume)");
        }
        let mut monitor = Monitor::new(rules(c), kept.paused);
        for (peer, until) in kept.maintenance {
            if let Ok(p) = PeerAddr::new(&peer) {
                tracing::warn!(server = %p, until_unix_ms = ?until,
                    "server in maintenance: its replicas are not replaced (ublkctl ha maintenance end)");
                monitor.start_maintenance(p, until.map(UnixMs));
            }
        }
        Ha {
            monitor: Mutex::new(monitor),
            events: EventLog::open(state_dir.node_file("events.jsonl")),
            paused_file,
            announced: Mutex::new(BTreeSet::new()),
            rebuilds: Mutex::new(BTreeMap::new()),
            faulted: Mutex::new(None),
        }
    }

    /// Write what the operator set (pause, maintenance) for the next start.
    fn persist(&self, m: &mut Monitor) -> Result<(), DaemonError> {
        let kept = Persisted {
            paused: m.paused(),
            maintenance: m
                .maintenance(now())
                .iter()
                .map(|(p, u)| (p.to_string(), u.map(|t| t.0)))
                .collect(),
        };
        let body = serde_json::to_vec(&kept).expect("serializes");
        replication::durable::replace(&self.paused_file, &body).map_err(|e| DaemonError::State {
            path: self.paused_file.clone(),
            message: e.to_string(),
        })
    }

    /// Put a server in maintenance for `for_ms` (`None`: until ended), or end it:
    /// persisted, so a restart keeps it.
    pub fn set_maintenance(
        &self,
        peer: &str,
        for_ms: Option<Option<u64>>,
    ) -> Result<(), DaemonError> {
        let p = PeerAddr::new(peer).map_err(|e| {
            DaemonError::Refused(format!("{peer:?} is no server address (HOST:PORT): {e}"))
        })?;
        let mut m = self.monitor.lock().unwrap();
        let was = m.maintenance(now()).get(&p).copied();
        let kind = match for_ms {
            Some(for_ms) => {
                let until = for_ms.map(|ms| UnixMs(now().0.saturating_add(ms)));
                m.start_maintenance(p.clone(), until);
                EventKind::MaintenanceStarted {
                    peer: p.clone(),
                    until,
                }
            }
            None if m.end_maintenance(&p) => EventKind::MaintenanceEnded { peer: p.clone() },
            None => {
                return Err(DaemonError::Refused(format!(
                    "server {p} is not in maintenance (ublkctl ha status lists those that are)"
                )))
            }
        };
        if let Err(e) = self.persist(&mut m) {
            // Not kept across a restart: not in force either (the operator retries).
            match was {
                Some(until) => m.start_maintenance(p, until),
                None => {
                    m.end_maintenance(&p);
                }
            }
            return Err(e);
        }
        self.events.push(Event {
            at: now(),
            volume: None,
            replica: None,
            kind,
        });
        Ok(())
    }

    /// Pause or resume automatic decisions (persisted: a restart keeps it).
    pub fn set_paused(&self, paused: bool) -> Result<(), DaemonError> {
        let mut m = self.monitor.lock().unwrap();
        let was = m.paused();
        m.set_paused(paused);
        if let Err(e) = self.persist(&mut m) {
            m.set_paused(was);
            return Err(e);
        }
        if was != paused {
            self.events.push(Event {
                at: now(),
                volume: None,
                replica: None,
                kind: if paused {
                    EventKind::Paused
                } else {
                    EventKind::Resumed
                },
            });
        }
        Ok(())
    }

    pub fn status(&self) -> HaStatus {
        let mut m = self.monitor.lock().unwrap();
        let maintenance = m
            .maintenance(now())
            .iter()
            .map(|(p, u)| MaintenanceStatus {
                peer: p.to_string(),
                until: u.map(|t| t.0),
            })
            .collect();
        HaStatus {
            paused: m.paused(),
            maintenance,
            peers: m
                .peers()
                .iter()
                .map(|(p, v)| PeerStatus {
                    peer: p.to_string(),
                    liveness: v.liveness.clone(),
                    capacity: v.capacity,
                })
                .collect(),
            waiting: m
                .waiting()
                .iter()
                .map(|((volume, replica), (reason, waiting))| WaitingReplica {
                    volume: volume.clone(),
                    replica: replica.clone(),
                    reason: reason.clone(),
                    waiting: waiting.clone(),
                })
                .collect(),
        }
    }

    /// The spare a manual replacement of a replica of `view` would take now.
    pub fn place(&self, view: &VolumeView) -> Result<PeerAddr, ha::placement::NoPlacement> {
        self.monitor.lock().unwrap().place(view, now())
    }

    /// One round: probe every server the volumes use or may use, decide, carry
    /// the decisions out, report.
    pub fn round(
        &self,
        cfg: &crate::config::Config,
        net: &crate::volume::Net,
        volumes: &[Arc<VolumeShared>],
    ) {
        let Some(secret) = &net.secret else { return };
        let views: Vec<(Arc<VolumeShared>, VolumeView)> = volumes
            .iter()
            .filter_map(|v| Some((v.clone(), v.ha_view()?)))
            .collect();
        // The replicas' servers, the spares, and the servers of replaced replicas
        // (their return is reported: what they hold is stale).
        let mut uses: BTreeMap<PeerAddr, PeerUse> = BTreeMap::new();
        let mut add = |peer: PeerAddr, holds: bool, connected: bool, spare: bool| {
            let u = uses.entry(peer.clone()).or_insert(PeerUse {
                peer,
                connected: false,
                holds_replica: false,
                spare: false,
            });
            u.holds_replica |= holds;
            u.connected |= connected;
            u.spare |= spare;
        };
        for (sh, v) in &views {
            let connected = sh.connected_peers();
            for p in v.slots.iter().filter_map(|s| s.peer.clone()) {
                let up = connected.contains(&p);
                add(p, true, up, false);
            }
            for p in &v.spares {
                add(p.clone(), false, false, true);
            }
            for x in sh.substitutions() {
                if let Some(p) = crate::volume::peer_of(&x.configured) {
                    add(p, false, false, false);
                }
            }
        }
        let peers: BTreeSet<PeerAddr> = uses.keys().cloned().collect();
        let just: Vec<VolumeView> = views.iter().map(|(_, v)| v.clone()).collect();
        let planned = {
            let uses: Vec<PeerUse> = uses.into_values().collect();
            self.monitor.lock().unwrap().to_probe(now(), &uses, &just)
        };
        let timeout = Duration::from_millis(u64::from(cfg.ha.probe_interval_ms).clamp(200, 2000));
        let probes = net.rt.block_on(futures::future::join_all(
            planned.iter().map(|p| probe(p.as_str(), secret, timeout)),
        ));
        let at = now();
        let mut events = Vec::new();
        let (decisions, returned) = {
            let mut m = self.monitor.lock().unwrap();
            m.set_rules(rules(&cfg.ha));
            m.retain_peers(&peers);
            for (p, r) in planned.iter().zip(&probes) {
                events.extend(m.probed(p, r, at));
            }
            let returned: Vec<PeerAddr> = events
                .iter()
                .filter_map(|e| match &e.kind {
                    EventKind::PeerReturned { peer, .. } => Some(peer.clone()),
                    _ => None,
                })
                .collect();
            let (d, e) = m.select(at, &just);
            events.extend(e);
            (d, returned)
        };
        for e in events {
            self.events.push(e);
        }
        for d in decisions {
            self.carry_out(d, &views, net);
        }
        self.report_changes(&views, &returned);
    }

    fn carry_out(
        &self,
        d: Decision,
        views: &[(Arc<VolumeShared>, VolumeView)],
        net: &crate::volume::Net,
    ) {
        let shared = |name: &str| {
            views
                .iter()
                .find(|(_, v)| v.name == name)
                .map(|(s, _)| s.clone())
        };
        match d {
            Decision::Replace {
                volume,
                old,
                to,
                reason,
            } => {
                let Some(sh) = shared(&volume) else { return };
                let res = sh.decider().ha_replace(&old, &to, reason.clone(), net);
                let kind = match res {
                    Ok(new) => {
                        self.monitor.lock().unwrap().succeeded(&volume, &old);
                        EventKind::ReplacementPlaced {
                            new,
                            to: to.clone(),
                            reason,
                        }
                    }
                    Err(error) => {
                        let retry_in_ms =
                            self.monitor
                                .lock()
                                .unwrap()
                                .failed(&volume, &old, &to, now());
                        EventKind::ReplacementFailed { error, retry_in_ms }
                    }
                };
                self.events.push(Event {
                    at: now(),
                    volume: Some(volume),
                    replica: Some(old),
                    kind,
                });
            }
            Decision::Abandon { volume, old, new } => {
                let Some(sh) = shared(&volume) else { return };
                let res = sh.decider().ha_abandon(&old, &new);
                if let Err(e) = res {
                    tracing::warn!(volume = %volume, replica = %new, error = %e,
                        "cannot drop the half-built replacement");
                }
            }
        }
    }

    /// Rebuilds started and ended since the last round (the rebuild manager's
    /// history says how they ended; the first round only takes note).
    fn report_rebuilds(&self, views: &[(Arc<VolumeShared>, VolumeView)]) {
        use replication::rebuild::Work;
        let mut seen = self.rebuilds.lock().unwrap();
        for (sh, v) in views {
            let (running, history) = sh.rebuilds();
            let newest = history.iter().map(|e| e.ended_unix_ms).max().unwrap_or(0);
            let Some((last_run, last_end)) = seen.get_mut(&v.name) else {
                let run = running.map(|r| (r.location, now().0.saturating_sub(r.elapsed_ms)));
                seen.insert(v.name.clone(), (run, newest));
                continue;
            };
            for e in history.iter().filter(|e| e.ended_unix_ms > *last_end) {
                if let Work::Rebuild(kind) = e.work {
                    self.events.push(Event {
                        at: UnixMs(e.ended_unix_ms),
                        volume: Some(v.name.clone()),
                        replica: Some(e.location.clone()),
                        kind: EventKind::RebuildEnded {
                            kind,
                            ended: e.ended.clone(),
                        },
                    });
                }
            }
            *last_end = (*last_end).max(newest);
            let run = running.map(|r| {
                let started = now().0.saturating_sub(r.elapsed_ms);
                // The same job seen again: its start moves by the rounding only.
                let same = last_run
                    .as_ref()
                    .is_some_and(|(loc, t)| *loc == r.location && started.abs_diff(*t) < 1000);
                if !same {
                    if let Work::Rebuild(kind) = r.work {
                        self.events.push(Event {
                            at: UnixMs(started),
                            volume: Some(v.name.clone()),
                            replica: Some(r.location.clone()),
                            kind: EventKind::RebuildStarted { kind },
                        });
                    }
                }
                (r.location, started)
            });
            *last_run = run;
        }
    }

    /// Replicas faulted since the last round, with why.
    fn report_faults(&self, views: &[(Arc<VolumeShared>, VolumeView)]) {
        let mut guard = self.faulted.lock().unwrap();
        let first = guard.is_none();
        let seen = guard.get_or_insert_with(BTreeSet::new);
        let mut now_faulted = BTreeSet::new();
        for (_, v) in views {
            for s in &v.slots {
                let ha::monitor::SlotCond::Faulted { reason, .. } = &s.cond else {
                    continue;
                };
                let key = (v.name.clone(), s.location.clone());
                if !first && !seen.contains(&key) {
                    self.events.push(Event {
                        at: now(),
                        volume: Some(v.name.clone()),
                        replica: Some(s.location.clone()),
                        kind: EventKind::ReplicaFaulted {
                            reason: reason.clone(),
                        },
                    });
                }
                now_faulted.insert(key);
            }
        }
        *seen = now_faulted;
    }

    /// Replacements that came online, and replaced replicas whose server answers
    /// again (stale: not used).
    fn report_changes(&self, views: &[(Arc<VolumeShared>, VolumeView)], returned: &[PeerAddr]) {
        self.report_rebuilds(views);
        self.report_faults(views);
        let mut announced = self.announced.lock().unwrap();
        for (sh, v) in views {
            for sub in sh.substitutions() {
                let new = sub.location();
                let online = v
                    .slots
                    .iter()
                    .any(|s| s.location == new && s.cond == ha::monitor::SlotCond::Online)
                    && !v.replacing.iter().any(|r| r.new == new);
                if online && announced.insert((v.name.clone(), new.clone())) {
                    self.events.push(Event {
                        at: now(),
                        volume: Some(v.name.clone()),
                        replica: Some(sub.configured.clone()),
                        kind: EventKind::ReplacementOnline { new: new.clone() },
                    });
                }
                let old_peer = crate::volume::peer_of(&sub.configured);
                let in_set = v.slots.iter().any(|s| s.location == sub.configured);
                if let Some(p) = old_peer.filter(|p| returned.contains(p) && !in_set) {
                    self.events.push(Event {
                        at: now(),
                        volume: Some(v.name.clone()),
                        replica: Some(sub.configured.clone()),
                        kind: EventKind::StaleRefused { peer: p },
                    });
                }
            }
        }
    }
}

/// The monitor's stop: set once; it ends the wait between two rounds at once.
#[derive(Default)]
pub struct StopFlag {
    stopped: Mutex<bool>,
    wake: std::sync::Condvar,
}

impl StopFlag {
    pub fn stop(&self) {
        *self.stopped.lock().unwrap() = true;
        self.wake.notify_all();
    }

    pub fn is_stopped(&self) -> bool {
        *self.stopped.lock().unwrap()
    }

    /// Wait up to `d`; whether it stopped.
    pub fn wait(&self, d: Duration) -> bool {
        let g = self.stopped.lock().unwrap();
        *self.wake.wait_timeout_while(g, d, |s| !*s).unwrap().0
    }
}

/// The monitor's loop: a round every `[ha] probe_interval_ms` until `stop`.
pub fn run(daemon: &crate::daemon::Daemon, stop: &StopFlag) {
    while !stop.is_stopped() {
        let cfg = daemon.config();
        let t0 = std::time::Instant::now();
        daemon.ha().round(&cfg, daemon.net(), &daemon.serving());
        let interval = Duration::from_millis(cfg.ha.probe_interval_ms.into());
        if stop.wait(interval.saturating_sub(t0.elapsed())) {
            return;
        }
    }
}
