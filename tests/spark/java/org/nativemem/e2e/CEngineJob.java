package org.nativemem.e2e;

import static org.nativemem.e2e.E2e.check;
import static org.nativemem.e2e.E2e.checkEq;
import static org.nativemem.e2e.E2e.expectThrows;

import java.io.Serializable;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.concurrent.ConcurrentLinkedQueue;

import org.apache.spark.SparkConf;
import org.apache.spark.SparkEnv;
import org.apache.spark.TaskContext;
import org.apache.spark.api.java.JavaSparkContext;
import org.apache.spark.memory.MemoryMode;
import org.apache.spark.memory.TaskMemoryManager;
import org.apache.spark.sql.SparkSession;
import org.nativemem.NativeMemoryManager;
import org.nativemem.engine.CEngine;
import org.nativemem.spark.NativeMemoryPlugin;
import org.nativemem.spark.NativeMemorySparkConf;
import org.nativemem.spark.SparkReservationListener;
import org.nativemem.spark.TaskNativeMemory;

/**
 * Proof 2 of the engine boundary in Spark: in every task, the C engine of tests/c/engine.c (its
 * own shared library, compiled against include/nativemem.h only, shipped in nativemem-e2e.jar and
 * loaded next to nativemem) works on the task's manager through the {@code nm_api} table.
 * Run with the plugin, {@code spark.memory.offHeap.enabled=true}, a small off-heap size and 1m
 * reservation blocks (tests.txt), on local[2] and local-cluster[2,1,1024], Spark 3.5 and 4.0.
 *
 * <p>Job 1, four tasks, each:
 * <ol>
 *   <li>opens an engine on {@code TaskNativeMemory.get()} (a lease per JNI call, pool
 *       {@code c-engine/hash}, a C spiller, itself attached as state), allocates 8 buffers of a
 *       block plus half a block of index, and grows a reservation past 5 blocks and back: pool,
 *       manager and what Spark holds for the task agree exactly after each step;
 *   <li>Spark → C: a JVM {@code MemoryConsumer} of the same task asks for more than Spark has, so
 *       Spark spills nativemem's consumer, which spills the C engine (its callback frees buffers
 *       and shrinks its index through the table, on Spark's task thread);
 *   <li>C → Spark: the engine allocates again while the JVM consumer holds Spark's memory, so
 *       Spark spills the JVM consumer for it;
 *   <li>the engine keeps 7 buffers; the JVM consumer frees its memory; the task ends and its
 *       manager's close runs the engine's drop, which frees the buffers through the table: not a
 *       leak, and Spark's leak check ({@code spark.unsafe.exceptionOnMemoryLeak=true}) passes.
 * </ol>
 * Job 2: a task whose engine leaks on purpose (an allocation it forgets, a reservation it never
 * closes) and succeeds: the plugin's leak check fails it, naming the leaked reservation; the close
 * freed everything (in local-cluster Spark retries it 4 times).
 *
 * <p>After each job, read-outs taken in every executor JVM: every engine opened there had its
 * spiller dropped and its state's drop run once, the drop freed exactly what the engine held at
 * task end, no engine struct is left in C, and no native memory, manager or byte held from Spark
 * is left ({@link E2e#assertNoLeak}).
 */
public final class CEngineJob {
    static final String PREFIX = "CEngineJob";
    static final int TASKS = 4;
    static final String WORK = "work";
    static final String LEAK = "leak";

    /** The engines opened in this JVM, until a read-out task drains them. */
    static final ConcurrentLinkedQueue<Opened> OPENED = new ConcurrentLinkedQueue<>();

    /** An engine a task opened, and what the task expects its drop to free. */
    static final class Opened {
        final String kind;
        final long taskAttemptId;
        final CEngine engine;
        volatile long expectedDropBytes = -1;

        Opened(String kind, long taskAttemptId, CEngine engine) {
            this.kind = kind;
            this.taskAttemptId = taskAttemptId;
            this.engine = engine;
        }
    }

