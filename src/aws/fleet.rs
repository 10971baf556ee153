//! [`AwsFleet`]: the rollout engine's [`Fleet`] on the real AWS APIs (Auto Scaling,
//! EC2, ELBv2).
//!
//! An observation costs a constant number of calls whatever the group's size:
//! DescribeAutoScalingGroups (1), DescribeLaunchTemplateVersions for the version in
//! use (1), DescribeInstances in batches of up to 1000 ids, DescribeTargetHealth once
//! per target group. `now` is this machine's clock (see [`AwsFleet::observe`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use aws_sdk_autoscaling::types as asg_types;
use aws_sdk_ec2::types as ec2;
use aws_sdk_elasticloadbalancingv2::types::{TargetDescription, TargetHealthStateEnum};

use super::{Aws, AwsError};
use crate::rollout::engine::Fleet;
use crate::rollout::model::{
    Ec2State, GroupState, Instance, LaunchSource, Lifecycle, Observation, TargetHealth, Timestamp,
};
use crate::rollout::{Result, RolloutError};

/// ELBv2's answer to deregistering a target that is not registered in the group
/// (or no longer exists).
const NOT_REGISTERED: &str = "InvalidTarget";

/// DescribeInstances takes at most 1000 ids per call.
const DESCRIBE_BATCH: usize = 1000;

/// The launch template version description kiln writes; carries the rollout's
/// token so a re-run after a crash reuses the version instead of creating another.
fn version_description(token: &str, from_version: u64) -> String {
    format!("kiln rollout {token} (from version {from_version})")
}

pub struct AwsFleet {
    aws: Aws,
    asg: aws_sdk_autoscaling::Client,
    ec2: aws_sdk_ec2::Client,
    elb: aws_sdk_elasticloadbalancingv2::Client,
}

fn fleet_err(asg: &str, operation: &str, e: AwsError) -> RolloutError {
    RolloutError::Fleet {
        asg: asg.to_string(),
        operation: operation.to_string(),
        source: Box::new(e),
    }
}

impl AwsFleet {
    pub fn new(aws: &Aws) -> AwsFleet {
        AwsFleet {
            aws: aws.clone(),
            asg: aws.autoscaling(),
            ec2: aws.ec2(),
            elb: aws.elbv2(),
        }
    }

    fn region(&self) -> &str {
        self.aws.region()
    }

    /// Pin a group that follows `$Latest` or `$Default` (or names no version) to
    /// the number that resolves to now. Launches are unchanged, but the rollout
    /// must own the version: a group on `$Latest` would otherwise follow kiln's new
    /// version before any batch asked for it and look already pointed at it.
    /// Returns the selector and version when it pinned.
    pub async fn pin_version(&self, asg: &str) -> Result<Option<(String, u64)>> {
        let g = self.describe_group(asg).await?;
        let (spec, mixed) = match (g.launch_template(), g.mixed_instances_policy()) {
            (Some(s), _) => (s.clone(), false),
            (None, Some(p)) => match p
                .launch_template()
                .and_then(|t| t.launch_template_specification())
            {
                Some(s) => (s.clone(), true),
                None => return Ok(None),
            },
            _ => return Ok(None),
        };
        let selector = spec.version().unwrap_or("$Default").to_string();
        if selector.parse::<u64>().is_ok() {
            return Ok(None);
        }
        let v = self
            .describe_version(
                asg,
                spec.launch_template_id(),
                spec.launch_template_name(),
                &selector,
            )
            .await?;
        let number = v.version_number().unwrap_or(0).max(0) as u64;
        let id = v.launch_template_id().unwrap_or_default().to_string();
        self.point_asg(asg, &id, number, mixed).await?;
        Ok(Some((selector, number)))
    }

    async fn describe_group(&self, name: &str) -> Result<asg_types::AutoScalingGroup> {
        let out = self
            .asg
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(name)
            .send()
            .await
            .map_err(|e| {
                fleet_err(
                    name,
                    "DescribeAutoScalingGroups",
                    AwsError::call("autoscaling", "DescribeAutoScalingGroups", self.region(), e),
                )
            })?;
        out.auto_scaling_groups()
            .iter()
            .find(|g| g.auto_scaling_group_name() == Some(name))
            .cloned()
            .ok_or_else(|| RolloutError::GroupNotFound {
                asg: format!("{name} (region {})", self.region()),
            })
    }

    /// One launch template version by id or name and a version selector
    /// (`7`, `$Latest`, `$Default`).
    async fn describe_version(
        &self,
        asg: &str,
        id: Option<&str>,
        name: Option<&str>,
        version: &str,
    ) -> Result<ec2::LaunchTemplateVersion> {
        let out = self
            .ec2
            .describe_launch_template_versions()
            .set_launch_template_id(id.map(str::to_string))
            .set_launch_template_name(if id.is_none() {
                name.map(str::to_string)
            } else {
                None
            })
            .versions(version)
            .send()
            .await
            .map_err(|e| {
                fleet_err(
                    asg,
                    "DescribeLaunchTemplateVersions",
                    AwsError::call("ec2", "DescribeLaunchTemplateVersions", self.region(), e),
                )
            })?;
        out.launch_template_versions()
            .first()
            .cloned()
            .ok_or_else(|| RolloutError::Fleet {
                asg: asg.to_string(),
                operation: "DescribeLaunchTemplateVersions".into(),
                source: format!(
                    "launch template {} has no version {version}",
                    id.or(name).unwrap_or("?")
                )
                .into(),
            })
    }

