package org.nativemem;

/**
 * The test-only exports of the test library (native/jni/src/testing.rs, built only with the
 * `testing` feature into target/testlib/libnativemem_jni.so): panics, native spillers, native
 * allocations and threads, which Java alone cannot create. Shared by the JUnit tests and the e2e
 * jobs (tests/support/java). The class name must be {@code org.nativemem.NativeTesting} because
 * JNI binds the exports by class name. The product library does not export these methods at all
 * (scripts/check-product.sh checks it), so a class of this name in production code cannot reach
 * them: calling one fails with {@link UnsatisfiedLinkError}.
 *
 * <p>Every method takes the manager's {@link NativeMemoryManager#handle()} and, like any export,
 * throws {@link IllegalStateException} for a closed manager.
 */
public final class NativeTesting {
    static {
        NativeLibraryLoader.load();
    }

    private NativeTesting() {
    }

    /** Panics inside an export with {@code message}. */
    public static native void panic(String message);

    /** Panics while a call on the manager is in flight. */
    public static native void panicInCall(long manager);

    /** Calls in flight on the manager now. */
    public static native long inFlight(long manager);

    /**
     * Registers a native spiller holding {@code bytes} in {@code pool} (reserved now, through the
     * listener); a spill frees up to its target after sleeping {@code delayMillis}. Kept until
     * the manager closes.
     */
    public static native void registerSpiller(long manager, String pool, long bytes, long delayMillis);

    /** A native allocation of {@code bytes} charged to {@code pool}; returns its address. */
    public static native long allocate(long manager, String pool, long bytes);

    /** Frees an allocation made by {@link #allocate}; returns its size. */
    public static native long free(long manager, long address);

    /**
     * Starts {@code threads} native threads that each grow a reservation {@code iterations} times
     * by {@code bytesPerGrow} (upcalls to the listener from threads the JVM did not start), then
     * free it. Returns how many were still attached after their upcalls; rethrows the first error.
     */
    public static native int growFromNativeThreads(long manager, String pool, int threads, int iterations,
            long bytesPerGrow);

    // ---- hardening: faults in each layer, load, resident memory ---------------------------------

    /**
     * Like {@link #registerSpiller}, but the first {@code panics} spill calls panic with
     * {@code message} (whoever asked for the spill: Java, Spark through the listener, or a native
     * grow that spills).
     */
    public static native void registerPanickingSpiller(long manager, String pool, long bytes, int panics,
            String message);

    /**
     * Registers a native spiller owning a reservation of {@code bytes} in {@code pool}, held only by
     * the manager's spiller registry, and drops its registration at once (an operator that
     * finished): the spiller and its reservation are dropped, releasing the bytes.
     */
    public static native void registerAndDropSpiller(long manager, String pool, long bytes);

    /**
     * A manager whose listener is {@code listener} behind a Rust listener on the upcall path that
     * panics at its {@code panicAtReserveCall}-th reserve and {@code panicAtUnreserveCall}-th
     * unreserve (1-based, 0 = never), before reaching Java. Returns the manager handle.
     */
    public static native long createPanickyManager(String name, ReservationListener listener, long blockBytes,
            int panicAtReserveCall, int panicAtUnreserveCall, String message);

    /** Like {@link #allocate}, with every page written (resident memory); returns its address. */
    public static native long allocateTouched(long manager, String pool, long bytes);

    /** glibc {@code malloc_trim(0)}: returns free C heap memory to the OS; true if some was. */
    public static native boolean mallocTrim();

    /**
     * Starts {@code threads} native threads that, for {@code durationMillis} or until the manager
     * closes, grow/shrink a reservation of up to {@code maxBytesPerThread} in {@code pool} (random
     * steps from {@code seed}), allocate, touch and free blocks, and ask the manager to spill; each
     * step is one call on the manager. With {@code spillable} each reservation is also a native
     * spiller. Out-of-memory is counted, not fatal. Returns a churn handle (stale once the manager
     * closes).
     */
    public static native long startNativeChurn(long manager, String pool, int threads, long durationMillis,
            long maxBytesPerThread, boolean spillable, long seed);

    /** Steps the churn's threads completed so far (a progress counter). */
    public static native long churnOps(long churn);

    /** The churn's threads that have not returned yet. */
    public static native int churnRunning(long churn);

    /**
     * Waits for the churn's threads; returns {steps, outOfMemory, threadsStoppedByClose}. Throws
     * the first unexpected error of a thread, or if they still run after {@code timeoutMillis}.
     */
    public static native long[] joinNativeChurn(long churn, long timeoutMillis);

    // ---- the library's own heap, counted ---------------------------------------------------------

    /**
     * The test library's heap as its counting global allocator sees it:
     * {@code {liveBlocks, liveBytes, allocations, allocatedBytes}} (totals since the library was
     * loaded). Only the library's own Rust allocations are counted (not the JVM's, not other native
     * libraries'), so after N create → use → close cycles the live counts must be back to where
     * they were.
     */
    public static native long[] nativeHeapCounts();

    /** Blocks the library has allocated and not freed. */
    public static long liveNativeBlocks() {
        return nativeHeapCounts()[0];
    }

    /** Bytes the library has allocated and not freed. */
    public static long liveNativeBytes() {
        return nativeHeapCounts()[1];
    }

    /**
     * Polls {@link #nativeHeapCounts()} every 10 ms until the live blocks and bytes equal those of
     * {@code baseline} or {@code timeoutMillis} passed (native threads of the library may still be
     * finishing and freeing what they hold); returns the last reading.
     */
    public static long[] awaitNativeHeap(long[] baseline, long timeoutMillis) throws InterruptedException {
        long deadline = System.nanoTime() + timeoutMillis * 1_000_000L;
        long[] now = nativeHeapCounts();
        while ((now[0] != baseline[0] || now[1] != baseline[1]) && System.nanoTime() < deadline) {
            Thread.sleep(10);
            now = nativeHeapCounts();
        }
        return now;
    }

    /**
     * Starts {@code threads} native threads that all wait for each other on a lock, then return
     * (joined here). For warm-ups before a heap baseline: the lock library keeps a global table of
     * parked threads that grows for good when more threads than ever have parked at once; this
     * sizes it for {@code threads}, so a later, smaller peak adds nothing.
     */
    public static native void parkNativeThreads(int threads);

    /**
     * The heap once nothing allocates through the library any more: polls every 100 ms until two
     * readings agree on the live blocks, live bytes and total allocations (native threads left by
     * earlier work have finished), for up to {@code timeoutMillis}; returns that reading. Throws
     * {@link IllegalStateException} if the heap did not become quiet in time.
     */
    public static long[] quietNativeHeap(long timeoutMillis) throws InterruptedException {
        long deadline = System.nanoTime() + timeoutMillis * 1_000_000L;
        long[] last = nativeHeapCounts();
        while (true) {
            Thread.sleep(100);
            long[] now = nativeHeapCounts();
            if (now[0] == last[0] && now[1] == last[1] && now[2] == last[2]) {
                return now;
            }
            if (System.nanoTime() > deadline) {
                throw new IllegalStateException("the native library's heap did not become quiet within "
                        + timeoutMillis + " ms: live blocks " + last[0] + " -> " + now[0] + ", live bytes " + last[1]
                        + " -> " + now[1] + ", allocations " + last[2] + " -> " + now[2]);
            }
            last = now;
        }
    }

    /**
     * Sets the most verbose level the native library logs at, process-wide ({@code off},
     * {@code error}, {@code warn}, {@code info}, {@code debug}, {@code trace}); returns the previous.
     */
    public static native String setNativeLogLevel(String level);
}
