#!/usr/bin/env bash
# Rollout benchmarks (issue 3): prints the tables that go into BENCHMARKS.md.
#
#   bench/rollout.sh
#
# 1. Simulator, virtual time, AWS-like timings (boot 90 s, health 30 s, drain
#    30 s), 10/100/1000 instances at 25% surge: total time against the ideal
#    schedule, batches × (boot + health + drain) (goal ≤ 1.05×), and API calls per
#    observation cycle (goal: constant).
# 2. moto: a 30-instance rollout through the counting proxy, wall time and API
#    calls (the ignored test `rollout::bench_thirty_instance_rollout`).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "## simulator (virtual time)"
cargo run --quiet --example rollout_bench

echo
echo "## moto: 30 instances, 25% surge, --poll 50ms --warmup 0s"
cargo test --quiet --test tests rollout::bench_thirty_instance_rollout -- --ignored --nocapture 2>&1 \
  | grep '^BENCH'
