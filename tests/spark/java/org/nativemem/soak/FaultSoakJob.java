package org.nativemem.soak;

import static org.nativemem.soak.Soak.MiB;
import static org.nativemem.soak.Soak.check;
import static org.nativemem.soak.Soak.checkEq;

import java.io.File;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Random;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicReference;

import org.apache.spark.TaskContext;
import org.apache.spark.api.java.JavaSparkContext;
import org.apache.spark.sql.SparkSession;
import org.nativemem.NativeMemoryException;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeReservation;
import org.nativemem.NativeTesting;
import org.nativemem.spark.NativeMemorySparkConf;
import org.nativemem.spark.SparkReservationListener;
import org.nativemem.spark.TaskNativeMemory;

/**
 * Fault soak: more than a thousand tiny tasks in one application, a seeded share of
 * them failing while they hold native memory, and afterwards not one byte left anywhere.
 *
 * <p>Every task takes a reservation, a native allocation whose every page is written (so it is
 * resident memory), a native spiller, and sometimes two native threads churning memory in the
 * background. Then, chosen by a seeded draw per (job, partition) on its first attempt:
 * <ul>
 *   <li>{@code THROW}: throws mid-task, threads still running;
 *   <li>{@code KILL}: waits until the driver kills it ({@code SparkContext.killTaskAttempt});
 *   <li>{@code NATIVE_OOM}: asks for more than {@code spark.nativemem.taskLimit} and lets the
 *       native out-of-memory error fail the task;
 *   <li>{@code SPILL_PANIC}: registers a native spiller that panics, then a JVM operator of the task
 *       asks Spark for more memory than there is, so Spark spills the nativemem consumer holding
 *       its monitor and the spiller panics: the panic must arrive as Spark's out-of-memory error
 *       of the JVM operator, carrying the panic text, with the accounting exact; the error fails
 *       the task;
 *   <li>otherwise it releases everything and succeeds.
 * </ul>
 * Faulty tasks succeed on their retry ({@code local[2,2]}: 2 attempts per task). Then
 * {@link #CANCEL_ROUNDS} jobs are cancelled ({@code cancelJobGroup}) while both their tasks hold
 * native memory and run native threads.
 *
 * <p>Checked at the end: every task ended as planned (the exact number of failures and kills,
 * each with the injected reason; no Spark memory leak report, with
 * {@code spark.unsafe.exceptionOnMemoryLeak=true}); the executor has no live manager and no
 * native byte used, reserved, held from Spark or unreturned; and the process RSS, read from
 * /proc/self/status after two GCs and {@code malloc_trim}, is back within
 * {@link #RSS_TOLERANCE_BYTES} (plus what the JVM itself committed and the stacks of threads Spark
 * started meanwhile) of where it was after a warm-up. First of all, the native library's own
 * count (its counting allocator, in the test library): every executor's live blocks and bytes are
 * back to their post-warm-up baseline exactly, after a bounded wait for native threads that are
 * still returning; the job prints the bytes left per task attempt (0). Run on {@code local[2,2]}
 * with the plugin and {@code spark.nativemem.taskLimit=64m}.
 */
public final class FaultSoakJob {
    static final long SEED = 20_261_123L;
    static final int JOBS = 10;
    static final int TASKS_PER_JOB = 100;
    static final int WARMUP_TASKS = 40;
    static final int CANCEL_ROUNDS = 10;
    static final int WARMUP_CANCEL_ROUNDS = 3;
    /**
     * RSS may end this much above its post-warm-up value (allocator and JIT noise), plus what the
     * JVM committed meanwhile (heap, metaspace, code cache) and {@link #RSS_PER_NEW_THREAD_BYTES}
     * per JVM thread started meanwhile (Spark's block-manager pools grow with the number of jobs;
     * measured 0.25 to 0.45 MiB of RSS each). A leak of the soak's native allocations would be
     * about 1 GiB (3.4 GiB are written; a quarter of the tasks fail holding theirs).
     */
    static final long RSS_TOLERANCE_BYTES = 64 * MiB;
    static final long RSS_PER_NEW_THREAD_BYTES = MiB;
    static final String PANIC_TEXT = "soak: native spiller bug";
    static final String INJECTED = "soak: injected";
    static final String CANCEL_GROUP = "soak-cancel-";
    /** Threads parked at once in the warm-up: above the soak's peak of threads in the library. */
    static final int PARKED_THREADS_WARMUP = 64;

    enum Fault {
        NONE, THROW, KILL, NATIVE_OOM, SPILL_PANIC
    }

    private FaultSoakJob() {
    }

