#!/usr/bin/env bash
# Runs spark-submit from one of the Spark runtimes that scripts/setup.sh installs, with nativemem.jar
# on --jars (driver and executors), quiet logging and leak checks on.
#
#   scripts/spark-submit.sh <minor> [spark-submit args...] <app jar> [app args...]
#
# <minor> is a Spark release of scripts/spark-releases.txt (3.5, 4.0, 4.1, 4.2, 4.3).
#
# e.g. scripts/spark-submit.sh 3.5 --master 'local-cluster[2,1,1024]' \
#        --conf spark.plugins=org.nativemem.spark.NativeMemoryPlugin \
#        --class org.nativemem.e2e.SmokeJob build/libs/nativemem-e2e.jar
#
# Added before your arguments (so yours win): spark.unsafe.exceptionOnMemoryLeak=true,
# spark.ui.enabled=false, spark.ui.showConsoleProgress=false. Merged with yours: --jars gets
# nativemem.jar prepended; spark.driver.extraJavaOptions / --driver-java-options and
# spark.executor.extraJavaOptions get -Dlog4j.configurationFile=tests/spark/log4j2.properties
# prepended. The plugin is NOT enabled here: pass --conf spark.plugins=... yourself.
#
# Environment: NATIVEMEM_JAR (default build/libs/nativemem.jar), NATIVEMEM_LOG4J (log4j2 file),
# NATIVEMEM_LIBRARY (a native library file to load instead of the jar's, e.g. the test library),
# SPARK_HOME_<major>_<minor>, e.g. SPARK_HOME_4_3 (default .cache/spark-<minor>/pyspark), JAVA_HOME (default: the
# java on PATH), SPARK_LOCAL_IP (default 127.0.0.1).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { echo "spark-submit.sh: $*" >&2; exit 2; }
[ $# -ge 1 ] || die "usage: scripts/spark-submit.sh <minor> [spark-submit args...]"
version="$1"; shift
known="$(sed -e '/^[[:space:]]*#/d' -e '/^[[:space:]]*$/d' "$ROOT/scripts/spark-releases.txt" | awk '{print $1}' | xargs)"
case " $known " in
  *" $version "*) ;;
  *) die "unknown Spark version '$version' (supported: $known; scripts/spark-releases.txt)" ;;
esac
home_var="SPARK_HOME_${version//./_}"
SPARK_HOME="${!home_var:-$ROOT/.cache/spark-$version/pyspark}"
[ -x "$SPARK_HOME/bin/spark-submit" ] || die "no Spark $version at $SPARK_HOME: run scripts/setup.sh"
# pyspark's bin/ scripts find SPARK_HOME through python unless it is set; set it explicitly.
export SPARK_HOME

if [ -z "${JAVA_HOME:-}" ]; then
  java_bin="$(command -v java)" || die "java not found (set JAVA_HOME)"
  JAVA_HOME="$(dirname "$(dirname "$(readlink -f "$java_bin")")")"
fi
export JAVA_HOME
export SPARK_LOCAL_IP="${SPARK_LOCAL_IP:-127.0.0.1}"

jar="${NATIVEMEM_JAR:-$ROOT/build/libs/nativemem.jar}"
[ -f "$jar" ] || die "$jar missing: build it first (gradle assemble, see scripts/test.sh)"
log4j="${NATIVEMEM_LOG4J:-$ROOT/tests/spark/log4j2.properties}"
log_opt="-Dlog4j.configurationFile=file:$log4j"
# NATIVEMEM_LIBRARY: a libnativemem_jni.so for driver and executors instead of the jar's (the test
# library for jobs that call test hooks). Placed before your options, so yours still win.
if [ -n "${NATIVEMEM_LIBRARY:-}" ]; then
  [ -f "$NATIVEMEM_LIBRARY" ] || die "NATIVEMEM_LIBRARY=$NATIVEMEM_LIBRARY is not a file"
  log_opt="$log_opt -Dnativemem.library.path=$NATIVEMEM_LIBRARY"
fi

# Walk spark-submit's own options (up to the application jar) and merge ours into them.
# Every --option takes a value except these switches.
is_switch() { case "$1" in --verbose|-v|--supervise|--help|-h|--version) return 0 ;; *) return 1 ;; esac; }
jars="$jar"
driver_opts="$log_opt"
executor_opts="$log_opt"
driver_java_options=""   # --driver-java-options, which overrides spark.driver.extraJavaOptions
have_driver_java_options=0
rest=()
while [ $# -gt 0 ]; do
  arg="$1"
  case "$arg" in
    --jars) [ $# -ge 2 ] || die "--jars needs a value"; jars="$jars,$2"; shift 2 ;;
    --jars=*) jars="$jars,${arg#--jars=}"; shift ;;
    --driver-java-options)
      [ $# -ge 2 ] || die "--driver-java-options needs a value"
      have_driver_java_options=1; driver_java_options="$2"; shift 2 ;;
    --driver-java-options=*)
      have_driver_java_options=1; driver_java_options="${arg#--driver-java-options=}"; shift ;;
    --conf|-c)
      [ $# -ge 2 ] || die "$arg needs a value"
      case "$2" in
        spark.driver.extraJavaOptions=*) driver_opts="$log_opt ${2#*=}" ;;
        spark.executor.extraJavaOptions=*) executor_opts="$log_opt ${2#*=}" ;;
        spark.jars=*) jars="$jars,${2#*=}" ;;
        *) rest+=("$arg" "$2") ;;
      esac
      shift 2 ;;
    --*=*) rest+=("$arg"); shift ;;
    -*)
      if is_switch "$arg"; then rest+=("$arg"); shift
      else [ $# -ge 2 ] || die "$arg needs a value"; rest+=("$arg" "$2"); shift 2; fi ;;
    *) break ;;   # the application jar: it and everything after it are passed as they are
  esac
done

cmd=("$SPARK_HOME/bin/spark-submit"
  --conf spark.unsafe.exceptionOnMemoryLeak=true
  --conf spark.ui.enabled=false
  --conf spark.ui.showConsoleProgress=false
  --conf "spark.driver.extraJavaOptions=$driver_opts"
  --conf "spark.executor.extraJavaOptions=$executor_opts"
  --jars "$jars")
if [ "$have_driver_java_options" = 1 ]; then
  cmd+=(--driver-java-options "$log_opt $driver_java_options")
fi
cmd+=(${rest[@]+"${rest[@]}"} "$@")
if [ "${NATIVEMEM_VERBOSE:-0}" = 1 ]; then printf 'spark-submit.sh: %q ' "${cmd[@]}" >&2; echo >&2; fi
exec "${cmd[@]}"
