//! A remote slot's connection events: lost, back (and whether it is trusted), fenced.

use super::*;

impl Health {
    /// The connection of `slot` went down (before its pending requests fail).
    pub fn connection_lost(&self, slot: SlotIndex, why: &Lost) {
        if self.stopping.load(Ordering::SeqCst) {
            // A stopped volume's connections close (or its peers go) without a fault:
            // the stop already made every replica's state final.
            return;
        }
        let mut inner = self.inner.lock().unwrap();
        let i = slot.get();
        if i >= inner.slots.len() {
            return;
        }
        let reason = match why {
            Lost::Deadline { waited } => FaultReason::MissedDeadline {
                waited_ms: waited.as_millis() as u64,
            },
            Lost::Closed { .. } => FaultReason::ConnectionLost,
        };
        let faulted = match inner.slots[i].state {
            ReplicaState::Online if self.read_mask() & !(1 << i) == 0 => {
                tracing::warn!(volume = %self.volume, replica = %inner.slots[i].location,
                    "the last online replica lost its connection: I/O waits for it to come back");
                // Still a member: nothing to record.
                self.transition(&mut inner, i, ReplicaState::Connecting);
                false
            }
            ReplicaState::Online | ReplicaState::Rebuilding { .. } => {
                self.transition(&mut inner, i, ReplicaState::Faulted { reason });
                true
            }
            _ => false,
        };
        self.publish_masks(&inner);
        if faulted {
            self.want_persist();
        }
    }

    /// `slot` is reachable again with `label`: whether it takes I/O.
    /// `host_rebooted`: its server's host booted again meanwhile, so whatever it
    /// acknowledged and had not flushed is gone — a Connecting member holding such
    /// writes is not trusted (it is the one waited for: I/O keeps waiting for
    /// another member, else fails at the no-replica timeout; never a stale read).
    pub fn reconnected(&self, slot: SlotIndex, label: &Label, host_rebooted: bool) -> bool {
        if self.stopping.load(Ordering::SeqCst) {
            return false;
        }
        let mut inner = self.inner.lock().unwrap();
        let i = slot.get();
        if i >= inner.slots.len() {
            return false;
        }
        let epoch = inner.membership.epoch;
        let generation = inner.generation;
        let s = &inner.slots[i];
        // A Connecting member missed no acknowledged write (none is acknowledged
        // while no replica is online): its label may lag our epoch only because a
        // fault could not be written to it while its connection was down too. It
        // must still be this run's copy (uuid, generation), not outdated, and not
        // older than the newest epoch we know it had.
        let lagging = label.membership.epoch < epoch
            && label.membership.epoch >= s.label_epoch
            && !label.outdated
            && label.membership.contains(s.uuid)
            && inner.membership.contains(s.uuid);
        let lost_unflushed = host_rebooted
            && s.unflushed
                .as_ref()
                .is_some_and(|u| !u.regions().is_empty());
        if s.state == ReplicaState::Connecting && lost_unflushed {
            tracing::error!(volume = %self.volume, replica = %s.location,
                "the reconnected replica's host rebooted and lost writes it had acknowledged but not flushed: not trusted, I/O keeps waiting for another member");
            return false;
        }
        match s.state {
            ReplicaState::Connecting
                if label.replica_uuid == s.uuid
                    && label.generation == generation
                    && (label.is_current_at(epoch) || lagging) =>
            {
                if lagging {
                    tracing::warn!(volume = %self.volume, replica = %s.location,
                        label_epoch = label.membership.epoch.0, epoch = epoch.0,
                        "the reconnected replica missed no write but its label lags: relabelling it");
                }
                self.transition(&mut inner, i, ReplicaState::Online);
                // Writes are acknowledged once its label shows the current epoch.
                if self.fault_unawaited(&mut inner) || lagging {
                    self.want_persist();
                }
                // A persister waiting for a member's label goes on at once.
                self.wake_persister();
                self.publish_masks(&inner);
                true
            }
            ReplicaState::Connecting => {
                // Reachable, but not the replica we waited for (or not current): it
                // cannot be trusted, and nothing else is online.
                tracing::error!(volume = %self.volume, replica = %inner.slots[i].location,
                    label_epoch = label.membership.epoch.0, epoch = epoch.0,
                    "the reconnected replica is not current: I/O keeps waiting");
                false
            }
            ReplicaState::Online => true,
            _ => false,
        }
    }

    /// A replica answered FENCED: a newer owner took the volume.
    pub fn fenced(&self, slot: SlotIndex, theirs: Generation) {
        let (loc, ours) = {
            let inner = self.inner.lock().unwrap();
            let loc = inner
                .slots
                .get(slot.get())
                .map(|s| s.location.clone())
                .unwrap_or_default();
            (loc, inner.generation)
        };
        self.fence.trip(
            theirs,
            format!(
                "replica {loc} now belongs to generation {} (ours is {}): a newer owner took over",
                theirs.0, ours.0
            ),
        );
        self.signal.notify();
    }

    /// Events of one remote slot's connection.
    pub fn conn_events(self: &Arc<Self>, slot: SlotIndex) -> Arc<dyn ConnEvents> {
        let uuid = self
            .inner
            .lock()
            .unwrap()
            .slots
            .get(slot.get())
            .map_or_else(ReplicaUuid::default, |s| s.uuid);
        Arc::new(SlotEvents {
            health: Arc::downgrade(self),
            slot,
            uuid,
        })
    }
}

/// One replica's connection events, for the slot it had: ignored once that slot
/// was removed or holds another replica (a slot index is reused).
struct SlotEvents {
    health: Weak<Health>,
    slot: SlotIndex,
    uuid: ReplicaUuid,
}

impl SlotEvents {
    fn health(&self) -> Option<Arc<Health>> {
        let h = self.health.upgrade()?;
        let ours = h
            .inner
            .lock()
            .unwrap()
            .slots
            .get(self.slot.get())
            .is_some_and(|s| s.uuid == self.uuid && s.state != ReplicaState::Removed);
        ours.then_some(h)
    }
}

impl ConnEvents for SlotEvents {
    fn lost(&self, why: &Lost) {
        if let Some(h) = self.health() {
            h.connection_lost(self.slot, why);
        }
    }
    fn reconnected(&self, label: &Label, host_rebooted: bool) -> bool {
        self.health()
            .is_some_and(|h| h.reconnected(self.slot, label, host_rebooted))
    }
    fn fenced(&self, theirs: Generation) {
        if let Some(h) = self.health() {
            h.fenced(self.slot, theirs);
        }
    }
}
