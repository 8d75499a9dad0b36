package org.nativemem.e2e;

import static org.nativemem.e2e.E2e.check;
import static org.nativemem.e2e.E2e.checkEq;

import java.io.Serializable;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

import org.apache.spark.SparkEnv;
import org.apache.spark.api.java.JavaSparkContext;
import org.apache.spark.sql.SparkSession;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeOutOfMemoryException;
import org.nativemem.NativeReservation;
import org.nativemem.engine.CEngine;
import org.nativemem.examples.TrackedBuild;
import org.nativemem.spark.ExecutorMemory;
import org.nativemem.spark.NativeMemoryPlugin;
import org.nativemem.spark.NativeMemorySparkConf;
import org.nativemem.spark.TaskNativeMemory;

/**
 * Untracked native memory in Spark: tasks of the C engine (tests/c/engine.c, its own
 * library) malloc memory nativemem never sees, and malloc more through a hook that charges the
 * task's pool with the forced charges of the engine ABI ({@code reservation_force_grow}, batched
 * per MiB: never asking Spark). Run with the plugin, {@code spark.memory.offHeap.enabled=true} and
 * {@code spark.memory.offHeap.size=64m} on local[2] and local-cluster[2,1,1024], Spark 3.5 and 4.0.
 *
 * <p>{@value #JOBS} one-task jobs (one at a time, so each task's measurements are its own), each:
 * <ol>
 *   <li>samples the executor's process view ({@link ExecutorMemory}), mallocs {@value #PLAIN_MIB} MiB
 *       plain and {@value #HOOKED_MIB} MiB through the hook (written: resident), samples again:
 *       nativemem's bytes grew by exactly the hooked bytes, the rss by the plain bytes, and the
 *       untracked bytes (rss - heap committed - direct - nativemem) by the plain bytes less what the
 *       hooked blocks reused of malloc's retained memory (which was untracked already), within
 *       {@value #SLACK_MIB} MiB;
 *   <li>the hooked bytes are over-commit (Spark was never asked), shown in the usage report; the
 *       task's next fallible grow must pay it and cannot (96 MiB over a 64m off-heap pool): it fails
 *       with a {@link NativeOutOfMemoryException} naming the over-commit; after the engine frees its
 *       memory, the same grow succeeds;
 *   <li>the recommendation ({@link NativeMemoryPlugin#recommendation()}) asks for
 *       {@code spark.memory.offHeap.size >= 106m} (the 96 MiB nativemem peak + 10%) and
 *       {@code spark.executor.memoryOverhead} at least the plain 192 MiB.
 * </ol>
 * Then a Rust engine ({@code libnativemem_examples}, built with nativemem-track's tracking allocator
 * as its global allocator) builds a {@code HashMap} and a {@code Vec} of 4 Mi entries on a tracked
 * native thread with no reservation call ({@link TrackedBuild}): the task's pool follows within the
 * 1 MiB flush threshold, is exact when the binding ends, and is credited when the memory is freed
 * after the scope.
 *
 * <p>Then, in every executor JVM: the plugin's process gauges are registered and read the same peaks
 * (rss, nativemem >= 96 MiB, untracked), nativemem's live bytes are back to 0, and no native memory,
 * manager or byte held from Spark is left ({@link E2e#assertNoLeak}).
 */
public final class UntrackedMemoryJob {
    static final String PREFIX = "UntrackedMemoryJob";
    static final int JOBS = 2;
    static final long PLAIN_MIB = 192;
    static final long HOOKED_MIB = 96;
    static final long MIN_UNTRACKED_MIB = 128;
    /** Entries of the Rust engine's tracked HashMap and Vec (~136 MiB of map, 64 MiB of vector). */
    static final long TRACKED_ENTRIES = 4L << 20;
    /** Room for the heap, the JIT and other threads moving the rss between two samples. */
    static final long SLACK_MIB = 32;

    private UntrackedMemoryJob() {
    }

