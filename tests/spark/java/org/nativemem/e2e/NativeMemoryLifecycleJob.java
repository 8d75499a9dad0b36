package org.nativemem.e2e;

import static org.nativemem.e2e.E2e.MiB;
import static org.nativemem.e2e.E2e.check;
import static org.nativemem.e2e.E2e.checkEq;
import static org.nativemem.e2e.E2e.expectThrows;

import java.io.File;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.FutureTask;
import java.util.concurrent.atomic.AtomicReference;

import org.apache.spark.SparkConf;
import org.apache.spark.SparkContext;
import org.apache.spark.TaskContext;
import org.apache.spark.api.java.JavaSparkContext;
import org.apache.spark.memory.MemoryMode;
import org.apache.spark.sql.SparkSession;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeReservation;
import org.nativemem.NativeTesting;
import org.nativemem.spark.NativeMemoryPlugin;
import org.nativemem.spark.NativeMemorySparkConf;
import org.nativemem.spark.SparkReservationListener;
import org.nativemem.spark.TaskNativeMemory;

/**
 * The life of a task's native memory manager in real Spark, on any master (local[N] or
 * local-cluster[N,...]) and either memory mode. Needs
 * {@code spark.plugins=org.nativemem.spark.NativeMemoryPlugin} and
 * {@code spark.unsafe.exceptionOnMemoryLeak=true} (scripts/spark-submit.sh sets the latter).
 *
 * <ol>
 *   <li>settings: strict parsing, and (with the argument {@code --fail-fast}) the driver plugin
 *       failing a SparkContext with a bad one; {@code TaskNativeMemory.get()} outside a task throws;
 *   <li>tasks that succeed: one manager per attempt, created once under concurrent first use and
 *       shared by the task's threads and native threads, Spark holding exactly the reserved bytes, gauges seeing the task, the peak in
 *       Spark's task metrics, operator state attached to the manager released at task end
 *       without being called a leak, nothing left afterwards;
 *   <li>Spark spilling the task's consumer from another thread while the task ends and its manager
 *       closes: every call returns normally;
 *   <li>tasks that throw while holding reservations, native allocations and a spiller: the job
 *       fails, nothing leaks on either side;
 *   <li>a task that succeeds but leaves native memory in use: failed by the leak check;
 *   <li>tasks killed by job-group cancellation while holding native memory: nothing leaks.
 * </ol>
 * After each, every executor reports no live manager, no used/reserved byte and nothing held from
 * Spark, read from the stats, the plugin's gauges and Spark's JMX sink.
 */
public final class NativeMemoryLifecycleJob {
    private static final String PREFIX = "NativeMemoryLifecycleJob";

    private NativeMemoryLifecycleJob() {
    }

    public static void main(String[] args) throws Exception {
        long start = System.nanoTime();
        checkSettings();
        checkOutsideTask();
        boolean failFast = Arrays.asList(args).contains("--fail-fast");
        if (failFast) {
            checkDriverFailsFast();
        }

        SparkSession spark = SparkSession.builder()
                .appName("nativemem-e2e-lifecycle")
                .config("spark.metrics.conf.*.sink.jmx.class", "org.apache.spark.metrics.sink.JmxSink")
                .getOrCreate();
        try {
            JavaSparkContext jsc = JavaSparkContext.fromSparkContext(spark.sparkContext());
            SparkConf conf = jsc.getConf();
            check(conf.get("spark.plugins", "").contains(NativeMemoryPlugin.class.getName()),
                    "spark.plugins enables " + NativeMemoryPlugin.class.getName());
            check(conf.getBoolean("spark.unsafe.exceptionOnMemoryLeak", false),
                    "spark.unsafe.exceptionOnMemoryLeak=true (scripts/spark-submit.sh sets it)");
            NativeMemorySparkConf settings = NativeMemorySparkConf.fromSparkConf(conf);
            E2e.Tracker tracker = E2e.Tracker.install(jsc);
            int executors = E2e.executorCount(jsc.master());
            Scenario s = new Scenario(jsc, tracker, executors, settings);

            s.succeeding();
            s.racing();
            s.failing();
            s.leaking();
            s.killed();

            System.out.printf("PASS %s: Spark %s, %s, %s, block %d MiB: settings,%s outside-task, success"
                    + " (%d tasks; %s), spill racing close, failure, leak check, kill; no leaks on %d"
                    + " executor(s) (%.1f s)%n", PREFIX, spark.version(), jsc.master(),
                    settings.offHeapEnabled() ? "OFF_HEAP" : "ON_HEAP", settings.reservationBlockSizeBytes() / MiB,
                    failFast ? " driver fail-fast," : "", Scenario.SUCCESS_TASKS, s.peaks, executors,
                    (System.nanoTime() - start) / 1e9);
        } finally {
            spark.stop();
        }
    }

