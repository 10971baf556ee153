//! `kiln status`: an ASG's image, the rollout in progress and its lock.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Ctx;
use crate::aws::fleet::AwsFleet;
use crate::aws::journal::SsmJournal;
use crate::rollout::engine::{Fleet, JournalStore};
use crate::rollout::model::{Holder, LaunchSource, Phase, Timestamp};
use crate::rollout::plan::{decide, Step};
use crate::{Error, Result};

/// Show an ASG's current image and launch template version, the rollout in
/// progress (phase, batch, old/new instances per AZ, what it waits on) and who
/// holds its rollout lock.
///
/// Like `kubectl rollout status`, the exit code says whether all is well: 0 when
/// no rollout runs, one is progressing, or the last one succeeded or was rolled
/// back; 1 while a rollout is rolling back or stopping after a failure, when it
/// made no progress for longer than its deadline (stuck, or its kiln was killed),
/// or when the last one ended failed (instances may run either image).
///
/// Examples:
///   kiln status web-prod
///   kiln status web-prod --output json
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Auto-scaling group name
    pub asg: String,
}

#[derive(Serialize)]
struct Output {
    asg: String,
    image_id: Option<String>,
    launch_template: Option<String>,
    launch_template_version: Option<u64>,
    capacity: Capacity,
    /// AZ → image → live instances.
    instances: BTreeMap<String, BTreeMap<String, u32>>,
    rollout: Option<Rollout>,
    lock_holder: Option<Holder>,
    /// `ok`, `progressing`, `failing`, `stuck` or `failed`.
    health: &'static str,
}

#[derive(Serialize)]
struct Capacity {
    min: u32,
    max: u32,
    desired: u32,
}

#[derive(Serialize)]
struct Rollout {
    rollout_id: String,
    phase: Phase,
    source_image: String,
    target_image: String,
    goal_image: String,
    batch: u32,
    /// AZ → (instances on the goal image, on any other).
    per_az: BTreeMap<String, (u32, u32)>,
    next: String,
    last_progress: Timestamp,
    reason: Option<String>,
}

pub async fn run(ctx: &mut Ctx, args: Args) -> Result<()> {
    ctx.single_region()?;
    let aws = ctx.aws().await?;
    let fleet = AwsFleet::new(&aws);
    let store = SsmJournal::new(&aws);
    let obs = fleet.observe(&args.asg).await?;
    let stored = store.load(&args.asg).await?;
    let lock_holder = store.holder(&args.asg).await?;

    let (image_id, lt, ltv) = match &obs.group.launch {
        LaunchSource::Template {
            id,
            version,
            image_id,
            ..
        } => (Some(image_id.clone()), Some(id.clone()), Some(*version)),
        LaunchSource::Configuration { name } => {
            (None, Some(format!("launch configuration {name}")), None)
        }
    };
    let mut instances: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
    for i in obs.instances.iter().filter(|i| i.is_live()) {
        *instances
            .entry(i.az.clone())
            .or_default()
            .entry(i.image_id.clone())
            .or_default() += 1;
    }

    let mut health = "ok";
    let rollout = stored.map(|s| s.journal).and_then(|j| {
        if j.phase == Phase::Failed {
            health = "failed";
        }
        if j.phase.is_terminal() {
            return None;
        }
        let goal = j.goal().image_id.clone();
        let mut per_az: BTreeMap<String, (u32, u32)> = BTreeMap::new();
        for i in obs.instances.iter().filter(|i| i.is_live()) {
            let e = per_az.entry(i.az.clone()).or_default();
            if i.image_id == goal {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
        let next = match decide(&obs, &j, &j.spec) {
            Step::Wait(w) => format!("waiting: {w}"),
            s => format!("next: {s}"),
        };
        let stuck = obs.now.since(j.last_progress_at) > j.spec.deadline;
        health = match j.phase {
            Phase::RollingBack | Phase::Stopping => "failing",
            _ if stuck => "stuck",
            _ => "progressing",
        };
        Some(Rollout {
            rollout_id: j.rollout_id.clone(),
            phase: j.phase,
            source_image: j.source.image_id.clone(),
            target_image: j.target.image_id.clone(),
            goal_image: goal,
            batch: j.batch.number,
            per_az,
            next,
            last_progress: j.last_progress_at,
            reason: j.reason.clone(),
        })
    });
    let out = Output {
        asg: args.asg.clone(),
        image_id,
        launch_template: lt,
        launch_template_version: ltv,
        capacity: Capacity {
            min: obs.group.min,
            max: obs.group.max,
            desired: obs.group.desired,
        },
        instances,
        rollout,
        lock_holder,
        health,
    };
    if ctx.ui.json() {
        ctx.ui.print_json(&out);
    } else {
        let ids = out
            .image_id
            .iter()
            .chain(out.instances.values().flat_map(|m| m.keys()));
        let labels = super::rollout::image_labels(&aws, ids.map(String::as_str)).await;
        print_human(&out, &labels);
    }
    match health {
        "ok" | "progressing" => Ok(()),
        why => Err(Error::Unhealthy {
            asg: args.asg,
            why: match why {
                "failing" => "the rollout failed and is rolling back or stopping".into(),
                "stuck" => "the rollout made no progress within its deadline (stuck, or its kiln was stopped: run it again or `kiln abort`)".into(),
                _ => "the last rollout failed; instances may run either image".into(),
            },
        }),
    }
}

fn print_human(o: &Output, labels: &std::collections::BTreeMap<String, String>) {
    use super::rollout::label;
    println!("asg {}", o.asg);
    println!(
        "image {} (launch template {} version {})",
        o.image_id
            .as_deref()
            .map(|i| label(labels, i))
            .unwrap_or("-"),
        o.launch_template.as_deref().unwrap_or("-"),
        o.launch_template_version
            .map(|v| v.to_string())
            .unwrap_or_else(|| "-".into())
    );
    println!(
        "capacity min {} max {} desired {}",
        o.capacity.min, o.capacity.max, o.capacity.desired
    );
    for (az, images) in &o.instances {
        let list: Vec<String> = images
            .iter()
            .map(|(i, n)| format!("{n} on {}", label(labels, i)))
            .collect();
        println!("  {az}: {}", list.join(", "));
    }
    match &o.rollout {
        None => println!("rollout none in progress"),
        Some(r) => {
            println!(
                "rollout {} {:?} batch {}: {} -> {} (goal {})",
                r.rollout_id, r.phase, r.batch, r.source_image, r.target_image, r.goal_image
            );
            for (az, (new, old)) in &r.per_az {
                println!("  {az}: {new} on goal, {old} other");
            }
            println!("  {}", r.next);
            println!("  last progress {}", r.last_progress);
            if let Some(reason) = &r.reason {
                println!("  reason: {reason}");
            }
        }
    }
    match &o.lock_holder {
        Some(h) => println!("lock {h}"),
        None => println!("lock free"),
    }
    println!("health {}", o.health);
}
