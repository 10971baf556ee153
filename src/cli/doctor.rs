//! `kiln doctor`: check the setup before the first bake or rollout, read-only.

use aws_sdk_ec2::types::Filter;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use serde::Serialize;

use super::Ctx;
use crate::aws::{Aws, AwsError};
use crate::config::Config;
use crate::{Error, Result};

/// Check that kiln can work here, and say how to fix what is wrong: the config
/// file, region and credentials (one EC2 DescribeRegions call), the artifact
/// bucket, the builder's subnet (private or public, and how it reaches SSM),
/// the builder's instance profile and security group, and that each --asg uses
/// a launch template (kiln rolls groups by launch template version; a legacy
/// launch configuration cannot be rolled).
///
/// Only read calls are made: doctor never creates, changes or deletes anything.
/// Exits 1 when any check fails, 2 when kiln.toml itself is invalid.
///
/// Examples:
///   kiln doctor
///   kiln doctor --asg web-prod --asg worker-prod
///   kiln doctor --region eu-west-1 --output json
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// An auto-scaling group to check (repeatable): it must exist and use a
    /// launch template. kiln.toml names no groups (rollout takes the group on
    /// the command line), so name the ones you will roll here
    #[arg(long = "asg", value_name = "NAME")]
    pub asgs: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Works, but something the operator should know (e.g. no bucket set).
    Warn,
    Fail,
    /// Not checked because an earlier check failed.
    Skip,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        }
    }
}

/// One line of the report; `--output json` prints `{"ok": bool, "checks": [Check]}`.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: String,
    pub status: Status,
    pub detail: String,
    /// How to fix it (empty when ok).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

fn ok(check: impl Into<String>, detail: impl Into<String>) -> Check {
    Check {
        check: check.into(),
        status: Status::Ok,
        detail: detail.into(),
        fix: String::new(),
    }
}

fn warn(check: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        check: check.into(),
        status: Status::Warn,
        detail: detail.into(),
        fix: fix.into(),
    }
}

fn fail(check: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        check: check.into(),
        status: Status::Fail,
        detail: detail.into(),
        fix: fix.into(),
    }
}

fn skip(check: impl Into<String>, why: impl Into<String>) -> Check {
    Check {
        check: check.into(),
        status: Status::Skip,
        detail: why.into(),
        fix: String::new(),
    }
}

#[derive(Serialize)]
struct Report<'a> {
    ok: bool,
    checks: &'a [Check],
}

pub async fn run(ctx: &mut Ctx, args: Args) -> Result<()> {
    let mut checks = Vec::new();
    let config = match ctx.config() {
        Ok(c) => c.clone(),
        Err(e) => {
            checks.push(fail(
                "config",
                e.to_string(),
                "fix kiln.toml (every key is described in kiln.toml.example)",
            ));
            report(ctx, &checks);
            return Err(e);
        }
    };
    checks.push(ok("config", config.path.display().to_string()));

    let aws = match ctx.aws().await {
        Ok(aws) => aws,
        Err(e) => {
            let (name, fix) = match &e {
                Error::Aws(AwsError::NoRegion) => (
                    "region",
                    "pass --region, set AWS_REGION, or set region in kiln.toml",
                ),
                _ => (
                    "credentials",
                    "configure credentials as for the aws CLI: aws configure, aws sso login, AWS_PROFILE, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
                ),
            };
            checks.push(fail(name, e.to_string(), fix));
            checks.push(skip("aws", "needs a region and credentials"));
            report(ctx, &checks);
            return Err(Error::ChecksFailed(1));
        }
    };
    let region_ok = check_region(&aws, &mut checks).await;
    if region_ok {
        checks.extend(check_aws(&aws, &config, &args).await);
    } else {
        checks.push(skip("aws", "needs working credentials in a usable region"));
    }
    report(ctx, &checks);
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    if failed > 0 {
        return Err(Error::ChecksFailed(failed));
    }
    Ok(())
}

fn report(ctx: &Ctx, checks: &[Check]) {
    if ctx.ui.json() {
        ctx.ui.print_json(&Report {
            ok: !checks.iter().any(|c| c.status == Status::Fail),
            checks,
        });
        return;
    }
    let width = checks.iter().map(|c| c.check.len()).max().unwrap_or(0);
    for c in checks {
        println!("{:<4}  {:<width$}  {}", c.status.label(), c.check, c.detail);
        if !c.fix.is_empty() {
            println!("{:<4}  {:<width$}  fix: {}", "", "", c.fix);
        }
    }
}