    /** Strict parsing of spark.nativemem.* (driver side, no Spark needed). */
    static void checkSettings() {
        NativeMemorySparkConf d = NativeMemorySparkConf.defaults();
        checkEq(8 * MiB, d.reservationBlockSizeBytes(), "default block");
        check(!d.taskLimitBytes().isPresent(), "no default task limit");
        check(d.logUsageOnOom(), "logUsageOnOom defaults to true");

        Map<String, String> ok = new HashMap<>();
        ok.put(NativeMemorySparkConf.RESERVATION_BLOCK_SIZE, "16m");
        ok.put(NativeMemorySparkConf.TASK_LIMIT, "2g");
        ok.put(NativeMemorySparkConf.LOG_USAGE_ON_OOM, "false");
        ok.put(NativeMemorySparkConf.RESERVATION_QUANTUM, "1m");
        ok.put("spark.executor.memory", "1g"); // not ours: ignored
        NativeMemorySparkConf c = NativeMemorySparkConf.parse(ok);
        checkEq(16 * MiB, c.reservationBlockSizeBytes(), "16m");
        checkEq(2048 * MiB, c.taskLimitBytes().getAsLong(), "2g");
        check(!c.logUsageOnOom(), "false");
        checkEq(16 * MiB, c.toNativeConfig().reservationBlockSize(), "native config block");
        checkEq(2048 * MiB, c.toNativeConfig().taskLimit().getAsLong(), "native config limit");
        checkEq(MiB, c.reservationQuantumBytes(), "1m quantum");
        checkEq(MiB, c.toNativeConfig().reservationQuantum(), "native config quantum");
        checkEq(MiB, NativeMemorySparkConf.defaults().reservationQuantumBytes(), "default: the 1m quantum");
        checkEq(MiB, NativeMemorySparkConf.defaults().toNativeConfig().reservationQuantum(), "default: the fast path");
        checkEq(0, NativeMemorySparkConf.parse(
                Collections.singletonMap(NativeMemorySparkConf.RESERVATION_QUANTUM, "0")).reservationQuantumBytes(),
                "quantum 0");
        checkEq(12345, NativeMemorySparkConf.parse(
                Collections.singletonMap(NativeMemorySparkConf.RESERVATION_BLOCK_SIZE, "12345"))
                .reservationBlockSizeBytes(), "plain bytes");

        bad(NativeMemorySparkConf.RESERVATION_BLOCK_SIZE, "8q", "spark.nativemem.reservationBlockSize='8q'");
        bad(NativeMemorySparkConf.RESERVATION_BLOCK_SIZE, "0", "greater than 0");
        bad(NativeMemorySparkConf.RESERVATION_BLOCK_SIZE, "1.5m", "1.5m");
        bad(NativeMemorySparkConf.TASK_LIMIT, "-1", "spark.nativemem.taskLimit='-1'");
        bad(NativeMemorySparkConf.LOG_USAGE_ON_OOM, "yes", "true or false");
        bad(NativeMemorySparkConf.RESERVATION_QUANTUM, "2t", "at most 1099511627776 bytes");
        bad(NativeMemorySparkConf.RESERVATION_QUANTUM, "-1m", "spark.nativemem.reservationQuantum='-1m'");
        bad("spark.nativemem.tasklimit", "1g", "unknown setting spark.nativemem.tasklimit");
    }

