package org.nativemem.e2e;

import static org.nativemem.e2e.E2e.MiB;
import static org.nativemem.e2e.E2e.check;
import static org.nativemem.e2e.E2e.checkEq;

import java.io.Serializable;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;

import org.apache.spark.SparkConf;
import org.apache.spark.TaskContext;
import org.apache.spark.api.java.JavaSparkContext;
import org.apache.spark.memory.MemoryConsumer;
import org.apache.spark.memory.MemoryMode;
import org.apache.spark.memory.TaskMemoryManager;
import org.apache.spark.sql.SparkSession;
import org.nativemem.NativeMemoryConfig;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeMemoryStats;
import org.nativemem.ReservationListener;
import org.nativemem.examples.DataFusionQueryException;
import org.nativemem.examples.DataFusionStats;
import org.nativemem.examples.DataFusionTask;
import org.nativemem.spark.NativeMemoryPlugin;
import org.nativemem.spark.NativeMemorySparkConf;
import org.nativemem.spark.SparkReservationListener;
import org.nativemem.spark.TaskNativeMemory;

/**
 * DataFusion inside Spark tasks, and Spark making DataFusion spill. Every task runs a
 * DataFusion query ({@link DataFusionTask}, the engine in its own library
 * {@code libnativemem_df_engine}, from {@code nativemem-examples.jar}) on the task's manager while a
 * JVM {@code MemoryConsumer} of the same task competes for the task's off-heap execution memory.
 * Run with the plugin, {@code spark.memory.offHeap.enabled=true}, a small off-heap size (96m: 48 MiB
 * a task in {@code local[2]}, 96 MiB in {@code local-cluster[2,1,1024]}) and 1m reservation blocks
 * (tests.txt), on Spark 3.5 and 4.0.
 *
 * <p>Job 1, nativemem, {@value #TASKS} tasks (2 at a time), each:
 * <ol>
 *   <li>the JVM consumer takes all the execution memory Spark grants the task (4 MiB steps until a
 *       grant comes back short);
 *   <li>opens a {@link DataFusionTask} on {@code TaskNativeMemory.get()} answering spill requests and
 *       starts {@code ORDER BY} over {@code --rows} generated rows (3 million by default: 24 MB of
 *       keys, more than the task's share with DataFusion's overhead). <b>DataFusion → Spark</b>:
 *       DataFusion's first grows find no memory left, so Spark spills the JVM consumer for them;
 *   <li>once DataFusion holds 8 MiB, and while the query runs, the JVM consumer asks for memory
 *       again, 4 MiB at a time up to 24 MiB (retrying short grants every 10 ms). <b>Spark →
 *       DataFusion</b>: Spark asks nativemem's consumer to spill; nativemem hands back its cushion
 *       and makes DataFusion's spillable consumers yield: their next {@code try_grow} is refused, so
 *       they spill, and the freed bytes go back to Spark;
 *   <li>awaits the query: same rows and digest as an unbounded run on the driver (a manager of its
 *       own, no Spark, no limit); closes the task and frees the JVM consumer: the task's manager
 *       has 0 bytes used, and Spark's leak check ({@code spark.unsafe.exceptionOnMemoryLeak=true})
 *       passes.
 * </ol>
 * The driver requires both directions in every task (the JVM consumer spilled for DataFusion;
 * DataFusion yielded and spilled after Spark asked), Spark's task peak execution memory covering the
 * task's native peak (DataFusion's memory is in Spark's figures), the plugin's {@code usedBytes}
 * gauge having seen DataFusion's bytes, and then no manager, native byte or byte held from Spark
 * left in any executor ({@link E2e#assertNoLeak}).
 *
 * <p>Job 2, the comparison: the same tasks with the per-call pool of Apache DataFusion Comet's design
 * (a {@link CometLikeConsumer}, a {@code MemoryConsumer} whose {@code acquireMemory}/{@code freeMemory}
 * the engine calls through JNI on every grow and shrink, and whose {@code spill} returns 0). Its
 * results are recorded, not required: a failed query or a starved JVM consumer is a finding. The
 * driver prints both runs as a table: listener/JNI calls, DataFusion spills caused by Spark, the JVM
 * consumer's spills and short grants, query results, wall time.
 *
 * <p>Arguments: {@code --rows N} (default 3000000), {@code --query ORDER_BY|GROUP_BY}.
 */
