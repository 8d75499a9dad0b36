package org.nativemem.bench;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.List;
import java.util.Locale;

import org.apache.spark.TaskContext;
import org.apache.spark.api.java.JavaSparkContext;
import org.apache.spark.memory.MemoryMode;
import org.apache.spark.memory.TaskMemoryManager;
import org.apache.spark.sql.SparkSession;
import org.nativemem.NativeBench;
import org.nativemem.NativeMemoryConfig;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeMemoryStats;
import org.nativemem.NativeReservation;
import org.nativemem.spark.SparkReservationListener;

/**
 * The JNI benchmark of {@code scripts/bench.sh}: what nativemem saves on the JVM boundary, measured
 * against the per-grow design in the same JVM, the same Spark task and the same run.
 *
 * <pre>
 *   scripts/spark-submit.sh 3.5 --master local[1] \
 *       --conf spark.memory.offHeap.enabled=true --conf spark.memory.offHeap.size=2g \
 *       --class org.nativemem.bench.JniBench build/libs/nativemem-e2e.jar [--quick]
 * </pre>
 *
 * <p>Everything runs inside one Spark task, so {@code TaskContext.get().taskMemoryManager()} is the
 * real {@code TaskMemoryManager} and both designs ask it through the same listener class,
 * {@link SparkReservationListener} ({@code acquireExecutionMemory} under its monitor):
 * <ul>
 *   <li><b>grows</b>: a round grows 1 GiB in 64 KiB steps, three ways. nativemem from native code
 *       ({@code NativeBench.growLoop}, a loop inside the library): a core reservation of one manager
 *       with the default configuration (8 MiB blocks, the 1 MiB reservation quantum: the fast path,
 *       15 of 16 grows fit in the reservation's slack), as a native operator does; the manager lives
 *       across rounds (a task's steady state: hysteresis keeps one block between rounds).
 *       nativemem from Java (the API a user calls): a Java loop of
 *       {@link NativeReservation#grow} on one reservation of the same manager, then one
 *       {@link NativeReservation#shrink} of the total; with the default quantum most grows are
 *       one CAS on the reservation's Java-side slack, and about one in a hundred a JNI downcall
 *       (export guard, handle table) charging the next quantum (1 MiB, growing with the
 *       reservation to 8 MiB). Per-grow
 *       ({@code NativeBench.upcallPerGrowLoop}): one upcall to {@code reserve(64 KiB)} per grow,
 *       as Comet does, then one {@code unreserve} of the total. Every loop ends by freeing the
 *       GiB. ns/grow is the round's wall time / 16,384; the figure is the median of the measured
 *       rounds, which rotate which design goes first. Upcalls are counted: the manager's own
 *       counters (reserve + unreserve calls), cross-checked against the listener's count.</li>
 *   <li><b>create+close</b>: a new {@code SparkReservationListener}, {@code NativeMemoryManager.create}
 *       with it, {@code attach}, {@code close} (what a task pays once); baseline: one empty JNI
 *       downcall ({@code NativeBench.noop}).</li>
 * </ul>
 * Results go to stdout as {@code BENCH <key> <value>} lines (and {@code BENCH_ROUNDS <key> <values>}),
 * which {@code scripts/bench.sh} reads. The job fails (non-zero exit) if a result is inconsistent
 * (wrong byte counts, bytes still held from Spark at the end).
 */
public final class JniBench {
    private static final long KiB = 1L << 10;
    private static final long MiB = 1L << 20;
    private static final long GiB = 1L << 30;
    /** Bytes per native grow. */
    static final long GROW_BYTES = 64 * KiB;
    /** Grows per round: one GiB. */
    static final int GROWS_PER_ROUND = (int) (GiB / GROW_BYTES);
    static final String POOL = "bench/operator";
    /** Pool of the reservation grown from Java. */
    static final String JAVA_POOL = "bench/java";

    private JniBench() {
    }

    public static void main(String[] args) {
        final boolean quick = Arrays.asList(args).contains("--quick");
        // --tasks N: N tasks run the grow measurement at once (use local[N]), contending for
        // Spark's memory manager; each prints its own BENCH lines.
        int tasks = 1;
        for (int i = 0; i + 1 < args.length; i++) {
            if (args[i].equals("--tasks")) {
                tasks = Integer.parseInt(args[i + 1]);
            }
        }
        SparkSession spark = SparkSession.builder().appName("nativemem-jni-bench").getOrCreate();
        try {
            JavaSparkContext jsc = JavaSparkContext.fromSparkContext(spark.sparkContext());
            List<List<String>> perTask;
            if (tasks == 1) {
                perTask = jsc.parallelize(Collections.singletonList(quick), 1).map(JniBench::inTask).collect();
            } else {
                perTask = jsc.parallelize(Collections.nCopies(tasks, quick), tasks).map(JniBench::growsInTask)
                        .collect();
            }
            System.out.println("BENCH spark_version " + spark.version());
            System.out.println("BENCH master " + spark.sparkContext().master());
            System.out.println("BENCH tasks " + tasks);
            for (List<String> lines : perTask) {
                for (String line : lines) {
                    System.out.println(line);
                }
            }
        } finally {
            spark.stop();
        }
    }

