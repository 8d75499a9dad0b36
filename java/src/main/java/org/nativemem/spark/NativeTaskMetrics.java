package org.nativemem.spark;

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.ObjectInputStream;
import java.io.ObjectOutputStream;
import java.io.ObjectStreamClass;
import java.lang.management.ManagementFactory;
import java.lang.management.ThreadMXBean;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Base64;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.atomic.AtomicLong;

import org.apache.spark.SparkContext;
import org.apache.spark.TaskContext;
import org.apache.spark.util.AccumulatorV2;
import org.apache.spark.util.LongAccumulator;
import org.nativemem.NativeCloseReport;
import org.nativemem.NativeMemoryStats;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

import scala.Option;

/**
 * What a task's native memory shows in Spark's own task figures: the Spill columns and named
 * task accumulators, on the stage page, in the REST API ({@code /api/v1/.../stages/...}), in the
 * event log and so in the history server.
 *
 * <h2>Spill (Memory)</h2>
 * When a task's manager closes ({@link TaskNativeMemory}), the bytes its native spillers freed are
 * added to the task's {@code memoryBytesSpilled} ({@code TaskMetrics.incMemoryBytesSpilled}, which
 * Spark's own sorters use), so native spills are in the stage page's Spill (Memory) column.
 *
 * <h2>Spill (Disk)</h2>
 * What a spill wrote is known to the engine only (a spiller returns the bytes it freed). A native
 * engine reports it through the engine ABI ({@code pool_spill_written}; Rust:
 * {@code note_spill_written}): the manager counts it and its close adds it to the task's
 * {@code diskBytesSpilled}. An engine whose JVM side knows it reports it with
 * {@link #addDiskBytesSpilled} (Spark's
 * {@code diskBytesSpilled}, its Spill (Disk) column): a supported, version-checked way to reach
 * Spark's {@code TaskMetrics.incDiskBytesSpilled}, which is not public Spark API.
 *
 * <h2>Accumulators</h2>
 * <table>
 *   <caption>Task accumulators (one value per task attempt)</caption>
 *   <tr><th>name</th><th>per task</th><th>merged (stage / application)</th></tr>
 *   <tr><td>{@value #PEAK}</td><td>native peak of the task's manager</td><td>max</td></tr>
 *   <tr><td>{@value #SPILLED}</td><td>bytes its native spillers freed</td><td>sum</td></tr>
 *   <tr><td>{@value #SPILLS}</td><td>native spills that freed memory</td><td>sum</td></tr>
 *   <tr><td>{@value #RELEASED}</td><td>bytes handed back to Spark on Spark's request
 *       ({@code MemoryConsumer.spill}: unused cushion, then native spills)</td><td>sum</td></tr>
 *   <tr><td>{@value #OVERCOMMIT_PEAK}</td><td>highest bytes forced grows ran ahead of what was
 *       reserved from Spark</td><td>max</td></tr>
 *   <tr><td>{@value #LEAKED}</td><td>native bytes still in use when the task ended (freed by the
 *       close)</td><td>sum</td></tr>
 *   <tr><td>{@value #ARBITRATED}</td><td>bytes the executor's other tasks handed back to Spark
 *       for this task's short grows ({@link org.nativemem.ExecutorArbiter})</td><td>sum</td></tr>
 *   <tr><td>{@value #GATE_REFUSALS}</td><td>requests to Spark the container governor refused
 *       under hard pressure ({@link org.nativemem.ContainerGovernor})</td><td>sum</td></tr>
 * </table>
 *
 * <p>Spark ships an accumulator to executors only inside a task's closure, and its driver drops
 * updates of accumulators it does not know. So the driver plugin registers these on the driver
 * ({@link #registerOnDriver}: {@code AccumulatorV2.register} with {@code countFailedValues=true},
 * so failed and killed attempts count too, as Spark's own task metrics do) and hands them,
 * Java-serialized in one stream, to every executor plugin through the map its {@code init}
 * returns (the executor plugin's {@code extraConf}). At a task's close {@link #recordAtClose}
 * deserializes copies on the task thread: Spark's {@code AccumulatorV2.readObject} registers each
 * with the running task, exactly as for an accumulator of a closure, and Spark sends their values
 * to the driver with the task's result. The cost ({@link #recordCost()}): reading the eight
 * accumulators takes about 22 microseconds of CPU once the JVM is warm, 0.6 to 1 ms in its first
 * tasks (measured on Spark 3.5.9, JDK 17, 2 loaded cores).
 *
 * <p>Contract:
 * <ul>
 *   <li>Zero cost for tasks that never used nativemem (no manager, nothing recorded); a figure that
 *       is 0 for the task shows nowhere (Spark drops zero updates from the UI and the event log).
 *   <li>The stage page's accumulator table shows each accumulator's value on the driver when the
 *       stage's last task ended: for a sum that includes earlier stages of the application (as for
 *       every named accumulator of Spark), for {@value #PEAK} the largest task peak so far; the
 *       task table and the REST API's {@code tasks} show each task's own value.
 *   <li>Off with {@code spark.nativemem.metrics.enabled=false} ({@link NativeMemorySparkConf#METRICS_ENABLED}):
 *       the driver plugin registers no accumulators and a task's close records nothing (no
 *       accumulators, no native spills in Spill (Memory) or Spill (Disk)); an engine's own
 *       {@link #addDiskBytesSpilled} calls still count. {@code scripts/bench.sh metrics} measures
 *       on against off.
 *   <li>Never throws into a task: without the driver plugin, with accumulators from another
 *       nativemem version or garbled ones, or off the task thread, the accumulators are skipped
 *       (logged once); the spill metric is still counted.
 * </ul>
 */
