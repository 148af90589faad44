//! The HA monitor's probes against real replica servers (processes on 127.0.0.x,
//! real TCP), and its liveness rules fed by them: a stopped server is told from
//! a dead one, a flapping one is never declared dead.

mod support;

use std::time::{Duration, Instant};

use ha::monitor::{Monitor, Rules};
use ha::peer::{PeerRules, Probe, ProbeFailure};
use ha::{PeerAddr, UnixMs};
use replication::remote::Secret;
use support::*;

const TIMEOUT: Duration = Duration::from_millis(500);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn probe(rt: &tokio::runtime::Runtime, s: &ServerProc, secret: &[u8]) -> Probe {
    probe_within(rt, s, secret, TIMEOUT)
}

/// A probe that is meant to be answered: a loaded host may take longer than
/// [`TIMEOUT`] for the connect, handshake and STAT of a server just started or
/// continued.
fn probe_within(
    rt: &tokio::runtime::Runtime,
    s: &ServerProc,
    secret: &[u8],
    timeout: Duration,
) -> Probe {
    rt.block_on(ublkd::ha::probe(
        &s.addr.to_string(),
        &Secret::new(secret.to_vec()),
        timeout,
    ))
}

#[test]
fn a_probe_tells_a_live_server_from_a_stopped_a_dead_and_a_foreign_one() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = start_server(tmp.path(), 60);
    let rt = rt();
    match probe_within(&rt, &s, SECRET, Duration::from_secs(10)) {
        Probe::Answered { capacity } => {
            assert!(capacity.total_bytes > 0 && capacity.free_bytes <= capacity.total_bytes)
        }
        other => panic!("{other:?}"),
    }
    // Another cluster's secret: it answers, but not to us.
    assert!(
        matches!(
            probe_within(
                &rt,
                &s,
                b"another-cluster-secret-000000",
                Duration::from_secs(10)
            ),
            Probe::Failed(ProbeFailure::Rejected { .. })
        ),
        "wrong secret"
    );
    // SIGSTOP: the kernel still accepts the connection, nobody answers.
    s.signal(libc::SIGSTOP);
    let t0 = Instant::now();
    assert_eq!(probe(&rt, &s, SECRET), Probe::Failed(ProbeFailure::NoReply));
    assert!(
        t0.elapsed() < TIMEOUT * 3,
        "bounded by the timeout: {:?}",
        t0.elapsed()
    );
    s.signal(libc::SIGCONT);
    assert!(matches!(
        probe_within(&rt, &s, SECRET, Duration::from_secs(10)),
        Probe::Answered { .. }
    ));
    // The process gone, the host up: refused.
    s.kill();
    assert_eq!(probe(&rt, &s, SECRET), Probe::Failed(ProbeFailure::Refused));
}

