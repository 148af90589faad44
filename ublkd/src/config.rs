//! Configuration file (`ublk.toml`) loading and validation.
//!
//! The file is deserialized in two stages:
//!
//! 1. TOML text -> private `Raw*` structs. Every field is wrapped in
//!    [`toml::Spanned`] so that the byte offset (and therefore the line) of
//!    every value is known, and every table uses `deny_unknown_fields`.
//!    Type errors reported by `toml`/`serde` are turned into
//!    [`ConfigError::Parse`], which names the offending key and line.
//! 2. `Raw*` -> public [`Config`], applying defaults and semantic checks
//!    (ranges, alignment, uniqueness, absolute paths). Violations become
//!    [`ConfigError::Invalid`], again naming the key and its line.
//!
//! A configuration with zero volumes is valid (the daemon idles); callers
//! may want to log a warning when [`Config::volumes`] is empty.
//!
//! Parsing never touches the filesystem or the network: paths are only
//! checked to be absolute and remote addresses only for their syntax. The
//! cluster secret is read separately, with [`read_secret`].

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

/// Default for `[node] state_dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ublkd";
/// Default for `[node] control_socket`.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/ublkd/ublkd.sock";
/// Default for `[node] log_level`.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Accepted values of `[node] log_level`.
pub const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];
/// Default for `[node] io_timeout_ms`.
pub const DEFAULT_IO_TIMEOUT_MS: u32 = 3000;
/// Lower bound for `[node] io_timeout_ms`.
pub const MIN_IO_TIMEOUT_MS: u32 = 100;
/// Upper bound for `[node] io_timeout_ms` (10 minutes).
pub const MAX_IO_TIMEOUT_MS: u32 = 600_000;
/// Default for `[node] no_replica_timeout_ms`.
pub const DEFAULT_NO_REPLICA_TIMEOUT_MS: u32 = 30_000;
/// Upper bound for `[node] no_replica_timeout_ms` (1 hour).
pub const MAX_NO_REPLICA_TIMEOUT_MS: u32 = 3_600_000;
/// Default for `[server] max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 256;
/// Minimum length of the cluster secret (bytes, after the trailing newline
/// is stripped). See [`read_secret`].
pub const MIN_SECRET_LEN: usize = 16;

/// Default for `[server] storage_dir`.
pub const DEFAULT_STORAGE_DIR: &str = "/var/lib/ublkd/replicas";

/// Default for `block_size` (bytes).
pub const DEFAULT_BLOCK_SIZE: u32 = 512;
/// Default for `queues`.
pub const DEFAULT_QUEUES: u16 = 1;
/// Upper bound for `queues`.
pub const MAX_QUEUES: u16 = 32;
/// Default for `depth`.
pub const DEFAULT_DEPTH: u16 = 128;
/// Upper bound for `depth`.
pub const MAX_DEPTH: u16 = 4096;
/// Default for `max_io` (bytes).
pub const DEFAULT_MAX_IO_BYTES: u32 = 512 * 1024;
/// Lower bound for `max_io` (bytes); `max_io` must also be a multiple of it.
pub const MIN_MAX_IO_BYTES: u32 = 4096;
/// Upper bound for `max_io` (bytes), the kernel's ublk limit.
pub const MAX_MAX_IO_BYTES: u32 = 32 * 1024 * 1024;
/// Upper bound (exclusive) for `device_id`.
pub const MAX_DEVICE_ID: u32 = 1 << 20;
/// Upper bound (inclusive) for `size` (bytes).
pub const MAX_VOLUME_SIZE: u64 = 1 << 63;
/// Upper bound for the number of replicas of one volume.
pub const MAX_REPLICAS: usize = replication::MAX_REPLICAS;
/// Maximum length of a volume name and of a remote replica `id`.
pub const MAX_NAME_LEN: usize = wire::names::MAX_NAME_LEN;

/// The whole daemon configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Config {
    pub node: NodeConfig,
    /// Volumes in file order. May be empty (the daemon then idles).
    pub volumes: Vec<VolumeConfig>,
    /// The `[server]` section: present if this node serves replicas to
    /// other nodes.
    pub server: Option<ServerConfig>,
    /// The `[rebuild]` section (defaults when absent).
    pub rebuild: RebuildConfig,
    /// The `[ha]` section (defaults when absent).
    pub ha: HaConfig,
    /// `[metrics] listen`: where `/metrics` is served (`None`: not at all).
    pub metrics_listen: Option<SocketAddr>,
}

/// The `[ha]` section: how this node's HA monitor watches the replica servers
/// its volumes use and replaces the replicas of a dead one on a spare.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HaConfig {
    /// A server failing its probes this long is dead (its replicas are replaced).
    pub grace_ms: u32,
    /// How often every server is probed.
    pub probe_interval_ms: u32,
    /// Good probes in a row that bring a dead server back.
    pub rejoin_probes: u32,
    /// Replacements in progress at once on this node.
    pub max_concurrent: u32,
}

/// Default of `[ha] grace_ms`: 5 s, well above a server restart's blip and a
/// probe's timeout, well below what an operator would take to notice.
pub const DEFAULT_HA_GRACE_MS: u32 = 5000;

impl Default for HaConfig {
    fn default() -> Self {
        HaConfig {
            grace_ms: DEFAULT_HA_GRACE_MS,
            probe_interval_ms: 1000,
            rejoin_probes: 3,
            max_concurrent: 2,
        }
    }
}

/// The `[rebuild]` section: how this node rebuilds its volumes' replicas.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RebuildConfig {
    /// Bytes per second one rebuild copies at most; 0 = uncapped.
    pub rate: u64,
    /// Percent of its time a rebuild may copy while the volume serves application
    /// I/O (100: it does not yield).
    pub busy_percent: u32,
    /// Rebuilds running at once on this node (the others wait their turn).
    pub max_concurrent: u32,
    /// A replica away longer than this (seconds) is rebuilt in full, not in part;
    /// a volume's `partial_window_s` overrides it.
    pub partial_window_s: u32,
    /// Bytes per dirty-map region (a power of two, 4KiB..4MiB): what a partial
    /// rebuild copies per write missed. Changing it makes saved maps unusable (full
    /// rebuilds of the replicas that had one).
    pub grain: u32,
}

/// Default of `[rebuild] rate`: 64 MiB/s, most of a disk's bandwidth left to
/// the applications.
pub const DEFAULT_REBUILD_RATE: u64 = 64 << 20;
/// Default of `[rebuild] max_concurrent`.
pub const DEFAULT_REBUILD_CONCURRENCY: u32 = 2;
/// Default of `partial_window_s`: 10 minutes.
pub const DEFAULT_PARTIAL_WINDOW_S: u32 = 600;
/// Upper bound of `partial_window_s`: 30 days.
pub const MAX_PARTIAL_WINDOW_S: u32 = 30 * 86400;

impl Default for RebuildConfig {
    fn default() -> Self {
        RebuildConfig {
            rate: DEFAULT_REBUILD_RATE,
            busy_percent: replication::rebuild::DEFAULT_BUSY_PERCENT,
            max_concurrent: DEFAULT_REBUILD_CONCURRENCY,
            partial_window_s: DEFAULT_PARTIAL_WINDOW_S,
            grain: replication::dirty::Grain::DEFAULT.0,
        }
    }
}

/// The `[node]` section.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeConfig {
    /// Absolute directory for daemon state.
    pub state_dir: PathBuf,
    /// Absolute path of the control unix socket.
    pub control_socket: PathBuf,
    /// One of [`LOG_LEVELS`], always lower case.
    pub log_level: String,
    /// Absolute path of the file holding the secret shared by all nodes of
    /// the cluster (read it with [`read_secret`]). Always `Some` when a
    /// volume has a remote replica or `[server]` is present.
    pub cluster_secret_file: Option<PathBuf>,
    /// Deadline of one request to a remote replica, in milliseconds:
    /// [`MIN_IO_TIMEOUT_MS`]..=[`MAX_IO_TIMEOUT_MS`].
    pub io_timeout_ms: u32,
    /// How long I/O waits for the last current replica when its connection is
    /// lost, before it fails, in milliseconds: 0..=[`MAX_NO_REPLICA_TIMEOUT_MS`].
    pub no_replica_timeout_ms: u32,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            control_socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            log_level: DEFAULT_LOG_LEVEL.to_string(),
            cluster_secret_file: None,
            io_timeout_ms: DEFAULT_IO_TIMEOUT_MS,
            no_replica_timeout_ms: DEFAULT_NO_REPLICA_TIMEOUT_MS,
        }
    }
}

/// The `[server]` section: this node stores replicas for other nodes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerConfig {
    /// Address to listen on (an IP address, not a hostname; port != 0).
    pub listen: SocketAddr,
    /// Absolute directory holding the served replicas, one `<id>.img` each.
    pub storage_dir: PathBuf,
    /// Authenticated connections at once: 1..=65536.
    pub max_connections: u32,
}

/// One `[[volume]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VolumeConfig {
    /// `[A-Za-z0-9_.-]{1,64}` (not `.` or `..`), unique.
    pub name: String,
    /// Size in bytes: > 0, multiple of `block_size`, <= 2^63.
    pub size: u64,
    /// 512 or 4096.
    pub block_size: u32,
    /// 1..=32.
    pub queues: u16,
    /// 1..=4096.
    pub depth: u16,
    /// From key `max_io`: multiple of 4096 in 4KiB..=32MiB.
    pub max_io_bytes: u32,
    /// Stable `/dev/ublkbN` id, unique, < 2^20. `None` = kernel picks.
    pub device_id: Option<u32>,
    /// 1..=8 replicas with distinct backing paths / remote `(addr, id)`s.
    pub replicas: Vec<ReplicaConfig>,
    /// Overrides `[rebuild] partial_window_s` for this volume.
    pub partial_window_s: Option<u32>,
    /// Replica servers (`host:port`, canonical form) the HA monitor may place a
    /// replacement replica on; distinct.
    pub spares: Vec<String>,
    /// Scheduled snapshots and their retention (key `snapshots`).
    pub snapshots: Option<crate::schedule::Schedule>,
}

/// One replica of a volume.
///
/// TOML: each element of `replicas` is an inline table whose keys select the
/// kind, e.g. `{ local = "/abs/path" }` or
/// `{ remote = "node-b:7000", id = "vol0-r2" }`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ReplicaConfig {
    /// A local file (created sparse by the daemon) or block device.
    Local {
        path: PathBuf,
        /// Use it even when it has no replica label but holds recognisable data
        /// (a filesystem, LVM, a partition table): adopted as the volume's data
        /// on its first start, overwritten by a full rebuild otherwise. Without
        /// it such a path is refused (`use_unlabelled = true` in the config).
        use_unlabelled: bool,
    },
    /// A replica stored by the ublkd `[server]` of another node.
    Remote {
        /// `host:port` as written; host is a hostname, an IPv4 address or a
        /// bracketed IPv6 address. Only the syntax is checked (no DNS).
        addr: String,
        /// Name of the replica on that server (`<id>.img` in its
        /// `storage_dir`); same rules as a volume name.
        id: String,
    },
}

impl ReplicaConfig {
    /// The local backing path, if this replica is local.
    pub fn local_path(&self) -> Option<&Path> {
        match self {
            ReplicaConfig::Local { path, .. } => Some(path),
            ReplicaConfig::Remote { .. } => None,
        }
    }

    /// `(addr, id)`, if this replica is remote.
    pub fn remote(&self) -> Option<(&str, &str)> {
        match self {
            ReplicaConfig::Local { .. } => None,
            ReplicaConfig::Remote { addr, id } => Some((addr, id)),
        }
    }

    /// The replica a saved [`ReplicaConfig::location`] names (`id@addr`: remote,
    /// else a local path), with no option set.
    pub fn from_location(location: &str) -> ReplicaConfig {
        match location.split_once('@') {
            Some((id, addr)) => ReplicaConfig::Remote {
                addr: addr.to_string(),
                id: id.to_string(),
            },
            None => ReplicaConfig::Local {
                path: location.into(),
                use_unlabelled: false,
            },
        }
    }

    /// Stable identity of the replica in state files, logs and the CLI:
    /// the path of a local replica, `id@addr` for a remote one.
    pub fn location(&self) -> String {
        match self {
            ReplicaConfig::Local { path, .. } => path.display().to_string(),
            ReplicaConfig::Remote { addr, id } => format!("{id}@{addr}"),
        }
    }
}

impl Config {
    /// Reads and parses a configuration file. The path (as given) is used as
    /// the origin in error messages.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses configuration text. `origin` (usually the file name) prefixes
    /// error messages, e.g. `ublk.toml:12: ...`.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| parse_error(text, origin, &e))?;
        Validator { text, origin }.config(raw)
    }

    /// Looks up a volume by name.
    pub fn volume(&self, name: &str) -> Option<&VolumeConfig> {
        self.volumes.iter().find(|v| v.name == name)
    }
}