/// Credentials and region in one cheap read: DescribeRegions for this region.
async fn check_region(aws: &Aws, checks: &mut Vec<Check>) -> bool {
    let region = aws.region().to_string();
    match aws
        .ec2()
        .describe_regions()
        .region_names(&region)
        .send()
        .await
    {
        Ok(o) if o.regions().iter().any(|r| r.region_name() == Some(&region)) => {
            checks.push(ok("credentials", "accepted (ec2:DescribeRegions answered)"));
            checks.push(ok("region", region));
            true
        }
        Ok(_) => {
            checks.push(ok("credentials", "accepted (ec2:DescribeRegions answered)"));
            checks.push(fail(
                "region",
                format!("{region} is not a region this account can use"),
                "choose an enabled region (aws ec2 describe-regions) with --region, AWS_REGION or kiln.toml",
            ));
            false
        }
        Err(e) => {
            let err = AwsError::call("ec2", "DescribeRegions", &region, e);
            let fix = match err.code() {
                Some(c) if c.contains("AuthFailure") || c.contains("InvalidClientTokenId") || c.contains("SignatureDoesNotMatch") || c.contains("ExpiredToken") || c.contains("UnrecognizedClient") => {
                    "the credentials were refused: refresh them (aws sso login, new keys) or choose another profile"
                }
                Some(c) if c.contains("UnauthorizedOperation") || c.contains("AccessDenied") => {
                    "the credentials work but may not call ec2:DescribeRegions: attach iam/operator-policy.json"
                }
                Some(c) if c.contains("OptInRequired") => "enable the region for the account, or choose another",
                _ => "check network access to the EC2 endpoint (or AWS_ENDPOINT_URL) and the region name",
            };
            checks.push(fail("credentials", err.to_string(), fix));
            false
        }
    }
}

async fn check_aws(aws: &Aws, config: &Config, args: &Args) -> Vec<Check> {
    let b = &config.file.bake;
    let path = config.path.display();
    let mut out = Vec::new();
    match &b.bucket {
        Some(bucket) => out.push(check_bucket(aws, bucket).await),
        None => out.push(warn(
            "bucket",
            "[bake] bucket is not set",
            format!("images with local artifacts need it: set bucket in {path} (an S3 bucket in this region)"),
        )),
    }
    let vpc = match &b.subnet {
        Some(subnet) => {
            let (checks, vpc) = check_subnet(aws, subnet).await;
            out.extend(checks);
            vpc
        }
        None => {
            out.push(fail(
                "subnet",
                "[bake] subnet is not set",
                format!("set subnet in {path}: the subnet builders run in (private is fine)"),
            ));
            None
        }
    };
    match &b.instance_profile {
        Some(p) => out.push(check_profile(aws, p).await),
        None => out.push(fail(
            "instance profile",
            "[bake] instance_profile is not set",
            format!(
                "set instance_profile in {path}: a profile whose role has iam/builder-policy.json"
            ),
        )),
    }
    if let Some(g) = &b.security_group {
        out.push(check_security_group(aws, g, vpc.as_deref()).await);
    }
    for asg in &args.asgs {
        out.push(check_asg(aws, asg).await);
    }
    out
}

fn call_failed(check: &str, err: AwsError) -> Check {
    let fix = match err.code() {
        Some(c) if c.contains("AccessDenied") || c.contains("UnauthorizedOperation") => {
            "the credentials may not make this read call: attach iam/operator-policy.json"
        }
        _ => "retry; if it persists, check the endpoint and the region",
    };
    fail(check, err.to_string(), fix)
}

/// The bucket exists and these credentials can list kiln's prefix (the call a
/// bake makes; ListObjectsV2 also tells a missing bucket from a denied one,
/// which HeadBucket's empty 404/403 does not say in words).
async fn check_bucket(aws: &Aws, bucket: &str) -> Check {
    match aws
        .s3()
        .list_objects_v2()
        .bucket(bucket)
        .prefix(crate::bake::ARTIFACT_PREFIX)
        .max_keys(1)
        .send()
        .await
    {
        Ok(_) => ok("bucket", format!("s3://{bucket} is reachable")),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_bucket()) => fail(
            "bucket",
            format!("s3://{bucket} does not exist"),
            format!(
                "create it in {} (aws s3 mb s3://{bucket}) or set [bake] bucket to one that exists",
                aws.region()
            ),
        ),
        Err(e) => call_failed(
            "bucket",
            AwsError::call("s3", "ListObjectsV2", aws.region(), e),
        ),
    }
}