public final class NativeTaskMetrics {
    private static final Logger LOG = LoggerFactory.getLogger(NativeTaskMetrics.class);

    /** Native peak of the task's manager, bytes (merged by max). */
    public static final String PEAK = "nativemem.peakBytes";
    /** Bytes the task's native spillers freed. */
    public static final String SPILLED = "nativemem.spilledBytes";
    /** Native spills that freed memory. */
    public static final String SPILLS = "nativemem.spillCount";
    /** Bytes handed back to Spark on Spark's request. */
    public static final String RELEASED = "nativemem.releasedToSparkBytes";
    /** Highest over-committed bytes of forced grows (merged by max). */
    public static final String OVERCOMMIT_PEAK = "nativemem.overcommitPeakBytes";
    /** Native bytes still in use when the task ended. */
    public static final String LEAKED = "nativemem.leakedAtCloseBytes";
    /** Bytes the executor's other tasks handed back to Spark for this task's short grows (arbitration). */
    public static final String ARBITRATED = "nativemem.arbitratedBytes";
    /** Requests to Spark the container governor refused under hard pressure. */
    public static final String GATE_REFUSALS = "nativemem.containerRefusals";

    /** The accumulators' names, in the order of the table above. */
    public static final List<String> ACCUMULATOR_NAMES = Collections.unmodifiableList(
            Arrays.asList(PEAK, SPILLED, SPILLS, RELEASED, OVERCOMMIT_PEAK, LEAKED, ARBITRATED, GATE_REFUSALS));

    /** The driver plugin's {@code extraConf} key of the serialized accumulators. */
    static final String CONF_KEY = "nativemem.accumulators";

    /** The accumulators registered by this JVM's driver plugin (strong references), by name. */
    private static volatile Map<String, AccumulatorV2<?, ?>> onDriver = Collections.emptyMap();

    /** The accumulators as the driver sent them (executor side), and their names; empty until {@link #install}. */
    private static volatile byte[] shipped;
    private static volatile List<String> shippedNames = Collections.emptyList();
    private static volatile boolean warned;
    /** Calls of {@link #recordAtClose} in this JVM and the CPU time they took (their cost). */
    private static final AtomicLong RECORDS = new AtomicLong();
    private static final AtomicLong RECORD_NANOS = new AtomicLong();
    private static final ThreadMXBean THREADS = ManagementFactory.getThreadMXBean();

    private NativeTaskMetrics() {
    }

