//! The daemon's durable per-volume record, one JSON file per volume under
//! `<state_dir>/volumes/`, replaced atomically ([`replication::durable`]).
//!
//! The record is the owner's memory of a volume: its device, its generation, the
//! membership and each replica's state. It is not the only witness: every replica
//! carries the membership in its label too, so losing or restoring an old copy of
//! this file never makes the owner trust a replica that missed writes
//! (see `replication::activation`).
//!
//! Version 1 records (ublkd 0.1: no uuids, no membership, fault reasons as text)
//! are read and adopted on the next activation.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use replication::activation::{Recorded, RecordedReplica};
use replication::health::{HealthSnapshot, ReadPolicy, StateSink};
use replication::state::FaultReason;
use replication::{Generation, ReplicaState, ReplicationError};
use serde::{Deserialize, Serialize};
use wire::label::Membership;
use wire::{Epoch, OwnerId, ReplicaUuid, VolumeUuid};

use crate::config::VolumeConfig;
use crate::error::DaemonError;

pub const RECORD_VERSION: u32 = 2;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRecord {
    pub version: u32,
    pub name: String,
    /// Nil until the first activation by this version (a record of ublkd 0.1).
    pub volume_uuid: VolumeUuid,
    /// Random at creation: tags the volume's ublk device (see `frontend::owner_flags`).
    pub uid: u32,
    /// The ublk device id once one was allocated: /dev/ublkb<id>.
    pub device_id: Option<u32>,
    /// Bumped on every activation, saved before any replica is opened with it.
    pub generation: Generation,
    /// The activation that took `generation`, so an owner can tell its own
    /// generation from another owner's equal one.
    pub owner: OwnerId,
    /// The replicas holding every acknowledged write (epoch 0: none recorded yet).
    pub membership: Membership,
    pub size: u64,
    pub block_size: u32,
    pub replicas: Vec<ReplicaRecord>,
    /// Set by a clean stop, cleared while serving: a start that finds it unset (and no
    /// device to recover) follows a host crash or reboot.
    pub clean: bool,
    /// Pinned to `Primary` after an unclean shutdown, until a resync.
    pub read_policy: ReadPolicy,
    /// The pending resync covers the whole volume (where writes were in flight is
    /// unknown: the activity log or the record was lost). Kept until that resync
    /// ends, so a crash during it resyncs everything again, not only what the
    /// new activity log saw.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resync_whole: bool,
    /// Replicas the HA monitor put in place of configured ones: ublkd never edits
    /// the config, so these apply over its list at every start
    /// ([`VolumeRecord::effective`]) until the config names the replacement itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub substitutions: Vec<Substitution>,
    /// Replacements under way: each old replica stays in the running set until
    /// its replacement is online, also across a restart ([`VolumeRecord::effective`]
    /// lists it though the config or a substitution names the new one in its
    /// place): it may hold the only current copy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replacing: Vec<Replacing>,
    /// Replicas dropped from the running set whose storage is kept (a returning
    /// one is refused as stale: it is no member) until `ublkctl replica reclaim`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<Retired>,
    /// A newer owner took the volume over while this node served it (or since it
    /// last did): an ordinary start leaves it alone, whatever the replicas in reach
    /// say, until the operator forces a takeover (`ublkctl recover VOL
    /// --force-takeover`). Otherwise a restart after a partition could fence the
    /// live owner and roll back what it acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced: Option<Fenced>,
    /// A snapshot whose barrier is under way (recorded before it holds writes,
    /// cleared after): if the owner dies in it, the next start undoes it on the
    /// replicas that took it. Only this one: a replica may lack an older snapshot
    /// for good reasons (a full rebuild), and that is never undone elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_snapshot: Option<wire::SnapshotUuid>,
}

/// Why and since when a volume's record says it was fenced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fenced {
    /// The newer owner's generation.
    pub by: Generation,
    pub since_unix_ms: u64,
}

/// A replica dropped from the running set, storage not reclaimed yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retired {
    pub location: String,
    /// Its identity when dropped: reclaim deletes that copy only, never one made
    /// since at the same location.
    pub uuid: ReplicaUuid,
    pub since: ha::UnixMs,
    pub why: RetiredWhy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum RetiredWhy {
    /// Its replacement came online.
    Replaced { by: String },
    /// A reload dropped it (the config no longer lists it).
    Removed,
    /// A half-built replacement, dropped because the replica it replaced came
    /// back lacking less.
    Abandoned { of: String },
}

