//! Tests of the harness itself: moto has the base images tests rely on, and the
//! proxy's faults reach the AWS SDK the way real AWS faults would.

use std::time::{Duration, Instant};

use aws_config::retry::RetryConfig;
use aws_config::SdkConfig;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::Filter;
use aws_sdk_ssm::types::CommandInvocationStatus;

use crate::support::moto::{
    self, CANONICAL, TRUSTY_ALL, TRUSTY_NEWEST, TRUSTY_NEWEST_NAME, TRUSTY_PATTERN,
};
use crate::support::proxy::{replace_all, Call, Fault, Proxy};
use crate::support::{sdk_config_loader, unique};

async fn config(endpoint: &str, retry: RetryConfig) -> SdkConfig {
    sdk_config_loader(endpoint).retry_config(retry).load().await
}

/// Quick retries, so a test with many faults stays fast.
fn fast_retries(max_attempts: u32) -> RetryConfig {
    RetryConfig::standard()
        .with_max_attempts(max_attempts)
        .with_initial_backoff(Duration::from_millis(1))
        .with_max_backoff(Duration::from_millis(20))
}

fn s3_client(config: &SdkConfig) -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(config)
            .force_path_style(true)
            .build(),
    )
}

async fn trusty_images(
    ec2: &aws_sdk_ec2::Client,
) -> Result<Vec<aws_sdk_ec2::types::Image>, aws_sdk_ec2::Error> {
    let out = ec2
        .describe_images()
        .owners(CANONICAL)
        .filters(
            Filter::builder()
                .name("name")
                .values(TRUSTY_PATTERN)
                .build(),
        )
        .send()
        .await?;
    Ok(out.images.unwrap_or_default())
}

#[tokio::test]
async fn moto_knows_canonical_trusty_images_and_the_proxy_passes_them_through() {
    let proxy = Proxy::start(moto::endpoint());
    let ec2 = aws_sdk_ec2::Client::new(&config(&proxy.endpoint(), RetryConfig::disabled()).await);

    let images = trusty_images(&ec2)
        .await
        .expect("DescribeImages through the proxy");

    let mut ids: Vec<&str> = images.iter().filter_map(|i| i.image_id()).collect();
    ids.sort_unstable();
    let mut expected = TRUSTY_ALL.to_vec();
    expected.sort_unstable();
    assert_eq!(
        ids, expected,
        "owner + name pattern must exclude the decoys"
    );
    let newest = images
        .iter()
        .max_by_key(|i| i.creation_date().unwrap_or_default().to_string())
        .expect("at least one image");
    assert_eq!(newest.image_id(), Some(TRUSTY_NEWEST));
    assert_eq!(newest.name(), Some(TRUSTY_NEWEST_NAME));
    assert_eq!(newest.owner_id(), Some(CANONICAL));

    assert_eq!(
        proxy.calls(),
        vec![Call {
            operation: crate::support::proxy::Operation {
                service: "ec2".into(),
                name: "DescribeImages".into(),
            },
            mutating: false,
            fault: None,
            forwarded: true,
            status: Some(200),
            rewritten: false,
        }]
    );
}

#[tokio::test]
async fn throttling_is_answered_in_each_service_own_shape() {
    let proxy = Proxy::start(moto::endpoint());
    proxy.set_throttle_rate(1.0);
    let config = config(&proxy.endpoint(), RetryConfig::disabled()).await;

    let ec2 = aws_sdk_ec2::Client::new(&config)
        .describe_images()
        .owners(CANONICAL)
        .send()
        .await;
    let asg = aws_sdk_autoscaling::Client::new(&config)
        .describe_auto_scaling_groups()
        .send()
        .await;
    let ssm = aws_sdk_ssm::Client::new(&config)
        .describe_parameters()
        .send()
        .await;
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&config)
        .describe_load_balancers()
        .send()
        .await;
    let s3 = s3_client(&config).list_buckets().send().await;

    let ec2 = ec2.expect_err("EC2 call must fail while throttled");
    assert_eq!(ec2.code(), Some("RequestLimitExceeded"), "{ec2:?}");
    assert_eq!(ec2.message(), Some("Request limit exceeded."));
    let asg = asg.expect_err("Auto Scaling call must fail while throttled");
    assert_eq!(asg.code(), Some("Throttling"), "{asg:?}");
    let ssm = ssm.expect_err("SSM call must fail while throttled");
    assert_eq!(ssm.code(), Some("ThrottlingException"), "{ssm:?}");
    let elb = elb.expect_err("ELBv2 call must fail while throttled");
    assert_eq!(elb.code(), Some("Throttling"), "{elb:?}");
    let s3 = s3.expect_err("S3 call must fail while throttled");
    assert_eq!(s3.code(), Some("SlowDown"), "{s3:?}");

    // Retries off: one attempt each, and every one throttled.
    assert_eq!(proxy.total_calls(), 5, "{}", proxy.summary());
    assert_eq!(proxy.faulted(Fault::Throttle), 5, "{}", proxy.summary());
    for op in [
        "ec2:DescribeImages",
        "autoscaling:DescribeAutoScalingGroups",
        "ssm:DescribeParameters",
        "elasticloadbalancing:DescribeLoadBalancers",
        "s3:ListBuckets",
    ] {
        assert_eq!(
            proxy.count(op),
            1,
            "{op} not identified\n{}",
            proxy.summary()
        );
    }
}

