//! `ublkctl`: talk to the local ublkd over its control socket.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use replication::rebuild::{Ended, HistoryEntry, Work};
use ublkd::control::{call, HaAction, RebuildAction, Request, SnapshotCmd};
use ublkd::daemon::Orphan;
use ublkd::volume::VolumeStatus;

#[derive(Parser)]
#[command(
    name = "ublkctl",
    version,
    about = "Control the local ublkd",
    after_help = "\
Examples:
  ublkctl list
  ublkctl status vol0 -o json          # replica states as JSON (errors too, with -o json)
  ublkctl rebuild watch vol0           # follow a rebuild or resync to its end
  ublkctl verify vol0 --repair         # compare the replicas, rewrite what differs
  ublkctl replica replace vol0 '#2' --to 10.0.0.4:7450
  ublkctl completions bash > /etc/bash_completion.d/ublkctl

Exit status: 0 done; 1 done, but the answer says something is wrong (replicas
differ, a change not applied, a replica not reclaimed, a rebuild that did not
finish); 2 usage error; 3 ublkd refused the request; 4 no ublkd answered on the
control socket; 5 any other error on this side."
)]
struct Cli {
    /// Control socket (default: the one in --config, else /run/ublkd/ublkd.sock).
    #[arg(long, env = "UBLKD_SOCKET", global = true)]
    socket: Option<PathBuf>,
    /// Take the socket path from this ublkd config file.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// text for people; json for scripts: the daemon's answer, and errors as
    /// {"error": {"kind", "message", "exit_code"}} on stdout.
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
    /// Print the completion script for SHELL, e.g.
    /// `ublkctl completions bash > /etc/bash_completion.d/ublkctl`.
    Completions { shell: clap_complete::Shell },
    /// Write the man pages into DIR (for packaging).
    #[command(hide = true)]
    Man { dir: PathBuf },
    /// One volume: replicas, their health, I/O counters.
    Status {
        /// The volume (its name in the config; `ublkctl list` shows them).
        volume: String,
    },
    /// Stop a volume: drain I/O and remove its device.
    Stop {
        /// The volume to stop (see `ublkctl list`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        volume: Option<String>,
        /// Every volume whose device is up (the package's removal does this: a device
        /// whose daemon is gone for good would hold its I/O forever). A device in use
        /// is refused (exit 3) unless --force; the others are stopped all the same.
        #[arg(long)]
        all: bool,
        /// Stop even if the device is in use (a mounted filesystem will see I/O errors).
        #[arg(long)]
        force: bool,
    },
    /// (Re)start configured volumes that are not serving: all, or the one named.
    Recover {
        /// The volume to start (all that are not serving without it).
        volume: Option<String>,
        /// Start VOLUME even though another owner took it over since this node ran
        /// it (it is fenced until then): that owner is fenced in turn. Only when it
        /// is gone for good; writes it acknowledged that no replica in reach holds
        /// are lost.
        #[arg(long, requires = "volume")]
        force_takeover: bool,
    },
    /// ublk devices no configured volume owns.
    Orphans {
        /// Delete them.
        #[arg(long)]
        remove: bool,
    },
    /// The replica server of this node: connections, limits.
    Server,
    /// Change what the daemon logs until it restarts: error, warn, info, debug,
    /// trace, or RUST_LOG-style directives, e.g. `info,replication=debug`.
    LogLevel {
        /// A level (error, warn, info, debug, trace) or directives, `info,replication=debug`.
        filter: String,
    },
    /// Re-read the daemon's config file and apply what changed (as SIGHUP does):
    /// volumes and replicas added, removed or replaced, [rebuild] limits. A size or
    /// block size change, or [node]/[server] changes, are refused: nothing changes.
    Reload,
    /// The configuration the daemon runs with (what it read at its start and its
    /// reloads), every default filled in; sizes and rates in bytes, times in ms or s
    /// as the key names say. `-o json` for scripts.
    Config,
    /// Compare the online replicas region by region by checksum (computed where the
    /// data is) while the volume is in use; exit status 1 if any region differs.
    Verify {
        /// The volume (its name in the config; `ublkctl list` shows them).
        volume: String,
        /// Rewrite differing regions from the replica a majority agrees with (with no
        /// majority, e.g. two replicas, the read-preferred one).
        #[arg(long)]
        repair: bool,
        /// With --repair: copy from this replica instead (its location or #N, as
        /// `status` shows it), when you know which one is right.
        #[arg(long, value_name = "REPLICA", requires = "repair")]
        from: Option<String>,
    },
    /// Rebuilds of a volume's replicas: start, cancel, watch, history.
    Rebuild {
        #[command(subcommand)]
        cmd: RebuildCmd,
    },
    /// What the HA monitor saw and decided (servers suspected, dead, back;
    /// replacements placed, online, dropped), oldest first.
    Events {
        /// Keep printing new events as they come (Ctrl-C ends).
        #[arg(long, short)]
        follow: bool,
    },
    /// The HA monitor: its view of the servers, or stop and resume its decisions.
    Ha {
        #[command(subcommand)]
        cmd: HaCmd,
    },
    /// One replica of a volume: replace it now, or make the config match.
    Replica {
        #[command(subcommand)]
        cmd: ReplicaCmd,
    },
    /// Snapshots of a volume: crash-consistent across its replicas, taken in
    /// milliseconds whatever the size.
    Snapshot {
        #[command(subcommand)]
        cmd: SnapshotCli,
    },
}

