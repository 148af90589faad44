//! `ublkd`: the node daemon.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use replica_server::{Limits, Server};
use replication::remote::Secret;
use ublkd::config::Config;
use ublkd::daemon::Daemon;
use ublkd::volume::Net;

#[derive(Parser)]
#[command(
    version,
    about = "Serve replicated volumes as /dev/ublkbN",
    args_conflicts_with_subcommands = true,
    after_help = "\
Examples:
  ublkd check-config /etc/ublkd/ublk.toml   # what the daemon would refuse, by line
  ublkd --config /etc/ublkd/ublk.toml       # run in the foreground (systemd: ublkd.service)
  ublkd --config ublk.toml --log-level debug

Signals: SIGHUP re-reads the config (as `ublkctl reload`). SIGTERM (systemctl stop,
restart) leaves the devices to the next ublkd: requests wait in the kernel until it
takes them back, filesystems stay mounted. SIGINT (Ctrl-C) drains I/O and removes the
devices (unmount first). A crashed or killed daemon leaves its devices too."
)]
struct Cli {
    /// Configuration file.
    #[arg(short, long, default_value = "/etc/ublkd/ublk.toml")]
    config: PathBuf,
    /// Override the config's log level (error, warn, info, debug, trace).
    #[arg(long)]
    log_level: Option<String>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate a configuration file and exit (touches nothing).
    CheckConfig { file: PathBuf },
    /// Write the man pages into DIR (for packaging).
    #[command(hide = true)]
    Man { dir: PathBuf },
}

fn main() {
    let cmd = Cli::command().long_version(ublkd::clidocs::long_version());
    let cli = Cli::from_arg_matches(&cmd.get_matches()).unwrap_or_else(|e| e.exit());
    let res = match cli.cmd {
        Some(Cmd::CheckConfig { file }) => check_config(&file),
        Some(Cmd::Man { dir }) => ublkd::clidocs::write_man(Cli::command(), &dir)
            .map(drop)
            .with_context(|| format!("write man pages into {}", dir.display())),
        None => run(&cli.config, cli.log_level.as_deref()),
    };
    if let Err(e) = res {
        eprintln!("ublkd: error: {e:#}");
        std::process::exit(1);
    }
}

/// What the daemon would refuse at start, short of starting: the file, the secret
/// (read and checked as the daemon reads it), and that `[server] listen` is an
/// address of this host. No server is contacted; whether the listen port is free
/// is known only at start (a running ublkd holds it).
fn check_config(file: &std::path::Path) -> Result<()> {
    let cfg = Config::from_file(file)?;
    start_checks(&cfg, file)?;
    if let Some(addr) = cfg.metrics_listen {
        let any_port = std::net::SocketAddr::new(addr.ip(), 0);
        std::net::TcpListener::bind(any_port).with_context(|| {
            format!(
                "{}: [metrics] listen = \"{addr}\": {} is not an address of this host",
                file.display(),
                addr.ip()
            )
        })?;
    }
    if let Some(srv) = &cfg.server {
        let any_port = std::net::SocketAddr::new(srv.listen.ip(), 0);
        std::net::TcpListener::bind(any_port).with_context(|| {
            format!(
                "{}: [server] listen = \"{}\": {} is not an address of this host",
                file.display(),
                srv.listen,
                srv.listen.ip()
            )
        })?;
    }
    println!(
        "{}: ok ({} volume{})",
        file.display(),
        cfg.volumes.len(),
        if cfg.volumes.len() == 1 { "" } else { "s" }
    );
    Ok(())
}

/// What both a start and `check-config` refuse beyond the file itself, naming the
/// file: the cluster secret (read and checked; its bytes, if configured) and a remote
/// or spare that is this node's own server.
fn start_checks(cfg: &Config, file: &std::path::Path) -> Result<Option<Vec<u8>>> {
    let secret = match &cfg.node.cluster_secret_file {
        Some(p) => Some(
            ublkd::config::read_secret(p)
                .with_context(|| format!("{}: [node] cluster_secret_file", file.display()))?,
        ),
        None => None,
    };
    own_server_named(cfg).with_context(|| file.display().to_string())?;
    Ok(secret)
}

