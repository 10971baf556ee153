//! `kiln rollout`: replace an ASG's instances with ones on another image, batch by
//! batch. Also the pieces `rollback`, `abort` and `status` share: tuning flags, the
//! lock holder's identity, the take-over rule and the progress display.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, SystemTime};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::Ctx;
use crate::aws::fleet::AwsFleet;
use crate::aws::journal::SsmJournal;
use crate::aws::Aws;
use crate::config::RolloutConfig;
use crate::rollout::engine::{self, EngineConfig, Event, Fleet, JournalStore, Progress, Report};
use crate::rollout::model::{Amount, Holder, Journal, LaunchSource, Phase, RolloutSpec, Timestamp};
use crate::rollout::plan::{plan_schedule, Plan, PlanAssumptions, Step};
use crate::rollout::{Outcome, RolloutError};
use crate::{Error, Result};

/// Roll an auto-scaling group onto an image by replacing its instances.
///
/// kiln creates a version of the group's launch template with only the image
/// changed, points the group at it, then batch by batch: raises desired capacity
/// by the surge, waits until the new instances are running, InService, Healthy,
/// `healthy` in every target group and past warm-up, deregisters old instances,
/// waits for draining, and terminates them (decrementing desired). Never fewer
/// healthy in-service instances than --min-healthy of the original desired.
/// AZRebalance, AlarmNotification and ScheduledActions are suspended meanwhile;
/// the original min/max/desired and suspended processes are restored at the end.
///
/// A new instance that turns unhealthy, or no progress before --deadline, rolls
/// back to the previous image automatically (exit code 3) unless --no-rollback.
///
/// The journal and lock live in SSM under /kiln/rollout/<asg>/: if kiln is killed
/// or interrupted, run the same command again to resume, or `kiln abort <asg>` to
/// roll back.
///
/// Examples:
///   kiln rollout web-prod web@latest
///   kiln rollout web-prod web@7 --max-surge 2 --min-healthy 90%
///   kiln rollout web-prod web@latest --plan
///   kiln rollout web-prod web@latest --take-over
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Auto-scaling group name
    pub asg: String,
    /// Image to roll onto: web@7, web@latest, web@previous, web@sha256:<prefix> or ami-…
    pub image: String,
    /// Print the launch template change, the batches per AZ, the capacity at each
    /// step and the estimated API calls; change nothing
    #[arg(long)]
    pub plan: bool,
    #[command(flatten)]
    pub tuning: Tuning,
}

/// Flags shared by `rollout` and `rollback`.
#[derive(Debug, Clone, clap::Args)]
pub struct Tuning {
    /// Instances launched above desired per batch: a count (2) or a percentage of
    /// the original desired (25%) [default: kiln.toml [rollout], else 25%]
    #[arg(long, value_name = "N|PCT", value_parser = parse_amount)]
    pub max_surge: Option<Amount>,
    /// Floor of healthy in-service instances: a count or a percentage of the
    /// original desired [default: kiln.toml [rollout], else 100%]
    #[arg(long, value_name = "N|PCT", value_parser = parse_amount)]
    pub min_healthy: Option<Amount>,
    /// How long new instances must be healthy before old ones go [default: 60s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub warmup: Option<Duration>,
    /// Longest time without progress before the rollout is declared stuck [default: 15m]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub deadline: Option<Duration>,
    /// On failure stop and restore capacity and processes, leaving instances on
    /// whichever image they run, instead of rolling back
    #[arg(long)]
    pub no_rollback: bool,
    #[command(flatten)]
    pub lock: LockArgs,
}

/// Lock and loop flags shared by every command that drives a rollout.
#[derive(Debug, Clone, clap::Args)]
pub struct LockArgs {
    /// Take the rollout lock from its holder: with no value whoever holds it, or
    /// only the holder named `HOST:PID`. Without it, a lock held by a process of
    /// this host that no longer runs is taken over; any other is refused
    #[arg(long, value_name = "HOST:PID", num_args = 0..=1, default_missing_value = "")]
    pub take_over: Option<String>,
    /// Time between observations of the group while waiting: each observation
    /// costs a few read calls [default: kiln.toml [rollout] poll, else 5s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub poll: Option<Duration>,
}

