//! The decision: a pure function from what was observed and what was remembered to
//! the one next step, plus the journal bookkeeping each step implies.
//!
//! Level-triggered (issue 3): [`decide`] never assumes the previous step happened.
//! It looks at the group as it is now and at the journal, and picks the next step
//! toward the goal. Every step is idempotent against a fresh observation, so a
//! process killed at any point can be replaced by one that observes and decides
//! again. The journal is only needed for what the cloud cannot tell us: the capacity
//! and processes before the rollout, the source and target, the phase, which old
//! instances kiln deregistered, and which desired-capacity change was kiln's own.
//!
//! # Crash safety, step by step
//!
//! The executor ([`super::engine`]) saves the journal after [`Journal::before`]
//! (write-ahead) and after [`Journal::after`]. What a crash between the two saves
//! leaves, and why the next run is fine:
//!
//! * `SuspendProcesses`, `PointAsg`, `ResumeProcesses`, `RestoreCapacity` min/max:
//!   decided from the observation alone; redone if not seen done. The suspended set
//!   *before* kiln acted was saved when the journal was created, before any
//!   suspension, so it is never the set kiln itself produced.
//! * `CreateLaunchTemplateVersion`: the version is tagged with the rollout id (the
//!   `token`); the adapter reuses a version carrying it, so a crash before the new
//!   version number reached the journal creates no second version.
//! * `SetCapacity` / `RestoreCapacity` desired: the target value is written ahead
//!   ([`InFlight::SetDesired`]); next run, an observed desired equal to either the
//!   old or the new value is kiln's own, anything else is an external change.
//! * `Deregister`: written ahead into the batch's `draining`; an instance the journal
//!   says is draining but that is still registered is deregistered again.
//! * `Terminate` (always decrementing desired): written ahead
//!   ([`InFlight::TerminateDecrement`]); each listed instance seen leaving took one
//!   off desired, one still in service did not and is chosen again.
//! * `Register` (an old instance wanted again after a rollback started): an instance
//!   in `draining` that runs the goal image is registered, then forgotten once seen
//!   registered.
//! * `Finish`: the terminal phase and history entry are saved, then the lock is
//!   released; a crash between leaves a finished journal under a stale lock, which
//!   the next run takes over and releases.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::model::*;

/// Journal-only bookkeeping: facts read from an observation that a later decision
/// needs but the cloud will not tell again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "note")]
pub enum Note {
    /// A desired change written ahead was (or was not) made: settle the ledger.
    Settle { expected: u32 },
    /// Someone else set desired capacity: keep their value at the end.
    ExternalDesired { from: u32, to: u32 },
    /// Goal-image instances that appeared during this batch.
    Launched { ids: Vec<String> },
    /// Draining instances that are gone (terminated) or registered again.
    Forget { ids: Vec<String> },
    /// More batch instances are ready than before.
    Ready { count: u32 },
    /// Every goal-image instance of the phase is ready (warm-up starts), or no
    /// longer is.
    BatchReady { at: Option<Timestamp> },
}

/// What the rollout waits on; shown by `kiln status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "on")]
pub enum WaitFor {
    /// New instances are not ready yet (first few listed with why).
    NewInstances {
        ready: u32,
        total: u32,
        waiting: Vec<String>,
    },
    /// The ASG has not launched (or terminated) up to desired capacity yet.
    Asg {
        live: u32,
        desired: u32,
    },
    WarmUp {
        until: Timestamp,
    },
    Draining {
        instances: Vec<String>,
        since: Timestamp,
    },
    /// Removing any old instance would go below the capacity floor.
    Floor {
        serving: u32,
        floor: u32,
    },
}

impl fmt::Display for WaitFor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitFor::NewInstances {
                ready,
                total,
                waiting,
            } => {
                write!(
                    f,
                    "{ready}/{total} new instances ready; waiting on {}",
                    waiting.join(", ")
                )
            }
            WaitFor::Asg { live, desired } => {
                write!(f, "ASG at {live} instances, desired {desired}")
            }
            WaitFor::WarmUp { until } => write!(f, "new instances warming up until {until}"),
            WaitFor::Draining { instances, since } => {
                write!(f, "draining {} (since {since})", instances.join(", "))
            }
            WaitFor::Floor { serving, floor } => {
                write!(
                    f,
                    "{serving} healthy in service, floor {floor}: no old instance can go yet"
                )
            }
        }
    }
}