/// A server stopped and continued every second for 12 s (grace 5 s) is
/// suspected again and again and never declared dead; killed, it is dead once
/// the grace is over.
#[test]
fn a_flapping_server_is_never_declared_dead_and_a_killed_one_is() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = start_server(tmp.path(), 61);
    let rt = rt();
    let rules = Rules {
        peer: PeerRules {
            grace_ms: 5000,
            rejoin_oks: 3,
        },
        max_concurrent: 2,
        backoff_first_ms: 5000,
        backoff_max_ms: 300_000,
        report_every_ms: 60_000,
        idle_probe_every_ms: 30_000,
    };
    let mut m = Monitor::new(rules, false);
    let peer = PeerAddr::new(&s.addr.to_string()).unwrap();
    let t0 = Instant::now();
    let now = || UnixMs(t0.elapsed().as_millis() as u64);
    let mut stopped = false;
    let mut flipped = Instant::now();
    let mut suspected = 0;
    while t0.elapsed() < Duration::from_secs(12) {
        if flipped.elapsed() >= Duration::from_secs(1) {
            s.signal(if stopped {
                libc::SIGCONT
            } else {
                libc::SIGSTOP
            });
            stopped = !stopped;
            flipped = Instant::now();
        }
        let p = probe(&rt, &s, SECRET);
        suspected += matches!(p, Probe::Failed(_)) as u32;
        m.probed(&peer, &p, now());
        assert!(
            !m.peers()[&peer].liveness.is_dead(),
            "declared dead while flapping"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        suspected >= 3,
        "the stops were seen: {suspected} failed probes"
    );
    // Alive again first: the grace counts from the first failed probe.
    s.signal(libc::SIGCONT);
    while m.peers()[&peer].liveness != ha::peer::Liveness::Alive {
        m.probed(&peer, &probe(&rt, &s, SECRET), now());
    }
    s.kill();
    let died = Instant::now();
    let mut events = Vec::new();
    while !m.peers()[&peer].liveness.is_dead() {
        assert!(
            died.elapsed() < Duration::from_secs(10),
            "never declared dead"
        );
        events.extend(m.probed(&peer, &probe(&rt, &s, SECRET), now()));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        died.elapsed() >= Duration::from_millis(4800),
        "{:?}",
        died.elapsed()
    );
    assert!(
        events.iter().any(|e| matches!(
            &e.kind,
            ha::event::EventKind::PeerDead {
                why: ProbeFailure::Refused,
                ..
            }
        )),
        "{events:?}"
    );
}

/// The daemon itself, in this process, with its volume served headless (no ublk
/// driver on the host): activation, replica connections, rebuilds, the HA monitor
/// thread and reload run as in `ublkd`; the test does the volume's I/O.
struct Node {
    daemon: std::sync::Arc<ublkd::daemon::Daemon>,
    stop: std::sync::Arc<ublkd::ha::StopFlag>,
    monitor: Option<std::thread::JoinHandle<()>>,
    config: std::path::PathBuf,
    _rt: tokio::runtime::Runtime,
}

impl Node {
    fn start(dir: &std::path::Path, config_text: &str) -> Node {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("ublk.toml");
        std::fs::write(&config, config_text).unwrap();
        let cfg = ublkd::config::Config::from_file(&config).unwrap();
        let rt = support::rt();
        let net = ublkd::volume::Net::new(
            &cfg,
            rt.handle().clone(),
            Some(Secret::new(SECRET.to_vec())),
            ublkd::volume::Frontend::Headless,
        );
        let mut daemon = ublkd::daemon::Daemon::new(cfg, net, None).unwrap();
        daemon.set_config_path(config.clone());
        let daemon = std::sync::Arc::new(daemon);
        daemon.start_all();
        let stop = std::sync::Arc::new(ublkd::ha::StopFlag::default());
        let monitor = {
            let (d, s) = (daemon.clone(), stop.clone());
            std::thread::spawn(move || ublkd::ha::run(&d, &s))
        };
        Node {
            daemon,
            stop,
            monitor: Some(monitor),
            config,
            _rt: rt,
        }
    }

    fn status(&self) -> ublkd::volume::VolumeStatus {
        self.daemon.status("hv").unwrap()
    }

    /// The replicas' locations and states.
    fn replicas(&self) -> Vec<(String, String)> {
        self.status()
            .replicas
            .into_iter()
            .map(|r| (r.path, r.state.unwrap_or_default()))
            .collect()
    }

    fn all_online(&self, locations: &[String]) -> bool {
        let mut got = self.replicas();
        got.sort();
        let mut want: Vec<(String, String)> = locations
            .iter()
            .map(|l| (l.clone(), "online".to_string()))
            .collect();
        want.sort();
        got == want
    }

    fn nexus(&self) -> replication::Nexus {
        wait_until(30, "the volume serves", || {
            self.status().state == ublkd::lifecycle::VolumeState::Live
        });
        self.daemon.serving()[0].nexus().expect("serving")
    }

