//! Rollouts in the simulated fleet on virtual time (issue 3, "Must show":
//! simulator), plus focused tests of the pure decision.
//!
//! Run: `cargo test --test tests rollout_sim`. The property test's case count is
//! `PROPTEST_CASES` (default 64 here).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kiln::rollout::engine::{self, EngineConfig, Event, Progress, Report, StartRequest};
use kiln::rollout::model::*;
use kiln::rollout::plan::{decide, plan_schedule, Note, PlanAssumptions, Step, WaitFor};
use kiln::rollout::sim::{ExternalScale, Outage, SimConfig, SimFleet};
use kiln::rollout::RolloutError;
use proptest::prelude::*;

const OLD: &str = "ami-00000000000000001";
const NEW: &str = "ami-00000000000000002";

fn holder(n: u32) -> Holder {
    Holder {
        who: format!("op{n}"),
        host: "laptop".into(),
        pid: 1000 + n,
        started: Timestamp(0),
    }
}

fn cfg() -> EngineConfig {
    EngineConfig {
        poll_interval: Duration::from_secs(5),
        max_cycles: Some(20_000),
    }
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime")
}

async fn start(
    sim: &SimFleet,
    spec: &RolloutSpec,
    who: u32,
) -> Result<engine::Stored, RolloutError> {
    let req = StartRequest {
        asg: "web-prod".into(),
        spec: spec.clone(),
        holder: holder(who),
        rollout_id: format!("r-{}-{who}", spec.target_image),
    };
    // The previous holder is a killed process on this host: taking over is allowed.
    engine::start(sim, sim, req, |_| true).await
}

async fn roll(sim: &SimFleet, spec: &RolloutSpec, who: u32) -> Result<Report, RolloutError> {
    let stored = start(sim, spec, who).await?;
    engine::drive(sim, sim, stored, &cfg(), &mut ()).await
}

/// Roll, restarting after every simulated crash like an operator re-running
/// `kiln rollout` after a SIGKILL.
async fn roll_through_crashes(sim: &SimFleet, spec: &RolloutSpec) -> Result<Report, RolloutError> {
    let mut attempt = 0;
    loop {
        match roll(sim, spec, attempt).await {
            Err(RolloutError::Fleet { source, .. })
                if attempt < 50 && source.to_string().contains("simulated crash") => {}
            r => return r,
        }
        attempt += 1;
    }
}

fn spec(target: &str) -> RolloutSpec {
    RolloutSpec {
        target_image: target.into(),
        max_surge: Amount::Percent(25),
        min_healthy: Amount::Percent(100),
        warmup: Duration::from_secs(30),
        deadline: Duration::from_secs(15 * 60),
        rollback_on_failure: true,
    }
}

async fn journal_of(sim: &SimFleet) -> Journal {
    engine::JournalStore::load(sim, "web-prod")
        .await
        .unwrap()
        .unwrap()
        .journal
}

fn assert_restored(
    sim: &SimFleet,
    start: &kiln::rollout::sim::GroupSummary,
    expected_desired: u32,
) {
    let end = sim.summary();
    assert_eq!(end.desired, expected_desired, "desired");
    assert_eq!(end.min, start.min.min(expected_desired), "min");
    assert_eq!(end.max, start.max.max(expected_desired), "max");
    assert_eq!(end.suspended, start.suspended, "suspended processes");
}

// ---------------------------------------------------------------------------
// Whole rollouts in the simulator
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn rolls_six_instances_over_three_azs() {
    let mut c = SimConfig::new(6, 3);
    c.suspended = ["AZRebalance".to_string(), "AddToLoadBalancer".to_string()].into();
    let sim = SimFleet::new(c);
    sim.watch_floor(6);
    let before = sim.summary();
    let r = roll(&sim, &spec(NEW), 1).await.unwrap();
    assert_eq!(r.outcome, Outcome::Succeeded);
    assert_eq!(sim.summary().images, BTreeMap::from([(NEW.to_string(), 6)]));
    assert_restored(&sim, &before, 6);
    let st = sim.stats();
    assert!(st.breaches.is_empty(), "{:?}", st.breaches);
    assert_eq!(
        st.calls_per_observation.len(),
        1,
        "observation cost must not vary"
    );
    // 25% of 6 is 2 per batch: 3 batches.
    assert_eq!(r.batches, 3);
    let j = journal_of(&sim).await;
    assert_eq!(j.phase, Phase::Done);
    assert_eq!(j.history.len(), 1);
    assert_eq!(j.history[0].from_image, OLD);
}

#[tokio::test(start_paused = true)]
async fn rollback_returns_to_the_previous_image() {
    let sim = SimFleet::new(SimConfig::new(4, 2));
    roll(&sim, &spec(NEW), 1).await.unwrap();
    let previous = engine::previous_image(&sim, "web-prod").await.unwrap();
    assert_eq!(previous, OLD);
    let r = roll(&sim, &spec(&previous), 2).await.unwrap();
    assert_eq!(r.outcome, Outcome::Succeeded);
    assert_eq!(sim.summary().images, BTreeMap::from([(OLD.to_string(), 4)]));
    let h = engine::history(&sim, "web-prod").await.unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(
        (h[1].from_image.as_str(), h[1].to_image.as_str()),
        (NEW, OLD)
    );
}