    /** What one task measured. */
    static final class TaskResult implements Serializable {
        private static final long serialVersionUID = 1L;
        String executorId;
        long nativeDelta;
        long untrackedDelta;
        long overcommitted;
        long forcedCalls;
        String oomMessage;
        String recommendation;
        long[] tracked;
    }

    public static void main(String[] args) throws Exception {
        long start = System.nanoTime();
        SparkSession spark = SparkSession.builder().appName("nativemem-e2e-untracked").getOrCreate();
        try {
            JavaSparkContext jsc = JavaSparkContext.fromSparkContext(spark.sparkContext());
            check(jsc.getConf().get("spark.plugins", "").contains(NativeMemoryPlugin.class.getName()),
                    "spark.plugins enables " + NativeMemoryPlugin.class.getName());
            NativeMemorySparkConf settings = NativeMemorySparkConf.fromSparkConf(jsc.getConf());
            check(settings.offHeapEnabled(), "spark.memory.offHeap.enabled=true");
            int executors = E2e.executorCount(jsc.master());

            String lastRecommendation = null;
            for (int job = 0; job < JOBS; job++) {
                TaskResult r = jsc.parallelize(CEngineJob.seeds(1), 1).map(i -> untrackedTask()).collect().get(0);
                System.out.printf("%s job %d on executor %s: nativemem +%d MiB (%d forced calls, %d MiB"
                        + " over-committed), untracked +%d MiB; the next grow failed: %s%n", PREFIX, job,
                        r.executorId, r.nativeDelta / E2e.MiB, r.forcedCalls, r.overcommitted / E2e.MiB,
                        r.untrackedDelta / E2e.MiB, firstLine(r.oomMessage));
                System.out.printf("%s executor %s recommendation: %s%n", PREFIX, r.executorId, r.recommendation);
                System.out.printf("%s job %d: Rust engine on a tracked thread: HashMap + Vec held %d MiB; pool %d MiB"
                        + " while held (batched, %d flushes, %d MiB over-committed), %d MiB once the binding ended,"
                        + " %d MiB after the free%n", PREFIX, job, r.tracked[TrackedBuild.HELD_BYTES] / E2e.MiB,
                        (r.tracked[TrackedBuild.USED_WHILE_HELD] - r.tracked[TrackedBuild.USED_BEFORE]) / E2e.MiB,
                        r.tracked[TrackedBuild.FLUSHES], r.tracked[TrackedBuild.OVERCOMMITTED] / E2e.MiB,
                        (r.tracked[TrackedBuild.USED_AFTER_SCOPE] - r.tracked[TrackedBuild.USED_BEFORE]) / E2e.MiB,
                        (r.tracked[TrackedBuild.USED_AFTER_FREE] - r.tracked[TrackedBuild.USED_BEFORE]) / E2e.MiB);
                lastRecommendation = r.recommendation;
            }

            // The process gauges of every executor, read back from the plugin's registry.
            Map<String, Map<String, Long>> gauges = new TreeMap<>();
            for (int round = 0; round < 10 && gauges.size() < executors; round++) {
                int n = 4 * executors;
                List<Object[]> got = jsc.parallelize(CEngineJob.seeds(n), n).map(i -> {
                    // Gauges show the latest sample, at most one interval old: wait for one taken
                    // after the tasks ended.
                    Thread.sleep(ExecutorMemory.DEFAULT_SAMPLE_INTERVAL_MS + 200);
                    return new Object[] {SparkEnv.get().executorId(), new TreeMap<>(NativeMemoryPlugin.processMetrics())};
                }).collect();
                for (Object[] g : got) {
                    @SuppressWarnings("unchecked")
                    Map<String, Long> values = (Map<String, Long>) g[1];
                    gauges.put((String) g[0], values);
                }
            }
            checkEq(executors, gauges.size(), "process gauges from every executor: " + gauges);
            long nativePeak = 0;
            long untrackedPeak = 0;
            for (Map.Entry<String, Map<String, Long>> e : gauges.entrySet()) {
                Map<String, Long> g = e.getValue();
                for (String name : NativeMemoryPlugin.PROCESS_METRIC_NAMES) {
                    check(g.get(name) != null, "gauge " + name + " on executor " + e.getKey() + ": " + g);
                }
                check(g.get("processRssBytes") > 0, "rss read from /proc on executor " + e.getKey() + ": " + g);
                checkEq(0, g.get("nativeTrackedBytes"), "nativemem bytes after the tasks, executor " + e.getKey());
                check(g.get("processRssPeakBytes") >= g.get("nativeTrackedPeakBytes"),
                        "rss peak covers the nativemem peak on executor " + e.getKey() + ": " + g);
                nativePeak = Math.max(nativePeak, g.get("nativeTrackedPeakBytes"));
                untrackedPeak = Math.max(untrackedPeak, g.get("untrackedNativePeakBytes"));
            }
            check(nativePeak >= HOOKED_MIB * E2e.MiB, "a nativemem peak >= the hooked bytes in the gauges: " + gauges);
            check(untrackedPeak >= MIN_UNTRACKED_MIB * E2e.MiB,
                    "an untracked peak >= " + MIN_UNTRACKED_MIB + " MiB in the gauges: " + gauges);
            E2e.assertNoLeak(jsc, executors, "after the untracked-memory tasks");

            System.out.printf("PASS %s: Spark %s, %s: %d tasks malloc'd %d MiB untracked + %d MiB through a"
                    + " forced-charge hook: gauges show nativemem peak %d MiB and untracked peak %d MiB on %d"
                    + " executor(s); over-commit failed the next grow and was paid after the free; recommendation: %s"
                    + " (%.1f s)%n", PREFIX, spark.version(), jsc.master(), JOBS, PLAIN_MIB, HOOKED_MIB,
                    nativePeak / E2e.MiB, untrackedPeak / E2e.MiB, executors, lastRecommendation,
                    (System.nanoTime() - start) / 1e9);
        } finally {
            spark.stop();
        }
    }

