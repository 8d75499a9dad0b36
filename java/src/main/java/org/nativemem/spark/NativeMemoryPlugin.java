package org.nativemem.spark;

import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.function.ToLongFunction;

import org.apache.spark.SparkContext;
import org.apache.spark.api.plugin.DriverPlugin;
import org.apache.spark.api.plugin.ExecutorPlugin;
import org.apache.spark.api.plugin.PluginContext;
import org.apache.spark.api.plugin.SparkPlugin;
import org.nativemem.NativeLibraryLoader;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

import com.codahale.metrics.Gauge;
import com.codahale.metrics.Metric;
import com.codahale.metrics.MetricRegistry;

/**
 * The nativemem Spark plugin. Enable it with
 * {@code --jars nativemem.jar --conf spark.plugins=org.nativemem.spark.NativeMemoryPlugin}.
 *
 * <h2>Driver</h2>
 * Validates the {@code spark.nativemem.*} settings ({@link NativeMemorySparkConf}) when the
 * {@code SparkContext} starts: an unknown key or a bad value fails the application at once with a
 * message naming the key, instead of failing (or being ignored) in every task.
 *
 * <h2>Executor</h2>
 * At executor start: validates the settings again, loads the native library (an executor that
 * cannot load it fails to start, with the platform and the cause in the message, rather than
 * failing each task later) and registers these gauges in the plugin's metric registry. Spark
 * publishes them through its metrics system as
 * {@code <app>.<executor>.plugin.org.nativemem.spark.NativeMemoryPlugin.<name>}:
 *
 * <table>
 *   <caption>Executor metrics (see {@link ExecutorNativeMemoryStats})</caption>
 *   <tr><th>name</th><th>value</th></tr>
 *   <tr><td>{@code liveManagers}</td><td>task managers open now</td></tr>
 *   <tr><td>{@code usedBytes}</td><td>native bytes in use by running tasks</td></tr>
 *   <tr><td>{@code reservedBytes}</td><td>bytes running tasks reserved from Spark</td></tr>
 *   <tr><td>{@code peakBytes}</td><td>largest native peak of any task on this executor</td></tr>
 *   <tr><td>{@code spillCount}, {@code spilledBytes}</td><td>native spills and the bytes they freed</td></tr>
 *   <tr><td>{@code sparkSpillRequests}, {@code sparkSpilledBytes}</td><td>Spark's requests for memory
 *       back and the bytes given back</td></tr>
 *   <tr><td>{@code managersCreated}, {@code managersClosed}</td><td>task managers so far</td></tr>
 *   <tr><td>{@code reclaimedAtCloseBytes}</td><td>native bytes still in use when their task ended</td></tr>
 *   <tr><td>{@code unreturnedBytes}, {@code closeFailures}</td><td>should stay 0</td></tr>
 *   <tr><td>{@code oomFailures}</td><td>tasks failed by native out-of-memory</td></tr>
 *   <tr><td>{@code arrowAllocators}, {@code arrowAllocatedBytes}</td><td>running tasks' Arrow
 *       allocators ({@link TaskArrowAllocator}) and the bytes Arrow counts in them (also inside
 *       {@code usedBytes}, pool {@code arrow}, rounded up to blocks)</td></tr>
 *   <tr><td>{@code arrowReclaimedAtCloseBytes}</td><td>Arrow bytes still open when their task ended</td></tr>
 * </table>
 *
 * <p>The plugin is optional for {@link TaskNativeMemory} to work (the library then loads at the
 * first task that uses it), but without it there is no early check and no metrics.
 */
public final class NativeMemoryPlugin implements SparkPlugin {
    private static final Logger LOG = LoggerFactory.getLogger(NativeMemoryPlugin.class);

    /** The gauges the executor plugin registers: name to the stat it reads. */
    private static final Map<String, ToLongFunction<ExecutorNativeMemoryStats>> METRICS = metrics();

    /** Names of the gauges registered by the executor plugin, in registration order. */
    public static final List<String> METRIC_NAMES =
            Collections.unmodifiableList(new ArrayList<>(METRICS.keySet()));

    private static Map<String, ToLongFunction<ExecutorNativeMemoryStats>> metrics() {
        Map<String, ToLongFunction<ExecutorNativeMemoryStats>> m = new LinkedHashMap<>();
        m.put("liveManagers", ExecutorNativeMemoryStats::liveManagers);
        m.put("usedBytes", ExecutorNativeMemoryStats::usedBytes);
        m.put("reservedBytes", ExecutorNativeMemoryStats::reservedBytes);
        m.put("peakBytes", ExecutorNativeMemoryStats::peakBytes);
        m.put("spillCount", ExecutorNativeMemoryStats::spillCount);
        m.put("spilledBytes", ExecutorNativeMemoryStats::spilledBytes);
        m.put("sparkSpillRequests", ExecutorNativeMemoryStats::sparkSpillRequests);
        m.put("sparkSpilledBytes", ExecutorNativeMemoryStats::sparkSpilledBytes);
        m.put("managersCreated", ExecutorNativeMemoryStats::managersCreated);
        m.put("managersClosed", ExecutorNativeMemoryStats::managersClosed);
        m.put("reclaimedAtCloseBytes", ExecutorNativeMemoryStats::reclaimedAtCloseBytes);
        m.put("unreturnedBytes", ExecutorNativeMemoryStats::unreturnedBytes);
        m.put("closeFailures", ExecutorNativeMemoryStats::closeFailures);
        m.put("oomFailures", ExecutorNativeMemoryStats::oomFailures);
        m.put("arrowAllocators", ExecutorNativeMemoryStats::arrowAllocators);
        m.put("arrowAllocatedBytes", ExecutorNativeMemoryStats::arrowAllocatedBytes);
        m.put("arrowReclaimedAtCloseBytes", ExecutorNativeMemoryStats::arrowReclaimedAtCloseBytes);
        return Collections.unmodifiableMap(m);
    }