    /// EC2 state, launch time and image of `ids`, in batches of 1000. Ids EC2 does
    /// not know yet (a launch is eventually consistent) are left out.
    async fn describe_instances(
        &self,
        asg: &str,
        ids: &[String],
    ) -> Result<BTreeMap<String, ec2::Instance>> {
        let mut out = BTreeMap::new();
        for chunk in ids.chunks(DESCRIBE_BATCH) {
            let mut ask: Vec<String> = chunk.to_vec();
            // At most one retry: the first answer names every unknown id.
            for attempt in 0..2 {
                if ask.is_empty() {
                    break;
                }
                match self
                    .ec2
                    .describe_instances()
                    .set_instance_ids(Some(ask.clone()))
                    .send()
                    .await
                {
                    Ok(page) => {
                        for r in page.reservations() {
                            for i in r.instances() {
                                if let Some(id) = i.instance_id() {
                                    out.insert(id.to_string(), i.clone());
                                }
                            }
                        }
                        break;
                    }
                    Err(e) => {
                        let e = AwsError::call("ec2", "DescribeInstances", self.region(), e);
                        if attempt == 0 && e.code() == Some("InvalidInstanceID.NotFound") {
                            let unknown = instance_ids_in(&e.to_string());
                            ask.retain(|id| !unknown.contains(id));
                            continue;
                        }
                        return Err(fleet_err(asg, "DescribeInstances", e));
                    }
                }
            }
        }
        Ok(out)
    }

    async fn deregister_targets(
        &self,
        tg: &str,
        targets: &[TargetDescription],
    ) -> std::result::Result<(), AwsError> {
        self.elb
            .deregister_targets()
            .target_group_arn(tg)
            .set_targets(Some(targets.to_vec()))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| {
                AwsError::call(
                    "elasticloadbalancing",
                    "DeregisterTargets",
                    self.region(),
                    e,
                )
            })
    }

    /// After a failed TerminateInstanceInAutoScalingGroup of `id`: whether the
    /// terminate has happened all the same (see [`is_gone`]). False when that
    /// cannot be read: the terminate's own error is then the one to report.
    async fn terminated_or_gone(&self, asg: &str, id: &str) -> bool {
        match self
            .asg
            .describe_auto_scaling_instances()
            .instance_ids(id)
            .send()
            .await
        {
            Ok(out) => is_gone(asg, id, out.auto_scaling_instances()),
            Err(e) => {
                let e = AwsError::call(
                    "autoscaling",
                    "DescribeAutoScalingInstances",
                    self.region(),
                    e,
                );
                tracing::warn!(asg, instance = id, error = %e, "could not re-read a failed terminate");
                false
            }
        }
    }

    async fn describe_target_health(
        &self,
        asg: &str,
        tg: &str,
    ) -> Result<BTreeMap<String, TargetHealth>> {
        let out = self
            .elb
            .describe_target_health()
            .target_group_arn(tg)
            .send()
            .await
            .map_err(|e| {
                fleet_err(
                    asg,
                    "DescribeTargetHealth",
                    AwsError::call(
                        "elasticloadbalancing",
                        "DescribeTargetHealth",
                        self.region(),
                        e,
                    ),
                )
            })?;
        Ok(out
            .target_health_descriptions()
            .iter()
            .filter_map(|d| {
                let id = d.target()?.id()?.to_string();
                let state = match d.target_health().and_then(|h| h.state()) {
                    Some(TargetHealthStateEnum::Initial) => TargetHealth::Initial,
                    Some(TargetHealthStateEnum::Healthy) => TargetHealth::Healthy,
                    Some(TargetHealthStateEnum::Unhealthy)
                    | Some(TargetHealthStateEnum::UnhealthyDraining) => TargetHealth::Unhealthy,
                    Some(TargetHealthStateEnum::Draining) => TargetHealth::Draining,
                    Some(TargetHealthStateEnum::Unused) => TargetHealth::Unused,
                    Some(TargetHealthStateEnum::Unavailable) => TargetHealth::Unavailable,
                    _ => TargetHealth::Initial,
                };
                Some((id, state))
            })
            .collect())
    }
}

/// Whether DescribeAutoScalingInstances (`found`) shows the terminate of `id` done:
/// the instance is terminating or terminated, or out of `asg` altogether.
fn is_gone(asg: &str, id: &str, found: &[asg_types::AutoScalingInstanceDetails]) -> bool {
    match found
        .iter()
        .find(|i| i.instance_id() == Some(id) && i.auto_scaling_group_name() == Some(asg))
    {
        None => true,
        Some(i) => i
            .lifecycle_state()
            .is_some_and(|s| s.starts_with("Terminat")),
    }
}

