//! The persister: makes each version of a volume's health durable (the membership
//! into every member's label, then the record), and the owner's log directory (the
//! dirty maps and the activity log) it saves and the next run reads.

use super::*;

/// The owner's directory for one volume's logs.
#[derive(Debug, Clone)]
pub struct LogDir {
    pub dir: std::path::PathBuf,
    pub volume_uuid: wire::VolumeUuid,
    /// Hot extents at most (soft) in the activity log.
    pub al_capacity: usize,
    /// Extents kept hot from the start: the last run's, while they are resynced
    /// (a crash meanwhile must find them again).
    pub carry: Vec<u32>,
}

impl LogDir {
    fn dirty_path(&self, replica: ReplicaUuid) -> std::path::PathBuf {
        self.dir.join(format!("{replica}.dirty"))
    }

    fn al_path(&self) -> std::path::PathBuf {
        self.dir.join("activity.al")
    }

    /// What the last run left in the dir (read before the health opens it, which
    /// deletes the maps it does not continue).
    pub fn saved(&self) -> SavedLogs {
        let mut saved = SavedLogs::default();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            // No dir: nothing saved, and where writes were in flight is unknown
            // (it matters only after an unclean end, or a resync that stopped).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                saved.al_lost = true;
                return saved;
            }
            Err(e) => {
                saved
                    .unreadable
                    .push(format!("{}: {e}", self.dir.display()));
                return saved;
            }
        };
        for path in entries.flatten().map(|e| e.path()) {
            if path.extension().is_some_and(|x| x == "dirty") {
                match DirtyFile::load(&path) {
                    Ok((f, map)) => saved.maps.push((f.header, map)),
                    Err(e) => saved.unreadable.push(e.to_string()),
                }
            }
        }
        if !self.al_path().exists() {
            // Unknown (the dir was lost, or a ublkd without one ran the volume).
            saved.al_lost = true;
        } else {
            match FileAlStore::open(&self.al_path()).and_then(|s| s.load()) {
                Ok(Some((_, hot))) => saved.hot = hot,
                Ok(None) => {}
                Err(e) => {
                    saved.unreadable.push(e.to_string());
                    saved.al_lost = true;
                }
            }
        }
        saved
    }
}

/// A volume's logs as the last run left them.
#[derive(Default)]
pub struct SavedLogs {
    /// The activity log's hot extents: where mutations may have been in flight.
    pub hot: Vec<u32>,
    /// The activity log could not be read: anywhere may have been in flight.
    pub al_lost: bool,
    pub maps: Vec<(DirtyHeader, DirtyMap)>,
    /// Files that could not be read, for the log (the health deletes them).
    pub unreadable: Vec<String>,
}

impl SavedLogs {
    /// Where mutations may have been in flight when the last run ended uncleanly:
    /// byte ranges (the whole volume if the activity log is lost).
    pub fn in_flight(&self, size: ByteLen) -> Vec<(ByteOffset, ByteLen)> {
        if self.al_lost {
            return vec![(ByteOffset(0), size)];
        }
        self.hot
            .iter()
            .map(|&e| crate::activity::extent_range(e, size))
            .filter(|(_, len)| len.0 > 0)
            .collect()
    }
}

/// How often an idle persister saves the dirty maps and evicts activity-log extents
/// while there are any (degraded writes mark the maps without waking it).
const IDLE_ROUND: Duration = Duration::from_millis(500);
/// An idle persister with nothing to save sleeps this long at most.
const IDLE_WAIT: Duration = Duration::from_secs(60);

