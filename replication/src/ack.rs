//! THE ACK RULE, as a pure function: from the slots' states (one consistent view,
//! taken under the health's lock) and what each slot did with one mutation, the
//! state changes it causes and the answer to the application. [`crate::health::
//! Health::settle`] applies it; here it is tested exhaustively, every combination
//! of 1-4 slots × state × remote or local × outcome, against the properties the
//! rest of the system relies on:
//!
//! * **No ack without a holder**: acknowledged only if a slot that took the
//!   mutation is still online afterwards (another queue may have faulted it), or
//!   still a member waited for (its connection dropped after it answered).
//! * **Fault before ack**: every slot of the write set that failed it is faulted
//!   (the caller makes the new membership durable before the ack).
//! * **The last good copy is never thrown away**: when no online slot took it,
//!   the request fails (or waits) and no online slot is faulted for it.
//! * **Connecting only while nothing is online**: a remote slot whose connection
//!   dropped is waited for only while it may hold the only current copy; once a
//!   slot is online, every waited-for slot is faulted (with a map of what it
//!   misses from then on), so none comes back without a write another took alone.

use crate::error::Errno;
use crate::state::{FaultReason, IoOp, ReplicaState};

/// One slot as the rule sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotView {
    pub state: ReplicaState,
    /// A remote replica: ENOTCONN/ETIMEDOUT mean a lost connection, not a bad disk.
    pub remote: bool,
}

/// What one slot did with the mutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not sent to it (out of the write set when the request started, or skipped).
    NotSent,
    Took,
    Failed(Errno),
}

/// The answer to the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Acknowledge (once the state changes are durable).
    Ack,
    Fail(Errno),
    /// No online slot holds it, but one that may hold the data is reconnecting:
    /// wait for a change of the sets, then submit it again.
    Retry,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// State changes, in order, each slot at most once.
    pub moves: Vec<(usize, ReplicaState)>,
    pub answer: Answer,
}

/// A remote replica's lost connection or missed deadline (its client reports them
/// as ENOTCONN and ETIMEDOUT). A local disk's ETIMEDOUT is a media error: waiting
/// for it to "reconnect" would wait forever.
pub(crate) fn lost_connection(remote: bool, e: Errno) -> bool {
    remote && matches!(e.0, libc::ENOTCONN | libc::ETIMEDOUT)
}

/// **Connecting only while nothing is online**: the slots (by index) that must be
/// faulted, given their states — every Connecting one once some slot is Online.
/// A Connecting member is waited for because it may hold the only current copy;
/// once another serves, writes are acknowledged without it.
pub(crate) fn unawaited<'a>(states: impl Iterator<Item = &'a ReplicaState> + Clone) -> Vec<usize> {
    if !states.clone().any(|s| *s == ReplicaState::Online) {
        return Vec::new();
    }
    states
        .enumerate()
        .filter(|(_, s)| **s == ReplicaState::Connecting)
        .map(|(i, _)| i)
        .collect()
}

