//! `kiln doctor` through the real CLI against moto: a healthy estate passes
//! with only read calls; a broken one prints a FAIL line, with its fix, for each
//! problem and exits 1; an invalid kiln.toml exits 2.

use serde_json::Value;

use crate::support::cli::{Project, EXIT_BAD_INPUT, EXIT_FAILED};
use crate::support::moto::{self, TRUSTY_NEWEST};
use crate::support::proxy::Proxy;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// What a healthy estate holds: names a kiln.toml and `--asg` point at.
struct Estate {
    bucket: String,
    profile: String,
    subnet: String,
    asg: String,
}

/// A private subnet behind a NAT gateway, a bucket, an instance profile with a
/// role, and an ASG on a launch template: what an operator's IaC would make.
async fn healthy_estate() -> Estate {
    let conf = moto::sdk_config(moto::endpoint()).await;
    let ec2 = aws_sdk_ec2::Client::new(&conf);
    let vpc = ec2
        .create_vpc()
        .cidr_block("10.40.0.0/16")
        .send()
        .await
        .unwrap()
        .vpc()
        .unwrap()
        .vpc_id()
        .unwrap()
        .to_string();
    let subnet_of = |cidr: &'static str| {
        let ec2 = ec2.clone();
        let vpc = vpc.clone();
        async move {
            ec2.create_subnet()
                .vpc_id(vpc)
                .cidr_block(cidr)
                .send()
                .await
                .unwrap()
                .subnet()
                .unwrap()
                .subnet_id()
                .unwrap()
                .to_string()
        }
    };
    let public = subnet_of("10.40.0.0/24").await;
    let private = subnet_of("10.40.1.0/24").await;
    let eip = ec2
        .allocate_address()
        .domain(aws_sdk_ec2::types::DomainType::Vpc)
        .send()
        .await
        .unwrap();
    let nat = ec2
        .create_nat_gateway()
        .subnet_id(&public)
        .allocation_id(eip.allocation_id().unwrap())
        .send()
        .await
        .unwrap();
    let table = ec2
        .create_route_table()
        .vpc_id(&vpc)
        .send()
        .await
        .unwrap()
        .route_table()
        .unwrap()
        .route_table_id()
        .unwrap()
        .to_string();
    ec2.create_route()
        .route_table_id(&table)
        .destination_cidr_block("0.0.0.0/0")
        .nat_gateway_id(nat.nat_gateway().unwrap().nat_gateway_id().unwrap())
        .send()
        .await
        .unwrap();
    ec2.associate_route_table()
        .route_table_id(&table)
        .subnet_id(&private)
        .send()
        .await
        .unwrap();

    let bucket = moto::unique("doctor-bucket");
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&conf)
            .force_path_style(true)
            .build(),
    )
    .create_bucket()
    .bucket(&bucket)
    .send()
    .await
    .unwrap();

    let iam = aws_sdk_iam::Client::new(&conf);
    let profile = moto::unique("doctor-builder");
    iam.create_role()
        .role_name(&profile)
        .assume_role_policy_document(include_str!("../iam/builder-trust.json"))
        .send()
        .await
        .unwrap();
    iam.create_instance_profile()
        .instance_profile_name(&profile)
        .send()
        .await
        .unwrap();
    iam.add_role_to_instance_profile()
        .instance_profile_name(&profile)
        .role_name(&profile)
        .send()
        .await
        .unwrap();

    let asg = moto::unique("doctor-web");
    let lt = ec2
        .create_launch_template()
        .launch_template_name(&asg)
        .launch_template_data(
            aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                .image_id(TRUSTY_NEWEST)
                .instance_type(aws_sdk_ec2::types::InstanceType::T2Small)
                .build(),
        )
        .send()
        .await
        .unwrap();
    aws_sdk_autoscaling::Client::new(&conf)
        .create_auto_scaling_group()
        .auto_scaling_group_name(&asg)
        .launch_template(
            aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                .launch_template_id(lt.launch_template().unwrap().launch_template_id().unwrap())
                .version("1")
                .build(),
        )
        .min_size(0)
        .max_size(2)
        .desired_capacity(0)
        .vpc_zone_identifier(&private)
        .send()
        .await
        .unwrap();
    Estate {
        bucket,
        profile,
        subnet: private,
        asg,
    }
}

fn project_for(bucket: &str, subnet: &str, profile: &str) -> Project {
    let project = Project::new();
    project.write(
        "kiln.toml",
        &format!(
            "region = \"{}\"\n[bake]\nbucket = \"{bucket}\"\nsubnet = \"{subnet}\"\ninstance_profile = \"{profile}\"\n",
            moto::REGION
        ),
    );
    project
}

/// The status column of the line for `check`.
fn status_of<'a>(stdout: &'a str, check: &str) -> Option<&'a str> {
    stdout.lines().find_map(|l| {
        let (status, rest) = l.split_once("  ")?;
        rest.trim_start()
            .starts_with(check)
            .then_some(status.trim())
    })
}

