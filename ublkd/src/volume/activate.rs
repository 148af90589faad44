//! Activation, the I/O around [`replication::activation::plan`]: open the local
//! replicas and STAT the remote ones (their labels), plan, save the new generation,
//! OPEN the remotes with it, write the new membership into the current replicas'
//! labels, and hand back what the health needs. Unreachable replicas that may hold
//! the current data are waited for (the grace period; indefinitely if no current
//! replica is reachable at all).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use replication::activation::{self, Decision, LabelAction, Plan, Probe, Seen};
use replication::backing::Backing;
use replication::health::SlotSpec;
use replication::local::{Create, LocalBacking};
use replication::remote::client::stat;
use replication::remote::{RemoteClient, RemoteSpec};
use replication::state::{FaultReason, IoOp};
use replication::{Generation, ReplicaState, ReplicationError};
use wire::control::{LabelUpdate, OpenRequest};
use wire::label::{AreaRead, Label, Membership};
use wire::{OwnerId, ReplicaUuid};

use super::Net;
use crate::config::{ReplicaConfig, VolumeConfig};
use crate::error::DaemonError;
use crate::state::{ReplicaRecord, StateDir, VolumeRecord};

/// How long a replica that may hold current data is waited for at start before the
/// volume serves without it (a fault is permanent until a rebuild: do not fault on
/// a blip such as a lock still held by an exiting daemon or a server restarting).
pub const GRACE: Duration = Duration::from_secs(10);

/// What an activation produced.
pub struct Activated {
    /// Saved: the new generation, owner, membership and replica states.
    pub record: VolumeRecord,
    /// One per configured replica, in config order.
    pub slots: Vec<SlotSpec>,
    /// What each one's label said when probed (`None`: unreachable or unlabelled).
    pub labels: Vec<Option<Label>>,
    /// The remote clients, by config index, to connect to the health's events.
    pub remotes: Vec<(usize, Arc<RemoteClient>)>,
    /// Every replica zeroes a discarded range cheaply.
    pub cheap_zeroing: bool,
    /// Another owner ran the volume since our last activation (a forced takeover):
    /// the saved dirty maps do not cover its writes.
    pub takeover: Option<Generation>,
    pub local_replicas: usize,
}

/// Why activation ended without a result.
pub enum Halt {
    /// A stop was requested while waiting.
    Stopped,
    /// Another owner ran the volume (up to this generation) since our last
    /// activation, and we were told not to take it over: nothing was opened, so
    /// that owner is not fenced by us.
    TakenOver(Generation),
    Failed(DaemonError),
}

impl From<DaemonError> for Halt {
    fn from(e: DaemonError) -> Halt {
        Halt::Failed(e)
    }
}

