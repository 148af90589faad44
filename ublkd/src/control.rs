//! The control socket: a Unix stream socket (mode 0600, root only), one JSON
//! request per line, one JSON response per line.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::daemon::Daemon;
use crate::error::DaemonError;

/// Longest request line accepted: requests are tiny, anything bigger is garbage.
const MAX_REQUEST: u64 = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    List,
    Status {
        volume: String,
    },
    Stop {
        volume: String,
        force: bool,
    },
    /// Start configured volumes that are not running (all, or one).
    Recover {
        volume: Option<String>,
        /// Take the volume over even from a newer owner (one volume only).
        #[serde(default)]
        force_takeover: bool,
    },
    Orphans {
        remove: bool,
    },
    /// The replica server's connections and limits.
    Server,
    /// Re-read the config file and apply what changed.
    Reload,
    /// The configuration the daemon runs with, every default filled in.
    Config,
    /// Compare the online replicas by checksum (and rewrite what differs).
    Verify {
        volume: String,
        repair: bool,
        /// With `repair`: the replica (location or `#N`) to copy from, instead of
        /// the majority's or the read-preferred one.
        #[serde(default)]
        from: Option<String>,
    },
    /// Start or cancel a rebuild, or list the volume's rebuild history.
    Rebuild {
        volume: String,
        action: RebuildAction,
    },
    /// The HA monitor's events after `since` (all kept ones without).
    Events {
        since: Option<u64>,
    },
    /// The HA monitor: its view of the servers, or pause/resume it.
    Ha {
        action: HaAction,
    },
    /// Replace a replica now, on `to` or on a spare the placement rule picks.
    ReplicaReplace {
        volume: String,
        replica: String,
        to: Option<String>,
    },
    /// Delete the storage of retired replicas (`replica`: one location, else all).
    ReplicaReclaim {
        volume: String,
        replica: Option<String>,
    },
    /// Change what the daemon logs until it restarts: a level, or filter
    /// directives as in RUST_LOG (`info,replication=debug`).
    LogLevel {
        filter: String,
    },
    /// Snapshots of a running volume.
    Snapshot {
        volume: String,
        action: SnapshotCmd,
    },
}

/// What `Request::Snapshot` does.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum SnapshotCmd {
    /// Take one; with `freeze`, the filesystem mounted from the device is frozen
    /// (FIFREEZE) around the barrier and always thawed.
    Create {
        name: String,
        freeze: bool,
    },
    List,
    /// Delete one (by name or uuid): hidden at once, space back in the background.
    Delete {
        snapshot: String,
    },
    /// Roll the volume back to one; the device must not be in use.
    Revert {
        snapshot: String,
    },
    /// Write one to an image file: all of it, or with `since` what changed since
    /// that older one (qcow2 over `backing_file`, the older one's export).
    Export {
        snapshot: String,
        /// Absolute, as the client sees it: opened in the client's mount
        /// namespace (its `/proc/PID/root`), owned by the client's user.
        path: String,
        format: ExportFormat,
        #[serde(default)]
        since: Option<String>,
        #[serde(default)]
        backing_file: Option<String>,
        /// Replace an existing file.
        #[serde(default)]
        force: bool,
    },
}

/// The image formats of `snapshot export`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    /// The volume's bytes at their offsets; zeroes are holes (sparse).
    Raw,
    /// qcow2 v3 (64 KiB clusters): what qemu and `qemu-img` read.
    Qcow2,
}

/// Who sent a control request (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HaAction {
    Status,
    Pause,
    Resume,
    /// A server's planned downtime: its replicas are not replaced meanwhile.
    MaintenanceStart {
        server: String,
        /// Milliseconds (`None`: until `MaintenanceEnd`).
        for_ms: Option<u64>,
    },
    MaintenanceEnd {
        server: String,
    },
}

/// What `Request::Rebuild` does.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum RebuildAction {
    /// Rebuild a faulted replica (by location or `#index`) now.
    Start {
        replica: String,
        full: bool,
    },
    /// Cancel the rebuild running (of this replica, if named).
    Cancel {
        replica: Option<String>,
    },
    History,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok(serde_json::Value),
    Error(String),
}