    fn events(&self) -> Vec<ha::event::Event> {
        self.daemon
            .ha()
            .events
            .since(None)
            .into_iter()
            .map(|l| l.event)
            .collect()
    }

    fn count(&self, f: impl Fn(&ha::event::EventKind) -> bool) -> usize {
        self.events().iter().filter(|e| f(&e.kind)).count()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(m) = self.monitor.take() {
            let _ = m.join();
        }
        self.daemon.stop_all();
    }
}

fn node_config(dir: &std::path::Path, a: &ServerProc, b: &ServerProc, spares: &str) -> String {
    format!(
        "[node]\nstate_dir = \"{d}/state\"\ncontrol_socket = \"{d}/ctl.sock\"\n\
         cluster_secret_file = \"{k}\"\n\
         [ha]\ngrace_ms = 5000\nprobe_interval_ms = 500\n\
         [[volume]]\nname = \"hv\"\nsize = \"{SIZE}B\"\n\
         replicas = [ {{ local = \"{d}/local.img\" }}, {{ remote = \"{a}\", id = \"hv-a\" }}, {{ remote = \"{b}\", id = \"hv-b\" }} ]\n\
         spares = [ {spares} ]\n",
        d = dir.display(),
        k = secret_file(dir, SECRET).display(),
        a = a.addr,
        b = b.addr,
    )
}

/// Servers a, b and a spare on 127.0.0.`base`.. and a node whose volume "hv" has a
/// local replica and replicas on a and b (the spare listed only `with_spare`),
/// all three online.
struct Cluster {
    // Dropped first: the node stops before its servers go.
    node: Node,
    a: ServerProc,
    b: ServerProc,
    spare: ServerProc,
    dir: std::path::PathBuf,
}

impl Cluster {
    fn start(root: &std::path::Path, base: u8, with_spare: bool) -> Cluster {
        let a = start_server(root, base);
        let b = start_server(root, base + 1);
        let spare = start_server(root, base + 2);
        let dir = root.join("owner");
        std::fs::create_dir_all(&dir).unwrap();
        let spares = if with_spare {
            format!("\"{}\"", spare.addr)
        } else {
            String::new()
        };
        let node = Node::start(&dir, &node_config(&dir, &a, &b, &spares));
        let c = Cluster {
            node,
            a,
            b,
            spare,
            dir,
        };
        let (local, at_a, at_b, _) = c.locations();
        wait_until(30, "three online", || {
            c.node
                .all_online(&[local.clone(), at_a.clone(), at_b.clone()])
        });
        c
    }

    /// The local replica, a's and b's, and b's replacement on the spare.
    fn locations(&self) -> (String, String, String, String) {
        (
            self.dir.join("local.img").display().to_string(),
            format!("hv-a@{}", self.a.addr),
            format!("hv-b@{}", self.b.addr),
            format!("hv-b@{}", self.spare.addr),
        )
    }
}

/// Runs the verifying workload in rounds until `done` (at most `secs`); every
/// request must succeed.
fn io_until(
    nexus: &replication::Nexus,
    mut expected: Vec<u64>,
    base: &mut u64,
    secs: u64,
    what: &str,
    done: impl Fn() -> bool,
) -> Vec<u64> {
    let t0 = Instant::now();
    while !done() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "{what}: not within {secs} s"
        );
        *base += 1 << 20;
        let out = workload_from(nexus, expected, *base, 100, 4, u64::MAX, || {});
        assert_eq!(
            out.errors, 0,
            "application I/O failed while waiting: {what}"
        );
        expected = out.expected;
    }
    expected
}