/// Probe, plan, open, label; until it works, `stop()` says stop, or it fails for
/// good. `waiting(reason)` is told what the volume waits for. Unless
/// `allow_takeover` (the operator forced it), a volume another owner ran since our
/// last activation — by the labels, or by our record's [`crate::state::Fenced`] —
/// is left alone ([`Halt::TakenOver`]) before any replica is opened: opening would
/// fence that owner, and the newest history in reach may not be its.
pub fn activate(
    cfg: &VolumeConfig,
    net: &Net,
    state_dir: &StateDir,
    record: Option<VolumeRecord>,
    allow_takeover: bool,
    stop: &mut dyn FnMut(Duration) -> bool,
    waiting: &mut dyn FnMut(Option<String>),
) -> Result<Activated, Halt> {
    let fail = |m: String| Halt::Failed(DaemonError::volume(&cfg.name, m));
    let owner = OwnerId(wire::random::u64());
    let grace_end = Instant::now() + GRACE;
    // Local backings stay open (and locked) across rounds.
    let mut locals: Vec<Option<Arc<LocalBacking>>> = vec![None; cfg.replicas.len()];
    if let (false, Some(f)) = (
        allow_takeover,
        record.as_ref().and_then(|r| r.fenced.as_ref()),
    ) {
        return Err(Halt::TakenOver(f.by));
    }
    let mut record = record;
    loop {
        let recorded = record.as_ref().map(VolumeRecord::recorded);
        let probes = probe_all(cfg, net, record.as_ref(), &mut locals);
        let decision = activation::plan(&activation::Input {
            volume: &cfg.name,
            size: cfg.size,
            block_size: cfg.block_size,
            record: recorded.as_ref(),
            probes: &probes,
            grace_over: Instant::now() >= grace_end,
        })
        .map_err(|e| fail(e.to_string()))?;
        let plan = match decision {
            Decision::Go(plan) => plan,
            Decision::Wait { for_replicas } => {
                let why = format!(
                    "waiting for replica(s) {} that may hold the current data",
                    for_replicas.join(", ")
                );
                tracing::warn!(volume = %cfg.name, reason = %why, "not serving yet");
                waiting(Some(why));
                if stop(Duration::from_secs(1)) {
                    return Err(Halt::Stopped);
                }
                continue;
            }
        };
        waiting(None);
        if let (false, Some(g)) = (allow_takeover, plan.takeover) {
            return Err(Halt::TakenOver(g));
        }
        // Durable before any replica sees it: a generation is never reused.
        let mut rec = record.clone().unwrap_or_else(|| {
            // No record, but labelled replicas: the state dir was lost, and with it
            // whether the last run stopped cleanly. Count it as not (a host crash
            // may have left writes on some replicas only: resync them all).
            let mut r = VolumeRecord::fresh(cfg);
            r.clean = !probes
                .iter()
                .any(|p| matches!(&p.seen, Seen::Label(l) if !l.volume_uuid.is_nil()));
            r
        });
        rec.volume_uuid = plan.volume_uuid;
        rec.generation = plan.generation;
        rec.owner = owner;
        if let Some(f) = rec.fenced.take() {
            tracing::warn!(volume = %cfg.name, newer = f.by.0, generation = plan.generation.0,
                "takeover forced by the operator: fencing the newer owner");
        }
        state_dir.save(&rec)?;
        match open_and_label(cfg, net, &plan, owner, &probes, &locals) {
            Ok(mut opened) => {
                for (s, r) in opened.slots.iter_mut().zip(&cfg.replicas) {
                    s.errors = record
                        .as_ref()
                        .and_then(|rec| rec.replica(&r.location()))
                        .map_or(0, |x| x.errors);
                }
                rec.membership = opened.membership.clone();
                rec.replicas = cfg
                    .replicas
                    .iter()
                    .zip(&opened.slots)
                    .map(|(r, s)| ReplicaRecord {
                        location: r.location(),
                        uuid: Some(s.uuid),
                        state: s.state.clone(),
                        errors: s.errors,
                    })
                    .collect();
                state_dir.save(&rec)?;
                for s in &opened.slots {
                    if let Some(reason) = s.state.fault_reason() {
                        tracing::warn!(volume = %cfg.name, replica = %s.location, %reason,
                            "replica not trusted at start");
                    }
                }
                return Ok(Activated {
                    record: rec,
                    labels: probes
                        .iter()
                        .map(|p| match &p.seen {
                            Seen::Label(l) => Some(l.clone()),
                            _ => None,
                        })
                        .collect(),
                    slots: opened.slots,
                    remotes: opened.remotes,
                    cheap_zeroing: opened.cheap_zeroing,
                    takeover: plan.takeover,
                    local_replicas: locals.iter().flatten().count(),
                });
            }
            Err(Retry::Again(why)) => {
                tracing::warn!(volume = %cfg.name, reason = %why, "activation round failed: retrying");
                waiting(Some(why));
                record = Some(rec);
                if stop(Duration::from_secs(1)) {
                    return Err(Halt::Stopped);
                }
            }
            Err(Retry::Never(e)) => return Err(Halt::Failed(e)),
        }
    }
}