/// The subnet exists; whether it is public or private, and whether a builder
/// there can reach SSM: the checks behind "the agent never came online".
async fn check_subnet(aws: &Aws, subnet: &str) -> (Vec<Check>, Option<String>) {
    let region = aws.region();
    let ec2 = aws.ec2();
    let found = match ec2.describe_subnets().subnet_ids(subnet).send().await {
        Ok(o) => o.subnets().first().cloned(),
        Err(e) if e.code().is_some_and(|c| c.starts_with("InvalidSubnetID")) => None,
        Err(e) => {
            return (
                vec![call_failed(
                    "subnet",
                    AwsError::call("ec2", "DescribeSubnets", region, e),
                )],
                None,
            )
        }
    };
    let Some(s) = found else {
        return (
            vec![fail(
                "subnet",
                format!("{subnet} does not exist in {region}"),
                "set [bake] subnet to a subnet of this region (aws ec2 describe-subnets)",
            )],
            None,
        );
    };
    let vpc = s.vpc_id().unwrap_or_default().to_string();
    let az = s.availability_zone().unwrap_or_default();
    // The subnet's own route table, else the VPC's main one.
    let mut tables = match ec2
        .describe_route_tables()
        .filters(
            Filter::builder()
                .name("association.subnet-id")
                .values(subnet)
                .build(),
        )
        .send()
        .await
    {
        Ok(o) => o.route_tables().to_vec(),
        Err(e) => {
            return (
                vec![call_failed(
                    "subnet",
                    AwsError::call("ec2", "DescribeRouteTables", region, e),
                )],
                Some(vpc),
            )
        }
    };
    if tables.is_empty() {
        match ec2
            .describe_route_tables()
            .filters(Filter::builder().name("vpc-id").values(&vpc).build())
            .filters(
                Filter::builder()
                    .name("association.main")
                    .values("true")
                    .build(),
            )
            .send()
            .await
        {
            Ok(o) => tables = o.route_tables().to_vec(),
            Err(e) => {
                return (
                    vec![call_failed(
                        "subnet",
                        AwsError::call("ec2", "DescribeRouteTables", region, e),
                    )],
                    Some(vpc),
                )
            }
        }
    }
    let default_route = tables.iter().flat_map(|t| t.routes()).find(|r| {
        r.destination_cidr_block() == Some("0.0.0.0/0")
            && r.state().is_none_or(|s| s.as_str() == "active")
    });
    let via = default_route.and_then(|r| {
        r.gateway_id()
            .or(r.nat_gateway_id())
            .or(r.transit_gateway_id())
            .or(r.network_interface_id())
            .or(r.instance_id())
            .map(str::to_string)
    });
    let name = format!("{subnet} ({vpc}, {az})");
    let check = match via {
        Some(gw) if gw.starts_with("igw-") => {
            if s.map_public_ip_on_launch() == Some(true) {
                ok(
                    "subnet",
                    format!("{name}: public (default route via {gw}, public IPs on launch)"),
                )
            } else {
                warn(
                    "subnet",
                    format!("{name}: public (default route via {gw}) but instances get no public IP, so a builder cannot reach SSM"),
                    "use a private subnet with a NAT gateway or VPC endpoints (README, \"Networking\")",
                )
            }
        }
        Some(gw) => ok("subnet", format!("{name}: private, outbound through {gw}")),
        None => {
            return (vec![check_endpoints(aws, &name, &vpc).await], Some(vpc));
        }
    };
    (vec![check], Some(vpc))
}

/// A private subnet with no default route: SSM works only through VPC endpoints.
async fn check_endpoints(aws: &Aws, name: &str, vpc: &str) -> Check {
    let region = aws.region();
    let out = match aws
        .ec2()
        .describe_vpc_endpoints()
        .filters(Filter::builder().name("vpc-id").values(vpc).build())
        .send()
        .await
    {
        Ok(o) => o,
        Err(e) => {
            return call_failed(
                "subnet",
                AwsError::call("ec2", "DescribeVpcEndpoints", region, e),
            )
        }
    };
    let have: Vec<&str> = out
        .vpc_endpoints()
        .iter()
        .filter_map(|e| e.service_name())
        .collect();
    let missing: Vec<String> = ["ssm", "ec2messages", "ssmmessages", "s3"]
        .iter()
        .map(|s| format!("com.amazonaws.{region}.{s}"))
        .filter(|s| !have.contains(&s.as_str()))
        .collect();
    if missing.is_empty() {
        warn(
            "subnet",
            format!("{name}: private, no internet route; SSM and S3 VPC endpoints present"),
            "builders reach SSM and S3 only: recipes that download (apt, the Java tarball) need a NAT gateway, a proxy or mirrors",
        )
    } else {
        fail(
            "subnet",
            format!("{name}: private with no internet route and no VPC endpoint for {}", missing.join(", ")),
            "add a NAT gateway route, or interface endpoints for ssm, ec2messages, ssmmessages and a gateway endpoint for s3 (README, \"Networking\")",
        )
    }
}

