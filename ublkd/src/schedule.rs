//! Scheduled snapshots and their retention: a volume's `snapshots = { every = "1h",
//! keep = 24 }` in the config. [`plan`] is the decision, pure and table-tested;
//! [`run`] is the loop that lists, plans and applies, once a minute at most, on a
//! thread of its own.
//!
//! The schedule owns the snapshots named `auto-…` only: an operator's snapshots
//! are never deleted by it. One is due `every` after the newest `auto-` one (so a
//! daemon down for a day takes one when it is back, not a day's worth); once it
//! is taken, the oldest `auto-` ones beyond `keep` are deleted. A failed create
//! deletes nothing (the old ones still protect the volume) and is retried at
//! the next round; status shows the last error.

use std::time::Duration;

/// Names of the snapshots a schedule takes and prunes.
pub const AUTO_PREFIX: &str = "auto-";

/// A volume's snapshot schedule (config key `snapshots`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    /// Time between two snapshots, at least a minute.
    pub every_ms: u64,
    /// Scheduled snapshots kept (the newest ones), at least 1.
    pub keep: u32,
    /// Freeze the mounted filesystem around each (FIFREEZE).
    pub freeze: bool,
}

/// Shortest `every`: the scheduler looks once a minute at most.
pub const MIN_EVERY_MS: u64 = 60_000;

/// What a schedule does now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Create { name: String },
    Delete { name: String },
}

/// The name of a scheduled snapshot taken at `ms` (UTC, to the second; sorts by
/// time).
pub fn auto_name(ms: u64) -> String {
    let t = crate::utc::utc(ms);
    format!(
        "{AUTO_PREFIX}{:04}{:02}{:02}-{:02}{:02}{:02}",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

/// Pure: given the volume's snapshots (name, creation ms; deleting ones left
/// out), what the schedule does at `now_ms`: a create when one is due, then the
/// deletes that keep `keep` scheduled ones. The caller stops at a failed create.
pub fn plan(s: &Schedule, now_ms: u64, snaps: &[(String, u64)]) -> Vec<Action> {
    let mut autos: Vec<&(String, u64)> = snaps
        .iter()
        .filter(|(n, _)| n.starts_with(AUTO_PREFIX))
        .collect();
    autos.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    let mut out = Vec::new();
    let due = autos
        .last()
        .is_none_or(|(_, at)| now_ms >= at.saturating_add(s.every_ms));
    let name = auto_name(now_ms);
    // Two in one second (a clock set back): never a second one of a name.
    let mut count = autos.len();
    if due && !snaps.iter().any(|(n, _)| *n == name) {
        out.push(Action::Create { name });
        count += 1;
    }
    let excess = count.saturating_sub(s.keep as usize);
    out.extend(
        autos
            .iter()
            .take(excess)
            .map(|(n, _)| Action::Delete { name: n.clone() }),
    );
    out
}

/// When the scheduler looks again.
pub const ROUND: Duration = Duration::from_secs(30);

/// The schedules of the running volumes, a round every [`ROUND`], until `stop`.
pub fn run(daemon: &crate::daemon::Daemon, stop: &crate::ha::StopFlag) {
    while !stop.is_stopped() {
        for v in daemon.serving() {
            v.scheduled_round();
        }
        if stop.wait(ROUND) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3_600_000;

    fn s(every_ms: u64, keep: u32) -> Schedule {
        Schedule {
            every_ms,
            keep,
            freeze: false,
        }
    }

    #[test]
    fn names_sort_by_time_and_read_as_utc() {
        assert_eq!(auto_name(0), "auto-19700101-000000");
        // 2026-12-07 23:04:05 UTC
        assert_eq!(auto_name(1_796_684_645_000), "auto-20261207-230405");
        assert!(auto_name(1_796_684_645_000) < auto_name(1_796_684_646_000));
    }

    #[test]
    fn the_plan_takes_one_when_due_and_keeps_the_newest() {
        let t0 = 1_796_684_645_000;
        let auto = |k: u64| (auto_name(t0 + k * H), t0 + k * H);
        let manual = ("nightly".to_string(), t0 - 10 * H);
        // (schedule, now, snapshots) -> actions (c: create at now, d: delete name)
        let create = |now| Action::Create {
            name: auto_name(now),
        };
        let delete = |k: u64| Action::Delete { name: auto(k).0 };
        type Case = (Schedule, u64, Vec<(String, u64)>, Vec<Action>);
        let cases: Vec<Case> = vec![
            // none yet: one now
            (s(H, 3), t0, vec![], vec![create(t0)]),
            // an operator's snapshot neither counts nor goes
            (s(H, 1), t0, vec![manual.clone()], vec![create(t0)]),
            // not due yet
            (s(H, 3), t0 + H - 1, vec![auto(0)], vec![]),
            // due exactly `every` after the newest
            (s(H, 3), t0 + H, vec![auto(0)], vec![create(t0 + H)]),
            // due, at the limit: the oldest goes after the create
            (
                s(H, 2),
                t0 + 2 * H,
                vec![auto(0), auto(1), manual.clone()],
                vec![create(t0 + 2 * H), delete(0)],
            ),
            // keep lowered by a reload: the excess goes even when none is due
            (s(H, 1), t0 + H + 5, vec![auto(1), auto(0)], vec![delete(0)]),
            // down for a day: one now, not 24
            (
                s(H, 24),
                t0 + 24 * H,
                vec![auto(0)],
                vec![create(t0 + 24 * H)],
            ),
            // the name is taken (made by hand with that name): no second one of it
            (
                s(H, 3),
                t0 + H,
                vec![auto(0), (auto_name(t0 + H), t0 - 10 * H)],
                vec![],
            ),
        ];
        for (i, (sch, now, snaps, want)) in cases.into_iter().enumerate() {
            assert_eq!(plan(&sch, now, &snaps), want, "case {i}");
        }
    }
}