/// A remote replica or a spare that is this node's own replica server would put a
/// second replica of the volume on this host (a spares list copied to every node's
/// config is the usual way): refused, naming it. An address that does not resolve
/// now is left to the connection.
fn own_server_named(cfg: &Config) -> Result<()> {
    let Some(srv) = &cfg.server else {
        return Ok(());
    };
    let own = |addr: &str| {
        use std::net::ToSocketAddrs;
        let ip = srv.listen.ip();
        addr.to_socket_addrs().is_ok_and(|mut all| {
            all.any(|a| {
                a.port() == srv.listen.port()
                    && (a.ip() == ip
                        // Listening everywhere: any address of this host.
                        || ip.is_unspecified() && std::net::TcpListener::bind((a.ip(), 0)).is_ok())
            })
        })
    };
    for v in &cfg.volumes {
        let mut remotes = v.replicas.iter().filter_map(|r| r.remote()).map(|(a, _)| a);
        if let Some(a) = remotes.find(|a| own(a)) {
            anyhow::bail!(
                "volume {:?}: remote replica at {a} is this node's own replica server ([server] listen = \"{}\"): use a local replica here, or a server on another node",
                v.name,
                srv.listen
            );
        }
        if let Some(a) = v.spares.iter().find(|a| own(a)) {
            anyhow::bail!(
                "volume {:?}: spare {a} is this node's own replica server ([server] listen = \"{}\"): a replacement there would share this host with the volume's local replicas; drop it from this node's spares",
                v.name,
                srv.listen
            );
        }
    }
    Ok(())
}

/// How long SIGTERM waits for the volumes to drain and flush (each has its own
/// bound, volume::HAND_OVER_DRAIN; this covers the flushes after it).
const HAND_OVER_WAIT: std::time::Duration = std::time::Duration::from_secs(40);

