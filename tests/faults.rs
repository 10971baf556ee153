//! Reliability trials (issue 5): bakes and rollouts through the fault proxy and
//! under SIGKILL, with the end state checked after every run, and a capacity floor
//! monitor sampling the group during every rollout.
//!
//! Every random choice (proxy faults, kill points, recovery) comes from
//! `KILN_FAULTS_SEED` (default 1), so a run reproduces. The full trials are
//! `#[ignore]`d and run by `bench/faults.sh --seed N`, which prints the table;
//! the suite runs a smoke version of each kind (one or two runs).
//!
//! Each trial prints one `TRIAL|…` line (kind, runs, faults, same end state,
//! lost, leaked, floor violations, lowest healthy count seen, wall time) before it
//! asserts, so the table is complete even when a trial fails.
//!
//! - **lost**: the run did not reach the end state a fault-free run reaches (exit
//!   code, image, tags, instances, capacity, processes, lock).
//! - **leaked**: something was left behind (builder or boot-test instance,
//!   temporary security group, duplicate AMI, an instance outside the group).
//! - **floor**: the monitor saw fewer healthy in-service instances than the floor.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bake;
use crate::rollout::{self, Group, DESIRED, MAX, MIN, PRE_SUSPENDED};
use crate::support::cli::{kiln_command, Project, Run};
use crate::support::moto;
use crate::support::proxy::{Proxy, SplitMix64};

