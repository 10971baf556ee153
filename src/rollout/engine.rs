//! The executor: observe, [`decide`], act, record, and again.
//!
//! Two seams keep it testable and cloud-agnostic:
//!
//! * [`Fleet`]: observing the group (a constant number of API calls per cycle,
//!   whatever its size: never one call per instance) and the few mutations a
//!   rollout makes. Implemented by the AWS adapter and by [`super::sim::SimFleet`].
//! * [`JournalStore`]: the journal and the lock, in the cloud so any operator's
//!   machine can resume, abort or read the history.
//!
//! The journal is saved before a step that needs write-ahead ([`Journal::before`])
//! and after every mutating step ([`Journal::after`]); see [`super::plan`] for why a
//! crash between any two of these is harmless.

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::model::*;
use super::plan::{decide, Acted, Step, WaitFor};
use super::{Result, RolloutError};

/// The auto-scaling group and everything around it that a rollout reads or changes.
///
/// Every method must be idempotent: the engine may repeat a call after a crash.
pub trait Fleet {
    /// Observe the group, its instances, their target health and the time. Must
    /// cost a constant number of API calls whatever the group size (batch
    /// DescribeInstances by up to 1000 ids, DescribeTargetHealth once per target
    /// group). `now` should come from the same clock as instance launch times (the
    /// AWS adapter can read the `Date` of a response) so skew cannot make an old
    /// instance look new.
    fn observe(&self, asg: &str) -> impl Future<Output = Result<Observation>> + Send;

    fn suspend_processes(
        &self,
        asg: &str,
        processes: &[String],
    ) -> impl Future<Output = Result<()>> + Send;

    fn resume_processes(
        &self,
        asg: &str,
        processes: &[String],
    ) -> impl Future<Output = Result<()>> + Send;