/// OPEN a remote replica that was unreachable at activation, at the running
/// generation. Refused when its label shows another replica than the one this
/// slot had (it would be a foreign disk under our membership). Returns the
/// client and the label's membership epoch.
pub fn reopen(
    cfg: &VolumeConfig,
    net: &Net,
    replica: &ReplicaConfig,
    record: &VolumeRecord,
    uuid: ReplicaUuid,
) -> Result<(Arc<RemoteClient>, wire::Epoch), String> {
    let parts = OpenRequestParts {
        volume_uuid: record.volume_uuid,
        generation: record.generation,
        owner: record.owner,
        create: None,
    };
    let spec = remote_spec(cfg, net, replica, &parts).ok_or("not a remote replica")?;
    let location = spec.location();
    let (client, reply) = net
        .rt
        .block_on(RemoteClient::connect(spec))
        .map_err(|e| e.to_string())?;
    if reply.label.replica_uuid != uuid {
        return Err(format!(
            "{location} now holds replica {}, not {uuid} that this volume had: not used (replace it by config)",
            reply.label.replica_uuid
        ));
    }
    Ok((Arc::new(client), reply.label.membership.epoch))
}

/// Open a replica added to a running volume (by a reload): created if missing,
/// given a new identity and an outdated first label (it holds nothing yet: a full
/// rebuild fills it). Refused if it holds a replica of another volume.
pub fn open_added(
    cfg: &VolumeConfig,
    net: &Net,
    replica: &ReplicaConfig,
    record: &VolumeRecord,
) -> Result<(Backing, ReplicaUuid, Option<Arc<RemoteClient>>), String> {
    let uuid = ReplicaUuid::random();
    match replica {
        ReplicaConfig::Local {
            path,
            use_unlabelled,
        } => {
            let existed = path.exists();
            let b =
                LocalBacking::open(path, cfg.size, Create::IfMissing).map_err(|e| e.to_string())?;
            match b.read_label() {
                Ok(AreaRead::Label { label, .. }) if label.volume_uuid != record.volume_uuid => {
                    return Err(format!(
                        "{} holds a replica of volume {:?}: not overwritten (give another path, or wipe it)",
                        path.display(),
                        label.volume
                    ));
                }
                Ok(AreaRead::Label { .. }) => {}
                Ok(AreaRead::NoLabel) if existed && !use_unlabelled => {
                    if let Some(what) = b.foreign_signature().map_err(|e| e.to_string())? {
                        return Err(foreign_data(path, what));
                    }
                }
                Ok(AreaRead::NoLabel) => {}
                // docs/protocol.md §15: never overwritten as if it were blank.
                Err(e) => {
                    return Err(format!(
                        "{e}: a damaged label is not overwritten (if the path is right and its data may go, wipe it: wipefs -a, or delete the file)"
                    ))
                }
            }
            let mut l = Label::new(
                &cfg.name,
                record.volume_uuid,
                uuid,
                cfg.size,
                cfg.block_size,
            );
            l.generation = record.generation;
            l.owner = record.owner;
            l.outdated = true;
            b.write_label(&l).map_err(|e| e.to_string())?;
            Ok((Backing::Local(Arc::new(b)), uuid, None))
        }
        _ => {
            let parts = OpenRequestParts {
                volume_uuid: record.volume_uuid,
                generation: record.generation,
                owner: record.owner,
                create: Some(uuid),
            };
            let spec = remote_spec(cfg, net, replica, &parts).ok_or("not a remote replica")?;
            let (client, reply) = net
                .rt
                .block_on(RemoteClient::connect(spec))
                .map_err(|e| e.to_string())?;
            let client = Arc::new(client);
            Ok((
                Backing::Remote(client.clone()),
                reply.label.replica_uuid,
                Some(client),
            ))
        }
    }
}

/// What reclaiming a retired replica's storage did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Reclaimed {
    /// Its file (local or on its server) is deleted.
    Deleted { freed_bytes: u64 },
    /// A block device: its label is zeroed, so nothing takes it for a replica.
    LabelWiped,
    /// Nothing of it is left there.
    AlreadyGone,
    /// The storage there is another replica now (or no replica): left alone.
    NotOurs { holds: String },
}

