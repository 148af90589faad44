//! Remote replicas: the protocol's bytes live in the `wire` crate (specified in
//! docs/protocol.md); here is its socket side ([`conn`]) and the owner-side client
//! ([`client`]). The replica *server* is the `replica-server` crate.

pub mod client;
pub mod conn;

pub use wire::handshake::Secret;

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
pub use client::{ConnEvents, Kick, Lost, RemoteClient, RemoteReplica, RemoteSpec};