    static TaskResult untrackedTask() {
        TaskResult r = new TaskResult();
        r.executorId = SparkEnv.get().executorId();
        NativeMemoryManager mm = TaskNativeMemory.get();
        ExecutorMemory view = ExecutorMemory.get();
        ExecutorMemory.Snapshot before = view.sample();
        long holder = CEngine.openUntracked(mm, PLAIN_MIB * E2e.MiB, HOOKED_MIB * E2e.MiB);
        boolean closed = false;
        try {
            long[] st = CEngine.untrackedStats(holder);
            ExecutorMemory.Snapshot after = view.sample();
            checkEq(PLAIN_MIB * E2e.MiB, st[0], "plain bytes held");
            checkEq(HOOKED_MIB * E2e.MiB, st[1], "hooked bytes held");
            checkEq(HOOKED_MIB * E2e.MiB, st[4], "the hook's reservation holds exactly the hooked bytes");
            r.overcommitted = st[2];
            r.forcedCalls = st[3];
            check(st[3] >= 1 && st[3] <= HOOKED_MIB, "batched: " + st[3] + " forced calls for " + HOOKED_MIB + " MiB");
            check(st[2] > 0, "the hooked bytes are over-commit (Spark was not asked)");
            r.nativeDelta = after.nativeBytes - before.nativeBytes;
            r.untrackedDelta = after.untrackedBytes - before.untrackedBytes;
            checkEq(HOOKED_MIB * E2e.MiB, r.nativeDelta, "nativemem's bytes grew by the hooked bytes: " + after);
            // The plain malloc is fresh memory (mmapped: glibc maps blocks this large): the rss
            // grows by it. Untracked grows by it minus the pages the hooked blocks reused from what
            // malloc kept of an earlier task's frees (at most the hooked bytes): that retained memory
            // was already counted as untracked, which is what it is (the allocator's cache).
            long rssDelta = after.rssBytes - before.rssBytes;
            check(rssDelta >= (PLAIN_MIB - SLACK_MIB) * E2e.MiB, "the plain malloc is resident: " + before + " -> " + after);
            check(r.untrackedDelta >= (PLAIN_MIB - HOOKED_MIB - SLACK_MIB) * E2e.MiB,
                    "the plain malloc shows as untracked: " + before + " -> " + after);
            check(mm.usageReport().contains("Over-committed"), "usage report shows the over-commit: " + mm.usageReport());
            checkEq(HOOKED_MIB * E2e.MiB, mm.stats().overcommittedBytes(), "the manager's stats show the over-commit");

            // The next fallible grow pays the over-commit: 96 MiB over a 64m off-heap pool cannot.
            try (NativeReservation res = mm.newReservation("operator", E2e.MiB)) {
                throw new AssertionError("e2e check failed: a grow over un-payable over-commit succeeded: " + res);
            } catch (NativeOutOfMemoryException e) {
                r.oomMessage = e.getMessage();
                check(e.getMessage().contains("Over-committed"), "the OOM names the over-commit: " + e.getMessage());
            }
            r.recommendation = NativeMemoryPlugin.recommendation();
            long offHeap = megabytes(r.recommendation, "spark.memory.offHeap.size=");
            long overhead = megabytes(r.recommendation, "spark.executor.memoryOverhead=");
            check(offHeap >= HOOKED_MIB * 11 / 10, "offHeap.size recommendation covers the nativemem peak: "
                    + r.recommendation);
            check(overhead >= PLAIN_MIB, "memoryOverhead recommendation covers the plain malloc: " + r.recommendation);

            long[] done = CEngine.closeUntracked(holder);
            closed = true;
            checkEq(0, done[2], "the hook's frees released every byte");
            checkEq(HOOKED_MIB * E2e.MiB, done[0], "released by the forced shrinks");
            // Freed: nothing is owed any more, and the same grow succeeds.
            try (NativeReservation res = mm.newReservation("operator", E2e.MiB)) {
                checkEq(E2e.MiB, res.size(), "the grow after the free");
            }

            // A Rust engine (libnativemem_examples, TrackingAllocator as its global allocator)
            // builds a HashMap and a Vec on a tracked thread, asking nobody.
            long[] t = TrackedBuild.build(mm, TRACKED_ENTRIES);
            r.tracked = t;
            checkEq(1, t[TrackedBuild.ALLOCATOR_INSTALLED], "the example library has the tracking allocator");
            long held = t[TrackedBuild.HELD_BYTES];
            long usedBefore = t[TrackedBuild.USED_BEFORE];
            check(held >= 64 * E2e.MiB, "the build held " + held);
            check(Math.abs(t[TrackedBuild.USED_WHILE_HELD] - usedBefore - held) <= E2e.MiB + 64 * 1024,
                    "the pool follows the tracked thread within the flush threshold: " + java.util.Arrays.toString(t));
            check(t[TrackedBuild.USED_AFTER_SCOPE] - usedBefore >= held
                    && t[TrackedBuild.USED_AFTER_SCOPE] - usedBefore <= held + 64 * 1024,
                    "exact (plus the thread's small bookkeeping) once the binding ended: " + java.util.Arrays.toString(t));
            checkEq(usedBefore, t[TrackedBuild.USED_AFTER_FREE], "credited when freed after the scope");
            // Batched: at most one flush per MiB of change (the map and vector grow by doubling, so
            // most flushes carry one large block), never one per allocation.
            check(t[TrackedBuild.FLUSHES] >= 1 && t[TrackedBuild.FLUSHES] <= 2 * held / E2e.MiB + 64,
                    "batched flushes: " + java.util.Arrays.toString(t));
        } finally {
            if (!closed) {
                CEngine.closeUntracked(holder);
            }
        }
        return r;
    }

    static long megabytes(String line, String key) {
        Matcher m = Pattern.compile(Pattern.quote(key) + "(\\d+)m").matcher(line);
        check(m.find(), "'" + key + "<n>m' in: " + line);
        return Long.parseLong(m.group(1));
    }

    static String firstLine(String s) {
        if (s == null) {
            return "(none)";
        }
        int nl = s.indexOf('\n');
        return nl < 0 ? s : s.substring(0, nl) + " ...";
    }
}
