//! A simulated fleet on virtual time: an in-memory ASG, its instances, target
//! groups and the journal store, behind the same [`Fleet`] and [`JournalStore`]
//! traits as the AWS adapter.
//!
//! Lives in the library (not under `tests/`) so `bench/rollout.sh` can drive it from
//! a binary too. Time is tokio's clock: under `tokio::time::pause` (or
//! `#[tokio::test(start_paused = true)]`) a rollout of hours runs in milliseconds.
//!
//! The ASG behaves like AWS's where a rollout can tell: when desired exceeds the
//! live instances it launches from the current launch template version into the AZ
//! with the fewest instances (skipping AZs in an outage); it replaces an instance
//! the ASG marked unhealthy (unless `ReplaceUnhealthy` is suspended); scale-in
//! terminates from the AZ with the most instances, oldest template version, oldest
//! first; a terminating instance drains from its target groups first. Faults:
//! new instances failing their health check, AZ outages, an external actor setting
//! desired capacity, and crashes before or after any mutating call.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::engine::{Fleet, JournalStore, Revision, Stored};
use super::model::*;
use super::plan::observation_calls;
use super::{Result, RolloutError};

/// An AZ outage: its instances fail health checks and nothing launches there.
#[derive(Clone, Debug)]
pub struct Outage {
    pub az: String,
    /// From the start of the simulation.
    pub start: Duration,
    pub end: Duration,
}

/// Someone else scaling out (desired + `add`, raising max if needed) while a
/// rollout holds the lock, like an operator or an autoscaler kiln did not suspend.
#[derive(Clone, Debug)]
pub struct ExternalScale {
    pub at: Duration,
    pub add: u32,
}

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub asg: String,
    pub azs: Vec<String>,
    pub min: u32,
    pub max: u32,
    pub desired: u32,
    /// The image the group runs at the start (launch template version 1).
    pub image: String,
    pub target_groups: usize,
    /// Processes suspended before any rollout.
    pub suspended: BTreeSet<String>,
    /// Launch to InService (registered in target groups as `initial`).
    pub boot: Duration,
    /// Registration to the first target health verdict.
    pub health: Duration,
    /// Deregistration delay.
    pub drain: Duration,
    /// Terminating to gone.
    pub shutdown: Duration,
    pub health_check_grace: Duration,
    /// Probability that an instance launched with another image than `image`
    /// fails its health check (and is then marked unhealthy by the ASG after the
    /// grace period, and replaced).
    pub failure_rate: f64,
    pub outages: Vec<Outage>,
    pub external_scale: Option<ExternalScale>,
    pub seed: u64,
}

impl SimConfig {
    /// A group of `desired` instances over `azs` AZs with AWS-like timings.
    pub fn new(desired: u32, azs: usize) -> Self {
        SimConfig {
            asg: "web-prod".into(),
            azs: (0..azs.max(1))
                .map(|i| format!("eu-west-1{}", (b'a' + i as u8) as char))
                .collect(),
            min: desired.min(1),
            max: desired,
            desired,
            image: "ami-00000000000000001".into(),
            target_groups: 1,
            suspended: BTreeSet::new(),
            boot: Duration::from_secs(90),
            health: Duration::from_secs(30),
            drain: Duration::from_secs(30),
            shutdown: Duration::from_secs(20),
            health_check_grace: Duration::from_secs(300),
            failure_rate: 0.0,
            outages: vec![],
            external_scale: None,
            seed: 1,
        }
    }
}

#[derive(Clone, Debug)]
struct SimInstance {
    id: String,
    az: String,
    image: String,
    version: u64,
    launched_at: Timestamp,
    lifecycle: Lifecycle,
    ec2: Ec2State,
    asg_healthy: bool,
    /// Same state in every target group; `None`: not registered.
    tg: Option<TargetHealth>,
    will_fail: bool,
}

impl SimInstance {
    fn live(&self) -> bool {
        matches!(self.lifecycle, Lifecycle::Pending | Lifecycle::InService)
    }
}

