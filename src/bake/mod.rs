//! The bake pipeline: turn a prepared recipe into a private AMI, or find the one
//! it already is.
//!
//! 1. Look the content hash up in every target region (one DescribeImages each).
//!    Found, available and ready everywhere: done, with no mutating call.
//! 2. Check every launch setting read-only (subnet, instance profile, bucket,
//!    security group, base AMI) so bad input fails before anything is created.
//! 3. Upload missing local artifacts to S3 under their sha256; launch one builder
//!    (IMDSv2 required, no inbound rules, tagged at creation with a run id and an
//!    expiry); provision it through SSM Run Command.
//! 4. Claim a version number, CreateImage with tags, wait for `available`, boot an
//!    instance from it and run the smoke tests, tag it ready.
//! 5. Copy to the other regions with a bound, tag the copies, report every region.
//!
//! Temporary resources are recorded as they are created and removed by
//! [`run`] whatever happens: success, error or Ctrl-C. `kiln gc` ([`gc`]) removes
//! what a killed process left, by tag and expiry. The decisions live in [`plan`]
//! as pure functions.

mod error;
pub mod gc;
pub mod plan;
mod root_volume;
pub mod scripts;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_ec2::client::Waiters;
use aws_sdk_ec2::types::{
    Filter, HttpTokensState, IamInstanceProfileSpecification, InstanceMetadataEndpointState,
    InstanceMetadataOptionsRequest, InstanceType, ResourceType, Tag, TagSpecification,
};
use aws_sdk_ssm::types::CommandInvocationStatus;
use futures::StreamExt;
use serde::Serialize;

pub use error::{BakeError, CommandFailure};
use plan::{Copy, Home, ImageProgress, OnFailure};

use crate::aws::attempts::Attempts;
use crate::aws::{Aws, AwsError};
use crate::recipe::{ArtifactSource, Prepared};
use crate::registry::{self, tags, Ami, Lookup};
use crate::ui::{fmt_duration, Ui};

/// AWS allows 64 KiB per SendCommand request (the document parameters plus the
/// rest of the request); leave room for the rest.
pub const MAX_COMMAND_BYTES: usize = 60 * 1024;
/// Copies started at once; the rest wait for a slot.
pub const COPY_PARALLELISM: usize = 4;
/// Key prefix of content-addressed artifacts in the bucket.
pub const ARTIFACT_PREFIX: &str = "kiln/artifacts/sha256/";

/// Launch and wait settings, from `[bake]` in kiln.toml.
#[derive(Debug, Clone)]
pub struct Settings {
    /// kiln.toml's path, for "not set" errors.
    pub config_path: String,
    pub bucket: Option<String>,
    pub subnet: Option<String>,
    pub instance_profile: Option<String>,
    pub security_group: Option<String>,
    /// After this, `kiln gc` may remove a temporary resource.
    pub ttl: Duration,
    /// Longest wait for an AMI (or a copy) to become available.
    pub image_timeout: Duration,
    /// Longest wait for the builder's SSM agent to accept a command.
    pub agent_timeout: Duration,
    /// Longest provisioning run.
    pub provision_timeout: Duration,
    /// Pause between polls of a command's status.
    pub poll: Duration,
}

impl Settings {
    pub fn from_config(path: &std::path::Path, c: &crate::config::BakeConfig) -> Settings {
        Settings {
            config_path: path.display().to_string(),
            bucket: c.bucket.clone(),
            subnet: c.subnet.clone(),
            instance_profile: c.instance_profile.clone(),
            security_group: c.security_group.clone(),
            ttl: c.ttl(),
            image_timeout: c.image_timeout(),
            agent_timeout: c.agent_timeout(),
            provision_timeout: c.provision_timeout(),
            poll: Duration::from_secs(5),
        }
    }
}

/// What to bake.
pub struct Request<'a> {
    pub prepared: &'a Prepared,
    pub base_ami: String,
    /// The base AMI was found by a lookup that proves it exists (owner + name).
    pub base_ami_checked: bool,
    pub hash: String,
    /// Home region first (where images are built), then the copy regions.
    pub regions: Vec<String>,
    pub dry_run: bool,
    pub skip_boot_test: bool,
}

/// The bake's result: what `--output json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub image: String,
    pub version: Option<u64>,
    pub hash: String,
    pub base_ami: String,
    pub java: String,
    /// `reused` (nothing to do), `built`, `completed` (finished an earlier run's
    /// image), `copied` (only copies were missing), or `dry-run`.
    pub action: String,
    /// region → AMI id
    pub regions: BTreeMap<String, String>,
    /// `passed`, `skipped`, or `not-run` (reused a ready image).
    pub boot_test: String,
    /// Where this bake's builder was told to upload the image's installed-package
    /// list, as recorded with the version (null when it built nothing or no
    /// bucket is configured). Not read at bake time: `kiln diff` reads it.
    pub packages: Option<registry::packages::PackageList>,
    pub run_id: String,
    /// What a dry run would do, one line per action.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plan: Vec<String>,
    pub timings: Vec<Timing>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub step: String,
    pub seconds: f64,
}

/// Temporary resources of this run, recorded the moment AWS returns their ids.
#[derive(Debug, Default)]
struct Temps {
    /// Builder and boot-test instances (home region).
    instances: Vec<String>,
    security_group: Option<String>,
    /// The image this run created, until it is known good.
    image: Option<(String, ImageProgress, Vec<String>)>,
}

type Shared = Arc<Mutex<Temps>>;

fn lock(t: &Shared) -> std::sync::MutexGuard<'_, Temps> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the bake and always cleans up: on success, on error and on Ctrl-C or
/// SIGTERM (the pipeline future is dropped at its next await, then the recorded
/// resources are removed).
pub async fn run(
    aws: &Aws,
    settings: &Settings,
    req: &Request<'_>,
    ui: &Ui,
) -> Result<Outcome, BakeError> {
    let temps: Shared = Arc::default();
    let result = tokio::select! {
        r = pipeline(aws, settings, req, ui, &temps) => r,
        _ = interrupted() => Err(BakeError::Interrupted),
    };
    if result.is_err() {
        // Reached only on failure; shows whichever happened first.
        ui.note("cleaning up after the failed bake");
    }
    let cleaned = cleanup(aws, &temps, result.is_err(), ui).await;
    match (result, cleaned) {
        (Ok(o), Ok(())) => Ok(o),
        (Ok(_), Err(e)) => Err(e),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(c)) => {
            ui.note(format!("cleanup: {c}"));
            Err(e)
        }
    }
}

async fn interrupted() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn tag(k: &str, v: impl Into<String>) -> Tag {
    Tag::builder().key(k).value(v).build()
}

fn spec(rt: ResourceType, tags: &[Tag]) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(rt)
        .set_tags(Some(tags.to_vec()))
        .build()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A run id: time-ordered, unique enough across machines.
pub fn new_run_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    format!("{secs:x}-{:06x}", h.finish() & 0xff_ffff)
}

struct Clock {
    timings: Vec<Timing>,
}

impl Clock {
    fn record(&mut self, step: &str, d: Duration) {
        self.timings.push(Timing {
            step: step.to_string(),
            seconds: (d.as_secs_f64() * 1000.0).round() / 1000.0,
        });
    }
}

