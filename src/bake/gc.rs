//! `kiln gc`: find the temporary resources a killed bake left behind (builder
//! and boot-test instances, temporary security groups: everything kiln tags with
//! `kiln:role` and `kiln:expires`; and package lists no version records) and
//! remove the expired ones.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use aws_sdk_ec2::types::Filter;

use super::plan::{gc_select, Temporary};
use crate::aws::{Aws, AwsError};
use crate::registry::{claim, packages, tag_value, tags};

/// Roles of temporary resources; images are never garbage (a pending image is
/// found by hash on the next bake).
const INSTANCE_ROLES: [&str; 2] = ["builder", "boot-test"];
const GROUP_ROLE: &str = "builder-sg";
const LIST_KIND: &str = "package-list";

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

/// DescribeInstances filter: instances not (being) terminated, the ones that
/// still cost money and hold their security group.
pub(crate) fn not_terminated() -> Filter {
    Filter::builder()
        .name("instance-state-name")
        .values("pending")
        .values("running")
        .values("stopping")
        .values("stopped")
        .build()
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
        .filters(not_terminated())
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

/// Package lists in `bucket` that no version claim records, as temporaries:
/// uploaded by a run killed before it claimed its version, or by a run whose
/// claim a later bake of the same content took over (the claim then records
/// that bake's list). A list expires `ttl` after it was written, so a running
/// bake's list (uploaded before its claim) is never one. The lists of an image
/// with a claim kiln cannot read are all kept.
pub async fn find_package_lists(
    aws: &Aws,
    bucket: &str,
    ttl: Duration,
) -> Result<Vec<Temporary>, AwsError> {
    let region = aws.region().to_string();
    let mut objects = Vec::new();
    let mut pages = aws
        .s3()
        .list_objects_v2()
        .bucket(bucket)
        .prefix(packages::PREFIX)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| AwsError::call("s3", "ListObjectsV2", &region, e))?;
        for o in page.contents() {
            if let (Some(key), Some(modified)) = (o.key(), o.last_modified()) {
                let at =
                    SystemTime::UNIX_EPOCH + Duration::from_secs(modified.secs().max(0) as u64);
                objects.push((key.to_string(), at));
            }
        }
    }
    let images: BTreeSet<&str> = objects.iter().filter_map(|(k, _)| image_of(k)).collect();
    let (mut recorded, mut unreadable) = (BTreeSet::new(), BTreeSet::new());
    for image in images {
        for record in claim::read_records(aws, image).await?.into_values() {
            match record {
                Some(r) => recorded.extend(r.package_list.map(|l| l.key)),
                None => {
                    unreadable.insert(image.to_string());
                }
            }
        }
    }
    Ok(orphan_lists(&region, &objects, &recorded, &unreadable, ttl))
}

/// `web` of `kiln/packages/web/<hash>/<run>.txt` (or of an older kiln's
/// `kiln/packages/web/<hash>.txt`); `None` for a key of another shape, which
/// is not kiln's to remove.
fn image_of(key: &str) -> Option<&str> {
    let (image, rest) = key.strip_prefix(packages::PREFIX)?.split_once('/')?;
    (!image.is_empty() && rest.ends_with(".txt")).then_some(image)
}

/// Pure: the lists among `objects` (key, written at) that no claim records
/// and whose image's claims are all readable, each expiring `ttl` after it was
/// written.
fn orphan_lists(
    region: &str,
    objects: &[(String, SystemTime)],
    recorded: &BTreeSet<String>,
    unreadable: &BTreeSet<String>,
    ttl: Duration,
) -> Vec<Temporary> {
    objects
        .iter()
        .filter(|(key, _)| !recorded.contains(key))
        .filter(|(key, _)| image_of(key).is_some_and(|i| !unreadable.contains(i)))
        .map(|(key, at)| Temporary {
            region: region.to_string(),
            kind: LIST_KIND,
            id: key.clone(),
            role: LIST_KIND.to_string(),
            run_id: key
                .rsplit('/')
                .next()
                .and_then(|f| f.strip_suffix(".txt"))
                .unwrap_or_default()
                .to_string(),
            expires: humantime::format_rfc3339_seconds(*at + ttl).to_string(),
            state: String::new(),
        })
        .collect()
}

/// Finds and (unless `dry_run`) removes expired temporaries: instances first
/// (one call), then security groups, which EC2 refuses to delete while an
/// instance still uses them. With `lists` (the bake bucket and ttl, given for
/// the home region, where the claims are), package lists no version records too.
pub async fn gc(
    aws: &Aws,
    dry_run: bool,
    lists: Option<(&str, Duration)>,
) -> Result<GcReport, AwsError> {
    let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let mut found = find(aws).await?;
    if let Some((bucket, ttl)) = lists {
        found.extend(find_package_lists(aws, bucket, ttl).await?);
    }
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
        if let Some((bucket, _)) = lists {
            for l in removed.iter().filter(|t| t.kind == LIST_KIND) {
                aws.s3()
                    .delete_object()
                    .bucket(bucket)
                    .key(&l.id)
                    .send()
                    .await
                    .map_err(|e| AwsError::call("s3", "DeleteObject", aws.region(), e))?;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lists_no_claim_records_are_orphans_and_they_expire_a_ttl_after_writing() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let objects = vec![
            ("kiln/packages/web/h1/run-a.txt".to_string(), t0),
            ("kiln/packages/web/h1/run-b.txt".to_string(), t0),
            ("kiln/packages/worker/h2/run-c.txt".to_string(), t0),
            ("kiln/packages/odd.txt".to_string(), t0),
        ];
        let recorded = BTreeSet::from(["kiln/packages/web/h1/run-b.txt".to_string()]);
        let unreadable = BTreeSet::from(["worker".to_string()]);
        let ttl = Duration::from_secs(3 * 3600);
        let found = orphan_lists("us-east-1", &objects, &recorded, &unreadable, ttl);
        assert_eq!(found.len(), 1, "{found:?}");
        let f = &found[0];
        assert_eq!(f.id, "kiln/packages/web/h1/run-a.txt");
        assert_eq!((f.kind, f.run_id.as_str()), (LIST_KIND, "run-a"));
        assert_eq!(
            f.expires,
            humantime::format_rfc3339_seconds(t0 + ttl).to_string()
        );
        let before = humantime::format_rfc3339_seconds(t0 + ttl - Duration::from_secs(1));
        assert!(gc_select(&before.to_string(), &found).is_empty());
        let after = humantime::format_rfc3339_seconds(t0 + ttl);
        assert_eq!(gc_select(&after.to_string(), &found), found);
    }
}
