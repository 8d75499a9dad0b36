package org.nativemem.spark;

/**
 * A snapshot of the native memory of one executor JVM: its live task managers and counters since
 * the JVM started. All sizes in bytes. Taken by {@link TaskNativeMemory#executorStats()}; the
 * plugin's metrics ({@link NativeMemoryPlugin}) publish the same values. The live values are
 * read manager by manager without stopping them, so under load they may be a few operations apart.
 *
 * <p>After every task of the executor has finished, a healthy executor shows
 * {@code liveManagers == 0}, {@code usedBytes == 0}, {@code reservedBytes == 0},
 * {@code arrowAllocatedBytes == 0} and {@code unreturnedBytes == 0}.
 */
public final class ExecutorNativeMemoryStats {
    private final long liveManagers;
    private final long usedBytes;
    private final long reservedBytes;
    private final long heldFromSparkBytes;
    private final long peakBytes;
    private final long spillCount;
    private final long spilledBytes;
    private final long sparkSpillRequests;
    private final long sparkSpilledBytes;
    private final long managersCreated;
    private final long managersClosed;
    private final long reclaimedAtCloseBytes;
    private final long unreturnedBytes;
    private final long closeFailures;
    private final long oomFailures;
    private final long arrowAllocators;
    private final long arrowAllocatedBytes;
    private final long arrowReclaimedAtCloseBytes;

    ExecutorNativeMemoryStats(long liveManagers, long usedBytes, long reservedBytes, long heldFromSparkBytes,
            long peakBytes, long spillCount, long spilledBytes, long sparkSpillRequests, long sparkSpilledBytes,
            long managersCreated, long managersClosed, long reclaimedAtCloseBytes, long unreturnedBytes,
            long closeFailures, long oomFailures, long arrowAllocators, long arrowAllocatedBytes,
            long arrowReclaimedAtCloseBytes) {
        this.liveManagers = liveManagers;
        this.usedBytes = usedBytes;
        this.reservedBytes = reservedBytes;
        this.heldFromSparkBytes = heldFromSparkBytes;
        this.peakBytes = peakBytes;
        this.spillCount = spillCount;
        this.spilledBytes = spilledBytes;
        this.sparkSpillRequests = sparkSpillRequests;
        this.sparkSpilledBytes = sparkSpilledBytes;
        this.managersCreated = managersCreated;
        this.managersClosed = managersClosed;
        this.reclaimedAtCloseBytes = reclaimedAtCloseBytes;
        this.unreturnedBytes = unreturnedBytes;
        this.closeFailures = closeFailures;
        this.oomFailures = oomFailures;
        this.arrowAllocators = arrowAllocators;
        this.arrowAllocatedBytes = arrowAllocatedBytes;
        this.arrowReclaimedAtCloseBytes = arrowReclaimedAtCloseBytes;
    }

    /** @return task managers created and not closed yet */
    public long liveManagers() {
        return liveManagers;
    }

    /** @return bytes used natively by the live managers now */
    public long usedBytes() {
        return usedBytes;
    }

    /** @return bytes the live managers reserved (from Spark) and have not given back */
    public long reservedBytes() {
        return reservedBytes;
    }

    /** @return bytes the live managers' Spark consumers hold in Spark's accounting now */
    public long heldFromSparkBytes() {
        return heldFromSparkBytes;
    }

    /** @return the largest native peak of any task attempt on this executor (live or finished) */
    public long peakBytes() {
        return peakBytes;
    }

    /** @return native spiller calls that freed memory (finished and live managers) */
    public long spillCount() {
        return spillCount;
    }

    /** @return bytes those spills freed */
    public long spilledBytes() {
        return spilledBytes;
    }

    /** @return spill requests from Spark that reached a native manager */
    public long sparkSpillRequests() {
        return sparkSpillRequests;
    }

    /** @return bytes given back to Spark in answer to its spill requests */
    public long sparkSpilledBytes() {
        return sparkSpilledBytes;
    }

    /** @return task managers created since the JVM started */
    public long managersCreated() {
        return managersCreated;
    }

    /** @return task managers closed since the JVM started */
    public long managersClosed() {
        return managersClosed;
    }

    /**
     * @return native bytes still in use when their task ended, which the manager's close freed:
     *     operator state attached to the manager, and memory an operator did not release (typically
     *     because its task failed or was killed)
     */
    public long reclaimedAtCloseBytes() {
        return reclaimedAtCloseBytes;
    }

    /**
     * @return bytes Spark's accounting still showed for a task's consumer after its manager was
     *     closed (0 unless a close failed; Spark then frees them and reports a memory leak)
     */
    public long unreturnedBytes() {
        return unreturnedBytes;
    }

    /** @return manager closes that threw (logged with the cause) */
    public long closeFailures() {
        return closeFailures;
    }

    /** @return tasks that failed with a native out-of-memory error */
    public long oomFailures() {
        return oomFailures;
    }

    /** @return running tasks' Arrow allocators ({@link TaskArrowAllocator}) open now */
    public long arrowAllocators() {
        return arrowAllocators;
    }

    /**
     * @return bytes of Arrow buffers allocated now through running tasks' Arrow allocators, as
     *     Arrow counts them. They are also inside {@link #usedBytes()}, rounded up to the Arrow
     *     listener's blocks in pool {@code arrow}.
     */
    public long arrowAllocatedBytes() {
        return arrowAllocatedBytes;
    }

    /** @return bytes of Arrow buffers still open when their task ended, freed by its allocator's close */
    public long arrowReclaimedAtCloseBytes() {
        return arrowReclaimedAtCloseBytes;
    }

    @Override
    public String toString() {
        return "ExecutorNativeMemoryStats{liveManagers=" + liveManagers + ", usedBytes=" + usedBytes
                + ", reservedBytes=" + reservedBytes + ", heldFromSparkBytes=" + heldFromSparkBytes
                + ", peakBytes=" + peakBytes + ", spillCount=" + spillCount + ", spilledBytes=" + spilledBytes
                + ", sparkSpillRequests=" + sparkSpillRequests + ", sparkSpilledBytes=" + sparkSpilledBytes
                + ", managersCreated=" + managersCreated + ", managersClosed=" + managersClosed
                + ", reclaimedAtCloseBytes=" + reclaimedAtCloseBytes + ", unreturnedBytes=" + unreturnedBytes
                + ", closeFailures=" + closeFailures + ", oomFailures=" + oomFailures + ", arrowAllocators="
                + arrowAllocators + ", arrowAllocatedBytes=" + arrowAllocatedBytes + ", arrowReclaimedAtCloseBytes="
                + arrowReclaimedAtCloseBytes + "}";
    }
}