impl std::fmt::Display for RetiredWhy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RetiredWhy::Replaced { by } => write!(f, "replaced by {by}"),
            RetiredWhy::Removed => write!(f, "removed from the config"),
            RetiredWhy::Abandoned { of } => {
                write!(
                    f,
                    "half-built replacement of {of}, dropped when {of} came back"
                )
            }
        }
    }
}

/// A replacement under way ([`VolumeRecord::replacing`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replacing {
    /// The replaced replica's location (a path, or `id@host:port`).
    pub old: String,
    pub old_uuid: ReplicaUuid,
    pub new_uuid: ReplicaUuid,
}

/// A configured replica and what runs in its place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Substitution {
    /// The replica's location as the config lists it.
    pub configured: String,
    /// The replacement: its server (canonical `host:port`) and its id there.
    pub addr: String,
    pub id: String,
    pub since: ha::UnixMs,
    pub reason: ha::event::ReplaceReason,
}

impl Substitution {
    /// The replacement's location (`id@host:port`).
    pub fn location(&self) -> String {
        format!("{}@{}", self.id, self.addr)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub location: String,
    pub uuid: Option<ReplicaUuid>,
    #[serde(flatten)]
    pub state: ReplicaState,
    #[serde(default)]
    pub errors: u64,
}

/// A record of ublkd 0.1.
#[derive(Deserialize)]
struct RecordV1 {
    name: String,
    uid: u32,
    device_id: Option<u32>,
    generation: Generation,
    #[serde(default)]
    owner: OwnerId,
    size: u64,
    block_size: u32,
    replicas: Vec<ReplicaV1>,
    #[serde(default)]
    clean: bool,
    #[serde(default = "spread")]
    read_policy: ReadPolicy,
}

fn spread() -> ReadPolicy {
    ReadPolicy::Spread
}

#[derive(Deserialize)]
struct ReplicaV1 {
    location: String,
    state: String,
    reason: Option<String>,
    #[serde(default)]
    errors: u64,
}

impl RecordV1 {
    fn adopt(self) -> VolumeRecord {
        VolumeRecord {
            version: RECORD_VERSION,
            name: self.name,
            volume_uuid: VolumeUuid::default(),
            uid: self.uid,
            device_id: self.device_id,
            generation: self.generation,
            owner: self.owner,
            membership: Membership::default(),
            size: self.size,
            block_size: self.block_size,
            replicas: self
                .replicas
                .into_iter()
                .map(|r| ReplicaRecord {
                    location: r.location,
                    uuid: None,
                    state: if r.state == "online" {
                        ReplicaState::Online
                    } else {
                        ReplicaState::Faulted {
                            reason: FaultReason::Legacy {
                                detail: r.reason.unwrap_or_else(|| "faulted".into()),
                            },
                        }
                    },
                    errors: r.errors,
                })
                .collect(),
            clean: self.clean,
            read_policy: self.read_policy,
            resync_whole: false,
            substitutions: Vec::new(),
            replacing: Vec::new(),
            retired: Vec::new(),
            fenced: None,
            pending_snapshot: None,
        }
    }
}

impl VolumeRecord {
    /// The record of a volume's first activation (filled in from its plan).
    pub fn fresh(cfg: &VolumeConfig) -> VolumeRecord {
        VolumeRecord {
            version: RECORD_VERSION,
            name: cfg.name.clone(),
            volume_uuid: VolumeUuid::default(),
            uid: wire::random::u64() as u32,
            device_id: cfg.device_id,
            generation: Generation(0),
            owner: OwnerId(0),
            membership: Membership::default(),
            size: cfg.size,
            block_size: cfg.block_size,
            replicas: Vec::new(),
            clean: true,
            read_policy: ReadPolicy::Spread,
            resync_whole: false,
            substitutions: Vec::new(),
            replacing: Vec::new(),
            retired: Vec::new(),
            fenced: None,
            pending_snapshot: None,
        }
    }

