//! Operator polish through the real binary: shell completions, help, and the
//! IAM policy documents kept in step with the AWS calls kiln makes.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

use crate::support::cli::{kiln_command, Run};

/// Completions need no config and no AWS: run from a folder with no kiln.toml,
/// against an endpoint nothing listens on.
#[test]
fn completions_for_bash_zsh_and_fish_name_every_command() {
    for (shell, marker) in [
        ("bash", "complete -F _kiln"),
        ("zsh", "#compdef kiln"),
        ("fish", "complete -c kiln"),
    ] {
        let mut cmd = kiln_command("http://127.0.0.1:9");
        cmd.args(["completions", shell]);
        let run = Run::of(&mut cmd);
        run.expect_ok();
        assert!(run.stdout.contains(marker), "{shell}\n{run}");
        for sub in [
            "bake",
            "images",
            "gc",
            "doctor",
            "completions",
            "hash",
            "render",
        ] {
            assert!(run.stdout.contains(sub), "{shell}: {sub}\n{run}");
        }
    }
    let mut cmd = kiln_command("http://127.0.0.1:9");
    cmd.args(["completions", "powershell"]);
    Run::of(&mut cmd).expect_code(2);
}

#[test]
fn help_shows_examples_and_exit_codes() {
    let mut cmd = kiln_command("http://127.0.0.1:9");
    cmd.arg("--help");
    let run = Run::of(&mut cmd);
    run.expect_ok();
    assert!(run.stdout.contains("Examples:"), "{run}");
    assert!(run.stdout.contains("Exit codes:"), "{run}");
    // NO_COLOR is set by kiln_command: no escape sequences anywhere.
    assert!(!run.stdout.contains('\u{1b}'), "{run}");
}

/// `(service, operation)` for every AWS call in src/: each is wrapped in
/// `AwsError::call("svc", "Op", ..)` or built as `AwsError::Call { service:
/// "svc", operation: "Op", .. }`, the convention this scan relies on.
fn calls_in_source() -> BTreeSet<(String, String)> {
    fn quoted(s: &str) -> Option<(&str, &str)> {
        let s = s.trim_start().strip_prefix('"')?;
        let end = s.find('"')?;
        Some((&s[..end], &s[end + 1..]))
    }
    let mut out = BTreeSet::new();
    let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for (i, _) in text.match_indices("AwsError::call(") {
                let rest = &text[i + "AwsError::call(".len()..];
                let Some((service, rest)) = quoted(rest) else {
                    continue;
                };
                let Some(rest) = rest.trim_start().strip_prefix(',') else {
                    continue;
                };
                let Some((op, _)) = quoted(rest) else {
                    continue;
                };
                out.insert((service.to_string(), op.to_string()));
            }
            for (i, _) in text.match_indices("service: ") {
                let rest = &text[i + "service: ".len()..];
                let Some((service, rest)) = quoted(rest) else {
                    continue;
                };
                let Some(rest) = rest.trim_start().strip_prefix(',') else {
                    continue;
                };
                let Some(rest) = rest.trim_start().strip_prefix("operation: ") else {
                    continue;
                };
                let Some((op, _)) = quoted(rest) else {
                    continue;
                };
                out.insert((service.to_string(), op.to_string()));
            }
        }
    }
    out
}

/// The IAM action an SDK operation needs.
fn iam_action(service: &str, op: &str) -> String {
    let op = op.split(' ').next().unwrap(); // "GetObject (presign)"
    match (service, op) {
        ("s3", "ListObjectsV2") => "s3:ListBucket".into(),
        ("elbv2", op) => format!("elasticloadbalancing:{op}"),
        (service, op) => format!("{service}:{op}"),
    }
}

fn policy_actions(path: &str) -> BTreeSet<String> {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&full).unwrap())
        .unwrap_or_else(|e| panic!("{path} is not JSON: {e}"));
    assert_eq!(doc["Version"], "2012-10-17", "{path}");
    let mut out = BTreeSet::new();
    for st in doc["Statement"].as_array().unwrap() {
        assert_eq!(st["Effect"], "Allow", "{path}: {st}");
        match &st["Action"] {
            Value::String(a) => {
                out.insert(a.clone());
            }
            Value::Array(a) => out.extend(a.iter().map(|v| v.as_str().unwrap().to_string())),
            other => panic!("{path}: Action {other}"),
        }
    }
    out
}

