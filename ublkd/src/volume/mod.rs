//! One volume's lifecycle on its own control thread ([`run`], top to bottom):
//! 1. load the record and look at the volume's ublk device ([`device`]);
//! 2. activate: probe the replicas' labels, plan who is trusted, take the new
//!    generation, open the remotes, write the membership ([`activate`]);
//! 3. build the health and the data path, add the device or take back a QUIESCED
//!    one (ublk user recovery), serve until told to stop (or fenced);
//! 4. remove the device, sync the replicas, record a clean stop.
//!
//! libublk's control ring is thread-local, so every `UblkCtrl` of a volume is made
//! and used on that volume's thread; other threads talk to it over a channel.

pub mod activate;
mod device;
mod export;

pub use device::pid_alive;

use std::collections::BTreeSet;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::UblkFlags;
use replication::health::{Health, HealthConfig, IoStatsSnapshot, ReadPolicy};
use replication::ranges::RangeTable;
use replication::remote::Secret;
use replication::request::Geometry;
use replication::state::FaultReason;
use replication::{Generation, SlotIndex};
use serde::{Deserialize, Serialize};

use crate::config::VolumeConfig;
use crate::daemon::ublk_device_exists;
use crate::error::DaemonError;
use crate::frontend::{self, DataPath};
use crate::lifecycle::VolumeState;
use crate::state::{RecordSink, StateDir};
use activate::{activate, Halt};
use device::Mode;

/// Flags every ublkd device is created with: survive a daemon crash, and re-issue
/// the requests the dead daemon held instead of failing them.
pub const CTRL_FLAGS: u64 =
    (libublk::sys::UBLK_F_USER_RECOVERY | libublk::sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;

pub enum VolumeCmd {
    /// Drain I/O and remove the device.
    Stop,
    /// Leave the device to the next ublkd (a restart, an upgrade): stop taking
    /// requests, let those in flight finish, flush, and answer whether the volume
    /// was left clean (no resync needed). The device stays, and so does this
    /// volume's thread: the process exits next (see [`hand_over`]).
    HandOver(Sender<bool>),
    /// The fence tripped: look at it now (sent by the volume's own fence hook).
    Look,
}

/// What the control socket reports about a volume.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub state: VolumeState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub device: Option<String>,
    pub device_id: Option<u32>,
    pub generation: u64,
    pub size: u64,
    pub block_size: u32,
    pub queues: u16,
    pub depth: u16,
    /// Feature flags the kernel granted (read back after creation).
    pub ublk_flags: Option<u64>,
    pub read_policy: Option<ReadPolicy>,
    /// Epoch of the membership (who holds every acknowledged write).
    pub membership_epoch: Option<u64>,
    pub replicas: Vec<ReplicaStatus>,
    /// The rebuild in progress, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<replication::rebuild::Running>,
    pub io: IoStatsSnapshot,
    /// Replicas that run in place of configured ones (HA replacements), since
    /// when and why; the config catches up by naming the replacement.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub substitutions: Vec<crate::state::Substitution>,
    /// Dropped replicas whose storage is kept until `ublkctl replica reclaim`.
    #[serde(default)]
    pub retired: Vec<crate::state::Retired>,
    /// The snapshot export under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<export::ExportStatus>,
    /// The snapshot schedule (config `snapshots`), and its last failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleStatus>,
    /// The volume's snapshots, as last listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<SnapshotsStatus>,
}

/// The volume's snapshots as the scheduler's last round listed them (every 30 s).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SnapshotsStatus {
    pub count: usize,
    /// Deleted, their space still being merged back.
    pub deleting: usize,
    /// What they own on the replica owning the most (their own grains).
    pub owned_bytes: u64,
    /// Held by only some of the online replicas (a rebuild or a repair will fix).
    pub partial: usize,
    pub listed_ms: u64,
    /// When the newest scheduled (`auto-`) one was taken.
    #[serde(default)]
    pub newest_auto_ms: Option<u64>,
}

impl SnapshotsStatus {
    fn of(list: &[replication::snapshots::VolumeSnapshot]) -> SnapshotsStatus {
        SnapshotsStatus {
            count: list.iter().filter(|s| !s.deleting).count(),
            deleting: list.iter().filter(|s| s.deleting).count(),
            owned_bytes: list.iter().map(|s| s.owned_bytes).sum(),
            partial: list.iter().filter(|s| !s.missing.is_empty()).count(),
            listed_ms: replication::dirty_file::unix_ms(),
            newest_auto_ms: list
                .iter()
                .filter(|s| !s.deleting && s.name.starts_with(crate::schedule::AUTO_PREFIX))
                .map(|s| s.created_ms)
                .max(),
        }
    }
}

/// What status shows of a volume's snapshot schedule.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduleStatus {
    pub every_s: u64,
    pub keep: u32,
    pub freeze: bool,
    /// The last round that failed (Unix ms) and why; none since one worked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub index: usize,
    pub path: String,
    /// `None`: the volume never ran, nothing is known yet.
    pub uuid: Option<String>,
    /// "online", "faulted", ... (`None`: nothing known yet).
    pub state: Option<String>,
    /// Why it is faulted, for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Why it is faulted, as data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultReason>,
    pub errors: u64,
    /// Bytes its dirty map says it lacks (a partial rebuild copies them); absent
    /// for a faulted replica without a map (a full rebuild).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_bytes: Option<u64>,
    /// A faulted replica that a full rebuild will fill: why not a partial one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_rebuild: Option<replication::rebuild::FullWhy>,
}

impl ReplicaStatus {
    fn of(
        index: usize,
        path: String,
        uuid: Option<wire::ReplicaUuid>,
        state: Option<&replication::ReplicaState>,
        errors: u64,
    ) -> ReplicaStatus {
        let fault = state.and_then(|s| s.fault_reason().cloned());
        ReplicaStatus {
            index,
            path,
            uuid: uuid.map(|u| u.to_string()),
            state: state.map(|s| s.name().to_string()),
            reason: fault.as_ref().map(|f| f.to_string()),
            fault,
            errors,
            missing_bytes: None,
            full_rebuild: None,
        }
    }
}

#[derive(Default)]
struct Live {
    state: VolumeState,
    reason: Option<String>,
    device_id: Option<u32>,
    generation: Generation,
    ublk_flags: Option<u64>,
    queues: u16,
    depth: u16,
    health: Option<Arc<Health>>,
    rebuilds: Option<Arc<replication::rebuild::Manager>>,
    ranges: Option<Arc<replication::ranges::RangeTable>>,
    /// Replaced replicas still in the set: (old, new) by uuid; the old one is
    /// dropped once the new one is online.
    replacing: Vec<(wire::ReplicaUuid, wire::ReplicaUuid)>,
    /// The record while serving (it owns the HA monitor's substitutions).
    sink: Option<Arc<RecordSink>>,
    /// The snapshot export under way (status shows its progress).
    export: Option<export::Running>,
    /// The snapshot schedule's last round that failed, and why (cleared by one
    /// that worked).
    schedule_error: Option<(u64, String)>,
    /// The volume's snapshots as last listed (by the scheduler's round).
    snapshots: Option<SnapshotsStatus>,
}

/// A retired replica and what reclaiming it did (`Err`: it stays retired).
pub type ReclaimResult = (crate::state::Retired, Result<activate::Reclaimed, String>);

/// State shared between a volume's thread and the rest of the daemon.
pub struct VolumeShared {
    /// Its configuration: the one it started with, updated by a reload.
    cfg: Mutex<VolumeConfig>,
    state_dir: StateDir,
    live: Mutex<Live>,
    /// Held by the one [`Decider`] at a time.
    decide: Mutex<()>,
}

impl VolumeShared {
    fn cfg(&self) -> VolumeConfig {
        self.cfg.lock().unwrap().clone()
    }

    fn set_state(&self, next: VolumeState, reason: Option<String>) {
        let mut live = self.live.lock().unwrap();
        let cur = live.state;
        assert!(
            cur == next || cur.can_become(next),
            "volume {}: illegal transition {cur:?} -> {next:?}",
            self.cfg().name
        );
        live.state = next;
        live.reason = reason;
    }

    pub fn state(&self) -> VolumeState {
        let live = self.live.lock().unwrap();
        match (live.state, &live.health) {
            // Live/Degraded follow replica health while serving.
            (s, Some(h)) if s.is_serving() && h.all_online() => VolumeState::Live,
            (s, Some(_)) if s.is_serving() => VolumeState::Degraded,
            (s, _) => s,
        }
    }

    /// Say what the volume is waiting for (while it starts).
    fn set_reason(&self, reason: Option<String>) {
        self.live.lock().unwrap().reason = reason;
    }

    pub fn device_id(&self) -> Option<u32> {
        self.live.lock().unwrap().device_id
    }

    /// Set the partial-rebuild window of the volume's rebuild manager (serving
    /// only; a volume not serving takes it from the config when it starts).
    pub fn set_partial_window(&self, window: Duration) {
        if let Some(m) = &self.live.lock().unwrap().rebuilds {
            m.partial_window().set(window);
        }
    }

    /// The rebuild running and the finished ones (serving only).
    pub fn rebuilds(
        &self,
    ) -> (
        Option<replication::rebuild::Running>,
        Vec<replication::rebuild::HistoryEntry>,
    ) {
        let m = self.live.lock().unwrap().rebuilds.clone();
        m.map(|m| (m.running(), m.history())).unwrap_or_default()
    }

    /// What the HA monitor put in place of configured replicas (serving only).
    pub fn substitutions(&self) -> Vec<crate::state::Substitution> {
        self.live
            .lock()
            .unwrap()
            .sink
            .as_ref()
            .map(|s| s.record().substitutions)
            .unwrap_or_default()
    }

    /// The servers this volume has a replica connection up to (its pings keep
    /// proving them alive: the HA monitor need not probe them).
    pub fn connected_peers(&self) -> BTreeSet<ha::PeerAddr> {
        let Some(health) = self.live.lock().unwrap().health.clone() else {
            return BTreeSet::new();
        };
        let snap = health.snapshot();
        snap.slots
            .iter()
            .filter(|s| {
                health
                    .backing(s.slot)
                    .is_some_and(|b| b.is_remote() && b.is_reachable())
            })
            .filter_map(|s| peer_of(&s.location))
            .collect()
    }