public final class DataFusionJob {
    static final String PREFIX = "DataFusionJob";
    static final int TASKS = 4;
    static final int PARTITIONS = 2;
    static final long FIRST_STEP = 4 * MiB;
    static final long PHASE2_STEP = 4 * MiB;
    static final long PHASE2_TOTAL = 24 * MiB;
    static final long PHASE2_WHEN_DATAFUSION_HOLDS = 8 * MiB;
    static final String NATIVEMEM = "nativemem";
    static final String PER_CALL = "per-call (Comet's design)";

    private DataFusionJob() {
    }

    public static void main(String[] args) throws Exception {
        long rows = 3_000_000;
        DataFusionTask.Query query = DataFusionTask.Query.ORDER_BY;
        for (int i = 0; i < args.length; i++) {
            if (args[i].equals("--rows")) {
                rows = Long.parseLong(args[++i]);
            } else if (args[i].equals("--query")) {
                query = DataFusionTask.Query.valueOf(args[++i]);
            } else {
                throw new IllegalArgumentException("unknown argument " + args[i]);
            }
        }
        long start = System.nanoTime();
        SparkSession spark = SparkSession.builder().appName("nativemem-e2e-datafusion").getOrCreate();
        try {
            JavaSparkContext jsc = JavaSparkContext.fromSparkContext(spark.sparkContext());
            SparkConf conf = jsc.getConf();
            check(conf.get("spark.plugins", "").contains(NativeMemoryPlugin.class.getName()),
                    "spark.plugins enables " + NativeMemoryPlugin.class.getName());
            check(conf.getBoolean("spark.unsafe.exceptionOnMemoryLeak", false),
                    "spark.unsafe.exceptionOnMemoryLeak=true (scripts/spark-submit.sh sets it)");
            NativeMemorySparkConf settings = NativeMemorySparkConf.fromSparkConf(conf);
            check(settings.offHeapEnabled(), "spark.memory.offHeap.enabled=true");
            int executors = E2e.executorCount(jsc.master());
            E2e.Tracker tracker = E2e.Tracker.install(jsc);

            // ---- the reference: unbounded, on the driver, no Spark memory -------------------------------
            DataFusionStats reference = unboundedRun(query, rows);
            System.out.printf(Locale.ROOT, "%s: reference (driver, unbounded, no Spark): %s %,d rows -> %,d rows,"
                    + " digest 0x%016x, peak %d MiB, %.2f s%n", PREFIX, query, rows, reference.rows(),
                    reference.digest(), reference.peakReservedBytes() / MiB, reference.elapsedNanos() / 1e9);

            // ---- job 1: nativemem -----------------------------------------------------------------------
            Run nm = runJob(jsc, tracker, NATIVEMEM, query, rows);
            // The per-task requirements are collected, so that a failing run still prints the comparison.
            Problems problems = new Problems();
            long jvmSpills = 0;
            long jvmSpilled = 0;
            long yields = 0;
            long yielded = 0;
            long dfSpilled = 0;
            long dfSpills = 0;
            for (TaskResult r : nm.results) {
                String what = NATIVEMEM + " task " + r.taskAttemptId + ": " + r;
                problems.check(r.failure == null, "the query succeeded on nativemem's pool: " + what);
                problems.checkEq(reference.rows(), r.stats.rows(), "rows == the unbounded run: " + what);
                problems.checkEq(reference.digest(), r.stats.digest(), "digest == the unbounded run: " + what);
                problems.check(r.jvmSpillsForDataFusion >= 1, "DataFusion -> Spark: Spark spilled the JVM consumer for"
                        + " DataFusion: " + what);
                problems.check(r.stats.spillRequests() >= 1 && r.sparkSpillRequests >= 1,
                        "Spark -> DataFusion: Spark asked nativemem, nativemem asked the pool: " + what);
                problems.check(r.stats.yields() >= 1, "Spark -> DataFusion: DataFusion's consumers yielded: " + what);
                problems.check(r.stats.dfSpillCount() >= 1, "DataFusion spilled: " + what);
                problems.checkEq(0, r.stats.perCallCalls(), "no per-call JNI call on nativemem's pool: " + what);
                problems.check(r.managerPeakBytes > 0, "DataFusion's memory was charged to the task's manager: " + what);
                problems.check(r.gaugeUsedMax >= MiB, "the plugin's usedBytes gauge saw DataFusion's bytes: " + what);
                E2e.TaskEnd end = nm.ends.get(r.taskAttemptId);
                // A grow is charged to the manager before its block is reserved from Spark, so the
                // manager's peak may run ahead of what Spark saw by the grows in flight at that
                // moment: at most one block per DataFusion thread (2 engine threads, 1 MiB blocks).
                problems.check(end != null && end.peakExecutionMemory + 2 * MiB >= r.managerPeakBytes,
                        "Spark's task peak execution memory includes DataFusion's native peak (within the "
                        + "grows in flight): " + end + ", " + what);
                jvmSpills += r.jvmSpillsForDataFusion;
                jvmSpilled += r.jvmSpilledForDataFusion;
                yields += r.stats.yields();
                yielded += r.stats.yieldedBytes();
                dfSpills += r.stats.dfSpillCount();
                dfSpilled += r.stats.dfSpilledBytes();
            }
            E2e.assertNoLeak(jsc, executors, "after the DataFusion tasks on nativemem");

            // ---- job 2: the per-call pool (Comet's design), same data, same JVM consumer -------------------
            Run pc = runJob(jsc, tracker, PER_CALL, query, rows);
            for (TaskResult r : pc.results) {
                String what = PER_CALL + " task " + r.taskAttemptId + ": " + r;
                if (r.failure == null) {
                    checkEq(reference.rows(), r.stats.rows(), "rows == the unbounded run: " + what);
                    checkEq(reference.digest(), r.stats.digest(), "digest == the unbounded run: " + what);
                }
                checkEq(0, r.stats.yields(), "a per-call pool cannot be asked to yield: " + what);
                checkEq(0, r.cometUsedAtEnd, "the per-call consumer got every byte back: " + what);
                checkEq(0, r.managerPeakBytes, "nativemem is not charged in the per-call mode: " + what);
            }
            E2e.assertNoLeak(jsc, executors, "after the DataFusion tasks on the per-call pool");

            // ---- the comparison table ------------------------------------------------------------------
            System.out.printf(Locale.ROOT, "%n%s: %s over %,d rows in each of %d tasks, Spark %s, %s,"
                    + " spark.memory.offHeap.size=%s, block %d MiB; sums over the tasks%n", PREFIX, query, rows, TASKS,
                    spark.version(), jsc.master(), conf.get("spark.memory.offHeap.size", "?"),
                    settings.reservationBlockSizeBytes() / MiB);
            System.out.println("| pool | listener/JNI calls | DataFusion spills caused by Spark | DataFusion spills"
                    + " (all) | JVM consumer spills for DataFusion | JVM consumer short grants | queries ok | query ms |"
                    + " job wall ms |");
            System.out.println("|---|---:|---|---|---|---:|---|---:|---:|");
            System.out.println(nm.row());
            System.out.println(pc.row());
            System.out.println("(listener/JNI calls: nativemem: the manager's calls of its Spark listener (reserve +"
                    + " unreserve) plus Spark's spill calls into nativemem; per-call: the pool's JNI calls of"
                    + " acquireMemory/freeMemory. Spills caused by Spark: try_grows refused because Spark asked"
                    + " (yields), with the bytes the yielding consumers held. Query ms: the tasks' queries, summed;"
                    + " job wall: the Spark job, the first one paying the executors' library loading.)");
            System.out.println();

            problems.throwIfAny();
            System.out.printf(Locale.ROOT, "PASS %s: Spark %s, %s: DataFusion %s of %,d rows in %d tasks on the"
                    + " task's manager, results == unbounded run; Spark -> DataFusion: %d yields (%.1f MiB held),"
                    + " DataFusion spilled %.1f MiB in %d spills; DataFusion -> Spark: the JVM consumer spilled %d"
                    + " times, %.1f MiB; Spark leak check passed, nothing left on %d executor(s); per-call"
                    + " comparison: %d JNI calls vs %d, %d/%d queries ok, JVM consumer %d short grants vs %d"
                    + " (%.1f s)%n", PREFIX, spark.version(), jsc.master(), query, rows, TASKS, yields, yielded / (double) MiB,
                    dfSpilled / (double) MiB, dfSpills, jvmSpills, jvmSpilled / (double) MiB, executors, pc.calls(),
                    nm.calls(), pc.ok(), TASKS, pc.shortGrants(), nm.shortGrants(),
                    (System.nanoTime() - start) / 1e9);
        } finally {
            spark.stop();
        }
    }

