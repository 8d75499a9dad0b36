#!/usr/bin/env bash
# Native memory where Spark users look, end to end with Spark's own components, on one Spark
# release:
#
#   tests/spark/spark-ui.sh <minor>
#
# 1. org.nativemem.e2e.SparkUiJob (local[2], the example's native sort spilling in every task,
#    spark.eventLog.enabled=true) checks the live UI's REST API (nativemem.* task accumulators,
#    Spill (Memory)) and the driver's /metrics/prometheus (the driver plugin's gauges), and writes
#    the stage's values to an expectations file; the driver's log must hold the application's
#    sizing answer. Then, with spark.nativemem.metrics.enabled=false, the example sort's event log
#    must hold no nativemem.* accumulator, no native Spill (Memory) and no sizing answer.
# 2. Spark's own history server (sbin/start-history-server.sh of that runtime) replays the event
#    log: its REST API must show the same stage accumulators, each task's, and both spill figures.
#    Its Environment (REST) must hold the application's sizing answer, the settings the driver
#    logged at the application's end (nativemem.sizing.* among the Spark Properties).
# 3. Headless Chromium (Debian's package, from scripts/setup.sh) renders the history server's stage
#    page: the DOM must hold each accumulator's name next to its value, and the Spill (Memory) and
#    Spill (Disk) figures; a screenshot is kept at target/spark-ui/stage-<minor>.png. Then its
#    Environment page: the sizing answer's rows (screenshot target/spark-ui/environment-<minor>.png).
#
# Where chromium or the history server scripts are missing it prints SKIP with the reason and exits
# 77 (scripts/test.sh counts it apart). Everything it starts is stopped, its files removed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
version="${1:?usage: tests/spark/spark-ui.sh <minor>}"

skip() { echo "SKIP spark-ui@$version: $*"; exit 77; }
fail() { echo "spark-ui@$version: check failed: $*"; exit 1; }

home_var="SPARK_HOME_${version//./_}"
SPARK_HOME="${!home_var:-$ROOT/.cache/spark-$version/pyspark}"
[ -x "$SPARK_HOME/sbin/start-history-server.sh" ] || skip "no $SPARK_HOME/sbin/start-history-server.sh (scripts/setup.sh)"
browser="$(command -v chromium || command -v chromium-browser || true)"
[ -n "$browser" ] || skip "no chromium (scripts/setup.sh installs Debian's package)"
command -v python3 >/dev/null 2>&1 || skip "no python3 (reads the REST API's JSON)"
if [ -z "${JAVA_HOME:-}" ]; then
  JAVA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")"
fi
export JAVA_HOME SPARK_HOME
export SPARK_LOCAL_IP="${SPARK_LOCAL_IP:-127.0.0.1}"

