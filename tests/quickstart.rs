//! `scripts/try`, the README's first command, run end to end so it cannot rot:
//! its own moto, the demo estate, two bakes with a code change between, the
//! image listing, gc, and the check for leftover builders.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::cli::Run;

fn sha256_of(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

#[test]
fn scripts_try_bakes_two_versions_and_leaves_nothing_behind() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let jar = root.join("images/web/files/web-demo.jar");
    let source = root.join("images/web/app/src/kiln/demo/web/WebDemo.java");
    let before = (sha256_of(&jar), sha256_of(&source));

    // A private copy of the binary this test run built (so the script does not
    // rebuild): other builds sharing the target folder may replace it meanwhile.
    let bin = tempfile::tempdir().unwrap();
    let kiln = bin.path().join("kiln");
    std::fs::copy(env!("CARGO_BIN_EXE_kiln"), &kiln).unwrap();

    let mut cmd = Command::new(root.join("scripts/try"));
    cmd.env("KILN", &kiln)
        .env("NO_COLOR", "1")
        // The script must shield itself from these; prove it does.
        .env("AWS_PROFILE", "kiln-quickstart-test-no-such-profile")
        .env("AWS_ACCESS_KEY_ID", "AKIAREALLOOKINGKEY00")
        .env("AWS_ENDPOINT_URL", "https://ec2.us-east-1.amazonaws.com")
        .env(
            "AWS_ENDPOINT_URL_EC2",
            "https://ec2.us-east-1.amazonaws.com",
        )
        .env_remove("KEEP")
        .current_dir(std::env::temp_dir());
    let started = Instant::now();
    let run = Run::of(&mut cmd);
    let took = started.elapsed();
    run.expect_ok();
    let out = format!("{}{}", run.stdout, run.stderr);

    // Every step printed before it runs, in order.
    let steps = [
        "$ kiln doctor --asg demo-web",
        "$ kiln bake web",
        "$ kiln rollout demo-web web@latest",
        "-> web@1 (ami-",
        "--- a/WebDemo.java",
        "$ kiln bake web",
        "$ kiln rollout demo-web web@latest",
        "web@1 (ami-",
        "-> web@2 (ami-",
        "$ kiln status demo-web",
        "6 on web@2 (ami-",
        "$ kiln history demo-web",
        "$ kiln rollback demo-web",
        "web@2 (ami-",
        "-> web@1 (ami-",
        "$ kiln status demo-web",
        "6 on web@1 (ami-",
        "$ kiln images web",
        "$ kiln gc",
    ];
    let mut at = 0;
    for step in steps {
        let found = run.stdout[at..]
            .find(step)
            .unwrap_or_else(|| panic!("{step:?} missing or out of order\n{run}"));
        at += found + step.len();
    }
    // Two versions, each built once, listed by `kiln images web`.
    assert!(out.contains("web v1 sha256:"), "{run}");
    assert!(out.contains("web v2 sha256:"), "{run}");
    let rows: Vec<&str> = run
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("$ kiln images web"))
        .filter(|l| l.starts_with("web "))
        .collect();
    let versions: Vec<&str> = rows
        .iter()
        .map(|l| l.split_whitespace().nth(1).unwrap_or(""))
        .collect();
    assert_eq!(versions, ["2", "1"], "{run}");
    // The setup check passed, and nothing was left running.
    assert!(!out.contains("FAIL "), "{run}");
    assert!(
        run.stdout.contains("no builder instances left running"),
        "{run}"
    );
    assert!(run.stderr.contains("stopped the AWS emulator"), "{run}");
    // Every call went to the local emulator, never to the endpoint given above.
    assert!(out.contains("at http://127.0.0.1:"), "{run}");
    assert!(!out.contains("amazonaws.com"), "{run}");
    // The demo's code change happened in a copy, not in the repository.
    assert_eq!((sha256_of(&jar), sha256_of(&source)), before);
    // The budget is 5 minutes after the build; today it takes seconds.
    assert!(took < Duration::from_secs(300), "took {took:?}\n{run}");
}