/// What the launch needs, checked before anything is created.
struct Launch {
    subnet: String,
    vpc: String,
    profile: String,
    security_group: Option<String>,
    /// Local artifacts already in the bucket (by sha256).
    uploaded: BTreeSet<String>,
    /// The builder's root volume, when the recipe sets `root_volume_gib`.
    root_volume: Option<aws_sdk_ec2::types::BlockDeviceMapping>,
}

async fn pipeline(
    aws: &Aws,
    settings: &Settings,
    req: &Request<'_>,
    ui: &Ui,
    temps: &Shared,
) -> Result<Outcome, BakeError> {
    let image = req.prepared.recipe.name.clone();
    let home = req.regions[0].clone();
    let run_id = new_run_id();
    let mut clock = Clock {
        timings: Vec::new(),
    };
    let short = &req.hash[..12];

    // 1. Reuse before create.
    let step = ui.step(format!(
        "looking up {image} sha256:{short} in {}",
        req.regions.join(", ")
    ));
    let lookups = futures::future::join_all(req.regions.iter().map(|r| {
        let aws = aws.in_region(r);
        let image = image.clone();
        let hash = req.hash.clone();
        let is_home = *r == home;
        async move {
            // Home: every version of the image (the claim needs the highest
            // version anyway); elsewhere only this hash.
            let lookup = if is_home {
                Lookup::Image(&image)
            } else {
                Lookup::Hash(&hash)
            };
            registry::list_amis(&aws, lookup).await
        }
    }))
    .await;
    let mut found: BTreeMap<String, Vec<Ami>> = BTreeMap::new();
    let mut with_ami: BTreeSet<u64> = BTreeSet::new();
    for (r, res) in req.regions.iter().zip(lookups) {
        let amis = res?;
        if *r == home {
            with_ami.extend(amis.iter().filter_map(|a| a.version));
        }
        found.insert(
            r.clone(),
            amis.into_iter().filter(|a| a.hash == req.hash).collect(),
        );
    }
    let plan = plan::plan(&home, &found);
    clock.record("lookup", step.elapsed());
    let mut outcome = Outcome {
        image: image.clone(),
        version: None,
        hash: req.hash.clone(),
        base_ami: req.base_ami.clone(),
        java: req.prepared.recipe.file.java.version.clone(),
        action: String::new(),
        regions: BTreeMap::new(),
        boot_test: "not-run".into(),
        packages: None,
        run_id: run_id.clone(),
        plan: Vec::new(),
        timings: Vec::new(),
    };
    if plan.is_noop() {
        let Home::Reuse(a) = &plan.home else {
            unreachable!("noop plans reuse")
        };
        step.done(format!("found version {}", fmt_version(a.version)));
        outcome.action = "reused".into();
        outcome.version = a.version;
        for c in plan.copies.values() {
            if let Copy::Reuse(a) = c {
                outcome.regions.insert(a.region.clone(), a.id.clone());
            }
        }
        outcome.regions.insert(home.clone(), a.id.clone());
        outcome.timings = clock.timings;
        return Ok(outcome);
    }
    step.done(describe_plan(&plan).join("; "));

    // 2. Check the launch settings read-only; bad input stops here.
    let launch = if plan.launches() {
        let t = Instant::now();
        let step = ui.step("checking subnet, instance profile, bucket and base image");
        let l = preflight(aws, settings, req, matches!(plan.home, Home::Build)).await;
        match &l {
            Ok(_) => step.done(""),
            Err(e) => step.fail(e.to_string()),
        };
        clock.record("preflight", t.elapsed());
        Some(l?)
    } else {
        None
    };
    // The provisioning command is built (and its size checked) before launching.
    let bootstrap = match (&plan.home, &launch) {
        (Home::Build, Some(_)) => Some(build_bootstrap(aws, settings, req, &run_id).await?),
        _ => None,
    };

    if req.dry_run {
        outcome.action = "dry-run".into();
        outcome.plan = describe_plan(&plan);
        outcome.timings = clock.timings;
        return Ok(outcome);
    }

    // 3-4. Home region.
    let expires = rfc3339(SystemTime::now() + settings.ttl);
    let temp_tags = |role: &str, name: String| {
        vec![
            tag(tags::NAME, name),
            tag(tags::ROLE, role),
            tag(tags::RUN_ID, run_id.clone()),
            tag(tags::EXPIRES, expires.clone()),
            tag(tags::IMAGE, image.clone()),
        ]
    };
    // The home region's image, and the security group to boot-test it with
    // when it is not ready yet.
    let (home_ami, unfinished): (Ami, Option<String>) = match plan.home.clone() {
        Home::Reuse(a) => (a, None),
        Home::Build => {
            let launch = launch.as_ref().expect("build launches");
            let bootstrap = bootstrap.expect("built above");
            upload_artifacts(aws, settings, req, launch, ui, &mut clock).await?;
            let sg = ensure_security_group(aws, launch, &run_id, &temp_tags, temps, ui).await?;
            let t = Instant::now();
            let step = ui.step(format!("launching builder from {}", req.base_ami));
            let builder = launch_instance(
                aws,
                req,
                launch,
                &sg,
                &req.base_ami,
                launch.root_volume.as_ref(),
                Some(scripts::user_data()),
                temp_tags("builder", format!("kiln-builder {image} {short}")),
                temps,
            )
            .await
            .inspect_err(|e| {
                ui.note(format!("launch: {e}"));
            })?;
            step.done(&builder);
            clock.record("launch builder", t.elapsed());

            let t = Instant::now();
            let step = ui.step(format!("provisioning {builder} through SSM"));
            let r = run_command(
                aws,
                settings,
                &builder,
                &launch.profile,
                "provisioning",
                &format!("kiln {image} provision {short}"),
                &bootstrap.script,
                settings.provision_timeout,
                &step,
            )
            .await;
            finish_command(ui, step, &r);
            r?.check(
                "provisioning",
                "No image was made; the builder is being terminated.",
            )?;
            clock.record("provision", t.elapsed());

            // Where the builder was told to put its package list; not read
            // back here (no call): `kiln diff` reads it.
            outcome.packages = bootstrap
                .packages
                .as_ref()
                .map(|(bucket, key)| registry::packages::PackageList::at(bucket, key));
            if outcome.packages.is_none() {
                ui.note("no package list recorded: [bake] bucket is not set, so the builder has nowhere to upload it");
            }

            let t = Instant::now();
            let step = ui.step("claiming a version number");
            let claim = registry::claim_version(
                aws,
                registry::claim::ClaimRecord {
                    image: image.clone(),
                    version: 0,
                    hash: req.hash.clone(),
                    base_ami: req.base_ami.clone(),
                    java: outcome.java.clone(),
                    run_id: run_id.clone(),
                    claimed_at: rfc3339(SystemTime::now()),
                    // Recorded with the claim, for `kiln diff`: no extra call.
                    manifest: req.prepared.manifest(&req.base_ami).lines,
                    package_list: outcome.packages.clone(),
                },
                &with_ami,
            )
            .await?;
            step.done(format!(
                "version {}{}",
                claim.version,
                if claim.reused { " (reused claim)" } else { "" }
            ));
            clock.record("claim version", t.elapsed());

            let t = Instant::now();
            let step = ui.step(format!("creating image {image} v{}", claim.version));
            let ami = create_image(aws, req, &builder, claim.version, &run_id, temps).await?;
            step.update(format!("{ami}: waiting for available"));
            let snapshots = wait_available(aws, &ami, settings.image_timeout).await;
            let snapshots = match snapshots {
                Ok(s) => s,
                Err(e) => {
                    step.fail(e.to_string());
                    return Err(e);
                }
            };
            lock(temps).image = Some((ami.clone(), ImageProgress::Available, snapshots.clone()));
            step.done(&ami);
            clock.record("create image", t.elapsed());
            outcome.action = "built".into();
            let a = Ami {
                region: home.clone(),
                id: ami,
                name: String::new(),
                state: "available".into(),
                image: image.clone(),
                version: Some(claim.version),
                hash: req.hash.clone(),
                base_ami: req.base_ami.clone(),
                java: outcome.java.clone(),
                ready: false,
                created: String::new(),
                snapshots,
                run_id: run_id.clone(),
            };
            (a, Some(sg))
        }
        Home::Wait(a) | Home::Test(a) => {
            outcome.action = "completed".into();
            let t = Instant::now();
            let mut a = a;
            if a.is_pending() {
                let step = ui.step(format!(
                    "waiting for {} (an earlier run's image) to become available",
                    a.id
                ));
                a.snapshots = wait_available(aws, &a.id, settings.image_timeout).await?;
                a.state = "available".into();
                step.done("");
                clock.record("wait image", t.elapsed());
            }
            if a.ready {
                (a, None)
            } else {
                let launch = launch.as_ref().expect("testing launches");
                let sg = ensure_security_group(aws, launch, &run_id, &temp_tags, temps, ui).await?;
                (a, Some(sg))
            }
        }
    };
    let home_ami = match unfinished {
        None => home_ami,
        Some(sg) => {
            finish_image(
                aws,
                settings,
                req,
                launch
                    .as_ref()
                    .expect("an unfinished image has launch settings"),
                &sg,
                home_ami,
                &temp_tags,
                temps,
                ui,
                &mut clock,
                &mut outcome,
            )
            .await?
        }
    };
    outcome.version = home_ami.version;
    outcome.regions.insert(home.clone(), home_ami.id.clone());
    if outcome.action.is_empty() {
        outcome.action = "copied".into();
    }

    // 5. Copies, with a bound; every region's result is reported before failing.
    let copies: Vec<(String, Copy)> = plan.copies.clone().into_iter().collect();
    if !copies.is_empty() {
        let t = Instant::now();
        let step = ui.step(format!("copying to {} region(s)", copies.len()));
        let results: Vec<(String, Result<String, BakeError>)> =
            futures::stream::iter(copies.into_iter().map(|(region, c)| {
                let aws = aws.in_region(&region);
                let home_ami = home_ami.clone();
                let home = home.clone();
                let step = &step;
                let run_id = run_id.as_str();
                async move {
                    let r = copy_one(&aws, &home, &home_ami, c, settings, req, run_id).await;
                    match &r {
                        Ok(id) => step.update(format!("{region}: {id}")),
                        Err(e) => step.update(format!("{region}: {e}")),
                    }
                    (region, r)
                }
            }))
            .buffer_unordered(COPY_PARALLELISM)
            .collect()
            .await;
        let total = results.len();
        let mut failures = Vec::new();
        for (region, r) in results {
            match r {
                Ok(id) => {
                    outcome.regions.insert(region, id);
                }
                Err(e) => failures.push(format!("{region}: {e}")),
            }
        }
        if failures.is_empty() {
            step.done("");
        } else {
            step.fail(format!("{} failed", failures.len()));
            failures.sort();
            return Err(BakeError::Copies {
                failed: failures.len(),
                total,
                details: failures.join("; "),
            });
        }
        clock.record("copy", t.elapsed());
    }
    outcome.timings = clock.timings;
    Ok(outcome)
}