    pub fn name(&self) -> String {
        self.cfg().name.clone()
    }

    /// Its request latency histograms, by kind (none while it does not serve).
    pub fn latencies(&self) -> Vec<(&'static str, replication::latency::HistogramSnapshot)> {
        let Some(health) = self.live.lock().unwrap().health.clone() else {
            return Vec::new();
        };
        let l = &health.stats.latency;
        vec![
            ("read", l.read.snapshot()),
            ("write", l.write.snapshot()),
            ("flush", l.flush.snapshot()),
            ("trim", l.trim.snapshot()),
        ]
    }

    /// Replacements whose old replica is not dropped yet.
    pub fn replacing(&self) -> bool {
        !self.live.lock().unwrap().replacing.is_empty()
    }

    /// The volume as the HA monitor sees it (`None`: it does not serve).
    pub fn ha_view(&self) -> Option<ha::monitor::VolumeView> {
        use ha::monitor::{Replacing, SlotCond, SlotView, VolumeView};
        let (health, rebuilds, replacing) = {
            let live = self.live.lock().unwrap();
            (
                live.health.clone()?,
                live.rebuilds.clone(),
                live.replacing.clone(),
            )
        };
        let cfg = self.cfg();
        let snap = health.snapshot();
        let running = rebuilds.and_then(|m| m.running());
        let slots =
            snap.slots
                .iter()
                .map(|s| {
                    let cond = match &s.state {
                        replication::ReplicaState::Online => SlotCond::Online,
                        replication::ReplicaState::Connecting
                        | replication::ReplicaState::Removed => SlotCond::Connecting,
                        replication::ReplicaState::Rebuilding { kind } => {
                            let remaining = match &running {
                                Some(r) if r.slot == Some(s.slot) => r.total.saturating_sub(r.done),
                                _ => health
                                    .dirty_map(s.slot)
                                    .map_or(cfg.size, |m| m.dirty_bytes()),
                            };
                            SlotCond::Rebuilding {
                                remaining_bytes: remaining,
                                partial: *kind == replication::state::RebuildKind::Partial,
                            }
                        }
                        replication::ReplicaState::Faulted { reason } => SlotCond::Faulted {
                            reason: reason.clone(),
                            missing_bytes: health.dirty_map(s.slot).map(|m| m.dirty_bytes()),
                            reachable: health.backing(s.slot).is_some_and(|b| b.is_reachable()),
                        },
                    };
                    SlotView {
                        location: s.location.clone(),
                        peer: peer_of(&s.location),
                        cond,
                    }
                })
                .collect();
        let loc = |u: &wire::ReplicaUuid| {
            snap.slots
                .iter()
                .find(|s| s.uuid == *u)
                .map(|s| s.location.clone())
        };
        Some(VolumeView {
            name: cfg.name.clone(),
            size: cfg.size,
            spares: cfg
                .spares
                .iter()
                .filter_map(|a| ha::PeerAddr::new(a).ok())
                .collect(),
            slots,
            replacing: replacing
                .iter()
                .filter_map(|(o, n)| {
                    Some(Replacing {
                        old: loc(o)?,
                        new: loc(n)?,
                    })
                })
                .collect(),
        })
    }

    /// An I/O path into the serving volume for this thread (what a ublk queue
    /// has): for in-process callers of a headless volume.
    pub fn nexus(&self) -> Option<replication::Nexus> {
        let live = self.live.lock().unwrap();
        let (health, ranges) = (live.health.clone()?, live.ranges.clone()?);
        Some(replication::Nexus::new(
            health,
            ranges,
            None,
            Box::new(|b: &replication::backing::Backing| {
                b.thread_handle().expect("a thread's replica handle")
            }),
        ))
    }

