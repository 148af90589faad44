//! Activation on one host, without ublk: the daemon's own activation
//! (`ublkd::volume::activate`) over real local files and real replica-server
//! processes, then the health and nexus as the daemon builds them. What it must
//! show: a fault recorded on the survivors keeps every later owner — even one with an
//! empty state dir — from trusting the faulted replica; a replica of another volume
//! is refused and left untouched; an outage of every current replica at start makes
//! the volume wait, not fault them; replicas of ublkd 0.1 are adopted.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use replication::backing::Backing;
use replication::ranges::RangeTable;
use replication::state::FaultReason;
use replication::testing::{test_handle, test_nexus, Failing};
use replication::{Nexus, ReplicaState};
use support::SIZE;
use support::*;
use ublkd::config::{Config, VolumeConfig};
use ublkd::state::StateDir;
use ublkd::volume::activate::{activate, Activated, Halt};
use ublkd::volume::{health_of, log_dir, Net};

fn net(rt: &tokio::runtime::Runtime) -> Net {
    Net {
        rt: rt.handle().clone(),
        secret: Some(replication::remote::Secret::new(SECRET.to_vec())),
        io_timeout: Duration::from_secs(3),
        no_replica_timeout: Duration::from_secs(10),
        rebuild: replication::rebuild::NodeLimits::unlimited(),
        partial_window_s: std::sync::Arc::new(600.into()),
        grain: 64 << 10,
        frontend: ublkd::volume::Frontend::Headless,
    }
}

/// A volume of `SIZE` bytes over the given replicas (`local = "..."` or
/// `remote = "...", id = "..."` tables).
fn volume(name: &str, replicas: &[String]) -> VolumeConfig {
    let text = format!(
        "[node]\ncluster_secret_file = \"/nonexistent/k\"\n[[volume]]\nname = \"{name}\"\nsize = {SIZE}\nblock_size = 4096\nreplicas = [{}]\n",
        replicas.join(", ")
    );
    Config::parse(&text, "test.toml").unwrap().volumes.remove(0)
}

fn local(p: &Path) -> String {
    format!("{{ local = \"{}\" }}", p.display())
}

fn remote(s: &ServerProc, id: &str) -> String {
    format!("{{ remote = \"{}\", id = \"{id}\" }}", s.addr)
}

fn start(cfg: &VolumeConfig, net: &Net, dir: &Path) -> Result<Activated, String> {
    start_as(cfg, net, dir, false)
}

fn start_as(
    cfg: &VolumeConfig,
    net: &Net,
    dir: &Path,
    allow_takeover: bool,
) -> Result<Activated, String> {
    let sd = StateDir::open(dir).unwrap();
    let record = sd.load(&cfg.name).unwrap();
    activate(
        cfg,
        net,
        &sd,
        record,
        allow_takeover,
        &mut |_| false,
        &mut |_| {},
    )
    .map_err(|h| match h {
        Halt::Failed(e) => e.to_string(),
        Halt::Stopped => "stopped".into(),
        Halt::TakenOver(g) => format!("taken over by generation {}", g.0),
    })
}

/// The volume serving (as the daemon does, minus ublk): health, and a nexus whose
/// handles of `failing` slots can be made to fail.
struct Serving {
    health: Arc<replication::Health>,
    ranges: Arc<RangeTable>,
    fail: Arc<AtomicBool>,
    failing: Vec<usize>,
}

impl Serving {
    fn new(
        cfg: &VolumeConfig,
        net: &Net,
        dir: &Path,
        act: Activated,
        failing: Vec<usize>,
    ) -> Serving {
        let sd = StateDir::open(dir).unwrap();
        let (health, _sink) = health_of(
            cfg,
            net,
            &sd,
            &act.record,
            act.slots,
            &act.remotes,
            log_dir(&sd, cfg, &act.record),
        )
        .unwrap();
        Serving {
            health,
            ranges: RangeTable::new(),
            fail: Arc::default(),
            failing,
        }
    }

