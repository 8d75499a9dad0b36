package org.nativemem.e2e;

import static org.nativemem.e2e.E2e.MiB;
import static org.nativemem.e2e.E2e.check;
import static org.nativemem.e2e.E2e.checkEq;
import static org.nativemem.e2e.E2e.expectThrows;

import java.util.Collections;
import java.util.List;

import org.apache.spark.TaskContext;
import org.apache.spark.api.java.JavaSparkContext;
import org.apache.spark.memory.MemoryMode;
import org.apache.spark.memory.TaskMemoryManager;
import org.apache.spark.sql.SparkSession;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeMemoryStats;
import org.nativemem.NativeOutOfMemoryException;
import org.nativemem.NativeReservation;
import org.nativemem.NativeTesting;
import org.nativemem.spark.NativeMemorySparkConf;
import org.nativemem.spark.SparkReservationListener;
import org.nativemem.spark.TaskNativeMemory;

/**
 * Spill in both directions between a task's native manager and a JVM {@code MemoryConsumer} of
 * the same task, and native out-of-memory, in either memory mode. Run on local[N] with
 * {@code spark.nativemem.taskLimit} set (160m in tests.txt) and the default 8m blocks.
 *
 * <p>One task does it all, step by step, asserting after each step what Spark holds for each
 * consumer ({@code heldBytes()} is always exactly the native {@code reservedBytes()}):
 * <ol>
 *   <li>the JVM consumer takes all the execution memory Spark has for the task;
 *   <li>native → Spark: a native reservation makes Spark spill the JVM consumer;
 *   <li>Spark → native, phase 1: the JVM consumer's request (1 MiB, less than a block) is served
 *       from the native manager's unused cushion, exactly, without touching a native consumer;
 *   <li>Spark → native, phase 2: a larger request spills a native spiller and the bytes reach the
 *       JVM consumer;
 *   <li>Spark has nothing left to give: a native request fails with a native out-of-memory error
 *       naming the pool, nothing changes;
 *   <li>the task limit refuses a request with the usage report;
 *   <li>Spark's forced spill ({@code MemoryConsumer.spill()}, {@code Long.MAX_VALUE} bytes) gives
 *       back all unused reserved bytes.
 * </ol>
 * A second job fails a task with an uncaught native out-of-memory error (the plugin logs the
 * usage report and counts it). Afterwards nothing is held on either side.
 */
public final class NativeMemorySpillJob {
    private NativeMemorySpillJob() {
    }

