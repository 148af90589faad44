//! `ublkd check-config` refuses what the daemon would refuse at start, naming the
//! file and the key: the secret file (missing, readable by others, short) and a
//! listen address that is not this host's.

mod support;

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

/// A remote replica or a spare naming this node's own replica server would put two
/// replicas of a volume on one host: refused, naming the entry; any address of the
/// host counts when the server listens on all of them.
#[test]
fn check_config_refuses_the_nodes_own_server_as_a_remote_or_a_spare() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let secret = support::secret_file(tmp.path(), support::SECRET);
    let with_volume = |listen: &str, volume: &str| {
        let p = config(tmp.path(), &secret, listen);
        let mut text = std::fs::read_to_string(&p).unwrap();
        text.push_str(volume);
        std::fs::write(&p, text).unwrap();
        p
    };
    let vol = |remote: &str, spare: &str| {
        format!(
            "\n[[volume]]\nname = \"v\"\nsize = \"64MiB\"\nspares = [ \"{spare}\" ]\nreplicas = [ {{ local = \"{}/v.img\" }}, {{ remote = \"{remote}\", id = \"v-b\" }} ]\n",
            tmp.path().display()
        )
    };
    let (ok, text) = check(&with_volume(
        "127.0.0.1:7450",
        &vol("127.0.0.2:7450", "127.0.0.3:7450"),
    ));
    assert!(ok, "a remote and a spare elsewhere were refused: {text}");
    let (ok, text) = check(&with_volume(
        "127.0.0.1:7450",
        &vol("127.0.0.1:7450", "127.0.0.3:7450"),
    ));
    assert!(!ok, "the own server as a remote passed: {text}");
    assert!(
        text.contains("remote replica at 127.0.0.1:7450 is this node's own replica server"),
        "{text}"
    );
    let (ok, text) = check(&with_volume(
        "0.0.0.0:7450",
        &vol("192.0.2.10:7450", "localhost:7450"),
    ));
    assert!(
        !ok,
        "the own server (by name, listening everywhere) as a spare passed: {text}"
    );
    assert!(
        text.contains("spare localhost:7450 is this node's own replica server"),
        "{text}"
    );
    // Listening everywhere, all of 127/8 is this server; another port is another server.
    let (ok, text) = check(&with_volume(
        "0.0.0.0:7450",
        &vol("127.0.0.2:7451", "127.0.0.1:7451"),
    ));
    assert!(ok, "{text}");
}
