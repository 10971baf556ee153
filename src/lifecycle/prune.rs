//! `kiln prune`: which versions of an image may go, and removing them.
//!
//! Three parts, so the part that decides is a pure function tested without AWS:
//! [`gather`] observes, per region, everything that may still need an image
//! (instances, launch templates, launch configurations, channels, rollout
//! history) into [`Protections`]; [`decide`] turns versions + protections + the
//! policy into a [`Plan`]; [`execute`] deregisters and deletes snapshots.
//!
//! The unit is the version, not the regional AMI: a version protected in one
//! region is kept in every region, so a version is either everywhere it was
//! copied or gone, and `kiln rollout` in any region never meets a half-pruned
//! version.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use aws_sdk_ec2::types::Filter;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use futures::StreamExt;
use serde::Serialize;

use crate::aws::{Aws, AwsError};
use crate::registry::{channel, ImageVersion};

use super::history;

/// Parallel calls per fan-out (regions, launch templates, deletions).
const PARALLELISM: usize = 4;
/// Values per DescribeInstances `image-id` filter (AWS allows 200).
const FILTER_VALUES: usize = 200;

/// Why an image is kept.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Reason {
    /// Among the newest `keep` versions.
    Newest { rank: usize, keep: usize },
    /// Created less than `--older-than` ago.
    TooYoung { created: String, older_than: String },
    /// Its creation time cannot be read, so its age is unknown.
    UnknownAge { created: String },
    /// Not `available` (a bake or copy may still be making it).
    NotAvailable {
        region: String,
        ami: String,
        state: String,
    },
    /// An instance in any state but terminated uses it.
    Instance {
        region: String,
        ami: String,
        instance: String,
        state: String,
    },
    /// A version of a launch template names it (directly, or through a
    /// `resolve:ssm:` parameter).
    LaunchTemplate {
        region: String,
        ami: String,
        template: String,
        name: String,
        version: i64,
        is_default: bool,
        is_latest: bool,
    },
    /// A (legacy) launch configuration names it.
    LaunchConfiguration {
        region: String,
        ami: String,
        name: String,
    },
    /// A promotion channel points at it.
    Channel {
        region: String,
        ami: String,
        parameter: String,
    },
    /// A rollout history entry mentions it (an ASG may be reverted to it).
    RolloutHistory {
        region: String,
        ami: String,
        parameter: String,
    },
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Newest { rank, keep } => write!(f, "newest {keep} (#{rank})"),
            Reason::TooYoung {
                created,
                older_than,
            } => write!(f, "created {created}, less than {older_than} ago"),
            Reason::UnknownAge { created } => write!(f, "creation time {created:?} unreadable"),
            Reason::NotAvailable { region, ami, state } => {
                write!(f, "{ami} is {state} in {region}")
            }
            Reason::Instance {
                region,
                ami,
                instance,
                state,
            } => write!(f, "{ami} used by instance {instance} ({state}) in {region}"),
            Reason::LaunchTemplate {
                region,
                ami,
                name,
                version,
                is_default,
                is_latest,
                ..
            } => {
                let mut marks = Vec::new();
                if *is_default {
                    marks.push("$Default");
                }
                if *is_latest {
                    marks.push("$Latest");
                }
                let marks = if marks.is_empty() {
                    String::new()
                } else {
                    format!(" = {}", marks.join(", "))
                };
                write!(
                    f,
                    "{ami} in launch template {name} version {version}{marks} in {region}"
                )
            }
            Reason::LaunchConfiguration { region, ami, name } => {
                write!(f, "{ami} in launch configuration {name} in {region}")
            }
            Reason::Channel {
                region,
                ami,
                parameter,
            } => write!(f, "{ami} on channel {parameter} in {region}"),
            Reason::RolloutHistory {
                region,
                ami,
                parameter,
            } => write!(f, "{ami} in rollout history {parameter} in {region}"),
        }
    }
}

/// AMI id → every reason found to keep it, from every region observed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Protections {
    by_ami: BTreeMap<String, BTreeSet<Reason>>,
}

impl Protections {
    pub fn add(&mut self, ami: &str, reason: Reason) {
        self.by_ami
            .entry(ami.to_string())
            .or_default()
            .insert(reason);
    }

    pub fn of(&self, ami: &str) -> impl Iterator<Item = &Reason> {
        self.by_ami.get(ami).into_iter().flatten()
    }

    pub fn merge(&mut self, other: Protections) {
        for (ami, reasons) in other.by_ami {
            self.by_ami.entry(ami).or_default().extend(reasons);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_ami.is_empty()
    }
}

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Always keep this many newest versions (at least 1).
    pub keep: usize,
    /// Only versions older than this may go.
    pub older_than: Option<Duration>,
    pub now: SystemTime,
}

