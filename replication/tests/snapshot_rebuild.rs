//! Rebuilds carry snapshots, and exports read them: on real layered file
//! replicas, a replica out while
//! snapshots were taken (and one deleted) gets exactly the volume's snapshot set
//! back from a partial rebuild, and a full rebuild recreates ten layers oldest
//! first over a stale history of the target's own, both while a writer keeps
//! writing through the nexus. Every snapshot and the head are then compared
//! byte for byte with a replica that never left.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use replication::backing::Backing;
use replication::health::{Health, NoPersist};
use replication::local::{Create, LocalBacking};
use replication::ranges::RangeTable;
use replication::rebuild::{rebuild, CopyConfig, Outcome, Progress, Rate};
use replication::state::{FaultReason, RebuildKind, ReplicaState};
use replication::testing::{health_over, test_nexus, write_through, Rng};
use replication::{ByteLen, SlotIndex};
use wire::control::SnapshotAction;
use wire::{ReplicaUuid, SnapshotUuid, VolumeUuid};

const SIZE: u64 = 4 << 20;

struct Volume {
    _dir: tempfile::TempDir,
    replicas: Vec<Arc<LocalBacking>>,
    health: Arc<Health>,
    ranges: Arc<RangeTable>,
}

fn volume(n: usize) -> Volume {
    let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")).unwrap();
    let replicas: Vec<Arc<LocalBacking>> = (0..n)
        .map(|i| {
            let path = dir.path().join(format!("r{i}.img"));
            Arc::new(LocalBacking::open(&path, SIZE, Create::IfMissing).unwrap())
        })
        .collect();
    let health = health_over(
        "v",
        VolumeUuid::random(),
        SIZE,
        replicas
            .iter()
            .map(|b| (ReplicaUuid::random(), Backing::Local(b.clone())))
            .collect(),
        Box::new(NoPersist),
    );
    Volume {
        _dir: dir,
        replicas,
        health,
        ranges: RangeTable::new(),
    }
}

/// Random writes through the nexus: whole blocks, 512 B pieces and zeroes.
fn scribble(v: &Volume, rng: &mut Rng, n: usize) {
    let nexus = test_nexus(&v.health, v.ranges.clone());
    for _ in 0..n {
        let off = rng.below((SIZE / 512) as usize - 64) as u64 * 512;
        let len = match rng.below(3) {
            0 => 512,
            1 => 4096,
            _ => 512 * (1 + rng.below(63) as u64),
        };
        write_through(&nexus, off, len, rng.below(250) as u8 + 1).unwrap();
    }
}

/// A writer thread through the nexus until the flag is set.
fn writer(v: &Volume, seed: u64, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<usize> {
    let (health, ranges) = (v.health.clone(), v.ranges.clone());
    std::thread::spawn(move || {
        let nexus = test_nexus(&health, ranges);
        let mut rng = Rng(seed);
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            let off = rng.below((SIZE / 4096) as usize) as u64 * 4096;
            write_through(&nexus, off, 4096, rng.below(250) as u8 + 1).unwrap();
            n += 1;
        }
        n
    })
}

fn snap(v: &Volume, name: &str) -> SnapshotUuid {
    let uuid = SnapshotUuid::random();
    replication::snapshots::create(&v.health, &v.ranges, uuid, name, 1).unwrap();
    uuid
}

fn fault(v: &Volume, slot: usize) {
    v.health
        .fault_missing(SlotIndex(slot as u8), FaultReason::ConnectionLost, &[])
        .unwrap();
}

fn run(v: &Volume, slot: usize, kind: RebuildKind) -> Outcome {
    let cfg = CopyConfig {
        chunk: ByteLen(256 << 10),
        rate: Rate::uncapped(),
        ..CopyConfig::default()
    };
    rebuild(
        &v.health,
        &v.ranges,
        SlotIndex(slot as u8),
        kind,
        cfg,
        &Progress::default(),
    )
    .unwrap()
}