    fn nexus(&self) -> Nexus {
        let (fail, failing) = (self.fail.clone(), self.failing.clone());
        // Slot order = config order at activation.
        let slots: Vec<String> = self
            .health
            .snapshot()
            .slots
            .iter()
            .map(|s| s.location.clone())
            .collect();
        Nexus::new(
            self.health.clone(),
            self.ranges.clone(),
            None,
            Box::new(move |b: &Backing| {
                let h = test_handle(b);
                let i = slots
                    .iter()
                    .position(|l| *l == b.location())
                    .unwrap_or(usize::MAX);
                if failing.contains(&i) {
                    Box::new(Failing {
                        inner: h,
                        fail: fail.clone(),
                    })
                } else {
                    h
                }
            }),
        )
    }

    fn states(&self) -> Vec<&'static str> {
        states_of(&self.health)
    }

    /// Every block reads back as its last acknowledged write (`expected`), through a
    /// verifying workload that writes on.
    fn verify(&self, expected: &[u64]) {
        let again = workload_from(
            &self.nexus(),
            expected.to_vec(),
            1 << 40,
            2000,
            4,
            u64::MAX,
            || {},
        );
        assert_eq!(again.errors, 0);
    }
}

impl Drop for Serving {
    /// As the daemon's stop: the connections that close afterwards fault nothing.
    fn drop(&mut self) {
        self.health.stop();
    }
}

fn states(act: &Activated) -> Vec<&'static str> {
    act.slots.iter().map(|s| s.state.name()).collect()
}

#[test]
fn a_remote_fault_on_the_survivors_outlives_the_state_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let a = start_server(tmp.path(), 20);
    let mut b = start_server(tmp.path(), 21);
    let rt = rt();
    let net = net(&rt);
    let cfg = volume(
        "fr",
        &[
            local(&tmp.path().join("l.img")),
            remote(&a, "fr-a"),
            remote(&b, "fr-b"),
        ],
    );
    let act = start(&cfg, &net, &tmp.path().join("state1")).unwrap();
    assert_eq!(states(&act), ["online", "online", "online"]);
    let v = Serving::new(&cfg, &net, &tmp.path().join("state1"), act, vec![]);
    let nexus = v.nexus();
    let out = workload(&nexus, 1500, 8, 400, || b.signal(libc::SIGKILL));
    flush(&nexus);
    assert_eq!(out.errors, 0);
    assert_eq!(v.states(), ["online", "online", "faulted"]);
    drop((nexus, v));
    // The faulted server comes back; a new owner starts with an empty state dir and
    // without the local replica: only the labels can tell it that fr-b is stale.
    b.start();
    let cfg2 = volume("fr", &[remote(&a, "fr-a"), remote(&b, "fr-b")]);
    let act = start(&cfg2, &net, &tmp.path().join("state2")).unwrap();
    assert_eq!(states(&act), ["online", "faulted"]);
    assert!(
        matches!(
            act.slots[1].state,
            ReplicaState::Faulted {
                reason: FaultReason::Stale { .. }
            }
        ),
        "{:?}",
        act.slots[1].state
    );
    let v = Serving::new(&cfg2, &net, &tmp.path().join("state2"), act, vec![]);
    assert_eq!(
        v.health.read_mask(),
        0b01,
        "reads never go to the stale replica"
    );
    // Every block reads back as its last acknowledged write (fr-b would return
    // older data for those written after the kill).
    v.verify(&out.expected);
}

#[test]
fn a_local_fault_on_the_survivors_outlives_the_state_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let a = start_server(tmp.path(), 22);
    let rt = rt();
    let net = net(&rt);
    let l = tmp.path().join("l.img");
    let cfg = volume("fl", &[local(&l), remote(&a, "fl-a")]);
    let act = start(&cfg, &net, &tmp.path().join("state1")).unwrap();
    let v = Serving::new(&cfg, &net, &tmp.path().join("state1"), act, vec![0]);
    let nexus = v.nexus();
    let fail = v.fail.clone();
    // The local disk starts failing writes mid-run (its label stays writable: the
    // owner marks it outdated too).
    let out = workload(&nexus, 1500, 8, 500, || fail.store(true, Ordering::SeqCst));
    flush(&nexus);
    assert_eq!(out.errors, 0);
    assert_eq!(v.states(), ["faulted", "online"]);
    drop((nexus, v));
    // Empty state dir: the local replica, which reads prefer, must not be trusted.
    let act = start(&cfg, &net, &tmp.path().join("state2")).unwrap();
    assert_eq!(states(&act), ["faulted", "online"]);
    let v = Serving::new(&cfg, &net, &tmp.path().join("state2"), act, vec![]);
    assert_eq!(v.health.read_mask(), 0b10);
    v.verify(&out.expected);
}