#[derive(Clone, Debug)]
enum Ev {
    Boot(String),
    Health(String),
    AsgCheck(String),
    DrainDone(String),
    Gone(String),
    External(u32),
    OutageStart(String),
    OutageEnd(String),
}

/// A moment the healthy in-service count was below the floor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FloorBreach {
    pub at: Timestamp,
    pub serving: u32,
    pub floor: u32,
    pub cause: String,
}

/// What the simulation saw, for assertions and benchmarks.
#[derive(Clone, Debug, Default)]
pub struct SimStats {
    pub observations: u64,
    /// Modelled AWS API calls: observation calls plus mutating calls.
    pub api_calls: u64,
    /// Distinct per-cycle observation costs seen (constant: one value per size).
    pub calls_per_observation: BTreeSet<u64>,
    pub launched: u64,
    pub min_serving: Option<u32>,
    /// Samples (after every event and action) below the watched floor.
    pub breaches: Vec<FloorBreach>,
    /// Kiln's own deregistrations/terminations that took the count below the floor.
    pub kiln_breaches: Vec<FloorBreach>,
    /// The desired capacity the external actor set, if it acted.
    pub external_applied: Option<u32>,
    pub crashes: u64,
    /// Mutating calls so far (fleet mutations and journal saves), the unit of
    /// [`SimFleet::crash_at`].
    pub mutating_calls: u64,
}

/// A summary of the group now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSummary {
    pub min: u32,
    pub max: u32,
    pub desired: u32,
    pub suspended: BTreeSet<String>,
    pub launch_template_version: u64,
    pub launch_template_versions: usize,
    /// Live instances per image.
    pub images: BTreeMap<String, u32>,
    pub serving: u32,
}

struct State {
    cfg: SimConfig,
    origin: tokio::time::Instant,
    epoch: Timestamp,
    clock: Timestamp,
    min: u32,
    max: u32,
    desired: u32,
    suspended: BTreeSet<String>,
    tgs: Vec<String>,
    lt_id: String,
    lt_version: u64,
    /// version → (image, token)
    versions: BTreeMap<u64, (String, Option<String>)>,
    instances: BTreeMap<String, SimInstance>,
    events: BTreeMap<(Timestamp, u64), Ev>,
    seq: u64,
    next_id: u64,
    rng: u64,
    outages: BTreeSet<String>,
    journal: Option<(String, u64)>,
    lock: Option<Holder>,
    floor: Option<u32>,
    crashes: BTreeMap<u64, bool>,
    mutations: u64,
    stats: SimStats,
}

/// The simulated fleet and journal store. Cheap to clone (shared state).
#[derive(Clone)]
pub struct SimFleet {
    inner: Arc<Mutex<State>>,
}

const EPOCH: Timestamp = Timestamp(1_790_000_000_000);