async fn check_profile(aws: &Aws, profile: &str) -> Check {
    let name = profile.rsplit('/').next().unwrap_or(profile);
    let iam = aws.iam();
    match iam.get_instance_profile().instance_profile_name(name).send().await {
        Ok(o) => {
            let roles: Vec<&str> = o
                .instance_profile()
                .map(|p| p.roles().iter().map(|r| r.role_name()).collect())
                .unwrap_or_default();
            if roles.is_empty() {
                fail(
                    "instance profile",
                    format!("{name} has no role, so a builder gets no credentials for SSM"),
                    format!("aws iam add-role-to-instance-profile --instance-profile-name {name} --role-name <a role with iam/builder-policy.json>"),
                )
            } else {
                ok("instance profile", format!("{name} (role {})", roles.join(", ")))
            }
        }
        Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_entity_exception()) => fail(
            "instance profile",
            format!("{name} does not exist"),
            "create it with a role trusted by ec2.amazonaws.com (iam/builder-trust.json) that has iam/builder-policy.json",
        ),
        Err(e) => call_failed(
            "instance profile",
            AwsError::call("iam", "GetInstanceProfile", aws.region(), e),
        ),
    }
}

async fn check_security_group(aws: &Aws, group: &str, vpc: Option<&str>) -> Check {
    match aws.ec2().describe_security_groups().group_ids(group).send().await {
        Ok(o) => match o.security_groups().first() {
            Some(g) if vpc.is_some() && g.vpc_id() != vpc => fail(
                "security group",
                format!("{group} is in {}, the subnet in {}", g.vpc_id().unwrap_or("?"), vpc.unwrap_or("?")),
                "choose a security group of the subnet's VPC, or remove [bake] security_group to use a temporary one",
            ),
            Some(g) if !g.ip_permissions().is_empty() => warn(
                "security group",
                format!("{group} has {} inbound rule(s); a builder needs none", g.ip_permissions().len()),
                "kiln provisions through SSM: no inbound rule is needed",
            ),
            Some(_) => ok("security group", format!("{group}, no inbound rules")),
            None => missing_group(group, aws.region()),
        },
        Err(e) if e.code().is_some_and(|c| c.starts_with("InvalidGroup")) => {
            missing_group(group, aws.region())
        }
        Err(e) => call_failed(
            "security group",
            AwsError::call("ec2", "DescribeSecurityGroups", aws.region(), e),
        ),
    }
}

fn missing_group(group: &str, region: &str) -> Check {
    fail(
        "security group",
        format!("{group} does not exist in {region}"),
        "set [bake] security_group to an existing group, or remove it to use a temporary one",
    )
}

async fn check_asg(aws: &Aws, name: &str) -> Check {
    let check = format!("asg {name}");
    let out = match aws
        .autoscaling()
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(name)
        .send()
        .await
    {
        Ok(o) => o,
        Err(e) => {
            return call_failed(
                &check,
                AwsError::call("autoscaling", "DescribeAutoScalingGroups", aws.region(), e),
            )
        }
    };
    let Some(g) = out.auto_scaling_groups().first() else {
        return fail(
            check,
            format!("no auto-scaling group {name} in {}", aws.region()),
            "check the name and the region (aws autoscaling describe-auto-scaling-groups)",
        );
    };
    let size = format!(
        "min {} / desired {} / max {}",
        g.min_size().unwrap_or_default(),
        g.desired_capacity().unwrap_or_default(),
        g.max_size().unwrap_or_default()
    );
    let template = g.launch_template().or_else(|| {
        g.mixed_instances_policy()
            .and_then(|m| m.launch_template())
            .and_then(|t| t.launch_template_specification())
    });
    if let Some(t) = template {
        let id = t
            .launch_template_id()
            .or(t.launch_template_name())
            .unwrap_or("?");
        let version = t.version().unwrap_or("$Default");
        let mixed = if g.launch_template().is_none() {
            " (mixed instances policy)"
        } else {
            ""
        };
        return ok(
            check,
            format!("launch template {id} version {version}{mixed}; {size}"),
        );
    }
    match g.launch_configuration_name() {
        Some(lc) => fail(
            check,
            format!("uses launch configuration {lc}; kiln rolls groups by launch template version"),
            "move the group to a launch template: in the console \"Copy to launch template\", or aws ec2 create-launch-template from the configuration's settings, then aws autoscaling update-auto-scaling-group --launch-template; in Terraform replace launch_configuration with a launch_template block",
        ),
        None => fail(
            check,
            "has neither a launch template nor a launch configuration",
            "give the group a launch template",
        ),
    }
}
