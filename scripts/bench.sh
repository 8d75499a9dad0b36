#!/usr/bin/env bash
# Benchmarks: prints ONE table in which every figure is set against a baseline measured
# in the same run, on release builds, plus the machine it ran on. Benchmarks are not tests: a
# missed target is reported ("no" in the Met column), not an error; the script fails only if a
# benchmark could not run.
#
#   scripts/bench.sh                  everything (~1.5 minutes on 2 cores, after the builds)
#   scripts/bench.sh --quick          a fast smoke of the same (numbers are indicative only)
#   scripts/bench.sh [--quick] core jni sort    only these parts
#   scripts/bench.sh abi              the engine ABI as a C engine calls it
#
# Parts:
#   core  criterion benches of nativemem-core (native/core/benches/core.rs), read back from
#         criterion's estimates.json: grow+shrink pair vs two atomic RMW pairs, with a 1 MiB
#         reservation quantum (the fast path: exclusive `&mut` and shared `&self`) and exact; the
#         pair on 1, 2 and 4 threads of one
#         manager (per thread, ratio to 1 thread); allocate+free vs the system allocator, 64 B .. 1 MiB
#         (with the quantum and exact; and the system allocator plus 4 uncontended atomic RMWs).
#   track nativemem-track's bench (native/track/benches/track.rs, its own harness): alloc+free of
#         one block through the tracking global allocator on a thread bound to a pool vs the
#         wrapped system allocator with the same layout, 64 B .. 1 MiB, measured back to back in
#         41 rounds (median of the per-round ratios); the system allocator asked for the tracker's
#         size (block + 16-byte header) and an unbound thread in the notes.
#   jni   the Java harness org.nativemem.bench.JniBench (tests/spark/java), in a Spark task
#         (local[1], real TaskMemoryManager, OFF_HEAP), default configuration: 64 KiB grows
#         through nativemem, from native code (a loop inside the library) and from Java (a loop
#         of NativeReservation.grow, the API a user calls; 1 and 2 tasks) vs one JVM upcall per
#         grow; upcalls per GiB; create+close of a manager vs a JNI downcall.
#   arbitration  the Java harness org.nativemem.bench.ArbitrationBench (tests/spark/java) over Spark's
#         own memory managers (UnifiedMemoryManager, a TaskMemoryManager per task, no SparkContext):
#         NativeReservation.grow+shrink 64 KiB inside the cushion with executor-wide arbitration on
#         vs off (rounds alternating; target: on adds <= 1 ns); a short 8 MiB grow served by
#         another task's idle memory (cross-task reclaim) vs by Spark spilling the task's own JVM
#         operator (the mechanism only, no I/O), medians of single calls.
#   sort  the example external sort (examples/sort/bench/sort_bench.rs) with accounting on
#         vs off, SORT_ROUNDS processes; the figure is the median of the per-process ratios.
#   abi   tests/c/bench_abi.c: a C program built like an engine (its own binary, dlopen of the
#         release libnativemem_jni.so, include/nativemem.h only) times reservation_try_grow +
#         shrink (64 B), the call floor (reservation_size) and allocate+free (64 B, 4 KiB, 1 MiB) on
#         1 thread, 2 threads x 2 managers (two tasks) and 2 threads x 1 manager (own pools and
#         reservations), 1 MiB quantum, best of 5; baselines of the same run: the core's shared
#         pair (criterion, grow_shrink/quantum_one_level_pool), malloc+free, the 1-thread figure.
#         ABI_LIBRARY picks another library (e.g. an earlier build, to compare).
#   governor the container governor's cost: the example sort in Spark (SortJob, local[2], native
#         sort with spills) and a plain Spark SQL aggregation (SqlBench: no native operator), each
#         with the governor on (spark.nativemem.containerLimit=64g: it runs and samples; never
#         under pressure) vs off, GOVERNOR_ROUNDS (5) rounds in alternating order (median per-round
#         ratio); target <= 1.01x. GOVERNOR_SORT_ROWS (40m), GOVERNOR_SQL_ROWS (150000000).
#   metrics  what nativemem shows in Spark (task accumulators, native spills in the Spill columns,
#         memory reports to the driver, the sizing answer): the same two Spark workloads as
#         `governor`, with spark.nativemem.metrics.enabled=true vs false, METRICS_ROUNDS (5) rounds in
#         alternating order (median per-round ratio) of the job's time and of the CPU time (user +
#         sys) of the whole spark-submit; target <= 1.01x. METRICS_SORT_ROWS (40m),
#         METRICS_SQL_ROWS (150000000).
#   datafusion  DataFusion sort and aggregation (native/datafusion/examples/df_bench.rs) on
#         nativemem's pool vs DataFusion's, same 64 MiB limit and policy (Greedy vs GreedyMemoryPool,
#         FairShare vs FairSpillPool), DF_ROUNDS rounds in rotating order (medians); listener calls
#         per query vs one call per try_grow/grow/shrink. Then the failure matrix
#         (native/datafusion/examples/df_failures.rs, in the `datafusion` profile: counts, not
#         times, so DataFusion is built once): sort, GROUP BY, window, COUNT(DISTINCT), two
#         COUNT(DISTINCT) sharing one pool, two sorts on two pools of one task, a sort-merge join,
#         at 1/8, 1/4 and 1/2 of each query's unbounded peak, DF_FAIL_RUNS (5; quick 2) runs each on
#         nativemem's pool (FairShare; a task limit, and budget-only: Spark grants at most the
#         limit; spill requests off and on) and on FairSpillPool (the limit): runs that failed
#         for lack of memory (and hung, apart); target: nativemem's count <= FairSpillPool's in
#         every cell. DF_FAIL_ONLY=1 runs the matrix alone (not the timed queries).
#
# Environment: BENCH_DIR (logs, criterion data, table.md; default target/bench), BENCH_ESTIMATE
# (criterion estimate: median (default) or mean), SPARK_VERSION (a release of scripts/spark-releases.txt, default 3.5),
# SORT_KEYS (default 50,000,000; quick 5,000,000), SORT_BUFFER_MIB (16), SORT_ROUNDS (5; quick 1).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
quick=0
parts=()
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    core|track|jni|arbitration|sort|datafusion|abi|governor|metrics) parts+=("$arg") ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench.sh: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
  esac