    /**
     * Driver: registers the accumulators with {@code sc} and returns them serialized, as the entry
     * for the executor plugins' {@code extraConf}.
     *
     * @param sc the application's context
     * @return {@value #CONF_KEY} to the base64 of one Java serialization stream: the number of
     *     accumulators, then each one's name ({@code writeUTF}) and the accumulator (about 1.4 KB;
     *     Spark carries it to executors in the application's conf, as
     *     {@code spark.plugins.internal.conf.org.nativemem.spark.NativeMemoryPlugin.nativemem.accumulators},
     *     so it also shows among the Spark properties of the Environment page)
     */
    static Map<String, String> registerOnDriver(SparkContext sc) {
        Map<String, AccumulatorV2<?, ?>> registered = new LinkedHashMap<>();
        ByteArrayOutputStream bytes = new ByteArrayOutputStream();
        try (ObjectOutputStream out = new ObjectOutputStream(bytes)) {
            out.writeInt(ACCUMULATOR_NAMES.size());
            for (String name : ACCUMULATOR_NAMES) {
                AccumulatorV2<?, ?> acc = isMax(name) ? new MaxLongAccumulator() : new LongAccumulator();
                acc.register(sc, Option.apply(name), true);
                registered.put(name, acc);
                out.writeUTF(name);
                out.writeObject(acc);
            }
        } catch (IOException e) {
            throw new IllegalStateException("nativemem: cannot serialize the task accumulators", e);
        }
        // Spark's registry holds accumulators weakly: without this reference they are collected and
        // the driver drops the tasks' updates ("non-existent accumulator").
        onDriver = Collections.unmodifiableMap(registered);
        return Collections.singletonMap(CONF_KEY, Base64.getEncoder().encodeToString(bytes.toByteArray()));
    }

    private static boolean isMax(String name) {
        return PEAK.equals(name) || OVERCOMMIT_PEAK.equals(name);
    }

    /**
     * Executor: keeps the accumulators the driver plugin sent. What is not valid base64, does not
     * deserialize here or holds anything but accumulators of ours is dropped as a whole (logged):
     * the tasks then report no accumulators. Names this version does not know (a newer driver) are
     * kept and get no value. Must run outside a task (the executor plugin's init): the stream is
     * read once to check it, which also loads the classes before the first task's close.
     *
     * @param extraConf the executor plugin's {@code extraConf}; null or without {@value #CONF_KEY}:
     *     no accumulators
     */
    static void install(Map<String, String> extraConf) {
        shipped = null;
        shippedNames = Collections.emptyList();
        String v = extraConf == null ? null : extraConf.get(CONF_KEY);
        if (v == null) {
            LOG.debug("nativemem: no task accumulators from the driver (a driver without the plugin?)");
            return;
        }
        byte[] bytes;
        List<String> names = new ArrayList<>();
        try {
            bytes = Base64.getDecoder().decode(v);
            for (Map.Entry<String, Object> e : read(bytes).entrySet()) {
                Object acc = e.getValue();
                if (!(acc instanceof LongAccumulator || acc instanceof MaxLongAccumulator)) {
                    throw new IOException("accumulator " + e.getKey() + " is a " + acc.getClass().getName());
                }
                names.add(e.getKey());
            }
        } catch (IOException | ClassNotFoundException | RuntimeException | LinkageError e) {
            LOG.warn("nativemem: the task accumulators the driver sent cannot be read here; tasks report none: {}",
                    e.toString());
            return;
        }
        shippedNames = Collections.unmodifiableList(names);
        shipped = bytes;
        LOG.debug("nativemem: task accumulators from the driver: {}", names);
    }

    /**
     * The application's values so far, as the driver merged them from the tasks (for the driver's
     * summary and tests).
     *
     * @return name to value, in {@link #ACCUMULATOR_NAMES} order; empty outside a driver with the plugin
     */
    public static Map<String, Long> driverValues() {
        Map<String, Long> m = new LinkedHashMap<>();
        for (Map.Entry<String, AccumulatorV2<?, ?>> e : onDriver.entrySet()) {
            Object v = e.getValue().value();
            if (v instanceof Number) {
                m.put(e.getKey(), ((Number) v).longValue());
            }
        }
        return m;
    }

