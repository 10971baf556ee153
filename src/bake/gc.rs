//! `kiln gc`: find the temporary resources a killed bake left behind (builder
//! and boot-test instances, temporary security groups: everything kiln tags with
//! `kiln:role` and `kiln:expires`) and remove the expired ones.

use std::time::SystemTime;

use aws_sdk_ec2::types::Filter;

use super::plan::{gc_select, Temporary};
use crate::aws::{Aws, AwsError};
use crate::registry::{tag_value, tags};

/// Roles of temporary resources; images are never garbage (a pending image is
/// found by hash on the next bake).
const INSTANCE_ROLES: [&str; 2] = ["builder", "boot-test"];
const GROUP_ROLE: &str = "builder-sg";

/// What gc found and what it removed (or would remove with `--dry-run`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct GcReport {
    pub region: String,
    pub now: String,
    /// Temporaries found, expired or not.
    pub found: Vec<Temporary>,
    /// The expired ones: removed, or to be removed with `--dry-run`.
    pub removed: Vec<Temporary>,
    pub dry_run: bool,
}

/// Lists every kiln temporary in `aws`'s region (two calls).
pub async fn find(aws: &Aws) -> Result<Vec<Temporary>, AwsError> {
    let region = aws.region().to_string();
    let mut out = Vec::new();
    let mut pages = aws
        .ec2()
        .describe_instances()
        .filters(
            Filter::builder()
                .name(format!("tag:{}", tags::ROLE))
                .set_values(Some(INSTANCE_ROLES.map(String::from).to_vec()))
                .build(),
        )
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .values("stopping")
                .values("stopped")
                .build(),
        )
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| AwsError::call("ec2", "DescribeInstances", &region, e))?;
        for r in page.reservations() {
            for i in r.instances() {
                let t = i.tags();
                out.push(Temporary {
                    region: region.clone(),
                    kind: "instance",
                    id: i.instance_id().unwrap_or_default().to_string(),
                    role: tag_value(t, tags::ROLE).unwrap_or_default(),
                    run_id: tag_value(t, tags::RUN_ID).unwrap_or_default(),
                    expires: tag_value(t, tags::EXPIRES).unwrap_or_default(),
                    state: i
                        .state()
                        .and_then(|s| s.name())
                        .map(|n| n.as_str().to_string())
                        .unwrap_or_default(),
                });
            }
        }
    }
    let mut pages = aws
        .ec2()
        .describe_security_groups()
        .filters(
            Filter::builder()
                .name(format!("tag:{}", tags::ROLE))
                .values(GROUP_ROLE)
                .build(),
        )
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| AwsError::call("ec2", "DescribeSecurityGroups", &region, e))?;
        for g in page.security_groups() {
            let t = g.tags();
            out.push(Temporary {
                region: region.clone(),
                kind: "security-group",
                id: g.group_id().unwrap_or_default().to_string(),
                role: tag_value(t, tags::ROLE).unwrap_or_default(),
                run_id: tag_value(t, tags::RUN_ID).unwrap_or_default(),
                expires: tag_value(t, tags::EXPIRES).unwrap_or_default(),
                state: String::new(),
            });
        }
    }
    Ok(out)
}

/// Finds and (unless `dry_run`) removes expired temporaries: instances first
/// (one call), then security groups, which EC2 refuses to delete while an
/// instance still uses them.
pub async fn gc(aws: &Aws, dry_run: bool) -> Result<GcReport, AwsError> {
    let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let found = find(aws).await?;
    let removed = gc_select(&now, &found);
    if !dry_run {
        let instances: Vec<String> = removed
            .iter()
            .filter(|t| t.kind == "instance")
            .map(|t| t.id.clone())
            .collect();
        if !instances.is_empty() {
            aws.ec2()
                .terminate_instances()
                .set_instance_ids(Some(instances))
                .send()
                .await
                .map_err(|e| AwsError::call("ec2", "TerminateInstances", aws.region(), e))?;
        }
        for g in removed.iter().filter(|t| t.kind == "security-group") {
            super::delete_security_group(aws, &g.id).await?;
        }
    }
    Ok(GcReport {
        region: aws.region().to_string(),
        now,
        found,
        removed,
        dry_run,
    })
}