    /** Requirements that failed, reported together at the end. */
    static final class Problems {
        private final List<String> failed = new ArrayList<>();

        void check(boolean ok, String what) {
            if (!ok) {
                failed.add(what);
                System.out.println(PREFIX + ": CHECK FAILED: " + what);
            }
        }

        void checkEq(long expected, long actual, String what) {
            check(expected == actual, what + ": expected " + expected + ", got " + actual);
        }

        void throwIfAny() {
            if (!failed.isEmpty()) {
                throw new AssertionError("e2e check failed: " + failed.size() + " requirement(s): "
                        + String.join("\n", failed));
            }
        }
    }

    /** The reference: the same query on a manager of its own with no limit and no Spark. */
    static DataFusionStats unboundedRun(DataFusionTask.Query query, long rows) {
        ReservationListener unlimited = new ReservationListener() {
            @Override
            public long reserve(long bytes) {
                return bytes;
            }

            @Override
            public void unreserve(long bytes) {
            }
        };
        NativeMemoryManager mm = NativeMemoryManager.create(PREFIX + "-reference", unlimited,
                NativeMemoryConfig.defaults().withReservationBlockSize(MiB));
        DataFusionStats s;
        try {
            try (DataFusionTask df = DataFusionTask.open(mm, DataFusionTask.DEFAULT_POOL_PATH, PARTITIONS, false, null)) {
                df.start(query, rows);
                s = df.await();
            }
            checkEq(0, mm.usedBytes(), "reference run: nothing used after the close");
        } finally {
            mm.close();
        }
        check(!mm.closeReport().hasLeaks(), "reference run: " + mm.closeReport());
        check(s.finished() && s.rows() > 0, "reference run: " + s);
        return s;
    }

