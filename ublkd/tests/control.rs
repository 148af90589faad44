//! The control socket as another user meets it: a daemon (a replica server, which
//! needs no ublk driver) listening on it, and `ublkctl` run as uid 65534.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::Command;

use support::*;

/// (X) The socket is created 0600, and a peer that is neither root nor the
/// daemon's user is refused even when the socket's mode lets it connect (an
/// operator's chmod, a bind-then-chmod window).
#[test]
fn only_root_and_the_daemons_user_may_drive_the_daemon() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: cannot run ublkctl as another user (CI runs as root)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let server = start_server(tmp.path(), 36);
    let sock = server.dir.join("ctl.sock");
    assert_eq!(std::fs::metadata(&sock).unwrap().mode() & 0o777, 0o600);
    let ctl = |uid: Option<u32>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ublkctl"));
        c.arg("--socket")
            .arg(&sock)
            .args(["--output", "json", "list"]);
        if let Some(u) = uid {
            c.uid(u).gid(u);
        }
        c.output().unwrap()
    };
    assert!(ctl(None).status.success(), "root is served");
    // Let uid 65534 reach and connect to the socket.
    for d in [tmp.path(), server.dir.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = ctl(Some(65534));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "uid 65534 was served");
    assert!(
        err.contains("uid 65534") && err.contains("may not use the control socket"),
        "{err}"
    );
    assert!(ctl(None).status.success(), "root still is");
}