    private CEngineJob() {
    }

    public static void main(String[] args) throws Exception {
        long start = System.nanoTime();
        SparkSession spark = SparkSession.builder().appName("nativemem-e2e-c-engine").getOrCreate();
        try {
            JavaSparkContext jsc = JavaSparkContext.fromSparkContext(spark.sparkContext());
            SparkConf conf = jsc.getConf();
            check(conf.get("spark.plugins", "").contains(NativeMemoryPlugin.class.getName()),
                    "spark.plugins enables " + NativeMemoryPlugin.class.getName());
            check(conf.getBoolean("spark.unsafe.exceptionOnMemoryLeak", false),
                    "spark.unsafe.exceptionOnMemoryLeak=true (scripts/spark-submit.sh sets it)");
            NativeMemorySparkConf settings = NativeMemorySparkConf.fromSparkConf(conf);
            check(settings.offHeapEnabled(), "spark.memory.offHeap.enabled=true");
            final long block = settings.reservationBlockSizeBytes();
            int executors = E2e.executorCount(jsc.master());
            E2e.Tracker tracker = E2e.Tracker.install(jsc);

            // ---- job 1: the engine in every task ------------------------------------------------
            int mark = tracker.mark(jsc);
            List<long[]> results = jsc.parallelize(seeds(TASKS), TASKS).map(i -> engineTask(block)).collect();
            tracker.awaitIdle(jsc, 60_000);
            List<E2e.TaskEnd> ends = tracker.endedSince(mark);
            checkEq(TASKS, ends.size(), "one attempt per task: " + ends);
            long diskSpilled = 0;
            for (E2e.TaskEnd end : ends) {
                check(end.reason.equals("Success"), "the task succeeded (Spark's leak check passed): " + end);
                diskSpilled += end.diskBytesSpilled;
            }
            long cSpilled = 0;
            for (long[] r : results) {
                cSpilled += r[3];
            }
            // The engine reports what its spills wrote (pool_spill_written): Spark's Spill (Disk).
            checkEq(cSpilled, diskSpilled, "the tasks' diskBytesSpilled are what the C engine's spills wrote");
            long jvmSpilledForC = 0;
            for (long[] r : results) {
                System.out.printf("%s task %d: Spark had %d MiB for the task; Spark->C: %d spill(s) of the C engine,"
                        + " %d MiB freed in C (manager: %d spills, Spark asked %d times); C->Spark: the JVM consumer"
                        + " spilled %d time(s) for the engine; at task end the engine holds %d MiB%n", PREFIX, r[0],
                        r[1] / E2e.MiB, r[2], r[3] / E2e.MiB, r[4], r[5], r[6], r[7] / E2e.MiB);
                jvmSpilledForC += r[6];
            }
            check(jvmSpilledForC >= 1, "Spark spilled the JVM consumer for the C engine at least once");

            List<EngineReport> afterWork = engineReports(jsc, executors);
            int work = checkEngines(afterWork, WORK);
            checkEq(TASKS, work, "engines opened by the tasks and read out: " + afterWork);
            List<E2e.ExecutorReport> reports = E2e.assertNoLeak(jsc, executors, "after the C engine tasks");
            check(E2e.sum(reports, "sparkSpillRequests") >= TASKS, "Spark asked nativemem to spill: " + reports);
            check(E2e.sum(reports, "spillCount") >= TASKS, "native spills counted: " + reports);
            long reclaimedBefore = E2e.sum(reports, "reclaimedAtCloseBytes");

            // ---- job 2: an engine that leaks on purpose ---------------------------------------------
            mark = tracker.mark(jsc);
            expectThrows(Exception.class, () -> jsc.parallelize(seeds(1), 1).foreach(i -> leakTask(block)),
                    "native memory still in use", "CEngine.leaked", "spark.unsafe.exceptionOnMemoryLeak=true");
            tracker.awaitIdle(jsc, 60_000);
            int attempts = tracker.endedSince(mark).size();
            check(attempts >= 1, "the leaking task ran");
            List<EngineReport> afterLeak = engineReports(jsc, executors);
            int leaked = checkEngines(afterLeak, LEAK);
            checkEq(attempts, leaked, "one engine per leaking attempt: " + afterLeak);
            reports = E2e.assertNoLeak(jsc, executors, "after the leaking C engine tasks");
            long reclaimed = E2e.sum(reports, "reclaimedAtCloseBytes") - reclaimedBefore;
            check(reclaimed >= attempts * 5 * block,
                    "each leaking attempt's close reclaimed its 5 blocks (2 dropped + 3 leaked): " + reclaimed);

            System.out.printf("PASS %s: Spark %s, %s, block %d MiB: C engine (own .so, nm_api only) in %d tasks:"
                    + " Spark->C spills in every task, %d C->Spark spill(s) of the JVM consumer, drops freed the"
                    + " engines at close, Spark leak check passed; leak on purpose failed by the leak check in %d"
                    + " attempt(s), reclaimed %d MiB; no C engine struct, native byte or manager left on %d"
                    + " executor(s) (%.1f s)%n", PREFIX, spark.version(), jsc.master(), block / E2e.MiB, TASKS,
                    jvmSpilledForC, attempts, reclaimed / E2e.MiB, executors, (System.nanoTime() - start) / 1e9);
        } finally {
            spark.stop();
        }
    }