    /** @return the names of the accumulators this executor can update (for tests and diagnostics) */
    public static List<String> installedAccumulators() {
        return shippedNames;
    }

    /**
     * At a task's close (its completion listener, on the task thread): counts its native spills in
     * {@code memoryBytesSpilled} and updates the accumulators with its non-zero figures. Never
     * throws.
     *
     * @param ctx the task
     * @param before the manager's stats just before its close (null: closed by its user, only the
     *     leak and what went back to Spark are known)
     * @param releasedToSpark bytes the task's listener handed back on Spark's request
     * @param report the close report (null if none)
     */
    static void recordAtClose(TaskContext ctx, NativeMemoryStats before, long releasedToSpark,
            NativeCloseReport report) {
        long start = cpuNanos();
        try {
            if (before != null && before.spilledBytes() > 0) {
                ctx.taskMetrics().incMemoryBytesSpilled(before.spilledBytes());
            }
            if (before != null && before.spillWrittenBytes() > 0) {
                // What the engine's spills wrote, reported through the engine ABI
                // (manager_spill_written): Spill (Disk).
                ctx.taskMetrics().incDiskBytesSpilled(before.spillWrittenBytes());
            }
            Map<String, Long> values = new LinkedHashMap<>();
            if (before != null) {
                values.put(PEAK, before.peakBytes());
                values.put(SPILLED, before.spilledBytes());
                values.put(SPILLS, before.spillCount());
                values.put(OVERCOMMIT_PEAK, before.overcommitPeakBytes());
                values.put(ARBITRATED, before.arbitratedBytes());
                values.put(GATE_REFUSALS, before.gateRefusals());
            }
            values.put(RELEASED, releasedToSpark);
            values.put(LEAKED, report == null ? 0 : report.leakedBytes());
            update(ctx, values);
        } catch (RuntimeException | LinkageError e) {
            warnOnce("cannot record the task's native figures in Spark's task metrics", e);
        } finally {
            RECORD_NANOS.addAndGet(cpuNanos() - start);
            RECORDS.incrementAndGet();
        }
    }

    /** The calling thread's CPU time (Spark's {@code executorCpuTime} is measured the same way). */
    private static long cpuNanos() {
        try {
            return THREADS.isCurrentThreadCpuTimeSupported() ? THREADS.getCurrentThreadCpuTime() : System.nanoTime();
        } catch (UnsupportedOperationException e) {
            return System.nanoTime();
        }
    }

    /**
     * What recording cost in this JVM so far: tasks recorded at close (only tasks that used
     * nativemem) and the CPU time spent doing it (spill metric and accumulators; wall time where
     * the JVM cannot measure a thread's CPU time).
     *
     * @return {tasks, nanoseconds}
     */
    public static long[] recordCost() {
        return new long[] {RECORDS.get(), RECORD_NANOS.get()};
    }

    /**
     * Counts {@code bytes} an engine wrote to disk while spilling in the task's Spill (Disk)
     * ({@code diskBytesSpilled}). Call it on the task's thread (Spark's task metrics are not
     * thread-safe), once per spill or once at the end with the total; it never throws.
     *
     * <pre>{@code
     * sorter.close();
     * NativeTaskMetrics.addDiskBytesSpilled(TaskContext.get(), sorterStats.bytesSpilled());
     * }</pre>
     *
     * @param ctx the running task ({@code TaskContext.get()})
     * @param bytes bytes written to spill files
     * @return true if counted; false if {@code bytes <= 0}, {@code ctx} is null or completed, or this
     *     Spark does not accept it (logged once)
     */
    public static boolean addDiskBytesSpilled(TaskContext ctx, long bytes) {
        if (ctx == null || bytes <= 0) {
            return false;
        }
        try {
            if (ctx.isCompleted()) {
                return false;
            }
            ctx.taskMetrics().incDiskBytesSpilled(bytes);
            return true;
        } catch (RuntimeException | LinkageError e) {
            warnOnce("cannot count the task's disk spill in Spark's task metrics", e);
            return false;
        }
    }