    private static void bad(String key, String value, String fragment) {
        expectThrows(IllegalArgumentException.class,
                () -> NativeMemorySparkConf.parse(Collections.singletonMap(key, value)), fragment);
    }

    static void checkOutsideTask() {
        expectThrows(IllegalStateException.class, TaskNativeMemory::get, "outside a Spark task");
        check(TaskNativeMemory.getIfCreated() == null, "getIfCreated() outside a task is null");
        check(TaskNativeMemory.listener() == null, "listener() outside a task is null");
    }

    /** The driver plugin refuses to start a SparkContext with an invalid setting. */
    static void checkDriverFailsFast() {
        SparkConf bad = new SparkConf()
                .setAppName("nativemem-e2e-failfast")
                .set(NativeMemorySparkConf.RESERVATION_BLOCK_SIZE, "eight-megabytes");
        expectThrows(IllegalArgumentException.class, () -> new SparkContext(bad).stop(),
                "nativemem: invalid spark.nativemem.reservationBlockSize='eight-megabytes'");
    }

    private static final class Scenario {
        static final int SUCCESS_TASKS = 4;
        final JavaSparkContext jsc;
        final E2e.Tracker tracker;
        final int executors;
        final NativeMemorySparkConf settings;
        long reclaimedSoFar;
        String peaks = "";

        Scenario(JavaSparkContext jsc, E2e.Tracker tracker, int executors, NativeMemorySparkConf settings) {
            this.jsc = jsc;
            this.tracker = tracker;
            this.executors = executors;
            this.settings = settings;
        }

        List<Integer> seeds(int n) {
            List<Integer> s = new ArrayList<>();
            for (int i = 0; i < n; i++) {
                s.add(i);
            }
            return s;
        }

        void succeeding() throws Exception {
            int mark = tracker.mark(jsc);
            final boolean offHeap = settings.offHeapEnabled();
            final long block = settings.reservationBlockSizeBytes();
            List<long[]> results = jsc.parallelize(seeds(SUCCESS_TASKS), SUCCESS_TASKS)
                    .map(i -> succeedingTask(offHeap, block)).collect();
            tracker.awaitIdle(jsc, 30_000);
            Map<Long, E2e.TaskEnd> ends = new HashMap<>();
            for (E2e.TaskEnd e : tracker.endedSince(mark)) {
                ends.put(e.taskId, e);
            }
            for (long[] r : results) {
                long taskId = r[0];
                long nativePeak = r[1];
                long heldPeak = r[2];
                E2e.TaskEnd end = ends.get(taskId);
                check(end != null, "task end of " + taskId + " seen in " + ends.values());
                checkEq(0, "Success".equals(end.reason) ? 0 : 1, "task succeeded: " + end);
                check(heldPeak >= nativePeak && nativePeak >= 30 * MiB, "peaks " + nativePeak + " / " + heldPeak);
                // Peak Execution Memory (the UI's column) includes what the task held from Spark.
                check(end.peakExecutionMemory >= heldPeak, "peakExecutionMemory >= " + heldPeak + ": " + end);
                long modePeak = offHeap ? end.peakOffHeap : end.peakOnHeap;
                check(modePeak == -1 || modePeak >= heldPeak, "Spark 4 TaskMemoryManager peak: " + end);
                peaks = String.format("native peak %d MiB, held from Spark %d MiB, task metric peakExecutionMemory"
                        + " %d MiB%s", nativePeak / MiB, heldPeak / MiB, end.peakExecutionMemory / MiB,
                        modePeak == -1 ? "" : String.format(", peak%sExecutionMemory %d MiB", offHeap ? "OffHeap"
                                : "OnHeap", modePeak / MiB));
            }
            List<E2e.ExecutorReport> reports = E2e.assertNoLeak(jsc, executors, "after successful tasks");
            checkEq(SUCCESS_TASKS, E2e.sum(reports, "managersCreated"), "one manager per task: " + reports);
            long maxPeak = 0;
            for (E2e.ExecutorReport r : reports) {
                maxPeak = Math.max(maxPeak, r.stat("peakBytes"));
                if (r.stat("managersCreated") > 0) {
                    check(!r.jmx.isEmpty(), "Spark's JMX sink publishes the plugin gauges: " + r);
                    checkEq(r.stat("usedBytes"), r.jmx.get("usedBytes"), "JMX usedBytes " + r);
                    check(r.jmx.get("managersCreated") >= r.stat("managersCreated"), "JMX managersCreated " + r);
                }
            }
            check(maxPeak >= 30 * MiB, "executor peak gauge >= 30 MiB: " + reports);
            checkEq(SUCCESS_TASKS * 2 * MiB, E2e.sum(reports, "reclaimedAtCloseBytes"),
                    "the close released the operator state of each successful task (and nothing else)");
            reclaimedSoFar = E2e.sum(reports, "reclaimedAtCloseBytes");
        }

