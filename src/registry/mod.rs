//! Baked images as AMIs: the tag schema, finding an image by content hash, listing
//! versions, resolving refs, and claiming version numbers.
//!
//! The AMIs' own tags are the record: each region's copy carries the image name,
//! version, content hash, base AMI, Java pin and whether it passed its boot test,
//! so `kiln images` and `kiln rollout` need nothing but DescribeImages. Version
//! numbers are claimed in SSM Parameter Store (see [`claim`]) because AMI names
//! are not a lock moto enforces.

pub mod channel;
pub mod claim;
pub mod packages;
pub mod refs;

use std::collections::BTreeMap;

use aws_sdk_ec2::types::{Filter, Image, Tag};
use serde::Serialize;

use crate::aws::{Aws, AwsError};
pub use claim::{claim_version, Claim};
pub use refs::{parse_ref, select, ImageRef};

/// Tag keys on AMIs and their snapshots.
pub mod tags {
    pub const IMAGE: &str = "kiln:image";
    pub const VERSION: &str = "kiln:version";
    pub const HASH: &str = "kiln:hash";
    pub const BASE_AMI: &str = "kiln:base-ami";
    pub const JAVA: &str = "kiln:java";
    /// `testing` from CreateImage until the boot test passes, then `ready`.
    pub const STATE: &str = "kiln:state";
    /// `passed` or `skipped` (`--skip-boot-test`).
    pub const BOOT_TEST: &str = "kiln:boot-test";
    /// The bake run that made it (also on its temporary resources).
    pub const RUN_ID: &str = "kiln:run-id";
    /// `region/ami-…` a copy was made from.
    pub const SOURCE: &str = "kiln:source";
    /// On temporary resources: `builder`, `boot-test`, `builder-sg`.
    pub const ROLE: &str = "kiln:role";
    /// On temporary resources: RFC 3339 time after which `kiln gc` removes them.
    pub const EXPIRES: &str = "kiln:expires";
    pub const NAME: &str = "Name";
    pub const VERSION_PLAIN: &str = "Version";

    pub const STATE_TESTING: &str = "testing";
    pub const STATE_READY: &str = "ready";
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("image ref {input:?}: {why}")]
    BadRef { input: String, why: String },
    #[error("{reference} in {region}: {why}")]
    NotFound {
        reference: String,
        region: String,
        why: String,
    },
    #[error("{reference} matches versions {versions}; give more digits of the hash")]
    Ambiguous { reference: String, versions: String },
    #[error("version claim for {image}: {why}")]
    Claim { image: String, why: String },
    #[error(transparent)]
    Aws(#[from] AwsError),
}

impl RegistryError {
    /// An unknown or malformed ref is the operator's to fix (exit 2).
    pub fn is_input(&self) -> bool {
        match self {
            RegistryError::BadRef { .. }
            | RegistryError::NotFound { .. }
            | RegistryError::Ambiguous { .. } => true,
            RegistryError::Claim { .. } => false,
            RegistryError::Aws(e) => e.is_input(),
        }
    }
}

/// One kiln AMI in one region, as its tags describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ami {
    pub region: String,
    pub id: String,
    pub name: String,
    /// EC2's image state: `pending`, `available`, `failed`, ...
    pub state: String,
    pub image: String,
    pub version: Option<u64>,
    pub hash: String,
    pub base_ami: String,
    pub java: String,
    /// Passed its boot test (or was baked with the test skipped).
    pub ready: bool,
    pub created: String,
    pub snapshots: Vec<String>,
    pub run_id: String,
}

impl Ami {
    pub fn is_available(&self) -> bool {
        self.state == "available"
    }

    pub fn is_pending(&self) -> bool {
        self.state == "pending"
    }

    /// Reads a DescribeImages entry; `None` when it is not a kiln image.
    pub fn from_image(region: &str, img: &Image) -> Option<Ami> {
        let tag = |k: &str| tag_value(img.tags(), k);
        let image = tag(tags::IMAGE)?;
        let hash = tag(tags::HASH)?;
        Some(Ami {
            region: region.to_string(),
            id: img.image_id()?.to_string(),
            name: img.name().unwrap_or_default().to_string(),
            state: img
                .state()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
            version: tag(tags::VERSION).and_then(|v| v.parse().ok()),
            base_ami: tag(tags::BASE_AMI).unwrap_or_default(),
            java: tag(tags::JAVA).unwrap_or_default(),
            ready: tag(tags::STATE).as_deref() == Some(tags::STATE_READY),
            created: img.creation_date().unwrap_or_default().to_string(),
            snapshots: snapshots_of(img),
            run_id: tag(tags::RUN_ID).unwrap_or_default(),
            image,
            hash,
        })
    }
}

pub fn tag_value(tags: &[Tag], key: &str) -> Option<String> {
    tags.iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
        .map(str::to_string)
}

/// The EBS snapshots behind an image.
pub fn snapshots_of(img: &Image) -> Vec<String> {
    img.block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()))
        .map(str::to_string)
        .collect()
}

/// One version of an image: its AMI in each region it exists in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageVersion {
    pub image: String,
    pub version: u64,
    pub hash: String,
    pub base_ami: String,
    pub java: String,
    pub created: String,
    /// region → AMI
    pub amis: BTreeMap<String, Ami>,
}

impl ImageVersion {
    pub fn ami_in(&self, region: &str) -> Option<&Ami> {
        self.amis.get(region)
    }

