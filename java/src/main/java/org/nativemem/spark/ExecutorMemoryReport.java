package org.nativemem.spark;

import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.Map;

/**
 * What an executor tells the driver plugin about its memory ({@code PluginContext.send}): the
 * process view and peaks ({@link ExecutorMemory}), its task managers, the container governor's
 * headroom and its own sizing recommendation.
 *
 * <h2>Wire form</h2>
 * The message is a plain {@code HashMap<String, String>} (JDK types only, so any nativemem
 * version on either side can read it; Spark's RPC would fail to deserialize a class the driver
 * lacks or has in another version), marked by the key {@value #KIND_KEY}. Fields are only ever
 * added: {@link #fromMessage} reads what it knows, a missing or unreadable figure is -1, a message
 * without the marker or an executor id is not a report (null), never an exception.
 */
public final class ExecutorMemoryReport {
    /** The marker key; its value is the wire version (1). */
    static final String KIND_KEY = "nativemem.executorMemoryReport";
    static final String VERSION = "1";

    /** The figures, in wire order: bytes unless the name says otherwise; -1 unknown. */
    static final String[] FIGURES = {"rssBytes", "rssPeakBytes", "nativePeakBytes", "untrackedPeakBytes",
        "taskPeakBytes", "liveTaskManagers", "containerLimitBytes", "containerHeadroomBytes",
        "recommendedOverheadBytes", "recommendedOffHeapBytes", "atMillis"};

    private final String executorId;
    private final boolean last;
    private final Map<String, Long> figures;
    private final String recommendation;

    ExecutorMemoryReport(String executorId, boolean last, Map<String, Long> figures, String recommendation) {
        this.executorId = executorId;
        this.last = last;
        this.figures = figures;
        this.recommendation = recommendation == null ? "" : recommendation;
    }

    /**
     * The report of this executor now (sampling the process if due).
     *
     * @param executorId this executor
     * @param last true for the report sent at shutdown
     * @param offHeapEnabled, currentOverhead, currentOffHeap as for {@link ExecutorMemory#recommendation}
     */
    static ExecutorMemoryReport take(String executorId, boolean last, boolean offHeapEnabled, long currentOverhead,
            long currentOffHeap) {
        ExecutorMemory em = ExecutorMemory.get();
        ExecutorMemory.Snapshot now = em.sampleIfDue();
        ExecutorMemory.Peaks p = em.peaks();
        ExecutorNativeMemoryStats stats = TaskNativeMemory.executorStats();
        long[] rec = ExecutorMemory.recommendedBytes(p, offHeapEnabled);
        Map<String, Long> f = new LinkedHashMap<>();
        f.put("rssBytes", now.rssBytes);
        f.put("rssPeakBytes", p.rssBytes);
        f.put("nativePeakBytes", p.nativeBytes);
        f.put("untrackedPeakBytes", p.untrackedBytes);
        f.put("taskPeakBytes", stats.peakBytes());
        f.put("liveTaskManagers", stats.liveManagers());
        long limit = -1;
        long headroom = -1;
        try {
            org.nativemem.ContainerGovernor.Status s = org.nativemem.ContainerGovernor.status();
            if (s.running() && s.limitBytes() > 0) {
                limit = s.limitBytes();
                headroom = s.headroomBytes();
            }
        } catch (RuntimeException | UnsatisfiedLinkError e) {
            // no governor: no container figures
        }
        f.put("containerLimitBytes", limit);
        f.put("containerHeadroomBytes", headroom);
        f.put("recommendedOverheadBytes", rec[0]);
        f.put("recommendedOffHeapBytes", rec[1]);
        f.put("atMillis", now.atMillis);
        return new ExecutorMemoryReport(executorId, last, f,
                em.recommendation(offHeapEnabled, currentOverhead, currentOffHeap));
    }

    /** @return the message to send: a {@code HashMap<String, String>} */
    HashMap<String, String> toMessage() {
        HashMap<String, String> m = new HashMap<>();
        m.put(KIND_KEY, VERSION);
        m.put("executorId", executorId);
        m.put("last", Boolean.toString(last));
        m.put("recommendation", recommendation);
        for (Map.Entry<String, Long> e : figures.entrySet()) {
            m.put(e.getKey(), Long.toString(e.getValue()));
        }
        return m;
    }

    /**
     * Reads a message; tolerant of other versions and garbage.
     *
     * @param message anything the driver plugin received
     * @return the report, or null if {@code message} is not one
     */
    static ExecutorMemoryReport fromMessage(Object message) {
        if (!(message instanceof Map)) {
            return null;
        }
        Map<?, ?> m = (Map<?, ?>) message;
        Object id = m.get("executorId");
        if (m.get(KIND_KEY) == null || !(id instanceof String) || ((String) id).isEmpty()) {
            return null;
        }
        Map<String, Long> f = new LinkedHashMap<>();
        for (String name : FIGURES) {
            long v = -1;
            Object o = m.get(name);
            if (o instanceof String) {
                try {
                    v = Long.parseLong((String) o);
                } catch (NumberFormatException e) {
                    v = -1;
                }
            }
            f.put(name, v);
        }
        Object rec = m.get("recommendation");
        return new ExecutorMemoryReport((String) id, "true".equals(m.get("last")), f,
                rec instanceof String ? (String) rec : "");
    }

    /** @return the executor that sent it */
    public String executorId() {
        return executorId;
    }

    /** @return true for the report sent at the executor's shutdown */
    public boolean isLast() {
        return last;
    }

    /**
     * @param name one of {@link #FIGURES}
     * @return its value, -1 if unknown
     */
    public long figure(String name) {
        Long v = figures.get(name);
        return v == null ? -1 : v;
    }

    /** @return the executor's own one-line recommendation (empty if it sent none) */
    public String recommendation() {
        return recommendation;
    }

    /** @return true if the figures (not the time) differ from {@code other}'s */
    boolean differsFrom(ExecutorMemoryReport other) {
        if (other == null || last != other.last) {
            return true;
        }
        for (String name : FIGURES) {
            if (!"atMillis".equals(name) && figure(name) != other.figure(name)) {
                return true;
            }
        }
        return false;
    }

    @Override
    public String toString() {
        return "ExecutorMemoryReport{executor " + executorId + (last ? " (last)" : "") + ", " + figures + "}";
    }
}