/// `i-…` ids named in an error message (InvalidInstanceID.NotFound lists them).
fn instance_ids_in(message: &str) -> BTreeSet<String> {
    message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("i-") && w.len() > 2)
        .map(str::to_string)
        .collect()
}

fn lifecycle(s: Option<&asg_types::LifecycleState>) -> Lifecycle {
    use asg_types::LifecycleState as L;
    match s {
        Some(L::Pending | L::PendingWait | L::PendingProceed) => Lifecycle::Pending,
        Some(L::InService) => Lifecycle::InService,
        Some(L::Standby | L::EnteringStandby | L::Quarantined) => Lifecycle::Standby,
        Some(L::Terminating | L::TerminatingWait | L::TerminatingProceed) => Lifecycle::Terminating,
        Some(L::Terminated) => Lifecycle::Terminated,
        Some(L::Detaching) => Lifecycle::Detaching,
        Some(L::Detached) => Lifecycle::Detached,
        _ => Lifecycle::Other,
    }
}

fn ec2_state(i: Option<&ec2::Instance>, lc: Lifecycle) -> Ec2State {
    use ec2::InstanceStateName as S;
    match i.and_then(|i| i.state()).and_then(|s| s.name()) {
        Some(S::Pending) => Ec2State::Pending,
        Some(S::Running) => Ec2State::Running,
        Some(S::ShuttingDown) => Ec2State::ShuttingDown,
        Some(S::Terminated) => Ec2State::Terminated,
        Some(S::Stopping) => Ec2State::Stopping,
        Some(S::Stopped) => Ec2State::Stopped,
        // Not visible in EC2 yet: as far as it goes, pending; a terminated
        // instance EC2 has forgotten is gone.
        _ if matches!(lc, Lifecycle::Terminated | Lifecycle::Terminating) => Ec2State::Terminated,
        _ => Ec2State::Pending,
    }
}

/// How far `now` is set back to absorb whole-second launch times and NTP-level
/// skew between this machine and AWS.
pub const CLOCK_SLACK: Duration = Duration::from_secs(1);

/// `t` truncated to the second and set back by [`CLOCK_SLACK`].
pub fn observation_time(t: SystemTime) -> Timestamp {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Timestamp(secs.saturating_sub(CLOCK_SLACK.as_secs()) * 1000)
}

/// Instances as ELBv2 targets (instance targets: the id alone, the group's port).
fn target_descriptions(instances: &[String]) -> Vec<TargetDescription> {
    instances
        .iter()
        .map(|id| TargetDescription::builder().id(id).build())
        .collect()
}

fn to_u32(v: Option<i32>) -> u32 {
    v.unwrap_or(0).max(0) as u32
}

