//! `kiln abort`: stop a rollout and roll back to where it started.

use super::rollout::{finish, holder, interruptible, Bar, LockArgs};
use super::Ctx;
use crate::aws::fleet::AwsFleet;
use crate::aws::journal::SsmJournal;
use crate::rollout::engine::{self, JournalStore};
use crate::rollout::RolloutError;
use crate::Result;

/// Stop the rollout in progress on an ASG and roll it back to the image it
/// started from, restoring capacity and suspended processes. Works after the
/// rolling kiln was killed; a lock held by a running kiln elsewhere needs
/// --take-over (that kiln then stops at its next journal save).
///
/// Examples:
///   kiln abort web-prod
///   kiln abort web-prod --take-over
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Auto-scaling group name
    pub asg: String,
    #[command(flatten)]
    pub lock: LockArgs,
}

pub async fn run(ctx: &mut Ctx, args: Args) -> Result<()> {
    ctx.single_region()?;
    let aws = ctx.aws().await?;
    let fleet = AwsFleet::new(&aws);
    let store = SsmJournal::new(&aws);
    let me = holder();
    let Some(stored) = store
        .load(&args.asg)
        .await?
        .filter(|s| !s.journal.phase.is_terminal())
    else {
        // A kiln killed before its journal says anything (or after it finished)
        // can still hold the lock: release it, so the next rollout is not refused.
        if let Some(gone) =
            engine::release_stale_lock(&store, &args.asg, &me, args.lock.may_take_over()).await?
        {
            ctx.ui.note(format!(
                "released the rollout lock of {} held by {gone}, which no longer runs",
                args.asg
            ));
        }
        return Err(RolloutError::NothingInProgress { asg: args.asg }.into());
    };
    let engine_config = args.lock.engine(&ctx.rollout_config())?;
    let mut progress = Bar::new(ctx, &stored.journal);
    let how = format!("run `kiln abort {}` again to finish rolling back", args.asg);
    let result = interruptible(
        engine::abort(
            &fleet,
            &store,
            &args.asg,
            &me,
            args.lock.may_take_over(),
            &engine_config,
            &mut progress,
        ),
        &store,
        &args.asg,
        &me,
        &how,
    )
    .await;
    progress.clear();
    super::rollout::note_how_to_continue(ctx, &args.asg, &how, &result);
    finish(ctx, &aws, result?, true).await
}
