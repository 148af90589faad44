//! All volumes of this node, and the ublk devices nobody owns.

use std::collections::BTreeMap;
use std::sync::Mutex;

use libublk::ctrl::UblkCtrl;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::DaemonError;
use crate::frontend;
use crate::state::StateDir;
use crate::volume::{pid_alive, Net, VolumeRunner, VolumeStatus};
use replica_server::{Server, ServerStatus};

pub struct Daemon {
    /// The configuration in force (replaced by a reload).
    config: Mutex<Config>,
    /// Where it was read from (a reload reads it again).
    config_path: Option<std::path::PathBuf>,
    net: Net,
    state_dir: StateDir,
    volumes: Mutex<BTreeMap<String, VolumeRunner>>,
    /// Serialises start, stop and orphan removal: a stop drains for a while, and a
    /// start or an orphan sweep during that window would race the old volume thread
    /// for the device and the replica locks. Status and list never take it.
    ops: Mutex<()>,
    /// Set once a stop (stop_all) or a hand-over began: no volume may start after it.
    shutting_down: std::sync::atomic::AtomicBool,
    /// This node's replica server, if it has a `[server]`.
    server: Option<std::sync::Arc<Server>>,
    /// The HA monitor (its loop runs on a thread of its own: [`crate::ha::run`]).
    ha: crate::ha::Ha,
    /// Replaces the log filter of the running daemon (set by the binary that
    /// installed the subscriber; `None`: not changeable, e.g. in tests).
    log_filter: Option<LogFilterFn>,
}

/// Sets the running daemon's log filter, or says why the filter is bad.
pub type LogFilterFn = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What a reload did: the changes applied, and those that failed (with why).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReloadReport {
    pub applied: Vec<crate::reload::Change>,
    pub failed: Vec<(crate::reload::Change, String)>,
}

/// A ublk device on this node that no configured volume owns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Orphan {
    pub device_id: u32,
    pub state: String,
    pub pid: i32,
    /// Created by some ublkd (possibly for a volume since removed from the config).
    pub made_by_ublkd: bool,
    /// Why `orphans --remove` leaves it alone; `None`: it would be removed.
    pub kept_because: Option<String>,
}

impl Daemon {
    pub fn new(
        config: Config,
        net: Net,
        server: Option<std::sync::Arc<Server>>,
    ) -> Result<Daemon, DaemonError> {
        let state_dir = StateDir::open(&config.node.state_dir)?;
        let ha = crate::ha::Ha::new(&state_dir, &config.ha);
        Ok(Daemon {
            ha,
            config: Mutex::new(config),
            config_path: None,
            net,
            state_dir,
            volumes: Mutex::new(BTreeMap::new()),
            ops: Mutex::new(()),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            server,
            log_filter: None,
        })
    }

    pub fn server_status(&self) -> Result<ServerStatus, DaemonError> {
        self.server
            .as_ref()
            .map(|s| s.status())
            .ok_or_else(|| DaemonError::Volume {
                volume: "-".into(),
                message: "this node has no [server] section: it hosts no replicas".into(),
            })
    }

    pub fn ha(&self) -> &crate::ha::Ha {
        &self.ha
    }

    pub fn net(&self) -> &Net {
        &self.net
    }

    /// The volumes whose threads run (serving, or starting).
    pub fn serving(&self) -> Vec<std::sync::Arc<crate::volume::VolumeShared>> {
        self.volumes
            .lock()
            .unwrap()
            .values()
            .filter(|r| !r.is_finished())
            .map(|r| r.shared.clone())
            .collect()
    }

