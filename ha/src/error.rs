//! The crate's one error type.

/// What can go wrong in the HA crate: only input that is not what it claims.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HaError {
    #[error("peer address {addr:?}: {why} (expected host:port, e.g. \"10.0.0.4:7450\")")]
    BadPeer { addr: String, why: &'static str },
}