    /** Only the grow measurement, in the current task (for several concurrent tasks). */
    static List<String> growsInTask(boolean quick) {
        TaskMemoryManager tmm = taskMemoryManager();
        Results out = new Results();
        grows(tmm, tmm.getTungstenMemoryMode(), quick ? 1 : 10, quick ? 3 : 21, out);
        return out.lines;
    }

    /** Runs every measurement in the current Spark task; returns the result lines. */
    static List<String> inTask(boolean quick) {
        TaskMemoryManager tmm = taskMemoryManager();
        MemoryMode mode = tmm.getTungstenMemoryMode();
        int warmup = quick ? 1 : 10;
        int rounds = quick ? 3 : 21;
        Results out = new Results();
        out.add("mode", mode.toString());
        out.add("jvm", System.getProperty("java.vm.name") + " " + System.getProperty("java.version"));
        out.add("warmup_rounds", warmup);
        out.add("rounds", rounds);
        grows(tmm, mode, warmup, rounds, out);
        createClose(tmm, mode, warmup, rounds, quick ? 200 : 2000, out);
        return out.lines;
    }

    /** The current task's memory manager, OFF_HEAP. */
    static TaskMemoryManager taskMemoryManager() {
        TaskContext ctx = TaskContext.get();
        if (ctx == null) {
            throw new IllegalStateException("JniBench must run inside a Spark task");
        }
        TaskMemoryManager tmm = ctx.taskMemoryManager();
        if (tmm.getTungstenMemoryMode() != MemoryMode.OFF_HEAP) {
            // Each design holds 1 GiB at the end of a round: more than a default driver heap's
            // execution memory. OFF_HEAP is also the mode nativemem recommends for native memory.
            throw new IllegalStateException("JniBench needs spark.memory.offHeap.enabled=true and"
                    + " spark.memory.offHeap.size=2g per task (each round grows 1 GiB of execution memory)");
        }
        return tmm;
    }

    private static void grows(TaskMemoryManager tmm, MemoryMode mode, int warmup, int rounds, Results out) {
        final int n = GROWS_PER_ROUND;
        SparkReservationListener nmListener = new SparkReservationListener(tmm, mode, "jni-bench nativemem");
        SparkReservationListener perGrowListener = new SparkReservationListener(tmm, mode, "jni-bench per-grow");
        double[] nmNs = new double[rounds];
        double[] javaNs = new double[rounds];
        double[] perGrowNs = new double[rounds];
        long[] javaReserves = new long[rounds];
        long[] nmUpcalls = new long[rounds];
        long[] nmReserves = new long[rounds];
        long[] perGrowUpcalls = new long[rounds];
        long coldUpcalls = -1;
        long coldReserves = -1;
        // The default configuration: what a user who sets nothing gets.
        NativeMemoryConfig config = NativeMemoryConfig.defaults();
        out.add("quantum_bytes", config.reservationQuantum());
        out.add("block_bytes", config.reservationBlockSize());
        try (NativeMemoryManager mm = NativeMemoryManager.create("jni-bench", nmListener, config);
                NativeReservation javaRes = mm.newReservation(JAVA_POOL, "java-bench", 0)) {
            nmListener.attach(mm);
            long handle = mm.handle();
            for (int r = -warmup; r < rounds; r++) {
                for (int k = 0; k < 3; k++) {
                    int design = Math.floorMod(r + k, 3);
                    if (design == 2) {
                        NativeMemoryStats before = mm.stats();
                        long t0 = System.nanoTime();
                        for (int i = 0; i < n; i++) {
                            javaRes.grow(GROW_BYTES);
                        }
                        long held = javaRes.size();
                        javaRes.shrink(held);
                        long dt = System.nanoTime() - t0;
                        checkEq(n * GROW_BYTES, held, "bytes held by the Java loop");
                        checkEq(0, javaRes.size(), "Java reservation after its shrink");
                        if (r >= 0) {
                            javaNs[r] = (double) dt / n;
                            javaReserves[r] = mm.stats().reserveCalls() - before.reserveCalls();
                        }
                    } else if (design == 0) {
                        NativeMemoryStats before = mm.stats();
                        long listenerBefore = nmListener.reserveRequests();
                        long t0 = System.nanoTime();
                        long held = NativeBench.growLoop(handle, POOL, GROW_BYTES, n);
                        long dt = System.nanoTime() - t0;
                        NativeMemoryStats after = mm.stats();
                        checkEq(n * GROW_BYTES, held, "bytes held by the nativemem loop");
                        long reserves = after.reserveCalls() - before.reserveCalls();
                        long upcalls = reserves + after.unreserveCalls() - before.unreserveCalls();
                        checkEq(reserves, nmListener.reserveRequests() - listenerBefore,
                                "reserve upcalls counted by the manager vs the listener");
                        if (r == -warmup) {
                            coldUpcalls = upcalls; // first GiB of a fresh manager
                            coldReserves = reserves;
                        }
                        if (r >= 0) {
                            nmNs[r] = (double) dt / n;
                            nmUpcalls[r] = upcalls;
                            nmReserves[r] = reserves;
                        }
                    } else {
                        long listenerBefore = perGrowListener.reserveRequests();
                        long t0 = System.nanoTime();
                        long granted = NativeBench.upcallPerGrowLoop(perGrowListener, GROW_BYTES, n);
                        long dt = System.nanoTime() - t0;
                        checkEq(n * GROW_BYTES, granted, "bytes granted to the per-grow loop");
                        long reserves = perGrowListener.reserveRequests() - listenerBefore;
                        checkEq(n, reserves, "reserve upcalls of the per-grow loop");
                        if (r >= 0) {
                            perGrowNs[r] = (double) dt / n;
                            perGrowUpcalls[r] = reserves + 1; // + the one unreserve of the total
                        }
                    }
                }
            }
            // The Java reservation keeps its quantum's slack while open (it holds 0 bytes).
            javaRes.close();
            checkEq(0, mm.usedBytes(), "nativemem bytes used after the rounds");
        }
        checkEq(0, nmListener.heldBytes(), "bytes nativemem still holds from Spark after close");
        checkEq(0, perGrowListener.heldBytes(), "bytes the per-grow loop still holds from Spark");

        out.add("grow_bytes", GROW_BYTES);
        out.add("grows_per_round", n);
        out.add("grow_nativemem_ns", median(nmNs));
        out.add("grow_java_ns", median(javaNs));
        out.add("reserve_upcalls_per_gib_java", max(javaReserves));
        out.add("grow_pergrow_ns", median(perGrowNs));
        out.add("upcalls_per_gib_nativemem", max(nmUpcalls));
        out.add("reserve_upcalls_per_gib_nativemem", max(nmReserves));
        out.add("upcalls_per_gib_nativemem_cold", coldUpcalls);
        out.add("reserve_upcalls_per_gib_nativemem_cold", coldReserves);
        out.add("upcalls_per_gib_pergrow", max(perGrowUpcalls));
        out.rounds("grow_nativemem_ns", nmNs);
        out.rounds("grow_java_ns", javaNs);
        out.rounds("grow_pergrow_ns", perGrowNs);
    }

