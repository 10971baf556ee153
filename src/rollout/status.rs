//! `kiln status <asg>`: the group's image, the rollout in progress (phase, old/new
//! counts per AZ, what it waits on) and the lock holder. Built from one observation
//! and the journal, with the same [`decide`] the engine runs, so what status says
//! the rollout waits on is what the engine would do next.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::engine::{Fleet, JournalStore};
use super::model::*;
use super::plan::{decide, Step};
use super::Result;

/// Instances in one AZ.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AzCounts {
    /// Live instances not on the image the rollout moves toward.
    pub old: u32,
    /// Live instances on it (all instances when no rollout is in progress).
    pub new: u32,
    /// Healthy in service (counted toward the floor).
    pub serving: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStatus {
    pub rollout_id: String,
    pub phase: Phase,
    pub source_image: String,
    pub target_image: String,
    pub reason: Option<String>,
    pub batch: u32,
    /// The step the engine would take next, in words (what it waits on, or what it
    /// would do if nobody is running it).
    pub next: String,
    #[serde(with = "human_duration")]
    pub since_progress: Duration,
    /// No progress for longer than the deadline.
    pub stuck: bool,
    pub external_change: Option<ExternalChange>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub asg: String,
    /// The image of the launch template version the group points at.
    pub image: Option<String>,
    pub launch_template_version: Option<u64>,
    pub capacity: Capacity,
    pub per_az: BTreeMap<String, AzCounts>,
    pub rollout: Option<RolloutStatus>,
    pub lock_holder: Option<Holder>,
    pub last: Option<HistoryEntry>,
}

impl Status {
    /// `kiln status` exits non-zero while a rollout is failing (rolling back,
    /// stopping) or stuck, like `kubectl rollout status`.
    pub fn is_failing_or_stuck(&self) -> bool {
        self.rollout
            .as_ref()
            .is_some_and(|r| r.stuck || matches!(r.phase, Phase::RollingBack | Phase::Stopping))
    }
}

/// The status of a group from one observation and its journal (pure).
pub fn status_of(
    obs: &Observation,
    journal: Option<&Journal>,
    lock_holder: Option<Holder>,
) -> Status {
    let active = journal.filter(|j| !j.phase.is_terminal());
    let (image, version) = match &obs.group.launch {
        LaunchSource::Template {
            image_id, version, ..
        } => (Some(image_id.clone()), Some(*version)),
        LaunchSource::Configuration { .. } => (None, None),
    };
    let goal_image = active.map(|j| j.goal().image_id.clone());
    let mut per_az: BTreeMap<String, AzCounts> = BTreeMap::new();
    for i in obs.instances.iter().filter(|i| i.is_live()) {
        let c = per_az.entry(i.az.clone()).or_default();
        match &goal_image {
            Some(g) if &i.image_id != g => c.old += 1,
            _ => c.new += 1,
        }
        if obs.is_serving(i) {
            c.serving += 1;
        }
    }
    let rollout = active.map(|j| {
        let since_progress = obs.now.since(j.last_progress_at);
        let next = match decide(obs, j, &j.spec) {
            Step::Wait(w) => format!("waiting: {w}"),
            step => format!("next: {step}"),
        };
        RolloutStatus {
            rollout_id: j.rollout_id.clone(),
            phase: j.phase,
            source_image: j.source.image_id.clone(),
            target_image: j.target.image_id.clone(),
            reason: j.reason.clone(),
            batch: j.batch.number,
            next,
            since_progress: Duration::from_secs(since_progress.as_secs()),
            stuck: since_progress > j.spec.deadline,
            external_change: j.external_change.clone(),
        }
    });
    Status {
        asg: obs.group.name.clone(),
        image,
        launch_template_version: version,
        capacity: Capacity {
            min: obs.group.min,
            max: obs.group.max,
            desired: obs.group.desired,
        },
        per_az,
        rollout,
        lock_holder,
        last: journal.and_then(|j| j.history.last().cloned()),
    }
}

/// Observe the group and read its journal and lock: `kiln status`.
pub async fn status<F: Fleet, J: JournalStore>(fleet: &F, store: &J, asg: &str) -> Result<Status> {
    let obs = fleet.observe(asg).await?;
    let journal = store.load(asg).await?.map(|s| s.journal);
    let holder = store.holder(asg).await?;
    Ok(status_of(&obs, journal.as_ref(), holder))
}
