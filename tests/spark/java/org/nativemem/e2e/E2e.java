package org.nativemem.e2e;

import java.io.Serializable;
import java.lang.management.ManagementFactory;
import java.lang.reflect.Method;
import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeMap;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

import javax.management.MBeanServer;
import javax.management.ObjectName;

import org.apache.spark.SparkEnv;
import org.apache.spark.api.java.JavaSparkContext;
import org.apache.spark.executor.TaskMetrics;
import org.apache.spark.scheduler.SparkListener;
import org.apache.spark.scheduler.SparkListenerJobEnd;
import org.apache.spark.scheduler.SparkListenerJobStart;
import org.apache.spark.scheduler.SparkListenerTaskEnd;
import org.apache.spark.scheduler.SparkListenerTaskStart;
import org.nativemem.spark.ExecutorNativeMemoryStats;
import org.nativemem.spark.NativeMemoryPlugin;
import org.nativemem.spark.TaskNativeMemory;

/** Shared pieces of the nativemem Spark end-to-end jobs: checks, task tracking, executor read-outs. */
final class E2e {
    static final long MiB = 1L << 20;

    private E2e() {
    }

    /** Fails the job (spark-submit exits non-zero) unless {@code ok}. */
    static void check(boolean ok, String what) {
        if (!ok) {
            throw new AssertionError("e2e check failed: " + what);
        }
    }

    static void checkEq(long expected, long actual, String what) {
        if (expected != actual) {
            throw new AssertionError("e2e check failed: " + what + ": expected " + expected + ", got " + actual);
        }
    }

    /** Runs {@code body}, which must throw a {@code type} whose message contains every fragment. */
    static <T extends Throwable> T expectThrows(Class<T> type, Runnable body, String... fragments) {
        try {
            body.run();
        } catch (Throwable t) {
            Throwable match = t;
            while (match != null && !type.isInstance(match)) {
                match = match.getCause();
            }
            if (match == null) {
                throw new AssertionError("e2e check failed: expected " + type.getName() + ", got " + t, t);
            }
            String all = fullMessage(t);
            for (String f : fragments) {
                if (!all.contains(f)) {
                    throw new AssertionError("e2e check failed: message lacks '" + f + "': " + all, t);
                }
            }
            return type.cast(match);
        }
        throw new AssertionError("e2e check failed: expected " + type.getName() + ", nothing was thrown");
    }

    /** The messages of {@code t} and all its causes, one per line. */
    static String fullMessage(Throwable t) {
        StringBuilder sb = new StringBuilder();
        for (Throwable c = t; c != null; c = c.getCause() == c ? null : c.getCause()) {
            sb.append(c.getClass().getName()).append(": ").append(c.getMessage()).append('\n');
        }
        return sb.toString();
    }

    /** Number of executors the master runs: {@code local-cluster[N,...]} → N, else 1. */
    static int executorCount(String master) {
        Matcher m = Pattern.compile("local-cluster\\[\\s*(\\d+)\\s*,").matcher(master);
        return m.find() ? Integer.parseInt(m.group(1)) : 1;
    }

    // ---- driver-side view of tasks ---------------------------------------------------------------

    /** One finished task as the driver's listener saw it. */
    static final class TaskEnd {
        final int stageId;
        final long taskId;
        final String executorId;
        final String reason;
        final String reasonText;
        /** Legacy "Peak Execution Memory" (operators report it; nativemem adds its peak). */
        final long peakExecutionMemory;
        /** Spark 4.0+: what the TaskMemoryManager saw, by mode; -1 on 3.5. */
        final long peakOnHeap;
        final long peakOffHeap;
        /** Spark's Spill (Disk) of the task ({@code TaskMetrics.diskBytesSpilled}); -1 without metrics. */
        final long diskBytesSpilled;
        /** The task's {@code nativemem.*} accumulator updates, by name. */
        final Map<String, Long> nativememAccumulators;

