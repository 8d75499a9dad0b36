package org.nativemem.spark;

import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import java.util.function.ToLongFunction;

import org.nativemem.Bytes;

import com.codahale.metrics.Gauge;
import com.codahale.metrics.MetricRegistry;

/**
 * The driver's view of the application's executors: the last {@link ExecutorMemoryReport} of each
 * (sent by the executor plugins at most once per sample interval and at shutdown), published as
 * gauges in the driver plugin's metric registry (so the driver's metrics sinks, e.g. Spark's
 * {@code PrometheusServlet} at {@code /metrics/prometheus}, show them as
 * {@code <app>.driver.plugin.org.nativemem.spark.NativeMemoryPlugin.<name>}) and summed up in one
 * sizing answer for the application at its end.
 *
 * <table>
 *   <caption>Driver gauges ({@link #GAUGE_NAMES}); -1 until an executor reported the figure</caption>
 *   <tr><td>{@code executorsReporting}</td><td>executors that sent a report</td></tr>
 *   <tr><td>{@code maxExecutorRssBytes}</td><td>largest resident set of an executor in its last report</td></tr>
 *   <tr><td>{@code maxExecutorRssPeakBytes}</td><td>largest resident-set peak of an executor</td></tr>
 *   <tr><td>{@code maxExecutorNativePeakBytes}</td><td>largest peak of nativemem's bytes in an executor</td></tr>
 *   <tr><td>{@code maxExecutorUntrackedPeakBytes}</td><td>largest peak of untracked native memory</td></tr>
 *   <tr><td>{@code maxTaskNativePeakBytes}</td><td>largest native peak of one task</td></tr>
 *   <tr><td>{@code minContainerHeadroomBytes}</td><td>smallest container headroom (limit - anonymous
 *       memory) among executors with a known container limit</td></tr>
 *   <tr><td>{@code liveTaskManagers}</td><td>task managers open on all executors (last reports)</td></tr>
 *   <tr><td>{@code recommendedMemoryOverheadBytes}, {@code recommendedOffHeapBytes}</td><td>the sizing
 *       answer so far ({@link #sizing()})</td></tr>
 * </table>
 *
 * <p>Thread-safe; reports may arrive in any order, from executors of other nativemem versions,
 * or never (a lost message only makes a figure older).
 */
public final class ApplicationMemoryView {
    /** Most executors kept (a report from beyond that is dropped; Spark's RPC is trusted, but memory is bounded). */
    static final int MAX_EXECUTORS = 100_000;

    private final ConcurrentHashMap<String, ExecutorMemoryReport> latest = new ConcurrentHashMap<>();

    private static final Map<String, ToLongFunction<ApplicationMemoryView>> GAUGES = gauges();

    /** Names of the driver gauges, in registration order. */
    public static final List<String> GAUGE_NAMES = Collections.unmodifiableList(new ArrayList<>(GAUGES.keySet()));

    private static Map<String, ToLongFunction<ApplicationMemoryView>> gauges() {
        Map<String, ToLongFunction<ApplicationMemoryView>> m = new LinkedHashMap<>();
        m.put("executorsReporting", v -> v.latest.size());
        m.put("maxExecutorRssBytes", v -> v.max("rssBytes"));
        m.put("maxExecutorRssPeakBytes", v -> v.max("rssPeakBytes"));
        m.put("maxExecutorNativePeakBytes", v -> v.max("nativePeakBytes"));
        m.put("maxExecutorUntrackedPeakBytes", v -> v.max("untrackedPeakBytes"));
        m.put("maxTaskNativePeakBytes", v -> v.max("taskPeakBytes"));
        m.put("minContainerHeadroomBytes", v -> v.minKnown("containerHeadroomBytes"));
        m.put("liveTaskManagers", v -> v.sum("liveTaskManagers"));
        m.put("recommendedMemoryOverheadBytes", v -> v.max("recommendedOverheadBytes"));
        m.put("recommendedOffHeapBytes", v -> v.max("recommendedOffHeapBytes"));
        return Collections.unmodifiableMap(m);
    }

    /**
     * Takes a message the driver plugin received.
     *
     * @param message anything
     * @return true if it was an executor report (kept as that executor's latest)
     */
    public boolean accept(Object message) {
        ExecutorMemoryReport r = ExecutorMemoryReport.fromMessage(message);
        if (r == null) {
            return false;
        }
        if (latest.size() >= MAX_EXECUTORS && !latest.containsKey(r.executorId())) {
            return false;
        }
        latest.merge(r.executorId(), r, (old, fresh) -> old.isLast() && !fresh.isLast() ? old : fresh);
        return true;
    }

