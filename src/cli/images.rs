//! `kiln images`: list baked versions and resolve refs.

use serde::Serialize;

use super::Ctx;
use crate::registry::{self, parse_ref, ImageRef, ImageVersion};
use crate::Result;

/// List baked versions of an image (or of every image), or resolve one ref.
///
/// A ref names one version: web@7, web@latest (newest ready), web@previous
/// (the ready one before it), web@sha256:<4+ hex digits of the content hash>,
/// web@prod (a channel set by `kiln promote`), or an AMI id. Regions: every --region given, else the default region plus
/// kiln.toml's `[bake] copy_regions`; latest and previous are judged in the first.
///
/// Examples:
///   kiln images
///   kiln images web
///   kiln images web@latest
///   kiln images web@sha256:3f2a --output json
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// An image name to list its versions, or a ref to resolve one version
    pub image: Option<String>,
}

#[derive(Serialize)]
struct Listing<'a> {
    regions: &'a [String],
    versions: &'a [ImageVersion],
}

pub async fn run(ctx: &mut Ctx, args: Args) -> Result<()> {
    // A malformed ref is bad input before any call.
    let reference = match &args.image {
        Some(s) if s.contains('@') || s.starts_with("ami-") => Some(parse_ref(s)?),
        Some(s) => {
            parse_ref(s)?;
            None
        }
        None => None,
    };
    let aws = ctx.aws().await?;
    let regions = ctx.regions(&aws)?;
    let home = aws.in_region(&regions[0]);
    if let Some(r) = reference {
        let v = match &r {
            ImageRef::Ami(_) | ImageRef::Channel { .. } => {
                registry::resolve_ref(&home, &r.to_string()).await?
            }
            _ => {
                let all = registry::list_versions(&aws, r.image(), &regions).await?;
                registry::select(&all, &r, home.region())?.clone()
            }
        };
        if ctx.ui.json() {
            ctx.ui.print_json(&v);
        } else {
            print_table(std::slice::from_ref(&v), &regions);
        }
        return Ok(());
    }
    let versions = registry::list_versions(&aws, args.image.as_deref(), &regions).await?;
    if ctx.ui.json() {
        ctx.ui.print_json(&Listing {
            regions: &regions,
            versions: &versions,
        });
    } else if versions.is_empty() {
        println!(
            "no baked versions{} in {}",
            args.image.map(|i| format!(" of {i}")).unwrap_or_default(),
            regions.join(", ")
        );
    } else {
        print_table(&versions, &regions);
    }
    Ok(())
}

fn print_table(versions: &[ImageVersion], regions: &[String]) {
    let mut header = format!(
        "{:<12} {:>7}  {:<14} {:<20} {:<22} ",
        "IMAGE", "VERSION", "HASH", "CREATED", "BASE AMI"
    );
    for r in regions {
        header.push_str(&format!("{:<30} ", r.to_uppercase()));
    }
    println!("{}", header.trim_end());
    for v in versions {
        let mut line = format!(
            "{:<12} {:>7}  {:<14} {:<20} {:<22} ",
            v.image,
            v.version,
            &v.hash[..v.hash.len().min(12)],
            v.created.get(..19).unwrap_or(&v.created),
            v.base_ami
        );
        for r in regions {
            let cell = match v.ami_in(r) {
                Some(a) if a.ready && a.is_available() => a.id.clone(),
                Some(a) if a.is_available() => format!("{} (untested)", a.id),
                Some(a) => format!("{} ({})", a.id, a.state),
                None => "-".into(),
            };
            line.push_str(&format!("{cell:<30} "));
        }
        println!("{}", line.trim_end());
    }
}