#[test]
fn a_replica_of_another_volume_is_refused_and_left_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let a = start_server(tmp.path(), 23);
    let rt = rt();
    let net = net(&rt);
    let f = tmp.path().join("shared.img");
    // Volume "one" owns the file and the server's replica "x".
    start(
        &volume("one", &[local(&f), remote(&a, "x")]),
        &net,
        &tmp.path().join("s1"),
    )
    .unwrap();
    let before = std::fs::read(&f).unwrap();
    // Volume "two" is configured with the same file (another daemon, a typo): refused.
    let err = start(&volume("two", &[local(&f)]), &net, &tmp.path().join("s2"))
        .err()
        .expect("refused");
    assert!(err.contains("belongs to another volume"), "{err}");
    assert_eq!(
        std::fs::read(&f).unwrap(),
        before,
        "the other volume's replica was written"
    );
    // And with the server's replica.
    let err = start(
        &volume("two", &[local(&tmp.path().join("t.img")), remote(&a, "x")]),
        &net,
        &tmp.path().join("s3"),
    )
    .err()
    .expect("refused");
    assert!(err.contains("belongs to another volume"), "{err}");
}

#[test]
fn an_outage_of_every_current_replica_at_start_waits_and_then_serves_the_data() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = start_server(tmp.path(), 24);
    let mut b = start_server(tmp.path(), 25);
    let rt = rt();
    let net = net(&rt);
    let cfg = volume("ow", &[remote(&a, "ow-a"), remote(&b, "ow-b")]);
    let state = tmp.path().join("state");
    let act = start(&cfg, &net, &state).unwrap();
    let v = Serving::new(&cfg, &net, &state, act, vec![]);
    let nexus = v.nexus();
    let out = workload(&nexus, 600, 4, u64::MAX, || {});
    flush(&nexus);
    drop((nexus, v));
    // Both servers are down when the owner starts again.
    a.kill();
    b.kill();
    let reasons: Arc<Mutex<Vec<String>>> = Arc::default();
    // Set when the checks below end, passed or not: a failed check must fail the
    // test, not leave the scope joining an activation that waits forever.
    let give_up = AtomicBool::new(false);
    struct GiveUp<'a>(&'a AtomicBool);
    impl Drop for GiveUp<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let act = std::thread::scope(|sc| {
        let waiter = sc.spawn(|| {
            let sd = StateDir::open(&state).unwrap();
            let rec = sd.load("ow").unwrap();
            let r = reasons.clone();
            activate(
                &cfg,
                &net,
                &sd,
                rec,
                false,
                &mut |d| {
                    std::thread::sleep(d);
                    give_up.load(Ordering::SeqCst)
                },
                &mut |why| {
                    if let Some(w) = why {
                        r.lock().unwrap().push(w);
                    }
                },
            )
        });
        let _guard = GiveUp(&give_up);
        // Activation reports what it waits for once it has tried every replica.
        let t0 = std::time::Instant::now();
        let seen = loop {
            let seen = reasons.lock().unwrap().last().cloned().unwrap_or_default();
            if (seen.contains("ow-a") && seen.contains("ow-b"))
                || t0.elapsed() > Duration::from_secs(30)
            {
                break seen;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(seen.contains("ow-a") && seen.contains("ow-b"), "{seen:?}");
        std::thread::sleep(Duration::from_secs(1));
        assert!(
            !waiter.is_finished(),
            "activation gave up on the only copies"
        );
        // Nothing was faulted meanwhile: the record still has both current.
        let rec = StateDir::open(&state).unwrap().load("ow").unwrap().unwrap();
        assert!(
            rec.replicas.iter().all(|r| r.state == ReplicaState::Online),
            "{rec:?}"
        );
        a.start();
        b.start();
        waiter
            .join()
            .unwrap()
            .map_err(|_| "activation failed")
            .unwrap()
    });
    assert_eq!(states(&act), ["online", "online"]);
    Serving::new(&cfg, &net, &state, act, vec![]).verify(&out.expected);
}

#[test]
fn replicas_and_a_record_of_ublkd_0_1_are_adopted_with_their_data() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = rt();
    let net = net(&rt);
    let mut a = start_server(tmp.path(), 26);
    a.kill();
    // What ublkd 0.1 left: a local image of exactly the volume's size, a server
    // replica with its .meta, and the owner's version-1 record.
    let data: Vec<u8> = (0..SIZE as usize)
        .map(|i| (i / BLOCK) as u8 ^ 0x5a)
        .collect();
    let l = tmp.path().join("old.img");
    std::fs::write(&l, &data).unwrap();
    let store = a.dir.join("replicas");
    std::fs::create_dir_all(&store).unwrap();
    std::fs::write(store.join("old-a.img"), &data).unwrap();
    std::fs::write(
        store.join("old-a.meta"),
        format!(r#"{{"version":1,"replica":"old-a","volume":"old","size":{SIZE},"block_size":4096,"generation":3,"owner":11,"stale":false}}"#),
    )
    .unwrap();
    a.start();
    let cfg = volume("old", &[local(&l), remote(&a, "old-a")]);
    let state = tmp.path().join("state");
    std::fs::create_dir_all(state.join("volumes")).unwrap();
    std::fs::write(
        state.join("volumes/old.json"),
        format!(
            r#"{{"version":1,"name":"old","uid":7,"device_id":null,"generation":3,"owner":11,"size":{SIZE},"block_size":4096,
               "replicas":[{{"location":"{}","state":"online","errors":0}},{{"location":"old-a@{}","state":"online","errors":0}}],
               "clean":true,"read_policy":"spread"}}"#,
            l.display(),
            a.addr
        ),
    )
    .unwrap();
    let act = start(&cfg, &net, &state).unwrap();
    assert_eq!(states(&act), ["online", "online"]);
    assert_eq!(act.record.generation.0, 4, "above the adopted generation");
    drop(act);
    // Labelled now: a restart finds them current by their labels, data intact.
    let act = start(&cfg, &net, &state).unwrap();
    assert_eq!(states(&act), ["online", "online"]);
    assert_eq!(data_of(&l), data);
    assert_eq!(data_of(&a.image("old-a")), data);
    assert!(store.join("old-a.meta.v1").exists());
}

