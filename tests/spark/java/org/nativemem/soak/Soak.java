package org.nativemem.soak;

import java.io.IOException;
import java.io.Serializable;
import java.lang.management.ManagementFactory;
import java.lang.management.MemoryMXBean;
import java.lang.management.ThreadInfo;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

import org.apache.spark.ExceptionFailure;
import org.apache.spark.SparkEnv;
import org.apache.spark.TaskKilled;
import org.apache.spark.api.java.JavaSparkContext;
import org.apache.spark.memory.MemoryConsumer;
import org.apache.spark.memory.MemoryMode;
import org.apache.spark.memory.TaskMemoryManager;
import org.apache.spark.scheduler.SparkListener;
import org.apache.spark.scheduler.SparkListenerJobEnd;
import org.apache.spark.scheduler.SparkListenerJobStart;
import org.apache.spark.scheduler.SparkListenerTaskEnd;
import org.apache.spark.scheduler.SparkListenerTaskStart;
import org.nativemem.NativeTesting;
import org.nativemem.spark.ExecutorNativeMemoryStats;
import org.nativemem.spark.SparkReservationListener;
import org.nativemem.spark.TaskNativeMemory;

/**
 * Shared pieces of the hardening jobs: checks, a driver-side task tracker, executor
 * read-outs (native stats and process RSS), a thread-safe JVM memory consumer, and a stall
 * watchdog that prints every thread's stack.
 */
final class Soak {
    static final long MiB = 1L << 20;

    private Soak() {
    }

    static void check(boolean ok, String what) {
        if (!ok) {
            throw new AssertionError("soak check failed: " + what);
        }
    }

    static void checkEq(long expected, long actual, String what) {
        if (expected != actual) {
            throw new AssertionError("soak check failed: " + what + ": expected " + expected + ", got " + actual);
        }
    }

    /** The messages of {@code t} and its causes, one per line. */
    static String fullMessage(Throwable t) {
        StringBuilder sb = new StringBuilder();
        for (Throwable c = t; c != null; c = c.getCause() == c ? null : c.getCause()) {
            sb.append(c.getClass().getName()).append(": ").append(c.getMessage()).append('\n');
        }
        return sb.toString();
    }

    /** Number of executor JVMs: {@code local-cluster[N,...]} → N, else 1. */
    static int executorCount(String master) {
        Matcher m = Pattern.compile("local-cluster\\[\\s*(\\d+)\\s*,").matcher(master);
        return m.find() ? Integer.parseInt(m.group(1)) : 1;
    }

    /**
     * Keeps the per-spill INFO lines of the nativemem consumer out of the log of this JVM (a stress
     * run makes millions); warnings and errors still show.
     */
    static void quietSpillLogs() {
        org.apache.logging.log4j.core.config.Configurator.setLevel(SparkReservationListener.class.getName(),
                org.apache.logging.log4j.Level.WARN);
    }

    private static final AtomicBoolean QUIET = new AtomicBoolean();

    /**
     * For runs that fail tasks on purpose by the hundred: once per JVM, silences what Spark and
     * nativemem log about each expected failure (Spark's task error and "lost task" with a stack,
     * its spill error, the plugin's per-task close report, the native leak report at close).
     * Outcomes are checked from the driver instead (every task end's reason, the executor
     * totals), and an unexpected failure shows in the assertion message.
     */
    static void quietExpectedFailures() {
        if (!QUIET.compareAndSet(false, true)) {
            return;
        }
        quietSpillLogs();
        for (String logger : new String[] {"org.apache.spark.executor.Executor",
            "org.apache.spark.scheduler.TaskSetManager", "org.apache.spark.memory.TaskMemoryManager",
            TaskNativeMemory.class.getName()}) {
            org.apache.logging.log4j.core.config.Configurator.setLevel(logger, org.apache.logging.log4j.Level.OFF);
        }
        NativeTesting.setNativeLogLevel("error");
    }

    static List<Integer> seeds(int n) {
        List<Integer> s = new ArrayList<>();
        for (int i = 0; i < n; i++) {
            s.add(i);
        }
        return s;
    }

    // ---- driver side: task ends ----------------------------------------------------------------

    /** Counts task ends by reason and keeps the text of every failure; waits until idle. */
    static final class Tracker extends SparkListener {
        final AtomicInteger running = new AtomicInteger();
        final AtomicInteger jobsStarted = new AtomicInteger();
        final AtomicInteger jobsEnded = new AtomicInteger();
        final Map<String, AtomicInteger> byReason = new ConcurrentHashMap<>();
        final List<String> failures = new CopyOnWriteArrayList<>();