#[derive(Subcommand)]
enum SnapshotCli {
    /// Take a snapshot: every write acknowledged before it is in it, none after,
    /// on every replica (all must be online).
    Create {
        /// The volume (its name in the config; `ublkctl list` shows them).
        volume: String,
        /// The snapshot's name: 1 to 64 letters, digits, '-', '_' or '.'.
        name: String,
        /// Freeze the filesystem mounted from the device around it (FIFREEZE), so
        /// the snapshot is clean, not only crash-consistent; it is always thawed.
        #[arg(long)]
        freeze: bool,
    },
    /// The volume's snapshots: name, uuid, creation, space, replicas holding them.
    List {
        /// The volume (its name in the config; `ublkctl list` shows them).
        volume: String,
    },
    /// Delete a snapshot: hidden at once, its space merged back in the background.
    Delete {
        /// The volume (its name in the config; `ublkctl list` shows them).
        volume: String,
        /// The snapshot: its name or uuid.
        snapshot: String,
    },
    /// Roll the volume back to a snapshot. The device must not be in use: unmount
    /// it first. Later snapshots are kept; what was written since is gone.
    Revert {
        /// The volume (its name in the config; `ublkctl list` shows them).
        volume: String,
        /// The snapshot: its name or uuid.
        snapshot: String,
    },
    /// Write a snapshot to an image file on this node, while the volume runs:
    /// raw (sparse) or qcow2, whole, or with --since only what changed since an
    /// older snapshot (a qcow2 over that one's export). qemu and `qemu-img` read
    /// both formats; a progress bar on a terminal.
    Export {
        /// The volume (its name in the config; `ublkctl list` shows them).
        volume: String,
        /// The snapshot: its name or uuid.
        snapshot: String,
        /// The image file to create (it must not exist, unless --force).
        file: PathBuf,
        #[arg(long, value_enum, default_value = "raw")]
        format: ublkd::control::ExportFormat,
        /// Only what changed since this older snapshot (qcow2 only).
        #[arg(long, requires = "backing_file")]
        since: Option<String>,
        /// With --since: the older snapshot's qcow2 export, as qemu should open
        /// it (relative to FILE, or absolute).
        #[arg(long, requires = "since")]
        backing_file: Option<String>,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum HaCmd {
    /// Each server's liveness and space; replicas waiting for a replacement, and why.
    Status,
    /// Stop automatic replacements (persisted across restarts); manual ones still work.
    Pause,
    /// Resume automatic replacements.
    Resume,
    /// A server's planned downtime (a reboot, a disk swap): its replicas are not
    /// replaced while it is away, only caught up (a partial rebuild) when it is back.
    Maintenance {
        #[command(subcommand)]
        cmd: MaintenanceCmd,
    },
}

#[derive(Subcommand)]
enum MaintenanceCmd {
    /// Start it, e.g. `ublkctl ha maintenance start 10.0.0.2:7450 --for 30m`.
    Start {
        /// The replica server, as the volumes name it (HOST:PORT).
        server: String,
        /// How long at most (90s, 30m, 2h, 1d); without it, until `maintenance end`.
        /// Past the partial-rebuild window (`partial_window_s`), its replicas get full
        /// rebuilds instead.
        #[arg(long = "for", value_parser = parse_duration_ms)]
        for_ms: Option<u64>,
    },
    /// End it: from now on the server's replicas are replaced if it stays dead.
    End {
        /// The replica server (HOST:PORT).
        server: String,
    },
}

/// "90s", "30m", "2h", "1d" (or plain seconds) in milliseconds, not zero.
fn parse_duration_ms(s: &str) -> Result<u64, String> {
    match ublkd::config::parse_duration_ms(s)? {
        0 => {
            Err("a maintenance of 0 s ends at once: leave --for out to keep it until ended".into())
        }
        ms => Ok(ms),
    }
}

#[derive(Subcommand)]
enum ReplicaCmd {
    /// Replace REPLICA (its location or #index) by a new replica, on --to or on a
    /// spare the placement rule picks, filled by a full rebuild while I/O goes on;
    /// the old one is dropped once the new one is online.
    Replace {
        /// The volume (its name in the config; `ublkctl list` shows them).
        volume: String,
        /// The replica: its path, id@host:port, or #index as `ublkctl status` shows it.
        replica: String,
        /// The replica server to put the new replica on (else a spare the placement
        /// rule picks).
        #[arg(long, value_name = "HOST:PORT")]
        to: Option<String>,
    },
    /// Delete the storage of the volume's retired replicas (replaced, removed by a
    /// reload, or half-built replacements), or only REPLICA's. Each is checked to
    /// be the very copy that was retired; one out of reach stays retired (retry).
    Reclaim {
        /// The volume (its name in the config; `ublkctl list` shows them).
        volume: String,
        /// Only this retired replica (its location as `ublkctl status` lists it under
        /// retired); all of them without it.
        replica: Option<String>,
    },
    /// Print the `replicas = [...]` line that makes the config name what runs
    /// (the HA monitor's replacements): put it in the config, then `ublkctl reload`.
    /// ublkd never edits the config itself.
    Accept {
        /// The volume (its name in the config; `ublkctl list` shows them).
        volume: String,
    },
}

#[derive(Subcommand)]
enum RebuildCmd {
    /// Rebuild a faulted replica now (partial when its dirty map allows, else full),
    /// whatever its fault or backoff. REPLICA: its path, id@host:port, or #index.
    Start {
        /// The volume (its name in the config; `ublkctl list` shows them).
        volume: String,
        /// The replica: its path, id@host:port, or #index as `ublkctl status` shows it.
        replica: String,
        /// Copy every region, not only those its dirty map marks.
        #[arg(long)]
        full: bool,
    },
    /// Cancel the rebuild running (it keeps what it lacks and is not restarted
    /// until `rebuild start`).
    Cancel {
        /// The volume (its name in the config; `ublkctl list` shows them).
        volume: String,
        /// Only if the running rebuild is this replica's.
        replica: Option<String>,
    },
    /// Follow the rebuild in progress until it ends: a progress bar on a terminal,
    /// a line every 2 s otherwise (one JSON object per line with --output json).
    Watch {
        /// The volume (its name in the config; `ublkctl list` shows them).
        volume: String,
    },
    /// Finished rebuilds and resyncs: when, what, how many bytes, how it ended.
    History {
        /// The volume (its name in the config; `ublkctl list` shows them).
        volume: String,
    },
}

/// Exit status: the command was done, but its answer says something is wrong
/// (replicas differ, a change not applied, a replica not reclaimed, a rebuild that
/// did not finish). 0 is success; 2 a usage error (clap's).
const EXIT_NOT_OK: i32 = 1;
/// The daemon refused the request (no such volume, not serving, not allowed).
const EXIT_REFUSED: i32 = 3;
/// No daemon answered on the control socket.
const EXIT_UNREACHABLE: i32 = 4;
/// Anything else on this side (a config file that cannot be read, ...).
const EXIT_LOCAL: i32 = 5;

fn main() {
    let cmd = Cli::command().long_version(ublkd::clidocs::long_version());
    let cli = Cli::from_arg_matches(&cmd.get_matches()).unwrap_or_else(|e| e.exit());
    let output = cli.output;
    if let Err(e) = run(cli) {
        let (code, kind) = match e.downcast_ref::<ublkd::error::DaemonError>() {
            Some(ublkd::error::DaemonError::Refused(_)) => (EXIT_REFUSED, "refused"),
            Some(ublkd::error::DaemonError::Control { .. }) => (EXIT_UNREACHABLE, "unreachable"),
            _ => (EXIT_LOCAL, "local"),
        };
        if output == Output::Json {
            let err = serde_json::json!({
                "error": { "kind": kind, "message": format!("{e:#}"), "exit_code": code }
            });
            println!("{err}");
        } else {
            eprintln!("ublkctl: error: {e:#}");
        }
        std::process::exit(code);
    }
}

fn run(cli: Cli) -> Result<()> {
    let socket = match (&cli.socket, &cli.config) {
        (Some(s), _) => s.clone(),
        (None, Some(c)) => ublkd::config::Config::from_file(c)?.node.control_socket,
        (None, None) => PathBuf::from(ublkd::config::DEFAULT_CONTROL_SOCKET),
    };
    let req = match &cli.cmd {
        Cmd::Completions { shell } => {
            ublkd::clidocs::completions(Cli::command(), *shell);
            return Ok(());
        }
        Cmd::Man { dir } => {
            return ublkd::clidocs::write_man(Cli::command(), dir)
                .map(drop)
                .with_context(|| format!("write man pages into {}", dir.display()));
        }
        Cmd::Events { follow } => return events(&socket, *follow, cli.output),
        Cmd::Replica {
            cmd: ReplicaCmd::Accept { volume },
        } => return accept(&socket, volume, cli.output),
        Cmd::Ha { cmd } => Request::Ha {
            action: match cmd {
                HaCmd::Status => HaAction::Status,
                HaCmd::Pause => HaAction::Pause,
                HaCmd::Resume => HaAction::Resume,
                HaCmd::Maintenance {
                    cmd: MaintenanceCmd::Start { server, for_ms },
                } => HaAction::MaintenanceStart {
                    server: server.clone(),
                    for_ms: *for_ms,
                },
                HaCmd::Maintenance {
                    cmd: MaintenanceCmd::End { server },
                } => HaAction::MaintenanceEnd {
                    server: server.clone(),
                },
            },
        },
        Cmd::Replica {
            cmd: ReplicaCmd::Reclaim { volume, replica },
        } => Request::ReplicaReclaim {
            volume: volume.clone(),
            replica: replica.clone(),
        },
        Cmd::Replica {
            cmd:
                ReplicaCmd::Replace {
                    volume,
                    replica,
                    to,
                },
        } => Request::ReplicaReplace {
            volume: volume.clone(),
            replica: replica.clone(),
            to: to.clone(),
        },
        Cmd::Snapshot { cmd } => {
            let (volume, action) = match cmd {
                SnapshotCli::Create {
                    volume,
                    name,
                    freeze,
                } => (
                    volume,
                    SnapshotCmd::Create {
                        name: name.clone(),
                        freeze: *freeze,
                    },
                ),
                SnapshotCli::List { volume } => (volume, SnapshotCmd::List),
                SnapshotCli::Delete { volume, snapshot } => (
                    volume,
                    SnapshotCmd::Delete {
                        snapshot: snapshot.clone(),
                    },
                ),
                SnapshotCli::Revert { volume, snapshot } => (
                    volume,
                    SnapshotCmd::Revert {
                        snapshot: snapshot.clone(),
                    },
                ),
                SnapshotCli::Export {
                    volume,
                    snapshot,
                    file,
                    format,
                    since,
                    backing_file,
                    force,
                } => {
                    // The daemon opens it in our mount namespace: absolute here.
                    let path = std::path::absolute(file)
                        .with_context(|| format!("the path {}", file.display()))?;
                    let action = SnapshotCmd::Export {
                        snapshot: snapshot.clone(),
                        path: path.to_string_lossy().into_owned(),
                        format: *format,
                        since: since.clone(),
                        backing_file: backing_file.clone(),
                        force: *force,
                    };
                    let req = Request::Snapshot {
                        volume: volume.clone(),
                        action,
                    };
                    return export(&socket, volume, &req, cli.output);
                }
            };
            Request::Snapshot {
                volume: volume.clone(),
                action,
            }
        }
        Cmd::List => Request::List,
        Cmd::Status { volume } => Request::Status {
            volume: volume.clone(),
        },
        Cmd::Stop {
            volume: None,
            force,
            ..
        } => return stop_all(&socket, *force, cli.output),
        Cmd::Stop {
            volume: Some(volume),
            force,
            ..
        } => Request::Stop {
            volume: volume.clone(),
            force: *force,
        },
        Cmd::Recover {
            volume,
            force_takeover,
        } => Request::Recover {
            force_takeover: *force_takeover,
            volume: volume.clone(),
        },
        Cmd::Orphans { remove } => Request::Orphans { remove: *remove },
        Cmd::Server => Request::Server,
        Cmd::LogLevel { filter } => Request::LogLevel {
            filter: filter.clone(),
        },
        Cmd::Reload => Request::Reload,
        Cmd::Config => Request::Config,
        Cmd::Verify {
            volume,
            repair,
            from,
        } => Request::Verify {
            volume: volume.clone(),
            repair: *repair,
            from: from.clone(),
        },
        Cmd::Rebuild {
            cmd: RebuildCmd::Watch { volume },
        } => return watch(&socket, volume, cli.output),
        Cmd::Rebuild { cmd } => {
            let (volume, action) = match cmd {
                RebuildCmd::Start {
                    volume,
                    replica,
                    full,
                } => (
                    volume,
                    RebuildAction::Start {
                        replica: replica.clone(),
                        full: *full,
                    },
                ),
                RebuildCmd::Cancel { volume, replica } => (
                    volume,
                    RebuildAction::Cancel {
                        replica: replica.clone(),
                    },
                ),
                RebuildCmd::History { volume } => (volume, RebuildAction::History),
                RebuildCmd::Watch { .. } => unreachable!("handled above"),
            };
            Request::Rebuild {
                volume: volume.clone(),
                action,
            }
        }
    };
    let v = call(&socket, &req)?;
    if let Cmd::Verify { .. } = cli.cmd {
        let r: replication::verify::Report = serde_json::from_value(v.clone())?;
        if cli.output == Output::Json {
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            print_verify(&r);
        }
        if !r.clean() {
            std::process::exit(EXIT_NOT_OK);
        }
        return Ok(());
    }
    // Done, but not everything was: the same exit status in text and JSON.
    let not_ok = match &cli.cmd {
        Cmd::Reload => v["failed"].as_array().is_some_and(|f| !f.is_empty()),
        Cmd::Replica {
            cmd: ReplicaCmd::Reclaim { .. },
        } => v["reclaimed"]
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e.get("error").is_some())),
        _ => false,
    };
    if cli.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_answer(cli.cmd, v)?;
    }
    if not_ok {
        std::process::exit(EXIT_NOT_OK);
    }
    Ok(())
}