#[test]
fn an_owner_that_was_taken_over_does_not_fence_the_new_one_when_told_not_to() {
    let tmp = tempfile::tempdir().unwrap();
    let a = start_server(tmp.path(), 27);
    let rt = rt();
    let net = net(&rt);
    let cfg = volume("to", &[remote(&a, "to-a")]);
    start(&cfg, &net, &tmp.path().join("first")).unwrap();
    // Another owner (its own state dir) takes the volume: generation 2.
    let second = start(&cfg, &net, &tmp.path().join("second")).unwrap();
    assert_eq!(second.record.generation.0, 2);
    // The first comes back (an ordinary start, or to recover its old device): it
    // must leave the volume alone unless the operator forces it.
    let err = start(&cfg, &net, &tmp.path().join("first"))
        .err()
        .expect("refused");
    assert_eq!(err, "taken over by generation 2");
    let l = rt
        .block_on(replication::remote::client::stat(&support::spec(
            &a,
            "to-a",
            "to",
            wire::VolumeUuid::default(),
            0,
            0,
        )))
        .unwrap()
        .label
        .unwrap();
    assert_eq!(
        l.generation.0, 2,
        "the newer owner's generation still holds"
    );
    // (R) The second owner's record says it was fenced (say its replica was out of
    // reach when it noticed): an ordinary start leaves the volume alone even where
    // no label shows a newer owner.
    let sd = StateDir::open(&tmp.path().join("second")).unwrap();
    let mut rec = sd.load("to").unwrap().unwrap();
    rec.fenced = Some(ublkd::state::Fenced {
        by: wire::Generation(9),
        since_unix_ms: 0,
    });
    sd.save(&rec).unwrap();
    let err = start(&cfg, &net, &tmp.path().join("second")).err();
    assert_eq!(err.as_deref(), Some("taken over by generation 9"));
    // The operator forces the first owner's start: it fences the second.
    let forced = start_as(&cfg, &net, &tmp.path().join("first"), true).unwrap();
    assert_eq!(forced.record.generation.0, 3);
    assert!(forced.record.fenced.is_none());
}