#[derive(Debug, Clone, Serialize)]
pub struct Kept {
    pub version: u64,
    /// region → AMI id
    pub amis: BTreeMap<String, String>,
    pub reasons: Vec<Reason>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Doomed {
    pub version: u64,
    pub created: String,
    /// region → AMI id and its snapshots
    pub amis: BTreeMap<String, Target>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    pub ami: String,
    pub snapshots: Vec<String>,
}

/// The decision: every version either goes or is kept with its reasons.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub delete: Vec<Doomed>,
    #[serde(rename = "kept")]
    pub keep: Vec<Kept>,
}

/// Pure: which versions go. `versions` are one image's, any order.
pub fn decide(versions: &[ImageVersion], protections: &Protections, policy: &Policy) -> Plan {
    let mut sorted: Vec<&ImageVersion> = versions.iter().collect();
    sorted.sort_by_key(|v| std::cmp::Reverse(v.version));
    let keep_newest = policy.keep.max(1);
    let mut plan = Plan {
        delete: Vec::new(),
        keep: Vec::new(),
    };
    for (i, v) in sorted.into_iter().enumerate() {
        let mut reasons: BTreeSet<Reason> = BTreeSet::new();
        if i < keep_newest {
            reasons.insert(Reason::Newest {
                rank: i + 1,
                keep: keep_newest,
            });
        }
        if let Some(min_age) = policy.older_than {
            match parse_time(&v.created) {
                Some(created) => {
                    let age = policy.now.duration_since(created).unwrap_or_default();
                    if age < min_age {
                        reasons.insert(Reason::TooYoung {
                            created: v.created.clone(),
                            older_than: humantime::format_duration(min_age).to_string(),
                        });
                    }
                }
                None => {
                    reasons.insert(Reason::UnknownAge {
                        created: v.created.clone(),
                    });
                }
            }
        }
        for a in v.amis.values() {
            // `failed` images are safe to remove; anything else not yet
            // available may still be finishing.
            if !a.is_available() && a.state != "failed" {
                reasons.insert(Reason::NotAvailable {
                    region: a.region.clone(),
                    ami: a.id.clone(),
                    state: a.state.clone(),
                });
            }
            reasons.extend(protections.of(&a.id).cloned());
        }
        if reasons.is_empty() {
            plan.delete.push(Doomed {
                version: v.version,
                created: v.created.clone(),
                amis: v
                    .amis
                    .iter()
                    .map(|(r, a)| {
                        (
                            r.clone(),
                            Target {
                                ami: a.id.clone(),
                                snapshots: a.snapshots.clone(),
                            },
                        )
                    })
                    .collect(),
            });
        } else {
            plan.keep.push(Kept {
                version: v.version,
                amis: v
                    .amis
                    .iter()
                    .map(|(r, a)| (r.clone(), a.id.clone()))
                    .collect(),
                reasons: reasons.into_iter().collect(),
            });
        }
    }
    plan
}

fn parse_time(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s.trim_end_matches('Z'))
        .ok()
        .or_else(|| humantime::parse_rfc3339(s).ok())
}

/// Observes, in `aws`'s region, everything that still needs one of `amis`
/// (this region's AMI ids of the image being pruned). Every listing is
/// paginated; any failed call fails the whole gathering, so prune never
/// deletes on a partial view.
pub async fn gather(aws: &Aws, amis: &[String]) -> Result<Protections, AwsError> {
    let (instances, templates, configs, channels, history) = futures::join!(
        instances_using(aws, amis),
        launch_template_images(aws),
        launch_configuration_images(aws),
        channel::all_current(aws),
        history::images_in_rollout_history(aws),
    );
    let mut p = Protections::default();
    let region = aws.region().to_string();
    for r in instances?.into_iter().chain(templates?).chain(configs?) {
        let ami = reason_ami(&r).to_string();
        p.add(&ami, r);
    }
    for (parameter, ami) in channels? {
        p.add(
            &ami,
            Reason::Channel {
                region: region.clone(),
                ami: ami.clone(),
                parameter,
            },
        );
    }
    for (ami, parameters) in history? {
        for parameter in parameters {
            p.add(
                &ami,
                Reason::RolloutHistory {
                    region: region.clone(),
                    ami: ami.clone(),
                    parameter,
                },
            );
        }
    }
    Ok(p)
}