    /** One Spark job of {@value #TASKS} tasks in one mode, with the driver's view of its tasks. */
    static final class Run {
        final String mode;
        final List<TaskResult> results;
        final Map<Long, E2e.TaskEnd> ends;
        final long wallNanos;

        Run(String mode, List<TaskResult> results, Map<Long, E2e.TaskEnd> ends, long wallNanos) {
            this.mode = mode;
            this.results = results;
            this.ends = ends;
            this.wallNanos = wallNanos;
        }

        long calls() {
            long n = 0;
            for (TaskResult r : results) {
                n += r.calls();
            }
            return n;
        }

        long shortGrants() {
            long n = 0;
            for (TaskResult r : results) {
                n += r.jvmShortGrants;
            }
            return n;
        }

        int ok() {
            int n = 0;
            for (TaskResult r : results) {
                n += r.failure == null ? 1 : 0;
            }
            return n;
        }

        String row() {
            long yields = 0;
            long yielded = 0;
            long dfSpills = 0;
            long dfSpilled = 0;
            long jvmSpills = 0;
            long jvmSpilled = 0;
            for (TaskResult r : results) {
                yields += r.stats.yields();
                yielded += r.stats.yieldedBytes();
                dfSpills += r.stats.dfSpillCount();
                dfSpilled += r.stats.dfSpilledBytes();
                jvmSpills += r.jvmSpillsForDataFusion;
                jvmSpilled += r.jvmSpilledForDataFusion;
            }
            long unaccounted = 0;
            for (TaskResult r : results) {
                unaccounted += r.cometUnaccountedBytes;
            }
            StringBuilder failures = new StringBuilder();
            for (TaskResult r : results) {
                if (r.failure != null) {
                    String first = r.failure.split("\n", 2)[0];
                    failures.append(failures.length() == 0 ? "; failed: " : " / ").append(
                            first.length() > 60 ? first.substring(0, 60) + "..." : first);
                }
            }
            String calls = mode.equals(NATIVEMEM)
                    ? String.format(Locale.ROOT, "%,d (%,d reserve, %,d unreserve, %,d spill)", calls(), sum("reserve"),
                            sum("unreserve"), sum("spill"))
                    : String.format(Locale.ROOT, "%,d JNI", calls());
            String bySpark = mode.equals(NATIVEMEM)
                    ? String.format(Locale.ROOT, "%,d yields (%.1f MiB held)", yields, yielded / (double) MiB)
                    : String.format(Locale.ROOT, "0 (spill() returned 0 %,d times)", sum("cometSpill"));
            if (unaccounted > 0) {
                failures.append(String.format(Locale.ROOT, "; %.1f MiB held beyond Spark's grants",
                        unaccounted / (double) MiB));
            }
            long queryNanos = 0;
            for (TaskResult r : results) {
                queryNanos += r.queryNanos;
            }
            return String.format(Locale.ROOT, "| %s | %s | %s | %,d (%.1f MiB) | %,d (%.1f MiB) | %,d | %d/%d%s | %,d |"
                    + " %,d |", mode, calls, bySpark, dfSpills, dfSpilled / (double) MiB, jvmSpills,
                    jvmSpilled / (double) MiB, shortGrants(), ok(), results.size(), failures, queryNanos / 1_000_000,
                    wallNanos / 1_000_000);
        }