    /** The registry the executor plugin of this JVM registered its gauges in (null before init). */
    private static volatile MetricRegistry executorRegistry;
    private static volatile String executorId;

    /** Called by Spark through {@code spark.plugins}. */
    public NativeMemoryPlugin() {
    }

    @Override
    public DriverPlugin driverPlugin() {
        return new Driver();
    }

    @Override
    public ExecutorPlugin executorPlugin() {
        return new Executor();
    }

    /**
     * Reads the executor plugin's gauges back from the registry they were registered in — the
     * values Spark's metrics system publishes. For tests and diagnostics.
     *
     * @return gauge name to value, in {@link #METRIC_NAMES} order; empty if the executor plugin has
     *     not been initialized in this JVM
     */
    public static Map<String, Long> executorMetrics() {
        MetricRegistry registry = executorRegistry;
        if (registry == null) {
            return Collections.emptyMap();
        }
        Map<String, Metric> metrics = registry.getMetrics();
        Map<String, Long> values = new LinkedHashMap<>();
        for (String name : METRIC_NAMES) {
            Metric metric = metrics.get(name);
            if (metric instanceof Gauge) {
                Object value = ((Gauge<?>) metric).getValue();
                values.put(name, value instanceof Number ? ((Number) value).longValue() : null);
            }
        }
        return values;
    }

    /** @return the id of the executor whose plugin initialized in this JVM, or null */
    public static String executorId() {
        return executorId;
    }

    /** Driver side: fail-fast validation of the settings. */
    private static final class Driver implements DriverPlugin {
        @Override
        public Map<String, String> init(SparkContext sc, PluginContext ctx) {
            NativeMemorySparkConf conf = NativeMemorySparkConf.fromSparkConf(sc.getConf());
            LOG.info("nativemem: driver plugin: {}", conf);
            if (!conf.offHeapEnabled()) {
                SparkReservationListener.warnOnHeapOnce();
            }
            return Collections.emptyMap();
        }
    }

    /** Executor side: library, settings, metrics. */
    private static final class Executor implements ExecutorPlugin {
        @Override
        public void init(PluginContext ctx, Map<String, String> extraConf) {
            NativeMemorySparkConf conf = NativeMemorySparkConf.fromSparkConf(ctx.conf());
            try {
                NativeLibraryLoader.load();
            } catch (UnsatisfiedLinkError e) {
                String platform;
                try {
                    platform = NativeLibraryLoader.platform();
                } catch (UnsatisfiedLinkError unsupported) {
                    platform = System.getProperty("os.name") + "/" + System.getProperty("os.arch");
                }
                throw new IllegalStateException("nativemem: executor " + ctx.executorID() + " on " + ctx.hostname()
                        + " (" + platform + ") cannot load the native library, so it cannot run native operators: "
                        + e.getMessage() + ". Use a nativemem.jar built for this platform, or point -D"
                        + NativeLibraryLoader.LIBRARY_PATH_PROPERTY
                        + "=<libnativemem_jni file> at one through spark.executor.extraJavaOptions.", e);
            }
            MetricRegistry registry = ctx.metricRegistry();
            registerGauges(registry);
            executorRegistry = registry;
            executorId = ctx.executorID();
            LOG.info("nativemem: executor {}: native library loaded from {}; {}", ctx.executorID(),
                    NativeLibraryLoader.loadedFrom(), conf);
        }

        @Override
        public void shutdown() {
            ExecutorNativeMemoryStats stats = TaskNativeMemory.executorStats();
            if (stats.liveManagers() > 0) {
                LOG.warn("nativemem: executor {} shutting down with {} task managers still open: {}", executorId,
                        stats.liveManagers(), stats);
            } else {
                LOG.info("nativemem: executor {} shutting down: {}", executorId, stats);
            }
        }
    }

    private static void registerGauges(MetricRegistry registry) {
        for (final Map.Entry<String, ToLongFunction<ExecutorNativeMemoryStats>> m : METRICS.entrySet()) {
            registry.register(m.getKey(), new Gauge<Long>() {
                @Override
                public Long getValue() {
                    return m.getValue().applyAsLong(TaskNativeMemory.executorStats());
                }
            });
        }
    }
}