pub fn parse_amount(s: &str) -> std::result::Result<Amount, String> {
    s.parse()
}

pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (write e.g. 90s, 15m)"))
}

fn config_amount(v: &Option<String>, key: &str) -> Result<Option<Amount>> {
    v.as_deref()
        .map(|s| {
            s.parse()
                .map_err(|e| Error::Usage(format!("kiln.toml [rollout] {key}: {e}")))
        })
        .transpose()
}

/// Between observations while waiting: a few read calls each, so a 1000-instance
/// group costs a handful of calls every five seconds.
const DEFAULT_POLL: Duration = Duration::from_secs(5);

fn config_duration(v: &Option<String>, key: &str) -> Result<Option<Duration>> {
    v.as_deref()
        .map(|s| {
            parse_duration(s).map_err(|e| Error::Usage(format!("kiln.toml [rollout] {key}: {e}")))
        })
        .transpose()
}

impl Tuning {
    /// The spec toward `image`: flags, then kiln.toml `[rollout]`, then defaults.
    pub fn spec(&self, image: &str, cfg: &RolloutConfig) -> Result<RolloutSpec> {
        let mut spec = RolloutSpec::new(image);
        if let Some(a) = self
            .max_surge
            .or(config_amount(&cfg.max_surge, "max_surge")?)
        {
            spec.max_surge = a;
        }
        if let Some(a) = self
            .min_healthy
            .or(config_amount(&cfg.min_healthy, "min_healthy")?)
        {
            spec.min_healthy = a;
        }
        if let Some(d) = self.warmup.or(config_duration(&cfg.warmup, "warmup")?) {
            spec.warmup = d;
        }
        if let Some(d) = self
            .deadline
            .or(config_duration(&cfg.deadline, "deadline")?)
        {
            spec.deadline = d;
        }
        if matches!(spec.max_surge, Amount::Count(0) | Amount::Percent(0)) {
            return Err(Error::Usage(
                "--max-surge must be at least 1 instance: kiln launches before it terminates"
                    .into(),
            ));
        }
        if spec.deadline.is_zero() {
            return Err(Error::Usage("--deadline must be longer than 0s".into()));
        }
        spec.rollback_on_failure = !self.no_rollback;
        Ok(spec)
    }
}

