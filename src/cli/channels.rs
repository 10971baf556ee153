//! `kiln channels`: an image's channels and their promotion history.

use serde::Serialize;

use super::Ctx;
use crate::registry::{self, channel, ImageRef};
use crate::{Error, Result};

/// List the channels of an image in every region: the version each points at
/// now, and every earlier promotion (from the SSM parameter's history).
///
/// Regions: every --region given, else the default region plus kiln.toml's
/// `[bake] copy_regions`.
///
/// Examples:
///   kiln channels web
///   kiln channels web --output json
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The image name
    pub image: String,
}

#[derive(Serialize)]
struct Listing {
    image: String,
    regions: Vec<String>,
    channels: Vec<channel::Channel>,
}

pub async fn run(ctx: &mut Ctx, args: Args) -> Result<()> {
    match registry::parse_ref(&args.image)? {
        ImageRef::Latest { .. } if !args.image.contains('@') => {}
        _ => {
            return Err(Error::Usage(format!(
                "channels takes an image name (web), not a ref ({})",
                args.image
            )))
        }
    }
    let aws = ctx.aws().await?;
    let regions = ctx.regions(&aws)?;
    let (aws_ref, image) = (&aws, args.image.as_str());
    let (versions, lists) = futures::join!(
        registry::list_versions(&aws, Some(image), &regions),
        futures::future::join_all(
            regions
                .iter()
                .map(|r| async move { channel::list(&aws_ref.in_region(r), image).await })
        )
    );
    let versions = versions?;
    let mut channels = Vec::new();
    for l in lists {
        channels.extend(l?);
    }
    for c in &mut channels {
        for p in &mut c.history {
            p.version = versions
                .iter()
                .find(|v| v.ami_in(&c.region).is_some_and(|a| a.id == p.ami))
                .map(|v| v.version);
        }
    }
    channels.sort_by(|a, b| (&a.channel, &a.region).cmp(&(&b.channel, &b.region)));
    if ctx.ui.json() {
        ctx.ui.print_json(&Listing {
            image: args.image,
            regions,
            channels,
        });
        return Ok(());
    }
    if channels.is_empty() {
        println!(
            "{} has no channels in {}; create one with `kiln promote {}@<version> --channel <name>`",
            args.image,
            regions.join(", "),
            args.image
        );
        return Ok(());
    }
    let fmt_v = |v: Option<u64>| match v {
        Some(v) => format!("{}@{v}", args.image),
        None => "(AMI no longer exists)".to_string(),
    };
    println!(
        "{:<16} {:<16} {:<18} {:<24} SINCE",
        "CHANNEL", "REGION", "VERSION", "AMI"
    );
    for c in &channels {
        let Some(now) = c.history.first() else {
            continue;
        };
        println!(
            "{:<16} {:<16} {:<18} {:<24} {}",
            c.channel,
            c.region,
            fmt_v(now.version),
            now.ami,
            now.at
        );
        for p in c.history.iter().skip(1) {
            println!(
                "{:<16} {:<16} {:<18} {:<24} {}",
                "",
                "  before:",
                fmt_v(p.version),
                p.ami,
                p.at
            );
        }
    }
    Ok(())
}