#[tokio::test]
async fn the_sdk_retries_throttling_and_server_errors() {
    let proxy = Proxy::start(moto::endpoint());
    let config = config(&proxy.endpoint(), fast_retries(3)).await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let ssm = aws_sdk_ssm::Client::new(&config);
    let asg = aws_sdk_autoscaling::Client::new(&config);

    // One fault, then moto answers: the SDK must have treated the fault as retryable.
    for (op, fault) in [
        ("ec2:DescribeImages", Fault::Throttle),
        ("ssm:DescribeParameters", Fault::Throttle),
        ("autoscaling:DescribeAutoScalingGroups", Fault::Throttle),
        ("ec2:DescribeImages", Fault::ServerError),
        ("ssm:DescribeParameters", Fault::ServerError),
    ] {
        proxy.inject(op, fault);
    }
    trusty_images(&ec2)
        .await
        .expect("throttled once, then answered");
    ssm.describe_parameters()
        .send()
        .await
        .expect("throttled once, then answered");
    asg.describe_auto_scaling_groups()
        .send()
        .await
        .expect("throttled once, then answered");
    trusty_images(&ec2).await.expect("500 once, then answered");
    ssm.describe_parameters()
        .send()
        .await
        .expect("500 once, then answered");
    assert_eq!(proxy.pending_injections(), 0);
    assert_eq!(proxy.total_calls(), 10, "{}", proxy.summary());
    assert_eq!(proxy.count_forwarded("ec2:DescribeImages"), 2);

    // Always failing: exactly max_attempts attempts, then the service's error.
    proxy.clear_calls();
    proxy.set_server_error_rate(1.0);
    let err = ec2
        .describe_images()
        .owners(CANONICAL)
        .send()
        .await
        .expect_err("always 500");
    assert_eq!(err.code(), Some("InternalError"), "{err:?}");
    let err = ssm
        .describe_parameters()
        .send()
        .await
        .expect_err("always 500");
    assert_eq!(err.code(), Some("InternalServerError"), "{err:?}");
    let err = asg
        .describe_auto_scaling_groups()
        .send()
        .await
        .expect_err("always 500");
    assert_eq!(err.code(), Some("InternalFailure"), "{err:?}");
    assert_eq!(proxy.total_calls(), 9, "{}", proxy.summary());
    assert_eq!(proxy.faulted(Fault::ServerError), 9);
}

