//! What a rollout decision needs to know, and what it must remember.
//!
//! Three kinds of data live here:
//!
//! * [`Observation`]: the ASG, its instances and their target health at one instant,
//!   reduced to what [`super::plan::decide`] reads. The AWS adapter builds it from a
//!   constant number of calls per cycle; the simulator builds it from memory.
//! * [`RolloutSpec`]: what the operator asked for (`kiln rollout` flags).
//! * [`Journal`]: what must survive the process (original capacity and suspended
//!   processes, source and target, phase, the batch in flight, history). It is small
//!   on purpose: its size grows with the surge, never with the group, so it fits a
//!   cloud parameter or object however large the group is.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Scaling processes kiln suspends for the duration of a rollout: each of them would
/// otherwise launch or terminate instances behind kiln's back (AZ rebalancing
/// terminates to even out AZs, alarms and schedules change desired capacity).
pub const SUSPENDED_DURING_ROLLOUT: [&str; 3] =
    ["AZRebalance", "AlarmNotification", "ScheduledActions"];

/// How many finished rollouts the journal remembers per ASG (the issue asks for at
/// least 10 to revert through).
pub const HISTORY_LEN: usize = 20;

/// A wall-clock instant, milliseconds since the Unix epoch.
///
/// Decisions never read a clock: the time comes in the [`Observation`], so the
/// simulator can run on virtual time and `decide` stays a pure function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn from_system_time(t: SystemTime) -> Self {
        Timestamp(
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        )
    }
    pub fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.0)
    }
    /// Time elapsed since `earlier` (zero if `earlier` is later).
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
    pub fn plus(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(d.as_millis() as u64))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            humantime::format_rfc3339_seconds(self.to_system_time())
        )
    }
}

// Journal timestamps are RFC 3339 so `kiln history --output json` and a human
// reading the stored parameter see dates, not epoch numbers.
impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_rfc3339_millis(self.to_system_time()).to_string())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&s)
            .map(Timestamp::from_system_time)
            .map_err(serde::de::Error::custom)
    }
}

/// Serde for `Duration` as a human string ("90s", "15m").
pub mod human_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------------------
// Observation
// ---------------------------------------------------------------------------

/// Where the ASG gets its launch data from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum LaunchSource {
    /// A launch template, either directly or through a mixed-instances policy.
    /// `version` is resolved to a number by the adapter (`$Latest`/`$Default` mean
    /// nothing stable once kiln has created a version), and `image_id` is the AMI of
    /// that version.
    Template {
        id: String,
        version: u64,
        image_id: String,
        mixed_instances_policy: bool,
    },
    /// A legacy launch configuration: kiln refuses to roll these.
    Configuration { name: String },
}

/// The auto-scaling group, reduced to what rollout decisions read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    pub name: String,
    pub min: u32,
    pub max: u32,
    pub desired: u32,
    pub launch: LaunchSource,
    /// Names of suspended scaling processes, exactly as AWS spells them.
    pub suspended: BTreeSet<String>,
    pub target_groups: Vec<String>,
    #[serde(with = "human_duration")]
    pub health_check_grace: Duration,
}

/// ASG lifecycle state of an instance, with the `:Wait`/`:Proceed` hook states folded
/// into the state they belong to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Lifecycle {
    Pending,
    InService,
    Standby,
    Terminating,
    Terminated,
    Detaching,
    Detached,
    /// Warm pool and anything newer than this code: never counted, never touched.
    Other,
}

/// EC2 instance state (the ASG can say InService before EC2 says running after a
/// stop/start, so both are read).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Ec2State {
    Pending,
    Running,
    ShuttingDown,
    Terminated,
    Stopping,
    Stopped,
}

/// One instance of the group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub az: String,
    pub lifecycle: Lifecycle,
    pub ec2_state: Ec2State,
    /// ASG health status (`Healthy` / `Unhealthy`).
    pub healthy: bool,
    pub image_id: String,
    pub launch_template_version: Option<u64>,
    pub launched_at: Timestamp,
    pub protected_from_scale_in: bool,
}

impl Instance {
    /// Counted as part of the group: launching or in service.
    pub fn is_live(&self) -> bool {
        matches!(self.lifecycle, Lifecycle::Pending | Lifecycle::InService)
            && !matches!(
                self.ec2_state,
                Ec2State::ShuttingDown | Ec2State::Terminated
            )
    }
    /// On its way out (or gone but still listed).
    pub fn is_leaving(&self) -> bool {
        matches!(
            self.lifecycle,
            Lifecycle::Terminating
                | Lifecycle::Terminated
                | Lifecycle::Detaching
                | Lifecycle::Detached
        ) || matches!(
            self.ec2_state,
            Ec2State::ShuttingDown | Ec2State::Terminated
        )
    }
}

