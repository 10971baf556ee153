//! `kiln drift`: fleets that do not run what their launch templates say.
//!
//! kiln never changes a running server, so an instance whose AMI differs from
//! its group's launch template image got there some other way (a manual
//! launch attached to the group, a launch template edited outside kiln, a
//! rollout that died without its journal). A launch template whose image kiln
//! does not know (deregistered, or never baked by kiln) means the group's next
//! scale-out launches something no recipe describes, or fails.
//!
//! Observation is [`observe`]; the judgement is the pure [`assess`].

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_autoscaling::types::{AutoScalingGroup, LaunchTemplateSpecification};
use aws_sdk_ec2::types::Filter;
use serde::Serialize;

use super::prune::resolve_image_id;
use crate::aws::{Aws, AwsError};
use crate::registry;

/// One launch template version a group launches from, and its image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TemplateImage {
    pub template: String,
    /// As the group names it: `$Latest`, `$Default` or a number.
    pub version: String,
    /// The version number that resolves to.
    pub resolved_version: Option<i64>,
    pub ami: Option<String>,
    /// `main` or `override` (a mixed-instances override's own template).
    pub role: String,
}

/// What is known about an AMI id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Known {
    /// A kiln image: `web@7`.
    Kiln(String),
    /// Exists, but kiln did not bake it (no registry tags).
    Foreign,
    /// Does not exist (deregistered, or never did).
    Missing,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceDrift {
    pub instance: String,
    pub ami: String,
    pub image: Known,
    /// Any of these would be in line with the launch template.
    pub expected: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnknownImage {
    pub template: String,
    pub version: String,
    pub ami: String,
    pub image: Known,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupReport {
    pub asg: String,
    pub region: String,
    pub templates: Vec<TemplateImage>,
    /// `launch configuration <name>` when the group still uses one.
    pub launch_configuration: Option<String>,
    /// The images the group is meant to run, with what kiln knows of them.
    pub images: BTreeMap<String, Known>,
    pub instances: usize,
    pub drifted: Vec<InstanceDrift>,
    pub unknown_images: Vec<UnknownImage>,
}

impl GroupReport {
    pub fn has_drift(&self) -> bool {
        !self.drifted.is_empty() || !self.unknown_images.is_empty()
    }
}

/// What was observed of one group.
#[derive(Debug, Clone)]
pub struct Observed {
    pub asg: String,
    pub region: String,
    pub templates: Vec<TemplateImage>,
    pub launch_configuration: Option<(String, String)>,
    /// instance id → AMI id
    pub instances: BTreeMap<String, String>,
}

/// Pure: the group's drift, given what kiln knows of every AMI involved.
pub fn assess(o: &Observed, known: &BTreeMap<String, Known>) -> GroupReport {
    let know = |ami: &str| known.get(ami).cloned().unwrap_or(Known::Missing);
    let mut expected: BTreeSet<String> = o.templates.iter().filter_map(|t| t.ami.clone()).collect();
    if let Some((_, ami)) = &o.launch_configuration {
        expected.insert(ami.clone());
    }
    let drifted = o
        .instances
        .iter()
        .filter(|(_, ami)| !expected.contains(*ami))
        .map(|(id, ami)| InstanceDrift {
            instance: id.clone(),
            ami: ami.clone(),
            image: know(ami),
            expected: expected.iter().cloned().collect(),
        })
        .collect();
    let mut unknown_images = Vec::new();
    for t in &o.templates {
        if let Some(ami) = &t.ami {
            let k = know(ami);
            if !matches!(k, Known::Kiln(_)) {
                unknown_images.push(UnknownImage {
                    template: t.template.clone(),
                    version: t.version.clone(),
                    ami: ami.clone(),
                    image: k,
                });
            }
        }
    }
    if let Some((name, ami)) = &o.launch_configuration {
        let k = know(ami);
        if !matches!(k, Known::Kiln(_)) {
            unknown_images.push(UnknownImage {
                template: format!("launch configuration {name}"),
                version: String::new(),
                ami: ami.clone(),
                image: k,
            });
        }
    }
    GroupReport {
        asg: o.asg.clone(),
        region: o.region.clone(),
        templates: o.templates.clone(),
        launch_configuration: o.launch_configuration.as_ref().map(|(n, _)| n.clone()),
        images: expected.iter().map(|a| (a.clone(), know(a))).collect(),
        instances: o.instances.len(),
        drifted,
        unknown_images,
    }
}

/// Observes `asg` (or every group) in `aws`'s region and assesses each. A
/// named group that does not exist here gives an empty list.
pub async fn check(aws: &Aws, asg: Option<&str>) -> Result<Vec<GroupReport>, AwsError> {
    let region = aws.region().to_string();
    let mut groups: Vec<AutoScalingGroup> = Vec::new();
    let mut req = aws.autoscaling().describe_auto_scaling_groups();
    if let Some(name) = asg {
        req = req.auto_scaling_group_names(name);
    }
    let mut pages = req.into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page
            .map_err(|e| AwsError::call("autoscaling", "DescribeAutoScalingGroups", &region, e))?;
        groups.extend(page.auto_scaling_groups().iter().cloned());
    }

    let mut observed = Vec::new();
    for g in &groups {
        let mut templates = Vec::new();
        let mixed = g.mixed_instances_policy().and_then(|m| m.launch_template());
        let main = g.launch_template().cloned().or_else(|| {
            mixed
                .and_then(|m| m.launch_template_specification())
                .cloned()
        });
        if let Some(spec) = main {
            templates.push(template_image(aws, &spec, "main").await?);
        }
        for o in mixed.map(|m| m.overrides()).unwrap_or_default() {
            if let Some(spec) = o.launch_template_specification() {
                templates.push(template_image(aws, spec, "override").await?);
            }
        }
        let launch_configuration = match g.launch_configuration_name() {
            Some(name) => {
                let out = aws
                    .autoscaling()
                    .describe_launch_configurations()
                    .launch_configuration_names(name)
                    .send()
                    .await
                    .map_err(|e| {
                        AwsError::call("autoscaling", "DescribeLaunchConfigurations", &region, e)
                    })?;
                out.launch_configurations()
                    .first()
                    .and_then(|c| c.image_id())
                    .map(|ami| (name.to_string(), ami.to_string()))
            }
            None => None,
        };
        let ids: Vec<String> = g
            .instances()
            .iter()
            .filter_map(|i| i.instance_id())
            .map(str::to_string)
            .collect();
        observed.push(Observed {
            asg: g.auto_scaling_group_name().unwrap_or_default().to_string(),
            region: region.clone(),
            templates,
            launch_configuration,
            instances: instance_images(aws, &ids).await?,
        });
    }

    let mut amis: BTreeSet<String> = BTreeSet::new();
    for o in &observed {
        amis.extend(o.instances.values().cloned());
        amis.extend(o.templates.iter().filter_map(|t| t.ami.clone()));
        amis.extend(o.launch_configuration.iter().map(|(_, a)| a.clone()));
    }
    let known = know(aws, &amis.into_iter().collect::<Vec<_>>()).await?;
    Ok(observed.iter().map(|o| assess(o, &known)).collect())
}

async fn template_image(
    aws: &Aws,
    spec: &LaunchTemplateSpecification,
    role: &str,
) -> Result<TemplateImage, AwsError> {
    let version = spec.version().unwrap_or("$Default").to_string();
    let mut req = aws
        .ec2()
        .describe_launch_template_versions()
        .versions(&version);
    let template = match (spec.launch_template_id(), spec.launch_template_name()) {
        (Some(id), _) => {
            req = req.launch_template_id(id);
            id.to_string()
        }
        (None, Some(name)) => {
            req = req.launch_template_name(name);
            name.to_string()
        }
        (None, None) => String::new(),
    };
    let out = req
        .send()
        .await
        .map_err(|e| AwsError::call("ec2", "DescribeLaunchTemplateVersions", aws.region(), e))?;
    let v = out.launch_template_versions().first();
    let ami = match v
        .and_then(|v| v.launch_template_data())
        .and_then(|d| d.image_id())
    {
        Some(image) => Some(resolve_image_id(aws, image).await?),
        None => None,
    };
    Ok(TemplateImage {
        template: v
            .and_then(|v| v.launch_template_name())
            .map(str::to_string)
            .unwrap_or(template),
        version,
        resolved_version: v.and_then(|v| v.version_number()),
        ami,
        role: role.to_string(),
    })
}

/// instance id → AMI, up to 1000 ids per DescribeInstances call: a constant
/// number of calls per group whatever its size.
async fn instance_images(aws: &Aws, ids: &[String]) -> Result<BTreeMap<String, String>, AwsError> {
    let mut out = BTreeMap::new();
    for chunk in ids.chunks(1000) {
        let mut pages = aws
            .ec2()
            .describe_instances()
            .set_instance_ids(Some(chunk.to_vec()))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page =
                page.map_err(|e| AwsError::call("ec2", "DescribeInstances", aws.region(), e))?;
            for i in page.reservations().iter().flat_map(|r| r.instances()) {
                if let (Some(id), Some(ami)) = (i.instance_id(), i.image_id()) {
                    out.insert(id.to_string(), ami.to_string());
                }
            }
        }
    }
    Ok(out)
}

