//! `ublkctl reload` / SIGHUP: what a re-read configuration changes, decided by a
//! pure function of the old and the new one ([`plan`]); the daemon applies it.
//!
//! Applied live: volumes added (started) and removed (stopped, refused while in
//! use), replicas added (opened, then fully rebuilt), removed (dropped; never the
//! last online one) or replaced (a changed path or address at the same place in
//! the list: the new one is added and rebuilt, the old one dropped once the new
//! one is online), the `[rebuild]` limits and partial-rebuild windows. Refused, changing nothing: a
//! volume's size or block size, and `[node]` or `[server]` settings (a restart
//! applies those). Other volume keys (queues, depth, max_io, device_id) are
//! taken at the volume's next start.

use serde::{Deserialize, Serialize};

use crate::config::{Config, RebuildConfig, VolumeConfig};

/// One change a reload makes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    RebuildLimits {
        rate: u64,
        busy_percent: u32,
        max_concurrent: u32,
    },
    /// `[ha]` changed: the monitor takes it at its next round.
    HaRules {
        grace_ms: u32,
        probe_interval_ms: u32,
        rejoin_probes: u32,
        max_concurrent: u32,
    },
    /// A volume's spares changed: the monitor places on the new list.
    Spares {
        volume: String,
        spares: Vec<String>,
    },
    /// A volume's snapshot schedule changed: its next round follows the new one.
    Schedule {
        volume: String,
        schedule: Option<crate::schedule::Schedule>,
    },
    /// The partial-rebuild window: `[rebuild] partial_window_s` (`volume` none) or
    /// a volume's override. Running volumes take it at their next decision.
    PartialWindow {
        volume: Option<String>,
        window_s: u32,
    },
    /// A `[rebuild]` key the running daemon keeps until it restarts.
    AtDaemonRestart {
        key: String,
    },
    VolumeAdded {
        volume: String,
    },
    VolumeRemoved {
        volume: String,
    },
    ReplicaAdded {
        volume: String,
        replica: String,
    },
    ReplicaRemoved {
        volume: String,
        replica: String,
    },
    /// `new` is added and rebuilt; `old` goes once `new` is online.
    ReplicaReplaced {
        volume: String,
        old: String,
        new: String,
    },
    /// Taken when the volume next starts.
    AtNextStart {
        volume: String,
        key: String,
    },
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::RebuildLimits {
                rate,
                busy_percent,
                max_concurrent,
            } => write!(
                f,
                "[rebuild]: rate {rate} B/s, {busy_percent}% of the time while the application is busy, {max_concurrent} at once"
            ),
            Change::HaRules {
                grace_ms,
                probe_interval_ms,
                rejoin_probes,
                max_concurrent,
            } => write!(
                f,
                "[ha]: a server is dead after {grace_ms} ms of failed probes (every {probe_interval_ms} ms), back after {rejoin_probes} good ones; {max_concurrent} replacements at once"
            ),
            Change::Spares { volume, spares } => {
                write!(f, "volume {volume}: spares are now [{}]", spares.join(", "))
            }
            Change::Schedule {
                volume,
                schedule: Some(s),
            } => write!(
                f,
                "volume {volume}: a snapshot every {} s, the newest {} kept{}",
                s.every_ms / 1000,
                s.keep,
                if s.freeze { ", frozen" } else { "" }
            ),
            Change::Schedule {
                volume,
                schedule: None,
            } => write!(
                f,
                "volume {volume}: no snapshot schedule (the scheduled snapshots are kept)"
            ),
            Change::PartialWindow {
                volume: None,
                window_s,
            } => write!(f, "[rebuild] partial_window_s: {window_s} s"),
            Change::PartialWindow {
                volume: Some(volume),
                window_s,
            } => write!(f, "volume {volume}: partial_window_s {window_s} s"),
            Change::AtDaemonRestart { key } => {
                write!(f, "[rebuild] {key} changed: taken when ublkd restarts")
            }
            Change::VolumeAdded { volume } => write!(f, "volume {volume}: added, starting"),
            Change::VolumeRemoved { volume } => write!(f, "volume {volume}: removed, stopping"),
            Change::ReplicaAdded { volume, replica } => {
                write!(f, "volume {volume}: replica {replica} added (full rebuild)")
            }
            Change::ReplicaRemoved { volume, replica } => {
                write!(f, "volume {volume}: replica {replica} removed")
            }
            Change::ReplicaReplaced { volume, old, new } => write!(
                f,
                "volume {volume}: replica {old} replaced by {new} (rebuilt; {old} dropped once it is online)"
            ),
            Change::AtNextStart { volume, key } => {
                write!(f, "volume {volume}: {key} changed: taken at the volume's next start")
            }
        }
    }
}

