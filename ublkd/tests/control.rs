//! The control socket as another user meets it: a daemon (a replica server, which
//! needs no ublk driver) listening on it, and `ublkctl` run as uid 65534.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::Command;

use support::*;

/// Start ublkd on `conf` (its stderr into `log`) and wait until it answers on
/// `sock`; returns it and a runner of `ublkctl --socket sock ARGS`.
fn daemon_and_ctl(
    conf: &std::path::Path,
    sock: &std::path::Path,
    log: &std::path::Path,
) -> (
    std::process::Child,
    impl Fn(&[&str]) -> std::process::Output,
) {
    let child = Command::new(env!("CARGO_BIN_EXE_ublkd"))
        .arg("--config")
        .arg(conf)
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let sock = sock.to_path_buf();
    let ctl = move |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ublkctl"))
            .arg("--socket")
            .arg(&sock)
            .args(args)
            .output()
            .unwrap()
    };
    wait_until(20, "the daemon answers", || ctl(&["list"]).status.success());
    (child, ctl)
}

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
    // --output json: the refusal is a JSON object on stdout, exit status 3.
    let err = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "uid 65534 was served: {err}");
    assert!(
        err.contains("uid 65534") && err.contains("may not use the control socket"),
        "{err}"
    );
    assert!(ctl(None).status.success(), "root still is");
}