        TaskEnd(SparkListenerTaskEnd e) {
            this.stageId = e.stageId();
            this.taskId = e.taskInfo().taskId();
            this.executorId = e.taskInfo().executorId();
            this.reason = e.reason().getClass().getSimpleName().replace("$", "");
            this.reasonText = String.valueOf(e.reason());
            TaskMetrics m = e.taskMetrics();
            this.peakExecutionMemory = m == null ? -1 : m.peakExecutionMemory();
            this.peakOnHeap = m == null ? -1 : optionalLong(m, "peakOnHeapExecutionMemory");
            this.peakOffHeap = m == null ? -1 : optionalLong(m, "peakOffHeapExecutionMemory");
            this.diskBytesSpilled = m == null ? -1 : m.diskBytesSpilled();
            this.nativememAccumulators = nativememAccumulators(e.taskInfo());
        }

        /**
         * The task's updates of the {@code nativemem.*} accumulators. Read reflectively:
         * {@code TaskInfo.accumulables()} returns a {@code scala.collection.Seq} on Scala 2.12
         * (Spark 3.5) and an immutable one on 2.13 (4.x), so a compiled call links on one only.
         */
        private static Map<String, Long> nativememAccumulators(Object taskInfo) {
            Map<String, Long> out = new java.util.TreeMap<>();
            try {
                Object seq = taskInfo.getClass().getMethod("accumulables").invoke(taskInfo);
                Object it = seq.getClass().getMethod("iterator").invoke(seq);
                Method hasNext = it.getClass().getMethod("hasNext");
                Method next = it.getClass().getMethod("next");
                hasNext.setAccessible(true);
                next.setAccessible(true);
                while ((Boolean) hasNext.invoke(it)) {
                    org.apache.spark.scheduler.AccumulableInfo a = (org.apache.spark.scheduler.AccumulableInfo) next.invoke(it);
                    if (a.name().isDefined() && a.name().get().startsWith("nativemem.") && a.update().isDefined()) {
                        out.put(a.name().get(), Long.parseLong(String.valueOf(a.update().get())));
                    }
                }
            } catch (ReflectiveOperationException | RuntimeException e) {
                throw new AssertionError("cannot read the task's accumulables", e);
            }
            return out;
        }

        private static long optionalLong(Object target, String method) {
            try {
                Method m = target.getClass().getMethod(method);
                return ((Number) m.invoke(target)).longValue();
            } catch (NoSuchMethodException e) {
                return -1; // Spark 3.5
            } catch (ReflectiveOperationException e) {
                throw new AssertionError("cannot read TaskMetrics." + method, e);
            }
        }

        @Override
        public String toString() {
            return "task " + taskId + " (stage " + stageId + ", executor " + executorId + ", " + reason
                    + ", peakExecutionMemory=" + peakExecutionMemory + ", peakOnHeap=" + peakOnHeap
                    + ", peakOffHeap=" + peakOffHeap + ")";
        }
    }

    /** Tracks jobs and tasks through the listener bus, so a job can wait until all tasks ended. */
    static final class Tracker extends SparkListener {
        private final AtomicInteger running = new AtomicInteger();
        private final AtomicInteger jobsStarted = new AtomicInteger();
        private final AtomicInteger jobsEnded = new AtomicInteger();
        private final List<TaskEnd> ended = new CopyOnWriteArrayList<>();

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
            ended.add(new TaskEnd(e));
            running.decrementAndGet();
        }

        /**
         * Waits until the listener bus delivered every event posted so far and every task that
         * started has ended (on an executor that means its completion listeners ran: the status
         * update is sent after them). Call after an action returned or failed.
         */
        void awaitIdle(JavaSparkContext jsc, long timeoutMillis) throws Exception {
            long deadline = System.currentTimeMillis() + timeoutMillis;
            while (true) {
                jsc.sc().listenerBus().waitUntilEmpty(Math.max(1, deadline - System.currentTimeMillis()));
                if (running.get() == 0 && jobsEnded.get() == jobsStarted.get()) {
                    return;
                }
                if (System.currentTimeMillis() > deadline) {
                    throw new AssertionError("e2e: tasks still running after " + timeoutMillis + " ms: jobs "
                            + jobsStarted.get() + " started / " + jobsEnded.get() + " ended, tasks running "
                            + running.get());
                }
                Thread.sleep(20);
            }
        }