/// Delete the storage of `retired` (a replica of the volume of `record` no longer
/// in its running set), checking first that it still is that very replica (its
/// uuid). `Err`: it could not be reached or changed; it stays retired.
pub fn reclaim(
    cfg: &VolumeConfig,
    net: &Net,
    record: &VolumeRecord,
    retired: &crate::state::Retired,
) -> Result<Reclaimed, String> {
    let replica = ReplicaConfig::from_location(&retired.location);
    match &replica {
        ReplicaConfig::Local { path, .. } => {
            if !path.exists() {
                return Ok(Reclaimed::AlreadyGone);
            }
            let b = LocalBacking::open(path, cfg.size, Create::Never).map_err(|e| e.to_string())?;
            match b.read_label().map_err(|e| e.to_string())? {
                AreaRead::Label { label, .. }
                    if label.volume_uuid == record.volume_uuid
                        && label.replica_uuid == retired.uuid => {}
                AreaRead::Label { label, .. } => {
                    return Ok(Reclaimed::NotOurs {
                        holds: format!(
                            "replica {} of volume {:?}",
                            label.replica_uuid, label.volume
                        ),
                    })
                }
                AreaRead::NoLabel => {
                    return Ok(Reclaimed::NotOurs {
                        holds: "no replica label".into(),
                    })
                }
            }
            if b.kind() == replication::local::BackingKind::BlockDevice {
                b.wipe_label().map_err(|e| e.to_string())?;
                return Ok(Reclaimed::LabelWiped);
            }
            let freed_bytes = std::fs::metadata(path)
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .unwrap_or(0);
            drop(b);
            std::fs::remove_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(Reclaimed::Deleted { freed_bytes })
        }
        _ => {
            let parts = OpenRequestParts {
                volume_uuid: record.volume_uuid,
                generation: record.generation,
                owner: record.owner,
                create: None,
            };
            let spec = remote_spec(cfg, net, &replica, &parts).ok_or("not a remote replica")?;
            match net
                .rt
                .block_on(replication::remote::client::delete(&spec, retired.uuid))
            {
                Ok(r) => Ok(Reclaimed::Deleted {
                    freed_bytes: r.freed_bytes,
                }),
                Err(ReplicationError::Remote {
                    status, message, ..
                }) => match status {
                    wire::frame::Status::NotFound => Ok(Reclaimed::AlreadyGone),
                    wire::frame::Status::Conflict => Ok(Reclaimed::NotOurs { holds: message }),
                    _ => Err(message),
                },
                Err(e) => Err(e.to_string()),
            }
        }
    }
}

/// Open (and lock) or STAT every configured replica; what each one shows.
fn probe_all(
    cfg: &VolumeConfig,
    net: &Net,
    record: Option<&VolumeRecord>,
    locals: &mut [Option<Arc<LocalBacking>>],
) -> Vec<Probe> {
    let remote_specs: Vec<(usize, RemoteSpec)> = cfg
        .replicas
        .iter()
        .enumerate()
        .filter_map(|(i, r)| Some((i, remote_spec(cfg, net, r, &OpenRequestParts::probe())?)))
        .collect();
    let stats = net
        .rt
        .block_on(join_all(remote_specs.iter().map(|(_, spec)| stat(spec))));
    let mut remote_seen = remote_specs.iter().map(|(i, _)| *i).zip(stats);
    cfg.replicas
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let seen = match r {
                ReplicaConfig::Local {
                    path,
                    use_unlabelled,
                } => {
                    // A missing file is created only when the record does not know
                    // this replica (a new volume, or a replica added to the config):
                    // one that vanished from an existing volume lost its data.
                    let known = record.is_some_and(|rec| rec.replica(&r.location()).is_some());
                    probe_local(path, cfg.size, !known, *use_unlabelled, &mut locals[i])
                }
                _ => match remote_seen.next() {
                    Some((_, Ok(reply))) => match reply.label {
                        Some(l) => Seen::Label(l),
                        None => Seen::Missing,
                    },
                    Some((_, Err(e))) => Seen::Unreachable {
                        error: e.to_string(),
                    },
                    None => unreachable!("one STAT per remote replica"),
                },
            };
            Probe {
                location: r.location(),
                remote: r.remote().is_some(),
                seen,
            }
        })
        .collect()
}

/// Why a path without a label but with `what` on it is not used.
fn foreign_data(path: &Path, what: &str) -> String {
    format!(
        "{} has no replica label but holds {what}: not used, so that nothing overwrites it. \
         If the path is right and its data may be overwritten (or it is this volume's data, \
         from ublkd 0.1), set use_unlabelled = true on this replica; or wipe it (wipefs -a)",
        path.display()
    )
}