impl SimFleet {
    /// A group of `cfg.desired` healthy in-service instances on `cfg.image`, spread
    /// over the AZs, launched at different times in the past.
    pub fn new(cfg: SimConfig) -> Self {
        let tgs = (0..cfg.target_groups)
            .map(|i| format!("arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/web-{i}/{i:016x}"))
            .collect();
        let mut versions = BTreeMap::new();
        versions.insert(1, (cfg.image.clone(), None));
        let mut s = State {
            origin: tokio::time::Instant::now(),
            epoch: EPOCH,
            clock: EPOCH,
            min: cfg.min,
            max: cfg.max,
            desired: cfg.desired,
            suspended: cfg.suspended.clone(),
            tgs,
            lt_id: "lt-0123456789abcdef0".into(),
            lt_version: 1,
            versions,
            instances: BTreeMap::new(),
            events: BTreeMap::new(),
            seq: 0,
            next_id: 0,
            rng: cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            outages: BTreeSet::new(),
            journal: None,
            lock: None,
            floor: None,
            crashes: BTreeMap::new(),
            mutations: 0,
            stats: SimStats::default(),
            cfg,
        };
        for n in 0..s.desired {
            let az = s.cfg.azs[n as usize % s.cfg.azs.len()].clone();
            let id = s.new_id();
            // Ages vary so "oldest first" has something to choose.
            let launched_at = Timestamp(EPOCH.0 - 86_400_000 + u64::from(n) * 7_919 % 86_400_000);
            s.instances.insert(
                id.clone(),
                SimInstance {
                    id,
                    az,
                    image: s.cfg.image.clone(),
                    version: 1,
                    launched_at,
                    lifecycle: Lifecycle::InService,
                    ec2: Ec2State::Running,
                    asg_healthy: true,
                    tg: (!s.tgs.is_empty()).then_some(TargetHealth::Healthy),
                    will_fail: false,
                },
            );
        }
        for o in s.cfg.outages.clone() {
            s.schedule(EPOCH.plus(o.start), Ev::OutageStart(o.az.clone()));
            s.schedule(EPOCH.plus(o.end), Ev::OutageEnd(o.az));
        }
        if let Some(x) = s.cfg.external_scale.clone() {
            s.schedule(EPOCH.plus(x.at), Ev::External(x.add));
        }
        SimFleet {
            inner: Arc::new(Mutex::new(s)),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut s = self.inner.lock().expect("sim state poisoned");
        s.advance();
        f(&mut s)
    }

    /// Sample the healthy in-service count against `floor` after every event.
    pub fn watch_floor(&self, floor: u32) {
        self.with(|s| s.floor = Some(floor));
    }

    /// Fail the n-th mutating call from now (fleet mutations and journal saves,
    /// counted from 1), either before performing it or after (the call took effect
    /// but the caller never heard): a process killed at that point.
    pub fn crash_at(&self, nth: u64, after: bool) {
        self.with(|s| {
            let at = s.mutations + nth;
            s.crashes.insert(at, after);
        });
    }

    pub fn stats(&self) -> SimStats {
        self.with(|s| s.stats.clone())
    }

    pub fn summary(&self) -> GroupSummary {
        self.with(|s| {
            let mut images = BTreeMap::new();
            for i in s.instances.values().filter(|i| i.live()) {
                *images.entry(i.image.clone()).or_default() += 1;
            }
            GroupSummary {
                min: s.min,
                max: s.max,
                desired: s.desired,
                suspended: s.suspended.clone(),
                launch_template_version: s.lt_version,
                launch_template_versions: s.versions.len(),
                images,
                serving: s.serving(),
            }
        })
    }

    /// An observation without counting it as an API cycle (for tests).
    pub fn peek(&self) -> Observation {
        self.with(|s| s.observation())
    }

    /// Mark an instance unhealthy in the ASG, like `SetInstanceHealth`.
    pub fn set_unhealthy(&self, id: &str) {
        self.with(|s| {
            if let Some(i) = s.instances.get_mut(id) {
                i.asg_healthy = false;
            }
            s.reconcile();
        })
    }

    /// Let virtual time run until every scheduled event up to `d` from now happened.
    pub async fn run_for(&self, d: Duration) {
        tokio::time::sleep(d).await;
        self.with(|_| ());
    }
}

impl State {
    fn now(&self) -> Timestamp {
        self.epoch
            .plus(tokio::time::Instant::now().saturating_duration_since(self.origin))
    }

    fn new_id(&mut self) -> String {
        self.next_id += 1;
        format!("i-{:017x}", self.next_id)
    }

    fn random(&mut self) -> f64 {
        // splitmix64: deterministic per seed, no dependency.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    fn schedule(&mut self, at: Timestamp, ev: Ev) {
        self.seq += 1;
        self.events.insert((at, self.seq), ev);
    }