        /** Task ends delivered after {@code mark} (see {@link #mark(JavaSparkContext)}). */
        List<TaskEnd> endedSince(int mark) {
            return new ArrayList<>(ended.subList(mark, ended.size()));
        }

        /** A position in the task ends, after every event posted so far was delivered. */
        int mark(JavaSparkContext jsc) throws Exception {
            jsc.sc().listenerBus().waitUntilEmpty(30_000);
            return ended.size();
        }
    }

    // ---- executor-side read-outs -------------------------------------------------------------------

    /** What one executor JVM reports about its native memory, taken inside a task there. */
    static final class ExecutorReport implements Serializable {
        private static final long serialVersionUID = 1L;
        final String executorId;
        /** {@link TaskNativeMemory#executorStats()}. */
        final Map<String, Long> stats;
        /** The plugin's gauges, read back from its metric registry. */
        final Map<String, Long> gauges;
        /** The same gauges as Spark's JMX sink publishes them (empty without the sink). */
        final Map<String, Long> jmx;
        /** {@link SpillRacer} totals of this JVM. */
        final long racerCalls;
        final long racerCallsAfterClose;
        final List<String> racerFailures;

        ExecutorReport(String executorId, Map<String, Long> stats, Map<String, Long> gauges, Map<String, Long> jmx) {
            this.executorId = executorId;
            this.stats = stats;
            this.gauges = gauges;
            this.jmx = jmx;
            this.racerCalls = SpillRacer.CALLS.get();
            this.racerCallsAfterClose = SpillRacer.CALLS_AFTER_CLOSE.get();
            this.racerFailures = new ArrayList<>(SpillRacer.FAILURES);
        }

        static ExecutorReport take() throws InterruptedException {
            SpillRacer.awaitAll();
            ExecutorNativeMemoryStats s = TaskNativeMemory.executorStats();
            Map<String, Long> stats = new LinkedHashMap<>();
            stats.put("liveManagers", s.liveManagers());
            stats.put("usedBytes", s.usedBytes());
            stats.put("reservedBytes", s.reservedBytes());
            stats.put("heldFromSparkBytes", s.heldFromSparkBytes());
            stats.put("peakBytes", s.peakBytes());
            stats.put("spillCount", s.spillCount());
            stats.put("spilledBytes", s.spilledBytes());
            stats.put("sparkSpillRequests", s.sparkSpillRequests());
            stats.put("sparkSpilledBytes", s.sparkSpilledBytes());
            stats.put("managersCreated", s.managersCreated());
            stats.put("managersClosed", s.managersClosed());
            stats.put("reclaimedAtCloseBytes", s.reclaimedAtCloseBytes());
            stats.put("unreturnedBytes", s.unreturnedBytes());
            stats.put("closeFailures", s.closeFailures());
            stats.put("oomFailures", s.oomFailures());
            stats.put("arrowAllocators", s.arrowAllocators());
            stats.put("arrowAllocatedBytes", s.arrowAllocatedBytes());
            stats.put("arrowReclaimedAtCloseBytes", s.arrowReclaimedAtCloseBytes());
            return new ExecutorReport(SparkEnv.get().executorId(), stats,
                    new LinkedHashMap<>(NativeMemoryPlugin.executorMetrics()), jmxGauges());
        }

        long stat(String name) {
            Long v = stats.get(name);
            if (v == null) {
                throw new AssertionError("no stat " + name + " in " + stats);
            }
            return v;
        }

        @Override
        public String toString() {
            return "executor " + executorId + ": stats " + stats + ", gauges " + gauges + ", jmx " + jmx
                    + ", spill racer: " + racerCalls + " calls, " + racerCallsAfterClose + " after close, failures "
                    + racerFailures;
        }
    }

    /** The plugin's gauges in this JVM's platform MBean server (Spark's JmxSink), by short name. */
    static Map<String, Long> jmxGauges() {
        Map<String, Long> out = new TreeMap<>();
        try {
            MBeanServer server = ManagementFactory.getPlatformMBeanServer();
            Set<ObjectName> names = server.queryNames(new ObjectName("metrics:*"), null);
            String marker = "plugin." + NativeMemoryPlugin.class.getName() + ".";
            for (ObjectName name : names) {
                String full = name.getKeyProperty("name");
                if (full == null) {
                    continue;
                }
                full = ObjectName.unquote(full.startsWith("\"") ? full : "\"" + full + "\"");
                int at = full.indexOf(marker);
                if (at < 0) {
                    continue;
                }
                Object value = server.getAttribute(name, "Value");
                out.put(full.substring(at + marker.length()), value instanceof Number ? ((Number) value).longValue() : null);
            }
        } catch (Exception e) {
            throw new AssertionError("reading JMX failed", e);
        }
        return out;
    }

    /**
     * Runs tasks until every one of {@code executors} executors reported once; returns one report
     * per executor (the last one taken there). No task of this job creates a native manager.
     */
    static List<ExecutorReport> executorReports(JavaSparkContext jsc, int executors) {
        Map<String, ExecutorReport> byExecutor = new TreeMap<>();
        for (int round = 0; round < 10 && byExecutor.size() < executors; round++) {
            int n = 4 * executors;
            List<Integer> seeds = new ArrayList<>();
            for (int i = 0; i < n; i++) {
                seeds.add(i);
            }
            List<ExecutorReport> reports = jsc.parallelize(seeds, n).map(i -> {
                Thread.sleep(50);
                return ExecutorReport.take();
            }).collect();
            for (ExecutorReport r : reports) {
                byExecutor.put(r.executorId, r);
            }
        }
        check(byExecutor.size() == executors, "reports from " + executors + " executors, got " + byExecutor.keySet());
        return Collections.unmodifiableList(new ArrayList<>(byExecutor.values()));
    }

    /**
     * Asserts that no executor holds native or Arrow memory or a live manager and that nothing was left
     * unreturned to Spark; the gauges and (if present) JMX agree with the stats.
     */
    static List<ExecutorReport> assertNoLeak(JavaSparkContext jsc, int executors, String when) {
        List<ExecutorReport> reports = executorReports(jsc, executors);
        for (ExecutorReport r : reports) {
            String ctx = when + ": " + r;
            checkEq(0, r.stat("liveManagers"), "live managers " + ctx);
            checkEq(0, r.stat("usedBytes"), "native used " + ctx);
            checkEq(0, r.stat("reservedBytes"), "reserved " + ctx);
            checkEq(0, r.stat("heldFromSparkBytes"), "held from Spark " + ctx);
            checkEq(0, r.stat("unreturnedBytes"), "unreturned to Spark " + ctx);
            checkEq(0, r.stat("closeFailures"), "close failures " + ctx);
            checkEq(0, r.stat("arrowAllocators"), "live Arrow allocators " + ctx);
            checkEq(0, r.stat("arrowAllocatedBytes"), "Arrow bytes " + ctx);
            checkEq(r.stat("managersCreated"), r.stat("managersClosed"), "created == closed " + ctx);
            check(!r.gauges.isEmpty(), "the executor plugin registered its gauges: " + ctx);
            for (Map.Entry<String, Long> g : r.gauges.entrySet()) {
                // Counters may only have moved forward between the two reads; live values are 0.
                check(g.getValue() != null && g.getValue() >= r.stat(g.getKey()), "gauge " + g.getKey() + " " + ctx);
            }
            checkEq(0, r.gauges.get("usedBytes"), "gauge usedBytes " + ctx);
            checkEq(0, r.gauges.get("liveManagers"), "gauge liveManagers " + ctx);
            check(r.racerFailures.isEmpty(), "spills racing with close returned normally: " + ctx);
        }
        return reports;
    }

    static long sum(List<ExecutorReport> reports, String stat) {
        long total = 0;
        for (ExecutorReport r : reports) {
            total += r.stat(stat);
        }
        return total;
    }
}