/// The next thing to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "step")]
pub enum Step {
    // -- journal only -------------------------------------------------------
    Record(Note),
    /// Reverse the rollout toward the source image and launch template version.
    StartRollback {
        reason: String,
    },
    /// Stop without rolling back: restore capacity and processes, end `Failed`.
    Stop {
        reason: String,
    },
    // -- cloud mutations ----------------------------------------------------
    SuspendProcesses {
        processes: BTreeSet<String>,
    },
    CreateLaunchTemplateVersion {
        template_id: String,
        from_version: u64,
        image_id: String,
        token: String,
    },
    PointAsg {
        template_id: String,
        version: u64,
        mixed_instances_policy: bool,
    },
    SetCapacity {
        desired: u32,
        max: u32,
    },
    Deregister {
        instances: Vec<String>,
        target_groups: Vec<String>,
    },
    Register {
        instances: Vec<String>,
        target_groups: Vec<String>,
    },
    /// Terminate through the ASG, decrementing desired capacity.
    Terminate {
        instances: Vec<String>,
        decrement_desired: bool,
    },
    RestoreCapacity {
        min: u32,
        max: u32,
        desired: u32,
    },
    ResumeProcesses {
        processes: BTreeSet<String>,
    },
    // -- neither ------------------------------------------------------------
    Wait(WaitFor),
    /// Record the outcome and history, release the lock.
    Finish {
        outcome: Outcome,
    },
}

impl Step {
    /// Changes only the journal: the executor records it and decides again on the
    /// same observation.
    pub fn is_journal_only(&self) -> bool {
        matches!(
            self,
            Step::Record(_) | Step::StartRollback { .. } | Step::Stop { .. }
        )
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Record(n) => write!(f, "record {n:?}"),
            Step::StartRollback { reason } => write!(f, "roll back: {reason}"),
            Step::Stop { reason } => write!(f, "stop: {reason}"),
            Step::SuspendProcesses { processes } => write!(f, "suspend {}", join(processes)),
            Step::CreateLaunchTemplateVersion {
                template_id,
                from_version,
                image_id,
                ..
            } => {
                write!(
                    f,
                    "create version of {template_id} from {from_version} with {image_id}"
                )
            }
            Step::PointAsg {
                template_id,
                version,
                ..
            } => write!(f, "point ASG at {template_id} version {version}"),
            Step::SetCapacity { desired, max } => write!(f, "set desired {desired} (max {max})"),
            Step::Deregister { instances, .. } => write!(f, "deregister {}", instances.join(", ")),
            Step::Register { instances, .. } => write!(f, "register {}", instances.join(", ")),
            Step::Terminate { instances, .. } => write!(f, "terminate {}", instances.join(", ")),
            Step::RestoreCapacity { min, max, desired } => {
                write!(f, "restore min {min} max {max} desired {desired}")
            }
            Step::ResumeProcesses { processes } => write!(f, "resume {}", join(processes)),
            Step::Wait(w) => write!(f, "wait: {w}"),
            Step::Finish { outcome } => write!(f, "finish: {outcome:?}"),
        }
    }
}

fn join(s: &BTreeSet<String>) -> String {
    s.iter().cloned().collect::<Vec<_>>().join(", ")
}

/// The result of performing a step, as far as the journal cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acted {
    Done,
    LaunchTemplateVersion(u64),
}

/// How many waiting instances a [`WaitFor`] names (status stays one line).
const NAMED: usize = 5;

