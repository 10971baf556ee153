#!/usr/bin/env bash
# Bake benchmark: kiln (full bake and cache-hit bake) beside HashiCorp Packer's
# amazon-ebs builder (communicator none) baking from the same base AMI, against
# one warm moto. Prints wall time (median of 5) and AWS API calls per bake,
# counted with moto's request recorder.
#
# Needs: moto_server (pip install 'moto[server]'), python3 with boto3 (comes with
# moto), packer (Debian package `packer`; skipped with a note when absent), and
# cargo. kiln is measured as an operator runs it: a release build (what
# `cargo install` makes), built here first; Packer's binary is a release build too.
# KILN=path measures another kiln binary instead (and skips the build).
#
#   bench/bake.sh            # writes the table to stdout
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z ${KILN:-} ]]; then
    (cd "$root" && cargo build --release --locked --quiet)
fi
kiln=${KILN:-${CARGO_TARGET_DIR:-$root/target}/release/kiln}
runs=${RUNS:-5}
[[ -x $kiln ]] || { echo "no kiln binary at $kiln: run cargo build --release or set KILN" >&2; exit 1; }

work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
endpoint="http://127.0.0.1:$port"
MOTO_ENABLE_RECORDING=True MOTO_RECORDER_FILEPATH="$work/recording" \
    MOTO_AMIS_PATH="$root/tests/support/amis.json" \
    moto_server -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
moto_pid=$!
trap 'kill $moto_pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do curl -fs "$endpoint/moto-api/" >/dev/null 2>&1 && break; sleep 0.2; done

export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1
export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_EC2_METADATA_DISABLED=true

subnet=$(python3 - "$endpoint" <<'PY'
import sys, boto3
kw = dict(endpoint_url=sys.argv[1], region_name="us-east-1")
boto3.client("s3", **kw).create_bucket(Bucket="kiln-bench")
boto3.client("iam", **kw).create_instance_profile(InstanceProfileName="kiln-bench")
print(boto3.client("ec2", **kw).describe_subnets()["Subnets"][0]["SubnetId"])
PY
)
base=ami-0f6b3c9d25e4a5c33 # newest trusty in tests/support/amis.json: what kiln resolves

proj="$work/project"
mkdir -p "$proj/images"
cp -r "$root/templates" "$proj/"
cat >"$proj/kiln.toml" <<TOML
region = "us-east-1"
[bake]
bucket = "kiln-bench"
subnet = "$subnet"
instance_profile = "kiln-bench"
TOML

recorder() { curl -fs -X POST "$endpoint/moto-api/recorder/$1" >/dev/null; }
# Runs "$@" with the recorder on; prints "seconds calls".
measure() {
    recorder reset-recording
    recorder start-recording
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >"$work/out.log" 2>&1 || { cat "$work/out.log" >&2; exit 1; }
    t1=$(date +%s.%N)
    recorder stop-recording
    local calls
    calls=$(curl -fs "$endpoint/moto-api/recorder/download-recording" | grep -c . || true)
    echo "$(echo "$t1 - $t0" | bc) $calls"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -A secs calls
bench() { # NAME COMMAND...
    local name=$1 out
    shift
    : >"$work/$name"
    for i in $(seq "$runs"); do
        out=$(measure "$@" "$i")
        echo "$out" >>"$work/$name"
    done
    secs[$name]=$(cut -d' ' -f1 "$work/$name" | median)
    calls[$name]=$(cut -d' ' -f2 "$work/$name" | median)
}

# A full bake: a new image name each run, so nothing is reused.
kiln_full() { cp -r "$root/images/web" "$proj/images/bench$1"; (cd "$proj" && AWS_ENDPOINT_URL=$endpoint "$kiln" bake "bench$1"); }
# A cache hit: the first run's image again.
kiln_hit() { (cd "$proj" && AWS_ENDPOINT_URL=$endpoint "$kiln" bake bench1); }

bench kiln-full kiln_full
bench kiln-hit kiln_hit

if command -v packer >/dev/null; then
    cat >"$work/packer.json" <<JSON
{"builders": [{"type": "amazon-ebs", "region": "us-east-1", "source_ami": "$base",
  "instance_type": "t2.small", "ami_name": "packer-bench-{{timestamp}}-{{uuid}}",
  "communicator": "none", "custom_endpoint_ec2": "$endpoint",
  "skip_region_validation": true, "skip_credential_validation": true}]}
JSON
    packer_build() { packer build -machine-readable "$work/packer.json"; }
    bench packer packer_build
    packer_version=$(packer version | head -1)
else
    packer_version="packer not installed (Debian package packer)"
fi

echo "| bake | wall time, median of $runs | AWS API calls |"
echo "| --- | --- | --- |"
for name in kiln-full kiln-hit packer; do
    [[ -n ${secs[$name]:-} ]] || continue
    printf '| %s | %.3f s | %s |\n' "$name" "${secs[$name]}" "${calls[$name]}"
done
echo
build="release build"
[[ -z ${KILN:-} ]] || build="binary $kiln"
echo "moto $(python3 -c 'import moto; print(moto.__version__)'), $packer_version, kiln $("$kiln" --version | cut -d' ' -f2) ($build)"