/// Target health state in one target group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetHealth {
    Initial,
    Healthy,
    Unhealthy,
    Draining,
    Unused,
    Unavailable,
}

/// Everything one observation cycle saw.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    pub now: Timestamp,
    pub group: GroupState,
    pub instances: Vec<Instance>,
    /// Target group ARN → instance id → state. An instance missing from a target
    /// group's map is not registered there (AWS stops listing a target once its
    /// draining has finished).
    pub target_health: BTreeMap<String, BTreeMap<String, TargetHealth>>,
}

impl Observation {
    pub fn instance(&self, id: &str) -> Option<&Instance> {
        self.instances.iter().find(|i| i.id == id)
    }

    /// The instance's state in `tg`; `None` when it is not registered there.
    pub fn target_state(&self, tg: &str, id: &str) -> Option<TargetHealth> {
        self.target_health.get(tg).and_then(|m| m.get(id)).copied()
    }

    /// Registered (so receiving or about to receive traffic) in any attached target
    /// group: deregistration is not done yet, or someone registered it again.
    pub fn is_registered(&self, id: &str) -> bool {
        self.group.target_groups.iter().any(|tg| {
            matches!(
                self.target_state(tg, id),
                Some(TargetHealth::Initial | TargetHealth::Healthy | TargetHealth::Unhealthy)
            )
        })
    }

    /// Draining has finished in every attached target group.
    pub fn is_drained(&self, id: &str) -> bool {
        self.group.target_groups.iter().all(|tg| {
            matches!(
                self.target_state(tg, id),
                None | Some(TargetHealth::Unused | TargetHealth::Unavailable)
            )
        })
    }

    /// Healthy in service: counted toward the capacity floor. Running, InService,
    /// Healthy in the ASG and `healthy` in every attached target group.
    pub fn is_serving(&self, i: &Instance) -> bool {
        i.lifecycle == Lifecycle::InService
            && i.ec2_state == Ec2State::Running
            && i.healthy
            && self
                .group
                .target_groups
                .iter()
                .all(|tg| self.target_state(tg, &i.id) == Some(TargetHealth::Healthy))
    }

    /// Number of instances counted toward the capacity floor.
    pub fn serving_count(&self) -> u32 {
        self.instances.iter().filter(|i| self.is_serving(i)).count() as u32
    }
}

// ---------------------------------------------------------------------------
// Spec
// ---------------------------------------------------------------------------

/// A count of instances, absolute or as a percentage of a reference count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Amount {
    Count(u32),
    Percent(u32),
}

impl Amount {
    /// Percentages of surge round up (25% of 3 is 1 instance, not 0).
    pub fn resolve_up(self, of: u32) -> u32 {
        match self {
            Amount::Count(n) => n,
            Amount::Percent(p) => (u64::from(of) * u64::from(p)).div_ceil(100) as u32,
        }
    }
    /// Percentages of a floor round up too: 90% of 5 healthy means 5, the safe side.
    pub fn resolve_floor(self, of: u32) -> u32 {
        self.resolve_up(of)
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl std::str::FromStr for Amount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let p: u32 = p
                .trim()
                .parse()
                .map_err(|_| format!("`{s}` is not a percentage like 25%"))?;
            if p > 100 {
                return Err(format!("`{s}`: a percentage must be at most 100%"));
            }
            Ok(Amount::Percent(p))
        } else {
            s.parse()
                .map(Amount::Count)
                .map_err(|_| format!("`{s}` is neither a count (2) nor a percentage (25%)"))
        }
    }
}

/// What the operator asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSpec {
    pub target_image: String,
    /// Instances launched above desired capacity per batch (`--max-surge`), of the
    /// original desired capacity when a percentage; at least one instance.
    pub max_surge: Amount,
    /// Floor of healthy in-service instances (`--min-healthy`), of the ORIGINAL
    /// desired capacity when a percentage.
    pub min_healthy: Amount,
    /// How long new instances must have been healthy before old ones go.
    #[serde(with = "human_duration")]
    pub warmup: Duration,
    /// Longest time without progress before the rollout is declared stuck.
    #[serde(with = "human_duration")]
    pub deadline: Duration,
    /// Roll back automatically on failure (`--no-rollback` turns it off).
    pub rollback_on_failure: bool,
}

impl RolloutSpec {
    pub fn new(target_image: impl Into<String>) -> Self {
        RolloutSpec {
            target_image: target_image.into(),
            max_surge: Amount::Percent(25),
            min_healthy: Amount::Percent(100),
            warmup: Duration::from_secs(60),
            deadline: Duration::from_secs(15 * 60),
            rollback_on_failure: true,
        }
    }