fn run(config: &std::path::Path, log_level: Option<&str>) -> Result<()> {
    let cfg = Config::from_file(config)?;
    let level = log_level.unwrap_or(&cfg.node.log_level).to_string();
    // Colour only on a terminal; under systemd (JOURNAL_STREAM set) no timestamp
    // either: the journal stamps every line itself. The filter can change while the
    // daemon runs (`ublkctl log-level`).
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let (filter, filter_handle) = tracing_subscriber::reload::Layer::new(filter);
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt = if journal {
        fmt.without_time().boxed()
    } else {
        fmt.boxed()
    };
    tracing_subscriber::registry().with(filter).with(fmt).init();
    // A node that only hosts replicas for others needs no ublk driver.
    let replica_server_only = cfg.volumes.is_empty() && cfg.server.is_some();
    if !replica_server_only && !std::path::Path::new("/dev/ublk-control").exists() {
        return Err(ublkd::DaemonError::NoUblkDriver.into());
    }
    let secret = start_checks(&cfg, config)?.map(Secret::new);
    if cfg.volumes.is_empty() && cfg.server.is_none() {
        // The packaged config's state after an install: worth a line, not a warning.
        tracing::info!(
            "no [[volume]] and no [server] in {}: idling",
            config.display()
        );
    }

    // Signals are taken synchronously by this thread; block them before any other
    // thread exists so none of them is interrupted instead.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    signals.thread_block().context("block signals")?;

    private_mount_namespace()?;

    // Replica connections and the replica server. Created after the signal mask, so
    // its threads inherit it.
    // One thread: replica connections are a few sockets per volume. A 2-worker
    // pool measured the same in the VM benchmark (BENCHMARKS.md) with more threads
    // to wake. Other threads use the runtime through its Handle.
    let (net_handle, net_stop, net_thread) = runtime_thread("net")?;
    let listener = ublkd::control::bind(&cfg.node.control_socket)?;
    let (mut replica_server, mut server_accept) = (None, None);
    if let Some(srv) = &cfg.server {
        let secret = secret
            .clone()
            .context("[server] needs [node] cluster_secret_file")?;
        let limits = Limits {
            max_connections: srv.max_connections as usize,
            ..Limits::default()
        };
        let server = Server::new(srv.storage_dir.clone(), secret, limits)?;
        // Accept and handshake on a thread of their own: a flood of unauthenticated
        // connections must not delay this node's own replica I/O on "net".
        let (accept, stop, thread) = runtime_thread("server-accept")?;
        server.listen(srv.listen, &accept).with_context(|| {
            format!("{}: [server] listen = \"{}\"", config.display(), srv.listen)
        })?;
        replica_server = Some(server);
        server_accept = Some((stop, thread));
    }
    let socket = cfg.node.control_socket.clone();
    let net = Net::new(
        &cfg,
        net_handle.clone(),
        secret,
        ublkd::volume::Frontend::Ublk,
    );
    let mut daemon = Daemon::new(cfg, net, replica_server)?;
    daemon.set_config_path(config.to_path_buf());
    daemon.set_log_filter_fn(Box::new(move |f: &str| {
        let filter = tracing_subscriber::EnvFilter::try_new(f).map_err(|e| e.to_string())?;
        filter_handle.reload(filter).map_err(|e| e.to_string())
    }));
    let daemon = Arc::new(daemon);
    if let Some(addr) = daemon.config().metrics_listen {
        // An address it cannot take (a port in use, an interface not up yet) must not
        // keep this daemon from taking its devices back: it serves without metrics
        // and retries (check-config catches an address that is not this host's).
        let d = daemon.clone();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || ublkd::metrics::bind_and_serve(addr, d))?;
    }
    let d = daemon.clone();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || ublkd::control::serve(listener, d))?;

    report_orphans(&daemon);
    daemon.start_all();
    // The HA monitor: probes the replica servers, replaces the replicas of dead
    // ones on the volumes' spares.
    let ha_stop = Arc::new(ublkd::ha::StopFlag::default());
    let ha_thread = {
        let (d, stop) = (daemon.clone(), ha_stop.clone());
        std::thread::Builder::new()
            .name("ha-monitor".into())
            .spawn(move || ublkd::ha::run(&d, &stop))?
    };
    // Scheduled snapshots (volumes with `snapshots = { every, keep }`).
    let schedule_thread = {
        let (d, stop) = (daemon.clone(), ha_stop.clone());
        std::thread::Builder::new()
            .name("snapshots".into())
            .spawn(move || ublkd::schedule::run(&d, &stop))?
    };
    tracing::info!(socket = %socket.display(), "ublkd running");

    loop {
        match signals.wait().context("wait for signals")? {
            Signal::SIGHUP => {
                tracing::info!(config = %config.display(), "SIGHUP: reloading the config");
                match daemon.reload() {
                    Ok(r) => {
                        for (c, e) in &r.failed {
                            tracing::error!(change = %c, error = %e, "reload: not applied");
                        }
                        tracing::info!(
                            applied = r.applied.len(),
                            failed = r.failed.len(),
                            "reload done"
                        );
                    }
                    Err(e) => tracing::error!(error = %e, "reload refused"),
                }
            }
            // systemd's stop and restart: the devices stay for the next ublkd.
            Signal::SIGTERM => {
                tracing::info!("SIGTERM: handing the devices over to the next ublkd");
                ha_stop.stop();
                let _ = ha_thread.join();
                let _ = schedule_thread.join();
                let (clean, not_clean) = daemon.hand_over_all(HAND_OVER_WAIT);
                let _ = std::fs::remove_file(&socket);
                tracing::info!(
                    clean = ?clean,
                    resync_at_next_start = ?not_clean,
                    "handed over: devices left for the next ublkd, which takes them back with their filesystems mounted"
                );
                // Without STOP_DEV: the queues' held requests go to the next daemon.
                std::process::exit(0);
            }
            sig => {
                tracing::info!(signal = ?sig, "stopping: draining I/O and removing devices");
                // No replacement may start while the volumes stop.
                ha_stop.stop();
                let _ = ha_thread.join();
                let _ = schedule_thread.join();
                daemon.stop_all();
                let _ = net_stop.send(());
                let _ = net_thread.join();
                if let Some((stop, thread)) = server_accept.take() {
                    let _ = stop.send(());
                    let _ = thread.join();
                }
                let _ = std::fs::remove_file(&socket);
                tracing::info!("stopped");
                return Ok(());
            }
        }
    }
}