        static Tracker install(JavaSparkContext jsc) {
            Tracker t = new Tracker();
            jsc.sc().addSparkListener(t);
            return t;
        }

        @Override
        public void onJobStart(SparkListenerJobStart e) {
            jobsStarted.incrementAndGet();
        }

        @Override
        public void onJobEnd(SparkListenerJobEnd e) {
            jobsEnded.incrementAndGet();
        }

        @Override
        public void onTaskStart(SparkListenerTaskStart e) {
            running.incrementAndGet();
        }

        @Override
        public void onTaskEnd(SparkListenerTaskEnd e) {
            String reason = e.reason().getClass().getSimpleName().replace("$", "");
            byReason.computeIfAbsent(reason, k -> new AtomicInteger()).incrementAndGet();
            if (e.reason() instanceof ExceptionFailure) {
                ExceptionFailure f = (ExceptionFailure) e.reason();
                failures.add(reason + ": " + f.className() + ": " + firstLine(f.description()));
            } else if (e.reason() instanceof TaskKilled) {
                failures.add(reason + ": " + ((TaskKilled) e.reason()).reason());
            } else if (!"Success".equals(reason)) {
                failures.add(reason + ": " + firstLine(String.valueOf(e.reason())));
            }
            running.decrementAndGet();
        }

        private static String firstLine(String s) {
            int nl = s == null ? -1 : s.indexOf('\n');
            return nl < 0 ? s : s.substring(0, nl);
        }

        int count(String reason) {
            AtomicInteger n = byReason.get(reason);
            return n == null ? 0 : n.get();
        }

        int total() {
            int n = 0;
            for (AtomicInteger c : byReason.values()) {
                n += c.get();
            }
            return n;
        }

        /** Waits until every event was delivered and every started task and job ended. */
        void awaitIdle(JavaSparkContext jsc, long timeoutMillis) throws Exception {
            long deadline = System.currentTimeMillis() + timeoutMillis;
            while (true) {
                jsc.sc().listenerBus().waitUntilEmpty(Math.max(1, deadline - System.currentTimeMillis()));
                if (running.get() == 0 && jobsEnded.get() == jobsStarted.get()) {
                    return;
                }
                check(System.currentTimeMillis() < deadline, "tasks still running after " + timeoutMillis + " ms");
                Thread.sleep(10);
            }
        }
    }

    // ---- executor side: native stats and process memory ----------------------------------------

    /** One executor JVM's native totals and resident memory, taken inside a task there. */
    static final class ExecutorReport implements Serializable {
        private static final long serialVersionUID = 1L;
        final String executorId;
        final long liveManagers;
        final long usedBytes;
        final long reservedBytes;
        final long heldFromSparkBytes;
        final long unreturnedBytes;
        final long closeFailures;
        final long managersCreated;
        final long managersClosed;
        final long reclaimedAtCloseBytes;
        final long oomFailures;
        final long sparkSpillRequests;
        final long spillCount;
        /** VmRSS and VmHWM of the process, bytes, after {@link #settle()}. */
        final long rssBytes;
        final long peakRssBytes;
        /** Heap and non-heap memory the JVM has committed, bytes. */
        final long jvmCommittedBytes;
        /** Live threads of the JVM (each has a stack outside the committed heap). */
        final int threads;
        /**
         * The native library's own heap, from its counting allocator (test library only): blocks
         * and bytes live, and allocations made since it was loaded.
         */
        final long liveNativeBlocks;
        final long liveNativeBytes;
        final long nativeAllocations;

        ExecutorReport(ExecutorNativeMemoryStats s, long rss, long peakRss, long jvmCommitted, int threads,
                long[] heap) {
            this.executorId = SparkEnv.get().executorId();
            this.liveManagers = s.liveManagers();
            this.usedBytes = s.usedBytes();
            this.reservedBytes = s.reservedBytes();
            this.heldFromSparkBytes = s.heldFromSparkBytes();
            this.unreturnedBytes = s.unreturnedBytes();
            this.closeFailures = s.closeFailures();
            this.managersCreated = s.managersCreated();
            this.managersClosed = s.managersClosed();
            this.reclaimedAtCloseBytes = s.reclaimedAtCloseBytes();
            this.oomFailures = s.oomFailures();
            this.sparkSpillRequests = s.sparkSpillRequests();
            this.spillCount = s.spillCount();
            this.rssBytes = rss;
            this.peakRssBytes = peakRss;
            this.jvmCommittedBytes = jvmCommitted;
            this.threads = threads;
            this.liveNativeBlocks = heap[0];
            this.liveNativeBytes = heap[1];
            this.nativeAllocations = heap[2];
        }