/// Decide the next step. Pure: no I/O, no clock (time is `obs.now`).
///
/// `spec` is normally `&journal.spec`; a resumed run may pass a spec with another
/// warm-up or deadline. Surge and floor are always of the ORIGINAL desired capacity.
pub fn decide(obs: &Observation, j: &Journal, spec: &RolloutSpec) -> Step {
    if j.phase.is_terminal() {
        return Step::Finish {
            outcome: outcome_of(j),
        };
    }
    let now = obs.now;
    let group = &obs.group;

    // 1. Ledger: settle a desired change written ahead, then notice anyone else's.
    if let Some(in_flight) = &j.desired.in_flight {
        let expected = match in_flight {
            InFlight::SetDesired { to } if group.desired == *to => *to,
            InFlight::SetDesired { .. } => j.desired.expected,
            InFlight::TerminateDecrement { ids } => {
                let gone = ids
                    .iter()
                    .filter(|id| obs.instance(id).is_none_or(|i| i.is_leaving()))
                    .count();
                j.desired.expected.saturating_sub(gone as u32)
            }
        };
        return Step::Record(Note::Settle { expected });
    }
    if group.desired != j.desired.expected {
        return Step::Record(Note::ExternalDesired {
            from: j.desired.expected,
            to: group.desired,
        });
    }

    let goal = j.goal().clone();
    let live: Vec<&Instance> = obs.instances.iter().filter(|i| i.is_live()).collect();
    // Goal-image instances launched during this phase: waited on and watched. Older
    // goal-image instances (already there when the phase began) are left as they are.
    let fresh: Vec<&Instance> = live
        .iter()
        .copied()
        .filter(|i| i.image_id == goal.image_id && i.launched_at >= j.phase_started_at)
        .collect();
    let is_ready = |i: &Instance| ready(obs, i);

    // 2. Batch bookkeeping.
    let unrecorded: Vec<String> = fresh
        .iter()
        .filter(|i| !j.batch.launched.contains(&i.id))
        .filter(|i| !is_ready(i) || i.launched_at >= j.batch.started_at)
        .map(|i| i.id.clone())
        .collect();
    if !unrecorded.is_empty() {
        return Step::Record(Note::Launched { ids: unrecorded });
    }
    let ready_in_batch = j
        .batch
        .launched
        .iter()
        .filter(|id| obs.instance(id).is_some_and(|i| i.is_live() && is_ready(i)))
        .count() as u32;
    if ready_in_batch > j.batch.ready {
        return Step::Record(Note::Ready {
            count: ready_in_batch,
        });
    }
    let all_fresh_ready = !fresh.is_empty() && fresh.iter().all(|i| is_ready(i));
    match (all_fresh_ready, j.batch.ready_at) {
        (true, None) => return Step::Record(Note::BatchReady { at: Some(now) }),
        (false, Some(_)) => return Step::Record(Note::BatchReady { at: None }),
        _ => {}
    }

    // 3. Failure and deadline.
    if matches!(j.phase, Phase::Rolling | Phase::RollingBack) {
        // A failed new instance turns a rollout around. A rollback goes toward the
        // image that ran fine before, so a failed instance there is more likely the
        // environment (an AZ outage, a bad host): the ASG replaces it and the
        // rollback carries on; only the deadline gives up on a rollback, because
        // stopping half-way leaves a mixed fleet.
        let failed = if j.phase == Phase::Rolling {
            failure(obs, j, &fresh)
        } else {
            None
        };
        if let Some(reason) = failed {
            return fail(j, spec, reason);
        }
        let idle = now.since(j.last_progress_at);
        if idle > spec.deadline {
            let waiting = match waiting_on(obs, j, spec, &live, &fresh) {
                Some(w) => format!("; waiting on: {w}"),
                None => String::new(),
            };
            let reason = format!(
                "no progress for {}{waiting}",
                humantime::format_duration(round_secs(idle))
            );
            return fail(j, spec, reason);
        }
    }

    // 4. Processes and launch template (not when stopping: that leaves the template).
    let old: Vec<&Instance> = live
        .iter()
        .copied()
        .filter(|i| i.image_id != goal.image_id)
        .collect();
    if matches!(j.phase, Phase::Rolling | Phase::RollingBack) {
        // Only while replacement work is left: once every instance runs the goal
        // image the finishing steps resume these, and must not see them re-suspended.
        let work_left = !old.is_empty() || !j.batch.draining.is_empty();
        let missing: BTreeSet<String> = SUSPENDED_DURING_ROLLOUT
            .iter()
            .map(|s| s.to_string())
            .filter(|p| !group.suspended.contains(p))
            .collect();
        if work_left && !missing.is_empty() {
            return Step::SuspendProcesses { processes: missing };
        }
        let Some(goal_version) = goal.launch_template_version else {
            return Step::CreateLaunchTemplateVersion {
                template_id: j.launch_template_id.clone(),
                from_version: j.source.launch_template_version.unwrap_or_default(),
                image_id: j.target.image_id.clone(),
                token: j.rollout_id.clone(),
            };
        };
        if let LaunchSource::Template {
            id,
            version,
            mixed_instances_policy,
            ..
        } = &group.launch
        {
            if *id != j.launch_template_id || *version != goal_version {
                return Step::PointAsg {
                    template_id: j.launch_template_id.clone(),
                    version: goal_version,
                    mixed_instances_policy: *mixed_instances_policy,
                };
            }
        }
    }

    // 5. Old instances kiln deregistered.
    if let Some(step) = draining_step(obs, j, &goal) {
        return step;
    }

    if j.phase == Phase::Stopping {
        return stopping_step(obs, j, &live, &fresh);
    }

    // 6. Wait for every new instance to be ready and warmed up.
    if let Some(w) = waiting_on(obs, j, spec, &live, &fresh) {
        return Step::Wait(w);
    }

    // 7. Replace: remove surplus old instances, or start the next batch.
    if !old.is_empty() {
        let live_count = live.len() as u32;
        let surplus = live_count.saturating_sub(j.base_desired);
        if surplus == 0 {
            let desired = j.base_desired + j.surge().min(old.len() as u32);
            return Step::SetCapacity {
                desired,
                max: group.max.max(desired),
            };
        }
        let chosen = choose_old(obs, &old, surplus, j.floor());
        if chosen.is_empty() {
            return Step::Wait(WaitFor::Floor {
                serving: obs.serving_count(),
                floor: j.floor(),
            });
        }
        if group.target_groups.is_empty() {
            return Step::Terminate {
                instances: chosen,
                decrement_desired: true,
            };
        }
        return Step::Deregister {
            instances: chosen,
            target_groups: group.target_groups.clone(),
        };
    }

    // 8. Every live instance runs the goal image: put the group back, then finish.
    finishing_step(obs, j)
}

fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

fn outcome_of(j: &Journal) -> Outcome {
    match j.phase {
        Phase::Done | Phase::Rolling => Outcome::Succeeded,
        Phase::RolledBack => Outcome::RolledBack,
        Phase::Aborted => Outcome::Aborted,
        Phase::RollingBack if j.aborted_by.is_some() => Outcome::Aborted,
        Phase::RollingBack => Outcome::RolledBack,
        Phase::Failed | Phase::Stopping => Outcome::Failed,
    }
}

fn fail(j: &Journal, spec: &RolloutSpec, reason: String) -> Step {
    match j.phase {
        Phase::Rolling if spec.rollback_on_failure => Step::StartRollback { reason },
        Phase::RollingBack => Step::Stop {
            reason: format!("rollback failed: {reason}"),
        },
        _ => Step::Stop { reason },
    }
}

/// A new instance of this phase that failed: unhealthy in the ASG, unhealthy in a
/// target group past the grace period, or gone without kiln terminating it.
fn failure(obs: &Observation, j: &Journal, fresh: &[&Instance]) -> Option<String> {
    let grace = obs.group.health_check_grace;
    for i in fresh {
        if !i.healthy {
            return Some(format!(
                "new instance {} ({}) is Unhealthy in the ASG",
                i.id, i.az
            ));
        }
        if obs.now.since(i.launched_at) >= grace {
            for tg in &obs.group.target_groups {
                if obs.target_state(tg, &i.id) == Some(TargetHealth::Unhealthy) {
                    return Some(format!(
                        "new instance {} ({}) is unhealthy in target group {tg}",
                        i.id, i.az
                    ));
                }
            }
        }
    }
    if !j.batch.scale_in_seen {
        for id in &j.batch.launched {
            if obs.instance(id).is_none_or(|i| i.is_leaving()) {
                return Some(format!("new instance {id} was replaced by the ASG"));
            }
        }
    }
    None
}

/// What the replacement waits on before old instances may go, if anything.
fn waiting_on(
    obs: &Observation,
    j: &Journal,
    spec: &RolloutSpec,
    live: &[&Instance],
    fresh: &[&Instance],
) -> Option<WaitFor> {
    if let Some((_, since)) = j.batch.draining.iter().next() {
        return Some(WaitFor::Draining {
            instances: j.batch.draining.keys().take(NAMED).cloned().collect(),
            since: *since,
        });
    }
    let unready: Vec<&&Instance> = fresh.iter().filter(|i| !ready(obs, i)).collect();
    if !unready.is_empty() {
        let waiting = unready
            .iter()
            .take(NAMED)
            .map(|i| format!("{} {}", i.id, why_not_ready(obs, i)))
            .collect();
        return Some(WaitFor::NewInstances {
            ready: (fresh.len() - unready.len()) as u32,
            total: fresh.len() as u32,
            waiting,
        });
    }
    if live.len() as u32 != obs.group.desired {
        return Some(WaitFor::Asg {
            live: live.len() as u32,
            desired: obs.group.desired,
        });
    }
    if let Some(at) = j.batch.ready_at {
        let until = at.plus(spec.warmup);
        if obs.now < until && !fresh.is_empty() {
            return Some(WaitFor::WarmUp { until });
        }
    }
    None
}

/// A new instance is ready when it serves (running, InService, Healthy, `healthy`
/// in every target group). Without target groups the only verdict is the ASG's,
/// and the ASG does not judge health during the grace period: "Healthy" then means
/// "not checked yet", so readiness also waits for the grace period to pass.
fn ready(obs: &Observation, i: &Instance) -> bool {
    obs.is_serving(i)
        && (!obs.group.target_groups.is_empty()
            || obs.now.since(i.launched_at) >= obs.group.health_check_grace)
}

fn why_not_ready(obs: &Observation, i: &Instance) -> String {
    if i.lifecycle != Lifecycle::InService {
        return format!("{:?}", i.lifecycle);
    }
    if i.ec2_state != Ec2State::Running {
        return format!("{:?}", i.ec2_state);
    }
    for tg in &obs.group.target_groups {
        match obs.target_state(tg, &i.id) {
            Some(TargetHealth::Healthy) => {}
            Some(s) => return format!("{s:?} in target group").to_lowercase(),
            None => return "not registered in target group".into(),
        }
    }
    if !i.healthy {
        return "Unhealthy".into();
    }
    "in the health check grace period".into()
}

