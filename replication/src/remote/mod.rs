//! Remote replicas: the wire protocol ([`wire`], specified in docs/protocol.md), the
//! authenticated handshake ([`auth`]) and the owner-side client ([`client`]). The
//! replica *server* is part of the daemon (`ublkd::server`).

pub mod auth;
pub mod client;
pub mod wire;

pub use auth::Secret;
pub use client::{Kick, RemoteClient, RemoteReplica, RemoteSpec};
