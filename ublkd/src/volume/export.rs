//! `ublkctl snapshot export`: a snapshot written to an image file on this node.
//!
//! The file is the client's: its path is resolved in the client's mount
//! namespace (`/proc/PID/root`, the daemon runs in a namespace of its own), it is
//! created new (an existing file is kept unless `force`) and handed to the
//! client's user. The data comes from a replica holding the snapshot
//! (`replication::snapshots::export`); status shows the progress.

use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::VolumeShared;
use crate::control::{ExportFormat, Peer};
use crate::error::DaemonError;
use replication::health::Health;
use replication::rebuild::Progress;

/// An export request, as the control socket got it.
pub struct Request<'a> {
    pub snapshot: &'a str,
    pub path: &'a str,
    pub format: ExportFormat,
    pub since: Option<&'a str>,
    pub backing_file: Option<&'a str>,
    pub force: bool,
    pub peer: Option<Peer>,
}

/// The export under way.
pub struct Running {
    snapshot: String,
    path: String,
    progress: Arc<Progress>,
}

/// What status shows of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportStatus {
    pub snapshot: String,
    pub path: String,
    /// Bytes of the volume gone through, of `total`.
    pub done: u64,
    pub total: u64,
}

impl Running {
    pub fn status(&self) -> ExportStatus {
        use std::sync::atomic::Ordering;
        ExportStatus {
            snapshot: self.snapshot.clone(),
            path: self.path.clone(),
            done: self.progress.done.load(Ordering::Acquire),
            total: self.progress.total.load(Ordering::Acquire),
        }
    }
}

/// Clears the volume's export slot when the export ends, however it ends.
struct Slot<'a>(&'a VolumeShared);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.live.lock().unwrap().export = None;
    }
}

impl VolumeShared {
    pub(super) fn export(
        &self,
        health: &Arc<Health>,
        req: Request<'_>,
    ) -> Result<serde_json::Value, DaemonError> {
        let name = self.cfg().name;
        let fail = |e: replication::ReplicationError| DaemonError::volume(&name, e.to_string());
        let bad = |m: String| Err(DaemonError::BadRequest(m));
        if !req.path.starts_with('/') {
            return bad(format!("export path {:?} must be absolute", req.path));
        }
        let backing = match (req.format, req.since, req.backing_file) {
            (ExportFormat::Raw, Some(_), _) => {
                return bad(
                    "--since needs --format qcow2: an image of what changed names the older export as its backing file".into(),
                )
            }
            (_, None, Some(_)) => return bad("--backing-file goes with --since".into()),
            (ExportFormat::Qcow2, Some(_), None) => {
                return bad("--since needs --backing-file: the older snapshot's qcow2 export, as qemu should open it (a path relative to the new file, or absolute)".into())
            }
            (_, _, Some(b)) => Some((b.to_string(), "qcow2".to_string())),
            _ => None,
        };
        let snap = replication::snapshots::find(health, req.snapshot).map_err(fail)?;
        let since = match req.since {
            Some(s) => Some(replication::snapshots::find(health, s).map_err(fail)?),
            None => None,
        };
        if let Some(older) = &since {
            if (older.created_ms, &older.name) >= (snap.created_ms, &snap.name) {
                return bad(format!(
                    "--since {}: it must be older than {}",
                    older.name, snap.name
                ));
            }
        }
        let progress = Arc::new(Progress::default());
        {
            let mut live = self.live.lock().unwrap();
            if let Some(r) = &live.export {
                return Err(DaemonError::Refused(format!(
                    "volume {name} is exporting {} to {}: wait for it (ublkctl status)",
                    r.snapshot, r.path
                )));
            }
            live.export = Some(Running {
                snapshot: snap.name.clone(),
                path: req.path.to_string(),
                progress: progress.clone(),
            });
        }
        let _slot = Slot(self);
        let file = open_for(req.path, req.force, req.peer)?;
        let size = health.size().0;
        let w =
            snapshot::export::writer(format_of(req.format), file, size, backing).map_err(|e| {
                DaemonError::Io {
                    context: format!("export to {}", req.path),
                    source: e,
                }
            })?;
        let done = replication::snapshots::export(
            health,
            snap.uuid,
            since.as_ref().map(|s| s.uuid),
            w,
            &progress,
        );
        let done = match done {
            Ok(d) => d,
            Err(e) => {
                // A partial image is no image: it goes.
                let _ = std::fs::remove_file(resolved(req.path, req.peer));
                return Err(fail(e));
            }
        };
        tracing::info!(volume = %name, snapshot = %snap.name, path = req.path,
            bytes_read = done.bytes_read, millis = done.millis, "snapshot exported");
        let mut v = serde_json::to_value(&done).expect("serializes");
        v["snapshot"] = snap.name.into();
        v["path"] = req.path.into();
        v["size"] = size.into();
        Ok(v)
    }
}

fn format_of(f: ExportFormat) -> snapshot::export::Format {
    match f {
        ExportFormat::Raw => snapshot::export::Format::Raw,
        ExportFormat::Qcow2 => snapshot::export::Format::Qcow2,
    }
}

/// `path` as the client sees it.
fn resolved(path: &str, peer: Option<Peer>) -> PathBuf {
    match peer {
        Some(p) => PathBuf::from(format!("/proc/{}/root{path}", p.pid)),
        None => PathBuf::from(path),
    }
}

/// The image file, new unless `force`, owned by the client's user.
fn open_for(path: &str, force: bool, peer: Option<Peer>) -> Result<std::fs::File, DaemonError> {
    let at = resolved(path, peer);
    let mut o = std::fs::OpenOptions::new();
    o.write(true).mode(0o600);
    if force {
        o.create(true).truncate(true);
    } else {
        o.create_new(true);
    }
    let f = o.open(&at).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => DaemonError::Refused(format!(
            "{path} exists: pick another name, or --force to replace it"
        )),
        _ => DaemonError::Io {
            context: format!("create {path}"),
            source: e,
        },
    })?;
    if let Some(p) = peer {
        std::os::unix::fs::fchown(&f, Some(p.uid), Some(p.gid)).map_err(|e| DaemonError::Io {
            context: format!("chown {path}"),
            source: e,
        })?;
    }
    Ok(f)
}
