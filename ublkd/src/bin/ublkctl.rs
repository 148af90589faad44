//! `ublkctl`: talk to the local ublkd over its control socket.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use ublkd::control::{call, Request};
use ublkd::daemon::Orphan;
use ublkd::volume::VolumeStatus;

#[derive(Parser)]
#[command(version, about = "Control the local ublkd")]
struct Cli {
    /// Control socket (default: the one in --config, else /run/ublkd/ublkd.sock).
    #[arg(long, env = "UBLKD_SOCKET", global = true)]
    socket: Option<PathBuf>,
    /// Take the socket path from this ublkd config file.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[arg(long, short, value_enum, default_value_t = Output::Text, global = true)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Volumes with their devices and states.
    List,
    /// One volume: replicas, their health, I/O counters.
    Status { volume: String },
    /// Stop a volume: drain I/O and remove its device.
    Stop {
        volume: String,
        /// Stop even if the device is in use (a mounted filesystem will see I/O errors).
        #[arg(long)]
        force: bool,
    },
    /// (Re)start configured volumes that are not serving: all, or the one named.
    Recover { volume: Option<String> },
    /// ublk devices no configured volume owns.
    Orphans {
        /// Delete them.
        #[arg(long)]
        remove: bool,
    },
    /// The replica server of this node: connections, limits.
    Server,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("ublkctl: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let socket = match (&cli.socket, &cli.config) {
        (Some(s), _) => s.clone(),
        (None, Some(c)) => ublkd::config::Config::from_file(c)?.node.control_socket,
        (None, None) => PathBuf::from(ublkd::config::DEFAULT_CONTROL_SOCKET),
    };
    let req = match &cli.cmd {
        Cmd::List => Request::List,
        Cmd::Status { volume } => Request::Status {
            volume: volume.clone(),
        },
        Cmd::Stop { volume, force } => Request::Stop {
            volume: volume.clone(),
            force: *force,
        },
        Cmd::Recover { volume } => Request::Recover {
            volume: volume.clone(),
        },
        Cmd::Orphans { remove } => Request::Orphans { remove: *remove },
        Cmd::Server => Request::Server,
    };
    let v = call(&socket, &req)?;
    if cli.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    match cli.cmd {
        Cmd::List => {
            let vols: Vec<VolumeStatus> = serde_json::from_value(v).context("decode list")?;
            println!(
                "{:<16} {:<11} {:<14} {:>10} {:>8}",
                "NAME", "STATE", "DEVICE", "SIZE", "REPLICAS"
            );
            for s in vols {
                let online = s
                    .replicas
                    .iter()
                    .filter(|r| r.state.as_deref() == Some("online"))
                    .count();
                println!(
                    "{:<16} {:<11} {:<14} {:>10} {:>8}",
                    s.name,
                    state_name(&s),
                    s.device.as_deref().unwrap_or("-"),
                    human(s.size),
                    format!("{online}/{}", s.replicas.len())
                );
            }
        }
        Cmd::Status { .. } | Cmd::Stop { .. } => {
            let s: VolumeStatus = serde_json::from_value(v).context("decode status")?;
            print_status(&s);
        }
        Cmd::Recover { .. } => {
            let names: Vec<String> = serde_json::from_value(v)?;
            if names.is_empty() {
                println!("every volume is already serving");
            }
            for n in names {
                println!("starting {n}");
            }
        }
        Cmd::Orphans { remove: false } => {
            let orphans: Vec<Orphan> = serde_json::from_value(v)?;
            if orphans.is_empty() {
                println!("no orphan ublk devices");
            }
            for o in orphans {
                println!(
                    "/dev/ublkb{}  state {}  pid {}  {}",
                    o.device_id,
                    o.state,
                    o.pid,
                    if o.made_by_ublkd {
                        "made by ublkd"
                    } else {
                        "foreign"
                    }
                );
            }
        }
        Cmd::Orphans { remove: true } => {
            let ids: Vec<u32> = serde_json::from_value(v)?;
            println!("removed {} orphan device(s) {ids:?}", ids.len());
        }
        Cmd::Server => {
            let st: replica_server::ServerStatus = serde_json::from_value(v)?;
            println!(
                "replica server {}  storage {}",
                st.listen.as_deref().unwrap_or("(not listening)"),
                st.storage_dir
            );
            println!(
                "  connections {}/{} (sessions {})  handshaking {}/{}",
                st.connections, st.max_connections, st.sessions, st.handshaking, st.max_handshakes
            );
            println!(
                "  since start: accepted {}  auth failed {}  handshakes evicted {}  refused over the limit {}  closed unopened {}",
                st.accepted_total,
                st.auth_failed_total,
                st.handshakes_evicted_total,
                st.connections_refused_total,
                st.unopened_closed_total
            );
        }
    }
    Ok(())
}

fn state_name(s: &VolumeStatus) -> String {
    serde_json::to_value(s.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn kind_name(k: replication::state::RebuildKind) -> &'static str {
    match k {
        replication::state::RebuildKind::Partial => "partial",
        replication::state::RebuildKind::Full => "full",
    }
}

fn print_status(s: &VolumeStatus) {
    println!(
        "volume {}: {}  {}  {}  block size {}  queues {}  depth {}  generation {}",
        s.name,
        state_name(s),
        s.device.as_deref().unwrap_or("(no device)"),
        human(s.size),
        s.block_size,
        s.queues,
        s.depth,
        s.generation
    );
    if let Some(r) = &s.reason {
        println!("  reason: {r}");
    }
    if s.read_policy == Some(replication::health::ReadPolicy::Primary) {
        println!("  reads: pinned to the first online replica (unclean shutdown; until a resync)");
    }
    if let Some(e) = s.membership_epoch {
        println!("  membership epoch {e}");
    }
    for r in &s.replicas {
        println!(
            "  replica #{} {:<40} {:<10} errors {}{}",
            r.index,
            r.path,
            r.state.as_deref().unwrap_or("unknown"),
            r.errors,
            r.reason
                .as_deref()
                .map(|x| format!("  ({x})"))
                .unwrap_or_default()
        );
    }
    if let Some(b) = &s.rebuild {
        let secs = (b.elapsed_ms as f64 / 1000.0).max(0.001);
        let rate = b.done as f64 / secs;
        let eta = if rate > 0.0 {
            format!("{:.0} s", b.total.saturating_sub(b.done) as f64 / rate)
        } else {
            "-".into()
        };
        let what = match (b.work, b.slot) {
            (replication::rebuild::Work::Rebuild(kind), Some(slot)) => {
                format!(
                    "{} rebuild of replica #{} {}",
                    kind_name(kind),
                    slot.0,
                    b.location
                )
            }
            _ => format!("resync of the {} after an unclean shutdown", b.location),
        };
        println!(
            "  {what}: {} of {} ({:.0}%), {}/s, ETA {eta}",
            human(b.done),
            human(b.total),
            100.0 * b.done as f64 / b.total.max(1) as f64,
            human(rate as u64),
        );
    }
    let io = &s.io;
    println!(
        "  io: reads {} ({}) writes {} ({}) flushes {} discards {} write_zeroes {} errors {}",
        io.reads,
        human(io.read_bytes),
        io.writes,
        human(io.write_bytes),
        io.flushes,
        io.discards,
        io.write_zeroes,
        io.errors
    );
}

fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
