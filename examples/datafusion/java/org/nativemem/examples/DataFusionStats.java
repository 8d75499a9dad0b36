package org.nativemem.examples;

import java.io.Serializable;
import java.util.Locale;

import org.nativemem.Bytes;

/**
 * An immutable snapshot of a {@link DataFusionTask}'s last query and of its memory pool, taken by
 * {@link DataFusionTask#stats()} or returned by {@link DataFusionTask#await()}. Sizes in bytes,
 * times in nanoseconds. Every figure is the last query's (each query runs on a pool of its own):
 * the pool's counters ({@link #spillRequests()}, {@link #yields()}, {@link #perCallCalls()},
 * {@link #peakReservedBytes()}) live while it runs; its result ({@link #rows()},
 * {@link #digest()}, DataFusion's spill metrics) once it was awaited. Serializable, so Spark tasks
 * can return it to the driver.
 */
public final class DataFusionStats implements Serializable {
    private static final long serialVersionUID = 1L;

    /** Number of values the native library returns, in constructor order. */
    static final int FIELDS = 12;

    private final long rows;
    private final long digest;
    private final long dfSpillCount;
    private final long dfSpilledBytes;
    private final long spillRequests;
    private final long requestedBytes;
    private final long yields;
    private final long yieldedBytes;
    private final long perCallCalls;
    private final long peakReservedBytes;
    private final long elapsedNanos;
    private final boolean finished;

    /**
     * @param rows rows the query returned
     * @param digest digest of the result (order-insensitive for {@link DataFusionTask.Query#GROUP_BY})
     * @param dfSpillCount spills DataFusion counted in its metrics, whole plan
     * @param dfSpilledBytes bytes DataFusion spilled, whole plan
     * @param spillRequests times the task's manager asked this pool for memory
     * @param requestedBytes bytes those requests asked for
     * @param yields {@code try_grow}s refused because memory was asked back
     * @param yieldedBytes bytes the refused consumers held when refused
     * @param perCallCalls JNI calls the per-call pool made (0 in nativemem mode)
     * @param peakReservedBytes the most DataFusion held in this pool at once
     * @param elapsedNanos wall time of the last query
     * @param finished true if the last query completed
     */
    public DataFusionStats(long rows, long digest, long dfSpillCount, long dfSpilledBytes, long spillRequests,
            long requestedBytes, long yields, long yieldedBytes, long perCallCalls, long peakReservedBytes,
            long elapsedNanos, boolean finished) {
        this.rows = rows;
        this.digest = digest;
        this.dfSpillCount = dfSpillCount;
        this.dfSpilledBytes = dfSpilledBytes;
        this.spillRequests = spillRequests;
        this.requestedBytes = requestedBytes;
        this.yields = yields;
        this.yieldedBytes = yieldedBytes;
        this.perCallCalls = perCallCalls;
        this.peakReservedBytes = peakReservedBytes;
        this.elapsedNanos = elapsedNanos;
        this.finished = finished;
    }

    static DataFusionStats fromArray(long[] v) {
        if (v == null || v.length != FIELDS) {
            throw new IllegalStateException("native DataFusion stats returned "
                    + (v == null ? "null" : v.length + " values") + ", expected " + FIELDS);
        }
        return new DataFusionStats(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11] != 0);
    }

    /** @return rows the last query returned (so far, while it runs) */
    public long rows() {
        return rows;
    }

    /** @return digest of the last query's result; compare runs of the same query and row count */
    public long digest() {
        return digest;
    }

    /** @return spills in DataFusion's metrics of the last query (all operators) */
    public long dfSpillCount() {
        return dfSpillCount;
    }

    /** @return bytes DataFusion spilled in the last query (all operators) */
    public long dfSpilledBytes() {
        return dfSpilledBytes;
    }

    /** @return times the task's manager asked this pool for memory (in Spark: Spark asked) */
    public long spillRequests() {
        return spillRequests;
    }

    /** @return bytes those requests asked for */
    public long requestedBytes() {
        return requestedBytes;
    }

    /** @return {@code try_grow}s refused because memory was asked back (each makes the consumer spill) */
    public long yields() {
        return yields;
    }

    /** @return bytes the consumers held when their {@code try_grow} was refused for a request */
    public long yieldedBytes() {
        return yieldedBytes;
    }

    /** @return JNI calls of the per-call pool (the comparison mode); 0 on nativemem's pool */
    public long perCallCalls() {
        return perCallCalls;
    }

    /** @return the most DataFusion held in this pool at once */
    public long peakReservedBytes() {
        return peakReservedBytes;
    }

    /** @return wall time of the last query, nanoseconds */
    public long elapsedNanos() {
        return elapsedNanos;
    }

    /** @return true if the last query completed (false while it runs, and after it failed) */
    public boolean finished() {
        return finished;
    }

    /**
     * @return e.g. {@code rows 2000000, digest 0x..., finished, 0.812 s, peak 24.0 MiB, DataFusion
     *     spilled 31.2 MiB in 3 spills, asked 2 times for 4.0 MiB, 1 yields (8.0 MiB), 0 per-call JNI calls}
     */
    @Override
    public String toString() {
        return String.format(Locale.ROOT, "rows %d, digest 0x%016x, %s, %.3f s, peak %s, DataFusion spilled %s in %d"
                + " spills, asked %d times for %s, %d yields (%s), %d per-call JNI calls", rows, digest,
                finished ? "finished" : "not finished", elapsedNanos / 1e9, Bytes.human(peakReservedBytes),
                Bytes.human(dfSpilledBytes), dfSpillCount, spillRequests, Bytes.human(requestedBytes),
                yields, Bytes.human(yieldedBytes), perCallCalls);
    }
}