done
[ ${#parts[@]} -gt 0 ] || parts=(core abi track jni arbitration sort governor metrics datafusion)
want() { local p; for p in "${parts[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1; }

BENCH_DIR="${BENCH_DIR:-$ROOT/target/bench}"
BENCH_ESTIMATE="${BENCH_ESTIMATE:-median}"
SPARK_VERSION="${SPARK_VERSION:-3.5}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
if [ "$quick" = 1 ]; then
  SORT_KEYS="${SORT_KEYS:-5000000}"; SORT_ROUNDS="${SORT_ROUNDS:-1}"
else
  SORT_KEYS="${SORT_KEYS:-50000000}"; SORT_ROUNDS="${SORT_ROUNDS:-5}"
fi
SORT_BUFFER_MIB="${SORT_BUFFER_MIB:-16}"
if [ "$quick" = 1 ]; then DF_ROUNDS="${DF_ROUNDS:-1}"; else DF_ROUNDS="${DF_ROUNDS:-15}"; fi
if [ "$quick" = 1 ]; then DF_FAIL_RUNS="${DF_FAIL_RUNS:-2}"; else DF_FAIL_RUNS="${DF_FAIL_RUNS:-5}"; fi
case "$BENCH_ESTIMATE" in median|mean) ;; *) echo "bench.sh: BENCH_ESTIMATE must be median or mean" >&2; exit 2 ;; esac
mkdir -p "$BENCH_DIR"
export CARGO_TERM_COLOR=never
export GRADLE_USER_HOME="${GRADLE_USER_HOME:-$ROOT/.cache/gradle}"

failed=0
rows=()      # table rows, markdown
notes=()     # lines printed under the table
row() { rows+=("| $1 | $2 | $3 | $4 | $5 | $6 |"); }
fail_part() { # part log
  failed=1
  row "**$1: did not run**" "see ${2#"$ROOT"/}" "" "" "" ""
  echo "bench.sh: $1 failed; last lines of ${2#"$ROOT"/}:" >&2
  tail -n 30 "$2" >&2 || true
}
step() { echo "bench.sh: $*" >&2; }

# awk helpers: calc EXPR, fmt_ns NS, ratio A B, met CONDITION (prints yes / **no**)
calc() { awk "BEGIN { printf \"%s\", $1 }"; }
fmt_ns() { awk -v v="$1" 'BEGIN {
  if (v >= 1e9) printf "%.2f s", v / 1e9; else if (v >= 1e6) printf "%.2f ms", v / 1e6;
  else if (v >= 1e4) printf "%.1f µs", v / 1e3; else if (v >= 1e3) printf "%.2f µs", v / 1e3;
  else if (v >= 100) printf "%.0f ns", v; else printf "%.1f ns", v }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f×", a / b }'; }
met() { if awk "BEGIN { exit !($1) }"; then echo yes; else echo "**no**"; fi; }
group() { awk -v n="$1" 'BEGIN { s = sprintf("%d", n); r = "";
  while (length(s) > 3) { r = "," substr(s, length(s) - 2) r; s = substr(s, 1, length(s) - 3) }; print s r }'; }

# ---- machine --------------------------------------------------------------------------------------
cpu_model="$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)"
[ -n "$cpu_model" ] || cpu_model="$(lscpu 2>/dev/null | awk -F': *' '/Model name/ { print $2; exit }')"
jdk="$(java -version 2>&1 | awk -F'"' '/version/ { v = $2 } /Runtime Environment/ { r = $0 } END { sub(/.*\(build /, "", r); sub(/\).*/, "", r); print v (r ? " (build " r ")" : "") }')"
machine="$(nproc) CPUs ($cpu_model), Linux $(uname -r), JDK $jdk, $(rustc --version | cut -d' ' -f1-2)"
load_start="$(cut -d' ' -f1-3 /proc/loadavg)"
t_start=$(date +%s)
step "machine: $machine; load average $load_start"

# ---- 1. core (criterion) --------------------------------------------------------------------------
core_part() {
  local log="$BENCH_DIR/core.log" crit="$BENCH_DIR/criterion"
  rm -rf "$crit"   # never read a previous run's estimates
  step "core: cargo bench -p nativemem-core --bench core (log: ${log#"$ROOT"/})"
  local env_quick=()
  [ "$quick" = 1 ] && env_quick=(NATIVEMEM_BENCH_QUICK=1)
  if ! env ${env_quick[@]+"${env_quick[@]}"} CRITERION_HOME="$crit" \
      cargo bench -p nativemem-core --bench core >"$log" 2>&1; then
    fail_part core "$log"; return
  fi
  est() { # group/bench -> ns (criterion's point estimate)
    local f="$crit/$1/new/estimates.json"
    [ -f "$f" ] || { echo "bench.sh: $f missing" >&2; return 1; }
    sed -E "s/.*\"$BENCH_ESTIMATE\":\{\"confidence_interval\":\{[^}]*\},\"point_estimate\":([-0-9.eE+]+).*/\1/" "$f"
  }
  local base base1 one three q1 q3 t1 t2 t4 e1 e2 e4 x1 xt1 xt2 xt4
  if ! { base="$(est grow_shrink/baseline_two_atomic_rmw_pairs)" && one="$(est grow_shrink/one_level_pool)" &&
         base1="$(est grow_shrink/baseline_one_atomic_rmw_pair)" &&
         three="$(est grow_shrink/three_level_pool_with_limit)" && q1="$(est grow_shrink/quantum_one_level_pool)" &&
         q3="$(est grow_shrink/quantum_three_level_pool_with_limit)" &&
         t1="$(est grow_shrink/quantum_threads_1)" && t2="$(est grow_shrink/quantum_threads_2)" &&
         t4="$(est grow_shrink/quantum_threads_4)" && e1="$(est grow_shrink/exact_threads_1)" &&
         e2="$(est grow_shrink/exact_threads_2)" && e4="$(est grow_shrink/exact_threads_4)" &&
         x1="$(est grow_shrink/quantum_exclusive_one_level_pool)" &&
         xt1="$(est grow_shrink/quantum_exclusive_threads_1)" && xt2="$(est grow_shrink/quantum_exclusive_threads_2)" &&
         xt4="$(est grow_shrink/quantum_exclusive_threads_4)"; }; then
    fail_part core "$log"; return
  fi
  local b="two atomic RMW pairs: $(fmt_ns "$base")"
  local b1="one atomic RMW pair, one counter (the floor of a shared reservation): $(fmt_ns "$base1")"
  row "core: try_grow_exclusive+shrink_exclusive pair (&mut: no RMW), 1-level pool, 1 MiB quantum (the fast path)" \
      "$(fmt_ns "$x1")" "$b1" "$(ratio "$x1" "$base1")" "≤ 10 ns" "$(met "$x1 <= 10")"
  row "core: try_grow+shrink pair (&self, shared by threads: one RMW each way), same pool and quantum" "$(fmt_ns "$q1")" "$b1" \
      "$(ratio "$q1" "$base1")" "≤ 10 ns" "$(met "$q1 <= 10")"
  row "core: same, 3-level pool path with a limit, 1 MiB quantum" "$(fmt_ns "$q3")" "$b1" "$(ratio "$q3" "$base1")" \
      "≤ 10 ns" "$(met "$q3 <= 10")"
  row "core: same, exact accounting (quantum 0: every level charged), 1-level pool" "$(fmt_ns "$one")" "$b" \
      "$(ratio "$one" "$base")" "—" "—"
  row "core: same, exact accounting, 3-level pool path with a limit" "$(fmt_ns "$three")" "$b" \
      "$(ratio "$three" "$base")" "—" "—"
  local cores; cores="$(nproc)"
  row "core: pair per thread, 2 threads on one manager (own reservations), 1 MiB quantum" "$(fmt_ns "$t2")" \
      "1 thread: $(fmt_ns "$t1")" "$(ratio "$t2" "$t1")" "≤ 1.5×" "$(met "$t2 / $t1 <= 1.5")"
  row "core: pair per thread, 4 threads on one manager, 1 MiB quantum ($cores cores: ideal $(awk -v c="$cores" 'BEGIN { printf "%.1f", (4 > c ? 4 / c : 1) }')×)" \
      "$(fmt_ns "$t4")" "1 thread: $(fmt_ns "$t1")" "$(ratio "$t4" "$t1")" "—" "—"
  row "core: exclusive pair per thread, 2 / 4 threads on one manager, 1 MiB quantum" "$(fmt_ns "$xt2") / $(fmt_ns "$xt4")" \
      "1 thread: $(fmt_ns "$xt1")" "$(ratio "$xt2" "$xt1") / $(ratio "$xt4" "$xt1")" "≤ 1.5× (2 threads)" "$(met "$xt2 / $xt1 <= 1.5")"
  row "core: pair per thread, 2 / 4 threads on one manager, exact accounting" "$(fmt_ns "$e2") / $(fmt_ns "$e4")" \
      "1 thread: $(fmt_ns "$e1")" "$(ratio "$e2" "$e1") / $(ratio "$e4" "$e1")" "—" "—"
  local size label sys nm nq floor
  for size in 64 4096 65536 1048576; do
    case $size in 64) label="64 B" ;; 4096) label="4 KiB" ;; 65536) label="64 KiB" ;; 1048576) label="1 MiB" ;; esac
    if ! { sys="$(est "allocate_free/system/$size")" && nm="$(est "allocate_free/nativemem/$size")" &&
           nq="$(est "allocate_free/nativemem_quantum/$size")" &&
           floor="$(est "allocate_free/system_plus_four_rmw/$size")"; }; then
      fail_part core "$log"; return
    fi
    row "core: Pool::allocate+free, $label, 1 MiB quantum (exact accounting: $(fmt_ns "$nm"), $(ratio "$nm" "$sys"))" \
        "$(fmt_ns "$nq")" "system alloc+free: $(fmt_ns "$sys") (+ 4 atomic RMWs, the floor of a shared record: $(fmt_ns "$floor"))" \
        "$(ratio "$nq" "$sys")" "≤ 1.3×" "$(met "$nq / $sys <= 1.3")"
  done
}

