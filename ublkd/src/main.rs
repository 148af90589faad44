//! `ublkd`: the node daemon.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use ublkd::config::Config;
use ublkd::daemon::Daemon;

#[derive(Parser)]
#[command(
    version,
    about = "Serve replicated volumes as /dev/ublkbN",
    args_conflicts_with_subcommands = true
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
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Some(Cmd::CheckConfig { file }) => check_config(&file),
        None => run(&cli.config, cli.log_level.as_deref()),
    };
    if let Err(e) = res {
        eprintln!("ublkd: error: {e:#}");
        std::process::exit(1);
    }
}

fn check_config(file: &std::path::Path) -> Result<()> {
    let cfg = Config::from_file(file)?;
    println!(
        "{}: ok ({} volume{})",
        file.display(),
        cfg.volumes.len(),
        if cfg.volumes.len() == 1 { "" } else { "s" }
    );
    Ok(())
}

fn run(config: &std::path::Path, log_level: Option<&str>) -> Result<()> {
    let cfg = Config::from_file(config)?;
    let level = log_level.unwrap_or(&cfg.node.log_level).to_string();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .init();
    if !std::path::Path::new("/dev/ublk-control").exists() {
        return Err(ublkd::DaemonError::NoUblkDriver.into());
    }
    if cfg.volumes.is_empty() {
        tracing::warn!("no [[volume]] in {}: idling", config.display());
    }

    // Signals are taken synchronously by this thread; block them before any other
    // thread exists so none of them is interrupted instead.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    signals.thread_block().context("block signals")?;

    // Our own mount namespace: the daemon must never hold a reference to (or flush)
    // a filesystem mounted on its own devices, which can deadlock its exit.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).context("unshare mount namespace")?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("make mounts private")?;

    let listener = ublkd::control::bind(&cfg.node.control_socket)?;
    let socket = cfg.node.control_socket.clone();
    let daemon = Arc::new(Daemon::new(cfg)?);
    let d = daemon.clone();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || ublkd::control::serve(listener, d))?;

    report_orphans(&daemon);
    daemon.start_all();
    tracing::info!(socket = %socket.display(), "ublkd running");

    loop {
        match signals.wait().context("wait for signals")? {
            Signal::SIGHUP => tracing::info!(
                "SIGHUP: config reload is not supported; restart ublkd to apply changes"
            ),
            sig => {
                tracing::info!(signal = ?sig, "stopping: draining I/O and removing devices");
                daemon.stop_all();
                let _ = std::fs::remove_file(&socket);
                tracing::info!("stopped");
                return Ok(());
            }
        }
    }
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
