package org.nativemem.examples;

import java.io.Serializable;
import java.util.Locale;

import org.nativemem.Bytes;

/**
 * An immutable snapshot of what a {@link NativeSorter} did, taken by {@link NativeSorter#stats()}.
 * Sizes in bytes, times in nanoseconds. Serializable, so Spark tasks can return it to the driver.
 */
public final class SorterStats implements Serializable {
    private static final long serialVersionUID = 1L;

    /** Number of values the native library returns, in constructor order. */
    static final int FIELDS = 8;

    private final long rowsInserted;
    private final long rowsOutput;
    private final long rowsSpilled;
    private final long bytesSpilled;
    private final long runs;
    private final long spillTimeNanos;
    private final long memoryBytes;
    private final long peakMemoryBytes;

    /**
     * @param rowsInserted keys inserted
     * @param rowsOutput keys handed out by the sorted output so far
     * @param rowsSpilled keys written to spill files
     * @param bytesSpilled bytes written to spill files
     * @param runs spill files written (one per spill)
     * @param spillTimeNanos time spent spilling (sorting, writing, freeing)
     * @param memoryBytes bytes the sorter holds now (buffer chunks and merge read buffers)
     * @param peakMemoryBytes the most bytes it held at once
     */
    public SorterStats(long rowsInserted, long rowsOutput, long rowsSpilled, long bytesSpilled, long runs,
            long spillTimeNanos, long memoryBytes, long peakMemoryBytes) {
        this.rowsInserted = rowsInserted;
        this.rowsOutput = rowsOutput;
        this.rowsSpilled = rowsSpilled;
        this.bytesSpilled = bytesSpilled;
        this.runs = runs;
        this.spillTimeNanos = spillTimeNanos;
        this.memoryBytes = memoryBytes;
        this.peakMemoryBytes = peakMemoryBytes;
    }

    static SorterStats fromArray(long[] v) {
        if (v == null || v.length != FIELDS) {
            throw new IllegalStateException("native sorter stats returned "
                    + (v == null ? "null" : v.length + " values") + ", expected " + FIELDS);
        }
        return new SorterStats(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]);
    }

    /** @return keys inserted */
    public long rowsInserted() {
        return rowsInserted;
    }

    /** @return keys handed out by the sorted output so far */
    public long rowsOutput() {
        return rowsOutput;
    }

    /** @return keys written to spill files */
    public long rowsSpilled() {
        return rowsSpilled;
    }

    /** @return bytes written to spill files */
    public long bytesSpilled() {
        return bytesSpilled;
    }

    /** @return spill files (sorted runs) written */
    public long runs() {
        return runs;
    }

    /** @return time spent spilling, in nanoseconds */
    public long spillTimeNanos() {
        return spillTimeNanos;
    }

    /** @return bytes the sorter holds now */
    public long memoryBytes() {
        return memoryBytes;
    }

    /** @return the most bytes the sorter held at once */
    public long peakMemoryBytes() {
        return peakMemoryBytes;
    }

    /** @return e.g. {@code rows 1000000, peak memory 24.0 MiB, spilled 7.6 MiB in 2 runs (0.041 s)} */
    @Override
    public String toString() {
        return String.format(Locale.ROOT, "rows %d, peak memory %s, spilled %s in %d runs (%.3f s)", rowsInserted,
                Bytes.human(peakMemoryBytes), Bytes.human(bytesSpilled), runs, spillTimeNanos / 1e9);
    }
}