/// Errors from loading a configuration. `Display` is always a single line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read: the configuration file, or (from
    /// [`read_secret`]) the cluster secret, which is also refused when it is
    /// too short or accessible by group/others.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax error or a value of the wrong type / an unknown key.
    #[error("{origin}:{line}:{column}: {}{message}", prefix(section, key))]
    Parse {
        origin: String,
        /// 1-based line.
        line: usize,
        /// 1-based column (in characters).
        column: usize,
        /// e.g. `volume "vol0"`, `volume #2`, `[node]`, `[server]`; `None` if
        /// unknown or top level.
        section: Option<String>,
        /// Key path relative to `section`, e.g. `block_size`,
        /// `replicas[1].local`; `None` if it could not be determined.
        key: Option<String>,
        message: String,
    },
    /// The file is well-formed but a value violates a rule.
    #[error("{origin}:{line}: {}{message}", prefix(section, &Some(key.clone())))]
    Invalid {
        origin: String,
        /// 1-based line of the offending value.
        line: usize,
        /// e.g. `volume "vol0"`, `volume #2`, `[node]`, `[server]`; `None` at
        /// top level.
        section: Option<String>,
        /// Key path relative to `section`, e.g. `block_size`, `replicas[1].local`.
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// 1-based line of the error, if it has one.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Io { .. } => None,
            ConfigError::Parse { line, .. } | ConfigError::Invalid { line, .. } => Some(*line),
        }
    }

    /// The offending key, if known.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Io { .. } => None,
            ConfigError::Parse { key, .. } => key.as_deref(),
            ConfigError::Invalid { key, .. } => Some(key),
        }
    }
}

fn prefix(section: &Option<String>, key: &Option<String>) -> String {
    let mut s = String::new();
    if let Some(section) = section {
        s.push_str(section);
        s.push_str(": ");
    }
    if let Some(key) = key {
        s.push_str(&format!("key \"{key}\": "));
    }
    s
}

/// Parses a size such as `"10GiB"`, `"512 KiB"`, `"4k"` or `"4096"` into bytes.
///
/// Units are binary and case-insensitive: `B`, `KiB`, `MiB`, `GiB`, `TiB`,
/// with `K`, `M`, `G`, `T` accepted as aliases. No unit means bytes.
/// Decimal units (`KB`, `GB`, ...) and fractions are rejected.
pub fn parse_size(input: &str) -> Result<u64, String> {
    const ACCEPTED: &str = "accepted units: B, KiB, MiB, GiB, TiB (binary; K, M, G, T are aliases)";
    let s = input.trim();
    if s.is_empty() {
        return Err(format!("empty size; expected e.g. \"10GiB\"; {ACCEPTED}"));
    }
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, rest) = s.split_at(digits_end);
    if number.is_empty() {
        return Err(format!(
            "{input:?} is not a size: expected a whole number optionally followed by a unit, e.g. \"10GiB\"; {ACCEPTED}"
        ));
    }
    if rest.starts_with(['.', ',']) {
        return Err(format!(
            "{input:?}: fractional sizes are not supported; use a smaller unit (e.g. \"1536MiB\" instead of \"1.5GiB\")"
        ));
    }
    let unit = rest.trim_start();
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        lower @ ("kb" | "mb" | "gb" | "tb") => {
            let binary = format!("{}iB", lower[..1].to_ascii_uppercase());
            return Err(format!(
                "{input:?}: decimal unit \"{unit}\" is not accepted, did you mean \"{number}{binary}\"? {ACCEPTED}"
            ));
        }
        _ => return Err(format!("{input:?}: unknown unit \"{unit}\"; {ACCEPTED}")),
    };
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{input:?} is too large"))?;
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{input:?} is too large"))
}

/// A user trusted with the daemon's secrets and control: root, or the daemon's own.
pub fn trusted_uid(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// Reads the cluster secret from `path` (`[node] cluster_secret_file`).
///
/// One trailing `"\n"` (or `"\r\n"`) is stripped; everything else is part
/// of the secret. Fails with [`ConfigError::Io`], naming the path, if the
/// file cannot be read, if it is accessible by group or others
/// (`mode & 0o077 != 0`), or if the secret is shorter than
/// [`MIN_SECRET_LEN`] bytes.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, ConfigError> {
    use std::os::unix::fs::PermissionsExt;

    let fail = |source: std::io::Error| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    };
    let refuse = |kind: std::io::ErrorKind, message: String| {
        fail(std::io::Error::new(
            kind,
            format!("cluster secret file {message}"),
        ))
    };
    use std::os::unix::fs::MetadataExt;
    let mut file = std::fs::File::open(path).map_err(fail)?;
    // Check the file actually opened (no race with a rename).
    let meta = file.metadata().map_err(fail)?;
    let mode = meta.permissions().mode();
    let ours = nix::unistd::geteuid().as_raw();
    // Whoever owns the file, or can replace it in its directory, holds the key.
    if !trusted_uid(meta.uid()) {
        return Err(refuse(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "is owned by uid {}; it must belong to root or to the daemon's user (uid {ours}): chown it",
                meta.uid()
            ),
        ));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let d = std::fs::metadata(dir).map_err(fail)?;
        let sticky = d.mode() & 0o1000 != 0;
        if !trusted_uid(d.uid()) || (d.mode() & 0o022 != 0 && !sticky) {
            return Err(refuse(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "is in {}, which others may write to (owner uid {}, mode {:03o}): someone could replace the secret; keep it in a directory only root or the daemon's user can write, e.g. /etc/ublkd",
                    dir.display(),
                    d.uid(),
                    d.mode() & 0o7777
                ),
            ));
        }
    }
    if mode & 0o077 != 0 {
        return Err(refuse(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "has mode {:03o}; it must not be accessible by group/others (chmod 600)",
                mode & 0o777
            ),
        ));
    }
    let mut secret = Vec::new();
    file.read_to_end(&mut secret).map_err(fail)?;
    if secret.ends_with(b"\r\n") {
        secret.truncate(secret.len() - 2);
    } else if secret.ends_with(b"\n") {
        secret.truncate(secret.len() - 1);
    }
    if secret.len() < MIN_SECRET_LEN {
        return Err(refuse(
            std::io::ErrorKind::InvalidData,
            format!(
                "holds a {}-byte secret; it must be at least {MIN_SECRET_LEN} bytes (e.g. generate one with: head -c 32 /dev/urandom | base64)",
                secret.len()
            ),
        ));
    }
    Ok(secret)
}

// ---------------------------------------------------------------------------
// Raw (spanned) representation
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: Option<RawNode>,
    #[serde(default, rename = "volume")]
    volumes: Vec<Spanned<RawVolume>>,
    // Not `Spanned`: a table defined only by dotted keys
    // (`server.listen = ...`) or implied by `[server.x]` has no span and would
    // fail to deserialize. See `ServerPos`.
    server: Option<RawServer>,
    rebuild: Option<RawRebuild>,
    ha: Option<RawHa>,
    metrics: Option<RawMetrics>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHa {
    grace_ms: Option<Spanned<i64>>,
    probe_interval_ms: Option<Spanned<i64>>,
    rejoin_probes: Option<Spanned<i64>>,
    max_concurrent: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRebuild {
    rate: Option<Spanned<RawSize>>,
    max_concurrent: Option<Spanned<i64>>,
    busy_percent: Option<Spanned<i64>>,
    partial_window_s: Option<Spanned<i64>>,
    grain: Option<Spanned<RawSize>>,
}

/// Only the position of the `server` table, when it has one (it has none if
/// it is defined only by dotted keys).
#[derive(Deserialize)]
struct ServerPos {
    server: Option<Spanned<IgnoredAny>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    state_dir: Option<Spanned<String>>,
    control_socket: Option<Spanned<String>>,
    log_level: Option<Spanned<String>>,
    cluster_secret_file: Option<Spanned<String>>,
    io_timeout_ms: Option<Spanned<i64>>,
    no_replica_timeout_ms: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Spanned<String>>,
    storage_dir: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    name: Option<Spanned<String>>,
    size: Option<Spanned<RawSize>>,
    block_size: Option<Spanned<i64>>,
    queues: Option<Spanned<i64>>,
    depth: Option<Spanned<i64>>,
    max_io: Option<Spanned<RawSize>>,
    device_id: Option<Spanned<i64>>,
    replicas: Option<Spanned<Vec<Spanned<RawReplica>>>>,
    partial_window_s: Option<Spanned<i64>>,
    spares: Option<Spanned<Vec<Spanned<String>>>>,
    snapshots: Option<Spanned<RawSchedule>>,
}

/// `snapshots = { every = "1h", keep = 24, freeze = true }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    every: Option<Spanned<String>>,
    keep: Option<Spanned<i64>>,
    freeze: Option<Spanned<bool>>,
}

/// One element of `replicas`. Each replica kind is a key (`local`,
/// `remote`); exactly one kind key must be present. Other keys (`id`) are
/// attributes of a kind, checked in `Validator::replica`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplica {
    local: Option<Spanned<String>>,
    remote: Option<Spanned<String>>,
    id: Option<Spanned<String>>,
    use_unlabelled: Option<Spanned<bool>>,
}

