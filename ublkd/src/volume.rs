//! One volume's lifecycle on its own control thread: open the replicas, reconcile
//! the persisted record, add a new ublk device or take back a QUIESCED one (ublk
//! user recovery), serve until told to stop, then remove the device.
//!
//! libublk's control ring is thread-local, so every `UblkCtrl` of a volume is made
//! and used on that volume's thread; other threads talk to it over a channel.

use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::UblkFlags;
use replication::health::Fence;
use replication::health::{Health, IoStatsSnapshot, ReadPolicy, ReplicaHealth};
use replication::local::{Create, LocalBacking};
use replication::remote::auth::random_u64;
use replication::remote::client::stat;
use replication::remote::wire::{OpenReply, OpenRequest, StatReply};
use replication::remote::{RemoteClient, RemoteSpec, Secret};
use replication::request::Geometry;
use replication::{Generation, ReplicaState, ReplicationError, VolumeState};
use serde::{Deserialize, Serialize};

use crate::config::{ReplicaConfig, VolumeConfig};
use crate::daemon::ublk_device_exists;
use crate::error::DaemonError;
use crate::frontend::{self, Backing, DataPath};
use crate::state::{RecordSink, StateDir, VolumeRecord};

/// Flags every ublkd device is created with: survive a daemon crash, and re-issue
/// the requests the dead daemon held instead of failing them.
pub const CTRL_FLAGS: u64 =
    (libublk::sys::UBLK_F_USER_RECOVERY | libublk::sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;

pub enum VolumeCmd {
    Stop,
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
    pub replicas: Vec<ReplicaStatus>,
    pub io: IoStatsSnapshot,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub index: usize,
    pub path: String,
    /// `None`: the volume never ran, nothing is known yet.
    pub state: Option<ReplicaState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub errors: u64,
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
}

/// State shared between a volume's thread and the rest of the daemon.
pub struct VolumeShared {
    cfg: VolumeConfig,
    state_dir: StateDir,
    live: Mutex<Live>,
}

impl VolumeShared {
    fn set_state(&self, next: VolumeState, reason: Option<String>) {
        let mut live = self.live.lock().unwrap();
        let cur = live.state;
        assert!(
            cur == next || cur.can_become(next),
            "volume {}: illegal transition {cur:?} -> {next:?}",
            self.cfg.name
        );
        live.state = next;
        live.reason = reason;
    }

    pub fn state(&self) -> VolumeState {
        let live = self.live.lock().unwrap();
        match (live.state, &live.health) {
            // Live/Degraded follow replica health while serving.
            (s, Some(h)) if s.is_serving() => h.serving_state(),
            (s, _) => s,
        }
    }

    pub fn device_id(&self) -> Option<u32> {
        self.live.lock().unwrap().device_id
    }

    pub fn status(&self) -> VolumeStatus {
        let state = self.state();
        let live = self.live.lock().unwrap();
        // Not serving (yet): the last persisted record, if the volume ever ran.
        let rec = match &live.health {
            Some(_) => None,
            None => self.state_dir.load(&self.cfg.name).ok().flatten(),
        };
        let (replicas, io): (Vec<(String, Option<ReplicaHealth>)>, _) = match &live.health {
            Some(h) => (
                h.snapshot()
                    .into_iter()
                    .map(|r| (r.location.clone(), Some(r)))
                    .collect(),
                h.stats.snapshot(),
            ),
            None => {
                let known = |loc: &str| {
                    rec.as_ref()
                        .and_then(|r| r.replicas.iter().find(|h| h.location == loc).cloned())
                };
                (
                    self.cfg
                        .replicas
                        .iter()
                        .map(|r| (r.location(), known(&r.location())))
                        .collect(),
                    IoStatsSnapshot::default(),
                )
            }
        };
        VolumeStatus {
            name: self.cfg.name.clone(),
            state,
            reason: live.reason.clone(),
            device: live
                .device_id
                .filter(|_| state.is_serving())
                .map(|id| format!("/dev/ublkb{id}")),
            device_id: live.device_id,
            generation: live.generation.0,
            size: self.cfg.size,
            block_size: self.cfg.block_size,
            queues: live.queues,
            depth: live.depth,
            ublk_flags: live.ublk_flags,
            read_policy: match &live.health {
                Some(h) => Some(h.read_policy()),
                None => rec.map(|r| r.read_policy),
            },
            replicas: replicas
                .into_iter()
                .enumerate()
                .map(|(index, (path, h))| ReplicaStatus {
                    index,
                    path,
                    state: h.as_ref().map(|h| h.state),
                    reason: h.as_ref().and_then(|h| h.reason.clone()),
                    errors: h.map_or(0, |h| h.errors),
                })
                .collect(),
            io,
        }
    }
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
    pub fn spawn(
        cfg: VolumeConfig,
        state_dir: StateDir,
        device_id: Option<u32>,
        net: Net,
    ) -> VolumeRunner {
        let shared = Arc::new(VolumeShared {
            cfg: cfg.clone(),
            state_dir: state_dir.clone(),
            live: Mutex::new(Live {
                device_id,
                ..Live::default()
            }),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vol-{}", cfg.name))
            .spawn(move || {
                if let Err(e) = run(&cfg, &state_dir, device_id, &net, &sh, rx) {
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
            cfg: cfg.clone(),
            state_dir: state_dir.clone(),
            live: Mutex::new(Live::default()),
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
}

/// How long a replica that is transiently unavailable (lock still held by an exiting
/// daemon, device busy, device node not created yet) is waited for before it is
/// faulted — a fault is permanent until a rebuild, so do not fault on a blip.
const OPEN_GRACE: Duration = Duration::from_secs(10);

fn open_with_grace(
    path: &Path,
    size: u64,
    create: Create,
    deadline: std::time::Instant,
) -> Result<LocalBacking, replication::ReplicationError> {
    loop {
        match LocalBacking::open(path, size, create) {
            Err(replication::ReplicationError::Open { ref source, .. })
                if std::time::Instant::now() < deadline
                    && match source.raw_os_error() {
                        Some(libc::EWOULDBLOCK) | Some(libc::EBUSY) => true,
                        Some(libc::ENOENT) => path.starts_with("/dev/"),
                        _ => false,
                    } =>
            {
                std::thread::sleep(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

enum Mode {
    Add {
        id: i32,
    },
    Recover {
        id: u32,
        queues: u16,
        depth: u16,
        max_io: u32,
    },
}

fn run(
    cfg: &VolumeConfig,
    state_dir: &StateDir,
    claimed_id: Option<u32>,
    net: &Net,
    shared: &Arc<VolumeShared>,
    cmd: Receiver<VolumeCmd>,
) -> Result<(), DaemonError> {
    shared.set_state(VolumeState::Starting, None);
    // Only a volume's first activation creates missing replica files; later, a
    // missing backing means its data is gone and the replica is faulted.
    let (mut record, create, known) = match state_dir.load(&cfg.name)? {
        Some(rec) => {
            let known: Vec<String> = rec.replicas.iter().map(|h| h.location.clone()).collect();
            (rec.reconcile(cfg)?, Create::Never, known)
        }
        None => (VolumeRecord::fresh(cfg), Create::IfMissing, Vec::new()),
    };

    // The device first: a LIVE one served by another daemon must stop us before we
    // touch (and wait for the locks of) its replicas.
    let mode = match record.device_id.or(claimed_id) {
        Some(id) if ublk_device_exists(id) => inspect_existing(cfg, record.uid, id)?,
        Some(id) => Mode::Add { id: id as i32 },
        None => Mode::Add { id: -1 },
    };

    // A replica whose backing cannot be opened is faulted (if another is online):
    // a dead disk must not keep the volume down.
    let mut backings: Vec<(String, Backing)> = Vec::with_capacity(cfg.replicas.len());
    let grace = std::time::Instant::now() + OPEN_GRACE;
    let fault = |record: &mut VolumeRecord, i: usize, why: String| {
        let h = &mut record.replicas[i];
        if h.state == ReplicaState::Online {
            h.state = ReplicaState::Faulted;
            h.reason = Some(why);
        }
    };
    for (i, r) in cfg.replicas.iter().enumerate() {
        let ReplicaConfig::Local { path } = r else {
            backings.push((r.location(), Backing::Unavailable)); // remote: below
            continue;
        };
        match open_with_grace(path, cfg.size, create, grace) {
            Ok(b) => backings.push((r.location(), Backing::Local(Arc::new(b)))),
            Err(e) => {
                tracing::error!(volume = %cfg.name, replica = %r.location(), error = %e, "cannot open replica");
                fault(&mut record, i, format!("cannot open: {e}"));
                backings.push((r.location(), Backing::Unavailable));
            }
        }
    }
    assert_eq!(
        backings.len(),
        cfg.replicas.len(),
        "one backing per replica"
    );

    // Activation generation: above our last one and above every generation a
    // remote replica has stored, so each replica fences any older owner.
    let fence = Arc::new(Fence::default());
    let owner = random_u64();
    let mut remotes = remote_specs(cfg, net, &record, create, &known, owner)?;
    let stats = net.rt.block_on(futures::future::join_all(
        remotes.iter().map(|(_, spec)| stat_with_grace(spec, grace)),
    ));
    // Did another owner activate the volume since our last activation? A replica
    // holding a higher generation, or ours but under another activation id (ours was
    // saved, then another owner took the same number before we opened anything).
    let (last_gen, last_owner) = (record.generation.0, record.owner);
    let foreign = |st: &StatReply| {
        st.generation > last_gen
            || (st.generation == last_gen
                && st.generation > 0
                && last_owner != 0
                && st.owner != last_owner)
    };
    let mut newest = record.generation;
    let mut taken_over = false;
    for ((i, spec), st) in remotes.iter().zip(&stats) {
        match st {
            Ok(st) if st.exists && st.volume.as_deref() != Some(&cfg.name) => {
                return Err(DaemonError::volume(
                    &cfg.name,
                    format!(
                        "replica {} belongs to volume {:?}",
                        spec.location(),
                        st.volume.as_deref().unwrap_or("?")
                    ),
                ))
            }
            Ok(st) => {
                newest = newest.max(Generation(st.generation));
                taken_over |= foreign(st);
                if st.stale {
                    fault(
                        &mut record,
                        *i,
                        "marked stale by an owner: missed writes".into(),
                    );
                }
            }
            Err(e) => {
                tracing::error!(volume = %cfg.name, replica = %spec.location(), error = %e, "replica server unreachable");
                fault(&mut record, *i, format!("unreachable: {e}"));
            }
        }
    }
    if taken_over {
        if let Mode::Recover { id, .. } = mode {
            // Recovering would let the kernel re-issue the dead daemon's writes onto the
            // newer owner's data, and the filesystem above resume on a stale view of it.
            // This owner is fenced: remove its device, failing what waits on it.
            let why = format!(
                "another owner activated this volume (generation {}) after /dev/ublkb{id} was created: not recovering it; the device is removed",
                newest.0
            );
            tracing::error!(volume = %cfg.name, reason = %why, "fenced");
            match UblkCtrl::new_simple(id as i32) {
                Ok(c) => {
                    if let Err(e) = c.del_dev_async() {
                        tracing::error!(volume = %cfg.name, error = ?e, "cannot delete the stale device");
                    }
                }
                Err(e) => {
                    tracing::error!(volume = %cfg.name, error = ?e, "cannot open the stale device")
                }
            }
            shared.set_state(VolumeState::Fenced, Some(why));
            return Ok(());
        }
        // Whatever the other owner wrote is not on our local replicas, nor on remotes
        // behind its generation.
        for ((i, spec), st) in remotes.iter().zip(&stats) {
            if st
                .as_ref()
                .is_ok_and(|st| Generation(st.generation) < newest)
            {
                fault(
                    &mut record,
                    *i,
                    format!("missed writes of generation {}", newest.0),
                );
                tracing::warn!(volume = %cfg.name, replica = %spec.location(), "replica is behind a newer owner");
            }
        }
        for (i, r) in cfg.replicas.iter().enumerate() {
            if r.local_path().is_some() {
                fault(
                    &mut record,
                    i,
                    format!("missed writes of generation {} (another owner)", newest.0),
                );
            }
        }
    }
    record.generation = newest.checked_next().ok_or_else(|| {
        DaemonError::volume(
            &cfg.name,
            "replica generation at its maximum: refusing to activate",
        )
    })?;
    record.owner = owner;
    // Durable before any replica sees it: we never reuse a generation.
    state_dir.save(&record)?;
    for (i, spec) in remotes.iter_mut() {
        spec.open.generation = record.generation.0;
        // Tell the server which replicas missed writes, so no later owner trusts them.
        spec.open.stale = record.replicas[*i].state == ReplicaState::Faulted;
    }
    let opened = net.rt.block_on(futures::future::join_all(
        remotes.into_iter().zip(stats).map(|((i, spec), st)| {
            let fence = fence.clone();
            async move {
                let res = open_with_grace_remote(spec.clone(), fence, grace).await;
                (i, spec, st.ok(), res)
            }
        }),
    ));
    for (i, spec, st, res) in opened {
        let loc = spec.location();
        backings[i].1 = match res {
            Ok((client, reply)) => {
                // Someone else's OPEN between our STAT and ours: its writes may be on
                // this replica and nowhere we know of.
                if let Some(st) = st.filter(|st| {
                    (st.generation, st.owner) != (reply.previous_generation, reply.previous_owner)
                }) {
                    return Err(DaemonError::volume(
                        &cfg.name,
                        format!(
                            "another owner activated this volume during our activation (replica {loc} went from generation {} to {}); start it again",
                            st.generation, reply.previous_generation
                        ),
                    ));
                }
                Backing::Remote(Arc::new(client))
            }
            Err(e @ ReplicationError::Fenced { .. }) => {
                return Err(DaemonError::volume(
                    &cfg.name,
                    format!("another owner activated this volume meanwhile: {e}"),
                ))
            }
            Err(e @ ReplicationError::Remote { .. }) => {
                // NotFound / Conflict: retrying will not help.
                tracing::error!(volume = %cfg.name, replica = %loc, error = %e, "replica refused");
                fault(&mut record, i, e.to_string());
                Backing::Unavailable
            }
            Err(e) => {
                tracing::error!(volume = %cfg.name, replica = %loc, error = %e, "cannot open remote replica; retrying in the background");
                fault(&mut record, i, format!("cannot open: {e}"));
                let _rt = net.rt.enter();
                Backing::Remote(Arc::new(RemoteClient::disconnected(spec, fence.clone())))
            }
        };
    }
    let online = record
        .replicas
        .iter()
        .filter(|r| r.state == ReplicaState::Online)
        .count();
    if online == 0 {
        let why: Vec<String> = record
            .replicas
            .iter()
            .map(|r| {
                format!(
                    "{}: {}",
                    r.location,
                    r.reason.as_deref().unwrap_or("faulted")
                )
            })
            .collect();
        return Err(DaemonError::volume(
            &cfg.name,
            format!("no online replica to serve from ({})", why.join("; ")),
        ));
    }

    if matches!(mode, Mode::Recover { .. }) {
        shared.set_state(VolumeState::Recovering, None);
    }
    if !record.clean && matches!(mode, Mode::Add { .. }) && online > 1 {
        // No clean stop and no device to recover: the host went down with writes in
        // flight, which may have reached some replicas only. (A daemon crash is
        // different: the kernel re-issues those writes to the recovered device.)
        if record.read_policy != ReadPolicy::Primary {
            tracing::warn!(volume = %cfg.name,
                "unclean shutdown: replicas may differ where writes were in flight; reads are pinned to the first online replica until a resync");
        }
        record.read_policy = ReadPolicy::Primary;
    }
    // `clean` is cleared only once the device serves (device_fn): a start that fails
    // before that changed no data and must not count as an unclean shutdown.
    state_dir.save(&record)?;

    let sink = Arc::new(RecordSink::new(state_dir.clone(), record.clone()));
    let health = Arc::new(
        Health::new(record.replicas.clone(), Box::new(sink.clone()))?.with_fence(fence.clone()),
    );
    health.set_read_policy(record.read_policy);
    let (id, queues, depth, max_io, dev_flags) = match mode {
        Mode::Add { id } => (
            id,
            cfg.queues,
            cfg.depth,
            cfg.max_io_bytes,
            UblkFlags::UBLK_DEV_F_ADD_DEV,
        ),
        Mode::Recover {
            id,
            queues,
            depth,
            max_io,
        } => {
            let c = UblkCtrl::new_simple(id as i32).map_err(|e| DaemonError::ublk("open", e))?;
            match c.start_user_recover() {
                Ok(r) if r >= 0 => {}
                // 6.12 refuses a second START_USER_RECOVERY after an attempt that died
                // half-way (queues already reset). If the device is still QUIESCED,
                // recovering it directly is what that attempt left to do.
                Ok(r) if r == -libc::EINVAL && is_quiesced(id) => {
                    tracing::warn!(volume = %cfg.name, id,
                        "START_USER_RECOVERY refused (EINVAL) but the device is QUIESCED: recovering it directly");
                }
                other => {
                    return Err(DaemonError::ublk(
                        format!("START_USER_RECOVERY of ublkc{id}"),
                        other,
                    ))
                }
            }
            (
                id as i32,
                queues,
                depth,
                max_io,
                UblkFlags::UBLK_DEV_F_RECOVER_DEV,
            )
        }
    };
    {
        let mut live = shared.live.lock().unwrap();
        live.generation = record.generation;
        live.health = Some(health.clone());
        live.queues = queues;
        live.depth = depth;
    }

    let ctrl = UblkCtrlBuilder::default()
        .name("ublkd")
        .id(id)
        .nr_queues(queues)
        .depth(depth)
        .io_buf_bytes(max_io)
        .ctrl_flags(CTRL_FLAGS)
        .ctrl_target_flags(frontend::owner_flags(record.uid))
        .dev_flags(dev_flags)
        .build()
        .map_err(|e| DaemonError::ublk("add device", e))?;
    let dev_id = ctrl.dev_info().dev_id;
    sink.set_device_id(dev_id)?;
    shared.live.lock().unwrap().device_id = Some(dev_id);

    let dp = Arc::new(DataPath {
        volume: cfg.name.clone(),
        geometry: Geometry {
            size: cfg.size,
            block_size: cfg.block_size,
            max_io_bytes: max_io,
        },
        backings,
        health,
    });
    let dp_init = dp.clone();
    let dp_q = dp.clone();
    let shared_dev = shared.clone();
    let sink_dev = sink.clone();
    let cmd = Mutex::new(cmd);
    let stop_requested = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_flag = stop_requested.clone();
    let dp_dev = dp.clone();
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
            if let Err(e) = sink_dev.set_clean(false) {
                tracing::error!(volume = %name, error = %e,
                    "cannot record that the volume is in use: after a host crash its replicas would not be treated as possibly divergent");
            }
            shared_dev.set_state(VolumeState::Live, None);
            tracing::info!(volume = %name, device = %ctrl.get_bdev_path(),
                granted_flags = format_args!("{:#x}", info.flags), queues = info.nr_hw_queues,
                depth = info.queue_depth, "volume serving");
            loop {
                // A fenced volume must stop writing at once; the I/O path already
                // fails every request, this removes the device.
                if let Some(why) = dp_dev.health.fence().reason() {
                    tracing::error!(volume = %name, reason = %why, "fenced by a newer owner: stopping the device");
                    shared_dev.set_state(VolumeState::Fenced, Some(why.to_string()));
                    if let Err(e) = ctrl.kill_dev() {
                        tracing::error!(volume = %name, error = ?e, "stop device");
                    }
                    return;
                }
                match cmd.lock().unwrap().recv_timeout(Duration::from_millis(500)) {
                    Ok(VolumeCmd::Stop) | Err(RecvTimeoutError::Disconnected) => {
                        stop_flag.store(true, std::sync::atomic::Ordering::SeqCst);
                        shared_dev.set_state(VolumeState::Stopping, None);
                        // STOP_DEV: the kernel drains in-flight I/O, then the queues
                        // see their commands aborted and exit.
                        if let Err(e) = ctrl.kill_dev() {
                            tracing::error!(volume = %name, error = ?e, "stop device");
                        }
                        return;
                    }
                    Err(RecvTimeoutError::Timeout) if !ublk_device_exists(info.dev_id) => {
                        tracing::error!(volume = %name, "ublk device removed behind our back");
                        return;
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                }
            }
        },
    )
    .map_err(|e| DaemonError::ublk("run device", e))?;

    if let Some(why) = dp.health.fence().reason() {
        if let Err(e) = ctrl.del_dev_async() {
            if ublk_device_exists(dev_id) {
                tracing::warn!(volume = %cfg.name, error = ?e, "cannot delete the fenced device");
            }
        }
        // Not clean: the newer owner's view of the data is the one that counts.
        shared.set_state(VolumeState::Fenced, Some(why.to_string()));
        Ok(())
    } else if stop_requested.load(std::sync::atomic::Ordering::SeqCst) {
        // A RECOVER_DEV control does not delete on drop; ADD_DEV would. Be explicit.
        // Async: DEL_DEV would wait for the last opener (a filesystem still mounted
        // after a forced stop). An ADD_DEV control may already have deleted it.
        if let Err(e) = ctrl.del_dev_async() {
            if ublk_device_exists(dev_id) {
                tracing::warn!(volume = %cfg.name, error = ?e, "cannot delete the stopped device");
            }
        }
        // Drained, but not necessarily durable: the application may not have flushed.
        // Only replicas synced to stable storage make a clean stop.
        let synced = dp.backings.iter().zip(dp.health.snapshot()).all(|((loc, b), h)| {
            let res = match b {
                _ if h.state != ReplicaState::Online => Ok(()),
                Backing::Local(b) => b.sync().map_err(|e| e.to_string()),
                Backing::Remote(c) => net.rt.block_on(c.flush()).map_err(|e| e.to_string()),
                Backing::Unavailable => Ok(()),
            };
            res.map_err(|e| {
                tracing::error!(volume = %cfg.name, replica = %loc, error = %e, "sync at stop failed");
            })
            .is_ok()
        });
        if synced {
            sink.set_clean(true)?;
        }
        shared.set_state(VolumeState::Stopped, None);
        tracing::info!(volume = %cfg.name, "volume stopped, device removed");
        Ok(())
    } else {
        Err(DaemonError::volume(&cfg.name, "ublk device went away"))
    }
}

/// Remote replicas of `cfg` as (replica index, spec); the generation is filled in
/// once it is chosen.
fn remote_specs(
    cfg: &VolumeConfig,
    net: &Net,
    record: &VolumeRecord,
    create: Create,
    known: &[String],
    owner: u64,
) -> Result<Vec<(usize, RemoteSpec)>, DaemonError> {
    let mut out = Vec::new();
    for (i, r) in cfg.replicas.iter().enumerate() {
        let Some((addr, id)) = r.remote() else {
            continue;
        };
        let secret = net.secret.clone().ok_or_else(|| {
            DaemonError::volume(&cfg.name, "remote replicas need [node] cluster_secret_file")
        })?;
        let loc = r.location();
        out.push((
            i,
            RemoteSpec {
                addr: addr.to_string(),
                secret,
                open: OpenRequest {
                    replica: id.to_string(),
                    volume: cfg.name.clone(),
                    size: cfg.size,
                    block_size: cfg.block_size,
                    generation: record.generation.0,
                    owner,
                    // Only a replica new to the volume may be created (empty): one
                    // that vanished from its server lost the volume's data.
                    create: create == Create::IfMissing || !known.contains(&loc),
                    stale: false,
                },
                deadline: net.io_timeout,
                connect_timeout: Duration::from_secs(3),
            },
        ));
    }
    Ok(out)
}

fn transient(e: &ReplicationError) -> bool {
    matches!(
        e,
        ReplicationError::Connect { .. } | ReplicationError::Net(_)
    )
}

async fn stat_with_grace(
    spec: &RemoteSpec,
    until: std::time::Instant,
) -> Result<replication::remote::wire::StatReply, ReplicationError> {
    loop {
        match stat(spec).await {
            Err(e) if transient(&e) && std::time::Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            other => return other,
        }
    }
}

async fn open_with_grace_remote(
    spec: RemoteSpec,
    fence: Arc<Fence>,
    until: std::time::Instant,
) -> Result<(RemoteClient, OpenReply), ReplicationError> {
    loop {
        match RemoteClient::connect(spec.clone(), fence.clone()).await {
            Err(e) if transient(&e) && std::time::Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            other => return other,
        }
    }
}

fn is_quiesced(id: u32) -> bool {
    UblkCtrl::new_simple(id as i32)
        .is_ok_and(|c| c.dev_info().state as u32 == libublk::sys::UBLK_S_DEV_QUIESCED)
}

pub fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks existence.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || nix::errno::Errno::last() != nix::errno::Errno::ESRCH)
}

/// Decide what to do with an existing device that has our recorded id.
fn inspect_existing(cfg: &VolumeConfig, uid: u32, id: u32) -> Result<Mode, DaemonError> {
    let c = UblkCtrl::new_simple(id as i32).map_err(|e| DaemonError::ublk("inspect device", e))?;
    let info = c.dev_info();
    if info.ublksrv_flags != frontend::owner_flags(uid) {
        return Err(DaemonError::volume(
            &cfg.name,
            format!("/dev/ublkb{id} exists but was not created by ublkd for this volume"),
        ));
    }
    match info.state as u32 {
        libublk::sys::UBLK_S_DEV_QUIESCED => {
            tracing::info!(volume = %cfg.name, id, "found QUIESCED device: recovering it");
            if (info.nr_hw_queues, info.queue_depth) != (cfg.queues, cfg.depth) {
                tracing::warn!(volume = %cfg.name, "queues/depth differ from config: keeping the device's until it is recreated");
            }
            Ok(Mode::Recover {
                id,
                queues: info.nr_hw_queues,
                depth: info.queue_depth,
                max_io: info.max_io_buf_bytes,
            })
        }
        libublk::sys::UBLK_S_DEV_LIVE if !pid_alive(info.ublksrv_pid) => {
            // Its server just died: the kernel moves the device to QUIESCED once the
            // requests the dead server held are dealt with. Give it a moment.
            for _ in 0..50 {
                std::thread::sleep(Duration::from_millis(200));
                let c = UblkCtrl::new_simple(id as i32)
                    .map_err(|e| DaemonError::ublk("inspect device", e))?;
                if c.dev_info().state as u32 != libublk::sys::UBLK_S_DEV_LIVE {
                    return inspect_existing(cfg, uid, id);
                }
            }
            Err(DaemonError::volume(
                &cfg.name,
                format!(
                    "/dev/ublkb{id} stays LIVE although its server (pid {}) is gone",
                    info.ublksrv_pid
                ),
            ))
        }
        libublk::sys::UBLK_S_DEV_LIVE => Err(DaemonError::volume(
            &cfg.name,
            format!(
                "/dev/ublkb{id} is LIVE, served by pid {}: is another ublkd running?",
                info.ublksrv_pid
            ),
        )),
        _ => {
            // Added but never started (or stopped): nothing to keep.
            tracing::info!(volume = %cfg.name, id, "removing dead device before re-adding it");
            c.del_dev()
                .map_err(|e| DaemonError::ublk("delete dead device", e))?;
            Ok(Mode::Add { id: id as i32 })
        }
    }
}