/// A replica server is SIGKILLed under a verifying workload: the monitor declares
/// it dead after the grace, creates its replica anew on the spare inside the
/// running volume, the full rebuild fills it and the dead one is dropped — no
/// application error, one replacement, every survivor holding every acknowledged
/// write. The dead server's return is refused as stale; its storage stays until
/// reclaimed, and the reclaim deletes it alone.
#[test]
fn a_dead_server_is_replaced_on_a_spare_inside_the_running_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(tmp.path(), 50, true);
    let (node, nexus, dir) = (&c.node, c.node.nexus(), c.dir.clone());
    let (local, at_a, at_b, at_spare) = c.locations();
    let (a, spare) = (&c.a, &c.spare);
    let b = &mut c.b;

    let out = workload(&nexus, 400, 4, 100, || b.kill());
    assert_eq!(out.errors, 0);
    let mut base = 1 << 32;
    let expected = io_until(
        &nexus,
        out.expected,
        &mut base,
        90,
        "replaced and rebuilt",
        || node.all_online(&[local.clone(), at_a.clone(), at_spare.clone()]),
    );
    flush(&nexus);
    verify_image(&dir.join("local.img"), &expected);
    verify_image(&a.image("hv-a"), &expected);
    verify_image(&spare.image("hv-b"), &expected);
    use ha::event::EventKind as K;
    assert_eq!(node.count(|k| matches!(k, K::ReplacementPlaced { .. })), 1);
    assert_eq!(node.count(|k| matches!(k, K::PeerDead { .. })), 1);
    // The fault itself is an event too, once, with why.
    let faults: Vec<_> = node
        .events()
        .into_iter()
        .filter(|e| {
            matches!(e.kind, K::ReplicaFaulted { .. }) && e.replica.as_deref() == Some(&at_b)
        })
        .collect();
    assert_eq!(faults.len(), 1, "{faults:?}");
    let st = node.status();
    assert_eq!(st.substitutions.len(), 1, "{:?}", st.substitutions);
    assert_eq!(st.substitutions[0].configured, at_b);
    assert_eq!(st.retired.len(), 1, "{:?}", st.retired);
    assert_eq!(st.retired[0].location, at_b);
    // (H) An abandon the monitor decided on an older view (the old replica back,
    // before the replacement came online) is refused: the old one is retired and
    // the replacement online, so dropping it would leave a replica short.
    let abandon = node.daemon.serving()[0]
        .decider()
        .ha_abandon(&at_b, &at_spare);
    assert!(abandon.is_err(), "{abandon:?}");
    assert!(node.all_online(&[local.clone(), at_a.clone(), at_spare.clone()]));

    // Back: reported stale, kept out of the set, its storage untouched.
    b.start();
    let expected = io_until(&nexus, expected, &mut base, 30, "stale reported", || {
        node.count(|k| matches!(k, K::StaleRefused { .. })) > 0
    });
    assert!(node.all_online(&[local.clone(), at_a.clone(), at_spare.clone()]));
    assert!(b.image("hv-b").exists());
    // The dropped replica's client does not reconnect to it (an idle queue may
    // still hold its handle): past the longest reconnect backoff (5 s), no OPEN.
    let t0 = Instant::now();
    let expected = io_until(&nexus, expected, &mut base, 30, "reconnect backoff", || {
        t0.elapsed() > Duration::from_secs(6)
    });
    assert!(
        !b.log().contains("reopened by its owner"),
        "the retired replica's client reconnected"
    );
    // Reclaimed on request: that copy only.
    let r = node.daemon.replica_reclaim("hv", None).unwrap();
    assert_eq!(r["reclaimed"][0]["result"]["outcome"], "deleted", "{r}");
    assert!(!b.image("hv-b").exists());
    assert!(spare.image("hv-b").exists());
    assert!(node.status().retired.is_empty());
    let expected = workload_from(&nexus, expected, base + (1 << 20), 200, 4, u64::MAX, || {});
    assert_eq!(expected.errors, 0);
    flush(&nexus);
    verify_image(&spare.image("hv-b"), &expected.expected);
}