    /// `ublkctl replica replace`: the HA monitor's replacement, on demand (also
    /// while HA is paused). `to`: the server, else the volume's spares decide.
    pub fn replica_replace(
        &self,
        volume: &str,
        replica: &str,
        to: Option<&str>,
    ) -> Result<serde_json::Value, DaemonError> {
        let shared = self.running(volume)?;
        let err = |m: String| DaemonError::volume(volume, m);
        let view = shared
            .ha_view()
            .ok_or_else(|| err("not serving: start it first (ublkctl recover)".into()))?;
        let health = shared
            .serving_health()
            .ok_or_else(|| err("not serving: start it first (ublkctl recover)".into()))?;
        let (_, old) = shared.replica_named(&health, replica)?;
        if let Some(r) = view.replacing.first() {
            return Err(err(format!(
                "{} is being replaced by {} already: one replacement at a time (wait, or `ublkctl rebuild watch {volume}`)",
                r.old, r.new
            )));
        }
        let to = match to {
            Some(a) => {
                let canonical = crate::config::check_remote_addr(a).map_err(err)?;
                ha::PeerAddr::new(&canonical).map_err(|e| err(e.to_string()))?
            }
            None => self
                .ha
                .place(&view)
                .map_err(|e| err(format!("{e}; or name the server with --to HOST:PORT")))?,
        };
        let reason = ha::event::ReplaceReason::Operator;
        let new = shared
            .decider()
            .ha_replace(&old, &to, reason.clone(), &self.net)
            .map_err(err)?;
        self.ha.events.push(ha::event::Event {
            at: ha::UnixMs(replication::dirty_file::unix_ms()),
            volume: Some(volume.to_string()),
            replica: Some(old.clone()),
            kind: ha::event::EventKind::ReplacementPlaced {
                new: new.clone(),
                to: to.clone(),
                reason,
            },
        });
        Ok(serde_json::json!({ "old": old, "new": new, "to": to.to_string() }))
    }

    /// `ublkctl replica reclaim`: delete the storage of the volume's retired
    /// replicas (`replica`: that location only). Each is checked to still be the
    /// copy that was retired; one that cannot be reached stays retired.
    pub fn replica_reclaim(
        &self,
        volume: &str,
        replica: Option<&str>,
    ) -> Result<serde_json::Value, DaemonError> {
        let shared = self.running(volume)?;
        let done = shared
            .decider()
            .reclaim(replica, &self.net)
            .map_err(|m| DaemonError::volume(volume, m))?;
        let mut out = Vec::new();
        for (retired, res) in done {
            if let Ok(crate::volume::activate::Reclaimed::Deleted { freed_bytes }) = &res {
                self.ha.events.push(ha::event::Event {
                    at: ha::UnixMs(replication::dirty_file::unix_ms()),
                    volume: Some(volume.to_string()),
                    replica: Some(retired.location.clone()),
                    kind: ha::event::EventKind::Reclaimed {
                        freed_bytes: *freed_bytes,
                    },
                });
            }
            out.push(match res {
                Ok(r) => serde_json::json!({ "retired": retired, "result": r }),
                Err(e) => serde_json::json!({ "retired": retired, "error": e }),
            });
        }
        Ok(serde_json::json!({ "volume": volume, "reclaimed": out }))
    }

    /// The configuration in force.
    pub fn config(&self) -> Config {
        self.config.lock().unwrap().clone()
    }

    /// Reloads read `path`.
    /// The file the config was read from (`None`: given in-process).
    pub fn config_path(&self) -> Option<&std::path::Path> {
        self.config_path.as_deref()
    }

    pub fn set_config_path(&mut self, path: std::path::PathBuf) {
        self.config_path = Some(path);
    }

    /// How `ublkctl log-level` changes what is logged.
    pub fn set_log_filter_fn(&mut self, f: LogFilterFn) {
        self.log_filter = Some(f);
    }

    /// `ublkctl log-level FILTER`: until the daemon restarts (the config's
    /// `log_level` applies at the next start).
    pub fn set_log_filter(&self, filter: &str) -> Result<String, DaemonError> {
        let set = self.log_filter.as_ref().ok_or_else(|| {
            DaemonError::BadRequest("this daemon's log filter cannot change".into())
        })?;
        set(filter).map_err(|e| DaemonError::BadRequest(format!("log filter {filter:?}: {e}")))?;
        tracing::info!(filter, "log filter changed (until the next start)");
        Ok(filter.to_string())
    }

