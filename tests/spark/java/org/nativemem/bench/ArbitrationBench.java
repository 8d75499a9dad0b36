package org.nativemem.bench;

import java.util.Arrays;
import java.util.Locale;

import org.apache.spark.SparkConf;
import org.apache.spark.memory.MemoryConsumer;
import org.apache.spark.memory.MemoryMode;
import org.apache.spark.memory.TaskMemoryManager;
import org.apache.spark.memory.UnifiedMemoryManager;
import org.nativemem.ExecutorArbiter;
import org.nativemem.NativeMemoryConfig;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeReservation;
import org.nativemem.spark.SparkReservationListener;

/**
 * The arbitration benchmark of {@code scripts/bench.sh}: the Java API a task's code calls, over
 * Spark's own memory managers (one {@code UnifiedMemoryManager}, a {@code TaskMemoryManager} and a
 * {@link SparkReservationListener} per task, as an executor has them; no SparkContext needed).
 *
 * <pre>
 *   java -cp "$SPARK_HOME/jars/*:nativemem.jar:nativemem-e2e.jar" org.nativemem.bench.ArbitrationBench [--quick]
 * </pre>
 *
 * <ul>
 *   <li><b>fast path</b>: {@link NativeReservation#grow} + {@link NativeReservation#shrink} of
 *       64 KiB inside the manager's cushion (no listener call), with executor-wide arbitration on
 *       vs off, rounds alternating; the difference is what arbitration adds to a grow that needs
 *       none (it must not touch other tasks there: target 1 ns).</li>
 *   <li><b>short grant</b>: task A (24 MiB held, under its 1/N = 32 MiB) grows by one 8 MiB block
 *       while task B, which started alone, holds an idle 40 MiB block and the 64 MiB pool is full.
 *       Served by cross-task reclaim (arbitration on): B hands 8 MiB of its idle block back to
 *       Spark and A's retry gets it. Served by a spill of A's own operator (arbitration off): Spark
 *       spills A's JVM operator, which frees 8 MiB (no I/O: the mechanism only; a real spill also
 *       writes its data). Both timed around the one {@code grow} call; the state is restored
 *       between calls outside the timing.</li>
 * </ul>
 * Results go to stdout as {@code BENCH <key> <value>} lines. The bench fails (non-zero exit) if
 * the accounting is off at the end (Spark's pool not empty, a grow not served the expected way).
 */
public final class ArbitrationBench {
    private static final long KIB = 1L << 10;
    private static final long MIB = 1L << 20;

    private ArbitrationBench() {}

    /** A JVM operator of task A: spills {@code spillable} bytes when Spark asks. */
    static final class JvmOperator extends MemoryConsumer {
        long spillable;
        long spills;

        JvmOperator(TaskMemoryManager tmm) {
            super(tmm, tmm.pageSizeBytes(), MemoryMode.OFF_HEAP);
        }

        @Override
        public long spill(long size, MemoryConsumer trigger) {
            long freed = Math.min(spillable, getUsed());
            if (freed > 0) {
                freeMemory(freed);
                spillable -= freed;
                spills++;
            }
            return freed;
        }
    }

    private static void check(boolean ok, String what) {
        if (!ok) {
            throw new IllegalStateException("ArbitrationBench: " + what);
        }
    }

    private static long median(long[] v) {
        long[] s = v.clone();
        Arrays.sort(s);
        return s[s.length / 2];
    }

    /** ns per grow+shrink pair of 64 KiB on {@code r}, over {@code n} pairs. */
    private static double pairs(NativeReservation r, int n) {
        long t0 = System.nanoTime();
        for (int i = 0; i < n; i++) {
            r.grow(64 * KIB);
            r.shrink(64 * KIB);
        }
        return (System.nanoTime() - t0) / (double) n;
    }

    /**
     * One short grow of task A, timed. Set up (untimed): task B, alone in Spark's 64 MiB pool,
     * reserves 40 MiB (one 40 MiB block) and leaves it idle; then A's JVM operator takes 24 MiB
     * (two tasks: A may hold up to 1/N = 32 MiB, so it is not over its share; the pool is full).
     * A's native grow of one 8 MiB block gets nothing from the pool: Spark spills A's operator
     * ({@code spillable} bytes; 0: nothing) and, if that freed nothing, arbitration takes 8 MiB
     * of B's idle block. Torn down (untimed): everything back to Spark.
     *
     * @return ns of the grow call
     */
    private static long shortGrow(TaskMemoryManager tmmB, NativeMemoryManager a, JvmOperator jvmA, long spillable) {
        SparkReservationListener lb = new SparkReservationListener(tmmB, MemoryMode.OFF_HEAP, "task B");
        NativeMemoryManager b = NativeMemoryManager.create("task B", lb,
                NativeMemoryConfig.defaults().withReservationBlockSize(40 * MIB));
        lb.attach(b);
        try {
            b.newReservation("root", "op", MIB).close();
            check(lb.heldBytes() == 40 * MIB, "B holds its idle 40 MiB block: " + lb.heldBytes());
            check(jvmA.acquireMemory(24 * MIB) == 24 * MIB, "A's JVM operator got 24 MiB");
            jvmA.spillable = spillable;
            long t0 = System.nanoTime();
            NativeReservation r = a.newReservation("root", "burst", 8 * MIB);
            long ns = System.nanoTime() - t0;
            r.close();
            a.releaseUnused(Long.MAX_VALUE);
            check(lb.heldBytes() == (spillable == 0 ? 32 * MIB : 40 * MIB), "B gave back only if A's spill did not serve");
            return ns;
        } finally {
            jvmA.freeMemory(jvmA.getUsed());
            b.close();
        }
    }