    static List<Integer> seeds(int n) {
        List<Integer> out = new ArrayList<>();
        for (int i = 0; i < n; i++) {
            out.add(i);
        }
        return out;
    }

    /**
     * Runs in the task. Returns {task attempt, Spark's memory for the task, C engine spills, bytes
     * they freed, manager spills, Spark's spill requests, JVM consumer spills for the engine,
     * bytes the engine holds at the end}.
     */
    static long[] engineTask(long block) {
        TaskContext ctx = TaskContext.get();
        TaskMemoryManager tmm = ctx.taskMemoryManager();
        NativeMemoryManager mm = TaskNativeMemory.get();
        SparkReservationListener l = TaskNativeMemory.listener();
        check(l.getMode() == MemoryMode.OFF_HEAP, "listener mode " + l.getMode());
        CEngine engine = CEngine.open(mm, "c-engine/hash", -1);
        Opened opened = new Opened(WORK, ctx.taskAttemptId(), engine);
        OPENED.add(opened);

        // 1. Buffers and an index, then a reservation past five blocks and back.
        engine.allocate(8, block, block / 2);
        CEngine.Stats s = engine.stats();
        long held = 8 * block + block / 2;
        checkEq(held, s.poolUsed, "pool used after allocating: " + s);
        checkEq(held, s.heldBytes(), "the engine holds its pool's bytes: " + s);
        checkEq(held, mm.usedBytes(), "manager used");
        checkEq(mm.reservedBytes(), l.heldBytes(), "Spark holds exactly what the manager reserved");
        CEngine.GrowShrink g = engine.growShrink(5 * block, 5);
        checkEq(5 * block, g.sizeAtPeak, "grown past 5 blocks: " + g);
        checkEq(held + 5 * block, g.poolUsedAtPeak, "pool at the peak: " + g);
        checkEq(held + 5 * block, g.managerUsedAtPeak, "manager at the peak: " + g);
        check(g.managerReservedAtPeak >= g.managerUsedAtPeak, "reserved covers used at the peak: " + g);
        checkEq(held, g.poolUsedAfter, "pool after shrinking back: " + g);
        checkEq(mm.reservedBytes(), l.heldBytes(), "Spark holds exactly what the manager reserved after the grow");

        // 2. Spark -> C: the JVM consumer wants more than Spark has; Spark spills nativemem's consumer,
        // which spills the C engine (buffers and index, freed through the table on this thread).
        JvmConsumer jvm = new JvmConsumer(tmm, MemoryMode.OFF_HEAP);
        long capacity = jvm.acquire(1L << 40);
        s = engine.stats();
        check(s.spills >= 1, "Spark's spill reached the C engine: " + s);
        check(s.spilledBytes >= held, "the engine spilled everything it held: " + s);
        checkEq(0, s.heldBytes(), "nothing left to spill: " + s);
        checkEq(0, s.poolUsed, "pool used after Spark's spill: " + s);
        check(l.spillRequests() >= 1, "Spark asked nativemem to spill");
        checkEq(mm.reservedBytes(), l.heldBytes(), "Spark holds exactly what the manager reserved after the spill");
        check(capacity > 0, "the JVM consumer got memory");

        // 3. C -> Spark: the engine needs memory while the JVM consumer holds what Spark has.
        jvm.acquire(1L << 40); // whatever other tasks freed meanwhile
        int jvmSpillsBefore = jvm.spills;
        engine.allocate(4, block, 0);
        int jvmSpills = jvm.spills - jvmSpillsBefore;

        // 4. State for the drop: 7 buffers in all. The JVM consumer frees its memory (Spark's leak
        // check covers it); the engine's buffers are freed by its drop when the manager closes.
        engine.allocate(3, block, 0);
        s = engine.stats();
        checkEq(7 * block, s.heldBytes(), "the engine holds 7 blocks: " + s);
        checkEq(7 * block, s.poolUsed, "pool used at the end: " + s);
        checkEq(7 * block, mm.usedBytes(), "manager used at the end");
        checkEq(mm.reservedBytes(), l.heldBytes(), "Spark holds exactly what the manager reserved at the end");
        checkEq(0, s.stateDropped, "not dropped while the task runs");
        jvm.releaseAll();
        opened.expectedDropBytes = s.heldBytes();
        return new long[] {ctx.taskAttemptId(), capacity, s.spills, s.spilledBytes, s.managerSpillCount,
            l.spillRequests(), jvmSpills, s.heldBytes()};
    }

