//! The reconcile state machine of one DiskLayout, as pure transitions: the gateway's reconciler
//! (`super::reconcile_node`) performs exactly these, and the model check below explores every
//! interleaving of them with edits, an unreachable node, lost answers and gateway restarts.
//!
//! Invariants checked: a layout is Applied only for a generation the node's classifier approved,
//! and only for the generation stored; the observed generation never passes the stored one; and
//! from any state, once the node is reachable and nothing else changes, the stored generation is
//! observed (Applied or Refused) within a bounded number of steps.

use moat_tools::LayoutPhase;

/// What the gateway keeps of a layout's reconcile state.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Track {
    pub generation: u64,
    pub observed: u64,
    pub phase: LayoutPhase,
}

/// What a node answered for one generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Answer {
    pub generation: u64,
    /// Applied, Refused or Failed.
    pub phase: LayoutPhase,
}

/// A spec passed the gateway's pre-flight and was stored: the first generation of a new layout,
/// a new one when the spec changed, and a new one to retry a refused or failed generation (the
/// host may have changed since). Planned until it is sent.
pub fn on_spec(track: Option<&Track>, spec_changed: bool) -> Track {
    match track {
        None => Track { generation: 1, observed: 0, phase: LayoutPhase::Planned },
        Some(t) if spec_changed || matches!(t.phase, LayoutPhase::Refused | LayoutPhase::Failed) => {
            Track { generation: t.generation + 1, observed: t.observed, phase: LayoutPhase::Planned }
        }
        Some(t) => t.clone(),
    }
}

/// The generation to send to the node, if any: one the node has not answered for.
pub fn to_push(track: &Track) -> Option<u64> {
    (track.observed < track.generation).then_some(track.generation)
}

/// It was sent.
pub fn sending(track: &Track) -> Track {
    Track { phase: LayoutPhase::Applying, ..track.clone() }
}

/// The node answered. An answer for an older generation than the one stored now (the spec
/// changed while it was applying) is observed, but the stored generation stays Pending.
pub fn on_answer(track: &Track, answer: Answer) -> Track {
    let observed = track.observed.max(answer.generation);
    let phase = if answer.generation == track.generation { answer.phase } else { LayoutPhase::Pending };
    Track { generation: track.generation, observed, phase }
}

