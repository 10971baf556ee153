//! `kiln prune`: remove old versions of an image that nothing needs any more.

use std::time::{Duration, SystemTime};

use futures::StreamExt;
use serde::Serialize;

use super::Ctx;
use crate::lifecycle::prune::{self, Plan, Policy, Protections, Removal};
use crate::lifecycle::LifecycleError;
use crate::registry::{self, ImageRef};
use crate::{Error, Result};

/// Remove old versions of an image: deregister their AMIs and delete their
/// snapshots in every region. A dry run unless --execute is given.
///
/// A version is kept when it is among the newest --keep versions, younger
/// than --older-than, not yet available, or when, in any region, one of its
/// AMIs is used by an instance (any state but terminated), named by any version
/// of any launch template (directly or through resolve:ssm:) or by a launch
/// configuration, pointed at by a channel, or mentioned in a rollout history
/// under /kiln/rollout/. A version kept in one region is kept in all of them.
/// The dry run lists what would go and why each kept version is kept.
///
/// Regions: every --region given, else the default region plus kiln.toml's
/// `[bake] copy_regions`.
///
/// Examples:
///   kiln prune web
///   kiln prune web --keep 5 --older-than 30d --execute
///   kiln prune web --region us-east-1 --region eu-west-1 --output json
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The image whose versions to prune (a name, not a ref)
    pub image: String,
    /// Always keep this many newest versions (at least 1)
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub keep: usize,
    /// Only remove versions created longer ago than this (30d, 12h, 2w)
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    pub older_than: Option<Duration>,
    /// Remove them; without it nothing is changed
    #[arg(long)]
    pub execute: bool,
}

fn parse_age(s: &str) -> std::result::Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (write e.g. 30d, 12h, 2w)"))
}

#[derive(Serialize)]
struct Report<'a> {
    image: &'a str,
    regions: &'a [String],
    execute: bool,
    keep: usize,
    older_than: Option<String>,
    #[serde(flatten)]
    plan: &'a Plan,
    /// Present with --execute: what happened to each regional AMI.
    #[serde(skip_serializing_if = "Option::is_none")]
    removals: Option<&'a [Removal]>,
}

pub async fn run(ctx: &mut Ctx, args: Args) -> Result<()> {
    match registry::parse_ref(&args.image)? {
        ImageRef::Latest { .. } if !args.image.contains('@') => {}
        _ => {
            return Err(Error::Usage(format!(
                "prune takes an image name (web), not a ref ({})",
                args.image
            )))
        }
    }
    if args.keep == 0 {
        return Err(Error::Usage(
            "--keep 0 would leave no version to roll out or revert to; keep at least 1".into(),
        ));
    }
    let aws = ctx.aws().await?;
    let regions = ctx.regions(&aws)?;
    let step = ctx.ui.step(format!(
        "listing versions of {} in {}",
        args.image,
        regions.join(", ")
    ));
    let versions = registry::list_versions(&aws, Some(&args.image), &regions).await?;
    step.done(format!("{} version(s)", versions.len()));

    let step = ctx.ui.step(format!(
        "looking for instances, launch templates, channels and rollout history using them in {}",
        regions.join(", ")
    ));
    let gathered: Vec<(
        String,
        std::result::Result<Protections, crate::aws::AwsError>,
    )> = futures::stream::iter(regions.iter().map(|r| {
        let aws = aws.in_region(r);
        let ids: Vec<String> = versions
            .iter()
            .filter_map(|v| v.ami_in(r))
            .map(|a| a.id.clone())
            .collect();
        async move { (aws.region().to_string(), prune::gather(&aws, &ids).await) }
    }))
    .buffer_unordered(4)
    .collect()
    .await;
    let mut protections = Protections::default();
    let mut failures = Vec::new();
    for (region, r) in gathered {
        match r {
            Ok(p) => protections.merge(p),
            Err(e) => failures.push(format!("{region}: {e}")),
        }
    }
    if !failures.is_empty() {
        // Deleting on a partial view could remove an image something still needs.
        step.fail("");
        failures.sort();
        return Err(LifecycleError::Unobserved(format!(
            "could not check what uses the images of {}, so nothing was removed: {}",
            args.image,
            failures.join("; ")
        ))
        .into());
    }
    step.done("");

    let plan = prune::decide(
        &versions,
        &protections,
        &Policy {
            keep: args.keep,
            older_than: args.older_than,
            now: SystemTime::now(),
        },
    );
    let removals = if args.execute && !plan.delete.is_empty() {
        let step = ctx.ui.step(format!(
            "removing {} version(s) of {}",
            plan.delete.len(),
            args.image
        ));
        let r = prune::execute(&aws, &plan).await;
        let failed = r.iter().filter(|x| x.error.is_some()).count();
        if failed == 0 {
            step.done(format!("{} AMI(s) removed", r.len()));
        } else {
            step.fail(format!("{failed} of {} failed", r.len()));
        }
        Some(r)
    } else {
        None
    };

    if ctx.ui.json() {
        ctx.ui.print_json(&Report {
            image: &args.image,
            regions: &regions,
            execute: args.execute,
            keep: args.keep,
            older_than: args
                .older_than
                .map(|d| humantime::format_duration(d).to_string()),
            plan: &plan,
            removals: removals.as_deref(),
        });
    } else {
        print_human(&args, &plan, removals.as_deref());
    }

    if let Some(r) = &removals {
        let failed: Vec<String> = r
            .iter()
            .filter_map(|x| {
                x.error
                    .as_ref()
                    .map(|e| format!("{}@{} {} {}: {e}", args.image, x.version, x.region, x.ami))
            })
            .collect();
        if !failed.is_empty() {
            return Err(LifecycleError::PartialPrune {
                failed: failed.len(),
                total: r.len(),
                details: failed.join("; "),
            }
            .into());
        }
    }
    Ok(())
}

fn print_human(args: &Args, plan: &Plan, removals: Option<&[Removal]>) {
    let image = &args.image;
    match removals {
        None => {
            for d in &plan.delete {
                let amis: Vec<String> = d
                    .amis
                    .iter()
                    .map(|(r, t)| format!("{r}={} ({} snapshot(s))", t.ami, t.snapshots.len()))
                    .collect();
                println!(
                    "{} {image}@{} {}",
                    if args.execute {
                        "delete"
                    } else {
                        "would delete"
                    },
                    d.version,
                    amis.join(" ")
                );
            }
        }
        Some(removals) => {
            for r in removals {
                match &r.error {
                    None => println!(
                        "deleted {image}@{} {} {} snapshots {}",
                        r.version,
                        r.region,
                        r.ami,
                        if r.snapshots_deleted.is_empty() {
                            "-".to_string()
                        } else {
                            r.snapshots_deleted.join(",")
                        }
                    ),
                    Some(e) => println!("FAILED {image}@{} {} {}: {e}", r.version, r.region, r.ami),
                }
            }
        }
    }
    for k in &plan.keep {
        let reasons: Vec<String> = k.reasons.iter().map(|r| r.to_string()).collect();
        println!("keep {image}@{}: {}", k.version, reasons.join("; "));
    }
    let amis: usize = plan.delete.iter().map(|d| d.amis.len()).sum();
    let summary = format!(
        "{} version(s) ({amis} AMI(s)) {}, {} kept",
        plan.delete.len(),
        if args.execute {
            "removed"
        } else {
            "would be removed"
        },
        plan.keep.len()
    );
    if args.execute || plan.delete.is_empty() {
        println!("{summary}");
    } else {
        println!("{summary}; run again with --execute to remove them");
    }
}