/// The rule (module docs). `slots` and `outcomes` are indexed by slot.
pub fn ack_rule(slots: &[SlotView], outcomes: &[Outcome], op: IoOp) -> Verdict {
    debug_assert_eq!(slots.len(), outcomes.len());
    let mut next: Vec<ReplicaState> = slots.iter().map(|s| s.state.clone()).collect();
    let mut moves: Vec<(usize, ReplicaState)> = Vec::new();
    // A slot moved twice (to Connecting, then faulted because another stays
    // online) makes one move, from its state to the last one.
    let mut go = |i: usize, to: ReplicaState, next: &mut Vec<ReplicaState>| {
        next[i] = to.clone();
        match moves.iter_mut().find(|(j, _)| *j == i) {
            Some(m) => m.1 = to,
            None => moves.push((i, to)),
        }
    };
    let failed = |i: usize| matches!(outcomes[i], Outcome::Failed(_));
    let took_in = |ok: &dyn Fn(&ReplicaState) -> bool| {
        (0..slots.len()).any(|i| outcomes[i] == Outcome::Took && ok(&slots[i].state))
    };
    let first_error = outcomes.iter().find_map(|o| match o {
        Outcome::Failed(e) => Some(*e),
        _ => None,
    });
    let answer = if first_error.is_none() {
        // Every slot sent it took it. A holder whose connection dropped since it
        // answered is still a member, waited for: it holds the write.
        match took_in(&|s| matches!(s, ReplicaState::Online | ReplicaState::Connecting)) {
            true => Answer::Ack,
            false => Answer::Fail(Errno::EIO),
        }
    } else if took_in(&|s| *s == ReplicaState::Online) {
        for (i, o) in outcomes.iter().enumerate() {
            if let Outcome::Failed(e) = o {
                if slots[i].state.in_write_set() {
                    let reason = FaultReason::of_errno(op, *e);
                    go(i, ReplicaState::Faulted { reason }, &mut next);
                }
            }
        }
        Answer::Ack
    } else {
        let online_unfailed =
            (0..slots.len()).any(|i| !failed(i) && slots[i].state == ReplicaState::Online);
        // A member waited for took it (it answered, then its connection dropped):
        // it may hold the only copy, so the request waits for it too.
        let mut retry = (0..slots.len())
            .any(|i| outcomes[i] == Outcome::Took && slots[i].state == ReplicaState::Connecting);
        for (i, o) in outcomes.iter().enumerate() {
            let Outcome::Failed(e) = *o else { continue };
            if !lost_connection(slots[i].remote, e) {
                continue;
            }
            match slots[i].state {
                ReplicaState::Online if !online_unfailed => {
                    go(i, ReplicaState::Connecting, &mut next);
                    retry = true;
                }
                ReplicaState::Connecting => retry = true,
                _ => {}
            }
        }
        match retry {
            true => Answer::Retry,
            false => Answer::Fail(first_error.unwrap_or(Errno::EIO)),
        }
    };
    for i in unawaited(next.iter()) {
        let reason = FaultReason::ConnectionLost;
        go(i, ReplicaState::Faulted { reason }, &mut next);
    }
    let holder = (0..slots.len()).any(|i| {
        outcomes[i] == Outcome::Took
            && matches!(next[i], ReplicaState::Online | ReplicaState::Connecting)
    });
    let answer = match answer {
        // Whoever was waited for is faulted now: the retry goes to what is online.
        Answer::Retry if next.iter().all(|s| *s != ReplicaState::Connecting) => {
            Answer::Fail(first_error.unwrap_or(Errno::EIO))
        }
        // The only holder was a waited-for slot, faulted now that another is online.
        Answer::Ack if !holder => Answer::Fail(first_error.unwrap_or(Errno::EIO)),
        a => a,
    };
    Verdict { moves, answer }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::RebuildKind;

    const ENOTCONN: Errno = Errno(libc::ENOTCONN);

    fn states() -> Vec<ReplicaState> {
        vec![
            ReplicaState::Online,
            ReplicaState::Connecting,
            ReplicaState::Rebuilding {
                kind: RebuildKind::Partial,
            },
            ReplicaState::Faulted {
                reason: FaultReason::Missing,
            },
        ]
    }

    fn outcomes() -> Vec<Outcome> {
        vec![
            Outcome::NotSent,
            Outcome::Took,
            Outcome::Failed(Errno::EIO),
            Outcome::Failed(ENOTCONN),
        ]
    }

    /// Every combination of 1-4 slots: state × remote × outcome (32 per slot, so
    /// 1 082 400 cases), checked against the properties of the module docs.
    #[test]
    fn every_combination_keeps_the_rule_s_promises() {
        let per_slot: Vec<(SlotView, Outcome)> = states()
            .into_iter()
            .flat_map(|state| {
                [false, true].into_iter().flat_map(move |remote| {
                    let state = state.clone();
                    outcomes().into_iter().map(move |o| {
                        (
                            SlotView {
                                state: state.clone(),
                                remote,
                            },
                            o,
                        )
                    })
                })
            })
            .collect();
        let mut cases = 0u64;
        for n in 1..=4u32 {
            for code in 0..(per_slot.len() as u64).pow(n) {
                let mut c = code;
                let (slots, outs): (Vec<SlotView>, Vec<Outcome>) = (0..n)
                    .map(|_| {
                        let k = (c % per_slot.len() as u64) as usize;
                        c /= per_slot.len() as u64;
                        per_slot[k].clone()
                    })
                    .unzip();
                if outs.iter().all(|o| *o == Outcome::NotSent) {
                    continue;
                }
                check(&slots, &outs);
                cases += 1;
            }
        }
        assert_eq!(cases, 1_082_400 - (8 + 64 + 512 + 4096));
    }

    fn check(slots: &[SlotView], outs: &[Outcome]) {
        let v = ack_rule(slots, outs, IoOp::Write);
        let ctx = || format!("{slots:?} {outs:?} -> {v:?}");
        let mut after: Vec<ReplicaState> = slots.iter().map(|s| s.state.clone()).collect();
        let mut moved = vec![false; slots.len()];
        for (i, to) in &v.moves {
            assert!(!moved[*i], "moved twice: {}", ctx());
            assert!(after[*i].can_become(to), "illegal move: {}", ctx());
            moved[*i] = true;
            after[*i] = to.clone();
        }
        let online = |s: &ReplicaState| *s == ReplicaState::Online;
        // Connecting only while nothing is online.
        if after.iter().any(online) {
            assert!(!after.contains(&ReplicaState::Connecting), "{}", ctx());
        }
        // A member waited for (nothing online) that took it may hold the only
        // copy: the request is acknowledged or waits, it does not fail.
        let awaited_holder = (0..slots.len())
            .any(|i| outs[i] == Outcome::Took && after[i] == ReplicaState::Connecting);
        if awaited_holder && !after.iter().any(online) {
            assert!(!matches!(v.answer, Answer::Fail(_)), "{}", ctx());
        }
        match v.answer {
            Answer::Ack => {
                // A slot that took it is online afterwards, or a member waited for...
                let holds = |s: &ReplicaState| online(s) || *s == ReplicaState::Connecting;
                assert!(
                    (0..slots.len()).any(|i| outs[i] == Outcome::Took && holds(&after[i])),
                    "ack without a holder: {}",
                    ctx()
                );
                // ...and every write-set slot that failed it is faulted.
                for i in 0..slots.len() {
                    if matches!(outs[i], Outcome::Failed(_)) && slots[i].state.in_write_set() {
                        assert!(
                            matches!(after[i], ReplicaState::Faulted { .. }),
                            "ack before the fault: {}",
                            ctx()
                        );
                    }
                }
            }
            Answer::Fail(_) | Answer::Retry => {
                // Nothing took it: no slot is faulted for a media error of its
                // own (a lost connection faults only while another stays online),
                // and some slot that may hold the data is still online or waited for.
                let holds = |s: &ReplicaState| online(s) || *s == ReplicaState::Connecting;
                for i in 0..slots.len() {
                    let media = matches!(outs[i], Outcome::Failed(e) if !lost_connection(slots[i].remote, e));
                    if media && online(&slots[i].state) {
                        assert!(online(&after[i]), "faulted for its error: {}", ctx());
                    }
                }
                if slots.iter().any(|s| online(&s.state)) {
                    assert!(
                        after.iter().any(holds),
                        "the last good copy thrown away: {}",
                        ctx()
                    );
                }
                if let Answer::Fail(e) = v.answer {
                    let known = outs.contains(&Outcome::Failed(e)) || e == Errno::EIO;
                    assert!(known, "{}", ctx());
                } else {
                    assert!(after.contains(&ReplicaState::Connecting), "{}", ctx());
                    assert!(!after.iter().any(online), "{}", ctx());
                }
            }
        }
    }

    /// The cases the holes came from, by name.
    #[test]
    fn named_cases() {
        let remote = |state| SlotView {
            state,
            remote: true,
        };
        let on = || remote(ReplicaState::Online);
        // (A) Both connections reset under one request: both wait, retry.
        let v = ack_rule(
            &[on(), on()],
            &[Outcome::Failed(ENOTCONN), Outcome::Failed(ENOTCONN)],
            IoOp::Write,
        );
        assert_eq!(v.answer, Answer::Retry);
        assert_eq!(
            v.moves,
            vec![(0, ReplicaState::Connecting), (1, ReplicaState::Connecting)]
        );
        // One resets, the other fails with a media error: the online one stays, the
        // reset one is not waited for (faulted), and the request fails.
        let v = ack_rule(
            &[on(), on()],
            &[Outcome::Failed(ENOTCONN), Outcome::Failed(Errno::EIO)],
            IoOp::Write,
        );
        assert_eq!(v.answer, Answer::Fail(ENOTCONN));
        assert!(matches!(v.moves[..], [(0, ReplicaState::Faulted { .. })]));
        // (O) A local disk's ETIMEDOUT is an error, not a lost connection.
        let local = SlotView {
            state: ReplicaState::Online,
            remote: false,
        };
        let v = ack_rule(
            &[local],
            &[Outcome::Failed(Errno(libc::ETIMEDOUT))],
            IoOp::Write,
        );
        assert_eq!(v.answer, Answer::Fail(Errno(libc::ETIMEDOUT)));
        // Crossed failures: the holder was faulted by another queue meanwhile.
        let v = ack_rule(
            &[
                on(),
                remote(ReplicaState::Faulted {
                    reason: FaultReason::Missing,
                }),
            ],
            &[Outcome::Failed(Errno::EIO), Outcome::Took],
            IoOp::Write,
        );
        assert_eq!(v.answer, Answer::Fail(Errno::EIO));
        assert!(v.moves.is_empty());
    }
}