fn fmt_version(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "?".into())
}

/// One line per action the plan takes.
pub fn describe_plan(p: &plan::Plan) -> Vec<String> {
    let mut out = Vec::new();
    match &p.home {
        Home::Reuse(a) => out.push(format!(
            "{}: reuse {} (version {})",
            p.home_region,
            a.id,
            fmt_version(a.version)
        )),
        Home::Wait(a) => out.push(format!(
            "{}: wait for {} (version {}), then boot-test it",
            p.home_region,
            a.id,
            fmt_version(a.version)
        )),
        Home::Test(a) => out.push(format!(
            "{}: boot-test {} (version {}) and mark it ready",
            p.home_region,
            a.id,
            fmt_version(a.version)
        )),
        Home::Build => out.push(format!("{}: build a new version", p.home_region)),
    }
    for (r, c) in &p.copies {
        out.push(match c {
            Copy::Reuse(a) => format!("{r}: reuse {}", a.id),
            Copy::Wait(a) => format!("{r}: wait for copy {}", a.id),
            Copy::Create => format!("{r}: copy"),
        });
    }
    out
}

fn not_configured(s: &Settings, field: &'static str, why: &'static str) -> BakeError {
    BakeError::NotConfigured {
        path: s.config_path.clone(),
        field,
        why,
    }
}

fn local_artifacts<'a>(
    req: &'a Request<'_>,
) -> impl Iterator<Item = (&'a crate::recipe::ResolvedArtifact, &'a std::path::Path)> {
    req.prepared
        .artifacts
        .iter()
        .filter_map(|a| match &a.source {
            ArtifactSource::Local { path, .. } => Some((a, path.as_path())),
            ArtifactSource::Url(_) => None,
        })
}