/// Open (or create) a local replica and read its label. A path that existed
/// without a label but holds recognisable data is refused unless `use_unlabelled`.
fn probe_local(
    path: &Path,
    size: u64,
    may_create: bool,
    use_unlabelled: bool,
    slot: &mut Option<Arc<LocalBacking>>,
) -> Seen {
    let mut created = false;
    if slot.is_none() {
        let existed = path.exists();
        let create = if may_create {
            Create::IfMissing
        } else {
            Create::Never
        };
        match LocalBacking::open(path, size, create) {
            Ok(b) => {
                created = !existed;
                *slot = Some(Arc::new(b));
            }
            Err(snapshot::StoreError::Open { ref source, .. })
                if source.kind() == std::io::ErrorKind::NotFound
                    && !may_create
                    && !path.starts_with("/dev/") =>
            {
                return Seen::Missing;
            }
            // Busy, locked, a /dev node not created yet, EIO: maybe transient.
            Err(e) => {
                return Seen::Unreachable {
                    error: e.to_string(),
                }
            }
        }
    }
    let b = slot.as_ref().expect("opened above");
    match b.read_label() {
        Ok(AreaRead::Label { label, .. }) => Seen::Label(label),
        Ok(AreaRead::NoLabel) if !created && !use_unlabelled => match b.foreign_signature() {
            Ok(None) => Seen::Unlabelled { created },
            Ok(Some(what)) => {
                *slot = None;
                Seen::Unreachable {
                    error: foreign_data(path, what),
                }
            }
            Err(e) => Seen::Unreachable {
                error: e.to_string(),
            },
        },
        Ok(AreaRead::NoLabel) => Seen::Unlabelled { created },
        Err(e) => Seen::Unreachable {
            error: e.to_string(),
        },
    }
}

/// The parts of an OPEN that differ between the STAT probe and the real OPEN.
struct OpenRequestParts {
    volume_uuid: wire::VolumeUuid,
    generation: Generation,
    owner: OwnerId,
    create: Option<ReplicaUuid>,
}

impl OpenRequestParts {
    /// STAT needs only the replica id and the address.
    fn probe() -> OpenRequestParts {
        OpenRequestParts {
            volume_uuid: wire::VolumeUuid::default(),
            generation: Generation(0),
            owner: OwnerId(0),
            create: None,
        }
    }
}

fn remote_spec(
    cfg: &VolumeConfig,
    net: &Net,
    r: &ReplicaConfig,
    parts: &OpenRequestParts,
) -> Option<RemoteSpec> {
    let (addr, id) = r.remote()?;
    Some(RemoteSpec {
        addr: addr.to_string(),
        secret: net
            .secret
            .clone()
            .expect("config validation requires a secret for remote replicas"),
        open: OpenRequest {
            replica: id.to_string(),
            volume: cfg.name.clone(),
            volume_uuid: parts.volume_uuid,
            size: cfg.size,
            block_size: cfg.block_size,
            generation: parts.generation,
            owner: parts.owner,
            create: parts.create,
        },
        deadline: net.io_timeout,
        connect_timeout: Duration::from_secs(3),
    })
}

struct Opened {
    slots: Vec<SlotSpec>,
    remotes: Vec<(usize, Arc<RemoteClient>)>,
    membership: Membership,
    cheap_zeroing: bool,
}

enum Retry {
    /// Try the whole activation again (a current replica could not be opened).
    Again(String),
    Never(DaemonError),
}

