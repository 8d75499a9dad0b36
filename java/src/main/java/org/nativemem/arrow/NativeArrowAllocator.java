package org.nativemem.arrow;

import java.util.Objects;
import java.util.concurrent.atomic.AtomicBoolean;

import org.apache.arrow.memory.BufferAllocator;
import org.apache.arrow.memory.RootAllocator;
import org.nativemem.NativeMemoryManager;

/**
 * An Arrow {@link RootAllocator} whose memory is charged to a pool of a
 * {@link NativeMemoryManager} (through a {@link NativeAllocationListener}) and whose close frees
 * what its users leaked, the way the manager's close frees leaked native memory.
 *
 * <pre>{@code
 * try (NativeArrowAllocator arrow = NativeArrowAllocator.create(manager, "scan")) {
 *     try (IntVector v = new IntVector("ids", arrow.allocator())) {
 *         v.allocateNew(1 << 16);                 // charged to pool "arrow" of the manager
 *         ...
 *     }
 * }                                               // closeReport(): leaks, with Arrow's text
 * }</pre>
 *
 * <h2>Why a root per owner</h2>
 * A root allocator is cheap, and one per task (or per operator) keeps failures apart: Arrow marks
 * an allocator closed even when its close finds leaks, and a leaked child of a shared root would
 * make that root fail to close for the rest of the executor's life. Children of
 * {@link #allocator()} ({@code newChildAllocator(name, init, max)}) inherit the listener, so all
 * their buffers are charged once, and ownership transfers inside the tree keep the charge exact.
 * Arrow's own limit is unbounded: the manager's pool and task limits apply.
 *
 * <h2>Memory and close</h2>
 * Buffers are system allocations ({@code sun.misc.Unsafe.allocateMemory}, as with Arrow's
 * {@code arrow-memory-unsafe}) that this allocator tracks. {@link #close()}:
 * <ol>
 *   <li>closes the root; if Arrow still counts bytes allocated (buffers or child allocators left
 *       open), its close error and {@code toVerboseString()} become the {@link #closeReport()}'s
 *       {@linkplain ArrowCloseReport#arrowText() Arrow text};
 *   <li>frees the memory of every buffer still open — using such a buffer afterwards is a
 *       use-after-free, so close this only when its users are done (in Spark: at task end);
 *   <li>closes the listener: every byte goes back to the manager's pool.
 * </ol>
 * If {@code sun.misc.Unsafe} is not reachable the allocator uses Arrow's default allocation
 * manager and a leak is reported but not freed ({@link #freesLeakedMemory()}).
 *
 * <p>Thread-safe as Arrow's allocators are. {@link #close()} is idempotent and never throws
 * because of a leak.
 */
public final class NativeArrowAllocator implements AutoCloseable {
    /** At most this many characters of Arrow's {@code toVerboseString()} go into a close report. */
    public static final int MAX_VERBOSE_CHARS = 16_384;

    private final String name;
    private final NativeAllocationListener listener;
    /** Null when the default allocation manager is used. */
    private final TrackingAllocationManagerFactory memory;
    private final RootAllocator root;
    private final AtomicBoolean closed = new AtomicBoolean();
    private volatile ArrowCloseReport closeReport;

    private NativeArrowAllocator(String name, NativeAllocationListener listener) {
        this.name = name;
        this.listener = listener;
        this.memory = TrackingAllocationManagerFactory.AVAILABLE ? new TrackingAllocationManagerFactory() : null;
        if (memory != null) {
            this.root = new RootAllocator(RootAllocator.configBuilder().listener(listener)
                    .maxAllocation(Long.MAX_VALUE).allocationManagerFactory(memory).build());
        } else {
            this.root = new RootAllocator(RootAllocator.configBuilder().listener(listener)
                    .maxAllocation(Long.MAX_VALUE).build());
        }
    }

    /**
     * An allocator charging pool {@value NativeAllocationListener#DEFAULT_POOL} in blocks of
     * {@value NativeAllocationListener#DEFAULT_BLOCK_BYTES} bytes.
     *
     * @param manager the manager to charge
     * @param name the allocator's name in reports
     * @return the allocator; close it
     * @throws IllegalStateException if the manager is closed
     */
    public static NativeArrowAllocator create(NativeMemoryManager manager, String name) {
        return create(manager, name, NativeAllocationListener.DEFAULT_POOL, NativeAllocationListener.DEFAULT_BLOCK_BYTES);
    }