/// Read-only checks of everything the launch names, in parallel. The first
/// problem (in a fixed order) is returned; nothing has been created yet.
async fn preflight(
    aws: &Aws,
    s: &Settings,
    req: &Request<'_>,
    building: bool,
) -> Result<Launch, BakeError> {
    let subnet = s.subnet.clone().ok_or_else(|| {
        not_configured(
            s,
            "subnet",
            "set the subnet the builder runs in (private is fine)",
        )
    })?;
    let profile = s.instance_profile.clone().ok_or_else(|| {
        not_configured(
            s,
            "instance_profile",
            "set an instance profile that lets the builder use SSM (and read the bucket)",
        )
    })?;
    let needs_bucket = building && local_artifacts(req).next().is_some();
    if needs_bucket && s.bucket.is_none() {
        return Err(not_configured(
            s,
            "bucket",
            "set the S3 bucket local artifacts are uploaded to",
        ));
    }
    let region = aws.region().to_string();

    let subnet_check = async {
        let out = aws
            .ec2()
            .describe_subnets()
            .subnet_ids(&subnet)
            .send()
            .await;
        match out {
            Ok(o) => o
                .subnets()
                .first()
                .and_then(|s| s.vpc_id())
                .map(str::to_string)
                .ok_or_else(|| BakeError::NoSubnet {
                    subnet: subnet.clone(),
                    region: region.clone(),
                }),
            Err(e)
                if e.as_service_error().and_then(|s| s.meta().code())
                    == Some("InvalidSubnetID.NotFound")
                    || e.as_service_error().and_then(|s| s.meta().code())
                        == Some("InvalidSubnetID.Malformed") =>
            {
                Err(BakeError::NoSubnet {
                    subnet: subnet.clone(),
                    region: region.clone(),
                })
            }
            Err(e) => Err(AwsError::call("ec2", "DescribeSubnets", &region, e).into()),
        }
    };
    let profile_name = profile.rsplit('/').next().unwrap_or(&profile).to_string();
    let profile_check = async {
        let iam = aws.iam();
        match iam
            .get_instance_profile()
            .instance_profile_name(&profile_name)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_no_such_entity_exception()) =>
            {
                Err(BakeError::NoInstanceProfile {
                    profile: profile.clone(),
                })
            }
            Err(e) => Err(AwsError::call("iam", "GetInstanceProfile", &region, e).into()),
        }
    };
    let artifacts_check = async {
        let mut uploaded = BTreeSet::new();
        if !needs_bucket {
            return Ok(uploaded);
        }
        let bucket = s.bucket.clone().expect("checked");
        let s3 = aws.s3();
        for (a, _) in local_artifacts(req) {
            // ListObjectsV2 limited to the one key, not HeadObject: a 404 from
            // HeadObject has no body, so it cannot tell a missing bucket from a
            // missing object, and this answers both in one call.
            let key = format!("{ARTIFACT_PREFIX}{}", a.sha256);
            match s3
                .list_objects_v2()
                .bucket(&bucket)
                .prefix(&key)
                .max_keys(1)
                .send()
                .await
            {
                Ok(o) => {
                    if o.contents().iter().any(|c| c.key() == Some(key.as_str())) {
                        uploaded.insert(a.sha256.clone());
                    }
                }
                Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_bucket()) => {
                    return Err(BakeError::NoBucket {
                        bucket: bucket.clone(),
                        region: region.clone(),
                    })
                }
                Err(e) => return Err(AwsError::call("s3", "ListObjectsV2", &region, e).into()),
            }
        }
        Ok(uploaded)
    };
    let sg_check = async {
        let Some(g) = &s.security_group else {
            return Ok(None);
        };
        match aws
            .ec2()
            .describe_security_groups()
            .group_ids(g)
            .send()
            .await
        {
            Ok(o) if !o.security_groups().is_empty() => Ok(Some(g.clone())),
            Ok(_) => Err(BakeError::NoSecurityGroup {
                group: g.clone(),
                region: region.clone(),
            }),
            Err(e) if e.code().is_some_and(|c| c.starts_with("InvalidGroup")) => {
                Err(BakeError::NoSecurityGroup {
                    group: g.clone(),
                    region: region.clone(),
                })
            }
            Err(e) => Err(AwsError::call("ec2", "DescribeSecurityGroups", &region, e).into()),
        }
    };
    let root_gib = req.prepared.recipe.file.builder.root_volume_gib;
    let base_check = async {
        // A resolved base was found by a lookup that proves it exists; a
        // resize needs its block device mappings, so it is described then too.
        if !building || (req.base_ami_checked && root_gib.is_none()) {
            return Ok(None);
        }
        let Some(base) = describe_base(aws, &req.base_ami).await? else {
            return Err(BakeError::NoBaseAmi {
                ami: req.base_ami.clone(),
                region: region.clone(),
            });
        };
        root_gib
            .map(|gib| {
                root_volume::mapping(&base, gib).map_err(|why| BakeError::RootVolume { why })
            })
            .transpose()
    };
    let (vpc, p, uploaded, sg, b) = tokio::join!(
        subnet_check,
        profile_check,
        artifacts_check,
        sg_check,
        base_check
    );
    let vpc = vpc?;
    p?;
    let uploaded = uploaded?;
    let security_group = sg?;
    let root_volume = b?;
    Ok(Launch {
        subnet,
        vpc,
        profile,
        security_group,
        uploaded,
        root_volume,
    })
}

use aws_smithy_types::error::metadata::ProvideErrorMetadata;

/// The base image, or `None` when it does not exist here.
async fn describe_base(
    aws: &Aws,
    ami: &str,
) -> Result<Option<aws_sdk_ec2::types::Image>, BakeError> {
    match aws.ec2().describe_images().image_ids(ami).send().await {
        Ok(o) => Ok(o
            .images()
            .iter()
            .find(|i| i.image_id() == Some(ami))
            .cloned()),
        Err(e) if e.code().is_some_and(|c| c.starts_with("InvalidAMIID")) => Ok(None),
        Err(e) => Err(AwsError::call("ec2", "DescribeImages", aws.region(), e).into()),
    }
}

/// The provisioning command, and where its builder uploads the package list.
struct Bootstrap {
    script: String,
    /// (bucket, key) of the package list, when there is a bucket to put it in.
    packages: Option<(String, String)>,
}

/// The provisioning command, with presigned GET URLs for local artifacts (no
/// AWS CLI on trusty; curl fetches them), the recipe's URLs for remote ones,
/// and, when `[bake] bucket` is set, a presigned PUT URL for the package list.
async fn build_bootstrap(
    aws: &Aws,
    s: &Settings,
    req: &Request<'_>,
    run_id: &str,
) -> Result<Bootstrap, BakeError> {
    let s3 = aws.s3();
    // Valid for the whole bake (presigning is local: no call).
    let presign = |operation: &'static str| {
        aws_sdk_s3::presigning::PresigningConfig::expires_in(s.agent_timeout + s.provision_timeout)
            .map_err(|e| AwsError::Call {
                service: "s3",
                operation,
                region: aws.region().to_string(),
                code: None,
                message: e.to_string(),
            })
    };
    let mut fetches = Vec::new();
    for a in &req.prepared.artifacts {
        let url = match &a.source {
            ArtifactSource::Url(u) => u.clone(),
            ArtifactSource::Local { .. } => {
                let bucket = s.bucket.clone().expect("checked in preflight");
                let cfg = presign("GetObject (presign)")?;
                s3.get_object()
                    .bucket(bucket)
                    .key(format!("{ARTIFACT_PREFIX}{}", a.sha256))
                    .presigned(cfg)
                    .await
                    .map_err(|e| AwsError::call("s3", "GetObject (presign)", aws.region(), e))?
                    .uri()
                    .to_string()
            }
        };
        fetches.push(scripts::Fetch {
            name: a.name.clone(),
            url,
            sha256: a.sha256.clone(),
        });
    }
    let mut packages = None;
    let mut put_url = None;
    if let Some(bucket) = &s.bucket {
        let key = registry::packages::key(&req.prepared.recipe.name, &req.hash, run_id);
        let cfg = presign("PutObject (presign)")?;
        put_url = Some(
            s3.put_object()
                .bucket(bucket)
                .key(&key)
                // Signed: S3 takes one upload to this key and refuses any
                // later one, so the recorded list stays the one this run wrote.
                .if_none_match("*")
                .presigned(cfg)
                .await
                .map_err(|e| AwsError::call("s3", "PutObject (presign)", aws.region(), e))?
                .uri()
                .to_string(),
        );
        packages = Some((bucket.clone(), key));
    }
    let script = scripts::bootstrap(&req.prepared.rendered, &fetches, put_url.as_deref());
    if script.len() > MAX_COMMAND_BYTES {
        return Err(BakeError::TooLarge {
            image: req.prepared.recipe.name.clone(),
            size: script.len(),
            limit: MAX_COMMAND_BYTES,
        });
    }
    Ok(Bootstrap { script, packages })
}

