package org.nativemem.spark;

import java.util.Arrays;
import java.util.Collections;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.OptionalLong;
import java.util.TreeMap;

import org.apache.spark.SparkConf;
import org.apache.spark.network.util.JavaUtils;
import org.nativemem.Bytes;
import org.nativemem.ContainerGovernor;
import org.nativemem.NativeMemoryConfig;

import scala.Tuple2;

/**
 * The validated {@code spark.nativemem.*} settings of an application. Immutable.
 *
 * <table>
 *   <caption>Settings</caption>
 *   <tr><th>key</th><th>default</th><th>meaning</th></tr>
 *   <tr><td>{@value #RESERVATION_BLOCK_SIZE}</td><td>{@value #DEFAULT_RESERVATION_BLOCK_SIZE}</td>
 *       <td>bytes a task's native manager asks Spark for at a time (a Spark size string:
 *       {@code 8m}, {@code 64k}, {@code 1g}, plain numbers are bytes). Larger blocks mean fewer
 *       JVM calls and more memory held from Spark ahead of use.</td></tr>
 *   <tr><td>{@value #RESERVATION_QUANTUM}</td><td>{@value #DEFAULT_RESERVATION_QUANTUM}</td>
 *       <td>per-reservation slack of native operators ({@code 0}, opt-in: exact accounting).
 *       With a quantum, a native grow or shrink that fits in what its reservation
 *       already charged touches no shared counter; pools may then run ahead of what consumers
 *       hold by at most two quanta per live reservation (taken back before anything is refused
 *       or spilled, and when Spark asks for memory).</td></tr>
 *   <tr><td>{@value #TASK_LIMIT}</td><td>none</td>
 *       <td>upper bound on the native memory one task attempt may use, whatever Spark would
 *       grant; a request beyond it (after spilling) fails with
 *       {@link org.nativemem.NativeOutOfMemoryException}.</td></tr>
 *   <tr><td>{@value #ARROW_BLOCK_SIZE}</td><td>{@value #DEFAULT_ARROW_BLOCK_SIZE}</td>
 *       <td>bytes the task's Arrow allocator ({@link TaskArrowAllocator}) charges to the native
 *       manager at a time: Arrow buffers that fit in what is already charged make no JNI call.</td></tr>
 *   <tr><td>{@value #LOG_USAGE_ON_OOM}</td><td>{@code true}</td>
 *       <td>when a task fails with a native out-of-memory error, log the task's native usage
 *       report and the effective configuration.</td></tr>
 *   <tr><td>{@value #GOVERNOR_ENABLED}</td><td>{@code true}</td>
 *       <td>run the executor's container governor ({@link org.nativemem.ContainerGovernor}): read
 *       the container's memory limit and anonymous usage, give idle memory back and spill over the
 *       soft level, refuse new native memory over the hard level, before the kernel kills the
 *       executor.</td></tr>
 *   <tr><td>{@value #CONTAINER_LIMIT}</td><td>none</td>
 *       <td>a memory limit for the executor's container beside the one its cgroups set (e.g. where
 *       the cgroup is not visible); the smaller headroom binds.</td></tr>
 *   <tr><td>{@value #GOVERNOR_SOFT_LEVEL}, {@value #GOVERNOR_HARD_LEVEL}</td><td>0.85, 0.93</td>
 *       <td>the governor's levels, fractions of the container limit (0 &lt; soft &lt;= hard &lt;= 1).</td></tr>
 *   <tr><td>{@value #ARBITRATION_ENABLED}</td><td>{@code true}</td>
 *       <td>executor-wide arbitration ({@link org.nativemem.ExecutorArbiter}): when Spark grants a
 *       task's native grow less than it needs, the executor's other tasks hand their idle native
 *       memory (cushion and slack) back to Spark, and the grow asks again before it spills its own
 *       operators or fails.</td></tr>
 *   <tr><td>{@value #ARBITRATION_CROSS_TASK_SPILL}</td><td>{@code false}</td>
 *       <td>if that is not enough, the largest other task's native spillers spill for the
 *       requester (at most {@value #ARBITRATION_SPILL_CAP} per request, default
 *       {@value #DEFAULT_ARBITRATION_SPILL_CAP}; the log names the task that paid). Trade-off: a
 *       task that is not short pays with its own spill and disk I/O so another avoids spilling or
 *       failing; Spark itself never spills another task's consumers.</td></tr>
 *   <tr><td>{@value #METRICS_ENABLED}</td><td>{@code true}</td>
 *       <td>what nativemem shows in Spark's own figures ({@link NativeTaskMetrics}): native spills
 *       in the tasks' Spill columns, the {@code nativemem.*} task accumulators, the executors'
 *       memory reports to the driver (the driver gauges and the application's sizing answer,
 *       {@link ApplicationMemoryView}). {@code false} turns all of it off (the executors' own gauges
 *       stay): the "off" of {@code scripts/bench.sh metrics}.</td></tr>
 * </table>
 *
 * <p>Parsing is strict so a typo fails the application at start instead of being ignored: an
 * unknown key under {@value #PREFIX}, a malformed size, a size of 0 or a boolean other than
 * {@code true}/{@code false} is an {@link IllegalArgumentException} naming the key, the value
 * and what is expected. The driver plugin checks this when the {@code SparkContext} starts.
 */