/// Old instances to remove now, at most `surplus`: unhealthy ones first (removing
/// them costs no capacity), then from the AZ with the most old instances, oldest
/// first, never taking the healthy in-service count below `floor`.
fn choose_old(obs: &Observation, old: &[&Instance], surplus: u32, floor: u32) -> Vec<String> {
    let mut per_az: BTreeMap<&str, u32> = BTreeMap::new();
    for i in old {
        *per_az.entry(i.az.as_str()).or_default() += 1;
    }
    let mut remaining: Vec<&Instance> = old.to_vec();
    let mut serving = obs.serving_count();
    let mut chosen = Vec::new();
    while (chosen.len() as u32) < surplus && !remaining.is_empty() {
        let (idx, _) = remaining
            .iter()
            .enumerate()
            .min_by_key(|(_, i)| {
                (
                    obs.is_serving(i),
                    std::cmp::Reverse(per_az[i.az.as_str()]),
                    i.launched_at,
                    i.id.as_str(),
                )
            })
            .expect("remaining is not empty");
        let pick = remaining.swap_remove(idx);
        if obs.is_serving(pick) {
            if serving <= floor {
                break;
            }
            serving -= 1;
        }
        *per_az.get_mut(pick.az.as_str()).expect("counted") -= 1;
        chosen.push(pick.id.clone());
    }
    chosen
}

/// Instances kiln deregistered: forget the gone, register again the wanted,
/// deregister again the re-registered, terminate the drained.
fn draining_step(obs: &Observation, j: &Journal, goal: &ImageVersion) -> Option<Step> {
    if j.batch.draining.is_empty() {
        return None;
    }
    let tgs = &obs.group.target_groups;
    let wanted_back = |i: &Instance| i.image_id == goal.image_id || j.phase == Phase::Stopping;
    let (mut forget, mut register, mut deregister, mut terminate) =
        (vec![], vec![], vec![], vec![]);
    for id in j.batch.draining.keys() {
        match obs.instance(id) {
            None => forget.push(id.clone()),
            Some(i) if i.is_leaving() => forget.push(id.clone()),
            Some(i) if wanted_back(i) => {
                if obs.is_registered(id) || tgs.is_empty() {
                    forget.push(id.clone())
                } else {
                    register.push(id.clone())
                }
            }
            Some(_) if obs.is_registered(id) => deregister.push(id.clone()),
            Some(_) if obs.is_drained(id) => terminate.push(id.clone()),
            Some(_) => {}
        }
    }
    if !forget.is_empty() {
        return Some(Step::Record(Note::Forget { ids: forget }));
    }
    if !register.is_empty() {
        return Some(Step::Register {
            instances: register,
            target_groups: tgs.clone(),
        });
    }
    if !deregister.is_empty() {
        return Some(Step::Deregister {
            instances: deregister,
            target_groups: tgs.clone(),
        });
    }
    if !terminate.is_empty() {
        return Some(Step::Terminate {
            instances: terminate,
            decrement_desired: true,
        });
    }
    None
}

/// Stopping: take out surplus (not-serving first, so the floor holds), then put
/// the group back and end `Failed`.
fn stopping_step(obs: &Observation, j: &Journal, live: &[&Instance], fresh: &[&Instance]) -> Step {
    let surplus = (live.len() as u32).saturating_sub(j.base_desired);
    if surplus > 0 {
        let mut victims: Vec<&Instance> = live.to_vec();
        victims.sort_by_key(|i| {
            (
                obs.is_serving(i),
                !fresh.iter().any(|f| f.id == i.id),
                i.launched_at,
            )
        });
        let mut serving = obs.serving_count();
        let mut chosen = vec![];
        for v in victims.into_iter().take(surplus as usize) {
            if obs.is_serving(v) {
                if serving <= j.floor() {
                    break;
                }
                serving -= 1;
            }
            chosen.push(v.id.clone());
        }
        if !chosen.is_empty() {
            return Step::Terminate {
                instances: chosen,
                decrement_desired: true,
            };
        }
    }
    finishing_step(obs, j)
}

fn finishing_step(obs: &Observation, j: &Journal) -> Step {
    let g = &obs.group;
    let fc = j.final_capacity();
    if (g.min, g.max, g.desired) != (fc.min, fc.max, fc.desired) {
        return Step::RestoreCapacity {
            min: fc.min,
            max: fc.max,
            desired: fc.desired,
        };
    }
    let resume: BTreeSet<String> = j
        .kiln_suspended()
        .intersection(&g.suspended)
        .cloned()
        .collect();
    if !resume.is_empty() {
        return Step::ResumeProcesses { processes: resume };
    }
    let outcome = match j.phase {
        Phase::Rolling => Outcome::Succeeded,
        Phase::RollingBack if j.aborted_by.is_some() => Outcome::Aborted,
        Phase::RollingBack => Outcome::RolledBack,
        _ => Outcome::Failed,
    };
    Step::Finish { outcome }
}

// ---------------------------------------------------------------------------
// Journal bookkeeping for each step (pure; shared by the engine and the plan)
// ---------------------------------------------------------------------------