/// Seed of the whole run (`bench/faults.sh --seed N` sets it).
fn seed() -> u64 {
    std::env::var("KILN_FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// Trials in parallel: moto is one process on a 2-core machine.
fn jobs() -> usize {
    std::env::var("KILN_FAULTS_JOBS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4)
}

/// A seed for run `run` of trial `trial`, independent of the order runs finish in.
fn run_seed(trial: &str, run: usize) -> u64 {
    let mut h = seed() ^ 0x6b69_6c6e_6661_756c;
    for b in trial.bytes() {
        h = SplitMix64::new(h ^ u64::from(b)).next_u64();
    }
    SplitMix64::new(h ^ run as u64).next_u64()
}

/// The API faults of the issue, one proxy setting each.
#[derive(Clone, Copy, Debug)]
enum ApiFault {
    Throttle,
    ServerError,
    Reset,
    Latency,
    LostResponse,
}

impl ApiFault {
    fn label(self) -> &'static str {
        match self {
            ApiFault::Throttle => "throttling 20%",
            ApiFault::ServerError => "HTTP 500 10%",
            ApiFault::Reset => "connection reset 5%",
            ApiFault::Latency => "latency 200±150 ms",
            ApiFault::LostResponse => "lost response 5%",
        }
    }

    fn apply(self, proxy: &Proxy) {
        match self {
            ApiFault::Throttle => proxy.set_throttle_rate(0.2),
            ApiFault::ServerError => proxy.set_server_error_rate(0.1),
            ApiFault::Reset => proxy.set_reset_rate(0.05),
            ApiFault::Latency => {
                proxy.set_latency(Duration::from_millis(200), Duration::from_millis(150))
            }
            ApiFault::LostResponse => proxy.set_lose_response_rate(0.05),
        }
    }

    /// Faults this run saw: faulted calls, or every delayed call for latency.
    fn injected(self, proxy: &Proxy) -> usize {
        match self {
            ApiFault::Latency => proxy.total_calls(),
            _ => proxy.faulted_any(),
        }
    }
}

/// What one run ended with.
#[derive(Debug, Default)]
struct Outcome {
    /// Which run of its trial (its seed follows from it).
    run: usize,
    faults: usize,
    lost: Vec<String>,
    leaked: Vec<String>,
    /// (lowest healthy in-service count seen, floor), rollouts only.
    floor: Option<(u32, u32)>,
}

impl Outcome {
    fn floor_violated(&self) -> bool {
        self.floor.is_some_and(|(min, floor)| min < floor)
    }
}

/// `KILN_FAULTS_ONLY=3,34` replays only those runs of a trial (with the same
/// seeds), to look into one.
fn selected(run: usize) -> bool {
    std::env::var("KILN_FAULTS_ONLY")
        .ok()
        .filter(|s| !s.is_empty())
        .is_none_or(|only| only.split(',').any(|r| r.trim() == run.to_string()))
}

/// Runs `n` runs on `jobs()` workers; `init` runs once per worker thread (e.g. a
/// moto of its own). A panicking run counts as lost, with its message.
fn run_trial<W>(
    n: usize,
    init: impl Fn() -> W + Sync,
    run: impl Fn(&W, usize) -> Outcome + Sync,
) -> Vec<Outcome> {
    let next = AtomicUsize::new(0);
    let results = Mutex::new(BTreeMap::new());
    std::thread::scope(|s| {
        for _ in 0..jobs().min(n) {
            s.spawn(|| {
                let w = init();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n {
                        break;
                    }
                    if !selected(i) {
                        continue;
                    }
                    let out = std::panic::catch_unwind(AssertUnwindSafe(|| run(&w, i)))
                        .unwrap_or_else(|p| Outcome {
                            lost: vec![format!(
                                "run {i} panicked: {}",
                                p.downcast_ref::<String>()
                                    .cloned()
                                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                    .unwrap_or_default()
                            )],
                            ..Outcome::default()
                        });
                    results.lock().unwrap().insert(i, Outcome { run: i, ..out });
                }
            });
        }
    });
    results.into_inner().unwrap().into_values().collect()
}

/// Prints the trial's `TRIAL|` line, then fails on any lost, leaked or floor.
fn report(kind: &str, started: Instant, outcomes: &[Outcome]) {
    let runs = outcomes.len();
    let faults: usize = outcomes.iter().map(|o| o.faults).sum();
    let lost = outcomes.iter().filter(|o| !o.lost.is_empty()).count();
    let leaked = outcomes.iter().filter(|o| !o.leaked.is_empty()).count();
    let floor = outcomes.iter().filter(|o| o.floor_violated()).count();
    let same = outcomes
        .iter()
        .filter(|o| o.lost.is_empty() && o.leaked.is_empty() && !o.floor_violated())
        .count();
    let lowest = outcomes
        .iter()
        .filter_map(|o| o.floor)
        .min_by_key(|(min, floor)| i64::from(*min) - i64::from(*floor))
        .map(|(min, floor)| format!("{min} (floor {floor})"))
        .unwrap_or_else(|| "-".to_string());
    println!(
        "TRIAL|{kind}|{runs}|{faults}|{same}|{lost}|{leaked}|{floor}|{lowest}|{:.0}s|seed {}",
        started.elapsed().as_secs_f64(),
        seed()
    );
    let problems: Vec<String> = outcomes
        .iter()
        .map(|o| (o.run, o))
        .flat_map(|(i, o)| {
            let mut p: Vec<String> = o
                .lost
                .iter()
                .map(|l| format!("run {i} lost: {l}"))
                .chain(o.leaked.iter().map(|l| format!("run {i} leaked: {l}")))
                .collect();
            if let Some((min, floor)) = o.floor.filter(|_| o.floor_violated()) {
                p.push(format!("run {i}: {min} healthy in service, floor {floor}"));
            }
            p
        })
        .collect();
    assert!(problems.is_empty(), "{kind}:\n{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------
// Bakes
// ---------------------------------------------------------------------------

/// Tags every finished AMI carries.
const AMI_TAGS: [&str; 8] = [
    "kiln:image",
    "kiln:version",
    "kiln:hash",
    "kiln:base-ami",
    "kiln:java",
    "kiln:state",
    "Name",
    "Version",
];

/// Extra bake flags: `KILN_FAULTS_BAKE_FLAGS` (e.g. `--skip-boot-test`); by
/// default a full bake with its boot test.
fn bake_flags() -> Vec<String> {
    std::env::var("KILN_FAULTS_BAKE_FLAGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect()
}

fn bake_run(p: &Project, endpoint: &str, image: &str) -> Run {
    let flags = bake_flags();
    let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    bake::bake(p, endpoint, image, &extra)
}

/// The end state of a finished bake of `image`: exactly one ready AMI with every
/// tag, no builder or boot-test instance, no temporary group. Lost and leaked.
fn check_baked(image: &str, out: &mut Outcome) -> Option<String> {
    let found = bake::amis(moto::REGION, image);
    if found.len() > 1 {
        out.leaked
            .push(format!("{} AMIs for one bake: {found:?}", found.len()));
    }
    let ami = found.iter().next().map(|(id, (tags, _))| {
        let missing: Vec<&str> = AMI_TAGS
            .iter()
            .copied()
            .filter(|k| !tags.contains_key(*k))
            .collect();
        if !missing.is_empty() {
            out.lost.push(format!("{id} lacks tags {missing:?}"));
        }
        if tags.get("kiln:state").map(String::as_str) != Some("ready") {
            out.lost.push(format!("{id} is not ready: {tags:?}"));
        }
        id.clone()
    });
    if ami.is_none() {
        out.lost.push("no AMI".to_string());
    }
    let live = bake::live_instances(image);
    if !live.is_empty() {
        out.leaked.push(format!("instances left running: {live:?}"));
    }
    let groups = bake::groups(image);
    if !groups.is_empty() {
        out.leaked.push(format!("security groups left: {groups:?}"));
    }
    ami
}

fn api_fault_bakes(fault: ApiFault, runs: usize) {
    let started = Instant::now();
    let kind = format!("bake, {}", fault.label());
    let outcomes = run_trial(runs, bake::setup, |env, i| {
        let image = moto::unique("web");
        let p = bake::project(env, &image, "");
        let proxy = Proxy::start_seeded(moto::endpoint(), run_seed(&kind, i));
        fault.apply(&proxy);
        let run = bake_run(&p, &proxy.endpoint(), &image);
        let mut out = Outcome {
            faults: fault.injected(&proxy),
            ..Outcome::default()
        };
        if run.code != Some(0) {
            out.lost
                .push(format!("exit {:?}: {}", run.code, last_line(&run)));
        }
        let ami = check_baked(&image, &mut out);
        // The same inputs without faults find the same image and change nothing.
        let clean = Proxy::start(moto::endpoint());
        let again = bake_run(&p, &clean.endpoint(), &image);
        let same = again.code == Some(0)
            && bake::json(&again)["action"] == "reused"
            && ami.as_deref().is_some_and(|a| again.stdout.contains(a))
            && clean.mutating_calls() == 0;
        if !same {
            out.lost.push(format!(
                "a fault-free bake does not reuse {ami:?}: {}",
                last_line(&again)
            ));
        }
        out
    });
    report(&kind, started, &outcomes);
}

fn last_line(run: &Run) -> String {
    run.stderr
        .trim()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

/// Spawns `args` through `proxy` and SIGKILLs it once the proxy has answered
/// `after` calls. Whether it was killed before it finished.
fn kill_after(mut cmd: std::process::Command, proxy: &Proxy, after: usize) -> bool {
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn kiln");
    let end = Instant::now() + Duration::from_secs(300);
    let killed = loop {
        if proxy.total_calls() >= after {
            child.kill().expect("SIGKILL kiln");
            break true;
        }
        if child.try_wait().expect("wait").is_some() || Instant::now() > end {
            let _ = child.kill();
            break false;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    child.wait().expect("reap kiln");
    killed
}

/// A worker's own moto (so one run's `kiln gc` cannot remove another run's
/// builder) and its bake environment.
struct BakeWorker {
    _moto: bake::Dedicated,
    env: bake::Env,
    /// Calls a fault-free bake makes here: kill points are uniform below it.
    clean_calls: usize,
}

fn bake_worker() -> BakeWorker {
    let moto = bake::Dedicated::start();
    let env = bake::setup();
    let image = moto::unique("web");
    let p = bake::project(&env, &image, "ttl = \"1s\"\n");
    let proxy = Proxy::start(&bake::endpoint());
    let run = bake_run(&p, &proxy.endpoint(), &image);
    run.expect_ok();
    BakeWorker {
        _moto: moto,
        env,
        clean_calls: proxy.total_calls(),
    }
}

fn crash_bakes(runs: usize) {
    let started = Instant::now();
    let kind = "bake, SIGKILL + kiln gc";
    let outcomes = run_trial(runs, bake_worker, |w, i| {
        let mut rng = SplitMix64::new(run_seed(kind, i));
        let image = moto::unique("web");
        // Expire at once, so gc may remove what the killed run left.
        let p = bake::project(&w.env, &image, "ttl = \"1s\"\n");
        let proxy = Proxy::start_seeded(&bake::endpoint(), rng.next_u64());
        let after = 1 + (rng.next_u64() % w.clean_calls as u64) as usize;
        let mut cmd = kiln_command(&proxy.endpoint());
        cmd.arg("--config").arg(p.config()).args(["bake", &image]);
        cmd.args(bake_flags());
        let killed = kill_after(cmd, &proxy, after);
        let mut out = Outcome {
            faults: usize::from(killed),
            ..Outcome::default()
        };
        std::thread::sleep(Duration::from_millis(1100));
        let gc = p.kiln(&bake::endpoint(), &["gc"]);
        if gc.code != Some(0) {
            out.lost.push(format!("kiln gc: {}", last_line(&gc)));
        }
        let live = bake::live_instances(&image);
        if !live.is_empty() {
            out.leaked
                .push(format!("after gc (killed after {after} calls): {live:?}"));
        }
        let groups = bake::groups(&image);
        if !groups.is_empty() {
            out.leaked.push(format!(
                "groups after gc (killed after {after} calls): {groups:?}"
            ));
        }
        for (id, (tags, _)) in bake::amis(moto::REGION, &image) {
            if ["kiln:image", "kiln:version", "kiln:hash"]
                .iter()
                .any(|k| !tags.contains_key(*k))
            {
                out.lost
                    .push(format!("{id} without its tags after a kill: {tags:?}"));
            }
        }
        // The documented way on: bake again; it finds or finishes the image.
        let again = bake_run(&p, &bake::endpoint(), &image);
        if again.code != Some(0) {
            out.lost.push(format!(
                "the bake after a kill at call {after} failed: {}",
                last_line(&again)
            ));
        }
        check_baked(&image, &mut out);
        out
    });
    report(kind, started, &outcomes);
}

// ---------------------------------------------------------------------------
// Rollouts
// ---------------------------------------------------------------------------

/// Samples the group's healthy in-service count every 100 ms, straight from moto:
/// InService and Healthy in the ASG and `healthy` in its target group, the
/// engine's own definition.
struct FloorMonitor {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(u32, usize)>,
}

impl FloorMonitor {
    fn start(g: &Group) -> FloorMonitor {
        let stop = Arc::new(AtomicBool::new(false));
        let (asg, tg) = (g.asg.clone(), g.tg.clone());
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            rollout::rt().block_on(async move {
                let c = rollout::conf().await;
                let asc = aws_sdk_autoscaling::Client::new(&c);
                let elb = aws_sdk_elasticloadbalancingv2::Client::new(&c);
                let (mut min, mut samples) = (u32::MAX, 0);
                loop {
                    let last = flag.load(Ordering::SeqCst);
                    if let Some(n) = serving(&asc, &elb, &asg, &tg).await {
                        min = min.min(n);
                        samples += 1;
                    }
                    if last {
                        break (min, samples);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        });
        FloorMonitor { stop, handle }
    }

    /// The lowest count seen.
    fn stop(self) -> u32 {
        self.stop.store(true, Ordering::SeqCst);
        let (min, samples) = self.handle.join().expect("floor monitor");
        assert!(samples > 0, "the floor monitor saw nothing");
        min
    }
}

async fn serving(
    asc: &aws_sdk_autoscaling::Client,
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    asg: &str,
    tg: &str,
) -> Option<u32> {
    let groups = asc
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(asg)
        .send()
        .await
        .ok()?;
    let targets = elb
        .describe_target_health()
        .target_group_arn(tg)
        .send()
        .await
        .ok()?;
    let healthy: BTreeSet<&str> = targets
        .target_health_descriptions()
        .iter()
        .filter(|t| {
            t.target_health()
                .and_then(|h| h.state())
                .map(|s| s.as_str())
                == Some("healthy")
        })
        .filter_map(|t| t.target().and_then(|t| t.id()))
        .collect();
    let group = groups.auto_scaling_groups().first()?;
    Some(
        group
            .instances()
            .iter()
            .filter(|i| {
                i.lifecycle_state().map(|s| s.as_str()) == Some("InService")
                    && i.health_status() == Some("Healthy")
                    && i.instance_id().is_some_and(|id| healthy.contains(id))
            })
            .count() as u32,
    )
}

/// The floor of every trial rollout: the default --min-healthy, 100% of desired.
const FLOOR: u32 = DESIRED as u32;

fn lock_held(g: &Group) -> bool {
    rollout::rt().block_on(async {
        aws_sdk_ssm::Client::new(&rollout::conf().await)
            .get_parameter()
            .name(format!("/kiln/rollout/{}/lock", g.asg))
            .send()
            .await
            .is_ok()
    })
}

/// Instances on either image that are not live members of the group.
fn strays(g: &Group, members: &BTreeSet<String>) -> Vec<String> {
    rollout::rt().block_on(async {
        let ec2 = aws_sdk_ec2::Client::new(&rollout::conf().await);
        let out = ec2
            .describe_instances()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("image-id")
                    .values(&g.ami1)
                    .values(&g.ami2)
                    .build(),
            )
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("instance-state-name")
                    .values("pending")
                    .values("running")
                    .build(),
            )
            .send()
            .await
            .unwrap();
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(|i| i.instance_id())
            .filter(|id| !members.contains(*id))
            .map(String::from)
            .collect()
    })
}

/// The end state of a finished rollout: every instance on one image (`ami` when
/// given), capacity and processes as the operator left them, lock released,
/// nothing running outside the group. Returns the image they are all on.
fn check_rolled(g: &Group, ami: Option<&str>, out: &mut Outcome) -> Option<String> {
    let s = rollout::seen(g);
    let images: BTreeSet<&str> = s.instances.values().map(|(i, _)| i.as_str()).collect();
    if images.iter().any(|i| *i != g.ami1 && *i != g.ami2) {
        out.lost
            .push(format!("an instance on neither image: {s:?}"));
    }
    let on = match (images.len(), images.iter().next()) {
        (1, Some(i)) => Some(i.to_string()),
        _ => {
            out.lost.push(format!("not all on one image: {images:?}"));
            None
        }
    };
    if let (Some(want), Some(got)) = (ami, on.as_deref()) {
        if want != got {
            out.lost.push(format!("on {got}, expected {want}"));
        }
    }
    if s.instances.len() != DESIRED as usize {
        out.lost
            .push(format!("{} live instances", s.instances.len()));
    }
    if (s.min, s.max, s.desired) != (MIN, MAX, DESIRED) {
        out.lost.push(format!(
            "capacity min/max/desired {}/{}/{}",
            s.min, s.max, s.desired
        ));
    }
    let pre: BTreeSet<String> = PRE_SUSPENDED.iter().map(|p| p.to_string()).collect();
    if s.suspended != pre {
        out.lost
            .push(format!("suspended processes {:?}", s.suspended));
    }
    if lock_held(g) {
        out.lost.push("the lock is still held".to_string());
    }
    let members: BTreeSet<String> = s.instances.keys().cloned().collect();
    let strays = strays(g, &members);
    if !strays.is_empty() {
        out.leaked
            .push(format!("running outside the group: {strays:?}"));
    }
    on
}

fn api_fault_rollouts(fault: ApiFault, runs: usize) {
    let started = Instant::now();
    let kind = format!("rollout, {}", fault.label());
    let outcomes = run_trial(
        runs,
        || (),
        |_, i| {
            let g = rollout::setup();
            let project = Project::new();
            let v2 = format!("{}@2", g.image);
            let proxy = Proxy::start_seeded(moto::endpoint(), run_seed(&kind, i));
            fault.apply(&proxy);
            let monitor = FloorMonitor::start(&g);
            let run = project.kiln(&proxy.endpoint(), &rollout::rollout_args(&g, &v2, &[]));
            let min = monitor.stop();
            let mut out = Outcome {
                faults: fault.injected(&proxy),
                floor: Some((min, FLOOR)),
                ..Outcome::default()
            };
            if run.code != Some(0) {
                out.lost
                    .push(format!("exit {:?}: {}", run.code, last_line(&run)));
            }
            check_rolled(&g, Some(&g.ami2), &mut out);
            out
        },
    );
    report(&kind, started, &outcomes);
}

/// Calls a fault-free rollout of a fresh group makes: kill points are uniform below.
fn clean_rollout_calls() -> usize {
    let g = rollout::setup();
    let proxy = Proxy::start(moto::endpoint());
    let v2 = format!("{}@2", g.image);
    Project::new()
        .kiln(&proxy.endpoint(), &rollout::rollout_args(&g, &v2, &[]))
        .expect_ok();
    proxy.total_calls()
}

fn crash_rollouts(runs: usize) {
    let started = Instant::now();
    let kind = "rollout, SIGKILL + re-run or abort";
    let clean = clean_rollout_calls();
    let outcomes = run_trial(
        runs,
        || (),
        |_, i| {
            let mut rng = SplitMix64::new(run_seed(kind, i));
            let g = rollout::setup();
            let project = Project::new();
            let v2 = format!("{}@2", g.image);
            let args = rollout::rollout_args(&g, &v2, &[]);
            let proxy = Proxy::start_seeded(moto::endpoint(), rng.next_u64());
            let after = 1 + (rng.next_u64() % clean as u64) as usize;
            let abort = rng.next_u64() % 2 == 1;
            let monitor = FloorMonitor::start(&g);
            let mut cmd = kiln_command(&proxy.endpoint());
            cmd.arg("--config").arg(project.config()).args(&args);
            let killed = kill_after(cmd, &proxy, after);
            let mut out = Outcome {
                faults: usize::from(killed),
                ..Outcome::default()
            };
            // Killed: every instance on exactly one of the two images.
            let mid = rollout::seen(&g);
            if let Some((id, (img, _))) = mid
                .instances
                .iter()
                .find(|(_, (img, _))| *img != g.ami1 && *img != g.ami2)
            {
                out.lost.push(format!("{id} on {img} after the kill"));
            }
            let (recovery, expect) = if abort {
                (
                    project.kiln(&proxy.endpoint(), &["abort", &g.asg, "--poll", "50ms"]),
                    None,
                )
            } else {
                (
                    project.kiln(&proxy.endpoint(), &args),
                    Some(g.ami2.as_str()),
                )
            };
            // `abort` with nothing to abort (killed before the journal was
            // written, or after the rollout ended) is input: exit 2.
            let nothing =
                abort && recovery.code == Some(2) && recovery.stderr.contains("no rollout");
            if recovery.code != Some(0) && !nothing {
                out.lost.push(format!(
                    "{} after a kill at call {after}: exit {:?}: {}",
                    if abort { "abort" } else { "re-run" },
                    recovery.code,
                    last_line(&recovery)
                ));
            }
            let min = monitor.stop();
            out.floor = Some((min, FLOOR));
            let on = check_rolled(&g, expect, &mut out);
            if !out.lost.is_empty() || !out.leaked.is_empty() {
                out.lost.push(format!(
                    "(killed after {after} of {clean} calls: {killed}; recovery `kiln {}`: exit {:?}: {})",
                    if abort { "abort" } else { "rollout" },
                    recovery.code,
                    last_line(&recovery)
                ));
            }
            if abort && !nothing && on.as_deref() != Some(g.ami1.as_str()) {
                out.lost
                    .push(format!("abort after call {after} left the group on {on:?}"));
            }
            out
        },
    );
    report(kind, started, &outcomes);
}

// ---------------------------------------------------------------------------
// The trials: smoke versions in the suite, full ones behind --ignored
// ---------------------------------------------------------------------------

#[test]
fn smoke_throttling_one_bake_and_one_rollout() {
    api_fault_bakes(ApiFault::Throttle, 1);
    api_fault_rollouts(ApiFault::Throttle, 1);
}

#[test]
fn smoke_server_errors_one_bake_and_one_rollout() {
    api_fault_bakes(ApiFault::ServerError, 1);
    api_fault_rollouts(ApiFault::ServerError, 1);
}

#[test]
fn smoke_connection_resets_one_bake_and_one_rollout() {
    api_fault_bakes(ApiFault::Reset, 1);
    api_fault_rollouts(ApiFault::Reset, 1);
}

#[test]
fn smoke_latency_one_bake_and_one_rollout() {
    api_fault_bakes(ApiFault::Latency, 1);
    api_fault_rollouts(ApiFault::Latency, 1);
}

#[test]
fn smoke_lost_responses_one_bake_and_one_rollout() {
    api_fault_bakes(ApiFault::LostResponse, 1);
    api_fault_rollouts(ApiFault::LostResponse, 1);
}

#[test]
fn smoke_sigkill_two_bakes_and_two_rollouts() {
    crash_bakes(2);
    crash_rollouts(2);
}

#[test]
#[ignore]
fn trial_api_faults_bakes_throttle() {
    api_fault_bakes(ApiFault::Throttle, 20);
}

#[test]
#[ignore]
fn trial_api_faults_bakes_server_error() {
    api_fault_bakes(ApiFault::ServerError, 20);
}

#[test]
#[ignore]
fn trial_api_faults_bakes_reset() {
    api_fault_bakes(ApiFault::Reset, 20);
}

#[test]
#[ignore]
fn trial_api_faults_bakes_latency() {
    api_fault_bakes(ApiFault::Latency, 20);
}

#[test]
#[ignore]
fn trial_api_faults_rollouts_throttle() {
    api_fault_rollouts(ApiFault::Throttle, 20);
}

#[test]
#[ignore]
fn trial_api_faults_rollouts_server_error() {
    api_fault_rollouts(ApiFault::ServerError, 20);
}

#[test]
#[ignore]
fn trial_api_faults_rollouts_reset() {
    api_fault_rollouts(ApiFault::Reset, 20);
}

#[test]
#[ignore]
fn trial_api_faults_rollouts_latency() {
    api_fault_rollouts(ApiFault::Latency, 20);
}

#[test]
#[ignore]
fn trial_api_faults_bakes_lost_response() {
    api_fault_bakes(ApiFault::LostResponse, 20);
}

#[test]
#[ignore]
fn trial_api_faults_rollouts_lost_response() {
    api_fault_rollouts(ApiFault::LostResponse, 20);
}

#[test]
#[ignore]
fn trial_sigkill_bakes() {
    crash_bakes(50);
}

#[test]
#[ignore]
fn trial_sigkill_rollouts() {
    crash_rollouts(50);
}

// ---------------------------------------------------------------------------
// Bad input catalogue
// ---------------------------------------------------------------------------

/// One malformed or hostile input: what it is, the run, the exit code it must get
/// and what its one error line must name.
struct Verdict {
    name: String,
    run: Run,
    mutating: usize,
    code: i32,
    says: Vec<String>,
}

impl Verdict {
    /// Why this case fails, if it does.
    fn problem(&self) -> Option<String> {
        // kiln's own errors are one last line; clap's (flags it parses) start
        // with their `error:` line and add usage and a --help hint after it.
        let lines: Vec<&str> = self.run.stderr.trim().lines().collect();
        let last = lines
            .iter()
            .copied()
            .find(|l| l.starts_with("error: "))
            .or(lines.last().copied())
            .unwrap_or_default();
        let mut why = Vec::new();
        if self.run.code != Some(self.code) {
            why.push(format!("exit {:?}, expected {}", self.run.code, self.code));
        }
        if self.code != 0 && !last.starts_with("error: ") {
            why.push("the last line is not one `error:` line".to_string());
        }
        for s in &self.says {
            if !last.contains(s.as_str()) {
                why.push(format!("{s:?} not in the error"));
            }
        }
        if self.mutating != 0 {
            why.push(format!("{} mutating calls", self.mutating));
        }
        (!why.is_empty()).then(|| format!("{}: {}\n    {last}", self.name, why.join("; ")))
    }
}

/// Runs `args` in `project` through a fresh counting proxy.
fn judge(name: impl Into<String>, p: &Project, args: &[&str], code: i32, says: &[&str]) -> Verdict {
    let proxy = Proxy::start(moto::endpoint());
    let run = p.kiln(&proxy.endpoint(), args);
    Verdict {
        name: name.into(),
        run,
        mutating: proxy.mutating_calls(),
        code,
        says: says.iter().map(|s| s.to_string()).collect(),
    }
}

/// The recipe cases of `recipe::bad_inputs` (offline there, through `kiln hash`),
/// here as `kiln bake` against moto: refused before any AWS change.
fn recipe_catalogue(env: &bake::Env) -> Vec<Verdict> {
    crate::recipe::bad_inputs()
        .into_iter()
        .map(|case| {
            let p = crate::recipe::Project::new();
            std::fs::write(
                p.dir.path().join("kiln.toml"),
                format!(
                    "region = \"{}\"\n[bake]\nbucket = \"{}\"\ninstance_profile = \"{}\"\nsubnet = \"{}\"\n",
                    moto::REGION, env.bucket, env.profile, env.subnet
                ),
            )
            .unwrap();
            (case.breaks)(&p);
            let args: Vec<&str> = if case.args.contains(&"--base-ami") {
                case.args.to_vec()
            } else {
                case.args
                    .iter()
                    .map(|a| if *a == "hash" { "bake" } else { a })
                    .collect()
            };
            let proxy = Proxy::start(moto::endpoint());
            let mut cmd = kiln_command(&proxy.endpoint());
            cmd.args(&args).current_dir(p.dir.path());
            let run = Run::of(&mut cmd);
            Verdict {
                name: format!("recipe: {} (kiln {})", case.name, args.join(" ")),
                run,
                mutating: proxy.mutating_calls(),
                code: 2,
                says: case.says.iter().map(|s| s.to_string()).collect(),
            }
        })
        .collect()
}

fn bake_catalogue(env: &bake::Env) -> Vec<Verdict> {
    let image = moto::unique("web");
    let mut out = Vec::new();
    let edit = |what: &str, from: &str, to: &str, says: &[&str]| {
        let p = bake::project(env, &image, "");
        let t = std::fs::read_to_string(p.config()).unwrap();
        let line = t.lines().find(|l| l.starts_with(from)).unwrap().to_string();
        p.write("kiln.toml", &t.replace(&line, to));
        judge(format!("config: {what}"), &p, &["bake", &image], 2, says)
    };
    out.push(edit(
        "missing bucket",
        "bucket",
        "bucket = \"missing-bucket-kiln\"",
        &["S3 bucket missing-bucket-kiln"],
    ));
    out.push(edit(
        "missing subnet",
        "subnet",
        "subnet = \"subnet-0123456789abcdef0\"",
        &["subnet subnet-0123456789abcdef0 does not exist"],
    ));
    out.push(edit(
        "missing instance profile",
        "instance_profile",
        "instance_profile = \"missing-profile\"",
        &["instance profile missing-profile"],
    ));
    out.push(edit(
        "unknown [bake] key",
        "bucket",
        "bucket_name = \"x\"",
        &["kiln.toml", "bucket_name"],
    ));
    out.push(edit(
        "ttl that is not a duration",
        "bucket",
        &format!("bucket = \"{}\"\nttl = \"forever\"", env.bucket),
        &["kiln.toml", "ttl"],
    ));
    out.push(edit(
        "kiln.toml that is not TOML",
        "region",
        "region = us-east-1",
        &["kiln.toml"],
    ));
    let p = bake::project(env, &image, "");
    let proxy = Proxy::start(moto::endpoint());
    let mut cmd = kiln_command(&proxy.endpoint());
    cmd.args(["--config", "/nonexistent/kiln.toml", "bake", &image]);
    out.push(Verdict {
        name: "config: --config names no file".to_string(),
        run: Run::of(&mut cmd),
        mutating: proxy.mutating_calls(),
        code: 2,
        says: vec!["/nonexistent/kiln.toml".to_string()],
    });
    let recipe = format!("images/{image}/image.toml");
    let base = bake::project(env, &image, "");
    let t = std::fs::read_to_string(base.root().join(&recipe)).unwrap();
    base.write(
        &recipe,
        &t.replace(
            "owner = \"099720109477\"\n",
            "ami = \"ami-0123456789abcdef0\"\n",
        )
        .lines()
        .filter(|l| !l.starts_with("name = \"ubuntu/"))
        .collect::<Vec<_>>()
        .join("\n"),
    );
    out.push(judge(
        "recipe: base AMI that does not exist",
        &base,
        &["bake", &image],
        2,
        &["base AMI ami-0123456789abcdef0 does not exist"],
    ));
    let nomatch = bake::project(env, &image, "");
    nomatch.write(
        &recipe,
        &t.replace("ubuntu-trusty-14.04-amd64-server-*", "ubuntu-nonesuch-*"),
    );
    out.push(judge(
        "recipe: base name pattern matching nothing",
        &nomatch,
        &["bake", &image],
        2,
        &["ubuntu-nonesuch-*"],
    ));
    out.push(judge(
        "flag: --output yaml",
        &p,
        &["--output", "yaml", "bake", &image],
        2,
        &["yaml"],
    ));
    out.push(judge(
        "flag: unknown flag",
        &p,
        &["bake", &image, "--frobnicate"],
        2,
        &["--frobnicate"],
    ));
    out.push(judge(
        "image name escaping images/",
        &p,
        &["bake", "../../etc"],
        2,
        &["../../etc"],
    ));
    out.push(judge("empty image name", &p, &["bake", ""], 2, &["image"]));
    out.push(judge(
        "--var without =",
        &p,
        &["bake", &image, "--var", "heap"],
        2,
        &["heap"],
    ));
    out.push(judge(
        "ref: images of a malformed ref",
        &p,
        &["images", &format!("{image}@seven")],
        2,
        &["seven"],
    ));
    out
}

/// A fresh group changed by `f` (against moto directly) before the case runs.
fn group_with(f: impl FnOnce(&Group, &rollout_clients::Clients)) -> Group {
    let g = rollout::setup();
    let c = rollout_clients::Clients::new();
    f(&g, &c);
    g
}

mod rollout_clients {
    pub struct Clients {
        pub asc: aws_sdk_autoscaling::Client,
        pub ec2: aws_sdk_ec2::Client,
        pub elb: aws_sdk_elasticloadbalancingv2::Client,
    }
    impl Clients {
        pub fn new() -> Clients {
            crate::rollout::rt().block_on(async {
                let c = crate::rollout::conf().await;
                Clients {
                    asc: aws_sdk_autoscaling::Client::new(&c),
                    ec2: aws_sdk_ec2::Client::new(&c),
                    elb: aws_sdk_elasticloadbalancingv2::Client::new(&c),
                }
            })
        }
    }
}

fn first_instance(g: &Group) -> String {
    rollout::seen(g).instances.keys().next().unwrap().clone()
}

fn rollout_catalogue() -> Vec<Verdict> {
    let p = Project::new();
    let g = rollout::setup();
    let v2 = format!("{}@2", g.image);
    let mut out = Vec::new();
    let mut roll = |name: &str, reference: &str, extra: &[&str], says: &[&str]| {
        let args = rollout::rollout_args(&g, reference, extra);
        out.push(judge(name, &p, &args, 2, says));
    };
    roll(
        "ref: image that does not exist",
        "nosuchimage@9",
        &[],
        &["nosuchimage"],
    );
    roll(
        "ref: version that does not exist",
        &format!("{}@99", g.image),
        &[],
        &["99"],
    );
    roll(
        "ref: malformed version",
        &format!("{}@seven", g.image),
        &[],
        &["seven"],
    );
    roll(
        "ref: hash prefix that is not hex",
        &format!("{}@sha256:zz", g.image),
        &[],
        &["zz"],
    );
    roll(
        "ref: hash prefix matching nothing",
        &format!("{}@sha256:ffffffff", g.image),
        &[],
        &["ffffffff"],
    );
    roll(
        "ref: AMI that does not exist",
        "ami-0123456789abcdef0",
        &[],
        &["ami-0123456789abcdef0"],
    );
    roll("ref: empty version", &format!("{}@", g.image), &[], &[]);
    roll("ref: no image name", "@2", &[], &[]);
    roll("ref: shell metacharacters", "web;rm -rf /@1", &[], &[]);
    roll(
        "flag: --max-surge not a number",
        &v2,
        &["--max-surge", "lots"],
        &["lots"],
    );
    roll(
        "flag: --max-surge 0",
        &v2,
        &["--max-surge", "0"],
        &["surge"],
    );
    roll(
        "flag: --max-surge negative",
        &v2,
        &["--max-surge", "-1"],
        &["-1"],
    );
    roll(
        "flag: --min-healthy over 100%",
        &v2,
        &["--min-healthy", "150%"],
        &["150%"],
    );
    roll(
        "flag: --min-healthy above desired",
        &v2,
        &["--min-healthy", "7"],
        &["floor of 7", "desired capacity 6"],
    );

    roll(
        "flag: --deadline not a duration",
        &v2,
        &["--deadline", "soon"],
        &["soon"],
    );
    roll("flag: --output yaml", &v2, &["--output", "yaml"], &["yaml"]);
    roll(
        "flag: unknown flag",
        &v2,
        &["--frobnicate"],
        &["--frobnicate"],
    );
    out.push(judge(
        "flag: --warmup not a duration",
        &p,
        &["rollout", &g.asg, &v2, "--warmup", "banana"],
        2,
        &["banana"],
    ));
    out.push(judge(
        "flag: rollout without an image",
        &p,
        &["rollout", &g.asg],
        2,
        &[],
    ));
    let missing = moto::unique("no-such-asg");
    out.push(judge(
        "ASG: does not exist",
        &p,
        &["rollout", &missing, &v2],
        2,
        &["not found"],
    ));
    out.push(judge(
        "ASG: abort with no rollout",
        &p,
        &["abort", &g.asg],
        2,
        &["no rollout in progress"],
    ));
    out.push(judge(
        "ASG: rollback with no history",
        &p,
        &["rollback", &g.asg],
        2,
        &["--to"],
    ));
    out.push(judge(
        "ASG: rollback --to a missing version",
        &p,
        &["rollback", &g.asg, "--to", &format!("{}@42", g.image)],
        2,
        &["42"],
    ));
    out.push(judge(
        "ASG: status of a missing group",
        &p,
        &["status", &missing],
        2,
        &["not found"],
    ));

    let states: Vec<(&str, Group, &[&str])> = vec![
        (
            "ASG: an instance protected from scale-in",
            group_with(|g, c| {
                let id = first_instance(g);
                rollout::rt().block_on(async {
                    c.asc
                        .set_instance_protection()
                        .auto_scaling_group_name(&g.asg)
                        .instance_ids(id)
                        .protected_from_scale_in(true)
                        .send()
                        .await
                        .unwrap();
                })
            }),
            &["protected from scale-in", "set-instance-protection"],
        ),
        (
            "ASG: an instance in Standby",
            group_with(|g, c| {
                let id = first_instance(g);
                rollout::rt().block_on(async {
                    c.asc
                        .enter_standby()
                        .auto_scaling_group_name(&g.asg)
                        .instance_ids(id)
                        .should_decrement_desired_capacity(true)
                        .send()
                        .await
                        .unwrap();
                })
            }),
            &["Standby", "exit-standby"],
        ),
        (
            "ASG: Launch process suspended",
            group_with(|g, c| {
                rollout::rt().block_on(async {
                    c.asc
                        .suspend_processes()
                        .auto_scaling_group_name(&g.asg)
                        .scaling_processes("Launch")
                        .send()
                        .await
                        .unwrap();
                })
            }),
            &["Launch process suspended"],
        ),
        (
            "ASG: launch template deleted",
            group_with(|g, c| {
                rollout::rt().block_on(async {
                    c.ec2
                        .delete_launch_template()
                        .launch_template_id(&g.lt)
                        .send()
                        .await
                        .unwrap();
                })
            }),
            &["launch template", "does not exist"],
        ),
        (
            "ASG: target group deleted",
            group_with(|g, c| {
                rollout::rt().block_on(async {
                    c.elb
                        .delete_target_group()
                        .target_group_arn(&g.tg)
                        .send()
                        .await
                        .unwrap();
                })
            }),
            &["TargetGroupNotFound"],
        ),
    ];
    for (name, g, says) in states {
        let v2 = format!("{}@2", g.image);
        out.push(judge(
            name,
            &p,
            &rollout::rollout_args(&g, &v2, &[]),
            2,
            says,
        ));
        let plan = rollout::rollout_args(&g, &v2, &["--plan"]);
        out.push(judge(format!("{name} (--plan)"), &p, &plan, 2, says));
    }
    // Documented handling, not an error: a group scaled to zero has nothing to
    // replace; its launch template is pointed at the image (so its next launch
    // runs it) and its capacity stays zero.
    let zero = group_with(|g, c| {
        rollout::rt().block_on(async {
            c.asc
                .update_auto_scaling_group()
                .auto_scaling_group_name(&g.asg)
                .min_size(0)
                .desired_capacity(0)
                .send()
                .await
                .unwrap();
        })
    });
    let v2z = format!("{}@2", zero.image);
    let mut v = judge(
        "ASG: zero capacity (template updated, nothing replaced)",
        &p,
        &rollout::rollout_args(&zero, &v2z, &[]),
        0,
        &[],
    );
    let s = rollout::seen(&zero);
    v.mutating = 0;
    if (s.min, s.desired, s.instances.len()) != (0, 0, 0) || s.lt_version != "2" {
        v.run.code = None;
        v.run.stderr = format!("error: zero-capacity group ended as {s:?}");
    }
    out.push(v);
    // A group on a launch configuration: the error says how to move.
    let lc_asg = rollout::legacy_group(&g.ami1);
    out.push(judge(
        "ASG: on a launch configuration",
        &p,
        &["rollout", &lc_asg, &v2],
        2,
        &["launch configuration", "create-launch-template"],
    ));
    out
}

/// Every malformed or hostile input of the catalogue: exit 2 with one `error:`
/// line naming the problem, and no mutating call (the proxy counts them).
#[test]
fn bad_input_catalogue_exits_2_with_one_line_and_changes_nothing() {
    let env = bake::setup();
    let mut all = recipe_catalogue(&env);
    all.extend(bake_catalogue(&env));
    all.extend(rollout_catalogue());
    let problems: Vec<String> = all.iter().filter_map(Verdict::problem).collect();
    println!(
        "TRIAL|bad input catalogue|{}|{}|{}|{}|0|-|-|-|seed -",
        all.len(),
        all.len(),
        all.len() - problems.len(),
        problems.len()
    );
    assert!(all.len() >= 40, "{} cases", all.len());
    assert!(
        problems.is_empty(),
        "{} of {} cases:\n{}",
        problems.len(),
        all.len(),
        problems.join("\n")
    );
}

/// Issue 5: a group whose launch template or target group was deleted failed with
/// exit 1 (as if AWS had failed) instead of 2 (the operator's setup to fix).
#[test]
fn a_group_whose_launch_template_or_target_group_was_deleted_exits_2() {
    let p = Project::new();
    for (what, g) in [
        (
            "InvalidLaunchTemplateId.NotFound",
            group_with(|g, c| {
                rollout::rt().block_on(async {
                    c.ec2
                        .delete_launch_template()
                        .launch_template_id(&g.lt)
                        .send()
                        .await
                        .unwrap();
                })
            }),
        ),
        (
            "TargetGroupNotFound",
            group_with(|g, c| {
                rollout::rt().block_on(async {
                    c.elb
                        .delete_target_group()
                        .target_group_arn(&g.tg)
                        .send()
                        .await
                        .unwrap();
                })
            }),
        ),
    ] {
        let v2 = format!("{}@2", g.image);
        let v = judge(
            what,
            &p,
            &rollout::rollout_args(&g, &v2, &[]),
            2,
            &[what, &g.asg],
        );
        assert!(v.problem().is_none(), "{}\n{}", v.problem().unwrap(), v.run);
    }
}

/// A burst of throttling across concurrent calls (a fan-out, or an account-wide
/// throttle on a long rollout): 60 calls at once, throttled 120 times between
/// them before they get through. Every call must get its attempts; the SDK's
/// default retry quota (500 tokens, 5 per throttled retry, one back per call that
/// succeeds at once) allows 100 retries in a row and then failed every call still
/// throttled, at once and without backoff: all 20 calls of the first version of
/// this test.
#[test]
fn sustained_throttling_does_not_exhaust_the_retry_quota() {
    use crate::support::proxy::Fault;
    let proxy = Proxy::start(moto::endpoint());
    for _ in 0..120 {
        proxy.inject("autoscaling:DescribeAutoScalingGroups", Fault::Throttle);
    }
    let failed = rollout::rt().block_on(async {
        let conf = moto::sdk_config_loader(&proxy.endpoint())
            .retry_config(kiln::aws::retry_config())
            .timeout_config(kiln::aws::timeout_config())
            .load()
            .await;
        let asc = kiln::aws::Aws::from_sdk_config(conf)
            .expect("a region")
            .autoscaling();
        let calls: Vec<_> = (0..60)
            .map(|_| {
                let asc = asc.clone();
                tokio::spawn(async move { asc.describe_auto_scaling_groups().send().await })
            })
            .collect();
        let mut failed = Vec::new();
        for call in calls {
            if let Err(e) = call.await.unwrap() {
                failed.push(format!(
                    "{:?}",
                    aws_sdk_autoscaling::error::DisplayErrorContext(e)
                ));
            }
        }
        failed
    });
    assert_eq!(proxy.pending_injections(), 0, "{}", proxy.summary());
    assert!(
        failed.is_empty(),
        "{} of 60 calls failed: {:?}",
        failed.len(),
        failed.first()
    );
}

/// The SSM lock parameter of `g` held by `pid` of this host.
fn hold_lock(g: &Group, pid: u32) {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let holder = kiln::rollout::model::Holder {
        who: "ops".into(),
        host,
        pid,
        started: kiln::rollout::model::Timestamp(1_790_000_000_000),
    };
    rollout::rt().block_on(async {
        aws_sdk_ssm::Client::new(&rollout::conf().await)
            .put_parameter()
            .name(format!("/kiln/rollout/{}/lock", g.asg))
            .value(serde_json::to_string(&holder).unwrap())
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .overwrite(true)
            .send()
            .await
            .unwrap();
    });
}

/// Issue 5, SIGKILL trial run 34 of seed 1: kiln killed after taking the lock and
/// before writing its journal; `kiln abort` said "no rollout in progress" and left
/// the lock, which would refuse the next rollout from any other host.
#[test]
fn abort_after_a_kill_before_the_journal_was_written_releases_the_lock() {
    let g = rollout::setup();
    let p = Project::new();
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = gone.id();
    gone.wait().unwrap();
    hold_lock(&g, dead_pid);
    let v = judge(
        "abort, lock of a dead kiln",
        &p,
        &["abort", &g.asg],
        2,
        &["no rollout in progress"],
    );
    assert!(
        v.run.stderr.contains("released the rollout lock"),
        "{}",
        v.run
    );
    assert!(!lock_held(&g), "the lock is released\n{}", v.run);

    // A live holder is not touched: abort names it.
    hold_lock(&g, std::process::id());
    let r = p.kiln(moto::endpoint(), &["abort", &g.asg]);
    r.expect_code(2);
    assert!(r.stderr.contains("is being rolled by"), "{r}");
    assert!(lock_held(&g), "a live holder keeps its lock");
}

// ---------------------------------------------------------------------------
// Lost responses: the call worked, its answer never came, the SDK retried it
// ---------------------------------------------------------------------------

/// A rollout of a fresh group through a proxy given the faults `inject` scripts.
/// Every scripted fault must have been used; returns the group, the proxy and the run.
fn rollout_through(inject: impl FnOnce(&Proxy)) -> (Group, Proxy, Run) {
    let g = rollout::setup();
    let proxy = Proxy::start(moto::endpoint());
    inject(&proxy);
    let v2 = format!("{}@2", g.image);
    let run = Project::new().kiln(&proxy.endpoint(), &rollout::rollout_args(&g, &v2, &[]));
    assert_eq!(
        proxy.pending_injections(),
        0,
        "a scripted fault was not used\n{}",
        proxy.summary()
    );
    (g, proxy, run)
}

/// The run succeeded and left the group as a fault-free rollout does.
fn assert_rolled(g: &Group, run: &Run, proxy: &Proxy) {
    assert_eq!(run.code, Some(0), "{run}\n{}", proxy.summary());
    let mut out = Outcome::default();
    check_rolled(g, Some(&g.ami2), &mut out);
    assert!(
        out.lost.is_empty() && out.leaked.is_empty(),
        "{out:?}\n{run}"
    );
}

/// `kiln status` against a real (moto) group: a rollout stopped mid-way that
/// has made no progress for longer than its deadline is `stuck`, exit 1, with
/// how to continue; after `kiln abort` the group is back on its image and
/// status is `ok`, exit 0.
#[test]
fn status_says_a_stopped_rollout_is_stuck_until_it_is_aborted() {
    use crate::support::proxy::Fault;
    let g = rollout::setup();
    let proxy = Proxy::start(moto::endpoint());
    for _ in 0..kiln::aws::MAX_ATTEMPTS {
        proxy.inject(
            "autoscaling:TerminateInstanceInAutoScalingGroup",
            Fault::ServerError,
        );
    }
    let v2 = format!("{}@2", g.image);
    let run = Project::new().kiln(
        &proxy.endpoint(),
        &rollout::rollout_args(&g, &v2, &["--deadline", "2s"]),
    );
    assert_eq!(run.code, Some(1), "{run}\n{}", proxy.summary());
    std::thread::sleep(Duration::from_secs(3));

    let status = |args: &[&str]| {
        let mut all = vec!["status", g.asg.as_str()];
        all.extend_from_slice(args);
        Project::new().kiln(moto::endpoint(), &all)
    };
    let stuck = status(&["--output", "json"]);
    assert_eq!(stuck.code, Some(1), "{stuck}");
    let s: serde_json::Value = serde_json::from_str(&stuck.stdout).expect("status JSON");
    assert_eq!(s["health"], "stuck", "{stuck}");
    assert_eq!(s["rollout"]["phase"], "Rolling", "{stuck}");
    let human = status(&[]);
    assert_eq!(human.code, Some(1), "{human}");
    let last = human.stderr.trim().lines().last().unwrap_or_default();
    assert!(
        last.contains(&g.asg)
            && last.contains("no progress within its deadline")
            && last.contains("kiln abort"),
        "{human}"
    );

    let abort = Project::new().kiln(moto::endpoint(), &["abort", &g.asg]);
    assert_eq!(abort.code, Some(0), "{abort}");
    let mut out = Outcome::default();
    check_rolled(&g, Some(&g.ami1), &mut out);
    assert!(
        out.lost.is_empty() && out.leaked.is_empty(),
        "{out:?}\n{abort}"
    );
    let ok = status(&["--output", "json"]);
    assert_eq!(ok.code, Some(0), "{ok}");
    let s: serde_json::Value = serde_json::from_str(&ok.stdout).expect("status JSON");
    assert_eq!(s["health"], "ok", "{ok}");
    assert!(s["rollout"].is_null(), "{ok}");
}

/// Lost-response trial, seed 1 (runs 4, 6, 11, 13, 14, 17): the SDK's retry of a
/// terminate that had worked failed (moto: HTTP 500; AWS: ValidationError), and
/// the rollout stopped with exit 1, processes suspended and capacity raised.
#[test]
fn a_terminate_whose_answer_was_lost_counts_as_done() {
    use crate::support::proxy::Fault;
    let (g, proxy, run) = rollout_through(|p| {
        p.inject(
            "autoscaling:TerminateInstanceInAutoScalingGroup",
            Fault::LoseResponse,
        )
    });
    assert_rolled(&g, &run, &proxy);
}

/// Lost-response trial, seed 1 (runs 9, 16, 18, 19): the retry of a deregister
/// that had worked was refused with InvalidTarget, and the rollout stopped with
/// exit 1 and 8 instances running.
#[test]
fn a_deregister_whose_answer_was_lost_counts_as_done() {
    use crate::support::proxy::Fault;
    let (g, proxy, run) = rollout_through(|p| {
        p.inject(
            "elasticloadbalancing:DeregisterTargets",
            Fault::LoseResponse,
        )
    });
    assert_rolled(&g, &run, &proxy);
}

/// Lost-response trial, seed 1 (run 15): the journal is created without
/// overwrite; the SDK's retry of a create that had worked got
/// ParameterAlreadyExists, and kiln stopped saying its own lock had been taken
/// over ("taken over by <itself>"). The lock is created the same way.
#[test]
fn lock_and_journal_writes_whose_answers_were_lost_are_recognised_as_ours() {
    use crate::support::proxy::Fault;
    let (g, proxy, run) = rollout_through(|p| {
        p.inject_when("ssm:PutParameter", "/lock\"", Fault::LoseResponse);
        p.inject_when("ssm:PutParameter", "/journal\"", Fault::LoseResponse);
    });
    assert_rolled(&g, &run, &proxy);
    let hist = Project::new().kiln(moto::endpoint(), &["history", &g.asg, "--output", "json"]);
    let h: serde_json::Value = serde_json::from_str(&hist.stdout).expect("history JSON");
    let rollouts = h["rollouts"].as_array().expect("rollouts");
    assert_eq!(rollouts.len(), 1, "{hist}");
    assert_eq!(rollouts[0]["outcome"], "Succeeded", "{hist}");
}

/// `ClientToken=…` of an EC2 query request.
fn client_token(body: &[u8]) -> Option<String> {
    String::from_utf8_lossy(body)
        .split('&')
        .find_map(|kv| kv.strip_prefix("ClientToken="))
        .map(str::to_string)
}

/// A retried CreateLaunchTemplateVersion must carry the token of the first
/// attempt: AWS then returns the version that attempt made instead of making a
/// second one. (moto ignores the token and makes another version, which the
/// rollout then uses; the end state is the same.)
#[test]
fn a_launch_template_version_create_is_retried_with_the_same_client_token() {
    use crate::support::proxy::Fault;
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let seen = tokens.clone();
    let (g, proxy, run) = rollout_through(|p| {
        p.rewrite_exchange("ec2:CreateLaunchTemplateVersion", move |request, answer| {
            seen.lock().unwrap().push(client_token(request));
            answer.to_vec()
        });
        p.inject("ec2:CreateLaunchTemplateVersion", Fault::LoseResponse);
    });
    assert_rolled(&g, &run, &proxy);
    let tokens = tokens.lock().unwrap().clone();
    assert_eq!(tokens.len(), 2, "the lost create and its retry: {tokens:?}");
    assert!(tokens[0].is_some(), "a ClientToken is set: {tokens:?}");
    assert_eq!(tokens[0], tokens[1], "the retry reuses the token");
}

/// A call that really fails mid-rollout (every attempt of a terminate answered
/// with HTTP 500) stops kiln with exit 1, leaving the journal in SSM; the same
/// command again resumes and finishes, as after a kill.
#[test]
fn a_rollout_stopped_by_a_failing_call_finishes_when_run_again() {
    use crate::support::proxy::Fault;
    let (g, proxy, run) = rollout_through(|p| {
        for _ in 0..kiln::aws::MAX_ATTEMPTS {
            p.inject(
                "autoscaling:TerminateInstanceInAutoScalingGroup",
                Fault::ServerError,
            );
        }
    });
    assert_eq!(run.code, Some(1), "{run}\n{}", proxy.summary());
    assert!(
        run.stderr.contains("TerminateInstanceInAutoScalingGroup"),
        "{run}"
    );
    // The operator is told how to continue, above the error line.
    assert!(
        run.stderr.contains(&format!(
            "the rollout of {} stopped before its end; its journal is kept in SSM",
            g.asg
        )) && run
            .stderr
            .contains(&format!("`kiln abort {}` to roll back", g.asg)),
        "{run}"
    );
    assert!(
        run.stderr
            .trim()
            .lines()
            .last()
            .unwrap()
            .contains("TerminateInstanceInAutoScalingGroup"),
        "the error is still the last line\n{run}"
    );
    let status = Project::new().kiln(moto::endpoint(), &["status", &g.asg, "--output", "json"]);
    let s: serde_json::Value = serde_json::from_str(&status.stdout).expect("status JSON");
    assert_eq!(s["rollout"]["phase"], "Rolling", "{status}");

    let v2 = format!("{}@2", g.image);
    let again = Project::new().kiln(&proxy.endpoint(), &rollout::rollout_args(&g, &v2, &[]));
    assert_rolled(&g, &again, &proxy);
}