/// Why a reload changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("[node] {key} changed: restart ublkd to apply it (nothing was changed)")]
    Node { key: &'static str },
    #[error("[server] changed: restart ublkd to apply it (nothing was changed)")]
    Server,
    #[error("volume {volume}: {key} cannot change while the volume exists ({old} -> {new}); put it back (nothing was changed)")]
    Geometry {
        volume: String,
        key: &'static str,
        old: u64,
        new: u64,
    },
}

/// What changes from `old` to `new`, in the order to apply it, or why nothing may.
pub fn plan(old: &Config, new: &Config) -> Result<Vec<Change>, Refused> {
    let (a, b) = (&old.node, &new.node);
    let node_keys: [(&'static str, bool); 6] = [
        ("state_dir", a.state_dir != b.state_dir),
        ("control_socket", a.control_socket != b.control_socket),
        ("log_level", a.log_level != b.log_level),
        (
            "cluster_secret_file",
            a.cluster_secret_file != b.cluster_secret_file,
        ),
        ("io_timeout_ms", a.io_timeout_ms != b.io_timeout_ms),
        (
            "no_replica_timeout_ms",
            a.no_replica_timeout_ms != b.no_replica_timeout_ms,
        ),
    ];
    if let Some((key, _)) = node_keys.iter().find(|(_, changed)| *changed) {
        return Err(Refused::Node { key });
    }
    if old.server != new.server {
        return Err(Refused::Server);
    }
    let mut changes = Vec::new();
    for v in &new.volumes {
        if let Some(o) = old.volume(&v.name) {
            for (key, was, is) in [
                ("size", o.size, v.size),
                ("block_size", o.block_size.into(), v.block_size.into()),
            ] {
                if was != is {
                    return Err(Refused::Geometry {
                        volume: v.name.clone(),
                        key,
                        old: was,
                        new: is,
                    });
                }
            }
        }
    }
    let (r0, r1) = (&old.rebuild, &new.rebuild);
    if (r0.rate, r0.busy_percent, r0.max_concurrent)
        != (r1.rate, r1.busy_percent, r1.max_concurrent)
    {
        let RebuildConfig {
            rate,
            busy_percent,
            max_concurrent,
            ..
        } = *r1;
        changes.push(Change::RebuildLimits {
            rate,
            busy_percent,
            max_concurrent,
        });
    }
    if old.ha != new.ha {
        let crate::config::HaConfig {
            grace_ms,
            probe_interval_ms,
            rejoin_probes,
            max_concurrent,
        } = new.ha;
        changes.push(Change::HaRules {
            grace_ms,
            probe_interval_ms,
            rejoin_probes,
            max_concurrent,
        });
    }
    if r0.partial_window_s != r1.partial_window_s {
        changes.push(Change::PartialWindow {
            volume: None,
            window_s: r1.partial_window_s,
        });
    }
    if r0.grain != r1.grain {
        changes.push(Change::AtDaemonRestart {
            key: "grain".into(),
        });
    }
    if old.metrics_listen != new.metrics_listen {
        changes.push(Change::AtDaemonRestart {
            key: "[metrics] listen".into(),
        });
    }
    for o in &old.volumes {
        if new.volume(&o.name).is_none() {
            changes.push(Change::VolumeRemoved {
                volume: o.name.clone(),
            });
        }
    }
    for v in &new.volumes {
        match old.volume(&v.name) {
            None => changes.push(Change::VolumeAdded {
                volume: v.name.clone(),
            }),
            Some(o) => {
                replica_changes(o, v, &mut changes);
                if o.partial_window_s != v.partial_window_s {
                    changes.push(Change::PartialWindow {
                        volume: Some(v.name.clone()),
                        window_s: v.partial_window_s.unwrap_or(r1.partial_window_s),
                    });
                }
                if o.spares != v.spares {
                    changes.push(Change::Spares {
                        volume: v.name.clone(),
                        spares: v.spares.clone(),
                    });
                }
                if o.snapshots != v.snapshots {
                    changes.push(Change::Schedule {
                        volume: v.name.clone(),
                        schedule: v.snapshots,
                    });
                }
                for (key, changed) in [
                    ("queues", o.queues != v.queues),
                    ("depth", o.depth != v.depth),
                    ("max_io", o.max_io_bytes != v.max_io_bytes),
                    ("device_id", o.device_id != v.device_id),
                ] {
                    if changed {
                        changes.push(Change::AtNextStart {
                            volume: v.name.clone(),
                            key: key.into(),
                        });
                    }
                }
            }
        }
    }
    Ok(changes)
}

/// Replicas by location: gone, new, and a changed location at the same place in
/// the list (both gone and new) is a replacement.
fn replica_changes(old: &VolumeConfig, new: &VolumeConfig, out: &mut Vec<Change>) {
    let locs = |v: &VolumeConfig| v.replicas.iter().map(|r| r.location()).collect::<Vec<_>>();
    let (was, is) = (locs(old), locs(new));
    let gone: Vec<usize> = (0..was.len()).filter(|&i| !is.contains(&was[i])).collect();
    let fresh: Vec<usize> = (0..is.len()).filter(|&i| !was.contains(&is[i])).collect();
    let volume = || new.name.clone();
    let mut paired_new = Vec::new();
    for &i in &gone {
        if fresh.contains(&i) {
            paired_new.push(i);
            out.push(Change::ReplicaReplaced {
                volume: volume(),
                old: was[i].clone(),
                new: is[i].clone(),
            });
        } else {
            out.push(Change::ReplicaRemoved {
                volume: volume(),
                replica: was[i].clone(),
            });
        }
    }
    for &i in fresh.iter().filter(|i| !paired_new.contains(i)) {
        out.push(Change::ReplicaAdded {
            volume: volume(),
            replica: is[i].clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(body: &str) -> Config {
        Config::parse(body, "t.toml").unwrap()
    }

    fn vol(name: &str, size: &str, replicas: &[&str]) -> String {
        let r: Vec<String> = replicas
            .iter()
            .map(|p| format!("{{ local = \"/r/{p}\" }}"))
            .collect();
        format!(
            "[[volume]]\nname = \"{name}\"\nsize = \"{size}\"\nreplicas = [{}]\n",
            r.join(", ")
        )
    }

    #[test]
    fn replica_lists_become_adds_removes_and_replacements() {
        let old = cfg(&vol("v", "1GiB", &["a", "b"]));
        type Case = (&'static str, Vec<&'static str>, Vec<Change>);
        let add = |r: &str| Change::ReplicaAdded {
            volume: "v".into(),
            replica: format!("/r/{r}"),
        };
        let rm = |r: &str| Change::ReplicaRemoved {
            volume: "v".into(),
            replica: format!("/r/{r}"),
        };
        let repl = |o: &str, n: &str| Change::ReplicaReplaced {
            volume: "v".into(),
            old: format!("/r/{o}"),
            new: format!("/r/{n}"),
        };
        let cases: Vec<Case> = vec![
            ("unchanged", vec!["a", "b"], vec![]),
            ("reordered", vec!["b", "a"], vec![]),
            ("added", vec!["a", "b", "c"], vec![add("c")]),
            ("removed", vec!["a"], vec![rm("b")]),
            ("replaced in place", vec!["a", "c"], vec![repl("b", "c")]),
            (
                "removed and added elsewhere",
                vec!["c", "a"],
                vec![rm("b"), add("c")],
            ),
        ];
        for (name, replicas, want) in cases {
            let new = cfg(&vol("v", "1GiB", &replicas));
            assert_eq!(plan(&old, &new).unwrap(), want, "{name}");
        }
    }

    #[test]
    fn volumes_come_and_go_and_other_keys_wait_for_a_restart() {
        let old = cfg(&(vol("v", "1GiB", &["a"]) + &vol("w", "1GiB", &["b"])));
        let new = cfg(&format!(
            "[rebuild]\nrate = \"10MiB\"\n{}{}",
            vol("v", "1GiB", &["a"]).replace("replicas", "queues = 2\nreplicas"),
            vol("x", "1GiB", &["c"])
        ));
        assert_eq!(
            plan(&old, &new).unwrap(),
            vec![
                Change::RebuildLimits {
                    rate: 10 << 20,
                    busy_percent: 25,
                    max_concurrent: 2,
                },
                Change::VolumeRemoved { volume: "w".into() },
                Change::AtNextStart {
                    volume: "v".into(),
                    key: "queues".into()
                },
                Change::VolumeAdded { volume: "x".into() },
            ]
        );
    }

    #[test]
    fn partial_windows_apply_live_the_node_one_and_a_volume_override() {
        let old = cfg(&(vol("v", "1GiB", &["a"]) + &vol("w", "1GiB", &["b"])));
        let new = cfg(&format!(
            "[rebuild]\npartial_window_s = 60\n{}{}",
            vol("v", "1GiB", &["a"]).replace("replicas", "partial_window_s = 3600\nreplicas"),
            vol("w", "1GiB", &["b"])
        ));
        assert_eq!(
            plan(&old, &new).unwrap(),
            vec![
                Change::PartialWindow {
                    volume: None,
                    window_s: 60
                },
                Change::PartialWindow {
                    volume: Some("v".into()),
                    window_s: 3600
                },
            ]
        );
        // Dropping the override falls back to the node's window.
        let back = cfg(&format!(
            "[rebuild]\npartial_window_s = 60\n{}{}",
            vol("v", "1GiB", &["a"]),
            vol("w", "1GiB", &["b"])
        ));
        assert_eq!(
            plan(&new, &back).unwrap(),
            vec![Change::PartialWindow {
                volume: Some("v".into()),
                window_s: 60
            }]
        );
    }

    #[test]
    fn ha_rules_and_spares_apply_live() {
        let secret = "[node]\ncluster_secret_file = \"/k\"\n";
        let old = cfg(&format!("{secret}{}", vol("v", "1GiB", &["a"])));
        let new = cfg(&format!(
            "{secret}[ha]\ngrace_ms = 9000\n{}",
            vol("v", "1GiB", &["a"]).replace("replicas", "spares = [\"10.0.0.9:7450\"]\nreplicas")
        ));
        assert_eq!(
            plan(&old, &new).unwrap(),
            vec![
                Change::HaRules {
                    grace_ms: 9000,
                    probe_interval_ms: 1000,
                    rejoin_probes: 3,
                    max_concurrent: 2,
                },
                Change::Spares {
                    volume: "v".into(),
                    spares: vec!["10.0.0.9:7450".into()],
                },
            ]
        );
        assert!(plan(&new, &new).unwrap().is_empty());
    }

    #[test]
    fn a_snapshot_schedule_applies_live_and_a_bad_one_is_refused_naming_the_key() {
        let old = cfg(&vol("v", "1GiB", &["a"]));
        let with = |t: &str| {
            vol("v", "1GiB", &["a"]).replace("replicas", &format!("snapshots = {t}\nreplicas"))
        };
        let new = cfg(&with("{ every = \"1h\", keep = 24, freeze = true }"));
        let want = crate::schedule::Schedule {
            every_ms: 3_600_000,
            keep: 24,
            freeze: true,
        };
        assert_eq!(
            plan(&old, &new).unwrap(),
            vec![Change::Schedule {
                volume: "v".into(),
                schedule: Some(want),
            }]
        );
        assert_eq!(
            plan(&new, &old).unwrap(),
            vec![Change::Schedule {
                volume: "v".into(),
                schedule: None,
            }]
        );
        for (bad, says) in [
            ("{ every = \"30s\", keep = 2 }", "snapshots.every"),
            ("{ every = \"1x\", keep = 2 }", "snapshots.every"),
            ("{ every = \"1h\", keep = 0 }", "snapshots.keep"),
            ("{ every = \"1h\", keep = 32 }", "snapshots.keep"),
            ("{ every = \"1h\" }", "needs `keep`"),
            ("{ every = \"1h\", keep = 2, often = true }", "often"),
        ] {
            let e = Config::parse(&with(bad), "t.toml").unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn geometry_node_and_server_changes_are_refused_by_name() {
        let old = cfg(&vol("v", "1GiB", &["a"]));
        let e = plan(&old, &cfg(&vol("v", "2GiB", &["a"]))).unwrap_err();
        assert_eq!(
            e,
            Refused::Geometry {
                volume: "v".into(),
                key: "size",
                old: 1 << 30,
                new: 2 << 30
            }
        );
        assert!(e.to_string().contains("nothing was changed"));
        let bs = vol("v", "1GiB", &["a"]).replace("replicas", "block_size = 4096\nreplicas");
        assert!(matches!(
            plan(&old, &cfg(&bs)),
            Err(Refused::Geometry {
                key: "block_size",
                ..
            })
        ));
        let node = format!("[node]\nio_timeout_ms = 5000\n{}", vol("v", "1GiB", &["a"]));
        assert_eq!(
            plan(&old, &cfg(&node)),
            Err(Refused::Node {
                key: "io_timeout_ms"
            })
        );
    }
}