    /// The volume's decider: waits until the decision before it is applied.
    pub fn decider(&self) -> Decider<'_> {
        Decider {
            v: self,
            _one: self.decide.lock().unwrap(),
        }
    }

    /// The health and the record of a serving volume.
    fn serving_parts(&self) -> Result<(Arc<Health>, Arc<RecordSink>), String> {
        let live = self.live.lock().unwrap();
        match (&live.health, &live.sink) {
            (Some(h), Some(s)) => Ok((h.clone(), s.clone())),
            _ => Err("the volume is not serving".into()),
        }
    }

    /// `old` stays in the running set until `new` is online, also across a
    /// restart when the record (`sink`) is given.
    fn track_replacement(
        &self,
        old: &str,
        old_uuid: wire::ReplicaUuid,
        new_uuid: wire::ReplicaUuid,
        sink: Option<&RecordSink>,
    ) -> Result<(), String> {
        if let Some(sink) = sink {
            sink.edit(|r| r.begin_replacing(old, old_uuid, new_uuid))
                .map_err(|e| format!("record the replacement: {e}"))?;
        }
        self.live
            .lock()
            .unwrap()
            .replacing
            .push((old_uuid, new_uuid));
        Ok(())
    }

    /// Compare the online replicas by checksum, region by region (1 MiB), while
    /// the volume serves; with `repair`, rewrite what differs (from replica `from`,
    /// a location or `#N`, when given; see `replication::verify`).
    pub fn verify(
        &self,
        repair: bool,
        from: Option<&str>,
    ) -> Result<replication::verify::Report, DaemonError> {
        use replication::verify::Repair;
        let (health, ranges) = {
            let live = self.live.lock().unwrap();
            match (&live.health, &live.ranges) {
                (Some(h), Some(r)) => (h.clone(), r.clone()),
                _ => {
                    return Err(DaemonError::volume(
                        &self.cfg().name,
                        "not serving: start it first (ublkctl recover)",
                    ))
                }
            }
        };
        let repair = match (repair, from) {
            (false, None) => Repair::No,
            (false, Some(_)) => {
                return Err(DaemonError::volume(
                    &self.cfg().name,
                    "--from names the source of a repair: add --repair",
                ))
            }
            (true, None) => Repair::Vote,
            (true, Some(r)) => Repair::From(self.replica_named(&health, r)?.0),
        };
        replication::verify::verify(
            &health,
            &ranges,
            replication::ByteLen(1 << 20),
            repair,
            &replication::rebuild::Progress::default(),
        )
        .map_err(|e| DaemonError::volume(&self.cfg().name, e.to_string()))
    }

    /// A snapshot command (see `replication::snapshot`).
    /// One round of the volume's snapshot schedule (see `crate::schedule`).
    /// Also refreshes what status and metrics show of the volume's snapshots.
    pub fn scheduled_round(&self) {
        use crate::control::SnapshotCmd;
        use crate::schedule::{plan, Action};
        if !self.state().is_serving() {
            return;
        }
        // A list costs every replica a walk of its maps (a round trip for a
        // remote one): only when a create may be due, else every 10 minutes.
        let now = replication::dirty_file::unix_ms();
        let cached = self.live.lock().unwrap().snapshots.clone();
        let fresh = cached
            .as_ref()
            .is_some_and(|c| now.saturating_sub(c.listed_ms) < 600_000);
        let due = match (self.cfg().snapshots, &cached) {
            (None, _) => false,
            (Some(sch), Some(c)) => c.newest_auto_ms.is_none_or(|t| {
                now + crate::schedule::ROUND.as_millis() as u64 >= t + sch.every_ms
            }),
            (Some(_), None) => true,
        };
        if fresh && !due {
            return;
        }
        let name = self.cfg().name;
        let listed = self
            .serving_parts()
            .map_err(|e| DaemonError::volume(&name, e))
            .and_then(|(health, _)| {
                replication::snapshots::list(&health)
                    .map_err(|e| DaemonError::volume(&name, e.to_string()))
            });
        if let Ok(list) = &listed {
            self.live.lock().unwrap().snapshots = Some(SnapshotsStatus::of(list));
        }
        let Some(sch) = self.cfg().snapshots else {
            return;
        };
        let result = (|| -> Result<usize, DaemonError> {
            let list = listed?;
            let snaps: Vec<(String, u64)> = list
                .into_iter()
                .filter(|s| !s.deleting)
                .map(|s| (s.name, s.created_ms))
                .collect();
            let actions = plan(&sch, replication::dirty_file::unix_ms(), &snaps);
            for a in &actions {
                match a {
                    Action::Create { name: snap } => {
                        self.snapshot(
                            &SnapshotCmd::Create {
                                name: snap.clone(),
                                freeze: sch.freeze,
                            },
                            None,
                        )?;
                        tracing::info!(volume = %name, snapshot = %snap, "scheduled snapshot taken");
                    }
                    Action::Delete { name: snap } => {
                        self.snapshot(
                            &SnapshotCmd::Delete {
                                snapshot: snap.clone(),
                            },
                            None,
                        )?;
                        tracing::info!(volume = %name, snapshot = %snap, "scheduled snapshot past `keep` deleted");
                    }
                }
            }
            Ok(actions.len())
        })();
        let mut live = self.live.lock().unwrap();
        match result {
            Ok(_) => live.schedule_error = None,
            Err(e) => {
                tracing::warn!(volume = %name, error = %e, "snapshot schedule: round failed, retried in 30 s");
                live.schedule_error = Some((replication::dirty_file::unix_ms(), e.to_string()));
            }
        }
    }

    pub fn snapshot(
        &self,
        action: &crate::control::SnapshotCmd,
        peer: Option<crate::control::Peer>,
    ) -> Result<serde_json::Value, DaemonError> {
        use crate::control::SnapshotCmd;
        let name = self.cfg().name;
        let fail = |e: replication::ReplicationError| DaemonError::volume(&name, e.to_string());
        let (health, ranges, device, sink) = {
            let live = self.live.lock().unwrap();
            match (&live.health, &live.ranges) {
                (Some(h), Some(r)) => (h.clone(), r.clone(), live.device_id, live.sink.clone()),
                _ => {
                    return Err(DaemonError::volume(
                        &name,
                        "not serving: start it first (ublkctl recover)",
                    ))
                }
            }
        };
        let json = |v: serde_json::Value| Ok(v);
        if !matches!(action, SnapshotCmd::List | SnapshotCmd::Export { .. }) {
            // What status and metrics show is listed again at the next round.
            if let Some(c) = self.live.lock().unwrap().snapshots.as_mut() {
                c.listed_ms = 0;
            }
        }
        match action {
            SnapshotCmd::Create { name: snap, freeze } => {
                let t0 = std::time::Instant::now();
                if !wire::names::valid_name(snap) || snap.len() > 64 {
                    return Err(DaemonError::BadRequest(format!(
                        "snapshot name {snap:?}: 1 to 64 letters, digits, '-', '_' or '.'"
                    )));
                }
                let existing = replication::snapshots::list(&health).map_err(fail)?;
                if existing.iter().any(|s| s.name == *snap && !s.deleting) {
                    return Err(DaemonError::Refused(format!(
                        "volume {name} already has a snapshot {snap:?}: pick another name, or delete it first"
                    )));
                }
                let _frozen = match (freeze, device) {
                    (false, _) => None,
                    (true, None) => {
                        return Err(DaemonError::volume(
                            &name,
                            "--freeze: the volume has no device",
                        ))
                    }
                    (true, Some(id)) => Some(
                        crate::freeze::Frozen::device(id)
                            .map_err(|e| DaemonError::volume(&name, format!("--freeze: {e}")))?,
                    ),
                };
                let uuid = wire::SnapshotUuid::random();
                // Recorded before writes are held: the next start undoes a barrier
                // this process dies in.
                if let Some(sink) = &sink {
                    sink.edit(|r| r.pending_snapshot = Some(uuid))?;
                }
                let created = replication::snapshots::create(
                    &health,
                    &ranges,
                    uuid,
                    snap,
                    replication::dirty_file::unix_ms(),
                );
                if let Some(sink) = &sink {
                    if let Err(e) = sink.edit(|r| r.pending_snapshot = None) {
                        tracing::warn!(volume = %name, error = %e, "cannot clear the snapshot under way from the record");
                    }
                }
                let created = created.map_err(fail)?;
                let mut v = serde_json::to_value(created).expect("serializes");
                // The whole command as the daemon ran it (freeze, barrier, records).
                v["took_us"] = (t0.elapsed().as_micros() as u64).into();
                json(v)
            }
            SnapshotCmd::List => json(
                serde_json::to_value(replication::snapshots::list(&health).map_err(fail)?)
                    .expect("serializes"),
            ),
            SnapshotCmd::Delete { snapshot } => {
                let s = replication::snapshots::find(&health, snapshot).map_err(fail)?;
                let n = replication::snapshots::delete(&health, s.uuid).map_err(fail)?;
                json(serde_json::json!({ "uuid": s.uuid, "name": s.name, "replicas": n }))
            }
            SnapshotCmd::Revert { snapshot } => {
                let s = replication::snapshots::find(&health, snapshot).map_err(fail)?;
                let Some(id) = device else {
                    return Err(DaemonError::volume(&name, "the volume has no device"));
                };
                // Held through the revert: no mount can start meanwhile, and the
                // page cache is dropped after it.
                let dev = crate::freeze::Exclusive::device(id)
                    .map_err(|e| DaemonError::volume(&name, format!("revert: {e}")))?;
                let took =
                    replication::snapshots::revert(&health, &ranges, s.uuid).map_err(fail)?;
                dev.drop_cache();
                json(serde_json::json!({
                    "uuid": s.uuid,
                    "name": s.name,
                    "paused_us": took.as_micros() as u64,
                }))
            }
            SnapshotCmd::Export {
                snapshot,
                path,
                format,
                since,
                backing_file,
                force,
            } => {
                let req = export::Request {
                    snapshot,
                    path,
                    format: *format,
                    since: since.as_deref(),
                    backing_file: backing_file.as_deref(),
                    force: *force,
                    peer,
                };
                json(self.export(&health, req)?)
            }
        }
    }

    /// A replica of the running set as an operator names it: its location, or
    /// `#N` with N its slot as `status` shows it. Returns its slot and location.
    pub fn replica_named(
        &self,
        health: &Health,
        replica: &str,
    ) -> Result<(SlotIndex, String), DaemonError> {
        let snap = health.snapshot();
        snap.slots
            .iter()
            .find(|s| {
                s.location == replica
                    || replica.trim_start_matches('#').parse::<u8>().ok() == Some(s.slot.0)
            })
            .map(|s| (s.slot, s.location.clone()))
            .ok_or_else(|| {
                let known: Vec<String> = snap
                    .slots
                    .iter()
                    .map(|s| format!("#{} {}", s.slot.0, s.location))
                    .collect();
                DaemonError::volume(
                    &self.cfg().name,
                    format!("no replica {replica:?}; its replicas: {}", known.join(", ")),
                )
            })
    }

    /// The health of a serving volume, for a replica named by an operator.
    pub fn serving_health(&self) -> Option<Arc<Health>> {
        self.live.lock().unwrap().health.clone()
    }

    pub fn status(&self) -> VolumeStatus {
        let state = self.state();
        let live = self.live.lock().unwrap();
        // Not serving (yet): the last persisted record, if the volume ever ran.
        let rec = match &live.health {
            Some(_) => None,
            None => self.state_dir.load(&self.cfg().name).ok().flatten(),
        };
        // The record in force: the serving one's, else the persisted one.
        let current = live
            .sink
            .as_ref()
            .map(|s| s.record())
            .or_else(|| rec.clone());
        let window = live
            .rebuilds
            .as_ref()
            .map_or(replication::rebuild::DEFAULT_PARTIAL_WINDOW, |m| {
                m.partial_window().get()
            });
        let (replicas, io) = match &live.health {
            Some(h) => (
                h.snapshot()
                    .slots
                    .iter()
                    .map(|s| {
                        // The slot number: what `ublkctl rebuild start VOL #N` takes.
                        let mut r = ReplicaStatus::of(
                            s.slot.0 as usize,
                            s.location.clone(),
                            Some(s.uuid),
                            Some(&s.state),
                            s.errors,
                        );
                        let map = h.dirty_map(s.slot);
                        r.missing_bytes = map.as_ref().map(|m| m.dirty_bytes());
                        if matches!(s.state, replication::ReplicaState::Faulted { .. }) {
                            r.full_rebuild = replication::rebuild::full_why(
                                map.map(|_| s.log),
                                replication::dirty_file::unix_ms(),
                                window,
                                false,
                            );
                        }
                        r
                    })
                    .collect(),
                h.stats.snapshot(),
            ),
            None => (
                rec.as_ref()
                    .map_or_else(|| self.cfg(), |r| r.effective(&self.cfg()))
                    .replicas
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let known = rec.as_ref().and_then(|rec| rec.replica(&r.location()));
                        ReplicaStatus::of(
                            i,
                            r.location(),
                            known.and_then(|k| k.uuid),
                            known.map(|k| &k.state),
                            known.map_or(0, |k| k.errors),
                        )
                    })
                    .collect(),
                IoStatsSnapshot::default(),
            ),
        };
        VolumeStatus {
            name: self.cfg().name.clone(),
            state,
            reason: live.reason.clone(),
            device: live
                .device_id
                .filter(|_| state.is_serving())
                .map(|id| format!("/dev/ublkb{id}")),
            device_id: live.device_id,
            generation: live.generation.0,
            size: self.cfg().size,
            block_size: self.cfg().block_size,
            queues: live.queues,
            depth: live.depth,
            ublk_flags: live.ublk_flags,
            read_policy: match &live.health {
                Some(h) => Some(h.read_policy()),
                None => rec.as_ref().map(|r| r.read_policy),
            },
            membership_epoch: match &live.health {
                Some(h) => Some(h.snapshot().membership.epoch.0),
                None => rec.as_ref().map(|r| r.membership.epoch.0),
            },
            replicas,
            rebuild: live.rebuilds.as_ref().and_then(|m| m.running()),
            export: live.export.as_ref().map(export::Running::status),
            snapshots: live.snapshots.clone(),
            schedule: self.cfg().snapshots.map(|s| ScheduleStatus {
                every_s: s.every_ms / 1000,
                keep: s.keep,
                freeze: s.freeze,
                failed_ms: live.schedule_error.as_ref().map(|e| e.0),
                error: live.schedule_error.as_ref().map(|e| e.1.clone()),
            }),
            io,
            substitutions: current
                .as_ref()
                .map(|r| r.substitutions.clone())
                .unwrap_or_default(),
            retired: current.map(|r| r.retired).unwrap_or_default(),
        }
    }
}

/// The right to decide about a running volume's replica set and its rebuilds:
/// reload, the HA monitor's replace and abandon, reclaim, dropping replaced
/// replicas, operator rebuild commands. One holder at a time
/// ([`VolumeShared::decider`]), and each decision takes its view of the set while
/// it holds it, so none acts on a view another one changed since (an abandon
/// racing the end of the replacement it abandons, a rebuild named by a slot a
/// reload just gave to another replica). Only a `Decider` has these methods.
pub struct Decider<'a> {
    v: &'a VolumeShared,
    _one: std::sync::MutexGuard<'a, ()>,
}