    fn advance(&mut self) {
        let now = self.now();
        while let Some((&(at, seq), _)) = self.events.first_key_value() {
            if at > now {
                break;
            }
            let ev = self.events.remove(&(at, seq)).expect("just seen");
            self.clock = at;
            let cause = format!("{ev:?}");
            self.apply(ev);
            self.reconcile();
            self.sample(&cause);
        }
        self.clock = now;
    }

    fn serving_instance(&self, i: &SimInstance) -> bool {
        i.lifecycle == Lifecycle::InService
            && i.ec2 == Ec2State::Running
            && i.asg_healthy
            && (self.tgs.is_empty() || i.tg == Some(TargetHealth::Healthy))
    }

    fn serving(&self) -> u32 {
        self.instances
            .values()
            .filter(|i| self.serving_instance(i))
            .count() as u32
    }

    fn sample(&mut self, cause: &str) {
        let serving = self.serving();
        self.stats.min_serving = Some(self.stats.min_serving.map_or(serving, |m| m.min(serving)));
        if let Some(floor) = self.floor {
            if serving < floor {
                let b = FloorBreach {
                    at: self.clock,
                    serving,
                    floor,
                    cause: cause.to_string(),
                };
                self.stats.breaches.push(b);
            }
        }
    }

    fn registered(&self, i: &SimInstance) -> bool {
        matches!(
            i.tg,
            Some(TargetHealth::Initial | TargetHealth::Healthy | TargetHealth::Unhealthy)
        )
    }

    fn apply(&mut self, ev: Ev) {
        let clock = self.clock;
        match ev {
            Ev::Boot(id) => {
                let has_tgs = !self.tgs.is_empty();
                let health = self.cfg.health;
                if let Some(i) = self
                    .instances
                    .get_mut(&id)
                    .filter(|i| i.lifecycle == Lifecycle::Pending)
                {
                    i.lifecycle = Lifecycle::InService;
                    i.ec2 = Ec2State::Running;
                    if has_tgs {
                        i.tg = Some(TargetHealth::Initial);
                    }
                    self.schedule(clock.plus(health), Ev::Health(id));
                }
            }
            Ev::Health(id) => {
                let Some(i) = self.instances.get(&id) else {
                    return;
                };
                if !i.live() || (!self.tgs.is_empty() && !self.registered(i)) {
                    return;
                }
                let bad = i.will_fail || self.outages.contains(&i.az);
                let check_at = i.launched_at.plus(self.cfg.health_check_grace).max(clock);
                let has_tgs = !self.tgs.is_empty();
                let i = self.instances.get_mut(&id).expect("present");
                if has_tgs {
                    i.tg = Some(if bad {
                        TargetHealth::Unhealthy
                    } else {
                        TargetHealth::Healthy
                    });
                }
                if bad {
                    self.schedule(check_at, Ev::AsgCheck(id));
                } else {
                    i.asg_healthy = true;
                }
            }
            Ev::AsgCheck(id) => {
                let outages = &self.outages;
                if let Some(i) = self.instances.get_mut(&id) {
                    if i.live() && (i.will_fail || outages.contains(&i.az)) {
                        i.asg_healthy = false;
                    }
                }
            }
            Ev::DrainDone(id) => {
                if let Some(i) = self.instances.get_mut(&id) {
                    if i.tg == Some(TargetHealth::Draining) {
                        i.tg = None;
                    }
                }
            }
            Ev::Gone(id) => {
                self.instances.remove(&id);
            }
            Ev::External(add) => {
                // Only while a rollout holds the lock: that is the case under test.
                if self.lock.is_some() && add > 0 {
                    self.desired += add;
                    self.max = self.max.max(self.desired);
                    self.stats.external_applied = Some(self.desired);
                }
            }
            Ev::OutageStart(az) => {
                self.outages.insert(az.clone());
                let ids: Vec<String> = self
                    .instances
                    .values()
                    .filter(|i| i.live() && i.az == az)
                    .map(|i| i.id.clone())
                    .collect();
                for id in ids {
                    let i = self.instances.get_mut(&id).expect("present");
                    if matches!(i.tg, Some(TargetHealth::Initial | TargetHealth::Healthy)) {
                        i.tg = Some(TargetHealth::Unhealthy);
                    }
                    self.schedule(clock.plus(Duration::from_secs(10)), Ev::AsgCheck(id));
                }
            }
            Ev::OutageEnd(az) => {
                self.outages.remove(&az);
                let ids: Vec<String> = self
                    .instances
                    .values()
                    .filter(|i| i.live() && i.az == az)
                    .map(|i| i.id.clone())
                    .collect();
                for id in ids {
                    self.schedule(clock.plus(self.cfg.health), Ev::Health(id));
                }
            }
        }
    }