    /// Groups AMIs (any regions, any order) by image and version, newest first.
    /// AMIs without a version tag (a crash between CreateImage and tagging is
    /// impossible, but a hand-made image could lack it) are left out.
    pub fn from_amis(amis: Vec<Ami>) -> Vec<ImageVersion> {
        let mut by: BTreeMap<(String, u64), ImageVersion> = BTreeMap::new();
        for a in amis {
            let Some(v) = a.version else { continue };
            let entry = by
                .entry((a.image.clone(), v))
                .or_insert_with(|| ImageVersion {
                    image: a.image.clone(),
                    version: v,
                    hash: a.hash.clone(),
                    base_ami: a.base_ami.clone(),
                    java: a.java.clone(),
                    created: a.created.clone(),
                    amis: BTreeMap::new(),
                });
            if a.created < entry.created {
                entry.created = a.created.clone();
            }
            entry.amis.insert(a.region.clone(), a);
        }
        let mut out: Vec<ImageVersion> = by.into_values().collect();
        out.sort_by(|a, b| (&a.image, b.version).cmp(&(&b.image, a.version)));
        out
    }
}

/// What to look up: every kiln image, one image's versions, or one content hash.
#[derive(Debug, Clone, Copy)]
pub enum Lookup<'a> {
    All,
    Image(&'a str),
    Hash(&'a str),
    Ids(&'a [String]),
}

/// DescribeImages page size (EC2's maximum).
const DESCRIBE_IMAGES_PAGE: i32 = 1000;

/// kiln AMIs owned by this account in `aws`'s region: one DescribeImages call
/// (paginated), filtered server-side by tag. Deregistered images are gone from
/// the answer, so this is what exists now.
pub async fn list_amis(aws: &Aws, lookup: Lookup<'_>) -> Result<Vec<Ami>, AwsError> {
    let mut req = aws.ec2().describe_images().owners("self");
    req = match lookup {
        Lookup::All => req.filters(Filter::builder().name("tag-key").values(tags::HASH).build()),
        Lookup::Image(name) => req.filters(
            Filter::builder()
                .name(format!("tag:{}", tags::IMAGE))
                .values(name)
                .build(),
        ),
        Lookup::Hash(hash) => req.filters(
            Filter::builder()
                .name(format!("tag:{}", tags::HASH))
                .values(hash)
                .build(),
        ),
        Lookup::Ids(ids) => req.set_image_ids(Some(ids.to_vec())),
    };
    if !matches!(lookup, Lookup::Ids(_)) {
        // Without MaxResults AWS answers one unbounded page; with it, pages of
        // at most this many (EC2 refuses MaxResults together with ImageIds).
        req = req.max_results(DESCRIBE_IMAGES_PAGE);
    }
    let mut out = Vec::new();
    let mut pages = req.into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| AwsError::call("ec2", "DescribeImages", aws.region(), e))?;
        out.extend(
            page.images()
                .iter()
                .filter_map(|img| Ami::from_image(aws.region(), img)),
        );
    }
    Ok(out)
}

/// Every version of `image` in the given regions (one call per region, in
/// parallel), newest first.
pub async fn list_versions(
    aws: &Aws,
    image: Option<&str>,
    regions: &[String],
) -> Result<Vec<ImageVersion>, AwsError> {
    let lookup = match image {
        Some(i) => Lookup::Image(i),
        None => Lookup::All,
    };
    let results = futures::future::join_all(
        regions
            .iter()
            .map(|r| async move { list_amis(&aws.in_region(r), lookup).await }),
    )
    .await;
    let mut amis = Vec::new();
    for r in results {
        amis.extend(r?);
    }
    Ok(ImageVersion::from_amis(amis))
}

/// Resolves a ref (`web@7`, `web@latest`, `web@previous`, `web@sha256:…`,
/// `ami-…`, or a channel `web@prod`) to one version in `aws`'s region, with one
/// DescribeImages call (a channel first reads its SSM parameter).
/// The rollout uses `version.ami_in(aws.region())` as the AMI to launch.
pub async fn resolve_ref(aws: &Aws, reference: &str) -> Result<ImageVersion, RegistryError> {
    let r = parse_ref(reference)?;
    if let ImageRef::Channel { image, channel } = &r {
        let ami = channel::read(aws, image, channel).await?;
        let v = resolve_ami(aws, reference, &ami).await?;
        if v.image != *image {
            return Err(RegistryError::NotFound {
                reference: reference.to_string(),
                region: aws.region().to_string(),
                why: format!(
                    "the channel points at {ami}, which is {}@{}, not an image of {image}",
                    v.image, v.version
                ),
            });
        }
        return Ok(v);
    }
    if let ImageRef::Ami(id) = &r {
        return resolve_ami(aws, reference, id).await;
    }
    let amis = list_amis(
        aws,
        Lookup::Image(r.image().expect("named refs carry an image")),
    )
    .await?;
    let versions = ImageVersion::from_amis(amis);
    select(&versions, &r, aws.region()).cloned()
}

/// The version one AMI id (in `aws`'s region) is.
async fn resolve_ami(aws: &Aws, reference: &str, id: &str) -> Result<ImageVersion, RegistryError> {
    let ids = [id.to_string()];
    let found = list_amis(aws, Lookup::Ids(&ids)).await.or_else(|e| {
        // An unknown id is an error answer, not an empty list.
        if e.code() == Some("InvalidAMIID.NotFound") || e.code() == Some("InvalidAMIID.Malformed") {
            Ok(Vec::new())
        } else {
            Err(e)
        }
    })?;
    if found.is_empty() {
        return Err(RegistryError::NotFound {
            reference: reference.to_string(),
            region: aws.region().to_string(),
            why: format!("{id} is not an AMI kiln baked in this account"),
        });
    }
    // The version's other regions are not needed to launch here.
    let versions = ImageVersion::from_amis(found);
    select(&versions, &ImageRef::Ami(id.to_string()), aws.region()).cloned()
}