fn names(b: &LocalBacking) -> Vec<(SnapshotUuid, String)> {
    b.store()
        .list()
        .into_iter()
        .filter(|s| !s.deleting)
        .map(|s| (s.uuid, s.name))
        .collect()
}

/// Every snapshot and the head of `b` read as `a`'s.
fn same(a: &LocalBacking, b: &LocalBacking) {
    assert_eq!(names(a), names(b), "the same snapshots");
    let read = |x: &LocalBacking, of: Option<SnapshotUuid>| {
        let mut buf = vec![0u8; SIZE as usize];
        match of {
            Some(u) => x.read_snapshot(u, 0, &mut buf).unwrap(),
            None => x.read_head(0, &mut buf).unwrap(),
        }
        buf
    };
    for (u, name) in names(a) {
        assert!(
            read(a, Some(u)) == read(b, Some(u)),
            "snapshot {name} differs"
        );
    }
    assert!(read(a, None) == read(b, None), "the heads differ");
    b.store().check().unwrap();
}

#[test]
fn a_replica_out_while_three_snapshots_were_taken_gets_them_from_a_partial_rebuild() {
    let v = volume(3);
    let mut rng = Rng(11);
    scribble(&v, &mut rng, 200);
    let old = snap(&v, "before");
    scribble(&v, &mut rng, 50);
    fault(&v, 2);
    for i in 1..=3 {
        scribble(&v, &mut rng, 40);
        let created = replication::snapshots::create(
            &v.health,
            &v.ranges,
            SnapshotUuid::random(),
            &format!("while-out-{i}"),
            i,
        )
        .unwrap();
        assert_eq!(created.replicas, 2, "taken on the two online replicas");
    }
    // Deleted while it was out: it must drop it too.
    replication::snapshots::delete(&v.health, old).unwrap();
    scribble(&v, &mut rng, 40);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(&v, 5, stop.clone());
    let out = run(&v, 2, RebuildKind::Partial);
    stop.store(true, Ordering::SeqCst);
    let writes = w.join().unwrap();
    assert!(matches!(out, Outcome::Done { .. }), "{out:?}");
    assert!(writes > 0);
    assert_eq!(
        v.health.snapshot().slots[2].state,
        ReplicaState::Online,
        "online again"
    );
    let held: Vec<String> = names(&v.replicas[2]).into_iter().map(|(_, n)| n).collect();
    assert_eq!(held, ["while-out-1", "while-out-2", "while-out-3"]);
    same(&v.replicas[0], &v.replicas[2]);
    same(&v.replicas[0], &v.replicas[1]);
}

#[test]
fn a_full_rebuild_recreates_ten_snapshots_over_a_stale_history() {
    let v = volume(2);
    let mut rng = Rng(23);
    scribble(&v, &mut rng, 100);
    // The target's own history, which the volume never had.
    v.replicas[1]
        .snapshot_action(&SnapshotAction::Create {
            uuid: SnapshotUuid::random(),
            name: "stale".into(),
            created_ms: 1,
        })
        .unwrap();
    fault(&v, 1);
    // A file's pool is 4 volumes: ten layers of a few grains each and a
    // rewritten head fit.
    for i in 0..10 {
        scribble(&v, &mut rng, 8);
        snap(&v, &format!("s{i}"));
    }
    scribble(&v, &mut rng, 8);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(&v, 9, stop.clone());
    let out = run(&v, 1, RebuildKind::Full);
    stop.store(true, Ordering::SeqCst);
    w.join().unwrap();
    assert!(matches!(out, Outcome::Done { .. }), "{out:?}");
    let held: Vec<String> = names(&v.replicas[1]).into_iter().map(|(_, n)| n).collect();
    let want: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
    assert_eq!(held, want, "the volume's ten, the stale one gone");
    same(&v.replicas[0], &v.replicas[1]);
    // The head was copied only where it differs from the newest layer: the
    // target's pool holds about what the source's does, not a second volume.
    let (src_used, _) = v.replicas[0].store().pool_usage();
    let (dst_used, _) = v.replicas[1].store().pool_usage();
    assert!(
        dst_used <= src_used + 8,
        "target pool {dst_used} grains vs source {src_used}"
    );
}

