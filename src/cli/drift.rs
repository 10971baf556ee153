//! `kiln drift`: instances and launch templates out of line with kiln's images.

use serde::Serialize;

use super::Ctx;
use crate::lifecycle::drift::{self, GroupReport, Known};
use crate::lifecycle::LifecycleError;
use crate::Result;

/// Find drift: instances of an auto-scaling group whose AMI differs from the
/// image of the group's launch template (or of a mixed-instances override),
/// and launch templates whose image kiln does not know (deregistered, or not
/// baked by kiln). kiln never patches a server, so either is a sign of a
/// change made outside kiln or of a rollout that did not finish.
///
/// Exits 0 when there is no drift and 1 when there is (so a scheduled check
/// can alert), 2 when a named group exists in none of the regions.
///
/// Regions: every --region given, else the default region plus kiln.toml's
/// `[bake] copy_regions`.
///
/// Examples:
///   kiln drift
///   kiln drift web-prod
///   kiln drift --output json
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// One auto-scaling group [default: every group in the regions]
    pub asg: Option<String>,
}

#[derive(Serialize)]
struct Report<'a> {
    regions: &'a [String],
    drift: bool,
    groups: &'a [GroupReport],
}

pub async fn run(ctx: &mut Ctx, args: Args) -> Result<()> {
    let aws = ctx.aws().await?;
    let regions = ctx.regions(&aws)?;
    let results = futures::future::join_all(regions.iter().map(|r| {
        let aws = aws.in_region(r);
        let asg = args.asg.clone();
        async move { drift::check(&aws, asg.as_deref()).await }
    }))
    .await;
    let mut groups = Vec::new();
    for r in results {
        groups.extend(r?);
    }
    if let (Some(name), true) = (&args.asg, groups.is_empty()) {
        return Err(LifecycleError::NotFound(format!(
            "no auto-scaling group {name} in {}",
            regions.join(", ")
        ))
        .into());
    }
    let drifted = groups.iter().filter(|g| g.has_drift()).count();
    if ctx.ui.json() {
        ctx.ui.print_json(&Report {
            regions: &regions,
            drift: drifted > 0,
            groups: &groups,
        });
    } else {
        for g in &groups {
            print_group(g);
        }
    }
    if drifted > 0 {
        return Err(LifecycleError::Drift(format!(
            "{drifted} of {} group(s) drifted",
            groups.len()
        ))
        .into());
    }
    if !ctx.ui.json() {
        println!("no drift in {} group(s)", groups.len());
    }
    Ok(())
}

fn known(k: &Known) -> String {
    match k {
        Known::Kiln(r) => r.clone(),
        Known::Foreign => "not a kiln image".into(),
        Known::Missing => "deregistered or missing".into(),
    }
}

fn print_group(g: &GroupReport) {
    let images: Vec<String> = g
        .images
        .iter()
        .map(|(a, k)| format!("{a} ({})", known(k)))
        .collect();
    println!(
        "{} {} {}: {} instance(s), image {}",
        if g.has_drift() { "DRIFT" } else { "ok   " },
        g.region,
        g.asg,
        g.instances,
        if images.is_empty() {
            "-".to_string()
        } else {
            images.join(", ")
        }
    );
    for d in &g.drifted {
        println!(
            "  instance {} runs {} ({}), not the launch template's {}",
            d.instance,
            d.ami,
            known(&d.image),
            d.expected.join(" or ")
        );
    }
    for u in &g.unknown_images {
        println!(
            "  launch template {} {} names {}: {}",
            u.template,
            u.version,
            u.ami,
            known(&u.image)
        );
    }
}