#[test]
fn healthy_estate_passes_with_read_calls_only() {
    let estate = rt().block_on(healthy_estate());
    let project = project_for(&estate.bucket, &estate.subnet, &estate.profile);
    let proxy = Proxy::start(moto::endpoint());
    let run = project.kiln(&proxy.endpoint(), &["doctor", "--asg", &estate.asg]);
    run.expect_ok();
    for check in [
        "config",
        "credentials",
        "region",
        "bucket",
        "subnet",
        "instance profile",
        "asg ",
    ] {
        assert_eq!(status_of(&run.stdout, check), Some("ok"), "{check}\n{run}");
    }
    assert!(
        run.stdout.contains("private, outbound through nat-"),
        "{run}"
    );
    assert!(run.stdout.contains("launch template lt-"), "{run}");
    assert!(proxy.total_calls() > 0, "{}", proxy.summary());
    assert_eq!(proxy.mutating_calls(), 0, "{}", proxy.summary());

    // The same report as one JSON document.
    let run = project.kiln(
        &proxy.endpoint(),
        &["doctor", "--asg", &estate.asg, "--output", "json"],
    );
    run.expect_ok();
    let v: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["ok"], true, "{run}");
    let checks = v["checks"].as_array().unwrap();
    assert!(checks.len() >= 7, "{run}");
    for c in checks {
        assert_eq!(c["status"], "ok", "{run}");
        assert!(c["check"].is_string() && c["detail"].is_string(), "{run}");
    }
    assert_eq!(proxy.mutating_calls(), 0, "{}", proxy.summary());
}

#[test]
fn broken_estate_prints_each_failure_with_its_fix_and_exits_1() {
    let estate = rt().block_on(healthy_estate());
    // An ASG on a legacy launch configuration.
    let legacy = moto::unique("doctor-legacy");
    rt().block_on(async {
        let conf = moto::sdk_config(moto::endpoint()).await;
        let asc = aws_sdk_autoscaling::Client::new(&conf);
        asc.create_launch_configuration()
            .launch_configuration_name(&legacy)
            .image_id(TRUSTY_NEWEST)
            .instance_type("t2.small")
            .send()
            .await
            .unwrap();
        asc.create_auto_scaling_group()
            .auto_scaling_group_name(&legacy)
            .launch_configuration_name(&legacy)
            .min_size(0)
            .max_size(1)
            .desired_capacity(0)
            .vpc_zone_identifier(&estate.subnet)
            .send()
            .await
            .unwrap();
    });
    let missing_bucket = moto::unique("doctor-no-such-bucket");
    let missing_profile = moto::unique("doctor-no-such-profile");
    let missing_asg = moto::unique("doctor-no-such-asg");
    let project = project_for(&missing_bucket, &estate.subnet, &missing_profile);
    let proxy = Proxy::start(moto::endpoint());
    let run = project.kiln(
        &proxy.endpoint(),
        &[
            "doctor",
            "--asg",
            &estate.asg,
            "--asg",
            &legacy,
            "--asg",
            &missing_asg,
        ],
    );
    run.expect_code(EXIT_FAILED);
    let line = |needle: &str| {
        run.stdout
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?}\n{run}"))
    };
    assert!(
        line(&format!("s3://{missing_bucket} does not exist")).starts_with("FAIL  bucket"),
        "{run}"
    );
    assert!(
        line(&format!("{missing_profile} does not exist")).starts_with("FAIL  instance profile"),
        "{run}"
    );
    assert!(
        line(&format!("uses launch configuration {legacy}"))
            .starts_with(&format!("FAIL  asg {legacy}")),
        "{run}"
    );
    assert!(
        line(&format!("no auto-scaling group {missing_asg}")).starts_with("FAIL"),
        "{run}"
    );
    // What still works is still ok, and every failure says how to fix it.
    assert_eq!(status_of(&run.stdout, "credentials"), Some("ok"), "{run}");
    assert_eq!(status_of(&run.stdout, "subnet"), Some("ok"), "{run}");
    assert_eq!(
        status_of(&run.stdout, &format!("asg {}", estate.asg)),
        Some("ok"),
        "{run}"
    );
    let fails = run.stdout.lines().filter(|l| l.starts_with("FAIL")).count();
    let fixes = run
        .stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("fix:"))
        .count();
    assert_eq!(fails, 4, "{run}");
    assert!(fixes >= fails, "{run}");
    assert!(
        line("fix: move the group to a launch template").contains("launch_template"),
        "{run}"
    );
    assert!(run.stderr.contains("4 check(s) failed"), "{run}");
    assert_eq!(proxy.mutating_calls(), 0, "{}", proxy.summary());
}

#[test]
fn missing_subnet_and_unset_keys_fail() {
    let project = Project::new();
    project.write(
        "kiln.toml",
        &format!(
            "region = \"{}\"\n[bake]\nsubnet = \"subnet-0000000000000dead\"\n",
            moto::REGION
        ),
    );
    let proxy = Proxy::start(moto::endpoint());
    let run = project.kiln(&proxy.endpoint(), &["doctor"]);
    run.expect_code(EXIT_FAILED);
    assert_eq!(status_of(&run.stdout, "subnet"), Some("FAIL"), "{run}");
    assert!(
        run.stdout
            .contains("subnet-0000000000000dead does not exist"),
        "{run}"
    );
    assert_eq!(
        status_of(&run.stdout, "instance profile"),
        Some("FAIL"),
        "{run}"
    );
    assert_eq!(status_of(&run.stdout, "bucket"), Some("warn"), "{run}");
    assert_eq!(proxy.mutating_calls(), 0, "{}", proxy.summary());
}

#[test]
fn invalid_config_exits_2_before_any_call() {
    let project = Project::new();
    project.write(
        "kiln.toml",
        "region = \"us-east-1\"\n[bake]\nbukket = \"x\"\n",
    );
    let proxy = Proxy::start(moto::endpoint());
    let run = project.kiln(&proxy.endpoint(), &["doctor"]);
    run.expect_code(EXIT_BAD_INPUT);
    assert_eq!(status_of(&run.stdout, "config"), Some("FAIL"), "{run}");
    assert!(run.stdout.contains("bukket"), "{run}");
    assert_eq!(proxy.total_calls(), 0, "{}", proxy.summary());
}