# ---- 1a. the engine ABI from a C engine (tests/c/bench_abi.c) ----------------------------------------
abi_part() {
  local log="$BENCH_DIR/abi.log" crit="$BENCH_DIR/criterion-abi" bin="$BENCH_DIR/bench_abi"
  local lib="${ABI_LIBRARY:-$TARGET_DIR/release/libnativemem_jni.so}"
  rm -rf "$crit"
  step "abi: release library, bench_abi, core shared pair baseline (log: ${log#"$ROOT"/})"
  local env_quick=() abi_env=()
  [ "$quick" = 1 ] && { env_quick=(NATIVEMEM_BENCH_QUICK=1); abi_env=(BENCH_ITERS=200000 BENCH_ROUNDS=2); }
  if ! { { [ -n "${ABI_LIBRARY:-}" ] || cargo build --release -p nativemem-jni; } &&
         cc -std=c11 -O2 -Wall -Wextra -Werror -Iinclude -o "$bin" tests/c/bench_abi.c -ldl -lpthread &&
         echo "library: $lib" &&
         env ${abi_env[@]+"${abi_env[@]}"} "$bin" "$lib" &&
         env ${env_quick[@]+"${env_quick[@]}"} CRITERION_HOME="$crit" \
           cargo bench -p nativemem-core --bench core -- '^grow_shrink/quantum_one_level_pool$'; } >"$log" 2>&1; then
    fail_part abi "$log"; return
  fi
  local core
  core="$(sed -E "s/.*\"$BENCH_ESTIMATE\":\{\"confidence_interval\":\{[^}]*\},\"point_estimate\":([-0-9.eE+]+).*/\1/" \
    "$crit/grow_shrink/quantum_one_level_pool/new/estimates.json" 2>/dev/null)" || { fail_part abi "$log"; return; }
  [ -n "$core" ] || { fail_part abi "$log"; return; }
  v() { awk -v k="$1" -v s="$2" '$1 == "BENCH" && $2 == k && $3 == s { print $4; found = 1 } END { exit !found }' "$log"; }
  # Why a target is missed (printed with the "no"): what the design costs where, and what is not built.
  local why_pin="each call pins its object's slot (one locked RMW in, one out) and crosses the boundary code (admission, per-thread call record, status and out-parameters): ~27 ns over the core call on the 2-vCPU VM; with both locked instructions replaced by plain stores (timing only) a call still costs 19.5 ns: no pin design reaches 10 ns through this boundary (README)"
  local why_alloc="two ABI calls (see the call floor row) around the core's allocate+free, which is the task's mimalloc heap plus the pool's accounting: at least four locked RMWs (charge, count, free's check-word CAS, release; ~5-10 ns each here) where glibc takes none (README)"
  local why_scale="nothing of the ABI is shared by the two threads' calls (objects pinned on their own lines), so this is the machine: load average $load_start at start, other processes share the CPUs"
  metr() { # condition reason
    if awk "BEGIN { exit !($1) }"; then echo yes; else echo "**no**: $2"; fi; }
  local p1 p22 p21 f1 f22 f21
  if ! { p1="$(v pair 1t)" && p22="$(v pair 2t2m)" && p21="$(v pair 2t1m)" &&
         f1="$(v floor 1t)" && f22="$(v floor 2t2m)" && f21="$(v floor 2t1m)"; }; then
    fail_part abi "$log"; return
  fi
  local cb="core shared pair (&self, 1 MiB quantum): $(fmt_ns "$core")"
  row "abi: reservation_try_grow+shrink pair, 64 B, 1 MiB quantum, 1 thread" "$(fmt_ns "$p1")" "$cb" \
      "$(ratio "$p1" "$core")" "≤ 1.5×" "$(metr "$p1 / $core <= 1.5" "$why_pin")"
  row "abi: same pair, 2 threads × 2 managers (two tasks), per thread" "$(fmt_ns "$p22")" "1 thread: $(fmt_ns "$p1")" \
      "$(ratio "$p22" "$p1")" "≤ 1.15×" "$(metr "$p22 / $p1 <= 1.15" "$why_scale")"
  row "abi: same pair, 2 threads × 1 manager (own pools and reservations), per thread" "$(fmt_ns "$p21")" \
      "1 thread: $(fmt_ns "$p1")" "$(ratio "$p21" "$p1")" "≤ 1.3×" "$(metr "$p21 / $p1 <= 1.3" "$why_scale")"
  row "abi: call floor (reservation_size), 1 thread" "$(fmt_ns "$f1")" "one core call (half the core shared pair): $(fmt_ns "$(calc "$core / 2")")" \
      "$(ratio "$f1" "$(calc "$core / 2")")" "≤ 10 ns" "$(metr "$f1 <= 10" "$why_pin")"
  row "abi: call floor, 2 threads × 2 managers / 2 threads × 1 manager, per thread" "$(fmt_ns "$f22") / $(fmt_ns "$f21")" \
      "1 thread: $(fmt_ns "$f1")" "$(ratio "$f22" "$f1") / $(ratio "$f21" "$f1")" "≤ 1.15× / ≤ 1.3×" \
      "$(metr "$f22 / $f1 <= 1.15 && $f21 / $f1 <= 1.3" "$why_scale")"
  local size label target a1 a22 a21 m1 m22 m21
  for size in 64 4096 1048576; do
    case $size in 64) label="64 B"; target=1.5 ;; 4096) label="4 KiB"; target=1.3 ;; 1048576) label="1 MiB"; target=1.3 ;; esac
    if ! { a1="$(v "alloc_$size" 1t)" && a22="$(v "alloc_$size" 2t2m)" && a21="$(v "alloc_$size" 2t1m)" &&
           m1="$(v "malloc_$size" 1t)" && m22="$(v "malloc_$size" 2t2m)" && m21="$(v "malloc_$size" 2t1m)"; }; then
      fail_part abi "$log"; return
    fi
    row "abi: allocate+free, $label, 1 thread" "$(fmt_ns "$a1")" "malloc+free: $(fmt_ns "$m1")" \
        "$(ratio "$a1" "$m1")" "≤ ${target}×" "$(metr "$a1 / $m1 <= $target" "$why_alloc")"
    row "abi: allocate+free, $label, 2 threads × 2 managers / 2 threads × 1 manager, per thread" \
        "$(fmt_ns "$a22") / $(fmt_ns "$a21")" "1 thread: $(fmt_ns "$a1") (malloc+free on 2 threads: $(fmt_ns "$m22"))" \
        "$(ratio "$a22" "$a1") / $(ratio "$a21" "$a1")" "≤ 1.15× / ≤ 1.3×" \
        "$(metr "$a22 / $a1 <= 1.15 && $a21 / $a1 <= 1.3" "malloc+free alone went $(ratio "$m22" "$m1") from 1 to 2 threads in this run (the system allocator under Pool::allocate, and the machine: load average $load_start); with 1 manager the two threads share one task heap, whose kept huge blocks are per CPU shard (core)")"
  done
  notes+=("abi: library ${lib#"$ROOT"/}; malloc+free per thread, 2 threads: $(fmt_ns "$m22") (2 managers' setup) / $(fmt_ns "$m21")")
}