public final class NativeMemorySparkConf {
    /** Prefix of every nativemem setting. */
    public static final String PREFIX = "spark.nativemem.";
    /** Reservation block size key. */
    public static final String RESERVATION_BLOCK_SIZE = "spark.nativemem.reservationBlockSize";
    /** Default of {@link #RESERVATION_BLOCK_SIZE}: 8 MiB. */
    public static final String DEFAULT_RESERVATION_BLOCK_SIZE = "8m";
    /** Reservation quantum key. */
    public static final String RESERVATION_QUANTUM = "spark.nativemem.reservationQuantum";
    /** Default of {@link #RESERVATION_QUANTUM}: 1 MiB, the fast path ({@code 0}: exact accounting, opt-in). */
    public static final String DEFAULT_RESERVATION_QUANTUM = "1m";
    /** Task limit key (no default: unlimited). */
    public static final String TASK_LIMIT = "spark.nativemem.taskLimit";
    /** Arrow block size key. */
    public static final String ARROW_BLOCK_SIZE = "spark.nativemem.arrowBlockSize";
    /** Default of {@link #ARROW_BLOCK_SIZE}: 8 MiB. */
    public static final String DEFAULT_ARROW_BLOCK_SIZE = "8m";
    /** Log-on-OOM key. */
    public static final String LOG_USAGE_ON_OOM = "spark.nativemem.logUsageOnOom";
    /** Default of {@link #LOG_USAGE_ON_OOM}. */
    public static final boolean DEFAULT_LOG_USAGE_ON_OOM = true;
    /** Container governor switch key. */
    public static final String GOVERNOR_ENABLED = "spark.nativemem.governor.enabled";
    /** Configured container limit key (no default: the cgroups' limits only). */
    public static final String CONTAINER_LIMIT = "spark.nativemem.containerLimit";
    /** Governor soft level key. */
    public static final String GOVERNOR_SOFT_LEVEL = "spark.nativemem.governor.softLevel";
    /** Governor hard level key. */
    public static final String GOVERNOR_HARD_LEVEL = "spark.nativemem.governor.hardLevel";
    /** Executor-wide arbitration switch key. */
    public static final String ARBITRATION_ENABLED = "spark.nativemem.arbitration.enabled";
    /** Cross-task spill switch key (default off). */
    public static final String ARBITRATION_CROSS_TASK_SPILL = "spark.nativemem.arbitration.crossTaskSpill";
    /** Cross-task spill cap key: most bytes one request makes another task spill. */
    public static final String ARBITRATION_SPILL_CAP = "spark.nativemem.arbitration.crossTaskSpillCap";
    /** Default of {@link #ARBITRATION_SPILL_CAP}: 64 MiB. */
    public static final String DEFAULT_ARBITRATION_SPILL_CAP = "64m";
    /** Task metrics, accumulators and memory reports to the driver on (default) or off. */
    public static final String METRICS_ENABLED = "spark.nativemem.metrics.enabled";
    /** Spark's switch for off-heap execution memory; decides the consumer's memory mode. */
    public static final String SPARK_OFF_HEAP_ENABLED = "spark.memory.offHeap.enabled";

    /** Every key this class knows, sorted. */
    public static final List<String> KEYS = Collections.unmodifiableList(
            Arrays.asList(ARBITRATION_CROSS_TASK_SPILL, ARBITRATION_SPILL_CAP, ARBITRATION_ENABLED,
                    ARROW_BLOCK_SIZE, CONTAINER_LIMIT, GOVERNOR_ENABLED, GOVERNOR_HARD_LEVEL,
                    GOVERNOR_SOFT_LEVEL, LOG_USAGE_ON_OOM, METRICS_ENABLED, RESERVATION_BLOCK_SIZE, RESERVATION_QUANTUM, TASK_LIMIT));

