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
    rt.block_on(ublkd::ha::probe(
        &s.addr.to_string(),
        &Secret::new(secret.to_vec()),
        TIMEOUT,
    ))
}

#[test]
fn a_probe_tells_a_live_server_from_a_stopped_a_dead_and_a_foreign_one() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = start_server(tmp.path(), 60);
    let rt = rt();
    match probe(&rt, &s, SECRET) {
        Probe::Answered { capacity } => {
            assert!(capacity.total_bytes > 0 && capacity.free_bytes <= capacity.total_bytes)
        }
        other => panic!("{other:?}"),
    }
    // Another cluster's secret: it answers, but not to us.
    assert!(
        matches!(
            probe(&rt, &s, b"another-cluster-secret-000000"),
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
    assert!(matches!(probe(&rt, &s, SECRET), Probe::Answered { .. }));
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
