//! Seeded fault simulator of the replication core.
//!
//! From one u64 seed: a volume of 2-4 memory replicas (some "remote"), a
//! workload of overlapping writes (512 B - 256 KiB), reads, flushes, discards and
//! write_zeroes, mixed with faults (write, read, EIO, lost connections, host
//! crashes), reconnects, rebuilds, verify --repair and slots added and removed —
//! all through the real `Health`, `Nexus`, rebuild copier and verify. A reference
//! model (per 512 B sector: the last acknowledged value, plus failed writes' values)
//! is checked after every step: reads return what it allows, every online replica
//! holds what it allows, some member holds every acknowledged write, online
//! replicas are identical after a rebuild. See `sim/world.rs` for the determinism.
//!
//! ```text
//! cargo test --release -p replication --test sim                     # CI batch
//! SIM_SEED=1234 cargo test --release -p replication --test sim       # replay one seed
//! SIM_SEEDS=5000 SIM_STEPS=300 ...                                   # a bigger batch
//! SIM_ALL=1 ...           # known holes too (see KNOWN_HOLES)
//! SIM_HOLE=CONN_MULTI ... # the default flags plus this one, always on
//! SIM_FLAGS=WRITE_ERR,REBUILD,REBUILD_FAULTS ...   # exactly these flags, every seed
//! SIM_BASE=N ...          # first seed of the batch (default 1)
//! ```
//!
//! Without `SIM_FLAGS`, each seed turns each allowed flag on with odd 1/2 (from the
//! seed), so a batch covers the combinations.

#[path = "sim/flags.rs"]
mod flags;
#[path = "sim/model.rs"]
mod model;
#[path = "sim/world.rs"]
mod world;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

use flags::Flags;
use replication::testing::Rng;
use world::{panic_text, Stats, World};

/// Holes the simulator found, fixed since: each recorded seed (with its flags, at
/// [`HOLE_STEPS`] steps) failed at that step before the fix and must pass now
/// (`fixed_holes_stay_fixed`). Their flags are in the default batch.
const FIXED: &[Hole] = &[
    Hole {
        flag: Flags::CONN_MULTI,
        bug: "A: two remote replicas lose their connection under one request; the second back is stale",
        flags: "WRITE_ERR,CONN_LOSS,CONN_MULTI,VERIFY,ADD_REMOVE",
        seed: 16,
        step: 18,
    },
    Hole {
        flag: Flags::REBUILD_FAULTS,
        bug: "B: the copier keeps copying from a source faulted for write errors",
        flags: "WRITE_ERR,REBUILD,ADD_REMOVE,REBUILD_FAULTS",
        seed: 166,
        step: 74,
    },
    Hole {
        flag: Flags::VERIFY_FAULTS,
        bug: "C: verify --repair copies from a replica faulted during the region",
        flags: "WRITE_ERR,CONN_LOSS,HOST_CRASH,REBUILD,VERIFY,ADD_REMOVE,VERIFY_FAULTS",
        seed: 117,
        step: 20,
    },
    Hole {
        flag: Flags::REMOVE_CONNECTING,
        bug: "D: removing the last current replica while it is Connecting empties the membership",
        flags: "WRITE_ERR,EIO,CONN_LOSS,VERIFY,ADD_REMOVE,REMOVE_CONNECTING",
        seed: 293,
        step: 36,
    },
    Hole {
        flag: Flags::LABEL_FAULTS,
        bug: "S1 (found here): the persister faults every member whose label fails, the last online one too",
        flags: "WRITE_ERR,READ_ERR,EIO,HOST_CRASH,REBUILD,VERIFY,ADD_REMOVE,LABEL_FAULTS",
        seed: 17,
        step: 12,
    },
    Hole {
        flag: Flags::CONN_PAIR,
        bug: "Q: two connections lost back to back: the last member's label misses the first one's fault, it is refused forever",
        flags: "WRITE_ERR,READ_ERR,CONN_LOSS,REBUILD,VERIFY,ADD_REMOVE,CONN_PAIR",
        seed: 38,
        step: 1,
    },
    Hole {
        flag: Flags::TARGET_FLAP,
        bug: "S2 (found here): the copier keeps copying into a target faulted mid-stretch; a host crash then loses those copies unmarked",
        flags: "READ_ERR,EIO,CONN_LOSS,HOST_CRASH,REBUILD,VERIFY,ADD_REMOVE,TARGET_FLAP",
        seed: 661,
        step: 120,
    },
];