    /**
     * Adds the non-zero {@code values} to copies of the shipped accumulators, registered with
     * {@code ctx} as they are read (all of them, the others with a zero value, which Spark shows
     * nowhere). Nothing is read when every value is 0.
     *
     * @return the number of accumulators that got a value
     */
    static int update(TaskContext ctx, Map<String, Long> values) {
        byte[] bytes = shipped;
        if (bytes == null) {
            return 0; // no driver plugin (or an old one): nothing to report to
        }
        boolean any = false;
        for (long v : values.values()) {
            any |= v != 0;
        }
        if (!any) {
            return 0;
        }
        if (TaskContext.get() != ctx) {
            // Spark registers a deserialized accumulator with the thread's task only.
            LOG.debug("nativemem: task accumulators skipped: the task's close runs off its thread");
            return 0;
        }
        Map<String, Object> accs;
        try {
            accs = read(bytes);
        } catch (IOException | ClassNotFoundException | RuntimeException | LinkageError e) {
            warnOnce("the driver's accumulators cannot be read here", e);
            return 0;
        }
        int updated = 0;
        for (Map.Entry<String, Object> e : accs.entrySet()) {
            Long v = values.get(e.getKey());
            if (v == null || v == 0) {
                continue;
            }
            Object acc = e.getValue();
            if (acc instanceof MaxLongAccumulator) {
                ((MaxLongAccumulator) acc).add(v.longValue());
            } else if (acc instanceof LongAccumulator) {
                ((LongAccumulator) acc).add(v.longValue());
            } else {
                continue;
            }
            updated++;
        }
        return updated;
    }

    /** Reads a stream of {@link #registerOnDriver}: name to accumulator, in stream order. */
    static Map<String, Object> read(byte[] bytes) throws IOException, ClassNotFoundException {
        final ClassLoader loader = NativeTaskMetrics.class.getClassLoader();
        try (ObjectInputStream in = new ObjectInputStream(new ByteArrayInputStream(bytes)) {
            @Override
            protected Class<?> resolveClass(ObjectStreamClass desc) throws IOException, ClassNotFoundException {
                try {
                    return Class.forName(desc.getName(), false, loader);
                } catch (ClassNotFoundException e) {
                    return super.resolveClass(desc);
                }
            }
        }) {
            int n = in.readInt();
            if (n < 0 || n > 1024) {
                throw new IOException("bad accumulator count " + n);
            }
            Map<String, Object> m = new LinkedHashMap<>();
            for (int i = 0; i < n; i++) {
                String name = in.readUTF();
                m.put(name, in.readObject());
            }
            return m;
        }
    }

    private static void warnOnce(String what, Throwable e) {
        if (!warned) {
            warned = true;
            LOG.warn("nativemem: {} (task accumulators may be missing; logged once): {}", what,
                    e == null ? "" : e.toString());
        }
    }

    /**
     * A {@code long} accumulator that keeps the largest value added or merged (a high-water mark,
     * not a sum): a task's value is its peak, the driver's the largest peak of all tasks. Zero is
     * "nothing seen" (peaks are never negative).
     */
    public static final class MaxLongAccumulator extends AccumulatorV2<Long, Long> {
        private static final long serialVersionUID = 1L;
        private long max;

        /** A zero accumulator. */
        public MaxLongAccumulator() {
        }

        @Override
        public boolean isZero() {
            return max == 0;
        }

        @Override
        public AccumulatorV2<Long, Long> copy() {
            MaxLongAccumulator c = new MaxLongAccumulator();
            c.max = max;
            return c;
        }

        @Override
        public void reset() {
            max = 0;
        }

        @Override
        public void add(Long v) {
            add(v.longValue());
        }

        /** Keeps {@code v} if it is larger than the value so far. */
        public void add(long v) {
            if (v > max) {
                max = v;
            }
        }

        @Override
        public void merge(AccumulatorV2<Long, Long> other) {
            if (!(other instanceof MaxLongAccumulator)) {
                throw new UnsupportedOperationException("cannot merge a " + getClass().getSimpleName() + " with a "
                        + other.getClass().getName());
            }
            add(((MaxLongAccumulator) other).max);
        }

        @Override
        public Long value() {
            return max;
        }
    }
}