        private long sum(String what) {
            long n = 0;
            for (TaskResult r : results) {
                switch (what) {
                    case "reserve":
                        n += r.reserveCalls;
                        break;
                    case "unreserve":
                        n += r.unreserveCalls;
                        break;
                    case "spill":
                        n += r.sparkSpillRequests;
                        break;
                    default:
                        n += r.cometSpillRequests;
                }
            }
            return n;
        }
    }

    static Run runJob(JavaSparkContext jsc, E2e.Tracker tracker, final String mode, final DataFusionTask.Query query,
            final long rows) throws Exception {
        int mark = tracker.mark(jsc);
        long t0 = System.nanoTime();
        List<TaskResult> results = jsc.parallelize(CEngineJob.seeds(TASKS), TASKS)
                .map(i -> task(mode, query, rows)).collect();
        long wall = System.nanoTime() - t0;
        tracker.awaitIdle(jsc, 120_000);
        List<E2e.TaskEnd> ends = tracker.endedSince(mark);
        checkEq(TASKS, ends.size(), mode + ": one attempt per task: " + ends);
        Map<Long, E2e.TaskEnd> byAttempt = new HashMap<>();
        for (E2e.TaskEnd end : ends) {
            check(end.reason.equals("Success"), mode + ": the task succeeded (Spark's leak check passed): " + end);
            byAttempt.put(end.taskId, end);
        }
        for (TaskResult r : results) {
            System.out.printf(Locale.ROOT, "%s %s task %d: %s%n", PREFIX, mode, r.taskAttemptId, r);
        }
        return new Run(mode, results, byAttempt, wall);
    }

    /** What one task did; returned to the driver. */
    static final class TaskResult implements Serializable {
        private static final long serialVersionUID = 1L;
        String mode;
        long taskAttemptId;
        DataFusionStats stats;
        /** The query's error (per-call mode only may fail), or null. */
        String failure;
        long queryNanos;
        long jvmFirstBytes;
        int jvmSpillsForDataFusion;
        long jvmSpilledForDataFusion;
        long jvmPhase2Bytes;
        int jvmShortGrants;
        long sparkSpillRequests;
        long sparkSpilledBytes;
        long reserveCalls;
        long unreserveCalls;
        long managerPeakBytes;
        long gaugeUsedMax;
        long cometSpillRequests;
        long cometUsedAtEnd;
        long cometUnaccountedBytes;
        long cometHeldAfterClose;

        long calls() {
            return mode.equals(NATIVEMEM) ? reserveCalls + unreserveCalls + sparkSpillRequests : stats.perCallCalls();
        }

        @Override
        public String toString() {
            return String.format(Locale.ROOT, "%s; %,d rows%s, query %d ms; DataFusion -> Spark: the JVM consumer (took"
                    + " %d MiB first) spilled %d time(s), %.1f MiB, for DataFusion; Spark -> DataFusion: the JVM consumer"
                    + " asked again and got %d MiB (%d short grants), Spark asked nativemem %d time(s) and got %.1f MiB"
                    + " at once, the pool was asked %d time(s) for %.1f MiB, %d yield(s) (%.1f MiB held), DataFusion"
                    + " spilled %d time(s), %.1f MiB; peak: DataFusion %.1f MiB, manager %.1f MiB, usedBytes gauge"
                    + " %.1f MiB; calls: %d reserve + %d unreserve + %d Spark spill (nativemem), %d per-call JNI, %d"
                    + " spill() of the per-call consumer, %.1f MiB held beyond Spark's grants, %.1f MiB still held"
                    + " when close returned", mode, stats.rows(), failure == null ? " ok" : " FAILED: "
                    + failure, queryNanos / 1_000_000, jvmFirstBytes / MiB, jvmSpillsForDataFusion,
                    jvmSpilledForDataFusion / (double) MiB, jvmPhase2Bytes / MiB, jvmShortGrants, sparkSpillRequests,
                    sparkSpilledBytes / (double) MiB, stats.spillRequests(), stats.requestedBytes() / (double) MiB,
                    stats.yields(), stats.yieldedBytes() / (double) MiB, stats.dfSpillCount(),
                    stats.dfSpilledBytes() / (double) MiB, stats.peakReservedBytes() / (double) MiB,
                    managerPeakBytes / (double) MiB, gaugeUsedMax / (double) MiB, reserveCalls, unreserveCalls,
                    sparkSpillRequests, stats.perCallCalls(), cometSpillRequests, cometUnaccountedBytes / (double) MiB,
                    cometHeldAfterClose / (double) MiB);
        }
    }