/// The node could not be reached (or the answer was lost): the generation is still to be sent.
pub fn on_unreachable(track: &Track) -> Track {
    Track { phase: LayoutPhase::Pending, ..track.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_layout_through_its_phases() {
        let planned = on_spec(None, true);
        assert_eq!((planned.generation, planned.observed, planned.phase), (1, 0, LayoutPhase::Planned));
        assert_eq!(to_push(&planned), Some(1));
        let sent = sending(&planned);
        assert_eq!(sent.phase, LayoutPhase::Applying);
        let down = on_unreachable(&sent);
        assert_eq!((down.phase, to_push(&down)), (LayoutPhase::Pending, Some(1)));
        let applied = on_answer(&sending(&down), Answer { generation: 1, phase: LayoutPhase::Applied });
        assert_eq!((applied.observed, applied.phase, to_push(&applied)), (1, LayoutPhase::Applied, None));
        assert_eq!(on_spec(Some(&applied), false), applied, "the same spec again changes nothing");
        let refused =
            on_answer(&sending(&on_spec(Some(&applied), true)), Answer { generation: 2, phase: LayoutPhase::Refused });
        assert_eq!((refused.generation, refused.observed, refused.phase), (2, 2, LayoutPhase::Refused));
        let retry = on_spec(Some(&refused), false);
        assert_eq!((retry.generation, retry.phase), (3, LayoutPhase::Planned), "a retry is a new generation");
    }
}

#[cfg(test)]
mod model {
    use super::*;
    use stateright::{Checker, Model, Property};

    const MAX_EDITS: u8 = 2;
    const MAX_OUTAGES: u8 = 2;
    const MAX_RESTARTS: u8 = 1;

    /// The gateway's row, the node, and the message between them.
    #[derive(Debug, Clone, PartialEq, Eq, Hash)]
    struct World {
        track: Option<Track>,
        edits: u8,
        reachable: bool,
        outages: u8,
        restarts: u8,
        /// A generation sent and not yet handled by the node.
        request: Option<u64>,
        /// The node's answer on its way back.
        reply: Option<Answer>,
        /// What the node keeps: its last answer (moat_node::disk::Disks keeps it on disk).
        kept: Option<Answer>,
        /// Generations the node's classifier approved (and it then applied).
        approved: Vec<u64>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Hash)]
    enum Step {
        Store {
            changed: bool,
        },
        Send,
        /// The node handles the request; its classifier finds the disks free or in use.
        Handle {
            safe: bool,
        },
        Deliver,
        /// The call fails: the node is down when the request or its answer travels.
        Fail,
        Outage,
        Recover,
        /// The gateway restarts: whatever was in flight is forgotten, the row is kept.
        Restart,
    }

    /// The model, over the machine's answer transition (swapped for a broken one to show the
    /// check can fail).
    struct Reconcile {
        on_answer: fn(&Track, Answer) -> Track,
    }

    const REAL: Reconcile = Reconcile { on_answer };

    impl Model for Reconcile {
        type State = World;
        type Action = Step;

        fn init_states(&self) -> Vec<World> {
            vec![World {
                track: None,
                edits: 0,
                reachable: true,
                outages: 0,
                restarts: 0,
                request: None,
                reply: None,
                kept: None,
                approved: Vec::new(),
            }]
        }

        fn actions(&self, w: &World, actions: &mut Vec<Step>) {
            if w.edits < MAX_EDITS {
                actions.push(Step::Store { changed: true });
                if w.track.is_some() {
                    actions.push(Step::Store { changed: false });
                }
            }
            // One request at a time per node (the reconciler's lock).
            let idle = w.request.is_none() && w.reply.is_none();
            if idle && w.track.as_ref().and_then(to_push).is_some() {
                actions.push(Step::Send);
            }
            if w.request.is_some() && w.reachable {
                actions.push(Step::Handle { safe: true });
                actions.push(Step::Handle { safe: false });
            }
            if w.reply.is_some() && w.reachable {
                actions.push(Step::Deliver);
            }
            if !idle && !w.reachable {
                actions.push(Step::Fail);
            }
            if w.reachable && w.outages < MAX_OUTAGES {
                actions.push(Step::Outage);
            }
            if !w.reachable {
                actions.push(Step::Recover);
            }
            if w.restarts < MAX_RESTARTS {
                actions.push(Step::Restart);
            }
        }

        fn next_state(&self, w: &World, step: Step) -> Option<World> {
            let mut w = w.clone();
            match step {
                Step::Store { changed } => {
                    w.track = Some(on_spec(w.track.as_ref(), changed));
                    w.edits += 1;
                }
                Step::Send => {
                    let track = w.track.as_ref()?;
                    w.request = to_push(track);
                    w.track = Some(sending(track));
                }
                Step::Handle { safe } => {
                    let generation = w.request.take()?;
                    // The node's rule (moat_node::disk::Disks::apply): a generation it already
                    // answered, or an older one, gets the kept answer; a new one is classified.
                    let answer = match w.kept {
                        Some(kept) if kept.generation >= generation => kept,
                        _ if safe => {
                            w.approved.push(generation);
                            Answer { generation, phase: LayoutPhase::Applied }
                        }
                        _ => Answer { generation, phase: LayoutPhase::Refused },
                    };
                    w.kept = Some(answer);
                    w.reply = Some(answer);
                }
                Step::Deliver => {
                    let answer = w.reply.take()?;
                    w.track = Some((self.on_answer)(w.track.as_ref()?, answer));
                }
                Step::Fail => {
                    w.request = None;
                    w.reply = None;
                    w.track = w.track.as_ref().map(on_unreachable);
                }
                Step::Outage => {
                    w.reachable = false;
                    w.outages += 1;
                }
                Step::Recover => w.reachable = true,
                Step::Restart => {
                    w.request = None;
                    w.reply = None;
                    w.restarts += 1;
                }
            }
            Some(w)
        }

        fn properties(&self) -> Vec<Property<Self>> {
            vec![
                Property::always("applied only what the node's classifier approved", |_, w: &World| {
                    w.track.as_ref().is_none_or(|t| {
                        t.phase != LayoutPhase::Applied
                            || (w.approved.contains(&t.generation) && t.observed == t.generation)
                    })
                }),
                Property::always("observed never passes the stored generation", |_, w: &World| {
                    w.track.as_ref().is_none_or(|t| t.observed <= t.generation)
                }),
                Property::always("settles once the node is reachable", |m: &Reconcile, w: &World| settles(m, w)),
                Property::sometimes("a generation is applied", |_, w: &World| {
                    w.track.as_ref().is_some_and(|t| t.phase == LayoutPhase::Applied && t.generation > 1)
                }),
                Property::sometimes("a generation is refused", |_, w: &World| {
                    w.track.as_ref().is_some_and(|t| t.phase == LayoutPhase::Refused)
                }),
                Property::sometimes("an answer for an older generation arrives", |_, w: &World| {
                    w.reply.is_some_and(|a| w.track.as_ref().is_some_and(|t| a.generation < t.generation))
                }),
            ]
        }
    }

    /// From `w`, with the node reachable and no more edits, outages or restarts, the fair
    /// schedule (lost requests fail, answers are delivered, the reconciler sends) reaches a
    /// state where the stored generation is observed, Applied or Refused, within 8 steps,
    /// whichever verdict the classifier gives.
    fn settles(model: &Reconcile, w: &World) -> bool {
        if w.track.is_none() {
            return true;
        }
        [true, false].into_iter().all(|safe| {
            let mut w = World { reachable: true, ..w.clone() };
            for _ in 0..8 {
                let t = w.track.as_ref().expect("checked above");
                if t.observed == t.generation && matches!(t.phase, LayoutPhase::Applied | LayoutPhase::Refused) {
                    return true;
                }
                let step = if w.reply.is_some() {
                    Step::Deliver
                } else if w.request.is_some() {
                    Step::Handle { safe }
                } else if to_push(t).is_some() {
                    Step::Send
                } else {
                    return false; // nothing left to do, yet not settled
                };
                w = model.next_state(&w, step).expect("the step is enabled");
            }
            false
        })
    }

    #[test]
    fn the_reconcile_machine_keeps_its_invariants() {
        let checker = REAL.checker().spawn_bfs().join();
        checker.assert_properties();
        assert!(checker.unique_state_count() > 100, "the model explored {} states", checker.unique_state_count());
    }

    #[test]
    fn the_check_catches_a_machine_that_takes_a_stale_answer() {
        // Had on_answer taken an older generation's answer for the stored one's, a generation the
        // classifier never saw would show as Applied: the checker must find that path.
        fn stale(t: &Track, a: Answer) -> Track {
            Track { generation: t.generation, observed: t.observed.max(a.generation), phase: a.phase }
        }
        let checker = Reconcile { on_answer: stale }.checker().spawn_bfs().join();
        assert!(checker.discovery("applied only what the node's classifier approved").is_some());
    }
}
