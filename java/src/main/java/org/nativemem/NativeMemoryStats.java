package org.nativemem;

/**
 * An immutable snapshot of a {@link NativeMemoryManager}'s counters, taken by
 * {@link NativeMemoryManager#stats()}. All sizes are in bytes. The values are read one after the
 * other without stopping the manager, so under concurrent use they may be a few operations
 * apart (e.g. {@code used} a little above {@code reserved} for an instant).
 */
public final class NativeMemoryStats {
    /** Number of values {@link NativeMemoryManager} reads from the native library. */
    static final int FIELDS = 16;

    private final long usedBytes;
    private final long peakBytes;
    private final long reservedBytes;
    private final long spillCount;
    private final long spilledBytes;
    private final long reserveCalls;
    private final long unreserveCalls;
    private final long liveAllocations;
    private final long overcommittedBytes;
    private final long overcommitPeakBytes;
    private final long overcommittedTotalBytes;
    private final long gateRefusals;
    private final long arbitrations;
    private final long arbitratedBytes;
    private final long spillWrittenBytes;
    private final long allocatedBytes;

    private NativeMemoryStats(long[] v) {
        this.usedBytes = v[0];
        this.peakBytes = v[1];
        this.reservedBytes = v[2];
        this.spillCount = v[3];
        this.spilledBytes = v[4];
        this.reserveCalls = v[5];
        this.unreserveCalls = v[6];
        this.liveAllocations = v[7];
        this.overcommittedBytes = v[8];
        this.overcommitPeakBytes = v[9];
        this.overcommittedTotalBytes = v[10];
        this.gateRefusals = v[11];
        this.arbitrations = v[12];
        this.arbitratedBytes = v[13];
        this.spillWrittenBytes = v[14];
        this.allocatedBytes = v[15];
    }

    static NativeMemoryStats fromArray(long[] values) {
        if (values == null || values.length != FIELDS) {
            throw new NativeMemoryException("native stats returned "
                    + (values == null ? "null" : values.length + " values") + ", expected " + FIELDS);
        }
        return new NativeMemoryStats(values);
    }

    /** @return bytes used by the task now (all pools) */
    public long usedBytes() {
        return usedBytes;
    }

    /** @return the highest {@link #usedBytes()} seen */
    public long peakBytes() {
        return peakBytes;
    }

    /** @return bytes reserved from the {@link ReservationListener} and not given back */
    public long reservedBytes() {
        return reservedBytes;
    }

    /** @return number of native spiller calls that freed memory */
    public long spillCount() {
        return spillCount;
    }

    /** @return bytes those spills freed */
    public long spilledBytes() {
        return spilledBytes;
    }

    /** @return number of {@link ReservationListener#reserve(long)} calls */
    public long reserveCalls() {
        return reserveCalls;
    }

    /** @return number of {@link ReservationListener#unreserve(long)} calls */
    public long unreserveCalls() {
        return unreserveCalls;
    }

    /** @return native allocations made through the manager and not freed yet */
    public long liveAllocations() {
        return liveAllocations;
    }

    /**
     * @return bytes charged by forced grows (an engine's tracking allocator or malloc hook, which
     *     cannot fail or call the JVM) beyond what was reserved from the listener, not yet paid
     *     for: the task's next fallible grow reserves them with its own bytes, or spills, or fails
     */
    public long overcommittedBytes() {
        return overcommittedBytes;
    }

    /** @return the highest {@link #overcommittedBytes()} seen */
    public long overcommitPeakBytes() {
        return overcommitPeakBytes;
    }

    /** @return bytes forced grows over-committed so far (cumulative) */
    public long overcommittedTotalBytes() {
        return overcommittedTotalBytes;
    }

    /**
     * @return requests to Spark the container governor refused before they were made (the
     *     executor's container was under hard pressure; see {@link ContainerGovernor})
     */
    public long gateRefusals() {
        return gateRefusals;
    }

    /**
     * @return grows of this task that Spark granted less than they needed and that asked the
     *     executor's other tasks for their idle memory ({@link ExecutorArbiter}); 0 with
     *     arbitration off
     */
    public long arbitrations() {
        return arbitrations;
    }

    /** @return bytes the executor's other tasks handed back to Spark for this task's grows */
    public long arbitratedBytes() {
        return arbitratedBytes;
    }

    /**
     * @return bytes of the native allocations made through the manager and not freed yet (the
     *     task heap's blocks, each with a 32-byte header not counted here)
     */
    public long allocatedBytes() {
        return allocatedBytes;
    }

    /**
     * @return bytes the task's spills wrote (spill files), as its engine reported them through
     *     the engine ABI's {@code manager_spill_written} (or the Rust API's
     *     {@code note_spill_written}); Spark's Spill (Disk) of the task shows them
     */
    public long spillWrittenBytes() {
        return spillWrittenBytes;
    }

    @Override
    public String toString() {
        return "NativeMemoryStats{used=" + usedBytes + ", peak=" + peakBytes + ", reserved=" + reservedBytes
                + ", spillCount=" + spillCount + ", spilledBytes=" + spilledBytes
                + ", reserveCalls=" + reserveCalls + ", unreserveCalls=" + unreserveCalls
                + ", liveAllocations=" + liveAllocations + ", allocatedBytes=" + allocatedBytes + ", overcommitted=" + overcommittedBytes
                + ", overcommitPeak=" + overcommitPeakBytes + ", overcommittedTotal=" + overcommittedTotalBytes
                + ", gateRefusals=" + gateRefusals + ", arbitrations=" + arbitrations + ", arbitratedBytes="
                + arbitratedBytes + ", spillWrittenBytes=" + spillWrittenBytes + "}";
    }
}