# ---- 1b. tracking allocator (criterion) ------------------------------------------------------------
track_part() {
  local log="$BENCH_DIR/track.log"
  step "track: cargo bench -p nativemem-track --bench track (log: ${log#"$ROOT"/})"
  local env_quick=()
  [ "$quick" = 1 ] && env_quick=(NATIVEMEM_BENCH_QUICK=1)
  if ! env ${env_quick[@]+"${env_quick[@]}"} cargo bench -p nativemem-track --bench track >"$log" 2>&1; then
    fail_part track "$log"; return
  fi
  local size label sys hdr tr ub r
  for size in 64 4096 65536 1048576; do
    case $size in 64) label="64 B" ;; 4096) label="4 KiB" ;; 65536) label="64 KiB" ;; 1048576) label="1 MiB" ;; esac
    if ! read -r sys hdr tr ub r < <(awk -v s="$size" '$1 == "BENCH" && $2 == "track_alloc_free" && $3 == s { print $4, $5, $6, $7, $8; found = 1 } END { exit !found }' "$log"); then
      fail_part track "$log"; return
    fi
    row "track: alloc+free on a tracked thread, $label (median of per-round ratios)" "$(fmt_ns "$tr")" \
        "wrapped system alloc+free: $(fmt_ns "$sys")" "$(awk -v r="$r" 'BEGIN { printf "%.2f×", r }')" "≤ 1.2×" "$(met "$r <= 1.2")"
    notes+=("track $label: system asked for block + 16-byte header $(fmt_ns "$hdr"); unbound thread (header, no accounting) $(fmt_ns "$ub")")
  done
}

