//! One simulated volume: the real health, nexus, rebuild copier and verify over
//! memory replicas, driven step by step from one seed.
//!
//! Determinism: the simulator thread issues one application request at a time and
//! polls it itself; when it is pending it waits for durability (the persister
//! thread), reconnects a replica the request waits for, or fails it as timed out.
//! A background job (rebuild, verify) runs on its own thread but is gated
//! ([`Gate`]): it parks before every memory replica operation and runs only
//! when the simulator grants it the next one, while no application request is in
//! flight. Before every step the simulator waits until every state change is
//! durable, so the persister never races a step.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures::FutureExt;
use replication::backing::Backing;
use replication::health::{HealthSnapshot, SlotSpec};
use replication::ranges::RangeTable;
use replication::rebuild::{self, CopyConfig, Outcome, Progress, Rate};
use replication::remote::Lost;
use replication::state::{RebuildKind, ReplicaState};
use replication::testing::{
    health_over, test_nexus, Fault, Gate, GateAt, MemStore, RecordingSink, Rng,
};
use replication::verify::{self, Repair, Report};
use replication::{BlockRequest, ByteLen, ByteOffset, Health, Nexus, ReplicationError, SlotIndex};
use wire::{ReplicaUuid, VolumeUuid};

use super::flags::Flags;
use super::model::{fill, Model, SECTOR};

/// Volume size: 2 MiB.
pub const SIZE: usize = 2 << 20;
pub const SECTORS: usize = SIZE / SECTOR;
/// Most slots not removed at once.
const MAX_LIVE: usize = 5;
const STUCK: Duration = Duration::from_secs(10);

/// The last steps, for the report of a failing seed.
pub type Trace = Rc<RefCell<VecDeque<String>>>;
pub const TRACE_LEN: usize = 30;

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub steps: u64,
    pub writes_acked: u64,
    pub writes_failed: u64,
    pub reads_ok: u64,
    pub reads_failed: u64,
    pub flushes: u64,
    pub zeroes: u64,
    pub faults: u64,
    pub heals: u64,
    pub conn_losses: u64,
    pub reconnects: u64,
    pub host_crashes: u64,
    pub timeouts: u64,
    pub rebuilds_done: u64,
    pub rebuilds_stopped: u64,
    pub verifies: u64,
    pub repaired: u64,
    pub adds: u64,
    pub removes: u64,
    pub full_checks: u64,
    /// Sectors where online replicas differ after a failed write (allowed).
    pub divergent: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        macro_rules! sum { ($($f:ident),*) => { $(self.$f += o.$f;)* } }
        sum!(
            steps,
            writes_acked,
            writes_failed,
            reads_ok,
            reads_failed,
            flushes,
            zeroes,
            faults,
            heals,
            conn_losses,
            reconnects,
            host_crashes,
            timeouts,
            rebuilds_done,
            rebuilds_stopped,
            verifies,
            repaired,
            adds,
            removes,
            full_checks,
            divergent
        );
    }
}

#[derive(Clone, Copy)]
enum JobKind {
    Rebuild { slot: usize, kind: RebuildKind },
    Verify,
}

enum JobOut {
    Rebuild(Result<Outcome, ReplicationError>),
    Verify(Result<Report, ReplicationError>),
}

struct Job {
    kind: JobKind,
    gate: Arc<Gate>,
    thread: Option<std::thread::JoinHandle<Result<JobOut, String>>>,
}

impl Drop for Job {
    fn drop(&mut self) {
        // A failing seed leaves its job parked: let it run out.
        self.gate.open();
    }
}

/// Wakes the simulator thread's poll loop.
struct Woken {
    flag: AtomicBool,
    thread: std::thread::Thread,
}

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.flag.store(true, Ordering::SeqCst);
        self.thread.unpark();
    }
}

pub struct World {
    pub flags: Flags,
    rng: Rng,
    pub step: usize,
    health: Arc<Health>,
    ranges: Arc<RangeTable>,
    /// By slot index; `None` once removed.
    stores: Vec<Option<Arc<MemStore>>>,
    model: Model,
    next_id: u64,
    job: Option<Job>,
    /// Connections that broke under the last request: their `lost` events come
    /// after the requests' errors (CONN_MULTI).
    pending_lost: Vec<usize>,
    pending_since: usize,
    /// By slot: its host crashed since it last connected (the server's next OPEN
    /// reply names another boot).
    rebooted: Vec<bool>,
    trace: Trace,
    /// SIM_TRACE=1: print every step.
    verbose: bool,
    pub stats: Stats,
}

type Step = Result<(), String>;

fn err<T>(msg: impl Into<String>) -> Result<T, String> {
    Err(msg.into())
}