/// The persister thread: makes each new version durable — the membership into
/// every member's label, then the record — and wakes the requests waiting for it.
pub(super) fn persister(weak: Weak<Health>) {
    let mut backoff = Duration::from_millis(50);
    // Since when a membership change waits for a reconnecting member's label.
    let mut awaiting: Option<Instant> = None;
    loop {
        let Some(h) = weak.upgrade() else { return };
        let target = h.wanted.load(Ordering::Acquire);
        if h.durable.load(Ordering::Acquire) >= target {
            if h.stopping.load(Ordering::SeqCst) {
                return;
            }
            // Idle: marks of degraded writes reach the saved maps within a round.
            if let Err(e) = save_logs(&h) {
                tracing::warn!(volume = %h.volume, error = %e, "cannot save the dirty logs (will retry)");
            }
            // Rounds are needed only while a dirty map may take marks or the
            // activity log has extents to evict; a healthy idle volume sleeps until
            // a change wakes it (`wake_persister`: want_persist, want_log, stop).
            let rounds = h
                .inner
                .lock()
                .unwrap()
                .slots
                .iter()
                .any(|s| s.dirty.is_some())
                || h.al
                    .as_ref()
                    .is_some_and(|al| al.over_capacity() || al.wants_commit());
            let gate = h.persist_mx.lock().unwrap();
            if h.wanted.load(Ordering::Acquire) == target && !h.stopping.load(Ordering::SeqCst) {
                // Even idle, a round a minute: the thread holds the volume's health
                // while it waits, and one dropped without `stop` is freed that way.
                let wait = if rounds { IDLE_ROUND } else { IDLE_WAIT };
                drop(h.persist_wake.wait_timeout(gate, wait).unwrap());
            }
            continue;
        }
        let attempt = h.attempts.fetch_add(1, Ordering::AcqRel) + 1;
        match persist_once(&h) {
            Ok(Persisted::Done(done)) => {
                h.durable.fetch_max(done, Ordering::AcqRel);
                backoff = Duration::from_millis(50);
                awaiting = None;
                h.awaiting_member.store(false, Ordering::Release);
                h.signal.notify();
                outdate_faulted(&h);
            }
            Ok(Persisted::AwaitMember) => {
                // What waits on it waits as I/O waits for a reconnecting last
                // replica: until it is back, or fails at the same timeout.
                let since = *awaiting.get_or_insert_with(|| {
                    tracing::warn!(volume = %h.volume,
                        "a membership change waits for the label of a reconnecting member: the writes that depend on it wait too");
                    h.awaiting_member.store(true, Ordering::Release);
                    h.signal.notify();
                    Instant::now()
                });
                if since.elapsed() >= h.no_replica_timeout {
                    h.failed.fetch_max(attempt, Ordering::AcqRel);
                    h.signal.notify();
                }
                // Until a member is back (`reconnected` wakes us) or a while.
                let online =
                    (h.inner.lock().unwrap().slots.iter()).any(|s| s.state == ReplicaState::Online);
                if !online {
                    let gate = h.persist_mx.lock().unwrap();
                    drop(
                        h.persist_wake
                            .wait_timeout(gate, Duration::from_millis(50))
                            .unwrap(),
                    );
                }
            }
            Err(e) => {
                awaiting = None;
                h.awaiting_member.store(false, Ordering::Release);
                tracing::error!(volume = %h.volume, error = %e,
                    "cannot persist a replica state change: failing the I/O that depends on it until it is durable");
                h.failed.fetch_max(attempt, Ordering::AcqRel);
                h.signal.notify();
                drop(h);
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// What one persist attempt achieved.
enum Persisted {
    /// This version is durable.
    Done(u64),
    /// No online member takes the membership now, but a member that may hold the
    /// only current copy is reconnecting: its label must take it first.
    AwaitMember,
}

/// One attempt: the logs, then (if the state changed) labels and record.
fn persist_once(h: &Health) -> Result<Persisted, ReplicationError> {
    let target = h.wanted.load(Ordering::Acquire);
    let state = h.state_wanted.load(Ordering::Acquire);
    save_logs(h)?;
    if h.state_durable.load(Ordering::Acquire) >= state {
        return Ok(Persisted::Done(target));
    }
    let Persisted::Done(done) = persist_state(h)? else {
        return Ok(Persisted::AwaitMember);
    };
    h.state_durable.fetch_max(state, Ordering::AcqRel);
    Ok(Persisted::Done(done.max(target)))
}

/// Open the volume's log dir: the activity log, and only the dirty maps this run
/// continues (a map the run does not keep up to date would later claim too little).
pub(super) fn open_logs(
    logs: &LogDir,
    size: ByteLen,
    slots: &[Slot],
) -> Result<ActivityLog, ReplicationError> {
    let io = |what: &'static str| {
        move |e: std::io::Error| ReplicationError::Open {
            path: logs.dir.clone(),
            what,
            source: e,
        }
    };
    std::fs::create_dir_all(&logs.dir).map_err(io("create the log dir"))?;
    for entry in std::fs::read_dir(&logs.dir).map_err(io("list the log dir"))? {
        let path = entry.map_err(io("list the log dir"))?.path();
        let kept = slots
            .iter()
            .any(|s| s.dirty.is_some() && logs.dirty_path(s.uuid) == path);
        if path.extension().is_some_and(|x| x == "dirty") && !kept {
            std::fs::remove_file(&path).map_err(io("remove a stale dirty log"))?;
        }
    }
    let store = FileAlStore::open(&logs.al_path())?;
    Ok(ActivityLog::new(
        size,
        logs.al_capacity,
        &logs.carry,
        Box::new(store),
    ))
}

/// Save every dirty map's changes (a new one whole), drop the files of replicas
/// that no longer lack anything, then commit the activity log. In this order: an
/// extent leaves the AL only after the maps hold every mark made in it.
pub(super) fn save_logs(h: &Health) -> Result<(), ReplicationError> {
    let Some(logs) = &h.logs else { return Ok(()) };
    let pass = h.al.as_ref().map(ActivityLog::begin_pass);
    let maps: Vec<(ReplicaUuid, Arc<DirtyMap>, LogOrigin)> = {
        let inner = h.inner.lock().unwrap();
        inner
            .slots
            .iter()
            .filter_map(|s| Some((s.uuid, s.dirty.clone()?, s.origin?)))
            .collect()
    };
    let mut files = h.dirty_files.lock().unwrap();
    for (uuid, map, origin) in &maps {
        match files.get(uuid) {
            // A map begun anew (a full rebuild after a partial history) is a new file.
            Some(f) if f.header.origin == *origin => f.save(map)?,
            _ => {
                let header = DirtyHeader {
                    volume: logs.volume_uuid,
                    replica: *uuid,
                    size: h.size,
                    grain: h.grain,
                    origin: *origin,
                };
                let f = DirtyFile::create(&logs.dirty_path(*uuid), header, map)?;
                files.insert(*uuid, f);
            }
        }
    }
    let done: Vec<ReplicaUuid> = files
        .keys()
        .filter(|u| !maps.iter().any(|(m, _, _)| m == *u))
        .copied()
        .collect();
    for u in done {
        if let Some(f) = files.remove(&u) {
            f.remove()?;
        }
    }
    drop(files);
    if let (Some(al), Some(pass)) = (&h.al, pass) {
        if al.wants_commit() || al.over_capacity() {
            // An evicted extent is no longer resynced after an owner crash: what was
            // written there must be durable on every replica that took it first
            // (a rebuild target's copies included). A failed flush evicts nothing.
            let evict = al.would_evict(pass) && {
                let failed = h.sync_all();
                for (replica, e) in &failed {
                    tracing::warn!(volume = %h.volume, %replica, error = %e,
                        "cannot flush before an activity-log eviction: the extents stay hot");
                }
                failed.is_empty()
            };
            al.commit(pass, evict)?;
        }
    }
    Ok(())
}

/// Labels of every member, then the record: the version made durable.
fn persist_state(h: &Health) -> Result<Persisted, ReplicationError> {
    loop {
        let (target, snap, members) = {
            let inner = h.inner.lock().unwrap();
            let target = h.wanted.load(Ordering::Acquire);
            let members: Vec<(usize, Backing)> = inner
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.state == ReplicaState::Online)
                .filter_map(|(i, s)| Some((i, s.backing.clone()?)))
                .collect();
            // A waited-for member may hold writes no other has: a membership its
            // label has not taken must not be durable only in the record (a new
            // owner elsewhere reads labels).
            let epoch = inner.membership.epoch;
            if members.is_empty()
                && inner
                    .slots
                    .iter()
                    .any(|s| s.state == ReplicaState::Connecting && s.label_epoch < epoch)
            {
                return Ok(Persisted::AwaitMember);
            }
            (target, snapshot_of(&inner), members)
        };
        let update = LabelUpdate {
            membership: snap.membership.clone(),
            outdated: false,
        };
        // Every member's label, at once.
        let results: Vec<(usize, Result<(), Errno>)> = std::thread::scope(|sc| {
            let handles: Vec<_> = members
                .iter()
                .map(|(i, b)| (*i, sc.spawn(|| b.update_label(&update))))
                .collect();
            handles
                .into_iter()
                .map(|(i, t)| (i, t.join().unwrap_or(Err(Errno::EIO))))
                .collect()
        });
        let failed: Vec<(usize, Errno)> = results
            .into_iter()
            .filter_map(|(i, r)| r.err().map(|e| (i, e)))
            .collect();
        if failed.is_empty() {
            h.sink.persist(&snap)?;
            let mut inner = h.inner.lock().unwrap();
            for (i, _) in &members {
                let s = &mut inner.slots[*i];
                s.label_epoch = s.label_epoch.max(snap.membership.epoch);
            }
            return Ok(Persisted::Done(target));
        }
        // A member that cannot take the new membership is faulted too (the next
        // round writes an epoch without it) — unless it is the last one: then a
        // lost connection makes it a member waited for, a media error fails.
        let mut inner = h.inner.lock().unwrap();
        let mut progressed = false;
        for (i, errno) in failed {
            if inner.slots[i].state != ReplicaState::Online {
                continue;
            }
            inner.slots[i].errors += 1;
            // The lock's view: a failure faulted earlier in this loop is not online.
            if !online_besides(&inner, 1 << i) {
                if crate::ack::lost_connection(inner.slots[i].remote, errno) {
                    tracing::warn!(volume = %h.volume, replica = %inner.slots[i].location,
                        "the last online replica lost its connection while taking a membership change: I/O waits for it to come back");
                    h.transition(&mut inner, i, ReplicaState::Connecting);
                    continue;
                }
                h.publish_masks(&inner);
                return Err(ReplicationError::Persist(format!(
                    "the label of {}, the last online replica, cannot be written: {errno}",
                    inner.slots[i].location
                )));
            }
            let reason = FaultReason::IoError {
                op: IoOp::Label,
                errno: errno.0,
            };
            h.transition(&mut inner, i, ReplicaState::Faulted { reason });
            progressed = true;
        }
        h.publish_masks(&inner);
        if progressed {
            h.wanted.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// Best effort, after the members know: tell each replica faulted since the last
/// round that it is outdated, so that even alone it is never trusted.
fn outdate_faulted(h: &Health) {
    let todo: Vec<(String, Backing, Membership)> = {
        let mut inner = h.inner.lock().unwrap();
        inner
            .slots
            .iter_mut()
            .filter_map(|s| {
                let m = s.outdate.take()?;
                Some((s.location.clone(), s.backing.clone()?, m))
            })
            .collect()
    };
    for (loc, b, membership) in todo {
        let update = LabelUpdate {
            membership,
            outdated: true,
        };
        match b.update_label(&update) {
            Ok(()) => {
                tracing::info!(volume = %h.volume, replica = %loc, "marked the faulted replica outdated")
            }
            Err(e) => tracing::debug!(volume = %h.volume, replica = %loc, %e,
                "cannot mark the faulted replica outdated now (its label is stale anyway)"),
        }
    }
}