    /// The ASG's own behaviour after any change.
    fn reconcile(&mut self) {
        let clock = self.clock;
        if !self.suspended.contains("ReplaceUnhealthy") {
            let sick: Vec<String> = self
                .instances
                .values()
                .filter(|i| i.live() && !i.asg_healthy)
                .map(|i| i.id.clone())
                .collect();
            for id in sick {
                self.begin_terminate(&id);
            }
        }
        let live = self.instances.values().filter(|i| i.live()).count() as u32;
        if live < self.desired && !self.suspended.contains("Launch") {
            for _ in live..self.desired {
                let mut per_az: BTreeMap<&str, usize> =
                    self.cfg.azs.iter().map(|a| (a.as_str(), 0)).collect();
                for i in self.instances.values().filter(|i| i.live()) {
                    if let Some(n) = per_az.get_mut(i.az.as_str()) {
                        *n += 1;
                    }
                }
                let Some(az) = self
                    .cfg
                    .azs
                    .iter()
                    .filter(|a| !self.outages.contains(*a))
                    .min_by_key(|a| per_az[a.as_str()])
                    .cloned()
                else {
                    break; // every AZ is out: AWS fails the launch and retries later
                };
                let id = self.new_id();
                let (image, _) = self.versions[&self.lt_version].clone();
                let will_fail = image != self.cfg.image && self.random() < self.cfg.failure_rate;
                self.instances.insert(
                    id.clone(),
                    SimInstance {
                        id: id.clone(),
                        az,
                        image,
                        version: self.lt_version,
                        launched_at: clock,
                        lifecycle: Lifecycle::Pending,
                        ec2: Ec2State::Pending,
                        asg_healthy: true,
                        tg: None,
                        will_fail,
                    },
                );
                self.stats.launched += 1;
                self.schedule(clock.plus(self.cfg.boot), Ev::Boot(id));
            }
        } else if live > self.desired && !self.suspended.contains("Terminate") {
            for _ in self.desired..live {
                let mut per_az: BTreeMap<String, usize> = BTreeMap::new();
                for i in self.instances.values().filter(|i| i.live()) {
                    *per_az.entry(i.az.clone()).or_default() += 1;
                }
                let victim = self
                    .instances
                    .values()
                    .filter(|i| i.live())
                    .min_by_key(|i| (std::cmp::Reverse(per_az[&i.az]), i.version, i.launched_at))
                    .map(|i| i.id.clone());
                if let Some(id) = victim {
                    self.begin_terminate(&id);
                }
            }
        }
    }

    fn begin_terminate(&mut self, id: &str) {
        let clock = self.clock;
        let (drain, shutdown) = (self.cfg.drain, self.cfg.shutdown);
        let Some(i) = self.instances.get_mut(id) else {
            return;
        };
        if !i.live() {
            return;
        }
        i.lifecycle = Lifecycle::Terminating;
        let registered = matches!(
            i.tg,
            Some(TargetHealth::Initial | TargetHealth::Healthy | TargetHealth::Unhealthy)
        );
        let draining = registered || i.tg == Some(TargetHealth::Draining);
        if registered {
            i.tg = Some(TargetHealth::Draining);
        }
        let at = clock
            .plus(if draining { drain } else { Duration::ZERO })
            .plus(shutdown);
        if draining {
            self.schedule(clock.plus(drain), Ev::DrainDone(id.to_string()));
        }
        self.schedule(at, Ev::Gone(id.to_string()));
    }