    public static void main(String[] args) {
        boolean quick = args.length > 0 && args[0].equals("--quick");
        int rounds = quick ? 3 : 9;
        int pairsPerRound = quick ? 200_000 : 2_000_000;
        int shortOps = quick ? 200 : 2_000;

        SparkConf conf = new SparkConf(false).set("spark.memory.offHeap.enabled", "true")
                .set("spark.memory.offHeap.size", "64m");
        UnifiedMemoryManager spark = new UnifiedMemoryManager(conf, 256 * MIB, 128 * MIB, 2);
        TaskMemoryManager tmmA = new TaskMemoryManager(spark, 1);
        TaskMemoryManager tmmB = new TaskMemoryManager(spark, 2);
        NativeMemoryConfig config = NativeMemoryConfig.defaults().withReservationBlockSize(8 * MIB);
        SparkReservationListener la = new SparkReservationListener(tmmA, MemoryMode.OFF_HEAP, "task A");
        NativeMemoryManager a = NativeMemoryManager.create("task A", la, config);
        la.attach(a);
        SparkReservationListener lb = new SparkReservationListener(tmmB, MemoryMode.OFF_HEAP, "task B");
        NativeMemoryManager b = NativeMemoryManager.create("task B", lb, config);
        lb.attach(b);
        JvmOperator jvmA = new JvmOperator(tmmA);
        try {
            // ---- fast path: grows inside the cushion, arbitration on vs off ------------------------
            double[] on = new double[rounds];
            double[] off = new double[rounds];
            try (NativeReservation r = a.newReservation("root", "op", MIB)) {
                for (int w = 0; w < 3; w++) { // warm up both ways (JIT)
                    ExecutorArbiter.configure(w % 2 == 0, false, 64 * MIB);
                    pairs(r, pairsPerRound / 2);
                }
                for (int i = 0; i < rounds; i++) {
                    boolean onFirst = i % 2 == 0;
                    ExecutorArbiter.configure(onFirst, false, 64 * MIB);
                    double first = pairs(r, pairsPerRound);
                    ExecutorArbiter.configure(!onFirst, false, 64 * MIB);
                    double second = pairs(r, pairsPerRound);
                    on[i] = onFirst ? first : second;
                    off[i] = onFirst ? second : first;
                }
            }
            check(la.heldBytes() == a.reservedBytes(), "A: Spark holds what the manager reserved");
            double[] onSorted = on.clone();
            double[] offSorted = off.clone();
            Arrays.sort(onSorted);
            Arrays.sort(offSorted);
            double[] diffs = new double[rounds];
            for (int i = 0; i < rounds; i++) {
                diffs[i] = on[i] - off[i];
            }
            Arrays.sort(diffs);
            System.out.printf(Locale.ROOT, "BENCH fastpath_on_ns %.2f%n", onSorted[rounds / 2]);
            System.out.printf(Locale.ROOT, "BENCH fastpath_off_ns %.2f%n", offSorted[rounds / 2]);
            System.out.printf(Locale.ROOT, "BENCH fastpath_added_ns %.2f%n", diffs[rounds / 2]);
            System.out.println("BENCH_ROUNDS fastpath_added_ns " + Arrays.toString(diffs).replace(" ", ""));

            // ---- a short grant: served by B's idle cushion, or by A's own operator spilling ---------
            a.releaseUnused(Long.MAX_VALUE);
            b.close();
            long[] reclaimNs = new long[shortOps];
            long[] spillNs = new long[shortOps];
            ExecutorArbiter.configure(true, false, 64 * MIB);
            ExecutorArbiter.Status before = ExecutorArbiter.status();
            for (int i = 0; i < shortOps; i++) {
                reclaimNs[i] = shortGrow(tmmB, a, jvmA, 0);
            }
            ExecutorArbiter.Status after = ExecutorArbiter.status();
            check(after.reclaims() - before.reclaims() == shortOps,
                    "every short grow was served by a cross-task reclaim: " + (after.reclaims() - before.reclaims()));
            ExecutorArbiter.configure(false, false, 64 * MIB);
            long spillsBefore = jvmA.spills;
            for (int i = 0; i < shortOps; i++) {
                spillNs[i] = shortGrow(tmmB, a, jvmA, 8 * MIB);
            }
            check(jvmA.spills - spillsBefore == shortOps, "every short grow was served by A's operator spilling");
            System.out.printf(Locale.ROOT, "BENCH short_reclaim_ns %d%n", median(reclaimNs));
            System.out.printf(Locale.ROOT, "BENCH short_spill_ns %d%n", median(spillNs));
            System.out.printf(Locale.ROOT, "BENCH short_ops %d%n", shortOps);
        } finally {
            ExecutorArbiter.configure(false, false, 64 * MIB);
            a.close();
            if (!b.isClosed()) {
                b.close();
            }
            jvmA.freeMemory(jvmA.getUsed());
        }
        check(spark.executionMemoryUsed() == 0, "Spark's pool is empty at the end: " + spark.executionMemoryUsed());
        System.out.println("BENCH ok 1");
    }
}