/// Rules under a verifying workload: a server that stops and continues every
/// 1.8 s is suspected, never declared dead, and nothing is replaced; a
/// killed one with no spare configured leaves the volume degraded with the
/// reason in `ha status`; a reload that adds a spare gets it replaced there.
#[test]
fn a_flapping_server_is_kept_and_a_spare_added_by_reload_is_used() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(tmp.path(), 53, false);
    let (node, nexus, dir) = (&c.node, c.node.nexus(), c.dir.clone());
    let (local, at_a, at_b, at_spare) = c.locations();
    let (a, spare) = (&c.a, &c.spare);
    let b = &mut c.b;
    use ha::event::EventKind as K;

    // Flapping: stopped 1.2 s (longer than a probe's 500 ms timeout, so probes fail;
    // under the 5 s grace), continued 600 ms, 6 times, on a timer of its own while the
    // workload goes on. The grace spans several continued windows: a loaded host
    // that misses one with its probes does not make it a death.
    let pid = a.child.id() as i32;
    let flapper = std::thread::spawn(move || {
        for _ in 0..6 {
            // SAFETY: kill(2) on the test's own child.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
            std::thread::sleep(Duration::from_millis(1200));
            unsafe { libc::kill(pid, libc::SIGCONT) };
            std::thread::sleep(Duration::from_millis(600));
        }
    });
    let mut base = 0;
    let expected = io_until(
        &nexus,
        vec![0; BLOCKS],
        &mut base,
        60,
        "flapping over",
        || flapper.is_finished(),
    );
    assert!(
        node.count(|k| matches!(k, K::PeerSuspected { .. })) > 0,
        "{:?}",
        node.events()
    );
    assert_eq!(
        node.count(|k| matches!(k, K::PeerDead { .. })),
        0,
        "{:?}",
        node.events()
    );
    assert_eq!(node.count(|k| matches!(k, K::ReplacementPlaced { .. })), 0);

    // No spare: degraded, and the monitor says why it waits.
    b.kill();
    let expected = io_until(&nexus, expected, &mut base, 30, "waits for a spare", || {
        node.daemon
            .ha()
            .status()
            .waiting
            .iter()
            .any(|w| w.replica == at_b)
    });
    assert_eq!(node.status().state, ublkd::lifecycle::VolumeState::Degraded);
    assert!(node.count(|k| matches!(k, K::NoPlacement { .. })) > 0);

    // A reload adds the spare: used.
    std::fs::write(
        &node.config,
        node_config(&dir, a, b, &format!("\"{}\"", spare.addr)),
    )
    .unwrap();
    let report = node.daemon.reload().unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let expected = io_until(
        &nexus,
        expected,
        &mut base,
        90,
        "replaced after the reload",
        || node.all_online(&[local.clone(), at_a.clone(), at_spare.clone()]),
    );
    assert_eq!(node.count(|k| matches!(k, K::ReplacementPlaced { .. })), 1);
    flush(&nexus);
    verify_image(&a.image("hv-a"), &expected);
    verify_image(&spare.image("hv-b"), &expected);
}