    public static void main(String[] args) throws Exception {
        long start = System.nanoTime();
        SparkSession spark = SparkSession.builder().appName("nativemem-e2e-spill").getOrCreate();
        try {
            JavaSparkContext jsc = JavaSparkContext.fromSparkContext(spark.sparkContext());
            NativeMemorySparkConf settings = NativeMemorySparkConf.fromSparkConf(jsc.getConf());
            check(settings.taskLimitBytes().isPresent(), "spark.nativemem.taskLimit is set for this job");
            checkEq(8 * MiB, settings.reservationBlockSizeBytes(), "this job expects 8m blocks");
            final boolean offHeap = settings.offHeapEnabled();
            final long taskLimit = settings.taskLimitBytes().getAsLong();
            E2e.Tracker tracker = E2e.Tracker.install(jsc);

            int mark = tracker.mark(jsc);
            List<long[]> out = jsc.parallelize(Collections.singletonList(0), 1)
                    .map(i -> spillTask(offHeap, taskLimit)).collect();
            tracker.awaitIdle(jsc, 30_000);
            long[] r = out.get(0);
            List<E2e.TaskEnd> ends = tracker.endedSince(mark);
            checkEq(1, ends.size(), "one task: " + ends);
            E2e.TaskEnd end = ends.get(0);
            check(end.reason.equals("Success"), "spill task succeeded: " + end);
            check(end.peakExecutionMemory >= r[1], "peakExecutionMemory >= held peak " + r[1] + ": " + end);
            long modePeak = offHeap ? end.peakOffHeap : end.peakOnHeap;
            check(modePeak == -1 || modePeak >= r[1], "Spark 4 TaskMemoryManager peak: " + end);

            // An uncaught native OOM fails the task; the failure listener logs and counts it.
            expectThrows(Exception.class, () -> jsc.parallelize(Collections.singletonList(0), 1).foreach(i -> {
                TaskNativeMemory.get().newReservation("e2e/too-big", taskLimit + MiB);
            }), "NativeOutOfMemoryException", "e2e/too-big");
            tracker.awaitIdle(jsc, 30_000);

            List<E2e.ExecutorReport> reports = E2e.assertNoLeak(jsc, 1, "after the spill job");
            E2e.ExecutorReport rep = reports.get(0);
            check(rep.stat("oomFailures") >= 1, "the OOM task failure was counted: " + rep);
            check(rep.stat("sparkSpillRequests") >= 2, "Spark's spill requests counted: " + rep);
            check(rep.stat("sparkSpilledBytes") >= 28 * MiB, "bytes given back to Spark counted: " + rep);
            check(rep.stat("spillCount") >= 1 && rep.stat("spilledBytes") >= 20 * MiB, "native spills counted: " + rep);
            check(rep.gauges.get("sparkSpillRequests") >= 2, "spill gauge: " + rep);

            System.out.printf("PASS NativeMemorySpillJob: Spark %s, %s, %s: task budget %d MiB; native->Spark"
                    + " spilled the JVM consumer; Spark->native took 1 MiB of cushion, then spilled a native"
                    + " spiller; native OOM when Spark had nothing and at the task limit (logged, counted);"
                    + " held from Spark at peak %d MiB = task metric peakExecutionMemory %d MiB; no leaks"
                    + " (%.1f s)%n", spark.version(), jsc.master(), offHeap ? "OFF_HEAP" : "ON_HEAP", r[0] / MiB,
                    r[1] / MiB, end.peakExecutionMemory / MiB, (System.nanoTime() - start) / 1e9);
        } finally {
            spark.stop();
        }
    }