/// Scenarios that fail on today's code: kept out of the default batch unless
/// `SIM_ALL=1`, each with a seed that catches it (the ignored `known_holes` test
/// checks they still fail). Move a hole to [`FIXED`] with its fix.
const KNOWN_HOLES: &[Hole] = &[];

struct Hole {
    flag: Flags,
    bug: &'static str,
    /// Flags of the recorded failing seed.
    flags: &'static str,
    seed: u64,
    /// The step that catches it (with [`HOLE_STEPS`] steps per seed).
    step: usize,
}

/// Steps per seed of the CI batch.
const DEFAULT_STEPS: usize = 160;

/// Steps per seed of the recorded holes.
const HOLE_STEPS: usize = 120;

fn holes() -> Flags {
    KNOWN_HOLES.iter().fold(Flags::NONE, |m, h| m | h.flag)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

/// How each seed's flags are chosen.
#[derive(Clone)]
struct Mode {
    /// Exactly these (SIM_FLAGS).
    fixed: Option<Flags>,
    /// Else a random subset of these, per seed...
    allowed: Flags,
    /// ...plus these always (SIM_HOLE).
    forced: Flags,
    /// The environment that selects this mode, for the replay line.
    env: String,
}

impl Mode {
    fn from_env() -> Mode {
        if let Ok(f) = std::env::var("SIM_FLAGS") {
            let flags = Flags::parse(&f);
            return Mode {
                fixed: Some(flags),
                allowed: flags,
                forced: Flags::NONE,
                env: format!("SIM_FLAGS={flags} "),
            };
        }
        let all = std::env::var("SIM_ALL").is_ok_and(|v| v == "1");
        let forced = std::env::var("SIM_HOLE").map_or(Flags::NONE, |h| Flags::parse(&h));
        let allowed = if all {
            Flags::all()
        } else {
            Flags::all().without(holes())
        };
        let mut env = String::new();
        if all {
            env.push_str("SIM_ALL=1 ");
        }
        if forced != Flags::NONE {
            env.push_str(&format!("SIM_HOLE={forced} "));
        }
        Mode {
            fixed: None,
            allowed,
            forced,
            env,
        }
    }

    fn flags(&self, seed: u64) -> Flags {
        if let Some(f) = self.fixed {
            return f;
        }
        let mut rng = Rng(seed.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ 0xF1A6 | 1);
        rng.next();
        let mut f = self.forced;
        for (flag, _) in Flags::NAMES {
            if self.allowed.has(*flag) && rng.below(2) == 0 {
                f = f | *flag;
            }
        }
        f
    }
}

struct Failure {
    seed: u64,
    flags: Flags,
    step: usize,
    what: String,
    trace: Vec<String>,
}

impl Failure {
    fn report(&self, mode: &Mode, steps: usize) -> String {
        let steps = match steps {
            DEFAULT_STEPS => String::new(),
            n => format!("SIM_STEPS={n} "),
        };
        let mut s = format!(
            "SIM FAILURE seed {} step {} (flags {}):\n  {}\n  replay: {}{steps}SIM_SEED={} cargo test --release -p replication --test sim\n  last steps:\n",
            self.seed, self.step, self.flags, self.what, mode.env, self.seed
        );
        for t in &self.trace {
            s.push_str("    ");
            s.push_str(t);
            s.push('\n');
        }
        s
    }
}

fn run_seed(seed: u64, flags: Flags, steps: usize) -> Result<Stats, Failure> {
    let trace: world::Trace = Rc::new(RefCell::new(VecDeque::new()));
    let step = Rc::new(std::cell::Cell::new(0usize));
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (mut w, nexus) = World::new(seed, flags, trace.clone());
        let mut res = Ok(());
        for _ in 0..steps {
            step.set(w.step);
            res = w.one_step(&nexus);
            if res.is_err() {
                break;
            }
        }
        if res.is_ok() {
            step.set(w.step);
            res = w.finish();
        }
        drop(nexus);
        w.stop();
        res.map(|()| w.stats.clone())
    }));
    let what = match res {
        Ok(Ok(stats)) => return Ok(stats),
        Ok(Err(e)) => e,
        Err(p) => format!("PANIC: {}", panic_text(&*p)),
    };
    let trace = trace.borrow().iter().cloned().collect();
    Err(Failure {
        seed,
        flags,
        step: step.get(),
        what,
        trace,
    })
}