    /**
     * @param manager the manager to charge
     * @param name the allocator's name in reports
     * @param poolPath the pool Arrow bytes are charged to; created if missing
     * @param blockBytes bytes per JNI grow of the listener's reservation, {@code > 0}
     * @return the allocator; close it
     * @throws IllegalArgumentException if {@code blockBytes <= 0} or the pool path is malformed
     * @throws IllegalStateException if the manager is closed
     */
    public static NativeArrowAllocator create(NativeMemoryManager manager, String name, String poolPath,
            long blockBytes) {
        Objects.requireNonNull(name, "name");
        NativeAllocationListener listener = new NativeAllocationListener(manager, poolPath,
                NativeAllocationListener.DEFAULT_CONSUMER, blockBytes);
        try {
            return new NativeArrowAllocator(name, listener);
        } catch (RuntimeException | Error e) {
            listener.close();
            throw e;
        }
    }

    /** @return the root allocator: allocate from it or from its children; do not close it yourself */
    public BufferAllocator allocator() {
        return root;
    }

    /** @return the listener that charges the manager (counters: JNI calls, allocations) */
    public NativeAllocationListener listener() {
        return listener;
    }

    /** @return the name given at creation */
    public String name() {
        return name;
    }

    /** @return bytes Arrow counts as allocated in this allocator's tree now (0 once closed) */
    public long allocatedBytes() {
        return closed.get() ? 0 : root.getAllocatedMemory();
    }

    /** @return the highest {@link #allocatedBytes()} Arrow recorded */
    public long peakBytes() {
        return root.getPeakMemoryAllocation();
    }

    /** @return whether {@link #close()} frees the memory of buffers left open */
    public boolean freesLeakedMemory() {
        return memory != null;
    }

    /** @return true once {@link #close()} was called */
    public boolean isClosed() {
        return closed.get();
    }

    /**
     * Closes the root allocator, frees the memory of buffers still open and releases every byte
     * charged to the manager (see the class doc). Idempotent and thread-safe; a leak does not
     * make it throw: read {@link #closeReport()}.
     *
     * @throws RuntimeException only if releasing the reservation failed unexpectedly (the report
     *     is recorded first)
     */
    @Override
    public void close() {
        if (!closed.compareAndSet(false, true)) {
            return;
        }
        long allocated = root.getAllocatedMemory();
        String verbose = null;
        if (allocated > 0) {
            try {
                verbose = root.toVerboseString();
            } catch (RuntimeException e) {
                verbose = "(toVerboseString failed: " + e + ")";
            }
            if (verbose != null && verbose.length() > MAX_VERBOSE_CHARS) {
                verbose = verbose.substring(0, MAX_VERBOSE_CHARS) + "... (" + (verbose.length() - MAX_VERBOSE_CHARS)
                        + " more characters)";
            }
        }
        String closeError = null;
        try {
            root.close();
        } catch (RuntimeException e) {
            closeError = e.getMessage();
        }
        long[] freed = memory == null ? new long[] {0, 0} : memory.freeLive();
        String text = null;
        if (allocated > 0) {
            text = (closeError == null ? "(no close error)" : closeError.trim()) + "\nAllocator tree:\n" + verbose;
        }
        closeReport = new ArrowCloseReport(name, allocated, freed[0], freed[1], text);
        listener.close();
    }

    /** @return after {@link #close()}: what it found and freed; null before */
    public ArrowCloseReport closeReport() {
        return closeReport;
    }

    /** Live allocations of the tracking factory (package-private: for tests); -1 without it. */
    int liveAllocations() {
        return memory == null ? -1 : memory.liveCount();
    }

    @Override
    public String toString() {
        return "NativeArrowAllocator{name='" + name + "', allocated=" + allocatedBytes() + ", " + listener
                + (closed.get() ? ", closed" : "") + "}";
    }
}