    /** Runs in the task; returns {Spark's capacity for the task, peak held from Spark}. */
    static long[] spillTask(boolean offHeap, long taskLimit) {
        TaskContext ctx = TaskContext.get();
        TaskMemoryManager tmm = ctx.taskMemoryManager();
        NativeMemoryManager mm = TaskNativeMemory.get();
        SparkReservationListener l = TaskNativeMemory.listener();
        MemoryMode mode = offHeap ? MemoryMode.OFF_HEAP : MemoryMode.ON_HEAP;
        check(l.getMode() == mode, "listener mode " + l.getMode());
        if (!offHeap) {
            // Spark would grant 0 bytes OFF_HEAP: refused at construction, never accepted silently.
            expectThrows(IllegalStateException.class, () -> new SparkReservationListener(tmm, MemoryMode.OFF_HEAP,
                    "probe"), "spark.memory.offHeap.enabled=true", "0 bytes");
        }

        // 1. The JVM consumer takes everything Spark has for this task.
        JvmConsumer jvm = new JvmConsumer(tmm, mode);
        long capacity = jvm.acquire(1L << 40);
        check(capacity >= 128 * MiB, "Spark has at least 128 MiB for the task: " + capacity);
        check(jvm.acquire(MiB) == 0, "nothing left");

        // 2. Native -> Spark: a native reservation makes Spark spill the JVM consumer.
        NativeReservation a = mm.newReservation("e2e/native", 32 * MiB);
        check(jvm.spills >= 1, "the JVM consumer was spilled");
        checkEq(32 * MiB, l.heldBytes(), "Spark granted the native side 32 MiB");
        checkEq(32 * MiB, mm.reservedBytes(), "native reserved");
        checkEq(capacity, jvm.getUsed() + l.heldBytes(), "the JVM consumer gave up exactly that");

        // 3. Spark -> native, phase 1: the unused cushion, exactly, even below a block.
        a.shrink(8 * MiB);
        checkEq(8 * MiB, mm.reservedBytes() - mm.usedBytes(), "an 8 MiB cushion");
        NativeMemoryStats before = mm.stats();
        checkEq(MiB, jvm.acquire(MiB), "the JVM consumer got 1 MiB from the native cushion");
        checkEq(1, l.spillRequests(), "Spark asked the native side once");
        checkEq(MiB, l.spilledBytes(), "the native side gave back exactly 1 MiB, not 0 and not a block");
        checkEq(31 * MiB, mm.reservedBytes(), "reserved after phase 1");
        checkEq(before.usedBytes(), mm.usedBytes(), "no native consumer touched in phase 1");
        checkEq(before.spillCount(), mm.stats().spillCount(), "no native spill in phase 1");
        checkEq(mm.reservedBytes(), l.heldBytes(), "Spark holds exactly what native reserved");

        // 4. Spark -> native, phase 2: the cushion is not enough, a native spiller frees the rest.
        NativeTesting.registerSpiller(mm.handle(), "e2e/spillable", 40 * MiB, 0);
        checkEq(64 * MiB, mm.usedBytes(), "native used with the spiller");
        long cushion = mm.reservedBytes() - mm.usedBytes();
        before = mm.stats();
        long want = cushion + 20 * MiB;
        checkEq(want, jvm.acquire(want), "the JVM consumer got the cushion plus 20 MiB spilled natively");
        NativeMemoryStats after = mm.stats();
        checkEq(before.spillCount() + 1, after.spillCount(), "one native spill");
        checkEq(20 * MiB, after.spilledBytes() - before.spilledBytes(), "the spiller freed 20 MiB");
        checkEq(44 * MiB, mm.usedBytes(), "native used after phase 2");
        checkEq(mm.reservedBytes(), l.heldBytes(), "Spark holds exactly what native reserved");
        checkEq(capacity, jvm.getUsed() + l.heldBytes(), "all of the task's memory is accounted");

        // 5. Spark has nothing to give (the JVM consumer cannot spill): a native OOM naming the pool.
        jvm.spillable = false;
        long usedBefore = mm.usedBytes();
        NativeOutOfMemoryException oom = expectThrows(NativeOutOfMemoryException.class,
                () -> mm.newReservation("e2e/big", 64 * MiB), "e2e/big", "granted");
        check(mm.usedBytes() <= usedBefore, "the refused request left nothing charged");
        checkEq(mm.reservedBytes(), l.heldBytes(), "Spark holds exactly what native reserved after the OOM");
        check(oom.getMessage().contains("e2e/native"), "the usage report lists the pools: " + oom.getMessage());

        // 6. The task limit refuses, whatever Spark would grant.
        jvm.spillable = true;
        expectThrows(NativeOutOfMemoryException.class, () -> mm.newReservation("e2e/huge", taskLimit), "e2e/huge",
                "limit");

        // MemoryConsumer.spill() (Spark's forced spill: Long.MAX_VALUE) gives back every unused byte.
        try {
            l.spill();
        } catch (java.io.IOException e) {
            throw new AssertionError("forced spill", e);
        }
        checkEq(mm.usedBytes(), mm.reservedBytes(), "no cushion left after a forced spill");
        checkEq(mm.reservedBytes(), l.heldBytes(), "Spark holds exactly what native reserved");

        // Release everything; a successful task must not leave native memory in use.
        a.close();
        mm.spill(1L << 40);
        checkEq(0, mm.usedBytes(), "native used at the end");
        jvm.releaseAll();
        check(l.spillRequests() >= 2, "Spark asked the native side at least twice");
        return new long[] {capacity, l.peakHeldBytes()};
    }
}