fn reason_ami(r: &Reason) -> &str {
    match r {
        Reason::Instance { ami, .. }
        | Reason::LaunchTemplate { ami, .. }
        | Reason::LaunchConfiguration { ami, .. }
        | Reason::Channel { ami, .. }
        | Reason::RolloutHistory { ami, .. }
        | Reason::NotAvailable { ami, .. } => ami,
        Reason::Newest { .. } | Reason::TooYoung { .. } | Reason::UnknownAge { .. } => "",
    }
}

/// Instances in any state but terminated whose image is one of `amis`.
async fn instances_using(aws: &Aws, amis: &[String]) -> Result<Vec<Reason>, AwsError> {
    let mut out = Vec::new();
    for chunk in amis.chunks(FILTER_VALUES) {
        let mut pages = aws
            .ec2()
            .describe_instances()
            .filters(
                Filter::builder()
                    .name("image-id")
                    .set_values(Some(chunk.to_vec()))
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .set_values(Some(
                        ["pending", "running", "shutting-down", "stopping", "stopped"]
                            .map(String::from)
                            .to_vec(),
                    ))
                    .build(),
            )
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page =
                page.map_err(|e| AwsError::call("ec2", "DescribeInstances", aws.region(), e))?;
            for i in page.reservations().iter().flat_map(|r| r.instances()) {
                let state = i
                    .state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_string())
                    .unwrap_or_default();
                if state == "terminated" {
                    continue;
                }
                if let (Some(ami), Some(id)) = (i.image_id(), i.instance_id()) {
                    out.push(Reason::Instance {
                        region: aws.region().to_string(),
                        ami: ami.to_string(),
                        instance: id.to_string(),
                        state,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// One launch template and the version numbers its `$Default`/`$Latest` mean.
#[derive(Debug, Clone)]
pub struct TemplateRef {
    pub id: String,
    pub name: String,
    pub default_version: i64,
    pub latest_version: i64,
}

/// Every launch template in the region (paginated).
pub async fn launch_templates(aws: &Aws) -> Result<Vec<TemplateRef>, AwsError> {
    let mut out = Vec::new();
    let mut pages = aws
        .ec2()
        .describe_launch_templates()
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page =
            page.map_err(|e| AwsError::call("ec2", "DescribeLaunchTemplates", aws.region(), e))?;
        for t in page.launch_templates() {
            out.push(TemplateRef {
                id: t.launch_template_id().unwrap_or_default().to_string(),
                name: t.launch_template_name().unwrap_or_default().to_string(),
                default_version: t.default_version_number().unwrap_or_default(),
                latest_version: t.latest_version_number().unwrap_or_default(),
            });
        }
    }
    Ok(out)
}

/// The image of every version of every launch template. Every version counts,
/// not just `$Default`/`$Latest`: an ASG, a mixed-instances override or a
/// revert may name any version number, so scanning them all covers the
/// overrides' templates too.
async fn launch_template_images(aws: &Aws) -> Result<Vec<Reason>, AwsError> {
    let templates = launch_templates(aws).await?;
    let per_template: Vec<Result<Vec<Reason>, AwsError>> =
        futures::stream::iter(templates.into_iter().map(|t| async move {
            let mut out = Vec::new();
            for (version, image) in template_versions(aws, &t.id).await? {
                let Some(image) = image else { continue };
                let ami = resolve_image_id(aws, &image).await?;
                out.push(Reason::LaunchTemplate {
                    region: aws.region().to_string(),
                    ami,
                    template: t.id.clone(),
                    name: t.name.clone(),
                    version,
                    is_default: version == t.default_version,
                    is_latest: version == t.latest_version,
                });
            }
            Ok(out)
        }))
        .buffer_unordered(PARALLELISM)
        .collect()
        .await;
    let mut out = Vec::new();
    for r in per_template {
        out.extend(r?);
    }
    Ok(out)
}

/// (version number, image id as written) of every version of one template.
pub async fn template_versions(
    aws: &Aws,
    template_id: &str,
) -> Result<Vec<(i64, Option<String>)>, AwsError> {
    let mut out = Vec::new();
    let mut pages = aws
        .ec2()
        .describe_launch_template_versions()
        .launch_template_id(template_id)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| {
            AwsError::call("ec2", "DescribeLaunchTemplateVersions", aws.region(), e)
        })?;
        for v in page.launch_template_versions() {
            out.push((
                v.version_number().unwrap_or_default(),
                v.launch_template_data()
                    .and_then(|d| d.image_id())
                    .map(str::to_string),
            ));
        }
    }
    Ok(out)
}

/// A launch template's image may be `resolve:ssm:<parameter>`; the AMI is the
/// parameter's current value. A parameter that no longer exists resolves to
/// the reference itself, which protects nothing and deletes nothing.
pub async fn resolve_image_id(aws: &Aws, image: &str) -> Result<String, AwsError> {
    let Some(param) = image.strip_prefix("resolve:ssm:") else {
        return Ok(image.to_string());
    };
    match aws.ssm().get_parameter().name(param).send().await {
        Ok(out) => Ok(out
            .parameter()
            .and_then(|p| p.value())
            .unwrap_or(image)
            .to_string()),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_parameter_not_found()) =>
        {
            Ok(image.to_string())
        }
        Err(e) => Err(AwsError::call("ssm", "GetParameter", aws.region(), e)),
    }
}

async fn launch_configuration_images(aws: &Aws) -> Result<Vec<Reason>, AwsError> {
    let mut out = Vec::new();
    let mut pages = aws
        .autoscaling()
        .describe_launch_configurations()
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| {
            AwsError::call(
                "autoscaling",
                "DescribeLaunchConfigurations",
                aws.region(),
                e,
            )
        })?;
        for c in page.launch_configurations() {
            if let (Some(ami), Some(name)) = (c.image_id(), c.launch_configuration_name()) {
                out.push(Reason::LaunchConfiguration {
                    region: aws.region().to_string(),
                    ami: ami.to_string(),
                    name: name.to_string(),
                });
            }
        }
    }
    Ok(out)
}