/// (N) A restart while an operator's replacement is being rebuilt: the old
/// replica is still in the running set after it (it may hold the only current
/// copy; the substitution alone named only the new one, so activation never
/// looked at the old), and the replacement finishes after the restart — the old
/// one dropped once the new one is online, the record's note of it gone.
#[test]
fn a_restart_mid_replacement_keeps_the_old_replica_until_the_new_one_is_online() {
    let tmp = tempfile::tempdir().unwrap();
    let a = start_server(tmp.path(), 60);
    let b = start_server(tmp.path(), 61);
    let spare = start_server(tmp.path(), 62);
    let dir = tmp.path().join("owner");
    std::fs::create_dir_all(&dir).unwrap();
    // 64 MiB copied at 1 MiB/s: the replacement is still rebuilding at the restart.
    let config = |rate: &str| {
        node_config(&dir, &a, &b, "")
            .replace(&format!("size = \"{SIZE}B\""), "size = \"64MiB\"")
            .replace("[ha]", &format!("[rebuild]\nrate = \"{rate}\"\n[ha]"))
    };
    let (local, at_a, at_b, at_spare) = (
        dir.join("local.img").display().to_string(),
        format!("hv-a@{}", a.addr),
        format!("hv-b@{}", b.addr),
        format!("hv-b@{}", spare.addr),
    );
    let node = Node::start(&dir, &config("1MiB"));
    wait_until(30, "three online", || {
        node.all_online(&[local.clone(), at_a.clone(), at_b.clone()])
    });
    let r = node
        .daemon
        .replica_replace("hv", &at_b, Some(&spare.addr.to_string()))
        .unwrap();
    assert_eq!(r["new"], at_spare.as_str(), "{r}");
    drop(node);

    let node = Node::start(&dir, &config("1MiB"));
    wait_until(30, "serving again", || {
        node.status().generation > 1 && !node.replicas().is_empty()
    });
    wait_until(30, "the new one rebuilding, the old one online", || {
        let r = node.replicas();
        r.contains(&(at_b.clone(), "online".into()))
            && r.contains(&(at_spare.clone(), "rebuilding".into()))
    });
    // Uncapped: the replacement finishes, and only then the old one goes.
    std::fs::write(&node.config, config("0")).unwrap();
    node.daemon.reload().unwrap();
    wait_until(60, "the replacement online, the old one dropped", || {
        node.all_online(&[local.clone(), at_a.clone(), at_spare.clone()])
    });
    // The record follows the drop (saved just after it).
    let record = || {
        ublkd::state::StateDir::open(&dir.join("state"))
            .unwrap()
            .load("hv")
            .unwrap()
            .unwrap()
    };
    wait_until(10, "the record says the replacement is done", || {
        record().replacing.is_empty()
    });
    let rec = record();
    assert_eq!(rec.retired.len(), 1, "{:?}", rec.retired);
    assert_eq!(rec.retired[0].location, at_b);
}