    /// Surge in instances for a group of `desired` (never 0: kiln always launches
    /// before it terminates).
    pub fn surge(&self, desired: u32) -> u32 {
        self.max_surge.resolve_up(desired).max(1)
    }

    /// Capacity floor for a group whose original desired capacity was `desired`.
    pub fn floor(&self, desired: u32) -> u32 {
        self.min_healthy.resolve_floor(desired)
    }
}

// ---------------------------------------------------------------------------
// Journal
// ---------------------------------------------------------------------------

/// Who holds (or held) the rollout lock of an ASG.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Operator identity (IAM principal or `$USER`).
    pub who: String,
    pub host: String,
    pub pid: u32,
    pub started: Timestamp,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} on {} (pid {}, since {})",
            self.who, self.host, self.pid, self.started
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub min: u32,
    pub max: u32,
    pub desired: u32,
}

/// An image and the launch template version that launches it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageVersion {
    pub image_id: String,
    /// `None` for the target until kiln has created its launch template version.
    pub launch_template_version: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Replacing instances toward the target image.
    Rolling,
    /// Replacing instances back toward the source image (failure or abort).
    RollingBack,
    /// Failure with rollback disabled, or a rollback that failed too: putting back
    /// capacity and processes, then `Failed`. Instances are left on whatever image
    /// they run.
    Stopping,
    Done,
    RolledBack,
    Failed,
    Aborted,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Phase::Done | Phase::RolledBack | Phase::Failed | Phase::Aborted
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Every instance runs the target image.
    Succeeded,
    /// Failed and rolled back: every instance runs the source image.
    RolledBack,
    /// Failed without (or despite) a rollback: instances may run either image.
    Failed,
    /// `kiln abort`: rolled back on request.
    Aborted,
}

impl Outcome {
    pub fn phase(self) -> Phase {
        match self {
            Outcome::Succeeded => Phase::Done,
            Outcome::RolledBack => Phase::RolledBack,
            Outcome::Failed => Phase::Failed,
            Outcome::Aborted => Phase::Aborted,
        }
    }
}

/// A desired-capacity change kiln has decided on and may or may not have made yet.
///
/// The journal is written *before* such a change (write-ahead) so that after a crash
/// the next observation can tell which of the two values is kiln's own, and anything
/// else is someone else's change (an external scale-out to keep at the end).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum InFlight {
    SetDesired {
        to: u32,
    },
    /// Terminations with decrement: each id observed leaving took one off desired.
    TerminateDecrement {
        ids: Vec<String>,
    },
}

/// What kiln believes desired capacity is, given its own changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredLedger {
    pub expected: u32,
    pub in_flight: Option<InFlight>,
}

/// A desired capacity someone else set during the rollout; kept at the end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalChange {
    pub from: u32,
    pub to: u32,
    pub at: Timestamp,
}

/// The batch in flight: the instances launched for it and the old ones leaving.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub number: u32,
    pub started_at: Timestamp,
    /// Target-image instances that appeared during this batch (launched by the ASG
    /// because kiln raised desired, or replacing one). Used to notice one that the
    /// ASG replaced.
    pub launched: BTreeSet<String>,
    /// When every target-image instance was first seen ready (warm-up starts here).
    pub ready_at: Option<Timestamp>,
    /// Old instances kiln deregistered from their target groups, and since when.
    pub draining: BTreeMap<String, Timestamp>,
    /// Batch instances seen ready so far (progress).
    pub ready: u32,
    /// Old instances whose draining finished in this batch (progress reporting).
    pub drained: u32,
    /// Old instances kiln terminated in this batch (progress reporting).
    pub terminated: u32,
    /// Someone scaled the group in during this batch: instances vanishing is then
    /// the ASG's scale-in, not a replacement of a failed instance.
    pub scale_in_seen: bool,
}

/// One finished rollout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub rollout_id: String,
    pub from_image: String,
    pub from_launch_template_version: Option<u64>,
    pub to_image: String,
    pub to_launch_template_version: Option<u64>,
    pub started: Timestamp,
    pub ended: Timestamp,
    pub outcome: Outcome,
    pub reason: Option<String>,
}