async fn upload_artifacts(
    aws: &Aws,
    s: &Settings,
    req: &Request<'_>,
    launch: &Launch,
    ui: &Ui,
    clock: &mut Clock,
) -> Result<(), BakeError> {
    let missing: Vec<_> = local_artifacts(req)
        .filter(|(a, _)| !launch.uploaded.contains(&a.sha256))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let t = Instant::now();
    let bucket = s.bucket.clone().expect("checked in preflight");
    let step = ui.step(format!(
        "uploading {} artifact(s) to s3://{bucket}",
        missing.len()
    ));
    let s3 = aws.s3();
    for (a, path) in missing {
        let body = aws_sdk_s3::primitives::ByteStream::from_path(path)
            .await
            .map_err(|e| {
                BakeError::Aws(AwsError::Call {
                    service: "s3",
                    operation: "PutObject",
                    region: aws.region().to_string(),
                    code: None,
                    message: format!("cannot read {}: {e}", path.display()),
                })
            })?;
        s3.put_object()
            .bucket(&bucket)
            .key(format!("{ARTIFACT_PREFIX}{}", a.sha256))
            .body(body)
            .send()
            .await
            .map_err(|e| AwsError::call("s3", "PutObject", aws.region(), e))?;
        step.update(&a.name);
    }
    step.done("");
    clock.record("upload artifacts", t.elapsed());
    Ok(())
}

/// The configured group, or a temporary one with no inbound rules (a new group
/// has none; its default egress rule lets the builder reach SSM, S3 and mirrors).
async fn ensure_security_group(
    aws: &Aws,
    launch: &Launch,
    run_id: &str,
    temp_tags: &dyn Fn(&str, String) -> Vec<Tag>,
    temps: &Shared,
    ui: &Ui,
) -> Result<String, BakeError> {
    if let Some(g) = &launch.security_group {
        return Ok(g.clone());
    }
    if let Some(g) = &lock(temps).security_group {
        return Ok(g.clone());
    }
    let name = format!("kiln-builder-{run_id}");
    let step = ui.step(format!("creating temporary security group {name}"));
    let out = aws
        .ec2()
        .create_security_group()
        .group_name(&name)
        .description("kiln builder: no inbound rules; removed after the bake")
        .vpc_id(&launch.vpc)
        .tag_specifications(spec(
            ResourceType::SecurityGroup,
            &temp_tags("builder-sg", name.clone()),
        ))
        .send()
        .await;
    let id = match out {
        Ok(out) => out.group_id().unwrap_or_default().to_string(),
        // The name is this run's own, so a group by that name was made by an
        // attempt whose answer was lost (the retry then sees
        // `InvalidGroup.Duplicate`, or the last attempt's answer was lost too):
        // it is ours to use and to remove.
        Err(e) => match group_named(aws, &launch.vpc, &name).await {
            Ok(Some(id)) => {
                ui.note(format!(
                    "CreateSecurityGroup answered {}; {name} exists ({id}): using it",
                    e.code().unwrap_or("without an answer")
                ));
                id
            }
            _ => return Err(AwsError::call("ec2", "CreateSecurityGroup", aws.region(), e).into()),
        },
    };
    lock(temps).security_group = Some(id.clone());
    step.done(&id);
    Ok(id)
}

/// The id of the security group called `name` in `vpc`, if there is one.
async fn group_named(aws: &Aws, vpc: &str, name: &str) -> Result<Option<String>, AwsError> {
    let out = aws
        .ec2()
        .describe_security_groups()
        .filters(Filter::builder().name("group-name").values(name).build())
        .filters(Filter::builder().name("vpc-id").values(vpc).build())
        .send()
        .await
        .map_err(|e| AwsError::call("ec2", "DescribeSecurityGroups", aws.region(), e))?;
    Ok(out
        .security_groups()
        .iter()
        .find_map(|g| g.group_id())
        .map(str::to_string))
}

#[allow(clippy::too_many_arguments)]
async fn launch_instance(
    aws: &Aws,
    req: &Request<'_>,
    launch: &Launch,
    sg: &str,
    ami: &str,
    root_volume: Option<&aws_sdk_ec2::types::BlockDeviceMapping>,
    user_data: Option<String>,
    tags: Vec<Tag>,
    temps: &Shared,
) -> Result<String, BakeError> {
    let profile = if launch.profile.starts_with("arn:") {
        IamInstanceProfileSpecification::builder()
            .arn(&launch.profile)
            .build()
    } else {
        IamInstanceProfileSpecification::builder()
            .name(&launch.profile)
            .build()
    };
    let mut call = aws
        .ec2()
        .run_instances()
        .image_id(ami)
        .instance_type(InstanceType::from(
            req.prepared.recipe.file.builder.instance_type.as_str(),
        ))
        .min_count(1)
        .max_count(1)
        .subnet_id(&launch.subnet)
        .security_group_ids(sg)
        .iam_instance_profile(profile)
        .metadata_options(
            InstanceMetadataOptionsRequest::builder()
                .http_tokens(HttpTokensState::Required)
                .http_endpoint(InstanceMetadataEndpointState::Enabled)
                .build(),
        )
        .tag_specifications(spec(ResourceType::Instance, &tags))
        .tag_specifications(spec(ResourceType::Volume, &tags));
    if let Some(m) = root_volume {
        call = call.block_device_mappings(m.clone());
    }
    if let Some(u) = user_data {
        call = call.user_data(aws_smithy_types::base64::encode(u.as_bytes()));
    }
    let value = |key: &str| {
        tags.iter()
            .find(|t| t.key() == Some(key))
            .and_then(|t| t.value())
            .unwrap_or_default()
            .to_string()
    };
    let (run_id, role) = (value(tags::RUN_ID), value(tags::ROLE));
    // One launch per role and run: EC2 answers a retry whose first attempt ran
    // with that attempt's instance instead of starting a second one.
    let attempts = Attempts::new();
    let out = call
        .client_token(format!("kiln-{run_id}-{role}"))
        .customize()
        .interceptor(attempts.clone())
        .send()
        .await;
    let launched = out.as_ref().ok().and_then(|o| {
        o.instances()
            .first()
            .and_then(|i| i.instance_id())
            .map(str::to_string)
    });
    if let Some(id) = &launched {
        lock(temps).instances.push(id.clone());
    }
    if attempts.retried() || out.is_err() {
        // An attempt whose answer was lost may have started an instance the
        // token did not deduplicate (moto honours no token): find this run's
        // instances of this role, keep the one answered, terminate the rest.
        sweep_launches(aws, &run_id, &role, launched.as_deref(), temps).await;
    }
    out.map_err(|e| {
        let code = e.code().map(str::to_string);
        // A profile IAM has but EC2 cannot see yet (eventual consistency) or a
        // profile deleted since the check.
        if code.as_deref() == Some("NoSuchEntity") {
            BakeError::NoInstanceProfile {
                profile: launch.profile.clone(),
            }
        } else {
            AwsError::call("ec2", "RunInstances", aws.region(), e).into()
        }
    })?;
    Ok(launched.unwrap_or_default())
}

/// After a retried or failed RunInstances: every live instance tagged with this
/// run and role is recorded for cleanup, and all but `keep` are terminated now
/// rather than when the bake ends. Best effort: what this misses (EC2's
/// eventual consistency can hide an instance for a few seconds) carries the
/// run's expiry tag, and `kiln gc` removes it.
async fn sweep_launches(aws: &Aws, run_id: &str, role: &str, keep: Option<&str>, temps: &Shared) {
    let found = aws
        .ec2()
        .describe_instances()
        .filters(
            Filter::builder()
                .name(format!("tag:{}", tags::RUN_ID))
                .values(run_id)
                .build(),
        )
        .filters(
            Filter::builder()
                .name(format!("tag:{}", tags::ROLE))
                .values(role)
                .build(),
        )
        .filters(gc::not_terminated())
        .send()
        .await;
    let Ok(found) = found else {
        return;
    };
    let extra: Vec<String> = found
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.instance_id())
        .filter(|id| Some(*id) != keep)
        .map(str::to_string)
        .collect();
    if extra.is_empty() {
        return;
    }
    lock(temps).instances.extend(extra.iter().cloned());
    if keep.is_some() {
        let _ = aws
            .ec2()
            .terminate_instances()
            .set_instance_ids(Some(extra))
            .send()
            .await;
    }
}

