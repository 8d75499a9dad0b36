package org.nativemem.e2e;

import static org.nativemem.e2e.E2e.check;
import static org.nativemem.e2e.E2e.checkEq;

import java.io.File;
import java.io.IOException;
import java.io.InputStream;
import java.io.Serializable;
import java.net.HttpURLConnection;
import java.net.URL;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.Collections;
import java.util.HashMap;
import java.util.Iterator;
import java.util.List;
import java.util.Map;
import java.util.Random;

import org.apache.spark.SparkConf;
import org.apache.spark.TaskContext;
import org.apache.spark.api.java.JavaSparkContext;
import org.apache.spark.sql.SparkSession;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeMemoryStats;
import org.nativemem.examples.NativeSorter;
import org.nativemem.examples.SorterStats;
import org.nativemem.spark.NativeTaskMetrics;
import org.nativemem.spark.TaskNativeMemory;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;

/**
 * Native memory where Spark users look, through Spark's own interfaces of a live application (run
 * by tests/spark/spark-ui.sh, which then checks the history server and the rendered stage page).
 *
 * <p>One stage of {@code --partitions} tasks (default 2, local[2]) sorts {@code --rows} random
 * longs per task with the example's native external sort ({@link NativeSorter}) under a small
 * off-heap budget, so every task's native sorter spills. Each task returns its manager's figures
 * (peak, spilled bytes, spill count) taken when the sort is done. Then the job asserts, through
 * the live UI's REST API ({@code /api/v1/applications/<app>/stages/<stage>/<attempt>/taskList}
 * and the stage itself):
 * <ul>
 *   <li>every task carries the accumulators {@value NativeTaskMetrics#PEAK} (= the task's native
 *       peak), {@value NativeTaskMetrics#SPILLED} (= its native spilled bytes, > 0) and
 *       {@value NativeTaskMetrics#SPILLS} (= its spill count, > 0);
 *   <li>its {@code memoryBytesSpilled} (Spill (Memory)) is at least the native spilled bytes, its
 *       {@code diskBytesSpilled} (Spill (Disk)) what the sort wrote to its spill files (reported
 *       by the task with {@link NativeTaskMetrics#addDiskBytesSpilled});
 *   <li>the stage's accumulators: the peak is the largest task peak, the spills their sums;
 *   <li>in local mode: recording at close cost at most 1% of the tasks' CPU time (printed), and
 *       the tasks of a plain SQL job, which never touch nativemem, record nothing and carry no
 *       nativemem accumulator; a task that leaves a native reservation open (and so fails Spark's
 *       leak check) reports {@value NativeTaskMetrics#LEAKED} and its peak: failed attempts count;
 *   <li>the driver's {@code /metrics/prometheus} (Spark's {@code PrometheusServlet}, configured in
 *       tests.txt / the script) shows the driver plugin's gauges of the executors' reports, the
 *       largest task peak among them equal to the largest task peak above.
 * </ul>
 * It writes what the history server must show to {@code --expect FILE} (properties: app id,
 * stage, the stage's accumulator values) for the script.
 */
public final class SparkUiJob {
    private SparkUiJob() {
    }

    /** What one task saw. */
    static final class TaskFigures implements Serializable {
        private static final long serialVersionUID = 1L;
        long taskAttemptId;
        long peak;
        long spilled;
        long spills;
        long diskSpilled;
    }