/// A snapshot command's answer, for people.
fn print_snapshot(cmd: SnapshotCli, v: serde_json::Value) -> Result<()> {
    match cmd {
        SnapshotCli::Create { volume, name, .. } => {
            let already = v["already"].as_bool().unwrap_or(false);
            println!(
                "snapshot {name} of {volume}{} ({}) on {} replica(s); writes held {:.1} ms",
                if already { " was already taken" } else { " taken" },
                v["uuid"].as_str().unwrap_or("?"),
                v["replicas"],
                v["paused_us"].as_u64().unwrap_or(0) as f64 / 1000.0
            );
        }
        SnapshotCli::List { volume } => {
            let list = v.as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("{volume} has no snapshot");
                return Ok(());
            }
            println!(
                "{:<20} {:<36} {:<20} {:>10} {:>12}  REPLICAS",
                "NAME", "UUID", "CREATED (UTC)", "OWNED", "RECLAIMABLE"
            );
            for s in list {
                let on = s["on"].as_array().map_or(0, |a| a.len());
                let missing = s["missing"].as_array().map_or(0, |a| a.len());
                let mut state = format!("{on}/{}", on + missing);
                if s["deleting"].as_bool() == Some(true) {
                    state.push_str(" (deleting)");
                }
                println!(
                    "{:<20} {:<36} {:<20} {:>10} {:>12}  {state}",
                    s["name"].as_str().unwrap_or("?"),
                    s["uuid"].as_str().unwrap_or("?"),
                    utc(s["created_ms"].as_u64().unwrap_or(0)),
                    human(s["owned_bytes"].as_u64().unwrap_or(0)),
                    human(s["reclaimable_bytes"].as_u64().unwrap_or(0)),
                );
            }
        }
        SnapshotCli::Delete { volume, .. } => println!(
            "deleted snapshot {} of {volume} on {} replica(s); its space comes back in the background",
            v["name"].as_str().unwrap_or("?"),
            v["replicas"]
        ),
        SnapshotCli::Revert { volume, .. } => println!(
            "{volume} reverted to snapshot {}; later snapshots are kept",
            v["name"].as_str().unwrap_or("?")
        ),
        SnapshotCli::Export { .. } => unreachable!("handled by export()"),
    }
    Ok(())
}

