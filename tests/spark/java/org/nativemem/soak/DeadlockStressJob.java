package org.nativemem.soak;

import static org.nativemem.soak.Soak.MiB;
import static org.nativemem.soak.Soak.check;
import static org.nativemem.soak.Soak.checkEq;

import java.util.List;
import java.util.Random;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.AtomicReference;

import org.apache.spark.TaskContext;
import org.apache.spark.api.java.JavaSparkContext;
import org.apache.spark.memory.TaskMemoryManager;
import org.apache.spark.sql.SparkSession;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeTesting;
import org.nativemem.spark.SparkReservationListener;
import org.nativemem.spark.TaskNativeMemory;

/**
 * The deadlock the lock rule exists for, provoked in real Spark. In each of two
 * concurrent tasks, for {@link #SECONDS} s:
 * <ul>
 *   <li>4 native threads grow, shrink, allocate and spill on the task's manager (each thread's
 *       reservation is also a native spiller); their upcalls take the {@code TaskMemoryManager}'s
 *       monitor, and Spark may spill this task's consumers from inside them;
 *   <li>a "Spark" thread calls the nativemem consumer's {@code spill} while holding that monitor,
 *       as Spark does when another consumer of the task needs memory;
 *   <li>a JVM operator (a second {@code MemoryConsumer} of the task) acquires and frees execution
 *       memory, so Spark itself calls the nativemem consumer's {@code spill} under its monitor, and
 *       native grows make Spark spill the JVM operator.
 * </ul>
 * A watchdog on the task thread fails the run, printing every thread's stack and locks, if any
 * of them makes no progress for {@link #STALL_SECONDS} s (it halts the JVM: see
 * {@link Soak#watch}). Afterwards Spark holds exactly what the manager reserved, and nothing is
 * left on the executor. Run on {@code local[2]} with {@code spark.nativemem.reservationBlockSize=1m}
 * (many upcalls) and the plugin enabled.
 *
 * <p>With an argument N, N tasks run at once (run on {@code local[N]}): with four, the tasks
 * compete for Spark's execution pool, so short grants make them arbitrate (executor-wide
 * arbitration: each task's grow has the others hand idle memory back, calling their listeners
 * and so their {@code TaskMemoryManager} monitors from its own thread) while every one of them
 * runs the stress above.
 */
public final class DeadlockStressJob {
    static final int SECONDS = 6;
    static final int STALL_SECONDS = 10;
    /** Concurrent tasks unless the first argument says otherwise. */
    static final int TASKS = 2;
    static final int NATIVE_THREADS = 4;

    private DeadlockStressJob() {
    }

    public static void main(String[] args) throws Exception {
        long start = System.nanoTime();
        final int tasks = args.length > 0 ? Integer.parseInt(args[0]) : TASKS;
        SparkSession spark = SparkSession.builder().appName("nativemem-deadlock-stress").getOrCreate();
        Soak.quietSpillLogs();
        try {
            JavaSparkContext jsc = JavaSparkContext.fromSparkContext(spark.sparkContext());
            Soak.Tracker tracker = Soak.Tracker.install(jsc);
            List<long[]> results = jsc.parallelize(Soak.seeds(tasks), tasks).map(DeadlockStressJob::stressTask)
                    .collect();
            tracker.awaitIdle(jsc, 60_000);
            checkEq(tasks, tracker.count("Success"), "stress tasks succeeded: " + tracker.failures);
            long[] sum = new long[results.get(0).length];
            for (long[] r : results) {
                for (int i = 0; i < r.length; i++) {
                    sum[i] += r[i];
                }
            }
            List<Soak.ExecutorReport> reports = Soak.executorReports(jsc, Soak.executorCount(jsc.master()));
            for (Soak.ExecutorReport r : reports) {
                r.assertNothingLeft("after the deadlock stress");
            }
            System.out.printf("PASS DeadlockStressJob: Spark %s, %s: %d tasks x %d s, each with %d native threads:"
                    + " %d native steps (%d native OOM), %d spills from a thread holding the TaskMemoryManager"
                    + " monitor, %d JVM operator acquires (Spark spilled the JVM operator %d times), %d Spark spill"
                    + " requests reached nativemem, %d native spills; no stall >= %d s; nothing left (%.1f s)%n",
                    spark.version(), jsc.master(), tasks, SECONDS, NATIVE_THREADS, sum[0], sum[1], sum[2], sum[3],
                    sum[4], sum[5], sum[6], STALL_SECONDS, (System.nanoTime() - start) / 1e9);
            if (jsc.master().startsWith("local[")) { // the executor is this JVM
                System.out.println("DeadlockStressJob: arbitration: " + org.nativemem.ExecutorArbiter.status());
            }
        } finally {
            spark.stop();
        }
    }

