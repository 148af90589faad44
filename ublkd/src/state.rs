//! The daemon's durable per-volume record, one JSON file per volume under
//! `<state_dir>/volumes/`, replaced atomically (temp file, fsync, rename, fsync dir).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use replication::health::{ReadPolicy, ReplicaHealth, StateSink};
use replication::{Generation, ReplicaState, ReplicationError};
use serde::{Deserialize, Serialize};

use crate::config::VolumeConfig;
use crate::error::DaemonError;

pub const RECORD_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub version: u32,
    pub name: String,
    /// Random at creation: tags the volume's ublk device (see `frontend::owner_flags`).
    pub uid: u32,
    /// The ublk device id once one was allocated: /dev/ublkb<id>.
    pub device_id: Option<u32>,
    /// Bumped on every activation.
    pub generation: Generation,
    /// Random id of the activation that took `generation` (0: none yet), so an
    /// owner can tell its own generation from another owner's equal one.
    #[serde(default)]
    pub owner: u64,
    pub size: u64,
    pub block_size: u32,
    /// In config order.
    pub replicas: Vec<ReplicaHealth>,
    /// Set by a clean stop, cleared while serving: a start that finds it unset (and no
    /// device to recover) follows a host crash or reboot.
    #[serde(default)]
    pub clean: bool,
    /// Pinned to `Primary` after an unclean shutdown, until a resync.
    #[serde(default = "spread")]
    pub read_policy: ReadPolicy,
}

fn spread() -> ReadPolicy {
    ReadPolicy::Spread
}

impl VolumeRecord {
    /// First activation: every replica starts online (fresh sparse files or devices
    /// the operator handed over; there is no older data to disagree with).
    pub fn fresh(cfg: &VolumeConfig) -> VolumeRecord {
        VolumeRecord {
            version: RECORD_VERSION,
            name: cfg.name.clone(),
            uid: random_u32(),
            device_id: cfg.device_id,
            generation: Generation(0),
            owner: 0,
            size: cfg.size,
            block_size: cfg.block_size,
            replicas: cfg
                .replicas
                .iter()
                .map(|r| ReplicaHealth {
                    location: r.location(),
                    state: ReplicaState::Online,
                    reason: None,
                    errors: 0,
                })
                .collect(),
            clean: true,
            read_policy: ReadPolicy::Spread,
        }
    }

    /// Fit a persisted record to the (possibly edited) config. Geometry may not
    /// change; replicas are matched by location; a replica new to an existing volume
    /// holds none of its data, so it starts faulted until a rebuild fills it.
    pub fn reconcile(self, cfg: &VolumeConfig) -> Result<VolumeRecord, DaemonError> {
        if self.size != cfg.size || self.block_size != cfg.block_size {
            return Err(DaemonError::volume(
                &cfg.name,
                format!(
                    "size/block_size changed from {} bytes/{} to {} bytes/{}: resizing is not supported",
                    self.size, self.block_size, cfg.size, cfg.block_size
                ),
            ));
        }
        let replicas = cfg
            .replicas
            .iter()
            .map(|r| {
                let loc = r.location();
                self.replicas
                    .iter()
                    .find(|h| h.location == loc)
                    .cloned()
                    .unwrap_or_else(|| ReplicaHealth {
                        location: loc,
                        state: ReplicaState::Faulted,
                        reason: Some(
                            "added to an existing volume: holds none of its data, needs a full rebuild".into(),
                        ),
                        errors: 0,
                    })
            })
            .collect();
        Ok(VolumeRecord {
            replicas,
            device_id: cfg.device_id.or(self.device_id),
            ..self
        })
    }
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom fills the 4-byte buffer we own.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 4, 0) };
    assert_eq!(n, 4, "getrandom failed");
    u32::from_ne_bytes(b)
}

/// The state directory (mode 0700).
#[derive(Debug, Clone)]
pub struct StateDir {
    volumes: PathBuf,
}

impl StateDir {
    pub fn open(root: &Path) -> Result<StateDir, DaemonError> {
        let volumes = root.join("volumes");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&volumes)
            .map_err(DaemonError::io(format!(
                "create state dir {}",
                volumes.display()
            )))?;
        Ok(StateDir { volumes })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.volumes.join(format!("{name}.json"))
    }

    pub fn load(&self, name: &str) -> Result<Option<VolumeRecord>, DaemonError> {
        let path = self.path(name);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(DaemonError::State {
                    path,
                    message: e.to_string(),
                })
            }
        };
        let rec: VolumeRecord = serde_json::from_str(&text).map_err(|e| DaemonError::State {
            path: path.clone(),
            message: format!("corrupt ({e}); refusing to guess replica health"),
        })?;
        if rec.version != RECORD_VERSION || rec.name != name {
            return Err(DaemonError::State {
                path,
                message: format!(
                    "record is version {} for volume {:?}",
                    rec.version, rec.name
                ),
            });
        }
        Ok(Some(rec))
    }

    pub fn save(&self, rec: &VolumeRecord) -> Result<(), DaemonError> {
        let path = self.path(&rec.name);
        let err = |e: std::io::Error| DaemonError::State {
            path: path.clone(),
            message: e.to_string(),
        };
        let tmp = path.with_extension("json.tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        let body = serde_json::to_vec_pretty(rec).expect("record serializes");
        f.write_all(&body).map_err(err)?;
        f.sync_all().map_err(err)?;
        fs::rename(&tmp, &path).map_err(err)?;
        File::open(&self.volumes)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        Ok(())
    }
}