impl World {
    pub fn new(seed: u64, flags: Flags, trace: Trace) -> (World, Nexus) {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED_0F5E_ED5E_ED01 | 1);
        for _ in 0..4 {
            rng.next();
        }
        let n = 2 + rng.below(3);
        let stores: Vec<Arc<MemStore>> = (0..n).map(|_| MemStore::new(SIZE)).collect();
        let wants_remote = flags.any(Flags::CONN_LOSS | Flags::CONN_MULTI | Flags::HOST_CRASH);
        let mut remote: Vec<bool> = (0..n).map(|_| rng.below(2) == 0).collect();
        if wants_remote {
            // At least two remote replicas, so that several can go at once.
            for r in remote.iter_mut().take(2) {
                *r = true;
            }
        }
        for (s, &r) in stores.iter().zip(&remote) {
            if r {
                s.play_remote();
                if flags.has(Flags::HOST_CRASH) {
                    s.track_durable();
                }
            }
        }
        let backings = stores
            .iter()
            .map(|s| (ReplicaUuid::random(), Backing::Memory(s.clone())))
            .collect();
        let health = health_over(
            "sim",
            VolumeUuid::random(),
            SIZE as u64,
            backings,
            Box::new(Arc::new(RecordingSink::default())),
        );
        let ranges = RangeTable::new();
        let nexus = test_nexus(&health, ranges.clone());
        let w = World {
            flags,
            rng,
            step: 0,
            health,
            ranges,
            stores: stores.into_iter().map(Some).collect(),
            model: Model::new(SECTORS),
            next_id: 1,
            job: None,
            pending_lost: Vec::new(),
            pending_since: 0,
            rebooted: Vec::new(),
            trace,
            verbose: std::env::var("SIM_TRACE").is_ok_and(|v| v == "1"),
            stats: Stats::default(),
        };
        let desc = (0..n)
            .map(|i| if remote[i] { "remote" } else { "local" })
            .collect::<Vec<_>>()
            .join(",");
        w.note(format!("volume of {n} replicas [{desc}], flags {}", flags));
        (w, nexus)
    }

    fn note(&self, s: String) {
        if self.verbose {
            eprintln!("#{:<4} {s}", self.step);
        }
        let mut t = self.trace.borrow_mut();
        if t.len() == TRACE_LEN {
            t.pop_front();
        }
        t.push_back(format!("#{:<4} {s}", self.step));
    }

    fn snapshot(&self) -> HealthSnapshot {
        self.health.snapshot()
    }

    fn state(&self, slot: usize) -> Option<ReplicaState> {
        self.snapshot()
            .slots
            .into_iter()
            .find(|s| s.slot.get() == slot)
            .map(|s| s.state)
    }

    fn states(&self) -> String {
        let snap = self.snapshot();
        let mut out = Vec::new();
        for s in &snap.slots {
            let st = match &s.state {
                ReplicaState::Online => "On".to_string(),
                ReplicaState::Connecting => "Conn".to_string(),
                ReplicaState::Rebuilding { kind } => format!("Reb({kind:?})"),
                ReplicaState::Faulted { reason } => format!("F({reason})"),
                ReplicaState::Removed => "Rm".to_string(),
            };
            let f = match self.store(s.slot.get()).map(|s| s.fault()) {
                Some(Fault::None) | None => String::new(),
                Some(f) => format!("!{f:?}"),
            };
            out.push(format!("{}:{st}{f}", s.slot.get()));
        }
        let members: Vec<usize> = snap
            .membership
            .members
            .iter()
            .filter_map(|u| snap.slots.iter().find(|s| s.uuid == *u))
            .map(|s| s.slot.get())
            .collect();
        format!(
            "[{}] e{} members {members:?}",
            out.join(" "),
            snap.membership.epoch.0
        )
    }

    fn store(&self, slot: usize) -> Option<&Arc<MemStore>> {
        self.stores.get(slot)?.as_ref()
    }

    fn live_slots(&self) -> Vec<usize> {
        (0..self.stores.len())
            .filter(|&i| self.stores[i].is_some())
            .collect()
    }

    fn pick(&mut self, from: &[usize]) -> Option<usize> {
        (!from.is_empty()).then(|| from[self.rng.below(from.len())])
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.rng.below(one_in) == 0
    }

    // ---- waiting --------------------------------------------------------------

    /// Wait until every state change so far is durable (the persister is idle).
    /// When the persister fails (the label of the last online replica cannot be
    /// written) the operator heals the online replicas' faults, so the run goes on
    /// deterministically instead of racing the persister's retries.
    fn quiesce(&mut self) -> Step {
        let t0 = Instant::now();
        // One ticket until it fails: a new one would ask for one more commit.
        let mut ticket = None;
        loop {
            let v = self.health.signal().version();
            if self.health.is_durable() {
                return Ok(());
            }
            if self.member_awaited_back()? {
                continue;
            }
            if t0.elapsed() > STUCK {
                return err(format!(
                    "stuck: a state change never became durable; {}",
                    self.states()
                ));
            }
            let t = *ticket.get_or_insert_with(|| self.health.want_log());
            let durable = self.health.durable(t, None);
            let changed =
                self.health
                    .changed(v, Some(Instant::now() + Duration::from_millis(200)), None);
            match futures::executor::block_on(futures::future::select(
                std::pin::pin!(durable),
                changed,
            )) {
                futures::future::Either::Left((Ok(()), _)) => return Ok(()),
                futures::future::Either::Left((Err(_), _)) => ticket = None,
                // Something changed (the persister may wait for a member now).
                futures::future::Either::Right(_) => continue,
            }
            let read = self.health.read_mask();
            let mut healed = Vec::new();
            for i in self.live_slots() {
                let s = self.store(i).unwrap();
                if read & (1 << i) != 0 && label_fails(s.fault()) {
                    s.set_fault(Fault::None);
                    self.pending_lost.retain(|&x| x != i);
                    healed.push(i);
                }
            }
            self.note(format!("  a persist failed: heal online slots {healed:?}"));
            if healed.is_empty() && t0.elapsed() > STUCK {
                return err(format!(
                    "stuck: a state change never became durable; {}",
                    self.states()
                ));
            }
        }
    }

    /// Poll `fut` to completion on this thread (see the module docs); `None`: it
    /// waited for a replica none of which could come back (timed out, dropped
    /// while it holds no replica I/O).
    fn drive<T>(&mut self, fut: impl Future<Output = T>) -> Result<Option<T>, String> {
        let mut fut = std::pin::pin!(fut);
        let woken = Arc::new(Woken {
            flag: AtomicBool::new(false),
            thread: std::thread::current(),
        });
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        let t0 = Instant::now();
        loop {
            woken.flag.store(false, Ordering::SeqCst);
            let durable_before = self.health.is_durable();
            if let Poll::Ready(x) = fut.as_mut().poll(&mut cx) {
                return Ok(Some(x));
            }
            if t0.elapsed() > STUCK {
                return err(format!(
                    "stuck: a request never completed; {}",
                    self.states()
                ));
            }
            if !durable_before || !self.health.is_durable() {
                self.quiesce()?;
                continue;
            }
            if woken.flag.load(Ordering::SeqCst) {
                continue;
            }
            if self.health.waiting() {
                self.deliver_lost();
                if self.reconnect_waited()? {
                    continue;
                }
                self.note("  no replica can come back: the request times out".into());
                self.stats.timeouts += 1;
                return Ok(None);
            }
            std::thread::park_timeout(Duration::from_millis(1));
        }
    }

    /// A request waits for a Connecting replica: bring one back.
    /// A membership change waits for a reconnecting member's label: it comes back
    /// (if one can), as for a request waiting for it. Whether one did.
    fn member_awaited_back(&mut self) -> Result<bool, String> {
        if !(self.health.awaits_member() && self.health.waiting()) {
            return Ok(false);
        }
        self.deliver_lost();
        self.reconnect_waited()
    }

    fn reconnect_waited(&mut self) -> Result<bool, String> {
        let mut cands: Vec<usize> = self
            .live_slots()
            .into_iter()
            .filter(|&i| self.state(i) == Some(ReplicaState::Connecting))
            .collect();
        while !cands.is_empty() {
            let k = self.rng.below(cands.len());
            let slot = cands.swap_remove(k);
            if self.reconnect(slot)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    // ---- application I/O ------------------------------------------------------

    fn range(&mut self) -> (usize, usize) {
        let n = (1usize << self.rng.below(10)).min(512);
        let n = (n + self.rng.below(n)).clamp(1, 512);
        // Half of the requests in a few hot spots, so they overlap.
        let first = if self.chance(2) {
            let spot = self.rng.below(4) * (SECTORS / 4);
            spot + self.rng.below(256)
        } else {
            self.rng.below(SECTORS)
        };
        let first = first.min(SECTORS - 1);
        (first, n.min(SECTORS - first))
    }

    fn submit(
        &mut self,
        nexus: &Nexus,
        req: BlockRequest,
        buf: &mut [u8],
    ) -> Result<Option<Result<u32, replication::Errno>>, String> {
        if let Some((o, l)) = req.range() {
            self.clear_job_range(o.0, l.0)?;
        }
        self.drive(nexus.submit(req, buf))
    }

    fn write(&mut self, nexus: &Nexus) -> Step {
        let (first, n) = self.range();
        let id = self.next_id;
        self.next_id += 1;
        let mut buf = vec![0u8; n * SECTOR];
        fill(&mut buf, first, id);
        let fua = self.chance(8);
        let req = BlockRequest::Write {
            offset: ByteOffset((first * SECTOR) as u64),
            len: ByteLen((n * SECTOR) as u64),
            fua,
        };
        let res = self.submit(nexus, req, &mut buf)?;
        self.mutated(
            first,
            n,
            id,
            res,
            format!(
                "write #{id} sectors {first}+{n}{}",
                if fua { " fua" } else { "" }
            ),
        );
        self.check_range(first, n)
    }

    fn zero(&mut self, nexus: &Nexus) -> Step {
        let (first, n) = self.range();
        let (offset, len) = (
            ByteOffset((first * SECTOR) as u64),
            ByteLen((n * SECTOR) as u64),
        );
        let (req, what) = if self.chance(2) {
            (BlockRequest::Discard { offset, len }, "discard")
        } else {
            (
                BlockRequest::WriteZeroes {
                    offset,
                    len,
                    no_unmap: false,
                },
                "write_zeroes",
            )
        };
        let res = self.submit(nexus, req, &mut [])?;
        self.stats.zeroes += 1;
        self.mutated(first, n, 0, res, format!("{what} sectors {first}+{n}"));
        self.check_range(first, n)
    }

    fn mutated(
        &mut self,
        first: usize,
        n: usize,
        id: u64,
        res: Option<Result<u32, replication::Errno>>,
        what: String,
    ) {
        match res {
            Some(Ok(_)) => {
                self.model.ack(first, n, id);
                self.stats.writes_acked += 1;
                self.note(format!("{what}: ok"));
            }
            Some(Err(e)) => {
                self.model.uncertain(first, n, id);
                self.stats.writes_failed += 1;
                self.note(format!("{what}: {e}"));
            }
            None => {
                self.model.uncertain(first, n, id);
                self.stats.writes_failed += 1;
                self.note(format!("{what}: timed out"));
            }
        }
    }

    fn read(&mut self, nexus: &Nexus) -> Step {
        let (first, n) = self.range();
        let mut buf = vec![0u8; n * SECTOR];
        let req = BlockRequest::Read {
            offset: ByteOffset((first * SECTOR) as u64),
            len: ByteLen((n * SECTOR) as u64),
        };
        let res = self.submit(nexus, req, &mut buf)?;
        match res {
            Some(Ok(_)) => {
                self.stats.reads_ok += 1;
                self.note(format!("read sectors {first}+{n}: ok"));
                self.model
                    .check(&buf, first)
                    .map_err(|e| format!("STALE READ: a read of sectors {first}+{n} returned {e}"))
            }
            Some(Err(e)) => {
                self.stats.reads_failed += 1;
                self.note(format!("read sectors {first}+{n}: {e}"));
                Ok(())
            }
            None => {
                self.stats.reads_failed += 1;
                self.note(format!("read sectors {first}+{n}: timed out"));
                Ok(())
            }
        }
    }

    fn flush(&mut self, nexus: &Nexus) -> Step {
        let res = self.submit(nexus, BlockRequest::Flush, &mut [])?;
        self.stats.flushes += 1;
        self.note(format!("flush: {:?}", res.map(|r| r.map(|_| ()))));
        Ok(())
    }

    // ---- faults ---------------------------------------------------------------

    /// Whether faults (or heals and reconnects, which make a faulted replica
    /// readable again) may happen now: not while a job runs unless the scenario
    /// asks for it (known holes B and C), except on a rebuild's target.
    fn faults_allowed(&self, slot: Option<usize>) -> bool {
        match &self.job {
            None => true,
            Some(Job {
                kind: JobKind::Rebuild { slot: t, .. },
                ..
            }) => self.flags.has(Flags::REBUILD_FAULTS) || slot == Some(*t),
            Some(Job {
                kind: JobKind::Verify,
                ..
            }) => self.flags.has(Flags::VERIFY_FAULTS),
        }
    }

    fn is_rebuild_target(&self, slot: usize) -> bool {
        matches!(&self.job, Some(Job { kind: JobKind::Rebuild { slot: t, .. }, .. }) if *t == slot)
    }

    fn inject(&mut self) -> Step {
        let mut kinds = Vec::new();
        if self.flags.has(Flags::WRITE_ERR) {
            kinds.push(Fault::Writes);
        }
        if self.flags.has(Flags::READ_ERR) {
            kinds.push(Fault::Reads);
        }
        if self.flags.has(Flags::EIO) {
            kinds.push(Fault::All);
        }
        let Some(&kind) = kinds.get(self.rng.below(kinds.len().max(1))) else {
            return Ok(());
        };
        let read = self.health.read_mask();
        // Known hole E: two online replicas whose labels fail at once.
        let label_faulty = self
            .live_slots()
            .into_iter()
            .filter(|&i| read & (1 << i) != 0 && label_fails(self.store(i).unwrap().fault()))
            .count();
        let cands: Vec<usize> = self
            .live_slots()
            .into_iter()
            .filter(|&i| self.store(i).unwrap().fault() == Fault::None)
            .filter(|&i| kind == Fault::Reads || self.faults_allowed(Some(i)))
            .filter(|&i| {
                !label_fails(kind)
                    || read & (1 << i) == 0
                    || label_faulty == 0
                    || self.flags.has(Flags::LABEL_FAULTS)
            })
            .collect();
        let Some(slot) = self.pick(&cands) else {
            return Ok(());
        };
        self.store(slot).unwrap().set_fault(kind);
        self.stats.faults += 1;
        self.note(format!("fault {kind:?} on slot {slot}"));
        Ok(())
    }

    fn heal(&mut self) -> Step {
        let cands: Vec<usize> = self
            .live_slots()
            .into_iter()
            .filter(|&i| {
                matches!(
                    self.store(i).unwrap().fault(),
                    Fault::Writes | Fault::Reads | Fault::All
                )
            })
            .filter(|&i| self.faults_allowed(Some(i)))
            .collect();
        let Some(slot) = self.pick(&cands) else {
            return Ok(());
        };
        self.store(slot).unwrap().set_fault(Fault::None);
        self.stats.heals += 1;
        self.note(format!("heal slot {slot}"));
        Ok(())
    }

    fn connected_remotes(&self) -> Vec<usize> {
        self.live_slots()
            .into_iter()
            .filter(|&i| {
                let s = self.store(i).unwrap();
                s.plays_remote() && s.fault() != Fault::NotConn
            })
            .collect()
    }

    /// One or more remote replicas lose their connection. The client reports the
    /// loss before their requests fail; with CONN_MULTI the requests' errors
    /// come first (the events of two connections race the request).
    fn lose(&mut self, multi: bool) -> Step {
        let mut cands: Vec<usize> = self
            .connected_remotes()
            .into_iter()
            .filter(|&i| self.faults_allowed(Some(i)))
            .collect();
        if multi {
            cands.retain(|&i| self.state(i) == Some(ReplicaState::Online));
            if cands.len() < 2 {
                return Ok(());
            }
        }
        let want = if multi {
            2 + self.rng.below(cands.len() - 1)
        } else if self.flags.has(Flags::CONN_PAIR) {
            1 + self.rng.below(cands.len().clamp(1, 2))
        } else {
            1
        };
        let mut lost = Vec::new();
        while lost.len() < want && !cands.is_empty() {
            let k = self.rng.below(cands.len());
            lost.push(cands.swap_remove(k));
        }
        if lost.is_empty() {
            return Ok(());
        }
        for &i in &lost {
            self.store(i).unwrap().set_fault(Fault::NotConn);
            self.stats.conn_losses += 1;
        }
        if multi {
            self.note(format!(
                "connections of slots {lost:?} break (events after the next request's errors)"
            ));
            self.pending_lost.extend(lost);
            self.pending_since = self.step;
        } else {
            self.lost_events(&lost, "connections of slots");
        }
        Ok(())
    }

    fn deliver_lost(&mut self) {
        if self.pending_lost.is_empty() {
            return;
        }
        let lost = std::mem::take(&mut self.pending_lost);
        self.lost_events(&lost, "  lost events of slots");
    }

    /// The clients of `lost` report their connections lost.
    fn lost_events(&mut self, lost: &[usize], what: &str) {
        for &i in lost {
            self.health
                .connection_lost(SlotIndex(i as u8), &Lost::Closed { why: "sim".into() });
        }
        self.note(format!("{what} {lost:?} lost -> {}", self.states()));
    }

    /// Slot `slot`'s connection comes back: its client reports the label OPEN read.
    fn reconnect(&mut self, slot: usize) -> Result<bool, String> {
        let store = self.store(slot).unwrap().clone();
        store.set_fault(Fault::None);
        let Some(label) = store.label() else {
            return Ok(false);
        };
        let before = self.states();
        let was = self.state(slot);
        let rebooted = std::mem::take(self.rebooted_mut(slot));
        let back = self
            .health
            .reconnected(SlotIndex(slot as u8), &label, rebooted);
        self.stats.reconnects += 1;
        self.note(format!(
            "  slot {slot} reconnects (label epoch {}): takes I/O {back}; {before} -> {}",
            label.membership.epoch.0,
            self.states()
        ));
        self.quiesce()?;
        // Liveness: a reconnecting member that holds every acknowledged write and
        // is the only one that could (nothing online) must be taken back, else
        // the volume waits for it forever.
        if !back
            && was == Some(ReplicaState::Connecting)
            && self.health.read_mask() == 0
            && self.check_slot(slot, 0, SECTORS).is_ok()
        {
            return err(format!(
                "WEDGED: slot {slot}, the last member, is back and holds every acknowledged write, but is refused \
                 (its label is at epoch {}); no I/O can ever complete; {}",
                label.membership.epoch.0,
                self.states()
            ));
        }
        Ok(back)
    }

    fn reconnect_some(&mut self) -> Step {
        let cands: Vec<usize> = self
            .live_slots()
            .into_iter()
            .filter(|&i| self.store(i).unwrap().fault() == Fault::NotConn)
            .filter(|&i| !self.pending_lost.contains(&i))
            .filter(|&i| self.faults_allowed(Some(i)))
            .filter(|&i| self.flags.has(Flags::TARGET_FLAP) || !self.is_rebuild_target(i))
            .collect();
        let Some(slot) = self.pick(&cands) else {
            return Ok(());
        };
        self.reconnect(slot)?;
        // Full check: it may be in the read set again.
        self.check_all()
    }

    fn rebooted_mut(&mut self, slot: usize) -> &mut bool {
        if self.rebooted.len() <= slot {
            self.rebooted.resize(slot + 1, false);
        }
        &mut self.rebooted[slot]
    }

    /// A remote replica's host crashes: what it did not flush is gone, and so is
    /// its connection. Never the last replica holding every acknowledged write (its
    /// unflushed acknowledged writes would be gone for good: a block device's cache
    /// semantics, not a bug): a connected one while another is online, or one
    /// disconnected and waited for while another waited-for member did not crash.
    fn host_crash(&mut self) -> Step {
        let read = self.health.read_mask();
        let waited: Vec<usize> = self
            .live_slots()
            .into_iter()
            .filter(|&i| self.state(i) == Some(ReplicaState::Connecting))
            .collect();
        let intact = |w: &World, i: usize| !w.rebooted.get(i).copied().unwrap_or(false);
        let mut cands: Vec<usize> = self
            .connected_remotes()
            .into_iter()
            .filter(|&i| read & !(1 << i) != 0)
            .collect();
        cands.extend(
            waited
                .iter()
                .copied()
                .filter(|&i| intact(self, i) && waited.iter().any(|&j| j != i && intact(self, j))),
        );
        cands.retain(|&i| self.faults_allowed(Some(i)));
        let Some(slot) = self.pick(&cands) else {
            return Ok(());
        };
        let store = self.store(slot).unwrap().clone();
        let connected = store.fault() != Fault::NotConn;
        store.set_fault(Fault::NotConn);
        let lost = store.crash();
        *self.rebooted_mut(slot) = true;
        if connected {
            self.health.connection_lost(
                SlotIndex(slot as u8),
                &Lost::Closed {
                    why: "host crash".into(),
                },
            );
        }
        self.stats.host_crashes += 1;
        self.note(format!(
            "host of slot {slot} crashes ({} unflushed ranges differ) -> {}",
            lost.len(),
            self.states()
        ));
        Ok(())
    }

    // ---- membership -----------------------------------------------------------

    fn add(&mut self) -> Step {
        let live = self.live_slots();
        if live.len() >= MAX_LIVE {
            return Ok(());
        }
        let like = self.store(live[0]).unwrap().clone();
        let (fresh, mut spec): (Arc<MemStore>, SlotSpec) =
            replication::testing::fresh_mem_slot(&like);
        if self.chance(2) {
            fresh.play_remote();
            spec.remote = true;
            if self.flags.has(Flags::HOST_CRASH) {
                fresh.track_durable();
            }
        }
        let remote = spec.remote;
        match self.health.add_slot(spec) {
            Ok(slot) => {
                let i = slot.get();
                if self.stores.len() <= i {
                    self.stores.resize(i + 1, None);
                }
                self.stores[i] = Some(fresh);
                // A reused slot index holds another replica: the removed one's
                // host crash is not this one's (its client saw no reboot).
                *self.rebooted_mut(i) = false;
                self.stats.adds += 1;
                self.note(format!(
                    "add slot {i} ({}) -> {}",
                    if remote { "remote" } else { "local" },
                    self.states()
                ));
            }
            Err(e) => self.note(format!("add slot refused: {e}")),
        }
        self.quiesce()
    }

    fn remove(&mut self) -> Step {
        if self.job.is_some() {
            return Ok(());
        }
        let cands: Vec<usize> = self
            .live_slots()
            .into_iter()
            .filter(|&i| {
                self.flags.has(Flags::REMOVE_CONNECTING)
                    || self.state(i) != Some(ReplicaState::Connecting)
            })
            .collect();
        let Some(slot) = self.pick(&cands) else {
            return Ok(());
        };
        let before = self.states();
        match self.health.remove_slot(SlotIndex(slot as u8)) {
            Ok(()) => {
                self.stores[slot] = None;
                self.pending_lost.retain(|&i| i != slot);
                self.stats.removes += 1;
                self.note(format!("remove slot {slot}: {before} -> {}", self.states()));
            }
            Err(e) => self.note(format!("remove slot {slot} refused: {e}")),
        }
        self.quiesce()?;
        self.check_all()
    }

    // ---- jobs -----------------------------------------------------------------

    fn spawn(&mut self, kind: JobKind) -> Step {
        let gate = Arc::new(Gate::default());
        let (h, r, g) = (self.health.clone(), self.ranges.clone(), gate.clone());
        let chunk = ByteLen(64 << (10 + self.rng.below(2)));
        let flush_every = ByteLen(256 << (10 + self.rng.below(3)));
        let region = ByteLen(64 << (10 + self.rng.below(2)));
        let what = match &kind {
            JobKind::Rebuild { slot, kind } => (
                Some((*slot, *kind)),
                format!("{kind:?} rebuild of slot {slot} (chunk {}K)", chunk.0 >> 10),
            ),
            JobKind::Verify => (
                None,
                format!("verify --repair (regions of {}K)", region.0 >> 10),
            ),
        };
        let rebuild_of = what.0;
        let thread = std::thread::Builder::new()
            .name("sim-job".into())
            .spawn(move || {
                g.enter();
                let res =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match rebuild_of {
                        Some((slot, kind)) => {
                            let cfg = CopyConfig {
                                chunk,
                                rate: Rate::uncapped(),
                                flush_every,
                            };
                            JobOut::Rebuild(rebuild::rebuild(
                                &h,
                                &r,
                                SlotIndex(slot as u8),
                                kind,
                                cfg,
                                &Progress::default(),
                            ))
                        }
                        None => JobOut::Verify(verify::verify(
                            &h,
                            &r,
                            region,
                            Repair::Vote,
                            &Progress::default(),
                        )),
                    }))
                    .map_err(|p| panic_text(&*p));
                g.done();
                res
            })
            .expect("spawn the job thread");
        self.job = Some(Job {
            kind,
            gate: gate.clone(),
            thread: Some(thread),
        });
        let at = self.job_wait(&gate, false)?;
        let ops = self.job_log(&gate);
        self.note(format!(
            "start {} -> {at:?} [{ops}]; {}",
            what.1,
            self.states()
        ));
        if at == GateAt::Stuck {
            return err("stuck: the job never reached its first replica operation");
        }
        self.finish_job_if_done()
    }

    fn start_rebuild(&mut self) -> Step {
        if self.job.is_some() {
            return Ok(());
        }
        if !self.sources_sound(Flags::REBUILD_FAULTS) {
            return Ok(());
        }
        let snap = self.snapshot();
        let cands: Vec<usize> = snap
            .slots
            .iter()
            .filter(|s| matches!(s.state, ReplicaState::Faulted { .. }))
            .map(|s| s.slot.get())
            .filter(|&i| self.store(i).is_some_and(|s| s.fault() != Fault::NotConn))
            .collect();
        let Some(slot) = self.pick(&cands) else {
            return Ok(());
        };
        let has_map = self.health.dirty_map(SlotIndex(slot as u8)).is_some();
        let kind = if has_map && !self.chance(5) {
            RebuildKind::Partial
        } else {
            RebuildKind::Full
        };
        self.spawn(JobKind::Rebuild { slot, kind })
    }

    fn start_verify(&mut self) -> Step {
        if self.job.is_some()
            || self.health.read_mask().count_ones() < 2
            || !self.sources_sound(Flags::VERIFY_FAULTS)
        {
            return Ok(());
        }
        self.spawn(JobKind::Verify)
    }

    /// Unless the scenario asks for faults during jobs: no online replica carries
    /// a latent fault that would fail a write while it still reads.
    fn sources_sound(&self, faults_flag: Flags) -> bool {
        if self.flags.has(faults_flag) {
            return true;
        }
        let read = self.health.read_mask();
        self.live_slots().into_iter().all(|i| {
            read & (1 << i) == 0
                || !matches!(
                    self.store(i).unwrap().fault(),
                    Fault::Writes | Fault::All | Fault::NotConn
                )
        })
    }

    /// Wait until the job parks before its next replica operation (granting it
    /// one first if `grant`). A job held by a membership change that waits for a
    /// reconnecting member's label (a fault it reports, its end) gets that member
    /// back, as a request waiting for it would.
    fn job_wait(&mut self, gate: &Gate, grant: bool) -> Result<GateAt, String> {
        const SLICE: Duration = Duration::from_millis(100);
        let t0 = Instant::now();
        let mut at = if grant {
            gate.step(SLICE)
        } else {
            gate.wait(SLICE)
        };
        while at == GateAt::Stuck && t0.elapsed() < STUCK {
            if self.member_awaited_back()? {
                self.note("  the job waited for a member's label: it is back".into());
            }
            at = gate.wait(SLICE);
        }
        Ok(at)
    }

    /// Let the job do `n` replica operations.
    fn job_steps(&mut self, n: usize) -> Step {
        let Some(job) = &self.job else { return Ok(()) };
        let gate = job.gate.clone();
        for _ in 0..n {
            match self.job_wait(&gate, true)? {
                GateAt::Parked => {}
                GateAt::Done => break,
                GateAt::Stuck => {
                    return err(format!(
                        "stuck: the job did not reach its next replica operation; {}",
                        self.states()
                    ))
                }
            }
        }
        let ops = self.job_log(&gate);
        self.note(format!("job: {ops}"));
        self.finish_job_if_done()
    }

    /// Before an application mutation of `[offset, offset + len)`: while the job
    /// holds the range (it copies or repairs it), let it go on, so the request
    /// never waits for the job (which only runs when granted).
    fn clear_job_range(&mut self, offset: u64, len: u64) -> Step {
        let Some(job) = &self.job else { return Ok(()) };
        let gate = job.gate.clone();
        let mut n = 0;
        while self
            .ranges
            .lock(offset, len, &None)
            .now_or_never()
            .is_none()
        {
            match self.job_wait(&gate, true)? {
                GateAt::Parked => n += 1,
                GateAt::Done => break,
                GateAt::Stuck => return err("stuck: the job holds a range and does not go on"),
            }
        }
        if n > 0 {
            let ops = self.job_log(&gate);
            self.note(format!("  job, to free the range: {ops}"));
        }
        self.finish_job_if_done()
    }

    /// The job's operations since the last look (the last one is the one it is
    /// parked before), with slot numbers for locations.
    fn job_log(&self, gate: &Gate) -> String {
        let mut ops = gate.take_log().join(", ");
        for (i, s) in self.stores.iter().enumerate() {
            if let Some(s) = s {
                ops = ops.replace(&format!("mem:{:p}", Arc::as_ptr(s)), &format!("s{i}"));
            }
        }
        ops
    }

    fn finish_job_if_done(&mut self) -> Step {
        let Some(job) = &mut self.job else {
            return Ok(());
        };
        if job.gate.wait(Duration::ZERO) != GateAt::Done {
            return Ok(());
        }
        let out = job
            .thread
            .take()
            .unwrap()
            .join()
            .map_err(|p| panic_text(&*p))?;
        let job = self.job.take().unwrap();
        self.quiesce()?;
        match (out, job.kind) {
            (Err(p), _) => return err(format!("the job panicked: {p}")),
            (Ok(JobOut::Rebuild(res)), JobKind::Rebuild { slot, kind }) => {
                let state = self.state(slot);
                self.note(format!(
                    "{kind:?} rebuild of slot {slot} ended: {res:?} -> {}",
                    self.states()
                ));
                match res {
                    Ok(Outcome::Done { .. }) => {
                        self.stats.rebuilds_done += 1;
                        if state != Some(ReplicaState::Online) {
                            return err(format!("rebuild of slot {slot} done but it is {state:?}"));
                        }
                        self.check_all()?;
                        self.check_identical("after the rebuild")?;
                    }
                    _ => self.stats.rebuilds_stopped += 1,
                }
            }
            (Ok(JobOut::Verify(res)), _) => {
                self.stats.verifies += 1;
                match &res {
                    Ok(r) => {
                        self.stats.repaired +=
                            r.mismatches.iter().filter(|m| m.repaired).count() as u64;
                        self.note(format!(
                            "verify ended: {} mismatches ({} repaired) -> {}",
                            r.mismatches.len(),
                            r.mismatches.iter().filter(|m| m.repaired).count(),
                            self.states()
                        ));
                    }
                    Err(e) => self.note(format!("verify ended: {e}")),
                }
                self.check_all()?;
            }
            _ => unreachable!(),
        }
        Ok(())
    }

    // ---- checks ---------------------------------------------------------------

    fn check_slot(&self, slot: usize, first: usize, n: usize) -> Step {
        let store = self.store(slot).ok_or("no store")?;
        store.inspect(|d| {
            self.model
                .check(&d[first * SECTOR..(first + n) * SECTOR], first)
        })
    }

    /// Every online replica holds what the model allows in sectors `first..+n`.
    fn check_range(&self, first: usize, n: usize) -> Step {
        for slot in replication::health::indices(self.health.read_mask()) {
            self.check_slot(slot.get(), first, n).map_err(|e| {
                format!(
                    "STALE ONLINE REPLICA: slot {} (in the read set) {e}; {}",
                    slot.get(),
                    self.states()
                )
            })?;
        }
        Ok(())
    }

    /// Every online replica, whole; and some member of the membership (online or
    /// reconnecting) holds every acknowledged write.
    pub fn check_all(&mut self) -> Step {
        self.stats.full_checks += 1;
        self.check_range(0, SECTORS)?;
        let snap = self.snapshot();
        let members: Vec<usize> = snap
            .slots
            .iter()
            .filter(|s| snap.membership.members.contains(&s.uuid))
            .map(|s| s.slot.get())
            .collect();
        if members.is_empty() {
            return err(format!("LOST: the membership is empty (no replica is trusted to hold the acknowledged writes); {}", self.states()));
        }
        let mut why = Vec::new();
        for &m in &members {
            match self.check_slot(m, 0, SECTORS) {
                Ok(()) => return Ok(()),
                Err(e) => why.push(format!("slot {m}: {e}")),
            }
        }
        err(format!(
            "LOST: no member holds every acknowledged write: {}; {}",
            why.join("; "),
            self.states()
        ))
    }

    /// Online replicas are identical where the model is determinate (they may
    /// differ where a write failed to the application).
    fn check_identical(&mut self, when: &str) -> Step {
        let online: Vec<usize> = replication::health::indices(self.health.read_mask())
            .map(|s| s.get())
            .collect();
        let Some((&a, rest)) = online.split_first() else {
            return Ok(());
        };
        let da = self.store(a).unwrap().bytes(0, SIZE);
        for &b in rest {
            let db = self.store(b).unwrap().bytes(0, SIZE);
            for s in 0..SECTORS {
                let r = s * SECTOR..(s + 1) * SECTOR;
                if da[r.clone()] != db[r] {
                    if self.model.determinate(s) {
                        return err(format!("DIVERGED {when}: online slots {a} and {b} differ at sector {s} (model: acked #{})", self.model.acked(s)));
                    }
                    self.stats.divergent += 1;
                }
            }
        }
        Ok(())
    }

    // ---- the loop -------------------------------------------------------------

    pub fn one_step(&mut self, nexus: &Nexus) -> Step {
        self.quiesce()?;
        let f = self.flags;
        let job = self.job.is_some();
        let faults = f.any(Flags::WRITE_ERR | Flags::READ_ERR | Flags::EIO);
        // (weight, action)
        let table: [(usize, u8); 14] = [
            (30, 0),                                           // write
            (18, 1),                                           // read
            (4, 2),                                            // flush
            (4, 3),                                            // discard / write_zeroes
            (if faults { 5 } else { 0 }, 4),                   // inject a fault
            (if faults { 4 } else { 0 }, 5),                   // heal one
            (if f.has(Flags::CONN_LOSS) { 3 } else { 0 }, 6),  // lose connections
            (if f.has(Flags::CONN_MULTI) { 3 } else { 0 }, 7), // lose several, errors first
            (
                if f.any(Flags::CONN_LOSS | Flags::CONN_MULTI | Flags::HOST_CRASH) {
                    5
                } else {
                    0
                },
                8,
            ), // reconnect
            (if f.has(Flags::HOST_CRASH) { 2 } else { 0 }, 9), // host crash
            (if f.has(Flags::REBUILD) && !job { 6 } else { 0 }, 10),
            (if f.has(Flags::VERIFY) && !job { 2 } else { 0 }, 11),
            (if job { 25 } else { 0 }, 12), // job ops
            (if f.has(Flags::ADD_REMOVE) { 2 } else { 0 }, 13), // add / remove
        ];
        let total: usize = table.iter().map(|(w, _)| w).sum();
        let mut x = self.rng.below(total);
        let mut action = 0;
        for (w, a) in table {
            if x < w {
                action = a;
                break;
            }
            x -= w;
        }
        let res = match action {
            0 => self.write(nexus),
            1 => self.read(nexus),
            2 => self.flush(nexus),
            3 => self.zero(nexus),
            4 => self.inject(),
            5 => self.heal(),
            6 => self.lose(false),
            7 => self.lose(true),
            8 => self.reconnect_some(),
            9 => self.host_crash(),
            10 => self.start_rebuild(),
            11 => self.start_verify(),
            12 => {
                let n = 1 + self.rng.below(8);
                self.job_steps(n)
            }
            _ => {
                if self.chance(2) {
                    self.add()
                } else {
                    self.remove()
                }
            }
        };
        res?;
        if !self.pending_lost.is_empty() && self.pending_since != self.step {
            self.deliver_lost();
        }
        self.quiesce()?;
        if self.step % 16 == 15 {
            self.check_all()?;
        }
        self.stats.steps += 1;
        self.step += 1;
        Ok(())
    }

    /// The end of a run: the job runs out, connections come back, faults heal,
    /// every faulted replica is rebuilt; then everything is checked.
    pub fn finish(&mut self) -> Step {
        self.note("finish: drain the job, heal, reconnect, rebuild".into());
        while self.job.is_some() {
            self.job_steps(64)?;
        }
        self.deliver_lost();
        for i in self.live_slots() {
            let s = self.store(i).unwrap().clone();
            match s.fault() {
                Fault::NotConn => {
                    self.reconnect(i)?;
                }
                Fault::None => {}
                _ => s.set_fault(Fault::None),
            }
        }
        self.quiesce()?;
        self.check_all()?;
        if self.flags.has(Flags::REBUILD) {
            for _ in 0..MAX_LIVE {
                let snap = self.snapshot();
                let Some(slot) = snap
                    .slots
                    .iter()
                    .find(|s| matches!(s.state, ReplicaState::Faulted { .. }))
                    .map(|s| s.slot.get())
                else {
                    break;
                };
                if self.health.read_mask() == 0 {
                    break;
                }
                let has_map = self.health.dirty_map(SlotIndex(slot as u8)).is_some();
                let kind = if has_map {
                    RebuildKind::Partial
                } else {
                    RebuildKind::Full
                };
                self.spawn(JobKind::Rebuild { slot, kind })?;
                while self.job.is_some() {
                    self.job_steps(64)?;
                }
            }
        }
        self.check_all()?;
        self.check_identical("at the end")
    }

    /// Self-test: zero one written sector of an online replica (behind the
    /// nexus's back). Whether there was one.
    pub fn corrupt_online_replica(&mut self) -> bool {
        let Some(slot) = replication::health::indices(self.health.read_mask()).last() else {
            return false;
        };
        let Some(s) = (0..SECTORS).find(|&s| self.model.determinate(s) && self.model.acked(s) != 0)
        else {
            return false;
        };
        self.store(slot.get())
            .unwrap()
            .put(s * SECTOR, &[0; SECTOR]);
        true
    }

    pub fn stop(&self) {
        self.health.stop();
    }
}

/// A fault that also fails label writes.
fn label_fails(f: Fault) -> bool {
    matches!(f, Fault::Writes | Fault::All | Fault::NotConn)
}

pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(panic)".into()
    }
}
