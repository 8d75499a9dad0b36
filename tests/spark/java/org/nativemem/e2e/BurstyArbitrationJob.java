package org.nativemem.e2e;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.Iterator;
import java.util.List;
import java.util.Locale;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicLong;

import org.apache.spark.TaskContext;
import org.apache.spark.api.java.JavaSparkContext;
import org.apache.spark.api.java.function.FlatMapFunction;
import org.apache.spark.sql.SparkSession;
import org.nativemem.ExecutorArbiter;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeOutOfMemoryException;
import org.nativemem.NativeReservation;
import org.nativemem.spark.SparkReservationListener;
import org.nativemem.spark.TaskNativeMemory;

/**
 * Executor-wide arbitration under bursty, out-of-phase native work (local[4], one executor JVM):
 * the same job with arbitration off, then on, compared.
 *
 * <p>Four tasks, each an aggregation-like native operator: it keeps a working set of
 * {@code --base} MiB between bursts and, in its own time slot ({@code --slot-ms}; task {@code i}
 * bursts in slots {@code i, i+4, ...}: out of phase), grows to {@code --burst} MiB in 1 MiB
 * batches, then shrinks back. A grow Spark refuses makes the operator spill: its burst so far goes
 * to "disk" (counted) and the burst goes on. The tasks start one slot apart, as tasks of a stage
 * do when the first ones start their native work while the others are still reading: the first
 * ones get more than 1/N of Spark's pool (N counts only tasks holding memory), and between
 * bursts a task's manager keeps up to two blocks reserved as idle cushion. Run with an off-heap
 * size that fits the working sets of one bursting task plus three quiet ones, but not every
 * task's peak plus its cushion: off, the late tasks are short while the first ones hold memory
 * they don't use; on, that idle memory goes back to Spark when a task is short, before it spills.
 * tests.txt runs it with a 64 MiB off-heap pool, 12 MiB blocks and bursts from 8 to 20 MiB: the
 * working sets (one task at 20 MiB, three at 8) fit, four peaks plus cushions (up to 24 MiB
 * reserved each) do not. The slots start when all four tasks run (a latch: local mode), so the
 * run is the same every time: off 5 native spills (the late tasks' bursts), on 0; no failure
 * either way (3.5 and 4.3, 6 runs each).
 *
 * <p>What arbitration cannot change: Spark caps a task at 1/N of the pool (a burst above it spills
 * either way) and makes a task under 1/2N <i>wait</i> inside Spark before it answers at all (no
 * short grant reaches nativemem then); it serves the band between.
 *
 * <p>Printed for each mode: native spills, Spark's short grants, task failures, the largest idle
 * memory held across the executor (sampled), cross-task reclaims and the job time. Checked: the
 * same results (each task's checksum of its batches) both ways, no failure on, fewer spills on
 * than off, at least one cross-task reclaim on, nothing left on the executor after each.
 */
public final class BurstyArbitrationJob {
    private static final long MIB = 1L << 20;
    static final int TASKS = 4;

    private BurstyArbitrationJob() {}