fn handle(
    daemon: &Daemon,
    req: Request,
    peer: Option<Peer>,
) -> Result<serde_json::Value, DaemonError> {
    Ok(match req {
        Request::List => json(&daemon.list()),
        Request::Status { volume } => json(&daemon.status(&volume)?),
        Request::Stop { volume, force } => {
            daemon.stop(&volume, force)?;
            json(&daemon.status(&volume)?)
        }
        // One volume named: its error is the answer.
        Request::Recover {
            volume: Some(v),
            force_takeover,
        } => {
            daemon.start(&v, force_takeover)?;
            json(&[v])
        }
        Request::Recover {
            volume: None,
            force_takeover: true,
        } => {
            return Err(DaemonError::BadRequest(
                "--force-takeover takes one volume, by name: it fences another owner".into(),
            ))
        }
        // All: start what can be started; one stuck volume must not block the others.
        Request::Recover { volume: None, .. } => {
            let mut started = Vec::new();
            for s in daemon.list().into_iter().filter(|s| !s.state.is_serving()) {
                match daemon.start(&s.name, false) {
                    Ok(()) => started.push(s.name),
                    Err(e) => tracing::warn!(volume = %s.name, error = %e, "recover: not started"),
                }
            }
            json(&started)
        }
        Request::Orphans { remove: false } => json(&daemon.orphans()),
        Request::Orphans { remove: true } => json(&daemon.remove_orphans()?),
        Request::Server => json(&daemon.server_status()?),
        Request::LogLevel { filter } => json(&daemon.set_log_filter(&filter)?),
        Request::Rebuild { volume, action } => daemon.rebuild(&volume, &action)?,
        Request::Snapshot { volume, action } => daemon.snapshot(&volume, &action, peer)?,
        Request::Verify {
            volume,
            repair,
            from,
        } => daemon.verify(&volume, repair, from.as_deref())?,
        Request::Reload => json(&daemon.reload()?),
        Request::Config => json(&serde_json::json!({
            "file": daemon.config_path(),
            "config": daemon.config(),
        })),
        Request::Events { since } => json(&daemon.ha().events.since(since)),
        Request::Ha { action } => {
            match action {
                HaAction::Status => {}
                HaAction::Pause => daemon.ha().set_paused(true)?,
                HaAction::Resume => daemon.ha().set_paused(false)?,
                HaAction::MaintenanceStart { server, for_ms } => {
                    // A typo would leave the real server's replicas to be replaced
                    // during its reboot: only a server this node's volumes use.
                    let cfg = daemon.config();
                    let known = cfg.volumes.iter().any(|v| {
                        v.spares.contains(&server)
                            || v.replicas
                                .iter()
                                .any(|r| r.remote().is_some_and(|(a, _)| a == server))
                    }) || daemon.serving().iter().any(|v| {
                        v.substitutions().iter().any(|x| {
                            crate::volume::peer_of(&x.location())
                                .is_some_and(|p| p.as_str() == server)
                        })
                    });
                    if !known {
                        return Err(DaemonError::Refused(format!(
                            "no volume of this node has a replica or a spare on {server:?}: name the server as the config does (ublkctl config lists them)"
                        )));
                    }
                    daemon.ha().set_maintenance(&server, Some(for_ms))?
                }
                HaAction::MaintenanceEnd { server } => {
                    daemon.ha().set_maintenance(&server, None)?
                }
            }
            json(&daemon.ha().status())
        }
        Request::ReplicaReplace {
            volume,
            replica,
            to,
        } => daemon.replica_replace(&volume, &replica, to.as_deref())?,
        Request::ReplicaReclaim { volume, replica } => {
            daemon.replica_reclaim(&volume, replica.as_deref())?
        }
    })
}

fn json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("status types serialize")
}

/// Bind the socket. A stale socket file from a crashed daemon is replaced; a live
/// one means another daemon runs here, which is an error.
pub fn bind(path: &Path) -> Result<UnixListener, DaemonError> {
    let err = |message: String| DaemonError::Control {
        path: path.to_path_buf(),
        message,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("create directory: {e}")))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(err("another ublkd is already listening".into()));
        }
        std::fs::remove_file(path).map_err(|e| err(format!("remove stale socket: {e}")))?;
    }
    // Created 0600 (no window in which others may connect before the chmod):
    // the umask is the process's, restored at once.
    // SAFETY: umask only swaps the process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = bound.map_err(|e| err(format!("bind: {e}")))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err(format!("chmod: {e}")))?;
    Ok(l)
}

/// Whether the peer of `conn` may drive the daemon: root, or the daemon's own
/// user. The socket's mode says the same; this holds if its mode or directory
/// is loosened by mistake.
fn peer_allowed(conn: &UnixStream) -> Result<(), String> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(conn, PeerCredentials).map_err(|e| format!("peer credentials: {e}"))?;
    match cred.uid() {
        uid if crate::config::trusted_uid(uid) => Ok(()),
        uid => Err(format!(
            "uid {uid} (pid {}) may not use the control socket: only root and uid {} may",
            cred.pid(),
            nix::unistd::geteuid()
        )),
    }
}

/// Serve connections forever (on the calling thread).
pub fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let d = daemon.clone();
        // A stop can take a while (draining); don't block other clients.
        std::thread::spawn(move || {
            if let Err(e) = serve_conn(conn, &d) {
                tracing::debug!(error = %e, "control connection ended");
            }
        });
    }
}