    private static void createClose(TaskMemoryManager tmm, MemoryMode mode, int warmup, int rounds, int perRound,
            Results out) {
        double[] createClose = new double[rounds];
        double[] noop = new double[rounds];
        int noopPerRound = perRound * 500;
        long sink = 0;
        for (int r = -warmup; r < rounds; r++) {
            long t0 = System.nanoTime();
            for (int i = 0; i < perRound; i++) {
                SparkReservationListener listener = new SparkReservationListener(tmm, mode, "jni-bench create");
                NativeMemoryManager m = NativeMemoryManager.create("jni-bench create", listener);
                listener.attach(m);
                m.close();
                sink += m.closeReport().text().length();
            }
            long dt = System.nanoTime() - t0;
            long t1 = System.nanoTime();
            for (int i = 0; i < noopPerRound; i++) {
                sink += NativeBench.noop(i);
            }
            long dt1 = System.nanoTime() - t1;
            if (r >= 0) {
                createClose[r] = (double) dt / perRound;
                noop[r] = (double) dt1 / noopPerRound;
            }
        }
        out.add("create_close_ns", median(createClose));
        out.add("noop_downcall_ns", median(noop));
        out.add("create_close_per_round", perRound);
        out.add("sink", sink & 1); // keeps the loops' results alive
        out.rounds("create_close_ns", createClose);
        out.rounds("noop_downcall_ns", noop);
    }

    static double median(double[] values) {
        double[] v = values.clone();
        Arrays.sort(v);
        int m = v.length / 2;
        return v.length % 2 == 1 ? v[m] : (v[m - 1] + v[m]) / 2;
    }

    static long max(long[] values) {
        long m = Long.MIN_VALUE;
        for (long v : values) {
            m = Math.max(m, v);
        }
        return m;
    }

    static void checkEq(long expected, long actual, String what) {
        if (expected != actual) {
            throw new AssertionError("JniBench: " + what + ": expected " + expected + ", got " + actual);
        }
    }

    /** Result lines in the format bench.sh reads. */
    static final class Results {
        final List<String> lines = new ArrayList<>();

        void add(String key, Object value) {
            String text = value instanceof Double ? String.format(Locale.ROOT, "%.2f", (Double) value)
                    : String.valueOf(value);
            lines.add("BENCH " + key + " " + text);
        }

        void rounds(String key, double[] values) {
            StringBuilder sb = new StringBuilder("BENCH_ROUNDS ").append(key).append(' ');
            for (int i = 0; i < values.length; i++) {
                sb.append(i == 0 ? "" : ",").append(String.format(Locale.ROOT, "%.1f", values[i]));
            }
            lines.add(sb.toString());
        }
    }
}
