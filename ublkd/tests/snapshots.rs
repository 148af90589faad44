//! The daemon's snapshot operations, in this process with the volume served
//! headless (no ublk driver on the host): the schedule's rounds (an `auto-`
//! snapshot taken once per `every`, an operator's left alone, status showing the
//! schedule) and `snapshot export` through the daemon (a new file, never an
//! existing one, what a raw export holds, the `--since` rules).

mod support;

use std::sync::Arc;

use support::*;
use ublkd::control::{ExportFormat, SnapshotCmd};

const SIZE: u64 = 8 << 20;

struct Node {
    daemon: Arc<ublkd::daemon::Daemon>,
    _rt: tokio::runtime::Runtime,
}

impl Node {
    fn start(dir: &std::path::Path) -> Node {
        let config = dir.join("ublk.toml");
        std::fs::write(
            &config,
            format!(
                "[node]\nstate_dir = \"{d}/state\"\ncontrol_socket = \"{d}/ctl.sock\"\n\
                 [[volume]]\nname = \"sv\"\nsize = \"{SIZE}B\"\n\
                 snapshots = {{ every = \"1h\", keep = 2 }}\n\
                 replicas = [ {{ local = \"{d}/a.img\" }}, {{ local = \"{d}/b.img\" }} ]\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let cfg = ublkd::config::Config::from_file(&config).unwrap();
        let rt = rt();
        let net = ublkd::volume::Net::new(
            &cfg,
            rt.handle().clone(),
            None,
            ublkd::volume::Frontend::Headless,
        );
        let daemon = Arc::new(ublkd::daemon::Daemon::new(cfg, net, None).unwrap());
        daemon.start_all();
        wait_until(30, "the volume serves", || {
            daemon.status("sv").unwrap().state == ublkd::lifecycle::VolumeState::Live
        });
        Node { daemon, _rt: rt }
    }

    fn snap(&self, action: SnapshotCmd) -> Result<serde_json::Value, String> {
        self.daemon
            .snapshot("sv", &action, None)
            .map_err(|e| e.to_string())
    }

    fn names(&self) -> Vec<String> {
        let v = self.snap(SnapshotCmd::List).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.daemon.stop_all();
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_schedule_round_takes_an_auto_snapshot_once_per_every_and_leaves_an_operators_alone() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let nexus = node.daemon.serving()[0].nexus().unwrap();
    write_through(&nexus, 0, 1 << 20, 7);
    node.snap(SnapshotCmd::Create {
        name: "mine".into(),
        freeze: false,
    })
    .unwrap();
    let vol = node.daemon.serving()[0].clone();
    vol.scheduled_round();
    let names = node.names();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&"mine".to_string()));
    assert!(names.iter().any(|n| n.starts_with("auto-")), "{names:?}");
    // Not due again within the hour: nothing changes.
    vol.scheduled_round();
    assert_eq!(node.names(), names);
    let st = node.daemon.status("sv").unwrap();
    let sch = st.schedule.expect("the schedule in status");
    assert_eq!((sch.every_s, sch.keep, sch.error), (3600, 2, None));
    let listed = st.snapshots.expect("the round listed the snapshots");
    assert_eq!((listed.count, listed.deleting, listed.partial), (2, 0, 0));
    // The same in the metrics, with no I/O per scrape.
    let text = ublkd::metrics::render(&node.daemon);
    assert!(
        text.contains("ublkd_volume_snapshots{volume=\"sv\"} 2"),
        "{text}"
    );
    assert!(text.contains("ublkd_volume_snapshot_schedule_failing{volume=\"sv\"} 0"));
    drop(nexus);
}

fn write_through(nexus: &replication::Nexus, off: u64, len: u64, byte: u8) {
    replication::testing::write_through(nexus, off, len, byte).unwrap();
}

#[test]
fn an_export_makes_a_new_file_and_refuses_what_it_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let nexus = node.daemon.serving()[0].nexus().unwrap();
    write_through(&nexus, 0, 2 << 20, 3);
    for n in ["e1", "e2"] {
        node.snap(SnapshotCmd::Create {
            name: n.into(),
            freeze: false,
        })
        .unwrap();
        write_through(&nexus, 1 << 20, 64 << 10, 9);
    }
    let path = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let export =
        |snapshot: &str, file: &str, format, since: Option<&str>, backing: Option<&str>| {
            node.snap(SnapshotCmd::Export {
                snapshot: snapshot.into(),
                path: path(file),
                format,
                since: since.map(str::to_string),
                backing_file: backing.map(str::to_string),
                force: false,
            })
        };
    let v = export("e1", "e1.qcow2", ExportFormat::Qcow2, None, None).unwrap();
    assert_eq!(v["size"], SIZE);
    assert!(v["bytes_written"].as_u64().unwrap() >= 2 << 20, "{v}");
    let inc = export(
        "e2",
        "e2.qcow2",
        ExportFormat::Qcow2,
        Some("e1"),
        Some("e1.qcow2"),
    )
    .unwrap();
    assert!(inc["bytes_read"].as_u64().unwrap() <= 1 << 20, "{inc}");
    // The raw export of e2 reads back as e2: 3s, then e1's write of 9s.
    export("e2", "e2.raw", ExportFormat::Raw, None, None).unwrap();
    let raw = std::fs::read(path("e2.raw")).unwrap();
    assert_eq!(raw.len() as u64, SIZE);
    assert!(raw[..1 << 20].iter().all(|&b| b == 3));
    assert!(raw[1 << 20..(1 << 20) + (64 << 10)].iter().all(|&b| b == 9));
    assert!(raw[(1 << 20) + (64 << 10)..2 << 20].iter().all(|&b| b == 3));
    assert!(raw[2 << 20..].iter().all(|&b| b == 0));
    // What it refuses, and why.
    let refusals = [
        (
            export("e1", "e1.qcow2", ExportFormat::Qcow2, None, None),
            "exists",
        ),
        (
            export("e2", "x.raw", ExportFormat::Raw, Some("e1"), Some("e1.raw")),
            "needs --format qcow2",
        ),
        (
            export("e2", "x.qcow2", ExportFormat::Qcow2, Some("e1"), None),
            "needs --backing-file",
        ),
        (
            export(
                "e1",
                "x.qcow2",
                ExportFormat::Qcow2,
                Some("e2"),
                Some("e2.qcow2"),
            ),
            "must be older",
        ),
        (
            export("nope", "x.qcow2", ExportFormat::Qcow2, None, None),
            "no snapshot",
        ),
    ];
    for (r, says) in refusals {
        let e = r.unwrap_err();
        assert!(e.contains(says), "{e}");
    }
    assert!(!dir.path().join("x.qcow2").exists() && !dir.path().join("x.raw").exists());
    let relative = SnapshotCmd::Export {
        snapshot: "e1".into(),
        path: "e1.raw".into(),
        format: ExportFormat::Raw,
        since: None,
        backing_file: None,
        force: false,
    };
    assert!(node.snap(relative).unwrap_err().contains("absolute"));
    drop(nexus);
}