fn serve_conn(conn: UnixStream, daemon: &Daemon) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut out = conn.try_clone()?;
    let refused = peer_allowed(&conn).err();
    let peer = {
        use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
        getsockopt(&conn, PeerCredentials).ok().map(|c| Peer {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
        })
    };
    let mut reader = BufReader::new(conn).take(MAX_REQUEST);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let resp = match (&refused, serde_json::from_str::<Request>(&line)) {
            // Answered after its request is read: a socket closed on unread data
            // would fail the client's write (EPIPE) before it saw why.
            (Some(why), _) => {
                tracing::warn!(%why, "control connection refused");
                Response::Error(format!("refused: {why}"))
            }
            (None, Ok(req)) => {
                tracing::debug!(?req, "control request");
                match handle(daemon, req, peer) {
                    Ok(v) => Response::Ok(v),
                    Err(e) => Response::Error(e.to_string()),
                }
            }
            (None, Err(e)) => Response::Error(format!("bad request: {e}")),
        };
        let mut body = serde_json::to_vec(&resp).expect("response serializes");
        body.push(b'\n');
        out.write_all(&body)?;
        if refused.is_some() {
            return Ok(());
        }
        reader.set_limit(MAX_REQUEST);
    }
}

/// Client side: one request, one response.
pub fn call(socket: &Path, req: &Request) -> Result<serde_json::Value, DaemonError> {
    let err = |message: String| DaemonError::Control {
        path: PathBuf::from(socket),
        message,
    };
    let mut s = UnixStream::connect(socket)
        .map_err(|e| err(format!("cannot connect ({e}): is ublkd running?")))?;
    let mut body = serde_json::to_vec(req).expect("request serializes");
    body.push(b'\n');
    s.write_all(&body).map_err(|e| err(e.to_string()))?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| err(e.to_string()))?;
    match serde_json::from_str::<Response>(&line) {
        Ok(Response::Ok(v)) => Ok(v),
        Ok(Response::Error(e)) => Err(DaemonError::Refused(e)),
        Err(e) => Err(err(format!("bad response from daemon: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_survives_the_socket_encoding() {
        let reqs = [
            Request::List,
            Request::Status { volume: "v".into() },
            Request::Reload,
            Request::Verify {
                volume: "v".into(),
                repair: true,
                from: Some("#1".into()),
            },
            Request::Rebuild {
                volume: "v".into(),
                action: RebuildAction::Start {
                    replica: "#1".into(),
                    full: false,
                },
            },
            Request::Rebuild {
                volume: "v".into(),
                action: RebuildAction::Cancel { replica: None },
            },
            Request::Rebuild {
                volume: "v".into(),
                action: RebuildAction::History,
            },
            Request::Snapshot {
                volume: "v".into(),
                action: SnapshotCmd::Export {
                    snapshot: "s2".into(),
                    path: "/tmp/s2.qcow2".into(),
                    format: ExportFormat::Qcow2,
                    since: Some("s1".into()),
                    backing_file: Some("s1.qcow2".into()),
                    force: false,
                },
            },
        ];
        for r in reqs {
            let line = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r, "{line}");
        }
    }

    #[test]
    fn request_wire_format_is_tagged_json() {
        let r: Request =
            serde_json::from_str(r#"{"cmd":"stop","volume":"v","force":false}"#).unwrap();
        assert_eq!(
            r,
            Request::Stop {
                volume: "v".into(),
                force: false
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format","volume":"v"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"status","volume":"v","x":1}"#).is_err());
    }

    #[test]
    fn bind_refuses_a_live_socket_and_replaces_a_stale_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        let l = bind(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(bind(&p)
            .unwrap_err()
            .to_string()
            .contains("already listening"));
        drop(l);
        bind(&p).expect("stale socket replaced");
    }

    #[test]
    fn daemon_without_volumes_answers_list_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("c.sock");
        let text = format!(
            "[node]\nstate_dir = \"{}\"\ncontrol_socket = \"{}\"\n",
            dir.path().join("state").display(),
            sock.display()
        );
        let cfg = crate::config::Config::parse(&text, "t.toml").unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let net = crate::volume::Net {
            rt: rt.handle().clone(),
            secret: None,
            io_timeout: std::time::Duration::from_secs(1),
            no_replica_timeout: std::time::Duration::from_secs(1),
            rebuild: replication::rebuild::NodeLimits::unlimited(),
            partial_window_s: Arc::new(600.into()),
            grain: 64 << 10,
            frontend: crate::volume::Frontend::Headless,
        };
        let daemon = Arc::new(Daemon::new(cfg, net, None).unwrap());
        let l = bind(&sock).unwrap();
        std::thread::spawn(move || serve(l, daemon));
        assert_eq!(call(&sock, &Request::List).unwrap(), serde_json::json!([]));
        let e = call(
            &sock,
            &Request::Status {
                volume: "nope".into(),
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("no volume named \"nope\""), "{e}");
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"{garbage\n").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        assert!(line.contains("bad request"), "{line}");
    }
}