impl Journal {
    /// Apply a journal-only step ([`Step::is_journal_only`]).
    pub fn record(&mut self, step: &Step, now: Timestamp) {
        match step {
            Step::Record(note) => match note {
                Note::Settle { expected } => {
                    self.desired.expected = *expected;
                    self.desired.in_flight = None;
                }
                Note::ExternalDesired { from, to } => {
                    if to < from {
                        self.batch.scale_in_seen = true;
                    }
                    let first_from = self.external_change.as_ref().map_or(*from, |c| c.from);
                    self.external_change = Some(ExternalChange {
                        from: first_from,
                        to: *to,
                        at: now,
                    });
                    self.base_desired = *to;
                    self.desired.expected = *to;
                }
                Note::Launched { ids } => self.batch.launched.extend(ids.iter().cloned()),
                Note::Forget { ids } => {
                    for id in ids {
                        self.batch.draining.remove(id);
                    }
                }
                Note::Ready { count } => {
                    self.batch.ready = *count;
                    self.last_progress_at = now;
                }
                Note::BatchReady { at } => self.batch.ready_at = *at,
            },
            Step::StartRollback { reason } => {
                self.change_phase(Phase::RollingBack, reason.clone(), now)
            }
            Step::Stop { reason } => self.change_phase(Phase::Stopping, reason.clone(), now),
            _ => debug_assert!(false, "not a journal-only step: {step:?}"),
        }
    }

    fn change_phase(&mut self, phase: Phase, reason: String, now: Timestamp) {
        self.phase = phase;
        self.reason = Some(reason);
        self.phase_started_at = now;
        self.last_progress_at = now;
        // The draining map carries over: the next phase decides whether those
        // instances go on to termination or are registered again.
        let draining = std::mem::take(&mut self.batch.draining);
        self.batch = Batch {
            number: self.batch.number,
            started_at: now,
            draining,
            ..Batch::default()
        };
    }

    /// `kiln abort`: roll back to where the rollout started.
    pub fn abort(&mut self, by: &str, now: Timestamp) {
        self.aborted_by = Some(by.to_string());
        if self.phase == Phase::Rolling {
            self.change_phase(Phase::RollingBack, format!("aborted by {by}"), now);
        }
    }

    /// Write-ahead before performing a mutating step. Returns whether the journal
    /// changed (and must be saved before acting).
    pub fn before(&mut self, step: &Step, obs: &Observation) -> bool {
        let now = obs.now;
        match step {
            Step::SetCapacity { desired, .. } => {
                self.desired.in_flight = Some(InFlight::SetDesired { to: *desired });
                self.batch = Batch {
                    number: self.batch.number + 1,
                    started_at: now,
                    ..Batch::default()
                };
                self.last_progress_at = now;
                true
            }
            Step::RestoreCapacity { desired, .. } if *desired != obs.group.desired => {
                self.desired.in_flight = Some(InFlight::SetDesired { to: *desired });
                true
            }
            Step::Deregister { instances, .. } => {
                for id in instances {
                    self.batch.draining.entry(id.clone()).or_insert(now);
                }
                self.last_progress_at = now;
                true
            }
            Step::Terminate {
                instances,
                decrement_desired: true,
            } => {
                self.desired.in_flight = Some(InFlight::TerminateDecrement {
                    ids: instances.clone(),
                });
                true
            }
            _ => false,
        }
    }