work="$(mktemp -d "${TMPDIR:-/tmp}/nativemem-spark-ui-XXXXXX")"
out="$ROOT/target/spark-ui"
mkdir -p "$work/events" "$work/logs" "$work/pids" "$out"
history_env=(SPARK_PID_DIR="$work/pids" SPARK_LOG_DIR="$work/logs" SPARK_IDENT_STRING="nativemem-ui-$$")
cleanup() {
  if ls "$work/pids"/*.pid >/dev/null 2>&1; then
    env "${history_env[@]}" "$SPARK_HOME/sbin/stop-history-server.sh" >/dev/null 2>&1
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# ---- 1. the application, with its live checks ---------------------------------------------------
t0=$SECONDS
bash scripts/spark-submit.sh "$version" --master 'local[2]' \
  --conf spark.jars=build/libs/nativemem-examples.jar \
  --conf spark.plugins=org.nativemem.spark.NativeMemoryPlugin \
  --conf spark.memory.offHeap.enabled=true --conf spark.memory.offHeap.size=8m \
  --conf spark.nativemem.reservationBlockSize=1m \
  --conf spark.ui.enabled=true \
  --conf 'spark.metrics.conf.*.sink.prometheusServlet.class=org.apache.spark.metrics.sink.PrometheusServlet' \
  --conf 'spark.metrics.conf.*.sink.prometheusServlet.path=/metrics/prometheus' \
  --conf spark.eventLog.enabled=true --conf "spark.eventLog.dir=file:$work/events" \
  --class org.nativemem.e2e.SparkUiJob build/libs/nativemem-e2e.jar --expect "$work/expect.properties" \
  2>&1 | tee "$work/driver.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "SparkUiJob failed (its output above says which check)"
# The driver plugin's one sizing answer for the application, at its end.
grep -q "nativemem: application .* memory recommendation: spark.executor.memoryOverhead=[0-9]*m (set by executor driver)" \
  "$work/driver.log" || fail "the driver logged no sizing answer for the application"
[ -s "$work/expect.properties" ] || fail "SparkUiJob wrote no expectations"
app="$(sed -n 's/^app=//p' "$work/expect.properties")"
stage="$(sed -n 's/^stage=//p' "$work/expect.properties")"
echo "spark-ui@$version: application $app, stage $stage; event log: $(ls "$work/events")"

# ---- 1b. the off switch: spark.nativemem.metrics.enabled=false ------------------------------------
# The example sort spilling natively in every task (--require-spill), its own event log: no task
# carries a nativemem.* accumulator, native spills are not in Spill (Memory), no sizing answer.
mkdir -p "$work/events-off"
bash scripts/spark-submit.sh "$version" --master 'local[2]' \
  --conf spark.jars=build/libs/nativemem-examples.jar \
  --conf spark.plugins=org.nativemem.spark.NativeMemoryPlugin \
  --conf spark.memory.offHeap.enabled=true --conf spark.memory.offHeap.size=8m \
  --conf spark.nativemem.reservationBlockSize=1m --conf spark.nativemem.metrics.enabled=false \
  --conf spark.eventLog.enabled=true --conf "spark.eventLog.dir=file:$work/events-off" \
  --conf spark.eventLog.compress=false \
  --class org.nativemem.examples.SortJob build/libs/nativemem-e2e.jar --rows 2m --partitions 2 --require-spill \
  > "$work/off.log" 2>&1 || { tail -n 40 "$work/off.log"; fail "SortJob with spark.nativemem.metrics.enabled=false"; }
python3 - "$work/events-off" <<'EOF' || fail "spark.nativemem.metrics.enabled=false still records"
import json, os, sys
lines = []
for d, _, files in os.walk(sys.argv[1]):
    for f in files:  # not Hadoop's .crc files nor 4.x's appstatus marker
        if not f.startswith(".") and not f.startswith("appstatus"):
            lines += open(os.path.join(d, f), encoding="utf-8").read().splitlines()
tasks = [e for e in map(json.loads, filter(None, lines)) if e.get("Event") == "SparkListenerTaskEnd"]
assert tasks, "no task in the event log"
for t in tasks:
    acc = [a.get("Name") for a in t["Task Info"].get("Accumulables", []) if str(a.get("Name")).startswith("nativemem.")]
    assert not acc, "task %s carries %s" % (t["Task Info"]["Task ID"], acc)
    assert t["Task Metrics"]["Memory Bytes Spilled"] == 0, "task %s: native spills counted" % t["Task Info"]["Task ID"]
assert not any("nativemem.sizing" in l for l in lines), "a sizing answer in the event log"
print("metrics off: %d tasks (the sort's spilled natively: --require-spill), none carries a nativemem.* accumulator or Spill (Memory); no sizing answer"
      % len(tasks))
EOF

# ---- 2. Spark's history server replays the event log ---------------------------------------------
t1=$SECONDS
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
env "${history_env[@]}" SPARK_HISTORY_OPTS="-Dspark.history.fs.logDirectory=file:$work/events \
-Dspark.history.ui.port=$port -Dspark.history.fs.update.interval=1s" \
  "$SPARK_HOME/sbin/start-history-server.sh" >/dev/null || fail "start-history-server.sh failed"
base="http://127.0.0.1:$port"
api="$base/api/v1/applications/$app"
for _ in $(seq 1 60); do
  # Served, and the stage's JSON (not a page the server answers with while it replays the log).
  curl -sf "$api/stages/$stage/0" -o "$work/stage.json" 2>/dev/null &&
    python3 -c 'import json, sys; json.load(open(sys.argv[1]))["stageId"]' "$work/stage.json" 2>/dev/null && break
  sleep 0.5
done
if ! python3 -c 'import json, sys; json.load(open(sys.argv[1]))["stageId"]' "$work/stage.json" 2>/dev/null; then
  tail -n 40 "$work/logs"/* 2>/dev/null
  head -c 400 "$work/stage.json" 2>/dev/null
  fail "the history server at $base did not serve $api/stages/$stage/0 as JSON within 30 s"
fi
curl -sf "$api/stages/$stage/0/taskList?length=1000" -o "$work/tasks.json" || fail "no task list from the history server"
python3 - "$work/expect.properties" "$work/stage.json" "$work/tasks.json" <<'EOF' || fail "the history server's REST API"
import json, sys
expect = dict(l.strip().split("=", 1) for l in open(sys.argv[1]) if "=" in l)
stage = json.load(open(sys.argv[2]))
tasks = json.load(open(sys.argv[3]))
acc = {a["name"]: a["value"] for a in stage.get("accumulatorUpdates", []) if a.get("name", "").startswith("nativemem.")}
print("history server: stage accumulators", acc, "memoryBytesSpilled", stage.get("memoryBytesSpilled"))
bad = [k for k, v in expect.items() if k.startswith("nativemem.") and acc.get(k) != v]
assert not bad, "stage accumulators differ from the live UI's: %s (history %s, live %s)" % (bad, acc, expect)
assert str(stage.get("memoryBytesSpilled")) == expect["memoryBytesSpilled"], "Spill (Memory) differs"
assert str(stage.get("diskBytesSpilled")) == expect["diskBytesSpilled"] != "0", "Spill (Disk) differs or is 0"
peak = 0
for t in tasks:
    u = {a["name"]: int(a["update"]) for a in t.get("accumulatorUpdates", []) if a.get("name", "").startswith("nativemem.")}
    assert u.get("nativemem.peakBytes", 0) > 0 and u.get("nativemem.spilledBytes", 0) > 0, "task %s: %s" % (t["taskId"], u)
    assert t["taskMetrics"]["memoryBytesSpilled"] >= u["nativemem.spilledBytes"], "task %s spill" % t["taskId"]
    peak = max(peak, u["nativemem.peakBytes"])
assert str(peak) == expect["nativemem.peakBytes"], "max of the tasks' peaks %d != stage %s" % (peak, expect["nativemem.peakBytes"])
print("history server: %d tasks carry nativemem.* accumulators; stage peak = max of the tasks' = %d" % (len(tasks), peak))
EOF

# The application's sizing answer: the driver plugin's listener posted it as an environment update
# before the event bus stopped, so the replayed application's Environment shows the settings the
# driver logged at its end (nativemem.sizing.* among the Spark Properties).
overhead="$(sed -n 's/.*nativemem: application .* memory recommendation: spark.executor.memoryOverhead=\([0-9]*m\) .*/\1/p' "$work/driver.log" | tail -1)"
offheap="$(sed -n 's/.*nativemem: application .* memory recommendation: [^;]*, spark.memory.offHeap.size=\([0-9]*m\) (set by .*/\1/p' "$work/driver.log" | tail -1)"
[ -n "$overhead" ] && [ -n "$offheap" ] || fail "no memoryOverhead / offHeap.size in the driver's sizing answer"
curl -sf "$api/environment" -o "$work/environment.json" || fail "no environment from the history server"
python3 - "$work/environment.json" "$overhead" "$offheap" <<'EOF' || fail "the history server's environment has no sizing answer"
import json, sys
env = json.load(open(sys.argv[1]))
props = dict((k, v) for k, v in env.get("sparkProperties", []) if k.startswith("nativemem.sizing"))
print("history server: environment", props.get("nativemem.sizing.spark.executor.memoryOverhead"),
      props.get("nativemem.sizing.spark.memory.offHeap.size"))
assert props.get("nativemem.sizing.spark.executor.memoryOverhead") == sys.argv[2], \
    "memoryOverhead %s, the driver logged %s" % (props, sys.argv[2])
assert props.get("nativemem.sizing.spark.memory.offHeap.size") == sys.argv[3], \
    "offHeap.size %s, the driver logged %s" % (props, sys.argv[3])
answer = props.get("nativemem.sizing", "")
assert answer.startswith("at application end: spark.executor.memoryOverhead=" + sys.argv[2] + " (set by executor "), answer
assert "nativemem.peakBytes=" in answer, "no task accumulators in %r" % answer
print("history server: the Environment holds the sizing answer:", answer[:160], "...")
EOF

# ---- 3. a real browser renders the stage page -----------------------------------------------------
t2=$SECONDS
page="$base/history/$app/stages/stage/?id=$stage&attempt=0"
chrome=("$browser" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --hide-scrollbars
  --window-size=1400,1300 --virtual-time-budget=10000)
shot="$out/stage-$version.png"
rm -f "$shot"
# One browser run: the rendered DOM on stdout and the screenshot, after the page's scripts ran.
"${chrome[@]}" --screenshot="$shot" --dump-dom "$page" > "$work/stage.html" 2>"$work/chromium.log" \
  || { tail -n 20 "$work/chromium.log"; fail "chromium --screenshot --dump-dom $page"; }
[ -s "$shot" ] || fail "no screenshot at $shot"
python3 - "$work/expect.properties" "$work/stage.html" <<'EOF' || fail "the rendered stage page"
import re, sys
expect = dict(l.strip().split("=", 1) for l in open(sys.argv[1]) if "=" in l)
dom = open(sys.argv[2], encoding="utf-8", errors="replace").read()
names = [k for k in expect if k.startswith("nativemem.")]
assert names, "no accumulators expected"
for k in names:
    # The stage's accumulator table: <td>name</td><td>value</td>
    pat = re.escape(k) + r"\s*</td>\s*<td[^>]*>\s*" + re.escape(expect[k]) + r"\s*<"
    assert re.search(pat, dom), "the rendered page has no row %s = %s" % (k, expect[k])
def human(n):  # Spark's Utils.bytesToString for MiB-sized figures
    return "%.1f MiB" % (n / 1048576.0)
mem, disk = human(int(expect["memoryBytesSpilled"])), human(int(expect["diskBytesSpilled"]))
for label, value in (("Spill (Memory)", mem), ("Spill (Disk)", disk)):
    assert re.search(re.escape(label) + r":?\s*</strong>\s*" + re.escape(value), dom), \
        "the rendered page shows no %s of %s" % (label, value)
print("chromium: the stage page shows %s, Spill (Memory) %s, Spill (Disk) %s"
      % (", ".join("%s=%s" % (k, expect[k]) for k in names), mem, disk))
EOF
# ... and the Environment page with the sizing answer.
envshot="$out/environment-$version.png"
rm -f "$envshot"
"${chrome[@]}" --screenshot="$envshot" --dump-dom "$base/history/$app/environment/" > "$work/environment.html" \
  2>>"$work/chromium.log" || { tail -n 20 "$work/chromium.log"; fail "chromium $base/history/$app/environment/"; }
python3 - "$work/environment.html" "$overhead" "$offheap" <<'EOF' || fail "the rendered Environment page"
import re, sys
dom = open(sys.argv[1], encoding="utf-8", errors="replace").read()
for k, v in (("nativemem.sizing.spark.executor.memoryOverhead", sys.argv[2]),
             ("nativemem.sizing.spark.memory.offHeap.size", sys.argv[3])):
    assert re.search(re.escape(k) + r"\s*</td>\s*<td[^>]*>\s*" + re.escape(v) + r"\s*<", dom), \
        "the rendered Environment page has no row %s = %s" % (k, v)
assert re.search(r"nativemem\.sizing\s*</td>\s*<td[^>]*>\s*at application end: spark\.executor\.memoryOverhead=", dom), \
    "the rendered Environment page has no nativemem.sizing row"
print("chromium: the Environment page shows memoryOverhead %s, offHeap.size %s and the whole answer" % (sys.argv[2], sys.argv[3]))
EOF
echo "spark-ui@$version: screenshots $shot ($(stat -c %s "$shot") bytes), $envshot"
echo "spark-ui@$version: OK (application $((t1 - t0)) s, history server $((t2 - t1)) s, browser $((SECONDS - t2)) s)"