    /// Geometry may not change: resizing is not supported.
    pub fn check_geometry(&self, cfg: &VolumeConfig) -> Result<(), DaemonError> {
        if self.size != cfg.size || self.block_size != cfg.block_size {
            return Err(DaemonError::volume(
                &cfg.name,
                format!(
                    "size/block_size changed from {} bytes/{} to {} bytes/{}: resizing is not supported",
                    self.size, self.block_size, cfg.size, cfg.block_size
                ),
            ));
        }
        Ok(())
    }

    /// What activation planning needs from the record.
    pub fn recorded(&self) -> Recorded {
        Recorded {
            volume_uuid: (!self.volume_uuid.is_nil()).then_some(self.volume_uuid),
            generation: self.generation,
            owner: self.owner,
            membership: (self.membership.epoch > Epoch(0)).then(|| self.membership.clone()),
            replicas: self
                .replicas
                .iter()
                .map(|r| RecordedReplica {
                    location: r.location.clone(),
                    uuid: r.uuid,
                    state: r.state.clone(),
                })
                .collect(),
        }
    }

    /// `cfg` as the volume runs it: each substituted replica replaced by its
    /// substitute, in place (the slot order stays the config's).
    pub fn effective(&self, cfg: &VolumeConfig) -> VolumeConfig {
        let mut out = cfg.clone();
        for r in &mut out.replicas {
            if let Some(s) = self.substitution_of(&r.location()) {
                *r = crate::config::ReplicaConfig::Remote {
                    addr: s.addr.clone(),
                    id: s.id.clone(),
                };
            }
        }
        // A replaced replica runs until its replacement is online.
        for r in &self.replacing {
            if !out.replicas.iter().any(|x| x.location() == r.old) {
                out.replicas
                    .push(crate::config::ReplicaConfig::from_location(&r.old));
            }
        }
        out
    }

    /// A replacement of `old` by `new_uuid` began.
    pub fn begin_replacing(&mut self, old: &str, old_uuid: ReplicaUuid, new_uuid: ReplicaUuid) {
        self.replacing.retain(|r| r.old_uuid != old_uuid);
        self.replacing.push(Replacing {
            old: old.to_string(),
            old_uuid,
            new_uuid,
        });
    }

    /// The substitution of a configured replica.
    pub fn substitution_of(&self, configured: &str) -> Option<&Substitution> {
        self.substitutions
            .iter()
            .find(|s| s.configured == configured)
    }

    /// Record that `running` (a configured replica, or a substitute) is being
    /// replaced by `new`: a substitute's substitution is updated in place, so the
    /// config's location stays the key.
    pub fn substitute(&mut self, running: &str, new: Substitution) {
        let configured = self
            .substitutions
            .iter()
            .find(|s| s.location() == running)
            .map_or_else(|| running.to_string(), |s| s.configured.clone());
        self.substitutions.retain(|s| s.configured != configured);
        self.substitutions.push(Substitution { configured, ..new });
    }

    /// `location` (uuid `uuid`) left the running set for `why`; a location that
    /// enters it again stops being retired ([`VolumeRecord::unretire`]).
    pub fn retire(&mut self, location: &str, uuid: ReplicaUuid, why: RetiredWhy) {
        self.retired.retain(|r| r.location != location);
        self.retired.push(Retired {
            location: location.to_string(),
            uuid,
            since: ha::UnixMs(replication::dirty_file::unix_ms()),
            why,
        });
    }

    pub fn unretire(&mut self, location: &str) {
        self.retired.retain(|r| r.location != location);
    }

    pub fn replica(&self, location: &str) -> Option<&ReplicaRecord> {
        self.replicas.iter().find(|r| r.location == location)
    }
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

    /// The node-wide state files (the HA monitor's events and pause flag).
    pub fn node_file(&self, name: &str) -> PathBuf {
        self.volumes
            .parent()
            .expect("volumes/ is under the state dir")
            .join(name)
    }

    /// Where the volume's activity log and dirty maps live.
    pub fn logs_dir(&self, name: &str) -> PathBuf {
        self.volumes.join(format!("{name}.logs"))
    }