#[tokio::test(start_paused = true)]
async fn unhealthy_new_instances_roll_back_automatically() {
    let mut c = SimConfig::new(6, 3);
    c.failure_rate = 1.0;
    c.health_check_grace = Duration::from_secs(60);
    let sim = SimFleet::new(c);
    sim.watch_floor(6);
    let before = sim.summary();
    let r = roll(&sim, &spec(NEW), 1).await.unwrap();
    assert_eq!(r.outcome, Outcome::RolledBack, "{r:?}");
    // The ASG may replace the instance before kiln sees it unhealthy: both count.
    let reason = r.reason.as_deref().unwrap();
    assert!(
        reason.contains("unhealthy") || reason.contains("replaced by the ASG"),
        "{r:?}"
    );
    let end = sim.summary();
    assert_eq!(end.images, BTreeMap::from([(OLD.to_string(), 6)]));
    assert_eq!(
        end.launch_template_version, 1,
        "ASG points at the source version again"
    );
    assert_restored(&sim, &before, 6);
    assert!(sim.stats().breaches.is_empty());
}

#[tokio::test(start_paused = true)]
async fn no_progress_before_the_deadline_rolls_back() {
    let mut c = SimConfig::new(4, 2);
    // New instances fail their target health check but the ASG only notices after
    // an hour: only the deadline can catch this.
    c.failure_rate = 1.0;
    c.health_check_grace = Duration::from_secs(3600);
    let sim = SimFleet::new(c);
    let mut s = spec(NEW);
    s.deadline = Duration::from_secs(300);
    let r = roll(&sim, &s, 1).await.unwrap();
    assert_eq!(r.outcome, Outcome::RolledBack);
    assert!(
        r.reason.as_deref().unwrap().contains("no progress"),
        "{r:?}"
    );
    assert_eq!(sim.summary().images, BTreeMap::from([(OLD.to_string(), 4)]));
}

#[tokio::test(start_paused = true)]
async fn rollback_disabled_stops_failed_and_restores() {
    let mut c = SimConfig::new(5, 2);
    c.failure_rate = 1.0;
    c.health_check_grace = Duration::from_secs(60);
    c.suspended = ["ScheduledActions".to_string()].into();
    let sim = SimFleet::new(c);
    sim.watch_floor(5);
    let before = sim.summary();
    let mut s = spec(NEW);
    s.rollback_on_failure = false;
    let r = roll(&sim, &s, 1).await.unwrap();
    assert_eq!(r.outcome, Outcome::Failed);
    assert_restored(&sim, &before, 5);
    assert!(
        sim.stats().breaches.is_empty(),
        "{:?}",
        sim.stats().breaches
    );
    assert_eq!(journal_of(&sim).await.phase, Phase::Failed);
}

#[tokio::test(start_paused = true)]
async fn external_scale_out_is_kept() {
    let mut c = SimConfig::new(8, 3);
    // At 200 s the first batch (surge 2) runs: desired 10 becomes 14.
    c.external_scale = Some(ExternalScale {
        at: Duration::from_secs(200),
        add: 4,
    });
    let sim = SimFleet::new(c);
    sim.watch_floor(8);
    let before = sim.summary();
    let r = roll(&sim, &spec(NEW), 1).await.unwrap();
    assert_eq!(r.outcome, Outcome::Succeeded);
    assert_eq!(sim.stats().external_applied, Some(14));
    let ext = r.external_change.expect("reported");
    assert_eq!(ext.to, 14);
    assert_eq!(
        sim.summary().images,
        BTreeMap::from([(NEW.to_string(), 14)])
    );
    assert_restored(&sim, &before, 14);
}