    /// Bookkeeping after a step was performed successfully.
    pub fn after(&mut self, step: &Step, now: Timestamp, acted: &Acted) {
        match step {
            Step::CreateLaunchTemplateVersion { .. } => {
                if let Acted::LaunchTemplateVersion(v) = acted {
                    self.target.launch_template_version = Some(*v);
                }
            }
            Step::SetCapacity { desired, .. } | Step::RestoreCapacity { desired, .. } => {
                self.desired.expected = *desired;
                self.desired.in_flight = None;
            }
            Step::Terminate {
                instances,
                decrement_desired,
            } => {
                if *decrement_desired {
                    self.desired.expected =
                        self.desired.expected.saturating_sub(instances.len() as u32);
                }
                self.desired.in_flight = None;
                for id in instances {
                    if self.batch.draining.remove(id).is_some() {
                        self.batch.drained += 1;
                    }
                }
                self.batch.terminated += instances.len() as u32;
                self.last_progress_at = now;
            }
            Step::Register { instances, .. } => {
                for id in instances {
                    self.batch.draining.remove(id);
                }
            }
            Step::Finish { outcome } => {
                self.phase = outcome.phase();
                self.ended_at = Some(now);
                let entry = HistoryEntry {
                    rollout_id: self.rollout_id.clone(),
                    from_image: self.source.image_id.clone(),
                    from_launch_template_version: self.source.launch_template_version,
                    to_image: self.target.image_id.clone(),
                    to_launch_template_version: self.target.launch_template_version,
                    started: self.started_at,
                    ended: now,
                    outcome: *outcome,
                    reason: self.reason.clone(),
                };
                self.push_history(entry);
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------
// --plan
// ---------------------------------------------------------------------------

/// Timings `--plan` assumes to estimate duration and observation cycles.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanAssumptions {
    #[serde(with = "human_duration")]
    pub boot: Duration,
    #[serde(with = "human_duration")]
    pub health: Duration,
    /// The target groups' deregistration delay.
    #[serde(with = "human_duration")]
    pub drain: Duration,
    #[serde(with = "human_duration")]
    pub poll: Duration,
}

impl Default for PlanAssumptions {
    fn default() -> Self {
        PlanAssumptions {
            boot: Duration::from_secs(90),
            health: Duration::from_secs(30),
            drain: Duration::from_secs(300),
            poll: Duration::from_secs(5),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchTemplateChange {
    pub template_id: String,
    pub from_version: u64,
    pub from_image: String,
    /// `None`: a new version will be created (numbered by AWS).
    pub to_version: Option<u64>,
    pub to_image: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedBatch {
    pub number: u32,
    /// New instances per AZ (the ASG balances AZs; this assumes it does evenly).
    pub launch: BTreeMap<String, u32>,
    /// Old instances leaving, per AZ.
    pub terminate: BTreeMap<String, Vec<String>>,
    /// Desired (and max) while the batch's new instances run beside the old.
    pub desired_during: u32,
    pub max_during: u32,
    pub desired_after: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub asg: String,
    pub launch_template: LaunchTemplateChange,
    pub suspend: BTreeSet<String>,
    pub surge: u32,
    pub floor: u32,
    pub original: Capacity,
    pub batches: Vec<PlannedBatch>,
    /// Mutating calls (suspend, launch template, capacity, deregister, terminate,
    /// restore) plus observation calls over the estimated duration.
    pub api_calls: u64,
    pub observation_calls_per_cycle: u64,
    #[serde(with = "human_duration")]
    pub estimated_duration: Duration,
}

/// API calls one observation cycle costs the AWS adapter: DescribeAutoScalingGroups,
/// DescribeInstances in pages of 1000 ids, DescribeTargetHealth per target group and
/// DescribeLaunchTemplateVersions for the version in use.
pub fn observation_calls(instances: usize, target_groups: usize) -> u64 {
    1 + (instances.max(1) as u64).div_ceil(1000) + target_groups as u64 + 1
}

/// API calls a step costs the AWS adapter.
pub fn step_calls(step: &Step) -> u64 {
    match step {
        Step::Record(_)
        | Step::StartRollback { .. }
        | Step::Stop { .. }
        | Step::Wait(_)
        | Step::Finish { .. } => 0,
        // describe the source version, create the new one
        Step::CreateLaunchTemplateVersion { .. } => 2,
        Step::Deregister { target_groups, .. } | Step::Register { target_groups, .. } => {
            target_groups.len() as u64
        }
        Step::Terminate { instances, .. } => instances.len() as u64,
        _ => 1,
    }
}

/// What `kiln rollout --plan` prints: computed by running [`decide`] against an
/// idealised group in which every launch is instantly healthy and every drain
/// instant, so the schedule is the one the engine will follow when nothing fails.
pub fn plan_schedule(
    obs: &Observation,
    spec: &RolloutSpec,
    assume: &PlanAssumptions,
) -> Result<Plan, super::RolloutError> {
    let holder = Holder {
        who: "plan".into(),
        host: "plan".into(),
        pid: 0,
        started: obs.now,
    };
    let mut j = Journal::begin("plan", holder, spec.clone(), obs, None)?;
    let mut o = obs.clone();
    // The plan starts from a group where every instance is ready.
    for i in o.instances.iter_mut() {
        i.lifecycle = Lifecycle::InService;
        i.ec2_state = Ec2State::Running;
        i.healthy = true;
    }
    for tg in &o.group.target_groups {
        let m = o.target_health.entry(tg.clone()).or_default();
        for i in &o.instances {
            m.insert(i.id.clone(), TargetHealth::Healthy);
        }
    }
    let azs: BTreeSet<String> = o.instances.iter().map(|i| i.az.clone()).collect();
    let mut next = 0u64;
    let mut batches: Vec<PlannedBatch> = vec![];
    let mut mutating_calls = 0u64;
    let mut suspend = BTreeSet::new();
    let mut to_version = None;
    for _ in 0..1_000_000 {
        let step = decide(&o, &j, spec);
        if step.is_journal_only() {
            j.record(&step, o.now);
            continue;
        }
        mutating_calls += step_calls(&step);
        j.before(&step, &o);
        let mut acted = Acted::Done;
        match &step {
            Step::SuspendProcesses { processes } => {
                suspend.extend(processes.iter().cloned());
                o.group.suspended.extend(processes.iter().cloned());
            }
            Step::CreateLaunchTemplateVersion { image_id, .. } => {
                // AWS numbers the version; the plan only needs some new number.
                let v = j.source.launch_template_version.unwrap_or(0) + 1;
                if let LaunchSource::Template { image_id: img, .. } = &mut o.group.launch {
                    *img = image_id.clone();
                }
                acted = Acted::LaunchTemplateVersion(v);
            }
            Step::PointAsg { version, .. } => {
                if let LaunchSource::Template { version: v, .. } = &mut o.group.launch {
                    *v = *version;
                    to_version = Some(*version);
                }
            }
            Step::SetCapacity { desired, max } => {
                o.group.desired = *desired;
                o.group.max = *max;
                let live = o.instances.iter().filter(|i| i.is_live()).count() as u32;
                let mut launch: BTreeMap<String, u32> = BTreeMap::new();
                for _ in live..*desired {
                    let az = azs
                        .iter()
                        .min_by_key(|az| {
                            o.instances
                                .iter()
                                .filter(|i| i.is_live() && &&i.az == az)
                                .count()
                        })
                        .cloned()
                        .unwrap_or_else(|| "?".into());
                    next += 1;
                    let id = format!("new-{next}");
                    *launch.entry(az.clone()).or_default() += 1;
                    o.instances.push(Instance {
                        id: id.clone(),
                        az,
                        lifecycle: Lifecycle::InService,
                        ec2_state: Ec2State::Running,
                        healthy: true,
                        image_id: spec.target_image.clone(),
                        launch_template_version: to_version,
                        launched_at: o.now,
                        protected_from_scale_in: false,
                    });
                    for tg in &o.group.target_groups {
                        o.target_health
                            .entry(tg.clone())
                            .or_default()
                            .insert(id.clone(), TargetHealth::Healthy);
                    }
                }
                batches.push(PlannedBatch {
                    number: j.batch.number,
                    launch,
                    terminate: BTreeMap::new(),
                    desired_during: *desired,
                    max_during: *max,
                    desired_after: *desired,
                });
            }
            Step::Deregister { instances, .. } => {
                for m in o.target_health.values_mut() {
                    for id in instances {
                        m.remove(id);
                    }
                }
            }
            Step::Terminate { instances, .. } => {
                for id in instances {
                    if let Some(i) = o.instances.iter().find(|i| &i.id == id) {
                        if let Some(b) = batches.last_mut() {
                            b.terminate
                                .entry(i.az.clone())
                                .or_default()
                                .push(id.clone());
                        }
                    }
                }
                o.instances.retain(|i| !instances.contains(&i.id));
                o.group.desired -= instances.len() as u32;
                if let Some(b) = batches.last_mut() {
                    b.desired_after = o.group.desired;
                }
            }
            Step::RestoreCapacity { min, max, desired } => {
                o.group.min = *min;
                o.group.max = *max;
                o.group.desired = *desired;
            }
            Step::ResumeProcesses { processes } => {
                for p in processes {
                    o.group.suspended.remove(p);
                }
            }
            Step::Register { .. } => {}
            Step::Wait(WaitFor::WarmUp { until }) => o.now = *until,
            Step::Wait(w) => {
                return Err(super::RolloutError::Internal(format!(
                    "plan stuck on an idealised group: {w}"
                )));
            }
            Step::Finish { .. } => break,
            Step::Record(_) | Step::StartRollback { .. } | Step::Stop { .. } => {
                unreachable!("journal only")
            }
        }
        j.after(&step, o.now, &acted);
        o.now = o.now.plus(Duration::from_secs(1));
    }
    let per_batch = assume.boot + assume.health + spec.warmup + assume.drain;
    let estimated_duration = per_batch * batches.len() as u32;
    let per_cycle = observation_calls(
        obs.instances.len() + j.surge() as usize,
        obs.group.target_groups.len(),
    );
    let cycles = estimated_duration.as_secs() / assume.poll.as_secs().max(1) + mutating_calls;
    let (template_id, from_version, from_image) = match &obs.group.launch {
        LaunchSource::Template {
            id,
            version,
            image_id,
            ..
        } => (id.clone(), *version, image_id.clone()),
        LaunchSource::Configuration { .. } => {
            unreachable!("Journal::begin refuses launch configurations")
        }
    };
    Ok(Plan {
        asg: obs.group.name.clone(),
        launch_template: LaunchTemplateChange {
            template_id,
            from_version,
            from_image,
            to_version: (j.source.image_id == spec.target_image).then_some(from_version),
            to_image: spec.target_image.clone(),
        },
        suspend,
        surge: j.surge(),
        floor: j.floor(),
        original: j.original,
        batches,
        api_calls: mutating_calls + cycles * per_cycle,
        observation_calls_per_cycle: per_cycle,
        estimated_duration,
    })
}