        /** Runs in a task: returns {taskAttemptId, native peak, peak held from Spark}. */
        static long[] succeedingTask(boolean offHeap, long block) throws Exception {
            final TaskContext ctx = TaskContext.get();
            check(TaskNativeMemory.getIfCreated() == null, "no manager before first use");
            // First use from several threads of the task at once: one manager.
            final CountDownLatch go = new CountDownLatch(1);
            List<FutureTask<NativeMemoryManager>> racers = new ArrayList<>();
            for (int t = 0; t < 4; t++) {
                FutureTask<NativeMemoryManager> f = new FutureTask<>(() -> {
                    go.await();
                    return TaskNativeMemory.get(ctx);
                });
                racers.add(f);
                new Thread(f, "e2e-first-use-" + t).start();
            }
            go.countDown();
            final NativeMemoryManager mm = TaskNativeMemory.get();
            for (FutureTask<NativeMemoryManager> f : racers) {
                check(f.get() == mm, "concurrent first use returns one manager");
            }
            check(mm == TaskNativeMemory.get(), "get() returns the same manager within a task");
            SparkReservationListener l = TaskNativeMemory.listener();
            check(l != null && l.manager() == mm, "listener attached");
            checkEq(offHeap ? 1 : 0, l.getMode() == MemoryMode.OFF_HEAP ? 1 : 0, "memory mode " + l.getMode());
            checkEq(block, mm.config().reservationBlockSize(), "block size from spark.nativemem.reservationBlockSize");
            try (NativeReservation r = mm.newReservation("e2e/buffers", 20 * MiB)) {
                checkEq(20 * MiB, mm.usedBytes(), "used after reserve");
                check(mm.reservedBytes() >= 20 * MiB && mm.reservedBytes() % block == 0,
                        "reserved whole blocks: " + mm.reservedBytes());
                checkEq(mm.reservedBytes(), l.heldBytes(), "Spark holds exactly what native reserved");
                Map<String, Long> gauges = NativeMemoryPlugin.executorMetrics();
                check(gauges.get("usedBytes") >= 20 * MiB, "usedBytes gauge sees the task: " + gauges);
                check(gauges.get("liveManagers") >= 1, "liveManagers gauge sees the task: " + gauges);

                // Another thread of the task: same manager through the TaskContext, none without.
                AtomicReference<Throwable> failure = new AtomicReference<>();
                Thread helper = new Thread(() -> {
                    try {
                        expectThrows(IllegalStateException.class, TaskNativeMemory::get, "outside a Spark task");
                        NativeMemoryManager same = TaskNativeMemory.get(ctx);
                        check(same == mm, "get(ctx) from a task's thread returns the task's manager");
                        try (NativeReservation w = same.newReservation("e2e/worker", 4 * MiB)) {
                            checkEq(24 * MiB, mm.usedBytes(), "used with the worker's reservation");
                        }
                    } catch (Throwable t) {
                        failure.set(t);
                    }
                }, "e2e-task-helper");
                helper.start();
                helper.join();
                if (failure.get() != null) {
                    throw new AssertionError("helper thread", failure.get());
                }

                // Threads the JVM did not start reserve through the listener (upcalls into Spark):
                // 12 MiB more than the 4 MiB cushion, so at least one of them calls Spark (a thread
                // is attached only once it made an upcall).
                long heldBefore = l.heldBytes();
                int attached = NativeTesting.growFromNativeThreads(mm.handle(), "e2e/native-threads", 2, 6, MiB);
                check(attached >= 1, "a native thread called Spark: " + attached);
                check(l.peakHeldBytes() > heldBefore, "Spark granted native threads memory");
                checkEq(20 * MiB, mm.usedBytes(), "native threads released theirs");
                long address = NativeTesting.allocate(mm.handle(), "e2e/alloc", 6 * MiB);
                checkEq(26 * MiB, mm.usedBytes(), "used with a native allocation");
                checkEq(6 * MiB, NativeTesting.free(mm.handle(), address), "native free");

                r.grow(10 * MiB);
                checkEq(mm.reservedBytes(), l.heldBytes(), "Spark holds exactly what native reserved after grow");
                r.shrink(25 * MiB);
                checkEq(5 * MiB, r.size(), "reservation size");
            }
            checkEq(0, mm.usedBytes(), "all released");
            checkEq(mm.reservedBytes(), l.heldBytes(), "Spark holds exactly what native reserved at the end");
            check(mm.peakBytes() >= 30 * MiB, "native peak " + mm.peakBytes());
            // Operator state attached to the manager (a registered spiller) is released by its close
            // at task end: not a leak, even with spark.unsafe.exceptionOnMemoryLeak=true.
            NativeTesting.registerSpiller(mm.handle(), "e2e/operator-state", 2 * MiB, 0);
            return new long[] {ctx.taskAttemptId(), mm.peakBytes(), l.peakHeldBytes()};
        }