impl Fleet for AwsFleet {
    /// `now` is this machine's clock, not the `Date` of an AWS answer (reading the
    /// header needs an interceptor per client). It is truncated to the second and
    /// set back by [`CLOCK_SLACK`]: EC2 reports launch times in whole seconds, and
    /// the engine tells the instances a batch launched by `launched_at >= the
    /// batch's start` (a start taken from `now`). Without this, an instance launched
    /// in the same second the batch began looked older than the batch, its warm-up
    /// was skipped and its health unwatched. Erring early only means an instance
    /// launched a moment before the batch is watched as if it were new.
    async fn observe(&self, asg: &str) -> Result<Observation> {
        let g = self.describe_group(asg).await?;
        let launch = if let Some(name) = g.launch_configuration_name() {
            LaunchSource::Configuration {
                name: name.to_string(),
            }
        } else {
            let (spec, mixed) = match (g.launch_template(), g.mixed_instances_policy()) {
                (Some(s), _) => (s.clone(), false),
                (None, Some(p)) => (
                    p.launch_template()
                        .and_then(|t| t.launch_template_specification())
                        .cloned()
                        .ok_or_else(|| {
                            RolloutError::Internal(format!(
                                "ASG {asg}: mixed-instances policy without a launch template"
                            ))
                        })?,
                    true,
                ),
                (None, None) => {
                    return Err(RolloutError::Internal(format!(
                        "ASG {asg} has neither a launch template nor a launch configuration"
                    )))
                }
            };
            // `$Latest`/`$Default` (or no version, which means `$Default`) are
            // resolved to a number: kiln's own new version would change them.
            let selector = spec.version().unwrap_or("$Default");
            let v = self
                .describe_version(
                    asg,
                    spec.launch_template_id(),
                    spec.launch_template_name(),
                    selector,
                )
                .await?;
            LaunchSource::Template {
                id: v.launch_template_id().unwrap_or_default().to_string(),
                version: v.version_number().unwrap_or(0).max(0) as u64,
                image_id: v
                    .launch_template_data()
                    .and_then(|d| d.image_id())
                    .unwrap_or_default()
                    .to_string(),
                mixed_instances_policy: mixed,
            }
        };

        let ids: Vec<String> = g
            .instances()
            .iter()
            .filter_map(|i| i.instance_id().map(str::to_string))
            .collect();
        let details = self.describe_instances(asg, &ids).await?;
        let now = observation_time(SystemTime::now());
        let instances = g
            .instances()
            .iter()
            .filter_map(|i| {
                let id = i.instance_id()?.to_string();
                let d = details.get(&id);
                let lc = lifecycle(i.lifecycle_state());
                Some(Instance {
                    az: i.availability_zone().unwrap_or_default().to_string(),
                    lifecycle: lc,
                    ec2_state: ec2_state(d, lc),
                    healthy: i
                        .health_status()
                        .is_some_and(|h| h.eq_ignore_ascii_case("Healthy")),
                    image_id: d
                        .and_then(|d| d.image_id())
                        .or(i.image_id())
                        .unwrap_or_default()
                        .to_string(),
                    launch_template_version: i
                        .launch_template()
                        .and_then(|t| t.version())
                        .and_then(|v| v.parse().ok()),
                    launched_at: d
                        .and_then(|d| d.launch_time())
                        .and_then(|t| SystemTime::try_from(*t).ok())
                        .map(Timestamp::from_system_time)
                        .unwrap_or(now),
                    protected_from_scale_in: i.protected_from_scale_in().unwrap_or(false),
                    id,
                })
            })
            .collect();

        let target_groups: Vec<String> = g.target_group_arns().to_vec();
        let mut target_health = BTreeMap::new();
        for tg in &target_groups {
            target_health.insert(tg.clone(), self.describe_target_health(asg, tg).await?);
        }

        Ok(Observation {
            now,
            group: GroupState {
                name: asg.to_string(),
                min: to_u32(g.min_size()),
                max: to_u32(g.max_size()),
                desired: to_u32(g.desired_capacity()),
                launch,
                suspended: g
                    .suspended_processes()
                    .iter()
                    .filter_map(|p| p.process_name().map(str::to_string))
                    .collect(),
                target_groups,
                health_check_grace: Duration::from_secs(
                    to_u32(g.health_check_grace_period()).into(),
                ),
            },
            instances,
            target_health,
        })
    }

    async fn suspend_processes(&self, asg: &str, processes: &[String]) -> Result<()> {
        // An empty list would mean every process to AWS.
        if processes.is_empty() {
            return Ok(());
        }
        self.asg
            .suspend_processes()
            .auto_scaling_group_name(asg)
            .set_scaling_processes(Some(processes.to_vec()))
            .send()
            .await
            .map_err(|e| AwsError::call("autoscaling", "SuspendProcesses", self.region(), e))
            .map_err(|e| fleet_err(asg, "SuspendProcesses", e))?;
        Ok(())
    }

    async fn resume_processes(&self, asg: &str, processes: &[String]) -> Result<()> {
        // An empty list would resume every process, including ones the operator
        // had suspended before the rollout.
        if processes.is_empty() {
            return Ok(());
        }
        self.asg
            .resume_processes()
            .auto_scaling_group_name(asg)
            .set_scaling_processes(Some(processes.to_vec()))
            .send()
            .await
            .map_err(|e| AwsError::call("autoscaling", "ResumeProcesses", self.region(), e))
            .map_err(|e| fleet_err(asg, "ResumeProcesses", e))?;
        Ok(())
    }

    async fn create_launch_template_version(
        &self,
        template_id: &str,
        from_version: u64,
        image_id: &str,
        token: &str,
    ) -> Result<u64> {
        let ctx = format!("launch template {template_id}");
        let description = version_description(token, from_version);
        // Reuse before create: a version carrying this rollout's token was made by
        // an earlier run that crashed before recording it.
        let mut pages = self
            .ec2
            .describe_launch_template_versions()
            .launch_template_id(template_id)
            .min_version((from_version + 1).to_string())
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page
                .map_err(|e| {
                    AwsError::call("ec2", "DescribeLaunchTemplateVersions", self.region(), e)
                })
                .map_err(|e| fleet_err(&ctx, "DescribeLaunchTemplateVersions", e))?;
            for v in page.launch_template_versions() {
                if v.version_description() == Some(description.as_str()) {
                    return Ok(v.version_number().unwrap_or(0).max(0) as u64);
                }
            }
        }

