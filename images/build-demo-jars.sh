#!/usr/bin/env bash
# Rebuild the demo jars the example images ship (images/*/files/*-demo.jar) from the
# Java sources beside them.
#
# The committed jars are what the recipes hash, so a rebuild must give the same bytes
# for the same sources: entry timestamps are fixed (`jar --date`, JDK 17 or later), the
# manifest is written here instead of by the jar tool (whose Created-By names the JDK
# build), and files are added in sorted order. The class files still come from the local
# javac, so a different JDK release may produce different bytes, and so a new image
# hash; commit the rebuilt jar when that is intended.
#
# Usage: images/build-demo-jars.sh     (needs javac and jar from JDK 17 or later)
set -euo pipefail

cd "$(dirname "$0")"

# Any fixed instant works; jar requires one after 1980-01-01T00:00:02Z.
readonly JAR_DATE=2020-01-01T00:00:02Z

for tool in javac jar; do
    command -v "$tool" >/dev/null || {
        echo "build-demo-jars: $tool not found; install a JDK (17 or later)" >&2
        exit 1
    }
done

build() { # IMAGE MAIN_CLASS
    local image=$1 main_class=$2
    local work out
    work=$(mktemp -d)
    out="$image/files/$image-demo.jar"

    local -a sources
    mapfile -t sources < <(find "$image/app/src" -name '*.java' | LC_ALL=C sort)
    # --release 8: the images run a Java 8 runtime.
    javac --release 8 -encoding UTF-8 -d "$work/classes" "${sources[@]}"

    printf 'Manifest-Version: 1.0\r\nMain-Class: %s\r\nCreated-By: images/build-demo-jars.sh\r\n\r\n' \
        "$main_class" >"$work/MANIFEST.MF"

    local -a classes
    mapfile -t classes < <(cd "$work/classes" && find . -type f | LC_ALL=C sort)
    mkdir -p "$(dirname "$out")"
    rm -f "$out"
    jar --create --file "$out" --manifest "$work/MANIFEST.MF" --date="$JAR_DATE" \
        -C "$work/classes" "${classes[@]}"
    rm -rf "$work"

    echo "$out: $(wc -c <"$out") bytes, sha256 $(sha256sum "$out" | cut -d' ' -f1)"
}

build web kiln.demo.web.WebDemo
build worker kiln.demo.worker.WorkerDemo
