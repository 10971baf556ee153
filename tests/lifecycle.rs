//! Image lifecycle through the real CLI against moto: `kiln prune`, `kiln
//! promote` / `kiln channels` / channel refs, `kiln drift` and `kiln diff`.
//!
//! Versions are made fast by registering AMIs with the registry's tags
//! (RegisterImage + CreateTags; moto gives every AMI a snapshot) instead of
//! running bakes, except where the test is about what a bake records.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_autoscaling::types::LaunchTemplateSpecification as AsgTemplate;
use aws_sdk_ec2::types::{Filter, RequestLaunchTemplateData, Tag};
use serde_json::Value;

use crate::support::cli::{Project, Run};
use crate::support::moto::{self, Dedicated};
use crate::support::proxy::Proxy;

const EAST: &str = "us-east-1";
const WEST: &str = "eu-west-1";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn json(run: &Run) -> Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("stdout is not JSON: {e}\n{run}"))
}

fn tag(k: &str, v: impl Into<String>) -> Tag {
    Tag::builder().key(k).value(v).build()
}

/// One registered version: its AMI and the snapshot moto made for it.
#[derive(Debug, Clone)]
struct Registered {
    ami: String,
    snapshot: String,
}

/// Registers `image` versions `versions` in `region` with the registry's tags,
/// ready and available, as a bake would leave them.
async fn register(
    endpoint: &str,
    region: &str,
    image: &str,
    versions: std::ops::RangeInclusive<u64>,
) -> BTreeMap<u64, Registered> {
    let ec2 = aws_sdk_ec2::Client::new(&moto::sdk_config_in(endpoint, region).await);
    let mut out = BTreeMap::new();
    for v in versions {
        let hash = format!("{:0>64}", format!("{v:x}"));
        let ami = ec2
            .register_image()
            .name(format!("kiln-{image}-{v}-{}", &hash[..12]))
            .send()
            .await
            .unwrap()
            .image_id()
            .unwrap()
            .to_string();
        ec2.create_tags()
            .resources(&ami)
            .tags(tag("kiln:image", image))
            .tags(tag("kiln:version", v.to_string()))
            .tags(tag("kiln:hash", &hash))
            .tags(tag("kiln:base-ami", moto::TRUSTY_NEWEST))
            .tags(tag("kiln:java", "1.8.0_422"))
            .tags(tag("kiln:state", "ready"))
            .tags(tag("Name", format!("{image} {v}")))
            .send()
            .await
            .unwrap();
        let img = ec2.describe_images().image_ids(&ami).send().await.unwrap();
        let snapshot = img.images()[0].block_device_mappings()[0]
            .ebs()
            .unwrap()
            .snapshot_id()
            .unwrap()
            .to_string();
        out.insert(v, Registered { ami, snapshot });
    }
    out
}

/// AMI ids tagged with `image` in `region`.
async fn amis_of(endpoint: &str, region: &str, image: &str) -> BTreeSet<String> {
    let ec2 = aws_sdk_ec2::Client::new(&moto::sdk_config_in(endpoint, region).await);
    ec2.describe_images()
        .owners("self")
        .filters(
            Filter::builder()
                .name("tag:kiln:image")
                .values(image)
                .build(),
        )
        .send()
        .await
        .unwrap()
        .images()
        .iter()
        .map(|i| i.image_id().unwrap().to_string())
        .collect()
}

/// Which of `snapshots` still exist in `region`.
async fn existing_snapshots(
    endpoint: &str,
    region: &str,
    snapshots: &[String],
) -> BTreeSet<String> {
    let ec2 = aws_sdk_ec2::Client::new(&moto::sdk_config_in(endpoint, region).await);
    let all = ec2
        .describe_snapshots()
        .owner_ids("self")
        .send()
        .await
        .unwrap();
    all.snapshots()
        .iter()
        .filter_map(|s| s.snapshot_id())
        .filter(|s| snapshots.iter().any(|x| x == s))
        .map(str::to_string)
        .collect()
}

async fn launch_template(endpoint: &str, name: &str, amis: &[&str]) -> String {
    let ec2 = aws_sdk_ec2::Client::new(&moto::sdk_config_in(endpoint, EAST).await);
    let id = ec2
        .create_launch_template()
        .launch_template_name(name)
        .launch_template_data(
            RequestLaunchTemplateData::builder()
                .image_id(amis[0])
                .instance_type(aws_sdk_ec2::types::InstanceType::T2Micro)
                .build(),
        )
        .send()
        .await
        .unwrap()
        .launch_template()
        .unwrap()
        .launch_template_id()
        .unwrap()
        .to_string();
    for ami in &amis[1..] {
        ec2.create_launch_template_version()
            .launch_template_id(&id)
            .launch_template_data(
                RequestLaunchTemplateData::builder()
                    .image_id(*ami)
                    .instance_type(aws_sdk_ec2::types::InstanceType::T2Micro)
                    .build(),
            )
            .send()
            .await
            .unwrap();
    }
    id
}