/// The persisted state of one ASG's current (or last) rollout plus its history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub rollout_id: String,
    pub asg: String,
    pub holder: Holder,
    pub spec: RolloutSpec,
    /// Capacity before kiln touched anything.
    pub original: Capacity,
    /// Exactly the processes that were suspended before kiln suspended anything.
    pub suspended_before: BTreeSet<String>,
    pub launch_template_id: String,
    pub source: ImageVersion,
    pub target: ImageVersion,
    pub phase: Phase,
    /// Why the rollout is rolling back / stopping / ended that way.
    pub reason: Option<String>,
    /// `kiln abort` asked for the rollback (by whom), so it ends `Aborted`.
    pub aborted_by: Option<String>,
    /// Desired capacity the group should settle at: the original, or the value an
    /// external scale set during the rollout.
    pub base_desired: u32,
    pub desired: DesiredLedger,
    pub external_change: Option<ExternalChange>,
    pub batch: Batch,
    pub started_at: Timestamp,
    pub phase_started_at: Timestamp,
    pub last_progress_at: Timestamp,
    pub ended_at: Option<Timestamp>,
    /// Newest last, at most [`HISTORY_LEN`].
    pub history: Vec<HistoryEntry>,
}

impl Journal {
    /// A fresh journal for a rollout of `obs.group` toward `spec.target_image`,
    /// carrying over the history of `previous`. Fails on a group kiln cannot roll.
    pub fn begin(
        rollout_id: impl Into<String>,
        holder: Holder,
        spec: RolloutSpec,
        obs: &Observation,
        previous: Option<&Journal>,
    ) -> Result<Journal, super::RolloutError> {
        use super::RolloutError;
        let g = &obs.group;
        let (lt_id, lt_version, lt_image) = match &g.launch {
            LaunchSource::Template {
                id,
                version,
                image_id,
                ..
            } => (id.clone(), *version, image_id.clone()),
            LaunchSource::Configuration { name } => {
                return Err(RolloutError::LaunchConfiguration {
                    asg: g.name.clone(),
                    launch_configuration: name.clone(),
                })
            }
        };
        // With Launch suspended raising desired launches nothing: every batch would
        // wait until the deadline. Say so now instead.
        if g.suspended.contains("Launch") {
            return Err(RolloutError::ProcessSuspended {
                asg: g.name.clone(),
                process: "Launch".to_string(),
            });
        }
        // Found by the fault trials' bad-input catalogue (issue 5): kiln replaced a
        // scale-in-protected instance (TerminateInstanceInAutoScalingGroup ignores
        // the protection) and finished "Succeeded" with a Standby instance still on
        // the old image. Both are the operator's to decide: refuse, naming them.
        let ids = |keep: fn(&Instance) -> bool| -> Vec<String> {
            obs.instances
                .iter()
                .filter(|i| keep(i))
                .map(|i| i.id.clone())
                .collect()
        };
        let standby = ids(|i| i.lifecycle == Lifecycle::Standby);
        if !standby.is_empty() {
            return Err(RolloutError::InstancesInStandby {
                asg: g.name.clone(),
                instances: standby.join(", "),
            });
        }
        let protected = ids(|i| i.is_live() && i.protected_from_scale_in);
        if !protected.is_empty() {
            return Err(RolloutError::InstancesProtected {
                asg: g.name.clone(),
                instances: protected.join(" "),
            });
        }
        let floor = spec.floor(g.desired);
        if floor > g.desired {
            return Err(RolloutError::FloorAboveDesired {
                asg: g.name.clone(),
                floor,
                desired: g.desired,
            });
        }
        let history = previous.map(|p| p.history.clone()).unwrap_or_default();
        Ok(Journal {
            rollout_id: rollout_id.into(),
            asg: g.name.clone(),
            holder,
            original: Capacity {
                min: g.min,
                max: g.max,
                desired: g.desired,
            },
            suspended_before: g.suspended.clone(),
            launch_template_id: lt_id,
            source: ImageVersion {
                image_id: lt_image.clone(),
                launch_template_version: Some(lt_version),
            },
            // Re-rolling onto the image the template already launches needs no new
            // version (the replacement still happens: every deploy is new machines).
            target: ImageVersion {
                image_id: spec.target_image.clone(),
                launch_template_version: (lt_image == spec.target_image).then_some(lt_version),
            },
            spec,
            phase: Phase::Rolling,
            reason: None,
            aborted_by: None,
            base_desired: g.desired,
            desired: DesiredLedger {
                expected: g.desired,
                in_flight: None,
            },
            external_change: None,
            batch: Batch {
                number: 0,
                started_at: obs.now,
                ..Batch::default()
            },
            started_at: obs.now,
            phase_started_at: obs.now,
            last_progress_at: obs.now,
            ended_at: None,
            history,
        })
    }

