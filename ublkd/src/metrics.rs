//! `/metrics` in the Prometheus text format (`[metrics] listen`; off by default).
//!
//! Everything is read at scrape time from the state the daemon keeps anyway (volume
//! and replica status, the rebuild in progress, the HA monitor, `/proc/self`): the
//! data path only bumps the volume's relaxed atomics (`IoStats`, its latency
//! histograms). A scrape costs the reader one status pass; an idle node with nobody
//! scraping does nothing here (the HTTP thread sleeps in `accept`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use replication::latency::HistogramSnapshot;

use crate::daemon::Daemon;

/// The `Content-Type` of what `/metrics` answers.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The whole exposition, as one scrape answers it.
pub fn render(daemon: &Arc<Daemon>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(daemon.clone())));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}

/// Serve `GET /metrics` on `listener` until the process exits: one connection at
/// a time (Prometheus scrapes seldom), each bounded by a timeout so a stuck client
/// cannot hold the next scrape.
pub fn serve(listener: TcpListener, daemon: Arc<Daemon>) {
    for conn in listener.incoming() {
        match conn {
            Ok(s) => {
                if let Err(e) = answer(s, &daemon) {
                    tracing::debug!(error = %e, "metrics: a request failed");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Bind the metrics address.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
}

/// Bind `addr`, retrying every 10 s while it cannot be taken (said once), then serve.
pub fn bind_and_serve(addr: SocketAddr, daemon: Arc<Daemon>) {
    let mut said = false;
    let listener = loop {
        match bind(addr) {
            Ok(l) => break l,
            Err(e) => {
                if !said {
                    tracing::error!(listen = %addr, error = %e,
                        "[metrics] listen: cannot take the address: serving without metrics, retrying every 10 s");
                    said = true;
                }
                std::thread::sleep(Duration::from_secs(10));
            }
        }
    };
    tracing::info!(listen = %addr, "metrics at http://{addr}/metrics");
    serve(listener, daemon);
}

/// How long one client may take to send its request: the connections are served
/// one at a time, and a slow one must not hold the next scrape.
const REQUEST_TIME: Duration = Duration::from_secs(5);

fn answer(s: TcpStream, daemon: &Arc<Daemon>) -> std::io::Result<()> {
    let t0 = std::time::Instant::now();
    let left = || {
        REQUEST_TIME
            .checked_sub(t0.elapsed())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::TimedOut, "request too slow"))
    };
    s.set_read_timeout(Some(left()?))?;
    s.set_write_timeout(Some(REQUEST_TIME))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.by_ref().take(8192).read_line(&mut line)?;
    // The headers: read and ignored (bounded), so the client sees its request taken.
    let mut header = String::new();
    let mut count = 64;
    while count > 0 {
        header.clear();
        s.set_read_timeout(Some(left()?))?;
        if r.by_ref().take(8192).read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        count -= 1;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", CONTENT_TYPE, render(daemon)),
        ("GET" | "HEAD", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "ublkd: metrics are at /metrics\n".to_string(),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: metrics are at /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET\n".to_string(),
        ),
    };
    let mut w = s;
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    if method != "HEAD" {
        w.write_all(body.as_bytes())?;
    }
    w.flush()
}

struct Scrape(Arc<Daemon>);

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

type Labels = Vec<(&'static str, String)>;

/// One metric family: its rows, each a label set and a value.
enum Rows {
    Counter(Vec<(Labels, u64)>),
    SecondsCounter(Vec<(Labels, f64)>),
    Gauge(Vec<(Labels, f64)>),
    Histogram(Vec<(Labels, HistogramSnapshot)>),
}

fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    rows: Rows,
) -> Result<(), std::fmt::Error> {
    let ty = match &rows {
        Rows::Counter(_) | Rows::SecondsCounter(_) => MetricType::Counter,
        Rows::Gauge(_) => MetricType::Gauge,
        Rows::Histogram(_) => MetricType::Histogram,
    };
    let mut m = enc.encode_descriptor(name, help, unit.as_ref(), ty)?;
    match rows {
        Rows::Counter(rows) => {
            for (l, v) in rows {
                m.encode_family(&l)?
                    .encode_counter::<Labels, _, f64>(&v, None)?;
            }
        }
        Rows::SecondsCounter(rows) => {
            for (l, v) in rows {
                m.encode_family(&l)?
                    .encode_counter::<Labels, _, f64>(&v, None)?;
            }
        }
        Rows::Gauge(rows) => {
            for (l, v) in rows {
                m.encode_family(&l)?.encode_gauge(&v)?;
            }
        }
        Rows::Histogram(rows) => {
            for (l, h) in rows {
                m.encode_family(&l)?.encode_histogram::<Labels>(
                    h.sum_seconds,
                    h.count,
                    &h.buckets,
                    None,
                )?;
            }
        }
    }
    Ok(())
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// The serde name of a unit enum variant (`"live"`, `"peer_dead"`, ...).
fn snake<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "unknown".into(),
    }
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let d = &self.0;
        let vols = d.list();
        let vol = |v: &crate::volume::VolumeStatus| vec![("volume", v.name.clone())];

        family(
            &mut enc,
            "ublkd_build_info",
            "The ublkd version and the replica protocol it speaks (value 1).",
            None,
            Rows::Gauge(vec![(
                vec![
                    ("version", env!("CARGO_PKG_VERSION").to_string()),
                    (
                        "protocol",
                        wire::ProtocolVersion::CURRENT.number().to_string(),
                    ),
                ],
                1.0,
            )]),
        )?;

        // Volumes.
        family(
            &mut enc,
            "ublkd_volume_state",
            "The volume's state (value 1, the state in the label).",
            None,
            Rows::Gauge(
                vols.iter()
                    .map(|v| {
                        let mut l = vol(v);
                        l.push(("state", snake(&v.state)));
                        (l, 1.0)
                    })
                    .collect(),
            ),
        )?;
        family(
            &mut enc,
            "ublkd_volume_fenced",
            "1 when a newer owner (higher generation) took the volume's replicas: its I/O fails.",
            None,
            Rows::Gauge(
                vols.iter()
                    .map(|v| {
                        (
                            vol(v),
                            flag(v.state == crate::lifecycle::VolumeState::Fenced),
                        )
                    })
                    .collect(),
            ),
        )?;
        family(
            &mut enc,
            "ublkd_volume_generation",
            "The owner generation the volume serves at.",
            None,
            Rows::Gauge(vols.iter().map(|v| (vol(v), v.generation as f64)).collect()),
        )?;
        family(
            &mut enc,
            "ublkd_volume_size",
            "The volume's size.",
            Some(Unit::Bytes),
            Rows::Gauge(vols.iter().map(|v| (vol(v), v.size as f64)).collect()),
        )?;
        let io = |f: fn(&replication::health::IoStatsSnapshot) -> u64| {
            vols.iter().map(move |v| (vol(v), f(&v.io)))
        };
        let mut requests = Vec::new();
        for (op, f) in [
            (
                "read",
                (|s| s.reads) as fn(&replication::health::IoStatsSnapshot) -> u64,
            ),
            ("write", |s| s.writes),
            ("flush", |s| s.flushes),
            ("discard", |s| s.discards),
            ("write_zeroes", |s| s.write_zeroes),
        ] {
            requests.extend(io(f).map(|(mut l, n)| {
                l.push(("op", op.to_string()));
                (l, n)
            }));
        }
        family(
            &mut enc,
            "ublkd_volume_requests",
            "Requests the volume completed, by kind (IOPS: rate() of it).",
            None,
            Rows::Counter(requests),
        )?;
        family(
            &mut enc,
            "ublkd_volume_read",
            "Bytes read from the volume.",
            Some(Unit::Bytes),
            Rows::Counter(io(|s| s.read_bytes).collect()),
        )?;
        family(
            &mut enc,
            "ublkd_volume_written",
            "Bytes written to the volume.",
            Some(Unit::Bytes),
            Rows::Counter(io(|s| s.write_bytes).collect()),
        )?;
        family(
            &mut enc,
            "ublkd_volume_errors",
            "Requests completed with an error to the application.",
            None,
            Rows::Counter(io(|s| s.errors).collect()),
        )?;
        family(
            &mut enc,
            "ublkd_volume_in_flight_requests",
            "Requests taken from the device and not completed yet (the queue depth).",
            None,
            Rows::Gauge(io(|s| s.in_flight).map(|(l, n)| (l, n as f64)).collect()),
        )?;
        let mut latency = Vec::new();
        for sh in d.serving() {
            let name = sh.name();
            for (op, h) in sh.latencies() {
                latency.push((vec![("volume", name.clone()), ("op", op.to_string())], h));
            }
        }
        family(
            &mut enc,
            "ublkd_volume_request_duration",
            "Time from taking a request to completing it, by kind (trim: discard and write zeroes).",
            Some(Unit::Seconds),
            Rows::Histogram(latency),
        )?;

        // Snapshots (as the scheduler's round last listed them: no I/O per scrape).
        let snaps: Vec<_> = vols
            .iter()
            .filter_map(|v| Some((vol(v), v.snapshots.as_ref()?)))
            .collect();
        for (name, help, f) in [
            (
                "ublkd_volume_snapshots",
                "The volume's snapshots (deleted ones being merged back not counted).",
                (|s| s.count as f64) as fn(&crate::volume::SnapshotsStatus) -> f64,
            ),
            (
                "ublkd_volume_snapshots_deleting",
                "Deleted snapshots whose space is still being merged back.",
                |s| s.deleting as f64,
            ),
            (
                "ublkd_volume_snapshots_partial",
                "Snapshots some online replica lacks.",
                |s| s.partial as f64,
            ),
        ] {
            family(
                &mut enc,
                name,
                help,
                None,
                Rows::Gauge(snaps.iter().map(|(l, s)| (l.clone(), f(s))).collect()),
            )?;
        }
        family(
            &mut enc,
            "ublkd_volume_snapshots_owned",
            "What the volume's snapshots own (their own grains, on the replica holding the most).",
            Some(Unit::Bytes),
            Rows::Gauge(
                snaps
                    .iter()
                    .map(|(l, s)| (l.clone(), s.owned_bytes as f64))
                    .collect(),
            ),
        )?;
        family(
            &mut enc,
            "ublkd_volume_snapshot_schedule_failing",
            "1 while the volume's snapshot schedule's last round failed (status says why).",
            None,
            Rows::Gauge(
                vols.iter()
                    .filter_map(|v| Some((vol(v), flag(v.schedule.as_ref()?.error.is_some()))))
                    .collect(),
            ),
        )?;

        // Replicas.
        let rep = |v: &crate::volume::VolumeStatus, r: &crate::volume::ReplicaStatus| {
            vec![("volume", v.name.clone()), ("replica", r.path.clone())]
        };
        let replicas: Vec<_> = vols
            .iter()
            .flat_map(|v| v.replicas.iter().map(move |r| (v, r)))
            .collect();
        family(
            &mut enc,
            "ublkd_replica_state",
            "The replica's state (value 1, the state and a fault's reason in the labels).",
            None,
            Rows::Gauge(
                replicas
                    .iter()
                    .filter(|(_, r)| r.state.is_some())
                    .map(|(v, r)| {
                        let mut l = rep(v, r);
                        l.push(("state", r.state.clone().unwrap_or_default()));
                        l.push((
                            "reason",
                            r.fault.as_ref().map(fault_name).unwrap_or_default(),
                        ));
                        (l, 1.0)
                    })
                    .collect(),
            ),
        )?;
        family(
            &mut enc,
            "ublkd_replica_online",
            "1 when the replica takes every write of its volume.",
            None,
            Rows::Gauge(
                replicas
                    .iter()
                    .map(|(v, r)| (rep(v, r), flag(r.state.as_deref() == Some("online"))))
                    .collect(),
            ),
        )?;
        family(
            &mut enc,
            "ublkd_replica_errors",
            "I/O errors of the replica since the volume started.",
            None,
            Rows::Counter(
                replicas
                    .iter()
                    .map(|(v, r)| (rep(v, r), r.errors))
                    .collect(),
            ),
        )?;
        family(
            &mut enc,
            "ublkd_replica_behind",
            "What the replica lacks: its dirty map's bytes, the whole volume when a full rebuild must fill it.",
            Some(Unit::Bytes),
            Rows::Gauge(
                replicas
                    .iter()
                    .filter(|(_, r)| r.state.is_some())
                    .map(|(v, r)| {
                        let behind = match (r.state.as_deref(), r.missing_bytes) {
                            (Some("online"), _) => 0,
                            (_, Some(m)) => m,
                            _ => v.size,
                        };
                        (rep(v, r), behind as f64)
                    })
                    .collect(),
            ),
        )?;

        // Rebuilds.
        let running: Vec<_> = vols
            .iter()
            .filter_map(|v| Some((v, v.rebuild.as_ref()?)))
            .map(|(v, r)| {
                let l = vec![
                    ("volume", v.name.clone()),
                    ("replica", r.location.clone()),
                    ("work", work_name(&r.work).to_string()),
                ];
                (l, r)
            })
            .collect();
        family(
            &mut enc,
            "ublkd_rebuild_total",
            "Bytes the running rebuild or resync has to copy.",
            Some(Unit::Bytes),
            Rows::Gauge(
                running
                    .iter()
                    .map(|(l, r)| (l.clone(), r.total as f64))
                    .collect(),
            ),
        )?;
        family(
            &mut enc,
            "ublkd_rebuild_done",
            "Bytes the running rebuild or resync has copied.",
            Some(Unit::Bytes),
            Rows::Gauge(
                running
                    .iter()
                    .map(|(l, r)| (l.clone(), r.done as f64))
                    .collect(),
            ),
        )?;
        family(
            &mut enc,
            "ublkd_rebuild_rate",
            "The running rebuild's average speed since it started.",
            Some(Unit::Other("bytes_per_second".into())),
            Rows::Gauge(
                running
                    .iter()
                    .map(|(l, r)| {
                        let secs = r.elapsed_ms.max(1) as f64 / 1000.0;
                        (l.clone(), r.done as f64 / secs)
                    })
                    .collect(),
            ),
        )?;

        // The HA monitor.
        let ha = d.ha().status();
        family(
            &mut enc,
            "ublkd_ha_paused",
            "1 while the HA monitor is paused (no automatic replacements).",
            None,
            Rows::Gauge(vec![(vec![], flag(ha.paused))]),
        )?;
        family(
            &mut enc,
            "ublkd_ha_peer_up",
            "1 when the replica server answers (or its replica connection does), 0 when suspected or dead.",
            None,
            Rows::Gauge(
                ha.peers
                    .iter()
                    .map(|p| {
                        let l = vec![("peer", p.peer.clone()), ("liveness", p.liveness.name().to_string())];
                        (l, flag(p.liveness == ha::peer::Liveness::Alive))
                    })
                    .collect(),
            ),
        )?;
        family(
            &mut enc,
            "ublkd_ha_waiting_replacements",
            "Replicas that need a replacement and wait (ublkctl ha status says why).",
            None,
            Rows::Gauge(vec![(vec![], ha.waiting.len() as f64)]),
        )?;
        family(
            &mut enc,
            "ublkd_ha_events",
            "HA events since the daemon started, by kind (peer_dead, replacement_placed, replica_faulted, ...).",
            None,
            Rows::Counter(
                d.ha()
                    .events
                    .counts()
                    .into_iter()
                    .map(|(k, n)| (vec![("event", k)], n))
                    .collect(),
            ),
        )?;

        // The process (the names Prometheus client libraries use).
        if let Some(p) = ProcessStats::read() {
            family(
                &mut enc,
                "process_cpu",
                "User and system CPU time spent.",
                Some(Unit::Seconds),
                Rows::SecondsCounter(vec![(vec![], p.cpu_seconds)]),
            )?;
            for (name, help, unit, v) in [
                (
                    "process_resident_memory",
                    "Resident memory size.",
                    Some(Unit::Bytes),
                    p.resident_bytes as f64,
                ),
                (
                    "process_virtual_memory",
                    "Virtual memory size.",
                    Some(Unit::Bytes),
                    p.virtual_bytes as f64,
                ),
                (
                    "process_start_time",
                    "Start time of the process since the epoch.",
                    Some(Unit::Seconds),
                    p.start_time_seconds,
                ),
                (
                    "process_open_fds",
                    "Open file descriptors.",
                    None,
                    p.open_fds as f64,
                ),
                (
                    "process_max_fds",
                    "The limit of open file descriptors.",
                    None,
                    p.max_fds as f64,
                ),
                (
                    "process_threads",
                    "Threads of the process.",
                    None,
                    p.threads as f64,
                ),
            ] {
                family(&mut enc, name, help, unit, Rows::Gauge(vec![(vec![], v)]))?;
            }
        }
        Ok(())
    }
}

