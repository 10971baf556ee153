//! AWS access: one [`Aws`] per region, built from aws-config's ordinary chain so
//! `AWS_PROFILE`, `AWS_REGION`, `AWS_ENDPOINT_URL` and credentials work exactly as
//! with the aws CLI. Retries and timeouts are configured once, here.

use std::time::Duration;

pub mod attempts;
pub mod fleet;
mod http;
pub mod journal;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::{future, ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_sdk_ec2::config::retry::{RetryPartition, TokenBucket};
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

/// Attempts per call, first included. Throttling and 5xx answers are retried with
/// exponential backoff and jitter (the SDK's standard mode); eight attempts ride
/// out a burst of throttling without hiding an outage for minutes.
pub const MAX_ATTEMPTS: u32 = 8;
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
pub const MAX_BACKOFF: Duration = Duration::from_secs(20);
/// One attempt that hangs this long is abandoned and retried.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    #[error("no AWS region: pass --region, set AWS_REGION, or set region in kiln.toml")]
    NoRegion,
    #[error("no usable AWS credentials{profile}: {message}; configure them as for the aws CLI (aws configure, AWS_PROFILE, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")]
    NoCredentials { profile: String, message: String },
    #[error("{service}:{operation} in {region}: {message}")]
    Call {
        service: &'static str,
        operation: &'static str,
        region: String,
        code: Option<String>,
        message: String,
    },
}

impl AwsError {
    /// Wraps an SDK error with the operation and region an operator needs.
    pub fn call<E>(
        service: &'static str,
        operation: &'static str,
        region: &str,
        err: SdkError<E, aws_smithy_runtime_api::http::Response>,
    ) -> AwsError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let code = err.code().map(str::to_string);
        let message = match (&err, err.code(), err.message()) {
            (_, Some(code), Some(msg)) => format!("{code}: {msg}"),
            (_, Some(code), None) => code.to_string(),
            (SdkError::DispatchFailure(d), _, _) => {
                let detail = d
                    .as_connector_error()
                    .map(|c| crate::config::one_line(&error_chain(c)))
                    .unwrap_or_else(|| "dispatch failure".to_string());
                format!("could not reach the endpoint ({detail})")
            }
            (SdkError::TimeoutError(_), _, _) => "timed out".to_string(),
            _ => crate::config::one_line(&error_chain(&err)),
        };
        AwsError::Call {
            service,
            operation,
            region: region.to_string(),
            code,
            message,
        }
    }

    /// The AWS error code, when the service answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            AwsError::Call { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// AWS says a resource named in the request does not exist (a deleted launch
    /// template or target group an ASG still points at).
    pub fn is_missing_resource(&self) -> bool {
        matches!(
            self.code(),
            Some(
                "InvalidLaunchTemplateId.NotFound"
                    | "InvalidLaunchTemplateName.NotFoundException"
                    | "InvalidLaunchTemplateId.VersionNotFound"
                    | "TargetGroupNotFound"
            )
        )
    }

    /// Missing region or credentials are the operator's setup to fix.
    pub fn is_input(&self) -> bool {
        matches!(self, AwsError::NoRegion | AwsError::NoCredentials { .. })
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// What the operator chose, before aws-config's chain fills the gaps.
#[derive(Debug, Clone, Default)]
pub struct AwsSettings {
    /// `--region`; wins over everything.
    pub region: Option<String>,
    /// `--profile`; wins over `AWS_PROFILE`.
    pub profile: Option<String>,
    /// kiln.toml `region`: used when neither `--region` nor the environment sets one.
    pub default_region: Option<String>,
    /// kiln.toml `profile`: used when neither `--profile` nor `AWS_PROFILE` is set.
    pub default_profile: Option<String>,
    /// kiln.toml `endpoint_url`: used when `AWS_ENDPOINT_URL` is not set.
    pub default_endpoint_url: Option<String>,
}

/// How every call is retried: the SDK's standard mode (exponential backoff with
/// jitter on throttling, 5xx and dropped connections), [`MAX_ATTEMPTS`] attempts
/// from [`INITIAL_BACKOFF`] up to [`MAX_BACKOFF`] apart.
pub fn retry_config() -> RetryConfig {
    RetryConfig::standard()
        .with_max_attempts(MAX_ATTEMPTS)
        .with_initial_backoff(INITIAL_BACKOFF)
        .with_max_backoff(MAX_BACKOFF)
}

/// Retries without the SDK's retry quota. By default every client shares a
/// bucket of 500 tokens per process; a throttled retry costs 5, a dropped
/// connection 10, and only a call that succeeds at once earns one back, so a
/// burst of throttling (a fan-out, an account-wide throttle during a long
/// rollout) empties it after about 100 retries and every call still throttled
/// then fails at once, without backoff: a bake or rollout stops on a call that
/// would have succeeded a second later. That quota protects a service from a
/// fleet of clients retrying in step; kiln is one operator's process whose
/// retries are already bounded per call ([`MAX_ATTEMPTS`], backoff up to
/// [`MAX_BACKOFF`]), so it keeps retrying instead (issue 5, found by
/// `sustained_throttling_does_not_exhaust_the_retry_quota`).
fn retry_partition(service: &'static str) -> RetryPartition {
    RetryPartition::custom(format!("kiln-{service}"))
        .token_bucket(TokenBucket::unlimited())
        .build()
}

/// One attempt that hangs [`ATTEMPT_TIMEOUT`] is abandoned (and retried).
pub fn timeout_config() -> TimeoutConfig {
    TimeoutConfig::builder()
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .build()
}

/// The credentials chain, answering its first request with the credentials
/// `Aws::connect` already resolved (while they are still valid).
#[derive(Debug)]
struct Checked {
    first: std::sync::Mutex<Option<Credentials>>,
    chain: SharedCredentialsProvider,
}

impl ProvideCredentials for Checked {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        let first = self
            .first
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .filter(|c| {
                c.expiry()
                    .is_none_or(|at| at > std::time::SystemTime::now() + Duration::from_secs(60))
            });
        match first {
            Some(c) => future::ProvideCredentials::ready(Ok(c)),
            None => self.chain.provide_credentials(),
        }
    }
}