/// What happened to one regional AMI.
#[derive(Debug, Clone, Serialize)]
pub struct Removal {
    pub version: u64,
    pub region: String,
    pub ami: String,
    pub deregistered: bool,
    pub snapshots_deleted: Vec<String>,
    /// Set when something failed; the rest of the prune went on.
    pub error: Option<String>,
}

/// Deregisters every AMI of the plan and deletes its snapshots, all regions,
/// `PARALLELISM` at a time. Each failure is recorded and the others go on.
/// Already-gone images and snapshots count as removed (a re-run after a crash
/// finishes the job).
pub async fn execute(aws: &Aws, plan: &Plan) -> Vec<Removal> {
    let jobs: Vec<(u64, String, Target)> = plan
        .delete
        .iter()
        .flat_map(|d| {
            d.amis
                .iter()
                .map(move |(r, t)| (d.version, r.clone(), t.clone()))
        })
        .collect();
    let mut out: Vec<Removal> = futures::stream::iter(jobs.into_iter().map(
        |(version, region, target)| async move {
            remove(&aws.in_region(&region), version, &target).await
        },
    ))
    .buffer_unordered(PARALLELISM)
    .collect()
    .await;
    out.sort_by(|a, b| (b.version, &a.region).cmp(&(a.version, &b.region)));
    out
}

