//! `ublkd check-config` refuses what the daemon would refuse at start, naming the
//! file and the key: the secret file (missing, readable by others, short) and a
//! listen address that is not this host's.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn check(conf: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ublkd"))
        .arg("check-config")
        .arg(conf)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn config(dir: &Path, secret: &Path, listen: &str) -> std::path::PathBuf {
    let p = dir.join("ublk.toml");
    std::fs::write(
        &p,
        format!(
            "[node]\nstate_dir = \"{0}/state\"\ncontrol_socket = \"{0}/ctl.sock\"\ncluster_secret_file = \"{1}\"\n\n[server]\nlisten = \"{listen}\"\nstorage_dir = \"{0}/replicas\"\n",
            dir.display(),
            secret.display()
        ),
    )
    .unwrap();
    p
}

#[test]
fn check_config_refuses_what_the_daemon_would_refuse_and_names_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    // The secret's directory must be writable by root or us only.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let secret = tmp.path().join("cluster.key");
    let conf = config(tmp.path(), &secret, "127.0.0.1:7450");

    let (ok, text) = check(&conf);
    assert!(!ok, "a missing secret file passed: {text}");
    assert!(
        text.contains("[node] cluster_secret_file") && text.contains("ublk.toml"),
        "{text}"
    );

    std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, text) = check(&conf);
    assert!(!ok, "a secret readable by others passed: {text}");
    assert!(text.contains("cluster_secret_file"), "{text}");

    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&secret, "short\n").unwrap();
    let (ok, text) = check(&conf);
    assert!(!ok, "a 5-byte secret passed: {text}");

    std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
    let (ok, text) = check(&conf);
    assert!(ok, "a good config was refused: {text}");

    // 192.0.2.1 (TEST-NET-1) is no address of this host.
    let conf = config(tmp.path(), &secret, "192.0.2.1:7450");
    let (ok, text) = check(&conf);
    assert!(!ok, "a listen address not on this host passed: {text}");
    assert!(
        text.contains("[server] listen") && text.contains("not an address of this host"),
        "{text}"
    );
}