/// Owner restarts while a replica is down: the first one clean (its dirty map is
/// exact: the partial rebuild copies what the map says, no more), the second one a
/// crash (the activity log's hot extents are added: still partial). Both times the
/// replica ends up with every acknowledged write, and online verify (the server
/// checksums its copy) finds the replicas identical — and, once a block of the
/// server's copy rots, finds that region and repairs it.
#[test]
fn a_dirty_map_outlives_owner_restarts_and_crashes_and_the_rebuild_stays_partial() {
    use replication::rebuild::{rebuild, CopyConfig, Outcome, Progress};
    use replication::state::RebuildKind;
    use replication::verify::{verify, Repair};
    use replication::ByteLen;
    use replication::SlotIndex;
    use ublkd::volume::restore_logs;
    let tmp = tempfile::tempdir().unwrap();
    let mut b = start_server(tmp.path(), 30);
    let rt = rt();
    let net = net(&rt);
    let cfg = volume(
        "oc",
        &[local(&tmp.path().join("l.img")), remote(&b, "oc-b")],
    );
    let dir = tmp.path().join("state");
    let sd = StateDir::open(&dir).unwrap();
    let mut expected = vec![0; support::BLOCKS];
    let mut seq = 0;
    for crash in [false, true] {
        let act = start(&cfg, &net, &dir).unwrap();
        let v = Serving::new(&cfg, &net, &dir, act, vec![]);
        let nexus = v.nexus();
        // A few writes after the server's death: a few 64 KiB regions are dirty
        // (the earlier ones were flushed, so the server cannot have lost them).
        let out = workload_from(&nexus, expected.clone(), seq, 200, 2, u64::MAX, || {});
        assert_eq!(out.errors, 0);
        flush(&nexus);
        let out = workload_from(&nexus, out.expected, seq + (1 << 29), 10, 2, 0, || b.kill());
        assert_eq!(out.errors, 0);
        (expected, seq) = (out.expected, seq + (1 << 30));
        assert_eq!(v.states(), ["online", "faulted"]);
        let uuid = v.health.snapshot().slots[1].uuid;
        let file = sd.logs_dir("oc").join(format!("{uuid}.dirty"));
        wait_until(10, "the dirty map is saved", || file.exists());
        drop((nexus, v));
        let (_, saved) = replication::dirty_file::DirtyFile::load(&file).unwrap();
        assert!(saved.dirty_bytes() > 0 && saved.dirty_bytes() < SIZE);
        if crash {
            let mut rec = sd.load("oc").unwrap().unwrap();
            rec.clean = false;
            sd.save(&rec).unwrap();
        }
        // The server is back; a new owner activates and finds the map.
        b.start();
        let mut act = start(&cfg, &net, &dir).unwrap();
        assert_eq!(states(&act), ["online", "faulted"]);
        let mut record = act.record.clone();
        let (logs, resync) = restore_logs(&cfg, &net, &sd, &mut record, &mut act, true);
        assert!(resync.is_empty(), "one online replica: nothing to resync");
        let map = act.slots[1].dirty.as_ref().expect("the saved map is used");
        let want = if crash { SIZE } else { saved.dirty_bytes() };
        assert_eq!(
            map.map.dirty_bytes(),
            want,
            "clean: exactly the saved map; crash: plus the hot extents (the whole small volume)"
        );
        let (health, _sink) =
            health_of(&cfg, &net, &sd, &record, act.slots, &act.remotes, logs).unwrap();
        let ranges = RangeTable::new();
        let out = rebuild(
            &health,
            &ranges,
            SlotIndex(1),
            RebuildKind::Partial,
            CopyConfig::default(),
            &Progress::default(),
        )
        .unwrap();
        match out {
            Outcome::Done { bytes, .. } => assert_eq!(bytes, want),
            other => panic!("{other:?}"),
        }
        assert_eq!(states_of(&health), ["online", "online"]);
        // Online verify: the server checksums its copy (CHECKSUM), no data moves.
        let p = Progress::default();
        let report = verify(&health, &ranges, ByteLen(256 << 10), Repair::No, &p).unwrap();
        assert!(report.mismatches.is_empty(), "{report:?}");
        assert_eq!(report.bytes, SIZE);
        if crash {
            // A block rots on the server's disk: found, then repaired from the local one.
            use std::os::unix::fs::FileExt;
            let img = std::fs::OpenOptions::new()
                .write(true)
                .open(b.image("oc-b"))
                .unwrap();
            img.write_all_at(&[0xEE; 4096], 7 * 4096).unwrap();
            img.sync_all().unwrap();
            let report = verify(&health, &ranges, ByteLen(256 << 10), Repair::No, &p).unwrap();
            assert_eq!(report.mismatches.len(), 1, "{report:?}");
            assert_eq!(report.mismatches[0].offset.0, 0);
            // Two replicas: no majority, so the read-preferred (local) one is the source.
            let src = &report.mismatches[0].source;
            assert_eq!(
                (src.slot.0, src.agree, src.of, src.rule),
                (0, 1, 2, replication::verify::SourceRule::ReadPreferred),
                "{report:?}"
            );
            let report = verify(&health, &ranges, ByteLen(256 << 10), Repair::Vote, &p).unwrap();
            assert!(report.clean(), "{report:?}");
            let report = verify(&health, &ranges, ByteLen(256 << 10), Repair::No, &p).unwrap();
            assert!(report.mismatches.is_empty(), "{report:?}");
        }
        health.stop();
        drop(health);
        verify_image(&b.image("oc-b"), &expected);
        verify_image(&tmp.path().join("l.img"), &expected);
    }
}