/// A command's end state.
#[derive(Debug)]
struct CommandResult {
    instance: String,
    region: String,
    status: String,
    code: i32,
    stdout: String,
    stderr: String,
}

impl CommandResult {
    fn check(self, what: &'static str, after: &'static str) -> Result<(), BakeError> {
        if self.status == "Success" && self.code == 0 {
            return Ok(());
        }
        Err(BakeError::Command(Box::new(error::CommandFailure {
            what,
            instance: self.instance,
            region: self.region,
            status: self.status,
            code: if self.code >= 0 {
                format!(" with exit code {}", self.code)
            } else {
                String::new()
            },
            after,
        })))
    }
}

fn finish_command(ui: &Ui, step: crate::ui::Step, r: &Result<CommandResult, BakeError>) {
    match r {
        Ok(c) => {
            let out = [c.stdout.trim_end(), c.stderr.trim_end()]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join("\n");
            let ok = c.status == "Success" && c.code == 0;
            if ok {
                step.done(format!("{} lines of output", out.lines().count()));
            } else {
                step.fail(format!("{} (exit {})", c.status, c.code));
            }
            // The script's output: on failure always, on success with -v (the
            // caller's log level) or when it is short.
            if !out.is_empty() && (!ok || tracing::enabled!(tracing::Level::DEBUG)) {
                ui.note(out);
            }
        }
        Err(e) => {
            step.fail(e.to_string());
        }
    }
}

/// Sends a shell script through SSM Run Command and waits for its end state.
/// The agent of a fresh instance is not registered at once, and SendCommand
/// answers `InvalidInstanceId` until it is: retried until the agent timeout.
#[allow(clippy::too_many_arguments)]
async fn run_command(
    aws: &Aws,
    s: &Settings,
    instance: &str,
    profile: &str,
    what: &'static str,
    comment: &str,
    script: &str,
    timeout: Duration,
    step: &crate::ui::Step,
) -> Result<CommandResult, BakeError> {
    let ssm = aws.ssm();
    let started = Instant::now();
    let mut delay = Duration::from_secs(2);
    let command_id = loop {
        let sent = ssm
            .send_command()
            .instance_ids(instance)
            .document_name("AWS-RunShellScript")
            .comment(comment.chars().take(100).collect::<String>())
            .parameters("commands", vec![script.to_string()])
            .parameters("executionTimeout", vec![timeout.as_secs().to_string()])
            .timeout_seconds(timeout.as_secs().clamp(30, 2_592_000) as i32)
            .send()
            .await;
        match sent {
            Ok(o) => {
                break o
                    .command()
                    .and_then(|c| c.command_id())
                    .unwrap_or_default()
                    .to_string()
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_invalid_instance_id()) =>
            {
                if started.elapsed() >= s.agent_timeout {
                    return Err(BakeError::AgentTimeout {
                        instance: instance.to_string(),
                        region: aws.region().to_string(),
                        waited: fmt_duration(started.elapsed()),
                        profile: profile.to_string(),
                    });
                }
                step.update("waiting for the SSM agent");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(15));
            }
            Err(e) => return Err(AwsError::call("ssm", "SendCommand", aws.region(), e).into()),
        }
    };
    let deadline = Instant::now() + timeout + Duration::from_secs(60);
    loop {
        let got = ssm
            .get_command_invocation()
            .command_id(&command_id)
            .instance_id(instance)
            .send()
            .await;
        match got {
            Ok(o) => {
                let status = o.status().cloned();
                let terminal = matches!(
                    status,
                    Some(
                        CommandInvocationStatus::Success
                            | CommandInvocationStatus::Failed
                            | CommandInvocationStatus::Cancelled
                            | CommandInvocationStatus::TimedOut
                    )
                );
                if terminal {
                    return Ok(CommandResult {
                        instance: instance.to_string(),
                        region: aws.region().to_string(),
                        status: status.map(|s| s.as_str().to_string()).unwrap_or_default(),
                        code: o.response_code(),
                        stdout: o.standard_output_content().unwrap_or_default().to_string(),
                        stderr: o.standard_error_content().unwrap_or_default().to_string(),
                    });
                }
                step.update(
                    status
                        .map(|s| s.as_str().to_string())
                        .unwrap_or_else(|| "waiting".into()),
                );
            }
            // Right after SendCommand the invocation may not be visible yet.
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_invocation_does_not_exist()) => {}
            Err(e) => {
                return Err(AwsError::call("ssm", "GetCommandInvocation", aws.region(), e).into())
            }
        }
        if Instant::now() >= deadline {
            return Err(BakeError::CommandTimeout {
                what,
                instance: instance.to_string(),
                region: aws.region().to_string(),
                waited: fmt_duration(started.elapsed()),
            });
        }
        tokio::time::sleep(s.poll).await;
    }
}

/// The tags of a version, on its image and snapshots in every region.
fn image_tags(req: &Request<'_>, version: u64, run_id: &str, state: &str) -> Vec<Tag> {
    let image = &req.prepared.recipe.name;
    vec![
        tag(tags::NAME, format!("{image} v{version}")),
        tag(tags::VERSION_PLAIN, version.to_string()),
        tag(tags::IMAGE, image.clone()),
        tag(tags::VERSION, version.to_string()),
        tag(tags::HASH, req.hash.clone()),
        tag(tags::BASE_AMI, req.base_ami.clone()),
        tag(tags::JAVA, req.prepared.recipe.file.java.version.clone()),
        tag(tags::RUN_ID, run_id),
        tag(tags::STATE, state),
    ]
}

fn ami_name(image: &str, version: u64, hash: &str) -> String {
    format!("kiln-{image}-v{version}-{}", &hash[..12])
}

/// CreateImage with the version's tags on the image. The builder is not
/// stopped first: CreateImage's default reboot shuts it down cleanly before the
/// snapshot, which is the consistency a stop buys, in one call instead of three.
/// Snapshot tags are added with the ready tag (moto answers 500 to a `snapshot`
/// tag specification on CreateImage).
async fn create_image(
    aws: &Aws,
    req: &Request<'_>,
    builder: &str,
    version: u64,
    run_id: &str,
    temps: &Shared,
) -> Result<String, BakeError> {
    let image = &req.prepared.recipe.name;
    let desc = format!(
        "{} (kiln {image} v{version}, sha256:{})",
        req.prepared.recipe.file.description, req.hash
    );
    let name = ami_name(image, version, &req.hash);
    let attempts = Attempts::new();
    let out = aws
        .ec2()
        .create_image()
        .instance_id(builder)
        .name(&name)
        .description(desc.chars().take(255).collect::<String>())
        .tag_specifications(spec(
            ResourceType::Image,
            &image_tags(req, version, run_id, tags::STATE_TESTING),
        ))
        .customize()
        .interceptor(attempts.clone())
        .send()
        .await;
    let answered = out
        .as_ref()
        .ok()
        .and_then(|o| o.image_id())
        .map(str::to_string);
    let ami = if attempts.retried() || out.is_err() {
        // CreateImage has no client token. When an attempt's answer was lost,
        // the retry either made a second image (moto) or was refused with
        // `InvalidAMIName.Duplicate` (AWS). The images of this name tagged with
        // this run are all this run's: keep the one answered (or the first
        // made), remove the others now.
        match keep_one_image(aws, &name, run_id, answered).await {
            Some(keep) => keep,
            None => {
                return Err(
                    AwsError::call("ec2", "CreateImage", aws.region(), out.unwrap_err()).into(),
                )
            }
        }
    } else {
        answered.unwrap_or_default()
    };
    lock(temps).image = Some((ami.clone(), ImageProgress::Pending, Vec::new()));
    Ok(ami)
}