        let source = self
            .describe_version(&ctx, Some(template_id), None, &from_version.to_string())
            .await?;
        let data = source.launch_template_data().ok_or_else(|| {
            RolloutError::Internal(format!("{ctx} version {from_version} has no launch data"))
        })?;
        let request = copy_launch_data(data, image_id).map_err(|field| RolloutError::Fleet {
            asg: ctx.clone(),
            operation: "CreateLaunchTemplateVersion".into(),
            source: format!(
                "version {from_version} sets {field}, which kiln cannot copy into a new version yet; \
                 roll this group by hand or remove {field} from the template"
            )
            .into(),
        })?;
        let out = self
            .ec2
            .create_launch_template_version()
            .launch_template_id(template_id)
            .version_description(description)
            .client_token(client_token(token))
            .launch_template_data(request)
            .send()
            .await
            .map_err(|e| AwsError::call("ec2", "CreateLaunchTemplateVersion", self.region(), e))
            .map_err(|e| fleet_err(&ctx, "CreateLaunchTemplateVersion", e))?;
        out.launch_template_version()
            .and_then(|v| v.version_number())
            .map(|v| v.max(0) as u64)
            .ok_or_else(|| {
                RolloutError::Internal(format!(
                    "{ctx}: CreateLaunchTemplateVersion returned no version number"
                ))
            })
    }

    async fn point_asg(
        &self,
        asg: &str,
        template_id: &str,
        version: u64,
        mixed_instances_policy: bool,
    ) -> Result<()> {
        let spec = asg_types::LaunchTemplateSpecification::builder()
            .launch_template_id(template_id)
            .version(version.to_string())
            .build();
        let mut req = self
            .asg
            .update_auto_scaling_group()
            .auto_scaling_group_name(asg);
        req = if mixed_instances_policy {
            // A partial policy: AWS keeps the overrides and distribution as they are.
            req.mixed_instances_policy(
                asg_types::MixedInstancesPolicy::builder()
                    .launch_template(
                        asg_types::LaunchTemplate::builder()
                            .launch_template_specification(spec)
                            .build(),
                    )
                    .build(),
            )
        } else {
            req.launch_template(spec)
        };
        req.send()
            .await
            .map_err(|e| AwsError::call("autoscaling", "UpdateAutoScalingGroup", self.region(), e))
            .map_err(|e| fleet_err(asg, "UpdateAutoScalingGroup", e))?;
        Ok(())
    }

    async fn set_capacity(
        &self,
        asg: &str,
        min: Option<u32>,
        max: u32,
        desired: u32,
    ) -> Result<()> {
        self.asg
            .update_auto_scaling_group()
            .auto_scaling_group_name(asg)
            .set_min_size(min.map(|m| m as i32))
            .max_size(max as i32)
            .desired_capacity(desired as i32)
            .send()
            .await
            .map_err(|e| AwsError::call("autoscaling", "UpdateAutoScalingGroup", self.region(), e))
            .map_err(|e| fleet_err(asg, "UpdateAutoScalingGroup", e))?;
        Ok(())
    }

    async fn deregister(&self, target_groups: &[String], instances: &[String]) -> Result<()> {
        if instances.is_empty() {
            return Ok(());
        }
        let targets = target_descriptions(instances);
        for tg in target_groups {
            match self.deregister_targets(tg, &targets).await {
                Err(e) if e.code() == Some(NOT_REGISTERED) => {
                    // Some are not registered (any more): a retry of a call whose
                    // answer was lost, or a repeat after a crash. The whole call is
                    // refused (moto after deregistering the ones before the first
                    // unknown), so deregister one by one; not registered is done.
                    for t in &targets {
                        match self.deregister_targets(tg, std::slice::from_ref(t)).await {
                            Err(e) if e.code() != Some(NOT_REGISTERED) => {
                                return Err(fleet_err(tg, "DeregisterTargets", e))
                            }
                            _ => {}
                        }
                    }
                }
                Err(e) => return Err(fleet_err(tg, "DeregisterTargets", e)),
                Ok(()) => {}
            }
        }
        Ok(())
    }

    async fn register(&self, target_groups: &[String], instances: &[String]) -> Result<()> {
        if instances.is_empty() {
            return Ok(());
        }
        let targets = target_descriptions(instances);
        for tg in target_groups {
            self.elb
                .register_targets()
                .target_group_arn(tg)
                .set_targets(Some(targets.clone()))
                .send()
                .await
                .map_err(|e| {
                    AwsError::call("elasticloadbalancing", "RegisterTargets", self.region(), e)
                })
                .map_err(|e| fleet_err(tg, "RegisterTargets", e))?;
        }
        Ok(())
    }

    async fn terminate(
        &self,
        asg: &str,
        instances: &[String],
        decrement_desired: bool,
    ) -> Result<()> {
        for id in instances {
            let r = self
                .asg
                .terminate_instance_in_auto_scaling_group()
                .instance_id(id)
                .should_decrement_desired_capacity(decrement_desired)
                .send()
                .await;
            if let Err(e) = r {
                let e = AwsError::call(
                    "autoscaling",
                    "TerminateInstanceInAutoScalingGroup",
                    self.region(),
                    e,
                );
                // The call may have worked even though it failed: a repeat after a
                // crash, or a retry by the SDK of a call whose answer was lost, finds
                // the instance already terminating or gone (AWS: ValidationError;
                // moto: HTTP 500). Ask the group rather than read the error.
                if self.terminated_or_gone(asg, id).await {
                    continue;
                }
                return Err(fleet_err(
                    asg,
                    &format!("TerminateInstanceInAutoScalingGroup {id}"),
                    e,
                ));
            }
        }
        Ok(())
    }
}