#[tokio::test]
async fn mutating_calls_are_counted_whether_forwarded_or_faulted() {
    let proxy = Proxy::start(moto::endpoint());
    let config = config(&proxy.endpoint(), RetryConfig::disabled()).await;
    let ec2 = aws_sdk_ec2::Client::new(&config);

    trusty_images(&ec2).await.expect("DescribeImages");
    assert_eq!(proxy.total_calls(), 1);
    assert_eq!(proxy.mutating_calls(), 0, "DescribeImages is read-only");

    let name = unique("sg");
    ec2.create_security_group()
        .group_name(&name)
        .description("kiln harness test")
        .send()
        .await
        .expect("CreateSecurityGroup");
    assert_eq!(proxy.mutating_calls(), 1, "{}", proxy.summary());
    assert_eq!(proxy.mutating_forwarded(), 1);

    // A throttled attempt never reached moto but is still an attempt to mutate.
    proxy.inject("CreateSecurityGroup", Fault::Throttle);
    let err = ec2
        .create_security_group()
        .group_name(unique("sg"))
        .description("kiln harness test")
        .send()
        .await
        .expect_err("throttled, retries off");
    assert_eq!(err.code(), Some("RequestLimitExceeded"));
    assert_eq!(proxy.mutating_calls(), 2, "{}", proxy.summary());
    assert_eq!(proxy.mutating_forwarded(), 1);
    assert_eq!(proxy.mutating_faulted(), 1);

    ec2.describe_security_groups()
        .group_names(&name)
        .send()
        .await
        .expect("the first group exists");
    assert_eq!(proxy.mutating_calls(), 2, "Describe* is read-only");
    assert_eq!(proxy.count("ec2:CreateSecurityGroup"), 2);
    assert_eq!(proxy.total_calls(), 4);

    // S3 is judged by method: PUT mutates, HEAD and GET don't.
    let s3 = s3_client(&config);
    let bucket = unique("kiln-harness");
    s3.create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .expect("CreateBucket");
    s3.put_object()
        .bucket(&bucket)
        .key("a/b.txt")
        .body(b"hello".to_vec().into())
        .send()
        .await
        .expect("PutObject");
    s3.head_object()
        .bucket(&bucket)
        .key("a/b.txt")
        .send()
        .await
        .expect("HeadObject");
    let got = s3
        .get_object()
        .bucket(&bucket)
        .key("a/b.txt")
        .send()
        .await
        .expect("GetObject");
    let body = got.body.collect().await.expect("object body").into_bytes();
    assert_eq!(&body[..], b"hello", "bodies pass through unchanged");
    s3.delete_object()
        .bucket(&bucket)
        .key("a/b.txt")
        .send()
        .await
        .expect("DeleteObject (204, no body)");
    assert_eq!(proxy.mutating_calls(), 5, "{}", proxy.summary());
    for op in [
        "s3:CreateBucket",
        "s3:PutObject",
        "s3:HeadObject",
        "s3:GetObject",
        "s3:DeleteObject",
    ] {
        assert_eq!(
            proxy.count(op),
            1,
            "{op} not identified\n{}",
            proxy.summary()
        );
    }
}

#[tokio::test]
async fn a_rewrite_changes_what_the_sdk_sees() {
    let proxy = Proxy::start(moto::endpoint());
    let config = config(&proxy.endpoint(), RetryConfig::disabled()).await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let ssm = aws_sdk_ssm::Client::new(&config);

    let run = ec2
        .run_instances()
        .image_id(TRUSTY_NEWEST)
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .expect("RunInstances");
    let instance = run.instances()[0]
        .instance_id()
        .expect("instance id")
        .to_string();
    let sent = ssm
        .send_command()
        .instance_ids(&instance)
        .document_name("AWS-RunShellScript")
        .parameters("commands", vec!["true".to_string()])
        .send()
        .await
        .expect("SendCommand");
    let command = sent
        .command()
        .and_then(|c| c.command_id())
        .expect("command id")
        .to_string();
    let invocation = || {
        ssm.get_command_invocation()
            .command_id(&command)
            .instance_id(&instance)
            .send()
    };

    let before = invocation().await.expect("GetCommandInvocation");
    assert_eq!(
        before.status(),
        Some(&CommandInvocationStatus::Success),
        "moto succeeds at once"
    );

    proxy.rewrite("ssm:GetCommandInvocation", |body| {
        replace_all(body, "\"Success\"", "\"Failed\"")
    });
    let after = invocation().await.expect("GetCommandInvocation, rewritten");
    assert_eq!(after.status(), Some(&CommandInvocationStatus::Failed));
    assert_eq!(
        after.command_id(),
        Some(command.as_str()),
        "the rest is intact"
    );

    // Only the chosen operation is rewritten.
    let listed = ssm
        .list_commands()
        .command_id(&command)
        .send()
        .await
        .expect("ListCommands");
    assert_eq!(
        listed.commands()[0].status().map(|s| s.as_str()),
        Some("Success")
    );
    let rewritten: Vec<String> = proxy
        .calls()
        .iter()
        .filter(|c| c.rewritten)
        .map(|c| c.operation.to_string())
        .collect();
    assert_eq!(rewritten, ["ssm:GetCommandInvocation"]);
}

