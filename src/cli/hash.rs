//! `kiln hash`: the content hash of an image recipe.

use serde::Serialize;

use super::Ctx;
use crate::recipe::{is_ami_id, Prepared};
use crate::{Error, Result};

/// Print the content hash of an image: the identity its AMI is tagged with.
///
/// The hash covers the recipe format version, the resolved base AMI id, every
/// rendered file (path, mode and bytes), every artifact's sha256 and install
/// path, and the Java pin. Same inputs give the same hash on any machine.
/// Resolving an `owner` + `name` or `ssm_parameter` base image calls AWS; pass
/// --base-ami to hash offline.
///
/// Examples:
///   kiln hash web
///   kiln hash web --base-ami ami-0123456789abcdef0 -v
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Image name: a folder under images/ with an image.toml
    pub image: String,
    /// Use this base AMI id instead of resolving the recipe's [base] (no AWS call)
    #[arg(long, value_name = "AMI")]
    pub base_ami: Option<String>,
    /// Set a recipe variable, overriding its default (repeatable)
    #[arg(long = "var", value_name = "NAME=VALUE", value_parser = super::parse_var)]
    pub vars: Vec<(String, String)>,
}

#[derive(Serialize)]
struct Output<'a> {
    image: &'a str,
    hash: String,
    base_ami: &'a str,
    manifest: &'a [String],
}

pub async fn run(ctx: &mut Ctx, args: Args) -> Result<()> {
    if let Some(ami) = &args.base_ami {
        if !is_ami_id(ami) {
            return Err(Error::Usage(format!(
                "--base-ami {ami:?} is not an AMI id (ami- followed by 8 or 17 hex digits)"
            )));
        }
    }
    let root = ctx.config()?.root.clone();
    let prepared = Prepared::load(&root, &args.image, &args.vars)?;
    let base_ami = match args.base_ami {
        Some(ami) => ami,
        // A fixed base AMI needs no AWS connection at all (offline hashing).
        None => match &prepared.recipe.file.base.ami {
            Some(ami) => ami.clone(),
            None => {
                let aws = ctx.aws().await?;
                super::resolve_base(&ctx.ui, &aws, &prepared.recipe.file.base).await?
            }
        },
    };
    let manifest = prepared.manifest(&base_ami);
    let hash = manifest.hash();
    if ctx.ui.json() {
        ctx.ui.print_json(&Output {
            image: &args.image,
            hash,
            base_ami: &base_ami,
            manifest: &manifest.lines,
        });
    } else {
        if ctx.global.verbose > 0 {
            for line in &manifest.lines {
                println!("{line}");
            }
        }
        println!("{hash}");
    }
    Ok(())
}