/// EC2 client tokens are at most 64 ASCII characters.
fn client_token(token: &str) -> String {
    use sha2::{Digest, Sha256};
    if token.len() <= 64 && token.is_ascii() {
        token.to_string()
    } else {
        hex::encode(&Sha256::digest(token.as_bytes())[..24])
    }
}

/// The launch data of a version, as the request that recreates it with only the
/// image changed. Every field is copied explicitly: on AWS a new version inherits
/// nothing unless asked (`SourceVersion`), and moto ignores `SourceVersion`, so an
/// explicit copy is the one way both end identical. A field kiln does not know how
/// to copy is an error naming it (`Err(field)`), never silently dropped.
pub fn copy_launch_data(
    d: &ec2::ResponseLaunchTemplateData,
    image_id: &str,
) -> std::result::Result<ec2::RequestLaunchTemplateData, &'static str> {
    use ec2::*;
    // Rare fields whose request shapes differ deeply from their response shapes.
    if !d.elastic_gpu_specifications().is_empty() {
        return Err("ElasticGpuSpecifications");
    }
    if !d.elastic_inference_accelerators().is_empty() {
        return Err("ElasticInferenceAccelerators");
    }
    if d.instance_requirements().is_some() {
        return Err("InstanceRequirements");
    }
    if d.capacity_reservation_specification()
        .and_then(|c| c.capacity_reservation_target())
        .is_some()
    {
        return Err("CapacityReservationSpecification.CapacityReservationTarget");
    }
    if d.cpu_options()
        .is_some_and(|c| c.amd_sev_snp().is_some() || c.nested_virtualization().is_some())
    {
        return Err("CpuOptions.AmdSevSnp");
    }
    if !d.secondary_interfaces().is_empty() {
        return Err("SecondaryInterfaces");
    }
    for ni in d.network_interfaces() {
        if !ni.ipv6_addresses().is_empty()
            || !ni.private_ip_addresses().is_empty()
            || !ni.ipv4_prefixes().is_empty()
            || !ni.ipv6_prefixes().is_empty()
            || ni.ena_srd_specification().is_some()
            || ni.connection_tracking_specification().is_some()
        {
            return Err(
                "NetworkInterfaces (addresses, prefixes, ENA Express or connection tracking)",
            );
        }
    }

    let b = RequestLaunchTemplateData::builder()
        .set_kernel_id(d.kernel_id().map(str::to_string))
        .set_ebs_optimized(d.ebs_optimized())
        .set_iam_instance_profile(d.iam_instance_profile().map(|p| {
            LaunchTemplateIamInstanceProfileSpecificationRequest::builder()
                .set_arn(p.arn().map(str::to_string))
                .set_name(p.name().map(str::to_string))
                .build()
        }))
        .set_block_device_mappings(opt_vec(d.block_device_mappings(), |m| {
            LaunchTemplateBlockDeviceMappingRequest::builder()
                .set_device_name(m.device_name().map(str::to_string))
                .set_virtual_name(m.virtual_name().map(str::to_string))
                .set_no_device(m.no_device().map(str::to_string))
                .set_ebs(m.ebs().map(|e| {
                    LaunchTemplateEbsBlockDeviceRequest::builder()
                        .set_encrypted(e.encrypted())
                        .set_delete_on_termination(e.delete_on_termination())
                        .set_iops(e.iops())
                        .set_kms_key_id(e.kms_key_id().map(str::to_string))
                        .set_snapshot_id(e.snapshot_id().map(str::to_string))
                        .set_volume_size(e.volume_size())
                        .set_volume_type(e.volume_type().cloned())
                        .set_throughput(e.throughput())
                        .set_volume_initialization_rate(e.volume_initialization_rate())
                        .set_ebs_card_index(e.ebs_card_index())
                        .build()
                }))
                .build()
        }))
        .set_network_interfaces(opt_vec(d.network_interfaces(), |n| {
            LaunchTemplateInstanceNetworkInterfaceSpecificationRequest::builder()
                .set_associate_carrier_ip_address(n.associate_carrier_ip_address())
                .set_associate_public_ip_address(n.associate_public_ip_address())
                .set_delete_on_termination(n.delete_on_termination())
                .set_description(n.description().map(str::to_string))
                .set_device_index(n.device_index())
                .set_groups(opt_vec(n.groups(), |g| g.clone()))
                .set_interface_type(n.interface_type().map(str::to_string))
                .set_ipv6_address_count(n.ipv6_address_count())
                .set_network_interface_id(n.network_interface_id().map(str::to_string))
                .set_private_ip_address(n.private_ip_address().map(str::to_string))
                .set_secondary_private_ip_address_count(n.secondary_private_ip_address_count())
                .set_subnet_id(n.subnet_id().map(str::to_string))
                .set_network_card_index(n.network_card_index())
                .set_ipv4_prefix_count(n.ipv4_prefix_count())
                .set_ipv6_prefix_count(n.ipv6_prefix_count())
                .set_primary_ipv6(n.primary_ipv6())
                .set_ena_queue_count(n.ena_queue_count())
                .build()
        }))
        .image_id(image_id)
        .set_instance_type(d.instance_type().cloned())
        .set_key_name(d.key_name().map(str::to_string))
        .set_monitoring(d.monitoring().map(|m| {
            LaunchTemplatesMonitoringRequest::builder()
                .set_enabled(m.enabled())
                .build()
        }))
        .set_placement(d.placement().map(|p| {
            LaunchTemplatePlacementRequest::builder()
                .set_availability_zone(p.availability_zone().map(str::to_string))
                .set_availability_zone_id(p.availability_zone_id().map(str::to_string))
                .set_affinity(p.affinity().map(str::to_string))
                .set_group_name(p.group_name().map(str::to_string))
                .set_host_id(p.host_id().map(str::to_string))
                .set_tenancy(p.tenancy().cloned())
                .set_spread_domain(p.spread_domain().map(str::to_string))
                .set_host_resource_group_arn(p.host_resource_group_arn().map(str::to_string))
                .set_partition_number(p.partition_number())
                .set_group_id(p.group_id().map(str::to_string))
                .build()
        }))
        .set_ram_disk_id(d.ram_disk_id().map(str::to_string))
        .set_disable_api_termination(d.disable_api_termination())
        .set_instance_initiated_shutdown_behavior(d.instance_initiated_shutdown_behavior().cloned())
        .set_user_data(d.user_data().map(str::to_string))
        .set_tag_specifications(opt_vec(d.tag_specifications(), |t| {
            LaunchTemplateTagSpecificationRequest::builder()
                .set_resource_type(t.resource_type().cloned())
                .set_tags(opt_vec(t.tags(), |t| t.clone()))
                .build()
        }))
        .set_security_group_ids(opt_vec(d.security_group_ids(), |s| s.clone()))
        .set_security_groups(opt_vec(d.security_groups(), |s| s.clone()))
        .set_instance_market_options(d.instance_market_options().map(|m| {
            LaunchTemplateInstanceMarketOptionsRequest::builder()
                .set_market_type(m.market_type().cloned())
                .set_spot_options(m.spot_options().map(|s| {
                    LaunchTemplateSpotMarketOptionsRequest::builder()
                        .set_max_price(s.max_price().map(str::to_string))
                        .set_spot_instance_type(s.spot_instance_type().cloned())
                        .set_block_duration_minutes(s.block_duration_minutes())
                        .set_valid_until(s.valid_until().cloned())
                        .set_instance_interruption_behavior(
                            s.instance_interruption_behavior().cloned(),
                        )
                        .build()
                }))
                .build()
        }))
        .set_credit_specification(d.credit_specification().map(|c| {
            CreditSpecificationRequest::builder()
                .set_cpu_credits(c.cpu_credits().map(str::to_string))
                .build()
        }))
        .set_cpu_options(d.cpu_options().map(|c| {
            LaunchTemplateCpuOptionsRequest::builder()
                .set_core_count(c.core_count())
                .set_threads_per_core(c.threads_per_core())
                .build()
        }))
        .set_capacity_reservation_specification(d.capacity_reservation_specification().map(|c| {
            LaunchTemplateCapacityReservationSpecificationRequest::builder()
                .set_capacity_reservation_preference(c.capacity_reservation_preference().cloned())
                .build()
        }))
        .set_license_specifications(opt_vec(d.license_specifications(), |l| {
            LaunchTemplateLicenseConfigurationRequest::builder()
                .set_license_configuration_arn(l.license_configuration_arn().map(str::to_string))
                .build()
        }))
        .set_hibernation_options(d.hibernation_options().map(|h| {
            LaunchTemplateHibernationOptionsRequest::builder()
                .set_configured(h.configured())
                .build()
        }))
        .set_metadata_options(d.metadata_options().map(|m| {
            LaunchTemplateInstanceMetadataOptionsRequest::builder()
                .set_http_tokens(m.http_tokens().cloned())
                .set_http_put_response_hop_limit(m.http_put_response_hop_limit())
                .set_http_endpoint(m.http_endpoint().cloned())
                .set_http_protocol_ipv6(m.http_protocol_ipv6().cloned())
                .set_instance_metadata_tags(m.instance_metadata_tags().cloned())
                .build()
        }))
        .set_enclave_options(d.enclave_options().map(|e| {
            LaunchTemplateEnclaveOptionsRequest::builder()
                .set_enabled(e.enabled())
                .build()
        }))
        .set_private_dns_name_options(d.private_dns_name_options().map(|p| {
            LaunchTemplatePrivateDnsNameOptionsRequest::builder()
                .set_hostname_type(p.hostname_type().cloned())
                .set_enable_resource_name_dns_a_record(p.enable_resource_name_dns_a_record())
                .set_enable_resource_name_dns_aaaa_record(p.enable_resource_name_dns_aaaa_record())
                .build()
        }))
        .set_maintenance_options(d.maintenance_options().map(|m| {
            LaunchTemplateInstanceMaintenanceOptionsRequest::builder()
                .set_auto_recovery(m.auto_recovery().cloned())
                .build()
        }))
        .set_disable_api_stop(d.disable_api_stop())
        .set_operator(d.operator().map(|o| {
            OperatorRequest::builder()
                .set_principal(o.principal().map(str::to_string))
                .build()
        }))
        .set_network_performance_options(d.network_performance_options().map(|n| {
            LaunchTemplateNetworkPerformanceOptionsRequest::builder()
                .set_bandwidth_weighting(n.bandwidth_weighting().cloned())
                .build()
        }));
    Ok(b.build())
}