/// After a retried call that makes an image: of this run's images called
/// `name`, keeps `answered` (or, when no answer came, the first made) and
/// removes the others, which a lost answer's retry made. The image kept, if any.
async fn keep_one_image(
    aws: &Aws,
    name: &str,
    run_id: &str,
    answered: Option<String>,
) -> Option<String> {
    let ours = images_of_run(aws, name, run_id).await.unwrap_or_default();
    let keep = answered.or_else(|| ours.first().map(|(id, _)| id.clone()))?;
    for (id, snapshots) in ours.iter().filter(|(id, _)| *id != keep) {
        if let Err(e) = remove_image(aws, id, snapshots).await {
            tracing::warn!("removing duplicate image {id}: {e}");
        }
    }
    Some(keep)
}

/// This run's images called `name` (id, snapshots), oldest first.
async fn images_of_run(
    aws: &Aws,
    name: &str,
    run_id: &str,
) -> Result<Vec<(String, Vec<String>)>, AwsError> {
    let out = aws
        .ec2()
        .describe_images()
        .owners("self")
        .filters(Filter::builder().name("name").values(name).build())
        .filters(
            Filter::builder()
                .name(format!("tag:{}", tags::RUN_ID))
                .values(run_id)
                .build(),
        )
        .send()
        .await
        .map_err(|e| AwsError::call("ec2", "DescribeImages", aws.region(), e))?;
    let mut images: Vec<_> = out
        .images()
        .iter()
        .filter_map(|i| {
            let id = i.image_id()?.to_string();
            Some((
                i.creation_date().unwrap_or_default().to_string(),
                id,
                registry::snapshots_of(i),
            ))
        })
        .collect();
    images.sort();
    Ok(images
        .into_iter()
        .map(|(_, id, snaps)| (id, snaps))
        .collect())
}

/// Waits with the SDK's waiter; returns the image's snapshots. A timeout is an
/// error that keeps the image ([`plan::image_on_failure`]).
async fn wait_available(aws: &Aws, ami: &str, max: Duration) -> Result<Vec<String>, BakeError> {
    let region = aws.region().to_string();
    match aws
        .ec2()
        .wait_until_image_available()
        .image_ids(ami)
        .wait(max)
        .await
    {
        Ok(poll) => {
            let out = poll
                .into_result()
                .map_err(|e| AwsError::call("ec2", "DescribeImages", &region, e))?;
            Ok(out
                .images()
                .first()
                .map(registry::snapshots_of)
                .unwrap_or_default())
        }
        Err(
            aws_sdk_ec2::waiters::image_available::WaitUntilImageAvailableError::ExceededMaxWait(_),
        ) => Err(BakeError::WaitTimeout {
            ami: ami.to_string(),
            region,
            waited: fmt_duration(max),
        }),
        Err(aws_sdk_ec2::waiters::image_available::WaitUntilImageAvailableError::FailureState(
            f,
        )) => {
            let (state, reason) = f
                .final_poll()
                .as_result()
                .ok()
                .and_then(|o| o.images().first())
                .map(|i| {
                    (
                        i.state()
                            .map(|s| s.as_str().to_string())
                            .unwrap_or_default(),
                        i.state_reason()
                            .and_then(|r| r.message())
                            .unwrap_or("no reason given")
                            .to_string(),
                    )
                })
                .unwrap_or_else(|| ("failed".into(), "no reason given".into()));
            Err(BakeError::ImageFailed {
                ami: ami.to_string(),
                region,
                state,
                reason,
            })
        }
        Err(
            aws_sdk_ec2::waiters::image_available::WaitUntilImageAvailableError::OperationFailed(f),
        ) => Err(AwsError::call("ec2", "DescribeImages", &region, f.into_error()).into()),
        Err(e) => Err(AwsError::Call {
            service: "ec2",
            operation: "DescribeImages (waiter)",
            region,
            code: None,
            message: crate::config::one_line(&e.to_string()),
        }
        .into()),
    }
}

/// Boot test (unless skipped), then the ready tag on the image and its
/// snapshots in one CreateTags call.
#[allow(clippy::too_many_arguments)]
async fn finish_image(
    aws: &Aws,
    settings: &Settings,
    req: &Request<'_>,
    launch: &Launch,
    sg: &str,
    mut a: Ami,
    temp_tags: &dyn Fn(&str, String) -> Vec<Tag>,
    temps: &Shared,
    ui: &Ui,
    clock: &mut Clock,
    outcome: &mut Outcome,
) -> Result<Ami, BakeError> {
    let version = a.version.unwrap_or(0);
    if req.skip_boot_test {
        ui.note(format!(
            "skipping the boot test: {} is marked ready without booting it or running the recipe's smoke commands",
            a.id
        ));
        outcome.boot_test = "skipped".into();
    } else {
        let t = Instant::now();
        let step = ui.step(format!("boot test: launching an instance from {}", a.id));
        let tester = launch_instance(
            aws,
            req,
            launch,
            sg,
            &a.id,
            // The new image already has the builder's volume size.
            None,
            None,
            temp_tags(
                "boot-test",
                format!("kiln-boot-test {} v{version}", req.prepared.recipe.name),
            ),
            temps,
        )
        .await?;
        step.update(format!(
            "{tester}: running {} smoke command(s)",
            req.prepared.recipe.file.smoke.len()
        ));
        let script = scripts::smoke(&req.prepared.recipe.file.smoke);
        let r = run_command(
            aws,
            settings,
            &tester,
            &launch.profile,
            "the boot test",
            &format!("kiln {} smoke v{version}", req.prepared.recipe.name),
            &script,
            Duration::from_secs(
                req.prepared
                    .recipe
                    .file
                    .smoke
                    .iter()
                    .map(|t| u64::from(t.timeout_secs) + 30)
                    .sum::<u64>()
                    .max(60),
            ),
            &step,
        )
        .await;
        finish_command(ui, step, &r);
        r?.check(
            "the boot test",
            "The image is being deregistered and its snapshots deleted.",
        )?;
        clock.record("boot test", t.elapsed());
        outcome.boot_test = "passed".into();
    }
    let mut resources = vec![a.id.clone()];
    resources.extend(a.snapshots.iter().cloned());
    let run_id = if a.run_id.is_empty() {
        outcome.run_id.clone()
    } else {
        a.run_id.clone()
    };
    let mut t = image_tags(req, version, &run_id, tags::STATE_READY);
    t.push(tag(tags::BOOT_TEST, outcome.boot_test.clone()));
    aws.ec2()
        .create_tags()
        .set_resources(Some(resources))
        .set_tags(Some(t))
        .send()
        .await
        .map_err(|e| AwsError::call("ec2", "CreateTags", aws.region(), e))?;
    // Known good from here on: a later failure (a copy) must not remove it.
    lock(temps).image = None;
    a.ready = true;
    Ok(a)
}