    static TaskFigures sortTask(int partition, long rows, File spillRoot) {
        TaskContext ctx = TaskContext.get();
        NativeMemoryManager mm = TaskNativeMemory.get();
        Random random = new Random(31L * partition + 7);
        long[] batch = new long[64 << 10];
        long out = 0;
        long last = Long.MIN_VALUE;
        TaskFigures f = new TaskFigures();
        f.taskAttemptId = ctx.taskAttemptId();
        try (NativeSorter sorter = new NativeSorter(mm, "ui-sort-p" + partition, new File(spillRoot, "p" + partition))) {
            for (long left = rows; left > 0;) {
                int n = (int) Math.min(batch.length, left);
                for (int i = 0; i < n; i++) {
                    batch[i] = random.nextLong();
                }
                sorter.insert(batch, 0, n);
                left -= n;
            }
            for (Iterator<long[]> it = sorter.sorted(); it.hasNext();) {
                for (long k : it.next()) {
                    check(k >= last, "sorted output");
                    last = k;
                    out++;
                }
            }
            SorterStats s = sorter.stats();
            f.diskSpilled = s.bytesSpilled();
            check(NativeTaskMetrics.addDiskBytesSpilled(ctx, f.diskSpilled), "Spill (Disk) counted");
        }
        checkEq(rows, out, "rows out of the native sort, partition " + partition);
        NativeMemoryStats st = mm.stats();
        f.peak = st.peakBytes();
        f.spilled = st.spilledBytes();
        f.spills = st.spillCount();
        return f;
    }

    static String get(String url) throws IOException {
        HttpURLConnection c = (HttpURLConnection) new URL(url).openConnection();
        c.setConnectTimeout(5000);
        c.setReadTimeout(10000);
        int code = c.getResponseCode();
        try (InputStream in = code < 400 ? c.getInputStream() : c.getErrorStream()) {
            byte[] body = in == null ? new byte[0] : readAll(in);
            String text = new String(body, StandardCharsets.UTF_8);
            check(code == 200, "GET " + url + " -> HTTP " + code + ": " + text);
            return text;
        }
    }

    private static byte[] readAll(InputStream in) throws IOException {
        java.io.ByteArrayOutputStream b = new java.io.ByteArrayOutputStream();
        byte[] buf = new byte[8192];
        for (int n; (n = in.read(buf)) > 0;) {
            b.write(buf, 0, n);
        }
        return b.toByteArray();
    }

    /** name -> long of an {@code accumulatorUpdates} array, for the given field ("update" or "value"). */
    static Map<String, Long> accumulators(JsonNode updates, String field) {
        Map<String, Long> m = new HashMap<>();
        for (JsonNode a : updates) {
            String name = a.path("name").asText();
            if (name.startsWith("nativemem.") && a.has(field)) {
                m.put(name, Long.parseLong(a.get(field).asText()));
            }
        }
        return m;
    }

    public static void main(String[] argv) throws Exception {
        long rows = 2_000_000;
        int partitions = 2;
        String expectFile = null;
        for (int i = 0; i < argv.length; i++) {
            switch (argv[i]) {
                case "--rows":
                    rows = Long.parseLong(argv[++i]);
                    break;
                case "--partitions":
                    partitions = Integer.parseInt(argv[++i]);
                    break;
                case "--expect":
                    expectFile = argv[++i];
                    break;
                default:
                    throw new IllegalArgumentException("SparkUiJob: unknown argument " + argv[i]);
            }
        }
        SparkSession spark = SparkSession.builder().config(new SparkConf().setIfMissing("spark.app.name",
                "nativemem-ui")).getOrCreate();
        try {
            run(spark, rows, partitions, expectFile);
        } finally {
            spark.stop();
        }
    }