        /**
         * Spark asks for memory back from another thread of the task, holding the task memory
         * manager's monitor, while the task ends and its manager closes: every call returns
         * normally (0 from the moment the close starts), nothing is lost or held.
         */
        void racing() throws Exception {
            int tasks = 2;
            jsc.parallelize(seeds(tasks), tasks).foreach(i -> {
                NativeMemoryManager mm = TaskNativeMemory.get();
                SparkReservationListener l = TaskNativeMemory.listener();
                NativeReservation r = mm.newReservation("e2e/racing", 24 * MiB);
                r.shrink(10 * MiB); // leaves a cushion to give back
                NativeTesting.registerSpiller(mm.handle(), "e2e/racing-spiller", 16 * MiB, 0);
                SpillRacer.start(l, TaskContext.get().taskMemoryManager());
                for (int k = 0; k < 5; k++) { // the task keeps using memory while the racer spills
                    r.grow(4 * MiB);
                    r.shrink(4 * MiB);
                    Thread.sleep(2);
                }
                r.close();
            });
            tracker.awaitIdle(jsc, 30_000);
            List<E2e.ExecutorReport> reports = E2e.assertNoLeak(jsc, executors, "after spills racing with close");
            long afterClose = 0;
            for (E2e.ExecutorReport r : reports) {
                afterClose += r.racerCallsAfterClose;
            }
            checkEq(tasks * 2_000L, afterClose, "spill calls after close: " + reports);
            reclaimedSoFar = E2e.sum(reports, "reclaimedAtCloseBytes");
        }

        void failing() throws Exception {
            int mark = tracker.mark(jsc);
            expectThrows(Exception.class, () -> jsc.parallelize(seeds(4), 4).foreach(i -> {
                NativeMemoryManager mm = TaskNativeMemory.get();
                mm.newReservation("e2e/held", 16 * MiB); // never closed
                NativeTesting.allocate(mm.handle(), "e2e/alloc", 2 * MiB); // never freed
                NativeTesting.registerSpiller(mm.handle(), "e2e/spiller", 8 * MiB, 0);
                checkEq(26 * MiB, mm.usedBytes(), "used before the failure");
                throw new IllegalStateException("e2e: boom while holding native memory");
            }), "e2e: boom while holding native memory");
            tracker.awaitIdle(jsc, 60_000);
            int failedAttempts = 0;
            for (E2e.TaskEnd e : tracker.endedSince(mark)) {
                if (e.reason.equals("ExceptionFailure")) {
                    failedAttempts++;
                }
            }
            check(failedAttempts >= 1, "failed attempts seen: " + tracker.endedSince(mark));
            List<E2e.ExecutorReport> reports = E2e.assertNoLeak(jsc, executors, "after failed tasks");
            long reclaimed = E2e.sum(reports, "reclaimedAtCloseBytes") - reclaimedSoFar;
            // Every attempt that failed (killed siblings may hold less) had its 26 MiB freed by close.
            check(reclaimed >= failedAttempts * 26 * MiB,
                    "close reclaimed >= " + failedAttempts + " x 26 MiB, got " + reclaimed + ": " + reports);
            reclaimedSoFar += reclaimed;
        }