/// A single-threaded tokio runtime on a thread named `name`, running until the
/// returned sender fires (or is dropped).
fn runtime_thread(
    name: &str,
) -> anyhow::Result<(
    tokio::runtime::Handle,
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .with_context(|| format!("start the {name} runtime"))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = rt.handle().clone();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            rt.block_on(async {
                let _ = stopped.await;
            })
        })
        .with_context(|| format!("start the {name} thread"))?;
    Ok((handle, stop, thread))
}

/// Move into our own mount namespace and drop every filesystem mounted from a ublk
/// device from it. The daemon must never hold the last reference to a filesystem on
/// its own device: tearing that down at exit flushes it through the exiting daemon
/// (deadlock). A restarted daemon inherits the user's mounts of /dev/ublkbN in the
/// namespace copy, so they are detached here. Slave propagation lets later unmounts
/// by the user reach our copy as well.
fn private_mount_namespace() -> Result<()> {
    use nix::mount::{umount2, MntFlags, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).context("unshare mount namespace")?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .context("make mounts slave")?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("read mountinfo")?;
    for target in ublk_mounts(&info, block_dev_on_ublk).into_iter().rev() {
        match umount2(target.as_str(), MntFlags::MNT_DETACH) {
            Ok(()) => {
                tracing::info!(%target, "detached ublk-backed mount from the daemon's namespace")
            }
            Err(e) => tracing::warn!(%target, error = %e, "cannot detach ublk-backed mount"),
        }
    }
    Ok(())
}

/// Mount points (in mount order) of filesystems whose device (mountinfo's `maj:min`)
/// `on_ublk` says sits on a ublk device.
fn ublk_mounts(mountinfo: &str, on_ublk: impl Fn(&str) -> bool) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let majmin = f.nth(2)?;
            let target = f.nth(1)?;
            on_ublk(majmin).then(|| unescape_octal(target))?
        })
        .collect()
}

/// Whether block device `maj:min` is a ublk disk or partition, or is stacked on one
/// (dm, md, ...: followed through `slaves/`).
fn block_dev_on_ublk(majmin: &str) -> bool {
    fn by_name(name: &str, depth: u32) -> bool {
        if name.starts_with("ublkb") {
            return true;
        }
        depth < 8
            && std::fs::read_dir(format!("/sys/class/block/{name}/slaves"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| by_name(&e.file_name().to_string_lossy(), depth + 1))
    }
    std::fs::read_link(format!("/sys/dev/block/{majmin}"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
        .is_some_and(|name| by_name(&name, 0))
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_octal(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let v = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).ok()?, 8).ok()?;
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn report_orphans(daemon: &Daemon) {
    for o in daemon.orphans() {
        tracing::warn!(
            device_id = o.device_id,
            state = %o.state,
            made_by_ublkd = o.made_by_ublkd,
            "ublk device not owned by any configured volume (remove with `ublkctl orphans --remove`)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_ublk_mounts_with_escaped_paths() {
        let info = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
                    40 22 259:0 / /mnt/my\\040data rw,relatime - ext4 /dev/ublkb0 rw\n\
                    41 22 259:1 / /srv rw - xfs /dev/ublkb12 rw\n\
                    42 22 0:5 / /dev rw - devtmpfs devtmpfs rw\n";
        assert_eq!(
            ublk_mounts(info, |mm| mm.starts_with("259:")),
            vec!["/mnt/my data".to_string(), "/srv".to_string()]
        );
    }
}
