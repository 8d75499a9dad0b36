#!/usr/bin/env bash
# The one test command (README, .ci/run). Runs every suite, keeps going after a failure, prints
# each suite's time, and ends with the line "N passed, N failed"; exits non-zero if any failed.
#
# Suites, in order:
#   cargo-fmt       cargo fmt --all -- --check
#   cargo-clippy    cargo clippy --workspace --all-targets -- -D warnings
#   cargo-clippy-testlib  the same for nativemem-jni with the `testing` feature (test library; it
#                   turns on nativemem-provider's `testing` hooks and nativemem-testkit's allocator)
#   cargo-test      cargo test --workspace (but the two DataFusion crates)
#   cargo-test-datafusion  cargo test --profile datafusion -p nativemem-datafusion: real DataFusion
#                   queries, and the failure matrix's CI-sized subset (queries.rs
#                   failure_matrix_subset_...: 4 cells, 1 run each, nativemem vs FairSpillPool; the
#                   whole matrix is scripts/bench.sh datafusion); then cargo build --profile datafusion -p nativemem-df-engine (the DataFusion
#                   example engine, examples/datafusion, whose library Gradle packs: the same DataFusion
#                   artifacts, built once)
#   cargo-loom      loom model check of the core and the handle tables (RUSTFLAGS="--cfg loom")
#   c-header        include/nativemem.h compiles as C11 and C++17; layout pinned (tests/c/header_check.c);
#                   the ABI bench harness (tests/c/bench_abi.c) compiles
#   gradle          gradle cleanTest test assemble: JUnit tests (tests/java, examples/*/tests) +
#                   build/libs/*.jar
#   product-contents scripts/check-product.sh: the release library exports only the allow-list,
#                   nativemem.jar holds only org.nativemem, org.nativemem.spark and org.nativemem.arrow
#   container:governor@<v>  tests/spark/container-governor.sh on the full releases: the container
#                   governor in a real memory cgroup, governor off (the kernel OOM-kills the
#                   executor) and on (the job completes); SKIP (exit 77, counted apart) where no
#                   memory cgroup can be created
#   ui:spark-ui@<v> tests/spark/spark-ui.sh on the full releases: native memory in Spark's live UI
#                   (REST API, driver /metrics/prometheus), in Spark's history server replaying the
#                   event log, and on the stage page rendered by headless Chromium (screenshot under
#                   target/spark-ui/); SKIP (exit 77) without chromium
#   e2e:<name>@<v>  the lines of tests/spark/tests.txt on each Spark release <v> of
#                   scripts/spark-releases.txt: all of them on a `full` release (the oldest and the
#                   newest), the lines marked `core` on the others
#                   (scripts/spark-submit.sh <v> ... build/libs/nativemem-e2e.jar)
#
#   scripts/test.sh                  everything
#   scripts/test.sh 'e2e:*@4.0' ...  only suites whose name matches one of the glob patterns
#                                    (e2e suites then use the jars already in build/libs)
#
# Environment: CI=true (plain output, no colours), SPARK_VERSIONS (default: every release of
# scripts/spark-releases.txt, each with its scope; a release named here that is not `full` there
# runs its `core` lines),
# E2E_TIMEOUT (seconds per Spark run, default 300), SUITE_TIMEOUT (other suites, default 1500),
# DATAFUSION_TIMEOUT (cargo-test-datafusion, default 2700: it builds DataFusion).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

patterns=("$@")
# "<minor> <pyspark release> <scope>" lines, comments dropped.
mapfile -t spark_releases < <(sed -e 's/\r$//' -e '/^[[:space:]]*#/d' -e '/^[[:space:]]*$/d' scripts/spark-releases.txt)
SPARK_VERSIONS="${SPARK_VERSIONS:-$(for l in "${spark_releases[@]}"; do read -r -a f <<<"$l"; printf '%s ' "${f[0]}"; done)}"
spark_scope() { # minor -> full|core
  local l f
  for l in "${spark_releases[@]}"; do
    read -r -a f <<<"$l"
    [ "${f[0]}" = "$1" ] && { echo "${f[2]}"; return; }
  done
  echo core
}
E2E_TIMEOUT="${E2E_TIMEOUT:-300}"
SUITE_TIMEOUT="${SUITE_TIMEOUT:-1500}"

if [ "${CI:-}" = true ] || [ ! -t 1 ]; then
  color=never
  export CARGO_TERM_COLOR=never NO_COLOR=1 TERM="${TERM:-dumb}"
  bold="" red="" green="" reset=""
else
  color=always
  bold=$'\e[1m' red=$'\e[31m' green=$'\e[32m' reset=$'\e[0m'
fi

export GRADLE_USER_HOME="${GRADLE_USER_HOME:-$ROOT/.cache/gradle}"
GRADLE=(gradle --offline --no-daemon --console=plain)

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1fs", b - a }'; }