/// What kiln knows of each AMI: kiln's tags, exists without them, or missing.
/// The `image-id` filter (not ImageIds) so one missing id does not fail the call.
async fn know(aws: &Aws, amis: &[String]) -> Result<BTreeMap<String, Known>, AwsError> {
    let mut out: BTreeMap<String, Known> =
        amis.iter().map(|a| (a.clone(), Known::Missing)).collect();
    for chunk in amis.chunks(200) {
        let mut pages = aws
            .ec2()
            .describe_images()
            .filters(
                Filter::builder()
                    .name("image-id")
                    .set_values(Some(chunk.to_vec()))
                    .build(),
            )
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page =
                page.map_err(|e| AwsError::call("ec2", "DescribeImages", aws.region(), e))?;
            for img in page.images() {
                let Some(id) = img.image_id() else { continue };
                let k = match registry::Ami::from_image(aws.region(), img) {
                    Some(a) => Known::Kiln(match a.version {
                        Some(v) => format!("{}@{v}", a.image),
                        None => a.image,
                    }),
                    None => Known::Foreign,
                };
                out.insert(id.to_string(), k);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(instances: &[(&str, &str)]) -> Observed {
        Observed {
            asg: "web-prod".into(),
            region: "us-east-1".into(),
            templates: vec![TemplateImage {
                template: "web".into(),
                version: "$Latest".into(),
                resolved_version: Some(2),
                ami: Some("ami-00000000000000002".into()),
                role: "main".into(),
            }],
            launch_configuration: None,
            instances: instances
                .iter()
                .map(|(i, a)| (i.to_string(), a.to_string()))
                .collect(),
        }
    }

    #[test]
    fn instances_off_the_template_image_are_drift() {
        let known: BTreeMap<String, Known> = [
            ("ami-00000000000000002".into(), Known::Kiln("web@2".into())),
            ("ami-00000000000000001".into(), Known::Kiln("web@1".into())),
        ]
        .into();
        let r = assess(
            &observed(&[
                ("i-1", "ami-00000000000000002"),
                ("i-2", "ami-00000000000000001"),
            ]),
            &known,
        );
        assert_eq!(r.drifted.len(), 1);
        assert_eq!(r.drifted[0].instance, "i-2");
        assert_eq!(r.drifted[0].image, Known::Kiln("web@1".into()));
        assert!(r.unknown_images.is_empty());
        assert!(r.has_drift());
    }

    #[test]
    fn a_template_on_an_image_kiln_does_not_know_is_reported() {
        let r = assess(
            &observed(&[("i-1", "ami-00000000000000002")]),
            &BTreeMap::new(),
        );
        assert!(r.drifted.is_empty());
        assert_eq!(r.unknown_images.len(), 1);
        assert_eq!(r.unknown_images[0].image, Known::Missing);
    }
}
