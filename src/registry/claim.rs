//! Version numbers, claimed atomically.
//!
//! Two bakes of different content started at the same time must get different
//! numbers. AWS rejects a duplicate AMI name but moto does not, so the AMI name is
//! no lock here. An SSM parameter created without overwrite is one both honour:
//! `PutParameter` of `/kiln/images/<image>/versions/<n>` succeeds for exactly one
//! caller, the other gets `ParameterAlreadyExists`, re-reads the claims and takes
//! the next number. The parameter's value is the version's manifest record
//! ([`ClaimRecord`]), so the registry can read what a version was meant to be
//! even when its AMI is gone.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::RegistryError;
use crate::aws::{Aws, AwsError};

/// Lost races in a row before giving up; each one means another bake claimed a
/// number between our read and our write.
const MAX_ATTEMPTS: usize = 20;

/// What a version claim records (the parameter's JSON value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRecord {
    pub image: String,
    pub version: u64,
    pub hash: String,
    pub base_ami: String,
    pub java: String,
    pub run_id: String,
    pub claimed_at: String,
    /// The content-hash manifest's lines (recipe, base AMI, Java pin,
    /// artifacts, rendered files), for `kiln diff`. Empty for versions baked
    /// before it was recorded, or when it does not fit (see [`MAX_VALUE`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub manifest: Vec<String>,
    /// Where the builder was told to upload the image's `dpkg-query -W`
    /// output in S3 (see [`super::packages`]); absent when no bucket is set. The list
    /// itself does not fit in a parameter. Not part of the content hash: it is
    /// an output of the bake, not an input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_list: Option<super::packages::PackageList>,
}

/// A standard parameter holds 4 KB and an advanced one 8 KB. A record over 4 KB
/// is written with the Intelligent-Tiering tier (SSM picks advanced); one
/// over 8 KB drops its manifest (keeping the few hundred bytes that locate the
/// package list), so a huge recipe costs `kiln diff` its detail, never a bake
/// its version claim.
const STANDARD_VALUE: usize = 4096;
const MAX_VALUE: usize = 8192;

/// The claim parameter's value and whether it needs the advanced tier.
fn claim_value(record: &ClaimRecord) -> (String, bool) {
    let value = serde_json::to_string(record).expect("claim records serialize");
    if value.len() <= STANDARD_VALUE {
        return (value, false);
    }
    if value.len() <= MAX_VALUE {
        return (value, true);
    }
    let slim = ClaimRecord {
        manifest: Vec::new(),
        ..record.clone()
    };
    (
        serde_json::to_string(&slim).expect("claim records serialize"),
        false,
    )
}

/// The outcome of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub version: u64,
    /// A claim for this same content hash already existed (an earlier bake of it
    /// failed before its AMI was made) and is reused instead of burning a number.
    pub reused: bool,
    /// PutParameter attempts that lost a race.
    pub lost_races: usize,
}

pub fn parameter_prefix(image: &str) -> String {
    format!("/kiln/images/{image}/versions/")
}

pub fn parameter_name(image: &str, version: u64) -> String {
    format!("{}{version}", parameter_prefix(image))
}

/// What to do next, given the claims read from Parameter Store and the versions
/// that have an AMI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// A claim for our hash exists and no AMI uses its number: take it.
    Reuse(u64),
    /// Try to create this number.
    Try(u64),
}

/// Pure: the next claim to attempt.
pub fn next_claim(claims: &BTreeMap<u64, String>, with_ami: &BTreeSet<u64>, hash: &str) -> Next {
    if let Some((&v, _)) = claims
        .iter()
        .find(|(v, h)| h.as_str() == hash && !with_ami.contains(v))
    {
        return Next::Reuse(v);
    }
    let top = claims
        .keys()
        .chain(with_ami.iter())
        .max()
        .copied()
        .unwrap_or(0);
    Next::Try(top + 1)
}

/// Claims a version number for `record.hash`. `with_ami` are the versions that
/// already have an AMI in the home region (from the lookup the bake made
/// anyway), so the first attempt usually succeeds with one call.
pub async fn claim_version(
    aws: &Aws,
    mut record: ClaimRecord,
    with_ami: &BTreeSet<u64>,
) -> Result<Claim, RegistryError> {
    let ssm = aws.ssm();
    let mut next = Next::Try(with_ami.iter().max().copied().unwrap_or(0) + 1);
    let mut lost_races = 0;
    for _ in 0..MAX_ATTEMPTS {
        let (version, reused) = match next {
            Next::Reuse(v) => (v, true),
            Next::Try(v) => (v, false),
        };
        record.version = version;
        let (value, advanced) = claim_value(&record);
        // A reused claim was written by the bake that failed after claiming it:
        // its record (run id, time, package list) is replaced with this bake's,
        // which is the one that makes the image.
        let mut put = ssm
            .put_parameter()
            .name(parameter_name(&record.image, version))
            .value(value)
            .r#type(aws_sdk_ssm::types::ParameterType::String);
        if advanced {
            put = put.tier(aws_sdk_ssm::types::ParameterTier::IntelligentTiering);
        }
        let put = put
            .description(format!(
                "kiln: version {version} of image {} is content hash {}",
                record.image, record.hash
            ))
            .overwrite(reused)
            .send()
            .await;
        match put {
            Ok(_) => {
                return Ok(Claim {
                    version,
                    reused,
                    lost_races,
                })
            }
            Err(e)
                if !reused
                    && e.as_service_error()
                        .is_some_and(|s| s.is_parameter_already_exists()) =>
            {
                lost_races += 1;
                let claims = read_claims(aws, &record.image).await?;
                next = next_claim(&claims, with_ami, &record.hash);
            }
            Err(e) => {
                return Err(AwsError::call("ssm", "PutParameter", aws.region(), e).into());
            }
        }
    }
    Err(RegistryError::Claim {
        image: record.image.clone(),
        why: format!(
            "lost {MAX_ATTEMPTS} races for a version number under {} in {}; retry the bake",
            parameter_prefix(&record.image),
            aws.region()
        ),
    })
}

