//! `kiln promote`: point a channel at a version, in every region.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Ctx;
use crate::registry::{self, channel, ImageRef, ImageVersion};
use crate::{Error, Result};

/// Point a channel at one version of an image, in every region, so that
/// `kiln rollout <asg> web@prod` (and `kiln images web@prod`) resolve to it.
///
/// The channel is the SSM parameter /kiln/channels/<image>/<channel> (data
/// type aws:ec2:image) in each region, holding that region's AMI of the
/// version; every promotion is a new parameter version, listed by
/// `kiln channels <image>`. The version must exist in every region: nothing is
/// written unless it does. Channel names start with a letter and are not
/// latest or previous.
///
/// Regions: every --region given, else the default region plus kiln.toml's
/// `[bake] copy_regions`; the ref is resolved in the first.
///
/// Examples:
///   kiln promote web@7 --channel prod
///   kiln promote web@latest --channel canary
///   kiln promote web@canary --channel prod
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The version to promote: web@7, web@latest, web@sha256:…, web@<channel>, ami-…
    pub reference: String,
    /// The channel to point at it
    #[arg(long, value_name = "NAME")]
    pub channel: String,
}

#[derive(Serialize)]
struct Promoted {
    image: String,
    version: u64,
    hash: String,
    channel: String,
    /// region → what was written there
    regions: BTreeMap<String, Written>,
}

#[derive(Serialize)]
struct Written {
    ami: String,
    parameter: String,
    parameter_version: i64,
}

pub async fn run(ctx: &mut Ctx, args: Args) -> Result<()> {
    let r = registry::parse_ref(&args.reference)?;
    registry::refs::valid_channel_name(&args.channel).map_err(Error::Usage)?;
    let aws = ctx.aws().await?;
    let regions = ctx.regions(&aws)?;
    let home = aws.in_region(&regions[0]);
    let v: ImageVersion = match &r {
        ImageRef::Ami(_) | ImageRef::Channel { .. } => {
            let found = registry::resolve_ref(&home, &args.reference).await?;
            // The other regions' AMIs of that version.
            let all = registry::list_versions(&aws, Some(&found.image), &regions).await?;
            all.into_iter()
                .find(|x| x.version == found.version)
                .unwrap_or(found)
        }
        _ => {
            let all = registry::list_versions(&aws, r.image(), &regions).await?;
            registry::select(&all, &r, home.region())?.clone()
        }
    };
    let missing: Vec<&String> = regions.iter().filter(|r| v.ami_in(r).is_none()).collect();
    if !missing.is_empty() {
        return Err(Error::Usage(format!(
            "{}@{} has no AMI in {}; copy it there first (`kiln bake {} --region {} --region …`), \
             or promote in the other regions only with --region",
            v.image,
            v.version,
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            v.image,
            regions[0],
        )));
    }
    let description = format!(
        "kiln: {}@{} (sha256:{}) promoted from {}",
        v.image,
        v.version,
        &v.hash[..v.hash.len().min(12)],
        args.reference
    );
    let results = futures::future::join_all(regions.iter().map(|region| {
        let aws = aws.in_region(region);
        let ami = v.ami_in(region).expect("checked above").id.clone();
        let (image, channel, description) = (&v.image, &args.channel, &description);
        async move {
            let r = channel::promote(&aws, image, channel, &ami, description).await;
            (region.clone(), ami, r)
        }
    }))
    .await;
    let mut out = Promoted {
        image: v.image.clone(),
        version: v.version,
        hash: v.hash.clone(),
        channel: args.channel.clone(),
        regions: BTreeMap::new(),
    };
    let mut failures = Vec::new();
    for (region, ami, r) in results {
        match r {
            Ok(pv) => {
                out.regions.insert(
                    region,
                    Written {
                        ami,
                        parameter: channel::parameter_name(&v.image, &args.channel),
                        parameter_version: pv,
                    },
                );
            }
            Err(e) => failures.push(e),
        }
    }
    if ctx.ui.json() {
        ctx.ui.print_json(&out);
    } else {
        for (region, w) in &out.regions {
            println!(
                "promoted {}@{} to {} in {region}: {} (parameter version {})",
                v.image, v.version, args.channel, w.ami, w.parameter_version
            );
        }
    }
    match failures.into_iter().next() {
        // Every region was attempted and the successes are printed above.
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}