/// Who this process is, for the lock.
pub fn holder() -> Holder {
    let who = ["USER", "USERNAME", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown".into());
    Holder {
        who,
        host: hostname(),
        pid: std::process::id(),
        started: Timestamp::from_system_time(SystemTime::now()),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

/// Whether a process of this host is still running (a zombie is not). Where
/// `/proc` does not exist every process counts as running: never take over blind.
fn process_running(pid: u32) -> bool {
    if !std::path::Path::new("/proc/self").exists() {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        // `pid (comm) S ...`: the state follows the last `)`.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
    }
}

impl LockArgs {
    /// The rule for taking a lock someone else holds.
    pub fn may_take_over(&self) -> impl Fn(&Holder) -> bool + '_ {
        let me = hostname();
        move |h: &Holder| match self.take_over.as_deref() {
            Some("") => true,
            Some(named) => named == format!("{}:{}", h.host, h.pid) || named == h.to_string(),
            None => h.host == me && h.pid != std::process::id() && !process_running(h.pid),
        }
    }

    pub fn engine(&self, cfg: &RolloutConfig) -> Result<EngineConfig> {
        let poll = match self.poll {
            Some(p) => p,
            None => config_duration(&cfg.poll, "poll")?.unwrap_or(DEFAULT_POLL),
        };
        if poll.is_zero() {
            return Err(Error::Usage(
                "--poll must be more than 0s: it is the pause between observations".into(),
            ));
        }
        Ok(EngineConfig {
            poll_interval: poll,
            max_cycles: None,
        })
    }
}

/// The AMI id a ref names in `aws`'s region.
pub async fn resolve_image(aws: &Aws, reference: &str) -> Result<String> {
    let v = crate::registry::resolve_ref(aws, reference).await?;
    match v.ami_in(aws.region()) {
        Some(a) => Ok(a.id.clone()),
        None => Err(Error::Usage(format!(
            "{reference} ({}@{}) has no AMI in {}; bake or copy it there first",
            v.image,
            v.version,
            aws.region()
        ))),
    }
}

/// Read-only checks before anything is locked or changed: the group exists, is on
/// a launch template, and the spec fits it.
pub async fn preflight(
    fleet: &AwsFleet,
    asg: &str,
    spec: &RolloutSpec,
) -> Result<crate::rollout::Observation> {
    let obs = fleet.observe(asg).await?;
    if let LaunchSource::Configuration { name } = &obs.group.launch {
        return Err(RolloutError::LaunchConfiguration {
            asg: asg.to_string(),
            launch_configuration: name.clone(),
        }
        .into());
    }
    Journal::begin("check", holder(), spec.clone(), &obs, None)?;
    Ok(obs)
}

pub async fn run(ctx: &mut Ctx, args: Args) -> Result<()> {
    ctx.single_region()?;
    let cfg = ctx.config()?.file.rollout.clone();
    // Placeholder target until the ref resolves: flag errors come before AWS.
    let spec = args.tuning.spec("", &cfg)?;
    let aws = ctx.aws().await?;
    let image = resolve_image(&aws, &args.image).await?;
    let spec = RolloutSpec {
        target_image: image,
        ..spec
    };
    if args.plan {
        let fleet = AwsFleet::new(&aws);
        let obs = preflight(&fleet, &args.asg, &spec).await?;
        let plan = plan_schedule(&obs, &spec, &PlanAssumptions::default())?;
        print_plan(ctx, &plan, &args.image);
        return Ok(());
    }
    drive_to(ctx, &aws, &args.asg, spec, &args.tuning.lock).await
}

/// Lock, start or resume, and drive a rollout of `asg` toward `spec.target_image`.
pub async fn drive_to(
    ctx: &Ctx,
    aws: &Aws,
    asg: &str,
    spec: RolloutSpec,
    lock: &LockArgs,
) -> Result<()> {
    let fleet = AwsFleet::new(aws);
    let store = SsmJournal::new(aws);
    let resuming = store
        .load(asg)
        .await?
        .is_some_and(|s| !s.journal.phase.is_terminal());
    if !resuming {
        preflight(&fleet, asg, &spec).await?;
    }
    let me = holder();
    let req = engine::StartRequest {
        asg: asg.to_string(),
        spec,
        holder: me.clone(),
        rollout_id: format!("r{}-{}", me.started.0, me.pid),
    };
    let stored = engine::start(&fleet, &store, req, lock.may_take_over()).await?;
    if resuming {
        ctx.ui.note(format!(
            "resuming the rollout of {asg} to {} ({:?}, batch {})",
            stored.journal.target.image_id, stored.journal.phase, stored.journal.batch.number
        ));
    }
    // Under the lock, before the first batch: see `AwsFleet::pin_version`.
    if let Some((selector, v)) = fleet.pin_version(asg).await? {
        ctx.ui.note(format!(
            "{asg} launched from launch template version {selector}: pinned it to version {v}, which that resolves to now"
        ));
    }
    let engine_config = lock.engine(&ctx.rollout_config())?;
    let mut progress = Bar::new(ctx, &stored.journal);
    let how = format!(
        "run the same `kiln rollout {asg} …` (or `kiln rollback {asg}`) again to resume, or `kiln abort {asg}` to roll back"
    );
    let result = interruptible(
        engine::drive(&fleet, &store, stored, &engine_config, &mut progress),
        &store,
        asg,
        &me,
        &how,
    )
    .await;
    progress.clear();
    note_how_to_continue(ctx, asg, &how, &result);
    finish(ctx, aws, result?, false).await
}

/// After an error that stopped the engine before the rollout's end, say how to
/// continue: the journal is kept, and the operator's next step is a re-run or an
/// abort. Not after Ctrl-C (its error says so itself) nor when another kiln took
/// the lock over (that kiln continues).
pub fn note_how_to_continue(ctx: &Ctx, asg: &str, how: &str, result: &Result<Report>) {
    let Err(e) = result else {
        return;
    };
    let stopped = match e {
        Error::Interrupted(_) | Error::Rollout(RolloutError::LockLost { .. }) => false,
        e => e.exit_code() == crate::error::exit::FAILED,
    };
    if stopped {
        ctx.ui.note(format!(
            "the rollout of {asg} stopped before its end; its journal is kept in SSM under {}/: {how}",
            crate::aws::journal::prefix(asg)
        ));
    }
}

/// Run the engine until it ends or Ctrl-C. On Ctrl-C stop acting (the engine's
/// future is dropped between two awaits: every step is idempotent and recorded
/// write-ahead, so nothing is half-remembered), release the lock so any operator
/// can continue, and leave the journal as it is.
pub async fn interruptible<S: JournalStore>(
    work: impl std::future::Future<Output = crate::rollout::Result<Report>>,
    store: &S,
    asg: &str,
    me: &Holder,
    how: &str,
) -> Result<Report> {
    tokio::select! {
        r = work => Ok(r?),
        _ = tokio::signal::ctrl_c() => {
            let _ = store.release(asg, me).await;
            Err(Error::Interrupted(format!(
                "stopped acting on ASG {asg}; the rollout journal is kept in SSM under {}/: {how}",
                crate::aws::journal::prefix(asg)
            )))
        }
    }
}

/// Print the report and turn the outcome into the exit code.
/// Human names for AMIs: `web@2 (ami-…)` for kiln's images, the id alone for
/// others. One DescribeImages call; on any error the ids stand alone (display only).
pub async fn image_labels<'a>(
    aws: &Aws,
    ids: impl IntoIterator<Item = &'a str>,
) -> BTreeMap<String, String> {
    let ids: Vec<String> = ids
        .into_iter()
        .filter(|id| id.starts_with("ami-"))
        .map(str::to_string)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut labels: BTreeMap<String, String> =
        ids.iter().map(|id| (id.clone(), id.clone())).collect();
    if ids.is_empty() {
        return labels;
    }
    if let Ok(amis) = crate::registry::list_amis(aws, crate::registry::Lookup::Ids(&ids)).await {
        for a in amis {
            if let Some(v) = a.version {
                labels.insert(a.id.clone(), format!("{}@{v} ({})", a.image, a.id));
            }
        }
    }
    labels
}

/// The label of `id` in `labels`, or the id itself.
pub fn label<'a>(labels: &'a BTreeMap<String, String>, id: &'a str) -> &'a str {
    labels.get(id).map(String::as_str).unwrap_or(id)
}

pub async fn finish(ctx: &Ctx, aws: &Aws, report: Report, aborting: bool) -> Result<()> {
    if ctx.ui.json() {
        ctx.ui.print_json(&report);
    } else {
        let outcome = match report.outcome {
            Outcome::Succeeded => "succeeded",
            Outcome::RolledBack => "rolled back",
            Outcome::Failed => "FAILED",
            Outcome::Aborted => "aborted and rolled back",
        };
        let labels = image_labels(
            aws,
            [report.source_image.as_str(), report.target_image.as_str()],
        )
        .await;
        println!(
            "{} {} -> {}: {outcome} ({} batches, {} observations)",
            report.asg,
            label(&labels, &report.source_image),
            label(&labels, &report.target_image),
            report.batches,
            report.observations
        );
        println!(
            "capacity min {} max {} desired {}",
            report.capacity.min, report.capacity.max, report.capacity.desired
        );
        if let Some(c) = &report.external_change {
            println!(
                "desired capacity was changed by someone else during the rollout ({} -> {} at {}); kept {}",
                c.from, c.to, c.at, c.to
            );
        }
        if let Some(r) = &report.reason {
            println!("reason: {r}");
        }
    }
    match report.outcome {
        Outcome::Succeeded => Ok(()),
        Outcome::Aborted if aborting => Ok(()),
        outcome => Err(Error::RolloutEnded {
            asg: report.asg,
            target: report.target_image,
            outcome,
            reason: report.reason.unwrap_or_default(),
        }),
    }
}

fn print_plan(ctx: &Ctx, plan: &Plan, reference: &str) {
    if ctx.ui.json() {
        ctx.ui.print_json(plan);
        return;
    }
    let lt = &plan.launch_template;
    println!("plan for ASG {} -> {reference} (nothing changed)", plan.asg);
    match lt.to_version {
        Some(v) => println!(
            "launch template {}: stays at version {v} ({}); instances are replaced anyway",
            lt.template_id, lt.to_image
        ),
        None => println!(
            "launch template {}: new version from version {} with ImageId {} -> {}",
            lt.template_id, lt.from_version, lt.from_image, lt.to_image
        ),
    }
    let suspend: Vec<&str> = plan.suspend.iter().map(String::as_str).collect();
    println!(
        "suspend {}; surge {}; floor {} healthy; capacity min {} max {} desired {}",
        if suspend.is_empty() {
            "nothing".into()
        } else {
            suspend.join(", ")
        },
        plan.surge,
        plan.floor,
        plan.original.min,
        plan.original.max,
        plan.original.desired
    );
    for b in &plan.batches {
        let launch: Vec<String> = b
            .launch
            .iter()
            .map(|(az, n)| format!("{az} +{n}"))
            .collect();
        let terminate: Vec<String> = b
            .terminate
            .iter()
            .map(|(az, ids)| format!("{az} -{} ({})", ids.len(), ids.join(", ")))
            .collect();
        println!(
            "batch {}: desired {} (max {}) launching {}; then terminate {}; desired after {}",
            b.number,
            b.desired_during,
            b.max_during,
            launch.join(", "),
            terminate.join(", "),
            b.desired_after
        );
    }
    println!(
        "restore min {} max {} desired {}; resume what kiln suspended",
        plan.original.min, plan.original.max, plan.original.desired
    );
    println!(
        "estimated: {} API calls ({} per observation), {}",
        plan.api_calls,
        plan.observation_calls_per_cycle,
        humantime::format_duration(plan.estimated_duration)
    );
}

/// One progress bar for the rollout (instances replaced of the original desired)
/// and a line per batch; plain lines when stderr is not a terminal; nothing with
/// `--output json`.
pub struct Bar {
    bar: ProgressBar,
    quiet: bool,
    interactive: bool,
    phase: Phase,
}

impl Bar {
    pub fn new(ctx: &Ctx, j: &Journal) -> Bar {
        let quiet = ctx.ui.json();
        let interactive = !quiet && std::io::stderr().is_terminal();
        let bar = ProgressBar::with_draw_target(
            Some(u64::from(j.original.desired.max(1))),
            if interactive {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} replaced {msg} [{elapsed}]",
            )
            .expect("static progress template")
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("{} {:?}", j.asg, j.phase));
        if interactive {
            bar.enable_steady_tick(Duration::from_millis(200));
        }
        Bar {
            bar,
            quiet,
            interactive,
            phase: j.phase,
        }
    }

    fn line(&self, msg: String) {
        if self.quiet {
            return;
        }
        if self.interactive {
            self.bar.println(msg);
        } else {
            eprintln!("{msg}");
        }
    }

    pub fn clear(&self) {
        self.bar.finish_and_clear();
    }
}