/// version → content hash of every claim of `image`.
pub async fn read_claims(aws: &Aws, image: &str) -> Result<BTreeMap<u64, String>, AwsError> {
    Ok(read_records(aws, image)
        .await?
        .into_iter()
        .map(|(v, r)| (v, r.map(|r| r.hash).unwrap_or_default()))
        .collect())
}

/// version → claim record of every claim of `image` (`None` for a value that
/// is not a record kiln can read).
pub async fn read_records(
    aws: &Aws,
    image: &str,
) -> Result<BTreeMap<u64, Option<ClaimRecord>>, AwsError> {
    let prefix = parameter_prefix(image);
    let mut pages = aws
        .ssm()
        .get_parameters_by_path()
        .path(prefix.trim_end_matches('/'))
        .recursive(false)
        .into_paginator()
        .send();
    let mut out = BTreeMap::new();
    while let Some(page) = pages.next().await {
        let page =
            page.map_err(|e| AwsError::call("ssm", "GetParametersByPath", aws.region(), e))?;
        for p in page.parameters() {
            let Some(v) = p
                .name()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let record = p
                .value()
                .and_then(|s| serde_json::from_str::<ClaimRecord>(s).ok());
            out.insert(v, record);
        }
    }
    Ok(out)
}

/// The claim record of a version, with its manifest when the bake recorded
/// one; `None` when the version has no claim parameter.
pub async fn read_claim(
    aws: &Aws,
    image: &str,
    version: u64,
) -> Result<Option<ClaimRecord>, AwsError> {
    match aws
        .ssm()
        .get_parameter()
        .name(parameter_name(image, version))
        .send()
        .await
    {
        Ok(out) => Ok(out
            .parameter()
            .and_then(|p| p.value())
            .and_then(|v| serde_json::from_str(v).ok())),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_parameter_not_found()) =>
        {
            Ok(None)
        }
        Err(e) => Err(AwsError::call("ssm", "GetParameter", aws.region(), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(list: &[(u64, &str)]) -> BTreeMap<u64, String> {
        list.iter().map(|(v, h)| (*v, h.to_string())).collect()
    }

    #[test]
    fn takes_the_number_after_every_claim_and_ami() {
        let with_ami: BTreeSet<u64> = [1, 2].into();
        assert_eq!(
            next_claim(&claims(&[(1, "a"), (2, "b"), (3, "c")]), &with_ami, "d"),
            Next::Try(4)
        );
        assert_eq!(next_claim(&claims(&[]), &with_ami, "d"), Next::Try(3));
        assert_eq!(
            next_claim(&claims(&[]), &BTreeSet::new(), "d"),
            Next::Try(1)
        );
    }

    #[test]
    fn reuses_an_unused_claim_of_the_same_content() {
        // Version 3 was claimed for "d" by a bake that failed before CreateImage.
        let with_ami: BTreeSet<u64> = [1, 2].into();
        assert_eq!(
            next_claim(
                &claims(&[(1, "a"), (2, "b"), (3, "d"), (4, "e")]),
                &with_ami,
                "d"
            ),
            Next::Reuse(3)
        );
    }

    #[test]
    fn never_reuses_a_number_that_has_an_ami() {
        let with_ami: BTreeSet<u64> = [1, 2].into();
        assert_eq!(
            next_claim(&claims(&[(1, "a"), (2, "d")]), &with_ami, "d"),
            Next::Try(3)
        );
    }

    #[test]
    fn an_oversized_manifest_is_dropped_rather_than_failing_the_claim() {
        let record = |n: usize| ClaimRecord {
            image: "web".into(),
            version: 1,
            hash: "ab".repeat(32),
            base_ami: "ami-0f6b3c9d25e4a5c33".into(),
            java: "1.8.0_422".into(),
            run_id: "r".into(),
            claimed_at: "2024-01-01T00:00:00Z".into(),
            manifest: (0..n)
                .map(|i| format!("file f{i} mode=0644 sha256={}", "c".repeat(64)))
                .collect(),
            package_list: Some(crate::registry::packages::PackageList::at(
                "kiln-artifacts",
                &crate::registry::packages::key("web", &"ab".repeat(32), &"r".repeat(36)),
            )),
        };
        let (small, adv) = claim_value(&record(3));
        assert!(!adv && small.contains("file f2"));
        let (mid, adv) = claim_value(&record(50));
        assert!(adv && mid.contains("file f49"));
        let (big, adv) = claim_value(&record(200));
        assert!(!adv && !big.contains("file f0") && big.len() <= STANDARD_VALUE);
        let back: ClaimRecord = serde_json::from_str(&big).unwrap();
        assert!(back.manifest.is_empty());
        assert_eq!(
            back.package_list,
            record(200).package_list,
            "the package list's location survives"
        );
    }

    #[test]
    fn parameter_names_are_per_image() {
        assert_eq!(parameter_name("web", 7), "/kiln/images/web/versions/7");
    }
}