    /** Runs in the task. */
    static TaskResult task(String mode, DataFusionTask.Query query, long rows) throws InterruptedException {
        TaskContext ctx = TaskContext.get();
        TaskMemoryManager tmm = ctx.taskMemoryManager();
        NativeMemoryManager mm = TaskNativeMemory.get();
        SparkReservationListener l = TaskNativeMemory.listener();
        check(l.getMode() == MemoryMode.OFF_HEAP, "listener mode " + l.getMode());
        boolean nativemem = mode.equals(NATIVEMEM);
        TaskResult r = new TaskResult();
        r.mode = mode;
        r.taskAttemptId = ctx.taskAttemptId();

        // 1. The JVM consumer takes all Spark grants the task.
        SharedJvmConsumer jvm = new SharedJvmConsumer(tmm);
        while (true) {
            long got = jvm.acquire(FIRST_STEP);
            r.jvmFirstBytes += got;
            if (got < FIRST_STEP) {
                break;
            }
        }
        check(r.jvmFirstBytes >= FIRST_STEP, "the JVM consumer got memory: " + r.jvmFirstBytes);

        // 2. DataFusion on the task's manager (or on the per-call consumer): its grows need memory the
        // JVM consumer holds, so Spark spills it (DataFusion -> Spark).
        CometLikeConsumer comet = nativemem ? null : new CometLikeConsumer(tmm);
        DataFusionTask df = DataFusionTask.open(mm, DataFusionTask.DEFAULT_POOL_PATH, PARTITIONS, nativemem, comet);
        long t0 = System.nanoTime();
        df.start(query, rows);

        // 3. While it runs, once DataFusion holds memory, the JVM consumer wants memory again
        // (Spark -> DataFusion): Spark asks nativemem's consumer, nativemem asks DataFusion to yield.
        // The query is over when finished, or when DataFusion held memory and then nothing for a while.
        boolean phase2 = false;
        boolean held = false;
        int idle = 0;
        while (!df.stats().finished() && r.jvmPhase2Bytes < PHASE2_TOTAL && idle < 20
                && System.nanoTime() - t0 < 120_000_000_000L) {
            long holds = nativemem ? mm.usedBytes() : comet.usedNow();
            r.gaugeUsedMax = Math.max(r.gaugeUsedMax, gaugeUsedBytes());
            held |= holds > 0;
            idle = held && holds == 0 ? idle + 1 : 0;
            if (!phase2 && holds < PHASE2_WHEN_DATAFUSION_HOLDS) {
                Thread.sleep(2);
                continue;
            }
            phase2 = true;
            long got = jvm.acquire(PHASE2_STEP);
            r.jvmPhase2Bytes += got;
            if (got < PHASE2_STEP) {
                r.jvmShortGrants++;
            }
            Thread.sleep(10);
        }

        // 4. The result, checked by the driver against the unbounded run.
        try {
            r.stats = df.await();
        } catch (DataFusionQueryException e) {
            r.failure = e.getMessage();
            r.stats = df.stats();
        }
        r.queryNanos = System.nanoTime() - t0;
        r.gaugeUsedMax = Math.max(r.gaugeUsedMax, gaugeUsedBytes());
        df.close();
        checkEq(0, mm.usedBytes(), "the task's manager has nothing used after the DataFusion task closed");
        if (comet != null) {
            // Frees that arrive after close returned (DataFusion's aborted sub-tasks drop their
            // reservations on the runtime's threads): waited for here, and reported.
            r.cometHeldAfterClose = comet.usedNow();
            long deadline = System.nanoTime() + 10_000_000_000L;
            while (comet.usedNow() > 0 && System.nanoTime() < deadline) {
                Thread.sleep(5);
            }
        }
        NativeMemoryStats ms = mm.stats();
        r.reserveCalls = ms.reserveCalls();
        r.unreserveCalls = ms.unreserveCalls();
        r.managerPeakBytes = ms.peakBytes();
        r.sparkSpillRequests = l.spillRequests();
        r.sparkSpilledBytes = l.spilledBytes();
        synchronized (tmm) {
            r.jvmSpillsForDataFusion = jvm.spillsForOthers;
            r.jvmSpilledForDataFusion = jvm.spilledForOthers;
            if (comet != null) {
                r.cometSpillRequests = comet.spillRequests;
                r.cometUsedAtEnd = comet.getUsed();
                r.cometUnaccountedBytes = comet.unaccountedFreed;
            }
        }
        jvm.releaseAll();
        return r;
    }