        void leaking() throws Exception {
            expectThrows(Exception.class, () -> jsc.parallelize(seeds(1), 1).foreach(i -> {
                TaskNativeMemory.get().newReservation("e2e/forgotten", 3 * MiB); // succeeds, never closed
            }), "native memory still in use", "e2e/forgotten: 3.0 MiB", "spark.unsafe.exceptionOnMemoryLeak=true");
            tracker.awaitIdle(jsc, 60_000);
            List<E2e.ExecutorReport> reports = E2e.assertNoLeak(jsc, executors, "after leaking tasks");
            reclaimedSoFar = E2e.sum(reports, "reclaimedAtCloseBytes");
        }

        void killed() throws Exception {
            int slots = 2; // local[2] and local-cluster[2,1,...] both run 2 tasks at once
            File dir = Files.createTempDirectory("nativemem-e2e-kill").toFile();
            final String path = dir.getAbsolutePath();
            int mark = tracker.mark(jsc);
            AtomicReference<Throwable> jobError = new AtomicReference<>();
            Thread job = new Thread(() -> {
                jsc.setJobGroup("e2e-kill", "tasks killed while holding native memory", true);
                try {
                    jsc.parallelize(seeds(slots), slots).foreach(i -> {
                        NativeMemoryManager mm = TaskNativeMemory.get();
                        mm.newReservation("e2e/sleeping", 24 * MiB);
                        NativeTesting.registerSpiller(mm.handle(), "e2e/spiller", 8 * MiB, 0);
                        TaskContext ctx = TaskContext.get();
                        new File(path, "task-" + ctx.taskAttemptId()).createNewFile();
                        Thread.sleep(120_000); // interrupted by the cancellation
                        throw new AssertionError("e2e: the task was not killed");
                    });
                    jobError.set(new AssertionError("e2e: the job was not cancelled"));
                } catch (Throwable t) {
                    jobError.set(t);
                }
            }, "e2e-kill-job");
            job.start();
            long deadline = System.currentTimeMillis() + 60_000;
            while (countFiles(dir) < slots) {
                check(System.currentTimeMillis() < deadline && job.isAlive(),
                        "tasks reserved native memory before the cancellation (" + countFiles(dir) + " ready)"
                                + (jobError.get() == null ? "" : ": " + E2e.fullMessage(jobError.get())));
                Thread.sleep(20);
            }
            jsc.cancelJobGroup("e2e-kill");
            job.join(60_000);
            check(!job.isAlive(), "the cancelled job returned");
            String msg = E2e.fullMessage(jobError.get());
            check(msg.contains("cancel"), "job failed by the cancellation: " + msg);
            tracker.awaitIdle(jsc, 60_000);
            int killed = 0;
            for (E2e.TaskEnd e : tracker.endedSince(mark)) {
                check(e.reason.equals("TaskKilled"), "task ended killed: " + e + " " + e.reasonText);
                killed++;
            }
            checkEq(slots, killed, "killed tasks");
            List<E2e.ExecutorReport> reports = E2e.assertNoLeak(jsc, executors, "after killed tasks");
            long reclaimed = E2e.sum(reports, "reclaimedAtCloseBytes") - reclaimedSoFar;
            check(reclaimed >= slots * 32 * MiB, "close reclaimed the killed tasks' memory: " + reclaimed);
            for (File f : dir.listFiles()) {
                f.delete();
            }
            dir.delete();
        }

        private static int countFiles(File dir) {
            String[] names = dir.list();
            return names == null ? 0 : names.length;
        }
    }
}