#[tokio::test(start_paused = true)]
async fn az_outage_never_makes_kiln_remove_below_the_floor() {
    let mut c = SimConfig::new(9, 3);
    c.outages = vec![Outage {
        az: "eu-west-1b".into(),
        start: Duration::from_secs(100),
        end: Duration::from_secs(700),
    }];
    let sim = SimFleet::new(c);
    sim.watch_floor(9);
    let r = roll(&sim, &spec(NEW), 1).await.unwrap();
    let st = sim.stats();
    assert!(st.kiln_breaches.is_empty(), "{:?}", st.kiln_breaches);
    let images = sim.summary().images;
    match r.outcome {
        Outcome::Succeeded => assert_eq!(images.keys().collect::<Vec<_>>(), [NEW]),
        Outcome::RolledBack => assert_eq!(images.keys().collect::<Vec<_>>(), [OLD]),
        o => panic!("{o:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn second_rollout_is_refused_naming_the_holder() {
    let sim = SimFleet::new(SimConfig::new(4, 2));
    let stored = start(&sim, &spec(NEW), 1).await.unwrap();
    let req = StartRequest {
        asg: "web-prod".into(),
        spec: spec(NEW),
        holder: holder(2),
        rollout_id: "r2".into(),
    };
    let err = engine::start(&sim, &sim, req, |_| false).await.unwrap_err();
    match &err {
        RolloutError::Locked { holder: h, .. } => assert_eq!(h, &holder(1)),
        e => panic!("{e}"),
    }
    assert!(err.to_string().contains("op1 on laptop"), "{err}");
    // Another image while one is in progress (and the holder is gone): refused too.
    let req = StartRequest {
        asg: "web-prod".into(),
        spec: spec("ami-3"),
        holder: holder(3),
        rollout_id: "r3".into(),
    };
    let err = engine::start(&sim, &sim, req, |_| true).await.unwrap_err();
    assert!(matches!(err, RolloutError::InProgress { .. }), "{err}");
    // The refused run took the (dead) holder's lock and gave it back on refusing;
    // re-running the same rollout resumes it, finishes, and releases the lock.
    drop(stored);
    let r = roll(&sim, &spec(NEW), 4).await.unwrap();
    assert_eq!(r.outcome, Outcome::Succeeded);
    assert_eq!(
        engine::JournalStore::holder(&sim, "web-prod")
            .await
            .unwrap(),
        None
    );
}

#[tokio::test(start_paused = true)]
async fn abort_after_a_crash_rolls_back_cleanly() {
    let sim = SimFleet::new(SimConfig::new(6, 3));
    let before = sim.summary();
    // Die somewhere in the middle (after the first batch's terminations began).
    sim.crash_at(12, true);
    assert!(roll(&sim, &spec(NEW), 1).await.is_err());
    assert!(sim.summary().images.contains_key(NEW) || sim.summary().launch_template_versions == 2);
    let r = engine::abort(
        &sim,
        &sim,
        "web-prod",
        &holder(9),
        |_| true,
        &cfg(),
        &mut (),
    )
    .await
    .unwrap();
    assert_eq!(r.outcome, Outcome::Aborted);
    assert_eq!(sim.summary().images, BTreeMap::from([(OLD.to_string(), 6)]));
    assert_eq!(sim.summary().launch_template_version, 1);
    assert_restored(&sim, &before, 6);
    // Nothing left to abort.
    let err = engine::abort(
        &sim,
        &sim,
        "web-prod",
        &holder(9),
        |_| true,
        &cfg(),
        &mut (),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RolloutError::NothingInProgress { .. }));
}

/// Crash before and after every single mutating call (fleet or journal) of a
/// rollout, then run again: it always finishes all-new, restored, with one
/// launch template version created.
#[test]
fn resumes_after_a_crash_at_every_step() {
    let calls = paused_runtime().block_on(async {
        let sim = SimFleet::new(SimConfig::new(5, 2));
        roll(&sim, &spec(NEW), 1).await.unwrap();
        sim.stats().mutating_calls
    });
    assert!(calls > 10, "only {calls} mutating calls?");
    for n in 1..=calls {
        for after in [false, true] {
            let rt = paused_runtime();
            rt.block_on(async {
                let mut c = SimConfig::new(5, 2);
                c.suspended = ["AlarmNotification".to_string()].into();
                let sim = SimFleet::new(c);
                sim.watch_floor(5);
                let before = sim.summary();
                sim.crash_at(n, after);
                let r = roll_through_crashes(&sim, &spec(NEW)).await.unwrap();
                assert_eq!(r.outcome, Outcome::Succeeded, "crash at {n} after={after}");
                let end = sim.summary();
                assert_eq!(
                    end.images,
                    BTreeMap::from([(NEW.to_string(), 5)]),
                    "crash at {n} after={after}"
                );
                assert_eq!(
                    end.launch_template_versions, 2,
                    "crash at {n} after={after}: one version created"
                );
                assert_restored(&sim, &before, 5);
                assert!(
                    sim.stats().breaches.is_empty(),
                    "crash at {n} after={after}: {:?}",
                    sim.stats().breaches
                );
            });
        }
    }
}

#[tokio::test(start_paused = true)]
async fn journal_history_is_bounded_and_reverts_far_back() {
    let sim = SimFleet::new({
        let mut c = SimConfig::new(2, 2);
        c.boot = Duration::from_secs(5);
        c.health = Duration::from_secs(5);
        c.drain = Duration::from_secs(1);
        c
    });
    let mut s = spec(NEW);
    s.warmup = Duration::ZERO;
    for n in 0..(HISTORY_LEN as u32 + 3) {
        s.target_image = format!("ami-{n:017}");
        roll(&sim, &s, n).await.unwrap();
    }
    let h = engine::history(&sim, "web-prod").await.unwrap();
    assert_eq!(h.len(), HISTORY_LEN);
    assert!(h.iter().all(|e| e.outcome == Outcome::Succeeded));
    assert_eq!(
        h.last().unwrap().to_image,
        format!("ami-{:017}", HISTORY_LEN + 2)
    );
    assert_eq!(
        h[h.len() - 10].to_image,
        format!("ami-{:017}", HISTORY_LEN + 2 - 9)
    );
}

#[derive(Default)]
struct Lines(Vec<String>);

impl Progress for Lines {
    fn event(&mut self, _: &Journal, e: Event<'_>) {
        if let Event::Batch(b) = e {
            self.0.push(format!(
                "batch {}: launched {}, healthy {}, drained {}, terminated {}",
                b.number, b.launched, b.healthy, b.drained, b.terminated
            ));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn reports_a_line_per_batch_and_constant_observation_cost() {
    for size in [10u32, 100] {
        let sim = SimFleet::new(SimConfig::new(size, 3));
        let stored = start(&sim, &spec(NEW), 1).await.unwrap();
        let mut lines = Lines::default();
        let r = engine::drive(&sim, &sim, stored, &cfg(), &mut lines)
            .await
            .unwrap();
        assert_eq!(r.outcome, Outcome::Succeeded);
        let batches = size.div_ceil(size.div_ceil(4));
        assert_eq!(lines.0.len() as u32, batches, "{:?}", lines.0);
        let surge = size.div_ceil(4);
        assert_eq!(
            lines.0[0],
            format!(
                "batch 1: launched {surge}, healthy {surge}, drained {surge}, terminated {surge}"
            )
        );
        assert_eq!(sim.stats().calls_per_observation.len(), 1, "size {size}");
    }
}

// ---------------------------------------------------------------------------
// The pure decision
// ---------------------------------------------------------------------------

const TG: &str = "arn:tg/web";
const T0: u64 = 1_790_000_000_000;

struct Fixture {
    obs: Observation,
}

impl Fixture {
    /// Old instances given as (az, launched seconds after T0 - 1 day).
    fn new(old: &[(&str, u64)]) -> Self {
        let mut obs = Observation {
            now: Timestamp(T0),
            group: GroupState {
                name: "web-prod".into(),
                min: 1,
                max: old.len() as u32,
                desired: old.len() as u32,
                launch: LaunchSource::Template {
                    id: "lt-1".into(),
                    version: 1,
                    image_id: OLD.into(),
                    mixed_instances_policy: false,
                },
                suspended: BTreeSet::new(),
                target_groups: vec![TG.into()],
                health_check_grace: Duration::from_secs(300),
            },
            instances: vec![],
            target_health: BTreeMap::new(),
        };
        for (n, (az, t)) in old.iter().enumerate() {
            let id = format!("i-old{n}");
            obs.instances
                .push(inst(&id, az, OLD, Timestamp(T0 - 86_400_000 + t * 1000)));
            obs.target_health
                .entry(TG.into())
                .or_default()
                .insert(id, TargetHealth::Healthy);
        }
        Fixture { obs }
    }

    fn add_new(&mut self, id: &str, az: &str, ready: bool) {
        let mut i = inst(id, az, NEW, Timestamp(T0 + 1000));
        if !ready {
            i.lifecycle = Lifecycle::Pending;
        }
        self.obs.instances.push(i);
        if ready {
            self.obs
                .target_health
                .entry(TG.into())
                .or_default()
                .insert(id.into(), TargetHealth::Healthy);
        }
    }

    /// A journal past the launch template steps, processes suspended.
    fn journal(&mut self, spec: &RolloutSpec) -> Journal {
        let j = Journal::begin("r1", holder(1), spec.clone(), &self.obs, None).unwrap();
        self.obs.group.suspended = SUSPENDED_DURING_ROLLOUT
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut j = j;
        j.target.launch_template_version = Some(2);
        if let LaunchSource::Template { version, .. } = &mut self.obs.group.launch {
            *version = 2;
        }
        j
    }

    /// Surge by `n`: desired and the journal's expectation move together.
    fn surged(&mut self, j: &mut Journal, n: u32) {
        self.obs.group.desired += n;
        self.obs.group.max = self.obs.group.max.max(self.obs.group.desired);
        j.desired.expected = self.obs.group.desired;
    }

    /// Run journal-only steps until a real one comes, advancing past warm-up.
    fn next(&mut self, j: &mut Journal, spec: &RolloutSpec) -> Step {
        for _ in 0..100 {
            let step = decide(&self.obs, j, spec);
            match &step {
                s if s.is_journal_only() => j.record(s, self.obs.now),
                Step::Wait(WaitFor::WarmUp { until }) => self.obs.now = *until,
                _ => return step,
            }
        }
        panic!("no step");
    }
}

fn inst(id: &str, az: &str, image: &str, launched_at: Timestamp) -> Instance {
    Instance {
        id: id.into(),
        az: az.into(),
        lifecycle: Lifecycle::InService,
        ec2_state: Ec2State::Running,
        healthy: true,
        image_id: image.into(),
        launch_template_version: Some(1),
        launched_at,
        protected_from_scale_in: false,
    }
}

#[test]
fn first_steps_suspend_then_template_then_point_then_surge() {
    let mut f = Fixture::new(&[("a", 1), ("b", 2), ("c", 3), ("a", 4)]);
    let s = spec(NEW);
    let mut j = Journal::begin("r1", holder(1), s.clone(), &f.obs, None).unwrap();
    let step = decide(&f.obs, &j, &s);
    assert_eq!(
        step,
        Step::SuspendProcesses {
            processes: SUSPENDED_DURING_ROLLOUT
                .iter()
                .map(|s| s.to_string())
                .collect()
        }
    );
    f.obs.group.suspended = SUSPENDED_DURING_ROLLOUT
        .iter()
        .map(|s| s.to_string())
        .collect();
    let step = decide(&f.obs, &j, &s);
    assert!(
        matches!(&step, Step::CreateLaunchTemplateVersion { from_version: 1, image_id, token, .. }
        if image_id == NEW && token == "r1")
    );
    j.after(
        &step,
        f.obs.now,
        &kiln::rollout::plan::Acted::LaunchTemplateVersion(7),
    );
    assert_eq!(
        decide(&f.obs, &j, &s),
        Step::PointAsg {
            template_id: "lt-1".into(),
            version: 7,
            mixed_instances_policy: false
        }
    );
    if let LaunchSource::Template { version, .. } = &mut f.obs.group.launch {
        *version = 7;
    }
    assert_eq!(
        decide(&f.obs, &j, &s),
        Step::SetCapacity { desired: 5, max: 5 }
    );
}

#[test]
fn old_instance_chosen_from_the_az_with_most_old_then_oldest() {
    // a: 3 old, b: 2, c: 1. The oldest overall is in c; the oldest in a is old2.
    let mut f = Fixture::new(&[
        ("a", 50),
        ("b", 10),
        ("a", 20),
        ("c", 1),
        ("b", 30),
        ("a", 40),
    ]);
    let s = spec(NEW);
    let mut j = f.journal(&s);
    f.surged(&mut j, 2);
    f.add_new("i-new0", "c", true);
    f.add_new("i-new1", "b", true);
    let step = f.next(&mut j, &s);
    // Two to go: the oldest in a (old2), then a and b tie at 2 old each: oldest of
    // those (old1 in b, at 10).
    assert_eq!(
        step,
        Step::Deregister {
            instances: vec!["i-old2".into(), "i-old1".into()],
            target_groups: vec![TG.into()]
        }
    );
}

#[test]
fn unhealthy_old_instances_go_first() {
    let mut f = Fixture::new(&[("a", 1), ("a", 2), ("a", 3), ("c", 4)]);
    f.obs
        .target_health
        .get_mut(TG)
        .unwrap()
        .insert("i-old3".into(), TargetHealth::Unhealthy);
    let s = spec(NEW);
    let mut j = f.journal(&s);
    f.surged(&mut j, 1);
    f.add_new("i-new0", "b", true);
    assert_eq!(
        f.next(&mut j, &s),
        Step::Deregister {
            instances: vec!["i-old3".into()],
            target_groups: vec![TG.into()]
        }
    );
}

#[test]
fn floor_at_100_percent_with_surge_one() {
    let mut f = Fixture::new(&[("a", 1), ("b", 2), ("a", 3), ("b", 4)]);
    let mut s = spec(NEW);
    s.max_surge = Amount::Count(1);
    let mut j = f.journal(&s);
    assert_eq!(f.next(&mut j, &s), Step::SetCapacity { desired: 5, max: 5 });
    f.surged(&mut j, 1);
    // Not ready yet: wait, whatever the floor.
    f.add_new("i-new0", "a", false);
    assert!(matches!(
        f.next(&mut j, &s),
        Step::Wait(WaitFor::NewInstances {
            ready: 0,
            total: 1,
            ..
        })
    ));
    // Ready: 5 serving, floor 4: exactly one old goes.
    f.obs.instances.last_mut().unwrap().lifecycle = Lifecycle::InService;
    f.obs
        .target_health
        .get_mut(TG)
        .unwrap()
        .insert("i-new0".into(), TargetHealth::Healthy);
    assert_eq!(
        f.next(&mut j, &s),
        Step::Deregister {
            instances: vec!["i-old0".into()],
            target_groups: vec![TG.into()]
        }
    );

    // Same group, but an earlier-launched target-image instance is unhealthy so only
    // 4 serve: nothing may go.
    let mut f = Fixture::new(&[("a", 1), ("b", 2), ("a", 3)]);
    let mut pre = inst("i-pre", "b", NEW, Timestamp(T0 - 5000));
    pre.launch_template_version = Some(2);
    f.obs.instances.push(pre);
    f.obs
        .target_health
        .get_mut(TG)
        .unwrap()
        .insert("i-pre".into(), TargetHealth::Unhealthy);
    f.obs.group.desired = 4;
    let mut s = spec(NEW);
    s.max_surge = Amount::Count(1);
    s.min_healthy = Amount::Count(4);
    let mut j = f.journal(&s);
    f.surged(&mut j, 1);
    f.add_new("i-new0", "a", true);
    assert_eq!(
        f.next(&mut j, &s),
        Step::Wait(WaitFor::Floor {
            serving: 4,
            floor: 4
        })
    );
}

#[test]
fn drained_instances_are_terminated_decrementing_desired() {
    let mut f = Fixture::new(&[("a", 1), ("b", 2)]);
    let s = spec(NEW);
    let mut j = f.journal(&s);
    f.surged(&mut j, 1);
    f.add_new("i-new0", "a", true);
    let step = f.next(&mut j, &s);
    assert!(j.before(&step, &f.obs));
    j.after(&step, f.obs.now, &kiln::rollout::plan::Acted::Done);
    f.obs
        .target_health
        .get_mut(TG)
        .unwrap()
        .insert("i-old0".into(), TargetHealth::Draining);
    assert!(matches!(
        f.next(&mut j, &s),
        Step::Wait(WaitFor::Draining { .. })
    ));
    f.obs.target_health.get_mut(TG).unwrap().remove("i-old0");
    assert_eq!(
        f.next(&mut j, &s),
        Step::Terminate {
            instances: vec!["i-old0".into()],
            decrement_desired: true
        }
    );
}

#[test]
fn deadline_without_progress_starts_rollback_or_stops() {
    let mut f = Fixture::new(&[("a", 1), ("b", 2)]);
    let s = spec(NEW);
    let mut j = f.journal(&s);
    f.surged(&mut j, 1);
    f.add_new("i-new0", "a", false);
    assert!(matches!(f.next(&mut j, &s), Step::Wait(_)));
    f.obs.now = f.obs.now.plus(s.deadline + Duration::from_secs(1));
    let step = decide(&f.obs, &j, &s);
    match &step {
        Step::StartRollback { reason } => {
            assert!(reason.contains("no progress for 15m"), "{reason}");
            assert!(reason.contains("i-new0 Pending"), "{reason}");
        }
        s => panic!("{s:?}"),
    }
    let mut no = s.clone();
    no.rollback_on_failure = false;
    assert!(matches!(decide(&f.obs, &j, &no), Step::Stop { .. }));

    // Rolling back: goal is the source version, and the surge instance is the one to go.
    j.record(&step, f.obs.now);
    assert_eq!(j.phase, Phase::RollingBack);
    assert_eq!(
        f.next(&mut j, &s),
        Step::PointAsg {
            template_id: "lt-1".into(),
            version: 1,
            mixed_instances_policy: false
        }
    );
}

#[test]
fn a_new_instance_replaced_by_the_asg_is_a_failure() {
    let mut f = Fixture::new(&[("a", 1), ("b", 2)]);
    let s = spec(NEW);
    let mut j = f.journal(&s);
    f.surged(&mut j, 1);
    f.add_new("i-new0", "a", false);
    f.next(&mut j, &s);
    assert!(j.batch.launched.contains("i-new0"));
    f.obs.instances.last_mut().unwrap().lifecycle = Lifecycle::Terminating;
    assert!(
        matches!(decide(&f.obs, &j, &s), Step::StartRollback { reason } if reason.contains("replaced"))
    );
}

#[test]
fn external_desired_change_is_recorded_and_kept() {
    let mut f = Fixture::new(&[("a", 1), ("b", 2)]);
    let s = spec(NEW);
    let mut j = f.journal(&s);
    f.obs.group.desired = 5;
    f.obs.group.max = 5;
    let step = decide(&f.obs, &j, &s);
    assert_eq!(step, Step::Record(Note::ExternalDesired { from: 2, to: 5 }));
    j.record(&step, f.obs.now);
    assert_eq!(
        j.final_capacity(),
        Capacity {
            min: 1,
            max: 5,
            desired: 5
        }
    );
}

#[test]
fn a_write_ahead_desired_change_is_settled_either_way() {
    let mut f = Fixture::new(&[("a", 1), ("b", 2)]);
    let s = spec(NEW);
    let mut j = f.journal(&s);
    let step = Step::SetCapacity { desired: 3, max: 3 };
    j.before(&step, &f.obs);
    // Crashed before acting: desired still 2.
    assert_eq!(
        decide(&f.obs, &j, &s),
        Step::Record(Note::Settle { expected: 2 })
    );
    // Crashed after acting: desired 3.
    f.obs.group.desired = 3;
    assert_eq!(
        decide(&f.obs, &j, &s),
        Step::Record(Note::Settle { expected: 3 })
    );
}

#[test]
fn finish_restores_capacity_and_exactly_the_processes_suspended_before() {
    let mut f = Fixture::new(&[("a", 1)]);
    f.obs.group.suspended = ["AZRebalance".to_string(), "Launch2".to_string()].into();
    let s = spec(NEW);
    let mut j = Journal::begin("r1", holder(1), s.clone(), &f.obs, None).unwrap();
    j.target.launch_template_version = Some(2);
    // Everything replaced, capacity still surged.
    f.obs.instances.clear();
    f.add_new("i-new0", "a", true);
    f.obs
        .group
        .suspended
        .extend(SUSPENDED_DURING_ROLLOUT.iter().map(|s| s.to_string()));
    f.obs.group.max = 2;
    if let LaunchSource::Template { version, .. } = &mut f.obs.group.launch {
        *version = 2;
    }
    assert_eq!(
        f.next(&mut j, &s),
        Step::RestoreCapacity {
            min: 1,
            max: 1,
            desired: 1
        }
    );
    f.obs.group.max = 1;
    assert_eq!(
        f.next(&mut j, &s),
        Step::ResumeProcesses {
            processes: [
                "AlarmNotification".to_string(),
                "ScheduledActions".to_string()
            ]
            .into()
        }
    );
    f.obs.group.suspended = ["AZRebalance".to_string(), "Launch2".to_string()].into();
    assert_eq!(
        f.next(&mut j, &s),
        Step::Finish {
            outcome: Outcome::Succeeded
        }
    );
}

#[test]
fn launch_configuration_is_refused_with_how_to_move() {
    let mut f = Fixture::new(&[("a", 1)]);
    f.obs.group.launch = LaunchSource::Configuration {
        name: "web-lc".into(),
    };
    let err = Journal::begin("r1", holder(1), spec(NEW), &f.obs, None).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("web-lc") && msg.contains("create-launch-template"),
        "{msg}"
    );
}

/// Issue 5: kiln replaced a scale-in-protected instance (the ASG's terminate call
/// ignores the protection).
#[test]
fn a_group_with_a_scale_in_protected_instance_is_refused_naming_it() {
    let mut f = Fixture::new(&[("a", 1), ("b", 2)]);
    f.obs.instances[1].protected_from_scale_in = true;
    let err = Journal::begin("r1", holder(1), spec(NEW), &f.obs, None).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, RolloutError::InstancesProtected { .. })
            && msg.contains("i-old1")
            && !msg.contains("i-old0")
            && msg.contains("set-instance-protection"),
        "{msg}"
    );
}

/// Issue 5: a Standby instance stayed on the old image while the rollout said
/// Succeeded, and `--plan` failed with an internal error.
#[test]
fn a_group_with_an_instance_in_standby_is_refused_naming_it() {
    let mut f = Fixture::new(&[("a", 1), ("b", 2)]);
    f.obs.instances[0].lifecycle = Lifecycle::Standby;
    let err = Journal::begin("r1", holder(1), spec(NEW), &f.obs, None).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, RolloutError::InstancesInStandby { .. })
            && msg.contains("i-old0")
            && msg.contains("exit-standby"),
        "{msg}"
    );
}

