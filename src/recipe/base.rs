//! Resolving a recipe's base image to one AMI id. The resolved id, never the
//! pattern, is part of the content hash: a new upstream image is a new bake.

use aws_sdk_ec2::types::Filter;

use super::model::BaseImage;
use crate::aws::{Aws, AwsError};

#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error("base image: no available image owned by {owner} matches name {pattern:?} ({architecture}) in {region}; check [base] in the recipe or pass --base-ami")]
    NoMatch {
        owner: String,
        pattern: String,
        architecture: String,
        region: String,
    },
    #[error("base image: SSM parameter {name} in {region} holds {value:?}, not an AMI id")]
    NotAnAmi {
        name: String,
        region: String,
        value: String,
    },
    #[error(
        "base image: SSM parameter {name} does not exist in {region}; check base.ssm_parameter"
    )]
    NoParameter { name: String, region: String },
    #[error(transparent)]
    Aws(#[from] AwsError),
}

impl BaseError {
    /// A base image that does not exist is the recipe's problem to fix.
    pub fn is_input(&self) -> bool {
        match self {
            BaseError::NoMatch { .. }
            | BaseError::NotAnAmi { .. }
            | BaseError::NoParameter { .. } => true,
            BaseError::Aws(e) => e.is_input(),
        }
    }
}

/// The recipe's base image as an AMI id. A fixed `ami` is returned as is (no call);
/// `owner` + `name` picks the most recently created available match;
/// `ssm_parameter` reads the parameter.
pub async fn resolve(aws: &Aws, base: &BaseImage) -> Result<String, BaseError> {
    if let Some(ami) = &base.ami {
        return Ok(ami.clone());
    }
    if let Some(param) = &base.ssm_parameter {
        let out = aws
            .ssm()
            .get_parameter()
            .name(param)
            .send()
            .await
            .map_err(|e| {
                let not_found = e
                    .as_service_error()
                    .is_some_and(|s| s.is_parameter_not_found());
                if not_found {
                    BaseError::NoParameter {
                        name: param.clone(),
                        region: aws.region().to_string(),
                    }
                } else {
                    AwsError::call("ssm", "GetParameter", aws.region(), e).into()
                }
            })?;
        let value = out
            .parameter()
            .and_then(|p| p.value())
            .unwrap_or_default()
            .to_string();
        if !super::is_ami_id(&value) {
            return Err(BaseError::NotAnAmi {
                name: param.clone(),
                region: aws.region().to_string(),
                value,
            });
        }
        return Ok(value);
    }
    let (owner, pattern) = match (&base.owner, &base.name) {
        (Some(o), Some(n)) => (o, n),
        _ => unreachable!("validated: a base image has ami, owner+name or ssm_parameter"),
    };
    let mut pages = aws
        .ec2()
        .describe_images()
        .owners(owner)
        .filters(Filter::builder().name("name").values(pattern).build())
        .filters(
            Filter::builder()
                .name("architecture")
                .values(&base.architecture)
                .build(),
        )
        .filters(Filter::builder().name("state").values("available").build())
        .into_paginator()
        .send();
    let mut best: Option<(String, String)> = None;
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| AwsError::call("ec2", "DescribeImages", aws.region(), e))?;
        for img in page.images() {
            let (Some(id), Some(created)) = (img.image_id(), img.creation_date()) else {
                continue;
            };
            // CreationDate is ISO 8601 in UTC, so string order is time order; the
            // id breaks ties so the choice never depends on listing order.
            let candidate = (created.to_string(), id.to_string());
            if best.as_ref().is_none_or(|b| candidate > *b) {
                best = Some(candidate);
            }
        }
    }
    best.map(|(_, id)| id).ok_or_else(|| BaseError::NoMatch {
        owner: owner.clone(),
        pattern: pattern.clone(),
        architecture: base.architecture.clone(),
        region: aws.region().to_string(),
    })
}
