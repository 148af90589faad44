//! All volumes of this node, and the ublk devices nobody owns.

use std::collections::BTreeMap;
use std::sync::Mutex;

use libublk::ctrl::UblkCtrl;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::DaemonError;
use crate::frontend;
use crate::state::StateDir;
use crate::volume::{VolumeRunner, VolumeStatus};

pub struct Daemon {
    config: Config,
    state_dir: StateDir,
    volumes: Mutex<BTreeMap<String, VolumeRunner>>,
}

/// A ublk device on this node that no configured volume owns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Orphan {
    pub device_id: u32,
    pub state: String,
    pub pid: i32,
    /// Created by some ublkd (possibly for a volume since removed from the config).
    pub made_by_ublkd: bool,
}

impl Daemon {
    pub fn new(config: Config) -> Result<Daemon, DaemonError> {
        let state_dir = StateDir::open(&config.node.state_dir)?;
        Ok(Daemon {
            config,
            state_dir,
            volumes: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Start every configured volume (each on its own thread; failures are
    /// reported per volume and do not stop the others).
    pub fn start_all(&self) {
        for v in &self.config.volumes {
            if let Err(e) = self.start(&v.name) {
                tracing::error!(volume = %v.name, error = %e, "cannot start volume");
            }
        }
    }

    /// Start (or restart after a failure or a stop) one volume.
    pub fn start(&self, name: &str) -> Result<(), DaemonError> {
        let cfg = self
            .config
            .volume(name)
            .ok_or_else(|| DaemonError::NoSuchVolume(name.into()))?
            .clone();
        let mut vols = self.volumes.lock().unwrap();
        if let Some(r) = vols.get(name) {
            if !r.is_finished() {
                return Err(DaemonError::volume(name, "already running"));
            }
        }
        vols.insert(
            name.into(),
            VolumeRunner::spawn(cfg, self.state_dir.clone()),
        );
        Ok(())
    }

    /// Stop one volume: drain I/O and remove its device. Unless `force`, refuse
    /// while something holds the device open exclusively (a mounted filesystem).
    pub fn stop(&self, name: &str, force: bool) -> Result<(), DaemonError> {
        let mut runner = {
            let mut vols = self.volumes.lock().unwrap();
            let r = vols
                .get(name)
                .ok_or_else(|| DaemonError::volume(name, "not running"))?;
            if r.is_finished() {
                return Err(DaemonError::volume(name, "not running"));
            }
            if let (false, Some(id)) = (force, r.shared.device_id()) {
                if device_busy(id) {
                    return Err(DaemonError::volume(
                        name,
                        format!(
                            "/dev/ublkb{id} is in use (mounted?): unmount it, or stop with --force"
                        ),
                    ));
                }
            }
            vols.remove(name).expect("checked above")
        };
        runner.stop();
        let status = runner.shared.status();
        // Keep the finished runner so `status` still reports it as stopped.
        self.volumes.lock().unwrap().insert(name.into(), runner);
        tracing::info!(volume = name, state = ?status.state, "stop requested by control socket");
        Ok(())
    }

    pub fn stop_all(&self) {
        let mut vols = std::mem::take(&mut *self.volumes.lock().unwrap());
        // Ask all first so devices drain in parallel, then wait.
        std::thread::scope(|s| {
            for (_, r) in vols.iter_mut() {
                s.spawn(|| r.stop());
            }
        });
    }

    pub fn status(&self, name: &str) -> Result<VolumeStatus, DaemonError> {
        if self.config.volume(name).is_none() {
            return Err(DaemonError::NoSuchVolume(name.into()));
        }
        let vols = self.volumes.lock().unwrap();
        Ok(match vols.get(name) {
            Some(r) => r.shared.status(),
            None => VolumeRunner::not_started(self.config.volume(name).unwrap(), &self.state_dir),
        })
    }

    pub fn list(&self) -> Vec<VolumeStatus> {
        self.config
            .volumes
            .iter()
            .filter_map(|v| self.status(&v.name).ok())
            .collect()
    }

    /// ublk devices present on the node that no configured volume owns.
    pub fn orphans(&self) -> Vec<Orphan> {
        let owned: Vec<u32> = {
            let vols = self.volumes.lock().unwrap();
            let mut ids: Vec<u32> = vols.values().filter_map(|r| r.shared.device_id()).collect();
            for v in &self.config.volumes {
                if let Ok(Some(rec)) = self.state_dir.load(&v.name) {
                    ids.extend(rec.device_id);
                }
                ids.extend(v.device_id);
            }
            ids
        };
        ublk_device_ids()
            .into_iter()
            .filter(|id| !owned.contains(id))
            .filter_map(|id| {
                let c = UblkCtrl::new_simple(id as i32).ok()?;
                let info = c.dev_info();
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
                    made_by_ublkd: info.ublksrv_flags & 0xffff_ffff == frontend::OWNER_MAGIC,
                })
            })
            .collect()
    }

    /// Delete every orphan device. Returns the ids removed.
    pub fn remove_orphans(&self) -> Result<Vec<u32>, DaemonError> {
        let mut removed = Vec::new();
        for o in self.orphans() {
            let c = UblkCtrl::new_simple(o.device_id as i32)
                .map_err(|e| DaemonError::ublk("open orphan", e))?;
            c.del_dev()
                .map_err(|e| DaemonError::ublk(format!("delete ublkc{}", o.device_id), e))?;
            tracing::info!(device_id = o.device_id, "removed orphan ublk device");
            removed.push(o.device_id);
        }
        Ok(removed)
    }
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

/// A block device opened exclusively by someone (a mounted filesystem, an md/dm
/// member) refuses another exclusive open with EBUSY.
fn device_busy(id: u32) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(format!("/dev/ublkb{id}"))
    {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    }
}