impl Progress for Bar {
    fn event(&mut self, j: &Journal, e: Event<'_>) {
        if j.phase != self.phase {
            self.phase = j.phase;
            self.bar.set_prefix(format!("{} {:?}", j.asg, j.phase));
            self.bar.set_position(0);
        }
        match e {
            // `Event::Finished` says it once.
            Event::Step(Step::Record(_) | Step::Finish { .. }) => {}
            Event::Step(s @ (Step::StartRollback { .. } | Step::Stop { .. })) => {
                self.line(format!("{}: {s}", j.asg))
            }
            Event::Step(s) => {
                if !self.interactive {
                    self.line(format!("{}: {s}", j.asg));
                }
                self.bar.set_message(s.to_string());
            }
            Event::Waiting(w) => {
                if !self.interactive {
                    self.line(format!("{}: waiting: {w}", j.asg));
                }
                self.bar.set_message(format!("waiting: {w}"));
            }
            Event::Batch(b) => {
                self.bar.inc(u64::from(b.terminated));
                self.line(format!(
                    "{}: batch {}{}: launched {}, healthy {}, drained {}, terminated {}",
                    j.asg,
                    b.number,
                    if b.phase == Phase::Rolling {
                        ""
                    } else {
                        " (rolling back)"
                    },
                    b.launched,
                    b.healthy,
                    b.drained,
                    b.terminated
                ));
            }
            Event::Finished(o) => self.line(format!("{}: finished: {o:?}", j.asg)),
        }
    }
}