    pub fn load(&self, name: &str) -> Result<Option<VolumeRecord>, DaemonError> {
        let path = self.path(name);
        let bad = |message: String| DaemonError::State {
            path: path.clone(),
            message,
        };
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(bad(e.to_string())),
        };
        let corrupt =
            |e: serde_json::Error| bad(format!("corrupt ({e}); refusing to guess replica health"));
        let v: serde_json::Value = serde_json::from_str(&text).map_err(corrupt)?;
        let rec = match v.get("version").and_then(|x| x.as_u64()) {
            Some(1) => serde_json::from_value::<RecordV1>(v)
                .map_err(corrupt)?
                .adopt(),
            Some(2) => serde_json::from_value::<VolumeRecord>(v).map_err(corrupt)?,
            other => {
                return Err(bad(format!(
                    "record version {other:?} is not known to this ublkd (it reads 1 and 2)"
                )))
            }
        };
        if rec.name != name {
            return Err(bad(format!("record is for volume {:?}", rec.name)));
        }
        Ok(Some(rec))
    }

    pub fn save(&self, rec: &VolumeRecord) -> Result<(), DaemonError> {
        let path = self.path(&rec.name);
        replication::durable::replace_json(&path, rec).map_err(|e| DaemonError::State {
            path,
            message: e.to_string(),
        })
    }
}