/// An ASG on `template` `$Latest` with `desired` instances in us-east-1a.
async fn asg(endpoint: &str, name: &str, template: &str, desired: i32) {
    let asg = aws_sdk_autoscaling::Client::new(&moto::sdk_config_in(endpoint, EAST).await);
    asg.create_auto_scaling_group()
        .auto_scaling_group_name(name)
        .launch_template(
            AsgTemplate::builder()
                .launch_template_id(template)
                .version("$Latest")
                .build(),
        )
        .min_size(0)
        .max_size(10)
        .desired_capacity(desired)
        .availability_zones(format!("{EAST}a"))
        .send()
        .await
        .unwrap();
}

async fn set_desired(endpoint: &str, name: &str, desired: i32) {
    let asg = aws_sdk_autoscaling::Client::new(&moto::sdk_config_in(endpoint, EAST).await);
    asg.set_desired_capacity()
        .auto_scaling_group_name(name)
        .desired_capacity(desired)
        .send()
        .await
        .unwrap();
}

fn versions_in(report: &Value, key: &str) -> BTreeSet<u64> {
    report[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in {report}"))
        .iter()
        .map(|d| d["version"].as_u64().unwrap())
        .collect()
}

/// The issue's scenario: 12 versions in two regions; an ASG runs 5 and 6 (a
/// launch template whose versions name them, instances of both); an old
/// launch template version alone names 3; channel prod points at 7. `--keep 3`
/// keeps 10-12. The dry run and the execution name the same set, exactly the
/// others go, with their snapshots, in both regions, and the dry run touched
/// nothing.
#[test]
fn prune_keeps_newest_in_use_templated_and_channelled_versions_in_two_regions() {
    let moto = Dedicated::start();
    let ep = moto.endpoint().to_string();
    let image = moto::unique("web");
    let (east, west) = rt().block_on(async {
        let east = register(&ep, EAST, &image, 1..=12).await;
        let west = register(&ep, WEST, &image, 1..=12).await;
        // The ASG's template: version 1 = web@5, version 2 = web@6. Two
        // instances launched on 5, then two more on 6 ($Latest), as mid-rollout.
        let app = launch_template(&ep, &moto::unique("app"), &[&east[&5].ami]).await;
        let group = moto::unique("web-prod");
        asg(&ep, &group, &app, 2).await;
        let ec2 = aws_sdk_ec2::Client::new(&moto::sdk_config_in(&ep, EAST).await);
        ec2.create_launch_template_version()
            .launch_template_id(&app)
            .launch_template_data(
                RequestLaunchTemplateData::builder()
                    .image_id(&east[&6].ami)
                    .instance_type(aws_sdk_ec2::types::InstanceType::T2Micro)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        set_desired(&ep, &group, 4).await;
        // An unrelated template whose old version 1 is web@3; $Latest/$Default
        // moved on to web@10 (kept anyway as one of the newest).
        let old =
            launch_template(&ep, &moto::unique("old"), &[&east[&3].ami, &east[&10].ami]).await;
        ec2.modify_launch_template()
            .launch_template_id(&old)
            .default_version("2")
            .send()
            .await
            .unwrap();
        (east, west)
    });

    let project = Project::new();
    let regions = ["--region", EAST, "--region", WEST];
    let kiln = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(regions);
        project.kiln(&ep, &all)
    };
    kiln(&["promote", &format!("{image}@7"), "--channel", "prod"]).expect_ok();

    let expected: BTreeSet<u64> = [1, 2, 4, 8, 9].into();
    let dry = kiln(&["prune", &image, "--keep", "3", "--output", "json"]);
    dry.expect_ok();
    let report = json(&dry);
    assert_eq!(versions_in(&report, "delete"), expected, "{dry}");
    assert_eq!(
        versions_in(&report, "kept"),
        [3, 5, 6, 7, 10, 11, 12].into(),
        "{dry}"
    );
    let reasons = |v: u64| -> Vec<String> {
        report["kept"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["version"] == v)
            .unwrap()["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["kind"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(reasons(3), ["launch-template"], "{dry}");
    assert!(
        human_reason_of_3(&report).contains("version 1 in"),
        "an old version, neither $Default nor $Latest\n{dry}"
    );
    assert!(reasons(5).contains(&"instance".to_string()), "{dry}");
    assert!(reasons(6).contains(&"instance".to_string()), "{dry}");
    assert_eq!(reasons(7), ["channel", "channel"], "one per region\n{dry}");
    assert_eq!(reasons(12), ["newest"], "{dry}");
    for d in report["delete"].as_array().unwrap() {
        assert_eq!(d["amis"].as_object().unwrap().len(), 2, "{dry}");
    }
    // The dry run removed nothing.
    let before = rt().block_on(async {
        (
            amis_of(&ep, EAST, &image).await.len(),
            amis_of(&ep, WEST, &image).await.len(),
        )
    });
    assert_eq!(before, (12, 12));

    // The human dry run says why each kept version is kept.
    let human = kiln(&["prune", &image, "--keep", "3"]);
    human.expect_ok();
    assert!(
        human
            .stdout
            .contains(&format!("on channel /kiln/channels/{image}/prod in {EAST}")),
        "{human}"
    );
    assert!(human.stdout.contains("--execute"), "{human}");

    let run = kiln(&[
        "prune",
        &image,
        "--keep",
        "3",
        "--execute",
        "--output",
        "json",
    ]);
    run.expect_ok();
    let done = json(&run);
    assert_eq!(versions_in(&done, "delete"), expected, "{run}");
    let removals = done["removals"].as_array().unwrap();
    assert_eq!(removals.len(), 10, "5 versions × 2 regions\n{run}");
    assert!(removals.iter().all(|r| r["error"].is_null()), "{run}");

    rt().block_on(async {
        for (region, reg) in [(EAST, &east), (WEST, &west)] {
            let left = amis_of(&ep, region, &image).await;
            let want: BTreeSet<String> = reg
                .iter()
                .filter(|(v, _)| !expected.contains(v))
                .map(|(_, r)| r.ami.clone())
                .collect();
            assert_eq!(left, want, "{region}");
            let snaps: Vec<String> = reg.values().map(|r| r.snapshot.clone()).collect();
            let snaps_left = existing_snapshots(&ep, region, &snaps).await;
            let want_snaps: BTreeSet<String> = reg
                .iter()
                .filter(|(v, _)| !expected.contains(v))
                .map(|(_, r)| r.snapshot.clone())
                .collect();
            assert_eq!(snaps_left, want_snaps, "snapshots in {region}");
        }
    });

    // Nothing more to do: a second run removes nothing.
    let again = kiln(&[
        "prune",
        &image,
        "--keep",
        "3",
        "--execute",
        "--output",
        "json",
    ]);
    again.expect_ok();
    assert!(versions_in(&json(&again), "delete").is_empty(), "{again}");
}

fn human_reason_of_3(report: &Value) -> String {
    let k = report["kept"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["version"] == 3)
        .unwrap();
    let r = &k["reasons"][0];
    assert_eq!(r["is_default"], false, "{r}");
    assert_eq!(r["is_latest"], false, "{r}");
    format!("version {} in", r["version"])
}

/// moto answers DescribeImages in one page whatever MaxResults says; the proxy
/// serves its answer `PAGE` images at a time with NextToken, as EC2 does, so a
/// listing larger than a page must be followed to the end.
#[test]
fn prune_follows_every_page_of_the_image_listing() {
    const PAGE: usize = 4;
    let image = moto::unique("paged");
    let ep = moto::endpoint();
    let reg = rt().block_on(register(ep, EAST, &image, 1..=11));
    let proxy = Proxy::start(ep);
    proxy
        .handle()
        .rewrite_exchange("ec2:DescribeImages", |req, body| {
            paginate_images(req, body, PAGE)
        });
    let project = Project::new();
    let run = project.kiln(
        &proxy.endpoint(),
        &[
            "prune",
            &image,
            "--keep",
            "1",
            "--execute",
            "--output",
            "json",
        ],
    );
    run.expect_ok();
    assert_eq!(
        versions_in(&json(&run), "delete"),
        (1..=10).collect(),
        "{run}"
    );
    assert!(
        proxy.count("ec2:DescribeImages") >= 3,
        "11 images in pages of {PAGE}\n{}",
        proxy.summary()
    );
    let left = rt().block_on(amis_of(ep, EAST, &image));
    assert_eq!(left, [reg[&11].ami.clone()].into());
}

/// Serves one page of a DescribeImages answer: the request's `NextToken` (an
/// offset) picks the page; a `nextToken` is added while more remain.
fn paginate_images(request: &[u8], body: &[u8], page: usize) -> Vec<u8> {
    let req = String::from_utf8_lossy(request);
    let offset: usize = req
        .split('&')
        .find_map(|kv| kv.strip_prefix("NextToken="))
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let text = String::from_utf8_lossy(body).into_owned();
    let (Some(open), Some(close)) = (text.find("<imagesSet>"), text.rfind("</imagesSet>")) else {
        return body.to_vec();
    };
    let inner = &text[open + "<imagesSet>".len()..close];
    // Top-level <item> elements (images nest <item>s of their own).
    let mut items = Vec::new();
    let (mut depth, mut start, mut i) = (0usize, 0usize, 0usize);
    while i < inner.len() {
        if inner[i..].starts_with("<item>") {
            if depth == 0 {
                start = i;
            }
            depth += 1;
            i += "<item>".len();
        } else if inner[i..].starts_with("</item>") {
            depth -= 1;
            i += "</item>".len();
            if depth == 0 {
                items.push(&inner[start..i]);
            }
        } else {
            i += inner[i..].chars().next().map_or(1, char::len_utf8);
        }
    }
    let end = (offset + page).min(items.len());
    let chosen = items.get(offset..end).unwrap_or_default().concat();
    let token = if end < items.len() {
        format!("<nextToken>{end}</nextToken>")
    } else {
        String::new()
    };
    format!(
        "{}<imagesSet>{chosen}</imagesSet>{token}{}",
        &text[..open],
        &text[close + "</imagesSet>".len()..]
    )
    .into_bytes()
}

/// `kiln promote` writes an aws:ec2:image parameter per region; `web@prod`
/// resolves through it in `kiln images`; `kiln channels` lists the history.
#[test]
fn promote_sets_a_channel_that_refs_resolve_and_channels_lists_with_history() {
    let image = moto::unique("chan");
    let ep = moto::endpoint();
    let reg = rt().block_on(register(ep, EAST, &image, 1..=3));
    let project = Project::new();
    project
        .kiln(ep, &["promote", &format!("{image}@1"), "--channel", "prod"])
        .expect_ok();
    let r = project.kiln(
        ep,
        &["images", &format!("{image}@prod"), "--output", "json"],
    );
    r.expect_ok();
    assert_eq!(json(&r)["version"], 1, "{r}");
    let p = project.kiln(
        ep,
        &[
            "promote",
            &format!("{image}@latest"),
            "--channel",
            "prod",
            "--output",
            "json",
        ],
    );
    p.expect_ok();
    let promoted = json(&p);
    assert_eq!(promoted["version"], 3, "{p}");
    assert_eq!(
        promoted["regions"][EAST]["ami"],
        reg[&3].ami.as_str(),
        "{p}"
    );
    assert_eq!(promoted["regions"][EAST]["parameter_version"], 2, "{p}");
    let r = project.kiln(
        ep,
        &["images", &format!("{image}@prod"), "--output", "json"],
    );
    assert_eq!(json(&r)["version"], 3, "{r}");

    // The parameter is typed as an AMI for AWS to check.
    let data_type = rt().block_on(async {
        let ssm = aws_sdk_ssm::Client::new(&moto::sdk_config(ep).await);
        ssm.get_parameter()
            .name(format!("/kiln/channels/{image}/prod"))
            .send()
            .await
            .unwrap()
            .parameter()
            .unwrap()
            .data_type()
            .map(str::to_string)
    });
    assert_eq!(data_type.as_deref(), Some("aws:ec2:image"));

    let c = project.kiln(ep, &["channels", &image, "--output", "json"]);
    c.expect_ok();
    let listing = json(&c);
    let history = listing["channels"][0]["history"].as_array().unwrap();
    let versions: Vec<u64> = history
        .iter()
        .map(|h| h["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [3, 1], "newest first\n{c}");
    let human = project.kiln(ep, &["channels", &image]);
    human.expect_ok();
    assert!(human.stdout.contains(&format!("{image}@3")), "{human}");

    // Unknown channels and reserved names are bad input.
    let missing = project.kiln(ep, &["images", &format!("{image}@staging")]);
    missing.expect_code(2);
    assert!(missing.stderr.contains("kiln promote"), "{missing}");
    project
        .kiln(
            ep,
            &["promote", &format!("{image}@1"), "--channel", "latest"],
        )
        .expect_code(2);
}

/// Two real bakes (the second after a one-byte template change): `kiln diff`
/// names the rendered upstart file and nothing else, from the manifests the
/// bakes recorded with their version claims.
#[test]
fn diff_shows_the_template_change_between_two_bakes() {
    use crate::bake::{bake, project, setup};
    let env = setup();
    let image = moto::unique("web");
    let p = project(&env, &image, "");
    bake(&p, moto::endpoint(), &image, &[]).expect_ok();
    let upstart = p.root().join("templates/trusty/upstart.conf.tera");
    let mut text = std::fs::read_to_string(&upstart).unwrap();
    text.push_str("# one more line\n");
    std::fs::write(&upstart, text).unwrap();
    bake(&p, moto::endpoint(), &image, &[]).expect_ok();

    let d = p.kiln(
        moto::endpoint(),
        &[
            "diff",
            &format!("{image}@1"),
            &format!("{image}@2"),
            "--output",
            "json",
        ],
    );
    d.expect_ok();
    let report = json(&d);
    assert_eq!(report["from"]["manifest_recorded"], true, "{d}");
    let changes = report["changes"].as_array().unwrap();
    assert_eq!(
        changes.len(),
        1,
        "only the rendered upstart job changed\n{d}"
    );
    assert_eq!(changes[0]["kind"], "file", "{d}");
    assert!(
        changes[0]["key"].as_str().unwrap().contains("web.conf")
            || changes[0]["key"].as_str().unwrap().contains("upstart"),
        "{d}"
    );
    // moto's builders run nothing, so they upload no package list: where it
    // was to go is recorded, and diff says it is not there.
    assert!(report["packages"].is_null(), "{d}");
    assert_eq!(report["from"]["packages_recorded"], true, "{d}");
    assert!(
        report["notes"]
            .to_string()
            .contains("does not exist: the builder did not upload it"),
        "{d}"
    );

    let human = p.kiln(
        moto::endpoint(),
        &["diff", &format!("{image}@1"), &format!("{image}@latest")],
    );
    human.expect_ok();
    assert!(human.stdout.contains("changed file "), "{human}");
    let same = p.kiln(
        moto::endpoint(),
        &["diff", &format!("{image}@2"), &format!("{image}@latest")],
    );
    assert!(same.stdout.contains("nothing changed"), "{same}");
}

/// An instance attached to a group off its launch template's image is drift,
/// named with the kiln version it runs; a group whose template names a
/// deregistered image is reported; a clean group is not; exit codes follow.
#[test]
fn drift_finds_a_mismatched_instance_and_a_template_on_a_missing_image() {
    let ep = moto::endpoint();
    let image = moto::unique("drift");
    let reg = rt().block_on(register(ep, EAST, &image, 1..=3));
    let (clean, drifted, orphan) = (
        moto::unique("clean"),
        moto::unique("drifted"),
        moto::unique("orphan"),
    );
    let stray = rt().block_on(async {
        let t = launch_template(ep, &moto::unique("lt"), &[&reg[&2].ami]).await;
        asg(ep, &clean, &t, 2).await;
        asg(ep, &drifted, &t, 1).await;
        // Launched by hand from web@1 and attached: not what the template says.
        let ec2 = aws_sdk_ec2::Client::new(&moto::sdk_config_in(ep, EAST).await);
        let stray = ec2
            .run_instances()
            .image_id(&reg[&1].ami)
            .min_count(1)
            .max_count(1)
            .placement(
                aws_sdk_ec2::types::Placement::builder()
                    .availability_zone(format!("{EAST}a"))
                    .build(),
            )
            .send()
            .await
            .unwrap()
            .instances()[0]
            .instance_id()
            .unwrap()
            .to_string();
        let autoscaling = aws_sdk_autoscaling::Client::new(&moto::sdk_config_in(ep, EAST).await);
        autoscaling
            .attach_instances()
            .auto_scaling_group_name(&drifted)
            .instance_ids(&stray)
            .send()
            .await
            .unwrap();
        // A template on web@3, which is then deregistered.
        let t3 = launch_template(ep, &moto::unique("lt3"), &[&reg[&3].ami]).await;
        asg(ep, &orphan, &t3, 0).await;
        ec2.deregister_image()
            .image_id(&reg[&3].ami)
            .send()
            .await
            .unwrap();
        stray
    });
    let project = Project::new();

    let ok = project.kiln(ep, &["drift", &clean]);
    ok.expect_ok();
    assert!(ok.stdout.contains("no drift in 1 group"), "{ok}");

    let d = project.kiln(ep, &["drift", &drifted, "--output", "json"]);
    d.expect_code(1);
    let report = json(&d);
    let g = &report["groups"][0];
    assert_eq!(g["instances"], 2, "{d}");
    let found = g["drifted"].as_array().unwrap();
    assert_eq!(found.len(), 1, "{d}");
    assert_eq!(found[0]["instance"], stray.as_str(), "{d}");
    assert_eq!(found[0]["image"]["kiln"], format!("{image}@1"), "{d}");
    assert_eq!(found[0]["expected"][0], reg[&2].ami.as_str(), "{d}");

    let o = project.kiln(ep, &["drift", &orphan]);
    o.expect_code(1);
    assert!(o.stdout.contains("deregistered or missing"), "{o}");

    project
        .kiln(ep, &["drift", &moto::unique("no-such-group")])
        .expect_code(2);
}

/// The rollout-history seam: any `ami-…` in any parameter under
/// `/kiln/rollout/`, whatever its JSON shape, keeps that version.
#[test]
fn prune_keeps_versions_mentioned_in_rollout_history() {
    let ep = moto::endpoint();
    let image = moto::unique("hist");
    let reg = rt().block_on(register(ep, EAST, &image, 1..=3));
    let group = moto::unique("web-prod");
    rt().block_on(async {
        let ssm = aws_sdk_ssm::Client::new(&moto::sdk_config(ep).await);
        ssm.put_parameter()
            .name(format!("/kiln/rollout/{group}/history"))
            .value(format!(
                r#"{{"entries":[{{"to":{{"ami":"{}"}},"outcome":"completed"}}]}}"#,
                reg[&1].ami
            ))
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .send()
            .await
            .unwrap();
    });
    let run = Project::new().kiln(ep, &["prune", &image, "--keep", "1", "--output", "json"]);
    run.expect_ok();
    let report = json(&run);
    assert_eq!(versions_in(&report, "delete"), [2].into(), "{run}");
    let kept = report["kept"].as_array().unwrap();
    let v1 = kept.iter().find(|k| k["version"] == 1).unwrap();
    assert_eq!(v1["reasons"][0]["kind"], "rollout-history", "{run}");
    assert_eq!(
        v1["reasons"][0]["parameter"],
        format!("/kiln/rollout/{group}/history"),
        "{run}"
    );
}

/// The presigned PUT URL for the package list in a SendCommand request body
/// (the provisioning script's `curl ... -T "$p" '<url>'` line), if any.
fn package_upload_url(send_command: &[u8]) -> Option<String> {
    let body: Value = serde_json::from_slice(send_command).ok()?;
    let script = body["Parameters"]["commands"][0].as_str()?;
    let rest = &script[script.find("-T \"$p\" '")? + "-T \"$p\" '".len()..];
    Some(rest[..rest.find('\'')?].to_string())
}

/// PUTs `bytes` to `url` with curl, as the builder's bootstrap does (with the
/// `If-None-Match: *` the URL is signed for), straight to moto (the builder
/// talks to S3, not through kiln's proxy). The HTTP status.
fn curl_put(url: &str, bytes: &[u8]) -> u16 {
    use std::io::Write;
    let mut child = std::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(["-H", "If-None-Match: *", "-T", "-", url])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl");
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "curl -T {url}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Plays the builder's part, which moto's instances never run: when kiln sends
/// the provisioning command, upload the current `list` to the presigned URL the
/// command carries, before kiln sees SendCommand's answer. Returns the URLs seen.
fn play_builder(
    proxy: &Proxy,
    list: std::sync::Arc<std::sync::Mutex<Option<String>>>,
) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (seen2, front) = (seen.clone(), proxy.endpoint());
    proxy.rewrite_exchange("ssm:SendCommand", move |request, answer| {
        if let Some(url) = package_upload_url(request) {
            seen2.lock().unwrap().push(url.clone());
            if let Some(l) = list.lock().unwrap().clone() {
                let status = curl_put(&url.replacen(&front, moto::endpoint(), 1), l.as_bytes());
                assert_eq!(status, 200, "the builder's upload");
            }
        }
        answer.to_vec()
    });
    seen
}

/// S3 in the shared moto, path-style like kiln's.
fn s3() -> aws_sdk_s3::Client {
    let conf = crate::bake::rt().block_on(moto::sdk_config(moto::endpoint()));
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&conf)
            .force_path_style(true)
            .build(),
    )
}

/// Whether `key` is in `bucket`.
fn object_exists(bucket: &str, key: &str) -> bool {
    crate::bake::rt()
        .block_on(s3().head_object().bucket(bucket).key(key).send())
        .is_ok()
}

/// A run killed after its builder uploaded the package list, before it claimed
/// its version, leaves a list no version records. `kiln gc` removes it once it
/// is older than `[bake] ttl`, and never a list a version records.
#[test]
fn gc_removes_package_lists_no_version_records_once_expired() {
    use crate::bake::{bake, project, setup};
    let env = setup();
    let image = moto::unique("web");
    let p = project(&env, &image, "ttl = \"3s\"\n");
    let proxy = Proxy::start(moto::endpoint());
    play_builder(
        &proxy,
        std::sync::Arc::new(std::sync::Mutex::new(Some("curl\t7.35.0\n".to_string()))),
    );
    let run = bake(&p, &proxy.endpoint(), &image, &[]);
    run.expect_ok();
    let out = json(&run);
    let recorded = out["packages"]["key"].as_str().unwrap().to_string();
    assert!(object_exists(&env.bucket, &recorded), "{run}");
    let orphan = format!(
        "kiln/packages/{image}/{}/killed-run.txt",
        out["hash"].as_str().unwrap()
    );
    crate::bake::rt()
        .block_on(
            s3().put_object()
                .bucket(&env.bucket)
                .key(&orphan)
                .body(b"curl\t7.35.0\n".to_vec().into())
                .send(),
        )
        .unwrap();

    let gc = |args: &[&str]| {
        let mut all = vec!["--output", "json", "gc"];
        all.extend_from_slice(args);
        let run = p.kiln(moto::endpoint(), &all);
        run.expect_ok();
        let reports = json(&run);
        let ids = |field: &str| -> Vec<String> {
            reports[0][field]
                .as_array()
                .unwrap()
                .iter()
                .filter(|t| t["kind"] == "package-list")
                .map(|t| t["id"].as_str().unwrap().to_string())
                .collect()
        };
        (ids("found"), ids("removed"))
    };
    // Young: found, not yet expired.
    assert_eq!(gc(&["--dry-run"]), (vec![orphan.clone()], vec![]));
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(
        gc(&["--dry-run"]),
        (vec![orphan.clone()], vec![orphan.clone()])
    );
    assert!(
        object_exists(&env.bucket, &orphan),
        "a dry run removes nothing"
    );
    assert_eq!(gc(&[]), (vec![orphan.clone()], vec![orphan.clone()]));
    assert!(!object_exists(&env.bucket, &orphan), "the orphan is gone");
    assert!(
        object_exists(&env.bucket, &recorded),
        "the recorded list stays"
    );
    assert_eq!(gc(&[]), (vec![], vec![]), "nothing left to find");
}

/// Three real bakes. The first two builders upload their `dpkg-query -W`
/// lists (played by the test through the presigned URL kiln put in the
/// provisioning command): `kiln diff` shows the added, removed and changed
/// packages. The bake itself never reads the list (no extra call: a full bake
/// stays at 18 calls); each run has its own key, and S3 refuses a second upload
/// to it. The third builder uploads nothing: the bake still succeeds, and
/// `kiln diff` says why packages are not compared.
#[test]
fn diff_shows_package_changes_recorded_by_the_bakes() {
    use crate::bake::{bake, project, setup};
    let env = setup();
    let image = moto::unique("web");
    let p = project(&env, &image, "");
    let list = std::sync::Arc::new(std::sync::Mutex::new(Some(
        "curl\t7.35.0-1ubuntu2.20\nopenssl\t1.0.1f-1ubuntu2.27\nvim\t2:7.4.052-1ubuntu3\n"
            .to_string(),
    )));
    let proxy = Proxy::start(moto::endpoint());
    let urls = play_builder(&proxy, list.clone());
    let touch_template = |line: &str| {
        let upstart = p.root().join("templates/trusty/upstart.conf.tera");
        let text = std::fs::read_to_string(&upstart).unwrap() + line;
        std::fs::write(&upstart, text).unwrap();
    };

    let first = bake(&p, &proxy.endpoint(), &image, &[]);
    first.expect_ok();
    let out = json(&first);
    let hash1 = out["hash"].as_str().unwrap();
    let key1 = format!(
        "kiln/packages/{image}/{hash1}/{}.txt",
        out["run_id"].as_str().unwrap()
    );
    assert_eq!(out["packages"]["key"], key1.as_str(), "{first}");
    assert!(out["packages"]["count"].is_null(), "not read back: {first}");
    assert_eq!(urls.lock().unwrap().len(), 1, "one provisioning command");
    assert!(
        urls.lock().unwrap()[0].contains(&format!("{key1}?")),
        "{:?}",
        urls.lock().unwrap()
    );
    assert_eq!(proxy.count("s3:GetObject"), 0, "{}", proxy.summary());
    // Packer's 19 are measured with the artifact already in the bucket; the
    // first bake of a new jar also uploads it (one PutObject, not counted).
    assert!(
        proxy.total_calls() - proxy.count("s3:PutObject") <= 18,
        "fewer calls than Packer's 19\n{}",
        proxy.summary()
    );
    eprintln!("full bake with a package list:\n{}", proxy.summary());

    // A cache hit reads no package list: still 2 calls.
    let hit = Proxy::start(moto::endpoint());
    bake(&p, &hit.endpoint(), &image, &[]).expect_ok();
    assert_eq!(hit.count("s3:GetObject"), 0, "{}", hit.summary());
    assert!(hit.total_calls() <= 2, "{}", hit.summary());

    // The list is write-once: a second upload to version 1's URL is refused.
    let url1 = urls.lock().unwrap()[0].replacen(&proxy.endpoint(), moto::endpoint(), 1);
    assert_eq!(curl_put(&url1, b"curl\t0\n"), 412, "a second upload");

    touch_template("# two\n");
    *list.lock().unwrap() = Some(
        "curl\t7.35.0-1ubuntu2.21\njq\t1.3-1.1ubuntu1\nopenssl\t1.0.1f-1ubuntu2.27\n".to_string(),
    );
    let second = bake(&p, &proxy.endpoint(), &image, &[]);
    second.expect_ok();
    assert_ne!(json(&second)["packages"]["key"], key1.as_str(), "{second}");

    let d = p.kiln(
        moto::endpoint(),
        &[
            "--output",
            "json",
            "diff",
            &format!("{image}@1"),
            &format!("{image}@2"),
        ],
    );
    d.expect_ok();
    let report = json(&d);
    assert_eq!(report["from"]["packages_recorded"], true, "{d}");
    assert_eq!(report["to"]["packages_recorded"], true, "{d}");
    let packages: Vec<(String, Value, Value)> = report["packages"]
        .as_array()
        .unwrap_or_else(|| panic!("packages compared\n{d}"))
        .iter()
        .map(|c| {
            assert_eq!(c["kind"], "package", "{d}");
            (
                c["key"].as_str().unwrap().to_string(),
                c["old"].clone(),
                c["new"].clone(),
            )
        })
        .collect();
    assert_eq!(
        packages,
        vec![
            (
                "curl".to_string(),
                Value::from("7.35.0-1ubuntu2.20"),
                Value::from("7.35.0-1ubuntu2.21")
            ),
            ("jq".to_string(), Value::Null, Value::from("1.3-1.1ubuntu1")),
            (
                "vim".to_string(),
                Value::from("2:7.4.052-1ubuntu3"),
                Value::Null
            ),
        ],
        "{d}"
    );
    assert_eq!(report["changes"].as_array().unwrap().len(), 1, "{d}");
    let human = p.kiln(
        moto::endpoint(),
        &["diff", &format!("{image}@1"), &format!("{image}@2")],
    );
    human.expect_ok();
    for line in [
        "changed package curl: 7.35.0-1ubuntu2.20 -> 7.35.0-1ubuntu2.21",
        "added   package jq: 1.3-1.1ubuntu1",
        "removed package vim: 2:7.4.052-1ubuntu3",
    ] {
        assert!(human.stdout.contains(line), "{line}\n{human}");
    }

    // A builder that uploads nothing: the bake succeeds, and diff says why
    // the packages are not compared.
    *list.lock().unwrap() = None;
    touch_template("# three\n");
    let third = p.kiln(&proxy.endpoint(), &["bake", &image]);
    third.expect_ok();
    assert!(third.stdout.contains("package list: s3://"), "{third}");
    let d = p.kiln(
        moto::endpoint(),
        &[
            "--output",
            "json",
            "diff",
            &format!("{image}@2"),
            &format!("{image}@3"),
        ],
    );
    d.expect_ok();
    let report = json(&d);
    assert!(report["packages"].is_null(), "{d}");
    assert_eq!(report["to"]["packages_recorded"], true, "{d}");
    let notes = report["notes"].to_string();
    assert!(
        notes.contains(&format!("the package list of {image}@3 cannot be read"))
            && notes.contains("does not exist: the builder did not upload it"),
        "{d}"
    );
    assert!(!notes.contains(&format!("{image}@2 cannot")), "{d}");
}