/// A size as written: a string with unit or a bare integer (bytes).
enum RawSize {
    Int(i64),
    Str(String),
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size string such as \"10GiB\" or an integer number of bytes")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawSize, E> {
                Ok(RawSize::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawSize, E> {
                i64::try_from(v)
                    .map(RawSize::Int)
                    .map_err(|_| E::custom("size is too large"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSize, E> {
                Ok(RawSize::Str(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl RawSize {
    /// Bytes, or an error message (without key/line).
    fn bytes(&self) -> Result<u64, String> {
        match self {
            RawSize::Int(v) => u64::try_from(*v).map_err(|_| format!("must be positive, got {v}")),
            RawSize::Str(s) => parse_size(s),
        }
    }

    fn as_written(&self) -> String {
        match self {
            RawSize::Int(v) => v.to_string(),
            RawSize::Str(s) => format!("{s:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Semantic validation
// ---------------------------------------------------------------------------

struct Validator<'a> {
    text: &'a str,
    origin: &'a str,
}

/// Where a backing path (or a remote `(addr, id)`) was first seen, for
/// duplicate diagnostics.
struct PathUse {
    volume: String,
    replica: usize,
    line: usize,
}

/// What the volumes seen so far use, for the file-wide uniqueness checks.
#[derive(Default)]
struct Seen {
    /// Volume name -> line.
    names: HashMap<String, usize>,
    /// device_id -> (volume, line).
    device_ids: HashMap<u32, (String, usize)>,
    /// Normalized local backing path -> first use.
    paths: HashMap<PathBuf, PathUse>,
    /// Canonical remote (addr, id) -> first use.
    remotes: HashMap<(String, String), PathUse>,
    /// The first volume with spares: (line, volume).
    first_spares: Option<(usize, String)>,
}

impl Validator<'_> {
    fn line(&self, span: &Range<usize>) -> usize {
        line_col(self.text, span.start).0
    }

    fn invalid(
        &self,
        span: &Range<usize>,
        section: &Option<String>,
        key: &str,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_string(),
            line: self.line(span),
            section: section.clone(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let node = match raw.node {
            Some(n) => self.node(n)?,
            None => NodeConfig::default(),
        };
        let mut volumes: Vec<VolumeConfig> = Vec::with_capacity(raw.volumes.len());
        let mut seen = Seen::default();
        for (index, raw_volume) in raw.volumes.into_iter().enumerate() {
            let volume_span = raw_volume.span();
            let volume = self.volume(index, volume_span, raw_volume.into_inner(), &mut seen)?;
            volumes.push(volume);
        }
        let mut server_line = None;
        let server = match raw.server {
            Some(s) => {
                let span = self.server_span(&s);
                server_line = Some(self.line(&span));
                Some(self.server(s, span)?)
            }
            None => None,
        };

        // Replica traffic between nodes is authenticated with the cluster
        // secret: a node that talks to (or serves) remote replicas needs it.
        if node.cluster_secret_file.is_none() {
            let first_remote = seen
                .remotes
                .values()
                .min_by_key(|u| (u.line, u.replica))
                .map(|u| {
                    (
                        u.line,
                        format!("replicas[{}] of volume {:?} is remote", u.replica, u.volume),
                    )
                });
            let server = server_line.map(|line| (line, "a [server] section exists".to_string()));
            let spares = seen
                .first_spares
                .clone()
                .map(|(line, v)| (line, format!("volume {v:?} has spares")));
            let first = [first_remote, server, spares]
                .into_iter()
                .flatten()
                .min_by_key(|(line, _)| *line);
            if let Some((line, why)) = first {
                return Err(ConfigError::Invalid {
                    origin: self.origin.to_string(),
                    line,
                    section: Some("[node]".to_string()),
                    key: "cluster_secret_file".to_string(),
                    message: format!(
                        "missing required key: {why} (line {line}), and nodes authenticate replica traffic with a shared secret; add e.g. cluster_secret_file = \"/etc/ublkd/cluster.secret\" to [node]"
                    ),
                });
            }
        }
        let rebuild = match raw.rebuild {
            Some(r) => self.rebuild(r)?,
            None => RebuildConfig::default(),
        };
        let ha = match raw.ha {
            Some(h) => self.ha(h)?,
            None => HaConfig::default(),
        };
        let metrics_listen = match raw.metrics.and_then(|m| m.listen) {
            Some(v) => Some(self.metrics_listen(&v)?),
            None => None,
        };
        Ok(Config {
            node,
            volumes,
            server,
            rebuild,
            ha,
            metrics_listen,
        })
    }

    fn ha(&self, raw: RawHa) -> Result<HaConfig, ConfigError> {
        let section = Some("[ha]".to_string());
        let mut h = HaConfig::default();
        if let Some(v) = &raw.grace_ms {
            h.grace_ms = self.ranged(v, &section, "grace_ms", 1000, 3_600_000)? as u32;
        }
        if let Some(v) = &raw.probe_interval_ms {
            h.probe_interval_ms =
                self.ranged(v, &section, "probe_interval_ms", 100, 60_000)? as u32;
        }
        if let Some(v) = raw.rejoin_probes {
            h.rejoin_probes = self.ranged(&v, &section, "rejoin_probes", 1, 100)? as u32;
        }
        if let Some(v) = raw.max_concurrent {
            h.max_concurrent = self.ranged(&v, &section, "max_concurrent", 1, 64)? as u32;
        }
        if h.probe_interval_ms >= h.grace_ms {
            let (key, span) = match (&raw.probe_interval_ms, &raw.grace_ms) {
                (Some(p), _) => ("probe_interval_ms", p.span()),
                (None, Some(g)) => ("grace_ms", g.span()),
                (None, None) => unreachable!("the defaults are consistent"),
            };
            return Err(self.invalid(
                &span,
                &section,
                key,
                format!(
                    "probe_interval_ms ({} ms) must be below grace_ms ({} ms): a server would be declared dead on its first failed probe",
                    h.probe_interval_ms, h.grace_ms
                ),
            ));
        }
        Ok(h)
    }

    fn rebuild(&self, raw: RawRebuild) -> Result<RebuildConfig, ConfigError> {
        let section = Some("[rebuild]".to_string());
        let mut r = RebuildConfig::default();
        if let Some(v) = raw.rate {
            let bytes = v
                .get_ref()
                .bytes()
                .map_err(|m| self.invalid(&v.span(), &section, "rate", m))?;
            if bytes != 0 && bytes < 1 << 20 || bytes > 64 << 30 {
                return Err(self.invalid(
                    &v.span(),
                    &section,
                    "rate",
                    format!(
                        "bytes per second: 0 (uncapped) or between 1MiB and 64GiB, got {}",
                        v.get_ref().as_written()
                    ),
                ));
            }
            r.rate = bytes;
        }
        if let Some(v) = raw.max_concurrent {
            r.max_concurrent = self.ranged(&v, &section, "max_concurrent", 1, 64)? as u32;
        }
        if let Some(v) = raw.busy_percent {
            r.busy_percent = self.ranged(&v, &section, "busy_percent", 1, 100)? as u32;
        }
        if let Some(v) = raw.partial_window_s {
            r.partial_window_s = self.ranged(
                &v,
                &section,
                "partial_window_s",
                0,
                i64::from(MAX_PARTIAL_WINDOW_S),
            )? as u32;
        }
        if let Some(v) = raw.grain {
            let bytes = v
                .get_ref()
                .bytes()
                .map_err(|m| self.invalid(&v.span(), &section, "grain", m))?;
            let ok = u32::try_from(bytes)
                .ok()
                .map(replication::dirty::Grain)
                .and_then(|g| g.check().ok());
            r.grain = ok
                .ok_or_else(|| {
                    self.invalid(
                        &v.span(),
                        &section,
                        "grain",
                        format!(
                            "must be a power of two between 4KiB and 4MiB, got {}",
                            v.get_ref().as_written()
                        ),
                    )
                })?
                .0;
        }
        Ok(r)
    }

    fn node(&self, raw: RawNode) -> Result<NodeConfig, ConfigError> {
        let section = Some("[node]".to_string());
        let mut node = NodeConfig::default();
        if let Some(v) = raw.state_dir {
            node.state_dir = self.absolute_path(&v, &section, "state_dir")?;
        }
        if let Some(v) = raw.control_socket {
            node.control_socket = self.absolute_path(&v, &section, "control_socket")?;
        }
        if let Some(v) = raw.log_level {
            let level = v.get_ref().to_ascii_lowercase();
            if !LOG_LEVELS.contains(&level.as_str()) {
                return Err(self.invalid(
                    &v.span(),
                    &section,
                    "log_level",
                    format!(
                        "must be one of {}, got {:?}",
                        LOG_LEVELS.join("|"),
                        v.get_ref()
                    ),
                ));
            }
            node.log_level = level;
        }
        if let Some(v) = raw.cluster_secret_file {
            node.cluster_secret_file =
                Some(self.absolute_path(&v, &section, "cluster_secret_file")?);
        }
        if let Some(v) = raw.io_timeout_ms {
            node.io_timeout_ms = self.ranged(
                &v,
                &section,
                "io_timeout_ms",
                i64::from(MIN_IO_TIMEOUT_MS),
                i64::from(MAX_IO_TIMEOUT_MS),
            )? as u32;
        }
        if let Some(v) = raw.no_replica_timeout_ms {
            node.no_replica_timeout_ms = self.ranged(
                &v,
                &section,
                "no_replica_timeout_ms",
                0,
                i64::from(MAX_NO_REPLICA_TIMEOUT_MS),
            )? as u32;
        }
        Ok(node)
    }

    /// Where the `server` table is: its header (or inline table), else its
    /// first key.
    fn server_span(&self, raw: &RawServer) -> Range<usize> {
        if let Ok(ServerPos { server: Some(s) }) = toml::from_str(self.text) {
            return s.span();
        }
        let first = [&raw.listen, &raw.storage_dir]
            .into_iter()
            .flatten()
            .map(|v| v.span())
            .chain(raw.max_connections.iter().map(|v| v.span()))
            .min_by_key(|s| s.start);
        first.unwrap_or(0..0)
    }

    fn metrics_listen(&self, v: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
        let bad = |what: &str| {
            self.invalid(
                &v.span(),
                &Some("[metrics]".to_string()),
                "listen",
                format!("{what}, got {:?}", v.get_ref()),
            )
        };
        let addr: SocketAddr = v.get_ref().parse().map_err(|_| {
            bad("must be \"IP:port\" with an IP address, e.g. \"127.0.0.1:9850\" (this node only) or \"0.0.0.0:9850\"")
        })?;
        if addr.port() == 0 {
            return Err(bad("port must be between 1 and 65535"));
        }
        Ok(addr)
    }

    fn server(&self, raw: RawServer, span: Range<usize>) -> Result<ServerConfig, ConfigError> {
        let section = Some("[server]".to_string());
        let Some(listen_v) = raw.listen else {
            return Err(self.invalid(
                &span,
                &section,
                "listen",
                "missing required key (e.g. listen = \"0.0.0.0:7000\")",
            ));
        };
        let bad_listen = |what: &str| {
            self.invalid(
                &listen_v.span(),
                &section,
                "listen",
                format!("{what}, got {:?}", listen_v.get_ref()),
            )
        };
        let listen: SocketAddr = listen_v.get_ref().parse().map_err(|_| {
            bad_listen("must be \"IP:port\" with an IP address (not a hostname), e.g. \"0.0.0.0:7000\" or \"[::]:7000\"")
        })?;
        if listen.port() == 0 {
            return Err(bad_listen("port must be between 1 and 65535"));
        }
        let storage_dir = match &raw.storage_dir {
            None => PathBuf::from(DEFAULT_STORAGE_DIR),
            Some(v) => self.absolute_path(v, &section, "storage_dir")?,
        };
        let max_connections = match &raw.max_connections {
            None => DEFAULT_MAX_CONNECTIONS,
            Some(v) => self.ranged(v, &section, "max_connections", 1, 65536)? as u32,
        };
        Ok(ServerConfig {
            listen,
            storage_dir,
            max_connections,
        })
    }

    fn absolute_path(
        &self,
        v: &Spanned<String>,
        section: &Option<String>,
        key: &str,
    ) -> Result<PathBuf, ConfigError> {
        let path = Path::new(v.get_ref());
        if !path.is_absolute() {
            return Err(self.invalid(
                &v.span(),
                section,
                key,
                format!("path must be absolute, got {:?}", v.get_ref()),
            ));
        }
        Ok(path.to_path_buf())
    }

    /// Checks an integer against an inclusive range.
    fn schedule(
        &self,
        v: &Spanned<RawSchedule>,
        section: &Option<String>,
    ) -> Result<crate::schedule::Schedule, ConfigError> {
        let raw = v.get_ref();
        let every = raw.every.as_ref().ok_or_else(|| {
            self.invalid(
                &v.span(),
                section,
                "snapshots",
                "needs `every` (e.g. \"1h\") and `keep` (e.g. 24)",
            )
        })?;
        let every_ms = parse_duration_ms(every.get_ref())
            .ok()
            .filter(|ms| *ms >= crate::schedule::MIN_EVERY_MS)
            .ok_or_else(|| {
                self.invalid(
                    &every.span(),
                    section,
                    "snapshots.every",
                    format!(
                        "{:?}: a time of at least a minute with s, m, h or d, e.g. \"1h\"",
                        every.get_ref()
                    ),
                )
            })?;
        let keep = raw.keep.as_ref().ok_or_else(|| {
            self.invalid(
                &v.span(),
                section,
                "snapshots",
                "needs `keep`: how many scheduled snapshots to keep (e.g. 24)",
            )
        })?;
        // One below the store's limit: the next is taken before the oldest goes.
        let limit = snapshot::layered::DEFAULT_MAX_SNAPSHOTS as i64 - 1;
        let keep = self.ranged(keep, section, "snapshots.keep", 1, limit)? as u32;
        Ok(crate::schedule::Schedule {
            every_ms,
            keep,
            freeze: raw.freeze.as_ref().is_some_and(|f| *f.get_ref()),
        })
    }

    fn ranged(
        &self,
        v: &Spanned<i64>,
        section: &Option<String>,
        key: &str,
        min: i64,
        max: i64,
    ) -> Result<i64, ConfigError> {
        let value = *v.get_ref();
        if value < min || value > max {
            return Err(self.invalid(
                &v.span(),
                section,
                key,
                format!("must be between {min} and {max}, got {value}"),
            ));
        }
        Ok(value)
    }

    /// Checks a name (volume `name`, remote replica `id`): 1 to
    /// [`MAX_NAME_LEN`] characters from `[A-Za-z0-9_.-]`, not `.` or `..`.
    fn name(
        &self,
        v: &Spanned<String>,
        section: &Option<String>,
        key: &str,
    ) -> Result<String, ConfigError> {
        let name = v.get_ref();
        let ok = wire::names::valid_name(name);
        if !ok {
            return Err(self.invalid(
                &v.span(),
                section,
                key,
                format!("must be {}, got {name:?}", wire::names::NAME_RULE),
            ));
        }
        Ok(name.clone())
    }

    fn volume(
        &self,
        index: usize,
        volume_span: Range<usize>,
        raw: RawVolume,
        seen: &mut Seen,
    ) -> Result<VolumeConfig, ConfigError> {
        // Until the name is validated, refer to the volume by position.
        let mut section = Some(format!("volume #{}", index + 1));
        let missing = |key: &str, what: &str| {
            self.invalid(
                &volume_span,
                &section,
                key,
                format!("missing required key ({what})"),
            )
        };

        // name
        let Some(name_v) = raw.name else {
            return Err(missing("name", "e.g. name = \"vol0\""));
        };
        let name = self.name(&name_v, &section, "name")?;
        if let Some(first) = seen.names.get(&name) {
            return Err(self.invalid(
                &name_v.span(),
                &section,
                "name",
                format!("duplicate volume name {name:?} (first defined at line {first})"),
            ));
        }
        seen.names.insert(name.clone(), self.line(&name_v.span()));
        section = Some(format!("volume {name:?}"));

        // block_size (needed to validate size)
        let block_size = match &raw.block_size {
            None => DEFAULT_BLOCK_SIZE,
            Some(v) => match *v.get_ref() {
                512 => 512,
                4096 => 4096,
                other => {
                    return Err(self.invalid(
                        &v.span(),
                        &section,
                        "block_size",
                        format!("must be 512 or 4096, got {other}"),
                    ))
                }
            },
        };

        // size
        let Some(size_v) = &raw.size else {
            return Err(self.invalid(
                &volume_span,
                &section,
                "size",
                "missing required key (e.g. size = \"10GiB\")",
            ));
        };
        let size = size_v
            .get_ref()
            .bytes()
            .map_err(|m| self.invalid(&size_v.span(), &section, "size", m))?;
        let written = size_v.get_ref().as_written();
        if size == 0 {
            return Err(self.invalid(
                &size_v.span(),
                &section,
                "size",
                format!("must be greater than 0, got {written}"),
            ));
        }
        if size > MAX_VOLUME_SIZE {
            return Err(self.invalid(
                &size_v.span(),
                &section,
                "size",
                format!("must be at most 2^63 bytes (8388608TiB), got {written}"),
            ));
        }
        if size % u64::from(block_size) != 0 {
            return Err(self.invalid(
                &size_v.span(),
                &section,
                "size",
                format!(
                    "must be a multiple of block_size ({block_size}), got {written} = {size} bytes"
                ),
            ));
        }

        // queues, depth
        let queues = match &raw.queues {
            None => DEFAULT_QUEUES,
            Some(v) => self.ranged(v, &section, "queues", 1, i64::from(MAX_QUEUES))? as u16,
        };
        let depth = match &raw.depth {
            None => DEFAULT_DEPTH,
            Some(v) => self.ranged(v, &section, "depth", 1, i64::from(MAX_DEPTH))? as u16,
        };

        // max_io
        let max_io_bytes = match &raw.max_io {
            None => DEFAULT_MAX_IO_BYTES,
            Some(v) => {
                let bytes = v
                    .get_ref()
                    .bytes()
                    .map_err(|m| self.invalid(&v.span(), &section, "max_io", m))?;
                let written = v.get_ref().as_written();
                if !(u64::from(MIN_MAX_IO_BYTES)..=u64::from(MAX_MAX_IO_BYTES)).contains(&bytes) {
                    return Err(self.invalid(
                        &v.span(),
                        &section,
                        "max_io",
                        format!("must be between 4KiB and 32MiB, got {written}"),
                    ));
                }
                if bytes % u64::from(MIN_MAX_IO_BYTES) != 0 {
                    return Err(self.invalid(
                        &v.span(),
                        &section,
                        "max_io",
                        format!("must be a multiple of 4KiB (4096 bytes), got {written} = {bytes} bytes"),
                    ));
                }
                bytes as u32
            }
        };

        // device_id
        let device_id = match &raw.device_id {
            None => None,
            Some(v) => {
                let id =
                    self.ranged(v, &section, "device_id", 0, i64::from(MAX_DEVICE_ID - 1))? as u32;
                if let Some((other, line)) = seen.device_ids.get(&id) {
                    return Err(self.invalid(
                        &v.span(),
                        &section,
                        "device_id",
                        format!("device_id {id} is already used by volume {other:?} (line {line})"),
                    ));
                }
                seen.device_ids
                    .insert(id, (name.clone(), self.line(&v.span())));
                Some(id)
            }
        };

        // replicas
        let Some(replicas_v) = raw.replicas else {
            return Err(self.invalid(
                &volume_span,
                &section,
                "replicas",
                "missing required key (e.g. replicas = [ { local = \"/var/lib/ublkd/vol0-a.img\" } ])",
            ));
        };
        let replicas_span = replicas_v.span();
        let raw_replicas = replicas_v.into_inner();
        if raw_replicas.is_empty() || raw_replicas.len() > MAX_REPLICAS {
            return Err(self.invalid(
                &replicas_span,
                &section,
                "replicas",
                format!(
                    "must list between 1 and {MAX_REPLICAS} replicas, got {}",
                    raw_replicas.len()
                ),
            ));
        }
        let mut replicas = Vec::with_capacity(raw_replicas.len());
        for (i, r) in raw_replicas.into_iter().enumerate() {
            replicas.push(self.replica(&name, &section, i, r, seen)?);
        }
        let partial_window_s = match &raw.partial_window_s {
            Some(v) => Some(self.ranged(
                v,
                &section,
                "partial_window_s",
                0,
                i64::from(MAX_PARTIAL_WINDOW_S),
            )? as u32),
            None => None,
        };
        let mut spares: Vec<String> = Vec::new();
        if let Some(list) = &raw.spares {
            seen.first_spares
                .get_or_insert_with(|| (self.line(&list.span()), name.clone()));
            for a in list.get_ref() {
                let canonical = check_remote_addr(a.get_ref())
                    .map_err(|m| self.invalid(&a.span(), &section, "spares", m))?;
                if spares.contains(&canonical) {
                    return Err(self.invalid(
                        &a.span(),
                        &section,
                        "spares",
                        format!("{:?} is listed twice", a.get_ref()),
                    ));
                }
                spares.push(canonical);
            }
        }

        let snapshots = match &raw.snapshots {
            Some(v) => Some(self.schedule(v, &section)?),
            None => None,
        };

        Ok(VolumeConfig {
            name,
            size,
            block_size,
            queues,
            depth,
            max_io_bytes,
            device_id,
            replicas,
            partial_window_s,
            spares,
            snapshots,
        })
    }

    fn replica(
        &self,
        volume: &str,
        section: &Option<String>,
        index: usize,
        raw: Spanned<RawReplica>,
        seen: &mut Seen,
    ) -> Result<ReplicaConfig, ConfigError> {
        let span = raw.span();
        let RawReplica {
            local,
            remote,
            id,
            use_unlabelled,
        } = raw.into_inner();
        let owner = |first: &PathUse| {
            if first.volume == volume {
                "this volume".to_string()
            } else {
                format!("volume {:?}", first.volume)
            }
        };
        match (local, remote) {
            (Some(local), None) => {
                if let Some(id) = id {
                    return Err(self.invalid(
                        &id.span(),
                        section,
                        &format!("replicas[{index}].id"),
                        "only remote replicas take an id (a local replica is identified by its path); remove it, or use { remote = \"host:port\", id = \"...\" }",
                    ));
                }
                let key = format!("replicas[{index}].local");
                let path = self.absolute_path(&local, section, &key)?;
                let line = self.line(&local.span());
                if let Some(first) = seen.paths.get(&normalize(&path)) {
                    return Err(self.invalid(
                        &local.span(),
                        section,
                        &key,
                        format!(
                            "backing path {:?} is already used by replicas[{}] of {} (line {}); every replica needs its own file or device",
                            local.get_ref(),
                            first.replica,
                            owner(first),
                            first.line
                        ),
                    ));
                }
                seen.paths.insert(
                    normalize(&path),
                    PathUse {
                        volume: volume.to_string(),
                        replica: index,
                        line,
                    },
                );
                Ok(ReplicaConfig::Local {
                    path,
                    use_unlabelled: use_unlabelled.is_some_and(|u| *u.get_ref()),
                })
            }
            (None, Some(remote)) => {
                if let Some(u) = use_unlabelled {
                    return Err(self.invalid(
                        &u.span(),
                        section,
                        &format!("replicas[{index}].use_unlabelled"),
                        "only local replicas take use_unlabelled (a replica server keeps its own images); remove it",
                    ));
                }
                let addr_key = format!("replicas[{index}].remote");
                let id_key = format!("replicas[{index}].id");
                let canonical = check_remote_addr(remote.get_ref())
                    .map_err(|m| self.invalid(&remote.span(), section, &addr_key, m))?;
                let Some(id_v) = id else {
                    return Err(self.invalid(
                        &span,
                        section,
                        &id_key,
                        "missing required key: a remote replica needs the id it has on the server, e.g. { remote = \"node-b:7000\", id = \"vol0-r2\" }",
                    ));
                };
                let id = self.name(&id_v, section, &id_key)?;
                let addr = remote.into_inner();
                let unique = (canonical, id.clone());
                if let Some(first) = seen.remotes.get(&unique) {
                    return Err(self.invalid(
                        &id_v.span(),
                        section,
                        &id_key,
                        format!(
                            "remote replica {id:?} on {addr:?} is already used by replicas[{}] of {} (line {}); every replica needs its own id on a server",
                            first.replica,
                            owner(first),
                            first.line
                        ),
                    ));
                }
                seen.remotes.insert(
                    unique,
                    PathUse {
                        volume: volume.to_string(),
                        replica: index,
                        line: self.line(&id_v.span()),
                    },
                );
                Ok(ReplicaConfig::Remote { addr, id })
            }
            (Some(_), Some(_)) => Err(self.invalid(
                &span,
                section,
                &format!("replicas[{index}]"),
                "replica has both local and remote; each replica is exactly one kind, split it into two entries",
            )),
            (None, None) => Err(self.invalid(
                &span,
                section,
                &format!("replicas[{index}]"),
                "replica must specify its kind, e.g. { local = \"/abs/path\" } or { remote = \"host:port\", id = \"...\" }",
            )),
        }
    }
}

/// Checks the syntax of a remote replica address, `host:port`, where host is
/// a hostname, an IPv4 address or a bracketed IPv6 address and port is
/// 1..=65535. No name resolution. Returns a canonical form (lower-case
/// hostname, normalized IP, port without leading zeros) to detect
/// duplicates, or an error message (without key/line).
pub fn check_remote_addr(addr: &str) -> Result<String, String> {
    const EXPECTED: &str = "expected \"host:port\" with a hostname, an IPv4 address or a bracketed IPv6 address, e.g. \"node-b:7000\", \"10.0.0.2:7000\" or \"[fd00::2]:7000\"";
    let bad = |what: &str| format!("{what} in {addr:?}; {EXPECTED}");
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let Some((ip, port)) = rest.split_once(']') else {
            return Err(bad("unclosed \"[\""));
        };
        let Some(port) = port.strip_prefix(':') else {
            return Err(bad("missing \":port\" after \"]\""));
        };
        let ip: Ipv6Addr = ip
            .parse()
            .map_err(|_| bad(&format!("{ip:?} is not an IPv6 address")))?;
        (format!("[{ip}]"), port)
    } else {
        let Some((host, port)) = addr.rsplit_once(':') else {
            return Err(bad("missing \":port\""));
        };
        if host.contains(':') {
            return Err(bad("IPv6 addresses must be in brackets"));
        }
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        let canonical = if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            let ip: Ipv4Addr = host
                .parse()
                .map_err(|_| bad(&format!("{host:?} is not an IPv4 address")))?;
            ip.to_string()
        } else {
            let label_ok = |l: &str| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            };
            if host.len() > 253 || !host.split('.').all(label_ok) {
                return Err(bad(&format!(
                    "{host:?} is not a valid hostname (dot-separated labels of 1-63 characters from [A-Za-z0-9-], not starting or ending with \"-\")"
                )));
            }
            host.to_ascii_lowercase()
        };
        (canonical, port)
    };
    let port_ok = !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
    match port.parse::<u32>() {
        Ok(p) if port_ok && (1..=65535).contains(&p) => Ok(format!("{host}:{p}")),
        _ => Err(bad(&format!(
            "port must be between 1 and 65535, got {port:?}"
        ))),
    }
}

/// Lexical normalization (no filesystem access): drops `.`, resolves `..`,
/// collapses repeated separators. Used only to detect duplicate paths.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// 1-based (line, column in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

// ---------------------------------------------------------------------------
// Turning toml/serde errors into ConfigError::Parse with key + line
// ---------------------------------------------------------------------------

fn parse_error(text: &str, origin: &str, err: &toml::de::Error) -> ConfigError {
    let message = err
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
        .replace("expected i64", "expected an integer");
    let span = err.span().unwrap_or(0..0);
    let (line, column) = line_col(text, span.start);

    // A key named by the message itself (unknown/missing/duplicate key).
    let named = ["unknown field `", "missing field `", "duplicate key `"]
        .iter()
        .find_map(|p| {
            let rest = &message[message.find(p)? + p.len()..];
            Some(rest[..rest.find('`')?].to_string())
        });

    // Locate the error in a generic, spanned parse of the document (only
    // possible when the syntax is valid, i.e. for type/unknown-key errors).
    let mut path: Vec<Seg> = match toml::from_str::<Node>(text) {
        Ok(root) if err.span().is_some() => {
            let mut path = Vec::new();
            root.locate(span.start, &mut path);
            path
        }
        Ok(_) => Vec::new(),
        Err(_) => {
            // Syntax error: fall back to the `key = ...` text of the line.
            let key = named.clone().or_else(|| key_on_line(text, span.start));
            return ConfigError::Parse {
                origin: origin.to_string(),
                line,
                column,
                section: None,
                key,
                message,
            };
        }
    };
    if let Some(named) = &named {
        // `unknown field` spans the key itself; `missing field` spans the
        // table. For a key in a table header (`[[volumes]]`) the key lies
        // inside its own value's span, so cut the path back to the container.
        let named_seg = Seg::Key(named.clone());
        if on_header_line(text, span.start) {
            if let Some(i) = path.iter().rposition(|s| *s == named_seg) {
                path.truncate(i);
            }
        }
        if path.last() != Some(&named_seg) {
            path.push(named_seg);
        }
    }

    let (section, rest) = match path.as_slice() {
        [Seg::Key(v), Seg::Index(i), rest @ ..] if v == "volume" => {
            let name = toml::from_str::<Node>(text)
                .ok()
                .and_then(|root| root.volume_name(*i));
            let section = match name {
                Some(n) => format!("volume {n:?}"),
                None => format!("volume #{}", i + 1),
            };
            (Some(section), rest)
        }
        [Seg::Key(n), rest @ ..] if (n == "node" || n == "server") && !rest.is_empty() => {
            (Some(format!("[{n}]")), rest)
        }
        rest => (None, rest),
    };
    let key = if rest.is_empty() {
        None
    } else {
        Some(render_path(rest))
    };

    let mut message = message;
    if key.as_deref() == Some("volume") && message.contains("expected a sequence") {
        message.push_str(" (declare volumes with [[volume]], double brackets)");
    }
    ConfigError::Parse {
        origin: origin.to_string(),
        line,
        column,
        section,
        key,
        message,
    }
}

/// Whether the line containing `offset` is a table header (`[x]`, `[[x]]`).
fn on_header_line(text: &str, offset: usize) -> bool {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    text[start..].trim_start().starts_with('[')
}

/// Best effort: the `key` of a `key = value` line containing `offset`.
fn key_on_line(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let line = &text[start..end];
    let key = line[..line.find('=')?].trim();
    let is_key = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '"' | '\'' | ' '));
    is_key.then(|| key.to_string())
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn render_path(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// Generic spanned TOML tree, used only to map an error offset to a key path.
enum Node {
    Scalar(Option<String>),
    Table(Vec<(String, Spanned<Node>)>),
    Array(Vec<Spanned<Node>>),
}

impl Node {
    /// Appends to `path` the deepest chain of values whose span contains `pos`.
    fn locate(&self, pos: usize, path: &mut Vec<Seg>) {
        let contains = |s: Range<usize>| s.start <= pos && (pos < s.end || s.start == s.end);
        match self {
            Node::Scalar(_) => {}
            Node::Table(entries) => {
                if let Some((k, v)) = entries.iter().find(|(_, v)| contains(v.span())) {
                    path.push(Seg::Key(k.clone()));
                    v.get_ref().locate(pos, path);
                }
            }
            Node::Array(items) => {
                if let Some((i, v)) = items.iter().enumerate().find(|(_, v)| contains(v.span())) {
                    path.push(Seg::Index(i));
                    v.get_ref().locate(pos, path);
                }
            }
        }
    }

    fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Table(entries) => entries
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.get_ref()),
            _ => None,
        }
    }

    fn volume_name(&self, index: usize) -> Option<String> {
        match self.get("volume")? {
            Node::Array(items) => match items.get(index)?.get_ref().get("name")? {
                Node::Scalar(Some(name)) => Some(name.clone()),
                _ => None,
            },
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any TOML value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Scalar(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Scalar(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Scalar(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Scalar(None))
            }
            fn visit_str<E>(self, v: &str) -> Result<Node, E> {
                Ok(Node::Scalar(Some(v.to_string())))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<Node>>()? {
                    items.push(item);
                }
                Ok(Node::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if key.starts_with("$__toml_private") {
                        // A datetime, presented by toml as a magic map.
                        map.next_value::<IgnoredAny>()?;
                        return Ok(Node::Scalar(None));
                    }
                    entries.push((key, map.next_value::<Spanned<Node>>()?));
                }
                Ok(Node::Table(entries))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// "90s", "30m", "2h", "1d" (or plain seconds) in milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let (n, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: a number with s, m, h or d, e.g. 30m"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86400),
        _ => return Err(format!("{s:?}: the unit is s, m, h or d, e.g. 30m")),
    };
    Ok(secs.saturating_mul(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: &str = "ublk.toml";

    fn ok(text: &str) -> Config {
        match Config::parse(text, ORIGIN) {
            Ok(c) => c,
            Err(e) => panic!("expected Ok, got error: {e}"),
        }
    }

    fn err(text: &str) -> ConfigError {
        match Config::parse(text, ORIGIN) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e,
        }
    }

    /// Asserts the error is on `line`, names `key`, is a single line and
    /// contains every string in `contains`.
    fn assert_err(e: &ConfigError, line: usize, key: &str, contains: &[&str]) {
        let s = e.to_string();
        assert!(!s.contains('\n'), "multi-line message: {s:?}");
        assert!(
            s.starts_with(&format!("{ORIGIN}:{line}:")),
            "expected line {line} in {s:?}"
        );
        assert!(
            s.contains(&format!("key \"{key}\"")),
            "expected key {key:?} in {s:?}"
        );
        assert_eq!(e.line(), Some(line), "{s}");
        assert_eq!(e.key(), Some(key), "{s}");
        for c in contains {
            assert!(s.contains(c), "expected {c:?} in {s:?}");
        }
    }

    /// A valid single volume; `extra` lines are inserted after `name`
    /// (line 3 is the first extra line).
    fn vol(extra: &str) -> String {
        format!(
            "[[volume]]\nname = \"vol0\"\n{extra}\nsize = \"1GiB\"\nreplicas = [ {{ local = \"/data/vol0-a.img\" }} ]\n"
        )
    }

    // ---- size parsing ---------------------------------------------------

    #[test]
    fn size_units() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("3MiB"), Ok(3 << 20));
        assert_eq!(parse_size("3M"), Ok(3 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10gib"), Ok(10 << 30));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
    }

    #[test]
    fn size_whitespace() {
        assert_eq!(parse_size("  1GiB  "), Ok(1 << 30));
        assert_eq!(parse_size("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_size("\t512\tKiB\n"), Ok(512 << 10));
    }

    #[test]
    fn size_overflow() {
        assert!(parse_size("16777216TiB").unwrap_err().contains("too large"));
        assert!(parse_size("99999999999999999999")
            .unwrap_err()
            .contains("too large"));
        assert_eq!(parse_size("8388608TiB"), Ok(1 << 63));
    }

    #[test]
    fn size_garbage() {
        for bad in [
            "", "   ", "GiB", "-1GiB", "abc", "1.5GiB", "1,5G", "10 GiB x", "1_024", "0x10",
        ] {
            let e = parse_size(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad:?}");
        }
        assert!(parse_size("1.5GiB").unwrap_err().contains("fractional"));
        let e = parse_size("10PiB").unwrap_err();
        assert!(e.contains("unknown unit \"PiB\""), "{e}");
        assert!(e.contains("KiB, MiB, GiB, TiB"), "{e}");
    }

    #[test]
    fn size_decimal_unit_suggests_binary() {
        let e = parse_size("10GB").unwrap_err();
        assert!(e.contains("did you mean \"10GiB\""), "{e}");
        let e = parse_size("4 kb").unwrap_err();
        assert!(e.contains("\"4KiB\""), "{e}");
    }

    // ---- defaults and full parse ------------------------------------------

    #[test]
    fn empty_file_uses_defaults_and_has_no_volumes() {
        let c = ok("");
        assert_eq!(c.node, NodeConfig::default());
        assert_eq!(c.node.state_dir, Path::new("/var/lib/ublkd"));
        assert_eq!(c.node.control_socket, Path::new("/run/ublkd/ublkd.sock"));
        assert_eq!(c.node.log_level, "info");
        assert_eq!(c.node.cluster_secret_file, None);
        assert_eq!(c.node.io_timeout_ms, 3000);
        assert_eq!(c.server, None);
        assert!(c.volumes.is_empty());
        assert!(c.volume("vol0").is_none());
    }

    #[test]
    fn volume_defaults() {
        let c = ok(&vol(""));
        let v = c.volume("vol0").unwrap();
        assert_eq!(v.size, 1 << 30);
        assert_eq!(v.block_size, 512);
        assert_eq!(v.queues, 1);
        assert_eq!(v.depth, 128);
        assert_eq!(v.max_io_bytes, 512 * 1024);
        assert_eq!(v.device_id, None);
        assert_eq!(
            v.replicas,
            vec![ReplicaConfig::Local {
                path: PathBuf::from("/data/vol0-a.img"),
                use_unlabelled: false,
            }]
        );
    }

    #[test]
    fn full_example_parses() {
        let text = r#"
[node]
state_dir = "/srv/ublkd"
control_socket = "/run/x.sock"
log_level = "DEBUG"

[[volume]]
name = "vol0"
size = "1GiB"
block_size = 4096
queues = 2
depth = 64
max_io = "1MiB"
device_id = 0
replicas = [ { local = "/var/lib/ublkd/vol0-a.img" }, { local = "/dev/sdb" } ]

[[volume]]
name = "Vol_1.b-2"
size = 1048576
max_io = 8192
device_id = 1048575
replicas = [
    { local = "/var/lib/ublkd/v1.img" },
]
"#;
        let c = ok(text);
        assert_eq!(
            c.node,
            NodeConfig {
                state_dir: "/srv/ublkd".into(),
                control_socket: "/run/x.sock".into(),
                log_level: "debug".into(),
                cluster_secret_file: None,
                io_timeout_ms: DEFAULT_IO_TIMEOUT_MS,
                no_replica_timeout_ms: DEFAULT_NO_REPLICA_TIMEOUT_MS,
            }
        );
        assert_eq!(c.server, None);
        assert_eq!(c.volumes.len(), 2);
        assert_eq!(
            c.volumes[0],
            VolumeConfig {
                name: "vol0".into(),
                size: 1 << 30,
                block_size: 4096,
                queues: 2,
                depth: 64,
                max_io_bytes: 1 << 20,
                device_id: Some(0),
                replicas: vec![
                    ReplicaConfig::Local {
                        path: "/var/lib/ublkd/vol0-a.img".into(),
                        use_unlabelled: false,
                    },
                    ReplicaConfig::Local {
                        path: "/dev/sdb".into(),
                        use_unlabelled: false,
                    },
                ],
                partial_window_s: None,
                spares: vec![],
                snapshots: None,
            }
        );
        let v1 = c.volume("Vol_1.b-2").unwrap();
        assert_eq!(v1.size, 1 << 20);
        assert_eq!(v1.max_io_bytes, 8192);
        assert_eq!(v1.device_id, Some(1_048_575));
        assert_eq!(
            v1.replicas[0].local_path(),
            Some(Path::new("/var/lib/ublkd/v1.img"))
        );
    }

    #[test]
    fn ha_section_and_spares_are_read_and_checked() {
        const SECRET: &str = "[node]\ncluster_secret_file = \"/k\"\n";
        let vol = |extra: &str| {
            format!("[[volume]]\nname = \"v\"\nsize = \"1MiB\"\nreplicas = [{{ local = \"/a\" }}]\n{extra}")
        };
        let c = ok(&format!(
            "{SECRET}[ha]\ngrace_ms = 8000\nprobe_interval_ms = 500\nrejoin_probes = 2\nmax_concurrent = 4\n{}",
            vol("spares = [\"10.0.0.4:7450\", \"Node-5:07450\"]\n")
        ));
        assert_eq!(
            c.ha,
            HaConfig {
                grace_ms: 8000,
                probe_interval_ms: 500,
                rejoin_probes: 2,
                max_concurrent: 4
            }
        );
        // Canonical: the same server is recognised however it is written.
        assert_eq!(c.volumes[0].spares, ["10.0.0.4:7450", "node-5:7450"]);
        assert_eq!(ok(&vol("")).ha, HaConfig::default());
        assert!(ok(&vol("")).volumes[0].spares.is_empty());
        for (text, want) in [
            (
                format!("{SECRET}[ha]\ngrace_ms = 10\n"),
                vec!["ublk.toml:4:", "grace_ms", "between 1000 and 3600000"],
            ),
            (
                format!("{SECRET}[ha]\ngrace_ms = 2000\nprobe_interval_ms = 2000\n"),
                vec![
                    "ublk.toml:5:",
                    "probe_interval_ms",
                    "must be below grace_ms",
                ],
            ),
            (format!("{SECRET}[ha]\nspares = []\n"), vec!["spares"]),
            (
                format!("{SECRET}{}", vol("spares = [\"10.0.0.4\"]\n")),
                vec!["ublk.toml:7:", "spares", "missing \":port\""],
            ),
            (
                format!(
                    "{SECRET}{}",
                    vol("spares = [\"10.0.0.4:7450\", \"10.0.0.4:7450\"]\n")
                ),
                vec!["spares", "listed twice"],
            ),
            (
                vol("spares = [\"10.0.0.4:7450\"]\n"),
                vec!["cluster_secret_file", "volume \"v\" has spares"],
            ),
        ] {
            let e = err(&text).to_string();
            for w in want {
                assert!(e.contains(w), "{text:?}: {e:?} lacks {w:?}");
            }
        }
    }

    #[test]
    fn rebuild_section_sets_rate_concurrency_and_window_and_volumes_override_it() {
        let c = ok("[rebuild]\nrate = \"100MiB\"\nbusy_percent = 50\nmax_concurrent = 1\npartial_window_s = 60\n\n[[volume]]\nname = \"v\"\nsize = \"1MiB\"\npartial_window_s = 3600\nreplicas = [{ local = \"/a\" }]\n");
        assert_eq!(
            c.rebuild,
            RebuildConfig {
                rate: 100 << 20,
                busy_percent: 50,
                max_concurrent: 1,
                partial_window_s: 60,
                grain: 64 << 10,
            }
        );
        assert_eq!(c.volumes[0].partial_window_s, Some(3600));
        assert_eq!(ok("").rebuild, RebuildConfig::default());
        assert_eq!(ok("[rebuild]\nrate = 0\n").rebuild.rate, 0);
        let e = err("[rebuild]\nrate = \"100KiB\"\n").to_string();
        assert!(
            e.contains("[rebuild]") && e.contains("rate") && e.contains("1MiB"),
            "{e}"
        );
        let e = err("[rebuild]\nbusy_percent = 0\n").to_string();
        assert!(
            e.contains("busy_percent") && e.contains("between 1 and 100"),
            "{e}"
        );
        let e = err("[rebuild]\nmax_concurrent = 0\n").to_string();
        assert!(
            e.contains("max_concurrent") && e.contains("between 1 and 64"),
            "{e}"
        );
        assert_eq!(ok("[rebuild]\ngrain = \"16KiB\"\n").rebuild.grain, 16 << 10);
        let e = err("[rebuild]\ngrain = \"48KiB\"\n").to_string();
        assert!(e.contains("grain") && e.contains("power of two"), "{e}");
        let e = err("[rebuild]\nspeed = 1\n").to_string();
        assert!(e.contains("speed"), "{e}");
    }

    #[test]
    fn shipped_example_is_valid() {
        let c = ok(include_str!("../../ublk.toml.example"));
        assert_eq!(c.node, NodeConfig::default());
        assert_eq!(c.server, None);
        assert_eq!(c.volumes.len(), 1);
        let v = c.volume("vol0").unwrap();
        assert_eq!(v.size, 1 << 30);
        assert_eq!(v.block_size, 4096);
        assert_eq!(v.queues, 2);
        assert_eq!(v.device_id, Some(0));
        assert_eq!(v.replicas.len(), 2);
        for r in &v.replicas {
            assert!(r.local_path().unwrap().starts_with("/var/lib/ublkd/"));
        }
    }

    #[test]
    fn shipped_example_commented_remote_parts_are_valid() {
        let mut text = String::new();
        for line in include_str!("../../ublk.toml.example").lines() {
            let t = line.trim_start();
            let enable = [
                "# cluster_secret_file = ",
                "# listen = ",
                "# storage_dir = ",
                "# { remote = ",
            ];
            if ["# [server]", "# [metrics]"].contains(&t) || enable.iter().any(|p| t.starts_with(p))
            {
                text.push_str(&t[2..]);
            } else {
                text.push_str(line);
            }
            text.push('\n');
        }
        let c = ok(&text);
        assert_eq!(
            c.node.cluster_secret_file.as_deref(),
            Some(Path::new("/etc/ublkd/cluster.key"))
        );
        let s = c.server.as_ref().unwrap();
        assert_eq!(s.listen, "0.0.0.0:7450".parse::<SocketAddr>().unwrap());
        assert_eq!(s.storage_dir, Path::new(DEFAULT_STORAGE_DIR));
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9850".parse().unwrap()));
        let v = c.volume("vol0").unwrap();
        assert_eq!(v.replicas.len(), 3);
        assert_eq!(v.replicas[2].remote(), Some(("node-b:7450", "vol0-r3")));
    }

    #[test]
    fn from_file_missing_is_io_error() {
        let e = Config::from_file(Path::new("/nonexistent/ublk.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Io { .. }));
        let s = e.to_string();
        assert!(s.contains("/nonexistent/ublk.toml"), "{s}");
        assert!(!s.contains('\n'));
    }

    #[test]
    fn from_file_uses_path_as_origin() {
        let dir = std::env::temp_dir().join(format!("ublkd-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "[node]\nlog_level = \"loud\"\n").unwrap();
        let e = Config::from_file(&path).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            e.to_string().starts_with(&format!("{}:2:", path.display())),
            "{e}"
        );
    }

    // ---- type / syntax errors from toml -----------------------------------

    #[test]
    fn unknown_top_level_key() {
        let e = err("[node]\n\n[[volumes]]\nname = \"a\"\n");
        assert!(matches!(e, ConfigError::Parse { .. }));
        assert_err(&e, 3, "volumes", &["unknown field"]);
    }

    #[test]
    fn unknown_key_named_like_its_table() {
        let e = err(&vol("volume = 1"));
        assert_err(&e, 3, "volume", &["volume \"vol0\"", "unknown field"]);
        let e = err("[node.extra]\nx = 1\n");
        // `[node]` is only implicitly defined here, so it has no span to
        // attribute the key to; key and line are still reported.
        assert_err(&e, 1, "extra", &["unknown field", "state_dir"]);
    }

    #[test]
    fn unknown_node_key() {
        let e = err("[node]\nstate_dir = \"/x\"\nloglevel = \"info\"\n");
        assert_err(&e, 3, "loglevel", &["[node]", "unknown field", "log_level"]);
    }

    #[test]
    fn unknown_volume_key() {
        let e = err(&vol("blocksize = 4096"));
        assert_err(
            &e,
            3,
            "blocksize",
            &["volume \"vol0\"", "unknown field", "block_size"],
        );
    }

    #[test]
    fn unknown_replica_key() {
        let text = "[[volume]]\nname = \"v\"\nsize = \"1GiB\"\nreplicas = [\n  { local = \"/a\" },\n  { lokal = \"/b\" },\n]\n";
        let e = err(text);
        assert_err(
            &e,
            6,
            "replicas[1].lokal",
            &["volume \"v\"", "unknown field"],
        );
    }

    #[test]
    fn type_error_names_key_and_line() {
        let e = err(&vol("block_size = \"4096\""));
        assert!(
            matches!(
                e,
                ConfigError::Parse {
                    line: 3,
                    column: 14,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_err(
            &e,
            3,
            "block_size",
            &["volume \"vol0\"", "invalid type", "expected an integer"],
        );

        let e = err(&vol("queues = 1.5"));
        assert_err(&e, 3, "queues", &["invalid type"]);

        let e = err(&vol("device_id = true"));
        assert_err(&e, 3, "device_id", &["invalid type"]);

        let e = err(&vol("size2 = 1\nmax_io = [1]"));
        assert_err(&e, 3, "size2", &[]);

        let e = err("[node]\n\nstate_dir = 5\n");
        assert_err(&e, 3, "state_dir", &["[node]", "invalid type"]);
    }

    #[test]
    fn type_error_in_size() {
        let e = err(&vol("max_io = 1.5"));
        assert_err(&e, 3, "max_io", &["size string"]);
        let e = err("[[volume]]\nname = \"v\"\nsize = 1979-05-27\nreplicas = []\n");
        assert_err(&e, 3, "size", &["volume \"v\""]);
    }

    #[test]
    fn replica_must_be_table() {
        let e = err("[[volume]]\nname = \"v\"\nsize = \"1GiB\"\nreplicas = [ \"/a\" ]\n");
        assert_err(&e, 4, "replicas[0]", &["invalid type"]);
    }

    #[test]
    fn single_bracket_volume_hint() {
        let e = err("[volume]\nname = \"v\"\n");
        assert_err(&e, 1, "volume", &["[[volume]]"]);
    }

    #[test]
    fn syntax_error_has_line_and_key() {
        let e = err("[node]\nlog_level = \n");
        assert!(matches!(e, ConfigError::Parse { line: 2, .. }), "{e:?}");
        assert_err(&e, 2, "log_level", &[]);
    }

    #[test]
    fn duplicate_key_is_rejected() {
        let e = err(&vol("name = \"again\""));
        assert_err(&e, 3, "name", &["duplicate key"]);
    }

    // ---- semantic validation ----------------------------------------------

    #[test]
    fn bad_log_level() {
        let e = err("[node]\nlog_level = \"loud\"\n");
        assert!(matches!(e, ConfigError::Invalid { .. }));
        assert_err(
            &e,
            2,
            "log_level",
            &["[node]", "error|warn|info|debug|trace", "\"loud\""],
        );
    }

    #[test]
    fn relative_state_dir() {
        let e = err("[node]\nstate_dir = \"var/lib\"\n");
        assert_err(&e, 2, "state_dir", &["absolute"]);
    }

    #[test]
    fn relative_control_socket() {
        let e = err("[node]\ncontrol_socket = \"ublkd.sock\"\n");
        assert_err(&e, 2, "control_socket", &["absolute"]);
    }

    #[test]
    fn missing_name() {
        let e = err("\n[[volume]]\nsize = \"1GiB\"\nreplicas = [ { local = \"/a\" } ]\n");
        assert_err(&e, 2, "name", &["volume #1", "missing"]);
    }

    #[test]
    fn bad_names() {
        for bad in ["", "a/b", "a b", "ü", ".", "..", &"x".repeat(65)] {
            let e = err(&format!(
                "[[volume]]\nname = {bad:?}\nsize = \"1GiB\"\nreplicas = [ {{ local = \"/a\" }} ]\n"
            ));
            assert_err(&e, 2, "name", &["volume #1", "[A-Za-z0-9_.-]"]);
        }
        ok(&format!(
            "[[volume]]\nname = \"{}\"\nsize = \"1GiB\"\nreplicas = [ {{ local = \"/a\" }} ]\n",
            "x".repeat(64)
        ));
    }

    #[test]
    fn duplicate_volume_names() {
        let text = format!(
            "{}\n{}",
            vol(""),
            vol("").replace("/data/vol0-a.img", "/data/b.img")
        );
        let e = err(&text);
        assert_err(&e, 8, "name", &["duplicate volume name \"vol0\"", "line 2"]);
    }

    #[test]
    fn missing_size() {
        let e = err("[[volume]]\nname = \"v\"\nreplicas = [ { local = \"/a\" } ]\n");
        assert_err(&e, 1, "size", &["volume \"v\"", "missing"]);
    }

    #[test]
    fn zero_size() {
        let e = err(&vol("size = \"0GiB\"").replace("size = \"1GiB\"\n", ""));
        assert_err(&e, 3, "size", &["greater than 0"]);
        let e = err(&vol("size = 0").replace("size = \"1GiB\"\n", ""));
        assert_err(&e, 3, "size", &["greater than 0"]);
    }

    #[test]
    fn negative_size() {
        let e = err(&vol("size = -4096").replace("size = \"1GiB\"\n", ""));
        assert_err(&e, 3, "size", &["positive"]);
    }

    #[test]
    fn size_bad_unit() {
        let e = err(&vol("size = \"10GB\"").replace("size = \"1GiB\"\n", ""));
        assert_err(
            &e,
            3,
            "size",
            &["volume \"vol0\"", "\"10GiB\"", "KiB, MiB, GiB, TiB"],
        );
    }

    #[test]
    fn size_garbage_in_file() {
        let e = err(&vol("size = \"big\"").replace("size = \"1GiB\"\n", ""));
        assert_err(&e, 3, "size", &["\"big\""]);
    }

    #[test]
    fn size_too_large() {
        let e = err(&vol("size = \"8388609TiB\"").replace("size = \"1GiB\"\n", ""));
        assert_err(&e, 3, "size", &["2^63"]);
        ok(&vol("size = \"8388608TiB\"").replace("size = \"1GiB\"\n", ""));
    }

    #[test]
    fn size_unaligned() {
        let e = err(&vol("size = 1000").replace("size = \"1GiB\"\n", ""));
        assert_err(&e, 3, "size", &["multiple of block_size (512)"]);
        let e = err(&vol("block_size = 4096\nsize = \"6KiB\"").replace("size = \"1GiB\"\n", ""));
        assert_err(&e, 4, "size", &["multiple of block_size (4096)"]);
        ok(&vol("size = 1024").replace("size = \"1GiB\"\n", ""));
    }

    #[test]
    fn bad_block_size() {
        let e = err(&vol("block_size = 1000"));
        assert_err(
            &e,
            3,
            "block_size",
            &["volume \"vol0\"", "must be 512 or 4096, got 1000"],
        );
        assert_eq!(
            e.to_string(),
            "ublk.toml:3: volume \"vol0\": key \"block_size\": must be 512 or 4096, got 1000"
        );
    }

    #[test]
    fn queues_out_of_range() {
        for bad in ["0", "33", "-1", "70000"] {
            let e = err(&vol(&format!("queues = {bad}")));
            assert_err(&e, 3, "queues", &["between 1 and 32"]);
        }
        assert_eq!(ok(&vol("queues = 32")).volumes[0].queues, 32);
    }

    #[test]
    fn depth_out_of_range() {
        for bad in ["0", "4097", "-5"] {
            let e = err(&vol(&format!("depth = {bad}")));
            assert_err(&e, 3, "depth", &["between 1 and 4096"]);
        }
        assert_eq!(ok(&vol("depth = 4096")).volumes[0].depth, 4096);
    }

    #[test]
    fn max_io_out_of_range() {
        for bad in ["\"2KiB\"", "\"64MiB\"", "0"] {
            let e = err(&vol(&format!("max_io = {bad}")));
            assert_err(&e, 3, "max_io", &["between 4KiB and 32MiB"]);
        }
        assert_eq!(
            ok(&vol("max_io = \"32MiB\"")).volumes[0].max_io_bytes,
            32 << 20
        );
        assert_eq!(ok(&vol("max_io = \"4KiB\"")).volumes[0].max_io_bytes, 4096);
    }

    #[test]
    fn max_io_unaligned() {
        let e = err(&vol("max_io = \"6000\""));
        assert_err(&e, 3, "max_io", &["multiple of 4KiB"]);
    }

    #[test]
    fn max_io_bad_unit() {
        let e = err(&vol("max_io = \"512KB\""));
        assert_err(&e, 3, "max_io", &["\"512KiB\""]);
    }

    #[test]
    fn device_id_out_of_range() {
        for bad in ["1048576", "-1"] {
            let e = err(&vol(&format!("device_id = {bad}")));
            assert_err(&e, 3, "device_id", &["between 0 and 1048575"]);
        }
    }

    #[test]
    fn duplicate_device_ids() {
        let a = vol("device_id = 7");
        let b = vol("device_id = 7")
            .replace("vol0", "vol1")
            .replace("/data/vol1-a.img", "/data/other.img");
        let e = err(&format!("{a}\n{b}"));
        assert_err(
            &e,
            9,
            "device_id",
            &[
                "volume \"vol1\"",
                "already used by volume \"vol0\" (line 3)",
            ],
        );
    }

    #[test]
    fn missing_replicas() {
        let e = err("[[volume]]\nname = \"v\"\nsize = \"1GiB\"\n");
        assert_err(&e, 1, "replicas", &["missing"]);
    }

    #[test]
    fn empty_replicas() {
        let e = err("[[volume]]\nname = \"v\"\nsize = \"1GiB\"\nreplicas = []\n");
        assert_err(&e, 4, "replicas", &["between 1 and 8", "got 0"]);
    }

    #[test]
    fn too_many_replicas() {
        let list: Vec<String> = (0..9).map(|i| format!("{{ local = \"/r{i}\" }}")).collect();
        let e = err(&format!(
            "[[volume]]\nname = \"v\"\nsize = \"1GiB\"\nreplicas = [ {} ]\n",
            list.join(", ")
        ));
        assert_err(&e, 4, "replicas", &["between 1 and 8", "got 9"]);
    }

    #[test]
    fn replica_without_kind() {
        let e = err("[[volume]]\nname = \"v\"\nsize = \"1GiB\"\nreplicas = [\n  {},\n]\n");
        assert_err(&e, 5, "replicas[0]", &["local"]);
    }

    #[test]
    fn relative_replica_path() {
        let e = err(
            "[[volume]]\nname = \"v\"\nsize = \"1GiB\"\nreplicas = [ { local = \"vol0.img\" } ]\n",
        );
        assert_err(
            &e,
            4,
            "replicas[0].local",
            &["volume \"v\"", "absolute", "\"vol0.img\""],
        );
    }

    #[test]
    fn duplicate_replica_path_within_volume() {
        let e = err(
            "[[volume]]\nname = \"v\"\nsize = \"1GiB\"\nreplicas = [\n  { local = \"/d/a.img\" },\n  { local = \"/d/./x/../a.img\" },\n]\n",
        );
        assert_err(
            &e,
            6,
            "replicas[1].local",
            &["already used by replicas[0] of this volume (line 5)"],
        );
    }

    #[test]
    fn duplicate_replica_path_across_volumes() {
        let a = vol("");
        let b = vol("")
            .replace("vol0", "vol1")
            .replace("/data/vol1-a.img", "/data//vol0-a.img");
        let e = err(&format!("{a}\n{b}"));
        assert_err(
            &e,
            11,
            "replicas[0].local",
            &[
                "volume \"vol1\"",
                "already used by replicas[0] of volume \"vol0\" (line 5)",
            ],
        );
    }

    #[test]
    fn zero_volumes_is_ok() {
        let c = ok("[node]\nlog_level = \"warn\"\n");
        assert!(c.volumes.is_empty());
        assert_eq!(c.node.log_level, "warn");
    }

    // ---- remote replicas, [server], cluster secret ------------------------

    const SECRET: &str = "[node]\ncluster_secret_file = \"/etc/ublkd/cluster.secret\"\n";

    /// `SECRET` (2 lines) + one volume whose replicas are `replicas`; the
    /// replicas are on line 6.
    fn remote_vol(replicas: &str) -> String {
        format!("{SECRET}[[volume]]\nname = \"v\"\nsize = \"1GiB\"\nreplicas = [ {replicas} ]\n")
    }

    #[test]
    fn node_remote_keys() {
        let c = ok("[node]\ncluster_secret_file = \"/etc/ublkd/s\"\nio_timeout_ms = 250\n");
        assert_eq!(
            c.node.cluster_secret_file.as_deref(),
            Some(Path::new("/etc/ublkd/s"))
        );
        assert_eq!(c.node.io_timeout_ms, 250);
        assert_eq!(c.server, None);
        assert_eq!(ok("[node]\nio_timeout_ms = 100\n").node.io_timeout_ms, 100);
        assert_eq!(
            ok("[node]\nio_timeout_ms = 600000\n").node.io_timeout_ms,
            600_000
        );
    }

    #[test]
    fn io_timeout_out_of_range() {
        for bad in ["0", "99", "600001", "-1", "99999999999"] {
            let e = err(&format!("[node]\n\nio_timeout_ms = {bad}\n"));
            assert!(matches!(e, ConfigError::Invalid { .. }), "{e:?}");
            assert_err(
                &e,
                3,
                "io_timeout_ms",
                &["[node]", "between 100 and 600000", bad],
            );
        }
        let e = err("[node]\nio_timeout_ms = \"3s\"\n");
        assert_err(&e, 2, "io_timeout_ms", &["[node]", "invalid type"]);
    }

    #[test]
    fn relative_cluster_secret_file() {
        let e = err("[node]\ncluster_secret_file = \"cluster.secret\"\n");
        assert_err(
            &e,
            2,
            "cluster_secret_file",
            &["[node]", "absolute", "\"cluster.secret\""],
        );
    }

    #[test]
    fn remote_replicas_parse() {
        let c = ok(&remote_vol(
            "{ local = \"/d/a.img\" }, { remote = \"node-b:7000\", id = \"v-r2\" }, { remote = \"10.0.0.3:7000\", id = \"v-r3\" }, { remote = \"[fd00::4]:7001\", id = \"v.r_4\" }",
        ));
        let r = &c.volume("v").unwrap().replicas;
        assert_eq!(r.len(), 4);
        assert_eq!(r[0].remote(), None);
        assert_eq!(
            r[1],
            ReplicaConfig::Remote {
                addr: "node-b:7000".into(),
                id: "v-r2".into()
            }
        );
        assert_eq!(r[1].remote(), Some(("node-b:7000", "v-r2")));
        assert_eq!(r[1].local_path(), None);
        assert_eq!(r[1].location(), "v-r2@node-b:7000");
        assert_eq!(r[2].location(), "v-r3@10.0.0.3:7000");
        assert_eq!(r[3].remote(), Some(("[fd00::4]:7001", "v.r_4")));
        assert_eq!(r[3].location(), "v.r_4@[fd00::4]:7001");
    }

    #[test]
    fn remote_addr_syntax() {
        for good in [
            "node-b:7000",
            "Node-B.example.com:1",
            "a:65535",
            "localhost:7000",
            "127.0.0.1:7000",
            "[::1]:7000",
            "[fd00::2]:7000",
            "[::ffff:10.0.0.1]:7000",
            "x1.2y:80",
        ] {
            let c = ok(&remote_vol(&format!("{{ remote = {good:?}, id = \"r\" }}")));
            assert_eq!(c.volumes[0].replicas[0].remote(), Some((good, "r")));
        }
        for bad in [
            "",
            "node-b",
            "node-b:",
            ":7000",
            "node-b:0",
            "node-b:65536",
            "node-b:99999999999",
            "node-b:+80",
            "node-b:70x",
            "node-b:7000/x",
            "node_b:7000",
            "-node:7000",
            "node-:7000",
            "a..b:7000",
            "node-b.:7000",
            " node-b:7000",
            "tcp://node-b:7000",
            "256.0.0.1:7000",
            "10.0.0:7000",
            "010.0.0.1:7000",
            "::1:7000",
            "fd00::2",
            "[fd00::2]",
            "[fd00::2]7000",
            "[fd00::2:7000",
            "[10.0.0.1]:7000",
            "[fd00::g]:7000",
            "[::1]:0",
        ] {
            let e = err(&remote_vol(&format!("{{ remote = {bad:?}, id = \"r\" }}")));
            assert_err(
                &e,
                6,
                "replicas[0].remote",
                &["volume \"v\"", &format!("{bad:?}"), "host:port"],
            );
        }
        let long = format!("{}:7000", vec!["a".repeat(63); 4].join("."));
        let e = err(&remote_vol(&format!("{{ remote = {long:?}, id = \"r\" }}")));
        assert_err(&e, 6, "replicas[0].remote", &["not a valid hostname"]);
        let e = err(&remote_vol(&format!(
            "{{ remote = \"{}:7000\", id = \"r\" }}",
            "a".repeat(64)
        )));
        assert_err(&e, 6, "replicas[0].remote", &["not a valid hostname"]);
        let e = err(&remote_vol("{ remote = \"::1:7000\", id = \"r\" }"));
        assert_err(&e, 6, "replicas[0].remote", &["must be in brackets"]);
        let e = err(&remote_vol("{ remote = \"h:0\", id = \"r\" }"));
        assert_err(
            &e,
            6,
            "replicas[0].remote",
            &["port must be between 1 and 65535, got \"0\""],
        );
    }

    #[test]
    fn remote_addr_type_error() {
        let e = err(&remote_vol("{ remote = 7000, id = \"r\" }"));
        assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
        assert_err(
            &e,
            6,
            "replicas[0].remote",
            &["volume \"v\"", "invalid type"],
        );
    }

    #[test]
    fn remote_requires_id() {
        let e = err(&remote_vol("{ remote = \"node-b:7000\" }"));
        assert_err(
            &e,
            6,
            "replicas[0].id",
            &["volume \"v\"", "missing required key", "remote"],
        );
    }

    #[test]
    fn bad_remote_ids() {
        for bad in ["", "a/b", "a b", "ü", ".", "..", &"x".repeat(65)] {
            let e = err(&remote_vol(&format!(
                "{{ remote = \"node-b:7000\", id = {bad:?} }}"
            )));
            assert_err(
                &e,
                6,
                "replicas[0].id",
                &["volume \"v\"", "[A-Za-z0-9_.-]", &format!("{bad:?}")],
            );
        }
        let id = "x".repeat(64);
        let c = ok(&remote_vol(&format!(
            "{{ remote = \"node-b:7000\", id = \"{id}\" }}"
        )));
        assert_eq!(
            c.volumes[0].replicas[0].remote(),
            Some(("node-b:7000", &*id))
        );
    }

    #[test]
    fn local_replica_rejects_id() {
        let e = err(&remote_vol("{ local = \"/d/a.img\", id = \"r\" }"));
        assert_err(
            &e,
            6,
            "replicas[0].id",
            &["volume \"v\"", "only remote replicas take an id"],
        );
    }

    #[test]
    fn use_unlabelled_is_a_local_replicas_opt_in() {
        let c = ok(&remote_vol(
            "{ local = \"/d/a.img\", use_unlabelled = true }, { local = \"/d/b.img\" }",
        ));
        let flags: Vec<bool> = c.volumes[0]
            .replicas
            .iter()
            .map(|r| {
                matches!(
                    r,
                    ReplicaConfig::Local {
                        use_unlabelled: true,
                        ..
                    }
                )
            })
            .collect();
        assert_eq!(flags, [true, false]);
        let e = err(&remote_vol(
            "{ remote = \"node-b:7000\", id = \"r\", use_unlabelled = true }",
        ));
        assert_err(
            &e,
            6,
            "replicas[0].use_unlabelled",
            &["only local replicas take use_unlabelled"],
        );
    }

    #[test]
    fn replica_with_two_kinds() {
        let e = err(&remote_vol(
            "{ local = \"/d/a.img\" }, { local = \"/d/b.img\", remote = \"node-b:7000\", id = \"r\" }",
        ));
        assert_err(
            &e,
            6,
            "replicas[1]",
            &["volume \"v\"", "both local and remote"],
        );
    }

    #[test]
    fn replica_with_only_id() {
        let e = err(&remote_vol("{ id = \"r\" }"));
        assert_err(
            &e,
            6,
            "replicas[0]",
            &["must specify its kind", "local", "remote"],
        );
    }

    #[test]
    fn duplicate_remote_within_volume() {
        let e = err(&remote_vol(
            "{ remote = \"node-b:7000\", id = \"r\" }, { remote = \"NODE-B:07000\", id = \"r\" }",
        ));
        assert_err(
            &e,
            6,
            "replicas[1].id",
            &[
                "volume \"v\"",
                "\"r\" on \"NODE-B:07000\"",
                "already used by replicas[0] of this volume (line 6)",
            ],
        );
        let e = err(&remote_vol(
            "{ remote = \"[::1]:7000\", id = \"r\" }, { remote = \"[0:0::1]:7000\", id = \"r\" }",
        ));
        assert_err(&e, 6, "replicas[1].id", &["already used by replicas[0]"]);
        // Same id on another server, or another id on the same server: fine.
        let c = ok(&remote_vol(
            "{ remote = \"node-b:7000\", id = \"r\" }, { remote = \"node-c:7000\", id = \"r\" }, { remote = \"node-b:7001\", id = \"r\" }, { remote = \"node-b:7000\", id = \"r2\" }",
        ));
        assert_eq!(c.volumes[0].replicas.len(), 4);
    }

    #[test]
    fn duplicate_remote_across_volumes() {
        let text = format!(
            "{}\n[[volume]]\nname = \"w\"\nsize = \"1GiB\"\nreplicas = [\n  {{ local = \"/d/w.img\" }},\n  {{ remote = \"node-b:7000\", id = \"r\" }},\n]\n",
            remote_vol("{ remote = \"node-b:7000\", id = \"r\" }")
        );
        let e = err(&text);
        assert_err(
            &e,
            13,
            "replicas[1].id",
            &[
                "volume \"w\"",
                "already used by replicas[0] of volume \"v\" (line 6)",
            ],
        );
    }

    #[test]
    fn remote_replica_requires_cluster_secret() {
        let text = "[node]\nlog_level = \"info\"\n\n[[volume]]\nname = \"v\"\nsize = \"1GiB\"\nreplicas = [\n  { local = \"/d/a.img\" },\n  { remote = \"node-b:7000\", id = \"r\" },\n]\n";
        let e = err(text);
        assert!(matches!(e, ConfigError::Invalid { .. }), "{e:?}");
        assert_err(
            &e,
            9,
            "cluster_secret_file",
            &[
                "[node]",
                "missing required key",
                "replicas[1] of volume \"v\" is remote (line 9)",
            ],
        );
        // Also without any [node] section.
        let e = err(&remote_vol("{ remote = \"node-b:7000\", id = \"r\" }").replace(SECRET, ""));
        assert_err(&e, 4, "cluster_secret_file", &["[node]", "is remote"]);
        // Several on one line: the first is named.
        let e = err(&remote_vol(
            "{ remote = \"node-b:7000\", id = \"r\" }, { remote = \"node-c:7000\", id = \"r\" }",
        )
        .replace(SECRET, ""));
        assert_err(
            &e,
            4,
            "cluster_secret_file",
            &["replicas[0] of volume \"v\""],
        );
    }

    #[test]
    fn server_requires_cluster_secret() {
        let e = err("[node]\nlog_level = \"info\"\n\n[server]\nlisten = \"0.0.0.0:7000\"\n");
        assert_err(
            &e,
            4,
            "cluster_secret_file",
            &[
                "[node]",
                "missing required key",
                "[server] section exists (line 4)",
            ],
        );
        // The first reason in the file is named.
        let text = format!(
            "{}\n[server]\nlisten = \"0.0.0.0:7000\"\n",
            remote_vol("{ remote = \"node-b:7000\", id = \"r\" }").replace(SECRET, "")
        );
        let e = err(&text);
        assert_err(&e, 4, "cluster_secret_file", &["is remote (line 4)"]);
        let text = format!(
            "[server]\nlisten = \"0.0.0.0:7000\"\n\n{}",
            remote_vol("{ remote = \"node-b:7000\", id = \"r\" }").replace(SECRET, "")
        );
        let e = err(&text);
        assert_err(
            &e,
            1,
            "cluster_secret_file",
            &["[server] section exists (line 1)"],
        );
    }

    #[test]
    fn server_section() {
        let c = ok(&format!("{SECRET}\n[server]\nlisten = \"0.0.0.0:7000\"\n"));
        assert_eq!(
            c.server,
            Some(ServerConfig {
                listen: "0.0.0.0:7000".parse().unwrap(),
                storage_dir: PathBuf::from(DEFAULT_STORAGE_DIR),
                max_connections: DEFAULT_MAX_CONNECTIONS,
            })
        );
        assert_eq!(
            c.server.unwrap().storage_dir,
            Path::new("/var/lib/ublkd/replicas")
        );
        assert!(c.volumes.is_empty());
        let c = ok(&format!(
            "{SECRET}[server]\nlisten = \"[::]:7001\"\nstorage_dir = \"/srv/replicas\"\n"
        ));
        let s = c.server.unwrap();
        assert_eq!(s.listen, "[::]:7001".parse::<SocketAddr>().unwrap());
        assert_eq!(s.storage_dir, Path::new("/srv/replicas"));
        // A node can serve replicas and have volumes of its own.
        let c = ok(&format!(
            "{}\n[server]\nlisten = \"10.0.0.2:7000\"\n",
            remote_vol("{ local = \"/d/a.img\" }, { remote = \"node-b:7000\", id = \"r\" }")
        ));
        assert!(c.server.is_some());
        assert_eq!(c.volumes[0].replicas.len(), 2);
    }

    #[test]
    fn server_missing_listen() {
        let e = err(&format!("{SECRET}\n[server]\nstorage_dir = \"/srv/r\"\n"));
        assert_err(&e, 4, "listen", &["[server]", "missing required key"]);
    }

    #[test]
    fn server_bad_listen() {
        for bad in [
            "",
            "7000",
            "0.0.0.0",
            "node-b:7000",
            "localhost:7000",
            "::1:7000",
            "[::1]",
            "0.0.0.0:65536",
            "0.0.0.0:-1",
        ] {
            let e = err(&format!("{SECRET}[server]\n\nlisten = {bad:?}\n"));
            assert_err(
                &e,
                5,
                "listen",
                &["[server]", "IP:port", &format!("got {bad:?}")],
            );
        }
        for bad in ["0.0.0.0:0", "[::]:0"] {
            let e = err(&format!("{SECRET}[server]\nlisten = {bad:?}\n"));
            assert_err(
                &e,
                4,
                "listen",
                &[
                    "[server]",
                    "port must be between 1 and 65535",
                    &format!("got {bad:?}"),
                ],
            );
        }
        let e = err(&format!("{SECRET}[server]\nlisten = 7000\n"));
        assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
        assert_err(&e, 4, "listen", &["[server]", "invalid type"]);
    }

    #[test]
    fn server_relative_storage_dir() {
        let e = err(&format!(
            "{SECRET}[server]\nlisten = \"0.0.0.0:7000\"\nstorage_dir = \"replicas\"\n"
        ));
        assert_err(
            &e,
            5,
            "storage_dir",
            &["[server]", "absolute", "\"replicas\""],
        );
    }

    #[test]
    fn server_unknown_key() {
        let e = err(&format!(
            "{SECRET}[server]\nlisten = \"0.0.0.0:7000\"\nport = 7000\n"
        ));
        assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
        assert_err(
            &e,
            5,
            "port",
            &["[server]", "unknown field", "listen", "storage_dir"],
        );
    }

    #[test]
    fn server_from_dotted_keys() {
        // A table made only of dotted keys has no span of its own.
        let c = ok(&format!("server.listen = \"0.0.0.0:7000\"\n{SECRET}"));
        assert_eq!(c.server.unwrap().listen.port(), 7000);
        let e = err(&format!("\nserver.storage_dir = \"/srv/r\"\n{SECRET}"));
        assert_err(&e, 2, "listen", &["[server]", "missing required key"]);
        let e = err("\nserver.listen = \"0.0.0.0:7000\"\n");
        assert_err(&e, 2, "cluster_secret_file", &["[server] section exists"]);
        let e = err(&format!("{SECRET}[server.extra]\nx = 1\n"));
        assert_err(&e, 3, "extra", &["unknown field", "listen"]);
    }

    // ---- read_secret -------------------------------------------------------

    fn secret_file(content: &[u8], mode: u32) -> tempfile::NamedTempFile {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content).unwrap();
        f.flush().unwrap();
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        f
    }

    fn secret_err(path: &Path) -> String {
        let e = read_secret(path).unwrap_err();
        assert!(matches!(e, ConfigError::Io { .. }), "{e:?}");
        assert_eq!(e.line(), None);
        let s = e.to_string();
        assert!(s.contains(&path.display().to_string()), "{s}");
        assert!(!s.contains('\n'), "{s:?}");
        s
    }

    #[test]
    fn read_secret_strips_one_newline() {
        let f = secret_file(b"0123456789abcdef\n", 0o600);
        assert_eq!(read_secret(f.path()).unwrap(), b"0123456789abcdef");
        let f = secret_file(b"0123456789abcdef\r\n", 0o600);
        assert_eq!(read_secret(f.path()).unwrap(), b"0123456789abcdef");
        let f = secret_file(b"0123456789abcdef", 0o400);
        assert_eq!(read_secret(f.path()).unwrap(), b"0123456789abcdef");
        let f = secret_file(b"0123456789abcdef\n\n", 0o600);
        assert_eq!(read_secret(f.path()).unwrap(), b"0123456789abcdef\n");
        let f = secret_file(b" x\x00\xffy 0123456789abcdef \r", 0o700);
        assert_eq!(
            read_secret(f.path()).unwrap(),
            b" x\x00\xffy 0123456789abcdef \r"
        );
    }

    #[test]
    fn read_secret_too_short() {
        for short in [
            &b""[..],
            b"\n",
            b"0123456789abcde",
            b"0123456789abcde\n",
            b"0123456789abcde\r\n",
        ] {
            let f = secret_file(short, 0o600);
            let s = secret_err(f.path());
            assert!(s.contains("at least 16 bytes"), "{s}");
        }
    }

    #[test]
    fn read_secret_rejects_group_or_other_access() {
        for mode in [0o640, 0o604, 0o660, 0o644, 0o610, 0o601, 0o666] {
            let f = secret_file(b"0123456789abcdef\n", mode);
            let s = secret_err(f.path());
            assert!(
                s.contains("must not be accessible by group/others (chmod 600)"),
                "{s}"
            );
            assert!(s.contains(&format!("{mode:03o}")), "{s}");
        }
    }

    /// (X) Whoever owns the secret file, or may replace it in its directory,
    /// holds the cluster's key: another user's file, or one in a directory others
    /// may write (not sticky), is refused.
    #[test]
    fn read_secret_refuses_a_file_others_own_or_can_replace() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cluster.secret");
        std::fs::write(&p, b"0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_secret(&p).is_ok());
        for mode in [0o777, 0o775, 0o757] {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            let s = secret_err(&p);
            assert!(
                s.contains("others may write to") && s.contains(&format!("{mode:03o}")),
                "{s}"
            );
        }
        // A sticky directory (/tmp) lets nobody replace another's file.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(read_secret(&p).is_ok());
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        if !nix::unistd::geteuid().is_root() {
            eprintln!("not root: the owner check needs a file of another user (CI runs as root)");
            return;
        }
        nix::unistd::chown(&p, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let s = secret_err(&p);
        assert!(
            s.contains("owned by uid 65534") && s.contains("chown"),
            "{s}"
        );
        nix::unistd::chown(&p, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
        nix::unistd::chown(dir.path(), Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let s = secret_err(&p);
        assert!(s.contains("owner uid 65534"), "{s}");
    }

    #[test]
    fn read_secret_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.secret");
        let s = secret_err(&missing);
        assert!(s.contains("cannot read"), "{s}");
        // A directory (mode 0700) opens but cannot be read.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        secret_err(dir.path());
    }

    #[test]
    fn line_col_counts_chars() {
        let text = "a\nüü = 1\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 2), (2, 1));
        assert_eq!(line_col(text, 6), (2, 3));
        assert_eq!(line_col(text, 1000), (3, 1));
    }
}