/// Persists replica health changes into the volume's record.
pub struct RecordSink {
    dir: StateDir,
    record: Mutex<VolumeRecord>,
}

impl RecordSink {
    pub fn new(dir: StateDir, record: VolumeRecord) -> RecordSink {
        RecordSink {
            dir,
            record: Mutex::new(record),
        }
    }

    /// Record a clean stop (or, with `false`, that the volume is serving).
    pub fn set_clean(&self, clean: bool) -> Result<(), DaemonError> {
        let mut rec = self.record.lock().unwrap();
        rec.clean = clean;
        self.dir.save(&rec)
    }

    pub fn set_device_id(&self, id: u32) -> Result<(), DaemonError> {
        let mut rec = self.record.lock().unwrap();
        if rec.device_id != Some(id) {
            rec.device_id = Some(id);
            self.dir.save(&rec)?;
        }
        Ok(())
    }
}

impl StateSink for RecordSink {
    fn persist(&self, replicas: &[ReplicaHealth]) -> Result<(), ReplicationError> {
        let mut rec = self.record.lock().unwrap();
        rec.replicas = replicas.to_vec();
        self.dir
            .save(&rec)
            .map_err(|e| ReplicationError::Persist(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn cfg(replicas: &[&str]) -> VolumeConfig {
        let list: Vec<String> = replicas
            .iter()
            .map(|p| format!("{{ local = \"{p}\" }}"))
            .collect();
        let text = format!(
            "[[volume]]\nname = \"v\"\nsize = \"1MiB\"\nreplicas = [{}]\n",
            list.join(", ")
        );
        Config::parse(&text, "t.toml").unwrap().volumes.remove(0)
    }

    #[test]
    fn save_and_load_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        assert_eq!(sd.load("v").unwrap(), None);
        let mut rec = VolumeRecord::fresh(&cfg(&["/a", "/b"]));
        rec.generation = Generation(7);
        sd.save(&rec).unwrap();
        assert_eq!(sd.load("v").unwrap(), Some(rec));
    }

    #[test]
    fn corrupt_record_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        fs::write(dir.path().join("volumes/v.json"), b"{not json").unwrap();
        let err = sd.load("v").unwrap_err().to_string();
        assert!(err.contains("corrupt"), "{err}");
    }

    #[test]
    fn reconcile_keeps_health_and_faults_new_replicas() {
        let mut rec = VolumeRecord::fresh(&cfg(&["/a", "/b"]));
        rec.replicas[1].state = ReplicaState::Faulted;
        let rec = rec.reconcile(&cfg(&["/b", "/c", "/a"])).unwrap();
        let states: Vec<_> = rec
            .replicas
            .iter()
            .map(|r| (r.location.as_str(), r.state))
            .collect();
        assert_eq!(
            states,
            vec![
                ("/b", ReplicaState::Faulted),
                ("/c", ReplicaState::Faulted),
                ("/a", ReplicaState::Online)
            ]
        );
    }

    #[test]
    fn reconcile_rejects_resize() {
        let rec = VolumeRecord::fresh(&cfg(&["/a"]));
        let mut c = cfg(&["/a"]);
        c.size *= 2;
        assert!(rec
            .reconcile(&c)
            .unwrap_err()
            .to_string()
            .contains("resizing"));
    }

    #[test]
    fn sink_persists_replica_faults() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        let rec = VolumeRecord::fresh(&cfg(&["/a", "/b"]));
        let sink = std::sync::Arc::new(RecordSink::new(sd.clone(), rec));
        let mut h = sd
            .load("v")
            .unwrap()
            .map(|r| r.replicas)
            .unwrap_or_default();
        assert!(h.is_empty());
        h = VolumeRecord::fresh(&cfg(&["/a", "/b"])).replicas;
        h[0].state = ReplicaState::Faulted;
        sink.persist(&h).unwrap();
        sink.set_device_id(3).unwrap();
        let back = sd.load("v").unwrap().unwrap();
        assert_eq!(back.replicas[0].state, ReplicaState::Faulted);
        assert_eq!(back.device_id, Some(3));
    }
}