/// iam/operator-policy.json allows every call kiln makes, and nothing it does
/// not make: a new SDK call without a policy line fails here, not in an
/// operator's account.
#[test]
fn operator_policy_matches_the_calls_kiln_makes() {
    let calls = calls_in_source();
    assert!(calls.len() > 15, "the scan found too little: {calls:?}");
    let mut needed: BTreeSet<String> = calls.iter().map(|(s, o)| iam_action(s, o)).collect();
    // RunInstances with an instance profile passes the builder's role.
    if needed.contains("ec2:RunInstances") {
        needed.insert("iam:PassRole".into());
    }
    let allowed = policy_actions("iam/operator-policy.json");
    let missing: Vec<_> = needed.difference(&allowed).collect();
    let extra: Vec<_> = allowed.difference(&needed).collect();
    assert!(
        missing.is_empty(),
        "iam/operator-policy.json lacks {missing:?} (add them, least privilege, and to README.md)"
    );
    assert!(
        extra.is_empty(),
        "iam/operator-policy.json allows {extra:?}, which no code calls: remove them"
    );
}

#[test]
fn builder_policy_and_trust_are_valid() {
    let actions = policy_actions("iam/builder-policy.json");
    assert!(
        actions.contains("ssm:UpdateInstanceInformation"),
        "{actions:?}"
    );
    assert!(
        actions.iter().all(|a| a.starts_with("ssm:")
            || a.starts_with("ec2messages:")
            || a.starts_with("ssmmessages:")),
        "{actions:?}"
    );
    let trust: Value = serde_json::from_str(include_str!("../iam/builder-trust.json")).unwrap();
    assert_eq!(
        trust["Statement"][0]["Principal"]["Service"],
        "ec2.amazonaws.com"
    );
}

/// kiln.toml.example is a valid kiln.toml, with its commented-out keys too, and
/// it mentions every key there is (so it is the reference the README says).
#[test]
fn kiln_toml_example_documents_every_key() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("kiln.toml.example")).unwrap();
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.split_once(" = ").is_some_and(|(k, _)| {
                    k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                }) =>
            {
                rest
            }
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kiln.toml"), uncommented).unwrap();
    let c = kiln::config::Config::load(None, dir.path()).unwrap().file;
    // Destructured without `..`: a new config key fails to compile here until
    // it is added to the example.
    let kiln::config::ConfigFile {
        region,
        profile,
        endpoint_url,
        bake,
        rollout,
    } = c;
    let kiln::config::BakeConfig {
        copy_regions,
        bucket,
        subnet,
        instance_profile,
        security_group,
        ttl,
        image_timeout,
        agent_timeout,
        provision_timeout,
    } = bake;
    let kiln::config::RolloutConfig {
        max_surge,
        min_healthy,
        warmup,
        deadline,
        poll,
    } = rollout;
    assert!(!copy_regions.is_empty(), "[bake] copy_regions");
    for (key, value) in [
        ("region", region),
        ("profile", profile),
        ("endpoint_url", endpoint_url),
        ("[bake] bucket", bucket),
        ("[bake] subnet", subnet),
        ("[bake] instance_profile", instance_profile),
        ("[bake] security_group", security_group),
        ("[bake] ttl", ttl),
        ("[bake] image_timeout", image_timeout),
        ("[bake] agent_timeout", agent_timeout),
        ("[bake] provision_timeout", provision_timeout),
        ("[rollout] max_surge", max_surge),
        ("[rollout] min_healthy", min_healthy),
        ("[rollout] warmup", warmup),
        ("[rollout] deadline", deadline),
        ("[rollout] poll", poll),
    ] {
        assert!(value.is_some(), "kiln.toml.example lacks {key}");
    }
}