    fn observation(&self) -> Observation {
        let instances = self
            .instances
            .values()
            .map(|i| Instance {
                id: i.id.clone(),
                az: i.az.clone(),
                lifecycle: i.lifecycle,
                ec2_state: if i.lifecycle == Lifecycle::Terminating {
                    Ec2State::ShuttingDown
                } else {
                    i.ec2
                },
                healthy: i.asg_healthy,
                image_id: i.image.clone(),
                launch_template_version: Some(i.version),
                launched_at: i.launched_at,
                protected_from_scale_in: false,
            })
            .collect();
        let mut target_health = BTreeMap::new();
        for tg in &self.tgs {
            let m: BTreeMap<String, TargetHealth> = self
                .instances
                .values()
                .filter_map(|i| i.tg.map(|t| (i.id.clone(), t)))
                .collect();
            target_health.insert(tg.clone(), m);
        }
        Observation {
            now: self.clock,
            group: GroupState {
                name: self.cfg.asg.clone(),
                min: self.min,
                max: self.max,
                desired: self.desired,
                launch: LaunchSource::Template {
                    id: self.lt_id.clone(),
                    version: self.lt_version,
                    image_id: self.versions[&self.lt_version].0.clone(),
                    mixed_instances_policy: false,
                },
                suspended: self.suspended.clone(),
                target_groups: self.tgs.clone(),
                health_check_grace: self.cfg.health_check_grace,
            },
            instances,
            target_health,
        }
    }

    /// Count a mutating call and decide whether it crashes: `Some(true)` perform
    /// then fail, `Some(false)` fail without performing.
    fn crash_point(&mut self) -> Option<bool> {
        self.mutations += 1;
        self.stats.mutating_calls = self.mutations;
        let c = self.crashes.remove(&self.mutations);
        if c.is_some() {
            self.stats.crashes += 1;
        }
        c
    }

    fn crashed(&self, op: &str) -> RolloutError {
        RolloutError::Fleet {
            asg: self.cfg.asg.clone(),
            operation: op.to_string(),
            source: "simulated crash (process killed)".into(),
        }
    }

    fn check_asg(&self, asg: &str) -> Result<()> {
        if asg == self.cfg.asg {
            Ok(())
        } else {
            Err(RolloutError::GroupNotFound {
                asg: asg.to_string(),
            })
        }
    }

    /// Run a mutation with crash injection and API call accounting.
    fn mutate<T>(
        &mut self,
        op: &str,
        calls: u64,
        f: impl FnOnce(&mut State) -> Result<T>,
    ) -> Result<T> {
        let crash = self.crash_point();
        if crash == Some(false) {
            return Err(self.crashed(op));
        }
        self.stats.api_calls += calls;
        let r = f(self);
        self.reconcile();
        self.sample(op);
        match crash {
            Some(true) => Err(self.crashed(op)),
            _ => r,
        }
    }

    fn kiln_removal(&mut self, before: u32, what: &str) {
        let after = self.serving();
        if let Some(floor) = self.floor {
            if after < floor && after < before {
                let b = FloorBreach {
                    at: self.clock,
                    serving: after,
                    floor,
                    cause: what.to_string(),
                };
                self.stats.kiln_breaches.push(b);
            }
        }
    }
}

fn validation(asg: &str, op: &str, msg: String) -> RolloutError {
    RolloutError::Fleet {
        asg: asg.to_string(),
        operation: op.to_string(),
        source: msg.into(),
    }
}

impl Fleet for SimFleet {
    async fn observe(&self, asg: &str) -> Result<Observation> {
        self.with(|s| {
            s.check_asg(asg)?;
            let calls = observation_calls(s.instances.len(), s.tgs.len());
            s.stats.observations += 1;
            s.stats.api_calls += calls;
            s.stats.calls_per_observation.insert(calls);
            Ok(s.observation())
        })
    }