# In a terminal, --foreground lets Ctrl-C reach the suite; in CI, timeout's own process group lets
# a timeout kill the whole suite (rustc, Gradle's test JVM, Spark's executors).
if [ -t 0 ]; then timeout_opts=(--foreground); else timeout_opts=(); fi

names=() results=() times=() reasons=()
# Each suite's output, also kept whole here (the summary quotes why a suite failed).
LOG_DIR="$ROOT/target/test-logs"
rm -rf "$LOG_DIR" && mkdir -p "$LOG_DIR"
last_rc=0
passed=0 failed=0 skipped=0

selected() { # suite name
  [ ${#patterns[@]} -eq 0 ] && return 0
  local p
  for p in "${patterns[@]}"; do
    # shellcheck disable=SC2053  # glob match on purpose
    [[ "$1" == $p ]] && return 0
  done
  return 1
}

record() { # name status(0=pass) start
  local t; t="$(elapsed "$3" "$(now)")"
  names+=("$1"); times+=("$t")
  if [ "$2" -eq 0 ]; then
    results+=(PASS); passed=$((passed + 1))
    echo "${green}--- PASS $1 ($t)${reset}"
  elif [ "$2" -eq 77 ]; then
    # The suite cannot run here (it said why): counted apart, never as passed.
    results+=(SKIP); skipped=$((skipped + 1))
    echo "--- SKIP $1 ($t)"
  else
    results+=(FAIL); failed=$((failed + 1))
    echo "${red}--- FAIL $1 ($t, exit $2)${reset}"
  fi
}

run_suite() { # name timeout command...
  local name="$1" limit="$2"; shift 2
  last_rc=0
  selected "$name" || return 0
  echo
  echo "${bold}=== $name${reset}: $*"
  local start; start="$(now)"
  local log="$LOG_DIR/${name//[^A-Za-z0-9@._-]/_}.log"
  timeout "${timeout_opts[@]}" -k 30 "$limit" "$@" 2>&1 | tee "$log"
  last_rc=${PIPESTATUS[0]}
  [ "$last_rc" -eq 124 ] && echo "test.sh: $name timed out after ${limit}s"
  record "$name" "$last_rc" "$start"
  if [ "$last_rc" -ne 0 ]; then
    # Why it failed, again in the summary (a CI page may show only the end of the output).
    reasons+=("$name: $(grep -m 3 -E 'check(s)? failed|AssertionError|ComparisonFailure|Exception in thread "main"|^error(\[|:)| FAILED$|^test .* FAILED|test.sh: .* timed out' "$log" \
      | cut -c1-1200 | tr '\n' ' ')")
  fi
}

summary() {
  echo
  echo "${bold}=== summary${reset}"
  local i
  for i in "${!names[@]}"; do
    printf '%s %-40s %8s\n' "${results[$i]}" "${names[$i]}" "${times[$i]}"
  done
  printf 'total %s\n' "$(elapsed "$t0" "$(now)")"
  if [ ${#reasons[@]} -gt 0 ]; then
    echo "why (first lines of each failed suite's log; whole logs in ${LOG_DIR#"$ROOT"/}/):"
    printf '  %s\n' "${reasons[@]}"
  fi
  [ "$skipped" -eq 0 ] || echo "$skipped skipped (could not run here; see their SKIP lines)"
  echo "$passed passed, $failed failed"
}

t0="$(now)"
echo "${bold}=== setup${reset}"
if ! bash scripts/setup.sh; then
  start="$(now)"; record setup 1 "$start"; summary; exit 1
fi

# ---- Rust ------------------------------------------------------------------------------------------
run_suite cargo-fmt "$SUITE_TIMEOUT" cargo fmt --all -- --check --color "$color"
run_suite cargo-clippy "$SUITE_TIMEOUT" cargo clippy --workspace --all-targets --color "$color" -- -D warnings
# The test hooks and bench harness exist only with the `testing` feature (the test library).
run_suite cargo-clippy-testlib "$SUITE_TIMEOUT" cargo clippy -p nativemem-jni --features testing --all-targets \
  --color "$color" -- -D warnings
run_suite cargo-test "$SUITE_TIMEOUT" cargo test --workspace --exclude nativemem-datafusion \
  --exclude nativemem-df-engine --color "$color"
# DataFusion's query tests sort and aggregate millions of rows: optimised, in the `datafusion` profile
# (Cargo.toml: release at opt-level 1; DataFusion is built in that one profile, never debug too).
# Its own time limit: a cold build of DataFusion alone takes ~16 minutes on 2 cores.
# The engine resolves DataFusion with exactly the features of these tests (its Cargo.toml) in the same
# profile, so its build reuses every DataFusion artifact.
run_suite cargo-test-datafusion "${DATAFUSION_TIMEOUT:-2700}" bash -c "cargo test --profile datafusion \
  -p nativemem-datafusion --color $color && cargo build --profile datafusion -p nativemem-df-engine --color $color \
  && cargo test --profile datafusion -p nativemem-df-engine --test layers --color $color"
# Model check of the lock-free paths: the core's accounting (native/core/tests/loom.rs) and the
# handle tables' pins and close protocol (native/handles/tests/loom.rs); its own target dir so the
# --cfg loom build does not invalidate the normal one.
run_suite cargo-loom "$SUITE_TIMEOUT" env RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=4 \
  cargo test -p nativemem-core -p nativemem-handles --test loom --release --target-dir target/loom --color "$color"

# ---- C: the engine ABI header compiles as C11 and C++17 with the layout the library fills in ----------
run_suite c-header "$SUITE_TIMEOUT" bash -c \
  'cc -std=c11 -Wall -Wextra -Werror -pedantic -Iinclude -fsyntax-only tests/c/header_check.c &&
   c++ -std=c++17 -Wall -Wextra -Werror -Iinclude -x c++ -fsyntax-only tests/c/header_check.c &&
   cc -std=c11 -Wall -Wextra -Werror -Iinclude -fsyntax-only tests/c/bench_abi.c'

# ---- JVM: JUnit tests and jars ---------------------------------------------------------------------
# No stale jars: if the build fails, the e2e runs must fail rather than test old code.
selected gradle && rm -f build/libs/nativemem.jar build/libs/nativemem-e2e.jar build/libs/nativemem-examples.jar
run_suite gradle "$SUITE_TIMEOUT" "${GRADLE[@]}" --continue cleanTest test assemble
# What users deploy carries only the product: the library's exports and the jar's classes.
run_suite product-contents "$SUITE_TIMEOUT" bash scripts/check-product.sh

# ---- Spark end-to-end: tests/spark/tests.txt x SPARK_VERSIONS ------------------------------------------
spark_home() { echo "$ROOT/.cache/spark-$1/pyspark"; }
TESTLIB="$ROOT/target/testlib/libnativemem_jni.so"   # built by the gradle suite (cargoBuildTestlib)
for v in $SPARK_VERSIONS; do   # executor work dirs of earlier runs (local-cluster)
  rm -rf "$(spark_home "$v")/work"
done
marker="$(mktemp)"; trap 'rm -f "$marker"' EXIT
mapfile -t e2e_lines < <(sed -e 's/\r$//' tests/spark/tests.txt)
for line in ${e2e_lines[@]+"${e2e_lines[@]}"}; do
  read -r -a f <<<"$line"
  [ ${#f[@]} -eq 0 ] && continue
  case "${f[0]}" in \#*) continue ;; esac
  if [ ${#f[@]} -lt 3 ]; then
    echo "test.sh: bad line in tests/spark/tests.txt: ${f[*]}"; failed=$((failed + 1))
    names+=("tests.txt"); results+=(FAIL); times+=("0.0s"); continue
  fi
  name="${f[0]}" cls="${f[1]}" master="${f[2]}"
  confs=() app_args=() library="" core=0
  for ((i = 3; i < ${#f[@]}; i++)); do
    if [ "${f[$i]}" = "--" ]; then app_args=("${f[@]:$((i + 1))}"); break; fi
    if [ "${f[$i]}" = testlib ]; then library="$TESTLIB"; continue; fi
    if [ "${f[$i]}" = core ]; then core=1; continue; fi
    confs+=(--conf "${f[$i]}")
  done
  for v in $SPARK_VERSIONS; do
    [ "$core" = 1 ] || [ "$(spark_scope "$v")" = full ] || continue
    touch "$marker"
    run_suite "e2e:$name@$v" "$E2E_TIMEOUT" env NATIVEMEM_LIBRARY="$library" \
      bash scripts/spark-submit.sh "$v" --master "$master" \
      ${confs[@]+"${confs[@]}"} --class "$cls" build/libs/nativemem-e2e.jar ${app_args[@]+"${app_args[@]}"}
    if [ "$last_rc" -ne 0 ] && [ -d "$(spark_home "$v")/work" ]; then
      # local-cluster executors log to files: show what they said.
      find "$(spark_home "$v")/work" -name stderr -newer "$marker" | sort | while read -r log; do
        echo "--- executor log ${log#"$ROOT"/} (last 60 lines)"
        tail -n 60 "$log"
      done
    fi
  done
done

# The container governor against a real memory cgroup and the kernel's OOM killer, on the full
# releases (the oldest and the newest): tests/spark/container-governor.sh (root; SKIP elsewhere).
for v in $SPARK_VERSIONS; do
  [ "$(spark_scope "$v")" = full ] || continue
  run_suite "container:governor@$v" "$E2E_TIMEOUT" bash tests/spark/container-governor.sh "$v"
done

# Native memory in Spark's UI, history server and a real browser, on the full releases.
for v in $SPARK_VERSIONS; do
  [ "$(spark_scope "$v")" = full ] || continue
  run_suite "ui:spark-ui@$v" "$E2E_TIMEOUT" bash tests/spark/spark-ui.sh "$v"
done

summary
[ "$failed" -eq 0 ]