    private static final NativeMemorySparkConf DEFAULTS = parse(Collections.<String, String>emptyMap());

    private final long reservationBlockSizeBytes;
    /** -1: none. */
    private final long taskLimitBytes;
    private final boolean logUsageOnOom;
    private final boolean offHeapEnabled;
    private final long arrowBlockSizeBytes;
    private final long reservationQuantumBytes;
    private final NativeMemoryConfig nativeConfig;
    private final Governor governor;
    private final Arbitration arbitration;
    private final boolean metricsEnabled;

    /** Executor-wide arbitration's settings. Immutable. */
    public static final class Arbitration {
        private final boolean enabled;
        private final boolean crossTaskSpill;
        private final long spillCapBytes;

        Arbitration(boolean enabled, boolean crossTaskSpill, long spillCapBytes) {
            this.enabled = enabled;
            this.crossTaskSpill = crossTaskSpill;
            this.spillCapBytes = spillCapBytes;
        }

        /** @return whether other tasks hand idle memory back on a short grant */
        public boolean enabled() {
            return enabled;
        }

        /** @return whether the largest other task spills for a short task */
        public boolean crossTaskSpill() {
            return crossTaskSpill;
        }

        /** @return the most bytes a cross-task spill frees per request */
        public long spillCapBytes() {
            return spillCapBytes;
        }

        @Override
        public String toString() {
            return ARBITRATION_ENABLED + "=" + enabled + ", " + ARBITRATION_CROSS_TASK_SPILL + "=" + crossTaskSpill
                    + ", " + ARBITRATION_SPILL_CAP + "=" + Bytes.human(spillCapBytes);
        }
    }

    /** The container governor's settings. Immutable. */
    public static final class Governor {
        private final boolean enabled;
        /** 0: none. */
        private final long containerLimitBytes;
        private final double softLevel;
        private final double hardLevel;

        Governor(boolean enabled, long containerLimitBytes, double softLevel, double hardLevel) {
            this.enabled = enabled;
            this.containerLimitBytes = containerLimitBytes;
            this.softLevel = softLevel;
            this.hardLevel = hardLevel;
        }

        /** @return whether the executor runs the container governor */
        public boolean enabled() {
            return enabled;
        }

        /** @return the configured container limit in bytes, 0 for none */
        public long containerLimitBytes() {
            return containerLimitBytes;
        }

        /** @return the soft level, a fraction of the container limit */
        public double softLevel() {
            return softLevel;
        }

        /** @return the hard level, a fraction of the container limit */
        public double hardLevel() {
            return hardLevel;
        }

        @Override
        public String toString() {
            return GOVERNOR_ENABLED + "=" + enabled + ", " + CONTAINER_LIMIT + "="
                    + (containerLimitBytes == 0 ? "none" : Bytes.human(containerLimitBytes)) + ", "
                    + GOVERNOR_SOFT_LEVEL + "=" + softLevel + ", " + GOVERNOR_HARD_LEVEL + "=" + hardLevel;
        }
    }

    private NativeMemorySparkConf(long reservationBlockSizeBytes, long taskLimitBytes, boolean logUsageOnOom,
            boolean offHeapEnabled, long arrowBlockSizeBytes, long reservationQuantumBytes, Governor governor,
            Arbitration arbitration, boolean metricsEnabled) {
        this.metricsEnabled = metricsEnabled;
        this.governor = governor;
        this.arbitration = arbitration;
        this.reservationBlockSizeBytes = reservationBlockSizeBytes;
        this.reservationQuantumBytes = reservationQuantumBytes;
        this.arrowBlockSizeBytes = arrowBlockSizeBytes;
        this.taskLimitBytes = taskLimitBytes;
        this.logUsageOnOom = logUsageOnOom;
        this.offHeapEnabled = offHeapEnabled;
        NativeMemoryConfig c = NativeMemoryConfig.defaults().withReservationBlockSize(reservationBlockSizeBytes)
                .withReservationQuantum(reservationQuantumBytes);
        this.nativeConfig = taskLimitBytes < 0 ? c : c.withTaskLimit(taskLimitBytes);
    }

    /** @return the settings when nothing is configured */
    public static NativeMemorySparkConf defaults() {
        return DEFAULTS;
    }