/// Persists health changes into the volume's record.
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

    /// Change the record (the HA monitor's substitutions) and save it.
    pub fn edit(&self, f: impl FnOnce(&mut VolumeRecord)) -> Result<(), DaemonError> {
        let mut rec = self.record.lock().unwrap();
        f(&mut rec);
        self.dir.save(&rec)
    }

    pub fn record(&self) -> VolumeRecord {
        self.record.lock().unwrap().clone()
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
    fn persist(&self, s: &HealthSnapshot) -> Result<(), ReplicationError> {
        let mut rec = self.record.lock().unwrap();
        rec.generation = s.generation;
        rec.membership = s.membership.clone();
        rec.read_policy = s.read_policy;
        // Reads spread again: the resync it stood for is done.
        rec.resync_whole &= s.read_policy == ReadPolicy::Primary;
        rec.replicas = s
            .slots
            .iter()
            .map(|x| ReplicaRecord {
                location: x.location.clone(),
                uuid: Some(x.uuid),
                state: x.state.clone(),
                errors: x.errors,
            })
            .collect();
        self.dir
            .save(&rec)
            .map_err(|e| ReplicationError::Persist(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn cfg() -> VolumeConfig {
        Config::parse(
            "[[volume]]\nname = \"v\"\nsize = \"1MiB\"\nreplicas = [{ local = \"/a\" }]\n",
            "t.toml",
        )
        .unwrap()
        .volumes
        .remove(0)
    }

    #[test]
    fn save_and_load_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        assert_eq!(sd.load("v").unwrap(), None);
        let mut rec = VolumeRecord::fresh(&cfg());
        rec.generation = Generation(7);
        rec.replicas.push(ReplicaRecord {
            location: "/a".into(),
            uuid: Some(ReplicaUuid::random()),
            state: ReplicaState::Faulted {
                reason: FaultReason::MissedDeadline { waited_ms: 3001 },
            },
            errors: 2,
        });
        sd.save(&rec).unwrap();
        assert_eq!(sd.load("v").unwrap(), Some(rec));
    }

    #[test]
    fn a_retired_replica_is_kept_per_location_until_it_returns_or_is_reclaimed() {
        let mut rec = VolumeRecord::fresh(&cfg());
        let (u1, u2) = (ReplicaUuid::random(), ReplicaUuid::random());
        rec.retire("v-b@10.0.0.2:7450", u1, RetiredWhy::Removed);
        rec.retire(
            "v-c@10.0.0.3:7450",
            u2,
            RetiredWhy::Replaced {
                by: "v-c@10.0.0.4:7450".into(),
            },
        );
        // Retired again at the same location (added back, then dropped): the
        // newer identity is the one reclaim may delete.
        let u3 = ReplicaUuid::random();
        rec.retire("v-b@10.0.0.2:7450", u3, RetiredWhy::Removed);
        let at = |loc: &str| {
            rec.retired
                .iter()
                .find(|r| r.location == loc)
                .map(|r| r.uuid)
        };
        assert_eq!(rec.retired.len(), 2);
        assert_eq!(at("v-b@10.0.0.2:7450"), Some(u3));
        assert_eq!(at("v-c@10.0.0.3:7450"), Some(u2));
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        sd.save(&rec).unwrap();
        assert_eq!(sd.load("v").unwrap().unwrap(), rec);
        rec.unretire("v-b@10.0.0.2:7450");
        rec.unretire("v-c@10.0.0.3:7450");
        assert!(rec.retired.is_empty());
        sd.save(&rec).unwrap();
        let text = fs::read_to_string(dir.path().join("volumes/v.json")).unwrap();
        assert!(!text.contains("retired"), "{text}");
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
    fn substitutions_apply_over_the_config_keyed_by_the_configured_replica() {
        let cfg = Config::parse(
            "[node]\ncluster_secret_file = \"/k\"\n[[volume]]\nname = \"v\"\nsize = \"1MiB\"\nreplicas = [{ local = \"/a\" }, { remote = \"10.0.0.2:7450\", id = \"v-b\" }, { remote = \"10.0.0.3:7450\", id = \"v-c\" }]\n",
            "t.toml",
        )
        .unwrap()
        .volumes
        .remove(0);
        let locs = |c: &VolumeConfig| c.replicas.iter().map(|r| r.location()).collect::<Vec<_>>();
        let mut rec = VolumeRecord::fresh(&cfg);
        assert_eq!(rec.effective(&cfg), cfg);
        let sub = |addr: &str, since| Substitution {
            configured: String::new(),
            addr: addr.into(),
            id: "v-b".into(),
            since: ha::UnixMs(since),
            reason: ha::event::ReplaceReason::Operator,
        };
        rec.substitute("v-b@10.0.0.2:7450", sub("10.0.0.4:7450", 1));
        assert_eq!(
            locs(&rec.effective(&cfg)),
            ["/a", "v-b@10.0.0.4:7450", "v-c@10.0.0.3:7450"]
        );
        // The substitute replaced in turn: still keyed by what the config says.
        rec.substitute("v-b@10.0.0.4:7450", sub("10.0.0.5:7450", 2));
        assert_eq!(rec.substitutions.len(), 1);
        assert_eq!(rec.substitutions[0].configured, "v-b@10.0.0.2:7450");
        assert_eq!(
            locs(&rec.effective(&cfg)),
            ["/a", "v-b@10.0.0.5:7450", "v-c@10.0.0.3:7450"]
        );
        // Persisted with the record; a record without any reads as before.
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        sd.save(&rec).unwrap();
        assert_eq!(sd.load("v").unwrap().unwrap(), rec);
        rec.substitutions.clear();
        sd.save(&rec).unwrap();
        let text = fs::read_to_string(dir.path().join("volumes/v.json")).unwrap();
        assert!(!text.contains("substitutions"), "{text}");
        assert_eq!(sd.load("v").unwrap().unwrap(), rec);
    }

    #[test]
    fn a_record_of_ublkd_0_1_is_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        fs::write(
            dir.path().join("volumes/v.json"),
            r#"{"version":1,"name":"v","uid":5,"device_id":3,"generation":4,"owner":9,
                "size":1048576,"block_size":512,"clean":true,"read_policy":"spread",
                "replicas":[{"location":"/a","state":"online","errors":0},
                            {"location":"b@h:1","state":"faulted","reason":"I/O error: EIO","errors":1}]}"#,
        )
        .unwrap();
        let rec = sd.load("v").unwrap().unwrap();
        assert_eq!(
            (rec.version, rec.generation, rec.device_id),
            (2, Generation(4), Some(3))
        );
        assert!(rec.volume_uuid.is_nil());
        assert_eq!(rec.replicas[0].state, ReplicaState::Online);
        let r = rec.recorded();
        assert_eq!(r.volume_uuid, None);
        assert_eq!(r.membership, None);
        assert_eq!(
            r.replicas[1].state,
            ReplicaState::Faulted {
                reason: FaultReason::Legacy {
                    detail: "I/O error: EIO".into()
                }
            }
        );
    }

    #[test]
    fn resizing_is_refused() {
        let rec = VolumeRecord::fresh(&cfg());
        let mut c = cfg();
        c.size *= 2;
        assert!(rec
            .check_geometry(&c)
            .unwrap_err()
            .to_string()
            .contains("resizing"));
    }
}