    /** @return the last report of each executor, by executor id */
    public Map<String, ExecutorMemoryReport> reports() {
        return new LinkedHashMap<>(latest);
    }

    /** Registers the driver gauges ({@link #GAUGE_NAMES}) in {@code registry}. */
    void registerGauges(MetricRegistry registry) {
        for (final Map.Entry<String, ToLongFunction<ApplicationMemoryView>> g : GAUGES.entrySet()) {
            registry.register(g.getKey(), new Gauge<Long>() {
                @Override
                public Long getValue() {
                    return g.getValue().applyAsLong(ApplicationMemoryView.this);
                }
            });
        }
    }

    /** @return gauge name to value, in {@link #GAUGE_NAMES} order */
    public Map<String, Long> gaugeValues() {
        Map<String, Long> m = new LinkedHashMap<>();
        for (Map.Entry<String, ToLongFunction<ApplicationMemoryView>> g : GAUGES.entrySet()) {
            m.put(g.getKey(), g.getValue().applyAsLong(this));
        }
        return m;
    }

    /** @return the recommended {@code spark.executor.memoryOverhead} so far (max over executors), bytes; -1: none */
    public long recommendedOverheadBytes() {
        return max("recommendedOverheadBytes");
    }

    /** @return the recommended {@code spark.memory.offHeap.size} so far (max over executors), bytes; -1: none */
    public long recommendedOffHeapBytes() {
        return max("recommendedOffHeapBytes");
    }

    private long max(String figure) {
        long m = -1;
        for (ExecutorMemoryReport r : latest.values()) {
            m = Math.max(m, r.figure(figure));
        }
        return m;
    }

    private long minKnown(String figure) {
        long m = -1;
        for (ExecutorMemoryReport r : latest.values()) {
            long v = r.figure(figure);
            if (v >= 0 && (m < 0 || v < m)) {
                m = v;
            }
        }
        return m;
    }

    private long sum(String figure) {
        long s = 0;
        for (ExecutorMemoryReport r : latest.values()) {
            s += Math.max(0, r.figure(figure));
        }
        return s;
    }

    /** The executor with the largest {@code figure} (ties: the smallest id), or null. */
    private ExecutorMemoryReport argMax(String figure) {
        ExecutorMemoryReport best = null;
        for (ExecutorMemoryReport r : latest.values()) {
            long v = r.figure(figure);
            if (v < 0) {
                continue;
            }
            if (best == null || v > best.figure(figure)
                    || (v == best.figure(figure) && r.executorId().compareTo(best.executorId()) < 0)) {
                best = r;
            }
        }
        return best;
    }

    /**
     * The application's sizing answer: each setting is the largest of the executors' own
     * recommendations ({@link ExecutorMemory#recommendation}), since one setting serves every
     * executor, naming the executor that sets it and that executor's arithmetic.
     *
     * @return one line; "no executor reported" before any report
     */
    public String sizing() {
        if (latest.isEmpty()) {
            return "no recommendation: no executor reported its memory to the driver (executors without the"
                    + " nativemem plugin, or the application ended before the first report)";
        }
        StringBuilder b = new StringBuilder();
        ExecutorMemoryReport o = argMax("recommendedOverheadBytes");
        if (o == null) {
            b.append("spark.executor.memoryOverhead: no recommendation (no executor could read its resident set)");
        } else {
            b.append("spark.executor.memoryOverhead=").append(o.figure("recommendedOverheadBytes") >> 20)
                    .append("m (set by executor ").append(o.executorId()).append(")");
        }
        ExecutorMemoryReport h = argMax("recommendedOffHeapBytes");
        if (h == null) {
            b.append(", spark.memory.offHeap.size: no recommendation (no nativemem use with off-heap enabled)");
        } else {
            b.append(", spark.memory.offHeap.size=").append(h.figure("recommendedOffHeapBytes") >> 20)
                    .append("m (set by executor ").append(h.executorId()).append(")");
        }
        b.append("; max over ").append(latest.size()).append(" executor(s): largest rss peak ")
                .append(Bytes.human(max("rssPeakBytes"))).append(", nativemem peak ")
                .append(Bytes.human(max("nativePeakBytes"))).append(", untracked peak ")
                .append(Bytes.human(max("untrackedPeakBytes")));
        if (o != null) {
            b.append("; executor ").append(o.executorId()).append(": ").append(o.recommendation());
        }
        if (h != null && h != o) {
            b.append("; executor ").append(h.executorId()).append(": ").append(h.recommendation());
        }
        return b.toString();
    }
}