    /** The fault of (job, partition) on its first attempt; retries never fault. */
    static Fault fault(int job, int partition, int attempt) {
        if (attempt > 0 || job < 0) {
            return Fault.NONE;
        }
        int x = new Random(SEED + 1_000_003L * job + partition).nextInt(100);
        if (x < 20) {
            return Fault.THROW;
        } else if (x < 30) {
            return Fault.KILL;
        } else if (x < 33) {
            return Fault.NATIVE_OOM;
        } else if (x < 36) {
            return Fault.SPILL_PANIC;
        }
        return Fault.NONE;
    }

    /** What one attempt holds: sizes in bytes, native threads or not. */
    static final class Plan {
        final long reservation;
        final long touched;
        final long spiller;
        final boolean threads;
        final long threadMillis;
        final long threadSeed;

        Plan(int job, int partition, int attempt) {
            Random r = new Random(SEED ^ (31L * job + 7919L * partition + 104_729L * attempt));
            reservation = (2 + r.nextInt(15)) * MiB;
            touched = (1 + r.nextInt(4)) * MiB;
            spiller = (1 + r.nextInt(8)) * MiB;
            // Not with a panicking spiller: a native thread's own spill could meet it first.
            threads = r.nextInt(100) < 15 && fault(job, partition, attempt) != Fault.SPILL_PANIC;
            threadMillis = 50 + r.nextInt(100);
            threadSeed = r.nextLong();
        }
    }