        /**
         * Runs in a task: settles the process memory, then reads everything. The library's heap is
         * read once it is quiet, or, given this executor's {@code heapBaseline} (live blocks and
         * bytes), once it is back there or {@link #HEAP_SETTLE_MILLIS} passed (native threads of
         * closed managers may still be returning and freeing what they hold).
         */
        static ExecutorReport take(long[] heapBaseline) throws IOException, InterruptedException {
            settle();
            long[] heap = heapBaseline == null ? NativeTesting.quietNativeHeap(HEAP_QUIET_MILLIS)
                    : NativeTesting.awaitNativeHeap(heapBaseline, HEAP_SETTLE_MILLIS);
            MemoryMXBean mx = ManagementFactory.getMemoryMXBean();
            long committed = mx.getHeapMemoryUsage().getCommitted() + mx.getNonHeapMemoryUsage().getCommitted();
            return new ExecutorReport(TaskNativeMemory.executorStats(), procStatus("VmRSS"), procStatus("VmHWM"),
                    committed, ManagementFactory.getThreadMXBean().getThreadCount(), heap);
        }

        /** This executor's live heap as a baseline for {@link #take(long[])}. */
        long[] heapBaseline() {
            return new long[] {liveNativeBlocks, liveNativeBytes};
        }

        /** Native bytes this executor still accounts for (0 when nothing leaked). */
        long leakedBytes() {
            return usedBytes + reservedBytes + heldFromSparkBytes + unreturnedBytes;
        }

        void assertNothingLeft(String when) {
            String ctx = when + ": " + this;
            checkEq(0, liveManagers, "live managers " + ctx);
            checkEq(0, usedBytes, "native used " + ctx);
            checkEq(0, reservedBytes, "native reserved " + ctx);
            checkEq(0, heldFromSparkBytes, "held from Spark " + ctx);
            checkEq(0, unreturnedBytes, "unreturned to Spark " + ctx);
            checkEq(0, closeFailures, "close failures " + ctx);
            checkEq(managersCreated, managersClosed, "managers created == closed " + ctx);
        }

        @Override
        public String toString() {
            return String.format("executor %s: live managers %d, used %d, reserved %d, held from Spark %d,"
                    + " unreturned %d, close failures %d, managers %d created / %d closed, reclaimed at close"
                    + " %.1f MiB, native OOM task failures %d, successful Spark spills %d, native spills %d;"
                    + " native library heap %d blocks / %d bytes live (%d allocations so far);"
                    + " RSS %.1f MiB (peak %.1f MiB), JVM committed %.1f MiB, %d threads", executorId, liveManagers,
                    usedBytes, reservedBytes, heldFromSparkBytes, unreturnedBytes, closeFailures, managersCreated,
                    managersClosed,
                    reclaimedAtCloseBytes / (double) MiB, oomFailures, sparkSpillRequests, spillCount,
                    liveNativeBlocks, liveNativeBytes, nativeAllocations,
                    rssBytes / (double) MiB, peakRssBytes / (double) MiB, jvmCommittedBytes / (double) MiB, threads);
        }
    }

    /**
     * Lets the process give back what it no longer uses before RSS is read: two GCs (so Java
     * objects holding native resources are gone), the C allocator's free memory returned to the OS
     * ({@code malloc_trim}), and a short pause.
     */
    static void settle() throws InterruptedException {
        System.gc();
        System.gc();
        NativeTesting.mallocTrim();
        Thread.sleep(200);
    }

    /** A size line of /proc/self/status ({@code VmRSS}, {@code VmHWM}), in bytes. */
    static long procStatus(String key) throws IOException {
        for (String line : Files.readAllLines(Paths.get("/proc/self/status"), StandardCharsets.US_ASCII)) {
            if (line.startsWith(key + ":")) {
                String[] f = line.substring(key.length() + 1).trim().split("\\s+");
                check(f.length == 2 && f[1].equals("kB"), "unexpected /proc/self/status line: " + line);
                return Long.parseLong(f[0]) * 1024;
            }
        }
        throw new AssertionError("no " + key + " in /proc/self/status");
    }

    /** How long a report waits for the library's heap to become quiet (its baseline reading). */
    static final long HEAP_QUIET_MILLIS = 30_000;
    /** How long a report waits for the library's heap to come back to its baseline. */
    static final long HEAP_SETTLE_MILLIS = 5_000;

    /** Runs tasks until every executor reported once; one report per executor (the last). */
    static List<ExecutorReport> executorReports(JavaSparkContext jsc, int executors) {
        return executorReports(jsc, executors, new HashMap<String, long[]>());
    }