#[test]
fn journal_round_trips_as_json() {
    let mut f = Fixture::new(&[("a", 1), ("b", 2)]);
    let j = f.journal(&spec(NEW));
    let json = serde_json::to_string_pretty(&j).unwrap();
    assert!(json.contains("\"warmup\": \"30s\""), "{json}");
    let back: Journal = serde_json::from_str(&json).unwrap();
    assert_eq!(back, j);
}

#[test]
fn plan_lists_the_template_change_batches_per_az_and_calls() {
    let f = Fixture::new(&[("a", 1), ("b", 2), ("c", 3), ("a", 4), ("b", 5), ("c", 6)]);
    let mut s = spec(NEW);
    s.max_surge = Amount::Count(2);
    let plan = plan_schedule(&f.obs, &s, &PlanAssumptions::default()).unwrap();
    assert_eq!(plan.launch_template.from_image, OLD);
    assert_eq!(plan.launch_template.to_image, NEW);
    assert_eq!(plan.batches.len(), 3);
    for b in &plan.batches {
        assert_eq!(b.desired_during, 8);
        assert_eq!(b.desired_after, 6);
        assert_eq!(b.launch.values().sum::<u32>(), 2);
        assert_eq!(b.terminate.values().map(Vec::len).sum::<usize>(), 2);
    }
    let terminated: BTreeSet<String> = plan
        .batches
        .iter()
        .flat_map(|b| b.terminate.values().flatten().cloned())
        .collect();
    assert_eq!(terminated.len(), 6);
    assert!(plan.api_calls > 0);
    assert_eq!(plan.observation_calls_per_cycle, 4);
}

