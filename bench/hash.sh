#!/usr/bin/env bash
# Hashing throughput and memory: `kiln hash` on an image with a generated 1 GiB
# artifact, side by side with `sha256sum` on the same file, in one run.
#
#   bench/hash.sh [--size-mib N] [--runs N]
#
# Goals (issue 2): kiln at >= 0.9x sha256sum's speed, peak RSS <= 64 MiB.
# Both read the file from the page cache (one warm-up read first), so this
# measures hashing and streaming, not the disk. Runs alternate between the two
# tools and the median of each is reported, since these machines are noisy.
set -euo pipefail

size_mib=1024
runs=5
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mib) size_mib=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

repo=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/kiln-target}
cargo build --release --quiet --manifest-path "$repo/Cargo.toml"
kiln=$CARGO_TARGET_DIR/release/kiln

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/images/big/files" "$work/templates"
echo 'region = "us-east-1"' > "$work/kiln.toml"
printf '#!/bin/bash\necho {{ image.name }}\n' > "$work/templates/p.sh.tera"
cat > "$work/images/big/image.toml" <<'TOML'
format = 1
[base]
ami = "ami-0123456789abcdef0"
[java]
version = "1.8.0_422"
[java.apt]
package = "openjdk-8-jre-headless"
version = "8u422-1"
[[artifact]]
name = "big"
path = "files/big.bin"
dest = "/opt/big/big.bin"
[service]
name = "big"
user = "big"
exec = "/bin/true"
working_dir = "/opt/big"
[provision]
template = "templates/p.sh.tera"
TOML
file=$work/images/big/files/big.bin
echo "generating a ${size_mib} MiB artifact ..." >&2
head -c "$((size_mib * 1024 * 1024))" /dev/urandom > "$file"
cat "$file" > /dev/null   # warm the page cache

measure() { # prints "seconds max_rss_kib"
  /usr/bin/time -f '%e %M' -o "$work/time" "$@" > /dev/null
  cat "$work/time"
}

k_times=(); s_times=(); k_rss=0; s_rss=0
for i in $(seq "$runs"); do
  read -r t m < <(measure sha256sum "$file"); s_times+=("$t"); [ "$m" -gt "$s_rss" ] && s_rss=$m
  read -r t m < <(cd "$work" && measure "$kiln" hash big); k_times+=("$t"); [ "$m" -gt "$k_rss" ] && k_rss=$m
  echo "run $i: sha256sum ${s_times[-1]}s, kiln ${k_times[-1]}s" >&2
done

# The artifact's sha256 in kiln's manifest must be sha256sum's: same work, same answer.
expected=$(sha256sum "$file" | cut -d' ' -f1)
(cd "$work" && "$kiln" -v hash big) | grep -q "artifact big sha256=$expected" \
  || { echo "kiln's artifact sha256 differs from sha256sum's" >&2; exit 1; }

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
s_med=$(median "${s_times[@]}"); k_med=$(median "${k_times[@]}")
awk -v s="$s_med" -v k="$k_med" -v mib="$size_mib" -v kr="$k_rss" -v sr="$s_rss" 'BEGIN {
  printf "%-10s %10s %10s %14s\n", "tool", "median s", "MiB/s", "peak RSS MiB"
  printf "%-10s %10.2f %10.0f %14.1f\n", "sha256sum", s, mib / s, sr / 1024
  printf "%-10s %10.2f %10.0f %14.1f\n", "kiln hash", k, mib / k, kr / 1024
  ratio = s / k
  printf "speed ratio kiln/sha256sum: %.2fx (goal >= 0.90x); kiln peak RSS %.1f MiB (goal <= 64)\n", ratio, kr / 1024
  exit !(ratio >= 0.9 && kr / 1024 <= 64)
}'