    /**
     * Like {@link #executorReports(JavaSparkContext, int)}; each executor with a baseline in
     * {@code heapBaselines} (by executor id; see {@link ExecutorReport#heapBaseline()}) waits a
     * bounded time for its library heap to come back to it before reading.
     */
    static List<ExecutorReport> executorReports(JavaSparkContext jsc, int executors,
            HashMap<String, long[]> heapBaselines) {
        Map<String, ExecutorReport> byExecutor = new TreeMap<>();
        for (int round = 0; round < 10 && byExecutor.size() < executors; round++) {
            int n = 2 * executors;
            for (ExecutorReport r : jsc.parallelize(seeds(n), n)
                    .map(i -> ExecutorReport.take(heapBaselines.get(SparkEnv.get().executorId()))).collect()) {
                byExecutor.put(r.executorId, r);
            }
        }
        check(byExecutor.size() == executors, "reports from " + executors + " executors: " + byExecutor.keySet());
        return new ArrayList<>(byExecutor.values());
    }

    // ---- a JVM operator of the task ------------------------------------------------------------

    /**
     * Execution memory of a JVM operator, as Spark sees it. Unlike a plain {@link MemoryConsumer}
     * it may be used from several threads: every change of {@code used} happens under the task
     * memory manager's monitor (Spark calls {@link #spill} holding it). Spilling frees what is
     * asked, like a sorter writing part of its buffer to disk.
     */
    static final class JvmOperator extends MemoryConsumer {
        private final TaskMemoryManager tmm;
        long spills;

        JvmOperator(TaskMemoryManager tmm, MemoryMode mode) {
            super(tmm, tmm.pageSizeBytes(), mode);
            this.tmm = tmm;
        }

        long acquire(long bytes) {
            synchronized (tmm) {
                return acquireMemory(bytes);
            }
        }

        void release(long bytes) {
            synchronized (tmm) {
                freeMemory(Math.min(bytes, getUsed()));
            }
        }

        void releaseAll() {
            release(Long.MAX_VALUE);
        }

        @Override
        public long spill(long size, MemoryConsumer trigger) {
            // Spark holds tmm's monitor here.
            if (trigger == this) {
                return 0;
            }
            long freed = Math.min(size, getUsed());
            if (freed > 0) {
                freeMemory(freed);
                spills++;
            }
            return freed;
        }

        @Override
        public String toString() {
            return "soak-jvm-operator(" + getMode() + ", used " + getUsed() + ")";
        }
    }

    // ---- stall watchdog ----------------------------------------------------------------------

    /** A worker to watch: a progress counter, and whether it has finished. */
    abstract static class Probe {
        final String name;
        long last = -1;
        long lastMoved = System.nanoTime();

        Probe(String name) {
            this.name = name;
        }

        abstract long progress();

        abstract boolean finished();
    }

    /**
     * Returns when every probe has finished. If one that has not finished makes no progress for
     * {@code stallSeconds}, prints every thread's stack and locks to stderr and halts the JVM
     * with exit code 97: a deadlocked task can be neither cancelled nor closed, so this is the one
     * way to fail the run at once, with the evidence printed.
     */
    static void watch(int stallSeconds, Probe... probes) throws InterruptedException {
        while (true) {
            boolean running = false;
            for (Probe p : probes) {
                if (p.finished()) {
                    continue;
                }
                running = true;
                long now = p.progress();
                if (now != p.last) {
                    p.last = now;
                    p.lastMoved = System.nanoTime();
                } else if (System.nanoTime() - p.lastMoved > TimeUnit.SECONDS.toNanos(stallSeconds)) {
                    System.err.println("DEADLOCK: '" + p.name + "' made no progress for " + stallSeconds
                            + " s; every thread of this JVM:\n" + threadDump());
                    System.err.flush();
                    Runtime.getRuntime().halt(97);
                }
            }
            if (!running) {
                return;
            }
            Thread.sleep(50);
        }
    }

    static String threadDump() {
        StringBuilder sb = new StringBuilder();
        for (ThreadInfo t : ManagementFactory.getThreadMXBean().dumpAllThreads(true, true)) {
            sb.append('"').append(t.getThreadName()).append("\" ").append(t.getThreadState());
            if (t.getLockName() != null) {
                sb.append(" on ").append(t.getLockName());
            }
            if (t.getLockOwnerName() != null) {
                sb.append(" owned by \"").append(t.getLockOwnerName()).append('"');
            }
            sb.append('\n');
            for (StackTraceElement e : t.getStackTrace()) {
                sb.append("    at ").append(e).append('\n');
            }
            sb.append('\n');
        }
        return sb.toString();
    }
}