    /**
     * Runs in a task; returns {native steps, native OOMs, spills under the monitor, JVM acquires,
     * JVM operator spills, Spark spill requests to nativemem, native spills}.
     */
    static long[] stressTask(int partition) throws Exception {
        Soak.quietSpillLogs(); // also on executors of another JVM
        final TaskContext ctx = TaskContext.get();
        final TaskMemoryManager tmm = ctx.taskMemoryManager();
        final NativeMemoryManager mm = TaskNativeMemory.get();
        final SparkReservationListener l = TaskNativeMemory.listener();
        final Soak.JvmOperator jvm = new Soak.JvmOperator(tmm, l.getMode());
        final long deadline = System.nanoTime() + SECONDS * 1_000_000_000L;
        final AtomicReference<Throwable> failure = new AtomicReference<>();

        NativeTesting.registerSpiller(mm.handle(), "stress/sort", 16 * MiB, 0);
        final long churn = NativeTesting.startNativeChurn(mm.handle(), "stress/native", NATIVE_THREADS,
                SECONDS * 1000L, 16 * MiB, true, 31L * partition + 7);

        final AtomicLong monitorSpills = new AtomicLong();
        Thread sparkSpiller = worker("stress-spark-spill-" + partition, failure, () -> {
            Random random = new Random(partition);
            while (System.nanoTime() < deadline) {
                synchronized (tmm) { // as TaskMemoryManager.acquireExecutionMemory holds it
                    l.spill(1 + random.nextInt(8 << 20), jvm);
                }
                monitorSpills.incrementAndGet();
            }
        });
        final AtomicLong acquires = new AtomicLong();
        Thread operator = worker("stress-jvm-operator-" + partition, failure, () -> {
            Random random = new Random(100 + partition);
            while (System.nanoTime() < deadline) {
                jvm.acquire(1 + random.nextInt(64 << 20));
                jvm.release(random.nextInt(64 << 20));
                acquires.incrementAndGet();
            }
            jvm.releaseAll();
        });

        Soak.watch(STALL_SECONDS, new Soak.Probe("native threads of task " + ctx.taskAttemptId()) {
            long progress() {
                return NativeTesting.churnOps(churn);
            }

            boolean finished() {
                return NativeTesting.churnRunning(churn) == 0;
            }
        }, threadProbe(sparkSpiller, monitorSpills), threadProbe(operator, acquires));
        if (failure.get() != null) {
            throw new AssertionError("a stress thread failed", failure.get());
        }
        long[] c = NativeTesting.joinNativeChurn(churn, 30_000);
        check(c[0] > 1000 && monitorSpills.get() > 100 && acquires.get() > 100,
                "every worker made progress: native " + c[0] + ", spills " + monitorSpills + ", acquires " + acquires);
        checkEq(0, c[2], "no native thread stopped by a close");
        checkEq(mm.reservedBytes(), l.heldBytes(), "Spark holds exactly what the manager reserved");
        check(mm.usedBytes() <= 16 * MiB, "only the sort spiller's bytes are left: " + mm.usedBytes());
        return new long[] {c[0], c[1], monitorSpills.get(), acquires.get(), jvm.spills, l.spillRequests(),
            mm.stats().spillCount()};
    }

    private static Soak.Probe threadProbe(final Thread thread, final AtomicLong counter) {
        return new Soak.Probe(thread.getName()) {
            long progress() {
                return counter.get();
            }

            boolean finished() {
                return !thread.isAlive();
            }
        };
    }

    interface Body {
        void run() throws Exception;
    }

    private static Thread worker(String name, AtomicReference<Throwable> failure, Body body) {
        Thread t = new Thread(() -> {
            try {
                body.run();
            } catch (Throwable e) {
                failure.compareAndSet(null, e);
            }
        }, name);
        t.setDaemon(true);
        t.start();
        return t;
    }
}
