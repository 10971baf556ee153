//! `kiln bake`: turn a recipe into a private AMI, or find the one it already is.

use super::Ctx;
use crate::bake::{self, Outcome, Request, Settings};
use crate::recipe::Prepared;
use crate::ui::fmt_duration;
use crate::Result;

/// Bake an image: render and hash the recipe, then find the AMI with that content
/// hash in every region, or build, boot-test and copy a new numbered version.
///
/// Regions: every --region given (the first is where the image is built, the
/// others get copies), else the default region plus kiln.toml's
/// `[bake] copy_regions`. An image that already exists is printed with no
/// change made anywhere; one missing only in some regions is copied only there.
///
/// The builder runs in `[bake] subnet` with `[bake] instance_profile`, IMDSv2
/// required and a security group with no inbound rules; it is provisioned
/// through SSM Run Command, never SSH. It, the boot-test instance and any
/// temporary security group are removed on success, error and Ctrl-C; `kiln gc`
/// removes what a killed kiln left.
///
/// Examples:
///   kiln bake web
///   kiln bake web --region us-east-1 --region eu-west-1
///   kiln bake worker --dry-run
///   kiln bake web --output json
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Image name: a folder under images/ with an image.toml
    pub image: String,
    /// Show what would be reused, built or copied, after the read-only checks; change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Mark the new image ready without booting an instance from it and running
    /// the recipe's smoke commands (a broken image is then found only at rollout)
    #[arg(long)]
    pub skip_boot_test: bool,
    /// Set a recipe variable, overriding its default (repeatable)
    #[arg(long = "var", value_name = "NAME=VALUE", value_parser = super::parse_var)]
    pub vars: Vec<(String, String)>,
}

pub async fn run(ctx: &mut Ctx, args: Args) -> Result<()> {
    let config = ctx.config()?.clone();
    // Offline first: a recipe error never reaches AWS.
    let prepared = Prepared::load(&config.root, &args.image, &args.vars)?;
    let aws = ctx.aws().await?;
    let regions = ctx.regions(&aws)?;
    let home = aws.in_region(&regions[0]);

    let base_checked = prepared.recipe.file.base.owner.is_some();
    let base_ami = super::resolve_base(&ctx.ui, &home, &prepared.recipe.file.base).await?;
    let hash = prepared.manifest(&base_ami).hash();
    let settings = Settings::from_config(&config.path, &config.file.bake);
    let req = Request {
        prepared: &prepared,
        base_ami,
        base_ami_checked: base_checked,
        hash,
        regions,
        dry_run: args.dry_run,
        skip_boot_test: args.skip_boot_test,
    };
    let outcome = bake::run(&home, &settings, &req, &ctx.ui).await?;
    print(ctx, &outcome);
    Ok(())
}

fn print(ctx: &Ctx, o: &Outcome) {
    if ctx.ui.json() {
        ctx.ui.print_json(o);
        return;
    }
    if o.action == "dry-run" {
        println!("{} sha256:{} (dry run: nothing changed)", o.image, o.hash);
        for line in &o.plan {
            println!("  would {line}");
        }
        return;
    }
    let version = o.version.map(|v| format!(" v{v}")).unwrap_or_default();
    let total: f64 = o.timings.iter().map(|t| t.seconds).sum();
    println!(
        "{}{version} sha256:{} ({}, boot test {}, {})",
        o.image,
        o.hash,
        o.action,
        o.boot_test,
        fmt_duration(std::time::Duration::from_secs_f64(total))
    );
    for (region, ami) in &o.regions {
        println!("  {region:<16} {ami}");
    }
    if let Some(p) = &o.packages {
        println!("  package list: {}", p.location());
    }
}
