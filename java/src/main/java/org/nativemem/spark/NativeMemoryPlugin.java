package org.nativemem.spark;

import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.TimeUnit;
import java.util.function.ToLongFunction;

import org.apache.spark.SparkContext;
import org.apache.spark.api.plugin.DriverPlugin;
import org.apache.spark.api.plugin.ExecutorPlugin;
import org.apache.spark.api.plugin.PluginContext;
import org.apache.spark.api.plugin.SparkPlugin;
import org.nativemem.ContainerGovernor;
import org.nativemem.ExecutorArbiter;
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
 * Checks that this Spark has every member of its API that nativemem calls ({@link SparkApiCheck}:
 * a release that lacks one fails here, naming the Spark version and the members) and validates
 * the {@code spark.nativemem.*} settings ({@link NativeMemorySparkConf}) when the
 * {@code SparkContext} starts: an unknown key or a bad value fails the application at once with a
 * message naming the key, instead of failing (or being ignored) in every task.
 *
 * <p>It registers the task accumulators ({@link NativeTaskMetrics}: {@code nativemem.peakBytes},
 * spills, bytes back to Spark, leaks; on the stage page, in the REST API and the event log) and
 * ships them to the executor plugins. It receives each executor's {@link ExecutorMemoryReport}
 * (sent at most once per sample interval and at the executor's shutdown) and publishes the
 * application's gauges in the driver's metrics ({@link ApplicationMemoryView#GAUGE_NAMES}, e.g.
 * {@code maxExecutorRssPeakBytes}, {@code minContainerHeadroomBytes}; Spark's
 * {@code PrometheusServlet} on the driver shows them without any sink on executors). At the
 * application's end it logs one sizing answer for the application
 * ({@link ApplicationMemoryView#sizing()}): the largest of the executors' recommendations, naming
 * the executor that sets each; the same answer is on Spark's Environment page, live and in the
 * history server ({@link SizingPublisher}: the plugin's own shutdown comes after Spark stopped its
 * event bus, so a listener posts it at the application's end). With
 * {@code spark.nativemem.metrics.enabled=false} none of this (accumulators, reports, answer).
 *
 * <h2>Executor</h2>
 * At executor start: checks the Spark API again (executors may run another Spark build), validates
 * the settings again, loads the native library (an executor that
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
 * <p>And the process view ({@link ExecutorMemory}, sampled every second on a daemon thread and on
 * gauge reads, never more often), each with a {@code ...PeakBytes} twin (peak over the executor's
 * life), listed in {@link #PROCESS_METRIC_NAMES}: {@code processRssBytes} (the resident set the
 * container limit applies to), {@code jvmHeapUsedBytes}, {@code jvmHeapCommittedBytes},
 * {@code jvmDirectBytes}, {@code nativeTrackedBytes} (nativemem's accounted bytes) and
 * {@code untrackedNativeBytes} (rss - heap committed - direct - nativemem). At executor shutdown the
 * plugin logs a one-line recommendation for {@code spark.executor.memoryOverhead} and
 * {@code spark.memory.offHeap.size} from the peaks, with the arithmetic ({@link #recommendation()}
 * gives it on demand).
 *
 * <p>And the container governor's ({@link ContainerGovernor}, started at executor start unless
 * {@code spark.nativemem.governor.enabled=false}), listed in {@link #GOVERNOR_METRIC_NAMES}:
 * {@code containerLimitBytes} (the limit that binds; 0 without one), {@code containerAnonymousBytes},
 * {@code containerHeadroomBytes}, {@code governorPressure} (0 none, 1 soft, 2 hard),
 * {@code governorSoftEntries}, {@code governorHardEntries}, {@code governorGiveBackBytes},
 * {@code governorSpills}, {@code governorSpilledBytes}, {@code governorRefusedGrows},
 * {@code governorSamples} and {@code governorSampleNanos} (the cost of reading the container).
 * At shutdown a governor that saw pressure logs its last snapshots of the executor's native usage.
 *
 * <p>And executor-wide arbitration's ({@link ExecutorArbiter}, configured at executor start from
 * {@code spark.nativemem.arbitration.*}), listed in {@link #ARBITER_METRIC_NAMES}:
 * {@code arbitrationIdleBytes} (cushion + slack held by all task managers now),
 * {@code arbitrationShortGrants}, {@code arbitrationReclaims}, {@code arbitrationReclaimedBytes}
 * (idle memory other tasks handed back for a short task), {@code arbitrationSpills},
 * {@code arbitrationSpilledBytes} and {@code arbitrationVictims} (cross-task spills, opt-in).
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

    /** The process gauges (see {@link ExecutorMemory}): name to the value it reads. */
    private static final Map<String, ToLongFunction<ExecutorMemory>> PROCESS_METRICS = processGauges();

    /** Names of the process gauges registered by the executor plugin, in registration order. */
    public static final List<String> PROCESS_METRIC_NAMES =
            Collections.unmodifiableList(new ArrayList<>(PROCESS_METRICS.keySet()));

    private static Map<String, ToLongFunction<ExecutorMemory>> processGauges() {
        Map<String, ToLongFunction<ExecutorMemory>> m = new LinkedHashMap<>();
        m.put("processRssBytes", e -> e.sampleIfDue().rssBytes);
        m.put("jvmHeapUsedBytes", e -> e.sampleIfDue().heapUsedBytes);
        m.put("jvmHeapCommittedBytes", e -> e.sampleIfDue().heapCommittedBytes);
        m.put("jvmDirectBytes", e -> e.sampleIfDue().directBytes);
        m.put("nativeTrackedBytes", e -> e.sampleIfDue().nativeBytes);
        m.put("untrackedNativeBytes", e -> e.sampleIfDue().untrackedBytes);
        m.put("processRssPeakBytes", e -> e.peaks().rssBytes);
        m.put("jvmHeapUsedPeakBytes", e -> e.peaks().heapUsedBytes);
        m.put("jvmHeapCommittedPeakBytes", e -> e.peaks().heapCommittedBytes);
        m.put("jvmDirectPeakBytes", e -> e.peaks().directBytes);
        m.put("nativeTrackedPeakBytes", e -> e.peaks().nativeBytes);
        m.put("untrackedNativePeakBytes", e -> e.peaks().untrackedBytes);
        return Collections.unmodifiableMap(m);
    }

    /** The container governor's gauges: name to the value it reads from a status. */
    private static final Map<String, ToLongFunction<ContainerGovernor.Status>> GOVERNOR_METRICS = governorGauges();

    /** Names of the container governor's gauges, in registration order. */
    public static final List<String> GOVERNOR_METRIC_NAMES =
            Collections.unmodifiableList(new ArrayList<>(GOVERNOR_METRICS.keySet()));

    private static Map<String, ToLongFunction<ContainerGovernor.Status>> governorGauges() {
        Map<String, ToLongFunction<ContainerGovernor.Status>> m = new LinkedHashMap<>();
        m.put("containerLimitBytes", ContainerGovernor.Status::limitBytes);
        m.put("containerAnonymousBytes", ContainerGovernor.Status::anonymousBytes);
        m.put("containerHeadroomBytes", ContainerGovernor.Status::headroomBytes);
        m.put("governorPressure", ContainerGovernor.Status::pressure);
        m.put("governorSoftEntries", ContainerGovernor.Status::softEntries);
        m.put("governorHardEntries", ContainerGovernor.Status::hardEntries);
        m.put("governorGiveBackBytes", ContainerGovernor.Status::giveBackBytes);
        m.put("governorSpills", ContainerGovernor.Status::spills);
        m.put("governorSpilledBytes", ContainerGovernor.Status::spilledBytes);
        m.put("governorRefusedGrows", ContainerGovernor.Status::refusedGrows);
        m.put("governorSamples", ContainerGovernor.Status::samples);
        m.put("governorSampleNanos", ContainerGovernor.Status::sampleNanos);
        return Collections.unmodifiableMap(m);
    }

    /** Executor-wide arbitration's gauges: name to the value it reads from a status. */
    private static final Map<String, ToLongFunction<ExecutorArbiter.Status>> ARBITER_METRICS = arbiterGauges();

    /** Names of executor-wide arbitration's gauges, in registration order. */
    public static final List<String> ARBITER_METRIC_NAMES =
            Collections.unmodifiableList(new ArrayList<>(ARBITER_METRICS.keySet()));

    private static Map<String, ToLongFunction<ExecutorArbiter.Status>> arbiterGauges() {
        Map<String, ToLongFunction<ExecutorArbiter.Status>> m = new LinkedHashMap<>();
        m.put("arbitrationIdleBytes", ExecutorArbiter.Status::idleBytes);
        m.put("arbitrationShortGrants", ExecutorArbiter.Status::shortGrants);
        m.put("arbitrationReclaims", ExecutorArbiter.Status::reclaims);
        m.put("arbitrationReclaimedBytes", ExecutorArbiter.Status::reclaimedBytes);
        m.put("arbitrationSpills", ExecutorArbiter.Status::spills);
        m.put("arbitrationSpilledBytes", ExecutorArbiter.Status::spilledBytes);
        m.put("arbitrationVictims", ExecutorArbiter.Status::victims);
        return Collections.unmodifiableMap(m);
    }

    /** The executor's memory settings, for the recommendation (set at init). */
    private static volatile boolean offHeapEnabled;
    private static volatile long configuredOverheadBytes = -1;
    private static volatile long configuredOffHeapBytes;
    private static volatile ScheduledExecutorService sampler;

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

    /**
     * Reads the executor plugin's process gauges back from its registry.
     *
     * @return gauge name to value, in {@link #PROCESS_METRIC_NAMES} order; empty before init
     */
    public static Map<String, Long> processMetrics() {
        MetricRegistry registry = executorRegistry;
        if (registry == null) {
            return Collections.emptyMap();
        }
        Map<String, Metric> metrics = registry.getMetrics();
        Map<String, Long> values = new LinkedHashMap<>();
        for (String name : PROCESS_METRIC_NAMES) {
            Metric metric = metrics.get(name);
            if (metric instanceof Gauge) {
                Object value = ((Gauge<?>) metric).getValue();
                values.put(name, value instanceof Number ? ((Number) value).longValue() : null);
            }
        }
        return values;
    }

    /**
     * The sizing recommendation for this executor from what it observed so far (see
     * {@link ExecutorMemory}): one line, with the arithmetic. Logged by the executor plugin at
     * shutdown; callable at any time (outside an executor, with the defaults of the settings).
     *
     * @return e.g. {@code spark.executor.memoryOverhead=1229m (...), spark.memory.offHeap.size=564m (...)}
     */
    public static String recommendation() {
        return ExecutorMemory.get().recommendation(offHeapEnabled, configuredOverheadBytes, configuredOffHeapBytes);
    }

    /** @return the id of the executor whose plugin initialized in this JVM, or null */
    public static String executorId() {
        return executorId;
    }

    /** The view of the driver plugin of this JVM (null before its init). */
    private static volatile ApplicationMemoryView driverView;

    /**
     * The driver's view of the executors' memory: their last reports, the driver gauges and the
     * sizing answer ({@link ApplicationMemoryView}).
     *
     * @return the view of this JVM's driver plugin, or null if there is none
     */
    public static ApplicationMemoryView applicationMemory() {
        return driverView;
    }

    /**
     * Driver side: fail-fast validation of the settings, the task accumulators
     * ({@link NativeTaskMetrics}), the executors' memory reports and the driver gauges
     * ({@link ApplicationMemoryView}), and the application's sizing answer, logged at its end.
     */
    private static final class Driver implements DriverPlugin {
        private final ApplicationMemoryView view = new ApplicationMemoryView();
        private volatile String appName = "";
        /** Posts the sizing answer to Spark's Environment page (null if metrics are off). */
        private volatile SizingPublisher publisher;
        /** {@code spark.nativemem.metrics.enabled} (set at init). */
        private volatile boolean metricsOn = true;

        @Override
        public void registerMetrics(String appId, PluginContext ctx) {
            appName = appId;
            view.registerGauges(ctx.metricRegistry());
        }

        @Override
        public void shutdown() {
            if (!metricsOn) {
                return; // no reports were sent: there is no answer
            }
            try {
                LOG.info("nativemem: application {} memory recommendation: {}; task accumulators: {}", appName,
                        view.sizing(), NativeTaskMetrics.driverValues());
            } catch (RuntimeException e) {
                LOG.warn("nativemem: no application memory recommendation", e);
            }
        }

        @Override
        public Map<String, String> init(SparkContext sc, PluginContext ctx) {
            driverView = view;
            SparkApiCheck.verify();
            NativeMemorySparkConf conf = NativeMemorySparkConf.fromSparkConf(sc.getConf());
            LOG.info("nativemem: driver plugin: {}", conf);
            if (!conf.offHeapEnabled()) {
                SparkReservationListener.warnOnHeapOnce();
            }
            metricsOn = conf.metricsEnabled();
            if (!metricsOn) {
                LOG.info("nativemem: driver plugin: {}=false: no task accumulators, no memory reports, no sizing answer",
                        NativeMemorySparkConf.METRICS_ENABLED);
                return Collections.emptyMap();
            }
            // The sizing answer on Spark's Environment page (live and in the history server).
            try {
                SizingPublisher p = new SizingPublisher(e -> sc.listenerBus().post(e), view);
                sc.addSparkListener(p);
                publisher = p;
            } catch (RuntimeException | LinkageError e) {
                LOG.warn("nativemem: driver plugin: the sizing answer will be in the driver's log only: {}", e.toString());
            }
            // The task accumulators, registered here and shipped to every executor plugin.
            try {
                return NativeTaskMetrics.registerOnDriver(sc);
            } catch (RuntimeException | LinkageError e) {
                LOG.warn("nativemem: driver plugin: no task accumulators: {}", e.toString());
                return Collections.emptyMap();
            }
        }

        /** Container pressure reports from executors: logged, and kept for {@link #containerPressureReports()}. */
        @Override
        public Object receive(Object message) {
            if (view.accept(message)) {
                SizingPublisher p = publisher;
                if (p != null) {
                    try {
                        p.reportArrived();
                    } catch (RuntimeException | LinkageError e) {
                        LOG.debug("nativemem: sizing answer not updated", e);
                    }
                }
                return null;
            }
            if (message instanceof ContainerPressureReport) {
                ContainerPressureReport r = (ContainerPressureReport) message;
                LOG.warn("nativemem: executor {} reports container memory pressure ({}): {}", r.executorId(),
                        r.reason(), r.text());
                synchronized (REPORTS) {
                    if (REPORTS.size() == MAX_REPORTS) {
                        REPORTS.remove(0);
                    }
                    REPORTS.add(r);
                }
            }
            return null;
        }
    }

    /** The last reports the driver plugin of this JVM received, oldest first. */
    private static final List<ContainerPressureReport> REPORTS = new ArrayList<>();
    private static final int MAX_REPORTS = 32;

    /**
     * The container pressure reports this JVM's driver plugin received from executors (the last
     * {@value #MAX_REPORTS}), oldest first. For tests and diagnostics; each is also in the driver's log.
     *
     * @return a copy
     */
    public static List<ContainerPressureReport> containerPressureReports() {
        synchronized (REPORTS) {
            return new ArrayList<>(REPORTS);
        }
    }

    /** Executor side: library, settings, metrics. */
    private static final class Executor implements ExecutorPlugin {
        @Override
        public void init(PluginContext ctx, Map<String, String> extraConf) {
            SparkApiCheck.verify();
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
            NativeTaskMetrics.install(extraConf);
            reportsEnabled = conf.metricsEnabled();
            MetricRegistry registry = ctx.metricRegistry();
            registerGauges(registry);
            offHeapEnabled = ctx.conf().getBoolean("spark.memory.offHeap.enabled", false);
            configuredOffHeapBytes = ctx.conf().getSizeAsBytes("spark.memory.offHeap.size", "0");
            configuredOverheadBytes = ctx.conf().contains("spark.executor.memoryOverhead")
                    ? ctx.conf().getSizeAsMb("spark.executor.memoryOverhead", "0") << 20 : -1;
            startSampler();
            executorRegistry = registry;
            executorId = ctx.executorID();
            LOG.info("nativemem: executor {}: native library loaded from {}; {}", ctx.executorID(),
                    NativeLibraryLoader.loadedFrom(), conf);
            startGovernor(ctx.executorID(), conf.governor());
            pluginContext = ctx;
            installTerminationReport();
            NativeMemorySparkConf.Arbitration a = conf.arbitration();
            ExecutorArbiter.configure(a.enabled(), a.crossTaskSpill(), a.spillCapBytes());
        }

        @Override
        public void shutdown() {
            stopGovernor();
            ScheduledExecutorService s = sampler;
            sampler = null;
            if (s != null) {
                s.shutdownNow();
            }
            sendMemoryReport(true);
            try {
                ExecutorMemory.get().sample();
                LOG.info("nativemem: executor {} memory recommendation: {}", executorId, recommendation());
            } catch (RuntimeException e) {
                LOG.warn("nativemem: executor {}: no memory recommendation", executorId, e);
            }
            ExecutorNativeMemoryStats stats = TaskNativeMemory.executorStats();
            if (stats.liveManagers() > 0) {
                LOG.warn("nativemem: executor {} shutting down with {} task managers still open: {}", executorId,
                        stats.liveManagers(), stats);
            } else {
                LOG.info("nativemem: executor {} shutting down: {}", executorId, stats);
            }
        }
    }

    /** The last memory report sent to the driver (guarded by the class). */
    private static ExecutorMemoryReport lastMemoryReport;

    /**
     * Sends the driver this executor's {@link ExecutorMemoryReport} if its figures changed since the
     * last one (called once per sample interval by the sampler), or always when {@code last} (at
     * shutdown). Best effort: a failure is logged at debug level.
     */
    private static synchronized void sendMemoryReport(boolean last) {
        PluginContext ctx = pluginContext;
        if (ctx == null || !reportsEnabled) {
            return;
        }
        try {
            ExecutorMemoryReport r = ExecutorMemoryReport.take(executorId, last, offHeapEnabled,
                    configuredOverheadBytes, configuredOffHeapBytes);
            if (!r.differsFrom(lastMemoryReport)) {
                return;
            }
            ctx.send(r.toMessage());
            lastMemoryReport = r;
        } catch (Exception | LinkageError e) {
            LOG.debug("nativemem: executor {}: memory report to the driver failed", executorId, e);
        }
    }

    /** Whether memory reports go to the driver ({@code spark.nativemem.metrics.enabled}). */
    private static volatile boolean reportsEnabled = true;
    /** The executor plugin's context (null before init), to send reports to the driver. */
    private static volatile PluginContext pluginContext;
    /** Hard-pressure episodes already reported to the driver. */
    private static long reportedHardEntries;
    private static volatile boolean shutDown;

    /**
     * Called every second by the sampler: when the governor entered hard pressure since the last
     * report, sends the driver a {@link ContainerPressureReport} (logged there).
     */
    private static synchronized void reportHardPressure() {
        ContainerGovernor.Status s = ContainerGovernor.status();
        if (!s.running() || s.hardEntries() <= reportedHardEntries) {
            return;
        }
        reportedHardEntries = s.hardEntries();
        send("hard pressure", s);
    }

    private static void send(String reason, ContainerGovernor.Status s) {
        PluginContext ctx = pluginContext;
        if (ctx == null) {
            return;
        }
        String forensics = ContainerGovernor.forensics();
        try {
            ctx.send(new ContainerPressureReport(executorId, reason, s + "\n" + (forensics == null ? "" : forensics)));
        } catch (Exception e) {
            LOG.warn("nativemem: executor {}: cannot send the container pressure report to the driver: {}",
                    executorId, e.toString());
        }
    }

    /**
     * YARN and Kubernetes send SIGTERM before SIGKILL: if the governor saw pressure, log its last
     * snapshots and send them to the driver (best effort: the JVM is going away) so a lost executor
     * can be tied to its native usage. Not after an orderly plugin shutdown, which logs them itself.
     */
    private static void installTerminationReport() {
        Thread hook = new Thread(() -> {
            if (shutDown) {
                return;
            }
            try {
                ContainerGovernor.Status s = ContainerGovernor.status();
                if (s.running() && s.softEntries() > 0) {
                    LOG.warn("nativemem: executor {} terminating after container pressure: {}\n{}", executorId, s,
                            ContainerGovernor.forensics());
                    send("terminating", s);
                }
            } catch (RuntimeException | UnsatisfiedLinkError e) {
                // The JVM is exiting; nothing more to do.
            }
        }, "nativemem-termination-report");
        try {
            Runtime.getRuntime().addShutdownHook(hook);
        } catch (IllegalStateException alreadyShuttingDown) {
            // Nothing to report to.
        }
    }

    /** Starts the container governor of this executor if enabled; logs what it found. */
    private static void startGovernor(String executor, NativeMemorySparkConf.Governor g) {
        if (!g.enabled()) {
            LOG.info("nativemem: executor {}: no container governor ({}=false)", executor,
                    NativeMemorySparkConf.GOVERNOR_ENABLED);
            return;
        }
        try {
            LOG.info("nativemem: executor {}: {}", executor,
                    ContainerGovernor.start(g.containerLimitBytes(), g.softLevel(), g.hardLevel()));
        } catch (RuntimeException e) {
            // The executor works without it, as it did before; say why once.
            LOG.warn("nativemem: executor {}: the container governor cannot start: {}", executor, e.toString());
        }
    }

    /**
     * Stops the governor; if it ever saw pressure, logs its last snapshots (the executor's native
     * usage with the container's figures), so a lost executor's log tells what native memory held.
     */
    private static void stopGovernor() {
        shutDown = true;
        try {
            ContainerGovernor.Status s = ContainerGovernor.status();
            if (s.running() && s.softEntries() > 0) {
                LOG.warn("nativemem: executor {}: container governor at shutdown: {}\n{}", executorId, s,
                        ContainerGovernor.forensics());
            } else if (s.running()) {
                LOG.info("nativemem: executor {}: container governor at shutdown: {}", executorId, s);
            }
            ContainerGovernor.stop();
        } catch (RuntimeException | UnsatisfiedLinkError e) {
            LOG.warn("nativemem: executor {}: stopping the container governor failed", executorId, e);
        }
    }

    /**
     * Reads the container governor's gauges back from the executor plugin's registry.
     *
     * @return gauge name to value, in {@link #GOVERNOR_METRIC_NAMES} order; empty before init
     */
    public static Map<String, Long> governorMetrics() {
        MetricRegistry registry = executorRegistry;
        if (registry == null) {
            return Collections.emptyMap();
        }
        Map<String, Metric> metrics = registry.getMetrics();
        Map<String, Long> values = new LinkedHashMap<>();
        for (String name : GOVERNOR_METRIC_NAMES) {
            Metric metric = metrics.get(name);
            if (metric instanceof Gauge) {
                Object value = ((Gauge<?>) metric).getValue();
                values.put(name, value instanceof Number ? ((Number) value).longValue() : null);
            }
        }
        return values;
    }

    /** Samples the process view every {@link ExecutorMemory#DEFAULT_SAMPLE_INTERVAL_MS} on a daemon thread. */
    private static synchronized void startSampler() {
        if (sampler != null) {
            return;
        }
        ScheduledExecutorService s = Executors.newSingleThreadScheduledExecutor(r -> {
            Thread t = new Thread(r, "nativemem-memory-sampler");
            t.setDaemon(true);
            return t;
        });
        s.scheduleWithFixedDelay(() -> {
            try {
                ExecutorMemory.get().sampleIfDue();
            } catch (RuntimeException e) {
                LOG.debug("nativemem: memory sample failed", e);
            }
            try {
                reportHardPressure();
            } catch (RuntimeException | UnsatisfiedLinkError e) {
                LOG.debug("nativemem: container pressure report failed", e);
            }
            sendMemoryReport(false);
        }, 0, ExecutorMemory.DEFAULT_SAMPLE_INTERVAL_MS, TimeUnit.MILLISECONDS);
        sampler = s;
    }

    private static void registerGauges(MetricRegistry registry) {
        for (final Map.Entry<String, ToLongFunction<ContainerGovernor.Status>> m : GOVERNOR_METRICS.entrySet()) {
            registry.register(m.getKey(), new Gauge<Long>() {
                @Override
                public Long getValue() {
                    return m.getValue().applyAsLong(ContainerGovernor.status());
                }
            });
        }
        for (final Map.Entry<String, ToLongFunction<ExecutorArbiter.Status>> m : ARBITER_METRICS.entrySet()) {
            registry.register(m.getKey(), new Gauge<Long>() {
                @Override
                public Long getValue() {
                    return m.getValue().applyAsLong(ExecutorArbiter.status());
                }
            });
        }
        for (final Map.Entry<String, ToLongFunction<ExecutorMemory>> m : PROCESS_METRICS.entrySet()) {
            registry.register(m.getKey(), new Gauge<Long>() {
                @Override
                public Long getValue() {
                    return m.getValue().applyAsLong(ExecutorMemory.get());
                }
            });
        }
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