# ---- 2. JNI (Java harness in a Spark task) ---------------------------------------------------------
jni_part() {
  local log="$BENCH_DIR/jni.log"
  step "jni: setup + gradle assemble + spark-submit $SPARK_VERSION JniBench (log: ${log#"$ROOT"/})"
  {
    bash scripts/setup.sh &&
    gradle --offline --no-daemon --console=plain -q assemble &&
    # The JNI harness (org.nativemem.NativeBench) lives only in the test library.
    cargo build --profile testlib -p nativemem-jni --features testing &&
    # Run copies: another build in this checkout may rewrite build/libs while the JVM reads it.
    cp build/libs/nativemem.jar build/libs/nativemem-e2e.jar target/testlib/libnativemem_jni.so "$BENCH_DIR/" &&
    { local q=(); [ "$quick" = 1 ] && q=(--quick)
      NATIVEMEM_JAR="$BENCH_DIR/nativemem.jar" NATIVEMEM_LIBRARY="$BENCH_DIR/libnativemem_jni.so" \
        bash scripts/spark-submit.sh "$SPARK_VERSION" --master 'local[1]' \
        --conf spark.memory.offHeap.enabled=true --conf spark.memory.offHeap.size=2g \
        --class org.nativemem.bench.JniBench "$BENCH_DIR/nativemem-e2e.jar" ${q[@]+"${q[@]}"}; }
  } >"$log" 2>&1 || { fail_part jni "$log"; return; }
  v() { awk -v k="$1" '$1 == "BENCH" && $2 == k { $1 = ""; $2 = ""; sub(/^ +/, ""); print; found = 1 } END { exit !found }' "$log"; }
  local nm jv jv_res pg up up_cold res res_cold pg_up cc noop mode spark quantum block
  if ! { nm="$(v grow_nativemem_ns)" && pg="$(v grow_pergrow_ns)" && up="$(v upcalls_per_gib_nativemem)" &&
         jv="$(v grow_java_ns)" && jv_res="$(v reserve_upcalls_per_gib_java)" &&
         quantum="$(v quantum_bytes)" && block="$(v block_bytes)" &&
         up_cold="$(v upcalls_per_gib_nativemem_cold)" && res="$(v reserve_upcalls_per_gib_nativemem)" &&
         res_cold="$(v reserve_upcalls_per_gib_nativemem_cold)" && pg_up="$(v upcalls_per_gib_pergrow)" &&
         cc="$(v create_close_ns)" && noop="$(v noop_downcall_ns)" && mode="$(v mode)" && spark="$(v spark_version)"; }; then
    fail_part jni "$log"; return
  fi
  local speedup; speedup="$(calc "$pg / $nm")"
  local conf; conf="default config: $((block >> 20)) MiB blocks, $((quantum >> 20)) MiB quantum"
  row "jni: native 64 KiB grow (loop inside the library), nativemem ($conf), Spark $spark TaskMemoryManager ($mode)" \
      "$(fmt_ns "$nm")/grow" "one upcall per grow (Comet's design): $(fmt_ns "$pg")/grow" \
      "$(awk -v s="$speedup" 'BEGIN { printf "%.1f× faster", s }')" "≥ 20× faster" "$(met "$speedup >= 20")"
  # The API a user calls: a Java loop of NativeReservation.grow. With the default quantum most
  # grows are one CAS on the reservation's Java-side slack; one JNI downcall per quantum charged
  # (the quantum grows with the reservation, up to 8 times the configured one).
  speedup="$(calc "$pg / $jv")"
  row "jni: Java NativeReservation.grow 64 KiB (Java-side slack: one CAS per grow, one JNI downcall per quantum, $((quantum >> 20)) MiB growing to $((8 * quantum >> 20)) MiB; then one shrink), same manager, 1 task" \
      "$(fmt_ns "$jv")/grow" "one upcall per grow (Comet's design): $(fmt_ns "$pg")/grow" \
      "$(awk -v s="$speedup" 'BEGIN { printf "%.1f× faster", s }')" "≥ 20× faster" "$(met "$speedup >= 20")"
  notes+=("jni Java NativeReservation.grow: reserve upcalls per GiB $jv_res; rounds (ns/grow) $(awk '$1 == "BENCH_ROUNDS" && $2 == "grow_java_ns" { print $3 }' "$log")")
  local res_max=$(( res_cold > res ? res_cold : res ))
  row "jni: JVM reserve upcalls per GiB grown (new manager / steady state)" \
      "$res_cold / $res (+1 unreserve)" "one upcall per grow: $(group $((pg_up - 1))) (+1 unreserve)" \
      "$(awk -v a="$res_max" -v b="$((pg_up - 1))" 'BEGIN { printf "1/%.0f", b / a }')" "≤ 128" "$(met "$res_max <= 128")"
  row "jni: NativeMemoryManager create+close with a Spark listener" "$(fmt_ns "$cc")" \
      "empty JNI downcall: $(fmt_ns "$noop")" "$(ratio "$cc" "$noop")" "≤ 20 µs" "$(met "$cc <= 20000")"
  notes+=("jni: all upcalls per GiB, reserve + unreserve: new manager $up_cold, steady state $up; per-grow $(group "$pg_up").")
  # The same grows in two concurrent tasks of one executor: Spark's memory-manager lock is shared.
  local log2="$BENCH_DIR/jni-2tasks.log"
  step "jni: spark-submit $SPARK_VERSION JniBench --tasks 2 on local[2] (log: ${log2#"$ROOT"/})"
  { local q=(); [ "$quick" = 1 ] && q=(--quick)
    NATIVEMEM_JAR="$BENCH_DIR/nativemem.jar" NATIVEMEM_LIBRARY="$BENCH_DIR/libnativemem_jni.so" \
      bash scripts/spark-submit.sh "$SPARK_VERSION" --master 'local[2]' \
      --conf spark.memory.offHeap.enabled=true --conf spark.memory.offHeap.size=4g \
      --class org.nativemem.bench.JniBench "$BENCH_DIR/nativemem-e2e.jar" --tasks 2 ${q[@]+"${q[@]}"}; } >"$log2" 2>&1 ||
    { fail_part jni-2tasks "$log2"; return; }
  local nm2 pg2 jv2
  mean() { awk -v k="$1" '$1 == "BENCH" && $2 == k { s += $3; n++ } END { if (n < 2) exit 1; printf "%.2f", s / n }' "$log2"; }
  if ! { nm2="$(mean grow_nativemem_ns)" && pg2="$(mean grow_pergrow_ns)" && jv2="$(mean grow_java_ns)"; }; then
    fail_part jni-2tasks "$log2"; return
  fi
  speedup="$(calc "$pg2 / $nm2")"
  row "jni: same, 2 concurrent tasks on local[2] (Spark's memory-manager lock shared; mean of the tasks' medians)" \
      "$(fmt_ns "$nm2")/grow" "one upcall per grow: $(fmt_ns "$pg2")/grow" \
      "$(awk -v s="$speedup" 'BEGIN { printf "%.1f× faster", s }')" "≥ 20× faster" "$(met "$speedup >= 20")"
  speedup="$(calc "$pg2 / $jv2")"
  row "jni: Java NativeReservation.grow, 2 concurrent tasks on local[2] (mean of the tasks' medians)" \
      "$(fmt_ns "$jv2")/grow" "one upcall per grow: $(fmt_ns "$pg2")/grow" \
      "$(awk -v s="$speedup" 'BEGIN { printf "%.1f× faster", s }')" "≥ 20× faster" "$(met "$speedup >= 20")"
  notes+=("jni rounds (ns/grow): nativemem $(awk '$1 == "BENCH_ROUNDS" && $2 == "grow_nativemem_ns" { print $3 }' "$log"); per-grow $(awk '$1 == "BENCH_ROUNDS" && $2 == "grow_pergrow_ns" { print $3 }' "$log")")
}

arbitration_part() {
  local log="$BENCH_DIR/arbitration.log"
  step "arbitration: gradle assemble + ArbitrationBench on Spark $SPARK_VERSION's jars (log: ${log#"$ROOT"/})"
  local home=".cache/spark-$SPARK_VERSION/pyspark"
  {
    bash scripts/setup.sh &&
    gradle --offline --no-daemon --console=plain -q assemble &&
    cp build/libs/nativemem.jar build/libs/nativemem-e2e.jar "$BENCH_DIR/" &&
    { local q=(); [ "$quick" = 1 ] && q=(--quick)
      java -Dlog4j.configurationFile="$ROOT/tests/spark/log4j2.properties" \
        -cp "$home/jars/*:$BENCH_DIR/nativemem.jar:$BENCH_DIR/nativemem-e2e.jar" \
        org.nativemem.bench.ArbitrationBench ${q[@]+"${q[@]}"}; }
  } >"$log" 2>&1 || { fail_part arbitration "$log"; return; }
  v() { awk -v k="$1" '$1 == "BENCH" && $2 == k { print $3; found = 1 } END { exit !found }' "$log"; }
  local on off added rec spill
  if ! { on="$(v fastpath_on_ns)" && off="$(v fastpath_off_ns)" && added="$(v fastpath_added_ns)" &&
         rec="$(v short_reclaim_ns)" && spill="$(v short_spill_ns)"; }; then
    fail_part arbitration "$log"; return
  fi
  row "arbitration: Java grow+shrink 64 KiB inside the cushion, arbitration on (median pair; added: median of per-round differences)" \
      "$(fmt_ns "$on") (added $(fmt_ns "$added"))" "arbitration off: $(fmt_ns "$off")" "$(ratio "$on" "$off")" "≤ +1 ns" \
      "$(if awk "BEGIN { exit !($added <= 1) }"; then echo yes; else echo "**no**: the fast path reads no arbitration state (it is consulted only on a short grant), so this is the machine: load average $load_start at start; rounds $(awk '$1 == "BENCH_ROUNDS" && $2 == "fastpath_added_ns" { print $3 }' "$log")"; fi)"
  row "arbitration: short 8 MiB grow served by another task's idle block (cross-task reclaim)" "$(fmt_ns "$rec")" \
      "served by Spark spilling the task's own JVM operator (no I/O): $(fmt_ns "$spill")" "$(ratio "$rec" "$spill")" \
      "reported" "—"
  notes+=("arbitration: a real spill also writes and later reads back its data (ms per MiB on disk); the reclaim moves no data.")
}

