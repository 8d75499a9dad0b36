#!/usr/bin/env bash
# Installs what is missing, builds the jars, and runs the example Spark job.
#
#   scripts/run-example.sh [--spark 3.5|4.0] [--plugin|--no-plugin] [spark-submit options...] [-- job args...]
#
# e.g. scripts/run-example.sh --spark 4.0 --master 'local-cluster[2,1,1024]' -- 5000
#
# For now the job is org.nativemem.e2e.SmokeJob (spark.range(N).count(), N = 1000 by default).
# --plugin adds --conf spark.plugins=org.nativemem.spark.NativeMemoryPlugin; flip PLUGIN below to
# make it the default once the plugin exists. Options go to scripts/spark-submit.sh (yours win:
# --master defaults to local[2]).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

EXAMPLE_CLASS=org.nativemem.e2e.SmokeJob
PLUGIN_CONF=spark.plugins=org.nativemem.spark.NativeMemoryPlugin
PLUGIN=0
spark_version=3.5
submit_args=()
job_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --spark) [ $# -ge 2 ] || { echo "run-example.sh: --spark needs 3.5 or 4.0" >&2; exit 2; }
             spark_version="$2"; shift 2 ;;
    --spark=*) spark_version="${1#--spark=}"; shift ;;
    --plugin) PLUGIN=1; shift ;;
    --no-plugin) PLUGIN=0; shift ;;
    --) shift; job_args=("$@"); break ;;
    *) submit_args+=("$1"); shift ;;
  esac
done

bash scripts/setup.sh
echo "run-example: building jars"
GRADLE_USER_HOME="${GRADLE_USER_HOME:-$ROOT/.cache/gradle}" \
  gradle --offline --no-daemon --console=plain -q assemble

args=(--master 'local[2]')
[ "$PLUGIN" = 1 ] && args+=(--conf "$PLUGIN_CONF")
args+=(${submit_args[@]+"${submit_args[@]}"} --class "$EXAMPLE_CLASS" build/libs/nativemem-e2e.jar)
echo "run-example: Spark $spark_version: $EXAMPLE_CLASS ${job_args[*]:-}"
exec bash scripts/spark-submit.sh "$spark_version" "${args[@]}" ${job_args[@]+"${job_args[@]}"}