impl Decider<'_> {
    /// Apply a reload's replica changes to the running volume (`new` is its new
    /// configuration): each change with its outcome. A volume that does not serve
    /// only takes the new configuration (its next start opens what it lists).
    pub fn apply_replicas(
        &self,
        new: &VolumeConfig,
        changes: &[crate::reload::Change],
        net: &Net,
    ) -> Vec<(crate::reload::Change, Result<(), String>)> {
        use crate::reload::Change;
        let (health, sink) = {
            let live = self.v.live.lock().unwrap();
            (live.health.clone(), live.sink.clone())
        };
        *self.v.cfg.lock().unwrap() = new.clone();
        let Some(health) = health else {
            return changes.iter().map(|c| (c.clone(), Ok(()))).collect();
        };
        let record = match self.v.state_dir.load(&new.name) {
            Ok(Some(r)) => r,
            _ => {
                return changes
                    .iter()
                    .map(|c| (c.clone(), Err("the volume's record is unreadable".into())))
                    .collect()
            }
        };
        let slot_at = |loc: &str| {
            health
                .snapshot()
                .slots
                .into_iter()
                .find(|s| s.location == loc)
        };
        let add = |loc: &str| -> Result<wire::ReplicaUuid, String> {
            let r = new
                .replicas
                .iter()
                .find(|r| r.location() == loc)
                .ok_or("not in the new config")?;
            let (backing, uuid, client) = activate::open_added(new, net, r, &record)?;
            let slot = health
                .add_slot(replication::health::SlotSpec {
                    location: loc.to_string(),
                    uuid,
                    backing: Some(backing),
                    remote: r.remote().is_some(),
                    state: replication::ReplicaState::Faulted {
                        reason: replication::state::FaultReason::NewReplica,
                    },
                    errors: 0,
                    dirty: None,
                })
                .map_err(|e| e.to_string())?;
            if let Some(c) = client {
                c.set_events(health.conn_events(slot));
            }
            if let Some(sink) = &sink {
                // Its storage was (re)labelled with a new identity just now.
                sink.edit(|r| r.unretire(loc)).map_err(|e| e.to_string())?;
            }
            tracing::info!(volume = %new.name, replica = %loc, "replica added: a full rebuild fills it");
            Ok(uuid)
        };
        let remove = |loc: &str| -> Result<(), String> {
            let s = slot_at(loc).ok_or("not in the running set")?;
            health.remove_slot(s.slot).map_err(|e| e.to_string())?;
            if let Some(sink) = &sink {
                sink.edit(|r| r.retire(loc, s.uuid, crate::state::RetiredWhy::Removed))
                    .map_err(|e| e.to_string())?;
            }
            tracing::info!(volume = %new.name, replica = %loc,
                "replica removed (its storage is kept: `ublkctl replica reclaim` deletes it)");
            Ok(())
        };
        // A change of a configured replica the HA monitor substituted applies to
        // its substitute, and ends the substitution: the config speaks again.
        let substitute = |configured: &str| {
            sink.as_ref()
                .and_then(|s| s.record().substitution_of(configured).cloned())
        };
        let unsubstitute = |configured: &str| -> Result<(), String> {
            match &sink {
                Some(s) => s
                    .edit(|r| r.substitutions.retain(|x| x.configured != configured))
                    .map_err(|e| e.to_string()),
                None => Ok(()),
            }
        };
        changes
            .iter()
            .map(|c| {
                let res = match c {
                    Change::ReplicaAdded { replica, .. } => add(replica).map(|_| ()),
                    Change::ReplicaRemoved { replica, .. } => match substitute(replica) {
                        Some(sub) => remove(&sub.location()).and_then(|()| unsubstitute(replica)),
                        None => remove(replica),
                    },
                    // The config now names what the monitor put in place.
                    Change::ReplicaReplaced { old, new: n, .. }
                        if substitute(old).is_some_and(|sub| sub.location() == *n) =>
                    {
                        tracing::info!(volume = %new.name, replica = %n,
                            "the config now names the HA replacement: substitution ended");
                        unsubstitute(old)
                    }
                    Change::ReplicaReplaced { old, new: n, .. } => add(n).and_then(|uuid| {
                        let running = match substitute(old) {
                            Some(sub) => {
                                unsubstitute(old)?;
                                sub.location()
                            }
                            None => old.clone(),
                        };
                        let old = &running;
                        match slot_at(old) {
                            // Kept until the new one holds every write (a Connecting
                            // one may hold the only current copy).
                            Some(s)
                                if matches!(
                                    s.state,
                                    replication::ReplicaState::Online
                                        | replication::ReplicaState::Connecting
                                ) =>
                            {
                                self.v.track_replacement(old, s.uuid, uuid, sink.as_deref())
                            }
                            Some(_) => remove(old),
                            None => Ok(()),
                        }
                    }),
                    _ => Ok(()),
                };
                if let Err(e) = &res {
                    tracing::error!(volume = %new.name, change = %c, error = %e, "reload: change not applied");
                }
                (c.clone(), res)
            })
            .collect()
    }

    /// Swap a new replica on `to` in for the running replica `old` (the HA
    /// monitor's, or an operator's, replacement): create it there, record the
    /// substitution, add it to the running set (it takes writes at once and a full
    /// rebuild fills it); `old` stays in the set, faulted or not, until the new
    /// one is online. Returns the new replica's location.
    pub fn ha_replace(
        &self,
        old: &str,
        to: &ha::PeerAddr,
        reason: ha::event::ReplaceReason,
        net: &Net,
    ) -> Result<String, String> {
        let (health, sink) = self.v.serving_parts()?;
        let cfg = self.v.cfg();
        let snap = health.snapshot();
        let old_slot = snap
            .slots
            .iter()
            .find(|s| s.location == old)
            .ok_or_else(|| format!("no replica {old} in the running set"))?;
        if snap
            .slots
            .iter()
            .any(|s| peer_of(&s.location).as_ref() == Some(to))
        {
            return Err(format!("{to} already holds a replica of this volume"));
        }
        // A full rebuild fills the replacement, from an online replica (the old one
        // too, when it is online: a move). With none online it could never be
        // filled, and would only wait beside the member the volume waits for.
        if !snap
            .slots
            .iter()
            .any(|s| s.state == replication::ReplicaState::Online)
        {
            return Err(format!(
                "no replica is online to rebuild a replacement of {old} from: wait until one is back (ublkctl status {})",
                cfg.name
            ));
        }
        // A remote replica keeps its id on the new server; a local one is named
        // after the volume and its slot.
        let id = match old.split_once('@') {
            Some((id, _)) => id.to_string(),
            None => format!("{}-{}", cfg.name, old_slot.slot.0),
        };
        let new_cfg = crate::config::ReplicaConfig::Remote {
            addr: to.to_string(),
            id: id.clone(),
        };
        let location = new_cfg.location();
        let record = sink.record();
        let (backing, uuid, client) = activate::open_added(&cfg, net, &new_cfg, &record)?;
        sink.edit(|r| {
            r.unretire(&location);
            r.substitute(
                old,
                crate::state::Substitution {
                    configured: String::new(),
                    addr: to.to_string(),
                    id,
                    since: ha::UnixMs(replication::dirty_file::unix_ms()),
                    reason,
                },
            )
        })
        .map_err(|e| format!("record the substitution: {e}"))?;
        let slot = health
            .add_slot(replication::health::SlotSpec {
                location: location.clone(),
                uuid,
                backing: Some(backing),
                remote: true,
                state: replication::ReplicaState::Faulted {
                    reason: FaultReason::NewReplica,
                },
                errors: 0,
                dirty: None,
            })
            .map_err(|e| e.to_string())?;
        if let Some(c) = client {
            c.set_events(health.conn_events(slot));
        }
        // Only a member may hold what the new one still lacks: a faulted old one
        // (its server dead) need not outlive a restart.
        let member = matches!(
            old_slot.state,
            replication::ReplicaState::Online | replication::ReplicaState::Connecting
        );
        self.v
            .track_replacement(old, old_slot.uuid, uuid, member.then_some(&*sink))?;
        tracing::info!(volume = %cfg.name, old = %old, new = %location,
            "replacement added: a full rebuild fills it, the old replica goes once it is online");
        Ok(location)
    }

    /// Reclaim the storage of retired replicas (`which`: one location or uuid,
    /// else all): those reclaimed, already gone or holding something else now
    /// leave the record; those that fail stay in it.
    pub fn reclaim(&self, which: Option<&str>, net: &Net) -> Result<Vec<ReclaimResult>, String> {
        let (health, sink) = self.v.serving_parts()?;
        let record = sink.record();
        let chosen: Vec<_> = record
            .retired
            .iter()
            .filter(|r| which.is_none_or(|w| r.location == w || r.uuid.to_string() == w))
            .cloned()
            .collect();
        if chosen.is_empty() {
            let all: Vec<&str> = record.retired.iter().map(|r| r.location.as_str()).collect();
            return Err(match (which, all.is_empty()) {
                (_, true) => "no retired replica: nothing to reclaim".into(),
                (Some(w), false) => {
                    format!("no retired replica {w}; retired: {}", all.join(", "))
                }
                (None, false) => unreachable!("all chosen"),
            });
        }
        let running: Vec<String> = health
            .snapshot()
            .slots
            .into_iter()
            .map(|s| s.location)
            .collect();
        let cfg = self.v.cfg();
        let mut out = Vec::new();
        for r in chosen {
            let res = if running.contains(&r.location) {
                Ok(activate::Reclaimed::NotOurs {
                    holds: "a replica of the running set (it was added again)".into(),
                })
            } else {
                activate::reclaim(&cfg, net, &record, &r)
            };
            match &res {
                Ok(done) => {
                    tracing::info!(volume = %cfg.name, replica = %r.location, result = ?done, "retired replica reclaimed");
                    sink.edit(|rec| rec.unretire(&r.location))
                        .map_err(|e| format!("record: {e}"))?;
                }
                Err(e) => {
                    tracing::warn!(volume = %cfg.name, replica = %r.location, error = %e, "retired replica not reclaimed")
                }
            }
            out.push((r, res));
        }
        Ok(out)
    }

    /// Drop the half-built replacement `new` of `old` (which came back and is
    /// caught up instead); the substitution goes back to `old`.
    pub fn ha_abandon(&self, old: &str, new: &str) -> Result<(), String> {
        let (health, sink) = self.v.serving_parts()?;
        let snap = health.snapshot();
        let new_slot = snap
            .slots
            .iter()
            .find(|s| s.location == new)
            .ok_or_else(|| format!("no replica {new} in the running set"))?;
        // The monitor decided on an earlier view: the replacement may have come
        // online since, and the old replica been dropped for it (abandoning it now
        // would leave the volume a replica short), or the old one be gone.
        if new_slot.state == replication::ReplicaState::Online {
            return Err(format!(
                "{new} is online now: the replacement finished, nothing to abandon"
            ));
        }
        if !snap.slots.iter().any(|s| s.location == old) {
            return Err(format!(
                "{old} is no longer in the running set: {new} is its replacement, kept"
            ));
        }
        health
            .remove_slot(new_slot.slot)
            .map_err(|e| e.to_string())?;
        self.v
            .live
            .lock()
            .unwrap()
            .replacing
            .retain(|(_, n)| *n != new_slot.uuid);
        sink.edit(|r| {
            r.replacing.retain(|x| x.new_uuid != new_slot.uuid);
            r.retire(
                new,
                new_slot.uuid,
                crate::state::RetiredWhy::Abandoned {
                    of: old.to_string(),
                },
            );
            let Some(i) = r.substitutions.iter().position(|s| s.location() == new) else {
                return;
            };
            match old.split_once('@') {
                // `old` was itself a substitute: it is again.
                Some((id, addr)) if r.substitutions[i].configured != old => {
                    r.substitutions[i].id = id.to_string();
                    r.substitutions[i].addr = addr.to_string();
                }
                _ => {
                    r.substitutions.remove(i);
                }
            }
        })
        .map_err(|e| format!("record: {e}"))?;
        tracing::info!(volume = %self.v.cfg().name, old = %old, new = %new,
            "the old replica came back lacking less: its replacement is dropped");
        Ok(())
    }

    /// Drop the replaced replicas whose replacement is online.
    pub fn finish_replacements(&self, health: &Health) {
        let pending = std::mem::take(&mut self.v.live.lock().unwrap().replacing);
        let snap = health.snapshot();
        let state = |u: &wire::ReplicaUuid| snap.slots.iter().find(|s| s.uuid == *u);
        let mut keep = Vec::new();
        for (old, new) in pending {
            match (state(&old), state(&new)) {
                (Some(o), Some(n)) if n.state == replication::ReplicaState::Online => {
                    match health.remove_slot(o.slot) {
                        Ok(()) => {
                            tracing::info!(volume = %self.v.cfg().name, old = %o.location,
                                new = %n.location, "replacement online: the old replica is dropped (its storage is kept: `ublkctl replica reclaim` deletes it)");
                            let sink = self.v.live.lock().unwrap().sink.clone();
                            let why = crate::state::RetiredWhy::Replaced {
                                by: n.location.clone(),
                            };
                            let done = |r: &mut crate::state::VolumeRecord| {
                                r.replacing.retain(|x| x.old_uuid != old);
                                r.retire(&o.location, o.uuid, why)
                            };
                            if let Some(Err(e)) = sink.map(|s| s.edit(done)) {
                                tracing::warn!(volume = %self.v.cfg().name, replica = %o.location, error = %e,
                                    "cannot record the retired replica: reclaim it by hand");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(volume = %self.v.cfg().name, replica = %o.location, error = %e,
                                "cannot drop the replaced replica yet");
                            keep.push((old, new));
                        }
                    }
                }
                (Some(_), Some(_)) => keep.push((old, new)),
                // One of them left the set otherwise: nothing to finish.
                _ => {
                    let sink = self.v.live.lock().unwrap().sink.clone();
                    if let Some(Err(e)) =
                        sink.map(|s| s.edit(|r| r.replacing.retain(|x| x.old_uuid != old)))
                    {
                        tracing::warn!(volume = %self.v.cfg().name, error = %e,
                            "cannot record the end of a replacement");
                    }
                }
            }
        }
        self.v.live.lock().unwrap().replacing.extend(keep);
    }

    /// Apply an operator's rebuild command.
    pub fn rebuild(
        &self,
        action: &crate::control::RebuildAction,
    ) -> Result<serde_json::Value, DaemonError> {
        use crate::control::RebuildAction;
        let (health, manager) = {
            let live = self.v.live.lock().unwrap();
            match (&live.health, &live.rebuilds) {
                (Some(h), Some(m)) => (h.clone(), m.clone()),
                _ => {
                    return Err(DaemonError::volume(
                        &self.v.cfg().name,
                        "not serving: start it first (ublkctl recover)",
                    ))
                }
            }
        };
        let slot_of = |replica: &str| self.v.replica_named(&health, replica).map(|(slot, _)| slot);
        fn v<T: Serialize>(x: &T) -> serde_json::Value {
            serde_json::to_value(x).expect("rebuild types serialize")
        }
        Ok(match action {
            RebuildAction::Start { replica, full } => {
                let slot = slot_of(replica)?;
                manager
                    .request(slot, *full)
                    .map_err(|e| DaemonError::volume(&self.v.cfg().name, e.to_string()))?;
                v(&slot)
            }
            RebuildAction::Cancel { replica } => {
                let slot = replica.as_deref().map(slot_of).transpose()?;
                v(&manager.cancel(slot))
            }
            RebuildAction::History => v(&manager.history()),
        })
    }
}