# ---- 3. example sort: accounting on vs off ---------------------------------------------------------
sort_part() {
  local log="$BENCH_DIR/sort.log"
  step "sort: $SORT_ROUNDS x sort_bench $SORT_KEYS keys, ${SORT_BUFFER_MIB} MiB buffer (log: ${log#"$ROOT"/})"
  : >"$log"
  if ! cargo build --release -p nativemem-examples --example sort_bench >>"$log" 2>&1; then
    fail_part sort "$log"; return
  fi
  # The first mode a process runs pays its cold start (page faults, malloc's dynamic mmap
  # threshold, a new spill dir): rounds alternate the order where sort_bench supports choosing
  # it (SORT_BENCH_ORDER; without that support every round runs Pool first).
  local i out order
  for ((i = 1; i <= SORT_ROUNDS; i++)); do
    order=pool-first; [ $((i % 2)) -eq 0 ] && order=untracked-first
    if ! out="$(SORT_BENCH_ORDER=$order "$TARGET_DIR/release/examples/sort_bench" "$SORT_KEYS" "$SORT_BUFFER_MIB" 2>>"$log")"; then
      fail_part sort "$log"; return
    fi
    printf 'round %d (asked SORT_BENCH_ORDER=%s; ran %s first)\n%s\n' "$i" "$order" \
      "$(awk 'NR == 1 { print $1 }' <<<"$out")" "$out" >>"$log"
  done
  # Per round (one process runs both modes): the two totals and their ratio; then medians.
  local summary
  if ! summary="$(awk '
      function median(a, n,   i, j, t) {
        for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
      /^round / { p = ""; u = "" }
      /^(Pool|Untracked) / { t = ""; for (f = 1; f < NF; f++) if ($f == "total") t = $(f + 1) + 0 }
      /^Pool / { p = t }
      /^Untracked / { u = t }
      /^(Pool|Untracked) / && p != "" && u != "" {
        n++; P[n] = p; U[n] = u; R[n] = p / u; rs = rs (n > 1 ? "," : "") sprintf("%.3f", p / u); p = ""; u = "" }
      END { if (n == 0) exit 1; printf "%s %s %s %s\n", median(P, n), median(U, n), median(R, n), rs }' "$log")"; then
    fail_part sort "$log"; return
  fi
  local p u r rs
  read -r p u r rs <<<"$summary"
  row "sort: external sort of $(group "$SORT_KEYS") i64 keys, ${SORT_BUFFER_MIB} MiB buffer (spills), accounting on" \
      "$(awk -v v="$p" 'BEGIN { printf "%.2f s", v }')" \
      "accounting off (system allocator): $(awk -v v="$u" 'BEGIN { printf "%.2f s", v }')" \
      "$(awk -v r="$r" 'BEGIN { printf "%.3f× (%+.1f%%)", r, (r - 1) * 100 }')" "≤ 1.03×" "$(met "$r <= 1.03")"
  notes+=("sort: accounting on/off total time per process: $rs (the figure is their median; times are medians of $SORT_ROUNDS processes)")
}

# ---- the container governor on vs off, in Spark ------------------------------------------------------
governor_part() {
  local log="$BENCH_DIR/governor.log" rounds="${GOVERNOR_ROUNDS:-$([ "$quick" = 1 ] && echo 1 || echo 5)}"
  local sort_rows sql_rows
  sort_rows="${GOVERNOR_SORT_ROWS:-$([ "$quick" = 1 ] && echo 2m || echo 40m)}"
  sql_rows="${GOVERNOR_SQL_ROWS:-$([ "$quick" = 1 ] && echo 4000000 || echo 150000000)}"
  step "governor: $rounds round(s) of the Spark sort ($sort_rows rows) and SQL ($sql_rows rows), governor on vs off (log: ${log#"$ROOT"/})"
  : >"$log"
  if [ ! -f build/libs/nativemem-e2e.jar ] || [ ! -f build/libs/nativemem-examples.jar ]; then
    if ! GRADLE_USER_HOME="$ROOT/.cache/gradle" gradle --offline --no-daemon --console=plain -q assemble >>"$log" 2>&1; then
      fail_part governor "$log"; return
    fi
  fi
  one() { # workload on|off -> seconds
    local enabled=false extra=()
    [ "$2" = on ] && enabled=true extra=(--conf spark.nativemem.containerLimit=64g)
    local out
    if [ "$1" = sort ]; then
      out="$(bash scripts/spark-submit.sh "$SPARK_VERSION" --master 'local[2]'         --conf spark.jars=build/libs/nativemem-examples.jar --conf spark.plugins=org.nativemem.spark.NativeMemoryPlugin         --conf spark.memory.offHeap.enabled=true --conf spark.memory.offHeap.size=64m         --conf spark.nativemem.governor.enabled=$enabled "${extra[@]}"         --class org.nativemem.examples.SortJob build/libs/nativemem-e2e.jar --rows "$sort_rows" --partitions 2 2>>"$log")" || return 1
      awk '/^time: / { for (i = 1; i <= NF; i++) if ($i == "job") { print $(i + 1); exit } }' <<<"$out"
    else
      out="$(bash scripts/spark-submit.sh "$SPARK_VERSION" --master 'local[2]'         --conf spark.plugins=org.nativemem.spark.NativeMemoryPlugin         --conf spark.nativemem.governor.enabled=$enabled "${extra[@]}"         --class org.nativemem.bench.SqlBench build/libs/nativemem-e2e.jar --rows "$sql_rows" 2>>"$log")" || return 1
      awk '/^sql job / { print $3; exit }' <<<"$out"
    fi
  }
  local w i on off r ratios first
  for w in sort sql; do
    ratios=()
    for ((i = 1; i <= rounds; i++)); do
      if [ $((i % 2)) -eq 1 ]; then first=on; else first=off; fi
      if [ "$first" = on ]; then on="$(one $w on)" && off="$(one $w off)" || { fail_part governor "$log"; return; }
      else off="$(one $w off)" && on="$(one $w on)" || { fail_part governor "$log"; return; }; fi
      [ -n "$on" ] && [ -n "$off" ] || { fail_part governor "$log"; return; }
      echo "$w round $i: on $on s, off $off s" >>"$log"
      ratios+=("$(calc "$on / $off")")
    done
    r="$(printf '%s\n' "${ratios[@]}" | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }')"
    local label="the example sort in Spark ($sort_rows rows, spills both ways)"
    [ "$w" = sql ] && label="plain Spark SQL aggregation + sort ($sql_rows rows, no native operator)"
    row "governor: $label, governor on" "$(grep "^$w round" "$log" | tail -1 | awk '{ print $5 " s" }')" \
      "governor off: $(grep "^$w round" "$log" | tail -1 | awk '{ print $8 " s" }')" \
      "$(awk -v r="$r" 'BEGIN { printf "%.3f× (%+.1f%%)", r, (r - 1) * 100 }')" "≤ 1.01×" \
      "$(if [ "$(printf '%s\n' "${ratios[@]}" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { print (hi - lo > 0.05) }')" = 1 ]; then
           echo "**noisy**: per-round ratios spread over 5%, re-run on an idle machine"; else met "$r <= 1.01"; fi)"
    notes+=("governor ($w): on/off per round: ${ratios[*]} (median shown; $rounds rounds, alternating order)")
  done
}

# ---- Spark task metrics, accumulators and driver reports on vs off, in Spark -----------------------
# The governor part's two workloads; only spark.nativemem.metrics.enabled differs between the arms.
metrics_part() {
  local log="$BENCH_DIR/metrics.log" rounds="${METRICS_ROUNDS:-$([ "$quick" = 1 ] && echo 1 || echo 5)}"
  local sort_rows sql_rows
  sort_rows="${METRICS_SORT_ROWS:-$([ "$quick" = 1 ] && echo 2m || echo 40m)}"
  sql_rows="${METRICS_SQL_ROWS:-$([ "$quick" = 1 ] && echo 4000000 || echo 150000000)}"
  step "metrics: $rounds round(s) of the Spark sort ($sort_rows rows) and SQL ($sql_rows rows), metrics on vs off (log: ${log#"$ROOT"/})"
  : >"$log"
  if [ ! -f build/libs/nativemem-e2e.jar ] || [ ! -f build/libs/nativemem-examples.jar ]; then
    if ! GRADLE_USER_HOME="$ROOT/.cache/gradle" gradle --offline --no-daemon --console=plain -q assemble >>"$log" 2>&1; then
      fail_part metrics "$log"; return
    fi
  fi
  local out_file="$BENCH_DIR/metrics.out" cpu_file="$BENCH_DIR/metrics.cpu"
  one_metrics() { # workload on|off -> "job-seconds cpu-seconds"
    local enabled=false job
    [ "$2" = on ] && enabled=true
    local args=(--conf spark.plugins=org.nativemem.spark.NativeMemoryPlugin --conf spark.nativemem.metrics.enabled=$enabled)
    if [ "$1" = sort ]; then
      args+=(--conf spark.jars=build/libs/nativemem-examples.jar
        --conf spark.memory.offHeap.enabled=true --conf spark.memory.offHeap.size=64m
        --class org.nativemem.examples.SortJob build/libs/nativemem-e2e.jar --rows "$sort_rows" --partitions 2)
    else
      args+=(--class org.nativemem.bench.SqlBench build/libs/nativemem-e2e.jar --rows "$sql_rows")
    fi
    # The job's own time as it prints it, and the CPU time (user + sys) of the whole process tree
    # (bash's `time`: the JVM is a waited-for descendant): other work on the machine stretches
    # the first far more than the second.
    local TIMEFORMAT='%U %S'
    { time bash scripts/spark-submit.sh "$SPARK_VERSION" --master 'local[2]' "${args[@]}" \
        >"$out_file" 2>>"$log"; } 2>"$cpu_file" || return 1
    if [ "$1" = sort ]; then
      job="$(awk '/^time: / { for (i = 1; i <= NF; i++) if ($i == "job") { print $(i + 1); exit } }' "$out_file")"
    else
      job="$(awk '/^sql job / { print $3; exit }' "$out_file")"
    fi
    [ -n "$job" ] || return 1
    echo "$job $(awk '{ printf "%.2f", $1 + $2 }' "$cpu_file")"
  }
  median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
  spread() { sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.3f", hi - lo }'; }
  # As the governor part: noisy when the per-round ratios spread over 5% (wider than the effect judged).
  verdict() { # median spread
    if awk -v s="$2" 'BEGIN { exit !(s > 0.05) }'; then
      echo "**noisy**: per-round ratios spread $2 (> 0.05), re-run on an idle machine"
    else met "$1 <= 1.01"; fi
  }
  local w i on off first ratios cpu_ratios r rc sp spc on_t off_t on_c off_c
  for w in sort sql; do
    ratios=() cpu_ratios=()
    for ((i = 1; i <= rounds; i++)); do
      if [ $((i % 2)) -eq 1 ]; then first=on; else first=off; fi
      if [ "$first" = on ]; then on="$(one_metrics $w on)" && off="$(one_metrics $w off)" || { fail_part metrics "$log"; return; }
      else off="$(one_metrics $w off)" && on="$(one_metrics $w on)" || { fail_part metrics "$log"; return; }; fi
      read -r on_t on_c <<<"$on"; read -r off_t off_c <<<"$off"
      echo "$w round $i: on $on_t s (cpu $on_c s), off $off_t s (cpu $off_c s)" >>"$log"
      ratios+=("$(calc "$on_t / $off_t")")
      cpu_ratios+=("$(calc "$on_c / $off_c")")
    done
    r="$(printf '%s\n' "${ratios[@]}" | median)"; sp="$(printf '%s\n' "${ratios[@]}" | spread)"
    rc="$(printf '%s\n' "${cpu_ratios[@]}" | median)"; spc="$(printf '%s\n' "${cpu_ratios[@]}" | spread)"
    local label="the example sort in Spark ($sort_rows rows, spills both ways: accumulators and Spill columns per task)"
    [ "$w" = sql ] && label="plain Spark SQL aggregation + sort ($sql_rows rows, no native operator: driver reports only)"
    row "metrics: $label, metrics on, job time" "$(grep "^$w round" "$log" | tail -1 | awk '{ print $5 " s" }')" \
      "spark.nativemem.metrics.enabled=false: $(grep "^$w round" "$log" | tail -1 | awk '{ print $11 " s" }')" \
      "$(awk -v r="$r" 'BEGIN { printf "%.3f× (%+.1f%%)", r, (r - 1) * 100 }')" "≤ 1.01×" "$(verdict "$r" "$sp")"
    row "metrics: same, CPU time of the whole spark-submit (user + sys)" \
      "$(grep "^$w round" "$log" | tail -1 | awk '{ gsub(/\)/, "", $8); print $8 " s" }')" \
      "off: $(grep "^$w round" "$log" | tail -1 | awk '{ gsub(/\)/, "", $14); print $14 " s" }')" \
      "$(awk -v r="$rc" 'BEGIN { printf "%.3f× (%+.1f%%)", r, (r - 1) * 100 }')" "≤ 1.01×" "$(verdict "$rc" "$spc")"
    notes+=("metrics ($w): on/off per round, job time: ${ratios[*]} (spread $sp); CPU time: ${cpu_ratios[*]} (spread $spc) (medians shown; $rounds rounds, alternating order)")
  done
}

# ---- 4. DataFusion: nativemem's pool vs GreedyMemoryPool --------------------------------------------
datafusion_part() {
  [ "${DF_FAIL_ONLY:-0}" = 1 ] || datafusion_timed_part
  datafusion_failures_part
}

datafusion_timed_part() {
  local log="$BENCH_DIR/datafusion.log"
  step "datafusion: df_bench, $DF_ROUNDS rounds (log: ${log#"$ROOT"/})"
  if ! { cargo build --release -p nativemem-datafusion --example df_bench &&
         "$TARGET_DIR/release/examples/df_bench" "$DF_ROUNDS"; } >"$log" 2>&1; then
    fail_part datafusion "$log"; return
  fi
  v() { awk -v k="$1" '$1 == "BENCH" && $2 == k { print $3; found = 1 } END { exit !found }' "$log"; }
  local q nm gr nf df lc pc limit
  limit="$(v df_limit_mib)" || { fail_part datafusion "$log"; return; }
  ms() { awk -v v="$1" 'BEGIN { printf "%.0f ms", v }'; }
  for q in sort agg; do
    if ! { nm="$(v "df_${q}_nativemem_ms")" && gr="$(v "df_${q}_greedy_ms")" && lc="$(v "df_${q}_listener_calls")" &&
           nf="$(v "df_${q}_nativemem_fair_ms")" && df="$(v "df_${q}_fair_ms")" && pc="$(v "df_${q}_per_call_calls")"; }; then
      fail_part datafusion "$log"; return
    fi
    # Runs that failed for lack of memory (a first-come pool can starve a late consumer) are
    # left out of the medians and counted in the row.
    fl() { local n; n="$(v "df_${q}_$1_failed")" || n="?"; [ "$n" = 0 ] && return; echo ", failed $n of $DF_ROUNDS"; }
    row "datafusion: $q query, ${limit} MiB limit (spills), nativemem's pool, Policy::Greedy$(fl nativemem)" "$(ms "$nm")" \
        "GreedyMemoryPool, same limit$(fl greedy): $(ms "$gr")" "$(ratio "$nm" "$gr")" "≤ 1.05×" "$(met "$nm / $gr <= 1.05")"
    row "datafusion: $q query, same, nativemem's pool, Policy::FairShare (default)$(fl nativemem_fair)" "$(ms "$nf")" \
        "FairSpillPool, same limit$(fl fair): $(ms "$df")" "$(ratio "$nf" "$df")" "≤ 1.05×" "$(met "$nf / $df <= 1.05")"
    row "datafusion: $q query, calls to Spark per query" "$(group "$lc") listener calls" \
        "one per try_grow/grow/shrink (Comet): $(group "$pc")" \
        "$(awk -v a="$lc" -v b="$pc" 'BEGIN { if (a == 0) print "—"; else printf "1/%.0f", b / a }')" "—" "—"
  done
}

# The failure matrix (issue 26): never more failures than DataFusion's FairSpillPool, in any cell.
# One row per query and limit: nativemem's four configurations (task limit or budget-only, spill
# requests off or on) against FairSpillPool's runs of the same query and limit.
datafusion_failures_part() {
  local flog="$BENCH_DIR/datafusion-failures.log"
  step "datafusion: df_failures, $DF_FAIL_RUNS runs per cell (log: ${flog#"$ROOT"/})"
  if ! { cargo build --profile datafusion -p nativemem-datafusion --example df_failures &&
         "$TARGET_DIR/datafusion/examples/df_failures" "$DF_FAIL_RUNS"; } >"$flog" 2>&1; then
    fail_part datafusion-failures "$flog"; return
  fi
  datafusion_failures_rows "$flog"
}

# FAILURES lines of a df_failures log -> one table row per query and limit.
datafusion_failures_rows() {
  grep -q '^FAILURES ' "$1" || { fail_part datafusion-failures "$1"; return; }
  local out
  out="$(awk '
    $1 == "PEAK" { peak[$2] = $3 }
    $1 == "FAILURES" {
      key = $2 " " $6; if (!(key in seen)) { seen[key] = 1; order[n++] = key; lim[key] = $5; q[key] = $2; frac[key] = $6 }
      cell[key] = cell[key] (cell[key] == "" ? "" : ", ") $3 "/" $4 ": " $7 ($8 > 0 ? " (+" $8 " hung)" : "")
      fsp[key] = $9 ($10 > 0 ? " (+" $10 " hung)" : "") " of " $11; runs[key] = $11
      if ($7 + $8 > $9 + $10) bad[key] = 1
    }
    END {
      for (i = 0; i < n; i++) { k = order[i]
        printf "%s\t%s\t%s\t%s\t%s\t%s\n", q[k], frac[k], sprintf("%.1f MiB of %.0f MiB", lim[k] / 1048576, peak[q[k]] / 1048576),
          cell[k] " of " runs[k], fsp[k], (k in bad) ? "**no**" : "yes" }
    }' "$1")"
  local name frac lim cells fsp verdict
  while IFS=$'\t' read -r name frac lim cells fsp verdict; do
    row "datafusion failures: $name, $frac of the unbounded peak ($lim); nativemem (FairShare) failed, per mode/spill requests" \
        "$cells" "FairSpillPool: $fsp" "—" "≤ FairSpillPool's, each" "$verdict"
  done <<<"$out"
}

want abi && abi_part
want core && core_part
want track && track_part
want jni && jni_part
want arbitration && arbitration_part
want sort && sort_part
want governor && governor_part
want metrics && metrics_part
want datafusion && datafusion_part

# ---- the table -------------------------------------------------------------------------------------
load_end="$(cut -d' ' -f1-3 /proc/loadavg)"
{
  echo "Machine: $machine"
  echo "Load average (1/5/15 min): $load_start at start, $load_end at end; $(( $(date +%s) - t_start )) s$([ "$quick" = 1 ] && echo ", --quick: indicative only")"
  echo "Command: scripts/bench.sh$([ "$quick" = 1 ] && echo " --quick")$(printf ' %s' "${parts[@]}"); criterion $BENCH_ESTIMATE estimates; release builds"
  echo
  echo "| Benchmark | Measured | Baseline (same run) | Ratio | Target | Met |"
  echo "|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  if [ ${#notes[@]} -gt 0 ]; then
    echo
    printf '%s\n' "${notes[@]}"
  fi
} | tee "$BENCH_DIR/table.md"
exit "$failed"