/// (U) A path that holds data but no replica label — a filesystem on a renamed
/// `/dev/sdX`, a disk image — is never written: neither labelled at start (then
/// overwritten by a full rebuild) nor taken by a reload's add; only with
/// `use_unlabelled = true`. A damaged label is not overwritten either.
#[test]
fn an_unlabelled_path_holding_a_filesystem_is_used_only_when_the_operator_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = rt();
    let net = net(&rt);
    let (a, b) = (tmp.path().join("a.img"), tmp.path().join("b.img"));
    let state = tmp.path().join("state");
    let cfg = volume("u", &[local(&a), local(&b)]);
    drop(start(&cfg, &net, &state).unwrap());
    // b's path now holds somebody's ext4 filesystem (and no label), with room
    // for one, as a disk larger than the volume has.
    std::fs::remove_file(&b).unwrap();
    replication::testing::mkfs_ext4(&b, SIZE + wire::label::LABEL_AREA);
    let theirs = std::fs::read(&b).unwrap();

    let act = start(&cfg, &net, &state).unwrap();
    assert_eq!(states(&act), ["online", "faulted"]);
    let why = format!("{:?}", act.slots[1].state);
    assert!(
        why.contains("ext2/ext3/ext4 filesystem") && why.contains("use_unlabelled"),
        "{why}"
    );
    assert!(act.slots[1].backing.is_none(), "not opened for the rebuild");
    assert!(
        std::fs::read(&b).unwrap() == theirs,
        "the filesystem was written"
    );
    drop(act);
    // Nor does a reload add it.
    let rec = StateDir::open(&state).unwrap().load("u").unwrap().unwrap();
    let Err(err) = ublkd::volume::activate::open_added(&cfg, &net, &cfg.replicas[1], &rec) else {
        panic!("a reload added it");
    };
    assert!(err.contains("ext2/ext3/ext4 filesystem"), "{err}");
    assert!(
        std::fs::read(&b).unwrap() == theirs,
        "the filesystem was written"
    );

    // The operator says it may go: labelled, to be rebuilt.
    let allowed = volume(
        "u",
        &[
            local(&a),
            format!("{{ local = \"{}\", use_unlabelled = true }}", b.display()),
        ],
    );
    let act = start(&allowed, &net, &state).unwrap();
    assert_eq!(states(&act), ["online", "faulted"]);
    assert!(act.slots[1].backing.is_some());
    drop(act);
    assert!(std::fs::read(&b).unwrap() != theirs, "labelled");

    // A damaged label (magic present, CRC wrong) is not taken as blank by an add.
    let c = tmp.path().join("c.img");
    std::fs::File::create(&c)
        .unwrap()
        .set_len(SIZE + wire::label::LABEL_AREA)
        .unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&c).unwrap();
        f.write_all_at(b"UBLKDLBL\x01\x00\x00\x00garbage", SIZE)
            .unwrap();
    }
    let damaged = std::fs::read(&c).unwrap();
    let with_c = volume("u", &[local(&a), local(&b), local(&c)]);
    let Err(err) = ublkd::volume::activate::open_added(&with_c, &net, &with_c.replicas[2], &rec)
    else {
        panic!("a reload added it");
    };
    assert!(err.contains("damaged label"), "{err}");
    assert!(
        std::fs::read(&c).unwrap() == damaged,
        "the damaged label was overwritten"
    );
}