// ---------------------------------------------------------------------------
// Property test over random scenarios
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Scenario {
    size: u32,
    azs: usize,
    target_groups: usize,
    surge: Amount,
    floor: Amount,
    boot: u64,
    health: u64,
    drain: u64,
    warmup: u64,
    failure_rate: f64,
    rollback: bool,
    external: Option<(u64, u32)>,
    pre_suspended: Vec<bool>,
    seed: u64,
    /// Kill the process at the n-th mutating call (before or after it took
    /// effect), then run `kiln rollout` again.
    crash: Option<(u64, bool)>,
    /// AZ index, start, duration (seconds).
    outage: Option<(usize, u64, u64)>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        1u32..200,
        1usize..=3,
        0usize..=2,
        prop_oneof![
            (1u32..=10).prop_map(Amount::Count),
            (1u32..=100).prop_map(Amount::Percent)
        ],
        prop_oneof![
            (0u32..=100).prop_map(Amount::Percent),
            (0u32..=200).prop_map(Amount::Count)
        ],
        (1u64..120, 1u64..60, 0u64..60, 0u64..60),
        prop_oneof![3 => Just(0.0), 1 => Just(0.05), 1 => Just(0.5)],
        any::<bool>(),
        proptest::option::of((10u64..2000, 1u32..10)),
        proptest::collection::vec(any::<bool>(), 3),
        any::<u64>(),
        (
            proptest::option::weighted(0.3, (1u64..150, any::<bool>())),
            proptest::option::weighted(0.2, (0usize..3, 0u64..1000, 10u64..300)),
        ),
    )
        .prop_map(
            |(
                size,
                azs,
                target_groups,
                surge,
                floor,
                (boot, health, drain, warmup),
                failure_rate,
                rollback,
                external,
                pre_suspended,
                seed,
                (crash, outage),
            )| {
                let floor = match floor {
                    Amount::Count(n) => Amount::Count(n.min(size)),
                    p => p,
                };
                Scenario {
                    size,
                    azs,
                    target_groups,
                    surge,
                    floor,
                    boot,
                    health,
                    drain,
                    warmup,
                    failure_rate,
                    rollback,
                    external,
                    pre_suspended,
                    seed,
                    crash,
                    outage: outage.map(|(az, at, d)| (az % azs, at, d)),
                }
            },
        )
}