/// A connection to AWS in one region.
#[derive(Debug, Clone)]
pub struct Aws {
    config: SdkConfig,
    region: String,
}

fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

impl Aws {
    /// Loads the SDK configuration and checks that a region and credentials exist,
    /// so a missing one is a clear error before any call is attempted.
    pub async fn connect(settings: &AwsSettings) -> Result<Aws, AwsError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http::shared_client())
            .retry_config(retry_config())
            .timeout_config(timeout_config());
        let profile = settings.profile.clone().or_else(|| {
            (!env_set("AWS_PROFILE"))
                .then(|| settings.default_profile.clone())
                .flatten()
        });
        if let Some(p) = &profile {
            loader = loader.profile_name(p);
        }
        if let Some(r) = &settings.region {
            loader = loader.region(Region::new(r.clone()));
        } else if !env_set("AWS_REGION") && !env_set("AWS_DEFAULT_REGION") {
            if let Some(r) = &settings.default_region {
                loader = loader.region(Region::new(r.clone()));
            }
        }
        if !env_set("AWS_ENDPOINT_URL") {
            if let Some(url) = &settings.default_endpoint_url {
                loader = loader.endpoint_url(url);
            }
        }
        let config = loader.load().await;
        let region = config
            .region()
            .map(|r| r.to_string())
            .ok_or(AwsError::NoRegion)?;
        let provider = config
            .credentials_provider()
            .ok_or_else(|| AwsError::NoCredentials {
                profile: String::new(),
                message: "no credentials provider".to_string(),
            })?;
        let checked = match provider.provide_credentials().await {
            Ok(c) => c,
            Err(e) => {
                return Err(AwsError::NoCredentials {
                    profile: profile
                        .map(|p| format!(" for profile {p:?}"))
                        .unwrap_or_default(),
                    // The provider's own message names what it tried; it never
                    // holds secret values.
                    message: crate::config::one_line(&error_chain(&e)),
                });
            }
        };
        // The SDK's identity cache starts empty and would resolve the chain again
        // on the first call (for an assumed role, another STS call): hand it the
        // credentials just checked instead.
        let config = config
            .to_builder()
            .credentials_provider(SharedCredentialsProvider::new(Checked {
                first: std::sync::Mutex::new(Some(checked)),
                chain: provider,
            }))
            .build();
        Ok(Aws { config, region })
    }

    /// An [`Aws`] over a configuration loaded elsewhere (tests and tools; the CLI
    /// uses [`Aws::connect`]). Pass it [`retry_config`] and [`timeout_config`] to
    /// behave like kiln. `None` without a region.
    pub fn from_sdk_config(config: SdkConfig) -> Option<Aws> {
        let region = config.region()?.to_string();
        Some(Aws { config, region })
    }

    /// The same credentials and settings in another region.
    pub fn in_region(&self, region: &str) -> Aws {
        let config = self
            .config
            .to_builder()
            .region(Region::new(region.to_string()))
            .build();
        Aws {
            config,
            region: region.to_string(),
        }
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn sdk_config(&self) -> &SdkConfig {
        &self.config
    }

    pub fn ec2(&self) -> aws_sdk_ec2::Client {
        aws_sdk_ec2::Client::from_conf(
            aws_sdk_ec2::config::Builder::from(&self.config)
                .retry_partition(retry_partition("ec2"))
                .build(),
        )
    }

    pub fn autoscaling(&self) -> aws_sdk_autoscaling::Client {
        aws_sdk_autoscaling::Client::from_conf(
            aws_sdk_autoscaling::config::Builder::from(&self.config)
                .retry_partition(retry_partition("autoscaling"))
                .build(),
        )
    }

    pub fn ssm(&self) -> aws_sdk_ssm::Client {
        aws_sdk_ssm::Client::from_conf(
            aws_sdk_ssm::config::Builder::from(&self.config)
                .retry_partition(retry_partition("ssm"))
                .build(),
        )
    }

    pub fn elbv2(&self) -> aws_sdk_elasticloadbalancingv2::Client {
        aws_sdk_elasticloadbalancingv2::Client::from_conf(
            aws_sdk_elasticloadbalancingv2::config::Builder::from(&self.config)
                .retry_partition(retry_partition("elasticloadbalancing"))
                .build(),
        )
    }

    pub fn iam(&self) -> aws_sdk_iam::Client {
        aws_sdk_iam::Client::from_conf(
            aws_sdk_iam::config::Builder::from(&self.config)
                .retry_partition(retry_partition("iam"))
                .build(),
        )
    }

    /// S3 with path-style addressing when a custom endpoint is in use (local
    /// emulators do not resolve bucket subdomains).
    pub fn s3(&self) -> aws_sdk_s3::Client {
        let custom_endpoint = self.config.endpoint_url().is_some();
        let conf = aws_sdk_s3::config::Builder::from(&self.config)
            .retry_partition(retry_partition("s3"))
            .force_path_style(custom_endpoint)
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }
}
