//! Resolving the base image (owner + name pattern → newest AMI) through the real
//! CLI, with and without AWS throttling.

use crate::support::cli::{is_sha256_hex, Project, Run};
use crate::support::moto::{self, TRUSTY_NEWEST};
use crate::support::proxy::{Fault, Proxy};

const IMAGE: &str = "svc";

/// `kiln -v hash`: the manifest, then the hash as the last line.
fn verbose_hash(project: &Project, endpoint: &str) -> (Run, String) {
    let run = project.kiln(endpoint, &["-v", "hash", IMAGE]);
    run.expect_ok();
    let hash = run.last_line().trim().to_string();
    assert!(is_sha256_hex(&hash), "last line is not a sha256\n{run}");
    assert_eq!(
        run.value_of("base-ami"),
        Some(TRUSTY_NEWEST),
        "base-ami must be the newest Canonical trusty amd64 image\n{run}"
    );
    (run, hash)
}

#[test]
fn base_image_resolves_to_newest_trusty_even_when_throttled() {
    let project = Project::minimal(IMAGE);

    let clean = Proxy::start(moto::endpoint());
    let (_, expected) = verbose_hash(&project, &clean.endpoint());
    assert!(
        clean.count("ec2:DescribeImages") >= 1,
        "{}",
        clean.summary()
    );
    assert_eq!(
        clean.mutating_calls(),
        0,
        "hashing must not change anything\n{}",
        clean.summary()
    );

    let quiet = project.kiln(&clean.endpoint(), &["hash", IMAGE]);
    quiet.expect_ok();
    assert_eq!(
        quiet.stdout.trim(),
        expected,
        "without -v only the hash\n{quiet}"
    );

    // 30% of calls throttled. Seed 3 throttles the first two requests in a row
    // (the SDK's default three attempts just get through); should kiln's calls
    // change, keep running until the proxy has throttled at least once.
    let throttled = Proxy::start_seeded(moto::endpoint(), 3);
    throttled.set_throttle_rate(0.3);
    for _ in 0..10 {
        let (run, hash) = verbose_hash(&project, &throttled.endpoint());
        assert_eq!(
            hash,
            expected,
            "throttling changed the hash\n{run}\n{}",
            throttled.summary()
        );
        if throttled.faulted(Fault::Throttle) > 0 {
            break;
        }
    }
    assert!(
        throttled.faulted(Fault::Throttle) > 0,
        "no call was throttled\n{}",
        throttled.summary()
    );
    assert_eq!(throttled.mutating_calls(), 0, "{}", throttled.summary());
}