    /** Per task: {partition, checksum, batches, spills, spilled bytes, short grants, failed (0/1)}. */
    static List<long[]> run(JavaSparkContext jsc, int bursts, long baseMiB, long burstMiB, long slotMs) {
        final String run = "run-" + RUNS.incrementAndGet();
        FlatMapFunction<Iterator<Integer>, long[]> task = it -> {
            int p = TaskContext.get().partitionId();
            // Slot 0 starts when all four tasks run (one JVM: local mode), whenever Spark launched them.
            long start = startTime(run);
            long checksum = 0;
            long batches = 0;
            long spills = 0;
            long spilledBytes = 0;
            long failed = 0;
            NativeMemoryManager m = null;
            try {
                // The task reads its input until its first slot: no native memory yet.
                sleepUntil(start + p * slotMs);
                m = TaskNativeMemory.get();
                try (NativeReservation base = m.newReservation("agg", "agg-table", baseMiB * MIB);
                        NativeReservation burst = m.newReservation("agg", "agg-burst", 0)) {
                    for (int k = 0; k < bursts; k++) {
                        sleepUntil(start + (k * (long) TASKS + p) * slotMs);
                        for (long b = 0; b < burstMiB - baseMiB; b++) {
                            try {
                                burst.grow(MIB);
                            } catch (NativeOutOfMemoryException e) {
                                // Spill what this burst holds, then go on with the batch.
                                spills++;
                                spilledBytes += burst.size();
                                burst.shrink(burst.size());
                                burst.grow(MIB);
                            }
                            long v = (long) p * 1_000_003L + k * 1_009L + b;
                            checksum += v * v;
                            batches++;
                        }
                        burst.shrink(burst.size()); // the burst's result goes out; back to the base
                    }
                }
            } catch (NativeOutOfMemoryException e) {
                System.out.println("BurstyArbitrationJob: task " + p + " failed: " + e.getMessage().split("\n")[0]);
                failed = 1;
            }
            SparkReservationListener l = TaskNativeMemory.listener();
            long shortGrants = l == null ? 0 : l.shortGrants();
            return Arrays.asList(new long[] {p, checksum, batches, spills, spilledBytes, shortGrants, failed})
                    .iterator();
        };
        List<Integer> parts = new ArrayList<>();
        for (int i = 0; i < TASKS; i++) {
            parts.add(i);
        }
        return jsc.parallelize(parts, TASKS).mapPartitions(task).collect();
    }

    private static final AtomicLong RUNS = new AtomicLong();
    private static final ConcurrentHashMap<String, CountDownLatch> STARTED = new ConcurrentHashMap<>();
    private static final ConcurrentHashMap<String, Long> START = new ConcurrentHashMap<>();

    /** Waits for the run's four tasks, then returns their common slot-0 time (100 ms later). */
    private static long startTime(String run) throws InterruptedException {
        CountDownLatch all = STARTED.computeIfAbsent(run, k -> new CountDownLatch(TASKS));
        all.countDown();
        if (!all.await(120, TimeUnit.SECONDS)) {
            throw new IllegalStateException("the four tasks of " + run + " did not all start (local[4] needed)");
        }
        return START.computeIfAbsent(run, k -> System.currentTimeMillis() + 100);
    }

    private static void sleepUntil(long at) throws InterruptedException {
        long now = System.currentTimeMillis();
        if (at > now) {
            Thread.sleep(at - now);
        }
    }

    private static long sum(List<long[]> r, int field) {
        long s = 0;
        for (long[] x : r) {
            s += x[field];
        }
        return s;
    }

    private static long[] byPartition(List<long[]> r, int p) {
        for (long[] x : r) {
            if (x[0] == p) {
                return x;
            }
        }
        throw new IllegalStateException("no result of partition " + p);
    }

    /** One mode: the job, sampling the executor's idle bytes meanwhile (local mode: same JVM). */
    static long[] mode(JavaSparkContext jsc, E2e.Tracker tracker, boolean on, int bursts, long base, long burst,
            long slot, List<long[]> out) throws Exception {
        ExecutorArbiter.configure(on, false, 64 * MIB);
        ExecutorArbiter.Status before = ExecutorArbiter.status();
        AtomicBoolean done = new AtomicBoolean();
        AtomicLong maxIdle = new AtomicLong();
        Thread sampler = new Thread(() -> {
            while (!done.get()) {
                maxIdle.accumulateAndGet(ExecutorArbiter.status().idleBytes(), Math::max);
                try {
                    Thread.sleep(5);
                } catch (InterruptedException e) {
                    return;
                }
            }
        }, "idle-sampler");
        sampler.setDaemon(true);
        sampler.start();
        int mark = tracker.mark(jsc);
        long t0 = System.nanoTime();
        out.addAll(run(jsc, bursts, base, burst, slot));
        long ms = (System.nanoTime() - t0) / 1_000_000;
        done.set(true);
        sampler.join();
        tracker.awaitIdle(jsc, 60_000);
        long accumulated = 0;
        for (E2e.TaskEnd end : tracker.endedSince(mark)) {
            accumulated += end.nativememAccumulators.getOrDefault("nativemem.arbitratedBytes", 0L);
        }
        ExecutorArbiter.Status after = ExecutorArbiter.status();
        return new long[] {sum(out, 3), sum(out, 4), sum(out, 5), sum(out, 6), maxIdle.get(),
            after.reclaims() - before.reclaims(), after.reclaimedBytes() - before.reclaimedBytes(), ms,
            accumulated};
    }

