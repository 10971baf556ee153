#!/usr/bin/env bash
# Reliability trials (issue 5): API faults, SIGKILL + recovery, capacity floor,
# against moto through the fault proxy. Prints the table that goes into
# RELIABILITY.md.
#
#   bench/faults.sh --seed 1 [--jobs 4] [--only PATTERN]
#
# --only picks trials by test name (e.g. trial_sigkill_rollouts); to replay
# single runs of a trial set KILN_FAULTS_ONLY=3,34 as well.
#
# Every random choice (which calls fail, when kiln is killed, re-run or abort)
# comes from the seed: the same seed replays the same trials. The trials are the
# ignored tests `faults::trial_*` of the one test binary; the suite runs a smoke
# version of each. Needs moto_server on PATH (pip install 'moto[server]').
set -euo pipefail
cd "$(dirname "$0")/.."

seed=1
jobs=4
only=trial_
while [ $# -gt 0 ]; do
  case "$1" in
    --seed) seed=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "bench/faults.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done

# Build once, then run private copies of the test binary and of kiln: the cargo
# target folder may be shared with other checkouts whose builds replace them.
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
# The full log (every failed run's details) outlives the script.
log=${TMPDIR:-/tmp}/kiln-faults-seed$seed.log
cargo test --test tests --no-run --message-format=json 2>/dev/null | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        name = m["target"]["name"]
        if name in ("tests", "kiln"):
            shutil.copy(m["executable"], sys.argv[1] + "/" + name)
' "$bin"
if [ ! -x "$bin/tests" ] || [ ! -x "$bin/kiln" ]; then
  echo "bench/faults.sh: the build failed (cargo test --test tests --no-run)" >&2
  exit 1
fi

started=$(date +%s)
set +e
KILN_BIN=$bin/kiln KILN_FAULTS_SEED=$seed KILN_FAULTS_JOBS=$jobs \
  "$bin/tests" "faults::$only" --ignored --nocapture --test-threads 1 >"$log" 2>&1
status=$?
set -e
elapsed=$(( $(date +%s) - started ))

echo "seed $seed, $jobs runs in parallel, ${elapsed}s wall"
echo
echo "| trial | runs | faults injected | same end state | lost | leaked | floor violations | lowest healthy in service | time |"
echo "|---|---:|---:|---:|---:|---:|---:|---|---:|"
grep -o 'TRIAL|.*' "$log" | awk -F'|' '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $2, $3, $4, $5, $6, $7, $8, $9, $10 }'
if [ $status -ne 0 ]; then
  echo
  echo "some trials failed:"
  grep -E "(^---- |run [0-9]+ |^thread '|^test result)" "$log" | head -60
  echo "full log: $log"
  exit $status
fi