#[test]
fn no_snapshot_is_taken_while_a_replica_rebuilds() {
    let v = volume(2);
    let mut rng = Rng(3);
    scribble(&v, &mut rng, 20);
    fault(&v, 1);
    v.health
        .begin_rebuild(SlotIndex(1), RebuildKind::Full)
        .unwrap();
    let err = replication::snapshots::create(&v.health, &v.ranges, SnapshotUuid::random(), "x", 1)
        .unwrap_err();
    assert!(err.to_string().contains("rebuilding"), "{err}");
    assert!(names(&v.replicas[0]).is_empty(), "nothing was taken");
}

fn qemu_img(args: &[&str]) -> String {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (apt install qemu-utils) checks the exports");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-img {args:?}: {text}");
    text
}

#[test]
fn exports_of_a_snapshot_and_of_what_changed_since_an_older_one_read_back_in_qemu_img() {
    use snapshot::export::{writer, Format};
    let v = volume(2);
    let mut rng = Rng(41);
    scribble(&v, &mut rng, 100);
    let s1 = snap(&v, "s1");
    scribble(&v, &mut rng, 30);
    let s2 = snap(&v, "s2");
    scribble(&v, &mut rng, 30);
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let dump = |u: SnapshotUuid, name: &str| {
        let mut buf = vec![0u8; SIZE as usize];
        v.replicas[0].read_snapshot(u, 0, &mut buf).unwrap();
        std::fs::write(p(name), &buf).unwrap();
    };
    dump(s1, "s1.ref");
    dump(s2, "s2.ref");
    let export = |u, since, format, name: &str, backing: Option<(String, String)>| {
        let f = std::fs::File::create(p(name)).unwrap();
        let w = writer(format, f, SIZE, backing).unwrap();
        replication::snapshots::export(
            &v.health,
            u,
            since,
            w,
            &replication::rebuild::Progress::default(),
        )
        .unwrap()
    };
    let full = export(s1, None, Format::Raw, "s1.raw", None);
    assert!(full.bytes_read > 0);
    export(s1, None, Format::Qcow2, "s1.qcow2", None);
    let inc = export(
        s2,
        Some(s1),
        Format::Qcow2,
        "s2.qcow2",
        Some((p("s1.qcow2"), "qcow2".into())),
    );
    assert!(
        inc.bytes_read < full.bytes_read / 2,
        "an incremental export reads what changed: {} of {}",
        inc.bytes_read,
        full.bytes_read
    );
    assert!(qemu_img(&["check", &p("s1.qcow2")]).contains("No errors"));
    assert!(qemu_img(&["check", &p("s2.qcow2")]).contains("No errors"));
    qemu_img(&["compare", &p("s1.ref"), &p("s1.raw")]);
    qemu_img(&["compare", &p("s1.ref"), &p("s1.qcow2")]);
    qemu_img(&["compare", &p("s2.ref"), &p("s2.qcow2")]);
    // The head is no snapshot: what changed after s2 is in no export.
    let out = std::process::Command::new("qemu-img")
        .args(["compare", &p("s1.ref"), &p("s2.qcow2")])
        .output()
        .unwrap();
    assert!(!out.status.success(), "s1 and s2 differ");
    // An older snapshot no replica holds: refused, naming why.
    let f = std::fs::File::create(p("x")).unwrap();
    let err = replication::snapshots::export(
        &v.health,
        s2,
        Some(SnapshotUuid::random()),
        writer(Format::Qcow2, f, SIZE, None).unwrap(),
        &replication::rebuild::Progress::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("holds the snapshot"), "{err}");
}