    /**
     * Reads and validates the settings of {@code conf}.
     *
     * @param conf the application's configuration
     * @return the settings
     * @throws IllegalArgumentException if a {@code spark.nativemem.*} setting is unknown or invalid
     */
    public static NativeMemorySparkConf fromSparkConf(SparkConf conf) {
        Map<String, String> settings = new TreeMap<>();
        for (Tuple2<String, String> kv : conf.getAll()) {
            String key = kv._1();
            if (key.startsWith(PREFIX) || key.equals(SPARK_OFF_HEAP_ENABLED)) {
                settings.put(key, kv._2());
            }
        }
        return parse(settings);
    }

    /**
     * Validates settings given as a map (keys that do not start with {@value #PREFIX} are
     * ignored, except {@value #SPARK_OFF_HEAP_ENABLED}).
     *
     * @param settings configuration keys and values
     * @return the settings
     * @throws IllegalArgumentException if a {@code spark.nativemem.*} setting is unknown or invalid
     */
    public static NativeMemorySparkConf parse(Map<String, String> settings) {
        for (String key : new TreeMap<>(settings).keySet()) {
            if (key.startsWith(PREFIX) && !KEYS.contains(key)) {
                throw new IllegalArgumentException("nativemem: unknown setting " + key + "=" + settings.get(key)
                        + "; the settings are " + String.join(", ", KEYS));
            }
        }
        long block = size(settings, RESERVATION_BLOCK_SIZE, DEFAULT_RESERVATION_BLOCK_SIZE);
        if (block > NativeMemoryConfig.MAX_RESERVATION_BLOCK_BYTES) {
            throw invalid(RESERVATION_BLOCK_SIZE, settings.get(RESERVATION_BLOCK_SIZE),
                    "at most " + NativeMemoryConfig.MAX_RESERVATION_BLOCK_BYTES + " bytes");
        }
        long quantum = rawSize(settings, RESERVATION_QUANTUM, DEFAULT_RESERVATION_QUANTUM);
        if (quantum < 0) {
            throw invalid(RESERVATION_QUANTUM, settings.get(RESERVATION_QUANTUM), "a size of 0 or more");
        }
        if (quantum > NativeMemoryConfig.MAX_RESERVATION_QUANTUM_BYTES) {
            throw invalid(RESERVATION_QUANTUM, settings.get(RESERVATION_QUANTUM),
                    "at most " + NativeMemoryConfig.MAX_RESERVATION_QUANTUM_BYTES + " bytes");
        }
        long limit = settings.get(TASK_LIMIT) == null ? -1 : size(settings, TASK_LIMIT, null);
        boolean log = bool(settings, LOG_USAGE_ON_OOM, DEFAULT_LOG_USAGE_ON_OOM);
        long arrowBlock = size(settings, ARROW_BLOCK_SIZE, DEFAULT_ARROW_BLOCK_SIZE);
        // Spark itself validates its own key; an unparsable value is left for Spark to report.
        String offHeap = settings.get(SPARK_OFF_HEAP_ENABLED);
        boolean offHeapEnabled = offHeap != null && offHeap.trim().equalsIgnoreCase("true");
        boolean governorOn = bool(settings, GOVERNOR_ENABLED, true);
        long containerLimit = settings.get(CONTAINER_LIMIT) == null ? 0 : size(settings, CONTAINER_LIMIT, null);
        double soft = fraction(settings, GOVERNOR_SOFT_LEVEL, ContainerGovernor.DEFAULT_SOFT_LEVEL);
        double hard = fraction(settings, GOVERNOR_HARD_LEVEL, ContainerGovernor.DEFAULT_HARD_LEVEL);
        if (hard < soft) {
            throw invalid(GOVERNOR_HARD_LEVEL, String.valueOf(hard), "a level at or above " + GOVERNOR_SOFT_LEVEL
                    + "=" + soft);
        }
        Arbitration arbitration = new Arbitration(bool(settings, ARBITRATION_ENABLED, true),
                bool(settings, ARBITRATION_CROSS_TASK_SPILL, false),
                size(settings, ARBITRATION_SPILL_CAP, DEFAULT_ARBITRATION_SPILL_CAP));
        return new NativeMemorySparkConf(block, limit, log, offHeapEnabled, arrowBlock, quantum,
                new Governor(governorOn, containerLimit, soft, hard), arbitration,
                bool(settings, METRICS_ENABLED, true));
    }