    /// The image and launch template version the current phase moves toward.
    pub fn goal(&self) -> &ImageVersion {
        match self.phase {
            Phase::RollingBack | Phase::RolledBack | Phase::Aborted => &self.source,
            _ => &self.target,
        }
    }

    /// Capacity floor in healthy in-service instances: `--min-healthy` of the
    /// original desired capacity, lowered only if someone scaled the group in below
    /// it during the rollout (kiln cannot keep more than the group wants).
    pub fn floor(&self) -> u32 {
        self.spec
            .floor(self.original.desired)
            .min(self.base_desired)
    }

    /// Surge in instances (of the original desired capacity).
    pub fn surge(&self) -> u32 {
        self.spec.surge(self.original.desired)
    }

    /// The capacity to put back at the end: the original min/max, and the original
    /// desired unless someone else changed it during the rollout.
    pub fn final_capacity(&self) -> Capacity {
        let desired = self.base_desired;
        Capacity {
            min: self.original.min.min(desired),
            max: self.original.max.max(desired),
            desired,
        }
    }

    /// Processes kiln suspended itself and must resume: the rollout set minus what
    /// was already suspended before.
    pub fn kiln_suspended(&self) -> BTreeSet<String> {
        SUSPENDED_DURING_ROLLOUT
            .iter()
            .map(|s| s.to_string())
            .filter(|p| !self.suspended_before.contains(p))
            .collect()
    }

    /// Append a finished rollout, keeping the newest [`HISTORY_LEN`].
    pub fn push_history(&mut self, entry: HistoryEntry) {
        self.history.push(entry);
        if self.history.len() > HISTORY_LEN {
            let excess = self.history.len() - HISTORY_LEN;
            self.history.drain(..excess);
        }
    }

    /// The image to return to for `kiln rollback` without `--to`: the image the ASG
    /// ran before its last successful rollout.
    pub fn previous_image(&self) -> Option<&str> {
        self.history
            .iter()
            .rev()
            .find(|h| h.outcome == Outcome::Succeeded)
            .map(|h| h.from_image.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_and_resolve_on_the_safe_side() {
        assert_eq!("25%".parse::<Amount>(), Ok(Amount::Percent(25)));
        assert_eq!(" 3 ".parse::<Amount>(), Ok(Amount::Count(3)));
        assert!("150%".parse::<Amount>().is_err());
        assert!("many".parse::<Amount>().is_err());
        // Surge rounds up and is at least one; the floor rounds up.
        let mut spec = RolloutSpec::new("ami-1");
        spec.max_surge = Amount::Percent(25);
        assert_eq!(spec.surge(3), 1);
        assert_eq!(spec.surge(10), 3);
        spec.max_surge = Amount::Percent(0);
        assert_eq!(spec.surge(10), 1);
        spec.min_healthy = Amount::Percent(90);
        assert_eq!(spec.floor(5), 5);
        assert_eq!(spec.floor(10), 9);
    }

    #[test]
    fn timestamps_are_rfc3339_in_json() {
        let t = Timestamp(1_790_000_000_123);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"2026-09-21T14:13:20.123Z\"");
        assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), t);
    }

    #[test]
    fn history_keeps_the_newest() {
        let obs = Observation {
            now: Timestamp(0),
            group: GroupState {
                name: "g".into(),
                min: 1,
                max: 2,
                desired: 1,
                launch: LaunchSource::Template {
                    id: "lt".into(),
                    version: 1,
                    image_id: "ami-0".into(),
                    mixed_instances_policy: false,
                },
                suspended: BTreeSet::new(),
                target_groups: vec![],
                health_check_grace: Duration::ZERO,
            },
            instances: vec![],
            target_health: BTreeMap::new(),
        };
        let h = Holder {
            who: "me".into(),
            host: "h".into(),
            pid: 1,
            started: Timestamp(0),
        };
        let mut j = Journal::begin("r", h, RolloutSpec::new("ami-1"), &obs, None).unwrap();
        for n in 0..(HISTORY_LEN + 5) {
            j.push_history(HistoryEntry {
                rollout_id: format!("r{n}"),
                from_image: format!("ami-{n}"),
                from_launch_template_version: None,
                to_image: format!("ami-{}", n + 1),
                to_launch_template_version: None,
                started: Timestamp(0),
                ended: Timestamp(0),
                outcome: if n % 2 == 0 {
                    Outcome::Succeeded
                } else {
                    Outcome::RolledBack
                },
                reason: None,
            });
        }
        assert_eq!(j.history.len(), HISTORY_LEN);
        assert_eq!(j.history[0].rollout_id, "r5");
        // The last rollout (r24) succeeded: revert to what it came from.
        assert_eq!(j.previous_image(), Some("ami-24"));
    }
}