    /// Create a version of `template_id` from `from_version` with only the image
    /// changed, copying the full launch data explicitly (moto's versions do not
    /// inherit from their source, AWS's do). Idempotent on `token`: a version whose
    /// description carries it is returned instead of creating another.
    fn create_launch_template_version(
        &self,
        template_id: &str,
        from_version: u64,
        image_id: &str,
        token: &str,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Point the group (or its mixed-instances policy) at exactly this version.
    fn point_asg(
        &self,
        asg: &str,
        template_id: &str,
        version: u64,
        mixed_instances_policy: bool,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Set min (when given), max and desired capacity in one call.
    fn set_capacity(
        &self,
        asg: &str,
        min: Option<u32>,
        max: u32,
        desired: u32,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Deregister instances from target groups (one call per target group).
    fn deregister(
        &self,
        target_groups: &[String],
        instances: &[String],
    ) -> impl Future<Output = Result<()>> + Send;

    /// Register instances in target groups again (rollback of a drained instance).
    fn register(
        &self,
        target_groups: &[String],
        instances: &[String],
    ) -> impl Future<Output = Result<()>> + Send;

    /// TerminateInstanceInAutoScalingGroup for each instance. An instance already
    /// terminating or gone is not an error.
    fn terminate(
        &self,
        asg: &str,
        instances: &[String],
        decrement_desired: bool,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// An opaque version of the stored journal, for compare-and-swap saves (an SSM
/// parameter version, an S3 ETag, ...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision(pub String);

/// A journal as loaded, with the revision to save against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub revision: Revision,
    pub journal: Journal,
}

/// Where journals and locks live. One journal per ASG: the current or last
/// rollout, carrying the history.
pub trait JournalStore {
    fn load(&self, asg: &str) -> impl Future<Output = Result<Option<Stored>>> + Send;

    /// Save if the stored revision is still `expected` (`None`: nothing stored yet).
    /// A mismatch means someone took the rollout over: return
    /// [`RolloutError::LockLost`] naming the holder if known.
    fn save(
        &self,
        asg: &str,
        journal: &Journal,
        expected: Option<&Revision>,
    ) -> impl Future<Output = Result<Revision>> + Send;

    /// Take the lock. Held by someone else: [`RolloutError::Locked`] naming them,
    /// unless `replace` is exactly that holder (a take-over). Re-acquiring one's own
    /// lock succeeds.
    fn acquire(
        &self,
        asg: &str,
        holder: &Holder,
        replace: Option<&Holder>,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Release the lock if `holder` holds it.
    fn release(&self, asg: &str, holder: &Holder) -> impl Future<Output = Result<()>> + Send;

    /// Who holds the lock, for `kiln status`.
    fn holder(&self, asg: &str) -> impl Future<Output = Result<Option<Holder>>> + Send;
}

/// Read the history of an ASG's rollouts, oldest first.
pub async fn history<J: JournalStore>(store: &J, asg: &str) -> Result<Vec<HistoryEntry>> {
    Ok(store
        .load(asg)
        .await?
        .map(|s| s.journal.history)
        .unwrap_or_default())
}

/// The image `kiln rollback <asg>` returns to: what the ASG ran before its last
/// successful rollout.
pub async fn previous_image<J: JournalStore>(store: &J, asg: &str) -> Result<String> {
    store
        .load(asg)
        .await?
        .and_then(|s| s.journal.previous_image().map(str::to_string))
        .ok_or_else(|| RolloutError::NoPreviousImage {
            asg: asg.to_string(),
        })
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Sleep between observations while waiting.
    pub poll_interval: Duration,
    /// Give up after this many observation cycles (a safety net for tests and
    /// benchmarks; `None` in the CLI, where the deadline bounds a rollout).
    pub max_cycles: Option<u64>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            poll_interval: Duration::from_secs(5),
            max_cycles: None,
        }
    }
}

/// One finished batch: the progress line `kiln rollout` prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchSummary {
    pub number: u32,
    pub phase: Phase,
    pub launched: u32,
    pub healthy: u32,
    pub drained: u32,
    pub terminated: u32,
}

/// What the engine reports while it works.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A mutating or journal-only step is about to be taken.
    Step(&'a Step),
    /// Started waiting on something else than before.
    Waiting(&'a WaitFor),
    Batch(BatchSummary),
    Finished(Outcome),
}

/// Progress sink (progress bar, log lines, JSON events).
pub trait Progress {
    fn event(&mut self, journal: &Journal, event: Event<'_>);
}

impl Progress for () {
    fn event(&mut self, _: &Journal, _: Event<'_>) {}
}

/// How a rollout ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub rollout_id: String,
    pub asg: String,
    pub outcome: Outcome,
    pub reason: Option<String>,
    pub source_image: String,
    pub target_image: String,
    /// Capacity the group was left with.
    pub capacity: Capacity,
    /// A desired capacity someone else set during the rollout, kept.
    pub external_change: Option<ExternalChange>,
    pub batches: u32,
    pub observations: u64,
}

/// What `kiln rollout` asks for.
#[derive(Clone, Debug)]
pub struct StartRequest {
    pub asg: String,
    pub spec: RolloutSpec,
    pub holder: Holder,
    /// Unique per rollout (also the launch template version token).
    pub rollout_id: String,
}

async fn lock<J: JournalStore>(
    store: &J,
    asg: &str,
    holder: &Holder,
    may_take_over: &impl Fn(&Holder) -> bool,
) -> Result<()> {
    match store.acquire(asg, holder, None).await {
        Err(RolloutError::Locked {
            holder: current, ..
        }) if may_take_over(&current) => {
            tracing::warn!(asg, %current, "taking over the rollout lock");
            store.acquire(asg, holder, Some(&current)).await
        }
        other => other,
    }
}

/// The take-over rule `kiln rollout` and `kiln abort` use without `--take-over`: a
/// lock held from this host by a process that no longer exists (killed, crashed)
/// may be taken, so re-running after a SIGKILL resumes. A holder on another host
/// cannot be checked from here and is never taken without `--take-over`. (A reused
/// pid makes the check say "alive": the safe direction.)
pub fn local_holder_is_gone(holder: &Holder, this_host: &str) -> bool {
    let proc_fs = std::path::Path::new("/proc/self").exists();
    holder.host == this_host
        && holder.pid != std::process::id()
        && proc_fs
        && !std::path::Path::new(&format!("/proc/{}", holder.pid)).exists()
}

/// Take the lock and load or create the journal for a rollout toward
/// `req.spec.target_image`. A rollout in progress toward the same image is resumed
/// (with its recorded spec); toward another image it is refused.
///
/// `may_take_over` decides whether a lock held by someone else may be taken: the CLI
/// answers yes for `--take-over`, or for a holder on this host whose pid is gone
/// (the SIGKILL-then-rerun case).
pub async fn start<F: Fleet, J: JournalStore>(
    fleet: &F,
    store: &J,
    req: StartRequest,
    may_take_over: impl Fn(&Holder) -> bool,
) -> Result<Stored> {
    let asg = req.asg.as_str();
    lock(store, asg, &req.holder, &may_take_over).await?;
    let result = async {
        let prev = store.load(asg).await?;
        match prev {
            Some(s) if !s.journal.phase.is_terminal() => {
                let j = &s.journal;
                if j.target.image_id != req.spec.target_image {
                    return Err(RolloutError::InProgress {
                        asg: asg.to_string(),
                        target_image: j.target.image_id.clone(),
                        phase: j.phase,
                    });
                }
                let mut journal = s.journal.clone();
                journal.holder = req.holder.clone();
                let revision = store.save(asg, &journal, Some(&s.revision)).await?;
                Ok(Stored { revision, journal })
            }
            prev => {
                let obs = fleet.observe(asg).await?;
                let journal = Journal::begin(
                    req.rollout_id.clone(),
                    req.holder.clone(),
                    req.spec.clone(),
                    &obs,
                    prev.as_ref().map(|s| &s.journal),
                )?;
                let revision = store
                    .save(asg, &journal, prev.as_ref().map(|s| &s.revision))
                    .await?;
                Ok(Stored { revision, journal })
            }
        }
    }
    .await;
    if result.is_err() {
        // Best effort: the error is what the operator needs to see.
        let _ = store.release(asg, &req.holder).await;
    }
    result
}

/// `kiln abort`: take the lock, turn the rollout in progress around, and drive the
/// rollback to its end.
pub async fn abort<F: Fleet, J: JournalStore, P: Progress>(
    fleet: &F,
    store: &J,
    asg: &str,
    holder: &Holder,
    may_take_over: impl Fn(&Holder) -> bool,
    cfg: &EngineConfig,
    progress: &mut P,
) -> Result<Report> {
    lock(store, asg, holder, &may_take_over).await?;
    let stored = match store.load(asg).await? {
        Some(s) if !s.journal.phase.is_terminal() => s,
        _ => {
            let _ = store.release(asg, holder).await;
            return Err(RolloutError::NothingInProgress {
                asg: asg.to_string(),
            });
        }
    };
    let now = fleet.observe(asg).await?.now;
    let mut journal = stored.journal;
    journal.holder = holder.clone();
    journal.abort(&holder.who, now);
    let revision = store.save(asg, &journal, Some(&stored.revision)).await?;
    drive(fleet, store, Stored { revision, journal }, cfg, progress).await
}

/// With no rollout in progress, release a lock left behind by a kiln killed
/// between taking it and writing its journal (or between its last journal save
/// and releasing it): nothing was changed, but the lock would refuse the next
/// rollout from another host. Taken only as `may_take_over` allows (its holder
/// is gone, or --take-over); a live holder is [`RolloutError::Locked`]. Returns
/// who held it. Found by the SIGKILL trials of issue 5.
pub async fn release_stale_lock<J: JournalStore>(
    store: &J,
    asg: &str,
    holder: &Holder,
    may_take_over: impl Fn(&Holder) -> bool,
) -> Result<Option<Holder>> {
    let Some(current) = store.holder(asg).await? else {
        return Ok(None);
    };
    lock(store, asg, holder, &may_take_over).await?;
    store.release(asg, holder).await?;
    Ok(Some(current))
}

/// Run the control loop until the rollout finishes (or an error stops it; running
/// [`start`] + `drive` again resumes).
pub async fn drive<F: Fleet, J: JournalStore, P: Progress>(
    fleet: &F,
    store: &J,
    stored: Stored,
    cfg: &EngineConfig,
    progress: &mut P,
) -> Result<Report> {
    let Stored {
        mut revision,
        journal: mut j,
    } = stored;
    let asg = j.asg.clone();
    let spec = j.spec.clone();
    let mut observations = 0u64;
    let mut last_wait: Option<WaitFor> = None;
    loop {
        if cfg.max_cycles.is_some_and(|m| observations >= m) {
            return Err(RolloutError::Internal(format!(
                "ASG {asg}: gave up after {observations} observation cycles"
            )));
        }
        let obs = fleet.observe(&asg).await?;
        observations += 1;

        // Journal-only steps need no new observation: record and decide again. The
        // bound only catches a bug where two notes undo each other forever.
        let mut recorded = false;
        let mut step = decide(&obs, &j, &spec);
        let mut notes = 0;
        while step.is_journal_only() {
            notes += 1;
            if notes > 64 {
                return Err(RolloutError::Internal(format!(
                    "ASG {asg}: journal notes do not converge: {step:?}"
                )));
            }
            progress.event(&j, Event::Step(&step));
            j.record(&step, obs.now);
            recorded = true;
            step = decide(&obs, &j, &spec);
        }

        if let Step::Wait(w) = &step {
            if recorded {
                revision = store.save(&asg, &j, Some(&revision)).await?;
            }
            if last_wait.as_ref() != Some(w) {
                progress.event(&j, Event::Waiting(w));
                last_wait = Some(w.clone());
            }
            tokio::time::sleep(cfg.poll_interval).await;
            continue;
        }
        last_wait = None;

        // A batch ends when the next begins or the rollout finishes.
        if matches!(step, Step::SetCapacity { .. } | Step::Finish { .. }) && j.batch.number > 0 {
            let b = &j.batch;
            if b.terminated > 0 || !b.launched.is_empty() {
                let summary = BatchSummary {
                    number: b.number,
                    phase: j.phase,
                    launched: b.launched.len() as u32,
                    healthy: b.ready,
                    drained: b.drained,
                    terminated: b.terminated,
                };
                progress.event(&j, Event::Batch(summary));
            }
        }
        progress.event(&j, Event::Step(&step));

        if j.before(&step, &obs) || recorded {
            revision = store.save(&asg, &j, Some(&revision)).await?;
        }
        let acted = act(fleet, &asg, &step).await?;
        j.after(&step, obs.now, &acted);
        revision = store.save(&asg, &j, Some(&revision)).await?;

        if let Step::Finish { outcome } = step {
            progress.event(&j, Event::Finished(outcome));
            store.release(&asg, &j.holder).await?;
            let capacity = Capacity {
                min: obs.group.min,
                max: obs.group.max,
                desired: obs.group.desired,
            };
            return Ok(Report {
                rollout_id: j.rollout_id.clone(),
                asg: asg.clone(),
                outcome,
                reason: j.reason.clone(),
                source_image: j.source.image_id.clone(),
                target_image: j.target.image_id.clone(),
                capacity,
                external_change: j.external_change.clone(),
                batches: j.batch.number,
                observations,
            });
        }
    }
}

async fn act<F: Fleet>(fleet: &F, asg: &str, step: &Step) -> Result<Acted> {
    match step {
        Step::SuspendProcesses { processes } => {
            fleet
                .suspend_processes(asg, &processes.iter().cloned().collect::<Vec<_>>())
                .await?
        }
        Step::ResumeProcesses { processes } => {
            fleet
                .resume_processes(asg, &processes.iter().cloned().collect::<Vec<_>>())
                .await?
        }
        Step::CreateLaunchTemplateVersion {
            template_id,
            from_version,
            image_id,
            token,
        } => {
            let v = fleet
                .create_launch_template_version(template_id, *from_version, image_id, token)
                .await?;
            return Ok(Acted::LaunchTemplateVersion(v));
        }
        Step::PointAsg {
            template_id,
            version,
            mixed_instances_policy,
        } => {
            fleet
                .point_asg(asg, template_id, *version, *mixed_instances_policy)
                .await?
        }
        Step::SetCapacity { desired, max } => fleet.set_capacity(asg, None, *max, *desired).await?,
        Step::RestoreCapacity { min, max, desired } => {
            fleet.set_capacity(asg, Some(*min), *max, *desired).await?
        }
        Step::Deregister {
            instances,
            target_groups,
        } => fleet.deregister(target_groups, instances).await?,
        Step::Register {
            instances,
            target_groups,
        } => fleet.register(target_groups, instances).await?,
        Step::Terminate {
            instances,
            decrement_desired,
        } => fleet.terminate(asg, instances, *decrement_desired).await?,
        Step::Finish { .. } => {}
        Step::Wait(_) | Step::Record(_) | Step::StartRollback { .. } | Step::Stop { .. } => {
            unreachable!("not performed against the fleet: {step:?}")
        }
    }
    Ok(Acted::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_local_holder_may_be_taken_over() {
        let me = Holder {
            who: "op".into(),
            host: "box".into(),
            pid: std::process::id(),
            started: Timestamp(0),
        };
        // Ourselves: alive.
        assert!(!local_holder_is_gone(&me, "box"));
        // A pid that cannot exist (above Linux's pid_max).
        let dead = Holder {
            pid: 4_194_304 + 7,
            ..me.clone()
        };
        assert_eq!(
            local_holder_is_gone(&dead, "box"),
            std::path::Path::new("/proc/self").exists()
        );
        // Another host: never without --take-over.
        assert!(!local_holder_is_gone(&dead, "other-box"));
    }
}