    async fn suspend_processes(&self, asg: &str, processes: &[String]) -> Result<()> {
        self.with(|s| {
            s.check_asg(asg)?;
            s.mutate("SuspendProcesses", 1, |s| {
                s.suspended.extend(processes.iter().cloned());
                Ok(())
            })
        })
    }

    async fn resume_processes(&self, asg: &str, processes: &[String]) -> Result<()> {
        self.with(|s| {
            s.check_asg(asg)?;
            s.mutate("ResumeProcesses", 1, |s| {
                for p in processes {
                    s.suspended.remove(p);
                }
                Ok(())
            })
        })
    }

    async fn create_launch_template_version(
        &self,
        template_id: &str,
        from_version: u64,
        image_id: &str,
        token: &str,
    ) -> Result<u64> {
        self.with(|s| {
            s.mutate("CreateLaunchTemplateVersion", 2, |s| {
                if template_id != s.lt_id || !s.versions.contains_key(&from_version) {
                    return Err(validation(
                        &s.cfg.asg,
                        "CreateLaunchTemplateVersion",
                        format!("{template_id} has no version {from_version}"),
                    ));
                }
                if let Some((v, _)) = s
                    .versions
                    .iter()
                    .find(|(_, (_, t))| t.as_deref() == Some(token))
                {
                    return Ok(*v);
                }
                let v = s.versions.keys().max().copied().unwrap_or(0) + 1;
                s.versions
                    .insert(v, (image_id.to_string(), Some(token.to_string())));
                Ok(v)
            })
        })
    }

    async fn point_asg(
        &self,
        asg: &str,
        template_id: &str,
        version: u64,
        _mixed: bool,
    ) -> Result<()> {
        self.with(|s| {
            s.check_asg(asg)?;
            s.mutate("UpdateAutoScalingGroup", 1, |s| {
                if template_id != s.lt_id || !s.versions.contains_key(&version) {
                    return Err(validation(
                        asg,
                        "UpdateAutoScalingGroup",
                        format!("no version {version}"),
                    ));
                }
                s.lt_version = version;
                Ok(())
            })
        })
    }

    async fn set_capacity(
        &self,
        asg: &str,
        min: Option<u32>,
        max: u32,
        desired: u32,
    ) -> Result<()> {
        self.with(|s| {
            s.check_asg(asg)?;
            s.mutate("UpdateAutoScalingGroup", 1, |s| {
                let min = min.unwrap_or(s.min);
                if !(min <= desired && desired <= max) {
                    return Err(validation(
                        asg,
                        "UpdateAutoScalingGroup",
                        format!("desired {desired} outside min {min} .. max {max}"),
                    ));
                }
                (s.min, s.max, s.desired) = (min, max, desired);
                Ok(())
            })
        })
    }

    async fn deregister(&self, target_groups: &[String], instances: &[String]) -> Result<()> {
        self.with(|s| {
            s.mutate("DeregisterTargets", target_groups.len() as u64, |s| {
                let before = s.serving();
                let clock = s.clock;
                let drain = s.cfg.drain;
                for id in instances {
                    let Some(i) = s.instances.get_mut(id) else {
                        continue;
                    };
                    if matches!(
                        i.tg,
                        Some(
                            TargetHealth::Initial | TargetHealth::Healthy | TargetHealth::Unhealthy
                        )
                    ) {
                        i.tg = Some(TargetHealth::Draining);
                        s.schedule(clock.plus(drain), Ev::DrainDone(id.clone()));
                    }
                }
                s.kiln_removal(before, "kiln deregistered");
                Ok(())
            })
        })
    }