fn run_scenario(sc: &Scenario) -> Result<(), TestCaseError> {
    let rt = paused_runtime();
    rt.block_on(async {
        let mut c = SimConfig::new(sc.size, sc.azs);
        c.target_groups = sc.target_groups;
        c.boot = Duration::from_secs(sc.boot);
        c.health = Duration::from_secs(sc.health);
        c.drain = Duration::from_secs(sc.drain);
        // A well-configured group's grace period covers boot and app start; without
        // target groups it is all kiln has to trust the ASG's "Healthy" by.
        c.health_check_grace = Duration::from_secs(sc.boot + sc.health + 10);
        c.failure_rate = sc.failure_rate;
        c.seed = sc.seed;
        c.external_scale = sc.external.map(|(at, add)| ExternalScale {
            at: Duration::from_secs(at),
            add,
        });
        c.suspended = ["AZRebalance", "ScheduledActions", "AddToLoadBalancer"]
            .iter()
            .zip(&sc.pre_suspended)
            .filter(|(_, on)| **on)
            .map(|(p, _)| p.to_string())
            .collect();
        c.outages = sc
            .outage
            .iter()
            .map(|&(az, at, d)| Outage {
                az: c.azs[az].clone(),
                start: Duration::from_secs(at),
                end: Duration::from_secs(at + d),
            })
            .collect();
        let sim = SimFleet::new(c);
        let outage = sc.outage.map_or(0, |(_, _, d)| d);
        let s = RolloutSpec {
            target_image: NEW.into(),
            max_surge: sc.surge,
            min_healthy: sc.floor,
            warmup: Duration::from_secs(sc.warmup),
            // Long enough for a healthy batch; a failure is caught by health.
            // An outage may hold up a batch (or a rollback) for its whole length.
            deadline: Duration::from_secs(
                outage + 4 * (sc.boot + sc.health + sc.drain + sc.warmup + 60),
            ),
            rollback_on_failure: sc.rollback,
        };
        let floor = s.floor(sc.size);
        sim.watch_floor(floor);
        let before = sim.summary();
        if let Some((n, after)) = sc.crash {
            sim.crash_at(n, after);
        }
        let r = roll_through_crashes(&sim, &s)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let st = sim.stats();
        let end = sim.summary();
        // An AZ outage takes instances out of service whatever kiln does; then
        // only kiln's own removals are held to the floor.
        prop_assert!(
            st.breaches.is_empty() || sc.outage.is_some(),
            "floor {floor} broken: {:?}",
            &st.breaches[..st.breaches.len().min(3)]
        );
        prop_assert!(st.kiln_breaches.is_empty());
        prop_assert_eq!(st.calls_per_observation.len(), 1);
        let images: Vec<&String> = end.images.keys().collect();
        match r.outcome {
            Outcome::Succeeded => prop_assert_eq!(images, vec![NEW]),
            Outcome::RolledBack => prop_assert_eq!(images, vec![OLD]),
            Outcome::Failed => prop_assert!(
                !sc.rollback,
                "failed although rollback was on: {:?}",
                r.reason
            ),
            Outcome::Aborted => prop_assert!(false, "nobody aborted"),
        }
        let desired = st.external_applied.unwrap_or(sc.size);
        if st.external_applied.is_some() {
            prop_assert_eq!(r.external_change.map(|e| e.to), Some(desired));
        }
        prop_assert_eq!(end.desired, desired);
        prop_assert_eq!(end.min, before.min.min(desired));
        prop_assert_eq!(end.max, before.max.max(desired));
        prop_assert_eq!(&end.suspended, &before.suspended);
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(64),
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_rollouts_keep_the_floor_end_uniform_and_restore(sc in scenario()) {
        run_scenario(&sc)?;
    }
}

/// The benchmark's question in miniature: with AWS-like timings (boot 90 s, health
/// 30 s, drain 30 s) and a 1 s poll, a 25% surge rollout takes at most 5% longer
/// than the ideal batches × (boot + health + drain).
#[tokio::test(start_paused = true)]
async fn rollout_time_is_close_to_the_ideal_schedule() {
    for size in [10u32, 100, 1000] {
        let mut c = SimConfig::new(size, 3);
        c.drain = Duration::from_secs(30);
        let sim = SimFleet::new(c);
        let mut s = spec(NEW);
        s.warmup = Duration::ZERO;
        let stored = start(&sim, &s, 1).await.unwrap();
        let t0 = tokio::time::Instant::now();
        let fast = EngineConfig {
            poll_interval: Duration::from_secs(1),
            max_cycles: Some(100_000),
        };
        let r = engine::drive(&sim, &sim, stored, &fast, &mut ())
            .await
            .unwrap();
        let took = t0.elapsed().as_secs_f64();
        let batches = size.div_ceil(size.div_ceil(4));
        let ideal = f64::from(batches) * (90.0 + 30.0 + 30.0);
        assert_eq!(r.outcome, Outcome::Succeeded);
        assert!(
            took <= ideal * 1.05,
            "size {size}: {took} s against ideal {ideal} s"
        );
        // Observation cost depends only on DescribeInstances pages of 1000.
        let costs = sim.stats().calls_per_observation;
        eprintln!(
            "size {size}: {took} s virtual, ideal {ideal} s, calls per observation {costs:?}"
        );
        assert!(costs.len() <= 2, "size {size}: {costs:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn status_shows_phase_counts_per_az_next_step_and_holder() {
    let sim = SimFleet::new(SimConfig::new(6, 3));
    let st = kiln::rollout::status::status(&sim, &sim, "web-prod")
        .await
        .unwrap();
    assert!(st.rollout.is_none());
    assert_eq!(st.per_az.values().map(|c| c.new).sum::<u32>(), 6);
    // Killed during the first batch.
    sim.crash_at(8, false);
    assert!(roll(&sim, &spec(NEW), 1).await.is_err());
    let st = kiln::rollout::status::status(&sim, &sim, "web-prod")
        .await
        .unwrap();
    let r = st.rollout.as_ref().expect("in progress");
    assert_eq!(r.phase, Phase::Rolling);
    assert_eq!(st.lock_holder, Some(holder(1)));
    assert_eq!(st.per_az.values().map(|c| c.old).sum::<u32>(), 6);
    assert!(!st.is_failing_or_stuck());
    assert!(
        r.next.starts_with("waiting") || r.next.starts_with("next"),
        "{}",
        r.next
    );
    // Long after, nobody resumed: stuck.
    sim.run_for(Duration::from_secs(3600)).await;
    let st = kiln::rollout::status::status(&sim, &sim, "web-prod")
        .await
        .unwrap();
    assert!(st.is_failing_or_stuck(), "{st:?}");
}