    /** A fraction in (0, 1]. */
    private static double fraction(Map<String, String> settings, String key, double dflt) {
        String value = settings.get(key);
        if (value == null) {
            return dflt;
        }
        double v;
        try {
            v = Double.parseDouble(value.trim());
        } catch (NumberFormatException e) {
            throw invalid(key, value, "a fraction of the container limit such as 0.85");
        }
        if (!(v > 0 && v <= 1)) {
            throw invalid(key, value, "a fraction in (0, 1]");
        }
        return v;
    }

    private static long size(Map<String, String> settings, String key, String dflt) {
        long bytes = rawSize(settings, key, dflt);
        if (bytes <= 0) {
            throw invalid(key, settings.get(key) == null ? dflt : settings.get(key), "a size greater than 0");
        }
        return bytes;
    }

    /** The size {@code key} is set to (or {@code dflt}), as parsed: possibly 0 or negative. */
    private static long rawSize(Map<String, String> settings, String key, String dflt) {
        String value = settings.get(key);
        if (value == null) {
            value = dflt;
        }
        long bytes;
        try {
            bytes = JavaUtils.byteStringAsBytes(value);
        } catch (RuntimeException e) {
            throw invalid(key, value, "a size such as 8m, 64k, 1g or a number of bytes (" + e.getMessage() + ")");
        }
        return bytes;
    }

    private static boolean bool(Map<String, String> settings, String key, boolean dflt) {
        String value = settings.get(key);
        if (value == null) {
            return dflt;
        }
        String v = value.trim().toLowerCase(Locale.ROOT);
        if (v.equals("true")) {
            return true;
        }
        if (v.equals("false")) {
            return false;
        }
        throw invalid(key, value, "true or false");
    }

    private static IllegalArgumentException invalid(String key, String value, String expected) {
        return new IllegalArgumentException("nativemem: invalid " + key + "='" + value + "': expected " + expected);
    }

    /** @return bytes a task's manager asks Spark for at a time */
    public long reservationBlockSizeBytes() {
        return reservationBlockSizeBytes;
    }

    /** @return the per-reservation slack of native operators in bytes (0: exact accounting) */
    public long reservationQuantumBytes() {
        return reservationQuantumBytes;
    }

    /** @return bytes the task's Arrow allocator charges to the native manager at a time */
    public long arrowBlockSizeBytes() {
        return arrowBlockSizeBytes;
    }

    /** @return the per-task native limit in bytes, or empty for none */
    public OptionalLong taskLimitBytes() {
        return taskLimitBytes < 0 ? OptionalLong.empty() : OptionalLong.of(taskLimitBytes);
    }

    /** @return whether a native out-of-memory task failure logs the usage report */
    public boolean logUsageOnOom() {
        return logUsageOnOom;
    }

    /** @return whether {@value #SPARK_OFF_HEAP_ENABLED} is {@code true} (the consumer is OFF_HEAP then) */
    public boolean offHeapEnabled() {
        return offHeapEnabled;
    }

    /** @return the container governor's settings */
    public Governor governor() {
        return governor;
    }

    /** @return executor-wide arbitration's settings */
    public Arbitration arbitration() {
        return arbitration;
    }

    /**
     * @return whether tasks record their native figures in Spark's task metrics and accumulators
     *     and executors report their memory to the driver ({@value #METRICS_ENABLED})
     */
    public boolean metricsEnabled() {
        return metricsEnabled;
    }

    /** @return the native manager configuration these settings describe */
    public NativeMemoryConfig toNativeConfig() {
        return nativeConfig;
    }

    /** @return the effective settings, one {@code key=value} each, sizes in human units */
    @Override
    public String toString() {
        return RESERVATION_BLOCK_SIZE + "=" + Bytes.human(reservationBlockSizeBytes) + ", " + TASK_LIMIT + "="
                + (taskLimitBytes < 0 ? "none" : Bytes.human(taskLimitBytes)) + ", " + LOG_USAGE_ON_OOM + "="
                + logUsageOnOom + ", " + ARROW_BLOCK_SIZE + "=" + Bytes.human(arrowBlockSizeBytes) + ", "
                + SPARK_OFF_HEAP_ENABLED + "=" + offHeapEnabled + ", " + RESERVATION_QUANTUM + "="
                + Bytes.human(reservationQuantumBytes) + ", " + governor + ", " + arbitration + ", " + METRICS_ENABLED + "="
                + metricsEnabled;
    }
}