/// The server of a replica's location (`id@host:port`; `None` for a path), in
/// the canonical form the config gives spares.
pub fn peer_of(location: &str) -> Option<ha::PeerAddr> {
    let (_, addr) = location.split_once('@')?;
    let canonical = crate::config::check_remote_addr(addr).ok()?;
    ha::PeerAddr::new(&canonical).ok()
}

/// What volumes with remote replicas need from the daemon.
#[derive(Clone)]
pub struct Net {
    /// The daemon's network runtime (replica connections live there).
    pub rt: tokio::runtime::Handle,
    /// `None` when no cluster secret is configured (then no remote replicas exist).
    pub secret: Option<Secret>,
    /// Per-request deadline for remote replicas.
    pub io_timeout: Duration,
    /// How long I/O waits for the last current replica to come back.
    pub no_replica_timeout: Duration,
    /// The node's rebuild budget (`[rebuild]` rate and concurrency).
    pub rebuild: Arc<replication::rebuild::NodeLimits>,
    /// `[rebuild] partial_window_s` (a reload changes it).
    pub partial_window_s: Arc<std::sync::atomic::AtomicU32>,
    /// `[rebuild] grain`: bytes per dirty-map region.
    pub grain: u32,
    pub frontend: Frontend,
}

impl Net {
    /// The node's settings from `cfg`, replica connections on `rt`.
    pub fn new(
        cfg: &crate::config::Config,
        rt: tokio::runtime::Handle,
        secret: Option<Secret>,
        frontend: Frontend,
    ) -> Net {
        Net {
            rt,
            secret,
            io_timeout: Duration::from_millis(cfg.node.io_timeout_ms.into()),
            no_replica_timeout: Duration::from_millis(cfg.node.no_replica_timeout_ms.into()),
            rebuild: replication::rebuild::NodeLimits::new(
                cfg.rebuild.rate,
                cfg.rebuild.busy_percent,
                cfg.rebuild.max_concurrent,
            ),
            partial_window_s: Arc::new(cfg.rebuild.partial_window_s.into()),
            grain: cfg.rebuild.grain,
            frontend,
        }
    }
}

/// What serves a volume's I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frontend {
    /// A ublk device, `/dev/ublkbN`.
    Ublk,
    /// No device: only callers in this process, through [`VolumeShared::nexus`]
    /// (the daemon's host tests, where no ublk driver exists; everything else —
    /// activation, replicas, rebuilds, HA, reload — runs as with a device).
    Headless,
}

