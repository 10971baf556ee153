//! `kiln gc`: remove what a killed bake left behind.

use super::Ctx;
use crate::bake::gc;
use crate::Result;

/// Remove expired temporary resources a killed or crashed bake left behind:
/// builder and boot-test instances and temporary security groups, found by
/// their kiln:role tag, removed once their kiln:expires time (set from
/// `[bake] ttl`, default 3h) has passed; and, in the default region, package
/// lists in `[bake] bucket` that no version records (a killed run's, or one
/// whose version a later bake of the same content completed), a ttl after
/// they were written. Images are never removed: an unfinished one is found by
/// hash and completed by the next bake.
///
/// Regions: every --region given, else the default region plus kiln.toml's
/// `[bake] copy_regions`.
///
/// Examples:
///   kiln gc --dry-run
///   kiln gc --region us-east-1 --region eu-west-1
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// List what would be removed; remove nothing
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn run(ctx: &mut Ctx, args: Args) -> Result<()> {
    let aws = ctx.aws().await?;
    let regions = ctx.regions(&aws)?;
    let bake = ctx.config()?.file.bake.clone();
    let mut reports = Vec::new();
    for r in &regions {
        // Package lists are looked for where the version claims are: the
        // home region, with the bake bucket.
        let lists = bake
            .bucket
            .as_deref()
            .filter(|_| r == aws.region())
            .map(|b| (b, bake.ttl()));
        let step = ctx
            .ui
            .step(format!("looking for expired kiln temporaries in {r}"));
        let report = match gc::gc(&aws.in_region(r), args.dry_run, lists).await {
            Ok(rep) => rep,
            Err(e) => {
                step.fail("");
                return Err(e.into());
            }
        };
        step.done(format!(
            "{} found, {} {}",
            report.found.len(),
            report.removed.len(),
            if args.dry_run { "expired" } else { "removed" }
        ));
        reports.push(report);
    }
    if ctx.ui.json() {
        ctx.ui.print_json(&reports);
        return Ok(());
    }
    for rep in &reports {
        for t in &rep.removed {
            println!(
                "{} {} {} {} (run {}, expired {})",
                if args.dry_run {
                    "would remove"
                } else {
                    "removed"
                },
                rep.region,
                t.kind,
                t.id,
                t.run_id,
                t.expires
            );
        }
    }
    Ok(())
}
