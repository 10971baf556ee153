//! Rollout figures in the simulator (run by `bench/rollout.sh`): for 10, 100 and
//! 1000 instances at 25% surge with AWS-like timings (boot 90 s, health 30 s,
//! drain 30 s), the virtual time of a whole rollout against the ideal schedule
//! (batches × (boot + health + drain)) and the API calls one observation cycle
//! costs the AWS adapter. Virtual time: runs in well under a second per size.

use std::time::Duration;

use kiln::rollout::engine::{self, EngineConfig, StartRequest};
use kiln::rollout::model::{Amount, Holder, Outcome, RolloutSpec, Timestamp};
use kiln::rollout::sim::{SimConfig, SimFleet};

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    println!("| instances | batches | ideal | kiln (virtual) | ratio | observations | API calls per observation | API calls total |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for size in [10u32, 100, 1000] {
        rt.block_on(run(size));
    }
}

async fn run(size: u32) {
    let mut cfg = SimConfig::new(size, 3);
    cfg.boot = Duration::from_secs(90);
    cfg.health = Duration::from_secs(30);
    cfg.drain = Duration::from_secs(30);
    let sim = SimFleet::new(cfg.clone());
    let spec = RolloutSpec {
        target_image: "ami-00000000000000002".into(),
        max_surge: Amount::Percent(25),
        min_healthy: Amount::Percent(100),
        warmup: Duration::ZERO,
        deadline: Duration::from_secs(15 * 60),
        rollback_on_failure: true,
    };
    let holder = Holder {
        who: "bench".into(),
        host: "bench".into(),
        pid: 1,
        started: Timestamp(0),
    };
    let req = StartRequest {
        asg: cfg.asg.clone(),
        spec: spec.clone(),
        holder,
        rollout_id: "bench".into(),
    };
    let engine_cfg = EngineConfig {
        poll_interval: Duration::from_secs(5),
        max_cycles: Some(1_000_000),
    };
    let t0 = tokio::time::Instant::now();
    let stored = engine::start(&sim, &sim, req, |_| false)
        .await
        .expect("start");
    let report = engine::drive(&sim, &sim, stored, &engine_cfg, &mut ())
        .await
        .expect("rollout");
    let took = t0.elapsed();
    assert_eq!(report.outcome, Outcome::Succeeded);
    let surge = spec.surge(size);
    let batches = size.div_ceil(surge);
    let ideal = (cfg.boot + cfg.health + cfg.drain) * batches;
    let stats = sim.stats();
    let per_obs: Vec<String> = stats
        .calls_per_observation
        .iter()
        .map(u64::to_string)
        .collect();
    println!(
        "| {size} | {batches} | {}s | {}s | {:.3}× | {} | {} | {} |",
        ideal.as_secs(),
        took.as_secs(),
        took.as_secs_f64() / ideal.as_secs_f64(),
        stats.observations,
        per_obs.join(", "),
        stats.api_calls
    );
}
