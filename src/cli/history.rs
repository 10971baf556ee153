//! `kiln history`: which images an ASG ran and how each rollout ended.

use serde::Serialize;

use super::Ctx;
use crate::aws::journal::SsmJournal;
use crate::rollout::engine::JournalStore;
use crate::rollout::model::{HistoryEntry, Phase};
use crate::Result;

/// Show the rollouts of an ASG, oldest first: from and to image (and launch
/// template version), when, and how each ended. The last 20 are kept, in SSM
/// under /kiln/rollout/<asg>/journal. A rollout still running is listed last.
///
/// Examples:
///   kiln history web-prod
///   kiln history web-prod --output json
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Auto-scaling group name
    pub asg: String,
}

#[derive(Serialize)]
struct Output<'a> {
    asg: &'a str,
    rollouts: &'a [HistoryEntry],
    in_progress: Option<InProgress<'a>>,
}

#[derive(Serialize)]
struct InProgress<'a> {
    rollout_id: &'a str,
    from_image: &'a str,
    to_image: &'a str,
    phase: Phase,
    started: crate::rollout::model::Timestamp,
}

pub async fn run(ctx: &mut Ctx, args: Args) -> Result<()> {
    ctx.single_region()?;
    let aws = ctx.aws().await?;
    let stored = SsmJournal::new(&aws).load(&args.asg).await?;
    let j = stored.as_ref().map(|s| &s.journal);
    let rollouts = j.map(|j| j.history.as_slice()).unwrap_or_default();
    let in_progress = j.filter(|j| !j.phase.is_terminal()).map(|j| InProgress {
        rollout_id: &j.rollout_id,
        from_image: &j.source.image_id,
        to_image: &j.target.image_id,
        phase: j.phase,
        started: j.started_at,
    });
    if ctx.ui.json() {
        ctx.ui.print_json(&Output {
            asg: &args.asg,
            rollouts,
            in_progress,
        });
        return Ok(());
    }
    if rollouts.is_empty() && in_progress.is_none() {
        println!("{}: no rollouts recorded", args.asg);
        return Ok(());
    }
    let ids = rollouts
        .iter()
        .flat_map(|h| [h.from_image.as_str(), h.to_image.as_str()])
        .chain(in_progress.iter().flat_map(|p| [p.from_image, p.to_image]));
    let labels = super::rollout::image_labels(&aws, ids).await;
    let l = |id: &str| super::rollout::label(&labels, id).to_string();
    let v = |v: Option<u64>| {
        v.map(|v| format!(" [launch template v{v}]"))
            .unwrap_or_default()
    };
    for h in rollouts {
        println!(
            "{} .. {}  {}  {}{} -> {}{}  {:?}{}",
            h.started,
            h.ended,
            h.rollout_id,
            l(&h.from_image),
            v(h.from_launch_template_version),
            l(&h.to_image),
            v(h.to_launch_template_version),
            h.outcome,
            h.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
    }
    if let Some(p) = in_progress {
        println!(
            "{}  {}  {} -> {}  in progress ({:?})",
            p.started,
            p.rollout_id,
            l(p.from_image),
            l(p.to_image),
            p.phase
        );
    }
    Ok(())
}