/// `None` for an empty list, so an absent field stays absent in the copy.
fn opt_vec<T, U>(v: &[T], f: impl FnMut(&T) -> U) -> Option<Vec<U>> {
    (!v.is_empty()).then(|| v.iter().map(f).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_launched_in_the_batch_second_is_not_older_than_the_batch() {
        // The batch starts at 12.700 s; EC2 reports an instance launched at 12.900 s
        // as 12 s. It must still count as launched during the batch.
        let batch_start = observation_time(std::time::UNIX_EPOCH + Duration::from_millis(12_700));
        let ec2_launch_time = Timestamp(12_000);
        assert!(ec2_launch_time >= batch_start);
        // And the slack stays small against warm-up and deadline spans.
        assert!(batch_start.0 >= 12_000 - CLOCK_SLACK.as_millis() as u64);
    }

    #[test]
    fn a_terminate_counts_as_done_once_the_group_lets_the_instance_go() {
        let detail = |group: &str, state: &str| {
            asg_types::AutoScalingInstanceDetails::builder()
                .instance_id("i-1")
                .auto_scaling_group_name(group)
                .lifecycle_state(state)
                .build()
        };
        for state in ["Terminating", "Terminating:Wait", "Terminated"] {
            assert!(is_gone("web", "i-1", &[detail("web", state)]), "{state}");
        }
        // Not in any group, or moved to another one: out of this group.
        assert!(is_gone("web", "i-1", &[]));
        assert!(is_gone("web", "i-1", &[detail("other", "InService")]));
        // Still serving: the terminate really failed.
        for state in ["InService", "Pending", "Standby"] {
            assert!(!is_gone("web", "i-1", &[detail("web", state)]), "{state}");
        }
    }

    #[test]
    fn unknown_ids_are_read_from_the_error_message() {
        let ids = instance_ids_in(
            "ec2:DescribeInstances in us-east-1: InvalidInstanceID.NotFound: The instance IDs 'i-0abc, i-0def' do not exist",
        );
        assert_eq!(
            ids,
            BTreeSet::from(["i-0abc".to_string(), "i-0def".to_string()])
        );
    }

    #[test]
    fn copy_changes_only_the_image() {
        use ec2::*;
        let d = ResponseLaunchTemplateData::builder()
            .image_id("ami-old")
            .instance_type(InstanceType::T3Micro)
            .user_data("IyEvYmluL3NoCg==")
            .security_group_ids("sg-1")
            .metadata_options(
                LaunchTemplateInstanceMetadataOptions::builder()
                    .http_tokens(LaunchTemplateHttpTokensState::Required)
                    .build(),
            )
            .block_device_mappings(
                LaunchTemplateBlockDeviceMapping::builder()
                    .device_name("/dev/sda1")
                    .ebs(
                        LaunchTemplateEbsBlockDevice::builder()
                            .volume_size(20)
                            .build(),
                    )
                    .build(),
            )
            .build();
        let r = copy_launch_data(&d, "ami-new").unwrap();
        assert_eq!(r.image_id(), Some("ami-new"));
        assert_eq!(r.instance_type(), Some(&InstanceType::T3Micro));
        assert_eq!(r.user_data(), Some("IyEvYmluL3NoCg=="));
        assert_eq!(r.security_group_ids(), ["sg-1".to_string()]);
        assert_eq!(
            r.metadata_options().and_then(|m| m.http_tokens()),
            Some(&LaunchTemplateHttpTokensState::Required)
        );
        assert_eq!(
            r.block_device_mappings()[0]
                .ebs()
                .and_then(|e| e.volume_size()),
            Some(20)
        );
        assert!(r.network_interfaces().is_empty());
    }

    #[test]
    fn an_uncopyable_field_is_named() {
        let d = ec2::ResponseLaunchTemplateData::builder()
            .instance_requirements(ec2::InstanceRequirements::builder().build())
            .build();
        assert_eq!(
            copy_launch_data(&d, "ami-x").unwrap_err(),
            "InstanceRequirements"
        );
    }
}