    /// Start every configured volume (each on its own thread; failures are
    /// reported per volume and do not stop the others).
    pub fn start_all(&self) {
        for v in self.config().volumes {
            if let Err(e) = self.start(&v.name, false) {
                tracing::error!(volume = %v.name, error = %e, "cannot start volume");
            }
        }
    }

    /// Start (or restart after a failure or a stop) one volume.
    /// Start volume `name`; `force_takeover`: even from a newer owner (the
    /// operator knows it is gone for good).
    pub fn start(&self, name: &str, force_takeover: bool) -> Result<(), DaemonError> {
        let _ops = self.ops.lock().unwrap();
        if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(DaemonError::volume(name, "ublkd is shutting down"));
        }
        let cfg = self
            .config()
            .volume(name)
            .ok_or_else(|| DaemonError::NoSuchVolume(name.into()))?
            .clone();
        let mut vols = self.volumes.lock().unwrap();
        if let Some(r) = vols.get(name) {
            if !r.is_finished() {
                return Err(DaemonError::volume(name, "already running"));
            }
        }
        // Claim the device id here, under `ops`, so two volumes starting together
        // cannot both pick the same free id on their own threads.
        let recorded = match self.state_dir.load(name) {
            Ok(rec) => rec.and_then(|r| r.device_id),
            Err(_) => None, // the volume thread reports the bad record
        };
        let reserved = self.reserved_ids(Some(name), &vols);
        let id = cfg.device_id.or(recorded).or_else(|| {
            (0..crate::config::MAX_DEVICE_ID)
                .find(|id| !reserved.contains(id) && !ublk_device_exists(*id))
        });
        vols.insert(
            name.into(),
            VolumeRunner::spawn(
                cfg,
                self.state_dir.clone(),
                id,
                self.net.clone(),
                force_takeover,
            ),
        );
        Ok(())
    }

    /// Device ids other volumes own or will ask for: configured, recorded, running.
    /// A volume without a pinned id must not take one of them.
    fn reserved_ids(
        &self,
        except: Option<&str>,
        vols: &BTreeMap<String, VolumeRunner>,
    ) -> Vec<u32> {
        let mut ids = Vec::new();
        for v in self
            .config()
            .volumes
            .iter()
            .filter(|v| Some(v.name.as_str()) != except)
        {
            ids.extend(v.device_id);
            if let Ok(Some(rec)) = self.state_dir.load(&v.name) {
                ids.extend(rec.device_id);
            }
            if let Some(r) = vols.get(&v.name) {
                ids.extend(r.shared.device_id());
            }
        }
        ids
    }

    /// Stop one volume: drain I/O and remove its device. Unless `force`, refuse
    /// while the device is in use (mounted, held by a holder, or open by a process).
    pub fn stop(&self, name: &str, force: bool) -> Result<(), DaemonError> {
        let _ops = self.ops.lock().unwrap();
        let id = {
            let vols = self.volumes.lock().unwrap();
            match vols.get(name) {
                Some(r) if !r.is_finished() => r.shared.device_id(),
                _ => return Err(DaemonError::volume(name, "not running")),
            }
        };
        // Outside the map lock: the /proc scan is slow and status must stay responsive.
        if let (false, Some(id)) = (force, id) {
            if let Some(why) = device_busy(id) {
                return Err(DaemonError::volume(
                    name,
                    format!(
                        "/dev/ublkb{id} is in use ({why}): unmount/close it, or stop with --force"
                    ),
                ));
            }
        }
        // The runner stays in the map (status keeps reporting it) while it drains.
        let thread = self
            .volumes
            .lock()
            .unwrap()
            .get_mut(name)
            .and_then(|r| r.request_stop());
        if let Some(t) = thread {
            let _ = t.join();
        }
        tracing::info!(volume = name, "stopped by control request");
        Ok(())
    }

    pub fn stop_all(&self) {
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ops = self.ops.lock().unwrap();
        let mut vols = std::mem::take(&mut *self.volumes.lock().unwrap());
        // Ask all first so devices drain in parallel, then wait.
        std::thread::scope(|s| {
            for (_, r) in vols.iter_mut() {
                s.spawn(|| r.stop());
            }
        });
    }

    /// Leave every volume's device to the next ublkd (a restart, an upgrade): each
    /// stops taking requests, drains and flushes (see `volume::hand_over`). Returns
    /// the volumes left clean and those the next start resyncs (not serving yet,
    /// a drain or flush that failed, no answer within `wait`). The caller exits the
    /// process next: the volumes' threads stay parked until then.
    pub fn hand_over_all(&self, wait: std::time::Duration) -> (Vec<String>, Vec<String>) {
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ops = self.ops.lock().unwrap();
        let vols = self.volumes.lock().unwrap();
        // Ask all first, so they drain in parallel.
        let asked: Vec<_> = vols
            .iter()
            .map(|(name, r)| (name.clone(), r.request_hand_over()))
            .collect();
        let deadline = std::time::Instant::now() + wait;
        let (mut clean, mut not_clean) = (Vec::new(), Vec::new());
        for (name, rx) in asked {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(true) => clean.push(name),
                _ => not_clean.push(name),
            }
        }
        (clean, not_clean)
    }

    pub fn status(&self, name: &str) -> Result<VolumeStatus, DaemonError> {
        if self.config().volume(name).is_none() {
            return Err(DaemonError::NoSuchVolume(name.into()));
        }
        let vols = self.volumes.lock().unwrap();
        Ok(match vols.get(name) {
            Some(r) => r.shared.status(),
            None => VolumeRunner::not_started(self.config().volume(name).unwrap(), &self.state_dir),
        })
    }

    /// Re-read the configuration file and apply what changed (see
    /// [`crate::reload`]); nothing changes when the new file is invalid or asks
    /// for what cannot change live.
    pub fn reload(&self) -> Result<ReloadReport, DaemonError> {
        use crate::reload::Change;
        let path = self.config_path.clone().ok_or_else(|| {
            DaemonError::ReloadFailed("the daemon was not started from a config file".into())
        })?;
        let new = Config::from_file(&path)?;
        let old = self.config();
        let changes = crate::reload::plan(&old, &new)?;
        // A volume still in use is never stopped by a reload.
        for c in &changes {
            if let Change::VolumeRemoved { volume } = c {
                let id = match self.volumes.lock().unwrap().get(volume) {
                    Some(r) if !r.is_finished() => r.shared.device_id(),
                    _ => None,
                };
                if let Some(why) = id.and_then(device_busy) {
                    return Err(DaemonError::ReloadFailed(format!(
                        "volume {volume} was removed from the config but its device is in use ({why}): unmount it first, or keep it in the config (nothing was changed)"
                    )));
                }
            }
        }
        *self.config.lock().unwrap() = new.clone();
        let mut report = ReloadReport::default();
        let mut done = |c: &Change, r: Result<(), String>| match r {
            Ok(()) => report.applied.push(c.clone()),
            Err(e) => report.failed.push((c.clone(), e)),
        };
        let mut per_volume: BTreeMap<String, Vec<Change>> = BTreeMap::new();
        for c in &changes {
            match c {
                Change::RebuildLimits {
                    rate,
                    busy_percent,
                    max_concurrent,
                } => {
                    self.net.rebuild.set(*rate, *busy_percent, *max_concurrent);
                    done(c, Ok(()));
                }
                Change::VolumeRemoved { volume } => {
                    let r = match self.stop(volume, false) {
                        Ok(()) => Ok(()),
                        Err(DaemonError::Volume { message, .. }) if message == "not running" => {
                            Ok(())
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    done(c, r);
                }
                Change::VolumeAdded { volume } => {
                    done(c, self.start(volume, false).map_err(|e| e.to_string()))
                }
                // Every running volume's manager gets its window from the new config
                // (the node's, unless the volume overrides it).
                Change::PartialWindow { volume, window_s } => {
                    if volume.is_none() {
                        self.net
                            .partial_window_s
                            .store(*window_s, std::sync::atomic::Ordering::Release);
                    }
                    for (name, run) in self.volumes.lock().unwrap().iter() {
                        if let Some(v) = new.volume(name) {
                            let w = crate::volume::partial_window(v, &self.net);
                            run.shared.set_partial_window(w);
                        }
                    }
                    done(c, Ok(()));
                }
                // The monitor reads the config in force at each round.
                Change::AtDaemonRestart { .. } | Change::HaRules { .. } => done(c, Ok(())),
                Change::ReplicaAdded { volume, .. }
                | Change::ReplicaRemoved { volume, .. }
                | Change::ReplicaReplaced { volume, .. }
                | Change::Spares { volume, .. }
                | Change::Schedule { volume, .. }
                | Change::AtNextStart { volume, .. } => {
                    per_volume
                        .entry(volume.clone())
                        .or_default()
                        .push(c.clone());
                }
            }
        }
        for (name, cs) in per_volume {
            let Some(vcfg) = new.volume(&name) else {
                continue;
            };
            let shared = self
                .volumes
                .lock()
                .unwrap()
                .get(&name)
                .map(|r| r.shared.clone());
            match shared {
                Some(sh) => {
                    let applied = sh.decider().apply_replicas(vcfg, &cs, &self.net);
                    for (c, r) in applied {
                        done(&c, r);
                    }
                }
                None => cs.iter().for_each(|c| done(c, Ok(()))),
            }
        }
        for c in &report.applied {
            tracing::info!(change = %c, "reload");
        }
        Ok(report)
    }

    /// Online verify of a running volume; with `repair`, from replica `from` when
    /// given (a location or `#N`).
    pub fn verify(
        &self,
        name: &str,
        repair: bool,
        from: Option<&str>,
    ) -> Result<serde_json::Value, DaemonError> {
        let shared = self.running(name)?;
        Ok(serde_json::to_value(shared.verify(repair, from)?).expect("report serializes"))
    }

    /// A snapshot command on a running volume.
    pub fn snapshot(
        &self,
        name: &str,
        action: &crate::control::SnapshotCmd,
        peer: Option<crate::control::Peer>,
    ) -> Result<serde_json::Value, DaemonError> {
        self.running(name)?.snapshot(action, peer)
    }

    fn running(
        &self,
        name: &str,
    ) -> Result<std::sync::Arc<crate::volume::VolumeShared>, DaemonError> {
        if self.config().volume(name).is_none() {
            return Err(DaemonError::NoSuchVolume(name.into()));
        }
        match self.volumes.lock().unwrap().get(name) {
            Some(r) if !r.is_finished() => Ok(r.shared.clone()),
            _ => Err(DaemonError::volume(
                name,
                "not running: start it first (ublkctl recover)",
            )),
        }
    }

    /// An operator's rebuild command for a running volume.
    pub fn rebuild(
        &self,
        name: &str,
        action: &crate::control::RebuildAction,
    ) -> Result<serde_json::Value, DaemonError> {
        self.running(name)?.decider().rebuild(action)
    }

    pub fn list(&self) -> Vec<VolumeStatus> {
        self.config()
            .volumes
            .iter()
            .filter_map(|v| self.status(&v.name).ok())
            .collect()
    }

    /// ublk devices present on the node that no configured volume owns.
    pub fn orphans(&self) -> Vec<Orphan> {
        let (owned, owner_tags, unreadable) = {
            let vols = self.volumes.lock().unwrap();
            let mut tags = Vec::new();
            let mut unreadable = None;
            for v in &self.config().volumes {
                match self.state_dir.load(&v.name) {
                    Ok(Some(rec)) => tags.push(frontend::owner_flags(rec.uid)),
                    Ok(None) => {}
                    Err(_) => unreadable = Some(v.name.clone()),
                }
            }
            (self.reserved_ids(None, &vols), tags, unreadable)
        };
        ublk_device_ids()
            .into_iter()
            .filter(|id| !owned.contains(id))
            .filter_map(|id| {
                let c = UblkCtrl::new_simple(id as i32).ok()?;
                let info = c.dev_info();
                let live = info.state as u32 == libublk::sys::UBLK_S_DEV_LIVE;
                let made_by_ublkd = info.ublksrv_flags & 0xffff_ffff == frontend::OWNER_MAGIC;
                let removable = if !made_by_ublkd {
                    Err("not made by ublkd".to_string())
                } else if owner_tags.contains(&info.ublksrv_flags) {
                    Err("tagged for a configured volume".into())
                } else if let Some(v) = &unreadable {
                    // It might be that volume's device: never guess.
                    Err(format!(
                        "the state record of configured volume {v} is unreadable"
                    ))
                } else if live && pid_alive(info.ublksrv_pid) {
                    Err("live, its server is running".into())
                } else if let Some(why) = device_busy(id) {
                    Err(format!("in use: {why}"))
                } else {
                    Ok(())
                };
                Some(Orphan {
                    device_id: id,
                    state: match info.state as u32 {
                        libublk::sys::UBLK_S_DEV_LIVE => "live",
                        libublk::sys::UBLK_S_DEV_QUIESCED => "quiesced",
                        libublk::sys::UBLK_S_DEV_FAIL_IO => "fail_io",
                        _ => "dead",
                    }
                    .into(),
                    pid: info.ublksrv_pid,
                    made_by_ublkd,
                    kept_because: removable.err(),
                })
            })
            .collect()
    }

    /// Delete the orphans that are safe to delete: made by a ublkd, not tagged for a
    /// configured volume, not served by a live process. Returns the ids removed.
    pub fn remove_orphans(&self) -> Result<Vec<u32>, DaemonError> {
        let _ops = self.ops.lock().unwrap();
        let mut removed = Vec::new();
        for o in self.orphans() {
            if let Some(why) = &o.kept_because {
                tracing::warn!(device_id = o.device_id, reason = %why, "orphan kept");
                continue;
            }
            let c = UblkCtrl::new_simple(o.device_id as i32)
                .map_err(|e| DaemonError::ublk("open orphan", e))?;
            // Async: a synchronous DEL_DEV waits for the last opener to go away.
            c.del_dev_async()
                .map_err(|e| DaemonError::ublk(format!("delete ublkc{}", o.device_id), e))?;
            tracing::info!(device_id = o.device_id, "removed orphan ublk device");
            removed.push(o.device_id);
        }
        Ok(removed)
    }
}

/// Whether ublk device `id` exists (in any state).
pub fn ublk_device_exists(id: u32) -> bool {
    std::path::Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists()
}

/// Ids of all ublk devices on the node.
pub fn ublk_device_ids() -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir("/sys/class/ublk-char")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("ublkc")?.parse().ok())
        .collect();
    ids.sort_unstable();
    ids
}

/// Why the device is in use, if it is: an exclusive opener (a mounted filesystem,
/// an md/dm member) refuses our exclusive open with EBUSY; stacked devices show in
/// `holders/`; any other process holding it open shows in `/proc/*/fd`.
pub(crate) fn device_busy(id: u32) -> Option<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let dev = format!("/dev/ublkb{id}");
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(&dev)
    {
        if e.raw_os_error() == Some(libc::EBUSY) {
            return Some("opened exclusively: mounted or part of a stacked device".into());
        }
    }
    let holders = std::fs::read_dir(format!("/sys/block/ublkb{id}/holders"))
        .map(|d| d.count())
        .unwrap_or(0);
    if holders > 0 {
        return Some(format!("{holders} holder device(s)"));
    }
    let me = std::process::id().to_string();
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = p.file_name().to_string_lossy().to_string();
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        for fd in std::fs::read_dir(p.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if std::fs::read_link(fd.path()).is_ok_and(|t| t == std::path::Path::new(&dev)) {
                return Some(format!("open by pid {pid}"));
            }
        }
    }
    None
}