    static void run(SparkSession spark, long rows, int partitions, String expectFile) throws Exception {
        JavaSparkContext jsc = JavaSparkContext.fromSparkContext(spark.sparkContext());
        check(jsc.sc().uiWebUrl().isDefined(), "the live UI is enabled (spark.ui.enabled=true)");
        String ui = jsc.sc().uiWebUrl().get();
        String app = jsc.sc().applicationId();
        File spillRoot = Files.createTempDirectory("nativemem-ui-").toFile();
        List<Integer> parts = new ArrayList<>();
        for (int i = 0; i < partitions; i++) {
            parts.add(i);
        }
        final long r = rows;
        final File root = spillRoot;
        jsc.setJobDescription("nativemem SparkUiJob: native sort that spills");
        List<TaskFigures> figures = jsc.parallelize(parts, partitions)
                .mapPartitionsWithIndex((index, it) -> Collections.singletonList(sortTask(index, r, root)).iterator(),
                        false)
                .collect();
        jsc.sc().listenerBus().waitUntilEmpty(30_000);
        deleteTree(spillRoot);
        ObjectMapper json = new ObjectMapper();

        // ---- the live UI's REST API: the stage and its tasks ---------------------------------------
        String api = ui + "/api/v1/applications/" + app;
        JsonNode stages = json.readTree(get(api + "/stages?status=complete"));
        int stage = -1;
        for (JsonNode s : stages) {
            if (s.path("description").asText("").contains("SparkUiJob") || s.path("name").asText("").contains("collect")) {
                stage = Math.max(stage, s.get("stageId").asInt());
            }
        }
        check(stage >= 0, "the sort's stage is in " + api + "/stages: " + stages);
        JsonNode tasks = json.readTree(get(api + "/stages/" + stage + "/0/taskList?length=1000"));
        Map<Long, TaskFigures> byTask = new HashMap<>();
        for (TaskFigures f : figures) {
            check(f.spills > 0 && f.spilled > 0, "task " + f.taskAttemptId + " spilled natively (" + f.spills
                    + " spills, " + f.spilled + " bytes): the budget must be small enough");
            byTask.put(f.taskAttemptId, f);
        }
        checkEq(partitions, tasks.size(), "tasks of stage " + stage + " in the REST API");
        long maxPeak = 0;
        long sumSpilled = 0;
        long sumSpills = 0;
        for (JsonNode t : tasks) {
            long id = t.get("taskId").asLong();
            TaskFigures f = byTask.get(id);
            check(f != null, "task " + id + " of the REST API ran the sort");
            Map<String, Long> acc = accumulators(t.path("accumulatorUpdates"), "update");
            System.out.println("SparkUiJob: task " + id + " accumulators " + acc + ", memoryBytesSpilled "
                    + t.path("taskMetrics").path("memoryBytesSpilled").asLong() + ", diskBytesSpilled "
                    + t.path("taskMetrics").path("diskBytesSpilled").asLong() + " (native: peak " + f.peak
                    + ", spilled " + f.spilled + " in " + f.spills + " spills, written " + f.diskSpilled + ")");
            checkEq(f.peak, acc.getOrDefault(NativeTaskMetrics.PEAK, -1L), "task " + id + " " + NativeTaskMetrics.PEAK);
            checkEq(f.spilled, acc.getOrDefault(NativeTaskMetrics.SPILLED, -1L),
                    "task " + id + " " + NativeTaskMetrics.SPILLED);
            checkEq(f.spills, acc.getOrDefault(NativeTaskMetrics.SPILLS, -1L),
                    "task " + id + " " + NativeTaskMetrics.SPILLS);
            check(!acc.containsKey(NativeTaskMetrics.LEAKED), "task " + id + " leaked nothing, so it reports no "
                    + NativeTaskMetrics.LEAKED + ": " + acc);
            checkEq(f.diskSpilled, t.path("taskMetrics").path("diskBytesSpilled").asLong(-1),
                    "task " + id + " diskBytesSpilled: what the native sort wrote");
            long memSpilled = t.path("taskMetrics").path("memoryBytesSpilled").asLong(-1);
            check(memSpilled >= f.spilled, "task " + id + " memoryBytesSpilled " + memSpilled
                    + " counts the native spills " + f.spilled);
            maxPeak = Math.max(maxPeak, f.peak);
            sumSpilled += f.spilled;
            sumSpills += f.spills;
        }
        JsonNode stageJson = json.readTree(get(api + "/stages/" + stage + "/0"));
        Map<String, Long> stageAcc = accumulators(stageJson.path("accumulatorUpdates"), "value");
        System.out.println("SparkUiJob: stage " + stage + " accumulators " + stageAcc + ", memoryBytesSpilled "
                + stageJson.path("memoryBytesSpilled").asLong());
        checkEq(maxPeak, stageAcc.getOrDefault(NativeTaskMetrics.PEAK, -1L), "stage " + NativeTaskMetrics.PEAK
                + " (max of the tasks')");
        checkEq(sumSpilled, stageAcc.getOrDefault(NativeTaskMetrics.SPILLED, -1L), "stage " + NativeTaskMetrics.SPILLED);
        checkEq(sumSpills, stageAcc.getOrDefault(NativeTaskMetrics.SPILLS, -1L), "stage " + NativeTaskMetrics.SPILLS);
        check(stageJson.path("memoryBytesSpilled").asLong() >= sumSpilled, "the stage's memoryBytesSpilled counts the"
                + " native spills");

        // ---- cost: what recording took per task, against the tasks' run time (local mode: the
        // executor is this JVM); and a plain SQL stage, which never touches nativemem, records nothing
        if (jsc.master().startsWith("local[")) {
            long[] cost = NativeTaskMetrics.recordCost();
            long cpuNanos = 0;
            for (JsonNode t : tasks) {
                cpuNanos += t.path("taskMetrics").path("executorCpuTime").asLong();
            }
            checkEq(partitions, cost[0], "tasks whose native figures were recorded at close");
            double share = (double) cost[1] / Math.max(1, cpuNanos);
            System.out.printf(java.util.Locale.ROOT, "SparkUiJob: cost of the spill metric and accumulators: %.1f us"
                    + " CPU per task, %.3f%% of the tasks' CPU time (%.0f ms)%n", cost[1] / 1e3 / cost[0], share * 100,
                    cpuNanos / 1e6);
            check(share <= 0.01, "recording costs at most 1% of the tasks' CPU time: " + share);
            jsc.setJobDescription("nativemem SparkUiJob: plain SQL");
            long n = spark.range(0, 1_000_000, 1, partitions).selectExpr("sum(id * 2)").first().getLong(0);
            checkEq(999_999_000_000L, n, "plain SQL sum");
            jsc.sc().listenerBus().waitUntilEmpty(30_000);
            checkEq(cost[0], NativeTaskMetrics.recordCost()[0], "tasks recorded after the plain SQL job (none of"
                    + " its tasks used nativemem)");
            int sqlStages = 0;
            for (JsonNode s : json.readTree(get(api + "/stages?status=complete"))) {
                if (s.path("description").asText("").contains("plain SQL")) {
                    sqlStages++;
                    JsonNode sqlTasks = json.readTree(get(api + "/stages/" + s.get("stageId").asInt() + "/"
                            + s.get("attemptId").asInt() + "/taskList?length=1000"));
                    for (JsonNode t : sqlTasks) {
                        check(accumulators(t.path("accumulatorUpdates"), "update").isEmpty(), "plain SQL task "
                                + t.get("taskId").asLong() + " carries no nativemem accumulator: " + t);
                    }
                }
            }
            check(sqlStages > 0, "the plain SQL job's stages are in the REST API");

            // A task that leaves a native reservation open fails Spark's leak check
            // (spark.unsafe.exceptionOnMemoryLeak=true): failed attempts report too.
            jsc.setJobDescription("nativemem SparkUiJob: a task that leaks");
            final long leak = 3L << 20;
            boolean failed = false;
            try {
                jsc.parallelize(Collections.singletonList(1), 1).foreach(x -> {
                    TaskNativeMemory.get().newReservation("leaky", leak); // never closed
                });
            } catch (Exception expected) { // a SparkException (which Scala does not declare)
                failed = E2e.fullMessage(expected).contains("still in use");
                check(failed, "the leaking job failed for the leak: " + E2e.fullMessage(expected));
            }
            check(failed || !jsc.getConf().getBoolean("spark.unsafe.exceptionOnMemoryLeak", false),
                    "the leaking task failed Spark's leak check");
            jsc.sc().listenerBus().waitUntilEmpty(30_000);
            int leakTasks = 0;
            for (JsonNode s : json.readTree(get(api + "/stages"))) {
                if (!s.path("description").asText("").contains("leaks")) {
                    continue;
                }
                for (JsonNode t : json.readTree(get(api + "/stages/" + s.get("stageId").asInt() + "/"
                        + s.get("attemptId").asInt() + "/taskList?length=1000"))) {
                    Map<String, Long> acc = accumulators(t.path("accumulatorUpdates"), "update");
                    System.out.println("SparkUiJob: leaking task " + t.get("taskId").asLong() + " (" + t.path("status")
                            .asText() + ") accumulators " + acc);
                    check(acc.getOrDefault(NativeTaskMetrics.LEAKED, 0L) >= leak, "the leaking task reports "
                            + NativeTaskMetrics.LEAKED + " >= " + leak + ": " + acc);
                    check(acc.getOrDefault(NativeTaskMetrics.PEAK, 0L) >= leak, "the leaking task's peak: " + acc);
                    leakTasks++;
                }
            }
            check(leakTasks > 0, "the leaking job's tasks are in the REST API");
        }

        // ---- the driver's /metrics/prometheus: the executors' reports as driver gauges -------------
        Map<String, Long> gauges = Collections.emptyMap();
        long deadline = System.currentTimeMillis() + 15_000;
        while (System.currentTimeMillis() < deadline) {
            gauges = prometheusGauges(get(ui + "/metrics/prometheus"));
            if (gauges.getOrDefault("maxTaskNativePeakBytes", -1L) >= maxPeak) {
                break;
            }
            Thread.sleep(200); // the executors report once per sample interval (1 s)
        }
        System.out.println("SparkUiJob: driver gauges on /metrics/prometheus: " + gauges);
        for (String name : org.nativemem.spark.ApplicationMemoryView.GAUGE_NAMES) {
            check(gauges.containsKey(name), "driver gauge " + name + " on /metrics/prometheus: " + gauges);
        }
        check(gauges.get("executorsReporting") >= 1, "an executor reported to the driver: " + gauges);
        checkEq(maxPeak, gauges.get("maxTaskNativePeakBytes"), "driver gauge maxTaskNativePeakBytes");
        // (maxExecutorNativePeakBytes is the process view's, sampled once a second: a 2 s sort may fall between.)
        check(gauges.get("maxExecutorNativePeakBytes") >= 0, "driver gauge maxExecutorNativePeakBytes known");
        check(gauges.get("maxExecutorRssPeakBytes") > 0, "driver gauge maxExecutorRssPeakBytes > 0");
        check(gauges.get("recommendedMemoryOverheadBytes") >= 384L << 20, "driver gauge recommendedMemoryOverheadBytes");

        if (expectFile != null) {
            StringBuilder b = new StringBuilder();
            b.append("app=").append(app).append('\n').append("stage=").append(stage).append('\n');
            for (Map.Entry<String, Long> e : stageAcc.entrySet()) {
                b.append(e.getKey()).append('=').append(e.getValue()).append('\n');
            }
            b.append("memoryBytesSpilled=").append(stageJson.path("memoryBytesSpilled").asLong()).append('\n');
            b.append("diskBytesSpilled=").append(stageJson.path("diskBytesSpilled").asLong()).append('\n');
            Files.write(new File(expectFile).toPath(), b.toString().getBytes(StandardCharsets.UTF_8));
        }
        System.out.println("SparkUiJob: OK app " + app + " stage " + stage + " (live UI " + ui + ")");
    }

    /**
     * The nativemem driver gauges of a {@code PrometheusServlet} page: lines like
     * {@code metrics_<app>_driver_plugin_org_nativemem_spark_NativeMemoryPlugin_<name>_Value{type="gauges"} 42}.
     */
    static Map<String, Long> prometheusGauges(String page) {
        Map<String, Long> m = new HashMap<>();
        String marker = "NativeMemoryPlugin_";
        for (String line : page.split("\n")) {
            int at = line.indexOf(marker);
            if (at < 0 || line.startsWith("#") || !line.contains("driver")) {
                continue;
            }
            String rest = line.substring(at + marker.length());
            int end = rest.indexOf("_Value");
            int space = line.lastIndexOf(' ');
            if (end <= 0 || space < 0) {
                continue;
            }
            try {
                m.put(rest.substring(0, end), (long) Double.parseDouble(line.substring(space + 1).trim()));
            } catch (NumberFormatException e) {
                // another metric kind
            }
        }
        return m;
    }

    static void deleteTree(File f) {
        File[] children = f.listFiles();
        if (children != null) {
            for (File c : children) {
                deleteTree(c);
            }
        }
        f.delete();
    }
}