#[tokio::test]
async fn connection_resets_are_retried_by_the_sdk() {
    let proxy = Proxy::start(moto::endpoint());
    proxy.set_reset_rate(0.3);
    let ec2 = aws_sdk_ec2::Client::new(&config(&proxy.endpoint(), fast_retries(10)).await);

    const CALLS: usize = 20;
    for i in 0..CALLS {
        let images = trusty_images(&ec2).await.unwrap_or_else(|e| {
            panic!(
                "call {i} failed despite retries: {e:?}\n{}",
                proxy.summary()
            )
        });
        assert_eq!(images.len(), TRUSTY_ALL.len());
    }
    let resets = proxy.faulted(Fault::Reset);
    assert!(
        resets > 0,
        "30% resets over {CALLS} calls hit none\n{}",
        proxy.summary()
    );
    // Each reset costs exactly one more attempt.
    assert_eq!(proxy.total_calls(), CALLS + resets, "{}", proxy.summary());
    assert!(proxy
        .calls()
        .iter()
        .filter(|c| c.fault == Some(Fault::Reset))
        .all(|c| c.status.is_none()));
}

#[tokio::test]
async fn without_retries_a_reset_is_an_io_error() {
    let proxy = Proxy::start(moto::endpoint());
    proxy.set_reset_rate(1.0);
    let ec2 = aws_sdk_ec2::Client::new(&config(&proxy.endpoint(), RetryConfig::disabled()).await);
    let err = trusty_images(&ec2).await.expect_err("connection reset");
    let err = aws_sdk_ec2::error::DisplayErrorContext(err).to_string();
    assert!(err.contains("dispatch failure"), "{err}");
    assert_eq!(proxy.faulted(Fault::Reset), 1);
}

#[tokio::test]
async fn a_lost_response_hides_a_change_that_happened() {
    let proxy = Proxy::start(moto::endpoint());
    let ec2 = aws_sdk_ec2::Client::new(&config(&proxy.endpoint(), fast_retries(3)).await);
    proxy.inject("ec2:CreateSecurityGroup", Fault::LoseResponse);

    let name = unique("sg-lost");
    let err = ec2
        .create_security_group()
        .group_name(&name)
        .description("kiln harness test")
        .send()
        .await
        .expect_err("the retry finds the group the lost attempt created");
    assert_eq!(err.code(), Some("InvalidGroup.Duplicate"), "{err:?}");
    assert_eq!(proxy.mutating_forwarded(), 2, "{}", proxy.summary());
    assert_eq!(proxy.faulted(Fault::LoseResponse), 1);
}

#[tokio::test]
async fn faults_follow_the_seed() {
    async fn outcomes(seed: u64) -> Vec<Option<Fault>> {
        let proxy = Proxy::start_seeded(moto::endpoint(), seed);
        proxy.set_throttle_rate(0.5);
        let ec2 =
            aws_sdk_ec2::Client::new(&config(&proxy.endpoint(), RetryConfig::disabled()).await);
        for _ in 0..16 {
            let _ = ec2.describe_images().image_ids(TRUSTY_NEWEST).send().await;
        }
        proxy.calls().iter().map(|c| c.fault).collect()
    }
    let first = outcomes(7).await;
    assert_eq!(first, outcomes(7).await, "same seed, same faults");
    assert_ne!(first, outcomes(8).await, "another seed, other faults");
    let throttled = first.iter().filter(|f| f.is_some()).count();
    assert!(
        (3..=13).contains(&throttled),
        "50% of 16 calls throttled: {throttled}"
    );
}

#[tokio::test]
async fn latency_is_added_to_every_call() {
    let proxy = Proxy::start(moto::endpoint());
    let ec2 = aws_sdk_ec2::Client::new(&config(&proxy.endpoint(), RetryConfig::disabled()).await);
    trusty_images(&ec2).await.expect("warm-up");

    proxy.set_latency(Duration::from_millis(300), Duration::from_millis(50));
    let started = Instant::now();
    trusty_images(&ec2).await.expect("slow call");
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");
}

#[tokio::test]
async fn faults_can_be_limited_to_some_operations() {
    let proxy = Proxy::start(moto::endpoint());
    proxy.set_throttle_rate(1.0);
    proxy.set_only(&["ssm:*"]);
    let config = config(&proxy.endpoint(), RetryConfig::disabled()).await;

    trusty_images(&aws_sdk_ec2::Client::new(&config))
        .await
        .expect("EC2 untouched");
    let err = aws_sdk_ssm::Client::new(&config)
        .describe_parameters()
        .send()
        .await
        .expect_err("SSM throttled");
    assert_eq!(err.code(), Some("ThrottlingException"));
}