    async fn register(&self, target_groups: &[String], instances: &[String]) -> Result<()> {
        self.with(|s| {
            s.mutate("RegisterTargets", target_groups.len() as u64, |s| {
                let clock = s.clock;
                let health = s.cfg.health;
                for id in instances {
                    let Some(i) = s.instances.get_mut(id) else {
                        continue;
                    };
                    if i.live()
                        && !matches!(i.tg, Some(TargetHealth::Initial | TargetHealth::Healthy))
                    {
                        i.tg = Some(TargetHealth::Initial);
                        s.schedule(clock.plus(health), Ev::Health(id.clone()));
                    }
                }
                Ok(())
            })
        })
    }

    async fn terminate(
        &self,
        asg: &str,
        instances: &[String],
        decrement_desired: bool,
    ) -> Result<()> {
        self.with(|s| {
            s.check_asg(asg)?;
            s.mutate(
                "TerminateInstanceInAutoScalingGroup",
                instances.len() as u64,
                |s| {
                    let before = s.serving();
                    for id in instances {
                        let live = s.instances.get(id).is_some_and(|i| i.live());
                        if !live {
                            continue;
                        }
                        if decrement_desired {
                            if s.desired == s.min {
                                return Err(validation(
                                    asg,
                                    "TerminateInstanceInAutoScalingGroup",
                                    format!(
                                        "terminating {id} would take desired below min {}",
                                        s.min
                                    ),
                                ));
                            }
                            s.desired -= 1;
                        }
                        s.begin_terminate(id);
                    }
                    s.kiln_removal(before, "kiln terminated");
                    Ok(())
                },
            )
        })
    }
}

impl JournalStore for SimFleet {
    async fn load(&self, asg: &str) -> Result<Option<Stored>> {
        self.with(|s| {
            s.check_asg(asg)?;
            s.journal
                .as_ref()
                .map(|(json, rev)| {
                    let journal =
                        serde_json::from_str(json).map_err(|e| RolloutError::Journal {
                            asg: asg.to_string(),
                            message: e.to_string(),
                        })?;
                    Ok(Stored {
                        revision: Revision(rev.to_string()),
                        journal,
                    })
                })
                .transpose()
        })
    }

    async fn save(
        &self,
        asg: &str,
        journal: &Journal,
        expected: Option<&Revision>,
    ) -> Result<Revision> {
        self.with(|s| {
            s.check_asg(asg)?;
            s.mutate("PutJournal", 1, |s| {
                let current = s.journal.as_ref().map(|(_, r)| Revision(r.to_string()));
                if current.as_ref() != expected {
                    let holder = s
                        .lock
                        .as_ref()
                        .map_or("nobody".to_string(), |h| h.to_string());
                    return Err(RolloutError::LockLost {
                        asg: asg.to_string(),
                        holder,
                    });
                }
                let json = serde_json::to_string(journal).map_err(|e| RolloutError::Journal {
                    asg: asg.to_string(),
                    message: e.to_string(),
                })?;
                let rev = s.journal.as_ref().map_or(1, |(_, r)| r + 1);
                s.journal = Some((json, rev));
                Ok(Revision(rev.to_string()))
            })
        })
    }

    async fn acquire(&self, asg: &str, holder: &Holder, replace: Option<&Holder>) -> Result<()> {
        self.with(|s| {
            s.check_asg(asg)?;
            match &s.lock {
                None => {}
                Some(h) if h == holder => {}
                Some(h) if Some(h) == replace => {}
                Some(h) => {
                    return Err(RolloutError::Locked {
                        asg: asg.to_string(),
                        holder: h.clone(),
                    })
                }
            }
            s.lock = Some(holder.clone());
            Ok(())
        })
    }

    async fn release(&self, asg: &str, holder: &Holder) -> Result<()> {
        self.with(|s| {
            s.check_asg(asg)?;
            if s.lock.as_ref() == Some(holder) {
                s.lock = None;
            }
            Ok(())
        })
    }

    async fn holder(&self, asg: &str) -> Result<Option<Holder>> {
        self.with(|s| {
            s.check_asg(asg)?;
            Ok(s.lock.clone())
        })
    }
}
