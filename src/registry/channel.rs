//! Promotion channels: `web@prod` names whatever AMI the SSM parameter
//! `/kiln/channels/web/prod` holds in the region.
//!
//! One parameter per channel and region, of data type `aws:ec2:image`, so AWS
//! itself checks the value is an AMI the account can use (moto checks only the
//! data type name), and a launch template can even read it directly with
//! `resolve:ssm:/kiln/channels/web/prod`. Parameter Store keeps every write as a
//! parameter version, which is the channel's history (`kiln channels web`):
//! nothing else has to be recorded.

use aws_sdk_ssm::types::ParameterType;
use serde::Serialize;

use super::RegistryError;
use crate::aws::{Aws, AwsError};

/// Where every channel parameter lives; prune reads the whole tree.
pub const ROOT: &str = "/kiln/channels";
/// SSM's data type for an AMI id.
pub const DATA_TYPE: &str = "aws:ec2:image";

pub fn parameter_name(image: &str, channel: &str) -> String {
    format!("{ROOT}/{image}/{channel}")
}

/// Sets `channel` of `image` to `ami` in `aws`'s region. Returns the parameter
/// version written.
pub async fn promote(
    aws: &Aws,
    image: &str,
    channel: &str,
    ami: &str,
    description: &str,
) -> Result<i64, AwsError> {
    let out = aws
        .ssm()
        .put_parameter()
        .name(parameter_name(image, channel))
        .value(ami)
        .r#type(ParameterType::String)
        .data_type(DATA_TYPE)
        .description(description)
        .overwrite(true)
        .send()
        .await
        .map_err(|e| AwsError::call("ssm", "PutParameter", aws.region(), e))?;
    Ok(out.version())
}

/// The AMI id `channel` of `image` points at in `aws`'s region.
pub async fn read(aws: &Aws, image: &str, channel: &str) -> Result<String, RegistryError> {
    let name = parameter_name(image, channel);
    match aws.ssm().get_parameter().name(&name).send().await {
        Ok(out) => Ok(out
            .parameter()
            .and_then(|p| p.value())
            .unwrap_or_default()
            .to_string()),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_parameter_not_found()) =>
        {
            Err(RegistryError::NotFound {
                reference: format!("{image}@{channel}"),
                region: aws.region().to_string(),
                why: format!(
                    "no channel {channel} ({name} does not exist); promote a version with \
                     `kiln promote {image}@<version> --channel {channel}`"
                ),
            })
        }
        Err(e) => Err(AwsError::call("ssm", "GetParameter", aws.region(), e).into()),
    }
}

/// One channel's current value and its past values, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Channel {
    pub image: String,
    pub channel: String,
    pub region: String,
    pub parameter: String,
    /// Every write of the parameter, newest first (the first is current).
    pub history: Vec<Promotion>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Promotion {
    /// The parameter's version (1 for the first promotion).
    pub parameter_version: i64,
    pub ami: String,
    /// The image version the AMI is, when kiln still knows the AMI.
    pub version: Option<u64>,
    /// RFC 3339.
    pub at: String,
    pub by: String,
    pub description: String,
}

/// Every channel of `image` in `aws`'s region with its history
/// (GetParametersByPath, then GetParameterHistory per channel; both paginated).
pub async fn list(aws: &Aws, image: &str) -> Result<Vec<Channel>, AwsError> {
    let ssm = aws.ssm();
    let region = aws.region();
    let prefix = format!("{ROOT}/{image}");
    let mut names = Vec::new();
    let mut pages = ssm
        .get_parameters_by_path()
        .path(&prefix)
        .recursive(false)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| AwsError::call("ssm", "GetParametersByPath", region, e))?;
        names.extend(
            page.parameters()
                .iter()
                .filter_map(|p| p.name())
                .map(str::to_string),
        );
    }
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let mut history = Vec::new();
        let mut pages = ssm
            .get_parameter_history()
            .name(&name)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| AwsError::call("ssm", "GetParameterHistory", region, e))?;
            for p in page.parameters() {
                history.push(Promotion {
                    parameter_version: p.version(),
                    ami: p.value().unwrap_or_default().to_string(),
                    version: None,
                    at: p
                        .last_modified_date()
                        .and_then(|d| d.fmt(aws_smithy_types::date_time::Format::DateTime).ok())
                        .unwrap_or_default(),
                    by: p.last_modified_user().unwrap_or_default().to_string(),
                    description: p.description().unwrap_or_default().to_string(),
                });
            }
        }
        history.sort_by_key(|p| std::cmp::Reverse(p.parameter_version));
        out.push(Channel {
            image: image.to_string(),
            channel: name.rsplit('/').next().unwrap_or_default().to_string(),
            region: region.to_string(),
            parameter: name,
            history,
        });
    }
    Ok(out)
}

/// Every AMI id any channel (of any image) points at now in `aws`'s region:
/// what prune must never delete.
pub async fn all_current(aws: &Aws) -> Result<Vec<(String, String)>, AwsError> {
    let region = aws.region();
    let mut out = Vec::new();
    let mut pages = aws
        .ssm()
        .get_parameters_by_path()
        .path(ROOT)
        .recursive(true)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| AwsError::call("ssm", "GetParametersByPath", region, e))?;
        for p in page.parameters() {
            if let (Some(n), Some(v)) = (p.name(), p.value()) {
                out.push((n.to_string(), v.to_string()));
            }
        }
    }
    Ok(out)
}