    public static void main(String[] args) throws Exception {
        long start = System.nanoTime();
        SparkSession spark = SparkSession.builder().appName("nativemem-fault-soak").getOrCreate();
        Soak.quietExpectedFailures();
        File markers = Files.createTempDirectory("nativemem-soak").toFile();
        try {
            JavaSparkContext jsc = JavaSparkContext.fromSparkContext(spark.sparkContext());
            int executors = Soak.executorCount(jsc.master());
            NativeMemorySparkConf settings = NativeMemorySparkConf.fromSparkConf(jsc.getConf());
            check(settings.taskLimitBytes().isPresent(), "spark.nativemem.taskLimit is set");
            final long taskLimit = settings.taskLimitBytes().getAsLong();
            final String dir = markers.getAbsolutePath();
            Soak.Tracker tracker = Soak.Tracker.install(jsc);

            // Warm-up (JIT, allocator arenas, Spark's and the JVM's thread pools, the native
            // library's lazily built state), then the baseline.
            jsc.parallelize(Soak.seeds(WARMUP_TASKS), WARMUP_TASKS).foreach(p -> {
                if (p == 0) {
                    // The lock library's table of parked threads grows with the most threads ever
                    // parked at once (task threads, native churn threads), and keeps its size:
                    // size it above the soak's peak now, so it is in the heap's baseline.
                    NativeTesting.parkNativeThreads(PARKED_THREADS_WARMUP);
                }
                task(-1, p, taskLimit, dir);
            });
            cancelRounds(jsc, markers, "warmup-", WARMUP_CANCEL_ROUNDS);
            tracker.awaitIdle(jsc, 60_000);
            int failedBefore = tracker.count("ExceptionFailure");
            int killedBefore = tracker.count("TaskKilled");
            List<Soak.ExecutorReport> before = Soak.executorReports(jsc, executors);
            HashMap<String, long[]> heapBaselines = new HashMap<>();
            for (Soak.ExecutorReport b : before) {
                heapBaselines.put(b.executorId, b.heapBaseline());
            }

            Killer killer = new Killer(jsc, markers);
            killer.start();
            for (int j = 0; j < JOBS; j++) {
                final int job = j;
                jsc.parallelize(Soak.seeds(TASKS_PER_JOB), TASKS_PER_JOB)
                        .foreach(p -> task(job, p, taskLimit, dir));
            }
            killer.stop();
            int cancelled = cancelRounds(jsc, markers, "", CANCEL_ROUNDS);
            tracker.awaitIdle(jsc, 60_000);
            List<Soak.ExecutorReport> after = Soak.executorReports(jsc, executors, heapBaselines);

            // ---- what Spark saw --------------------------------------------------------------------
            int[] planned = new int[Fault.values().length];
            long touchedBytes = 0;
            for (int j = 0; j < JOBS; j++) {
                for (int p = 0; p < TASKS_PER_JOB; p++) {
                    Fault f = fault(j, p, 0);
                    planned[f.ordinal()]++;
                    touchedBytes += new Plan(j, p, 0).touched;
                    if (f != Fault.NONE) { // and its retry
                        touchedBytes += new Plan(j, p, 1).touched;
                    }
                }
            }
            int throwing = planned[Fault.THROW.ordinal()];
            int killed = planned[Fault.KILL.ordinal()];
            int ooms = planned[Fault.NATIVE_OOM.ordinal()];
            int panics = planned[Fault.SPILL_PANIC.ordinal()];
            checkEq(killed, killer.kills.get(), "tasks the driver killed");
            for (String f : tracker.failures) {
                check(f.contains(INJECTED) || f.contains("NativeOutOfMemoryException") || f.contains(PANIC_TEXT)
                        || f.startsWith("TaskKilled: ") && f.contains(CANCEL_GROUP), "only injected faults: " + f);
                check(!f.toLowerCase().contains("leak"), "Spark reported no memory leak: " + f);
            }
            checkEq(throwing + ooms + panics, tracker.count("ExceptionFailure") - failedBefore, "failed attempts");
            checkEq(killed + cancelled, tracker.count("TaskKilled") - killedBefore, "killed attempts");
            int soakAttempts = JOBS * TASKS_PER_JOB + throwing + killed + ooms + panics + cancelled;
            int faults = throwing + killed + ooms + panics + cancelled;

            // ---- what the executors hold --------------------------------------------------------
            long leaked = 0;
            long oomFailures = 0;
            long heapBefore = 0;
            long heapAfter = 0;
            long blocksBefore = 0;
            long blocksAfter = 0;
            int threadsBefore = 0;
            int threadsAfter = 0;
            StringBuilder rss = new StringBuilder();
            boolean rssBack = true;
            for (Soak.ExecutorReport a : after) {
                a.assertNothingLeft("after the soak");
                leaked += a.leakedBytes();
                Soak.ExecutorReport b = null;
                for (Soak.ExecutorReport r : before) {
                    if (r.executorId.equals(a.executorId)) {
                        b = r;
                    }
                }
                check(b != null, "a baseline of executor " + a.executorId);
                heapBefore += b.liveNativeBytes;
                heapAfter += a.liveNativeBytes;
                blocksBefore += b.liveNativeBlocks;
                blocksAfter += a.liveNativeBlocks;
                threadsBefore += b.threads;
                threadsAfter += a.threads;
                long jvmAllowance = Math.max(0, a.jvmCommittedBytes - b.jvmCommittedBytes)
                        + Math.max(0, a.threads - b.threads) * RSS_PER_NEW_THREAD_BYTES;
                long allowed = b.rssBytes + RSS_TOLERANCE_BYTES + jvmAllowance;
                rss.append(String.format("executor %s RSS %.1f MiB -> %.1f MiB (%+.1f MiB; peak %.1f MiB; JVM"
                        + " committed %+.1f MiB; JVM threads %d -> %d; allowed up to %.1f MiB)", a.executorId,
                        b.rssBytes / (double) MiB, a.rssBytes / (double) MiB, (a.rssBytes - b.rssBytes) / (double) MiB,
                        a.peakRssBytes / (double) MiB, (a.jvmCommittedBytes - b.jvmCommittedBytes) / (double) MiB,
                        b.threads, a.threads, allowed / (double) MiB));
                rssBack &= a.rssBytes <= allowed;
                oomFailures += a.oomFailures - b.oomFailures;
            }
            List<String> unplanned = new ArrayList<>();
            for (String f : tracker.failures) {
                if (f.contains("NativeOutOfMemoryException") && !f.contains("soak/too-big")) {
                    unplanned.add(f);
                }
            }
            checkEq(ooms, oomFailures, "native OOM task failures counted by the plugin; unplanned: " + unplanned);
            System.out.println("soak: before: " + before);
            System.out.println("soak: after:  " + after);
            // ---- the native library's own count: every block it allocated is freed ------------------
            // Thread-local state of the library lives as long as its thread: a Spark task thread
            // started during the soak and still alive would show here (JVM threads are printed).
            String heap = String.format("native live bytes: baseline %d, after %d: %s B per task attempt over %d"
                    + " attempts (live blocks %d -> %d; JVM threads %d -> %d)", heapBefore, heapAfter,
                    formatPerAttempt(heapAfter - heapBefore, soakAttempts), soakAttempts, blocksBefore, blocksAfter,
                    threadsBefore, threadsAfter);
            System.out.println("soak: " + heap);
            checkEq(blocksBefore, blocksAfter, "the native library's live blocks back at their baseline ("
                    + heap + ")");
            checkEq(heapBefore, heapAfter, "the native library's live bytes back at their baseline (" + heap + ")");
            // The second line, behind the exact count: memory the library does not allocate itself
            // (the C allocator's arenas, the JVM's) shows only in the process RSS.
            check(rssBack, "RSS returned near its start: " + rss);
            System.out.printf("PASS FaultSoakJob: Spark %s, %s: %d soak task attempts in %d jobs (after %d warm-up"
                    + " tasks and %d warm-up cancellations; %d task attempts in all); %d faults injected while holding"
                    + " native memory: %d thrown, %d killed by the driver, %d killed by job cancellation, %d native"
                    + " OOM, %d native spiller panics under a Spark spill; %.1f GiB of native allocations written and"
                    + " freed; %d bytes leaked; %s; %s (%.1f s)%n", spark.version(), jsc.master(), soakAttempts,
                    JOBS + CANCEL_ROUNDS, WARMUP_TASKS, WARMUP_CANCEL_ROUNDS, tracker.total(), faults, throwing, killed,
                    cancelled, ooms, panics, touchedBytes / (double) (1L << 30), leaked, heap, rss,
                    (System.nanoTime() - start) / 1e9);
        } finally {
            spark.stop();
            for (File f : markers.listFiles()) {
                f.delete();
            }
            markers.delete();
        }
    }

