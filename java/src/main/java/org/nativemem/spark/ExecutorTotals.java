package org.nativemem.spark;

import java.util.concurrent.atomic.AtomicLong;

import org.nativemem.NativeMemoryStats;

/**
 * The executor's native memory counters since the JVM started, and the sum that turns them and
 * the live task managers into an {@link ExecutorNativeMemoryStats} (what
 * {@link TaskNativeMemory#executorStats()} returns and {@link NativeMemoryPlugin}'s gauges
 * publish).
 *
 * <p>Who records what, and when:
 * <ul>
 *   <li>{@link TaskNativeMemory}, the task lifecycle: a manager created, a task failed by a native
 *       out-of-memory error, a per-task resource or manager that failed to close, what a task's
 *       close found (spills, peak, bytes still in use, Arrow buffers still open, bytes still held
 *       from Spark), a manager closed.
 *   <li>{@link SparkReservationListener}, given these totals at construction: each Spark spill
 *       request it answered and the bytes it gave back, as it answers it, so the gauges count it
 *       while the task runs.
 * </ul>
 * This class calls neither: the live managers' values are added to a {@link Sum} by whoever walks
 * them ({@link TaskNativeMemory#executorStats()}).
 *
 * <p>Thread-safe: every counter is an atomic of its own, updated with one read-modify-write; a
 * snapshot reads them one by one, so under load its values may be a few operations apart.
 */
final class ExecutorTotals {
    /** The totals of this executor JVM (of this class loader, like the task managers it counts). */
    static final ExecutorTotals EXECUTOR = new ExecutorTotals();

    private final AtomicLong created = new AtomicLong();
    private final AtomicLong closed = new AtomicLong();
    private final AtomicLong maxClosedPeak = new AtomicLong();
    private final AtomicLong closedSpillCount = new AtomicLong();
    private final AtomicLong closedSpilledBytes = new AtomicLong();
    private final AtomicLong sparkSpillRequests = new AtomicLong();
    private final AtomicLong sparkSpilledBytes = new AtomicLong();
    private final AtomicLong reclaimedAtClose = new AtomicLong();
    private final AtomicLong unreturned = new AtomicLong();
    private final AtomicLong closeFailures = new AtomicLong();
    private final AtomicLong oomFailures = new AtomicLong();
    private final AtomicLong arrowReclaimedAtClose = new AtomicLong();

    ExecutorTotals() {
    }

    /** A task's manager was created. */
    void managerCreated() {
        created.incrementAndGet();
    }

    /** A task's manager was closed (its close ran, whether it succeeded or not). */
    void managerClosed() {
        closed.incrementAndGet();
    }

    /**
     * What a task's manager held just before its close: its spills move from the live sum to the
     * closed totals, its peak counts towards the executor's, and bytes still in use are the bytes
     * the close reclaimed.
     *
     * @param before the manager's stats read right before its close
     */
    void heldAtClose(NativeMemoryStats before) {
        closedSpillCount.addAndGet(before.spillCount());
        closedSpilledBytes.addAndGet(before.spilledBytes());
        updateMax(maxClosedPeak, before.peakBytes());
        if (before.usedBytes() > 0) {
            reclaimedAtClose.addAndGet(before.usedBytes());
        }
    }

    /** Closing a task's manager, or a per-task resource built on it, threw. */
    void closeFailed() {
        closeFailures.incrementAndGet();
    }

    /** A task failed with a native out-of-memory error. */
    void oomFailure() {
        oomFailures.incrementAndGet();
    }

    /** @param bytes Arrow bytes still open when their task ended, freed by its allocator's close */
    void arrowReclaimedAtClose(long bytes) {
        arrowReclaimedAtClose.addAndGet(bytes);
    }

    /** @param bytes bytes Spark still counted for a task's consumer after its manager was closed */
    void unreturned(long bytes) {
        unreturned.addAndGet(bytes);
    }

    /**
     * Spark asked a task's manager for memory back and got {@code released} bytes.
     *
     * @param released bytes given back to Spark during that request, {@code >= 0}
     */
    void sparkSpill(long released) {
        sparkSpillRequests.incrementAndGet();
        sparkSpilledBytes.addAndGet(released);
    }

    /**
     * Starts a snapshot: the closed managers' peak and spills are read now, before the caller adds
     * the live managers, so a manager that closes meanwhile is never counted twice (at worst it is
     * missing from this one snapshot).
     *
     * @return a sum to add the live managers to, then {@link Sum#build()}
     */
    Sum sum() {
        return new Sum();
    }

    private static void updateMax(AtomicLong max, long value) {
        long cur = max.get();
        while (value > cur && !max.compareAndSet(cur, value)) {
            cur = max.get();
        }
    }

    /** One snapshot in the making: the closed managers' totals plus the live managers added. */
    final class Sum {
        private long live;
        private long used;
        private long reserved;
        private long held;
        private long peak = maxClosedPeak.get();
        private long spillCount = closedSpillCount.get();
        private long spilledBytes = closedSpilledBytes.get();
        private long arrowAllocators;
        private long arrowBytes;

        /**
         * @param stats a live manager's stats
         * @param heldFromSpark what its Spark consumer holds in Spark's accounting now, bytes
         */
        void addManager(NativeMemoryStats stats, long heldFromSpark) {
            live++;
            used += stats.usedBytes();
            reserved += stats.reservedBytes();
            peak = Math.max(peak, stats.peakBytes());
            spillCount += stats.spillCount();
            spilledBytes += stats.spilledBytes();
            held += heldFromSpark;
        }

        /** @param allocatedBytes bytes a running task's Arrow allocator holds now, as Arrow counts them */
        void addArrowAllocator(long allocatedBytes) {
            arrowAllocators++;
            arrowBytes += allocatedBytes;
        }

        /** @return the snapshot; the counters other than peak and spills are read now */
        ExecutorNativeMemoryStats build() {
            return new ExecutorNativeMemoryStats(live, used, reserved, held, peak, spillCount, spilledBytes,
                    sparkSpillRequests.get(), sparkSpilledBytes.get(), created.get(), closed.get(),
                    reclaimedAtClose.get(), unreturned.get(), closeFailures.get(), oomFailures.get(),
                    arrowAllocators, arrowBytes, arrowReclaimedAtClose.get());
        }
    }
}