/// OPEN the remotes at the plan's generation, then write the labels: the new
/// membership to every current replica (dropping any that cannot take it), a
/// first label to new and adopted ones.
fn open_and_label(
    cfg: &VolumeConfig,
    net: &Net,
    plan: &Plan,
    owner: OwnerId,
    probes: &[Probe],
    locals: &[Option<Arc<LocalBacking>>],
) -> Result<Opened, Retry> {
    let never = |m: String| Retry::Never(DaemonError::volume(&cfg.name, m));
    let mut states: Vec<ReplicaState> = plan.replicas.iter().map(|r| r.state.clone()).collect();
    let mut backings: Vec<Option<Backing>> = locals
        .iter()
        .map(|l| l.clone().map(Backing::Local))
        .collect();
    let mut cheap = locals.iter().flatten().all(|b| b.cheap_zeroing());

    // OPEN every reachable remote (members or not: the new generation fences any
    // older owner on all of them).
    let to_open: Vec<(usize, RemoteSpec, Option<Label>)> = cfg
        .replicas
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            matches!(probes[*i].seen, Seen::Label(_))
                || plan.replicas[*i].label == LabelAction::Create
        })
        .filter_map(|(i, r)| {
            let parts = OpenRequestParts {
                volume_uuid: plan.volume_uuid,
                generation: plan.generation,
                owner,
                create: (plan.replicas[i].label == LabelAction::Create)
                    .then_some(plan.replicas[i].uuid),
            };
            let stat_label = match &probes[i].seen {
                Seen::Label(l) => Some(l.clone()),
                _ => None,
            };
            Some((i, remote_spec(cfg, net, r, &parts)?, stat_label))
        })
        .collect();
    let opened = net.rt.block_on(join_all(to_open.into_iter().map(
        |(i, spec, st)| async move { (i, spec.location(), st, RemoteClient::connect(spec).await) },
    )));
    let mut remotes = Vec::new();
    for (i, loc, st, res) in opened {
        match res {
            Ok((client, reply)) => {
                // Someone else's OPEN between our STAT and ours: its writes may be
                // on this replica and nowhere we know of.
                if let Some(st) = st.filter(|st| {
                    (st.generation, st.owner) != (reply.previous_generation, reply.previous_owner)
                }) {
                    return Err(never(format!(
                        "another owner activated this volume during our activation (replica {loc} went from generation {} to {}); start it again",
                        st.generation.0, reply.previous_generation.0
                    )));
                }
                cheap &= reply.cheap_zeroing;
                let client = Arc::new(client);
                backings[i] = Some(Backing::Remote(client.clone()));
                remotes.push((i, client));
            }
            Err(e @ ReplicationError::Fenced { .. }) => {
                return Err(never(format!(
                    "another owner activated this volume meanwhile: {e}"
                )))
            }
            Err(e) => {
                tracing::error!(volume = %cfg.name, replica = %loc, error = %e, "cannot open replica");
                if states[i] == ReplicaState::Online {
                    states[i] = ReplicaState::Faulted {
                        reason: FaultReason::OpenFailed {
                            error: e.to_string(),
                        },
                    };
                }
            }
        }
    }

    // First labels for new and adopted local replicas that are not current.
    for (i, r) in plan.replicas.iter().enumerate() {
        if let (Some(Backing::Local(b)), LabelAction::Write, false) =
            (&backings[i], r.label, states[i] == ReplicaState::Online)
        {
            let mut l = Label::new(
                &cfg.name,
                plan.volume_uuid,
                r.uuid,
                cfg.size,
                cfg.block_size,
            );
            l.generation = plan.generation;
            l.owner = owner;
            l.outdated = true;
            if let Err(e) = b.write_label(&l) {
                tracing::warn!(volume = %cfg.name, replica = %b.path().display(), error = %e, "cannot label a new replica");
            }
        }
    }

    // The new membership into every current replica; one that cannot take it is
    // not current, and the rest get an epoch without it.
    let mut membership = plan.membership.clone();
    loop {
        membership.members = (0..states.len())
            .filter(|&i| states[i] == ReplicaState::Online)
            .map(|i| plan.replicas[i].uuid)
            .collect();
        if membership.members.is_empty() {
            return Err(Retry::Again(
                "no current replica could be opened and labelled".into(),
            ));
        }
        let mut failed = false;
        for i in 0..states.len() {
            if states[i] != ReplicaState::Online {
                continue;
            }
            let res = match &backings[i] {
                Some(Backing::Local(b)) => {
                    let mut l = Label::new(
                        &cfg.name,
                        plan.volume_uuid,
                        plan.replicas[i].uuid,
                        cfg.size,
                        cfg.block_size,
                    );
                    l.generation = plan.generation;
                    l.owner = owner;
                    l.membership = membership.clone();
                    b.write_label(&l).map_err(|e| e.to_string())
                }
                Some(b @ Backing::Remote(_)) => b
                    .update_label(&LabelUpdate {
                        membership: membership.clone(),
                        outdated: false,
                    })
                    .map_err(|e| e.to_string()),
                _ => Err("not open".into()),
            };
            if let Err(e) = res {
                tracing::error!(volume = %cfg.name, replica = %probes[i].location, error = %e, "cannot write the membership label");
                states[i] = ReplicaState::Faulted {
                    reason: FaultReason::IoError {
                        op: IoOp::Label,
                        errno: libc::EIO,
                    },
                };
                failed = true;
            }
        }
        if !failed {
            break;
        }
        membership.epoch = membership.epoch.next();
    }

    let slots = plan
        .replicas
        .iter()
        .zip(states)
        .zip(backings)
        .zip(probes)
        .map(|(((r, state), backing), probe)| SlotSpec {
            location: probe.location.clone(),
            uuid: r.uuid,
            backing,
            remote: probe.remote,
            state,
            errors: 0,
            dirty: None,
        })
        .collect();
    Ok(Opened {
        slots,
        remotes,
        membership,
        cheap_zeroing: cheap,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local_retired(dir: &Path) -> (VolumeConfig, Net, VolumeRecord, std::path::PathBuf) {
        let path = dir.join("old.img");
        let text = format!(
            "[node]\nstate_dir = \"{d}/s\"\n[[volume]]\nname = \"v\"\nsize = \"1MiB\"\nreplicas = [{{ local = \"{d}/a.img\" }}]\n",
            d = dir.display()
        );
        let cfg = crate::config::Config::parse(&text, "t.toml")
            .unwrap()
            .volumes
            .remove(0);
        let rt = Box::leak(Box::new(tokio::runtime::Runtime::new().unwrap()));
        let net = Net {
            rt: rt.handle().clone(),
            secret: None,
            io_timeout: Duration::from_secs(1),
            no_replica_timeout: Duration::from_secs(1),
            rebuild: replication::rebuild::NodeLimits::unlimited(),
            partial_window_s: std::sync::Arc::new(600.into()),
            grain: 64 << 10,
            frontend: crate::volume::Frontend::Headless,
        };
        let mut record = VolumeRecord::fresh(&cfg);
        record.volume_uuid = wire::VolumeUuid::random();
        (cfg, net, record, path)
    }

    fn retired(path: &Path, uuid: ReplicaUuid) -> crate::state::Retired {
        crate::state::Retired {
            location: path.display().to_string(),
            uuid,
            since: ha::UnixMs(0),
            why: crate::state::RetiredWhy::Removed,
        }
    }

    /// A retired local file is deleted only while its label still names the
    /// retired replica of this volume; a copy relabelled since is left alone.
    #[test]
    fn reclaiming_a_local_replica_deletes_only_the_retired_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, net, record, path) = local_retired(dir.path());
        let b = LocalBacking::open(&path, cfg.size, Create::IfMissing).unwrap();
        let uuid = ReplicaUuid::random();
        b.write_label(&Label::new("v", record.volume_uuid, uuid, cfg.size, 4096))
            .unwrap();
        drop(b);
        let other = reclaim(&cfg, &net, &record, &retired(&path, ReplicaUuid::random())).unwrap();
        assert!(matches!(other, Reclaimed::NotOurs { .. }), "{other:?}");
        let mut foreign = record.clone();
        foreign.volume_uuid = wire::VolumeUuid::random();
        let other = reclaim(&cfg, &net, &foreign, &retired(&path, uuid)).unwrap();
        assert!(matches!(other, Reclaimed::NotOurs { .. }), "{other:?}");
        assert!(path.exists());
        let done = reclaim(&cfg, &net, &record, &retired(&path, uuid)).unwrap();
        assert!(
            matches!(done, Reclaimed::Deleted { freed_bytes } if freed_bytes > 0),
            "{done:?}"
        );
        assert!(!path.exists());
        assert_eq!(
            reclaim(&cfg, &net, &record, &retired(&path, uuid)).unwrap(),
            Reclaimed::AlreadyGone
        );
    }
}