    static String describe(String name, long[] s) {
        return String.format(Locale.ROOT, "%s: %d native spills (%d MiB), %d short grants, %d task failures,"
                + " idle across the executor up to %d MiB, %d cross-task reclaims (%d KiB; the tasks'"
                + " nativemem.arbitratedBytes: %d KiB), %d ms", name, s[0], s[1] / MIB, s[2], s[3], s[4] / MIB, s[5],
                s[6] >> 10, s[8] >> 10, s[7]);
    }

    public static void main(String[] args) throws Exception {
        int bursts = 6;
        long base = 8;
        long burst = 20;
        long slot = 150;
        for (int i = 0; i < args.length; i++) {
            switch (args[i]) {
                case "--bursts": bursts = Integer.parseInt(args[++i]); break;
                case "--base": base = Long.parseLong(args[++i]); break;
                case "--burst": burst = Long.parseLong(args[++i]); break;
                case "--slot-ms": slot = Long.parseLong(args[++i]); break;
                default: throw new IllegalArgumentException("unknown argument " + args[i]);
            }
        }
        SparkSession spark = SparkSession.builder().appName("nativemem-bursty-arbitration").getOrCreate();
        try {
            JavaSparkContext jsc = JavaSparkContext.fromSparkContext(spark.sparkContext());
            E2e.check(jsc.master().equals("local[4]"), "run on local[4]: " + jsc.master());
            E2e.Tracker tracker = E2e.Tracker.install(jsc);
            List<long[]> offResults = new ArrayList<>();
            long[] off = mode(jsc, tracker, false, bursts, base, burst, slot, offResults);
            E2e.assertNoLeak(jsc, 1, "after the run with arbitration off");
            List<long[]> onResults = new ArrayList<>();
            long[] on = mode(jsc, tracker, true, bursts, base, burst, slot, onResults);
            E2e.assertNoLeak(jsc, 1, "after the run with arbitration on");
            String prefix = String.format(Locale.ROOT, "BurstyArbitrationJob: Spark %s, 4 tasks x %d bursts %d->%d MiB, "
                    + "slots %d ms: ", spark.version(), bursts, base, burst, slot);
            System.out.println(prefix + describe("off", off));
            System.out.println(prefix + describe("on", on));
            for (int p = 0; p < TASKS; p++) {
                long[] a = byPartition(offResults, p);
                long[] b = byPartition(onResults, p);
                System.out.printf(Locale.ROOT, "BurstyArbitrationJob: task %d: off %d spills, %d short grants; on %d"
                        + " spills, %d short grants%n", p, a[3], a[5], b[3], b[5]);
                if (a[6] == 0) {
                    E2e.checkEq(a[1], b[1], "task " + p + ": the same checksum on and off");
                    E2e.checkEq(a[2], b[2], "task " + p + ": the same batches on and off");
                }
            }
            E2e.checkEq(0, on[3], "no task failed with arbitration on");
            E2e.check(on[5] >= 1, "with arbitration on, a short task took idle memory of another: " + on[5]);
            E2e.check(on[0] < off[0], "fewer native spills on (" + on[0] + ") than off (" + off[0] + ")");
            // The tasks' nativemem.arbitratedBytes accumulators (the stage page, the event log) add
            // up to what the executor's arbiter handed back.
            E2e.checkEq(0, off[8], "off: no task reports nativemem.arbitratedBytes");
            E2e.checkEq(on[6], on[8], "on: the tasks' nativemem.arbitratedBytes add up to the bytes reclaimed");
            System.out.println("PASS " + prefix + "arbitration on: " + on[0] + " spills, " + on[3]
                    + " failures; off: " + off[0] + " spills, " + off[3] + " failures");
        } finally {
            spark.stop();
        }
    }
}