    /** The plugin's {@code usedBytes} gauge of this executor (every task's native memory). */
    static long gaugeUsedBytes() {
        Long v = NativeMemoryPlugin.executorMetrics().get("usedBytes");
        return v == null ? 0 : v;
    }

    /**
     * A JVM operator's memory as Spark sees it, safe to spill from DataFusion's threads: Spark calls
     * {@link #spill} under the task's {@code TaskMemoryManager} monitor (from whichever thread asked
     * for memory), so every change of {@code used} here happens under that monitor too. Spilling
     * frees what is asked, like a sorter writing part of its buffer to disk.
     */
    static final class SharedJvmConsumer extends MemoryConsumer {
        private final TaskMemoryManager tmm;
        /** Guarded by tmm. */
        int spillsForOthers;
        long spilledForOthers;

        SharedJvmConsumer(TaskMemoryManager tmm) {
            super(tmm, tmm.pageSizeBytes(), MemoryMode.OFF_HEAP);
            this.tmm = tmm;
        }

        long acquire(long bytes) {
            synchronized (tmm) {
                return acquireMemory(bytes);
            }
        }

        void releaseAll() {
            synchronized (tmm) {
                if (getUsed() > 0) {
                    freeMemory(getUsed());
                }
            }
        }

        @Override
        public long spill(long size, MemoryConsumer trigger) {
            if (trigger == this) {
                return 0;
            }
            synchronized (tmm) {
                long freed = Math.min(size, getUsed());
                if (freed > 0) {
                    freeMemory(freed);
                    spillsForOthers++;
                    spilledForOthers += freed;
                }
                return freed;
            }
        }

        @Override
        public String toString() {
            return "e2e-datafusion-jvm-consumer(used " + getUsed() + ")";
        }
    }

    /**
     * The memory consumer of Apache DataFusion Comet's design, built here for the comparison only:
     * the engine's per-call pool calls {@link #acquireMemory(long)} on every DataFusion grow and
     * {@link #freeMemory(long)} on every shrink, through JNI from DataFusion's threads; Spark cannot
     * take memory back from it ({@link #spill} returns 0, as Comet's consumer does).
     */
    static final class CometLikeConsumer extends MemoryConsumer {
        private final TaskMemoryManager tmm;
        /** Guarded by tmm. */
        long spillRequests;
        /** Bytes freed beyond what Spark granted (held by infallible grows without a grant). */
        long unaccountedFreed;

        CometLikeConsumer(TaskMemoryManager tmm) {
            super(tmm, tmm.pageSizeBytes(), MemoryMode.OFF_HEAP);
            this.tmm = tmm;
        }

        @Override
        public long acquireMemory(long size) {
            synchronized (tmm) {
                return super.acquireMemory(size);
            }
        }

        /**
         * Frees up to what Spark granted: DataFusion's infallible {@code grow} keeps what Spark did not
         * grant (unaccounted, as in Comet), and its shrinks later free it too; counted, not passed on.
         */
        @Override
        public void freeMemory(long size) {
            synchronized (tmm) {
                long free = Math.min(size, getUsed());
                unaccountedFreed += size - free;
                if (free > 0) {
                    super.freeMemory(free);
                }
            }
        }

        long usedNow() {
            synchronized (tmm) {
                return getUsed();
            }
        }

        @Override
        public long spill(long size, MemoryConsumer trigger) {
            if (trigger != this) {
                synchronized (tmm) {
                    spillRequests++;
                }
            }
            return 0;
        }

        @Override
        public String toString() {
            return "e2e-comet-like-consumer(used " + getUsed() + ")";
        }
    }
}
