use super::*;
use crate::nexus::Nexus;
use crate::testing::{mem_nexus, mem_volume_remote};

const ENOTCONN: Errno = Errno(libc::ENOTCONN);

fn write(n: &Nexus, off: u64, byte: u8) -> Result<u32, Errno> {
    crate::testing::write_through(n, off, 4096, byte)
}

fn state(h: &Health, i: usize) -> ReplicaState {
    h.snapshot().slots[i].state.clone()
}

fn wait_until(mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < until, "timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_durable(h: &Health) {
    wait_until(|| h.is_durable());
}

/// (A) Both connections reset under one request: both wait as Connecting. The
/// first back serves alone, so the second must not come back Online without the
/// writes the first took meanwhile.
#[test]
fn the_second_of_two_reset_replicas_back_is_not_trusted_with_writes_it_missed() {
    let (stores, h) = mem_volume_remote(2, &[0, 1]);
    let n = mem_nexus(&h);
    let range = Some((ByteOffset(0), ByteLen(4096)));
    let both = [(SlotIndex(0), ENOTCONN), (SlotIndex(1), ENOTCONN)];
    assert_eq!(h.settle(0b11, &both, IoOp::Write, range), Settle::Retry);
    assert_eq!(state(&h, 0), ReplicaState::Connecting);
    assert_eq!(state(&h, 1), ReplicaState::Connecting);
    assert!(h.waiting());

    let label0 = stores[0].label().unwrap();
    assert!(h.reconnected(SlotIndex(0), &label0, false));
    assert!(
        matches!(state(&h, 1), ReplicaState::Faulted { .. }),
        "once slot 0 serves, slot 1 no longer holds every acknowledged write"
    );
    assert_eq!(write(&n, 8192, 7), Ok(4096));
    assert_eq!(stores[1].bytes(8192, 4096), vec![0; 4096]);
    let label1 = stores[1].label().unwrap();
    assert!(!h.reconnected(SlotIndex(1), &label1, false));
    assert_eq!(h.read_mask(), 0b01);
    let map = h.dirty_map(SlotIndex(1)).expect("a map of what it missed");
    assert!(map.any(ByteOffset(8192), ByteLen(4096)));
    // The survivor's label recorded the fault before the write was acknowledged.
    let l0 = stores[0].label().unwrap();
    assert_eq!(l0.membership.members, vec![l0.replica_uuid]);
}

/// (A) One replica resets while the other fails the same request with a media
/// error: the online one stays, so the reset one must not wait as a member, and
/// the request fails (nothing online holds it; nothing to wait for).
#[test]
fn a_reset_replica_is_faulted_when_another_stays_online() {
    let (_, h) = mem_volume_remote(2, &[0, 1]);
    let failures = [(SlotIndex(0), ENOTCONN), (SlotIndex(1), Errno::EIO)];
    let range = Some((ByteOffset(0), ByteLen(4096)));
    assert_eq!(
        h.settle(0b11, &failures, IoOp::Write, range),
        Settle::Fail(ENOTCONN)
    );
    assert!(matches!(state(&h, 0), ReplicaState::Faulted { .. }));
    assert_eq!(state(&h, 1), ReplicaState::Online);
    assert!(!h.waiting());
    wait_durable(&h);
    assert!(!h.snapshot().membership.contains(h.snapshot().slots[0].uuid));
}