/// One copy region: create (or wait for) the copy, then make sure it carries
/// the version's tags. CopyImage's tag specifications tag the copy and its
/// snapshots on AWS; moto ignores them, so the tags are checked on the final
/// poll and added with CreateTags only where missing.
async fn copy_one(
    aws: &Aws,
    home: &str,
    source: &Ami,
    c: Copy,
    s: &Settings,
    req: &Request<'_>,
    this_run: &str,
) -> Result<String, BakeError> {
    let version = source.version.unwrap_or(0);
    let run_id = source.run_id.clone();
    let mut want = image_tags(req, version, &run_id, tags::STATE_READY);
    want.push(tag(tags::SOURCE, format!("{home}/{}", source.id)));
    let id = match c {
        Copy::Reuse(a) => return Ok(a.id),
        Copy::Wait(a) => a.id,
        Copy::Create => {
            let name = ami_name(&req.prepared.recipe.name, version, &req.hash);
            let attempts = Attempts::new();
            let out = aws
                .ec2()
                .copy_image()
                .source_region(home)
                .source_image_id(&source.id)
                .name(&name)
                .description(format!(
                    "kiln {} v{version}, sha256:{} (copy of {home}/{})",
                    req.prepared.recipe.name, req.hash, source.id
                ))
                .tag_specifications(spec(ResourceType::Image, &want))
                .tag_specifications(spec(ResourceType::Snapshot, &want))
                // One copy per bake run and region: EC2 answers a retry whose
                // first attempt ran with that attempt's image.
                .client_token(format!("kiln-{this_run}-{}", source.id))
                .customize()
                .interceptor(attempts.clone())
                .send()
                .await
                .map_err(|e| AwsError::call("ec2", "CopyImage", aws.region(), e))?;
            let id = out.image_id().unwrap_or_default().to_string();
            if attempts.retried() {
                // moto honours no token: remove copies a lost answer left.
                keep_one_image(aws, &name, &run_id, Some(id.clone())).await;
            }
            id
        }
    };
    let region = aws.region().to_string();
    let poll = aws
        .ec2()
        .wait_until_image_available()
        .image_ids(&id)
        .wait(s.image_timeout)
        .await;
    let img = match poll {
        Ok(p) => p
            .into_result()
            .map_err(|e| AwsError::call("ec2", "DescribeImages", &region, e))?
            .images()
            .first()
            .cloned(),
        Err(
            aws_sdk_ec2::waiters::image_available::WaitUntilImageAvailableError::ExceededMaxWait(_),
        ) => {
            return Err(BakeError::WaitTimeout {
                ami: id,
                region,
                waited: fmt_duration(s.image_timeout),
            })
        }
        Err(e) => {
            return Err(BakeError::ImageFailed {
                ami: id,
                region,
                state: "not available".into(),
                reason: crate::config::one_line(&e.to_string()),
            })
        }
    };
    let Some(img) = img else {
        return Err(BakeError::ImageFailed {
            ami: id,
            region,
            state: "gone".into(),
            reason: "it disappeared while copying".into(),
        });
    };
    let has_all = want.iter().all(|t| {
        registry::tag_value(img.tags(), t.key().unwrap_or_default()).as_deref() == t.value()
    });
    if !has_all {
        let mut resources = vec![id.clone()];
        resources.extend(registry::snapshots_of(&img));
        aws.ec2()
            .create_tags()
            .set_resources(Some(resources))
            .set_tags(Some(want))
            .send()
            .await
            .map_err(|e| AwsError::call("ec2", "CreateTags", &region, e))?;
    }
    Ok(id)
}

/// Removes this run's temporaries: every instance in one TerminateInstances
/// call, then the temporary security group (retrying while EC2 still counts the
/// terminating instances as its users), and after a failure the image it made
/// when that image is safe to remove.
async fn cleanup(aws: &Aws, temps: &Shared, failed: bool, ui: &Ui) -> Result<(), BakeError> {
    let (instances, sg, image) = {
        let mut t = lock(temps);
        (
            std::mem::take(&mut t.instances),
            t.security_group.take(),
            t.image.take(),
        )
    };
    let mut problems = Vec::new();
    let region = aws.region().to_string();
    if !instances.is_empty() {
        if let Err(e) = aws
            .ec2()
            .terminate_instances()
            .set_instance_ids(Some(instances.clone()))
            .send()
            .await
        {
            problems.push(AwsError::call("ec2", "TerminateInstances", &region, e).to_string());
        }
    }
    if failed {
        if let Some((ami, progress, snapshots)) = image {
            match plan::image_on_failure(progress) {
                OnFailure::Keep => ui.note(format!(
                    "kept {ami} in {region}: it may still become available; a re-run finds it by hash"
                )),
                OnFailure::Remove => {
                    if let Err(e) = remove_image(aws, &ami, &snapshots).await {
                        problems.push(e.to_string());
                    } else {
                        ui.note(format!("deregistered {ami} and deleted {} snapshot(s)", snapshots.len()));
                    }
                }
            }
        }
    }
    if let Some(g) = sg {
        if let Err(e) = delete_security_group(aws, &g).await {
            problems.push(e.to_string());
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(BakeError::Cleanup(problems.join("; ")))
    }
}

pub(crate) async fn remove_image(
    aws: &Aws,
    ami: &str,
    snapshots: &[String],
) -> Result<(), AwsError> {
    let region = aws.region();
    // "Not found" is done: a retry whose first attempt's answer was lost, or
    // a removal made by someone else in between.
    match aws.ec2().deregister_image().image_id(ami).send().await {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.code(),
                Some("InvalidAMIID.NotFound" | "InvalidAMIID.Unavailable")
            ) => {}
        Err(e) => return Err(AwsError::call("ec2", "DeregisterImage", region, e)),
    }
    for s in snapshots {
        match aws.ec2().delete_snapshot().snapshot_id(s).send().await {
            Ok(_) => {}
            Err(e) if e.code() == Some("InvalidSnapshot.NotFound") => {}
            Err(e) => return Err(AwsError::call("ec2", "DeleteSnapshot", region, e)),
        }
    }
    Ok(())
}

/// Deletes a security group, retrying `DependencyViolation` while terminating
/// instances still use it (a few minutes on AWS; immediate on moto). Trying
/// first and waiting only when refused saves the DescribeInstances polling.
pub(crate) async fn delete_security_group(aws: &Aws, group: &str) -> Result<(), AwsError> {
    let started = Instant::now();
    let mut delay = Duration::from_secs(5);
    loop {
        match aws
            .ec2()
            .delete_security_group()
            .group_id(group)
            .send()
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if e.code() == Some("InvalidGroup.NotFound") => return Ok(()),
            Err(e)
                if e.code() == Some("DependencyViolation")
                    && started.elapsed() < Duration::from_secs(600) =>
            {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Err(e) => {
                return Err(AwsError::call(
                    "ec2",
                    "DeleteSecurityGroup",
                    aws.region(),
                    e,
                ))
            }
        }
    }
}
