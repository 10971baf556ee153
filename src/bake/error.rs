use crate::aws::AwsError;
use crate::registry::RegistryError;

/// Everything a bake can fail with. Each message names the resource and the fix.
#[derive(Debug, thiserror::Error)]
pub enum BakeError {
    #[error("{path}: [bake] {field} is not set: {why}")]
    NotConfigured {
        path: String,
        field: &'static str,
        why: &'static str,
    },
    #[error("S3 bucket {bucket} does not exist or is not readable in {region}; create it or fix [bake] bucket in kiln.toml")]
    NoBucket { bucket: String, region: String },
    #[error("subnet {subnet} does not exist in {region}; fix [bake] subnet in kiln.toml")]
    NoSubnet { subnet: String, region: String },
    #[error("instance profile {profile} does not exist; create it (SSM managed-instance policy + read of the bucket) or fix [bake] instance_profile in kiln.toml")]
    NoInstanceProfile { profile: String },
    #[error("security group {group} does not exist in {region}; fix [bake] security_group in kiln.toml or remove it to use a temporary one")]
    NoSecurityGroup { group: String, region: String },
    #[error("base AMI {ami} does not exist in {region}; fix [base] in the recipe")]
    NoBaseAmi { ami: String, region: String },
    #[error("builder.root_volume_gib in the recipe: {why}")]
    RootVolume { why: String },
    #[error("the provisioning command for {image} is {size} bytes, over the {limit}-byte limit of SSM Run Command; move large rendered files into artifacts")]
    TooLarge {
        image: String,
        size: usize,
        limit: usize,
    },
    #[error("{0}")]
    Command(Box<CommandFailure>),
    #[error("the SSM agent on {instance} in {region} did not accept a command within {waited}; check that instance profile {profile} allows SSM and the subnet reaches the SSM endpoints")]
    AgentTimeout {
        instance: String,
        region: String,
        waited: String,
        profile: String,
    },
    #[error("{what} on {instance} in {region} did not finish within {waited}; raise [bake] provision_timeout or check the command")]
    CommandTimeout {
        what: &'static str,
        instance: String,
        region: String,
        waited: String,
    },
    #[error("{ami} in {region} is not available after {waited}; it was kept: run the bake again to find it by hash and keep waiting")]
    WaitTimeout {
        ami: String,
        region: String,
        waited: String,
    },
    #[error("{ami} in {region} became {state}: {reason}; run the bake again to build a new one")]
    ImageFailed {
        ami: String,
        region: String,
        state: String,
        reason: String,
    },
    #[error("copies failed in {failed} of {total} region(s): {details}; run the bake again to retry only those")]
    Copies {
        failed: usize,
        total: usize,
        details: String,
    },
    #[error("interrupted; temporary resources were cleaned up")]
    Interrupted,
    #[error("{0}; run `kiln gc` to remove what is left")]
    Cleanup(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Aws(#[from] AwsError),
}

impl BakeError {
    /// Missing or wrong settings and resources named by the operator (exit 2).
    pub fn is_input(&self) -> bool {
        match self {
            BakeError::NotConfigured { .. }
            | BakeError::NoBucket { .. }
            | BakeError::NoSubnet { .. }
            | BakeError::NoInstanceProfile { .. }
            | BakeError::NoSecurityGroup { .. }
            | BakeError::NoBaseAmi { .. }
            | BakeError::RootVolume { .. }
            | BakeError::TooLarge { .. } => true,
            BakeError::Registry(e) => e.is_input(),
            BakeError::Aws(e) => e.is_input(),
            BakeError::Command(_)
            | BakeError::AgentTimeout { .. }
            | BakeError::CommandTimeout { .. }
            | BakeError::WaitTimeout { .. }
            | BakeError::ImageFailed { .. }
            | BakeError::Copies { .. }
            | BakeError::Interrupted
            | BakeError::Cleanup(_) => false,
        }
    }

    pub fn is_interrupted(&self) -> bool {
        matches!(self, BakeError::Interrupted)
    }
}

/// A command run through SSM that did not succeed.
#[derive(Debug, thiserror::Error)]
#[error("{what} on {instance} in {region} ended {status}{code}; its output is above. {after}")]
pub struct CommandFailure {
    pub what: &'static str,
    pub instance: String,
    pub region: String,
    pub status: String,
    /// ` with exit code N`, or empty when SSM reported none.
    pub code: String,
    pub after: &'static str,
}