/// (Q) Both servers die: the first loss faults slot 0, but the survivor's label
/// cannot take that epoch (its connection is dead too). Slot 1, the last
/// current replica, comes back with the older epoch: it missed nothing, so it is
/// relabelled and serves, instead of I/O waiting for it forever.
#[test]
fn the_last_member_back_with_a_lagging_label_is_relabelled_and_serves() {
    let (stores, h) = mem_volume_remote(2, &[0, 1]);
    let n = mem_nexus(&h);
    assert_eq!(write(&n, 0, 1), Ok(4096));
    stores[1].fail_labels(true);
    let closed = Lost::Closed {
        why: "reset".into(),
    };
    h.connection_lost(SlotIndex(0), &closed);
    assert!(matches!(state(&h, 0), ReplicaState::Faulted { .. }));
    h.connection_lost(SlotIndex(1), &closed);
    assert_eq!(state(&h, 1), ReplicaState::Connecting);
    let epoch = h.snapshot().membership.epoch;
    let label1 = stores[1].label().unwrap();
    assert!(
        label1.membership.epoch < epoch,
        "the fault did not reach it"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(!h.is_durable(), "the fault waits for the member's label");

    stores[1].fail_labels(false);
    assert!(h.reconnected(SlotIndex(1), &label1, false));
    wait_durable(&h);
    assert_eq!(h.read_mask(), 0b10);
    assert_eq!(write(&n, 4096, 2), Ok(4096));
    // Acknowledged only once its label shows the current membership.
    let l1 = stores[1].label().unwrap();
    assert_eq!(l1.membership.epoch, epoch);
    assert_eq!(l1.membership.members, vec![l1.replica_uuid]);
}

/// (Q) Both servers die together, the second while the persister writes the
/// first one's fault into its label: the write it took (acknowledged once that
/// fault is durable) waits for it as the member it still is, and is
/// acknowledged once it is back and relabelled. It failed with EIO when the
/// label write's lost connection counted as a persist failure.
#[test]
fn a_fault_the_last_members_label_cannot_take_yet_waits_for_it() {
    let (stores, h) = mem_volume_remote(2, &[0, 1]);
    stores[0].set_fault(crate::testing::Fault::Writes);
    stores[1].fail_labels_with(Some(ENOTCONN));
    let writer = {
        let h = h.clone();
        std::thread::spawn(move || write(&mem_nexus(&h), 0, 9))
    };
    wait_until(|| state(&h, 1) == ReplicaState::Connecting);
    assert!(matches!(state(&h, 0), ReplicaState::Faulted { .. }));
    std::thread::sleep(Duration::from_millis(200));
    assert!(!writer.is_finished(), "the write waits for its holder");

    stores[1].fail_labels_with(None);
    let label1 = stores[1].label().unwrap();
    assert!(h.reconnected(SlotIndex(1), &label1, false));
    assert_eq!(writer.join().unwrap(), Ok(4096));
    let l1 = stores[1].label().unwrap();
    assert_eq!(l1.membership.members, vec![l1.replica_uuid]);
    assert_eq!(stores[1].bytes(0, 4096), vec![9; 4096]);
}

/// (L) A write completed on a remote replica whose completion the queue
/// polls only after the replica was faulted: its mark, made then, still
/// reaches the replica's map (it was lost: the fault had merged the unflushed
/// regions already, and the write counted as taken). A host crash of its
/// server would then lose it from a partial rebuild's reach.
#[test]
fn a_completion_polled_after_the_fault_still_marks_the_replicas_map() {
    let (_, h) = mem_volume_remote(2, &[0, 1]);
    let u = h.unflushed(SlotIndex(1)).expect("a remote slot");
    h.connection_lost(
        SlotIndex(1),
        &Lost::Closed {
            why: "reset".into(),
        },
    );
    assert!(matches!(state(&h, 1), ReplicaState::Faulted { .. }));
    let (at, len) = (ByteOffset(128 << 10), ByteLen(4096));
    u.wrote(at, len);
    let map = h.dirty_map(SlotIndex(1)).expect("a map of what it lacks");
    assert!(map.any(at, len), "the late mark of an unflushed write");
}

/// A removed replica's connection (still up: a queue may hold its handle)
/// reports nothing for its old slot, also once the slot holds another
/// replica: a FENCED answer from it no longer stops the volume, a lost
/// connection no longer faults the newcomer.
#[test]
fn a_removed_replicas_events_reach_nobody() {
    let (_, h) = mem_volume_remote(3, &[0, 1, 2]);
    let old = h.conn_events(SlotIndex(1));
    h.remove_slot(SlotIndex(1)).unwrap();
    old.fenced(Generation(99));
    assert!(
        !h.fence().is_tripped(),
        "a removed replica fenced the volume"
    );
    let store = crate::testing::MemStore::new(1 << 20);
    let slot = h
        .add_slot(SlotSpec {
            location: "new".into(),
            uuid: ReplicaUuid::random(),
            backing: Some(Backing::Memory(store)),
            remote: true,
            state: ReplicaState::Faulted {
                reason: FaultReason::NewReplica,
            },
            errors: 0,
            dirty: None,
        })
        .unwrap();
    assert_eq!(slot, SlotIndex(1), "the index is reused");
    old.fenced(Generation(99));
    assert!(
        !h.fence().is_tripped(),
        "the old replica fenced the newcomer's volume"
    );
    let new = h.conn_events(slot);
    new.fenced(Generation(99));
    assert!(h.fence().is_tripped(), "the newcomer's own events count");
}

/// (Q) Both servers die 27 ms apart under a write sent to both: the first
/// loss faults slot 0 (slot 1 still online), the second makes slot 1 the
/// member waited for — and slot 1 had taken the write before it died. It
/// waits for slot 1 (retried once it is back), not failed because slot 0's
/// lost connection can no longer be waited for (the VM scenario
/// `repl_both_remotes_die` saw that EIO).
#[test]
fn a_write_the_awaited_member_took_waits_for_it() {
    let (_, h) = mem_volume_remote(2, &[0, 1]);
    let closed = Lost::Closed {
        why: "killed".into(),
    };
    h.connection_lost(SlotIndex(0), &closed);
    h.connection_lost(SlotIndex(1), &closed);
    assert!(matches!(state(&h, 0), ReplicaState::Faulted { .. }));
    assert_eq!(state(&h, 1), ReplicaState::Connecting);
    let range = Some((ByteOffset(0), ByteLen(4096)));
    assert_eq!(
        h.settle(0b11, &[(SlotIndex(0), ENOTCONN)], IoOp::Write, range),
        Settle::Retry
    );
}

/// (D) The last current replica is reconnecting (a write waits for it): a
/// reload that replaces or removes it must not empty the membership.
#[test]
fn the_last_current_replica_cannot_be_removed_while_it_reconnects() {
    let (stores, h) = mem_volume_remote(2, &[1]);
    let n = mem_nexus(&h);
    stores[0].set_fault(crate::testing::Fault::All);
    assert_eq!(write(&n, 0, 1), Ok(4096));
    h.connection_lost(
        SlotIndex(1),
        &Lost::Closed {
            why: "killed".into(),
        },
    );
    assert_eq!(state(&h, 1), ReplicaState::Connecting);
    assert!(matches!(
        h.remove_slot(SlotIndex(1)),
        Err(ReplicationError::LastOnline(_))
    ));
    assert_eq!(h.snapshot().membership.members.len(), 1);
    // A faulted replica can go.
    h.remove_slot(SlotIndex(0)).unwrap();
    let label1 = stores[1].label().unwrap();
    assert!(h.reconnected(SlotIndex(1), &label1, false));
}

/// (O) A local disk's ETIMEDOUT fails the request: only a remote replica is
/// waited for to come back.
#[test]
fn a_local_timeout_is_an_error_not_a_lost_connection() {
    let (_, h) = crate::testing::mem_volume(1);
    let etimedout = Errno(libc::ETIMEDOUT);
    let range = Some((ByteOffset(0), ByteLen(4096)));
    let failures = [(SlotIndex(0), etimedout)];
    assert_eq!(
        h.settle(0b1, &failures, IoOp::Write, range),
        Settle::Fail(etimedout)
    );
    assert_eq!(
        h.read_failed(SlotIndex(0), etimedout),
        ReadVerdict::Fail(etimedout)
    );
    assert_eq!(state(&h, 0), ReplicaState::Online);
    let (_, h) = mem_volume_remote(1, &[0]);
    assert_eq!(h.settle(0b1, &failures, IoOp::Write, range), Settle::Retry);
}

/// (I) An extent leaves the activity log only once what was written there is
/// durable on the replicas: after an owner power loss, an extent that is no
/// longer hot is not resynced, so its data must not be in a volatile cache.
#[test]
fn an_evicting_activity_log_commit_flushes_the_replicas_first() {
    let dir = tempfile::tempdir().unwrap();
    let stores = (0..2)
        .map(|_| crate::testing::MemStore::new(32 << 20))
        .collect();
    // The AL keeps 4 extents of 4 MiB hot.
    let (stores, h, _) = crate::testing::mem_volume_of(stores, Some(dir.path()));
    let n = mem_nexus(&h);
    let al = h.activity().expect("logs kept");
    for e in 0..4u64 {
        assert_eq!(write(&n, e * (4 << 20), 1), Ok(4096));
    }
    assert_eq!(al.hot_count(), 4);
    assert_eq!(stores[0].flushes(), 0, "no eviction yet: no flush");
    for e in 4..8u64 {
        assert_eq!(write(&n, e * (4 << 20), 1), Ok(4096));
        let flushed = [stores[0].flushes(), stores[1].flushes()];
        assert!(
            flushed.iter().all(|&f| f >= e - 3),
            "extent {e}: evicting commits without flushes {flushed:?}"
        );
    }
    assert_eq!(al.hot_count(), 4);
}

/// (E) Both members wait as Connecting. One's host rebooted while it held
/// acknowledged, unflushed writes (its label is intact, its cache is gone): it
/// is not trusted when it comes back first; the other one is, and the rebooted
/// one then lacks (in its map) what it had not flushed.
#[test]
fn a_replica_whose_host_rebooted_with_unflushed_writes_is_not_trusted() {
    let (stores, h) = mem_volume_remote(2, &[0, 1]);
    let n = mem_nexus(&h);
    assert_eq!(write(&n, 8192, 3), Ok(4096));
    let both = [(SlotIndex(0), ENOTCONN), (SlotIndex(1), ENOTCONN)];
    let range = Some((ByteOffset(0), ByteLen(4096)));
    assert_eq!(h.settle(0b11, &both, IoOp::Write, range), Settle::Retry);
    let label0 = stores[0].label().unwrap();
    assert!(!h.reconnected(SlotIndex(0), &label0, true));
    assert_eq!(state(&h, 0), ReplicaState::Connecting);
    assert_eq!(h.read_mask(), 0, "nothing serves a stale copy");
    let label1 = stores[1].label().unwrap();
    assert!(h.reconnected(SlotIndex(1), &label1, false));
    assert!(matches!(state(&h, 0), ReplicaState::Faulted { .. }));
    let map = h.dirty_map(SlotIndex(0)).expect("a map of what it lacks");
    assert!(map.any(ByteOffset(8192), ByteLen(4096)), "its lost cache");
    // A restarted process (same boot) keeps its page cache: trusted.
    let (stores, h) = mem_volume_remote(1, &[0]);
    let n = mem_nexus(&h);
    assert_eq!(write(&n, 0, 1), Ok(4096));
    h.connection_lost(SlotIndex(0), &Lost::Closed { why: "kill".into() });
    assert!(h.reconnected(SlotIndex(0), &stores[0].label().unwrap(), false));
}

/// A label older than one this run wrote is a rolled-back copy, never trusted.
#[test]
fn a_rolled_back_label_is_not_trusted() {
    let (stores, h) = mem_volume_remote(3, &[0, 1, 2]);
    let n = mem_nexus(&h);
    let old = stores[1].label().unwrap();
    // Slot 2 faults: the members' labels take epoch 2.
    stores[2].set_fault(crate::testing::Fault::All);
    assert_eq!(write(&n, 0, 1), Ok(4096));
    let closed = Lost::Closed {
        why: "reset".into(),
    };
    h.connection_lost(SlotIndex(0), &closed);
    h.connection_lost(SlotIndex(1), &closed);
    assert_eq!(state(&h, 1), ReplicaState::Connecting);
    assert!(old.membership.epoch < stores[1].label().unwrap().membership.epoch);
    assert!(!h.reconnected(SlotIndex(1), &old, false));
    assert_eq!(h.read_mask(), 0);
}