/// `snapshot export`: the request on a thread, the volume's status polled for a
/// progress bar meanwhile (on a terminal).
fn export(socket: &std::path::Path, volume: &str, req: &Request, output: Output) -> Result<()> {
    use std::io::IsTerminal;
    let (sock, r) = (socket.to_path_buf(), req.clone());
    let job = std::thread::spawn(move || call(&sock, &r));
    let tty = std::io::stdout().is_terminal() && output == Output::Text;
    let mut bar: Option<indicatif::ProgressBar> = None;
    while !job.is_finished() {
        std::thread::sleep(std::time::Duration::from_millis(200));
        if !tty {
            continue;
        }
        let status = call(
            socket,
            &Request::Status {
                volume: volume.to_string(),
            },
        )
        .ok()
        .and_then(|v| serde_json::from_value::<VolumeStatus>(v).ok());
        if let Some(e) = status.and_then(|s| s.export) {
            let b = bar.get_or_insert_with(|| {
                let b = indicatif::ProgressBar::new(e.total);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                b.set_message(format!("export {}", e.snapshot));
                b
            });
            b.set_length(e.total);
            b.set_position(e.done);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let v = job.join().expect("the export thread")?;
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let (read, written, ms) = (
        v["bytes_read"].as_u64().unwrap_or(0),
        v["bytes_written"].as_u64().unwrap_or(0),
        v["millis"].as_u64().unwrap_or(0).max(1),
    );
    println!(
        "exported snapshot {} of {volume} ({}) to {}: {} read from {}, {} of data written, in {:.1} s ({}/s)",
        v["snapshot"].as_str().unwrap_or("?"),
        human(v["size"].as_u64().unwrap_or(0)),
        v["path"].as_str().unwrap_or("?"),
        human(read),
        v["replica"].as_str().unwrap_or("?"),
        human(written),
        ms as f64 / 1000.0,
        human(read * 1000 / ms)
    );
    Ok(())
}

/// An answer of the daemon, for people.
fn print_answer(cmd: Cmd, v: serde_json::Value) -> Result<()> {
    match cmd {
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
        Cmd::Rebuild { cmd } => match cmd {
            RebuildCmd::Start {
                volume, replica, ..
            } => {
                println!("rebuild of {replica} requested on {volume}: follow it with `ublkctl rebuild watch {volume}`");
            }
            RebuildCmd::Cancel { volume, .. } => {
                let slot: Option<replication::SlotIndex> = serde_json::from_value(v)?;
                match slot {
                    Some(s) => println!(
                        "cancelled the rebuild of replica #{} of {volume}; `ublkctl rebuild start {volume} #{}` resumes it",
                        s.0, s.0
                    ),
                    None => println!("no rebuild of {volume} matched: nothing cancelled"),
                }
            }
            RebuildCmd::History { .. } => {
                let h: Vec<HistoryEntry> = serde_json::from_value(v)?;
                if h.is_empty() {
                    println!("no rebuild has run");
                }
                println!(
                    "{:<20} {:>8} {:<8} {:<8} {:>10}  {:<28} OUTCOME",
                    "STARTED (UTC)", "SECONDS", "KIND", "BY", "BYTES", "REPLICA"
                );
                for e in h {
                    let (bytes, mut outcome) = match &e.ended {
                        Ended::Done { bytes } => (*bytes, "done".to_string()),
                        Ended::Stopped { bytes, reason } => (*bytes, format!("stopped: {reason}")),
                        Ended::NotStarted { error } => (0, format!("not started: {error}")),
                    };
                    if let Some(why) = &e.full_why {
                        outcome = format!("{outcome} (full: {why})");
                    }
                    println!(
                        "{:<20} {:>8.1} {:<8} {:<8} {:>10}  {:<28} {outcome}",
                        utc(e.started_unix_ms),
                        e.ended_unix_ms.saturating_sub(e.started_unix_ms) as f64 / 1000.0,
                        work_name(e.work),
                        format!("{:?}", e.trigger).to_lowercase(),
                        human(bytes),
                        e.location,
                    );
                }
            }
            RebuildCmd::Watch { .. } => unreachable!("handled above"),
        },
        Cmd::Verify { .. } => unreachable!("handled above"),
        Cmd::Snapshot { cmd } => print_snapshot(cmd, v)?,
        Cmd::Events { .. }
        | Cmd::Completions { .. }
        | Cmd::Man { .. }
        | Cmd::Replica {
            cmd: ReplicaCmd::Accept { .. },
        } => {
            unreachable!("handled above")
        }
        Cmd::Ha { .. } => {
            let st: ublkd::ha::HaStatus = serde_json::from_value(v)?;
            println!(
                "HA monitor: {}",
                if st.paused {
                    "paused (ublkctl ha resume)"
                } else {
                    "deciding"
                }
            );
            for p in &st.peers {
                let space = p
                    .capacity
                    .map(|c| format!("  {} free of {}", human(c.free_bytes), human(c.total_bytes)))
                    .unwrap_or_default();
                let why = match &p.liveness {
                    ha::peer::Liveness::Alive => String::new(),
                    ha::peer::Liveness::Suspected { why, .. }
                    | ha::peer::Liveness::Dead { why, .. } => {
                        format!("  ({why})")
                    }
                };
                println!(
                    "  server {:<24} {:<10}{why}{space}",
                    p.peer,
                    p.liveness.name()
                );
            }
            for m in &st.maintenance {
                let until = match m.until {
                    Some(t) => {
                        let left = t.saturating_sub(replication::dirty_file::unix_ms()) / 1000;
                        format!("for {left} s more")
                    }
                    None => "until `ublkctl ha maintenance end`".to_string(),
                };
                println!("  server {:<24} in maintenance {until}", m.peer);
            }
            for w in &st.waiting {
                println!(
                    "  {} {}: needs a replacement ({}) but waits: {}",
                    w.volume, w.replica, w.reason, w.waiting
                );
            }
        }
        Cmd::Replica {
            cmd: ReplicaCmd::Replace { volume, .. },
        } => {
            println!(
                "{} is being replaced by {} on {}: `ublkctl rebuild watch {volume}` follows its rebuild",
                v["old"].as_str().unwrap_or("?"),
                v["new"].as_str().unwrap_or("?"),
                v["to"].as_str().unwrap_or("?")
            );
        }
        Cmd::Replica {
            cmd: ReplicaCmd::Reclaim { .. },
        } => {
            for e in v["reclaimed"].as_array().into_iter().flatten() {
                let r: ublkd::state::Retired = serde_json::from_value(e["retired"].clone())?;
                let what = match (e.get("result"), e.get("error")) {
                    (Some(res), _) => {
                        let res: ublkd::volume::activate::Reclaimed =
                            serde_json::from_value(res.clone())?;
                        use ublkd::volume::activate::Reclaimed::*;
                        match res {
                            Deleted { freed_bytes } => format!("deleted, {} freed", human(freed_bytes)),
                            LabelWiped => "label wiped (a device: its data stays, nothing takes it for a replica)".into(),
                            AlreadyGone => "already gone".into(),
                            NotOurs { holds } => format!("left alone, it holds something else now: {holds}"),
                        }
                    }
                    (None, Some(err)) => {
                        format!(
                            "NOT RECLAIMED: {}; it stays retired, run this again once it is reachable",
                            err.as_str().unwrap_or("?")
                        )
                    }
                    (None, None) => "?".into(),
                };
                println!("{} ({}): {what}", r.location, r.why);
            }
        }
        Cmd::Config => {
            let file = v["file"].as_str().unwrap_or("(given in-process)");
            println!("# The configuration ublkd runs with (from {file}), every default filled in.");
            println!("# Sizes and rates in bytes; `ublkctl config -o json` for scripts.");
            let text = toml::to_string(&v["config"]).context("render the config as TOML")?;
            print!("{text}");
        }
        Cmd::Reload => {
            let r: ublkd::daemon::ReloadReport = serde_json::from_value(v)?;
            if r.applied.is_empty() && r.failed.is_empty() {
                println!("nothing changed");
            }
            for c in &r.applied {
                println!("{c}");
            }
            for (c, e) in &r.failed {
                println!("NOT APPLIED: {c}: {e}");
            }
        }
        Cmd::LogLevel { .. } => {
            println!(
                "log filter now {} (until ublkd restarts; then the config's log_level)",
                v.as_str().unwrap_or("?")
            );
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

/// `ublkctl events [--follow]`.
fn events(socket: &std::path::Path, follow: bool, output: Output) -> Result<()> {
    let mut since = None;
    loop {
        let v = call(socket, &Request::Events { since })?;
        let list: Vec<ublkd::ha::Logged> = serde_json::from_value(v)?;
        for l in &list {
            match output {
                Output::Json => println!("{}", serde_json::to_string(l)?),
                Output::Text => println!("{} #{} {}", utc(l.event.at.0), l.seq, l.event),
            }
            since = Some(l.seq);
        }
        if !follow {
            if list.is_empty() && output == Output::Text {
                println!("no events");
            }
            return Ok(());
        }
        since = since.or(Some(0));
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// `ublkctl replica accept VOL`: the config line naming what runs.
/// `stop --all`: every volume whose device is up, one after the other; if any was
/// refused (in use), exit status 3 once all were tried.
fn stop_all(socket: &std::path::Path, force: bool, output: Output) -> Result<()> {
    let list: Vec<VolumeStatus> = serde_json::from_value(call(socket, &Request::List)?)?;
    let mut stopped = Vec::new();
    let mut refused = Vec::new();
    for v in list.iter().filter(|v| v.device.is_some()) {
        let req = Request::Stop {
            volume: v.name.clone(),
            force,
        };
        match call(socket, &req) {
            Ok(_) => stopped.push(v.name.clone()),
            Err(e) => {
                if let ublkd::error::DaemonError::Control { .. } = e {
                    return Err(e.into());
                }
                refused.push(serde_json::json!({ "volume": v.name, "error": format!("{e:#}") }));
            }
        }
    }
    if output == Output::Json {
        println!(
            "{}",
            serde_json::json!({ "stopped": stopped, "refused": refused })
        );
    } else {
        for n in &stopped {
            println!("{n}: stopped");
        }
        for r in &refused {
            eprintln!("{}: not stopped: {}", r["volume"], r["error"]);
        }
        if stopped.is_empty() && refused.is_empty() {
            println!("no volume has a device up");
        }
    }
    if !refused.is_empty() {
        std::process::exit(EXIT_REFUSED);
    }
    Ok(())
}

fn accept(socket: &std::path::Path, volume: &str, output: Output) -> Result<()> {
    let v = call(
        socket,
        &Request::Status {
            volume: volume.to_string(),
        },
    )?;
    let s: VolumeStatus = serde_json::from_value(v).context("decode status")?;
    // A replica being replaced is on its way out: the line names its successor.
    let config: Vec<String> = s
        .replicas
        .iter()
        .filter(|r| !s.substitutions.iter().any(|x| x.configured == r.path))
        .map(|r| match r.path.split_once('@') {
            Some((id, addr)) => format!("{{ remote = \"{addr}\", id = \"{id}\" }}"),
            None => format!("{{ local = \"{}\" }}", r.path),
        })
        .collect();
    let line = format!("replicas = [ {} ]", config.join(", "));
    if output == Output::Json {
        println!(
            "{}",
            serde_json::json!({ "volume": volume, "replicas_line": line, "substitutions": s.substitutions })
        );
        return Ok(());
    }
    if s.substitutions.is_empty() {
        println!("volume {volume}: the config already names every replica that runs");
        return Ok(());
    }
    println!("# In the [[volume]] named {volume:?} of the config, then `ublkctl reload`:");
    println!("{line}");
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

fn print_verify(r: &replication::verify::Report) {
    println!(
        "compared {} of {} online replicas ({}); {} region(s) rechecked under the range lock",
        human(r.bytes),
        r.replicas.len(),
        r.replicas.join(", "),
        r.rechecked
    );
    for m in &r.mismatches {
        let sums: Vec<String> = m
            .checksums
            .iter()
            .map(|(s, loc, c)| format!("#{} {loc}: {c:08x}", s.0))
            .collect();
        println!(
            "  DIFFERS at {}..{} ({}): {}",
            m.offset.0,
            m.offset.0 + m.len.0,
            human(m.len.0),
            sums.join(", ")
        );
        let verb = if m.repaired {
            "repaired"
        } else {
            "--repair would copy it"
        };
        println!("    {verb} from {}", m.source);
    }
    for snap in &r.snapshots {
        for m in &snap.missing {
            println!(
                "  snapshot {}: MISSING on {m} (`ublkctl replica replace`: the new replica's full rebuild gives it every snapshot)",
                snap.name
            );
        }
        for (off, len, sums) in &snap.mismatches {
            let sums: Vec<String> = sums
                .iter()
                .map(|(s, loc, c)| format!("#{} {loc}: {c:08x}", s.0))
                .collect();
            println!(
                "  snapshot {}: DIFFERS at {}..{}: {} (not repaired in place: replace the wrong replica, `ublkctl replica replace`)",
                snap.name,
                off.0,
                off.0 + len.0,
                sums.join(", ")
            );
        }
    }
    if !r.snapshots.is_empty() {
        let bad = r
            .snapshots
            .iter()
            .filter(|s| !s.missing.is_empty() || !s.mismatches.is_empty())
            .count();
        println!(
            "{} snapshot(s) compared, {bad} with findings",
            r.snapshots.len()
        );
    }
    if r.mismatches.is_empty() && r.clean() {
        println!("replicas identical");
    } else if r.mismatches.is_empty() {
        println!("the heads are identical; the snapshots above are not");
    } else if r.clean() {
        println!(
            "{} region(s) differed and were rewritten (sources above)",
            r.mismatches.len()
        );
    } else {
        println!(
            "{} region(s) differ: `ublkctl verify --repair` rewrites each from the replica above \
             (the majority's, else the read-preferred one)",
            r.mismatches.len()
        );
    }
}

fn work_name(w: Work) -> &'static str {
    match w {
        Work::Rebuild(k) => kind_name(k),
        Work::Resync => "resync",
    }
}

/// `YYYY-MM-DD HH:MM:SS` of a Unix time in ms (UTC).
fn utc(ms: u64) -> String {
    let t = ublkd::utc::utc(ms);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

/// Poll the volume's status until no rebuild runs; exit status 1 if the last one
/// did not finish.
fn watch(socket: &std::path::Path, volume: &str, output: Output) -> Result<()> {
    use std::io::IsTerminal;
    let status = || -> Result<VolumeStatus> {
        let v = call(
            socket,
            &Request::Status {
                volume: volume.to_string(),
            },
        )?;
        Ok(serde_json::from_value(v)?)
    };
    let tty = std::io::stdout().is_terminal() && output == Output::Text;
    let mut bar: Option<(indicatif::ProgressBar, String)> = None;
    let mut seen = false;
    let mut last_line = std::time::Instant::now() - std::time::Duration::from_secs(10);
    loop {
        let s = status()?;
        let Some(r) = s.rebuild else {
            if let Some((b, _)) = bar.take() {
                b.finish_and_clear();
            }
            break;
        };
        seen = true;
        let what = match (r.work, r.slot) {
            (Work::Rebuild(k), Some(slot)) => {
                format!("{} rebuild of #{} {}", kind_name(k), slot.0, r.location)
            }
            _ => "resync".to_string(),
        };
        if tty {
            if bar.as_ref().is_none_or(|(_, w)| *w != what) {
                if let Some((b, _)) = bar.take() {
                    b.finish_and_clear();
                }
                let b = indicatif::ProgressBar::new(r.total);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                b.set_message(what.clone());
                bar = Some((b, what.clone()));
            }
            if let Some((b, _)) = &bar {
                b.set_length(r.total);
                b.set_position(r.done);
            }
        } else if last_line.elapsed() >= std::time::Duration::from_secs(2) {
            last_line = std::time::Instant::now();
            if output == Output::Json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let rate = r.done as f64 / (r.elapsed_ms.max(1) as f64 / 1000.0);
                println!(
                    "{what}: {} of {} ({:.0}%), {}/s",
                    human(r.done),
                    human(r.total),
                    100.0 * r.done as f64 / r.total.max(1) as f64,
                    human(rate as u64)
                );
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(if tty {
            200
        } else {
            500
        }));
    }
    if !seen {
        if output == Output::Text {
            println!("no rebuild running on {volume}");
        }
        return Ok(());
    }
    let v = call(
        socket,
        &Request::Rebuild {
            volume: volume.to_string(),
            action: RebuildAction::History,
        },
    )?;
    let h: Vec<HistoryEntry> = serde_json::from_value(v)?;
    let Some(last) = h.last() else {
        return Ok(());
    };
    if output == Output::Json {
        println!("{}", serde_json::to_string(last)?);
    } else {
        match &last.ended {
            Ended::Done { bytes } => println!(
                "{} of {} done: {} in {:.1} s",
                work_name(last.work),
                last.location,
                human(*bytes),
                last.ended_unix_ms.saturating_sub(last.started_unix_ms) as f64 / 1000.0
            ),
            Ended::Stopped { reason, .. } => println!(
                "{} of {} stopped: {reason}",
                work_name(last.work),
                last.location
            ),
            Ended::NotStarted { error } => println!("not started: {error}"),
        }
    }
    if !matches!(last.ended, Ended::Done { .. }) {
        std::process::exit(EXIT_NOT_OK);
    }
    Ok(())
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
        match (r.state.as_deref(), r.missing_bytes, &r.full_rebuild) {
            (Some("faulted"), _, Some(why)) => println!("      needs a full rebuild: {why}"),
            (Some("faulted"), Some(n), None) => {
                println!("      lacks {}: a partial rebuild catches it up", human(n))
            }
            (Some("faulted"), None, None) => println!("      needs a full rebuild"),
            _ => {}
        }
    }
    for sub in &s.substitutions {
        println!(
            "  differs from the config: {} runs in place of {} since {} because {}; name it in the config to make this permanent",
            sub.location(),
            sub.configured,
            utc(sub.since.0),
            sub.reason
        );
    }
    for r in &s.retired {
        println!(
            "  retired: {} since {} ({}): storage kept, `ublkctl replica reclaim {}` deletes it",
            r.location,
            utc(r.since.0),
            r.why,
            s.name
        );
    }
    if let Some(sch) = &s.schedule {
        println!(
            "  snapshots: every {} s, the newest {} `auto-` ones kept{}",
            sch.every_s,
            sch.keep,
            if sch.freeze { ", frozen" } else { "" }
        );
        if let (Some(at), Some(e)) = (sch.failed_ms, &sch.error) {
            println!(
                "      last round FAILED at {}: {e} (retried every 30 s)",
                utc(at)
            );
        }
    }
    if let Some(e) = &s.export {
        println!(
            "  exporting snapshot {} to {}: {} of {}",
            e.snapshot,
            e.path,
            human(e.done),
            human(e.total)
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

#[cfg(test)]
mod tests {
    #[test]
    fn utc_renders_civil_dates_including_leap_days() {
        assert_eq!(super::utc(1_764_633_600_000), "2025-12-02 00:00:00");
        assert_eq!(
            super::utc((951_782_400 + 3723) * 1000),
            "2000-02-29 01:02:03"
        );
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
    }
}
