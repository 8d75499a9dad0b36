package org.nativemem.e2e;

import static org.nativemem.e2e.E2e.MiB;
import static org.nativemem.e2e.E2e.check;

import java.util.Arrays;
import java.util.List;
import java.util.Locale;
import java.util.Map;

import org.apache.spark.api.java.JavaSparkContext;
import org.apache.spark.sql.SparkSession;
import org.nativemem.ContainerGovernor;
import org.nativemem.NativeOutOfMemoryException;
import org.nativemem.NativeReservation;
import org.nativemem.spark.ContainerPressureReport;
import org.nativemem.spark.NativeMemoryPlugin;
import org.nativemem.spark.TaskNativeMemory;

/**
 * The container governor in the plugin, under hard pressure from the start: run with
 * {@code spark.nativemem.containerLimit} far below what the executor JVM uses (local mode, so
 * the driver's plugin hears from the executor in the same JVM). Each task's native grow that
 * needs memory from Spark fails with a {@link NativeOutOfMemoryException} naming container
 * pressure (and Spark is not asked); the executor's gauges show hard pressure and the refusals;
 * the driver plugin received the executor's pressure report (with its native usage snapshot) and
 * logged it; nothing is left.
 */
public final class GovernorPressureJob {
    static final String PREFIX = "GovernorPressureJob";

    private GovernorPressureJob() {
    }

    public static void main(String[] args) throws Exception {
        long start = System.nanoTime();
        SparkSession spark = SparkSession.builder().appName("nativemem-e2e-governor").getOrCreate();
        try {
            JavaSparkContext jsc = JavaSparkContext.fromSparkContext(spark.sparkContext());
            int executors = E2e.executorCount(jsc.master());
            E2e.Tracker tracker = E2e.Tracker.install(jsc);
            int mark = tracker.mark(jsc);
            List<String> refusals = jsc.parallelize(Arrays.asList(0, 1, 2, 3), 4).map(i -> {
                long deadline = System.nanoTime() + 10_000_000_000L;
                while (ContainerGovernor.status().pressure() != 2 && System.nanoTime() < deadline) {
                    Thread.sleep(10);
                }
                check(ContainerGovernor.status().pressure() == 2, "hard pressure: " + ContainerGovernor.status());
                try (NativeReservation r = TaskNativeMemory.get().newReservation("op", "grow", 8 * MiB)) {
                    throw new AssertionError("a grow that needs Spark's memory under hard pressure succeeded: " + r);
                } catch (NativeOutOfMemoryException e) {
                    check(TaskNativeMemory.listener().heldBytes() == 0, "Spark was not asked");
                    return e.getMessage();
                }
            }).collect();
            for (String m : refusals) {
                check(m.contains("container memory pressure") && m.contains("limit (hard level 93%)"), m);
            }
            // Each task's refusal shows in its nativemem.containerRefusals accumulator (stage page, event log).
            tracker.awaitIdle(jsc, 60_000);
            List<E2e.TaskEnd> ends = tracker.endedSince(mark);
            check(ends.size() == 4, "four task ends: " + ends);
            for (E2e.TaskEnd end : ends) {
                long n = end.nativememAccumulators.getOrDefault("nativemem.containerRefusals", 0L);
                check(n >= 1, "the task's nativemem.containerRefusals accumulator counts its refusal: "
                        + end.nativememAccumulators);
            }
            Map<String, Long> gauges = jsc.parallelize(Arrays.asList(0), 1)
                    .map(i -> NativeMemoryPlugin.governorMetrics()).collect().get(0);
            check(gauges.get("governorPressure") == 2, "gauge governorPressure: " + gauges);
            check(gauges.get("governorRefusedGrows") >= 4, "gauge governorRefusedGrows: " + gauges);
            check(gauges.get("containerLimitBytes") == 64 * MiB, "gauge containerLimitBytes: " + gauges);
            check(gauges.get("governorSamples") > 0, "gauge governorSamples: " + gauges);

            // Up to 60 s: the executor sends it from its 1 s sampler and the driver handles plugin
            // messages in order, both slow on a loaded CI machine (15 s was once too short there).
            long deadline = System.nanoTime() + 60_000_000_000L;
            List<ContainerPressureReport> reports = NativeMemoryPlugin.containerPressureReports();
            while (reports.isEmpty() && System.nanoTime() < deadline) {
                Thread.sleep(100);
                reports = NativeMemoryPlugin.containerPressureReports();
            }
            check(!reports.isEmpty(), "the driver received the executor's container pressure report");
            ContainerPressureReport r = reports.get(0);
            check(r.reason().equals("hard pressure") && r.text().contains("pressure hard"), "report: " + r);
            E2e.assertNoLeak(jsc, executors, "after the refused grows");
            System.out.printf(Locale.ROOT, "PASS %s: Spark %s, %s: under a 64 MiB container limit %d grows were refused"
                    + " naming container pressure (Spark not asked), gauges %s, the driver got executor %s's report"
                    + " (%d chars); nothing left (%.1f s)%n", PREFIX, spark.version(), jsc.master(), refusals.size(),
                    gauges, r.executorId(), r.text().length(), (System.nanoTime() - start) / 1e9);
        } finally {
            spark.stop();
        }
    }
}