/// The CI batch (or one seed with SIM_SEED): fails if the model is violated.
#[test]
fn sim() {
    let mode = Mode::from_env();
    let steps = env_u64("SIM_STEPS").unwrap_or(DEFAULT_STEPS as u64) as usize;
    let seeds: Vec<u64> = match env_u64("SIM_SEED") {
        Some(s) => vec![s],
        None => {
            let base = env_u64("SIM_BASE").unwrap_or(1);
            let n = env_u64("SIM_SEEDS").unwrap_or(1000);
            (base..base + n).collect()
        }
    };
    let t0 = Instant::now();
    let mut total = Stats::default();
    let mut failures = Vec::new();
    for &seed in &seeds {
        let flags = mode.flags(seed);
        match run_seed(seed, flags, steps) {
            Ok(s) => total.add(&s),
            Err(f) => {
                if failures.len() < 5 {
                    eprintln!("{}", f.report(&mode, steps));
                }
                failures.push(f);
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "sim: {} seeds x {steps} steps in {secs:.1} s: {:.0} steps/s; {total:?}",
        seeds.len(),
        total.steps as f64 / secs
    );
    if !failures.is_empty() {
        let mut by_kind: Vec<(String, Vec<(u64, usize)>)> = Vec::new();
        for f in &failures {
            let kind: String = f.what.split(':').next().unwrap_or("").to_string();
            match by_kind.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, v)) => v.push((f.seed, f.step)),
                None => by_kind.push((kind, vec![(f.seed, f.step)])),
            }
        }
        for (k, v) in &by_kind {
            eprintln!(
                "  {} x {k}: (seed, step) {:?}",
                v.len(),
                &v[..v.len().min(8)]
            );
        }
        panic!(
            "{} of {} seeds violated the model (first: seed {})",
            failures.len(),
            seeds.len(),
            failures[0].seed
        );
    }
    // Not vacuous: a full batch really exercised faults and recoveries.
    if seeds.len() >= 100 && mode.fixed.is_none() {
        assert!(total.faults > 0 && total.writes_failed > 0, "{total:?}");
        assert!(
            total.rebuilds_done > 0 && total.rebuilds_stopped > 0,
            "{total:?}"
        );
        assert!(total.reconnects > 0 && total.conn_losses > 0, "{total:?}");
        assert!(total.verifies > 0 && total.host_crashes > 0, "{total:?}");
        assert!(total.adds > 0 && total.removes > 0, "{total:?}");
    }
}

/// Every fixed hole's recorded seed passes.
#[test]
fn fixed_holes_stay_fixed() {
    for h in FIXED {
        if let Err(f) = run_seed(h.seed, Flags::parse(h.flags), HOLE_STEPS) {
            panic!(
                "{} is back: seed {} step {}: {}",
                h.bug, f.seed, f.step, f.what
            );
        }
    }
}

/// Each known hole's recorded seed still fails (once its bug is fixed this
/// fails: move it to FIXED).
#[test]
#[ignore]
fn known_holes() {
    for h in KNOWN_HOLES {
        let flags = Flags::parse(h.flags);
        match run_seed(h.seed, flags, HOLE_STEPS) {
            Ok(_) => panic!("hole {} no longer fails at seed {}: fixed?", h.bug, h.seed),
            Err(f) => {
                eprintln!("{}\n  seed {} step {}: {}", h.bug, f.seed, f.step, f.what);
                assert_eq!(f.step, h.step, "{}: caught at another step", h.bug);
            }
        }
    }
}

/// The model and its checks catch a replica that lacks an acknowledged write.
#[test]
fn the_checks_catch_a_stale_replica() {
    let trace: world::Trace = Rc::new(RefCell::new(VecDeque::new()));
    let (mut w, nexus) = World::new(7, Flags::NONE, trace);
    for _ in 0..40 {
        w.one_step(&nexus).unwrap();
    }
    w.check_all().unwrap();
    assert!(w.corrupt_online_replica(), "something was written");
    let e = w.check_all().unwrap_err();
    assert!(e.contains("STALE ONLINE REPLICA"), "{e}");
    w.stop();
}
