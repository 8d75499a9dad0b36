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
#    sizing answer.
# 2. Spark's own history server (sbin/start-history-server.sh of that runtime) replays the event
#    log: its REST API must show the same stage accumulators, each task's, and both spill figures.
# 3. Headless Chromium (Debian's package, from scripts/setup.sh) renders the history server's stage
#    page: the DOM must hold each accumulator's name next to its value, and the Spill (Memory) and
#    Spill (Disk) figures; a screenshot is kept at target/spark-ui/stage-<minor>.png.
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

# ---- 2. Spark's history server replays the event log ---------------------------------------------
t1=$SECONDS
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
env "${history_env[@]}" SPARK_HISTORY_OPTS="-Dspark.history.fs.logDirectory=file:$work/events \
-Dspark.history.ui.port=$port -Dspark.history.fs.update.interval=1s" \
  "$SPARK_HOME/sbin/start-history-server.sh" >/dev/null || fail "start-history-server.sh failed"
base="http://127.0.0.1:$port"
api="$base/api/v1/applications/$app"
for _ in $(seq 1 60); do
  curl -sf "$api/stages/$stage/0" -o "$work/stage.json" 2>/dev/null && break
  sleep 0.5
done
if [ ! -s "$work/stage.json" ]; then
  tail -n 40 "$work/logs"/* 2>/dev/null
  fail "the history server at $base did not serve $api/stages/$stage/0 within 30 s"
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
echo "spark-ui@$version: screenshot $shot ($(stat -c %s "$shot") bytes)"
echo "spark-ui@$version: OK (application $((t1 - t0)) s, history server $((t2 - t1)) s, browser $((SECONDS - t2)) s)"
