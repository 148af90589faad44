//! The binaries as a user runs them on a host (no ublk driver needed).

use std::path::Path;
use std::process::Command;

fn ublkd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ublkd"))
}

fn example() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ublk.toml.example")
}

#[test]
fn check_config_accepts_the_shipped_example() {
    let out = ublkd().arg("check-config").arg(example()).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 volume)"));
}

#[test]
fn bad_config_names_key_and_line_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(
        &p,
        "[[volume]]\nname = \"v\"\nsize = \"1GiB\"\nblock_size = 1000\nreplicas = [{ local = \"/x.img\" }]\n",
    )
    .unwrap();
    for args in [
        vec!["check-config", p.to_str().unwrap()],
        vec!["--config", p.to_str().unwrap()],
    ] {
        let out = ublkd().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            err.contains("block_size") && err.contains(":4:"),
            "{args:?}: {err}"
        );
    }
    std::fs::write(&p, "[node]\nstate_dirr = \"/tmp\"\n").unwrap();
    let out = ublkd()
        .args(["check-config", p.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("state_dirr"), "{err}");
}

#[test]
fn missing_driver_is_reported_with_the_fix() {
    if Path::new("/dev/ublk-control").exists() {
        eprintln!("skipped: this host has the ublk driver (the VM suite covers the live path)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(
        &p,
        format!(
            "[node]\nstate_dir = \"{0}/state\"\ncontrol_socket = \"{0}/s.sock\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = ublkd().arg("--config").arg(&p).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("modprobe ublk_drv"), "{err}");
    assert!(
        !dir.path().join("s.sock").exists(),
        "nothing touched before the check"
    );
}

#[test]
fn ublkctl_without_daemon_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ublkctl"))
        .arg("--socket")
        .arg(dir.path().join("none.sock"))
        .arg("list")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is ublkd running?"));
}