    /** Runs in the task: the engine leaks on purpose and the task returns normally. */
    static void leakTask(long block) {
        TaskContext ctx = TaskContext.get();
        NativeMemoryManager mm = TaskNativeMemory.get();
        CEngine engine = CEngine.open(mm, "c-engine/leaky", -1);
        Opened opened = new Opened(LEAK, ctx.taskAttemptId(), engine);
        OPENED.add(opened);
        engine.allocate(2, block, 0);
        engine.leak(block, 2 * block);
        CEngine.Stats s = engine.stats();
        checkEq(5 * block, s.poolUsed, "pool used: " + s);
        checkEq(3 * block, s.leakedAllocBytes + s.leakedReservationBytes, "leaked: " + s);
        opened.expectedDropBytes = s.heldBytes();
    }

    // ---- read-outs in the executors ------------------------------------------------------------------

    /** The engines one executor JVM opened since the last read-out, after their managers closed. */
    static final class EngineReport implements Serializable {
        private static final long serialVersionUID = 1L;
        final String executorId;
        /** Per engine: kind, task attempt, then its stats after the close. */
        final List<String> kinds = new ArrayList<>();
        final List<long[]> engines = new ArrayList<>();
        /** {@link CEngine#globalStats()} after the engines were disposed. */
        long[] global;

        EngineReport(String executorId) {
            this.executorId = executorId;
        }

        @Override
        public String toString() {
            StringBuilder sb = new StringBuilder("executor " + executorId + ": ");
            for (int i = 0; i < engines.size(); i++) {
                long[] e = engines.get(i);
                sb.append(kinds.get(i)).append("[task ").append(e[0]).append(": lease ").append(e[1])
                        .append(", spiller dropped ").append(e[2]).append(", state dropped ").append(e[3])
                        .append(", drop freed ").append(e[4]).append(" of ").append(e[5]).append(" B, drop errors ")
                        .append(e[6]).append(", spills ").append(e[7]).append(", spill errors ").append(e[8])
                        .append("] ");
            }
            sb.append("global {opened, freed, state drops, spiller drops, spills, spilled, drop freed, drop errors} = ");
            for (long v : global) {
                sb.append(v).append(' ');
            }
            return sb.toString();
        }
    }

