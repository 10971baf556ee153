//! `kiln rollback`: roll an ASG back onto an earlier image.

use super::rollout::{drive_to, resolve_image, Tuning};
use super::Ctx;
use crate::aws::journal::SsmJournal;
use crate::rollout::engine;
use crate::Result;

/// Roll an ASG back onto the image it ran before its last successful rollout (or
/// onto --to). The same engine as `kiln rollout`: new instances on the old image
/// replace the current ones, batch by batch, never below the capacity floor.
///
/// The previous image comes from the rollout history kept in SSM under
/// /kiln/rollout/<asg>/journal (the last 20 rollouts).
///
/// Examples:
///   kiln rollback web-prod
///   kiln rollback web-prod --to web@5
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Auto-scaling group name
    pub asg: String,
    /// Image to return to (web@5, web@previous, ami-…) [default: the image before the last rollout]
    #[arg(long, value_name = "IMAGE_REF")]
    pub to: Option<String>,
    #[command(flatten)]
    pub tuning: Tuning,
}

pub async fn run(ctx: &mut Ctx, args: Args) -> Result<()> {
    ctx.single_region()?;
    let cfg = ctx.config()?.file.rollout.clone();
    let spec = args.tuning.spec("", &cfg)?;
    let aws = ctx.aws().await?;
    let image = match &args.to {
        Some(r) => resolve_image(&aws, r).await?,
        None => engine::previous_image(&SsmJournal::new(&aws), &args.asg).await?,
    };
    ctx.ui.note(format!("rolling {} back to {image}", args.asg));
    let spec = crate::rollout::RolloutSpec {
        target_image: image,
        ..spec
    };
    drive_to(ctx, &aws, &args.asg, spec, &args.tuning.lock).await
}