/// The `snake_case` name of a fault reason (its serde tag, `connection_lost`, ...).
fn fault_name(f: &replication::state::FaultReason) -> String {
    serde_json::to_value(f)
        .ok()
        .and_then(|v| Some(v.get("kind")?.as_str()?.to_string()))
        .unwrap_or_else(|| "unknown".into())
}

fn work_name(w: &replication::rebuild::Work) -> &'static str {
    use replication::rebuild::Work;
    use replication::state::RebuildKind;
    match w {
        Work::Rebuild(RebuildKind::Full) => "full_rebuild",
        Work::Rebuild(RebuildKind::Partial) => "partial_rebuild",
        Work::Resync => "resync",
    }
}

/// What `/proc/self` says of the process.
struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    threads: u64,
    start_time_seconds: f64,
    open_fds: u64,
    max_fds: u64,
}

impl ProcessStats {
    fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command (which may hold spaces), from field 3 on.
        let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let num = |i: usize| f.get(i - 3).and_then(|s| s.parse::<u64>().ok());
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let btime: f64 = boot
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|l| {
                l.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
            })
            .unwrap_or(0);
        Some(ProcessStats {
            cpu_seconds: (num(14)? + num(15)?) as f64 / hz,
            threads: num(20)?,
            start_time_seconds: btime + num(22)? as f64 / hz,
            virtual_bytes: num(23)?,
            resident_bytes: num(24)? * page,
            open_fds: std::fs::read_dir("/proc/self/fd").ok()?.count() as u64,
            max_fds,
        })
    }
}