/// (N) A manual replacement needs a replica online to be rebuilt from: with both
/// remotes of a two-remote volume dead (one faulted, the other the member waited
/// for), `replica replace` is refused with the reason, and nothing is added.
#[test]
fn a_manual_replacement_with_no_replica_online_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = start_server(tmp.path(), 63);
    let mut b = start_server(tmp.path(), 64);
    let spare = start_server(tmp.path(), 65);
    let dir = tmp.path().join("owner");
    std::fs::create_dir_all(&dir).unwrap();
    // No local replica: both copies are remote.
    let text = node_config(&dir, &a, &b, "").replace(
        &format!("{{ local = \"{}/local.img\" }}, ", dir.display()),
        "",
    );
    let (at_a, at_b) = (format!("hv-a@{}", a.addr), format!("hv-b@{}", b.addr));
    let node = Node::start(&dir, &text);
    wait_until(30, "two online", || {
        node.all_online(&[at_a.clone(), at_b.clone()])
    });
    a.kill();
    b.kill();
    wait_until(30, "none online", || {
        node.replicas().iter().all(|(_, s)| s != "online")
    });
    let err = node
        .daemon
        .replica_replace("hv", &at_b, Some(&spare.addr.to_string()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no replica is online to rebuild"), "{err}");
    assert_eq!(node.replicas().len(), 2, "nothing added");
}

/// One scrape of `/metrics` over real TCP: (status line, body).
fn http(addr: std::net::SocketAddr, request: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The value of the sample `name{labels}` (labels as the exposition writes them).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `/metrics` of a node serving a volume under I/O: the request counters, bytes and
/// latency histograms move by what was done; a killed server shows as a faulted
/// replica behind by what it missed, with an HA event; every family has HELP and
/// TYPE, counters end in `_total`, and `promtool check metrics` accepts it when the
/// machine has promtool.
#[test]
fn metrics_move_under_io_and_follow_the_prometheus_conventions() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(tmp.path(), 70, false);
    let listener = ublkd::metrics::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let d = c.node.daemon.clone();
    std::thread::spawn(move || ublkd::metrics::serve(listener, d));
    let scrape = || {
        let (status, body) = http(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 200 OK");
        body
    };
    let nexus = c.node.nexus();
    let (_, at_a, at_b, _) = c.locations();
    let writes = r#"ublkd_volume_requests_total{volume="hv",op="write"}"#;
    let written = r#"ublkd_volume_written_bytes_total{volume="hv"}"#;
    let write_lat = r#"ublkd_volume_request_duration_seconds_count{volume="hv",op="write"}"#;
    let before = scrape();
    let out = workload(&nexus, 200, 4, u64::MAX, || {});
    assert_eq!(out.errors, 0);
    let after = scrape();
    let moved = |series: &str| sample(&after, series).unwrap() - sample(&before, series).unwrap();
    let reads = r#"ublkd_volume_requests_total{volume="hv",op="read"}"#;
    let read_lat = r#"ublkd_volume_request_duration_seconds_count{volume="hv",op="read"}"#;
    // The workload's 200 requests, writes and reads of a block each.
    assert_eq!(moved(writes) + moved(reads), 200.0, "{after}");
    assert!(moved(writes) > 0.0 && moved(reads) > 0.0);
    assert_eq!(moved(written), moved(writes) * BLOCK as f64);
    assert_eq!(
        moved(write_lat),
        moved(writes),
        "one latency observation per write"
    );
    assert_eq!(
        moved(read_lat),
        moved(reads),
        "one latency observation per read"
    );
    let inf = r#"ublkd_volume_request_duration_seconds_bucket{le="+Inf",volume="hv",op="write"}"#;
    let inf = sample(&after, inf).or_else(|| {
        // The label order is the encoder's: find the +Inf bucket of writes either way.
        after
            .lines()
            .find(|l| {
                l.starts_with("ublkd_volume_request_duration_seconds_bucket")
                    && l.contains(r#"le="+Inf""#)
                    && l.contains(r#"op="write""#)
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    });
    assert_eq!(
        inf,
        sample(&after, write_lat),
        "+Inf bucket = count: {after}"
    );
    for r in [&at_a, &at_b] {
        let online = format!(r#"ublkd_replica_online{{volume="hv",replica="{r}"}}"#);
        assert_eq!(sample(&after, &online), Some(1.0), "{after}");
    }
    assert_eq!(
        sample(&after, r#"ublkd_volume_in_flight_requests{volume="hv"}"#),
        Some(0.0)
    );
    assert!(sample(&after, "process_cpu_seconds_total").unwrap() > 0.0);
    assert!(sample(&after, "process_resident_memory_bytes").unwrap() > 1e6);

    // A server dies: its replica is faulted and falls behind by the writes it misses.
    c.b.kill();
    let out = workload(&nexus, 100, 4, u64::MAX, || {});
    assert_eq!(out.errors, 0);
    wait_until(30, "the monitor reports the fault", || {
        c.node
            .count(|k| matches!(k, ha::event::EventKind::ReplicaFaulted { .. }))
            > 0
    });
    let faulted = scrape();
    let online_b = format!(r#"ublkd_replica_online{{volume="hv",replica="{at_b}"}}"#);
    assert_eq!(sample(&faulted, &online_b), Some(0.0));
    let behind = format!(r#"ublkd_replica_behind_bytes{{volume="hv",replica="{at_b}"}}"#);
    assert!(
        sample(&faulted, &behind).unwrap() >= BLOCK as f64,
        "{faulted}"
    );
    assert!(
        faulted
            .lines()
            .any(|l| l.starts_with("ublkd_replica_state{")
                && l.contains(&at_b)
                && l.contains(r#"state="faulted""#)
                && l.contains(r#"reason="connection_lost""#)),
        "{faulted}"
    );
    assert_eq!(
        sample(
            &faulted,
            r#"ublkd_ha_events_total{event="replica_faulted"}"#
        ),
        Some(1.0),
        "{faulted}"
    );

    // The conventions, checked here and by promtool where the machine has it.
    let mut typed = std::collections::BTreeMap::new();
    for l in faulted.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut w = l[7..].split(' ');
        typed.insert(w.next().unwrap().to_string(), w.next().unwrap().to_string());
    }
    for l in faulted.lines().filter(|l| !l.starts_with('#')) {
        let name = l.split(['{', ' ']).next().unwrap();
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{name}: not snake_case"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| typed.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        let ty = typed
            .get(family)
            .unwrap_or_else(|| panic!("{name}: no TYPE"));
        assert_eq!(ty == "counter", name.ends_with("_total"), "{name}: a {ty}");
        assert!(
            faulted.contains(&format!("# HELP {family} ")),
            "{family}: no HELP"
        );
    }
    // The packaged Grafana dashboard asks only for what is there.
    let dashboard = include_str!("../../packaging/grafana-dashboard.json");
    let mut asked = std::collections::BTreeSet::new();
    for (i, _) in dashboard
        .match_indices("ublkd_")
        .chain(dashboard.match_indices("process_"))
    {
        let name: String = dashboard[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        asked.insert(name);
    }
    for name in &asked {
        let family = name.strip_suffix("_bucket").unwrap_or(name);
        assert!(
            typed.contains_key(family),
            "the dashboard asks for {name}, not exported"
        );
    }
    assert!(asked.len() >= 15, "{asked:?}");
    if let Ok(mut p) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        use std::io::Write;
        p.stdin
            .take()
            .unwrap()
            .write_all(faulted.as_bytes())
            .unwrap();
        let out = p.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Only GET /metrics answers metrics.
    assert_eq!(
        http(addr, "GET /nope HTTP/1.1\r\n\r\n").0,
        "HTTP/1.1 404 Not Found"
    );
    assert_eq!(
        http(addr, "POST /metrics HTTP/1.1\r\n\r\n").0,
        "HTTP/1.1 405 Method Not Allowed"
    );
}

/// A server in maintenance (a planned reboot) that stays down past the grace is not
/// replaced, though a spare is there; the status says why, and a restart keeps it.
/// Once the maintenance ends, the dead server's replica is replaced as usual.
#[test]
fn a_server_in_maintenance_is_not_replaced_until_the_maintenance_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(tmp.path(), 75, true);
    let b = c.b.addr.to_string();
    c.node.daemon.ha().set_maintenance(&b, Some(None)).unwrap();
    let nexus = c.node.nexus();
    let out = workload(&nexus, 100, 4, 50, || c.b.kill());
    assert_eq!(out.errors, 0);
    let placed =
        |n: &Node| n.count(|k| matches!(k, ha::event::EventKind::ReplacementPlaced { .. }));
    // Dead for twice the grace (5 s): still waiting, for the maintenance.
    wait_until(30, "b declared dead", || {
        c.node
            .count(|k| matches!(k, ha::event::EventKind::PeerDead { .. }))
            > 0
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(placed(&c.node), 0, "replaced while in maintenance");
    let st = c.node.daemon.ha().status();
    assert_eq!(st.maintenance.len(), 1);
    assert!(
        st.waiting
            .iter()
            .any(|w| matches!(w.waiting, ha::monitor::Waiting::Maintenance { until: None })),
        "{:?}",
        st.waiting
    );
    // What a restart reads: the maintenance is kept.
    let kept = ublkd::ha::Ha::new(
        &ublkd::state::StateDir::open(&c.dir.join("state")).unwrap(),
        &ublkd::config::HaConfig::default(),
    );
    assert_eq!(kept.status().maintenance[0].peer, b);
    // Ended: replaced on the spare.
    c.node.daemon.ha().set_maintenance(&b, None).unwrap();
    wait_until(30, "the replacement placed", || placed(&c.node) == 1);
    assert!(
        c.node.daemon.ha().set_maintenance(&b, None).is_err(),
        "ending it twice is refused"
    );
}