async fn remove(aws: &Aws, version: u64, target: &Target) -> Removal {
    let mut r = Removal {
        version,
        region: aws.region().to_string(),
        ami: target.ami.clone(),
        deregistered: false,
        snapshots_deleted: Vec::new(),
        error: None,
    };
    match aws
        .ec2()
        .deregister_image()
        .image_id(&target.ami)
        .send()
        .await
    {
        Ok(_) => r.deregistered = true,
        Err(e)
            if matches!(
                e.code(),
                Some("InvalidAMIID.NotFound" | "InvalidAMIID.Unavailable")
            ) =>
        {
            r.deregistered = true
        }
        Err(e) => {
            // Snapshots of a registered image cannot be deleted; stop here.
            r.error = Some(AwsError::call("ec2", "DeregisterImage", aws.region(), e).to_string());
            return r;
        }
    }
    let mut errors = Vec::new();
    for s in &target.snapshots {
        match aws.ec2().delete_snapshot().snapshot_id(s).send().await {
            Ok(_) => r.snapshots_deleted.push(s.clone()),
            Err(e) if e.code() == Some("InvalidSnapshot.NotFound") => {
                r.snapshots_deleted.push(s.clone())
            }
            Err(e) => {
                errors.push(AwsError::call("ec2", "DeleteSnapshot", aws.region(), e).to_string())
            }
        }
    }
    if !errors.is_empty() {
        r.error = Some(errors.join("; "));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Ami;

    const EAST: &str = "us-east-1";
    const WEST: &str = "eu-west-1";

    fn ami_id(region: &str, v: u64) -> String {
        let r = if region == EAST { 1 } else { 2 };
        format!("ami-{r:02}{v:015x}")
    }

    fn ami(region: &str, v: u64, state: &str) -> Ami {
        Ami {
            region: region.into(),
            id: ami_id(region, v),
            name: format!("kiln-web-{v}"),
            state: state.into(),
            image: "web".into(),
            version: Some(v),
            hash: format!("{v:064x}"),
            base_ami: "ami-0f6b3c9d25e4a5c33".into(),
            java: "1.8.0_422".into(),
            ready: true,
            created: format!("2024-01-{v:02}T00:00:00.000Z"),
            snapshots: vec![format!("snap-{v:017x}")],
            run_id: String::new(),
        }
    }

    fn twelve() -> Vec<ImageVersion> {
        let mut amis = Vec::new();
        for v in 1..=12 {
            amis.push(ami(EAST, v, "available"));
            amis.push(ami(WEST, v, "available"));
        }
        ImageVersion::from_amis(amis)
    }

    fn policy(keep: usize) -> Policy {
        Policy {
            keep,
            older_than: None,
            now: SystemTime::now(),
        }
    }

    fn deleted(plan: &Plan) -> Vec<u64> {
        let mut v: Vec<u64> = plan.delete.iter().map(|d| d.version).collect();
        v.sort();
        v
    }

    fn instance(v: u64) -> Reason {
        Reason::Instance {
            region: EAST.into(),
            ami: ami_id(EAST, v),
            instance: format!("i-{v:017x}"),
            state: "running".into(),
        }
    }

    #[test]
    fn keeps_newest_in_use_templated_channelled_and_historic() {
        let mut p = Protections::default();
        for v in [5, 6] {
            p.add(&ami_id(EAST, v), instance(v));
        }
        p.add(
            &ami_id(EAST, 3),
            Reason::LaunchTemplate {
                region: EAST.into(),
                ami: ami_id(EAST, 3),
                template: "lt-1".into(),
                name: "old".into(),
                version: 1,
                is_default: false,
                is_latest: false,
            },
        );
        // Protected only in the other region: kept everywhere.
        p.add(
            &ami_id(WEST, 7),
            Reason::Channel {
                region: WEST.into(),
                ami: ami_id(WEST, 7),
                parameter: "/kiln/channels/web/prod".into(),
            },
        );
        p.add(
            &ami_id(EAST, 2),
            Reason::RolloutHistory {
                region: EAST.into(),
                ami: ami_id(EAST, 2),
                parameter: "/kiln/rollout/web-prod/history".into(),
            },
        );
        let plan = decide(&twelve(), &p, &policy(3));
        assert_eq!(deleted(&plan), vec![1, 4, 8, 9]);
        for d in &plan.delete {
            assert_eq!(d.amis.len(), 2, "every region of a doomed version goes");
            assert_eq!(d.amis[EAST].snapshots.len(), 1);
        }
        let kept: BTreeMap<u64, &Kept> = plan.keep.iter().map(|k| (k.version, k)).collect();
        assert_eq!(kept.len(), 8);
        assert!(matches!(
            kept[&12].reasons[0],
            Reason::Newest { rank: 1, keep: 3 }
        ));
        assert!(matches!(kept[&7].reasons[0], Reason::Channel { .. }));
        assert!(kept[&3].reasons[0]
            .to_string()
            .contains("launch template old version 1"));
    }

    #[test]
    fn keep_is_at_least_one_and_counts_versions_not_amis() {
        let plan = decide(&twelve(), &Protections::default(), &policy(0));
        assert_eq!(deleted(&plan), (1..=11).collect::<Vec<_>>());
    }

    #[test]
    fn pending_images_are_never_removed_but_failed_ones_are() {
        let mut amis = vec![ami(EAST, 1, "pending"), ami(EAST, 2, "failed")];
        amis.push(ami(EAST, 3, "available"));
        let plan = decide(
            &ImageVersion::from_amis(amis),
            &Protections::default(),
            &policy(1),
        );
        assert_eq!(deleted(&plan), vec![2]);
        assert!(matches!(
            plan.keep.iter().find(|k| k.version == 1).unwrap().reasons[0],
            Reason::NotAvailable { .. }
        ));
    }

    #[test]
    fn older_than_keeps_young_versions_and_unreadable_dates() {
        let now = humantime::parse_rfc3339("2024-01-31T00:00:00Z").unwrap();
        let mut versions = twelve();
        versions[0].created = "yesterday".into(); // version 12, newest anyway
        versions[1].created = "not a date".into(); // version 11
        let plan = decide(
            &versions,
            &Protections::default(),
            &Policy {
                keep: 1,
                // Versions are created on day v of January: 20 days before the
                // 31st is the 11th.
                older_than: Some(Duration::from_secs(20 * 86400)),
                now,
            },
        );
        assert_eq!(deleted(&plan), (1..=10).collect::<Vec<_>>());
        let k11 = plan.keep.iter().find(|k| k.version == 11).unwrap();
        assert!(matches!(k11.reasons[0], Reason::UnknownAge { .. }));
    }
}