    static EngineReport drainEngines() {
        EngineReport r = new EngineReport(SparkEnv.get().executorId());
        Opened o;
        while ((o = OPENED.poll()) != null) {
            CEngine.Stats s = o.engine.stats();
            r.kinds.add(o.kind);
            r.engines.add(new long[] {o.taskAttemptId, s.leaseStatus, s.spillerDropped, s.stateDropped,
                s.dropFreedBytes, o.expectedDropBytes, s.dropErrors, s.spills, s.spillErrors});
            o.engine.dispose();
        }
        r.global = CEngine.globalStats();
        return r;
    }

    /** Runs read-out tasks until every executor reported; merges what each drained. */
    static List<EngineReport> engineReports(JavaSparkContext jsc, int executors) {
        Map<String, EngineReport> byExecutor = new TreeMap<>();
        for (int round = 0; round < 10 && byExecutor.size() < executors; round++) {
            int n = 4 * executors;
            List<EngineReport> got = jsc.parallelize(seeds(n), n).map(i -> {
                Thread.sleep(50);
                return drainEngines();
            }).collect();
            for (EngineReport r : got) {
                EngineReport into = byExecutor.get(r.executorId);
                if (into == null) {
                    byExecutor.put(r.executorId, r);
                } else {
                    into.kinds.addAll(r.kinds);
                    into.engines.addAll(r.engines);
                    into.global = r.global; // all drained by now: any read is final
                }
            }
        }
        // One more round so that every executor's global counters are read after its last drain.
        List<EngineReport> last = jsc.parallelize(seeds(4 * executors), 4 * executors).map(i -> {
            Thread.sleep(50);
            return drainEngines();
        }).collect();
        for (EngineReport r : last) {
            EngineReport into = byExecutor.get(r.executorId);
            check(r.engines.isEmpty(), "no engine opened after the job: " + r);
            if (into != null) {
                into.global = r.global;
            }
        }
        check(byExecutor.size() == executors, "reports from " + executors + " executors: " + byExecutor.keySet());
        return new ArrayList<>(byExecutor.values());
    }

    /** Checks every engine of {@code kind} was dropped at its manager's close; returns their number. */
    static int checkEngines(List<EngineReport> reports, String kind) {
        int n = 0;
        for (EngineReport r : reports) {
            System.out.println(PREFIX + " read-out " + r);
            for (int i = 0; i < r.engines.size(); i++) {
                long[] e = r.engines.get(i);
                String what = kind + " engine of task " + e[0] + " on executor " + r.executorId + ": " + r;
                check(r.kinds.get(i).equals(kind), "only " + kind + " engines: " + what);
                checkEq(CEngine.NM_ERR_STALE_HANDLE, e[1], "its manager is closed (acquire is stale): " + what);
                checkEq(1, e[2], "the spiller's drop ran once: " + what);
                checkEq(1, e[3], "the attached state's drop ran once: " + what);
                check(e[5] >= 0, "the task recorded what the drop should free: " + what);
                checkEq(e[5], e[4], "the drop freed exactly what the engine held: " + what);
                checkEq(0, e[6], "no failed call in the drop: " + what);
                checkEq(0, e[8], "no failed call in a spill: " + what);
                if (kind.equals(WORK)) {
                    check(e[7] >= 1, "Spark spilled the C engine: " + what);
                }
                n++;
            }
            long[] g = r.global;
            checkEq(g[0], g[1], "every engine struct opened in C was freed: " + r);
            checkEq(g[0], g[2], "a state drop per engine: " + r);
            checkEq(g[0], g[3], "a spiller drop per engine: " + r);
            checkEq(0, g[7], "no failed call in any drop: " + r);
        }
        return n;
    }
}