/// (K) A host crash that also lost the owner's state dir: the record is gone, so
/// whether the last run stopped cleanly is unknown, and where writes were in flight
/// too (no activity log). The replicas are resynced whole, and a crash during that
/// resync (its record kept, the new activity log knowing only its own writes) does
/// it whole again. Without the record there was no resync at all (the fresh record
/// said clean), and the second crash resynced only the new log's extents.
#[test]
fn a_lost_state_dir_after_a_host_crash_resyncs_everything_even_after_a_second_crash() {
    use replication::rebuild::{resync, CopyConfig, Progress};
    use ublkd::volume::restore_logs;
    let tmp = tempfile::tempdir().unwrap();
    let rt = rt();
    let net = net(&rt);
    let (a, b) = (tmp.path().join("a.img"), tmp.path().join("b.img"));
    // 16 MiB: four activity-log extents, so one hot extent is not all of it.
    const SIZE: u64 = 16 << 20;
    let text = format!(
        "[[volume]]\nname = \"k\"\nsize = {SIZE}\nblock_size = 4096\nreplicas = [{}, {}]\n",
        local(&a),
        local(&b)
    );
    let cfg = Config::parse(&text, "k.toml").unwrap().volumes.remove(0);
    let dir = tmp.path().join("state");
    drop(start(&cfg, &net, &dir).unwrap());
    // The host crashed with a write in flight that reached b only, far from where
    // the next run writes; the state dir is gone with it.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
        f.write_all_at(&[0xB7; 4096], SIZE - 4096).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let sd = StateDir::open(&dir).unwrap();

    let mut act = start(&cfg, &net, &dir).unwrap();
    assert!(!act.record.clean, "unknown is not clean");
    let mut record = act.record.clone();
    let (logs, todo) = restore_logs(&cfg, &net, &sd, &mut record, &mut act, true);
    assert_eq!(
        todo,
        [(replication::ByteOffset(0), replication::ByteLen(SIZE))]
    );
    assert!(record.resync_whole);
    sd.save(&record).unwrap();
    // The second crash: the resync had not begun; the new run wrote at block 0.
    let (health, _sink) =
        health_of(&cfg, &net, &sd, &record, act.slots, &act.remotes, logs).unwrap();
    let nexus = test_nexus(&health, RangeTable::new());
    assert_eq!(
        replication::testing::write_through(&nexus, 0, 4096, 0x11),
        Ok(4096)
    );
    drop(nexus);
    health.stop();
    drop(health);

    let mut act = start(&cfg, &net, &dir).unwrap();
    let mut record = act.record.clone();
    let (logs, todo) = restore_logs(&cfg, &net, &sd, &mut record, &mut act, true);
    assert_eq!(
        todo,
        [(replication::ByteOffset(0), replication::ByteLen(SIZE))],
        "the whole volume, not only the new log's extent"
    );
    sd.save(&record).unwrap();
    let (health, _sink) =
        health_of(&cfg, &net, &sd, &record, act.slots, &act.remotes, logs).unwrap();
    resync(
        &health,
        &RangeTable::new(),
        &todo,
        &CopyConfig::default(),
        &Progress::default(),
    )
    .unwrap();
    wait_until(10, "the spread reads are recorded", || health.is_durable());
    health.stop();
    drop(health);
    assert!(
        data_of(&a) == data_of(&b),
        "the replicas differ after the resync"
    );
    let rec = sd.load("k").unwrap().unwrap();
    assert!(
        !rec.resync_whole,
        "done: the next crash resyncs only its log's extents"
    );
}