    /** {@code bytes / attempts}: "0" when nothing is left, else with three decimals (never rounded to 0). */
    static String formatPerAttempt(long bytes, int attempts) {
        return bytes == 0 ? "0" : String.format("%.3f", bytes / (double) attempts);
    }

    /** One task attempt of the soak (job -1: warm-up). */
    static void task(int job, int partition, long taskLimit, String markers) throws Exception {
        Soak.quietExpectedFailures(); // executors of another JVM
        TaskContext ctx = TaskContext.get();
        Fault fault = fault(job, partition, ctx.attemptNumber());
        Plan plan = new Plan(job, partition, ctx.attemptNumber());
        if (job < 0 && partition < 4) {
            // The soak's faults include native panics: the first panic of a process builds state the
            // Rust runtime keeps for good (with RUST_BACKTRACE, the symbol cache of the backtrace
            // printer), which is not a leak and must be in the library heap's baseline.
            try {
                NativeTesting.panic("soak: warm-up panic");
                throw new AssertionError("soak: no warm-up panic");
            } catch (NativeMemoryException e) {
                check(e.getMessage().contains("soak: warm-up panic"), "the warm-up panic: " + e);
            }
        }
        NativeMemoryManager mm = TaskNativeMemory.get();
        long h = mm.handle();
        NativeReservation reservation = mm.newReservation("soak/buffers", plan.reservation);
        long address = NativeTesting.allocateTouched(h, "soak/alloc", plan.touched);
        NativeTesting.registerSpiller(h, "soak/sort", plan.spiller, 0);
        long churn = plan.threads ? NativeTesting.startNativeChurn(h, "soak/threads", 2, plan.threadMillis, 4 * MiB,
                true, plan.threadSeed) : 0;
        reservation.grow(MiB);
        reservation.shrink(2 * MiB);
        String where = "job " + job + " partition " + partition + " (task " + ctx.taskAttemptId() + ")";
        switch (fault) {
            case THROW:
                throw new IllegalStateException(INJECTED + " failure in " + where + " holding "
                        + mm.usedBytes() + " native bytes");
            case KILL:
                check(new File(markers, "kill-" + ctx.taskAttemptId()).createNewFile(), "marker of " + where);
                Thread.sleep(30_000); // interrupted by the kill
                throw new AssertionError("soak: " + where + " was not killed");
            case NATIVE_OOM:
                mm.newReservation("soak/too-big", taskLimit + MiB); // fails the task
                throw new AssertionError("soak: no native OOM in " + where);
            case SPILL_PANIC:
                spillPanics(mm, reservation, where); // fails the task
                throw new AssertionError("unreachable");
            default:
                break;
        }
        reservation.close();
        checkEq(plan.touched, NativeTesting.free(h, address), "freed the allocation");
        if (churn != 0) {
            long[] c = NativeTesting.joinNativeChurn(churn, 30_000);
            checkEq(0, c[2], "native threads ran to their deadline in " + where);
        }
    }

