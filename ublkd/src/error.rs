use std::path::PathBuf;

use crate::config::ConfigError;

/// Every failure the daemon library reports.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Replication(#[from] replication::ReplicationError),
    #[error(transparent)]
    Server(#[from] replica_server::ServerError),
    #[error("/dev/ublk-control is missing: load the ublk driver with `modprobe ublk_drv`")]
    NoUblkDriver,
    #[error("ublk {what}: {detail}")]
    Ublk { what: String, detail: String },
    #[error("state file {path}: {message}")]
    State { path: PathBuf, message: String },
    #[error("volume {volume}: {message}")]
    Volume { volume: String, message: String },
    #[error("no volume named {0:?} in the configuration")]
    NoSuchVolume(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("reload refused: {0}")]
    Reload(#[from] crate::reload::Refused),
    #[error("reload: {0}")]
    ReloadFailed(String),
    /// No daemon answered on the control socket (or the answer was garbled).
    #[error("control socket {path}: {message}")]
    Control { path: PathBuf, message: String },
    /// The daemon answered, refusing the request: its reason.
    #[error("{0}")]
    Refused(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl DaemonError {
    pub fn ublk(what: impl Into<String>, e: impl std::fmt::Debug) -> DaemonError {
        DaemonError::Ublk {
            what: what.into(),
            detail: format!("{e:?}"),
        }
    }

    pub fn volume(volume: &str, message: impl Into<String>) -> DaemonError {
        DaemonError::Volume {
            volume: volume.to_string(),
            message: message.into(),
        }
    }

    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
        let context = context.into();
        move |source| DaemonError::Io { context, source }
    }
}
