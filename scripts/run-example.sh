#!/usr/bin/env bash
# The main example: installs what is missing, builds the jars, and runs the Spark job
# org.nativemem.examples.SortJob (examples/sort) in local mode (nativemem.jar and nativemem-examples.jar, the
# sorter's classes and its own native library, on --jars). Every task sorts its share of N random longs
# (default 50 million) with a native external sort (NativeSorter) under the task's native memory
# manager, with Spark memory small enough that the sorts spill, checks the output, and the driver
# prints per task: rows, native peak, bytes spilled, runs, time; then totals and "leaked: 0 B".
# Exits non-zero if a check fails.
#
#   scripts/run-example.sh [job options] [--spark 3.5|4.0|4.1|4.2|4.3] [spark-submit options] [-- job args...]
#
# Job options (passed to SortJob; also accepted after --):
#   --rows N            rows in all (default 50m; 2000000, 2_000_000, 2m and 500k work)
#   --partitions P      partitions = tasks (default 8)
#   --with-jvm-sort     each task also sorts the same keys with Spark's UnsafeExternalSorter,
#                       which competes for the task's memory: spills in both directions
#   --require-spill     fail unless every task spilled (and, with the JVM sort, both directions)
#   --seed S            random seed (default 42)
# Script options:
#   --spark <minor>     Spark runtime, one of scripts/spark-releases.txt (default 3.5)
#   --verbose           keep nativemem's INFO logs (each Spark spill request); default: warnings only
# Any other option goes to scripts/spark-submit.sh (yours win), e.g. --master 'local[4]' or
# --conf spark.memory.offHeap.size=96m. Defaults: --master 'local[2]'; SortJob itself sets the
# plugin, off-heap execution memory (32m) and spark.nativemem.reservationBlockSize=4m unless given.
#
# e.g. scripts/run-example.sh
#      scripts/run-example.sh --rows 10m --with-jvm-sort --spark 4.0
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

EXAMPLE_CLASS=org.nativemem.examples.SortJob
spark_version=3.5
verbose=0
submit_args=()
job_args=()
need_value() { [ $# -ge 2 ] || { echo "run-example.sh: $1 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --spark) need_value "$@"; spark_version="$2"; shift 2 ;;
    --spark=*) spark_version="${1#--spark=}"; shift ;;
    --verbose) verbose=1; shift ;;
    --rows|--partitions|--seed) need_value "$@"; job_args+=("$1" "$2"); shift 2 ;;
    --rows=*|--partitions=*|--seed=*) job_args+=("${1%%=*}" "${1#*=}"); shift ;;
    --with-jvm-sort|--require-spill|--help|-h) job_args+=("$1"); shift ;;
    --) shift; job_args+=("$@"); break ;;
    *) submit_args+=("$1"); shift ;;
  esac
done

bash scripts/setup.sh
echo "run-example: building jars"
GRADLE_USER_HOME="${GRADLE_USER_HOME:-$ROOT/.cache/gradle}" \
  gradle --offline --no-daemon --console=plain -q assemble

# Quieter logs: the test log config with nativemem at WARN (unless --verbose or NATIVEMEM_LOG4J).
if [ "$verbose" = 0 ] && [ -z "${NATIVEMEM_LOG4J:-}" ]; then
  # log4j2 picks the format by extension: keep .properties.
  NATIVEMEM_LOG4J="$(mktemp -t nativemem-example-log4j2.XXXXXX.properties)"
  trap 'rm -f "$NATIVEMEM_LOG4J"' EXIT
  sed -e 's/^logger\.nativemem\.level *= *info/logger.nativemem.level = warn/' \
    tests/spark/log4j2.properties >"$NATIVEMEM_LOG4J"
  export NATIVEMEM_LOG4J
fi

# The sorter ships apart from nativemem.jar (an engine in its own library): its jar goes on --jars
# too (scripts/spark-submit.sh merges it with nativemem.jar and any --jars of yours).
args=(--master 'local[2]' --jars build/libs/nativemem-examples.jar ${submit_args[@]+"${submit_args[@]}"}
  --class "$EXAMPLE_CLASS" build/libs/nativemem-e2e.jar)
echo "run-example: Spark $spark_version: $EXAMPLE_CLASS ${job_args[*]:-}"
start=$(date +%s.%N)
rc=0
bash scripts/spark-submit.sh "$spark_version" "${args[@]}" ${job_args[@]+"${job_args[@]}"} || rc=$?
awk -v a="$start" -v b="$(date +%s.%N)" -v rc="$rc" \
  'BEGIN { printf "run-example: %s after %.1f s (spark-submit included)\n", rc == 0 ? "done" : "FAILED (exit " rc ")", b - a }'
exit "$rc"