    /**
     * A JVM operator asks Spark for more than there is; Spark spills the nativemem consumer under
     * its monitor; a native spiller panics. The JVM operator gets Spark's out-of-memory error
     * carrying the panic text; Spark holds exactly what the manager reserved, and the manager
     * still works. The error then fails the task, as it would an operator: Spark does not give
     * back what it granted the requester before the failed spill, so a task that carried on
     * would be failed by Spark's managed-memory leak check instead.
     */
    static void spillPanics(NativeMemoryManager mm, NativeReservation held, String where) {
        SparkReservationListener l = TaskNativeMemory.listener();
        NativeTesting.registerPanickingSpiller(mm.handle(), "soak/panicky", 8 * MiB, 1, PANIC_TEXT);
        Soak.JvmOperator jvm = new Soak.JvmOperator(TaskContext.get().taskMemoryManager(), l.getMode());
        OutOfMemoryError error = null;
        try {
            jvm.acquire(1L << 40);
        } catch (OutOfMemoryError e) { // SparkOutOfMemoryError
            error = e;
        } finally {
            jvm.releaseAll();
        }
        check(error != null, "an error from the panicking spill in " + where);
        String msg = Soak.fullMessage(error);
        check(msg.contains("native panic: " + PANIC_TEXT), "the panic text reached Spark's error: " + msg);
        checkEq(mm.reservedBytes(), l.heldBytes(), "Spark holds what the manager reserved after the panic");
        // The manager still works (from its cushion: Spark has nothing left to grant, see above).
        long used = mm.usedBytes();
        held.shrink(MiB);
        held.grow(MiB);
        checkEq(used, mm.usedBytes(), "grow and shrink after the panic");
        checkEq(mm.reservedBytes(), l.heldBytes(), "Spark holds what the manager reserved");
        throw error;
    }

    /** Cancels job groups while both tasks hold native memory; returns the tasks killed. */
    static int cancelRounds(JavaSparkContext jsc, File markers, String tag, int rounds) throws Exception {
        final String dir = markers.getAbsolutePath();
        int killed = 0;
        for (int round = 0; round < rounds; round++) {
            final String group = CANCEL_GROUP + tag + round;
            final String prefix = "cancel-" + tag + round + "-";
            AtomicReference<Throwable> jobError = new AtomicReference<>();
            Thread job = new Thread(() -> {
                jsc.setJobGroup(group, "cancelled while holding native memory", true);
                try {
                    jsc.parallelize(Soak.seeds(2), 2).foreach(p -> {
                        NativeMemoryManager mm = TaskNativeMemory.get();
                        mm.newReservation("soak/cancelled", 12 * MiB);
                        NativeTesting.allocateTouched(mm.handle(), "soak/cancelled-alloc", 2 * MiB);
                        NativeTesting.registerSpiller(mm.handle(), "soak/cancelled-sort", 4 * MiB, 0);
                        NativeTesting.startNativeChurn(mm.handle(), "soak/cancelled-threads", 2, 60_000, 4 * MiB,
                                true, p);
                        new File(dir, prefix + TaskContext.get().taskAttemptId()).createNewFile();
                        Thread.sleep(30_000); // interrupted by the cancellation
                        throw new AssertionError("soak: not cancelled");
                    });
                    jobError.set(new AssertionError("soak: the job was not cancelled"));
                } catch (Throwable t) {
                    jobError.set(t);
                }
            }, group);
            job.start();
            long deadline = System.currentTimeMillis() + 30_000;
            while (count(markers, prefix) < 2) {
                check(System.currentTimeMillis() < deadline && job.isAlive(), "both tasks of " + group + " started");
                Thread.sleep(2);
            }
            jsc.cancelJobGroup(group);
            job.join(60_000);
            check(!job.isAlive(), group + " returned");
            check(Soak.fullMessage(jobError.get()).contains("cancel"), "cancelled: " + jobError.get());
            killed += 2;
        }
        return killed;
    }

    private static int count(File dir, String prefix) {
        int n = 0;
        for (String name : dir.list()) {
            n += name.startsWith(prefix) ? 1 : 0;
        }
        return n;
    }

    /** Driver thread: kills every task attempt that left a {@code kill-<taskAttemptId>} marker. */
    static final class Killer implements Runnable {
        final JavaSparkContext jsc;
        final File markers;
        final AtomicInteger kills = new AtomicInteger();
        final Thread thread = new Thread(this, "soak-killer");
        volatile boolean running = true;

        Killer(JavaSparkContext jsc, File markers) {
            this.jsc = jsc;
            this.markers = markers;
            thread.setDaemon(true);
        }

        void start() {
            thread.start();
        }

        void stop() throws InterruptedException {
            running = false;
            thread.join(10_000);
        }

        @Override
        public void run() {
            while (running) {
                for (File f : markers.listFiles()) {
                    if (f.getName().startsWith("kill-")) {
                        long id = Long.parseLong(f.getName().substring(5));
                        if (jsc.sc().killTaskAttempt(id, true, INJECTED + " kill of task " + id)) {
                            kills.incrementAndGet();
                        }
                        f.delete();
                    }
                }
                try {
                    Thread.sleep(2);
                } catch (InterruptedException e) {
                    return;
                }
            }
        }
    }
}
