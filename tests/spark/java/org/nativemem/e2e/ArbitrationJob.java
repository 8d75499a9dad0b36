package org.nativemem.e2e;

import java.util.Collections;
import java.util.List;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

import org.apache.spark.TaskContext;
import org.apache.spark.api.java.JavaSparkContext;
import org.apache.spark.api.java.function.FlatMapFunction;
import org.apache.spark.sql.SparkSession;
import org.nativemem.ExecutorArbiter;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeOutOfMemoryException;
import org.nativemem.NativeReservation;
import org.nativemem.spark.TaskNativeMemory;

/**
 * Executor-wide arbitration in Spark (local[2], one executor JVM; run with
 * {@code spark.memory.offHeap.size=64m} and {@code spark.nativemem.reservationBlockSize=24m}):
 * two tasks, run twice, with arbitration off and on.
 *
 * <p>Task A starts alone and reserves 48 MiB from Spark (two blocks; alone, Spark lets it hold the
 * whole pool), then shrinks to 1 byte: its manager keeps the 48 MiB as its idle cushion (two
 * blocks are within the hysteresis band). Then task B asks for 30 MiB: Spark, now with two tasks
 * (each up to 1/2 of the pool), grants 16 MiB, all that is free. Off, B fails with a native
 * out-of-memory error although 48 MiB sit idle in A. On, A hands 14 MiB of its idle cushion back
 * to Spark and B's retry gets it. The tasks meet through latches (local mode: one JVM); A holds
 * its cushion until B is done. Nothing may leak either way.
 */
public final class ArbitrationJob {
    private static final long MIB = 1L << 20;
    private static final ConcurrentHashMap<String, CountDownLatch> LATCHES = new ConcurrentHashMap<>();

    private ArbitrationJob() {}

    private static CountDownLatch latch(String name) {
        return LATCHES.computeIfAbsent(name, k -> new CountDownLatch(1));
    }

    private static void await(String name) throws InterruptedException {
        if (!latch(name).await(120, TimeUnit.SECONDS)) {
            throw new IllegalStateException("timed out waiting for " + name);
        }
    }

    /** One round: per task {partition, 1 if its grow succeeded, its reserved bytes at the end}. */
    private static List<long[]> round(JavaSparkContext jsc, final String round) {
        FlatMapFunction<java.util.Iterator<Long>, long[]> task = rows -> {
            int partition = TaskContext.get().partitionId();
            if (partition == 0) {
                NativeMemoryManager m = TaskNativeMemory.get();
                try (NativeReservation r = m.newReservation("a", 48 * MIB)) {
                    r.shrink(48 * MIB - 1);
                    latch(round + "/a-idle").countDown();
                    await(round + "/b-done");
                    return Collections.singletonList(new long[] {0, 1, m.reservedBytes()}).iterator();
                }
            }
            await(round + "/a-idle");
            NativeMemoryManager m = TaskNativeMemory.get();
            long ok;
            try (NativeReservation r = m.newReservation("b", 30 * MIB)) {
                ok = 1;
            } catch (NativeOutOfMemoryException e) {
                System.out.println("ArbitrationJob: " + round + ": task B: " + e.getMessage().split("\n")[0]);
                ok = 0;
            } finally {
                latch(round + "/b-done").countDown();
            }
            return Collections.singletonList(new long[] {1, ok, m.reservedBytes()}).iterator();
        };
        return jsc.parallelize(java.util.Arrays.asList(0L, 1L), 2).mapPartitions(task).collect();
    }

    private static long[] partition(List<long[]> results, int p) {
        for (long[] r : results) {
            if (r[0] == p) {
                return r;
            }
        }
        throw new IllegalStateException("no result of partition " + p);
    }

    public static void main(String[] args) throws Exception {
        SparkSession spark = SparkSession.builder().appName("nativemem-arbitration").getOrCreate();
        try {
            JavaSparkContext jsc = JavaSparkContext.fromSparkContext(spark.sparkContext());
            ExecutorArbiter.configure(false, false, 64 * MIB);
            List<long[]> off = round(jsc, "off");
            ExecutorArbiter.Status before = ExecutorArbiter.status();
            ExecutorArbiter.configure(true, false, 64 * MIB);
            List<long[]> on = round(jsc, "on");
            ExecutorArbiter.Status after = ExecutorArbiter.status();
            System.out.println("ArbitrationJob: Spark " + spark.version() + ": off: task B "
                    + (partition(off, 1)[1] == 1 ? "succeeded" : "failed") + ", task A kept "
                    + (partition(off, 0)[2] >> 20) + " MiB; on: task B "
                    + (partition(on, 1)[1] == 1 ? "succeeded" : "failed") + ", task A kept "
                    + (partition(on, 0)[2] >> 20) + " MiB; " + after);
            E2e.checkEq(0, partition(off, 1)[1], "off: task B's grow fails while A holds idle memory");
            E2e.checkEq(48 * MIB, partition(off, 0)[2], "off: task A keeps its idle cushion");
            E2e.checkEq(1, partition(on, 1)[1], "on: task B's grow succeeds");
            E2e.checkEq(34 * MIB, partition(on, 0)[2], "on: task A handed back what B was short (14 MiB)");
            E2e.checkEq(1, after.reclaims() - before.reclaims(), "on: one cross-task reclaim");
            E2e.checkEq(14 * MIB, after.reclaimedBytes() - before.reclaimedBytes(), "on: bytes reclaimed");
            E2e.assertNoLeak(jsc, 1, "after both rounds");
        } finally {
            spark.stop();
        }
    }
}