/// A running (or finished) volume thread.
pub struct VolumeRunner {
    pub shared: Arc<VolumeShared>,
    cmd: Sender<VolumeCmd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl VolumeRunner {
    /// `device_id`: the id the daemon claimed for this volume (configured, recorded,
    /// or the lowest one nobody owns); `None` lets the kernel pick.
    /// Start the volume's thread; `force_takeover`: the operator said to take the
    /// volume over even from a newer owner ([`activate::activate`]).
    pub fn spawn(
        cfg: VolumeConfig,
        state_dir: StateDir,
        device_id: Option<u32>,
        net: Net,
        force_takeover: bool,
    ) -> VolumeRunner {
        let shared = Arc::new(VolumeShared {
            cfg: Mutex::new(cfg.clone()),
            state_dir: state_dir.clone(),
            live: Mutex::new(Live {
                device_id,
                ..Live::default()
            }),
            decide: Mutex::new(()),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let look = tx.clone();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vol-{}", cfg.name))
            .spawn(move || {
                let cmd = (look, rx);
                if let Err(e) = run(&cfg, &state_dir, device_id, &net, &sh, cmd, force_takeover) {
                    tracing::error!(volume = %cfg.name, error = %e, "volume failed");
                    sh.set_state(VolumeState::Failed, Some(e.to_string()));
                }
            })
            .expect("spawn volume thread");
        VolumeRunner {
            shared,
            cmd: tx,
            thread: Some(thread),
        }
    }

    /// Status of a configured volume that was never started.
    pub fn not_started(cfg: &VolumeConfig, state_dir: &StateDir) -> VolumeStatus {
        VolumeShared {
            cfg: Mutex::new(cfg.clone()),
            state_dir: state_dir.clone(),
            live: Mutex::new(Live::default()),
            decide: Mutex::new(()),
        }
        .status()
    }

    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Ask the volume to stop (drain I/O, remove the device) and wait for it.
    pub fn stop(&mut self) {
        if let Some(t) = self.request_stop() {
            let _ = t.join();
        }
    }

    /// Ask the volume to stop; the caller joins the returned thread.
    pub fn request_stop(&mut self) -> Option<std::thread::JoinHandle<()>> {
        let _ = self.cmd.send(VolumeCmd::Stop);
        self.thread.take()
    }

    /// Ask the volume to leave its device to the next ublkd; the receiver says
    /// whether it was left clean (nothing comes when it cannot answer in time).
    pub fn request_hand_over(&self) -> std::sync::mpsc::Receiver<bool> {
        let (tx, rx) = std::sync::mpsc::channel();
        let _ = self.cmd.send(VolumeCmd::HandOver(tx));
        rx
    }
}

fn run(
    cfg: &VolumeConfig,
    state_dir: &StateDir,
    claimed_id: Option<u32>,
    net: &Net,
    shared: &Arc<VolumeShared>,
    (look, cmd): (Sender<VolumeCmd>, Receiver<VolumeCmd>),
    force_takeover: bool,
) -> Result<(), DaemonError> {
    shared.set_state(VolumeState::Starting, None);

    // 1. The record, and the device: a LIVE one served by another daemon must stop
    //    us before we touch (and wait for the locks of) its replicas.
    let record = state_dir.load(&cfg.name)?;
    if let Some(rec) = &record {
        rec.check_geometry(cfg)?;
    }
    // What the HA monitor replaced runs in place of what the config lists.
    let effective = record.as_ref().map(|r| r.effective(cfg));
    let cfg = effective.as_ref().unwrap_or(cfg);
    let uid = record.as_ref().map(|r| r.uid);
    let mode = match record.as_ref().and_then(|r| r.device_id).or(claimed_id) {
        Some(id) if ublk_device_exists(id) => match uid {
            Some(uid) => device::inspect_existing(cfg, uid, id)?,
            None => {
                return Err(DaemonError::volume(
                    &cfg.name,
                    format!("/dev/ublkb{id} exists but this volume has no record: it is not ours"),
                ))
            }
        },
        Some(id) => Mode::Add { id: id as i32 },
        None => Mode::Add { id: -1 },
    };

    // 2. Activation: who is trusted, at which generation.
    let mut stop_asked = |wait: Duration| match cmd.recv_timeout(wait) {
        // Nothing to hand over yet: its answer (not clean) ends the wait for it.
        Ok(VolumeCmd::HandOver(done)) => {
            let _ = done.send(false);
            true
        }
        Ok(VolumeCmd::Stop) | Err(RecvTimeoutError::Disconnected) => true,
        Ok(VolumeCmd::Look) | Err(RecvTimeoutError::Timeout) => false,
    };
    // Recovering a QUIESCED device after another owner took the volume over would
    // let the kernel re-issue the dead daemon's writes onto the newer owner's data
    // (and the filesystem above resume on a stale view of it): refused, before any
    // replica is opened (opening would fence that owner).
    let recovering = matches!(mode, Mode::Recover { .. });
    let mut act = match activate(
        cfg,
        net,
        state_dir,
        record,
        force_takeover && !recovering,
        &mut stop_asked,
        &mut |why| shared.set_reason(why),
    ) {
        Ok(a) => a,
        Err(Halt::Stopped) => {
            shared.set_state(VolumeState::Stopped, None);
            return Ok(());
        }
        Err(Halt::TakenOver(g)) => {
            let why = match mode {
                Mode::Recover { id, .. } => {
                    device::remove_stale(cfg, id);
                    format!(
                        "another owner activated this volume (generation {}) after /dev/ublkb{id} was created: not recovering it; the device is removed (if that owner is gone for good: ublkctl recover {} --force-takeover)",
                        g.0, cfg.name
                    )
                }
                _ => format!(
                    "another owner (generation {}) has run this volume since this node did: not starting it, which would fence that owner and could roll back what it acknowledged (if that owner is gone for good: ublkctl recover {} --force-takeover)",
                    g.0, cfg.name
                ),
            };
            tracing::error!(volume = %cfg.name, reason = %why, "fenced");
            record_fenced(state_dir, &cfg.name, g);
            shared.set_state(VolumeState::Fenced, Some(why));
            return Ok(());
        }
        Err(Halt::Failed(e)) => return Err(e),
    };
    if matches!(mode, Mode::Recover { .. }) {
        shared.set_state(VolumeState::Recovering, None);
    }
    let mut record = act.record.clone();
    let (logs, resync) = restore_logs(
        cfg,
        net,
        state_dir,
        &mut record,
        &mut act,
        matches!(mode, Mode::Add { .. }),
    );
    // `clean` is cleared only once the device serves (device_fn): a start that fails
    // before that changed no data and must not count as an unclean shutdown.
    state_dir.save(&record)?;

    // 3. Health and data path.
    let (cheap_zeroing, local_replicas) = (act.cheap_zeroing, act.local_replicas);
    let remotes = std::mem::take(&mut act.remotes);
    let (health, sink) = health_of(cfg, net, state_dir, &record, act.slots, &remotes, logs)?;
    health.fence().on_trip(Box::new(move || {
        let _ = look.send(VolumeCmd::Look);
    }));
    let generation = record.generation;
    tracing::info!(volume = %cfg.name, generation = generation.0,
        membership_epoch = health.snapshot().membership.epoch.0,
        "activated: this node owns the replicas at this generation");
    let stop_reopen = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        std::thread::Builder::new()
            .name(format!("house-{}", cfg.name))
            .spawn_scoped(sc, || {
                housekeeping(cfg, net, &record, &health, shared, &stop_reopen)
            })
            .map_err(|e| DaemonError::volume(&cfg.name, format!("start a thread: {e}")))?;
        let out = serve(
            cfg,
            net,
            shared,
            &health,
            &sink,
            generation,
            mode,
            record.uid,
            cheap_zeroing,
            local_replicas,
            resync,
            cmd,
        );
        stop_reopen.store(true, std::sync::atomic::Ordering::SeqCst);
        health.signal().notify();
        out
    })
}

/// On each change of the volume's state, and every 2 s while there are any: keep
/// OPENing the remote replicas activation could not reach (their node was down), so
/// that the rebuild manager can catch them up once they are back; drop replaced
/// replicas whose replacement is online.
fn housekeeping(
    cfg: &VolumeConfig,
    net: &Net,
    record: &crate::state::VolumeRecord,
    health: &Arc<Health>,
    shared: &VolumeShared,
    stop: &std::sync::atomic::AtomicBool,
) {
    let mut failed_once = std::collections::HashSet::new();
    loop {
        // The version before the stop flag: a stop between the two is then a change
        // seen by the wait below (the stop sets the flag, then notifies).
        let version = health.signal().version();
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        shared.decider().finish_replacements(health);
        let snap = health.snapshot();
        let unopened = health.unopened();
        for (slot, location) in &unopened {
            let (slot, location) = (*slot, location.clone());
            let Some(r) = cfg
                .replicas
                .iter()
                .find(|r| r.remote().is_some() && r.location() == location)
            else {
                continue;
            };
            let Some(uuid) = snap.slots.iter().find(|s| s.slot == slot).map(|s| s.uuid) else {
                continue;
            };
            match activate::reopen(cfg, net, r, record, uuid) {
                Ok((client, _)) => {
                    client.set_events(health.conn_events(slot));
                    match health.attach_backing(slot, replication::backing::Backing::Remote(client))
                    {
                        Ok(()) => tracing::info!(volume = %cfg.name, replica = %location,
                            "replica reachable again: it will be rebuilt"),
                        Err(e) => {
                            tracing::warn!(volume = %cfg.name, replica = %location, error = %e,
                            "cannot take the reopened replica")
                        }
                    }
                }
                Err(e) => {
                    if failed_once.insert(location.clone()) {
                        tracing::info!(volume = %cfg.name, replica = %location, error = %e,
                            "replica still unreachable: retrying every 2 s");
                    }
                }
            }
        }
        // A replacement comes online and the stop are state changes: only an
        // unreachable replica (or a replaced one not dropped yet) needs the clock.
        let retry = !unopened.is_empty() || shared.replacing();
        let _ = futures::executor::block_on(health.signal().changed(
            version,
            retry.then(|| std::time::Instant::now() + Duration::from_secs(2)),
            None,
        ));
    }
}

/// What the last run left in the volume's log dir, applied to a fresh activation:
/// saved dirty maps go to the replicas they can be trusted for (partial rebuilds),
/// and after an unclean end the activity log's hot extents are added to them and,
/// when no device is recovered (`no_device`: the host went down, not only the
/// daemon), resynced across the online replicas (returned; reads are pinned to one
/// replica until then). Returns the log dir for the health.
pub fn restore_logs(
    cfg: &VolumeConfig,
    net: &Net,
    state_dir: &StateDir,
    record: &mut crate::state::VolumeRecord,
    act: &mut activate::Activated,
    no_device: bool,
) -> (
    replication::health::LogDir,
    Vec<(replication::ByteOffset, replication::ByteLen)>,
) {
    let online = act
        .slots
        .iter()
        .filter(|s| s.state == replication::ReplicaState::Online)
        .count();
    let mut logs = log_dir(state_dir, cfg, record);
    let mut saved = logs.saved();
    // A whole-volume resync that did not end: as unknown as a lost log.
    saved.al_lost |= record.resync_whole;
    // An unclean end (a crash of the daemon or of the host) may have left
    // mutations in flight in the activity log's hot extents, and marks of
    // acknowledged ones not yet saved in the dirty maps: both are over there.
    let in_flight = saved.in_flight(replication::ByteLen(cfg.size));
    let unclean = if record.clean {
        &[][..]
    } else {
        &in_flight[..]
    };
    attach_saved_maps(cfg, net, record, act, saved.maps, unclean);
    for e in &saved.unreadable {
        tracing::warn!(volume = %cfg.name, error = %e, "a saved log cannot be read (its replica gets a full rebuild)");
    }
    let mut resync = Vec::new();
    // No clean stop and no device to recover: the host went down with writes in
    // flight, which may have reached some replicas only. (A daemon crash is
    // different: the kernel re-issues those writes to the recovered device.) Or a
    // resync that did not finish (reads still pinned): its extents are still hot.
    let pinned = record.read_policy == ReadPolicy::Primary;
    if (pinned || !record.clean && no_device) && online > 1 {
        tracing::warn!(volume = %cfg.name, bytes = in_flight.iter().map(|r| r.1 .0).sum::<u64>(),
            "unclean shutdown: resyncing where writes may have been in flight; reads stay on one replica until then");
        record.read_policy = ReadPolicy::Primary;
        record.resync_whole = saved.al_lost;
        resync = in_flight;
        // Kept hot until the resync ends: a crash meanwhile finds them again.
        logs.carry = saved.hot;
    }
    (logs, resync)
}

/// The owner's log dir of a volume.
pub fn log_dir(
    state_dir: &StateDir,
    cfg: &VolumeConfig,
    record: &crate::state::VolumeRecord,
) -> replication::health::LogDir {
    replication::health::LogDir {
        dir: state_dir.logs_dir(&cfg.name),
        volume_uuid: record.volume_uuid,
        al_capacity: AL_CAPACITY,
        carry: Vec::new(),
    }
}

/// Give each replica out of the write set the dirty map the last run saved for
/// it, when it can be trusted ([`check_saved_map`]): it gets a partial rebuild
/// instead of a full one. `in_flight` is added to every map.
fn attach_saved_maps(
    cfg: &VolumeConfig,
    net: &Net,
    record: &crate::state::VolumeRecord,
    act: &mut activate::Activated,
    mut maps: Vec<(
        replication::dirty_file::DirtyHeader,
        replication::dirty::DirtyMap,
    )>,
    in_flight: &[(replication::ByteOffset, replication::ByteLen)],
) {
    use replication::activation::{check_saved_map, MapCheck};
    let taken_over = act.takeover;
    for (slot, label) in act.slots.iter_mut().zip(&act.labels) {
        if slot.state.in_write_set() {
            continue;
        }
        let Some(i) = maps.iter().position(|(h, _)| h.replica == slot.uuid) else {
            tracing::info!(volume = %cfg.name, replica = %slot.location,
                "no saved dirty map: it gets a full rebuild once reachable");
            continue;
        };
        let (header, map) = maps.swap_remove(i);
        let check = MapCheck {
            volume_uuid: record.volume_uuid,
            replica_uuid: slot.uuid,
            size: cfg.size,
            grain: replication::dirty::Grain(net.grain),
            label: label.as_ref(),
            now_unix_ms: replication::dirty_file::unix_ms(),
            partial_window: partial_window(cfg, net),
            taken_over,
        };
        match check_saved_map(&header, &check) {
            Ok(()) => {
                for (o, l) in in_flight {
                    map.mark(*o, *l);
                }
                tracing::info!(volume = %cfg.name, replica = %slot.location,
                    missing_bytes = map.dirty_bytes(), kind = ?header.origin.kind,
                    "dirty map kept across the restart: a partial rebuild catches it up");
                slot.dirty = Some(replication::health::Log {
                    map: Arc::new(map),
                    origin: header.origin,
                });
            }
            Err(why) => {
                tracing::warn!(volume = %cfg.name, replica = %slot.location, reason = %why,
                    "saved dirty map not used: full rebuild");
            }
        }
    }
}

/// The health of an activated volume, persisting into its record; remote clients
/// report their connection events to it.
pub fn health_of(
    cfg: &VolumeConfig,
    net: &Net,
    state_dir: &StateDir,
    record: &crate::state::VolumeRecord,
    slots: Vec<replication::health::SlotSpec>,
    remotes: &[(usize, Arc<replication::remote::RemoteClient>)],
    logs: replication::health::LogDir,
) -> Result<(Arc<Health>, Arc<RecordSink>), DaemonError> {
    let sink = Arc::new(RecordSink::new(state_dir.clone(), record.clone()));
    let health = Health::new(
        HealthConfig {
            generation: record.generation,
            membership: record.membership.clone(),
            no_replica_timeout: net.no_replica_timeout,
            volume: cfg.name.clone(),
            size: replication::ByteLen(cfg.size),
            grain: replication::dirty::Grain(net.grain),
            logs: Some(logs),
        },
        slots,
        Box::new(sink.clone()),
    )?;
    for (i, client) in remotes {
        client.set_events(health.conn_events(SlotIndex(*i as u8)));
    }
    health.set_read_policy(record.read_policy);
    Ok((health, sink))
}

/// Hot 4 MiB extents of a volume's activity log: 4 GiB, so a workload's working set
/// of up to that size commits nothing once warm.
const AL_CAPACITY: usize = 1024;

/// The volume's partial-rebuild window: its own, else the node's.
pub fn partial_window(cfg: &VolumeConfig, net: &Net) -> Duration {
    let node = net
        .partial_window_s
        .load(std::sync::atomic::Ordering::Acquire);
    Duration::from_secs(cfg.partial_window_s.unwrap_or(node).into())
}

/// Add (or recover) the device, serve until stopped or fenced, then take it down.
#[allow(clippy::too_many_arguments)]
fn serve(
    cfg: &VolumeConfig,
    net: &Net,
    shared: &Arc<VolumeShared>,
    health: &Arc<Health>,
    sink: &Arc<RecordSink>,
    generation: Generation,
    mode: Mode,
    uid: u32,
    cheap_zeroing: bool,
    local_replicas: usize,
    resync: Vec<(replication::ByteOffset, replication::ByteLen)>,
    cmd: Receiver<VolumeCmd>,
) -> Result<(), DaemonError> {
    let device = match mode {
        Mode::Add { id } => Device {
            id,
            queues: cfg.queues,
            depth: cfg.depth,
            max_io: cfg.max_io_bytes,
            dev_flags: UblkFlags::UBLK_DEV_F_ADD_DEV,
            uid,
        },
        Mode::Recover {
            id,
            queues,
            depth,
            max_io,
        } => {
            device::start_recovery(cfg, id)?;
            Device {
                id: id as i32,
                queues,
                depth,
                max_io,
                dev_flags: UblkFlags::UBLK_DEV_F_RECOVER_DEV,
                uid,
            }
        }
    };
    // Before the first write: a barrier the previous owner died in is undone.
    if let Some(uuid) = sink.record().pending_snapshot {
        replication::snapshots::settle_half_taken(health, uuid);
        sink.edit(|r| r.pending_snapshot = None)?;
    }
    {
        let mut live = shared.live.lock().unwrap();
        live.generation = generation;
        live.health = Some(health.clone());
        live.sink = Some(sink.clone());
        // Replacements a restart interrupted: finished once the new one is online.
        live.replacing = sink
            .record()
            .replacing
            .iter()
            .map(|r| (r.old_uuid, r.new_uuid))
            .collect();
        live.queues = device.queues;
        live.depth = device.depth;
    }

    let dp = Arc::new(DataPath {
        volume: cfg.name.clone(),
        geometry: Geometry {
            size: cfg.size,
            block_size: cfg.block_size,
            max_io_bytes: device.max_io,
        },
        health: health.clone(),
        ranges: RangeTable::new(),
        discard: cheap_zeroing,
        local_replicas,
        hand_over: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    });
    // Faulted replicas come back on their own once reachable: partial when what they
    // missed is logged, else full. Dropped (cancelled) before the health stops.
    // The record says "in use" before the first copy: a host crash from then on
    // must find the activity log's extents (the copier's too) to resync.
    now_in_use(&cfg.name, sink);
    let rebuilds = Arc::new(replication::rebuild::Manager::start(
        health.clone(),
        dp.ranges.clone(),
        replication::rebuild::ManagerConfig {
            chunk: replication::ByteLen(1 << 20),
            partial_window: replication::rebuild::PartialWindow::new(partial_window(cfg, net)),
            limits: net.rebuild.clone(),
            resync,
            history: health.log_dir().map(|d| d.join("rebuilds.json")),
        },
    )?);
    {
        let mut live = shared.live.lock().unwrap();
        live.rebuilds = Some(rebuilds.clone());
        live.ranges = Some(dp.ranges.clone());
    }
    if !cheap_zeroing {
        tracing::info!(volume = %cfg.name,
            "not every replica zeroes a discarded range cheaply: DISCARD is not advertised (WRITE_ZEROES is)");
    }
    let stop_requested = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ctrl = match net.frontend {
        Frontend::Headless => {
            serve_headless(cfg, shared, &dp.health, cmd, &stop_requested);
            None
        }
        Frontend::Ublk => {
            match serve_device(cfg, shared, sink, &dp, device, cmd, &stop_requested) {
                Ok(ctrl) => Some(ctrl),
                Err(e) => {
                    wind_down(shared, rebuilds, health);
                    return Err(e);
                }
            }
        }
    };

    // 4. Down.
    let remove_device = |ctrl: Option<&UblkCtrl>, what: &str| {
        let Some(ctrl) = ctrl else { return };
        if let Err(e) = ctrl.del_dev_async() {
            if ublk_device_exists(ctrl.dev_info().dev_id) {
                tracing::warn!(volume = %cfg.name, error = ?e, "cannot delete the {what} device");
            }
        }
    };
    let outcome = if let Some(why) = health.fence().reason() {
        remove_device(ctrl.as_ref(), "fenced");
        if let Some(by) = health.fence().by() {
            // Through the sink: it holds the record the persister saves.
            if let Err(e) = sink.edit(|r| {
                mark_fenced(r, by);
            }) {
                tracing::error!(volume = %cfg.name, error = %e,
                    "cannot record that the volume was fenced: a restart may try to take it back");
            }
        }
        // Not clean: the newer owner's view of the data is the one that counts.
        shared.set_state(VolumeState::Fenced, Some(why.to_string()));
        Ok(())
    } else if stop_requested.load(std::sync::atomic::Ordering::SeqCst) {
        // A RECOVER_DEV control does not delete on drop; ADD_DEV would. Be explicit.
        // Async: DEL_DEV would wait for the last opener (a filesystem still mounted
        // after a forced stop). An ADD_DEV control may already have deleted it.
        remove_device(ctrl.as_ref(), "stopped");
        // The copier stops before the sync that makes the stop clean: a copy after
        // it would be in no flush, under a record that says nothing diverges.
        rebuilds.shutdown();
        sync_and_mark_clean(&cfg.name, health, sink, "stop")?;
        shared.set_state(VolumeState::Stopped, None);
        tracing::info!(volume = %cfg.name, "volume stopped, device removed");
        Ok(())
    } else {
        Err(DaemonError::volume(&cfg.name, "ublk device went away"))
    };
    wind_down(shared, rebuilds, health);
    outcome
}

/// A newer owner (generation `by`) took the volume over: an ordinary start
/// leaves it alone from then on. Whether the record changed.
fn mark_fenced(rec: &mut crate::state::VolumeRecord, by: wire::Generation) -> bool {
    let newer = rec.fenced.as_ref().is_none_or(|f| f.by < by);
    if newer {
        rec.fenced = Some(crate::state::Fenced {
            by,
            since_unix_ms: replication::dirty_file::unix_ms(),
        });
    }
    newer
}

/// [`mark_fenced`] in the saved record, before the volume has a sink (saved
/// only if it changed: a start refused for the recorded fence changes nothing).
fn record_fenced(state_dir: &StateDir, name: &str, by: wire::Generation) {
    let res = state_dir.load(name).and_then(|rec| match rec {
        Some(mut rec) => match mark_fenced(&mut rec, by) {
            true => state_dir.save(&rec),
            false => Ok(()),
        },
        None => Ok(()),
    });
    if let Err(e) = res {
        tracing::error!(volume = %name, error = %e,
            "cannot record that the volume was fenced: a restart may try to take it back");
    }
}

/// The volume serves no more: its rebuilds are cancelled, then its replicas stop.
fn wind_down(shared: &VolumeShared, rebuilds: Arc<replication::rebuild::Manager>, health: &Health) {
    rebuilds.shutdown();
    {
        let mut live = shared.live.lock().unwrap();
        live.rebuilds = None;
        live.ranges = None;
        live.sink = None;
    }
    drop(rebuilds);
    health.stop();
}

/// The ublk device's parameters.
struct Device {
    id: i32,
    queues: u16,
    depth: u16,
    max_io: u32,
    dev_flags: UblkFlags,
    uid: u32,
}

/// Add (or recover) the ublk device and serve it on its queue threads until the
/// volume is stopped or fenced or the device goes away; returns its control.
fn serve_device(
    cfg: &VolumeConfig,
    shared: &Arc<VolumeShared>,
    sink: &Arc<RecordSink>,
    dp: &Arc<DataPath>,
    dev: Device,
    cmd: Receiver<VolumeCmd>,
    stop_requested: &Arc<std::sync::atomic::AtomicBool>,
) -> Result<UblkCtrl, DaemonError> {
    let ctrl = UblkCtrlBuilder::default()
        .name("ublkd")
        .id(dev.id)
        .nr_queues(dev.queues)
        .depth(dev.depth)
        .io_buf_bytes(dev.max_io)
        .ctrl_flags(CTRL_FLAGS)
        .ctrl_target_flags(frontend::owner_flags(dev.uid))
        .dev_flags(dev.dev_flags)
        .build()
        .map_err(|e| DaemonError::ublk("add device", e))?;
    let dev_id = ctrl.dev_info().dev_id;
    sink.set_device_id(dev_id)?;
    shared.live.lock().unwrap().device_id = Some(dev_id);

    let dp_init = dp.clone();
    let dp_q = dp.clone();
    let shared_dev = shared.clone();
    let cmd = Mutex::new(cmd);
    let stop_flag = stop_requested.clone();
    let dp_dev = dp.clone();
    let sink_dev = sink.clone();
    let name = cfg.name.clone();
    ctrl.run_target(
        move |dev: &mut UblkDev| {
            frontend::init_target(dev, &dp_init);
            Ok(())
        },
        move |qid, dev: &UblkDev| frontend::run_queue(qid, dev, &dp_q),
        move |ctrl: &UblkCtrl| {
            let info = ctrl.dev_info();
            {
                // What the kernel granted (it caps queues at the CPU count).
                let mut live = shared_dev.live.lock().unwrap();
                live.ublk_flags = Some(info.flags);
                live.queues = info.nr_hw_queues;
                live.depth = info.queue_depth;
            }
            if info.flags & CTRL_FLAGS != CTRL_FLAGS {
                tracing::warn!(volume = %name, flags = format_args!("{:#x}", info.flags),
                    "kernel did not grant USER_RECOVERY|REISSUE: a daemon crash will fail I/O");
            }
            now_serving(&shared_dev);
            tracing::info!(volume = %name, device = %ctrl.get_bdev_path(),
                granted_flags = format_args!("{:#x}", info.flags), queues = info.nr_hw_queues,
                depth = info.queue_depth, "volume serving");
            let dev_id = info.dev_id;
            match wait_for_stop(&name, &dp_dev.health, &shared_dev, &cmd, &stop_flag, || {
                !ublk_device_exists(dev_id)
            }) {
                // STOP_DEV: the kernel drains in-flight I/O, then the queues see
                // their commands aborted and exit.
                Ending::Fenced | Ending::Stop => {
                    if let Err(e) = ctrl.kill_dev() {
                        tracing::error!(volume = %name, error = ?e, "stop device");
                    }
                }
                // No STOP_DEV: the queues keep the requests they hold (never
                // completed, so the kernel gives them to the next ublkd), and this
                // thread waits for the process to exit.
                Ending::HandOver(done) => {
                    let clean = hand_over(&name, &dp_dev, &shared_dev, &sink_dev);
                    let _ = done.send(clean);
                    loop {
                        std::thread::park();
                    }
                }
                Ending::Gone => {}
            }
        },
    )
    .map_err(|e| DaemonError::ublk("run device", e))?;
    Ok(ctrl)
}

/// Serve without a device (`Frontend::Headless`): in-process callers only, until
/// the volume is stopped or fenced.
fn serve_headless(
    cfg: &VolumeConfig,
    shared: &Arc<VolumeShared>,
    health: &Arc<Health>,
    cmd: Receiver<VolumeCmd>,
    stop_requested: &Arc<std::sync::atomic::AtomicBool>,
) {
    now_serving(shared);
    let cmd = Mutex::new(cmd);
    // No device to leave behind: a hand-over is a stop.
    if let Ending::HandOver(done) =
        wait_for_stop(&cfg.name, health, shared, &cmd, stop_requested, || false)
    {
        stop_requested.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = done.send(false);
    }
}

/// How long a hand-over waits for the requests in flight (a write waiting for a
/// replica that is coming back may take up to `no_replica_timeout_ms`): past it, the
/// volume is left as a crash leaves it, and the next ublkd resyncs.
const HAND_OVER_DRAIN: Duration = Duration::from_secs(20);

/// Leave a serving volume to the next ublkd, its device in place: the queues stop
/// taking requests (those they hold are reissued to the next daemon by the kernel:
/// UBLK_F_USER_RECOVERY_REISSUE), the copier stops, the mutations in flight finish
/// (the whole-volume range lock), every replica is flushed, and the record says
/// clean, so the next start recovers the device without a resync. Returns whether
/// it got that far; if not, the next start treats it as a crash (a resync).
fn hand_over(name: &str, dp: &DataPath, shared: &VolumeShared, sink: &RecordSink) -> bool {
    dp.hand_over
        .store(true, std::sync::atomic::Ordering::SeqCst);
    if let Some(rebuilds) = shared.live.lock().unwrap().rebuilds.clone() {
        rebuilds.shutdown();
    }
    let whole = dp.ranges.lock(0, dp.geometry.size, &None);
    let drained = futures::executor::block_on(async {
        futures::pin_mut!(whole);
        let timer = smol::Timer::after(HAND_OVER_DRAIN);
        match futures::future::select(whole, timer).await {
            futures::future::Either::Left((guard, _)) => Some(guard),
            futures::future::Either::Right(_) => None,
        }
    });
    let Some(quiet) = drained else {
        tracing::warn!(volume = %name, waited_s = HAND_OVER_DRAIN.as_secs(),
            "hand-over: requests still in flight; the next ublkd resyncs the volume");
        return false;
    };
    // Held until the process exits: nothing (a verify's repair, another range user)
    // may write after the clean mark below.
    std::mem::forget(quiet);
    let clean = sync_and_mark_clean(name, &dp.health, sink, "hand-over").unwrap_or_else(|e| {
        tracing::error!(volume = %name, error = %e, "hand-over: cannot record the volume clean");
        false
    });
    tracing::info!(volume = %name, clean, "handed over: the device stays for the next ublkd");
    clean
}

/// With no mutation in flight (drained): sync every replica to stable storage and,
/// if all did and every state change is durable, record the volume clean (its next
/// start resyncs nothing). Drained is not durable: the application may not have
/// flushed. Returns whether it is recorded clean.
fn sync_and_mark_clean(
    name: &str,
    health: &Health,
    sink: &RecordSink,
    when: &str,
) -> Result<bool, DaemonError> {
    let failed = health.sync_all();
    for (loc, e) in &failed {
        tracing::error!(volume = %name, replica = %loc, error = %e, when, "sync failed");
    }
    let clean = failed.is_empty() && health.is_durable();
    if clean {
        sink.set_clean(true)?;
    }
    Ok(clean)
}

/// The device (or the headless frontend) serves: state `Live`. The record already
/// says "in use" ([`now_in_use`], before the rebuild manager started).
fn now_serving(shared: &VolumeShared) {
    shared.set_state(VolumeState::Live, None);
}

/// The record says the replicas may diverge (until a clean stop).
fn now_in_use(name: &str, sink: &RecordSink) {
    if let Err(e) = sink.set_clean(false) {
        tracing::error!(volume = %name, error = %e,
            "cannot record that the volume is in use: after a host crash its replicas would not be treated as possibly divergent");
    }
}

enum Ending {
    /// A newer owner took over: stop writing at once.
    Fenced,
    Stop,
    HandOver(Sender<bool>),
    /// The device was removed behind our back.
    Gone,
}

/// Wait until the volume is fenced (state set), asked to stop (state set, flag
/// raised) or `gone()`.
fn wait_for_stop(
    name: &str,
    health: &Health,
    shared: &VolumeShared,
    cmd: &Mutex<Receiver<VolumeCmd>>,
    stop_flag: &std::sync::atomic::AtomicBool,
    gone: impl Fn() -> bool,
) -> Ending {
    loop {
        // The I/O path already fails every request of a fenced volume.
        if let Some(why) = health.fence().reason() {
            tracing::error!(volume = %name, reason = %why, "fenced by a newer owner: stopping");
            shared.set_state(VolumeState::Fenced, Some(why.to_string()));
            return Ending::Fenced;
        }
        // The fence wakes this (`Look`); a device removed behind our back is
        // noticed within 5 s (nothing tells us).
        match cmd.lock().unwrap().recv_timeout(Duration::from_secs(5)) {
            Ok(VolumeCmd::Stop) | Err(RecvTimeoutError::Disconnected) => {
                stop_flag.store(true, std::sync::atomic::Ordering::SeqCst);
                shared.set_state(VolumeState::Stopping, None);
                return Ending::Stop;
            }
            Ok(VolumeCmd::HandOver(done)) => {
                shared.set_state(VolumeState::Stopping, None);
                return Ending::HandOver(done);
            }
            Ok(VolumeCmd::Look) => {}
            Err(RecvTimeoutError::Timeout) if gone() => {
                tracing::error!(volume = %name, "ublk device removed behind our back");
                return Ending::Gone;
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}
