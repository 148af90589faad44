//! Remote replicas: the wire protocol ([`wire`], specified in docs/protocol.md), the
//! authenticated handshake ([`auth`]) and the owner-side client ([`client`]). The
//! replica *server* is part of the daemon (`ublkd::server`).

pub mod auth;
pub mod client;
pub mod wire;

pub use auth::Secret;

/// TCP keepalive (idle 10 s, then 3 probes 5 s apart), so a peer that vanished while
/// a connection was idle is noticed without waiting for the next request.
pub fn keepalive(s: &impl std::os::fd::AsRawFd) {
    let fd = s.as_raw_fd();
    for (level, opt, val) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
    ] {
        // SAFETY: setsockopt with a c_int value on a socket fd we borrow.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                (&val as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "setsockopt keepalive");
        }
    }
}
pub use client::{Kick, RemoteClient, RemoteReplica, RemoteSpec};