/// A script tells the outcomes apart by exit status, and with `--output json`
/// reads errors as JSON too: 4 when no daemon answers, 3 when it refuses the
/// request, 2 for a usage error; in text mode the reason goes to stderr.
#[test]
fn exit_status_says_who_failed_and_json_errors_are_json() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = |sock: &std::path::Path, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ublkctl"))
            .arg("--socket")
            .arg(sock)
            .args(args)
            .output()
            .unwrap()
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let json_error = |out: &std::process::Output| -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", text(&out.stdout)));
        v["error"].clone()
    };

    let nobody = tmp.path().join("none.sock");
    let out = ctl(&nobody, &["list"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("is ublkd running?"),
        "{}",
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    let out = ctl(&nobody, &["--output", "json", "list"]);
    assert_eq!(out.status.code(), Some(4));
    let e = json_error(&out);
    assert_eq!(e["kind"], "unreachable", "{e}");
    assert_eq!(e["exit_code"], 4, "{e}");

    let server = start_server(tmp.path(), 37);
    let sock = server.dir.join("ctl.sock");
    let out = ctl(&sock, &["status", "nope"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    // The daemon's reason, not dressed as a socket fault.
    let err = text(&out.stderr);
    assert!(
        err.contains("no volume named \"nope\"") && !err.contains("control socket"),
        "{err}"
    );
    let out = ctl(&sock, &["-o", "json", "status", "nope"]);
    assert_eq!(out.status.code(), Some(3));
    let e = json_error(&out);
    assert_eq!(e["kind"], "refused", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("no volume named"),
        "{e}"
    );

    let out = ctl(&sock, &["no-such-command"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(ctl(&sock, &["list"]).status.success());
}

/// Logs off a terminal carry no colour codes; under systemd (JOURNAL_STREAM set)
/// no timestamps either, the journal stamps each line.
#[test]
fn logs_are_plain_off_a_terminal_and_unstamped_in_the_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start_server(tmp.path(), 38);
    let log = server.log();
    assert!(!log.contains('\x1b'), "colour codes in a log file: {log:?}");
    let first = log.lines().find(|l| l.contains("ublkd running")).unwrap();
    assert!(
        first.starts_with("20"),
        "a file log line has no timestamp: {first}"
    );
    let conf = server.dir.join("ublk.toml");
    drop(server);
    let journal = tmp.path().join("journal.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ublkd"))
        .arg("--config")
        .arg(&conf)
        .env("JOURNAL_STREAM", "8:12345")
        .stderr(std::fs::File::create(&journal).unwrap())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let log = loop {
        let log = std::fs::read_to_string(&journal).unwrap_or_default();
        if log.contains("ublkd running") || t0.elapsed() > std::time::Duration::from_secs(20) {
            break log;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    let line = log
        .lines()
        .find(|l| l.contains("ublkd running"))
        .expect("it started");
    assert!(
        line.trim_start().starts_with("INFO"),
        "a journal line starts with a timestamp: {line}"
    );
    assert!(!log.contains('\x1b'), "{log:?}");
}

/// `ublkctl log-level` changes what the running daemon logs, until it restarts; a
/// filter it cannot parse is refused (exit 3) and changes nothing.
#[test]
fn the_log_filter_changes_at_run_time() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let conf = dir.join("ublk.toml");
    let sock = dir.join("ctl.sock");
    std::fs::write(
        &conf,
        format!(
            "[node]\nstate_dir = \"{d}/state\"\ncontrol_socket = \"{s}\"\ncluster_secret_file = \"{k}\"\nlog_level = \"warn\"\n[server]\nlisten = \"{listen}\"\nstorage_dir = \"{d}/replicas\"\n",
            d = dir.display(),
            s = sock.display(),
            k = secret_file(dir, SECRET).display(),
            listen = std::net::TcpListener::bind("127.0.0.39:0")
                .unwrap()
                .local_addr()
                .unwrap(),
        ),
    )
    .unwrap();
    let log_path = dir.join("ublkd.log");
    let (mut child, ctl) = daemon_and_ctl(&conf, &sock, &log_path);
    let requests = || {
        std::fs::read_to_string(&log_path)
            .unwrap()
            .matches("control request")
            .count()
    };
    assert_eq!(requests(), 0, "debug lines at log_level warn");
    let out = ctl(&["log-level", "debug"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ctl(&["list"]).status.success());
    let seen = requests();
    assert!(seen >= 1, "no debug line after log-level debug");
    let out = ctl(&["log-level", "no such=level=="]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ctl(&["log-level", "warn"]).status.success());
    let quiet = requests();
    assert!(ctl(&["list"]).status.success());
    assert_eq!(requests(), quiet, "debug lines after log-level warn");
    let _ = child.kill();
    let _ = child.wait();
}

/// The operator's commands on a running node (a replica server, which needs no ublk
/// driver): `ublkctl config` shows what the daemon runs with, defaults filled in;
/// `[metrics] listen` answers `/metrics`; maintenance of a server no volume uses is
/// refused (exit 3); `stop --all` with no device up does nothing.
#[test]
fn config_dump_metrics_maintenance_and_stop_all_on_a_running_node() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let conf = dir.join("ublk.toml");
    let sock = dir.join("ctl.sock");
    let free = |ip: &str| {
        std::net::TcpListener::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (listen, metrics) = (free("127.0.0.38"), free("127.0.0.38"));
    std::fs::write(
        &conf,
        format!(
            "[node]\nstate_dir = \"{d}/state\"\ncontrol_socket = \"{s}\"\ncluster_secret_file = \"{k}\"\n\
             [server]\nlisten = \"{listen}\"\nstorage_dir = \"{d}/replicas\"\n\
             [metrics]\nlisten = \"{metrics}\"\n",
            d = dir.display(),
            s = sock.display(),
            k = secret_file(dir, SECRET).display(),
        ),
    )
    .unwrap();
    let (mut child, ctl) = daemon_and_ctl(&conf, &sock, &dir.join("ublkd.log"));
    let json = |args: &[&str]| -> serde_json::Value {
        let out = ctl(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };

    // The effective config: what the file says, and the defaults it left out.
    let c = json(&["config", "-o", "json"]);
    assert_eq!(c["file"], conf.display().to_string());
    assert_eq!(c["config"]["server"]["listen"], listen.to_string());
    assert_eq!(c["config"]["metrics_listen"], metrics.to_string());
    assert_eq!(c["config"]["rebuild"]["rate"], 64 << 20, "the default rate");
    assert_eq!(c["config"]["ha"]["grace_ms"], 5000, "the default grace");
    let text = String::from_utf8(ctl(&["config"]).stdout).unwrap();
    let body: String = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let parsed: toml::Value = toml::from_str(&body).expect("the text dump is TOML");
    assert_eq!(
        parsed["rebuild"]["busy_percent"].as_integer(),
        Some(25),
        "{text}"
    );

    // The metrics endpoint of the real daemon.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(metrics).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut page = String::new();
    s.read_to_string(&mut page).unwrap();
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    assert!(page.contains("ublkd_build_info{version=\""), "{page}");
    assert!(page.contains("\nprocess_cpu_seconds_total "), "{page}");

    // Maintenance: only of a server this node's volumes use (a typo would leave the real
    // one's replicas to be replaced during its reboot); a zero duration is a usage error.
    let peer = "10.9.9.9:7450";
    let out = ctl(&["ha", "maintenance", "start", peer, "--for", "30m"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no volume of this node"));
    assert_eq!(
        json(&["ha", "status", "-o", "json"])["maintenance"],
        serde_json::json!([])
    );
    assert_eq!(
        ctl(&["ha", "maintenance", "end", peer]).status.code(),
        Some(3)
    );
    assert_eq!(
        ctl(&["ha", "maintenance", "start", peer, "--for", "0s"])
            .status
            .code(),
        Some(2),
        "a zero duration is a usage error"
    );

    // stop --all: nothing to stop on a replica server.
    let out = ctl(&["stop", "--all"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "no volume has a device up"
    );
    assert_eq!(
        json(&["stop", "--all", "-o", "json"])["stopped"],
        serde_json::json!([])
    );
    let _ = child.kill();
    let _ = child.wait();
}
